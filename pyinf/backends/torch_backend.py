"""The reference backend: plain PyTorch, on any device.

It defines what the fused primitives compute; the other backends are tested
against it. Low-precision chunks are upcast to the compute dtype chunk by chunk.
"""
from __future__ import annotations

import torch

from .base import Backend
from .dense import spd_inverse, symmetrize_


def _upcast(G: torch.Tensor, like: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """G in the dtype of `like`, or `dtype`, or the compute dtype of G (float64 stays, the rest float32)."""
    if dtype is None:
        dtype = like.dtype if like is not None else (torch.float64 if G.dtype == torch.float64 else torch.float32)
    return G.to(dtype)


class TorchBackend(Backend):
    """The reference backend: every primitive in plain PyTorch (any device, any float dtype)."""
    name = "torch"

    def sq_norms(self, G):
        # vector_norm reduces without materialising G*G (several times faster than (G*G).sum)
        return torch.linalg.vector_norm(_upcast(G), dim=-1).square()

    def dots(self, G, V):
        return V @ _upcast(G, V).mT

    def norms_and_dots(self, G, V):
        G = _upcast(G, V)
        return (G * G).sum(dim=-1), V @ G.mT

    def weighted_sum(self, C, G):
        return C @ _upcast(G, C)

    def rank_one_accumulate(self, acc, G, V, w):
        G = _upcast(G, acc)
        P = (V @ G.mT) * w.unsqueeze(-2)
        if G.dim() == 2:
            acc.addmm_(P, G)
        else:
            acc.baddbmm_(P, G)

    def gram(self, G1, G2, dtype=None):
        G1 = _upcast(G1, dtype=dtype)
        return G1 @ _upcast(G2, G1).mT

    def gfim(self, G, dtype=None, out=None):
        G = _upcast(G, dtype=dtype if out is None else out.dtype)
        flat = G.reshape(*G.shape[:-3], -1, G.shape[-1])
        if out is None:
            return symmetrize_(flat.mT @ flat)
        if flat.dim() == 2:
            return out.addmm_(flat.mT, flat)
        return out.baddbmm_(flat.mT, flat)  # accumulates without a (b, cols, cols) temporary

    def score(self, H, G):
        S = H @ _upcast(G, H).mT
        return -(S if S.dim() == 2 else S.sum(0))

    def spd_inverse(self, A, *, iterations, tol, solver="auto", out=None):
        return spd_inverse(A, iterations=iterations, tol=tol, solver=solver, out=out)
