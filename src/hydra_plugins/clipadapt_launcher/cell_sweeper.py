"""Hydra sweeper `clipadapt` (the default: conf/config.yaml): Hydra's basic sweeper (the grid of `a=1,2 b=x,y` and
`hydra.sweeper.params`) that checks every cell before it launches any (clipadapt.sweep.preflight: options, then
datasets) and shows the sweep's progress while the launcher runs them (clipadapt.sweep.watch).

Every cell's config is composed once up front, which Hydra's basic sweeper does as well (to fail early on a config
that does not compose); the launcher then composes its cells again, as it always does. Scanned by Hydra at every
start, so this module imports nothing heavy; clipadapt.sweep is imported when a sweep begins.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf


@dataclass
class CellSweeperConf:
    _target_: str = "hydra_plugins.clipadapt_launcher.cell_sweeper.CellSweeper"
    max_batch_size: Optional[int] = None  # cells handed to the launcher at once (null: all)
    params: Optional[Dict[str, str]] = None  # sweeps given in a config (conf/sweep/grid.yaml), as the basic sweeper's


ConfigStore.instance().store(group="hydra/sweeper", name="clipadapt", node=CellSweeperConf, provider="clipadapt")


class CellSweeper(BasicSweeper):
    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        from clipadapt.sweep import preflight, watch

        loader = self.hydra_context.config_loader
        overrides = OverridesParser.create(config_loader=loader).parse_overrides([*self._parse_config(), *arguments])
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        cells = [list(cell) for batch in self.overrides for cell in batch]
        preflight([loader.load_sweep_config(master_config=self.config, sweep_overrides=cell) for cell in cells])

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, first = [], 0
        with watch(sweep_dir, total=len(cells)):
            while not self.is_done():
                batch = self.get_job_batch()
                results = self.launcher.launch(batch, initial_job_idx=first)
                for result in results:
                    _ = result.return_value  # raises when Hydra itself failed a job (cells record their own errors)
                first += len(batch)
                returns.append(results)
        return returns
