"""Progress for logs (CI, `> run.log`): one plain line at most every 10 s instead of a redrawn bar.

A bar redraws itself with carriage returns, which a log file keeps as one endless line or, off a terminal, not at
all: a long audit then looks hung. The first line comes only after the first 10 s, so a run that fails early
prints its one error line and nothing else. With `heartbeat`, a line also comes every 10 s while a step reports
nothing (a long step may report seldom).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

EVERY_S = 10.0


class PlainProgress:
    """audit.Progress as lines such as `nontargeted_inf_z0.02 pass 2/15: 310/592 images, 41.2/s, elapsed 3m05s,
    ETA 7s` (elapsed: the whole run; rate and ETA: the current step)."""

    def __init__(self, write: Callable[[str], None], *, every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic, heartbeat: bool = False):
        self.write, self.every_s, self.clock = write, every_s, clock
        self.began = self.last = clock()
        self.label, self.total, self.completed, self.step_began = "", 0, 0, self.began
        self.lock = threading.Lock()  # the heartbeat writes from its own thread
        self.stopped = threading.Event()
        if heartbeat:
            threading.Thread(target=self._beat, daemon=True).start()

    def start(self, label: str, total: int) -> None:
        with self.lock:
            self.label, self.total, self.completed, self.step_began = label, total, 0, self.clock()

    def update(self, completed: int, label: str | None = None, total: int | None = None) -> None:
        with self.lock:
            self.completed = completed
            self.label = label or self.label
            self.total = self.total if total is None else total
            self._maybe_write()

    def done(self) -> None: ...

    def close(self) -> None:
        """No line after this (an error line may follow)."""
        with self.lock:
            self.stopped.set()

    def _beat(self) -> None:
        while not self.stopped.wait(self.every_s / 4):
            with self.lock:
                if self.label and not self.stopped.is_set():
                    self._maybe_write()

    def _maybe_write(self) -> None:
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.write(self._line(now))

    def _line(self, now: float) -> str:
        step = now - self.step_began
        rate = self.completed / step if step > 0 else 0.0
        eta = f", ETA {_duration((self.total - self.completed) / rate)}" if rate > 0 and self.total else ""
        return (f"{self.label}: {self.completed}/{self.total}, {rate:.3g}/s, elapsed {_duration(now - self.began)}"
                f"{eta}")


def _duration(seconds: float) -> str:
    """7s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
