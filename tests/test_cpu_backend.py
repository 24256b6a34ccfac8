"""backend="cpu" (the C++ kernels) end to end: every method against float64 and
against the torch reference backend; memmap input; the missing-extension paths."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pyinf
from pyinf import _native
from pyinf.backends import BACKENDS, CPUBackend, TorchBackend, get_backend
from pyinf.backends.cpu_backend import _grad_buffer

C = _native.load()  # with PYINF_REQUIRE_NATIVE=1 this raises if the build is missing
if C is None:  # only reachable outside `make test`
    pytest.fail("pyinf._C is not available: " + str(_native.import_error()), pytrace=False)

N, M = 37, 5
# odd shapes; "flat" (D = 41 > n) is a Woodbury block for exact, "small" (D = 14 ≤ n) a primal one
SHAPES = {"lora_A": (3, 17), "flat": (41,), "small": (2, 7)}
METHODS = {
    "tracin": {},
    "datainf": {},
    "exact": {},
    "lissa": {"iterations": 400, "tol": 1e-6},
    "hyperinf": {},
}
DAMPING = {"lissa": 2.0}  # LiSSA needs (s/λ)·ln(1/tol) iterations: keep λ large
TOL = 1e-4  # normwise relative error vs float64, fp32 accumulation


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _grads(n, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        t = torch.randn(n, *shape, generator=g) * (1 + torch.rand(n, *([1] * len(shape)), generator=g))
        out[name] = (t + 0.1).to(dtype)
    return out


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    _native.set_num_threads(request.param)
    yield request.param
    _native.set_num_threads(0)


def test_registered_and_auto_picks_cpu():
    assert BACKENDS["cpu"] is CPUBackend
    assert isinstance(get_backend("auto", torch.device("cpu")), CPUBackend)
    assert isinstance(get_backend("cpu", torch.device("cpu")), CPUBackend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_influence_parity(method, dtype, threads):
    train, query = _grads(N, 1, dtype), _grads(M, 2, dtype)
    kw = dict(method=method, damping=DAMPING.get(method, 0.1), chunk_size=8, **METHODS[method])
    with warnings.catch_warnings():
        if method == "lissa":
            warnings.simplefilter("error")  # a LiSSA that did not converge
        S_cpu = pyinf.influence(train, query, backend="cpu", **kw)
        S_torch = pyinf.influence(train, query, backend="torch", **kw)
    train64 = {k: v.double() for k, v in train.items()}
    query64 = {k: v.double() for k, v in query.items()}
    S64 = pyinf.influence(train64, query64, backend="torch", **kw).double()
    assert S_cpu.shape == (M, N) and S_cpu.dtype == torch.float32
    assert torch.isfinite(S_cpu).all()
    assert _rel(S_cpu, S64) < TOL, (method, _rel(S_cpu, S64), _rel(S_torch, S64))
    assert _rel(S_cpu, S_torch) < TOL
    # aggregated mode goes through the same primitives with m = 1
    agg = pyinf.influence(train, query, backend="cpu", aggregate=True, **kw)
    agg64 = pyinf.influence(train64, query64, backend="torch", aggregate=True, **kw)
    assert _rel(agg, agg64) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_self_influence_parity(method, dtype):
    train = _grads(N, 3, dtype)
    kw = dict(method=method, damping=DAMPING.get(method, 0.1), chunk_size=16, **METHODS[method])
    s_cpu = pyinf.self_influence(train, backend="cpu", **kw)
    s64 = pyinf.self_influence({k: v.double() for k, v in train.items()}, backend="torch", **kw)
    assert s_cpu.shape == (N,)
    assert _rel(s_cpu, s64) < TOL
    assert (s_cpu <= 0).all()


def test_datainf_threaded_passes():
    """Chunks big enough for the kernels' worker pool (several stripes per call):
    at 1, 2 and 3 threads DataInf matches float64, bitwise the same run to run."""
    g = torch.Generator().manual_seed(11)
    train = {"a": (torch.randn(1500, 8, 256, generator=g) + 0.1).bfloat16(),
             "b": (torch.randn(1500, 2048, generator=g) - 0.1).bfloat16()}
    query = {"a": torch.randn(4, 8, 256, generator=g).bfloat16(), "b": torch.randn(4, 2048, generator=g).bfloat16()}
    S64 = pyinf.influence({k: v.double() for k, v in train.items()}, {k: v.double() for k, v in query.items()},
                          method="datainf", backend="torch")
    try:
        for nt in (1, 2, 3):
            _native.set_num_threads(nt)
            S1 = pyinf.influence(train, query, method="datainf", backend="cpu")
            S2 = pyinf.influence(train, query, method="datainf", backend="cpu")
            assert torch.equal(S1, S2), nt
            assert _rel(S1, S64) < TOL, (nt, _rel(S1, S64))
    finally:
        _native.set_num_threads(0)


@pytest.mark.parametrize("m", [1, 3, 8, 70])  # 70 > MAX_STREAM_M: BLAS path
def test_query_counts(m):
    """Odd and large query counts (the dispatch switches to BLAS above MAX_STREAM_M)."""
    train, query = _grads(41, 4, torch.bfloat16), _grads(m, 5, torch.bfloat16)
    for method in ("datainf", "tracin", "exact"):
        S = pyinf.influence(train, query, method=method, backend="cpu")
        S64 = pyinf.influence(
            {k: v.double() for k, v in train.items()}, {k: v.double() for k, v in query.items()},
            method=method, backend="torch",
        )
        assert _rel(S, S64) < TOL, (method, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_memmap_input(tmp_path, dtype):
    """Gradients in an np.memmap file -> torch.from_numpy -> influence: same scores,
    and the C++ kernels read the mapped pages (no copy into a tensor)."""
    train, query = _grads(N, 6, dtype), _grads(M, 7, dtype)
    G = train["lora_A"]
    np_dtype = np.float32 if dtype == torch.float32 else np.int16
    path = tmp_path / "grads.bin"
    mm = np.memmap(path, dtype=np_dtype, mode="w+", shape=tuple(G.shape))
    mm[:] = (G if dtype == torch.float32 else G.view(torch.int16)).numpy()
    mm.flush()
    del mm
    ro = np.memmap(path, dtype=np_dtype, mode="r", shape=tuple(G.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "non-writable NumPy array"
        t = torch.from_numpy(ro)
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    assert t.data_ptr() == ro.ctypes.data
    flat = t.reshape(N, -1)
    assert _grad_buffer(flat).ctypes.data == ro.ctypes.data  # zero-copy into C++
    for method in ("datainf", "tracin", "lissa"):
        kw = dict(method=method, damping=DAMPING.get(method, 0.1), **METHODS[method])
        S_mm = pyinf.influence({"lora_A": t}, {"lora_A": query["lora_A"]}, backend="cpu", **kw)
        S_mem = pyinf.influence({"lora_A": G.clone()}, {"lora_A": query["lora_A"]}, backend="cpu", **kw)
        assert torch.equal(S_mm, S_mem), method
        S64 = pyinf.influence({"lora_A": G.double()}, {"lora_A": query["lora_A"].double()},
                              backend="torch", **kw)
        assert _rel(S_mm, S64) < TOL


def test_primitives_match_torch_backend_non_contiguous():
    """Non-contiguous G, V and acc are accepted (made contiguous once)."""
    cpu, ref = CPUBackend(), TorchBackend()
    G = torch.randn(301, 53).bfloat16()[:, 1:50]  # non-contiguous
    V = torch.randn(50, 7)[1:, :].T  # (7, 49), non-contiguous
    w = torch.rand(301)
    assert not G.is_contiguous() and not V.is_contiguous()
    assert _rel(cpu.dots(G, V), ref.dots(G, V)) < 1e-6
    assert _rel(cpu.score(V, G), ref.score(V, G)) < 1e-6
    acc = torch.randn(49, 7).T  # non-contiguous accumulator, updated in place
    acc_ref = acc.clone()
    cpu.rank_one_accumulate(acc, G, V, w)
    ref.rank_one_accumulate(acc_ref, G, V, w)
    assert _rel(acc, acc_ref) < 1e-6
    Cm = torch.randn(301, 7).T
    assert _rel(cpu.weighted_sum(Cm, G), ref.weighted_sum(Cm, G)) < 1e-6
    assert _rel(cpu.gram(G[:5], G), ref.gram(G[:5], G)) < 1e-6
    assert _rel(cpu.gram(G, G[:5]), ref.gram(G, G[:5])) < 1e-6


# (b, c, D, m): one block as a group; c = 1; m not a multiple of 16; a group whose dots items cross block
# boundaries and whose accumulating blocks run in parallel (work > 2 items); blocks big enough for stripes
BATCHED = [(1, 1, 13, 1), (3, 7, 401, 3), (2, 1, 129, 19), (3, 41, 5000, 16), (2, 300, 2000, 8)]
PRIMITIVES = ("sq_norms", "dots", "norms_and_dots", "score", "weighted_sum", "rank_one_accumulate")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b,c,D,m", BATCHED, ids=lambda *_: None)
@pytest.mark.parametrize("nt", [1, 2, 3], ids=lambda n: f"threads{n}")
def test_batched_primitives(monkeypatch, b, c, D, m, dtype, nt):
    """A group of blocks (a view of a bigger chunk: block stride > c·D) in one C++ call per primitive,
    against the float64 per-block formulas; never the torch reference (patched to fail here); G handed to
    C++ without a copy; bitwise reproducible for a thread count (3 threads and 2 blocks: the striped blocks
    run one after the other)."""
    for name in PRIMITIVES:
        monkeypatch.setattr(TorchBackend, name, lambda *a, name=name: pytest.fail(f"{name}: torch fallback"))
    _native.set_num_threads(nt)
    try:
        cpu = CPUBackend()
        gen = torch.Generator().manual_seed(b * 1000 + c + D)
        G = torch.randn(b, c + 5, D, generator=gen).to(dtype)[:, 3 : 3 + c]
        assert G.stride(0) > c * D and G[0].is_contiguous()
        assert np.shares_memory(_grad_buffer(G), (G.view(torch.int16) if dtype == torch.bfloat16 else G).numpy())
        V, C = torch.randn(b, m, D, generator=gen), torch.randn(b, m, c, generator=gen)
        w, acc0 = torch.rand(b, c, generator=gen), torch.randn(b, m, D, generator=gen)
        G64, V64 = G.double(), V.double()
        s0, P0 = (G64 * G64).sum(-1), V64 @ G64.mT
        s, P = cpu.norms_and_dots(G, V)
        assert s.shape == (b, c) and P.shape == (b, m, c)
        assert _rel(s, s0) < 2e-6 and _rel(P, P0) < 2e-6
        assert _rel(cpu.sq_norms(G), s0) < 2e-6 and _rel(cpu.dots(G, V), P0) < 2e-6
        S = cpu.score(V, G)
        assert S.shape == (m, c) and _rel(S, -P0.sum(0)) < 2e-6
        out = cpu.weighted_sum(C, G)
        assert out.shape == (b, m, D) and _rel(out, C.double() @ G64) < 2e-6
        acc = acc0.clone()
        cpu.rank_one_accumulate(acc, G, V, w)
        assert _rel(acc, acc0.double() + (P0 * w.double()[:, None, :]) @ G64) < 2e-6
        again = acc0.clone()
        cpu.rank_one_accumulate(again, G, V, w)
        assert torch.equal(acc, again) and torch.equal(cpu.weighted_sum(C, G), out)
        assert torch.equal(cpu.norms_and_dots(G, V)[1], P)
    finally:
        _native.set_num_threads(0)


def test_one_native_call_per_primitive_for_a_group(monkeypatch):
    """A group of 8 blocks costs each primitive one call into pyinf._C, as one block does."""
    cpu = CPUBackend()
    calls = []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(C, name)
            return lambda *a: (calls.append(name), fn(*a))[1]

    monkeypatch.setattr(cpu, "_C", Counting())
    for b in (1, 8):
        G = torch.randn(b, 6, 50).bfloat16()
        V, Cm, w, acc = torch.randn(b, 3, 50), torch.randn(b, 3, 6), torch.rand(b, 6), torch.zeros(b, 3, 50)
        for name, call in (("sq_norms", lambda: cpu.sq_norms(G)), ("dots", lambda: cpu.dots(G, V)),
                           ("norms_and_dots", lambda: cpu.norms_and_dots(G, V)), ("score", lambda: cpu.score(V, G)),
                           ("weighted_sum", lambda: cpu.weighted_sum(Cm, G)),
                           ("rank_one_accumulate", lambda: cpu.rank_one_accumulate(acc, G, V, w))):
            calls.clear()
            call()
            assert len(calls) == 1, (name, b, calls)


def test_batched_accumulator_view_and_bad_groups():
    """acc may be a view (block stride > m·D): updated in place, its neighbours untouched; a G without
    the block axis of V, or with overlapping output blocks, is a ValueError from C++."""
    cpu = CPUBackend()
    G, V, w = torch.randn(3, 5, 40), torch.randn(3, 2, 40), torch.rand(3, 5)
    chunk = torch.randn(3, 4, 40)
    before = chunk.clone()
    cpu.rank_one_accumulate(chunk[:, 1:3], G, V, w)
    expect = before[:, 1:3].double() + ((V.double() @ G.double().mT) * w.double()[:, None]) @ G.double()
    assert _rel(chunk[:, 1:3], expect) < 2e-6
    assert torch.equal(chunk[:, 0], before[:, 0]) and torch.equal(chunk[:, 3], before[:, 3])
    with pytest.raises(ValueError, match="V"):
        C.dots(G.numpy(), V[0].numpy(), np.zeros((3, 2, 5), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        same = np.lib.stride_tricks.as_strided(np.zeros((2, 5), np.float32), shape=(3, 2, 5), strides=(0, 20, 4))
        C.dots(G.numpy(), V.numpy(), same)


def test_float64_and_float16_fall_back_to_reference():
    cpu, ref = CPUBackend(), TorchBackend()
    for dtype in (torch.float64, torch.float16):
        G = torch.randn(9, 13).to(dtype)
        V = torch.randn(3, 13).to(torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(cpu.dots(G, V), ref.dots(G, V))
        assert torch.equal(cpu.sq_norms(G), ref.sq_norms(G))


def test_missing_extension(monkeypatch):
    """Without pyinf._C: "auto" -> torch with one RuntimeWarning; "cpu" -> a clear error."""
    monkeypatch.delenv("PYINF_REQUIRE_NATIVE", raising=False)
    monkeypatch.setattr(_native, "_loaded", True)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", ImportError("simulated: no compiler"))
    monkeypatch.setattr(_native, "_warned", False)
    with pytest.warns(RuntimeWarning, match="falls back to PyTorch"):
        b = get_backend("auto", torch.device("cpu"))
    assert isinstance(b, TorchBackend) and not isinstance(b, CPUBackend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning
        get_backend("auto", torch.device("cpu"))
        train, query = _grads(7, 8, torch.float32), _grads(2, 9, torch.float32)
        S = pyinf.influence(train, query, method="datainf")  # auto, works
    assert S.shape == (2, 7)
    with pytest.raises(RuntimeError, match="pyinf._C"):
        pyinf.influence(train, query, method="datainf", backend="cpu")
    # under PYINF_REQUIRE_NATIVE=1 "auto" refuses to hide the missing build
    monkeypatch.setenv("PYINF_REQUIRE_NATIVE", "1")
    with pytest.raises(ImportError):
        get_backend("auto", torch.device("cpu"))
