"""The few-shot draw against protocol.md's algorithm, on the real CoOp split files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict

import pytest

from clipadapt.data import read_split_file
from clipadapt.fewshot import draw_few_shot


def dassl_draw(split: dict, shots: int, seed: int) -> tuple[list[str], list[str]]:
    """protocol.md step by step, with the global `random` module as CoOp/Dassl use it."""
    random.seed(seed)
    drawn = []
    for items, k in ((split["train"], shots), (split["val"], min(shots, 4))):
        by_label = defaultdict(list)
        for path, label, _ in items:
            by_label[label].append(path)
        part = []
        for paths in by_label.values():
            part.extend(random.sample(paths, k) if len(paths) >= k else paths)
        drawn.append(part)
    return drawn[0], drawn[1]


@pytest.mark.parametrize("name", ["EuroSAT", "DescribableTextures", "OxfordPets", "Caltech101"])
@pytest.mark.parametrize("shots,seed", [(1, 1), (4, 2), (16, 3)])
def test_draw_matches_protocol(shared_splits, name, shots, seed):
    path = shared_splits / f"split_zhou_{name}.json"
    expected_train, expected_val = dassl_draw(json.loads(path.read_text()), shots, seed)
    split = read_split_file(path)
    draw = draw_few_shot(split["train"], split["val"], shots, seed)
    assert [i.path for i in draw.train] == expected_train
    assert [i.path for i in draw.val] == expected_val


def test_draw_identity(shared_splits):
    split = read_split_file(shared_splits / "split_zhou_EuroSAT.json")
    a, b = (draw_few_shot(split["train"], split["val"], 16, 1) for _ in range(2))
    c = draw_few_shot(split["train"], split["val"], 16, 2)
    assert a.digest == b.digest != c.digest
    assert len(a.train) == 16 * 10 and len(a.val) == 4 * 10


def test_fewshot_cli_prints_the_draw(shared_splits):
    path = shared_splits / "split_zhou_DescribableTextures.json"
    out = subprocess.run([sys.executable, "-m", "clipadapt.fewshot", "--split-file", str(path), "--shots", "2",
                          "--seed", "1"], capture_output=True, text=True, check=True).stdout
    expected_train, expected_val = dassl_draw(json.loads(path.read_text()), 2, 1)
    assert json.loads(out) == {"train": expected_train, "val": expected_val}


def test_fewshot_cli_missing_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clipadapt.fewshot", "--split-file", str(tmp_path / "x.json"),
                             "--shots", "1", "--seed", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "x.json is missing" in result.stderr and len(result.stderr.splitlines()) == 1


def imagenet_style_draw(train: list[tuple[str, int]], shots: int, seed: int) -> tuple[list[str], list[str]]:
    """protocol.md for a dataset without a val split: the train draw, then min(K, 4) per label from the train images
    it left (in list order), continuing the same `random` stream."""
    random.seed(seed)
    drawn = []
    pool = train
    for k in (shots, min(shots, 4)):
        by_label = defaultdict(list)
        for path, label in pool:
            by_label[label].append(path)
        part = []
        for paths in by_label.values():
            part.extend(random.sample(paths, k) if len(paths) >= k else paths)
        drawn.append(part)
        pool = [(path, label) for path, label in pool if path not in set(part)]
    return drawn[0], drawn[1]


@pytest.mark.parametrize("shots,seed", [(1, 1), (4, 2), (16, 3)])
def test_val_from_train_matches_protocol(shots, seed):
    from clipadapt.data import Item

    rng = random.Random(0)  # an ImageNet-like train list: 7 classes of 20-40 images, labels interleaved
    train = [(f"train/n{label:03d}/{i}.JPEG", label) for label in range(7) for i in range(rng.randint(20, 40))]
    rng.shuffle(train)
    expected_train, expected_val = imagenet_style_draw(train, shots, seed)
    draw = draw_few_shot([Item(p, label, "") for p, label in train], [], shots, seed, val_from_train=True)
    assert [i.path for i in draw.train] == expected_train and [i.path for i in draw.val] == expected_val
    assert len(draw.val) == 7 * min(shots, 4) and not {i.path for i in draw.val} & {i.path for i in draw.train}
