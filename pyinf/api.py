"""The public functions on precomputed per-sample gradients."""
from __future__ import annotations

import torch

from .backends import get_backend
from .blocks import GradientSource, Grads, TensorSource, as_blocks, check_finite, mean_query
from .methods import Method, get_method


def _make_method(method: str, train: GradientSource, damping, damping_mode, backend, options) -> Method:
    cls = get_method(method)
    return cls(get_backend(backend, train.device), damping=damping, damping_mode=damping_mode, **options)


def influence(
    train_grads: Grads,
    query_grads: Grads,
    *,
    method: str,
    damping: float = 0.1,
    damping_mode: str = "relative",
    aggregate: bool = False,
    per_block: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    **options,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Influence of every training point on every query.

    Args:
        train_grads: per-sample training gradients, `{block: (n, rows, cols)}`
            for matrix blocks (LoRA A `(n, r, d_in)`, LoRA Bᵀ `(n, r, d_out)`,
            an `nn.Linear` weight `(n, out, in)`) and/or `{block: (n, D_b)}`
            for flat blocks; or one `(n, D)` tensor. float32, bfloat16,
            float16 or float64.
        query_grads: the same blocks with `m` query samples, `(m, ...)`.
        method: "tracin", "datainf", "exact", "lissa" or "hyperinf" ("kfac" and
            "ekfac" need the capture's K-FAC statistics: `pyinf.Attributor`).
        damping: c > 0. `damping_mode="relative"`: λ_b = c · mean_i ‖g_ib‖² / D_b;
            `"absolute"`: λ_b = c.
        aggregate: score the mean query gradient instead; returns `(n,)`.
        per_block: return each block's share of the scores, `{block: (m, n)}`
            (`{block: (n,)}` with `aggregate`) in the blocks' order; the
            shares sum to the scores of `per_block=False` (to rounding).
        backend: "auto", "torch" (reference); more come with their issues.
        chunk_size: training samples per chunk in each pass (default: ~256 MB).
        **options: method options (lissa: iterations, scale, tol;
            hyperinf: iterations, tol, solver). Unknown options are an error.

    Returns:
        `(m, n)` float32 scores on the inputs' device (`(n,)` with
        `aggregate`): score[j, i] = −Σ_b v_jbᵀ (F_b + λ_b I)⁻¹ g_ib, or the
        method's approximation of it. Positive = training point i is harmful
        to query j (up-weighting it raises the query loss); negative = helpful.
    """
    train = TensorSource(as_blocks(train_grads, "train_grads"), chunk_size)
    queries = as_blocks(query_grads, "query_grads", blocks=train.blocks)
    q_device = next(iter(queries.values())).device
    if q_device != train.device:
        raise ValueError(f"query_grads are on {q_device} but train_grads on {train.device}")
    for name, V in queries.items():
        check_finite(name, V, "query gradient")
    m = _make_method(method, train, damping, damping_mode, backend, options)
    if aggregate:
        queries = mean_query(queries, train.dtype)
    m.fit(train)
    scores = m.influence(queries, per_block=per_block).float()
    if aggregate:
        scores = scores[..., 0, :]
    return dict(zip((b.name for b in train.blocks), scores)) if per_block else scores


def self_influence(
    train_grads: Grads,
    *,
    method: str,
    damping: float = 0.1,
    damping_mode: str = "relative",
    backend: str = "auto",
    chunk_size: int | None = None,
    **options,
) -> torch.Tensor:
    """Self-influence −g_iᵀ H⁻¹ g_i of each training point on its own loss.

    Arguments as in `influence`. Returns `(n,)` float32; ≤ 0 for every method
    (H is positive definite), so rank by magnitude: large |score| = the point
    is hard to fit from the rest (candidates for mislabeled data).
    """
    train = TensorSource(as_blocks(train_grads, "train_grads"), chunk_size)
    m = _make_method(method, train, damping, damping_mode, backend, options)
    m.fit(train)
    return m.self_influence(train).float()
