"""Checks of training options shared by both stages' ``validate`` (one style, one wording).

Each function raises ``ValueError`` naming the first bad setting, the range it must be in, the
value given and the ``mpvss train`` flag that sets it (``steps must be >= 1, got 0 (--steps)``);
the trainers call ``validate`` before any work, so a bad option costs nothing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_at_least", "check_crop", "check_fractions", "check_integers", "check_numbers",
           "check_optional_positive"]


def _flag(name: str) -> str:
    """`` (--name-with-dashes)``: the ``mpvss train`` flag of setting ``name``."""
    return f" (--{name.replace('_', '-')})"


def _is_integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_integers(opts: Any, names: Iterable[str]) -> None:
    """Each named setting of ``opts`` is an integer (not a bool).

    Raises:
        ValueError: the first setting that is not.
    """
    for name in names:
        value = getattr(opts, name)
        if not _is_integer(value):
            raise ValueError(f"{name} must be an integer, got {value!r}{_flag(name)}")


def check_numbers(opts: Any, names: Iterable[str]) -> None:
    """Each named setting of ``opts`` is a finite real number (not a bool).

    Raises:
        ValueError: the first setting that is not.
    """
    for name in names:
        value = getattr(opts, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}{_flag(name)}")


def check_at_least(opts: Any, lows: Mapping[str, float]) -> None:
    """Each setting named in ``lows`` is >= its bound (check the type first).

    Raises:
        ValueError: the first setting below its bound.
    """
    for name, low in lows.items():
        if getattr(opts, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(opts, name)!r}{_flag(name)}")


def check_fractions(opts: Any, notes: Mapping[str, str]) -> None:
    """Each setting named in ``notes`` is in [0, 1]; its note (e.g. ``" (the travel probability)"``)
    follows the range in the message.

    Raises:
        ValueError: the first setting outside [0, 1].
    """
    for name, note in notes.items():
        if not 0.0 <= getattr(opts, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]{note}, got {getattr(opts, name)!r}{_flag(name)}")


def check_crop(crop: Any, minimum: int, why: str = "") -> None:
    """``crop`` is (H, W) in pixels, both integers >= ``minimum``; ``why`` explains the bound.

    Raises:
        ValueError: ``crop`` is not two integers >= ``minimum``.
    """
    sides = tuple(crop) if isinstance(crop, (tuple, list)) else (crop,)
    if len(sides) != 2 or not all(_is_integer(c) for c in sides) or min(sides) < minimum:
        raise ValueError(f"crop must be (H, W) in pixels with both >= {minimum}{why}, got {crop!r} (--crop H W)")


def check_optional_positive(opts: Any, name: str, integer: bool = False, low: float = 0.0,
                            note: str = "") -> None:
    """The setting ``name`` is None or a finite number above ``low`` (an integer >= ``low`` with
    ``integer``); ``note`` follows the range in the message.

    Raises:
        ValueError: the setting is neither None nor in that range.
    """
    value = getattr(opts, name)
    if value is None:
        return
    if integer:
        ok = _is_integer(value) and value >= low
        bound = f">= {low:g}"
    else:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and low < value < math.inf
        bound = f"> {low:g}"
    if not ok:
        raise ValueError(f"{name} must be {bound}{note}, got {value!r}{_flag(name)}")
