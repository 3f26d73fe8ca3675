"""`python -m clipadapt.train <overrides>`: train and evaluate one cell (or a grid with -m)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from clipadapt.app import CONFIG_DIR, as_command, fit_to_launcher, guarded, in_multirun, output_dir
from clipadapt.config import check_options

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from clipadapt.run import run
    from clipadapt.sweep import run_cell

    cfg, out = fit_to_launcher(cfg), output_dir()

    def cell() -> dict:
        check_options(cfg)  # a sweep checked every cell before launching any; a single run checks here
        return run(cfg, out)

    # In a multirun a cell already done for this exact config is skipped, so re-running a sweep resumes it.
    metrics = guarded(lambda: run_cell(cfg, out, cell, skip_done=in_multirun() and cfg.sweep.skip_done))
    if metrics is None and not in_multirun():  # its folder is another run's, still running (a fixed hydra.run.dir)
        log.error("%s is in use by another run, still running: give this run its own hydra.run.dir", out)
        sys.exit(2)
    return None if metrics is None else metrics["test/acc"]


command = as_command(main)  # `clipadapt-train` and `python -m clipadapt.train`

if __name__ == "__main__":
    sys.exit(command())
