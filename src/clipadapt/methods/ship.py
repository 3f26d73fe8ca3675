"""SHIP (Wang et al., ICCV 2023): synthesized prompts give features for label-only classes; a host method trains on both.

Stage 1 (`ship_generator.PromptGenerator`, trained by `engine.fit` on the base train features) learns to
reconstruct image features through the frozen text tower. Stage 2 trains the host method (`stage2`: coop,
clip_adapter, tip_adapter_f) over the K = base + new label space on each real base batch plus as many features
synthesized for uniformly drawn new classes, re-drawn every step. Evaluation follows base-to-new: before
`retarget` the logits are the base columns, after `retarget(new classes)` the new columns, each in its own label
space (CoCoOp's protocol).

As published (the released code, stage2=coop): generator as in ship_generator.py; fresh CoOp context of 4 tokens
from "a photo of a"; plain SGD lr 2e-3 (no momentum or weight decay), batch 256, cosine per step, 200 epochs
(ImageNet: AdamW 1e-3, eps 1e-4, 20 epochs); synthetic features drawn fresh every step, one per real feature.
Reconstructed (no code was released): stage2=clip_adapter and tip_adapter_f use the project's implementations and
recipes unchanged, over all K classes; their synthetic features come from a bank of `bank_per_class` per new class
drawn once; Tip-Adapter-F's cache also holds `keys_per_class` synthesized keys per new class, with alpha/beta at
their configured values (no search: there is no labelled new-class val). Cross-dataset transfer (paper Table 2;
the fine-tuning recipe is not given): retargeting to another class set re-fits the host on features synthesized
for the target classes only, from the host's trained state, with the host's recipe.

Honest protocol: the generator is the last one (the official script runs stage 2 from the generators of epochs
10..50 and reports the best test H; that is a sweep over generator.train.epochs read with protocol.selection=test).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clipadapt.engine import fit
from clipadapt.features import FeatureSet
from clipadapt.method_schemas import ShipSchema
from clipadapt.methods.base import METHODS, Batch, Method, register_method
from clipadapt.methods.coop import shots_of
from clipadapt.methods.ship_generator import PromptGenerator
from clipadapt.methods.tip_adapter import TipAdapter

log = logging.getLogger(__name__)


@register_method("ship")
class Ship(Method):
    Config = ShipSchema
    retarget_trains = True  # without label-only classes, `transfer` trains the generator on the train draw

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        if task.new_classnames and task.new_text is None:
            raise ValueError("the task names label-only classes but has no text features for them (task.new_text)")
        self.num_base, self.new_classnames = task.num_classes, list(task.new_classnames)
        self.num_new = len(self.new_classnames)
        host_cfg = cfg[cfg.stage2]
        host_cfg.train = OmegaConf.merge(host_cfg.train, {k: v for k, v in cfg.train.items() if v is not None})
        joint = task
        if self.num_new:  # the host's label space: base classes, then the label-only new ones
            joint = replace(task, classnames=task.classnames + self.new_classnames,
                            text=torch.cat([task.text, task.new_text.to(task.text)]), new_classnames=[], new_text=None)
        # The host first: under the same seed it starts exactly as the plain method would.
        self.host = METHODS[cfg.stage2](host_cfg, joint)
        cfg.train.merge_with(OmegaConf.to_container(host_cfg.train))  # what engine.fit runs: the host's resolved schedule
        self.joint_task = joint
        self.generator: PromptGenerator | None = None
        if self.num_new:
            self.generator = PromptGenerator(cfg.generator, joint, task.text_tower("ship"), joint.classnames)
        else:
            log.warning("ship: no label-only classes (protocol.task=base_to_new gives them): stage 2 is plain %s",
                        cfg.stage2)
        self.columns = slice(0, self.num_base)  # base test set: the base columns
        self.rng = torch.Generator().manual_seed(task.seed)
        self.bank: torch.Tensor | None = None
        self.stage1_history: list[float] = []
        self.source_state: dict[str, torch.Tensor] | None = None  # the host's learned parameters, once transferred

    # ------------------------------------------------------------------ stage 1
    def train_generator(self) -> None:
        """Stage 1 on the real base train features (augmented views), then frozen."""
        self.stage1_history = fit(self.generator, self.task.train, self.task.seed)
        self.generator.requires_grad_(False).eval()
        self.generator.zero_grad(set_to_none=True)

    @property
    def bank_per_class(self) -> int:
        configured = self.cfg.synth.bank_per_class
        return (0 if self.cfg.stage2 == "coop" else 128) if configured is None else int(configured)

    def synthesize(self, labels: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        return self.generator.synthesize(labels, self.rng if rng is None else rng, self.cfg.synth.chunk)

    def setup(self) -> None:
        if self.generator is not None:
            self.train_generator()
            new_labels = torch.arange(self.num_base, self.num_base + self.num_new)
            if self.bank_per_class > 0:
                per_class = self.bank_per_class
                self.bank = self.synthesize(new_labels.repeat_interleave(per_class)).view(self.num_new, per_class, -1)
            if isinstance(self.host, TipAdapter):
                keys = self.cfg.synth.keys_per_class
                self._add_cache_entries(new_labels.repeat_interleave(shots_of(self.task) if keys is None else keys))
        self.host.setup()

    def _add_cache_entries(self, labels: torch.Tensor) -> None:
        """Tip-Adapter-F: synthesized keys (and one-hot values) for the new classes join the real base cache."""
        if len(labels) == 0:
            return
        host = self.host
        keys = self.synthesize(labels).to(host.keys)
        host.keys = torch.nn.Parameter(torch.cat([host.keys.detach(), keys]), requires_grad=host.keys.requires_grad)
        values = F.one_hot(labels.to(host.values.device), host.values.shape[1]).to(host.values)
        host.values = torch.cat([host.values, values])

    # ------------------------------------------------------------------ stage 2
    def synthetic_batch(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` new-class features and their labels (in the joint label space), re-drawn at every call."""
        drawn = torch.randint(self.num_new, (count,), generator=self.rng)
        if self.bank is not None:
            features = self.bank[drawn, torch.randint(self.bank.shape[1], (count,), generator=self.rng)]
        else:
            features = self.synthesize(drawn + self.num_base)
        return features, (drawn + self.num_base).to(features.device)

    def loss(self, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        count = round(self.cfg.synth.ratio * len(labels)) if self.generator is not None else 0
        if count == 0:
            return self.host.loss(batch, labels)
        features, new_labels = self.synthetic_batch(count)
        return self.host.loss(Batch(image=torch.cat([batch.image, features])), torch.cat([labels, new_labels]))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.host(batch)[:, self.columns]

    def tune(self, val):
        chosen = self.host.tune(val)  # val holds base classes only: a host search (off by default) is base-biased
        if self.stage1_history:
            chosen["generator/loss_first"], chosen["generator/loss_last"] = self.stage1_history[0], self.stage1_history[-1]
        return chosen

    # ------------------------------------------------------------------ evaluation on other class sets
    def retarget(self, classnames: list[str], text: torch.Tensor) -> None:
        """The new classes of base-to-new: their columns of the joint label space; any other class set: `transfer`."""
        super().retarget(classnames, text)
        if self.num_new and self.source_state is None and list(classnames) == self.new_classnames:
            self.columns = slice(self.num_base, self.num_base + self.num_new)
            return
        self.transfer(list(classnames), text)

    def transfer(self, classnames: list[str], text: torch.Tensor) -> None:
        """Cross-dataset: the host on the target classes, re-fitted on features synthesized for them (paper §4.2.2)."""
        if isinstance(self.host, TipAdapter):
            raise ValueError("ship with stage2=tip_adapter_f cannot move to another class set (its cache holds the "
                             "source classes): use method.stage2=coop, the paper's cross-dataset setting")
        # Every target starts from the source-trained host, whatever was evaluated before it.
        learned = {name: p for name, p in self.host.named_parameters() if p.requires_grad}
        if self.source_state is None:
            self.source_state = {name: p.detach().clone() for name, p in learned.items()}
        with torch.no_grad():
            for name, p in learned.items():
                p.copy_(self.source_state[name])
        self.host.retarget(classnames, text)
        self.columns = slice(None)
        if self.cfg.transfer.per_class == 0:
            return
        if self.generator is None:  # the source task had no label-only classes: stage 1 runs now, on its train set
            if len(self.task.train) == 0:
                raise ValueError("ship: moving to another class set trains the generator on the train draw, and this "
                                 "task has none: build the method on the run's train features")
            with torch.random.fork_rng():  # seeded, so that a re-evaluation (clipadapt.evaluate) trains the same one
                torch.manual_seed(self.task.seed)
                self.generator = PromptGenerator(self.cfg.generator, self.task, self.task.text_tower("ship"),
                                                 self.task.classnames)
                self.train_generator()
        self.generator.set_classes(classnames)
        per_class, views = self.cfg.transfer.per_class, 1 + max(1, self.cfg.transfer.views)  # + view 0 ("plain")
        labels = torch.arange(len(classnames)).repeat_interleave(per_class)
        rng = torch.Generator().manual_seed(self.task.seed)  # a target's features do not depend on what came before
        features = self.synthesize(labels.repeat(views), rng).view(views, len(labels), -1).transpose(0, 1)
        synthetic = FeatureSet(image=features.cpu().numpy(), labels=labels.numpy())
        log.info("ship: re-fitting %s on %d synthesized features x %d draws for %d target classes",
                 self.cfg.stage2, len(labels), views, len(classnames))
        fit(self.host, synthetic, self.task.seed)
