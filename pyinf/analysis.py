"""The one protocol `pyinf.Attributor` calls: every method, Forward-INF included.

    an = make_analysis("datainf", device, damping=0.1, damping_mode="relative", backend="auto", options={})
    config = capture_config(device, **an.capture_options())   # what the capture must add (K-FAC statistics)
    an.check_capture(config)                  # capture options it cannot work with: ValueError
    an.fit(grads)                             # grads: a `pyinf.gradients.TrainGradients`
    m, queries = an.queries(grads, query_data, None, aggregate=False)
    S = an.run(grads, "score", lambda: an.influence(grads, queries))            # (m, n_local)
    top = an.run(grads, "score", lambda: fold(an.score_chunks(grads, queries)))  # (start, (m, c)) chunks
    an.run(grads, "self-influence", lambda: an.self_influence(grads))           # (n_local,)
    an.check_score(per_block=True)            # score options it cannot honour: ValueError
    H = an.precondition(grads, queries)       # score files, token scores: the preconditioned queries
    an.preconditioned_chunks(grads, H, start=0)                                 # (start, (m, c)) chunks
    an.state(); an.load_state(state, grads); an.report()

Two implementations:

- `GradientAnalysis`: a method of `pyinf.methods` (tracin, datainf, exact,
  lissa, hyperinf, kfac, ekfac) on the stored training gradients: `fit` and
  every score are passes over the store (`TrainGradients.run_pass`: one
  progress phase, OOM retries), queries are the gradients of the task's
  measurement (`TrainGradients.shared_query_grads`) or given ones.
- `ForwardAnalysis`: Forward-INF (`pyinf.forward`): `fit` keeps the training
  batches and computes their losses, a score takes optimizer steps on each
  query's measurement and evaluates the training losses with forward passes.
  It reads no stored gradient (its capture is store="none"), keeps none (no
  self-influence, no save, no score file), is not linear in the query gradient
  (no aggregate), has no preconditioned queries (no token scores), and its
  scores, loss differences after moving every attributed block at once, do
  not split into block shares (no per_block).

Options: each method's dataclass (`pyinf.options`), validated at
construction; `report()` prints them with the damping and the backend.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from .backends import get_backend
from .blocks import as_blocks, check_finite, mean_query
from .forward import ForwardInfluence, ForwardOptions
from .methods import METHODS, get_method
from .batches import batch_len

__all__ = ["Analysis", "GradientAnalysis", "ForwardAnalysis", "make_analysis", "shared_capture_options", "ANALYSES"]

# Method-state entries that are not statistics: rebuilt from the store and the options at load.
_NOT_SAVED = ("backend", "train", "blocks", "groups", "comm", "args")


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class Analysis:
    """The protocol (module docstring). `grads` is always the `TrainGradients` the analysis was fitted on."""

    name: str
    takes_query_grads = True  # `queries` accepts query gradients (False: it needs the query data)

    def capture_options(self) -> dict:
        """Capture options this analysis needs (`pyinf.gradients.capture_config` keywords)."""
        return {}

    def check_capture(self, config: dict) -> None:
        """ValueError for capture options (`TrainGradients.config`) this analysis cannot work with."""

    def fit(self, grads) -> None:
        """Prepare from the captured `grads` (a `TrainGradients`): the method's passes over its store, or Forward-INF's base losses."""
        raise NotImplementedError

    def queries(self, grads, query_data, query_grads, aggregate: bool) -> tuple[int, object]:
        """(m, the queries in this analysis's form) from query data or query gradients {name: (m, rows, cols)}."""
        raise NotImplementedError

    def check_score(self, *, per_block: bool = False, out=None, tokens: bool = False) -> None:
        """ValueError for what this analysis cannot score: per-block shares, a score file (`out`), token scores."""

    def influence(self, grads, queries, per_block: bool = False) -> torch.Tensor:
        """`(m, n_local)` scores of this rank's training samples (positive = raises the measurement);
        `per_block`: `(n_blocks, m, n_local)`, each block's share, in the order of `grads.blocks`."""
        raise NotImplementedError

    def score_chunks(self, grads, queries) -> Iterator[tuple[int, torch.Tensor]]:
        """The same scores as `(start, (m, c))` column chunks (a top-k keeps no (m, n) matrix)."""
        raise NotImplementedError

    def precondition(self, grads, queries) -> dict[str, torch.Tensor]:
        """The preconditioned queries `{name: (m, D_b)}` (a score file saves them, token scores read them)."""
        raise NotImplementedError

    def preconditioned_chunks(self, grads, H, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """The scoring pass of `H` as `(start, (m, c))` chunks from the chunk holding sample `start` on."""
        raise NotImplementedError

    def self_influence(self, grads) -> torch.Tensor:
        """`(n_local,)`: −g_iᵀ H⁻¹ g_i."""
        raise NotImplementedError

    def run(self, grads, what: str, fn: Callable):
        """`fn()`, the passes of one public call (`what`: "score", "self-influence")."""
        return fn()

    def state(self) -> dict:
        """The fitted statistics (tensors on the CPU), for `Attributor.save`."""
        raise NotImplementedError

    def load_state(self, state: dict, grads) -> None:
        """Restore what `state()` returned, on `grads` (the same training gradients, reloaded)."""
        raise NotImplementedError

    def report(self) -> dict:
        """The method, its damping and every option (defaults included), and where it runs."""
        raise NotImplementedError


class GradientAnalysis(Analysis):
    """A method of `pyinf.methods` on the stored gradients (module docstring)."""

    def __init__(self, cls, device: torch.device, damping: float, damping_mode: str, backend: str, options: dict):
        self.name = cls.name
        self._make = lambda: cls(get_backend(backend, device), damping=damping, damping_mode=damping_mode, **options)
        self.method = self._make()  # validates the damping and the options now

    def capture_options(self):
        if not self.method.needs_factors:
            return {}
        return {"factors": self.method.args.fisher, "seed": self.method.args.seed}

    def fit(self, grads):
        probe, store = self.method, grads.store
        if probe.needs_factors and store.factors is None:
            raise ValueError(
                f"{self.name} needs the K-FAC statistics of the training data, which these gradients were captured "
                f"without: capture them with factors={probe.args.fisher!r}, seed={probe.args.seed} "
                f"(pyinf.capture_gradients) or use Attributor(model, method={self.name!r}).fit(train_data)"
            )
        if probe.refits_eigenvalues and probe.args.fisher == "true":
            store.fisher_gradients = grads.sampled_label_gradients(probe.args.seed)
        self.method = grads.run_pass(f"{self.name}: fit", lambda: self._make().fit(store))

    def queries(self, grads, query_data, query_grads, aggregate):
        if query_grads is None:
            V = grads.shared_query_grads(query_data)
        else:
            V = as_blocks(query_grads, "query_grads", blocks=grads.blocks)
            for name, t in V.items():
                check_finite(name, t, "query gradient")
            V = {name: t.to(grads.device) for name, t in V.items()}
        if aggregate:
            V = mean_query(V, grads.store.dtype)
        return next(iter(V.values())).shape[0], V

    def influence(self, grads, queries, per_block=False):
        S = self.method.influence(queries, per_block=per_block)  # what pyinf.influence runs
        if not per_block:
            return S
        pos = {b.name: k for k, b in enumerate(self.method.blocks)}  # the method's order -> the capture's
        return S[[pos[b.name] for b in grads.blocks]]

    def score_chunks(self, grads, queries):
        yield from self.preconditioned_chunks(grads, self.precondition(grads, queries))

    def precondition(self, grads, queries):
        return self.method.precondition(queries)

    def preconditioned_chunks(self, grads, H, start=0):
        yield from self.method.score_chunks(grads.store, H, start=start)

    def self_influence(self, grads):
        return self.method.self_influence(grads.store)

    def run(self, grads, what, fn):
        return grads.run_pass(f"{self.name}: {what}", fn)

    def state(self):
        # Every statistic the method fitted (λ, norms, factors, inverses, ...), whatever the method.
        return _map_tensors({k: v for k, v in vars(self.method).items() if k not in _NOT_SAVED}, lambda t: t.cpu())

    def load_state(self, state, grads):
        method = self._make()
        vars(method).update(_map_tensors(state, lambda t: t.to(grads.device)))
        method.blocks, method.groups, method.train = grads.store.blocks, grads.store.groups, grads.store
        self.method = method

    def report(self):
        m = self.method
        return {"method": self.name, "damping": m.damping, "damping_mode": m.damping_mode,
                "backend": m.backend.name, "options": m.args.report()}


class ForwardAnalysis(Analysis):
    """Forward-INF (`pyinf.forward`) on the training batches the capture kept (module docstring)."""

    name = "forward"
    takes_query_grads = False

    def __init__(self, options: dict):
        self.args = ForwardOptions.make(self.name, **options)  # validated now (lr is required)
        self.engine: ForwardInfluence | None = None

    def capture_options(self):
        return {"store": "none"}  # no stored gradient is read: the capture keeps the data's batches and sizes

    def check_capture(self, config):
        if config["nan_policy"] == "skip":
            raise ValueError("nan_policy='skip' is not available for method 'forward' (it keeps no gradients)")

    def fit(self, grads):
        a, c, task = self.args, grads.config, grads.task
        engine = ForwardInfluence(grads.model, lr=a.lr, steps=a.steps, optimizer=a.optimizer,
                                  queries_per_pass=a.queries_per_pass, use_triton=a.use_triton,
                                  blocks=c["blocks"] if a.moves is None else a.moves, loss=task.train_loss,
                                  measurement=task.measurement, batch_size=c["batch_size"], progress=grads.progress)
        grads.everywhere(lambda: engine.fit(grads.data), "fit")
        self.engine = engine

    def queries(self, grads, query_data, query_grads, aggregate):
        if query_grads is not None:
            raise ValueError("method 'forward' steps on the query data's measurement: pass query data, not query_grads")
        if aggregate:
            raise ValueError("aggregate=True is not available for method 'forward' (it is not linear in the query "
                             "gradient); average the rows of score() instead")
        batches = list(grads.batches(query_data))
        return sum(batch_len(b) for b in batches), batches

    def check_score(self, *, per_block=False, out=None, tokens=False):
        if per_block:
            raise ValueError("per_block is not available for method 'forward': its scores are loss differences after "
                             "moving every attributed block at once, which do not split into block shares (to first "
                             "order they are tracin's: use method='tracin', per_block=True)")
        if out is not None:
            raise ValueError("out= is not available for method 'forward' (it keeps no gradients to stream)")
        if tokens:
            raise ValueError("token_scores is not available for method 'forward' (it has no preconditioned queries)")

    def influence(self, grads, queries, per_block=False):
        self.check_score(per_block=per_block)
        return self.engine.score(queries)

    def score_chunks(self, grads, queries):
        yield 0, self.engine.score(queries)

    def self_influence(self, grads):
        raise ValueError("self_influence is not available for method 'forward' (it keeps no gradients)")

    def state(self):
        raise ValueError("save is not available for method 'forward' (it keeps no gradients)")

    def report(self):
        return {"method": self.name, "backend": "model forward passes", "options": self.args.report()}


ANALYSES = (*METHODS, ForwardAnalysis.name)


def make_analysis(method: str, device: torch.device, *, damping: float = 0.1, damping_mode: str = "relative",
                  backend: str = "auto", options: dict | None = None) -> Analysis:
    """The analysis of `method` (one of `ANALYSES`), its options validated (ValueError)."""
    if method == ForwardAnalysis.name:
        return ForwardAnalysis(options or {})  # Forward-INF takes no damping
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(ANALYSES)}")
    return GradientAnalysis(get_method(method), device, damping, damping_mode, backend, options or {})


def shared_capture_options(analyses: list[Analysis]) -> dict:
    """The capture options under which one capture serves every analysis of a sweep: the K-FAC statistics
    when any needs them (all the same kind, else ValueError), store="none" only when none reads gradients."""
    wanted = [a.capture_options() for a in analyses]
    kinds = {(w["factors"], w["seed"]) for w in wanted if "factors" in w}
    if len(kinds) > 1:
        raise ValueError(f"these methods need K-FAC statistics of different kinds {sorted(kinds)} (fisher, seed): "
                         f"capture once per kind")
    out = dict(zip(("factors", "seed"), kinds.pop())) if kinds else {}
    if wanted and all(w.get("store") == "none" for w in wanted):
        out["store"] = "none"
    return out
