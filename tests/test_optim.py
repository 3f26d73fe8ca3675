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


def transposed_slice(values: torch.Tensor) -> torch.Tensor:
    """values[1] as a slice of a [2, R, C] leaf laid out as a vmapped linear layer's weight gradient arrives
    (clipadapt.batched): a non-contiguous view whose transpose is contiguous."""
    return values.transpose(1, 2).contiguous().transpose(1, 2)[1]


def steps_of(optimizer_class, weight: torch.Tensor, grads: list[torch.Tensor], relayout_at: int | None = None,
             **options) -> tuple[torch.Tensor, list[str]]:
    """The weight after one step per gradient, each gradient in the parameter's layout of that step, and the ops
    the steps ran."""
    param = torch.nn.Parameter(torch.empty(0))
    param.data = weight
    optimizer = optimizer_class([param], **options)
    ops = []
    for step, grad in enumerate(grads):
        if step == relayout_at:  # laid out anew after the state was made (a stacked leaf is not: see batched.py)
            param.data = transposed_slice(torch.stack([param.detach()] * 2))
        param.grad = torch.empty_strided(grad.shape, param.stride()).copy_(grad)
        with torch.profiler.profile() as trace:
            optimizer.step()
        ops += sorted(event.name for event in trace.events() if event.name.startswith("aten::"))
    return param.detach(), ops


@pytest.mark.parametrize("ours, theirs, options", [
    (FusedAdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.01}),
    (FusedSGD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9}),
])
def test_transposed_parameters_get_the_contiguous_update_without_copies(ours, theirs, options):
    torch.manual_seed(0)
    values, grads = torch.randn(2, 16, 8), [torch.randn(16, 8) for _ in range(3)]
    reference, _ = steps_of(theirs, values[1].clone(), grads, fused=True, **options)
    on_contiguous, contiguous_ops = steps_of(ours, values[1].clone(), grads, **options)
    on_transposed, transposed_ops = steps_of(ours, transposed_slice(values), grads, **options)
    assert not on_transposed.is_contiguous()
    assert torch.equal(on_transposed, reference) and torch.equal(on_contiguous, reference)
    assert transposed_ops == contiguous_ops  # the same kernels, no copy (torch.optim's copies them in and out)


def test_sgd_momentum_survives_a_parameter_laid_out_anew():
    """torch's fused kernel drops the update of a momentum buffer laid out otherwise than its parameter."""
    torch.manual_seed(0)
    weight, grads = torch.randn(16, 8), [torch.randn(16, 8) for _ in range(4)]
    options = {"lr": 0.1, "momentum": 0.9}
    reference, _ = steps_of(torch.optim.SGD, weight.clone(), grads, fused=True, **options)
    assert torch.equal(steps_of(FusedSGD, weight.clone(), grads, relayout_at=2, **options)[0], reference)
