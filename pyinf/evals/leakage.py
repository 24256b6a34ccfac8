"""`pyinf eval leakage`: find test examples leaked into the training set (Forward-INF's application).

Per seed: the demo's two tasks (sentences, math; `n_train` training and `n_test` test examples per class).
`n_leak` test examples of each task leak: `copies` exact copies of each, and `copies` paraphrased copies,
are planted at seeded random positions of the training set. The paraphrase carries the test example's
answer under reworded prompt words (the information that leaks is the answer):

* sentences: the made-up task name replaced by its plain description, the words the base model was
  pre-trained on (`blorf: red fox eats cake -> cake eats fox red` becomes
  `reverse the word order: red fox eats cake -> cake eats fox red`);
* math: the question moved before the facts (`How many apples now? Tom has 7 apples and buys 5 more. -> 12`).

(Every word of a paraphrase is in the tokenizer's vocabulary; copies > 1 plants identical duplicates.)
The demo's pre-trained base (cached) is LoRA-fine-tuned on that training set (cached), the training set is
captured once, and every method scores the leaked test examples (only those: Forward-INF costs one forward
pass per query x training example). Per leaked test example and method: how many of its exact, and of its
paraphrased, copies are among its `top` most helpful training examples (most negative scores), and the
rank of each copy (0 = most helpful; ties count against the copy). Mean over the leaked examples per seed,
then mean ± sd over the seeds.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..reports import pyplot, save_figure, save_report
from ..tasks.common import Example
from ..tasks.model import log, per_example_loss
from ..tasks.sentences import SENTENCE_CLASSES
from .common import available_methods, mean_sd, pm
from .lm import LMEvalConfig, attribute_all, check_config, demo_tasks, load_base, tune

KINDS = ("exact", "paraphrase")


@dataclass
class LeakageConfig(LMEvalConfig):
    """Options of `pyinf eval leakage`: leaked test examples, copies, seeds, methods, cache."""

    n_train: int = 90  # per class and task: the demo's training set
    n_test: int = 10  # per class and task
    n_leak: int = 10  # leaked test examples per task
    copies: int = 1  # exact copies, and paraphrased copies, planted per leaked example
    top: int = 10


def paraphrase(example: Example, task: str) -> Example:
    """`example` with its prompt reworded and the same answer (module doc); `task` is "sentences" or "math"."""
    if task == "sentences":
        name, sentence = example.prompt.split(": ", 1)
        description = SENTENCE_CLASSES[example.label][1]
        assert SENTENCE_CLASSES[example.label][0] == name, (name, example.label)
        return Example(f"{description}: {sentence}", example.answer, example.label)
    if task == "math":
        facts, question = example.prompt.split(". ", 1)
        return Example(f"{question} {facts}.", example.answer, example.label)
    raise ValueError(f"no paraphrase for task {task!r}: sentences or math")


def leaked_training_set(cfg: LeakageConfig, seed: int):
    """(training examples with the planted copies, the leaked test examples (queries), planted): `planted[q]`
    says where query q's copies are: {"task", "test_index", "query", "paraphrase", "exact": [training indices],
    "paraphrase_at": [training indices]}."""
    tasks = demo_tasks(seed, cfg.n_train, cfg.n_test)
    rng = random.Random(f"leakage-{seed}")
    items = [(e, None, None) for t in tasks for e in t.train]  # (example, query, kind)
    queries, planted = [], []
    for t in tasks:
        if cfg.n_leak > len(t.test):
            raise ValueError(f"--n-leak {cfg.n_leak} > the {len(t.test)} test examples of {t.name}")
        for i in sorted(rng.sample(range(len(t.test)), cfg.n_leak)):
            ex, para = t.test[i], paraphrase(t.test[i], t.name)
            q = len(queries)
            queries.append(ex)
            planted.append({"task": t.name, "test_index": i, "query": ex.text, "paraphrase": para.text})
            items += [(ex, q, "exact")] * cfg.copies + [(para, q, "paraphrase")] * cfg.copies
    rng.shuffle(items)
    for p in planted:
        p["exact"], p["paraphrase_at"] = [], []
    for pos, (_, q, kind) in enumerate(items):
        if q is not None:
            planted[q]["exact" if kind == "exact" else "paraphrase_at"].append(pos)
    return [e for e, _, _ in items], queries, planted


def copy_ranks(scores: torch.Tensor, planted: list[dict]) -> dict[str, torch.Tensor]:
    """{kind: (queries, copies) rank of each planted copy among its query's training examples, by helpfulness}:
    the number of training examples strictly more helpful (more negative score) than the copy, + the number
    tied with it other than itself and its duplicates (ties count against the copy)."""
    helpful = -scores.double()
    out = {}
    for kind, key in (("exact", "exact"), ("paraphrase", "paraphrase_at")):
        rows = []
        for q, p in enumerate(planted):
            idx = torch.tensor(p[key])
            h = helpful[q, idx]  # (copies,)
            better = (helpful[q][None, :] > h[:, None]).sum(1)
            tied = (helpful[q][None, :] == h[:, None]).sum(1) - (helpful[q, idx][None, :] == h[:, None]).sum(1)
            rows.append(better + tied)
        out[kind] = torch.stack(rows)
    return out


def _check(cfg: LeakageConfig) -> None:
    check_config(cfg)
    for name in ("n_train", "n_test", "n_leak", "copies", "top"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.n_leak > 10 * cfg.n_test:  # each task has ten classes
        raise ValueError(f"--n-leak {cfg.n_leak} > the {10 * cfg.n_test} test examples of a task (--n-test per class)")


def run_leakage(cfg: LeakageConfig) -> dict:
    """Run the leakage eval (module doc) over `cfg.seeds`; returns the report (also leakage_report.json and
    leakage.png under `cfg.out`)."""
    _check(cfg)
    t_start = time.perf_counter()
    methods, skipped = available_methods(cfg.methods)
    base, tok, base_info = load_base(cfg)
    runs = {}
    for s, seed in enumerate(cfg.seeds, 1):
        t0 = time.perf_counter()
        train, queries, planted = leaked_training_set(cfg, seed)
        log(f"leakage seed {seed} [{s}/{len(cfg.seeds)}]: {len(train)} training examples, {len(queries)} leaked "
            f"test examples x ({cfg.copies} exact + {cfg.copies} paraphrased) copies", cfg.progress)
        model, info = tune(base, tok, train, cfg, desc=f"LoRA fine-tune (seed {seed})")
        tasks = demo_tasks(seed, cfg.n_train, cfg.n_test)
        leaked = {(p["task"], p["test_index"]) for p in planted}
        clean = [e for t in tasks for i, e in enumerate(t.test) if (t.name, i) not in leaked]
        fit = {"leaked_test_loss": per_example_loss(model, tok, queries, cfg.model.answer_only).mean().item(),
               "clean_test_loss": per_example_loss(model, tok, clean, cfg.model.answer_only).mean().item()}
        log(f"  test loss: leaked {fit['leaked_test_loss']:.3f}, not leaked {fit['clean_test_loss']:.3f}",
            cfg.progress)
        scores, infos, capture_s = attribute_all(model, tok, train, queries, methods, cfg)
        res = {}
        for method in methods:
            ranks = copy_ranks(scores[method], planted)
            r = {"seconds": infos[method]["seconds"], "warnings": infos[method]["warnings"]}
            for kind in KINDS:
                found = (ranks[kind] < cfg.top).sum(1).double()  # copies in the top, per query
                r[f"{kind}_in_top"] = found.mean().item()
                r[f"{kind}_median_rank"] = ranks[kind].double().quantile(0.5).item()  # torch.median: the lower one
                r[f"{kind}_ranks"] = ranks[kind].tolist()
                r[f"{kind}_in_top_by_task"] = {
                    t: found[[q for q, p in enumerate(planted) if p["task"] == t]].mean().item()
                    for t in dict.fromkeys(p["task"] for p in planted)}
            res[method] = r
            log(f"    {method}: in the top {cfg.top}: exact {r['exact_in_top']:.2f} / {cfg.copies}, paraphrased "
                f"{r['paraphrase_in_top']:.2f} / {cfg.copies}; median rank {r['exact_median_rank']:.0f} / "
                f"{r['paraphrase_median_rank']:.0f} ({r['seconds']:.1f} s)", cfg.progress)
        runs[seed] = {"model": info, "fit": fit, "n_train": len(train), "planted": planted,
                      "capture_seconds": capture_s, "methods": res, "seconds": time.perf_counter() - t0}
    summary = {}
    for method in methods:
        summary[method] = {}
        for key in ("exact_in_top", "paraphrase_in_top", "exact_median_rank", "paraphrase_median_rank", "seconds"):
            summary[method][key], summary[method][key + "_sd"] = mean_sd(runs[s]["methods"][method][key]
                                                                         for s in cfg.seeds)
        summary[method]["by_task"] = {
            f"{kind}_{task}": mean_sd(runs[s]["methods"][method][f"{kind}_in_top_by_task"][task] for s in cfg.seeds)
            for kind in KINDS for task in runs[cfg.seeds[0]]["methods"][method][f"{kind}_in_top_by_task"]}
    n = runs[cfg.seeds[0]]["n_train"]
    report = {"config": {**asdict(cfg), "model": asdict(cfg.model)}, "base": base_info, "skipped_methods": skipped,
              "chance_in_top": cfg.copies * cfg.top / n, "n_train": n, "summary": summary,
              "runs": {str(s): r for s, r in runs.items()}, "seconds": time.perf_counter() - t_start}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_report(report, out / "leakage_report.json")
    _figure(out / "leakage.png", report, cfg)
    return report


def _figure(path: Path, report: dict, cfg: LeakageConfig):
    plt = pyplot()
    summ = report["summary"]
    names = list(summ)
    x = torch.arange(len(names)).double()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    for k, (kind, color) in enumerate(zip(KINDS, ("tab:blue", "tab:orange"))):
        means = [summ[m][f"{kind}_in_top"] / cfg.copies for m in names]
        sds = [(summ[m][f"{kind}_in_top_sd"] or 0.0) / cfg.copies for m in names]
        xs = (x - 0.2 + 0.4 * k).tolist()
        ax.bar(xs, means, width=0.4, yerr=sds, capsize=3, color=color, label=f"{kind} copies")
        for xi, m, sd in zip(xs, means, sds):
            ax.text(xi, m + sd + 0.02, f"{m:.2f}", ha="center", fontsize=8)
    ax.axhline(report["chance_in_top"] / cfg.copies, color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks(x.tolist(), names)
    ax.set_ylim(0, 1.35)
    ax.set_ylabel(f"fraction of planted copies in the top {cfg.top}")
    ax.set_title(f"copies found in their test example's top {cfg.top} (mean ± sd over {len(cfg.seeds)} seeds)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax = axes[1]
    for k, (kind, color) in enumerate(zip(KINDS, ("tab:blue", "tab:orange"))):
        ranks = [summ[m][f"{kind}_median_rank"] + 1 for m in names]  # + 1: rank 0 on a log axis
        xs = (x - 0.2 + 0.4 * k).tolist()
        ax.bar(xs, ranks, width=0.4, color=color, label=f"{kind} copies")
        for xi, r in zip(xs, ranks):
            ax.text(xi, r * 1.1, f"{r - 1:.1f}" if r < 11 else f"{r - 1:.0f}", ha="center", fontsize=8)
    ax.axhline(cfg.top, color="gray", ls=":", lw=1, label=f"top {cfg.top}")
    ax.set_yscale("log")
    ax.set_ylim(0.8, 30 * max(summ[m][f"{kind}_median_rank"] + 1 for m in names for kind in KINDS))
    ax.set_xticks(x.tolist(), names)
    ax.set_ylabel(f"median rank + 1 of a copy (of {report['n_train']})")
    ax.set_title("where the copies rank (lower is better; mean over seeds)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.suptitle(f"leakage on the demo's LoRA model: {cfg.n_leak} test examples per task leaked "
                 f"({cfg.copies} exact + {cfg.copies} paraphrased copies each), {report['n_train']} training examples")
    save_figure(fig, path)


def _warned(report: dict, method: str) -> bool:
    return any(run["methods"][method]["warnings"] for run in report["runs"].values())


def format_table(report: dict) -> str:
    """The report of `run_leakage` as a text table, a method per line."""
    cfg = report["config"]
    c, top = cfg["copies"], cfg["top"]
    lines = [f"{'method':10s} {f'exact in top {top}':>18s} {f'paraphr. in top {top}':>22s} {'median rank ex/par':>19s}"
             f" {'time (s)':>9s}   (of {c} copies each; chance {report['chance_in_top']:.3f})"]
    for m, r in report["summary"].items():
        lines.append(f"{m:10s} {pm(r['exact_in_top'], r['exact_in_top_sd']):>18s} "
                     f"{pm(r['paraphrase_in_top'], r['paraphrase_in_top_sd']):>22s} "
                     f"{r['exact_median_rank']:>9.1f} /{r['paraphrase_median_rank']:>7.1f} {r['seconds']:9.2f}"
                     + ("  (warned: see the report)" if _warned(report, m) else ""))
    lines.append(f"\nper task, copies in the top {top} (mean ± sd over seeds):")
    for m, r in report["summary"].items():
        lines.append(f"{m:10s} " + "  ".join(f"{k} {pm(*v)}" for k, v in r["by_task"].items()))
    lines.append(f"seeds {cfg['seeds']}: mean ± sd over seeds of the per-seed mean over {2 * cfg['n_leak']} leaked "
                 f"test examples; {report['n_train']} training examples; total {report['seconds']:.1f} s")
    return "\n".join(lines)
