"""The benchmark datasets: configs, readers on miniature trees in each exact layout, the real split files."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import dataset_trees as trees
from clipadapt.data import DatasetError, build_dataset
from clipadapt.data.benchmarks import BENCHMARKS, IMAGENET_VARIANTS, PROTOCOL_SIZES, Sizes, dataset_config, sizes_of
from clipadapt.fewshot import draw_few_shot
from clipadapt.run import run
from conftest import compose_config

# protocol.md, restated here so that the code's copy (PROTOCOL_SIZES) is checked against the spec.
SPEC_SIZES = {
    "imagenet": (1000, None, 0, 50_000), "caltech101": (100, 4_128, 1_649, 2_465), "oxford_pets": (37, 2_944, 736, 3_669),
    "stanford_cars": (196, 6_509, 1_635, 8_041), "oxford_flowers": (102, 4_093, 1_633, 2_463),
    "food101": (101, 50_500, 20_200, 30_300), "fgvc_aircraft": (100, 3_334, 3_333, 3_333),
    "sun397": (397, 15_880, 3_970, 19_850), "dtd": (47, 2_820, 1_128, 1_692), "eurosat": (10, 13_500, 5_400, 8_100),
    "ucf101": (101, 7_639, 1_898, 3_783),
}
SPEC_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.", "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.", "food101": "a photo of {}, a type of food.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.",
}
ENSEMBLE = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
            "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
SHARED_SPLIT_FILES = {
    "caltech101": "split_zhou_Caltech101.json", "oxford_pets": "split_zhou_OxfordPets.json",
    "stanford_cars": "split_zhou_StanfordCars.json", "oxford_flowers": "split_zhou_OxfordFlowers.json",
    "dtd": "split_zhou_DescribableTextures.json", "eurosat": "split_zhou_EuroSAT.json", "ucf101": "split_zhou_UCF101.json",
}
ALL = BENCHMARKS + IMAGENET_VARIANTS


def config(tmp_path: Path, name: str, *overrides: str):
    return compose_config(["backbone=tiny", "logger=none", "features.num_workers=0", "features.train_views=0",
                           f"dataset={name}", *overrides], tmp_path)


def test_the_protocol_tables():
    assert set(BENCHMARKS) == set(SPEC_SIZES) and len(IMAGENET_VARIANTS) == 4
    for name, (classes, train, val, test) in SPEC_SIZES.items():
        sizes = PROTOCOL_SIZES[name]
        assert (sizes.classes, sizes.val, sizes.test) == (classes, val, test)
        assert train is None or sizes.train == train
    assert PROTOCOL_SIZES["imagenet"].train == 1_281_167  # ILSVRC-2012's train set (protocol.md: 1.28M)
    for name in ALL:
        cfg = dataset_config(name)
        assert cfg.name == name
        if name in SPEC_TEMPLATES:
            assert list(cfg.templates) == [SPEC_TEMPLATES[name]]


@pytest.mark.parametrize("name", ALL)
def test_miniature_tree_reads_end_to_end(tmp_path, name):
    trees.build(tmp_path / "data", name)
    cfg = config(tmp_path, name)
    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    dataset.check_images_exist()
    for item in dataset.train[:1] + dataset.val[:1] + dataset.test[:1]:  # images decode from where the lists say
        with Image.open(dataset.image_root / item.path) as image:
            assert image.size == (16, 16)
    sizes = sizes_of(dataset)
    if name in trees.SPLIT_LAYOUTS:
        classes = trees.SPLIT_LAYOUTS[name][3]
        assert dataset.classnames == [prompt.replace("_", " ") for _, prompt in classes]
        assert sizes == Sizes(3, 3 * 3, 3 * 2, 3 * 2)
    elif name == "fgvc_aircraft":
        assert dataset.classnames == ["707-320", "A300B4", "Spitfire"]
        assert sizes == Sizes(3, 9, 6, 6)
        assert dataset.train[0].path == "1000001.jpg" and dataset.train[0].label == 0
    elif name == "imagenet":
        assert dataset.classnames == [trees.WNIDS[w] for w in sorted(trees.WNIDS)]
        assert sizes == Sizes(6, 6 * 3, 0, 6 * 2)  # train is the draw's pool, val is the test set, no val split
        assert {i.path.split("/")[0] for i in dataset.train} == {"train"} and {i.path.split("/")[0] for i in dataset.test} == {"val"}
        assert [i.label for i in dataset.test] == sorted(i.label for i in dataset.test)
    else:  # test-only variants, labelled in ImageNet's label space
        assert dataset.classnames == [trees.WNIDS[w] for w in sorted(trees.WNIDS)] and not dataset.train and not dataset.val
        labels = sorted({i.label for i in dataset.test})
        expected = [sorted(trees.WNIDS).index(w) for w in trees.SUBSET] if name in ("imagenet_a", "imagenet_r") else list(range(6))
        assert labels == expected
        assert all(dataset.classnames[i.label] == trees.WNIDS[sorted(trees.WNIDS)[i.label]] for i in dataset.test)
    assert dataset.templates == list(cfg.dataset.templates)
    if dataset.train:
        draw = draw_few_shot(dataset.train, dataset.val, 2, 1)
        assert len(draw.train) == 2 * sizes.classes and len(draw.val) == (2 * sizes.classes if dataset.val else 0)


@pytest.mark.parametrize("name", ["eurosat", "imagenet"])
def test_a_run_on_a_miniature(tmp_path, name):
    trees.build(tmp_path / "data", name)
    metrics = run(config(tmp_path, name, "method=zero_shot", "shots=2"), tmp_path / "out")
    classes = 6 if name == "imagenet" else 3
    assert len(metrics["draw"]["train"]) == 2 * classes
    assert metrics["num_test"] == (12 if name == "imagenet" else 6)
    # ImageNet has no val split: its val draw takes the one train image per class that the 2-shot draw left
    assert len(metrics["draw"]["val"]) == (classes if name == "imagenet" else 2 * classes)
    assert metrics["protocol"]["val_source"] == ("train_outside_draw" if name == "imagenet" else "val_split_draw")
    assert metrics["protocol"]["split_hash"] and metrics["protocol"]["draw_hash"]


@pytest.mark.parametrize("name", sorted(SHARED_SPLIT_FILES))
def test_real_split_files_have_the_protocol_sizes(tmp_path, shared_splits, name):
    cfg = dataset_config(name)
    folder = tmp_path / cfg.root
    folder.mkdir(parents=True)
    (folder / cfg.split_file).symlink_to(shared_splits / SHARED_SPLIT_FILES[name])
    dataset = build_dataset(cfg, tmp_path)
    classes, train, val, test = SPEC_SIZES[name]
    assert sizes_of(dataset) == Sizes(classes, train, val, test)
    assert len(dataset.classnames) == classes and all("_" not in c for c in dataset.classnames)


def test_imagenet_template_ensemble(tmp_path):
    trees.build(tmp_path / "data", "imagenet")
    cfg = config(tmp_path, "imagenet", "dataset.template_set=ensemble")
    assert build_dataset(cfg.dataset, Path(cfg.paths.data_root)).templates == ENSEMBLE
    with pytest.raises(DatasetError, match="eurosat has no template set 'ensemble'"):
        build_dataset(config(tmp_path, "eurosat", "dataset.template_set=ensemble").dataset, tmp_path / "data")


def test_a_missing_split_file_names_the_file_and_its_source(tmp_path):
    trees.build(tmp_path / "data", "dtd")
    (tmp_path / "data" / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(DatasetError, match=r"split_zhou_DescribableTextures\.json is missing \(source: https://drive\.google\.com/file/d/1u3_"):
        build_dataset(dataset_config("dtd"), tmp_path / "data")


def test_missing_images_are_counted_and_named(tmp_path):
    split = trees.split_tree(tmp_path / "data", "eurosat")
    gone = [split["test"][0][0], split["train"][4][0]]
    for relative in gone:
        (tmp_path / "data" / "eurosat" / "2750" / relative).unlink()
    with pytest.raises(DatasetError, match=rf"eurosat: 2 listed images are missing .*{gone[1]}, {gone[0]}"):
        run(config(tmp_path, "eurosat", "method=zero_shot", "shots=3"), tmp_path / "out")  # every train image


def test_imagenet_class_folders_must_match_the_class_list(tmp_path):
    trees.build(tmp_path / "data", "imagenet")
    for image in (tmp_path / "data" / "imagenet" / "images" / "val" / "n01440764").iterdir():
        image.unlink()
    (tmp_path / "data" / "imagenet" / "images" / "val" / "n01440764").rmdir()
    with pytest.raises(DatasetError, match=r"1 missing, e\.g\. \['n01440764'\]"):
        build_dataset(dataset_config("imagenet"), tmp_path / "data")


def test_fgvc_unknown_variant_is_an_error(tmp_path):
    trees.build(tmp_path / "data", "fgvc_aircraft")
    with open(tmp_path / "data" / "fgvc_aircraft" / "images_variant_val.txt", "a") as f:
        f.write("1234567 Concorde\n")
    with pytest.raises(DatasetError, match="variant 'Concorde' is not in variants.txt"):
        build_dataset(dataset_config("fgvc_aircraft"), tmp_path / "data")


def test_a_test_only_dataset_cannot_be_trained_on(tmp_path):
    trees.build(tmp_path / "data", "imagenet_r")
    with pytest.raises(DatasetError, match="imagenet_r has no train split .* protocol.task=domain_generalisation"):
        run(config(tmp_path, "imagenet_r", "method=zero_shot"), tmp_path / "out")
