"""Forward-INF (`pyinf.forward`, `Attributor(method="forward")`) on tiny PEFT models, CPU.

* small lr, SGD: the scores agree with tracin's −⟨v_j, g_i⟩ (Pearson ≥ 0.99, same scale);
* the k-queries-per-pass path (grouped forward, bmm or the Triton kernel under
  the interpreter) gives the scores of the one-query-at-a-time path (the
  model's own weights set to θ'_j), fp32, for LoRA blocks, A-only blocks and a
  plain nn.Linear block, with the query count not a multiple of k or of the
  query batch size;
* a query with no target token (zero gradient, θ' = θ) scores exactly 0 on
  every path, fp32 and bf16: the base and perturbed losses come from the same
  computation;
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


# A float32 forward of these tiny models gives each loss to 1e-5 relative (~100 float32 ulps). A score is
# the difference of two losses over steps·lr, so two paths' scores of one query differ by at most
# 4 · LOSS_REL · max|ℓ| / (steps·lr); lr = 0.1 keeps that below 5% of the largest score (a query scored
# against another query's model, or a group shifted, is off by O(100%)).
LOSS_REL = 1e-5
LR = 0.1


def _assert_same_scores(got, ref, base_losses, step):
    tol = 4 * LOSS_REL * float(base_losses.abs().max()) / step
    assert tol < 0.05 * float(ref.abs().max())
    assert float((got.double() - ref.double()).abs().max()) <= tol


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
    kw = dict(lr=LR, progress=False)
    if case == "lora_A_only":
        kw["blocks"] = [n for n, _ in llama.named_modules() if n.endswith("v_proj.lora_A.default")]
    if case == "steps2_k2":
        kw["steps"] = 2
    snap = _snapshot(llama)
    one = ForwardInfluence(llama, queries_per_pass=1, **kw).fit(train)
    S1 = one.score(queries)
    _assert_restored(llama, snap)
    k = 2 if case == "steps2_k2" else 4  # m = 5: one full pass and a remainder; k spans query batches
    if case == "triton":
        pytest.importorskip("triton")
        kw["use_triton"] = True  # the grouped_lora kernel, under TRITON_INTERPRET=1
    many = ForwardInfluence(llama, queries_per_pass=k, **kw).fit(train)
    Sk = many.score(queries)
    _assert_restored(llama, snap)
    assert many.last_queries_per_pass == k
    assert torch.equal(one.base_losses, many.base_losses)
    _assert_same_scores(Sk, S1, one.base_losses, kw.get("steps", 1) * LR)


@pytest.fixture(scope="module")
def llama_scale_1p5():
    """Both dtypes, LoRA alpha 6 (scaling 1.5, not a power of two): PEFT's `B(A x) · 1.5` and the kernel's
    `(1.5 · A x) B` then round differently, which made a base loss from PEFT's forward differ from the
    perturbed ones from the grouped op even where θ' = θ."""
    return {dt: tiny_llama_lora(seed=0, dtype=dt, alpha=6) for dt in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k,use_triton", [(1, None), (4, False), (4, True)], ids=["plain", "bmm", "triton"])
def test_zero_gradient_query_scores_exactly_zero(llama_scale_1p5, dtype, k, use_triton):
    """A query with no target token has zero loss and zero gradient, so θ' = θ and its scores must be
    exactly 0: the perturbed losses go through the computation of the base ones, bit for bit."""
    if use_triton:
        pytest.importorskip("triton")
    model = llama_scale_1p5[dtype]
    queries = _queries()
    queries[0]["labels"][1] = -100  # query 1 of 5 (group 2 of the first grouped pass)
    with pytest.warns(RuntimeWarning, match="for 1 query the step left every attributed weight unchanged"):
        s = forward_influence(model, _train(), queries, lr=1e-2, queries_per_pass=k, use_triton=use_triton,
                              progress=False)
    assert torch.equal(s[1], torch.zeros_like(s[1]))
    assert (s[[0, 2, 3, 4]] != 0).any(dim=1).all()  # the other queries did move the losses


def test_plain_linear_block_roberta():
    model = tiny_roberta_lora(seed=0)
    train, queries = _train(kind="roberta"), _queries(kind="roberta")
    head = roberta_head_block(model)
    blocks = [head, [n for n, _ in model.named_modules() if n.endswith("layer.1.attention.self.query")][0]]
    snap = _snapshot(model)
    one = ForwardInfluence(model, lr=LR, blocks=blocks, queries_per_pass=1, progress=False).fit(train)
    S1 = one.score(queries)
    Sk = ForwardInfluence(model, lr=LR, blocks=blocks, queries_per_pass=3, progress=False).fit(train).score(queries)
    _assert_restored(model, snap)
    _assert_same_scores(Sk, S1, one.base_losses, LR)
    # and the head alone agrees with tracin at a small lr
    tr = Attributor(model, method="tracin", blocks=[head], store="cpu", progress=False).fit(train).score(queries)
    got = forward_influence(model, train, queries, lr=1e-3, blocks=[head], progress=False)
    assert float(torch.corrcoef(torch.stack([got.flatten(), tr.flatten()]))[0, 1]) >= 0.99


def test_adam_runs_and_is_documented(llama):
    train, queries = _train(n=6), _queries()
    snap = _snapshot(llama)
    e1 = ForwardInfluence(llama, lr=LR, optimizer="adam", steps=2, queries_per_pass=1, progress=False).fit(train)
    ek = ForwardInfluence(llama, lr=LR, optimizer="Adam", steps=2, queries_per_pass=3, progress=False).fit(train)
    S1, Sk = e1.score(queries), ek.score(queries)
    _assert_restored(llama, snap)
    assert torch.isfinite(Sk).all()
    _assert_same_scores(Sk, S1, e1.base_losses, 2 * LR)
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
