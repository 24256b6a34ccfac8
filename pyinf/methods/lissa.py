"""LiSSA (Agarwal et al., JMLR 2017; Koh & Liang, ICML 2017): iterative inverse.

    h_{t+1} = v + (I − (F + λI)/s) h_t,   H = h_T / s

converges to (F + λI)⁻¹ v when s > (λ_max(F) + λ)/2. By default
s = 1.1 (λ̂_max + λ) with λ̂_max from power iteration (a Rayleigh quotient
never overestimates, and half of λ_max is all the bound needs). Each iteration
is one pass over G (the fused Fisher-vector product); about (s/λ) ln(1/tol)
iterations are needed, so LiSSA is slow at small damping: it stops early once
the relative residual ‖v − (F + λI) h/s‖ / ‖v‖ is below `tol`, and warns when
`iterations` run out first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import Options, positive_float, positive_int
from .base import Method

POWER_ITERATIONS = 10


@dataclass(frozen=True)
class LiSSAOptions(Options):
    """iterations: passes of the recursion at most; scale: s (None: from power iteration); tol: the
    relative residual at which it stops."""

    iterations: int = positive_int(1000)
    scale: float | None = positive_float(None, optional=True)
    tol: float = positive_float(1e-5)


class LiSSA(Method):
    """LiSSA: the stochastic Neumann recursion for (F + λI)⁻¹ v, one pass over G per iteration (module doc)."""
    name = "lissa"
    Options = LiSSAOptions

    def _fisher_products(self, X: list[torch.Tensor]) -> list[torch.Tensor]:
        """One pass: F X for every block, X one `(b, k, D)` stack per group."""
        out = [torch.zeros_like(x) for x in X]
        w = [torch.full((len(g.names), self.train.chunk_size), 1.0 / self.n, dtype=self.dtype, device=self.train.device)
             for g in self.groups]
        for _, chunk in self.train.chunks():
            for i, (_, G) in enumerate(self._grouped(chunk)):
                self.backend.rank_one_accumulate(out[i], G, X[i], w[i][:, : G.shape[1]].contiguous())
        return self._allreduce_list(out)  # F X over every rank's samples (power iteration and recursion)

    def _fit(self, train):
        if self.opts["scale"] is not None:
            self.scale = {b.name: float(self.opts["scale"]) for b in train.blocks}
            return
        gen = torch.Generator().manual_seed(0)
        u = [torch.randn(len(g.names), 1, g.size, generator=gen, dtype=torch.float64).to(self.dtype).to(train.device)
             for g in self.groups]
        top = []
        for _ in range(POWER_ITERATIONS):
            # clamp: an all-zero block (absolute damping) has F = 0, so F u = 0
            u = [x / x.norm(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny) for x in u]
            Fu = self._fisher_products(u)
            top = [(x * fx).sum(dim=(1, 2)) for x, fx in zip(u, Fu)]  # kept on the device until the end
            u = Fu
        names = [name for g in self.groups for name in g.names]
        top = torch.cat(top).tolist()  # one host read
        self.scale = {name: 1.1 * (t + self.lam[name]) for name, t in zip(names, top)}

    def _group_scale(self, g) -> torch.Tensor:
        return torch.tensor([self.scale[name] for name in g.names], dtype=self.dtype,
                            device=self.train.device).view(-1, 1, 1)

    def precondition(self, queries):
        V = self._stacked(queries)
        iterations, tol = self.opts["iterations"], self.opts["tol"]
        lam = [self._group_lam(g) for g in self.groups]
        scale = [self._group_scale(g) for g in self.groups]
        v_norm = [v.norm(dim=(1, 2)).clamp_min(torch.finfo(v.dtype).tiny) for v in V]
        h = [v.clone() for v in V]
        residual = float("inf")
        for _ in range(iterations):
            Fh = self._fisher_products(h)
            residuals = []
            for i in range(len(h)):
                # step = v − (F + λI) h / s, the residual of A (h/s) = v
                step = V[i] - (Fh[i] + lam[i] * h[i]) / scale[i]
                h[i] += step
                residuals.append(step.norm(dim=(1, 2)) / v_norm[i])
            # one host read an iteration (not one per block); the same exit on every rank
            residual = self._allmax(float(torch.cat(residuals).max()))
            if not residual <= 1e30:  # NaN or exploding
                raise ValueError(
                    f"lissa diverged (residual {residual:.3g}): scale {self.scale} is below (λ_max + λ)/2; "
                    f"raise `scale` or leave it to the power iteration"
                )
            if residual < tol:
                break
        else:
            self._warn_not_converged("the LiSSA recursion", iterations, residual, tol)
        return self._unstacked([x / s for x, s in zip(h, scale)])
