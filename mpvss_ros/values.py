"""A caller's values: shown in error messages safely, and the number checks shared by every
place that takes numbers from a caller (model configurations, node parameters, schedulers,
training options, frame stamps).

Python refuses to turn an integer of more than 4300 digits into text (``sys.int_info``'s
``default_max_str_digits``; CPython 3.11+, CVE-2020-10735): ``repr(10**5000)`` raises its own
``ValueError``, which names no parameter, file or frame. Messages about a caller's value use
:func:`shown` instead of ``!r`` wherever that value may be such an integer, alone or inside a
container, so the error the caller gets is the one the code meant to raise. Likewise
``math.isfinite(10**400)`` raises ``OverflowError`` (no float holds it); :func:`is_finite` says
False instead.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["INT64_MAX", "INT64_MIN", "fits_int64", "is_finite", "is_integer", "is_real", "shown"]

#: The range of a signed 64-bit integer: what a tensor size, a ROS ``int64`` parameter or a torch
#: seed holds (a larger Python int is refused by name, not wrapped or failed on later).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def shown(value: Any) -> str:
    """``repr(value)``, or a description where Python cannot print it.

    Args:
        value: anything; typically a caller's bad input about to be named in an error.

    Returns:
        ``repr(value)``; for an int past the digit limit "an integer too long to print", for a
        container holding one "a <type> holding an integer too long to print".

    Never raises ``ValueError`` (an object whose own ``__repr__`` raises something else still
    raises that).
    """
    try:
        return repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit, alone or in a container
        if isinstance(value, int):
            return "an integer too long to print"
        return f"a {type(value).__name__} holding an integer too long to print"


def is_integer(value: Any) -> bool:
    """An integer (``numbers.Integral``: int, numpy integers), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (``numbers.Real``: int, float, numpy numbers, Fraction), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """``math.isfinite(value)`` for a real number, False where it is an int too large for a
    float (past about 1.8e308, where ``math.isfinite`` raises ``OverflowError``).

    Raises:
        TypeError: ``value`` is not a number (as ``math.isfinite``).
    """
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def fits_int64(value: int) -> bool:
    """Whether the integer ``value`` lies in [:data:`INT64_MIN`, :data:`INT64_MAX`]."""
    return INT64_MIN <= value <= INT64_MAX
