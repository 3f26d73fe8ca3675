"""Shared fixtures: offline environment, configs composed the way the CLI composes them, one session cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipadapt.app import CONFIG_DIR  # noqa: E402  (registers the schemas)

SHARED_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "splits"
TINY = ["backbone=tiny", "dataset=synthetic", "logger=none", "features.num_workers=0", "features.train_views=2"]


def compose_config(overrides: list[str], root: Path) -> DictConfig:
    """The config the CLI would build for these overrides, with data, cache and outputs under `root`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.root={root}", *overrides])
    with open_dict(cfg):
        cfg.paths.data_root = str(root / "data")
        cfg.paths.cache_dir = str(root / "cache")
    return cfg


@pytest.fixture(scope="session")
def session_root(tmp_path_factory) -> Path:
    """One data root and feature cache for the session: synthetic images and tiny-model features are made once."""
    return tmp_path_factory.mktemp("clipadapt")


@pytest.fixture
def tiny_config(session_root):
    """compose(overrides) on the tiny random-init model and synthetic images, sharing the session cache."""
    return lambda *overrides: compose_config([*TINY, *overrides], session_root)


@pytest.fixture
def shared_splits() -> Path:
    if not SHARED_SPLITS.is_dir():
        pytest.skip(f"the split files of ../shared/data/splits are not beside this checkout ({SHARED_SPLITS})")
    return SHARED_SPLITS


def random_task(num_classes: int = 5, shots: int = 4, dim: int = 32, views: int = 3, tokens: int = 0, seed: int = 0):
    """A FewShotTask on random features clustered around each class's text feature, plus its test FeatureSet.

    No model involved: for exact, fast checks of a method's arithmetic. `tokens > 0` adds dense features.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from clipadapt.features import FeatureSet
    from clipadapt.methods import FewShotTask

    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)

    def features(n_per_class: int, n_views: int) -> FeatureSet:
        labels = torch.arange(num_classes).repeat_interleave(n_per_class)
        image = F.normalize(text[labels][:, None] + 0.8 * torch.randn(len(labels), n_views, dim, generator=g), dim=-1)
        dense = None
        if tokens:
            dense = F.normalize(image[:, :, None] + 0.5 * torch.randn(len(labels), n_views, tokens, dim, generator=g), dim=-1)
            dense = dense.numpy().astype(np.float16)
        return FeatureSet(image=image.numpy().astype(np.float16), labels=labels.numpy(), dense=dense)

    task = FewShotTask(classnames=[f"class {k}" for k in range(num_classes)], templates=["a photo of a {}."],
                       text=text, train=features(shots, 1 + views), val=features(min(shots, 4), 1),
                       device=torch.device("cpu"))
    return task, features(6, 1)
