"""HyperINF (Zhou et al., 2024): Schulz iteration on the generalized Fisher.

Per matrix block with per-sample gradients g_i (rows × cols), the GFIM
Φ = (1/n) Σ_i g_iᵀ g_i is cols × cols whatever the rank. With i.i.d. rows
F ≈ I_rows ⊗ Φ/rows, so A = Φ/rows + λI approximates the same F + λI as the
other methods, and H_j = V_j A⁻¹ (V_j rows × cols). A⁻¹ comes from the Schulz
(hyperpower) iteration X ← X(2I − AX), batched over all blocks with the same
cols, started at X_0 = I/‖A‖_F: every eigenvalue of A X_0 is then in (0, 1],
so it always converges (the research code's X_0 = 5e-5·I diverges once
λ_max(A) > 4·10⁴). It stops when ‖I − AX‖_F/√cols < tol. The iteration runs
in float64: it is small next to the passes over G.
A flat block is one row (A = F + λI, D_b × D_b), so at most 8192 wide.
"""
from __future__ import annotations

import math

import torch

from .base import Method

MAX_FLAT_COLS = 8192


def schulz_inverse(A: torch.Tensor, iterations: int, tol: float) -> tuple[torch.Tensor, float, int]:
    """Batched SPD inverse: `A` (b, k, k) -> (X ≈ A⁻¹, max relative residual, steps taken)."""
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


class HyperINF(Method):
    name = "hyperinf"
    options = {"iterations": 100, "tol": 1e-8}

    def _check_options(self):
        self._check_positive_int("iterations")
        self._check_positive_float("tol")

    def _check_blocks(self, blocks):
        for b in blocks:
            if b.rows == 1 and b.cols > MAX_FLAT_COLS:
                raise ValueError(
                    f"block '{b.name}': hyperinf treats a flat block as one row, so its GFIM would be "
                    f"{b.cols} × {b.cols}, wider than {MAX_FLAT_COLS}; give this block as a matrix "
                    f"(n, rows, cols), e.g. a LoRA A gradient as (n, r, d_in)"
                )

    def _fit(self, train):
        it = self.opts["iterations"]
        phi = {b.name: torch.zeros(b.cols, b.cols, dtype=torch.float64, device=train.device) for b in train.blocks}
        for _, chunk in train.chunks():
            for name, G in chunk.items():
                phi[name] += self.backend.gfim(G).double()
        self.inverse: dict[str, torch.Tensor] = {}
        by_cols: dict[int, list] = {}
        for b in train.blocks:
            by_cols.setdefault(b.cols, []).append(b)
        for cols, group in by_cols.items():
            A = torch.stack([phi[b.name] / (train.n * b.rows) for b in group])
            A.diagonal(dim1=1, dim2=2).add_(
                torch.tensor([self.lam[b.name] for b in group], dtype=torch.float64, device=train.device)[:, None]
            )
            X, residual, _ = schulz_inverse(A, it, self.opts["tol"])
            if residual >= self.opts["tol"]:
                self._warn_not_converged(f"Schulz ({cols} × {cols})", it, residual, self.opts["tol"])
            for b, x in zip(group, X):
                self.inverse[b.name] = x

    def precondition(self, queries):
        return {
            name: (V.to(torch.float64) @ self.inverse[name]).reshape(V.shape[0], -1).to(self.dtype)
            for name, V in queries.items()
        }
