"""The benchmark script runs end to end at a tiny size and reports every section's rows (what each row says it
measured is asserted, not the figures), and `--device cuda` / `make gpu-check` stop in one line without CUDA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipadapt.method_schemas import TipAdapterFSchema

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"
SECTIONS = ("training", "overhead", "grid", "search", "extraction", "memory", "cache")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA does")


@pytest.mark.slow
def test_bench_runs_every_section_at_a_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(BENCH), "--size", "tiny", "--json", str(out), "--workdir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["size"] == "tiny"
    rows = report["rows"]
    by_section = {section: [r for r in rows if r["section"] == section] for section in SECTIONS}
    assert all(by_section.values()), {k: len(v) for k, v in by_section.items()}
    assert {r["section"] for r in rows} == set(SECTIONS)

    from clipadapt.methods import METHODS

    trained = {r["case"].split(",")[0] for r in by_section["training"] if r["figure"] == "efficiency" and r["value"]}
    assert trained == {"tip_adapter_f", "clip_adapter", "calip_fs", "coop"} & set(METHODS)
    stacked = [r for r in by_section["training"] if "cells stacked" in r["case"]]  # the batched grid's figure
    assert [r["case"] for r in stacked] == ["clip_adapter, 4 classes, 2 cells stacked"] and stacked[0]["value"] > 0
    share, matmul_rate = re.search(r"its matmuls \(mm, bmm\) take (\d+)% of a step and run at ([\d.]+) of the "
                                   r"reference rate", stacked[0]["note"]).groups()
    assert int(share) > 0 and float(matmul_rate) > 0  # the step's own matmuls were found and timed
    assert all(r["value"] > 0 for r in rows if r["value"] is not None)
    overhead, quick_exit, bare_hydra = by_section["overhead"]
    assert "heavy imports: none" in overhead["note"]  # a cached run loads no model code
    assert overhead["figure"] == "x `import torch`" and "torch._dynamo not imported" in overhead["note"]
    # the same cell's wall over each reference's: the three rows divide one wall by three measured floors
    cell_wall = float(re.match(r"([\d.]+) s, best of", overhead["note"]).group(1))
    for row in (overhead, quick_exit):
        floor = float(re.search(r"` ([\d.]+) s \(best of", row["reference"]).group(1))
        assert row["value"] == pytest.approx(cell_wall / floor, abs=0.02)
    assert quick_exit["reference"].startswith("`import torch, gc; gc.freeze()`")
    assert "bare @hydra.main app" in bare_hydra["case"] and bare_hydra["value"] > 0
    evaluating, training = by_section["memory"]  # streaming a dense cache: evaluation, then CALIP-FS training
    assert training["case"].startswith("CALIP-FS training over a dense train cache of 64 images x 3 views")
    assert "1 epoch, 2 steps of 32" in training["note"]
    assert "| section | case |" in result.stdout  # the markdown table
    assert not list(tmp_path.glob("clipadapt-bench-*"))  # temporary data removed

    # grid: the reduced recipe (batched vs one process per cell), stacked vs not, the configured recipe
    reduced, stacked, configured = by_section["grid"]
    assert reduced["figure"] == "cells/min, batched" and "1 feature set (4 classes)" in reduced["case"]
    assert "(as run: epochs 1, searched in 0 of 2 cells)" in reduced["note"]  # --size tiny's grid_epochs=1, no search
    assert "identical in 1 of 1 cells" in reduced["note"]  # batched == one process per cell
    assert stacked["figure"] == "cells/min, stacked (hydra.launcher.stack=true)"
    assert "2 cells in 1 stacked group(s)" in stacked["note"]  # the stacked path really ran (CPU: forced)
    assert "identical in 2 of 2 cells" in stacked["note"]  # stacked == one after another
    assert configured["figure"] == "cells/min, batched, configured recipe" and "(3 classes)" in configured["case"]
    epochs = TipAdapterFSchema().train.epochs  # conf/method/tip_adapter_f.yaml takes its schema's defaults
    assert f"(as run: epochs {epochs}, searched in 2 of 2 cells)" in configured["note"]
    assert "identical in 1 of 1 cells" in configured["note"]

    # cache: the hash's throughput beside reading the file, a first open beside later ones, on the shard it wrote
    hashed, opened = by_section["cache"]
    megabytes, images = map(int, re.search(r"a (\d+) MB dense shard \((\d+) images x 4 x 64 fp16\)",
                                           hashed["case"]).groups())
    assert images == 8 * 2**20 // (4 * 64 * 2)  # --size tiny: an 8 MiB shard of 4 x 64 fp16 rows
    assert megabytes == round(images * 4 * 64 * 2 / 1e6)  # all of it written
    assert hashed["figure"] == "MB/s" and re.fullmatch(r"reading the file alone: \d+ MB/s", hashed["reference"])
    assert opened["figure"] == "seconds" and opened["case"].endswith("whole content verified")
    assert re.fullmatch(r"reading the file alone: [\d.]+ s", opened["reference"])
    assert re.fullmatch(r"later opens in the same process: [\d.]+ ms \(not hashed again\)", opened["note"])


@no_cuda
def test_device_cuda_without_cuda_stops_in_one_line():
    result = subprocess.run([sys.executable, str(BENCH), "--size", "tiny", "--only", "cache", "--device", "cuda"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""  # no section ran, no table
    assert re.fullmatch(r"bench\.py --device cuda: no CUDA device: torch \S+ .*\n", result.stderr)


@no_cuda
def test_make_gpu_check_stops_first_without_cuda():
    if subprocess.run(["make", "-q", "install"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("make install is not up to date here: gpu-check would install first")
    top_level = {k: v for k, v in ENV.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}  # as a user types it
    result = subprocess.run(["make", "--no-print-directory", "gpu-check"], cwd=REPO, env=top_level,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stdout == ""  # neither the gpu tests nor the bench started
    mine, make = result.stderr.splitlines()
    assert "no CUDA device" in mine and make.startswith("make: *** [Makefile")
