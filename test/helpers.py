"""Plain helpers the tests import (``from helpers import ...``); fixtures stay in conftest.py."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def error_line(err: str) -> str:
    """The one ``mpvss: error:`` line of a command's stderr (log records, if any reach stderr, are
    not counted); fails the test on a traceback or on more than one line."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("mpvss: WARNING", "mpvss: INFO"))]
    assert len(lines) == 1, err
    assert lines[0].startswith("mpvss: error: "), err
    return lines[0]


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
