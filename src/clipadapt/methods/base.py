"""What every method is: a small nn.Module registered by name, with its own config schema (clipadapt/method_schemas.py).

A method sees a `FewShotTask` (class text features, cached train/val features, and, for methods that learn tokens,
the prompt encoder) and maps a `Batch` of cached image features to logits. The one training loop in engine.py
trains whatever parameters it leaves trainable; the hooks `setup` (before training) and `tune` (after training,
on the few-shot val draw only) cover closed-form fits and hyperparameter searches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from clipadapt.features import Batch, FeatureSet, to_tensor
from clipadapt.method_schemas import MethodSchema

LOGIT_SCALE = 100.0  # CLIP's exp(logit_scale) for the OpenAI models; every method uses it for zero-shot terms


@dataclass
class FewShotTask:
    classnames: list[str]
    templates: list[str]
    text: torch.Tensor  # [K, D] normalised class text features (the zero-shot classifier)
    train: FeatureSet  # image [N, 1 + V, D]: view 0 plain, views 1..V augmented
    val: FeatureSet | None
    device: torch.device
    prompt_encoder: Callable[[], nn.Module] = field(repr=False, default=None)  # lazy: loads the text tower
    seed: int = 1
    # base-to-new: the label-only classes (names and text features, no images); methods such as SHIP use them
    new_classnames: list[str] = field(default_factory=list)
    new_text: torch.Tensor | None = None
    # ids of the datasets the cell is evaluated on (its own, transfer targets): outside vocabularies (RTOS's anchors)
    # keep all their classes out
    evaluated_datasets: list[str] = field(default_factory=list)

    def text_tower(self, method: str, purpose: str = "on learned tokens") -> nn.Module:
        """The frozen text tower on token embeddings (CoOp, RTOS, SHIP), or a one-line error where there is none."""
        if self.prompt_encoder is None:
            raise ValueError(
                f"{method} runs CLIP's text tower {purpose}, which a features file does not provide: "
                f"run it on an image dataset (e.g. dataset=eurosat) so the backbone's text tower can be loaded"
            )
        return self.prompt_encoder().requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    def train_tensor(self, views: slice = slice(None)) -> torch.Tensor:
        return to_tensor(self.train.image[:, views], self.device)


class Method(nn.Module):
    """Base class: subclasses set `Config`, implement `forward`, and register with `@register_method`.

    A trained method is saved as its state_dict (clipadapt.trained_state) and rebuilt for re-evaluation on a task
    whose train set is EMPTY: a constructor must accept one (the saved tensors then replace what it built).
    """

    Config: ClassVar[type] = MethodSchema
    needs_dense: ClassVar[bool] = False
    uses_augmented_views: ClassVar[bool] = True  # False: only the plain view of the train draw is extracted
    # False: the evaluator hands `forward` the cached rows as they are (raw CLIP features: lpclip's linear probe), not
    # unit vectors; for methods that do not train through the loop (which always trains on unit rows)
    unit_features: ClassVar[bool] = True
    # The reference's train views (features.AUGMENTATIONS): "tip" (Tip-Adapter: crop scale 0.5-1) or "dassl" (CoOp's
    # Dassl: 0.08-1); recorded in metrics.json as protocol.augmentation
    augmentation: ClassVar[str] = "tip"
    # Settings the run used whose values were searched on a test set by the method's authors (CALIP's paper betas):
    # set by `tune`; metrics.json lists them in protocol.test_tuned and marks the run leaky.
    test_tuned: tuple[str, ...] = ()
    # Plain attributes that `tune` (or training) sets and state_dict does not hold, e.g. Tip-Adapter's alpha and
    # beta: saved with the trained state through torch's extra-state hooks (JSON values: floats, strings, lists).
    tuned: ClassVar[tuple[str, ...]] = ()
    # True: `retarget` to another dataset's classes trains on the train draw (SHIP's generator), so re-evaluating a
    # cross-dataset run reads the draw's features too
    retarget_trains: ClassVar[bool] = False

    def __init__(self, cfg: DictConfig, task: FewShotTask):
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.register_buffer("text", task.text.float())

    def forward(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(batch), labels)

    def setup(self) -> None:
        """Before training: closed-form fits, caches built from train features."""

    def parameter_groups(self) -> list[dict]:
        """The optimiser's parameter groups (torch's format): by default one group of every trainable parameter at the
        `train` settings; a method may give some of them their own (RTOS: no weight decay on anchor tokens)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def tune(self, val: FeatureSet | None) -> dict:
        """After training: hyperparameter searches on the few-shot val draw; returns what was chosen."""
        return {}

    def get_extra_state(self) -> dict:
        return {name: getattr(self, name) for name in self.tuned if not isinstance(getattr(self, name), torch.Tensor)}

    def set_extra_state(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def record(self) -> dict:
        """Entries for metrics.json beside `chosen` (e.g. RTOS's anchor pool: its size and hash)."""
        return {}

    def files(self) -> dict[str, str]:
        """Text files for the run folder, {file name: content} (e.g. RTOS's anchor list)."""
        return {}

    def retarget(self, classnames: list[str], text: torch.Tensor) -> None:
        """Point the trained method at another class set (new classes, another dataset) for evaluation.

        The default swaps the zero-shot classifier; methods whose state depends on the class set override it
        (or raise when the method cannot transfer to unseen classes).
        """
        self.text = text.to(self.text)

    def zero_shot_logits(self, image: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * image @ self.text.t()


METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        METHODS[name] = cls
        return cls

    return add


def method_config(node: DictConfig) -> DictConfig:
    """The method node checked against its class's schema: unknown keys and wrong types fail here, in one line."""
    from clipadapt.methods import METHODS as registered

    if node.name not in registered:
        raise ValueError(f"unknown method {node.name!r}: use one of {sorted(registered)}")
    schema = OmegaConf.structured(registered[node.name].Config)
    if node._get_parent() is not None:  # resolved against the run config it sits in: an option may say ${paths.data_root}
        node = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.merge(schema, node)


def build_method(node: DictConfig, task: FewShotTask) -> Method:
    """The method of `node` on `task`; an option outside its schema's choices or bounds fails here, in one line
    (the method classes themselves do not check them again)."""
    from clipadapt.config import ConfigError, option_errors

    cfg = method_config(node)
    errors = option_errors(OmegaConf.get_type(cfg), cfg, "method.")
    if errors:
        raise ConfigError("; ".join(errors))
    return METHODS[cfg.name](cfg, task).to(task.device)
