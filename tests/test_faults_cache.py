"""Feature-cache faults: damaged shards and metadata, killed writers, NaN features, a full disk, kill -9 mid-extraction.

Each fault ends in the correct features (recomputed) or a one-line error naming the file, with no temporary left.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipadapt import features
from clipadapt.features import CacheEntry, CacheError

REPO = Path(__file__).resolve().parents[1]


def dense_like(paths: list[str]) -> np.ndarray:
    """[N, 1, 49, 128] fp16 rows, deterministic per path (a dense shard: 300 images make 3.8 MB)."""
    return np.stack([np.random.default_rng(sum(map(ord, p))).standard_normal((1, 49, 128)).astype(np.float16)
                     for p in paths])


class Counting:
    def __init__(self, compute=dense_like):
        self.calls: list[list[str]] = []
        self.compute = compute

    def __call__(self, paths):
        self.calls.append(list(paths))
        return self.compute(paths)


def new_process() -> None:
    """Forget which shards this process has verified, as a fresh process would: they are hashed again on open."""
    features._VERIFIED.clear()


def only_shard(entry: CacheEntry) -> Path:
    (shard,) = entry.folder.glob("shard-*")
    return shard


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp*"))


PATHS = [f"img{i:03d}.png" for i in range(300)]


def test_overwritten_middle_of_a_shard_is_detected_and_recomputed(tmp_path, caplog):
    entry, compute = CacheEntry(tmp_path / "e", {"k": 1}), Counting()
    entry.get(PATHS, compute)
    array_file = only_shard(entry) / "features.npy"
    size = array_file.stat().st_size
    assert size > 3_500_000
    with open(array_file, "r+b") as f:  # 256 KiB of garbage in the middle: neither the first nor the last MiB
        f.seek(size // 2)
        f.write(np.full(128 * 1024, np.nan, np.float16).tobytes())
    new_process()
    with caplog.at_level(logging.WARNING, logger="clipadapt.features"):
        again = entry.get(PATHS, compute)
    np.testing.assert_array_equal(again, dense_like(PATHS))
    assert compute.calls == [PATHS, PATHS]
    assert "features.npy's content hash differs" in caplog.text and str(array_file.parent) in caplog.text


def test_a_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    entry = CacheEntry(tmp_path / "e", {"k": 1})
    entry.get(PATHS[:10], dense_like)
    hashed, content_hash = [], features._content_hash
    monkeypatch.setattr(features, "_content_hash", lambda path: hashed.append(path) or content_hash(path))
    entry.get(PATHS[:10], dense_like)
    assert hashed == []  # written by this process: hashed while it was written
    new_process()
    for _ in range(3):
        entry.get(PATHS[:10], dense_like)
    assert hashed == [only_shard(entry) / "paths.json", only_shard(entry) / "features.npy"]


@pytest.mark.parametrize("damage", [
    "paths.json: not JSON", "paths.json: another list", "meta.json: not JSON", "meta.json: no hash",
    "meta.json: wrong shape", "paths.json: missing"])
def test_damaged_metadata_is_recomputed(tmp_path, damage):
    entry, compute = CacheEntry(tmp_path / "e", {"k": 1}), Counting()
    entry.get(PATHS[:20], compute)
    shard = only_shard(entry)
    name, what = damage.split(": ")
    meta = json.loads((shard / "meta.json").read_text())
    replacement = {
        "not JSON": '["img000.png", "img0',
        "another list": json.dumps(PATHS[1:21]),
        "no hash": json.dumps({k: v for k, v in meta.items() if k != "xxh3_128"}),
        "wrong shape": json.dumps({**meta, "shape": [21, 1, 49, 128]}),
    }
    if what == "missing":
        (shard / name).unlink()
    else:
        (shard / name).write_text(replacement[what])
    new_process()
    np.testing.assert_array_equal(entry.get(PATHS[:20], compute), dense_like(PATHS[:20]))
    assert compute.calls == [PATHS[:20], PATHS[:20]]


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_orphaned_temporary_folders_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    entry = CacheEntry(tmp_path / "e", {"k": 1})
    dead, live = _dead_pid(), os.getppid()
    for name in (f"shard-0123.tmp{dead}", f"shard-4567.tmp{live}"):
        (entry.folder / name).mkdir()
        (entry.folder / name / "features.npy").write_bytes(b"partial")
    (entry.folder / f"key.json.tmp{dead}").write_text("{")
    compute = Counting()
    np.testing.assert_array_equal(entry.get(PATHS[:3], compute), dense_like(PATHS[:3]))
    assert compute.calls == [PATHS[:3]]  # a temporary folder is never read as a shard
    assert [p.name for p in leftovers(entry.folder)] == [f"shard-4567.tmp{live}"]


def test_non_finite_features_are_refused_naming_the_entry_and_image(tmp_path):
    def nan_at_row_7(paths):
        array = dense_like(paths)
        array[7, 0, 3, 5] = np.inf
        return array

    entry = CacheEntry(tmp_path / "e", {"k": 1})
    with pytest.raises(CacheError) as raised:
        entry.get(PATHS[:10], nan_at_row_7)
    message = str(raised.value)
    assert "\n" not in message and str(entry.folder) in message and "img007.png" in message and "1 of 10" in message
    assert not list(entry.folder.glob("shard-*"))  # nothing cached: the next run asks the model again


def test_nan_written_into_a_shard_is_recomputed_then_refused_if_the_model_gives_nan(tmp_path):
    entry = CacheEntry(tmp_path / "e", {"k": 1})
    entry.get(PATHS[:10], dense_like)
    array_file = only_shard(entry) / "features.npy"
    stored = np.load(array_file)
    stored[4, 0, 0, 0] = np.nan
    np.save(array_file, stored)
    new_process()
    np.testing.assert_array_equal(entry.get(PATHS[:10], dense_like), dense_like(PATHS[:10]))  # recomputed

    np.save(array_file, stored)  # damaged again, and now the model itself outputs NaN: refused, not looped
    new_process()
    with pytest.raises(CacheError, match=r"hold NaN or Inf \(first: img004.png\)"):
        entry.get(PATHS[:10], lambda paths: stored)


def _disk_full_after(limit: int):
    """An np.save that writes `limit` bytes of the file, then fails as a full disk does."""
    real_save = np.save

    def save(path, array):
        real_save(path, array)
        with open(path, "r+b") as f:
            f.truncate(limit)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_disk_full_names_the_shard_and_leaves_no_temporary(tmp_path, monkeypatch):
    entry = CacheEntry(tmp_path / "e", {"k": 1})
    monkeypatch.setattr(np, "save", _disk_full_after(4096))
    with pytest.raises(CacheError) as raised:
        entry.get(PATHS[:50], dense_like)
    message = str(raised.value)
    assert "\n" not in message and "No space left on device" in message
    assert f"could not write {entry.folder}/shard-" in message and "paths.cache_dir" in message
    assert leftovers(tmp_path) == [] and not list(entry.folder.glob("shard-*"))
    monkeypatch.undo()
    np.testing.assert_array_equal(entry.get(PATHS[:50], dense_like), dense_like(PATHS[:50]))  # space again: works


def test_disk_full_while_writing_key_json(tmp_path, monkeypatch):
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith("key.json.tmp"):
            real_write_text(self, "{")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    full = rf"could not write {tmp_path}/e/key.json \(No space left on device; [\d.]+ MB free there\)"
    with pytest.raises(CacheError, match=full):
        CacheEntry(tmp_path / "e", {"k": 1})
    assert leftovers(tmp_path) == [] and not (tmp_path / "e" / "key.json").exists()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (a real full disk), when this process may mount one (root); else the test is skipped."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root): the monkeypatched disk-full tests cover this")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_real_full_disk(tiny_tmpfs):
    entry = CacheEntry(tiny_tmpfs / "e", {"k": 1})
    with pytest.raises(CacheError, match=rf"could not write {tiny_tmpfs}/e/shard-\w+ \(.*; [\d.]+ MB free there\)"):
        entry.get(PATHS[:100], dense_like)  # 1.25 MB
    assert leftovers(tiny_tmpfs) == []
    np.testing.assert_array_equal(entry.get(PATHS[:2], dense_like), dense_like(PATHS[:2]))  # 25 KB still fits


# ------------------------------------------------------------------------------------- kill -9 during extraction

EXTRACT = ["dataset=synthetic", "backbone=tiny", "logger=none", "method=tip_adapter_f", "dataset.images_per_class=8",
           "shots=2", "features.train_views=2", "features.num_workers=0"]
# clipadapt.extract, with np.save stalled half-way through its first shard: the kill lands mid-write, every time.
STALLED_EXTRACT = """
import runpy, sys, time
import numpy as np
real_save = np.save
def stalled_save(path, array):
    real_save(path, array)
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    time.sleep(120)
np.save = stalled_save
sys.argv = ["clipadapt.extract", *sys.argv[1:]]
runpy.run_module("clipadapt.extract", run_name="__main__", alter_sys=True)
"""


def _env(tmp_path: Path, cache: str) -> dict:
    return {**os.environ, "CLIPADAPT_HOME": str(tmp_path), "CLIPADAPT_DATA": str(tmp_path / "data"),
            "CLIPADAPT_CACHE": str(tmp_path / cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _extract(tmp_path: Path, cache: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "clipadapt.extract", *EXTRACT, f"hydra.run.dir={tmp_path}/{cache}-run"]
    return subprocess.run(command, cwd=REPO, env=_env(tmp_path, cache), capture_output=True, text=True, timeout=180)


def _cached(cache: Path) -> dict[tuple[str, str], np.ndarray]:
    """Every cached row, by (entry folder relative to the cache, image path)."""
    rows = {}
    for shard in cache.rglob("shard-*"):
        paths, array = json.loads((shard / "paths.json").read_text()), np.load(shard / "features.npy")
        rows.update(((str(shard.parent.relative_to(cache)), p), row) for p, row in zip(paths, array))
    return rows


@pytest.mark.slow
def test_kill_9_during_extraction_then_rerun_gives_the_clean_features(tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", STALLED_EXTRACT, *EXTRACT, f"hydra.run.dir={tmp_path}/run"],
                              cwd=REPO, env=_env(tmp_path, "cache"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not list((tmp_path / "cache").rglob("shard-*.tmp*/features.npy")) and killed.poll() is None:
        assert time.monotonic() < deadline, "no shard was being written after 90 s"
        time.sleep(0.05)
    assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert leftovers(tmp_path / "cache")  # a half-written shard folder of a dead writer

    rerun = _extract(tmp_path, "cache")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert leftovers(tmp_path / "cache") == []
    clean = _extract(tmp_path, "clean-cache")
    assert clean.returncode == 0, clean.stderr[-2000:]

    after_kill, reference = _cached(tmp_path / "cache"), _cached(tmp_path / "clean-cache")
    assert sorted(after_kill) == sorted(reference) and len(reference) > 80
    for key, row in reference.items():
        np.testing.assert_array_equal(after_kill[key], row, err_msg=str(key))
