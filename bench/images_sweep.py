"""What drives the images demo's numbers: ROC-AUC against K (denoising draws), the damping and the timestep window.

On the demo's LoRA-tuned UNet of each seed (`pyinf demo --task images`, built once, then cached), the
training set is captured once per (K, window), and every method of the sweep runs from that capture
(`pyinf.tasks.demo`'s own capture and method runner, so the numbers are the demo's):

* K in --draws (default 1, 2, 4) at the demo's window;
* the damping in --dampings (default 0.01, 0.1, 1) at the demo's K and window;
* the timestep window in --windows (default all, [500, 1000), [900, 1000)) at the demo's K.

The wall time of each step (model build, each capture, each method) is recorded beside its AUC, with the
machine's load average. Not a test dependency.

    python bench/images_sweep.py [--seeds 0,1]   -> bench/results/images-sweep-*.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from machine import machine_info, write_result


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in w.split("-")) for w in text.split(",")]


def main() -> None:
    from pyinf.tasks.demo import DemoConfig, capture_task, run_method
    from pyinf.tasks.images import influence_losses
    from pyinf.tasks.images_demo import image_task
    from pyinf import Task
    from pyinf.metrics import roc_auc

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--draws", default="1,2,4")
    ap.add_argument("--dampings", default="0.01,0.1,1")
    ap.add_argument("--windows", default="0-1000,500-1000,900-1000", help="low-high,... timestep windows")
    ap.add_argument("--methods", default="tracin,datainf,kfac,ekfac", help="for the K and window sweeps")
    ap.add_argument("--damping-methods", default="datainf,hyperinf,kfac,ekfac")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    methods, dmethods = args.methods.split(","), args.damping_methods.split(",")
    result = {"machine": machine_info(), "args": vars(args), "seeds": {}}

    def step(task, K, window, ms, damping, cfg, rows, what):
        """One capture at (K, window), then methods `ms` at `damping`: rows of the result."""
        tl, meas = influence_losses(cfg.images, K, window)
        t = dataclasses.replace(task, task=Task(train_loss=tl, measurement=meas))
        grads, cap_s = capture_task(t, ms, dataclasses.replace(cfg, damping=damping))
        same = t.query_labels[:, None] == t.train_labels[None, :]
        shared = {}
        for d in ([damping] if what != "damping" else [float(x) for x in args.dampings.split(",")]):
            for m in ms:
                S, meta = run_method(grads, t, m, dataclasses.replace(cfg, damping=d), shared)
                row = {"sweep": what, "K": K, "window": list(window), "damping": d, "method": m,
                       "auc": roc_auc(-S, same).mean().item(), "capture_seconds": cap_s,
                       "method_seconds": meta["seconds"], "load": os.getloadavg()[0]}
                rows.append(row)
                print(f"  {what:8s} K={K} window={window} damping={d:<5} {m:9s} AUC {row['auc']:.3f} "
                      f"(capture {cap_s:.1f} s, method {meta['seconds']:.1f} s, load {row['load']:.1f})", flush=True)

    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = DemoConfig(seed=seed, progress=False, tasks=("images",))
        t0 = time.perf_counter()
        task, info = image_task(cfg)
        build_s = time.perf_counter() - t0
        print(f"seed {seed}: UNet {'loaded' if info['cached'] else 'trained'} in {build_s:.1f} s; fit {task.fit}",
              flush=True)
        rows: list[dict] = []
        K0, w0 = cfg.images.draws, tuple(cfg.images.timesteps)
        for K in [int(k) for k in args.draws.split(",")]:
            step(task, K, w0, methods, cfg.damping, cfg, rows, "draws")
        step(task, K0, w0, dmethods, cfg.damping, cfg, rows, "damping")
        for w in _pairs(args.windows):
            step(task, K0, w, methods, cfg.damping, cfg, rows, "window")
        result["seeds"][seed] = {"build_seconds": build_s, "model": info, "fit": task.fit, "rows": rows}
        path = write_result("images-sweep", result, args.out)  # after every seed: partial results survive
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
