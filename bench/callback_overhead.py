"""Overhead of `pyinf.callback.GradientStoreCallback` on a Trainer epoch of the demo's model (CPU).

    python bench/callback_overhead.py [--rounds 9] [--threads 1] [--batch-size 32] [--store cpu]

The demo's fine-tuned tiny Llama + LoRA (`pyinf.tasks.model.build_model`, from
the cache when present) and its training set (both tasks, 1800 examples,
causal-LM labels as the demo fine-tunes), one epoch of `transformers.Trainer`
(AdamW, batch 32, CPU) from the same weights each time, in five variants:

  * plain:            the epoch alone;
  * callback train:   with the callback, at="train" (read off the Trainer's backward);
  * callback step:    with the callback, at="step" (an extra eval-mode capture per micro-batch);
  * callback end:     with the callback, at="end" (the epoch's batches captured after training);
  * plain + fit:      the epoch, then `Attributor.fit` on the training set (the second pass the
                      callback replaces; method "tracin", whose fit is only the capture).

Each round runs the five in a rotated order (round r starts at variant r mod 5),
so drift on the shared machine spreads over all of them; reported: per variant
the median wall time of `trainer.train()` (the callback's store build
included) and tokens/s (non-pad tokens of the epoch / time), and the overhead
median(variant) / median(plain) - 1, and the median over rounds of the per-round ratio.
One torch thread by default: on a shared 2-core machine two threads made the same
epoch take 2 to 39 s. The demo's LoRA has no dropout, so "train" and "step"
must store the same gradients: their largest normwise relative difference per block
is reported too. JSON under bench/results/callback-overhead-*.json.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, write_result  # noqa: E402

VARIANTS = ("plain", "callback train", "callback step", "callback end", "plain + fit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--store", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    import pyinf
    from pyinf.callback import GradientStoreCallback
    from pyinf.tasks.math_problems import math_problems
    from pyinf.tasks.model import ModelConfig, build_model
    from pyinf.tasks.sentences import sentence_transformations

    hf_logging.set_verbosity_error()
    cfg = ModelConfig()
    tasks = [sentence_transformations(0, 90, 10), math_problems(0, 90, 10)]  # the demo's (its cached model)
    train = [e for t in tasks for e in t.train]
    model, tok, info = build_model(train, cfg, seed=0, data_seed=0, progress=False)
    start = copy.deepcopy(model.state_dict())
    tokens = sum(int(tok.batch([e], cfg.answer_only)["attention_mask"].sum()) for e in train)

    def collate(examples):
        return tok.batch(examples, cfg.answer_only)

    stores = {}

    def run(variant: str, out: str) -> float:
        model.load_state_dict(start)
        model.train()
        cb = None
        if variant.startswith("callback"):
            cb = GradientStoreCallback(store=a.store, at=variant.split()[1], progress=False)
        args = TrainingArguments(out, per_device_train_batch_size=a.batch_size, num_train_epochs=1,
                                 learning_rate=cfg.finetune_lr, report_to=[], use_cpu=True, save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate,
                          callbacks=[cb] if cb else [])
        t0 = time.perf_counter()
        trainer.train()
        if variant == "plain + fit":
            batches = [collate(train[k: k + a.batch_size]) for k in range(0, len(train), a.batch_size)]
            pyinf.Attributor(model, method="tracin", store=a.store, progress=False).fit(batches)
        seconds = time.perf_counter() - t0
        if cb is not None:
            assert cb.store.n == len(train)
            stores[variant] = cb.store
        return seconds

    times = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as out:
        run("plain", out)  # warm-up (allocator, lazy imports), not timed
        for r in range(a.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                times[v].append(run(v, out))
            print(f"round {r}: " + ", ".join(f"{v} {times[v][-1]:.2f} s" for v in VARIANTS), flush=True)
    by_train, by_step = (dict(stores[v].chunks()) for v in ("callback train", "callback step"))
    train_vs_step = max(float((by_train[s][k] - by_step[s][k]).norm() / by_step[s][k].norm())
                        for s in by_step for k in by_step[s])
    print(f"callback train vs step: gradients equal to {train_vs_step:.2e} (largest normwise relative difference)")
    med = {v: statistics.median(t) for v, t in times.items()}
    rows = {v: {"seconds": times[v], "median_s": med[v], "tokens_per_s": tokens / med[v],
                "overhead": med[v] / med["plain"] - 1,
                "overhead_paired": statistics.median(t / p for t, p in zip(times[v], times["plain"])) - 1}
            for v in VARIANTS}
    for v in VARIANTS:
        print(f"{v:>14}: median {med[v]:.2f} s, {tokens / med[v]:,.0f} tokens/s, overhead {rows[v]['overhead']:+.1%} "
              f"(per-round ratio: median {rows[v]['overhead_paired']:+.1%})")
    path = write_result("callback-overhead", {
        "what": "one Trainer epoch of the demo model, with and without pyinf.callback.GradientStoreCallback",
        "command": "python bench/callback_overhead.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "threads": torch.get_num_threads(), "rounds": a.rounds,
        "examples": len(train), "tokens": tokens, "batch_size": a.batch_size, "store": a.store,
        "model": {"config": info.get("config"), "cached": info.get("cached")}, "variants": rows,
        "train_vs_step_max_rel_diff": train_vs_step,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
