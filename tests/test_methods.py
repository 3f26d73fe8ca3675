"""Every registered method: it has a config, builds, trains one epoch, tunes on val and evaluates on tiny features.

Adding a method (one file + one YAML) puts it under these tests with no change here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipadapt.app import CONFIG_DIR
from clipadapt.engine import accuracy, fit, predict
from clipadapt.methods import METHODS, FewShotTask, build_method
from clipadapt.methods.base import method_config
from clipadapt.run import image_task_data

METHOD_FILES = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


def method_node(name: str):
    """conf/method/<name>.yaml's method node (a `# @package _global_` file such as vt_clip.yaml nests it), without
    the Hydra defaults list a file may start with (tip_adapter_f.yaml extends tip_adapter.yaml)."""
    loaded = __import__("omegaconf").OmegaConf.load(Path(CONFIG_DIR) / "method" / f"{name}.yaml")
    loaded.pop("defaults", None)
    return loaded.method if "method" in loaded else loaded


def test_every_method_has_a_config_and_every_config_a_method():
    configured = {method_config(method_node(name)).name for name in METHOD_FILES}
    assert configured == set(METHODS)


def make_task(cfg, needs_dense: bool) -> tuple[FewShotTask, object]:
    data = image_task_data(cfg, needs_dense, torch.device("cpu"))
    task = FewShotTask(classnames=data.classnames, templates=data.templates, text=torch.tensor(data.text).float(),
                       train=data.train, val=data.val, device=torch.device("cpu"), prompt_encoder=data.prompt_encoder)
    return task, data


@pytest.mark.parametrize("config_name", METHOD_FILES)
@pytest.mark.parametrize("backbone", ["tiny", "tiny_rn"])
def test_method_builds_trains_and_evaluates(tiny_config, config_name, backbone):
    cfg = tiny_config(f"method={config_name}", f"backbone={backbone}", "shots=2", "method.train.epochs=1")
    needs_dense = METHODS[method_config(cfg.method).name].needs_dense
    task, data = make_task(cfg, needs_dense)
    torch.manual_seed(0)
    method = build_method(cfg.method, task)
    method.setup()
    before = {name: p.detach().clone() for name, p in method.named_parameters() if p.requires_grad}
    history = fit(method, data.train, seed=1)
    if before:
        assert len(history) == 1
        changed = [name for name, p in method.named_parameters() if name in before and not torch.equal(p, before[name])]
        assert changed, "one epoch of training changed no trainable parameter"
    method.tune(task.val)
    logits = predict(method, data.test)
    assert logits.shape == (len(data.test), task.num_classes)
    assert torch.isfinite(logits).all()
    assert 0.0 <= accuracy(logits, data.test.labels) <= 1.0
