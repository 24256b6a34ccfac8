"""kfac and ekfac: against float64 references built from per-token quantities, the capture's token
statistics against autograd, and through `pyinf.Attributor` on a tiny PEFT model (every store, backend)."""
from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

import pyinf
from pyinf.attributor import Attributor
from pyinf.backends import BACKENDS
from pyinf.blocks import TensorSource
from pyinf.capture import GradientCapture
from pyinf.factors import FactorStats
from pyinf.losses import sample_labels
from pyinf.methods import get_method

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # tiny_models, under --import-mode=importlib
from tiny_models import make_batch, tiny_llama_lora, tiny_roberta_lora  # noqa: E402

DT = torch.float64
# odd shapes; two blocks of one shape (a group of 2); a bias block (p_t = 1)
SHAPES = {"A1": (3, 17), "A2": (3, 17), "Bt": (5, 4), "bias": (1, 6)}
N, T, M = 23, 7, 4


def _tokens(seed=0):
    """Per-token factors p (n, T, rows) (None for the bias), q (n, T, cols) and a keep mask (n, T), float64."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, T, generator=g) > 0.3
    keep[:, 0] = True
    toks = {}
    for name, (rows, cols) in SHAPES.items():
        p = None if name == "bias" else torch.randn(N, T, rows, generator=g, dtype=DT) + 0.3
        q = torch.randn(N, T, cols, generator=g, dtype=DT) * torch.linspace(0.5, 2.0, cols, dtype=DT)
        toks[name] = (p, q)
    return toks, keep


def _grads(toks, keep):
    """g_i = Σ_t keep p_t q_tᵀ (p = 1 for the bias)."""
    out = {}
    for name, (p, q) in toks.items():
        p1 = torch.ones(N, T, 1, dtype=DT) if p is None else p
        out[name] = torch.einsum("nt,ntr,ntc->nrc", keep.to(DT), p1, q)
    return out


def _stats(toks, keep, batches=(0, 9, 17, N)):
    """FactorStats filled batch by batch, as the capture does."""
    blocks = [pyinf.blocks.Block(name, *shape) for name, shape in SHAPES.items()]
    st = FactorStats(blocks, "cpu")
    for lo, hi in zip(batches[:-1], batches[1:]):
        for name, (p, q) in toks.items():
            st.add(name, None if p is None else p[lo:hi], q[lo:hi], keep[lo:hi])
    return st


def _reference(method, toks, keep, queries, damping, mode):
    """Dense float64 (D × D) preconditioners from the per-token factors: score = −v P g."""
    grads = _grads(toks, keep)
    S = torch.zeros(M, N, dtype=DT)
    for name, (p, q) in toks.items():
        rows, cols = SHAPES[name]
        k = keep.to(DT)
        p1 = torch.ones(N, T, 1, dtype=DT) if p is None else p
        R = torch.einsum("nt,ntr,nts->rs", k, p1, p1) / k.sum()
        C = torch.einsum("nt,ntc,ntd->cd", k, q, q) / N
        a, QR = torch.linalg.eigh(R)
        c, QC = torch.linalg.eigh(C)
        Q = torch.kron(QR, QC)  # row-major vec: (R ⊗ C) vec(X) = vec(R X C)
        G = grads[name].reshape(N, -1)
        if method == "kfac":
            lam_vec = torch.kron(a, c)
        else:
            F = G.T @ G / N
            lam_vec = torch.diagonal(Q.T @ F @ Q)
        lam = damping * lam_vec.mean() if mode == "relative" else damping
        P = Q @ torch.diag(1.0 / (lam_vec + lam)) @ Q.T
        S -= queries[name].reshape(M, -1) @ P @ G.T
    return S


def _queries(seed=5):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(M, *shape, generator=g, dtype=DT) for name, shape in SHAPES.items()}


def _fit(method, toks, keep, backend="torch", chunk_size=5, **kw):
    src = TensorSource(_grads(toks, keep), chunk_size=chunk_size)
    src.factors = _stats(toks, keep)
    return get_method(method)(pyinf.backends.get_backend(backend, "cpu"), **kw).fit(src), src


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_factor_sums_are_the_token_sums():
    toks, keep = _tokens()
    st = _stats(toks, keep)
    k = keep.to(DT)
    for name, (p, q) in toks.items():
        gi, j = st.index[name]
        R, C, Ntok = (t[0] for t in st.sums(gi, j, j + 1))
        p1 = torch.ones(N, T, 1, dtype=DT) if p is None else p
        assert torch.allclose(R, torch.einsum("nt,ntr,nts->rs", k, p1, p1), rtol=1e-12, atol=1e-12)
        assert torch.allclose(C, torch.einsum("nt,ntc,ntd->cd", k, q, q), rtol=1e-12, atol=1e-12)
        assert float(Ntok) == float(k.sum())
    assert st.missing() == []


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("mode,damping", [("relative", 0.1), ("relative", 1e-3), ("absolute", 0.5)])
def test_matches_token_reference(method, mode, damping):
    toks, keep = _tokens()
    V = _queries()
    m, _ = _fit(method, toks, keep, damping=damping, damping_mode=mode)
    got = m.influence(V)
    ref = _reference(method, toks, keep, V, damping, mode)
    assert got.dtype == DT and got.shape == (M, N)
    assert _rel(got, ref) < 1e-9, _rel(got, ref)
    si = m.self_influence(m.train)
    assert (si <= 0).all()


def test_ekfac_relative_damping_is_the_engines_lambda():
    toks, keep = _tokens()
    m, _ = _fit("ekfac", toks, keep, damping=0.1)
    for name, G in _grads(toks, keep).items():
        assert m.lam[name] == pytest.approx(0.1 * float((G.reshape(N, -1) ** 2).sum(1).mean()) / G[0].numel(), rel=1e-12)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_chunking_and_grouping_do_not_change_scores(method):
    toks, keep = _tokens()
    V = _queries()
    a = _fit(method, toks, keep, chunk_size=3)[0].influence(V)
    b = _fit(method, toks, keep, chunk_size=N)[0].influence(V)
    assert _rel(a, b) < 1e-12


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_backends_agree_in_float32(method, backend):
    toks, keep = _tokens()
    V = _queries()
    grads = {k: v.float() for k, v in _grads(toks, keep).items()}
    src = TensorSource(grads, chunk_size=5)
    src.factors = _stats({k: (None if p is None else p.float(), q.float()) for k, (p, q) in toks.items()}, keep)
    m = get_method(method)(pyinf.backends.get_backend(backend, "cpu")).fit(src)
    got = m.influence({k: v.float() for k, v in V.items()})
    ref = _reference(method, toks, keep, V, 0.1, "relative")
    assert got.dtype == torch.float32
    assert _rel(got, ref) < 1e-4, _rel(got, ref)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_bare_gradients_are_refused_naming_the_attributor(method):
    toks, keep = _tokens()
    with pytest.raises(ValueError, match="pyinf.Attributor"):
        pyinf.influence(_grads(toks, keep), _queries(), method=method)


def test_options_are_checked():
    with pytest.raises(ValueError, match="fisher"):
        get_method("kfac")(pyinf.backends.get_backend("torch", "cpu"), fisher="exact")
    toks, keep = _tokens()
    with pytest.raises(ValueError, match="fisher='empirical'"):
        _fit("kfac", toks, keep, fisher="true")


# -- the capture's statistics --------------------------------------------------------
class TokenMLP(torch.nn.Module):
    """(B, T, 5) -> (B, T, 3) through two Linear layers (with biases)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(5, 7)
        self.l2 = torch.nn.Linear(7, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _token_loss(model, batch):
    out = model(batch["x"])
    m = batch["attention_mask"].to(out.dtype)
    return ((out - batch["y"]) ** 2).sum(-1).mul(m).sum(1) / m.sum(1)


def test_capture_statistics_match_autograd():
    model = TokenMLP().double()
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(4, 6, 5, generator=g, dtype=DT), "y": torch.randn(4, 6, 3, generator=g, dtype=DT),
             "attention_mask": (torch.rand(4, 6, generator=g) > 0.3).long()}
    blocks = ["l1", "l2", "l1.bias"]
    with GradientCapture(model, blocks=blocks, loss=_token_loss) as cap:
        st = FactorStats(cap.blocks, "cpu")
        cap.factors, st.active = st, True
        cap(batch)
    # reference: the layers' inputs and output gradients from autograd
    h = model.l1(batch["x"])
    h.retain_grad()
    a2 = torch.tanh(h)
    o = model.l2(a2)
    o.retain_grad()
    _token_loss_from = ((o - batch["y"]) ** 2).sum(-1).mul(batch["attention_mask"]).sum(1) / batch["attention_mask"].sum(1)
    _token_loss_from.sum().backward()
    k = batch["attention_mask"].to(DT)
    ref = {"l1": (h.grad, batch["x"]), "l2": (o.grad, a2.detach()), "l1.bias": (torch.ones(4, 6, 1, dtype=DT), h.grad)}
    for name, (p, q) in ref.items():
        gi, j = st.index[name]
        R, C, Ntok = (t[0] for t in st.sums(gi, j, j + 1))
        assert torch.allclose(R, torch.einsum("nt,ntr,nts->rs", k, p, p), rtol=1e-6, atol=1e-9), name
        assert torch.allclose(C, torch.einsum("nt,ntc,ntd->cd", k, q, q), rtol=1e-6, atol=1e-9), name
        assert float(Ntok) == float(k.sum())


def test_lora_statistics_match_hooks():
    """LoRA A: p = the output gradient of lora_A (s·Bᵀδ), q = its input x; Bᵀ: p = A x, q = s·δ."""
    model = tiny_llama_lora(seed=0).eval()
    batch = make_batch("llama", B=3, T=8, seed=3)
    seen = {}

    def hook(name):
        def fwd(mod, args, out):
            seen[name] = {"in": args[0].detach()}
            out.register_hook(lambda e: seen[name].__setitem__("grad", e.detach()))
        return fwd

    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    mods = dict(model.named_modules())
    handles = [mods[f"{layer}.lora_{w}.default"].register_forward_hook(hook(w)) for w in ("A", "B")]
    with GradientCapture(model, blocks="lora") as cap:
        st = FactorStats(cap.blocks, "cpu")
        cap.factors, st.active = st, True
        cap(batch)
    for h in handles:
        h.remove()
    k = batch["attention_mask"].to(torch.float32)
    for name, (p, q) in {f"{layer}.lora_A.default": (seen["A"]["grad"], seen["A"]["in"]),
                         f"{layer}.lora_B.default": (seen["B"]["in"], seen["B"]["grad"])}.items():
        gi, j = st.index[name]
        R, C, _ = (t[0] for t in st.sums(gi, j, j + 1))
        Rr = torch.einsum("nt,ntr,nts->rs", k, p.float(), p.float()).double()
        Cr = torch.einsum("nt,ntc,ntd->cd", k, q.float(), q.float()).double()
        assert _rel(R, Rr) < 1e-5 and _rel(C, Cr) < 1e-5, name


# -- through the Attributor ------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    model = tiny_llama_lora(seed=0)
    train = [make_batch("llama", B=4, T=8, seed=i) for i in range(3)]
    queries = [make_batch("llama", B=3, T=8, seed=100)]
    return model, train, queries


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_attributor_stores_agree(llama, method, tmp_path):
    model, train, queries = llama
    got = {}
    for store in ("cpu", "none", f"disk:{tmp_path / 'g'}"):
        att = Attributor(model, method=method, store=store, chunk_size=4, progress=False).fit(train)
        got[store] = att.score(queries)
    ref = got["cpu"]
    assert ref.shape == (3, 12) and torch.isfinite(ref).all()
    for S in got.values():
        assert torch.equal(S, ref)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_attributor_backends_agree(llama, method, backend):
    model, train, queries = llama
    ref = Attributor(model, method=method, backend="torch", progress=False).fit(train).score(queries)
    got = Attributor(model, method=method, backend=backend, progress=False).fit(train).score(queries)
    assert _rel(got, ref) < 1e-5


def test_attributor_matches_reference_on_captured_tokens(llama):
    """The Attributor's kfac on the tiny Llama equals a float64 K-FAC built from its captured statistics
    and gradients by the dense formula (the wiring: factor layout per block kind, N, n)."""
    model, train, queries = llama
    att = Attributor(model, method="kfac", store="cpu", progress=False).fit(train)
    S = att.score(queries).double()
    st, V = att.gradients.store.factors, att.query_grads(queries)
    G = {name: torch.cat([c[name] for _, c in att.gradients.store.chunks()]) for name in V}
    ref = torch.zeros_like(S)
    for name in V:
        gi, j = st.index[name]
        R, C, Ntok = (t[0] for t in st.sums(gi, j, j + 1))
        F = torch.kron(R / Ntok, C / 12)
        lam = 0.1 * torch.diagonal(F).mean()
        P = torch.linalg.inv(F + lam * torch.eye(F.shape[0], dtype=DT))
        ref -= V[name].double().reshape(3, -1) @ P @ G[name].double().reshape(12, -1).T
    assert _rel(S, ref) < 1e-4


def test_disk_store_resumes_factors(llama, tmp_path):
    model, train, queries = llama
    path = tmp_path / "g"
    att = Attributor(model, method="ekfac", store=f"disk:{path}", chunk_size=4, progress=False).fit(train)
    ref = att.score(queries)
    man = json.loads((path / "manifest.json").read_text())
    assert man["factors"]["shards"] == [0, 1, 2] and (path / "factors.bin").stat().st_size == man["factors"]["bytes"]
    # all reused: statistics read from factors.bin, nothing captured again
    again = Attributor(model, method="ekfac", store=f"disk:{path}", chunk_size=4, progress=False).fit(train)
    assert torch.equal(again.score(queries), ref)
    # factors.bin lost (an interrupted fit): the reused shards are captured again for their statistics
    (path / "factors.bin").unlink()
    with pytest.warns(RuntimeWarning, match="factors.bin"):
        again = Attributor(model, method="ekfac", store=f"disk:{path}", chunk_size=4, progress=False).fit(train)
    assert _rel(again.score(queries), ref) < 1e-6
    # a store filled by another method has no statistics: kfac adds them
    other = tmp_path / "h"
    Attributor(model, method="datainf", store=f"disk:{other}", chunk_size=4, progress=False).fit(train)
    got = Attributor(model, method="ekfac", store=f"disk:{other}", chunk_size=4, progress=False).fit(train)
    assert _rel(got.score(queries), ref) < 1e-6


def test_save_load_round_trip(llama, tmp_path):
    model, train, queries = llama
    att = Attributor(model, method="kfac", store="cpu", progress=False).fit(train)
    att.save(tmp_path / "s.pt")
    loaded = Attributor.load(tmp_path / "s.pt", model, progress=False)
    assert torch.equal(loaded.score(queries), att.score(queries))


def test_true_fisher_is_seeded_and_differs(llama):
    model, train, queries = llama
    emp = Attributor(model, method="kfac", progress=False).fit(train).score(queries)
    a = Attributor(model, method="kfac", fisher="true", seed=3, progress=False).fit(train).score(queries)
    b = Attributor(model, method="kfac", fisher="true", seed=3, progress=False).fit(train).score(queries)
    c = Attributor(model, method="kfac", fisher="true", seed=4, progress=False).fit(train).score(queries)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, emp)


def test_sample_labels_causal_and_classification():
    model = tiny_llama_lora(seed=0).eval()
    batch = make_batch("llama", B=3, T=8, seed=4)
    out = sample_labels(model, batch, seed=1)
    ignore = batch["labels"] == -100
    assert torch.equal(out["labels"][ignore], batch["labels"][ignore])
    assert torch.equal(out["labels"][:, 0], batch["labels"][:, 0])  # position 0 is never a target
    assert torch.equal(sample_labels(model, batch, seed=1)["labels"], out["labels"])
    rob = tiny_roberta_lora(seed=0).eval()
    cls = make_batch("roberta", B=5, T=6, seed=2)
    drawn = sample_labels(rob, cls, seed=0)["labels"]
    assert drawn.shape == cls["labels"].shape and drawn.dtype == cls["labels"].dtype and (drawn < 3).all()
    with pytest.raises(ValueError, match="fisher='empirical'"):
        sample_labels(tiny_roberta_lora(seed=0, num_labels=1).eval(), make_batch("roberta", B=2, num_labels=1), seed=0)


@pytest.mark.parametrize("method,passes", [("kfac", 1), ("ekfac", 2)])
def test_passes_over_the_training_gradients(method, passes):
    """kfac reads G only to score (its factors come from the capture); ekfac once more to fit Λ*."""
    toks, keep = _tokens()
    m, src = _fit(method, toks, keep)
    count = 0
    chunks = src.chunks

    def counting(names=None, start=0):
        nonlocal count
        count += 1
        return chunks(names, start=start)

    src.chunks = counting
    m.fit(src).influence(_queries())
    assert count == passes


def test_ekfac_true_fisher_fits_eigenvalues_on_sampled_gradients(llama):
    """fisher="true": Λ* = (1/n) Σ_i (Q_Rᵀ g̃_i Q_C)² over the gradients g̃ of labels drawn from the model."""
    model, train, queries = llama
    att = Attributor(model, method="ekfac", fisher="true", seed=2, progress=False).fit(train)
    m = att.analysis.method
    with GradientCapture(model, blocks="lora") as cap:
        drawn = [cap(sample_labels(model, b, 2)) for b in train]
    for gi, g in enumerate(m.groups):
        G = torch.stack([torch.cat([d[name] for d in drawn]) for name in g.names]).double()  # (b, n, rows, cols)
        QR, QC = m.basis_rows[gi].double(), m.basis_cols[gi].double()
        ref = (QR.mT.unsqueeze(1) @ G @ QC.unsqueeze(1)).square().mean(dim=1)
        assert _rel(m.eigenvalues[gi], ref) < 1e-5
    emp = Attributor(model, method="ekfac", progress=False).fit(train)
    assert not torch.equal(att.score(queries), emp.score(queries))
