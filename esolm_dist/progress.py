"""Progress of the long jobs that are not training (sampling, the likelihood bound).

On a terminal: a tqdm bar with its ETA on stderr, gone when the job ends. In a log (stderr is not a
terminal): one plain line at most every LOG_EVERY_S seconds, so short jobs stay quiet and a long one
shows how far it is and when it should end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_EVERY_S = 10.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, ETA {remaining}"


class Progress:
    """`total` units of work (`unit`: a plural noun), counted with update(n); a context manager."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.started = self.last_line = time.monotonic()
        self.bar = (tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False)
                    if self.stream.isatty() else None)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= LOG_EVERY_S:
            self.last_line = now
            line = tqdm.format_meter(self.done, self.total, now - self.started, prefix=self.desc, unit=self.unit,
                                     bar_format=LINE_FORMAT)
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
