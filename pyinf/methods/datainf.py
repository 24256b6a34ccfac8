"""DataInf (Kwon et al., ICLR 2024): a closed-form inverse per block.

Swapping the order of the inverse and the average in (F + λI)⁻¹ gives a sum of
Sherman-Morrison rank-one inverses:

    h = (1/λ) [v − (1/n) Σ_i (⟨v, g_i⟩ / (λ + ‖g_i‖²)) g_i]

Three passes over G in all: squared norms (fit), the fused dots and rank-one
accumulation (precondition), and scoring.
"""
from __future__ import annotations

import torch

from .base import Method


class DataInf(Method):
    """DataInf: the closed-form Sherman-Morrison sum per block (module doc); passes: norms, H, scoring."""
    name = "datainf"

    def precondition(self, queries):
        V = self._stacked(queries)
        acc = [torch.zeros_like(v) for v in V]
        weights = [  # w_i = 1 / (n (λ + ‖g_i‖²)), (b, n) per group
            1.0 / (self.n * (self._group_lam(g).view(-1, 1) + s)) for g, s in zip(self.groups, self.group_sq_norms)
        ]
        for start, chunk in self.train.chunks():
            for i, (_, G) in enumerate(self._grouped(chunk)):
                w = weights[i][:, start : start + G.shape[1]].contiguous()
                self.backend.rank_one_accumulate(acc[i], G, V[i], w)
        self._allreduce_list(acc)  # the rank-one corrections of every rank's samples
        # H = (V − acc)/λ, in place of acc (at the 13B shape each stack is 2.6 GB)
        return self._unstacked([a.neg_().add_(v).div_(self._group_lam(g)) for g, v, a in zip(self.groups, V, acc)])
