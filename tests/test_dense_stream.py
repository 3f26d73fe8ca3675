"""Streamed dense training: the plain and augmented dense entries stay memory-mapped side by side (ViewStack) and a
step reads only its rows; the loss history and trained weights equal training on the concatenated in-memory array."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from clipadapt.engine import fit
from clipadapt.features import FeatureSet, ViewStack, read_pairs
from clipadapt.methods import build_method
from conftest import random_task


def memory_mapped(array: np.ndarray, path) -> np.memmap:
    np.save(path, array)
    return np.load(path, mmap_mode="r")


def trained(name: str, task, features: FeatureSet, **options) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the same initial weights for both paths
    method = build_method(OmegaConf.create({"name": name, **options}), task)
    method.setup()
    history = fit(method, features, seed=3)
    return history, {k: v for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name, options", [
    ("calip_fs", {"train": {"epochs": 3, "batch_size": 4}}),
    ("vt_clip", {"train": {"epochs": 2, "batch_size": 4}}),
])
def test_streamed_training_equals_the_in_memory_path(tmp_path, name, options):
    task, _ = random_task(tokens=6, views=3)
    dense = task.train.dense  # [N, 1 + 3 views, M, D]: the plain view, then the augmented ones
    plain = memory_mapped(np.ascontiguousarray(dense[:, :1]), tmp_path / "plain.npy")
    augmented = memory_mapped(np.ascontiguousarray(dense[:, 1:]), tmp_path / "augmented.npy")
    streamed = FeatureSet(task.train.image, task.train.labels, ViewStack([plain, augmented]))
    # The path this replaces (run.py before): both entries concatenated in memory.
    in_memory = FeatureSet(task.train.image, task.train.labels, np.concatenate([plain, augmented], axis=1))

    history, weights = trained(name, task, streamed, **options)
    reference_history, reference_weights = trained(name, task, in_memory, **options)
    assert len(history) == options["train"]["epochs"] and history == reference_history
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)


def test_view_stack_reads_each_row_s_view_from_its_part(tmp_path):
    rng = np.random.default_rng(0)
    whole = rng.standard_normal((7, 5, 3, 4)).astype(np.float16)
    plain, augmented = memory_mapped(whole[:, :1], tmp_path / "a.npy"), memory_mapped(whole[:, 1:], tmp_path / "b.npy")
    stack = ViewStack([plain, augmented])
    rows, views = rng.integers(0, 7, 20), rng.integers(0, 5, 20)
    assert stack.shape == whole.shape and len(stack) == 7
    assert np.array_equal(read_pairs(stack, rows, views), whole[rows, views])
    assert np.array_equal(stack[:3, 2], whole[:3, 2]) and np.array_equal(stack[[4, 1]], whole[[4, 1]])
    assert np.array_equal(np.asarray(stack), whole)
    single = memory_mapped(whole, tmp_path / "whole.npy")  # a plain cached entry: read with pread too
    assert np.array_equal(read_pairs(single, rows, views), whole[rows, views])
