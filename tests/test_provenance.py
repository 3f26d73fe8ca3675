"""Provenance: a run's metrics.json and W&B config say which code (git commit, dirty or not), which package versions,
which device and which host produced it; without git or outside a repository they say so and the run goes on."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb

from clipadapt import tracking
from clipadapt.run import run

REPO = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed here")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def checkout_head() -> str | None:
    try:
        return git(REPO, "rev-parse", "HEAD") if (REPO / ".git").exists() else None
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def cpu_model() -> str:
    """The CPU's model name as Linux lists it (elsewhere: any non-empty name will do)."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else tracking.cpu_model()


@pytest.fixture
def fresh_git_state():
    """git_state is looked up once per process: forget it before and after the test."""
    tracking.git_state.cache_clear()
    yield
    tracking.git_state.cache_clear()


def test_a_run_records_its_provenance_in_metrics_and_wandb(tiny_config, tmp_path, monkeypatch, fresh_git_state):
    configs = []
    real_init = wandb.init

    def spy(**kwargs):
        configs.append(kwargs["config"])
        return real_init(**{**kwargs, "mode": "disabled"})

    monkeypatch.setattr(wandb, "init", spy)
    head_before = checkout_head()
    metrics = run(tiny_config("logger=wandb", "method=zero_shot", "shots=1"), tmp_path)
    made = json.loads((tmp_path / "metrics.json").read_text())["provenance"]

    if head_before is None:  # the tests run from a copy that is not a git checkout: the record says why
        assert made["git"]["commit"] is None and made["git"]["note"]
    else:
        assert made["git"]["commit"] in {head_before, checkout_head()}  # another commit may land meanwhile
        assert made["git"]["dirty"] is bool(git(REPO, "status", "--porcelain", "--untracked-files=no"))
    assert made["versions"] == {"clipadapt": importlib.metadata.version("clipadapt"), "torch": torch.__version__,
                                "open_clip": importlib.metadata.version("open_clip_torch"), "numpy": np.__version__}
    assert made["host"] == socket.gethostname()
    assert made["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model())
    assert configs[0]["provenance"] == made == metrics["provenance"]
    assert "provenance" not in made.get("config", {})  # the config hash (sweep resume) does not see it


@needs_git
def test_git_state_of_a_clean_and_a_dirty_checkout(tmp_path, monkeypatch, fresh_git_state):
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    monkeypatch.setattr(tracking, "SOURCE_ROOT", tmp_path.resolve())
    assert tracking.git_state() == {"commit": git(tmp_path, "rev-parse", "HEAD"), "dirty": False}
    tracking.git_state.cache_clear()
    (tmp_path / "code.py").write_text("x = 2\n")
    assert tracking.git_state()["dirty"] is True


@needs_git
def test_no_repository_or_no_git_is_said_not_raised(tmp_path, monkeypatch, fresh_git_state):
    monkeypatch.setattr(tracking, "SOURCE_ROOT", tmp_path.resolve())  # not inside any repository
    state = tracking.git_state()
    assert state["commit"] is None and state["dirty"] is None and "not a git repository" in state["note"]

    tracking.git_state.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    assert tracking.git_state() == {"commit": None, "dirty": None, "note": "git is not installed"}


def test_versions_come_from_metadata_without_importing_open_clip():
    code = ("import sys; from clipadapt.tracking import provenance_record; made = provenance_record('cpu'); "
            "assert made['versions']['open_clip'], made; assert 'open_clip' not in sys.modules; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
