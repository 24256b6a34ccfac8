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

Files: `base.py` (the `Store` base class, dtypes, hashes, the fingerprint), `memory.py`,
`disk.py` (with the on-disk format), `recompute.py`.
"""
from __future__ import annotations

import torch

from .base import (GRAD_DTYPES, LOSS_KEY, Store, default_chunk_size, dtype_name, fingerprint, hash_batch,
                   per_sample_bytes, resolve_grad_dtype)
from .disk import DiskStore
from .memory import MemoryStore
from .recompute import RecomputeStore

__all__ = ["Store", "MemoryStore", "DiskStore", "RecomputeStore", "STORES", "parse_store", "make_store",
           "GRAD_DTYPES", "LOSS_KEY", "default_chunk_size", "dtype_name", "fingerprint", "hash_batch",
           "per_sample_bytes", "resolve_grad_dtype"]

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
