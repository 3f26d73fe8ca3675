"""One grid cell, start to end: data -> cached features -> method -> train -> tune on val -> test once -> metrics.

`run(cfg, output_dir)` is plain Python over a composed config (no Hydra runtime), so tests and the batched-cell
runner call it directly. The local metrics.json is the result of record; W&B mirrors it.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from clipadapt import protocols, trained_state
from clipadapt.data import ImageDataset, Item, build_dataset
from clipadapt.data.benchmarks import dataset_config
from clipadapt.engine import fit
from clipadapt.features import AUGMENTATIONS, FeatureExtractor, FeatureSet, View, ViewStack, backbone_key
from clipadapt.files import write_atomic, write_json_atomic, write_text_atomic
from clipadapt.methods import FewShotTask, build_method
from clipadapt.methods.base import method_config
from clipadapt.tracking import make_logger, provenance_record

log = logging.getLogger(__name__)

HEADLINE = ("test/acc", "base/acc", "new/acc", "targets/mean_acc")  # the numbers a run's last log line shows


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but CUDA is not available here: use device=auto or device=cpu")
    return torch.device(name)


@dataclass
class TaskData:
    """Everything a cell needs, as features: what the method trains and is tested on, and where it came from."""

    classnames: list[str]
    templates: list[str]
    text: np.ndarray
    train: FeatureSet
    val: FeatureSet | None
    test: FeatureSet
    provenance: dict
    prompt_encoder: object = None  # () -> PromptEncoder, or None when there is no text tower
    load_target: object = None  # (dataset id, with_text) -> protocols.Target: a transfer target's test features


def _load_backbone(cfg: DictConfig, device: torch.device):
    from clipadapt.backbone import ClipBackbone  # imports open_clip: only on a cache miss or for prompt methods

    return ClipBackbone(cfg.backbone.model, cfg.backbone.pretrained, cfg.backbone.dense, device=str(device))


def no_features(width: int) -> FeatureSet:
    """An empty train set: what a method is rebuilt on before its saved state is loaded."""
    return FeatureSet(image=np.zeros((0, 1, width), dtype=np.float32), labels=np.zeros(0, dtype=np.int64))


def _drawn(train: list[Item], val: list[Item], classnames: list[str], split_hash: str, cfg: DictConfig,
           val_from_train: bool = False):
    """The draw, and its record: hashes, where it and its val set came from, the drawn paths (features file: rows)."""
    draw, record = protocols.draw(train, val, classnames, cfg, val_from_train)
    return draw, {"split_hash": split_hash, "draw_hash": draw.digest, **record,
                  "draw": {"train": [i.path for i in draw.train], "val": [i.path for i in draw.val]}}


def _extractor(cfg: DictConfig, dataset: ImageDataset, load_backbone) -> FeatureExtractor:
    return FeatureExtractor(
        Path(cfg.paths.cache_dir), dataset.name, dataset.image_root, cfg.backbone.name,
        backbone_key(cfg.backbone.model, cfg.backbone.pretrained, cfg.backbone.dense),
        load_backbone=load_backbone,
        batch_size=cfg.features.batch_size, num_workers=cfg.features.num_workers, dtype=cfg.features.dtype,
    )


def image_task_data(cfg: DictConfig, needs_dense: bool, device: torch.device, augmented: bool = True,
                    with_draw: bool = True, augmentation: str = "tip") -> TaskData:
    """Features of the draw and the test set; `augmented=False` skips the augmented train views (zero-shot, probe),
    `with_draw=False` the draw's (re-evaluation: the saved state holds what training and tuning made of them);
    `augmentation`: the method's recipe for the augmented views (features.AUGMENTATIONS)."""
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    draw, provenance = _drawn(dataset.train, dataset.val, dataset.classnames, dataset.split_hash, cfg,
                              dataset.val_from_train)
    dataset.check_images_exist((draw.train + draw.val if with_draw else []) + dataset.test)  # count, first paths
    load_backbone = cache(lambda: _load_backbone(cfg, device))  # one model for the dataset and any transfer targets
    extractor = _extractor(cfg, dataset, load_backbone)
    text = extractor.text(dataset.classnames, dataset.templates)

    def features(items: list[Item], view: View) -> FeatureSet:
        return extractor.images([i.path for i in items], [i.label for i in items], view, dense=needs_dense)

    train = features(draw.train, View("plain")) if with_draw else no_features(text.shape[1])
    if with_draw and augmented and cfg.features.train_views > 0:
        view = View("augment", cfg.features.train_views, cfg.features.augment_seed, augmentation)
        provenance["augmentation"] = f"{augmentation}: {AUGMENTATIONS[augmentation].description}"
        views = features(draw.train, view)
        train = FeatureSet(
            image=np.concatenate([train.image, views.image], axis=1), labels=train.labels, paths=train.paths,
            # Dense views stay in their memory-mapped entries (~17 GB for ImageNet 16-shot RN50): training reads a
            # step's rows from each (features.ViewStack).
            dense=None if train.dense is None else ViewStack([train.dense, views.dense]),
        )

    def load_target(name: str, with_text: bool = True) -> protocols.Target:
        target = build_dataset(dataset_config(name), Path(cfg.paths.data_root))
        target.check_images_exist(target.test)
        target_extractor = _extractor(cfg, target, load_backbone)
        text = target_extractor.text(target.classnames, target.templates) if with_text else None
        paths, labels = [i.path for i in target.test], [i.label for i in target.test]
        test = target_extractor.images(paths, labels, View("plain"), dense=needs_dense)
        return protocols.Target(name, target.classnames, text, test)

    return TaskData(
        classnames=dataset.classnames,
        templates=dataset.templates,
        text=text,
        train=train,
        val=features(draw.val, View("plain")) if draw.val and with_draw else None,
        test=features(dataset.test, View("plain")),
        provenance=provenance,
        prompt_encoder=lambda: extractor.backbone.prompt_encoder(),
        load_target=load_target,
    )


def file_task_data(cfg: DictConfig) -> TaskData:
    from clipadapt.data.features_file import read_features_file

    data = read_features_file(cfg.dataset.get("path"))
    classnames = [f"class {k}" for k in range(len(data["text"]))]

    def items(fs: FeatureSet | None) -> list[Item]:  # an item's path is its row in the file
        return [] if fs is None else [Item(str(i), int(label), classnames[label]) for i, label in enumerate(fs.labels)]

    draw, provenance = _drawn(items(data["train"]), items(data["val"]), classnames, data["digest"], cfg)
    rows = lambda drawn: np.array([int(i.path) for i in drawn], dtype=np.int64)  # noqa: E731
    return TaskData(
        classnames=classnames, templates=[], text=data["text"],
        train=data["train"].select(rows(draw.train)),
        val=data["val"].select(rows(draw.val)) if draw.val else None,
        test=data["test"],
        provenance=provenance,
    )


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would append .npz to a path's name
        np.savez(file, **arrays)


def protocol_flags(cfg: DictConfig, method_cfg: DictConfig, data: TaskData, test_tuned: tuple[str, ...] = ()) -> dict:
    """How the run relates to the honest protocol. Leaky: anything the test set informed, this run's own look at it
    (selection=test), the whole val split (val_policy=full, the reference codes' habit), or `test_tuned` settings
    (values the method's authors searched on the test set, e.g. CALIP's betas)."""
    leaky = cfg.protocol.selection == "test" or cfg.protocol.val_policy == "full" or bool(test_tuned)
    return {
        "val_policy": cfg.protocol.val_policy,
        "val_source": data.provenance.get("val_source"),
        "selection": cfg.protocol.selection,
        "leaky": leaky,
        "test_tuned": list(test_tuned),
        "templates": data.templates,
        "template_set": cfg.dataset.get("template_set"),
        "seed": cfg.seed,
        "shots": cfg.shots,
        "split_hash": data.provenance["split_hash"],
        "draw_hash": data.provenance["draw_hash"],
        "draw_source": data.provenance.get("draw_source", "drawn"),
        "augmentation": data.provenance.get("augmentation"),  # the train views' recipe; None: no augmented views
        "allow_fewer_shots": cfg.protocol.get("allow_fewer_shots", False),
        "fewer_shots": data.provenance.get("fewer_shots", {}),
        "method_fidelity": method_cfg.fidelity,
        "task": cfg.protocol.task,
    }


def few_shot_task(cfg: DictConfig, plan: protocols.Plan, device: torch.device) -> FewShotTask:
    """What the method is built on: the plan's training label space (base classes for base-to-new)."""
    trained = plan.data
    return FewShotTask(
        classnames=trained.classnames, templates=trained.templates,
        text=torch.tensor(np.asarray(trained.text), dtype=torch.float32, device=device),
        train=trained.train, val=trained.val if cfg.protocol.val_policy != "none" else None,
        device=device, prompt_encoder=trained.prompt_encoder, seed=cfg.seed,
        new_classnames=plan.new_classnames,
        new_text=None if plan.new_text is None else torch.tensor(plan.new_text, dtype=torch.float32, device=device),
        evaluated_datasets=[cfg.dataset.name, *plan.record.get("targets", [])],
    )


def with_method_templates(cfg: DictConfig, method_cfg: DictConfig) -> DictConfig:
    """The run config with the method's template policy applied: `method.template_set` (set per dataset in
    conf/dataset_method/, e.g. Tip-Adapter's ImageNet ensemble) picks the dataset's prompts; null keeps the
    dataset's own."""
    wanted, chosen = method_cfg.template_set, cfg.dataset.get("template_set")
    if wanted is None or wanted == chosen:
        return cfg
    if chosen is not None:
        raise ValueError(f"dataset.template_set={chosen} and method.template_set={wanted} disagree: set only one")
    if cfg.dataset.kind == "features":
        raise ValueError(f"method.template_set={wanted}: a features file brings its own text features; drop it")
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.dataset.template_set = wanted
    return cfg


def run(cfg: DictConfig, output_dir: Path) -> dict:
    """Train and evaluate one cell; writes metrics.json (and logits.npz with save_logits) into output_dir."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    method_cfg = method_config(cfg.method)  # a bad method option fails before any work
    from clipadapt.methods import METHODS

    method_class = METHODS[method_cfg.name]
    cfg = with_method_templates(cfg, method_cfg)  # the class prompts this method's recipe uses on this dataset
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    if cfg.dataset.kind == "features":
        data = file_task_data(cfg)
    else:
        data = image_task_data(cfg, method_class.needs_dense, device, augmented=method_class.uses_augmented_views,
                               augmentation=method_class.augmentation)
    plan = protocols.setup(cfg, data)  # what the method trains on, and the test sets it is then evaluated on
    timings["features_s"] = time.perf_counter() - start

    resolved = OmegaConf.to_container(cfg, resolve=True)
    made_by = provenance_record(device)  # commit, versions, device, host: in metrics.json and the W&B config
    logger = make_logger(cfg.logger, {**resolved, "provenance": made_by}, output_dir)
    failed = True
    try:
        trained = plan.data  # in the training label space (base classes for base-to-new)
        task = few_shot_task(cfg, plan, device)
        method = build_method(method_cfg, task)
        t = time.perf_counter()
        method.setup()
        history = fit(method, trained.train, cfg.seed, on_step=logger.log)
        # protocol.selection=test: searches look at the test set (leaky, flagged): CALIP's and Tip-Adapter's ImageNet code
        chosen = method.tune(trained.test if cfg.protocol.selection == "test" else task.val)
        timings["train_s"] = time.perf_counter() - t
        state = trained_state.snapshot(method)  # before the evaluations: a retarget changes the method

        t = time.perf_counter()
        results = protocols.evaluate(method, plan.evaluations)  # the one and only look at each test set
        timings["eval_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - start

        scores = protocols.summary(cfg.protocol.task, results)
        metrics = {
            "run_name": cfg.run_name,
            "method": method_cfg.name,
            "dataset": cfg.dataset.name,
            "backbone": cfg.backbone.name,
            "shots": cfg.shots,
            "seed": cfg.seed,
            **scores,
            "train/loss_history": history,
            "chosen": chosen,
            **method.record(),
            # every method option as run: schema defaults and what the method resolved (e.g. CoOp's epochs by shots)
            "method_config": OmegaConf.to_container(method.cfg, resolve=True),
            "protocol": {**protocol_flags(cfg, method_cfg, data, method.test_tuned), **plan.record},
            "draw": data.provenance.get("draw"),
            "timings": timings,
            "provenance": made_by,
            "config": resolved,
        }
        if cfg.save_logits:  # temp file + rename, like metrics.json
            write_atomic(output_dir / "logits.npz", lambda tmp: save_npz(tmp, protocols.logit_arrays(results)))
        trained_state.write(state, output_dir / trained_state.STATE_FILE)  # first: a metrics.json has its state
        for name, text in method.files().items():  # e.g. RTOS's anchors.txt
            write_text_atomic(output_dir / name, text)
        write_json_atomic(output_dir / "metrics.json", metrics)
        headline = {k: v for k, v in scores.items() if isinstance(v, float)}
        logger.summary({**headline, **{f"chosen/{k}": v for k, v in chosen.items()}})
        shown = ", ".join(f"{key} {scores[key]:.2f}" for key in HEADLINE if key in scores)
        log.info("%s: %s (%d test images, %.1f s) in %s",  # a run's last line: what it got and where it went
                 cfg.run_name, shown, metrics["num_test"], timings["total_s"], output_dir)
        failed = False
        return metrics
    finally:
        logger.close(failed=failed)
