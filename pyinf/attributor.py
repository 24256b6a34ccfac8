"""`pyinf.Attributor`: from a model and its training data to influence scores.

    att = pyinf.Attributor(model, method="datainf", store="auto")
    att.fit(train_loader)                    # capture once into the store, fit the method
    scores = att.score(query_loader)         # (m, n) float32, the `pyinf.influence` convention
    best = att.score(query_loader, top_k=5)  # TopK, without the (m, n) matrix
    mean = att.score(query_loader, aggregate=True)  # (n,): the mean query (DataInf's classification recipe)
    att.save("state.pt"); att = pyinf.Attributor.load("state.pt", model)

    grads = pyinf.capture_gradients(model, train_loader)      # or: capture once,
    att = pyinf.Attributor(model, method="hyperinf", damping=0.01, gradients=grads)  # analyse many times

An Attributor is a `pyinf.gradients.TrainGradients` (the captured training
gradients: store, blocks, fingerprint, task; `fit` makes one, `gradients=`
takes one) and an analysis (`pyinf.analysis`: the method with its damping
and options, Forward-INF included, behind one protocol). Query gradients are
taken of the task's measurement (`pyinf.losses.Task`; `loss=` alone is both
the training loss and the measurement); the method is the same object
`pyinf.influence` uses, fed from the store instead of tensors, so the
scores are those of `pyinf.influence(captured_train, captured_query,
chunk_size=<the store's>)`. Each phase (capture, "datainf: fit", "datainf:
score", ...) shows one progress bar, or one log line when stderr is not a
terminal (`pyinf.progress`). `score(top_k=k)` keeps a running top-k per
query over the chunks of the scoring pass, never the (m, n) matrix (for
"exact" with Woodbury blocks that path builds H, and can differ from the
full matrix in the last digits).

Data parallel under `torchrun` (`pyinf.distributed`, `pyinf.gradients`):
`fit` shards the training batches across the ranks, the methods all-reduce
their statistics, queries are captured on rank 0 and broadcast, each rank
scores its shard, and rank 0 returns the `(m, n)` scores in the original
training order (the other ranks return None). `save`/`load` are
single-process.

Faults (details in `pyinf.gradients`): NaN/Inf training losses or gradients
are refused naming the sample and block (`nan_policy="error"`) or left out
(`"skip"`: `att.skipped` lists them, their score columns are NaN, `top_k`
never returns them); a model that changed since `fit` (the fingerprint of
`pyinf.store.fingerprint`) is refused by `score`/`self_influence`, and a
saved state by `load` on another model (`check_model=False` overrides both);
out of memory halves the capture's micro-batches or a pass's chunks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from .analysis import Analysis, make_analysis
from .gradients import CAPTURE_KEYS, TrainGradients, capture_config
from .losses import Task
from .progress import check as check_progress

SAVE_FORMAT = "pyinf-attributor"
SAVE_VERSION = 2
# Capture options (`pyinf.gradients.capture_config`) with their defaults: given with gradients=, a ValueError.
CAPTURE_DEFAULTS = {"blocks": "lora", "store": "auto", "grad_dtype": None, "batch_size": 8, "chunk_size": None,
                    "nan_policy": "error", "mask_padding": False, "progress": None, "loss": None, "task": None,
                    "distributed": None}


class TopK(NamedTuple):
    """Per query, the k most helpful (most negative) and most harmful (most positive) scores, each (m, k).

    Helpful/harmful as for a loss measurement (the default task); for a measurement that training raises
    (a log-probability, a margin) the most positive scores help most."""

    helpful_scores: torch.Tensor
    helpful_indices: torch.Tensor
    harmful_scores: torch.Tensor
    harmful_indices: torch.Tensor


def _merge_top(vals, idx, new_vals, new_idx, k, largest):
    v, i = torch.cat([vals, new_vals], dim=1), torch.cat([idx, new_idx], dim=1)
    top, pos = v.topk(min(k, v.shape[1]), dim=1, largest=largest, sorted=True)
    return top, i.gather(1, pos)


class Attributor:
    """Influence of training data on queries for one model (see the module docstring).

    Args:
        model: a torch module (e.g. a PEFT-wrapped Hugging Face model).
        method: one of `pyinf.analysis.ANALYSES`: "datainf", "hyperinf", "tracin", "lissa", "exact",
            "kfac", "ekfac" or "forward" (Forward-INF, `pyinf.forward`: options lr (required), steps,
            optimizer, queries_per_pass, use_triton, moves; fit keeps the training batches and
            computes the base losses, score runs the forward passes; no self_influence/save; damping
            is unused). kfac/ekfac: options fisher ("empirical" or "true": labels drawn from the
            model, seeded by seed) and seed; the capture accumulates those K-FAC statistics
            (`pyinf.factors`) into the store. Each method's options are a dataclass
            (`pyinf.options`), validated here; `describe()` prints them.
        damping, damping_mode, backend, **options: as in `pyinf.influence`, validated here.
        gradients: a `pyinf.TrainGradients` (`pyinf.capture_gradients`) of `model`: the method is
            fitted on them now, no capture; the capture options below then come from them (giving
            one is a ValueError).
        task: a `pyinf.Task` (training loss and query measurement, `pyinf.losses`); `loss`: None
            (the Hugging Face per-sample loss) or `loss(model, batch) -> (B,)`, the training loss and
            the measurement both.
        blocks, store, grad_dtype, batch_size, chunk_size, nan_policy, mask_padding, progress,
        distributed: the capture's (`pyinf.capture_gradients`).
        check_model: True (default): `score`/`self_influence` refuse a model whose weights (or LoRA
            scaling) changed since the capture (a fingerprint, `pyinf.store.fingerprint`); False
            scores anyway.

    Data: the forms of `pyinf.gradients` (a batch, a list of batches or of examples, a Dataset,
    (dataset, collate_fn), a DataLoader); score columns (query rows) follow the data's order.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        method: str = "datainf",
        blocks="lora",
        loss=None,
        task: Task | None = None,
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
        gradients: TrainGradients | None = None,
        **options,
    ):
        self.model = model
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        check_progress(progress)
        self.analysis: Analysis = make_analysis(method, self.device, damping=damping, damping_mode=damping_mode,
                                                backend=backend, options=options)
        if gradients is not None:
            given = dict(blocks=blocks, store=store, grad_dtype=grad_dtype, batch_size=batch_size,
                         chunk_size=chunk_size, nan_policy=nan_policy, mask_padding=mask_padding, progress=progress,
                         loss=loss, task=task, distributed=distributed)
            clash = sorted(k for k, v in given.items() if v is not CAPTURE_DEFAULTS[k] and v != CAPTURE_DEFAULTS[k])
            if clash:
                raise ValueError(f"{clash} belong to the capture: with gradients=, they are the gradients' "
                                 f"(pass them to pyinf.capture_gradients)")
            if not isinstance(gradients, TrainGradients):
                raise TypeError(f"gradients must be a pyinf.TrainGradients, got {type(gradients).__name__}")
            if gradients.model is not model:
                raise ValueError("gradients were captured from another model object; pass that model")
            capture, self.task, distributed = gradients.config, gradients.task, gradients.distributed
        else:
            self.task = Task.resolve(task, loss)
            capture = dict(blocks=blocks, store=store, grad_dtype=grad_dtype, batch_size=batch_size,
                           chunk_size=chunk_size, nan_policy=nan_policy, mask_padding=mask_padding, progress=progress)
            capture = capture_config(self.device, **{**capture, **self.analysis.capture_options()})
        self.analysis.check_capture(capture)
        self.config = {"method": method, **capture, "damping": damping, "damping_mode": damping_mode,
                       "backend": backend, "options": dict(options)}
        self.progress = capture["progress"]
        self.check_model = bool(check_model)
        self.distributed = distributed
        self.gradients: TrainGradients | None = None
        if gradients is not None:
            self.analysis.fit(gradients)
            self.gradients = gradients

    # -- what the capture holds ----------------------------------------------
    @property
    def blocks(self):
        """The captured blocks (list of `pyinf.blocks.Block`), None before `fit`."""
        return None if self.gradients is None else self.gradients.blocks

    @property
    def skipped(self) -> list[int]:
        """Training samples left out (nan_policy="skip"), their indices in the training data."""
        return [] if self.gradients is None else self.gradients.skipped

    @property
    def n(self) -> int:
        """Training samples (all ranks; skipped ones included): the columns of `score`."""
        self._check_fitted()
        return self.gradients.n

    def describe(self) -> dict:
        """The method, damping, every option (defaults included), backend and task: what reports print."""
        return {**self.analysis.report(), "task": self.task.describe()}

    def _check_fitted(self):
        if self.gradients is None:
            raise RuntimeError("call fit(train_data) (or Attributor.load) first")

    def _check_model(self) -> None:
        if self.check_model:
            self.gradients.check_model()

    # -- public ------------------------------------------------------------
    def fit(self, train_data) -> "Attributor":
        """Capture the training gradients into the store (this rank's shard, data parallel), fit the method."""
        capture = {k: self.config[k] for k in CAPTURE_KEYS}
        self.gradients = None
        grads = TrainGradients(self.model, capture, self.task, self.distributed)._fill(train_data)
        self.analysis.fit(grads)
        self.gradients = grads
        return self

    def query_grads(self, query_data) -> dict[str, torch.Tensor]:
        """Captured query gradients (of the task's measurement) {name: (m, rows, cols)} float32 on the model's
        device; `score(query_grads=...)` takes them, so that many Attributors score them without capturing again."""
        self._check_fitted()
        return self.gradients.query_grads(query_data)

    def score(self, query_data=None, top_k: int | None = None, *, aggregate: bool = False, query_grads=None,
              per_block: bool = False, out=None):
        """`(m, n)` float32 scores (positive = up-weighting the training point raises the measurement: harmful
        for a loss); with `top_k=k` a `TopK` of (m, k) tensors.

        query_data: the queries (data forms of the module docstring), or `query_grads` ({name: (m, rows,
        cols)}, e.g. from `query_grads`; not for "forward"). aggregate: score the mean query gradient
        (DataInf's classification recipe, as `pyinf.influence(aggregate=True)`): `(n,)` (TopK of (k,)).
        per_block: `{block: (m, n)}` (`{block: (n,)}` with aggregate), each block's share in the blocks'
        order (they sum to the scores; see `pyinf.methods.base`); not for "forward" (`pyinf.analysis`).
        out=PATH: the scores are written to a `pyinf.scores.ScoreFile` at PATH (a directory) chunk by
        chunk, never held in memory, and that ScoreFile is returned; an interrupted write resumes at its
        first missing chunk (see `pyinf.scores`). One process, query data only; not for "forward".
        Data parallel: on rank 0; None on the other ranks.
        """
        self._check_fitted()
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if (query_data is None) == (query_grads is None):
            raise ValueError("pass the query data or query_grads (one of them)")
        if per_block and (top_k is not None or out is not None):
            raise ValueError("per_block=True returns every block's (m, n) share: it does not combine with top_k or out")
        if top_k is not None and out is not None:
            raise ValueError("out= writes the whole (m, n) scores: take the top k from the file (ScoreFile.top_k)")
        if out is not None and (aggregate or query_grads is not None):
            raise ValueError("out= identifies its run by the query data (a resumed write must be the same run): "
                             "pass query data, without aggregate or query_grads")
        an, grads = self.analysis, self.gradients
        an.check_score(per_block=bool(per_block), out=out)
        self._check_model()
        if out is not None:
            return self._score_to_file(query_data, out)
        m, queries = an.queries(grads, query_data, query_grads, bool(aggregate))
        if top_k is None:
            S = an.run(grads, "score", lambda: an.influence(grads, queries, per_block=bool(per_block)))
            S = grads.finish(S.float())
            if S is not None and aggregate:
                S = S[..., 0, :]
            return dict(zip((b.name for b in self.blocks), S)) if S is not None and per_block else S
        top = an.run(grads, "score", lambda: self._top_k_streamed(an.score_chunks(grads, queries), m, top_k))
        return TopK(*(t[0] for t in top)) if aggregate and top is not None else top

    def _score_to_file(self, query_data, path):
        """`score(out=path)`: the scoring pass written to a `pyinf.scores.ScoreFile`, resumed where an
        earlier run on the same fit and queries stopped (its saved H: no query capture, no precondition)."""
        from .scores import ScoreFile, digest_batches

        an, grads = self.analysis, self.gradients
        if grads.comm is not None:
            raise ValueError("score(out=...) is single-process: score without a process group (distributed=False)")
        queries = list(grads.batches(query_data))  # read twice: digest, capture
        digest, m = digest_batches(queries)
        meta = {"method": self.config["method"], "model": grads.fingerprint, "queries": digest,
                "config": {k: v for k, v in self.config.items() if k not in ("progress", "store")},
                "train": {"n": grads.n, "skipped": self.skipped}}
        sf = ScoreFile.create_or_resume(path, shape=(m, grads.n), meta=meta, skipped=self.skipped)
        if sf.complete:
            return sf
        H = sf.saved_preconditioned(self.device)
        V = an.queries(grads, queries, None, False)[1] if H is None else None

        def run():
            nonlocal H
            if H is None:
                H = an.precondition(grads, V)
                sf.save_preconditioned(H)
            return sf.write_pass(an.preconditioned_chunks(grads, H, start=sf.resume_at))

        return an.run(grads, "score", run)

    def _top_k_streamed(self, chunks, m: int, k: int) -> TopK | None:
        grads = self.gradients
        empty = torch.empty(m, 0, device=self.device)
        none = torch.empty(m, 0, dtype=torch.long, device=self.device)
        hv, hi, av, ai = empty, none, empty, none
        offset = grads.store.offset if grads.comm is not None else 0
        for start, cols in chunks:
            cols = cols.float()
            idx = torch.arange(offset + start, offset + start + cols.shape[1], device=cols.device).expand(m, -1)
            hv, hi = _merge_top(hv, hi, cols, idx, k, largest=False)
            av, ai = _merge_top(av, ai, cols, idx, k, largest=True)
        if grads.comm is not None:  # every rank's top k, merged on rank 0
            parts = [grads.comm.gather_cols(t) for t in (hv, hi, av, ai)]
            if parts[0] is None:
                return None
            hv, hi = _merge_top(empty, none, parts[0], parts[1], k, largest=False)
            av, ai = _merge_top(empty, none, parts[2], parts[3], k, largest=True)
        if grads.kept_index is not None:  # kept-sample positions -> the data's indices
            kept = grads.kept_index.to(hi.device)
            hi, ai = kept[hi], kept[ai]
        return TopK(hv, hi, av, ai)

    def token_scores(self, query_data, train_data) -> torch.Tensor:
        """`(m, n_t, T)` float32: the share of each position t of each training sequence in its scores
        (they sum over t to `score`'s columns); `train_data` (any sequences, in the data forms above;
        n_t of them, T the longest, shorter batches padded with 0) is captured again, one forward and
        backward a batch, evaluating `−Σ_b u_tᵀ H_b v_t` from the captured factors without per-token
        gradients (`TrainGradients.token_scores`). The math, what a token's share means, and the blocks
        it takes: `pyinf.token_scores`. One process only; not for "forward" (no preconditioned queries)."""
        self._check_fitted()
        an, grads = self.analysis, self.gradients
        an.check_score(tokens=True)
        if grads.comm is not None:
            raise ValueError("token_scores is single-process: call it without a process group (distributed=False)")
        self._check_model()
        V = an.queries(grads, query_data, None, False)[1]
        H = an.run(grads, "precondition", lambda: an.precondition(grads, V))
        return grads.token_scores(train_data, H)

    def self_influence(self) -> torch.Tensor | None:
        """`(n,)` float32: −g_iᵀ H⁻¹ g_i (≤ 0; rank by magnitude). Data parallel: rank 0 (None elsewhere)."""
        self._check_fitted()
        self._check_model()
        an, grads = self.analysis, self.gradients
        return grads.finish(an.run(grads, "self-influence", lambda: an.self_influence(grads)).float())

    @staticmethod
    def top_k(scores: torch.Tensor, k: int, helpful: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k most helpful (most negative) or harmful scores along the last dim."""
        return scores.topk(min(k, scores.shape[-1]), dim=-1, largest=not helpful, sorted=True)

    # -- persistence -------------------------------------------------------
    def save(self, path) -> None:
        """One file: config, block list, the method's statistics and the store.

        Memory stores ("gpu"/"cpu") save their gradients in the file (scoring
        new queries reads them); a disk store saves its directory (keep it);
        "none" saves the batch hashes (pass `train_data` to `load`). The task's
        functions are not saved (pass them to `load`).
        """
        self._check_fitted()
        method = self.analysis.state()
        grads = self.gradients.state()
        state = {"format": SAVE_FORMAT, "version": SAVE_VERSION, "config": self.config, "blocks": grads["blocks"],
                 "fingerprint": grads["fingerprint"], "method": method, "store": grads["store"]}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, model, *, loss=None, task: Task | None = None, train_data=None, progress="saved",
             check_model=True) -> "Attributor":
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
        self = cls(model, loss=loss, task=task, progress=progress, distributed=False, check_model=check_model,
                   **{k: c[k] for k in keys}, **c["options"])
        saved = {"config": {k: self.config[k] for k in CAPTURE_KEYS},
                 **{k: state[k] for k in ("blocks", "fingerprint", "store")}}
        grads = TrainGradients.restore(model, saved, self.task, progress=progress, check_model=check_model,
                                       train_data=train_data, source=str(path))
        self.analysis.load_state(state["method"], grads)
        self.gradients = grads
        return self
