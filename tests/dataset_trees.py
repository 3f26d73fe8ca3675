"""Miniature copies of every benchmark dataset in its exact on-disk layout (CoOp's), with tiny generated images.

Each builder writes under `data_root` what `python -m clipadapt.prepare` would leave there, with a few images per
class and, for the split-file datasets, a split file whose paths follow the real file's conventions.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

PER_SPLIT = {"train": 3, "val": 2, "test": 2}  # images per class

# Split-file datasets: root, image folder, split file, class folders with their prompt names (the split file's third
# field), and where image k (numbered across the dataset) of a class lies relative to the image folder.
SPLIT_LAYOUTS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   [("Faces", "face"), ("airplanes", "airplane"), ("yin_yang", "yin_yang")],
                   lambda split, folder, k: f"{folder}/image_{k:04d}.jpg"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                    [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"), ("yorkshire_terrier", "yorkshire_terrier")],
                    lambda split, folder, k: f"{folder}_{k}.jpg"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json",
                      [("audi", "2012 Audi TTS Coupe"), ("bmw", "2007 BMW X5 SUV"), ("smart", "2012 smart fortwo Convertible")],
                      lambda split, folder, k: f"{'cars_test' if split == 'test' else 'cars_train'}/{k:05d}.jpg"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                       [("1", "pink primrose"), ("2", "hard-leaved pocket orchid"), ("3", "canterbury bells")],
                       lambda split, folder, k: f"image_{k:05d}.jpg"),
    "food101": ("food-101", "images", "split_zhou_Food101.json",
                [("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("waffles", "waffles")],
                lambda split, folder, k: f"{folder}/{100000 + k}.jpg"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json",
               [("a/abbey", "abbey"), ("b/balcony/exterior", "exterior balcony"), ("z/zen_garden", "zen_garden")],
               lambda split, folder, k: f"{folder}/sun_{k:08d}.jpg"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json",
            [("banded", "banded"), ("blotchy", "blotchy"), ("zigzagged", "zigzagged")],
            lambda split, folder, k: f"{folder}/{folder}_{k:04d}.jpg"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json",
                [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"), ("SeaLake", "Sea or Lake")],
                lambda split, folder, k: f"{folder}/{folder}_{k}.jpg"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
               [("Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Basketball", "Basketball"), ("Yo_Yo", "Yo_Yo")],
               lambda split, folder, k: f"{folder}/v_{folder.replace('_', '')}_g{k:02d}_c01.jpg"),
}

WNIDS = {  # a few ImageNet classes, as classnames.txt names them
    "n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
    "n01491361": "tiger shark", "n01494475": "hammerhead shark", "n01496331": "electric ray",
}
SUBSET = ["n01443537", "n01491361", "n01496331"]  # the classes the -A / -R miniatures populate


def image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256)).save(path, format="JPEG")


def split_tree(data_root: Path, name: str) -> dict[str, list]:
    """A split-file dataset; returns the split it wrote."""
    root, image_dir, split_file, classes, where = SPLIT_LAYOUTS[name]
    folder = data_root / root
    split: dict[str, list] = {part: [] for part in PER_SPLIT}
    k = 1
    for part, count in PER_SPLIT.items():
        for label, (class_folder, prompt_name) in enumerate(classes):
            for _ in range(count):
                relative = where(part, class_folder, k)
                image(folder / image_dir / relative, k)
                split[part].append([relative, label, prompt_name])
                k += 1
    (folder / split_file).write_text(json.dumps(split, indent=4))
    return split


def classnames_txt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{wnid} {name}\n" for wnid, name in WNIDS.items()))


def imagenet_tree(data_root: Path, per_class: dict[str, int] | None = None) -> None:
    folder = data_root / "imagenet"
    classnames_txt(folder / "classnames.txt")
    per_class = per_class or {"train": 3, "val": 2}
    k = 0
    for split, count in per_class.items():
        for wnid in WNIDS:
            for _ in range(count):
                k += 1
                name = f"{wnid}_{k}.JPEG" if split == "train" else f"ILSVRC2012_val_{k:08d}.JPEG"
                image(folder / "images" / split / wnid / name, k)


def fgvc_tree(data_root: Path) -> None:
    folder = data_root / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Spitfire"]
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    k = 1000000
    for split, count in PER_SPLIT.items():
        lines = []
        for variant in variants:
            for _ in range(count):
                k += 1
                image(folder / "images" / f"{k:07d}.jpg", k)
                lines.append(f"{k:07d} {variant}\n")
        (folder / f"images_variant_{split}.txt").write_text("".join(lines))


VARIANT_LAYOUTS = {  # root, image folder, class folders (V2: ImageNet label indices)
    "imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", [str(i) for i in range(len(WNIDS))]),
    "imagenet_sketch": ("imagenet-sketch", "images", list(WNIDS)),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", SUBSET),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", SUBSET),
}


def variant_tree(data_root: Path, name: str, per_class: int = 2) -> None:
    root, image_dir, folders = VARIANT_LAYOUTS[name]
    classnames_txt(data_root / root / "classnames.txt")
    for c, class_folder in enumerate(folders):
        for n in range(per_class):
            image(data_root / root / image_dir / class_folder / f"{name}_{c}_{n}.jpg", 7 * c + n)
    if name in ("imagenet_a", "imagenet_r"):
        (data_root / root / image_dir / "README.txt").write_text("not a class\n")


def build(data_root: Path, name: str) -> None:
    """The miniature of dataset `name` under data_root."""
    if name in SPLIT_LAYOUTS:
        split_tree(data_root, name)
    elif name == "imagenet":
        imagenet_tree(data_root)
    elif name == "fgvc_aircraft":
        fgvc_tree(data_root)
    else:
        variant_tree(data_root, name)
