"""C++ CPU backend (`backend="cpu"`) against the torch reference backend and the
machine's measured memory bandwidth, on the same data in the same run.

Shape (issue 4): DataInf on bf16 gradients, n = 4000 train samples, 20 blocks of
8 × 1024 (LoRA r = 8, d = 1024; D_b = 8192, 1.31 GB of G in all), m = 8 queries.

Measured in the run:
* memory bandwidth: a large numpy copy (512 MiB), (bytes read + written) / time,
  median over repeats; the floor of a pass = bytes of G read / that bandwidth;
* the machine's fp32 GEMM rate (torch.mm 2048³, all threads): the compute
  ceiling, reported to explain the passes whose flops per byte exceed the
  machine balance (rank_one_accumulate does 4·m flops per element of G:
  16 flops per byte of bf16 at m = 8);
* each primitive, one pass over the 20 blocks (chunk = all 4000 rows), native
  vs torch backend: median / 20 % / 80 % ms, GB/s of G, fraction of the floor;
* the fused DataInf pass (rank_one_accumulate over all blocks) and the full
  DataInf precondition (`fit` norms pass + precondition, as `pyinf.influence`
  runs it, default chunking), native vs torch.

Asserted (a benchmark that cannot fail is a defect): the fused DataInf pass and
the full precondition are ≥ 2× faster than the torch backend, and the fused
pass takes ≤ 2× its bandwidth floor (PYINF_BENCH_FLOOR_FACTOR, default 2).
The machine is shared: medians over PYINF_BENCH_ROUNDS (default 5) repeats,
and the load average before/after is recorded.

Run (after `make install`), from the repository root:

    cd bench && ../.venv/bin/python -m pytest -q --import-mode=importlib -p no:cacheprovider \
        test_bench_cpu.py -s --benchmark-json=results/bench-cpu.json

Summary JSON: `bench/results/cpu-<time>.json` (device = CPU model, threads,
torch version, commit, load, every figure printed).
"""
from __future__ import annotations

import datetime
import os
import statistics
import time

import machine
import numpy as np
import pytest
import torch

from pyinf import _native

if not _native.is_available():
    pytest.skip("pyinf._C is not built", allow_module_level=True)

import pyinf  # noqa: E402
from pyinf.backends import CPUBackend, TorchBackend  # noqa: E402
from pyinf.blocks import TensorSource  # noqa: E402
from pyinf.methods import get_method  # noqa: E402

N, BLOCKS, ROWS, COLS, M = 4000, 20, 8, 1024, 8
D = ROWS * COLS
ROUNDS = int(os.environ.get("PYINF_BENCH_ROUNDS", "5"))
TORCH_ROUNDS = int(os.environ.get("PYINF_BENCH_TORCH_ROUNDS", "3"))
FLOOR_FACTOR = float(os.environ.get("PYINF_BENCH_FLOOR_FACTOR", "2"))
SUMMARY: dict = {"rows": []}


# ----------------------------------------------------------------------------
def _times(fn, rounds, warmup=1):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _q(ts, p):
    s = sorted(ts)
    return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]


def _stats(ts):
    return {"median_ms": statistics.median(ts) * 1e3, "p20_ms": _q(ts, 0.2) * 1e3, "p80_ms": _q(ts, 0.8) * 1e3}


@pytest.fixture(scope="module")
def env():
    """The data and the ceilings, measured once in this run."""
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    G = [torch.randn(N, ROWS, COLS, generator=g).mul_(1e-2).bfloat16() for _ in range(BLOCKS)]
    V = [torch.randn(M, D, generator=g).mul_(1e-2) for _ in range(BLOCKS)]
    w = torch.rand(N, generator=g)
    a = np.ones(1 << 27, np.float32)  # 512 MiB
    b = np.empty_like(a)
    ts = _times(lambda: np.copyto(b, a), max(ROUNDS, 5))
    bw = 2 * a.nbytes / statistics.median(ts)
    del a, b
    A, B = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = 2 * 2048**3 / statistics.median(_times(lambda: A @ B, 5))
    gbytes = sum(t.numel() * t.element_size() for t in G)
    SUMMARY.update(
        device=machine.cpu_model(), native_threads=_native.num_threads(), torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__, numpy_version=np.__version__, git_commit=machine.git_commit(),
        cpu_count=os.cpu_count(), load_before=load_before, bandwidth_GBps=bw / 1e9,
        gemm_fp32_GFLOPs=gemm / 1e9, shape=dict(n=N, blocks=BLOCKS, rows=ROWS, cols=COLS, m=M, dtype="bf16"),
        bytes_G=gbytes, floor_ms=gbytes / bw * 1e3,
    )
    print(f"\n[cpu bench] {SUMMARY['device']}, {os.cpu_count()} cores, native threads {_native.num_threads()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load {load_before}")
    print(f"[cpu bench] copy bandwidth {bw / 1e9:.1f} GB/s (read+write), fp32 GEMM {gemm / 1e9:.0f} GFLOP/s; "
          f"G = {gbytes / 1e9:.2f} GB bf16 -> bandwidth floor {gbytes / bw * 1e3:.1f} ms per pass")
    return dict(G=G, V=V, w=w, bw=bw, gemm=gemm, gbytes=gbytes)


def _row(name, native_ts, torch_ts, env, flops=None):
    floor = env["gbytes"] / env["bw"]
    nat, tor = statistics.median(native_ts), statistics.median(torch_ts)
    row = {
        "op": name, "native": _stats(native_ts), "torch": _stats(torch_ts), "speedup_vs_torch": tor / nat,
        "native_GBps": env["gbytes"] / nat / 1e9, "floor_ms": floor * 1e3, "floor_fraction": floor / nat,
        "native_GFLOPs": (flops / nat / 1e9) if flops else None,
    }
    SUMMARY["rows"].append(row)
    print(f"[cpu bench] {name:28s} native {nat * 1e3:8.1f} ms ({_q(native_ts, .2) * 1e3:.1f}-{_q(native_ts, .8) * 1e3:.1f})"
          f"  torch {tor * 1e3:8.1f} ms  x{tor / nat:5.2f}  {env['gbytes'] / nat / 1e9:5.1f} GB/s"
          f"  = {floor / nat:4.0%} of the bandwidth floor"
          + (f"  {flops / nat / 1e9:.0f} GFLOP/s" if flops else ""))
    return row


def _each_block(fn):
    def run():
        for b in range(BLOCKS):
            fn(b)
    return run


PRIMITIVES = ["sq_norms", "norms_and_dots", "dots", "score", "weighted_sum", "gram_small_side", "gfim"]


@pytest.mark.parametrize("op", PRIMITIVES)
def test_primitive(benchmark, env, op):
    cpu, ref = CPUBackend(), TorchBackend()
    G = [t.reshape(N, D) for t in env["G"]]
    V, Cm = env["V"], [torch.randn(M, N) for _ in range(BLOCKS)]
    calls = {
        "sq_norms": lambda be, b: be.sq_norms(G[b]),
        "norms_and_dots": lambda be, b: be.norms_and_dots(G[b], V[b]),
        "dots": lambda be, b: be.dots(G[b], V[b]),
        "score": lambda be, b: be.score(V[b], G[b]),
        "weighted_sum": lambda be, b: be.weighted_sum(Cm[b], G[b]),
        "gram_small_side": lambda be, b: be.gram(G[b], G[b][:M]),
        "gfim": lambda be, b: be.gfim(env["G"][b]),
    }
    flops = {"sq_norms": 2, "norms_and_dots": 2 * (M + 1), "dots": 2 * M, "score": 2 * M, "weighted_sum": 2 * M,
             "gram_small_side": 2 * M, "gfim": 2 * COLS}[op] * N * D * BLOCKS
    f = calls[op]
    for b in (0,):  # same answer on the same data
        x, y = f(cpu, b), f(ref, b)
        x, y = (x if isinstance(x, tuple) else (x,)), (y if isinstance(y, tuple) else (y,))
        for u, v in zip(x, y):
            assert float((u.double() - v.double()).norm() / v.double().norm()) < 1e-4, op
    nblk = 2 if op == "gfim" else BLOCKS  # gfim: a GEMM on both backends, 2 blocks suffice
    nat = lambda: [f(cpu, b) for b in range(nblk)]  # noqa: E731
    benchmark.pedantic(nat, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    native_ts = list(benchmark.stats.stats.data) if benchmark.stats else _times(nat, ROUNDS)
    torch_ts = _times(lambda: [f(ref, b) for b in range(nblk)], TORCH_ROUNDS, warmup=0)
    if nblk != BLOCKS:  # report per full pass
        native_ts = [t * BLOCKS / nblk for t in native_ts]
        torch_ts = [t * BLOCKS / nblk for t in torch_ts]
    row = _row(op, native_ts, torch_ts, env, flops)
    benchmark.extra_info.update(row)
    if op != "gfim":  # gfim takes the torch path on both backends (a GEMM)
        assert row["speedup_vs_torch"] > 1.0, f"{op}: native slower than torch ({row})"


def test_datainf_fused_pass(benchmark, env):
    """rank_one_accumulate over the 20 blocks (DataInf's precondition pass): ≥ 2× torch, ≤ 2× the floor."""
    cpu, ref = CPUBackend(), TorchBackend()
    G = [t.reshape(N, D) for t in env["G"]]
    V, w = env["V"], env["w"]
    acc_n = [torch.zeros(M, D) for _ in range(BLOCKS)]
    acc_t = [torch.zeros(M, D) for _ in range(BLOCKS)]
    # correctness first, on a fresh accumulator
    a1, a2 = torch.zeros(M, D), torch.zeros(M, D)
    cpu.rank_one_accumulate(a1, G[0], V[0], w)
    ref.rank_one_accumulate(a2, G[0], V[0], w)
    assert float((a1 - a2).norm() / a2.norm()) < 1e-5
    nat = _each_block(lambda b: cpu.rank_one_accumulate(acc_n[b], G[b], V[b], w))
    benchmark.pedantic(nat, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    native_ts = list(benchmark.stats.stats.data) if benchmark.stats else _times(nat, ROUNDS)
    torch_ts = _times(_each_block(lambda b: ref.rank_one_accumulate(acc_t[b], G[b], V[b], w)), TORCH_ROUNDS,
                      warmup=0)
    flops = 4 * M * N * D * BLOCKS
    row = _row("rank_one_accumulate (fused)", native_ts, torch_ts, env, flops)
    row["compute_floor_ms"] = flops / env["gemm"] * 1e3
    print(f"[cpu bench]   compute floor at the measured GEMM rate: {row['compute_floor_ms']:.1f} ms "
          f"({flops / 1e9:.1f} GFLOP)")
    benchmark.extra_info.update(row)
    SUMMARY["fused"] = row
    assert row["speedup_vs_torch"] >= 2.0, f"fused DataInf pass only x{row['speedup_vs_torch']:.2f} vs torch"
    assert row["native"]["median_ms"] <= FLOOR_FACTOR * row["floor_ms"], (
        f"fused DataInf pass {row['native']['median_ms']:.1f} ms > {FLOOR_FACTOR}× the bandwidth floor "
        f"{row['floor_ms']:.1f} ms (compute floor {row['compute_floor_ms']:.1f} ms; load {os.getloadavg()})"
    )


def test_datainf_precondition(benchmark, env):
    """DataInf fit (norms pass) + precondition (fused pass), default chunking, as `pyinf.influence` runs it."""
    train = TensorSource({f"b{i}": t for i, t in enumerate(env["G"])})
    queries = {f"b{i}": env["V"][i].reshape(M, ROWS, COLS) for i in range(BLOCKS)}

    def run(backend):
        m = get_method("datainf")(backend)
        m.fit(train)
        return m.precondition(queries)

    cpu, ref = CPUBackend(), TorchBackend()
    H1, H2 = run(cpu), run(ref)
    err = max(float((H1[k] - H2[k]).norm() / H2[k].norm()) for k in H2)
    assert err < 1e-4
    benchmark.pedantic(lambda: run(cpu), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    native_ts = list(benchmark.stats.stats.data) if benchmark.stats else _times(lambda: run(cpu), ROUNDS)
    torch_ts = _times(lambda: run(ref), TORCH_ROUNDS, warmup=0)
    row = _row("datainf fit+precondition", native_ts, torch_ts, env, (2 + 4 * M) * N * D * BLOCKS)
    row["floor_ms"] *= 2  # two passes over G
    row["floor_fraction"] *= 2
    print(f"[cpu bench]   (two passes: bandwidth floor {row['floor_ms']:.1f} ms, "
          f"{row['floor_fraction']:.0%} of it; chunk {train.chunk_size} rows)")
    benchmark.extra_info.update(row)
    assert row["speedup_vs_torch"] >= 2.0, f"datainf precondition only x{row['speedup_vs_torch']:.2f} vs torch"


def test_zz_write_summary(env):
    """Runs last (name order): writes the JSON summary."""
    SUMMARY["load_after"] = os.getloadavg()
    SUMMARY["time"] = datetime.datetime.now().isoformat(timespec="seconds")
    path = machine.write_result("cpu", SUMMARY, indent=2)
    print(f"[cpu bench] load before {SUMMARY['load_before']}, after {SUMMARY['load_after']}; summary -> {path}")
    assert SUMMARY["rows"]
