"""The benchmark script runs end to end at a tiny size and reports every section (no figure is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"


@pytest.mark.slow
def test_bench_runs_every_section_at_a_tiny_size(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(BENCH), "--size", "tiny", "--json", str(out), "--workdir", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["size"] == "tiny"
    rows = report["rows"]
    by_section = {section: [r for r in rows if r["section"] == section]
                  for section in ("training", "overhead", "grid", "extraction", "memory")}
    assert all(by_section.values()), {k: len(v) for k, v in by_section.items()}

    from clipadapt.methods import METHODS

    trained = {r["case"].split(",")[0] for r in by_section["training"] if r["figure"] == "efficiency" and r["value"]}
    assert trained == {"tip_adapter_f", "clip_adapter", "calip_fs", "coop"} & set(METHODS)
    assert all(r["value"] > 0 for r in rows if r["value"] is not None)
    assert "heavy imports: none" in by_section["overhead"][0]["note"]  # a cached run loads no model code
    assert "identical in 1 of 1 cells" in by_section["grid"][0]["note"]  # batched == one process per cell
    assert "| section | case |" in result.stdout  # the markdown table
    assert not list(tmp_path.glob("clipadapt-bench-*"))  # temporary data removed
