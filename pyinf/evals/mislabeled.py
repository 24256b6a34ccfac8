"""`pyinf eval mislabeled`: find flipped labels, on scikit-learn's digits or on a LoRA-tuned text classifier.

`--task digits` (default): a small MLP (`common.MLP`) is trained on `n_train`
digits of which a fraction `flip` has a wrong label (uniform over the other
nine), with a clean validation set. `--task text`: the LoRA-tuned (r = 8,
classifier head trained) transformer classifier of `pyinf.tasks.text_classes`,
tuned on `n_train` generated sentences of which `flip` have a wrong label
(uniform over the other four classes), with a clean validation set; the
attributed blocks are every LoRA matrix and the head. The training data is
captured once per seed and every method (and damping: "method@damping" rows)
runs from that capture. Two rankings per method, each turned into a detection curve
(fraction of flipped labels found against fraction of the training set
inspected) and its area:

* `aggregated`: DataInf's recipe, the validation-mean influence
  `mean_j score[j, i]` (= the score of the mean validation gradient for
  every method linear in the query gradient), most harmful (largest) first;
* `self`: self-influence −g_iᵀH⁻¹g_i (≤ 0), largest magnitude first.

A random ranking's area is ~0.5; a perfect one is 1 − flip/2. With
several `seeds` (each: new data, flips, model) the report gives mean ± sd
over seeds and the figure the mean curves.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..reports import pyplot, save_figure, save_report
from ..metrics import curve_auc, detection_curve
from ..tasks.text_classes import TextModelConfig
from .common import (EvalConfig, attribute, available_methods, batches, capture, checked_seeds, mean_sd,
                     per_sample_loss, split_digits, sweep, train_cfg_mlp)


@dataclass
class MislabeledConfig(EvalConfig):
    """Options of `pyinf eval mislabeled`: task (digits or text), sizes, flip fraction, seeds, dampings."""

    n_train: int = 1000
    n_val: int = 300
    flip: float = 0.2
    task: str = "digits"  # or "text" (`pyinf.tasks.text_classes`)
    seeds: tuple[int, ...] = ()  # every seed's run, mean ± sd (empty: `seed` alone)
    dampings: tuple[float, ...] = ()  # every damping from one capture, "method@damping" rows (empty: `damping`)
    text_model: TextModelConfig = field(default_factory=TextModelConfig)
    cache: str | None = None  # the text task's model cache (`pyinf.tasks.model.cache_dir`)
    use_cache: bool = True


TASKS = ("digits", "text")
# The orderings the seed papers report for flipped-label detection (their text, not rerun here): DataInf (Kwon
# et al., ICLR 2024; LoRA-tuned RoBERTa-large on GLUE, 20% flipped, validation-mean influence) finds DataInf
# about as good as the exact inverse and above LiSSA and the Hessian-free (TracIn-like) score; HyperINF (Zhou
# et al., 2024) finds HyperINF above DataInf, LiSSA and TracIn.
PAPER_ORDERING = {"DataInf (RoBERTa-large LoRA, GLUE, 20% flipped)": "exact ≈ datainf > lissa, tracin",
                  "HyperINF (LoRA LLMs, mislabeled detection)": "hyperinf > datainf > lissa, tracin"}


def ordering(methods: dict, key: str) -> str:
    """The rows of `methods` (report["methods"]) that have `key`, best first: "a 0.83 > b 0.80 > ..."."""
    rows = sorted((r[key], row) for row, r in methods.items() if key in r)[::-1]
    return " > ".join(f"{row} {v:.3f}" for v, row in rows)


def _digits_setup(cfg: MislabeledConfig, seed: int):
    """(model, training batches, validation batches, flipped (n,) bool, facts, capture/attribute options)."""
    Xtr, ytr, Xva, yva, g = split_digits(replace(cfg, seed=seed), cfg.n_train, cfg.n_val, "val")
    n_flip = int(round(cfg.flip * cfg.n_train))
    flipped = torch.zeros(cfg.n_train, dtype=torch.bool)
    idx = torch.randperm(cfg.n_train, generator=g)[:n_flip]
    flipped[idx] = True
    ytr[idx] = (ytr[idx] + torch.randint(1, 10, (n_flip,), generator=g)) % 10
    model = train_cfg_mlp(replace(cfg, seed=seed), Xtr, ytr)
    with torch.no_grad():
        facts = {"val_accuracy": (model(Xva).argmax(1) == yva).float().mean().item(),
                 "fits_flipped": (model(Xtr[flipped]).argmax(1) == ytr[flipped]).float().mean().item()}
    return model, batches(Xtr, ytr), batches(Xva, yva), flipped, facts, {}


def _text_setup(cfg: MislabeledConfig, seed: int):
    """As `_digits_setup`, on the text task: the pre-trained base, LoRA-tuned on the noisy labels (cached)."""
    from ..tasks import text_classes as tc

    d = tc.noisy_text(seed, cfg.n_train, cfg.n_val, 1, cfg.flip)
    base, _ = tc.pretrained_base(cfg.text_model, seed, cache=cfg.cache, use_cache=cfg.use_cache,
                                 progress=cfg.progress)
    model, info = tc.noisy_classifier(base, cfg.text_model, d.train_texts, d.train_labels, seed, cache=cfg.cache,
                                      use_cache=cfg.use_cache, progress=cfg.progress)
    flipped_texts = [t for t, f in zip(d.train_texts, d.flipped) if f]
    facts = {"val_accuracy": tc.accuracy(model, d.val_texts, d.val_labels),
             "base_val_accuracy": tc.accuracy(base, d.val_texts, d.val_labels),
             "fits_flipped": tc.accuracy(model, flipped_texts, d.train_labels[d.flipped]), "model_cached": info["cached"]}
    tok = tc.TextTokenizer()
    # every trainable LoRA matrix and the SEQ_CLS head (blocks="lora"), the model's own cross-entropy; forward
    # moves the captured blocks
    kw = {"blocks": "lora", "loss": None, "forward_moves": None}
    return model, tok.batches(d.train_texts, d.train_labels), tok.batches(d.val_texts, d.val_labels), d.flipped, \
        facts, kw


def detection(grads, rows, val, flipped: torch.Tensor, *, opts: dict, attribute_kw: dict, progress) -> tuple[dict, dict]:
    """Per row (name, method, damping) of a sweep (`common.sweep`) from one capture `grads`: the detection curves
    of the validation-mean influence (most harmful first) and of |self-influence|, their areas and the fraction
    found after inspecting 20%; returns (results {row: dict}, curves {(row, "aggregated"|"self"): (n + 1,)})."""
    n = len(flipped)
    results, curves, shared = {}, {}, {}
    for i, (row, method, damping) in enumerate(rows, 1):
        if progress is not False:
            print(f"  [{i}/{len(rows)}] {row} ...", flush=True)
        scores, si, info = attribute(grads, method, val, self_influence=True, query_grads=shared,
                                     **{**opts, "damping": damping}, **attribute_kw)
        r = {**info, "method": method, "damping": None if method == "forward" else damping}
        x, f = detection_curve(scores.mean(0), flipped)
        r["aggregated_auc"], curves[(row, "aggregated")] = curve_auc(x, f), f
        r["aggregated_found_at_20pct"] = float(f[int(0.2 * n)])
        if si is not None:
            x, f = detection_curve(si.abs(), flipped)
            r["self_auc"], curves[(row, "self")] = curve_auc(x, f), f
            r["self_found_at_20pct"] = float(f[int(0.2 * n)])
        results[row] = r
    return results, curves


@torch.no_grad()
def _train_losses(model, train_batches, loss) -> torch.Tensor:
    """(n,) per-sample training loss, `loss(model, batch)` (None: the Hugging Face loss); largest first is the
    baseline ranking an influence method should beat."""
    from ..losses import default_loss

    return torch.cat([(loss or default_loss)(model, b) for b in train_batches]).float()


def run_mislabeled(cfg: MislabeledConfig) -> dict:
    """Run the mislabeled-detection eval (module doc) on `cfg.task`, for every seed: per method (and damping) the
    area under the detection curve of aggregate and self influence, with wall times, mean ± sd over the seeds
    (a single seed: its values); returns the report dict (also written as JSON and a PNG)."""
    if not 0 < cfg.flip < 1:
        raise ValueError(f"--flip must be in (0, 1), got {cfg.flip}")
    if cfg.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    t0 = time.perf_counter()
    seeds = checked_seeds(cfg.seeds or [cfg.seed])
    methods, skipped = available_methods(cfg.methods)
    rows = sweep(methods, cfg.dampings or (cfg.damping,))
    n_flip = int(round(cfg.flip * cfg.n_train))
    per_seed, curves, capture_s = [], {}, []
    for s_i, seed in enumerate(seeds):
        model, train_b, val_b, flipped, facts, kw = (_text_setup if cfg.task == "text" else _digits_setup)(cfg, seed)
        if cfg.progress is not False:
            print(f"pyinf eval mislabeled --task {cfg.task}, seed {seed} ({s_i + 1}/{len(seeds)}): {cfg.n_train} train "
                  f"({n_flip} flipped), {cfg.n_val} clean validation; val accuracy {facts['val_accuracy']:.3f}, "
                  f"fits {facts['fits_flipped']:.2f} of the flipped labels", flush=True)
        opts = dict(damping=rows[0][2], lissa_iterations=cfg.lissa_iterations, forward_lr=cfg.forward_lr)
        grads, c_s = capture(model, methods, train_b, progress=cfg.progress, **opts, **kw)
        loss = kw.pop("loss", per_sample_loss)
        kw.pop("blocks", None)  # capture's only
        results, seed_curves = detection(grads, rows, val_b, flipped, opts=opts, attribute_kw=kw,
                                         progress=cfg.progress)
        x, f = detection_curve(_train_losses(model, train_b, loss), flipped)  # the no-influence baseline
        seed_curves[("training loss", "baseline")] = f
        facts["loss_baseline_auc"] = curve_auc(x, f)
        per_seed.append({"seed": seed, **facts, "capture_seconds": c_s, "methods": results})
        capture_s.append(c_s)
        for k, f in seed_curves.items():  # the figure shows the mean curve over seeds
            curves[k] = curves.get(k, 0) + f / len(seeds)
    summary = {}
    for row, method, damping in rows:
        r = {"method": method, "damping": None if method == "forward" else damping}
        for key in ("aggregated_auc", "aggregated_found_at_20pct", "self_auc", "self_found_at_20pct", "seconds"):
            vals = [p["methods"][row][key] for p in per_seed if key in p["methods"][row]]
            if vals:
                r[key], r[key + "_sd"] = mean_sd(vals)
                r[key + "_per_seed"] = vals
        r["warnings"] = list(dict.fromkeys(w for p in per_seed for w in p["methods"][row]["warnings"]))
        r["options"] = per_seed[0]["methods"][row]["options"]
        summary[row] = r
    facts = {k: mean_sd([p[k] for p in per_seed])[0] for k in ("val_accuracy", "fits_flipped")}
    facts["loss_baseline_auc"], facts["loss_baseline_auc_sd"] = mean_sd([p["loss_baseline_auc"] for p in per_seed])
    report = {"config": asdict(cfg), "task": cfg.task, "seeds": seeds, **facts, "n_flipped": n_flip,
              "skipped_methods": skipped, "perfect_auc": 1 - n_flip / (2 * cfg.n_train), "methods": summary,
              "paper_ordering": PAPER_ORDERING,
              "ordering": {m: ordering(summary, f"{m}_auc") for m in ("aggregated", "self")}, "per_seed": per_seed,
              "capture_seconds": mean_sd(capture_s)[0], "seconds": time.perf_counter() - t0}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_report(report, out / "mislabeled_report.json")
    _figure(out / "mislabeled.png", curves, cfg, report)
    return report


def _figure(path, curves, cfg, report):
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    x = torch.arange(cfg.n_train + 1) / cfg.n_train
    seeds = report["seeds"]
    for ax, mode, title in ((axes[0], "aggregated", "validation-mean influence (most harmful first)"),
                            (axes[1], "self", "self-influence (largest |score| first)")):
        for (row, m), f in curves.items():
            if m == mode:
                r = report["methods"][row]
                sd = f" ± {r[mode + '_auc_sd']:.3f}" if len(seeds) > 1 else ""
                ax.plot(x, f, label=f"{row}: AUC {r[mode + '_auc']:.3f}{sd}")
        if ("training loss", "baseline") in curves:
            sd = f" ± {report['loss_baseline_auc_sd']:.3f}" if len(seeds) > 1 else ""
            ax.plot(x, curves[("training loss", "baseline")], color="black", ls="-.", lw=1,
                    label=f"baseline, training loss (largest first): AUC {report['loss_baseline_auc']:.3f}{sd}")
        ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="random: AUC 0.5")
        ax.plot([0, cfg.flip, 1], [0, 1, 1], color="black", ls=":", lw=1,
                label=f"perfect: AUC {report['perfect_auc']:.2f}")
        ax.set_xlabel("fraction of training data inspected")
        ax.set_ylabel("fraction of flipped labels found")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="lower right")
    what = ("digits, MLP" if report["task"] == "digits" else
            "generated 5-topic sentences, LoRA-tuned (r=8, head trained) transformer classifier")
    over = f"mean curves over seeds {','.join(map(str, seeds))} (AUC mean ± sd)" if len(seeds) > 1 else f"seed {seeds[0]}"
    fig.suptitle(f"{what}\n{report['n_flipped']} of {cfg.n_train} training labels flipped; {over}", fontsize=10)
    save_figure(fig, path)


def format_table(report: dict) -> str:
    """The report of `run_mislabeled` as a text table, a method (or method@damping) per line: mean ± sd over seeds."""
    many = len(report["seeds"]) > 1

    def cell(r, key):
        if key not in r:
            return "n/a"
        return f"{r[key]:.3f} ± {r[key + '_sd']:.3f}" if many else f"{r[key]:.3f}"

    w = 15 if many else 9
    lines = [f"task {report['task']}, seeds {','.join(map(str, report['seeds']))}: random AUC 0.5, perfect "
             f"{report['perfect_auc']:.2f}",
             f"{'method':14s} {'agg AUC':>{w}s} {'self AUC':>{w}s} {'time (s)':>9s}"]
    for m, r in report["methods"].items():
        lines.append(f"{m:14s} {cell(r, 'aggregated_auc'):>{w}s} {cell(r, 'self_auc'):>{w}s} {r['seconds']:9.2f}"
                     + ("  (warned)" if r["warnings"] else ""))
    sd = f" ± {report['loss_baseline_auc_sd']:.3f}" if many else ""
    lines.append(f"{'training loss':14s} {report['loss_baseline_auc']:.3f}{sd}  (baseline: largest loss first, no influence)")
    lines.append(f"order, validation influence: {report['ordering']['aggregated']}")
    lines.append(f"order, self-influence:       {report['ordering']['self']}")
    lines += [f"paper, {k}: {v}" for k, v in report["paper_ordering"].items()]
    lines.append(f"one capture for every method {report['capture_seconds']:.2f} s per seed, total {report['seconds']:.1f} s")
    return "\n".join(lines)
