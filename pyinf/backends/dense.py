"""Dense float64 matrices shared by every backend and method: the SPD inverse of `Backend.spd_inverse`
(Cholesky, Schulz fallback), exact symmetrisation of accumulated Gram-type matrices, and packed storage
of symmetric matrices. Plain PyTorch on any device;
kept apart from the backends so the interface (`base.py`) and the reference (`torch_backend.py`) both use
them without importing each other."""
from __future__ import annotations

import math

import torch

def symmetrize_(A: torch.Tensor) -> torch.Tensor:
    """A (k, k) or (b, k, k), in place: its strict lower triangle replaced by the upper one's mirror.

    A BLAS GEMM computing XᵀX need not give bitwise-equal (i, j) and (j, i)
    entries (it may sum them in different orders); the Cholesky and Schulz
    steps downstream assume exact symmetry. One block at a time: the only
    temporary is one k × k triangle.
    """
    for M in A.reshape(-1, *A.shape[-2:]):
        M.triu_()
        M += M.triu(1).mT
    return A


SOLVERS = ("auto", "schulz", "cholesky")


def schulz_inverse(A: torch.Tensor, iterations: int, tol: float) -> tuple[torch.Tensor, float, int]:
    """Batched SPD inverse by Schulz in float64: `A` (b, k, k) -> (X, max relative residual, steps).

    X ← X(2I − AX) from X_0 = I/‖A‖_F (every eigenvalue of A X_0 in (0, 1], so it
    converges for any SPD A); stops when ‖I − AX‖_F/√k < tol or after `iterations`.
    """
    A = A.double()
    k = A.shape[-1]
    eye = torch.eye(k, dtype=A.dtype, device=A.device)
    X = eye / torch.linalg.matrix_norm(A).reshape(-1, 1, 1)
    residual = float("inf")
    for step in range(iterations + 1):
        R = eye - A @ X
        residual = float(torch.linalg.matrix_norm(R).max()) / math.sqrt(k)
        if residual < tol or step == iterations:
            return X, residual, step
        X = X + X @ R  # = X (2I − A X)
    raise AssertionError("unreachable")


def spd_inverse(A: torch.Tensor, *, iterations: int, tol: float, solver: str = "auto",
                group: int | None = None, out: torch.Tensor | None = None, schulz=schulz_inverse):
    """The reference `Backend.spd_inverse`: float64 Cholesky ("auto", "cholesky") or Schulz.

    "auto" is Cholesky: k³/3 flops for the factor (+ k³ for the inverse) against
    ≥ 4k³ per Schulz step and tens of steps, and backward stable, so it is the
    faster and more accurate solver on every device measured (CPU here; on an
    H100 at 160 blocks of 5120², ~70× faster than 60 fp32 Schulz steps). No
    residual ‖I − AX‖ is formed after Cholesky (a 2k³ GEMM per block, more
    flops than the factor and the inverse together, and one more k × k
    temporary; Cholesky is backward stable, so there is nothing to check).

    Blocks are solved `group` at a time (default: all); a group that is not
    numerically positive definite falls back to `schulz` (the float64
    reference, or a backend's kernels) on its own. `out` (default: a new
    tensor) may be `A` itself: each group is overwritten by its inverse once
    factored, so the solve needs only one group's factor and inverse beside A.
    Returns (X, max Schulz residual or NaN where Schulz never ran, max Schulz steps).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    b = A.shape[0]
    group = group or b
    out = torch.empty(A.shape, dtype=torch.float64, device=A.device) if out is None else out
    residual, steps = math.nan, 0
    for s in range(0, b, group):
        part, X = A[s : s + group], None
        if solver in ("auto", "cholesky"):
            L, info = torch.linalg.cholesky_ex(part.double())
            if not bool((info != 0).any()):
                X = torch.cholesky_inverse(L)
            del L
        if X is None:
            X, r, n = schulz(part, iterations, tol)
            residual, steps = (r if math.isnan(residual) else max(residual, r)), max(steps, n)
        out[s : s + group] = X
        del X
    return out, residual, steps


# Packed symmetric pairs: b symmetric k × k float64 matrices in a ((b + 1) // 2, k, k + 1) tensor,
# half the bytes of a stack. Matrix 2p keeps its upper triangle (with the diagonal) in columns 1..k
# of pair p, matrix 2p + 1 its lower triangle in columns 0..k−1: in row i the first uses columns > i,
# the second columns ≤ i, so they never overlap. (A plain tensor: saved with the Attributor.)
# Used by hyperinf (its inverses) and pyinf.factors (the K-FAC statistics).
def packed_pairs(b: int, k: int, device: torch.device) -> torch.Tensor:
    """Zeros for `b` symmetric k × k float64 matrices packed two per `(k, k + 1)` slab: `((b + 1) // 2, k, k + 1)`
    (`pack` adds matrix i into its slab's lower or upper triangle, `unpack` reads it back)."""
    return torch.zeros((b + 1) // 2, k, k + 1, dtype=torch.float64, device=device)


def pack(pairs: torch.Tensor, i: int, X: torch.Tensor) -> None:
    """Add symmetric `X` (k, k) into matrix `i` of `pairs` ((b + 1) // 2, k, k + 1) (adding the triangle's zeros leaves
    the partner intact)."""
    p, odd = divmod(i, 2)
    if odd:
        pairs[p, :, :-1] += X.tril()
    else:
        pairs[p, :, 1:] += X.triu()


def unpack(pairs: torch.Tensor, i: int) -> torch.Tensor:
    """Matrix `i` of `pairs` ((b + 1) // 2, k, k + 1), whole: a new (k, k) tensor."""
    p, odd = divmod(i, 2)
    if odd:
        T = pairs[p, :, :-1].tril()
        return T + T.tril(-1).mT
    T = pairs[p, :, 1:].triu()
    return T + T.triu(1).mT
