"""Triton kernels for pyinf, installed as ``pyinf.kernels``.

The source lives in the top-level ``kernels/`` folder of the repository and is
installed by ``setup.py`` as the subpackage ``pyinf.kernels``.  One op per file:
``@triton.jit`` kernel -> launcher (asserts, grid, allocation) -> public
function, plus a plain-PyTorch reference used by tests and benchmarks.

This ``__init__`` deliberately imports nothing heavy: Triton is optional, and
``import pyinf.kernels`` must work without it.  Import the op modules directly
(``from pyinf.kernels import <op>``).  Under ``TRITON_INTERPRET=1`` the kernels
run on the CPU (that is how the test suite runs them).
"""

import importlib.util as _ilu

__all__ = ["triton_available"]


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (without importing it)."""
    return _ilu.find_spec("triton") is not None
