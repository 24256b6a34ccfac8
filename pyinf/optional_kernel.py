"""Optional Triton ops of `pyinf.kernels`: imported on first use, or None with the reason kept."""
from __future__ import annotations

import importlib
from typing import Any, Callable


class OptionalKernel:
    """`pyinf.kernels.<module>.<name>`, when triton imports and the module's `is_available()` says it can run."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        self._fn: Any = None  # None: not tried yet; False: unavailable
        self.error: BaseException | None = None

    def get(self) -> Callable | None:
        """The kernel function, imported on first use; None when it cannot run here (the reason in `error`)."""
        if self._fn is None:
            try:
                mod = importlib.import_module(f"pyinf.kernels.{self.module}")
                if not mod.is_available():
                    raise ImportError(f"pyinf.kernels.{self.module} cannot run here (no triton or no device)")
                self._fn = getattr(mod, self.name)
            except Exception as exc:  # noqa: BLE001 - keep the reason; callers fall back to torch
                self.disable(exc)
        return self._fn or None

    def disable(self, exc: BaseException) -> None:
        """Stop using the kernel (it failed); later `get()` calls return None."""
        self._fn, self.error = False, exc
