"""Exact properties of the reference baselines on random features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clipadapt.engine import fit, predict
from clipadapt.features import to_tensor
from clipadapt.methods import build_method
from conftest import random_task


def build(name: str, task, **options):
    return build_method(OmegaConf.create({"name": name, **options}), task)


def test_tip_adapter_with_alpha_zero_is_zero_shot():
    task, test = random_task()
    tip = build("tip_adapter", task, alpha=0.0, search={"enabled": False})
    zero_shot = build("zero_shot", task)
    assert torch.equal(predict(tip, test), predict(zero_shot, test))


def test_tip_adapter_cache_is_the_view_averaged_train_features():
    task, _ = random_task(views=3)
    norms = np.random.default_rng(0).uniform(0.5, 4, task.train.image.shape[:2] + (1,)).astype(np.float16)
    task.train.image = task.train.image * norms  # raw features, norms unequal: the keys average them, then normalise
    tip = build("tip_adapter", task)
    augmented = to_tensor(task.train.image[:, 1:])
    torch.testing.assert_close(tip.keys.data, F.normalize(augmented.mean(1), dim=-1))
    assert torch.equal(tip.values.argmax(1), torch.as_tensor(task.train.labels))
    assert not tip.keys.requires_grad and build("tip_adapter_f", task).keys.requires_grad


def test_tip_adapter_search_picks_the_best_pair_on_val_only():
    task, test = random_task(num_classes=6, shots=8)
    tip = build("tip_adapter", task, search={"beta_steps": 7, "alpha_steps": 5})
    chosen = tip.tune(task.val)
    image = to_tensor(task.val.image[:, 0])
    labels = torch.as_tensor(task.val.labels)

    def val_accuracy(alpha, beta):  # in percent, as test/acc
        logits = tip.zero_shot_logits(image) + alpha * tip.cache_logits(image, beta)
        return 100 * float((logits.argmax(1) == labels).float().mean())

    grid = [(i * 2.9 / 5 + 0.1, j * 6.9 / 7 + 0.1) for j in range(7) for i in range(5)]  # the official grid
    assert chosen["val_acc"] == pytest.approx(max(val_accuracy(a, b) for a, b in grid))
    assert chosen["val_acc"] == pytest.approx(val_accuracy(chosen["alpha"], chosen["beta"]))
    assert (tip.alpha, tip.beta) == (chosen["alpha"], chosen["beta"])


def test_clip_adapter_with_ratio_zero_is_zero_shot():
    task, test = random_task()
    torch.testing.assert_close(predict(build("clip_adapter", task, ratio=0.0), test),
                               predict(build("zero_shot", task), test))


def test_linear_probe_chooses_c_on_val():
    task, test = random_task(num_classes=4, shots=8)
    probe = build("linear_probe", task, c_grid=[1e-4, 1.0, 1e4], c_refine_steps=0)
    probe.setup()
    chosen = probe.tune(task.val)
    assert chosen["c"] in (1e-4, 1.0, 1e4)
    x_val = np.asarray(task.val.image[:, 0], np.float32)
    expected = probe._fit(chosen["c"]).predict(x_val)
    assert np.array_equal(predict(probe, task.val).argmax(1).numpy(), expected)


def test_training_lowers_the_loss_and_is_deterministic():
    task, test = random_task(num_classes=8, shots=8)

    def trained():
        torch.manual_seed(0)
        method = build("clip_adapter", task, ratio=0.5, train={"epochs": 10, "batch_size": 16, "optimizer": "adamw", "lr": 1e-2})
        return fit(method, task.train, seed=3), predict(method, test)

    (history, logits), (history_again, logits_again) = trained(), trained()
    assert history[-1] < history[0]
    assert history == history_again and torch.equal(logits, logits_again)
