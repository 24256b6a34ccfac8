"""Per-sample gradients and losses on real transformers/PEFT architectures (tiny random configs).

The reference for every sample is one batch-size-1 `torch.autograd.grad` of
the model's OWN `outputs.loss` (the model called with `labels`) with respect
to the whole parameter: a tied weight's gradient from all of its uses. So the
tests check the capture (tied weights, GPT-2's Conv1D, modules_to_save heads,
LoRA on embeddings) and `default_loss` (causal, encoder-decoder, masked LM)
at once.

Tolerances: float32 throughout. An entry of a per-sample gradient is a sum of
at most a few hundred products (T <= 10 positions, a tied weight's few uses,
in another order than autograd's), so the two differ by ~1e-6 relative; RTOL
= 1e-4 leaves room for cancellation, while the bugs fixed here are errors of
1e-1 to 1 (a tied weight's missing uses: 52-70 %; a wrongly shifted loss).
A loss is a mean of <= 10 cross-entropies: LOSS_RTOL = 1e-5.
"""
from __future__ import annotations

import os
import pathlib
import re
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tiny_models import tiny_roberta_lora  # noqa: E402

from pyinf.capture import GradientCapture  # noqa: E402
from pyinf.losses import default_loss  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads deprecated transformers names

RTOL = 1e-4
LOSS_RTOL = 1e-5
V, PAD = 61, 0
B = 3


# --------------------------------------------------------------------------- #
# models (random weights, no downloads) and batches
# --------------------------------------------------------------------------- #
def _quiet(build):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    return _quiet(lambda: GPT2LMHeadModel(cfg))  # lm_head.weight is transformer.wte.weight


def llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    return _quiet(lambda: LlamaForCausalLM(cfg))


def peft_llama(base=None, **lora):
    """A tied Llama (or `base`) with PEFT LoRA (`lora`: LoraConfig options); every LoRA matrix made nonzero
    (PEFT zeroes a linear layer's B and an embedding's A, which would zero the other's gradient)."""
    from peft import LoraConfig, get_peft_model

    base = llama() if base is None else base
    model = _quiet(lambda: get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, **lora)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                     pad_token_id=PAD, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, scale_embedding=True)
    return _quiet(lambda: BartForConditionalGeneration(cfg))


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                   pad_token_id=PAD, eos_token_id=2, decoder_start_token_id=PAD)
    return _quiet(lambda: T5ForConditionalGeneration(cfg))


def roberta_mlm():
    from transformers import RobertaConfig, RobertaForMaskedLM

    cfg = RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return _quiet(lambda: RobertaForMaskedLM(cfg))


def _tokens(g, lengths, T, pad):
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, V, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def causal_batch(seed=0, T=8, pad=PAD):
    """Right padding (the model's own loss then counts the same targets as default_loss)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = _tokens(g, [T, 5, 6], T, pad)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def seq2seq_batch(seed=0):
    """Encoder inputs of 9 positions, decoder targets of 6 (-100 after each target's end)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = _tokens(g, [9, 5, 7], 9, PAD)
    tgt, tmask = _tokens(g, [6, 3, 4], 6, PAD)
    return {"input_ids": ids, "attention_mask": mask, "labels": tgt.masked_fill(tmask == 0, -100)}


def mlm_batch(seed=0, mask_id=3, pad=1):
    """Every third real token masked; labels only there."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = _tokens(g, [8, 5, 6], 8, pad)
    masked = (torch.arange(8) % 3 == 1)[None, :] & (mask == 1)
    return {"input_ids": ids.masked_fill(masked, mask_id), "attention_mask": mask,
            "labels": ids.masked_fill(~masked, -100)}


# --------------------------------------------------------------------------- #
# the reference: batch-size-1 autograd of the model's own loss
# --------------------------------------------------------------------------- #
def model_own(model, batch, params: dict[str, tuple[torch.Tensor, bool]]):
    """(losses (B,), {name: (B, rows, cols)}): per sample, outputs.loss and its gradient w.r.t. each whole
    parameter (transposed where asked; a 1-D one as (1, n)), the model in eval mode."""
    was = model.training
    model.eval()
    ws = [p for p, _ in params.values()]
    flags = [w.requires_grad for w in ws]
    losses, grads = [], {n: [] for n in params}
    try:
        for w in ws:
            w.requires_grad_(True)
        for i in range(batch["input_ids"].shape[0]):
            loss = model(**{k: v[i : i + 1] for k, v in batch.items()}).loss
            losses.append(loss.detach())
            gs = torch.autograd.grad(loss, ws, allow_unused=True) if params else []
            for (n, (w, tr)), gr in zip(params.items(), gs):
                gr = torch.zeros_like(w) if gr is None else gr
                grads[n].append((gr.t() if tr else gr.reshape(1, -1) if gr.dim() == 1 else gr).float())
    finally:
        for w, f in zip(ws, flags):
            w.requires_grad_(f)
        model.train(was)
    return torch.stack(losses), {n: torch.stack(v) for n, v in grads.items()}


def assert_per_sample_close(got, ref, rtol=RTOL):
    assert sorted(got) == sorted(ref)
    for n in ref:
        assert got[n].shape == ref[n].shape, (n, got[n].shape, ref[n].shape)
        rn = ref[n].flatten(1).norm(dim=1)
        assert bool((rn > 0).all()), f"{n}: a zero reference gradient makes the test weak"
        err = (got[n] - ref[n]).flatten(1).norm(dim=1) / rn
        assert float(err.max()) <= rtol, f"{n}: per-sample relative error {err.tolist()}"


def capture(model, batch, blocks):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every case here attributes all it is asked to, silently
        with GradientCapture(model, blocks=blocks) as cap:
            return cap(batch), cap


def _params(model, names_transposed):
    ps = dict(model.named_parameters(remove_duplicate=False))
    return {block: (ps[pname], tr) for block, (pname, tr) in names_transposed.items()}


# --------------------------------------------------------------------------- #
# item 5: tied weights get their whole gradient
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama_tied"])
def test_tied_lm_head_gets_the_whole_gradient(build):
    model = build()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    batch = causal_batch()
    got, cap = capture(model, batch, ["lm_head"])
    assert [(b.name, b.rows, b.cols) for b in cap.blocks] == [("lm_head", V, 32)]
    losses, ref = model_own(model, batch, _params(model, {"lm_head": ("lm_head.weight", False)}))
    assert_per_sample_close(got, ref)
    # the embedding named instead: the same parameter, the same gradient, under its own name
    emb = "transformer.wte" if build is gpt2 else "model.embed_tokens"
    got2, _ = capture(model, batch, [emb])
    torch.testing.assert_close(got2[emb], got["lm_head"], rtol=0, atol=0)


def test_tied_weight_with_a_use_pyinf_cannot_capture_is_refused():
    class Doubled(nn.Embedding):  # a forward pyinf does not know
        def forward(self, ids):
            return super().forward(ids) * 2

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = Doubled(11, 4)
            self.head = nn.Linear(4, 11, bias=False)
            self.head.weight = self.emb.weight

    with pytest.raises(ValueError, match=r"block 'head': its parameter is shared \(tied\) with \['emb'\].*'emb' "
                                         r"\(Doubled.weight\).*leave this block out"):
        GradientCapture(Tiny(), blocks=["head"])


# --------------------------------------------------------------------------- #
# item 6: GPT-2's Conv1D, PEFT's modules_to_save and embedding LoRA are attributed
# --------------------------------------------------------------------------- #
def test_gpt2_conv1d_blocks():
    model = gpt2()
    batch = causal_batch()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "transformer.h.1.mlp.c_fc.bias"]
    got, cap = capture(model, batch, names)
    # Conv1D's weight is (in, out), and so is its block: the parameter's own layout
    assert [(b.rows, b.cols) for b in cap.blocks] == [(32, 96), (128, 32), (1, 128)]
    _, ref = model_own(model, batch, _params(model, {n: (n if n.endswith("bias") else n + ".weight", False)
                                                     for n in names}))
    assert_per_sample_close(got, ref)


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", ["lm_head_saved", "embedding_lora", "gpt2_conv1d_lora_bias"])
def test_peft_trainable_parameters_all_attributed(case):
    if case == "lm_head_saved":
        model = peft_llama(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    elif case == "gpt2_conv1d_lora_bias":  # LoRA on Conv1D layers; bias="lora_only" trains their Conv1D biases
        model = peft_llama(gpt2(), target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only",
                           task_type="CAUSAL_LM")
    else:
        model = peft_llama(target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")
    batch = causal_batch(pad=5)  # a pad that is not padding_idx: its LoRA-embedding row gets a gradient too
    got, cap = capture(model, batch, "lora")
    trainable = _trainable(model)
    assert {id(t.param) for t in cap._targets} == {id(p) for p in trainable.values()}
    params = {t.name: (t.param, t.transpose) for t in cap._targets}
    shapes = {t.name: (t.block.rows, t.block.cols) for t in cap._targets}
    if case == "gpt2_conv1d_lora_bias":
        assert shapes["base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"] == (1, 96)
    elif case == "embedding_lora":
        e = "base_model.model.model.embed_tokens."
        assert shapes[e + "lora_embedding_A.default"] == (4, V)  # A (r, V)
        assert shapes[e + "lora_embedding_B.default"] == (4, 32)  # B (d, r), stored transposed like LoRA B
    else:
        assert shapes["base_model.model.lm_head.modules_to_save.default"] == (V, 32)
    _, ref = model_own(model, batch, params)
    assert_per_sample_close(got, ref)


def test_embedding_lora_padding_idx_gets_no_gradient():
    model = peft_llama(target_modules=["embed_tokens"], task_type="CAUSAL_LM")
    batch = causal_batch(pad=PAD)  # embed_tokens.padding_idx == PAD: F.embedding gives its row no gradient
    got, cap = capture(model, batch, "lora")
    A = "base_model.model.model.embed_tokens.lora_embedding_A.default"
    assert float(got[A][:, :, PAD].abs().max()) == 0.0
    _, ref = model_own(model, batch, {t.name: (t.param, t.transpose) for t in cap._targets})
    assert_per_sample_close(got, ref)


def test_roberta_seq_cls_classifier_head_attributed():
    model = tiny_roberta_lora(seed=0)  # task_type="SEQ_CLS": classifier in modules_to_save
    from tiny_models import make_batch

    batch = make_batch("roberta", B=B, T=8, seed=2)
    got, cap = capture(model, batch, "lora")
    assert {id(t.param) for t in cap._targets} == {id(p) for p in _trainable(model).values()}
    assert sum(".classifier.modules_to_save.default." in t.name for t in cap._targets) == 4  # dense, out_proj: w, b
    _, ref = model_own(model, batch, {t.name: (t.param, t.transpose) for t in cap._targets})
    assert_per_sample_close(got, ref)


def test_trainable_parameters_left_out_are_named():
    model = peft_llama(target_modules=["q_proj"], modules_to_save=["norm"], task_type="CAUSAL_LM")  # 3 norms
    with pytest.warns(UserWarning, match=r"3 trainable parameter\(s\) are not attributed .*"
                                         r"base_model\.model\.model\.norm\.modules_to_save\.default\.weight "
                                         r"\(LlamaRMSNorm\.weight"):
        cap = GradientCapture(model)
    assert len(cap.blocks) == 2  # q_proj's A and B
    cap.close()


def test_large_saved_head_is_left_out_by_name_and_attributable_explicitly(monkeypatch):
    """blocks="lora" leaves out a saved head above LARGE_BLOCK values (a real vocabulary's lm_head would
    take GBs a sample), says so, and captures it when it is named."""
    import pyinf.targets as targets_mod

    model = peft_llama(target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    head = "base_model.model.lm_head.modules_to_save.default"
    monkeypatch.setattr(targets_mod, "LARGE_BLOCK", V * 32 - 1)  # the tiny head (V, 32) counts as large
    with pytest.warns(UserWarning, match=re.escape(head) + r"\.weight \(" + f"{V * 32:,}" + r" values a sample"):
        cap = GradientCapture(model)
    assert head not in {t.name for t in cap._targets} and len(cap.blocks) == 2
    cap.close()
    cap = GradientCapture(model, blocks=["lora", head])
    assert head in {t.name for t in cap._targets}
    cap.close()


# --------------------------------------------------------------------------- #
# item 7: each family's loss (and gradients through it)
# --------------------------------------------------------------------------- #
def _own_losses(model, batch):
    return model_own(model, batch, {})[0]


@pytest.mark.parametrize("build,make", [(gpt2, causal_batch), (bart, seq2seq_batch), (t5, seq2seq_batch),
                                        (roberta_mlm, mlm_batch)], ids=["gpt2", "bart", "t5", "roberta_mlm"])
def test_default_loss_is_the_models_own_per_sample(build, make):
    model = build().eval()
    batch = make()
    with torch.no_grad():
        got = default_loss(model, batch)
    torch.testing.assert_close(got, _own_losses(model, batch), rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("build,q", [(bart, "q_proj"), (t5, "q")], ids=["bart", "t5"])
def test_seq2seq_lora_and_tied_lm_head_gradients(build, q):
    from peft import LoraConfig, get_peft_model

    base = build()
    model = _quiet(lambda: get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=[q],
                                                           task_type="SEQ_2_SEQ_LM")))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    batch = seq2seq_batch(seed=4)
    head = "base_model.model.lm_head"  # tied to the shared embedding of the encoder and the decoder
    got, cap = capture(model, batch, ["lora", head])
    assert cap.blocks[-1].name == head
    _, ref = model_own(model, batch, {t.name: (t.param, t.transpose) for t in cap._targets})
    assert_per_sample_close(got, ref)


def test_default_loss_refuses_a_model_it_cannot_read():
    class Tagger(nn.Module):  # per-token logits, but shifted or not?
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    with pytest.raises(ValueError, match="cannot tell how Tagger reads its per-token labels.*pass loss="):
        default_loss(Tagger(), causal_batch())


def test_default_loss_keeps_float64():
    """A float64 model's loss is computed in float64 (an fp32 cast would round it to ~1e-7, which a
    float64 reference, e.g. Forward-INF's bf16 noise study, then mistakes for the method's noise)."""
    model = gpt2().double().eval()
    batch = causal_batch()
    ours = default_loss(model, batch)
    assert ours.dtype == torch.float64
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    valid = (batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, 1:] != 0) & (batch["attention_mask"][:, :-1] != 0)
    ref = (ce * valid).sum(1) / valid.sum(1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
