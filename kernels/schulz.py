"""Batched Schulz (Newton–Schulz) inverse of SPD blocks: X ← X(2I − AX) = X + X R, R = I − AX.

`A` (b, k, k) SPD (float32 or float64) -> (X ≈ A⁻¹ float64, max relative
residual ‖I − AX‖_F/√k, steps). All blocks of one size are iterated together.

Kernels (one batched tiled GEMM with two epilogues, grid = (k/BT, k/BT, b)):
  * EPI = 0: R = I − A X, and each program also writes Σ R² over its tile
    into a (b, tiles) workspace: the residual norm for the stopping test comes
    out of the same kernel (summed by a tiny torch reduction), no extra pass
    over R.
  * EPI = 1: X_new = X + X R (X is read by the GEMM, so X_new is a second
    buffer; the two are swapped each step).

Precision schedule (and why):
  1. fp32 storage, `tl.dot(input_precision="ieee")` by default: every MMA
     product exact fp32 FMA. tf32 (2^-11 rounding) perturbs A X by ~5e-4·‖A‖‖X‖,
     which swamps the eigencomponents of A X that start near
     1/(κ·√k) (X_0 = I/‖A‖_F): they can turn negative and the iteration then
     diverges (on an H100 at the 13B shape, tf32 and bf16 Schulz lost the
     answer: 0.16 error, NaN). "tf32x3" (fp32-class accuracy on the tensor
     cores) is offered as `precision="tf32x3"` for the benchmark to compare.
  2. fp32 runs as long as it can still lower the residual. It stops when the
     residual is below `tol`; when every block's residual is down to what
     fp32 can attain, FLOOR = u·‖A‖_F‖X‖_F/√k (u = 2⁻²⁴: the normwise
     rounding error of R = I − AX accumulated in fp32, with random-like
     rounding, normalised like the residual; it grows with ‖X‖ as the
     iteration finds the small eigenvalues of A, to ~u·κ at the end, and
     measured floors sit 2–5× below it); or when the residual stops
     decreasing at all (rounding dominates before the estimate is reached).
     A residual that decreases slowly is NOT a reason to stop: with a few
     small eigenvalues μ of A X the iteration is in its linear phase (each
     step doubles μ, the residual ≈ √(p/k) barely moves) for ~log2(1/μ)
     steps, which fp32 does as well as float64 at a fraction of the cost
     (the former test "below 0.25 and not halved" sent that phase to float64:
     17 of 22 steps).
  3. float64 refinement: the remaining steps X ← X + X(I − AX) in float64
     (cuBLAS DGEMM through torch) until the residual is below `tol`. Each step
     squares the residual, so from the fp32 floor one or two steps reach
     1e-8..1e-16: the answer meets the float64 reference whatever κ fp32 could
     handle.
Memory: a block needs 4 fp32 k² buffers (A, X, R, X_new) then 3 float64 k²
buffers (X, R, temp): ~40 k² bytes; `schulz_inverse` runs groups of blocks
sized to 70 % of the free device memory (160 blocks of 5120² need ~170 GB in
all, so they go in ~2–3 groups on an 80 GB H100).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

try:  # installed as pyinf.kernels
    from . import _util
except ImportError:  # pragma: no cover - imported by path while developing
    import _util  # type: ignore

U32 = 2.0**-24  # fp32 unit roundoff
BYTES_PER_ENTRY = 4 * 4 + 3 * 8  # fp32 A, X, R, X_new + float64 X, R, temp


@triton.jit
def _schulz_gemm_kernel(
    L, Rm, C, O, SQ,
    k, tiles,
    EPI: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """O = I − L Rm (EPI 0, with per-tile Σ O² into SQ) or O = C + L Rm (EPI 1)."""
    pid_i = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    base = pid_b * k * k
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask_i = offs_i < k
    mask_j = offs_j < k
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < k
        a = tl.load(L + base + offs_i[:, None] * k + offs_k[None, :], mask=mask_i[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(Rm + base + offs_k[:, None] * k + offs_j[None, :], mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    mask = mask_i[:, None] & mask_j[None, :]
    ptrs = base + offs_i[:, None] * k + offs_j[None, :]
    if EPI == 0:
        eye = tl.where(offs_i[:, None] == offs_j[None, :], 1.0, 0.0)
        out = tl.where(mask, eye - acc, 0.0)
        tl.store(O + ptrs, out, mask=mask)
        tl.store(SQ + pid_b * tiles + pid_i * tl.num_programs(1) + pid_j, tl.sum(tl.sum(out * out, axis=1), axis=0))
    else:
        out = acc + tl.load(C + ptrs, mask=mask, other=0.0)
        tl.store(O + ptrs, out, mask=mask)


def _blocks(k: int) -> tuple[int, int, int]:
    if _util.interpreting():
        return _util.clamp_pow2(k, 16, 64), _util.clamp_pow2(k, 16, 64), 4
    return 64, 32, 4


def residual(A: torch.Tensor, X: torch.Tensor, R: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """R ← I − A X (in place, fp32) and return the per-block ‖R‖_F (float64, (b,))."""
    for name, t in (("A", A), ("X", X), ("R", R)):
        _util.check_f32(name, t, 3)
    b, k, _ = A.shape
    assert A.shape == X.shape == R.shape == (b, k, k), "A, X, R must all be (b, k, k)"
    BT, BK, nw = _blocks(k)
    t = _util.cdiv(k, BT)
    sq = torch.empty(b, t * t, dtype=torch.float32, device=A.device)
    _schulz_gemm_kernel[(t, t, b)](A, X, A, R, sq, k, t * t, EPI=0, BLOCK=BT, BLOCK_K=BK,
                                   PRECISION=precision, num_warps=nw)
    return sq.double().sum(1).sqrt()


def update(X: torch.Tensor, R: torch.Tensor, out: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """out ← X + X R = X (2I − A X) (fp32)."""
    for name, t in (("X", X), ("R", R), ("out", out)):
        _util.check_f32(name, t, 3)
    b, k, _ = X.shape
    assert X.shape == R.shape == out.shape == (b, k, k)
    BT, BK, nw = _blocks(k)
    t = _util.cdiv(k, BT)
    _schulz_gemm_kernel[(t, t, b)](X, R, X, out, out, k, t * t, EPI=1, BLOCK=BT, BLOCK_K=BK,
                                   PRECISION=precision, num_warps=nw)
    return out


def _group_size(b: int, k: int, device: torch.device) -> int:
    if device.type != "cuda":
        return b
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(b, int(0.7 * free) // (BYTES_PER_ENTRY * k * k)))


def _schulz_group(A: torch.Tensor, iterations: int, tol: float, precision: str) -> tuple[torch.Tensor, float, int]:
    b, k, _ = A.shape
    sk = math.sqrt(k)
    A32 = A.float().contiguous()
    norm_a = torch.linalg.matrix_norm(A.double())
    X = torch.eye(k, dtype=torch.float32, device=A.device).repeat(b, 1, 1)
    X /= norm_a.float().reshape(-1, 1, 1)
    R, Xn = torch.empty_like(X), torch.empty_like(X)
    res, prev, step = math.inf, math.inf, 0
    # stage 1: fp32 Triton steps, while they lower the residual (module docstring)
    while True:
        res_b = residual(A32, X, R, precision) / sk
        res = float(res_b.max())
        if res < tol or step == iterations:
            return X.double(), res, step
        floor_b = U32 * norm_a * torch.linalg.matrix_norm(X).double() / sk
        if bool((res_b <= floor_b).all()) or res >= prev:
            break
        prev = res
        update(X, R, Xn, precision)
        X, Xn = Xn, X
        step += 1
    del A32, R, Xn
    # stage 2: float64 refinement (torch / cuBLAS)
    A64 = A.double()
    X64 = X.double()
    del X
    eye = torch.eye(k, dtype=torch.float64, device=A.device)
    while True:
        R64 = eye - A64 @ X64
        res = float(torch.linalg.matrix_norm(R64).max()) / sk
        if res < tol or step == iterations:
            return X64, res, step
        X64 = X64 + X64 @ R64
        step += 1


def schulz_inverse(A: torch.Tensor, iterations: int, tol: float, *, precision: str = "ieee",
                   group: int | None = None) -> tuple[torch.Tensor, float, int]:
    """Batched SPD inverse `A` (b, k, k) -> (X float64, max relative residual, max steps), see above."""
    assert A.dim() == 3 and A.shape[1] == A.shape[2], f"A must be (b, k, k), got {tuple(A.shape)}"
    assert A.dtype in (torch.float32, torch.float64), f"A: dtype {A.dtype}"
    assert precision in ("ieee", "tf32x3", "tf32"), f"precision {precision!r}"
    b, k, _ = A.shape
    group = group or _group_size(b, k, A.device)
    out = torch.empty(b, k, k, dtype=torch.float64, device=A.device)
    worst, steps = 0.0, 0
    for s in range(0, b, group):
        X, res, st = _schulz_group(A[s : s + group], iterations, tol, precision)
        out[s : s + group] = X
        worst, steps = max(worst, res), max(steps, st)
    return out, worst, steps


def schulz_step_reference(A: torch.Tensor, X: torch.Tensor, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One step in plain PyTorch: (X (2I − A X), per-block ‖I − A X‖_F)."""
    dt = torch.float64 if upcast else A.dtype
    A, X = A.to(dt), X.to(dt)
    R = torch.eye(A.shape[-1], dtype=dt, device=A.device) - A @ X
    return X + X @ R, torch.linalg.matrix_norm(R)


def schulz_inverse_reference(A: torch.Tensor, iterations: int, tol: float, upcast: bool = True):
    """Plain PyTorch Schulz, X_0 = I/‖A‖_F (float64 with `upcast`)."""
    dt = torch.float64 if upcast else A.dtype
    A = A.to(dt)
    k = A.shape[-1]
    X = torch.eye(k, dtype=dt, device=A.device) / torch.linalg.matrix_norm(A).reshape(-1, 1, 1)
    for step in range(iterations + 1):
        Xn, r = schulz_step_reference(A, X)
        res = float(r.max()) / math.sqrt(k)
        if res < tol or step == iterations:
            return X, res, step
        X = Xn
    raise AssertionError("unreachable")
