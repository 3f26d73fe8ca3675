"""CoOp's linear probe, as its lpclip code runs it (KaiyangZhou/CoOp lpclip/feat_extractor.py, linear_probe.py).

- features: the plain view of the train draw, raw as CLIP's image encoder gives them (lpclip saves
  `clip_model.visual(image)` unnormalised), in float64 as lpclip's saved lists are; the evaluator hands this method
  the raw test rows too (`unit_features = False`);
- classifier: sklearn's LogisticRegression with lpclip's settings (lbfgs, L2, max_iter 1000, the rest default);
- C: lpclip's search on the few-shot val draw (`lpclip_search`): its 7-value grid, then 8 bisection steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from clipadapt.method_schemas import LinearProbeSchema
from clipadapt.methods.base import Batch, Method, register_method


def lpclip_search(score: Callable[[float], float], grid: Sequence[float], steps: int) -> tuple[float, float]:
    """lpclip's choice of C and its val accuracy, for `score(C)` = val accuracy of the probe fitted with C.

    The grid's best C (the first of equals, as np.argmax) sets the range [C/10, 10 C]; each step scores both ends,
    keeps the better one (the left on a tie) and halves the range towards it in log10 space. The answer is the last
    step's better end, whose classifier lpclip reports (not necessarily the best C it scored).
    """
    accuracies = [score(c) for c in grid]
    peak = grid[int(np.argmax(accuracies))]
    chosen, accuracy = peak, max(accuracies)
    left, right = 1e-1 * peak, 1e1 * peak
    for _ in range(steps):
        left_accuracy, right_accuracy = score(left), score(right)
        if left_accuracy < right_accuracy:
            chosen, accuracy = right, right_accuracy
            left, right = 0.5 * (np.log10(right) + np.log10(left)), np.log10(right)
        else:
            chosen, accuracy = left, left_accuracy
            left, right = np.log10(left), 0.5 * (np.log10(right) + np.log10(left))
        left, right = np.power(10, left), np.power(10, right)
    return float(chosen), accuracy


def plain_rows(features) -> np.ndarray:
    """The plain view's rows as the cache holds them (raw CLIP features), in float64 like lpclip's."""
    return np.asarray(features.image[:, 0], dtype=np.float64)


@register_method("linear_probe")
class LinearProbe(Method):
    Config = LinearProbeSchema
    uses_augmented_views = False  # lpclip fits the plain-view (test-transform) features
    unit_features = False  # lpclip's classifier reads raw features

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        self.linear = nn.Linear(task.train.image.shape[-1], task.num_classes, dtype=torch.float64)
        self.linear.requires_grad_(False)

    def _fit(self, c: float):
        from sklearn.linear_model import LogisticRegression

        # l1_ratio=0 (the default) is lpclip's penalty="l2", which sklearn 1.8 renamed
        model = LogisticRegression(solver="lbfgs", C=c, max_iter=self.cfg.max_iter)
        return model.fit(plain_rows(self.task.train), self.task.train.labels)

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
            self._load(self._fit(self.cfg.c))
            return {"c": self.cfg.c, "search": "not run: no val draw"}
        x_val, y_val = plain_rows(val), np.asarray(val.labels)
        models = {}

        def score(c: float) -> float:
            models[c] = self._fit(c)
            return float((models[c].predict(x_val) == y_val).mean())

        c, accuracy = lpclip_search(score, self.cfg.c_grid, self.cfg.c_refine_steps)
        self._load(models[c])
        return {"c": c, "val_acc": 100 * accuracy}  # percent, as test/acc

    def forward(self, batch: Batch):
        return self.linear(batch.image.double()).float()

    def retarget(self, classnames, text):
        raise ValueError(
            "linear_probe cannot classify classes it was not trained on (protocol.task=base_to_new or "
            "cross_dataset): use a method with a text classifier, e.g. method=zero_shot or method=tip_adapter_f"
        )
