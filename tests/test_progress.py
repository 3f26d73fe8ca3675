"""Progress: a tqdm bar when stderr is a terminal, plain periodic log lines otherwise, never both."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clipadapt.progress import progress
from terminal import run_on_a_terminal

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["backbone=tiny", "dataset=synthetic", "logger=none", "method=clip_adapter", "shots=2",
         "features.train_views=1", "features.num_workers=0", "method.train.epochs=3", "method.train.batch_size=8"]
PLAIN_LINE = re.compile(r"train clip_adapter: (\d+)/6 step \(\d+%\)")  # 20 rows, 2 full batches of 8, 3 epochs


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One CLIPADAPT_HOME for the module: the second run reuses the first one's cached features."""
    return tmp_path_factory.mktemp("progress")


def train_command(home: Path, out: str) -> tuple[list[str], dict]:
    env = {**os.environ, "CLIPADAPT_HOME": str(home), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "CLIPADAPT_PROGRESS_INTERVAL": "0"}  # a plain line at every step: the short run still writes some
    env.pop("CLIPADAPT_PROGRESS", None)
    return [sys.executable, "-m", "clipadapt.train", *TRAIN, f"hydra.run.dir={home}/{out}"], env


def test_plain_lines_when_stderr_is_not_a_terminal(home):
    command, env = train_command(home, "plain")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "train clip_adapter:" in line]
    assert [int(PLAIN_LINE.search(line).group(1)) for line in lines[:6]] == [1, 2, 2, 3, 4, 4]  # steps; epoch ends
    assert all("clipadapt.progress" in line and "\r" not in line for line in lines)
    assert re.search(r"6/6 step \(100%\), [\d.]+ step/s, ETA 0:00, epoch=3/3, loss=[\d.]+$", lines[-2])
    assert re.search(r"6/6 step \(100%\), in 0:\d\d, epoch=3/3, loss=[\d.]+$", lines[-1])  # the closing line
    assert "step/s]" not in result.stderr and "?step/s" not in result.stderr  # no tqdm bar for training


def test_a_bar_when_stderr_is_a_terminal(home):
    command, env = train_command(home, "tty")
    stderr = run_on_a_terminal(command, env, REPO)
    assert re.search(r"\rtrain clip_adapter: 100%\|[^\r]*\| 6/6 \[[^\r]*step/s, epoch=3/3, loss=[\d.]+\]", stderr)
    assert not PLAIN_LINE.search(stderr)  # no plain progress line beside the bar
    assert "test/acc" in stderr  # other log lines still reach the terminal (written above the bar)


# --------------------------------------------------------------------------------------------- the API itself


def test_an_iterable_is_yielded_whole_and_counted(caplog):
    caplog.set_level(logging.INFO, logger="clipadapt.progress")
    bar = progress(["a", "b", "c"], desc="cells", unit="cell", mode="log", interval=0)
    assert list(bar) == ["a", "b", "c"] and bar.closed
    counts = [record.getMessage().split(", ")[:2] for record in caplog.records]
    assert [count for count, _ in counts] == ["cells: 1/3 cell (33%)", "cells: 2/3 cell (67%)",
                                              "cells: 3/3 cell (100%)", "cells: 3/3 cell (100%)"]
    assert counts[-1][1].startswith("in 0:00")  # the closing line: the time it took


def test_short_loops_stay_silent_and_off_prints_nothing(caplog):
    caplog.set_level(logging.INFO, logger="clipadapt.progress")
    with progress(total=100, desc="quick", mode="log", interval=60) as bar:
        for _ in range(100):
            bar.update(1, loss=0.5)
    for _ in progress(range(5), desc="silent", mode="off", interval=0):
        pass
    assert caplog.records == []


def test_a_bad_mode_is_one_line(monkeypatch):
    monkeypatch.setenv("CLIPADAPT_PROGRESS", "fancy")
    with pytest.raises(ValueError, match=r"^CLIPADAPT_PROGRESS='fancy': use one of auto, bar, log, off$"):
        progress(total=1)
