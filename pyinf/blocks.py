"""Blocks of per-sample gradients: input validation and chunked reading.

A *block* is one LoRA matrix (or one plain weight, or one flat vector) whose
curvature pyinf solves on its own. Every block is handled as a matrix:
`(rows, cols)` per sample, a flat block being one row. Methods never see the
caller's containers; they read a `GradientSource`, which yields chunks of
samples for all blocks at once, so that the same code streams tensors held in
memory today and shards read from disk or recomputed from a model later.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Union

import torch

Grads = Union[torch.Tensor, Mapping[str, torch.Tensor]]

SINGLE_BLOCK_NAME = "grads"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Chunks are views of the caller's tensors; the bound keeps the per-block
# temporaries of one chunk (an fp32 upcast of bf16, the (m, chunk) dots) small
# while leaving the chunks large enough that a GEMM or kernel launch per block
# and chunk is efficient (the 13B LoRA shape, 8 x 5120 per block: 1638 samples).
CHUNK_BYTES = 1 << 28


@dataclass(frozen=True)
class Block:
    """Shape of one block: each sample's gradient is a `(rows, cols)` matrix."""

    name: str
    rows: int
    cols: int

    @property
    def size(self) -> int:
        """D_b, the number of entries of one sample's gradient."""
        return self.rows * self.cols


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32 (the accumulation type)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _as_block_dict(grads: Grads, what: str) -> dict[str, torch.Tensor]:
    if isinstance(grads, torch.Tensor):
        return {SINGLE_BLOCK_NAME: grads}
    if not isinstance(grads, Mapping):
        raise TypeError(
            f"{what} must be a tensor or a mapping block name -> tensor, got {type(grads).__name__}"
        )
    for name, t in grads.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"block '{name}': {what} holds a {type(t).__name__}, expected a torch.Tensor")
    return dict(grads)


def _as_matrix_block(name: str, t: torch.Tensor, what: str) -> torch.Tensor:
    """(N, D) -> (N, 1, D); (N, rows, cols) as is; anything else is an error."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"block '{name}': {what} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64"
        )
    if t.dim() == 2:
        t = t.unsqueeze(1)
    elif t.dim() != 3:
        raise ValueError(
            f"block '{name}': {what} has shape {tuple(t.shape)}; expected (samples, D) for a flat block "
            f"or (samples, rows, cols) for a matrix block"
        )
    if t.shape[0] == 0:
        raise ValueError(f"block '{name}': {what} is empty (0 samples)")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"block '{name}': {what} has shape {tuple(t.shape)} with a zero-sized dimension")
    return t.contiguous()


def check_finite(name: str, t: torch.Tensor, what: str, offset: int = 0) -> None:
    """Raise naming the first sample of `t` (N, ...) that holds NaN or Inf."""
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        i = offset + int(bad.nonzero()[0, 0])
        raise ValueError(f"block '{name}': {what} of sample {i} contains NaN or Inf")


def as_blocks(grads: Grads, what: str, blocks: list[Block] | None = None) -> dict[str, torch.Tensor]:
    """Validate per-sample gradients and return {name: (N, rows, cols)} tensors.

    With `blocks`, the names and per-sample shapes must match them (queries
    against the training blocks). All blocks must share N and the device.
    """
    raw = _as_block_dict(grads, what)
    if not raw:
        raise ValueError(f"{what} is empty: no blocks given")
    out = {name: _as_matrix_block(name, t, what) for name, t in raw.items()}
    if blocks is not None:
        expected = [b.name for b in blocks]
        if sorted(out) != sorted(expected):
            missing = sorted(set(expected) - set(out))
            extra = sorted(set(out) - set(expected))
            raise ValueError(
                f"{what} blocks do not match the training blocks: missing {missing}, unexpected {extra}"
            )
        for b in blocks:
            got = tuple(out[b.name].shape[1:])
            if got != (b.rows, b.cols) and not (b.rows == 1 and got == (1, b.cols)):
                raise ValueError(
                    f"block '{b.name}': {what} has per-sample shape {tuple(raw[b.name].shape[1:])}, "
                    f"but the training gradients have {(b.rows, b.cols) if b.rows > 1 else (b.cols,)}"
                )
        out = {b.name: out[b.name] for b in blocks}  # training order
    sizes = {name: t.shape[0] for name, t in out.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{what}: blocks disagree on the number of samples: {sizes}")
    devices = {t.device for t in out.values()}
    if len(devices) > 1:
        raise ValueError(f"{what}: blocks are on different devices: {sorted(map(str, devices))}")
    return out


class GradientSource:
    """Per-sample training gradients read in chunks of samples.

    `chunks()` yields `(start, {name: (c, rows, cols)})` covering samples
    `start .. start + c` of every block. This implementation wraps tensors
    already in memory (chunks are views); stores of later issues provide the
    same two members.
    """

    def __init__(self, grads: dict[str, torch.Tensor], chunk_size: int | None = None):
        self._grads = grads
        first = next(iter(grads.values()))
        self.n = first.shape[0]
        self.device = first.device
        self.blocks = [Block(name, t.shape[1], t.shape[2]) for name, t in grads.items()]
        self.dtype = compute_dtype(*(t.dtype for t in grads.values()))
        if chunk_size is None:
            per_sample = max(t[0].numel() for t in grads.values()) * 4  # fp32, largest block
            chunk_size = max(1, CHUNK_BYTES // per_sample)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = min(int(chunk_size), self.n)

    def chunks(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for start in range(0, self.n, self.chunk_size):
            stop = min(start + self.chunk_size, self.n)
            yield start, {name: t[start:stop] for name, t in self._grads.items()}

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.n / self.chunk_size)
