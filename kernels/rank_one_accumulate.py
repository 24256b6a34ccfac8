"""DataInf / LiSSA rank-one accumulation: acc (m, D) += ((V Gᵀ) · w) G, and `weighted_sum` C G.

Shapes: `G` (c, D) float32 / bfloat16 / float16, `V` (m, D), `w` (c,),
`acc` (m, D), `C` (m, c), all float32; or a group of b same-shape blocks with a
leading block axis on every operand (`G` (b, c, D), `w` (b, c), ...), one
result per block, in the same two launches as one block (the block is grid
axis 2; the block strides of G and acc are kernel arguments, so G may be a
view of a bigger chunk).

Why two launches (and two reads of G) rather than one. Every output element
acc[j, d] needs the coefficients p_ji = ⟨v_j, g_i⟩ w_i, and each p_ji is a
reduction over ALL of D. A single kernel would have a program own a tile of
samples, first reduce its (m, tile) dot block over the whole of D, then walk D
again to add p·g into acc: G is read twice anyway (the tile's rows cannot stay
on chip: 16 samples × 40960 × 2 B = 1.3 MB at the 13B LoRA shape, and the
~132 concurrent tiles, 170 MB, do not fit the 50 MB L2 either), and the
reduction over samples across programs then needs either
  * atomics into acc: m × D × (c / BLOCK_C) fp32 atomic adds per chunk, e.g.
    m = 100, c = 900: 250 MB of atomic traffic for 74 MB of bf16 G, and a
    non-deterministic summation order; or
  * a two-stage reduction through a (c / BLOCK_C, m, D) workspace: the same
    250 MB written and read again.
Both cost more than they save once m ≳ 8. So:
  1. P = V Gᵀ with the `norms_dots` kernel (D split over programs, two-stage
     reduction of the (m, c) partials), then P *= w (m × c floats, once);
  2. this file's kernel: a program owns an (m-tile, D-tile) of acc and loops
     over all c samples, acc_tile += P_tile G_tile on the tensor cores, then
     adds the old acc tile and stores: no atomics, deterministic, acc read and
     written once, G read once (per m-tile; one m-tile for m ≤ 128).
Total: exactly two reads of G, like the torch reference's two GEMMs, but
without its fp32 upcast copy of bf16 G (which costs 5× the bf16 bytes) and
with the add into acc fused.

P's rows are padded with zeros to ldp = c rounded up to a multiple of 16
(`norms_dots.padded_len`; `norms_dots` writes them so, `weighted_sum` pads
its C when c is not a multiple of 16), so that Triton knows every P row
starts 64-byte aligned: the P tiles load as 16-byte vectors for any c (c = 900
loaded them as 4-byte scalars). Every D tile reads all of P (from L2), so
BLOCK_D = 128: at m = 100, 320 D tiles × 100 × 912 × 4 B = 117 MB per call,
half of what BLOCK_D = 64 read, for 74 MB of bf16 G; the 320 programs are
2.42 waves at one program per SM (fp32/fp16: ~200 registers; bf16: 126-131,
one or two per SM by Triton version; bench/results/kernels-sm90-i13.md).
Whether that wave tail costs more than the halved L2 traffic saves needs a
GPU to tell. P is per block, (b, m, ldp) with block stride m · ldp (a
multiple of 16: the padding holds in every block). A group of 160 blocks of
c = 20 (the 13B shape, chunks of 20 samples, m = 100) is 320 × 160 = 51,200
programs (no wave tail), reading 160 × 320 × 100 × 32 × 4 B = 655 MB of P from
L2 for 262 MB of G; there acc, read and written once (2 × 160 × 100 × 40960 ×
4 B = 5.2 GB), is 20× the bytes of G, and V, read by the dots, 10×: at
m = 100 the chunk size, not this kernel, sets the cost of a call (acc
traffic / G bytes = 8m / (c · itemsize)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # installed as pyinf.kernels
    from . import _util
    from . import norms_dots as _nd
    from ._dot import mma
except ImportError:  # pragma: no cover - imported by path while developing
    import _util  # type: ignore
    import norms_dots as _nd  # type: ignore
    from _dot import mma  # type: ignore


@triton.jit
def _weighted_sum_kernel(
    P, G, ACC,
    c, D, m, ldp, spb, sgb, sab,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, MODE: tl.constexpr, NATIVE_BF16: tl.constexpr,
):
    pid_d = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)  # the block of the group
    P += pid_b * spb
    G += pid_b * sgb
    ACC += pid_b * sab
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_d = offs_d < D
    mask_m = offs_m < m
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, c, BLOCK_C):  # as many tiles as over ldp: BLOCK_C is a multiple of 16
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        # P's rows are padded to ldp (a multiple of 16) with zeros: masked against ldp, the loads are
        # 16-byte vectors; G's rows c.. do not exist and load as 0
        p = tl.load(P + offs_m[:, None] * ldp + offs_c[None, :], mask=mask_m[:, None] & (offs_c < ldp)[None, :],
                    other=0.0)
        g = tl.load(G + offs_c[:, None] * D + offs_d[None, :], mask=(offs_c < c)[:, None] & mask_d[None, :],
                    other=0.0)
        acc = mma(p, g.to(tl.float32), acc, PRECISION, MODE, NATIVE_BF16)
    ptrs = ACC + offs_m[:, None] * D + offs_d[None, :]
    mask = mask_m[:, None] & mask_d[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


def _config(c: int, D: int, m: int, fma: bool) -> dict:
    if _util.interpreting():
        return dict(BLOCK_M=_util.clamp_pow2(m, 16, 128), BLOCK_C=_util.clamp_pow2(c, 16, 128),
                    BLOCK_D=_util.clamp_pow2(D, 16, 1024), num_warps=4)
    BLOCK_M = _util.clamp_pow2(m, 16, 128)
    # BLOCK_D = 128: each D tile re-reads all of P (see the module docstring); but 64 for the opt-in
    # "ieee" FMA path at m > 32, whose operands in registers spilled ~1.8 KB at 128 (bf16, m = 100)
    BLOCK_D = 64 if (fma and BLOCK_M >= 64) else 128
    return dict(BLOCK_M=BLOCK_M, BLOCK_C=32, BLOCK_D=BLOCK_D, num_warps=8 if BLOCK_M >= 64 else 4)


#: CUDA's limit on grid axis 2, the block axis of the launch
MAX_BLOCKS = 65535


def _launch(P: torch.Tensor, c: int, G: torch.Tensor, out: torch.Tensor, accumulate: bool,
            precision: str | None) -> None:
    """`P` (b, m, ldp) contiguous: the coefficients, rows padded with zeros to ldp = `_nd.padded_len(c)`;
    `G` (b, c, D) and `out` (b, m, D) groups of row-major blocks (any block strides). One launch."""
    b, m, ldp = P.shape
    D = G.shape[2]
    assert b <= MAX_BLOCKS, f"{b} blocks in one group: at most {MAX_BLOCKS} (split the group)"
    p = _util.dot_precision(G.dtype, G.device, precision)
    ip, split = _util.tl_precision(p)
    cfg = _config(c, D, m, ip == "ieee" and not split)
    grid = (_util.cdiv(D, cfg["BLOCK_D"]), _util.cdiv(m, cfg["BLOCK_M"]), b)
    _weighted_sum_kernel[grid](
        P, G, out, c, D, m, ldp, m * ldp, _util.block_stride(G), _util.block_stride(out),
        ACCUMULATE=accumulate,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], BLOCK_D=cfg["BLOCK_D"],
        PRECISION=ip, MODE=1 if split else 0, NATIVE_BF16=not _util.interpreting(),
        num_warps=cfg["num_warps"],
    )


def rank_one_accumulate(acc: torch.Tensor, G: torch.Tensor, V: torch.Tensor, w: torch.Tensor, *,
                        precision: str | None = None) -> None:
    """In place `acc ([b,] m, D) += ((V Gᵀ) * w) G` per block, `w` ([b,] c) (two reads of G, see the module
    docstring; two launches for the whole group)."""
    G3 = _util.blocks("G", G)
    b, c, D = G3.shape
    assert V.dim() == acc.dim() == G.dim() and w.dim() == G.dim() - 1, (
        f"V {tuple(V.shape)}, acc {tuple(acc.shape)}, w {tuple(w.shape)}: need the block axis of G {tuple(G.shape)}")
    V3, acc3 = _util.blocks("V", V, f32=True), _util.blocks("acc", acc, f32=True)
    m = V3.shape[1]
    assert V3.shape == (b, m, D), f"V has shape {tuple(V.shape)}, G has {tuple(G.shape)}"
    assert acc3.shape == (b, m, D), f"acc has shape {tuple(acc.shape)}, expected {tuple(V.shape)}"
    assert b == 1 or acc3.stride(0) >= m * D, f"acc: overlapping blocks (strides {acc.stride()})"
    assert w.dtype == torch.float32, f"w: expected float32, got {w.dtype}"
    assert w.shape == G.shape[:-1], f"w has shape {tuple(w.shape)}, expected {tuple(G.shape[:-1])}"
    P = _nd.launch(G3, V3, norms=False, dots=True, precision=precision, padded=True)[1]  # (b, m, ldp), zero pad
    P[..., :c].mul_(w.reshape(b, 1, c))  # w folded in once here, not per D tile; the pad columns stay 0
    _launch(P, c, G3, acc3, True, precision)


def weighted_sum(C: torch.Tensor, G: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
    """`C` ([b,] m, c) fp32, `G` ([b,] c, D) -> `([b,] m, D)` = C G per block (the second stage above, one
    read of G, one launch)."""
    G3 = _util.blocks("G", G)
    b, c, D = G3.shape
    assert C.dim() == G.dim(), f"C {tuple(C.shape)}: need the block axis of G {tuple(G.shape)}"
    C3 = _util.blocks("C", C, f32=True)
    assert C3.shape[0] == b and C3.shape[2] == c, f"coefficients have shape {tuple(C.shape)}, expected (m, c) per block of G {tuple(G.shape)}"
    ldp = _nd.padded_len(c)
    P = torch.nn.functional.pad(C3, (0, ldp - c)) if ldp != c else C3.contiguous()  # zero columns, aligned rows
    out = torch.empty(b, C3.shape[1], D, dtype=torch.float32, device=G.device)
    _launch(P, c, G3, out, False, precision)
    return out if G.dim() == 3 else out[0]


def rank_one_accumulate_reference(acc: torch.Tensor, G: torch.Tensor, V: torch.Tensor, w: torch.Tensor,
                                  upcast: bool = False) -> torch.Tensor:
    """Returns acc + ((V Gᵀ) w) G per block (out of place) in fp32 or float64."""
    dt = torch.float64 if upcast else torch.float32
    G = G.to(dt)
    return acc.to(dt) + ((V.to(dt) @ G.mT) * w.to(dt).unsqueeze(-2)) @ G


def weighted_sum_reference(C: torch.Tensor, G: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    dt = torch.float64 if upcast else torch.float32
    return C.to(dt) @ G.to(dt)
