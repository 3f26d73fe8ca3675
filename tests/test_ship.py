"""SHIP: the generator, the synthetic stream, stage 2 with each host, and the base-to-new / cross-dataset evaluation."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipadapt import protocols
from clipadapt.backbone import ClipBackbone, open_clip
from clipadapt.engine import fit, predict
from clipadapt.features import FeatureSet
from clipadapt.methods import FewShotTask, build_method
from clipadapt.methods.base import Batch
from clipadapt.run import image_task_data, run
from conftest import TINY, compose_config

CPU = torch.device("cpu")
# A small generator and short schedules: the tests check behaviour, not accuracy.
FAST = ["method.generator.enc_hidden=32", "method.generator.mlp_hidden=32", "method.generator.train.epochs=2",
        "method.train.epochs=2"]
HOSTS = ["coop", "clip_adapter", "tip_adapter_f"]


@pytest.fixture(scope="module")
def b2n(session_root) -> tuple[FewShotTask, protocols.Plan]:
    """The task the runner builds for protocol.task=base_to_new (10 synthetic classes: 5 base, 5 label-only new)."""
    cfg = compose_config([*TINY, "method=ship", "protocol.task=base_to_new", "shots=2"], session_root)
    plan = protocols.setup(cfg, image_task_data(cfg, False, CPU))
    trained = plan.data
    task = FewShotTask(classnames=trained.classnames, templates=trained.templates, text=torch.tensor(trained.text).float(),
                       train=trained.train, val=trained.val, device=CPU, prompt_encoder=trained.prompt_encoder,
                       seed=cfg.seed, new_classnames=plan.new_classnames, new_text=torch.tensor(plan.new_text).float())
    return task, plan


def ship_config(tiny_config, *overrides):
    return tiny_config("method=ship", "protocol.task=base_to_new", "shots=2", *FAST, *overrides).method


def test_decoder_output_is_a_unit_image_feature(tiny_config, tmp_path):
    # A CLIP whose text width (48) differs from its joint embedding (32), as RN50's (512 vs 1024) does.
    (tmp_path / "ship-narrow.json").write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(tmp_path / "ship-narrow.json")
    backbone = ClipBackbone("ship-narrow")
    images = F.normalize(torch.randn(6, 2, 32), dim=-1).numpy()
    task = FewShotTask(classnames=["cat", "dog"], templates=[], text=F.normalize(torch.randn(2, 32), dim=-1),
                       train=FeatureSet(images, np.array([0, 0, 0, 1, 1, 1])), val=None, device=CPU,
                       prompt_encoder=backbone.prompt_encoder, new_classnames=["red fox", "owl"],
                       new_text=F.normalize(torch.randn(2, 32), dim=-1))
    ship = build_method(tiny_config("method=ship", *FAST).method, task)
    generator = ship.generator
    assert generator.latent_dim == 48 and generator.ctx.shape == (4, 48)  # latent and prompt in the text width
    z, labels = torch.randn(5, 48), torch.tensor([0, 1, 2, 3, 3])
    with torch.no_grad():
        decoded = generator.decode(z, labels)
    assert decoded.shape == (5, 32)
    assert torch.allclose(decoded.norm(dim=-1), torch.ones(5), atol=1e-5)
    synthesized = generator.synthesize(labels, torch.Generator().manual_seed(0))
    assert synthesized.shape == (5, 32) and torch.allclose(synthesized.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_stage1_loss_decreases(tiny_config, b2n):
    task, _ = b2n
    method_cfg = ship_config(tiny_config, "method.generator.train.epochs=12")
    torch.manual_seed(0)
    ship = build_method(method_cfg, task)
    ship.train_generator()
    history = ship.stage1_history  # one step per epoch: 10 base images, batch 256
    assert len(history) == 12
    assert np.mean(history[-3:]) < 0.75 * np.mean(history[:3]), history


def test_gradients_reach_only_the_learnable_parts(tiny_config, b2n):
    task, _ = b2n
    method_cfg = ship_config(tiny_config)
    ship = build_method(method_cfg, task)
    generator, tower = ship.generator, ship.generator.text_tower
    tower_ids = {id(p) for p in tower.parameters()}
    batch = Batch(image=F.normalize(task.train_tensor(slice(1, 2))[:, 0], dim=-1))
    labels = torch.as_tensor(task.train.labels)

    generator.loss(batch, labels).backward()  # stage 1: encoder, bias MLP and global context
    for name, p in generator.named_parameters():
        if id(p) in tower_ids:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    ship.setup()  # stage 1 (then frozen); stage 2: only the host's context
    ship.zero_grad(set_to_none=True)
    ship.loss(batch, labels).backward()
    with_grad = [name for name, p in ship.named_parameters() if p.grad is not None]
    assert with_grad == ["host.ctx"] and [name for name, p in ship.named_parameters() if p.requires_grad] == ["host.ctx"]


@pytest.mark.parametrize("host", HOSTS)
def test_without_synthesized_features_stage2_is_the_plain_method(tiny_config, host, b2n):
    task, plan = b2n
    method_cfg = ship_config(tiny_config, f"method.stage2={host}", "method.synth.ratio=0", "method.synth.keys_per_class=0")
    torch.manual_seed(0)
    ship = build_method(method_cfg, task)
    ship.setup()
    ship_history = fit(ship, task.train, seed=1)

    torch.manual_seed(0)  # the plain host, in the same (base + new) label space, under the same seed
    plain = build_method(ship.cfg[host], ship.joint_task)
    plain.setup()
    assert fit(plain, task.train, seed=1) == ship_history
    test = plan.data.test
    assert torch.equal(predict(ship.host, test), predict(plain, test))


@pytest.mark.parametrize("host", HOSTS)
def test_stage2_with_synthesized_features_and_base_then_new_columns(tiny_config, host, b2n):
    task, plan = b2n
    method_cfg = ship_config(tiny_config, f"method.stage2={host}")
    torch.manual_seed(0)
    ship = build_method(method_cfg, task)
    ship.setup()
    num_base, num_new = len(task.classnames), len(task.new_classnames)

    features, labels = ship.synthetic_batch(7)
    assert features.shape == (7, task.text.shape[1])
    assert torch.allclose(features.norm(dim=-1), torch.ones(7), atol=1e-5)
    assert ((labels >= num_base) & (labels < num_base + num_new)).all()
    assert not torch.equal(ship.synthetic_batch(7)[0], features)  # re-drawn at every step
    if host == "tip_adapter_f":  # the cache: the real keys, then `shots` synthesized keys per new class
        shots = 2
        assert ship.host.keys.shape[0] == len(task.train) + shots * num_new
        assert torch.equal(ship.host.values[len(task.train):].argmax(1),
                           torch.arange(num_base, num_base + num_new).repeat_interleave(shots))

    start = {name: p.detach().clone() for name, p in ship.host.named_parameters() if p.requires_grad}
    fit(ship, task.train, seed=1)
    assert any(not torch.equal(p, start[name]) for name, p in ship.host.named_parameters() if name in start)

    test = plan.data.test
    joint = predict(ship.host, test)  # all K = base + new columns
    assert torch.equal(predict(ship, test), joint[:, :num_base])  # base test set: base label space
    ship.retarget(task.new_classnames, task.new_text)
    assert torch.equal(predict(ship, test), joint[:, num_base:])  # new test set: new label space


def test_bank_draws_come_from_the_bank(tiny_config, b2n):
    task, _ = b2n
    method_cfg = ship_config(tiny_config, "method.stage2=clip_adapter", "method.synth.bank_per_class=3")
    ship = build_method(method_cfg, task)
    ship.setup()
    assert ship.bank.shape == (len(task.new_classnames), 3, task.text.shape[1])
    features, labels = ship.synthetic_batch(20)
    own_class = ship.bank[labels - len(task.classnames)]  # [20, 3, D]: each draw is one of its class's entries
    assert ((own_class - features[:, None]).abs().amax(-1) == 0).any(1).all()


def test_cross_dataset_refits_the_host_on_synthesized_target_features(tiny_config, caplog, b2n):
    # few_shot: no label-only classes, so stage 2 is plain CoOp; retargeting to other classes trains the
    # generator on the source draw and re-fits CoOp on features synthesized for the targets, each from the source state.
    base_to_new, plan = b2n
    task = replace(base_to_new, new_classnames=[], new_text=None)
    method_cfg = tiny_config("method=ship", "shots=2", *FAST, "method.transfer.per_class=2",
                             "method.transfer.views=2").method
    with caplog.at_level(logging.WARNING, logger="clipadapt.methods.ship"):
        ship = build_method(method_cfg, task)
    assert ship.generator is None and "no label-only classes" in caplog.text
    ship.setup()
    fit(ship, task.train, seed=1)
    source_ctx = ship.host.ctx.detach().clone()

    targets = ["violet hexagon", "green star", "blue moon"]
    ship.retarget(targets, F.normalize(torch.randn(3, task.text.shape[1]), dim=-1))
    assert ship.generator is not None and len(ship.stage1_history) == 2
    assert predict(ship, plan.data.test).shape == (len(plan.data.test), 3)
    first_ctx = ship.host.ctx.detach().clone()
    assert not torch.equal(first_ctx, source_ctx)
    ship.retarget(targets, F.normalize(torch.randn(3, task.text.shape[1]), dim=-1))  # the same target again
    assert torch.equal(ship.host.ctx, first_ctx)  # started from the source state, not from the first target's


def test_tip_adapter_host_cannot_change_class_set(tiny_config, b2n):
    task, _ = b2n
    method_cfg = ship_config(tiny_config, "method.stage2=tip_adapter_f")
    ship = build_method(method_cfg, task)
    with pytest.raises(ValueError, match="stage2=coop"):
        ship.retarget(["a", "b"], torch.zeros(2, task.text.shape[1]))


def test_bad_stage2_fails_clearly(tiny_config, b2n):
    task, _ = b2n
    method_cfg = ship_config(tiny_config, "method.stage2=lora")
    with pytest.raises(ValueError, match="coop"):
        build_method(method_cfg, task)


def test_base_to_new_end_to_end(tiny_config, tmp_path):
    metrics = run(tiny_config("method=ship", "protocol.task=base_to_new", "shots=2", *FAST), tmp_path)
    assert metrics["protocol"]["task"] == "base_to_new" and metrics["protocol"]["new_classes"] == 5
    assert metrics["H"] == pytest.approx(protocols.harmonic_mean(metrics["base/acc"], metrics["new/acc"]))
    assert len(metrics["train/loss_history"]) == 2
    assert metrics["method_config"]["train"]["optimizer"] == "sgd" and metrics["method_config"]["train"]["momentum"] == 0
    assert {"generator/loss_first", "generator/loss_last"} <= set(metrics["chosen"])
    assert metrics["protocol"]["leaky"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast runs on CUDA only")
def test_bf16_text_tower_matches_fp32(tiny_config):
    assert_precisions_agree(tiny_config, torch.device("cuda"))


def assert_precisions_agree(tiny_config, device: torch.device) -> None:
    """Spec §7 Q15: the reconstruction loss with the text tower under bf16 autocast is the fp32 one to ~1e-2."""
    backbone = ClipBackbone("clipadapt-tiny-vit", device=str(device))
    generator_ = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(8, 2, 64, generator=generator_), dim=-1)
    task = FewShotTask(classnames=["cat", "dog"], templates=[], text=F.normalize(torch.randn(2, 64), dim=-1).to(device),
                       train=FeatureSet(images.numpy(), np.array([0, 1] * 4)), val=None, device=device,
                       prompt_encoder=backbone.prompt_encoder, new_classnames=["owl"],
                       new_text=F.normalize(torch.randn(1, 64), dim=-1).to(device))
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        ship = build_method(tiny_config("method=ship", *FAST, f"method.generator.precision={precision}").method, task)
        torch.manual_seed(1)  # the same reparameterisation noise
        with torch.no_grad():
            losses[precision] = float(ship.generator.loss(Batch(image=images[:, 0].to(device)), torch.tensor([0, 1] * 4, device=device)))
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=1e-2)
