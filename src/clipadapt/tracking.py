"""Metric loggers and run provenance. The local metrics.json is written by the runner itself; a logger only mirrors
it elsewhere, so a tracking failure can never lose a result."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
from functools import cache
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when clipadapt runs from one (pip install -e)
# distribution names of the packages whose versions a result depends on (metadata only: nothing is imported)
VERSIONED = {"clipadapt": "clipadapt", "torch": "torch", "open_clip": "open_clip_torch", "numpy": "numpy"}


class MetricLogger(Protocol):
    def log(self, metrics: dict, step: int | None = None) -> None: ...

    def summary(self, metrics: dict) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class NullLogger:
    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class SafeLogger:
    """Wraps a logger so that its failures are logged as warnings and never stop the run."""

    def __init__(self, inner: MetricLogger):
        self.inner = inner

    def _call(self, name: str, *args, **kwargs) -> None:
        try:
            getattr(self.inner, name)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - tracking is best-effort by design
            log.warning("metric logger %s failed: %s", name, error)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._call("log", metrics, step=step)

    def summary(self, metrics: dict) -> None:
        self._call("summary", metrics)

    def close(self, failed: bool = False) -> None:
        self._call("close", failed=failed)


def sweep_dir() -> Path | None:
    """The folder of the multirun this job is a cell of; None for a single run (or outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir)


def run_group(cfg, run_config: dict) -> str:
    """`logger.group`, else the sweep's folder name in a multirun (a dashboard then shows one sweep at a time),
    else `<method>-<backbone>`."""
    if cfg.group:
        return cfg.group
    sweep = sweep_dir()
    return sweep.resolve().name if sweep else f"{run_config['method']['name']}-{run_config['backbone']['name']}"


def make_logger(cfg, run_config: dict, output_dir) -> MetricLogger:
    """`logger=none` or `logger=wandb` (offline when no API key is set, or when W&B cannot be reached)."""
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        try:
            from clipadapt.wandb_logger import WandbLogger

            return SafeLogger(WandbLogger(cfg, run_config, output_dir, group=run_group(cfg, run_config)))
        except Exception as error:  # noqa: BLE001
            log.warning("W&B could not start (%s): continuing with the local metrics.json only", error)
            return NullLogger()
    raise ValueError(f"unknown logger {cfg.name!r}: use none or wandb")


def log_report_run(wandb_cfg, name: str, config: dict, directory, tables: dict, images: dict, summary: dict,
                   markdown: str) -> bool:
    """Mirror a results report to W&B (`wandb_cfg`: project, entity, mode); best-effort like every logger here."""
    try:
        from clipadapt.wandb_logger import log_report

        log_report(wandb_cfg.project, wandb_cfg.entity, wandb_cfg.mode, name, config, directory, tables, images,
                   summary, markdown)
        return True
    except Exception as error:  # noqa: BLE001 - the report files on disk are the result of record
        log.warning("W&B report run failed (%s): the report files are written all the same", error)
        return False


# ---------------------------------------------------------------------------------------------------- provenance


def provenance_record(device) -> dict:
    """What produced a result, for metrics.json and the W&B config: the code's git commit (and whether tracked files
    differ from it), package versions, the device and the host. Never fails: what cannot be known says why."""
    return {"git": git_state(), "versions": package_versions(), "device": device_name(device),
            "host": socket.gethostname(), "python": platform.python_version()}


def _git(*args: str) -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # `git status` must not take the index lock of a busy checkout
    done = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10, env=env)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or [f"git {args[0]} failed"])[0])
    return done.stdout.strip()


@cache  # the code a process runs is the code it imported: one look per process, not one per sweep cell
def git_state() -> dict:
    try:
        top = Path(_git("rev-parse", "--show-toplevel")).resolve()
        if top != SOURCE_ROOT:  # e.g. a wheel installed in a .venv that lies inside some repository
            return {"commit": None, "dirty": None, "note": f"clipadapt runs from {SOURCE_ROOT}, not a git checkout"}
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "note": "git is not installed"}
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        return {"commit": None, "dirty": None, "note": f"no git commit for {SOURCE_ROOT}: {error}"}
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name, distribution in VERSIONED.items():
        try:
            versions[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name(device) -> str:
    """The CUDA device's name, or the CPU model."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return cpu_model()


@cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or platform.machine() or "unknown CPU"
