"""Where clipadapt's configs are, and how its small result files are written. Imports nothing of clipadapt, so any
module (the entrypoints, run.py, the dataset readers, the sweep) can use it without an import cycle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temp file and rename: a reader sees the old file or the whole new one, never half of it.

    A failed write (disk full, no permission) leaves no temp file behind and names the file it could not write.
    """
    # dumped before the temp file exists: a payload that cannot be written leaves none
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` as write_json_atomic writes: complete or absent, no temp file left on failure."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a temporary sibling of `path`, then rename it to `path`: complete or absent. A failed write
    (disk full, no permission) leaves no temp file behind and names the file it could not write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, f"could not write {path}: {error.strerror or error}") from error
