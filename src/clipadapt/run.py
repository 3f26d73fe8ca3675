"""One grid cell, start to end: data -> cached features -> method -> train -> tune on val -> test once -> metrics.

`run(cfg, output_dir)` is plain Python over a composed config (no Hydra runtime), so tests and the batched-cell
runner call it directly. The local metrics.json is the result of record; W&B mirrors it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from clipadapt import protocols
from clipadapt.data import ImageDataset, Item, build_dataset
from clipadapt.data.benchmarks import dataset_config
from clipadapt.engine import fit
from clipadapt.features import FeatureExtractor, FeatureSet, View, backbone_key
from clipadapt.methods import FewShotTask, build_method
from clipadapt.methods.base import method_config
from clipadapt.tracking import make_logger, provenance_record

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but CUDA is not available here: use device=auto or device=cpu")
    return torch.device(name)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temp file and rename: a reader sees the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


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


def _drawn(dataset: ImageDataset, cfg: DictConfig):
    draw, source = protocols.draw(dataset.train, dataset.val, len(dataset.classnames), cfg)
    return draw, {"split_hash": dataset.split_hash, "draw_hash": draw.digest, "draw_source": source,
                  "draw": {"train": [i.path for i in draw.train], "val": [i.path for i in draw.val]}}


def _extractor(cfg: DictConfig, dataset: ImageDataset, load_backbone) -> FeatureExtractor:
    return FeatureExtractor(
        Path(cfg.paths.cache_dir), dataset.name, dataset.image_root, cfg.backbone.name,
        backbone_key(cfg.backbone.model, cfg.backbone.pretrained, cfg.backbone.dense),
        load_backbone=load_backbone,
        batch_size=cfg.features.batch_size, num_workers=cfg.features.num_workers, dtype=cfg.features.dtype,
    )


def image_task_data(cfg: DictConfig, needs_dense: bool, device: torch.device, augmented: bool = True) -> TaskData:
    """Features of the draw and the test set; `augmented=False` skips the augmented train views (zero-shot, probe)."""
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    draw, provenance = _drawn(dataset, cfg)
    dataset.check_images_exist(draw.train + draw.val + dataset.test)  # fails with a count and the first paths
    load_backbone = cache(lambda: _load_backbone(cfg, device))  # one model for the dataset and any transfer targets
    extractor = _extractor(cfg, dataset, load_backbone)

    def features(items: list[Item], view: View) -> FeatureSet:
        return extractor.images([i.path for i in items], [i.label for i in items], view, dense=needs_dense)

    train = features(draw.train, View("plain"))
    if augmented and cfg.features.train_views > 0:
        augmented = features(draw.train, View("augment", cfg.features.train_views, cfg.features.augment_seed))
        train = FeatureSet(
            image=np.concatenate([train.image, augmented.image], axis=1), labels=train.labels, paths=train.paths,
            dense=None if train.dense is None else np.concatenate([train.dense, augmented.dense], axis=1),
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
        text=extractor.text(dataset.classnames, dataset.templates),
        train=train,
        val=features(draw.val, View("plain")) if draw.val else None,
        test=features(dataset.test, View("plain")),
        provenance=provenance,
        prompt_encoder=lambda: extractor.backbone.prompt_encoder(),
        load_target=load_target,
    )


def file_task_data(cfg: DictConfig) -> TaskData:
    from clipadapt.data.features_file import read_features_file

    data = read_features_file(Path(cfg.dataset.path))

    def items(fs: FeatureSet | None) -> list[Item]:
        return [] if fs is None else [Item(str(i), int(label), "") for i, label in enumerate(fs.labels)]

    draw, source = protocols.draw(items(data["train"]), items(data["val"]), len(data["text"]), cfg)
    rows = lambda drawn: np.array([int(i.path) for i in drawn], dtype=np.int64)  # noqa: E731
    classnames = [f"class {k}" for k in range(len(data["text"]))]
    return TaskData(
        classnames=classnames, templates=[], text=data["text"],
        train=data["train"].select(rows(draw.train)),
        val=data["val"].select(rows(draw.val)) if draw.val else None,
        test=data["test"],
        provenance={"split_hash": data["digest"], "draw_hash": draw.digest, "draw_source": source},
    )


def protocol_flags(cfg: DictConfig, method_cfg: DictConfig, data: TaskData) -> dict:
    leaky = cfg.protocol.selection == "test" or cfg.protocol.val_policy == "full"
    return {
        "val_policy": cfg.protocol.val_policy,
        "selection": cfg.protocol.selection,
        "leaky": leaky,
        "templates": data.templates,
        "template_set": cfg.dataset.get("template_set"),
        "seed": cfg.seed,
        "shots": cfg.shots,
        "split_hash": data.provenance["split_hash"],
        "draw_hash": data.provenance["draw_hash"],
        "draw_source": data.provenance.get("draw_source", "drawn"),
        "method_fidelity": method_cfg.fidelity,
        "task": cfg.protocol.task,
    }


def run(cfg: DictConfig, output_dir: Path) -> dict:
    """Train and evaluate one cell; writes metrics.json (and logits.npz with save_logits) into output_dir."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    method_cfg = method_config(cfg.method)  # a bad method option fails before any work
    from clipadapt.methods import METHODS

    method_class = METHODS[method_cfg.name]
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    if cfg.dataset.kind == "features":
        data = file_task_data(cfg)
    else:
        data = image_task_data(cfg, method_class.needs_dense, device, augmented=method_class.uses_augmented_views)
    plan = protocols.setup(cfg, data)  # what the method trains on, and the test sets it is then evaluated on
    timings["features_s"] = time.perf_counter() - start

    resolved = OmegaConf.to_container(cfg, resolve=True)
    made_by = provenance_record(device)  # commit, versions, device, host: in metrics.json and the W&B config
    logger = make_logger(cfg.logger, {**resolved, "provenance": made_by}, output_dir)
    failed = True
    try:
        trained = plan.data  # in the training label space (base classes for base-to-new)
        task = FewShotTask(
            classnames=trained.classnames, templates=trained.templates,
            text=torch.tensor(np.asarray(trained.text), dtype=torch.float32, device=device),
            train=trained.train, val=trained.val if cfg.protocol.val_policy != "none" else None,
            device=device, prompt_encoder=trained.prompt_encoder, seed=cfg.seed,
            new_classnames=plan.new_classnames,
            new_text=None if plan.new_text is None else torch.tensor(plan.new_text, dtype=torch.float32, device=device),
        )
        method = build_method(method_cfg, task)
        t = time.perf_counter()
        method.setup()
        history = fit(method, trained.train, cfg.seed, on_step=logger.log)
        # protocol.selection=test: searches look at the test set (leaky, flagged): CALIP's and Tip-Adapter's ImageNet code
        chosen = method.tune(trained.test if cfg.protocol.selection == "test" else task.val)
        timings["train_s"] = time.perf_counter() - t

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
            # every method option as run: schema defaults and what the method resolved (e.g. CoOp's epochs by shots)
            "method_config": OmegaConf.to_container(method.cfg, resolve=True),
            "protocol": {**protocol_flags(cfg, method_cfg, data), **plan.record},
            "draw": data.provenance.get("draw"),
            "timings": timings,
            "provenance": made_by,
            "config": resolved,
        }
        if cfg.save_logits:  # temp file + rename, like metrics.json
            partial = output_dir / f".logits.tmp{os.getpid()}.npz"
            np.savez(partial, **protocols.logit_arrays(results))
            partial.replace(output_dir / "logits.npz")
        write_json_atomic(output_dir / "metrics.json", metrics)
        headline = {k: v for k, v in scores.items() if isinstance(v, float)}
        logger.summary({**headline, **{f"chosen/{k}": v for k, v in chosen.items()}})
        log.info("%s: test/acc %.2f (%d test images, %.1f s)",
                 cfg.run_name, metrics["test/acc"], metrics["num_test"], timings["total_s"])
        failed = False
        return metrics
    finally:
        logger.close(failed=failed)
