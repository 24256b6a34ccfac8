"""Loader and torch-facing wrappers for the optional C++ extension ``pyinf._C``.

The extension is imported once, on first use.  When it is missing (no compiler
at install time, ...) pyinf falls back to PyTorch: :func:`load` returns ``None``
and warns once with a :class:`RuntimeWarning`.  With ``PYINF_REQUIRE_NATIVE=1``
in the environment a failed import raises :class:`ImportError` instead (the
test suite sets it so that a broken C++ build cannot hide).

Public API::

    is_available() -> bool
    load() -> module | None
    import_error() -> BaseException | None
    build_info() -> dict                     # what the install recorded
    unavailable_reason() -> str | None       # why pyinf._C is not usable
    num_threads() -> int
    set_num_threads(n: int) -> None          # 0 restores the default (OMP_NUM_THREADS / CPUs)
    norms_and_dots(G, V, *, s_out=None, dots_out=None) -> (s, dots)

The raw module functions (``pyinf._C``) work on buffers (numpy arrays)::

    _C.norms_and_dots(G, V, s_out, dots_out)       # G float32 or uint16/int16 bf16 bits
    _C.norms_and_dots_bf16(G_u16, V, s_out, dots_out)
    _C.dots(G, V, out, alpha=1.0)                  # out (m, c) = alpha V G^T
    _C.rank_one_accumulate(acc, G, V, w)           # acc (m, D) += ((V G^T) * w) G
    _C.weighted_sum(C, G, out)                     # out (m, D) = C G
    _C.num_threads(); _C.set_num_threads(n)

G (c, D) is any C-contiguous buffer (numpy arrays, memmaps, tensor.numpy()
views): float32, or bfloat16 bits as uint16/int16; everything else float32.
``pyinf.backends.cpu_backend.CPUBackend`` is the torch-facing user of them.
"""

from __future__ import annotations

import os
import threading
import warnings

__all__ = [
    "is_available",
    "load",
    "import_error",
    "build_info",
    "unavailable_reason",
    "num_threads",
    "set_num_threads",
    "norms_and_dots",
]

_lock = threading.Lock()
_loaded = False
_module = None
_error: BaseException | None = None
_warned = False


def _require_native() -> bool:
    return os.environ.get("PYINF_REQUIRE_NATIVE", "").strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
    )


def _try_import() -> None:
    global _loaded, _module, _error
    with _lock:
        if _loaded:
            return
        try:
            from pyinf import _C  # type: ignore[attr-defined]

            _module = _C
        except ImportError as exc:  # pragma: no cover - depends on the build
            _error = exc
        _loaded = True


def build_info() -> dict:
    """What the install recorded about building ``pyinf._C`` (``pyinf/_build_info.json``,
    written by setup.py): ``{"native": True}``, or ``{"native": False, "reason": ...}``;
    ``{}`` when there is no record (pyinf imported from a source tree)."""
    import json

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def unavailable_reason() -> str | None:
    """Why ``pyinf._C`` cannot be used, in words (None when it can)."""
    _try_import()
    if _module is not None:
        return None
    info = build_info()
    if info.get("native") is False:
        return f"it was not built when pyinf was installed: {info.get('reason', 'no reason recorded')}"
    if info.get("native") is True:
        return f"it was built at install time but does not import: {_error}"
    return f"it does not import ({_error}); pyinf may be imported from a source tree instead of an install"


def load():
    """Return the ``pyinf._C`` module, or ``None`` (warning once) when missing.

    Raises ImportError (chained to the original error) if the import failed and
    ``PYINF_REQUIRE_NATIVE=1`` is set.
    """
    global _warned
    _try_import()
    if _module is not None:
        return _module
    reason = unavailable_reason()
    if _require_native():
        raise ImportError(
            f"pyinf._C is not available and PYINF_REQUIRE_NATIVE=1 is set: {reason}"
        ) from _error
    if not _warned:
        _warned = True
        warnings.warn(
            f"pyinf's C++ extension pyinf._C is not available: {reason}. pyinf falls back to "
            "PyTorch for its CPU passes (slower). Fix the cause, then reinstall pyinf "
            "(pip install --force-reinstall --no-deps ...).",
            RuntimeWarning,
            stacklevel=2,
        )
    return None


def is_available() -> bool:
    """True when ``pyinf._C`` imports.  Never warns, never raises."""
    _try_import()
    return _module is not None


def import_error() -> BaseException | None:
    """The exception raised by ``import pyinf._C``, or None if it imported."""
    _try_import()
    return _error


def _required():
    mod = load()
    if mod is None:
        raise RuntimeError(f"pyinf._C is not available: {unavailable_reason()}")
    return mod


def num_threads() -> int:
    """Threads the native kernels use (1 when the extension is missing)."""
    mod = load()
    return 1 if mod is None else int(mod.num_threads())


def set_num_threads(n: int) -> None:
    """Set the native kernels' thread count, the calling thread included.

    0 restores the default, ``omp_get_max_threads()`` (OMP_NUM_THREADS, or the
    CPUs available).  The kernels run on their own worker pool (csrc/pool.h),
    whose idle threads sleep instead of spinning, so that on a busy machine
    more threads degrade gracefully; results are bitwise reproducible for a
    given thread count.
    """
    _required().set_num_threads(int(n))


def norms_and_dots(G, V, *, s_out=None, dots_out=None):
    """One read of ``G``: ``s[i] = ||G[i]||^2`` and ``dots[j, i] = <V[j], G[i]>``.

    Args:
        G: CPU ``torch.Tensor`` (c, D), float32 or bfloat16, C-contiguous.
        V: CPU ``torch.Tensor`` (m, D), float32, C-contiguous.
        s_out / dots_out: optional preallocated CPU float32 contiguous tensors
            of shape (c,) and (m, c) to write into.

    Returns:
        ``(s, dots)``: float32 tensors of shape (c,) and (m, c).  Accumulation
        is in float32.  No copy of ``G`` or ``V`` is made: they are handed to
        C++ as zero-copy numpy views (bf16 via ``G.view(torch.int16)``).

    Raises:
        RuntimeError if the extension is not available; ValueError (from C++ or
        here) for wrong device, dtype, shape or layout.
    """
    import torch

    mod = _required()
    for name, t in (("G", G), ("V", V)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
        if t.requires_grad:
            raise ValueError(f"{name} must not require grad (detach it first)")
    if G.dim() != 2 or V.dim() != 2:
        raise ValueError(
            f"G and V must be 2-D, got G {tuple(G.shape)} and V {tuple(V.shape)}"
        )
    if G.dtype == torch.float32:
        g_np = G.numpy()
    elif G.dtype == torch.bfloat16:
        if not G.is_contiguous():
            raise ValueError(f"G must be C-contiguous, got strides {G.stride()}")
        g_np = G.view(torch.int16).numpy()
    else:
        raise ValueError(f"G must be float32 or bfloat16, got {G.dtype}")
    if V.dtype != torch.float32:
        raise ValueError(f"V must be float32, got {V.dtype}")
    c, m = G.shape[0], V.shape[0]
    if s_out is None:
        s_out = torch.empty(c, dtype=torch.float32)
    if dots_out is None:
        dots_out = torch.empty(m, c, dtype=torch.float32)
    for name, t in (("s_out", s_out), ("dots_out", dots_out)):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a CPU float32 torch.Tensor")
    if G.dtype == torch.bfloat16:
        mod.norms_and_dots_bf16(g_np, V.numpy(), s_out.detach().numpy(), dots_out.detach().numpy())
    else:
        mod.norms_and_dots(g_np, V.numpy(), s_out.detach().numpy(), dots_out.detach().numpy())
    return s_out, dots_out
