"""clipadapt.optim: the fused AdamW/SGD updates of torch.optim, bit for bit, without importing torch._dynamo."""

import subprocess
import sys

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from clipadapt.optim import FusedAdamW, FusedSGD


def train(optimizer_class, steps: int = 12, **options) -> tuple[list[float], list[torch.Tensor]]:
    """A small two-group model trained with a cosine schedule: the loss history and the trained weights."""
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8))
    frozen_grad = torch.nn.Parameter(torch.randn(3))  # no gradient: skipped by the update, as torch.optim does
    groups = [{"params": [weight, frozen_grad]}, {"params": [bias], "lr": 0.05, "weight_decay": 0.0}]
    optimizer = optimizer_class(groups, **options)
    schedule = CosineAnnealingLR(optimizer, T_max=steps)
    inputs, targets = torch.randn(32, 16), torch.randint(0, 8, (32,))
    history = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(inputs @ weight + bias, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(loss.item())
    return history, [weight.detach().clone(), bias.detach().clone(), frozen_grad.detach().clone()]


@pytest.mark.parametrize("ours, theirs, options", [
    (FusedAdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.01, "eps": 1e-4}),
    (FusedSGD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9}),
    (FusedSGD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.0}),
])
def test_bit_identical_to_torch_fused(ours, theirs, options):
    history, weights = train(ours, **options)
    reference_history, reference_weights = train(theirs, fused=True, **options)
    assert history == reference_history
    for mine, reference in zip(weights, reference_weights):
        assert torch.equal(mine, reference)
    assert history[-1] < history[0]  # it trained


def test_training_does_not_import_dynamo():
    """The start cost this module exists for: an engine optimizer and schedule step without torch._dynamo."""
    script = """
import sys, torch
from omegaconf import OmegaConf
from clipadapt.engine import make_optimizer, make_schedule
p = torch.nn.Parameter(torch.randn(5, 3))
for name in ("adamw", "sgd"):
    train = OmegaConf.create(dict(optimizer=name, lr=0.1, weight_decay=0.01, eps=1e-8, momentum=0.9, epochs=2,
                                  warmup_epochs=1, warmup_lr=1e-5, warmup_type="linear", schedule="cosine",
                                  schedule_unit="step"))
    optimizer = make_optimizer([{"params": [p]}], train)
    schedule = make_schedule(optimizer, train, steps_per_epoch=2)
    p.sum().backward()
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
print(type(optimizer).__name__, "torch._dynamo" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FusedSGD", "False"]


def test_a_torch_release_without_the_private_helpers_gets_torch_optim(monkeypatch):
    from omegaconf import OmegaConf

    from clipadapt import engine, optim
    from clipadapt.method_schemas import TrainSchema

    params = [{"params": [torch.nn.Parameter(torch.randn(4))]}]
    train = OmegaConf.structured(TrainSchema(optimizer="adamw"))
    assert type(engine.make_optimizer(params, train)) is FusedAdamW
    monkeypatch.setattr(optim, "SUPPORTED", False)
    fallback = engine.make_optimizer(params, train)
    assert type(fallback) is torch.optim.AdamW and fallback.defaults["fused"]  # the same fused kernel, via torch.optim
