"""The few-shot draw of CoOp/Dassl, reproduced exactly (protocol.md), and a CLI that prints it.

    python -m clipadapt.fewshot --split-file split_zhou_EuroSAT.json --shots 16 --seed 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Draw:
    train: list  # items of the train list, in draw order
    val: list
    shots: int
    seed: int

    @property
    def digest(self) -> str:
        """Content hash of the drawn relative paths: a run's identity is its draw, not just its seed."""
        payload = json.dumps({"train": [i.path for i in self.train], "val": [i.path for i in self.val]})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _sample_per_label(items: Sequence[T], labels: Sequence[int], shots: int, rng: random.Random) -> list[T]:
    by_label: dict[int, list[T]] = {}  # insertion order = order of first appearance, as Dassl's defaultdict
    for item, label in zip(items, labels):
        by_label.setdefault(label, []).append(item)
    drawn: list[T] = []
    for group in by_label.values():
        drawn.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return drawn


def draw_few_shot(train: Sequence, val: Sequence, shots: int, seed: int, val_from_train: bool = False) -> Draw:
    """K per label from train, then min(K, 4) per label from val, continuing one random stream seeded with `seed`.

    Items need a `.label`; `random.Random(seed)` gives the same stream as CoOp's `random.seed(seed)`.
    `val_from_train` (ImageNet, which has no val split): the val draw is taken from the train images the train draw
    left, in their list order, continuing the same stream (protocol.md's honest ImageNet val).
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = random.Random(seed)
    drawn_train = _sample_per_label(train, [i.label for i in train], shots, rng)
    if val_from_train:
        taken = {item.path for item in drawn_train}
        val = [item for item in train if item.path not in taken]
    drawn_val = _sample_per_label(val, [i.label for i in val], min(shots, 4), rng) if val else []
    return Draw(train=drawn_train, val=drawn_val, shots=shots, seed=seed)


def per_class_counts(items: Sequence, num_classes: int) -> list[int]:
    """How many of `items` each label 0..num_classes-1 holds."""
    counts = [0] * num_classes
    for item in items:
        counts[item.label] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    from clipadapt.data import DatasetError
    from clipadapt.data.registry import read_split_file

    parser = argparse.ArgumentParser(description="Print the CoOp few-shot draw of a split file as JSON.")
    parser.add_argument("--split-file", required=True, type=Path)
    parser.add_argument("--shots", required=True, type=int)
    parser.add_argument("--seed", required=True, type=int)
    args = parser.parse_args(argv)
    try:
        split = read_split_file(args.split_file)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    draw = draw_few_shot(split["train"], split["val"], args.shots, args.seed)
    json.dump({"train": [i.path for i in draw.train], "val": [i.path for i in draw.val]}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
