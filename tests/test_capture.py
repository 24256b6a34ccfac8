"""Per-sample LoRA gradient capture (pyinf.capture) and the default loss (pyinf.losses).

Tiny random-weight transformers + PEFT models (tests/tiny_models.py); the
reference is one `torch.autograd.grad` per sample with batch size 1.
"""
from __future__ import annotations

import os
import pathlib
import sys
import types
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tiny_models as tm  # noqa: E402

from pyinf.blocks import Block  # noqa: E402
from pyinf.capture import GradientCapture, per_sample_grads  # noqa: E402
from pyinf.losses import default_loss  # noqa: E402

# peft reads transformers' deprecated `is_gradient_checkpointing`
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

RTOL = 1e-5


def _build(kind: str, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tm.tiny_llama_lora(seed) if kind == "llama" else tm.tiny_roberta_lora(seed)


_CACHE: dict = {}


def model_for(kind: str):
    """A fresh deep copy of a cached tiny model (building one costs ~0.1 s)."""
    import copy

    if kind not in _CACHE:
        _CACHE[kind] = _build(kind)
    return copy.deepcopy(_CACHE[kind])


HEAD = "base_model.model.classifier.modules_to_save.default."  # RoBERTa's trainable classifier copy


def ref_modules(model, kind: str) -> dict:
    """What blocks="lora" captures: the LoRA A/B, and RoBERTa's classifier head (modules_to_save)."""
    mods = tm.lora_modules(model)
    if kind == "roberta":
        for n, p in model.named_parameters():
            if n.startswith(HEAD):
                mods[n[: -len(".weight")] if n.endswith(".weight") else n] = (p, False)
    return mods


def blocks_for(model, kind: str):
    return ["lora"]


def assert_close_per_sample(got: dict, ref: dict, rtol: float = RTOL) -> None:
    assert list(got) == list(ref)
    for name in ref:
        g, r = got[name], ref[name]
        assert g.shape == r.shape, (name, g.shape, r.shape)
        assert g.dtype == torch.float32
        rn = r.flatten(1).norm(dim=1)
        assert bool((rn > 0).all()), f"{name}: a zero reference gradient makes the test weak"
        err = (g - r).flatten(1).norm(dim=1) / rn
        assert float(err.max()) <= rtol, f"{name}: per-sample relative error {err.tolist()}"


# --------------------------------------------------------------------------- #
# blocks
# --------------------------------------------------------------------------- #
def test_llama_block_names_and_shapes():
    model = model_for("llama")
    with GradientCapture(model) as cap:
        names = [b.name for b in cap.blocks]
        assert all(isinstance(b, Block) for b in cap.blocks)
    expected = []
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            for ab in ("lora_A", "lora_B"):
                expected.append(f"base_model.model.model.layers.{layer}.self_attn.{proj}.{ab}.default")
    assert names == expected
    shapes = {b.name: (b.rows, b.cols) for b in cap.blocks}
    p = "base_model.model.model.layers.0.self_attn."
    assert shapes[p + "q_proj.lora_A.default"] == (4, 32)  # (r, d_in)
    assert shapes[p + "q_proj.lora_B.default"] == (4, 32)  # (r, d_out), transposed
    assert shapes[p + "v_proj.lora_A.default"] == (4, 32)
    assert shapes[p + "v_proj.lora_B.default"] == (4, 16)  # v_proj: 32 -> 16 (2 kv heads)


def test_roberta_blocks_with_plain_head():
    model = model_for("roberta")
    head = tm.roberta_head_block(model)
    # "lora" includes the classifier head PEFT trains through modules_to_save (weights and biases)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every trainable parameter is attributed: no warning
        with GradientCapture(model, blocks=["lora", head + ".weight"]) as cap:
            assert len(cap.blocks) == 12
            assert cap.blocks[8:] == [Block(HEAD + "dense", 32, 32), Block(HEAD + "dense.bias", 1, 32),
                                      Block(head, 3, 32), Block(head + ".bias", 1, 3)]  # nn.Linear: (out, in)
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            assert {id(t.param) for t in cap._targets} == trainable
    # naming a LoRA layer expands to its A and B; naming lora_B keeps the transpose
    q = "base_model.model.roberta.encoder.layer.1.attention.self.query"
    with GradientCapture(model, blocks=[q, q + ".lora_B.default", head]) as cap:
        assert [b.name for b in cap.blocks] == [q + ".lora_A.default", q + ".lora_B.default", head]


# --------------------------------------------------------------------------- #
# per-sample gradients == batch-size-1 autograd
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["llama", "roberta"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_batch_size_one_autograd(kind, padding_side):
    model = model_for(kind)
    assert model.training  # handed over in training mode with LoRA dropout 0.1
    batch = tm.make_batch(kind, B=4, T=9, padding_side=padding_side, seed=1)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # uneven lengths
    grads = per_sample_grads(model, batch, blocks=blocks_for(model, kind))
    ref = tm.single_sample_grads(model, batch, ref_modules(model, kind))
    assert_close_per_sample(grads, ref)
    # dropout off: a second capture is bit-identical
    again = per_sample_grads(model, batch, blocks=blocks_for(model, kind))
    assert all(torch.equal(grads[k], again[k]) for k in grads)


@pytest.mark.parametrize("kind,padding_side", [("llama", "right"), ("llama", "left"), ("roberta", "right")])
def test_padding_adds_nothing(kind, padding_side):
    """Against each sample alone WITHOUT its padding (left-padded Llama with position ids)."""
    model = model_for(kind)
    batch = tm.make_batch(kind, B=3, T=8, padding_side=padding_side, seed=2,
                          position_ids=(kind == "llama" and padding_side == "left"))
    grads = per_sample_grads(model, batch, blocks=blocks_for(model, kind))
    ref = tm.single_sample_grads(model, batch, ref_modules(model, kind), trim=True)
    assert_close_per_sample(grads, ref, rtol=1e-5)


def test_mask_padding_option():
    # where the loss never reads a pad, masking is a no-op ...
    model = model_for("llama")
    batch = tm.make_batch("llama", B=3, T=8, padding_side="left", seed=3)
    plain = per_sample_grads(model, batch)
    masked = per_sample_grads(model, batch, mask_padding=True)
    assert_close_per_sample(masked, plain, rtol=1e-6)
    # ... but left-padded Roberta classifies from position 0, a pad: masking it
    # is not the gradient any more (which is why it is off by default).
    model = model_for("roberta")
    batch = tm.make_batch("roberta", B=3, T=8, padding_side="left", seed=3)
    exact = per_sample_grads(model, batch)
    masked = per_sample_grads(model, batch, mask_padding=True)
    q = "base_model.model.roberta.encoder.layer.1.attention.self.query.lora_A.default"
    padded = batch["attention_mask"][:, 0] == 0
    assert bool(padded.any())
    assert not torch.allclose(exact[q][padded], masked[q][padded])
    assert torch.allclose(exact[q][~padded], masked[q][~padded], rtol=1e-6, atol=0)


def test_lora_scaling_is_inside():
    """The LoRA scaling s is part of the graph, so it is inside e: with s tripled the
    captured gradients still match autograd (and differ from the unscaled ones)."""
    model = model_for("llama")
    batch = tm.make_batch("llama", B=2, T=6, seed=4)
    before = per_sample_grads(model, batch)
    for mod in model.modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            mod.scaling["default"] *= 3.0
    grads = per_sample_grads(model, batch)
    assert_close_per_sample(grads, tm.single_sample_grads(model, batch, ref_modules(model, "llama")))
    k = next(iter(grads))
    assert not torch.allclose(grads[k], before[k])


def test_user_loss_overrides_default():
    model = model_for("llama")
    batch = tm.make_batch("llama", B=3, T=7, seed=5)

    def summed_loss(m, b):  # a different per-sample loss: sum, not mean, of the token losses
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        lg, tgt = out.logits[:, :-1], b["labels"][:, 1:]
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none", ignore_index=-100)
        return ce.view(tgt.shape).sum(1)

    grads = per_sample_grads(model, batch, loss=summed_loss)
    ref = tm.single_sample_grads(model, batch, ref_modules(model, "llama"), loss=summed_loss)
    assert_close_per_sample(grads, ref)
    default = per_sample_grads(model, batch)
    k = next(iter(grads))
    assert not torch.allclose(grads[k], default[k])


def test_last_sq_norms_and_reuse():
    model = model_for("roberta")
    cap = GradientCapture(model, blocks=blocks_for(model, "roberta"))
    for seed in (6, 7):  # the same capture, two batches of different sizes
        batch = tm.make_batch("roberta", B=2 + seed - 6, T=7, seed=seed)
        grads = cap(batch)
        assert set(cap.last_sq_norms) == set(grads)
        for k, g in grads.items():
            assert cap.last_sq_norms[k].shape == (g.shape[0],)
            torch.testing.assert_close(cap.last_sq_norms[k], g.pow(2).sum((1, 2)))
    cap.close()
    with pytest.raises(RuntimeError, match="closed"):
        cap(batch)


def test_inside_no_grad_and_inference_mode():
    model = model_for("llama")
    batch = tm.make_batch("llama", B=2, T=6, seed=8)
    ref = per_sample_grads(model, batch)
    with torch.no_grad():
        assert_close_per_sample(per_sample_grads(model, batch), ref, rtol=0)


# --------------------------------------------------------------------------- #
# default loss
# --------------------------------------------------------------------------- #
class _FakeForCausalLM(torch.nn.Module):
    """Returns fixed logits, so the loss's token selection can be checked by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return types.SimpleNamespace(logits=self.logits)


def test_default_loss_left_padding_never_predicts_from_a_pad():
    torch.manual_seed(0)
    V = 11
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = ids.clone()  # deliberately NOT -100 at the pads: the mask alone must decide
    logits = torch.randn(2, 5, V)
    loss = default_loss(_FakeForCausalLM(logits), {"input_ids": ids, "attention_mask": mask, "labels": labels})

    def ce(b, t):  # logits at t-1 predict the token at t
        return F.cross_entropy(logits[b, t - 1][None], labels[b, t][None])

    # left padded: token 2 (first real) would be predicted by the pad at 1 -> excluded
    expected0 = (ce(0, 3) + ce(0, 4)) / 2
    # right padded: pads are never targets
    expected1 = (ce(1, 1) + ce(1, 2)) / 2
    torch.testing.assert_close(loss, torch.stack([expected0, expected1]))

    # -100 labels are skipped too; a sample without targets has loss 0
    labels2 = labels.clone()
    labels2[0, 4] = -100
    labels2[1] = -100
    loss2 = default_loss(_FakeForCausalLM(logits), {"input_ids": ids, "attention_mask": mask, "labels": labels2})
    torch.testing.assert_close(loss2, torch.stack([ce(0, 3), torch.tensor(0.0)]))


def test_default_loss_left_padding_equals_unpadded_llama():
    model = model_for("llama").eval()
    batch = tm.make_batch("llama", B=3, T=8, padding_side="left", seed=9, position_ids=True)
    with torch.no_grad():
        batched = default_loss(model, batch)
        alone = torch.cat([default_loss(model, tm.sample(batch, i, trim=True)) for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_default_loss_classification_and_regression():
    model = model_for("roberta").eval()
    batch = tm.make_batch("roberta", B=3, T=6, seed=10)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(default_loss(model, batch), F.cross_entropy(logits, batch["labels"], reduction="none"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = tm.tiny_roberta_lora(0, num_labels=1).eval()
    batch = tm.make_batch("roberta", B=3, T=6, seed=10, num_labels=1)
    with torch.no_grad():
        out = reg(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        torch.testing.assert_close(default_loss(reg, batch), (out - batch["labels"]) ** 2)


# --------------------------------------------------------------------------- #
# model state
# --------------------------------------------------------------------------- #
def test_model_state_restored():
    model = model_for("llama")
    # an unusual state to restore: mixed training flags, odd requires_grad, existing .grad
    lm_head = model.get_base_model().lm_head
    lm_head.eval()
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    a0 = next(n for n in names if n.endswith("q_proj.lora_A.default.weight"))
    params[a0].requires_grad_(False)
    norm = next(n for n in names if n.endswith("input_layernorm.weight"))
    params[norm].requires_grad_(True)
    b0 = next(n for n in names if n.endswith("v_proj.lora_B.default.weight"))
    params[b0].grad = torch.full_like(params[b0], 7.0)
    params[norm].grad = torch.full_like(params[norm], 3.0)
    grad_objs = {n: p.grad for n, p in params.items()}
    training = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in params.items()}
    weights = {n: p.detach().clone() for n, p in params.items()}

    with pytest.warns(UserWarning, match=r"not attributed .*input_layernorm\.weight \(LlamaRMSNorm"):
        cap = GradientCapture(model)  # the trainable norm is named, not silently left out
    cap(tm.make_batch("llama", B=3, T=6, seed=11))
    assert {n: m.training for n, m in model.named_modules()} == training
    assert {n: p.requires_grad for n, p in params.items()} == flags
    for n, p in params.items():
        assert p.grad is grad_objs[n], n
        assert torch.equal(p.detach(), weights[n]), n  # bit-identical
    assert torch.equal(params[b0].grad, torch.full_like(params[b0], 7.0))
    assert torch.equal(params[norm].grad, torch.full_like(params[norm], 3.0))
    hooked = [m for m in model.modules() if m._forward_hooks]
    assert hooked  # hooks live until close ...
    cap.close()
    assert not [m for m in model.modules() if m._forward_hooks]  # ... and no longer

    # the state is also restored when the loss raises
    def bad_loss(m, b):
        m(input_ids=b["input_ids"])
        raise KeyError("boom")

    with pytest.warns(UserWarning, match="not attributed"), GradientCapture(model, loss=bad_loss) as cap, \
            pytest.raises(KeyError):
        cap(tm.make_batch("llama", B=2, T=5, seed=12))
    assert {n: m.training for n, m in model.named_modules()} == training
    assert {n: p.requires_grad for n, p in params.items()} == flags


# --------------------------------------------------------------------------- #
# gradient checkpointing
# --------------------------------------------------------------------------- #
def _enable_checkpointing(model, use_reentrant: bool) -> None:
    base = model.get_base_model()
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_same_grads(use_reentrant):
    model = model_for("llama")
    batch = tm.make_batch("llama", B=3, T=7, padding_side="left", seed=13)
    plain = per_sample_grads(model, batch)
    _enable_checkpointing(model, use_reentrant)
    # count forwards of one adapter: 2 per capture proves the layer was recomputed
    lora_a = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"]
    calls = []
    h = lora_a.register_forward_hook(lambda *a: calls.append(1))
    try:
        ckpt = per_sample_grads(model, batch)
    finally:
        h.remove()
    assert len(calls) == 2, f"checkpointing did not recompute ({len(calls)} forward calls)"
    assert_close_per_sample(ckpt, plain, rtol=1e-6)
    assert model.training


# --------------------------------------------------------------------------- #
# the Triton kernel inside the capture (interpreter on CPU)
# --------------------------------------------------------------------------- #
def test_capture_with_triton_kernel(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    import pyinf.capture as capture

    kmod = tm.load_kernel_module()
    monkeypatch.setattr(capture, "_load_kernel", lambda: kmod.per_sample_outer)
    model = model_for("roberta")
    batch = tm.make_batch("roberta", B=3, T=6, padding_side="right", seed=14)
    blocks = blocks_for(model, "roberta")
    ref = per_sample_grads(model, batch, blocks=blocks)
    with GradientCapture(model, blocks=blocks, use_triton=True) as cap:
        got = cap(batch)
        norms = cap.last_sq_norms
    assert_close_per_sample(got, ref, rtol=1e-5)
    for k in got:
        torch.testing.assert_close(norms[k], ref[k].pow(2).sum((1, 2)), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
def test_unknown_block_name_lists_close_matches():
    model = model_for("llama")
    with pytest.raises(ValueError, match=r"unknown block .*close matches.*q_proj\.lora_A\.default"):
        GradientCapture(model, blocks=["base_model.model.model.layers.0.self_attn.q_proj.lora_AA.default"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        GradientCapture(model, blocks=["base_model.model.model.layers.0.self_attn"])


def test_model_without_lora():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="no LoRA adapters found; pass blocks="):
        GradientCapture(plain)
    # plain nn.Linear blocks work without any adapter
    batch = tm.make_batch("llama", B=2, T=5, seed=15)
    grads = per_sample_grads(plain, batch, blocks=["lm_head"])
    assert grads["lm_head"].shape == (2, 97, 32)


def test_batch_without_labels_and_bad_losses():
    model = model_for("llama")
    batch = tm.make_batch("llama", B=2, T=5, seed=16)
    batch.pop("labels")
    with pytest.raises(ValueError, match="labels.*loss="):
        per_sample_grads(model, batch)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        per_sample_grads(model, batch, loss=lambda m, b: m(input_ids=b["input_ids"]).logits.sum())
    with pytest.raises(TypeError, match="mapping"):
        per_sample_grads(model, [batch["input_ids"]])
    assert model.training


def test_bf16_model_gives_fp32_grads():
    """A bf16 model: float32 gradients close to the same model's batch-size-1 bf16 autograd."""
    model = model_for("llama").to(torch.bfloat16)
    batch = tm.make_batch("llama", B=3, T=7, padding_side="left", seed=17)
    grads = per_sample_grads(model, batch)
    ref = tm.single_sample_grads(model, batch, ref_modules(model, "llama"))
    for k, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        err = (g - ref[k]).flatten(1).norm(dim=1) / ref[k].flatten(1).norm(dim=1)
        assert float(err.max()) < 5e-2, (k, err.tolist())


def test_weight_plus_bias_block_is_the_joined_gradient():
    """"<module>+bias": [W | b] (nn.Linear) or [W; b] (Conv1D) as one block, the two gradients side by side."""
    from transformers.pytorch_utils import Conv1D

    model = model_for("roberta")
    batch = tm.make_batch("roberta", B=3, T=6, seed=21)
    dense = HEAD + "dense"
    sep = per_sample_grads(model, batch, blocks=[dense, dense + ".bias"])
    joined = per_sample_grads(model, batch, blocks=[dense + "+bias"])[dense + "+bias"]
    assert joined.shape == (3, 32, 33)
    assert torch.equal(joined[:, :, :32], sep[dense]) and torch.allclose(joined[:, :, 32], sep[dense + ".bias"][:, 0])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Conv1D(4, 5)  # (in 5, out 4)

        def forward(self, x):
            return self.c(x).sum(-1).sum(-1)

    net = Net()
    x = torch.randn(2, 3, 5)
    g = per_sample_grads(net, {"x": x}, blocks=["c+bias"], loss=lambda m, b: m(b["x"]))["c+bias"]
    ref = per_sample_grads(net, {"x": x}, blocks=["c", "c.bias"], loss=lambda m, b: m(b["x"]))
    assert g.shape == (2, 6, 4)
    assert torch.allclose(g[:, :5], ref["c"]) and torch.allclose(g[:, 5], ref["c.bias"][:, 0])
    with pytest.raises(ValueError, match="both hold the weight"):
        GradientCapture(model, blocks=[dense, dense + "+bias"])
    q = "base_model.model.roberta.encoder.layer.1.attention.self.query"
    with pytest.raises(ValueError, match=r"'\+bias' takes an nn.Linear"):
        GradientCapture(model, blocks=[q + "+bias"])
    nobias = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    with pytest.raises(ValueError, match="has no bias"):
        GradientCapture(nobias, blocks=["0+bias"])
    from pyinf.forward import _plan

    with pytest.raises(ValueError, match="Forward-INF moves parameters"):
        _plan(model, [dense + "+bias"])
