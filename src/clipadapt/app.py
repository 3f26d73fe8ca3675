"""What the Hydra entrypoints share: where conf/ is, schema registration, and how a failing job ends."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from clipadapt.config import register_schemas

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("clipadapt")

register_schemas()


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def guarded(job: Callable[[], object]) -> object:
    """Run a job; on failure record the error in error.json next to where metrics.json would be.

    A single run exits with status 2 and a one-line message; in a multirun the failing cell is recorded and the
    sweep goes on with the others.
    """
    from clipadapt.run import write_json_atomic

    try:
        return job()
    except Exception as error:  # noqa: BLE001 - every failure is recorded, then reported
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        write_json_atomic(output_dir() / "error.json", {"error": message, "traceback": traceback.format_exc()})
        log.error("%s", message)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None
        sys.exit(2)
