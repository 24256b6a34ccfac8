"""Triton backend on the Llama-2-13B LoRA shape, against the H100 roofline and the torch backend.

Shape: LoRA r = 8 on q_proj and v_proj of 40 layers -> 160 blocks of 8 × 5120
(A and Bᵀ), 6.55M parameters; n = 900 train, m ∈ {1, 16, 100} queries, fp32 and
bf16 gradients (23.6 GB / 11.8 GB for G). GPU only: skipped without CUDA, and
skipped under TRITON_INTERPRET=1 (the interpreter would run the kernels on the
CPU). One command, from the repository root, after `make install`:

    cd bench && mkdir -p results && TRITON_INTERPRET=0 ../.venv/bin/python -m pytest -q --import-mode=importlib \
        -p no:cacheprovider test_bench_triton.py --benchmark-json=results/bench-triton.json

Recorded per case (pytest-benchmark JSON `extra_info`, and a summary JSON
`bench/results/triton-<device>-<time>.json` with device name, torch / triton
versions and commit): median and 20/80 % quantile ms of the triton backend, the
torch backend's median on the same inputs, achieved GB/s and TFLOP/s, the
ceilings measured in the same run (device copy GB/s; bf16, tf32 and fp32
matmul TFLOP/s), the HBM floor (passes × bytes of G / copy bandwidth) and the
ratio to it, and peak memory.
Ops: one full pass over the 160 blocks (chunk = 900 samples per block call).
Methods: `pyinf.influence(..., chunk_size=900)` end to end, both backends.
Accuracy: every method vs float64 on a 16-block subset (the float64 copy of
the full G would not fit next to it), m = 100.

Knobs (environment): PYINF_BENCH_ROUNDS (default 5), PYINF_BENCH_SOLVER_BLOCKS
(blocks of 5120² for Schulz vs Cholesky, default 8), PYINF_BENCH_HYPERINF_BLOCKS
(blocks for hyperinf end to end, default 16: its float64 GFIMs and their stack
are 2 × 210 MB per block, the full 160 blocks need ~67 GB on top of G).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import statistics
import time
import warnings

import pytest
import machine
import torch

if not torch.cuda.is_available():
    pytest.skip("the Triton benchmark needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: run with TRITON_INTERPRET=0 (see the module docstring)",
                allow_module_level=True)
triton = pytest.importorskip("triton")

import pyinf  # noqa: E402
from pyinf.backends import get_backend  # noqa: E402

N, LAYERS, ROWS, COLS = 900, 40, 8, 5120
NAMES = [f"layers.{i}.{p}_proj.lora_{ab}" for i in range(LAYERS) for p in "qv" for ab in "AB"]  # 160 blocks
D = ROWS * COLS
MS = (1, 16, 100)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROUNDS = int(os.environ.get("PYINF_BENCH_ROUNDS", "5"))
SOLVER_BLOCKS = int(os.environ.get("PYINF_BENCH_SOLVER_BLOCKS", "8"))
HYPERINF_BLOCKS = int(os.environ.get("PYINF_BENCH_HYPERINF_BLOCKS", "16"))
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DEV = torch.device("cuda")
ROWS_OUT: list[dict] = []


# ----------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------
def _times(fn, rounds: int = ROUNDS, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _run(benchmark, fn, rounds: int = ROUNDS) -> list[float]:
    """Time `fn` with pytest-benchmark (synchronised); return the raw round times (s)."""

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        return list(benchmark.stats.stats.data)
    return _times(fn, rounds)  # --benchmark-disable


def _peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _record(benchmark, row: dict) -> None:
    ROWS_OUT.append(row)
    benchmark.extra_info.update(row)


# ----------------------------------------------------------------------------
# fixtures: ceilings, data
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ceilings():
    """Measured in this run: device copy bandwidth and bf16 / tf32 / fp32 matmul throughput."""
    src = torch.empty(1 << 30, dtype=torch.float32, device=DEV)  # 4 GiB
    dst = torch.empty_like(src)
    t = statistics.median(_times(lambda: dst.copy_(src), 10))
    copy_gbs = 2 * src.numel() * 4 / t / 1e9
    del src, dst
    out = {"copy_GBps": copy_gbs}
    k = 8192
    for name, dt, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True), ("fp32", torch.float32, False)):
        a = torch.randn(k, k, device=DEV, dtype=dt)
        b = torch.randn(k, k, device=DEV, dtype=dt)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        t = statistics.median(_times(lambda: a @ b, 10))
        torch.backends.cuda.matmul.allow_tf32 = prev
        out[f"{name}_matmul_TFLOPs"] = 2 * k**3 / t / 1e12
        del a, b
    torch.cuda.empty_cache()
    return out


@pytest.fixture(scope="module", params=list(DTYPES))
def G(request):
    """{name: (N, 8, 5120)} gradients in the stored dtype (one dtype alive at a time)."""
    dt = DTYPES[request.param]
    gen = torch.Generator(device=DEV).manual_seed(0)
    g = {name: (torch.randn(N, ROWS, COLS, device=DEV, generator=gen) * 1e-3).to(dt) for name in NAMES}
    yield request.param, g
    del g
    torch.cuda.empty_cache()


def _queries(m: int, dt: torch.dtype, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return {name: (torch.randn(m, ROWS, COLS, device=DEV, generator=gen) * 1e-3).to(dt) for name in NAMES}


def _gbytes(g: dict[str, torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in g.values()) / 1e9


# ----------------------------------------------------------------------------
# ops: one pass over all 160 blocks
# ----------------------------------------------------------------------------
OPS = {  # name: (reads of G, FLOPs per element of G per query row, needs m)
    "sq_norms": (1, 0, False),
    "norms_and_dots": (1, 2, True),
    "score": (1, 2, True),
    "weighted_sum": (1, 2, True),
    "rank_one_accumulate": (2, 4, True),
}


def _op_call(op: str, be, G2: torch.Tensor, V: torch.Tensor, acc: torch.Tensor, w: torch.Tensor, C: torch.Tensor):
    if op == "sq_norms":
        return be.sq_norms(G2)
    if op == "norms_and_dots":
        return be.norms_and_dots(G2, V)
    if op == "score":
        return be.score(V, G2)
    if op == "weighted_sum":
        return be.weighted_sum(C, G2)
    return be.rank_one_accumulate(acc, G2, V, w)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("op", list(OPS))
def test_op(benchmark, ceilings, G, op, m):
    dname, g = G
    reads, flops_per, needs_m = OPS[op]
    if not needs_m and m != MS[0]:
        pytest.skip("independent of m")
    flat = {k: t.reshape(N, -1) for k, t in g.items()}
    V = {k: v.reshape(m, -1).float() for k, v in _queries(m, torch.float32).items()}
    acc = {k: torch.zeros(m, D, device=DEV) for k in NAMES}
    w = torch.rand(N, device=DEV) / N
    C = torch.randn(m, N, device=DEV) / N

    def one_pass(be):
        def f():
            for k in NAMES:
                _op_call(op, be, flat[k], V[k], acc[k], w, C)
        return f

    tri, ref = get_backend("triton", DEV), get_backend("torch", DEV)
    t_tri = _run(benchmark, one_pass(tri))
    t_ref = _times(one_pass(ref))
    gb = _gbytes(g)
    med = statistics.median(t_tri)
    floor = reads * gb / ceilings["copy_GBps"]
    _record(benchmark, {
        "kind": "op", "op": op, "dtype": dname, "m": m, "blocks": len(NAMES), "n": N,
        "triton_ms": med * 1e3, "triton_q20_ms": _q(t_tri, 0.2) * 1e3, "triton_q80_ms": _q(t_tri, 0.8) * 1e3,
        "torch_ms": statistics.median(t_ref) * 1e3, "speedup_vs_torch": statistics.median(t_ref) / med,
        "GBps": reads * gb / med, "TFLOPs": flops_per * m * N * D * len(NAMES) / med / 1e12,
        "floor_ms": floor * 1e3, "x_floor": med / floor,
        "peak_MB_triton": _peak(one_pass(tri)) / 2**20, "peak_MB_torch": _peak(one_pass(ref)) / 2**20,
        **ceilings,
    })


@pytest.mark.parametrize("op", ["gram", "gfim"])
def test_op_batched(benchmark, ceilings, G, op):
    """All blocks of one shape in one launch (16 blocks; gfim is 2·N·rows·cols² FLOPs per block)."""
    from pyinf.kernels import gfim as k_gfim
    from pyinf.kernels import gram as k_gram

    dname, g = G
    names = NAMES[:16]
    X = torch.stack([g[k] for k in names])  # (16, N, 8, 5120)
    if op == "gram":
        Xf = X.reshape(len(names), N, -1)
        fn_tri = lambda: k_gram.gram(Xf, Xf)  # noqa: E731
        fn_ref = lambda: [Xf[i].float() @ Xf[i].float().T for i in range(len(names))]  # noqa: E731
        flops = 2 * N * N * D * len(names)
    else:
        fn_tri = lambda: k_gfim.gfim(X)  # noqa: E731
        fn_ref = lambda: [get_backend("torch", DEV).gfim(X[i]) for i in range(len(names))]  # noqa: E731
        flops = 2 * N * ROWS * COLS * COLS * len(names)
    t_tri = _run(benchmark, fn_tri, rounds=3)
    t_ref = _times(fn_ref, 3)
    med = statistics.median(t_tri)
    _record(benchmark, {
        "kind": "op", "op": op, "dtype": dname, "blocks": len(names), "n": N,
        "triton_ms": med * 1e3, "triton_q20_ms": _q(t_tri, 0.2) * 1e3, "triton_q80_ms": _q(t_tri, 0.8) * 1e3,
        "torch_ms": statistics.median(t_ref) * 1e3, "speedup_vs_torch": statistics.median(t_ref) / med,
        "TFLOPs": flops / med / 1e12, "peak_MB_triton": _peak(fn_tri) / 2**20, **ceilings,
    })
    del X


# ----------------------------------------------------------------------------
# HyperINF's inverse: Schulz kernels vs batched Cholesky at 5120²
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["cholesky", "schulz-ieee", "schulz-tf32x3"])
def test_spd_inverse(benchmark, ceilings, solver):
    from pyinf.backends import triton_backend
    from pyinf.kernels import schulz as k_schulz

    b = SOLVER_BLOCKS
    gen = torch.Generator(device=DEV).manual_seed(2)
    A = torch.empty(b, COLS, COLS, dtype=torch.float64, device=DEV)
    # A = Φ/rows + λI as hyperinf builds it, from gradients with a decaying column scale
    # (a spectrum spread over decades, as trained LoRA gradients have; i.i.d. columns would give κ ≈ 30)
    scale = (1.0 + torch.arange(COLS, device=DEV, dtype=torch.float32)) ** -0.75
    for i in range(b):
        Xg = torch.randn(N * ROWS, COLS, device=DEV, generator=gen) * scale * 1e-3
        phi = (Xg.T @ Xg).double() / N
        lam = 0.1 * float(Xg.double().pow(2).sum()) / N / D
        A[i] = phi / ROWS
        A[i].diagonal().add_(lam)
        del Xg, phi
    be = triton_backend.TritonBackend()
    if solver == "cholesky":
        fn = lambda: be.spd_inverse(A, iterations=100, tol=1e-8, solver="cholesky")  # noqa: E731
    else:
        prec = solver.split("-")[1]
        fn = lambda: k_schulz.schulz_inverse(A, 100, 1e-8, precision=prec)  # noqa: E731
    t = _run(benchmark, fn, rounds=1)
    X, residual, steps = fn()
    ref = torch.linalg.inv(A)
    err = float((X - ref).norm() / ref.norm())
    med = statistics.median(t)
    _record(benchmark, {
        "kind": "spd_inverse", "solver": solver, "blocks": b, "k": COLS, "ms": med * 1e3,
        "ms_per_160_blocks": med * 1e3 * 160 / b, "steps": steps, "cond": float(torch.linalg.cond(A[0])), "residual": residual, "rel_err_vs_fp64_inv": err,
        "peak_MB": _peak(fn) / 2**20, **ceilings,
    })
    assert err < 1e-4


# ----------------------------------------------------------------------------
# methods end to end
# ----------------------------------------------------------------------------
METHODS = {  # name: (options, passes over G the math allows)
    "tracin": ({}, 1),
    "datainf": ({}, 3),
    "exact": ({}, 3),
    "lissa": (dict(iterations=5, tol=1e-30, scale=1.0), 2 * 5 + 1),
    "hyperinf": ({}, 2),
}


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("method", list(METHODS))
def test_method(benchmark, ceilings, G, method, m):
    dname, g = G
    opts, passes = METHODS[method]
    if method == "hyperinf":
        g = {k: g[k] for k in NAMES[:HYPERINF_BLOCKS]}
    q = {k: v for k, v in _queries(m, g[next(iter(g))].dtype).items() if k in g}

    def run(backend):
        def f():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # lissa: 5 iterations do not converge
                return pyinf.influence(g, q, method=method, backend=backend, chunk_size=N, **opts)
        return f

    t_tri = _run(benchmark, run("triton"), rounds=max(1, ROUNDS // 2))
    t_ref = _times(run("torch"), max(1, ROUNDS // 2))
    S, S_t = run("triton")(), run("torch")()
    med = statistics.median(t_tri)
    gb = _gbytes(g)
    floor = passes * gb / ceilings["copy_GBps"]
    _record(benchmark, {
        "kind": "method", "method": method, "dtype": dname, "m": m, "blocks": len(g), "n": N,
        "triton_ms": med * 1e3, "triton_q20_ms": _q(t_tri, 0.2) * 1e3, "triton_q80_ms": _q(t_tri, 0.8) * 1e3,
        "torch_ms": statistics.median(t_ref) * 1e3, "speedup_vs_torch": statistics.median(t_ref) / med,
        "floor_ms": floor * 1e3, "x_floor": med / floor, "passes_floor": passes,
        "rel_diff_vs_torch": float((S - S_t).norm() / S_t.norm()),
        "peak_MB_triton": _peak(run("triton")) / 2**20, "peak_MB_torch": _peak(run("torch")) / 2**20,
        **ceilings,
    })


@pytest.mark.parametrize("method", list(METHODS))
def test_accuracy_vs_float64(G, method):
    """Triton on the stored dtype vs float64 (torch backend) on the same values, 16 blocks, m = 100."""
    dname, g = G
    names = NAMES[:16]
    opts, _ = METHODS[method]
    if method == "lissa":
        opts = dict(iterations=5, tol=1e-30, scale=1.0)  # a truncated series: same T on both sides
    sub = {k: g[k] for k in names}
    q = {k: v for k, v in _queries(100, torch.float32, seed=3).items() if k in sub}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        S = pyinf.influence(sub, q, method=method, backend="triton", chunk_size=N, **opts).double()
        S64 = pyinf.influence({k: v.double() for k, v in sub.items()}, {k: v.double() for k, v in q.items()},
                              method=method, backend="torch", chunk_size=N, **opts).double()
    err = float((S - S64).norm() / S64.norm())
    ROWS_OUT.append({"kind": "accuracy", "method": method, "dtype": dname, "m": 100, "blocks": 16,
                     "rel_err_vs_fp64": err})
    assert err < 1e-4, (method, dname, err)


# ----------------------------------------------------------------------------
# summary JSON
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not ROWS_OUT:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"triton-{name.replace(' ', '_')}-{stamp}.json"
    path.write_text(json.dumps({
        "device": name, "torch_version": torch.__version__, "triton_version": triton.__version__,
        "commit": machine.git_commit(), "shape": {"blocks": len(NAMES), "rows": ROWS, "cols": COLS, "n": N, "m": list(MS)},
        "rows": ROWS_OUT,
    }, indent=1, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x)))
