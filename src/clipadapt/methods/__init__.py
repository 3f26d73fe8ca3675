"""The method registry: importing this package registers every method module in it."""

import importlib
import pkgutil

from clipadapt.methods.base import METHODS, Batch, FewShotTask, Method, MethodSchema, build_method, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Batch", "FewShotTask", "Method", "MethodSchema", "build_method", "register_method"]
