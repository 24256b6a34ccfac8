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
    name = "datainf"

    def precondition(self, queries):
        V = self._flat(queries)
        acc = {name: torch.zeros_like(v) for name, v in V.items()}
        weights = {  # w_i = 1 / (n (λ + ‖g_i‖²))
            b.name: 1.0 / (self.n * (self.lam[b.name] + self.sq_norms[b.name])) for b in self.blocks
        }
        for start, chunk in self.train.chunks():
            for name, G in chunk.items():
                w = weights[name][start : start + G.shape[0]]
                self.backend.rank_one_accumulate(acc[name], G.reshape(G.shape[0], -1), V[name], w)
        self._allreduce_dict(acc)  # the rank-one corrections of every rank's samples
        return {name: (V[name] - acc[name]) / self.lam[name] for name in V}
