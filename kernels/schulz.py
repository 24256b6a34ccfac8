"""Batched Schulz (Newton–Schulz) inverse of SPD blocks: X ← X(2I − AX) = X + X R, R = I − AX.

`A` (b, k, k) SPD (float32 or float64) -> (X ≈ A⁻¹ float64, max relative
residual ‖I − AX‖_F/√k, steps). All blocks of one size are iterated together.

Kernels (one batched tiled GEMM with two epilogues, grid = (n/BT, n/BT, b)):
  * EPI = 0: R = I − A X, and each program also writes Σ R² over its tile
    into a (b, tiles) workspace: the residual norm for the stopping test comes
    out of the same kernel (summed by a tiny torch reduction), no extra pass
    over R.
  * EPI = 1: X_new = X + X R (X is read by the GEMM, so X_new is a second
    buffer; the two are swapped each step).
Padding: the fp32 stage stores A, X, R as n × n with n = k rounded up to a
multiple of 16 (`padded`), zero beyond k. The identity of R = I − AX is
written for i < k only, so the padding stays exactly zero under the
iteration (rows and columns ≥ k of A, X and R are zero, hence of AX, X R and
X_new too) and adds nothing to ‖R‖. With the row stride and the masks at a
multiple of 16, every global access is a 16-byte vector whatever k is (at
k = 900 they were 4-byte scalars, see `bench/compile_sm90.py`), for the
default FMA path and the tensor-core opt-ins alike; the cost is (n/k)³ - 1
more FLOPs (4 % at k = 900, 0 at 5120).
Tiles: on a GPU BLOCK, BLOCK_K and the warps are chosen by `triton.autotune`
among `TILES` (`_autotune.py`, keyed on n, the precision and the epilogue);
the first is the former fixed 64 × 32. The Σ R² workspace is
sized for the smallest BLOCK of the list and zeroed (a bigger tile leaves
part of it unwritten), and the autotuner zeroes it again after its
benchmark runs.

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
Memory: a block needs 4 fp32 n² buffers (A, X, R, X_new) then 3 float64 k²
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
    from . import _autotune, _util
except ImportError:  # pragma: no cover - imported by path while developing
    import _autotune  # type: ignore
    import _util  # type: ignore

U32 = 2.0**-24  # fp32 unit roundoff
BYTES_PER_ENTRY = 4 * 4 + 3 * 8  # fp32 A, X, R, X_new + float64 X, R, temp
PAD = 16  # n = k rounded up to this: 16-byte rows and masks (module docstring)
#: (BLOCK, BLOCK_K, num_warps, num_stages) tried by the autotuner on a GPU, picked by compiling candidates
#: for sm_90 as in gram.py (no spills, default ieee and the tf32x3 / tf32 opt-ins, Triton 3.6 and 3.9):
#: 128-wide tiles with 8 warps (4 spilled 140-1500 B), 32 × 32 for few blocks of small k (more programs).
TILES = [(64, 32, 4, 3), (128, 32, 8, 3), (128, 16, 8, 3), (32, 32, 4, 3)]


@triton.jit(do_not_specialize=["SIZE_CLASS"])
def _schulz_gemm_kernel(
    L, Rm, C, O, SQ,
    n, k, tiles,
    SIZE_CLASS,  # the autotune key only (_autotune.size_class)
    EPI: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """n × n matrices, zero beyond k: O = I_k − L Rm (EPI 0, with per-tile Σ O² into SQ) or O = C + L Rm (EPI 1)."""
    pid_i = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    base = pid_b * n * n
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask_i = offs_i < n
    mask_j = offs_j < n
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < n
        a = tl.load(L + base + offs_i[:, None] * n + offs_k[None, :], mask=mask_i[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(Rm + base + offs_k[:, None] * n + offs_j[None, :], mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    mask = mask_i[:, None] & mask_j[None, :]
    ptrs = base + offs_i[:, None] * n + offs_j[None, :]
    if EPI == 0:
        eye = tl.where((offs_i[:, None] == offs_j[None, :]) & (offs_i[:, None] < k), 1.0, 0.0)  # padding: 0
        out = tl.where(mask, eye - acc, 0.0)
        tl.store(O + ptrs, out, mask=mask)
        tl.store(SQ + pid_b * tiles + pid_i * tl.num_programs(1) + pid_j, tl.sum(tl.sum(out * out, axis=1), axis=0))
    else:
        out = acc + tl.load(C + ptrs, mask=mask, other=0.0)
        tl.store(O + ptrs, out, mask=mask)


_TUNED = _autotune.tuned(_schulz_gemm_kernel, ("BLOCK", "BLOCK_K"), TILES, key=["PRECISION", "EPI"],
                         reset_to_zero=["SQ"])


def padded(A: torch.Tensor) -> torch.Tensor:
    """`A` (b, k, k) -> (b, n, n) fp32, n = k rounded up to a multiple of 16, zero beyond k."""
    b, k, _ = A.shape
    n = _util.cdiv(k, PAD) * PAD
    out = torch.zeros(b, n, n, dtype=torch.float32, device=A.device)
    out[:, :k, :k] = A
    return out


def _check(names: tuple[str, ...], ts: tuple[torch.Tensor, ...], k: int | None) -> tuple[int, int, int]:
    """(b, n, k) of n × n fp32 operands, k ≤ n the size without padding (default n)."""
    for name, t in zip(names, ts):
        _util.check_f32(name, t, 3)
    b, n, _ = ts[0].shape
    assert all(t.shape == (b, n, n) for t in ts), f"{', '.join(names)} must all be (b, n, n)"
    k = n if k is None else k
    assert 0 < k <= n, f"k = {k} must be in [1, n = {n}]"
    return b, n, k


def _launch(L, Rm, C, O, SQ, b: int, n: int, k: int, tiles: int, epi: int, precision: str) -> None:
    args = (L, Rm, C, O, SQ, n, k, tiles)
    if _util.interpreting():  # one fixed config; the interpreter costs ~1 ms a program: few, big ones
        BT = _util.clamp_pow2(n, 16, 64)
        t = _util.cdiv(n, BT)
        _schulz_gemm_kernel[(t, t, b)](*args, SIZE_CLASS=0, EPI=epi, BLOCK=BT, BLOCK_K=BT, PRECISION=precision,
                                       num_warps=4)
    else:
        grid = lambda meta, nb: (_util.cdiv(n, meta["BLOCK"]), _util.cdiv(n, meta["BLOCK"]), nb)  # noqa: E731
        _autotune.launch(_TUNED[n % PAD == 0], grid, args, b, (n,), EPI=epi, PRECISION=precision)


def _max_tiles(n: int) -> int:
    """Programs per block of the smallest BLOCK that may run (interpreter: the one it runs), rounded up to
    a multiple of 4: each block's row of the workspace starts 16-byte aligned, as the slices of
    `_autotune.launch` then do (one specialisation)."""
    bt = _util.clamp_pow2(n, 16, 64) if _util.interpreting() else min(c[0] for c in TILES)
    return _util.cdiv(_util.cdiv(n, bt) ** 2, 4) * 4


def residual(A: torch.Tensor, X: torch.Tensor, R: torch.Tensor, k: int | None = None,
             precision: str = "ieee") -> torch.Tensor:
    """R ← I_k − A X (in place, fp32) and return the per-block ‖R‖_F (float64, (b,)).

    A, X, R: (b, n, n), zero in rows and columns ≥ k (`padded`); k defaults to n."""
    b, n, k = _check(("A", "X", "R"), (A, X, R), k)
    tiles = _max_tiles(n)
    sq = torch.zeros(b, tiles, dtype=torch.float32, device=A.device)  # a bigger BLOCK writes fewer tiles
    _launch(A, X, A, R, sq, b, n, k, tiles, 0, precision)
    return sq.double().sum(1).sqrt()


def update(X: torch.Tensor, R: torch.Tensor, out: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """out ← X + X R = X (2I − A X) (fp32; (b, n, n), padding stays zero)."""
    b, n, _ = _check(("X", "R", "out"), (X, R, out), None)
    _launch(X, R, X, out, out, b, n, n, 1, 1, precision)
    return out


def _group_size(b: int, k: int, device: torch.device) -> int:
    if device.type != "cuda":
        return b
    free, _ = torch.cuda.mem_get_info(device)
    n = _util.cdiv(k, PAD) * PAD
    return max(1, min(b, int(0.7 * free) // (BYTES_PER_ENTRY * n * n)))


def _schulz_group(A: torch.Tensor, iterations: int, tol: float, precision: str) -> tuple[torch.Tensor, float, int]:
    b, k, _ = A.shape
    sk = math.sqrt(k)
    A32 = padded(A)
    norm_a = torch.linalg.matrix_norm(A.double())
    X = torch.zeros_like(A32)
    X.diagonal(dim1=1, dim2=2)[:, :k] = (1.0 / norm_a).float()[:, None]
    R, Xn = torch.empty_like(X), torch.empty_like(X)
    res, prev, step = math.inf, math.inf, 0
    # stage 1: fp32 Triton steps on the padded n × n, while they lower the residual (module docstring)
    while True:
        res_b = residual(A32, X, R, k, precision) / sk
        res = float(res_b.max())
        if res < tol or step == iterations:
            return X[:, :k, :k].double(), res, step
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
    X64 = X[:, :k, :k].double()
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
