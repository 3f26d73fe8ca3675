"""CCLI: cross-modal concept learning and inference (Zhang et al., arXiv 2307.15460). RECONSTRUCTED.

Neither the paper body nor code was available (spec: ../shared/specs/methods/ccli.md). As published (abstract):
a set of semantic text concepts and CLIP's text-image correlation are used to learn a large set of distinctive
visual concepts from the few-shot images; each image gets a concept-based representation; a learned concept
inference network on top of it classifies (few-shot learning and domain generalisation).

Reconstructed (the spec's recommended reading, "CCLI-style (ours)"; every open choice is a config key):
- text concepts T [M, D]: a class-agnostic attribute vocabulary (default: the packaged visual_attributes.txt,
  which holds no benchmark class name), prompted "a photo of {}.", target names removed, `concepts.num` drawn by
  a seeded permutation;
- visual concepts (spec 2.3): pool = the train images' features averaged over their cached augmented views
  (Tip-Adapter's keys) or, with `concept_pool=views`, every cached augmented view (random-resized crops stand in
  for the spec's optional grid crops); affinity T F^T; per pool item a softmax over concepts (distinctiveness);
  the top-K pool items per concept; variant A: their affinity-weighted mean is the concept's key and their label
  mass its concept->class prior L; variant B (`aggregate=none`): each selected item is a key with its one-hot
  label; concepts with identical support sets are dropped;
- representation: phi(f V^T) = exp(-beta (1 - f V^T)) and the standardised text-concept activations f T^T;
- inference network: h_v = phi(f V^T) L with V and L learnable (Tip-Adapter-F-like), h_t = std(f T^T) U with U
  zero-initialised; or `head=mlp` over [phi; std] with a zero-initialised last layer;
- logits = 100 f W^T + alpha h_v + gamma h_t (+ an optional plain Tip-Adapter cache term); cross-entropy
  (optional label smoothing and L1 on U); alpha, beta, gamma grid-searched on the few-shot val draw.
Special case (spec 2.3): raw scores, K = 1, variant B, a vocabulary in which every train image is the top-1 of
one concept -> V, L are the train features and one-hot labels and the logits are Tip-Adapter's, bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipadapt.features import unit_rows
from clipadapt.method_schemas import CCLISchema, ConceptSchema
from clipadapt.methods.base import LOGIT_SCALE, Batch, Method, register_method
from clipadapt.methods.tip_adapter import exp_affinity
from clipadapt.vocab import normalise, read_words, unique

log = logging.getLogger(__name__)


@dataclass
class VisualConcepts:
    keys: torch.Tensor  # V [M', D]
    prior: torch.Tensor  # L [M', C]
    concept: torch.Tensor  # [M'] the text concept each key came from (variant B: the first that chose the item)
    support: torch.Tensor  # [M', K] pool rows behind each key (variant B: [M', 1])


def learn_visual_concepts(text: torch.Tensor, pool: torch.Tensor, pool_labels: torch.Tensor, k: int,
                          score: str = "softmax", aggregate: str = "weighted", dedup: bool = True,
                          keep_top: int | None = None) -> VisualConcepts:
    """Spec 2.3: visual concepts from text concepts T [M, D] and a pool of image features [P, D] with one-hot labels."""
    if score not in ("softmax", "raw"):
        raise ValueError(f"method.selection_score={score!r}: use softmax or raw")
    if aggregate not in ("weighted", "mean", "none"):
        raise ValueError(f"method.aggregate={aggregate!r}: use weighted, mean or none")
    if len(pool) == 0:  # a model rebuilt for re-evaluation (clipadapt.evaluate): its concepts are in the saved state
        return VisualConcepts(pool, pool_labels, pool.new_zeros(0, dtype=torch.long), pool.new_zeros(0, 1, dtype=torch.long))
    affinity = text @ pool.t()  # [M, P]
    # distinctiveness: how much more this pool item looks like concept j than like any other concept
    selection = torch.softmax(LOGIT_SCALE * affinity, dim=0) if score == "softmax" else affinity
    k = max(1, min(k, pool.shape[0]))
    support = selection.topk(k, dim=1).indices  # [M, K]
    concept = torch.arange(text.shape[0], device=text.device)
    if aggregate == "none":  # variant B: each selected pool item is its own key
        items, concept = support.flatten(), concept.repeat_interleave(k)
        if dedup:  # one key per distinct item, in pool order, tagged with the first concept that chose it
            items, inverse = torch.unique(items, return_inverse=True)
            first = torch.full((len(items),), len(inverse), device=items.device)
            concept = concept[first.scatter_reduce(0, inverse, torch.arange(len(inverse), device=items.device), "amin")]
        return VisualConcepts(pool[items], pool_labels[items], concept, items[:, None])
    if aggregate == "weighted":
        weights = torch.softmax(LOGIT_SCALE * affinity.gather(1, support), dim=1)
    else:
        weights = torch.full(support.shape, 1.0 / k, device=pool.device)
    keys = F.normalize(torch.einsum("mk,mkd->md", weights, pool[support]), dim=-1)
    prior = torch.einsum("mk,mkc->mc", weights, pool_labels[support])
    keep = concept
    if dedup:  # at 1-2 shots many concepts pick the same images: keep the first of each support set
        _, inverse = torch.unique(support.sort(dim=1).values, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(inverse), device=inverse.device)
        keep = first.scatter_reduce(0, inverse, concept, "amin").sort().values
    if keep_top is not None and keep_top < len(keep):
        distinct = selection.gather(1, support).mean(1)[keep]
        keep = keep[distinct.topk(keep_top).indices].sort().values
    return VisualConcepts(keys[keep], prior[keep], keep, support[keep])


@torch.no_grad()
def encode_concepts(encoder: nn.Module, words: list[str], templates: list[str], chunk: int = 512) -> torch.Tensor:
    """T [M, D]: each template's features normalised, averaged over templates, re-normalised (like the classifier)."""
    per_template = []
    for template in templates:
        rows = []
        for start in range(0, len(words), chunk):
            ids = encoder.tokenize([template.format(w) for w in words[start : start + chunk]])
            rows.append(F.normalize(encoder(encoder.embed(ids), ids).float(), dim=-1))
        per_template.append(torch.cat(rows))
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def concept_words(cfg: ConceptSchema, targets: list[str]) -> list[str]:
    words = unique(read_words(cfg.file, "visual_attributes.txt"), exclude=targets if cfg.exclude_targets else ())
    if not words:
        raise ValueError("no text concepts left after removing the target class names: give method.concepts.file=...")
    if len(words) > cfg.num:
        keep = torch.randperm(len(words), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.num]
        words = [words[i] for i in sorted(keep.tolist())]
    return words


@register_method("ccli")
class CCLI(Method):
    Config = CCLISchema
    tuned = ("alpha", "beta", "gamma")

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        encoder = task.prompt_encoder() if task.prompt_encoder is not None else None
        if encoder is None:
            raise ValueError("ccli encodes its text concepts with CLIP's text tower, which a features file does not "
                             "provide: run it on an image dataset (e.g. dataset=eurosat)")
        self.classnames = list(task.classnames)
        self.concept_words = concept_words(cfg.concepts, task.classnames)
        text_concepts = encode_concepts(encoder, self.concept_words, list(cfg.concepts.templates)).to(task.device)
        self.register_buffer("text_concepts", text_concepts)

        # the concept pool: Tip-Adapter's keys (views averaged), or every augmented view on its own
        has_views = task.train.image.shape[1] > 1
        views = task.train_tensor(slice(1, None)) if has_views else task.train_tensor()  # [N, V, D]
        labels = F.one_hot(torch.as_tensor(task.train.labels, device=task.device), task.num_classes).float()
        train_keys = F.normalize(views.mean(1), dim=-1)  # Tip-Adapter's: the raw views' mean, normalised
        if cfg.concept_pool == "views":
            pool, pool_labels = F.normalize(views, dim=-1).flatten(0, 1), labels.repeat_interleave(views.shape[1], 0)
        else:
            pool, pool_labels = train_keys, labels
        shots = int(np.bincount(np.asarray(task.train.labels)).max()) if len(task.train) else 0
        k = cfg.topk if cfg.topk is not None else (8 if shots >= 4 else max(shots, 1))
        if cfg.topk is None and cfg.concept_pool == "views":
            k *= views.shape[1]
        concepts = learn_visual_concepts(text_concepts, pool, pool_labels, k, cfg.selection_score, cfg.aggregate,
                                         cfg.dedup, cfg.keep_top_concepts)
        self.register_buffer("concept_index", concepts.concept)
        self.register_buffer("support", concepts.support)
        self.keys = nn.Parameter(concepts.keys.clone(), requires_grad=not cfg.freeze_concepts)
        log.info("ccli: %d text concepts -> %d visual concepts (K=%d, %s pool of %d)", len(self.concept_words),
                 len(concepts.keys), min(k, len(pool)), cfg.concept_pool, len(pool))

        # standardisation of the text-concept activations, estimated on the pool
        activations = pool @ text_concepts.t()
        self.register_buffer("text_mean", activations.mean(0))
        self.register_buffer("text_std", activations.std(0, unbiased=False).clamp_min(1e-6))
        if cfg.head == "linear":
            self.prior = nn.Parameter(concepts.prior.clone())
            if cfg.use_text_concepts:
                init = 0.1 * text_concepts @ self.text.t() if cfg.text_init == "class_similarity" else \
                    torch.zeros(len(text_concepts), task.num_classes, device=task.device)
                self.text_weights = nn.Parameter(init)
        else:
            width = len(concepts.keys) + (len(text_concepts) if cfg.use_text_concepts else 0)
            self.mlp = nn.Sequential(nn.Linear(width, cfg.mlp_hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(cfg.mlp_hidden, task.num_classes))
            nn.init.zeros_(self.mlp[-1].weight)  # step 0 is zero-shot CLIP
            nn.init.zeros_(self.mlp[-1].bias)
        if cfg.use_tip_cache:
            self.register_buffer("tip_keys", train_keys)
            self.register_buffer("tip_values", labels)
        self.alpha, self.beta, self.gamma = float(cfg.alpha), float(cfg.beta), float(cfg.gamma)

    # ----------------------------------------------------------------- representation and inference
    def standardised_text_activations(self, image: torch.Tensor) -> torch.Tensor:
        return (image @ self.text_concepts.t() - self.text_mean) / self.text_std

    def branches(self, image: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h_v, h_t) [B, C] each; h_t is None without a separate text branch (no text concepts, or the MLP head)."""
        visual = exp_affinity(image @ self.keys.t(), beta)  # phi(f V^T), Tip-Adapter's kernel (its float operations)
        if self.cfg.head == "mlp":
            parts = [visual, self.standardised_text_activations(image)] if self.cfg.use_text_concepts else [visual]
            return self.mlp(torch.cat(parts, dim=-1)), None
        text = self.standardised_text_activations(image) @ self.text_weights if self.cfg.use_text_concepts else None
        return visual @ self.prior, text

    def logits(self, image: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
        visual, text = self.branches(image, beta)
        out = self.zero_shot_logits(image) + alpha * visual
        if text is not None:
            out = out + gamma * text
        if self.cfg.use_tip_cache:
            out = out + self.tip_logits(image, beta)
        return out

    def tip_logits(self, image: torch.Tensor, beta: float) -> torch.Tensor:
        """The optional plain Tip-Adapter cache term (train images as keys, their labels as values)."""
        return self.cfg.tip_weight * (exp_affinity(image @ self.tip_keys.t(), beta) @ self.tip_values)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logits(batch.image, self.alpha, self.beta, self.gamma)

    def loss(self, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self(batch), labels, label_smoothing=self.cfg.label_smoothing)
        if self.cfg.l1_text_weights and hasattr(self, "text_weights"):
            loss = loss + self.cfg.l1_text_weights * self.text_weights.abs().sum()
        return loss

    # ----------------------------------------------------------------- after training
    @torch.no_grad()
    def tune(self, val):
        chosen = {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                  "num_text_concepts": len(self.text_concepts), "num_visual_concepts": len(self.keys)}
        if hasattr(self, "prior"):  # mean concept purity: how much of a concept's label mass one class holds
            chosen["concept_purity"] = float(self.prior.clamp_min(0).max(1).values.div(
                self.prior.clamp_min(0).sum(1).clamp_min(1e-12)).mean())
        search = self.cfg.search
        if not search.enabled or val is None or len(val) == 0:
            return chosen
        image = unit_rows(val.image[:, 0], self.text.device)
        labels = torch.as_tensor(val.labels, device=image.device)
        zero_shot = self.zero_shot_logits(image)
        alphas = torch.linspace(search.alpha_min, search.alpha_max, search.alpha_steps, device=image.device)
        betas = torch.logspace(np.log10(search.beta_min), np.log10(search.beta_max), search.beta_steps).tolist()
        gammas = list(search.gammas) if (self.cfg.head == "linear" and self.cfg.use_text_concepts) else [self.gamma]
        scores = torch.zeros(len(betas), len(alphas), len(gammas))
        for b, beta in enumerate(betas):
            visual, text = self.branches(image, beta)
            base = zero_shot + (self.tip_logits(image, beta) if self.cfg.use_tip_cache else 0)
            for g, gamma in enumerate(gammas):
                fused = base + (0 if text is None else gamma * text) + alphas[:, None, None] * visual  # [A, N, C]
                scores[b, :, g] = (fused.argmax(-1) == labels).float().mean(-1).cpu()
        # ties (common on a few-shot val draw) go to the setting nearest the configured one
        best = torch.nonzero(scores == scores.max())
        grid = torch.tensor([[np.log(betas[b]), float(alphas[a]), gammas[g]] for b, a, g in best.tolist()])
        spread = grid.new_tensor([np.log(search.beta_max / search.beta_min) or 1.0,
                                  (search.alpha_max - search.alpha_min) or 1.0, (max(gammas) - min(gammas)) or 1.0])
        start = grid.new_tensor([np.log(self.beta), self.alpha, self.gamma])
        b, a, g = best[((grid - start).abs() / spread).sum(1).argmin()].tolist()
        self.beta, self.alpha, self.gamma = float(betas[b]), float(alphas[a]), float(gammas[g])
        chosen.update(alpha=self.alpha, beta=self.beta, gamma=self.gamma, val_acc=100 * float(scores.max()))  # percent
        return chosen

    def top_concepts(self, per_class: int = 5) -> dict[str, list[str]]:
        """For reading a trained model: the words whose visual concepts carry the most evidence for each class."""
        if not hasattr(self, "prior"):
            return {}
        top = self.prior.detach().topk(min(per_class, len(self.keys)), dim=0).indices.t()  # [C, k]
        index = self.concept_index.tolist()
        return {name: [self.concept_words[index[i]] for i in row] for name, row in zip(self.classnames, top.tolist())}

    def retarget(self, classnames, text):
        """Another class set: a training class keeps its concept->class evidence (a subset such as ImageNet-A/-R
        keeps its columns); a class the concepts never saw gets none, so only its zero-shot term remains (as for
        Tip-Adapter's cache)."""
        position = {normalise(n): i for i, n in enumerate(self.classnames)}
        columns = torch.tensor([position.get(normalise(n), -1) for n in classnames], device=self.text.device)
        log.info("ccli: retargeted to %d classes, %d of them trained", len(classnames), int((columns >= 0).sum()))

        def remap(matrix: torch.Tensor, dim: int) -> torch.Tensor:  # column -1 picks an appended zero column
            padded = torch.cat([matrix, matrix.new_zeros(matrix.shape[:dim] + (1,) + matrix.shape[dim + 1:])], dim)
            return padded.index_select(dim, columns % padded.shape[dim])

        with torch.no_grad():
            for name in ("prior", "text_weights"):
                if hasattr(self, name):
                    old = getattr(self, name)
                    setattr(self, name, nn.Parameter(remap(old, 1), requires_grad=old.requires_grad))
            if hasattr(self, "mlp"):
                last = self.mlp[-1]
                last.weight, last.bias = nn.Parameter(remap(last.weight, 0)), nn.Parameter(remap(last.bias, 0))
            if self.cfg.use_tip_cache:
                self.tip_values = remap(self.tip_values, 1)
        super().retarget(classnames, text)
        self.classnames = list(classnames)
