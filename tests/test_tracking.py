"""W&B: offline runs with the right identity, one run per job, grouped by sweep, offline within seconds when W&B cannot
be reached, and no result ever lost to a tracking failure."""

from __future__ import annotations

import json
import socket
import time

import pytest
import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from clipadapt import wandb_logger
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
    metrics = run(tiny_config("logger=wandb", "method=tip_adapter_f", "shots=1", "method.train.epochs=2"), tmp_path)
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
    metrics = run(tiny_config("logger=wandb", "method=tip_adapter_f", "shots=1", "method.train.epochs=1"), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_wandb_with_a_key_but_no_network_falls_back_to_offline(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")  # 40 characters, as real keys
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(wandb_logger, "_unreachable", False)
    starts = []
    real_init = wandb.init

    def timed(**kwargs):
        t = time.perf_counter()
        try:
            return real_init(**kwargs)
        finally:
            starts.append((kwargs["mode"], time.perf_counter() - t))

    monkeypatch.setattr(wandb, "init", timed)
    cfg = tiny_config("logger=wandb", "method=zero_shot", "shots=1")
    run(cfg, tmp_path / "first")
    assert [mode for mode, _ in starts] == ["online", "offline"]
    assert sum(seconds for _, seconds in starts) < 15  # W&B alone would wait 90 s
    assert list((tmp_path / "first" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert json.loads((tmp_path / "first" / "metrics.json").read_text())["method"] == "zero_shot"

    run(cfg, tmp_path / "second")  # the next cell of the process does not wait again
    assert [mode for mode, _ in starts[2:]] == ["offline"]
    assert list((tmp_path / "second" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_sweeps_cells_are_grouped_under_the_sweeps_name(tiny_config, tmp_path, monkeypatch):
    groups = []
    real_init = wandb.init

    def spy(**kwargs):
        groups.append(kwargs["group"])
        return real_init(**{**kwargs, "mode": "disabled"})

    monkeypatch.setattr(wandb, "init", spy)
    cfg = tiny_config("logger=wandb", "method=zero_shot", "shots=1")
    run(cfg, tmp_path / "single")
    # Hydra's job config as a multirun cell sees it (what HydraConfig.get() returns inside a sweep)
    sweep = tmp_path / "outputs" / "my_sweep"
    monkeypatch.setattr(HydraConfig.instance(), "cfg", OmegaConf.create(
        {"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep), "subdir": "zero_shot/tiny"}}}))
    run(cfg, sweep / "cell")
    run(tiny_config("logger=wandb", "method=zero_shot", "shots=1", "logger.group=mine"), sweep / "cell")
    assert groups == ["zero_shot-tiny", "my_sweep", "mine"]
