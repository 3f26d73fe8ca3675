"""The generic readers: a user's class folders (split drawn once and saved) and the synthetic generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from clipadapt.config import DatasetSchema
from clipadapt.data import DatasetError, build_dataset, read_split_file


def dataset_config(**values):
    return OmegaConf.merge(OmegaConf.structured(DatasetSchema), values)


def folder_config(root: Path):
    return dataset_config(name="mine", kind="folder", root=str(root))


def make_class_folders(root: Path, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for n in range(count):
            Image.new("RGB", (8, 8), (n, 0, 0)).save(root / name / f"{n}.png")


def test_folder_split_is_drawn_once_and_saved(tmp_path):
    make_class_folders(tmp_path / "pets", {"cat": 10, "dog": 20})
    dataset = build_dataset(folder_config(tmp_path / "pets"), tmp_path)
    assert dataset.classnames == ["cat", "dog"]
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (15, 6, 9)  # 50/20/30 per class
    saved = tmp_path / "pets" / "split_clipadapt.json"
    assert saved.is_file()
    (tmp_path / "pets" / "dog" / "extra.png").write_bytes((tmp_path / "pets" / "dog" / "0.png").read_bytes())
    again = build_dataset(folder_config(tmp_path / "pets"), tmp_path)
    assert again.train == dataset.train and again.split_hash == dataset.split_hash  # the saved split is authoritative
    dataset.check_images_exist()


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no class folders"):
        build_dataset(folder_config(tmp_path / "empty"), tmp_path)


def test_synthetic_is_deterministic_and_complete(tmp_path):
    cfg = dataset_config(name="syn", kind="synthetic", num_classes=4, images_per_class=10, image_size=32)
    first = build_dataset(cfg, tmp_path / "a")
    second = build_dataset(cfg, tmp_path / "b")
    assert first.classnames == second.classnames and len(set(first.classnames)) == 4
    assert [i.path for i in first.test] == [i.path for i in second.test]
    assert (first.image_root / first.test[0].path).read_bytes() == (second.image_root / second.test[0].path).read_bytes()
    assert (len(first.train), len(first.val), len(first.test)) == (20, 8, 12)
    first.check_images_exist()


def test_malformed_split_file(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []}))
    with pytest.raises(DatasetError, match="is not a CoOp split"):
        read_split_file(path)
