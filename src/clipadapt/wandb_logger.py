"""W&B: the only module that imports wandb. One W&B run per Hydra job, always finished."""

from __future__ import annotations

import html
import os
from pathlib import Path

import wandb


def _mode(requested: str | None) -> str:
    if requested:
        return requested
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
    return os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")


class WandbLogger:
    def __init__(self, cfg, run_config: dict, output_dir: Path):
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            job_type=cfg.job_type,
            tags=list(cfg.tags),
            name=run_config.get("run_name"),
            config=run_config,
            dir=str(output_dir),
            mode=_mode(cfg.mode),
            settings=wandb.Settings(silent=True, console="off"),
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
    with wandb.init(project=project, entity=entity, job_type="report", name=name, config=config, dir=str(directory),
                    mode=_mode(mode), settings=wandb.Settings(silent=True, console="off")) as run:
        run.log({
            **{key: wandb.Table(columns=columns, data=rows) for key, (columns, rows) in tables.items()},
            **{key: wandb.Image(str(path)) for key, path in images.items()},
            "report": wandb.Html(f"<pre>{html.escape(markdown)}</pre>"),
        })
        run.summary.update(summary)
