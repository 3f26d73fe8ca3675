"""The feature cache: CLIP features computed once per image and view, stored memory-mapped, reused by every run.

Layout: <cache_dir>/<dataset>/<backbone>/<view>-<kind>-<key hash>/ holds `key.json` (what the hash covers:
backbone and weights, preprocessing, view, kind, format version) and immutable shards
`shard-<hash>/{paths.json, features.npy, meta.json}`. A shard is written to a temporary folder and renamed, so it
is either complete or absent. A run that needs images the entry lacks computes only those, under a file lock, so
concurrent sweep jobs do not duplicate or corrupt work: one computes, the others wait and reuse.

Arrays are [N, V, D] (global: CLIP's raw output) or [N, V, M, D] (dense: unit rows); V is the number of views (1 for the plain view, the
augmented views for training). Reads are memory-mapped, so a test set larger than RAM can be streamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import xxhash
from filelock import FileLock
from PIL import Image

from clipadapt.progress import progress

log = logging.getLogger(__name__)

# 2: global image features are CLIP's raw output (Tip-Adapter's cache keys average raw views); dense tokens and
# class texts stay L2-normalised. Readers normalise what they need (`unit_rows`).
CACHE_FORMAT_VERSION = 2


@dataclass(frozen=True)
class Augmentation:
    """A reference's train views: RandomResizedCrop to the model's input size (`scale`, bicubic) + horizontal flip,
    then the model's own normalisation. Its description is part of every augmented cache entry's key."""

    scale: tuple[float, float]
    source: str

    @property
    def description(self) -> str:
        low, high = self.scale
        return f"RandomResizedCrop(scale=({low:g}, {high:g}), bicubic) + RandomHorizontalFlip(0.5), seeded per (path, view)"


AUGMENTATIONS = {
    "tip": Augmentation((0.5, 1.0), "Tip-Adapter main.py train_tranform (SHIP's released code copies it)"),
    # Dassl's random_resized_crop + random_flip: INPUT.RRCROP_SCALE's default, CoOp's configs' INTERPOLATION bicubic
    "dassl": Augmentation((0.08, 1.0), "Dassl transforms.py with CoOp's configs/trainers"),
}


def to_tensor(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 tensor of cached (fp16, possibly read-only memory-mapped) rows: one copy, no aliasing."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).to(device)


def unit_rows(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Cached rows as float32 unit vectors: re-normalising in float32 undoes fp16 storage's rounding of the norm,
    so every method, searches included, sees exactly the features the evaluator sees."""
    return torch.nn.functional.normalize(to_tensor(array, device), dim=-1)


def _whole_mapped_file(array) -> bool:
    """Whether `array` is a whole memory-mapped cache file (not a slice of one), C-contiguous: its rows can be read
    with plain file reads at their offsets."""
    return (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and bool(array.filename)
            and array.flags.c_contiguous)


def read_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a cached array, as an in-memory copy.

    A whole memory-mapped cache file is read with a plain file read at the rows' offset instead of through the
    mapping: pages read through a mapping stay in the process's resident set (it grows to the size of the file
    while a large test set is streamed), pages read with read() only in the kernel's page cache.
    """
    stop = min(stop, len(array))
    if not _whole_mapped_file(array) or stop <= start:
        return np.array(array[start:stop])
    row_items = int(np.prod(array.shape[1:], dtype=np.int64))
    rows = np.fromfile(array.filename, dtype=array.dtype, count=(stop - start) * row_items,
                       offset=array.offset + start * row_items * array.itemsize)
    return rows.reshape(stop - start, *array.shape[1:])


def read_pairs(array, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
    """`array[rows, views]` (one view per row, e.g. a training step's rows) as an in-memory copy.

    From a whole memory-mapped cache file each [row, view] slab is read with pread at its offset, for the reason
    `read_rows` gives: rows read through the mapping would stay resident, and a training loop visits them all.
    """
    if isinstance(array, ViewStack):
        return array.take(rows, views)
    if not _whole_mapped_file(array):
        return np.asarray(array[rows, views])
    slab = array[0, 0].nbytes
    out = np.empty((len(rows), *array.shape[2:]), dtype=array.dtype)
    with open(array.filename, "rb", buffering=0) as f:
        for i, (row, view) in enumerate(zip(rows.tolist(), views.tolist())):
            offset = array.offset + (row * array.shape[1] + view) * slab
            if os.preadv(f.fileno(), [memoryview(out[i]).cast("B")], offset) != slab:
                raise CacheError(f"{array.filename} is shorter than its header says: remove it to recompute it")
    return out


class ViewStack:
    """Arrays [N, V_i, ...] side by side along the view axis, read without concatenating them.

    A cell's train views are its plain and its augmented cache entries; their dense tokens ([N, V, M, D], ~17 GB
    for ImageNet 16-shot on RN50) stay memory-mapped, and the training loop reads a step's rows (`read_pairs`).
    Indexing with (rows, one view) reads that view's part; anything else concatenates what it selects.
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [part.shape[1] for part in self.parts])
        first = self.parts[0]
        if any(part.shape[0] != first.shape[0] or part.shape[2:] != first.shape[2:] for part in self.parts):
            raise ValueError(f"views of different images or shapes: {[part.shape for part in self.parts]}")
        self.shape = (first.shape[0], int(self.offsets[-1]), *first.shape[2:])
        self.dtype, self.ndim = first.dtype, first.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.parts, axis=1)
        return whole if dtype is None else whole.astype(dtype)

    def _part(self, view: int) -> tuple[np.ndarray, int]:
        index = int(np.searchsorted(self.offsets, view % self.shape[1], side="right")) - 1
        return self.parts[index], view % self.shape[1] - int(self.offsets[index])

    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], (int, np.integer)):
            part, view = self._part(int(key[1]))
            return np.asarray(part[key[0], view])
        return np.concatenate([np.asarray(part[key]) for part in self.parts], axis=1)

    def take(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """`self[rows, views]`: each row's view, read from the part that holds it."""
        out = np.empty((len(rows), *self.shape[2:]), dtype=self.dtype)
        for part, low in zip(self.parts, self.offsets):
            here = (views >= low) & (views < low + part.shape[1])
            if here.any():
                out[here] = read_pairs(part, rows[here], views[here] - low)
        return out


def backbone_key(model: str, pretrained: str | None, dense: str) -> dict:
    """What identifies a backbone's outputs in cache keys; a local weights file counts by path, size and mtime."""
    key = {"model": model, "pretrained": pretrained, "dense": dense}
    if pretrained and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        key.update(pretrained=str(Path(pretrained).resolve()), weights=f"{stat.st_size}:{stat.st_mtime_ns}")
    return key


@dataclass
class FeatureSet:
    """Features of a list of images: `image` [N, V, D], optional `dense` [N, V, M, D] (an array or a ViewStack of
    memory-mapped entries), `labels` [N]."""

    image: np.ndarray
    labels: np.ndarray
    dense: np.ndarray | ViewStack | None = None
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, rows: np.ndarray) -> "FeatureSet":
        return FeatureSet(
            self.image[rows], self.labels[rows], None if self.dense is None else self.dense[rows],
            [self.paths[r] for r in rows] if self.paths else [],
        )


@dataclass
class Batch:
    """A batch of cached features as a method sees them: global [B, D] and, for dense-feature methods, [B, M, D]."""

    image: torch.Tensor
    dense: torch.Tensor | None = None


@dataclass(frozen=True)
class View:
    """How images are turned into pixels: the plain preprocessing, or `count` seeded augmentations per image."""

    name: str  # "plain" | "augment"
    count: int = 1
    seed: int = 0
    recipe: str = "tip"  # augment: a key of AUGMENTATIONS (the method's reference recipe)

    def __post_init__(self):
        if self.name == "augment" and self.recipe not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation recipe {self.recipe!r}: use one of {sorted(AUGMENTATIONS)}")

    @property
    def tag(self) -> str:
        return "plain" if self.name == "plain" else f"augment{self.count}x-{self.recipe}-s{self.seed}"


def _digest(payload: object, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


class CacheError(RuntimeError):
    """The cache cannot hold what was asked: a failed disk write, or features that are not finite."""


# Shard files whose whole content this process has hashed: (path, inode, size, mtime, expected hash).
_VERIFIED: set[tuple] = set()


def _content_hash(path: Path, chunk: int = 8 << 20) -> str:
    """xxh3-128 of the whole file (GB/s: a shard's first open costs ~1.5x reading it, `make bench`), read with
    plain reads into one buffer, so that the pages stay in the page cache and not in this process's memory."""
    digest, buffer = xxhash.xxh3_128(), bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _identity(path: Path, content_hash: str) -> tuple:
    stat = path.stat()
    return str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, content_hash


def _verified(path: Path, expected: str) -> bool:
    """Whether the file's content hash is `expected`; hashed once per process (shards are immutable once renamed)."""
    identity = _identity(path, expected)
    if identity not in _VERIFIED:
        if _content_hash(path) != expected:
            return False
        _VERIFIED.add(identity)
    return True


# A shard's files whose xxh3-128 hashes its meta.json holds.
SHARD_FILES = ("paths.json", "features.npy")


def _temporary(final: Path) -> Path:
    """Where `final` is written before it is renamed into place; the name carries the writer's pid."""
    return final.with_name(f"{final.name}.tmp{os.getpid()}")


def _writer_pid(path: Path) -> int | None:
    head, _, pid = path.name.rpartition(".tmp")
    return int(pid) if head and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary sibling, then rename it to `final`: `final` is complete or absent. A failed
    write leaves no temporary behind; a failed disk write (disk full, ...) is one line naming `final`."""
    tmp = _temporary(final)
    try:
        _remove(tmp)
        write(tmp)
        if final.is_dir():  # a directory cannot be renamed over a non-empty one
            shutil.rmtree(final)
        tmp.replace(final)
    except BaseException as error:  # noqa: BLE001 - Ctrl-C and failures alike: remove the partial write, re-raise
        _remove(tmp)
        if isinstance(error, OSError):  # numpy's short write on a full disk has no errno: say what is free
            reason = f"{error.strerror or error}; {shutil.disk_usage(final.parent).free / 1e6:.1f} MB free there"
            raise CacheError(f"could not write {final} ({reason}): free space on that disk, or set paths.cache_dir "
                             f"to another one") from error
        raise


def _refuse_non_finite(array: np.ndarray, paths: list[str], folder: Path) -> None:
    """Features with NaN or Inf are never cached: a shard found damaged is recomputed, and if the model itself
    outputs NaN the run stops here instead of recomputing forever or producing NaN logits."""
    rows = array.reshape(len(array), -1)  # checked in blocks of rows: no temporary as large as the features
    finite = np.concatenate([np.isfinite(rows[i : i + 1024]).all(axis=1) for i in range(0, len(rows), 1024)])
    if not finite.all():
        raise CacheError(f"{int((~finite).sum())} of {len(paths)} feature rows computed for {folder} hold NaN or "
                         f"Inf (first: {paths[int(np.argmin(finite))]}): the model's output is not finite; nothing "
                         f"was cached")


class CacheEntry:
    """One (backbone, dataset, view, kind) entry: a set of immutable shards keyed by image path.

    A shard's meta.json holds the xxh3-128 hashes of its whole paths.json and features.npy, checked the first time
    a process opens it; a shard whose files disagree (truncated, overwritten, a damaged paths.json or meta.json) is
    removed and its images recomputed. Temporary folders of killed writers are removed under the lock.
    """

    def __init__(self, folder: Path, key: dict):
        self.folder = folder
        self.key = key
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "key.json"
        if not key_file.exists():
            text = json.dumps(key, indent=1, sort_keys=True, default=str)
            _write_atomically(key_file, lambda tmp: tmp.write_text(text))
        self.lock = FileLock(str(folder / ".lock"))

    def get(self, paths: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Features of `paths` in order, computing (and storing) only those not cached yet."""
        paths = list(paths)
        with self.lock:
            self._remove_orphans()
            found = self._index()
            missing = list(dict.fromkeys(p for p in paths if p not in found))
            if missing:
                self._write(missing, compute(missing))
                found = self._index()
        return self._gather(paths, found)

    def _remove_orphans(self) -> None:
        """Temporary files of writers that are gone (killed mid-write). Called under the lock, which every writer
        holds while it writes, so no live writer is touched; a live pid's folder is kept all the same."""
        for path in self.folder.glob("*.tmp*"):
            pid = _writer_pid(path)
            if pid is not None and pid != os.getpid() and not _alive(pid):
                log.info("removing %s, left by a writer that is gone (pid %d)", path, pid)
                _remove(path)

    def _index(self) -> dict[str, tuple[Path, int]]:
        index: dict[str, tuple[Path, int]] = {}
        shards = [s for s in sorted(self.folder.glob("shard-*")) if _writer_pid(s) is None]  # not temporaries
        for shard in shards:
            shard_paths = self._open(shard)
            if shard_paths is not None:
                index.update((p, (shard, row)) for row, p in enumerate(shard_paths))
        return index

    def _open(self, shard: Path) -> list[str] | None:
        """The shard's image paths when its files agree with each other; else None, and the shard is removed."""
        try:
            meta = json.loads((shard / "meta.json").read_text())
            for name in SHARD_FILES:
                if not _verified(shard / name, meta["xxh3_128"][name]):
                    raise ValueError(f"{name}'s content hash differs from meta.json's")
            paths = json.loads((shard / "paths.json").read_text())
            array = np.load(shard / "features.npy", mmap_mode="r")
            if list(array.shape) != meta["shape"] or str(array.dtype) != meta["dtype"] or len(array) != len(paths):
                raise ValueError("the array's shape or dtype differs from meta.json or paths.json")
            return paths
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("cache shard %s is corrupt (%s): removing it and recomputing its images", shard, error)
            shutil.rmtree(shard, ignore_errors=True)
            return None

    def _write(self, paths: list[str], array: np.ndarray) -> None:
        _refuse_non_finite(array, paths, self.folder)
        final = self.folder / f"shard-{_digest(paths)}"
        meta = {"shape": list(array.shape), "dtype": str(array.dtype)}

        def write(tmp: Path) -> None:
            tmp.mkdir()
            (tmp / "paths.json").write_text(json.dumps(paths))
            np.save(tmp / "features.npy", array)
            meta["xxh3_128"] = {name: _content_hash(tmp / name) for name in SHARD_FILES}  # as written, read back
            (tmp / "meta.json").write_text(json.dumps(meta))

        _write_atomically(final, write)
        for name in SHARD_FILES:  # known good: a rename keeps inode and mtime
            _VERIFIED.add(_identity(final / name, meta["xxh3_128"][name]))

    def _gather(self, paths: list[str], index: dict[str, tuple[Path, int]]) -> np.ndarray:
        shards = {shard for shard, _ in (index[p] for p in paths)}
        if len(shards) == 1:
            shard = shards.pop()
            array = np.load(shard / "features.npy", mmap_mode="r")
            rows = np.array([index[p][1] for p in paths])
            if len(rows) == len(array) and np.array_equal(rows, np.arange(len(array))):
                return array  # the whole shard in order: stay memory-mapped (the large test-set case)
            return np.asarray(array[rows])
        arrays = {s: np.load(s / "features.npy", mmap_mode="r") for s in shards}
        return np.stack([arrays[index[p][0]][index[p][1]] for p in paths])


class _ImageViews(torch.utils.data.Dataset):
    """(image, view) pairs -> pixels; augmentation seeded per (path, view) so a feature never depends on batching."""

    def __init__(self, root: Path, paths: list[str], view: View, plain, augment):
        self.root, self.paths, self.view, self.plain, self.augment = root, paths, view, plain, augment

    def __len__(self) -> int:
        return len(self.paths) * self.view.count

    def __getitem__(self, index: int) -> torch.Tensor:
        path, view_index = self.paths[index // self.view.count], index % self.view.count
        try:
            with Image.open(self.root / path) as image:
                image = image.convert("RGB")  # decodes the whole file: a corrupt one fails here
        except (OSError, SyntaxError, ValueError) as error:  # PIL: unidentified, truncated, broken chunks
            from clipadapt.data.registry import ImageReadError

            raise ImageReadError(f"image {self.root / path} cannot be decoded ({error}): replace or remove it") from error
        if self.view.name == "plain":
            return self.plain(image)
        seed = int(_digest([path, view_index, self.view.seed], 8), 16)
        torch.manual_seed(seed)
        return self.augment(image)


def augmentation_for(preprocess, image_size: int, recipe: str = "tip"):
    """A recipe's train views (AUGMENTATIONS) as torchvision transforms, with the model's normalisation."""
    from torchvision import transforms

    normalize = next(t for t in preprocess.transforms if isinstance(t, transforms.Normalize))
    scale = AUGMENTATIONS[recipe].scale
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.ToTensor(),
        normalize,
    ])


class FeatureExtractor:
    """Turns (dataset, image list, view) into cached features; the CLIP model is loaded only on a cache miss."""

    def __init__(self, cache_dir: Path, dataset: str, image_root: Path, backbone_name: str, backbone_key: dict,
                 load_backbone: Callable[[], object], batch_size: int = 64, num_workers: int = 2, dtype: str = "float16"):
        self.cache_dir, self.dataset, self.image_root = Path(cache_dir), dataset, Path(image_root)
        self.backbone_name, self.backbone_key = backbone_name, backbone_key
        self._load_backbone, self._backbone = load_backbone, None
        self.batch_size, self.num_workers, self.dtype = batch_size, num_workers, np.dtype(dtype)

    @property
    def backbone(self):
        if self._backbone is None:
            self._backbone = self._load_backbone()
        return self._backbone

    def entry(self, tag: str, kind: str, extra: dict | None = None) -> CacheEntry:
        key = {"version": CACHE_FORMAT_VERSION, "backbone": self.backbone_key, "dataset": self.dataset,
               "image_root": str(self.image_root), "view": tag, "kind": kind, "dtype": str(self.dtype), **(extra or {})}
        return CacheEntry(self.cache_dir / self.dataset / self.backbone_name / f"{tag}-{kind}-{_digest(key)}", key)

    def images(self, paths: Sequence[str], labels: Sequence[int], view: View, dense: bool = False) -> FeatureSet:
        """Global (and, if asked, dense) features of these images under `view`."""
        extra = {"augmentation": AUGMENTATIONS[view.recipe].description} if view.name == "augment" else {}
        global_entry = self.entry(view.tag, "global", extra)
        dense_entry = self.entry(view.tag, f"dense-{self.backbone_key['dense']}", extra) if dense else None
        pending_dense: dict[str, np.ndarray] = {}

        def compute_global(missing: list[str]) -> np.ndarray:
            global_features, dense_features = self._encode(missing, view, dense)
            if dense_features is not None:  # one pass gives both kinds: keep the dense ones for their entry
                pending_dense.update(zip(missing, dense_features))
            return global_features

        def compute_dense(missing: list[str]) -> np.ndarray:
            if all(p in pending_dense for p in missing):
                return np.stack([pending_dense[p] for p in missing])
            return self._encode(missing, view, True)[1]

        image = global_entry.get(paths, compute_global)
        dense_array = dense_entry.get(paths, compute_dense) if dense_entry is not None else None
        return FeatureSet(image=image, labels=np.asarray(labels, dtype=np.int64), dense=dense_array, paths=list(paths))

    def text(self, classnames: list[str], templates: list[str]) -> np.ndarray:
        """Class text features [K, D], cached like image features (keyed by the exact prompts)."""
        entry = self.entry("text", "classifier", {"templates": templates})
        names = [f"{i}:{name}" for i, name in enumerate(classnames)]
        return entry.get(names, lambda missing: self.backbone.encode_texts(
            [n.split(":", 1)[1] for n in missing], templates).cpu().numpy().astype(self.dtype))

    @torch.no_grad()
    def _encode(self, paths: list[str], view: View, dense: bool) -> tuple[np.ndarray, np.ndarray | None]:
        backbone = self.backbone
        augment = (augmentation_for(backbone.preprocess, backbone.image_size, view.recipe)
                   if view.name == "augment" else None)
        loader = torch.utils.data.DataLoader(
            _ImageViews(self.image_root, paths, view, backbone.preprocess, augment),
            batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=backbone.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if self.num_workers > 0 else None,
        )
        globals_, denses = [], []
        for pixels in progress(loader, desc=f"{self.dataset} {view.tag} features", unit="batch"):
            g, d = backbone.encode_images(pixels, dense=dense)
            globals_.append(g.cpu().numpy().astype(self.dtype))
            if d is not None:
                denses.append(d.cpu().numpy().astype(self.dtype))
        g = np.concatenate(globals_).reshape(len(paths), view.count, -1)
        d = np.concatenate(denses).reshape(len(paths), view.count, *denses[0].shape[1:]) if denses else None
        return g, d
