"""Frame input: video files, image folders, JPEG decoding, the registry sample clip; the pixel limit
of every input."""

from __future__ import annotations

from typing import Any

from ..values import is_integer, shown

#: Default pixel limit (height x width) of every input: the node's ``max_image_pixels``, ``mpvss
#: segment`` and ``mpvss bag``'s ``--max-image-pixels``, and :mod:`~mpvss_ros.ros.conversions`'
#: default. 4096 x 4096 is above every common robot camera (12 MP included). Larger frames are
#: refused before they are segmented: a one-colour 8000 x 8000 PNG is 206 kB, and segmenting it
#: with mpvss_lite took 1.5 s and raised the process's peak resident memory from 0.42 to 1.7 GB (2
#: CPU threads, 2026-12-05).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def check_pixel_limit(max_pixels: Any, name: str) -> int | None:
    """A pixel limit (height x width) as an int, or None for no limit.

    Args:
        max_pixels: an integer >= 1, or None.
        name: the option as its caller's users know it, named in the error (e.g.
            ``"max_pixels (None: no limit)"``).

    Raises:
        ValueError: a bool, a non-integer or a value below 1.
    """
    if max_pixels is None:
        return None
    if not (is_integer(max_pixels) and max_pixels >= 1):
        raise ValueError(f"{name} must be a whole number of pixels >= 1, got {shown(max_pixels)}")
    return int(max_pixels)


def pixel_excess(height: int, width: int, max_pixels: int | None) -> str | None:
    """Why a frame of ``height`` x ``width`` pixels is refused under ``max_pixels`` ("W x H = N
    pixels, more than the M allowed"; callers add which option sets the limit), or None when it
    is within the limit or there is none (None)."""
    if max_pixels is None or height * width <= max_pixels:
        return None
    return f"{width} x {height} = {height * width} pixels, more than the {max_pixels} allowed"
