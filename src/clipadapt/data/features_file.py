"""`features`: a user-supplied .npz or .safetensors file of precomputed features, so methods run on any model.

Keys (N images, V views with view 0 un-augmented, M dense tokens, D feature width, K classes):
  train_features [N, D] or [N, V, D], train_labels [N]      required
  test_features [N, D], test_labels [N]                     required
  text_features [K, D]                                      required: the zero-shot classifier
  val_features [N, D], val_labels [N]                       optional: searches need them
  {train,val,test}_dense [N, M, D] (train: [N, V, M, D])   optional: for dense-feature methods
Image rows may be raw or unit: they are kept as given (the feature cache too keeps CLIP's raw output) and each
method normalises them (Tip-Adapter's cache keys: the mean of the raw views, then normalised). Text features and
dense tokens are L2-normalised on load; NaN or Inf anywhere is refused. The few-shot draw is applied to the train/val
rows as to any split. A run on a file is labelled by it: backbone `features:<file stem>` (conf/dataset/features.yaml).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from clipadapt.data.registry import DatasetError
from clipadapt.features import FeatureSet

REQUIRED = ("train_features", "train_labels", "test_features", "test_labels", "text_features")


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"features file {path} does not exist: set dataset.path to a .npz or .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _check_finite(path: Path, data: dict[str, np.ndarray]) -> None:
    """NaN or Inf in any key would turn into plausible-looking accuracies (argmax of NaN logits is class 0)."""
    for key, array in data.items():
        bad = int(np.count_nonzero(~np.isfinite(array))) if np.issubdtype(array.dtype, np.inexact) else 0
        if bad:
            raise DatasetError(f"features file {path}: {key} holds {bad} NaN or Inf values: recompute the features "
                               f"or drop those rows")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def read_features_file(path: str | Path | None) -> dict:
    """{'text': [K, D], 'train'|'val'|'test': FeatureSet or None, 'digest': content hash}; shapes and values checked."""
    if not path:
        raise DatasetError("dataset=features needs dataset.path=<a .npz or .safetensors file> (keys: see README)")
    data = _load(Path(path))
    _check_finite(path, data)
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise DatasetError(f"features file {path} lacks keys {missing}: it needs {list(REQUIRED)} (see README)")
    text = _normalise(data["text_features"])
    width, num_classes = text.shape[1], text.shape[0]
    sets = {}
    for split in ("train", "val", "test"):
        if f"{split}_features" not in data:
            sets[split] = None
            continue
        image, labels = data[f"{split}_features"], data.get(f"{split}_labels")
        dense = data.get(f"{split}_dense")
        image = image[:, None] if image.ndim == 2 else image
        if dense is not None and dense.ndim == 3:
            dense = dense[:, None]
        problems = []
        if labels is None or labels.shape != (image.shape[0],):
            problems.append(f"{split}_labels must have shape ({image.shape[0]},)")
        if image.shape[-1] != width:
            problems.append(f"{split}_features width {image.shape[-1]} != text_features width {width}")
        if dense is not None and (dense.shape[0] != image.shape[0] or dense.shape[-1] != width):
            problems.append(f"{split}_dense shape {dense.shape} does not match {split}_features {image.shape}")
        if labels is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            problems.append(f"{split}_labels must lie in 0..{num_classes - 1}")
        if problems:
            raise DatasetError(f"features file {path}: {'; '.join(problems)}")
        sets[split] = FeatureSet(
            image=image.astype(np.float32), labels=labels.astype(np.int64),
            dense=None if dense is None else _normalise(dense), paths=[str(i) for i in range(len(labels))],
        )
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return {"text": text, "digest": digest, **sets}
