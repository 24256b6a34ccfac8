"""pyinf.Attributor: scores equal pyinf.influence on the captured gradients, for every method and store."""
from __future__ import annotations

import pathlib
import sys
import warnings

import pytest
import torch

import pyinf
from pyinf import gradients as gradients_mod
from pyinf.attributor import Attributor, TopK
from pyinf.capture import GradientCapture
from pyinf.methods import METHODS

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # tiny_models, under --import-mode=importlib
from tiny_models import make_batch, tiny_llama_lora  # noqa: E402


class Setup:
    """A tiny Llama with LoRA (r=4 on q_proj, v_proj), token batches, and the reference capture of them."""

    def __init__(self):
        self.model = tiny_llama_lora(seed=0)
        self.blocks = "lora"
        self._cache = {}  # the same batches and reference gradients across tests (the captures dominate)

    def train(self, n, batch_size, seed=0):
        key = (n, batch_size, seed)
        if key not in self._cache:
            self._cache[key] = [
                make_batch("llama", B=min(batch_size, n - i), T=8, seed=1000 * seed + i)
                for i in range(0, n, batch_size)
            ]
        return list(self._cache[key])

    def grads(self, batches):
        key = tuple(id(b) for b in batches)
        if key not in self._cache:
            with GradientCapture(self.model, blocks=self.blocks) as cap:
                parts = [cap(b) for b in batches]
            self._cache[key] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return self._cache[key]


BATCH = 4  # 10 samples -> batches 4, 4, 2 = the chunks of every store with chunk_size=4
STORES = ["cpu", "none", "disk", pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))]
OPTIONS = {"lissa": {"iterations": 4, "scale": 1e3}}  # few passes: the same 4 steps on both sides


@pytest.fixture(scope="module")
def setup():
    return Setup()


def _store(kind, tmp_path):
    return f"disk:{tmp_path / 'grads'}" if kind == "disk" else kind


def _reference(setup, method, train, queries, **kw):
    tg, qg = setup.grads(train), setup.grads(queries)
    return pyinf.influence(tg, qg, method=method, chunk_size=BATCH, **OPTIONS.get(method, {}), **kw)


@pytest.mark.filterwarnings("ignore:lissa.*did not reach")
@pytest.mark.parametrize("store", STORES)
# kfac/ekfac need the capture's token statistics, which pyinf.influence on tensors has not: test_kfac.py
@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items() if not cls.needs_factors))
def test_scores_equal_influence(setup, method, store, tmp_path):
    train, queries = setup.train(10, BATCH), setup.train(3, 2, seed=1)
    att = Attributor(setup.model, method=method, blocks=setup.blocks, store=_store(store, tmp_path),
                     chunk_size=BATCH, progress=False, **OPTIONS.get(method, {}))
    att.fit(train)
    assert att.n == 10 and att.gradients.store.num_chunks == 3
    got = att.score(queries)
    ref = _reference(setup, method, train, queries)
    assert got.dtype == torch.float32 and got.shape == (3, 10)
    assert torch.equal(got, ref), (got - ref).abs().max()
    if store != "none":  # self-influence preconditions chunk by chunk: one capture pass per chunk
        ref_self = pyinf.self_influence(setup.grads(train), method=method, chunk_size=BATCH, **OPTIONS.get(method, {}))
        assert torch.equal(att.self_influence(), ref_self)


def test_dataset_and_collate(setup):
    train = setup.train(10, BATCH)
    samples = [{k: v[i] for k, v in b.items()} for b in train for i in range(next(iter(b.values())).shape[0])]
    collate = torch.utils.data.default_collate
    a = Attributor(setup.model, blocks=setup.blocks, batch_size=BATCH, chunk_size=BATCH, progress=False)
    b = Attributor(setup.model, blocks=setup.blocks, batch_size=BATCH, chunk_size=BATCH, progress=False)
    q = setup.train(3, 3, seed=1)
    assert torch.equal(a.fit((samples, collate)).score(q), b.fit(train).score(q))


def test_top_k_streamed_equals_full(setup):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    att = Attributor(setup.model, blocks=setup.blocks, store="cpu", chunk_size=BATCH, progress=False).fit(train)
    full = att.score(queries)
    top = att.score(queries, top_k=3)
    assert isinstance(top, TopK) and top.helpful_scores.shape == (3, 3)
    hv, hi = Attributor.top_k(full, 3, helpful=True)
    av, ai = Attributor.top_k(full, 3, helpful=False)
    assert torch.equal(top.helpful_scores, hv) and torch.equal(top.helpful_indices, hi)
    assert torch.equal(top.harmful_scores, av) and torch.equal(top.harmful_indices, ai)
    assert (top.helpful_scores[:, :1] <= top.harmful_scores[:, :1]).all()
    big = att.score(queries, top_k=50)  # k > n: every sample, sorted
    assert big.helpful_scores.shape == (3, 10)


@pytest.mark.parametrize("store", ["cpu", "disk", "none"])
def test_save_load_round_trip(setup, store, tmp_path):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    for method in ("datainf", "exact", "hyperinf") if store == "cpu" else ("datainf",):
        att = Attributor(setup.model, method=method, blocks=setup.blocks, store=_store(store, tmp_path),
                         chunk_size=BATCH, progress=False).fit(train)
        att.save(tmp_path / "state.pt")
        new_queries = setup.train(2, 2, seed=7)
        kw = {"train_data": train} if store == "none" else {}
        loaded = Attributor.load(tmp_path / "state.pt", setup.model, progress=False, **kw)
        assert torch.equal(loaded.score(new_queries), att.score(new_queries))
        assert torch.equal(loaded.self_influence(), att.self_influence())
    if store == "none":
        with pytest.raises(ValueError, match="train_data"):
            Attributor.load(tmp_path / "state.pt", setup.model)


def test_none_store_refuses_reordered_data(setup):
    train = setup.train(10, BATCH)

    class Shuffling:  # a loader whose order changes on every iteration
        def __init__(self):
            self.epoch = 0

        def __iter__(self):
            order = list(range(len(train)))
            if self.epoch % 2:
                order.reverse()
            self.epoch += 1
            return iter([train[i] for i in order])

    att = Attributor(setup.model, blocks=setup.blocks, store="none", progress=False)
    with pytest.raises(ValueError, match="changed order between passes"):
        att.fit(Shuffling())
    with pytest.raises(ValueError, match="one-shot iterator"):
        Attributor(setup.model, blocks=setup.blocks, store="none", progress=False).fit(iter(train))


def test_nan_gradient_is_refused_for_tracin(setup, monkeypatch):
    train = setup.train(10, BATCH)

    def poisoned(model, blocks, loss):  # the real capture, with a NaN in sample 6 of one block
        cap = GradientCapture(model, blocks=blocks, loss=loss)
        call = cap.__call__

        class Poisoned:
            blocks = cap.blocks
            close = cap.close

            def __call__(self, batch):
                g = call(batch)
                if torch.equal(batch["input_ids"].cpu(), train[1]["input_ids"]):
                    g[cap.blocks[3].name][2, 0, 0] = float("nan")
                return g

        return Poisoned()

    monkeypatch.setattr(gradients_mod, "_make_capture", poisoned)
    name = GradientCapture(setup.model).blocks[3].name
    for store in ("cpu", "none"):
        att = Attributor(setup.model, method="tracin", blocks=setup.blocks, store=store, progress=False)
        with pytest.raises(ValueError, match=f"block '{name}': train gradient of sample 6 contains NaN"):
            att.fit(train)
            att.score(setup.train(2, 2, seed=1))


def test_progress_bars(setup, capfd):
    train, queries = setup.train(10, BATCH), setup.train(2, 2, seed=1)
    Attributor(setup.model, blocks=setup.blocks, chunk_size=BATCH, progress=False).fit(train).score(queries)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    pytest.importorskip("tqdm")
    Attributor(setup.model, blocks=setup.blocks, chunk_size=BATCH, progress=True).fit(train).score(queries)
    err = capfd.readouterr().err
    for label in ("capture", "datainf: fit", "datainf: score", "pass 2"):
        assert label in err


def test_progress_one_line_per_phase_in_logs(setup, capfd, tmp_path):
    """stderr is not a terminal here: the default (None) prints one line per phase, however many passes
    (LiSSA's 20 iterations are one line), and `load` keeps the saved setting."""
    train, queries = setup.train(10, BATCH), setup.train(2, 2, seed=1)
    att = Attributor(setup.model, method="lissa", blocks=setup.blocks, chunk_size=BATCH, iterations=20, tol=1e-30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lissa: did not reach tol
        att.fit(train).score(queries)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 4 and all(ln.startswith("pyinf: ") for ln in lines), lines
    assert [ln.split(": ")[1] for ln in lines] == ["capture", "lissa", "capture queries", "lissa"], lines
    assert "lissa: fit: " in lines[1] and "passes" in lines[1] and "lissa: score: " in lines[3]
    quiet = Attributor(setup.model, blocks=setup.blocks, progress=False).fit(train)
    quiet.save(tmp_path / "a.pt")
    capfd.readouterr()
    Attributor.load(tmp_path / "a.pt", setup.model).score(queries)
    assert capfd.readouterr().err == ""


def test_constructor_validates(setup):
    with pytest.raises(ValueError, match="unknown method"):
        Attributor(setup.model, method="nope")
    with pytest.raises(ValueError, match="unknown option"):
        Attributor(setup.model, method="datainf", iterations=3)
    with pytest.raises(ValueError, match="damping"):
        Attributor(setup.model, damping=-1.0)
    with pytest.raises(ValueError, match="unknown store"):
        Attributor(setup.model, store="tape")
    with pytest.raises(ValueError, match="store='gpu'"):
        if not torch.cuda.is_available():
            Attributor(setup.model, store="gpu")
        else:
            raise ValueError("store='gpu'")
    with pytest.raises(ValueError, match="grad_dtype"):
        Attributor(setup.model, grad_dtype=torch.float16)
    with pytest.raises(RuntimeError, match="fit"):
        Attributor(setup.model, blocks=setup.blocks).score(setup.train(2, 2))


def test_bf16_storage(setup):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    att = Attributor(setup.model, blocks=setup.blocks, grad_dtype=torch.bfloat16, chunk_size=BATCH, progress=False)
    got = att.fit(train).score(queries)
    tg = {k: v.to(torch.bfloat16) for k, v in setup.grads(train).items()}
    ref = pyinf.influence(tg, setup.grads(queries), method="datainf", chunk_size=BATCH)
    assert torch.equal(got, ref)


# -- data as users hold it (issue 12, items 8, 10, 12) -------------------------
def _examples(setup, n=12):
    """n per-example dicts of equal length (so that default_collate stacks them)."""
    batch = make_batch("llama", B=n, T=8, seed=3, lengths=[8] * n)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


@pytest.mark.parametrize("store", ["cpu", "disk", "none"])
def test_shuffled_loader_scores_in_dataset_order(setup, store, tmp_path):
    """fit(DataLoader(ds, shuffle=True)) returned columns in the shuffled order, silently."""
    from torch.utils.data import DataLoader

    ex, queries = _examples(setup), setup.train(3, 3, seed=1)
    ref = Attributor(setup.model, blocks=setup.blocks, chunk_size=BATCH, progress=False).fit(
        DataLoader(ex, batch_size=BATCH)).score(queries)
    shuffled = DataLoader(ex, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    att = Attributor(setup.model, blocks=setup.blocks, store=_store(store, tmp_path), chunk_size=BATCH, progress=False)
    assert torch.equal(att.fit(shuffled).score(queries), ref)
    assert torch.equal(att.score(shuffled), att.score(DataLoader(ex, batch_size=BATCH)))  # query rows too


def test_loader_with_an_unmappable_sampler_is_refused(setup):
    from torch.utils.data import DataLoader, WeightedRandomSampler

    ex = _examples(setup)
    loader = DataLoader(ex, batch_size=BATCH, sampler=WeightedRandomSampler([1.0] * len(ex), len(ex)))
    with pytest.raises(ValueError, match="WeightedRandomSampler.*shuffle=False"):
        Attributor(setup.model, blocks=setup.blocks, progress=False).fit(loader)


def test_batches_as_users_hold_them(setup):
    """One batch dict, a tokenizer's BatchEncoding and a list of per-example dicts score like a list of
    batches (a dict failed with 'cannot tell the batch size of a str')."""
    from transformers import BatchEncoding

    att = Attributor(setup.model, blocks=setup.blocks, chunk_size=BATCH, progress=False).fit(setup.train(10, BATCH))
    ex = _examples(setup, 6)
    batch = {k: torch.stack([e[k] for e in ex]) for k in ex[0]}
    ref = att.score([batch])
    assert torch.equal(att.score(batch), ref) and torch.equal(att.score(BatchEncoding(batch)), ref)
    assert torch.allclose(att.score(ex), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))  # batches of 6 vs 4 + 2
    ragged = [{k: v[: 5 + i] for k, v in e.items()} for i, e in enumerate(ex)]
    with pytest.raises(ValueError, match="equal shapes.*DataCollatorWithPadding"):
        att.score(ragged)
    with pytest.raises(TypeError, match="return_tensors='pt'.*list of per-example dicts"):
        att.score({k: v.tolist() for k, v in batch.items()})  # a tokenizer's output without return_tensors
    with pytest.raises(TypeError, match="cannot score a str"):
        att.score("a query")


def test_model_changed_since_fit_is_refused(setup, tmp_path):
    """load(path, other_model) and score() after more training returned scores without a word."""
    from tiny_models import tiny_llama_lora

    model, train, queries = tiny_llama_lora(seed=0), setup.train(10, BATCH), setup.train(3, 3, seed=1)
    att = Attributor(model, blocks=setup.blocks, chunk_size=BATCH, progress=False).fit(train)
    ref = att.score(queries)
    att.save(tmp_path / "a.pt")
    other = tiny_llama_lora(seed=1)
    with pytest.raises(ValueError, match="fitted on another model.*check_model=False"):
        Attributor.load(tmp_path / "a.pt", other)
    assert Attributor.load(tmp_path / "a.pt", other, check_model=False).score(queries).shape == (3, 10)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(0.01)  # "trained further"
    with pytest.raises(ValueError, match="model changed since fit.*check_model=False"):
        att.score(queries)
    with pytest.raises(ValueError, match="model changed since fit"):
        att.self_influence()
    att.check_model = False
    assert not torch.equal(att.score(queries), ref)
