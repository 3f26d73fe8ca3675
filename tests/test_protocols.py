"""Transfer protocols (base-to-new, cross-dataset, domain generalisation) and imported draws, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataset_trees as trees
from clipadapt import protocols
from clipadapt.data import DatasetError, build_dataset
from clipadapt.fewshot import draw_few_shot
from clipadapt.run import image_task_data, run
from conftest import compose_config


def zero_shot_predictions(features, text: np.ndarray, columns=None) -> np.ndarray:
    """Zero-shot CLIP computed here, independently of the methods and the evaluator."""
    image = F.normalize(torch.tensor(np.asarray(features.image[:, 0]), dtype=torch.float32), dim=-1)
    logits = image @ torch.tensor(np.asarray(text), dtype=torch.float32).t()
    if columns is None:
        return logits.argmax(-1).numpy()
    return np.asarray(columns)[logits[:, columns].argmax(-1).numpy()]


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return 100 * float(np.mean(predictions == labels))


def test_base_to_new_zero_shot_matches_its_direct_computation(tiny_config, tmp_path):
    cfg = tiny_config("method=zero_shot", "shots=2", "protocol.task=base_to_new")
    metrics = run(cfg, tmp_path)
    data = image_task_data(cfg, False, torch.device("cpu"), augmented=False)
    labels, base = data.test.labels, 5  # 10 synthetic classes: ceil(10 / 2) base
    is_base = labels < base
    base_acc = accuracy(zero_shot_predictions(data.test.select(np.flatnonzero(is_base)), data.text[:base]), labels[is_base])
    new_acc = accuracy(zero_shot_predictions(data.test.select(np.flatnonzero(~is_base)), data.text[base:]), labels[~is_base] - base)
    assert metrics["base/acc"] == pytest.approx(base_acc) and metrics["new/acc"] == pytest.approx(new_acc)
    assert metrics["H"] == pytest.approx(2 * base_acc * new_acc / (base_acc + new_acc)) and metrics["test/acc"] == metrics["H"]
    assert metrics["base/num_test"] == is_base.sum() and metrics["new/num_test"] == (~is_base).sum()
    assert metrics["protocol"]["task"] == "base_to_new"
    assert (metrics["protocol"]["base_classes"], metrics["protocol"]["new_classes"]) == (5, 5)
    assert len(metrics["test/per_class_acc"]) == 10


def test_the_base_to_new_draw_is_the_few_shot_draw_of_the_base_classes(tiny_config):
    cfg = tiny_config("shots=4", "protocol.task=base_to_new")
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    drawn, record = protocols.draw(dataset.train, dataset.val, dataset.classnames, cfg)
    full = draw_few_shot(dataset.train, dataset.val, 4, cfg.seed)
    assert drawn.train == [i for i in full.train if i.label < 5] and drawn.val == [i for i in full.val if i.label < 5]
    assert len(drawn.train) == 5 * 4 and record["draw_source"] == "drawn" and record["val_source"] == "val_split_draw"


def test_tip_adapter_on_new_classes_is_zero_shot(tiny_config, tmp_path):
    zero_shot = run(tiny_config("method=zero_shot", "shots=2", "protocol.task=base_to_new"), tmp_path / "zs")
    tip = run(tiny_config("method=tip_adapter", "shots=2", "protocol.task=base_to_new"), tmp_path / "tip")
    assert tip["new/acc"] == zero_shot["new/acc"]  # no cache entry for a new class: only the zero-shot term remains


def test_a_linear_probe_refuses_unseen_classes(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="linear_probe cannot classify classes it was not trained on"):
        run(tiny_config("method=linear_probe", "shots=1", "protocol.task=base_to_new", "protocol.val_policy=none"), tmp_path)


def test_cross_dataset_retargets_to_each_target(tmp_path):
    trees.build(tmp_path / "data", "eurosat")
    trees.build(tmp_path / "data", "dtd")
    cfg = compose_config(["backbone=tiny", "dataset=eurosat", "logger=none", "features.num_workers=0", "features.train_views=2",
                          "method=tip_adapter", "shots=2", "protocol.task=cross_dataset", "protocol.targets=[dtd]"], tmp_path)
    metrics = run(cfg, tmp_path / "out")
    target = image_task_data(cfg, False, torch.device("cpu"), augmented=False).load_target("dtd")
    assert target.classnames == ["banded", "blotchy", "zigzagged"]
    # Tip-Adapter's cache holds no image of the target's classes: on them it is zero-shot CLIP with dtd's template
    assert metrics["dtd/acc"] == pytest.approx(accuracy(zero_shot_predictions(target.test, target.text), target.test.labels))
    assert metrics["dtd/num_test"] == 6 and len(metrics["dtd/per_class_acc"]) == 3
    assert metrics["targets/mean_acc"] == metrics["dtd/acc"] and metrics["num_test"] == 6  # test/acc: the source's
    assert metrics["protocol"]["task"] == "cross_dataset" and metrics["protocol"]["targets"] == ["dtd"]


def test_domain_generalisation_keeps_imagenet_labels_and_restricts_a_and_r(tmp_path):
    data_root = tmp_path / "data"
    trees.build(data_root, "imagenet")
    trees.build(data_root, "imagenet_a")
    trees.build(data_root, "imagenet_v2")
    cfg = compose_config(["backbone=tiny", "dataset=imagenet", "logger=none", "features.num_workers=0", "method=zero_shot",
                          "shots=1", "protocol.task=domain_generalisation", "protocol.targets=[imagenet_a,imagenet_v2]",
                          "save_logits=true"], tmp_path)
    metrics = run(cfg, tmp_path / "out")
    data = image_task_data(cfg, False, torch.device("cpu"), augmented=False)
    subset = [sorted(trees.WNIDS).index(w) for w in trees.SUBSET]
    a = data.load_target("imagenet_a", with_text=False).test
    v2 = data.load_target("imagenet_v2", with_text=False).test
    assert sorted(set(a.labels)) == subset
    assert metrics["imagenet_a/acc"] == pytest.approx(accuracy(zero_shot_predictions(a, data.text, subset), a.labels))
    assert metrics["imagenet_v2/acc"] == pytest.approx(accuracy(zero_shot_predictions(v2, data.text), v2.labels))
    assert len(metrics["imagenet_a/per_class_acc"]) == 3 and len(metrics["imagenet_v2/per_class_acc"]) == 6
    saved = np.load(tmp_path / "out" / "logits.npz")
    assert np.isin(saved["imagenet_a_logits"].argmax(1), subset).all()  # the other classes never compete
    assert saved["logits"].shape == (12, 6) and (saved["labels"] == data.test.labels).all()


def test_domain_generalisation_needs_imagenet_as_the_source(tmp_path):
    trees.build(tmp_path / "data", "eurosat")
    trees.build(tmp_path / "data", "imagenet_r")
    cfg = compose_config(["backbone=tiny", "dataset=eurosat", "logger=none", "features.num_workers=0", "method=zero_shot",
                          "shots=1", "protocol.task=domain_generalisation", "protocol.targets=[imagenet_r]"], tmp_path)
    with pytest.raises(ValueError, match="imagenet_r is labelled in ImageNet's label space .* train with dataset=imagenet"):
        run(cfg, tmp_path / "out")


def test_an_unknown_task_is_refused(tiny_config):
    cfg = tiny_config("protocol.task=zero_to_hero")
    with pytest.raises(ValueError, match="unknown protocol.task 'zero_to_hero': use one of"):
        protocols.draw([], [], [], cfg)


def test_a_draw_can_be_imported(tiny_config, tmp_path):
    cfg = tiny_config("shots=2")
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    published = draw_few_shot(dataset.train, dataset.val, 2, 7)
    as_paths = tmp_path / "draw.json"  # the shape `python -m clipadapt.fewshot` prints
    as_paths.write_text(json.dumps({"train": [i.path for i in published.train], "val": [i.path for i in published.val]}))
    imported = protocols.import_draw(as_paths, dataset.train, dataset.val, 2, 1)
    assert imported.train == published.train and imported.val == published.val and imported.digest == published.digest

    as_entries = tmp_path / "metrics.json"  # a run's metrics.json, or split-file style [path, label, name] entries
    as_entries.write_text(json.dumps({"draw": {"train": [[i.path, i.label, i.classname] for i in published.train]}}))
    assert protocols.import_draw(as_entries, dataset.train, dataset.val, 2, 1).train == published.train

    metrics = run(tiny_config("method=zero_shot", "shots=2", f"dataset.draw_file={as_paths}"), tmp_path / "out")
    assert metrics["draw"]["train"] == [i.path for i in published.train]
    assert metrics["protocol"]["draw_hash"] == published.digest and metrics["protocol"]["draw_source"] == f"file:{as_paths}"


def test_a_bad_draw_file_is_refused(tiny_config, tmp_path):
    cfg = tiny_config()
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    path = tmp_path / "draw.json"
    path.write_text(json.dumps({"train": ["class_000/9999.png"]}))
    with pytest.raises(DatasetError, match="train image 'class_000/9999.png' is not in the dataset's train list"):
        protocols.import_draw(path, dataset.train, dataset.val, 1, 1)
    first = dataset.train[0]
    path.write_text(json.dumps({"train": [[first.path, first.label + 1, first.classname]]}))
    with pytest.raises(DatasetError, match=f"has label {first.label + 1}, the split file says {first.label}"):
        protocols.import_draw(path, dataset.train, dataset.val, 1, 1)
    path.write_text(json.dumps({"train": [i.path for i in draw_few_shot(dataset.train, [], 4, 1).train]}))
    with pytest.raises(DatasetError, match="has up to 4 train images per class but shots=2: set shots=4"):
        protocols.import_draw(path, dataset.train, dataset.val, 2, 1)


def test_harmonic_mean():
    assert protocols.harmonic_mean(50.0, 100.0) == pytest.approx(200 / 3)
    assert protocols.harmonic_mean(0.0, 0.0) == 0.0 and protocols.harmonic_mean(0.0, 80.0) == 0.0
