#!/usr/bin/env python3
"""Time the ROS message conversions of mpvss_ros, separate from inference; prints a Markdown table.

Measures (median ms over ``--runs`` runs, after warm-up) at 640x480 and 1920x1080:

* ``image_to_rgb`` for ``rgb8`` (zero-copy view), ``bgr8`` and ``yuv422`` (UYVY) input images;
* ``build_outputs`` with labels + confidence + info only (what the node always publishes), and
  with colored + overlay + class masks as well;

for rosbags message classes (numpy payloads, as ``mpvss bag`` uses) and, for ``build_outputs``,
for an rclpy-like class (payloads copied into ``array.array``, as the node hands them to rclpy).
The segmentation result is fake (11 classes in blocks, random confidence); no model runs. No ROS
needed: ``pip install rosbags``.

Usage::

    python3 scripts/benchmark_ros_conversions.py [--runs 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpvss_ros.ros.conversions import (  # noqa: E402
    MessageTypes,
    build_outputs,
    image_to_rgb,
    rosbags_message_types,
)
from mpvss_ros.segmenter import SegmentationResult  # noqa: E402
from mpvss_ros.viz import make_palette  # noqa: E402

SIZES = {"640x480": (480, 640), "1920x1080": (1080, 1920)}
NUM_CLASSES = 11


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def frame(h: int, w: int) -> np.ndarray:
    """A camera-like RGB frame: gradients plus noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], -1)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def fake_result(h: int, w: int) -> SegmentationResult:
    yy, xx = np.mgrid[0:h, 0:w]
    labels = ((xx * 4 // w) + 4 * (yy * 3 // h)) % NUM_CLASSES
    return SegmentationResult(
        frame_index=1, stamp=1.0, labels=labels.astype(np.uint8),
        confidence=np.random.default_rng(1).integers(0, 256, (h, w), dtype=np.uint8), class_masks=None,
        is_key_frame=False, key_frame_index=0, key_frame_stamp=0.9, scene_score=0.1, key_frame_reason="",
        stage_latency_ms={"schedule": 0.1, "preprocess": 1.0, "propagation": 5.0, "postprocess": 2.0, "total": 8.1})


class _Msg:
    """rclpy-like message: not a dataclass, so the builders fill array.array payloads."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def rclpy_like_types(types: MessageTypes) -> MessageTypes:
    return MessageTypes(image=_Msg, compressed_image=_Msg, header=types.header, time=types.time,
                        label_info=_Msg, vision_class=_Msg, class_masks=_Msg, segmentation_info=_Msg)


def image_msg(types: MessageTypes, header: Any, rgb: np.ndarray, encoding: str) -> Any:
    if encoding == "rgb8":
        pix = rgb
    elif encoding == "bgr8":
        pix = rgb[..., ::-1]
    else:  # yuv422 = UYVY
        pix = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY) if hasattr(cv2, "COLOR_RGB2YUV_UYVY") else \
            np.random.default_rng(2).integers(16, 236, rgb.shape[:2] + (2,), dtype=np.uint8)
    pix = np.ascontiguousarray(pix)
    h, w = rgb.shape[:2]
    return types.image(header=header, height=h, width=w, encoding=encoding, is_bigendian=0,
                       step=pix.size // h, data=pix.reshape(-1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="OpenCV threads (default 1, repeatable on a busy machine)")
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    types = rosbags_message_types(store)
    rtypes = rclpy_like_types(types)
    header = types.header(stamp=types.time(sec=1700000000, nanosec=0), frame_id="camera")
    palette = make_palette(NUM_CLASSES)
    names = [f"class {i}" for i in range(NUM_CLASSES)]

    rows: dict[str, dict[str, float]] = {}
    for size, (h, w) in SIZES.items():
        rgb = frame(h, w)
        for enc in ("rgb8", "bgr8", "yuv422"):
            msg = image_msg(types, header, rgb, enc)
            rows.setdefault(f"`image_to_rgb` {enc}", {})[size] = median_ms(lambda m=msg: image_to_rgb(m), args.runs)
        res = fake_result(h, w)
        for label, t in (("rosbags", types), ("rclpy-like", rtypes)):
            rows.setdefault(f"`build_outputs` labels+confidence+info ({label})", {})[size] = median_ms(
                lambda t=t: build_outputs(t, header, res, rgb, palette, names), args.runs)
            rows.setdefault(f"`build_outputs` + colored+overlay+class_masks ({label})", {})[size] = median_ms(
                lambda t=t: build_outputs(t, header, res, rgb, palette, names, 0.5, True, True, True), args.runs)

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; OpenCV {cv2.__version__} "
          f"({args.threads} thread(s)); numpy {np.__version__}; median of {args.runs} runs\n")
    print("| operation | " + " | ".join(f"{s} (ms)" for s in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for name, vals in rows.items():
        print(f"| {name} | " + " | ".join(f"{vals[s]:.3f}" for s in SIZES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
