"""Hydra config source `clipadapt-schema://<module>`: the dataclasses of a module as configs named after them, each
turned into an OmegaConf config only when a config asks for it (conf/method/coop.yaml: `- /CoOpSchema@_here_`).

conf/config.yaml puts `clipadapt-schema://clipadapt.method_schemas` on Hydra's search path. In Hydra's ConfigStore
all 14 method schemas were built at every start (~80 ms) and deep-copied at each of Hydra's two compositions of a
run's config, which needs one of them. Scanned by Hydra at every start, so this module imports nothing heavy.
"""

import dataclasses
import importlib
import importlib.util
from typing import List, Optional

from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from omegaconf import OmegaConf


class SchemaConfigSource(ConfigSource):
    @staticmethod
    def scheme() -> str:
        return "clipadapt-schema"

    def _is_schema(self, value: object) -> bool:
        return isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == self.path

    def _schema(self, config_path: str) -> Optional[type]:
        value = getattr(importlib.import_module(self.path), config_path.strip("/").removesuffix(".yaml"), None)
        return value if self._is_schema(value) else None

    def load_config(self, config_path: str) -> ConfigResult:
        schema = self._schema(config_path)
        if schema is None:
            raise ConfigLoadError(f"{self.path} has no schema {config_path}")
        return ConfigResult(config=OmegaConf.structured(schema), path=f"{self.scheme()}://{self.path}",
                            provider=self.provider, header={"package": None})

    def available(self) -> bool:
        return importlib.util.find_spec(self.path) is not None

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") == ""

    def is_config(self, config_path: str) -> bool:
        return self._schema(config_path) is not None

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        if not self.is_group(config_path) or results_filter not in (None, ObjectType.CONFIG):
            return []
        return sorted(name for name, value in vars(importlib.import_module(self.path)).items()
                      if self._is_schema(value))
