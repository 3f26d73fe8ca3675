"""A trained method's state on disk: `model.safetensors` beside metrics.json, read back by `clipadapt.evaluate`.

The file holds the method's state_dict (learned prompts, adapter weights, cache keys and values, the class text
features) as tensors, and in its metadata the methods' extra state (`Method.tuned`: Tip-Adapter's alpha and beta,
CALIP's betas...) as JSON. CLIP's own frozen text tower, which CoOp, RTOS and SHIP hold as a submodule, is not saved:
rebuilding the method loads it from the backbone. Tensor shapes are the state's: a method rebuilt on an empty train
set (a cache of no keys, no visual concepts) takes the saved shapes before the values are copied in.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipadapt.files import write_atomic

STATE_FILE = "model.safetensors"
FORMAT = "clipadapt-state/1"
EXTRA = "_extra_state"


@dataclass
class TrainedState:
    tensors: dict[str, torch.Tensor]  # CPU copies: later changes to the method (a retarget) do not reach them
    extra: dict[str, dict]  # state_dict key -> that module's get_extra_state()
    method: str


def _frozen_towers(method: nn.Module) -> list[str]:
    """Prefixes of the submodules that are CLIP's frozen text tower (backbone.PromptEncoder)."""
    backbone = sys.modules.get("clipadapt.backbone")  # never imported: no method can hold a tower
    if backbone is None:
        return []
    return [f"{name}." for name, module in method.named_modules(remove_duplicate=False)
            if isinstance(module, backbone.PromptEncoder)]


def snapshot(method: nn.Module) -> TrainedState:
    """The method's state now, without the text tower; copies, so that it can be written after evaluation."""
    towers = _frozen_towers(method)
    tensors, extra = {}, {}
    for key, value in method.state_dict().items():
        if key.startswith(tuple(towers)):
            continue
        if key.endswith(EXTRA):
            extra[key] = value
        else:  # clone: safetensors refuses tensors that share memory (CALIP-FS's shared projection)
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    return TrainedState(tensors, extra, method.cfg.name)


def write(state: TrainedState, path: Path) -> None:
    """Atomically (temp file + rename), like metrics.json."""
    from safetensors.torch import save

    metadata = {"format": FORMAT, "method": state.method, "extra_state": json.dumps(state.extra)}
    content = save(state.tensors, metadata=metadata)  # save_file would make it owner-only (0600)
    write_atomic(path, lambda tmp: tmp.write_bytes(content))


def read(path: Path) -> TrainedState:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a clipadapt trained state ({FORMAT}): it was not written by a run")
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    return TrainedState(tensors, json.loads(metadata["extra_state"]), metadata["method"])


def _take_shape(method: nn.Module, key: str, shape: torch.Size) -> None:
    """Give the parameter or buffer `key` the saved shape (its values are copied in afterwards)."""
    owner_name, _, name = key.rpartition(".")
    owner = method.get_submodule(owner_name)
    current = getattr(owner, name)
    if isinstance(current, nn.Parameter):
        setattr(owner, name, nn.Parameter(current.new_empty(shape), requires_grad=current.requires_grad))
    else:
        setattr(owner, name, current.new_empty(shape))


def restore(method: nn.Module, state: TrainedState) -> None:
    """Load a saved state into a method built from the same config (on any train set, an empty one included)."""
    if state.method != method.cfg.name:
        raise ValueError(f"the saved state is of method {state.method!r}, not {method.cfg.name!r}")
    current = method.state_dict()
    for key, saved in state.tensors.items():
        if key in current and current[key].shape != saved.shape:
            _take_shape(method, key, saved.shape)
    missing, unexpected = method.load_state_dict({**state.tensors, **state.extra}, strict=False)
    towers = tuple(_frozen_towers(method))
    missing = [key for key in missing if not key.startswith(towers)]
    if missing or unexpected:
        raise ValueError(f"the saved state does not fit this {state.method}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}: was it written by another version of the method?")
