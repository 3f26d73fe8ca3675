"""Datasets: readers that turn a dataset config into image lists (or a features file into feature sets)."""

from clipadapt.data.registry import DatasetError, ImageDataset, Item, build_dataset, read_split_file, register_reader

__all__ = ["DatasetError", "ImageDataset", "Item", "build_dataset", "read_split_file", "register_reader"]

# Readers register themselves on import.
from clipadapt.data import synthetic  # noqa: E402,F401
from clipadapt.data import benchmarks  # noqa: E402,F401
