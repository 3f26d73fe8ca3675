"""Progress of long loops: a tqdm bar on a terminal, plain periodic log lines elsewhere (SLURM logs, CI), never both.

    with progress(total=steps, desc="train coop", unit="step") as bar:
        for ...:
            bar.update(1, epoch="3/10", loss=0.412)

    for cell in progress(cells, desc="sweep", unit="cell"):
        ...

The mode is chosen once per bar: `CLIPADAPT_PROGRESS` = auto (default: `bar` when stderr is a terminal, else `log`),
bar, log or off. In `log` mode a line such as

    train coop: 120/500 step (24%), 41.3 step/s, ETA 0:09, epoch=3/10, loss=0.412

goes to the `clipadapt.progress` logger at INFO every `CLIPADAPT_PROGRESS_INTERVAL` seconds (default 30), plus a
last line when the loop ends if any line was written before, so short loops stay silent. While a bar is shown,
console log records are written above it (tqdm's logging redirect), so the two do not garble each other.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "log", "off")
DEFAULT_INTERVAL_S = 30.0


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             mode: str | None = None, interval: float | None = None) -> Progress:
    """A progress report over `iterable` (iterate it) or over `total` units (call `update`); also a context manager.

    `mode` and `interval` default to CLIPADAPT_PROGRESS and CLIPADAPT_PROGRESS_INTERVAL (see the module docstring).
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return Progress(iterable, total, desc, unit, _mode(mode), _interval(interval))


def _mode(mode: str | None) -> str:
    mode = mode or os.environ.get("CLIPADAPT_PROGRESS") or "auto"
    if mode not in MODES:
        raise ValueError(f"CLIPADAPT_PROGRESS={mode!r}: use one of {', '.join(MODES)}")
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return mode


def _interval(interval: float | None) -> float:
    if interval is not None:
        return interval
    text = os.environ.get("CLIPADAPT_PROGRESS_INTERVAL", str(DEFAULT_INTERVAL_S))
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"CLIPADAPT_PROGRESS_INTERVAL={text!r}: give a number of seconds") from None


class Progress:
    """One loop's progress; build it with `progress()`."""

    _open_bars = 0  # bars shown now: only the outermost redirects console logging (nested bars stack under it)

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, mode: str,
                 interval: float):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.mode, self.interval = mode, interval
        self.done = 0
        self.info: dict[str, Any] = {}
        self.start = self.last_line = time.monotonic()
        self.lines = 0
        self.closed = False
        self._bar = self._redirect = None
        if mode == "bar":
            self._open_bar()

    def _open_bar(self) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # leave=None: the outermost bar stays on screen when done, nested ones (a cell inside a sweep) are cleared
        self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=sys.stderr, leave=None,
                         dynamic_ncols=True)
        if Progress._open_bars == 0:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        Progress._open_bars += 1

    def update(self, n: int = 1, **info: Any) -> None:
        """Count `n` more units done; `info` (e.g. loss=0.41) is shown beside the count until replaced."""
        self.done += n
        self.info.update(info)
        if self._bar is not None:
            if info:  # shown now when nothing else moves the bar (update(0, loss=...) at the end of an epoch)
                self._bar.set_postfix(self._shown_info(), refresh=n == 0)
            self._bar.update(n)
        elif self.mode == "log" and time.monotonic() - self.last_line >= self.interval:
            self._log_line()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
            Progress._open_bars -= 1
            if self._redirect is not None:
                self._redirect.__exit__(None, None, None)
        elif self.mode == "log" and self.lines:
            self._log_line(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress(total=...) has nothing to iterate: call update() instead")
        with self:
            for item in self.iterable:
                yield item
                self.update(1)

    # ------------------------------------------------------------------------------------------------ log mode

    def _shown_info(self) -> dict[str, str]:
        return {key: f"{value:.4g}" if isinstance(value, float) else str(value) for key, value in self.info.items()}

    def _log_line(self, final: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        count = f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        if self.total:
            count += f" ({100 * self.done / self.total:.0f}%)"
        parts = [count]
        if final:
            parts.append(f"in {_clock(elapsed)}")
        elif self.done and elapsed > 0:
            parts.append(_rate(self.done / elapsed, self.unit))
            if self.total:
                parts.append(f"ETA {_clock(elapsed / self.done * (self.total - self.done))}")
        parts += [f"{key}={value}" for key, value in self._shown_info().items()]
        log.info("%s: %s", self.desc, ", ".join(parts))
        self.last_line, self.lines = now, self.lines + 1


def _rate(per_second: float, unit: str) -> str:
    if per_second < 1:
        return f"{1 / per_second:.3g} s/{unit}"
    return f"{per_second:.3g} {unit}/s" if per_second < 1000 else f"{per_second:.0f} {unit}/s"


def _clock(seconds: float) -> str:
    """0:09, 12:05 or 3:02:41."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
