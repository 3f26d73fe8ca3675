"""Sweeps: the grid config, joblib cells, failures recorded and retried, resume after a kill, concurrent sweeps.

The multirun tests run the real CLI (`python -m clipadapt.train +sweep=grid ...`) on the tiny random-init model and
synthetic images, sharing the session's data and feature cache (CLIPADAPT_HOME = the session root).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from clipadapt.app import CONFIG_DIR
from clipadapt.run import run
from clipadapt.sweep import config_hash, is_done, run_cell, summarize

REPO = Path(__file__).resolve().parents[1]
GRID = ["+sweep=grid", "dataset=synthetic", "backbone=tiny", "logger=none", "features.train_views=2"]


def train_command(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "clipadapt.train", *GRID, f"hydra.sweep.dir={sweep_dir}", *overrides]


def cli_env(root: Path) -> dict:
    env = {**os.environ, "CLIPADAPT_HOME": str(root), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    for derived in ("CLIPADAPT_DATA", "CLIPADAPT_CACHE"):  # data and cache under the root, as compose_config has them
        env.pop(derived, None)
    return env


@pytest.fixture
def warm_cache(tiny_config):
    """Cache the tiny-model features of the draws the CLI sweeps below use, in this process, so that the sweep
    processes only read the cache (no model to build: these tests are about scheduling, not extraction)."""
    import torch

    from clipadapt.run import image_task_data

    for shots in (1, 2):
        image_task_data(tiny_config(f"shots={shots}", "seed=1"), False, torch.device("cpu"))


def train_cli(root: Path, sweep_dir: Path, *overrides: str, status: int = 0) -> str:
    result = subprocess.run(train_command(sweep_dir, *overrides), cwd=REPO, env=cli_env(root), capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == status, output[-3000:]
    return output


def cell(sweep_dir: Path, method: str, dataset: str, shots: int, seed: int, backbone: str = "tiny",
         settings: str = ",features.train_views=2") -> Path:
    """The cell's folder: its grid path, the seed folder named with the settings the command line adds (GRID's)."""
    return sweep_dir / method / backbone / dataset / f"{shots}shot" / f"seed{seed}{settings}"


def status(folder: Path) -> str:
    return json.loads((folder / "status.json").read_text())["status"]


def write_features_file(path: Path, classes: int = 4, width: int = 16) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), 6)
    np.savez(path, train_features=rng.normal(size=(len(labels), width)), train_labels=labels,
             val_features=rng.normal(size=(len(labels), width)), val_labels=labels,
             test_features=rng.normal(size=(len(labels), width)), test_labels=labels,
             text_features=rng.normal(size=(classes, width)))


# ------------------------------------------------------------------------------------------- config and hash


def test_grid_config_sweeps_the_benchmark():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+sweep=grid", "launcher=joblib"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.dataset.split(",") == ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
                                         "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
    assert params.shots == "1,2,4,8,16" and params.seed == "1,2,3"
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweep.dir == "outputs/grid"
    assert cfg.hydra.sweep.subdir == "tip_adapter_f/rn50/eurosat/16shot/seed1"  # one folder per cell
    assert "joblib" in cfg.hydra.launcher._target_ and cfg.features.num_workers == 0
    assert cfg.sweep.skip_done is True and cfg.sweep.check_datasets is True
    assert cfg.hydra.sweeper._target_.endswith("CellSweeper")  # checks the cells first, shows progress
    assert cfg.hydra.callbacks.sweep_summary._target_ == "clipadapt.sweep.SweepSummary"  # counts, exit status


def test_slurm_launcher_option_composes():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 32)
    assert launcher.timeout_min > 0 and launcher.cpus_per_task > cfg.features.num_workers


def test_config_hash_ignores_where_and_how_a_cell_runs(tiny_config):
    base = config_hash(tiny_config("method=tip_adapter", "shots=1"))
    for neutral in ("logger=wandb", "device=cpu", "features.num_workers=7", "features.batch_size=3",
                    "sweep.skip_done=false", "save_logits=true", "paths.cache_dir=/elsewhere"):
        assert config_hash(tiny_config("method=tip_adapter", "shots=1", neutral)) == base, neutral
    for change in ("shots=2", "seed=2", "method=zero_shot", "protocol.selection=test", "features.train_views=3"):
        assert config_hash(tiny_config("method=tip_adapter", "shots=1", change)) != base, change


# ---------------------------------------------------------------------------------------- run_cell in-process


def test_run_cell_skips_done_cells_and_sets_aside_other_configs(tiny_config, tmp_path):
    calls = []

    def job(cfg):
        calls.append(cfg.shots)
        return run(cfg, tmp_path)

    cfg = tiny_config("method=zero_shot", "shots=1")
    first = run_cell(cfg, tmp_path, lambda: job(cfg))
    assert calls == [1] and status(tmp_path) == "done"
    assert config_hash(first["config"]) == config_hash(cfg)  # what metrics.json stores hashes like the config
    assert is_done(cfg, tmp_path) == first

    again = run_cell(cfg, tmp_path, lambda: job(cfg))
    assert calls == [1] and again == first and status(tmp_path) == "skipped"
    assert run_cell(cfg, tmp_path, lambda: job(cfg), skip_done=False) is not None and calls == [1, 1]

    assert is_done(tiny_config("method=zero_shot", "shots=1", "save_logits=true"), tmp_path) is None  # no logits.npz

    changed = tiny_config("method=zero_shot", "shots=1", "protocol.selection=val")
    assert is_done(changed, tmp_path) is None
    run_cell(changed, tmp_path, lambda: job(changed))
    kept = tmp_path / f"metrics.{config_hash(cfg)}.json"
    assert json.loads(kept.read_text())["test/acc"] == first["test/acc"]  # the other config's result is kept
    assert (tmp_path / f"model.{config_hash(cfg)}.safetensors").exists()  # with the model it was measured with
    assert is_done(changed, tmp_path) is not None and is_done(cfg, tmp_path) is None


def test_run_cell_records_failures_and_retries_them(tiny_config, tmp_path):
    cfg, folder = tiny_config("method=zero_shot", "shots=1"), tmp_path / "cell"
    folder.mkdir()
    (folder / "error.json").write_text('{"error": "an earlier failure"}')
    assert run_cell(cfg, folder, lambda: None) is None  # the job failed (and would have written error.json)
    assert status(folder) == "failed" and not (folder / "error.json").exists()  # the stale error is gone
    assert summarize(tmp_path) == {"done": [], "skipped": [], "failed": [folder]}
    assert run_cell(cfg, folder, lambda: run(cfg, folder)) is not None  # a failed cell is run again
    assert status(folder) == "done"
    assert summarize(tmp_path) == {"done": [folder], "skipped": [], "failed": []}
    assert summarize(tmp_path, since=time.time() + 1) == {"done": [], "skipped": [], "failed": []}

    def crash():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # re-raised for the entrypoint to write error.json
        run_cell(cfg, folder, crash, skip_done=False)
    assert status(folder) == "failed"
    unset = tiny_config("run_name=${oc.env:CLIPADAPT_TEST_NEVER_SET}")  # the config cannot even be resolved
    with pytest.raises(Exception, match="CLIPADAPT_TEST_NEVER_SET"):
        run_cell(unset, tmp_path / "unset", lambda: pytest.fail("ran a cell with an unresolved config"))
    assert status(tmp_path / "unset") == "failed"


def test_run_cell_leaves_a_locked_cell_to_its_owner(tiny_config, tmp_path):
    cfg = tiny_config("method=zero_shot", "shots=1")
    owner = FileLock(str(tmp_path / ".cell.lock"))
    with owner:  # another process running this cell holds the lock
        assert run_cell(cfg, tmp_path, lambda: pytest.fail("ran a cell another process is running")) is None
    assert not (tmp_path / "status.json").exists()


# ------------------------------------------------------------------------------------------- real multiruns


def test_joblib_sweep_records_failures_then_a_rerun_finishes_only_them(session_root, tmp_path, warm_cache):
    sweep, features = tmp_path / "sweep", tmp_path / "features.npz"
    cells = ["method=tip_adapter", "shots=1,2", "seed=1", "dataset=synthetic,features", f"dataset.path={features}",
             "sweep.check_datasets=false"]  # the features file is missing: its cells run, and fail
    # features.num_workers=2 on purpose: inside joblib jobs DataLoader workers crash, the app must drop them to 0
    output = train_cli(session_root, sweep, "launcher=joblib", "hydra.launcher.n_jobs=2", "features.num_workers=2",
                       *cells, status=1)  # a sweep with failed cells exits 1, once every cell has run
    assert "2 done, 0 skipped, 2 failed" in output
    # a path in a folder name: the file's name, and a hash of the override that tells two such paths apart
    settings = f",dataset.path=features.npz~{sha256(f'dataset.path={features}'.encode()).hexdigest()[:8]}" \
               ",features.train_views=2"
    done = {k: cell(sweep, "tip_adapter", "synthetic", k, 1, settings=settings) for k in (1, 2)}
    failed = {k: cell(sweep, "tip_adapter", "features", k, 1, backbone="features:features", settings=settings)
              for k in (1, 2)}  # labelled by the file
    for folder in done.values():
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["config"]["features"]["num_workers"] == 0 and status(folder) == "done"
    for folder in failed.values():
        assert "does not exist" in json.loads((folder / "error.json").read_text())["error"]
        assert status(folder) == "failed" and not (folder / "metrics.json").exists()

    # every image of the shared cache was encoded once, whichever job needed it first
    for entry in (session_root / "cache" / "synthetic" / "tiny").iterdir():
        paths = [p for shard in entry.glob("shard-*") for p in json.loads((shard / "paths.json").read_text())]
        assert len(paths) == len(set(paths)), entry.name

    written = {k: (f / "metrics.json").stat().st_mtime_ns for k, f in done.items()}
    write_features_file(features)
    output = train_cli(session_root, sweep, *cells)  # the basic launcher now: same cells, same config hashes
    assert "2 done, 2 skipped, 0 failed" in output
    assert {k: (f / "metrics.json").stat().st_mtime_ns for k, f in done.items()} == written
    for folder in failed.values():
        assert status(folder) == "done" and not (folder / "error.json").exists()
        assert json.loads((folder / "metrics.json").read_text())["dataset"] == "features"


def test_resume_after_a_kill_with_two_sweeps_sharing_the_cells(session_root, tmp_path, warm_cache):
    sweep = tmp_path / "sweep"
    grid = ["method=zero_shot,tip_adapter", "shots=1,2", "seed=1"]
    cells = {(m, k, 1): cell(sweep, m, "synthetic", k, 1) for m in ("zero_shot", "tip_adapter") for k in (1, 2)}
    first = subprocess.Popen(train_command(sweep, *grid), cwd=REPO, env=cli_env(session_root),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any((f / "metrics.json").exists() for f in cells.values()):
            assert first.poll() is None and time.monotonic() < deadline, "the sweep ended before any cell finished"
            time.sleep(0.02)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # killed part-way: only this process group, which the test started
        first.wait()
    finished = {key: (f / "metrics.json").stat().st_mtime_ns for key, f in cells.items()
                if (f / "metrics.json").exists()}
    assert 0 < len(finished) < len(cells)

    # resume with two sweeps at once over the same cells: each missing cell runs exactly once, nothing is corrupted
    resumes = [subprocess.Popen(train_command(sweep, *grid), cwd=REPO, env=cli_env(session_root), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in resumes]
    assert [p.returncode for p in resumes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    log = "".join(outputs)
    for key, folder in cells.items():
        metrics = json.loads((folder / "metrics.json").read_text())
        name = metrics["run_name"]
        assert (metrics["method"], metrics["shots"], metrics["seed"]) == key
        if key in finished:
            assert (folder / "metrics.json").stat().st_mtime_ns == finished[key]  # not run again
            assert log.count(f"{name}: test/acc") == 0 and status(folder) == "skipped"
        else:
            assert log.count(f"{name}: test/acc") == 1, name  # run by exactly one of the two sweeps
            assert status(folder) in ("done", "skipped")
