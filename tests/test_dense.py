"""Dense CLIP features (CALIP spec section 2.2) on the tiny random models, and the evaluator's streaming read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipadapt.backbone import ClipBackbone
from clipadapt.engine import predict
from clipadapt.features import FeatureSet, read_rows
from clipadapt.methods import build_method
from conftest import random_task


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def assert_unit_rows(x: torch.Tensor) -> None:
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def vit():
    return ClipBackbone("clipadapt-tiny-vit")


@pytest.fixture(scope="module", params=["attention", "value"])
def resnet(request):
    return ClipBackbone("clipadapt-tiny-rn", dense=request.param)


def test_vit_tokens_are_ln_post_and_proj_of_every_token(vit):
    x = pixels()
    image, dense = vit.encode_images(x, dense=True)
    visual = vit.clip.visual
    assert image.shape == (3, 64) and dense.shape == (3, (64 // 16) ** 2, 64)  # 4 x 4 patches
    assert_unit_rows(dense)  # the global feature stays raw (CLIP's output), the dense tokens are unit rows
    torch.testing.assert_close(image, vit.encode_images(x)[0], rtol=0, atol=1e-6)  # token 0 = the global embedding
    torch.testing.assert_close(image, vit.clip.encode_image(x), rtol=0, atol=1e-6)
    visual.output_tokens = True  # open_clip's own path: ln_post'ed patch tokens, not projected
    try:
        _, patch_tokens = visual(x)
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(dense, unit(patch_tokens @ visual.proj), rtol=0, atol=1e-6)


def reference_pool(pool, feature_map: torch.Tensor, query: int) -> torch.Tensor:
    """CLIP's attention pool written out per head, with token `query` (0 = the mean token) as the only query."""
    x = feature_map.flatten(2).permute(0, 2, 1)  # [B, HW, C]
    x = torch.cat([x.mean(1, keepdim=True), x], 1) + pool.positional_embedding
    heads, width = pool.num_heads, x.shape[-1]
    split = lambda t: t.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # noqa: E731  [B, h, L, d]
    q, k, v = split(pool.q_proj(x[:, query : query + 1])), split(pool.k_proj(x)), split(pool.v_proj(x))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
    return pool.c_proj((weights @ v).transpose(1, 2).flatten(-2))[:, 0]


def test_resnet_tokens_follow_the_dense_mode(resnet):
    x = pixels()
    image, dense = resnet.encode_images(x, dense=True)
    visual = resnet.clip.visual
    feature_map = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
    pool, locations = visual.attnpool, feature_map.shape[2] * feature_map.shape[3]
    assert image.shape == (3, 64) and dense.shape == (3, locations, 64) and locations == 4  # 2 x 2 map
    assert_unit_rows(dense)  # the global feature stays raw (CLIP's output), the dense tokens are unit rows
    torch.testing.assert_close(image, resnet.encode_images(x)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(image, reference_pool(pool, feature_map, 0), rtol=1e-5, atol=1e-5)
    if resnet.dense == "attention":  # CALIP's official tokens: the pool with location m as the query
        expected = torch.stack([reference_pool(pool, feature_map, m + 1) for m in range(locations)], 1)
    else:  # MaskCLIP's value path: c_proj(v_proj(location + its positional embedding))
        tokens = feature_map.flatten(2).permute(0, 2, 1) + pool.positional_embedding[1:]
        expected = pool.c_proj(pool.v_proj(tokens))
    torch.testing.assert_close(dense, unit(expected), rtol=0, atol=1e-5)


def test_read_rows_returns_exactly_the_memmap_rows(tmp_path):
    array = np.random.default_rng(0).standard_normal((37, 2, 5, 8)).astype(np.float16)
    np.save(tmp_path / "features.npy", array)
    mapped = np.load(tmp_path / "features.npy", mmap_mode="r")
    for start, stop in [(0, 10), (10, 20), (30, 64), (36, 37), (5, 5), (40, 50)]:
        rows = read_rows(mapped, start, stop)
        assert type(rows) is np.ndarray and rows.dtype == array.dtype
        np.testing.assert_array_equal(rows, mapped[start:stop])
    np.testing.assert_array_equal(read_rows(mapped[3:], 0, 5), array[3:8])  # a slice of a map: plain indexing
    np.testing.assert_array_equal(read_rows(array, 2, 4), array[2:4])  # an in-memory array


def test_predict_streams_a_memory_mapped_dense_cache_like_memory(tmp_path):
    task, test = random_task(tokens=6)
    for name in ("image", "dense"):
        np.save(tmp_path / f"{name}.npy", getattr(test, name))
    mapped = FeatureSet(image=np.load(tmp_path / "image.npy", mmap_mode="r"), labels=test.labels,
                        dense=np.load(tmp_path / "dense.npy", mmap_mode="r"))
    from omegaconf import OmegaConf

    calip = build_method(OmegaConf.create({"name": "calip", "beta_source": "paper"}), task)
    assert torch.equal(predict(calip, mapped, batch_size=7), predict(calip, test, batch_size=7))
