"""Batches: what pyinf accepts as data, and the helpers that read batches.

A batch is a mapping of tensors with the samples in dimension 0 (what a
DataLoader, a collate_fn or `tokenizer(..., return_tensors="pt")` gives);
lists of length B ride along. Data: one batch (a dict of tensors, e.g. `tokenizer(..., return_tensors="pt")`
with labels), a list of batches, a list of per-example dicts (stacked
`batch_size` at a time by `default_collate`), a Dataset, (dataset,
collate_fn) or a DataLoader. Score columns (query rows) follow the data's
order, and a DataLoader's dataset order: a shuffled loader (shuffle=True)
is read as with shuffle=False; a loader with another non-sequential
sampler (weighted, subset, distributed, a custom batch sampler) is refused.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data import default_collate

__all__ = ["ACCEPTED", "as_batches", "batch_len", "slice_batch"]

ACCEPTED = (
    "a batch is a dict of tensors with the samples in dimension 0 (what a DataLoader, a collate_fn or "
    "tokenizer(..., return_tensors='pt') gives); pass one batch, a list of batches, a list of per-example "
    "dicts, a Dataset, (dataset, collate_fn) or a DataLoader"
)
# What a rebuilt DataLoader keeps of the user's (`_in_dataset_order`); the newer ones only where they exist.
_LOADER_KEYS = ("num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
                "multiprocessing_context", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


def batch_len(batch) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    what = type(batch).__name__ + (" without tensors" if isinstance(batch, (Mapping, list, tuple)) else "")
    raise TypeError(f"cannot tell the batch size of a {what}: {ACCEPTED}")


def slice_batch(batch: Any, start: int, stop: int, size: int) -> Any:
    """Samples `start:stop` of a batch of `size` samples (tensors/lists with that length in dim 0)."""

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size:
            return v[start:stop]
        if isinstance(v, (list, tuple)) and len(v) == size:
            return type(v)(v[start:stop])
        return v

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def _in_dataset_order(loader: DataLoader) -> DataLoader:
    """`loader`, read in its dataset's order: score columns (query rows) are dataset indices.

    A shuffled loader (shuffle=True) is rebuilt with shuffle=False, everything
    else kept (per-sample gradients do not depend on which samples share a
    batch); a sampler whose order pyinf cannot map back is refused.
    """
    sampler, batches = loader.sampler, loader.batch_sampler
    if isinstance(loader.dataset, IterableDataset) or (
        type(sampler) is SequentialSampler and (batches is None or type(batches) is BatchSampler)
    ):
        return loader
    shuffled = (type(sampler) is RandomSampler and not sampler.replacement
                and sampler.num_samples == len(loader.dataset) and type(batches) is BatchSampler)
    if not shuffled:
        custom = type(batches).__name__ if batches is not None and type(batches) is not BatchSampler else None
        raise ValueError(
            f"a DataLoader with a {custom or type(sampler).__name__}: pyinf returns scores in the dataset's "
            f"order and cannot map this {'batch sampler' if custom else 'sampler'}'s order back; pass "
            f"DataLoader(dataset, batch_size=..., shuffle=False, collate_fn=...) (a torch.utils.data.Subset for "
            f"part of it), the dataset itself, or a list of batches (scored in the list's order)"
        )
    kept = {k: getattr(loader, k) for k in _LOADER_KEYS if hasattr(loader, k)}
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, **kept)


def _is_example(item) -> bool:
    """One example, not a batch: 1-D (or flat list) `input_ids`; without them, tensors of at most
    one dimension, one of them a scalar (a batch holds no 0-d tensor)."""
    if not isinstance(item, Mapping):
        return False
    ids = item.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return ids.dim() == 1
    if isinstance(ids, (list, tuple)):
        return not ids or not isinstance(ids[0], (list, tuple, torch.Tensor))
    dims = [v.dim() for v in item.values() if isinstance(v, torch.Tensor)]
    return bool(dims) and max(dims) <= 1 and min(dims) == 0


def _collate_examples(examples: list) -> dict:
    """Per-example dicts -> one batch, stacked by torch's default_collate (equal shapes only)."""
    try:
        return default_collate([{k: torch.as_tensor(v) for k, v in ex.items()} for ex in examples])
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(
            f"per-example dicts are stacked into batches with torch's default_collate, which needs the examples "
            f"of a batch to have equal shapes and numeric values ({err}); pass (examples, collate_fn) with a "
            f"padding collator, e.g. transformers.DataCollatorWithPadding(tokenizer) (class labels) or "
            f"DataCollatorForSeq2Seq(tokenizer) (token labels), or padded batches"
        ) from None


def as_batches(data, batch_size: int):
    """Data as an iterable of batches, in the data's order (the forms in the module docstring)."""
    if isinstance(data, Mapping):  # one batch (a dict, a tokenizer's BatchEncoding)
        return [data]
    if isinstance(data, (str, bytes, torch.Tensor)):
        raise TypeError(f"cannot score a {type(data).__name__}: {ACCEPTED}")
    if isinstance(data, tuple) and len(data) == 2 and callable(data[1]):
        return DataLoader(data[0], batch_size=batch_size, shuffle=False, collate_fn=data[1])
    if isinstance(data, (list, tuple)) and data and _is_example(data[0]):
        return DataLoader(list(data), batch_size=batch_size, shuffle=False, collate_fn=_collate_examples)
    if isinstance(data, DataLoader):
        return _in_dataset_order(data)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data
