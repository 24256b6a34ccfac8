"""EK-FAC (George et al., 2018; for influence, Grosse et al., 2023): K-FAC with refitted eigenvalues.

K-FAC's eigenbases Q_R, Q_C (`kfac`), and in place of the products of the
factors' eigenvalues the second moments of the training gradients in that
basis, fitted in one pass over G:

    Λ*[a, b] = (1/n) Σ_i ((Q_Rᵀ g_i Q_C)[a, b])²

the diagonal of Qᵀ F Q for the empirical Fisher F of the other methods (so
EK-FAC equals the exact block inverse when F is diagonal in that basis). Then
H_j = Q_R [(Q_Rᵀ V_j Q_C) / (Λ* + λ)] Q_Cᵀ. mean(Λ*) = mean_i ‖g_i‖² / D_b,
so relative damping gives the other methods' λ_b.

With fisher="true" both come from labels drawn from the model: the
eigenbases from the sampled-label statistics, Λ* from the per-sample
gradients of sampled labels (`train.fisher_gradients`, which the Attributor
captures again in this pass: one more forward and backward per batch, as
Kronfluence's Λ pass); the scores still pair the training labels' gradients.
"""
from __future__ import annotations

import torch

from .kfac import KFAC


class EKFAC(KFAC):
    """EK-FAC: K-FAC's eigenbases with eigenvalues refitted to the per-sample gradients (module doc)."""
    name = "ekfac"
    refits_eigenvalues = True

    def _eigenvalues(self, train, kron):
        """One pass over G: Σ_i (Q_Rᵀ g_i Q_C)² per block, accumulated in float64, / n (fisher="true": over
        the sampled-label gradients)."""
        source = train
        if self.opts["fisher"] == "true":
            source = train.fisher_gradients
            if source is None:
                raise ValueError("ekfac with fisher='true' needs the gradients of labels drawn from the model "
                                 "(train.fisher_gradients): use pyinf.Attributor(model, method='ekfac', fisher='true')")
        acc = [torch.zeros_like(k) for k in kron]
        for _, chunk in source.chunks():
            for gi, (g, G) in enumerate(self._grouped(chunk)):
                P = self._rotate(gi, G.to(self.dtype).view(len(g.names), -1, g.rows, g.cols))
                acc[gi] += P.square_().sum(dim=1, dtype=torch.float64)
        self._allreduce_list(acc)  # every rank's samples
        return [a / self.n for a in acc]
