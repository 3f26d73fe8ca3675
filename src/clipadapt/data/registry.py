"""The dataset registry and the readers every benchmark dataset builds on.

A reader turns a dataset config into an `ImageDataset`: class names, prompt templates, and train/val/test lists of
(path relative to the image folder, label, class name) -- the shape of CoOp's split files, which are authoritative.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


class DatasetError(RuntimeError):
    """Data that cannot be read as configured; the message says what to fetch or fix."""


class ImageReadError(DatasetError):
    """An image file that does not decode. Raised inside a DataLoader worker, it reaches the main process rebuilt
    from torch's report ("Caught ImageReadError in DataLoader worker ... Original Traceback ..."): keep only the
    original one-line message, which names the file."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        lines = [line for line in message.splitlines() if marker in line]
        super().__init__(lines[-1].split(marker, 1)[1] if message.startswith("Caught ") and lines else message)


@dataclass(frozen=True)
class Item:
    path: str  # relative to ImageDataset.image_root
    label: int
    classname: str


@dataclass
class ImageDataset:
    name: str
    image_root: Path
    classnames: list[str]
    templates: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    split_hash: str  # content hash of the split file the lists came from
    val_from_train: bool = False  # no val split (ImageNet): the val draw comes from train images outside the train draw

    def check_images_exist(self, items: list[Item] | None = None) -> None:
        """Every listed image (or every one of `items`) is a file; else one error with the count and a few paths."""
        items = self.train + self.val + self.test if items is None else items
        missing = [i.path for i in items if not (self.image_root / i.path).is_file()]
        if missing:
            raise DatasetError(
                f"{self.name}: {len(missing)} listed images are missing under {self.image_root}, "
                f"e.g. {', '.join(missing[:3])}: re-run `python -m clipadapt.prepare {self.name}`"
            )


Reader = Callable[[DictConfig, Path], ImageDataset]
READERS: dict[str, Reader] = {}


def register_reader(kind: str) -> Callable[[Reader], Reader]:
    def add(reader: Reader) -> Reader:
        READERS[kind] = reader
        return reader

    return add


def build_dataset(cfg: DictConfig, data_root: Path) -> ImageDataset:
    if cfg.kind not in READERS:
        raise DatasetError(f"unknown dataset kind {cfg.kind!r}: use one of {sorted(READERS)}")
    templates = selected_templates(cfg)  # a bad template set fails before any reading
    dataset = READERS[cfg.kind](cfg, Path(data_root))
    dataset.templates = templates
    return dataset


def selected_templates(cfg: DictConfig) -> list[str]:
    """`templates`, or the named set `template_sets[template_set]` (ImageNet's 7-template ensemble)."""
    name = cfg.get("template_set")
    if name is None:
        return list(cfg.templates)
    sets = cfg.get("template_sets") or {}
    if name not in sets:
        raise DatasetError(f"{cfg.name} has no template set {name!r}: use dataset.template_set=null or one of {sorted(sets)}")
    return list(sets[name])


def dataset_root(cfg: DictConfig, data_root: Path) -> Path:
    return (Path(data_root) / cfg.root).resolve()


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_split_file(path: Path, source: str | None = None) -> dict[str, list[Item]]:
    """A CoOp split file: {"train"|"val"|"test": [[relative path, label, class name], ...]}."""
    path = Path(path)
    if not path.is_file():
        where = f" (source: {source})" if source else ""
        raise DatasetError(f"split file {path} is missing{where}: run `python -m clipadapt.prepare` or put it there")
    try:
        raw = json.loads(path.read_text())
        return {split: [Item(str(p), int(label), str(name)) for p, label, name in raw[split]] for split in ("train", "val", "test")}
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"split file {path} is not a CoOp split (train/val/test lists of [path, label, name]): {error}") from error


def classnames_of(*splits: list[Item]) -> list[str]:
    names: dict[int, str] = {}
    for items in splits:
        for item in items:
            names.setdefault(item.label, item.classname.replace("_", " "))
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"labels must be 0..K-1 with no gaps, got {sorted(names)[:10]}...")
    return [names[k] for k in range(len(names))]


@register_reader("split_file")
def read_split_dataset(cfg: DictConfig, data_root: Path) -> ImageDataset:
    root = dataset_root(cfg, data_root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} is missing: run `python -m clipadapt.prepare {cfg.name}` or set paths.data_root")
    split_path = root / cfg.split_file
    split = read_split_file(split_path, cfg.split_url)
    return ImageDataset(
        name=cfg.name,
        image_root=root / cfg.image_dir,
        classnames=classnames_of(split["train"], split["val"], split["test"]),
        templates=list(cfg.templates),
        split_hash=file_digest(split_path),
        **split,
    )


@register_reader("folder")
def read_folder_dataset(cfg: DictConfig, data_root: Path) -> ImageDataset:
    """A user's class-per-folder images; a 50/20/30 split (CoOp's proportions) is drawn once and saved beside them.

    The saved split is authoritative (images added to a class later are not used); an empty class folder, or one
    added after the split was saved, is an error that says what to do.
    """
    if not cfg.root:
        raise DatasetError("dataset=folder needs dataset.root=<a folder of class folders> (absolute, or below paths.data_root)")
    root = dataset_root(cfg, data_root)
    image_root = root / cfg.image_dir
    if not image_root.is_dir():
        raise DatasetError(f"image folder {image_root} is missing: point dataset.root at a folder of class folders")
    classes = sorted(d.name for d in image_root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{image_root} has no class folders: expected <class>/<image> files")
    split_path = root / (cfg.split_file or "split_clipadapt.json")
    if not split_path.is_file():
        _save_folder_split(image_root, classes, split_path)
    split_items = read_split_file(split_path)
    saved = {item.path.split("/", 1)[0] for items in split_items.values() for item in items}
    added = [name for name in classes if name not in saved]
    if added:
        raise DatasetError(
            f"{image_root} has class folders that the saved split {split_path} lacks, e.g. {added[:3]}: delete that "
            f"file to re-make the split with them (runs made on the old split then differ in draw and test set)"
        )
    return ImageDataset(
        name=cfg.name,
        image_root=image_root,
        classnames=classnames_of(*split_items.values()),
        templates=list(cfg.templates),
        split_hash=file_digest(split_path),
        **split_items,
    )


def _save_folder_split(image_root: Path, classes: list[str], split_path: Path) -> None:
    """Each class's images shuffled once (seed 0) and cut 50/20/30 into train/val/test; written atomically."""
    rng = random.Random(0)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        files = sorted(str(p.relative_to(image_root)) for p in (image_root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"class folder {image_root / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                               f"add some or remove the folder")
        rng.shuffle(files)
        n_train, n_val = round(len(files) * 0.5), round(len(files) * 0.2)
        parts = {"train": files[:n_train], "val": files[n_train : n_train + n_val], "test": files[n_train + n_val :]}
        for part, paths in parts.items():
            split[part].extend([p, label, name] for p in paths)
    tmp = split_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(split))
    tmp.replace(split_path)
