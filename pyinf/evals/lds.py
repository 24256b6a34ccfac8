"""`pyinf eval lds`: the linear datamodeling score (Park et al., TRAK, ICML 2023) on digits.

Train the MLP on all `n_train` points, attribute `n_query` test points. Then
retrain it (same seeded init, same steps) on `subsets` random halves S_k of
the training set and record each query's loss. Per query j, the prediction
for subset k is the sum of the subset's scores, `Σ_{i∈S_k} score[j, i]`
(scores estimate d(query loss)/d(weight of i), so a larger sum predicts a
larger loss); the LDS is the Spearman correlation over k of predicted and
actual losses, averaged over queries. `random_subsets` and `lds_per_query` are shared with the LoRA
language-model version (`pyinf eval lds --task lm`, `pyinf.evals.lds_lm`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..reports import pyplot, save_figure, save_report
from ..metrics import spearman
from ..progress import bar
from .common import EvalConfig, attribute, available_methods, batches, capture, split_digits, train_cfg_mlp


@dataclass
class LDSConfig(EvalConfig):
    """Options of `pyinf eval lds` on digits: sizes, retrained subsets (beside EvalConfig's)."""

    n_train: int = 500
    n_query: int = 100
    subsets: int = 100
    fraction: float = 0.5


def random_subsets(n: int, subsets: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(subsets, n) bool masks, each `round(fraction * n)` points drawn without replacement by `generator`."""
    k_in = int(round(fraction * n))
    masks = torch.zeros(subsets, n, dtype=torch.bool)
    for k in range(subsets):
        masks[k, torch.randperm(n, generator=generator)[:k_in]] = True
    return masks


def lds_per_query(masks: torch.Tensor, scores: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """(m,) LDS per query: Spearman over the subsets of the predicted query loss, the sum of the subset's scores
    (masks (subsets, n) bool @ scores (m, n)ᵀ), against the retrained losses `actual` (subsets, m); NaN for a
    query whose prediction or loss is constant."""
    predicted = masks.double() @ scores.double().T  # (subsets, m)
    return spearman(predicted.T, actual.double().T)


def run_lds(cfg: LDSConfig) -> dict:
    """Run the LDS eval (module doc): per method the mean and sd over queries of the Spearman correlation
    between summed subset scores and retrained losses, with wall times; returns the report dict (also
    written as JSON and a PNG under `cfg.out`)."""
    if not 0 < cfg.fraction < 1:
        raise ValueError(f"--fraction must be in (0, 1), got {cfg.fraction}")
    if cfg.subsets < 3:
        raise ValueError(f"--subsets must be >= 3, got {cfg.subsets}")
    t0 = time.perf_counter()
    Xtr, ytr, Xq, yq, g = split_digits(cfg, cfg.n_train, cfg.n_query, "query")
    model = train_cfg_mlp(cfg, Xtr, ytr)
    masks = random_subsets(cfg.n_train, cfg.subsets, cfg.fraction, g)
    k_in = int(masks[0].sum())
    actual = torch.empty(cfg.subsets, cfg.n_query, dtype=torch.float64)
    t1 = time.perf_counter()
    with bar("lds: retrain on subsets", cfg.subsets, cfg.progress, unit="model") as pb:
        for k in range(cfg.subsets):
            mk = train_cfg_mlp(cfg, Xtr[masks[k]], ytr[masks[k]])
            with torch.no_grad():
                actual[k] = F.cross_entropy(mk(Xq), yq, reduction="none").double()
            pb.update()
    retrain_s = time.perf_counter() - t1
    methods, skipped = available_methods(cfg.methods)
    if cfg.progress is not False:
        print(f"pyinf eval lds: {cfg.n_train} train, {cfg.n_query} queries, {cfg.subsets} retrains on "
              f"{k_in}-point subsets ({retrain_s:.1f} s)", flush=True)
    results, per_query, shared = {}, {}, {}
    opts = dict(damping=cfg.damping, lissa_iterations=cfg.lissa_iterations, forward_lr=cfg.forward_lr)
    grads, capture_s = capture(model, methods, batches(Xtr, ytr), progress=cfg.progress, **opts)
    for i, method in enumerate(methods, 1):
        if cfg.progress is not False:
            print(f"  [{i}/{len(methods)}] {method} ...", flush=True)
        scores, _, info = attribute(grads, method, batches(Xq, yq), self_influence=False, query_grads=shared, **opts)
        rho = lds_per_query(masks, scores, actual)
        per_query[method] = rho
        results[method] = {**info, "lds": float(rho.nanmean()), "lds_std": float(rho[~rho.isnan()].std())}
    report = {"config": asdict(cfg), "retrain_seconds": retrain_s, "skipped_methods": skipped, "methods": results,
              "capture_seconds": capture_s, "seconds": time.perf_counter() - t0}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_report(report, out / "lds_report.json")
    _figure(out / "lds.png", per_query, report)
    return report


def _figure(path, per_query, report):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(per_query)
    ax.boxplot([per_query[m][~per_query[m].isnan()].numpy() for m in names], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.axhline(0, color="gray", ls="--", lw=1)
    ax.set_ylabel("Spearman ρ per query (predicted vs actual loss)")
    ax.set_title("linear datamodeling score on digits (mean ▲)")
    save_figure(fig, path)


def format_table(report: dict) -> str:
    """The report of `run_lds` as a text table, a method per line."""
    lines = [f"{'method':10s} {'LDS':>7s} {'±sd':>6s} {'time (s)':>9s}"]
    for m, r in report["methods"].items():
        lines.append(f"{m:10s} {r['lds']:7.3f} {r['lds_std']:6.3f} {r['seconds']:9.2f}" + ("  (warned)" if r["warnings"] else ""))
    lines.append(f"retraining {report['retrain_seconds']:.1f} s, one capture for every method "
                 f"{report['capture_seconds']:.2f} s, total {report['seconds']:.1f} s")
    return "\n".join(lines)
