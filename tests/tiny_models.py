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


# --------------------------------------------------------------------------- #
# a tiny diffusers UNet with LoRA (issue 16)
# --------------------------------------------------------------------------- #
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' train_text_to_image_lora.py
UNET_TEXT_LEN, UNET_TEXT_DIM = 5, 12  # the encoder_hidden_states of make_image_batch: (B, 5, 12)


def tiny_unet_lora(seed: int = 0, *, dtype: torch.dtype = torch.float32, r: int = 4, alpha: int = 4,
                   sample_size: int = 8):
    """A diffusers `UNet2DConditionModel` from a small config (random weights, `seed`): 4 latent
    channels, `sample_size`² latents, block channels (16, 32), one layer per block, a cross-attention
    down block, a cross-attention mid block and a cross-attention up block (3 attention blocks:
    self-attention on the spatial positions, cross-attention to (B, 5, 12) text embeddings), with PEFT
    LoRA r, alpha on to_q, to_k, to_v, to_out.0 added as diffusers' train_text_to_image_lora.py does
    (`unet.add_adapter(LoraConfig(..., init_lora_weights="gaussian"))`, base weights frozen), LoRA B made
    nonzero (seeded) so that g_A is not zero. Returned in training mode."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=UNET_TEXT_DIM, attention_head_dim=4,
    )
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    _perturb_lora_B(unet, seed)
    if dtype != torch.float32:
        unet.to(dtype)
    unet.train()
    return unet


def make_image_batch(B: int = 4, seed: int = 0, *, start: int = 0, sample_size: int = 8,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded (B, 4, s, s) latents `pixel_values`, (B, 5, 12) `encoder_hidden_states` and global indices
    `index` = start..start+B-1 (what `pyinf.diffusion.DenoisingLoss` seeds each sample's draws with)."""
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(B, 4, sample_size, sample_size, generator=g).to(dtype),
            "encoder_hidden_states": torch.randn(B, UNET_TEXT_LEN, UNET_TEXT_DIM, generator=g).to(dtype),
            "index": torch.arange(start, start + B)}


def image_batches(n: int, batch_size: int, seed: int = 0, **kw) -> list[dict[str, torch.Tensor]]:
    """n samples in batches of `batch_size` (the last one shorter), indices 0..n-1."""
    return [make_image_batch(min(batch_size, n - i), seed=1000 * seed + i, start=i, **kw)
            for i in range(0, n, batch_size)]


def unet_task(draws: int = 1, *, train_seed: int = 0, query_seed: int = 1, timesteps=None):
    """`pyinf.Task` with the seeded denoising loss: training draws from `train_seed`, the query
    measurement from `query_seed` (a query never shares noise with the training image of its index)."""
    from pyinf import Task
    from pyinf.diffusion import DenoisingLoss

    return Task(train_loss=DenoisingLoss(draws=draws, seed=train_seed, timesteps=timesteps),
                measurement=DenoisingLoss(draws=draws, seed=query_seed, timesteps=timesteps))
