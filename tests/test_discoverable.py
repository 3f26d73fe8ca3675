"""Every method option is in the composed config (issue 15, point 3): `--cfg job` shows each key of the method's
schema with its default or the dataset's setting, any of them is overridden without `+`, a misspelt key fails when
Hydra composes, `--help` offers only real choices, and printing a config imports no method (torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from clipadapt import method_schemas
from clipadapt.app import CONFIG_DIR
from clipadapt.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
METHOD_FILES = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


@pytest.fixture(scope="module")
def composer():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield lambda *overrides: compose(config_name="config", overrides=["paths.root=/tmp/clipadapt", *overrides])
    GlobalHydra.instance().clear()


def entrypoint(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPADAPT_HOME": "/tmp/clipadapt"}
    return subprocess.run([sys.executable, "-m", "clipadapt.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_every_registered_method_has_a_method_file():
    assert sorted(METHODS) == METHOD_FILES


@pytest.mark.parametrize("name", METHOD_FILES)
def test_the_composed_node_is_the_schema_with_its_defaults(composer, name):
    """On a dataset without per-dataset settings the node is exactly the registered class's schema: every key, every
    default, its type (so a wrong type fails at compose)."""
    method = composer(f"method={name}", "dataset=synthetic").method
    schema = METHODS[name].Config
    assert OmegaConf.get_type(method) is schema
    assert OmegaConf.to_container(method) == {**OmegaConf.to_container(OmegaConf.structured(schema)), "name": name}


@pytest.mark.parametrize("name", METHOD_FILES)
def test_any_option_is_overridden_without_plus(composer, name):
    assert composer(f"method={name}", "method.train.epochs=5", "method.fidelity=mine").method.train.epochs == 5


@pytest.mark.parametrize("name", METHOD_FILES)
def test_a_misspelt_option_fails_at_compose(composer, name):
    with pytest.raises(ConfigCompositionException) as error:
        composer(f"method={name}", "method.no_such_key=1")
    assert f"Key 'no_such_key' not in '{METHODS[name].Config.__name__}'" in str(error.value.__cause__)


def test_the_dataset_setting_wins_over_the_default_and_the_command_line_over_both(composer):
    method = composer("method=tip_adapter_f", "dataset=eurosat", "method.search.alpha_max=4").method
    assert (method.alpha, method.train.epochs) == (2, 100)  # conf/dataset_method/eurosat_tip_adapter{,_f}.yaml
    assert (method.search.beta_max, method.search.alpha_max) == (12, 4)
    assert method.search.alpha_steps == 20 and method.train.eps == 1e-4  # the schema's, untouched
    assert composer("method=coop", "dataset=imagenet").method.train.epochs == 50  # imagenet_coop.yaml
    ship = composer("method=ship", "dataset=imagenet").method
    assert (ship.generator.activation, ship.tip_adapter_f.alpha, ship.coop.n_ctx) == ("leaky_relu", 1.17, 4)


def test_vt_clip_keeps_its_backbone_setting(composer):
    cfg = composer("method=vt_clip")
    assert cfg.backbone.dense == "value" and OmegaConf.get_type(cfg.method) is method_schemas.VTClipSchema
    assert composer("method=vt_clip", "backbone.dense=attention").backbone.dense == "attention"


def test_names_the_schemas_offer_are_the_ones_the_code_maps():
    from clipadapt.engine import OPTIMIZERS
    from clipadapt.methods.ship_generator import ACTIVATIONS

    assert set(method_schemas.OPTIMIZERS) == set(OPTIMIZERS)
    assert set(method_schemas.GENERATOR_ACTIVATIONS) == set(ACTIVATIONS)


def test_cfg_job_shows_every_option_and_help_only_real_choices():
    shown = entrypoint("method=coop", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    printed = OmegaConf.create(shown.stdout).method
    assert OmegaConf.to_container(printed) == {
        **OmegaConf.to_container(OmegaConf.structured(method_schemas.CoOpSchema)), "name": "coop"}

    typo = entrypoint("method=coop", "method.train.epoch=5", "--cfg", "job")
    assert typo.returncode == 2 and typo.stderr == (
        "ConfigError: method.train.epoch: Key 'epoch' not in 'CoOpTrainSchema'; did you mean epochs? "
        "(`--cfg job` lists every option)\n")

    groups = entrypoint("--help").stdout.split("== Config ==")[0]
    method_line = next(line for line in groups.splitlines() if line.startswith("method: "))
    assert method_line.removeprefix("method: ").split(", ") == METHOD_FILES
    assert "Schema" not in groups


def test_printing_a_config_imports_no_method():
    """The schemas are torch-free: composing a config (`--cfg job`, `--help`, a sweep's launcher) stays as cheap as
    it was before every option was in it."""
    script = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from clipadapt.app import CONFIG_DIR\n"
        "with initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'):\n"
        "    cfg = compose(config_name='config', overrides=['method=ship', 'paths.root=/tmp/clipadapt'])\n"
        "assert cfg.method.coop.n_ctx == 4\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('clipadapt.methods')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
