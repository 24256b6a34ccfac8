"""The cost model at the 13B LoRA shape (issue 13, "Budgets"), and checks of the harness itself.

`bench/costmodel.py` runs each method through `pyinf.influence` and through the
Attributor's store on meta tensors with a counting backend (see its
docstring). The 13B tests fail when a budget of issue 13 is exceeded; they
stop a run at the first pass over budget, so they stay fast where a budget is
far off: `python bench/costmodel.py` runs everything to the end and records
the figures in `bench/results/`. The small tests check the harness on real
tensors against hand counts, and its memory tracker and host-sync answers on
known cases, so that a passing 13B test means what it says.
"""
import importlib.util
import pathlib
import sys

import pytest
import torch

import pyinf
from pyinf.blocks import Block, TensorSource
from pyinf.methods import get_method
from pyinf.store import make_store

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "costmodel.py"
_spec = importlib.util.spec_from_file_location("pyinf_bench_costmodel", _PATH)
cm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cm  # dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(cm)

META = torch.device("meta")


# -- the 13B shape: issue 13's budgets ---------------------------------------------------------
@pytest.fixture(scope="module")
def store_13b():
    """The store the Attributor fills on a GPU (bf16, its default chunk size), shared by the methods."""
    s = cm.SHAPE_13B
    return cm.attributor_store(s, cm.meta_grads(s, s.n, s.dtype))


@pytest.mark.parametrize("method,path", [(m, p) for m in cm.METHODS for p in cm.paths(m)])
def test_budgets_at_13b(method, path, request):
    store = request.getfixturevalue("store_13b") if path == "attributor" else None
    r = cm.run(method, path, store=store, stop_over_budget=True)
    over = cm.violations(r)
    if r["stopped"]:
        over.append(f"(stopped at: {r['stopped']}; `python bench/costmodel.py` runs to the end)")
    assert not over, "\n".join(over)
    s = cm.SHAPE_13B
    assert r["g_bytes"] == s.g_bytes
    assert r["scores_shape"] == [s.m, s.n]
    assert r["reads_of_g"] >= 1  # scores need every gradient once: fewer means G went uncounted


# -- the harness, on real tensors: hand counts -------------------------------------------------
N, M = 10, 4
SHAPES = {"a": (2, 7), "b": (3, 5), "c": (1, 11)}  # D_b = 14, 15, 11 > n: exact's Woodbury form
D_TOTAL = sum(r * c for r, c in SHAPES.values())
G_BYTES = N * D_TOTAL * 4  # float32


def _small(count: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: torch.randn(count, r, c, generator=gen) for name, (r, c) in SHAPES.items()}


@pytest.fixture
def small():
    """Real float32 gradients in a CPU store of chunks of 4, 4 and 2 samples, and queries."""
    gen = torch.Generator().manual_seed(0)
    train, queries = _small(N, gen), _small(M, gen)
    blocks = [Block(name, r, c) for name, (r, c) in SHAPES.items()]
    store = make_store("cpu", blocks=blocks, device=torch.device("cpu"), grad_dtype=torch.float32, chunk_size=4,
                       progress=False)
    store.fill(lambda batch: batch, [train])
    return train, queries, store


def test_hand_count_datainf(small):
    """3 passes (norms, rank-one, score) x 3 chunks x 3 blocks, each call one block of one chunk."""
    _, queries, store = small
    r = cm.run("datainf", "attributor", store=store, queries=queries)
    assert r["stopped"] is None and r["scores_shape"] == [M, N]
    assert r["g_bytes"] == G_BYTES
    assert r["passes"] == 3 and r["calls_per_pass"] == [9, 9, 9]
    assert r["calls_by_primitive"] == {"sq_norms": 9, "rank_one_accumulate": 9, "score": 9}
    assert r["calls_on_copies_of_g"] == 0
    assert r["min_call_bytes"] == 2 * 11 * 4  # the last chunk (2 samples) of the flat block
    assert r["reads_of_g"] == 3.0
    assert r["reads_of_g_by_phase"] == {"fit": 1.0, "precondition": 1.0, "score_pass": 1.0}


def test_hand_count_exact(small):
    """The Woodbury Gram block by block: one pass over each block's chunks gathers its n samples (no
    calls inside), one gram call on the gathered copy; then one scoring pass of dots, 3 chunks x 3 blocks."""
    _, queries, store = small
    r = cm.run("exact", "attributor", store=store, queries=queries)
    assert r["stopped"] is None and r["scores_shape"] == [M, N]
    assert r["calls_per_pass"] == [0, 0, 0, 9]
    assert r["calls_by_primitive"] == {"gram": 3, "dots": 9}
    assert r["calls_on_copies_of_g"] == 3  # the gathered blocks
    assert r["gram_reads_of_g"] == 1.0
    assert r["gram_launches_per_block_group"] == 1.0
    assert r["reads_of_g"] == 2.0
    assert r["reads_of_g_by_phase"] == {"fit": 1.0, "influence": 1.0}


def test_over_budget_stop():
    """`stop_over_budget` ends a run at call MAX_CALLS_PER_PASS + 1 of a pass, and says so: one block
    of one sample per chunk makes one score call per sample."""
    n = cm.MAX_CALLS_PER_PASS + 1
    gen = torch.Generator().manual_seed(0)
    rec = cm.Recorder(stop_over_budget=True)
    source = TensorSource({"a": torch.randn(n, 1, 3, generator=gen)}, chunk_size=1)
    m = get_method("tracin")(cm.CountingBackend(rec)).fit(source)
    with pytest.raises(cm.OverBudget, match=f"more than {cm.MAX_CALLS_PER_PASS} primitive calls in pass 0"):
        with rec.counted_passes(source):
            m.influence({"a": torch.randn(1, 1, 3, generator=gen)})
    assert len(rec.calls) == n


def test_counting_backend_is_transparent(small):
    """Scores through the counting wrapper are the torch backend's, and every call is recorded."""
    train, queries, _ = small
    rec = cm.Recorder()
    counted = get_method("datainf")(cm.CountingBackend(rec)).fit(TensorSource(train, 4))
    got = counted.influence(queries)
    want = pyinf.influence(train, queries, method="datainf", backend="torch", chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert [c.name for c in rec.calls] == ["sq_norms"] * 9 + ["rank_one_accumulate"] * 9 + ["score"] * 9


@pytest.mark.parametrize("method", ["datainf", "lissa", "hyperinf", "exact"])
def test_meta_run_counts_as_a_real_run(method):
    """On meta tensors the method takes the same path as on data (the host-sync answers steer nothing)."""
    shape = cm.Shape(blocks=3, rows=2, cols=7, n=10, m=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    train = {f"block{i}": torch.randn(shape.n, 2, 7, generator=gen) for i in range(3)}
    queries = {f"block{i}": torch.randn(shape.m, 2, 7, generator=gen) for i in range(3)}
    options = {"iterations": 3, "tol": 1e-300} if method == "lissa" else {}  # no early exit on data
    meta = cm.run(method, "influence", shape=shape, options=options)
    real = cm.run(method, "influence", shape=shape, options=options, train=train, queries=queries)
    keys = ("passes", "calls_per_pass", "calls_by_primitive", "min_call_bytes", "reads_of_g", "reads_of_g_by_phase",
            "aten_reads_of_g", "scores_shape")
    assert {k: meta[k] for k in keys} == {k: real[k] for k in keys}
    assert real["peak_bytes"] == 0 and meta["peak_bytes"] > 0  # only meta storages are tracked


# -- the memory tracker and the host-sync answers ------------------------------------------------
def test_memory_tracker_known_allocations():
    G = torch.empty(6, 5, dtype=torch.bfloat16, device=META)  # "training gradients": never counted
    mode = cm.MetaRun([G])
    with mode:
        q = torch.empty(100, device=META)  # made before tracking (the queries): never counted
        mode.tracking = True
        q.mul_(2)[1:].add_(1)
        a = torch.empty(1000, device=META)  # 4000 bytes
        v = a[10:].view(10, 99)  # views: no storage
        b = torch.zeros(250, dtype=torch.float64, device=META)  # 2000
        a.add_(1)  # in place: nothing new
        assert (mode.now, mode.peak) == (6000, 6000)
        del a
        assert mode.now == 6000  # the view keeps the storage alive
        del v
        assert mode.now == 2000
        up = G.to(torch.float32)  # 6 x 5 x 4 = 120 new bytes, reading 60 bytes of G
        G[:2].sum()  # a read of 2 rows (20 bytes); the 0-d result is freed at once
        assert mode.now == 2120 and mode.peak == 6000
        assert mode.read_bytes == 60 + 20
        mode.tracking = False
    del b, up
    assert mode.now == 0


def test_host_sync_answers():
    with cm.MetaRun():
        t = torch.empty(3, device=META)
        assert bool(torch.isfinite(t).all()) is True  # finite
        assert bool((t != 0).any()) is False  # nothing bad
        assert float(t.sum()) == 1.0 and int(t.long().sum()) == 1
        assert t.tolist() == [1.0, 1.0, 1.0]
