"""Data and protocol faults through the public entrypoints: where the val set comes from (ImageNet's honest val draw,
val_policy=full), classes short of K images, bad features files and their labels, broken folder datasets.

Each case ends in a correct, fully recorded result or a one-line error naming the class, key or file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset_trees as trees
from clipadapt.data import DatasetError, build_dataset
from clipadapt.data.registry import ImageReadError
from clipadapt.run import run
from conftest import TINY, compose_config

REPO = Path(__file__).resolve().parents[1]


def cli(home: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPADAPT_HOME": str(home), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "clipadapt.train", "backbone=tiny", "logger=none", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


# ------------------------------------------------------------------------------------------ the val set searches see


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A miniature ImageNet with 6 train images per class (room for a 2-shot train draw and a 2-image val draw), its
    features cached once for the module."""
    root = tmp_path_factory.mktemp("imagenet")
    trees.imagenet_tree(root / "data", {"train": 6, "val": 2})
    return lambda *overrides: compose_config(["backbone=tiny", "dataset=imagenet", "logger=none", "features.num_workers=0",
                                              "features.train_views=1", "shots=2", *overrides], root)


@pytest.mark.parametrize("method", ["tip_adapter", "calip"])
def test_imagenet_searches_run_on_a_val_draw_from_train_images_outside_the_train_draw(imagenet, tmp_path, method):
    metrics = run(imagenet(f"method={method}"), tmp_path / "out")
    train, val = metrics["draw"]["train"], metrics["draw"]["val"]
    assert len(train) == 2 * 6 and len(val) == 2 * 6  # min(K, 4) = 2 per class
    assert all(path.startswith("train/") for path in val) and not set(val) & set(train)
    assert metrics["protocol"]["val_source"] == "train_outside_draw" and metrics["protocol"]["leaky"] is False
    assert "val_acc" in metrics["chosen"]  # the search ran, on that draw
    if method == "calip":
        assert metrics["chosen"]["beta_source"] == "search" and metrics["protocol"]["test_tuned"] == []


def test_imagenet_val_draw_continues_the_seeded_stream(imagenet, tmp_path):
    cfg = imagenet("method=zero_shot", "seed=3")
    first, again = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    other = run(imagenet("method=zero_shot", "seed=4"), tmp_path / "c")
    assert first["draw"] == again["draw"] and first["protocol"]["draw_hash"] == again["protocol"]["draw_hash"]
    assert first["draw"]["val"] != other["draw"]["val"]
    imported = run(imagenet("method=zero_shot", "seed=4", f"dataset.draw_file={tmp_path / 'a' / 'metrics.json'}"),
                   tmp_path / "d")  # a run's metrics.json is a draw file: its val images come from train too
    assert imported["draw"] == first["draw"] and imported["protocol"]["val_source"] == "train_outside_draw"


def test_val_policy_full_searches_on_the_whole_val_split_and_is_flagged(tiny_config, tmp_path):
    cfg = tiny_config("method=tip_adapter", "shots=2", "features.train_views=0", "protocol.val_policy=full")
    metrics = run(cfg, tmp_path)
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    assert metrics["draw"]["val"] == [item.path for item in dataset.val]  # all of it, not 2 per class
    assert metrics["protocol"]["val_source"] == "val_split_full" and metrics["protocol"]["leaky"] is True
    assert "val_acc" in metrics["chosen"]


def test_val_policy_full_is_refused_where_there_is_no_val_split(imagenet, tmp_path):
    with pytest.raises(DatasetError, match="protocol.val_policy=full searches on imagenet's val split, and it has none: "
                                           "use protocol.val_policy=few_shot") as error:
        run(imagenet("method=tip_adapter", "protocol.val_policy=full"), tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out" / "metrics.json").exists()


# ------------------------------------------------------------------------------------------ more shots than images


def test_more_shots_than_images_is_refused_naming_the_class_and_counts(tiny_config, tmp_path):
    # synthetic classes hold 12 train images
    with pytest.raises(DatasetError, match=r"synthetic: class '.+' has 12 train images, fewer than shots=16 "
                                           r"\(and 9 more classes\): lower shots, or set protocol.allow_fewer_shots=true"):
        run(tiny_config("method=zero_shot", "shots=16"), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_allow_fewer_shots_takes_what_there_is_and_records_it(tiny_config, tmp_path):
    metrics = run(tiny_config("method=zero_shot", "shots=16", "protocol.allow_fewer_shots=true"), tmp_path)
    assert len(metrics["draw"]["train"]) == 10 * 12
    fewer = metrics["protocol"]["fewer_shots"]
    assert len(fewer) == 10 and all(counts == {"train": 12} for counts in fewer.values())  # val: 4 of 5, not short
    assert metrics["protocol"]["allow_fewer_shots"] is True


def test_allow_fewer_shots_must_be_a_boolean(tmp_path):
    result = cli(tmp_path, "dataset=synthetic", "protocol.allow_fewer_shots=maybe", f"hydra.run.dir={tmp_path}/out")
    assert result.returncode != 0 and "allow_fewer_shots" in result.stderr


# ------------------------------------------------------------------------------------------ features files


def features_file(path: Path, **changes) -> Path:
    rng = np.random.default_rng(0)
    data = {"train_features": rng.normal(size=(16, 8)), "train_labels": np.repeat(np.arange(4), 4),
            "val_features": rng.normal(size=(8, 8)), "val_labels": np.repeat(np.arange(4), 2),
            "test_features": rng.normal(size=(12, 8)), "test_labels": np.repeat(np.arange(4), 3),
            "text_features": rng.normal(size=(4, 8)), "test_dense": rng.normal(size=(12, 3, 8))}
    for key, (row, value) in changes.items():
        data[key][row] = value
    np.savez(path, **data)
    return path


@pytest.mark.parametrize("key,value", [("text_features", np.nan), ("train_features", np.inf),
                                       ("val_features", -np.inf), ("test_dense", np.nan)])
def test_nan_or_inf_in_any_key_of_a_features_file_is_refused(tiny_config, tmp_path, key, value):
    path = features_file(tmp_path / "bad.npz", **{key: (1, value)})
    with pytest.raises(DatasetError, match=rf"features file .*bad.npz: {key} holds \d+ NaN or Inf values") as error:
        run(tiny_config("dataset=features", f"dataset.path={path}", "method=zero_shot", "shots=2"), tmp_path / "out")
    assert "\n" not in str(error.value)


def test_a_features_file_run_is_labelled_by_the_file_and_records_its_draw(tmp_path):
    path = features_file(tmp_path / "siglip_feats.npz")
    result = cli(tmp_path, "dataset=features", f"dataset.path={path}", "method=tip_adapter", "shots=2",
                 f"hydra.run.dir={tmp_path}/runs/${{run_name}}")
    assert result.returncode == 0, result.stderr[-2000:]
    (folder,) = (tmp_path / "runs").iterdir()
    assert "features:siglip_feats" in folder.name and "rn50" not in folder.name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["backbone"] == "features:siglip_feats" == metrics["config"]["backbone"]["name"]
    assert metrics["config"]["backbone"]["pretrained"] is None  # no CLIP weights named in the W&B config either
    train, val = metrics["draw"]["train"], metrics["draw"]["val"]
    labels = np.repeat(np.arange(4), 4)
    assert len(train) == 2 * 4 and len(val) == 2 * 4 and len(set(train)) == len(train)
    assert np.bincount(labels[[int(row) for row in train]]).tolist() == [2, 2, 2, 2]  # rows of the file, 2 per class


def test_a_features_run_without_a_path_says_so(tiny_config, tmp_path):
    with pytest.raises(DatasetError, match=r"dataset=features needs dataset.path="):
        run(tiny_config("dataset=features", "method=zero_shot"), tmp_path)


# ------------------------------------------------------------------------------------------ folder datasets


def class_folders(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            Image.new("RGB", (16, 16), (40 * n % 256, 90, 20)).save(root / name / f"{n}.png")
    return root


def folder_config(tmp_path: Path, root: Path, *overrides: str):
    return compose_config([*TINY, "dataset=folder", f"dataset.root={root}", "method=zero_shot", "shots=2", *overrides],
                          tmp_path)


def test_folder_dataset_needs_a_root_and_writes_nothing_without_one(tmp_path):
    cfg = compose_config([*TINY, "dataset=folder", "method=zero_shot"], tmp_path)
    with pytest.raises(DatasetError, match=r"dataset=folder needs dataset.root=<a folder of class folders>"):
        run(cfg, tmp_path / "out")
    assert not list(tmp_path.rglob("split_clipadapt.json"))  # it used to fall back to the data root and write one


def test_an_empty_class_folder_is_named(tmp_path):
    root = class_folders(tmp_path / "mine", {"cat": 10, "dog": 10})
    (root / "bird").mkdir()
    with pytest.raises(DatasetError, match=rf"class folder {root / 'bird'} holds no images"):
        run(folder_config(tmp_path, root), tmp_path / "out")
    assert not (root / "split_clipadapt.json").exists()


def test_a_class_added_after_the_split_was_saved_is_an_error(tmp_path):
    root = class_folders(tmp_path / "mine", {"cat": 10, "dog": 10})
    run(folder_config(tmp_path, root), tmp_path / "first")
    class_folders(root, {"bird": 10})
    with pytest.raises(DatasetError, match=rf"lacks, e.g. \['bird'\]: delete that file to re-make the split"):
        run(folder_config(tmp_path, root), tmp_path / "second")


def test_a_corrupt_image_is_named_even_from_a_dataloader_worker(tmp_path):
    root = class_folders(tmp_path / "mine", {"cat": 10, "dog": 10})
    cfg = folder_config(tmp_path, root, "features.num_workers=1")  # torch re-raises a worker's error in its own words
    build_dataset(cfg.dataset, tmp_path)  # saves the split
    split = json.loads((root / "split_clipadapt.json").read_text())
    broken = root / split["test"][0][0]
    broken.write_bytes(b"not a png at all")
    with pytest.raises(ImageReadError) as error:
        run(cfg, tmp_path / "out")
    assert str(error.value).startswith(f"image {broken} cannot be decoded") and "\n" not in str(error.value)
