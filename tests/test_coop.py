"""CoOp: prompts through the frozen text tower over cached features, on the tiny random-init CLIP."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipadapt.engine import fit, predict
from clipadapt.methods import FewShotTask, build_method
from clipadapt.methods.base import Batch
from clipadapt.methods.coop import epochs_for_shots
from clipadapt.run import image_task_data, run

CPU = torch.device("cpu")


def make_task(cfg) -> tuple[FewShotTask, object]:
    data = image_task_data(cfg, False, CPU)
    task = FewShotTask(classnames=data.classnames, templates=data.templates, text=torch.tensor(data.text).float(),
                       train=data.train, val=data.val, device=CPU, prompt_encoder=data.prompt_encoder, seed=cfg.seed)
    return task, data


def template_text(task: FewShotTask, template: str) -> torch.Tensor:
    """Zero-shot class features computed in fp32 by CLIP's own encode_text (not the fp16 cache)."""
    tower = task.prompt_encoder()
    ids = tower.tokenize([template.format(name) for name in task.classnames])
    with torch.no_grad():
        return F.normalize(tower.clip.encode_text(ids).float(), dim=-1)


def test_context_fixed_to_a_photo_of_a_equals_zero_shot(tiny_config):
    cfg = tiny_config("method=coop", "shots=2", "method.ctx_init=a photo of a")
    task, data = make_task(cfg)
    coop = build_method(cfg.method, task).eval()
    assert coop.cfg.n_ctx == 4  # "a photo of a" is four tokens
    expected = template_text(task, "a photo of a {}.")
    with torch.no_grad():
        assert torch.allclose(coop.text_features(), expected, atol=1e-5)
    zero_shot = build_method(tiny_config("method=zero_shot").method, replace(task, text=expected))
    assert torch.allclose(predict(coop, data.test), predict(zero_shot, data.test), atol=1e-3)
    assert torch.allclose(expected, task.text, atol=2e-3)  # and the cached (fp16) zero-shot classifier agrees


def test_epochs_follow_the_shots_unless_set(tiny_config):
    cfg = tiny_config("method=coop", "shots=4")
    task, _ = make_task(cfg)
    labels = task.train.labels
    epochs = {}
    for shots in (1, 2, 4):  # the 4-shot draw cut to its first `shots` images per class
        rows = np.concatenate([np.flatnonzero(labels == k)[:shots] for k in np.unique(labels)])
        epochs[shots] = build_method(cfg.method, replace(task, train=task.train.select(rows))).cfg.train.epochs
    assert epochs == {1: 50, 2: 100, 4: 100}
    assert build_method(tiny_config("method=coop", "shots=4", "method.train.epochs=3").method, task).cfg.train.epochs == 3
    assert epochs_for_shots({2: 10, 8: 20}, 5) == 10  # a draw with fewer images than asked: the entry below
    with pytest.raises(ValueError, match="no entry for 1 shots"):
        epochs_for_shots({2: 10}, 1)


def test_gradients_reach_only_the_context(tiny_config):
    cfg = tiny_config("method=coop", "shots=2", "method.n_ctx=3")
    task, data = make_task(cfg)
    coop = build_method(cfg.method, task).train()
    assert [name for name, p in coop.named_parameters() if p.requires_grad] == ["ctx"]
    assert coop.ctx.shape == (3, coop.text_tower.width)
    labels = torch.as_tensor(data.train.labels)
    coop.loss(Batch(image=F.normalize(task.train_tensor(slice(1, 2))[:, 0], dim=-1)), labels).backward()
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in coop.named_parameters() if name != "ctx")


def test_training_moves_the_context_and_retarget_keeps_it(tiny_config):
    cfg = tiny_config("method=coop", "shots=2", "method.train.epochs=2", "method.train.lr=0.5")
    task, data = make_task(cfg)
    coop = build_method(cfg.method, task)
    start = coop.ctx.detach().clone()
    history = fit(coop, data.train, seed=1)
    assert len(history) == 2 and not torch.equal(coop.ctx, start)
    with torch.no_grad():
        trained = coop.text_features()
        names = task.classnames[::-1]  # another class set: the same names reversed
        coop.retarget(names, task.text.flip(0))
        assert torch.allclose(coop.text_features(), trained.flip(0), atol=1e-5)
    assert predict(coop, data.test).shape == (len(data.test), len(names))


def test_features_file_has_no_text_tower(tiny_config):
    cfg = tiny_config("method=coop", "shots=1")
    task, _ = make_task(cfg)
    with pytest.raises(ValueError, match="features file"):
        build_method(cfg.method, replace(task, prompt_encoder=None))


def test_run_records_the_resolved_schedule(tiny_config, tmp_path):
    metrics = run(tiny_config("method=coop", "shots=1", "method.epochs_by_shots={1: 2}"), tmp_path)
    assert metrics["config"]["method"]["train"]["epochs"] is None  # as composed: resolved when the method is built
    assert metrics["method_config"]["train"]["epochs"] == 2 and metrics["method_config"]["train"]["optimizer"] == "sgd"
    assert len(metrics["train/loss_history"]) == 2
    assert metrics["protocol"]["method_fidelity"] == "as published"
    assert 0 <= metrics["test/acc"] <= 100
