"""Per-block scores (`per_block=True`) and scores on disk (`pyinf.scores.ScoreFile`)."""
from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

import pyinf
from pyinf import scores as scores_mod
from pyinf.attributor import Attributor
from pyinf.backends import BACKENDS
from pyinf.methods import METHODS
from pyinf.scores import ScoreFile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # tiny_models, test_attributor, test_hardening under --import-mode=importlib
from test_attributor import BATCH, OPTIONS, Setup  # noqa: E402
from test_hardening import SKIPPED, _poison  # noqa: E402

# odd shapes; "q" has D = 21 > n = 15, so exact solves it by Woodbury, the others primal;
# "q" and "k" share a shape (one group of two blocks)
SHAPES = {"q": (3, 7), "v": (5, 2), "bias": (11,), "k": (3, 7)}
N, M = 15, 4
LISSA = {"iterations": 50}


@pytest.fixture(scope="module")
def setup():
    return Setup()


def _grads(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, *s, generator=g) * (1 + i) for i, (k, s) in enumerate(SHAPES.items())}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# -- per_block ---------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:lissa.*did not reach")
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("method", ["tracin", "datainf", "exact", "lissa", "hyperinf"])
def test_block_shares_sum_to_the_scores(method, backend):
    train, query = _grads(N, 0), _grads(M, 1)
    kw = dict(method=method, backend=backend, chunk_size=4, **(LISSA if method == "lissa" else {}))
    total = pyinf.influence(train, query, **kw)
    shares = pyinf.influence(train, query, per_block=True, **kw)
    assert list(shares) == list(SHAPES) and all(s.shape == (M, N) and s.dtype == torch.float32 for s in shares.values())
    assert _rel(sum(shares.values()), total) < 1e-6
    if method != "lissa":  # block-diagonal curvature: a block's share is the score of that block alone
        for name, s in shares.items():  # (LiSSA's iteration count and stop test are shared by the blocks)
            assert _rel(s, pyinf.influence({name: train[name]}, {name: query[name]}, **kw)) < 1e-6, name
    agg = pyinf.influence(train, query, per_block=True, aggregate=True, **kw)
    assert _rel(sum(agg.values()), pyinf.influence(train, query, aggregate=True, **kw)) < 1e-6
    assert all(a.shape == (N,) for a in agg.values())


def test_exact_per_block_covers_woodbury_and_primal_blocks():
    train, query = _grads(N, 0), _grads(M, 1)
    m = METHODS["exact"](pyinf.backends.get_backend("torch", "cpu"))
    m.fit(pyinf.blocks.TensorSource(pyinf.blocks.as_blocks(train, "train"), 4))
    assert not m.primal["q"] and m.primal["v"]
    P = m.influence(query, per_block=True)
    assert P.shape == (len(SHAPES), M, N) and P.dtype == torch.float64
    assert _rel(P.sum(dim=0), m.influence(query)) < 1e-12


@pytest.mark.filterwarnings("ignore:lissa.*did not reach")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_attributor_per_block(setup, method):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    att = Attributor(setup.model, method=method, chunk_size=BATCH, progress=False, **OPTIONS.get(method, {}))
    S = att.fit(train).score(queries)
    shares = att.score(queries, per_block=True)
    assert list(shares) == [b.name for b in att.blocks] and len(shares) == 8
    assert all(s.shape == (3, 10) for s in shares.values())
    assert _rel(sum(shares.values()), S) < 1e-5
    V = att.query_grads(queries)  # the analysis protocol's other query forms
    agg = att.score(query_grads=V, per_block=True, aggregate=True)
    assert list(agg) == list(shares) and all(a.shape == (10,) for a in agg.values())
    assert _rel(sum(agg.values()), att.score(query_grads=V, aggregate=True)) < 1e-5


def test_per_block_refusals(setup, tmp_path):
    train, queries = setup.train(4, BATCH), setup.train(2, 2, seed=1)
    att = Attributor(setup.model, chunk_size=BATCH, progress=False).fit(train)
    with pytest.raises(ValueError, match="does not combine"):
        att.score(queries, per_block=True, top_k=2)
    with pytest.raises(ValueError, match="does not combine"):
        att.score(queries, per_block=True, out=tmp_path / "s")
    fwd = Attributor(setup.model, method="forward", lr=1e-3, progress=False).fit(train)
    with pytest.raises(ValueError, match="per_block is not available for method 'forward'.*tracin"):
        fwd.score(queries, per_block=True)
    with pytest.raises(ValueError, match="out= is not available for method 'forward'"):
        fwd.score(queries, out=tmp_path / "f")
    assert not (tmp_path / "f").exists()
    with pytest.raises(ValueError, match="out= identifies its run by the query data"):
        att.score(query_grads=att.query_grads(queries), out=tmp_path / "s")
    with pytest.raises(ValueError, match="out= identifies its run by the query data"):
        att.score(queries, aggregate=True, out=tmp_path / "s")


# -- scores on disk ----------------------------------------------------------
STORES = ["cpu", "none", "disk"]


def _att(setup, store, tmp_path, **kw):
    spec = f"disk:{tmp_path / 'grads'}" if store == "disk" else store
    return Attributor(setup.model, store=spec, chunk_size=BATCH, progress=False, **kw)


@pytest.mark.parametrize("store", STORES)
def test_file_equals_memory_and_top_k(setup, store, tmp_path):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    att = _att(setup, store, tmp_path).fit(train)
    S = att.score(queries)
    sf = att.score(queries, out=tmp_path / "scores")
    assert isinstance(sf, ScoreFile) and sf.complete and sf.shape == (3, 10)
    assert torch.equal(sf.tensor(), S)
    assert sf.array.shape == (3, 10) and float(sf.array[1, 7]) == float(S[1, 7])
    head = json.loads((tmp_path / "scores" / "header.json").read_text())
    assert head["shape"] == [3, 10] and head["written"] == [[0, 10]] and head["meta"]["method"] == "datainf"
    assert not (tmp_path / "scores" / "H.pt").exists()
    for block_bytes in (4 * 3 * 3, scores_mod.BLOCK_BYTES):  # 3 rows a read, and all at once
        top = sf.top_k(4, block_bytes=block_bytes)
        ref = att.score(queries, top_k=4)
        for got, want in zip(top, ref):
            assert torch.equal(got, want)
        per_train = sf.top_k(2, per="train", block_bytes=block_bytes)
        hv, hi = S.T.topk(2, dim=1, largest=False)
        av, ai = S.T.topk(2, dim=1, largest=True)
        assert torch.equal(per_train.helpful_scores, hv) and torch.equal(per_train.helpful_indices, hi)
        assert torch.equal(per_train.harmful_scores, av) and torch.equal(per_train.harmful_indices, ai)
    assert att.score(queries, out=tmp_path / "scores").complete  # the same run: returned as is


@pytest.mark.parametrize("store", STORES)
def test_resume_after_interruption(setup, store, tmp_path, monkeypatch):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    ref = _att(setup, store, tmp_path).fit(train).score(queries)
    path = tmp_path / "scores"
    write = ScoreFile.write

    def killed_after_one_chunk(self, start, cols):
        if start > 0:
            raise KeyboardInterrupt("killed")
        write(self, start, cols)

    monkeypatch.setattr(ScoreFile, "write", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        _att(setup, store, tmp_path).fit(train).score(queries, out=path)
    monkeypatch.setattr(ScoreFile, "write", write)
    sf = ScoreFile(path)
    assert not sf.complete and sf.resume_at == BATCH and (path / "H.pt").exists()
    with pytest.raises(ValueError, match="incomplete"):
        sf.top_k(2)

    # a new process: fit again; the resumed pass neither captures queries nor reads the written chunk
    att = _att(setup, store, tmp_path).fit(train)
    starts = []
    monkeypatch.setattr(att.gradients, "query_grads", lambda q: pytest.fail("queries captured again on resume"))
    chunks = att.analysis.method.score_chunks
    monkeypatch.setattr(att.analysis.method, "score_chunks", lambda *a, **k: (starts.append(s) or (s, c) for s, c in chunks(*a, **k)))
    sf = att.score(queries, out=path)
    assert sf.complete and starts == [4, 8]
    assert torch.equal(sf.tensor(), ref)


def test_a_file_of_another_run_is_refused(setup, tmp_path):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    att = _att(setup, "cpu", tmp_path).fit(train)
    att.score(queries, out=tmp_path / "s")
    with pytest.raises(ValueError, match=r"another run \(it differs in \['queries'\]\)"):
        att.score(setup.train(3, 3, seed=2), out=tmp_path / "s")
    other = _att(setup, "cpu", tmp_path, method="tracin").fit(train)
    with pytest.raises(ValueError, match="another run.*config.*method"):
        other.score(queries, out=tmp_path / "s")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(ValueError, match="not a pyinf score file"):
        att.score(queries, out=tmp_path / "junk")
    with pytest.raises(ValueError, match="ScoreFile.top_k"):
        att.score(queries, out=tmp_path / "t", top_k=2)


def test_skipped_samples_are_nan_rows_never_in_top_k(setup, monkeypatch, tmp_path):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    _poison(monkeypatch, train)
    att = Attributor(setup.model, store="cpu", chunk_size=BATCH, progress=False, nan_policy="skip").fit(train)
    S = att.score(queries)
    sf = att.score(queries, out=tmp_path / "s")
    assert torch.equal(sf.tensor().isnan(), S.isnan()) and torch.isnan(sf.tensor()[:, SKIPPED]).all()
    assert torch.allclose(sf.tensor(), S, equal_nan=True)
    top, ref = sf.top_k(3, block_bytes=4 * 3 * 4), att.score(queries, top_k=3)
    for got, want in zip(top, ref):
        assert torch.equal(got, want)
    per_train = sf.top_k(2, per="train")
    assert (per_train.helpful_indices[SKIPPED] == -1).all() and per_train.helpful_scores[SKIPPED].isnan().all()
    keep = [i for i in range(10) if i not in SKIPPED]
    assert torch.equal(per_train.harmful_indices[keep], S.T[keep].topk(2, dim=1).indices)


def test_written_ranges_merge():
    add = scores_mod._add_range
    assert add([], 4, 8) == [[4, 8]]
    assert add([[4, 8]], 0, 4) == [[0, 8]]
    assert add([[0, 2], [6, 8]], 2, 6) == [[0, 8]]
