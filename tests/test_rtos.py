"""RTOS (reconstructed): anchors through the frozen text tower, the relation transition, its fusion and variants.

Unit tests run on the tiny random-init CLIP (its text tower is real code with random weights) and random image
features; the last tests run the whole cell through run() on synthetic images.
"""

from __future__ import annotations

import hashlib

import dataset_trees as trees
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clipadapt.engine import CellTrainer, fit, predict
from clipadapt.features import FeatureSet
from clipadapt.methods import Batch, FewShotTask, build_method
from clipadapt.methods.rtos import AnchorSchema, anchor_pool, draw_anchors
from clipadapt.run import run
from clipadapt.vocab import dataset_classnames, normalise
from conftest import compose_config

CLASSES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"]
TEMPLATE = "a photo of a {}."
# anchors of 1, 2 and 3+ BPE tokens, so the padded, masked anchor span is exercised
ANCHORS = ["dog", "fire truck", "hot air balloon", "umbrella", "sea turtle", "accordion"]


@pytest.fixture(scope="module")
def backbone():
    from clipadapt.backbone import ClipBackbone

    return ClipBackbone("clipadapt-tiny-vit", None)


def random_features(n: int, views: int, dim: int, seed: int) -> np.ndarray:
    x = torch.randn(n, views, dim, generator=torch.Generator().manual_seed(seed))
    return F.normalize(x, dim=-1).numpy()


def make_task(backbone, shots: int = 2, views: int = 3, classnames=CLASSES) -> FewShotTask:
    text = backbone.encode_texts(classnames, [TEMPLATE])
    k, dim = len(classnames), text.shape[1]
    labels = np.repeat(np.arange(k), shots)
    train = FeatureSet(random_features(len(labels), 1 + views, dim, 0), labels)
    val = FeatureSet(random_features(2 * k, 1, dim, 1), np.repeat(np.arange(k), 2))
    return FewShotTask(classnames=list(classnames), templates=[TEMPLATE], text=text, train=train, val=val,
                       device=torch.device("cpu"), prompt_encoder=backbone.prompt_encoder)


def words_file(tmp_path, words) -> str:
    path = tmp_path / "words.txt"
    path.write_text("# anchors\n" + "\n".join(words) + "\n")
    return str(path)


def rtos(task, tmp_path, name="rtos", words=ANCHORS, **overrides):
    anchors = {"sources": ["words"], "words_file": words_file(tmp_path, words)}
    node = OmegaConf.create({"name": name, "anchors": anchors})
    node = OmegaConf.merge(node, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    torch.manual_seed(0)
    return build_method(node, task)


def test_truncated_sequences_encode_like_the_full_77_tokens(backbone):
    encoder = backbone.prompt_encoder()
    ids = encoder.tokenize([TEMPLATE.format(w) for w in ANCHORS + ["a much longer anchor name with many words"]])
    with torch.no_grad():
        full = F.normalize(backbone.clip.encode_text(ids).float(), dim=-1)  # open_clip's own 77-token pass
        truncated = encoder(encoder.embed(ids), ids)
    assert int(ids.argmax(-1).max()) + 1 < ids.shape[1] == 77  # the encoder really ran on a cut sequence
    torch.testing.assert_close(truncated, full, atol=1e-5, rtol=0)


def test_anchor_prompts_scatter_learnable_tokens_into_the_frozen_template(backbone, tmp_path):
    method = rtos(make_task(backbone), tmp_path)
    assert method.anchor_names == ANCHORS
    lengths = method.anchors.mask.sum(1).tolist()
    assert lengths[0] == 1 and max(lengths) >= 3 and method.anchors.span == max(lengths)
    with torch.no_grad():  # at initialisation the anchors are exactly their words
        expected = backbone.encode_texts(ANCHORS, [TEMPLATE])
        torch.testing.assert_close(method.anchor_features(), expected, atol=1e-5, rtol=0)


def test_fusion_weight_zero_gives_zero_shot_logits(backbone, tmp_path):
    task = make_task(backbone)
    method = rtos(task, tmp_path, alpha=0.0)
    zero_shot = build_method(OmegaConf.create({"name": "zero_shot"}), task)
    test = FeatureSet(random_features(7, 1, task.text.shape[1], 2), np.zeros(7, dtype=np.int64))
    assert torch.equal(predict(method, test), predict(zero_shot, test))


def test_gradients_reach_the_anchor_tokens_and_nothing_frozen(backbone, tmp_path):
    task = make_task(backbone)
    method = rtos(task, tmp_path)
    trainable = {name for name, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"anchors.offset", "query", "key"}
    frozen_tower = {name: p.clone() for name, p in method.encoder.named_parameters()}
    frozen_buffers = {name: b.clone() for name, b in method.anchors.named_buffers()}

    image = torch.as_tensor(task.train.image[:, 1])
    method.loss(Batch(image), torch.as_tensor(task.train.labels)).backward()
    grad = method.anchors.offset.grad
    mask = method.anchors.mask
    assert grad[mask].abs().sum(-1).gt(0).all(), "every real anchor token gets a gradient"
    assert grad[~mask].abs().sum() == 0, "padding positions stay frozen"
    assert method.query.grad.abs().sum() > 0 and method.key.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in method.encoder.parameters())

    method.zero_grad()
    assert not method.train().encoder.training  # the shared frozen tower never leaves eval mode
    fit(method, task.train, seed=1)  # the whole loop: only the trainable parameters move
    assert method.anchors.offset.abs().sum() > 0
    assert all(torch.equal(p, frozen_tower[n]) for n, p in method.encoder.named_parameters())
    assert all(torch.equal(b, frozen_buffers[n]) for n, b in method.anchors.named_buffers())


def test_text_tower_runs_once_per_step_and_once_for_evaluation(backbone, tmp_path):
    task = make_task(backbone, shots=4)  # 20 train images
    method = rtos(task, tmp_path, **{"train.epochs": 2, "train.batch_size": 8})  # 3 steps an epoch
    calls = []
    method.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    fit(method, task.train, seed=1)
    assert calls == [len(ANCHORS)] * 6  # one pass over all anchors per step, whatever the batch size
    calls.clear()
    test = FeatureSet(random_features(50, 1, task.text.shape[1], 3), np.zeros(50, dtype=np.int64))
    predict(method, test, batch_size=8)  # 7 batches, anchors encoded once and cached
    method.tune(task.val)
    assert calls == [len(ANCHORS)]


def test_anchors_equal_to_the_targets_reproduce_zero_shot(backbone, tmp_path):
    """With A = T the relation is the identity, O = softmax(f T^T / tau_a) and log O is zero-shot up to a constant."""
    task = make_task(backbone)
    method = rtos(task, tmp_path, words=CLASSES, **{"anchors.exclude_targets": False, "relation.tau_r": 1e-6,
                                                    "rtm.tau_a": 0.01, "rtm.output": "log"})
    image = torch.as_tensor(random_features(40, 1, task.text.shape[1], 4)[:, 0])
    with torch.no_grad():
        relation = method.relation(method.anchor_features())
        torch.testing.assert_close(relation, torch.eye(len(CLASSES)), atol=1e-6, rtol=0)
        transition, zero_shot = method.transition_logits(image), method.zero_shot_logits(image)
    torch.testing.assert_close(transition.softmax(-1), zero_shot.softmax(-1), atol=1e-5, rtol=0)
    assert torch.equal(transition.argmax(-1), zero_shot.argmax(-1))


def test_training_free_variant_is_the_closed_form(backbone, tmp_path):
    task = make_task(backbone)
    method = rtos(task, tmp_path, name="rtos_zs", **{"search.enabled": False})
    assert not [name for name, p in method.named_parameters() if p.requires_grad]  # nothing to train
    image = torch.as_tensor(random_features(9, 1, task.text.shape[1], 5)[:, 0])
    anchors = backbone.encode_texts(ANCHORS, [TEMPLATE])
    relation = torch.softmax(task.text @ anchors.t() / 0.01, dim=-1)
    expected = 100 * image @ task.text.t() + 100 * torch.softmax(image @ anchors.t() / 0.01, dim=-1) @ relation.t()
    with torch.no_grad():
        torch.testing.assert_close(method(Batch(image)), expected, atol=1e-3, rtol=1e-4)  # 1/tau amplifies fp32 noise


def test_random_anchor_tokens(backbone, tmp_path):
    method = rtos(make_task(backbone), tmp_path, **{"anchors.init": "random", "anchors.num": 12})
    assert len(method.anchors) == 12 and method.anchors.span == 1
    std = float(method.anchors.initial.std())
    assert 0.01 < std < 0.03  # N(0, 0.02^2)


def test_pool_is_the_shipped_class_lists_and_words_without_the_evaluated_datasets(tmp_path):
    cfg = OmegaConf.structured(AnchorSchema)
    cfg.words_file = words_file(tmp_path, ["sea turtle", "Dog", "dog", "red circle", "Forest"])
    cfg.datasets = ["eurosat", "fgvc_aircraft", "dtd"]
    pool = anchor_pool(cfg, targets=["red_circle"], evaluated_datasets=["dtd"])
    # shipped lists in the configured order (the evaluated dtd left out), then the words; de-duplicated, targets dropped
    expected = [*dataset_classnames("eurosat"), *dataset_classnames("fgvc_aircraft"), "sea turtle", "Dog"]
    assert pool == expected and "banded" not in pool
    pool = anchor_pool(cfg, targets=[], evaluated_datasets=["eurosat"])  # every EuroSAT class out, "Forest" included
    assert not {normalise(n) for n in pool} & {normalise(n) for n in dataset_classnames("eurosat")}
    drawn = draw_anchors(pool, 7, seed=0)
    assert len(drawn) == 7 and drawn == draw_anchors(pool, 7, seed=0) and drawn != draw_anchors(pool, 7, seed=1)
    assert draw_anchors(pool, 10_000, seed=0) == pool
    cfg.datasets = None  # all 11 shipped lists; ImageNet's variants stand for ImageNet
    names = {normalise(n) for n in anchor_pool(cfg, targets=[], evaluated_datasets=["imagenet_a"])}
    assert "goldfish" not in names and "apple pie" in names and "707-320" in names
    cfg.datasets = ["eurosat", "mnist"]
    with pytest.raises(ValueError, match=r"method.anchors.datasets has \['mnist'\], which ship no class list"):
        anchor_pool(cfg, targets=[], evaluated_datasets=[])


def test_anchor_tokens_take_no_weight_decay(backbone, tmp_path):
    task = make_task(backbone)
    method = rtos(task, tmp_path, **{"train.weight_decay": 0.5})
    optimizer = CellTrainer(method, task.train, seed=1).optimizer  # what the training loop steps with
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay == {id(method.query): 0.5, id(method.key): 0.5, id(method.anchors.offset): 0.0}


def test_retarget_recomputes_the_relation_for_other_classes(backbone, tmp_path):
    task = make_task(backbone)
    method = rtos(task, tmp_path)
    image = torch.as_tensor(random_features(6, 1, task.text.shape[1], 6)[:, 0])
    subset = CLASSES[1:4]
    with torch.no_grad():
        method(Batch(image))  # fills the evaluation cache
        method.retarget(subset, backbone.encode_texts(subset, [TEMPLATE]))
        retargeted = method(Batch(image))
        fresh = rtos(make_task(backbone, classnames=subset), tmp_path)(Batch(image))
    torch.testing.assert_close(retargeted, fresh, atol=1e-5, rtol=0)


def test_features_file_has_no_text_tower(backbone, tmp_path):
    task = make_task(backbone)
    task.prompt_encoder = None
    with pytest.raises(ValueError, match="rtos runs CLIP's text tower on learned anchor tokens, which a features file"):
        rtos(task, tmp_path)
    with pytest.raises(ValueError, match="rtos_zs runs CLIP's text tower on its anchor prompts, which a features file"):
        rtos(task, tmp_path, name="rtos_zs")


@pytest.mark.parametrize("method", ["rtos", "rtos_zs"])
def test_cell_end_to_end(tiny_config, tmp_path, method):
    cfg = tiny_config(f"method={method}", "shots=1", "method.anchors.num=24", "method.train.epochs=1")
    metrics = run(cfg, tmp_path)
    assert metrics["protocol"]["method_fidelity"] == "reconstructed"
    assert metrics["chosen"]["num_anchors"] == 24 and "alpha" in metrics["chosen"]
    assert len(metrics["train/loss_history"]) == (1 if method == "rtos" else 0)
    assert 0 <= metrics["test/acc"] <= 100 and 0 <= metrics["chosen"]["val_acc"] <= 100  # both in percent
    anchors, pool = (tmp_path / "anchors.txt").read_text(), (tmp_path / "anchor_pool.txt").read_text()
    assert len(anchors.splitlines()) == 24 and set(anchors.splitlines()) < set(pool.splitlines())
    record = metrics["anchors"]
    assert record["pool_size"] == len(pool.splitlines()) and record["num_anchors"] == 24
    assert record["sha256"] == hashlib.sha256(anchors.encode()).hexdigest()
    assert record["pool_sha256"] == hashlib.sha256(pool.encode()).hexdigest()


def test_base_to_new_anchor_pool_holds_no_class_of_the_target(tmp_path):
    """On EuroSAT base-to-new, neither base nor new classes (nor any EuroSAT class) may become anchors, whatever is
    prepared under the data root: here EuroSAT alone, whose split file must not be read for anchors."""
    trees.build(tmp_path / "data", "eurosat")
    cfg = compose_config(["backbone=tiny", "dataset=eurosat", "logger=none", "features.num_workers=0",
                          "method=rtos_zs", "shots=1", "protocol.task=base_to_new"], tmp_path)
    metrics = run(cfg, tmp_path / "out")
    pool = {normalise(n) for n in (tmp_path / "out" / "anchor_pool.txt").read_text().splitlines()}
    mini = [name for _, name in trees.SPLIT_LAYOUTS["eurosat"][3]]  # "Annual Crop Land", "Forest", "Sea or Lake"
    assert metrics["protocol"]["new_classes"] == 1 and "sea or lake" in {normalise(n) for n in mini}
    assert not pool & {normalise(n) for n in [*mini, *dataset_classnames("eurosat")]}
    assert {"goldfish", "apple pie", "banded"} <= pool  # the other datasets' shipped lists, none of them prepared
    assert len(pool) == metrics["anchors"]["pool_size"] and metrics["anchors"]["excluded_datasets"] == ["eurosat"]
