"""Scoring: S = −Σ_k H_k G_kᵀ for one chunk (the last pass of every method, and tracin's only one).

`H` (m, D) float32 preconditioned queries, `G` (c, D) float32 / bfloat16 /
float16 -> `(m, c)` float32; or a group of b same-shape blocks, `H` (b, m, D),
`G` (b, c, D) -> `(m, c)`, the scores SUMMED over the blocks, in one launch.
This is `dots` with a sign, so it launches the kernel of `norms_dots.py` with
the norms off and SIGN = −1 folded into the store, in its summed mode: the
block axis is just more of the reduction (a program walks (block, D tile)
steps t = k · d_tiles + j), so there is no (b, m, c) intermediate; the
reduction is split over programs with a two-stage, deterministic sum of
(splits, m, c) partials (at the 13B group, b = 160 blocks of c = 20, m = 100:
132 slices, 1.7 MB against 262 MB of bf16 G). Same tiling otherwise (one read
of G for m ≤ 128) and the same precision modes (`_dot.py`).
"""
from __future__ import annotations

import torch

try:  # installed as pyinf.kernels
    from . import norms_dots as _nd
except ImportError:  # pragma: no cover - imported by path while developing
    import norms_dots as _nd  # type: ignore


def score(H: torch.Tensor, G: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
    """`H` ([b,] m, D) fp32, `G` ([b,] c, D) -> `(m, c)` = −Σ_k H_k G_kᵀ (fp32 accumulation)."""
    return _nd.launch(G, H, norms=False, dots=True, sign=-1.0, sum_blocks=True, precision=precision)[1]


def score_reference(H: torch.Tensor, G: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    dt = torch.float64 if upcast else torch.float32
    S = H.to(dt) @ G.to(dt).mT
    return -(S if S.dim() == 2 else S.sum(0))
