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

The Woodbury Gram reads each block once: same-shape blocks are taken in
slices of a group whose n samples fit `GRAM_BYTES` (a pass over the source
restricted to those blocks, `chunks(names)`, gathers them into one
`(b, n, D)` array unless the source holds all n in one chunk) and one
batched `gram` call gives their `(b, n, n)` Grams. Passes over G: one for the
Grams (and primal Fishers), one to score.

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

from ..backends.dense import symmetrize_
from ..blocks import BlockGroup, stack_group
from .base import Method

# Bytes of one slice of blocks gathered for the Woodbury Gram (all n samples, stored dtype)
# plus its float64 copy where the backend accumulates in float64 through the torch path.
GRAM_BYTES = 2 << 30


class Exact(Method):
    """The damped block Fisher inverse: primal Cholesky when D_b ≤ n, else Woodbury on the n × n Gram (module doc)."""
    name = "exact"
    damping_from_fit = True  # λ_b from the trace of the Fisher or Gram it builds: no norms pass

    def _fit(self, train):
        self.primal = {b.name: b.size <= self.n for b in train.blocks}
        self.chol: dict[str, torch.Tensor] = {}
        f64 = dict(dtype=torch.float64, device=train.device)
        primal = [g for g in self.groups if g.size <= self.n]
        dual = [g for g in self.groups if g.size > self.n]
        stats: dict[str, torch.Tensor] = {}  # name -> F (D_b × D_b, primal) or K (n × n, Woodbury), float64

        if primal:
            F = [torch.zeros(len(g.names), g.size, g.size, **f64) for g in primal]
            for _, chunk in train.chunks([name for g in primal for name in g.names]):
                for i, g in enumerate(primal):
                    # float64 accumulation, in place: F's rounding would cost ~κ·eps of the answer
                    self.backend.gfim(stack_group(chunk, g).unsqueeze(2), out=F[i])
            for f in self._allreduce_list(F):  # the primal block Fisher over every rank's samples
                symmetrize_(f)
            for g, f in zip(primal, F):
                stats.update({name: f[k] for k, name in enumerate(g.names)})
        if dual and self.comm is not None:
            stats.update(self._gram_sharded(train, [b for b in train.blocks if not self.primal[b.name]]))
        elif dual:
            for g in dual:
                stats.update(self._grams(train, g))
        if self.needs_damping:  # trace(Σ g gᵀ) = trace(G Gᵀ) = Σ_i ‖g_i‖²: λ without a norms pass
            names = [b.name for b in train.blocks]
            traces = torch.stack([stats[name].diagonal().sum() for name in names]).tolist()  # one host read
            self._damping_from_totals(train, dict(zip(names, traces)))
        for b in train.blocks:
            A = stats.pop(b.name)
            if self.primal[b.name]:
                A /= self.n
                A.diagonal().add_(self.lam[b.name])
            else:
                A.diagonal().add_(self.n * self.lam[b.name])  # M = nλI + K
            self.chol[b.name] = torch.linalg.cholesky(A)
            del A

    def _grams(self, train, g: BlockGroup) -> dict[str, torch.Tensor]:
        """{name: K = G Gᵀ (n × n, float64)} of a Woodbury group: each block read once (module docstring)."""
        per_block = train.n * g.size * (train.grad_dtype.itemsize + 8)
        step = max(1, min(len(g.names), GRAM_BYTES // per_block))
        out = {}
        for lo in range(0, len(g.names), step):
            sub = BlockGroup(g.names[lo : lo + step], g.rows, g.cols)
            if train.num_chunks == 1:  # all n samples in one chunk: no gather
                G = stack_group(next(iter(train.chunks(sub.names)))[1], sub)
            else:
                G = None
                for start, chunk in train.chunks(sub.names):
                    part = stack_group(chunk, sub)
                    if G is None:
                        G = torch.empty(len(sub.names), train.n, g.size, dtype=part.dtype, device=part.device)
                    G[:, start : start + part.shape[1]] = part
            K = self.backend.gram(G, G, torch.float64)
            del G
            out.update({name: K[k] for k, name in enumerate(sub.names)})
        return out

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

    def _woodbury_scores(self, P: torch.Tensor, g: BlockGroup) -> torch.Tensor:
        """Dots `P` (b, m, n) float64 = V Gᵀ of a Woodbury group -> its scores −n P M⁻¹ per block (float64)."""
        L = torch.stack([self.chol[name] for name in g.names])
        return -self.n * torch.cholesky_solve(P.mT, L).mT

    def _primal_H(self, v: torch.Tensor, g: BlockGroup) -> torch.Tensor:
        """`v` (b, m, D) float64 of a primal group -> H = v (F + λI)⁻¹."""
        L = torch.stack([self.chol[name] for name in g.names])
        return torch.cholesky_solve(v.mT, L).mT

    def precondition(self, queries):
        """H in float64. Woodbury blocks: H = (V − P M⁻¹ G)/λ, built in float64
        (two passes); `influence` avoids it when scoring the training set."""
        V = self._stacked(queries, torch.float64)
        H = [self._primal_H(v, g) if self.primal[g.names[0]] else None for g, v in zip(self.groups, V)]
        dual = [i for i, g in enumerate(self.groups) if not self.primal[g.names[0]]]
        if dual:
            P = self._dual_dots({i: V[i] for i in dual})
            # M⁻¹ P over the global columns; this rank's columns weight its own samples
            C = {i: self._local_columns(self._woodbury_scores(self._all_columns(P[i]), self.groups[i])) / -self.n
                 for i in dual}
            acc = {i: torch.zeros_like(V[i]) for i in dual}
            for start, chunk in self.train.chunks(self._names(dual)):
                for i in dual:
                    G = stack_group(chunk, self.groups[i])
                    acc[i] += self.backend.weighted_sum(C[i][..., start : start + G.shape[1]], G)
            self._allreduce_list(list(acc.values()))
            for i in dual:
                H[i] = (V[i] - acc[i]) / self._group_lam(self.groups[i], torch.float64)
        return self._unstacked(H)

    def _names(self, group_indices) -> list[str]:
        return [name for i in group_indices for name in self.groups[i].names]

    def _dual_dots(self, V: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """One pass: P = V Gᵀ (b, m, n_local) for the given Woodbury groups."""
        P = {i: v.new_empty(*v.shape[:2], self.train.n) for i, v in V.items()}
        for start, chunk in self.train.chunks(self._names(V)):
            for i, v in V.items():
                G = stack_group(chunk, self.groups[i])
                P[i][..., start : start + G.shape[1]] = self.backend.dots(G, v)
        return P

    def influence(self, queries, per_block=False):
        """(m, n) in one pass: primal blocks score H Gᵀ, Woodbury blocks need only the dots
        (`per_block`: (n_blocks, m, n), the primal blocks' dots and the Woodbury blocks' −n P M⁻¹ kept apart)."""
        V = self._stacked(queries, torch.float64)  # float64 dots (module docstring)
        dual = {i: v for i, (g, v) in enumerate(zip(self.groups, V)) if not self.primal[g.names[0]]}
        H = {i: self._primal_H(v, g) for i, (g, v) in enumerate(zip(self.groups, V)) if i not in dual}
        m = V[0].shape[1]
        rows = self._group_rows() if per_block else [slice(0, 1)] * len(self.groups)
        out = torch.zeros(len(self.blocks) if per_block else 1, m, self.train.n, dtype=torch.float64,
                          device=self.train.device)
        P = {i: v.new_empty(*v.shape[:2], self.train.n) for i, v in dual.items()}
        for start, chunk in self.train.chunks():
            for i, (g, G) in enumerate(self._grouped(chunk)):
                cols = slice(start, start + G.shape[1])
                if i in dual:
                    P[i][..., cols] = self.backend.dots(G, dual[i])
                elif per_block:
                    out[rows[i], :, cols] = -self.backend.dots(G, H[i])
                else:
                    out[0, :, cols] += self.backend.score(H[i], G)
        for i in dual:
            W = self._local_columns(self._woodbury_scores(self._all_columns(P[i]), self.groups[i]))
            out[rows[i]] += W if per_block else W.sum(dim=0)
        return out[self._block_order()] if per_block else out[0]

    def self_influence(self, train):
        """Woodbury blocks in closed form, −n (K M⁻¹)_ii = −n (1 − nλ (M⁻¹)_ii); primal blocks per chunk."""
        out = torch.zeros(train.n, dtype=torch.float64, device=train.device)
        for b in self.blocks:
            if not self.primal[b.name]:
                m_inv_diag = self._local_columns(torch.cholesky_inverse(self.chol[b.name]).diagonal())
                out -= self.n * (1 - self.n * self.lam[b.name] * m_inv_diag)
        primal = [i for i, g in enumerate(self.groups) if self.primal[g.names[0]]]
        if primal:
            for start, chunk in train.chunks(self._names(primal)):
                for i in primal:
                    g = stack_group(chunk, self.groups[i]).double()
                    h = self._primal_H(g, self.groups[i])
                    out[start : start + g.shape[1]] -= (h * g).sum(dim=(0, 2))
        return out
