"""Progress for long work: stage names with elapsed time, and byte counters.

Writes to stderr so stdout stays clean for --json. Quiet mode prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Progress:
    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self._last_decile = -1
        self._counting: dict[str, float] = {}

    def say(self, message: str) -> None:
        if not self.quiet:
            print(
                f"[{time.monotonic() - self.start:6.1f}s] {message}", file=self.stream, flush=True
            )

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Announce a stage, and report how long it took when it ends."""
        t0 = time.monotonic()
        self.say(f"{name} ...")
        yield
        self.say(f"{name} done in {time.monotonic() - t0:.1f}s")

    def bytes(self, label: str, done: int, total: int) -> None:
        """A byte counter with rate and time left: redraws in place on a terminal, prints
        every 10% otherwise."""
        if self.quiet:
            return
        now = time.monotonic()
        began = self._counting.setdefault(label, now)
        pct = 100 * done // total if total else 100
        text = f"{label}: {done / 1e6:.1f}/{total / 1e6:.1f} MB ({pct}%)"
        if now > began and done:
            rate = done / (now - began)
            left = (total - done) / rate if done < total else now - began
            text += f", {rate / 1e6:.1f} MB/s, " + (
                f"{left:.0f} s left" if done < total else f"took {left:.1f} s"
            )
        if self.stream.isatty():
            end = "\n" if done >= total else ""
            print(
                f"\r[{time.monotonic() - self.start:6.1f}s] {text}",
                end=end,
                file=self.stream,
                flush=True,
            )
        elif done >= total or pct // 10 != self._last_decile:
            self._last_decile = pct // 10
            self.say(text)
