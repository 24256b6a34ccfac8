"""Gram matrices of gradient chunks, batched over blocks: K[b] = G1[b] G2[b]ᵀ.

`G1` (b, c1, D), `G2` (b, c2, D) float32 / bfloat16 / float16 (2-D inputs are
one block) -> `(b, c1, c2)` float32. All blocks of one shape go in one launch
(grid axis 2 = block), e.g. the 160 LoRA blocks of the 13B shape for `exact`.

Tiling: a plain tiled GEMM, one program per (BLOCK_I × BLOCK_J) output tile
and block, looping over D in BLOCK_K steps; the grid has
(c1/BLOCK_I)·(c2/BLOCK_J)·b programs, plenty without a split over D. On a GPU
the tile is chosen by `triton.autotune` (`_autotune.py`) among `TILES_16`
(both operands 16-bit: larger K steps, since a 16-bit tile is half the bytes)
or `TILES_32` (fp32 operands); the first of each list is the former fixed
64 × 64 × 32, and the only one when D is not a multiple of 16 (`_autotune.tuned`).
All of them compile for sm_90 without spills (`bench/compile_sm90.py`); which
one wins is for the GPU to say (not timed).
Precision: both operands bf16 (or both fp16) -> one bf16 (fp16) MMA per tile
(exact products, fp32 accumulation); otherwise `tl.dot` in the default
precision of `_util.dot_precision` (tf32x3 on tensor-core GPUs, ieee under
the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # installed as pyinf.kernels
    from . import _autotune, _util
    from ._dot import mma
except ImportError:  # pragma: no cover - imported by path while developing
    import _autotune  # type: ignore
    import _util  # type: ignore
    from _dot import mma  # type: ignore

#: (BLOCK_I, BLOCK_J, BLOCK_K, num_warps, num_stages) tried by the autotuner on a GPU, picked from ~20
#: candidates compiled for sm_90 (bench/results/kernels-sm90-i13.md): none spills on Triton 3.6 or 3.9 at
#: the 13B shapes, the opt-in precisions or the edge shapes. 128-wide tiles take 8 warps (4 warps spilled
#: at 255 registers in tf32x3 or at the edge shapes) and, with fp32 operands, BLOCK_K = 16 (32 spilled
#: in the ieee opt-in on Triton 3.6).
TILES_16 = [(64, 64, 32, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3)]
TILES_32 = [(64, 64, 32, 4, 3), (128, 64, 16, 8, 4), (64, 128, 16, 8, 4), (128, 128, 16, 8, 4)]


@triton.jit(do_not_specialize=["SIZE_CLASS"])
def _gram_kernel(
    A, B, O,
    c1, c2, D,
    SIZE_CLASS,  # the autotune key only (_autotune.size_class)
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, MODE: tl.constexpr, NATIVE_BF16: tl.constexpr,
):
    pid_i = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    A += pid_b * c1 * D
    B += pid_b * c2 * D
    O += pid_b * c1 * c2
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    mask_i = offs_i < c1
    mask_j = offs_j < c2
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < D
        a = tl.load(A + offs_i[:, None] * D + offs_k[None, :], mask=mask_i[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(B + offs_j[None, :] * D + offs_k[:, None], mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        acc = mma(a.to(tl.float32), b.to(tl.float32), acc, PRECISION, MODE, NATIVE_BF16)
    tl.store(O + offs_i[:, None] * c2 + offs_j[None, :], acc, mask=mask_i[:, None] & mask_j[None, :])


_TUNED = {wide: _autotune.tuned(_gram_kernel, ("BLOCK_I", "BLOCK_J", "BLOCK_K"), TILES_16 if wide else TILES_32,
                                 key=["PRECISION", "MODE"]) for wide in (True, False)}


def _modes(a_dtype: torch.dtype, b_dtype: torch.dtype, device: torch.device, precision: str | None) -> tuple[str, int]:
    """(input_precision, MODE) for a product of two gradient tiles (MODE as in `_dot.mma`)."""
    p = _util.dot_precision(b_dtype, device, precision)
    if a_dtype == b_dtype and a_dtype in (torch.bfloat16, torch.float16) and p != "ieee":
        return "ieee", 2 if a_dtype == torch.bfloat16 else 3  # exact 16-bit products on the tensor cores
    if p == "bf16x2":
        return ("ieee", 1) if b_dtype == torch.bfloat16 else ("tf32x3", 0)
    return p, 0


def gram(G1: torch.Tensor, G2: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
    """`G1` ([b,] c1, D), `G2` ([b,] c2, D) -> `([b,] c1, c2)` fp32 = G1 G2ᵀ per block."""
    squeeze = G1.dim() == 2
    if squeeze:
        G1, G2 = G1.unsqueeze(0), G2.unsqueeze(0)
    _util.check_storage("G1", G1, 3)
    _util.check_storage("G2", G2, 3)
    b, c1, D = G1.shape
    assert G2.shape[0] == b and G2.shape[2] == D, f"G1 {tuple(G1.shape)} and G2 {tuple(G2.shape)} disagree"
    assert G1.device == G2.device
    c2 = G2.shape[1]
    out = torch.empty(b, c1, c2, dtype=torch.float32, device=G1.device)
    ip, mode = _modes(G1.dtype, G2.dtype, G1.device, precision)
    args = (G1, G2, out, c1, c2, D)
    if _util.interpreting():
        # one fixed config, big tiles: the interpreter re-reads G once per output tile row / column
        # (cost ∝ elements loaded)
        BI, BJ, BK = _util.clamp_pow2(c1, 16, 256), _util.clamp_pow2(c2, 16, 256), _util.clamp_pow2(D, 16, 512)
        _gram_kernel[(_util.cdiv(c1, BI), _util.cdiv(c2, BJ), b)](
            *args, SIZE_CLASS=0, BLOCK_I=BI, BLOCK_J=BJ, BLOCK_K=BK, PRECISION=ip, MODE=mode, NATIVE_BF16=False,
            num_warps=4)
    else:
        grid = lambda meta, nb: (_util.cdiv(c1, meta["BLOCK_I"]), _util.cdiv(c2, meta["BLOCK_J"]), nb)  # noqa: E731
        _autotune.launch(_TUNED[mode >= 2][D % 16 == 0], grid, args, b, (c1, c2, D),
                         PRECISION=ip, MODE=mode, NATIVE_BF16=True)
    return out[0] if squeeze else out


def gram_reference(G1: torch.Tensor, G2: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    dt = torch.float64 if upcast else torch.float32
    return G1.to(dt) @ G2.to(dt).transpose(-1, -2)
