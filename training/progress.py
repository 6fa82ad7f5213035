"""Progress that never goes quiet: a live bar in a terminal, and plain log lines at least every few seconds.

A step of a large model on the CPU can take a minute, so "log every N steps" alone can leave a
run silent for many minutes. ``Heartbeat`` adds a plain line (step, rate, ETA, loss) after the
first step and whenever nothing was logged for ``--log-seconds``. ``Progress`` is the bar of a
long pass (encoding, sampling, validation): a tqdm bar where stderr is a terminal, plain lines
at the same pace where it is not (a log file, accelerate's worker processes).

Only the main process prints, and the decision is made from its own clock without any
collective, so the processes of a DDP or FSDP run never wait for each other because of it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from tqdm import tqdm

log = logging.getLogger("training")

Clock = Callable[[], float]


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Heartbeat:
    """Says when the training loop owes a plain progress line, and writes it."""

    def __init__(self, seconds: float, first_step: int, total_steps: int, clock: Clock = time.monotonic):
        self.seconds, self.first_step, self.total_steps, self.clock = seconds, first_step, total_steps, clock
        self.start = clock()
        self.last: float | None = None  # when a line was last logged; None: the first step is owed one

    def logged(self) -> None:
        """A regular log line was just written."""
        self.last = self.clock()

    def due(self) -> bool:
        return self.last is None or self.clock() - self.last >= self.seconds

    def line(self, step: int, loss: float) -> str:
        """The progress line of ``step`` (counts as logged)."""
        now = self.clock()
        self.last = now
        rate = (step - self.first_step) / max(now - self.start, 1e-9)
        eta = duration((self.total_steps - step) / rate) if rate > 0 else "?"
        return (f"step {step}/{self.total_steps} | {rate:.3g} steps/s | ETA {eta} | "
                f"loss {loss:.4f} (this process, since the last line)")


class Progress:
    """``with Progress(total, "encoding images", "img") as bar: bar.update(n)``: a bar or plain lines."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, seconds: float = 30.0,
                 clock: Clock = time.monotonic):
        self.total, self.desc, self.unit, self.seconds, self.clock = total, desc, unit, seconds, clock
        self.enabled, self.done, self.start = enabled, 0, clock()
        self.plain = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled or self.plain, dynamic_ncols=True)
        self.last = self.start
        if self.plain and total:
            log.info("%s: %d %s to do", desc, total, unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = self.clock()
        if self.plain and now - self.last >= self.seconds and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info("%s: %d/%d %s | ETA %s", self.desc, self.done, self.total, self.unit,
                     duration((self.total - self.done) / rate))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        if self.plain and self.total and exc[0] is None:
            log.info("%s: %d %s in %s", self.desc, self.done, self.unit, duration(self.clock() - self.start))
