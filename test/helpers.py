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


class CountedTag(str):
    """A string that counts its live instances (json.dumps writes it as a string)."""

    alive = 0

    def __new__(cls, value: str) -> "CountedTag":
        cls.alive += 1
        return super().__new__(cls, value)

    def __del__(self) -> None:
        type(self).alive -= 1


def count_live_records(monkeypatch) -> list[int]:
    """Tag every frame's record (``SegmentationResult.to_record``) with a :class:`CountedTag`;
    the returned list gets, at each call, how many records made before are still alive."""
    from mpvss_ros.segmenter import SegmentationResult

    real, seen = SegmentationResult.to_record, []
    CountedTag.alive = 0

    def to_record(self):
        seen.append(CountedTag.alive)
        return {**real(self), "tag": CountedTag("t")}

    monkeypatch.setattr(SegmentationResult, "to_record", to_record)
    return seen
