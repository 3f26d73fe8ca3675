#!/usr/bin/env python
"""`make bench`: clipadapt's speed figures, each measured beside its reference in the same run, on this machine.

    python scripts/bench.py                                 # every section, the benchmark's sizes
    python scripts/bench.py --size tiny                     # a smoke run of every section (tests/test_bench.py)
    python scripts/bench.py --size gpu --device cuda        # `make gpu-check`: every section, < 8 min on one GPU
    python scripts/bench.py --only training,overhead --json bench.json

Sections (memory and extraction each in a fresh process, so that the peak resident memory is their own):

  training    engine.fit on synthetic features (16 shots, 10 augmented views, 1024-d; 10, 100 and 1000 classes):
              efficiency = the method's FLOPs (forward + backward of every step, torch.utils.flop_counter) over the
              best dense fp32 matmul rate measured in this process around the case's runs, divided by the best
              wall time of its steps of three runs (1: the machine's matmul limit). A case whose full fit would
              take longer than a third of --budget runs fewer steps (said in the table).
  overhead    process start to exit (metrics.json written) of one small cell on cached features (python -m
              clipadapt.train), beside `import torch` alone; beside `import torch` ending as the cell does, without
              the last garbage collection; and a bare @hydra.main app that imports torch and ends so (Hydra's own
              floor); best of 9 each; and which heavy modules (open_clip, torchvision, wandb) the cell imported.
  grid        cells per minute of tip_adapter_f over 11 synthetic feature sets with the benchmark datasets' class
              counts x 5 shots x 3 seeds: the batched launcher (one process) vs one process per cell, with 2 epochs
              and no search; again with the configured recipe (20 epochs, the alpha/beta search) on those class
              counts capped at 100; on CUDA (and at --size tiny) also the stacked model vs the cells one after
              another in the batched process (hydra.launcher.stack).
  search      Tip-Adapter's alpha/beta search at ImageNet's size (1000 classes x 16 shots, 4 val images per class,
              the official 200 x 20 grid) beside the official double loop, timed on a few betas and scaled.
  extraction  images/s of the extraction pipeline (decode + preprocess in DataLoader workers, encode, cache write)
              over the encoder's own rate on already-decoded tensors, for a random-init CLIP on generated JPEGs.
  memory      peak resident memory while evaluating a 50,000-image dense cache (49 x 1024 fp16 tokens each: 5 GB
              on disk, written to a temporary folder and deleted afterwards) with zero-shot CALIP; and while
              training CALIP-FS one epoch over a 7.2 GB dense train cache (6,500 images x 11 views, streamed).
  cache       the cost of verifying a cached shard's whole content (xxh3-128): hash throughput, and the first open
              of a ~1 GB shard in a process beside reading the file alone (both from the page cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("training", "overhead", "grid", "search", "extraction", "memory", "cache")
TRAINED_METHODS = ("tip_adapter_f", "clip_adapter", "calip_fs", "coop")
STACKED_TRAINING = ("clip_adapter",)  # one cell's small steps are under the target on CPU: also as a stacked grid
# imagenet, caltech101, oxford_pets, stanford_cars, oxford_flowers, food101, fgvc_aircraft, sun397, dtd, eurosat, ucf101
BENCHMARK_CLASSES = (1000, 100, 37, 196, 102, 101, 100, 397, 47, 10, 101)
HEAVY_MODULES = ("open_clip", "torchvision", "wandb")


@dataclass(frozen=True)
class Size:
    classes: tuple[int, ...] = (10, 100, 1000)
    shots: int = 16
    views: int = 10
    dim: int = 1024
    tokens: int = 49  # dense tokens per image (RN50: 7 x 7)
    text_model: str = "RN50"  # the random-init text tower CoOp trains through (its width: 1024, as `dim`)
    budget_s: float = 60.0  # per training case
    training_repeats: int = 3  # runs per training case (of a third of its budget each): the best one counts
    matmul_size: int = 0  # n of the n x n matmul that gives the reference rate (0: 2048 on CPU, 4096 on CUDA)
    stacked_cells: int = 16  # cells of one dataset in the training section's stacked case (5 shots x 3 seeds ~ 16)
    grid_classes: tuple[int, ...] = BENCHMARK_CLASSES
    grid_shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    grid_seeds: tuple[int, ...] = (1, 2, 3)
    grid_test_per_class: int = 10
    grid_epochs: int | None = 2  # None: the method's 20 (the 1000-class cells alone then take ~45 min a mode here)
    grid_processes: str = "seed1"  # one process per cell for: all | seed1 (the first seed's cells, x seeds)
    # The configured recipe (epochs and search) on these class counts: the benchmark's, at most 100 classes.
    grid_real_classes: tuple[int, ...] = tuple(min(c, 100) for c in BENCHMARK_CLASSES)
    grid_compare_stacking: bool = False  # stacked vs not, on CPU too (on CUDA always: stacking is its default)
    # Tip-Adapter's alpha/beta search: off, as said in the table; its own cost is the search section's row.
    grid_search: bool = False
    overhead_repeats: int = 9  # best of 9 each: with 5, the ratio moved 1.3-1.7 between runs on these machines
    overhead_cell: tuple[str, ...] = ("dataset.images_per_class=40", "shots=16")  # 10 classes (synthetic's default)
    extraction_model: str = "ViT-B-32"
    extraction_images: int = 256
    extraction_image_size: tuple[int, int] = (400, 300)  # a typical benchmark photo, JPEG
    extraction_batch: int = 32
    extraction_workers: tuple[int, ...] = (2, 1)  # the config's default (features.num_workers), and one
    memory_images: int = 50_000
    memory_classes: int = 100
    # CALIP-FS trained over a dense train cache of plain + `views` augmented views: 6,500 images are 7.2 GB on disk,
    # 3.6x the 2 GB peak allowed (the in-memory path held it all); one epoch of batch 32 reads ~0.7 GB of it.
    dense_train_images: int = 6_500
    cache_shard_mb: int = 1024
    search_classes: int = 1000  # ImageNet's
    search_val_per_class: int = 4  # the few-shot val draw's min(K, 4)
    search_reference_betas: int = 2  # betas of the official double loop timed (then scaled to the grid)


# `make gpu-check` (--size gpu --device cuda): every section within 8 minutes on one H100/H200, estimated from the
# CPU figures (README, Speed) and FLOP counts at ~40 TFLOP/s fp32: training at most ~8 cases held to the 6 s budget
# (CoOp's and CALIP-FS's 100 and 1000 classes, CLIP-Adapter's 100k launch-bound steps) and the rest whole fits of
# seconds, ~90 s; grid: a cell's host work ~1.5 s batched (the CPU figure: Hydra job, features file, test, metrics)
# and ~7 s alone (`import torch` and CUDA's start), so 3 batched sweeps of 12 cells ~25 s each and 2 x 6 processes
# ~45 s each, the GPU work (2 x 1000-class 20-epoch trainings and searches, ~150 TFLOP) ~5 s: ~170 s; overhead
# ~35 s, search, extraction, memory (5 GB written and streamed) and cache ~20-30 s each; the gpu tests ~30 s.
SIZES = {
    "full": Size(),
    "gpu": Size(budget_s=6, grid_classes=(1000, 100), grid_shots=(1, 4, 16), grid_seeds=(1, 2),
                grid_real_classes=(1000, 100), grid_compare_stacking=True, overhead_repeats=3),
    "tiny": Size(classes=(4,), shots=2, views=2, dim=64, tokens=4, text_model="clipadapt-tiny-vit", budget_s=2,
                 training_repeats=1, matmul_size=256, stacked_cells=2,
                 grid_classes=(4,), grid_shots=(2,), grid_seeds=(1, 2), grid_test_per_class=2, grid_epochs=1,
                 grid_processes="seed1", grid_real_classes=(3,), grid_compare_stacking=True, overhead_repeats=1,
                 overhead_cell=("dataset.images_per_class=6", "shots=2", "features.train_views=1"),
                 extraction_model="clipadapt-tiny-vit",
                 extraction_images=8, extraction_image_size=(80, 60), extraction_batch=4, extraction_workers=(1,),
                 memory_images=64, memory_classes=4, dense_train_images=64, cache_shard_mb=8, search_classes=4,
                 search_val_per_class=2),
}


@dataclass
class Row:
    section: str
    case: str
    figure: str  # what `value` is
    value: float | None
    reference: str = ""  # what it is measured beside
    target: str = ""
    note: str = ""


# ------------------------------------------------------------------------------------------------------- helpers


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic_features(classes: int, per_class: int, views: int, dim: int, seed: int = 0,
                       text: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text [K, D], image [N, views, D] fp16, labels [N]) shaped like CLIP's: class texts close to each other
    (cosine ~0.8, as prompt embeddings are), each image nearest its class's text, unit rows."""
    rng = np.random.default_rng(seed)
    if text is None:
        text = unit(rng.standard_normal(dim) + 0.5 * rng.standard_normal((classes, dim))).astype(np.float32)
    labels = np.repeat(np.arange(classes), per_class)
    image = np.empty((len(labels), views, dim), dtype=np.float16)
    for start in range(0, len(labels), 1024):  # in chunks: 1000 classes x 16 x 11 x 1024 is 720 MB in float32
        rows = labels[start : start + 1024]
        noise = rng.standard_normal((len(rows), views, dim), dtype=np.float32) / np.sqrt(dim)
        image[start : start + len(rows)] = unit(0.3 * text[rows][:, None] + noise)
    return text, image, labels


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: since `reset_peak_rss` where the system can reset it.

    Linux: VmHWM, the peak of this process's own memory map. getrusage's ru_maxrss would be wrong here: it keeps
    the peak across exec, i.e. of the parent this section's process was forked from.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def reset_peak_rss() -> str:
    """Start the peak over (Linux >= 4.0: /proc/self/clear_refs), so that it is the next phase's own; else say so."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return ""
    except OSError:
        return " (peak since process start: this system cannot reset it)"


def device_of(name: str):
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, repeats: int = 5, n: int = 0) -> float:
    """The best fp32 dense matmul rate (FLOP/s) of this process on `device`: the machine's arithmetic limit."""
    import torch

    n = n or (4096 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def env_for(home: Path) -> dict:
    return {**os.environ, "CLIPADAPT_HOME": str(home), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": str(REPO / "src")}


def timed_run(command: list[str], env: dict, cwd: Path = REPO) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall, result


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def fmt_rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.2f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.0f} GFLOP/s"


def fmt_flops(flops: float) -> str:
    for unit_flops, name in ((1e12, "TFLOP"), (1e9, "GFLOP")):
        if flops >= unit_flops:
            return f"{flops / unit_flops:.2f} {name}"
    return f"{flops / 1e6:.2f} MFLOP"


# ------------------------------------------------------------------------------------------------------ training


def _text_tower_factory(size: Size, device):
    """() -> PromptEncoder of a random-init CLIP's text tower (built once): what CoOp trains through."""
    built = {}

    def factory():
        if "encoder" not in built:
            from clipadapt.backbone import ClipBackbone

            built["encoder"] = ClipBackbone(size.text_model, None, device=str(device)).prompt_encoder()
        return built["encoder"]

    return factory


def _probe_step(method, train, rows: int, device) -> tuple[int, float]:
    """(FLOPs, seconds) of one training step's forward + backward on `rows` cached train rows (the optimizer's
    elementwise update is not counted); the seconds (best of up to three) plan how many steps fit the budget."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from clipadapt.features import Batch, to_tensor

    image = F.normalize(to_tensor(train.image[:rows, -1], device), dim=-1)
    dense = None if train.dense is None or not method.needs_dense else F.normalize(
        to_tensor(train.dense[:rows, -1], device), dim=-1)
    labels = torch.as_tensor(train.labels[:rows], device=device)
    batch = Batch(image=image, dense=dense)
    with FlopCounterMode(display=False) as counter:
        method.loss(batch, labels).backward()
    seconds = math.inf
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        method.loss(batch, labels).backward()
        synchronize(device)
        seconds = min(seconds, time.perf_counter() - start)
        if seconds > 1:  # long enough to be measured once
            break
    method.zero_grad(set_to_none=True)
    return counter.get_total_flops(), seconds


def best_of_runs(run, device, size: Size) -> tuple[float, float]:
    """(the best wall time of the size's `training_repeats` calls of `run`, the best matmul rate measured before,
    between and after them): each the machine's speed when nothing else slows it, so their ratio holds while other
    load comes and goes (on these shared machines the matmul rate alone moves 100-190 GFLOP/s within a minute)."""
    rates, walls = [matmul_rate(device, 2, size.matmul_size)], []
    for _ in range(size.training_repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        walls.append(time.perf_counter() - start)
        rates.append(matmul_rate(device, 2, size.matmul_size))
    return min(walls), max(rates)


def efficiency_row(case: str, classes: int, flops: float, wall: float, rate: float, repeats: int, note: str) -> Row:
    return Row("training", case, "efficiency", flops / rate / wall, reference=f"matmul {fmt_rate(rate)}",
               target=">= 0.5" if classes >= 1000 else "",
               note=f"{fmt_flops(flops)} in {wall:.2f} s, best of {repeats} ({note})")


def training_case(name: str, classes: int, size: Size, device, text_tower) -> tuple[Row, float]:
    """One method at one class count: its efficiency row and its measured seconds per step."""
    import torch
    from omegaconf import OmegaConf

    from clipadapt.engine import CellTrainer, train_loop
    from clipadapt.features import FeatureSet
    from clipadapt.methods import METHODS, FewShotTask, build_method

    dense_method = METHODS[name].needs_dense
    dim = text_tower().clip.text_projection.shape[1] if name == "coop" else size.dim
    text, image, labels = synthetic_features(classes, size.shots, 1 + size.views, dim, seed=classes)
    dense = None
    if dense_method:  # every image's tokens are one shared random map: the arithmetic is the same, the memory is not
        tokens = unit(np.random.default_rng(1).standard_normal((size.tokens, dim))).astype(np.float16)
        dense = np.broadcast_to(tokens, (len(labels), 1 + size.views, size.tokens, dim))
    train = FeatureSet(image=image, labels=labels, dense=dense)
    task = FewShotTask(classnames=[f"class {k}" for k in range(classes)], templates=["a photo of a {}."],
                       text=torch.tensor(text, device=device), train=train, val=None, device=device,
                       prompt_encoder=text_tower if name == "coop" else None, seed=1)
    torch.manual_seed(1)
    method = build_method(OmegaConf.create({"name": name}), task)
    method.setup()
    cfg = method.cfg.train
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    last_rows = len(labels) - (steps_per_epoch - 1) * cfg.batch_size
    full_step, step_s = _probe_step(method, train, cfg.batch_size, device)
    last_step = full_step if last_rows == cfg.batch_size else _probe_step(method, train, last_rows, device)[0]

    # Each run: as many whole epochs as fit in its share of the budget (or as many steps of one epoch, at least one).
    budget = size.budget_s / size.training_repeats
    step_s *= 1.25  # + the optimizer's update
    epochs, steps = cfg.epochs, steps_per_epoch
    if epochs * steps * step_s > budget:
        epochs = max(1, int(budget / (steps * step_s)))
        if steps * step_s > budget:
            steps = max(1, int(budget / step_s))
    flops = epochs * ((steps - 1) * full_step + (last_step if steps == steps_per_epoch else full_step))

    cell = CellTrainer(method, train, seed=1)  # what engine.fit runs: features to the device, optimizer, schedule
    cell.epochs, cell.steps_per_epoch = epochs, steps
    # The steps are timed: the setup above is once per fit. Each run trains on from where the last one stopped.
    wall, rate = best_of_runs(lambda: train_loop([cell]), device, size)

    whole = epochs == cfg.epochs and steps == steps_per_epoch
    run = "the whole fit" if whole else f"{epochs} of {cfg.epochs} epochs" if steps == steps_per_epoch else \
        f"{steps} of {steps_per_epoch} steps of 1 of {cfg.epochs} epochs"
    note = f"{run}; {fmt_flops(full_step)}/step, batch {cfg.batch_size}"
    return efficiency_row(f"{name}, {classes} classes", classes, flops, wall, rate, size.training_repeats, note), \
        wall / (epochs * steps)


def timed_matmuls(run, device) -> tuple[float, float]:
    """(seconds, FLOPs) of the dense matmuls (aten.mm, aten.bmm) that `run` calls, each timed where it runs: how
    fast the step's own matmul shapes go, beside the square matmul's reference rate."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default}
    totals = [0.0, 0.0]

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func not in matmuls:
                return func(*args, **(kwargs or {}))
            synchronize(device)
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            synchronize(device)
            totals[0] += time.perf_counter() - start
            totals[1] += 2 * math.prod(out.shape) * args[0].shape[-1]
            return out

    with Timed():
        run()
    return totals[0], totals[1]


def stacked_training_case(name: str, classes: int, cells: int, size: Size, device) -> Row:
    """`cells` cells of one dataset (seeds 1..cells) trained as one stacked model (launcher=batched with
    hydra.launcher.stack=true), its efficiency over all cells' FLOPs: the batched grid's figure beside one cell's."""
    import torch
    from omegaconf import OmegaConf

    from clipadapt.batched import StackedLosses
    from clipadapt.engine import CellTrainer, train_loop
    from clipadapt.features import FeatureSet
    from clipadapt.methods import FewShotTask, build_method

    text, image, labels = synthetic_features(classes, size.shots, 1 + size.views, size.dim, seed=classes)
    train = FeatureSet(image=image, labels=labels)
    task = FewShotTask(classnames=[f"class {k}" for k in range(classes)], templates=["a photo of a {}."],
                       text=torch.tensor(text, device=device), train=train, val=None, device=device, seed=1)
    methods = []
    for seed in range(1, cells + 1):
        torch.manual_seed(seed)
        methods.append(build_method(OmegaConf.create({"name": name}), task))
        methods[-1].setup()
    batch_size = methods[0].cfg.train.batch_size
    step_flops, step_s = _probe_step(methods[0], train, batch_size, device)
    budget = size.budget_s / size.training_repeats
    steps = max(1, min(len(labels) // batch_size, int(budget / (1.25 * step_s * cells))))

    trainers = [CellTrainer(method, train, seed=seed) for seed, method in enumerate(methods, 1)]
    for trainer in trainers:
        trainer.epochs, trainer.steps_per_epoch = 1, steps
    stacked = StackedLosses(trainers)
    wall, rate = best_of_runs(lambda: train_loop(trainers, stacked), device, size)
    # Where the step's time goes: a few more steps with each matmul timed (the other ops run as they do).
    probed = min(steps, 8)
    for trainer in trainers:
        trainer.steps_per_epoch = probed
    matmul_s, matmul_flops = timed_matmuls(lambda: train_loop(trainers, stacked), device)
    stacked.release()
    note = (f"the batched grid: {plural(steps, 'step')} of each cell; {fmt_flops(step_flops)}/step/cell, "
            f"batch {batch_size}; its matmuls (mm, bmm) take {matmul_s / probed / (wall / steps):.0%} of a step "
            f"and run at {matmul_flops / matmul_s / rate:.2f} of the reference rate")
    return efficiency_row(f"{name}, {classes} classes, {cells} cells stacked", classes, cells * steps * step_flops,
                          wall, rate, size.training_repeats, note)


def bench_training(size: Size, args) -> list[Row]:
    import torch

    from clipadapt.methods import METHODS

    device = device_of(args.device)
    start_rate = matmul_rate(device, n=size.matmul_size)
    text_tower = _text_tower_factory(size, device)
    rows = []
    for name in args.methods.split(","):
        if name not in METHODS:
            rows.append(Row("training", name, "efficiency", None, note="not in this checkout's method registry"))
            continue
        step_s, previous = None, None
        for classes in size.classes:
            if step_s is not None and step_s * classes / previous > size.budget_s:
                estimate = step_s * classes / previous
                rows.append(Row("training", f"{name}, {classes} classes", "efficiency", None,
                                note=f"not run: one step would take ~{estimate:.0f} s here (scaled from {previous} "
                                     f"classes), over the {size.budget_s:.0f} s budget"))
                continue
            row, step_s = training_case(name, classes, size, device, text_tower)
            rows.append(row)
            previous = classes
        if name in STACKED_TRAINING:  # below the target alone: the batched grid's figure beside it
            rows.append(stacked_training_case(name, size.classes[-1], size.stacked_cells, size, device))
    threads = torch.get_num_threads() if device.type == "cpu" else None
    end_rate = matmul_rate(device, n=size.matmul_size)
    for row in rows:
        if row.value is not None:
            row.reference += f", {threads} CPU thread{'s' if threads > 1 else ''}" if threads else ""
    rows.append(Row("training", "dense fp32 matmul rate, end of section", "TFLOP/s", end_rate / 1e12,
                    reference=f"start of section: {fmt_rate(start_rate)}"))
    return rows


# ------------------------------------------------------------------------------------------------------ overhead


# The floor Hydra itself sets: an app of no config of its own that imports torch in its task function, ending as
# the cell does.
BARE_HYDRA_APP = """import gc

import hydra


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    import torch


main()
gc.freeze()
"""


# `import torch` ending as clipadapt's entrypoints do (app.as_command): without the last collection.
QUICK_EXIT_TORCH = "import torch, gc; gc.freeze()"


def bench_overhead(size: Size, args, workdir: Path) -> list[Row]:
    env = env_for(workdir)
    bare_app = workdir / "bare_hydra_app.py"
    bare_app.write_text(BARE_HYDRA_APP)
    cell = [sys.executable, "-m", "clipadapt.train", "dataset=synthetic", "backbone=tiny", "logger=none",
            "method=tip_adapter_f", *size.overhead_cell, f"device={args.device}"]
    timed_run([*cell, f"hydra.run.dir={workdir}/warm"], env)  # computes and caches the features
    walls, floors, quick_floors, bare, traced = [], [], [], [], None
    for i in range(size.overhead_repeats):  # the last run also lists its imports (-X importtime: ~5% slower)
        out, trace = workdir / f"run{i}", ["-X", "importtime"] if i == size.overhead_repeats - 1 else []
        wall, traced = timed_run([cell[0], *trace, *cell[1:], f"hydra.run.dir={out}"], env)
        if not (out / "metrics.json").is_file():
            raise RuntimeError(f"{out}/metrics.json was not written")
        walls.append(wall)
        floors.append(timed_run([sys.executable, "-c", "import torch"], env)[0])  # the floor of a torch process
        quick_floors.append(timed_run([sys.executable, "-c", QUICK_EXIT_TORCH], env)[0])
        bare.append(timed_run([sys.executable, str(bare_app), f"hydra.run.dir={workdir}/bare{i}"], env)[0])
    modules = {m.group(1) for m in re.finditer(r"\|\s*([\w.]+)\s*$", traced.stderr, re.M)}
    heavy = sorted({name.split(".")[0] for name in modules} & set(HEAVY_MODULES))
    dynamo = "torch._dynamo" in modules  # torch.optim's optimizers import it on first use (clipadapt.optim does not)
    best, floor, quick_floor, hydra_floor = min(walls), min(floors), min(quick_floors), min(bare)
    return [
        Row("overhead", "one cell on cached features: process start to exit, metrics.json written", "x `import torch`",
            best / floor, reference=f"`import torch` {floor:.2f} s (best of {len(floors)}, between the cells)",
            target="<= 1.3",
            note=f"{best:.2f} s, best of {len(walls)} (median {statistics.median(walls):.2f} s); synthetic, tiny "
                 f"model, {' '.join(size.overhead_cell)}; heavy imports: {', '.join(heavy) or 'none'}; "
                 f"torch._dynamo {'imported' if dynamo else 'not imported'}"),
        Row("overhead", "the same cell against `import torch` that also skips the last garbage collection",
            "x `import torch`, quick exit", best / quick_floor,
            reference=f"`{QUICK_EXIT_TORCH}` {quick_floor:.2f} s (best of {len(quick_floors)})",
            note=f"the cell ends as app.as_command does; `import torch` spends {floor - quick_floor:.2f} s "
                 "of its process in that collection: this row is the cell's cost over the import alone"),
        Row("overhead", "a bare @hydra.main app (no config) importing torch, same quick exit: start to exit",
            "x `import torch`, quick exit", hydra_floor / quick_floor,
            reference=f"`{QUICK_EXIT_TORCH}` {quick_floor:.2f} s",
            note=f"{hydra_floor:.2f} s, best of {len(bare)}: Hydra's own share of the cell's start cost; the cell "
                 f"adds {best - hydra_floor:.2f} s to it (its config, features, training, search, test, files)"),
    ]


# ---------------------------------------------------------------------------------------------------------- grid


def write_feature_files(size: Size, class_counts: tuple[int, ...], folder: Path) -> list[Path]:
    """One features file per class count: a 16-per-class train pool with 1 + views views, a val pool, a test set."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    pool = max(size.grid_shots)
    for i, classes in enumerate(class_counts):
        text, train, train_labels = synthetic_features(classes, pool, 1 + size.views, size.dim, seed=10 * i)
        _, val, val_labels = synthetic_features(classes, 4, 1, size.dim, seed=10 * i + 1, text=text)
        _, test, test_labels = synthetic_features(classes, size.grid_test_per_class, 1, size.dim, seed=10 * i + 2,
                                                  text=text)
        path = folder / f"set{i:02d}-{classes}classes.npz"
        np.savez(path, text_features=text, train_features=train, train_labels=train_labels,
                 val_features=val[:, 0], val_labels=val_labels, test_features=test[:, 0], test_labels=test_labels)
        files.append(path)
    return files


def _results(folder: Path) -> dict[tuple, dict]:
    """(features file, shots, seed) -> the cell's test accuracy and the recipe it ran, as its metrics.json says."""
    found = {}
    for path in folder.rglob("metrics.json"):
        metrics = json.loads(path.read_text())
        found[(metrics["config"]["dataset"]["path"], metrics["shots"], metrics["seed"])] = {
            "acc": metrics["test/acc"], "epochs": len(metrics["train/loss_history"]),
            "searched": str(metrics["chosen"].get("search", "")).startswith("ran")}
    return found


def _as_run(results: dict[tuple, dict]) -> str:
    epochs = "/".join(map(str, sorted({r["epochs"] for r in results.values()})))
    searched = sum(r["searched"] for r in results.values())
    return f"as run: epochs {epochs}, searched in {searched} of {len(results)} cells"


def configured_recipe() -> str:
    """tip_adapter_f's recipe as its schema sets it (what a user's cell runs)."""
    from clipadapt.method_schemas import TipAdapterFSchema

    method = TipAdapterFSchema()
    return (f"the configured {method.train.epochs} epochs and "
            f"{method.search.beta_steps} x {method.search.alpha_steps} alpha/beta search")


@dataclass
class Grid:
    """One grid of tip_adapter_f cells (features files x shots x seeds) and how its cells are configured."""

    size: Size
    args: argparse.Namespace
    classes: tuple[int, ...]
    files: list[Path]  # one per class count (`write_feature_files`)
    overrides: tuple[str, ...]  # over the method's configured recipe
    recipe: str  # those overrides in words
    env: dict

    @property
    def cells(self) -> list[tuple[Path, int, int]]:
        return [(f, k, s) for f in self.files for k in self.size.grid_shots for s in self.size.grid_seeds]

    def _common(self) -> list[str]:
        return ["method=tip_adapter_f", "dataset=features", "logger=none", f"device={self.args.device}",
                *self.overrides]

    def batched(self, out: Path, *extra: str) -> tuple[float, dict, str]:
        """Wall time, results (`_results`) and log of every cell as one `launcher=batched` sweep."""
        size = self.size
        wall, result = timed_run(
            [sys.executable, "-m", "clipadapt.train", "-m", "launcher=batched", *self._common(), *extra,
             f"dataset.path={','.join(map(str, self.files))}", f"shots={','.join(map(str, size.grid_shots))}",
             f"seed={','.join(map(str, size.grid_seeds))}", f"hydra.sweep.dir={out}",
             "hydra.sweep.subdir=${hydra.job.num}"], self.env)
        return wall, _results(out), result.stdout + result.stderr

    def one_process_per_cell(self, out: Path) -> tuple[float, dict, str]:
        """Wall time of every cell in a process of its own (estimated from --grid-processes' sample), the sampled
        cells' results, and which sample it was."""
        sample = [c for c in self.cells if self.size.grid_processes == "all" or c[2] == self.size.grid_seeds[0]]
        wall = 0.0
        for i, (path, shots, seed) in enumerate(sample):
            wall += timed_run([sys.executable, "-m", "clipadapt.train", *self._common(), f"dataset.path={path}",
                               f"shots={shots}", f"seed={seed}", f"hydra.run.dir={out}/{i}"], self.env)[0]
        scale = len(self.cells) / len(sample)
        sampled = "" if scale == 1 else \
            f", measured on the {len(sample)} cells of seed {self.size.grid_seeds[0]}, x{scale:g}"
        return wall * scale, _results(out), sampled

    def case(self) -> str:
        size, least, most = self.size, min(self.classes), max(self.classes)
        classes = f"{least}" if least == most else f"{least}-{most}"
        return (f"tip_adapter_f, {plural(len(self.files), 'feature set')} ({classes} classes) x "
                f"{plural(len(size.grid_shots), 'shot')} x {plural(len(size.grid_seeds), 'seed')} = "
                f"{plural(len(self.cells), 'cell')}")


def _same(these: dict, those: dict) -> str:
    """How many cells got the same test accuracy both ways."""
    same = sum(those.get(cell, {}).get("acc") == result["acc"] for cell, result in these.items())
    return f"test/acc identical in {same} of {len(these)} cells"


def batched_row(grid: Grid, workdir: Path, figure: str = "cells/min, batched") -> tuple[Row, tuple]:
    """launcher=batched (the grid's default) beside one process per cell; also the batched run's (wall, results,
    log)."""
    batched_run = batched_wall, batched, _ = grid.batched(workdir / "batched")
    process_wall, singles, sampled = grid.one_process_per_cell(workdir / "single")
    n = len(grid.cells)
    row = Row("grid", grid.case(), figure, 60 * n / batched_wall,
              reference=f"one process per cell: {60 * n / process_wall:.1f} cells/min{sampled}",
              note=f"{grid.recipe} ({_as_run(batched)}), test sets of {grid.size.grid_test_per_class}/class; "
                   f"batched {batched_wall:.0f} s; {_same(singles, batched)} run both ways")
    return row, batched_run


def stacking_row(grid: Grid, workdir: Path, default_run: tuple, cuda: bool) -> Row:
    """The stacked batched path (clipadapt.batched.fit_cells(stack=True), the CUDA default) beside the cells trained
    one after another in the same process (the CPU default): `default_run` is the device's default, this runs the
    other choice."""
    other_run = grid.batched(workdir / "other", f"hydra.launcher.stack={str(not cuda).lower()}")
    (stacked_wall, _, log), (unstacked_wall, _, _) = (default_run, other_run) if cuda else (other_run, default_run)
    groups = [int(n) for n in re.findall(r"training (\d+) cells as one stacked model", log)]
    fallbacks = len(re.findall(r"cells train one after another, not stacked", log))
    stacks = f"{sum(groups)} cells in {len(groups)} stacked group(s)" if groups else "no cells stacked"
    n = len(grid.cells)
    return Row("grid", grid.case(), "cells/min, stacked (hydra.launcher.stack=true)", 60 * n / stacked_wall,
               reference=f"one after another in one process (stack=false): {60 * n / unstacked_wall:.1f} cells/min",
               note=f"{grid.recipe}; {stacks}{f', {fallbacks} group(s) not stackable' if fallbacks else ''}; "
                    f"{_same(other_run[1], default_run[1])} run both ways")


def bench_grid(size: Size, args, workdir: Path) -> list[Row]:
    env = env_for(workdir)
    overrides, recipe = [], []  # the reduced recipe of the first rows
    if size.grid_epochs is not None:
        overrides.append(f"method.train.epochs={size.grid_epochs}")
        recipe.append(f"train.epochs={size.grid_epochs}")
    if not size.grid_search:
        overrides.append("method.search.enabled=false")
        recipe.append("no alpha/beta search")
    grid = Grid(size, args, size.grid_classes, write_feature_files(size, size.grid_classes, workdir / "features"),
                tuple(overrides), ", ".join(recipe) or configured_recipe(), env)
    row, default_run = batched_row(grid, workdir / "reduced")
    rows = [row]

    cuda = device_of(args.device).type == "cuda"
    if cuda or size.grid_compare_stacking:
        rows.append(stacking_row(grid, workdir / "reduced", default_run, cuda))

    real_files = write_feature_files(size, size.grid_real_classes, workdir / "features-real")
    real = Grid(size, args, size.grid_real_classes, real_files, (), configured_recipe(), env)
    rows.append(batched_row(real, workdir / "real", "cells/min, batched, configured recipe")[0])
    return rows


# -------------------------------------------------------------------------------------------------------- search


def bench_search(size: Size, args, workdir: Path) -> list[Row]:
    """tip_adapter.tune on the official grid, beside the official double loop (search_hp: a dense [val x cache] @
    [cache x classes] matmul per beta, an argmax per alpha) timed on a few betas, whose counts it must equal."""
    import torch
    from omegaconf import OmegaConf

    from clipadapt.features import FeatureSet, unit_rows
    from clipadapt.methods import FewShotTask, build_method
    from clipadapt.methods.tip_adapter import exp_affinity, grid_correct, search_grid

    device, classes = device_of(args.device), size.search_classes
    text, train, labels = synthetic_features(classes, size.shots, 1 + size.views, size.dim, seed=3)
    _, val, val_labels = synthetic_features(classes, size.search_val_per_class, 1, size.dim, seed=4, text=text)
    task = FewShotTask(classnames=[f"c{k}" for k in range(classes)], templates=[],
                       text=torch.tensor(text, device=device), train=FeatureSet(train, labels),
                       val=FeatureSet(val, val_labels), device=device)
    method = build_method(OmegaConf.create({"name": "tip_adapter"}), task)
    synchronize(device)
    start = time.perf_counter()
    chosen = method.tune(task.val)
    synchronize(device)
    wall = time.perf_counter() - start

    search = method.cfg.search
    betas, alphas = search_grid(search.beta_max, search.beta_steps), search_grid(search.alpha_max, search.alpha_steps)
    sample = betas[:: max(1, len(betas) // size.search_reference_betas)][: size.search_reference_betas]
    image, target = unit_rows(val[:, 0], device), torch.as_tensor(val_labels, device=device)
    keys = method.keys.detach()
    start = time.perf_counter()
    affinity, clip_logits = image @ keys.t(), 100.0 * image @ method.text.t()
    loop = torch.zeros(len(sample), len(alphas), dtype=torch.long)
    for b, beta in enumerate(sample):
        cache_logits = exp_affinity(affinity, beta) @ method.values
        for a, alpha in enumerate(alphas):
            loop[b, a] = int(((clip_logits + cache_logits * alpha).argmax(1) == target).sum())
    loop_s = (time.perf_counter() - start) * len(betas) / len(sample)
    same = torch.equal(loop, grid_correct(image, keys, method.values, method.text, target, sample, alphas).cpu())
    return [Row("search", f"tip_adapter's alpha/beta search: {classes} classes x {size.shots} shots, {len(val)} val "
                f"images, {len(betas)} x {len(alphas)} grid, {device.type}", "seconds", wall,
                reference=f"official double loop ~{loop_s:.0f} s (timed on {len(sample)} betas, scaled)",
                target="< 15 s", note=f"its counts on those betas {'equal' if same else 'DIFFER from'} the loop's; "
                                      f"chose beta {chosen['beta']:.3f}, alpha {chosen['alpha']:.3f}")]


# ---------------------------------------------------------------------------------------------------- extraction


def bench_extraction(size: Size, args, workdir: Path) -> list[Row]:
    import torch
    from PIL import Image

    from clipadapt.backbone import ClipBackbone
    from clipadapt.features import FeatureExtractor, View, backbone_key

    device = device_of(args.device)
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size.extraction_image_size
    paths = []
    for i in range(size.extraction_images):  # smooth random photos: JPEG decoding work like a real photo's
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(images / f"{i:05d}.jpg", quality=90)
        paths.append(f"{i:05d}.jpg")

    backbone = ClipBackbone(size.extraction_model, None, device=str(device))
    pixels = torch.stack([backbone.preprocess(Image.open(images / p).convert("RGB")) for p in paths])
    with torch.no_grad():
        backbone.encode_images(pixels[: size.extraction_batch])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for batch in pixels.split(size.extraction_batch):
            backbone.encode_images(batch)
        synchronize(device)
        encoder_rate = len(paths) / (time.perf_counter() - start)
    del pixels

    rows = []
    for workers in size.extraction_workers:  # each on a fresh cache: decode, preprocess, encode, write
        extractor = FeatureExtractor(workdir / f"cache{workers}", "bench", images, size.extraction_model.lower(),
                                     backbone_key(size.extraction_model, None, "attention"),
                                     load_backbone=lambda: backbone, batch_size=size.extraction_batch,
                                     num_workers=workers)
        reset = reset_peak_rss()
        start = time.perf_counter()
        extractor.images(paths, [0] * len(paths), View("plain"))
        synchronize(device)
        pipeline_rate = len(paths) / (time.perf_counter() - start)
        own = peak_rss_mb()
        rows.append(Row(
            "extraction", f"{size.extraction_model} random init, {len(paths)} JPEGs {width}x{height}, "
            f"{workers} DataLoader worker{'s' if workers > 1 else ''}, {device.type}", "pipeline / encoder alone",
            pipeline_rate / encoder_rate, reference=f"encoder alone {encoder_rate:.1f} img/s", target=">= 0.9",
            note=f"pipeline {pipeline_rate:.1f} img/s; peak RSS {own:.0f} MB while extracting{reset}"))
    return rows


# -------------------------------------------------------------------------------------------------------- memory


def bench_memory(size: Size, args, workdir: Path) -> list[Row]:
    import torch
    from omegaconf import OmegaConf

    from clipadapt.engine import predict
    from clipadapt.features import FeatureSet
    from clipadapt.methods import FewShotTask, build_method

    n, tokens, dim = size.memory_images, size.tokens, size.dim
    needed = n * (tokens + 1) * dim * 2
    free = shutil.disk_usage(workdir).free
    note = ""
    if needed > 0.8 * free:
        n = max(1024, int(0.8 * free / ((tokens + 1) * dim * 2)))
        note = f"; scaled down to {n} images: {free / 1e9:.1f} GB free on disk"
        needed = n * (tokens + 1) * dim * 2
    rng = np.random.default_rng(0)
    text = unit(rng.standard_normal((size.memory_classes, dim))).astype(np.float32)
    # 256 distinct rows, written again and again: 5 GB of random numbers would take minutes to draw.
    image_block = unit(rng.standard_normal((256, 1, dim), dtype=np.float32)).astype(np.float16)
    dense_block = unit(rng.standard_normal((256, 1, tokens, dim), dtype=np.float32)).astype(np.float16)
    for name, block in (("image.npy", image_block), ("dense.npy", dense_block)):
        write_repeated(workdir / name, block, n)

    labels = np.arange(n) % size.memory_classes
    features = FeatureSet(image=np.load(workdir / "image.npy", mmap_mode="r"), labels=labels,
                          dense=np.load(workdir / "dense.npy", mmap_mode="r"))
    device = device_of(args.device)
    task = FewShotTask(classnames=[f"c{k}" for k in range(size.memory_classes)], templates=[],
                       text=torch.tensor(text, device=device), train=features, val=None, device=device)
    method = build_method(OmegaConf.create({"name": "calip", "beta_source": "paper"}), task)
    before = peak_rss_mb()  # imports and setup
    note += reset_peak_rss()
    start = time.perf_counter()
    logits = predict(method, features)
    wall = time.perf_counter() - start
    peak = peak_rss_mb()
    assert logits.shape == (n, size.memory_classes)
    return [
        Row("memory", f"zero-shot CALIP over a dense cache of {n} images ({needed / 1e9:.1f} GB fp16 on disk), "
            f"{size.memory_classes} classes, {device.type}", "peak RSS while evaluating (MB)", peak,
            target="< 2 GB", reference=f"{before:.0f} MB before (imports, setup)",
            note=f"{n / wall:.0f} images/s{note}"),
        dense_training_row(size, device, workdir),
    ]


def write_repeated(path: Path, block: np.ndarray, n: int) -> None:
    """An .npy file of `n` rows, `block`'s rows over and over: gigabytes of random numbers would take minutes to
    draw. Plain file writes (pages written through a memory map would count in this process's peak RSS)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(
            f, {"descr": np.lib.format.dtype_to_descr(block.dtype), "fortran_order": False,
                "shape": (n, *block.shape[1:])})
        for start in range(0, n, len(block)):
            f.write(block[: min(len(block), n - start)].tobytes())


def dense_training_row(size: Size, device, workdir: Path) -> Row:
    """CALIP-FS trained one epoch over a dense train cache several times the allowed peak: the plain and augmented
    entries memory-mapped side by side (features.ViewStack, as run.py builds them), each step reading its rows."""
    import torch
    from omegaconf import OmegaConf

    from clipadapt.engine import fit
    from clipadapt.features import FeatureSet, ViewStack
    from clipadapt.methods import FewShotTask, build_method

    note = reset_peak_rss()  # the evaluation row's peak is not this row's
    n, classes, views = size.dense_train_images, size.memory_classes, 1 + size.views
    rng = np.random.default_rng(1)
    text = unit(rng.standard_normal((classes, size.dim))).astype(np.float32)
    blocks = {name: unit(rng.standard_normal((64, count, size.tokens, size.dim), dtype=np.float32)).astype(np.float16)
              for name, count in (("plain", 1), ("augmented", views - 1))}
    for name, block in blocks.items():
        write_repeated(workdir / f"train-{name}.npy", block, n)
    on_disk = sum((workdir / f"train-{name}.npy").stat().st_size for name in blocks)
    dense = ViewStack([np.load(workdir / f"train-{name}.npy", mmap_mode="r") for name in blocks])
    image = np.broadcast_to(unit(rng.standard_normal((1, views, size.dim))).astype(np.float16), (n, views, size.dim))
    train = FeatureSet(image=image, labels=np.arange(n) % classes, dense=dense)
    task = FewShotTask(classnames=[f"c{k}" for k in range(classes)], templates=[],
                       text=torch.tensor(text, device=device), train=train, val=None, device=device)
    method = build_method(OmegaConf.create({"name": "calip_fs", "train": {"epochs": 1}}), task)
    method.setup()
    before = peak_rss_mb()
    note = reset_peak_rss() or note
    start = time.perf_counter()
    history = fit(method, train, seed=0)
    wall = time.perf_counter() - start
    peak = peak_rss_mb()
    for name in blocks:
        (workdir / f"train-{name}.npy").unlink()
    assert len(history) == 1 and np.isfinite(history[0])
    steps = n // method.cfg.train.batch_size
    return Row("memory", f"CALIP-FS training over a dense train cache of {n} images x {views} views "
               f"({on_disk / 1e9:.1f} GB fp16 on disk), {classes} classes, {device.type}",
               "peak RSS while training (MB)", peak, target="< 2 GB",
               reference=f"{before:.0f} MB before (imports, setup); in memory it took {on_disk / 1e9:.1f} GB",
               note=f"1 epoch, {steps} steps of {method.cfg.train.batch_size} in {wall:.1f} s{note}")


# --------------------------------------------------------------------------------------------------------- cache


def read_through(path: Path, chunk: int = 8 << 20) -> None:
    """Read a file once, as features._content_hash does, without hashing: the floor of verifying it."""
    buffer = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def best_of(repeats: int, job) -> float:
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        job()
        walls.append(time.perf_counter() - start)
    return min(walls)


def bench_cache(size: Size, args, workdir: Path) -> list[Row]:
    from clipadapt import features
    from clipadapt.features import CacheEntry

    row_shape = (1, size.tokens, size.dim)  # one image's dense tokens: the largest shards the cache holds
    n = max(1, size.cache_shard_mb * 2**20 // (2 * int(np.prod(row_shape))))
    block = np.random.default_rng(0).standard_normal((min(n, 256), *row_shape), dtype=np.float32).astype(np.float16)
    array = np.concatenate([block] * math.ceil(n / len(block)))[:n]  # random numbers repeated: quick to make
    paths = [f"{i:06d}.jpg" for i in range(n)]
    entry = CacheEntry(workdir / "entry", {"bench": "cache"})
    entry.get(paths, lambda missing: array)
    del array
    (shard,) = entry.folder.glob("shard-*")
    file = shard / "features.npy"
    megabytes = file.stat().st_size / 1e6

    read_through(file)  # into the page cache
    read_s = best_of(3, lambda: read_through(file))
    hash_s = best_of(3, lambda: features._content_hash(file))

    def first_open():
        features._VERIFIED.clear()  # as in a fresh process
        entry.get(paths, lambda missing: None)

    first_s = best_of(3, first_open)
    later_s = best_of(3, lambda: entry.get(paths, lambda missing: None))
    case = f"a {megabytes:.0f} MB dense shard ({n} images x {size.tokens} x {size.dim} fp16), page cache"
    return [
        Row("cache", f"xxh3-128 of {case}", "MB/s", megabytes / hash_s,
            reference=f"reading the file alone: {megabytes / read_s:.0f} MB/s"),
        Row("cache", f"first open in a process of {case}: whole content verified", "seconds", first_s,
            reference=f"reading the file alone: {read_s:.3f} s",
            note=f"later opens in the same process: {later_s * 1e3:.1f} ms (not hashed again)"),
    ]


# ---------------------------------------------------------------------------------------------------------- main


def run_section(section: str, size: Size, args) -> list[Row]:
    workdir = Path(tempfile.mkdtemp(prefix=f"clipadapt-bench-{section}-", dir=args.workdir))
    try:
        if section == "training":
            return bench_training(size, args)
        return {"overhead": bench_overhead, "grid": bench_grid, "search": bench_search, "extraction": bench_extraction,
                "memory": bench_memory, "cache": bench_cache}[section](size, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_in_child(section: str, argv: list[str]) -> list[Row]:
    """A section in a fresh process: its peak resident memory is then its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        result = subprocess.run([sys.executable, __file__, *argv, "--only", section, "--child", "--json", str(out)],
                                cwd=REPO, text=True, capture_output=True)
        if result.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the {section} section failed:\n{result.stderr[-3000:]}")
        return [Row(**row) for row in json.loads(out.read_text())["rows"]]


def missing_device(device: str) -> str | None:
    """Why `--device` cannot be used here, in one line (None: it can)."""
    if not device.startswith("cuda"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"no CUDA device: torch {torch.__version__} is a CPU build (on a GPU machine: make install TORCH=gpu)"
    return (f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none "
            "(driver? CUDA_VISIBLE_DEVICES?)")


def machine() -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
            "cpu": platform.processor() or platform.machine(), "cuda": None}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[Row]) -> str:
    lines = ["| section | case | figure | value | beside | target | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = "-" if r.value is None else f"{r.value:.3g}" if abs(r.value) < 1000 else f"{r.value:.0f}"
        lines.append(f"| {r.section} | {r.case} | {r.figure} | {value} | {r.reference} | {r.target} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: the benchmark's sizes; gpu: < 8 min on one GPU (make gpu-check); tiny: seconds")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--methods", default=",".join(TRAINED_METHODS), help="the training section's methods")
    parser.add_argument("--threads", type=int, help="torch CPU threads here and in the processes it starts")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--check-device", action="store_true", help="only check that --device is there, then exit")
    parser.add_argument("--budget", type=float, help="seconds per training case (default: the size's)")
    parser.add_argument("--grid-epochs", type=int, help="tip_adapter_f epochs in the grid; 0: the method's own")
    parser.add_argument("--grid-processes", choices=("all", "seed1"), help="cells run one process each")
    parser.add_argument("--memory-images", type=int, help="images in the dense cache of the memory section")
    parser.add_argument("--workdir", help="where temporary data goes (default: the system's temp folder)")
    parser.add_argument("--json", help="also write the rows and the machine's description to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}: use some of {', '.join(SECTIONS)}")
    overrides = {"budget_s": args.budget, "grid_processes": args.grid_processes, "memory_images": args.memory_images}
    size = replace(SIZES[args.size], **{k: v for k, v in overrides.items() if v is not None})
    if args.grid_epochs is not None:
        size = replace(size, grid_epochs=args.grid_epochs or None)
    if missing := missing_device(args.device):
        print(f"bench.py --device {args.device}: {missing}", file=sys.stderr)
        return 2
    if args.check_device:
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the processes started from here
        import torch

        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "src"))

    child_argv = [a for a in argv if a not in ("--child",)]
    for flag in ("--only", "--json"):  # the parent's; the child gets its own
        while flag in child_argv:
            i = child_argv.index(flag)
            del child_argv[i : i + 2]
    rows, failed, start = [], [], time.perf_counter()
    for section in sections:
        started = time.perf_counter()
        try:
            if section in ("extraction", "memory") and not args.child:
                rows += run_in_child(section, child_argv)
            else:
                rows += run_section(section, size, args)
        except Exception as error:  # noqa: BLE001 - one failing section does not hide the others' figures
            failed.append(section)
            rows.append(Row(section, "failed", "", None, note=f"{type(error).__name__}: {str(error).splitlines()[0]}"))
            print(f"{section}: {type(error).__name__}: {error}", file=sys.stderr)
        if not args.child:
            print(f"[{section}: {time.perf_counter() - started:.0f} s]", file=sys.stderr)

    report = {"size": args.size, "machine": machine(), "rows": [asdict(r) for r in rows], "failed": failed}
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.json)
    if not args.child:
        m = report["machine"]
        print(f"{m['cores']} cores ({m['cpu']}), {m['torch_threads']} torch threads, torch {m['torch']}, "
              f"GPU: {m['cuda'] or 'none'}, load average {m['load_average']:.1f}\n")
        print(table(rows))
        print(f"[total: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
