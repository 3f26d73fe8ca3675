"""Resumable sweeps: which cells are done, one process per cell at a time, and what a sweep did.

A cell is *done* when its folder holds a metrics.json whose resolved config hashes to the same value as the cell's
config now (`config_hash`; the keys that cannot change a result, such as tracking, paths and loader settings, are
left out). Re-running a sweep therefore runs only the cells that are missing, failed, or whose config changed. The
outcome of every cell is written to `status.json` beside its metrics.json/error.json.

A multirun's life (whatever the launcher: basic, joblib, batched, slurm): the `clipadapt` sweeper (conf/config.yaml,
hydra_plugins/clipadapt_launcher) composes every cell and calls `preflight` (every cell's options, then each dataset
readable) before launching any, and `watch` shows cells finished / total while they run; `SweepSummary` (a Hydra
callback, conf/config.yaml) ends it with the counts, the report command and the failed cells, and exits with
status 1 when any cell failed.

Concurrency: a cell is run under a lock on `<cell>/.cell.lock`, taken without waiting. A second sweep that reaches
a cell another process is running leaves it to that process (logged, not run twice); metrics.json, error.json and
status.json are all written by temp file + rename, so a reader never sees half a file. The lock is an fcntl lock:
it dies with its process, so a killed sweep leaves no stale lock behind.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from contextlib import contextmanager
from hashlib import sha256
from pathlib import Path
from typing import Callable, Iterator, Sequence

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from clipadapt.config import RESULT_NEUTRAL_KEYS, error_line
from clipadapt.files import write_json_atomic

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


def result_config(config: DictConfig | dict) -> dict:
    """The resolved config as metrics.json stores it (the same JSON round trip), minus the result-neutral keys."""
    container = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    canonical = json.loads(json.dumps(container, default=str))
    for dotted in RESULT_NEUTRAL_KEYS:
        *parents, leaf = dotted.split(".")
        node = canonical
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return canonical


def config_hash(config: DictConfig | dict) -> str:
    """Hash of what a cell computes: its resolved config without `RESULT_NEUTRAL_KEYS`.

    Takes a composed config or the `config` dict stored in a metrics.json; both give the same hash for the same cell.
    """
    return sha256(json.dumps(result_config(config), sort_keys=True).encode()).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    """A JSON object from disk, or None when it is absent or unreadable (an unreadable one is logged)."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s): treating it as absent", path, error)
        return None
    return payload if isinstance(payload, dict) else None


def is_done(cfg: DictConfig, output_dir: Path) -> dict | None:
    """The cell's metrics when `output_dir` already holds its result for this exact config, else None.

    Plain function over a composed config, so a runner that trains several cells in one process can call it too.
    """
    output_dir = Path(output_dir)
    metrics = read_json(output_dir / "metrics.json")
    if metrics is None or not isinstance(metrics.get("config"), dict):
        return None
    if config_hash(metrics["config"]) != config_hash(cfg):
        return None
    if cfg.get("save_logits") and not (output_dir / "logits.npz").exists():
        return None
    return metrics


def write_status(output_dir: Path, status: str, digest: str, **extra) -> None:
    write_json_atomic(Path(output_dir) / STATUS_FILE, {
        "status": status, "config_hash": digest, "finished": time.time(), "host": socket.gethostname(), **extra,
    })


def _set_aside_previous(output_dir: Path, digest: str) -> None:
    """Before a (re-)run: keep a result of another config as metrics.<its hash>.json (its saved model and logits
    likewise), drop a stale error.json."""
    metrics = read_json(output_dir / "metrics.json")
    if metrics is not None:
        old = config_hash(metrics["config"]) if isinstance(metrics.get("config"), dict) else "unknown"
        if old != digest:
            for name in ("model.safetensors", "logits.npz", "metrics.json"):  # metrics.json last: it marks a result
                if (output_dir / name).exists():
                    stem, suffix = name.split(".", 1)
                    (output_dir / name).replace(output_dir / f"{stem}.{old}.{suffix}")
            log.warning("%s: its config changed since metrics.json was written: kept as metrics.%s.json, running again",
                        output_dir, old)
    (output_dir / "error.json").unlink(missing_ok=True)


def run_cell(cfg: DictConfig, output_dir: Path, job: Callable[[], dict | None], skip_done: bool = True) -> dict | None:
    """Run one cell through `job`, which returns its metrics (None or an exception: it failed).

    Skipped when `skip_done` and the cell is done; left alone (None) when another process holds the cell's lock.
    The status is recorded in status.json; an exception of the job is re-raised for the caller to record.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        digest = config_hash(cfg)
    except Exception:  # e.g. an interpolation that does not resolve: the cell fails, recorded like any failure
        write_status(output_dir, "failed", "unresolved")
        raise
    name = cfg.get("run_name", str(output_dir))
    lock = FileLock(str(output_dir / ".cell.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        log.warning("%s: another process is running this cell (%s is locked): leaving it to that one",
                    name, lock.lock_file)
        return None
    except NotImplementedError as error:  # a filesystem without flock (some Lustre mounts): no exclusion there
        log.warning("%s: cannot lock %s (%s): running it without the cell lock", name, lock.lock_file, error)
        lock = None
    try:
        if skip_done and (done := is_done(cfg, output_dir)) is not None:
            log.info("%s: skipped, already done (metrics.json of the same config %s)", name, digest)
            write_status(output_dir, "skipped", digest)
            return done
        _set_aside_previous(output_dir, digest)
        started, metrics = time.time(), None
        try:
            metrics = job()
        finally:  # also when the job exits the process (a single run's failure) or is interrupted
            write_status(output_dir, "failed" if metrics is None else "done", digest, started=started)
        return metrics
    finally:
        if lock is not None:
            lock.release()


def summarize(sweep_dir: Path, since: float = 0.0) -> dict[str, list[Path]]:
    """Cells under `sweep_dir` by the outcome they recorded at or after `since` (a time.time())."""
    outcomes: dict[str, list[Path]] = {"done": [], "skipped": [], "failed": []}
    for path in sorted(Path(sweep_dir).rglob(STATUS_FILE)):
        status = read_json(path)
        if status and status.get("finished", 0) >= since and status.get("status") in outcomes:
            outcomes[status["status"]].append(path.parent)
    return outcomes


# ------------------------------------------------------------------------------------------- a whole multirun


def dataset_problem(cfg: DictConfig) -> str | None:
    """Why a cell's dataset cannot be read, or None: the dataset read as a run reads it (split file, class folders),
    without looking at each image (the cell does that for the images it uses). Synthetic images are made on demand."""
    from clipadapt.data import DatasetError, build_dataset

    if cfg.dataset.kind == "synthetic":
        return None
    if cfg.dataset.kind == "features":
        path = cfg.dataset.path
        return None if path and Path(path).is_file() else f"features file {path} does not exist: set dataset.path"
    try:
        build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    except (DatasetError, OSError) as error:
        return str(error).splitlines()[0]
    return None


def preflight(cells: Sequence[DictConfig]) -> None:
    """Before a sweep launches any cell: every cell's options (clipadapt.config.check_options) and, unless
    `sweep.check_datasets=false`, whether each of its datasets can be read. Logs one line per problem (the same
    problem of many cells once) and exits with status 2, having run nothing."""
    problems = _option_problems(_as_jobs(cells)) or _dataset_problems(_as_jobs(cells))
    if problems:
        for problem in problems:
            log.error("%s", problem)
        log.error("nothing was run: the sweep's %d cells were checked before launching any", len(cells))
        sys.exit(2)


def _as_jobs(cells: Sequence[DictConfig]) -> Iterator[DictConfig]:
    """The cells one after another, each with Hydra's runtime config set to it as in its job, so that `${hydra:...}`
    interpolations resolve here; what was set before is restored at the end."""
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg
    try:
        for cfg in cells:
            HydraConfig.instance().set_config(cfg)
            yield cfg
    finally:
        HydraConfig.instance().cfg = before


def _option_problems(cells: Iterator[DictConfig]) -> list[str]:
    from clipadapt.config import check_options

    problems: dict[str, None] = {}  # ordered and without repeats: one line for the many cells sharing a bad option
    for cfg in cells:
        try:
            check_options(cfg)
        except Exception as error:  # noqa: BLE001 - any option a cell would fail on
            problems[error_line(error)] = None
    return list(problems)


def _dataset_problems(cells: Iterator[DictConfig]) -> list[str]:
    seen, problems = set(), []
    for cfg in cells:
        key = json.dumps([OmegaConf.to_container(cfg.dataset, resolve=True), cfg.paths.data_root], sort_keys=True)
        if cfg.sweep.check_datasets and key not in seen:  # each dataset (as configured, under its root) once
            seen.add(key)
            if (problem := dataset_problem(cfg)) is not None:
                problems.append(f"dataset {cfg.dataset.name}: {problem}")
    if problems:
        problems.append("sweep.check_datasets=false runs the sweep anyway (the cells of these datasets then fail)")
    return problems


@contextmanager
def watch(sweep_dir: Path, total: int, poll_s: float = 3.0) -> Iterator[None]:
    """Progress of a sweep while its launcher runs the cells: cells finished / total, failures, ETA (a bar on a
    terminal, periodic log lines elsewhere: clipadapt.progress). Counts the status.json files written since it began,
    so it works for cells run in this process, in joblib workers or on SLURM nodes alike."""
    from clipadapt.progress import progress

    started, stop = time.time(), threading.Event()
    bar = progress(total=total, desc="sweep", unit="cell")

    def count() -> None:
        outcomes = summarize(sweep_dir, since=started)
        finished = sum(len(cells) for cells in outcomes.values())
        if finished > bar.done:
            bar.update(min(finished, total) - bar.done, failed=len(outcomes["failed"]))

    def poll() -> None:
        while not stop.wait(poll_s):
            count()

    poller = threading.Thread(target=poll, name="sweep-progress", daemon=True)
    poller.start()
    try:
        yield
    finally:
        stop.set()
        poller.join()
        count()
        bar.close()


class SweepSummary(Callback):
    """Hydra callback: ends a multirun with the sweep folder, how many cells ran, were skipped and failed, the report
    command and, last, the failed cells and their error.json; exits with status 1 when any cell failed, so that a
    script or CI job running the sweep sees it."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        outcomes = summarize(sweep_dir, since=self.started)
        counts = ", ".join(f"{len(cells)} {outcome}" for outcome, cells in outcomes.items())
        log.info("sweep %s: %s", sweep_dir, counts)
        log.info("report: python -m clipadapt.report %s", sweep_dir)
        failed = outcomes["failed"]
        if failed:
            lines = "\n".join(f"  {_error_line(cell)}" for cell in failed)
            log.error("%d cell(s) failed (re-running the same command runs only those and the missing ones):\n%s",
                      len(failed), lines)
            sys.exit(1)


def _error_line(cell: Path) -> str:
    """`<cell>/error.json: <its one-line error>`."""
    record = read_json(cell / "error.json") or {}
    return f"{cell / 'error.json'}: {record.get('error', 'no error.json (the cell was interrupted)')}"
