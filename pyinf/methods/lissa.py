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

import torch

from .base import Method

POWER_ITERATIONS = 10


class LiSSA(Method):
    name = "lissa"
    options = {"iterations": 1000, "scale": None, "tol": 1e-5}

    def _fisher_products(self, X: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One pass: F X for every block, X {name: (k, D_b)}."""
        out = {name: torch.zeros_like(x) for name, x in X.items()}
        w = torch.full((self.train.chunk_size,), 1.0 / self.n, dtype=self.dtype, device=self.train.device)
        for _, chunk in self.train.chunks():
            for name, G in chunk.items():
                self.backend.rank_one_accumulate(out[name], G.reshape(G.shape[0], -1), X[name], w[: G.shape[0]])
        return self._allreduce_dict(out)  # F X over every rank's samples (power iteration and recursion)

    def _check_options(self):
        self._check_positive_int("iterations")
        self._check_positive_float("scale", allow_none=True)
        self._check_positive_float("tol")

    def _fit(self, train):
        if self.opts["scale"] is not None:
            self.scale = {b.name: float(self.opts["scale"]) for b in train.blocks}
            return
        gen = torch.Generator().manual_seed(0)
        u = {
            b.name: torch.randn(1, b.size, generator=gen, dtype=torch.float64).to(self.dtype).to(train.device)
            for b in train.blocks
        }
        top = {}
        for _ in range(POWER_ITERATIONS):
            # clamp: an all-zero block (absolute damping) has F = 0, so F u = 0
            u = {name: x / x.norm().clamp_min(torch.finfo(x.dtype).tiny) for name, x in u.items()}
            Fu = self._fisher_products(u)
            top = {name: (u[name] * Fu[name]).sum() for name in u}  # kept on the device until the end
            u = Fu
        self.scale = {name: 1.1 * (float(t) + self.lam[name]) for name, t in top.items()}

    def precondition(self, queries):
        V = self._flat(queries)
        iterations, tol = self.opts["iterations"], self.opts["tol"]
        v_norm = {name: v.norm().clamp_min(torch.finfo(v.dtype).tiny) for name, v in V.items()}
        h = {name: v.clone() for name, v in V.items()}
        residual = float("inf")
        for _ in range(iterations):
            Fh = self._fisher_products(h)
            residuals = []
            for name in h:
                # step = v − (F + λI) h / s, the residual of A (h/s) = v
                step = V[name] - (Fh[name] + self.lam[name] * h[name]) / self.scale[name]
                h[name] += step
                residuals.append(step.norm() / v_norm[name])
            # one host read an iteration (not one per block); the same exit on every rank
            residual = self._allmax(float(torch.stack(residuals).max()))
            if not residual <= 1e30:  # NaN or exploding
                raise ValueError(
                    f"lissa diverged (residual {residual:.3g}): scale {self.scale} is below (λ_max + λ)/2; "
                    f"raise `scale` or leave it to the power iteration"
                )
            if residual < tol:
                break
        else:
            self._warn_not_converged("the LiSSA recursion", iterations, residual, tol)
        return {name: h[name] / self.scale[name] for name in h}
