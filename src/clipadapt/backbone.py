"""CLIP through open_clip: the only module that imports open_clip.

Everything a method or the feature cache needs from the model goes through `ClipBackbone`:
- global image features (raw) and dense (per-location) features (L2-normalised) in the joint space;
- class text features from one template or an ensemble;
- `PromptEncoder`, the text tower called on token embeddings, so that methods can insert learnable tokens.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipadapt._compat import ensure_torchvision

ensure_torchvision()
import open_clip  # noqa: E402

log = logging.getLogger(__name__)

# Tiny random-init models for tests and the offline demo (64 px images, 4x4 = 16 dense tokens).
open_clip.add_model_config(Path(__file__).parent / "model_configs")
RANDOM_INIT_SEED = 0


class BackboneError(RuntimeError):
    """A backbone that cannot be built as configured; the message says what to change."""


def _check_offline_tag(model: str, pretrained: str) -> None:
    """Fail in seconds (not after a minute of hub retries) when a pretrained tag cannot be fetched offline."""
    if Path(pretrained).is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise BackboneError(
            f"unknown pretrained tag {pretrained!r} for {model}: use one of {sorted(tags)}, "
            f"a local weights file (backbone.pretrained=/path/to/weights.pt) or none (random init)"
        )
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    try:
        from huggingface_hub import try_to_load_from_cache

        hub_id = cfg.get("hf_hub", "").rstrip("/")
        cached = hub_id and any(
            isinstance(try_to_load_from_cache(hub_id, f), str)
            for f in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
        )
    except Exception:  # noqa: BLE001 - an unreadable hub cache just means "not cached"
        cached = False
    if not cached and (os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()):
        raise BackboneError(
            f"pretrained weights {model}/{pretrained} are not cached and the model hub cannot be reached: "
            f"connect once to download them, or pass a local file: backbone.pretrained=/path/to/weights.pt"
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub: offline machines answer in seconds instead of a minute of download retries."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class ClipBackbone(nn.Module):
    """A frozen open_clip model with the few calls the runner needs."""

    def __init__(self, model: str, pretrained: str | None = None, dense: str = "attention", device: str = "cpu"):
        super().__init__()
        if dense not in ("attention", "value"):
            raise BackboneError(f"backbone.dense must be 'attention' or 'value', got {dense!r}")
        if model not in open_clip.list_models():
            raise BackboneError(f"unknown open_clip model {model!r}: see open_clip.list_models() for the valid names")
        self.dense = dense
        if pretrained:
            _check_offline_tag(model, pretrained)
        try:
            with torch.random.fork_rng():  # a random-init model is the same model in every process
                torch.manual_seed(RANDOM_INIT_SEED)
                clip, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained or None)
        except Exception as error:  # hub/network failures surface as many exception types
            raise BackboneError(
                f"could not load {model}/{pretrained}: {error.__class__.__name__}: {str(error).splitlines()[0]} "
                f"- offline? pass a local file: backbone.pretrained=/path/to/weights.pt"
            ) from error
        self.clip = clip.eval().requires_grad_(False).to(device)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = torch.device(device)

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def embed_dim(self) -> int:
        return int(self.encode_texts(["x"], ["{}"]).shape[-1])

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, dense: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Global features [B, D] as CLIP outputs them (not normalised: Tip-Adapter's cache keys average raw views)
        and, if asked, dense features [B, M, D] with every row L2-normalised."""
        pixels = pixels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            if not dense:
                return self.clip.encode_image(pixels).float(), None
            visual = self.clip.visual
            if hasattr(visual, "attnpool"):
                tokens = _resnet_tokens(visual, pixels, self.dense)
            elif hasattr(visual, "ln_post") and hasattr(visual, "proj"):
                tokens = _vit_tokens(visual, pixels)
            else:
                raise BackboneError(f"dense features are implemented for CLIP ResNet and ViT towers, not {type(visual).__name__}")
        tokens = tokens.float()
        if self.dense == "value" and hasattr(visual, "attnpool"):  # token 0 is the mean token's value, not f
            return self.encode_images(pixels)[0], F.normalize(tokens[:, 1:], dim=-1)
        return tokens[:, 0], F.normalize(tokens[:, 1:], dim=-1)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_texts(self, classnames: list[str], templates: list[str]) -> torch.Tensor:
        """Class text features [K, D]: each template's embedding normalised, averaged over templates, re-normalised."""
        per_template = []
        for template in templates:
            prompts = [template.format(name.replace("_", " ")) for name in classnames]
            ids = self.tokenizer(prompts).to(self.device)
            per_template.append(F.normalize(self.clip.encode_text(ids).float(), dim=-1))
        return F.normalize(torch.stack(per_template).mean(0), dim=-1)

    def prompt_encoder(self) -> "PromptEncoder":
        return PromptEncoder(self.clip, self.tokenizer)


def _resnet_tokens(visual: nn.Module, pixels: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, 1 + HW, D]: ResNet's last map through the attention pool.

    "attention" evaluates the pool's multi-head attention with every location as a query (CALIP's official code):
    token 0 is the usual global embedding. "value" applies only the value and output projections per location
    (MaskCLIP); its token 0 is the spatial mean, so the caller takes the global feature from encode_image.
    """
    feature_map = visual.forward_intermediates(pixels, indices=1, intermediates_only=True)["image_intermediates"][-1]
    pool = visual.attnpool
    x = feature_map.flatten(2).permute(2, 0, 1)  # [HW, B, C]
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :].to(x.dtype)
    if mode == "value":
        out = pool.c_proj(pool.v_proj(x))
    else:
        out, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False,
        )
    return out.permute(1, 0, 2)


def _vit_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 1 + N, D]: every token after the last block through the final norm and projection (token 0 = CLS)."""
    x = visual.transformer(visual._embeds(pixels))
    return visual.ln_post(x) @ visual.proj


class PromptEncoder(nn.Module):
    """CLIP's text tower called on token embeddings, for methods that learn tokens (CoOp, RTOS, SHIP).

    `token_ids` marks where each sequence ends (CLIP pools at the end-of-text token, the largest id);
    sequences are cut after the longest end position, which gives the same features as the full 77 tokens
    because CLIP's causal mask hides later positions from earlier ones.
    """

    def __init__(self, clip: nn.Module, tokenizer):
        super().__init__()
        if not hasattr(clip, "token_embedding"):
            raise BackboneError(f"{type(clip).__name__} has no CLIP-style text tower to insert learnable tokens into")
        self.clip = clip
        self.tokenizer = tokenizer

    def train(self, mode: bool = True) -> "PromptEncoder":
        """Always eval: the tower is frozen, and it is the feature extractor's model too (a ResNet image tower's
        BatchNorm must keep its statistics when a method holding this encoder is put in training mode)."""
        return super().train(False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.clip.token_embedding.weight.device)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Frozen token embeddings [N, L, W] of token ids [N, L]."""
        return self.clip.token_embedding(token_ids)

    @property
    def width(self) -> int:
        return self.clip.token_embedding.weight.shape[1]

    def forward(self, token_embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Normalised text features [N, D] from token embeddings [N, L, W] (L <= 77) and their token ids."""
        length = int(token_ids.argmax(dim=-1).max()) + 1
        clip = self.clip
        x = token_embeddings[:, :length] + clip.positional_embedding[:length].to(token_embeddings.dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), token_ids[:, :length].argmax(dim=-1)]
        projection = clip.text_projection
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x, dim=-1)
