"""Hydra launcher `batched`: a sweep's cells in this process, and, with `sweep.batch_cells=true`, the cells of each
(method, backbone, dataset) trained together (clipadapt.batched: one stacked model on CUDA, one cell after another
on CPU, `hydra.launcher.stack` to choose), with the results each cell gets alone.

Every cell is still one Hydra job (its own output folder, .hydra/ configs, the app's task function with its skip
logic and error.json): the launcher runs the jobs of a group as coroutines, and their `engine.fit` calls meet in one
batch. With `sweep.batch_cells=false` it runs the jobs one after another, as Hydra's basic launcher does. Scanned by
Hydra at every start, so this module imports nothing heavy; clipadapt.batched is imported when a sweep launches.
"""


import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.clipadapt_launcher.batched_launcher.BatchedLauncher"
    max_cells: int = 64  # at most this many cells (data, features, models) in memory and trained together
    stack: Optional[bool] = None  # one stacked model per kind of cell: null = on CUDA only (clipadapt.batched)


ConfigStore.instance().store(group="hydra/launcher", name="batched", node=BatchedLauncherConf, provider="clipadapt")


def batch_key(config: DictConfig) -> str:
    """Cells that share method, backbone and dataset (any shots, seeds, hyperparameters) are launched together."""
    nodes = {key: OmegaConf.to_container(config[key], resolve=False) if isinstance(config.get(key), DictConfig)
             else config.get(key) for key in ("method", "backbone", "dataset")}
    return json.dumps({"method": nodes["method"].get("name") if isinstance(nodes["method"], dict) else nodes["method"],
                       "backbone": nodes["backbone"], "dataset": nodes["dataset"]}, sort_keys=True, default=str)


class BatchedLauncher(Launcher):
    def __init__(self, max_cells: int = 64, stack: Optional[bool] = None) -> None:
        super().__init__()
        if max_cells < 1:
            raise ValueError(f"hydra.launcher.max_cells must be >= 1, got {max_cells}")
        self.max_cells, self.stack = max_cells, stack
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        batch_cells = bool(OmegaConf.select(self.config, "sweep.batch_cells", default=False))
        log.info("Launching %d jobs locally%s", len(job_overrides), ", cells batched" if batch_cells else "")

        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = idx
                config.hydra.job.num = idx
            configs.append(config)

        job = partial(run_job, hydra_context=self.hydra_context, task_function=self.task_function,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        results: List[Optional[JobReturn]] = [None] * len(configs)
        if not batch_cells:
            for i, config in enumerate(configs):
                results[i] = job(config=config)
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            return results  # type: ignore[return-value]

        from clipadapt.batched import run_batch

        groups: Dict[str, List[int]] = {}
        for i, config in enumerate(configs):
            groups.setdefault(batch_key(config), []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.max_cells):
                chunk = members[start : start + self.max_cells]
                outcomes = run_batch([partial(job, config=configs[i]) for i in chunk], stack=self.stack)
                for i, (returned, error) in zip(chunk, outcomes):
                    if error is not None:  # run_job records the task's own failures; this is Hydra's
                        raise error
                    results[i] = returned
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return results  # type: ignore[return-value]
