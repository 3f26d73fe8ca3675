"""Every method x dataset x backbone composes and validates; bad options fail at start, naming the valid choices."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException, ValidationError

from clipadapt.app import CONFIG_DIR
from clipadapt.config import ConfigError, check_options, compose_error_line
from clipadapt.methods.base import method_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def composer():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield lambda overrides: compose(config_name="config", overrides=["paths.root=/tmp/clipadapt", *overrides])
    GlobalHydra.instance().clear()


def interacting_pairs() -> list[tuple[str, str]]:
    """Every method with one dataset, every dataset with one method, and every pair that has per-pair settings
    (conf/dataset_method/<dataset>_<method>.yaml): groups interact only through those files."""
    methods, datasets = options("method"), options("dataset")
    with_settings = [(m, d) for m, d in itertools.product(methods, datasets) if f"{d}_{m}" in options("dataset_method")]
    return sorted({*((m, "eurosat") for m in methods), *(("zero_shot", d) for d in datasets), *with_settings})


def test_every_combination_composes(composer):
    """Every method x dataset pair that can interact composes and validates, each with every backbone in turn: no
    default or interpolation links the backbone to the pair, so rotating the backbones through the pairs covers the
    product while composing each pair once."""
    backbones = options("backbone")
    pairs = interacting_pairs()
    assert len(options("dataset_method")) == sum(f"{d}_{m}" in options("dataset_method") for m, d in pairs)
    for n, (method, dataset) in enumerate(pairs):
        backbone = backbones[n % len(backbones)]
        cfg = composer([f"method={method}", f"dataset={dataset}", f"backbone={backbone}"])
        method_config(cfg.method)  # the method's own schema
        check_options(cfg)  # every default is among its option's choices and within its bounds
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["run_name"] == f"{cfg.method.name}-{cfg.dataset.name}-16s-{cfg.backbone.name}-s1"
        assert Path(resolved["paths"]["cache_dir"]).is_absolute()


@pytest.mark.parametrize("overrides,message", [
    (["method=nope"], "Could not find 'method/nope'"),
    (["backbone=nope"], "Could not find 'backbone/nope'"),
    (["dataset=nope"], "Could not find 'dataset/nope'"),
    (["backbone.modle=RN50"], "Key 'modle' not in 'BackboneSchema'"),
    (["shots=many"], "Value 'many' of type 'str' could not be converted to Integer"),
    (["features.train_views=1.5"], "could not be converted to Integer"),
])
def test_bad_options_fail_at_compose(composer, overrides, message):
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        composer(overrides)
    text = str(error.value) + str(error.value.__cause__ or "")
    assert message in text


@pytest.mark.parametrize("override,line", [
    ("method=tip_adaptr", "method=tip_adaptr: no such option; did you mean tip_adapter? (calip, calip_fs, "),
    ("dataset=euroSAT", "dataset=euroSAT: no such option; did you mean eurosat? (caltech101, "),
    ("method.train.epoch=3", "method.train.epoch: Key 'epoch' not in 'TrainSchema'; did you mean epochs? "),
    ("methd=coop", "methd: Key 'methd' not in 'RunSchema'; did you mean method? "),
    ("shots=abc", "shots=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ("shots=[1", "shots=[1: no viable alternative at input '[1' (override syntax: https://hydra.cc/"),
    ("+shots=4", "Could not append to config. An item is already at 'shots': set it without the leading +"),
    ("+dataset=dtd", "Multiple values for dataset: set it without the leading +"),
])
def test_a_config_that_does_not_compose_is_one_line_naming_the_closest_name(composer, override, line):
    with pytest.raises((ConfigCompositionException, OverrideParseException)) as error:
        composer([override])
    text = compose_error_line(error.value)
    assert text.startswith(line) and "\n" not in text and "use +" not in text  # not Hydra's advice to append the key


def test_keys_forced_in_with_plus_are_refused_not_ignored(composer):
    cfg = composer(["+shot=4", "+features.train_view=2", "+sweep=grid"])
    with pytest.raises(ConfigError) as error:
        check_options(cfg)
    assert str(error.value) == ("features.train_view: no such option; did you mean train_views?; "
                                "shot: no such option; did you mean shots?")


def test_unknown_group_option_names_the_choices(composer):
    with pytest.raises(ConfigCompositionException) as error:
        composer(["method=nope"])
    assert all(name in str(error.value) for name in options("method"))


@pytest.mark.parametrize("override,message", [
    ("method.alpha=abc", "could not be converted to Float"),
    ("method.alhpa=1", "Key 'alhpa' not in 'TipAdapterFSchema'"),
])
def test_method_schema_rejects_typos_and_wrong_types_at_compose(composer, override, message):
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        composer(["method=tip_adapter_f", override])
    assert message in str(error.value) + str(error.value.__cause__ or "")


def test_a_forced_typo_fails_at_start(composer):
    """Hydra's `+` adds a key past the schema; the start's check (method_config) still refuses it, as it refuses one
    in a node that did not come through Hydra (a saved run's config, read back by clipadapt.evaluate)."""
    for node in composer(["method=tip_adapter_f", "+method.alhpa=1"]).method, {"name": "tip_adapter_f", "alhpa": 1}:
        with pytest.raises(OmegaConfBaseException, match="Key 'alhpa' not in 'TipAdapterFSchema'"):
            method_config(OmegaConf.create(node) if isinstance(node, dict) else node)


def test_a_composition_builds_only_its_own_method_schema(composer, monkeypatch):
    """The method schemas reach Hydra through the clipadapt-schema config source, which turns a dataclass into a
    config only when a method file asks for it (building all 14 at every start cost ~80 ms)."""
    from hydra_plugins.clipadapt_launcher import schema_source

    built = []
    monkeypatch.setattr(schema_source.OmegaConf, "structured",
                        lambda schema, _structured=OmegaConf.structured: built.append(schema.__name__)
                        or _structured(schema))
    cfg = composer(["method=coop"])
    assert built == ["CoOpSchema"]
    assert OmegaConf.get_type(cfg.method).__name__ == "CoOpSchema" and cfg.method.train.optimizer == "sgd"
