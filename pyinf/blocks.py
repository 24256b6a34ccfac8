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
# The chunk policy (`chunk_samples`), the one rule for `pyinf.influence` and
# every store: a chunk holds about CHUNK_BYTES of stored gradients over all
# blocks (bounding the temporaries of one chunk: an fp32 upcast of bf16, a
# stacked copy of a group), and at least enough samples that every primitive
# call, which covers one group of same-shape blocks, reads MIN_CALL_BYTES (a
# launch then moves enough bytes to hide its fixed cost). At the 13B LoRA
# shape (160 blocks of 8 x 5120, one group, bf16): 20 samples a chunk, 262 MB
# a call, 45 calls a pass for n = 900. The query side is read once per call
# too (m x D x 4 B: 2.6 GB at m = 100, 10x the chunk's G), so a pass moves
# 2m/(c·itemsize/2) times more query bytes than gradient bytes: with many
# queries, a larger `chunk_size` (c >= 2m for bf16) trades chunk memory for
# that traffic (not measured on a GPU yet; the cost model counts G only).
CHUNK_BYTES = 1 << 28
MIN_CALL_BYTES = 32 << 20


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


@dataclass(frozen=True)
class BlockGroup:
    """Blocks of one shape, served together by one call per primitive (a leading block axis)."""

    names: tuple[str, ...]
    rows: int
    cols: int

    @property
    def size(self) -> int:
        """D_b of each block of the group."""
        return self.rows * self.cols


def group_blocks(blocks: list[Block]) -> list[BlockGroup]:
    """Same-shape blocks grouped, groups and names in order of first appearance."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for b in blocks:
        by_shape.setdefault((b.rows, b.cols), []).append(b.name)
    return [BlockGroup(tuple(names), rows, cols) for (rows, cols), names in by_shape.items()]


def group_order(blocks: list[Block]) -> list[Block]:
    """`blocks` reordered so that each group's blocks are adjacent (a store's storage order: a
    group of one chunk is then one (b, c, rows, cols) array, see `stack_group`)."""
    by_name = {b.name: b for b in blocks}
    return [by_name[name] for g in group_blocks(blocks) for name in g.names]


def stack_group(tensors: Mapping[str, torch.Tensor], group: BlockGroup) -> torch.Tensor:
    """The group's `(c, ...)` tensors as one `(b, c, rows·cols)` tensor, each block contiguous.

    A view, no copy, when the blocks lie at equal strides in one storage, as
    a store lays them out (`group_order`) and as `precondition` returns H;
    otherwise one stacked copy (user dicts of separate tensors).
    """
    ts = [tensors[name] for name in group.names]
    first = ts[0]
    c = first.shape[0]
    flat = [t.reshape(c, group.size) for t in ts]  # a view for contiguous blocks
    if len(flat) == 1:
        return flat[0].unsqueeze(0)
    step = flat[1].storage_offset() - flat[0].storage_offset()
    zero_copy = (
        all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device for t in flat)
        and step >= c * group.size
        and all(t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for t in flat)
        and all(t.storage_offset() == flat[0].storage_offset() + k * step for k, t in enumerate(flat))
    )
    if zero_copy:
        return flat[0].as_strided((len(flat), c, group.size), (step, group.size, 1), flat[0].storage_offset())
    return torch.stack(flat)


def unstack_group(stacked: torch.Tensor, group: BlockGroup, rows: bool = False) -> dict[str, torch.Tensor]:
    """{name: stacked[k]} views (the inverse of `stack_group`; `rows`: each as (c, rows, cols))."""
    return {name: (stacked[k].reshape(-1, group.rows, group.cols) if rows else stacked[k])
            for k, name in enumerate(group.names)}


def chunk_samples(blocks: list[Block], itemsize: int, n: int | None = None) -> int:
    """Samples per chunk by the chunk policy above, for gradients stored with `itemsize` bytes."""
    total = sum(b.size for b in blocks) * itemsize
    smallest_group = min(len(g.names) * g.size for g in group_blocks(blocks)) * itemsize
    c = max(1, CHUNK_BYTES // total, -(-MIN_CALL_BYTES // smallest_group))
    return c if n is None else min(c, n)


def mean_query(queries: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`aggregate=True` (DataInf's classification recipe): {name: (m, ...)} -> the mean query {name: (1, ...)}
    in `dtype`, scored in place of the m queries (for a method linear in the query gradient, the mean of their
    score rows)."""
    return {name: V.to(dtype).mean(dim=0, keepdim=True) for name, V in queries.items()}


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
    """What every method reads: per-sample training gradients in chunks of samples.

    Members (the protocol; `TensorSource` and the stores of `pyinf.store` implement it):

    - `n`, `blocks` (list of `Block`), `device` (where chunks land), `dtype`
      (the compute dtype), `grad_dtype` (the widest stored dtype),
      `chunk_size` (samples per chunk, `chunk_samples`);
    - `chunks(names=None, start=0)`: one pass, yielding `(start, {name: (c, rows, cols)})`
      for samples `start .. start + c` of every block (of the blocks in `names`
      only, when given: a pass that reads just those, e.g. exact's Gram); with
      `start` > 0, only the chunks that end after sample `start`, never reading
      the ones before (a resumed score file, `pyinf.scores`);
    - `comm` (a `pyinf.distributed.Comm` when this source is one rank's shard
      of the data, else None) and `offset` (the global index of its first
      sample; 0 without `comm`).

    - `factors`: the K-FAC token statistics of the training data (a
      `pyinf.factors.FactorStats`), or None where the source has none (tensors
      given to `pyinf.influence`): kfac and ekfac need them;
    - `fisher_gradients`: a GradientSource of the same samples' gradients on
      labels drawn from the model (the true Fisher's), or None: ekfac with
      fisher="true" fits its eigenvalues on them.

    `groups` (same-shape blocks, `group_blocks`) and `num_chunks` follow.
    """

    n: int
    blocks: list[Block]
    device: torch.device
    dtype: torch.dtype
    grad_dtype: torch.dtype
    chunk_size: int
    comm = None
    offset = 0
    factors = None
    fisher_gradients = None

    def chunks(self, names=None, start: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """One pass: `(start, {block: (c, rows, cols)})` per chunk of samples from sample `start` (a chunk
            boundary), for the blocks `names` (default: all), same-shape blocks adjacent."""
        raise NotImplementedError

    @property
    def groups(self) -> list[BlockGroup]:
        """The groups of same-shape blocks, in storage order (`group_blocks`)."""
        return group_blocks(self.blocks)

    @property
    def num_chunks(self) -> int:
        """Chunks in one full pass: ⌈n / chunk_size⌉."""
        return math.ceil(self.n / self.chunk_size)


class TensorSource(GradientSource):
    """A `GradientSource` over tensors already in memory ({name: (n, rows, cols)}, `as_blocks`):
    chunks are views; `chunk_size` defaults to the chunk policy of `chunk_samples`."""

    def __init__(self, grads: dict[str, torch.Tensor], chunk_size: int | None = None):
        self._grads = grads
        first = next(iter(grads.values()))
        self.n = first.shape[0]
        self.device = first.device
        self.blocks = [Block(name, t.shape[1], t.shape[2]) for name, t in grads.items()]
        self.dtype = compute_dtype(*(t.dtype for t in grads.values()))
        self.grad_dtype = max((t.dtype for t in grads.values()), key=lambda d: d.itemsize)
        if chunk_size is None:
            chunk_size = chunk_samples(self.blocks, self.grad_dtype.itemsize)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = min(int(chunk_size), self.n)

    def chunks(self, names=None, start: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        names = list(self._grads) if names is None else names
        for start in range(start - start % self.chunk_size, self.n, self.chunk_size):
            stop = min(start + self.chunk_size, self.n)
            yield start, {name: self._grads[name][start:stop] for name in names}
