"""CoOp's linear probe: L2-regularised logistic regression on frozen plain-view features, C chosen on val."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from clipadapt.methods.base import Batch, Method, MethodSchema, register_method


@dataclass
class LinearProbeSchema(MethodSchema):
    c_grid: list[float] = field(default_factory=lambda: [1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6])
    c_refine_steps: int = 4  # bisection steps (in log space) around the best grid value, as CoOp's probe
    c: float = 0.316  # used when there is no val draw to search on
    max_iter: int = 1000


@register_method("linear_probe")
class LinearProbe(Method):
    Config = LinearProbeSchema
    uses_augmented_views = False  # CoOp's probe fits the plain-view features

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        self.linear = nn.Linear(task.train.image.shape[-1], task.num_classes)
        self.linear.requires_grad_(False)

    def _fit(self, c: float):
        from sklearn.linear_model import LogisticRegression

        x = np.asarray(self.task.train.image[:, 0], dtype=np.float32)
        return LogisticRegression(C=c, max_iter=self.cfg.max_iter, random_state=0).fit(x, self.task.train.labels)

    def setup(self) -> None:
        self._load(self._fit(self.cfg.c))

    def _load(self, model) -> None:
        classes = torch.as_tensor(model.classes_)
        weight = torch.zeros_like(self.linear.weight)
        bias = torch.full_like(self.linear.bias, -1e4)  # classes absent from the draw are never predicted
        coef = torch.as_tensor(model.coef_, dtype=weight.dtype)
        if len(classes) == 2:  # sklearn keeps one row for a binary problem
            coef = torch.cat([-coef, coef])
            intercept = torch.as_tensor(np.concatenate([-model.intercept_, model.intercept_]), dtype=weight.dtype)
        else:
            intercept = torch.as_tensor(model.intercept_, dtype=weight.dtype)
        weight[classes], bias[classes] = coef.to(weight.device), intercept.to(weight.device)
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)

    def tune(self, val):
        if val is None or len(val) == 0:
            return {"c": self.cfg.c}
        x_val, y_val = np.asarray(val.image[:, 0], dtype=np.float32), val.labels

        def score(c: float) -> float:
            return float((self._fit(c).predict(x_val) == y_val).mean())

        scores = {c: score(c) for c in self.cfg.c_grid}
        best = max(scores, key=lambda c: (scores[c], -abs(np.log10(c))))
        low, high = best / 10, best * 10
        for _ in range(self.cfg.c_refine_steps):  # keep the better half of [low, high] around `best`
            for candidate in (np.sqrt(low * best), np.sqrt(best * high)):
                scores[candidate] = score(candidate)
            best = max(scores, key=lambda c: (scores[c], -abs(np.log10(c))))
            low, high = np.sqrt(low * best), np.sqrt(best * high)
        self._load(self._fit(best))
        return {"c": float(best), "val_acc": scores[best]}

    def forward(self, batch: Batch):
        return self.linear(batch.image)

    def retarget(self, classnames, text):
        raise ValueError(
            "linear_probe cannot classify classes it was not trained on (protocol.task=base_to_new or "
            "cross_dataset): use a method with a text classifier, e.g. method=zero_shot or method=tip_adapter_f"
        )
