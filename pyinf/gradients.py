"""Training gradients captured once, analysed many times: `capture_gradients` -> `TrainGradients`.

    grads = pyinf.capture_gradients(model, train_data, store="cpu", factors="empirical")  # one capture pass
    for method in ("datainf", "kfac", "ekfac"):
        for damping in (0.01, 0.1, 1.0):
            att = pyinf.Attributor(model, method=method, damping=damping, gradients=grads)  # fit: store passes
            scores = att.score(query_data)                       # (m, n); only the queries need the model

A `TrainGradients` is what one capture pass over the training data leaves:
the store (any kind, `pyinf.store`) with the K-FAC token statistics when
asked for (`factors="empirical"` or `"true"`, what kfac/ekfac read), the
blocks, the fingerprint of the model they were taken on
(`pyinf.store.fingerprint`), the capture options, the task (training loss
and query measurement, `pyinf.losses.Task`), the samples left out under
`nan_policy="skip"` and, data parallel, this rank's place among the ranks.
Every method, damping and option set runs from it (`pyinf.Attributor(model,
method=..., gradients=grads)`) without capturing the training data again,
except where that is the point: `store="none"` recaptures in every pass,
ekfac with `fisher="true"` captures the gradients of labels drawn from the
model in its Λ* pass, and Forward-INF reads the training batches themselves
(it keeps them, `data`). Query gradients are captured from the model with
the task's measurement (`query_grads`).

Data: any of the forms `pyinf.batches` accepts, read in the data's order.

Data parallel under `torchrun` (`pyinf.distributed`): with a process group
initialised, the capture shards the training batches across the ranks
(contiguous runs by batch index; a disk store writes `PATH/rank{r}-of-{W}`),
queries are captured on rank 0 and broadcast (`shared_query_grads`), and
`finish` gathers a score matrix's columns on rank 0 in the training order.

Faults:
- `nan_policy="error"` (default): a NaN/Inf training loss or gradient is a
  ValueError naming the sample (its index in the training data; under
  torchrun, in the rank's shard) and, for a gradient, the block.
  `nan_policy="skip"`: those samples are left out of the store and of every
  statistic, `skipped` lists their indices, and `finish` gives their score
  columns NaN. A NaN/Inf loss is zeroed before the backward, so the capture
  of the rest of its batch goes on. Query losses and gradients are always
  checked; a query with an all-zero gradient (no target tokens) is a
  RuntimeWarning (its scores are 0). NaN/Inf model weights are a ValueError
  naming the parameter, under either policy.
- Out of memory (`pyinf.oom`): a capture retries the batch in halves (kept
  for the next batches); a pass (`run_pass`) is retried with half the
  samples per chunk; each warns once. On one process only for the passes.
"""
from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from .batches import as_batches
from .blocks import Block, check_finite
from .losses import Task, move_to_device
from .methods.kfac import FISHERS
from .oom import HalvingCapture, is_oom, release_memory
from .progress import bar
from .progress import check as check_progress
from .store import LOSS_KEY, STORES, fingerprint, make_store, parse_store, resolve_grad_dtype

__all__ = ["capture_gradients", "TrainGradients", "capture_config", "CAPTURE_KEYS"]

NAN_POLICIES = ("error", "skip")
# The capture options, the keys of `capture_config`'s dict.
CAPTURE_KEYS = ("blocks", "store", "grad_dtype", "batch_size", "chunk_size", "nan_policy", "mask_padding", "factors",
                "seed", "progress")


def _make_capture(model, blocks, loss):
    from .capture import GradientCapture  # the capture module is heavy (transformers); import on use

    return GradientCapture(model, blocks=blocks, loss=loss)


# --------------------------------------------------------------------------- #
# options
# --------------------------------------------------------------------------- #
def capture_config(device: torch.device, *, blocks="lora", store: str = "auto", grad_dtype=None, batch_size: int = 8,
                   chunk_size: int | None = None, nan_policy: str = "error", mask_padding: bool = False,
                   factors: str | None = None, seed: int = 0, progress: bool | None = None) -> dict:
    """The capture options, validated (ValueError) and normalised, as `TrainGradients.config` holds them.

    Arguments as `capture_gradients`; `device` is the model's (it resolves store="auto" and grad_dtype=None).
    """
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if factors is not None and factors not in FISHERS:
        raise ValueError(f"factors must be None or one of {FISHERS} (the K-FAC statistics' labels), got {factors!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    check_progress(progress)
    kind, _ = parse_store(store, device)
    return {
        "blocks": blocks if isinstance(blocks, str) else list(blocks),
        "store": store if store.startswith("disk:") else kind,
        "grad_dtype": resolve_grad_dtype(grad_dtype, device),
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "nan_policy": nan_policy,
        "mask_padding": bool(mask_padding),
        "factors": factors,
        "seed": seed,
        "progress": progress,
    }


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def capture_gradients(model: torch.nn.Module, train_data, *, blocks="lora", task: Task | None = None, loss=None,
                      store: str = "auto", grad_dtype=None, batch_size: int = 8, chunk_size: int | None = None,
                      nan_policy: str = "error", mask_padding: bool = False, factors: str | None = None,
                      seed: int = 0, progress: bool | None = None, distributed: bool | None = None,
                      ) -> "TrainGradients":
    """Capture the per-sample training gradients once (one forward + backward per batch) into a store.

    Args:
        model: a torch module (e.g. a PEFT-wrapped Hugging Face model).
        train_data: the training data (the forms of the module docstring).
        blocks: "lora" (what the PEFT adapter trains; `pyinf.capture`) or a list of names.
        task: a `pyinf.Task` (training loss and query measurement); `loss=` (a per-sample
            `loss(model, batch) -> (B,)`) is `Task(train_loss=loss)`; neither: the Hugging Face losses.
        store: "auto", "gpu", "cpu", "disk:PATH" or "none" (`pyinf.store`).
        grad_dtype: storage dtype, torch.bfloat16 or torch.float32 (default: bfloat16 on CUDA, float32 on CPU).
        batch_size: batch size when the data is a Dataset, (dataset, collate_fn) or per-example dicts.
        chunk_size: training samples per chunk/shard (default ~256 MB of gradients).
        nan_policy: "error" or "skip" (module docstring).
        mask_padding: as in `pyinf.capture.GradientCapture`.
        factors: None, "empirical" or "true": also accumulate the K-FAC token statistics (`pyinf.factors`)
            that kfac/ekfac read, on the data's labels or on labels drawn from the model (seeded by `seed`).
        progress: None (auto), True or False (`pyinf.progress`).
        distributed: None (data parallel when a process group is initialised), False or True (require one).

    Returns:
        a `TrainGradients`: `n` samples × the blocks' `(rows, cols)` gradients, in the store.
    """
    config = capture_config(_model_device(model), blocks=blocks, store=store, grad_dtype=grad_dtype,
                            batch_size=batch_size, chunk_size=chunk_size, nan_policy=nan_policy,
                            mask_padding=mask_padding, factors=factors, seed=seed, progress=progress)
    return TrainGradients(model, config, Task.resolve(task, loss), distributed)._fill(train_data)


class TrainGradients:
    """Per-sample training gradients captured once, and what analysing them needs (module docstring).

    Made by `capture_gradients` (or `Attributor.fit`, `pyinf.callback.GradientStoreCallback.gradients`);
    `pyinf.Attributor(model, method=..., gradients=grads)` analyses it. Members: `model`, `task`,
    `config` (the capture options), `blocks` (list of `pyinf.blocks.Block`, each sample's gradient `(rows, cols)`), `store` (a
    `pyinf.blocks.GradientSource`: `n_local` samples of this rank), `fingerprint`, `skipped` (global
    indices left out), `n` (every sample, skipped ones included: the score columns), `data` (the training
    batches as given, this rank's shard), `comm` (a `pyinf.distributed.Comm` or None).
    """

    def __init__(self, model: torch.nn.Module, config: dict, task: Task, distributed: bool | None = None):
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        self.model, self.config, self.task, self.distributed = model, config, task, distributed
        self.device = _model_device(model)
        self.progress = config["progress"]
        self.blocks: list[Block] | None = None
        self.store = None
        self.data = None
        self.fingerprint: str | None = None
        self.comm = None  # pyinf.distributed.Comm while data parallel
        self.skipped: list[int] = []  # training samples left out (nan_policy="skip"), global indices
        self.kept_index: torch.Tensor | None = None  # original index of each kept sample, when some are skipped
        self.n = 0  # every training sample (all ranks; skipped ones included): the columns of a score matrix
        self._cap = None
        self._halving = HalvingCapture(self._capture_one)  # OOM: smaller micro-batches
        self._losses: torch.Tensor | None = None  # the per-sample losses of the last capture call
        self._sampled: dict[int, object] = {}  # seed -> gradients of labels drawn from the model (ekfac, fisher="true")
        self._warned_oom = False

    # -- capture -------------------------------------------------------------
    def _fill(self, train_data) -> "TrainGradients":
        """The capture pass: the training data into the store (this rank's shard, data parallel)."""
        c = self.config
        data = self.batches(train_data)
        self.comm = comm = self._resolve_comm()
        what = "fit"
        if comm is not None:
            from .distributed import ShardedBatches

            data = self.everywhere(lambda: ShardedBatches(data, comm.rank, comm.world), "sharding the data")
            what = f"fit on training batches {data.lo}..{data.hi - 1}"
        spec = c["store"]
        if comm is not None and spec.startswith("disk:"):
            spec = "disk:" + str(Path(spec[len("disk:") :]) / f"rank{comm.rank}-of-{comm.world}")
        with self._capturing():
            fp = self.model_fingerprint()
            store = make_store(spec, blocks=self.blocks, device=self.device, grad_dtype=c["grad_dtype"],
                               chunk_size=c["chunk_size"], fingerprint=fp, progress=self.progress)
            store.nan_policy = c["nan_policy"]
            self._collect_factors(store)
            self.everywhere(lambda: store.fill(self._capture_batch, data), what)
            self._place(store)
        self.store, self.data, self.fingerprint = store, data, fp
        return self

    @classmethod
    def of_store(cls, model, store, config: dict, task: Task) -> "TrainGradients":
        """Gradients captured elsewhere (`pyinf.callback.GradientStoreCallback`): a filled `store` of `model`'s
        blocks, on one process, taken with the capture options `config` (`capture_config`); no capture."""
        self = cls(model, config, task, distributed=False)
        with self._capturing():  # the model's blocks now
            if set(self.blocks) != set(store.blocks) or store.grad_dtype != config["grad_dtype"]:
                raise ValueError("the gradient store holds other blocks or another grad_dtype than the capture "
                                 "options: pass the blocks and grad_dtype the store was filled with")
        self.store, self.fingerprint = store, self.model_fingerprint()
        self._place(store)
        return self

    @classmethod
    def restore(cls, model, state: dict, task: Task, *, progress=None, check_model: bool = True,
                train_data=None, source: str = "the saved state") -> "TrainGradients":
        """From `state()` (a saved Attributor): the store reopened, no capture (store="none": `train_data`).

        `check_model`: a model whose fingerprint differs from the saved one is a ValueError naming `source`."""
        self = cls(model, {**state["config"], "progress": progress}, task, distributed=False)
        self.blocks = [Block(*b) for b in state["blocks"]]
        self.fingerprint = state["fingerprint"]
        if check_model and self.model_fingerprint() != self.fingerprint:
            raise ValueError(
                f"{source} was fitted on another model (its weights, LoRA scaling or blocks differ from this one's); "
                f"pass the model it was fitted on, or check_model=False to load anyway"
            )
        st = state["store"]
        data = None if train_data is None else self.batches(train_data)
        self.store = STORES[st["kind"]].restore(
            st, self.blocks, self.device, self.config["grad_dtype"], progress=progress,
            fingerprint=self.fingerprint if check_model else None, capture=self._capture_batch, batches=data)
        self.store.nan_policy = self.config["nan_policy"]
        self.data = data
        self._place(self.store)
        return self

    def state(self) -> dict:
        """What `restore` needs: the capture options, blocks, fingerprint and the store's state."""
        if self.comm is not None:
            raise ValueError("save under a torch.distributed process group is not supported: fit on one process "
                             "(distributed=False) to save, or keep the disk store and fit again (it resumes)")
        return {"config": dict(self.config), "blocks": [(b.name, b.rows, b.cols) for b in self.blocks],
                "fingerprint": self.fingerprint, "store": self.store.state()}

    def batches(self, data):
        """Data as an iterable of batches, in the data's order (`batch_size` for the forms that need one)."""
        return as_batches(data, self.config["batch_size"])

    # -- the model -------------------------------------------------------------
    def model_fingerprint(self) -> str:
        """The model's fingerprint now (`pyinf.store.fingerprint`) over these blocks and capture options."""
        return fingerprint(self.model, self.blocks, self.config["grad_dtype"],
                           {"mask_padding": self.config["mask_padding"]})

    def check_model(self) -> None:
        """ValueError when the model changed since the capture (weights or LoRA scaling)."""
        if self.model_fingerprint() != self.fingerprint:
            raise ValueError(
                "the model changed since fit (its weights or LoRA scaling differ): the scores would mix "
                "gradients of two models; fit again, or pass check_model=False to the Attributor to score anyway"
            )

    def _recording_loss(self, loss_fn, model, batch) -> torch.Tensor:
        """`loss_fn`, with non-finite per-sample values kept aside (`_losses`) and zeroed for the backward.

        The capture then never stops at a NaN loss: the store refuses or skips
        the sample by its global index (`pyinf.store.LOSS_KEY`).
        """
        losses = loss_fn(model, batch)
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

    def _capture_batch(self, batch) -> dict[str, torch.Tensor]:
        return self._halving(move_to_device(batch, self.device))

    @contextmanager
    def _capturing(self, measure: bool = False):
        """Hooks on the model for the duration of one public call; `measure`: the task's measurement
        (query gradients), else its training loss."""
        loss = self.task.query_loss if measure else self.task.train_loss
        cap = _make_capture(self.model, self.config["blocks"], functools.partial(self._recording_loss, loss))
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
        """factors="empirical"/"true": the capture accumulates the K-FAC token statistics into the store while
        it fills (`pyinf.factors`); "true" draws the labels of those statistics from the model (seeded)."""
        fisher, seed = self.config["factors"], self.config["seed"]
        if fisher is None:
            return
        from .factors import FactorStats
        from .losses import sample_labels

        store.factors = FactorStats(self.blocks, self.device, fisher, seed)
        self._cap.factors = store.factors
        if fisher == "true":
            self._cap.fisher_batch = lambda model, batch: sample_labels(model, batch, seed)
            self._cap.fisher_loss = self.task.train_loss

    def sampled_label_gradients(self, seed: int):
        """The per-sample gradients of labels drawn from the model (seeded), a store="none" source over the
        training data that captures them again on each pass (ekfac's Λ* with fisher="true"); made once."""
        if self.data is None:
            raise ValueError("fisher='true' captures the training data again with labels drawn from the model; these "
                             "gradients keep no training data (a GradientStoreCallback's): use fisher='empirical'")
        if seed not in self._sampled:
            from .losses import sample_labels
            from .store import RecomputeStore

            def capture(batch):
                with torch.no_grad():
                    drawn = sample_labels(self.model, move_to_device(batch, self.device), seed)
                return self._capture_batch(drawn)

            sampled = RecomputeStore(self.store.blocks, self.device, self.config["grad_dtype"], self.progress)
            sampled.nan_policy = self.config["nan_policy"]
            with self._capturing():
                sampled.fill(capture, self.data)
            sampled.comm, sampled.offset = self.store.comm, self.store.offset
            self._sampled[seed] = sampled
        return self._sampled[seed]

    # -- queries -----------------------------------------------------------------
    def query_grads(self, query_data) -> dict[str, torch.Tensor]:
        """Query gradients of the task's measurement, {name: (m, rows, cols)} float32 on the model's device."""
        parts, zero = [], []
        with self._capturing(measure=True), bar("capture queries", None, self.progress, unit="batch") as pb:
            m = 0
            for batch in self.batches(query_data):
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

    def shared_query_grads(self, query_data) -> dict[str, torch.Tensor]:
        """Query gradients {block: (m, rows, cols)}, captured once: on rank 0 and broadcast when data parallel."""
        comm = self.comm
        if comm is None:
            return self.query_grads(query_data)
        V = self.everywhere(lambda: self.query_grads(query_data) if comm.rank == 0 else None, "query gradients")
        return comm.broadcast_tensors(V, self.device)

    def token_scores(self, train_data, H: dict[str, torch.Tensor]) -> torch.Tensor:
        """`(m, n_t, T)`: each position's share in the scores of `train_data`'s sequences for the preconditioned
        queries `H` (`pyinf.token_scores`), one forward and backward a batch (`GradientCapture.token_scores`)."""
        from .token_scores import pad_positions

        parts, i = [], 0
        with self._capturing() as cap, bar("token scores", None, self.progress, unit="batch") as pb:
            for batch in self.batches(train_data):
                S = cap.token_scores(move_to_device(batch, self.device), H)
                losses = self._losses
                if losses is not None and not bool(torch.isfinite(losses).all()):
                    raise ValueError(f"the loss of sample {i + int((~torch.isfinite(losses)).nonzero()[0, 0])} "
                                     f"of train_data is NaN or Inf")
                parts.append(S.float())
                i += S.shape[1]
                pb.update()
        if not parts:
            raise ValueError("train_data is empty")
        return pad_positions(parts)

    # -- passes over the store ---------------------------------------------------
    def run_pass(self, label: str, fn: Callable):
        """`fn()` (one or more passes over the store) under one progress phase `label`, with the capture hooks
        on (store="none" captures in its passes), retried with halved chunks on out of memory."""
        with self._capturing():
            while True:
                try:
                    with self.store.phase(label):
                        return fn()
                except Exception as err:  # noqa: BLE001 - only out-of-memory errors are retried
                    if self.comm is not None or not is_oom(err):
                        raise
                    try:
                        size = self.store.split_chunks()
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

    def finish(self, S: torch.Tensor) -> torch.Tensor | None:
        """Local `(..., n_kept_local)` columns -> `(..., n)` in the training order (rank 0; None elsewhere)."""
        if self.comm is not None:
            S = self.comm.gather_cols(S)
            if S is None:
                return None
        if self.kept_index is not None:
            out = torch.full((*S.shape[:-1], self.n), float("nan"), dtype=S.dtype, device=S.device)
            out[..., self.kept_index.to(S.device)] = S
            S = out
        return S

    # -- data parallel -----------------------------------------------------------
    def _resolve_comm(self):
        from . import distributed

        if self.distributed is False:
            return None
        comm = distributed.current()
        if comm is None and self.distributed:
            raise ValueError("distributed=True, but no torch.distributed process group is initialised")
        return comm

    def everywhere(self, fn, what: str):
        """Run `fn`; under a process group, an exception on any rank is raised on every rank."""
        comm = self.comm
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

    def _place(self, store) -> None:
        """Global indices: this store's offset among the ranks, the skipped samples, n."""
        comm = self.comm
        info = (store.n, store.n_orig, list(store.skipped))
        infos = [info] if comm is None else comm.all_gather_object(info)
        rank = 0 if comm is None else comm.rank
        store.comm, store.offset = comm, sum(i[0] for i in infos[:rank])
        skipped, orig = [], 0
        for n, n_orig, sk in infos:
            skipped += [orig + i for i in sk]
            orig += n_orig
        self.skipped, self.n = skipped, orig
        self.kept_index = None
        if skipped:
            keep = torch.ones(orig, dtype=torch.bool)
            keep[skipped] = False
            self.kept_index = keep.nonzero().flatten()
