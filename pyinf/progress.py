"""Progress on stderr: one bar, or one log line, per phase of work.

Every `progress=` option in pyinf takes:

* ``None`` (default, "auto"): a live tqdm bar while stderr is a terminal; when
  it is not (a log file, CI, a pipe), one line per phase, printed when the
  phase ends (``pyinf: datainf: fit: 2 passes, 1800 samples, 1.3 s``);
* ``True``: live bars even when stderr is not a terminal;
* ``False``: nothing.

A phase is one step of the work, however many passes over the data it makes:
LiSSA's 100 iterations are the one phase "lissa: fit", not 100 bars. Without
tqdm installed, live bars degrade to the log lines.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

MODES = ("bar", "log", "off")


def check(progress) -> None:
    """ValueError unless `progress` is None, True or False."""
    if progress not in (None, True, False):
        raise ValueError(f"progress must be None (auto), True or False, got {progress!r}")


def mode(progress: bool | None) -> str:
    """'bar', 'log' or 'off' for a `progress=` setting (see the module docstring)."""
    if progress is False:
        return "off"
    if progress is True:
        return "bar"
    isatty = getattr(sys.stderr, "isatty", None)
    return "bar" if isatty is not None and isatty() else "log"


def _count(n: int, unit: str) -> str:
    """`3 batches`, `1 query`, `20 passes`."""
    if n == 1:
        return f"1 {unit}"
    plural = unit[:-1] + "ies" if unit.endswith("y") else unit + ("es" if unit.endswith(("s", "ch")) else "s")
    return f"{n} {plural}"


class Phase:
    """Progress of one phase: `update(n)` as work is done, `note(text)` for a detail, `close()` once."""

    def __init__(self, desc: str, total: int | None, progress: bool | None = None, unit: str = "sample"):
        self.desc, self.unit, self.total = desc, unit, total
        self.mode = mode(progress)
        self.count, self.passes = 0, 0
        self._t0 = time.perf_counter()
        self._bar = None
        self._closed = False
        if self.mode == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:  # no tqdm: the log line at the end
                self.mode = "log"
            else:
                self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """Advance the phase by `n` units."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def new_pass(self, total: int | None = None) -> None:
        """Another pass over the data: the bar restarts its count, the log line counts passes."""
        self.passes += 1
        if self._bar is not None:
            if self.passes > 1:
                self._bar.reset(total=total if total is not None else self.total)
            self._bar.set_postfix_str(f"pass {self.passes}")

    def close(self) -> None:
        """End the phase: close its bar, or print its one log line (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log" and (self.count or self.passes):  # a phase that did no work: no line
            secs = time.perf_counter() - self._t0
            what = f"{_count(self.passes, 'pass')}, " if self.passes > 1 else ""
            print(f"pyinf: {self.desc}: {what}{_count(self.count, self.unit)}, {secs:.1f} s", file=sys.stderr, flush=True)


@contextmanager
def bar(desc: str, total: int | None, progress: bool | None = None, unit: str = "sample") -> Iterator[Phase]:
    """`with bar("capture", total=len(batches), unit="batch") as b: ... b.update()`: one phase."""
    phase = Phase(desc, total, progress, unit)
    try:
        yield phase
    finally:
        phase.close()
