"""torch.optim's fused AdamW and SGD without their torch._dynamo entry points.

torch.optim wraps add_param_group, zero_grad and step in dynamo guards whose first call imports torch._dynamo
(~1.2 s, most of a cached cell's start cost). These subclasses keep torch's own classes (state, param groups, LR
schedulers accept them) and call the same fused kernels through torch's own undecorated helpers
(`_fused_adam`, `_fused_sgd`): the same arithmetic on the same tensors, so results are bit-identical
(tests/test_optim.py). They are for eager use only; nothing here is meant to be compiled.

Each parameter reaches the kernel with its state and gradient permuted into the parameter's memory order: the
fused kernels copy a non-contiguous tensor in and out again, and a stacked leaf's slices (clipadapt.batched) are
transposed views; an elementwise update gives the same values in any order, without the copies.
"""

from __future__ import annotations

import inspect

import torch

try:  # private helpers: where a torch release lacks them or calls them otherwise, torch.optim itself is used
    from torch.optim.adam import _fused_adam
    from torch.optim.sgd import _fused_sgd
except ImportError:  # pragma: no cover - depends on the torch release
    _fused_adam = _fused_sgd = None


def _takes(function, names: set[str]) -> bool:
    return function is not None and names <= set(inspect.signature(function).parameters)


# The keywords called below, checked once against this torch release (tested on 2.13).
SUPPORTED = (
    _takes(_fused_adam, {"amsgrad", "has_complex", "beta1", "beta2", "lr", "weight_decay", "eps", "maximize",
                         "capturable", "differentiable", "decoupled_weight_decay"})
    and _takes(_fused_sgd, {"weight_decay", "momentum", "lr", "dampening", "nesterov", "maximize", "has_sparse_grad"})
    and all(hasattr(getattr(torch.optim.Optimizer, name), "__wrapped__") for name in ("add_param_group", "zero_grad"))
)


def _memory_order(tensor: torch.Tensor) -> list[int]:
    """Its dims from outermost to innermost in memory: permuted so, a dense tensor is contiguous."""
    return sorted(range(tensor.dim()), key=lambda dim: -tensor.stride(dim))


def _permuted(tensors: list, orders: list[list[int]]) -> list:
    return [t if t is None else t.permute(order) for t, order in zip(tensors, orders, strict=True)]


class _FusedWithoutDynamo:
    """fused=True, and the undecorated bodies of torch.optim.Optimizer's dynamo-guarded methods (the guard is
    functools.wraps'd). `step` takes no closure: compute the loss and call backward() first."""

    if SUPPORTED:
        add_param_group = torch.optim.Optimizer.add_param_group.__wrapped__
        zero_grad = torch.optim.Optimizer.zero_grad.__wrapped__

    def __init__(self, params, **options):
        super().__init__(params, fused=True, **options)

    def _refuse(self, closure) -> None:
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step takes no closure: compute the loss and call backward() first")


class FusedAdamW(_FusedWithoutDynamo, torch.optim.AdamW):
    """torch.optim.AdamW(..., fused=True); `step` is AdamW.step's fused branch."""

    @torch.no_grad()
    def step(self, closure=None):
        self._refuse(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            beta1, beta2 = group["betas"]
            orders = [_memory_order(p) for p in params]
            params, grads, exp_avgs, exp_avg_sqs = (_permuted(tensors, orders)
                                                    for tensors in (params, grads, exp_avgs, exp_avg_sqs))
            if group["amsgrad"]:
                max_exp_avg_sqs = _permuted(max_exp_avg_sqs, orders)
            _fused_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, None, None,
                        amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                        capturable=False, differentiable=False, decoupled_weight_decay=True)


class FusedSGD(_FusedWithoutDynamo, torch.optim.SGD):
    """torch.optim.SGD(..., fused=True); `step` is SGD.step's fused branch, momentum buffers kept in the state."""

    @torch.no_grad()
    def step(self, closure=None):
        self._refuse(closure)
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            has_sparse_grad = self._init_group(group, params, grads, buffers)
            orders = [_memory_order(p) for p in params]
            if group["momentum"] != 0:  # (the first step's buffers are made in _fused_sgd, like the gradients)
                # contiguous: the kernel loses its update of a buffer it had to copy (one laid out otherwise than
                # its parameter); the buffers are stored back below
                buffers = [b if b is None else b.contiguous() for b in _permuted(buffers, orders)]
            _fused_sgd(_permuted(params, orders), _permuted(grads, orders), buffers, None, None,
                       weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                       dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                       has_sparse_grad=has_sparse_grad)
            if group["momentum"] != 0:
                for p, buffer, order in zip(params, buffers, orders, strict=True):
                    self.state[p]["momentum_buffer"] = buffer.permute(sorted(range(p.dim()), key=order.__getitem__))
