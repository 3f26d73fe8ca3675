"""CLIP-Adapter: a residual bottleneck MLP on the image feature, blended with the original by a residual ratio.

As published (gaopengcuhk/CLIP-Adapter clip_adapter.py, a Dassl trainer run with CoOp's configs): reduction 4,
ratio 0.2; CoOp's configs/trainers/CoOp/rn50.yaml recipe on Dassl's defaults: SGD lr 2e-3, momentum 0.9, weight
decay 5e-4, batch 32, 200 epochs, one constant warm-up epoch at 1e-5, then cosine, the lr stepped once per epoch,
the last partial batch dropped when the draw holds a full one.
"""

from __future__ import annotations


import torch.nn.functional as F
from torch import nn

from clipadapt.method_schemas import ClipAdapterSchema
from clipadapt.methods.base import Batch, Method, register_method


@register_method("clip_adapter")
class ClipAdapter(Method):
    Config = ClipAdapterSchema
    augmentation = "dassl"  # the official trainer runs on CoOp's Dassl configs

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
