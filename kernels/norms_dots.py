"""Fused per-sample squared norms and query dots: s_i = ‖g_i‖², P = V Gᵀ (one read of G).

Shapes: `G` (c, D) float32 / bfloat16 / float16 (stored dtype, never upcast in
memory), `V` (m, D) float32 -> `s` (c,) float32, `P` (m, c) float32.

Tiling. A program owns a tile of BLOCK_C samples × BLOCK_M queries and a slice
of D; it walks its slice in BLOCK_D steps, loading each G tile once (converted
to fp32 in registers), adding Σ g² to the norms and `V_tile · G_tileᵀ` to the
(BLOCK_M, BLOCK_C) dot block on the tensor cores (see `_dot.py` for the
precision modes). With m ≤ 128 there is one query tile, so every byte of G is
read exactly once; the V tile (m × BLOCK_D) is re-read per sample tile from L2.

Split over D (two-stage reduction). A chunk of c = 900 samples gives only 15
to 29 sample tiles, far too few programs for 132 SMs, so D is split into
`splits` slices of whole BLOCK_D tiles, balanced to within one tile (grid axis
2): each program writes its partial norms/dots to a (splits, ...) fp32
workspace, and a second, tiny stage sums the workspace (torch `.sum(0)`).
Deterministic, unlike atomics. The partials are not free at large m: splits ×
m × c floats written and read back, e.g. 26 × 100 × 912 × 4 B = 9.5 MB twice
against 74 MB of bf16 G at the 13B shape, so the split count is the smallest
that fills the machine (`_splits`): it minimises (waves of resident programs)
× (D tiles per program), i.e. no one-program-per-SM tail (c = 900, m = 100:
15 × 26 = 390 programs, 2.95 waves on 132 SMs at one per SM; the former
rule, 36 splits = 540 programs, ran 4.09 waves: an 18 % tail). With splits = 1
the kernel writes the outputs directly. Norms are written by the
query-tile-0 programs only. Offsets are int64 (c × D exceeds 2³¹ at the 13B
shape).

Padded rows of P. The dots are stored with a row stride `ldp` = c rounded up
to a multiple of 16 (the columns c..ldp hold exact zeros: those G rows load
as 0), so that Triton knows every row start is 64-byte aligned and stores
16-byte vectors; `rank_one_accumulate` takes that padded P as it is (its P
loads are 16-byte vectors too, for any c). The public functions return the
(m, c) part, contiguous.

`score.py` launches the same kernel with norms off and SIGN = -1.
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


@triton.jit
def _norms_dots_kernel(
    G, V, S, P,
    c, D, m, ldp, d_tiles, splits,
    COMPUTE_NORMS: tl.constexpr, COMPUTE_DOTS: tl.constexpr, SIGN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, MODE: tl.constexpr, NATIVE_BF16: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_c = offs_c < c
    mask_m = offs_m < m
    d_start = (pid_d * d_tiles // splits) * BLOCK_D  # balanced: slices differ by at most one tile
    d_stop = tl.minimum(((pid_d + 1) * d_tiles // splits) * BLOCK_D, D)

    sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for d0 in range(d_start, d_stop, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < d_stop
        g = tl.load(G + offs_c[:, None] * D + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        g = g.to(tl.float32)
        if COMPUTE_NORMS:
            sq += tl.sum(g * g, axis=1)
        if COMPUTE_DOTS:
            v = tl.load(V + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            acc = mma(v, tl.trans(g), acc, PRECISION, MODE, NATIVE_BF16)

    if COMPUTE_NORMS:
        if pid_m == 0:
            tl.store(S + pid_d * c + offs_c, sq, mask=mask_c)
    if COMPUTE_DOTS:
        p_ptrs = P + pid_d * m * ldp + offs_m[:, None] * ldp + offs_c[None, :]
        tl.store(p_ptrs, acc * SIGN, mask=mask_m[:, None] & (offs_c < ldp)[None, :])


def _splits(tiles: int, d_tiles: int, slots: int, most: int) -> int:
    """The D split for `tiles` (sample × query) tiles: the smallest s ≤ `most` that minimises
    waves × D tiles per program, cdiv(tiles · s, slots) · cdiv(d_tiles, s), where `slots` programs
    run at once. That product is the run time in D-tile steps of one program when every program
    streams at the same rate; its floor, tiles · d_tiles / slots, is met when the last wave is full."""
    return min(range(1, most + 1), key=lambda s: (_util.cdiv(tiles * s, slots) * _util.cdiv(d_tiles, s), s))


def _config(c: int, D: int, m: int, device: torch.device, dots: bool) -> dict:
    """Block sizes and the D split for a launch."""
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
    sms = _util.num_sms(device)
    # Programs resident per SM on sm_90, a lower bound from bench/results/kernels-sm90-i13.md: 8 warps
    # with 133-218 registers hold one SM alone; 4 warps with <= 117 registers and <= 24 KB fit 4.
    per_sm = 1 if num_warps == 8 else 4
    # At most ~4 programs per SM in all (the former target): more splits only add partials to sum.
    most = max(1, min(d_tiles, _util.cdiv(4 * sms, tiles)))
    splits = _splits(tiles, d_tiles, per_sm * sms, most)
    return dict(BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, splits=splits, num_warps=num_warps)


def launch(G: torch.Tensor, V: torch.Tensor | None, *, norms: bool, dots: bool, sign: float = 1.0,
           precision: str | None = None, splits: int | None = None,
           padded: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launcher shared by `norms_dots`, `sq_norms`, `score.score` and `rank_one_accumulate`.

    `splits` overrides the D split. `padded`: the dots come back as `(m, ldp)`, ldp = c rounded up to
    a multiple of 16, columns c.. zero (the layout `rank_one_accumulate` loads as 16-byte vectors);
    otherwise `(m, c)`, contiguous."""
    _util.check_storage("G", G, 2)
    c, D = G.shape
    assert c >= 1 and D >= 1, f"G: empty shape {tuple(G.shape)}"
    assert norms or dots
    if dots:
        _util.check_f32("V", V, 2)
        assert V.shape[1] == D, f"V has D={V.shape[1]}, G has D={D}"
        assert V.device == G.device, "V and G on different devices"
        m = V.shape[0]
        assert m >= 1
    else:
        m, V = 1, G
    cfg = _config(c, D, m, G.device, dots)
    BLOCK_D = cfg["BLOCK_D"]
    d_tiles = _util.cdiv(D, BLOCK_D)
    splits = min(splits or cfg["splits"], d_tiles)
    ldp = padded_len(c)
    f32 = dict(dtype=torch.float32, device=G.device)
    S = torch.empty((splits, c), **f32) if norms else torch.empty(1, **f32)
    P = torch.empty((splits, m, ldp), **f32) if dots else torch.empty(1, **f32)
    p = _util.dot_precision(G.dtype, G.device, precision)
    ip, split = _util.tl_precision(p)
    grid = (_util.cdiv(c, cfg["BLOCK_C"]), _util.cdiv(m, cfg["BLOCK_M"]) if dots else 1, splits)
    _norms_dots_kernel[grid](
        G, V, S, P, c, D, m, ldp, d_tiles, splits,
        COMPUTE_NORMS=norms, COMPUTE_DOTS=dots, SIGN=float(sign),
        BLOCK_C=cfg["BLOCK_C"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=BLOCK_D,
        PRECISION=ip, MODE=1 if split else 0, NATIVE_BF16=not _util.interpreting(),
        num_warps=cfg["num_warps"],
    )
    s_out = (S[0] if splits == 1 else S.sum(0)) if norms else None
    p_out = None
    if dots:
        P = P if padded else P[:, :, :c]
        p_out = (P[0] if splits == 1 else P.sum(0)).contiguous()
    return s_out, p_out


def padded_len(c: int) -> int:
    """The row stride of the dots: c rounded up to a multiple of 16 (Triton's alignment hint)."""
    return _util.cdiv(c, 16) * 16


def norms_dots(G: torch.Tensor, V: torch.Tensor, *, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`G` (c, D) fp32/bf16/fp16, `V` (m, D) fp32 -> (`(c,)` ‖g_i‖², `(m, c)` V Gᵀ), reading G once."""
    return launch(G, V, norms=True, dots=True, precision=precision)


def sq_norms(G: torch.Tensor) -> torch.Tensor:
    """`G` (c, D) -> `(c,)` ‖g_i‖² (fp32 accumulation)."""
    return launch(G, None, norms=True, dots=False)[0]


def dots(G: torch.Tensor, V: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
    """`G` (c, D), `V` (m, D) -> `(m, c)` V Gᵀ."""
    return launch(G, V, norms=False, dots=True, precision=precision)[1]


def norms_dots_reference(G: torch.Tensor, V: torch.Tensor, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: fp32 (or float64 with `upcast`)."""
    dt = torch.float64 if upcast else torch.float32
    G, V = G.to(dt), V.to(dt)
    return (G * G).sum(1), V @ G.T
