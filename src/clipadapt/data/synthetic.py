"""`synthetic`: procedurally drawn images (shape x colour x texture per class) for offline tests and the demo.

Generated once under the data root with a CoOp-style split file, then read like any benchmark dataset.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import random
import shutil
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from clipadapt.data.registry import ImageDataset, read_split_dataset, register_reader

SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
TEXTURES = ["plain", "stripes", "dots"]
SPLIT_FRACTIONS = {"train": 0.5, "val": 0.2, "test": 0.3}


def class_name(label: int, num_classes: int) -> str:
    shape, texture = SHAPES[label % len(SHAPES)], TEXTURES[(label // len(SHAPES)) % len(TEXTURES)]
    return f"{texture} {shape} {label}" if num_classes > len(SHAPES) * len(TEXTURES) else f"{texture} {shape}"


def draw_image(label: int, num_classes: int, size: int, rng: random.Random) -> Image.Image:
    hue = (label * 0.618034) % 1.0  # golden-ratio hues keep neighbouring classes apart
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.8, 0.9))
    background = tuple(rng.randint(0, 90) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    radius = rng.uniform(0.2, 0.4) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    shape = SHAPES[label % len(SHAPES)]
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    elif shape == "triangle":
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    elif shape == "diamond":
        pen.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=colour)
    else:
        w = radius / 3
        pen.rectangle([cx - w, cy - radius, cx + w, cy + radius], fill=colour)
        pen.rectangle([cx - radius, cy - w, cx + radius, cy + w], fill=colour)
    texture = TEXTURES[(label // len(SHAPES)) % len(TEXTURES)]
    step = max(3, size // 10)
    if texture == "stripes":
        for x in range(0, size, step):
            pen.line([(x, 0), (x, size)], fill=background, width=1)
    elif texture == "dots":
        for x in range(0, size, step):
            for y in range(0, size, step):
                pen.point((x, y), fill=(255, 255, 255))
    return image


def generate(folder: Path, num_classes: int, images_per_class: int, size: int) -> None:
    """Write images/<class>/<n>.png and split.json into `folder`, atomically (a temp folder renamed at the end)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(0)
    split: dict[str, list] = {name: [] for name in SPLIT_FRACTIONS}
    for label in range(num_classes):
        name = class_name(label, num_classes)
        (tmp / "images" / f"class_{label:03d}").mkdir(parents=True)
        n_train = max(1, round(images_per_class * SPLIT_FRACTIONS["train"]))
        n_val = max(1, round(images_per_class * SPLIT_FRACTIONS["val"]))
        for n in range(images_per_class):
            relative = f"class_{label:03d}/{n:04d}.png"
            draw_image(label, num_classes, size, rng).save(tmp / "images" / relative)
            part = "train" if n < n_train else "val" if n < n_train + n_val else "test"
            split[part].append([relative, label, name])
    (tmp / "split.json").write_text(json.dumps(split))
    tmp.replace(folder)


@register_reader("synthetic")
def read_synthetic(cfg: DictConfig, data_root: Path) -> ImageDataset:
    params = f"{cfg.num_classes}-{cfg.images_per_class}-{cfg.image_size}"
    folder = Path(data_root) / "synthetic" / f"{cfg.name}-{hashlib.sha1(params.encode()).hexdigest()[:8]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not folder.is_dir():
            generate(folder, cfg.num_classes, cfg.images_per_class, cfg.image_size)
    view = cfg.copy()
    view.root, view.image_dir, view.split_file = str(folder), "images", "split.json"
    return read_split_dataset(view, data_root)
