"""`python -m clipadapt.extract <overrides>`: compute and cache the features a cell needs, and nothing else."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from clipadapt.app import CONFIG_DIR, as_command, guarded, output_dir
from clipadapt.config import check_options

log = logging.getLogger("clipadapt.extract")  # also when run as __main__


def extract(cfg: DictConfig) -> dict:
    from clipadapt.methods import METHODS
    from clipadapt.methods.base import method_config
    from clipadapt.run import image_task_data, resolve_device

    check_options(cfg)
    method_class = METHODS[method_config(cfg.method).name]
    data = image_task_data(cfg, method_class.needs_dense, resolve_device(cfg.device),
                           augmented=method_class.uses_augmented_views, augmentation=method_class.augmentation)
    from clipadapt.protocols import setup

    setup(cfg, data)  # transfer protocols: the targets' test features too
    sizes = {"train": len(data.train), "val": 0 if data.val is None else len(data.val), "test": len(data.test)}
    log.info("features cached under %s: %s", cfg.paths.cache_dir, sizes)
    return sizes


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from clipadapt.sweep import run_cell

    # run_cell records the outcome (status.json) that a multirun's summary and exit status count
    guarded(lambda: run_cell(cfg, output_dir(), lambda: extract(cfg), skip_done=False))


command = as_command(main)  # `clipadapt-extract` and `python -m clipadapt.extract`

if __name__ == "__main__":
    sys.exit(command())
