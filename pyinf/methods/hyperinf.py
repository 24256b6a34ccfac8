"""HyperINF (Zhou et al., 2024): Schulz iteration on the generalized Fisher.

Per matrix block with per-sample gradients g_i (rows × cols), the GFIM
Φ = (1/n) Σ_i g_iᵀ g_i is cols × cols whatever the rank. With i.i.d. rows
F ≈ I_rows ⊗ Φ/rows, so A = Φ/rows + λI approximates the same F + λI as the
other methods, and H_j = V_j A⁻¹ (V_j rows × cols). A⁻¹ comes from the Schulz
(hyperpower) iteration X ← X(2I − AX), batched over all blocks with the same
cols, started at X_0 = I/‖A‖_F: every eigenvalue of A X_0 is then in (0, 1],
so it always converges (the research code's X_0 = 5e-5·I diverges once
λ_max(A) > 4·10⁴). It stops when ‖I − AX‖_F/√cols < tol. The inverse comes
from the backend's `spd_inverse` with option `solver`: "schulz" forces the
iteration above, "cholesky" a float64 Cholesky inverse, and "auto" (default)
picks whichever meets the accuracy faster on that backend: Cholesky on the
torch and triton backends (≥ 70× faster at the 13B shape on an H100 and more
accurate; see `pyinf/backends/torch_backend.py`).
A flat block is one row (A = F + λI, D_b × D_b), so at most 8192 wide.
"""
from __future__ import annotations

import torch

from .base import Method

MAX_FLAT_COLS = 8192


class HyperINF(Method):
    name = "hyperinf"
    damping_from_fit = True  # λ_b from trace(Σ_i g_iᵀ g_i) = Σ_i ‖g_i‖²: no norms pass
    options = {"iterations": 100, "tol": 1e-8, "solver": "auto"}
    SOLVERS = ("auto", "schulz", "cholesky")

    def _check_options(self):
        self._check_positive_int("iterations")
        self._check_positive_float("tol")
        if self.opts["solver"] not in self.SOLVERS:
            raise ValueError(f"{self.name}: option solver must be one of {self.SOLVERS}, got {self.opts['solver']!r}")

    def _check_blocks(self, blocks):
        for b in blocks:
            if b.rows == 1 and b.cols > MAX_FLAT_COLS:
                raise ValueError(
                    f"block '{b.name}': hyperinf treats a flat block as one row, so its GFIM would be "
                    f"{b.cols} × {b.cols}, wider than {MAX_FLAT_COLS}; give this block as a matrix "
                    f"(n, rows, cols), e.g. a LoRA A gradient as (n, r, d_in)"
                )

    def _fit(self, train):
        it, tol = self.opts["iterations"], self.opts["tol"]
        # GFIMs accumulate straight into one float64 stack per group, which
        # becomes A in place: no second copy of the largest tensor of the fit.
        # Each chunk's GFIM is accumulated in float64 too: with n·rows < cols
        # (8 × 5120 blocks, a few hundred samples) Φ is singular, κ(A) ~ λ_max/λ,
        # and fp32 rounding of Φ cost ~1e-4 of the scores at damping 0.01.
        f64 = dict(dtype=torch.float64, device=train.device)
        stacks = [torch.zeros(len(g.names), g.cols, g.cols, **f64) for g in self.groups]
        for _, chunk in train.chunks():
            for i, (g, G) in enumerate(self._grouped(chunk)):
                stacks[i] += self.backend.gfim(G.unflatten(-1, (g.rows, g.cols)), dtype=torch.float64)
        self._allreduce_list(stacks)  # GFIM sums over every rank's samples
        if self.needs_damping:
            traces = torch.cat([A.diagonal(dim1=1, dim2=2).sum(dim=1) for A in stacks]).tolist()  # one host read
            self._damping_from_totals(train, dict(zip([n for g in self.groups for n in g.names], traces)))
        self.inverse: list[torch.Tensor] = []
        for g in self.groups:
            A = stacks.pop(0)
            A /= self.n * g.rows
            A.diagonal(dim1=1, dim2=2).add_(self._group_lam(g, torch.float64).view(-1, 1))
            X, residual, steps = self.backend.spd_inverse(A, iterations=it, tol=tol, solver=self.opts["solver"])
            del A
            if steps == it and residual >= tol:  # only Schulz iterates; Cholesky reports 0 steps
                self._warn_not_converged(f"Schulz ({g.cols} × {g.cols})", it, residual, tol)
            self.inverse.append(X)

    def precondition(self, queries):
        V = self._stacked(queries, torch.float64)
        return self._unstacked([
            (v.unflatten(-1, (g.rows, g.cols)) @ X.unsqueeze(1)).flatten(-2)
            for g, v, X in zip(self.groups, V, self.inverse)
        ])
