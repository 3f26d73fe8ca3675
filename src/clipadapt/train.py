"""`python -m clipadapt.train <overrides>`: train and evaluate one cell (or a grid with -m)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from clipadapt.app import CONFIG_DIR, guarded, output_dir


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from clipadapt.run import run

    metrics = guarded(lambda: run(cfg, output_dir()))
    return None if metrics is None else metrics["test/acc"]


if __name__ == "__main__":
    main()
