"""Progress for long operations: a one-line bar on a terminal, nothing in a pipe.

Progress goes to stderr and only when stderr is a TTY, so `s3rollup ... | jq` or a CI
log gets the result and the one-line messages, never carriage-return noise.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    """A byte count as B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


def bar_line(label: str, done: float, total: float, width: int = 24, unit: str = "bytes") -> str:
    """One progress line: label, bar, percentage and amounts."""
    frac = min(1.0, done / total) if total > 0 else 1.0
    filled = round(frac * width)
    amount = f"{human_bytes(done)}/{human_bytes(total)}" if unit == "bytes" else f"{done:.0f}/{total:.0f}"
    return f"{label} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% {amount}"


class Progress:
    """A thread-safe progress line on stream (default stderr), drawn only on a TTY."""

    def __init__(self, label: str, total: float, unit: str = "bytes", stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label, self.total, self.unit = label, total, unit
        self.done = 0.0
        self._lock = threading.Lock()
        self._last_draw = 0.0

    def add(self, amount: float) -> None:
        """Count amount more done (boto3's transfer Callback signature)."""
        with self._lock:
            self.done += amount
            now = time.monotonic()
            if self.enabled and (now - self._last_draw > 0.1 or self.done >= self.total):
                self._last_draw = now
                self.stream.write("\r" + bar_line(self.label, self.done, self.total, unit=self.unit))
                self.stream.flush()

    def close(self) -> None:
        """End the line (on a TTY)."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class Waiting:
    """A spinner with elapsed seconds and a status text while waiting, drawn only on a TTY."""

    FRAMES = "|/-\\"

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = label
        self.started = time.monotonic()
        self._ticks = 0

    def tick(self, status: str = "") -> None:
        """Redraw the line with the current status."""
        if not self.enabled:
            return
        self._ticks += 1
        frame = self.FRAMES[self._ticks % len(self.FRAMES)]
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r{frame} {self.label} {elapsed:5.1f}s {status}\033[K")
        self.stream.flush()

    def close(self) -> None:
        """End the line (on a TTY)."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
