"""Exact block inverse: h = (F + λI)⁻¹ v with F = (1/n) Σ_i g_i g_iᵀ, per block.

Primal when D_b ≤ n: accumulate F (D_b × D_b) and Cholesky-factor F + λI.
Woodbury when D_b > n: (F + λI)⁻¹ = (1/λ)[I − Gᵀ(nλI + GGᵀ)⁻¹G], with the
n × n Gram Cholesky-factored. The small dense solves run in float64 whatever
the storage dtype, so fp32 rounding is not amplified by the condition number.
"""
from __future__ import annotations

import torch

from .base import Method


class Exact(Method):
    name = "exact"

    def _fit(self, train):
        self.primal = {b.name: b.size <= train.n for b in train.blocks}
        self.chol: dict[str, torch.Tensor] = {}
        primal = [b for b in train.blocks if self.primal[b.name]]
        dual = [b for b in train.blocks if not self.primal[b.name]]
        f64 = dict(dtype=torch.float64, device=train.device)

        if primal:
            F = {b.name: torch.zeros(b.size, b.size, **f64) for b in primal}
            for _, chunk in train.chunks():
                for b in primal:
                    G = chunk[b.name]
                    F[b.name] += self.backend.gfim(G.reshape(G.shape[0], 1, -1)).double()
            for b in primal:
                A = F[b.name] / train.n
                A.diagonal().add_(self.lam[b.name])
                self.chol[b.name] = torch.linalg.cholesky(A)

        if dual:
            K = {b.name: torch.empty(train.n, train.n, **f64) for b in dual}
            for s1, c1 in train.chunks():  # Gram by chunk pairs (lower triangle, mirrored)
                for s2, c2 in train.chunks():
                    if s2 > s1:
                        break
                    for b in dual:
                        G1, G2 = c1[b.name], c2[b.name]
                        blk = self.backend.gram(G1.reshape(G1.shape[0], -1), G2.reshape(G2.shape[0], -1)).double()
                        K[b.name][s1 : s1 + blk.shape[0], s2 : s2 + blk.shape[1]] = blk
                        K[b.name][s2 : s2 + blk.shape[1], s1 : s1 + blk.shape[0]] = blk.T
            for b in dual:
                M = K[b.name]
                M.diagonal().add_(train.n * self.lam[b.name])
                self.chol[b.name] = torch.linalg.cholesky(M)

    def precondition(self, queries):
        V = self._flat(queries)
        H = {}
        dual = [name for name in V if not self.primal[name]]
        for name in V:
            if self.primal[name]:  # H = V (F + λI)⁻¹, symmetric
                H[name] = torch.cholesky_solve(V[name].double().T, self.chol[name]).T.to(self.dtype)
        if dual:
            # Woodbury: P = V Gᵀ (one pass), C = P (nλI + K)⁻¹, H = (V − C G) / λ (one pass).
            P = {name: torch.empty(V[name].shape[0], self.n, dtype=self.dtype, device=V[name].device) for name in dual}
            for start, chunk in self.train.chunks():
                for name in dual:
                    G = chunk[name]
                    P[name][:, start : start + G.shape[0]] = self.backend.dots(G.reshape(G.shape[0], -1), V[name])
            C = {name: torch.cholesky_solve(P[name].double().T, self.chol[name]).T.to(self.dtype) for name in dual}
            acc = {name: torch.zeros_like(V[name]) for name in dual}
            for start, chunk in self.train.chunks():
                for name in dual:
                    G = chunk[name]
                    c = C[name][:, start : start + G.shape[0]]
                    acc[name] += self.backend.weighted_sum(c, G.reshape(G.shape[0], -1))
            for name in dual:
                H[name] = (V[name] - acc[name]) / self.lam[name]
        return {name: H[name] for name in V}
