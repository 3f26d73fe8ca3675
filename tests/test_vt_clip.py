"""VT-CLIP (reconstructed): exact properties of the block and the residual blend on random features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clipadapt.engine import accuracy, fit, predict
from clipadapt.methods import Batch, build_method
from clipadapt.methods.vt_clip import VisualGuidedAttention, VisualGuidedBlock
from conftest import random_task


def build(task, **options):
    return build_method(OmegaConf.create({"name": "vt_clip", **options}), task).eval()


def random_batch(images: int, tokens: int, dim: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(images, dim, generator=g), dim=-1)
    return Batch(image=image, dense=F.normalize(torch.randn(images, tokens, dim, generator=g), dim=-1))


@pytest.mark.parametrize("options", [{}, {"residual_mode": "additive"}, {"norm": "pre", "include_global": True}])
def test_residual_ratio_zero_gives_the_zero_shot_logits_exactly(options):
    task, test = random_task(tokens=6)
    vt = build(task, alpha=0.0, **options)
    assert torch.equal(predict(vt, test), predict(build_method(OmegaConf.create({"name": "zero_shot"}), task), test))
    assert not torch.equal(predict(build(task, **options), test), predict(vt, test))


@pytest.mark.parametrize("mode", ["convex", "additive"])
def test_logits_are_the_global_feature_against_the_blended_texts(mode):
    task, _ = random_task(num_classes=6, dim=32)
    task.text = F.normalize(task.text.double(), dim=-1).float()  # unit texts, as the spec's formula assumes
    vt = build(task, alpha=0.3, residual_mode=mode)
    batch = random_batch(4, 7, 32)
    guided = vt.guided_texts(batch.image, batch.dense)  # s^_k(x), unit
    assert torch.allclose(guided.norm(dim=-1), torch.ones(4, 6))
    mix = (0.7 if mode == "convex" else 1.0) * vt.text + 0.3 * guided
    expected = 100 * torch.einsum("bd,bkd->bk", batch.image, F.normalize(mix, dim=-1))
    torch.testing.assert_close(vt(batch), expected, rtol=1e-5, atol=1e-4)


def test_attention_over_identical_tokens_returns_that_token():
    attention = VisualGuidedAttention(32, heads=4)
    g = torch.Generator().manual_seed(0)
    queries, token = torch.randn(5, 32, generator=g), torch.randn(3, 1, 32, generator=g)
    same = token.expand(3, 9, 32)  # nine copies of one token per image
    expected = attention.out(attention.value(token)).expand(3, 5, 32)  # the attention weights sum to one
    torch.testing.assert_close(attention(queries, same), expected)
    with torch.no_grad():
        for layer in (attention.value, attention.out):
            layer.weight.copy_(torch.eye(32)), layer.bias.zero_()
    torch.testing.assert_close(attention(queries, same), token.expand(3, 5, 32))


@pytest.mark.parametrize("classes,tokens,dim", [(10, 49, 64), (7, 196, 32), (3, 4, 64)])
def test_shapes_for_k_classes_and_m_tokens(classes, tokens, dim):
    task, _ = random_task(num_classes=classes, dim=dim)
    vt = build(task, layers=2)
    batch = random_batch(5, tokens, dim)
    assert vt.blocks[0](vt.text, batch.dense).shape == (5, classes, dim)
    assert vt.guided_texts(batch.image, batch.dense).shape == (5, classes, dim)
    assert vt(batch).shape == (5, classes) and torch.isfinite(vt(batch)).all()


@pytest.mark.parametrize("dim,ratio,count", [(1024, 4, 12_596_224), (512, 4, 3_152_384), (1024, 1, 6_301_696)])
def test_parameter_count_matches_the_spec(dim, ratio, count):
    block = VisualGuidedBlock(dim, heads=8, ffn_ratio=ratio, dropout=0.1, norm="post")
    assert sum(p.numel() for p in block.parameters()) == count


def test_one_training_step_changes_only_the_block():
    task, _ = random_task(tokens=6)
    vt = build(task, train={"epochs": 1, "batch_size": 10_000, "warmup_epochs": 0, "lr": 1e-2})
    assert all(name.startswith("blocks.") for name, p in vt.named_parameters() if p.requires_grad)
    before = {name: value.clone() for name, value in vt.state_dict().items() if isinstance(value, torch.Tensor)}
    assert len(fit(vt, task.train, seed=0)) == 1  # one epoch = one step at this batch size
    changed = {name for name, value in before.items() if not torch.equal(vt.state_dict()[name], value)}
    assert {"blocks.0.attention.query.weight", "blocks.0.attention.value.weight", "blocks.0.ffn.0.weight"} <= changed
    assert all(name.startswith("blocks.") for name in changed) and "text" in before


def test_invariant_to_the_order_of_the_dense_tokens():
    task, _ = random_task(num_classes=6, dim=32)
    vt = build(task, layers=2, include_global=True)
    batch = random_batch(4, 11, 32)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    shuffled = Batch(image=batch.image, dense=batch.dense[:, order])
    torch.testing.assert_close(vt(shuffled), vt(batch))


def test_classes_are_independent_and_chunking_changes_nothing():
    task, test = random_task(num_classes=6, tokens=6)
    vt = build(task)
    logits = predict(vt, test)
    one_by_one = build(task, chunk_size=1)
    one_by_one.load_state_dict(vt.state_dict())
    torch.testing.assert_close(predict(one_by_one, test), logits)
    subset = [4, 1, 2]
    vt.retarget([task.classnames[k] for k in subset], task.text[subset])
    torch.testing.assert_close(predict(vt, test), logits[:, subset])


def test_alpha_search_picks_the_best_candidate_on_val():
    task, _ = random_task(num_classes=6, shots=8, tokens=6, seed=2)
    vt = build(task, alpha=0.5, search={"alphas": [0.0, 0.2, 0.9, 1.0]}, train={"epochs": 5, "lr": 1e-3})
    fit(vt, task.train, seed=0)  # a trained block
    scores = {}
    for alpha in (0.5, 0.0, 0.2, 0.9, 1.0):
        vt.alpha = alpha
        scores[alpha] = accuracy(predict(vt, task.val), task.val.labels)
    vt.alpha = 0.5
    chosen = vt.tune(task.val)
    assert chosen["trained_alpha"] == 0.5 and chosen["val_acc"] == pytest.approx(100 * max(scores.values()))  # percent
    assert scores[chosen["alpha"]] == max(scores.values())
    assert chosen["alpha"] == 0.5 or scores[0.5] < max(scores.values())  # ties keep the trained alpha


@pytest.mark.parametrize("option,message", [({"residual_mode": "mul"}, "method.residual_mode=mul: use one of convex, additive"),
                                             ({"heads": 5}, "must divide the feature width 32")])
def test_bad_options_fail_in_one_line(option, message):
    task, _ = random_task(tokens=6)
    with pytest.raises(ValueError, match=message) as error:
        build(task, **option)
    assert "\n" not in str(error.value)
