#!/usr/bin/env python3
"""What a one-frame brightness flicker does to the adaptive schedule's cut score.

    PYTHONPATH=. python3 scripts/flicker_cut_scores.py

Frames 0-29 of ``bikes.mp4`` (``sample:bikes``, no cut among them) are scored with the default
:class:`~mpvss_ros.scheduling.SceneScorer`, once as they are and once for each gain with frame 15
alone scaled by it (as an auto-exposure step or a flickering light would). Printed per gain: the
cut scores of frame 15 and of frame 16 (which returns to the old brightness), the part of frame
15's score that the brightness-compensated frame change gives (``frame_change / pixel_scale``;
the rest is the grey-histogram term, which follows lighting), and the key frames the default
:class:`~mpvss_ros.scheduling.AdaptiveScheduler` picks (cut threshold 0.45). README.md, "Command
line", its paragraph on schedules.
"""

from __future__ import annotations

import numpy as np

from mpvss_ros.io.samples import bikes_clip
from mpvss_ros.io.video import open_source
from mpvss_ros.scheduling import AdaptiveScheduler, SceneScorer, schedule_key_frames

FRAMES = 30
FLICKER = 15
GAINS = (1.1, 1.2, 1.3, 0.8)


def main() -> None:
    with open_source(bikes_clip()) as source:
        frames = []
        for frame in source:
            frames.append(frame.image)
            if len(frames) == FRAMES:
                break
        fps = source.fps
    scorer = SceneScorer()
    print(f"untouched: largest cut score {scorer.cut_scores(frames)[1:].max():.3f}")
    for gain in GAINS:
        flickered = list(frames)
        flickered[FLICKER] = np.clip(frames[FLICKER].astype(np.float32) * gain, 0, 255).astype(np.uint8)
        scores = scorer.cut_scores(flickered)
        grey, previous = scorer.thumbnail(flickered[FLICKER])[0], scorer.thumbnail(flickered[FLICKER - 1])[0]
        compensated = scorer.frame_change(grey, previous) / scorer.pixel_scale
        scheduler = AdaptiveScheduler()
        keys = schedule_key_frames(scheduler, flickered, fps)
        print(f"gain {gain}: cut score of frame {FLICKER} {scores[FLICKER]:.3f} (brightness-compensated part "
              f"{compensated:.3f}), of frame {FLICKER + 1} {scores[FLICKER + 1]:.3f}; key frames {keys}")


if __name__ == "__main__":
    main()
