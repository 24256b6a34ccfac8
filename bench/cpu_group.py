"""A group of same-shape blocks on the C++ passes: one batched call vs a Python loop over the blocks (issue 13).

    python bench/cpu_group.py [--blocks 16] [--c 20] [--rows 8] [--cols 512] [--m 16] [--rounds 7]

Per-call time of each pass of `pyinf._C` on a group of b blocks of rows × cols
(a 13B-like LoRA group at CPU scale by default: 16 blocks of 8 × 512, chunks of
c = 20 samples, m = 16 queries), fp32 and bf16 gradients, 1 and 2 threads:
  * loop: one C++ call per block on zero-copy numpy views of G[k] (and of the
    other operands' blocks), outputs written in place;
  * batched: one C++ call on the whole group (csrc/passes.cpp: run_group).
G is a view of a bigger chunk (block stride > c·D) in both. The two are
alternated within each round (same machine state); the medians over the
rounds of `reps` calls are printed, with loop / batched.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyinf import _native


def _buf(G: torch.Tensor):
    return G.view(torch.int16).numpy() if G.dtype == torch.bfloat16 else G.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("blocks", 16), ("c", 20), ("rows", 8), ("cols", 512), ("m", 16), ("rounds", 7),
                          ("reps", 100)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    C = _native.load()
    b, c, m, D = a.blocks, a.c, a.m, a.rows * a.cols
    print(f"# b = {b} blocks of {a.rows} x {a.cols} (D = {D}), c = {c}, m = {m}; per call, median of "
          f"{a.rounds} rounds of {a.reps} calls")

    def timed(f):
        t = time.perf_counter()
        for _ in range(a.reps):
            f()
        return (time.perf_counter() - t) / a.reps * 1e6

    for threads in (1, 2):
        C.set_num_threads(threads)
        for dt in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            G = torch.randn(b, c + 4, D, generator=g).to(dt)[:, 2 : 2 + c]
            V, Cc = torch.randn(b, m, D, generator=g), torch.randn(b, m, c, generator=g)
            w, acc, out = torch.rand(b, c, generator=g), torch.zeros(b, m, D), torch.empty(b, m, D)
            s, P = torch.empty(b, c), torch.empty(b, m, c)
            loop = {
                "norms_and_dots": lambda: [C.norms_and_dots(_buf(G[k]), V[k].numpy(), s[k].numpy(), P[k].numpy())
                                           for k in range(b)],
                "dots": lambda: [C.dots(_buf(G[k]), V[k].numpy(), P[k].numpy(), 1.0) for k in range(b)],
                "rank_one_accumulate": lambda: [C.rank_one_accumulate(acc[k].numpy(), _buf(G[k]), V[k].numpy(),
                                                                      w[k].numpy()) for k in range(b)],
                "weighted_sum": lambda: [C.weighted_sum(Cc[k].numpy(), _buf(G[k]), out[k].numpy()) for k in range(b)],
            }
            batched = {
                "norms_and_dots": lambda: C.norms_and_dots(_buf(G), V.numpy(), s.numpy(), P.numpy()),
                "dots": lambda: C.dots(_buf(G), V.numpy(), P.numpy(), 1.0),
                "rank_one_accumulate": lambda: C.rank_one_accumulate(acc.numpy(), _buf(G), V.numpy(), w.numpy()),
                "weighted_sum": lambda: C.weighted_sum(Cc.numpy(), _buf(G), out.numpy()),
            }
            for name in loop:
                lo, ba = [], []
                loop[name]()
                batched[name]()
                for _ in range(a.rounds):
                    lo.append(timed(loop[name]))
                    ba.append(timed(batched[name]))
                lo_m, ba_m = statistics.median(lo), statistics.median(ba)
                print(f"threads={threads} {str(dt).removeprefix('torch.'):9} {name:20} loop {lo_m:8.1f} us  "
                      f"batched {ba_m:8.1f} us  loop/batched {lo_m / ba_m:5.2f}", flush=True)
    C.set_num_threads(0)


if __name__ == "__main__":
    main()
