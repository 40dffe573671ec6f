"""Progress display of the encode driver: a bar on a terminal, periodic log lines otherwise.

A cluster job's stdout is a log file (``ray job logs``), where carriage-return bars turn into
megabytes of noise; so the bar is drawn only when the stream is a TTY, and everywhere else one
line is logged every `interval` seconds.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass
from typing import TextIO

__all__ = ["ProgressState", "Progress", "format_duration"]

log = logging.getLogger("pipeline.progress")


def format_duration(seconds: float | None) -> str:
    """12 -> '12s', 750 -> '12m30s', 7300 -> '2h01m'; None -> '?'."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


@dataclass
class ProgressState:
    """What the driver knows right now."""

    shards_total: int
    shards_skipped: int = 0
    shards_committed: int = 0
    shards_failed: int = 0
    shards_running: int = 0
    images: int = 0
    errors: int = 0
    retries: int = 0

    @property
    def shards_done(self) -> int:
        return self.shards_skipped + self.shards_committed + self.shards_failed


class Progress:
    """Renders `ProgressState` updates; call `update()` often, it throttles itself."""

    def __init__(self, stream: TextIO | None = None, *, interval: float = 30.0, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_log = self.start
        self._drawn = False

    def rate(self, state: ProgressState) -> float:
        """Images per second since start."""
        elapsed = time.monotonic() - self.start
        return state.images / elapsed if elapsed > 0 else 0.0

    def eta(self, state: ProgressState) -> float | None:
        """Seconds left, from the pace of shards finished in this run."""
        finished = state.shards_committed + state.shards_failed
        remaining = state.shards_total - state.shards_done
        if remaining <= 0:
            return 0.0
        if finished == 0:
            return None
        return (time.monotonic() - self.start) / finished * remaining

    def line(self, state: ProgressState) -> str:
        parts = [
            f"{state.shards_done}/{state.shards_total} shards",
            f"{state.images:,} images",
            f"{self.rate(state):.1f} img/s",
            f"ETA {format_duration(self.eta(state))}",
        ]
        if state.shards_running:
            parts.append(f"{state.shards_running} running")
        if state.errors:
            parts.append(f"{state.errors:,} bad samples")
        if state.shards_failed:
            parts.append(f"{state.shards_failed} failed")
        if state.retries:
            parts.append(f"{state.retries} retries")
        return " | ".join(parts)

    def update(self, state: ProgressState, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if force or now - self._last_draw >= 0.2:
                self._draw(state)
                self._last_draw = now
        elif force or now - self._last_log >= self.interval:
            log.info("progress: %s", self.line(state))
            self._last_log = now

    def message(self, text: str) -> None:
        """A one-off line (a shard committed or failed) that must not garble the bar."""
        if self.tty:
            self._clear()
            print(text, file=self.stream, flush=True)
        else:
            log.info("%s", text)

    def close(self, state: ProgressState) -> None:
        if self.tty:
            self._draw(state)
            print(file=self.stream, flush=True)
            self._drawn = False
        else:
            log.info("progress: %s", self.line(state))

    def _draw(self, state: ProgressState) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        text = self.line(state)
        bar_width = max(10, min(40, width - len(text) - 4))
        done = state.shards_done / state.shards_total if state.shards_total else 1.0
        filled = int(bar_width * done)
        bar = "#" * filled + "-" * (bar_width - filled)
        out = f"[{bar}] {text}"[: max(10, width - 1)]
        self.stream.write("\r" + out.ljust(max(10, width - 1)))
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            width = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + " " * max(10, width - 1) + "\r")
            self.stream.flush()
            self._drawn = False
