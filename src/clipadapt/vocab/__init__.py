"""Word lists for methods that score images against text outside the label set (RTOS anchors, CCLI concepts).

Shipped lists (package data, one entry a line, `#` starts a comment):
- `open_concepts.txt`: generic object, animal, food, scene and material nouns (RTOS's default open-semantic anchors
  when no other benchmark dataset is prepared).
- `visual_attributes.txt`: colours, patterns, textures, shapes, materials, object/animal/plant parts, viewpoints
  and photographic conditions (CCLI's default text concepts). It holds no class name of the benchmark datasets
  (checked against every class list available to the tests).

Both were written for this project; neither is the list the papers used (which are not available).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)


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


def class_names_in(path: Path) -> list[str]:
    """A prepared dataset's class list: a CoOp split file (.json), ImageNet's classnames.txt ("wnid name" lines)
    or any other text file with one class name a line (e.g. FGVC-Aircraft's variants.txt)."""
    from clipadapt.data.benchmarks import read_classnames
    from clipadapt.data.registry import classnames_of, read_split_file

    if path.suffix == ".json":
        split = read_split_file(path)
        return classnames_of(split["train"], split["val"], split["test"])
    if path.name == "classnames.txt":
        return list(read_classnames(path).values())
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cross_dataset_names(root: str | Path | None, patterns: list[str]) -> list[str]:
    """Class names of the prepared datasets under `root` whose class lists match `patterns`; [] when none."""
    from clipadapt.data.registry import DatasetError

    if root is None or not Path(root).is_dir():
        log.info("no prepared datasets under %s: cross-dataset names skipped", root)
        return []
    names: list[str] = []
    for path in sorted({p for pattern in patterns for p in Path(root).glob(pattern)}):
        try:
            names += class_names_in(path)
        except (DatasetError, UnicodeDecodeError) as error:  # a half-prepared or foreign file is not worth a failed run
            log.warning("skipping %s for cross-dataset names: %s", path, error)
    log.info("%d cross-dataset class names from %s", len(names), root)
    return names


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
