"""``VideoSegmenter``: the frame-by-frame MPVSS pipeline, ROS-free.

Data flows one way: frame -> :mod:`scheduling` (key frame?) -> segmentor (key frame) or
:mod:`propagation` (other frames) -> semantic inference -> :class:`SegmentationResult`.

Pre-processing fits the frame into the model's canvas (``input.size``) keeping the aspect ratio
(``input.interpolation``: by default ``cv2.INTER_AREA`` when shrinking, ``INTER_LINEAR`` when
enlarging; Pillow's bilinear for the official models, :func:`resize_frame`), then zero-pads the
bottom/right to a multiple of 32. Post-processing follows Mask2Former's order: mask logits are
upsampled bilinearly to the padded canvas, turned into class scores, cropped to the unpadded
area and resized bilinearly to the input resolution, where argmax gives the labels (or, with
``postprocess.score_resolution: mask``, scores are computed on the mask grid and upsampled). The resize
runs over chunks of classes with a running argmax so memory stays bounded at high resolution
with many classes; the result is identical to resizing all classes at once. The confidence divides
the winning score by the sum over classes, resized as one map (resizing is linear).

When the last resize enlarges (a camera frame larger than the canvas, e.g. 1280 x 720 or
1920 x 1080 on the 480 x 640 canvas) and all classes fit one chunk, the arg-max is taken on the
canvas instead and only the pixels near a class boundary are interpolated in full
(:func:`argmax_of_upsampled`): bilinear weights are non-negative, so where all four source
pixels agree on the arg-max the enlarged scores do too. Same labels and confidence as resizing
every class map, up to float rounding (near-ties), at a fraction of the cost.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .nn.mpvss import MPVSS, KeyFrameState, semantic_scores
from .propagation import Propagator
from .scheduling import KeyFrameScheduler, ScheduleDecision
from .values import is_real, shown

if TYPE_CHECKING:
    from .runtime.base import Backend

__all__ = ["FrameError", "NonFiniteOutputError", "SegmentationResult", "VideoSegmenter", "Letterbox", "argmax_of_upsampled", "canvas_tensor",
           "check_frame", "class_masks_from_labels", "resize_frame"]

#: Classes resized per chunk in post-processing (bounds memory: chunk x H x W float32).
_CLASS_CHUNK = 16


def _resize_hwc(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (h, w, C) float32 (C <= 512) to (H, W, C), half-pixel centres."""
    out = cv2.resize(x, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    return out if out.ndim == 3 else out[:, :, None]


@functools.lru_cache(maxsize=32)
def _linear_taps(n_src: int, n_dst: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two source taps and the weight of the second for each of ``n_dst`` output positions.

    Follows ``cv2.resize(..., INTER_LINEAR)`` (half-pixel centres: ``f = (d + 0.5) * n_src /
    n_dst - 0.5``, computed in float32; ``s0 = floor(f)``; weight ``f - s0`` on ``s0 + 1``; clamped
    to the edge pixel with weight 0 outside the source), the sampling of ``F.interpolate(...,
    mode="bilinear", align_corners=False)`` as well.

    Returns:
        ``(s0, s1, a)``: (n_dst,) int64 taps and (n_dst,) float32 weight of ``s1``.
    """
    f = ((np.arange(n_dst, dtype=np.float64) + 0.5) * (n_src / n_dst) - 0.5).astype(np.float32)
    s0 = np.floor(f).astype(np.int64)
    a = (f - s0).astype(np.float32)
    low, high = s0 < 0, s0 >= n_src - 1
    a[low | high] = 0.0
    s0 = np.clip(s0, 0, n_src - 1)
    s1 = np.minimum(s0 + 1, n_src - 1)
    return torch.from_numpy(s0), torch.from_numpy(s1), torch.from_numpy(a)


_SAFE_WINDOW = np.ones((3, 3), np.uint8)


def argmax_of_upsampled(scores: np.ndarray, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max and maximum over classes of ``cv2.resize(scores, out_hw, INTER_LINEAR)``, computed
    without resizing every class map.

    Bilinear weights are non-negative, so an output pixel whose (up to) four source pixels share
    their arg-max class c has arg-max c, and its maximum is the bilinear interpolation of the
    per-pixel maximum map. The labels are therefore the source arg-max resized by nearest
    neighbour (``INTER_NEAREST_EXACT``, whose source pixel is one of the four taps), the maximum
    the resized maximum map; only the output pixels whose nearest source pixel has another class
    in its 3 x 3 neighbourhood (a superset of those whose taps disagree; about 4 % of a street
    scene at 1080p) are interpolated in full, with the taps and weights of
    :func:`_linear_taps`. The result equals resizing all class maps up to float rounding
    (different summation order: a label can differ where two classes tie to ~1e-6).

    Args:
        scores: (h, w, C) float32 class scores (C <= 255), h, w >= 1, e.g. the cropped canvas.
        out_hw: (H, W) output size in pixels; meant for enlarging (H >= h, W >= w), where it
            saves most, but correct for any size.

    Returns:
        ``(best, labels)``: (H, W) float32 maximum score and (H, W) uint8 class index (CPU).

    Raises:
        ValueError: ``scores`` is not (h, w, C) with 1 <= C <= 255.
    """
    if scores.ndim != 3 or not 1 <= scores.shape[2] <= 255:
        raise ValueError(f"argmax_of_upsampled expects (h, w, C) scores with 1 <= C <= 255, got {scores.shape}")
    h, w, c = scores.shape
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    src = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    src_best, src_arg = src.max(dim=-1)
    src_labels = src_arg.to(torch.uint8).numpy()
    best = np.ascontiguousarray(cv2.resize(src_best.numpy(), (out_w, out_h), interpolation=cv2.INTER_LINEAR))
    labels = np.ascontiguousarray(cv2.resize(src_labels, (out_w, out_h), interpolation=cv2.INTER_NEAREST_EXACT))
    mixed = cv2.compare(cv2.dilate(src_labels, _SAFE_WINDOW), cv2.erode(src_labels, _SAFE_WINDOW), cv2.CMP_NE)
    mixed = cv2.resize(mixed, (out_w, out_h), interpolation=cv2.INTER_NEAREST_EXACT)
    best_t, labels_t = torch.from_numpy(best), torch.from_numpy(labels)
    fix = torch.from_numpy(mixed.reshape(-1)).nonzero().squeeze(1)
    if fix.numel():
        rows = torch.div(fix, out_w, rounding_mode="floor")
        cols = fix - rows * out_w
        y0, y1, ay = (t[rows] for t in _linear_taps(h, out_h))
        x0, x1, ax = (t[cols] for t in _linear_taps(w, out_w))
        ax, ay = ax[:, None], ay[:, None]
        flat = src.reshape(h * w, c)
        # cv2's order: along x first (two rows), then along y.
        top = flat[y0 * w + x0] * (1 - ax) + flat[y0 * w + x1] * ax
        bottom = flat[y1 * w + x0] * (1 - ax) + flat[y1 * w + x1] * ax
        fix_best, fix_arg = (top * (1 - ay) + bottom * ay).max(dim=1)
        best_t.view(-1)[fix] = fix_best
        labels_t.view(-1)[fix] = fix_arg.to(torch.uint8)
    return best_t, labels_t


def _scores_on_canvas(scores: torch.Tensor, lb: Letterbox) -> np.ndarray:
    """Class scores (C, h, w) on the mask grid or the padded canvas -> (h', w', C) float32 on the
    unpadded canvas area (``lb.resized_hw``): upsampled bilinearly to the padded canvas with
    ``cv2.resize`` (CPU), then cropped."""
    x = np.ascontiguousarray(scores.permute(1, 2, 0).numpy())
    if x.shape[:2] != tuple(lb.padded_hw):
        x = _resize_hwc(x, lb.padded_hw)
    return x[: lb.resized_hw[0], : lb.resized_hw[1]]


def _scores_to_input_size(scores: torch.Tensor, lb: Letterbox, use_cv2: bool | None = None) -> torch.Tensor:
    """Class scores (C, h, w) on the mask grid or the padded canvas -> (H, W, C) at the input size.

    Upsamples bilinearly (``align_corners=False``) to the padded canvas, crops the unpadded area and
    resizes bilinearly to ``lb.input_hw``. CPU tensors go through ``cv2.resize`` in (H, W, C)
    layout (measured 2.4x faster than ``F.interpolate`` + a channel reduction at 360 x 480 with 11
    classes, 2.6x at 1080p; labels identical); other devices use ``F.interpolate``
    (``use_cv2`` overrides the choice; None = by device).
    """
    valid_h, valid_w = lb.resized_hw
    if use_cv2 is None:
        use_cv2 = scores.device.type == "cpu"
    if use_cv2:
        x = _scores_on_canvas(scores, lb)
        if x.shape[:2] != tuple(lb.input_hw):
            x = _resize_hwc(np.ascontiguousarray(x), lb.input_hw)
        return torch.from_numpy(x)
    x = scores[None]
    if tuple(x.shape[-2:]) != tuple(lb.padded_hw):
        x = F.interpolate(x, size=lb.padded_hw, mode="bilinear", align_corners=False)
    x = x[:, :, :valid_h, :valid_w]
    if tuple(x.shape[-2:]) != tuple(lb.input_hw):
        x = F.interpolate(x, size=lb.input_hw, mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0)


def _best_class(scores: torch.Tensor, lb: Letterbox) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum and arg-max over classes of the scores resized to the input (Mask2Former's order).

    Args:
        scores: (C, h, w) float32 class scores on the mask grid or the padded canvas.
        lb: the frame's letterbox.

    Returns:
        ``(best, idx)``: (H, W) float32 and (H, W) class indices (uint8 from
        :func:`argmax_of_upsampled`, else int64) at ``lb.input_hw``.
    """
    (valid_h, valid_w), (in_h, in_w) = lb.resized_hw, lb.input_hw
    if (scores.device.type == "cpu" and scores.shape[0] <= _CLASS_CHUNK and in_h >= valid_h and in_w >= valid_w
            and (in_h, in_w) != (valid_h, valid_w)):
        # The input is larger than the canvas area: arg-max on the canvas, full interpolation only
        # near class boundaries (module docstring).
        return argmax_of_upsampled(_scores_on_canvas(scores, lb), lb.input_hw)
    best = idx = None
    for start in range(0, scores.shape[0], _CLASS_CHUNK):
        # (H, W, C) scores of C classes at the input resolution
        chunk = _scores_to_input_size(scores[start : start + _CLASS_CHUNK], lb)
        value, arg = chunk.max(dim=-1)
        if best is None:
            best, idx = value, arg
        else:
            better = value > best
            best = torch.where(better, value, best)
            idx = torch.where(better, arg + start, idx)
    assert best is not None and idx is not None
    return best, idx


class FrameError(ValueError):
    """A frame cannot be segmented (wrong type, dtype, shape, or an empty image)."""


def _all_finite(*tensors: torch.Tensor) -> bool:
    """Whether no element is NaN or infinite. A float32 sum is NaN or infinite when any element is
    (only finite values beyond 1e38 could overflow it, which logits are not): one reduction instead of an
    element-wise test, 0.02 instead of 0.7 ms for (1, 32, 120, 160) float32 logits on 2 CPU
    threads (medians of 300, 2026-12-05)."""
    return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in tensors)  # fp16 sums would overflow


class NonFiniteOutputError(RuntimeError):
    """The model gave NaN or infinite logits (diverged weights, an fp16 overflow in an engine):
    every pixel would otherwise get class 0 and look like a real segmentation."""


def check_frame(image: Any) -> np.ndarray:
    """Validate a frame: (H, W, 3) uint8 RGB with H, W >= 1. Returns it C-contiguous.

    Raises:
        FrameError: naming what is wrong (type, dtype, number of channels, zero size).
    """
    if not isinstance(image, np.ndarray):
        raise FrameError(f"frame must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise FrameError(f"frame must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise FrameError(f"frame must have shape (H, W, 3) RGB, got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise FrameError(f"frame is empty: {image.shape[0]} x {image.shape[1]} pixels")
    return np.ascontiguousarray(image)


def class_masks_from_labels(labels: np.ndarray) -> dict[int, np.ndarray]:
    """``{class_id: (H, W) uint8 mask, 0 or 255}`` for each class present in ``labels``, ascending.

    Args:
        labels: (H, W) uint8 or uint16 class IDs (other integer dtypes take a slower path).
    """
    # cv2.compare takes a 1 x 1 array for the scalar operand and the class ID for a 4-element
    # Scalar (a (4, 1) result): the smallest images take the numpy path.
    if labels.dtype in (np.uint8, np.uint16) and labels.ndim == 2 and labels.size > 4:
        present = np.flatnonzero(np.bincount(labels.reshape(-1)))  # faster than np.unique (no sort)
        labels = np.ascontiguousarray(labels)
        return {int(c): cv2.compare(labels, float(c), cv2.CMP_EQ) for c in present}  # 0/255 uint8
    return {int(c): (labels == c).view(np.uint8) * np.uint8(255) for c in np.unique(labels)}


@dataclass(frozen=True)
class Letterbox:
    """How a frame maps onto the network canvas (aspect ratio kept, bottom/right padding).

    Attributes:
        input_hw: the frame's (H, W) in pixels.
        resized_hw: (h, w) after scaling, the unpadded area of the canvas.
        padded_hw: (Hp, Wp), multiples of ``divisibility``.
    """

    input_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]

    @staticmethod
    def fit(input_hw: tuple[int, int], canvas_hw: tuple[int, int] | None, divisibility: int = 32) -> "Letterbox":
        """Scale ``input_hw`` to fit inside ``canvas_hw`` (None: keep the size), pad to ``divisibility``.

        The frame fills the canvas's width (height rounded) or its height (width rounded),
        whichever fits; when both fit (aspect ratios equal to within the rounding), the larger.
        Halves round up, as detectron2's ``ResizeShortestEdge`` (``int(x + 0.5)``), which the
        official MPVSS test resize is (960 x 1281 -> 480 x 641 on a 480 x 853 canvas).
        So a frame fits exactly the size it letterboxes to on any canvas: ``fit(input_hw,
        fit(input_hw, c).resized_hw)`` has that same ``resized_hw``, and graphs exported for that
        size (``mpvss export --height --width``) run its frames. (Scaling both sides by the
        smaller ratio instead could round the other side one pixel short: 375 x 1242 on a 480 x
        640 canvas is 193 x 640, but on a 193 x 640 canvas it was 193 x 639.)

        Args:
            input_hw: the frame's (H, W), pixels >= 1.
            canvas_hw: the canvas (H, W) in pixels, or None.
            divisibility: the padded size's multiple.
        """
        h, w = input_hw
        if canvas_hw is None:
            rh, rw = h, w
        else:
            ch, cw = int(canvas_hw[0]), int(canvas_hw[1])
            fill_width = (max(1, int(h * cw / w + 0.5)), cw)
            fill_height = (ch, max(1, int(w * ch / h + 0.5)))
            # one of them always fits: the side with the smaller scale ratio rounds to at most its canvas side
            rh, rw = max((c for c in (fill_width, fill_height) if c[0] <= ch and c[1] <= cw), key=lambda c: c[0] * c[1])
        ph = int(math.ceil(rh / divisibility) * divisibility)
        pw = int(math.ceil(rw / divisibility) * divisibility)
        return Letterbox((h, w), (rh, rw), (ph, pw))

    @staticmethod
    def for_input(input_hw: tuple[int, int], inp: Any) -> "Letterbox":
        """:meth:`fit` onto the canvas of a model's ``InputConfig``, as :class:`VideoSegmenter`
        places its frames: ``size`` (None = the frame's own size), turned to the frame's
        orientation when ``canvas_orientation`` is ``frame`` (a frame taller than wide on a
        landscape ``size`` goes onto (W, H), a wider one onto a portrait ``size`` turned);
        ``size_divisibility``.

        With ``frame`` this is detectron2's ``ResizeShortestEdge(min(size), max(size))``, the
        official test resize, on common camera sizes (checked for 13 of them, both orientations).
        One side can be one pixel apart (64 of 200 000 random sizes up to 4000 x 4000): where the
        frame's aspect ratio is within a pixel's rounding of the canvas's, :meth:`fit` fills the
        whole canvas (e.g. 708 x 1257 -> 480 x 853) where detectron2 keeps the short side at
        480 and rounds the long one (852), which keeps ``fit`` exact on its own output size; and
        its floating-point products can round a side the other way at an exact half.
        """
        canvas = None
        if inp.size is not None:
            canvas = (int(inp.size[0]), int(inp.size[1]))
            if inp.canvas_orientation == "frame" and (input_hw[0] > input_hw[1]) != (canvas[0] > canvas[1]):
                canvas = (canvas[1], canvas[0])  # a square frame fits either way alike
        return Letterbox.fit(input_hw, canvas, inp.size_divisibility)


def resize_frame(image: np.ndarray, hw: tuple[int, int], interpolation: str = "area") -> np.ndarray:
    """Resize a frame as the model's pre-processing does (``InputConfig.interpolation``).

    Args:
        image: (H, W, 3) uint8 RGB.
        hw: the output (h, w) in pixels.
        interpolation: ``area`` (OpenCV: ``INTER_AREA`` when either side shrinks, else
            ``INTER_LINEAR``) or ``pil_bilinear`` (Pillow's ``Image.BILINEAR``, a triangle filter
            widened by the scale when shrinking: what detectron2's ``ResizeTransform`` does to
            uint8 images, the official MPVSS / Mask2Former test resize).

    Returns:
        (h, w, 3) uint8; ``image`` itself when it already has that size.

    Raises:
        ValueError: an unknown ``interpolation``.
    """
    h, w = int(hw[0]), int(hw[1])
    if image.shape[:2] == (h, w):
        return image
    if interpolation == "area":
        shrink = h < image.shape[0] or w < image.shape[1]
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if interpolation == "pil_bilinear":
        return np.array(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))  # writable, as cv2's
    raise ValueError(f"interpolation must be 'area' or 'pil_bilinear', got {interpolation!r}")


def canvas_tensor(image: np.ndarray, lb: Letterbox, device: torch.device | str = "cpu",
                  interpolation: str = "area") -> torch.Tensor:
    """Place a frame on the network canvas as the segmenter does.

    Args:
        image: (H, W, 3) uint8 RGB with (H, W) = ``lb.input_hw``.
        lb: its :class:`Letterbox` (``Letterbox.fit(image.shape[:2], canvas_hw)``).
        device: where the tensor goes.
        interpolation: the model's ``input.interpolation`` (:func:`resize_frame`).

    Returns:
        (1, 3, Hp, Wp) float32 RGB 0..255: the frame resized to ``lb.resized_hw``
        (:func:`resize_frame`) at the top left, zeros in the bottom/right padding.
    """
    image = resize_frame(image, lb.resized_hw, interpolation)
    canvas = np.zeros((lb.padded_hw[0], lb.padded_hw[1], 3), dtype=np.uint8)
    canvas[: lb.resized_hw[0], : lb.resized_hw[1]] = image
    return torch.from_numpy(canvas).to(device).permute(2, 0, 1)[None].float()


@dataclass
class SegmentationResult:
    """The segmentation of one frame.

    Attributes:
        frame_index: 0-based index of the frame among those pushed since construction; a frame
            refused with FrameError takes none, one whose segmentation failed takes its own (the
            published indices then skip it).
        stamp: the frame's capture time, seconds (as given).
        labels: (H, W) class IDs at the input resolution; uint8, or uint16 when K > 255.
        confidence: (H, W) uint8, 255 x the winning class's share of the summed class scores.
        class_masks: {class_id: (H, W) uint8 mask, 0 or 255} for the classes present, when
            requested, else None.
        is_key_frame: whether the segmentor ran on this frame.
        key_frame_index, key_frame_stamp: the key frame these labels come from.
        scene_score: the scheduler's scene-change score (see :mod:`mpvss_ros.scheduling`).
        key_frame_reason: why it is a key frame, "" otherwise.
        stage_latency_ms: per-stage wall time in ms, in the order run: ``schedule``, ``preprocess``,
            ``segmentor`` (key frames) or ``propagation`` (others), ``postprocess``, ``total``.
    """

    frame_index: int
    stamp: float
    labels: np.ndarray
    confidence: np.ndarray
    class_masks: dict[int, np.ndarray] | None
    is_key_frame: bool
    key_frame_index: int
    key_frame_stamp: float
    scene_score: float
    key_frame_reason: str
    stage_latency_ms: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """JSON-serialisable summary without the images (one line of ``frames.jsonl``)."""
        return {
            "frame": self.frame_index,
            "stamp": self.stamp,
            "is_key_frame": self.is_key_frame,
            "key_frame": self.key_frame_index,
            "key_frame_stamp": self.key_frame_stamp,
            "key_frame_reason": self.key_frame_reason,
            "scene_score": round(self.scene_score, 5),
            "stage_latency_ms": {k: round(v, 3) for k, v in self.stage_latency_ms.items()},
        }


class VideoSegmenter:
    """Push frames, get per-frame semantic labels; key frames chosen by a scheduler.

    Args:
        model: an inference backend (:func:`mpvss_ros.runtime.load_backend`: torch,
            onnxruntime, tensorrt) or the MPVSS model itself, which is wrapped in the torch
            backend (eval mode, moved to ``device``). Its ``cfg.input`` sets canvas,
            normalisation, padding.
        propagator: how non-key frames are produced (:mod:`mpvss_ros.propagation`).
        scheduler: which frames are key frames (:mod:`mpvss_ros.scheduling`).
        device: torch device for a model given as a module; a backend has its own.
        class_masks: also return one binary mask per class present.

    Attributes:
        model: the backend the segmenter runs on.

    Not thread-safe: one segmenter per video stream.
    """

    def __init__(self, model: "Backend | MPVSS", propagator: Propagator, scheduler: KeyFrameScheduler,
                 device: str | torch.device = "cpu", class_masks: bool = False) -> None:
        from .runtime.base import as_backend

        self.model = as_backend(model, device)
        self.device = torch.device(getattr(self.model, "device", device))
        self.propagator = propagator
        self.scheduler = scheduler
        self.class_masks = class_masks
        self.num_classes = self.model.num_classes
        self.label_dtype = np.uint8 if self.num_classes <= 255 else np.uint16  # 255 = UNLABELED (VisionClass)
        inp = self.model.cfg.input
        self._input = inp
        self._score_resolution = self.model.cfg.postprocess.score_resolution
        self._min_query_score = float(self.model.cfg.postprocess.min_query_score)
        self._frame_index = 0
        self._key: KeyFrameState | None = None
        self._key_letterbox: Letterbox | None = None
        self._key_index = -1
        self._key_stamp = float("nan")
        #: Seconds spent preparing fixed-shape backends for new sizes (ONNX export or engine build,
        #: and opening the sessions or engines), summed over sizes; the frames' stage latencies leave it out.
        self.setup_s = 0.0
        self._source: str | None = None  # the source of the last frame past push's checks
        scheduler.reset()  # one that has seen frames (a preview) would count from its own key frame

    def reset(self, reason: str = "reset") -> None:
        """Drop the key frame: the next frame is a key frame with scheduler reason ``reason``
        (e.g. ``frame_id_change``).

        Raises:
            Exception: whatever the scheduler's ``reset`` raises; the key frame is dropped first,
                so the next frame is a key frame all the same.
        """
        self._key = None
        self._key_letterbox = None
        self.scheduler.reset(reason)

    def replace(self, propagator: Propagator | None = None, scheduler: KeyFrameScheduler | None = None) -> None:
        """Swap the propagator and/or the scheduler (parameters changed while a stream runs).

        The key frame is dropped, so the next frame is a key frame, reported with reason
        ``reset`` (a fresh scheduler's ``first`` is renamed once frames have been segmented):
        a key frame's state belongs to the propagation that made it (e.g. a chained flow).
        """
        if propagator is not None:
            self.propagator = propagator
        if scheduler is not None:
            self.scheduler = scheduler
        self.reset()

    def key_state(self, key: KeyFrameState) -> KeyFrameState:
        """The state a key frame's non-key frames are propagated from: ``key`` with its active
        queries only (``postprocess.min_query_score``) and its padding filled (warps clamp to the
        valid area's edge; :meth:`~mpvss_ros.nn.mpvss.KeyFrameState.with_padding_filled`)."""
        return key.with_active_queries(self._min_query_score).with_padding_filled()

    @torch.inference_mode()
    def push(self, image: np.ndarray, stamp: float, source: str | None = None) -> SegmentationResult:
        """Segment one frame.

        Args:
            image: (H, W, 3) uint8 RGB.
            stamp: capture time in seconds (monotonic within a stream; going back forces a key
                frame).
            source: which camera the frame comes from (a ROS ``header.frame_id``); a frame whose
                source differs from the last pushed frame's (one that passed the frame checks,
                failed later or not) is a key frame, reason
                ``frame_id_change`` (two cameras on one topic must not propagate into each other).
                None: not tracked.

        Returns:
            :class:`SegmentationResult` at the input resolution.

        Raises:
            FrameError: on a frame that is not (H, W, 3) uint8 with H, W >= 1, or a stamp that is
                not a finite real number of seconds, or is a bool (state untouched).
            NonFiniteOutputError: NaN or infinite logits from the model or the propagation
                (labels from them would all be class 0); the segmenter is reset, so the next
                frame is a key frame.
            RuntimeError: a propagator returned another number of masks than the key frame's
                active queries; the segmenter is reset, so the next frame is a key frame.
            Exception: whatever the scheduler, the pre-processing, the backend or the propagator
                raises (e.g. out of memory); the segmenter is then reset, so the next frame is a
                key frame. An error in the post-processing keeps the key frame.
        """
        t0 = time.perf_counter()
        image = check_frame(image)
        try:
            # no strings, arrays or None; no bools (True would be a stamp of 1 s: a caller's mistake)
            if not is_real(stamp):
                raise TypeError
            stamp = float(stamp)
        except (TypeError, OverflowError):
            raise FrameError(f"stamp must be a number of seconds, got {shown(stamp)}") from None
        if not math.isfinite(stamp):
            raise FrameError(f"stamp must be a finite number of seconds, got {stamp}")
        if source is not None:
            if self._source is not None and source != self._source:
                self.reset("frame_id_change")
            # now, not once the frame succeeds: whatever key frame is held after this call is this
            # source's or none, so another source's next frame is never propagated from it
            self._source = source
        index = self._frame_index  # taken now: a frame that fails below keeps its index
        self._frame_index += 1
        latency: dict[str, float] = {}

        try:
            t = time.perf_counter()
            decision: ScheduleDecision = self.scheduler.decide(image, stamp)
            letterbox = self.letterbox(image.shape[:2])
            # A non-key frame needs a key frame on the same canvas; the scheduler forces a key
            # frame on resolution changes, this guards the invariant for custom schedulers.
            held = self._key is not None  # (False after a reset whose scheduler raised)
            is_key = decision.is_key_frame or not held or letterbox != self._key_letterbox
            latency["schedule"] = (time.perf_counter() - t) * 1e3

            t = time.perf_counter()
            tensor = self.canvas(image, letterbox)
            latency["preprocess"] = (time.perf_counter() - t) * 1e3

            t = time.perf_counter()
            if is_key:
                if hasattr(self.model, "prepare"):
                    # Fixed-shape backends export graphs / build engines for a new size here;
                    # one-off set-up is not frame time, so it is left out of the stage latencies.
                    self.model.prepare(letterbox.resized_hw)
                    setup = time.perf_counter() - t
                    self.setup_s += setup
                    t0 += setup
                    t = time.perf_counter()
                key = self.model.segment_key_frame(tensor, letterbox.resized_hw)
            else:
                assert self._key is not None
                mask_logits = self.propagator.propagate(self._key, tensor)
        except BaseException:
            # Start over, so that the next frame is a key frame (reason "reset"): the scheduler has
            # already counted this frame, perhaps as the key frame of a cut, which must not be
            # propagated across; preparing the backend for a new size or segmenting it failed;
            # or a propagation failed, which may fail on every frame of this key frame (a backend
            # missing this size's flows graph, out of memory), so the stream degrades to key
            # frames instead of to no output.
            self.reset()
            raise
        if is_key:
            if not _all_finite(key.class_logits, key.mask_logits, key.query_embeddings):
                self.reset("non_finite")
                raise NonFiniteOutputError(f"the key frame's class or mask logits or query embeddings hold NaN or infinite values "
                                           f"(frame {index}); nothing is published for it")
            self._key = self.key_state(key)
            self._key_letterbox = letterbox
            self._key_index = index
            self._key_stamp = stamp
            mask_logits = self._key.propagated(self._key.mask_logits)
            latency["segmentor"] = (time.perf_counter() - t) * 1e3
        else:
            if not _all_finite(mask_logits):
                self.reset("non_finite")
                raise NonFiniteOutputError(f"the propagated mask logits hold NaN or infinite values (frame "
                                           f"{index}, {self.propagator.name}); the next frame is a key frame")
            latency["propagation"] = (time.perf_counter() - t) * 1e3

        t = time.perf_counter()
        # Every frame is scored over the key frame's active queries (all N unless
        # postprocess.min_query_score drops some), so copy reproduces the key frame exactly.
        class_logits = self._key.propagated(self._key.class_logits)
        if mask_logits.shape[1] != class_logits.shape[1]:
            self.reset()  # repeats on every frame of this key frame otherwise (as a propagation that raises)
            raise RuntimeError(f"propagator {self.propagator.name!r} returned {mask_logits.shape[1]} masks for "
                               f"{class_logits.shape[1]} active queries (KeyFrameState.propagated)")
        labels, confidence = self.postprocess(class_logits, mask_logits, letterbox)
        masks = class_masks_from_labels(labels) if self.class_masks else None
        latency["postprocess"] = (time.perf_counter() - t) * 1e3
        latency["total"] = (time.perf_counter() - t0) * 1e3

        result = SegmentationResult(
            frame_index=index,
            stamp=stamp,
            labels=labels,
            confidence=confidence,
            class_masks=masks,
            is_key_frame=is_key,
            key_frame_index=self._key_index,
            key_frame_stamp=self._key_stamp,
            scene_score=decision.scene_score,
            key_frame_reason=self._key_frame_reason(decision, index, held) if is_key else "",
            stage_latency_ms=latency,
        )
        return result

    def letterbox(self, input_hw: tuple[int, int]) -> Letterbox:
        """Where a frame of ``input_hw`` (H, W pixels) goes on the model's canvas, as :meth:`push`
        places it (:meth:`Letterbox.for_input` of the model's ``InputConfig``)."""
        return Letterbox.for_input(input_hw, self._input)

    def canvas(self, image: np.ndarray, lb: Letterbox) -> torch.Tensor:
        """The network input of a frame, as :meth:`push` makes it: (1, 3, Hp, Wp) float32 RGB
        0..255 on the segmenter's device (:func:`canvas_tensor` with the model's
        ``input.interpolation``); ``image`` (H, W, 3) uint8 RGB, ``lb`` its :meth:`letterbox`."""
        return canvas_tensor(image, lb, self.device, self._input.interpolation)

    def _key_frame_reason(self, decision: ScheduleDecision, index: int, held: bool) -> str:
        """Why frame ``index`` is a key frame: the scheduler's reason; when the scheduler gave
        none, ``canvas_change`` if a key frame was ``held`` (the segmenter's canvas check made
        it one), else ``reset``; ``first`` for the first frame pushed, whatever reset came before
        it; ``reset`` for a replaced scheduler's ``first``."""
        if index == 0:
            return "first"
        if not decision.reason:
            return "canvas_change" if held else "reset"
        return "reset" if decision.reason == "first" else decision.reason

    def postprocess(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                    lb: Letterbox) -> tuple[np.ndarray, np.ndarray]:
        """Class and mask logits -> labels and confidence at the input resolution.

        Args:
            class_logits: (1, N, K+1) float32.
            mask_logits: (1, N, Hp/4, Wp/4) float32.
            lb: the frame's letterbox.

        Returns:
            labels (H, W) uint8/uint16 and confidence (H, W) uint8.
        """
        if self._score_resolution == "canvas":  # Mask2Former: upsample mask logits, then score
            masks = F.interpolate(mask_logits, size=lb.padded_hw, mode="bilinear", align_corners=False)
            scores = semantic_scores(class_logits, masks)
        else:  # score on the mask grid, then upsample the K score maps
            scores = semantic_scores(class_logits, mask_logits)
        # Resizing is linear, so the sum of the resized score maps is the resized sum: one map
        # (CamVid 360 x 480, 2 threads, medians of 3 interleaved runs: 7.1 -> 6.4 ms per non-key frame).
        total = _scores_to_input_size(scores[0].sum(dim=0, keepdim=True), lb)[:, :, 0]
        best, idx = _best_class(scores[0], lb)
        confidence = (best / total.clamp_min(1e-12) * 255.0).round().clamp(0, 255).to(torch.uint8)
        labels = (idx if idx.dtype == torch.uint8 else idx.to(torch.int32)).cpu().numpy().astype(self.label_dtype, copy=False)
        return labels, confidence.cpu().numpy()
