"""Synthetic (key, current) pairs with exact flow and labels, made from one labelled frame.

Stage 2 has few real pairs with motion (two unlabelled clips, 471 frames, DIS flow as target)
and CamVid's labelled frames are 1 s apart. In the spirit of FlyingChairs (Dosovitskiy et al.,
"FlowNet", ICCV 2015), a labelled CamVid train frame becomes a pair whose motion is known
exactly: the current frame is the key frame resampled under

* with probability ``travel_probability``, forward (or backward) camera travel with parallax: an
  inverse depth is read from the label (sky at infinity, road and pavement on a ground plane
  below a horizon row, every other pixel at the ground depth of its column's contact point), and
  the current pixel p samples the key frame at ``e + (p - e) / (1 + s * inverse_depth(p))``
  about a focus of expansion e on the horizon, so near ground and kerb-side objects stream out
  fast and the sky does not move;
* a camera-like similarity motion about a random centre (zoom ``1 +- zoom``, rotation
  ``+- rotation_deg``, shift ``+- max_shift`` pixels per axis), composed after the travel, and
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

from ..evaluation.metrics import IGNORE_INDEX

__all__ = ["SyntheticMotion", "synthetic_pair", "inverse_depth", "CAMVID_THING_CLASSES", "CAMVID_SKY_CLASSES",
           "CAMVID_GROUND_CLASSES"]

#: CamVid 11-class ids of compact, independently moving or thin objects (Pole, SignSymbol, Car,
#: Pedestrian, Bicyclist).
CAMVID_THING_CLASSES = (2, 6, 8, 9, 10)
#: CamVid 11-class ids at infinite depth (Sky).
CAMVID_SKY_CLASSES = (0,)
#: CamVid 11-class ids on the ground plane (Road, Pavement).
CAMVID_GROUND_CLASSES = (3, 4)


@dataclass(frozen=True)
class SyntheticMotion:
    """Ranges of the random motion (pixels of the frame it is applied to, degrees).

    Attributes:
        max_shift: background shift, uniform in [-max_shift, max_shift] per axis (pixels).
        zoom: background scale, uniform in [1 - zoom, 1 + zoom]; 0 <= zoom < 1.
        rotation_deg: background rotation, uniform in [-rotation_deg, rotation_deg] (degrees).
        object_shift: the moving segment's extra shift per axis (pixels).
        object_probability: chance that a segment moves on its own (when one is large enough).
        min_object_area: smallest segment that may move (pixels).
        thing_classes: label ids whose connected segments may move.
        travel_probability: chance of camera travel with parallax (see the module docstring).
        max_travel: travel range; s is uniform in [-max_travel / 3, max_travel], so the
            nearest ground (inverse depth 1, the bottom row) contracts towards the focus of
            expansion by up to 1 / (1 + max_travel) between current and key frame.
        sky_classes: label ids at infinite depth.
        ground_classes: label ids on the ground plane.

    Raises:
        ValueError: a probability outside [0, 1], a negative range, or ``max_travel`` >= 3
            (backward travel would then fold the image through the focus of expansion).
    """

    max_shift: float = 20.0
    zoom: float = 0.1
    rotation_deg: float = 2.0
    object_shift: float = 16.0
    object_probability: float = 0.8
    min_object_area: int = 150
    thing_classes: Sequence[int] = CAMVID_THING_CLASSES
    travel_probability: float = 0.0
    max_travel: float = 0.25
    sky_classes: Sequence[int] = CAMVID_SKY_CLASSES
    ground_classes: Sequence[int] = CAMVID_GROUND_CLASSES

    def __post_init__(self) -> None:
        for name in ("object_probability", "travel_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SyntheticMotion.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("max_shift", "zoom", "rotation_deg", "object_shift", "max_travel"):
            if getattr(self, name) < 0:
                raise ValueError(f"SyntheticMotion.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_travel >= 3.0:
            raise ValueError(f"SyntheticMotion.max_travel must be < 3, got {self.max_travel}")
        if self.zoom >= 1.0:  # a scale of 1 - zoom <= 0 would collapse or mirror the frame
            raise ValueError(f"SyntheticMotion.zoom must be < 1, got {self.zoom}")


def inverse_depth(label: np.ndarray, horizon: float, sky_classes: Sequence[int] = CAMVID_SKY_CLASSES,
                  ground_classes: Sequence[int] = CAMVID_GROUND_CLASSES) -> np.ndarray:
    """A coarse inverse depth from a semantic label, for synthetic camera travel.

    Ground pixels lie on a plane seen from a level camera: inverse depth grows linearly with
    the row below the horizon, ``(y - horizon) / (H - 1 - horizon)``, clipped to [0, 1] (1 at the
    bottom row). Sky is at infinity (0). Every other pixel stands upright on the ground: it takes
    the ground value of the lowest row of its vertical run of non-ground, non-sky pixels in its
    column (the run's contact point), so a pole, a car or a facade has one depth per column.

    Args:
        label: (H, W) integer label.
        horizon: horizon row (pixels, may be fractional or outside the image); must be < H - 1.
        sky_classes: label ids at infinite depth.
        ground_classes: label ids on the ground plane.

    Returns:
        (H, W) float32 in [0, 1], proportional to 1 / depth.

    Raises:
        ValueError: ``label`` is not 2-D or ``horizon`` is not above the bottom row.
    """
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got {label.shape}")
    h, w = label.shape
    if not horizon < h - 1:
        raise ValueError(f"horizon {horizon} must lie above the bottom row {h - 1}")
    ground_row = np.clip((np.arange(h, dtype=np.float32) - horizon) / (h - 1 - horizon), 0.0, 1.0)
    sky = np.isin(label, list(sky_classes))
    ground = np.isin(label, list(ground_classes))
    upright = ~sky & ~ground
    contact = np.empty((h, w), np.int64)
    run = np.full(w, h - 1, np.int64)
    below = np.zeros(w, bool)
    for y in range(h - 1, -1, -1):
        run = np.where(upright[y] & below, run, y)
        contact[y] = run
        below = upright[y]
    rho = ground_row[contact]
    return np.where(sky, 0.0, rho).astype(np.float32)


def _horizon(label: np.ndarray, ground_classes: Sequence[int], fallback: float) -> float:
    """Row just above the highest ground pixels (2nd percentile of their rows), else ``fallback``."""
    rows = np.nonzero(np.isin(label, list(ground_classes)))[0]
    h = label.shape[0]
    if rows.size < 0.02 * label.size:
        return fallback
    return float(min(np.percentile(rows, 2) - 2.0, h - 2.0))


def synthetic_pair(key: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                   motion: SyntheticMotion = SyntheticMotion(), ignore_index: int = IGNORE_INDEX
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
    moves = rng.random() < motion.object_probability
    object_shift = rng.uniform(-motion.object_shift, motion.object_shift, 2).astype(np.float32)
    pick = rng.random()
    travels = rng.random() < motion.travel_probability
    travel = rng.uniform(-motion.max_travel / 3, motion.max_travel)
    foe_x = rng.uniform(0.3, 0.7) * w

    bx, by = xx, yy  # where each current pixel is before the similarity: itself, or its travel source
    if travels:
        horizon = _horizon(label, motion.ground_classes, fallback=0.45 * h)
        rho_key = inverse_depth(label, horizon, motion.sky_classes, motion.ground_classes)

        def travel_source(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            div = 1.0 + travel * rho
            return (foe_x + (xx - foe_x) / div).astype(np.float32), (horizon + (yy - horizon) / div).astype(np.float32)

        # rho_key is in the key frame's geometry: two fixed-point steps read it where the current
        # pixel comes from, so that each pixel travels with its own depth
        rho = rho_key
        for _ in range(2):
            bx, by = travel_source(rho)
            rho = cv2.remap(rho_key, bx, by, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
        bx, by = travel_source(rho)
    dx, dy = bx - cx, by - cy
    map_x = (cx + a * dx - b * dy + shift[0]).astype(np.float32)
    map_y = (cy + b * dx + a * dy + shift[1]).astype(np.float32)

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
