"""Checks of training options shared by both stages' ``validate`` (one style, one wording).

Each function raises ``ValueError`` naming the first bad setting, the range it must be in, the
value given and the ``mpvss train`` flag that sets it (``steps must be >= 1, got 0 (--steps)``);
the trainers call ``validate`` before any work, so a bad option costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..values import INT64_MAX, INT64_MIN, fits_int64, is_finite, is_integer, is_real, shown

__all__ = ["check_at_least", "check_crop", "check_fractions", "check_integers", "check_numbers",
           "check_optional_positive"]


def _flag(name: str) -> str:
    """`` (--name-with-dashes)``: the ``mpvss train`` flag of setting ``name``."""
    return f" (--{name.replace('_', '-')})"


def check_integers(opts: Any, names: Iterable[str]) -> None:
    """Each named setting of ``opts`` is an integer (not a bool) that fits in 64 bits (a seed, a
    step count or a size past that fails in torch or in the run's JSON files, after work began).

    Raises:
        ValueError: the first setting that is not.
    """
    for name in names:
        value = getattr(opts, name)
        if not is_integer(value):
            raise ValueError(f"{name} must be an integer, got {shown(value)}{_flag(name)}")
        if not fits_int64(value):
            raise ValueError(f"{name} must lie in [{INT64_MIN}, {INT64_MAX}] (64 bits), got {shown(value)}{_flag(name)}")


def check_numbers(opts: Any, names: Iterable[str]) -> None:
    """Each named setting of ``opts`` is a finite real number (not a bool).

    Raises:
        ValueError: the first setting that is not.
    """
    for name in names:
        value = getattr(opts, name)
        if not (is_real(value) and is_finite(value)):  # 10**400: no float holds it
            raise ValueError(f"{name} must be a finite number, got {shown(value)}{_flag(name)}")


def check_at_least(opts: Any, lows: Mapping[str, float]) -> None:
    """Each setting named in ``lows`` is >= its bound (check the type first).

    Raises:
        ValueError: the first setting below its bound.
    """
    for name, low in lows.items():
        if getattr(opts, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {shown(getattr(opts, name))}{_flag(name)}")


def check_fractions(opts: Any, notes: Mapping[str, str]) -> None:
    """Each setting named in ``notes`` is in [0, 1]; its note (e.g. ``" (the travel probability)"``)
    follows the range in the message.

    Raises:
        ValueError: the first setting outside [0, 1].
    """
    for name, note in notes.items():
        if not 0.0 <= getattr(opts, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]{note}, got {shown(getattr(opts, name))}{_flag(name)}")


def check_crop(crop: Any, minimum: int, why: str = "") -> None:
    """``crop`` is (H, W) in pixels, both integers >= ``minimum``; ``why`` explains the bound.

    Raises:
        ValueError: ``crop`` is not two integers >= ``minimum``.
    """
    sides = tuple(crop) if isinstance(crop, (tuple, list)) else (crop,)
    if len(sides) != 2 or not all(is_integer(c) and fits_int64(c) for c in sides) or min(sides) < minimum:
        raise ValueError(f"crop must be (H, W) in pixels with both >= {minimum}{why}, got {shown(crop)} (--crop H W)")


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
        ok = is_integer(value) and low <= value <= INT64_MAX
        bound = f"at most {INT64_MAX} (64 bits)" if is_integer(value) and value > INT64_MAX else f">= {low:g}"
    else:
        ok = is_real(value) and is_finite(value) and value > low
        bound = f"> {low:g}"
    if not ok:
        raise ValueError(f"{name} must be {bound}{note}, got {shown(value)}{_flag(name)}")
