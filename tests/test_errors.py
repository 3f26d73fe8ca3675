"""Bad input: a clear one-line error that says what to do, and nothing lost or overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipadapt.data import DatasetError
from clipadapt.run import run

REPO = Path(__file__).resolve().parents[1]


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m clipadapt.train` in its own CLIPADAPT_HOME; `args`: flags (`-m`, `--cfg job`), then overrides."""
    env = {**os.environ, "CLIPADAPT_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **env}
    command = [sys.executable, "-m", "clipadapt.train", *args, "logger=none", f"hydra.run.dir={tmp_path}/out",
               f"hydra.sweep.dir={tmp_path}/out"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_missing_data_root_is_one_line_naming_the_fix(tmp_path):
    result = cli(tmp_path, "dataset=eurosat", "backbone=tiny")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert "eurosat" in errors[0] and "python -m clipadapt.prepare eurosat" in errors[0]
    assert json.loads((tmp_path / "out" / "error.json").read_text())["error"].startswith("DatasetError")
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("args", [
    ["method=tip_adaptr"], ["-m", "method=coop,tip_adaptr"], ["--cfg", "job", "method=tip_adaptr"],
])
def test_a_config_that_does_not_compose_ends_in_one_line(tmp_path, args):
    """Run, sweep or print: Hydra's report of many lines becomes one, exit status 2, nothing written."""
    result = cli(tmp_path, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("ConfigError: method=tip_adaptr: no such option; did you mean tip_adapter? (")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["clipadapt-train", "clipadapt-extract"])
def test_console_scripts_are_the_same_commands(tmp_path, script):
    """pyproject's console scripts call what `python -m` does (app.as_command), so a typo ends the same way."""
    env = {**os.environ, "CLIPADAPT_HOME": str(tmp_path)}
    result = subprocess.run([str(Path(sys.executable).parent / script), "dataset=euroSAT"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("ConfigError: dataset=euroSAT: no such option; did you mean eurosat? (")


def test_hydra_full_error_still_shows_hydras_traceback(tmp_path):
    result = cli(tmp_path, "methd=coop", HYDRA_FULL_ERROR="1")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigCompositionException: Could not override 'methd'" in result.stderr


def test_missing_split_file_names_file_and_source(tiny_config, tmp_path):
    cfg = tiny_config("dataset=eurosat")
    (Path(cfg.paths.data_root) / "eurosat" / "2750").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"split_zhou_EuroSAT.json is missing \(source: https://"):
        run(cfg, tmp_path)


def test_listed_images_missing_on_disk_are_counted(tiny_config, tmp_path):
    from clipadapt.data import build_dataset

    cfg = tiny_config()
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    dataset.image_root = tmp_path  # nothing there
    with pytest.raises(DatasetError, match=rf"{len(dataset.train) + len(dataset.val) + len(dataset.test)} listed images are missing"):
        dataset.check_images_exist()


def write_features(path: Path, **changes) -> Path:
    rng = np.random.default_rng(0)
    data = {"train_features": rng.normal(size=(20, 8)), "train_labels": np.repeat(np.arange(4), 5),
            "val_features": rng.normal(size=(8, 8)), "val_labels": np.repeat(np.arange(4), 2),
            "test_features": rng.normal(size=(12, 8)), "test_labels": np.repeat(np.arange(4), 3),
            "text_features": rng.normal(size=(4, 8))}
    data.update(changes)
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return path


@pytest.mark.parametrize("changes,message", [
    ({"text_features": None}, r"lacks keys \['text_features'\]"),
    ({"test_labels": np.zeros(5, dtype=int)}, r"test_labels must have shape \(12,\)"),
    ({"val_features": np.zeros((8, 6))}, "val_features width 6 != text_features width 8"),
    ({"train_labels": np.full(20, 9)}, r"train_labels must lie in 0..3"),
])
def test_bad_features_file(tiny_config, tmp_path, changes, message):
    path = write_features(tmp_path / "f.npz", **changes)
    with pytest.raises(DatasetError, match=message):
        run(tiny_config("dataset=features", f"dataset.path={path}", "method=zero_shot"), tmp_path / "out")


def test_features_file_runs_and_failure_overwrites_nothing(tiny_config, tmp_path):
    good = write_features(tmp_path / "good.npz")
    metrics = run(tiny_config("dataset=features", f"dataset.path={good}", "method=tip_adapter", "shots=2"), tmp_path / "out")
    assert metrics["num_test"] == 12 and len(metrics["protocol"]["draw_hash"]) == 16
    before = (tmp_path / "out" / "metrics.json").read_bytes()
    with pytest.raises(DatasetError):
        run(tiny_config("dataset=features", f"dataset.path={tmp_path / 'missing.npz'}"), tmp_path / "out")
    assert (tmp_path / "out" / "metrics.json").read_bytes() == before


def test_features_file_as_safetensors(tiny_config, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    save_file({"train_features": rng.normal(size=(8, 4)).astype(np.float32), "train_labels": np.repeat(np.arange(2), 4),
               "test_features": rng.normal(size=(6, 4)).astype(np.float32), "test_labels": np.repeat(np.arange(2), 3),
               "text_features": rng.normal(size=(2, 4)).astype(np.float32)}, str(tmp_path / "f.safetensors"))
    metrics = run(tiny_config("dataset=features", f"dataset.path={tmp_path / 'f.safetensors'}", "method=zero_shot",
                              "shots=4"), tmp_path)  # 4 train images per class
    assert metrics["num_test"] == 6


def test_device_cuda_without_cuda_is_a_clear_error(tiny_config, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available here: use device=auto or device=cpu"):
        run(tiny_config("device=cuda", "method=zero_shot"), tmp_path)
