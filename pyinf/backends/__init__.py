"""Backend dispatch: `torch` (reference, any device), `triton` (CUDA; CPU under
TRITON_INTERPRET=1), `cpu` (the C++ kernels of `pyinf._C`, CPU tensors)."""
from __future__ import annotations

import importlib.util

import torch

from .base import Backend
from .cpu_backend import CPUBackend
from .torch_backend import TorchBackend

# "cpu" is always registered: CPUBackend() raises a clear error when the C++
# extension is missing; "auto" checks for it first (see get_backend).
BACKENDS: dict[str, type[Backend]] = {"torch": TorchBackend, "cpu": CPUBackend}

# triton is optional: register its backend only when the package can be
# imported. The module itself imports triton (and the kernels) lazily, on the
# first TritonBackend(), so `import pyinf` stays fast and works without it.
if importlib.util.find_spec("triton") is not None:
    from .triton_backend import TritonBackend

    BACKENDS["triton"] = TritonBackend


def _native_loaded() -> bool:
    """Whether the C++ extension imports; when it does not, warns once (RuntimeWarning)
    and "auto" uses the torch reference (raises instead under PYINF_REQUIRE_NATIVE=1)."""
    from .. import _native

    return _native.load() is not None


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend called `name` ("auto" picks the fastest one available for `device`)."""
    if name == "auto":
        device = torch.device(device)
        if device.type == "cuda" and "triton" in BACKENDS:
            name = "triton"
        elif device.type == "cpu" and "cpu" in BACKENDS and _native_loaded():
            name = "cpu"
        else:
            name = "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; available: {['auto', *BACKENDS]}")
    return BACKENDS[name]()


def describe(device="cpu") -> str:
    """One line: the backend "auto" picks for `device`, and why (for reports and logs)."""
    from .. import _native

    name = get_backend("auto", torch.device(device)).name
    if name == "cpu":
        n = _native.num_threads()
        return f"cpu (C++ extension pyinf._C, {n} thread{'s' if n != 1 else ''})"
    if name == "torch" and torch.device(device).type == "cpu":
        return f"torch (reference; pyinf._C unavailable: {_native.unavailable_reason()})"
    return name


__all__ = ["Backend", "TorchBackend", "CPUBackend", "BACKENDS", "get_backend", "describe"]
