"""Backend dispatch: `torch` (reference, any device); `triton` and `cpu` come later."""
from __future__ import annotations

import torch

from .base import Backend
from .torch_backend import TorchBackend

BACKENDS: dict[str, type[Backend]] = {"torch": TorchBackend}


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend called `name` ("auto" picks the fastest one available for `device`)."""
    if name == "auto":
        name = "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; available: {['auto', *BACKENDS]}")
    return BACKENDS[name]()


__all__ = ["Backend", "TorchBackend", "BACKENDS", "get_backend"]
