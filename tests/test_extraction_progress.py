"""Feature extraction's progress: a tqdm bar when stderr is a terminal, plain periodic log lines otherwise, never both.

Each test extracts the synthetic dataset's features afresh (its own CLIPADAPT_HOME) with `python -m clipadapt.extract`:
batches of 32 give train 20 images -> 1 batch, val -> 1 batch, test 70 images -> 3 batches.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from terminal import run_on_a_terminal

REPO = Path(__file__).resolve().parents[1]
EXTRACT = ["backbone=tiny", "dataset=synthetic", "logger=none", "method=zero_shot", "shots=2",
           "features.num_workers=0", "features.batch_size=32"]
PLAIN_LINE = re.compile(r"clipadapt\.progress\]\[INFO\] - synthetic plain features: (\d+)/(\d+) batch \(\d+%\), (.*)$")


def extract_command(home: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "CLIPADAPT_HOME": str(home), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "CLIPADAPT_PROGRESS_INTERVAL": "0"}  # a plain line at every batch: the short extraction still writes some
    env.pop("CLIPADAPT_PROGRESS", None)
    return [sys.executable, "-m", "clipadapt.extract", *EXTRACT, f"hydra.run.dir={home}/out"], env


def test_plain_lines_when_stderr_is_a_pipe(tmp_path):
    command, env = extract_command(tmp_path)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [PLAIN_LINE.search(line) for line in result.stderr.splitlines() if "plain features:" in line]
    assert all(lines), result.stderr[-2000:]
    counts = [(int(line[1]), int(line[2])) for line in lines]
    assert counts == [(1, 1), (1, 1), (1, 1), (1, 1), (1, 3), (2, 3), (3, 3), (3, 3)]  # each loop ends with a line
    assert re.fullmatch(r"in 0:\d\d", lines[-1][3])  # the closing line: the time it took
    assert re.fullmatch(r"[\d.]+ (batch/s|s/batch), ETA 0:\d\d", lines[-2][3])
    assert "\r" not in result.stderr and "batch/s]" not in result.stderr  # no tqdm bar


def test_a_bar_when_stderr_is_a_terminal(tmp_path):
    command, env = extract_command(tmp_path)
    stderr = run_on_a_terminal(command, env, REPO)
    assert re.search(r"\rsynthetic plain features: 100%\|[^\r]*\| 3/3 \[[^\r]*batch/s\]", stderr), stderr[-2000:]
    assert not re.search(r"plain features: \d+/\d+ batch \(", stderr)  # no plain progress line beside the bar
    assert "features cached under" in stderr  # other log lines still reach the terminal
