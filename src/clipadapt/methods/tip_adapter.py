"""Tip-Adapter (training-free) and Tip-Adapter-F (learnable cache keys).

Cache keys are the K-shot train features averaged over the augmented views, values their one-hot labels;
logits = zero-shot + alpha * exp(-beta * (1 - f . keys)) . values. alpha and beta are searched on the few-shot val
draw (the reference code searches on the full val split, or on test for ImageNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clipadapt.features import unit_rows
from clipadapt.methods.base import Batch, Method, MethodSchema, TrainSchema, register_method


@dataclass
class TipSearchSchema:
    enabled: bool = True
    beta_max: float = 7.0  # Tip-Adapter's search_scale
    alpha_max: float = 3.0
    beta_steps: int = 200  # Tip-Adapter's search_step
    alpha_steps: int = 20


@dataclass
class TipAdapterSchema(MethodSchema):
    alpha: float = 1.0
    beta: float = 1.0
    search: TipSearchSchema = field(default_factory=TipSearchSchema)


@dataclass
class TipAdapterFSchema(TipAdapterSchema):
    train: TrainSchema = field(default_factory=lambda: TrainSchema(
        epochs=20, batch_size=256, optimizer="adamw", lr=1e-3, eps=1e-4, schedule="cosine"))


@register_method("tip_adapter")
class TipAdapter(Method):
    Config = TipAdapterSchema
    learnable_keys = False
    tuned = ("alpha", "beta")

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        augmented = task.train_tensor(slice(1, None)) if task.train.image.shape[1] > 1 else task.train_tensor()
        keys = F.normalize(F.normalize(augmented, dim=-1).mean(1), dim=-1)  # [NK, D]
        self.keys = nn.Parameter(keys, requires_grad=self.learnable_keys)
        labels = torch.as_tensor(task.train.labels, device=task.device)
        self.register_buffer("values", F.one_hot(labels, task.num_classes).float())
        self.alpha, self.beta = float(cfg.alpha), float(cfg.beta)

    def cache_logits(self, image: torch.Tensor, beta: float) -> torch.Tensor:
        affinity = image @ self.keys.t()
        return torch.exp(-beta * (1 - affinity)) @ self.values

    def forward(self, batch: Batch):
        return self.zero_shot_logits(batch.image) + self.alpha * self.cache_logits(batch.image, self.beta)

    def retarget(self, classnames, text):
        """Other classes (base-to-new, cross-dataset): the cache holds no image of them, so its values are all zero
        and only the zero-shot term remains."""
        super().retarget(classnames, text)
        self.values = self.values.new_zeros(self.values.shape[0], len(classnames))

    @torch.no_grad()
    def tune(self, val):
        search = self.cfg.search
        if not search.enabled or val is None or len(val) == 0:
            return {"alpha": self.alpha, "beta": self.beta}
        image = unit_rows(val.image[:, 0], self.text.device)
        labels = torch.as_tensor(val.labels, device=self.text.device)
        zero_shot = self.zero_shot_logits(image)
        betas = torch.linspace(0.1, search.beta_max, search.beta_steps).tolist()
        alphas = torch.linspace(0.1, search.alpha_max, search.alpha_steps, device=image.device)
        affinity = image @ self.keys.t()  # independent of beta: once, not once per beta
        # values are one-hot rows: A . values sums each class's columns (index_add), not a dense [NK, K] matmul
        holds, classes = self.values.max(1)
        affinity, classes = affinity[:, holds > 0], classes[holds > 0]
        best = (-1.0, self.alpha, self.beta)
        for beta in betas:
            cache = zero_shot.new_zeros(zero_shot.shape).index_add_(1, classes, torch.exp(-beta * (1 - affinity)))
            logits = zero_shot + alphas[:, None, None] * cache  # [A, N, K]
            accuracy = (logits.argmax(-1) == labels).float().mean(-1)
            index = int(accuracy.argmax())
            if accuracy[index] > best[0]:
                best = (float(accuracy[index]), float(alphas[index]), beta)
        _, self.alpha, self.beta = best
        return {"alpha": self.alpha, "beta": self.beta, "val_acc": best[0]}


@register_method("tip_adapter_f")
class TipAdapterF(TipAdapter):
    Config = TipAdapterFSchema
    learnable_keys = True
