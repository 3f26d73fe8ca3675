"""The class prompts follow each method's recipe: Tip-Adapter(-F) and CALIP build ImageNet's class text from CLIP's
7-template ensemble (their official ImageNet code), CoOp-family methods from the single template."""

from __future__ import annotations

import dataset_trees as trees
import pytest
from omegaconf import OmegaConf

from clipadapt.run import run, with_method_templates
from conftest import compose_config

ENSEMBLE = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
            "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    trees.build(root / "data", "imagenet")
    return root


def imagenet_run(root, method: str, *overrides: str) -> dict:
    cfg = compose_config(["backbone=tiny", "dataset=imagenet", "logger=none", "features.num_workers=0",
                          "features.train_views=1", f"method={method}", "shots=1", *overrides], root)
    return run(cfg, root / "out" / method)


def test_tip_adapter_on_imagenet_uses_the_seven_template_ensemble(imagenet_root):
    metrics = imagenet_run(imagenet_root, "tip_adapter", "method.search.enabled=false")
    assert metrics["protocol"]["templates"] == ENSEMBLE and metrics["protocol"]["template_set"] == "ensemble"
    assert metrics["method_config"]["template_set"] == "ensemble"


def test_coop_on_imagenet_uses_the_single_template(imagenet_root):
    metrics = imagenet_run(imagenet_root, "coop", "method.train.epochs=1")
    assert metrics["protocol"]["templates"] == ["a photo of a {}."] and metrics["protocol"]["template_set"] is None


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f", "calip", "calip_fs"])
def test_the_imagenet_recipes_that_ask_for_the_ensemble(method, tmp_path):
    cfg = compose_config(["dataset=imagenet", f"method={method}"], tmp_path)
    assert cfg.method.template_set == "ensemble"
    assert compose_config(["dataset=eurosat", f"method={method}"], tmp_path).method.get("template_set") is None


def test_a_method_policy_that_contradicts_the_dataset_setting_is_refused():
    cfg = OmegaConf.create({"dataset": {"kind": "imagenet", "template_set": "other"}})
    method = OmegaConf.create({"template_set": "ensemble"})
    with pytest.raises(ValueError, match="dataset.template_set=other and method.template_set=ensemble disagree"):
        with_method_templates(cfg, method)
    cfg.dataset = {"kind": "features", "template_set": None}
    with pytest.raises(ValueError, match="a features file brings its own text features"):
        with_method_templates(cfg, method)
    cfg.dataset.kind = "imagenet"
    applied = with_method_templates(cfg, method)
    assert applied.dataset.template_set == "ensemble" and cfg.dataset.template_set is None  # the caller's is unchanged
