"""Progress of the long parts of a step: a tqdm bar in a terminal, a plain line every few seconds
in a log file (as :class:`~fourdgen.callbacks.progress.LineProgress` does for Lightning's loops)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

from fourdgen.diffusion.flow import sampling_callback


class Bar:
    """``update(n)`` counts ``unit``s toward ``total``: a tqdm bar on a TTY, else a line at most
    every ``interval_s`` seconds and at the end."""

    def __init__(self, desc: str, total: int | None, unit: str, interval_s: float = 15.0):
        self.desc, self.total, self.unit, self.interval_s = desc, total, unit, interval_s
        self.n, self._t0, self._last = 0, time.monotonic(), 0.0
        tty = getattr(sys.stdout, "isatty", None)
        self._tqdm = tqdm(total=total, desc=desc, unit=unit, leave=False) if tty and tty() else None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s or (self.total and self.n >= self.total):
            self._last = now
            of = f"/{self.total}" if self.total else ""
            print(f"  {self.desc}: {self.n}{of} {self.unit} ({now - self._t0:.1f}s)", flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


@contextlib.contextmanager
def sampling_bar(desc: str) -> Iterator[None]:
    """A :class:`Bar` of diffusion sampling steps for everything sampled inside the block."""
    bars: dict[int, Bar] = {}

    def on_step(i: int, total: int) -> None:
        if i == 0 or 0 not in bars:
            if 0 in bars:
                bars[0].close()
            bars[0] = Bar(desc, total, "sampling steps")
        bars[0].update()

    with sampling_callback(on_step):
        try:
            yield
        finally:
            if 0 in bars:
                bars[0].close()
