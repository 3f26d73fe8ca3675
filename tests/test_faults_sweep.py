"""Nothing lost, nothing silent, through the public entrypoints: failed sweep cells fail the sweep, a sweep checks
its cells and datasets before running any, every run gets its own folder and says where it went.

The CLI runs share the session's data and feature cache (CLIPADAPT_HOME = the session root), on the tiny random-init
model and synthetic images; each test starts as few processes as it can.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from clipadapt.config import ConfigError, check_options, new_dir

REPO = Path(__file__).resolve().parents[1]
TINY = ["dataset=synthetic", "backbone=tiny", "logger=none", "features.train_views=0"]


def cli(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CLIPADAPT_HOME": str(root), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1", "CLIPADAPT_PROGRESS": "log", **env}
    for derived in ("CLIPADAPT_DATA", "CLIPADAPT_CACHE"):
        environment.pop(derived, None)
    return subprocess.run([sys.executable, "-m", "clipadapt.train", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)


def start(root: Path, *args: str) -> subprocess.Popen:
    environment = {**os.environ, "CLIPADAPT_HOME": str(root), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "clipadapt.train", *args], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "ERROR" in line]


def compose_hydra(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["paths.root=/tmp/clipadapt", *overrides],
                       return_hydra_config=True)


@pytest.fixture
def warm_cache(tiny_config):
    """The plain tiny-model features of the 1-shot draw, cached in this process: the CLI cells below only read."""
    import torch

    from clipadapt.run import image_task_data

    image_task_data(tiny_config("shots=1", "features.train_views=0"), False, torch.device("cpu"))


# --------------------------------------------------------------------------------------------- sweeps end right


@pytest.mark.parametrize("launcher", ["basic", "batched"])  # joblib: tests/test_sweep.py
def test_failed_cells_fail_the_sweep_after_all_ran_and_each_setting_keeps_its_folder(session_root, tmp_path,
                                                                                      warm_cache, launcher):
    sweep = tmp_path / "sweep"
    result = cli(session_root, "-m", *TINY, "method=tip_adapter", "shots=1", "method.alpha=1,2",
                 "dataset=synthetic,features", f"dataset.path={tmp_path / 'absent.npz'}", f"launcher={launcher}",
                 "sweep.check_datasets=false", f"hydra.sweep.dir={sweep}", CLIPADAPT_PROGRESS_INTERVAL="0")
    assert result.returncode == 1, result.stderr[-3000:]

    # every cell ran: the two alpha values of the synthetic dataset each kept a folder and a result
    done = sorted(sweep.glob("tip_adapter/tiny/synthetic/1shot/seed1,*/metrics.json"))
    assert [json.loads(path.read_text())["method_config"]["alpha"] for path in done] == [1.0, 2.0]
    assert all("method.alpha=" in path.parent.name for path in done)
    failed = sorted(sweep.glob("tip_adapter/*/features/1shot/seed1,*/error.json"))
    assert len(failed) == 2

    lines = result.stderr.strip().splitlines()
    assert f"sweep {sweep}: 2 done, 0 skipped, 2 failed" in "\n".join(lines[-6:])
    assert f"report: python -m clipadapt.report {sweep}" in "\n".join(lines[-6:])
    assert "2 cell(s) failed" in lines[-3]
    assert {line.split(": ", 1)[0].strip() for line in lines[-2:]} == {str(path) for path in failed}  # last lines
    assert all("does not exist" in line for line in lines[-2:])
    assert "sweep: 4/4 cell (100%)" in result.stderr and "failed=2" in result.stderr  # progress, as log lines


def test_a_sweep_checks_options_and_datasets_before_running_any_cell(session_root, tmp_path):
    sweep = tmp_path / "sweep"
    bad_option = cli(session_root, "-m", *TINY, "method=zero_shot", "shots=1,0", "protocol.selection=last,best",
                     f"hydra.sweep.dir={sweep}")
    assert bad_option.returncode == 2, bad_option.stderr[-3000:]
    errors = error_lines(bad_option.stderr)
    assert any("shots=0: must be >= 1" in line for line in errors)
    assert any("protocol.selection=best: use one of last, val, test" in line for line in errors)
    assert len(errors) == 4  # shots, selection, both (one cell has the two), and "nothing was run"
    assert "Traceback" not in bad_option.stderr and not list(sweep.rglob("status.json"))

    empty = tmp_path / "empty"  # a data root without the two benchmarks (nothing is run: no cache needed)
    missing = cli(empty, "-m", *TINY, "method=zero_shot", "shots=1", "dataset=synthetic,eurosat,dtd",
                  f"hydra.sweep.dir={sweep}")
    assert missing.returncode == 2, missing.stderr[-3000:]
    errors = error_lines(missing.stderr)
    assert [line.split("dataset ", 1)[1].split(":")[0] for line in errors[:2]] == ["eurosat", "dtd"]
    assert "python -m clipadapt.prepare eurosat" in errors[0] and "sweep.check_datasets=false" in errors[2]
    assert "nothing was run" in errors[-1] and not list(sweep.rglob("status.json"))


# ---------------------------------------------------------------------------------------------- single runs


def test_runs_started_together_get_their_own_folders_and_say_where(session_root, tmp_path, warm_cache):
    # the same folder name for both, as two runs of one config started in the same second get from the default
    folder = f"hydra.run.dir=${{clipadapt.new_dir:{tmp_path}/run}}"
    runs = [start(session_root, *TINY, "method=zero_shot", "shots=1", folder) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    folders = sorted(tmp_path.glob("run*"))
    assert [path.name for path in folders] == ["run", "run-2"]
    for path in folders:
        assert json.loads((path / "metrics.json").read_text())["method"] == "zero_shot"
    last_lines = [output.strip().splitlines()[-1] for output in outputs]  # each run's: its numbers and folder
    assert all("zero_shot-synthetic-1s-tiny-s1: test/acc " in line for line in last_lines)
    assert {line.rsplit(" in ", 1)[1] for line in last_lines} == {str(path) for path in folders}


def test_a_run_whose_folder_another_run_holds_fails_instead_of_exiting_0(session_root, tmp_path):
    from filelock import FileLock

    (tmp_path / "out").mkdir()
    with FileLock(str(tmp_path / "out" / ".cell.lock")):  # another run is working in this folder
        result = cli(session_root, *TINY, "method=zero_shot", "shots=1", f"hydra.run.dir={tmp_path}/out")
    assert result.returncode == 2
    assert f"{tmp_path / 'out'} is in use by another run, still running" in error_lines(result.stderr)[-1]


def test_a_bad_option_is_one_line_naming_the_valid_ones(session_root, tmp_path):
    result = cli(session_root, *TINY, "method=zero_shot", "features.dtype=float8", f"hydra.run.dir={tmp_path}/out")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [line for line in result.stderr.splitlines() if "features.dtype" in line]
    [line] = error_lines(result.stderr)
    assert "ConfigError: features.dtype=float8: use one of float16, float32" in line
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("override,message", [
    ("features.dtype=float8", "features.dtype=float8: use one of float16, float32"),
    ("protocol.selection=best", "protocol.selection=best: use one of last, val, test"),
    ("protocol.val_policy=all", "protocol.val_policy=all: use one of none, few_shot, full"),
    ("protocol.task=zero_shot", "protocol.task=zero_shot: use one of few_shot, base_to_new, cross_dataset, "
                                "domain_generalisation"),
    ("features.train_views=-1", "features.train_views=-1: must be >= 0"),
    ("shots=0", "shots=0: must be >= 1"),
    ("device=gpu", "device=gpu: use auto, cpu, cuda or cuda:N"),
    ("logger.mode=online_only", "logger.mode=online_only: use one of null, online, offline, disabled"),
    ("backbone.dense=mean", "backbone.dense=mean: use one of attention, value"),
    ("method.train.warmup_type=cubic", "method.train.warmup_type=cubic: use one of constant, linear"),  # a method's
])
def test_every_enumerated_or_bounded_option_is_checked(tiny_config, override, message):
    check_options(tiny_config("method=zero_shot"))  # the defaults pass
    with pytest.raises(ConfigError) as error:
        check_options(tiny_config("method=zero_shot", override))
    assert str(error.value) == message


def test_device_accepts_its_documented_forms(tiny_config):
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        check_options(tiny_config("method=zero_shot", f"device={device}"))


def test_the_options_tables_match_what_the_code_accepts():
    from dataclasses import fields

    from clipadapt.config import DatasetSchema, ProtocolSchema
    from clipadapt.data.registry import READERS
    from clipadapt.protocols import TASKS

    assert {spec.name: spec.metadata.get("choices") for spec in fields(ProtocolSchema)}["task"] == TASKS
    kinds = {spec.name: spec.metadata.get("choices") for spec in fields(DatasetSchema)}["kind"]
    assert set(kinds) == {*READERS, "features"}  # a features file is read by run.py, not by an image reader


def test_schemas_are_no_group_options():
    help_text = subprocess.run([sys.executable, "-m", "clipadapt.train", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120).stdout
    groups = {line.split(":")[0]: line.split(": ", 1)[1].split(", ") for line in help_text.splitlines()
              if line.split(": ")[0] in ("backbone", "dataset", "logger") and ": " in line}
    assert len(groups) == 3 and all("schema" not in options for options in groups.values())
    with pytest.raises(Exception, match="Could not find 'backbone/schema'"):
        compose_hydra("backbone=schema")


# ----------------------------------------------------------------------------------------------- names, folders


def test_folder_and_run_names():
    grid = compose_hydra("+sweep=grid", "launcher=joblib", "logger=none", "device=cpu")
    assert grid.hydra.sweep.subdir == "tip_adapter_f/rn50/eurosat/16shot/seed1"  # the grid folders are unchanged
    assert grid.run_name == "tip_adapter_f-eurosat-16s-rn50-s1"
    setting = compose_hydra("method=clip_adapter", "method.train.epochs=20", "features.num_workers=0")
    assert setting.hydra.sweep.subdir == "clip_adapter/rn50/eurosat/16shot/seed1,method.train.epochs=20"
    task = compose_hydra("protocol.task=base_to_new")
    assert task.run_name == "tip_adapter_f-eurosat-16s-rn50-s1-base_to_new"
    path = compose_hydra("dataset=features", "dataset.path='/data/a b.npz'")  # no folder separator in a folder name
    assert "/" not in path.hydra.sweep.subdir.split("seed1", 1)[1]
    other = compose_hydra("dataset=features", "dataset.path='/elsewhere/a_b.npz'")  # the same once made safe: apart
    assert path.hydra.sweep.subdir != other.hydra.sweep.subdir
    assert "clipadapt.new_dir" in OmegaConf_str(compose_hydra().hydra.run, "dir")


def OmegaConf_str(node, key: str) -> str:  # noqa: N802 - the unresolved interpolation text of a config value
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=False)[key]


def test_new_dir_takes_the_next_free_name(tmp_path):
    assert new_dir(str(tmp_path / "a" / "t")) == str(tmp_path / "a" / "t")
    assert new_dir(str(tmp_path / "a" / "t")) == str(tmp_path / "a" / "t-2")
    assert new_dir(str(tmp_path / "a" / "t")) == str(tmp_path / "a" / "t-3")


# ---------------------------------------------------------------------------------------------- module layout


def test_shared_helpers_sit_below_the_modules_that_use_them():
    code = ("import sys, clipadapt.files, clipadapt.data.benchmarks; "
            "print(sorted(m for m in sys.modules if m.startswith('clipadapt.') and m in "
            "('clipadapt.app', 'clipadapt.run', 'clipadapt.train')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"  # the dataset readers no longer import the entrypoints (no cycle)
    source = (REPO / "src" / "clipadapt" / "files.py").read_text()
    assert "from clipadapt" not in source and "import clipadapt" not in source


def test_write_json_atomic_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    import errno

    from clipadapt.files import write_json_atomic

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match=f"could not write {tmp_path / 'm.json'}: No space left on device"):
        write_json_atomic(tmp_path / "m.json", {"a": np.float64(1.0)})
    assert list(tmp_path.iterdir()) == []
