"""Scoring: S = −H Gᵀ for one chunk (the last pass of every method, and tracin's only one).

`H` (m, D) float32 preconditioned queries, `G` (c, D) float32 / bfloat16 /
float16 -> `(m, c)` float32. This is `dots` with a sign, so it launches the
kernel of `norms_dots.py` with the norms off and SIGN = −1 folded into the
store: same tiling (one read of G for m ≤ 128, D split over programs with a
two-stage, deterministic reduction), same precision modes (`_dot.py`).
"""
from __future__ import annotations

import torch

try:  # installed as pyinf.kernels
    from . import norms_dots as _nd
except ImportError:  # pragma: no cover - imported by path while developing
    import norms_dots as _nd  # type: ignore


def score(H: torch.Tensor, G: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
    """`H` (m, D) fp32, `G` (c, D) -> `(m, c)` = −H Gᵀ (fp32 accumulation)."""
    return _nd.launch(G, H, norms=False, dots=True, sign=-1.0, precision=precision)[1]


def score_reference(H: torch.Tensor, G: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    dt = torch.float64 if upcast else torch.float32
    return -(H.to(dt) @ G.to(dt).T)
