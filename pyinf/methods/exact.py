"""Exact block inverse: h = (F + λI)⁻¹ v with F = (1/n) Σ_i g_i g_iᵀ, per block.

Primal when D_b ≤ n: accumulate F (D_b × D_b) and Cholesky-factor F + λI.
Woodbury when D_b > n: with the Gram K = G Gᵀ and M = nλI + K,

    (F + λI)⁻¹ = (1/λ)[I − Gᵀ M⁻¹ G],

so a query's scores on the training set are −⟨h, g_i⟩ = −n (M⁻¹ G v)_i: one
pass for the dots P = V Gᵀ and an n × n solve, no H needed. This form is also
the accurate one: building H = (V − P M⁻¹ G)/λ and scoring it against G
cancels large terms, and float32 dots then lose ~1/λ of the answer. The small
dense solves run in float64 whatever the storage dtype, and so does everything
that feeds them: M⁻¹ amplifies an error in K or P by up to κ(M) (~1e4 for
LoRA gradients with a shared low-rank component), so K, P and the primal F
are accumulated in float64 from the stored values (the backends' float64
accumulation, `pyinf/backends/base.py`), not rounded from fp32 results.

Data parallel (`pyinf.distributed`): primal blocks all-reduce F (a sum over
samples). The Woodbury Gram K = G Gᵀ has cross-rank entries, so it is built
row-wise: at step t every rank all-gathers its chunk t of the Woodbury blocks
(all ranks' chunk t, fp32), and each rank computes the Grams of its own
chunks (one local pass) against them, filling K[own rows, gathered columns];
after the last step every entry has been written by exactly the rank owning
its row, and one all-reduce (sum) of the zero-initialised K gives every rank
the whole n × n K (then the same float64 Cholesky everywhere). Cost per rank:
(max chunks per rank) local passes, and the gradients of the Woodbury blocks
cross the network once. The dots P = V Gᵀ are all-gathered by columns before
the n × n solve; each rank keeps its own columns of the result.
"""
from __future__ import annotations

import torch

from .base import Method


class Exact(Method):
    name = "exact"
    damping_from_fit = True  # λ_b from the trace of the Fisher or Gram it builds: no norms pass

    def _fit(self, train):
        self.primal = {b.name: b.size <= self.n for b in train.blocks}
        self.chol: dict[str, torch.Tensor] = {}
        primal = [b for b in train.blocks if self.primal[b.name]]
        dual = [b for b in train.blocks if not self.primal[b.name]]
        f64 = dict(dtype=torch.float64, device=train.device)

        if primal:
            F = {b.name: torch.zeros(b.size, b.size, **f64) for b in primal}
            for _, chunk in train.chunks():
                for b in primal:
                    G = chunk[b.name]
                    # float64 accumulation: F's rounding would cost ~κ·eps of the answer
                    F[b.name] += self.backend.gfim(G.reshape(G.shape[0], 1, -1), dtype=torch.float64)
            self._allreduce_dict(F)  # the primal block Fisher over every rank's samples

        if dual and self.comm is not None:
            K = self._gram_sharded(train, dual)
        elif dual:
            K = {b.name: torch.empty(train.n, train.n, **f64) for b in dual}
            for s1, c1 in train.chunks():  # Gram by chunk pairs (lower triangle, mirrored)
                for s2, c2 in train.chunks():
                    if s2 > s1:
                        break
                    for b in dual:
                        G1, G2 = c1[b.name], c2[b.name]
                        blk = self.backend.gram(G1.reshape(G1.shape[0], -1), G2.reshape(G2.shape[0], -1), torch.float64)
                        K[b.name][s1 : s1 + blk.shape[0], s2 : s2 + blk.shape[1]] = blk
                        K[b.name][s2 : s2 + blk.shape[1], s1 : s1 + blk.shape[0]] = blk.T
        if self.needs_damping:  # trace(Σ g gᵀ) = trace(G Gᵀ) = Σ_i ‖g_i‖²: λ without a norms pass
            self._damping_from_totals(train, {
                b.name: float((F[b.name] if self.primal[b.name] else K[b.name]).diagonal().sum()) for b in train.blocks
            })
        for b in primal:
            A = F.pop(b.name) / self.n
            A.diagonal().add_(self.lam[b.name])
            self.chol[b.name] = torch.linalg.cholesky(A)
        if dual:
            for b in dual:
                M = K[b.name]
                M.diagonal().add_(self.n * self.lam[b.name])
                self.chol[b.name] = torch.linalg.cholesky(M)

    def _gram_sharded(self, train, dual) -> dict[str, torch.Tensor]:
        """The global Woodbury Grams on every rank (module docstring): row blocks by all-gathered chunks."""
        K = {b.name: torch.zeros(self.n, self.n, dtype=torch.float64, device=train.device) for b in dual}
        it = iter(train.chunks())
        while True:
            nxt = next(it, None)
            start, chunk = nxt if nxt is not None else (0, None)
            starts = self.comm.all_ints(self.offset + start)  # global index of each rank's chunk t
            cols = {}
            for b in dual:
                G = (chunk[b.name].reshape(chunk[b.name].shape[0], -1) if chunk is not None
                     else torch.empty(0, b.size, device=train.device)).to(self.dtype)
                cols[b.name] = self.comm.all_gather_var(G)
            counts = [p.shape[0] for p in cols[dual[0].name]]
            if sum(counts) == 0:
                break
            spans = [(r, starts[r], counts[r], sum(counts[:r])) for r in range(len(counts)) if counts[r]]
            G2 = {b.name: torch.cat(cols[b.name]) for b in dual}
            for s1, c1 in train.chunks():  # own rows against the gathered columns
                for b in dual:
                    G1 = c1[b.name].reshape(c1[b.name].shape[0], -1).to(self.dtype)
                    blk = self.backend.gram(G1, G2[b.name], torch.float64)
                    r0 = self.offset + s1
                    for _, g0, c, pos in spans:
                        K[b.name][r0 : r0 + G1.shape[0], g0 : g0 + c] = blk[:, pos : pos + c]
        for b in dual:
            self._allreduce(K[b.name])
        return K

    def _woodbury_scores(self, P: torch.Tensor, name: str) -> torch.Tensor:
        """Dots `P` (m, n) float64 = V Gᵀ of one Woodbury block -> its scores −n P M⁻¹ (float64)."""
        return -self.n * torch.cholesky_solve(P.T, self.chol[name]).T

    def precondition(self, queries):
        """H in float64. Woodbury blocks: H = (V − P M⁻¹ G)/λ, built in float64
        (two passes); `influence` avoids it when scoring the training set."""
        V = {name: q.reshape(q.shape[0], -1).double() for name, q in queries.items()}
        H = {name: torch.cholesky_solve(V[name].T, self.chol[name]).T for name in V if self.primal[name]}
        dual = [name for name in V if not self.primal[name]]
        if dual:
            P = self._dual_dots({name: V[name] for name in dual})
            # M⁻¹ P over the global columns; this rank's columns weight its own samples
            C = {name: self._local_columns(self._woodbury_scores(self._all_columns(P[name]), name)) / -self.n
                 for name in dual}
            acc = {name: torch.zeros_like(V[name]) for name in dual}
            for start, chunk in self.train.chunks():
                for name in dual:
                    G = chunk[name]
                    acc[name] += self.backend.weighted_sum(C[name][:, start : start + G.shape[0]], G.reshape(G.shape[0], -1))
            self._allreduce_dict(acc)
            for name in dual:
                H[name] = (V[name] - acc[name]) / self.lam[name]
        return {name: H[name] for name in V}

    def _dual_dots(self, V: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One pass: P = V Gᵀ (m, n_local) for the given Woodbury blocks."""
        P = {name: torch.empty(v.shape[0], self.train.n, dtype=v.dtype, device=v.device) for name, v in V.items()}
        for start, chunk in self.train.chunks():
            for name, v in V.items():
                G = chunk[name]
                P[name][:, start : start + G.shape[0]] = self.backend.dots(G.reshape(G.shape[0], -1), v)
        return P

    def influence(self, queries):
        """(m, n) in one pass: primal blocks score H Gᵀ, Woodbury blocks need only the dots."""
        V = self._flat(queries)
        H = {name: torch.cholesky_solve(V[name].double().T, self.chol[name]).T for name in V if self.primal[name]}
        dual = {name: V[name].double() for name in V if not self.primal[name]}  # float64 dots (module docstring)
        m = next(iter(V.values())).shape[0]
        out = torch.zeros(m, self.train.n, dtype=torch.float64, device=self.train.device)
        P = {name: torch.empty(m, self.train.n, dtype=torch.float64, device=out.device) for name in dual}
        for start, chunk in self.train.chunks():
            for name, G in chunk.items():
                G = G.reshape(G.shape[0], -1)
                if name in dual:
                    P[name][:, start : start + G.shape[0]] = self.backend.dots(G, dual[name])
                else:
                    out[:, start : start + G.shape[0]] += self.backend.score(H[name], G)
        for name in dual:
            out += self._local_columns(self._woodbury_scores(self._all_columns(P[name]), name))
        return out

    def self_influence(self, train):
        """Woodbury blocks in closed form, −n (K M⁻¹)_ii = −n (1 − nλ (M⁻¹)_ii); primal blocks per chunk."""
        out = torch.zeros(train.n, dtype=torch.float64, device=train.device)
        for b in self.blocks:
            if not self.primal[b.name]:
                m_inv_diag = self._local_columns(torch.cholesky_inverse(self.chol[b.name]).diagonal())
                out -= self.n * (1 - self.n * self.lam[b.name] * m_inv_diag)
        if any(self.primal.values()):
            for start, chunk in train.chunks():
                for name, G in chunk.items():
                    if self.primal[name]:
                        g = G.reshape(G.shape[0], -1).double()
                        h = torch.cholesky_solve(g.T, self.chol[name]).T
                        out[start : start + g.shape[0]] -= (h * g).sum(dim=1)
        return out
