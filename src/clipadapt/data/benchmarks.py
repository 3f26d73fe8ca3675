"""Readers for the benchmark datasets that a CoOp split file cannot express, and the protocol's dataset sizes.

- `imagenet`: classnames.txt ("wnid name" lines) and images/{train,val}/<wnid>/ folders; labels follow the sorted
  wnid folders (as CoOp's reader); train is the pool the few-shot draw samples from, the 50,000 val images are the
  test set, and there is no val split: the val draw comes from the train images outside the train draw.
- `fgvc_aircraft`: the data/ folder of fgvc-aircraft-2013b: variants.txt gives the labels (line order), the official
  images_variant_{train,val,test}.txt lists ("<image id> <variant>") give the splits (as CoOp's reader).
- `imagenet_variant`: ImageNet-V2 / -Sketch / -A / -R, test only. Folders are wnids (or, for V2, ImageNet label
  indices), so every image carries its ImageNet label and the class names are ImageNet's 1,000: -A and -R simply
  populate 200 of them (the transfer protocol restricts the classifier to the classes present).

As published (CoOp's readers), with one deliberate difference: CoOp lists a class folder with os.listdir, whose order
depends on the file system, so its ImageNet draws cannot be reproduced across machines; here files are sorted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipadapt.data.registry import DatasetError, ImageDataset, Item, dataset_root, register_reader


@dataclass(frozen=True)
class Sizes:
    """A dataset's class count and train / val / test sizes, as protocol.md states them."""

    classes: int
    train: int
    val: int
    test: int


# protocol.md's table (ImageNet's train size is ILSVRC-2012's exact count, which the table rounds to 1.28M), plus the
# published sizes of the four test-only ImageNet variants.
PROTOCOL_SIZES: dict[str, Sizes] = {
    "imagenet": Sizes(1000, 1_281_167, 0, 50_000),
    "caltech101": Sizes(100, 4_128, 1_649, 2_465),
    "oxford_pets": Sizes(37, 2_944, 736, 3_669),
    "stanford_cars": Sizes(196, 6_509, 1_635, 8_041),
    "oxford_flowers": Sizes(102, 4_093, 1_633, 2_463),
    "food101": Sizes(101, 50_500, 20_200, 30_300),
    "fgvc_aircraft": Sizes(100, 3_334, 3_333, 3_333),
    "sun397": Sizes(397, 15_880, 3_970, 19_850),
    "dtd": Sizes(47, 2_820, 1_128, 1_692),
    "eurosat": Sizes(10, 13_500, 5_400, 8_100),
    "ucf101": Sizes(101, 7_639, 1_898, 3_783),
    "imagenet_v2": Sizes(1000, 0, 0, 10_000),
    "imagenet_sketch": Sizes(1000, 0, 0, 50_889),
    "imagenet_a": Sizes(200, 0, 0, 7_500),
    "imagenet_r": Sizes(200, 0, 0, 30_000),
}
BENCHMARKS = [name for name in PROTOCOL_SIZES if not name.startswith("imagenet_")]  # the 11 of the headline mean
IMAGENET_VARIANTS = [name for name in PROTOCOL_SIZES if name.startswith("imagenet_")]


def dataset_config(name: str) -> DictConfig:
    """conf/dataset/<name>.yaml checked against the dataset schema, as Hydra would compose it (prepare, targets)."""
    from clipadapt.files import CONFIG_DIR
    from clipadapt.config import DatasetSchema

    path = Path(CONFIG_DIR) / "dataset" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise DatasetError(f"unknown dataset {name!r}: use one of {known}")
    loaded = OmegaConf.load(path)
    if "dataset" in loaded:  # a `@package _global_` file (features.yaml also labels the backbone): its dataset node
        loaded = loaded.dataset
    return OmegaConf.merge(OmegaConf.structured(DatasetSchema), loaded)


def sizes_of(dataset: ImageDataset) -> Sizes:
    """The class count (labels that have images) and split sizes of a dataset as read."""
    labels = {item.label for split in (dataset.train, dataset.val, dataset.test) for item in split}
    return Sizes(len(labels), len(dataset.train), len(dataset.val), len(dataset.test))


def _prepare_hint(cfg: DictConfig) -> str:
    return f"run `python -m clipadapt.prepare {cfg.name}` or set paths.data_root"


def _require(path: Path, cfg: DictConfig, what: str) -> Path:
    if not path.exists():
        source = f" (source: {cfg.split_url})" if cfg.get("split_url") and what == "class list" else ""
        raise DatasetError(f"{cfg.name}: {what} {path} is missing{source}: {_prepare_hint(cfg)}")
    return path


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def _listing_bytes(items: list[Item]) -> bytes:
    return "\n".join(f"{item.path}\t{item.label}" for item in items).encode()


def read_classnames(path: Path) -> dict[str, str]:
    """classnames.txt: "<wnid> <class name>" per line, in ImageNet's label order -> {wnid: name}."""
    names: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name:
            raise DatasetError(f"{path}:{number}: expected '<wnid> <class name>', got {line!r}")
        names[wnid] = name
    return names


def _visible(entries) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _class_folder_items(folder: Path, labels: dict[str, int], names: list[str], prefix: str) -> list[Item]:
    """Items of <folder>/<class folder>/<file>, in label order then file-name order; paths start with `prefix`."""
    items: list[Item] = []
    with os.scandir(folder) as entries:
        class_dirs = [e for e in _visible(entries) if e.is_dir()]
    unknown = [e.name for e in class_dirs if e.name not in labels]
    if unknown:
        raise DatasetError(f"{folder} has folders that are not classes of classnames.txt, e.g. {unknown[:3]}")
    for entry in sorted(class_dirs, key=lambda e: labels[e.name]):
        label = labels[entry.name]
        with os.scandir(entry.path) as files:
            items.extend(Item(f"{prefix}{entry.name}/{f.name}", label, names[label]) for f in _visible(files) if f.is_file())
    return items


@register_reader("imagenet")
def read_imagenet(cfg: DictConfig, data_root: Path) -> ImageDataset:
    root = dataset_root(cfg, data_root)
    classnames_path = _require(root / cfg.split_file, cfg, "class list")
    names_by_wnid = read_classnames(classnames_path)
    image_root = root / cfg.image_dir
    splits = {}
    for split in ("train", "val"):
        folder = _require(image_root / split, cfg, "image folder")
        wnids = sorted(e.name for e in _visible(os.scandir(folder)) if e.is_dir())
        if set(wnids) != set(names_by_wnid):
            missing, extra = sorted(set(names_by_wnid) - set(wnids)), sorted(set(wnids) - set(names_by_wnid))
            raise DatasetError(
                f"{cfg.name}: {folder} must hold one folder per class of {classnames_path.name} "
                f"({len(missing)} missing, e.g. {missing[:3]}; {len(extra)} unknown, e.g. {extra[:3]}): {_prepare_hint(cfg)}"
            )
        labels = {wnid: label for label, wnid in enumerate(wnids)}  # CoOp: labels follow the sorted folders
        splits[split] = _class_folder_items(folder, labels, [names_by_wnid[w] for w in wnids], f"{split}/")
    wnids = sorted(names_by_wnid)
    return ImageDataset(
        name=cfg.name,
        image_root=image_root,
        classnames=[names_by_wnid[w] for w in wnids],
        templates=list(cfg.templates),
        train=splits["train"],
        val=[],  # the protocol draws ImageNet's train only; its val images are the test set
        test=splits["val"],
        split_hash=_digest(classnames_path.read_bytes(), _listing_bytes(splits["train"]), _listing_bytes(splits["val"])),
        val_from_train=True,
    )


@register_reader("fgvc_aircraft")
def read_fgvc_aircraft(cfg: DictConfig, data_root: Path) -> ImageDataset:
    root = dataset_root(cfg, data_root)
    variants_path = _require(root / "variants.txt", cfg, "class list")
    classnames = [line.strip() for line in variants_path.read_text().splitlines() if line.strip()]
    label_of = {name: label for label, name in enumerate(classnames)}
    raw = [variants_path.read_bytes()]
    splits: dict[str, list[Item]] = {}
    for split in ("train", "val", "test"):
        path = _require(root / f"images_variant_{split}.txt", cfg, "split list")
        raw.append(path.read_bytes())
        items = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise DatasetError(f"{path}:{number}: variant {variant!r} is not in {variants_path.name}")
            items.append(Item(f"{image_id}.jpg", label_of[variant], variant))
        splits[split] = items
    return ImageDataset(
        name=cfg.name,
        image_root=root / cfg.image_dir,
        classnames=classnames,
        templates=list(cfg.templates),
        split_hash=_digest(*raw),
        **splits,
    )


@register_reader("imagenet_variant")
def read_imagenet_variant(cfg: DictConfig, data_root: Path) -> ImageDataset:
    """A test-only ImageNet variant; labels and class names are ImageNet's (V2's folders are label indices)."""
    root = dataset_root(cfg, data_root)
    classnames_path = _require(root / cfg.split_file, cfg, "class list")
    names_by_wnid = read_classnames(classnames_path)
    wnids = sorted(names_by_wnid)
    classnames = [names_by_wnid[w] for w in wnids]
    labels = {wnid: label for label, wnid in enumerate(wnids)}
    labels.update({str(label): label for label in range(len(wnids))})  # ImageNet-V2 names its folders 0..999
    image_root = _require(root / cfg.image_dir, cfg, "image folder")
    test = _class_folder_items(image_root, labels, classnames, "")
    return ImageDataset(
        name=cfg.name,
        image_root=image_root,
        classnames=classnames,
        templates=list(cfg.templates),
        train=[],
        val=[],
        test=test,
        split_hash=_digest(classnames_path.read_bytes(), _listing_bytes(test)),
    )
