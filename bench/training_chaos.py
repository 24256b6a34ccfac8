"""Why the demo's model, and every attribution figure on it, differ between machines.

The demo's base model is trained from seeded code, but a CPU's kernels (MKL
and ATen's vectorised paths: AVX-512 on one machine, AVX2 on another) sum in
different orders, and the training dynamics amplify those last-bit
differences. This script measures it on one machine by forcing two of ATen's
kernel paths (`ATEN_CPU_CAPABILITY=default` and `avx2`): the demo's
pre-training (its own `train`: optimiser, schedule, clipping) over `--steps`
batches (same seed, same data, 1 thread), in float32
and in float64, then the relative weight difference ‖θ_a − θ_b‖ / ‖θ_a‖
between the two paths. A difference that float64 does not shrink is chaos in
the training, not rounding that more precision would remove.

    python bench/training_chaos.py [--steps 300]   -> bench/results/training-chaos-*.json
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from machine import machine_info, write_result

PATHS = ("default", "avx2")


def pretrain_steps(dtype: str, steps: int, out: str) -> None:
    """The demo's pre-training (`pyinf.tasks.model.train`: config, data, optimiser, schedule) for one epoch
    over the first `steps` batches of its texts; weights to `out`."""
    from pyinf.tasks.model import ModelConfig, WordTokenizer, llama, shuffled_batches, train, pretrain_texts

    torch.set_num_threads(1)
    cfg, tok = ModelConfig(), WordTokenizer()
    torch.manual_seed(0)
    model = llama(cfg, tok.vocab_size).to(getattr(torch, dtype))
    texts = pretrain_texts(cfg.pretrain_texts, 0)[: steps * cfg.batch_size]
    loss = train(model, shuffled_batches(texts, cfg.batch_size, tok.text_batch), 1, cfg.pretrain_lr,
                  "pre-train", False, 0)
    torch.save({"loss": loss, "weights": {n: p.detach().double() for n, p in model.named_parameters()}}, out)


def relative_difference(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).square().sum()) for k in a)
    return (num / sum(float(a[k].square().sum()) for k in a)) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train", nargs=3, metavar=("DTYPE", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train:
        return pretrain_steps(args.train[0], int(args.train[1]), args.train[2])
    result = {"steps": args.steps, "paths": PATHS, "machine": machine_info(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for dtype in ("float32", "float64"):
            for path in PATHS:
                out = os.path.join(tmp, f"{dtype}-{path}.pt")
                t0 = time.perf_counter()
                env = {**os.environ, "ATEN_CPU_CAPABILITY": path, "OMP_NUM_THREADS": "1"}
                subprocess.run([sys.executable, __file__, "--train", dtype, str(args.steps), out], env=env, check=True)
                runs[dtype, path] = torch.load(out)
                result["runs"][f"{dtype}/{path}"] = {"loss": runs[dtype, path]["loss"],
                                                     "seconds": time.perf_counter() - t0}
        for dtype in ("float32", "float64"):
            d = relative_difference(runs[dtype, PATHS[0]]["weights"], runs[dtype, PATHS[1]]["weights"])
            result[f"relative_weight_difference_{dtype}"] = d
            print(f"{dtype}: ‖θ_{PATHS[0]} − θ_{PATHS[1]}‖/‖θ‖ after {args.steps} steps = {d:.3g}")
    print("written to", write_result("training-chaos", result))


if __name__ == "__main__":
    main()
