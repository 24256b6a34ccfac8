"""Evaluation metrics on score matrices."""
from __future__ import annotations

import torch


def roc_auc(values: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """ROC-AUC of ranking by `values` (higher = more likely positive), per row.

    `values` (m, n) or (n,), `positive` bool of the same shape. The
    Mann-Whitney statistic with average ranks for ties; a row with no
    positives or no negatives gives NaN.
    """
    squeeze = values.dim() == 1
    values = values.reshape(-1, values.shape[-1]).double()
    positive = positive.reshape(values.shape).bool()
    # average ranks (1-based): for ties, the mean of the ranks they span
    order = values.argsort(dim=1)
    sorted_vals = values.gather(1, order)
    ranks = torch.empty_like(values)
    for r in range(values.shape[0]):
        _, inverse, counts = torch.unique_consecutive(sorted_vals[r], return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        avg = ends - (counts.double() - 1) / 2
        ranks[r, order[r]] = avg[inverse]
    n_pos = positive.sum(dim=1).double()
    n_neg = positive.shape[1] - n_pos
    u = (ranks * positive).sum(dim=1) - n_pos * (n_pos + 1) / 2
    auc = u / (n_pos * n_neg)
    return auc[0] if squeeze else auc


def _as_rows(values: torch.Tensor) -> tuple[torch.Tensor, bool]:
    squeeze = values.dim() == 1
    return values.reshape(-1, values.shape[-1]), squeeze


def recall_at_k(values: torch.Tensor, positive: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of `values` (m, n) and boolean `positive` (m, n): the fraction of the positives found among the k
    highest values, (m,).

    Ties at the cut are broken by position (first index first), as `topk` on a
    stable sort does. A row with no positives gives NaN.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vals, squeeze = _as_rows(values.double())
    pos = positive.reshape(vals.shape).bool()
    order = torch.sort(-vals, dim=1, stable=True).indices[:, : min(k, vals.shape[1])]
    hits = pos.gather(1, order).sum(dim=1).double()
    out = hits / pos.sum(dim=1).double()
    return out[0] if squeeze else out


def detection_curve(values: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction found against fraction inspected, inspecting in order of decreasing `values`.

    `values` (n,), `positive` bool (n,). Returns `(inspected, found)`, each
    (n + 1,) float64 from (0, 0) to (1, 1): after inspecting the top k,
    `inspected[k] = k / n` and `found[k]` = positives among them / all
    positives. Ties are broken by position (stable sort).
    """
    if values.dim() != 1:
        raise ValueError(f"detection_curve takes one ranking (n,), got shape {tuple(values.shape)}")
    pos = positive.reshape(-1).bool()
    n, n_pos = pos.numel(), int(pos.sum())
    if n_pos == 0:
        raise ValueError("detection_curve: no positives")
    order = torch.sort(-values.double(), stable=True).indices
    found = torch.cat([torch.zeros(1, dtype=torch.float64), pos[order].double().cumsum(0) / n_pos])
    inspected = torch.arange(n + 1, dtype=torch.float64) / n
    return inspected, found


def curve_auc(x: torch.Tensor, y: torch.Tensor) -> float:
    """Area under the curve `y` (k,) over `x` (k,) by the trapezoid rule (a random ranking's detection curve gives ~0.5)."""
    return float(torch.trapezoid(y.double(), x.double()))


def detection_auc(values: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under `detection_curve` of `values` (n,) against boolean `positive` (n,) (1 − n_pos/(2n) for a perfect
    ranking, ~0.5 for a random one)."""
    return curve_auc(*detection_curve(values, positive))


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `values` (..., n) along the last dim, (..., n) float64; ties get the mean of the ranks they span."""
    vals, squeeze = _as_rows(values.double())
    order = vals.argsort(dim=1, stable=True)
    sorted_vals = vals.gather(1, order)
    ranks = torch.empty_like(vals)
    for r in range(vals.shape[0]):
        _, inverse, counts = torch.unique_consecutive(sorted_vals[r], return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        ranks[r, order[r]] = (ends - (counts.double() - 1) / 2)[inverse]
    return ranks[0] if squeeze else ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of `a`, `b` (..., n) along the last dim, (...,) (average ranks for ties); NaN for a
    constant row."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))
