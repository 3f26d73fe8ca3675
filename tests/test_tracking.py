"""W&B: offline runs with the right identity, one run per job, and no result ever lost to a tracking failure."""

from __future__ import annotations

import json

import pytest
import wandb

from clipadapt.run import run


def test_offline_wandb_run_beside_the_metrics(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: offline by default
    seen = {}
    real_init = wandb.init

    def spy(**kwargs):
        seen.update(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    metrics = run(tiny_config("logger=wandb", "method=tip_adapter_f", "shots=1", "++method.train.epochs=2"), tmp_path)
    assert seen["mode"] == "offline"
    assert seen["name"] == metrics["run_name"] == "tip_adapter_f-synthetic-1s-tiny-s1"
    assert seen["group"] == "tip_adapter_f-tiny" and "shots=1" in seen["tags"]
    assert seen["config"]["method"]["name"] == "tip_adapter_f"
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert wandb.run is None  # finished: the next job in the process gets its own run
    assert json.loads((tmp_path / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]


@pytest.mark.parametrize("broken", ["init", "log"])
def test_wandb_failure_keeps_the_local_result(tiny_config, tmp_path, monkeypatch, broken):
    monkeypatch.setenv("WANDB_MODE", "offline")

    def fail(*args, **kwargs):
        raise RuntimeError("wandb is down")

    if broken == "init":
        monkeypatch.setattr(wandb, "init", fail)
    else:
        monkeypatch.setattr("clipadapt.wandb_logger.WandbLogger.log", fail)
    metrics = run(tiny_config("logger=wandb", "method=tip_adapter_f", "shots=1", "++method.train.epochs=1"), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]
