#!/usr/bin/env python3
"""Where does query-based flow lose accuracy? Ablations on a labelled clip (CamVid val by default).

    PYTHONPATH=. python3 scripts/propagation_diagnostics.py --threads 2 --out runs/diagnostics/diagnostics.json

For each key interval (fixed schedule) it scores, with the same key frames and post-processing:

* ``query_flow``: the model's fused per-query flows, direct from the key frame;
* ``query_flow/pixel_flow``: the motion module's pixel-wise flow alone, shared by every mask
  (how much the per-query part adds);
* ``optical_flow/dis@s``: OpenCV DIS at ``s`` of the canvas (0.5 is the ``optical_flow``
  propagator; ``s`` = the motion module's ``image_scale`` sees the pair at the resolution the
  motion module sees it);
* ``optical_flow/dis@0.5 on the flow grid``: the same DIS flow area-averaged onto the motion
  module's flow grid (is the coarse flow grid the limit?);
* ``optical_flow/dis-medium@1 on the flow grid``: DIS at the full canvas with the preset of the
  stage-2 flow target (``training.pairs.FLOW_TARGET_DIS_PRESET``, ``medium``) averaged onto the flow
  grid, i.e. that target itself (``training.pairs.dis_flow_target``):
  what the learned flow would score if it matched its teacher exactly;
* ``query_flow (chained)`` and ``optical_flow/dis@0.5 (chained)``: the same flows chained frame to
  frame (``chain_flow``; every row above uses the direct flow from the key frame, as estimated);
* ``copy``.

It then measures the motion module's pixel-wise flow against DIS (``medium`` preset, at the full
canvas, averaged onto the flow grid) on pairs of the clip ``d`` frames apart: mean end-point error
(EPE, flow-grid pixels), the EPE of a zero flow (= mean |DIS flow|) and their ratio (1 = no better
than predicting no motion). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpvss_ros.evaluation.study import evaluate_sequence, load_sequence, write_json
from mpvss_ros.io.samples import camvid_annot_dir, camvid_dir
from mpvss_ros.model_loader import load_model
from mpvss_ros.nn.mpvss import MPVSS, KeyFrameState
from mpvss_ros.nn.warp import warp_mask_logits
from mpvss_ros.propagation import CopyPropagator, OpticalFlowPropagator, Propagator, QueryFlowPropagator, grid_hw
from mpvss_ros.scheduling import FixedIntervalScheduler
from mpvss_ros.segmenter import VideoSegmenter
from mpvss_ros.training.pairs import FLOW_TARGET_DIS_PRESET, dis_flow_target


class PixelFlowPropagator(Propagator):
    """The motion module's pixel-wise flow (spec §2.4) warping every mask alike (torch model only)."""

    name = "query_flow/pixel_flow"

    def __init__(self, model: MPVSS) -> None:
        self.model = model

    def propagate(self, key: KeyFrameState, image: torch.Tensor) -> torch.Tensor:
        out = self.model.motion(image, key.image, key.query_embeddings.transpose(0, 1), image_size=key.valid_hw)
        return warp_mask_logits(key.propagated(key.mask_logits), out.pixel_flow[:, None], self.model.warp_normalization)


def _named(prop: Propagator, name: str) -> Propagator:
    prop.name = name  # instance attribute: the class's name stays untouched
    return prop


def flow_epe(model: MPVSS, images: list[np.ndarray], gaps: list[int], key_every: int) -> list[dict[str, float]]:
    """EPE of the pixel-wise flow against DIS on (key, key + d) pairs, in flow-grid pixels; the
    frames placed on the canvas as the segmenter places them."""
    seg = VideoSegmenter(model, CopyPropagator(), FixedIntervalScheduler(1))
    frames = []
    for img in images:
        lb = seg.letterbox(img.shape[:2])
        frames.append((seg.canvas(img, lb), lb.resized_hw))
    err: dict[int, list[float]] = {d: [] for d in gaps}
    mag: dict[int, list[float]] = {d: [] for d in gaps}
    for k in range(0, len(frames) - min(gaps), key_every):
        key_t, valid = frames[k]
        gh, gw = grid_hw(valid, model.motion.flow_stride)
        key = key_t[0, :, : valid[0], : valid[1]].permute(1, 2, 0).numpy()
        with torch.no_grad():
            queries = model.forward_segmentor(key_t, valid_hw=valid).query_embeddings.transpose(0, 1)
        for d in gaps:
            if k + d >= len(frames):
                continue
            cur_t, _ = frames[k + d]
            with torch.no_grad():
                flow = model.motion(cur_t, key_t, queries, image_size=valid).pixel_flow[0].numpy()
            cur = cur_t[0, :, : valid[0], : valid[1]].permute(1, 2, 0).numpy()
            target = dis_flow_target(cur, key, (gh, gw))
            err[d].append(float(np.linalg.norm(flow[:, :gh, :gw] - target, axis=0).mean()))
            mag[d].append(float(np.linalg.norm(target, axis=0).mean()))
    return [{"gap": d, "pairs": len(err[d]), "epe": float(np.mean(err[d])), "zero_flow_epe": float(np.mean(mag[d])),
             "ratio": float(np.mean(err[d]) / np.mean(mag[d]))} for d in gaps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model name or YAML (default: from the weights)")
    ap.add_argument("--weights", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--images", default=None, help="frame folder (default: CamVid val)")
    ap.add_argument("--labels", default=None, help="label folder (default: CamVid val annotations)")
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--intervals", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--gaps", type=int, nargs="+", default=[1, 2, 4, 8], help="frame distances for the EPE")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    images = args.images or camvid_dir("val")
    labels = args.labels or (camvid_annot_dir("val") if args.images is None else None)
    if images is None or labels is None:
        raise SystemExit("no labelled clip: pass --images and --labels (CamVid val not found: set MPVSS_SHARED_DATA "
                         "to the shared data folder)")
    seq = load_sequence(images, labels, fps=args.fps, limit=args.max_frames)
    loaded = load_model(args.model or ("mpvss_lite" if args.weights is None else None), args.weights)
    model = loaded.model
    if not isinstance(model, MPVSS):
        raise SystemExit("the diagnostics need the torch model")
    canvas = tuple(loaded.config.input.size)
    grid = model.motion.flow_stride
    s = model.motion.image_scale

    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        rows.append(evaluate_sequence(loaded, seq, CopyPropagator(), "fixed:1"))
        for n in args.intervals:
            direct = {"chain_flow": False}  # the flows as estimated, key frame to current frame
            variants = [
                QueryFlowPropagator(model, **direct),
                PixelFlowPropagator(model),
                _named(OpticalFlowPropagator(flow_scale=0.5, **direct), "optical_flow/dis@0.5"),
                _named(OpticalFlowPropagator(flow_scale=0.5, grid_stride=grid, **direct),
                       f"optical_flow/dis@0.5 on the 1/{grid} grid"),
                _named(OpticalFlowPropagator(flow_scale=1.0, grid_stride=grid, preset=FLOW_TARGET_DIS_PRESET, **direct),
                       f"optical_flow/dis-{FLOW_TARGET_DIS_PRESET}@1 on the 1/{grid} grid"),
                _named(OpticalFlowPropagator(flow_scale=s, **direct), f"optical_flow/dis@{s:g}"),
                _named(QueryFlowPropagator(model, chain_flow=True), "query_flow (chained)"),
                _named(OpticalFlowPropagator(flow_scale=0.5, chain_flow=True), "optical_flow/dis@0.5 (chained)"),
                CopyPropagator(),
            ]
            for prop in variants:
                rows.append(evaluate_sequence(loaded, seq, prop, f"fixed:{n}"))
        epe = flow_epe(model, seq.images, args.gaps, key_every=5)

    per_frame = rows[0]["mIoU"]
    print("| setting | mIoU | loss vs per-frame | median ms non-key |\n|---|---:|---:|---:|")
    print(f"| per-frame (fixed:1) | {per_frame:.2f} | | |")
    for r in rows[1:]:
        print(f"| {r['propagator']} {r['schedule']} | {r['mIoU']:.2f} | {per_frame - r['mIoU']:.2f} | "
              f"{r['median_ms_non_key_frame']:.1f} |")
    print(f"\nPixel-wise flow vs DIS (flow-grid pixels, 1/{grid} of the canvas):\n")
    print("| frames apart | pairs | EPE | zero-flow EPE | ratio |\n|---:|---:|---:|---:|---:|")
    for e in epe:
        print(f"| {e['gap']} | {e['pairs']} | {e['epe']:.3f} | {e['zero_flow_epe']:.3f} | {e['ratio']:.2f} |")
    if args.out:
        keep = ("propagator", "propagator_settings", "schedule", "mIoU", "fwIoU", "VC_8", "key_frames", "mean_ms_per_frame",
                "median_ms_non_key_frame")
        out = {"weights": str(loaded.weights),
               "canvas": list(canvas), "flow_grid_stride": grid, "motion_image_scale": s, "frames": len(seq.images),
               "rows": [{k: r[k] for k in keep} for r in rows], "flow_epe": epe}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, args.out)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
