"""Evaluation on a labelled image sequence, and the MPVSS key-interval study.

``evaluate_sequence`` runs one setting (propagator + schedule) over a sequence treated as video
and reports mIoU, per-class IoU, fwIoU, VC_8, VC_16 and the mean per-frame cost (ms of
``VideoSegmenter.push``, the ``total`` timing).

``key_interval_study`` reproduces the paper's study (MPVSS section 4: accuracy against key-frame
interval) on one clip: fixed intervals for ``copy``, ``optical_flow`` and ``query_flow``, plus the
adaptive schedule tuned to the same key-frame ratios. The adaptive scene threshold is chosen only to
match the *number* of key frames of ``fixed:N`` on the clip (the scheduler does not look at
labels or predictions; when no threshold gives exactly that number, the closest below it), so the
adaptive schedule never runs the segmentor more often than the fixed one it is compared with.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from ..io.video import read_label_png
from ..model_loader import LoadedModel
from ..propagation import FLOW_PROPAGATORS, CopyPropagator, Propagator, build_propagator
from ..scheduling import (DEFAULT_CUT_THRESHOLD, AdaptiveScheduler, FixedIntervalScheduler, KeyFrameScheduler,
                          SceneScorer, parse_schedule, schedule_key_frames)
from ..segmenter import VideoSegmenter
from ..values import is_integer, shown
from .bootstrap import paired_miou_difference
from .metrics import IGNORE_INDEX, ConfusionMatrix, VideoConsistency, class_counts

__all__ = ["LabelledSequence", "load_sequence", "self_labelled_sequence", "evaluate_sequence", "match_scene_threshold",
           "key_interval_study", "plot_study", "row_label", "comparison_label"]


@dataclass
class LabelledSequence:
    """Frames of one clip with their label maps, in time order.

    Attributes:
        names: file stems.
        images: (H, W, 3) uint8 RGB frames.
        labels: (H, W) integer label maps (void kept as is: values >= K are ignored).
        fps: frame rate used for the stamps (frames/s).
        vc_labels: the label maps as the files hold them, when ``labels`` were remapped
            (``reduce_zero_label``), else None. VC_n compares raw ground truth between frames
            (spec §4.3); the remapping merges "others" (0) with the ignore value.
    """

    names: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray]
    fps: float
    vc_labels: list[np.ndarray] | None = None


#: Frame rate (frames/s) of an image folder under evaluation unless one is given: the CamVid clips'.
FOLDER_FPS = 15.0


def _open_frames(path: str | Path, fps: float | None) -> Any:
    """:func:`~mpvss_ros.io.video.open_source` with the evaluation's default rate: a folder's
    :data:`FOLDER_FPS`, a video's own (``fps`` None)."""
    from ..io.video import open_source

    if fps is None and Path(path).expanduser().is_dir():
        fps = FOLDER_FPS
    return open_source(path, fps=fps)


def reduced_zero_label(label: np.ndarray) -> np.ndarray:
    """mmsegmentation's ``reduce_zero_label`` (VSPW, ADE20K): 0 ("others") -> 255 (ignored),
    v -> v - 1 for every other value but 255, which stays 255.

    Args:
        label: (H, W) uint8 or uint16 class IDs numbered from 1.

    Returns:
        (H, W) array of the same dtype.
    """
    out = label.copy()
    out[(label != 0) & (label != IGNORE_INDEX)] -= 1
    out[label == 0] = IGNORE_INDEX
    return out


def load_sequence(image_dir: str | Path, label_dir: str | Path, fps: float | None = None,
                  limit: int | None = None, num_classes: int | None = None,
                  reduce_zero_label: bool = False) -> LabelledSequence:
    """Load a folder of frames and the folder of same-named label PNGs.

    Args:
        image_dir: folder of frames (or a video file; frames named ``000000``, ...).
        label_dir: folder of single-channel label PNGs named like the frames (8- or 16-bit class IDs).
        fps: frame rate for the stamps (frames/s); None: a video's own, a folder's
            :data:`FOLDER_FPS`.
        limit: load only the first ``limit`` frames (None: all).
        num_classes: the model's class count K. When given, every label value must be a class
            (0..K-1), the void value right after the classes (K, CamVid's 11 for 11 classes) or
            the ignore value 255, and the labels together must count at least one pixel (a value
            in 0..K-1). None: the values are not checked (values >= K are ignored when scoring).
        reduce_zero_label: labels that number the classes from 1 with 0 for "others" (VSPW's
            PNGs; mmsegmentation's ``reduce_zero_label``, :func:`reduced_zero_label`). Applied
            before the check of ``num_classes``.

    Raises:
        FileNotFoundError: a folder or a frame's label file is missing.
        ValueError: ``reduce_zero_label`` with more than 254 classes (the shifted IDs 254 and 255
            would meet the ignore value 255).
        ValueError: no frames; a frame of another size than the first frame; a label of another
            size than its frame; with ``num_classes``, a label holding other values (the error
            names the file and the first of them), or labels that are void everywhere.
    """
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder not found: {label_dir}")
    if num_classes is not None and not (is_integer(num_classes) and num_classes >= 1):
        raise ValueError(f"num_classes must be an integer >= 1, got {shown(num_classes)}")
    if reduce_zero_label and num_classes is not None and int(num_classes) > IGNORE_INDEX - 1:
        raise ValueError(f"reduce_zero_label with {num_classes} classes: the shifted class IDs 254 and 255 would "
                         f"be scored as the ignore value {IGNORE_INDEX}")
    names, images, labels, raw_labels = [], [], [], []
    counted = 0  # label pixels with a class value (0..K-1)
    first: tuple[str, tuple[int, ...]] | None = None  # the first frame's file and (H, W)
    with _open_frames(image_dir, fps) as source:
        fps = source.fps
        for frame in source:
            if limit is not None and len(names) >= limit:
                break
            hw = frame.image.shape[:2]
            where = _frame_file(source, frame)
            if first is None:
                first = (where, hw)
            elif hw != first[1]:
                raise ValueError(f"frame {where} is {hw[1]}x{hw[0]}, the first frame {first[0]} is "
                                 f"{first[1][1]}x{first[1][0]}: the frames of a sequence must have one size")
            path = label_dir / f"{frame.name}.png"
            if not path.is_file():
                raise FileNotFoundError(f"no label for frame {frame.name}: {path}")
            label = read_label_png(path)
            if label.shape != hw:
                raise ValueError(f"label {path} is {label.shape}, frame is {hw}")
            if num_classes is not None:  # the file's own values, so that an error names what it holds
                counted += _check_label_values(label, int(num_classes), path, first_class=int(reduce_zero_label))
            if reduce_zero_label:
                raw_labels.append(label)
                label = reduced_zero_label(label)
            names.append(frame.name)
            images.append(frame.image)
            labels.append(label)
    if not names:
        raise ValueError(f"no frames in {image_dir}")
    if num_classes is not None and counted == 0:
        raise ValueError(f"the {len(names)} labels in {label_dir} count no pixel: every pixel is void "
                         f"({num_classes}) or ignored (255), so there is nothing to score")
    return LabelledSequence(names, images, labels, fps, vc_labels=raw_labels if reduce_zero_label else None)


def self_labelled_sequence(loaded: LoadedModel, source: str | Path, fps: float | None = None, limit: int | None = None,
                           backend: Any = None, progress: bool = False) -> LabelledSequence:
    """Frames of an unlabelled video (or image folder) labelled by the model itself, every frame a
    key frame: the reference for scoring propagation and key-frame schedules where no ground truth
    exists. mIoU against it says how much of the per-frame segmentation a setting keeps (100 =
    identical labels), not how accurate either is.

    Args:
        loaded: the model (its labels become the reference).
        source: video file or image folder (:func:`~mpvss_ros.io.video.open_source`).
        fps: frame rate for the stamps (frames/s); None: a video's own, a folder's
            :data:`FOLDER_FPS`.
        limit: the first ``limit`` frames only (None: all).
        backend: inference backend to run instead of ``loaded.model`` (as :func:`evaluate_sequence`).
        progress: show a progress bar.

    Raises:
        FileNotFoundError / ValueError: as :func:`~mpvss_ros.io.video.open_source`; no frames.
    """
    model = backend if backend is not None else loaded.model
    segmenter = VideoSegmenter(model, CopyPropagator(), FixedIntervalScheduler(1, max_gap_s=math.inf),
                               device=loaded.device)
    names, images, labels = [], [], []
    with _open_frames(source, fps) as frames:
        fps = frames.fps
        for frame in tqdm(frames, disable=not progress, desc="per-frame reference", leave=False):
            if limit is not None and len(names) >= limit:
                break
            names.append(frame.name)
            images.append(frame.image)
            labels.append(segmenter.push(frame.image, frame.stamp).labels)
    if not names:
        raise ValueError(f"no frames in {source}")
    return LabelledSequence(names, images, labels, fps)



def _frame_file(source: Any, frame: Any) -> str:
    """The file a frame came from (an image folder's file; a video's path and frame name)."""
    files = getattr(source, "files", None)
    if files is not None and 0 <= frame.index < len(files):
        return str(files[frame.index])
    return f"{source.path} (frame {frame.name})"


def _check_label_values(label: np.ndarray, num_classes: int, path: Path, first_class: int = 0) -> int:
    """Count the class pixels of one label map after checking its values.

    Args:
        label: (H, W) uint8 or uint16 class IDs as the file holds them.
        num_classes: the model's class count K.
        path: the file, for the error message.
        first_class: the ID of the first class: 0, or 1 for labels read with ``reduce_zero_label``
            (0 = "others", ignored).

    Returns:
        The number of pixels holding a class (first_class .. first_class + K - 1).

    Raises:
        ValueError: a value other than the classes, the void value right after them and the ignore
            value 255 (and 0 with ``first_class`` 1); the message names ``path`` and the first (up to
            5) such values.
    """
    last = first_class + num_classes - 1
    counts = np.bincount(label.ravel(), minlength=max(last + 2, IGNORE_INDEX + 1))
    allowed = np.zeros(counts.size, dtype=bool)
    allowed[: last + 2] = True  # 0 (a class, or "others" under reduce_zero_label), the classes and void
    allowed[IGNORE_INDEX] = True
    bad = np.flatnonzero((counts > 0) & ~allowed)
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:5]) + (f", ... ({bad.size} distinct)" if bad.size > 5 else "")
        others = " (reduce_zero_label; 0 = others, ignored)" if first_class else ""
        raise ValueError(f"label {path} holds value(s) {shown} ({int(counts[bad].sum())} pixels) outside the model's "
                         f"{num_classes} classes {first_class}..{last}{others}, void {last + 1} and ignore "
                         f"{IGNORE_INDEX}: labels of another class set?")
    return int(counts[first_class: last + 1].sum())


def evaluate_sequence(loaded: LoadedModel, seq: LabelledSequence, propagator: str | Propagator,
                      scheduler: KeyFrameScheduler | str, progress: bool = False, backend: Any = None,
                      optical_flow_preset: str = "fast", optical_flow_scale: float = 0.5,
                      chain_flow: bool = True) -> dict[str, Any]:
    """Segment ``seq`` as one video and score it (on ``backend``, an inference backend of
    :mod:`mpvss_ros.runtime`, when given; else on ``loaded.model``).

    ``propagator`` is a name of :data:`~mpvss_ros.propagation.PROPAGATORS` or a ready
    :class:`~mpvss_ros.propagation.Propagator` (a variant under study); the result's
    ``"propagator"`` is its name. ``optical_flow_preset`` / ``optical_flow_scale`` configure a
    named ``optical_flow``, ``chain_flow`` a named ``query_flow`` or ``optical_flow``
    (:func:`~mpvss_ros.propagation.build_propagator`).

    Returns:
        ``{"mIoU", "fwIoU", "pACC", "mACC", "IoU" (per class), "VC_8", "VC_16"`` (percent),
        ``"key_frames", "key_frame_ratio", "mean_ms_per_frame", "median_ms_key_frame",
        "median_ms_non_key_frame", "cost_ratio_within_run", "propagator", "propagator_settings",
        "schedule", "schedule_settings"}``. Times are wall-clock ms of ``VideoSegmenter.push``,
        after the first two frames were run once untimed (warm-up; they are then timed and scored
        as every other frame).
        ``cost_ratio_within_run`` is the schedule's cost relative to per-frame mode estimated from
        this run alone: ``(key frames x median key-frame ms + other frames x median non-key ms)
        / (frames x median key-frame ms)`` (1.0 when every frame is a key frame; None without a key
        frame). Unlike a ratio of two runs' means it does not move with the machine's speed between
        runs: on 2 shared CPU cores the per-frame mean has differed by 19 % from the key frames of
        the interval-5 run of the same study (``docs/experiment_log.md``, "Cost on an Intel machine").
    """
    return _evaluate(loaded, seq, propagator, scheduler, progress, backend, optical_flow_preset, optical_flow_scale,
                     chain_flow)[0]


def _evaluate(loaded: LoadedModel, seq: LabelledSequence, propagator: str | Propagator,
              scheduler: KeyFrameScheduler | str, progress: bool, backend: Any, optical_flow_preset: str,
              optical_flow_scale: float, chain_flow: bool) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`evaluate_sequence`, and its per-frame class counts (T, 3, K) int64 (TP, GT, Pred:
    :func:`~mpvss_ros.evaluation.metrics.class_counts`), what the bootstrap resamples."""
    cfg = loaded.config
    # the sequence's stamps are frame index / fps: no time-gap key frames (fps < 1 would key every frame)
    sched = parse_schedule(scheduler, max_gap_s=math.inf) if isinstance(scheduler, str) else scheduler
    model = backend if backend is not None else loaded.model
    prop = (build_propagator(propagator, model, optical_flow_preset, optical_flow_scale, chain_flow)
            if isinstance(propagator, str) else propagator)
    _warm_up(model, prop, seq, loaded.device)
    segmenter = VideoSegmenter(model, prop, sched, device=loaded.device)
    vcs = {n: VideoConsistency(n) for n in (8, 16)}
    vc_labels = seq.labels if seq.vc_labels is None else seq.vc_labels  # raw ground truth (spec §4.3)
    conf = ConfusionMatrix(cfg.num_classes)  # the clip's: the sum of its frames'
    times, key_times, non_key_times, keys, frame_counts = [], [], [], 0, []
    for i in tqdm(range(len(seq.images)), disable=not progress, desc=f"{prop.name} {sched!r}", leave=False):
        result = segmenter.push(seq.images[i], i / seq.fps)
        frame = ConfusionMatrix(cfg.num_classes)
        frame.update(result.labels, seq.labels[i])
        conf.merge(frame)
        frame_counts.append(class_counts(frame.mat))
        for vc in vcs.values():
            vc.update(result.labels, vc_labels[i])
        total = result.stage_latency_ms["total"]
        times.append(total)
        (key_times if result.is_key_frame else non_key_times).append(total)
        keys += int(result.is_key_frame)
    out = conf.summary(cfg.class_names)
    out.update({
        "VC_8": _pct(vcs[8].value()),
        "VC_16": _pct(vcs[16].value()),
        "propagator": prop.name,
        "propagator_settings": prop.describe(),
        "schedule": repr(sched),
        "schedule_settings": sched.describe(),
        "frames": len(times),
        "key_frames": keys,
        "key_frame_ratio": keys / len(times),
        "mean_ms_per_frame": float(np.mean(times)),
        "median_ms_key_frame": float(np.median(key_times)) if key_times else None,
        "median_ms_non_key_frame": float(np.median(non_key_times)) if non_key_times else None,
        "cost_ratio_within_run": _cost_ratio_within_run(key_times, non_key_times),
    })
    return out, np.stack(frame_counts)


def _warm_up(model: Any, prop: Propagator, seq: LabelledSequence, device: Any) -> None:
    """Push the first two frames once, untimed, through a throwaway segmenter (a key frame and a
    propagated one): the first call of each network in a process (oneDNN kernel selection, first
    allocations) was counted in the first row's times: the study's per-frame row, whose mean is
    the denominator of every cost ratio, runs first (a first and a second per-frame run over 30
    val frames in one process: 70.1 and 64.7 ms per frame; ad-hoc check). The propagator
    restarts at the timed run's first key frame."""
    warm = VideoSegmenter(model, prop, FixedIntervalScheduler(2, max_gap_s=math.inf), device=device)
    for i in range(min(2, len(seq.images))):
        warm.push(seq.images[i], i / seq.fps)


def _cost_ratio_within_run(key_times: Sequence[float], non_key_times: Sequence[float]) -> float | None:
    """Mean cost per frame over the median key-frame cost, from medians of one run (see
    :func:`evaluate_sequence`); None without a key frame."""
    if not key_times:
        return None
    key = float(np.median(key_times))
    non_key = float(np.median(non_key_times)) if non_key_times else 0.0
    return (len(key_times) * key + len(non_key_times) * non_key) / ((len(key_times) + len(non_key_times)) * key)


def _pct(v: float) -> float | None:
    return None if not math.isfinite(v) else round(100.0 * v, 4)


def _count_key_frames(images: Sequence[np.ndarray], fps: float, scene_threshold: float, max_interval: int,
                      cut_threshold: float = DEFAULT_CUT_THRESHOLD) -> int:
    sched = AdaptiveScheduler(scene_threshold=scene_threshold, max_interval=max_interval, max_gap_s=math.inf,
                              cut_threshold=cut_threshold)
    return len(schedule_key_frames(sched, images, fps))


def match_scene_threshold(images: Sequence[np.ndarray], fps: float, target_key_frames: int,
                             max_interval: int, cut_threshold: float = DEFAULT_CUT_THRESHOLD) -> tuple[float, int]:
    """The scene threshold whose adaptive schedule (with ``max_interval`` and ``cut_threshold`` as
    :class:`AdaptiveScheduler`) makes the key-frame count closest to the target without exceeding it.

    Searches a log-spaced grid of scene thresholds (0.01 .. 3, doubled beyond while every count
    is above the target, up to the highest scene score ``max_interval`` allows), then bisects (in log space) between
    the grid's thresholds that bracket the target, since a coarse grid can step over the exact
    count. Of the thresholds tried, it takes the one whose count is closest to the target from
    below (the lowest such threshold on ties), so the adaptive schedule never gets more segmentor
    runs than the fixed one it is compared with; only when every threshold gives more (a target
    below the ``max_interval`` minimum) does it take the smallest count above.

    Args:
        images: the clip's frames in order, each (H, W, 3) uint8 RGB.
        fps: the clip's frame rate (frames/s); frame i is stamped ``i / fps`` seconds.
        target_key_frames: the key-frame count to match (e.g. that of ``fixed:N``).
        max_interval: the adaptive schedule's ``max_interval``, in frames.
        cut_threshold: the adaptive schedule's hard-cut threshold, a cut score (unitless, see
            :mod:`mpvss_ros.scheduling`).

    Returns:
        (scene_threshold, key frames it gives): the scene threshold (a scene score, unitless) and
        the count.

    Raises:
        ValueError: a ``cut_threshold`` <= 0 or not finite, or ``max_interval`` < 1 (from
            :class:`~mpvss_ros.scheduling.AdaptiveScheduler`).
    """
    tried: dict[float, int] = {}

    def count(t: float) -> int:
        if t not in tried:
            tried[t] = _count_key_frames(images, fps, t, max_interval, cut_threshold)
        return tried[t]

    grid = [float(t) for t in np.geomspace(0.01, 3.0, 60)]
    counts = [count(t) for t in grid]
    # steady fast motion: the drift integrated since the key frame scores above the grid's top, up
    # to max_interval / pixel_scale (every frame a full change); double the threshold up to there
    reachable = max_interval / SceneScorer().pixel_scale + 1.0
    while counts[-1] > target_key_frames and grid[-1] < reachable:
        grid.append(min(2.0 * grid[-1], reachable))
        counts.append(count(grid[-1]))
    # the count falls as the scene threshold rises: bisect between the last grid point above the target
    # and the first at or below it
    above = [t for t, n in zip(grid, counts) if n > target_key_frames]
    below = [t for t, n in zip(grid, counts) if n <= target_key_frames]
    if above and below and max(above) < min(below):
        lo, hi = max(above), min(below)
        for _ in range(30):
            mid = math.sqrt(lo * hi)
            if count(mid) > target_key_frames:
                lo = mid
            else:
                hi = mid
            if count(hi) == target_key_frames:
                break
    # closest from below: never more segmentor runs than the target, unless no threshold gets that low
    within = {t: n for t, n in tried.items() if n <= target_key_frames} or tried
    return min(within.items(), key=lambda tn: (abs(tn[1] - target_key_frames), tn[0]))


def key_interval_study(loaded: LoadedModel, seq: LabelledSequence, intervals: Sequence[int] = (1, 2, 3, 5, 10),
                       propagators: Sequence[str] = ("copy", "optical_flow", "query_flow"),
                       adaptive: bool = True, progress: bool = True, backend: Any = None,
                       optical_flow_preset: str = "fast", optical_flow_scale: float = 0.5,
                       cut_threshold: float = DEFAULT_CUT_THRESHOLD,
                       chain_flow_modes: Sequence[bool] = (False, True), bootstrap_block: int = 10,
                       bootstrap_samples: int = 2000) -> dict[str, Any]:
    """The key-interval study: every propagator at every fixed interval, plus adaptive
    (``backend``, ``optical_flow_preset``, ``optical_flow_scale``: as :func:`evaluate_sequence`).

    The flow propagators (``query_flow``, ``optical_flow``) run once per ``chain_flow_modes``
    entry: False is the paper's direct flow to the key frame, True the chained flow
    (:mod:`mpvss_ros.propagation`); ``copy`` runs once. Each row's ``"chain_flow"`` says which
    (None for ``copy`` and per-frame); :func:`row_label` names a row.

    For interval N > 1 the adaptive schedule (``max_interval`` = 2N, ``cut_threshold`` as
    :class:`AdaptiveScheduler`) gets the scene threshold that matches the key-frame count
    of ``fixed:N`` on this clip (:func:`match_scene_threshold`).

    The comparisons the study's verdicts rest on get a paired circular-block-bootstrap interval
    (:func:`~mpvss_ros.evaluation.bootstrap.paired_miou_difference`, blocks of
    ``bootstrap_block`` frames, ``bootstrap_samples`` resamples, 95 % for each comparison on its
    own; no interval on a clip shorter than two blocks, T < 2L), at every interval N > 1: each
    ``query_flow`` row (fixed) against per-frame, ``copy``, the paper's direct ``optical_flow``
    and the ``optical_flow`` of its own flow mode at N; and every adaptive row against the fixed
    row of the same setting.

    Raises:
        ValueError: on a ``cut_threshold`` <= 0 or not finite; ``bootstrap_block`` or
            ``bootstrap_samples`` < 1; ``query_flow`` among the propagators of a model or backend
            without a trained motion module (all before the first row).

    Returns:
        ``{"rows": [evaluate_sequence(...) + {"interval": N, "mode": "fixed"|"adaptive",
        "scene_threshold": T, "cost_ratio": R}], "comparisons": [{"interval": N, "a": label, "b": label,
        "key_frames": [A's, B's]} + paired_miou_difference(...)], "frames": T, "fps": ...}``, where ``cost_ratio`` is the
        row's mean ms per frame over the per-frame row's (two runs; None without interval 1 in
        ``intervals``); each row's ``cost_ratio_within_run`` estimates the same from its own run;
        labels are :func:`comparison_label`.
    """
    if adaptive:  # a bad cut threshold fails before the first (slow) row, not after
        AdaptiveScheduler(cut_threshold=cut_threshold)
    if bootstrap_block < 1 or bootstrap_samples < 1:  # likewise
        raise ValueError(f"bootstrap_block and bootstrap_samples must be >= 1, got {bootstrap_block} and "
                         f"{bootstrap_samples}")
    rows: list[dict[str, Any]] = []
    frame_counts: list[np.ndarray] = []  # per row, (T, 3, K)
    per_frame, per_frame_counts = None, None
    flow_opts = {"optical_flow_preset": optical_flow_preset, "optical_flow_scale": optical_flow_scale}
    if not chain_flow_modes:
        raise ValueError("chain_flow_modes must hold at least one of False, True")
    if "query_flow" in propagators:  # refused at its first row otherwise, after the others' rows
        target = backend if backend is not None else loaded.model
        if not getattr(target, "motion_trained", True):
            raise ValueError("the study's query_flow rows need a trained motion module, and these weights hold none "
                             "(a per-frame or stage-1 checkpoint): leave query_flow out of the propagators")
    settings = [(prop, chain if prop in FLOW_PROPAGATORS else None)
                for prop in propagators for chain in (chain_flow_modes if prop in FLOW_PROPAGATORS else (None,))]
    for n in intervals:
        for prop, chain in settings:
            if n == 1 and per_frame is not None:  # per-frame: the propagator never runs
                rows.append({**per_frame, "propagator": prop, "chain_flow": chain})
                frame_counts.append(per_frame_counts)
                continue
            r, fc = _evaluate(loaded, seq, prop, f"fixed:{n}", progress, backend, chain_flow=bool(chain), **flow_opts)
            r.update(interval=n, mode="fixed", scene_threshold=None, chain_flow=chain)
            rows.append(r)
            frame_counts.append(fc)
            if n == 1:
                r["propagator_settings"] = None  # every frame is a key frame: no propagator runs
                per_frame, per_frame_counts = r, fc
        if adaptive and n > 1:
            target = math.ceil(len(seq.images) / n)  # fixed:N's key frames 0, N, 2N, ...
            max_interval = 2 * n
            scene_threshold, count = match_scene_threshold(seq.images, seq.fps, target, max_interval=max_interval,
                                                           cut_threshold=cut_threshold)
            for prop, chain in settings:
                sched = AdaptiveScheduler(scene_threshold=scene_threshold, max_interval=max_interval,
                                          max_gap_s=math.inf, cut_threshold=cut_threshold)
                r, fc = _evaluate(loaded, seq, prop, sched, progress, backend, chain_flow=bool(chain), **flow_opts)
                r.update(interval=n, mode="adaptive", scene_threshold=scene_threshold, target_key_frames=target,
                         chain_flow=chain)
                rows.append(r)
                frame_counts.append(fc)
    for r in rows:
        r["cost_ratio"] = r["mean_ms_per_frame"] / per_frame["mean_ms_per_frame"] if per_frame else None
    comparisons = []
    for i, j in _compared_rows(rows):
        comparisons.append({"interval": rows[i]["interval"], "a": comparison_label(rows[i]),
                            "b": comparison_label(rows[j]),
                            # adaptive against fixed is a fair comparison only at the same key-frame count
                            "key_frames": [rows[i]["key_frames"], rows[j]["key_frames"]],
                            **paired_miou_difference(frame_counts[i], frame_counts[j], bootstrap_block,
                                                     bootstrap_samples)})
    return {"frames": len(seq.images), "fps": seq.fps, **loaded.provenance(backend), "optical_flow": flow_opts,
            "rows": rows, "comparisons": comparisons}


def _compared_rows(rows: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """(A, B) row indices of the study's comparisons (:func:`key_interval_study`)."""
    fixed = {(r["interval"], r["propagator"], r["chain_flow"]): i for i, r in enumerate(rows) if r["mode"] == "fixed"}
    per_frame = next((i for (n, _, _), i in fixed.items() if n == 1), None)
    pairs = []
    for (n, prop, chain), i in fixed.items():
        if n == 1 or prop != "query_flow":
            continue
        if per_frame is not None:
            pairs.append((i, per_frame))
        pairs += [(i, j) for (m, other, other_chain), j in fixed.items()
                  if m == n and (other == "copy" or (other == "optical_flow" and other_chain in (False, chain)))]
    for i, r in enumerate(rows):
        if r["mode"] == "adaptive":
            pairs.append((i, fixed[(r["interval"], r["propagator"], r["chain_flow"])]))
    return pairs


def comparison_label(row: dict[str, Any]) -> str:
    """A study row named for a comparison: ``per-frame``, else its mode, interval and
    :func:`row_label`, e.g. ``fixed 1/5 query_flow (chained)``."""
    if row["interval"] == 1:
        return "per-frame"
    return f"{row['mode']} 1/{row['interval']} {row_label(row)}"


def row_label(row: dict[str, Any]) -> str:
    """A study row's propagator with its flow mode: ``copy``, ``query_flow (direct)``,
    ``query_flow (chained)``; rows without ``chain_flow`` (older studies) give the bare name."""
    chain = row.get("chain_flow")
    return row["propagator"] if chain is None else f"{row['propagator']} ({'chained' if chain else 'direct'})"


def plot_study(study: dict[str, Any], path: str | Path) -> None:
    """Write the study's PNG: mIoU against key interval, and mIoU against mean per-frame cost (one
    line per propagator, flow mode and schedule; a setting with one row is one marker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {"copy": "tab:gray", "optical_flow": "tab:blue", "query_flow": "tab:red"}
    # chained flow in full colour, the paper's direct flow paler
    flow_modes = {None: 1.0, True: 1.0, False: 0.45}
    for prop, colour in colours.items():
        for chain, alpha in flow_modes.items():
            for mode, style in (("fixed", "-o"), ("adaptive", "--s")):
                mine = [r for r in study["rows"] if r["propagator"] == prop and r.get("chain_flow") == chain]
                rows = sorted((r for r in mine if r["mode"] == mode), key=lambda r: r["interval"])
                if mode == "adaptive" and rows:  # start the adaptive line at per-frame for readability
                    rows = [r for r in mine if r["interval"] == 1] + rows
                if not rows:  # one row is a marker of its own (a study of one interval)
                    continue
                x = [1.0 / r["key_frame_ratio"] for r in rows]
                y = [r["mIoU"] for r in rows]
                label = f"{row_label(rows[-1])}, {mode}"
                ax1.plot(x, y, style, color=colour, alpha=alpha, label=label)
                ax2.plot([r["mean_ms_per_frame"] for r in rows], y, style, color=colour, alpha=alpha, label=label)
    ax1.set_xlabel("frames per key frame (1 / key-frame ratio)")
    ax1.set_ylabel("mIoU (%)")
    ax1.set_title(f"{study['model']}: mIoU vs key interval ({study['frames']} frames, {study['fps']:g} fps)")
    backend = study.get("backend") or {}
    ax2.set_xlabel(f"mean cost per frame (ms; {backend.get('backend', '?')} on {backend.get('device', '?')})")
    ax2.set_ylabel("mIoU (%)")
    ax2.set_title("mIoU vs mean per-frame cost")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented, strictly valid JSON: NaN and infinities become null."""
    Path(path).write_text(json.dumps(_finite_or_none(obj), indent=2, allow_nan=False) + "\n")
