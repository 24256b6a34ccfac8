"""Per-token scores (`Attributor.token_scores`, `pyinf.token_scores`) on the tiny Llama.

References, from autograd with one sample at a time:
- per position: each LoRA matrix gets a zero per-position copy Δ (T, out, in) added to its output
  (`x_t Δ_tᵀ`), so dL/dΔ_t is the gradient of the weight as used at position t; the token's score
  is −Σ_b ⟨h_b, dL/dΔ_t⟩ (what `token_scores` computes, from the captured factors);
- per loss term: the gradient of each token's own loss term ℓ_t (the next-token cross-entropy of
  logits t, over the sample's N targets); equal to the per-position share for the last layer's
  q_proj, and not for earlier blocks (the module docstring says why).
"""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

from pyinf.attributor import Attributor
from pyinf.losses import default_loss
from pyinf.methods import METHODS
from pyinf.token_scores import bilinear

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # tiny_models, test_attributor under --import-mode=importlib
from test_attributor import BATCH, OPTIONS, Setup  # noqa: E402
from tiny_models import lora_modules, make_batch, sample  # noqa: E402

LAST_Q = "base_model.model.model.layers.1.self_attn.q_proj"
FIRST_V = "base_model.model.model.layers.0.self_attn.v_proj"


@pytest.fixture(scope="module")
def setup():
    return Setup()


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _data(setup, padding_side="right"):
    train = [make_batch("llama", B=4, T=8, seed=i, padding_side=padding_side) for i in range(0, 10, 4)]
    train[-1] = {k: v[:2] for k, v in train[-1].items()}  # 10 samples: batches 4, 4, 2
    return train, setup.train(3, 3, seed=1)


def _preconditioned(att, queries):
    return att.analysis.method.precondition(att.query_grads(queries))


def _per_position_reference(model, batches, H):
    """(m, n, T) float64: −Σ_b ⟨h_b, dL_i/dΔ_bt⟩ with a zero per-position copy Δ_b of every LoRA matrix."""
    mods = lora_modules(model)
    was = model.training
    model.eval()
    out = []
    try:
        for batch in batches:
            T = batch["input_ids"].shape[1]
            for i in range(batch["input_ids"].shape[0]):
                deltas, handles = {}, []
                for name, (lin, _) in mods.items():
                    d = torch.zeros(T, *lin.weight.shape, requires_grad=True)
                    deltas[name] = d
                    handles.append(lin.register_forward_hook(
                        lambda mod, args, y, d=d: y + torch.einsum("bti,toi->bto", args[0], d)))
                try:
                    loss = default_loss(model, sample(batch, i)).sum()
                    grads = torch.autograd.grad(loss, list(deltas.values()))
                finally:
                    for h in handles:
                        h.remove()
                s = 0
                for (name, (_, tr)), g in zip(mods.items(), grads):
                    h = H[name].double().reshape(H[name].shape[0], -1)  # the block is named by its module
                    g = (g.transpose(1, 2) if tr else g).reshape(T, -1).double()
                    s = s - h @ g.T  # (m, T)
                out.append(s)
    finally:
        model.train(was)
    return torch.stack(out, dim=1)


def _loss_term_reference(model, batches, H, names):
    """(m, n, T) float64: −Σ_b ⟨h_b, ∇ ℓ_t / N⟩ for each next-token loss term, logits position t."""
    mods = {n: m for n, m in lora_modules(model).items() if any(n.startswith(p) for p in names)}
    was = model.training
    model.eval()
    out = []
    try:
        for batch in batches:
            for i in range(batch["input_ids"].shape[0]):
                one = sample(batch, i)
                logits = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits[0].float()
                labels, mask = one["labels"][0], one["attention_mask"][0]
                T = labels.shape[0]
                valid = [t for t in range(T - 1) if labels[t + 1] != -100 and mask[t] and mask[t + 1]]
                terms = {t: F.cross_entropy(logits[t], labels[t + 1]) / len(valid) for t in valid}
                assert torch.allclose(sum(terms.values()), default_loss(model, one)[0], rtol=1e-5)
                s = torch.zeros(next(iter(H.values())).shape[0], T, dtype=torch.float64)
                for t, term in terms.items():
                    grads = torch.autograd.grad(term, [m.weight for m, _ in mods.values()], retain_graph=True)
                    for (name, (_, tr)), g in zip(mods.items(), grads):
                        h = H[name].double().reshape(H[name].shape[0], -1)
                        s[:, t] -= h @ (g.t() if tr else g).reshape(-1).double()
                out.append(s)
    finally:
        model.train(was)
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:lissa.*did not reach")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_tokens_sum_to_the_sample_scores(setup, method):
    train, queries = _data(setup)
    att = Attributor(setup.model, method=method, chunk_size=BATCH, progress=False, **OPTIONS.get(method, {}))
    S = att.fit(train).score(queries)
    tok = att.token_scores(queries, train)
    assert tok.shape == (3, 10, 8) and tok.dtype == torch.float32
    assert _rel(tok.sum(dim=-1), S) < 1e-5, _rel(tok.sum(dim=-1), S)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_tokens_equal_the_per_position_autograd_reference(setup, padding_side):
    train, queries = _data(setup, padding_side)
    att = Attributor(setup.model, method="datainf", chunk_size=BATCH, progress=False).fit(train)
    tok = att.token_scores(queries, train)
    ref = _per_position_reference(setup.model, train, _preconditioned(att, queries))
    assert _rel(tok, ref) < 1e-5, _rel(tok, ref)
    pads = torch.cat([b["attention_mask"] for b in train]) == 0
    assert (tok[:, pads] == 0).all()  # a causal LM's loss never reads a pad: its share is 0


def test_last_layer_q_proj_shares_are_the_loss_terms(setup):
    """The last layer's q_proj at position t reaches only the loss at t: per-position = per-loss-term.
    v_proj of the first layer reaches every later loss: the two differ there, with the same sums."""
    train, queries = _data(setup)
    for blocks, equal in (([LAST_Q], True), ([FIRST_V], False)):
        att = Attributor(setup.model, blocks=blocks, chunk_size=BATCH, progress=False).fit(train)
        tok = att.token_scores(queries, train).double()
        ref = _loss_term_reference(setup.model, train, _preconditioned(att, queries), blocks)
        assert _rel(tok.sum(-1), ref.sum(-1)) < 1e-5
        assert (_rel(tok, ref) < 1e-5) == equal, (blocks, _rel(tok, ref))


def test_mask_padding_and_other_train_data(setup):
    """mask_padding drops pads (their shares are 0 anyway for a causal LM); train_data need not be the
    fitted set: its token sums are the scores of those sequences (influence of new training data)."""
    train, queries = _data(setup, "left")
    att = Attributor(setup.model, chunk_size=BATCH, progress=False, mask_padding=True).fit(train)
    new = [make_batch("llama", B=3, T=6, seed=77), make_batch("llama", B=2, T=9, seed=78)]
    tok = att.token_scores(queries, new)
    assert tok.shape == (3, 5, 9) and (tok[:, :3, 6:] == 0).all()  # the T=6 batch, padded to 9
    H = _preconditioned(att, queries)
    ref = torch.cat([_per_position_reference(setup.model, [b], H).sum(-1) for b in new], dim=1)
    assert _rel(tok.sum(-1), ref) < 1e-5


def test_refusals(setup):
    train, queries = _data(setup)
    fwd = Attributor(setup.model, method="forward", lr=1e-3, progress=False).fit(train[:1])
    with pytest.raises(ValueError, match="not available for method 'forward'"):
        fwd.token_scores(queries, train)
    emb = Attributor(setup.model, blocks=["base_model.model.model.embed_tokens"], progress=False).fit(train[:1])
    with pytest.raises(ValueError, match="embedding blocks are not implemented"):
        emb.token_scores(queries, train[:1])
    att = Attributor(setup.model, progress=False).fit(train[:1])
    with pytest.raises(ValueError, match="input_ids or attention_mask"):
        att.token_scores(queries, [{"labels": train[0]["labels"]}])


@pytest.mark.parametrize("R,C", [(3, 11), (11, 3)])
def test_bilinear_against_einsum(R, C):
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, 5, R, generator=g, dtype=torch.float64), torch.randn(2, 5, C, generator=g, dtype=torch.float64)
    H = torch.randn(4, R, C, generator=g, dtype=torch.float64)
    ref = torch.einsum("btr,mrc,btc->mbt", u, H, v)
    assert torch.allclose(bilinear(u, H, v), ref, rtol=1e-12, atol=1e-12)
