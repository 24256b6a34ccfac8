"""`pyinf.Attributor`: from a model and its training data to influence scores.

    att = pyinf.Attributor(model, method="datainf", store="auto")
    att.fit(train_loader)                    # capture once into the store, fit the method
    scores = att.score(query_loader)         # (m, n) float32, the `pyinf.influence` convention
    best = att.score(query_loader, top_k=5)  # TopK, without the (m, n) matrix
    att.save("state.pt"); att = pyinf.Attributor.load("state.pt", model)

Gradients come from `pyinf.capture.GradientCapture` (the same for training
data and queries); the method is the same object `pyinf.influence` uses, fed
from a store (`pyinf.store`) instead of tensors, so the scores are those of
`pyinf.influence(captured_train, captured_query, chunk_size=<the store's>)`.
Each phase (capture, "datainf: fit", "datainf: score", ...) shows one progress
bar, or one log line when stderr is not a terminal (`pyinf.progress`). `score(top_k=k)` keeps a running
top-k per query over the chunks of the scoring pass, never the (m, n) matrix
(it scores through `precondition` and `score_chunks`; for "exact" with
Woodbury blocks that path builds H, and can differ from the full matrix in the
last digits).

Data parallel under `torchrun` (`pyinf.distributed`): with a process group
initialised, `fit` shards the training batches across the ranks (contiguous
runs by batch index; a disk store writes `PATH/rank{r}-of-{W}`), the methods
all-reduce their statistics, queries are captured on rank 0 and broadcast,
each rank scores its shard, and rank 0 returns the `(m, n)` scores in the
original training order (the other ranks return None). `save`/`load` are
single-process.

Faults:
- `nan_policy="error"` (default): a NaN/Inf training loss or gradient is a
  ValueError naming the sample (its index in the training data; under
  torchrun, in the rank's shard) and, for a gradient, the block.
  `nan_policy="skip"`: those samples are left
  out of the store and of every statistic (the other samples' scores are those
  of a run without them), `att.skipped` lists their indices, and their columns
  of `score`/`self_influence` are NaN (the matrix keeps the data's indexing;
  `score(top_k=k)` never returns them). A NaN/Inf loss is zeroed before the
  backward, so the capture of the rest of its batch goes on. Query losses and
  gradients are always checked; a query with an all-zero gradient (no target
  tokens) is a RuntimeWarning (its scores are 0). NaN/Inf model weights are a
  ValueError naming the parameter, under either policy.
- A model that changed since `fit` (weights or LoRA scaling: the fingerprint
  of `pyinf.store.fingerprint`) is refused by `score`/`self_influence`, and a
  saved state by `load` on another model; `check_model=False` overrides both.
- Out of memory (`pyinf.oom`): a capture retries the batch in halves (kept for
  the next batches); a pass (fit statistics, scoring, self-influence) is
  retried with half the samples per chunk; each warns once. On one process
  only for the passes (see `pyinf.distributed`).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data import default_collate

from .backends import get_backend
from .blocks import Block, check_finite
from .methods import get_method
from .oom import HalvingCapture, is_oom, release_memory
from .progress import bar
from .progress import check as check_progress
from .store import ACCEPTED, LOSS_KEY, STORES, fingerprint, make_store, parse_store, resolve_grad_dtype

SAVE_FORMAT = "pyinf-attributor"
SAVE_VERSION = 2
NAN_POLICIES = ("error", "skip")
# What a rebuilt DataLoader keeps of the user's (`_in_dataset_order`); the newer ones only where they exist.
_LOADER_KEYS = ("num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
                "multiprocessing_context", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


class TopK(NamedTuple):
    """Per query, the k most helpful (most negative) and most harmful (most positive) scores, each (m, k)."""

    helpful_scores: torch.Tensor
    helpful_indices: torch.Tensor
    harmful_scores: torch.Tensor
    harmful_indices: torch.Tensor


def _make_capture(model, blocks, loss):
    from .capture import GradientCapture  # the capture module is heavy (transformers); import on use

    return GradientCapture(model, blocks=blocks, loss=loss)


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


def _to_device(batch, device: torch.device):
    if isinstance(batch, Mapping):
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _merge_top(vals, idx, new_vals, new_idx, k, largest):
    v, i = torch.cat([vals, new_vals], dim=1), torch.cat([idx, new_idx], dim=1)
    top, pos = v.topk(min(k, v.shape[1]), dim=1, largest=largest, sorted=True)
    return top, i.gather(1, pos)


class Attributor:
    """Influence of training data on queries for one model (see the module docstring).

    Args:
        model: a torch module (e.g. a PEFT-wrapped Hugging Face model).
        method: "datainf", "hyperinf", "tracin", "lissa", "exact", "kfac", "ekfac" or "forward"
            (Forward-INF, `pyinf.forward`: options lr (required), steps,
            optimizer, queries_per_pass; fit keeps the training batches and
            computes the base losses, score runs the forward passes; no store,
            no save/self_influence; damping is unused). kfac/ekfac: the capture
            also accumulates the K-FAC token statistics (`pyinf.factors`) into the
            store; options fisher ("empirical" or "true": labels drawn from the
            model, seeded by seed, which replace batch["labels"] for the
            statistics and go through the same `loss`) and seed.
        blocks: "lora" (what the PEFT adapter trains: LoRA matrices, modules_to_save
            heads, trainable biases; see `pyinf.capture`) or a list of names.
        loss: None (the Hugging Face per-sample loss) or `loss(model, batch) -> (B,)`.
        store: "auto", "gpu", "cpu", "disk:PATH" or "none" (see `pyinf.store`).
        grad_dtype: storage dtype, torch.bfloat16 or torch.float32
            (default: bfloat16 on CUDA, float32 on CPU).
        batch_size: batch size when the data is a Dataset or (dataset, collate_fn).
        damping, damping_mode, backend, **options: as in `pyinf.influence`,
            validated here, at construction.
        progress: None (auto: a bar per phase on a terminal, one line per phase
            otherwise), True (bars always) or False (nothing); see `pyinf.progress`.
        chunk_size: training samples per chunk/shard (default ~256 MB of
            gradients; "none" uses one batch per chunk).
        nan_policy: "error" (a NaN/Inf training loss or gradient is a ValueError
            naming the sample, and the block) or "skip" (such samples are left
            out; their indices in `self.skipped`, their score columns NaN). Not
            for "forward".
        distributed: None (default): data parallel when a torch.distributed
            process group is initialised; False: never; True: require one.
        mask_padding: as in `pyinf.capture.GradientCapture` (default False).
        check_model: True (default): `score`/`self_influence` refuse a model
            whose weights (or LoRA scaling) changed since `fit` (a fingerprint,
            `pyinf.store.fingerprint`); False scores anyway.

    Data: one batch (a dict of tensors, e.g. `tokenizer(..., return_tensors="pt")`
    with labels), a list of batches, a list of per-example dicts (stacked
    `batch_size` at a time by `default_collate`), a Dataset, (dataset,
    collate_fn) or a DataLoader. Score columns (query rows) follow the data's
    order, and a DataLoader's dataset order: a shuffled loader (shuffle=True)
    is read as with shuffle=False; a loader with another non-sequential
    sampler (weighted, subset, distributed, a custom batch sampler) is refused.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        method: str = "datainf",
        blocks="lora",
        loss=None,
        store: str = "auto",
        grad_dtype=None,
        batch_size: int = 8,
        damping: float = 0.1,
        damping_mode: str = "relative",
        backend: str = "auto",
        progress: bool | None = None,
        chunk_size: int | None = None,
        nan_policy: str = "error",
        distributed: bool | None = None,
        mask_padding: bool = False,
        check_model: bool = True,
        **options,
    ):
        self.model = model
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if nan_policy == "skip" and method == "forward":
            raise ValueError("nan_policy='skip' is not available for method 'forward' (it keeps no gradients)")
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        kind, _ = parse_store(store, self.device)
        self.config = {
            "method": method,
            "blocks": blocks if isinstance(blocks, str) else list(blocks),
            "store": store if store.startswith("disk:") else kind,
            "grad_dtype": resolve_grad_dtype(grad_dtype, self.device),
            "batch_size": batch_size,
            "damping": damping,
            "damping_mode": damping_mode,
            "backend": backend,
            "chunk_size": chunk_size,
            "nan_policy": nan_policy,
            "mask_padding": bool(mask_padding),
            "options": dict(options),
        }
        self.check_model = bool(check_model)
        self.distributed = distributed
        self.loss = loss
        check_progress(progress)
        self.progress = progress
        self.config["progress"] = progress
        if method == "forward":
            from .forward import attributor_options

            attributor_options(options, batch_size)  # validates lr, steps, optimizer now
        else:
            self._new_method()  # validates the method name, damping and options now
        self.blocks: list[Block] | None = None
        self._store = None
        self._method = None
        self._cap = None
        self._comm = None  # pyinf.distributed.Comm while data parallel
        self._halving = HalvingCapture(self._capture_one)  # OOM: smaller micro-batches
        self._losses: torch.Tensor | None = None  # the per-sample losses of the last capture call
        self._fingerprint: str | None = None  # of the model at fit (`pyinf.store.fingerprint`)
        self._warned_oom = False
        self.skipped: list[int] = []  # training samples left out (nan_policy="skip"), global indices
        self._kept_index: torch.Tensor | None = None  # original index of each kept sample, when some are skipped
        self._n_orig = 0

    # -- plumbing ----------------------------------------------------------
    def _new_method(self):
        c = self.config
        cls = get_method(c["method"])
        backend = get_backend(c["backend"], self.device)
        return cls(backend, damping=c["damping"], damping_mode=c["damping_mode"], **c["options"])

    def _model_fingerprint(self) -> str:
        return fingerprint(self.model, self.blocks, self.config["grad_dtype"],
                           {"mask_padding": self.config["mask_padding"]})

    def _check_model(self) -> None:
        if self.check_model and self._model_fingerprint() != self._fingerprint:
            raise ValueError(
                "the model changed since fit (its weights or LoRA scaling differ): the scores would mix "
                "gradients of two models; fit again, or pass check_model=False to the Attributor to score anyway"
            )

    def _recording_loss(self, model, batch) -> torch.Tensor:
        """The loss, with non-finite per-sample values kept aside (`_losses`) and zeroed for the backward.

        The capture then never stops at a NaN loss: the store refuses or skips
        the sample by its global index (`pyinf.store.LOSS_KEY`).
        """
        from .losses import default_loss

        losses = (self.loss if self.loss is not None else default_loss)(model, batch)
        self._losses = None
        if isinstance(losses, torch.Tensor) and losses.dim() == 1:
            self._losses = losses.detach()
            finite = torch.isfinite(self._losses)
            losses = torch.where(finite, losses, torch.zeros((), dtype=losses.dtype, device=losses.device))
        return losses

    def _capture_one(self, batch) -> dict[str, torch.Tensor]:
        """Gradients and losses (`LOSS_KEY`) of one (micro-)batch; NaN weights are named as such."""
        self._losses = None
        g = self._cap(batch)
        losses = self._losses
        if losses is None:  # a capture that did not call the loss (a test double): nothing to add
            return g
        if not bool(torch.isfinite(losses).all()):  # bad data, or bad weights: name the weights
            bad = [n for n, p in self.model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise ValueError(f"the model's parameter {bad[0]!r}{more} contains NaN or Inf: every loss and "
                                 f"gradient would; load finite weights")
        return {**g, LOSS_KEY: losses}

    @contextmanager
    def _capturing(self):
        """Hooks on the model for the duration of one public call."""
        cap = _make_capture(self.model, self.config["blocks"], self._recording_loss)
        cap.mask_padding = self.config["mask_padding"]  # GradientCapture reads it on every call
        self._cap = cap
        try:
            got = list(cap.blocks)
            if self.blocks is not None and got != self.blocks:
                raise ValueError(f"the model's blocks changed since fit: {got} != {self.blocks}")
            self.blocks = got
            yield cap
        finally:
            self._cap = None
            cap.close()

    def _collect_factors(self, store) -> None:
        """kfac/ekfac: the capture accumulates the K-FAC token statistics into the store while it fills
        (`pyinf.factors`); fisher="true" draws the labels of those statistics from the model (seeded)."""
        cls = get_method(self.config["method"])
        if not cls.needs_factors:
            return
        from .factors import FactorStats
        from .losses import default_loss, sample_labels

        opts = {**cls.options, **self.config["options"]}
        store.factors = FactorStats(self.blocks, self.device, opts["fisher"], opts["seed"])
        self._cap.factors = store.factors
        if opts["fisher"] == "true":
            self._cap.fisher_batch = lambda model, batch: sample_labels(model, batch, opts["seed"])
            self._cap.fisher_loss = self.loss if self.loss is not None else default_loss

    def _sampled_gradients(self, store, data) -> None:
        """ekfac with fisher="true": its Λ* pass reads the per-sample gradients of labels drawn from the
        model (`store.fisher_gradients`, a store="none" source that captures them again on each pass)."""
        cls = get_method(self.config["method"])
        opts = {**cls.options, **self.config["options"]}
        if not cls.refits_eigenvalues or opts["fisher"] != "true":
            return
        from .losses import sample_labels
        from .store import RecomputeStore

        def capture(batch):
            with torch.no_grad():
                drawn = sample_labels(self.model, _to_device(batch, self.device), opts["seed"])
            return self._capture_batch(drawn)

        sampled = RecomputeStore(store.blocks, self.device, self.config["grad_dtype"], self.progress)
        sampled.nan_policy = self.config["nan_policy"]
        sampled.fill(capture, data)
        sampled.comm, sampled.offset = store.comm, store.offset
        store.fisher_gradients = sampled

    def _capture_batch(self, batch) -> dict[str, torch.Tensor]:
        return self._halving(_to_device(batch, self.device))

    def _resolve_comm(self):
        from . import distributed

        if self.distributed is False:
            return None
        comm = distributed.current()
        if comm is None and self.distributed:
            raise ValueError("distributed=True, but no torch.distributed process group is initialised")
        return comm

    def _everywhere(self, fn, what: str):
        """Run `fn`; under a process group, an exception on any rank is raised on every rank."""
        comm = self._comm
        if comm is None:
            return fn()
        err, out = None, None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
            if isinstance(e, ValueError):
                err = ValueError(f"rank {comm.rank} ({what}; sample indices count from the start of its shard): {e}")
                err.__cause__ = e
        comm.raise_if_any(err)
        return out

    def _retrying(self, store, fn):
        """`fn()` (one or more passes over `store`), retried with halved chunks on out of memory."""
        while True:
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - only out-of-memory errors are retried
                if self._comm is not None or not is_oom(err):
                    raise
                try:
                    size = store.split_chunks()
                except ValueError:
                    raise err from None
            release_memory()
            if not self._warned_oom:
                self._warned_oom = True
                warnings.warn(
                    f"out of memory in a pass over the training gradients: retrying with chunks of {size} "
                    f"samples (halving again if needed; reported once)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def _place(self, store) -> None:
        """Global indices: this store's offset among the ranks, the skipped samples, n."""
        comm = self._comm
        info = (store.n, store.n_orig, list(store.skipped))
        infos = [info] if comm is None else comm.all_gather_object(info)
        rank = 0 if comm is None else comm.rank
        store.comm, store.offset = comm, sum(i[0] for i in infos[:rank])
        skipped, orig = [], 0
        for n, n_orig, sk in infos:
            skipped += [orig + i for i in sk]
            orig += n_orig
        self.skipped, self._n_orig = skipped, orig
        self._kept_index = None
        if skipped:
            keep = torch.ones(orig, dtype=torch.bool)
            keep[skipped] = False
            self._kept_index = keep.nonzero().flatten()

    def _finish(self, S: torch.Tensor) -> torch.Tensor | None:
        """Local `(..., n_kept_local)` columns -> `(..., n)` in the training order (rank 0; None elsewhere)."""
        if self._comm is not None:
            S = self._comm.gather_cols(S)
            if S is None:
                return None
        if self._kept_index is not None:
            out = torch.full((*S.shape[:-1], self._n_orig), float("nan"), dtype=S.dtype, device=S.device)
            out[..., self._kept_index.to(S.device)] = S
            S = out
        return S

    def _batches(self, data):
        """Data as an iterable of batches, in the data's order (the forms in the class docstring)."""
        bs = self.config["batch_size"]
        if isinstance(data, Mapping):  # one batch (a dict, a tokenizer's BatchEncoding)
            return [data]
        if isinstance(data, (str, bytes, torch.Tensor)):
            raise TypeError(f"cannot score a {type(data).__name__}: {ACCEPTED}")
        if isinstance(data, tuple) and len(data) == 2 and callable(data[1]):
            return DataLoader(data[0], batch_size=bs, shuffle=False, collate_fn=data[1])
        if isinstance(data, (list, tuple)) and data and _is_example(data[0]):
            return DataLoader(list(data), batch_size=bs, shuffle=False, collate_fn=_collate_examples)
        if isinstance(data, DataLoader):
            return _in_dataset_order(data)
        if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
            return DataLoader(data, batch_size=bs, shuffle=False)
        return data

    def _check_fitted(self):
        if self._method is None:
            raise RuntimeError("call fit(train_data) (or Attributor.load) first")

    # -- public ------------------------------------------------------------
    def fit(self, train_data) -> "Attributor":
        """Capture the training gradients into the store and fit the method (this rank's shard, data parallel)."""
        data = self._batches(train_data)
        c = self.config
        self._comm = comm = self._resolve_comm()
        what = "fit"
        if comm is not None:
            from .distributed import ShardedBatches

            data = self._everywhere(lambda: ShardedBatches(data, comm.rank, comm.world), "sharding the data")
            what = f"fit on training batches {data.lo}..{data.hi - 1}"
        if c["method"] == "forward":
            return self._fit_forward(data, what)
        spec = c["store"]
        if comm is not None and spec.startswith("disk:"):
            spec = "disk:" + str(Path(spec[len("disk:") :]) / f"rank{comm.rank}-of-{comm.world}")
        self.blocks = None  # a new fit takes the blocks the capture finds now
        with self._capturing():
            fp = self._model_fingerprint()
            store = make_store(
                spec,
                blocks=self.blocks,
                device=self.device,
                grad_dtype=c["grad_dtype"],
                chunk_size=c["chunk_size"],
                fingerprint=fp,
                progress=self.progress,
            )
            store.nan_policy = c["nan_policy"]
            self._collect_factors(store)
            self._everywhere(lambda: store.fill(self._capture_batch, data), what)
            self._place(store)
            self._sampled_gradients(store, data)

            def fit_method():
                method = self._new_method()
                with store.phase(f"{c['method']}: fit"):
                    return method.fit(store)

            method = self._retrying(store, fit_method)
        self._store, self._method, self._fingerprint = store, method, fp
        return self

    def query_grads(self, query_data) -> dict[str, torch.Tensor]:
        """Captured query gradients {name: (m, rows, cols)} float32 on the model's device."""
        parts, zero = [], []
        with self._capturing(), bar("capture queries", None, self.progress, unit="batch") as pb:
            m = 0
            for batch in self._batches(query_data):
                g = self._capture_batch(batch)
                losses = g.get(LOSS_KEY)
                if losses is not None and not bool(torch.isfinite(losses).all()):
                    i = m + int((~torch.isfinite(losses)).nonzero()[0, 0])
                    raise ValueError(f"the loss of query sample {i} is NaN or Inf")
                for b in self.blocks:
                    check_finite(b.name, g[b.name], "query gradient", m)
                parts.append({b.name: g[b.name].detach().reshape(-1, b.rows, b.cols) for b in self.blocks})
                nonzero = sum(parts[-1][b.name].flatten(1).ne(0).any(dim=1) for b in self.blocks)
                zero += (m + (nonzero == 0).nonzero().flatten()).tolist()
                m += parts[-1][self.blocks[0].name].shape[0]
                pb.update()
        if not parts:
            raise ValueError("the query data is empty")
        if zero:
            warnings.warn(
                f"query samples {zero[:10]}{'...' if len(zero) > 10 else ''} have an all-zero gradient (no target "
                f"tokens, e.g. every label -100?): their scores are all 0",
                RuntimeWarning,
                stacklevel=3,
            )
        return {b.name: torch.cat([p[b.name] for p in parts]) for b in self.blocks}

    def _shared_query_grads(self, query_data) -> dict[str, torch.Tensor]:
        """Query gradients, captured once: on rank 0 and broadcast when data parallel."""
        comm = self._comm
        if comm is None:
            return self.query_grads(query_data)
        V = self._everywhere(lambda: self.query_grads(query_data) if comm.rank == 0 else None, "query gradients")
        return comm.broadcast_tensors(V, self.device)

    def score(self, query_data, top_k: int | None = None, *, per_block: bool = False, out=None):
        """`(m, n)` float32 scores (positive = harmful); with `top_k=k` a `TopK` of (m, k) tensors.

        `per_block=True`: `{block: (m, n)}`, each block's share (they sum to the scores; see
        `pyinf.methods.base`); not for "forward", whose scores are loss differences after moving
        every attributed block at once and do not split into block shares (to first order they are
        tracin's: use method="tracin" for its per-block shares).
        `out=PATH`: the scores are written to a `pyinf.scores.ScoreFile` at PATH (a directory) chunk by
        chunk, never held in memory, and that ScoreFile is returned; an interrupted write resumes at
        its first missing chunk (see `pyinf.scores`). One process only.

        Data parallel: on rank 0; None on the other ranks.
        """
        self._check_fitted()
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if per_block and (top_k is not None or out is not None):
            raise ValueError("per_block=True returns every block's (m, n) share: it does not combine with top_k or out")
        if top_k is not None and out is not None:
            raise ValueError("out= writes the whole (m, n) scores: take the top k from the file (ScoreFile.top_k)")
        if self.config["method"] == "forward" and (per_block or out is not None):
            raise ValueError(
                "per_block is not available for method 'forward': its scores are loss differences after moving "
                "every attributed block at once, which do not split into block shares (to first order they are "
                "tracin's: use method='tracin', per_block=True)" if per_block else
                "out= is not available for method 'forward' (it keeps no gradients to stream)")
        self._check_model()
        if self.config["method"] == "forward":
            S = self._finish(self._method.score(self._batches(query_data)))
            if S is None:
                return None
            return S if top_k is None else TopK(*self.top_k(S, top_k, True), *self.top_k(S, top_k, False))
        if out is not None:
            return self._score_to_file(query_data, out)
        V = self._shared_query_grads(query_data)
        name, store = self.config["method"], self._store
        with self._capturing():  # store="none" captures the training data again in these passes
            if top_k is None:

                def run():
                    with store.phase(f"{name}: score"):
                        return self._method.influence(V, per_block=per_block)  # what pyinf.influence runs

                S = self._finish(self._retrying(store, run).float())
                if S is None or not per_block:
                    return S
                pos = {b.name: k for k, b in enumerate(self._method.blocks)}
                return {b.name: S[pos[b.name]] for b in self.blocks}

            def run_top():
                with store.phase(f"{name}: score"):
                    return self._top_k_streamed(self._method.precondition(V), top_k)

            return self._retrying(store, run_top)

    def _score_to_file(self, query_data, path):
        """`score(out=path)`: the scoring pass written to a `pyinf.scores.ScoreFile`, resumed where an
        earlier run on the same fit and queries stopped (its saved H: no query capture, no precondition)."""
        from .scores import ScoreFile, digest_batches

        if self._comm is not None:
            raise ValueError("score(out=...) is single-process: score without a process group (distributed=False)")
        queries = list(self._batches(query_data))  # read twice: digest, capture
        digest, m = digest_batches(queries)
        meta = {"method": self.config["method"], "model": self._fingerprint, "queries": digest,
                "config": {k: v for k, v in self.config.items() if k not in ("progress", "store")},
                "train": {"n": self._n_orig, "skipped": self.skipped}}
        sf = ScoreFile.create_or_resume(path, shape=(m, self._n_orig), meta=meta, skipped=self.skipped)
        if sf.complete:
            return sf
        H = sf.saved_preconditioned(self.device)
        V = self.query_grads(queries) if H is None else None
        name, store = self.config["method"], self._store
        with self._capturing():  # store="none" captures the training data again in these passes

            def run():
                nonlocal H
                with store.phase(f"{name}: score"):
                    if H is None:
                        H = self._method.precondition(V)
                        sf.save_preconditioned(H)
                    return sf.write_pass(self._method.score_chunks(store, H, start=sf.resume_at))

            return self._retrying(store, run)

    def _top_k_streamed(self, H, k: int) -> TopK | None:
        m = next(iter(H.values())).shape[0]
        empty = torch.empty(m, 0, device=self.device)
        none = torch.empty(m, 0, dtype=torch.long, device=self.device)
        hv, hi, av, ai = empty, none, empty, none
        offset = self._store.offset if self._comm is not None else 0
        for start, cols in self._method.score_chunks(self._store, H):
            cols = cols.float()
            idx = torch.arange(offset + start, offset + start + cols.shape[1], device=cols.device).expand(m, -1)
            hv, hi = _merge_top(hv, hi, cols, idx, k, largest=False)
            av, ai = _merge_top(av, ai, cols, idx, k, largest=True)
        if self._comm is not None:  # every rank's top k, merged on rank 0
            parts = [self._comm.gather_cols(t) for t in (hv, hi, av, ai)]
            if parts[0] is None:
                return None
            hv, hi = _merge_top(empty, none, parts[0], parts[1], k, largest=False)
            av, ai = _merge_top(empty, none, parts[2], parts[3], k, largest=True)
        if self._kept_index is not None:  # kept-sample positions -> the data's indices
            kept = self._kept_index.to(hi.device)
            hi, ai = kept[hi], kept[ai]
        return TopK(hv, hi, av, ai)

    def token_scores(self, query_data, train_data) -> torch.Tensor:
        """`(m, n_t, T)` float32: the share of each position t of each training sequence in its scores
        (they sum over t to `score`'s columns); `train_data` (any sequences, in the data forms above;
        n_t of them, T the longest, shorter batches padded with 0) is captured again, one forward and
        backward a batch, evaluating `−Σ_b u_tᵀ H_b v_t` from the captured factors without per-token
        gradients. The math, what a token's share means, and the blocks it takes: `pyinf.token_scores`.
        One process only; not for "forward" (no preconditioned queries)."""
        from .token_scores import pad_positions

        self._check_fitted()
        self._refuse_forward("token_scores")
        if self._comm is not None:
            raise ValueError("token_scores is single-process: call it without a process group (distributed=False)")
        self._check_model()
        V = self.query_grads(query_data)
        name, store = self.config["method"], self._store
        parts, i = [], 0
        with self._capturing() as cap:  # store="none" captures the training data again in precondition's passes

            def run():
                with store.phase(f"{name}: precondition"):
                    return self._method.precondition(V)

            H = self._retrying(store, run)
            with bar("token scores", None, self.progress, unit="batch") as pb:
                for batch in self._batches(train_data):
                    S = cap.token_scores(_to_device(batch, self.device), H)
                    if self._losses is not None and not bool(torch.isfinite(self._losses).all()):
                        raise ValueError(f"the loss of sample {i + int((~torch.isfinite(self._losses)).nonzero()[0, 0])} "
                                         f"of train_data is NaN or Inf")
                    parts.append(S.float())
                    i += S.shape[1]
                    pb.update()
        if not parts:
            raise ValueError("train_data is empty")
        return pad_positions(parts)

    def self_influence(self) -> torch.Tensor | None:
        """`(n,)` float32: −g_iᵀ H⁻¹ g_i (≤ 0; rank by magnitude). Data parallel: rank 0 (None elsewhere)."""
        self._check_fitted()
        self._refuse_forward("self_influence")
        self._check_model()
        store = self._store
        with self._capturing():

            def run():
                with store.phase(f"{self.config['method']}: self-influence"):
                    return self._method.self_influence(store)

            return self._finish(self._retrying(store, run).float())

    @staticmethod
    def top_k(scores: torch.Tensor, k: int, helpful: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k most helpful (most negative) or harmful scores along the last dim."""
        return scores.topk(min(k, scores.shape[-1]), dim=-1, largest=not helpful, sorted=True)

    @property
    def n(self) -> int:
        """Training samples (all ranks; skipped ones included): the columns of `score`."""
        self._check_fitted()
        return self._n_orig

    # -- Forward-INF (pyinf.forward) ----------------------------------------
    def _fit_forward(self, data, what: str = "fit") -> "Attributor":
        """Forward-INF; data parallel, each rank keeps its shard's batches and computes their losses."""
        from .forward import ForwardInfluence, attributor_options

        c = self.config
        self.blocks = None
        engine = ForwardInfluence(self.model, blocks=c["blocks"], loss=self.loss, batch_size=c["batch_size"],
                                  progress=self.progress, **attributor_options(c["options"], c["batch_size"]))
        self._everywhere(lambda: engine.fit(data), what)
        self.blocks, self._store, self._method = list(engine.blocks), None, engine
        self._fingerprint = self._model_fingerprint()
        self.skipped, self._kept_index = [], None
        self._n_orig = engine.n if self._comm is None else sum(self._comm.all_ints(engine.n))
        return self

    def _refuse_forward(self, what: str) -> None:
        if self.config["method"] == "forward":
            raise ValueError(f"{what} is not available for method 'forward' (it keeps no gradients)")

    # -- persistence -------------------------------------------------------
    def save(self, path) -> None:
        """One file: config, block list, the method's statistics and the store.

        Memory stores ("gpu"/"cpu") save their gradients in the file (scoring
        new queries reads them); a disk store saves its directory (keep it);
        "none" saves the batch hashes (pass `train_data` to `load`).
        """
        self._check_fitted()
        self._refuse_forward("save")
        if self._comm is not None:
            raise ValueError("save under a torch.distributed process group is not supported: fit on one process "
                             "(distributed=False) to save, or keep the disk store and fit again (it resumes)")
        state = {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "config": self.config,
            "blocks": [(b.name, b.rows, b.cols) for b in self.blocks],
            "fingerprint": self._fingerprint,
            # Every statistic the method fitted (λ, norms, factors, inverses, ...), whatever the method.
            "method": _map_tensors(
                {k: v for k, v in vars(self._method).items() if k not in ("backend", "train", "blocks", "groups", "comm")},
                lambda t: t.cpu(),
            ),
            "store": self._store.state(),
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, model, *, loss=None, train_data=None, progress="saved", check_model=True) -> "Attributor":
        """A fitted Attributor from `save`; `model` must be the model it was fitted on.

        A model whose fingerprint (`pyinf.store.fingerprint`: weights, LoRA
        scaling, blocks) differs from the saved one is a ValueError;
        `check_model=False` loads anyway (and sets it on the Attributor).
        `progress` is the saved setting unless given (None, True or False)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != SAVE_FORMAT or state.get("version") != SAVE_VERSION:
            raise ValueError(f"{path}: not a pyinf Attributor state of version {SAVE_VERSION}")
        c = state["config"]
        if progress == "saved":
            progress = c.get("progress")
        keys = ("method", "blocks", "store", "grad_dtype", "batch_size", "damping", "damping_mode", "backend", "chunk_size")
        keys += ("nan_policy", "mask_padding")
        self = cls(model, loss=loss, progress=progress, distributed=False, check_model=check_model,
                   **{k: c[k] for k in keys}, **c["options"])
        self.blocks = [Block(*b) for b in state["blocks"]]
        self._fingerprint = state["fingerprint"]
        if check_model and self._model_fingerprint() != self._fingerprint:
            raise ValueError(
                f"{path} was fitted on another model (its weights, LoRA scaling or blocks differ from this one's); "
                f"pass the model it was fitted on, or check_model=False to load anyway"
            )
        st = state["store"]
        self._store = STORES[st["kind"]].restore(
            st,
            self.blocks,
            self.device,
            c["grad_dtype"],
            progress=progress,
            fingerprint=self._fingerprint if check_model else None,
            capture=self._capture_batch,
            batches=None if train_data is None else self._batches(train_data),
        )
        self._store.nan_policy = self.config["nan_policy"]
        self._place(self._store)
        method = self._new_method()
        vars(method).update(_map_tensors(state["method"], lambda t: t.to(self.device)))
        method.blocks, method.groups, method.train = self._store.blocks, self._store.groups, self._store
        self._method = method
        return self
