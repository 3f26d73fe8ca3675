"""The open_clip wrapper: features equal open_clip's own, weights from a file, clear errors offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipadapt.backbone import BackboneError, ClipBackbone
from clipadapt.run import run


def test_zero_shot_from_cache_equals_open_clip(tiny_config, tmp_path):
    """The whole runner (extraction, fp16 cache, evaluator) against open_clip's own encode-and-compare."""
    import open_clip

    cfg = tiny_config("method=zero_shot", "shots=1", "save_logits=true")
    run(cfg, tmp_path)
    saved = np.load(tmp_path / "logits.npz")

    from clipadapt.data import build_dataset

    dataset = build_dataset(cfg.dataset, Path(cfg.paths.data_root))
    torch.manual_seed(0)  # ClipBackbone's random-init seed
    model, _, preprocess = open_clip.create_model_and_transforms("clipadapt-tiny-vit")
    tokenizer = open_clip.get_tokenizer("clipadapt-tiny-vit")
    model.eval()
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(dataset.image_root / i.path).convert("RGB")) for i in dataset.test])
        prompts = [dataset.templates[0].format(name) for name in dataset.classnames]
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        expected = 100 * image_features @ text_features.t()
    np.testing.assert_allclose(saved["logits"], expected.numpy(), atol=0.15)  # fp16 cache, logits scale 100
    np.testing.assert_array_equal(saved["labels"], [i.label for i in dataset.test])


def test_random_init_is_the_same_model_everywhere():
    torch.manual_seed(123)
    a = ClipBackbone("clipadapt-tiny-rn")
    torch.manual_seed(456)
    b = ClipBackbone("clipadapt-tiny-rn")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(a.encode_images(x)[0], b.encode_images(x)[0])


def test_weights_from_a_local_file(tmp_path):
    source = ClipBackbone("clipadapt-tiny-vit")
    with torch.no_grad():
        for p in source.clip.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(source.clip.state_dict(), tmp_path / "weights.pt")
    loaded = ClipBackbone("clipadapt-tiny-vit", pretrained=str(tmp_path / "weights.pt"))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.encode_images(x)[0], source.encode_images(x)[0])
    assert not torch.allclose(ClipBackbone("clipadapt-tiny-vit").encode_images(x)[0], source.encode_images(x)[0])


def test_offline_pretrained_tag_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import open_clip

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_download)
    with pytest.raises(BackboneError, match="backbone.pretrained=/path/to/weights.pt"):
        ClipBackbone("RN50", pretrained="openai")


@pytest.mark.parametrize("model,pretrained,message", [
    ("RN50", "no_such_tag", "unknown pretrained tag 'no_such_tag' for RN50: use one of"),
    ("NoSuchNet", None, "unknown open_clip model 'NoSuchNet'"),
])
def test_bad_backbone_names(model, pretrained, message):
    with pytest.raises(BackboneError, match=message):
        ClipBackbone(model, pretrained=pretrained)


def test_prompt_encoder_equals_encode_text():
    backbone = ClipBackbone("clipadapt-tiny-vit")
    encoder = backbone.prompt_encoder()
    ids = encoder.tokenize(["a photo of a striped circle.", "dog"])
    expected = F.normalize(backbone.clip.encode_text(ids), dim=-1)
    torch.testing.assert_close(encoder(encoder.embed(ids), ids), expected, atol=1e-5, rtol=1e-5)
