"""Progress bars for the passes over the data: a thin wrapper over tqdm.

Bars go to stderr and disappear when their pass ends (`leave=False`), so a
long fit shows what it is doing without filling the log. `enabled=False`
prints nothing at all; without tqdm installed, nothing is printed either.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def bar(desc: str, total: int | None, enabled: bool = True, unit: str = "sample") -> Iterator:
    """`with bar("datainf: fit pass 1", total=n) as b: ... b.update(c)`."""
    if not enabled:
        yield _NoBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bars
        yield _NoBar()
        return
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True) as b:
        yield b
