"""`pyinf eval mislabeled`: find flipped labels on scikit-learn's digits.

A small MLP (`common.MLP`) is trained on `n_train` digits of which a fraction
`flip` has a wrong label (uniform over the other nine), with a clean
validation set. Two rankings per method, each turned into a detection curve
(fraction of flipped labels found against fraction of the training set
inspected) and its area:

* `aggregated`: DataInf's recipe, the validation-mean influence
  `mean_j score[j, i]` (= the score of the mean validation gradient for
  every method linear in the query gradient), most harmful (largest) first;
* `self`: self-influence −g_iᵀH⁻¹g_i (≤ 0), largest magnitude first.

A random ranking's area is ~0.5; a perfect one is 1 − flip/2.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..reports import pyplot, save_figure, save_report
from ..metrics import curve_auc, detection_curve
from .common import EvalConfig, attribute, available_methods, batches, capture, split_digits, train_cfg_mlp


@dataclass
class MislabeledConfig(EvalConfig):
    n_train: int = 1000
    n_val: int = 300
    flip: float = 0.2


def run_mislabeled(cfg: MislabeledConfig) -> dict:
    """Run the mislabeled-detection eval (module doc): per method the area under the detection curve of
    aggregate and self influence, with wall times; returns the report dict (also written as JSON and a PNG)."""
    if not 0 < cfg.flip < 1:
        raise ValueError(f"--flip must be in (0, 1), got {cfg.flip}")
    t0 = time.perf_counter()
    Xtr, ytr, Xva, yva, g = split_digits(cfg, cfg.n_train, cfg.n_val, "val")
    n_flip = int(round(cfg.flip * cfg.n_train))
    flipped = torch.zeros(cfg.n_train, dtype=torch.bool)
    idx = torch.randperm(cfg.n_train, generator=g)[:n_flip]
    flipped[idx] = True
    ytr[idx] = (ytr[idx] + torch.randint(1, 10, (n_flip,), generator=g)) % 10
    model = train_cfg_mlp(cfg, Xtr, ytr)
    with torch.no_grad():
        acc_val = (model(Xva).argmax(1) == yva).float().mean().item()
        fit_flipped = (model(Xtr[flipped]).argmax(1) == ytr[flipped]).float().mean().item()
    methods, skipped = available_methods(cfg.methods)
    if cfg.progress is not False:
        print(f"pyinf eval mislabeled: {cfg.n_train} train ({n_flip} flipped), {cfg.n_val} clean validation; "
              f"MLP val accuracy {acc_val:.3f}, fits {fit_flipped:.2f} of the flipped labels", flush=True)
    results, curves, shared = {}, {}, {}
    opts = dict(damping=cfg.damping, lissa_iterations=cfg.lissa_iterations, forward_lr=cfg.forward_lr)
    grads, capture_s = capture(model, methods, batches(Xtr, ytr), progress=cfg.progress, **opts)
    for i, method in enumerate(methods, 1):
        if cfg.progress is not False:
            print(f"  [{i}/{len(methods)}] {method} ...", flush=True)
        scores, si, info = attribute(grads, method, batches(Xva, yva), self_influence=True, query_grads=shared,
                                     **opts)
        r = {**info}
        x, f = detection_curve(scores.mean(0), flipped)
        r["aggregated_auc"], curves[(method, "aggregated")] = curve_auc(x, f), f
        r["aggregated_found_at_20pct"] = float(f[int(0.2 * cfg.n_train)])
        if si is not None:
            x, f = detection_curve(si.abs(), flipped)
            r["self_auc"], curves[(method, "self")] = curve_auc(x, f), f
            r["self_found_at_20pct"] = float(f[int(0.2 * cfg.n_train)])
        results[method] = r
    report = {"config": asdict(cfg), "val_accuracy": acc_val, "fits_flipped": fit_flipped, "n_flipped": n_flip,
              "skipped_methods": skipped, "perfect_auc": 1 - n_flip / (2 * cfg.n_train), "methods": results,
              "capture_seconds": capture_s, "seconds": time.perf_counter() - t0}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_report(report, out / "mislabeled_report.json")
    _figure(out / "mislabeled.png", curves, cfg, report)
    return report


def _figure(path, curves, cfg, report):
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    x = torch.arange(cfg.n_train + 1) / cfg.n_train
    for ax, mode, title in ((axes[0], "aggregated", "validation influence (most harmful first)"),
                            (axes[1], "self", "self-influence (largest |score| first)")):
        for (method, m), f in curves.items():
            if m == mode:
                ax.plot(x, f, label=f"{method} ({report['methods'][method][mode + '_auc']:.3f})")
        ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="random")
        ax.set_xlabel("fraction of training data inspected")
        ax.set_ylabel("fraction of flipped labels found")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"digits, {report['n_flipped']} of {cfg.n_train} labels flipped")
    save_figure(fig, path)


def format_table(report: dict) -> str:
    """The report of `run_mislabeled` as a text table, a method per line."""
    lines = [f"{'method':10s} {'agg AUC':>8s} {'self AUC':>9s} {'time (s)':>9s}   (random 0.5, perfect {report['perfect_auc']:.2f})"]
    for m, r in report["methods"].items():
        s = f"{r['self_auc']:9.3f}" if "self_auc" in r else f"{'n/a':>9s}"
        lines.append(f"{m:10s} {r['aggregated_auc']:8.3f} {s} {r['seconds']:9.2f}" + ("  (warned)" if r["warnings"] else ""))
    lines.append(f"one capture for every method {report['capture_seconds']:.2f} s, total {report['seconds']:.1f} s")
    return "\n".join(lines)
