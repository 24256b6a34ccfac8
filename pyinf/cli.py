"""The `pyinf` command (`python -m pyinf ...`).

    pyinf demo    run every method on a seeded synthetic attribution task
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from . import influence
from .methods import METHODS
from .metrics import roc_auc
from .synthetic import planted_classes


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def demo(args: argparse.Namespace) -> int:
    train, query, train_labels, query_labels = planted_classes(n=args.n, m=args.m, seed=args.seed)
    same_class = query_labels[:, None] == train_labels[None, :]
    D = sum(t[0].numel() for t in train.values())
    print(
        f"pyinf demo: {args.n} train x {args.m} queries, {len(train)} blocks, {D} parameters, "
        f"{int(train_labels.max()) + 1} planted classes (seed {args.seed})"
    )
    print("ground truth: a query's helpful training points are those of its own class\n")
    results, scores = {}, {}
    for i, method in enumerate(METHODS, 1):
        print(f"[{i}/{len(METHODS)}] {method} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores[method] = influence(train, query, method=method, damping=args.damping)
        seconds = time.perf_counter() - t0
        # helpful = negative score: rank by −score
        auc = roc_auc(-scores[method], same_class).mean().item()
        notes = [str(w.message) for w in caught]
        results[method] = {"auc": auc, "seconds": seconds, "warnings": notes}
        print(f"{seconds:.3f} s" + "".join(f"\n      warning: {note}" for note in notes))
    for method in METHODS:
        results[method]["pearson_vs_exact"] = _pearson(scores[method], scores["exact"])
    print(f"\n{'method':10s} {'ROC-AUC':>8s} {'r vs exact':>11s} {'time (s)':>9s}")
    for method, r in results.items():
        print(f"{method:10s} {r['auc']:8.3f} {r['pearson_vs_exact']:11.4f} {r['seconds']:9.3f}")
    config = {k: v for k, v in vars(args).items() if k != "func"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"scores": scores, "train_labels": train_labels, "query_labels": query_labels}, out / "demo_scores.pt")
    (out / "demo_report.json").write_text(json.dumps({"config": config, "results": results}, indent=2))
    print(f"\nscores and report saved under {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyinf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="every method on a seeded synthetic attribution task")
    p.add_argument("--n", type=int, default=400, help="training points")
    p.add_argument("--m", type=int, default=20, help="queries")
    p.add_argument("--damping", type=float, default=0.1, help="relative damping c")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="pyinf-out", help="output folder")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, exit code 2
        print(f"pyinf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
