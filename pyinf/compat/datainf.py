"""Drop-ins for ``IFEngine`` and ``IFEngineGeneration`` of the DataInf research code.

The research code (Kwon et al., ICLR 2024, github.com/ykwon0407/DataInf,
``src/influence.py``) takes per-sample gradients as nested dicts
``{sample index: {param name: tensor}}`` and loops in Python over samples x
parameters x queries. These classes keep its public surface (constructors,
methods, ``hvp_dict`` / ``IF_dict`` / ``time_dict`` layouts, the pickle written
by ``save_result``) and its numbers, but stack the nested dicts once into
per-parameter tensors ``(n, D_w)`` and run pyinf's batched methods on them:

===========  =====================================  ==========================================
key          pyinf method                           vs the original
===========  =====================================  ==========================================
identity     ``tracin`` (H = I)                     same numbers
proposed     ``datainf`` (Sherman-Morrison sum)     same numbers
LiSSA        the original's own update rule         same numbers (its quirks kept, see below)
accurate     ``exact`` (true ``(F + lambda I)^-1``) CORRECTED, see below
===========  =====================================  ==========================================

Damping: the original's per-parameter ``lambda = mean_i mean(g_i**2) / lambda_const_param``
is pyinf's relative damping with ``damping = 1 / lambda_const_param``.

Where the results deliberately differ from the original:

* ``'accurate'``: the original eigendecomposes ``sum_i g_i g_i^T`` with the general
  ``torch.linalg.eig`` and applies ``V.T`` in place of ``V^{-1}``, which is wrong
  whenever eigenvalues are degenerate (always, when n < D: the null space). Here it
  is pyinf's ``exact`` method, the true ``(F + lambda I)^{-1} v`` with
  ``F = (1/n) sum_i g_i g_i^T`` (Cholesky in float64). The original also reshaped
  this hvp to ``(len(w), -1)`` (a 1-D parameter became ``(D, 1)``) and rounded it to
  float32; here every hvp has the parameter's shape and 'accurate' stays float64, so
  that its scores keep the precision of the solve (rounding would cost ~cond * eps).

Kept as the original has them, so that numbers compare with published results:

* ``'LiSSA'`` runs the original rule ``h <- v + h - alpha * ((1/n) sum_i <g_i, h> g_i - lambda h)``
  for 10 iterations from ``h = v`` and returns ``h``, i.e. ``h <- v + (I - F + lambda I) h``
  (alpha = 1) where LiSSA needs ``(I - (F + lambda I)/s)``: the damping enters with the
  wrong sign and there is no scaling ``s``, so it is
  not an estimate of ``(F + lambda I)^{-1} v``: when ``F`` and ``lambda`` are small
  (typical gradient scales) ``h_10 ~ 11 v``, so its ranking collapses to the
  identity method's (and with large ``F`` it diverges). Use
  ``pyinf.influence(..., method="lissa")`` for a convergent LiSSA.
* Signs: both ``IFEngine.compute_IF`` and ``IFEngineGeneration.compute_IF`` return
  ``-<h, g_i>``, pyinf's convention (negative = helpful), as the DataInf code has
  since its commit c685ca29 (pull request #3, January 2024: "add negative sign for
  influence values from IFEngineGeneration"). Until then ``IFEngineGeneration``
  returned ``+<h_j, g_i>``, which reverses every ranking; results produced with that
  2023 code are reproduced with ``IFEngineGeneration(sign="2023")``.

Other small differences: weight names are taken from the first validation
sample (the original requires a key ``0``); sample keys may be any hashable
(the original requires ``0..n-1``); gradients may live on any device;
``compute_IF`` prints nothing; a parameter whose training gradients are all
zero raises an error naming it (the original divides by zero).
"""
from __future__ import annotations

import pickle
from collections import defaultdict
from dataclasses import dataclass
from time import time
from typing import Any, Hashable, Mapping

import torch

from ..backends import get_backend
from ..blocks import TensorSource, as_blocks, compute_dtype
from ..methods import Method, get_method
from ..options import Options, any_value

__all__ = ["IFEngine", "IFEngineGeneration"]

GradDict = Mapping[Hashable, Mapping[str, torch.Tensor]]

_PANDAS_MSG = (
    "IFEngineGeneration.compute_IF returns pandas DataFrames, but pandas is not installed: "
    "pip install pyinf[compat]"
)


@dataclass(frozen=True)
class _OriginalLiSSAOptions(Options):
    n_iteration: int = any_value(10)  # unchecked, as the research code
    alpha_const: float = any_value(1.0)


class _OriginalLiSSA(Method):
    """The DataInf research code's LiSSA, batched over queries and samples.

    ``h_0 = v``; ``h_{t+1} = v + h_t - alpha * (F h_t - lambda h_t)`` with
    ``F h = (1/n) sum_i <g_i, h> g_i``; returns ``h_T``. Note ``-lambda`` (the damping
    with the wrong sign) and no scaling: reproduced on purpose, see the module docstring.
    """

    name = "lissa-datainf-original"
    Options = _OriginalLiSSAOptions

    def precondition(self, queries):
        V = self._stacked(queries)
        lam = [self._group_lam(g) for g in self.groups]
        alpha = float(self.opts["alpha_const"])
        H = list(V)
        for _ in range(int(self.opts["n_iteration"])):
            FH = [torch.zeros_like(h) for h in H]  # (1/n) sum_i <g_i, h> g_i
            for _, chunk in self.train.chunks():
                for i, (_, G) in enumerate(self._grouped(chunk)):
                    w = torch.full(G.shape[:2], 1.0 / self.n, dtype=self.dtype, device=G.device)
                    self.backend.rank_one_accumulate(FH[i], G, H[i], w)
            H = [v + h - alpha * (fh - lm * h) for v, h, fh, lm in zip(V, H, FH, lam)]
        return self._unstacked(H)


def _weight_names(val_grad_dict: GradDict) -> tuple[list[Hashable], list[str], dict[str, torch.Size]]:
    ids = list(val_grad_dict)
    if not ids:
        raise ValueError("val_grad_dict is empty")
    first = val_grad_dict[ids[0]]
    names = list(first)
    if not names:
        raise ValueError(f"val_grad_dict[{ids[0]!r}] holds no parameters")
    return ids, names, {w: first[w].shape for w in names}


def _stack(grad_dict: GradDict, names: list[str], what: str) -> tuple[list[Hashable], dict[str, torch.Tensor]]:
    """``{id: {w: tensor}}`` -> (ids in dict order, ``{w: (N, D_w)}``): the one copy of the inputs."""
    ids = list(grad_dict)
    if not ids:
        raise ValueError(f"{what} is empty")
    out = {}
    for w in names:
        try:
            rows = [grad_dict[i][w] for i in ids]
        except KeyError:
            bad = next(i for i in ids if w not in grad_dict[i])
            raise ValueError(f"{what}[{bad!r}] has no parameter {w!r}") from None
        try:
            out[w] = torch.stack(rows).detach().reshape(len(ids), -1)
        except RuntimeError as exc:
            raise ValueError(f"{what}: parameter {w!r} has different sizes across samples ({exc})") from None
    return ids, out


class _Stacked:
    """The stacked problem shared by both engines: train source, queries, scorer."""

    def __init__(self, tr_grad_dict: GradDict, val_grad_dict: GradDict, backend: str):
        self.val_ids, self.names, self.shapes = _weight_names(val_grad_dict)
        self.tr_ids, G = _stack(tr_grad_dict, self.names, "tr_grad_dict")
        _, V = _stack(val_grad_dict, self.names, "val_grad_dict")
        self.train = TensorSource(as_blocks(G, "tr_grad_dict"))
        self.dtype = compute_dtype(self.train.dtype, *(v.dtype for v in V.values()))
        self.V = {w: v.to(self.train.device, self.dtype) for w, v in V.items()}  # {w: (m, D_w)}
        self.backend = get_backend(backend, self.train.device)
        self.scorer = get_method("tracin")(self.backend).fit(self.train)  # its score(): -sum_w H_w G_w^T

    def precondition(self, method: str | type[Method], V: dict[str, torch.Tensor], lambda_const_param: float, **opts):
        """``V`` {w: (m, D_w)} -> ``H`` {w: (m, D_w)} (float32, float64 for exact), damping ``1/lambda_const_param``.

        ``method``: a pyinf method name, fitted with relative damping, as ``pyinf.influence`` does.
        """
        if not lambda_const_param > 0:
            raise ValueError(f"lambda_const_param must be > 0, got {lambda_const_param!r}")
        cls = get_method(method) if isinstance(method, str) else method
        damping = 1.0 / float(lambda_const_param)
        return cls(self.backend, damping=damping, damping_mode="relative", **opts).fit(self.train).precondition(V)

    def score(self, Hs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """``Hs`` [{w: (m_k, D_w)}] -> [``(m_k, n)``] float64 CPU scores ``-sum_w <h_jw, g_iw>``.

        All the hvps are scored in ONE pass over the training gradients (rows concatenated),
        in float64 when any hvp is float64 ('accurate': rounding it would cost ~cond * eps).
        """
        sizes = [next(iter(H.values())).shape[0] for H in Hs]
        dtype = torch.float64 if any(h.dtype == torch.float64 for H in Hs for h in H.values()) else self.dtype
        H = {
            w: torch.cat([h[w].reshape(h[w].shape[0], -1).to(self.train.device, dtype) for h in Hs])
            for w in self.names
        }
        return list(self.scorer.score_pass(self.train, H).double().cpu().split(sizes))

    def unflatten(self, h: torch.Tensor, w: str) -> torch.Tensor:
        """``(D_w,)`` -> the parameter's shape."""
        return h.reshape(self.shapes[w])


class IFEngine:
    """DataInf's ``IFEngine``: influence of each training point on the mean validation loss.

    Usage (as the original)::

        engine = IFEngine()
        engine.preprocess_gradients(tr_grad_dict, val_grad_dict, noise_index)
        engine.compute_hvps(lambda_const_param=10, compute_accurate=True)
        engine.compute_IF()
        engine.IF_dict["proposed"]   # numpy (n,), -<h, g_i>

    Attributes after the calls: ``hvp_dict[key]`` ``{param name: tensor of the param's
    shape}`` for key in ``'identity', 'proposed', 'LiSSA', 'accurate'``; ``IF_dict[key]``
    float64 numpy array ``(n,)`` in ``tr_grad_dict`` order (``-<h, g_i>``, pyinf's sign);
    ``time_dict[key]`` seconds
    (float) spent computing that hvp. See the module docstring for what differs from
    the original ('accurate' is computed correctly and kept float64, 'LiSSA' keeps its
    original rule).

    ``backend`` (extra, keyword): the pyinf backend, ``"auto"`` by default.
    """

    def __init__(self, *, backend: str = "auto"):
        self.backend = backend
        self.time_dict = defaultdict(list)
        self.hvp_dict = defaultdict(list)
        self.IF_dict = defaultdict(list)

    def preprocess_gradients(self, tr_grad_dict: GradDict, val_grad_dict: GradDict, noise_index: Any) -> None:
        """Stack the gradients once and average the validation gradients.

        ``tr_grad_dict`` ``{i: {w: tensor}}`` for n training points, ``val_grad_dict``
        ``{j: {w: tensor}}`` for m validation points (same parameter names and shapes;
        the names are those of the first validation sample). ``noise_index`` is only
        stored (as the original does).
        """
        self.tr_grad_dict = tr_grad_dict
        self.val_grad_dict = val_grad_dict
        self.noise_index = noise_index
        self.n_train = len(tr_grad_dict)
        self.n_val = len(val_grad_dict)
        self._p = _Stacked(tr_grad_dict, val_grad_dict, self.backend)
        self.compute_val_grad_avg()

    def compute_val_grad_avg(self) -> None:
        """``val_grad_avg_dict`` ``{w: tensor of w's shape}``: the mean validation gradient."""
        p = self._p
        self._v_avg = {w: v.mean(dim=0, keepdim=True) for w, v in p.V.items()}  # {w: (1, D_w)}
        self.val_grad_avg_dict = {w: p.unflatten(v[0], w) for w, v in self._v_avg.items()}

    def compute_hvps(self, lambda_const_param: float = 10, compute_accurate: bool = True) -> None:
        """Fill ``hvp_dict`` with 'identity', 'proposed', 'LiSSA' and (if asked) 'accurate'."""
        self.compute_hvp_identity()
        self.compute_hvp_proposed(lambda_const_param=lambda_const_param)
        self.compute_hvp_LiSSA(lambda_const_param=lambda_const_param)
        if compute_accurate:
            self.compute_hvp_accurate(lambda_const_param=lambda_const_param)

    def _store(self, key: str, start: float, H: dict[str, torch.Tensor]) -> None:
        self.hvp_dict[key] = {w: self._p.unflatten(H[w][0], w) for w in self._p.names}
        self.time_dict[key] = time() - start

    def compute_hvp_identity(self) -> None:
        """``hvp_dict['identity']``: the mean validation gradient itself (TracIn)."""
        start = time()
        self.hvp_dict["identity"] = self.val_grad_avg_dict.copy()
        self.time_dict["identity"] = time() - start

    def compute_hvp_proposed(self, lambda_const_param: float = 10) -> None:
        """``hvp_dict['proposed']`` ``{w: tensor}``: DataInf's closed form (pyinf ``datainf``)."""
        start = time()
        self._store("proposed", start, self._p.precondition("datainf", self._v_avg, lambda_const_param))

    def compute_hvp_accurate(self, lambda_const_param: float = 10) -> None:
        """``hvp_dict['accurate']`` ``{w: float64 tensor}``: the true ``(F + lambda I)^{-1} v`` (pyinf ``exact``).

        Corrected: the original's ``eig``-based formula is wrong with degenerate eigenvalues.
        float64 (the original: float32), so that the scores keep the precision of the solve.
        """
        start = time()
        self._store("accurate", start, self._p.precondition("exact", self._v_avg, lambda_const_param))

    def compute_hvp_LiSSA(self, lambda_const_param: float = 10, n_iteration: int = 10, alpha_const: float = 1.0) -> None:
        """``hvp_dict['LiSSA']`` ``{w: tensor}`` by the ORIGINAL update rule (wrong damping sign, no scaling)."""
        start = time()
        H = self._p.precondition(
            _OriginalLiSSA, self._v_avg, lambda_const_param, n_iteration=n_iteration, alpha_const=alpha_const
        )
        self._store("LiSSA", start, H)

    def compute_IF(self) -> None:
        """``IF_dict[key]`` = float64 numpy ``(n,)``: ``-sum_w <hvp_dict[key][w], g_iw>`` for every key."""
        keys = list(self.hvp_dict)
        Hs = [{w: self.hvp_dict[key][w].reshape(1, -1) for w in self._p.names} for key in keys]
        for key, scores in zip(keys, self._p.score(Hs)):
            self.IF_dict[key] = scores[0].numpy()

    def save_result(self, noise_index: Any, run_id: int = 0) -> None:
        """Pickle ``{'runtime': time_dict, 'noise_index': noise_index, 'influence': IF_dict}``
        to ``./results_{run_id}.pkl`` (as the original)."""
        results = {"runtime": self.time_dict, "noise_index": noise_index, "influence": self.IF_dict}
        with open(f"./results_{run_id}.pkl", "wb") as file:
            pickle.dump(results, file)


class IFEngineGeneration:
    """DataInf's ``IFEngineGeneration``: influence of each training point on each validation point.

    Usage (as the original)::

        engine = IFEngineGeneration()
        engine.preprocess_gradients(tr_grad_dict, val_grad_dict)
        engine.compute_hvps(lambda_const_param=10)
        engine.compute_IF()
        engine.IF_dict["proposed"]   # DataFrame (m, n): rows = validation ids, columns = train ids

    ``hvp_dict['identity']`` is (a shallow copy of) ``val_grad_dict``; ``hvp_dict['proposed']``
    is ``{val id: {param name: tensor of the param's shape}}``. ``IF_dict[key]`` is a float64
    DataFrame whose entry ``[j, i]`` is ``-<h_j, g_i>`` = ``pyinf.influence(..., aggregate=False)[j, i]``,
    as the DataInf code computes it since January 2024 (module docstring).
    Needs pandas (``pip install pyinf[compat]``), for ``compute_IF`` only.

    Extras (keyword): ``backend``, the pyinf backend (``"auto"``); ``sign``: ``"current"``
    (default, ``-<h_j, g_i>``) or ``"2023"`` (``+<h_j, g_i>``, the sign of the DataInf code
    before its commit c685ca29, to reproduce results made with it; rankings are reversed).
    """

    SIGNS = ("current", "2023")

    def __init__(self, *, backend: str = "auto", sign: str = "current"):
        if sign not in self.SIGNS:
            raise ValueError(
                f"sign must be one of {self.SIGNS} ('current': -<h_j, g_i> as DataInf computes it since "
                f"January 2024; '2023': the earlier +<h_j, g_i>), got {sign!r}"
            )
        self.backend = backend
        self.sign = sign
        self.time_dict = defaultdict(list)
        self.hvp_dict = defaultdict(list)
        self.IF_dict = defaultdict(list)

    def preprocess_gradients(self, tr_grad_dict: GradDict, val_grad_dict: GradDict) -> None:
        """Stack ``tr_grad_dict`` ``{i: {w: tensor}}`` (n points) and ``val_grad_dict``
        ``{j: {w: tensor}}`` (m points) once into per-parameter ``(n, D_w)`` / ``(m, D_w)``."""
        self.tr_grad_dict = tr_grad_dict
        self.val_grad_dict = val_grad_dict
        self.n_train = len(tr_grad_dict)
        self.n_val = len(val_grad_dict)
        self._p = _Stacked(tr_grad_dict, val_grad_dict, self.backend)

    def compute_hvps(self, lambda_const_param: float = 10) -> None:
        """Fill ``hvp_dict`` with 'identity' and 'proposed'."""
        self.compute_hvp_identity()
        self.compute_hvp_proposed(lambda_const_param=lambda_const_param)

    def compute_hvp_identity(self) -> None:
        """``hvp_dict['identity']`` = ``val_grad_dict.copy()`` (TracIn)."""
        start = time()
        self.hvp_dict["identity"] = self.val_grad_dict.copy()
        self.time_dict["identity"] = time() - start

    def compute_hvp_proposed(self, lambda_const_param: float = 10) -> None:
        """``hvp_dict['proposed']`` ``{val id: {w: tensor}}``: DataInf's closed form per query (pyinf ``datainf``)."""
        start = time()
        p = self._p
        H = p.precondition("datainf", p.V, lambda_const_param)  # {w: (m, D_w)}
        hvps = defaultdict(dict)
        for w in p.names:
            for j, val_id in enumerate(p.val_ids):
                hvps[val_id][w] = p.unflatten(H[w][j], w)
        self.hvp_dict["proposed"] = hvps
        self.time_dict["proposed"] = time() - start

    def compute_IF(self) -> None:
        """``IF_dict[key]`` = float64 DataFrame ``(m, n)``, index = validation ids, columns =
        train ids, entry ``-sum_w <hvp_dict[key][j][w], g_iw>`` (``+`` with ``sign="2023"``)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(_PANDAS_MSG) from exc
        p = self._p
        keys = list(self.hvp_dict)
        Hs = [
            {w: torch.stack([self.hvp_dict[key][j][w].reshape(-1) for j in p.val_ids]) for w in p.names}
            for key in keys
        ]
        # The original builds DataFrame({train id: {val id: value}}); pandas infers the column
        # index from the dict keys (a RangeIndex for 0..n-1 in pandas 3). Let pandas infer it the
        # same way once, from an empty frame, then build each frame from its (m, n) array.
        columns = pd.DataFrame(dict.fromkeys(p.tr_ids, ()), dtype=float).columns
        index = list(p.val_ids)
        for key, scores in zip(keys, p.score(Hs)):
            values = scores.numpy() if self.sign == "current" else -scores.numpy()
            self.IF_dict[key] = pd.DataFrame(values, index=index, columns=columns, dtype=float)

    def save_result(self, run_id: int = 0) -> None:
        """Pickle ``{'runtime': time_dict, 'influence': IF_dict}`` to ``./results_{run_id}.pkl`` (as the original)."""
        results = {"runtime": self.time_dict, "influence": self.IF_dict}
        with open(f"./results_{run_id}.pkl", "wb") as file:
            pickle.dump(results, file)
