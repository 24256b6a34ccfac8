"""Three methods × three dampings from ONE capture of the training gradients, measured.

    python examples/sweep.py            # the `pyinf demo` model (trained once, then cached) and its sentence task

The 900 training examples of the demo's sentence task are captured once
(`pyinf.capture_gradients`), the 100 queries once, and datainf, hyperinf
and kfac each run at damping 0.01, 0.1 and 1 from that capture. The
training loss counts its calls: one capture pass is one call per training
batch. For comparison, the same nine analyses are then run the old way, a
fresh `Attributor(...).fit(train).score(queries)` each (nine captures).
"""
from __future__ import annotations

import time

import torch

import pyinf
from pyinf.losses import default_loss
from pyinf.metrics import roc_auc
from pyinf.tasks.demo import DemoConfig
from pyinf.tasks.math_problems import math_problems
from pyinf.tasks.model import build_model
from pyinf.tasks.sentences import sentence_transformations

METHODS, DAMPINGS = ("datainf", "hyperinf", "kfac"), (0.01, 0.1, 1.0)


class CountingLoss:
    """The training loss, counting the samples it is evaluated on (one capture pass: n)."""

    def __init__(self):
        self.samples = 0

    def __call__(self, model, batch):
        self.samples += batch["input_ids"].shape[0]
        return default_loss(model, batch)


def main():
    torch.manual_seed(0)
    cfg = DemoConfig()  # the demo's model and data (its cache: `pyinf demo` trains it once)
    tasks = [sentence_transformations(cfg.seed, cfg.n_train, cfg.n_test), math_problems(cfg.seed, cfg.n_train, cfg.n_test)]
    model, tok, _ = build_model([e for t in tasks for e in t.train], cfg.model, seed=cfg.seed, data_seed=cfg.seed)
    task, bs, answer_only = tasks[0], cfg.batch_size, cfg.model.answer_only
    train = [tok.batch(task.train[k : k + bs], answer_only) for k in range(0, len(task.train), bs)]
    queries = [tok.batch(task.test[k : k + bs], answer_only) for k in range(0, len(task.test), bs)]
    same = torch.tensor([e.label for e in task.test])[:, None] == torch.tensor([e.label for e in task.train])[None]
    n = len(task.train)

    # -- one capture, nine analyses ----------------------------------------------------
    loss = CountingLoss()
    t0 = time.perf_counter()
    grads = pyinf.capture_gradients(model, train, task=pyinf.Task(train_loss=loss, measurement=default_loss),
                                    factors="empirical", progress=False)  # kfac reads the K-FAC statistics
    capture_s = time.perf_counter() - t0
    V = grads.query_grads(queries)  # the queries, captured once too
    t1 = time.perf_counter()
    queries_s = t1 - t0 - capture_s
    for method in METHODS:
        for damping in DAMPINGS:
            t = time.perf_counter()
            att = pyinf.Attributor(model, method=method, damping=damping, gradients=grads)  # no capture
            scores = att.score(query_grads=V)  # (100, 900)
            auc = roc_auc(-scores, same).mean().item()
            print(f"{method:9s} damping {damping:<5g} ROC-AUC {auc:.3f}  {time.perf_counter() - t:5.2f} s")
    sweep_s = time.perf_counter() - t1
    passes = loss.samples / n
    print(f"one capture: {capture_s:.2f} s, queries {queries_s:.2f} s, 9 analyses from it {sweep_s:.2f} s: "
          f"{capture_s + queries_s + sweep_s:.2f} s in all; the training loss evaluated on {loss.samples} samples "
          f"= {passes:g} capture pass(es) over the {n}")

    # -- the same nine the old way: a capture per analysis ------------------------------
    again = CountingLoss()
    task = pyinf.Task(train_loss=again, measurement=default_loss)
    t2 = time.perf_counter()
    for method in METHODS:
        for damping in DAMPINGS:
            pyinf.Attributor(model, method=method, damping=damping, task=task, progress=False).fit(train).score(queries)
    print(f"refit per analysis: {time.perf_counter() - t2:.2f} s, {again.samples / n:g} capture passes")


if __name__ == "__main__":
    main()
