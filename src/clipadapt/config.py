"""Structured-config schemas: a misspelt key or a wrong type fails when Hydra composes the config, and a value
outside an option's choices or bounds fails at start (`check_options`), in one line naming what is allowed.

The primary config (conf/config.yaml) extends `RunSchema`; each conf/method/<name>.yaml extends its method's
`Config` dataclass (clipadapt/method_schemas.py, stored here under its class name), so every method option shows in
`--cfg job` with its default. The choices and bounds sit on the fields themselves (`one_of`, `at_least`, `matching`),
for method schemas as well.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, is_dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, Iterable, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError


class ConfigError(ValueError):
    """An option outside its choices or bounds: one line naming the option and what it accepts."""


def one_of(default: Any, *choices: Any) -> Any:
    """A field that takes one of `choices` (list None among them where the field's type allows null: the error then
    names it)."""
    return field(default=default, metadata={"choices": choices})


def at_least(default: Any, minimum: float) -> Any:
    """A number >= `minimum` (null passes where the field's type allows it: Optional[int] = None means "derived")."""
    return field(default=default, metadata={"minimum": minimum})


def above(default: float, bound: float) -> Any:
    """A number > `bound` (a learning rate of 0 would train nothing, silently)."""
    return field(default=default, metadata={"above": bound})


def matching(default: str, pattern: str, shown: str) -> Any:
    """A field whose value must fully match `pattern`; `shown` says what it accepts, for the error."""
    return field(default=default, metadata={"pattern": pattern, "shown": shown})


@dataclass
class BackboneSchema:
    name: str = MISSING  # short id used in run names and paths, e.g. rn50
    model: str = MISSING  # open_clip architecture, e.g. RN50, ViT-B-16
    pretrained: Optional[str] = None  # open_clip tag (openai), a local weights file, or null for random init
    dense: str = one_of("attention", "attention", "value")  # ResNet dense tokens: CALIP's official | MaskCLIP's


@dataclass
class DatasetSchema:
    name: str = MISSING  # registry key and id in paths
    kind: str = one_of(MISSING, "split_file", "folder", "synthetic", "features", "imagenet", "fgvc_aircraft",
                       "imagenet_variant")  # the reader (clipadapt.data)
    root: str = ""  # folder under paths.data_root (or absolute)
    image_dir: str = ""  # images below root that split-file paths are relative to
    split_file: Optional[str] = None  # below root: the split file (imagenet and its variants: classnames.txt)
    split_url: Optional[str] = None  # where a missing split file comes from
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    template_set: Optional[str] = None  # null: `templates`; a name picks template_sets[name] (imagenet: ensemble)
    template_sets: dict[str, list[str]] = field(default_factory=dict)
    draw_file: Optional[str] = None  # import the few-shot draw from this JSON instead of drawing it (see README)
    # synthetic
    num_classes: int = at_least(10, 2)
    images_per_class: int = at_least(24, 1)
    image_size: int = at_least(64, 8)
    # features: a .npz/.safetensors file of precomputed features
    path: Optional[str] = None


@dataclass
class FeaturesSchema:
    train_views: int = at_least(10, 0)  # augmented passes (random-resized-crop + flip) cached for the train draw
    augment_seed: int = 0  # the augmentations are a function of (image, view, this seed)
    batch_size: int = at_least(64, 1)
    num_workers: int = at_least(2, 0)
    dtype: str = one_of("float16", "float16", "float32")  # of the cached features


@dataclass
class LoggerSchema:
    name: str = one_of("none", "none", "wandb")
    project: str = "clipadapt"
    entity: Optional[str] = None
    group: Optional[str] = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = one_of(None, None, "online", "offline", "disabled")  # null: offline when no API key is set


@dataclass
class PathsSchema:
    root: str = MISSING
    data_root: str = MISSING
    cache_dir: str = MISSING


@dataclass
class ProtocolSchema:
    task: str = one_of("few_shot", "few_shot", "base_to_new", "cross_dataset", "domain_generalisation")  # protocols.py
    targets: Optional[list[str]] = None  # cross_dataset / domain_generalisation: dataset ids; null: the standard set
    val_policy: str = one_of("few_shot", "none", "few_shot", "full")  # what hyperparameter searches may look at
    selection: str = one_of("last", "last", "val", "test")  # test is leaky and labelled so
    allow_fewer_shots: bool = False  # true: a class with fewer train images than `shots` gives all it has (recorded)


@dataclass
class SweepSchema:
    skip_done: bool = True  # multirun: a cell whose metrics.json matches its config hash is skipped (clipadapt.sweep)
    batch_cells: bool = False  # launcher=batched: train the cells of each method/backbone/dataset as one stacked model
    check_datasets: bool = True  # multirun: refuse to start when a dataset of the sweep is not readable


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
    shots: int = at_least(16, 1)
    seed: int = at_least(1, 0)
    device: str = matching("auto", r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N")
    save_logits: bool = False
    run_name: str = MISSING


def file_stem(path: Optional[str]) -> str:
    """`${file_stem:${dataset.path}}`: a features file's name without folder and suffix (its runs' backbone label)."""
    return Path(path).stem if path else "unset"


def register_schemas() -> None:
    """The run schema that conf/config.yaml extends, stored outside every group so that `--help` offers it as no
    choice, and the resolvers the config uses. (The method schemas reach Hydra through the `clipadapt-schema`
    config source, built only when a method file asks for its own.)"""
    OmegaConf.register_new_resolver("file_stem", file_stem, replace=True)
    OmegaConf.register_new_resolver("clipadapt.task_suffix", task_suffix, replace=True)
    OmegaConf.register_new_resolver("clipadapt.settings_suffix", settings_suffix, replace=True)
    OmegaConf.register_new_resolver("clipadapt.new_dir", new_dir, replace=True, use_cache=True)
    ConfigStore.instance().store(name="run_schema", node=RunSchema)


# ------------------------------------------------------------------------------------------ choices and bounds


def option_errors(schema: type, node: DictConfig, prefix: str = "") -> list[str]:
    """One line per option of `node` outside what its field in `schema` (a dataclass, nested ones included) allows,
    and per key the schema does not have (forced in with `+`, which Hydra allows: `+shot=4` would change nothing)."""
    errors = []
    types = get_type_hints(schema)
    names = [spec.name for spec in fields(schema)]
    for spec in fields(schema):
        key, value = f"{prefix}{spec.name}", node.get(spec.name)
        if is_dataclass(types[spec.name]) and isinstance(value, DictConfig):
            errors += option_errors(types[spec.name], value, f"{key}.")
        elif (allowed := _violation(_rule(schema, spec.name), value)) is not None:
            errors.append(f"{key}={value}: {allowed}")
    for name in node:
        if name not in names and not (name == "hydra" and not prefix):  # Hydra's own node, in a sweep cell's config
            errors.append(f"{prefix}{name}: no such option{did_you_mean(str(name), names)}")
    return errors


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice closest to a misspelt `name` (case aside), or None when none is close."""
    by_case = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(name.lower(), by_case, n=1)
    return by_case[close[0]] if close else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`; did you mean <the closest choice>?`, or nothing when no choice is close."""
    match = closest(name, choices)
    return f"; did you mean {match}?" if match else ""


COMPOSE_ERRORS = (ConfigCompositionException, OverrideParseException)  # a config that does not compose


def error_line(error: BaseException) -> str:
    """Any error in one line; a config that does not compose as `ConfigError: <what, the closest valid name>`."""
    if isinstance(error, COMPOSE_ERRORS):
        return f"ConfigError: {compose_error_line(error)}"
    return f"{type(error).__name__}: {error}".splitlines()[0]


def compose_error_line(error: BaseException) -> str:
    """One line for a config that does not compose: what is wrong, the closest valid name, where to look.

    Hydra's own report of these spans many lines (every option of a group, the config search path) and, for a
    misspelt key, advises `+key=value`: a key that no code reads (`check_options` refuses it).
    """
    first, cause = _first_line(error), error.__cause__
    if isinstance(error, MissingConfigException) and error.options and "/" in (error.missing_cfg_file or ""):
        group, name = error.missing_cfg_file.rsplit("/", 1)
        return f"{group}={name}: no such option{did_you_mean(name, error.options)} ({', '.join(error.options)})"
    if isinstance(error, OverrideParseException):
        return f"{error.override}: {first} (override syntax: https://hydra.cc/docs/advanced/override_grammar/basic/)"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        known = list(cause.parent_node) if isinstance(cause.parent_node, DictConfig) else []
        return (f"{cause.full_key}: {_first_line(cause)}{did_you_mean(str(cause.key), known)} "
                f"(`--cfg job` lists every option)")
    if cause is not None:
        merging = re.fullmatch(r"Error merging override (.+)", first)
        return f"{merging.group(1) if merging else first}: {_first_line(cause)}"
    appended = re.match(r"Could not append to config\. An item is already at '[^']*'|Multiple values for [^.]*", first)
    if appended:  # Hydra's advice here ("use 'override dataset: dtd'") is for a defaults list
        return f"{appended.group(0)}: set it without the leading +"
    return first


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")


def _rule(schema: type, name: str) -> dict:
    """The field's rule, from the nearest class that declares one: a subclass that only changes a default
    (`optimizer: str = "sgd"` in CoOp's TrainSchema) keeps its parent's choices and bounds."""
    for cls in schema.__mro__:
        spec = getattr(cls, "__dataclass_fields__", {}).get(name)
        if spec is not None and spec.metadata:
            return dict(spec.metadata)
    return {}


def _violation(rule: dict, value: Any) -> str | None:
    """What `value` should have been under the field's rule, or None when it complies."""
    if value is None:  # a null is for the field's type to allow (OmegaConf checked it): Optional[int] = None
        return None
    if "choices" in rule and value not in rule["choices"]:
        return "use one of " + ", ".join("null" if choice is None else str(choice) for choice in rule["choices"])
    if "minimum" in rule and value < rule["minimum"]:
        return f"must be >= {rule['minimum']}"
    if "above" in rule and value <= rule["above"]:
        return f"must be > {rule['above']}"
    if "pattern" in rule and not re.fullmatch(rule["pattern"], str(value)):
        return f"use {rule['shown']}"
    return None


def check_options(cfg: DictConfig) -> None:
    """Every enumerated or bounded option of a run config, the method's against its own schema, checked once at
    start: ConfigError with all the offending options on one line. A misspelt key or a wrong type fails earlier, when
    Hydra composes; a key forced in with `+` fails here (`option_errors`, or methods.base.method_config for the
    method's)."""
    from clipadapt.methods.base import method_config  # imports the methods (torch): only where a cell starts

    method = method_config(cfg.method)
    errors = option_errors(RunSchema, cfg) + option_errors(OmegaConf.get_type(method), method, "method.")
    if errors:
        raise ConfigError("; ".join(errors))


# ------------------------------------------------------------------------------------------ names and folders

# Keys that identify where and how a cell ran, not what it computed. A sweep resumed with another launcher, on
# another machine, with another tracker or cache folder reuses its finished cells (clipadapt.sweep.config_hash).
RESULT_NEUTRAL_KEYS = (
    "logger", "paths", "sweep", "device", "save_logits", "features.num_workers", "features.batch_size",
)
# What a sweep cell's folder path already says: <method>/<backbone>/<dataset>/<K>shot/seed<S> (conf/config.yaml).
GRID_KEYS = ("method", "backbone", "dataset", "shots", "seed", "method.name", "backbone.name", "dataset.name")
_SAFE_IN_FOLDER = re.compile(r"[^A-Za-z0-9._=,:+\-\[\]]")


def task_suffix(task: str) -> str:
    """`-<task>` for run names, empty for the default few-shot task (whose names stay as they always were)."""
    return "" if task == ProtocolSchema.task else f"-{task}"


def _names_a_setting(override: str) -> bool:
    """Whether an override (`method.train.epochs=20`, `+sweep=grid`, ...) can change a cell's result in a way its
    folder path does not already say."""
    key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
    unnamed = (*RESULT_NEUTRAL_KEYS, "launcher", "run_name")
    return key not in GRID_KEYS and not any(key == other or key.startswith(f"{other}.") for other in unnamed)


def settings_suffix(task_overrides: list[str]) -> str:
    """`,key=value,...`: the overrides of a sweep cell that its grid folder does not name (empty without any), so
    that `method.train.epochs=1,20` keeps both results: `seed1,method.train.epochs=1`."""
    settings = ",".join(_in_folder_name(override) for override in sorted(task_overrides) if _names_a_setting(override))
    if len(settings) > 200:  # a folder name holds 255 bytes
        settings = f"{settings[:190]}~{_short_hash(settings)}"
    return f",{settings}" if settings else ""


def _in_folder_name(override: str) -> str:
    """`key=value` as a folder name can hold it: a path by its last part, characters a folder name should not hold
    as `_`, and then a hash of the override so that two different settings never share a folder."""
    key, _, value = override.partition("=")
    shown = _SAFE_IN_FOLDER.sub("_", f"{key}={value.rstrip('/').rsplit('/', 1)[-1]}")
    return shown if shown == override else f"{shown}~{_short_hash(override)}"


def _short_hash(text: str) -> str:
    return sha256(text.encode()).hexdigest()[:8]


def new_dir(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... : the first that did not exist, created here, so that two runs started in
    the same second never share a folder. Registered with use_cache: a config resolves it once."""
    candidate, n = Path(path), 1
    candidate.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = Path(f"{path}-{n}")
