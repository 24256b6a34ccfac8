"""The Llama-2-13B-shaped model shared by the end-to-end benchmarks.

transformers LlamaConfig with the 13B sizes, random weights built directly on
the GPU, PEFT LoRA r=8, alpha=32 on q_proj and v_proj (160 blocks, 6.55M
parameters), LoRA B perturbed away from PEFT's zero init so that g_A ≠ 0.
`PYINF_BENCH_TINY=1` swaps in a tiny config on the CPU (a smoke run of the
same code; its numbers mean nothing).
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

TINY = os.environ.get("PYINF_BENCH_TINY") == "1"
requires_gpu = pytest.mark.skipif(
    not TINY and not torch.cuda.is_available(), reason="needs a CUDA GPU (or PYINF_BENCH_TINY=1 for a CPU smoke run)"
)
if TINY:
    MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128)
else:
    MODEL = dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824, vocab_size=32000)


def device() -> torch.device:
    return torch.device("cpu" if TINY else "cuda")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(dtype: torch.dtype = torch.bfloat16):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**MODEL, num_key_value_heads=MODEL["num_attention_heads"], max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device()):  # random weights created in place, never on the host first
        base = LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    base.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # PEFT zeroes LoRA B, which makes every g_A zero
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.02)
    return model.eval()


def batches(n: int, T: int, B: int, seed: int) -> list[dict]:
    """`n` random token sequences of length `T` in batches of `B` (labels = inputs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, B):
        ids = torch.randint(3, MODEL["vocab_size"], (min(B, n - i), T), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(median seconds, all times) of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times
