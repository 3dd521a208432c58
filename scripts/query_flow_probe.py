#!/usr/bin/env python3
"""Two checks of chained query flow on a clip's pair table (not used by the package; the model
card's figures for "the query flow's own warp residual as the key-frame score" and "a rigid-motion
prior per query" come from these commands):

    PYTHONPATH=. python3 scripts/query_flow_probe.py --clip val --threads 2
    PYTHONPATH=. python3 scripts/query_flow_probe.py --clip bikes --threads 2
    PYTHONPATH=. python3 scripts/query_flow_probe.py --clip dashcam --threads 2
    PYTHONPATH=. python3 scripts/query_flow_probe.py --clip val --rigid-prior things --rigid-weight 1 --intervals 5 --threads 2
    PYTHONPATH=. python3 scripts/query_flow_probe.py --clip val --rigid-prior all --rigid-weight 0.5 --intervals 5 --threads 2

Key-frame scores. While the pair table (:func:`~mpvss_ros.evaluation.pair_table.build_pair_table`,
chained query flow) is built, every (key frame, frame) pair also records: the key frame's grey
image, area-averaged onto the 1/4 mask grid, warped with the chained query flow as the masks are
(one copy per query through :func:`~mpvss_ros.nn.warp.warp_mask_logits`) and blended per pixel with
weights (1 - p(no object)) x sigmoid(warped mask logit), normalised over the queries; its residual
against the frame's grey image after removing the mean difference (brightness gain) gives ``qf_f10``
(fraction of pixels above 10 grey levels) and ``qf_mae`` (mean absolute residual, grey levels);
``zero_mae`` is the same without the warp; ``flow_mag`` the mean chained-flow length over the
queries (mask-grid pixels). A score's policy: a key frame at t when the score of (key frame, t - 1)
exceeds tau (no cost beyond the propagation already run), at every cut (the shipped cut score), and
after 2N frames; tau bisected to the key-frame count of ``fixed:N``. Printed per N beside ``fixed:N``
and the shipped adaptive schedule (the study's threshold search): mIoU / pixel accuracy against the
labels, or against the model's own per-frame labels on an unlabelled clip. Then the spread of
``flow_mag`` and of the shipped schedule over every threshold of a log grid that gives the count,
the hindsight local search (:func:`~mpvss_ros.evaluation.pair_table.local_search`), and, on a
labelled clip, the correlation of frame sharpness (variance of the Laplacian) with per-frame pixel
accuracy.

``--rigid-prior things|all``: each query's chained flow is fitted with an affine motion (weighted
least squares on the flow grid, weights = the query's warped mask probability, area-averaged) and
blended in with ``--rigid-weight``, for queries whose top class is SignSymbol, Car, Pedestrian or
Bicyclist (``things``) or for all; prints ``fixed:N`` mIoU and those classes' IoU.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mpvss_ros.evaluation.pair_table import build_pair_table, local_search
from mpvss_ros.evaluation.study import match_scene_threshold
from mpvss_ros.model_loader import load_model
from mpvss_ros.nn.mpvss import KeyFrameState
from mpvss_ros.nn.warp import warp_mask_logits
from mpvss_ros.propagation import QueryFlowPropagator
from mpvss_ros.scheduling import DEFAULT_CUT_THRESHOLD, AdaptiveScheduler, SceneScorer, schedule_key_frames

SCORES = ("qf_f10", "qf_mae", "zero_mae", "flow_mag")
MOVERS = ("SignSymbol", "Car", "Pedestrian", "Bicyclist")
_GREY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


class ProbeQueryFlow(QueryFlowPropagator):
    """Chained query flow that records the key-frame scores of each propagation (``records``: one
    ``(key state, {score: value})`` per call) and optionally applies the rigid-motion prior."""

    def __init__(self, model, rigid_prior: str | None = None, rigid_weight: float = 1.0,
                 movers: list[int] | None = None) -> None:
        super().__init__(model, chain_flow=True)
        self.rigid_prior, self.rigid_weight, self.movers = rigid_prior, rigid_weight, movers or []
        self.records: list[tuple[KeyFrameState, dict[str, float]]] = []

    def _rigid(self, key: KeyFrameState, flows: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        n, hf, wf = flows.shape[1], flows.shape[-2], flows.shape[-1]
        weight = F.adaptive_avg_pool2d(torch.sigmoid(warped), (hf, wf))[0].reshape(n, -1, 1)
        ys, xs = torch.meshgrid(torch.arange(hf, dtype=torch.float32), torch.arange(wf, dtype=torch.float32),
                                indexing="ij")
        design = torch.stack([torch.ones_like(xs), xs / wf, ys / hf], -1).reshape(-1, 3)
        weighted = (design[None] * weight).transpose(1, 2)
        coef = torch.linalg.solve(weighted @ design[None] + 1e-4 * torch.eye(3),
                                  weighted @ flows[0].reshape(n, 2, -1).transpose(1, 2))
        affine = (design[None] @ coef).transpose(1, 2).reshape(n, 2, hf, wf)
        if self.rigid_prior == "all":
            chosen = torch.ones(n)
        else:
            top = key.class_logits.softmax(-1)[0, :, :-1].argmax(-1)
            chosen = torch.isin(top, torch.tensor(self.movers)).float()
        a = (self.rigid_weight * chosen).view(n, 1, 1, 1)
        return (flows[0] * (1 - a) + affine * a)[None]

    def propagate(self, key: KeyFrameState, image: torch.Tensor) -> torch.Tensor:
        every = replace(key, active=None)  # the scores blend all N queries (flows of every query)
        flows = self._chain.advance(self.model.query_flows(every, image, self._chain.start(key, key.image)), image)
        norm = self.model.cfg.input.warp_normalization
        out = warp_mask_logits(key.mask_logits, flows, norm)
        if self.rigid_prior:
            flows = self._rigid(key, flows, out)
            out = warp_mask_logits(key.mask_logits, flows, norm)
        n, h, w = out.shape[1:]
        vh, vw = key.valid_hw[0] // 4, key.valid_hw[1] // 4
        key_grey, grey = (F.interpolate((im * _GREY).sum(1, keepdim=True), size=(h, w), mode="area")
                          for im in (key.image, image))
        p_obj = 1 - key.class_logits.softmax(-1)[0, :, -1]
        weights = p_obj.view(1, n, 1, 1) * torch.sigmoid(out)
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-6)
        warped = (weights * warp_mask_logits(key_grey.expand(1, n, h, w).contiguous(), flows, norm)).sum(1, keepdim=True)
        scores = {}
        for name, img in (("qf", warped), ("zero", key_grey)):
            residual = (img - grey)[..., :vh, :vw]
            residual = (residual - residual.mean()).abs()
            scores[f"{name}_mae"] = float(residual.mean())
            scores[f"{name}_f10"] = float((residual > 10).float().mean())
        hf, wf = flows.shape[-2:]
        scores["flow_mag"] = float(torch.hypot(flows[0, :, 0] * (w / wf), flows[0, :, 1] * (h / hf)).mean())
        self.records.append((key, scores))
        return key.propagated(out)  # the segmenter scores the key frame's active queries


def score_array(records, frames: int, horizon: int) -> dict[str, np.ndarray]:
    """(T, horizon + 1) array per score from a probe's records, in build_pair_table's order (key
    frames from the last to the first, each to the frames after it)."""
    groups: list[list[dict[str, float]]] = []
    last = None
    for key, scores in records:
        if key is not last:
            groups.append([])
            last = key
        groups[-1].append(scores)
    out = {s: np.full((frames, horizon + 1), np.nan) for s in SCORES}
    keys = [k for k in range(frames - 1, -1, -1) if k < frames - 1]  # the last frame propagates nowhere
    if len(groups) != len(keys):
        raise RuntimeError(f"{len(groups)} groups of records for {len(keys)} key frames")
    for k, group in zip(keys, groups):
        if len(group) != min(horizon, frames - 1 - k):
            raise RuntimeError(f"key frame {k}: {len(group)} records")
        for d, scores in enumerate(group, start=1):
            for s in SCORES:
                out[s][k, d] = scores[s]
    return out


def score_policy(score: np.ndarray, tau: float, max_gap: int, cuts: set[int]) -> list[int]:
    """Key frames of the policy of the module docstring."""
    keys, key = [0], 0
    for t in range(1, score.shape[0]):
        d = t - key
        if d >= max_gap or t in cuts or (d >= 2 and score[key, d - 1] > tau):
            keys.append(t)
            key = t
    return keys


def match_score_policy(score: np.ndarray, target: int, max_gap: int, cuts: set[int]) -> list[int]:
    """The policy's key frames at the highest tau (60 log-bisection steps) giving at most ``target``."""
    lo, hi = float(np.nanmin(score[score > 0])), float(np.nanmax(score))
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if len(score_policy(score, mid, max_gap, cuts)) > target:
            lo = mid
        else:
            hi = mid
    return score_policy(score, hi, max_gap, cuts)


def _spread(values: list[float]) -> str:
    if not values:
        return "no threshold hits the count"
    v = np.array(values)
    return f"{len(v)} thresholds, lowest {v[0]:.2f} median {np.median(v):.2f} range {v.min():.2f}-{v.max():.2f}"


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from schedule_table import load_clip  # noqa: E402 (a sibling script)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", default="val")
    ap.add_argument("--fps", type=float, default=None, help="frame rate of an image folder")
    ap.add_argument("--weights", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--horizon", type=int, default=20)
    ap.add_argument("--intervals", default="2,3,5,10")
    ap.add_argument("--rigid-prior", choices=("things", "all"), default=None)
    ap.add_argument("--rigid-weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name, frames, labels, fps = load_clip(args.clip, args.fps)
    loaded = load_model(None, args.weights)
    names = list(loaded.config.class_names)
    probe = ProbeQueryFlow(loaded.model, args.rigid_prior, args.rigid_weight,
                           [names.index(c) for c in MOVERS if c in names])
    table = build_pair_table(loaded, frames, probe, labels, horizon=args.horizon, fps=fps)
    intervals = [int(n) for n in args.intervals.split(",")]
    if args.rigid_prior:
        for n in intervals:
            s = table.score(range(0, table.frames, n))
            print(f"rigid prior {args.rigid_prior} x {args.rigid_weight:g}, fixed:{n}: mIoU {s['mIoU']:.2f} "
                  + " ".join(f"{c} {s['IoU'][c]:.2f}" if s["IoU"].get(c) is not None else f"{c} absent" for c in MOVERS))
        return
    scores = score_array(probe.records, table.frames, table.horizon)
    cuts = set(np.flatnonzero(SceneScorer().cut_scores(frames) >= DEFAULT_CUT_THRESHOLD).tolist())
    metric = "mIoU" if table.reference == "labels" else "pACC"
    print(f"clip {name}: {table.frames} frames, cuts at {sorted(cuts)}, reference {table.reference}, "
          f"{metric} (key frames where the count differs)")

    def cell(keys: list[int], target: int) -> str:
        return f"{table.score(keys)[metric]:.2f}" + (f" ({len(keys)})" if len(keys) != target else "")

    for n in intervals:
        fixed = list(range(0, table.frames, n))
        target = len(fixed)
        threshold, _ = match_scene_threshold(frames, fps, target, max_interval=2 * n)
        shipped = schedule_key_frames(AdaptiveScheduler(threshold, max_interval=2 * n, max_gap_s=math.inf), frames, fps)
        row = [f"fixed {cell(fixed, target)}", f"shipped {cell(shipped, target)}"]
        row += [f"{s} {cell(match_score_policy(scores[s], target, 2 * n, cuts), target)}" for s in SCORES]
        print(f"1 in {n} ({target} key frames): " + " | ".join(row))
    for n in intervals:
        target = len(range(0, table.frames, n))
        grid = np.geomspace(0.01, 3.0, 300)
        shipped = [table.score(k)[metric] for th in grid
                   if len(k := schedule_key_frames(AdaptiveScheduler(th, max_interval=2 * n, max_gap_s=math.inf),
                                                   frames, fps)) == target]
        flow = [table.score(k)[metric] for tau in np.geomspace(0.05, 60.0, 600)
                if len(k := score_policy(scores["flow_mag"], tau, 2 * n, cuts)) == target]
        print(f"1 in {n}, every threshold giving {target} key frames: shipped {_spread(shipped)}; "
              f"flow_mag {_spread(flow)}")
    for n in intervals:
        _, best = local_search(table, list(range(0, table.frames, n)), max_gap=2 * n)
        print(f"1 in {n}: hindsight local search mIoU {best:.2f}")
    if table.reference != "labels" or table.frames < 17:
        return  # against its own per-frame labels every frame scores 100; detrending needs 17 frames
    sharpness = np.array([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in frames])
    accuracy = np.array([np.trace(table.conf[k, 0]) / table.conf[k, 0].sum() for k in range(table.frames)])

    def detrend(x: np.ndarray) -> np.ndarray:
        return (x - np.convolve(x, np.ones(7) / 7, mode="same"))[5:-5]

    print(f"sharpness against per-frame pixel accuracy: correlation {np.corrcoef(sharpness, accuracy)[0, 1]:.2f}, "
          f"detrended over 7 frames {np.corrcoef(detrend(sharpness), detrend(accuracy))[0, 1]:.2f}")

if __name__ == "__main__":
    main()
