"""Paired A/B of builds of pyinf._C on the fused DataInf pass (issue 11, item 6).

On a shared machine, two benchmark runs a minute apart differ by 10-20 %; to
compare two builds of the extension (e.g. before and after a change) this
script loads them into ONE process and alternates them within each trial, in
a shuffled order, so that both see the same machine; it reports each build's
median and the median of the per-trial ratios to the first build.

    python bench/cpu_ab.py OLD/_C.cpython-311-x86_64-linux-gnu.so NEW/_C...so \\
        [--threads 1,2] [--trials 8] [--loaded] [--chunk 256] [--json out.json]

A build is a `_C*.so` file (e.g. copied from site-packages after `pip install`
of each commit).  --loaded runs one busy loop per core beside it (started and
stopped here); --chunk N runs the pass in chunks of N rows (many short calls).
The shape is bench/test_bench_cpu_load.py's: bf16 G, n = 4000, 20 blocks of
8 × 1024, m = 8.  Per pass the machine's other load (/proc/stat busy time minus
this process and the busy loops) is recorded; --gate X keeps only trials during
which it stayed below X cores (and waits for such moments, up to --limit s).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import random
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import machine  # noqa: E402
from test_bench_cpu_load import BusyLoops, _machine_busy_seconds, _so_info  # noqa: E402

N, BLOCKS, D, M = 4000, 20, 8192, 8


def load(i, path):
    spec = importlib.util.spec_from_file_location(f"pyinf_ab{i}._C", path)  # distinct names: no caching
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="paths of _C*.so builds; ratios are to the first")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--loaded", action="store_true", help="one busy loop per core beside the passes")
    ap.add_argument("--chunk", type=int, default=0, help="rows per call (0: whole blocks)")
    ap.add_argument("--gate", type=float, default=None, help="keep trials with other load below this many cores")
    ap.add_argument("--limit", type=float, default=900.0, help="seconds to wait for gated trials")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    nts = [int(x) for x in args.threads.split(",")]
    mods = [load(i, p) for i, p in enumerate(args.builds)]
    names = [f"{i}:{pathlib.Path(p).parent.name}" for i, p in enumerate(args.builds)]

    g = torch.Generator().manual_seed(0)
    G = [torch.randn(N, D, generator=g).mul_(1e-2).bfloat16().view(torch.int16).numpy() for _ in range(BLOCKS)]
    V = [torch.randn(M, D, generator=g).mul_(1e-2).numpy() for _ in range(BLOCKS)]
    w = torch.rand(N, generator=g).numpy()
    acc = [np.zeros((M, D), np.float32) for _ in range(BLOCKS)]
    step = args.chunk or N

    def one(C, busy):
        m0, b0, p0, t0 = _machine_busy_seconds(), busy.cpu_seconds(), time.process_time(), time.perf_counter()
        for b in range(BLOCKS):
            for s in range(0, N, step):
                C.rank_one_accumulate(acc[b], G[b][s:s + step], V[b], w[s:s + step])
        t1, p1, b1, m1 = time.perf_counter(), time.process_time(), busy.cpu_seconds(), _machine_busy_seconds()
        return t1 - t0, max(0.0, (m1 - m0) - (p1 - p0) - (b1 - b0)) / (t1 - t0)

    cfgs = [(i, nt) for i in range(len(mods)) for nt in nts]
    res: dict = {c: [] for c in cfgs}
    others = []
    t_start, tried = time.monotonic(), 0
    with BusyLoops((os.cpu_count() or 1) if args.loaded else 0) as busy:
        for i, nt in cfgs:  # warm-up
            mods[i].set_num_threads(nt)
            one(mods[i], busy)
        while len(res[cfgs[0]]) < args.trials and (args.gate is None or time.monotonic() - t_start < args.limit):
            tried += 1
            random.shuffle(cfgs)
            trial, worst = {}, 0.0
            for i, nt in cfgs:
                mods[i].set_num_threads(nt)
                trial[(i, nt)], other = one(mods[i], busy)
                worst = max(worst, other)
                if args.gate is not None and other > args.gate:
                    break
            if args.gate is not None and worst > args.gate:
                time.sleep(1.0)
                continue
            for k, t in trial.items():
                res[k].append(t)
            others.append(worst)
    out = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine.machine_info(),
           "cpu_count": os.cpu_count(), "git_commit": machine.git_commit(),
           "builds": [_so_info(m) for m in mods], "threads": nts, "gate_cores": args.gate,
           "loaded": args.loaded, "chunk": args.chunk, "trials": len(res[cfgs[0]]), "tried": tried,
           "other_load_cores_max_per_trial": others, "loadavg": os.getloadavg(), "results": {}}
    print(f"[ab] {'loaded' if args.loaded else 'quiet'}, chunk {args.chunk or 'block'}: {out['trials']} trials"
          f" (of {tried}), other load per trial max {max(others, default=0):.2f} cores, load {os.getloadavg()}")
    for nt in nts:
        base = res[(0, nt)]
        for i in range(len(mods)):
            ts = res[(i, nt)]
            if not ts:
                continue
            r = [a / b for a, b in zip(ts, base)]
            out["results"][f"{names[i]} t{nt}"] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                                                   "ratio_to_first_median": statistics.median(r),
                                                   "ratio_min": min(r), "ratio_max": max(r)}
            print(f"[ab] t{nt} {names[i]:24s} median {statistics.median(ts) * 1e3:8.1f} ms  min {min(ts) * 1e3:8.1f}"
                  f"  ratio to first {statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
