"""`pyinf eval lds --task lm`: the linear datamodeling score on the demo's LoRA language model.

Per seed: a training set of `n_train` examples per class of the demo's two tasks (sentences, math: 20 x 10 x 2
= 400 by default, a subset of the demo's 1,800 so that the retrains fit the time budget) and `n_query` test
examples per class as queries. The demo's pre-trained base (cached) is LoRA-fine-tuned on the whole training
set (`finetune`: the same seeded adapter init for every fine-tune, `finetune_epochs` epochs) and every method
attributes the queries from one capture. Then `subsets` fine-tunes of the same base with the same adapter init
on random halves S_k of the training set (each cached on disk: an interrupted run resumes from the fine-tunes
already cached) give each query's actual loss; per query, the LDS is the Spearman correlation over k of the
sum of the subset's scores and that loss (`lds.lds_per_query`). Reported per method: the mean over queries
per seed, then mean ± sd over the seeds (and the sd over every seed's queries).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..progress import bar
from ..reports import pyplot, save_figure, save_report
from ..tasks.model import ModelConfig, log, per_example_loss
from .common import available_methods, mean_sd, pm
from .lds import lds_per_query, random_subsets
from .lm import LMEvalConfig, attribute_all, check_config, demo_tasks, load_base, tune


@dataclass
class LMLDSConfig(LMEvalConfig):
    """Options of `pyinf eval lds --task lm`: sizes, fine-tunes on random subsets, seeds, methods, cache."""

    n_train: int = 20  # per class and task
    n_query: int = 2  # per class and task
    subsets: int = 50
    fraction: float = 0.5
    # the demo's model and base; 4 epochs: a half (200 examples) still takes 28 steps past the 20-step warm-up
    model: ModelConfig = field(default_factory=lambda: ModelConfig(finetune_epochs=4))


def _check(cfg: LMLDSConfig) -> None:
    check_config(cfg)
    if not 0 < cfg.fraction < 1:
        raise ValueError(f"--fraction must be in (0, 1), got {cfg.fraction}")
    if cfg.subsets < 3:
        raise ValueError(f"--subsets must be >= 3, got {cfg.subsets}")
    if cfg.n_train < 1 or cfg.n_query < 1:
        raise ValueError(f"--n-train and --n-query must be >= 1, got {cfg.n_train} and {cfg.n_query}")
    if round(cfg.fraction * cfg.n_train * 20) < 1:
        raise ValueError(f"--fraction {cfg.fraction} of {cfg.n_train * 20} training examples is empty")


def retrained_losses(base, tok, train, queries, masks, cfg: LMLDSConfig, seed: int) -> tuple[torch.Tensor, dict]:
    """((subsets, m) float64 query losses of the fine-tunes on each subset, {"trained", "cached", "seconds"}):
    one cached `finetune` per mask row (a resumed run loads the ones already on disk)."""
    actual = torch.empty(len(masks), len(queries), dtype=torch.float64)
    counts = {"trained": 0, "cached": 0}
    t0 = time.perf_counter()
    with bar(f"lds lm seed {seed}: fine-tunes on subsets", len(masks), cfg.progress, unit="model") as pb:
        for k, mask in enumerate(masks):
            subset = [train[i] for i in mask.nonzero().flatten().tolist()]
            model, info = tune(base, tok, subset, cfg, progress=False)
            counts["cached" if info["cached"] else "trained"] += 1
            actual[k] = per_example_loss(model, tok, queries, cfg.model.answer_only).double()
            pb.update()
    return actual, {**counts, "seconds": time.perf_counter() - t0}


def run_lds_lm(cfg: LMLDSConfig) -> dict:
    """Run the LM LDS eval (module doc) over `cfg.seeds`; returns the report (also lds_lm_report.json and
    lds_lm.png under `cfg.out`)."""
    _check(cfg)
    t_start = time.perf_counter()
    methods, skipped = available_methods(cfg.methods)
    base, tok, base_info = load_base(cfg)
    runs, per_query = {}, {m: [] for m in methods}
    for s, seed in enumerate(cfg.seeds, 1):
        t0 = time.perf_counter()
        tasks = demo_tasks(seed, cfg.n_train, cfg.n_query)
        train = [e for t in tasks for e in t.train]
        queries = [e for t in tasks for e in t.test]
        masks = random_subsets(len(train), cfg.subsets, cfg.fraction, torch.Generator().manual_seed(seed))
        log(f"lds lm seed {seed} [{s}/{len(cfg.seeds)}]: {len(train)} training examples, {len(queries)} queries, "
            f"{cfg.subsets} fine-tunes on {int(masks[0].sum())}-example subsets", cfg.progress)
        model, info = tune(base, tok, train, cfg, desc=f"LoRA fine-tune (seed {seed})")
        actual, retrain = retrained_losses(base, tok, train, queries, masks, cfg, seed)
        log(f"  fine-tunes on subsets: {retrain['trained']} trained, {retrain['cached']} from the cache, "
            f"{retrain['seconds']:.1f} s", cfg.progress)
        scores, infos, capture_s = attribute_all(model, tok, train, queries, methods, cfg)
        res = {}
        for method in methods:
            rho = lds_per_query(masks, scores[method], actual)
            ok = rho[~rho.isnan()]
            if not len(ok):  # a Spearman of constants: nothing to average, say so instead of reporting NaN
                raise ValueError(f"eval lds --task lm: {method} has no query with a defined LDS on seed {seed} "
                                 f"(its scores or every retrained loss are constant); use more --subsets or queries")
            per_query[method] += ok.tolist()
            lds, sd = mean_sd(ok.tolist())
            res[method] = {"lds": lds, "lds_sd_queries": sd, "nan_queries": int(rho.isnan().sum()),
                           "per_query": rho.tolist(), "seconds": infos[method]["seconds"],
                           "warnings": infos[method]["warnings"]}
            log(f"    {method}: LDS {pm(lds, sd, 3)} over queries", cfg.progress)
        fit = {"train_loss": per_example_loss(model, tok, train, cfg.model.answer_only).mean().item(),
               "query_loss": per_example_loss(model, tok, queries, cfg.model.answer_only).mean().item(),
               "retrained_query_loss_mean": actual.mean().item(),
               "retrained_query_loss_sd_over_subsets": actual.std(0).mean().item()}
        runs[seed] = {"model": info, "fit": fit, "retrain": retrain, "capture_seconds": capture_s, "methods": res,
                      "n_train": len(train), "n_query": len(queries), "seconds": time.perf_counter() - t0}
    summary = {}
    for method in methods:
        lds, lds_sd = mean_sd(runs[s]["methods"][method]["lds"] for s in cfg.seeds)
        summary[method] = {"lds": lds, "lds_sd_seeds": lds_sd, "lds_sd_queries": mean_sd(per_query[method])[1],
                           "seconds": mean_sd(runs[s]["methods"][method]["seconds"] for s in cfg.seeds)[0]}
    report = {"config": {**asdict(cfg), "model": asdict(cfg.model)}, "task": "lm", "base": base_info,
              "skipped_methods": skipped, "summary": summary, "runs": {str(s): r for s, r in runs.items()},
              "seconds": time.perf_counter() - t_start}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_report(report, out / "lds_lm_report.json")
    _figure(out / "lds_lm.png", per_query, report, cfg)
    return report


def _figure(path: Path, per_query: dict, report: dict, cfg: LMLDSConfig):
    plt = pyplot()
    names = list(per_query)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(names) + 2), 4.8))
    ax.boxplot([per_query[m] for m in names], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.axhline(0, color="gray", ls="--", lw=1)
    for i, m in enumerate(names, 1):
        r = report["summary"][m]
        ax.text(i, 1.04, pm(r["lds"], r["lds_sd_seeds"]), ha="center", fontsize=8)
    ax.set_ylim(-1, 1.15)
    ax.set_ylabel("Spearman ρ per query (summed scores vs retrained loss)")
    run = next(iter(report["runs"].values()))
    ax.set_title(f"LDS on the demo's LoRA LM: {cfg.subsets} fine-tunes on halves of {run['n_train']} examples, "
                 f"{run['n_query']} queries x {len(cfg.seeds)} seeds\n(box: every query of every seed, ▲ mean; "
                 f"text: mean ± sd over seeds)", fontsize=10)
    save_figure(fig, path)


def format_table(report: dict) -> str:
    """The report of `run_lds_lm` as a text table, a method per line."""
    cfg = report["config"]
    lines = [f"{'method':10s} {'LDS (seeds)':>14s} {'sd (queries)':>13s} {'time (s)':>9s}"]
    for m, r in report["summary"].items():
        warned = any(run["methods"][m]["warnings"] for run in report["runs"].values())
        lines.append(f"{m:10s} {pm(r['lds'], r['lds_sd_seeds'], 3):>14s} {'–' if r['lds_sd_queries'] is None else format(r['lds_sd_queries'], '.3f'):>13s} "
                     f"{r['seconds']:9.2f}" + ("  (warned: see the report)" if warned else ""))
    retrain = [r["retrain"] for r in report["runs"].values()]
    lines.append(f"seeds {cfg['seeds']}: mean ± sd over seeds of the mean over queries; fine-tunes on subsets: "
                 f"{sum(r['trained'] for r in retrain)} trained, {sum(r['cached'] for r in retrain)} from the cache "
                 f"({sum(r['seconds'] for r in retrain):.1f} s); total {report['seconds']:.1f} s")
    return "\n".join(lines)
