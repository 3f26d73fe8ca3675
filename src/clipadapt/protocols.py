"""The evaluation protocols (`protocol.task`): which classes and images a cell trains on, what it is evaluated on.

- `few_shot` (default, CoOp's): train on the K-shot draw of every class; evaluate once on the test set.
- `base_to_new` (CoCoOp's, as SHIP reports it): the first ceil(n/2) classes by label are base, the rest new. The
  draw is the few-shot draw of the whole dataset restricted to base classes (CoCoOp subsamples classes after
  drawing, so the base images are exactly the few-shot run's). The method trains in the base label space and is
  evaluated on the base test images; then `method.retarget(new names, new text)` and the new test images are
  evaluated in the new label space. `test/acc` is H, the harmonic mean of the base and new accuracies.
- `cross_dataset` (CoOp's): train on the source (ImageNet in the papers); per target, retarget to the target's
  classes (its names under its own template) and evaluate its test set.
- `domain_generalisation` (CoOp's): train on ImageNet; ImageNet-V2 / -Sketch / -A / -R keep ImageNet's label space
  and the trained classifier (no retarget); -A and -R are scored over their 200 classes only (the other logits do
  not compete), as their authors evaluate them.

The val set hyperparameter searches see is the few-shot val draw; ImageNet, which has no val split, draws it from the
train images outside the train draw (protocol.md); `protocol.val_policy=full` searches on the whole val split
(leaky, flagged) and `none` on nothing.

All as published; the draw can instead be imported (`dataset.draw_file`): a JSON with "train" and "val" lists of
image paths relative to the image folder (or of [path, label, class name] entries as in a split file), e.g. the
output of `python -m clipadapt.fewshot`, or a run's metrics.json (its "draw").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from clipadapt.data import DatasetError, Item
from clipadapt.data.benchmarks import BENCHMARKS, IMAGENET_VARIANTS
from clipadapt.engine import accuracy, per_class_accuracy, predict
from clipadapt.features import FeatureSet
from clipadapt.fewshot import Draw, draw_few_shot, per_class_counts

TASKS = ("few_shot", "base_to_new", "cross_dataset", "domain_generalisation")
DEFAULT_TARGETS = {
    "cross_dataset": [name for name in BENCHMARKS if name != "imagenet"],
    "domain_generalisation": IMAGENET_VARIANTS,
}


def base_class_count(num_classes: int) -> int:
    """Base-to-new: the first ceil(n/2) labels are base."""
    return math.ceil(num_classes / 2)


# ---------------------------------------------------------------------------------------------------- the draw


def draw(train: list[Item], val: list[Item], classnames: list[str], cfg: DictConfig,
         val_from_train: bool = False) -> tuple[Draw, dict]:
    """The cell's few-shot draw (drawn, or imported from dataset.draw_file) and its record for metrics.json.

    The val set the searches see (`val_source` in the record): the few-shot draw of the val split; for a dataset
    without one (`val_from_train`: ImageNet), min(K, 4) per class drawn from the train images outside the train
    draw; under protocol.val_policy=full the whole val split (leaky). A class with fewer train images than `shots`
    is refused unless protocol.allow_fewer_shots; the classes drawn short are recorded (`fewer_shots`).
    Base-to-new keeps the base classes of the draw (train and val), after drawing.
    """
    task = cfg.protocol.task
    if task not in TASKS:
        raise ValueError(f"unknown protocol.task {task!r}: use one of {list(TASKS)}")
    if not train:
        raise DatasetError(
            f"{cfg.dataset.name} has no train split (a test-only set): use it as a target, e.g. "
            f"dataset=imagenet protocol.task=domain_generalisation protocol.targets=[{cfg.dataset.name}]"
        )
    draw_file = cfg.dataset.get("draw_file")
    if draw_file:
        drawn = import_draw(Path(draw_file), train, val, cfg.shots, cfg.seed, val_from_train)
        source = f"file:{draw_file}"
    else:
        drawn, source = draw_few_shot(train, val, cfg.shots, cfg.seed, val_from_train), "drawn"
    fewer = fewer_than_asked(drawn, classnames, cfg)
    drawn, val_source = _searched_val(drawn, val, val_from_train, cfg)
    if task == "base_to_new":
        base = base_class_count(len(classnames))
        base_train, base_val = ([i for i in items if i.label < base] for items in (drawn.train, drawn.val))
        drawn = Draw(base_train, base_val, drawn.shots, drawn.seed)
    return drawn, {"draw_source": source, "val_source": val_source, "fewer_shots": fewer}


def fewer_than_asked(drawn: Draw, classnames: list[str], cfg: DictConfig) -> dict[str, dict[str, int]]:
    """{class name: {"train"|"val": images drawn}} for the classes drawn short of K (train) or min(K, 4) (val).

    Short train classes are refused unless protocol.allow_fewer_shots; a short val class is kept as CoOp keeps it.
    """
    wanted = {"train": drawn.shots, "val": min(drawn.shots, 4)}
    short: dict[str, dict[str, int]] = {}
    for part, items in (("train", drawn.train), ("val", drawn.val)):
        if not items:  # no val split: nothing was asked of it
            continue
        for label, count in enumerate(per_class_counts(items, len(classnames))):
            if count < wanted[part]:
                short.setdefault(classnames[label], {})[part] = count
    train_short = [name for name, counts in short.items() if "train" in counts]
    if train_short and not cfg.protocol.get("allow_fewer_shots", False):
        name, more = train_short[0], len(train_short) - 1
        raise DatasetError(
            f"{cfg.dataset.name}: class {name!r} has {short[name]['train']} train images, fewer than shots={drawn.shots}"
            f"{f' (and {more} more classes)' if more else ''}: lower shots, or set protocol.allow_fewer_shots=true "
            f"to train on the images there are (metrics.json then records the counts per class)"
        )
    return short


def _searched_val(drawn: Draw, val: list[Item], val_from_train: bool, cfg: DictConfig) -> tuple[Draw, str]:
    """The draw with the val set protocol.val_policy gives the searches, and where that set comes from."""
    policy = cfg.protocol.val_policy  # none | few_shot | full (validated at start, config.py)
    if policy == "full":
        if val_from_train or not val:
            raise DatasetError(
                f"protocol.val_policy=full searches on {cfg.dataset.name}'s val split, and it has none: "
                f"use protocol.val_policy=few_shot"
                + (" (a val draw from the train images outside the train draw)" if val_from_train else "")
            )
        return replace(drawn, val=list(val)), "val_split_full"
    if policy == "none" or not drawn.val:
        return drawn, "none"
    return drawn, "train_outside_draw" if val_from_train else "val_split_draw"


def import_draw(path: Path, train: list[Item], val: list[Item], shots: int, seed: int,
                val_from_train: bool = False) -> Draw:
    """A published or saved draw: every entry must be an image of the dataset's train (val) list; for a dataset
    without a val split (`val_from_train`), val entries are train images outside the train draw."""
    if not path.is_file():
        raise DatasetError(f"draw file {path} does not exist: set dataset.draw_file to a JSON with train/val lists")
    try:
        payload = json.loads(path.read_text())
        payload = payload.get("draw") or payload  # a run's metrics.json keeps its draw under "draw"
        lists = {split: payload.get(split) or [] for split in ("train", "val")}
    except (ValueError, AttributeError) as error:
        raise DatasetError(f"draw file {path} is not a JSON object with train/val lists: {error}") from error
    if not lists["train"]:
        raise DatasetError(f"draw file {path} has no train images")

    pools = {"train": train, "val": val}

    def resolve(split: str, pool_name: str) -> list[Item]:
        by_path = {item.path: item for item in pools[pool_name]}
        items = []
        for entry in lists[split]:
            relative = entry if isinstance(entry, str) else entry[0] if isinstance(entry, list) and len(entry) == 3 else None
            if relative is None:
                raise DatasetError(f"draw file {path}: {split} entries must be paths or [path, label, name], got {entry!r}")
            item = by_path.get(relative)
            if item is None:
                raise DatasetError(f"draw file {path}: {split} image {relative!r} is not in the dataset's {pool_name} list")
            if not isinstance(entry, str) and int(entry[1]) != item.label:
                raise DatasetError(f"draw file {path}: {relative!r} has label {entry[1]}, the split file says {item.label}")
            items.append(item)
        return items

    drawn = Draw(resolve("train", "train"), resolve("val", "train" if val_from_train else "val"), shots, seed)
    both = {i.path for i in drawn.train} & {i.path for i in drawn.val}
    if both:
        raise DatasetError(f"draw file {path}: {sorted(both)[0]!r} is in both the train and the val draw")
    most = max(np.bincount([i.label for i in drawn.train]))
    if most != shots:
        raise DatasetError(f"draw file {path} has up to {most} train images per class but shots={shots}: set shots={most}")
    return drawn


# ------------------------------------------------------------------------------------------- data and evaluation


@dataclass
class Target:
    """A transfer target's test set as features, with its class names and text classifier (None when not needed)."""

    name: str
    classnames: list[str]
    text: np.ndarray | None
    test: FeatureSet


@dataclass
class Evaluation:
    """One look at a test set: optionally retarget first; `columns` restricts which classes compete."""

    name: str
    test: FeatureSet
    classnames: list[str] | None = None  # set: method.retarget(classnames, text) before predicting
    text: np.ndarray | None = None
    columns: np.ndarray | None = None


@dataclass
class Plan:
    """What the method trains on (`data`, in the training label space) and what it is then evaluated on."""

    data: Any  # run.TaskData
    evaluations: list[Evaluation]
    record: dict  # protocol fields for metrics.json
    new_classnames: list[str] = field(default_factory=list)  # base-to-new: label-only classes (SHIP uses them)
    new_text: np.ndarray | None = None


@dataclass
class Result:
    logits: torch.Tensor
    labels: np.ndarray
    accuracy: float
    per_class: list[float | None]


def setup(cfg: DictConfig, data: Any) -> Plan:
    """The protocol's plan for a cell. Transfer targets are read (and their features cached) here, before training."""
    task = cfg.protocol.task
    if task == "few_shot":
        return Plan(data, [Evaluation("test", data.test)], {"task": task})
    if task == "base_to_new":
        return _base_to_new(data)
    targets = list(cfg.protocol.targets or DEFAULT_TARGETS[task])
    if getattr(data, "load_target", None) is None:
        raise ValueError(f"protocol.task={task} evaluates other datasets' images: use an image dataset, not dataset=features")
    evaluations = [Evaluation("test", data.test)]
    for name in targets:
        if task == "cross_dataset":
            target = data.load_target(name, with_text=True)
            evaluations.append(Evaluation(name, target.test, target.classnames, target.text))
        else:
            evaluations.append(_same_label_space(name, data.load_target(name, with_text=False), data.classnames))
    return Plan(data, evaluations, {"task": task, "targets": targets})


def _relabelled(features: FeatureSet, low: int, high: int) -> FeatureSet:
    """The rows whose label is in [low, high), relabelled to 0..high-low-1."""
    rows = np.flatnonzero((features.labels >= low) & (features.labels < high))
    part = features.select(rows)
    return replace(part, labels=part.labels - low)


def _base_to_new(data: Any) -> Plan:
    n = len(data.classnames)
    if n < 2:
        raise ValueError("protocol.task=base_to_new needs at least 2 classes")
    base = base_class_count(n)
    if (data.train.labels >= base).any() or (data.val is not None and (data.val.labels >= base).any()):
        raise AssertionError("base-to-new: the draw must hold base classes only (protocols.draw)")
    text = np.asarray(data.text)
    base_test = _relabelled(data.test, 0, base)
    trained = replace(data, classnames=data.classnames[:base], text=text[:base], test=base_test)
    evaluations = [
        Evaluation("base", base_test),
        Evaluation("new", _relabelled(data.test, base, n), data.classnames[base:], text[base:]),
    ]
    record = {"task": "base_to_new", "base_classes": base, "new_classes": n - base}
    return Plan(trained, evaluations, record, new_classnames=data.classnames[base:], new_text=text[base:])


def _same_label_space(name: str, target: Target, classnames: list[str]) -> Evaluation:
    if target.classnames != classnames:
        raise ValueError(
            f"domain generalisation: {name} is labelled in ImageNet's label space but the trained classifier has "
            f"{len(classnames)} other classes: train with dataset=imagenet"
        )
    present = np.unique(target.test.labels)
    return Evaluation(name, target.test, columns=present if len(present) < len(classnames) else None)


def evaluate(method, evaluations: list[Evaluation]) -> dict[str, Result]:
    """Predict each evaluation's test set once, in order (a retarget stays in force for the next ones)."""
    results = {}
    for evaluation in evaluations:
        if evaluation.classnames is not None:
            method.retarget(evaluation.classnames, torch.tensor(np.asarray(evaluation.text), dtype=torch.float32))
        logits = predict(method, evaluation.test)
        if evaluation.columns is not None:
            competing = torch.full_like(logits, -torch.inf)
            competing[:, evaluation.columns] = logits[:, evaluation.columns]
            logits = competing
        labels = evaluation.test.labels
        per_class = per_class_accuracy(logits, labels, logits.shape[1])
        if evaluation.columns is not None:
            per_class = [per_class[k] for k in evaluation.columns]
        results[evaluation.name] = Result(logits, labels, accuracy(logits, labels), per_class)
    return results


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _percent(values: list[float | None]) -> list[float | None]:
    return [None if v is None else 100 * v for v in values]


def summary(task: str, results: dict[str, Result]) -> dict:
    """The protocol's numbers for metrics.json: `test/acc` is the headline (H for base-to-new, the source's test
    accuracy for the transfer tasks, whose per-target accuracies and their mean come as `<target>/acc`)."""
    if task == "base_to_new":
        base, new = results["base"], results["new"]
        h = harmonic_mean(100 * base.accuracy, 100 * new.accuracy)
        return {
            "test/acc": h, "base/acc": 100 * base.accuracy, "new/acc": 100 * new.accuracy, "H": h,
            "test/per_class_acc": _percent(base.per_class + new.per_class),  # in the dataset's label order
            "num_test": len(base.labels) + len(new.labels),
            "base/num_test": len(base.labels), "new/num_test": len(new.labels),
        }
    source = results["test"]
    out = {"test/acc": 100 * source.accuracy, "test/per_class_acc": _percent(source.per_class), "num_test": len(source.labels)}
    targets = [name for name in results if name != "test"]
    for name in targets:
        target = results[name]
        out.update({f"{name}/acc": 100 * target.accuracy, f"{name}/per_class_acc": _percent(target.per_class),
                    f"{name}/num_test": len(target.labels)})
    if targets:
        out["targets/mean_acc"] = float(np.mean([out[f"{name}/acc"] for name in targets]))
    return out


def logit_arrays(results: dict[str, Result]) -> dict[str, np.ndarray]:
    """For logits.npz: `logits`/`labels` for the plain test set, `<name>_logits`/`<name>_labels` for the others."""
    arrays = {}
    for name, result in results.items():
        prefix = "" if name == "test" else f"{name}_"
        arrays[f"{prefix}logits"] = result.logits.numpy()
        arrays[f"{prefix}labels"] = np.asarray(result.labels)
    return arrays

