"""Offline segmentation of a video file or an image folder (``mpvss segment``).

Writes into ``out_dir``:

* ``labels/<name>.png``: single-channel class IDs at the input resolution (8-bit, or 16-bit when
  there are more than 255 classes); ``<name>`` is the image's stem, or the zero-padded frame
  index for video;
* ``overlay.mp4``: the input with the colour labels blended in, a legend and a ``key frame`` /
  ``propagated +N`` tag (when enabled);
* ``frames.jsonl``: one JSON object per frame (:meth:`SegmentationResult.to_record`);
* ``summary.json``: the run's settings, key-frame ratio, per-stage timing statistics (ms) and
  the share of pixels per class.

A run replaces the outputs of an earlier run in the same folder (so that labels of two runs never
mix), refuses a folder whose ``labels/`` holds PNGs, or that holds an ``overlay.mp4``, that no run
wrote, and refuses to write over its own input. The overlay video is a by-product: frames are
padded to even sizes for the codec, its frame rate is kept within 1-240 fps, and when it cannot
be written the run goes on without it (logged; ``summary["overlay"]`` is then None).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import cv2
import numpy as np
from tqdm import tqdm

from .checkpoints import first_line
from .io import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_limit
from .io.video import VideoWriter, check_fps, open_source, write_label_png
from .model_loader import LoadedModel
from .paths import check_output_dir, make_output_dir
from .propagation import build_propagator
from .scheduling import DEFAULT_CUT_THRESHOLD, parse_schedule
from .segmenter import NonFiniteOutputError, SegmentationResult, VideoSegmenter
from .viz import frame_tag, make_palette, overlay

__all__ = ["EngineOptions", "RunStats", "SegmentOptions", "check_frame_limits", "check_out_dir", "segment_path"]

log = logging.getLogger(__name__)

#: The files a run writes besides ``labels/``.
RUN_FILES = ("frames.jsonl", "summary.json", "overlay.mp4")
#: Frame rates the overlay video is written at (frames/s); the stamps keep the input's.
OVERLAY_FPS_RANGE = (1.0, 240.0)
#: Largest side of ``overlay.mp4`` in pixels: OpenCV's mp4v writer does not open at 8192 (8190
#: opens; an odd side is encoded one pixel larger); larger frames are scaled down to it.
OVERLAY_MAX_SIDE = 8190


def check_out_dir(input_path: str | Path, out: str | Path) -> None:
    """Refuse an output folder a run must not write to (``mpvss segment`` checks it before it
    loads the model, :func:`segment_path` again before writing).

    Raises:
        ValueError: the run would write over its input (the input is one of the output files,
            or lies in ``out/labels``), or ``out/labels`` holds PNGs or ``out`` an ``overlay.mp4``
            but ``out`` has no earlier run's ``frames.jsonl``/``summary.json`` (they may be
            someone's data).
    """
    src = Path(input_path).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    labels = out / "labels"
    check_output_dir(out, "--out")
    if src in [out / name for name in RUN_FILES] or src == labels or labels in src.parents:
        raise ValueError(f"--out {out} would write over the input {src}: choose another output folder")
    earlier = [out / name for name in RUN_FILES[:2] if (out / name).exists()]
    pngs = sorted(labels.glob("*.png")) if labels.is_dir() else []
    if pngs and not earlier:
        raise ValueError(f"{labels} already holds {len(pngs)} PNG files that no mpvss segment run wrote "
                         f"(no frames.jsonl or summary.json beside it): choose another output folder")
    if (out / "overlay.mp4").exists() and not earlier:  # someone's video, which the run would delete
        raise ValueError(f"{out / 'overlay.mp4'} exists and no mpvss segment run wrote it (no frames.jsonl or "
                         f"summary.json beside it): choose another output folder")


def _prepare_out_dir(input_path: str | Path, out: Path) -> None:
    """Create ``out/labels`` for a run, removing an earlier run's outputs.

    Raises:
        ValueError: see :func:`check_out_dir`.
        OSError: the folder cannot be made (:func:`~mpvss_ros.paths.make_output_dir`).
    """
    check_out_dir(input_path, out)
    out = out.expanduser().resolve()
    labels = make_output_dir(out / "labels", "output folder")
    for path in sorted(labels.glob("*.png")):
        path.unlink()
    # the markers that tell a run's folder (frames.jsonl, summary.json) go last: a stop in between
    # must not leave an overlay.mp4 that check_out_dir then takes for someone else's video
    for name in reversed(RUN_FILES):
        (out / name).unlink(missing_ok=True)


def _open_run_log(input_path: str | Path, out: Path) -> IO[str]:
    """``out/frames.jsonl`` opened for writing, once the folder is prepared (:func:`_prepare_out_dir`)."""
    _prepare_out_dir(input_path, out)
    return open(out / "frames.jsonl", "w")


@contextlib.contextmanager
def terminate_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit(143)`` (128 + 15, the shell's status
    for it) instead of killing the process, so that ``finally`` blocks run: the default action
    left a bag folder that is not a bag (no ``metadata.yaml``, an unfinished ``.db3`` or ``.mcap``)
    and blocked the next run's output path, or an empty ``frames.jsonl`` and an unreadable
    ``overlay.mp4`` beside the labels of ``mpvss segment``. The previous handler is restored after; outside the
    main thread (where Python delivers signals), where SIGTERM is ignored, or where its handler
    was installed by C code (rclpy's: Python can neither call nor restore it), nothing changes.
    A second SIGTERM while the first unwinds is ignored, so that it cannot cut the removal short."""
    current = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if current is None or current is signal.SIG_IGN:
        yield
        return

    def on_term(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one unwinding; restored by the finally below
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _OverlayVideo:
    """``overlay.mp4`` as a by-product: a frame rate within :data:`OVERLAY_FPS_RANGE`, the first
    frame's size kept (later sizes resized; :class:`~mpvss_ros.io.video.VideoWriter` encodes odd
    sizes one pixel larger) and scaled down to :data:`OVERLAY_MAX_SIDE`, and on any write error a
    logged warning after which it stops.

    The ``mp4v`` encoder refuses a time base above 65535: OpenCV passes the rate as a fraction of
    1000 (120.023 fps is 120023/1000), so a rate that cannot be opened is retried at 0.01 fps
    precision (120.02 fps: 6001/50), logged."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = float(min(max(fps, OVERLAY_FPS_RANGE[0]), OVERLAY_FPS_RANGE[1]))
        self.writer: VideoWriter | None = None
        self.failed = False

    def _open(self, vis: np.ndarray) -> VideoWriter:
        h, w = vis.shape[:2]
        scale = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if scale < 1.0:
            log.info("overlay video %s: frames of %dx%d written at %dx%d (the mp4v encoder's limit is %d pixels "
                     "a side)", self.path, w, h, *size, OVERLAY_MAX_SIDE)
        try:
            return VideoWriter(self.path, self.fps, size)
        except OSError:
            rounded = round(self.fps, 2)
            if rounded == self.fps:
                raise
            log.info("overlay video %s: cannot be opened at %g fps; written at %g fps", self.path, self.fps, rounded)
            self.fps = rounded
            return VideoWriter(self.path, self.fps, size)

    def write(self, vis: np.ndarray) -> None:
        if self.failed:
            return
        try:
            if self.writer is None:
                self.writer = self._open(vis)
            if (vis.shape[1], vis.shape[0]) != self.writer.size:  # a resolution change mid-stream, or above the limit
                vis = cv2.resize(vis, self.writer.size, interpolation=cv2.INTER_AREA)
            self.writer.write(vis)
        except (OSError, ValueError, cv2.error) as exc:
            log.warning("cannot write %s (%s); going on without the overlay video", self.path, exc)
            self.failed = True
            self.close()
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    @property
    def written(self) -> bool:
        return self.writer is not None and not self.failed and self.writer.frames_written > 0


@dataclass
class EngineOptions:
    """The engine settings of every offline run (``mpvss segment``, ``mpvss bag``).

    Attributes:
        propagator: ``query_flow``, ``optical_flow`` or ``copy``.
        optical_flow_preset, optical_flow_scale: DIS preset and resolution (relative to the
            canvas) of ``optical_flow`` (:func:`~mpvss_ros.propagation.build_propagator`).
        chain_flow: chained flow for ``query_flow`` / ``optical_flow`` (each frame's flow to the
            previous frame, composed back to the key frame); False = the paper's direct flow.
        schedule: ``fixed:N``, ``adaptive`` or ``adaptive:THRESHOLD``.
        max_interval: adaptive schedule: the longest distance between key frames, in frames (at
            most ``max_interval - 1`` non-key frames lie between two key frames).
        cut_threshold: adaptive schedule: cut score of a hard cut
            (:class:`~mpvss_ros.scheduling.AdaptiveScheduler`).
        max_gap_s: a key frame after a gap of more than this many seconds between stamps;
            1.0 for recorded stamps (bags), infinite for files whose stamps are frame index / fps
            (a frame rate below 1 fps would otherwise make every frame a key frame).
    """

    propagator: str = "query_flow"
    optical_flow_preset: str = "fast"
    optical_flow_scale: float = 0.5
    chain_flow: bool = True
    schedule: str = "fixed:5"
    max_interval: int = 10
    cut_threshold: float = DEFAULT_CUT_THRESHOLD
    max_gap_s: float = 1.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse settings no run can use, naming the option and its flag; run when the options
        are made and again when a run starts (fields may change in between). The engine settings
        themselves are checked by :meth:`build_segmenter`; subclasses check theirs.

        Raises:
            ValueError: a setting out of its range.
        """

    def build_segmenter(self, loaded: LoadedModel, backend: Any = None) -> VideoSegmenter:
        """The :class:`~mpvss_ros.segmenter.VideoSegmenter` of these settings on ``loaded``'s
        device, running ``backend`` (:func:`mpvss_ros.runtime.load_backend`) if given, else
        ``loaded.model``.

        Raises:
            ValueError: a bad schedule, propagator name or propagator setting.
        """
        scheduler = parse_schedule(self.schedule, max_gap_s=self.max_gap_s, max_interval=self.max_interval,
                                   cut_threshold=self.cut_threshold)
        model = backend if backend is not None else loaded.model
        propagator = build_propagator(self.propagator, model, self.optical_flow_preset, self.optical_flow_scale,
                                      self.chain_flow)
        return VideoSegmenter(model, propagator, scheduler, device=loaded.device)

    def run_settings(self, loaded: LoadedModel, segmenter: VideoSegmenter) -> dict[str, Any]:
        """The settings a run summary records: model, weights (for an export folder, the ones it
        was exported from), the export folder run (``onnx_dir``, else None), trained, device,
        backend, propagator and schedule, each with every setting that decides it (JSON-ready)."""
        return {
            **loaded.provenance(segmenter.model),
            "device": str(loaded.device),
            "propagator": self.propagator,
            "propagator_settings": segmenter.propagator.describe(),
            "schedule": self.schedule,
            "schedule_settings": segmenter.scheduler.describe(),
        }


@dataclass
class SegmentOptions(EngineOptions):
    """Settings of one offline run: the engine's (:class:`EngineOptions`) and these.

    Attributes:
        max_gap_s: as :class:`EngineOptions`, here infinite by default (stamps are frame index /
            fps; at a rate below 1 fps a gap of 1 s made every frame a key frame).
        fps: frame rate (frames/s) of the stamps and of ``overlay.mp4``; None = a video file's
            own, 30 for an image folder (:func:`~mpvss_ros.io.video.open_source`).
        max_frames: stop after this many frames (None = all).
        max_image_pixels: largest frame (height x width pixels) segmented, as the node's
            ``max_image_pixels`` and ``mpvss bag --max-image-pixels``; larger ones are skipped,
            logged and listed (``skipped_too_large``), image files measured from the header where
            the format has one (JPEG, PNG), before they are decoded. None: no limit.
        write_overlay: write ``overlay.mp4``.
        write_labels: write ``labels/*.png``.
        progress: show a progress bar.

    Raises:
        ValueError: when made, ``fps`` not a frame rate
            (:func:`~mpvss_ros.io.video.check_fps`), ``max_frames`` or ``max_image_pixels``
            below 1 (:func:`check_frame_limits`).
    """

    max_gap_s: float = math.inf  # a file's stamps are frame index / fps: no real gaps
    fps: float | None = None
    max_frames: int | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    write_overlay: bool = True
    write_labels: bool = True
    progress: bool = True

    def check(self) -> None:
        """As :meth:`EngineOptions.check`: the frame rate and the frame limits
        (:func:`check_frame_limits`)."""
        if self.fps is not None:
            try:
                check_fps(self.fps)
            except ValueError as exc:
                raise ValueError(f"--fps: {exc}") from None
        check_frame_limits(self.max_frames, self.max_image_pixels)


def check_frame_limits(max_frames: int | None, max_image_pixels: int | None) -> None:
    """Refuse the frame limits of an offline run (:class:`SegmentOptions`,
    :class:`~mpvss_ros.ros.bag.BagOptions`), naming the option and its command-line flag.

    Args:
        max_frames: frames (messages) to process at most, >= 1, or None for all.
        max_image_pixels: largest frame (height x width pixels), >= 1, or None for no limit (the
            flag's 0).

    Raises:
        ValueError: either below 1.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames (--max-frames) must be >= 1, got {max_frames}")
    check_pixel_limit(max_image_pixels, "max_image_pixels (None: no limit; --max-image-pixels 0)")


#: Frames the inference backend fails on in a row after which a run stops (``mpvss segment``,
#: ``mpvss bag``): single failures (a size a fixed-shape ``--onnx-dir`` export lacks, a CUDA
#: out-of-memory on one key frame) are skipped, as the node does; a backend that fails on every
#: frame is a set-up error.
MAX_ENGINE_FAILURES_IN_A_ROW = 20


class EngineFailures:
    """The inference backend's failures in a row, for the offline commands.

    Args:
        unit: what is counted, in the error (``frames``, ``messages``).
    """

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.in_a_row = 0

    def failed(self, exc: BaseException, where: str) -> None:
        """Count a failure on ``where`` (a frame or message, named in the error).

        Raises:
            RuntimeError: the :data:`MAX_ENGINE_FAILURES_IN_A_ROW`-th failure in a row.
        """
        self.in_a_row += 1
        if self.in_a_row >= MAX_ENGINE_FAILURES_IN_A_ROW:
            raise RuntimeError(f"the inference backend failed on {self.in_a_row} {self.unit} in a row (the last, "
                               f"{where}: {type(exc).__name__}: {first_line(exc)})") from exc

    def succeeded(self) -> None:
        self.in_a_row = 0


class RunStats:
    """What a run summary (:meth:`summary`) needs of every frame, kept compactly: one float64
    per stage timing and frame, one byte per frame for whether its ``total`` was a key frame's,
    the key-frame reasons and the label pixels per class counted. The offline tools used to hold
    every frame's record
    (:meth:`~mpvss_ros.segmenter.SegmentationResult.to_record`) until the end: at least 464 bytes
    a frame (tracemalloc, copies of ``bikes.mp4`` records), about 50 MB per hour of 30 fps video;
    this holds 43 bytes a frame (the same ad-hoc measurement; docs/experiment_log.md, "Stop 37").

    Args:
        num_classes: K, the classes whose pixels :meth:`add` counts (label values >= K, e.g. 255
            for unlabelled, are not counted).
    """

    def __init__(self, num_classes: int) -> None:
        self.frames = 0
        self.class_pixels = np.zeros(num_classes, dtype=np.int64)  # (K,) pixels per class over the run
        self.key_frame_reasons: Counter[str] = Counter()  # every key frame has a reason
        self._stages: dict[str, array] = {}  # stage -> its ms over the frames that have it
        self._total_is_key = array("b")  # per frame with a "total" timing: 1 for a key frame

    def add(self, record: dict[str, Any], labels: np.ndarray | None = None) -> None:
        """Count one frame's record (``is_key_frame``, ``key_frame_reason``, ``stage_latency_ms``)
        and, when given, its label image's pixels per class (``labels``: (H, W) uint8/uint16 class IDs)."""
        self.frames += 1
        if labels is not None:
            k = self.class_pixels.size
            self.class_pixels += np.bincount(labels.ravel(), minlength=k)[:k]
        key = bool(record["is_key_frame"])
        latency = record["stage_latency_ms"]
        if key:
            self.key_frame_reasons[record["key_frame_reason"]] += 1
        for stage, value in latency.items():
            self._stages.setdefault(stage, array("d")).append(value)
        if "total" in latency:
            self._total_is_key.append(key)

    def __len__(self) -> int:
        return self.frames

    @property
    def key_frames(self) -> int:
        """Key frames added."""
        return sum(self.key_frame_reasons.values())

    def stage_values(self, stage: str) -> np.ndarray:
        """The ms of ``stage`` over the frames that have it, in order (a float64 copy: a view
        would lock the buffer, and the next :meth:`add` would raise ``BufferError``)."""
        return np.array(self._stages.get(stage, array("d")), dtype=np.float64)

    def summary(self) -> dict[str, Any]:
        """Key-frame ratio, timing statistics (ms) and class shares of the frames added.

        Returns:
            ``{"frames", "key_frames", "key_frame_ratio", "key_frame_reasons", "stage_latency_ms": {stage:
            {"median", "mean", "p90" (ms), "count"}}, "median_total_ms_key_frame",
            "median_total_ms_non_key_frame" (ms, None without such frames), "class_pixel_share":
            {class id: fraction in [0, 1]} (classes with pixels only)}``.
        """
        n = self.frames
        timing = {}
        for stage in sorted(self._stages):
            vals = self.stage_values(stage)
            timing[stage] = {"median": float(np.median(vals)), "mean": float(vals.mean()), "p90": float(np.percentile(vals, 90)), "count": int(vals.size)}
        share = self.class_pixels / max(int(self.class_pixels.sum()), 1)
        totals, is_key = self.stage_values("total"), np.array(self._total_is_key, dtype=bool)
        return {
            "frames": n,
            "key_frames": self.key_frames,
            "key_frame_ratio": self.key_frames / n if n else 0.0,
            "key_frame_reasons": {reason: self.key_frame_reasons[reason] for reason in sorted(self.key_frame_reasons)},
            "stage_latency_ms": timing,
            "median_total_ms_key_frame": float(np.median(totals[is_key])) if is_key.any() else None,
            "median_total_ms_non_key_frame": float(np.median(totals[~is_key])) if (~is_key).any() else None,
            "class_pixel_share": {int(c): round(float(s), 6) for c, s in enumerate(share) if s > 0},
        }


def segment_path(input_path: str | Path, out_dir: str | Path, loaded: LoadedModel, options: SegmentOptions,
                 on_result: Callable[[SegmentationResult], None] | None = None, backend: Any = None) -> dict[str, Any]:
    """Segment every frame of ``input_path`` and write the outputs (see the module docstring).

    Args:
        input_path: a video file or a folder of images (sorted by file name).
        out_dir: output folder (created).
        loaded: the model (:func:`~mpvss_ros.model_loader.load_model`).
        options: run settings.
        on_result: called with every result (tests, custom sinks).
        backend: an inference backend (:func:`mpvss_ros.runtime.load_backend`) to run instead
            of ``loaded.model``.

    Returns:
        The summary dict also written to ``summary.json``.

    Frames whose logits are NaN or infinite, or that the backend fails on, are logged and
    skipped (``skipped_non_finite``, ``skipped_engine`` in the summary; the overlay video shows
    the frame itself). Input frames that cannot be read, or have more than
    ``options.max_image_pixels`` pixels, are logged and skipped before segmentation
    (``skipped_unreadable``, ``skipped_too_large``; not in the overlay video).

    Raises:
        FileNotFoundError: missing input. ValueError: unreadable video, empty folder, bad
        schedule or propagator name, ``max_frames`` or ``max_image_pixels`` below 1, no frame
        segmented. RuntimeError: the backend failed on
        :data:`MAX_ENGINE_FAILURES_IN_A_ROW` frames in a row. OSError: the output folder cannot
        be made or written (e.g. a full disk; ``summary.json`` is then not left behind).
    """
    options.check()  # again: the fields may have changed since the options were made
    cfg = loaded.config
    segmenter = options.build_segmenter(loaded, backend)
    palette = make_palette(cfg.num_classes, cfg.palette or None)
    out = Path(out_dir)
    check_out_dir(input_path, out)
    # the output folder is prepared at the input's first frame (below): an input refused when
    # opened (an empty folder, a file that is no video, a video above the pixel limit), or whose
    # every image is unreadable or above the pixel limit, leaves an earlier run's outputs in place
    source = open_source(input_path, fps=options.fps, max_pixels=options.max_image_pixels,
                         limit_name="mpvss segment's --max-image-pixels; 0 = no limit")

    run_stats = RunStats(cfg.num_classes)  # the summary's figures; every frame's record is in frames.jsonl
    non_finite: list[str] = []  # frames whose logits were NaN / infinite (skipped)
    engine_failed: list[str] = []  # frames the backend failed on (skipped)
    failures = EngineFailures("frames")
    t_start = time.perf_counter()
    writer: _OverlayVideo | None = None
    with source, contextlib.ExitStack() as run_files:
        known = source.known_len()  # not len(): a video without a frame count would be decoded once to count
        total = options.max_frames if known is None else min(known, options.max_frames or known)
        def frames() -> Iterator[Any]:
            # the limit is checked before the next frame is read: reading it first listed the files
            # skipped on the way to it (unreadable, too large) though no frame past the limit ran
            for frame in source:
                yield frame
                if options.max_frames is not None and \
                        len(run_stats) + len(non_finite) + len(engine_failed) >= options.max_frames:
                    return

        jsonl: IO[str] | None = None
        try:
            for frame in tqdm(frames(), total=total, unit="frame", disable=not options.progress, desc="mpvss segment"):
                if jsonl is None:  # the input's first frame: now the output folder is prepared
                    jsonl = run_files.enter_context(_open_run_log(input_path, out))
                    writer = _OverlayVideo(out / "overlay.mp4", source.fps) if options.write_overlay else None
                try:
                    result = segmenter.push(frame.image, frame.stamp)
                except Exception as exc:  # noqa: BLE001 - NaN logits, or the backend's own errors
                    if isinstance(exc, NonFiniteOutputError):  # no labels rather than all-class-0 ones
                        non_finite.append(frame.name)
                    else:  # the segmenter has reset: the next frame is a key frame
                        engine_failed.append(frame.name)
                        failures.failed(exc, frame.name)
                    log.warning("frame %s skipped: %s", frame.name, exc)
                    if writer is not None:  # the frame itself, so the overlay video keeps its timeline
                        writer.write(frame.image)
                    continue
                failures.succeeded()
                record = {"name": frame.name, "source_index": frame.index, **result.to_record()}
                run_stats.add(record, result.labels)
                jsonl.write(json.dumps(record) + "\n")
                jsonl.flush()  # a full disk fails here, in the loop, not when the file is closed after it
                if options.write_labels:
                    write_label_png(out / "labels" / f"{frame.name}.png", result.labels)
                if writer is not None:
                    writer.write(overlay(frame.image, result.labels, palette, alpha=0.5, class_names=cfg.class_names,
                                         tag=frame_tag(result.is_key_frame, result.frame_index - result.key_frame_index)))
                if on_result is not None:
                    on_result(result)
        except BaseException:  # Ctrl-C, SIGTERM (unwound by mpvss segment), a full disk, the backend giving up
            if jsonl is None:  # the output folder could not be prepared (or the input's first frame never came)
                raise
            log.warning("the run stopped: %s holds its partial output, %d frames in labels/ and frames.jsonl%s, and no "
                        "summary.json (a new run into it replaces them)", out, len(run_stats),
                        " (and overlay.mp4)" if writer is not None and writer.written else "")
            raise
        finally:
            if writer is not None:
                writer.close()
        unreadable, missing = list(source.unreadable), int(source.missing)
        too_large = list(source.too_large)
    wall = time.perf_counter() - t_start
    if not run_stats:
        if non_finite or engine_failed:  # the model or the backend, not the input: exit status 1, as mpvss bag
            raise RuntimeError(f"no frame of {input_path} could be segmented ({len(non_finite)} gave NaN or infinite "
                               f"logits: broken weights or model configuration?; the backend failed on "
                               f"{len(engine_failed)})")
        if too_large:
            raise ValueError(f"no frame of {input_path} was segmented: {len(too_large)} had more than the "
                             f"{options.max_image_pixels} pixels of --max-image-pixels (0 = no limit), "
                             f"{len(unreadable)} could not be read")
        raise ValueError(f"no frame could be read from {input_path}")

    summary = {
        "input": str(input_path),
        "overlay": str(out / "overlay.mp4") if writer is not None and writer.written else None,
        **options.run_settings(loaded, segmenter),
        "class_names": cfg.class_names,
        "skipped_non_finite": non_finite,
        "skipped_engine": engine_failed,
        # input frames that could not be read (logged): unreadable files of a folder, damaged frames
        # of a video, and the frames a truncated video lacks
        "skipped_unreadable": unreadable,
        "missing_at_end": missing,
        # input frames above max_image_pixels (logged), skipped before segmentation
        "skipped_too_large": too_large,
        "max_image_pixels": options.max_image_pixels,
        "wall_time_s": wall,
        # the one-off preparation of a fixed-shape backend (an ONNX export, a TensorRT engine
        # build, seconds to minutes) is not the engine's frame rate
        "setup_s": segmenter.setup_s,
        "fps": len(run_stats) / (wall - segmenter.setup_s) if wall > segmenter.setup_s else None,
        **run_stats.summary(),
    }
    try:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:  # a full disk: name the file (the error of a write has no file name)
        (out / "summary.json").unlink(missing_ok=True)
        raise OSError(f"cannot write {out / 'summary.json'}: {exc.strerror or exc} ({len(run_stats)} frames are in "
                      f"labels/ and frames.jsonl; the overlay video may be cut short)") from exc
    return summary
