"""Capture once, analyse many (`pyinf.capture_gradients` -> `TrainGradients`), `aggregate=True`, the one
analysis protocol and the options dataclasses (issue 15, items 2, 5 and 6)."""
from __future__ import annotations

import inspect
import pathlib
import sys
import warnings

import pytest
import torch

import pyinf
from pyinf import Attributor, Task, TrainGradients, capture_gradients
from pyinf import attributor as attributor_mod
from pyinf.losses import default_loss
from pyinf.methods import METHODS, Method
from pyinf.methods.lissa import LiSSAOptions

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # tiny_models, under --import-mode=importlib
from tiny_models import make_batch, tiny_llama_lora  # noqa: E402

OPTIONS = {"lissa": {"iterations": 4, "scale": 1e3}}
SWEEP = [("datainf", 0.01), ("datainf", 0.1), ("datainf", 1.0), ("hyperinf", 0.01), ("hyperinf", 0.1),
         ("hyperinf", 1.0), ("kfac", 0.01), ("kfac", 0.1), ("kfac", 1.0)]


class Counting:
    """A per-sample loss that counts its calls and the samples it saw."""

    def __init__(self, fn=default_loss):
        self.fn, self.calls, self.samples = fn, 0, 0

    def __call__(self, model, batch):
        self.calls += 1
        self.samples += batch["input_ids"].shape[0]
        return self.fn(model, batch)


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama_lora(seed=0)
    train = [make_batch("llama", B=4, T=8, seed=i) for i in range(3)]  # 12 samples, 3 batches
    queries = [make_batch("llama", B=3, T=8, seed=50), make_batch("llama", B=2, T=8, seed=51)]
    return model, train, queries


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("store", ["cpu", "disk"])
def test_sweep_of_3_methods_by_3_dampings_is_one_capture(llama, store, tmp_path):
    """3 methods × 3 dampings from one capture: the training loss runs once per training batch (one
    capture pass), the measurement once per query batch for the whole sweep, and every score equals a
    separate Attributor(...).fit(...).score(...)."""
    model, train, queries = llama
    spec = f"disk:{tmp_path / 'g'}" if store == "disk" else store
    train_loss, measurement = Counting(), Counting()
    grads = capture_gradients(model, train, store=spec, task=Task(train_loss, measurement), factors="empirical",
                              chunk_size=4, progress=False)
    assert (train_loss.calls, train_loss.samples) == (3, 12) and measurement.calls == 0
    V = None
    for method, damping in SWEEP:
        att = Attributor(grads.model, method=method, gradients=grads, damping=damping)
        V = att.query_grads(queries) if V is None else V
        S = att.score(query_grads=V)
        ref = Attributor(model, method=method, damping=damping, chunk_size=4, progress=False).fit(train).score(queries)
        assert _rel(S, ref) < 1e-6, (method, damping)
    assert (train_loss.calls, train_loss.samples) == (3, 12)  # still the one capture pass
    assert measurement.calls == 2  # the two query batches, once for the whole sweep


def test_every_method_from_one_capture_equals_its_own_fit(llama):
    model, train, queries = llama
    grads = capture_gradients(model, train, factors="empirical", chunk_size=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lissa: did not reach tol in 4 iterations
        for method in METHODS:
            S = Attributor(model, method=method, gradients=grads, **OPTIONS.get(method, {})).score(queries)
            ref = Attributor(model, method=method, chunk_size=4, progress=False, **OPTIONS.get(method, {}))
            assert _rel(S, ref.fit(train).score(queries)) < 1e-6, method
            si = Attributor(grads.model, method=method, gradients=grads, **OPTIONS.get(method, {})).self_influence()
            assert _rel(si, ref.self_influence()) < 1e-6, method
    forward = Attributor(grads.model, method="forward", gradients=grads, lr=1e-3, queries_per_pass=2).score(queries)
    alone = Attributor(model, method="forward", lr=1e-3, queries_per_pass=2, progress=False).fit(train)
    assert torch.equal(forward, alone.score(queries))


def test_gradients_refuse_what_they_cannot_serve(llama):
    model, train, queries = llama
    grads = capture_gradients(model, train, progress=False)  # no K-FAC statistics
    with pytest.raises(ValueError, match="factors='empirical'"):
        Attributor(grads.model, method="kfac", gradients=grads)
    with pytest.raises(ValueError, match="belong to the capture"):
        Attributor(model, method="datainf", store="cpu", gradients=grads)
    with pytest.raises(ValueError, match="another model"):
        Attributor(tiny_llama_lora(seed=0), gradients=grads)
    with pytest.raises(ValueError, match="factors"):
        capture_gradients(model, train, factors="fisher")
    att = Attributor(grads.model, method="forward", gradients=grads, lr=1e-3)
    with pytest.raises(ValueError, match="query data"):
        att.score(query_grads=grads.query_grads(queries))
    with pytest.raises(ValueError, match="aggregate"):
        att.score(queries, aggregate=True)
    with pytest.raises(ValueError, match="one of them"):
        Attributor(grads.model, method="tracin", gradients=grads).score()


def test_a_refit_and_save_load_from_gradients(llama, tmp_path):
    model, train, queries = llama
    grads = capture_gradients(model, train, store="cpu", progress=False)
    att = Attributor(grads.model, method="hyperinf", gradients=grads, damping=0.01)
    S = att.score(queries)
    att.save(tmp_path / "a.pt")
    assert torch.equal(Attributor.load(tmp_path / "a.pt", model).score(queries), S)
    assert att.describe()["options"] == {"iterations": 100, "tol": 1e-8, "solver": "auto"}
    assert isinstance(att.gradients, TrainGradients) and att.n == grads.n == 12


# -- aggregate=True -----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:lissa.*did not reach")
@pytest.mark.parametrize("method", ["tracin", "datainf", "exact", "lissa", "hyperinf"])
def test_aggregate_equals_influence_aggregate(llama, method):
    model, train, queries = llama
    att = Attributor(model, method=method, chunk_size=4, progress=False, **OPTIONS.get(method, {})).fit(train)
    V = att.query_grads(queries)
    G = {name: torch.cat([c[name] for _, c in att.gradients.store.chunks()]) for name in V}
    ref = pyinf.influence(G, V, method=method, aggregate=True, chunk_size=4, **OPTIONS.get(method, {}))
    got = att.score(queries, aggregate=True)
    assert got.shape == (12,) and _rel(got, ref) < 1e-6
    assert _rel(att.score(query_grads=V, aggregate=True), ref) < 1e-6
    top = att.score(queries, top_k=3, aggregate=True)
    assert top.harmful_indices.shape == (3,) and torch.equal(top.harmful_indices, ref.topk(3).indices)


# -- one protocol, one name per concept, options in one place --------------------------
def test_the_attributor_names_no_method():
    """No method-name branch in the Attributor: every method goes through `pyinf.analysis`."""
    src = inspect.getsource(attributor_mod)
    code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("#", '"', "'")))
    for needle in ('== "forward"', "== 'forward'", 'method"] ==', "needs_factors", "refits_eigenvalues"):
        assert needle not in code, needle
    assert not hasattr(Method, "score") and hasattr(Method, "score_pass")  # the pass; the influence is Attributor.score


def test_options_dataclasses_validate_in_one_place():
    with pytest.raises(ValueError, match="lissa: option iterations must be an int >= 1, got 0"):
        Attributor(torch.nn.Linear(2, 2), method="lissa", iterations=0)
    with pytest.raises(ValueError, match="unknown option"):
        Attributor(torch.nn.Linear(2, 2), method="hyperinf", steps=3)
    with pytest.raises(ValueError, match="solver must be one of"):
        Attributor(torch.nn.Linear(2, 2), method="hyperinf", solver="qr")
    with pytest.raises(ValueError, match=r"needs the option\(s\) \['lr'\]"):
        Attributor(torch.nn.Linear(2, 2), method="forward")
    assert LiSSAOptions.make("lissa", iterations=5).report() == {"iterations": 5, "scale": None, "tol": 1e-5}
    rep = Attributor(torch.nn.Linear(2, 2), method="forward", lr=1e-2, optimizer="Adam").describe()
    assert rep["method"] == "forward" and rep["options"]["optimizer"] == "Adam" and rep["options"]["steps"] == 1


def test_demo_and_evals_capture_each_data_set_once(tmp_path, monkeypatch):
    """`pyinf demo` (two tasks) and `pyinf eval` (one training set) fill one store per data set, for all
    their methods, Forward-INF included."""
    from pyinf.cli import main

    fills = []
    real = TrainGradients._fill
    monkeypatch.setattr(TrainGradients, "_fill", lambda self, data: fills.append(1) or real(self, data))
    methods = "tracin,datainf,kfac,ekfac,forward"
    assert main(["eval", "lds", "--n-train", "40", "--n-query", "6", "--subsets", "4", "--steps", "10", "--hidden",
                 "4", "--out", str(tmp_path / "lds"), "--methods", methods, "--quiet"]) == 0
    assert len(fills) == 1
    assert main(["demo", "--tiny", "--n-train", "4", "--n-test", "1", "--out", str(tmp_path / "demo"), "--cache",
                 str(tmp_path / "cache"), "--methods", methods, "--quiet"]) == 0
    assert len(fills) == 3
