"""Batched cells: several grid cells (seeds, shots of one dataset, hyperparameter values) trained in one process,
as one stacked model where that is faster, each with the result it has when trained alone.

Two parts:

- `fit_cells` trains several cells' methods in the one loop (`engine.train_loop`), each cell with its own sample
  stream, optimizer and schedule. Cells whose methods have the same class, the same hyperparameters outside
  `train` and parameters of the same kind can be stacked: every step their trainable parameters are stacked
  (zero-padded where shapes differ, e.g. Tip-Adapter's cache keys at different shots) and one
  `torch.func.functional_call` of the first cell's module runs under `torch.vmap` over the cell axis; each cell's
  rows are padded to the longest batch and masked out of its loss. The stacked forward is checked against each
  cell's own forward on a few of its rows before training; a method that does not stack (an op vmap cannot batch,
  random ops, state that zero padding changes) trains cell by cell. Hyperparameters under `train` (lr, epochs,
  batch size, schedule) may differ inside a stack, since each cell keeps its own optimizer; a method's own
  hyperparameters stack only when equal.

  When to stack (`stack=None`, the default): on CUDA, where a small cell's step is bound by kernel launches and C
  cells cost one launch sequence. Not on CPU, where cells one after another give each cell's solo result bit for
  bit, and a stacked cell equals it to float rounding only; stacking is faster there from ~100 classes (15 cells of
  CLIP-Adapter, 2 cores: 46 against 87 ms a step at 1000 classes, 27 against 33 at 100, 40 against 36 at 10), so
  `stack=True` (`hydra.launcher.stack=true`) is worth choosing on CPU for large-class grids.
- `run_batch` runs whole cells (e.g. `run.run(cfg, out)`, or a Hydra job) so that their training is batched:
  each cell runs on its own thread as a coroutine (one runs at a time), and `engine.fit` inside it hands the
  method over (`engine.BATCH_HANDOFF`) and waits. When every cell has reached fit or finished, the batch is
  trained with `fit_cells` and the cells go on, one at a time, to their val search, test and metrics.json. The
  global state a cell sees (torch's RNG, Hydra's job config) is swapped in and out with it, so a cell's outputs do
  not depend on which cells share its batch.

`hydra_plugins/clipadapt_launcher` (launcher=batched) uses `run_batch` when `sweep.batch_cells=true`.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from clipadapt.engine import BATCH_HANDOFF, CellTrainer, own_losses, train_loop
from clipadapt.features import Batch, FeatureSet
from clipadapt.methods.base import Method

log = logging.getLogger(__name__)

# Stacking pads every cell to the largest one; a group may hold this much more work than its cells alone
# (e.g. 1-shot cells beside 16-shot ones are not stacked on a large dataset), unless the whole stack is small.
PADDING_WASTE = 1.5
SMALL_STACK = 1 << 26  # padded stack work (see `_size`) under which the waste does not matter: launch-bound steps


@dataclass
class FitRequest:
    """What `engine.fit` was called with."""

    method: Method
    train: FeatureSet
    seed: int
    on_step: Callable[[dict], None] | None = None
    state: tuple | None = None  # the cell's own global state (`run_batch`), in force whenever it trains alone


# ----------------------------------------------------------------------------------------------------- stacked models


def _pad_to(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    widths = []
    for have, want in reversed(list(zip(tensor.shape, shape))):
        widths += [0, want - have]
    return F.pad(tensor, widths)


def stack_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[C, ...] of tensors of one rank, each zero-padded at the end of every axis to the largest size."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    return torch.stack([_pad_to(t, shape) for t in tensors])


def _stack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[C, B, ...] of per-cell batches, shorter ones padded with copies of their first row (finite, then masked)."""
    longest = max(len(t) for t in tensors)
    return torch.stack([t if len(t) == longest else torch.cat([t, t[:1].expand(longest - len(t), *t.shape[1:])])
                        for t in tensors])


class _LossOf(nn.Module):
    """functional_call calls forward: this module's forward is the wrapped method's own `loss`."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        return self.method.loss(batch, labels)


class StackedLosses:
    """The loop's `losses` for cells whose methods stack: one vmapped functional_call for all active cells.

    A trainable parameter of one shape in every cell lives in one stacked leaf for the whole fit: each cell's
    parameter is a view of its slice (its own optimizer updates it in place) and, after each backward, its
    gradient a view of the leaf's. Stacking the parameters anew every step and splitting their gradients back
    took a quarter of a 1000-class CLIP-Adapter step; the values are the same. Parameters whose shapes differ
    (zero padding) are still stacked every step, autograd carrying each cell's gradient back to its own.
    Before the first step, one backward shows the strides each leaf's gradient arrives in, and the leaf takes
    them: autograd then accumulates the gradient as it comes, where it otherwise copies it into the leaf's layout
    (vmapped linear layers' weight gradients arrive transposed: that copy took a third of a 16-cell 1000-class
    CLIP-Adapter step).
    Buffers and frozen parameters that differ between cells are stacked once, those equal in every cell are the
    first cell's and not stacked (the text classifier, a frozen text tower). `release` gives the cells their own
    storage back.
    """

    def __init__(self, cells: list[CellTrainer]):
        self.cells = cells
        self.slot = {id(cell): i for i, cell in enumerate(cells)}
        self.base = cells[0].method
        self.custom_loss = type(self.base).loss is not Method.loss
        self.parameters = [dict(cell.method.named_parameters()) for cell in cells]
        states = [params | dict(cell.method.named_buffers()) for params, cell in zip(self.parameters, cells)]
        self.trainable = [name for name, p in self.base.named_parameters() if p.requires_grad]
        self.leaves: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, object] = {}
        self._arrived: dict[str, tuple[int, ...]] = {}  # the strides each leaf's gradient arrives in
        self._watching: list = []  # the hooks that note them, until the leaves are laid out so
        for name in self.trainable:
            if len({tuple(params[name].shape) for params in self.parameters}) == 1:
                self._share(name)
        self.constants: dict[str, torch.Tensor] = {}  # per-cell, stacked once
        for name in states[0]:
            if name in self.trainable:
                continue
            values = [state[name] for state in states]
            if not all(v is values[0] or (v.shape == values[0].shape and torch.equal(v, values[0])) for v in values):
                self.constants[name] = stack_padded([v.detach() for v in values])

    def _share(self, name: str, strides: tuple[int, ...] | None = None) -> None:
        """One [C, ...] leaf (in `strides`, default contiguous) holding the cells' values of a parameter, each
        cell's parameter a view of its slice; each cell's gradient, after a backward, a view of the leaf's."""
        params = [parameters[name] for parameters in self.parameters]
        values = torch.stack([p.detach() for p in params])
        leaf = values if strides is None else torch.empty_strided(
            values.shape, strides, dtype=values.dtype, device=values.device).copy_(values)
        leaf.requires_grad_()
        for i, param in enumerate(params):
            param.data = leaf.detach()[i]

        def hand_out(leaf: torch.Tensor) -> None:  # no copy
            grad, leaf.grad = leaf.grad, None
            for i, param in enumerate(params):
                param.grad = grad[i]

        if name in self._hooks:
            self._hooks[name].remove()
        self._hooks[name] = leaf.register_post_accumulate_grad_hook(hand_out)
        if strides is None:
            self._watching.append(leaf.register_hook(lambda grad: self._note_arrival(name, grad)))
        self.leaves[name] = leaf

    def _note_arrival(self, name: str, grad: torch.Tensor) -> None:
        self._arrived[name] = grad.stride()

    def _lay_out_as_gradients(self, losses: torch.Tensor) -> None:
        """Backward of `losses` (no optimizer step follows), then each leaf whose gradient arrived in other strides
        laid out in those, its values unchanged; the gradients are dropped."""
        losses.sum().backward()
        for hook in self._watching:
            hook.remove()
        self._watching = []
        for name, strides in self._arrived.items():
            if strides != self.leaves[name].stride():
                self._share(name, strides)
        for cell in self.cells:
            cell.optimizer.zero_grad(set_to_none=True)

    def release(self) -> None:
        """Every cell's parameters in storage of their own again (e.g. to be saved alone); call once trained."""
        for hook in [*self._hooks.values(), *self._watching]:
            hook.remove()
        for name in self.leaves:
            for params in self.parameters:
                params[name].data = params[name].data.clone(memory_format=torch.contiguous_format)
                params[name].grad = None
        self.leaves, self._hooks, self._watching = {}, {}, []

    def _state(self, cells: list[CellTrainer]) -> dict[str, torch.Tensor]:
        slots = [self.slot[id(cell)] for cell in cells]
        every = slots == list(range(len(self.cells)))
        state = {name: (leaf if every else leaf[slots]) for name, leaf in self.leaves.items()}
        state.update({name: stack_padded([self.parameters[slot][name] for slot in slots])
                      for name in self.trainable if name not in self.leaves})
        state.update({name: value if every else value[slots] for name, value in self.constants.items()})
        return state

    def logits(self, cells: list[CellTrainer], batches: list[Batch]) -> torch.Tensor:
        """[C, B, K] logits of the stacked model; rows of shorter batches padded (ignore them)."""
        image = _stack_rows([b.image for b in batches])
        dense = None if batches[0].dense is None else _stack_rows([b.dense for b in batches])

        def one(state, image, dense):
            return torch.func.functional_call(self.base, state, (Batch(image=image, dense=dense),))

        return torch.vmap(one, in_dims=(0, 0, None if dense is None else 0))(self._state(cells), image, dense)

    def __call__(self, cells: list[CellTrainer], batches: list[tuple[Batch, torch.Tensor]]) -> torch.Tensor:
        if self._watching:  # the first step
            self._lay_out_as_gradients(self._losses(cells, batches))
        return self._losses(cells, batches)

    def _losses(self, cells: list[CellTrainer], batches: list[tuple[Batch, torch.Tensor]]) -> torch.Tensor:
        rows = [len(labels) for _, labels in batches]
        labels = _stack_rows([labels for _, labels in batches])
        if self.custom_loss:  # the method's own loss takes whole batches: stack only equal-length ones
            if len(set(rows)) > 1:
                return own_losses(cells, batches)
            image = torch.stack([b.image for b, _ in batches])
            dense = None if batches[0][0].dense is None else torch.stack([b.dense for b, _ in batches])
            wrapper = _LossOf(self.base)

            def loss(state, image, dense, labels):
                prefixed = {f"method.{name}": value for name, value in state.items()}
                return torch.func.functional_call(wrapper, prefixed, (Batch(image=image, dense=dense), labels))

            return torch.vmap(loss, in_dims=(0, 0, None if dense is None else 0, 0))(
                self._state(cells), image, dense, labels)
        logits = self.logits(cells, [batch for batch, _ in batches])
        per_row = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        counts = torch.tensor(rows, device=labels.device)[:, None]
        mask = torch.arange(labels.shape[1], device=labels.device)[None] < counts
        return (per_row * mask).sum(1) / mask.sum(1)


def _probe(cell: CellTrainer, rows: int = 8) -> Batch:
    """A few of the cell's train rows (first views), normalised as the loop's batches are; draws no randomness."""
    image = F.normalize(cell.image[:rows, 0].float(), dim=-1)
    dense = None
    if cell.dense is not None:
        view = cell.view_range[0]
        dense = F.normalize(torch.from_numpy(cell.dense[:rows, view].astype("float32")).to(cell.device), dim=-1)
    return Batch(image=image, dense=dense)


def _stacks_faithfully(stacked: StackedLosses) -> str | None:
    """None when the stacked model gives every cell what its own method gives on a probe batch, else why not.

    Compares logits (and, for a method with its own `loss`, losses) in train mode: vmap refuses random ops
    (dropout, sampling), so a method that draws random numbers never stacks and keeps its solo random stream.
    """
    cells, probes = stacked.cells, [_probe(cell) for cell in stacked.cells]
    labels = [torch.zeros(len(probe.image), dtype=torch.long, device=probe.image.device) for probe in probes]
    for cell in cells:
        cell.method.train()
    try:
        with torch.no_grad():
            pairs = [(stacked.logits(cells, probes), [c.method(p) for c, p in zip(cells, probes)])]
            if stacked.custom_loss:
                together = stacked(cells, list(zip(probes, labels)))
                pairs.append((together[:, None], [c.method.loss(p, y)[None] for c, p, y in zip(cells, probes, labels)]))
    except Exception as error:  # noqa: BLE001 - any failure to stack means: train these cells one by one
        return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    finally:
        for cell in cells:
            cell.method.eval()
    for together, alone in pairs:
        for i, own in enumerate(alone):
            scale = float(own.abs().max()) or 1.0
            if own.shape != together[i, : len(own)].shape or not torch.allclose(
                    together[i, : len(own)], own, rtol=1e-4, atol=1e-5 * scale):
                return f"the stacked model differs from cell {i}'s own method"
    return None


def _kind(cell: CellTrainer) -> tuple:
    """Cells of one kind may stack: same class, device, hyperparameters outside `train`, tensor names and ranks."""
    method = cell.method
    config = OmegaConf.to_container(method.cfg, resolve=True)
    config.pop("train", None)
    tensors = tuple((name, t.dim(), t.dtype, t.requires_grad)
                    for name, t in [*method.named_parameters(), *method.named_buffers()])
    return (type(method), str(cell.device), method.task.num_classes, json.dumps(config, sort_keys=True, default=str),
            tensors)


def _size(cell: CellTrainer) -> int:
    """A step's work, up to a constant: trainable elements x rows per batch (both grow with the shots)."""
    return sum(p.numel() for p in cell.params) * min(cell.n, cell.batch_size)


def stack_groups(cells: list[CellTrainer]) -> list[list[CellTrainer]]:
    """Cells partitioned into stacks: by kind, then, largest first, as long as padding wastes little."""
    kinds: dict[tuple, list[CellTrainer]] = {}
    for cell in cells:
        kinds.setdefault(_kind(cell), []).append(cell)
    groups = []
    for members in kinds.values():
        members = sorted(members, key=_size, reverse=True)
        group = [members[0]]
        for cell in members[1:]:
            padded = _size(group[0]) * (len(group) + 1)
            if padded <= PADDING_WASTE * (sum(map(_size, group)) + _size(cell)) or padded <= SMALL_STACK:
                group.append(cell)
            else:
                groups.append(group)
                group = [cell]
        groups.append(group)
    return groups


def fit_cells(requests: Sequence[FitRequest], stack: bool | None = None) -> list[list[float] | FloatingPointError]:
    """Train several cells' methods; each cell's loss history, as `engine.fit` returns it for that cell alone, or the
    error `engine.fit` would raise (a loss that became NaN or Inf: that cell stops, the others train on).

    `stack`: None stacks on CUDA only (see the module's docstring), True wherever the methods stack, False never.
    Cells that are not stacked train one after another, each in its own global state (`FitRequest.state`, updated).
    """
    cells = [CellTrainer(r.method, r.train, r.seed, r.on_step) for r in requests]
    request_of = {id(cell): request for cell, request in zip(cells, requests)}
    for group in stack_groups([cell for cell in cells if cell.epochs]):
        name = group[0].method.cfg.name
        if (group[0].device.type == "cuda" if stack is None else stack) and len(group) > 1:
            stacked = StackedLosses(group)
            try:
                reason = _stacks_faithfully(stacked)
                if reason is None:
                    log.info("%s: training %d cells as one stacked model", name, len(group))
                    train_loop(group, stacked)
                    continue
            finally:
                stacked.release()
            log.warning("%s: %d cells train one after another, not stacked (%s)", name, len(group), reason)
        for cell in group:
            with _swapped_in(request_of[id(cell)]):
                train_loop([cell])
    return [cell.history if cell.failure is None else cell.failure for cell in cells]


@contextmanager
def _swapped_in(request: FitRequest):
    """The request's own global state in force while its cell trains alone (and kept as it leaves it)."""
    if request.state is None:
        yield
        return
    outside = _global_state()
    _set_global_state(request.state)
    try:
        yield
    finally:
        request.state = _global_state()
        _set_global_state(outside)


# ------------------------------------------------------------------------------------------------ cells as coroutines


def _global_state() -> tuple:
    """What a cell reads from process-wide state and a cell alone would own: torch's RNG and Hydra's job config."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    hydra = sys.modules.get("hydra.core.hydra_config")
    return torch.random.get_rng_state(), cuda, hydra.HydraConfig.instance().cfg if hydra else None


def _set_global_state(state: tuple) -> None:
    cpu, cuda, hydra_cfg = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    if (hydra := sys.modules.get("hydra.core.hydra_config")) is not None:
        hydra.HydraConfig.instance().cfg = hydra_cfg


class _Cell:
    """A cell's job on its own thread, run as a coroutine: the thread runs only while the batch waits for it, and
    parks when it reaches `engine.fit` (its request collected) or ends."""

    def __init__(self, job: Callable[[], Any]):
        self.job = job
        self.request: FitRequest | None = None
        self.reply: Any = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self._turn, self._parked = threading.Semaphore(0), threading.Semaphore(0)
        self.own_state: tuple | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        self._turn.acquire()
        BATCH_HANDOFF.set(self._handoff)  # this thread's context only
        try:
            self.result = self.job()
        except BaseException as error:  # noqa: BLE001 - handed to whoever runs the batch
            self.error = error
        finally:
            self.finished = True
            self._parked.release()

    def _handoff(self, method: Method, train: FeatureSet, seed: int, on_step) -> list[float]:
        self.request = FitRequest(method, train, seed, on_step)
        self._parked.release()
        self._turn.acquire()
        self.request, reply = None, self.reply
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def advance(self, reply: Any = None) -> None:
        """Run the cell (with its own global state swapped in) until it parks in fit or finishes."""
        outside = _global_state()
        if self.own_state is not None:
            _set_global_state(self.own_state)
        self.reply = reply
        if not self._thread.is_alive() and not self.finished:
            self._thread.start()
        self._turn.release()
        self._parked.acquire()
        self.own_state = _global_state()
        _set_global_state(outside)


def run_batch(jobs: Sequence[Callable[[], Any]], stack: bool | None = None) -> list[tuple[Any, BaseException | None]]:
    """Run each job (one cell each: `run(cfg, out)`, a Hydra job...) with their `engine.fit` calls batched.

    Returns (result, error) per job, in order; a job that raised has its exception as error, the others go on.
    """
    cells = [_Cell(job) for job in jobs]
    for cell in cells:
        cell.advance()
    while parked := [cell for cell in cells if not cell.finished]:
        requests = [cell.request for cell in parked]
        for cell, request in zip(parked, requests):
            request.state = cell.own_state
        try:
            histories: list[Any] = fit_cells(requests, stack=stack)
        except Exception as error:  # noqa: BLE001 - each cell's own error handling records it
            histories = [error] * len(parked)
        for cell, request, history in zip(parked, requests, histories):
            cell.own_state = request.state
            cell.advance(history)
    return [(cell.result, cell.error) for cell in cells]


def run_cells(cfgs: Sequence, output_dirs: Sequence[Path], stack: bool | None = None) -> list[dict]:
    """`run.run` for several cells of composed configs with their training batched; their metrics, in order.

    Every cell runs to its end; the first failure (if any) is raised afterwards.
    """
    from clipadapt.run import run

    outcomes = run_batch([lambda cfg=cfg, out=out: run(cfg, Path(out)) for cfg, out in zip(cfgs, output_dirs)],
                         stack=stack)
    for _, error in outcomes:
        if error is not None:
            raise error
    return [result for result, _ in outcomes]
