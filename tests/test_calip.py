"""CALIP and CALIP-FS: exact properties on random features, the beta search, the per-dataset betas, whole runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clipadapt.engine import accuracy, fit, predict
from clipadapt.methods import Batch, build_method
from clipadapt.run import run
from conftest import random_task


def build(name: str, task, **options):
    return build_method(OmegaConf.create({"name": name, **options}), task)


def random_batch(images: int, tokens: int, dim: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(images, dim, generator=g), dim=-1)
    dense = F.normalize(image[:, None] + 0.7 * torch.randn(images, tokens, dim, generator=g), dim=-1)
    return Batch(image=image, dense=dense)


def direct_calip(method, batch: Batch, beta2: float, beta3: float) -> torch.Tensor:
    """The spec's equations (2.3-2.4), one image at a time, with T~ [K, D] and S~ [M, D] built explicitly.

    For CALIP-FS the attention runs on phi's queries/keys/values and psi maps its outputs (spec 2.7).
    """
    cfg, text = method.cfg, method.text
    fs = hasattr(method, "phi")
    rows = []
    for f, dense in zip(batch.image, batch.dense):
        q_t, k_t, v_t = method.phi["text"](text) if fs else (text, text, text)
        q_s, k_s, v_s = method.phi["visual"](dense) if fs else (dense, dense, dense)
        post = method.psi if fs else (lambda x: x)
        guided = post(torch.softmax(cfg.attn_scale_text * q_t @ k_s.T, dim=1) @ v_s)  # [K, D]: softmax over M
        blended = post(torch.softmax(cfg.attn_scale_visual * q_s @ k_t.T, dim=1) @ v_t)  # [M, D]: softmax over K
        pooled = {"mean+max": blended.mean(0) + blended.max(0).values, "mean": blended.mean(0),
                  "max": blended.max(0).values}[cfg.pool]
        if cfg.renorm:
            guided, pooled = F.normalize(guided, dim=-1), F.normalize(pooled, dim=-1)
        rows.append(100 * (f @ text.T + beta2 * guided @ f + beta3 * text @ pooled))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["calip", "calip_fs"])
def test_zero_betas_give_the_zero_shot_logits_exactly(name):
    task, test = random_task(tokens=6)
    calip = build(name, task, beta_source="paper", beta2=0.0, beta3=0.0)
    zero_shot = build("zero_shot", task)
    assert torch.equal(predict(calip, test), predict(zero_shot, test))
    assert not torch.equal(predict(build(name, task, beta_source="paper"), test), predict(zero_shot, test))


@pytest.mark.parametrize("tokens,dim,classes,options", [
    (49, 1024, 7, {}), (196, 512, 5, {}),  # RN50; ViT-B/16
    *((9, 64, 10, options) for options in [
        {}, {"pool": "mean"}, {"pool": "max"}, {"renorm": True}, {"attn_scale_text": 5.0, "attn_scale_visual": 0.5},
        {"chunk_size": 2}]),
])
def test_batched_terms_equal_the_per_image_equations(tokens, dim, classes, options):
    task, _ = random_task(num_classes=classes, dim=dim)
    calip = build("calip", task, beta_source="paper", beta2=1.3, beta3=0.7, **options)
    batch = random_batch(5, tokens, dim)
    expected = direct_calip(calip, batch, 1.3, 0.7)
    torch.testing.assert_close(calip(batch), expected, rtol=1e-5, atol=1e-4)
    assert (expected - calip.zero_shot_logits(batch.image)).abs().max() > 1e-2  # the attention terms do count


@pytest.mark.parametrize("proj_type,shared", [("linear_identity", True), ("linear_identity", False),
                                               ("mlp_bottleneck128", True)])
def test_calip_fs_with_trained_projections_equals_the_equations(proj_type, shared):
    task, _ = random_task(num_classes=6, dim=32)
    fs = build("calip_fs", task, beta2=0.8, beta3=0.3, proj_type=proj_type, shared_proj=shared)
    with torch.no_grad():  # away from the identity: the batched form must hold for any phi and psi
        for p in fs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = random_batch(4, 9, 32)
    torch.testing.assert_close(fs(batch), direct_calip(fs, batch, 0.8, 0.3), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shared", [True, False])
def test_calip_fs_at_initialisation_is_calip(shared):
    task, test = random_task(tokens=6)
    fs = build("calip_fs", task, shared_proj=shared)
    assert torch.equal(predict(fs, test), predict(build("calip", task, beta_source="paper"), test))


def test_one_training_step_changes_only_the_projections():
    task, _ = random_task(tokens=6)
    fs = build("calip_fs", task, train={"epochs": 1, "batch_size": 10_000, "lr": 1.0, "warmup_epochs": 0})
    trainable = {name for name, p in fs.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("phi.", "psi.")) for name in trainable)
    tensors = lambda: {name: v for name, v in fs.state_dict().items() if isinstance(v, torch.Tensor)}  # noqa: E731
    before = {name: value.clone() for name, value in tensors().items()}
    assert len(fit(fs, task.train, seed=0)) == 1  # one epoch = one step at this batch size
    changed = {name for name, value in tensors().items() if not torch.equal(value, before[name])}
    assert {"phi.text.query.weight", "phi.text.key.weight", "phi.text.value.weight", "psi.weight"} <= changed
    assert all(name.startswith(("phi.", "psi.")) for name in changed)


def test_search_picks_the_first_best_grid_pair_on_val():
    task, _ = random_task(num_classes=6, shots=8, tokens=6, seed=3)
    calip = build("calip", task, search={"steps": 6, "beta2_max": 5.0, "beta3_max": 2.0})
    chosen = calip.tune(task.val)
    reference = build("calip", task, beta_source="paper")
    scores = []
    for reference.beta2, reference.beta3 in itertools.product(torch.linspace(0, 5.0, 6).tolist(),
                                                               torch.linspace(0, 2.0, 6).tolist()):
        scores.append((accuracy(predict(reference, task.val), task.val.labels), reference.beta2, reference.beta3))
    best = max(scores, key=lambda s: s[0])  # max() keeps the first of equal scores, as the search must
    assert chosen["val_acc"] == pytest.approx(100 * best[0])  # in percent, as test/acc
    assert best[0] == accuracy(predict(calip, task.val), task.val.labels)
    assert (chosen["beta2"], chosen["beta3"]) == pytest.approx(best[1:]) and chosen["beta_source"] == "search"
    assert best[0] >= scores[0][0]  # the grid holds (0, 0): never worse than zero-shot CLIP on val
    assert calip.test_tuned == ()


def test_without_a_val_set_the_record_says_the_search_did_not_run_and_what_was_used():
    task, _ = random_task(tokens=6)
    calip = build("calip", task, beta2=0.4, beta3=0.03)
    chosen = calip.tune(None)
    assert (chosen["beta2"], chosen["beta3"]) == (0.4, 0.03)
    assert chosen["beta_source"] == "paper" and chosen["search"].startswith("did not run: no val set")
    assert calip.test_tuned == ("method.beta2", "method.beta3")  # the configured betas are the paper's test-tuned ones
    own = build("calip", task, beta2=0.4, beta3=0.03, betas_test_tuned=False)
    assert own.tune(None)["beta_source"] == "configured" and own.test_tuned == ()
    paper = build("calip_fs", task)
    assert paper.tune(task.val)["search"] == "did not run: beta_source=paper" and paper.test_tuned


@pytest.mark.parametrize("name", ["calip", "vt_clip"])
def test_a_search_without_dense_val_features_says_what_is_missing(name):
    task, _ = random_task(tokens=6)
    task.val.dense = None  # e.g. a features file with val_features but no val_dense
    with pytest.raises(ValueError, match="needs dense features of the val draw"):
        build(name, task).tune(task.val)


@pytest.mark.parametrize("option", [{"pool": "avg"}, {"beta_source": "search_val"}, {"proj_type": "mlp"}])
def test_bad_options_fail_in_one_line(option):
    task, _ = random_task(tokens=6)
    with pytest.raises(ValueError, match=rf"method\.{next(iter(option))}=\S+: use one of ") as error:
        build("calip_fs", task, **option)
    assert "\n" not in str(error.value)


def test_per_dataset_betas_compose_and_yield_to_overrides(tiny_config):
    assert (tiny_config("method=calip", "dataset=eurosat").method.beta2, ) == (6.08, )
    fs = tiny_config("method=calip_fs", "dataset=eurosat", "method.beta3=0.5").method
    assert (fs.beta2, fs.beta3, fs.beta_source) == (6.08, 0.5, "paper")
    assert tiny_config("method=calip").method.beta2 == 1.12  # synthetic: no table entry, the schema default


def test_test_set_search_is_the_named_leaky_mode(tiny_config, tmp_path):
    assert tiny_config("method=calip").protocol.selection == "last"  # the search sees val unless asked
    cfg = tiny_config("method=calip", "backbone=tiny_rn", "shots=1", "protocol.selection=test")
    leaky = run(cfg, tmp_path / "leaky")
    assert leaky["protocol"]["leaky"] is True and leaky["protocol"]["selection"] == "test"
    assert leaky["chosen"]["val_acc"] == pytest.approx(leaky["test/acc"])  # the search saw the test set


def test_calip_fs_runs_on_a_features_file_with_dense_features(tiny_config, tmp_path):
    task, test = random_task(num_classes=4, shots=3, dim=16, views=2, tokens=5)
    path = tmp_path / "features.npz"
    np.savez(path, train_features=task.train.image, train_labels=task.train.labels, train_dense=task.train.dense,
             val_features=task.val.image[:, 0], val_labels=task.val.labels, val_dense=task.val.dense[:, 0],
             test_features=test.image[:, 0], test_labels=test.labels, test_dense=test.dense[:, 0],
             text_features=task.text.numpy())
    metrics = run(tiny_config("method=calip_fs", "dataset=features", f"dataset.path={path}", "shots=2",
                              "method.train.epochs=2"), tmp_path / "out")
    assert metrics["protocol"]["method_fidelity"] == "reconstructed" and len(metrics["train/loss_history"]) == 2
    assert metrics["num_test"] == len(test) and 0 <= metrics["test/acc"] <= 100
    # the default beta_source=paper: the authors' test-tuned betas, so the run is flagged leaky and says why
    assert metrics["chosen"]["beta_source"] == "paper" and metrics["protocol"]["leaky"] is True
    assert metrics["protocol"]["test_tuned"] == ["method.beta2", "method.beta3"]
