"""CCLI (reconstructed): concept learning from the few-shot images, the inference network, fusion, special cases.

Unit tests run on the tiny random-init CLIP's text tower and random (or constructed) image features; one test
runs the whole cell through run() on synthetic images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clipadapt.engine import fit, predict
from clipadapt.features import FeatureSet
from clipadapt.methods import Batch, FewShotTask, build_method
from clipadapt.methods.ccli import learn_visual_concepts
from clipadapt.protocols import Evaluation, evaluate
from clipadapt.run import run
from clipadapt.vocab import normalise, read_words

CLASSES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"]
TEMPLATE = "a photo of a {}."
CONCEPT_TEMPLATE = "a photo of {}."


@pytest.fixture(scope="module")
def backbone():
    from clipadapt.backbone import ClipBackbone

    return ClipBackbone("clipadapt-tiny-vit", None)


def unit(*shape, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def make_task(backbone, shots: int = 2, views: int = 3, train_image: np.ndarray | None = None) -> FewShotTask:
    text = backbone.encode_texts(CLASSES, [TEMPLATE])
    k, dim = len(CLASSES), text.shape[1]
    labels = np.repeat(np.arange(k), shots)
    image = unit(len(labels), 1 + views, dim, seed=0).numpy() if train_image is None else train_image
    val = FeatureSet(unit(3 * k, 1, dim, seed=1).numpy(), np.repeat(np.arange(k), 3))
    return FewShotTask(classnames=list(CLASSES), templates=[TEMPLATE], text=text, train=FeatureSet(image, labels),
                       val=val, device=torch.device("cpu"), prompt_encoder=backbone.prompt_encoder)


def ccli(task, name="ccli", **overrides):
    if name == "ccli":
        overrides = {"concepts.num": 120, **overrides}  # a seeded draw from the packaged list keeps tests fast
    node = OmegaConf.merge(OmegaConf.create({"name": name}),
                           OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    torch.manual_seed(0)
    return build_method(node, task)


def test_special_case_is_tip_adapter_exactly(backbone, tmp_path):
    """Spec 2.3: raw scores, K = 1, one key per selected image, each train image the top-1 of one concept."""
    words = [f"concept {w}" for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
                                       "india", "juliet")]
    (tmp_path / "concepts.txt").write_text("\n".join(words))
    features = backbone.encode_texts(words, [CONCEPT_TEMPLATE])  # image i looks exactly like concept i
    views = features[:, None].expand(-1, 4, -1).numpy()
    task = make_task(backbone, shots=2, train_image=views)
    settings = {"alpha": 1.7, "beta": 3.2, "search.enabled": False}
    method = ccli(task, **settings, **{"concepts.file": str(tmp_path / "concepts.txt"), "selection_score": "raw",
                                       "topk": 1, "aggregate": "none"})
    assert method.support.flatten().tolist() == list(range(len(words)))  # the premise: a one-to-one selection
    tip = ccli(task, name="tip_adapter", **settings)
    assert torch.equal(method.keys, tip.keys) and torch.equal(method.prior, tip.values)
    image = unit(11, task.text.shape[1], seed=5)
    with torch.no_grad():
        assert torch.equal(method(Batch(image)), tip(Batch(image)))  # bit for bit, text branch included (U = 0)


def test_tip_cache_ablation_adds_tip_adapters_term(backbone):
    task = make_task(backbone)
    settings = {"beta": 2.5, "search.enabled": False}
    method = ccli(task, alpha=0.0, gamma=0.0, use_tip_cache=True, tip_weight=1.3, **settings)
    tip = ccli(task, name="tip_adapter", alpha=1.3, **settings)
    image = unit(5, task.text.shape[1], seed=12)
    with torch.no_grad():
        assert torch.equal(method(Batch(image)), tip(Batch(image)))


def test_fusion_weights_zero_give_zero_shot_logits(backbone):
    task = make_task(backbone)
    method = ccli(task, alpha=0.0, gamma=0.0, **{"search.enabled": False, "train.epochs": 2})
    fit(method, task.train, seed=1)  # even after training the concept branches
    zero_shot = ccli(task, name="zero_shot")
    test = FeatureSet(unit(9, 1, task.text.shape[1], seed=6).numpy(), np.zeros(9, dtype=np.int64))
    assert torch.equal(predict(method, test), predict(zero_shot, test))


def test_mlp_head_starts_at_zero_shot(backbone):
    task = make_task(backbone)
    method = ccli(task, head="mlp", **{"search.enabled": False, "mlp_hidden": 16})
    image = unit(6, task.text.shape[1], seed=7)
    with torch.no_grad():
        assert torch.equal(method(Batch(image)), method.zero_shot_logits(image))


def test_concept_selection_is_deterministic_for_a_seed(backbone):
    task = make_task(backbone)
    first, again = ccli(task, **{"concepts.num": 60}), ccli(task, **{"concepts.num": 60})
    other = ccli(task, **{"concepts.num": 60, "concepts.seed": 1})
    assert first.concept_words == again.concept_words != other.concept_words
    assert len(first.concept_words) == 60
    assert torch.equal(first.support, again.support) and torch.equal(first.keys, again.keys)
    assert torch.equal(first.prior, again.prior) and torch.equal(first.concept_index, again.concept_index)


@pytest.mark.parametrize("dim", [512, 1024])
@pytest.mark.parametrize("classes", [10, 1000])
def test_shapes_for_classes_and_concepts(dim, classes):
    concepts, shots = 64, 1 if classes == 1000 else 4
    pool = unit(classes * shots, dim, seed=2)
    labels = F.one_hot(torch.arange(classes).repeat_interleave(shots), classes).float()
    text = unit(concepts, dim, seed=3)
    for aggregate in ("weighted", "mean"):
        learned = learn_visual_concepts(text, pool, labels, k=8, aggregate=aggregate)
        kept = len(learned.keys)
        assert 1 <= kept <= concepts
        assert learned.keys.shape == (kept, dim) and learned.prior.shape == (kept, classes)
        assert learned.support.shape == (kept, 8) and learned.concept.shape == (kept,)
        torch.testing.assert_close(learned.keys.norm(dim=-1), torch.ones(kept))
        torch.testing.assert_close(learned.prior.sum(1), torch.ones(kept))  # a distribution over classes
    per_item = learn_visual_concepts(text, pool, labels, k=8, aggregate="none")
    assert per_item.keys.shape[1] == dim and per_item.prior.shape[1] == classes
    assert len(per_item.keys) == len(torch.unique(per_item.support)) <= concepts * 8


def test_method_shapes_and_one_shot_degeneracy(backbone):
    task = make_task(backbone, shots=1)  # 5 classes, 5 train images, 120 concepts
    method = ccli(task, topk=16)  # K clamps to the pool
    assert method.support.shape[1] == 5
    m_kept, m_text = len(method.keys), len(method.text_concepts)
    assert 1 <= m_kept <= m_text and method.prior.shape == (m_kept, 5) and method.text_weights.shape == (m_text, 5)
    assert method.keys.shape[1] == task.text.shape[1]
    # dedup: no two kept concepts share a support set
    assert len(torch.unique(method.support.sort(1).values, dim=0)) == m_kept
    with torch.no_grad():
        assert method(Batch(unit(3, task.text.shape[1], seed=8))).shape == (3, 5)


def test_duplicate_concepts_are_dropped():
    pool, labels = unit(12, 32, seed=4), F.one_hot(torch.arange(12) % 3, 3).float()
    text = unit(20, 32, seed=5)
    once = learn_visual_concepts(text, pool, labels, k=2)
    twice = learn_visual_concepts(torch.cat([text, text]), pool, labels, k=2)
    assert torch.equal(once.concept, twice.concept) and torch.equal(once.keys, twice.keys)
    assert len(learn_visual_concepts(torch.cat([text, text]), pool, labels, k=2, dedup=False).keys) == 40


def test_trains_only_the_inference_network(backbone):
    task = make_task(backbone)
    method = ccli(task, **{"train.epochs": 2})
    assert {n for n, p in method.named_parameters() if p.requires_grad} == {"keys", "prior", "text_weights"}
    before = {n: p.clone() for n, p in method.named_parameters()}
    text_concepts = method.text_concepts.clone()
    history = fit(method, task.train, seed=1)
    assert len(history) == 2 and all(np.isfinite(history))
    assert all(not torch.equal(p, before[n]) for n, p in method.named_parameters())
    assert torch.equal(method.text_concepts, text_concepts)


def test_retarget_keeps_trained_columns_and_zero_shot_for_new_classes(backbone):
    task = make_task(backbone)
    method = ccli(task, **{"train.epochs": 1, "search.enabled": False})
    fit(method, task.train, seed=1)
    image = unit(7, task.text.shape[1], seed=9)
    with torch.no_grad():
        full = method(Batch(image))
        names = [CLASSES[3], CLASSES[0], "brand new class"]
        text = torch.cat([task.text[[3, 0]], unit(1, task.text.shape[1], seed=10)])
        method.retarget(names, text)
        moved = method(Batch(image))
    torch.testing.assert_close(moved[:, :2], full[:, [3, 0]], atol=1e-5, rtol=0)
    torch.testing.assert_close(moved[:, 2], 100 * image @ text[2], atol=1e-5, rtol=0)  # zero-shot only


def test_domain_generalisation_evaluation_runs(backbone):
    """Same label space, -A/-R style: only the target's classes compete (protocols.evaluate)."""
    task = make_task(backbone)
    method = ccli(task, **{"train.epochs": 1})
    fit(method, task.train, seed=1)
    method.tune(task.val)
    test = FeatureSet(unit(8, 1, task.text.shape[1], seed=11).numpy(), np.array([0, 2, 2, 4, 0, 4, 2, 0]))
    results = evaluate(method, [Evaluation("test", test), Evaluation("subset", test, columns=np.array([0, 2, 4]))])
    assert results["subset"].logits.shape == (8, 5) and torch.isinf(results["subset"].logits[:, [1, 3]]).all()
    assert torch.equal(results["subset"].logits[:, [0, 2, 4]], results["test"].logits[:, [0, 2, 4]])


def test_features_file_has_no_text_tower(backbone):
    task = make_task(backbone)
    task.prompt_encoder = None
    with pytest.raises(ValueError, match="features file"):
        ccli(task)


def test_packaged_concepts_hold_no_imagenet_class_name():
    from clipadapt.backbone import open_clip  # the one open_clip import

    concepts = {normalise(w) for w in read_words(None, "visual_attributes.txt")}
    imagenet = {normalise(n) for n in open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES}
    assert len(concepts) >= 500 and not concepts & imagenet


def test_packaged_concepts_hold_no_benchmark_class_name(shared_splits):
    concepts = {normalise(w) for w in read_words(None, "visual_attributes.txt")}
    names = set()
    for path in sorted(shared_splits.glob("split_*.json")):
        split = json.loads(path.read_text())
        names |= {normalise(entry[2]) for part in ("train", "val", "test") for entry in split[part]}
    assert len(names) > 300 and not concepts & names


def test_cell_end_to_end(tiny_config, tmp_path):
    metrics = run(tiny_config("method=ccli", "shots=1", "method.concepts.num=100", "method.train.epochs=2"), tmp_path)
    assert metrics["protocol"]["method_fidelity"] == "reconstructed"
    assert len(metrics["train/loss_history"]) == 2 and 0 <= metrics["test/acc"] <= 100
    chosen = metrics["chosen"]
    assert chosen["num_text_concepts"] == 100 and 1 <= chosen["num_visual_concepts"] <= 100
    assert {"alpha", "beta", "gamma", "val_acc"} <= set(chosen)
