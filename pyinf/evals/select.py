"""`pyinf eval select`: data selection by influence (HyperINF's application) on a noisy LoRA text task.

The pool is the training set of `pyinf.tasks.text_classes` with a fraction
`flip` (20%) of its labels flipped: the natural pool, because what a good
selection should drop is known (the flipped examples), and it is the model
the mislabeled eval attributes. Per seed:

1. the LoRA classifier tuned on the whole pool (`noisy_classifier`, cached);
   its training gradients captured once; every method (and damping) scores
   the pool against `n_val` clean validation examples, the validation-mean
   influence `mean_j score[j, i]` (DataInf's and HyperINF's recipe);
2. for each k in `keep` (%): the k% most helpful examples (most negative
   score first), and a fresh copy of the LoRA classifier (same pre-trained
   base, same seeded head and adapter init as the full model) tuned on them
   with the same number of examples seen as the full run (epochs scaled by
   100 / k: equal compute, so a small selection is not also under-trained);
   and the same with the k% shared among the (given, noisy) labels in
   proportion to their sizes ("method per class" rows): the global top k%
   can leave a class almost out (on seed 0, tracin's top 20% held 1 example
   labelled with one of the five classes), which costs more accuracy than the
   flips it drops;
3. baselines tuned the same way: a random k% (seeded), the full pool, and
   the clean part of the pool (the oracle that drops exactly the flips).

Reported: validation and test accuracy (the validation set also chose the
selection, so the test accuracy is the unbiased one) and the fraction of
flipped labels in each selection, mean ± sd over the seeds.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..reports import pyplot, save_figure, save_report
from ..tasks.text_classes import TextModelConfig
from .common import EvalConfig, attribute, available_methods, capture, checked_seeds, mean_sd, pm, sweep


@dataclass
class SelectConfig(EvalConfig):
    """Options of `pyinf eval select`: pool, validation and test sizes, flip fraction, kept percentages, seeds."""

    n_train: int = 1000
    n_val: int = 100
    n_test: int = 1000
    flip: float = 0.2
    keep: tuple[float, ...] = (20.0, 50.0)  # percentages of the pool kept
    seeds: tuple[int, ...] = (0, 1, 2)
    dampings: tuple[float, ...] = ()  # every damping from one capture, "method@damping" rows (empty: `damping`)
    forward_lr: float = 1e-3
    text_model: TextModelConfig = field(default_factory=TextModelConfig)
    cache: str | None = None
    use_cache: bool = True


PER_CLASS = " per class"  # the row suffix of the class-balanced selections


def pct(k: float) -> str:
    """A kept percentage as the report's key: 20.0 -> "20"."""
    return f"{k:g}"


def top_fraction(helpfulness: torch.Tensor, percent: float) -> torch.Tensor:
    """Indices (sorted) of the round(percent% · n) largest entries of `helpfulness` (n,); ties: lower index first."""
    if not 0 < percent < 100:
        raise ValueError(f"keep percentages must be in (0, 100), got {percent}")
    k = int(round(percent / 100 * len(helpfulness)))
    if k < 1:
        raise ValueError(f"keeping {percent}% of {len(helpfulness)} examples keeps none")
    order = torch.sort(-helpfulness.double(), stable=True).indices
    return order[:k].sort().values


def top_fraction_per_class(helpfulness: torch.Tensor, labels: torch.Tensor, percent: float) -> torch.Tensor:
    """As `top_fraction`, but the round(percent% · n) kept are shared among the classes of `labels` (n,) in
    proportion to their sizes (largest remainders get the rounding), each class keeping its most helpful."""
    k = len(top_fraction(helpfulness, percent))  # checks percent; the total kept
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * k / len(labels)
    quota = exact.floor().long()
    extra = k - int(quota.sum())
    quota[torch.sort(-(exact - quota), stable=True).indices[:extra]] += 1
    keep = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        members = (labels == c).nonzero().flatten()
        order = torch.sort(-helpfulness[members].double(), stable=True).indices
        keep.append(members[order[:q]])
    return torch.cat(keep).sort().values


def _check(cfg: SelectConfig) -> list[int]:
    if not 0 < cfg.flip < 1:
        raise ValueError(f"--flip must be in (0, 1), got {cfg.flip}")
    if not cfg.keep:
        raise ValueError("--keep needs at least one percentage")
    for k in cfg.keep:
        top_fraction(torch.zeros(cfg.n_train), k)  # raises on a bad percentage or an empty selection
    seeds = checked_seeds(cfg.seeds or [cfg.seed])
    return seeds


def _run_seed(cfg: SelectConfig, seed: int, methods: list[str], rows) -> dict:
    """One seed of the eval (module doc): {"selections": {name: {keep: result}}, facts}."""
    from ..tasks import text_classes as tc

    d = tc.noisy_text(seed, cfg.n_train, cfg.n_val, cfg.n_test, cfg.flip)
    base, _ = tc.pretrained_base(cfg.text_model, seed, cache=cfg.cache, use_cache=cfg.use_cache, progress=cfg.progress)
    model, info = tc.noisy_classifier(base, cfg.text_model, d.train_texts, d.train_labels, seed, cache=cfg.cache,
                                      use_cache=cfg.use_cache, progress=cfg.progress)
    tok = tc.TextTokenizer()

    def tune_and_test(idx: torch.Tensor) -> dict:
        idx = idx.tolist()
        epochs = max(1, round(cfg.text_model.finetune_epochs * cfg.n_train / len(idx)))  # equal examples seen
        m, _ = tc.finetune(base, cfg.text_model, [d.train_texts[i] for i in idx], d.train_labels[idx], seed,
                           epochs=epochs, progress=False)
        return {"n": len(idx), "epochs": epochs, "flipped_fraction": d.flipped[idx].float().mean().item(),
                "val_accuracy": tc.accuracy(m, d.val_texts, d.val_labels),
                "test_accuracy": tc.accuracy(m, d.test_texts, d.test_labels)}

    full = {"n": cfg.n_train, "epochs": cfg.text_model.finetune_epochs, "flipped_fraction": d.flipped.float().mean().item(),
            "val_accuracy": tc.accuracy(model, d.val_texts, d.val_labels),
            "test_accuracy": tc.accuracy(model, d.test_texts, d.test_labels)}
    g = torch.Generator().manual_seed(30_000 + seed)
    out = {"seed": seed, "model_cached": info["cached"], "full": full,
           "clean_only": tune_and_test((~d.flipped).nonzero().flatten()),
           "random": {k: tune_and_test(torch.randperm(cfg.n_train, generator=g)[: round(k / 100 * cfg.n_train)].sort().values)
                      for k in cfg.keep},
           "methods": {}}
    opts = dict(damping=rows[0][2], lissa_iterations=cfg.lissa_iterations, forward_lr=cfg.forward_lr)
    grads, out["capture_seconds"] = capture(model, methods, tok.batches(d.train_texts, d.train_labels),
                                            progress=cfg.progress, blocks="lora", loss=None, forward_moves=None, **opts)
    val = tok.batches(d.val_texts, d.val_labels)
    shared = {}
    for i, (row, method, damping) in enumerate(rows, 1):
        if cfg.progress is not False:
            print(f"  seed {seed} [{i}/{len(rows)}] {row}: score, select, tune {2 * len(cfg.keep)} models ...", flush=True)
        scores, _, info = attribute(grads, method, val, self_influence=False, query_grads=shared, forward_moves=None,
                                    **{**opts, "damping": damping})
        helpful = -scores.mean(0)  # most negative validation-mean score = most helpful
        r = {"method": method, "damping": None if method == "forward" else damping, "seconds": info["seconds"],
             "warnings": info["warnings"]}
        for k in cfg.keep:
            r[k] = tune_and_test(top_fraction(helpful, k))
        out["methods"][row] = r
        # the same scores, the k% shared among the (given) labels: the global top k% can leave a class nearly out
        out["methods"][row + PER_CLASS] = {**r, **{k: tune_and_test(top_fraction_per_class(helpful, d.train_labels, k))
                                                  for k in cfg.keep}}
    return out


def run_select(cfg: SelectConfig) -> dict:
    """Run the data-selection eval (module doc) over `cfg.seeds`; returns the report dict (also written as
    select_report.json and select.png under `cfg.out`): per method (or method@damping) and kept percentage the
    validation and test accuracy and the flipped fraction of the selection, mean ± sd over seeds, beside the
    random, full-pool and clean-only baselines."""
    seeds = _check(cfg)
    t0 = time.perf_counter()
    methods, skipped = available_methods(cfg.methods)
    rows = sweep(methods, cfg.dampings or (cfg.damping,))
    per_seed = []
    for s_i, seed in enumerate(seeds):
        if cfg.progress is not False:
            print(f"pyinf eval select, seed {seed} ({s_i + 1}/{len(seeds)}): pool {cfg.n_train} ({cfg.flip:.0%} "
                  f"flipped), {cfg.n_val} validation, {cfg.n_test} test; keep {', '.join(f'{k:g}%' for k in cfg.keep)}",
                  flush=True)
        per_seed.append(_run_seed(cfg, seed, methods, rows))

    def summarise(results: list[dict]) -> dict:
        s = {}
        for key in ("val_accuracy", "test_accuracy", "flipped_fraction"):
            vals = [r[key] for r in results]
            s[key], s[key + "_sd"] = mean_sd(vals)
            s[key + "_per_seed"] = vals
        s["n"], s["epochs"] = results[0]["n"], results[0]["epochs"]
        return s

    report = {"config": asdict(cfg), "seeds": seeds, "skipped_methods": skipped,
              "pool": "the noisy training set: its flipped labels are what a good selection drops",
              "full": summarise([p["full"] for p in per_seed]),
              "clean_only": summarise([p["clean_only"] for p in per_seed]),
              "random": {pct(k): summarise([p["random"][k] for p in per_seed]) for k in cfg.keep},
              "methods": {}, "per_seed": per_seed}
    for row, method, damping in [(r + suffix, m, d) for r, m, d in rows for suffix in ("", PER_CLASS)]:
        r = {"method": method, "damping": None if method == "forward" else damping, "per_class": row.endswith(PER_CLASS),
             "seconds": mean_sd([p["methods"][row]["seconds"] for p in per_seed])[0],
             "warnings": list(dict.fromkeys(w for p in per_seed for w in p["methods"][row]["warnings"]))}
        for k in cfg.keep:
            r[pct(k)] = summarise([p["methods"][row][k] for p in per_seed])
        report["methods"][row] = r
    report["capture_seconds"] = mean_sd([p["capture_seconds"] for p in per_seed])[0]
    report["seconds"] = time.perf_counter() - t0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_report(report, out / "select_report.json")
    _figure(out / "select.png", cfg, report)
    return report


def _figure(path, cfg: SelectConfig, report: dict):
    plt = pyplot()

    rows = list(report["methods"])
    fig, axes = plt.subplots(1, len(cfg.keep), figsize=(max(6.0, 0.5 * (len(rows) + 3)) * len(cfg.keep), 5.5),
                             squeeze=False)
    for ax, k in zip(axes[0], cfg.keep):
        names = rows + ["random"]
        res = [report["methods"][r][pct(k)] for r in rows] + [report["random"][pct(k)]]
        acc = [r["test_accuracy"] for r in res]
        sd = [r["test_accuracy_sd"] or 0.0 for r in res]  # one seed: no sd
        colors = ["tab:orange" if r.endswith(PER_CLASS) else "tab:blue" for r in rows] + ["tab:gray"]
        ax.bar(range(len(names)), acc, yerr=sd, color=colors, capsize=3)
        lines = [report["full"]["test_accuracy"], report["clean_only"]["test_accuracy"]]
        lo = max(0.0, min([a - e for a, e in zip(acc, sd)] + lines) - 0.05)
        hi = min(1.0, max([a + e for a, e in zip(acc, sd)] + lines) + 0.06)
        for i, r in enumerate(res):  # the numbers, above each bar
            ax.text(i, acc[i] + sd[i] + 0.01 * (hi - lo),
                    f"{r['test_accuracy']:.3f}\nflip {r['flipped_fraction']:.2f}", ha="center", va="bottom", fontsize=6)
        for key, color, label in (("full", "black", "full pool"), ("clean_only", "tab:green", "clean part only")):
            ax.axhline(report[key]["test_accuracy"], color=color, ls="--", lw=1,
                       label=f"{label}: {report[key]['test_accuracy']:.3f}")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(lo, hi)
        ax.set_ylabel("test accuracy after LoRA-tuning on the selection")
        ax.set_title(f"keep the {k:g}% most helpful ({report['random'][pct(k)]['n']} of {cfg.n_train})")
        ax.legend(fontsize=8, loc="best")
    seeds = report["seeds"]
    fig.suptitle(f"data selection on a pool with {cfg.flip:.0%} flipped labels (bars: mean ± sd over seeds "
                 f"{','.join(map(str, seeds))}; 'flip': flipped fraction selected, pool {cfg.flip:.2f}; blue: top k% "
                 f"overall, orange: top k% within each label)", fontsize=10)
    save_figure(fig, path)


def format_table(report: dict) -> str:
    """The report of `run_select` as a text table: test (and validation) accuracy and flipped fraction per row and k."""
    keeps = list(report["random"])

    def cell(r):
        return f"{pm(r['test_accuracy'], r['test_accuracy_sd'], 3)} ({r['flipped_fraction']:.2f})"

    lines = [f"seeds {','.join(map(str, report['seeds']))}: test accuracy mean±sd (flipped fraction of the selection)",
             f"{'selection':24s} " + " ".join(f"{'keep ' + k + '%':>22s}" for k in keeps) + f" {'time (s)':>9s}"]
    for row, r in report["methods"].items():
        lines.append(f"{row:24s} " + " ".join(f"{cell(r[k]):>22s}" for k in keeps) + f" {r['seconds']:9.2f}"
                     + ("  (warned)" if r["warnings"] else ""))
    lines.append(f"{'random':24s} " + " ".join(f"{cell(report['random'][k]):>22s}" for k in keeps))
    lines.append(f"{'full pool':24s} {cell(report['full']):>22s}")
    lines.append(f"{'clean only':24s} {cell(report['clean_only']):>22s}")
    lines.append(f"one capture per seed {report['capture_seconds']:.2f} s, total {report['seconds']:.1f} s")
    return "\n".join(lines)
