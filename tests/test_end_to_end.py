"""The whole pipeline through the real entrypoint and through run(), on the tiny model and synthetic images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipadapt.run import run

REPO = Path(__file__).resolve().parents[1]


def test_train_entrypoint_writes_metrics(tmp_path):
    env = {**os.environ, "CLIPADAPT_HOME": str(tmp_path), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "clipadapt.train", "backbone=tiny", "dataset=synthetic", "logger=none",
         "method=tip_adapter_f", "shots=2", "features.train_views=2", f"hydra.run.dir={tmp_path}/out"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["method"] == "tip_adapter_f" and metrics["shots"] == 2
    assert 0 <= metrics["test/acc"] <= 100
    assert metrics["protocol"]["val_policy"] == "few_shot" and metrics["protocol"]["selection"] == "last"
    assert metrics["protocol"]["leaky"] is False
    assert len(metrics["draw"]["train"]) == 2 * 10  # 2 shots x 10 synthetic classes
    assert set(metrics["chosen"]) >= {"alpha", "beta"}
    assert (tmp_path / "cache" / "synthetic" / "tiny").is_dir()
    # the process exits without its last garbage collection (app.as_command): the log is still whole
    closing = f"test/acc {metrics['test/acc']:.2f}"
    assert closing in result.stderr.splitlines()[-1]
    assert closing in (tmp_path / "out" / "train.log").read_text().splitlines()[-1]


def test_bad_method_fails_in_one_line(tmp_path):
    env = {**os.environ, "CLIPADAPT_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "clipadapt.train", "method=no_such_method", "logger=none", f"hydra.run.dir={tmp_path}/o"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "no_such_method" in result.stderr and "tip_adapter_f" in result.stderr  # names the valid choices


def test_run_reuses_the_cache(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("method=zero_shot", "shots=1")
    first = run(cfg, tmp_path / "a")

    def no_model(*args):
        raise AssertionError("the CLIP model was loaded although every feature is cached")

    monkeypatch.setattr("clipadapt.run._load_backbone", no_model)
    second = run(cfg, tmp_path / "b")
    assert first["test/acc"] == second["test/acc"]


def test_save_logits(tiny_config, tmp_path):
    import numpy as np

    metrics = run(tiny_config("method=zero_shot", "shots=1", "save_logits=true"), tmp_path)
    saved = np.load(tmp_path / "logits.npz")
    assert saved["logits"].shape == (metrics["num_test"], 10)
    assert np.mean(saved["logits"].argmax(1) == saved["labels"]) * 100 == pytest.approx(metrics["test/acc"])
