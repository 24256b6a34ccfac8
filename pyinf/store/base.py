"""The part every store shares: the `Store` base class, storage dtypes, batch hashes and the model
fingerprint (what a disk store checks before it reuses shards). See `pyinf.store` for the kinds."""
from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ..blocks import Block, GradientSource, chunk_samples, compute_dtype, group_blocks, group_order, stack_group
from ..progress import Phase, bar

Capture = Callable[[Any], dict]
GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# A capture may add the per-sample losses (B,) under this key (not a module path) to its
# gradients: a non-finite loss is then refused or skipped by name, like a non-finite gradient.
LOSS_KEY = "<per-sample loss>"
# Tensors up to this many elements are hashed in full; larger ones by an integer checksum.
FULL_HASH_NUMEL = 1 << 22


# -- helpers -------------------------------------------------------------
def resolve_grad_dtype(grad_dtype, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on CUDA, float32 elsewhere; accepts the dtypes or their names."""
    if grad_dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    aliases = {"fp32": "float32", "bf16": "bfloat16", **{k: k for k in GRAD_DTYPES}}
    if isinstance(grad_dtype, str) and grad_dtype in aliases:
        return GRAD_DTYPES[aliases[grad_dtype]]
    if grad_dtype in GRAD_DTYPES.values():
        return grad_dtype
    raise ValueError(f"grad_dtype must be torch.float32 or torch.bfloat16, got {grad_dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32 (the manifest's spelling)."""
    return str(dtype).removeprefix("torch.")


def per_sample_bytes(blocks: list[Block], grad_dtype: torch.dtype) -> int:
    """Bytes one sample's gradients take over `blocks`, stored as `grad_dtype`."""
    return sum(b.size for b in blocks) * torch.finfo(grad_dtype).bits // 8


def default_chunk_size(blocks: list[Block], grad_dtype: torch.dtype) -> int:
    """Samples per chunk (or shard): the chunk policy of `pyinf.blocks.chunk_samples`, as `pyinf.influence`."""
    return chunk_samples(blocks, torch.finfo(grad_dtype).bits // 8)


def chunk_to_device(views: dict[str, torch.Tensor], blocks: list[Block], device: torch.device,
               non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """A chunk {block: (c, rows, cols)} on `device`: one copy per group of same-shape blocks (kept adjacent there, so the
    methods' `stack_group` is a view), none when it is there already."""
    if all(t.device == device for t in views.values()):
        return views
    out = {}
    for g in group_blocks(blocks):
        moved = stack_group(views, g).to(device, non_blocking=non_blocking)
        out.update({name: moved[k].view(-1, g.rows, g.cols) for k, name in enumerate(g.names)})
    return out


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def hash_batch(batch) -> str:
    """sha256 of a batch's tensors (keys, dtypes, shapes, values); other values by repr."""
    h = hashlib.sha256()
    items = sorted(batch.items()) if isinstance(batch, Mapping) else enumerate(
        batch if isinstance(batch, (list, tuple)) else [batch]
    )
    for key, v in items:
        h.update(repr(key).encode())
        if isinstance(v, torch.Tensor):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(_tensor_bytes(v))
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _digest(t: torch.Tensor) -> bytes:
    """Every value of `t`: its bytes, or for a large tensor the int64 sum of its bit patterns.

    The sum is computed where the tensor lives (one read, no copy to the host),
    is exact and so independent of the device, thread count or summation
    order, and changes with any single changed value; only changes that keep
    the sum (a permutation of the values) go unseen.
    """
    t = t.detach()
    if t.device.type == "meta":
        return b"meta"
    if t.numel() <= FULL_HASH_NUMEL:
        return hashlib.sha256(_tensor_bytes(t)).digest()
    bits = t.view(_INT_OF_SIZE.get(t.element_size(), torch.uint8))
    return str(int(bits.sum(dtype=torch.int64))).encode()


def fingerprint(model: torch.nn.Module, blocks: list[Block], grad_dtype: torch.dtype,
                options: dict | None = None) -> str:
    """What captured gradients depend on, apart from the data and the loss function.

    Hashes the blocks, grad_dtype, the capture `options` (e.g. mask_padding),
    every parameter and buffer (name, shape, dtype and every value, see
    `_digest`) and every module's `scaling` (PEFT LoRA's alpha / r, not a
    parameter). Cost: one read of the weights where they are, plus a host copy
    of the tensors of at most `FULL_HASH_NUMEL` elements (the adapters, norms,
    biases); for a 13B model on a GPU well under a second, on a CPU a few
    seconds. The loss function cannot be hashed: a disk store checks it by
    recomputing a batch (module docstring).
    """
    head = [[b.name, b.rows, b.cols] for b in blocks] + [dtype_name(grad_dtype), sorted((options or {}).items())]
    h = hashlib.sha256(json.dumps(head).encode())
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(_digest(t))
    for name, mod in model.named_modules():
        scaling = getattr(mod, "scaling", None)
        if isinstance(scaling, (dict, int, float)):
            h.update(f"{name}.scaling={sorted(scaling.items()) if isinstance(scaling, dict) else scaling}".encode())
    return h.hexdigest()


# -- common part ---------------------------------------------------------
class Store(GradientSource):
    """The `GradientSource` members shared by every store, pass labels and bars.

    Blocks are kept in storage order, same-shape blocks adjacent (`group_order`),
    so that a group of a chunk is one array (the methods' block-batched calls).
    `comm`/`offset`: a `pyinf.distributed.Comm` when this store holds one rank's
    shard, and the global index of its first kept sample.
    """

    kind = "abstract"

    def __init__(self, blocks: list[Block], device: torch.device, grad_dtype: torch.dtype, progress: bool | None = None):
        self.blocks = group_order(list(blocks))
        self.device = torch.device(device)
        self.grad_dtype = grad_dtype
        self.dtype = compute_dtype(grad_dtype)
        self.progress = progress
        self.n = 0
        self.chunk_size = 1
        self._phase: Phase | None = None  # the progress phase of the passes being made
        self.nan_policy = "error"
        self.skipped: list[int] = []  # original indices left out (nan_policy="skip")
        self.piece: int | None = None  # samples per chunk a pass yields, after an OOM (None: whole chunks)
        self.factors = None  # a pyinf.factors.FactorStats the capture adds into while filling (K-FAC), or None

    @property
    def n_orig(self) -> int:
        """Samples of the training data, kept or skipped."""
        return self.n + len(self.skipped)

    def split_chunks(self) -> int:
        """Halve the samples per chunk of the next passes; returns the new size (ValueError at 1)."""
        cur = self.piece or self.chunk_size
        if cur <= 1:
            raise ValueError("chunks are already one sample")
        self.piece = cur // 2
        return self.piece

    @contextmanager
    def phase(self, label: str):
        """One progress phase ("datainf: fit") over all the passes made inside the `with`."""
        self._phase = Phase(label, self.n, self.progress)
        try:
            yield self._phase
        finally:
            self._phase.close()
            self._phase = None

    def chunks(self, names=None, start: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """One pass (`GradientSource.chunks`), counted on the current phase's bar."""
        if self._phase is None:  # a pass outside any phase: a phase of its own
            with self.phase("pass"):
                yield from self.chunks(names, start)
            return
        b = self._phase
        b.new_pass()
        blocks = self.blocks if names is None else [x for x in self.blocks if x.name in set(names)]
        first = start
        for start, chunk in self._chunks(blocks, first):
            c = next(iter(chunk.values())).shape[0]
            if c == 0:
                continue
            step = self.piece or c
            for s in range(max(0, first - start) // step * step, c, step):
                yield start + s, ({k: v[s : s + step] for k, v in chunk.items()} if step < c else chunk)
                b.update(min(step, c - s))

    def _chunks(self, blocks: list[Block], first: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """One pass over `blocks` (a subset of `self.blocks`, in storage order), from the chunk that
        holds sample `first` on (the chunks before it are not read)."""
        raise NotImplementedError

    def fill(self, capture: Capture, batches: Iterable) -> "Store":
        """Run `capture(batch) -> {block: (B, rows, cols)}` over `batches` once and keep the result; returns self."""
        raise NotImplementedError

    def _capture(self, capture: Capture, batch, offset: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        """One batch's gradients in storage dtype and the skipped sample indices (offset + position).

        NaN/Inf in a gradient or in the loss (`LOSS_KEY`) is refused (for every
        method, tracin too), or with nan_policy="skip" the samples holding it are
        dropped from the batch.
        """
        grads = dict(capture(batch))
        losses = grads.pop(LOSS_KEY, None)
        out = {b.name: grads[b.name].detach().reshape(grads[b.name].shape[0], b.rows, b.cols) for b in self.blocks}
        # one mask of bad samples over the loss and every block, read back once (one host sync a batch)
        loss_bad = None if losses is None else ~torch.isfinite(losses.detach().reshape(-1))
        block_bad = {name: ~torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1) for name, g in out.items()}
        bad = torch.stack(([] if loss_bad is None else [loss_bad]) + list(block_bad.values())).any(dim=0)
        skipped: list[int] = []
        if not bool(bad.any()):
            return {name: g.to(self.grad_dtype) for name, g in out.items()}, skipped
        if self.nan_policy != "skip":  # name the first bad sample's loss, or its first bad block
            i = int(bad.nonzero()[0, 0])
            if loss_bad is not None and bool(loss_bad[i]):
                raise ValueError(f"the loss of training sample {offset + i} is NaN or Inf")
            name = next(name for name, f in block_bad.items() if bool(f[i]))
            raise ValueError(f"block '{name}': train gradient of sample {offset + i} contains NaN or Inf")
        skipped = [offset + int(i) for i in bad.nonzero().flatten().tolist()]
        keep = (~bad).nonzero().flatten()
        out = {name: g.index_select(0, keep) for name, g in out.items()}
        return {name: g.to(self.grad_dtype) for name, g in out.items()}, skipped

    @contextmanager
    def _accumulating(self, on: bool = True):
        """The capture adds K-FAC statistics (`self.factors`) inside the `with` (when `on`)."""
        if self.factors is None or not on:
            yield
            return
        self.factors.active = True
        try:
            yield
        finally:
            self.factors.active = False

    def _factors_state(self) -> dict | None:
        return None if self.factors is None else self.factors.state()

    def _restore_factors(self, state: dict, device) -> None:
        from ..factors import FactorStats

        saved = state.get("factors")
        self.factors = None if saved is None else FactorStats.from_state(saved, device)

    def _batches_bar(self, batches: Iterable, desc: str = "capture"):
        return bar(desc, len(batches) if hasattr(batches, "__len__") else None, self.progress, unit="batch")

    def state(self) -> dict:
        """What `Attributor.save` keeps to rebuild this store (see `restore`)."""
        raise NotImplementedError


# -- memory ("gpu" / "cpu") ----------------------------------------------
