"""Synthetic (key, current) pairs with exact flow and labels, made from one labelled frame.

Stage 2 has few real pairs with motion (two unlabelled clips, 471 frames, DIS flow as target)
and CamVid's labelled frames are 1 s apart. In the spirit of FlyingChairs (Dosovitskiy et al.,
"FlowNet", ICCV 2015), a labelled CamVid train frame becomes a pair whose motion is known
exactly: the current frame is the key frame resampled under

* a camera-like similarity motion about a random centre (zoom ``1 +- zoom``, rotation
  ``+- rotation_deg``, shift ``+- max_shift`` pixels per axis), and
* with probability ``object_probability``, one connected segment of a "thing" class
  (``thing_classes``: poles, signs, cars, pedestrians, bicyclists for CamVid) moving with an
  extra shift of ``+- object_shift`` pixels, drawn over the background. There is no inpainting:
  where the background uncovered by the segment is not known, the background motion still
  samples the key frame's copy of the segment, so the pair shows it twice; image, label and flow
  agree there (``current(p) = key(p + flow(p))`` everywhere).

The current frame's label is the key frame's label resampled the same way (nearest), with
pixels that sample outside the key frame set to ``ignore_index``. The flow points from the
current frame to the key frame, as everywhere in this project: ``current(p) = key(p + flow(p))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["SyntheticMotion", "synthetic_pair", "CAMVID_THING_CLASSES"]

#: CamVid 11-class ids of compact, independently moving or thin objects (Pole, SignSymbol, Car,
#: Pedestrian, Bicyclist).
CAMVID_THING_CLASSES = (2, 6, 8, 9, 10)


@dataclass(frozen=True)
class SyntheticMotion:
    """Ranges of the random motion (pixels of the frame it is applied to, degrees).

    Attributes:
        max_shift: background shift, uniform in [-max_shift, max_shift] per axis (pixels).
        zoom: background scale, uniform in [1 - zoom, 1 + zoom].
        rotation_deg: background rotation, uniform in [-rotation_deg, rotation_deg] (degrees).
        object_shift: the moving segment's extra shift per axis (pixels).
        object_probability: chance that a segment moves on its own (when one is large enough).
        min_object_area: smallest segment that may move (pixels).
        thing_classes: label ids whose connected segments may move.
    """

    max_shift: float = 20.0
    zoom: float = 0.1
    rotation_deg: float = 2.0
    object_shift: float = 16.0
    object_probability: float = 0.8
    min_object_area: int = 150
    thing_classes: Sequence[int] = CAMVID_THING_CLASSES


def synthetic_pair(key: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                   motion: SyntheticMotion = SyntheticMotion(), ignore_index: int = 255
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make the current frame, its label and the exact flow from one labelled key frame.

    Args:
        key: (H, W, 3) float32 or uint8 RGB, the key frame.
        label: (H, W) uint8 label of the key frame (``ignore_index`` = void).
        rng: the sample's generator (all draws come from it, in a fixed order).
        motion: ranges of the random motion.
        ignore_index: label of pixels with no source in the key frame.

    Returns:
        ``(current, current_label, flow)``: (H, W, 3) of ``key``'s dtype, (H, W) uint8, and
        (H, W, 2) float32 x then y displacement in pixels, ``current(p) = key(p + flow(p))``
        (bilinear, border replicated).

    Raises:
        ValueError: ``key`` and ``label`` sizes differ or ``key`` is not (H, W, 3).
    """
    if key.ndim != 3 or key.shape[2] != 3 or key.shape[:2] != label.shape:
        raise ValueError(f"key must be (H, W, 3) and label (H, W) of the same size, got {key.shape} and {label.shape}")
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.6) * h
    scale = rng.uniform(1 - motion.zoom, 1 + motion.zoom)
    theta = np.deg2rad(rng.uniform(-motion.rotation_deg, motion.rotation_deg))
    shift = rng.uniform(-motion.max_shift, motion.max_shift, 2)
    a, b = scale * np.cos(theta), scale * np.sin(theta)
    dx, dy = xx - cx, yy - cy
    map_x = (cx + a * dx - b * dy + shift[0]).astype(np.float32)
    map_y = (cy + b * dx + a * dy + shift[1]).astype(np.float32)

    moves = rng.random() < motion.object_probability
    object_shift = rng.uniform(-motion.object_shift, motion.object_shift, 2).astype(np.float32)
    pick = rng.random()
    if moves:
        count, segments, stats, _ = cv2.connectedComponentsWithStats(
            np.isin(label, list(motion.thing_classes)).astype(np.uint8), connectivity=8)
        large = [k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= motion.min_object_area]
        if large:
            k = large[min(int(pick * len(large)), len(large) - 1)]
            obj_x, obj_y = map_x + object_shift[0], map_y + object_shift[1]
            present = cv2.remap((segments == k).astype(np.float32), obj_x, obj_y, cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0.5
            map_x = np.where(present, obj_x, map_x)
            map_y = np.where(present, obj_y, map_y)

    current = cv2.remap(key, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    current_label = cv2.remap(label, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=ignore_index)
    outside = (map_x < 0) | (map_x > w - 1) | (map_y < 0) | (map_y > h - 1)
    current_label = np.where(outside, ignore_index, current_label).astype(np.uint8)
    flow = np.stack([map_x - xx, map_y - yy], axis=-1).astype(np.float32)
    return current, current_label, flow
