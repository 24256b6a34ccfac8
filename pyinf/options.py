"""Method options as dataclasses, validated in one place.

Every method declares its options as a frozen dataclass, a subclass of
`Options`, whose fields say their rule (`positive_int`, `positive_float`,
`one_of`, `integer`, `any_value`):

    @dataclass(frozen=True)
    class LiSSAOptions(Options):
        iterations: int = positive_int(1000)
        scale: float | None = positive_float(None, optional=True)

`Options.make(method, **user_options)` is the one door in: an unknown or a
missing required option, or a value that breaks its field's rule, is a
ValueError naming the method and the option. `report()` (every field, the
defaults included) is what the demo and the evals print.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

__all__ = ["Options", "positive_int", "positive_float", "one_of", "integer", "any_value"]


def _rule(default, rule: str, ok: Callable[[Any], bool], optional: bool = False):
    """A dataclass field whose metadata carries its rule: `ok(value)` must hold (None passes when optional)."""
    meta = {"rule": rule + (" or None" if optional else ""), "ok": (lambda v: v is None or ok(v)) if optional else ok}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(default=MISSING, *, optional: bool = False):
    """An int >= 1."""
    return _rule(default, "an int >= 1", lambda v: _is_int(v) and v >= 1, optional)


def positive_float(default=MISSING, *, optional: bool = False):
    """A finite number > 0."""
    return _rule(default, "a finite number > 0",
                 lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf, optional)


def integer(default=MISSING):
    """Any int (a seed)."""
    return _rule(default, "an int", _is_int)


def one_of(default, choices: tuple, *, any_case: bool = False):
    """One of `choices` (`any_case`: a string in any case; the method lowers it)."""
    def ok(v):
        v = v.lower() if any_case and isinstance(v, str) else v
        return any(v is c or (type(v) is type(c) and v == c) for c in choices)

    return _rule(default, f"one of {choices}", ok)


def any_value(default=MISSING):
    """No rule (the method checks it where it has the context)."""
    return _rule(default, "any value", lambda v: True)


@dataclass(frozen=True)
class Options:
    """Base of every method's options (no fields of its own); see the module docstring."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not f.metadata["ok"](value):
                raise ValueError(f"option {f.name} must be {f.metadata['rule']}, got {value!r}")

    @classmethod
    def make(cls, method: str, **options) -> "Options":
        """An instance from user keyword arguments; ValueError naming `method` on an unknown, missing or bad option."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method '{method}'; valid options: {names or 'none'}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in options]
        if missing:
            raise ValueError(f"method '{method}' needs the option(s) {missing}")
        try:
            return cls(**options)
        except ValueError as err:
            raise ValueError(f"{method}: {err}") from None

    def report(self) -> dict[str, Any]:
        """Every option, the defaults included: what reports print."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
