"""The training loop's recipe: the learning rate at every step, the batches of an epoch, and a loss gone NaN.

Reference lines are written out again here (Dassl.pytorch's scheduler and trainer, Tip-Adapter's main.py), never
taken from clipadapt, and compared with the rate each optimizer step of a real `engine.fit` used.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler
from torch.optim.optimizer import register_optimizer_step_pre_hook

from clipadapt.batched import FitRequest, fit_cells
from clipadapt.config import ConfigError, check_options
from clipadapt.engine import fit
from clipadapt.methods import FewShotTask, build_method
from clipadapt.methods.base import method_config
from clipadapt.run import image_task_data
from conftest import random_task

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- the references, again


class DasslConstantWarmup(LRScheduler):
    """Dassl.pytorch dassl/optim/lr_scheduler.py: ConstantWarmupScheduler (and _BaseWarmupScheduler.step)."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


def dassl_epoch_lrs(lr: float, max_epoch: int, warmup_epoch: int = 1, cons_lr: float = 1e-5) -> list[float]:
    """build_lr_scheduler(cosine, WARMUP_TYPE constant, WARMUP_RECOUNT True); the trainer calls update_lr() after the
    last batch of each epoch (`if (self.batch_idx + 1) == self.num_batches`)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = DasslConstantWarmup(optimizer, CosineAnnealingLR(optimizer, float(max_epoch)), warmup_epoch, cons_lr)
    lrs = []
    for _ in range(max_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # the epoch's batches
        scheduler.step()
    return lrs


def dassl_batches(rows: int, batch_size: int) -> int:
    """len(DataLoader(..., drop_last=is_train and len(data_source) >= batch_size)) for a train loader."""
    return rows // batch_size if rows >= batch_size else math.ceil(rows / batch_size)


# ---------------------------------------------------------------------------------------------------- helpers


@contextmanager
def step_rates():
    """The learning rate of the first parameter group at every optimizer step taken inside the block."""
    rates: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: rates.append(
        optimizer.param_groups[0]["lr"]))
    try:
        yield rates
    finally:
        handle.remove()


def build(name: str, task: FewShotTask, **train):
    return build_method(method_config(OmegaConf.create({"name": name, "train": train})), task)


def per_step(epoch_lrs: list[float], steps: int) -> list[float]:
    return [lr for lr in epoch_lrs for _ in range(steps)]


# ----------------------------------------------------------------------------------------------- Dassl methods


def test_clip_adapter_steps_the_rate_as_dassl_does():
    task, _ = random_task(num_classes=5, shots=4)  # 20 train rows: 2 full batches of 8, the last 4 rows dropped
    method = build("clip_adapter", task, epochs=6, batch_size=8)
    with step_rates() as rates:
        history = fit(method, task.train, seed=1)
    assert len(history) == 6
    expected = per_step(dassl_epoch_lrs(2e-3, 6), dassl_batches(20, 8))
    assert rates == pytest.approx(expected, rel=1e-12, abs=0)
    assert rates[0] == pytest.approx(1e-5) and rates[2] == 2e-3  # the constant warm-up epoch, then the full rate


def test_coop_steps_the_rate_as_dassl_does(tiny_config):
    cfg = tiny_config("method=coop", "shots=2", "method.train.epochs=4", "method.train.batch_size=8")
    data = image_task_data(cfg, False, torch.device("cpu"))
    task = FewShotTask(classnames=data.classnames, templates=data.templates, text=torch.tensor(data.text).float(),
                       train=data.train, val=data.val, device=torch.device("cpu"), prompt_encoder=data.prompt_encoder)
    method = build_method(cfg.method, task)
    rows = len(data.train)
    with step_rates() as rates:
        fit(method, data.train, seed=1)
    assert rows % 8  # a partial last batch exists, and Dassl drops it
    assert rates == pytest.approx(per_step(dassl_epoch_lrs(2e-3, 4), dassl_batches(rows, 8)), rel=1e-12, abs=0)


@pytest.mark.parametrize("shots,drop_last,batches", [(4, True, [8, 8]), (4, False, [8, 8, 4]), (1, True, [5])])
def test_drop_last_follows_dassls_rule(shots, drop_last, batches):
    """20 rows in batches of 8: 2 full ones with drop_last, 3 without; 5 rows (< a batch) still make one step."""
    task, _ = random_task(num_classes=5, shots=shots)
    method = build("clip_adapter", task, epochs=2, batch_size=8, drop_last=drop_last)
    seen = []  # (rows, loss) of every step
    loss = method.loss

    def counted(batch, labels):
        value = loss(batch, labels)
        seen.append((len(labels), float(value.detach())))
        return value

    method.loss = counted
    history = fit(method, task.train, seed=1)
    assert [rows for rows, _ in seen] == batches * 2
    if drop_last:
        assert len(batches) == dassl_batches(5 * shots, 8)
    steps = len(batches)
    for epoch, mean in enumerate(history):  # the epoch's loss is the mean over the rows it trained on
        epoch_steps = seen[epoch * steps : (epoch + 1) * steps]
        assert mean == pytest.approx(sum(r * v for r, v in epoch_steps) / sum(r for r, _ in epoch_steps), rel=1e-6)


def test_calip_fs_trains_on_the_dassl_recipe():
    train = method_config(OmegaConf.create({"name": "calip_fs"})).train
    assert (train.schedule_unit, train.warmup_type, train.drop_last, train.weight_decay) == ("epoch", "constant",
                                                                                            True, 5e-4)


# ------------------------------------------------------------------------------------------ per-step schedules


def test_tip_adapter_f_keeps_its_per_iteration_cosine():
    """Tip-Adapter main.py: CosineAnnealingLR(optimizer, train_epoch * len(train_loader_F)), stepped every
    iteration; its loader keeps the last partial batch."""
    task, _ = random_task(num_classes=5, shots=4)
    method = build("tip_adapter_f", task, epochs=4, batch_size=8)
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3, eps=1e-4)
    iterations = math.ceil(20 / 8)
    scheduler = CosineAnnealingLR(optimizer, 4 * iterations)
    expected = []
    for _ in range(4 * iterations):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    with step_rates() as rates:
        fit(method, task.train, seed=1)
    assert rates == expected


def test_vt_clip_warms_up_linearly_then_decays_to_zero():
    task, _ = random_task(num_classes=5, shots=4, tokens=3)
    method = build("vt_clip", task, epochs=3, batch_size=8)  # 3 steps an epoch: 3 warm-up steps, then 6 of cosine
    with step_rates() as rates:
        fit(method, task.train, seed=1)
    lr, start, warmup = 1e-4, 1e-5, 3
    expected = [start + (lr - start) * t / warmup for t in range(warmup)]
    expected += [lr * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)]
    assert rates == pytest.approx(expected, rel=1e-9, abs=0)


@pytest.mark.parametrize("method", ["coop", "clip_adapter"])
def test_an_unknown_schedule_unit_or_warmup_fails_at_start_in_one_line(tiny_config, method):
    cfg = tiny_config(f"method={method}", "method.train.schedule_unit=iteration", "method.train.warmup_type=cos")
    with pytest.raises(ConfigError, match=r"^method.train.schedule_unit=iteration: use one of step, epoch; "
                                          r"method.train.warmup_type=cos: use one of constant, linear$"):
        check_options(cfg)


# -------------------------------------------------------------------------------------------- NaN and Inf losses


def test_a_nan_loss_fails_the_cell_naming_method_and_epoch():
    task, _ = random_task()
    logged = []
    method = build("clip_adapter", task, epochs=3, lr=1e30, batch_size=8, warmup_epochs=0)
    with pytest.raises(FloatingPointError, match=r"^clip_adapter: the training loss became nan in epoch (\d) of 3 ") \
            as error:
        fit(method, task.train, seed=1, on_step=logged.append)
    assert int(error.value.args[0].split("epoch ")[1].split()[0]) == len(logged) + 1  # the first non-finite epoch


def test_in_a_batch_only_the_failing_cell_stops():
    task, _ = random_task()
    good, bad = (build("clip_adapter", task, epochs=3, lr=lr, batch_size=8, warmup_epochs=0) for lr in (1e-3, 1e30))
    results = fit_cells([FitRequest(good, task.train, 1), FitRequest(bad, task.train, 1)], stack=True)
    assert len(results[0]) == 3 and all(math.isfinite(value) for value in results[0])
    assert isinstance(results[1], FloatingPointError) and "clip_adapter: the training loss became nan" in str(results[1])


def test_a_nan_loss_through_the_entrypoint_writes_error_json_and_no_metrics(tmp_path):
    env = {**os.environ, "CLIPADAPT_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "clipadapt.train", "backbone=tiny", "dataset=synthetic", "logger=none",
         "method=clip_adapter", "shots=2", "features.train_views=1", "features.num_workers=0",
         "method.train.epochs=3", "method.train.batch_size=8", "method.train.lr=1e30", f"hydra.run.dir={tmp_path}/out"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    error = json.loads((tmp_path / "out" / "error.json").read_text())["error"]
    assert error.startswith("FloatingPointError: clip_adapter: the training loss became nan in epoch")
    assert [line for line in result.stderr.splitlines() if "ERROR" in line] == [
        line for line in result.stderr.splitlines() if "the training loss became nan" in line]
    assert not (tmp_path / "out" / "metrics.json").exists()
