"""CLIP-Adapter: a residual bottleneck MLP on the image feature, blended with the original by a residual ratio."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import nn

from clipadapt.methods.base import Batch, Method, MethodSchema, TrainSchema, register_method


@dataclass
class ClipAdapterSchema(MethodSchema):
    reduction: int = 4
    ratio: float = 0.2  # share of the adapted feature in the blend
    train: TrainSchema = field(default_factory=lambda: TrainSchema(
        epochs=200, batch_size=32, optimizer="sgd", lr=2e-3, schedule="cosine", warmup_epochs=1))


@register_method("clip_adapter")
class ClipAdapter(Method):
    Config = ClipAdapterSchema

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        dim = task.text.shape[1]
        self.adapter = nn.Sequential(
            nn.Linear(dim, dim // cfg.reduction, bias=False), nn.ReLU(inplace=True),
            nn.Linear(dim // cfg.reduction, dim, bias=False), nn.ReLU(inplace=True),
        )

    def forward(self, batch: Batch):
        image = self.cfg.ratio * self.adapter(batch.image) + (1 - self.cfg.ratio) * batch.image
        return self.zero_shot_logits(F.normalize(image, dim=-1))
