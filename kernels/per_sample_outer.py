"""Per-sample outer products with their squared norms, in one pass.

For every sample b of a batch::

    out[b] = Σ_t m[b, t] · u[b, t]ᵀ ⊗ v[b, t]        (DU, DV), fp32
    sq[b]  = ‖out[b]‖²_F                                    fp32

with u `(B, T, DU)`, v `(B, T, DV)` (fp32, fp16 or bf16, any strides) and an
optional padding mask m `(B, T)` (nonzero = real token). This is the
per-sample weight gradient of a linear layer from its captured input a and
output gradient e: `g = Σ_t e ⊗ a` (u = e, v = a), or the transposed LoRA B
gradient (u = a, v = e). The squared norms come from the accumulator tiles
in registers, so a gradient is written once and never read back for them.

Layout: `@triton.jit` kernel -> launcher `per_sample_outer` (asserts, grid,
allocation) and the plain-PyTorch reference `per_sample_outer_reference`
(float64 upcast option) used by tests and benchmarks.

Numerics: fp32 accumulation. fp32 inputs use an IEEE fp32 dot (no tf32).
On a GPU fp16/bf16 inputs go to the tensor cores as they are (their products
are exact in fp32 and accumulated in fp32); under ``TRITON_INTERPRET=1``
they are converted to fp32 first (bf16 arithmetic is wrong in the
interpreter). Padded positions are masked at the load (`other=0`), so a
NaN/Inf in a padded row never reaches the result. Offsets are int64.
Only Triton API common to Triton 3.6 and the newest release is used (no
block pointers).
"""
from __future__ import annotations

import torch

try:  # installed as pyinf.kernels
    from . import _util
except ImportError:  # pragma: no cover - imported by path while developing
    import _util  # type: ignore

try:  # Triton is optional: the reference works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["per_sample_outer", "per_sample_outer_reference", "is_available"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_available() -> bool:
    """True when Triton is importable (the kernel needs CUDA or the interpreter)."""
    return triton is not None


def _interpreting() -> bool:
    return _util.interpreting()  # one rule for every kernel


if triton is not None:

    @triton.jit
    def _per_sample_outer_kernel(
        U, V, M, OUT, PART,
        T, DU, DV,
        su_b, su_t, su_d,
        sv_b, sv_t, sv_d,
        sm_b, sm_t,
        so_b, so_u, so_v,
        sp_b,
        HAS_MASK: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_U: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_u = tl.program_id(1).to(tl.int64)
        pid_v = tl.program_id(2).to(tl.int64)
        n_v = tl.num_programs(2).to(tl.int64)

        offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U).to(tl.int64)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        in_u = offs_u < DU
        in_v = offs_v < DV
        u_base = U + pid_b * su_b
        v_base = V + pid_b * sv_b

        acc = tl.zeros((BLOCK_U, BLOCK_V), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            keep = offs_t < T
            if HAS_MASK:
                m = tl.load(M + pid_b * sm_b + offs_t * sm_t, mask=keep, other=0)
                keep = keep & (m != 0)
            u = tl.load(
                u_base + offs_t[:, None] * su_t + offs_u[None, :] * su_d,
                mask=keep[:, None] & in_u[None, :],
                other=0.0,
            )  # (BLOCK_T, BLOCK_U)
            v = tl.load(
                v_base + offs_t[:, None] * sv_t + offs_v[None, :] * sv_d,
                mask=keep[:, None] & in_v[None, :],
                other=0.0,
            )  # (BLOCK_T, BLOCK_V)
            if UPCAST:
                acc += tl.dot(
                    tl.trans(u.to(tl.float32)), v.to(tl.float32), input_precision="ieee"
                )
            else:
                acc += tl.dot(tl.trans(u), v)

        out_ptrs = OUT + pid_b * so_b + offs_u[:, None] * so_u + offs_v[None, :] * so_v
        tl.store(out_ptrs, acc, mask=in_u[:, None] & in_v[None, :])
        # entries outside (DU, DV) are exactly 0 (masked loads), so the tile's
        # sum of squares is that of the stored part.
        part = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
        tl.store(PART + pid_b * sp_b + pid_u * n_v + pid_v, part)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def per_sample_outer(
    u: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    sq_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher: `(out (B, DU, DV) fp32, sq (B,) fp32)`, see the module doc.

    `out` / `sq_out`: optional preallocated fp32 outputs (any strides for
    `out`); every entry is written. Runs on CUDA tensors, or on CPU tensors
    under ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("per_sample_outer needs triton; use per_sample_outer_reference")
    assert u.dim() == 3 and v.dim() == 3, f"u, v must be (B, T, D), got {tuple(u.shape)}, {tuple(v.shape)}"
    B, T, DU = u.shape
    assert v.shape[:2] == (B, T), f"u {tuple(u.shape)} and v {tuple(v.shape)} disagree on (B, T)"
    DV = v.shape[2]
    assert u.dtype in _DTYPES and v.dtype in _DTYPES, f"unsupported dtypes {u.dtype}, {v.dtype}"
    assert u.device == v.device, "u and v on different devices"
    dev = u.device
    if dev.type != "cuda" and not _interpreting():
        raise RuntimeError("per_sample_outer runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    if mask is not None:
        assert mask.shape == (B, T), f"mask must be (B, T) = {(B, T)}, got {tuple(mask.shape)}"
        assert mask.device == dev, "mask on a different device"
        if mask.dtype == torch.bool:
            mask = mask.to(torch.int8)
    if out is None:
        out = torch.empty((B, DU, DV), dtype=torch.float32, device=dev)
    else:
        assert out.shape == (B, DU, DV) and out.dtype == torch.float32 and out.device == dev, (
            f"out must be float32 {(B, DU, DV)} on {dev}"
        )
    if sq_out is not None:
        assert sq_out.shape == (B,) and sq_out.dtype == torch.float32 and sq_out.device == dev
    if B == 0 or DU == 0 or DV == 0:
        sq = torch.zeros(B, dtype=torch.float32, device=dev)
        out.zero_()
        return out, (sq_out.copy_(sq) if sq_out is not None else sq)

    upcast = _interpreting() or u.dtype != v.dtype or u.dtype == torch.float32
    # tl.dot on a GPU needs every dimension >= 16 and powers of two.
    BLOCK_U = _block(DU, 16, 64)
    BLOCK_V = _block(DV, 16, 128 if BLOCK_U <= 32 else 64)
    # 16-bit inputs with a LoRA rank below 16 (u's tile mostly masked): 64-row T tiles spill on Triton 3.9's
    # ptxas at sm_90 (40/24 B at SD-1.5's r = 4, bench/compile_sm90.py); 32 rows do not
    BLOCK_T = _block(T, 16, 32 if upcast or DU < 16 else 64)
    grid = (B, triton.cdiv(DU, BLOCK_U), triton.cdiv(DV, BLOCK_V))
    part = torch.empty((B, grid[1] * grid[2]), dtype=torch.float32, device=dev)
    m_arg = mask if mask is not None else u  # dummy pointer, never read
    sm = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    _per_sample_outer_kernel[grid](
        u, v, m_arg, out, part,
        T, DU, DV,
        u.stride(0), u.stride(1), u.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        sm[0], sm[1],
        out.stride(0), out.stride(1), out.stride(2),
        part.stride(0),
        HAS_MASK=mask is not None,
        UPCAST=upcast,
        BLOCK_T=BLOCK_T,
        BLOCK_U=BLOCK_U,
        BLOCK_V=BLOCK_V,
        num_warps=4,
    )
    sq = part.sum(dim=1)
    if sq_out is not None:
        sq_out.copy_(sq)
        sq = sq_out
    return out, sq


def per_sample_outer_reference(
    u: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    upcast_fp64: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: `out[b] = Σ_t m[b,t] u[b,t]ᵀ ⊗ v[b,t]`, `sq[b] = ‖out[b]‖²`.

    Computed in float32 (float64 with `upcast_fp64`); padded rows are
    selected away (not multiplied), like the kernel's masked loads.
    """
    dt = torch.float64 if upcast_fp64 else torch.float32
    u = u.to(dt)
    v = v.to(dt)
    if mask is not None:
        keep = (mask != 0)[:, :, None]
        u = torch.where(keep, u, torch.zeros((), dtype=dt, device=u.device))
        v = torch.where(keep, v, torch.zeros((), dtype=dt, device=v.device))
    out = torch.einsum("btu,btv->buv", u, v)
    return out, out.pow(2).sum(dim=(1, 2))
