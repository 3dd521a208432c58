#!/usr/bin/env python3
"""What the PNG integrity check costs beside decoding (ms per image).

    python3 scripts/png_check_timing.py

Encodes three PNGs with OpenCV: the first CamVid val frame (480 x 360, from the shared data:
``MPVSS_SHARED_DATA``), the same frame upscaled to 1280 x 720, and 1280 x 720 of seeded noise.
For each, prints its size and the best of five timeit rounds of
:func:`~mpvss_ros.io.video.png_damage` (every chunk's CRC-32, 20 calls per round) and of
``cv2.imdecode(..., IMREAD_COLOR)`` (5 calls per round), the decode it runs before.
docs/experiment_log.md, "Stop 40".
"""

from __future__ import annotations

import sys
import timeit

import cv2
import numpy as np

from mpvss_ros.io.samples import camvid_dir
from mpvss_ros.io.video import png_damage


def main() -> int:
    val = camvid_dir("val")
    if val is None:
        print("the shared CamVid data is not here (MPVSS_SHARED_DATA)", file=sys.stderr)
        return 1
    frame = cv2.imread(str(sorted(val.glob("*.png"))[0]))
    images = (("CamVid val frame, 480 x 360", frame),
              ("the same upscaled to 1280 x 720", cv2.resize(frame, (1280, 720))),
              ("noise, 1280 x 720", np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8)))
    for name, image in images:
        buf = cv2.imencode(".png", image)[1]
        check = min(timeit.repeat(lambda: png_damage(buf), number=20, repeat=5)) / 20 * 1e3
        decode = min(timeit.repeat(lambda: cv2.imdecode(buf, cv2.IMREAD_COLOR), number=5, repeat=5)) / 5 * 1e3
        print(f"{name}: {buf.size / 1e6:.2f} MB, png_damage {check:.2f} ms, imdecode {decode:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
