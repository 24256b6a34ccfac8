"""pyinf.influence / pyinf.self_influence against the float64 references in
tests/reference.py (written from DESIGN.md, independently of the package).

Accuracy is the NORMWISE relative error ||S - S_ref||_F / ||S_ref||_F of the
whole score matrix (DESIGN.md, "Numerics").
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import pyinf


def _load_reference():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.py")
    spec = importlib.util.spec_from_file_location("_pyinf_tests_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = _load_reference()

TOL32 = 1e-4
TOLBF16 = 1e-2
# Relative damping 0.01 makes kappa(F + lam I) reach ~6e3 on these problems; a
# correct fp32-GEMM implementation (float64 Gram solve, as DESIGN asks) then
# sits at ~kappa*eps32 ~ 1.5e-4 (measured on a Woodbury sketch), so the
# small-damping cases get 1e-3.
TOL_SMALL_DAMPING = 1e-3


def tol_for(mode, damping):
    return TOL_SMALL_DAMPING if (mode == "relative" and damping < 0.1) else TOL32

METHODS = ("tracin", "datainf", "exact", "lissa", "hyperinf")
PSD_METHODS = ("tracin", "datainf", "exact", "hyperinf")
# absolute 5.0 keeps kappa(F_b + lam I) <~ 500 on every block of SHAPES/MAGNITUDE
MODES = (("relative", 0.1), ("absolute", 5.0))

# odd, different shapes; per-block gradient magnitudes differ by orders of
# magnitude so that per-block damping actually matters.
SHAPES = {"q.lora_A": (3, 7), "v.lora_B": (5, 2), "head.bias": (11,)}
MAGNITUDE = {"q.lora_A": 1.0, "v.lora_B": 20.0, "head.bias": 0.05}

# LiSSA needs ~ (s/lam) ln(1/tol) iterations: give it a well-conditioned problem
LISSA_OPTS = dict(iterations=600)
LISSA_DAMPING = ("relative", 1.0)
LISSA_ABS_DAMPING = ("absolute", 200.0)


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------
def make_grads(n, m, *, seed=0, shapes=SHAPES, magnitude=MAGNITUDE,
               dtype=torch.float32, scale=1.0):
    """Structured (correlated, non-centred, anisotropic) gradients so that
    Fisher != c*I and the methods really differ.  Train and query share the
    distribution.  Values are generated in float64 then cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    train, query = {}, {}
    for name, shp in shapes.items():
        D = math.prod(shp)
        Z = torch.randn(n + m, D, generator=gen, dtype=torch.float64)
        mix = torch.randn(D, D, generator=gen, dtype=torch.float64) / math.sqrt(D)
        spec = torch.logspace(0, -1.5, D, dtype=torch.float64)
        mu = 0.7 * torch.randn(D, generator=gen, dtype=torch.float64)
        G = (Z @ (mix * spec) + mu) * magnitude.get(name, 1.0) * scale
        G = G.reshape(n + m, *shp).to(dtype)
        train[name], query[name] = G[:n].contiguous(), G[n:].contiguous()
    return train, query


def call(method, train, query, mode, damping, **kw):
    opts = dict(LISSA_OPTS) if method == "lissa" else {}
    opts.update(kw)
    return pyinf.influence(train, query, method=method, damping=damping,
                           damping_mode=mode, **opts)


def damping_for(method, mode, damping):
    """LiSSA gets a larger damping so that 600 iterations converge."""
    if method == "lissa":
        return LISSA_DAMPING if mode == "relative" else LISSA_ABS_DAMPING
    return mode, damping


def check(S, S_ref, tol=TOL32, what=""):
    assert S.dtype == torch.float32, f"{what}: dtype {S.dtype}"
    assert tuple(S.shape) == tuple(S_ref.shape), f"{what}: shape {tuple(S.shape)} vs {tuple(S_ref.shape)}"
    assert torch.isfinite(S).all(), f"{what}: non-finite scores"
    err = ref.rel_err(S, S_ref)
    assert err < tol, f"{what}: normwise relative error {err:.3e} >= {tol:.0e}"
    return err


# ----------------------------------------------------------------------------
# self-checks of the reference (cheap; guard the guards)
# ----------------------------------------------------------------------------
def test_reference_datainf_closed_form_matches_explicit_inverses():
    train, _ = make_grads(9, 1, dtype=torch.float64)
    for G in ref.as_blocks(train).values():
        lam = ref.block_damping(G, 0.1, "relative")
        P1 = ref.precond_datainf(G, lam)
        P2 = ref.precond_datainf_formula(G, lam)
        assert torch.allclose(P1, P2, rtol=1e-9, atol=1e-12 * float(P1.abs().max()))


def test_reference_methods_differ_on_test_data():
    """The data must separate the methods, otherwise the comparisons are weak."""
    train, query = make_grads(15, 4, dtype=torch.float64)
    S = {meth: ref.influence(train, query, method=meth) for meth in
         ("tracin", "datainf", "exact", "hyperinf")}
    names = list(S)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert ref.rel_err(S[names[a]], S[names[b]]) > 1e-2, (names[a], names[b])


# ----------------------------------------------------------------------------
# every method vs reference, many shapes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("n", [1, 9, 10, 15, 37])
@pytest.mark.parametrize("mode,damping", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_influence_matches_reference(method, mode, damping, n, m):
    # n=1,9: every block has D_b > n (Woodbury regime of exact);
    # n=10,15: mixed (D=10, 11 primal or boundary, D=21 Woodbury); n=37: all primal
    train, query = make_grads(n, m, seed=1000 + 10 * n + m)
    mode, damping = damping_for(method, mode, damping)
    S = call(method, train, query, mode, damping)
    S_ref = ref.influence(train, query, method=method, damping=damping, damping_mode=mode)
    check(S, S_ref, what=f"{method} n={n} m={m} {mode}={damping}")


@pytest.mark.parametrize("method", METHODS)
def test_per_block_contributions_are_additive(method):
    """Curvature is block-diagonal and damping is per block: the score of a set
    of blocks is the sum of the scores of each block on its own."""
    train, query = make_grads(9, 3, seed=7)
    mode, damping = damping_for(method, "relative", 0.1)
    parts = ref.block_scores(train, query, method=method, damping=damping, damping_mode=mode)
    total = 0
    for b in train:
        Sb = call(method, {b: train[b]}, {b: query[b]}, mode, damping)
        check(Sb, parts[b], what=f"{method} block {b} alone")
        total = total + Sb.double()
    S = call(method, train, query, mode, damping)
    assert ref.rel_err(S, total) < TOL32


@pytest.mark.parametrize("method", METHODS)
def test_block_order_does_not_matter(method):
    train, query = make_grads(9, 2, seed=8)
    mode, damping = damping_for(method, "relative", 0.1)
    S1 = call(method, train, query, mode, damping)
    rev_t = dict(reversed(list(train.items())))
    rev_q = dict(query)  # query keeps the original order
    S2 = call(method, rev_t, rev_q, mode, damping)
    assert ref.rel_err(S2, S1) < TOL32


# ----------------------------------------------------------------------------
# exact: primal vs Woodbury regimes both equal the explicit inverse
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("D,n", [(6, 40), (40, 6), (24, 24), (23, 24), (25, 24)])
@pytest.mark.parametrize("mode,damping", [("relative", 0.1), ("relative", 0.01), ("absolute", 0.5)])
def test_exact_both_regimes(D, n, mode, damping):
    shapes = {"blk": (D,), "mat": (2, D)}
    train, query = make_grads(n, 3, seed=D * 100 + n, shapes=shapes, magnitude={})
    S = pyinf.influence(train, query, method="exact", damping=damping, damping_mode=mode)
    S_ref = ref.influence(train, query, method="exact", damping=damping, damping_mode=mode)
    check(S, S_ref, tol=tol_for(mode, damping), what=f"exact D={D} n={n} {mode}={damping}")


def test_datainf_equals_exact_for_one_sample():
    """With n = 1 the DataInf approximation is exact (Sherman-Morrison)."""
    train, query = make_grads(1, 3, seed=11)
    S_d = pyinf.influence(train, query, method="datainf")
    S_e = pyinf.influence(train, query, method="exact")
    assert ref.rel_err(S_d, S_e) < TOL32


def test_tracin_ignores_damping():
    train, query = make_grads(9, 3, seed=12)
    S_ref = -sum(query[b].double().reshape(3, -1) @ train[b].double().reshape(9, -1).T for b in train)
    for mode, damping in [("relative", 0.1), ("relative", 5.0), ("absolute", 1e-3)]:
        S = pyinf.influence(train, query, method="tracin", damping=damping, damping_mode=mode)
        check(S, S_ref, what=f"tracin {mode}={damping}")


# ----------------------------------------------------------------------------
# LiSSA
# ----------------------------------------------------------------------------
def test_lissa_setup_converges_in_iterations():
    """Sanity of the LiSSA test problem: with s = 1.1(lmax + lam) the error
    contracts by rate^T < 1e-6 within LISSA_OPTS['iterations']."""
    for n in (1, 9, 37):
        for mode, damping in (LISSA_DAMPING, LISSA_ABS_DAMPING):
            train, _ = make_grads(n, 1)
            for b, (lam, lmax, s, rate) in ref.lissa_contraction(
                    train, damping=damping, damping_mode=mode).items():
                assert rate ** LISSA_OPTS["iterations"] < 1e-6, (n, mode, b, lam, lmax, rate)


@pytest.mark.parametrize("n", [9, 37])
def test_lissa_converges_to_exact(n):
    train, query = make_grads(n, 4, seed=21 + n)
    mode, damping = LISSA_DAMPING
    S = pyinf.influence(train, query, method="lissa", damping=damping, damping_mode=mode,
                        iterations=600)
    S_ref = ref.influence(train, query, method="exact", damping=damping, damping_mode=mode)
    check(S, S_ref, what=f"lissa(600) vs exact n={n}")


def _lissa_explicit_scale_problem():
    # blocks of similar magnitude, absolute damping: one scale fits all blocks
    train, query = make_grads(12, 3, seed=31, magnitude={})
    damping = 2.0
    lmax = max(v[1] for v in ref.lissa_contraction(
        train, damping=damping, damping_mode="absolute").values())
    scale = 1.3 * (lmax + damping)
    return train, query, damping, scale


def test_lissa_explicit_scale_converges_to_exact():
    train, query, damping, scale = _lissa_explicit_scale_problem()
    iters = 400
    for b, (_, _, _, rate) in ref.lissa_contraction(
            train, damping=damping, damping_mode="absolute", scale=scale).items():
        assert rate ** iters < 1e-6, (b, rate)
    S = pyinf.influence(train, query, method="lissa", damping=damping, damping_mode="absolute",
                        iterations=iters, scale=scale)
    S_ref = ref.influence(train, query, method="exact", damping=damping, damping_mode="absolute")
    check(S, S_ref, what=f"lissa scale={scale:.3g} vs exact")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_lissa_few_iterations_is_not_exact():
    """3 iterations must leave a visible truncation error (the option is honoured)."""
    train, query = make_grads(15, 4, seed=41)
    mode, damping = LISSA_DAMPING
    S_ref = ref.influence(train, query, method="exact", damping=damping, damping_mode=mode)
    S3 = pyinf.influence(train, query, method="lissa", damping=damping, damping_mode=mode,
                         iterations=3)
    assert torch.isfinite(S3).all()
    err3 = ref.rel_err(S3, S_ref)
    assert err3 > 1e-2, f"lissa with 3 iterations already within {err3:.2e} of exact"
    S600 = pyinf.influence(train, query, method="lissa", damping=damping, damping_mode=mode,
                           iterations=600)
    assert ref.rel_err(S600, S_ref) < err3 / 100


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_lissa_explicit_scale_few_iterations_is_truncated_series():
    """With a fixed scale s, T iterations of h <- v + (I - (F+lam)/s) h, h/s
    give the Neumann series truncated at T (+-1 depending on h_0 = 0 or v)."""
    train, query, damping, scale = _lissa_explicit_scale_problem()
    T = 5
    S = pyinf.influence(train, query, method="lissa", damping=damping, damping_mode="absolute",
                        iterations=T, scale=scale)
    errs = {}
    for terms in (T - 1, T, T + 1):
        S_ref = ref.lissa_truncated(train, query, scale=scale, terms=terms, damping=damping,
                                    damping_mode="absolute")
        errs[terms] = ref.rel_err(S, S_ref)
    assert min(errs.values()) < TOL32, f"lissa(T={T}, scale) vs truncated series: {errs}"


# ----------------------------------------------------------------------------
# HyperINF
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 9, 37])
@pytest.mark.parametrize("mode,damping", [("relative", 0.1), ("relative", 0.01), ("absolute", 0.25)])
def test_hyperinf_default_options_reach_explicit_inverse(n, mode, damping):
    train, query = make_grads(n, 4, seed=51 + n)
    S = pyinf.influence(train, query, method="hyperinf", damping=damping, damping_mode=mode)
    S_ref = ref.influence(train, query, method="hyperinf", damping=damping, damping_mode=mode)
    check(S, S_ref, tol=tol_for(mode, damping), what=f"hyperinf default n={n} {mode}={damping}")


def test_hyperinf_converges_where_research_x0_diverges():
    """Scale gradients so lambda_max(A) >> 4e4: X_0 = 5e-5 I (research code)
    diverges there; pyinf's Schulz must still reach the explicit inverse."""
    c = 300.0
    shapes = {"q.lora_A": (3, 7), "v.lora_B": (5, 2), "head.bias": (11,)}
    train, query = make_grads(15, 3, seed=61, shapes=shapes, magnitude={}, scale=c)
    for mode, damping in [("relative", 0.1), ("absolute", 10.0)]:
        for b, G in ref.as_blocks(train).items():
            lam = ref.block_damping(G, damping, mode)
            A = ref.hyperinf_matrix(G, lam)
            lmax = float(torch.linalg.eigvalsh(A).max())
            assert lmax > 4e4, (b, lmax)
            # the research code's start diverges on this very matrix ...
            _, res_bad = ref.schulz(A, 5e-5, 30)
            assert not math.isfinite(res_bad[-1]) or res_bad[-1] > 1e6, (b, res_bad[-5:])
            # ... while X_0 = I/||A||_F converges (so the matrix itself is fine)
            _, res_ok = ref.schulz(A, 1 / float(torch.linalg.matrix_norm(A)), 60)
            assert res_ok[-1] < 1e-10, (b, res_ok[-5:])
        S = pyinf.influence(train, query, method="hyperinf", damping=damping, damping_mode=mode)
        S_ref = ref.influence(train, query, method="hyperinf", damping=damping, damping_mode=mode)
        check(S, S_ref, what=f"hyperinf scaled x{c} {mode}={damping}")


def test_hyperinf_flat_block_is_exact():
    """For a flat block rows = 1 so A = F + lam I: HyperINF equals exact."""
    shapes = {"f1": (13,), "f2": (6,)}
    train, query = make_grads(9, 3, seed=71, shapes=shapes, magnitude={})
    S_h = pyinf.influence(train, query, method="hyperinf")
    S_e = ref.influence(train, query, method="exact")
    check(S_h, S_e, what="hyperinf flat vs exact")


def test_hyperinf_rows_one_matrix_block_equals_flat():
    train, query = make_grads(9, 3, seed=72, shapes={"f": (13,)}, magnitude={})
    S_flat = pyinf.influence(train, query, method="hyperinf")
    S_mat = pyinf.influence({"f": train["f"][:, None, :]}, {"f": query["f"][:, None, :]},
                            method="hyperinf")
    assert ref.rel_err(S_mat, S_flat) < TOL32


# ----------------------------------------------------------------------------
# aggregate and self-influence
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("method", METHODS)
def test_aggregate(method, m):
    train, query = make_grads(9, m, seed=81 + m)
    mode, damping = damping_for(method, "relative", 0.1)
    S_agg = call(method, train, query, mode, damping, aggregate=True)
    assert tuple(S_agg.shape) == (9,)
    # = score against the mean query gradient
    A_ref = ref.influence(train, query, method=method, damping=damping, damping_mode=mode,
                          aggregate=True)
    check(S_agg, A_ref, what=f"{method} aggregate m={m}")
    # = mean over queries of the (m, n) scores (linearity)
    S_full = ref.influence(train, query, method=method, damping=damping, damping_mode=mode)
    assert ref.rel_err(S_agg, S_full.mean(0)) < TOL32
    # = pyinf's own (1, n) score on the mean query
    qbar = {b: q.double().mean(0, keepdim=True).float() for b, q in query.items()}
    S_bar = call(method, train, qbar, mode, damping)
    assert tuple(S_bar.shape) == (1, 9)
    assert ref.rel_err(S_agg, S_bar[0]) < TOL32


@pytest.mark.parametrize("n", [1, 9, 37])
@pytest.mark.parametrize("mode,damping", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_self_influence(method, mode, damping, n):
    train, _ = make_grads(n, 1, seed=91 + n)
    mode, damping = damping_for(method, mode, damping)
    opts = dict(LISSA_OPTS) if method == "lissa" else {}
    s = pyinf.self_influence(train, method=method, damping=damping, damping_mode=mode, **opts)
    s_ref = ref.self_influence(train, method=method, damping=damping, damping_mode=mode)
    check(s, s_ref, what=f"{method} self n={n} {mode}={damping}")
    # self influence is the diagonal of influence(train, train)
    S_tt = ref.influence(train, train, method=method, damping=damping, damping_mode=mode)
    assert ref.rel_err(s, torch.diagonal(S_tt)) < TOL32
    if method in PSD_METHODS:
        assert (s <= 0).all(), f"{method}: positive self-influence {s.max().item()}"


# ----------------------------------------------------------------------------
# input forms and dtypes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_single_tensor_input(method):
    train, query = make_grads(9, 3, seed=101, shapes={"x": (17,)}, magnitude={})
    Gt, Gq = train["x"], query["x"]
    mode, damping = damping_for(method, "relative", 0.1)
    S = call(method, Gt, Gq, mode, damping)
    S_ref = ref.influence(Gt, Gq, method=method, damping=damping, damping_mode=mode)
    check(S, S_ref, what=f"{method} single tensor")
    S_dict = call(method, {"x": Gt}, {"x": Gq}, mode, damping)
    assert ref.rel_err(S, S_dict) < TOL32
    opts = dict(LISSA_OPTS) if method == "lissa" else {}
    s = pyinf.self_influence(Gt, method=method, damping=damping, damping_mode=mode, **opts)
    check(s, ref.self_influence(Gt, method=method, damping=damping, damping_mode=mode),
          what=f"{method} single tensor self")


@pytest.mark.parametrize("method", METHODS)
def test_output_dtype_shape_device(method):
    train, query = make_grads(7, 3, seed=111)
    mode, damping = damping_for(method, "relative", 0.1)
    S = call(method, train, query, mode, damping)
    assert S.dtype == torch.float32 and tuple(S.shape) == (3, 7)
    assert S.device == train["q.lora_A"].device
    a = call(method, train, query, mode, damping, aggregate=True)
    assert a.dtype == torch.float32 and tuple(a.shape) == (7,)
    opts = dict(LISSA_OPTS) if method == "lissa" else {}
    s = pyinf.self_influence(train, method=method, damping=damping, damping_mode=mode, **opts)
    assert s.dtype == torch.float32 and tuple(s.shape) == (7,)


@pytest.mark.parametrize("method", METHODS)
def test_inputs_not_modified(method):
    train, query = make_grads(7, 3, seed=112)
    t0 = {k: v.clone() for k, v in train.items()}
    q0 = {k: v.clone() for k, v in query.items()}
    mode, damping = damping_for(method, "relative", 0.1)
    call(method, train, query, mode, damping)
    call(method, train, query, mode, damping, aggregate=True)
    for k in train:
        assert torch.equal(train[k], t0[k]) and torch.equal(query[k], q0[k]), k


@pytest.mark.parametrize("method", METHODS)
def test_float64_inputs(method):
    train, query = make_grads(9, 3, seed=121, dtype=torch.float64)
    mode, damping = damping_for(method, "relative", 0.1)
    S = call(method, train, query, mode, damping)
    S_ref = ref.influence(train, query, method=method, damping=damping, damping_mode=mode)
    check(S, S_ref, what=f"{method} float64 inputs")


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_inputs(method):
    train, query = make_grads(9, 3, seed=131, dtype=torch.bfloat16)
    mode, damping = damping_for(method, "relative", 0.1)
    S = call(method, train, query, mode, damping)
    # reference on the bf16-rounded values, upcast
    S_ref = ref.influence(train, query, method=method, damping=damping, damping_mode=mode)
    check(S, S_ref, tol=TOLBF16, what=f"{method} bf16 inputs")
    opts = dict(LISSA_OPTS) if method == "lissa" else {}
    s = pyinf.self_influence(train, method=method, damping=damping, damping_mode=mode, **opts)
    check(s, ref.self_influence(train, method=method, damping=damping, damping_mode=mode),
          tol=TOLBF16, what=f"{method} bf16 self")


@pytest.mark.parametrize("method", METHODS)
def test_many_train_samples(method):
    """n large enough to cross any streaming/chunk boundary (odd n)."""
    n, m = 1283, 5
    train, query = make_grads(n, m, seed=181)
    mode, damping = damping_for(method, "relative", 0.1)
    S = call(method, train, query, mode, damping)
    S_ref = ref.influence(train, query, method=method, damping=damping, damping_mode=mode)
    check(S, S_ref, what=f"{method} n={n}")
    a = call(method, train, query, mode, damping, aggregate=True)
    check(a, S_ref.mean(0), what=f"{method} n={n} aggregate")


@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_inputs(method):
    """Strided views (transposed storage, every-other-sample slices) must give
    the same answer as their contiguous copies."""
    train, query = make_grads(18, 6, seed=191)
    nc_t, nc_q = {}, {}
    for k, v in train.items():
        w = torch.stack([v, torch.full_like(v, float("nan"))], 1).flatten(0, 1)  # interleave junk
        nc_t[k] = w[::2]
        if v.ndim == 3:
            nc_t[k] = v.transpose(1, 2).contiguous().transpose(1, 2)
    for k, v in query.items():
        nc_q[k] = v.t().contiguous().t() if v.ndim == 2 else v
    assert not all(t.is_contiguous() for t in nc_t.values())
    assert not all(t.is_contiguous() for t in nc_q.values())
    mode, damping = damping_for(method, "relative", 0.1)
    S = call(method, nc_t, nc_q, mode, damping)
    S_ref = ref.influence(train, query, method=method, damping=damping, damping_mode=mode)
    check(S, S_ref, what=f"{method} non-contiguous")


@pytest.mark.parametrize("method", METHODS)
def test_zero_block_is_fine_under_absolute_damping(method):
    """An all-zero block (LoRA B before training) contributes nothing under
    absolute damping (F_b = 0, H_b = lam I, and g_ib = 0); only relative
    damping must reject it.  For LiSSA: lambda_max(F_b) = 0, s = 1.1 lam."""
    train, query = make_grads(9, 3, seed=141, magnitude={})
    train0 = dict(train, zero_block=torch.zeros(9, 4, 3))
    query0 = dict(query, zero_block=torch.randn(3, 4, 3))
    for b, (_, _, _, rate) in ref.lissa_contraction(
            train, damping=0.5, damping_mode="absolute").items():
        assert rate ** 400 < 1e-6, (b, rate)
    kw = {"iterations": 400} if method == "lissa" else {}
    S0 = pyinf.influence(train0, query0, method=method, damping=0.5,
                         damping_mode="absolute", **kw)
    assert torch.isfinite(S0).all(), f"{method}: non-finite scores with an all-zero block"
    S_ref = ref.influence(train, query, method=method, damping=0.5, damping_mode="absolute")
    check(S0, S_ref, what=f"{method} with zero block")
    s0 = pyinf.self_influence(train0, method=method, damping=0.5, damping_mode="absolute", **kw)
    check(s0, ref.self_influence(train, method=method, damping=0.5, damping_mode="absolute"),
          what=f"{method} self with zero block")


# ----------------------------------------------------------------------------
# invariances
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("c", [7.3, 0.01])
@pytest.mark.parametrize("method", METHODS)
def test_scale_invariance_under_relative_damping(method, c):
    """g -> c g: relative lam -> c^2 lam, (F + lam I)^-1 -> c^-2 (...)^-1, so
    the scores are invariant for every curvature method; tracin scales by c^2."""
    train, query = make_grads(9, 3, seed=151)
    mode, damping = damping_for(method, "relative", 0.1)
    S = call(method, train, query, mode, damping)
    S_c = call(method, {k: v * c for k, v in train.items()},
               {k: v * c for k, v in query.items()}, mode, damping)
    expect = S.double() * (c * c if method == "tracin" else 1.0)
    err = ref.rel_err(S_c, expect)
    assert err < TOL32, f"{method} c={c}: {err:.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_permutation_equivariance(method):
    train, query = make_grads(11, 4, seed=161)
    mode, damping = damping_for(method, "relative", 0.1)
    S = call(method, train, query, mode, damping)
    g = torch.Generator().manual_seed(5)
    p = torch.randperm(11, generator=g)
    q = torch.randperm(4, generator=g)
    S_p = call(method, {k: v[p] for k, v in train.items()},
               {k: v[q] for k, v in query.items()}, mode, damping)
    assert ref.rel_err(S_p, S.double()[q][:, p]) < TOL32
    opts = dict(LISSA_OPTS) if method == "lissa" else {}
    s = pyinf.self_influence(train, method=method, damping=damping, damping_mode=mode, **opts)
    s_p = pyinf.self_influence({k: v[p] for k, v in train.items()}, method=method,
                               damping=damping, damping_mode=mode, **opts)
    assert ref.rel_err(s_p, s.double()[p]) < TOL32


@pytest.mark.parametrize("method", METHODS)
def test_duplicating_a_query_duplicates_its_row(method):
    train, query = make_grads(9, 2, seed=171)
    mode, damping = damping_for(method, "relative", 0.1)
    S = call(method, train, query, mode, damping)
    q3 = {k: torch.cat([v, v[:1]]) for k, v in query.items()}
    S3 = call(method, train, q3, mode, damping)
    assert ref.rel_err(S3, torch.cat([S, S[:1]]).double()) < TOL32


def test_lissa_reads_one_host_value_per_iteration(monkeypatch):
    """A LiSSA iteration over 40 blocks reads one value back to the host (its exit test), not one per
    block: each read is a device sync on a GPU (160k of them for 1,000 iterations at the 13B shape)."""
    gen = torch.Generator().manual_seed(0)
    train = {f"blk{j}": torch.randn(30, 2, 3, generator=gen) for j in range(40)}
    query = {k: torch.randn(2, 2, 3, generator=gen) for k in train}
    reads = []
    real_float, real_bool = torch.Tensor.__float__, torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or real_float(t))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))

    def count(iterations):
        reads.clear()
        with pytest.warns(RuntimeWarning, match="LiSSA"):  # tol=1e-30 is never met
            pyinf.influence(train, query, method="lissa", backend="torch", iterations=iterations, tol=1e-30)
        return len(reads)

    assert count(6) - count(2) == 4


@pytest.mark.parametrize("method,passes", [("tracin", 1), ("datainf", 3), ("hyperinf", 2), ("exact", 2), ("lissa", None)])
def test_passes_over_the_training_gradients(monkeypatch, method, passes):
    """Reads of G by `influence`, counted as the blocks each pass over the source reads: hyperinf
    and exact take λ from the trace of what they build (no norms pass); their fit passes read a
    part of the blocks each (exact: the Woodbury block "a", the primal "b"; hyperinf: group by
    group) and each block once; lissa: its norms pass, 5 iterations, and the scoring pass."""
    from pyinf.blocks import TensorSource

    gen = torch.Generator().manual_seed(0)
    train = {"a": torch.randn(40, 4, 16, generator=gen), "b": torch.randn(40, 1, 9, generator=gen)}  # a: Woodbury
    query = {k: torch.randn(3, *v.shape[1:], generator=gen) for k, v in train.items()}
    reads = []
    real = TensorSource.chunks
    monkeypatch.setattr(TensorSource, "chunks", lambda self, names=None, start=0: reads.append(names) or real(self, names, start))
    opts = {"iterations": 5, "scale": 1e3} if method == "lissa" else {}
    pyinf.influence(train, query, method=method, chunk_size=16, **opts)
    blocks_read = [len(train) if names is None else len(names) for names in reads]
    assert sum(blocks_read) / len(train) == (passes if passes is not None else 1 + 5 + 1), reads


def test_hyperinf_packed_pairs_round_trip():
    """hyperinf keeps its inverses as packed symmetric pairs (half a float64 stack): every matrix of an
    odd count comes back bitwise, whichever of a pair was stored first."""
    from pyinf.backends.dense import pack, packed_pairs, unpack

    gen = torch.Generator().manual_seed(0)
    mats = [(lambda a: a + a.T)(torch.randn(7, 7, generator=gen, dtype=torch.float64)) for _ in range(5)]
    pairs = packed_pairs(5, 7, torch.device("cpu"))
    assert pairs.shape == (3, 7, 8)
    for i in (1, 0, 4, 3, 2):
        pack(pairs, i, mats[i])
    assert all(torch.equal(unpack(pairs, i), mats[i]) for i in range(5))
