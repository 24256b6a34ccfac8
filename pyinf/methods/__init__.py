"""The methods, one module each, all following `base.Method`'s protocol."""
from __future__ import annotations

from .base import Method
from .datainf import DataInf
from .ekfac import EKFAC
from .exact import Exact
from .hyperinf import HyperINF
from .kfac import KFAC
from .lissa import LiSSA
from .tracin import TracIn

METHODS: dict[str, type[Method]] = {m.name: m for m in (TracIn, DataInf, Exact, LiSSA, HyperINF, KFAC, EKFAC)}


def get_method(name: str) -> type[Method]:
    """The `Method` class registered under `name` ("tracin", "datainf", ...); ValueError naming the choices."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["Method", "METHODS", "get_method", *(cls.__name__ for cls in METHODS.values())]
