"""Key-frame scheduling: which frames run the full segmentor.

Every scheduler computes a cheap **scene score** for every frame against the last key frame, so
the score is part of every result whatever the policy:

* the frame is converted to grey and shrunk to a ``thumb_width``-pixel-wide thumbnail
  (``cv2.INTER_AREA``);
* ``frame_change`` = mean absolute grey-level difference / 255 between the thumbnail and the
  previous frame's, after scaling the previous one to the same mean grey level (so a global
  brightness flicker is not motion), in [0, 1];
* ``drift`` = the sum of ``frame_change`` over the frames since the key frame: how far the
  content has moved away from the key frame, integrated frame by frame;
* ``histogram_change`` = Bhattacharyya distance of 32-bin grey histograms of the frame and the
  key frame, in [0, 1];
* ``scene_score = max(drift / pixel_scale, histogram_change)``, where ``pixel_scale`` is 0.25 by
  default;
* ``cut_score = max(frame_change / pixel_scale, histogram distance to the previous frame)``: how
  abruptly the scene changed between two consecutive frames. On the clips at hand (thumbnails of
  the default width) the five hard cuts of ``bikes.mp4`` score 0.56-0.85 and every other frame at
  most 0.32 (bikes), 0.20 (CamVid val clip) and 0.07 (``solidWhiteRight.mp4``), as printed by
  ``PYTHONPATH=. python3 scripts/schedule_table.py --clip bikes|val|dashcam --cut-scores``.

The drift term grows with camera motion at the rate the content changes, so a fast stretch of a
drive gets key frames closer together than a slow one. It is integrated frame to frame rather
than measured directly against the key frame because the direct difference saturates once the
content has shifted by more than the texture scale. Measured on the CamVid val clip with key
frames matched in number: the direct difference was 0.2-1.2 mIoU below uniform spacing at 1 key
frame in 2, 3 and 5 and level at 1 in 10 (previous release); the integrated drift beats uniform
spacing at 1 in 5 and 1 in 10 and is up to 0.45 below it at 1 in 2 and 3
(``docs/study_mpvss_lite_camvid.json``, ``docs/experiment_log.md``). Those figures are for the paper's
direct flow; with chained flow (the propagators' default, :mod:`mpvss_ros.propagation`), whose
error grows more slowly with the distance to the key frame, the adaptive schedule is 0.02-0.20
below uniform spacing at 1 in 2, 3 and 5 and 0.22 above it at 1 in 10 on that clip for query flow
(and above direct flow with either schedule at 1 in 5 and 1 in 10). Aiming at the per-frame
segmentation does not help there either: the schedule that best preserves it, found by a local search
with it in hand, also scores below uniform spacing against the labels at 1 in 2, 3 and 5
(``scripts/schedule_table.py --own-oracle``, ``docs/experiment_log.md``). It stays the node's default
for what uniform spacing cannot do: key hard cuts and follow a robot that stops and starts. The
histogram term is insensitive to motion and follows lighting changes.

Hard cuts are a separate test (``cut_score >= cut_threshold``) rather than a large step of the
scene score: a cut adds only 0.56-0.85 to the scene score, so with the scene score alone a threshold
above about 0.6 (the sparser key frames a slow robot may want) let cuts through: at
``scene_threshold`` 1.0 the adaptive schedule missed two of the five cuts of ``bikes.mp4`` and at 2.0
three, warping the masks of the previous scene onto up to ``max_interval`` frames of the new one.

Forced key frames, whatever the policy (``reason`` in the decision):

* ``first``: the first frame, or the first after :meth:`KeyFrameScheduler.reset` (``reset``);
* ``resolution_change``: the frame's size differs from the key frame's;
* ``time_backwards``: the stamp is earlier than the previous frame's (bag loop, replay);
* ``time_gap``: more than ``max_gap_s`` seconds since the previous frame;
* ``frame_id_change``, ``non_finite``: :meth:`KeyFrameScheduler.reset` with that reason from
  :meth:`~mpvss_ros.segmenter.VideoSegmenter.push` when the frame's source (a ROS
  ``header.frame_id``) changed, or after logits that were NaN or infinite.

Policies:

* :class:`FixedIntervalScheduler` (``fixed:N``): every N-th frame after the last key frame
  (``interval``); N = 1 is per-frame segmentation. MPVSS uses N = 5.
* :class:`AdaptiveScheduler` (``adaptive``): once at least ``min_interval`` frames have passed
  since the key frame, a key frame if one of them was a hard cut, ``cut_score >= cut_threshold``
  (``scene_cut``), or when ``scene_score >= scene_threshold`` (``scene_change``); after ``max_interval``
  frames at the latest (``max_interval``). :class:`FixedIntervalScheduler` does not look at
  cuts: it is the fixed schedule of the paper's key-interval study.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .io.video import check_fps
from .values import is_finite, is_integer, is_real, shown

__all__ = [
    "ScheduleDecision",
    "SceneScorer",
    "KeyFrameScheduler",
    "FixedIntervalScheduler",
    "AdaptiveScheduler",
    "parse_schedule",
    "schedule_key_frames",
    "StampGaps",
    "DEFAULT_CUT_THRESHOLD",
]

#: Default ``cut_threshold`` of :class:`AdaptiveScheduler`: between the highest cut score of a
#: frame without a cut (0.32) and the lowest of a hard cut (0.56) on the clips in the module docstring.
DEFAULT_CUT_THRESHOLD = 0.45


def _to_shape(thumb: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``thumb`` (h, w) uint8, resized (``cv2.INTER_AREA``) to ``shape`` if it has another size."""
    if thumb.shape == shape:
        return thumb
    return cv2.resize(thumb, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class ScheduleDecision:
    """The scheduler's verdict for one frame.

    Attributes:
        is_key_frame: run the segmentor on this frame.
        scene_score: change against the last key frame (>= 0). 0.0 on a forced first frame.
        reason: why it is a key frame (``first``, ``reset``, ``resolution_change``,
            ``time_backwards``, ``time_gap``, ``interval``, ``scene_cut``, ``scene_change``,
            ``max_interval``), or ``""`` for a non-key frame.
        frames_since_key: frames since the last key frame, counting this one (0 on a key frame).
    """

    is_key_frame: bool
    scene_score: float
    reason: str
    frames_since_key: int


class SceneScorer:
    """Cheap scene-change score of a frame against a reference thumbnail.

    Args:
        thumb_width: thumbnail width in pixels (height keeps the aspect ratio).
        pixel_scale: pixel change that counts as a full scene change, as a fraction of the grey
            range 0..255 (see module docstring).
        bins: grey-histogram bins, 2..256 (one per grey level at most; OpenCV's calcHist takes no
            count past an int).

    Raises:
        ValueError: ``thumb_width`` not an integer >= 4, ``pixel_scale`` not finite and > 0, or
            ``bins`` not an integer in 2..256.
    """

    def __init__(self, thumb_width: int = 64, pixel_scale: float = 0.25, bins: int = 32) -> None:
        if not (_is_count(thumb_width, 4) and _is_count(bins, 2) and bins <= 256 and is_real(pixel_scale)
                and is_finite(pixel_scale) and pixel_scale > 0):
            raise ValueError(f"thumb_width (an integer >= 4), pixel_scale (finite, > 0) and bins (an integer in 2..256) "
                             f"are required, got {shown(thumb_width)}, {shown(pixel_scale)}, {shown(bins)}")
        self.thumb_width = thumb_width
        self.pixel_scale = pixel_scale
        self.bins = bins

    def thumbnail(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grey thumbnail (h, thumb_width) uint8 and its normalised histogram (bins,) float32.

        Args:
            frame: (H, W, 3) uint8 RGB.
        """
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        h, w = grey.shape
        tw = min(self.thumb_width, w)
        th = max(1, round(h * tw / w))
        thumb = cv2.resize(grey, (tw, th), interpolation=cv2.INTER_AREA)
        hist = cv2.calcHist([thumb], [0], None, [self.bins], [0, 256]).ravel()
        hist /= max(float(hist.sum()), 1.0)
        return thumb, hist

    def cut_score(self, thumb: np.ndarray, hist: np.ndarray, prev_thumb: np.ndarray, prev_hist: np.ndarray) -> float:
        """Cut score of a frame against the previous one, in [0, 1 / pixel_scale]:
        ``max(frame_change / pixel_scale, histogram_change)`` (module docstring). A hard cut
        scores >= ``DEFAULT_CUT_THRESHOLD``; the scheduler and stage-2 shot splitting
        (:func:`mpvss_ros.training.pairs.video_shots`) both use it.

        Args:
            thumb, hist: the frame's thumbnail and histogram (:meth:`thumbnail`).
            prev_thumb, prev_hist: the previous frame's, the thumbnail of the same size.
        """
        return max(self.frame_change(thumb, prev_thumb) / self.pixel_scale, self.histogram_change(hist, prev_hist))

    def cut_scores(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Cut score (:meth:`cut_score`) of every frame of a clip against the frame before it.

        Args:
            frames: (H, W, 3) uint8 RGB frames of one clip, in order; a frame of another size than
                the one before it is compared at the new thumbnail size (as the scheduler does).

        Returns:
            (T,) float64; 0.0 for the first frame, which has no previous frame.
        """
        scores = np.zeros(len(frames), dtype=np.float64)
        prev = None
        for i, frame in enumerate(frames):
            thumb, hist = self.thumbnail(frame)
            if prev is not None:
                scores[i] = self.cut_score(thumb, hist, _to_shape(prev[0], thumb.shape), prev[1])
            prev = (thumb, hist)
        return scores

    @staticmethod
    def histogram_change(hist: np.ndarray, ref_hist: np.ndarray) -> float:
        """Bhattacharyya distance of two normalised histograms from :meth:`thumbnail`, in [0, 1].

        Args:
            hist, ref_hist: (bins,) float32 normalised grey histograms of the same length.
        """
        histo = float(cv2.compareHist(hist, ref_hist, cv2.HISTCMP_BHATTACHARYYA))
        return min(max(histo, 0.0), 1.0)

    @staticmethod
    def frame_change(thumb: np.ndarray, prev_thumb: np.ndarray) -> float:
        """Gain-compensated mean absolute grey difference / 255 of two thumbnails, in [0, 1].

        ``prev_thumb`` is scaled to the mean grey level of ``thumb`` first (by a gain clamped to
        [0.5, 2]), so a global brightness change (flicker, auto-exposure) does not count as
        motion, while a cut to a much darker or brighter scene still does.

        Args:
            thumb, prev_thumb: (h, w) uint8 grey thumbnails of one size.
        """
        cur = thumb.astype(np.float32)
        prev = prev_thumb.astype(np.float32)
        gain = float(cur.mean()) / max(float(prev.mean()), 1.0)
        prev *= min(max(gain, 0.5), 2.0)
        return min(float(np.abs(cur - prev).mean()) / 255.0, 1.0)


class KeyFrameScheduler(ABC):
    """Base class: scene score, forced key frames, bookkeeping. Subclasses pick the policy.

    Args:
        max_gap_s: a gap between consecutive stamps longer than this (seconds) forces a key
            frame; ``math.inf`` disables it.
        scorer: the scene scorer (default :class:`SceneScorer`).

    Raises:
        ValueError: ``max_gap_s`` not > 0.
    """

    def __init__(self, max_gap_s: float = 1.0, scorer: SceneScorer | None = None) -> None:
        if not (is_real(max_gap_s) and max_gap_s > 0):  # inf (or 10**400): no gap limit
            raise ValueError(f"max_gap_s must be > 0, got {shown(max_gap_s)}")
        self.max_gap_s = max_gap_s
        self.scorer = scorer or SceneScorer()
        self._frames_seen = 0
        self.reset()

    def reset(self, reason: str = "reset") -> None:
        """Forget the key frame: the next frame is a key frame, with ``reason`` (a plain
        ``reset`` before any frame was seen gives ``first``; another reason, e.g. the engine's
        ``frame_id_change`` on a scheduler swapped in just before, is kept; an empty one, which
        would read as a non-key frame's, is ``reset``)."""
        reason = reason or "reset"
        self._ref: tuple[np.ndarray, np.ndarray] | None = None  # key frame's (thumbnail, histogram)
        self._prev: tuple[np.ndarray, np.ndarray] | None = None  # previous frame's
        self._drift = 0.0
        self._cut = 0.0  # the largest cut score since the key frame
        self._key_shape: tuple[int, ...] | None = None
        self._last_stamp: float | None = None
        self._since_key = 0
        self._start_reason = "first" if reason == "reset" and not self._frames_seen else reason

    def decide(self, frame: np.ndarray, stamp: float) -> ScheduleDecision:
        """Decide whether ``frame`` is a key frame and update the state.

        Args:
            frame: (H, W, 3) uint8 RGB.
            stamp: capture time in seconds, finite.

        Raises:
            ValueError: a non-finite stamp (it would disable both time checks from then on).
        """
        if not (is_real(stamp) and is_finite(stamp)):
            raise ValueError(f"stamp must be a finite number of seconds, got {shown(stamp)}")
        self._frames_seen += 1
        thumb, hist = self.scorer.thumbnail(frame)
        if self._ref is None:
            return self._commit(True, 0.0, self._start_reason, thumb, hist, frame.shape, stamp)
        assert self._prev is not None  # set by every _commit, and _ref is set with it
        prev, prev_hist = self._prev
        prev = _to_shape(prev, thumb.shape)  # another resolution or aspect ratio: a forced key frame
        scorer = self.scorer
        drift = self._drift + scorer.frame_change(thumb, prev)
        score = max(drift / scorer.pixel_scale, scorer.histogram_change(hist, self._ref[1]))
        cut = max(self._cut, scorer.cut_score(thumb, hist, prev, prev_hist))
        reason = self._forced_reason(frame.shape, stamp) or self._policy(score, cut, self._since_key + 1)
        self._drift, self._cut = drift, cut
        return self._commit(bool(reason), score, reason, thumb, hist, frame.shape, stamp)

    def describe(self) -> dict[str, Any]:
        """The schedule (``repr``) and every setting that decides its key frames, JSON-ready
        (``max_gap_s`` None when disabled), for run summaries; subclasses add theirs."""
        return {"schedule": repr(self), "max_gap_s": self.max_gap_s if is_finite(self.max_gap_s) else None}

    @abstractmethod
    def _policy(self, scene_score: float, cut_score: float, frames_since_key: int) -> str:
        """Return a reason string for a key frame, or "" for a non-key frame.

        ``cut_score`` is the largest cut score of the frames since the key frame (this one
        included), so a cut that came too early for a policy is not forgotten.
        """

    def _forced_reason(self, shape: tuple[int, ...], stamp: float) -> str:
        if shape != self._key_shape:
            return "resolution_change"
        if self._last_stamp is not None:
            if stamp < self._last_stamp:
                return "time_backwards"
            if stamp - self._last_stamp > self.max_gap_s:
                return "time_gap"
        return ""

    def _commit(self, key: bool, score: float, reason: str, thumb: np.ndarray, hist: np.ndarray,
                shape: tuple[int, ...], stamp: float) -> ScheduleDecision:
        self._last_stamp = stamp
        self._prev = (thumb, hist)
        if key:
            self._drift = self._cut = 0.0
            self._ref = (thumb, hist)
            self._key_shape = shape
            self._since_key = 0
        else:
            self._since_key += 1
        return ScheduleDecision(key, float(score), reason if key else "", self._since_key)


class FixedIntervalScheduler(KeyFrameScheduler):
    """A key frame every ``interval`` frames (``fixed:N``), plus the forced ones.

    Args:
        interval: N, frames from one key frame to the next (1 = per-frame segmentation; MPVSS
            uses 5, spec §4.1).
        max_gap_s, scorer: as :class:`KeyFrameScheduler` (``max_gap_s`` in seconds).

    Raises:
        ValueError: if ``interval`` is not an integer >= 1 or ``max_gap_s`` is not > 0.
    """

    def __init__(self, interval: int, max_gap_s: float = 1.0, scorer: SceneScorer | None = None) -> None:
        if not _is_count(interval, 1):
            raise ValueError(f"key-frame interval must be a whole number of frames >= 1, got {shown(interval)}")
        self.interval = interval
        super().__init__(max_gap_s, scorer)

    def _policy(self, scene_score: float, cut_score: float, frames_since_key: int) -> str:
        return "interval" if frames_since_key >= self.interval else ""

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "interval": self.interval}

    def __repr__(self) -> str:
        return f"fixed:{self.interval}"


class AdaptiveScheduler(KeyFrameScheduler):
    """Scene-change key frames: on a hard cut (``cut_score >= cut_threshold``) or when
    ``scene_score >= scene_threshold``, after ``min_interval`` frames, or ``max_interval`` frames at the
    latest (see the module docstring for both scores).

    Args:
        scene_threshold: scene score that triggers a key frame (0.5: about 1 key frame in 5 on the
            CamVid val clip at 15 fps; higher = fewer key frames).
        min_interval: frames that must pass after a key frame before a cut or a scene change may
            fire (1 = the very next frame may be a key frame); a cut within them fires when they
            have passed.
        max_interval: frames after which a key frame is forced.
        cut_threshold: cut score of a hard cut, which makes a key frame (``scene_cut``); any
            value above the largest cut score, ``1 / scorer.pixel_scale`` (4 with the default
            :class:`SceneScorer`, as the command line and the node use), turns cut detection off.
        max_gap_s, scorer: as :class:`KeyFrameScheduler` (``max_gap_s`` in seconds).

    Raises:
        ValueError: on a scene_threshold or cut_threshold <= 0 (or not finite),
            ``not 1 <= min_interval <= max_interval`` (both integers), or ``max_gap_s`` not > 0.
    """

    def __init__(self, scene_threshold: float = 0.5, min_interval: int = 1, max_interval: int = 10,
                 max_gap_s: float = 1.0, scorer: SceneScorer | None = None,
                 cut_threshold: float = DEFAULT_CUT_THRESHOLD) -> None:
        if not (is_real(scene_threshold) and scene_threshold > 0 and is_finite(scene_threshold)):
            raise ValueError(f"scene_threshold must be > 0 and finite, got {shown(scene_threshold)}")
        if not (is_real(cut_threshold) and cut_threshold > 0 and is_finite(cut_threshold)):
            raise ValueError(f"cut_threshold must be > 0 and finite, got {shown(cut_threshold)}")
        if not (_is_count(min_interval, 1) and _is_count(max_interval, 1) and min_interval <= max_interval):
            raise ValueError(f"need 1 <= min_interval <= max_interval (the command line's --max-interval), got "
                             f"{shown(min_interval)}, {shown(max_interval)}")
        self.scene_threshold = scene_threshold
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.cut_threshold = cut_threshold
        super().__init__(max_gap_s, scorer)

    def _policy(self, scene_score: float, cut_score: float, frames_since_key: int) -> str:
        if frames_since_key >= self.min_interval:
            if cut_score >= self.cut_threshold:
                return "scene_cut"
            if scene_score >= self.scene_threshold:
                return "scene_change"
        if frames_since_key >= self.max_interval:
            return "max_interval"
        return ""

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scene_threshold": self.scene_threshold, "min_interval": self.min_interval,
                "max_interval": self.max_interval, "cut_threshold": self.cut_threshold}

    def __repr__(self) -> str:
        return f"adaptive:{self.scene_threshold:g}"


class StampGaps:
    """Gaps in a stream's stamps, measured between the messages received, not between the frames
    segmented: the node and ``mpvss bag`` note every message's stamp here and, on a gap, reset the
    engine (reason ``time_gap``) before the next frame they segment; their schedulers' own
    ``max_gap_s`` is off. A node slower than its camera (a large model on a CPU: one frame in 40
    segmented) would otherwise see a gap between any two frames it gets to, and a skipped message
    (undecodable, too large) would make the next one a key frame.

    The gap belongs to the first message after it: a frame segmented meanwhile from before the
    gap (the node's worker still decoding the message that came before it) does not consume it.
    Gaps are kept one by one until taken, so a second gap noted while the first one's message is
    still being decoded does not hide the first (the frame after each is keyed).

    Not thread-safe: the node calls it under its own lock.
    """

    #: Pending gaps kept at most (the oldest dropped first): only the messages in the node's slot
    #: and in its worker's hands are still to be segmented, so a few are ever needed.
    MAX_PENDING = 64

    def __init__(self) -> None:
        self._last: float | None = None
        # pending gaps, oldest first: (stamp of the first message after the gap, stamp of the one before it)
        self._pending: list[tuple[float, float]] = []

    def note(self, stamp: float, max_gap_s: float) -> None:
        """Note a received message's stamp (seconds): more than ``max_gap_s`` after the previous
        one (``math.inf``: never) is a gap, pending until :meth:`take`. A message stamped before a
        pending gap's first one but still more than ``max_gap_s`` after the message before the gap
        (out of order) brings the gap's stamp down to its own; one within ``max_gap_s`` of the
        message before the gap (time went back across it) drops the gap."""
        last, self._last = self._last, stamp
        kept = []
        for first, before in self._pending:
            if stamp >= first:
                kept.append((first, before))
            elif stamp - before > max_gap_s:  # out of order, still after the gap
                kept.append((stamp, before))
        if last is not None and stamp - last > max_gap_s:
            kept.append((stamp, last))
        self._pending = kept[-self.MAX_PENDING:]

    def take(self, stamp: float) -> bool:
        """Whether the frame stamped ``stamp`` (seconds), about to be segmented, comes after a
        pending gap; it then consumes every gap up to it. A frame from before a gap leaves it pending."""
        after = [gap for gap in self._pending if gap[0] > stamp]
        taken = len(after) < len(self._pending)
        self._pending = after
        return taken


def schedule_key_frames(scheduler: KeyFrameScheduler, images: Sequence[np.ndarray], fps: float) -> list[int]:
    """Indices of the key frames ``scheduler`` picks on a clip, from a fresh start (it is reset
    first; frame i is stamped ``i / fps`` seconds).

    Args:
        scheduler: the scheduler (its state is changed).
        images: the clip's frames in order, each (H, W, 3) uint8 RGB.
        fps: the clip's frame rate (frames/s), > 0.

    Returns:
        The key frames' indices into ``images``, ascending.

    Raises:
        ValueError: ``fps`` not a frame rate (:func:`~mpvss_ros.io.video.check_fps`).
    """
    fps = check_fps(fps)
    scheduler.reset()
    return [i for i, image in enumerate(images) if scheduler.decide(image, i / fps).is_key_frame]


def _is_count(value: Any, low: int) -> bool:
    """An integer (not a bool) >= ``low``."""
    return is_integer(value) and value >= low


def parse_schedule(spec: str, max_gap_s: float = 1.0, min_interval: int = 1, max_interval: int = 10,
                   cut_threshold: float = DEFAULT_CUT_THRESHOLD) -> KeyFrameScheduler:
    """Build a scheduler from ``fixed:N``, ``adaptive`` or ``adaptive:THRESHOLD`` (the other
    arguments as :class:`AdaptiveScheduler`: ``max_gap_s`` in seconds, the intervals in frames,
    ``cut_threshold`` a cut score; a fixed schedule uses only ``max_gap_s``).

    Raises:
        ValueError: with the accepted forms, on anything else.
    """
    kind, sep, arg = spec.strip().partition(":")
    arg = arg.strip()
    try:
        if kind == "fixed" and arg:
            try:
                interval = int(arg)
            except ValueError:
                raise ValueError(f"the key-frame interval N of fixed:N must be a whole number of frames, got {arg!r}") from None
            return FixedIntervalScheduler(interval, max_gap_s=max_gap_s)
        if kind == "adaptive" and not (sep and not arg):  # "adaptive:" names no threshold
            try:
                scene_threshold = float(arg) if arg else 0.5
            except ValueError:
                raise ValueError(f"the scene threshold T of adaptive:T must be a number, got {arg!r}") from None
            return AdaptiveScheduler(scene_threshold, min_interval, max_interval, max_gap_s=max_gap_s,
                                     cut_threshold=cut_threshold)
    except ValueError as exc:
        raise ValueError(f"bad schedule {spec!r}: {exc}") from exc
    raise ValueError(f"bad schedule {spec!r}: use fixed:N (N >= 1), adaptive or adaptive:THRESHOLD")
