"""`pyinf demo`: every method on the embedded tasks, through `pyinf.Attributor`.

For each task (sentence transformations, math word problems): the fine-tuned
tiny model (built or loaded from the cache), the training examples as the
training set, the test examples as queries. Ground truth for a query: the
training examples of its class. Reported per method: mean per-query ROC-AUC
of same-class points against the rest, ranked by helpfulness (most negative
score first), recall of the same-class points among the top k = per-class
size, and wall time (fit + score; the training data of a task is captured
once, `pyinf.capture_gradients`, and every method runs from that capture,
the gradient methods on query gradients captured once too; the capture time
is reported per task). Saves `demo_scores.pt`,
`demo_report.json` and `demo.png` under the output folder.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..reports import pyplot, save_figure, save_report
from ..backends import describe as describe_backend
from ..metrics import recall_at_k, roc_auc
from .math_problems import math_problems
from .model import ModelConfig, build_model, exact_match, per_example_loss
from .sentences import sentence_transformations

ALL_METHODS = ("tracin", "datainf", "exact", "lissa", "hyperinf", "kfac", "ekfac", "forward")


@dataclass
class DemoConfig:
    seed: int = 0
    n_train: int = 90  # per class
    n_test: int = 10  # per class
    methods: tuple[str, ...] = ALL_METHODS
    damping: float = 0.1
    lissa_iterations: int = 100
    forward_lr: float = 1e-3
    forward_queries: int = 3  # per class (forward costs m x n forward passes); 0 = every query
    batch_size: int = 64
    model: ModelConfig = field(default_factory=ModelConfig)
    out: str = "pyinf-out"
    cache: str | None = None
    use_cache: bool = True
    progress: bool | None = None


def _say(msg: str, cfg: DemoConfig):
    if cfg.progress is not False:
        print(msg, flush=True)


def method_available(name: str) -> bool:
    """Whether `pyinf.Attributor` accepts `method=name` (forward lands separately)."""
    from .. import Attributor

    try:
        Attributor(torch.nn.Linear(1, 1), method=name, progress=False)
    except ValueError as e:
        return "unknown method" not in str(e)  # e.g. forward's missing lr: the method exists
    return True


def _options(method: str, cfg: DemoConfig) -> dict:
    if method == "lissa":
        return {"iterations": cfg.lissa_iterations}
    if method == "forward":
        return {"lr": cfg.forward_lr}
    return {}


def query_rows(task, method: str, cfg: DemoConfig) -> list[int]:
    """The test examples used as queries: all, or for forward the first `forward_queries` of each class."""
    if method != "forward" or not cfg.forward_queries or cfg.forward_queries >= cfg.n_test:
        return list(range(len(task.test)))
    return [i for i, e in enumerate(task.test) if i % cfg.n_test < cfg.forward_queries]


def _capture(model, tok, task, methods: list[str], cfg: DemoConfig):
    """The task's training examples captured once for every method (`pyinf.capture_gradients`), and the
    query gradients once for every gradient method (on rank 0, broadcast); (grads, query batches, seconds)."""
    from .. import capture_gradients
    from ..analysis import make_analysis, shared_capture_options

    device = next(model.parameters()).device
    needs = shared_capture_options([make_analysis(m, device, options=_options(m, cfg)) for m in methods])
    answer_only = cfg.model.answer_only
    train = [tok.batch(task.train[k : k + cfg.batch_size], answer_only) for k in range(0, len(task.train), cfg.batch_size)]
    t0 = time.perf_counter()
    grads = capture_gradients(model, train, batch_size=cfg.batch_size, progress=cfg.progress, **needs)
    return grads, time.perf_counter() - t0


def score_in_sweep(att, grads, query, shared: dict) -> torch.Tensor | None:
    """`att.score` for one analysis of a sweep over one capture `grads`: on query gradients captured once for
    the whole sweep (the first analysis that takes them fills `shared`), or on the query data (Forward-INF)."""
    if not att.analysis.takes_query_grads:
        return att.score(query)
    if "V" not in shared:
        shared["V"] = grads.shared_query_grads(query)  # on rank 0, broadcast: the same on every rank
    return att.score(query_grads=shared["V"])


def _run_method(grads, tok, task, method: str, cfg: DemoConfig, query_grads: dict) -> tuple[torch.Tensor, dict]:
    """One method from the shared capture: fit + score (forward: on its query subset; the others: on the
    query gradients, captured by the first of them into `query_grads`)."""
    from .. import Attributor
    from ..distributed import broadcast_from_rank0

    answer_only = cfg.model.answer_only
    rows = query_rows(task, method, cfg)
    test = [task.test[i] for i in rows]
    query = [tok.batch(test[k : k + cfg.batch_size], answer_only) for k in range(0, len(test), cfg.batch_size)]
    kwargs = {"damping": cfg.damping} if method != "forward" else {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        att = Attributor(grads.model, method=method, gradients=grads, **kwargs, **_options(method, cfg))
        scores = broadcast_from_rank0(score_in_sweep(att, grads, query, query_grads)).float().cpu()  # rank 0's
    seconds = time.perf_counter() - t0
    notes = list(dict.fromkeys(str(w.message) for w in caught if "pyinf" in str(w.filename) or "pyinf" in str(w.message)))
    info = att.describe()
    return scores, {"seconds": seconds, "warnings": notes, "options": info, "queries": len(rows),
                    "backend": info["backend"]}


def _figure(path: Path, report: dict, scores: dict, labels: dict):
    plt = pyplot()

    tasks = list(report["tasks"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for r, task in enumerate(tasks):
        res = report["tasks"][task]["methods"]
        names = list(res)
        ax = axes[r, 0]
        ax.bar(names, [res[m]["auc"] for m in names], color="tab:blue")
        ax.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean ROC-AUC")
        ax.set_title(f"{task}: same-class retrieval per method")
        for i, m in enumerate(names):
            ax.text(i, res[m]["auc"] + 0.02, f"{res[m]['auc']:.2f}", ha="center", fontsize=9)
        ax.legend(loc="lower right")
        show = "datainf" if "datainf" in scores[task] else names[0]
        S = -scores[task][show]  # helpfulness; rows and columns are class-major already
        qo = labels[task]["query"].argsort(stable=True)
        to = labels[task]["train"].argsort(stable=True)
        S = S[qo][:, to]
        lim = float(S.abs().quantile(0.99)) or 1.0
        ax = axes[r, 1]
        im = ax.imshow(S.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"{task}: helpfulness (−score) of {show}, sorted by class")
        ax.set_xlabel("training examples")
        ax.set_ylabel("queries")
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.perf_counter()
    tasks = [sentence_transformations(cfg.seed, cfg.n_train, cfg.n_test), math_problems(cfg.seed, cfg.n_train, cfg.n_test)]
    methods = [m for m in cfg.methods if m != "forward" or method_available("forward")]
    skipped = [m for m in cfg.methods if m not in methods]
    _say(f"pyinf demo: {len(tasks)} tasks x 10 classes x ({cfg.n_train} train + {cfg.n_test} test), "
         f"methods {', '.join(methods)}" + (f" (not available yet: {', '.join(skipped)})" if skipped else ""), cfg)
    _say("[1/3] the model: build or load from the cache", cfg)
    model, tok, info = build_model([e for t in tasks for e in t.train], cfg.model, seed=cfg.seed, data_seed=cfg.seed,
                                   cache=cfg.cache, use_cache=cfg.use_cache, progress=cfg.progress)
    t_model = time.perf_counter() - t_start
    report = {"config": {**asdict(cfg), "model": asdict(cfg.model)}, "model": info, "model_seconds": t_model,
              "skipped_methods": skipped, "backend": describe_backend(next(model.parameters()).device), "tasks": {}}
    all_scores, labels = {}, {}
    _say(f"[2/3] attribution ({'loaded' if info['cached'] else 'trained'} the model in {t_model:.1f} s)", cfg)
    for task in tasks:
        tl = torch.tensor([e.label for e in task.train])
        ql = torch.tensor([e.label for e in task.test])
        same = ql[:, None] == tl[None, :]
        fit = {"train_loss": per_example_loss(model, tok, list(task.train), cfg.model.answer_only).mean().item(),
               "test_loss": per_example_loss(model, tok, list(task.test), cfg.model.answer_only).mean().item(),
               "test_exact_match": exact_match(model, tok, list(task.test))}
        _say(f"  {task.name}: train loss {fit['train_loss']:.3f}, test loss {fit['test_loss']:.3f}, "
             f"test exact match {fit['test_exact_match']:.2f}", cfg)
        res, scores, shared = {}, {}, {}
        grads, capture_s = _capture(model, tok, task, methods, cfg)
        _say(f"  {task.name}: captured {grads.n} training gradients once, {capture_s:.1f} s", cfg)
        for i, method in enumerate(methods, 1):
            _say(f"  {task.name} [{i}/{len(methods)}] {method} ...", cfg)
            S, meta = _run_method(grads, tok, task, method, cfg, shared)
            helpful = -S  # most negative score = most helpful
            rows = query_rows(task, method, cfg)
            meta["auc"] = roc_auc(helpful, same[rows]).mean().item()
            meta["recall_at_k"] = recall_at_k(helpful, same[rows], cfg.n_train).mean().item()
            meta["k"] = cfg.n_train
            _say(f"      ROC-AUC {meta['auc']:.3f}, recall@{cfg.n_train} {meta['recall_at_k']:.3f}, "
                 f"{meta['seconds']:.1f} s", cfg)
            for w in meta["warnings"]:
                _say(f"      warning: {w}", cfg)
            res[method], scores[method] = meta, S
        report["tasks"][task.name] = {"fit": fit, "class_names": list(task.class_names), "methods": res,
                                      "capture_seconds": capture_s}
        all_scores[task.name], labels[task.name] = scores, {"train": tl, "query": ql}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report["seconds"] = time.perf_counter() - t_start
    _say("[3/3] saving scores, report and figure", cfg)
    torch.save({"scores": all_scores, "labels": labels}, out / "demo_scores.pt")
    save_report(report, out / "demo_report.json")
    _figure(out / "demo.png", report, all_scores, labels)
    report["seconds"] = time.perf_counter() - t_start
    save_report(report, out / "demo_report.json")
    return report


def format_table(report: dict) -> str:
    lines = []
    for task, tr in report["tasks"].items():
        k = next(iter(tr["methods"].values()))["k"] if tr["methods"] else 0
        lines.append(f"\n{task}  (train loss {tr['fit']['train_loss']:.3f}, test exact match {tr['fit']['test_exact_match']:.2f}; "
                     f"one capture for every method: {tr['capture_seconds']:.2f} s)")
        lines.append(f"{'method':10s} {'ROC-AUC':>8s} {'recall@' + str(k):>10s} {'queries':>8s} {'time (s)':>9s}"
                     f"  {'backend':<8s}")
        for m, r in tr["methods"].items():
            lines.append(f"{m:10s} {r['auc']:8.3f} {r['recall_at_k']:10.3f} {r['queries']:8d} {r['seconds']:9.2f}"
                         f"  {r['backend']:<8s}"
                         + ("  (warned: see the report)" if r["warnings"] else ""))
    lines.append(f"\nbackend: {report['backend']}")
    lines.append(f"total {report['seconds']:.1f} s (model {'loaded from cache' if report['model']['cached'] else 'trained'}"
                 f" in {report['model_seconds']:.1f} s)")
    return "\n".join(lines)
