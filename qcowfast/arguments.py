"""Checks of the integer options of the public API: one rule, one wording."""
from __future__ import annotations

from operator import index


def integer(value, name: str, low: int | None = None, high: int | None = None,
             none: bool = False, what: str = "an integer") -> int | None:
    """`value` as an int (anything with __index__, e.g. numpy integers; not bool or float),
    within [low, high]; ValueError naming the option otherwise."""
    if value is None and none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = index(value)
    except TypeError:
        number = None
    if number is None or (low is not None and number < low) or (high is not None
                                                                 and number > high):
        raise ValueError(f"{name} must be {'None or ' if none else ''}{what}, not {value!r}")
    return number


__all__ = ["integer"]
