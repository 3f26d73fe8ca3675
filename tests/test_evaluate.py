"""Saved models: every method's trained state round-trips exactly, and `python -m clipadapt.evaluate RUN_DIR`
re-evaluates a run (same test/acc), scores another dataset, and refuses a folder without a state."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset_trees as trees
from clipadapt import protocols, trained_state
from clipadapt.engine import accuracy, fit, predict
from clipadapt.evaluate import evaluate, main
from clipadapt.methods import METHODS, build_method
from clipadapt.methods.base import method_config
from clipadapt.run import few_shot_task, image_task_data, no_features, run
from conftest import TINY, compose_config

QUICK = ["shots=2", "method.train.epochs=1"]
SHORT_SEARCH = {"linear_probe": ["method.c_grid=[0.1,10.0]", "method.c_refine_steps=1", "method.max_iter=100"],
                "calip": ["method.search.steps=5"], "calip_fs": ["method.search.steps=5"],
                "ship": ["protocol.task=base_to_new", "method.generator.train.epochs=1"]}  # label-only classes


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_saved_state_gives_the_same_logits_without_the_train_features(tiny_config, tmp_path, name):
    """Train, tune, save; rebuild on an EMPTY train set under another seed, load: bit-identical test logits."""
    cfg = tiny_config(f"method={name}", *QUICK, *SHORT_SEARCH.get(name, []))
    needs_dense = METHODS[name].needs_dense
    plan = protocols.setup(cfg, image_task_data(cfg, needs_dense, torch.device("cpu")))
    task = few_shot_task(cfg, plan, torch.device("cpu"))
    torch.manual_seed(0)
    method = build_method(cfg.method, task)
    method.setup()
    fit(method, task.train, seed=1)
    method.tune(task.val)
    trained_state.write(trained_state.snapshot(method), tmp_path / "model.safetensors")
    expected = predict(method, plan.data.test)

    torch.manual_seed(1)  # any random initialisation is overwritten by the state
    rebuilt = build_method(method_config(cfg.method), replace(task, train=no_features(task.text.shape[1]), val=None))
    trained_state.restore(rebuilt, trained_state.read(tmp_path / "model.safetensors"))
    assert torch.equal(predict(rebuilt, plan.data.test), expected)


def test_the_state_file_leaves_the_text_tower_out(tiny_config, tmp_path):
    run(tiny_config("method=coop", *QUICK), tmp_path)
    state = trained_state.read(tmp_path / trained_state.STATE_FILE)
    assert set(state.tensors) == {"text", "ctx"}  # CoOp's learned context and its classifier, not CLIP's weights


def saved_logits(run_dir: Path, name: str = "test") -> torch.Tensor:
    return torch.from_numpy(np.load(run_dir / "logits.npz")["logits" if name == "test" else f"{name}_logits"])


@pytest.mark.parametrize("name", ["tip_adapter_f", "coop", "clip_adapter", "linear_probe", "calip"])
def test_evaluate_prints_the_runs_test_accuracy(tiny_config, tmp_path, capsys, name):
    metrics = run(tiny_config(f"method={name}", *QUICK, *SHORT_SEARCH.get(name, []), "save_logits=true"), tmp_path)
    capsys.readouterr()
    assert main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"test/acc {metrics['test/acc']!r}  (as in metrics.json)" in printed
    results, _, _ = evaluate(tmp_path)
    assert torch.equal(results["test"].logits, saved_logits(tmp_path))  # bit for bit, not only the accuracy


def test_the_cli_re_evaluates_a_tuned_tip_adapter(tiny_config, tmp_path):
    metrics = run(tiny_config("method=tip_adapter", "shots=2"), tmp_path)
    assert metrics["chosen"]["beta"] != 1.0  # tuned: the state must carry alpha and beta to reproduce test/acc
    result = subprocess.run([sys.executable, "-m", "clipadapt.evaluate", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"test/acc {metrics['test/acc']!r}  (as in metrics.json)" in result.stdout.splitlines()


def test_evaluate_scores_another_dataset_retargeted(tmp_path, capsys):
    """A few-shot synthetic run scored on dtd's test set: Tip-Adapter's cache holds none of dtd's classes, so on
    them it is zero-shot CLIP with dtd's prompts, as in a cross_dataset run."""
    cfg = compose_config([*TINY, "method=tip_adapter_f", *QUICK], tmp_path)
    trees.build(Path(cfg.paths.data_root), "dtd")
    metrics = run(cfg, tmp_path / "run")
    capsys.readouterr()
    assert main([str(tmp_path / "run"), "dataset=dtd"]) == 0
    printed = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines())
    target = image_task_data(cfg, False, torch.device("cpu"), with_draw=False).load_target("dtd")
    image = torch.tensor(np.asarray(target.test.image[:, 0], dtype=np.float32))
    zero_shot = image @ torch.tensor(target.text).float().t()
    assert float(printed["dtd/acc"]) == pytest.approx(100 * accuracy(zero_shot, target.test.labels))
    assert float(printed["test/acc"]) == metrics["test/acc"]  # the run's own test set comes first, unchanged


def test_ship_moved_to_another_dataset_is_re_evaluated_exactly(tmp_path):
    """SHIP without label-only classes trains its generator when retargeted, on the draw (seeded): evaluate too."""
    cfg = compose_config([*TINY, "method=ship", *QUICK, "method.generator.train.epochs=1",
                          "method.transfer.per_class=2", "protocol.task=cross_dataset", "protocol.targets=[dtd]",
                          "save_logits=true"], tmp_path)
    trees.build(Path(cfg.paths.data_root), "dtd")
    run(cfg, tmp_path / "run")
    results, _, _ = evaluate(tmp_path / "run")
    assert torch.equal(results["dtd"].logits, saved_logits(tmp_path / "run", "dtd"))


def test_evaluate_scores_an_imagenet_variant_in_imagenets_label_space(tmp_path, capsys):
    cfg = compose_config(["backbone=tiny", "dataset=imagenet", "logger=none", "features.num_workers=0",
                          "method=zero_shot", "shots=1"], tmp_path)
    for name in ("imagenet", "imagenet_a"):
        trees.build(Path(cfg.paths.data_root), name)
    run(cfg, tmp_path / "run")
    capsys.readouterr()
    assert main([str(tmp_path / "run"), "dataset=imagenet_a"]) == 0
    assert any(line.startswith("imagenet_a/acc ") for line in capsys.readouterr().out.splitlines())


def test_a_folder_without_a_saved_state_exits_2_in_one_line(tiny_config, tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "holds no metrics.json" in capsys.readouterr().err
    run(tiny_config("method=zero_shot", "shots=1"), tmp_path)
    (tmp_path / trained_state.STATE_FILE).unlink()
    capsys.readouterr()
    assert main([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "has no saved state" in error and len(error.strip().splitlines()) == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["method"] == "zero_shot"


def test_rtos_keeps_its_anchors_when_the_vocabulary_differs_at_evaluation(tiny_config, tmp_path):
    """Scored on another dataset, RTOS's pool leaves that dataset's classes out: the saved anchors must come back."""
    cfg = tiny_config("method=rtos", *QUICK, "method.anchors.num=50")
    plan = protocols.setup(cfg, image_task_data(cfg, False, torch.device("cpu")))
    task = few_shot_task(cfg, plan, torch.device("cpu"))
    method = build_method(cfg.method, task)
    fit(method, task.train, seed=1)
    method.tune(task.val)
    state = trained_state.snapshot(method)
    elsewhere = replace(task, train=no_features(task.text.shape[1]), val=None, evaluated_datasets=["synthetic", "dtd"])
    rebuilt = build_method(method_config(cfg.method), elsewhere)
    assert rebuilt.anchor_names != method.anchor_names
    trained_state.restore(rebuilt, state)
    assert rebuilt.anchor_names == method.anchor_names
    assert torch.equal(predict(rebuilt, plan.data.test), predict(method, plan.data.test))


def test_a_features_file_run_is_re_evaluated_without_its_train_rows(tiny_config, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "features.npz",
             train_features=rng.normal(size=(20, 8)), train_labels=np.repeat(np.arange(4), 5),
             val_features=rng.normal(size=(8, 8)), val_labels=np.repeat(np.arange(4), 2),
             test_features=rng.normal(size=(12, 8)), test_labels=np.repeat(np.arange(4), 3),
             text_features=rng.normal(size=(4, 8)))
    run(tiny_config("dataset=features", f"dataset.path={tmp_path / 'features.npz'}", "method=tip_adapter_f", *QUICK,
                    "save_logits=true"), tmp_path / "run")
    results, _, _ = evaluate(tmp_path / "run")
    assert torch.equal(results["test"].logits, saved_logits(tmp_path / "run"))


def test_a_base_to_new_run_is_re_evaluated_on_base_and_new_classes(tiny_config, tmp_path, capsys):
    metrics = run(tiny_config("method=tip_adapter_f", *QUICK, "protocol.task=base_to_new", "save_logits=true"),
                  tmp_path)
    results, scores, _ = evaluate(tmp_path)
    assert torch.equal(results["new"].logits, saved_logits(tmp_path, "new"))
    assert scores["H"] == metrics["H"]
    capsys.readouterr()
    assert main([str(tmp_path), "dataset=dtd"]) == 2  # trained on half the classes: not for another dataset
    assert "base-to-new run is evaluated on its own dataset only" in capsys.readouterr().err
