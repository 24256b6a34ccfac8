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
Each pass over the training gradients shows a progress bar ("datainf: fit
pass 1", "datainf: score pass 1", ...). `score(top_k=k)` keeps a running
top-k per query over the chunks of the scoring pass, never the (m, n) matrix
(it scores through `precondition` and `score_chunks`; for "exact" with
Woodbury blocks that path builds H, and can differ from the full matrix in the
last digits).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .backends import get_backend
from .blocks import Block, check_finite
from .methods import get_method
from .progress import bar
from .store import STORES, fingerprint, make_store, parse_store, resolve_grad_dtype

SAVE_FORMAT = "pyinf-attributor"
SAVE_VERSION = 1


class TopK(NamedTuple):
    """Per query, the k most helpful (most negative) and most harmful (most positive) scores, each (m, k)."""

    helpful_scores: torch.Tensor
    helpful_indices: torch.Tensor
    harmful_scores: torch.Tensor
    harmful_indices: torch.Tensor


def _make_capture(model, blocks, loss):
    from .capture import GradientCapture  # the capture module is heavy (transformers); import on use

    return GradientCapture(model, blocks=blocks, loss=loss)


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
        method: "datainf", "hyperinf", "tracin", "lissa", "exact" or "forward"
            (Forward-INF, `pyinf.forward`: options lr (required), steps,
            optimizer, queries_per_pass; fit keeps the training batches and
            computes the base losses, score runs the forward passes; no store,
            no save/self_influence; damping is unused).
        blocks: "lora" (every PEFT LoRA matrix) or a list of module names.
        loss: None (the Hugging Face per-sample loss) or `loss(model, batch) -> (B,)`.
        store: "auto", "gpu", "cpu", "disk:PATH" or "none" (see `pyinf.store`).
        grad_dtype: storage dtype, torch.bfloat16 or torch.float32
            (default: bfloat16 on CUDA, float32 on CPU).
        batch_size: batch size when the data is a Dataset or (dataset, collate_fn).
        damping, damping_mode, backend, **options: as in `pyinf.influence`,
            validated here, at construction.
        progress: progress bars on stderr (False: print nothing).
        chunk_size: training samples per chunk/shard (default ~256 MB of
            gradients; "none" uses one batch per chunk).
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
        progress: bool = True,
        chunk_size: int | None = None,
        **options,
    ):
        self.model = model
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
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
            "options": dict(options),
        }
        self.loss = loss
        self.progress = progress
        if method == "forward":
            from .forward import attributor_options

            attributor_options(options, batch_size)  # validates lr, steps, optimizer now
        else:
            self._new_method()  # validates the method name, damping and options now
        self.blocks: list[Block] | None = None
        self._store = None
        self._method = None
        self._cap = None

    # -- plumbing ----------------------------------------------------------
    def _new_method(self):
        c = self.config
        cls = get_method(c["method"])
        backend = get_backend(c["backend"], self.device)
        return cls(backend, damping=c["damping"], damping_mode=c["damping_mode"], **c["options"])

    @contextmanager
    def _capturing(self):
        """Hooks on the model for the duration of one public call."""
        cap = _make_capture(self.model, self.config["blocks"], self.loss)
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

    def _capture_batch(self, batch) -> dict[str, torch.Tensor]:
        return self._cap(_to_device(batch, self.device))

    def _batches(self, data):
        """Data as an iterable of batches: a DataLoader, a list of dicts, a Dataset, or (dataset, collate_fn)."""
        bs = self.config["batch_size"]
        if isinstance(data, tuple) and len(data) == 2 and callable(data[1]):
            return DataLoader(data[0], batch_size=bs, shuffle=False, collate_fn=data[1])
        if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
            return DataLoader(data, batch_size=bs, shuffle=False)
        return data

    def _check_fitted(self):
        if self._method is None:
            raise RuntimeError("call fit(train_data) (or Attributor.load) first")

    # -- public ------------------------------------------------------------
    def fit(self, train_data) -> "Attributor":
        """Capture the training gradients into the store and fit the method."""
        data = self._batches(train_data)
        c = self.config
        if c["method"] == "forward":
            return self._fit_forward(data)
        self.blocks = None  # a new fit takes the blocks the capture finds now
        with self._capturing():
            store = make_store(
                c["store"],
                blocks=self.blocks,
                device=self.device,
                grad_dtype=c["grad_dtype"],
                chunk_size=c["chunk_size"],
                fingerprint=fingerprint(self.model, self.blocks, c["grad_dtype"]) if c["store"].startswith("disk:") else None,
                progress=self.progress,
            )
            store.fill(self._capture_batch, data)
            method = self._new_method()
            store.begin(f"{c['method']}: fit pass")
            method.fit(store)
        self._store, self._method = store, method
        return self

    def query_grads(self, query_data) -> dict[str, torch.Tensor]:
        """Captured query gradients {name: (m, rows, cols)} float32 on the model's device."""
        parts = []
        with self._capturing(), bar("capture queries", None, self.progress, unit="batch") as pb:
            m = 0
            for batch in self._batches(query_data):
                g = self._capture_batch(batch)
                for b in self.blocks:
                    check_finite(b.name, g[b.name], "query gradient", m)
                parts.append({b.name: g[b.name].detach().reshape(-1, b.rows, b.cols) for b in self.blocks})
                m += parts[-1][self.blocks[0].name].shape[0]
                pb.update()
        if not parts:
            raise ValueError("the query data is empty")
        return {b.name: torch.cat([p[b.name] for p in parts]) for b in self.blocks}

    def score(self, query_data, top_k: int | None = None):
        """`(m, n)` float32 scores (positive = harmful); with `top_k=k` a `TopK` of (m, k) tensors."""
        self._check_fitted()
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if self.config["method"] == "forward":
            S = self._method.score(self._batches(query_data))
            return S if top_k is None else TopK(*self.top_k(S, top_k, True), *self.top_k(S, top_k, False))
        V = self.query_grads(query_data)
        name = self.config["method"]
        with self._capturing():  # store="none" captures the training data again in these passes
            self._store.begin(f"{name}: score pass")
            if top_k is None:
                return self._method.influence(V).float()  # what pyinf.influence runs
            return self._top_k_streamed(self._method.precondition(V), top_k)

    def _top_k_streamed(self, H, k: int) -> TopK:
        m = next(iter(H.values())).shape[0]
        empty = torch.empty(m, 0, device=self.device)
        none = torch.empty(m, 0, dtype=torch.long, device=self.device)
        hv, hi, av, ai = empty, none, empty, none
        for start, cols in self._method.score_chunks(self._store, H):
            cols = cols.float()
            idx = torch.arange(start, start + cols.shape[1], device=cols.device).expand(m, -1)
            hv, hi = _merge_top(hv, hi, cols, idx, k, largest=False)
            av, ai = _merge_top(av, ai, cols, idx, k, largest=True)
        return TopK(hv, hi, av, ai)

    def self_influence(self) -> torch.Tensor:
        """`(n,)` float32: −g_iᵀ H⁻¹ g_i (≤ 0; rank by magnitude)."""
        self._check_fitted()
        self._refuse_forward("self_influence")
        with self._capturing():
            self._store.begin(f"{self.config['method']}: self-influence pass")
            return self._method.self_influence(self._store).float()

    @staticmethod
    def top_k(scores: torch.Tensor, k: int, helpful: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k most helpful (most negative) or harmful scores along the last dim."""
        return scores.topk(min(k, scores.shape[-1]), dim=-1, largest=not helpful, sorted=True)

    @property
    def n(self) -> int:
        self._check_fitted()
        return self._method.n if self.config["method"] == "forward" else self._store.n

    # -- Forward-INF (pyinf.forward) ----------------------------------------
    def _fit_forward(self, data) -> "Attributor":
        from .forward import ForwardInfluence, attributor_options

        c = self.config
        self.blocks = None
        engine = ForwardInfluence(self.model, blocks=c["blocks"], loss=self.loss, batch_size=c["batch_size"],
                                  progress=self.progress, **attributor_options(c["options"], c["batch_size"]))
        engine.fit(data)
        self.blocks, self._store, self._method = list(engine.blocks), None, engine
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
        state = {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "config": self.config,
            "blocks": [(b.name, b.rows, b.cols) for b in self.blocks],
            # Every statistic the method fitted (λ, norms, factors, inverses, ...), whatever the method.
            "method": _map_tensors(
                {k: v for k, v in vars(self._method).items() if k not in ("backend", "train", "blocks")},
                lambda t: t.cpu(),
            ),
            "store": self._store.state(),
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, model, *, loss=None, train_data=None, progress: bool = True) -> "Attributor":
        """A fitted Attributor from `save`; `model` must be the model it was fitted on."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != SAVE_FORMAT or state.get("version") != SAVE_VERSION:
            raise ValueError(f"{path}: not a pyinf Attributor state of version {SAVE_VERSION}")
        c = state["config"]
        keys = ("method", "blocks", "store", "grad_dtype", "batch_size", "damping", "damping_mode", "backend", "chunk_size")
        self = cls(model, loss=loss, progress=progress, **{k: c[k] for k in keys}, **c["options"])
        self.blocks = [Block(*b) for b in state["blocks"]]
        st = state["store"]
        self._store = STORES[st["kind"]].restore(
            st,
            self.blocks,
            self.device,
            c["grad_dtype"],
            progress=progress,
            fingerprint=fingerprint(model, self.blocks, c["grad_dtype"]),
            capture=self._capture_batch,
            batches=None if train_data is None else self._batches(train_data),
        )
        method = self._new_method()
        vars(method).update(_map_tensors(state["method"], lambda t: t.to(self.device)))
        method.blocks, method.train = self.blocks, self._store
        self._method = method
        return self
