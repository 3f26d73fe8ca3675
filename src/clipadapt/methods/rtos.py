"""RTOS: relation transition through open-semantic anchors (Yan et al., arXiv 2406.11252). RECONSTRUCTED.

Only the abstract could be read (spec: ../shared/specs/methods/rtos.md). As published (abstract and summaries):
- anchors are text concepts outside the target classes, and their [CLASS] token embeddings are learnable: they
  pass through the frozen text encoder at every step (one pass for all anchors, not per image);
- the Relation Transition Module is an attention with the image feature as query, the anchors' text features as
  keys and the anchor-to-target text similarity matrix as values; its output is the image-to-target relation;
- a training-free use of the same transition raises zero-shot accuracy.

Reconstructed (the spec's recommended reading; every open choice is a config key):
- anchor prompt "a photo of a {anchor}." with only the anchor's own BPE tokens learnable (init from the
  token-embedding table, or one N(0, 0.02^2) token per anchor with `anchors.init=random`); template, SOS/EOT,
  positions and the tower are frozen and cached, and sequences are cut after the longest end token;
- anchor vocabulary: class names of the other prepared benchmark datasets (their class lists under the data root)
  plus a word list (default: the packaged open_concepts.txt), target names removed, `anchors.num` drawn by a
  seeded permutation;
- relation R = softmax over anchors of cos(T, A) / tau_r (C x M); RTM: one cross-attention
  Att = softmax(f W_q (A W_k)^T / tau_a), O = Att R^T, with W_q, W_k identity-initialised (so step 0 is the
  training-free transition), optional heads and LayerNorm, no value projection and no FFN;
- logits = 100 f T^T + alpha * s_rt * O (or log O), cross-entropy; alpha searched on the few-shot val draw;
- optimiser: the shared loop's AdamW at `train.lr` (the RTM's rate). The anchors get their own rate
  `anchors.lr` by parameterising them as init + (anchors.lr / train.lr) * offset: Adam's step is invariant to
  gradient scale, so the offset moves at train.lr and the tokens at anchors.lr. The loop's weight decay then
  pulls the offset (not the tokens) towards zero, i.e. the anchors towards their initial words.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from clipadapt.features import unit_rows
from clipadapt.methods.base import Batch, Method, MethodSchema, TrainSchema, register_method
from clipadapt.vocab import cross_dataset_names, read_words, unique

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
RANDOM_PLACEHOLDER = "x"  # one BPE token whose embedding a random anchor token replaces


@dataclass
class AnchorSchema:
    sources: list[str] = field(default_factory=lambda: ["cross_dataset", "words"])  # cross_dataset | words
    words_file: Optional[str] = None  # null: the packaged clipadapt/vocab/open_concepts.txt
    datasets_root: Optional[str] = None  # where prepared datasets live (conf/method/rtos.yaml: ${paths.data_root})
    class_lists: list[str] = field(default_factory=lambda: [  # below datasets_root: whose class names become anchors
        "*/split_*.json", "imagenet/classnames.txt", "fgvc_aircraft/variants.txt"])
    num: int = 1000  # M (fewer when the pool is smaller)
    seed: int = 0  # the permutation that draws M names from the pool
    init: str = "names"  # names: the words' token embeddings | random: one N(0, init_std^2) token per anchor
    init_std: float = 0.02
    template: str = "a photo of a {}."
    learnable: bool = True
    lr: float = 2e-3  # the anchor tokens' learning rate (train.lr is the RTM's)
    exclude_targets: bool = True  # drop pool names equal to a target class name


@dataclass
class RelationSchema:
    mode: str = "softmax_anchor"  # softmax_anchor: softmax over anchors of cos / tau_r | raw_cosine
    tau_r: float = 0.01


@dataclass
class RTMSchema:
    heads: int = 1
    d_h: Optional[int] = None  # null: the embedding width D
    init: str = "identity"  # identity | xavier
    learnable: bool = True  # false: W_q, W_k stay at their initialisation
    tau_a: float = 0.01
    layernorm: bool = False
    output: str = "scaled"  # scaled: s_rt * O | log: log(O + 1e-8)
    s_rt: float = 100.0


@dataclass
class AlphaSearchSchema:
    enabled: bool = True
    alpha_min: float = 0.0  # 0 lets the val draw fall back to zero-shot CLIP
    alpha_max: float = 4.0
    steps: int = 41


@dataclass
class RTOSSchema(MethodSchema):
    fidelity: str = "reconstructed"
    alpha: float = 1.0  # fusion weight of the relation-transition logits
    anchors: AnchorSchema = field(default_factory=AnchorSchema)
    relation: RelationSchema = field(default_factory=RelationSchema)
    rtm: RTMSchema = field(default_factory=RTMSchema)
    search: AlphaSearchSchema = field(default_factory=AlphaSearchSchema)
    precision: str = "bf16"  # text tower under bf16 autocast on CUDA (fp32 master weights); CPU always runs fp32
    train: TrainSchema = field(default_factory=lambda: TrainSchema(
        epochs=20, batch_size=256, optimizer="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine"))


@dataclass
class RTOSZeroShotSchema(RTOSSchema):
    anchors: AnchorSchema = field(default_factory=lambda: AnchorSchema(learnable=False))
    rtm: RTMSchema = field(default_factory=lambda: RTMSchema(learnable=False))
    train: TrainSchema = field(default_factory=lambda: TrainSchema(epochs=0))


def anchor_vocabulary(cfg: AnchorSchema, targets: list[str]) -> list[str]:
    """The anchor names: the configured sources, de-duplicated, targets removed, `num` drawn by a seeded permutation."""
    pool: list[str] = []
    for source in cfg.sources:
        if source == "words":
            pool += read_words(cfg.words_file, "open_concepts.txt")
        elif source == "cross_dataset":
            pool += cross_dataset_names(cfg.datasets_root, list(cfg.class_lists))
        else:
            raise ValueError(f"method.anchors.sources has {source!r}: use cross_dataset and/or words")
    pool = unique(pool, exclude=targets if cfg.exclude_targets else ())
    if not pool:
        raise ValueError(f"no anchor names left from sources {list(cfg.sources)}: add a word list "
                         f"(method.anchors.words_file=...) or prepare other datasets")
    if len(pool) > cfg.num:
        keep = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.num]
        pool = [pool[i] for i in sorted(keep.tolist())]
    return pool


class AnchorPrompts(nn.Module):
    """The M anchor prompts with learnable anchor tokens scattered into frozen, cached token embeddings.

    Every prompt shares the template, so each anchor's tokens start at the same position `start`; anchors of
    different lengths are padded to `span` tokens and a mask keeps the frozen embedding at padded positions.
    """

    def __init__(self, encoder: nn.Module, names: list[str], template: str, init: str, init_std: float,
                 lr_scale: float, learnable: bool):
        super().__init__()
        if template.count("{}") != 1:
            raise ValueError(f"method.anchors.template={template!r} must contain exactly one {{}}")
        prefix = template.split("{}")[0]
        start = int(encoder.tokenize([prefix]).argmax(-1)[0])  # SOS + prefix tokens
        suffix = int(encoder.tokenize([template.format("")]).argmax(-1)[0]) - start  # tokens after the anchor
        words = names if init == "names" else [RANDOM_PLACEHOLDER] * len(names)
        ids = encoder.tokenize([template.format(w) for w in words])
        end = ids.argmax(-1)
        if int(end.max()) >= ids.shape[1] - 1:
            longest = words[int(end.argmax())]
            raise ValueError(f"anchor prompt for {longest!r} does not fit CLIP's context: "
                             f"shorten the names or the template")
        lengths = end - start - suffix
        own = encoder.tokenize(words).argmax(-1) - 1  # each word's token count when tokenised alone
        if not torch.equal(lengths, own):
            raise ValueError(f"method.anchors.template={template!r} merges tokens with the anchor word: "
                             f"separate {{}} from the template's words by spaces or punctuation")
        span = int(lengths.max())
        ids = ids[:, : int(end.max()) + 1]  # the causal tower never reads past the last end token
        with torch.no_grad():
            embeddings = encoder.embed(ids).float()
        mask = torch.arange(span, device=ids.device)[None] < lengths[:, None]
        if init == "names":
            initial = embeddings[:, start : start + span].clone()
        elif init == "random":
            initial = torch.randn(len(words), span, embeddings.shape[-1]) * init_std  # CPU draw: same on any device
        else:
            raise ValueError(f"method.anchors.init={init!r}: use names or random")
        self.start, self.span, self.lr_scale = start, span, lr_scale
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("frozen", embeddings, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("initial", initial.to(embeddings), persistent=init == "random")  # random: saved
        self.offset = nn.Parameter(torch.zeros_like(initial, device=embeddings.device), requires_grad=learnable)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def tokens(self) -> torch.Tensor:
        """The anchor token embeddings [M, span, W] (padded positions included)."""
        return self.initial + self.lr_scale * self.offset

    def sequences(self) -> torch.Tensor:
        """[M, L, W]: the frozen prompt embeddings with the anchor tokens in place."""
        start, stop = self.start, self.start + self.span
        anchor = torch.where(self.mask[..., None], self.tokens(), self.frozen[:, start:stop])
        return torch.cat([self.frozen[:, :start], anchor, self.frozen[:, stop:]], dim=1)


@register_method("rtos")
class RTOS(Method):
    Config = RTOSSchema
    tuned = ("alpha", "anchor_names")

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"method.precision={cfg.precision!r}: use one of {PRECISIONS}")
        for key, value, allowed in (("relation.mode", cfg.relation.mode, ("softmax_anchor", "raw_cosine")),
                                    ("rtm.output", cfg.rtm.output, ("scaled", "log")),
                                    ("rtm.init", cfg.rtm.init, ("identity", "xavier"))):
            if value not in allowed:
                raise ValueError(f"method.{key}={value!r}: use one of {allowed}")
        self.encoder = task.text_tower(cfg.name)
        if cfg.anchors.init == "random":
            names = [f"random {i}" for i in range(cfg.anchors.num)]
        else:
            names = anchor_vocabulary(cfg.anchors, task.classnames)
        self.anchor_names = names
        self.anchors = self._anchor_prompts(names)
        log.info("rtos: %d anchors (%s), %d learnable tokens of width %d", len(names), cfg.anchors.init,
                 int(self.anchors.mask.sum()), self.encoder.width)

        dim = task.text.shape[1]
        d_h, heads = cfg.rtm.d_h or dim, cfg.rtm.heads
        if d_h % heads:
            raise ValueError(f"method.rtm.d_h={d_h} must be divisible by method.rtm.heads={heads}")
        self.heads, self.alpha = heads, float(cfg.alpha)

        def projection() -> nn.Parameter:
            weight = torch.empty(dim, d_h, device=task.device)
            if cfg.rtm.init == "identity":  # step 0 is then the training-free transition with CLIP's own similarity
                nn.init.eye_(weight)
            else:
                nn.init.xavier_uniform_(weight)
            return nn.Parameter(weight, requires_grad=cfg.rtm.learnable)

        self.query, self.key = projection(), projection()
        self.norm_query = (nn.LayerNorm(dim) if cfg.rtm.layernorm else nn.Identity()).requires_grad_(cfg.rtm.learnable)
        self.norm_key = (nn.LayerNorm(dim) if cfg.rtm.layernorm else nn.Identity()).requires_grad_(cfg.rtm.learnable)
        self._fixed_anchors: torch.Tensor | None = None  # A, when the anchors are not learned
        self._frozen_state: tuple | None = None  # (version key, keys, relation) while evaluating

    # ----------------------------------------------------------------- anchors and relation
    def _anchor_prompts(self, names: list[str]) -> AnchorPrompts:
        anchors, lr = self.cfg.anchors, self.cfg.train.lr
        return AnchorPrompts(self.encoder, names, anchors.template, anchors.init, anchors.init_std,
                             anchors.lr / lr if lr > 0 else 1.0, anchors.learnable).to(self.text.device)

    def set_extra_state(self, state: dict) -> None:
        """A saved model keeps its anchors, whatever the vocabulary on disk holds now (datasets prepared since)."""
        if state["anchor_names"] != self.anchor_names:
            self.anchors = self._anchor_prompts(state["anchor_names"])
            self._fixed_anchors = None
        super().set_extra_state(state)

    def anchor_features(self) -> torch.Tensor:
        """A [M, D]: all anchor prompts through the frozen text tower in one pass (once, if the anchors are fixed)."""
        if self.anchors.offset.requires_grad:
            return self._encode_anchors()
        if self._fixed_anchors is None:
            with torch.no_grad():
                self._fixed_anchors = self._encode_anchors()
        return self._fixed_anchors

    def _encode_anchors(self) -> torch.Tensor:
        sequences = self.anchors.sequences()
        bf16 = self.cfg.precision == "bf16" and sequences.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            features = self.encoder(sequences, self.anchors.ids)
        return F.normalize(features.float(), dim=-1)

    def relation(self, anchors: torch.Tensor) -> torch.Tensor:
        """R [C, M]: how each target class relates to each anchor (text-text)."""
        similarity = self.text @ anchors.t()
        if self.cfg.relation.mode == "raw_cosine":
            return similarity
        return torch.softmax(similarity / self.cfg.relation.tau_r, dim=-1)

    def _state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected keys [H, M, d], relation [C, M]): recomputed every training step, cached while evaluating."""
        if torch.is_grad_enabled():
            self._frozen_state = None
            return self._compute_state()
        version = (id(self.text), self.text._version, *(p._version for p in self.parameters() if p.requires_grad))
        if self._frozen_state is None or self._frozen_state[0] != version:
            self._frozen_state = (version, *self._compute_state())
        return self._frozen_state[1:]

    def _compute_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        anchors = self.anchor_features()
        keys = self._split_heads(self.norm_key(anchors) @ self.key)
        return keys, self.relation(anchors)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(0, 1)  # [N, d_h] -> [H, N, d_h / H]

    # ----------------------------------------------------------------- relation transition
    def transition(self, image: torch.Tensor) -> torch.Tensor:
        """O [B, C]: the image's attention over anchors carried through the anchor-to-target relation."""
        keys, relation = self._state()
        queries = self._split_heads(self.norm_query(image) @ self.query)  # [H, B, d]
        attention = torch.softmax(queries @ keys.transpose(1, 2) / self.cfg.rtm.tau_a, dim=-1)  # [H, B, M]
        return (attention @ relation.t()).mean(0)

    def transition_logits(self, image: torch.Tensor) -> torch.Tensor:
        out = self.transition(image)
        return torch.log(out + 1e-8) if self.cfg.rtm.output == "log" else self.cfg.rtm.s_rt * out

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.zero_shot_logits(batch.image) + self.alpha * self.transition_logits(batch.image)

    def retarget(self, classnames, text):
        super().retarget(classnames, text)  # the relation is recomputed from the new class text: any class set works
        self._frozen_state = None

    # ----------------------------------------------------------------- after training
    @torch.no_grad()
    def diagnostics(self) -> dict:
        """Spec 6 #14: how far the anchor tokens moved from their start, and how peaked the relation rows are."""
        initial = self.anchors.initial[self.anchors.mask]
        moved = (self.anchors.tokens()[self.anchors.mask] - initial).norm(dim=-1)
        moved = moved / initial.norm(dim=-1).clamp_min(1e-12)
        out = {"num_anchors": len(self.anchors), "anchor_drift": float(moved.mean())}
        if self.cfg.relation.mode == "softmax_anchor":
            relation = self._state()[1]
            entropy = -(relation * relation.clamp_min(1e-12).log()).sum(-1).mean()
            out.update(relation_entropy=float(entropy), relation_entropy_max=math.log(len(self.anchors)))
        return out

    @torch.no_grad()
    def tune(self, val):
        chosen = {"alpha": self.alpha, **self.diagnostics()}
        if val is None or len(val) == 0:
            return chosen
        image = unit_rows(val.image[:, 0], self.text.device)
        labels = torch.as_tensor(val.labels, device=image.device)
        zero_shot, transition = self.zero_shot_logits(image), self.transition_logits(image)
        accuracy = lambda logits: (logits.argmax(-1) == labels).float().mean(-1)  # noqa: E731
        chosen.update(val_acc_fixed_alpha=float(accuracy(zero_shot + self.alpha * transition)),
                      val_acc_transition_only=float(accuracy(transition)))
        search = self.cfg.search
        if search.enabled:
            alphas = torch.linspace(search.alpha_min, search.alpha_max, search.steps, device=image.device)
            scores = accuracy(zero_shot + alphas[:, None, None] * transition)  # [A]
            best = torch.nonzero(scores == scores.max()).flatten()
            # ties (common on a few-shot val draw) go to the alpha nearest the configured one
            self.alpha = float(alphas[best[(alphas[best] - self.alpha).abs().argmin()]])
            chosen.update(alpha=self.alpha, val_acc=float(scores.max()))
        return chosen


@register_method("rtos_zs")
class RTOSZeroShot(RTOS):
    """The spec's training-free variant: fixed anchor names, identity projections, alpha searched on val."""

    Config = RTOSZeroShotSchema
