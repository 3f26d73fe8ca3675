"""`python -m clipadapt.evaluate RUN_DIR [overrides]`: evaluate a trained run again, without training.

A run leaves its trained state (`model.safetensors`) beside metrics.json, whose resolved config says how its data
was read. The method is rebuilt from that config on an empty train set, the state is loaded, and:
- with no override, the run's own evaluations are repeated (its test set, or base and new classes, and its transfer
  targets): the same features, the same state, hence the same logits and the same test/acc;
- `dataset=<id>` (repeatable) scores that dataset's test set after the run's own, as the transfer protocols do: an
  ImageNet variant in ImageNet's label space (domain generalisation), any other dataset with the method retargeted
  to its classes (cross-dataset); `protocol.targets=[a,b]` (and `protocol.task=...`) say the same;
- any other `key=value` overrides the run's config (`device=cpu`, `paths.cache_dir=...`, `features.batch_size=64`).
Only the test sets' features are read (from the feature cache, or computed), not the train draw's: a method whose
state says it all is rebuilt without them. The exception is SHIP moved to another dataset's classes, which trains its
generator on the draw then (`Method.retarget_trains`), as the run did.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from clipadapt import protocols, trained_state
from clipadapt.app import as_command
from clipadapt.config import error_line
from clipadapt.data.benchmarks import IMAGENET_VARIANTS

USAGE = "usage: python -m clipadapt.evaluate RUN_DIR [dataset=<id>] [protocol.targets=[a,b]] [key=value ...]"


class EvaluateError(ValueError):
    """A run folder or an override that cannot be evaluated: the message says what to do."""


def read_run(run_dir: Path) -> tuple[dict, trained_state.TrainedState]:
    metrics_file, state_file = run_dir / "metrics.json", run_dir / trained_state.STATE_FILE
    if not metrics_file.is_file():
        raise EvaluateError(f"{run_dir} holds no metrics.json: give the folder of a finished run")
    if not state_file.is_file():
        raise EvaluateError(f"{run_dir} has no saved state ({trained_state.STATE_FILE}): it was trained before runs "
                            f"saved their state, or by a failed run; train it again to evaluate it later")
    return json.loads(metrics_file.read_text()), trained_state.read(state_file)


def with_overrides(config: dict, overrides: list[str]) -> DictConfig:
    """The run's config with `key=value` overrides; `dataset=<id>` adds that dataset as a transfer target."""
    cfg = OmegaConf.create(config)
    OmegaConf.set_struct(cfg, True)  # a misspelt key fails instead of being added
    targets, dotlist = [], []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise EvaluateError(f"override {override!r} is not key=value: {USAGE}")
        if key == "dataset":
            targets.append(value)
        else:
            dotlist.append(override)
    try:
        cfg.merge_with(OmegaConf.from_dotlist(dotlist))
    except Exception as error:  # noqa: BLE001 - omegaconf's errors are several classes; one line here
        raise EvaluateError(f"override not applicable to the run's config: {str(error).splitlines()[0]}") from error
    if targets:  # they replace the run's own targets
        cfg.protocol.targets = targets
    return with_transfer_task(cfg, config["protocol"]["task"])


def with_transfer_task(cfg: DictConfig, trained_task: str) -> DictConfig:
    """Targets on a few-shot run: domain generalisation for ImageNet's variants of an ImageNet run, else cross-dataset.

    Few-shot and the transfer protocols train in the source dataset's full label space: the same method either way.
    """
    task = cfg.protocol.task
    if "base_to_new" in (task, trained_task) and (task != trained_task or cfg.protocol.targets):
        raise EvaluateError(f"the run was trained for protocol.task={trained_task}: a base-to-new run is evaluated on "
                            f"its own dataset only, and a run of another protocol cannot be evaluated as base-to-new")
    if task == "few_shot" and cfg.protocol.targets:
        variants = cfg.dataset.name == "imagenet" and all(name in IMAGENET_VARIANTS for name in cfg.protocol.targets)
        cfg.protocol.task = "domain_generalisation" if variants else "cross_dataset"
    return cfg


def int_keys(node):
    """JSON wrote the int keys of dict[int, ...] options (CoOp's epochs_by_shots) as strings: ints again."""
    if isinstance(node, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: int_keys(v) for k, v in node.items()}
    return [int_keys(v) for v in node] if isinstance(node, list) else node


def task_data(cfg: DictConfig, method_class, device: torch.device):
    """The run's data as run.py reads it, without the draw's features (test sets and class texts only), unless the
    method trains when it is retargeted to another dataset (SHIP)."""
    from clipadapt.run import file_task_data, image_task_data, no_features

    with_draw = method_class.retarget_trains and cfg.protocol.task == "cross_dataset"
    if cfg.dataset.kind != "features":
        return image_task_data(cfg, method_class.needs_dense, device, with_draw=with_draw,
                               augmented=with_draw and method_class.uses_augmented_views,
                               augmentation=method_class.augmentation)
    data = file_task_data(cfg)  # one file, read whole: the draw's rows are set aside
    return data if with_draw else replace(data, train=no_features(data.text.shape[1]), val=None)


def evaluate(run_dir: Path, overrides: list[str] = ()) -> tuple[dict[str, protocols.Result], dict, dict]:
    """(each test set's logits and accuracy, the scores as metrics.json writes them, the run's metrics.json)."""
    from clipadapt.methods import METHODS, build_method
    from clipadapt.methods.base import method_config
    from clipadapt.run import few_shot_task, resolve_device

    metrics, state = read_run(Path(run_dir))
    cfg = with_overrides(metrics["config"], list(overrides))
    method_cfg = method_config(OmegaConf.create(int_keys(metrics["method_config"])))  # as run (CoOp's epochs resolved)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = task_data(cfg, METHODS[method_cfg.name], device)
    plan = protocols.setup(cfg, data)
    method = build_method(method_cfg, few_shot_task(cfg, plan, device))
    trained_state.restore(method, state)
    results = protocols.evaluate(method, plan.evaluations)
    return results, protocols.summary(cfg.protocol.task, results), metrics


def report(scores: dict, metrics: dict) -> list[str]:
    """One line per accuracy; the run's own numbers are compared with what metrics.json recorded."""
    lines = []
    for key, value in scores.items():
        if not (key.endswith("/acc") or key in ("H", "targets/mean_acc")):
            continue
        recorded = metrics.get(key)
        if recorded is None:  # a target the run did not score
            lines.append(f"{key} {value!r}")
        else:
            same = "(as in metrics.json)" if recorded == value else f"(metrics.json: {recorded!r})"
            lines.append(f"{key} {value!r}  {same}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__ + "\n" + USAGE)
        return 0 if args else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _, scores, metrics = evaluate(Path(args[0]), args[1:])
    except Exception as error:  # noqa: BLE001 - one line, like a failing run (app.guarded)
        print(f"evaluate: {error_line(error)}", file=sys.stderr)
        return 2
    print("\n".join(report(scores, metrics)))
    return 0


command = as_command(main)  # `clipadapt-evaluate` and `python -m clipadapt.evaluate`

if __name__ == "__main__":
    sys.exit(command())
