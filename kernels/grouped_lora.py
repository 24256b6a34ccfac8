"""Grouped low-rank update: `out[g] = base[g] + scale · (x[g] A[g]ᵀ) B[g]ᵀ` for every group g < k.

Shapes (all contiguous): `x` (k, M, K), `A` (k, R, K), `B` (k, N, R), `base`
and `out` (k, M, N); x, A and B share one dtype (float32, bfloat16 or
float16), base/out may have another (a LoRA layer's base result). `out` may be
`base` itself (in place). This is the op behind Forward-INF's many queries per
pass (`pyinf.forward`): the training batch is replicated k times, the frozen
base layer runs once on all k·M rows (one read of its weight), and this op adds
the k different LoRA deltas, group g with its own adapter (A_g, B_g). Group 0
is the unperturbed adapter there: the base losses come from this same op, and
every group runs the same code, so identical groups give bit-identical outputs
(a query whose step left its adapter unchanged scores exactly 0).

One program per (M-tile, group, N-slice): it reduces `h = x_tile A_gᵀ`
(BLOCK_M × R, fp32) over all of K, scales it, then walks its slice of the N
axis adding `h B_gᵀ` into the output tile by tile. With one N slice (enough
M-tiles × groups to give every SM a program) x is read once, B_g once per
M-tile, base/out once: the op is bandwidth-bound at LoRA ranks. Fewer
programs than SMs (one group of 4096 rows: 64 M-tiles on 132 SMs) would leave
SMs idle, so N is then split into `n_splits` slices, balanced to within one
tile, the fewest that give every SM a program (3 there: 192 programs). Each
slice recomputes h: x_tile is read once per slice, the slices of one M-tile
neighbours in launch order so that the re-reads come from L2 (+ 2 × 640 KB
of bf16 x per M-tile at r = 8, against 3 × 64 × 1707 × 8 B = 2.6 MB of fp32
base and out). R is padded to a power of two ≥ 16 (tl.dot's minimum on a
GPU) by masking.

Tiles on an H100 / H200 (`_gpu_config`; checked by `bench/compile_sm90.py`,
which compiles this kernel for sm_90 at the Llama-2-13B shapes: M = 4096 rows
per group, K = N = 5120, r = 8 and 64; nothing here was timed on a GPU):
  * BLOCK_M = 64: one Hopper warpgroup MMA (wgmma) is 64 rows tall and
    num_warps = 4 is one warpgroup; M ≤ 32 takes 32 rows (mma.sync) so that a
    short batch does not compute half-empty tiles.
  * BLOCK_K = 64 for r ≤ 32, 32 for r = 64: the x tiles are staged through
    shared memory by Triton's software pipeline (cp.async, num_stages = 3),
    30-64 KB per program.
  * BLOCK_N = 64, every rank. Phase 2 holds per thread the fp32 accumulator
    (BLOCK_M · BLOCK_N / 128 threads = 32 registers at 64), the base tile added
    to it (32 more for an fp32 base), the loop-invariant h operand (twice for
    the tf32x3 and bf16x2 splits) and 64-bit addresses. With BLOCK_N = 128 all
    of it doubled: ptxas used 255 registers and spilled 24-44 B (fp32 operands
    with an fp32 base, and bf16 operands with an fp32 base; Triton 3.6 and
    3.9). At 64 the same configs use 150-160 registers and nothing spills;
    r = 64 (already 64) stays at 230-245 registers for fp32/fp16 with tf32x3,
    below the 255 limit but the tightest config of this kernel.
  * Bandwidth: BLOCK_N changes no byte moved (x, base and out once, A_g and
    B_g from L2), only the bytes in flight. Triton pipelines the B_g tile
    (it feeds tl.dot) but not the base load, so each program has one base
    tile outstanding: 16 KB at fp32 and BLOCK_N = 64. 160 registers × 128
    threads let 3 programs share an SM (255 allowed 2), up to 48 KB in flight
    per SM against the ~25-35 KB that Little's law asks of 3.35-4.8 TB/s HBM
    over 132 SMs at ~1 µs latency; at the 4-group Forward-INF shape (256
    programs on 132 SMs, ~2 per SM) it is ~32 KB, at one group (192 programs
    with the N split) ~23 KB, against ~8 KB averaged over 132 SMs without. An
    estimate, to be confirmed by a GPU benchmark.

Precision (see `_util.dot_precision`): the first product multiplies two
stored operands, exact in bf16 (one bf16 MMA, fp32 accumulation, MODE 2) and
tf32x3 for fp32/fp16 by default; the second multiplies the fp32 `h` by the
stored B: bf16x2 split of h for bf16 (~2^-16 relative), tf32x3 for fp32. The
interpreter computes everything in fp32 (bf16 upcast on load).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # installed as pyinf.kernels
    from . import _util
    from ._dot import mma
except ImportError:  # pragma: no cover - imported by path while developing
    import _util  # type: ignore
    from _dot import mma  # type: ignore


def is_available() -> bool:
    """True when the kernel can run: a CUDA device, or the interpreter (TRITON_INTERPRET=1)."""
    return _util.interpreting() or torch.cuda.is_available()


@triton.jit
def _grouped_lora_kernel(
    X, A, B, BASE, OUT,
    M, K, N, R, scale, n_splits,
    HAS_BASE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION1: tl.constexpr, MODE1: tl.constexpr,
    PRECISION2: tl.constexpr, MODE2: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = (pid // n_splits).to(tl.int64)
    pid_n = pid % n_splits  # the splits of one M-tile are neighbours in launch order: x_tile from L2
    g = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = offs_r < R
    x_g = X + g * M * K
    a_g = A + g * R * K
    b_g = B + g * N * R
    o_g = g * M * N

    # h = x_tile A_gᵀ: (BLOCK_M, BLOCK_R), reduced over K once
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(x_g + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_g + offs_r[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        h = mma(x.to(tl.float32), at.to(tl.float32), h, PRECISION1, MODE1, NATIVE_BF16)
    h = h * scale

    # out tile by tile along this program's N range (balanced to within one tile): base + h B_gᵀ
    n_tiles = tl.cdiv(N, BLOCK_N)
    # a loop over tile indices: one over n0 from a run-time start spilled 8 B (fp32, M = 20, Triton 3.9)
    for t in range(pid_n * n_tiles // n_splits, (pid_n + 1) * n_tiles // n_splits):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # t * BLOCK_N < N: int32 is enough
        mask_n = offs_n < N
        bt = tl.load(b_g + offs_n[None, :] * R + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        d = mma(h, bt.to(tl.float32), d, PRECISION2, MODE2, NATIVE_BF16)
        offs = o_g + offs_m[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_BASE:
            d += tl.load(BASE + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, d.to(OUT.dtype.element_ty), mask=mask)


def _gpu_config(k: int, M: int, K: int, N: int, R: int, sms: int) -> dict:
    """The tiles and the N split on a GPU with `sms` SMs (see the module docstring for why)."""
    BLOCK_R = _util.clamp_pow2(R, 16, 1 << 20)
    BLOCK_M, BLOCK_N = (64 if M > 32 else 32), 64
    programs = _util.cdiv(M, BLOCK_M) * k
    n_splits = max(1, min(_util.cdiv(N, BLOCK_N), _util.cdiv(sms, programs)))  # at least one program per SM
    return dict(BLOCK_M=BLOCK_M, BLOCK_K=64 if BLOCK_R <= 32 else 32, BLOCK_N=BLOCK_N,
                BLOCK_R=BLOCK_R, n_splits=n_splits, num_warps=4)


def _config(k: int, M: int, K: int, N: int, R: int, device: torch.device) -> dict:
    if _util.interpreting():  # ~1 ms per program whatever its size: few, big programs
        return dict(BLOCK_M=_util.clamp_pow2(M, 16, 128), BLOCK_K=_util.clamp_pow2(K, 16, 512),
                    BLOCK_N=_util.clamp_pow2(N, 16, 512), BLOCK_R=_util.clamp_pow2(R, 16, 1 << 20),
                    n_splits=1, num_warps=4)
    return _gpu_config(k, M, K, N, R, _util.num_sms(device))


def grouped_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, *,
                 base: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 precision: str | None = None) -> torch.Tensor:
    """`(k, M, N)`: base + scale · (x Aᵀ) Bᵀ per group (base = 0 when None); `out` may be `base`."""
    for name, t in (("x", x), ("A", A), ("B", B)):
        _util.check_storage(name, t, 3)
    k, M, K = x.shape
    R = A.shape[1]
    N = B.shape[1]
    assert A.shape == (k, R, K), f"A has shape {tuple(A.shape)}, expected {(k, R, K)}"
    assert B.shape == (k, N, R), f"B has shape {tuple(B.shape)}, expected {(k, N, R)}"
    assert x.dtype == A.dtype == B.dtype, f"x, A, B must share a dtype, got {x.dtype}, {A.dtype}, {B.dtype}"
    assert x.device == A.device == B.device, "x, A, B must be on one device"
    if base is not None:
        _util.check_storage("base", base, 3)
        assert base.shape == (k, M, N), f"base has shape {tuple(base.shape)}, expected {(k, M, N)}"
    if out is None:
        out = torch.empty((k, M, N), dtype=base.dtype if base is not None else x.dtype, device=x.device)
    _util.check_storage("out", out, 3)
    assert out.shape == (k, M, N), f"out has shape {tuple(out.shape)}, expected {(k, M, N)}"
    if k == 0 or M == 0 or N == 0:
        return out
    cfg = _config(k, M, K, N, R, x.device)
    p = _util.dot_precision(x.dtype, x.device, precision)
    ip2, split = _util.tl_precision(p)
    if x.dtype == torch.bfloat16:
        ip1, mode1 = "ieee", 2  # both operands bf16: exact products
    else:
        ip1, mode1 = ip2, 0
    grid = (_util.cdiv(M, cfg["BLOCK_M"]) * cfg["n_splits"], k)
    _grouped_lora_kernel[grid](
        x, A, B, base if base is not None else out, out,
        M, K, N, R, float(scale), cfg["n_splits"],
        HAS_BASE=base is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
        PRECISION1=ip1, MODE1=mode1, PRECISION2=ip2, MODE2=1 if split else 0,
        NATIVE_BF16=not _util.interpreting(),
        num_warps=cfg["num_warps"],
    )
    return out


def grouped_lora_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, *,
                           base: torch.Tensor | None = None, upcast: bool = False) -> torch.Tensor:
    """Plain PyTorch: base + scale · bmm(bmm(x, Aᵀ), Bᵀ), in fp32 (float64 with `upcast`)."""
    dt = torch.float64 if upcast else torch.float32
    d = torch.bmm(torch.bmm(x.to(dt), A.to(dt).transpose(1, 2)), B.to(dt).transpose(1, 2)) * scale
    return d if base is None else base.to(dt) + d
