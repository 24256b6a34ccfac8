"""Generalized Fisher (HyperINF's GFIM), batched over blocks: Φ[b] = Σ_i g_biᵀ g_bi.

`G` (b, c, rows, cols) float32 / bfloat16 / float16 (a 3-D input is one block)
-> `(b, cols, cols)` float32 (unnormalised: the method divides by n).
With X[b] = G[b] reshaped to (c·rows, cols), Φ[b] = X[b]ᵀ X[b]: a GEMM that
reduces over the c·rows axis, so all blocks of one shape go in one launch
(grid axis 2 = block).

Tiling: one program per (BLOCK × BLOCK) tile of Φ and block, looping over
c·rows in BLOCK_K steps. Φ is symmetric, so only the tiles on or above the
diagonal are computed (half the FLOPs: at the 13B shape the GFIM is
2·900·8·5120² ≈ 377 GFLOP per block); each off-diagonal program stores its
tile twice, at (i, j) and transposed at (j, i), so the whole output is written
by the kernel (no torch mirror pass, no extra cols² buffers); a diagonal tile
stores its upper half and mirrors it, so Φ is exactly symmetric (the Cholesky
and Schulz steps downstream assume it) whatever order the MMA sums in. On a GPU
BLOCK, BLOCK_K and the warps are chosen by `triton.autotune` among `TILES_16`
(16-bit operands) or `TILES_32` (fp32 operands), as in `gram.py`; the first of
each list is the former fixed 64 × 32, and the only one when cols is not a
multiple of 16. Precision as in `gram.py`: bf16 (fp16)
gradients -> exact bf16 (fp16) MMAs with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # installed as pyinf.kernels
    from . import _autotune, _util
    from ._dot import mma
    from .gram import _modes
except ImportError:  # pragma: no cover - imported by path while developing
    import _autotune  # type: ignore
    import _util  # type: ignore
    from _dot import mma  # type: ignore
    from gram import _modes  # type: ignore

#: (BLOCK, BLOCK_K, num_warps, num_stages) tried by the autotuner on a GPU, picked by compiling candidates
#: for sm_90 as in gram.py: none spills at the 13B shapes or in the opt-in precisions on Triton 3.6 or 3.9.
#: 128-wide tiles take 8 warps (4 spilled 244-1692 B). They spill (108-320 B) when cols is not a multiple
#: of 16 (cols = 3, 33), which therefore takes the first config alone (_autotune.tuned).
TILES_16 = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 4), (128, 64, 8, 3)]
TILES_32 = [(64, 32, 4, 3), (64, 16, 4, 4), (128, 32, 8, 3), (128, 16, 8, 4)]


@triton.jit(do_not_specialize=["SIZE_CLASS"])
def _gfim_kernel(
    X, O,
    N, cols,
    SIZE_CLASS,  # the autotune key only (_autotune.size_class)
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, MODE: tl.constexpr, NATIVE_BF16: tl.constexpr,
):
    pid_i = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    if pid_j >= pid_i:  # upper triangle of tiles only
        X += pid_b * N * cols
        O += pid_b * cols * cols
        offs_i = pid_i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        offs_j = pid_j * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask_i = offs_i < cols
        mask_j = offs_j < cols
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < N
            a = tl.load(X + offs_k[None, :] * cols + offs_i[:, None], mask=mask_i[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(X + offs_k[:, None] * cols + offs_j[None, :], mask=mask_k[:, None] & mask_j[None, :], other=0.0)
            acc = mma(a.to(tl.float32), b.to(tl.float32), acc, PRECISION, MODE, NATIVE_BF16)
        # Φ[i, j] for i ≤ j from this tile, and Φ[j, i] := Φ[i, j] (the same
        # value, so Φ is exactly symmetric whatever order the MMA summed in;
        # a diagonal tile's lower half is the mirror of its upper half).
        mask = mask_i[:, None] & mask_j[None, :]
        upper = offs_i[:, None] <= offs_j[None, :]
        tl.store(O + offs_i[:, None] * cols + offs_j[None, :], acc, mask=mask & upper)
        tl.store(O + offs_j[None, :] * cols + offs_i[:, None], acc, mask=mask & (offs_i[:, None] < offs_j[None, :]))


_TUNED = {wide: _autotune.tuned(_gfim_kernel, ("BLOCK", "BLOCK_K"), TILES_16 if wide else TILES_32,
                                 key=["PRECISION", "MODE"]) for wide in (True, False)}


def gfim(G: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
    """`G` ([b,] c, rows, cols) -> `([b,] cols, cols)` fp32 = Σ_i g_iᵀ g_i per block."""
    squeeze = G.dim() == 3
    if squeeze:
        G = G.unsqueeze(0)
    _util.check_storage("G", G, 4)
    b, c, rows, cols = G.shape
    N = c * rows
    out = torch.empty(b, cols, cols, dtype=torch.float32, device=G.device)
    ip, mode = _modes(G.dtype, G.dtype, G.device, precision)
    args = (G, out, N, cols)
    if _util.interpreting():  # one fixed config, big tiles, as in gram.py
        BLOCK, BK = _util.clamp_pow2(cols, 16, 512), _util.clamp_pow2(N, 16, 256)
        t = _util.cdiv(cols, BLOCK)
        _gfim_kernel[(t, t, b)](*args, SIZE_CLASS=0, BLOCK=BLOCK, BLOCK_K=BK, PRECISION=ip, MODE=mode,
                                NATIVE_BF16=False, num_warps=4)
    else:
        grid = lambda meta, nb: (_util.cdiv(cols, meta["BLOCK"]), _util.cdiv(cols, meta["BLOCK"]), nb)  # noqa: E731
        _autotune.launch(_TUNED[mode >= 2][cols % 16 == 0], grid, args, b, (N, cols),
                         PRECISION=ip, MODE=mode, NATIVE_BF16=True)
    return out[0] if squeeze else out


def gfim_reference(G: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    dt = torch.float64 if upcast else torch.float32
    X = G.to(dt).reshape(*G.shape[:-3], -1, G.shape[-1])
    return X.transpose(-1, -2) @ X
