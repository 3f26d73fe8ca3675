"""The one training loop and the one evaluator, shared by every method; both run on cached features only."""

from __future__ import annotations

import ctypes
import logging
import math
from contextvars import ContextVar
from functools import cache
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, SequentialLR

from clipadapt.features import Batch, FeatureSet, read_pairs, read_rows, to_tensor, unit_rows
from clipadapt import optim
from clipadapt.optim import FusedAdamW, FusedSGD
from clipadapt.progress import progress

if TYPE_CHECKING:  # the method registry imports method modules, some of which train through this loop
    from clipadapt.methods.base import Method

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
# The same fused updates without torch.optim's dynamo guards, whose first call imports torch._dynamo (~1.2 s of a
# cached cell's start): bit-identical (clipadapt.optim).
FUSED_OPTIMIZERS = {"adamw": FusedAdamW, "sgd": FusedSGD}


def make_optimizer(groups: list[dict], train) -> torch.optim.Optimizer:
    """The optimiser over a method's parameter groups (Method.parameter_groups); `train` gives the group defaults."""
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {train.optimizer!r}: use one of {sorted(OPTIMIZERS)}")
    extra = {"momentum": train.momentum} if train.optimizer == "sgd" else {"eps": train.eps}
    groups = [{**group, "params": list(group["params"])} for group in groups]
    # The fused kernels (CPU and CUDA) update each parameter in one pass instead of ~10 (Tip-Adapter-F's 16M-entry
    # cache keys: 16 ms instead of 160 ms a step on 2 CPU cores); the same update up to float rounding.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    if fused and optim.SUPPORTED:
        return FUSED_OPTIMIZERS[train.optimizer](groups, lr=train.lr, weight_decay=train.weight_decay, **extra)
    return OPTIMIZERS[train.optimizer](groups, lr=train.lr, weight_decay=train.weight_decay, fused=fused, **extra)


def batches_per_epoch(rows: int, train) -> int:
    """Batches in an epoch; with drop_last the last partial batch is left out when the draw holds a full one
    (Dassl's train loader: drop_last = len(data) >= batch_size, so a tiny draw still trains)."""
    if train.drop_last and rows >= train.batch_size:
        return rows // train.batch_size
    return math.ceil(rows / train.batch_size)


def make_schedule(optimizer, train, steps_per_epoch: int):
    """The learning rate schedule, to be stepped once per `train.schedule_unit`.

    - step (Tip-Adapter-F's official loop): warm-up over warmup_epochs x steps_per_epoch steps, then cosine to 0 over
      the remaining steps (T_max = every step after the warm-up), or constant;
    - epoch (Dassl's trainers: CoOp, CLIP-Adapter, CALIP-FS): stepped after each epoch; warm-up epochs, then Dassl's
      CosineAnnealingLR(T_max = epochs) counted from the end of the warm-up (WARMUP_RECOUNT), so the last epoch's
      lr is not 0.
    Warm-up: constant at warmup_lr (Dassl's ConstantWarmupScheduler) or linear from warmup_lr up to lr.
    """
    per_unit = steps_per_epoch if train.schedule_unit == "step" else 1
    total = train.epochs * per_unit
    warmup = min(train.warmup_epochs * per_unit, total)
    if train.schedule == "cosine":
        t_max = total - warmup if train.schedule_unit == "step" else train.epochs
        main = CosineAnnealingLR(optimizer, T_max=max(1, t_max))
    elif train.schedule == "constant":
        main = LambdaLR(optimizer, lambda step: 1.0)
    else:
        raise ValueError(f"unknown schedule {train.schedule!r}: use cosine or constant")
    if warmup == 0:
        return main
    start = train.warmup_lr / train.lr
    end = start if train.warmup_type == "constant" else 1.0
    return SequentialLR(optimizer, [LinearLR(optimizer, start, end, total_iters=warmup), main], milestones=[warmup])


def to_batch(image: np.ndarray, dense: np.ndarray | None, device: torch.device, unit: bool = True) -> Batch:
    """Cached (fp16, possibly memory-mapped) rows as float32 unit vectors on the device (`unit=False`: as cached).

    Re-normalising in float32 undoes fp16 storage's rounding of the norm, so every method sees unit features.
    """
    rows = unit_rows if unit else to_tensor
    return Batch(image=rows(image, device), dense=None if dense is None else rows(dense, device))


def _dense_of(method: Method, features: FeatureSet) -> np.ndarray | None:
    if not method.needs_dense:
        return None
    if features.dense is None:
        raise ValueError(f"{method.cfg.name} needs dense features, but this feature set has none")
    return features.dense


# Set by clipadapt.batched in the threads it runs cells on: fit() then hands the cell to the batch, which trains
# all its cells together, and returns this cell's loss history (see batched.py). None: fit trains the cell itself.
BATCH_HANDOFF: ContextVar[Callable | None] = ContextVar("clipadapt_batch_handoff", default=None)


class CellTrainer:
    """One cell in the training loop: its sample stream, its train features on the device, optimizer and schedule.

    Each epoch visits every train image once (but the last partial batch with `drop_last`), in one of its cached
    augmented views drawn at random (the cached equivalent of one augmented pass over the images), with the
    method's optimizer and schedule. A loss that is not finite at the end of an epoch stops the cell: `failure`
    holds the error, which `fit` raises.
    """

    def __init__(self, method: Method, train: FeatureSet, seed: int, on_step: Callable[[dict], None] | None = None):
        cfg = method.cfg.train
        self.method, self.on_step, self.history = method, on_step, []
        self.failure: FloatingPointError | None = None
        self.params = [p for p in method.parameters() if p.requires_grad]
        self.epochs = cfg.epochs if self.params else 0
        if self.epochs == 0:
            return
        self.device = self.params[0].device
        self.batch_size = cfg.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.n, n_views = train.image.shape[:2]
        self.view_range = (1, n_views) if cfg.views == "augment" and n_views > 1 else (0, 1)
        self.steps_per_epoch = batches_per_epoch(self.n, cfg)
        self.rows_per_epoch = min(self.n, self.steps_per_epoch * cfg.batch_size)
        self.per_epoch_schedule = cfg.schedule_unit == "epoch"
        # The views the loop samples go to the device once per fit, in their cached dtype (the float32 cast per
        # batch is exact): a step then indexes a device tensor instead of gathering fp16 rows of a memory map.
        # Dense features ([N, V, M, D] can outgrow memory) are read per batch, only the step's rows (read_pairs).
        low, high = self.view_range
        self.image = torch.from_numpy(np.array(train.image[:, low:high])).to(self.device)
        self.labels = torch.as_tensor(train.labels).to(self.device)
        self.dense = _dense_of(method, train)
        self.optimizer = make_optimizer(method.parameter_groups(), cfg)
        self.schedule = make_schedule(self.optimizer, cfg, self.steps_per_epoch)

    def shuffle(self) -> None:
        """The epoch's order and views: one permutation and one view per image from the cell's own generator."""
        order = torch.randperm(self.n, generator=self.generator)
        views = torch.randint(*self.view_range, (self.n,), generator=self.generator)
        self.order = order.to(self.device)
        # each image's row in the flattened [N * V, D] views: a batch is one index_select (half the time of
        # indexing [N, V, D] by image and view, which the stacked grid pays per cell and step)
        self.picks = (order * self.image.shape[1] + views - self.view_range[0]).to(self.device)
        self.cpu_order, self.cpu_views = order.numpy(), views.numpy()
        self.total = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device: no sync

    def batch(self, step: int) -> tuple[Batch, torch.Tensor]:
        """Rows of step `step`: float32 unit vectors (re-normalised as `to_batch` does) and their labels."""
        rows = slice(step * self.batch_size, (step + 1) * self.batch_size)
        order = self.order[rows]
        image = F.normalize(self.image.flatten(0, 1).index_select(0, self.picks[rows]).float(), dim=-1)
        dense = None
        if self.dense is not None:
            dense = unit_rows(read_pairs(self.dense, self.cpu_order[rows], self.cpu_views[rows]), self.device)
        return Batch(image=image, dense=dense), self.labels[order]

    def step(self, loss: torch.Tensor, rows: int) -> None:
        self.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used (reported per epoch)
        self.optimizer.step()
        if not self.per_epoch_schedule:
            self.schedule.step()
        self.total += loss.double() * rows

    def end_epoch(self, epoch: int) -> None:
        """The epoch's mean loss (its one host sync); a NaN or Inf loss fails the cell instead of training on."""
        loss = float(self.total) / self.rows_per_epoch
        if not math.isfinite(loss):
            self.failure = FloatingPointError(
                f"{self.method.cfg.name}: the training loss became {loss} in epoch {epoch + 1} of {self.epochs} "
                f"(lr {self.lr:.3g}): lower method.train.lr, or check the train features")
            return
        self.history.append(loss)
        if self.per_epoch_schedule:
            self.schedule.step()
        if self.on_step is not None:
            self.on_step({"epoch": epoch, "train/loss": loss, "train/lr": self.lr})


Losses = Callable[[list[CellTrainer], list[tuple[Batch, torch.Tensor]]], torch.Tensor]


def own_losses(cells: list[CellTrainer], batches: list[tuple[Batch, torch.Tensor]]) -> torch.Tensor:
    """Each cell's loss from its own method (one cell: what fit computes)."""
    return torch.stack([cell.method.loss(batch, labels) for cell, (batch, labels) in zip(cells, batches)])


@cache  # a setting of the process: once is enough, however many fits it runs
def reuse_freed_memory() -> None:
    """glibc's malloc: no more fresh mmaps for blocks over 32 MB, and freed memory is kept for reuse.

    By default such blocks are mapped anew and handed back on free, so a CPU step whose activations take GBs pays a
    page fault per 4 KB every step: a 1000-class CoOp step spent 141 s of its 461 s of CPU time in the kernel, 47 s a
    step on 2 cores; 30 s with this (bench, training). The process keeps its peak heap instead of shrinking after a
    step. A C library without mallopt (not glibc) is left as it is.
    """
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 1 << 30)


def train_loop(cells: list[CellTrainer], losses: Losses = own_losses) -> list[list[float]]:
    """The one training loop: the cells' epochs and steps in lockstep, each with its own optimizer and schedule.

    `losses` maps the batches of the cells that still have a step to take to their losses: each method on its own
    batch (`own_losses`), or one stacked model for all (clipadapt.batched). The sum is differentiated once; cells
    share no parameters, so each gets exactly its own gradient. A cell whose loss stops being finite drops out
    (its `failure` says why) and the others go on. Returns each cell's mean loss per epoch; progress (steps,
    epoch, loss, ETA) goes to clipadapt.progress, one report for the cells together.
    """
    training = [cell for cell in cells if cell.epochs]
    if not training:
        return [cell.history for cell in cells]
    if any(cell.device.type == "cpu" for cell in training):
        reuse_freed_memory()
    for cell in training:
        cell.method.train()
    epochs = max(cell.epochs for cell in training)
    with progress(total=_total_steps(training), desc=_progress_label(training), unit="step") as bar:
        for epoch in range(epochs):
            running = [cell for cell in training if epoch < cell.epochs and cell.failure is None]
            if not running:
                break
            for cell in running:
                cell.shuffle()
            for step in range(max(cell.steps_per_epoch for cell in running)):
                active = [cell for cell in running if step < cell.steps_per_epoch]
                batches = [cell.batch(step) for cell in active]
                loss = losses(active, batches)
                for cell in active:
                    cell.optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()
                for cell, value, (_, labels) in zip(active, loss.detach(), batches):
                    cell.step(value, len(labels))
                bar.update(1)
            for cell in running:
                cell.end_epoch(epoch)
            if finished := [cell for cell in running if cell.failure is None]:
                bar.update(0, epoch=f"{epoch + 1}/{epochs}", **_loss_info(finished))
    for cell in training:
        cell.method.eval()
    return [cell.history for cell in cells]


def _total_steps(cells: list[CellTrainer]) -> int:
    """Steps of the lockstep loop: per epoch, the most any cell still training takes."""
    return sum(max((c.steps_per_epoch for c in cells if epoch < c.epochs), default=0)
               for epoch in range(max(c.epochs for c in cells)))


def _progress_label(cells: list[CellTrainer]) -> str:
    names = sorted({cell.method.cfg.name for cell in cells})
    return f"train {'+'.join(names)}" + (f" ({len(cells)} cells)" if len(cells) > 1 else "")


def _loss_info(cells: list[CellTrainer]) -> dict[str, float]:
    """The epoch's loss (one cell) or its mean over the cells (several), for the progress report."""
    losses = [cell.history[-1] for cell in cells]
    return {"loss": losses[0]} if len(losses) == 1 else {"mean_loss": sum(losses) / len(losses)}


def fit(method: Method, train: FeatureSet, seed: int, on_step: Callable[[dict], None] | None = None) -> list[float]:
    """Train the method's trainable parameters; returns the mean loss per epoch (empty when training-free).

    Raises FloatingPointError, naming the method and epoch, when the loss becomes NaN or Inf.
    """
    handoff = BATCH_HANDOFF.get()
    if handoff is not None:
        return handoff(method, train, seed, on_step)
    cell = CellTrainer(method, train, seed, on_step)
    train_loop([cell])
    if cell.failure is not None:
        raise cell.failure
    return cell.history


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
                         None if dense is None else read_rows(dense, start, stop)[:, 0], device, method.unit_features)
        outputs.append(method(batch).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, method.text.shape[0])


def accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def per_class_accuracy(logits: torch.Tensor, labels, num_classes: int) -> list[float | None]:
    labels = torch.as_tensor(labels)
    hits = logits.argmax(-1) == labels
    return [float(hits[labels == k].float().mean()) if (labels == k).any() else None for k in range(num_classes)]
