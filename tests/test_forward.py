"""Forward-INF (`pyinf.forward`, `Attributor(method="forward")`) on tiny PEFT models, CPU.

* small lr, SGD: the scores agree with tracin's −⟨v_j, g_i⟩ (Pearson ≥ 0.99, same scale);
* the k-queries-per-pass path (grouped forward, bmm or the Triton kernel under
  the interpreter) gives the training losses of the one-query-at-a-time path
  (the model's own weights set to θ'_j) to 1e-5 relative, fp32, for LoRA
  blocks, A-only blocks and a plain nn.Linear block, with the query count not a
  multiple of k or of the query batch size;
* the model's weights are restored bit for bit, and its training / requires_grad
  / .grad state too, also when a pass fails;
* Adam runs (and its doc says what it is); bad options are ValueErrors.
"""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

import pyinf
from pyinf import forward as fwd
from pyinf.attributor import Attributor, TopK
from pyinf.forward import ForwardInfluence, forward_influence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # tiny_models, under --import-mode=importlib
from tiny_models import make_batch, roberta_head_block, tiny_llama_lora, tiny_roberta_lora  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return tiny_llama_lora(seed=0)  # training mode, LoRA dropout 0.1: the passes must turn it off


def _train(n=10, B=4, seed=0, kind="llama"):
    return [make_batch(kind, B=min(B, n - i), T=8, seed=1000 * seed + i) for i in range(0, n, B)]


def _queries(kind="llama"):
    return [make_batch(kind, B=3, T=7, seed=501), make_batch(kind, B=2, T=8, seed=502)]  # m = 5


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training) for m in model.modules()],
            [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()])


def _assert_restored(model, snap):
    sd, training, flags = snap
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in sd.items()), "weights not restored bit for bit"
    assert [m.training for m in model.modules()] == training
    for p, (f, g) in zip(model.parameters(), flags):
        assert p.requires_grad == f
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def _rel(a, b):
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-30)).max())


def test_small_lr_agrees_with_tracin(llama):
    train, queries = _train(), _queries()
    tracin = Attributor(llama, method="tracin", store="cpu", progress=False).fit(train).score(queries)
    got = forward_influence(llama, train, queries, lr=1e-3, progress=False)
    assert got.shape == (5, 10) and got.dtype == torch.float32
    pearson = float(torch.corrcoef(torch.stack([got.flatten(), tracin.flatten()]))[0, 1])
    assert pearson >= 0.99, pearson
    assert 0.9 < float(got.norm() / tracin.norm()) < 1.1  # same sign and scale: ≈ −⟨v_j, g_i⟩


@pytest.mark.parametrize("case", ["lora", "lora_A_only", "steps2_k2", "triton"])
def test_grouped_equals_one_at_a_time(llama, case):
    train, queries = _train(), _queries()
    kw = dict(lr=1e-2, progress=False)
    if case == "lora_A_only":
        kw["blocks"] = [n for n, _ in llama.named_modules() if n.endswith("v_proj.lora_A.default")]
    if case == "steps2_k2":
        kw["steps"] = 2
    snap = _snapshot(llama)
    one = ForwardInfluence(llama, queries_per_pass=1, **kw).fit(train)
    L1 = one.perturbed_losses(queries)
    _assert_restored(llama, snap)
    k = 2 if case == "steps2_k2" else 4  # m = 5: one full pass and a remainder; k spans query batches
    if case == "triton":
        pytest.importorskip("triton")
        kw["use_triton"] = True  # the grouped_lora kernel, under TRITON_INTERPRET=1
    many = ForwardInfluence(llama, queries_per_pass=k, **kw).fit(train)
    Lk = many.perturbed_losses(queries)
    _assert_restored(llama, snap)
    assert many.last_queries_per_pass == k
    assert torch.equal(one.base_losses, many.base_losses)
    assert _rel(Lk, L1) < 1e-5
    assert not torch.equal(L1, one.base_losses.expand_as(L1))  # the steps did move the losses


def test_plain_linear_block_roberta():
    model = tiny_roberta_lora(seed=0)
    train, queries = _train(kind="roberta"), _queries(kind="roberta")
    head = roberta_head_block(model)
    blocks = [head, [n for n, _ in model.named_modules() if n.endswith("layer.1.attention.self.query")][0]]
    snap = _snapshot(model)
    L1 = ForwardInfluence(model, lr=1e-2, blocks=blocks, queries_per_pass=1, progress=False).fit(train).perturbed_losses(queries)
    Lk = ForwardInfluence(model, lr=1e-2, blocks=blocks, queries_per_pass=3, progress=False).fit(train).perturbed_losses(queries)
    _assert_restored(model, snap)
    assert _rel(Lk, L1) < 1e-5
    # and the head alone agrees with tracin at a small lr
    tr = Attributor(model, method="tracin", blocks=[head], store="cpu", progress=False).fit(train).score(queries)
    got = forward_influence(model, train, queries, lr=1e-3, blocks=[head], progress=False)
    assert float(torch.corrcoef(torch.stack([got.flatten(), tr.flatten()]))[0, 1]) >= 0.99


def test_adam_runs_and_is_documented(llama):
    train, queries = _train(n=6), _queries()
    snap = _snapshot(llama)
    e1 = ForwardInfluence(llama, lr=1e-2, optimizer="adam", steps=2, queries_per_pass=1, progress=False).fit(train)
    ek = ForwardInfluence(llama, lr=1e-2, optimizer="Adam", steps=2, queries_per_pass=3, progress=False).fit(train)
    L1, Lk = e1.perturbed_losses(queries), ek.perturbed_losses(queries)
    _assert_restored(llama, snap)
    assert _rel(Lk, L1) < 1e-5
    assert torch.isfinite(ek.score(queries)).all()
    doc = fwd.__doc__.lower()
    assert "adam" in doc and "sign" in doc and "not an influence estimate" in doc
    assert "adam" in forward_influence.__doc__.lower() and "sign-like" in forward_influence.__doc__


def test_attributor_route(llama):
    train, queries = _train(), _queries()
    att = Attributor(llama, method="forward", lr=1e-3, queries_per_pass=4, progress=False).fit(train)
    assert att.n == 10 and len(att.blocks) == 8
    s = att.score(queries)
    assert torch.equal(s, forward_influence(llama, train, queries, lr=1e-3, queries_per_pass=4, progress=False))
    top = att.score(queries, top_k=3)
    assert isinstance(top, TopK) and torch.equal(top.harmful_indices, Attributor.top_k(s, 3, helpful=False)[1])
    with pytest.raises(ValueError, match="forward"):
        att.self_influence()
    with pytest.raises(ValueError, match="forward"):
        att.save("unused.pt")
    assert "forward_influence" in pyinf.__all__


def test_restored_after_a_failing_pass(llama):
    snap = _snapshot(llama)
    calls = {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] > 4:  # base losses, then fail inside the perturbed passes
            raise RuntimeError("boom")
        return fwd.default_loss(model, batch)

    for k in (1, 3):
        calls["n"] = 0
        eng = ForwardInfluence(llama, lr=1e-2, loss=flaky, queries_per_pass=k, progress=False).fit(_train(n=4))
        with pytest.raises(RuntimeError, match="boom"):
            eng.score(_queries())
        _assert_restored(llama, snap)
        assert not any("forward" in m.__dict__ for m in llama.modules())  # the grouped forwards are removed


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(lr=-1e-3), dict(lr=float("nan")), dict(lr=float("inf")),
                                 dict(lr=True), dict(lr=1e-3, steps=0), dict(lr=1e-3, steps=1.5),
                                 dict(lr=1e-3, optimizer="rmsprop"), dict(lr=1e-3, queries_per_pass=0)])
def test_bad_options(llama, bad):
    with pytest.raises(ValueError):
        forward_influence(llama, _train(n=2), _queries(), progress=False, **bad)
    with pytest.raises(ValueError):
        Attributor(llama, method="forward", **bad)


def test_attributor_option_errors(llama):
    with pytest.raises(ValueError, match="lr"):
        Attributor(llama, method="forward")
    with pytest.raises(ValueError, match="unknown option"):
        Attributor(llama, method="forward", lr=1e-3, iterations=3)
