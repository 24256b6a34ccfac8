"""Seeded synthetic per-sample gradients with a planted answer (for the demo and tests).

Each training sample belongs to one of `classes`; its gradient in every block
is its class's direction plus a *shared* direction with a large random
coefficient plus noise. Queries come from the same classes. The shared
direction dominates raw dot products (so tracin ranks poorly), while the
inverse curvature damps it (so the second-order methods find the query's own
class): the situation in which influence functions earn their keep.
"""
from __future__ import annotations

import torch

# LoRA-like blocks: A gradients (r, d_in) and Bᵀ gradients (r, d_out), r = 4
DEFAULT_BLOCKS = {
    "layers.0.q_proj.lora_A": (4, 64),
    "layers.0.q_proj.lora_B": (4, 64),
    "layers.0.v_proj.lora_A": (4, 64),
    "layers.0.v_proj.lora_B": (4, 64),
    "score.weight": (16,),
}


def planted_classes(
    n: int = 400,
    m: int = 20,
    classes: int = 10,
    blocks: dict[str, tuple[int, ...]] | None = None,
    shared_scale: float = 4.0,
    noise: float = 0.5,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Returns `(train_grads, query_grads, train_labels (n,), query_labels (m,))`.

    Block tensors are float32 of shape `(n, *shape)` / `(m, *shape)`.
    """
    blocks = DEFAULT_BLOCKS if blocks is None else blocks
    gen = torch.Generator().manual_seed(seed)
    train_labels = torch.arange(n) % classes
    query_labels = torch.arange(m) % classes
    train, query = {}, {}
    for name, shape in blocks.items():
        centers = torch.randn(classes, *shape, generator=gen)
        shared = torch.randn(*shape, generator=gen)

        def draw(labels: torch.Tensor) -> torch.Tensor:
            k = labels.shape[0]
            coef = shared_scale * torch.randn(k, *([1] * len(shape)), generator=gen)
            return centers[labels] + coef * shared + noise * torch.randn(k, *shape, generator=gen)

        train[name] = draw(train_labels)
        query[name] = draw(query_labels)
    return train, query, train_labels, query_labels
