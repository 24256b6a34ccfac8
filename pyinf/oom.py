"""Out-of-memory recovery: halve the batch (capture) or the chunk (passes) and retry.

- `HalvingCapture(capture)` wraps `capture(batch) -> {name: (B, ...)}`: on an
  out-of-memory error it splits the batch into micro-batches of half the size
  (every tensor, list or tuple whose length is the batch size is sliced in
  dimension 0) and retries, down to one sample; the size that worked is kept
  for the following batches. Per-sample gradients do not depend on the
  micro-batching. One RuntimeWarning per wrapper.
- `pyinf.Attributor` retries a whole pass (fit statistics, scoring,
  self-influence) with half the samples per chunk (`Store.split_chunks`) on
  an out-of-memory error, warning once; down to one sample per chunk.

Out of memory means `torch.cuda.OutOfMemoryError` (`torch.OutOfMemoryError`;
the class exists on CPU builds), or a RuntimeError whose message says the
allocator is out of memory ("out of memory", "can't allocate memory").
"""
from __future__ import annotations

import gc
import warnings
from typing import Any, Callable

import torch

from .batches import batch_len, slice_batch

OOM_TYPES: tuple[type, ...] = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})
_OOM_TEXT = ("out of memory", "can't allocate memory")


def is_oom(err: BaseException) -> bool:
    """Whether `err` is an out-of-memory error (CUDA, CPU allocator, Triton's shared memory)."""
    if isinstance(err, OOM_TYPES):
        return True
    return isinstance(err, RuntimeError) and any(t in str(err).lower() for t in _OOM_TEXT)


def release_memory() -> None:
    """Drop what the failed attempt left behind (the exception's frames are gone by now)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class HalvingCapture:
    """`capture(batch)` that halves the micro-batch size on out-of-memory errors (module doc)."""

    def __init__(self, capture: Callable[[Any], dict], what: str = "capturing gradients"):
        self.capture = capture
        self.what = what
        self.limit: int | None = None  # the micro-batch size that worked last
        self.warned = False

    def __call__(self, batch):
        B = batch_len(batch)
        size = B if self.limit is None else min(B, self.limit)
        while True:
            failed = False
            try:
                if size >= B:
                    return self.capture(batch)
                parts = [self.capture(slice_batch(batch, s, min(s + size, B), B)) for s in range(0, B, size)]
                return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            except Exception as err:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_oom(err) or size <= 1:
                    raise
                failed = True
            if failed:
                size = max(1, size // 2)
                self.limit = size
                release_memory()
                if not self.warned:
                    self.warned = True
                    warnings.warn(
                        f"out of memory {self.what} (batch of {B}): retrying in micro-batches of {size} "
                        f"(halving again if needed; reported once)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
