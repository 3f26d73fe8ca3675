"""What the Hydra entrypoints share: where conf/ is, schema registration, the checks at start, and how a job ends."""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from clipadapt.config import COMPOSE_ERRORS, error_line, register_schemas
from clipadapt.files import CONFIG_DIR, write_json_atomic

__all__ = ["CONFIG_DIR", "as_command", "fit_to_launcher", "guarded", "in_multirun", "output_dir"]

log = logging.getLogger("clipadapt")

register_schemas()


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def in_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def fit_to_launcher(cfg: DictConfig) -> DictConfig:
    """Per-launcher settings: DataLoader workers crash inside joblib's worker processes (hydra#964), so none there.

    Covers `hydra/launcher=joblib` as well as conf/launcher/joblib.yaml; the worker count changes no result.
    """
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    if "joblib" in launcher and cfg.features.num_workers > 0:
        log.info("joblib launcher: features.num_workers=0 (DataLoader workers crash inside joblib jobs)")
        cfg.features.num_workers = 0
    return cfg


def guarded(job: Callable[[], object]) -> object:
    """Run a job; on failure record the error in error.json next to where metrics.json would be.

    A single run exits with status 2 and a one-line message naming error.json; in a multirun the failing cell is
    recorded and the sweep goes on with the others (its exit status then says that cells failed).
    """
    try:
        return job()
    except Exception as error:  # noqa: BLE001 - every failure is recorded, then reported
        message = error_line(error)
        record = output_dir() / "error.json"
        write_json_atomic(record, {"error": message, "traceback": traceback.format_exc()})
        log.error("%s (traceback in %s)", message, record)
        if in_multirun():
            return None
        sys.exit(2)


def as_command(main: Callable[[], int | None]) -> Callable[[], int | None]:
    """`main` (a Hydra entrypoint, or one that composes configs itself) as a command: its console script and
    `python -m` call this. A config that does not compose (a misspelt option, key or value) ends in one line naming
    the closest valid name, exit status 2 (Hydra prints many lines, exit status 1; HYDRA_FULL_ERROR=1 still gets its
    traceback). Then the process ends without the interpreter's last garbage collections: they walk and free the
    ~166,000 objects that `import torch` made, 0.2-0.6 s of every process on these machines (`python -c "import
    torch"` 1.4-1.9 s, 1.1-1.4 s with gc.freeze() before it ends; bench, overhead), paid by every cell a
    process-per-cell launcher starts. gc.freeze() puts them out of the collector's reach; atexit handlers (logging's
    flush and close, W&B's finish) and module teardown still run, and the memory goes back with the process.
    """

    def command() -> int | None:
        before = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises what it would print: reported below, in one line
        try:
            status = main()
        except COMPOSE_ERRORS as error:
            if before not in (None, "0"):  # the user asked for Hydra's traceback
                raise
            print(error_line(error), file=sys.stderr)
            status = 2
        finally:
            os.environ.pop("HYDRA_FULL_ERROR", None)
            if before is not None:
                os.environ["HYDRA_FULL_ERROR"] = before
        gc.freeze()
        return status

    return command
