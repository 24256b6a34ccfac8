"""Shared pytest setup for pyinf.

* ``TRITON_INTERPRET=1`` is set before anything imports triton, so Triton
  kernels run on the CPU.
* The tests must exercise the INSTALLED package (``make test`` builds and
  installs it, then runs pytest from ``tests/`` with ``--import-mode=importlib``):
  importing ``pyinf`` from the source tree would skip the C++ build and the
  packaging of ``kernels/`` as ``pyinf.kernels``. For quick iterations on a
  checkout, ``pip install -e .`` and ``PYINF_TEST_EDITABLE=1`` allow an editable
  install (never in CI).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SOURCE_PKG = REPO_ROOT / "pyinf"

import pyinf  # noqa: E402

_pyinf_dirs = [pathlib.Path(p).resolve() for p in getattr(pyinf, "__path__", [])]
if pyinf.__file__:
    _pyinf_dirs.append(pathlib.Path(pyinf.__file__).resolve().parent)
if os.environ.get("PYINF_TEST_EDITABLE") != "1" and any(d == _SOURCE_PKG or _SOURCE_PKG in d.parents for d in _pyinf_dirs):
    raise pytest.UsageError(
        "run `make test`: tests must import the installed pyinf, but pyinf was "
        f"imported from the source tree ({pyinf.__file__ or _pyinf_dirs})"
    )


def seed_all(seed: int = 0) -> None:
    """Seed python, numpy and torch RNGs."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    import torch

    torch.manual_seed(seed)


@pytest.fixture
def seed():
    """Seed all RNGs with 0; returns the seeding function for re-seeding."""
    seed_all(0)
    return seed_all


@pytest.fixture
def torch_gen():
    """A CPU ``torch.Generator`` seeded with 0."""
    import torch

    return torch.Generator().manual_seed(0)


@pytest.fixture
def nan_empty(monkeypatch):
    """Every torch.empty / empty_like returns NaN-filled memory, so a kernel that
    leaves part of its output unwritten fails its comparison."""
    import torch

    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))


# Hypothesis: the same examples on every run and machine (derandomized, no
# example database), so CI cannot pass on one run and fail on the next.
# HYPOTHESIS_PROFILE=explore draws new random examples (for local bug hunts).
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    _hyp_settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - the property tests skip themselves
    pass


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same RNG state (python, numpy, torch), so a
    draw without an explicit generator is still the same on every run and machine."""
    seed_all(0)
