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
