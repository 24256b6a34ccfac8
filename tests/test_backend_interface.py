"""The shared suite every backend must pass: each primitive against float64 formulas.

Odd shapes, fp32 / bf16 / fp64 storage, outputs compared normwise. A new
backend registers itself in `pyinf.backends.BACKENDS` and is picked up here.
"""
import pytest
import torch

from pyinf.backends import BACKENDS, get_backend

SHAPES = [(1, 1, 1), (7, 13, 3), (41, 401, 5), (5, 1271, 16)]  # (c, D, m)
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float64: 1e-12}  # vs fp64 on the stored values


def _compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    return get_backend(request.param, torch.device("cpu"))


@pytest.fixture(params=SHAPES, ids=lambda s: "c%d-D%d-m%d" % s)
def data(request):
    c, D, m = request.param
    gen = torch.Generator().manual_seed(c * 1000 + D)
    return torch.randn(c, D, generator=gen), torch.randn(m, D, generator=gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_dots_and_score(backend, data, dtype):
    G, V = data
    G = G.to(dtype)
    V = V.to(_compute(dtype))
    G64, V64 = G.double(), V.double()
    s, P = backend.norms_and_dots(G, V)
    assert s.shape == (G.shape[0],) and P.shape == (V.shape[0], G.shape[0])
    assert _rel(s, (G64 * G64).sum(1)) < TOL[dtype]
    assert _rel(backend.sq_norms(G), (G64 * G64).sum(1)) < TOL[dtype]
    assert _rel(P, V64 @ G64.T) < TOL[dtype]
    assert _rel(backend.dots(G, V), V64 @ G64.T) < TOL[dtype]
    assert _rel(backend.score(V, G), -(V64 @ G64.T)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weighted_sum_and_rank_one(backend, data, dtype):
    G, V = data
    G = G.to(dtype)
    cd = _compute(dtype)
    V = V.to(cd)
    gen = torch.Generator().manual_seed(1)
    C = torch.randn(V.shape[0], G.shape[0], generator=gen).to(cd)
    w = torch.rand(G.shape[0], generator=gen).to(cd)
    G64 = G.double()
    assert _rel(backend.weighted_sum(C, G), C.double() @ G64) < TOL[dtype]
    acc0 = torch.randn(V.shape[0], G.shape[1], generator=gen).to(cd)
    acc = acc0.clone()
    backend.rank_one_accumulate(acc, G, V, w)
    expect = acc0.double() + ((V.double() @ G64.T) * w.double()) @ G64
    assert _rel(acc, expect) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 17), (3, 7), (8, 33)])
def test_gram_and_gfim(backend, dtype, rows, cols):
    gen = torch.Generator().manual_seed(rows * cols)
    G = torch.randn(11, rows, cols, generator=gen).to(dtype)
    G2 = torch.randn(5, rows * cols, generator=gen).to(dtype)
    flat, G64 = G.reshape(11, -1), G.double()
    assert _rel(backend.gram(flat, G2), flat.double() @ G2.double().T) < TOL[dtype]
    F = backend.gfim(G)
    assert _rel(F, torch.einsum("nri,nrj->ij", G64, G64)) < TOL[dtype]
    assert torch.equal(F, F.T), "the GFIM must be exactly symmetric (Cholesky and Schulz assume it)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float64_accumulation(backend, data, dtype):
    """float64 query-side operands / dtype=float64: float64 results equal to float64 on the stored values
    (products of fp32 / bf16 values are exact in float64), not fp32 results cast up (~1e-7 off)."""
    G, V = data
    G, V64 = G.to(dtype), V.double()
    G64 = G.double()
    gen = torch.Generator().manual_seed(2)
    C64 = torch.randn(V.shape[0], G.shape[0], generator=gen, dtype=torch.float64)
    G2 = torch.randn(3, G.shape[1], generator=gen).to(dtype)
    s, P = backend.norms_and_dots(G, V64)
    results = {
        "norms_and_dots norms": (s, (G64 * G64).sum(1)),
        "norms_and_dots dots": (P, V64 @ G64.T),
        "dots": (backend.dots(G, V64), V64 @ G64.T),
        "score": (backend.score(V64, G), -(V64 @ G64.T)),
        "weighted_sum": (backend.weighted_sum(C64, G), C64 @ G64),
        "gram": (backend.gram(G, G2, torch.float64), G64 @ G2.double().T),
        "gfim": (backend.gfim(G.reshape(G.shape[0], 1, -1), torch.float64), G64.T @ G64),
    }
    for what, (got, want) in results.items():
        assert got.dtype == torch.float64, f"{what}: {got.dtype}"
        assert _rel(got, want) < TOL[torch.float64], f"{what}: {_rel(got, want):.2e}"
    F = results["gfim"][0]
    assert torch.equal(F, F.T)


def test_results_in_compute_dtype(backend):
    G = torch.randn(4, 9).to(torch.bfloat16)
    V = torch.randn(2, 9)
    assert backend.sq_norms(G).dtype == torch.float32
    assert backend.dots(G, V).dtype == torch.float32
    assert backend.gfim(G.reshape(4, 3, 3)).dtype == torch.float32


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("nope", torch.device("cpu"))


BATCHED = [(3, 1, 1, 1), (1, 3, 17, 2), (4, 7, 13, 3), (3, 41, 401, 5), (2, 5, 1271, 16)]  # (b, c, D, m)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,c,D,m", BATCHED, ids=lambda *_: None)
def test_batched_primitives_equal_per_block(backend, dtype, b, c, D, m):
    """A group of b same-shape blocks in one call equals the per-block formulas; the group is a
    view with a block stride larger than c·D (a store's chunk split in halves)."""
    gen = torch.Generator().manual_seed(b * 100 + c)
    cd = _compute(dtype)
    G = torch.randn(b, c + 3, D, generator=gen).to(dtype)[:, 2 : 2 + c]  # stride(0) = (c + 3)·D
    assert G.stride(0) != c * D and G[0].is_contiguous()
    V = torch.randn(b, m, D, generator=gen).to(cd)
    C = torch.randn(b, m, c, generator=gen).to(cd)
    w = torch.rand(b, c, generator=gen).to(cd)
    acc0 = torch.randn(b, m, D, generator=gen).to(cd)
    G64, V64 = G.double(), V.double()
    P64 = V64 @ G64.mT
    s, P = backend.norms_and_dots(G, V)
    assert s.shape == (b, c) and P.shape == (b, m, c)
    assert _rel(s, (G64 * G64).sum(-1)) < TOL[dtype]
    assert _rel(P, P64) < TOL[dtype]
    assert _rel(backend.sq_norms(G), (G64 * G64).sum(-1)) < TOL[dtype]
    assert _rel(backend.dots(G, V), P64) < TOL[dtype]
    S = backend.score(V, G)
    assert S.shape == (m, c) and _rel(S, -P64.sum(0)) < TOL[dtype]
    assert _rel(backend.weighted_sum(C, G), C.double() @ G64) < TOL[dtype]
    acc = acc0.clone()
    backend.rank_one_accumulate(acc, G, V, w)
    assert _rel(acc, acc0.double() + (P64 * w.double()[:, None, :]) @ G64) < TOL[dtype]
    assert _rel(backend.gram(G, G[:, :2]), G64 @ G64[:, :2].mT) < TOL[dtype]
    F = backend.gfim(G.reshape(b, c, 1, D))
    assert F.shape == (b, D, D) and _rel(F, G64.mT @ G64) < TOL[dtype]
