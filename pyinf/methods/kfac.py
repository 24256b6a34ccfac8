"""K-FAC (Martens & Grosse, 2015; for influence, Grosse et al., 2023): Kronecker-factored curvature.

Per matrix block with per-sample gradients g_i = Σ_t p_t q_tᵀ (rows × cols;
the factors of each block kind are listed in `pyinf.factors`), the empirical
Fisher F = (1/n) Σ_i vec(g_i) vec(g_i)ᵀ of the other methods is approximated by

    F ≈ R̄ ⊗ C̄,   R̄ = (1/N) Σ_t p_t p_tᵀ (rows × rows),   C̄ = (1/n) Σ_t q_t q_tᵀ (cols × cols)

over the N training tokens and n samples: token-level statistics that the
capture accumulates in the same pass as the gradients (`pyinf.factors`), so
the curvature is full rank where n < D_b makes the per-sample Fisher singular.
With the float64 eigendecompositions R̄ = Q_R diag(a) Q_Rᵀ and C̄ = Q_C diag(c) Q_Cᵀ
(row-major vec: (R̄ ⊗ C̄) vec(V) = vec(R̄ V C̄)),

    H_j = Q_R [(Q_Rᵀ V_j Q_C) / (Λ + λ)] Q_Cᵀ,   Λ = a cᵀ (rows × cols)

and score = −⟨H_j, g_i⟩. EK-FAC (`ekfac`) keeps the eigenbases and refits Λ.

Damping: relative (default), λ = damping × the mean of Λ, the mean eigenvalue
of the curvature being inverted (Kronfluence's `damping_factor=None` heuristic
with damping = 0.1); absolute, λ = damping. For EK-FAC the mean of Λ is
mean_i ‖g_i‖² / D_b, so its relative λ is the other methods' λ_b exactly.

Options: `fisher` "empirical" (default: the training labels) or "true" (labels
drawn from the model, seeded by `seed`): the statistics must have been
captured with the same (`pyinf.Attributor` does it from these options).

Memory per group of b same-shape blocks: the eigenbases in the compute dtype
(b · (rows² + cols²) values: 16.8 GB in float32 at the 13B LoRA shape, 160
blocks of 8 × 5120) and Λ in float64 (b · rows · cols); the float64 factors are
unpacked and decomposed one slice of blocks at a time (`SLICE_BYTES`). Counted at
the 13B shape by `bench/costmodel.py`: see the README.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import Options, integer, one_of
from .base import Method

FISHERS = ("empirical", "true")
# Float64 factors decomposed at once (a slice of a group): eigh's input copy, eigenvectors and workspace
# come beside it, so a slice costs ~3x this (at the 13B shape, 5 blocks of 5120² a slice).
SLICE_BYTES = 1 << 30
# Query gradients rotated at once in `precondition` (at the 13B shape, m = 100: 16 of the 160 blocks).
QUERY_SLICE_BYTES = 256 << 20


@dataclass(frozen=True)
class KFACOptions(Options):
    """fisher: the labels of the factors' statistics ("empirical": the data's; "true": drawn from the model,
    seeded by seed); the capture must have accumulated the same (`pyinf.gradients`)."""

    fisher: str = one_of("empirical", FISHERS)
    seed: int = integer(0)


class KFAC(Method):
    """K-FAC: the block Fisher as R̄ ⊗ C̄ from the capture's token statistics, inverted in their eigenbases (module doc)."""
    name = "kfac"
    damping_from_fit = True  # λ from the trace of Λ: no norms pass
    needs_factors = True
    Options = KFACOptions

    def _factors(self, train):
        """The training source's statistics, checked against the options and the blocks."""
        factors = train.factors
        if factors is None:
            raise ValueError(
                f"{self.name} needs the Kronecker factors of the training data (token statistics that the "
                f"capture accumulates beside the gradients); per-sample gradients alone do not have them: use "
                f"pyinf.Attributor(model, method='{self.name}'), not pyinf.influence on gradient tensors"
            )
        got, want = (factors.fisher, factors.seed), (self.opts["fisher"], self.opts["seed"])
        if got != want:
            raise ValueError(f"{self.name}: the factors were captured with fisher={got[0]!r}, seed={got[1]}, "
                             f"the method asks for fisher={want[0]!r}, seed={want[1]}; capture them again")
        if [g.names for g in factors.groups] != [g.names for g in self.groups]:
            raise ValueError(f"{self.name}: the factors' blocks differ from the training gradients' blocks")
        missing = factors.missing()
        if missing:
            raise ValueError(
                f"{self.name}: blocks {missing[:4]}{'...' if len(missing) > 4 else ''} have no Kronecker factors "
                f"(no training token reached them, or they are embedding blocks: K-FAC covers nn.Linear and "
                f"Conv1D weights, biases and LoRA A/B); leave them out of blocks=[...]"
            )
        return factors

    def _fit(self, train):
        """Per slice of a group: the float64 factors, normalised, eigendecomposed; then Λ and λ."""
        factors = self._factors(train)
        self.basis_rows, self.basis_cols, kron = [], [], []
        for gi, g in enumerate(self.groups):
            b = len(g.names)
            QR = torch.empty(b, g.rows, g.rows, dtype=self.dtype, device=train.device)
            QC = torch.empty(b, g.cols, g.cols, dtype=self.dtype, device=train.device)
            lam = torch.empty(b, g.rows, g.cols, dtype=torch.float64, device=train.device)
            step = max(1, min(b, SLICE_BYTES // (8 * (g.rows**2 + g.cols**2))))
            for lo in range(0, b, step):
                hi = min(b, lo + step)
                R, C, N = (t.to(train.device) for t in factors.sums(gi, lo, hi))
                self._allreduce_list([R, C, N])  # every rank's tokens
                a, QR_ = torch.linalg.eigh(R.div_(N.view(-1, 1, 1)))
                c, QC_ = torch.linalg.eigh(C.div_(self.n))
                QR[lo:hi], QC[lo:hi] = QR_, QC_
                lam[lo:hi] = a.clamp(min=0)[:, :, None] * c.clamp(min=0)[:, None, :]  # eigh rounds tiny ones < 0
                del R, C, QR_, QC_
            self.basis_rows.append(QR)
            self.basis_cols.append(QC)
            kron.append(lam)
        self.eigenvalues = self._eigenvalues(train, kron)
        # relative λ: damping × mean(Λ) = damping × (n · ΣΛ / n) / D_b, the base class's formula on a trace
        traces = torch.cat([e.sum(dim=(1, 2)) for e in self.eigenvalues]) * self.n
        names = [name for g in self.groups for name in g.names]
        self._damping_from_totals(train, dict(zip(names, traces.tolist())))

    def _eigenvalues(self, train, kron: list[torch.Tensor]) -> list[torch.Tensor]:
        """Λ per group, (b, rows, cols) float64: K-FAC's products of the factors' eigenvalues."""
        return kron

    def _rotate(self, gi: int, X: torch.Tensor, inverse: bool = False, lo: int = 0) -> torch.Tensor:
        """(s, c, rows, cols), blocks lo..lo+s-1 of group gi -> Q_Rᵀ X Q_C per block (into the eigenbasis),
        or Q_R X Q_Cᵀ (`inverse`). Two batched GEMMs (einsum: a broadcast `Q @ X` would expand Q to one
        copy per sample)."""
        QR, QC = self.basis_rows[gi][lo : lo + X.shape[0]], self.basis_cols[gi][lo : lo + X.shape[0]]
        Y = torch.einsum("bcrk,blk->bcrl" if inverse else "bcrk,bkl->bcrl", X, QC)
        return torch.einsum("brs,bcsl->bcrl" if inverse else "bsr,bcsl->bcrl", QR, Y)

    def precondition(self, queries):
        """H per slice of QUERY_SLICE_BYTES of queries (the rotations' temporaries are a few slices)."""
        H = []
        for gi, (g, V) in enumerate(zip(self.groups, self._stacked(queries))):
            b, m = V.shape[:2]
            h = torch.empty_like(V)
            step = max(1, QUERY_SLICE_BYTES // max(1, m * g.size * V.element_size()))
            for lo in range(0, b, step):
                W = self._rotate(gi, V[lo : lo + step].view(-1, m, g.rows, g.cols), lo=lo)
                lam = self.eigenvalues[gi][lo : lo + step] + self._group_lam(g, torch.float64)[lo : lo + step]
                W /= lam.to(W.dtype).unsqueeze(1)
                h[lo : lo + step] = self._rotate(gi, W, inverse=True, lo=lo).reshape(W.shape[0], m, -1)
            H.append(h)
        return self._unstacked(H)
