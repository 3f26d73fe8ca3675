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
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from clipadapt.data import ImageDataset, Item, build_dataset
from clipadapt.engine import accuracy, fit, per_class_accuracy, predict
from clipadapt.features import FeatureExtractor, FeatureSet, View, backbone_key
from clipadapt.fewshot import draw_few_shot
from clipadapt.methods import FewShotTask, build_method
from clipadapt.methods.base import method_config
from clipadapt.tracking import make_logger

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


def _load_backbone(cfg: DictConfig, device: torch.device):
    from clipadapt.backbone import ClipBackbone  # imports open_clip: only on a cache miss or for prompt methods

    return ClipBackbone(cfg.backbone.model, cfg.backbone.pretrained, cfg.backbone.dense, device=str(device))


def _drawn(dataset: ImageDataset, cfg: DictConfig):
    draw = draw_few_shot(dataset.train, dataset.val, cfg.shots, cfg.seed)
    return draw, {"split_hash": dataset.split_hash, "draw_hash": draw.digest,
                  "draw": {"train": [i.path for i in draw.train], "val": [i.path for i in draw.val]}}


def image_task_data(cfg: DictConfig, needs_dense: bool, device: torch.device) -> TaskData:
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    draw, provenance = _drawn(dataset, cfg)
    extractor = FeatureExtractor(
        Path(cfg.paths.cache_dir), dataset.name, dataset.image_root, cfg.backbone.name,
        backbone_key(cfg.backbone.model, cfg.backbone.pretrained, cfg.backbone.dense),
        load_backbone=lambda: _load_backbone(cfg, device),
        batch_size=cfg.features.batch_size, num_workers=cfg.features.num_workers, dtype=cfg.features.dtype,
    )

    def features(items: list[Item], view: View) -> FeatureSet:
        return extractor.images([i.path for i in items], [i.label for i in items], view, dense=needs_dense)

    train = features(draw.train, View("plain"))
    if cfg.features.train_views > 0:
        augmented = features(draw.train, View("augment", cfg.features.train_views, cfg.features.augment_seed))
        train = FeatureSet(
            image=np.concatenate([train.image, augmented.image], axis=1), labels=train.labels, paths=train.paths,
            dense=None if train.dense is None else np.concatenate([train.dense, augmented.dense], axis=1),
        )
    return TaskData(
        classnames=dataset.classnames,
        templates=dataset.templates,
        text=extractor.text(dataset.classnames, dataset.templates),
        train=train,
        val=features(draw.val, View("plain")) if draw.val else None,
        test=features(dataset.test, View("plain")),
        provenance=provenance,
        prompt_encoder=lambda: extractor.backbone.prompt_encoder(),
    )


def file_task_data(cfg: DictConfig) -> TaskData:
    from clipadapt.data.features_file import read_features_file

    data = read_features_file(Path(cfg.dataset.path))

    def items(fs: FeatureSet | None) -> list[Item]:
        return [] if fs is None else [Item(str(i), int(label), "") for i, label in enumerate(fs.labels)]

    draw = draw_few_shot(items(data["train"]), items(data["val"]), cfg.shots, cfg.seed)
    rows = lambda drawn: np.array([int(i.path) for i in drawn], dtype=np.int64)  # noqa: E731
    classnames = [f"class {k}" for k in range(len(data["text"]))]
    return TaskData(
        classnames=classnames, templates=[], text=data["text"],
        train=data["train"].select(rows(draw.train)),
        val=data["val"].select(rows(draw.val)) if draw.val else None,
        test=data["test"],
        provenance={"split_hash": data["digest"], "draw_hash": draw.digest},
    )


def protocol_flags(cfg: DictConfig, method_cfg: DictConfig, data: TaskData) -> dict:
    leaky = cfg.protocol.selection == "test" or cfg.protocol.val_policy == "full"
    return {
        "val_policy": cfg.protocol.val_policy,
        "selection": cfg.protocol.selection,
        "leaky": leaky,
        "templates": data.templates,
        "seed": cfg.seed,
        "shots": cfg.shots,
        "split_hash": data.provenance["split_hash"],
        "draw_hash": data.provenance["draw_hash"],
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

    needs_dense = METHODS[method_cfg.name].needs_dense
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    data = file_task_data(cfg) if cfg.dataset.kind == "features" else image_task_data(cfg, needs_dense, device)
    timings["features_s"] = time.perf_counter() - start

    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = make_logger(cfg.logger, resolved, output_dir)
    failed = True
    try:
        task = FewShotTask(
            classnames=data.classnames, templates=data.templates,
            text=torch.tensor(np.asarray(data.text), dtype=torch.float32, device=device),
            train=data.train, val=data.val if cfg.protocol.val_policy != "none" else None,
            device=device, prompt_encoder=data.prompt_encoder, seed=cfg.seed,
        )
        method = build_method(method_cfg, task)
        t = time.perf_counter()
        method.setup()
        history = fit(method, data.train, cfg.seed, on_step=logger.log)
        # protocol.selection=test: searches look at the test set (leaky, flagged): CALIP's and Tip-Adapter's ImageNet code
        chosen = method.tune(data.test if cfg.protocol.selection == "test" else task.val)
        timings["train_s"] = time.perf_counter() - t

        t = time.perf_counter()
        logits = predict(method, data.test)  # the one and only look at the test set
        timings["eval_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - start

        top1 = accuracy(logits, data.test.labels)
        metrics = {
            "run_name": cfg.run_name,
            "method": method_cfg.name,
            "dataset": cfg.dataset.name,
            "backbone": cfg.backbone.name,
            "shots": cfg.shots,
            "seed": cfg.seed,
            "test/acc": 100 * top1,
            "test/per_class_acc": [None if a is None else 100 * a for a in per_class_accuracy(logits, data.test.labels, len(data.classnames))],
            "num_test": len(data.test),
            "train/loss_history": history,
            "chosen": chosen,
            "protocol": protocol_flags(cfg, method_cfg, data),
            "draw": data.provenance.get("draw"),
            "timings": timings,
            "config": resolved,
        }
        if cfg.save_logits:
            np.savez(output_dir / "logits.npz", logits=logits.numpy(), labels=data.test.labels)
        write_json_atomic(output_dir / "metrics.json", metrics)
        logger.summary({"test/acc": metrics["test/acc"], **{f"chosen/{k}": v for k, v in chosen.items()}})
        log.info("%s: test/acc %.2f (%d test images, %.1f s)", cfg.run_name, metrics["test/acc"], len(data.test), timings["total_s"])
        failed = False
        return metrics
    finally:
        logger.close(failed=failed)
