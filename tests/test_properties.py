"""Property-based tests (hypothesis) of `pyinf.influence` over random block shapes, dtypes and sizes.

Every example draws 1-3 blocks (matrix (rows, cols) or flat), n and m from 1,
a storage dtype (float32, bfloat16, float64) and a method, then checks: the
output's shape, dtype and finiteness; agreement of the "torch" and "cpu"
backends; permutation equivariance in the training points and in the queries;
`aggregate=True` = the mean over queries of the scores; linearity in the query.
Errors are normwise (max |a − b| / max |b|), tolerances by dtype.

DataInf is ill-conditioned at tiny n: its score −(1/λ)(⟨v, g_i⟩ − Σ_k c_k ⟨g_k, g_i⟩)
cancels terms of size ‖v‖‖g‖/λ down to ~⟨v, g⟩/‖g‖² (at n = 1 by a factor
‖g‖²/λ = D_b/c), so two float32 evaluations of it may differ by far more than
2e-4 of the result. For datainf the tolerance is therefore the larger of the
dtype's and the probabilistic rounding bound √D · u · Σ|terms| (u = 2⁻²⁴,
Higham & Mary 2019), computed in float64 from the example (`_datainf_error_bound`).

Hypothesis runs derandomized (tests/conftest.py registers the profile), so every
run draws the same examples on every machine.
"""
from __future__ import annotations

import warnings

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyinf  # noqa: E402
from pyinf.backends import BACKENDS  # noqa: E402

METHODS = ["tracin", "datainf", "exact", "lissa", "hyperinf"]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# LiSSA with a fixed number of steps (tol unreachable) is an exactly linear map of the query.
OPTIONS = {"lissa": {"iterations": 30, "tol": 1e-30}}
# The output is float32 whatever the input: float64 inputs are judged at float32 resolution.
TOL = {torch.float64: 1e-6, torch.float32: 2e-4, torch.bfloat16: 2e-4}  # bf16 storage, fp32 compute
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    shapes = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 6), st.booleans()), min_size=1, max_size=3))
    n, m = draw(st.integers(1, 7)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    method = draw(st.sampled_from(METHODS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def grads(count):
        out = {}
        for k, (rows, cols, flat) in enumerate(shapes):
            g = torch.randn(count, rows, cols, generator=gen, dtype=torch.float64)
            out[f"b{k}"] = (g.reshape(count, -1) if flat else g).to(dtype)  # a flat block: (count, D)
        return out

    return method, dtype, grads(n), grads(m)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _datainf_error_bound(train, query, damping=0.1):
    """(m, n) float64: bound on the rounding error of a float32 datainf score (relative damping).

    Σ_b √D_b u (‖v_j‖‖g_i‖ + Σ_k |c_jk| ‖g_k‖‖g_i‖) / λ_b with c_jk = ⟨v_j, g_k⟩ / (n (λ_b + ‖g_k‖²)):
    the terms the score is summed from, each a dot product of length D_b.
    """
    bound = 0.0
    for name, g in train.items():
        G = g.double().reshape(g.shape[0], -1)
        V = query[name].double().reshape(query[name].shape[0], -1)
        n, D = G.shape
        sq = (G * G).sum(dim=1)
        lam = damping * sq.mean() / D
        C = (V @ G.T) / (n * (lam + sq))
        gn = sq.sqrt()
        terms = V.norm(dim=1)[:, None] * gn[None, :] + C.abs() @ (gn[:, None] * gn[None, :])
        bound = bound + D**0.5 * 2.0**-24 * terms / lam
    return bound


def _tol(method, dtype, train, query, reference) -> float:
    """Normwise tolerance for two float32 evaluations of `reference` (the dtype's, or datainf's bound)."""
    tol = TOL[dtype]
    if method == "datainf" and dtype != torch.float64:
        scale = reference.double().abs().max().clamp_min(1e-30)
        tol = max(tol, float(2 * _datainf_error_bound(train, query).max() / scale))
    return tol


def _agg_tol(method, dtype, train, query, S, agg) -> float:
    """Tolerance of `agg` against the mean of the float32 scores `S`: `_tol`, and the rounding of S
    to float32 (u · max|S|), which the mean keeps while it cancels to |agg| ≪ |S|."""
    both = {k: torch.cat([v.double(), v.double().mean(dim=0, keepdim=True)]) for k, v in query.items()}
    rounding = 2 * 2.0**-24 * float(S.double().abs().max() / agg.double().abs().max().clamp_min(1e-30))
    return max(_tol(method, dtype, train, both, agg), rounding)


def _influence(train, query, method, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lissa's "did not reach tol", a missing extension
        return pyinf.influence(train, query, method=method, **OPTIONS.get(method, {}), **kw)


@SETTINGS
@given(problems())
def test_shape_dtype_finite_and_backends_agree(problem):
    method, dtype, train, query = problem
    n, m = next(iter(train.values())).shape[0], next(iter(query.values())).shape[0]
    S = _influence(train, query, method, backend="torch")
    assert S.shape == (m, n) and S.dtype == torch.float32 and bool(torch.isfinite(S).all())
    if "cpu" in BACKENDS:
        try:
            C = _influence(train, query, method, backend="cpu")
        except (RuntimeError, ImportError) as err:  # the C++ extension is not built
            pytest.skip(str(err))
        assert _err(C, S) <= _tol(method, dtype, train, query, S)
    agg = _influence(train, query, method, backend="torch", aggregate=True)
    assert agg.shape == (n,) and agg.dtype == torch.float32
    assert _err(agg, S.double().mean(dim=0)) <= _agg_tol(method, dtype, train, query, S, agg)


@SETTINGS
@given(problems(), st.randoms(use_true_random=False))
def test_permutation_equivariance(problem, rnd):
    method, dtype, train, query = problem
    n, m = next(iter(train.values())).shape[0], next(iter(query.values())).shape[0]
    S = _influence(train, query, method)
    p, q = list(range(n)), list(range(m))
    rnd.shuffle(p)
    rnd.shuffle(q)
    p, q = torch.tensor(p), torch.tensor(q)
    P = _influence({k: v[p] for k, v in train.items()}, {k: v[q] for k, v in query.items()}, method)
    assert _err(P, S[q][:, p]) <= _tol(method, dtype, train, query, S)


COEFFS = st.floats(0.1, 3.0) | st.floats(-3.0, -0.1)


@SETTINGS
@given(problems(), COEFFS, COEFFS)
def test_linear_in_the_query(problem, a, b):
    method, dtype, train, query = problem
    # Queries [v_j, v_0, a v_j + b v_0] (in float64, so that the combination is exact).
    q64 = {k: v.double() for k, v in query.items()}
    stacked = {k: torch.cat([v, v[:1], a * v + b * v[:1]]) for k, v in q64.items()}
    m = next(iter(query.values())).shape[0]
    S = _influence(train, stacked, method).double()
    combo = a * S[:m] + b * S[m : m + 1]
    scale = max(S[:m].abs().max(), S[m : m + 1].abs().max()) * (abs(a) + abs(b))
    if float(scale) > 0:
        tol = TOL[dtype]
        if method == "datainf" and dtype != torch.float64:  # abs. bound of S[m+1:] and of the combination
            B = _datainf_error_bound(train, stacked)
            tol = max(tol, float((B[m + 1 :] + abs(a) * B[:m] + abs(b) * B[m : m + 1]).max() / scale))
        assert float((S[m + 1 :] - combo).abs().max() / scale) <= tol


@pytest.mark.filterwarnings("ignore:lissa.*did not reach")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,m", [(1, 1), (1, 3), (4, 1)])
def test_single_train_point_or_query(method, dtype, n, m):
    """The edge sizes, every method and dtype, always (hypothesis draws them only by chance)."""
    gen = torch.Generator().manual_seed(n * 10 + m)
    train = {"a": torch.randn(n, 2, 3, generator=gen).to(dtype), "f": torch.randn(n, 4, generator=gen).to(dtype)}
    query = {"a": torch.randn(m, 2, 3, generator=gen).to(dtype), "f": torch.randn(m, 4, generator=gen).to(dtype)}
    S = _influence(train, query, method)
    assert S.shape == (m, n) and S.dtype == torch.float32 and bool(torch.isfinite(S).all())
    agg = _influence(train, query, method, aggregate=True)
    assert _err(agg, S.double().mean(dim=0)) <= _agg_tol(method, dtype, train, query, S, agg)
    self_inf = pyinf.self_influence(train, method=method, **OPTIONS.get(method, {}))
    assert self_inf.shape == (n,) and bool((self_inf <= 0).all())
