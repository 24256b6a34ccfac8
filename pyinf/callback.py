"""`GradientStoreCallback`: the training gradients of a Hugging Face `Trainer` run, captured while it trains.

    cb = GradientStoreCallback(store="cpu")        # "gpu", "cpu" or "disk:PATH"; blocks, loss, grad_dtype as Attributor
    trainer = transformers.Trainer(model, args, train_dataset=ds, data_collator=collate, callbacks=[cb])
    trainer.train()                                # the last epoch also fills cb.store
    att = cb.attributor(method="datainf")          # fitted on cb.gradients: no pass over the training data
    scores = att.score(query_data)                 # (m, len(ds)); column i is train_dataset[i]

During one epoch of the run (`epoch=-1`: the last) the callback captures the
per-sample gradients of every training sample with `pyinf.capture.GradientCapture`
(the `blocks`, `loss` and `mask_padding` of `pyinf.Attributor`), then, when
training ends, writes them into a `pyinf.store` store in dataset order.
`cb.gradients` is that store as a `pyinf.TrainGradients` (what
`pyinf.capture_gradients` returns), so any method scores queries from it
without a second pass over the training data: `cb.attributor(method=...)`
is `pyinf.Attributor(model, method=..., gradients=cb.gradients)`;
`cb.store` is the store itself.

Which gradients (`at=`):

- `at="step"` (default): sample i's gradient at the parameters of the
  optimizer step that trained on it in that epoch, θ_{s(i)} (`cb.steps[i]` =
  s(i), the optimizer steps completed before it), by pyinf's own capture: one
  extra forward and backward per micro-batch of the epoch, right before the
  Trainer's forward of it, on the same parameters, with the model in eval
  mode (dropout and LoRA dropout off, as `GradientCapture` runs it),
  autocast off (the model's own dtype, as the queries' capture) and pyinf's
  per-sample loss `loss(model, batch)` (default `pyinf.losses.default_loss`:
  each sample's mean token loss of the batch's `labels`). They equal a
  separate `GradientCapture` of the same batch at the same parameters.
- `at="train"`: the same gradients read off the Trainer's own backward
  (bergson's way; no extra forward or backward): the capture's hooks listen
  to the Trainer's forward and backward of each micro-batch (the
  `GradientCapture.begin`/`end` pair), and each sample's share is rescaled
  from the Trainer's loss to pyinf's. The Trainer backpropagates
  k · Σ_{i,t} ℓ_it / D (a token mean: D the step's targets,
  `num_items_in_batch`, or the micro-batch's; k its own scaling of the loss:
  1/GA, a loss scaler), so sample i gets (k/D) Σ_t ∇ℓ_it where pyinf's
  gradient is (1/T_i) Σ_t ∇ℓ_it (T_i its targets): it is multiplied by
  D/(k·T_i), k read by a hook on the model's loss. Checked on every
  micro-batch: the model's loss must equal that token mean of pyinf's
  per-sample losses (from the Trainer's logits) to 1e-4, else no store (a
  custom `compute_loss`, label smoothing, another loss: use "step"). The
  default loss of causal LMs and classifiers only (no `loss=`, no K-FAC
  statistics). What differs from "step": the model is in TRAIN mode, so with
  dropout (LoRA's `lora_dropout`, the base model's) the gradients are those
  of the dropped-out forward the Trainer took (the per-sample terms of its
  update), not the deterministic ones; under mixed precision they are the
  autocast computation's (with fp16's loss scaler, a step whose gradients
  overflow stores Inf: its samples are refused or skipped by `nan_policy`).
  Without dropout or autocast they equal "step"'s (1e-6 relative on the
  tests' tiny models; 5.6e-7 on the demo model).
- `at="end"`: the callback keeps the epoch's batches (their inputs, on the
  host) and captures them as "step" does, once training has ended, at the
  final parameters (after `load_best_model_at_end`): the gradients
  `Attributor.fit` would capture on the training set, from the Trainer's own
  batches, for one capture pass after training.

"step" and "train" give TracIn's checkpoint gradients (what bergson
collects during training), NOT the gradients at the end of training that
influence functions assume (`Attributor.fit` after `train()`): within the
epoch the parameters move by one update per step, so early samples are seen
by an older model, while queries are captured at the final parameters (the
smaller the last epoch's learning rate, as at the end of a decaying
schedule, the smaller the difference). "end" is exact for influence and
costs the capture pass the others avoid or hide. Measured cost on the demo
model: README, Results.

Dataset order: the Trainer shuffles. The callback wraps the index sampler
under the training DataLoader's batch sampler (`BatchSampler.sampler`; for
accelerate's `BatchSamplerShard`, the one it wraps) for the captured epoch
and records the dataset indices it yields, in order; each training forward
(a micro-batch of B samples) takes the next B. Gradient row i of the store is
`train_dataset[i]`. Gradient accumulation changes nothing: micro-batches are
captured one by one; those of one optimizer step share its parameters and
`cb.steps` value.

Requirements, checked when training begins (ValueError): one process on
one device (`args.world_size == 1`, no DataParallel), a map-style training dataset (with `len`), a
DataLoader whose batches are runs of a recorded index sampler (torch's
`BatchSampler`, as the Trainer builds for the random, sequential and
length-grouped samplers; not `batch_rebalance`), in order
(`dataloader_in_order`), and, for a disk store, an empty or new directory.
The captured epoch must train on every sample exactly once: a dropped last
batch (`dataloader_drop_last`), `max_steps` ending inside the epoch, a stop
or a resume inside it, or a sampler with replacement leave the store
unbuilt. Errors during the captured epoch or the store's build (a batch
without labels, ...) do not stop training: they are warned once and
raised, with their cause, by `cb.store`, `cb.gradients` and `cb.attributor()`.

Memory: the gradients go to a scratch in dataset order as they are captured
(host memory; for a disk store, memory-mapped files in a temporary
directory beside PATH), and, when training ends, from the scratch into the
store chunk by chunk, each scratch chunk released once copied: the peak is
about one G (the gradients' size) plus one chunk.

K-FAC (`factors=True`): the capture also accumulates the K-FAC token
statistics (`pyinf.factors`, empirical Fisher, seed 0), at the same
parameters as the gradients, for `cb.attributor(method="kfac")` or "ekfac".
"""
from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from .capture import GradientCapture
from .gradients import NAN_POLICIES, TrainGradients, capture_config
from .losses import Task, causal_lm_loss, causal_lm_targets, default_loss, model_device
from .oom import HalvingCapture
from .batches import batch_len
from .store import LOSS_KEY, default_chunk_size, fingerprint, make_store, parse_store, resolve_grad_dtype

__all__ = ["GradientStoreCallback"]

AT = ("step", "train", "end")
# Trainer keyword arguments of the model call that are not part of the batch.
_LOSS_KWARGS = ("num_items_in_batch",)


def _pyinf_losses(logits: torch.Tensor, labels: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """`pyinf.losses.default_loss` from a model's output: per-sample losses (B,) and their target counts (B,)
    (a causal LM's shifted token mean, or a classifier's cross-entropy, one target)."""
    if logits.dim() == 3 and labels.dim() == 2 and labels.shape == logits.shape[:2]:
        mask = mask if isinstance(mask, torch.Tensor) and mask.shape == labels.shape else None
        return causal_lm_loss(logits, labels, mask), causal_lm_targets(labels, mask).sum(dim=1)
    if logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point() and logits.shape[1] > 1:
        return F.cross_entropy(logits.float(), labels, reduction="none"), torch.ones_like(labels)
    raise ValueError(f"at='train' knows the losses of causal LMs and classifiers; not logits {tuple(logits.shape)} "
                     f"with labels {tuple(labels.shape)}: use at='step'")


class _IndexRecorder:
    """An index sampler that also queues the indices it yields, for the training forwards to take in order."""

    def __init__(self, inner):
        self.inner = inner
        self.queue: deque[int] = deque()

    def __iter__(self):
        for i in self.inner:
            self.queue.append(int(i))
            yield i

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):  # set_epoch, epoch, generator, ...: the wrapped sampler's
        if "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)

    def take(self, k: int) -> torch.Tensor:
        if len(self.queue) < k:
            raise RuntimeError(
                f"a training batch of {k} samples, but the sampler yielded {len(self.queue)} indices not yet "
                f"taken: the batches are not runs of the recorded sampler's indices"
            )
        return torch.tensor([self.queue.popleft() for _ in range(k)], dtype=torch.long)


def _index_owner(loader):
    """The batch sampler whose `.sampler` yields the dataset indices of `loader`'s batches, or None."""
    bs = getattr(loader, "batch_sampler", None)
    inner = getattr(bs, "batch_sampler", None)  # accelerate's BatchSamplerShard wraps the real one
    if inner is not None and getattr(bs, "num_processes", 1) == 1:
        bs = inner
    if isinstance(bs, torch.utils.data.BatchSampler) and hasattr(bs, "sampler"):
        return bs
    return None


class _Scratch:
    """Gradients `{block: (n, rows, cols)}` in dataset order, in chunks of `size` samples, written by index.

    A chunk is allocated when its first sample arrives, on the host (`where=None`) or as a memory-mapped
    file in the directory `where`; `pop(c)` hands chunk c over and forgets it (its file is unlinked, its
    memory freed once the caller drops it).
    """

    def __init__(self, blocks, n: int, size: int, dtype: torch.dtype, where: Path | None):
        self.blocks, self.n, self.size, self.dtype, self.where = blocks, n, size, dtype, where
        self.chunks: dict[int, dict[str, torch.Tensor]] = {}

    def _new(self, c: int) -> dict[str, torch.Tensor]:
        rows = min(self.size, self.n - c * self.size)
        if self.where is None:
            return {b.name: torch.zeros(rows, b.rows, b.cols, dtype=self.dtype) for b in self.blocks}
        item = torch.finfo(self.dtype).bits // 8
        raw = torch.from_numpy(np.memmap(self.where / f"chunk-{c:06d}.bin", dtype=np.uint8, mode="w+",
                                         shape=(rows * sum(b.size for b in self.blocks) * item,)))
        out, off = {}, 0
        for b in self.blocks:
            nbytes = rows * b.size * item
            out[b.name] = raw[off: off + nbytes].view(self.dtype).view(rows, b.rows, b.cols)
            off += nbytes
        return out

    def put(self, index: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
        """Rows `index` (B,) of the dataset get `grads` {block: (B, rows, cols)} (any device and dtype)."""
        host = {b.name: grads[b.name].detach().to(self.dtype).cpu() for b in self.blocks}
        chunk, pos = index // self.size, index % self.size
        for c in chunk.unique().tolist():
            sel = (chunk == c).nonzero().flatten()
            if c not in self.chunks:
                self.chunks[c] = self._new(c)
            for b in self.blocks:
                self.chunks[c][b.name].index_copy_(0, pos[sel], host[b.name][sel])

    def pop(self, c: int) -> dict[str, torch.Tensor]:
        out = self.chunks.pop(c)
        if self.where is not None:
            (self.where / f"chunk-{c:06d}.bin").unlink()
        return out


class GradientStoreCallback(TrainerCallback):
    """A `transformers.TrainerCallback` that fills a pyinf gradient store during one epoch (module docstring).

    Args:
        store: "auto", "gpu", "cpu" or "disk:PATH" (an empty or new directory), as `pyinf.Attributor`.
        at: "step" (each sample's gradient at the parameters of the step that trained on it, by an extra
            eval-mode capture), "train" (the same, read off the Trainer's own backward: train mode) or
            "end" (at the final parameters, captured after training); see the module docstring.
        epoch: the epoch captured, counted from 0; negative counts from the end (-1: the last).
        blocks, loss, grad_dtype, mask_padding, chunk_size, nan_policy: as `pyinf.Attributor` (the
            gradients' blocks, per-sample loss `loss(model, batch) -> (B,)`, storage dtype, padding
            rule, samples per chunk or shard, and what a NaN/Inf gradient or loss does: "error", a
            ValueError naming the sample, or "skip").
        factors: also accumulate the K-FAC statistics (for method="kfac"/"ekfac", fisher="empirical").
        progress: as `pyinf.Attributor` (the store's build at the end of training).

    After `trainer.train()`:
        store: the filled `pyinf.store.Store`, `n = len(train_dataset)` samples in dataset order.
        steps: `(n,)` int64, the optimizer steps completed before sample i's gradient was taken.
        losses: `(n,)` float32, sample i's loss `loss(model, batch)` at those parameters.
        gradients: a `pyinf.TrainGradients` around `store` (the callback's capture options and loss).
        attributor(method=..., **options): `pyinf.Attributor(model, method=..., gradients=gradients)`.
    """

    def __init__(self, *, store: str = "auto", at: str = "step", epoch: int = -1, blocks="lora", loss=None,
                 grad_dtype=None, mask_padding: bool = False, chunk_size: int | None = None,
                 nan_policy: str = "error", factors: bool = False, progress: bool | None = None):
        if at not in AT:
            raise ValueError(f"at must be one of {AT}, got {at!r}")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise ValueError(f"epoch must be an int, got {epoch!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if loss is not None and not callable(loss):
            raise TypeError("loss must be a callable loss(model, batch) -> (B,) per-sample losses")
        if at == "train" and (loss is not None or factors):
            raise ValueError("at='train' reads the Trainer's own backward of the model's loss: no loss= and no "
                             "factors (use at='step')")
        kind, _ = parse_store(store, torch.device("cuda") if store == "gpu" else torch.device("cpu"))
        if kind == "none":
            raise ValueError("store='none' keeps no gradients: choose 'auto', 'gpu', 'cpu' or 'disk:PATH'")
        self.spec, self.at, self.epoch = store, at, epoch
        self.blocks_spec = blocks if isinstance(blocks, str) else list(blocks)
        self.loss, self.grad_dtype_arg, self.mask_padding = loss, grad_dtype, bool(mask_padding)
        self.chunk_size, self.nan_policy, self.factors, self.progress = chunk_size, nan_policy, bool(factors), progress
        self._reset()

    def _reset(self) -> None:
        self.model = None
        self.blocks = None  # list[Block] in the capture's order, once training begins
        self.steps: torch.Tensor | None = None
        self.losses: torch.Tensor | None = None
        self._store = None
        self._gradients: TrainGradients | None = None
        self._error: BaseException | None = None
        self._cap: GradientCapture | None = None
        self._hook = None
        self._recorder: _IndexRecorder | None = None
        self._owner = None
        self._scratch: _Scratch | None = None
        self._scratch_dir: Path | None = None
        self._count: torch.Tensor | None = None
        self._pending: list = []  # at="end": (indices, host copy of the batch) of the captured epoch
        self._listen: dict | None = None  # at="train": the micro-batch whose backward the capture listens to
        self._stats = None
        self._busy = False
        self._batch_losses: torch.Tensor | None = None

    # -- results -----------------------------------------------------------
    @property
    def store(self):
        """The filled store (dataset order); raises the error that kept it from being built."""
        if self._error is not None:
            raise RuntimeError(f"the gradient store was not built: {self._error}") from self._error
        if self._store is None:
            raise RuntimeError("no gradient store yet: pass this callback to a Trainer and run trainer.train()")
        return self._store

    @property
    def gradients(self) -> TrainGradients:
        """`store` as a `pyinf.TrainGradients` of the trained model (made once): the capture options are the
        callback's (factors: "empirical", seed 0), the task `loss` (training loss and measurement)."""
        store = self.store
        if self._gradients is None:
            config = capture_config(self._device, blocks=self.blocks_spec, store=self.spec,
                                    grad_dtype=store.grad_dtype, chunk_size=self.chunk_size,
                                    nan_policy=self.nan_policy, mask_padding=self.mask_padding,
                                    factors="empirical" if self.factors else None, progress=self.progress)
            self._gradients = TrainGradients.of_store(self.model, store, config, Task.resolve(loss=self.loss))
        return self._gradients

    def attributor(self, method: str = "datainf", **options):
        """`pyinf.Attributor(model, method=method, gradients=self.gradients, **options)`: the method fitted on
        `gradients` (no capture of the training data). `options`: the method's (damping, damping_mode,
        backend, check_model, the method's own); the capture options are the callback's."""
        from .attributor import Attributor

        return Attributor(self.model, method=method, gradients=self.gradients, **options)

    # -- Trainer events ------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._reset()
        if getattr(args, "world_size", 1) != 1 or getattr(args, "n_gpu", 1) > 1:
            raise ValueError("GradientStoreCallback runs on one process and one device (args.world_size == 1, "
                             "no DataParallel over several GPUs)")
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError("GradientStoreCallback needs a map-style training dataset (with len): its gradients are "
                             "stored by dataset index")
        self._owner = _index_owner(train_dataloader)
        if self._owner is None:
            raise ValueError(
                f"GradientStoreCallback records the dataset indices of the training batches from the index sampler "
                f"under a torch BatchSampler; this DataLoader's batch sampler is a "
                f"{type(getattr(train_dataloader, 'batch_sampler', None)).__name__}"
            )
        if getattr(args, "dataloader_in_order", True) is False and getattr(args, "dataloader_num_workers", 0) > 0:
            raise ValueError("dataloader_in_order=False lets batches arrive out of the sampler's order: set it True")
        epochs = int(state.num_train_epochs)
        self._target = self.epoch if self.epoch >= 0 else epochs + self.epoch
        if not 0 <= self._target < epochs:
            raise ValueError(f"epoch={self.epoch}, but the run trains {epochs} epochs")
        self.model = model
        self._device = model_device(model)
        self._grad_dtype = resolve_grad_dtype(self.grad_dtype_arg, self._device)
        kind, path = parse_store(self.spec, self._device)
        if kind == "disk" and Path(path).expanduser().exists() and any(Path(path).expanduser().iterdir()):
            raise ValueError(f"GradientStoreCallback writes a new gradient store: {path} is not empty; choose an "
                             f"empty or new directory")
        self._n = len(dataset)
        self._state = state
        self._cap = GradientCapture(model, blocks=self.blocks_spec, loss=self._recording_loss,
                                    mask_padding=self.mask_padding)
        self.blocks = list(self._cap.blocks)
        if self.factors:
            from .factors import FactorStats

            self._stats = FactorStats(self.blocks, self._device)
            self._cap.factors = self._stats
        self._halving = HalvingCapture(self._capture_one)
        self._hook = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)]
        if self.at == "train":
            self._hook.append(model.register_forward_hook(self._post_forward, with_kwargs=True))

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self._cap is None or self._error is not None or math.floor((state.epoch or 0) + 1e-6) != self._target:
            return
        try:
            self._chunk = int(self.chunk_size or default_chunk_size(self.blocks, self._grad_dtype))
            kind, path = parse_store(self.spec, self._device)
            if kind == "disk":
                parent = Path(path).expanduser().resolve().parent
                parent.mkdir(parents=True, exist_ok=True)
                self._scratch_dir = Path(tempfile.mkdtemp(prefix=".pyinf-scratch-", dir=parent))
            self._scratch = _Scratch(self.blocks, self._n, self._chunk, self._grad_dtype, self._scratch_dir)
            self.steps = torch.full((self._n,), -1, dtype=torch.long)
            self.losses = torch.full((self._n,), float("nan"))
            self._count = torch.zeros(self._n, dtype=torch.long)
            self._recorder = _IndexRecorder(self._owner.sampler)
            self._owner.sampler = self._recorder
        except Exception as err:  # noqa: BLE001 - kept for cb.store; training goes on
            self._fail(err)

    def on_substep_end(self, args, state, control, **kwargs):
        self._collect_train()  # at="train": after the backward of a micro-batch

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._collect_train()  # at="train": after the backward of the step's last micro-batch

    def on_epoch_end(self, args, state, control, **kwargs):
        self._collect_train()
        self._unwrap_sampler()

    def on_train_end(self, args, state, control, **kwargs):
        self._collect_train()
        self._unwrap_sampler()
        for h in self._hook or ():
            h.remove()
        self._hook = None
        try:
            if self._error is None and self._recorder is not None:
                if self.at == "end":
                    for index, batch in self._pending:
                        self._put(index, batch, state.global_step)
                    self._pending = []
                self._build()
            elif self._error is None:
                self._fail(RuntimeError(f"training ended before epoch {self._target} began"))
        except Exception as err:  # noqa: BLE001 - kept for cb.store
            self._fail(err)
        finally:
            if self._cap is not None:
                self._cap.close()
            self._cap = None
            self._scratch = None
            if self._scratch_dir is not None:
                shutil.rmtree(self._scratch_dir, ignore_errors=True)

    # -- capture ---------------------------------------------------------------
    def _unwrap_sampler(self) -> None:
        if self._owner is not None and isinstance(self._owner.sampler, _IndexRecorder):
            self._owner.sampler = self._owner.sampler.inner

    def _fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err
            warnings.warn(f"pyinf GradientStoreCallback: no gradient store will be built ({err}); training goes on",
                          RuntimeWarning, stacklevel=2)

    def _pre_forward(self, module, args, kwargs):
        """Every training forward of the captured epoch: its batch, the dataset indices it holds."""
        if self._busy or not module.training or self._error is not None or not isinstance(self._owner.sampler,
                                                                                          _IndexRecorder):
            return None
        self._busy = True  # the capture's own forward calls come back here
        try:
            if args:
                raise ValueError("the Trainer called the model with positional inputs; pyinf needs a batch dict")
            batch = {k: v for k, v in kwargs.items() if k not in _LOSS_KWARGS}
            index = self._recorder.take(batch_len(batch))
            if self.at == "step":
                self._put(index, batch, self._state.global_step)
            elif self.at == "train":
                self._collect_train()  # a backward no callback event followed (none in a Trainer)
                self._cap.begin(len(index), batch.get("attention_mask"))
                self._listen = {"index": index, "step": self._state.global_step}
            else:
                self._pending.append((index, {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                                              for k, v in batch.items()}))
        except Exception as err:  # noqa: BLE001 - kept for cb.store; training goes on
            self._fail(err)
        finally:
            self._busy = False
        return None

    def _post_forward(self, module, args, kwargs, output):
        """at="train": pyinf's per-sample losses from the Trainer's forward, checked against the model's loss,
        and a hook for the factor the Trainer scales that loss by before its backward."""
        lis = self._listen
        if lis is None or "loss" in lis:
            return None
        try:
            loss, logits = (getattr(output, k, None) for k in ("loss", "logits"))
            labels, mask = kwargs.get("labels"), kwargs.get("attention_mask")
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad or labels is None or logits is None:
                raise ValueError("at='train' needs the model's own loss and logits (labels in the model inputs, no "
                                 "label smoothing): use at='step'")
            with torch.no_grad():
                losses, tokens = _pyinf_losses(logits.detach(), labels, mask)
                summed, got = float((losses * tokens).sum()), float(loss)
            # the mean over the step's targets (num_items_in_batch, when the model takes it) or the micro-batch's
            items = kwargs.get("num_items_in_batch")
            totals = ([float(items)] if items is not None else []) + [float(tokens.sum())]
            total = next((t for t in totals if math.isclose(got, summed / max(t, 1.0), rel_tol=1e-4, abs_tol=1e-7)),
                         None)
            if total is None:
                raise ValueError(
                    f"the model's loss {got:.6g} is not a token mean of pyinf's per-sample losses (their sum "
                    f"{summed:.6g} over {' or '.join(f'{t:g}' for t in totals)} targets): at='train' rescales the "
                    f"Trainer's backward of that mean; use at='step'"
                )
            lis.update(loss=losses, tokens=tokens, total=total)
            loss.register_hook(lambda g: lis.__setitem__("scale", g.detach()))
        except Exception as err:  # noqa: BLE001 - kept for cb.store; training goes on
            self._fail(err)
        return None

    def _collect_train(self) -> None:
        """at="train": the listened micro-batch's gradients, rescaled per sample to pyinf's loss."""
        lis, self._listen = self._listen, None
        if lis is None:
            return
        try:
            h = self._cap.end()
            if self._error is not None:
                return
            if "scale" not in lis:
                raise ValueError("the Trainer did not backpropagate the model's own loss (a custom compute_loss?): "
                                 "use at='step'")
            # the Trainer's backward gives sample i (k/D) Σ_t ∇ℓ_it: k its scale of the loss, D the tokens it
            # averages over; pyinf's gradient is (1/T_i) Σ_t ∇ℓ_it
            tokens = lis["tokens"].double().cpu()
            per = torch.where(tokens > 0, lis["total"] / (lis["scale"].double().cpu() * tokens), 0.0)
            g = {name: t * per.to(t.device, t.dtype).view(-1, 1, 1) for name, t in h.items()}
            self._write(lis["index"], {**g, LOSS_KEY: lis["loss"]}, lis["step"])
        except Exception as err:  # noqa: BLE001 - kept for cb.store; training goes on
            self._fail(err)

    def _recording_loss(self, model, batch) -> torch.Tensor:
        """The loss, its non-finite values kept aside and zeroed for the backward (the store names them)."""
        losses = (self.loss if self.loss is not None else default_loss)(model, batch)
        self._batch_losses = None
        if isinstance(losses, torch.Tensor) and losses.dim() == 1:
            self._batch_losses = losses.detach().float()
            losses = torch.where(torch.isfinite(losses), losses, torch.zeros((), dtype=losses.dtype,
                                                                               device=losses.device))
        return losses

    def _capture_one(self, batch) -> dict[str, torch.Tensor]:
        g = self._cap(batch)
        return {**g, LOSS_KEY: self._batch_losses}

    def _put(self, index: torch.Tensor, batch, step: int) -> None:
        """Capture `batch` (dataset indices `index`) at the model's current parameters into the scratch."""
        with torch.autocast(self._device.type, enabled=False):
            if self._stats is not None:
                self._stats.active = True
            try:
                g = self._halving(batch)
            finally:
                if self._stats is not None:
                    self._stats.active = False
        self._write(index, g, step)

    def _write(self, index: torch.Tensor, g: dict[str, torch.Tensor], step: int) -> None:
        self._scratch.put(index, g)
        self.losses[index] = g[LOSS_KEY].cpu()
        self.steps[index] = step
        self._count[index] += 1

    def _build(self) -> None:
        """The store, from the scratch in dataset order, chunk by chunk."""
        twice = (self._count > 1).nonzero().flatten().tolist()
        if twice:
            raise ValueError(f"samples {twice[:5]} were trained on more than once in epoch {self._target} (a sampler "
                             f"with replacement?): one gradient per sample is stored")
        missing = (self._count == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"epoch {self._target} did not train on {len(missing)} of the {self._n} training samples (e.g. "
                f"{missing[:5]}): dataloader_drop_last=True, max_steps ending inside the epoch, a stop or a resume "
                f"inside it; every sample's gradient is needed"
            )
        store = make_store(self.spec, blocks=self.blocks, device=self._device, grad_dtype=self._grad_dtype,
                           chunk_size=self._chunk, progress=self.progress,
                           fingerprint=fingerprint(self.model, self.blocks, self._grad_dtype,
                                                   {"mask_padding": self.mask_padding}))
        store.nan_policy = self.nan_policy
        store.factors = self._stats

        def chunk(batch):
            lo = int(batch["index"][0])
            return {**self._scratch.pop(lo // self._chunk), LOSS_KEY: self.losses[lo: lo + batch_len(batch)]}

        store.fill(chunk, [{"index": torch.arange(lo, min(lo + self._chunk, self._n))}
                           for lo in range(0, self._n, self._chunk)])
        self._store = store
