"""Numbers in data from outside (JSON, a message's config or metrics, a run config, a scenario file).

Python's ``bool`` is an ``int``, and NaN and inf are ``float``\\ s, so ``isinstance(x, int | float)`` lets
``True`` through as 1 and NaN through as a number; these predicates say what a check means. Imports
nothing heavy: the server, the nodes and the tools all use it.
"""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (NaN and inf included: see :func:`is_finite`)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_whole(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """An int or a float, not a bool, NaN, inf, or an int beyond a float's range (``10**400``, which
    ``math.isfinite`` cannot take)."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
