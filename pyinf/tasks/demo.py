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

Every task runs through one loop as a `DemoTask` (a model, its training data
and queries as batches, the ground truth, the loss and measurement): the LM
tasks ("sentences", "math") share one model; "images" (`--task images`,
`pyinf.tasks.images_demo`) is a LoRA-tuned diffusion UNet, its queries
held-out images of a style, and also writes `images_grid.png`. A method that
fails on a task is reported (its error in the report and the table), not fatal.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..reports import pyplot, save_figure, save_report
from ..backends import describe as describe_backend
from ..distributed import batch_size_for_ranks
from ..metrics import recall_at_k, roc_auc
from .common import shown_method
from .math_problems import math_problems
from .model import ModelConfig, build_model, exact_match, per_example_loss
from .sentences import sentence_transformations

ALL_METHODS = ("tracin", "datainf", "exact", "lissa", "hyperinf", "kfac", "ekfac", "forward")
ALL_TASKS = ("sentences", "math", "images")
LM_TASKS = ("sentences", "math")


def _image_model_config():
    from .images import ImageModelConfig

    return ImageModelConfig()


@dataclass
class DemoConfig:
    """Options of `pyinf demo`: tasks, sizes, methods and their settings, model configs, output and cache."""

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
    tasks: tuple[str, ...] = LM_TASKS  # of ALL_TASKS
    image_n_train: int = 30  # per style
    image_n_test: int = 5  # per style
    images: Any = field(default_factory=_image_model_config)  # pyinf.tasks.images.ImageModelConfig
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


@dataclass
class DemoTask:
    """One task of the demo, whatever its model: what the loop of `run_demo` needs.

    train_batches: the training set as batches (what `capture_gradients` takes), n samples in all;
    query_batches(rows): the test examples `rows` (a list of indices) as batches;
    train_labels (n,), query_labels (m,): the classes (ground truth: same class = relevant);
    n_train, n_test: per class (k of recall@k; the forward query subset);
    task: the `pyinf.Task` (None: the Hugging Face LM losses); fit: what the model's fit reports;
    finish(out folder, {method: scores (m, n)}) -> names of the extra files it wrote (or None).
    """

    name: str
    class_names: tuple[str, ...]
    model: torch.nn.Module
    train_batches: list
    query_batches: Callable[[list[int]], list]
    train_labels: torch.Tensor
    query_labels: torch.Tensor
    n_train: int
    n_test: int
    task: Any = None
    fit: dict = field(default_factory=dict)
    finish: Callable[[Path, dict], list[str]] | None = None


def query_rows(task: DemoTask, method: str, cfg: DemoConfig) -> list[int]:
    """The test examples used as queries: all, or for forward the first `forward_queries` of each class."""
    m = len(task.query_labels)
    if method != "forward" or not cfg.forward_queries or cfg.forward_queries >= task.n_test:
        return list(range(m))
    return [i for i in range(m) if i % task.n_test < cfg.forward_queries]


def capture_task(task: DemoTask, methods: list[str], cfg: DemoConfig):
    """The task's training examples captured once for every method (`pyinf.capture_gradients`); (grads, seconds)."""
    from .. import capture_gradients
    from ..analysis import make_analysis, shared_capture_options

    device = next(task.model.parameters()).device
    needs = shared_capture_options([make_analysis(m, device, options=_options(m, cfg)) for m in methods])
    t0 = time.perf_counter()
    grads = capture_gradients(task.model, task.train_batches, task=task.task, batch_size=cfg.batch_size,
                              progress=cfg.progress, **needs)
    return grads, time.perf_counter() - t0


def score_in_sweep(att, grads, query, shared: dict) -> torch.Tensor | None:
    """`att.score` for one analysis of a sweep over one capture `grads`: on query gradients captured once for
    the whole sweep (the first analysis that takes them fills `shared`), or on the query data (Forward-INF)."""
    if not att.analysis.takes_query_grads:
        return att.score(query)
    if "V" not in shared:
        shared["V"] = grads.shared_query_grads(query)  # on rank 0, broadcast: the same on every rank
    return att.score(query_grads=shared["V"])


def run_method(grads, task: DemoTask, method: str, cfg: DemoConfig, query_grads: dict) -> tuple[torch.Tensor, dict]:
    """One method from the shared capture: fit + score (forward: on its query subset; the others: on the
    query gradients, captured by the first of them into `query_grads`)."""
    from .. import Attributor
    from ..distributed import broadcast_from_rank0

    query = task.query_batches(query_rows(task, method, cfg))
    kwargs = {"damping": cfg.damping} if method != "forward" else {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        att = Attributor(grads.model, method=method, gradients=grads, **kwargs, **_options(method, cfg))
        scores = broadcast_from_rank0(score_in_sweep(att, grads, query, query_grads)).float().cpu()  # rank 0's
    seconds = time.perf_counter() - t0
    notes = list(dict.fromkeys(str(w.message) for w in caught if "pyinf" in str(w.filename) or "pyinf" in str(w.message)))
    info = att.describe()
    return scores, {"seconds": seconds, "warnings": notes, "options": info, "queries": len(query_rows(task, method, cfg)),
                    "backend": info["backend"]}


def _figure(path: Path, report: dict, scores: dict, labels: dict):
    plt = pyplot()

    tasks = list(report["tasks"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for r, task in enumerate(tasks):
        res = {m: r for m, r in report["tasks"][task]["methods"].items() if "auc" in r}  # failed ones: no bar
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
        if not scores[task]:
            continue
        show = shown_method(scores[task], len(labels[task]["query"]))
        if show is None:  # only forward ran: it scores a subset of the queries
            axes[r, 1].set_axis_off()
            continue
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


def lm_tasks(cfg: DemoConfig, names) -> tuple[list[DemoTask], dict]:
    """The LM tasks `names` (of "sentences", "math") on their one fine-tuned model (both tasks' training sets:
    it is built on both whichever run); (tasks, the model's info)."""
    data = {"sentences": sentence_transformations(cfg.seed, cfg.n_train, cfg.n_test),
            "math": math_problems(cfg.seed, cfg.n_train, cfg.n_test)}
    model, tok, info = build_model([e for t in data.values() for e in t.train], cfg.model, seed=cfg.seed,
                                   data_seed=cfg.seed, cache=cfg.cache, use_cache=cfg.use_cache,
                                   progress=cfg.progress)
    answer_only = cfg.model.answer_only
    # under torchrun: small enough that every rank gets a training batch of every task
    bs = batch_size_for_ranks(min(len(data[n].train) for n in names), cfg.batch_size)
    tasks = []
    for name in names:
        t = data[name]
        fit = {"train_loss": per_example_loss(model, tok, list(t.train), answer_only).mean().item(),
               "test_loss": per_example_loss(model, tok, list(t.test), answer_only).mean().item(),
               "test_exact_match": exact_match(model, tok, list(t.test))}
        test = t.test
        tasks.append(DemoTask(
            name=t.name, class_names=tuple(t.class_names), model=model,
            train_batches=[tok.batch(t.train[k : k + bs], answer_only) for k in range(0, len(t.train), bs)],
            query_batches=lambda rows, test=test: [tok.batch([test[i] for i in rows[k : k + bs]], answer_only)
                                                   for k in range(0, len(rows), bs)],
            train_labels=torch.tensor([e.label for e in t.train]), query_labels=torch.tensor([e.label for e in test]),
            n_train=cfg.n_train, n_test=cfg.n_test, fit=fit))
    return tasks, info


def build_tasks(cfg: DemoConfig) -> tuple[list[DemoTask], dict]:
    """Every task of `cfg.tasks` as a `DemoTask`, its model built or loaded from the cache; (tasks, {model name:
    info})."""
    bad = [t for t in cfg.tasks if t not in ALL_TASKS]
    if bad or not cfg.tasks:
        raise ValueError(f"unknown task(s) {bad or list(cfg.tasks)}; choose from {','.join(ALL_TASKS)}")
    tasks, models = [], {}
    names = [t for t in cfg.tasks if t in LM_TASKS]
    if names:
        lm, models["lm"] = lm_tasks(cfg, names)
        tasks += lm
    if "images" in cfg.tasks:
        from .images_demo import image_task

        task, models["images"] = image_task(cfg)
        tasks.append(task)
    order = {t: i for i, t in enumerate(cfg.tasks)}
    return sorted(tasks, key=lambda t: order[t.name]), models


def run_demo(cfg: DemoConfig) -> dict:
    """Every method on every task of `cfg.tasks` (module doc); writes the outputs, returns the report."""
    t_start = time.perf_counter()
    methods = [m for m in cfg.methods if m != "forward" or method_available("forward")]
    skipped = [m for m in cfg.methods if m not in methods]
    _say(f"pyinf demo: tasks {', '.join(cfg.tasks)}, methods {', '.join(methods)}"
         + (f" (not available yet: {', '.join(skipped)})" if skipped else ""), cfg)
    _say("[1/3] the models: build or load from the cache", cfg)
    tasks, models = build_tasks(cfg)
    t_model = time.perf_counter() - t_start
    info = models.get("lm", next(iter(models.values())))  # "model": the LM's, as before images
    report = {"config": {**asdict(cfg), "model": asdict(cfg.model)}, "model": info, "models": models,
              "model_seconds": t_model, "skipped_methods": skipped,
              "backend": describe_backend(next(tasks[0].model.parameters()).device), "tasks": {}}
    all_scores, labels = {}, {}
    cached = all(m["cached"] for m in models.values())
    _say(f"[2/3] attribution ({'loaded' if cached else 'built'} the models in {t_model:.1f} s)", cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        same = task.query_labels[:, None] == task.train_labels[None, :]
        _say(f"  {task.name}: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in task.fit.items()), cfg)
        res, scores, shared = {}, {}, {}
        grads, capture_s = capture_task(task, methods, cfg)
        _say(f"  {task.name}: captured {grads.n} training gradients once, {capture_s:.1f} s", cfg)
        for i, method in enumerate(methods, 1):
            _say(f"  {task.name} [{i}/{len(methods)}] {method} ...", cfg)
            t0 = time.perf_counter()
            try:
                S, meta = run_method(grads, task, method, cfg, shared)
            except Exception as e:  # noqa: BLE001 - one method failing is reported, the demo goes on
                res[method] = {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
                _say(f"      failed: {res[method]['error']}", cfg)
                continue
            helpful = -S  # most negative score = most helpful
            rows = query_rows(task, method, cfg)
            meta["auc"] = roc_auc(helpful, same[rows]).mean().item()
            meta["recall_at_k"] = recall_at_k(helpful, same[rows], task.n_train).mean().item()
            meta["k"] = task.n_train
            _say(f"      ROC-AUC {meta['auc']:.3f}, recall@{task.n_train} {meta['recall_at_k']:.3f}, "
                 f"{meta['seconds']:.1f} s", cfg)
            for w in meta["warnings"]:
                _say(f"      warning: {w}", cfg)
            res[method], scores[method] = meta, S
        report["tasks"][task.name] = {"fit": task.fit, "class_names": list(task.class_names), "methods": res,
                                      "capture_seconds": capture_s, "k": task.n_train}
        if task.finish is not None:  # a task's own figures: a failure is reported, as a method's is
            try:
                report["tasks"][task.name]["files"] = task.finish(out, scores) or []
            except Exception as e:  # noqa: BLE001
                report["tasks"][task.name]["finish_error"] = f"{type(e).__name__}: {e}"
                _say(f"  {task.name}: its figures failed: {type(e).__name__}: {e}", cfg)
        all_scores[task.name] = scores
        labels[task.name] = {"train": task.train_labels, "query": task.query_labels}
    report["seconds"] = time.perf_counter() - t_start
    _say("[3/3] saving scores, report and figure", cfg)
    torch.save({"scores": all_scores, "labels": labels}, out / "demo_scores.pt")
    save_report(report, out / "demo_report.json")
    _figure(out / "demo.png", report, all_scores, labels)
    report["seconds"] = time.perf_counter() - t_start
    save_report(report, out / "demo_report.json")
    return report


def format_table(report: dict) -> str:
    """The report as the table the CLI prints: per task, per method ROC-AUC, recall@k, queries, time."""
    lines = []
    for task, tr in report["tasks"].items():
        k = tr.get("k", 0)
        fit = ", ".join(f"{name.replace('_', ' ')} {v:.3f}" for name, v in tr["fit"].items())
        lines.append(f"\n{task}  ({fit}; one capture for every method: {tr['capture_seconds']:.2f} s)")
        lines.append(f"{'method':10s} {'ROC-AUC':>8s} {'recall@' + str(k):>10s} {'queries':>8s} {'time (s)':>9s}"
                     f"  {'backend':<8s}")
        for m, r in tr["methods"].items():
            if "error" in r:
                lines.append(f"{m:10s} failed after {r['seconds']:.2f} s: {r['error']}")
                continue
            lines.append(f"{m:10s} {r['auc']:8.3f} {r['recall_at_k']:10.3f} {r['queries']:8d} {r['seconds']:9.2f}"
                         f"  {r['backend']:<8s}"
                         + ("  (warned: see the report)" if r["warnings"] else ""))
        for f in tr.get("files", []):
            lines.append(f"wrote {f}")
    lines.append(f"\nbackend: {report['backend']}")
    models = ", ".join(f"{name} {'loaded from cache' if m['cached'] else 'trained'}"
                       for name, m in report.get("models", {"model": report["model"]}).items())
    lines.append(f"total {report['seconds']:.1f} s (models: {models}; {report['model_seconds']:.1f} s)")
    return "\n".join(lines)
