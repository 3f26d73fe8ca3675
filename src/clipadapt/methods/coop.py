"""CoOp (Zhou et al., IJCV 2022): learnable context tokens before the class name, through the frozen text tower.

As published: class-shared context of `n_ctx` vectors, either random N(0, 0.02^2) ("X X ... X <name>.") or the
token embeddings of `ctx_init` words ("a photo of a <name>."), class token at the end; logits = 100 * image .
normalised text features; SGD lr 2e-3 (momentum 0.9, weight decay 5e-4), one constant warm-up epoch at 1e-5,
cosine, batch 32, epochs by shots (50 / 100 / 100 / 200 / 200; ImageNet 50 at every K). Only the context is
trained. Dassl's loop (configs/trainers/CoOp/*.yaml on Dassl.pytorch): the lr steps once per epoch, after it, and
the last partial batch is dropped when the draw holds a full one (`train.schedule_unit=epoch`, `drop_last`).
Our change: the image tower is frozen, so training runs over CACHED features of the augmented train views (one
random view per image per epoch) instead of re-encoding crops: one text-tower pass per step covers all classes,
and no image is encoded during training.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipadapt.method_schemas import CoOpSchema
from clipadapt.methods.base import LOGIT_SCALE, Batch, FewShotTask, Method, register_method

log = logging.getLogger(__name__)


def encode_prompts(encoder: nn.Module, sequences: torch.Tensor, ids: torch.Tensor, precision: str) -> torch.Tensor:
    """Normalised fp32 text features [N, D] of token-embedding sequences [N, L, W]; bf16 autocast on CUDA only."""
    bf16 = precision == "bf16" and sequences.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        features = encoder(sequences, ids)
    return F.normalize(features.float(), dim=-1)


class ClassPrompts(nn.Module):
    """Frozen pieces of "<SOS> c_1 .. c_n <class name>. <EOT>" for each class: the slots c_i are filled by the caller.

    Token ids and embeddings are cut after the longest end-of-text position (what the prompt encoder reads anyway),
    so K prompts cost K x (longest prompt) tokens, not K x 77.
    """

    def __init__(self, encoder: nn.Module, classnames: list[str], n_ctx: int, ctx_words: str = ""):
        super().__init__()
        placeholder = ctx_words or " ".join(["X"] * n_ctx)
        ids = encoder.tokenize([f"{placeholder} {name.replace('_', ' ')}." for name in classnames])
        ids = ids[:, : int(ids.argmax(dim=-1).max()) + 1]
        with torch.no_grad():
            embeddings = encoder.embed(ids).float()
        self.n_ctx = n_ctx
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("prefix", embeddings[:, :1], persistent=False)  # SOS
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx :], persistent=False)  # name, ".", EOT, padding
        self.register_buffer("slots", embeddings[0, 1 : 1 + n_ctx].clone(), persistent=False)  # ctx_words' embeddings

    def __len__(self) -> int:
        return self.ids.shape[0]

    def sequences(self, ctx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L, W] with ctx [n_ctx, W] (shared) or [N, n_ctx, W] (one per row); rows picks classes (default all)."""
        prefix, suffix = (self.prefix, self.suffix) if rows is None else (self.prefix[rows], self.suffix[rows])
        if ctx.dim() == 2:
            ctx = ctx.expand(prefix.shape[0], -1, -1)
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)

    def token_ids(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.ids if rows is None else self.ids[rows]


def count_tokens(encoder: nn.Module, words: str) -> int:
    ids = encoder.tokenize([words])[0]
    return int(ids.argmax()) - 1  # between SOS (position 0) and EOT


def epochs_for_shots(epochs_by_shots: dict, shots: int) -> int:
    """The schedule's entry for `shots`, or for the largest listed count below it (a draw can hold fewer)."""
    listed = sorted(int(k) for k in epochs_by_shots)
    below = [k for k in listed if k <= shots]
    if not below:
        raise ValueError(f"epochs_by_shots {dict(epochs_by_shots)} has no entry for {shots} shots: add one, or set train.epochs")
    return int(epochs_by_shots[below[-1]])


def shots_of(task: FewShotTask) -> int:
    """K of the draw: every class with at least K train images contributes exactly K of them."""
    return int(np.bincount(np.asarray(task.train.labels)).max()) if len(task.train) else 0


@register_method("coop")
class CoOp(Method):
    Config = CoOpSchema
    augmentation = "dassl"  # CoOp's configs: random_resized_crop (scale 0.08-1, bicubic) + random_flip

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        self.text_tower = task.text_tower(cfg.name)
        if cfg.ctx_init:
            n_ctx = count_tokens(self.text_tower, cfg.ctx_init)
            if n_ctx != cfg.n_ctx:
                log.info("coop: ctx_init %r is %d tokens: n_ctx set to %d", cfg.ctx_init, n_ctx, n_ctx)
            cfg.n_ctx = n_ctx
        if cfg.train.epochs is None:
            shots = shots_of(task)
            cfg.train.epochs = epochs_for_shots(cfg.epochs_by_shots, shots)
            log.info("coop: %d shots -> %d epochs", shots, cfg.train.epochs)
        self.prompts = ClassPrompts(self.text_tower, task.classnames, cfg.n_ctx, cfg.ctx_init)
        if cfg.ctx_init:
            ctx = self.prompts.slots.clone()
        else:
            ctx = (torch.randn(cfg.n_ctx, self.text_tower.width) * cfg.init_std).to(task.device)  # CPU draw: same on any device
        self.ctx = nn.Parameter(ctx)
        self._eval_text: torch.Tensor | None = None  # text features cached while evaluating

    def text_features(self) -> torch.Tensor:
        """[K, D]: one text-tower pass over every class prompt with the current context."""
        if self.training or torch.is_grad_enabled():
            return encode_prompts(self.text_tower, self.prompts.sequences(self.ctx), self.prompts.ids, self.cfg.precision)
        if self._eval_text is None:  # evaluation streams test batches: encode the classes once
            self._eval_text = encode_prompts(self.text_tower, self.prompts.sequences(self.ctx), self.prompts.ids, self.cfg.precision)
        return self._eval_text

    def forward(self, batch: Batch) -> torch.Tensor:
        return LOGIT_SCALE * batch.image @ self.text_features().t()

    def train(self, mode: bool = True):
        self._eval_text = None
        return super().train(mode)

    def retarget(self, classnames: list[str], text: torch.Tensor) -> None:
        """Prompts for another class set with the learned context (base-to-new, cross-dataset)."""
        super().retarget(classnames, text)
        self.prompts = ClassPrompts(self.text_tower, classnames, self.cfg.n_ctx, self.cfg.ctx_init)
        self._eval_text = None
