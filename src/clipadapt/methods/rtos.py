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
- anchor vocabulary: class names of the other benchmark datasets (the lists shipped in clipadapt/vocab/classes/,
  so the pool does not depend on which datasets are prepared) plus a word list (default: the packaged
  open_concepts.txt). Every class of every dataset the cell is evaluated on is kept out: the task's classes (base
  and new), its dataset's whole shipped list, and those of transfer targets. `anchors.num` are drawn by a seeded
  permutation; the pool's size and the anchors' hash go to metrics.json, the anchors to anchors.txt;
- relation R = softmax over anchors of cos(T, A) / tau_r (C x M); RTM: one cross-attention
  Att = softmax(f W_q (A W_k)^T / tau_a), O = Att R^T, with W_q, W_k identity-initialised (so step 0 is the
  training-free transition), optional heads and LayerNorm, no value projection and no FFN;
- logits = 100 f T^T + alpha * s_rt * O (or log O), cross-entropy; alpha searched on the few-shot val draw;
- optimiser: the shared loop's AdamW at `train.lr` (the RTM's rate). The anchors get their own rate
  `anchors.lr` by parameterising them as init + (anchors.lr / train.lr) * offset: Adam's step is invariant to
  gradient scale, so the offset moves at train.lr and the tokens at anchors.lr. Weight decay applies to the RTM
  only: the offset is a parameter group of its own with none (spec section 3: 0 on anchor tokens).
"""

from __future__ import annotations

import hashlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from clipadapt.features import unit_rows
from clipadapt.method_schemas import AnchorSchema, RTOSSchema, RTOSZeroShotSchema
from clipadapt.methods.base import Batch, Method, register_method
from clipadapt.vocab import dataset_classnames, read_words, shipped_datasets, unique

log = logging.getLogger(__name__)

RANDOM_PLACEHOLDER = "x"  # one BPE token whose embedding a random anchor token replaces


def cross_dataset_names(datasets: list[str] | None) -> list[str]:
    """The shipped class lists of `datasets` (None: all 11 benchmarks), in that order (`anchor_pool` drops the
    evaluated datasets' classes)."""
    shipped = shipped_datasets()
    datasets = shipped if datasets is None else list(datasets)
    unknown = sorted(set(datasets) - set(shipped))
    if unknown:
        raise ValueError(f"method.anchors.datasets has {unknown}, which ship no class list: use some of {shipped}")
    return [name for d in datasets for name in dataset_classnames(d)]


def anchor_pool(cfg: AnchorSchema, targets: list[str], evaluated_datasets: list[str]) -> list[str]:
    """Every candidate anchor name: the configured sources, de-duplicated, without any class of the evaluated datasets
    (`targets`, the task's own class names, plus the shipped lists of `evaluated_datasets`)."""
    if not cfg.exclude_targets:  # the ablation: nothing is kept out
        targets, evaluated_datasets = [], []
    excluded = [*targets, *(name for d in evaluated_datasets for name in dataset_classnames(d))]
    pool: list[str] = []
    for source in cfg.sources:
        if source == "words":
            pool += read_words(cfg.words_file, "open_concepts.txt")
        elif source == "cross_dataset":
            pool += cross_dataset_names(cfg.datasets)
        else:
            raise ValueError(f"method.anchors.sources has {source!r}: use cross_dataset and/or words")
    pool = unique(pool, exclude=excluded)
    if not pool:
        raise ValueError(f"no anchor names left from sources {list(cfg.sources)}: add a word list "
                         f"(method.anchors.words_file=...) or another source")
    return pool


def draw_anchors(pool: list[str], num: int, seed: int) -> list[str]:
    """`num` names of the pool (all when it is smaller), drawn by a seeded permutation, in pool order."""
    if len(pool) <= num:
        return list(pool)
    keep = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:num]
    return [pool[i] for i in sorted(keep.tolist())]


def tokenized(encoder: nn.Module, template: str,
              words: list[str]) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start, ids, counts, own): where the word starts in the template's tokens, the prompts' token ids, each word's
    token count inside the prompt and alone (they differ where CLIP's BPE joins the word to the template)."""
    if template.count("{}") != 1:
        raise ValueError(f"method.anchors.template={template!r} must contain exactly one {{}}")
    start = int(encoder.tokenize([template.split("{}")[0]]).argmax(-1)[0])  # SOS + prefix tokens
    suffix = int(encoder.tokenize([template.format("")]).argmax(-1)[0]) - start  # tokens after the anchor
    ids = encoder.tokenize([template.format(w) for w in words])
    end = ids.argmax(-1)
    if int(end.max()) >= ids.shape[1] - 1:
        raise ValueError(f"anchor prompt for {words[int(end.argmax())]!r} does not fit CLIP's context: "
                         f"shorten the names or the template")
    return start, ids, end - start - suffix, encoder.tokenize(words).argmax(-1) - 1


def merge_error(template: str) -> ValueError:
    return ValueError(f"method.anchors.template={template!r} merges tokens with the anchor word: "
                      f"separate {{}} from the template's words by spaces or punctuation")


def separable(encoder: nn.Module, template: str, names: list[str]) -> list[str]:
    """The names that keep their own tokens inside the template. CLIP's BPE joins runs of punctuation, so ImageNet's
    "kite (bird of prey)" in "a photo of a {}." ends in one ")." token, which would make the full stop learnable."""
    _, _, counts, own = tokenized(encoder, template, names)
    kept = [name for name, same in zip(names, (counts == own).tolist()) if same]
    if names and not kept:
        raise merge_error(template)
    return kept


class AnchorPrompts(nn.Module):
    """The M anchor prompts with learnable anchor tokens scattered into frozen, cached token embeddings.

    Every prompt shares the template, so each anchor's tokens start at the same position `start`; anchors of
    different lengths are padded to `span` tokens and a mask keeps the frozen embedding at padded positions.
    """

    def __init__(self, encoder: nn.Module, names: list[str], template: str, init: str, init_std: float,
                 lr_scale: float, learnable: bool):
        super().__init__()
        words = names if init == "names" else [RANDOM_PLACEHOLDER] * len(names)
        start, ids, lengths, own = tokenized(encoder, template, words)
        if not torch.equal(lengths, own):
            raise merge_error(template)
        span = int(lengths.max())
        ids = ids[:, : int(ids.argmax(-1).max()) + 1]  # the causal tower never reads past the last end token
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
        purpose = "on learned anchor tokens" if cfg.anchors.learnable else "on its anchor prompts"
        self.encoder = task.text_tower(cfg.name, purpose)
        if cfg.anchors.init == "random":
            self.pool = names = [f"random {i}" for i in range(cfg.anchors.num)]
        else:
            pool = anchor_pool(cfg.anchors, [*task.classnames, *task.new_classnames], task.evaluated_datasets)
            self.pool = separable(self.encoder, cfg.anchors.template, pool)
            if len(self.pool) < len(pool):
                merged = sorted(set(pool) - set(self.pool))
                log.info("rtos: %d pool names left out, their tokens merge with the template: %s", len(merged), merged)
            names = draw_anchors(self.pool, cfg.anchors.num, cfg.anchors.seed)
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
        """A saved model keeps its anchors, whatever the pool holds now (another word file or shipped lists)."""
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

    def parameter_groups(self) -> list[dict]:
        """The RTM at train.weight_decay, the anchor tokens without weight decay (spec section 3)."""
        tokens = self.anchors.offset
        rtm = [p for p in self.parameters() if p.requires_grad and p is not tokens]
        groups = [{"params": rtm}]
        if tokens.requires_grad:
            groups.append({"params": [tokens], "weight_decay": 0.0})
        return [group for group in groups if group["params"]]

    # ----------------------------------------------------------------- what the run folder keeps
    def files(self) -> dict[str, str]:
        """anchor_pool.txt: every candidate name; anchors.txt: the `anchors.num` drawn from it (one name a line)."""
        return {"anchor_pool.txt": "".join(f"{name}\n" for name in self.pool),
                "anchors.txt": "".join(f"{name}\n" for name in self.anchor_names)}

    def record(self) -> dict:
        """The anchor pool and the anchors drawn from it (their files' sizes and hashes), so that a result says which
        words it used and which datasets' classes were kept out."""
        files = {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in self.files().items()}
        return {"anchors": {
            "pool_size": len(self.pool), "pool_file": "anchor_pool.txt", "pool_sha256": files["anchor_pool.txt"],
            "num_anchors": len(self.anchor_names), "file": "anchors.txt", "sha256": files["anchors.txt"],
            "excluded_datasets": list(self.task.evaluated_datasets) if self.cfg.anchors.exclude_targets else [],
        }}

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
        search = self.cfg.search
        if val is None or len(val) == 0:
            return {**chosen, "search": "not run: no val draw"}
        image = unit_rows(val.image[:, 0], self.text.device)
        labels = torch.as_tensor(val.labels, device=image.device)
        zero_shot, transition = self.zero_shot_logits(image), self.transition_logits(image)
        accuracy = lambda logits: 100 * (logits.argmax(-1) == labels).float().mean(-1)  # noqa: E731  (percent)
        chosen.update(val_acc_fixed_alpha=float(accuracy(zero_shot + self.alpha * transition)),
                      val_acc_transition_only=float(accuracy(transition)))
        if not search.enabled:
            return {**chosen, "search": "not run: method.search.enabled=false"}
        alphas = torch.linspace(search.alpha_min, search.alpha_max, search.steps, device=image.device)
        scores = accuracy(zero_shot + alphas[:, None, None] * transition)  # [A]
        best = torch.nonzero(scores == scores.max()).flatten()
        # ties (common on a few-shot val draw) go to the alpha nearest the configured one
        self.alpha = float(alphas[best[(alphas[best] - self.alpha).abs().argmin()]])
        return {**chosen, "alpha": self.alpha, "val_acc": float(scores.max())}


@register_method("rtos_zs")
class RTOSZeroShot(RTOS):
    """The spec's training-free variant: fixed anchor names, identity projections, alpha searched on val."""

    Config = RTOSZeroShotSchema
