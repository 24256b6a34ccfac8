"""The backend interface: the few fused primitives every method is built from.

A backend works on one *chunk* of training gradients: `G` of shape `(c, D)`
for one block, or `(b, c, D)` for a *group* of b blocks of the same shape
(`(c, rows, cols)` / `(b, c, rows, cols)` for the GFIM), stored as float32,
bfloat16, float16 or float64. A group is served by one call (one launch per
kernel on the GPU), so a pass over the 160 same-shape blocks of a 13B LoRA
adapter costs one call per primitive and chunk, not 160. In a group, each
block `G[k]` is contiguous (`G.stride(1) == D`, `G.stride(2) == 1`); the
block stride `G.stride(0)` may be anything (a store's chunk split in halves is
a view). The query-side operands carry the same leading block axis. Query-side operands (`V`, `H`, `C`, weights) and all
results are in the compute dtype (float32, or float64 when the inputs are
float64), and every reduction accumulates in at least float32. Methods are
written once against this interface; the Triton (GPU) and C++ (CPU) backends
are drop-ins that must pass `tests/test_backend_interface.py`.

Float64 accumulation on low-precision storage. A float64 query-side operand of
`dots`, `norms_and_dots`, `score` or `weighted_sum`, or `dtype=torch.float64`
for `gram` / `gfim`, makes the result float64, accumulated in float64 from the
stored values of G: products of fp32 / bf16 / fp16 values are exact in float64,
so the result is the float64 computation on the same values (to float64
rounding). Methods ask for it where a result feeds an ill-conditioned solve:
exact's Gram K and dots P = V Gᵀ before M⁻¹ (κ(M) ~ 1e4 at LoRA shapes, where
fp32 rounding of K and P costs ~κ·eps32 ≈ 1e-3 of the scores), the GFIMs of
hyperinf and of exact's primal blocks, and a float64 H scored against G. G is
still read once per pass and never upcast as a whole: the torch reference (to
which the C++ and Triton backends fall back here) upcasts one chunk at a time,
as it does for bf16 storage. `rank_one_accumulate` is not asked for it
(DataInf and LiSSA do not need it).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .dense import spd_inverse


class Backend(ABC):
    """Fused primitives on a chunk of gradients. See the module docstring."""

    name: str = "abstract"

    @abstractmethod
    def sq_norms(self, G: torch.Tensor) -> torch.Tensor:
        """`G` ([b,] c, D) -> `([b,] c)`: ‖g_i‖² per block."""

    @abstractmethod
    def dots(self, G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """`G` ([b,] c, D), `V` ([b,] m, D) -> `([b,] m, c)`: V Gᵀ per block (float64 V: accumulated in float64)."""

    @abstractmethod
    def norms_and_dots(self, G: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`G` ([b,] c, D), `V` ([b,] m, D) -> (`([b,] c)` ‖g_i‖², `([b,] m, c)` V Gᵀ), reading G once."""

    @abstractmethod
    def weighted_sum(self, C: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """`C` ([b,] m, c), `G` ([b,] c, D) -> `([b,] m, D)`: Σ_i C[j, i] g_i per block."""

    @abstractmethod
    def rank_one_accumulate(
        self, acc: torch.Tensor, G: torch.Tensor, V: torch.Tensor, w: torch.Tensor
    ) -> None:
        """In place `acc ([b,] m, D) += ((V Gᵀ) * w) G` per block with `w` ([b,] c), reading G once.

        DataInf's rank-one corrections with `w_i = 1/(n(λ + ‖g_i‖²))`, and the
        Fisher-vector product of LiSSA with `w_i = 1/n`.
        """

    @abstractmethod
    def gram(self, G1: torch.Tensor, G2: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`G1` ([b,] c1, D), `G2` ([b,] c2, D) -> `([b,] c1, c2)`: G1 G2ᵀ per block, in `dtype` (default:
        the compute dtype; float64: accumulated in float64, see the module docstring)."""

    @abstractmethod
    def gfim(self, G: torch.Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """`G` ([b,] c, rows, cols) -> `([b,] cols, cols)`: Σ_i g_iᵀ g_i per block (rows = 1: GᵀG),
        exactly symmetric, in `dtype` (as for `gram`). With `out` (its dtype is the dtype), the sum is
        added into `out` in place and `out` returned, not symmetrised: accumulate every chunk, then
        `dense.symmetrize_(out)` once (no (b, cols, cols) temporary per chunk)."""

    @abstractmethod
    def score(self, H: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """`H` ([b,] m, D), `G` ([b,] c, D) -> `(m, c)`: −Σ_b H_b G_bᵀ (summed over the blocks)."""

    def spd_inverse(
        self, A: torch.Tensor, *, iterations: int, tol: float, solver: str = "auto", out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float, int]:
        """`A` (b, k, k) SPD (float64) -> (X ≈ A⁻¹ float64, max ‖I − AX‖_F/√k, steps);
        the residual is NaN where no iteration ran (Cholesky: backward stable, not checked).
        `out` may be `A` itself (the inverse overwrites A, block group by block group).

        `solver`: "schulz" (X ← X(2I − AX) from X_0 = I/‖A‖_F, at most
        `iterations` steps, stop at residual < `tol`), "cholesky", or "auto"
        (whichever meets the accuracy faster on this backend). The default is
        the float64 PyTorch reference (`dense.spd_inverse`), so a backend
        need not override it.
        """
        return spd_inverse(A, iterations=iterations, tol=tol, solver=solver, out=out)
