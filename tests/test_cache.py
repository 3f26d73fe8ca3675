"""The feature cache: computed once, atomic shards, corruption detected, concurrent jobs share one computation."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from clipadapt import features
from clipadapt.features import CacheEntry, FeatureExtractor, View, backbone_key


def fake_features(paths: list[str]) -> np.ndarray:
    """Deterministic per path: row i depends only on paths[i]."""
    return np.stack([np.full((1, 4), sum(map(ord, p)), dtype=np.float16) for p in paths])


class Counting:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, paths):
        self.calls.append(list(paths))
        return fake_features(paths)


def test_computes_only_missing_images(tmp_path):
    entry, compute = CacheEntry(tmp_path / "e", {"k": 1}), Counting()
    first = entry.get(["a", "b"], compute)
    second = entry.get(["b", "c", "a"], compute)
    third = entry.get(["c", "a", "b"], compute)
    assert compute.calls == [["a", "b"], ["c"]]
    np.testing.assert_array_equal(second, fake_features(["b", "c", "a"]))
    np.testing.assert_array_equal(third, fake_features(["c", "a", "b"]))
    np.testing.assert_array_equal(first, fake_features(["a", "b"]))


def test_whole_shard_in_order_stays_memory_mapped(tmp_path):
    entry = CacheEntry(tmp_path / "e", {"k": 1})
    entry.get(["a", "b", "c"], fake_features)
    assert isinstance(entry.get(["a", "b", "c"], fake_features), np.memmap)
    assert not isinstance(entry.get(["c", "a"], fake_features), np.memmap)


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "delete_meta"])
def test_corrupt_shard_is_recomputed(tmp_path, damage):
    entry, compute = CacheEntry(tmp_path / "e", {"k": 1}), Counting()
    entry.get(["a", "b"], compute)
    shard = next((tmp_path / "e").glob("shard-*"))
    array_file = shard / "features.npy"
    if damage == "truncate":
        array_file.write_bytes(array_file.read_bytes()[:-6])
    elif damage == "overwrite":
        data = bytearray(array_file.read_bytes())
        data[-4:] = b"\x00\x7c\x00\x7c"
        array_file.write_bytes(bytes(data))
    else:
        (shard / "meta.json").unlink()  # an interrupted write: never renamed into place in practice
    features._VERIFIED.clear()  # as in a new process: a shard is hashed once per process
    np.testing.assert_array_equal(entry.get(["a", "b"], compute), fake_features(["a", "b"]))
    assert compute.calls == [["a", "b"], ["a", "b"]]


def _worker(folder: str, log: str) -> None:
    def compute(paths):
        with open(log, "a") as f:
            f.write(",".join(paths) + "\n")
        return fake_features(paths)

    CacheEntry(Path(folder), {"k": 1}).get([f"img{i}" for i in range(50)], compute)


def test_concurrent_jobs_compute_once(tmp_path):
    log = tmp_path / "computed.txt"
    context = multiprocessing.get_context("spawn")
    jobs = [context.Process(target=_worker, args=(str(tmp_path / "e"), str(log))) for _ in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 1  # one job computed, the others waited and reused
    np.testing.assert_array_equal(CacheEntry(tmp_path / "e", {"k": 1}).get(["img7"], fake_features),
                                  fake_features(["img7"]))


def test_keys_separate_backbones_views_and_weights(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"1")

    def folder(model, pretrained, view):
        extractor = FeatureExtractor(tmp_path, "ds", tmp_path, "bb", backbone_key(model, pretrained, "attention"), None)
        return extractor.entry(view.tag, "global").folder

    plain, augment = View("plain"), View("augment", 10, 0)
    assert folder("RN50", "openai", plain) == folder("RN50", "openai", plain)
    assert len({folder("RN50", "openai", plain), folder("RN101", "openai", plain),
                folder("RN50", "openai", augment), folder("RN50", str(weights), plain)}) == 4
    before = folder("RN50", str(weights), plain)
    weights.write_bytes(b"22")  # a changed local weights file re-keys the cache
    assert folder("RN50", str(weights), plain) != before


def test_augmented_views_do_not_depend_on_batching(tiny_config, tmp_path):
    from clipadapt.backbone import ClipBackbone
    from clipadapt.data import build_dataset

    cfg = tiny_config()
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    backbone = ClipBackbone("clipadapt-tiny-vit")
    paths = [i.path for i in dataset.train[:3]]

    def extractor(root):
        return FeatureExtractor(root, "synthetic", dataset.image_root, "tiny", backbone_key("x", None, "attention"),
                                lambda: backbone, batch_size=2, num_workers=0)

    view = View("augment", 3, 0)
    together = extractor(tmp_path / "a").images(paths, [0, 0, 0], view).image
    alone = extractor(tmp_path / "b").images(paths[2:], [0], view).image
    assert together.shape == (3, 3, 64)
    np.testing.assert_allclose(np.asarray(together[2:], np.float32), np.asarray(alone, np.float32), atol=1e-3)
    assert not np.allclose(np.asarray(together[0, 0], np.float32), np.asarray(together[0, 1], np.float32))


def test_augmentation_recipes_are_cached_side_by_side(tiny_config):
    """Tip-Adapter's views (crop scale 0.5-1) and Dassl's (0.08-1) under their own keys, both recorded."""
    import torch
    from torchvision import transforms

    from clipadapt.backbone import ClipBackbone
    from clipadapt.run import image_task_data

    cfg = tiny_config("shots=2")
    data = {recipe: image_task_data(cfg, False, torch.device("cpu"), augmentation=recipe)
            for recipe in ("tip", "dassl")}
    assert data["tip"].provenance["augmentation"].startswith("tip: RandomResizedCrop(scale=(0.5, 1), bicubic)")
    assert data["dassl"].provenance["augmentation"].startswith("dassl: RandomResizedCrop(scale=(0.08, 1), bicubic)")
    folders = {p.name.rsplit("-", 1)[0] for p in (Path(cfg.paths.cache_dir) / "synthetic" / "tiny").iterdir()}
    assert {"augment2x-tip-s0-global", "augment2x-dassl-s0-global"} <= folders
    tip, dassl = (np.asarray(data[r].train.image[:, 1:], np.float32) for r in ("tip", "dassl"))
    assert not np.allclose(tip, dassl)  # other crops
    np.testing.assert_array_equal(data["tip"].train.image[:, 0], data["dassl"].train.image[:, 0])  # one plain view
    backbone = ClipBackbone("clipadapt-tiny-vit")
    crop = features.augmentation_for(backbone.preprocess, backbone.image_size, "dassl").transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.interpolation == transforms.InterpolationMode.BICUBIC


def test_methods_declare_their_reference_augmentation():
    from clipadapt.methods import METHODS

    dassl = {name for name, method in METHODS.items() if method.augmentation == "dassl"}
    assert dassl == {"coop", "clip_adapter", "calip_fs"}
    assert all(method.augmentation in features.AUGMENTATIONS for method in METHODS.values())
    with pytest.raises(ValueError, match="unknown augmentation recipe 'simclr'"):
        View("augment", 2, 0, "simclr")


def test_global_features_are_cached_raw(tiny_config, tmp_path):
    """CLIP's own output (Tip-Adapter averages raw views), not unit rows; dense tokens stay unit rows."""
    import torch
    from PIL import Image

    from clipadapt.backbone import ClipBackbone
    from clipadapt.data import build_dataset

    cfg = tiny_config()
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    backbone = ClipBackbone("clipadapt-tiny-vit")
    extractor = FeatureExtractor(tmp_path, "synthetic", dataset.image_root, "tiny",
                                 backbone_key("x", None, "attention"), lambda: backbone, batch_size=2, num_workers=0,
                                 dtype="float32")
    paths = [i.path for i in dataset.train[:3]]
    cached = extractor.images(paths, [0, 0, 0], View("plain"), dense=True)

    def pixels(path: str) -> torch.Tensor:
        with Image.open(dataset.image_root / path) as image:
            return backbone.preprocess(image.convert("RGB"))

    with torch.no_grad():
        expected = backbone.clip.encode_image(torch.stack([pixels(p) for p in paths])).numpy()
    np.testing.assert_allclose(cached.image[:, 0], expected, atol=1e-5)
    assert not np.allclose(np.linalg.norm(cached.image[:, 0], axis=-1), 1, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(cached.dense[:, 0], axis=-1), 1, atol=1e-5)
