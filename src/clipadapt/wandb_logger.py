"""W&B: the only module that imports wandb. One W&B run per Hydra job, always finished.

With an API key but no network, `wandb.init` would wait 90 s per run before failing: it waits INIT_TIMEOUT_S
(or $WANDB_INIT_TIMEOUT), then logs offline, and so does every later run of the process (a sweep does not pay the
wait per cell). Offline runs are uploaded later with `wandb sync`.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path

import wandb

log = logging.getLogger(__name__)

INIT_TIMEOUT_S = 8.0
_unreachable = False  # set when an online start failed: later runs of this process go straight offline


def _mode(requested: str | None) -> str:
    if requested:
        return requested
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
    return os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")


def _settings() -> wandb.Settings:
    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)
    return wandb.Settings(silent=True, console="off", init_timeout=timeout)


def start_run(mode: str | None, directory: Path, **kwargs):
    """wandb.init in `mode` (see _mode); an online start that fails (no network, bad key) is retried offline."""
    global _unreachable
    mode = _mode(mode)
    if mode == "online" and _unreachable:
        mode = "offline"
    if mode != "online":
        return wandb.init(mode=mode, dir=str(directory), settings=_settings(), **kwargs)
    try:
        return wandb.init(mode="online", dir=str(directory), settings=_settings(), **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure to go online is worth an offline record instead
        _unreachable = True
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        log.warning("W&B unreachable (%s): logging offline from now on; upload later with "
                    "`wandb sync %s/wandb/offline-run-*`", reason, directory)
        return wandb.init(mode="offline", dir=str(directory), settings=_settings(), **kwargs)


class WandbLogger:
    def __init__(self, cfg, run_config: dict, output_dir: Path, group: str):
        self.run = start_run(
            cfg.mode,
            Path(output_dir),
            project=cfg.project,
            entity=cfg.entity,
            group=group,  # tracking.run_group: logger.group, else the sweep's or the run's own
            job_type=cfg.job_type,
            tags=list(cfg.tags),
            name=run_config.get("run_name"),
            config=run_config,
        )
        self.run.define_metric("epoch")
        self.run.define_metric("train/*", step_metric="epoch")

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics)

    def summary(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def log_report(project: str, entity: str | None, mode: str | None, name: str, config: dict, directory: Path,
               tables: dict[str, tuple[list[str], list[list]]], images: dict[str, Path], summary: dict,
               markdown: str) -> None:
    """One W&B run of job_type "report": the result tables, the plots, headline numbers in the summary."""
    with start_run(mode, Path(directory), project=project, entity=entity, job_type="report", name=name,
                   config=config) as run:
        run.log({
            **{key: wandb.Table(columns=columns, data=rows) for key, (columns, rows) in tables.items()},
            **{key: wandb.Image(str(path)) for key, path in images.items()},
            "report": wandb.Html(f"<pre>{html.escape(markdown)}</pre>"),
        })
        run.summary.update(summary)
