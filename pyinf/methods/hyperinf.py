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

from dataclasses import dataclass

import torch

from ..backends.dense import SOLVERS, pack, packed_pairs, symmetrize_, unpack
from ..blocks import BlockGroup, stack_group
from ..options import Options, one_of, positive_float, positive_int
from .base import Method

MAX_FLAT_COLS = 8192
# Float64 GFIMs accumulated at once: a slice of a group (at the 13B shape, 20 blocks of 5120²).
SLICE_BYTES = 4 << 30
# Blocks factored at once inside a slice (each needs a k × k factor and inverse beside it).
SOLVE_GROUP = 4


@dataclass(frozen=True)
class HyperINFOptions(Options):
    """iterations and tol of the Schulz iteration; solver: the backend's `spd_inverse` solver."""

    iterations: int = positive_int(100)
    tol: float = positive_float(1e-8)
    solver: str = one_of("auto", SOLVERS)


class HyperINF(Method):
    """HyperINF: the inverse of the damped GFIM (cols × cols per block) by Schulz or Cholesky (module doc)."""
    name = "hyperinf"
    damping_from_fit = True  # λ_b from trace(Σ_i g_iᵀ g_i) = Σ_i ‖g_i‖²: no norms pass
    Options = HyperINFOptions

    def _check_blocks(self, blocks):
        for b in blocks:
            if b.rows == 1 and b.cols > MAX_FLAT_COLS:
                raise ValueError(
                    f"block '{b.name}': hyperinf treats a flat block as one row, so its GFIM would be "
                    f"{b.cols} × {b.cols}, wider than {MAX_FLAT_COLS}; give this block as a matrix "
                    f"(n, rows, cols), e.g. a LoRA A gradient as (n, r, d_in)"
                )

    def _fit(self, train):
        """Per slice of a group: one pass over its blocks accumulates their GFIMs in float64 (with
        n·rows < cols, 8 × 5120 blocks and a few hundred samples, Φ is singular and κ(A) ~ λ_max/λ:
        fp32 rounding of Φ cost ~1e-4 of the scores at damping 0.01), λ from their traces, then
        their inverses in place, kept packed (`packed_pairs`). G is read once in all; the memory
        is the packed inverses (half a float64 stack) plus one slice."""
        it, tol = self.opts["iterations"], self.opts["tol"]
        self.inverse = [packed_pairs(len(g.names), g.cols, train.device) for g in self.groups]
        for gi, g in enumerate(self.groups):
            step = max(1, min(len(g.names), SLICE_BYTES // (g.cols * g.cols * 8)))
            for lo in range(0, len(g.names), step):
                sub = BlockGroup(g.names[lo : lo + step], g.rows, g.cols)
                A = torch.zeros(len(sub.names), g.cols, g.cols, dtype=torch.float64, device=train.device)
                for _, chunk in train.chunks(sub.names):
                    self.backend.gfim(stack_group(chunk, sub).unflatten(-1, (g.rows, g.cols)), out=A)
                symmetrize_(self._allreduce(A))  # GFIM sums over every rank's samples
                if self.needs_damping:
                    traces = A.diagonal(dim1=1, dim2=2).sum(dim=1).tolist()  # one host read a slice
                    self._damping_from_totals(train, dict(zip(sub.names, traces)))
                A /= self.n * g.rows
                A.diagonal(dim1=1, dim2=2).add_(self._group_lam(sub, torch.float64).view(-1, 1))
                for s in range(0, len(sub.names), SOLVE_GROUP):
                    _, residual, steps = self.backend.spd_inverse(
                        A[s : s + SOLVE_GROUP], iterations=it, tol=tol, solver=self.opts["solver"],
                        out=A[s : s + SOLVE_GROUP])
                    if steps == it and residual >= tol:  # only Schulz iterates; Cholesky reports 0 steps
                        self._warn_not_converged(f"Schulz ({g.cols} × {g.cols})", it, residual, tol)
                for k in range(len(sub.names)):
                    pack(self.inverse[gi], lo + k, A[k])
                del A, _  # `_` views A: the next slice's A replaces it, not joins it

    def precondition(self, queries):
        """H_j = V_j A⁻¹ per block, in float64, returned in the compute dtype: the scoring pass then
        runs the backend's kernels on G as stored (no float64 copy of G; at the 8 × 5120 shapes of
        tests/test_real_shapes.py the scores stay within 1e-4 of float64)."""
        H = []
        for g, V, X in zip(self.groups, self._stacked(queries), self.inverse):
            h = torch.empty_like(V)
            for k in range(len(g.names)):  # float64 one block at a time
                h[k] = (V[k].double().view(-1, g.rows, g.cols) @ unpack(X, k)).view(V.shape[1], -1)
            H.append(h)
        return self._unstacked(H)
