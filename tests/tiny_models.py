"""Tiny random-weight transformers + PEFT LoRA models and token batches for tests.

Nothing is downloaded: models come from small configs with random weights.
The models are returned in TRAINING mode with LoRA dropout 0.1, so a test
that matches eval-mode reference gradients also checks that capture turns
dropout off.

    model = tiny_llama_lora(seed=0)                  # PeftModelForCausalLM
    model = tiny_roberta_lora(seed=0)                # PeftModelForSequenceClassification
    batch = make_batch("llama", B=4, T=9, padding_side="left", seed=0)
    ref = single_sample_grads(model, batch, blocks)  # batch-size-1 autograd reference
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

VOCAB = 97
LLAMA_PAD = 0
ROBERTA_PAD = 1  # RobertaConfig's padding_idx: position ids skip it
FIRST_TOKEN = 3  # random tokens are drawn from [FIRST_TOKEN, VOCAB)


def _perturb_lora_B(model, seed: int) -> None:
    """Make sure every LoRA B is nonzero (PEFT's default init zeroes it, so g_A = 0)."""
    g = torch.Generator().manual_seed(seed + 1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def tiny_llama_lora(seed: int = 0, *, dtype: torch.dtype = torch.float32, r: int = 4, alpha: int = 8,
                    lora_dropout: float = 0.1, attn_implementation: str = "sdpa"):
    """`LlamaForCausalLM` (vocab 97, hidden 32, 2 layers, 4 heads (2 key/value heads, so
    v_proj is 32 -> 16), intermediate 64) with PEFT LoRA r=4, alpha=8, dropout 0.1 on
    q_proj and v_proj, LoRA B nonzero. Returned in training mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
        pad_token_id=LLAMA_PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn_implementation
    base = LlamaForCausalLM(cfg).to(dtype)
    lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout,
                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, lcfg)
    _perturb_lora_B(model, seed)
    model.train()
    return model


def tiny_roberta_lora(seed: int = 0, *, num_labels: int = 3, dtype: torch.dtype = torch.float32,
                      r: int = 4, alpha: int = 8, lora_dropout: float = 0.1,
                      attn_implementation: str = "sdpa"):
    """`RobertaForSequenceClassification` (same tiny sizes) with PEFT LoRA on query and
    value and the classifier head trainable (modules_to_save); LoRA B nonzero.
    The head's output linear is `roberta_head_block(model)`. Training mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128 + ROBERTA_PAD + 1, type_vocab_size=1,
        pad_token_id=ROBERTA_PAD, bos_token_id=0, eos_token_id=2, num_labels=num_labels,
    )
    cfg._attn_implementation = attn_implementation
    base = RobertaForSequenceClassification(cfg).to(dtype)
    lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout,
                      target_modules=["query", "value"], modules_to_save=["classifier"],
                      task_type="SEQ_CLS")
    model = get_peft_model(base, lcfg)
    _perturb_lora_B(model, seed)
    model.train()
    return model


def roberta_head_block(model) -> str:
    """Module name of the (trainable copy of the) classifier's output linear."""
    names = [n for n, _ in model.named_modules() if n.endswith("classifier.modules_to_save.default.out_proj")]
    assert len(names) == 1, names
    return names[0]


def make_batch(model_kind: str, B: int = 4, T: int = 9, padding_side: str = "right", seed: int = 0,
               *, lengths: list[int] | None = None, num_labels: int = 3,
               position_ids: bool = False) -> dict[str, torch.Tensor]:
    """A padded token batch with uneven lengths (sample 0 full length, sample 1 the shortest).

    model_kind "llama": labels = input_ids with -100 at pads (causal LM);
    "roberta": class labels in [0, num_labels) (float targets if num_labels == 1).
    `position_ids=True` adds position ids counted over the real tokens (as
    generation does for left padding).
    """
    if model_kind not in ("llama", "roberta"):
        raise ValueError(model_kind)
    if padding_side not in ("left", "right"):
        raise ValueError(padding_side)
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lo = max(2, T // 2)
        lengths = [T] + [lo] + torch.randint(lo, T + 1, (max(B - 2, 0),), generator=g).tolist()
        lengths = lengths[:B]
    assert len(lengths) == B and all(2 <= n <= T for n in lengths)
    pad = LLAMA_PAD if model_kind == "llama" else ROBERTA_PAD
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, n in enumerate(lengths):
        tok = torch.randint(FIRST_TOKEN, VOCAB, (n,), generator=g)
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[i, sl] = tok
        mask[i, sl] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if model_kind == "llama":
        batch["labels"] = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    elif num_labels == 1:
        batch["labels"] = torch.randn(B, generator=g)
    else:
        batch["labels"] = torch.randint(0, num_labels, (B,), generator=g)
    if position_ids:
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch


def load_kernel_module():
    """`pyinf.kernels.per_sample_outer` of the installed package, else the source file.

    Set TRITON_INTERPRET=1 before calling on a machine without a GPU.
    """
    import importlib
    import importlib.util
    import pathlib

    try:
        return importlib.import_module("pyinf.kernels.per_sample_outer")
    except ImportError:
        path = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "per_sample_outer.py"
        spec = importlib.util.spec_from_file_location("_pyinf_kernels_per_sample_outer", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def sample(batch: Mapping[str, torch.Tensor], i: int, *, trim: bool = False) -> dict[str, torch.Tensor]:
    """Sample i alone as a batch of one; `trim=True` also drops its padding."""
    one = {k: v[i : i + 1] for k, v in batch.items()}
    if trim:
        keep = one["attention_mask"][0].bool()
        for k, v in list(one.items()):
            if v.dim() == 2 and v.shape[1] == keep.shape[0]:
                one[k] = v[:, keep]
        if "position_ids" in one:
            one["position_ids"] = torch.arange(int(keep.sum()))[None]
    return one


def single_sample_grads(model, batch, blocks: Mapping[str, tuple[torch.nn.Module, bool]],
                        loss: Callable | None = None, *, trim: bool = False) -> dict[str, torch.Tensor]:
    """Reference per-sample gradients from one batch-size-1 `torch.autograd.grad` per sample.

    `blocks`: {name: (nn.Linear module or a parameter, transpose)}; the model is
    put in eval mode (and restored). Returns {name: (B, rows, cols)} float32, LoRA B
    transposed where `transpose` is set, a 1-D parameter as (B, 1, n).
    """
    from pyinf.losses import default_loss

    loss = loss or default_loss
    was_training = model.training
    model.eval()
    B = next(iter(batch.values())).shape[0]
    out = {name: [] for name in blocks}
    try:
        for i in range(B):
            ws = [m if isinstance(m, torch.Tensor) else m.weight for m, _ in blocks.values()]
            flags = [w.requires_grad for w in ws]
            for w in ws:
                w.requires_grad_(True)
            try:
                li = loss(model, sample(batch, i, trim=trim))
                gs = torch.autograd.grad(li.sum(), ws, allow_unused=True)
            finally:
                for w, f in zip(ws, flags):
                    w.requires_grad_(f)
            for (name, (_, tr)), w, g in zip(blocks.items(), ws, gs):
                g = torch.zeros_like(w) if g is None else g
                out[name].append((g.t() if tr else g.reshape(1, -1) if g.dim() == 1 else g).float())
    finally:
        model.train(was_training)
    return {name: torch.stack(v) for name, v in out.items()}


def lora_modules(model) -> dict[str, tuple[torch.nn.Module, bool]]:
    """{block name: (LoRA linear, transpose)} for every LoRA A/B of the model (default adapter)."""
    mods = {}
    for name, m in model.named_modules():
        if name.endswith(".lora_A.default"):
            mods[name] = (m, False)
        elif name.endswith(".lora_B.default"):
            mods[name] = (m, True)
    return mods
