"""pyinf.compat.IFEngineGeneration vs the DataInf research recipe (Python loops), on CPU.

500 train x 20 queries x 20 blocks of 8 x 256 (LoRA-A shaped, 41k parameters).
Timed: preprocess_gradients + compute_hvps + compute_IF, from the nested dicts.
The loop recipe is timed over 2 rounds (it takes ~10 s), pyinf.compat over 10 (the
pytest-benchmark statistics). Asserts that both give the same numbers and that
pyinf.compat is >= 100x faster, best round against best round (the least noisy
comparison on a shared machine; the median/median ratio is printed and stored too).

    pytest bench/test_bench_compat.py --benchmark-json bench/results/compat_cpu.json
"""
from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
import pytest
import torch

from pyinf.compat import IFEngineGeneration

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from datainf_loops import LoopIFEngineGeneration  # noqa: E402

pytest.importorskip("pandas")

N_TRAIN, N_QUERY, N_BLOCKS, ROWS, COLS = 500, 20, 20, 8, 256
MIN_SPEEDUP = 100.0
LOOP_ROUNDS = 2  # ~10 s each
ROUNDS = 10


def _nested(n: int, gen: torch.Generator) -> dict[int, dict[str, torch.Tensor]]:
    names = [f"layers.{b // 2}.{'q' if b % 2 == 0 else 'v'}_proj.lora_A" for b in range(N_BLOCKS)]
    return {i: {w: 0.01 * torch.randn(ROWS, COLS, generator=gen) for w in names} for i in range(n)}


def _run(cls, tr, val):
    eng = cls()
    eng.preprocess_gradients(tr, val)
    eng.compute_hvps(lambda_const_param=10)
    eng.compute_IF()
    return eng


def test_bench_compat_generation_vs_loops(benchmark, capsys):
    gen = torch.Generator().manual_seed(0)
    tr, val = _nested(N_TRAIN, gen), _nested(N_QUERY, gen)

    ours = benchmark.pedantic(_run, args=(IFEngineGeneration, tr, val), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        ours_min, ours_median = benchmark.stats.stats.min, benchmark.stats.stats.median
    else:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            _run(IFEngineGeneration, tr, val)
            times.append(time.perf_counter() - start)
        ours_min, ours_median = min(times), float(np.median(times))

    # The loop recipe second: pyinf.compat is timed in a fresh process, as a user would run it.
    loop_times = []
    for _ in range(LOOP_ROUNDS):
        start = time.perf_counter()
        ref = _run(LoopIFEngineGeneration, tr, val)
        loop_times.append(time.perf_counter() - start)

    for key in ("identity", "proposed"):
        got, exp = ours.IF_dict[key], ref.IF_dict[key]
        assert got.shape == (N_QUERY, N_TRAIN)
        assert list(got.index) == list(exp.index) and list(got.columns) == list(exp.columns)
        err = np.linalg.norm(got.to_numpy() - exp.to_numpy()) / np.linalg.norm(exp.to_numpy())
        assert err < 1e-4, (key, err)

    loop_s = min(loop_times)
    speedup = loop_s / ours_min  # best of each: the least noisy comparison on a shared machine
    speedup_median = float(np.median(loop_times)) / ours_median
    benchmark.extra_info.update(
        {
            "loop_seconds": loop_times,
            "compat_seconds_min": ours_min,
            "compat_seconds_median": ours_median,
            "speedup_min_over_min": speedup,
            "speedup_median_over_median": speedup_median,
            "torch_threads": torch.get_num_threads(),
        }
    )
    with capsys.disabled():
        print(
            f"\nIFEngineGeneration {N_TRAIN} train x {N_QUERY} queries x {N_BLOCKS} blocks of {ROWS}x{COLS}: "
            f"loops {loop_s:.2f} s (best of {LOOP_ROUNDS}), pyinf.compat {ours_min * 1e3:.1f} ms "
            f"(best of {ROUNDS}; median {ours_median * 1e3:.1f} ms): speedup {speedup:.0f}x "
            f"(median/median {speedup_median:.0f}x)"
        )
    assert speedup >= MIN_SPEEDUP, f"speedup {speedup:.1f}x < {MIN_SPEEDUP:.0f}x"
