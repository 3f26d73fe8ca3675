"""Structured-config schemas: a misspelt key or a wrong type fails when Hydra composes the config.

The primary config (conf/config.yaml) extends `RunSchema`; each method validates its own node against the
`Config` dataclass of its registered class (see methods/base.py), so adding a method needs no change here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class BackboneSchema:
    name: str = MISSING  # short id used in run names and paths, e.g. rn50
    model: str = MISSING  # open_clip architecture, e.g. RN50, ViT-B-16
    pretrained: Optional[str] = None  # open_clip tag (openai), a local weights file, or null for random init
    dense: str = "attention"  # ResNet dense tokens: attention (CALIP's official) | value (MaskCLIP)


@dataclass
class DatasetSchema:
    name: str = MISSING  # registry key and id in paths
    kind: str = MISSING  # reader: split_file | folder | synthetic | features | imagenet | fgvc_aircraft | imagenet_variant
    root: str = ""  # folder under paths.data_root (or absolute)
    image_dir: str = ""  # images below root that split-file paths are relative to
    split_file: Optional[str] = None  # below root: the split file (imagenet and its variants: classnames.txt)
    split_url: Optional[str] = None  # where a missing split file comes from
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    template_set: Optional[str] = None  # null: `templates`; a name picks template_sets[name] (imagenet: ensemble)
    template_sets: dict[str, list[str]] = field(default_factory=dict)
    draw_file: Optional[str] = None  # import the few-shot draw from this JSON instead of drawing it (see README)
    # synthetic
    num_classes: int = 10
    images_per_class: int = 24
    image_size: int = 64
    # features: a .npz/.safetensors file of precomputed features
    path: Optional[str] = None


@dataclass
class FeaturesSchema:
    train_views: int = 10  # augmented passes (random-resized-crop + flip) cached for the train draw
    augment_seed: int = 0  # the augmentations are a function of (image, view, this seed)
    batch_size: int = 64
    num_workers: int = 2
    dtype: str = "float16"


@dataclass
class LoggerSchema:
    name: str = "none"  # none | wandb
    project: str = "clipadapt"
    entity: Optional[str] = None
    group: Optional[str] = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; default: offline when no API key is set


@dataclass
class PathsSchema:
    root: str = MISSING
    data_root: str = MISSING
    cache_dir: str = MISSING


@dataclass
class ProtocolSchema:
    task: str = "few_shot"  # few_shot | base_to_new | cross_dataset | domain_generalisation (see protocols.py)
    targets: Optional[list[str]] = None  # cross_dataset / domain_generalisation: dataset ids; null: the standard set
    val_policy: str = "few_shot"  # none | few_shot | full: what hyperparameter searches may look at
    selection: str = "last"  # last | val | test (test is leaky and labelled so)


@dataclass
class SweepSchema:
    skip_done: bool = True  # multirun: a cell whose metrics.json matches its config hash is skipped (clipadapt.sweep)
    batch_cells: bool = False  # launcher=batched: train the cells of each method/backbone/dataset as one stacked model


@dataclass
class RunSchema:
    backbone: BackboneSchema = MISSING
    dataset: DatasetSchema = MISSING
    method: Any = MISSING  # validated against the method's own schema at start
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    paths: PathsSchema = field(default_factory=PathsSchema)
    features: FeaturesSchema = field(default_factory=FeaturesSchema)
    protocol: ProtocolSchema = field(default_factory=ProtocolSchema)
    sweep: SweepSchema = field(default_factory=SweepSchema)
    shots: int = 16
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    save_logits: bool = False
    run_name: str = MISSING


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunSchema)
    store.store(group="backbone", name="schema", node=BackboneSchema)
    store.store(group="dataset", name="schema", node=DatasetSchema)
    store.store(group="logger", name="schema", node=LoggerSchema)
