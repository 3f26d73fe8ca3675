"""Word lists for methods that score images against text outside the label set (RTOS anchors, CCLI concepts).

Shipped lists (package data, one entry a line, `#` starts a comment):
- `classes/<dataset>.txt`: the class names of each of the 11 benchmark datasets, in label order, as CoOp's split
  files (or ImageNet's classnames.txt, FGVC-Aircraft's variants.txt) name them: RTOS draws anchors from the other
  datasets' lists and keeps every class of the datasets it is evaluated on out, whichever datasets are prepared.
- `open_concepts.txt`: generic object, animal, food, scene and material nouns (RTOS's other anchor source).
- `visual_attributes.txt`: colours, patterns, textures, shapes, materials, object/animal/plant parts, viewpoints
  and photographic conditions (CCLI's default text concepts). It holds no class name of the benchmark datasets
  (checked against every class list available to the tests).

The last two were written for this project; neither is the list the papers used (which are not available).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def normalise(name: str) -> str:
    """The form names are compared in: lower case, underscores as spaces, single spaces."""
    return " ".join(name.replace("_", " ").lower().split())


def read_words(path: str | Path | None, packaged: str) -> list[str]:
    """Entries of a word-list file (or of the packaged list `packaged` when path is None), in file order."""
    if path is None:
        text = resources.files(__name__).joinpath(packaged).read_text(encoding="utf-8")
        source = f"clipadapt/vocab/{packaged}"
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"word list {path} does not exist: give a text file with one word or phrase a line")
        text, source = path.read_text(encoding="utf-8"), str(path)
    words = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    words = [w for w in words if w]
    if not words:
        raise ValueError(f"word list {source} has no entries: one word or phrase a line, '#' for comments")
    return words


def dataset_classnames(dataset: str) -> list[str]:
    """A benchmark dataset's class names as shipped in `classes/<dataset>.txt`, or [] for one without a list.

    ImageNet's variants (imagenet_v2, _sketch, _a, _r) are labelled in ImageNet's classes: they get ImageNet's list.
    """
    listed = "imagenet" if dataset.startswith("imagenet_") else dataset
    packaged = resources.files(__name__).joinpath("classes", f"{listed}.txt")
    return read_words(None, f"classes/{listed}.txt") if packaged.is_file() else []


def shipped_datasets() -> list[str]:
    """The datasets whose class lists ship with the package (the 11 benchmarks), sorted."""
    folder = resources.files(__name__).joinpath("classes")
    return sorted(entry.name.removesuffix(".txt") for entry in folder.iterdir() if entry.name.endswith(".txt"))


def unique(names: list[str], exclude: list[str] = ()) -> list[str]:
    """Names de-duplicated case-insensitively (first spelling kept), without any that match `exclude`."""
    seen = {normalise(n) for n in exclude}
    kept = []
    for name in names:
        key = normalise(name)
        if key and key not in seen:
            seen.add(key)
            kept.append(" ".join(name.replace("_", " ").split()))
    return kept
