"""Tests of mpvss_ros.segmenter: VideoSegmenter bookkeeping, shapes, errors and post-processing.

The untrained ``mpvss_lite`` model (weights do not matter here) drives the real network; where a
test needs labels that follow the image (several classes, real boundaries) it uses
``conftest.BandModel``, a deterministic stand-in with the same canvas settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from hypothesis import strategies as st

from mpvss_ros.model_loader import load_model
from mpvss_ros.nn.mpvss import KeyFrameState
from mpvss_ros.propagation import (DIS_PRESETS, CopyPropagator, OpticalFlowPropagator, QueryFlowPropagator, grid_hw,
                                   pool_flow)
from mpvss_ros.runtime.export import replace_canvas
from mpvss_ros.scheduling import AdaptiveScheduler, FixedIntervalScheduler, KeyFrameScheduler, ScheduleDecision, parse_schedule
from mpvss_ros.segmenter import FrameError, Letterbox, SegmentationResult, VideoSegmenter, canvas_tensor, check_frame

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KEY_TIMINGS = {"schedule", "preprocess", "segmentor", "postprocess", "total"}
NON_KEY_TIMINGS = {"schedule", "preprocess", "propagation", "postprocess", "total"}


def _image(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth random colour image (blocks upsampled), so propagation has structure to follow."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, hw[0] // 16 + 1), max(1, hw[1] // 16 + 1), 3), dtype=np.uint8)
    return np.ascontiguousarray(cv2.resize(small, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR))


def _segmenter(lite, propagator="copy", schedule="fixed:3", **kw) -> VideoSegmenter:
    prop = {"copy": CopyPropagator, "optical_flow": OpticalFlowPropagator}.get(propagator)
    prop = QueryFlowPropagator(lite.model) if propagator == "query_flow" else prop()
    return VideoSegmenter(lite.model, prop, parse_schedule(schedule), **kw)


# ------------------------------------------------------------------ Letterbox


@pytest.mark.parametrize("input_hw, canvas, resized, padded", [
    ((540, 960), (360, 480), (270, 480), (288, 480)),
    ((272, 640), (360, 480), (204, 480), (224, 480)),
    ((360, 480), (360, 480), (360, 480), (384, 480)),
    ((720, 960), (360, 480), (360, 480), (384, 480)),
    ((271, 481), (360, 480), (270, 480), (288, 480)),
    ((97, 130), (360, 480), (358, 480), (384, 480)),
    ((1, 1), (360, 480), (360, 360), (384, 384)),
    ((1000, 10), (360, 480), (360, 4), (384, 32)),
    ((33, 1000), (360, 480), (16, 480), (32, 480)),
    ((271, 481), None, (271, 481), (288, 512)),
    ((64, 96), None, (64, 96), (64, 96)),
    ((375, 1242), (480, 640), (193, 640), (224, 640)),  # KITTI on the default canvas
    ((375, 1242), (193, 640), (193, 640), (224, 640)),  # ... and on a canvas of that size (was 193 x 639)
    ((272, 640), (54, 128), (54, 128), (64, 128)),  # bikes.mp4 (was 54 x 127)
    ((960, 1281), (480, 853), (480, 641), (480, 672)),  # halves round up, as detectron2's resize (was 480 x 640)
])
def test_letterbox_fit(input_hw, canvas, resized, padded):
    lb = Letterbox.fit(input_hw, canvas, 32)
    assert lb == Letterbox(input_hw, resized, padded)


@pytest.mark.parametrize("h, w", [(540, 960), (97, 130), (271, 481), (3, 2000), (2000, 3), (360, 480)])
def test_letterbox_fit_keeps_aspect_and_fits(h, w):
    canvas = (360, 480)
    lb = Letterbox.fit((h, w), canvas)
    rh, rw = lb.resized_hw
    assert rh <= canvas[0] and rw <= canvas[1]
    assert rh == canvas[0] or rw == canvas[1]  # scaled until one side touches the canvas
    s = min(canvas[0] / h, canvas[1] / w)
    assert abs(rh - h * s) <= 0.5 + 1e-9 or rh == 1
    assert abs(rw - w * s) <= 0.5 + 1e-9 or rw == 1
    assert all(p % 32 == 0 and r <= p < r + 32 for p, r in zip(lb.padded_hw, lb.resized_hw))


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), ch=st.integers(1, 2000), cw=st.integers(1, 2000))
def test_letterbox_fit_fills_one_side_and_a_frame_fits_its_own_letterboxed_size(h, w, ch, cw):
    """A frame fits exactly the size it letterboxes to: graphs exported for that size (the README's
    deploy-without-weights recipe, the skip message's `mpvss export --height --width`) run it."""
    lb = Letterbox.fit((h, w), (ch, cw))
    rh, rw = lb.resized_hw
    assert 1 <= rh <= ch and 1 <= rw <= cw
    assert (rw == cw and rh == max(1, int(h * cw / w + 0.5))) or (rh == ch and rw == max(1, int(w * ch / h + 0.5)))
    assert Letterbox.fit((h, w), lb.resized_hw).resized_hw == lb.resized_hw


# ------------------------------------------------------------------ output shapes


_OPENCV_MAJOR_MINOR = tuple(int(v) for v in cv2.__version__.split(".")[:2])


@pytest.mark.parametrize("hw", [(271, 481), (97, 130),
                                pytest.param((1, 1), marks=pytest.mark.skipif(
                                    _OPENCV_MAJOR_MINOR < (4, 6), reason=f"OpenCV {cv2.__version__} cannot take a "
                                    "1 x 1 image (cv2.error '_step >= minstep'; 4.6.0 can)")),
                                (500, 7), (33, 1000)])
def test_output_at_input_resolution_odd_sizes(lite, hw):
    seg = _segmenter(lite, "query_flow", "fixed:2")
    results = [seg.push(_image(hw, seed), 0.04 * seed) for seed in range(2)]
    assert [r.is_key_frame for r in results] == [True, False]
    for r in results:
        assert r.labels.shape == hw and r.labels.dtype == np.uint8
        assert r.confidence.shape == hw and r.confidence.dtype == np.uint8
        assert int(r.labels.max()) < lite.config.num_classes
        # confidence = 255 x share of the winning class: at least 255 / K
        assert int(r.confidence.min()) >= math.floor(255 / lite.config.num_classes)
        assert r.labels.flags.c_contiguous


def test_resolution_change_mid_stream(lite, bikes_frames):
    seg = _segmenter(lite, "copy", "fixed:5")
    big = bikes_frames[0]
    small = np.ascontiguousarray(big[50:147, 100:230])  # 97 x 130
    r = [seg.push(big, 0.0), seg.push(big, 0.04), seg.push(small, 0.08), seg.push(small, 0.12),
         seg.push(big, 0.16)]
    assert [x.is_key_frame for x in r] == [True, False, True, False, True]
    assert [x.key_frame_reason for x in r] == ["first", "", "resolution_change", "", "resolution_change"]
    assert [x.labels.shape for x in r] == [(272, 640)] * 2 + [(97, 130)] * 2 + [(272, 640)]
    assert [x.confidence.shape for x in r] == [(272, 640)] * 2 + [(97, 130)] * 2 + [(272, 640)]
    assert [x.key_frame_index for x in r] == [0, 0, 2, 2, 4]


class _NeverKey(KeyFrameScheduler):
    """A custom scheduler that never asks for a key frame (not even on the first frame)."""

    def decide(self, frame, stamp):
        return ScheduleDecision(False, 0.0, "", 1)

    def _policy(self, scene_score, frames_since_key):
        return ""


def test_custom_scheduler_cannot_skip_needed_key_frames(band_model):
    seg = VideoSegmenter(band_model, CopyPropagator(), _NeverKey())
    a, b = _image((120, 160), 1), _image((90, 160), 2)
    r = [seg.push(a, 0.0), seg.push(a, 0.1), seg.push(b, 0.2), seg.push(b, 0.3)]
    assert [x.is_key_frame for x in r] == [True, False, True, False]
    assert [x.key_frame_reason for x in r] == ["first", "", "canvas_change", ""]  # the first frame is "first", whoever keys it
    assert r[3].labels.shape == (90, 160)
    assert band_model.calls == 2


# ------------------------------------------------------------------ bookkeeping


@pytest.fixture(scope="module")
def fixed3_run(lite):
    """7 frames through the lite model with fixed:3 and query_flow, class masks on."""
    seg = _segmenter(lite, "query_flow", "fixed:3", class_masks=True)
    stamps = [10.0 + 0.1 * i for i in range(7)]
    results = [seg.push(_image((120, 200), i), s) for i, s in enumerate(stamps)]
    return results, stamps


def test_key_frame_bookkeeping_fixed3(fixed3_run):
    results, stamps = fixed3_run
    assert [r.frame_index for r in results] == list(range(7))
    assert [r.stamp for r in results] == stamps
    assert [r.is_key_frame for r in results] == [True, False, False, True, False, False, True]
    assert [r.key_frame_index for r in results] == [0, 0, 0, 3, 3, 3, 6]
    assert [r.key_frame_stamp for r in results] == [stamps[i] for i in (0, 0, 0, 3, 3, 3, 6)]
    assert [r.key_frame_reason for r in results] == ["first", "", "", "interval", "", "", "interval"]
    assert results[0].scene_score == 0.0 and all(r.scene_score > 0 for r in results[1:])


def test_timings_keys(fixed3_run):
    results, _ = fixed3_run
    for r in results:
        assert set(r.stage_latency_ms) == (KEY_TIMINGS if r.is_key_frame else NON_KEY_TIMINGS)
        assert all(v >= 0 and math.isfinite(v) for v in r.stage_latency_ms.values())
        stages = sum(v for k, v in r.stage_latency_ms.items() if k != "total")
        assert r.stage_latency_ms["total"] >= stages - 1e-6


def test_to_record_json(fixed3_run):
    results, stamps = fixed3_run
    for r in results:
        rec = r.to_record()
        text = json.dumps(rec, allow_nan=False)
        back = json.loads(text)
        assert back == rec
        assert back["frame"] == r.frame_index and back["stamp"] == r.stamp
        assert back["is_key_frame"] is r.is_key_frame and back["key_frame"] == r.key_frame_index
        assert back["key_frame_stamp"] == r.key_frame_stamp
        assert back["key_frame_reason"] == r.key_frame_reason
        assert back["scene_score"] == round(r.scene_score, 5)
        assert set(back["stage_latency_ms"]) == set(r.stage_latency_ms)
        assert "labels" not in back and "confidence" not in back


def test_class_masks_lite(fixed3_run):
    results, _ = fixed3_run
    for r in results:
        _check_class_masks(r)


def _check_class_masks(r: SegmentationResult) -> None:
    present = sorted(int(c) for c in np.unique(r.labels))
    assert r.class_masks is not None and sorted(r.class_masks) == present
    cover = np.zeros(r.labels.shape, np.int32)
    for c, mask in r.class_masks.items():
        assert mask.dtype == np.uint8 and mask.shape == r.labels.shape
        assert set(np.unique(mask).tolist()) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, r.labels == c)
        cover += mask == 255
    assert np.all(cover == 1)  # the masks partition the image


def test_class_masks_partition_real_frame(band_model, bikes_frames):
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(2), class_masks=True)
    r = seg.push(bikes_frames[0], 0.0)
    assert len(r.class_masks) >= 3  # the band model gives a real scene several classes
    _check_class_masks(r)
    r2 = seg.push(bikes_frames[1], 0.04)
    assert not r2.is_key_frame
    _check_class_masks(r2)


def test_class_masks_off_by_default(band_model):
    r = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(2)).push(_image((40, 50)), 0.0)
    assert r.class_masks is None


def test_reset_forces_key_frame(band_model):
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    img = _image((60, 80))
    assert [seg.push(img, 0.1 * i).is_key_frame for i in range(3)] == [True, False, False]
    seg.reset()
    r = seg.push(img, 0.3)
    assert (r.is_key_frame, r.key_frame_reason, r.key_frame_index, r.frame_index) == (True, "reset", 3, 3)


class _ResetRaises(FixedIntervalScheduler):
    """A custom scheduler whose ``reset`` raises (once ``armed``)."""

    armed = False

    def reset(self, reason: str = "reset") -> None:
        if self.armed:
            raise RuntimeError("scheduler reset failed")
        super().reset(reason)


def test_a_reset_whose_scheduler_raises_still_drops_the_key_frame(band_model):
    """reset() raises what the scheduler's reset raises, but the next frame is a key frame (reason
    ``reset``) all the same, not propagated from the key frame before (the scheduler, not reset,
    would call it a non-key frame)."""
    scheduler = _ResetRaises(10)
    seg = VideoSegmenter(band_model, CopyPropagator(), scheduler)
    img = _image((60, 80))
    assert [seg.push(img, 0.1 * i).is_key_frame for i in range(2)] == [True, False]
    scheduler.armed = True
    with pytest.raises(RuntimeError, match="scheduler reset failed"):
        seg.reset()
    with pytest.raises(RuntimeError, match="scheduler reset failed"):
        seg.replace(propagator=CopyPropagator())
    r = seg.push(img, 0.2)
    assert (r.is_key_frame, r.key_frame_reason, r.key_frame_index) == (True, "reset", 2)
    assert not seg.push(img, 0.3).is_key_frame


def test_a_source_change_whose_scheduler_reset_raises_still_drops_the_key_frame(band_model):
    """Another camera's frame resets the segmenter, not only its scheduler: the key frame is dropped
    before the scheduler's reset raises, so no later frame is propagated from the first camera's key frame."""
    scheduler = _ResetRaises(10)
    seg = VideoSegmenter(band_model, CopyPropagator(), scheduler)
    img = _image((60, 80))
    assert [seg.push(img, 0.1 * i, source="front").is_key_frame for i in range(2)] == [True, False]
    scheduler.armed = True
    with pytest.raises(RuntimeError, match="scheduler reset failed"):
        seg.push(img, 0.2, source="rear")
    r = seg.push(img, 0.3)  # untracked: no reset of its own
    assert (r.is_key_frame, r.key_frame_reason, r.key_frame_index) == (True, "reset", 2)  # the refused frame took no index


def test_a_new_source_is_a_key_frame(band_model):
    """push(source=...): a frame from another camera (ROS header.frame_id) is a key frame; a frame
    refused by the frame checks does not count as the new source."""
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    img = _image((60, 80))
    reasons = [seg.push(img, 0.1 * i, source="front").key_frame_reason for i in range(3)]
    assert reasons == ["first", "", ""]
    with pytest.raises(FrameError):
        seg.push(img[:, :, :2], 0.3, source="rear")  # refused: the source stays "front"
    assert seg.push(img, 0.4, source="front").key_frame_reason == ""
    assert seg.push(img, 0.5, source="rear").key_frame_reason == "frame_id_change"
    assert seg.push(img, 0.6, source="rear").key_frame_reason == ""
    assert seg.push(img, 0.7).key_frame_reason == ""  # untracked frames change nothing
    assert seg.push(img, 0.8, source="front").key_frame_reason == "frame_id_change"
    # a scheduler swapped in (a schedule changed while the node runs) has seen no frame; the other
    # camera's frame after it is still reported as one (it was "reset", and the node logged nothing)
    seg.replace(scheduler=FixedIntervalScheduler(10))
    assert seg.push(img, 0.9, source="rear").key_frame_reason == "frame_id_change"
    seg.replace(scheduler=FixedIntervalScheduler(10))
    assert seg.push(img, 1.0, source="rear").key_frame_reason == "reset"


def test_a_new_source_whose_post_processing_fails_still_counts(band_model, monkeypatch):
    """The other camera's key frame is kept when its post-processing fails (documented), so the
    first camera's next frame must be a key frame again, not propagated from it."""
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    front, rear = _image((60, 80), seed=1), _image((60, 80), seed=2)
    assert [seg.push(front, 0.1 * i, source="front").is_key_frame for i in range(2)] == [True, False]
    monkeypatch.setattr(seg, "postprocess", lambda *a, **k: (_ for _ in ()).throw(MemoryError("post-processing")))
    with pytest.raises(MemoryError):
        seg.push(rear, 0.2, source="rear")
    monkeypatch.undo()
    r = seg.push(front, 0.3, source="front")
    assert (r.is_key_frame, r.key_frame_reason, r.key_frame_index) == (True, "frame_id_change", 3)


def test_a_pre_processing_failure_resets_like_a_segmentor_failure(band_model, monkeypatch):
    """The scheduler has counted the frame (here a key frame) before the canvas is made: when that
    fails (e.g. out of memory copying to the GPU), the next frame is a key frame, not propagated
    from the key frame before."""
    import mpvss_ros.segmenter as segmenter_module

    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(2))
    img = _image((60, 80))
    assert [seg.push(img, 0.1 * i).is_key_frame for i in range(2)] == [True, False]
    monkeypatch.setattr(segmenter_module, "canvas_tensor", lambda *a, **k: (_ for _ in ()).throw(MemoryError("copy")))
    with pytest.raises(MemoryError):
        seg.push(img, 0.2)  # the scheduler's key frame
    monkeypatch.undo()
    r = seg.push(img, 0.3)
    assert (r.is_key_frame, r.key_frame_reason, r.key_frame_index) == (True, "reset", 3)


def test_a_scheduler_that_has_seen_frames_starts_afresh(band_model):
    """A scheduler used before (e.g. to preview a schedule with schedule_key_frames) keeps counting
    from its own key frame unless the segmenter resets it: the first frame would be reported as a
    canvas change and the next key frame come early."""
    scheduler = FixedIntervalScheduler(5)
    for i in range(3):
        scheduler.decide(_image((60, 80)), 0.1 * i)
    seg = VideoSegmenter(band_model, CopyPropagator(), scheduler)
    results = [seg.push(_image((60, 80), seed=i), 1.0 + 0.1 * i) for i in range(11)]
    assert [(i, r.key_frame_reason) for i, r in enumerate(results) if r.is_key_frame] == \
        [(0, "first"), (5, "interval"), (10, "interval")]


def test_reset_with_a_reason(band_model):
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    img = _image((60, 80))
    seg.reset(reason="frame_id_change")  # before any frame: still the first
    assert seg.push(img, 0.0).key_frame_reason == "first"
    seg.reset(reason="frame_id_change")
    assert seg.push(img, 0.1).key_frame_reason == "frame_id_change"


@pytest.mark.parametrize("where", ["class_logits", "mask_logits", "query_embeddings", "propagation", "direct_flow",
                                   "chained_flow"])
def test_non_finite_logits_raise_instead_of_labelling_everything_class_0(band_model, monkeypatch, where):
    """NaN logits (diverged weights, an fp16 overflow) gave labels of class 0 everywhere, published
    as a segmentation; now the frame raises and the next one is a key frame. A NaN flow came out
    of the warp as finite mask logits (grid_sample clamps NaN sampling positions to the border),
    so that frame was published too."""
    from mpvss_ros.segmenter import NonFiniteOutputError

    prop = OpticalFlowPropagator(chain_flow=where == "chained_flow") if where.endswith("_flow") else CopyPropagator()
    seg = VideoSegmenter(band_model, prop, FixedIntervalScheduler(10))
    img = _image((60, 80))
    assert seg.push(img, 0.0).is_key_frame
    if where == "propagation":
        real = seg.propagator.propagate
        monkeypatch.setattr(seg.propagator, "propagate", lambda key, frame: real(key, frame) * float("nan"))
    elif where.endswith("_flow"):
        real_flow = prop.flow
        monkeypatch.setattr(prop, "flow", lambda cur, key: real_flow(cur, key) * np.float32("nan"))
    else:
        real = band_model.segment_key_frame

        def poisoned(*args, **kwargs):
            key = real(*args, **kwargs)
            bad = getattr(key, where).clone()
            bad.view(-1)[0] = float("inf") if where == "class_logits" else float("nan")
            return key._replace(**{where: bad}) if hasattr(key, "_replace") else dataclasses.replace(key, **{where: bad})

        monkeypatch.setattr(band_model, "segment_key_frame", poisoned)
        seg.reset()
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite"):
        seg.push(img, 0.1)
    monkeypatch.undo()
    r = seg.push(img, 0.2)
    assert r.is_key_frame and r.key_frame_reason == "non_finite"


def test_replace_swaps_propagation_and_schedule_from_a_key_frame(band_model):
    """A run-time parameter change: the new propagator and scheduler take over, starting from a
    key frame reported as ``reset`` (the fresh scheduler's ``first``); on a brand-new segmenter
    the first key frame stays ``first``."""
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    img = _image((60, 80))
    assert [seg.push(img, 0.1 * i).is_key_frame for i in range(3)] == [True, False, False]
    flow, every_second = OpticalFlowPropagator(), FixedIntervalScheduler(2)
    seg.replace(propagator=flow, scheduler=every_second)
    assert seg.propagator is flow and seg.scheduler is every_second
    r = [seg.push(img, 0.3 + 0.1 * i) for i in range(4)]
    assert [(x.is_key_frame, x.key_frame_reason) for x in r] == [(True, "reset"), (False, ""), (True, "interval"),
                                                                 (False, "")]
    assert r[0].key_frame_index == 3
    seg.replace()  # nothing swapped: still a key frame next
    assert seg.push(img, 0.7).key_frame_reason == "reset"
    fresh = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    fresh.replace(scheduler=FixedIntervalScheduler(3))
    assert fresh.push(img, 0.0).key_frame_reason == "first"


# ------------------------------------------------------------------ propagators


def test_copy_propagation_returns_key_labels_exactly_lite(lite, bikes_frames):
    seg = _segmenter(lite, "copy", "fixed:3")
    a = seg.push(bikes_frames[5], 0.0)
    b = seg.push(bikes_frames[5], 0.04)
    assert a.is_key_frame and not b.is_key_frame
    np.testing.assert_array_equal(b.labels, a.labels)
    np.testing.assert_array_equal(b.confidence, a.confidence)


def test_copy_propagation_returns_key_labels_exactly(band_model, bikes_frames):
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(3))
    a = seg.push(bikes_frames[5], 0.0)
    b = seg.push(bikes_frames[5], 0.04)
    c = seg.push(bikes_frames[9], 0.08)  # another image: copy still holds the key frame's labels
    assert len(np.unique(a.labels)) >= 3
    assert [a.is_key_frame, b.is_key_frame, c.is_key_frame] == [True, False, False]
    np.testing.assert_array_equal(b.labels, a.labels)
    np.testing.assert_array_equal(c.labels, a.labels)
    np.testing.assert_array_equal(b.confidence, a.confidence)


def test_query_flow_on_real_consecutive_frames(lite, bikes_frames):
    seg = _segmenter(lite, "query_flow", "fixed:4")
    results = [seg.push(bikes_frames[i], i / 25) for i in range(3)]
    assert [r.is_key_frame for r in results] == [True, False, False]
    assert all(r.key_frame_index == 0 for r in results)
    for r in results:
        assert r.labels.shape == (272, 640) and r.confidence.shape == (272, 640)
        assert "propagation" in r.stage_latency_ms or r.is_key_frame
    # The motion module really ran: warped mask logits differ from the key frame's.
    key = seg._key
    tensor = canvas_tensor(bikes_frames[2], seg._key_letterbox)
    with torch.inference_mode():
        warped = seg.propagator.propagate(key, tensor)
    assert warped.shape == key.propagated(key.mask_logits).shape and torch.isfinite(warped).all()
    assert not torch.equal(warped, key.propagated(key.mask_logits))


def test_optical_flow_on_real_consecutive_frames(band_model, bikes_frames):
    """Warping the key labels with the flow tracks the scene better than copying them."""
    key_i, cur_i = 0, 4
    seg = VideoSegmenter(band_model, OpticalFlowPropagator(), FixedIntervalScheduler(10))
    seg.push(bikes_frames[key_i], 0.0)
    warped = seg.push(bikes_frames[cur_i], 0.16)
    assert not warped.is_key_frame and set(warped.stage_latency_ms) == NON_KEY_TIMINGS
    copy = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    copied = [copy.push(bikes_frames[key_i], 0.0), copy.push(bikes_frames[cur_i], 0.16)][1]
    truth = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(1)).push(bikes_frames[cur_i], 0)
    acc_warp = float((warped.labels == truth.labels).mean())
    acc_copy = float((copied.labels == truth.labels).mean())
    assert acc_copy < 0.98  # the camera really moved
    assert acc_warp > acc_copy + 0.02, (acc_warp, acc_copy)


def test_optical_flow_follows_each_new_key_frame(band_model, bikes_frames):
    """The key frame's grey image is taken again at every key frame: a propagator that kept the
    first one warped every later frame from the first key frame's image."""
    seg = VideoSegmenter(band_model, OpticalFlowPropagator(), FixedIntervalScheduler(2))
    a, b = bikes_frames[3], bikes_frames[100]  # two shots
    r = [seg.push(a, 0.0), seg.push(a, 0.04), seg.push(b, 0.08), seg.push(b, 0.12)]
    assert [x.is_key_frame for x in r] == [True, False, True, False]
    assert (r[3].labels == r[2].labels).mean() > 0.999


def test_optical_flow_on_identical_frame_reproduces_key(band_model, bikes_frames):
    seg = VideoSegmenter(band_model, OpticalFlowPropagator(), FixedIntervalScheduler(10))
    a = seg.push(bikes_frames[3], 0.0)
    b = seg.push(bikes_frames[3], 0.04)
    assert not b.is_key_frame
    assert (b.labels == a.labels).mean() > 0.999


def test_pool_flow_keeps_a_constant_flow_in_grid_pixels():
    flow = np.zeros((64, 80, 2), np.float32)
    flow[..., 0], flow[..., 1] = 3.0, -2.0  # pixels of the 64x80 grid
    pooled = pool_flow(flow, (16, 20))  # 4x coarser on both axes
    assert pooled.shape == (16, 20, 2) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled[..., 0], 0.75, rtol=1e-6)
    np.testing.assert_allclose(pooled[..., 1], -0.5, rtol=1e-6)
    aniso = pool_flow(flow, (32, 10))  # y halves, x divides by 8
    np.testing.assert_allclose(aniso[0, 0], [3.0 / 8, -1.0], rtol=1e-6)
    assert grid_hw((480, 640), 16) == (30, 40) and grid_hw((360, 480), 16) == (23, 30)
    # a fractional stride (the lite motion module's 32/3) gives the motion module's own flow grid
    from mpvss_ros.nn.motion import flow_grid_size
    for scale, hw in ((0.375, (480, 640)), (0.375, (96, 128)), (0.25, (480, 640)), (0.5, (360, 480))):
        assert grid_hw(hw, 4 / scale) == flow_grid_size(scale, *hw), (scale, hw)
    with pytest.raises(ValueError, match="within"):
        pool_flow(flow, (65, 20))
    with pytest.raises(ValueError, match=r"\(h, w, 2\)"):
        pool_flow(flow[..., :1], (16, 20))
    with pytest.raises(ValueError, match="grid_stride"):
        OpticalFlowPropagator(grid_stride=0)


def test_optical_flow_on_a_coarse_grid_still_tracks_a_real_pan(bikes_frames):
    """A global pan survives averaging the flow onto the 1/16 grid: the pooled-flow warp stays
    close to the full-flow warp and far closer to the truth than copying."""
    img = cv2.resize(bikes_frames[0], (320, 128), interpolation=cv2.INTER_AREA)
    shift = 12  # canvas pixels, the content moves left: current(p) = key(p + 12)
    key_t = torch.from_numpy(img[:, :-shift]).permute(2, 0, 1)[None].float()
    cur_t = torch.from_numpy(img[:, shift:]).permute(2, 0, 1)[None].float()
    key_t, cur_t = (F.pad(t, (0, 320 - t.shape[-1])) for t in (key_t, cur_t))
    h, w = 128, 320 - shift
    # Mask logits: the key frame's own grey levels on the 1/4 grid (a textured "mask").
    logits = F.interpolate(key_t.mean(1, keepdim=True), size=(32, 80), mode="area") / 255.0
    key = KeyFrameState(key_t, (h, w), torch.zeros(1, 1, 2), logits, torch.zeros(1, 1, 4))
    truth = F.interpolate(cur_t.mean(1, keepdim=True), size=(32, 80), mode="area") / 255.0
    inner = (slice(None), slice(None), slice(4, 28), slice(4, 70))  # away from borders and padding
    err = lambda x: float((x - truth)[inner].abs().mean())  # noqa: E731
    full = OpticalFlowPropagator().propagate(key, cur_t)
    coarse = OpticalFlowPropagator(grid_stride=16).propagate(key, cur_t)
    copied = err(logits)
    assert err(full) < 0.1 * copied, (err(full), copied)
    assert err(coarse) < 0.1 * copied, (err(coarse), copied)
    for preset in DIS_PRESETS:  # every preset the node and the CLI accept tracks the pan
        warped = OpticalFlowPropagator(preset=preset, flow_scale=1.0).propagate(key, cur_t)
        assert err(warped) < 0.1 * copied, (preset, err(warped), copied)
    with pytest.raises(ValueError, match="DIS preset"):
        OpticalFlowPropagator(preset="slow")
    for bad in (0.0, 0.05, 1.5):  # [0.1, 1], the node parameter's range
        with pytest.raises(ValueError, match="flow_scale"):
            OpticalFlowPropagator(flow_scale=bad)
    with pytest.raises(ValueError, match="method"):
        OpticalFlowPropagator("lucas_kanade")
    assert OpticalFlowPropagator(flow_scale=0.1).flow_scale == 0.1


def test_optical_flow_very_wide_frame_does_not_crash():
    assert Letterbox.fit((33, 1000), (360, 480)).padded_hw == (32, 480)
    # Run in a subprocess: the failure mode is a segfault, which would kill pytest itself.
    code = textwrap.dedent("""
        import numpy as np, torch
        from mpvss_ros.nn.mpvss import KeyFrameState
        from mpvss_ros.propagation import OpticalFlowPropagator
        g = torch.Generator().manual_seed(0)
        key_img = torch.rand((1, 3, 32, 480), generator=g) * 255
        cur_img = torch.roll(key_img, 3, dims=-1)
        key = KeyFrameState(key_img, (16, 480), torch.zeros(1, 4, 5), torch.randn(1, 4, 8, 120), torch.zeros(1, 4, 8))
        out = OpticalFlowPropagator().propagate(key, cur_img)
        assert out.shape == (1, 4, 8, 120), out.shape
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


# ------------------------------------------------------------------ bad frames


@pytest.mark.parametrize("image, stamp, match", [
    (np.zeros((20, 30, 3), np.float32), 0.0, "uint8"),
    (np.zeros((20, 30), np.uint8), 0.0, r"\(H, W, 3\)"),
    (np.zeros((20, 30, 4), np.uint8), 0.0, r"\(H, W, 3\)"),
    (np.zeros((0, 10, 3), np.uint8), 0.0, "empty"),
    (np.zeros((10, 0, 3), np.uint8), 0.0, "empty"),
    (np.zeros((20, 30, 3), np.uint8).tolist(), 0.0, "numpy array, got list"),
    (None, 0.0, "numpy array, got NoneType"),
    (np.zeros((20, 30, 3), np.uint8), math.nan, "stamp"),
    (np.zeros((20, 30, 3), np.uint8), math.inf, "stamp"),
    (np.zeros((20, 30, 3), np.uint8), None, "stamp must be a number of seconds, got None"),
    (np.zeros((20, 30, 3), np.uint8), "0.5", "stamp must be a number of seconds, got '0.5'"),
    (np.zeros((20, 30, 3), np.uint8), 10**400, "stamp must be a number of seconds"),
    (np.zeros((20, 30, 3), np.uint8), np.zeros(2), "stamp must be a number of seconds"),
])
def test_bad_frames_raise_frame_error(lite, image, stamp, match):
    seg = _segmenter(lite, "copy", "fixed:3")
    with pytest.raises(FrameError, match=match):
        seg.push(image, stamp)
    assert issubclass(FrameError, ValueError)
    assert seg._frame_index == 0 and seg._key is None  # nothing was consumed


def test_bad_frames_leave_state_untouched(band_model):
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(3))
    for bad in (np.zeros((5, 5), np.uint8), np.zeros((5, 5, 3), np.float64)):
        with pytest.raises(FrameError):
            seg.push(bad, 0.0)
    with pytest.raises(FrameError):
        seg.push(_image((30, 40)), math.nan)
    r = seg.push(_image((30, 40)), 0.0)
    assert (r.frame_index, r.is_key_frame, r.key_frame_reason) == (0, True, "first")
    assert seg.push(_image((30, 40)), 0.1).key_frame_index == 0


def test_check_frame_makes_contiguous():
    img = np.zeros((10, 20, 3), np.uint8)[:, ::2]
    out = check_frame(img)
    assert out.flags.c_contiguous and out.shape == (10, 10, 3)


# ------------------------------------------------------------------ postprocess


def _reference_resize(scores, lb):
    """(1, C, h, w) scores on the canvas or the 1/4 mask grid -> (1, C, H, W): upsampled to the
    padded canvas, cropped to the frame's area, resized to the input (Mask2Former's order)."""
    scores = F.interpolate(scores, size=lb.padded_hw, mode="bilinear", align_corners=False)
    scores = scores[:, :, : lb.resized_hw[0], : lb.resized_hw[1]]
    if tuple(scores.shape[-2:]) != lb.input_hw:
        scores = F.interpolate(scores, size=lb.input_hw, mode="bilinear", align_corners=False)
    return scores


def _reference_postprocess(class_logits, mask_logits, lb, score_resolution):
    """Direct (unchunked) post-processing: all K score maps resized at once, then argmax."""
    probs = class_logits.softmax(-1)[..., :-1]                      # (1, N, K)
    if score_resolution == "canvas":   # Mask2Former: upsample mask logits, then score
        masks = F.interpolate(mask_logits, size=lb.padded_hw, mode="bilinear", align_corners=False)
        scores = torch.einsum("bnk,bnhw->bkhw", probs, masks.sigmoid())
    else:                              # score on the mask grid, then upsample the scores
        scores = torch.einsum("bnk,bnhw->bkhw", probs, mask_logits.sigmoid())
    scores = _reference_resize(scores, lb)
    best, labels = scores[0].max(0)
    conf = torch.round(255.0 * best / scores[0].sum(0))
    return labels.numpy(), conf.numpy()


@pytest.mark.parametrize("score_resolution", ["canvas", "mask"])
@pytest.mark.parametrize("num_classes", [40, 300])
@pytest.mark.parametrize("input_hw, canvas", [
    ((75, 101), (48, 64)),    # shrink into the canvas
    ((21, 29), (48, 64)),     # enlarge into the canvas
    ((50, 70), None),         # no resize, padding only
])
def test_postprocess_chunked_equals_direct(make_band_model, num_classes, input_hw, canvas, score_resolution):
    seg = VideoSegmenter(make_band_model(num_classes, score_resolution), CopyPropagator(), FixedIntervalScheduler(1))
    lb = Letterbox.fit(input_hw, canvas, 32)
    assert lb.input_hw != lb.resized_hw or canvas is None
    g = torch.Generator().manual_seed(num_classes + input_hw[0])
    n = 9
    class_logits = torch.randn((1, n, num_classes + 1), generator=g) * 3
    mask_logits = torch.randn((1, n, lb.padded_hw[0] // 4, lb.padded_hw[1] // 4), generator=g) * 4
    labels, conf = seg.postprocess(class_logits, mask_logits, lb)
    ref_labels, ref_conf = _reference_postprocess(class_logits, mask_logits, lb, score_resolution)
    assert labels.shape == input_hw and conf.shape == input_hw and conf.dtype == np.uint8
    assert labels.dtype == (np.uint8 if num_classes <= 255 else np.uint16)
    assert len(np.unique(labels)) > 3  # a non-trivial case
    np.testing.assert_array_equal(labels, ref_labels)
    diff = np.abs(conf.astype(np.int32) - ref_conf.astype(np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def _smooth_scores(hw, classes, seed, sharpness=4.0):
    """(h, w, C) float32 scores with blob-shaped class regions, like real class score maps."""
    rng = np.random.default_rng(seed)
    low = rng.random((max(2, hw[0] // 6), max(2, hw[1] // 6), classes), dtype=np.float32) ** sharpness
    x = cv2.resize(low, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(x.reshape(hw[0], hw[1], classes))


def _resize_then_argmax(x, out_hw):
    y = cv2.resize(x, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR).reshape(out_hw[0], out_hw[1], -1)
    best, labels = torch.from_numpy(y).max(dim=-1)
    return best, labels


@pytest.mark.parametrize("src_hw, out_hw", [
    ((360, 640), (1080, 1920)),   # the 480 x 640 canvas area of a 1080p frame, x3
    ((360, 640), (720, 1280)),    # 720p, x2
    ((90, 160), (361, 479)),      # non-integer factors, odd output
    ((7, 5), (30, 41)),
    ((1, 9), (4, 40)),            # a single source row
    ((40, 60), (40, 60)),         # same size
    ((60, 80), (37, 51)),         # shrinking: correct, though not where it saves time
    ((120, 160), (29, 37)),       # shrinking by 4: the nearest source pixel can lie 2 pixels from a tap
])
@pytest.mark.parametrize("classes, smooth", [(11, True), (11, False), (2, True), (1, True), (16, False)])
def test_argmax_of_upsampled_equals_resizing_every_class(src_hw, out_hw, classes, smooth):
    """Labels equal to cv2.resize of all class maps then arg-max, maximum to float rounding: on
    smooth maps (few boundary pixels) and on noise (almost every pixel is near a boundary)."""
    from mpvss_ros.segmenter import argmax_of_upsampled

    seed = src_hw[0] * 1000 + out_hw[1] + classes
    x = _smooth_scores(src_hw, classes, seed) if smooth else \
        np.random.default_rng(seed).random((*src_hw, classes), dtype=np.float32)
    best, labels = argmax_of_upsampled(x, out_hw)
    ref_best, ref_labels = _resize_then_argmax(x, out_hw)
    assert best.shape == labels.shape == out_hw and labels.dtype == torch.uint8 and best.dtype == torch.float32
    if classes > 1:
        assert len(torch.unique(ref_labels)) > 1  # a non-trivial case
    assert torch.equal(labels.long(), ref_labels)
    torch.testing.assert_close(best, ref_best, atol=1e-5, rtol=0)


def test_argmax_of_upsampled_interpolates_boundaries():
    """Where the four source pixels disagree, the enlarged arg-max is not any source pixel's label:
    a thin class-1 ridge between two class-0 pixels wins only at its centre when enlarged."""
    from mpvss_ros.segmenter import argmax_of_upsampled

    x = np.zeros((3, 3, 2), np.float32)
    x[:, :, 0] = 0.5
    x[:, 1, 1] = 0.6         # the middle column is class 1, barely
    x[:, 0, 1] = x[:, 2, 1] = 0.45
    best, labels = argmax_of_upsampled(x, (3, 30))
    ref_best, ref_labels = _resize_then_argmax(x, (3, 30))
    assert torch.equal(labels.long(), ref_labels)
    nearest = cv2.resize(x.argmax(-1).astype(np.uint8), (30, 3), interpolation=cv2.INTER_NEAREST_EXACT)
    assert (nearest != ref_labels.numpy()).any()   # nearest-neighbour labels alone would be wrong here
    torch.testing.assert_close(best, ref_best, atol=1e-6, rtol=0)


def test_argmax_of_upsampled_rejects_bad_scores():
    from mpvss_ros.segmenter import argmax_of_upsampled

    with pytest.raises(ValueError, match="1 <= C <= 255"):
        argmax_of_upsampled(np.zeros((4, 4), np.float32), (8, 8))
    with pytest.raises(ValueError, match="1 <= C <= 255"):
        argmax_of_upsampled(np.zeros((4, 4, 300), np.float32), (8, 8))
    with pytest.raises(ValueError, match="1 <= C <= 255"):  # 256 classes: class 255 would be a uint8 label of 255
        argmax_of_upsampled(np.zeros((4, 4, 256), np.float32), (8, 8))


def test_a_tie_across_class_chunks_goes_to_the_lower_class_as_argmax():
    """Post-processing takes the arg-max chunk by chunk (16 classes each): a tie between class 2
    and class 18 goes to class 2, as torch's and numpy's arg-max."""
    from mpvss_ros.segmenter import _best_class

    scores = torch.full((20, 8, 8), 0.25)  # the mask grid of the 32 x 32 padded canvas
    scores[2] = scores[18] = 0.5  # binary fractions: bilinear resizing keeps them exact, a true tie
    lb = Letterbox.fit((32, 32), (16, 16))  # enlarged to the input: still chunked with > 16 classes
    best, idx = _best_class(scores, lb)
    assert idx.shape == (32, 32) and (idx == 2).all() and (best == 0.5).all()


def test_the_canvas_padding_is_exactly_zero():
    """The key-frame graph zeroes its normalised padding and the non-key graph's motion module
    relies on zero raw padding: canvas_tensor's bottom/right padding is 0, the frame at the top left."""
    frame = _image((300, 500), seed=9)
    lb = Letterbox.fit(frame.shape[:2], (480, 640))
    assert lb.resized_hw == (384, 640) and lb.padded_hw == (384, 640)
    lb = Letterbox.fit(frame.shape[:2], (480, 650))  # 390 x 650 padded to 416 x 672
    t = canvas_tensor(frame, lb)
    h, w = lb.resized_hw
    assert t.shape == (1, 3, *lb.padded_hw) and t[..., h:, :].abs().sum() == 0 and t[..., :, w:].abs().sum() == 0
    assert t[..., :h, :w].abs().sum() > 0


@pytest.mark.parametrize("input_hw", [(1080, 1920), (725, 1283), (100, 64)])
def test_postprocess_enlarging_takes_the_boundary_shortcut(make_band_model, monkeypatch, input_hw):
    """Frames larger than the canvas (11 classes, on the 480 x 640 canvas of the shipped config and
    a small one) go through argmax_of_upsampled and give the labels of resizing every class map
    with cv2 (the path it replaces), the reference's (F.interpolate) except at near-ties, and its
    confidence."""
    import mpvss_ros.segmenter as segmenter_module
    from mpvss_ros.nn.mpvss import semantic_scores

    calls = []
    real = segmenter_module.argmax_of_upsampled
    monkeypatch.setattr(segmenter_module, "argmax_of_upsampled", lambda *a: calls.append(a[1]) or real(*a))
    seg = VideoSegmenter(make_band_model(11, "mask"), CopyPropagator(), FixedIntervalScheduler(1))
    canvas = (480, 640) if input_hw[0] > 500 else (48, 32)
    lb = Letterbox.fit(input_hw, canvas, 32)
    assert lb.input_hw[0] > lb.resized_hw[0]
    g = torch.Generator().manual_seed(input_hw[1])
    class_logits = torch.randn((1, 9, 12), generator=g) * 3
    low = torch.randn((1, 9, 6, 8), generator=g) * 6     # smooth masks: blobs, as real mask logits
    mask_logits = F.interpolate(low, size=(lb.padded_hw[0] // 4, lb.padded_hw[1] // 4), mode="bilinear")
    labels, conf = seg.postprocess(class_logits, mask_logits, lb)
    assert calls == [lb.input_hw]
    assert labels.dtype == np.uint8 and len(np.unique(labels)) > 3
    every_class = segmenter_module._scores_to_input_size(semantic_scores(class_logits, mask_logits)[0], lb)
    np.testing.assert_array_equal(labels, every_class.argmax(dim=-1).numpy())
    ref_labels, ref_conf = _reference_postprocess(class_logits, mask_logits, lb, "mask")
    top2 = _reference_resize(semantic_scores(class_logits, mask_logits), lb)[0].topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-4).numpy()
    assert clear.mean() > 0.999
    np.testing.assert_array_equal(labels[clear], ref_labels[clear])
    diff = np.abs(conf.astype(np.int32) - ref_conf.astype(np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


@pytest.mark.parametrize("input_hw, canvas", [
    ((75, 101), (48, 64)), ((21, 29), (48, 64)), ((50, 70), None), ((36, 48), (48, 64)), ((360, 480), (480, 640)),
])
def test_score_resize_cv2_and_torch_paths_agree(input_hw, canvas):
    """CPU tensors are resized with cv2 in (H, W, C) layout, GPU tensors with F.interpolate: both
    follow the reference (upsample to the padded canvas, crop, resize to the input)."""
    from mpvss_ros.segmenter import _scores_to_input_size

    lb = Letterbox.fit(input_hw, canvas, 32)
    scores = torch.rand((7, lb.padded_hw[0] // 4, lb.padded_hw[1] // 4), generator=torch.Generator().manual_seed(3))
    ref = _reference_resize(scores[None], lb)[0].permute(1, 2, 0)
    for use_cv2 in (True, False):
        got = _scores_to_input_size(scores, lb, use_cv2=use_cv2)
        assert got.shape == (*input_hw, 7)
        torch.testing.assert_close(got, ref, atol=3e-5, rtol=0)  # cv2 rounds its float coefficients differently


@pytest.mark.parametrize("input_hw, canvas", [((360, 480), (480, 640)), ((272, 640), (480, 640)), ((80, 100), None)])
def test_score_resize_samples_where_the_canvas_maps_each_pixel(input_hw, canvas):
    """A score ramp over the mask grid's columns/rows (bilinear interpolation reproduces it
    exactly): input pixel centre x must read grid coordinate (x + 0.5) * w_frame / (4 W) - 0.5,
    where the letterbox puts it (two bilinear steps reproduce a ramp as one does)."""
    from mpvss_ros.segmenter import _scores_to_input_size

    lb = Letterbox.fit(input_hw, canvas, 32)
    gh, gw = lb.padded_hw[0] // 4, lb.padded_hw[1] // 4
    ramp = torch.stack([torch.arange(gw, dtype=torch.float32).expand(gh, gw),
                        torch.arange(gh, dtype=torch.float32)[:, None].expand(gh, gw)])
    got = _scores_to_input_size(ramp, lb).numpy()
    for axis, n in ((1, input_hw[1]), (0, input_hw[0])):
        want = (np.arange(n) + 0.5) * lb.resized_hw[axis] / (4 * n) - 0.5
        inner = (want > 1) & (want < lb.resized_hw[axis] / 4 - 2)   # away from the frame's borders
        line = got[input_hw[0] // 2, :, 0] if axis == 1 else got[:, input_hw[1] // 2, 1]
        assert inner.sum() > n // 2
        np.testing.assert_allclose(line[inner], want[inner], atol=2e-3)


@pytest.mark.parametrize("score_resolution", ["canvas", "mask"])
def test_postprocess_confidence_hand_built(make_band_model, score_resolution):
    """Two classes, one query each, masks saturated: confidence = round(255 * max / sum)."""
    seg = VideoSegmenter(make_band_model(2, score_resolution), CopyPropagator(), FixedIntervalScheduler(1))
    lb = Letterbox.fit((32, 32), None)
    # query 0: class 0 with p=0.75, class 1 with 0.25; query 1 the other way round; no-object ~0
    class_logits = torch.tensor([[[0.75, 0.25, 1e-9], [0.25, 0.75, 1e-9]]]).log()
    mask_logits = torch.full((1, 2, 8, 8), -30.0)
    mask_logits[0, 0, :, :4] = 30.0   # left half: only query 0
    mask_logits[0, 1, :, 4:] = 30.0   # right half: only query 1
    labels, conf = seg.postprocess(class_logits, mask_logits, lb)
    assert labels[:, :12].tolist() == [[0] * 12] * 32 and labels[:, 20:].tolist() == [[1] * 12] * 32
    assert np.all(conf[:, :12] == round(255 * 0.75)) and np.all(conf[:, 20:] == round(255 * 0.75))


def test_segmenter_scores_every_frame_over_the_active_queries(bikes_frames):
    """Key and non-key frames use the same active queries: copy reproduces the key frame, the
    propagated masks are those queries' masks, and min_query_score 0 keeps all N."""
    from dataclasses import replace

    model = load_model("mpvss_lite").model  # its own copy: the config is changed below
    cfg = model.cfg
    n = cfg.transformer_decoder.num_queries
    model.cfg = replace(cfg, postprocess=replace(cfg.postprocess, min_query_score=0.5))
    seg = VideoSegmenter(model, QueryFlowPropagator(model), FixedIntervalScheduler(3))
    seg.push(bikes_frames[0], 0.0)
    key = seg._key
    expected = (key.class_logits[0].softmax(-1)[:, :-1].amax(-1) >= 0.5).nonzero().flatten()
    assert key.active is not None and key.active.tolist() == expected.tolist() and 0 < len(expected) < n
    with torch.inference_mode():
        warped = seg.propagator.propagate(key, canvas_tensor(bikes_frames[1], seg._key_letterbox))
    assert warped.shape[1] == len(expected)
    copy = VideoSegmenter(model, CopyPropagator(), FixedIntervalScheduler(3))
    a, b = copy.push(bikes_frames[0], 0.0), copy.push(bikes_frames[1], 0.04)
    np.testing.assert_array_equal(b.labels, a.labels)
    model.cfg = replace(cfg, postprocess=replace(cfg.postprocess, min_query_score=0.0))
    seg = VideoSegmenter(model, CopyPropagator(), FixedIntervalScheduler(3))
    seg.push(bikes_frames[0], 0.0)
    assert seg._key.active is None and seg._key.propagated(seg._key.mask_logits).shape[1] == n


@pytest.mark.parametrize("num_classes, dtype", [(254, np.uint8), (255, np.uint8), (256, np.uint16)])
def test_label_dtype_keeps_255_for_unlabelled(make_band_model, num_classes, dtype):
    # mono8 only while every class ID stays below 255, vision_msgs' VisionClass.UNLABELED
    seg = VideoSegmenter(make_band_model(num_classes), CopyPropagator(), FixedIntervalScheduler(1))
    frame = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    assert seg.push(frame, 0.0).labels.dtype == dtype


@pytest.mark.parametrize("chain_flow", [True, False])
def test_propagation_does_not_pull_the_padding_class_in(band_model, chain_flow):
    # 720p on the 480 x 640 canvas: 360 x 640 valid, padded to 384 x 640. The scene tilts up 24
    # pixels a frame, so the flow at the bottom edge points below the valid area, into the
    # black padding, which the band model labels class 0; the true bottom is bright (class 4).
    rng = np.random.default_rng(0)
    h, w = 720, 1280
    texture = cv2.resize(rng.integers(0, 40, ((h + 400) // 8, w // 8)).astype(np.uint8), (w, h + 400),
                         interpolation=cv2.INTER_CUBIC)
    texture[500:] += 215
    seg = VideoSegmenter(band_model, OpticalFlowPropagator(chain_flow=chain_flow), FixedIntervalScheduler(10))
    for i in range(5):
        grey = texture[24 * i : 24 * i + h]
        result = seg.push(np.repeat(grey[:, :, None], 3, axis=2), i * 0.04)
        bottom = result.labels[-40:]
        assert (bottom == 0).sum() == 0, (i, np.bincount(bottom.ravel(), minlength=5))


def test_failed_key_frame_leaves_no_half_state(band_model):
    # the scheduler counts a frame as the key frame before the segmentor runs; when the
    # segmentor fails (a GPU out of memory), the next frame must be a key frame, not propagated
    # from the previous key frame across the cut
    class Flaky(type(band_model)):
        fail = False

        def segment_key_frame(self, image, valid_hw=None):
            if self.fail:
                raise RuntimeError("CUDA out of memory (simulated)")
            return super().segment_key_frame(image, valid_hw)

    model = Flaky(band_model.cfg.input, 5, band_model.cfg.postprocess)
    seg = VideoSegmenter(model, CopyPropagator(), AdaptiveScheduler())
    dark, bright = np.full((360, 480, 3), 10, np.uint8), np.full((360, 480, 3), 240, np.uint8)
    assert seg.push(dark, 0.0).is_key_frame and not seg.push(dark, 0.04).is_key_frame
    model.fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        seg.push(bright, 0.08)  # a cut: a key frame that fails
    model.fail = False
    after = seg.push(bright, 0.12)
    assert after.is_key_frame and after.key_frame_reason == "reset" and set(np.unique(after.labels)) == {4}


def test_scheduler_refuses_non_finite_stamps():
    frame = np.zeros((24, 32, 3), np.uint8)
    for scheduler in (FixedIntervalScheduler(3), AdaptiveScheduler()):
        scheduler.decide(frame, 0.0)
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match="finite"):
                scheduler.decide(frame, bad)
        assert scheduler.decide(frame, -5.0).reason == "time_backwards"  # the state was not spoilt


def test_setup_time_of_fixed_shape_backends_is_summed_and_kept_out_of_frame_times(band_model, monkeypatch):
    """A backend that prepares each new size (an ONNX export, a TensorRT build) counts that in
    ``setup_s``, summed over sizes, not in the frames' ``total``."""
    import time as time_module

    prepared = []

    def prepare(hw):
        if hw not in prepared:
            prepared.append(hw)
            time_module.sleep(0.2)

    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(2))
    monkeypatch.setattr(seg.model, "prepare", prepare, raising=False)  # the backend the segmenter runs
    totals = [seg.push(_image(hw), i / 10).stage_latency_ms["total"]
              for i, hw in enumerate([(40, 50), (40, 50), (30, 60), (30, 60)])]
    assert len(prepared) == 2 and seg.setup_s >= 0.4
    assert max(totals) < 150, totals  # 200 ms of set-up per size, none of it in a frame


def test_a_failed_propagation_makes_the_next_frame_a_key_frame(band_model, monkeypatch):
    """A propagator that raises (a backend without this size's flows graph, out of memory) may
    raise on every frame of the key frame: the next frame is a key frame, so the stream degrades
    to key frames rather than to no output."""
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    img = _image((60, 80))
    assert seg.push(img, 0.0).is_key_frame
    monkeypatch.setattr(seg.propagator, "propagate", lambda key, tensor: (_ for _ in ()).throw(RuntimeError("no flows graph")))
    with pytest.raises(RuntimeError, match="no flows graph"):
        seg.push(img, 0.1)
    r = seg.push(img, 0.2)
    assert r.is_key_frame and r.key_frame_reason == "reset"


def test_failed_backend_preparation_leaves_no_half_state(band_model):
    """Backend.prepare (an ONNX export / engine build) failing on a key frame: the scheduler had
    taken the frame as its key frame while the segmenter kept the previous one, so the next frame
    was propagated from the previous key frame across the cut."""
    seg = VideoSegmenter(band_model, CopyPropagator(), AdaptiveScheduler())
    fail = {"on": False}

    def prepare(hw):
        if fail["on"]:
            raise RuntimeError("engine build failed (simulated)")

    seg.model.prepare = prepare
    dark, bright = np.full((360, 480, 3), 10, np.uint8), np.full((360, 480, 3), 240, np.uint8)
    assert seg.push(dark, 0.0).is_key_frame and not seg.push(dark, 0.04).is_key_frame
    fail["on"] = True
    with pytest.raises(RuntimeError, match="engine build failed"):
        seg.push(bright, 0.08)  # a cut: a key frame whose preparation fails
    fail["on"] = False
    after = seg.push(bright, 0.12)
    assert after.is_key_frame and after.key_frame_reason == "reset" and set(np.unique(after.labels)) == {4}


@pytest.mark.parametrize("hw", [(1, 1), (1, 2), (2, 1), (2, 2), (1, 5), (3, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_class_masks_of_tiny_label_images_keep_their_shape(hw, dtype):
    labels = np.arange(hw[0] * hw[1], dtype=dtype).reshape(hw) % 2 + 3
    from mpvss_ros.segmenter import class_masks_from_labels

    masks = class_masks_from_labels(labels)
    assert all(m.shape == hw and m.dtype == np.uint8 for m in masks.values())
    for c, m in masks.items():
        np.testing.assert_array_equal(m, np.where(labels == c, 255, 0).astype(np.uint8))


def test_a_failed_frame_keeps_its_index(band_model, monkeypatch):
    """frame_index counts every frame pushed: the one whose segmentation failed keeps its index
    (the published indices skip it) instead of the next frame reusing it."""
    from mpvss_ros.segmenter import NonFiniteOutputError

    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    img = _image((60, 80))
    assert seg.push(img, 0.0).frame_index == 0
    monkeypatch.setattr(seg.propagator, "propagate", lambda key, tensor: torch.full_like(key.mask_logits, float("nan")))
    with pytest.raises(NonFiniteOutputError, match=r"\(frame 1, copy\)"):
        seg.push(img, 0.1)
    monkeypatch.undo()
    r = seg.push(img, 0.2)
    assert (r.frame_index, r.key_frame_index, r.key_frame_reason) == (2, 2, "non_finite")
    with pytest.raises(FrameError):
        seg.push(np.zeros((4, 4), np.uint8), 0.3)  # refused before segmentation: no index
    assert seg.push(img, 0.4).frame_index == 3


def test_a_propagator_returning_the_wrong_number_of_masks_resets(band_model, monkeypatch):
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    img = _image((60, 80))
    assert seg.push(img, 0.0).is_key_frame
    real = seg.propagator.propagate
    monkeypatch.setattr(seg.propagator, "propagate", lambda key, tensor: real(key, tensor)[:, :1])
    with pytest.raises(RuntimeError, match="returned 1 masks for"):
        seg.push(img, 0.1)
    monkeypatch.undo()
    assert seg.push(img, 0.2).key_frame_reason == "reset"


def test_canvas_tensor_shrinks_by_area_when_only_the_width_shrinks():
    """A 1 x 2000 strip keeps its height (1 -> 1) and shrinks to 640 wide: area averaging, as the
    docstring says for shrinking, not bilinear sampling that skips pixels."""
    strip = np.random.default_rng(0).integers(0, 256, (1, 2000, 3), dtype=np.uint8)
    lb = Letterbox.fit(strip.shape[:2], (480, 640))
    assert lb.resized_hw == (1, 640)
    expected = cv2.resize(strip, (640, 1), interpolation=cv2.INTER_AREA)
    got = canvas_tensor(strip, lb)[0, :, :1, :640].permute(1, 2, 0).numpy().astype(np.uint8)
    np.testing.assert_array_equal(got, expected)


def test_optical_flow_at_the_finest_grid_stride(band_model):
    """grid_stride = 1 / flow_scale is allowed; on a 448 x 640 canvas at flow_scale 0.3 the grid's
    ceil(448 / stride) is one cell more than the flow's round(448 x 0.3) rows, which raised."""
    prop = OpticalFlowPropagator("dis", flow_scale=0.3, grid_stride=1 / 0.3)
    seg = VideoSegmenter(band_model, prop, FixedIntervalScheduler(5))  # the lite canvas: 480 x 640
    img = _image((448, 640))
    results = [seg.push(np.roll(img, 2 * i, axis=1), 0.1 * i) for i in range(2)]
    assert [r.is_key_frame for r in results] == [True, False]
    assert results[1].labels.shape == (448, 640)


@pytest.mark.parametrize("hw", [(480, 853), (600, 1100), (200, 356)])  # shrink by 0.89, enlarge, shrink by 2.7
def test_resize_frame_pil_bilinear_is_detectron2s_test_resize_and_area_is_opencvs(hw):
    """``pil_bilinear`` is what detectron2's ResizeTransform does to a uint8 frame (Pillow's
    BILINEAR, (w, h) order), the official test resize; ``area`` is OpenCV's area / bilinear. The
    two differ, so the choice reaches the pixels."""
    from PIL import Image

    from mpvss_ros.segmenter import resize_frame

    frame = _image((540, 960), seed=3)
    pil = resize_frame(frame, hw, "pil_bilinear")
    np.testing.assert_array_equal(pil, np.asarray(Image.fromarray(frame).resize((hw[1], hw[0]), Image.BILINEAR)))
    shrink = hw[0] < 540
    cv = cv2.resize(frame, (hw[1], hw[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resize_frame(frame, hw, "area"), cv)
    assert pil.shape == cv.shape == (*hw, 3) and pil.dtype == np.uint8 and not np.array_equal(pil, cv)
    assert pil.flags.writeable  # as OpenCV's: callers may draw on it
    assert resize_frame(frame, (540, 960), "pil_bilinear") is frame
    with pytest.raises(ValueError, match="interpolation must be 'area' or 'pil_bilinear', got 'cubic'"):
        resize_frame(frame, hw, "cubic")


def test_the_segmenter_places_frames_with_the_models_interpolation(monkeypatch):
    """VideoSegmenter resizes with the model's input.interpolation: an official model's canvas
    holds Pillow's resize of the frame, mpvss_lite's OpenCV's."""
    from PIL import Image

    import mpvss_ros.segmenter as segmenter_module
    from mpvss_ros.config import load_model_config
    from mpvss_ros.nn.mpvss import MPVSS

    frame = _image((540, 960), seed=4)
    seen = []
    real = segmenter_module.canvas_tensor
    monkeypatch.setattr(segmenter_module, "canvas_tensor", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    cfg = load_model_config("mpvss_lite")
    for interpolation in ("area", "pil_bilinear"):
        torch.manual_seed(0)
        model = MPVSS(dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, interpolation=interpolation))).eval()
        VideoSegmenter(model, CopyPropagator(), FixedIntervalScheduler(5)).push(frame, 0.0)
    lb = Letterbox.fit((540, 960), (480, 640))
    h, w = lb.resized_hw
    area = seen[0][0, :, :h, :w].permute(1, 2, 0).numpy().astype(np.uint8)
    pil = seen[1][0, :, :h, :w].permute(1, 2, 0).numpy().astype(np.uint8)
    np.testing.assert_array_equal(area, cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(pil, np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR)))



def _resize_shortest_edge(hw: tuple[int, int], short: int, longest: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge.get_output_shape (the official MPVSS test resize), as arithmetic."""
    h, w = hw
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    if max(new_h, new_w) > longest:
        fit = longest / max(new_h, new_w)
        new_h, new_w = new_h * fit, new_w * fit
    return int(new_h + 0.5), int(new_w + 0.5)


@pytest.mark.parametrize("hw", [(540, 960), (720, 1280), (1080, 1920), (480, 640), (360, 480), (375, 1242),
                                (1200, 1920), (272, 640), (1024, 2048), (2160, 3840), (600, 800), (288, 352),
                                (480, 480)])
def test_a_frame_oriented_canvas_is_resize_shortest_edge_in_both_orientations(hw):
    """canvas_orientation: frame places landscape and portrait frames as the official test resize
    (short side 480 unless the long side would pass 853); fixed fits a portrait frame to 480 rows."""
    from mpvss_ros.config import load_model_config

    official = load_model_config("mpvss_r50").input
    fixed = dataclasses.replace(official, canvas_orientation="fixed")
    for frame_hw in (hw, hw[::-1]):
        lb = Letterbox.for_input(frame_hw, official)
        assert lb.resized_hw == _resize_shortest_edge(frame_hw, 480, 853), frame_hw
        assert lb.padded_hw == tuple(-(-s // 32) * 32 for s in lb.resized_hw)
        assert Letterbox.for_input(frame_hw, fixed).resized_hw[0] <= 480
    if hw[0] < hw[1]:  # landscape: both the same
        assert Letterbox.for_input(hw, fixed) == Letterbox.for_input(hw, official)


def test_a_frame_of_the_canvas_aspect_fills_the_canvas_where_resize_shortest_edge_is_a_pixel_short():
    """The documented departure (Letterbox.for_input): 708 x 1257 rounds to 480 rows whether the
    width or the height fills, so fit fills both (480 x 853), where detectron2 keeps 480 and
    rounds 852.2 down; fit stays exact on its own output size."""
    from mpvss_ros.config import load_model_config

    official = load_model_config("mpvss_r50").input
    for frame_hw in ((708, 1257), (1257, 708)):
        lb = Letterbox.for_input(frame_hw, official)
        assert sorted(lb.resized_hw) == [480, 853]
        assert sorted(_resize_shortest_edge(frame_hw, 480, 853)) == [480, 852]
        assert Letterbox.fit(frame_hw, lb.resized_hw).resized_hw == lb.resized_hw


def test_a_portrait_frame_goes_onto_the_turned_canvas(band_model):
    """VideoSegmenter letterboxes with the model's canvas_orientation: a 960 x 540 portrait
    frame on a frame-oriented 480 x 640 canvas is 640 x 360, labels at the frame's size."""
    band_model.cfg.input = dataclasses.replace(band_model.cfg.input, canvas_orientation="frame")  # a copy
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(5))
    r = seg.push(_image((960, 540)), 0.0)
    assert seg._key_letterbox.resized_hw == (640, 360) and seg._key_letterbox.padded_hw == (640, 384)
    assert r.labels.shape == (960, 540)
    r = seg.push(_image((540, 960)), 0.1)  # landscape again: the canvas as written
    assert r.key_frame_reason == "resolution_change" and seg._key_letterbox.resized_hw == (360, 640)


# -- VideoSegmenter's own decisions


def test_keyboard_interrupt_in_propagation_resets_the_key_frame(band_model, monkeypatch):
    """except BaseException: an interrupt (Ctrl-C caught by a node's spin loop) mid-frame leaves
    the scheduler having counted the frame; the next frame must be a key frame."""
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    img = _image((60, 80))
    assert seg.push(img, 0.0).is_key_frame

    def interrupted(key, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(seg.propagator, "propagate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        seg.push(img, 0.1)
    monkeypatch.undo()
    r = seg.push(img, 0.2)
    assert (r.is_key_frame, r.key_frame_reason) == (True, "reset")


def test_backend_prepare_gets_the_unpadded_letterboxed_size(band_model):
    """A fixed-shape backend prepares (exports, builds) for the frame's resized size, not the
    padded canvas: the graphs' valid size is a constant of theirs."""
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(2))
    got = []
    seg.model.prepare = got.append
    lb = seg.letterbox((40, 50))
    assert lb.resized_hw != lb.padded_hw
    seg.push(_image((40, 50)), 0.0)
    assert got == [lb.resized_hw]


def test_the_segmenter_runs_on_the_backends_device(lite):
    from types import SimpleNamespace

    cfg = lite.config
    backend = SimpleNamespace(cfg=SimpleNamespace(input=cfg.input, postprocess=cfg.postprocess),
                              num_classes=5, device=torch.device("meta"), segment_key_frame=None)
    seg = VideoSegmenter(backend, CopyPropagator(), FixedIntervalScheduler(2), device="cpu")
    assert seg.device == torch.device("meta")


@pytest.mark.parametrize("stamp", [np.array(0.5), b"0.5", bytearray(b"0.5"), True, np.bool_(False)])
def test_stamps_that_are_not_real_numbers_are_refused(band_model, stamp):
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(2))
    with pytest.raises(FrameError, match="stamp must be a number of seconds"):
        seg.push(_image((30, 40)), stamp)
    assert seg._frame_index == 0


def test_a_stamp_too_long_to_print_is_a_frame_error(band_model):
    """An int past 1e308 is a Real that float() refuses; past 4300 digits repr() refuses it too, so
    the message says so instead of letting str()'s own ValueError out."""
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(2))
    for stamp, shown in ((10**400, "1" + "0" * 400), (10**5000, "an integer too long to print"),
                         (-10**5000, "an integer too long to print")):
        with pytest.raises(FrameError, match=f"stamp must be a number of seconds, got {shown}$"):
            seg.push(_image((30, 40)), stamp)
    assert seg._frame_index == 0


def test_the_first_tracked_source_after_untracked_frames_is_no_source_change(band_model):
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(10))
    img = _image((60, 80))
    assert seg.push(img, 0.0).key_frame_reason == "first"
    r = seg.push(img, 0.1, source="front")
    assert (r.is_key_frame, r.key_frame_reason) == (False, "")


def test_the_finiteness_check_does_not_overflow_on_float16_logits():
    """Half-precision logits (an fp16 engine's outputs) whose fp16 sum overflows are still finite."""
    from mpvss_ros.segmenter import _all_finite

    logits = torch.full((1, 4, 64, 64), 1000.0, dtype=torch.float16)  # sum 1.6e7 > fp16 max 65504
    assert _all_finite(logits)
    logits[0, 0, 0, 0] = float("nan")
    assert not _all_finite(logits)


# ------------------------------------------------------------------ property-based: random streams


#: A small canvas keeps the fuzzed streams fast; frames are smaller and larger than it.
_FUZZ_CANVAS = (64, 96)
_FUZZ_SIZES = st.one_of(
    st.sampled_from([(1, 1), (1, 7), (9, 1), (2, 150), (150, 2), (3, 3), (24, 32), (31, 45), (64, 96), (65, 97)]),
    st.tuples(st.integers(1, 100), st.integers(1, 130)))
#: Seconds from the previous frame's header stamp: equal, forward, backwards, past max_gap_s.
_FUZZ_STEPS = st.sampled_from([0.04] * 6 + [0.0, 0.1, 0.5, -0.04, -3.0, 1.5, 1000.0])
_FUZZ_SCHEDULERS = st.one_of(
    st.builds(FixedIntervalScheduler, st.integers(1, 4), max_gap_s=st.sampled_from([1.0, 0.3, math.inf])),
    st.integers(1, 5).flatmap(lambda top: st.builds(
        AdaptiveScheduler, st.sampled_from([0.05, 0.5, 3.0]), st.integers(1, top), st.just(top),
        max_gap_s=st.sampled_from([1.0, math.inf]), cut_threshold=st.sampled_from([0.1, 0.45, 5.0]))))
_POLICY_REASONS = {"interval", "scene_cut", "scene_change", "max_interval"}


def _bad_frame(kind: str, hw: tuple[int, int]) -> object:
    """A frame check_frame must refuse with FrameError: wrong dtype, channel count, rank, an empty image, no array."""
    good = _image(hw)
    return {"float32": good.astype(np.float32), "uint16": good.astype(np.uint16), "int8": good.view(np.int8),
            "bool": good > 127, "mono8": good[:, :, 0], "two_channels": good[:, :, :2],
            "rgba": np.dstack([good, good[:, :, :1]]), "batch": good[None], "no_rows": good[:0],
            "no_columns": good[:, :0], "list": good.tolist(), "tensor": torch.from_numpy(good), "none": None}[kind]


def _layout(frame: np.ndarray, layout: str) -> np.ndarray:
    """A valid frame in another memory layout: strided, Fortran-ordered, negative strides, read-only,
    or broadcast (zero strides, read-only: every row the first row)."""
    if layout == "flipped":
        return np.flip(np.flip(frame, (0, 1)).copy(), (0, 1))
    if layout == "broadcast":
        return np.broadcast_to(frame[:1], frame.shape)
    if layout == "strided":
        wide = np.zeros((frame.shape[0], frame.shape[1] * 2, 3), np.uint8)
        wide[:, ::2] = frame
        return wide[:, ::2]
    if layout == "fortran":
        return np.asfortranarray(frame)
    if layout == "read_only":
        frame.setflags(write=False)
    return frame


class _SegmenterStream(RuleBasedStateMachine):
    """A random stream of good and bad frames, resets and parameter swaps through one VideoSegmenter,
    checked after every step against the documented key-frame rules (push, reset, replace, scheduling)."""

    def __init__(self, models: dict) -> None:
        super().__init__()
        self.models = models

    @initialize(model=st.sampled_from(["band", "lite"]), propagator=st.sampled_from(["copy", "optical_flow", "query_flow"]),
                scheduler=_FUZZ_SCHEDULERS, class_masks=st.booleans())
    def start(self, model, propagator, scheduler, class_masks):
        self.model = self.models["lite" if propagator == "query_flow" else model]
        self.seg = VideoSegmenter(self.model, self._propagator(propagator), scheduler, class_masks=class_masks)
        self.scheduler, self.class_masks = scheduler, class_masks
        self.index, self.pending, self.source = 0, "first", None
        self.key_index, self.key_stamp, self.key_shape, self.key_result, self.since_key = -1, math.nan, None, None, 0
        self.last_stamp = None  # the scheduler's previous header stamp (None after a reset)
        self.stamp, self.hw = 0.0, (24, 32)

    def _propagator(self, name: str):
        return {"copy": CopyPropagator, "optical_flow": OpticalFlowPropagator,
                "query_flow": lambda: QueryFlowPropagator(self.models["lite"])}[name]()

    def _expected_reason(self, shape: tuple[int, ...], stamp: float, frames_since_key: int) -> str | None:
        """The documented key-frame reason ("" = a non-key frame), None where only the adaptive policy knows."""
        if self.pending is not None:
            return "first" if self.index == 0 else self.pending
        if shape != self.key_shape:
            return "resolution_change"
        if self.last_stamp is not None and stamp < self.last_stamp:
            return "time_backwards"
        if self.last_stamp is not None and stamp - self.last_stamp > self.scheduler.max_gap_s:
            return "time_gap"
        if isinstance(self.scheduler, FixedIntervalScheduler):
            return "interval" if frames_since_key >= self.scheduler.interval else ""
        return None

    def _push(self, frame: np.ndarray, stamp, source: str | None) -> None:
        before = frame.copy()
        if source is not None:
            if self.source is not None and source != self.source:
                self.pending = "frame_id_change"
            self.source = source
        expected = self._expected_reason(frame.shape, float(stamp), self.since_key + 1)
        after_reset = self.pending is not None
        r = self.seg.push(frame, stamp, source=source)
        np.testing.assert_array_equal(frame, before)  # the input frame is never written to
        assert (r.frame_index, r.stamp) == (self.index, float(stamp))
        if expected is None:  # adaptive: a policy key frame no later than max_interval, none before min_interval
            since = self.since_key + 1
            assert r.key_frame_reason in ({""} | _POLICY_REASONS - {"interval"})
            assert r.is_key_frame == bool(r.key_frame_reason)
            assert since < self.scheduler.max_interval or r.is_key_frame
            assert since >= self.scheduler.min_interval or not r.is_key_frame
            assert r.key_frame_reason != "max_interval" or since >= self.scheduler.max_interval
        else:
            assert (r.is_key_frame, r.key_frame_reason) == (bool(expected), expected)
        h, w = frame.shape[:2]
        assert r.labels.shape == r.confidence.shape == (h, w)
        assert r.labels.dtype == r.confidence.dtype == np.uint8 and r.labels.flags.c_contiguous
        assert int(r.labels.max()) < self.seg.num_classes  # valid class IDs
        assert int(r.confidence.min()) >= math.floor(255 / self.seg.num_classes)  # the winner's share >= 1 / K
        assert math.isfinite(r.scene_score) and r.scene_score >= 0
        assert set(r.stage_latency_ms) == (KEY_TIMINGS if r.is_key_frame else NON_KEY_TIMINGS)
        if self.class_masks:
            _check_class_masks(r)
        self.index += 1
        self.last_stamp, self.stamp, self.hw = float(stamp), float(stamp), (h, w)
        if r.is_key_frame:
            assert r.scene_score == 0.0 or not after_reset  # the scheduler's forced first frame scores 0.0
            self.pending, self.key_shape, self.since_key = None, frame.shape, 0
            self.key_index, self.key_stamp, self.key_result = r.frame_index, r.stamp, r
        else:
            self.since_key += 1
            if isinstance(self.seg.propagator, CopyPropagator):  # copy reproduces the key frame exactly
                np.testing.assert_array_equal(r.labels, self.key_result.labels)
                np.testing.assert_array_equal(r.confidence, self.key_result.confidence)
        assert (r.key_frame_index, r.key_frame_stamp) == (self.key_index, self.key_stamp)

    @rule(hw=st.sampled_from([None] * 3) | _FUZZ_SIZES, seed=st.integers(0, 3), step=_FUZZ_STEPS,
          kind=st.sampled_from([float, np.float64, np.float32, int]),
          layout=st.sampled_from(["contiguous", "strided", "fortran", "flipped", "read_only", "broadcast"]),
          source=st.sampled_from([None] * 6 + ["front", "rear"]))
    def push_frame(self, hw, seed, step, kind, layout, source):
        """Any (H, W, 3) uint8 frame (mostly of the last size, hw None): labels at its size, a key
        frame where the documented rules say."""
        self._push(_layout(_image(hw or self.hw, seed), layout), kind(self.stamp + step), source)

    @rule(seed=st.integers(0, 3), frames=st.integers(1, 4))
    def push_next_frames(self, seed, frames):
        """The next frames of the stream (last size, 25 fps): non-key frames until the schedule's key frame."""
        for i in range(frames):
            self._push(_image(self.hw, seed + i), self.stamp + 0.04, None)

    @rule(kind=st.sampled_from(["float32", "uint16", "int8", "bool", "mono8", "two_channels", "rgba", "batch", "no_rows",
                                "no_columns", "list", "tensor", "none"]),
          hw=_FUZZ_SIZES, step=_FUZZ_STEPS, source=st.sampled_from([None, "front", "rear", "side"]))
    def push_bad_frame(self, kind, hw, step, source):
        """A frame that is not (H, W, 3) uint8 with H, W >= 1 raises FrameError and changes nothing."""
        with pytest.raises(FrameError):
            self.seg.push(_bad_frame(kind, hw), self.stamp + step, source=source)

    @rule(stamp=st.sampled_from([None, math.nan, math.inf, -math.inf, "0.5", b"0.5", np.array(0.5), [0.5], 1j, 1e400,
                                 10**400]),
          source=st.sampled_from([None, "front", "side"]))
    def push_bad_stamp(self, stamp, source):
        """A header stamp that is not a finite number of seconds raises FrameError and changes nothing."""
        with pytest.raises(FrameError):
            self.seg.push(_image(self.hw), stamp, source=source)

    @rule(reason=st.sampled_from(["reset", "frame_id_change", "time_gap", "non_finite"]))
    def reset(self, reason):
        """reset(reason): the next frame is a key frame with that reason (``first`` if none was pushed)."""
        self.seg.reset(reason)
        self.pending, self.last_stamp = reason, None

    @rule(propagator=st.sampled_from([None, "copy", "optical_flow", "query_flow"]), scheduler=st.none() | _FUZZ_SCHEDULERS)
    def replace(self, propagator, scheduler):
        """replace(): the new propagator/scheduler take over from a key frame reported as ``reset``."""
        if propagator == "query_flow" and self.model is not self.models["lite"]:
            propagator = "copy"  # the band model has no motion module
        self.seg.replace(None if propagator is None else self._propagator(propagator), scheduler)
        self.scheduler = scheduler or self.scheduler
        self.pending, self.last_stamp = "reset", None


@pytest.fixture(scope="module")
def lite_on_small_canvas() -> torch.nn.Module:
    """A freshly loaded mpvss_lite (not the shared ``lite``, which tests must not modify) on the
    64 x 96 fuzzing canvas."""
    loaded = load_model("mpvss_lite")
    loaded.model.cfg = replace_canvas(loaded.config, _FUZZ_CANVAS)
    return loaded.model


def test_random_streams_keep_the_documented_key_frame_rules(make_band_model, lite_on_small_canvas):
    """Random streams of frames of any size and layout, stamps equal, backwards or after long gaps,
    bad frames and stamps, reset() and replace(): every result is at the frame's size with valid
    class IDs, every key frame has its documented reason, and a refused frame changes nothing."""
    band = make_band_model(5)
    band.cfg.input = lite_on_small_canvas.cfg.input  # a copy with the small canvas
    models = {"band": band, "lite": lite_on_small_canvas}
    run_state_machine_as_test(lambda: _SegmenterStream(models),
                              settings=settings(max_examples=40, stateful_step_count=25, deadline=None))
