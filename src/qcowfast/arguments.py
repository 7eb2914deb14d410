"""Checks of the integer and yes/no options of the public API: one rule, one wording."""
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


def boolean(value, name: str) -> bool:
    """`value` as a bool: True or False (numpy's too); ValueError naming the option otherwise
    (the string "false" is true to Python: a yes/no option given one is a mistake)."""
    kind = type(value)
    # numpy's bool scalar type: numpy.bool_ up to numpy 1.x, numpy.bool from 2.0 on.
    if isinstance(value, bool) or (kind.__module__ == "numpy"
                                   and kind.__name__ in ("bool_", "bool")):
        return bool(value)
    raise ValueError(f"{name} must be True or False, not {value!r}")


def callback(value, name: str):
    """`value` when it is None or callable; TypeError naming the option otherwise (it would
    fail only once the work has started, deep inside)."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be None or a callable, not {value!r}")
    return value


def format_name(value, name: str = "format"):
    """`value` when it is None or a str (a format's name); TypeError naming the option
    otherwise."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be None or a format name (str), not {value!r}")
    return value


__all__ = ["boolean", "callback", "format_name", "integer"]
