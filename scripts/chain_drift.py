#!/usr/bin/env python3
"""How far propagation drifts over a long run of non-key frames (one key frame, at frame 0).

    PYTHONPATH=. python3 scripts/chain_drift.py --frames 441 --threads 1

The dash-cam clip of the shared data (``video/solidWhiteRight.mp4``), resized to 640 x 360, is
played forward then backward, so frame ``period`` (440 for its 221 frames) is the key frame's own
image again. The shipped model segments frame 0 as the only key frame (``fixed`` with an interval
longer than the run, no time gaps) and propagates every later frame, with chained query flow,
direct query flow and chained DIS optical flow. Printed per propagation: the share of pixels
whose label agrees with a per-frame segmentation of the same frame at every 100th frame, and at
frame ``period`` the share that agrees with the key frame's own labels (1.0 for a propagation
that returns exactly to the key frame when the image does). docs/experiment_log.md, "Stop 36".
"""

from __future__ import annotations

import argparse
import math

import cv2
import numpy as np
import torch

from mpvss_ros.io.samples import dashcam_clip
from mpvss_ros.io.video import open_source
from mpvss_ros.model_loader import load_model
from mpvss_ros.propagation import CopyPropagator, build_propagator
from mpvss_ros.scheduling import FixedIntervalScheduler
from mpvss_ros.segmenter import VideoSegmenter

#: (name, propagator, chain_flow) of the propagations compared.
SETTINGS = (("query flow, chained", "query_flow", True), ("query flow, direct", "query_flow", False),
            ("DIS, chained", "optical_flow", True))


def ping_pong(frames: list[np.ndarray]) -> list[np.ndarray]:
    """``frames`` forward then backward without repeating either end: frame ``len(out)`` (the
    next period's first) is ``frames[0]`` again."""
    return frames + frames[-2:0:-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=441, help="frames pushed, key frame included (default 441)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = dashcam_clip()
    if path is None:
        ap.error("the dash-cam clip of the shared data is missing (set MPVSS_SHARED_DATA)")
    with open_source(path) as source:
        clip = ping_pong([cv2.resize(f.image, (640, 360), interpolation=cv2.INTER_AREA) for f in source])
    period = len(clip)
    loaded = load_model()
    reference = VideoSegmenter(loaded.model, CopyPropagator(), FixedIntervalScheduler(1, max_gap_s=math.inf))
    per_frame = {i: reference.push(clip[i % period], i / 25.0).labels
                 for i in range(100, args.frames, 100)}
    print(f"{path.name} at 640 x 360, played forward and back: period {period} frames, one key frame (frame 0)")
    for name, propagator, chain in SETTINGS:
        segmenter = VideoSegmenter(loaded.model, build_propagator(propagator, loaded.model, chain_flow=chain),
                                   FixedIntervalScheduler(10**9, max_gap_s=math.inf))
        key_labels, cells = None, []
        for i in range(args.frames):
            result = segmenter.push(clip[i % period], i / 25.0)
            if i == 0:
                key_labels = result.labels
                continue
            if i in per_frame:
                cells.append(f"{i}: {np.mean(result.labels == per_frame[i]):.3f}")
            if i % period == 0:
                cells.append(f"{i} (= key image) against the key frame: {np.mean(result.labels == key_labels):.3f}")
        print(f"{name:20s} agreement with per-frame labels at " + ", ".join(cells))


if __name__ == "__main__":
    main()
