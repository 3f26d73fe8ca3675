"""Metric loggers. The local metrics.json is written by the runner itself; a logger only mirrors it elsewhere,
so a tracking failure can never lose a result."""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


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


def make_logger(cfg, run_config: dict, output_dir) -> MetricLogger:
    """`logger=none` or `logger=wandb` (offline when no API key is set)."""
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        try:
            from clipadapt.wandb_logger import WandbLogger

            return SafeLogger(WandbLogger(cfg, run_config, output_dir))
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
