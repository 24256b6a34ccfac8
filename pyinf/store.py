"""Gradient stores: per-sample training gradients captured once, read in chunks.

Every store is a `GradientSource` (see `pyinf.blocks`): `n`, `blocks`,
`device` (where chunks land: the model's device), `dtype` (the compute dtype,
float32), `chunk_size`, `num_chunks` and `chunks()` yielding
`(start, {name: (c, rows, cols)})`. `fill(capture, batches)` runs the capture
over the training data once (`capture(batch) -> {name: (B, rows, cols)}`).
Each `chunks()` call is one pass; the passes inside `with store.phase(label):` share one
progress bar (or log line, `pyinf.progress`).

Kinds (`store=` of `pyinf.Attributor`):

- "gpu": device memory. "cpu": host memory, pinned when CUDA is available, and
  copied to the device chunk by chunk on a side stream, one chunk ahead of the
  compute. Both are `MemoryStore`: a list of fixed-size slabs of `chunk_size`
  samples, so filling never concatenates (no 2x peak) and a chunk is a view.
- "disk:PATH": `DiskStore`, shards in the directory PATH (format below).
- "none": `RecomputeStore`, no store: every pass re-runs the capture over the
  training data, which must come back in the same order (checked by hashing
  each batch's tensors; a shuffled loader is a ValueError). One chunk per
  batch. Costly where a method nests passes (exact's Gram with n > D_b reads
  chunk pairs; self-influence preconditions chunk by chunk).
- "auto": "gpu" when the model is on CUDA, else "cpu".

`grad_dtype` (storage) is torch.bfloat16 or torch.float32; default bfloat16
when the model is on CUDA (half the memory and bandwidth; the passes are
bandwidth-bound) and float32 on the CPU (no speed to gain there). Compute is
float32 whatever the storage. Captured gradients with NaN/Inf are refused at
capture time, naming the sample and block, for every method
(`nan_policy="error"`, the default), and so are NaN/Inf losses when the
capture reports them (`LOSS_KEY`). With `nan_policy="skip"` such samples
are left out of the store instead: `n` counts the kept samples, chunk starts
index them, `skipped` lists the original indices left out (sample i of the
data given to `fill`, counting every sample) and `n_orig` counts all.

K-FAC statistics: `factors` (a `pyinf.factors.FactorStats`, set by the
`Attributor` for kfac/ekfac before `fill`, else None) receives the capture's
token statistics while the store fills (one capture pass; "none" captures
once for them). Memory stores keep them in memory (and in `state()`), the disk
store in `factors.bin` (below). Under nan_policy="skip" a skipped sample's
finite token statistics still count (only its gradients are left out).

Out of memory while a pass reads chunks: `split_chunks()` halves the number of
samples per chunk a pass yields (views of the stored chunk; the store itself is
unchanged), for a retry of the pass (`pyinf.Attributor` does it).

Data parallel: `comm` (a `pyinf.distributed.Comm`, None on one process) and
`offset` (the global index of this store's first kept sample) are set by the
`Attributor` after `fill`; the methods read them (`pyinf.methods.base`).

On-disk format (version 2) of "disk:PATH"
-----------------------------------------
- `PATH/manifest.json`:
  `{"format": "pyinf-gradient-store", "version": 2, "byteorder": "little",
    "grad_dtype": "float32" | "bfloat16",
    "blocks": [{"name", "rows", "cols"}, ...],        # in storage order
    "fingerprint": hex sha256 of the blocks, grad_dtype, the capture options
                   and the model (see `fingerprint`),
    "batches_per_shard": k, "samples_per_shard": k * (first batch size),
    "shards": [{"index", "file", "start", "count", "batches", "bytes",
                "sha256": hex of the file, "data_sha256": hex of the batches' inputs,
                "skipped": [original sample indices left out under nan_policy="skip"]}],
    "complete": bool, "n": total samples (when complete),
    "factors": (K-FAC methods only) {"file": "factors.bin", "bytes", "sha256",
               "fisher": "empirical" | "true", "seed", "shards": [indices of the shards
               whose statistics the file holds], "tokens": {block: token count}}}`
- `PATH/shard-000000.bin`, ...: shard s holds the gradients of training batches
  `s*k .. s*k + k - 1` (samples `start .. start + count - 1`). The file is the
  blocks one after the other, in manifest order; block b is a C-order array
  `(count, rows, cols)` of little-endian float32 or bfloat16 (raw 16-bit
  words: the top half of a float32), `count * rows * cols * itemsize` bytes.
  `start` and `count` count kept samples; `count + len(skipped)` samples of
  the data went into the shard (a shard may hold 0 samples: an empty file).
  It is read with `numpy.memmap` and `torch.from_numpy`, without copies
  (then one copy to a CUDA device, from pageable memory: no overlap yet).
- `PATH/factors.bin` (kfac/ekfac, `pyinf.factors`): the token sums R = Σ_t p pᵀ
  and C = Σ_t q qᵀ of every block, over the samples of the shards listed in
  its manifest entry: per block in manifest order, the upper triangle (row by
  row, diagonal included) of R, then of C, little-endian float64,
  `(rows(rows+1) + cols(cols+1))/2 * 8` bytes a block. It is rewritten (atomically)
  when the shards written since its last write reach its own size, and when
  the fill completes, so that it costs at most as many bytes of writes as the
  gradients. On resume a reused shard that it does not cover is captured
  again for its statistics only (its gradients are not rewritten), and a
  recomputed shard that it covers adds none; statistics of another kind
  (fisher, seed), or a corrupt file, are recomputed from every shard.
- Writes are atomic: a shard is written to `*.tmp`, fsynced and renamed (and
  the directory fsynced); the manifest is rewritten the same way after each
  finished shard. A `*.tmp` left by a killed write is removed by the next `fill`.
- PATH (`~` expanded) is created if missing; an existing directory holding
  anything but a store's own files (`manifest.json`, `shard-NNNNNN.bin`,
  their `*.tmp`) is refused, never written into.
- An interrupted fit resumes: a new `fill` over the same data keeps every
  shard whose checksum holds and whose batches hash the same, skips those
  batches without capturing them, and recomputes the rest (a corrupted or
  missing shard is recomputed, with a warning); it says how many shards it
  reused (one line on stderr unless progress=False). A manifest from a
  different model, block list, grad_dtype or capture options (a fingerprint
  mismatch), shards whose batches differ from the data given now, or
  gradients that changed (below) are refused with a ValueError (nothing is
  deleted: remove the directory or choose another path).
- What the fingerprint cannot see, the loss function above all, is checked
  by recomputing: the first batch of the first reused shard is captured again
  and must match the stored gradients within the storage precision
  (normwise, per block: 2^-6 in bfloat16, two bf16 ulps; 1e-3 in float32,
  room for a different summation order on other hardware or thread counts).
  A 3x loss, another LoRA scaling or another `mask_padding` is refused; a
  change of the gradients below that tolerance is not seen here.
- A complete store whose shards are all reused is only read (no manifest
  rewrite, no temp files): it can be scored from read-only storage.
- Checksums are verified the first time a process opens a shard, and the
  size on every open (a truncated shard is never read as data): a corrupted
  or truncated shard found while scoring is a ValueError that says to re-run
  `fit`, which recomputes it. A shard recorded with skipped samples is
  refused under nan_policy="error" (naming the sample).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .blocks import Block, GradientSource, chunk_samples, compute_dtype, group_blocks, group_order, stack_group
from .progress import Phase, bar, mode

Capture = Callable[[Any], dict]
FORMAT = "pyinf-gradient-store"
FORMAT_VERSION = 2
GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ORDER_ERROR = (
    "the training data changed order between passes; use a non-shuffled loader or a store "
    "(store='cpu', 'gpu' or 'disk:PATH')"
)
# A capture may add the per-sample losses (B,) under this key (not a module path) to its
# gradients: a non-finite loss is then refused or skipped by name, like a non-finite gradient.
LOSS_KEY = "<per-sample loss>"
ACCEPTED = (
    "a batch is a dict of tensors with the samples in dimension 0 (what a DataLoader, a collate_fn or "
    "tokenizer(..., return_tensors='pt') gives); pass one batch, a list of batches, a list of per-example "
    "dicts, a Dataset, (dataset, collate_fn) or a DataLoader"
)
# Normwise per-block tolerance of the first-batch recompute check (module docstring).
RECOMPUTE_TOL = {torch.float32: 1e-3, torch.bfloat16: 2.0**-6}
_STORE_FILE = re.compile(r"(manifest\.json|shard-\d{6}\.bin|factors\.bin)(\.tmp)?")
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
    return str(dtype).removeprefix("torch.")


def per_sample_bytes(blocks: list[Block], grad_dtype: torch.dtype) -> int:
    return sum(b.size for b in blocks) * torch.finfo(grad_dtype).bits // 8


def default_chunk_size(blocks: list[Block], grad_dtype: torch.dtype) -> int:
    """Samples per chunk (or shard): the chunk policy of `pyinf.blocks.chunk_samples`, as `pyinf.influence`."""
    return chunk_samples(blocks, torch.finfo(grad_dtype).bits // 8)


def _to_device(views: dict[str, torch.Tensor], blocks: list[Block], device: torch.device,
               non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """A chunk on `device`: one copy per group of same-shape blocks (kept adjacent there, so the
    methods' `stack_group` is a view), none when it is there already."""
    if all(t.device == device for t in views.values()):
        return views
    out = {}
    for g in group_blocks(blocks):
        moved = stack_group(views, g).to(device, non_blocking=non_blocking)
        out.update({name: moved[k].view(-1, g.rows, g.cols) for k, name in enumerate(g.names)})
    return out


def batch_len(batch) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    what = type(batch).__name__ + (" without tensors" if isinstance(batch, (Mapping, list, tuple)) else "")
    raise TypeError(f"cannot tell the batch size of a {what}: {ACCEPTED}")


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, chunks: Iterable) -> None:
    """Write buffers to `path` via a fsynced temp file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
        from .factors import FactorStats

        saved = state.get("factors")
        self.factors = None if saved is None else FactorStats.from_state(saved, device)

    def _batches_bar(self, batches: Iterable, desc: str = "capture"):
        return bar(desc, len(batches) if hasattr(batches, "__len__") else None, self.progress, unit="batch")

    def state(self) -> dict:
        """What `Attributor.save` keeps to rebuild this store (see `restore`)."""
        raise NotImplementedError


# -- memory ("gpu" / "cpu") ----------------------------------------------
class MemoryStore(Store):
    """Gradients in slabs of `chunk_size` samples on `storage` (a device, or pinned host memory)."""

    kind = "memory"

    def __init__(self, blocks, device, grad_dtype, storage, chunk_size=None, progress=None):
        super().__init__(blocks, device, grad_dtype, progress)
        self.storage = torch.device(storage)
        self.chunk_size = int(chunk_size or default_chunk_size(self.blocks, grad_dtype))
        self._pin = self.storage.type == "cpu" and torch.cuda.is_available()
        # A side stream copies chunk i+1 to the device while chunk i is used.
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and self.storage.type == "cpu" else None
        self._slabs: list[dict[str, torch.Tensor]] = []

    def _new_slab(self) -> dict[str, torch.Tensor]:
        """One slab: an array (b, chunk_size, rows, cols) per group, handed out as per-block views."""
        slab = {}
        for g in group_blocks(self.blocks):
            buf = torch.empty(len(g.names), self.chunk_size, g.rows, g.cols, dtype=self.grad_dtype,
                              device=self.storage, pin_memory=self._pin)
            slab.update({name: buf[k] for k, name in enumerate(g.names)})
        return slab

    def fill(self, capture, batches):
        self._slabs, n, self.skipped = [], 0, []
        with self._batches_bar(batches) as pb, self._accumulating():
            for batch in batches:
                g, skipped = self._capture(capture, batch, n + len(self.skipped))
                self.skipped += skipped
                c, pos = next(iter(g.values())).shape[0], 0
                while pos < c:  # a batch may straddle two slabs
                    slab, off = divmod(n, self.chunk_size)
                    if slab == len(self._slabs):
                        self._slabs.append(self._new_slab())
                    take = min(c - pos, self.chunk_size - off)
                    for name, t in g.items():
                        self._slabs[slab][name][off : off + take].copy_(t[pos : pos + take])
                    pos, n = pos + take, n + take
                pb.update()
        if n == 0:
            raise ValueError("the training data is empty" if not self.skipped else
                             f"every training sample ({len(self.skipped)}) was skipped for NaN/Inf gradients")
        self.n = n
        return self

    def _views(self, blocks, first=0):
        for i in range(first // self.chunk_size, len(self._slabs)):
            start, slab = i * self.chunk_size, self._slabs[i]
            c = min(self.chunk_size, self.n - start)
            yield start, {b.name: slab[b.name][:c] for b in blocks}

    def _chunks(self, blocks, first=0):
        if self._stream is None:  # views (same device), or plain copies
            for start, views in self._views(blocks, first):
                yield start, _to_device(views, blocks, self.device)
            return
        main = torch.cuda.current_stream(self.device)

        def load(views):
            with torch.cuda.stream(self._stream):
                out = _to_device(views, blocks, self.device, non_blocking=True)
            return out, self._stream.record_event()

        views = list(self._views(blocks, first))
        if not views:
            return
        nxt = load(views[0][1])
        for i, (start, _) in enumerate(views):
            cur, ready = nxt
            main.wait_event(ready)
            for t in cur.values():  # allocated on the side stream, used on the main one
                t.record_stream(main)
            if i + 1 < len(views):
                nxt = load(views[i + 1][1])
            yield start, cur

    def state(self):
        return {
            "kind": self.kind,
            "storage": self.storage.type,
            "n": self.n,
            "chunk_size": self.chunk_size,
            "slabs": [{name: t.cpu() for name, t in slab.items()} for slab in self._slabs],
            "skipped": list(self.skipped),
            "factors": self._factors_state(),
        }

    @classmethod
    def restore(cls, state, blocks, device, grad_dtype, progress=None, **_):
        storage = device if state["storage"] == "cuda" else torch.device("cpu")
        self = cls(blocks, device, grad_dtype, storage, state["chunk_size"], progress)
        self.n = state["n"]
        self.skipped = list(state.get("skipped", []))
        self._restore_factors(state, device)
        for saved in state["slabs"]:
            slab = self._new_slab()
            for name, t in slab.items():
                t.copy_(saved[name])
            self._slabs.append(slab)
        return self


# -- disk ------------------------------------------------------------------
# Shards verified in this process: (path, sha256, size, mtime_ns). A rewritten file has a new key.
_VERIFIED: set[tuple] = set()


def _file_key(path: Path, sha: str) -> tuple:
    st = path.stat()
    return (str(path.resolve()), sha, st.st_size, st.st_mtime_ns)


class DiskStore(Store):
    """Shards in a directory, with a manifest; see the module docstring for the format."""

    kind = "disk"

    def __init__(self, path, blocks, device, grad_dtype, fingerprint, chunk_size=None, progress=None):
        super().__init__(blocks, device, grad_dtype, progress)
        if sys.byteorder != "little":
            raise RuntimeError("the disk store format is little-endian; this host is big-endian")
        self.path = Path(path).expanduser()
        self.fingerprint = fingerprint  # None: not checked (a restore the caller vouches for)
        self.target = int(chunk_size or default_chunk_size(self.blocks, grad_dtype))  # samples per shard
        self.shards: list[dict] = []

    @property
    def _manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def _new_manifest(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "byteorder": "little",
            "grad_dtype": dtype_name(self.grad_dtype),
            "blocks": [{"name": b.name, "rows": b.rows, "cols": b.cols} for b in self.blocks],
            "fingerprint": self.fingerprint,
            "batches_per_shard": None,
            "samples_per_shard": None,
            "shards": [],
            "complete": False,
            "n": None,
        }

    def _read_manifest(self) -> dict | None:
        if not self._manifest_path.exists():
            return None
        try:
            man = json.loads(self._manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{self._manifest_path} is not valid JSON ({err}); delete the directory or choose another path"
            ) from None
        if man.get("format") != FORMAT or man.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{self._manifest_path}: not a pyinf gradient store of version {FORMAT_VERSION} "
                f"(format {man.get('format')!r}, version {man.get('version')!r})"
            )
        stored = [Block(b["name"], b["rows"], b["cols"]) for b in man.get("blocks", [])]
        if set(stored) == set(self.blocks):  # a store written in another block order reads as it is
            self.blocks = stored
        expected = self._new_manifest()
        for key in ("grad_dtype", "blocks", "fingerprint"):
            if man[key] != expected[key] and not (key == "fingerprint" and self.fingerprint is None):
                raise ValueError(
                    f"the gradient store at {self.path} was built from a different model, block list, "
                    f"grad_dtype or capture options ({key} differs); delete the directory or choose another path"
                )
        return man

    def _write_manifest(self, man: dict) -> None:
        man["shards"] = sorted(man["shards"], key=lambda e: e["index"])
        _write_atomic(self._manifest_path, [json.dumps(man, indent=1).encode()])

    def _open(self, e: dict) -> dict[str, torch.Tensor]:
        """A shard as {name: (count, rows, cols)} CPU tensors over a memmap (no copy)."""
        p = self.path / e["file"]
        if not p.exists() or p.stat().st_size != e["bytes"]:
            raise ValueError(f"gradient shard {p} is missing or truncated; run fit() again to recompute it")
        if e["bytes"] == 0:  # every sample of the shard was skipped
            return {b.name: torch.empty(0, b.rows, b.cols, dtype=self.grad_dtype) for b in self.blocks}
        arr = np.memmap(p, dtype=np.uint8, mode="c")  # copy-on-write: writable for torch, file untouched
        key = _file_key(p, e["sha256"])
        if key not in _VERIFIED:
            if hashlib.sha256(arr).hexdigest() != e["sha256"]:
                raise ValueError(f"gradient shard {p} is corrupt (checksum mismatch); run fit() again to recompute it")
            _VERIFIED.add(key)
        raw, off, out = torch.from_numpy(arr), 0, {}
        itemsize = torch.finfo(self.grad_dtype).bits // 8
        for b in self.blocks:
            nbytes = e["count"] * b.size * itemsize
            out[b.name] = raw[off : off + nbytes].view(self.grad_dtype).view(e["count"], b.rows, b.cols)
            off += nbytes
        return out

    def _valid(self, e: dict) -> bool:
        try:
            self._open(e)
            return True
        except ValueError as err:
            warnings.warn(f"{err}: recomputing it", RuntimeWarning, stacklevel=3)
            return False

    def _write_shard(self, index: int, start: int, grads: list[dict], data_sha: str, skipped: list[int]) -> dict:
        arrays = [torch.cat([g[b.name] for g in grads]).cpu().contiguous() for b in self.blocks]
        buffers = [a.reshape(-1).view(torch.uint8).numpy() for a in arrays]
        p = self.path / f"shard-{index:06d}.bin"
        _write_atomic(p, buffers)
        sha = hashlib.sha256()
        for buf in buffers:
            sha.update(buf)
        e = {
            "index": index,
            "file": p.name,
            "start": start,
            "count": int(arrays[0].shape[0]),
            "batches": len(grads),
            "bytes": sum(buf.nbytes for buf in buffers),
            "sha256": sha.hexdigest(),
            "data_sha256": data_sha,
            "skipped": skipped,
        }
        _VERIFIED.add(_file_key(p, e["sha256"]))
        return e

    def _check_directory(self) -> None:
        """Refuse a directory that holds anything but this store's own files."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise ValueError(f"the gradient store path {self.path} is a file, not a directory")
        other = sorted(p.name for p in self.path.iterdir() if not _STORE_FILE.fullmatch(p.name))
        if other:
            raise ValueError(
                f"{self.path} is not empty and is not a pyinf gradient store (it holds {other[:3]}"
                f"{'...' if len(other) > 3 else ''}); choose an empty or new directory"
            )

    def _check_recomputed(self, capture: Capture, batch, e: dict, offset: int) -> None:
        """Capture `batch` (the first of shard `e`) again: its gradients must be the stored ones."""
        g, skipped = self._capture(capture, batch, offset)
        stored, end = self._open(e), offset + batch_len(batch)
        same = skipped == [i for i in e.get("skipped", []) if i < end]
        for b in self.blocks if same else ():
            new = g[b.name].float().cpu()
            old = stored[b.name][: new.shape[0]].float()
            same = same and float((new - old).norm()) <= RECOMPUTE_TOL[self.grad_dtype] * float(old.norm())
        if not same:
            raise ValueError(
                f"the gradients differ from those in the gradient store at {self.path} (training samples "
                f"{offset}..{end - 1}, recomputed): a different loss function, LoRA scaling, mask_padding or "
                f"model; delete the directory or choose another path"
            )

    def fill(self, capture, batches):
        self._check_directory()
        self.path.mkdir(parents=True, exist_ok=True)
        man = self._read_manifest() or self._new_manifest()
        for stale in self.path.glob("*.tmp"):  # a write killed before its rename
            stale.unlink(missing_ok=True)
        good = {e["index"]: e for e in man["shards"] if self._valid(e)}
        changed = not man["complete"] or len(good) != len(man["shards"])  # else: nothing to write
        man["shards"], man["complete"], man["n"] = list(good.values()), False, None
        reused, checked = 0, False
        it = iter(batches)
        first = next(it, None)
        if first is None:
            raise ValueError("the training data is empty")
        if man["batches_per_shard"] is None:
            b0 = batch_len(first)
            man["batches_per_shard"] = max(1, self.target // b0)
            man["samples_per_shard"] = man["batches_per_shard"] * b0
        k = man["batches_per_shard"]
        it = itertools.chain([first], it)
        start, orig, index = 0, 0, -1  # kept and original sample counts so far
        covered = self._read_factors(man)  # shards whose K-FAC statistics factors.bin holds (loaded)
        recorded, pending, refreshed = set(covered), 0, 0
        with self._batches_bar(batches) as pb:
            for index in itertools.count():
                group = list(itertools.islice(it, k))  # the batches of shard `index`
                if not group:
                    break
                data_sha = hashlib.sha256("".join(hash_batch(b) for b in group).encode()).hexdigest()
                count = sum(batch_len(b) for b in group)
                e = good.get(index)
                if e is not None:  # finished before: skip its batches without capturing them
                    skipped = e.get("skipped", [])
                    if (e["data_sha256"], e["start"], e["count"] + len(skipped)) != (data_sha, start, count):
                        raise ValueError(
                            f"the training data (or batch size) differs from the data the gradient store at "
                            f"{self.path} was built from (shard {index}); delete the directory or choose another path"
                        )
                    if skipped and self.nan_policy != "skip":
                        raise ValueError(
                            f"train gradient of sample {skipped[0]} contains NaN or Inf (the gradient store at "
                            f"{self.path} was built with nan_policy='skip')"
                        )
                    if not checked:
                        self._check_recomputed(capture, group[0], e, orig)
                        checked = True
                    if self.factors is not None and index not in covered:  # captured again for its statistics
                        with self._accumulating():
                            offset = orig
                            for b in group:
                                self._capture(capture, b, offset)
                                offset += batch_len(b)
                        covered.add(index)
                        refreshed += 1
                    reused += 1
                else:
                    grads, skipped, offset = [], [], orig
                    with self._accumulating(index not in covered):  # a recomputed shard's statistics may be in
                        for b in group:
                            g, sk = self._capture(capture, b, offset)
                            grads.append(g)
                            skipped += sk
                            offset += batch_len(b)
                    good[index] = e = self._write_shard(index, start, grads, data_sha, skipped)
                    man["shards"].append(e)
                    if self.factors is not None:
                        covered.add(index)
                        pending += e["bytes"]
                        if pending >= self.factors.nbytes:  # factor writes at most double the bytes written
                            self._write_factors(man, covered)
                            recorded, pending = set(covered), 0
                    self._write_manifest(man)  # after each finished shard: a kill loses one shard at most
                    changed = True
                start += e["count"]
                orig += count
                pb.update(len(group))
        n_shards = index
        if any(i >= n_shards for i in good):
            raise ValueError(
                f"the training data has fewer batches than the data the gradient store at {self.path} was "
                f"built from; delete the directory or choose another path"
            )
        if start == 0:
            raise ValueError(f"every training sample ({orig}) was skipped for NaN/Inf gradients")
        man["complete"], man["n"] = True, start
        if self.factors is not None and covered != recorded:
            self._write_factors(man, covered)
            changed = True
        if changed:
            self._write_manifest(man)
        if reused and mode(self.progress) != "off":
            again = f" (and {refreshed} of them again for their K-FAC statistics)" if refreshed else ""
            print(f"pyinf: gradient store {self.path}: reused {reused} of {n_shards} shards from an earlier fit, "
                  f"captured {n_shards - reused}{again}", file=sys.stderr, flush=True)
        self._load(man)
        return self

    def _read_factors(self, man: dict) -> set[int]:
        """Load factors.bin into `self.factors` when its statistics are of the same kind (fisher, seed) and its
        checksum holds; the shard indices it covers (empty: start from zero)."""
        entry = man.get("factors")
        if self.factors is None or entry is None:
            return set()
        if (entry["fisher"], entry["seed"]) != (self.factors.fisher, self.factors.seed):
            return set()
        p = self.path / entry["file"]
        raw = np.fromfile(p, dtype=np.uint8) if p.exists() else np.zeros(0, dtype=np.uint8)
        if raw.nbytes != entry["bytes"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            warnings.warn(f"{p} is missing or corrupt: recomputing the K-FAC statistics", RuntimeWarning, stacklevel=3)
            return set()
        self.factors.load_triangles(raw, entry["tokens"])
        return set(entry["shards"])

    def _write_factors(self, man: dict, covered: set[int]) -> None:
        """factors.bin (atomic) and its manifest entry; the manifest itself is written by the caller."""
        sha, size = hashlib.sha256(), 0

        def buffers():
            nonlocal size
            for buf in self.factors.triangles():
                sha.update(buf.tobytes())
                size += buf.nbytes
                yield buf.tobytes()

        _write_atomic(self.path / "factors.bin", buffers())
        man["factors"] = {"file": "factors.bin", "bytes": size, "sha256": sha.hexdigest(),
                          "fisher": self.factors.fisher, "seed": self.factors.seed, "shards": sorted(covered),
                          "tokens": self.factors.token_counts()}

    def _load(self, man: dict) -> None:
        self.shards = sorted(man["shards"], key=lambda e: e["index"])
        self.n = man["n"]
        self.chunk_size = max(1, max(e["count"] for e in self.shards))
        self.skipped = [i for e in self.shards for i in e.get("skipped", [])]

    def _chunks(self, blocks, first=0):
        for e in self.shards:
            if e["count"] and e["start"] + e["count"] > first:
                shard = self._open(e)
                yield e["start"], _to_device({b.name: shard[b.name] for b in blocks}, blocks, self.device)

    def state(self):
        return {"kind": self.kind, "path": str(self.path.resolve())}

    @classmethod
    def restore(cls, state, blocks, device, grad_dtype, progress=None, fingerprint=None, **_):
        self = cls(state["path"], blocks, device, grad_dtype, fingerprint, progress=progress)
        man = self._read_manifest()
        if man is None or not man["complete"]:
            raise ValueError(f"the gradient store at {self.path} is missing or incomplete; fit again")
        self._load(man)
        return self


# -- none ------------------------------------------------------------------
class RecomputeStore(Store):
    """No store: each pass re-runs the capture over the (re-iterable, unshuffled) training data."""

    kind = "none"

    def __init__(self, blocks, device, grad_dtype, progress=None):
        super().__init__(blocks, device, grad_dtype, progress)
        self.capture: Capture | None = None
        self.batches: Iterable | None = None
        self.hashes: list[str] = []
        self.sizes: list[int] = []

    def attach(self, capture: Capture, batches: Iterable) -> None:
        if iter(batches) is batches:
            raise ValueError(
                "store='none' reads the training data once per pass: pass a re-iterable "
                "(a DataLoader, a list of batches), not a one-shot iterator or generator"
            )
        self.capture, self.batches = capture, batches

    def fill(self, capture, batches):
        """One cheap pass without capture: batch sizes (n, chunk_size) and hashes (order check).

        With nan_policy="skip" this pass captures (once) to find the skipped samples.
        """
        self.attach(capture, batches)
        self.hashes, self.sizes, self.skipped = [], [], []
        orig = 0
        skip = self.nan_policy == "skip"
        factors = self.factors is not None
        desc = "capture (K-FAC factors)" if factors else "capture (find NaN/Inf)" if skip else "hash batches"
        with self._batches_bar(batches, desc) as pb, self._accumulating():
            for batch in batches:
                self.hashes.append(hash_batch(batch))
                size = batch_len(batch)
                if skip or factors:
                    _, sk = self._capture(capture, batch, orig)
                    self.skipped += sk
                    self.sizes.append(size - len(sk))
                else:
                    self.sizes.append(size)
                orig += size
                pb.update()
        if not self.sizes:
            raise ValueError("the training data is empty")
        self.n, self.chunk_size = sum(self.sizes), max(1, max(self.sizes))
        if self.n == 0:
            raise ValueError(f"every training sample ({orig}) was skipped for NaN/Inf gradients")
        return self

    def _check_batch(self, i: int, batch) -> None:
        """Batch i of this pass must be batch i of the data given to fill: same data, same order."""
        if i >= len(self.hashes):
            raise ValueError(f"the training data has more batches ({i + 1} or more) than when it was fitted "
                             f"({len(self.hashes)}); pass the same data")
        h = hash_batch(batch)
        if h == self.hashes[i]:
            return
        if h in self.hashes:
            raise ValueError(ORDER_ERROR)
        raise ValueError(f"batch {i} of the training data is not one it was fitted on: pass the same "
                         f"training data (store='none' reads it again on every pass)")

    def _chunks(self, blocks, first=0):  # every pass captures all blocks; `blocks` only filters
        start, orig, count = 0, 0, 0
        for i, batch in enumerate(self.batches):
            self._check_batch(i, batch)
            if start + self.sizes[i] <= first:  # before a resumed pass's first sample: not captured
                start, orig, count = start + self.sizes[i], orig + batch_len(batch), i + 1
                continue
            g, _ = self._capture(self.capture, batch, orig)
            c = next(iter(g.values())).shape[0]
            if c != self.sizes[i]:
                raise ValueError(f"batch {i}: its gradients changed between passes (NaN/Inf in different samples)")
            yield start, {b.name: g[b.name] for b in blocks}
            start, orig, count = start + c, orig + batch_len(batch), i + 1
        if count != len(self.hashes):
            raise ValueError(f"the training data has fewer batches ({count}) than when it was fitted "
                             f"({len(self.hashes)}); pass the same data")

    def state(self):
        return {"kind": self.kind, "hashes": self.hashes, "sizes": self.sizes, "skipped": list(self.skipped),
                "factors": self._factors_state()}

    @classmethod
    def restore(cls, state, blocks, device, grad_dtype, progress=None, capture=None, batches=None, **_):
        if batches is None:
            raise ValueError("this Attributor was fitted with store='none': pass train_data to Attributor.load")
        self = cls(blocks, device, grad_dtype, progress)
        self.attach(capture, batches)
        self.hashes, self.sizes = list(state["hashes"]), list(state["sizes"])
        self.skipped = list(state.get("skipped", []))
        self.n, self.chunk_size = sum(self.sizes), max(1, max(self.sizes))
        self._restore_factors(state, device)
        return self


STORES = {cls.kind: cls for cls in (MemoryStore, DiskStore, RecomputeStore)}


def parse_store(spec: str, model_device: torch.device) -> tuple[str, str | None]:
    """`store=` -> ("gpu" | "cpu" | "disk" | "none", path or None), resolving "auto"."""
    if not isinstance(spec, str):
        raise TypeError(f"store must be a string, got {type(spec).__name__}")
    if spec == "auto":
        spec = "gpu" if model_device.type == "cuda" else "cpu"
    if spec == "gpu" and model_device.type != "cuda":
        raise ValueError(f"store='gpu' needs the model on a CUDA device; it is on {model_device}")
    if spec in ("gpu", "cpu", "none"):
        return spec, None
    if spec.startswith("disk:") and len(spec) > len("disk:"):
        return "disk", spec[len("disk:") :]
    raise ValueError(f"unknown store {spec!r}; choose 'auto', 'gpu', 'cpu', 'none' or 'disk:PATH'")


def make_store(spec: str, *, blocks, device, grad_dtype, chunk_size=None, fingerprint=None, progress=None) -> Store:
    """An empty store for `spec` (see `parse_store`); `fill` it next."""
    kind, path = parse_store(spec, device)
    if kind == "gpu":
        return MemoryStore(blocks, device, grad_dtype, device, chunk_size, progress)
    if kind == "cpu":
        return MemoryStore(blocks, device, grad_dtype, "cpu", chunk_size, progress)
    if kind == "disk":
        return DiskStore(path, blocks, device, grad_dtype, fingerprint, chunk_size, progress)
    return RecomputeStore(blocks, device, grad_dtype, progress)
