"""`python -m clipadapt.train <overrides>`: train and evaluate one cell (or a grid with -m)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from clipadapt.app import CONFIG_DIR, fit_to_launcher, guarded, in_multirun, output_dir


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from clipadapt.run import run
    from clipadapt.sweep import run_cell

    cfg, out = fit_to_launcher(cfg), output_dir()
    # In a multirun a cell already done for this exact config is skipped, so re-running a sweep resumes it.
    metrics = guarded(lambda: run_cell(cfg, out, lambda: run(cfg, out), skip_done=in_multirun() and cfg.sweep.skip_done))
    return None if metrics is None else metrics["test/acc"]


if __name__ == "__main__":
    main()
