"""The reference backend: plain PyTorch, on any device.

It defines what the fused primitives compute; the other backends are tested
against it. Low-precision chunks are upcast to the compute dtype chunk by chunk.
"""
from __future__ import annotations

import torch

from .base import Backend


def _upcast(G: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    dtype = like.dtype if like is not None else (torch.float64 if G.dtype == torch.float64 else torch.float32)
    return G.to(dtype)


class TorchBackend(Backend):
    name = "torch"

    def sq_norms(self, G):
        G = _upcast(G)
        return (G * G).sum(dim=1)

    def dots(self, G, V):
        return V @ _upcast(G, V).T

    def norms_and_dots(self, G, V):
        G = _upcast(G, V)
        return (G * G).sum(dim=1), V @ G.T

    def weighted_sum(self, C, G):
        return C @ _upcast(G, C)

    def rank_one_accumulate(self, acc, G, V, w):
        G = _upcast(G, acc)
        acc.addmm_((V @ G.T) * w, G)

    def gram(self, G1, G2):
        G1 = _upcast(G1)
        return G1 @ _upcast(G2, G1).T

    def gfim(self, G):
        G = _upcast(G)
        flat = G.reshape(-1, G.shape[-1])
        return flat.T @ flat

    def score(self, H, G):
        return -(H @ _upcast(G, H).T)
