"""Fused per-sample squared norms and query dots: s_i = ‖g_i‖², P = V Gᵀ (one read of G), per block.

Shapes: `G` (c, D), or a group (b, c, D) of b same-shape blocks, float32 /
bfloat16 / float16 (stored dtype, never upcast in memory), `V` ([b,] m, D)
float32 -> `s` ([b,] c) float32, `P` ([b,] m, c) float32. Every block G[k]
is row-major contiguous; the block strides of G and V are kernel arguments
(G may be a view of a bigger chunk). A group is ONE launch: the 160 blocks of
8 × 5120 at the 13B LoRA shape cost one launch per chunk, not 160.
`score.py` launches the same kernel in its *summed* mode (`sum_blocks`):
one (m, c) result Σ_k ±V_k G_kᵀ.

Tiling. A program owns a tile of BLOCK_C samples × BLOCK_M queries and a
range of the reduction, which it walks in BLOCK_D steps, loading each G tile
once (converted to fp32 in registers), adding Σ g² to the norms and
`V_tile · G_tileᵀ` to the (BLOCK_M, BLOCK_C) dot block on the tensor cores
(see `_dot.py` for the precision modes). The reduction is indexed by
t = k · d_tiles + (D tile): per block, a program's range lies in one block k
(grid axis 0 = block × sample tiles; axis 1 = query tiles; axis 2 = D slices);
summed, the range runs across blocks, which are just more of the reduction
(axis 0 = sample tiles). With m ≤ 128 there is one query tile, so every byte
of G is read exactly once per call; the V tile (m × BLOCK_D) is re-read per
sample tile from L2. V itself is read once per call too, m × D × 4 B per
block against c × D × itemsize of G: at the 13B group with chunks of c = 20
and m = 100, V (2.6 GB) is 10× the bytes of G (262 MB), i.e. small chunks
make the query side, not G, the traffic of a call (V / G = 4m / (c ·
itemsize); c ≥ 2m keeps V within G for bf16).

Split of the reduction (two-stage, deterministic). A chunk of c = 900
samples of one block gives only 15 to 29 sample tiles, far too few programs
for 132 SMs, so the reduction is split into `splits` slices of whole BLOCK_D
tiles, balanced to within one tile (grid axis 2): each program writes its
partial norms/dots to a (splits, ...) fp32 workspace, and a second, tiny
stage sums the workspace over the slices (torch `.sum(0)`, fixed order; no
atomics). The split count (`_splits`) is the smallest that fills the
machine: it minimises (waves of resident programs) × (D tiles per program)
over the tiles of ALL blocks (b × sample × query tiles; summed: sample ×
query tiles over a b·D reduction), so a group needs few splits or none; and
the workspace, splits × (m × ldp + c) × 4 B per output block, is capped at a
quarter of the bytes of G (written and read once: at most half a read of G
more traffic). At the 13B shape (bf16, D = 40960, m = 100, 132 SMs):
  * one block of c = 900: 15 sample tiles × 26 splits = 390 programs, 2.95
    waves at one per SM; workspace 26 × 100 × 912 × 4 B = 9.5 MB = 13 % of G
    (74 MB);
  * a group of b = 160 blocks of c = 20: 160 tiles × 4 splits = 640
    programs (97 % of the ideal waves); workspace 4 × 160 × 100 × 32 × 4 B =
    8.2 MB = 3.1 % of G (262 MB). One block of c = 20 alone gets 32 splits,
    at the cap (0.41 MB for 1.6 MB of G); without the cap it took 128, a
    workspace as large as G;
  * score on that group (summed): 132 slices of the 160 · 640 tiles, one
    wave; workspace 132 × 100 × 32 × 4 B = 1.7 MB = 0.6 % of G.
With splits = 1 the kernel writes the outputs directly. Norms are written by
the query-tile-0 programs only. Offsets are int64 (c × D exceeds 2³¹ at the
13B shape); the step counter t is int32 (its division by d_tiles, once per
step, is inline in int32; in int64 it is a call, which spilled at m ≤ 16).

Padded rows of P. The dots are stored with a row stride `ldp` = c rounded up
to a multiple of 16 (the columns c..ldp hold exact zeros: those G rows load
as 0), so that Triton knows every row start is 64-byte aligned and stores
16-byte vectors; `rank_one_accumulate` takes that padded P as it is (its P
loads are 16-byte vectors too, for any c). The public functions return the
([b,] m, c) part, contiguous.
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

#: the partials' workspace is at most 1/WORKSPACE_SHARE of the bytes of G (see the module docstring)
WORKSPACE_SHARE = 4


@triton.jit
def _norms_dots_kernel(
    G, V, S, P,
    c, D, m, ldp, c_tiles, d_tiles, span, splits, n_out, sgb, svb,
    COMPUTE_NORMS: tl.constexpr, COMPUTE_DOTS: tl.constexpr, SIGN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, MODE: tl.constexpr, NATIVE_BF16: tl.constexpr,
):
    pid_0 = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    pid_b = pid_0 // c_tiles  # the output block (0 when summed: n_out = 1)
    pid_c = pid_0 % c_tiles
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_c = offs_c < c
    mask_m = offs_m < m
    # reduction steps t = block · d_tiles + D tile; this program's slice of its `span` tiles, balanced.
    # t < b · d_tiles < 2³¹: int32, whose division is inline (int64's is a call: it spilled)
    t_lo = (pid_b * d_tiles + pid_s * span // splits).to(tl.int32)
    t_hi = (pid_b * d_tiles + (pid_s + 1) * span // splits).to(tl.int32)

    sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        k = t // d_tiles
        offs_d = ((t - k * d_tiles) * BLOCK_D).to(tl.int64) + tl.arange(0, BLOCK_D).to(tl.int64)
        k = k.to(tl.int64)
        mask_d = offs_d < D
        g = tl.load(G + k * sgb + offs_c[:, None] * D + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :],
                    other=0.0)
        g = g.to(tl.float32)
        if COMPUTE_NORMS:
            sq += tl.sum(g * g, axis=1)
        if COMPUTE_DOTS:
            v = tl.load(V + k * svb + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                        other=0.0)
            acc = mma(v, tl.trans(g), acc, PRECISION, MODE, NATIVE_BF16)

    out = pid_s * n_out + pid_b  # workspace (splits, n_out, ...)
    if COMPUTE_NORMS:
        if pid_m == 0:
            tl.store(S + out * c + offs_c, sq, mask=mask_c)
    if COMPUTE_DOTS:
        p_ptrs = P + out * m * ldp + offs_m[:, None] * ldp + offs_c[None, :]
        tl.store(p_ptrs, acc * SIGN, mask=mask_m[:, None] & (offs_c < ldp)[None, :])


def _splits(tiles: int, d_tiles: int, slots: int, most: int) -> int:
    """The reduction split for `tiles` output tiles (of all blocks) of `d_tiles` D tiles each: the smallest
    s ≤ `most` that minimises waves × D tiles per program, cdiv(tiles · s, slots) · cdiv(d_tiles, s), where
    `slots` programs run at once. That product is the run time in D-tile steps of one program when every
    program streams at the same rate; its floor, tiles · d_tiles / slots, is met when the last wave is full."""
    return min(range(1, most + 1), key=lambda s: (_util.cdiv(tiles * s, slots) * _util.cdiv(d_tiles, s), s))


def _config(b: int, c: int, D: int, m: int, device: torch.device, *, norms: bool, dots: bool,
            sum_blocks: bool = False, itemsize: int = 2) -> dict:
    """Block sizes and the reduction split for a launch on a group of b blocks of (c, D), G of `itemsize` bytes."""
    if _util.interpreting():  # few, big programs: ~1 ms per program in the interpreter
        BLOCK_C = _util.clamp_pow2(c, 16, 128)
        BLOCK_M = _util.clamp_pow2(m, 16, 128)
        BLOCK_D = _util.clamp_pow2(D, 16, 1024)
        return dict(BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, splits=1, num_warps=4)
    BLOCK_M = _util.clamp_pow2(m, 16, 128) if dots else 16
    BLOCK_C = 64 if (dots and BLOCK_M >= 64) else 32 if dots else 64
    BLOCK_C = min(BLOCK_C, _util.clamp_pow2(c, 16, 64))
    BLOCK_D = 64 if dots else 128
    num_warps = 8 if BLOCK_M >= 64 else 4
    tiles = _util.cdiv(c, BLOCK_C) * (_util.cdiv(m, BLOCK_M) if dots else 1)
    d_tiles = _util.cdiv(D, BLOCK_D)
    n_out = 1 if sum_blocks else b
    tiles, span = (tiles, b * d_tiles) if sum_blocks else (b * tiles, d_tiles)
    sms = _util.num_sms(device)
    # Programs resident per SM on sm_90, a lower bound from bench/results/kernels-sm90-i13.md: 8 warps
    # with 133-218 registers hold one SM alone; 4 warps with <= 117 registers and <= 24 KB fit 4.
    per_sm = 1 if num_warps == 8 else 4
    # At most ~4 programs per SM in all (the former target): more splits only add partials to sum;
    # and the workspace (per split: n_out blocks of partial dots and norms) within 1/WORKSPACE_SHARE of G
    per_split = 4 * n_out * ((m * padded_len(c) if dots else 0) + (c if norms else 0))
    cap = b * c * D * itemsize // (WORKSPACE_SHARE * per_split)
    most = max(1, min(span, _util.cdiv(4 * sms, tiles), cap))
    splits = _splits(tiles, span, per_sm * sms, most)
    return dict(BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, splits=splits, num_warps=num_warps)


def launch(G: torch.Tensor, V: torch.Tensor | None, *, norms: bool, dots: bool, sign: float = 1.0,
           sum_blocks: bool = False, precision: str | None = None, splits: int | None = None,
           padded: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launcher shared by `norms_dots`, `sq_norms`, `dots`, `score.score` and `rank_one_accumulate`.

    `G` (c, D) or (b, c, D), `V` like it ((m, D) / (b, m, D)); one launch for the group. Returns
    (`([b,] c)` norms, `([b,] m, c)` dots), the block axis only for a 3-D G; `sum_blocks` (dots only):
    the dots summed over the blocks, `(m, c)`. `splits` overrides the reduction split. `padded`: the dots
    come back as `([b,] m, ldp)`, ldp = c rounded up to a multiple of 16, columns c.. zero (the layout
    `rank_one_accumulate` loads as 16-byte vectors); otherwise `([b,] m, c)`, contiguous."""
    batched = G.dim() == 3
    G3 = _util.blocks("G", G)
    b, c, D = G3.shape
    assert c >= 1 and D >= 1, f"G: empty shape {tuple(G.shape)}"
    assert norms or dots
    assert not (sum_blocks and norms), "the norms are per block"
    if dots:
        assert V is not None and V.dim() == G.dim(), f"V: expected {G.dim()} dims like G, got {None if V is None else tuple(V.shape)}"
        V3 = _util.blocks("V", V, f32=True)
        assert V3.shape[0] == b and V3.shape[2] == D, f"V has shape {tuple(V.shape)}, G has {tuple(G.shape)}"
        assert V.device == G.device, "V and G on different devices"
        m = V3.shape[1]
        assert m >= 1
    else:
        m, V3 = 1, G3
    cfg = _config(b, c, D, m, G.device, norms=norms, dots=dots, sum_blocks=sum_blocks, itemsize=G.element_size())
    BLOCK_D = cfg["BLOCK_D"]
    d_tiles = _util.cdiv(D, BLOCK_D)
    assert b * d_tiles < 2**31, f"{b} blocks of {d_tiles} D tiles: the step counter is int32"
    n_out = 1 if sum_blocks else b
    span = b * d_tiles if sum_blocks else d_tiles
    splits = min(splits or cfg["splits"], span)
    ldp = padded_len(c)
    c_tiles = _util.cdiv(c, cfg["BLOCK_C"])
    f32 = dict(dtype=torch.float32, device=G.device)
    S = torch.empty((splits, b, c), **f32) if norms else torch.empty(1, **f32)
    P = torch.empty((splits, n_out, m, ldp), **f32) if dots else torch.empty(1, **f32)
    p = _util.dot_precision(G.dtype, G.device, precision)
    ip, split = _util.tl_precision(p)
    grid = (n_out * c_tiles, _util.cdiv(m, cfg["BLOCK_M"]) if dots else 1, splits)
    _norms_dots_kernel[grid](
        G3, V3, S, P, c, D, m, ldp, c_tiles, d_tiles, span, splits, n_out,
        _util.block_stride(G3), _util.block_stride(V3),
        COMPUTE_NORMS=norms, COMPUTE_DOTS=dots, SIGN=float(sign),
        BLOCK_C=cfg["BLOCK_C"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=BLOCK_D,
        PRECISION=ip, MODE=1 if split else 0, NATIVE_BF16=not _util.interpreting(),
        num_warps=cfg["num_warps"],
    )
    s_out = p_out = None
    if norms:
        s_out = S[0] if splits == 1 else S.sum(0)
        s_out = s_out if batched else s_out[0]
    if dots:
        P = P if padded else P[..., :c]
        p_out = (P[0] if splits == 1 else P.sum(0)).contiguous()
        p_out = p_out if (batched and not sum_blocks) else p_out[0]
    return s_out, p_out


def padded_len(c: int) -> int:
    """The row stride of the dots: c rounded up to a multiple of 16 (Triton's alignment hint)."""
    return _util.cdiv(c, 16) * 16


def norms_dots(G: torch.Tensor, V: torch.Tensor, *, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`G` ([b,] c, D) fp32/bf16/fp16, `V` ([b,] m, D) fp32 -> (`([b,] c)` ‖g_i‖², `([b,] m, c)` V Gᵀ), reading
    G once."""
    return launch(G, V, norms=True, dots=True, precision=precision)


def sq_norms(G: torch.Tensor) -> torch.Tensor:
    """`G` ([b,] c, D) -> `([b,] c)` ‖g_i‖² (fp32 accumulation)."""
    return launch(G, None, norms=True, dots=False)[0]


def dots(G: torch.Tensor, V: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
    """`G` ([b,] c, D), `V` ([b,] m, D) -> `([b,] m, c)` V Gᵀ per block."""
    return launch(G, V, norms=False, dots=True, precision=precision)[1]


def norms_dots_reference(G: torch.Tensor, V: torch.Tensor, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: fp32 (or float64 with `upcast`), per block for a group."""
    dt = torch.float64 if upcast else torch.float32
    G, V = G.to(dt), V.to(dt)
    return (G * G).sum(-1), V @ G.mT
