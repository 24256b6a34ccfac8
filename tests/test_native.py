"""The C++ extension pyinf._C: its passes against a float64 reference, at
several thread counts (the worker pool of csrc/pool.h)."""

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from pyinf import _native

C = _native.load()  # with PYINF_REQUIRE_NATIVE=1 this raises if the build is missing
if C is None:  # only reachable outside `make test`
    pytest.fail(
        "pyinf._C is not available: " + str(_native.import_error()), pytrace=False
    )

CS = [1, 7, 41]
DS = [1, 13, 401, 1271]
MS = [1, 3, 16]


def _ref(G, V):
    G64, V64 = G.double(), V.double()
    return (G64 * G64).sum(1), V64 @ G64.T


def _rel(a, b):
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    old = C.num_threads()
    C.set_num_threads(request.param)
    assert C.num_threads() == request.param
    yield request.param
    C.set_num_threads(0)
    assert C.num_threads() == old or old == request.param


def _make(c, m, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed * 1000003 + c * 7919 + D * 31 + m)
    G = torch.randn(c, D, generator=g).to(dtype)
    # a non-zero mean so the dots do not cancel to ~0
    V = torch.randn(m, D, generator=g) + 0.25
    return G, V


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("c", CS)
def test_norms_and_dots_raw(c, D, m, dtype, threads):
    G, V = _make(c, m, D, dtype)
    s = np.full((c,), np.nan, dtype=np.float32)
    dots = np.full((m, c), np.nan, dtype=np.float32)
    if dtype == torch.bfloat16:
        C.norms_and_dots_bf16(G.view(torch.int16).numpy(), V.numpy(), s, dots)
    else:
        C.norms_and_dots(G.numpy(), V.numpy(), s, dots)
    assert not np.isnan(s).any() and not np.isnan(dots).any(), "unwritten output"
    s_ref, d_ref = _ref(G.float(), V)  # same (bf16-rounded) values, in float64
    s_t, d_t = torch.from_numpy(s), torch.from_numpy(dots)
    # elementwise on s (sums of squares do not cancel), normwise on dots
    assert torch.allclose(s_t.double(), s_ref, rtol=1e-5, atol=0), (s_t, s_ref)
    assert _rel(d_t, d_ref) < 1e-5
    assert torch.allclose(d_t.double(), d_ref, rtol=1e-4, atol=1e-5 * d_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dispatch_on_buffer_format(dtype):
    """norms_and_dots also accepts bf16 bits as uint16 or int16 buffers."""
    G, V = _make(9, 5, 300, dtype)
    s_ref, d_ref = _ref(G.float(), V)
    if dtype == torch.bfloat16:
        bufs = [G.view(torch.int16).numpy(), G.view(torch.int16).numpy().view(np.uint16)]
    else:
        bufs = [G.numpy()]
    for buf in bufs:
        s = np.full((9,), np.nan, np.float32)
        d = np.full((5, 9), np.nan, np.float32)
        C.norms_and_dots(buf, V.numpy(), s, d)
        assert _rel(torch.from_numpy(s), s_ref) < 1e-5
        assert _rel(torch.from_numpy(d), d_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("c,D,m", [(41, 1271, 16), (7, 13, 3), (1, 1, 1), (130, 2049, 8)])
def test_torch_wrapper(c, D, m, dtype):
    G, V = _make(c, m, D, dtype, seed=1)
    s, dots = _native.norms_and_dots(G, V)
    assert s.dtype == torch.float32 and dots.dtype == torch.float32
    assert s.shape == (c,) and dots.shape == (m, c)
    s_ref, d_ref = _ref(G.float(), V)
    assert _rel(s, s_ref) < 1e-5
    assert _rel(dots, d_ref) < 1e-5
    # preallocated outputs are filled in place
    s2 = torch.full((c,), float("nan"))
    d2 = torch.full((m, c), float("nan"))
    r1, r2 = _native.norms_and_dots(G, V, s_out=s2, dots_out=d2)
    assert r1 is s2 and r2 is d2
    assert torch.equal(s2, s) and torch.equal(d2, dots)


def test_empty_shapes():
    for c, D, m in [(0, 5, 2), (3, 0, 2), (3, 5, 0)]:
        G = torch.randn(c, D)
        V = torch.randn(m, D)
        s, d = _native.norms_and_dots(G, V)
        assert s.shape == (c,) and d.shape == (m, c)
        if D == 0:
            assert torch.all(s == 0) and torch.all(d == 0)
        s_ref, d_ref = _ref(G, V)
        assert torch.allclose(s.double(), s_ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(d.double(), d_ref, rtol=1e-5, atol=1e-6)


def test_threads_api():
    n0 = C.num_threads()
    assert n0 >= 1
    C.set_num_threads(1)
    assert C.num_threads() == 1 == _native.num_threads()
    _native.set_num_threads(2)
    assert C.num_threads() == 2
    C.set_num_threads(0)
    assert C.num_threads() == n0
    with pytest.raises(ValueError):
        C.set_num_threads(-1)


def _outs(c, m):
    return np.zeros((c,), np.float32), np.zeros((m, c), np.float32)


def test_bad_inputs_raise_value_error():
    G = np.random.rand(6, 10).astype(np.float32)
    V = np.random.rand(3, 10).astype(np.float32)
    s, d = _outs(6, 3)
    C.norms_and_dots(G, V, s, d)  # the good case

    bad = {
        "G 1-D": (G[0], V, s, d),
        "G 3-D": (G.reshape(6, 10, 1), V, s, d),
        "V 1-D": (G, V[0], s, d),
        "mismatched D": (G, np.zeros((3, 11), np.float32), s, d),
        "s wrong len": (G, V, np.zeros(5, np.float32), d),
        "s 2-D": (G, V, np.zeros((6, 1), np.float32), d),
        "dots transposed": (G, V, s, np.zeros((6, 3), np.float32)),
        "G non-contiguous": (np.asfortranarray(G), V, s, d),
        "G strided": (np.random.rand(6, 20).astype(np.float32)[:, ::2], V, s, d),
        "V non-contiguous": (G, np.asfortranarray(V), s, d),
        "dots non-contiguous": (G, V, s, np.zeros((6, 3), np.float32).T),
        "G float64": (G.astype(np.float64), V, s, d),
        "G int32": (G.astype(np.int32), V, s, d),
        "G float16": (G.astype(np.float16), V, s, d),
        "V float64": (G, V.astype(np.float64), s, d),
        "V bf16 bits": (G, V.view(np.uint32).astype(np.uint16), s, d),
        "s float64": (G, V, np.zeros(6, np.float64), d),
        "dots float64": (G, V, s, np.zeros((3, 6), np.float64)),
    }
    ro = np.zeros((3, 6), np.float32)
    ro.setflags(write=False)
    bad["dots read-only"] = (G, V, s, ro)
    for name, args in bad.items():
        with pytest.raises(ValueError):
            C.norms_and_dots(*args)
            pytest.fail(f"no ValueError for {name}")
    # the explicit bf16 entry point rejects float32 G
    with pytest.raises(ValueError, match="bfloat16"):
        C.norms_and_dots_bf16(G, V, s, d)
    with pytest.raises(ValueError, match="D = 10"):
        C.norms_and_dots(G, np.zeros((3, 11), np.float32), s, d)


def test_wrapper_bad_inputs():
    G = torch.randn(6, 10)
    V = torch.randn(3, 10)
    with pytest.raises(ValueError):
        _native.norms_and_dots(G.double(), V)
    with pytest.raises(ValueError):
        _native.norms_and_dots(G.half(), V)
    with pytest.raises(ValueError):
        _native.norms_and_dots(G, V.bfloat16())
    with pytest.raises(ValueError):
        _native.norms_and_dots(G.t(), V[:, :6])  # non-contiguous
    with pytest.raises(ValueError):
        _native.norms_and_dots(G.bfloat16().t(), V[:, :6])
    with pytest.raises(ValueError):
        _native.norms_and_dots(G, torch.randn(3, 11))
    with pytest.raises(ValueError):
        _native.norms_and_dots(G[0], V)


def test_native_is_available():
    assert _native.is_available()
    assert _native.import_error() is None
    if os.environ.get("PYINF_REQUIRE_NATIVE") == "1":
        assert _native.load() is not None


# ------------------------------------------------- dots, rank_one, weighted_sum


def _gbuf(G):
    return G.view(torch.int16).numpy() if G.dtype == torch.bfloat16 else G.numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("c,D,m", [(1, 1, 1), (7, 13, 3), (41, 401, 5), (5, 1271, 16), (130, 2049, 8), (9, 520, 2)])
def test_passes_raw(c, D, m, dtype, threads):
    G, V = _make(c, m, D, dtype, seed=2)
    g = torch.Generator().manual_seed(c + D + m)
    w = torch.rand(c, generator=g)
    Cm = torch.randn(m, c, generator=g)
    G64, V64 = G.double(), V.double()
    out = np.full((m, c), np.nan, np.float32)
    C.dots(_gbuf(G), V.numpy(), out, -2.0)
    assert not np.isnan(out).any()
    assert _rel(torch.from_numpy(out), -2.0 * V64 @ G64.T) < 2e-6
    acc0 = torch.randn(m, D, generator=g)
    acc = acc0.clone()
    C.rank_one_accumulate(acc.numpy(), _gbuf(G), V.numpy(), w.numpy())
    assert _rel(acc, acc0.double() + ((V64 @ G64.T) * w.double()) @ G64) < 2e-6
    ws = np.full((m, D), np.nan, np.float32)
    C.weighted_sum(Cm.numpy(), _gbuf(G), ws)
    assert _rel(torch.from_numpy(ws), Cm.double() @ G64) < 2e-6


def test_passes_threads_agree():
    """The per-thread accumulators reduce to the single-thread answer."""
    G, V = _make(203, 4, 777, torch.bfloat16, seed=3)
    w = torch.rand(203)
    res = []
    for n in (1, 2, 3):
        C.set_num_threads(n)
        acc = torch.zeros(4, 777)
        C.rank_one_accumulate(acc.numpy(), _gbuf(G), V.numpy(), w.numpy())
        res.append(acc)
    C.set_num_threads(0)
    assert _rel(res[1], res[0]) < 1e-6 and _rel(res[2], res[0]) < 1e-6


def test_passes_empty_and_bad_inputs():
    G = np.random.rand(6, 10).astype(np.float32)
    V = np.random.rand(3, 10).astype(np.float32)
    w = np.random.rand(6).astype(np.float32)
    acc = np.zeros((3, 10), np.float32)
    C.rank_one_accumulate(acc, G, V, w)  # the good case
    for bad in [
        (acc, G, V, w[:5]),
        (acc[:, :9].copy(), G, V, w),
        (acc, G.astype(np.float64), V, w),
        (acc, G, V.astype(np.float64), w),
        (acc, np.asfortranarray(G), V, w),
        (np.zeros((3, 10), np.float64), G, V, w),
    ]:
        with pytest.raises(ValueError):
            C.rank_one_accumulate(*bad)
    with pytest.raises(ValueError, match="out"):
        C.dots(G, V, np.zeros((6, 3), np.float32))
    with pytest.raises(ValueError):
        C.weighted_sum(np.zeros((3, 5), np.float32), G, np.zeros((3, 10), np.float32))
    # empty shapes: nothing to do, outputs well defined
    out = np.full((3, 10), np.nan, np.float32)
    C.weighted_sum(np.zeros((3, 0), np.float32), np.zeros((0, 10), np.float32), out)
    assert (out == 0).all()
    d = np.full((2, 4), np.nan, np.float32)
    C.dots(np.zeros((4, 0), np.float32), np.zeros((2, 0), np.float32), d)
    assert (d == 0).all()


# ------------------------------------------------ thread counts and the pool
#
# The passes run on the worker pool of csrc/pool.h (issue 11): items claimed
# dynamically by the caller and the workers; accumulating passes in stripes
# reduced in stripe order.  The shapes below are big enough to be split into
# several items (>= 2 x 4M multiply-adds), with ragged edges.

POOL_SHAPES = [(2000, 1024, 8), (1027, 4099, 3), (4099, 520, 16), (803, 2053, 1)]


def _all_passes(G, V, w, Cm, acc0):
    c, D, m = G.shape[0], G.shape[1], V.shape[0]
    gb = _gbuf(G)
    out = {}
    out["dots"] = np.full((m, c), np.nan, np.float32)
    C.dots(gb, V.numpy(), out["dots"], -1.5)
    out["s"] = np.full((c,), np.nan, np.float32)
    out["nd"] = np.full((m, c), np.nan, np.float32)
    C.norms_and_dots(gb, V.numpy(), out["s"], out["nd"])
    out["acc"] = acc0.numpy().copy()
    C.rank_one_accumulate(out["acc"], gb, V.numpy(), w.numpy())
    out["ws"] = np.full((m, D), np.nan, np.float32)
    C.weighted_sum(Cm.numpy(), gb, out["ws"])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("c,D,m", POOL_SHAPES)
def test_passes_thread_counts(c, D, m, dtype):
    """At every thread count: the float64 answer, bitwise the same run to run;
    dots / norms (disjoint outputs) bitwise the same at every thread count."""
    G, V = _make(c, m, D, dtype, seed=4)
    g = torch.Generator().manual_seed(c * 3 + D + m)
    w = torch.rand(c, generator=g)
    Cm = torch.randn(m, c, generator=g)
    acc0 = torch.randn(m, D, generator=g)
    G64, V64 = G.double(), V.double()
    ref = {
        "dots": -1.5 * V64 @ G64.T,
        "s": (G64 * G64).sum(1),
        "nd": V64 @ G64.T,
        "acc": acc0.double() + ((V64 @ G64.T) * w.double()) @ G64,
        "ws": Cm.double() @ G64,
    }
    results = {}
    try:
        for nt in (1, 2, 3, 4, 7):
            C.set_num_threads(nt)
            first, again = _all_passes(G, V, w, Cm, acc0), _all_passes(G, V, w, Cm, acc0)
            for k in first:
                assert np.array_equal(first[k], again[k]), (nt, k, "not reproducible")
                assert not np.isnan(first[k]).any(), (nt, k)
                assert _rel(torch.from_numpy(first[k]), ref[k]) < 2e-6, (nt, k)
            results[nt] = first
    finally:
        C.set_num_threads(0)
    for nt, out in results.items():
        for k in ("dots", "s", "nd"):
            assert np.array_equal(out[k], results[1][k]), (nt, k)
    assert C._pool_workers() >= 1  # the threaded path ran


def _pooled_rank_one(dtype, seed):
    """Buffers of a rank-one pass big enough to use the pool (3000 x 8 x 1024), and its answer at the
    current thread count: (G buffer, V, w, acc)."""
    G, V = _make(3000, 8, 1024, dtype, seed=seed)
    w = torch.rand(3000, generator=torch.Generator().manual_seed(seed))
    gb, Vn, wn = _gbuf(G), V.numpy(), w.numpy()
    expected = np.zeros((8, 1024), np.float32)
    C.rank_one_accumulate(expected, gb, Vn, wn)
    return gb, Vn, wn, expected


def test_passes_concurrent_callers():
    """Python threads calling the kernels at once (the GIL is released): a call
    that finds the pool busy runs its stripes itself, in order: the same bits."""
    C.set_num_threads(2)
    try:
        gb, Vn, wn, expected = _pooled_rank_one(torch.bfloat16, seed=5)
        out, errors = [], []

        def work():
            try:
                for _ in range(6):
                    acc = np.zeros((8, 1024), np.float32)
                    C.rank_one_accumulate(acc, gb, Vn, wn)
                    out.append(acc)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and len(out) == 24
        for acc in out:
            assert np.array_equal(acc, expected)
    finally:
        C.set_num_threads(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_pool_in_forked_child():
    """A child forked after the pool started has none of its threads: the pool
    is rebuilt there, and the answer is the same."""
    C.set_num_threads(2)
    try:
        gb, Vn, wn, expected = _pooled_rank_one(torch.float32, seed=6)
        assert C._pool_workers() >= 1
        pid = os.fork()
        if pid == 0:  # the child: no pytest, no torch; exit status is the verdict
            code = 2
            try:
                signal.alarm(60)  # a hang fails the test instead of blocking it
                acc = np.zeros((8, 1024), np.float32)
                C.rank_one_accumulate(acc, gb, Vn, wn)
                code = 0 if np.array_equal(acc, expected) and C._pool_workers() >= 1 else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        C.set_num_threads(0)


def test_small_calls_stay_on_the_caller(tmp_path):
    """Calls too small to gain from a second thread start no worker (each paid a
    wake-up and a barrier under OpenMP: 10-40x slower on a busy machine)."""
    code = (
        "import numpy as np\n"
        "from pyinf import _C as C\n"
        "C.set_num_threads(2)\n"
        "r = np.random.default_rng(0)\n"
        "for c, D, m in [(37, 51, 5), (256, 1024, 8), (1, 1, 1)]:\n"
        "    G = r.random((c, D), dtype=np.float32); V = r.random((m, D), dtype=np.float32)\n"
        "    w = r.random(c, dtype=np.float32); acc = np.zeros((m, D), np.float32)\n"
        "    C.rank_one_accumulate(acc, G, V, w); C.dots(G, V, np.zeros((m, c), np.float32))\n"
        "    C.weighted_sum(np.zeros((m, c), np.float32), G, acc)\n"
        "    C.norms_and_dots(G, V, np.zeros(c, np.float32), np.zeros((m, c), np.float32))\n"
        "assert C._pool_workers() == 0, C._pool_workers()\n"
        "G = r.random((2000, 1024), dtype=np.float32); V = r.random((8, 1024), dtype=np.float32)\n"
        "C.rank_one_accumulate(np.zeros((8, 1024), np.float32), G, V, np.ones(2000, np.float32))\n"
        "assert C._pool_workers() == 1, C._pool_workers()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
