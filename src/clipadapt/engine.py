"""The one training loop and the one evaluator, shared by every method; both run on cached features only."""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, SequentialLR

from clipadapt.features import FeatureSet, read_rows, to_tensor
from clipadapt.methods.base import Batch, Method

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def make_optimizer(params, train) -> torch.optim.Optimizer:
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {train.optimizer!r}: use one of {sorted(OPTIMIZERS)}")
    extra = {"momentum": train.momentum} if train.optimizer == "sgd" else {"eps": train.eps}
    return OPTIMIZERS[train.optimizer](params, lr=train.lr, weight_decay=train.weight_decay, **extra)


def make_schedule(optimizer, train, steps_per_epoch: int):
    """Per-step schedule: optional constant warm-up at warmup_lr (CoOp's), then cosine to 0 or constant."""
    total = train.epochs * steps_per_epoch
    warmup = min(train.warmup_epochs * steps_per_epoch, total)
    if train.schedule == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    elif train.schedule == "constant":
        main = LambdaLR(optimizer, lambda step: 1.0)
    else:
        raise ValueError(f"unknown schedule {train.schedule!r}: use cosine or constant")
    if warmup == 0:
        return main
    factor = train.warmup_lr / train.lr
    return SequentialLR(optimizer, [LinearLR(optimizer, factor, factor, total_iters=warmup), main], milestones=[warmup])


def to_batch(image: np.ndarray, dense: np.ndarray | None, device: torch.device) -> Batch:
    """Cached (fp16, possibly memory-mapped) rows as float32 unit vectors on the device.

    Re-normalising in float32 undoes fp16 storage's rounding of the norm, so every method sees unit features.
    """
    def unit(array):
        return F.normalize(to_tensor(array, device), dim=-1)

    return Batch(image=unit(image), dense=None if dense is None else unit(dense))


def _dense_of(method: Method, features: FeatureSet) -> np.ndarray | None:
    if not method.needs_dense:
        return None
    if features.dense is None:
        raise ValueError(f"{method.cfg.name} needs dense features, but this feature set has none")
    return features.dense


def fit(method: Method, train: FeatureSet, seed: int, on_step: Callable[[dict], None] | None = None) -> list[float]:
    """Train the method's trainable parameters; returns the mean loss per epoch (empty when training-free).

    Each epoch visits every train image once, in one of its cached augmented views drawn at random (the cached
    equivalent of one augmented pass over the images), with the method's optimizer and per-step schedule.
    """
    cfg = method.cfg.train
    params = [p for p in method.parameters() if p.requires_grad]
    if cfg.epochs == 0 or not params:
        return []
    device = next(iter(params)).device
    generator = torch.Generator().manual_seed(seed)
    n, n_views = train.image.shape[:2]
    view_range = (1, n_views) if cfg.views == "augment" and n_views > 1 else (0, 1)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    optimizer = make_optimizer(params, cfg)
    schedule = make_schedule(optimizer, cfg, steps_per_epoch)
    labels = torch.as_tensor(train.labels)
    dense = _dense_of(method, train)
    method.train()
    history = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator).numpy()
        views = torch.randint(*view_range, (n,), generator=generator).numpy()
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            batch_views = views[start : start + cfg.batch_size]
            batch = to_batch(train.image[rows, batch_views], None if dense is None else dense[rows, batch_views], device)
            loss = method.loss(batch, labels[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        history.append(total / n)
        if on_step is not None:
            on_step({"epoch": epoch, "train/loss": history[-1], "train/lr": schedule.get_last_lr()[0]})
    method.eval()
    return history


@torch.no_grad()
def predict(method: Method, features: FeatureSet, batch_size: int = 1024) -> torch.Tensor:
    """Logits [N, K] on CPU, streaming view 0 of (possibly memory-mapped) features in batches."""
    method.eval()
    device = method.text.device
    dense = _dense_of(method, features)
    outputs = []
    for start in range(0, len(features), batch_size):
        stop = start + batch_size  # contiguous rows: one file read each, nothing left mapped (see read_rows)
        batch = to_batch(read_rows(features.image, start, stop)[:, 0],
                         None if dense is None else read_rows(dense, start, stop)[:, 0], device)
        outputs.append(method(batch).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, method.text.shape[0])


def accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def per_class_accuracy(logits: torch.Tensor, labels, num_classes: int) -> list[float | None]:
    labels = torch.as_tensor(labels)
    hits = logits.argmax(-1) == labels
    return [float(hits[labels == k].float().mean()) if (labels == k).any() else None for k in range(num_classes)]
