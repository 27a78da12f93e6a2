"""Training time, kept apart from evaluation and checkpoint time: throughput windows, ETA and run totals."""

from __future__ import annotations

import datetime
import time


def clock(seconds: float) -> str:
    """H:MM:SS."""
    return str(datetime.timedelta(seconds=round(seconds)))


def count(n: float) -> str:
    """1234 -> 1.2K, 81920 -> 81.9K, 2.3e9 -> 2.30B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f}{unit}"
    return f"{n:.0f}"


class StepMeter:
    """Counts optimizer steps and the seconds spent training them. Evaluations and saves are bracketed
    by ``pause()`` / ``resume()``, so a window's tokens/s and MFU cover exactly its own steps and
    training time, however evaluations and saves fall between log steps."""

    def __init__(self, first_step: int, max_steps: int):
        self.first_step, self.max_steps = first_step, max_steps
        self.started = time.perf_counter()
        self._since: float | None = self.started
        self._window_steps, self._window_seconds = 0, 0.0
        self.total_steps, self.total_seconds = 0, 0.0  # this session's training steps and seconds

    def pause(self) -> None:
        if self._since is not None:
            self._window_seconds += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def count_step(self) -> None:
        self._window_steps += 1

    def take_window(self) -> tuple[int, float]:
        """(steps, training seconds) since the last window; starts the next one."""
        self.pause()
        window = self._window_steps, self._window_seconds
        self.total_steps += window[0]
        self.total_seconds += window[1]
        self._window_steps, self._window_seconds = 0, 0.0
        self.resume()
        return window

    def elapsed(self) -> float:
        """Wall-clock seconds of this session, evaluations and saves included."""
        return time.perf_counter() - self.started

    def eta(self, step: int) -> float | None:
        """Seconds to max_steps at this session's wall-clock pace (evaluations and saves included)."""
        done = step - self.first_step
        return self.elapsed() / done * (self.max_steps - step) if done > 0 else None
