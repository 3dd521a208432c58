"""Values shown in error messages, safely.

Python refuses to turn an integer of more than 4300 digits into text (``sys.int_info``'s
``default_max_str_digits``; CPython 3.11+, CVE-2020-10735): ``repr(10**5000)`` raises its own
``ValueError``, which names no parameter, file or frame. Messages about a caller's value use
:func:`shown` instead of ``!r`` wherever that value may be such an integer, alone or inside a
container, so the error the caller gets is the one the code meant to raise.
"""

from __future__ import annotations

from typing import Any

__all__ = ["shown"]


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
