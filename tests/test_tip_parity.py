"""Tip-Adapter against the official code (gaopengcuhk/Tip-Adapter utils.py), whose lines are written out again here:
build_cache_model's keys, the cache logits, and search_hp's grid, loop order, initial values and strict `>`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clipadapt.features import FeatureSet
from clipadapt.methods import FewShotTask, build_method
from clipadapt.methods.tip_adapter import grid_correct


# ------------------------------------------------------------------ the official lines, ported
def official_cls_acc(output, target, topk=1):
    pred = output.topk(topk, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    acc = float(correct[:topk].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0])  # [0]: NumPy 2
    return 100 * acc / target.shape[0]


def official_search_hp(search_scale, search_step, cache_keys, cache_values, features, labels, clip_weights):
    beta_list = [i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i in range(search_step[0])]
    alpha_list = [i * (search_scale[1] - 0.1) / search_step[1] + 0.1 for i in range(search_step[1])]
    best_acc = 0
    best_beta, best_alpha = 0, 0
    affinity = features @ cache_keys  # hoisted out of the loop: it does not depend on beta or alpha
    clip_logits = 100. * features @ clip_weights
    for beta in beta_list:
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values  # hoisted out of the alpha loop
        for alpha in alpha_list:
            tip_logits = clip_logits + cache_logits * alpha
            acc = official_cls_acc(tip_logits, labels)
            if acc > best_acc:
                best_acc = acc
                best_beta = beta
                best_alpha = alpha
    return best_beta, best_alpha, best_acc


def official_cache_keys(view_features: list[torch.Tensor]) -> torch.Tensor:
    """build_cache_model: one [N, D] tensor of raw features per augment epoch."""
    cache_keys = [features.unsqueeze(0) for features in view_features]
    cache_keys = torch.cat(cache_keys, dim=0).mean(dim=0)
    cache_keys /= cache_keys.norm(dim=-1, keepdim=True)
    return cache_keys.permute(1, 0)


# ------------------------------------------------------------------ random CLIP-like tasks
def raw_task(num_classes=6, shots=4, val_per_class=2, dim=24, views=3, seed=0, spread=0.9, missing_class=None):
    """Features around each class's text with unequal raw norms; `missing_class` has no train image."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)

    def features(per_class, n_views, classes):
        labels = torch.tensor(classes).repeat_interleave(per_class)
        image = text[labels][:, None] + spread * torch.randn(len(labels), n_views, dim, generator=g)
        norms = 0.5 + 4 * torch.rand(len(labels), n_views, 1, generator=g)
        return FeatureSet(image=(F.normalize(image, dim=-1) * norms).numpy().astype(np.float16), labels=labels.numpy())

    train_classes = [k for k in range(num_classes) if k != missing_class]
    return FewShotTask(classnames=[f"c{k}" for k in range(num_classes)], templates=["{}"], text=text,
                       train=features(shots, 1 + views, train_classes),
                       val=features(val_per_class, 1, list(range(num_classes))), device=torch.device("cpu"))


def build(name, task, **options):
    return build_method(OmegaConf.create({"name": name, **options}), task)


def val_tensors(task):
    image = F.normalize(torch.tensor(task.val.image[:, 0], dtype=torch.float32), dim=-1)
    return image, torch.as_tensor(task.val.labels)


# ------------------------------------------------------------------ tests
def test_cache_keys_are_build_cache_models():
    task = raw_task(views=4)
    tip = build("tip_adapter", task)
    views = torch.tensor(task.train.image[:, 1:], dtype=torch.float32)
    expected = official_cache_keys([views[:, v] for v in range(views.shape[1])])
    torch.testing.assert_close(tip.keys.data.t(), expected, rtol=1e-6, atol=1e-6)
    # unequal norms: averaging unit views instead would give other keys
    unit_mean = F.normalize(F.normalize(views, dim=-1).mean(1), dim=-1)
    assert (unit_mean - tip.keys.data).abs().max() > 1e-3
    cache_values = F.one_hot(torch.as_tensor(task.train.labels)).half()
    assert torch.equal(tip.values, cache_values.float())


def test_cache_logits_are_the_official_arithmetic():
    task = raw_task()
    tip = build("tip_adapter", task)
    image, _ = val_tensors(task)
    beta = 5.53
    affinity = image @ tip.keys.data.t().contiguous()
    expected = ((-1) * (beta - beta * affinity)).exp() @ tip.values
    assert torch.equal(tip.cache_logits(image, beta), expected)


STEPS = (50, 10)  # search_step, smaller than the official [200, 20] to keep the ported loop fast


def search_options(scale):
    return {"beta_max": scale[0], "alpha_max": scale[1], "beta_steps": STEPS[0], "alpha_steps": STEPS[1]}


@pytest.mark.parametrize("seed, scale", [(0, (7, 3)), (1, (12, 10)), (2, (50, 50)), (3, (13, 13))])
def test_search_chooses_as_search_hp(seed, scale):
    """Few val images, so that many (beta, alpha) pairs tie on accuracy: the tie rule decides."""
    task = raw_task(seed=seed)
    tip = build("tip_adapter", task, search=search_options(scale))
    image, labels = val_tensors(task)
    beta, alpha, acc = official_search_hp(scale, STEPS, tip.keys.data.t(), tip.values, image, labels, tip.text.t())
    chosen = tip.tune(task.val)
    assert (chosen["beta"], chosen["alpha"], chosen["val_acc"]) == (beta, alpha, acc)
    assert (tip.beta, tip.alpha) == (beta, alpha)
    ties = grid_correct(image, tip.keys.data, tip.values, tip.text, labels,
                        [i * (scale[0] - 0.1) / STEPS[0] + 0.1 for i in range(STEPS[0])],
                        [i * (scale[1] - 0.1) / STEPS[1] + 0.1 for i in range(STEPS[1])])
    assert int((ties == ties.max()).sum()) > 1  # the premise: the best accuracy is reached by several pairs


def test_learned_keys_search_as_search_hp():
    """Tip-Adapter-F: keys moved by training (no longer unit rows) go through the same search."""
    task = raw_task(seed=4, num_classes=5)
    tip = build("tip_adapter_f", task, search=search_options((12, 10)))
    with torch.no_grad():
        tip.keys.mul_(1 + 0.3 * torch.rand(tip.keys.shape, generator=torch.Generator().manual_seed(0)))
    image, labels = val_tensors(task)
    beta, alpha, acc = official_search_hp((12, 10), STEPS, tip.keys.data.t(), tip.values, image, labels, tip.text.t())
    assert {k: tip.tune(task.val)[k] for k in ("beta", "alpha", "val_acc")} == {"beta": beta, "alpha": alpha,
                                                                              "val_acc": acc}


def test_grid_counts_equal_the_full_computation_everywhere():
    """Every cell of the grid, not only the best: pruned classes, unequal shots, a class without keys, chunks."""
    task = raw_task(num_classes=40, shots=6, val_per_class=3, dim=32, seed=5, spread=0.7, missing_class=7)
    keep = np.ones(len(task.train), dtype=bool)
    keep[[0, 1, 9, 20]] = False  # classes 0, 1 and 3 lose some of their shots
    task.train = task.train.select(np.flatnonzero(keep))
    tip = build("tip_adapter", task)
    image, labels = val_tensors(task)
    betas = [i * (50 - 0.1) / 30 + 0.1 for i in range(30)]
    alphas = [i * (50 - 0.1) / 12 + 0.1 for i in range(12)]
    affinity = image @ tip.keys.data.t()
    clip_logits = 100. * image @ tip.text.t()
    expected = torch.zeros(len(betas), len(alphas), dtype=torch.long)
    for b, beta in enumerate(betas):
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ tip.values
        for a, alpha in enumerate(alphas):
            expected[b, a] = int(((clip_logits + cache_logits * alpha).argmax(1) == labels).sum())
    counts = grid_correct(image, tip.keys.data, tip.values, tip.text, labels, betas, alphas, chunk=17)
    assert torch.equal(counts, expected)
    assert len(set(expected.flatten().tolist())) > 5  # the grid's cells differ: the comparison has teeth


def test_no_correct_pair_leaves_alpha_and_beta_zero_as_search_hp():
    task = raw_task(missing_class=5)
    task.val = task.val.select(np.flatnonzero(task.val.labels == 5)[:1])  # one image of the class the cache lacks
    task.text = task.text.clone()
    task.text[5] = -F.normalize(torch.tensor(task.val.image[0, 0], dtype=torch.float32), dim=0)  # its worst class
    tip = build("tip_adapter", task, search=search_options((7, 3)))
    image, labels = val_tensors(task)
    assert official_search_hp((7, 3), STEPS, tip.keys.data.t(), tip.values, image, labels, tip.text.t()) == (0, 0, 0)
    chosen = tip.tune(task.val)
    assert (chosen["beta"], chosen["alpha"], chosen["val_acc"]) == (0.0, 0.0, 0.0) and "no pair" in chosen["search"]


def test_chosen_says_when_and_why_the_search_did_not_run():
    task = raw_task()
    tip = build("tip_adapter", task, alpha=1.17, beta=1.0)
    assert tip.tune(None) == {"alpha": 1.17, "beta": 1.0, "search": "not run: no val draw"}
    off = build("tip_adapter", task, alpha=2.0, search={"enabled": False})
    assert off.tune(task.val) == {"alpha": 2.0, "beta": 1.0, "search": "not run: method.search.enabled=false"}
    ran = tip.tune(task.val)
    assert ran["search"].startswith("ran on 12 images") and 0 <= ran["val_acc"] <= 100  # percent, as test/acc
    assert ran["val_acc"] * 12 / 100 == pytest.approx(round(ran["val_acc"] * 12 / 100))
