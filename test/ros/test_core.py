"""The node's ROS-free logic (mpvss_ros.ros.core) on rosbags messages: no rclpy needed.

Most tests use the fake 5-class BandModel (test/conftest.py) with the ``copy`` propagator so that
a frame costs milliseconds; one test runs the untrained lite model end to end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import subprocess
import sys
import threading
import time
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from fake_rclpy import Logger as ListLogger
from helpers import live_copies
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from test_conversions import BAYER, BPP, UYVY, YUYV, encode, pixel_bytes

from mpvss_ros.model_loader import LoadedModel
from mpvss_ros.ros import conversions
from mpvss_ros.ros.conversions import stamp_to_seconds
from mpvss_ros.ros.core import (
    EMPTY_FRAME_ID_LOG_PERIOD_S,
    ERROR,
    OK,
    WARN,
    LatestSlot,
    OutputDemand,
    SegmentationCore,
    StartupError,
    Worker,
    build_segmenter,
    failures_warrant_warning,
    load_configured_model,
)
from mpvss_ros.ros.parameters import validate
from mpvss_ros.scheduling import AdaptiveScheduler, FixedIntervalScheduler
from mpvss_ros.segmenter import FrameError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

H, W = 48, 64


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture()
def band_loaded(lite: LoadedModel, make_band_model) -> LoadedModel:
    """The fake 5-class model wrapped as a LoadedModel with a matching 5-class config."""
    model = make_band_model(5)
    cfg = dataclasses.replace(lite.config, name="band5", num_classes=5,
                              class_names=["road", "car", "tree", "sky", "person"], palette=[])
    return LoadedModel(model=model, config=cfg, weights=None, trained=False, device=torch.device("cpu"))


@pytest.fixture()
def make_core(band_loaded, types):
    """``make_core(**params)`` -> (core, clock, logger) on the band model; age check off unless given."""
    def make(**params):
        values = {"propagator": "copy", "max_frame_age_s": 0.0, "schedule": "fixed:100"}
        values.update(params)
        clock, logger = FakeClock(), ListLogger()
        core = SegmentationCore(validate(values), band_loaded, types, clock=clock, logger=logger)
        return core, clock, logger

    return make


def header(types, stamp: float, frame_id: str = "camera_optical"):
    sec = math.floor(stamp)
    return types.header(stamp=types.time(sec=sec, nanosec=round((stamp - sec) * 1e9)), frame_id=frame_id)


def frame(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """A smooth RGB gradient scene with a few shades (several band-model classes)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = (255 * (x / max(w - 1, 1) * 0.7 + y / max(h - 1, 1) * 0.3)).astype(np.uint8)
    rgb = np.stack([base, base, base], axis=-1).copy()
    rgb[: h // 4, : w // 4] = rng.integers(0, 255, 3, dtype=np.uint8)
    return rgb


def image_msg(types, rgb: np.ndarray, stamp: float, frame_id: str = "camera_optical",
              encoding: str = "rgb8", step: int | None = None, data=None):
    h, w = rgb.shape[:2]
    if data is None:
        data = np.ascontiguousarray(rgb).reshape(-1)
    return types.image(header=header(types, stamp, frame_id), height=h, width=w, encoding=encoding,
                       is_bigendian=0, step=w * 3 if step is None else step, data=data)


def jpeg_msg(types, rgb: np.ndarray, stamp: float, truncate: bool = False, frame_id: str = "camera_optical",
             ext: str = ".jpg", fmt: str = "jpeg"):
    """A CompressedImage of ``rgb`` (RGB, or a 2-D grey image) as a JPEG, or a PNG with ``ext=".png"``;
    ``truncate`` cuts it in half."""
    ok, buf = cv2.imencode(ext, rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    data = buf.reshape(-1)
    if truncate:
        data = data[: len(data) // 2].copy()
    return types.compressed_image(header=header(types, stamp, frame_id), format=fmt, data=data)


def all_headers(out) -> list:
    hs = [out.labels.header, out.confidence.header, out.info.header]
    for extra in (out.colored, out.overlay):
        if extra is not None:
            hs.append(extra.header)
    if out.class_masks is not None:
        hs.append(out.class_masks.header)
        hs += [m.header for m in out.class_masks.masks]
    return hs


# --------------------------------------------------------------------------------------------
# LatestSlot
# --------------------------------------------------------------------------------------------


def test_slot_newest_wins_and_counts_replaced():
    puts, replaced, clock = [], [], iter([10.0, 11.0, 12.0, 13.0])
    slot = LatestSlot(on_put=puts.append, on_replaced=lambda: replaced.append(1), clock=lambda: next(clock))
    assert slot.take(timeout=0) is None
    assert slot.put("a") is False
    assert slot.put("b") is True
    assert slot.put("c") is True
    assert len(slot) == 1
    assert slot.take_timed(timeout=0) == ("c", 12.0)  # with the time it was put
    assert slot.take(timeout=0.01) is None
    assert slot.put("d") is False and slot.take(timeout=0) == "d"
    assert (slot.puts, slot.replaced, slot.taken) == (4, 2, 2)
    assert (puts, len(replaced)) == (["a", "b", "c", "d"], 2)


def test_slot_calls_on_put_before_the_item_can_be_taken():
    """The node's on_put notes the stamp's time gap; a worker that took the item before that would
    segment it unaware of its gap and charge the gap to the next message (a helper's race)."""
    slot = LatestSlot(on_put=lambda item: seen.append(slot.take(timeout=0)))
    seen: list = []
    slot.put("a")
    assert seen == [None]  # not takeable yet while on_put runs ...
    assert slot.take(timeout=0) == "a"  # ... and takeable once put returned


def test_slot_take_blocks_until_put_and_close_wakes():
    slot = LatestSlot()
    got = []
    t = threading.Thread(target=lambda: got.append(slot.take(timeout=5.0)))
    t.start()
    time.sleep(0.05)
    slot.put(42)
    t.join(2.0)
    assert got == [42]

    t = threading.Thread(target=lambda: got.append(slot.take(timeout=5.0)))
    t.start()
    time.sleep(0.05)
    slot.close()
    t.join(2.0)  # well before take's own 5 s timeout: close() woke it
    assert not t.is_alive() and got[-1] is None


def test_slot_under_threads_consumer_sees_increasing_items_and_the_last_one():
    slot = LatestSlot()
    n = 3000
    taken: list[int] = []
    done = threading.Event()

    def consumer():
        while True:
            item = slot.take(timeout=0.05)
            if item is None:
                if done.is_set() and len(slot) == 0:
                    return
                continue
            taken.append(item)
            time.sleep(0.0005)  # slower than the producer: most items get replaced

    def producer():
        for i in range(n):
            slot.put(i)
        done.set()

    threads = [threading.Thread(target=consumer, daemon=True), threading.Thread(target=producer, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20.0)
    assert not any(t.is_alive() for t in threads), "the consumer sees the slot empty once the producer is done"
    assert taken == sorted(set(taken)), "items must come out newest-first, never older than one taken"
    assert taken[-1] == n - 1, "the newest item is never lost"
    assert slot.puts == n
    assert slot.replaced + slot.taken == n
    assert slot.replaced > 0


# --------------------------------------------------------------------------------------------
# Outputs and headers
# --------------------------------------------------------------------------------------------


def test_outputs_carry_the_input_header_exactly(make_core, types):
    core, _, _ = make_core()
    msg = image_msg(types, frame(), 1234.567891234, frame_id="cam_left_optical")
    out = core.process(msg)
    assert out is not None
    assert out.colored is not None and out.overlay is not None and out.class_masks is not None
    for h in all_headers(out):
        assert h.frame_id == "cam_left_optical"
        assert (h.stamp.sec, h.stamp.nanosec) == (msg.header.stamp.sec, msg.header.stamp.nanosec)
    assert out.labels.encoding == "mono8" and (out.labels.height, out.labels.width) == (H, W)
    assert out.confidence.encoding == "mono8"
    assert out.info.is_key_frame and out.info.key_frame_reason == "first"
    labels = np.asarray(out.labels.data).reshape(H, W)
    assert labels.max() < 5 and len(np.unique(labels)) > 1
    assert list(out.class_masks.class_ids) == sorted(np.unique(labels).tolist())
    assert core.counters["processed"] == 1 and core.counters["key_frames"] == 1


def test_lazy_outputs_absent_when_not_wanted(make_core, types):
    core, _, _ = make_core()
    out = core.process(image_msg(types, frame(), 1.0), want_colored=False, want_overlay=False,
                       want_class_masks=False)
    assert out.colored is None and out.overlay is None and out.class_masks is None
    assert out.labels is not None and out.confidence is not None and out.info is not None

    core, _, _ = make_core(publish_colored=False, publish_overlay=False, publish_class_masks=False)
    out = core.process(image_msg(types, frame(), 1.0))  # subscribers present, parameters say no
    assert out.colored is None and out.overlay is None and out.class_masks is None

    core, _, _ = make_core()
    out = core.process(image_msg(types, frame(), 1.0), want_colored=True, want_overlay=False,
                       want_class_masks=False)
    assert out.colored is not None and out.overlay is None and out.class_masks is None


def test_autoware_mask_only_with_its_parameter_and_a_subscriber(make_core, types):
    from mpvss_ros.ros.conversions import AUTOWARE_CLASSES

    msg = image_msg(types, frame(), 1.0, frame_id="cam")
    core, _, _ = make_core()
    assert core.process(msg).autoware_mask is None  # publish_autoware_mask is off by default
    core, _, _ = make_core(publish_autoware_mask=True)
    assert core.process(msg, want_autoware_mask=False).autoware_mask is None  # nobody subscribes
    out = core.process(image_msg(types, frame(), 2.0, frame_id="cam"))
    labels = np.asarray(out.labels.data).reshape(H, W)
    by_name = [AUTOWARE_CLASSES.index(c) for c in ("ROAD", "VEHICLE", "VEGETATION", "SKY", "PERSON")]
    data = np.asarray(out.autoware_mask.data).tobytes()
    runs = np.frombuffer(data, np.dtype([("value", "u1"), ("length", "<i4")]))
    np.testing.assert_array_equal(np.repeat(runs["value"], runs["length"]).reshape(H, W),
                                  np.array(by_name, np.uint8)[labels])
    assert out.autoware_mask.header.frame_id == "cam" and out.autoware_mask.encoding == "mono8"
    core, _, _ = make_core(publish_autoware_mask=True, autoware_class_ids=[0, 1, 2, 3, 200])
    runs = np.frombuffer(np.asarray(core.process(msg).autoware_mask.data).tobytes(), runs.dtype)
    assert set(runs["value"].tolist()) <= {0, 1, 2, 3, 200}
    with pytest.raises(ValueError, match="parameter 'autoware_class_ids': 2 Autoware class IDs for a model with 5"):
        make_core(autoware_class_ids=[1, 2])


def test_autoware_class_map_is_logged_and_an_all_unknown_map_warned(make_core):
    _, _, logger = make_core(publish_autoware_mask=True)
    assert ("info", "~/autoware_mask classes: road -> ROAD, car -> VEHICLE, tree -> VEGETATION, sky -> SKY, "
                    "person -> PERSON") in logger.lines
    _, _, logger = make_core(publish_autoware_mask=True, autoware_class_ids=[0, 0, 0, 0, 0])
    assert [level for level, text in logger.lines if "autoware_mask" in text] == ["warning"]
    assert "every class maps to Autoware's UNKNOWN (road -> UNKNOWN, car -> UNKNOWN" in logger.lines[-1][1]
    _, _, logger = make_core(publish_autoware_mask=True, autoware_class_ids=[0, 1, 2, 3, 200])
    assert any(text.endswith("person -> 200") for _, text in logger.lines)  # beyond Autoware's 16: the number
    _, _, logger = make_core()
    assert not [text for _, text in logger.lines if "autoware" in text]  # not published: not logged


def test_autoware_class_map_names_ids_from_16_by_number_and_a_partial_map_is_not_warned(make_core):
    _, _, logger = make_core(publish_autoware_mask=True, autoware_class_ids=[0, 1, 2, 3, 16])
    lines = [(level, text) for level, text in logger.lines if "autoware_mask" in text]
    # 16, the first ID past Autoware's classes, is printed as its number; one UNKNOWN class is no warning
    assert lines == [("info", "~/autoware_mask classes: road -> UNKNOWN, car -> BUILDING, tree -> WALL, "
                              "sky -> OBSTACLE, person -> 16")]


def test_worker_without_a_demand_builds_the_autoware_mask(band_loaded, types):
    # OutputDemand's defaults want every optional output: a Worker given no demand builds them all
    assert OutputDemand().autoware_mask is True
    core = SegmentationCore(validate({"propagator": "copy", "max_frame_age_s": 0.0, "publish_autoware_mask": True}),
                            band_loaded, types)
    slot = core.make_slot()
    published = []
    worker = Worker(slot, core, lambda out, li: published.append(out)).start()
    try:
        slot.put(image_msg(types, frame(), 1.0))
        assert _wait(lambda: len(published) == 1)
    finally:
        assert worker.stop(timeout=5.0)
    assert published[0].autoware_mask is not None


def test_palette_parameter_and_class_names(make_core, types):
    core, _, _ = make_core(palette=[0xFF0000, 0x00FF00])
    assert core.palette.shape == (5, 3)
    assert core.palette[0].tolist() == [255, 0, 0] and core.palette[1].tolist() == [0, 255, 0]
    assert core.class_names == ["road", "car", "tree", "sky", "person"]
    info = core.label_info(header(types, 0.0, ""))
    assert [(c.class_id, c.class_name) for c in info.class_map][:2] == [(0, "road"), (1, "car")]
    five, _, _ = make_core(palette=[0x010203, 0x040506, 0x070809, 0x0A0B0C, 0x0D0E0F])  # one per class: accepted
    assert five.palette.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15]]
    with pytest.raises(ValueError, match="palette"):
        make_core(palette=[0] * 6)


def test_without_the_palette_parameter_the_models_own_palette_colours_the_classes(band_loaded, types):
    """The model configuration's palette is the default of the ``palette`` parameter."""
    model_palette = [[10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120], [130, 140, 150]]
    loaded = dataclasses.replace(band_loaded, config=dataclasses.replace(band_loaded.config, palette=model_palette))
    core = SegmentationCore(validate({"propagator": "copy", "max_frame_age_s": 0.0}), loaded, types)
    assert core.palette.tolist() == model_palette


def test_class_names_that_do_not_match_the_class_count_give_way_to_default_names(band_loaded, types):
    """Class names of another count than the engine's classes are not used (LabelInfo, legends):
    every class is named ``class_<i>`` instead."""
    loaded = dataclasses.replace(band_loaded, config=dataclasses.replace(band_loaded.config,
                                                                         class_names=["road", "car"]))
    core = SegmentationCore(validate({"propagator": "copy", "max_frame_age_s": 0.0}), loaded, types)
    assert core.class_names == ["class_0", "class_1", "class_2", "class_3", "class_4"]


def test_label_info_on_key_frames_and_frame_id_changes(make_core, types):
    core, _, _ = make_core()
    first = core.label_info_update(header(types, 1.0))
    assert first is not None and len(first.class_map) == 5
    assert core.label_info_update(header(types, 2.0)) is None
    again = core.label_info_update(header(types, 3.0), key_frame=True)
    assert again is not None and stamp_to_seconds(again.header.stamp) == pytest.approx(3.0)
    assert core.label_info_update(header(types, 4.0, "other_camera")).header.frame_id == "other_camera"


def test_compressed_input(make_core, types):
    core, _, _ = make_core(input_compressed=True)
    out = core.process(jpeg_msg(types, frame(), 5.0))
    assert out is not None and (out.labels.height, out.labels.width) == (H, W)
    assert out.labels.header.stamp.sec == 5


# --------------------------------------------------------------------------------------------
# Drops and skips: counted, never raised
# --------------------------------------------------------------------------------------------


def test_stale_frames_dropped_by_age(make_core, types):
    core, _, logger = make_core(max_frame_age_s=0.5)
    assert core.process(image_msg(types, frame(), 100.0), now=101.0) is None
    assert core.counters["dropped_stale"] == 1 and core.counters["processed"] == 0
    assert any("stale" in text and "max_frame_age_s" in text for _, text in logger.lines)
    assert core.process(image_msg(types, frame(), 100.0), now=100.3) is not None
    assert core.process(image_msg(types, frame(), 200.0), now=199.0) is not None  # future stamp: kept
    assert core.process(image_msg(types, frame(), 100.0), now=None) is not None  # no clock: no check

    core, _, _ = make_core(max_frame_age_s=0.0)  # 0 disables the check
    assert core.process(image_msg(types, frame(), 100.0), now=1e9) is not None
    assert core.counters["dropped_stale"] == 0


def _bad_messages(types):
    rgb = frame()
    good = image_msg(types, rgb, 1.0)
    return {
        "unsupported encoding": dataclasses.replace(good, encoding="32FC1", step=W * 4,
                                                    data=np.zeros(H * W * 4, np.uint8)),
        "0x0 image": dataclasses.replace(good, height=0, width=0, step=0, data=np.zeros(0, np.uint8)),
        "step too small": dataclasses.replace(good, step=W * 3 - 1),
        "data too short": dataclasses.replace(good, data=good.data[: H * W]),
        "odd yuv width": image_msg(types, np.zeros((4, 5, 3), np.uint8), 1.0, encoding="yuv422", step=10,
                                   data=np.zeros(40, np.uint8)),
        "data is not bytes": dataclasses.replace(good, data=None),
    }


@pytest.mark.parametrize("case", ["unsupported encoding", "0x0 image", "step too small", "data too short",
                                  "odd yuv width", "data is not bytes"])
def test_bad_images_are_skipped_and_counted(make_core, types, case):
    core, _, logger = make_core()
    msg = _bad_messages(types)[case]
    assert core.process(msg) is None
    assert core.counters["skipped_decode"] == 1
    assert core.counters["processed"] == 0
    assert logger.lines and logger.lines[0][0] == "warning"
    # a good frame afterwards works
    assert core.process(image_msg(types, frame(), 2.0)) is not None


def test_corrupt_and_garbage_jpeg_are_skipped(make_core, types):
    core, _, _ = make_core(input_compressed=True)
    assert core.process(jpeg_msg(types, frame(), 1.0, truncate=True)) is None
    garbage = types.compressed_image(header=header(types, 1.0), format="jpeg",
                                     data=np.frombuffer(b"not a jpeg at all", np.uint8).copy())
    assert core.process(garbage) is None
    depth = types.compressed_image(header=header(types, 1.0), format="16UC1; compressedDepth",
                                   data=np.zeros(10, np.uint8))
    assert core.process(depth) is None
    assert core.counters["skipped_decode"] == 3
    assert core.process(jpeg_msg(types, frame(), 2.0)) is not None


def test_message_without_header_is_skipped(make_core):
    core, _, _ = make_core()
    assert core.process(object()) is None
    assert core.counters["skipped_decode"] == 1


@pytest.mark.parametrize("error, counter, level, problem", [
    # the frame's fault: skipped
    (FrameError("stamp must be finite"), "skipped_frame", "warning", "cannot segment frame: stamp must be finite"),
    # anything else: an engine error
    (RuntimeError("CUDA out of memory"), "errors", "error", "segmentation failed: RuntimeError: CUDA out of memory"),
    # a ValueError that is no FrameError is the engine's too
    (ValueError("bad tensor shape"), "errors", "error", "segmentation failed: ValueError: bad tensor shape"),
])
def test_an_engine_error_is_counted_not_raised(make_core, types, monkeypatch, error, counter, level, problem):
    """Counted, logged, and named as the last problem in /diagnostics."""
    core, _, logger = make_core()

    def boom(rgb, stamp, source=None):
        raise error

    monkeypatch.setattr(core.segmenter, "push", boom)
    assert core.process(image_msg(types, frame(), 1.0)) is None
    assert core.counters[counter] == 1
    assert any(lv == level and str(error) in text for lv, text in logger.lines)
    status = core.diagnostic_status()
    assert dict(status.values)["last problem"] == problem
    assert status.message == f"every frame failed in the last 5 s: {problem}"


def test_output_messages_that_cannot_be_built_are_an_error_not_raised(make_core, types, monkeypatch):
    """A failure while building the output messages is counted and logged as an error; process()
    does not raise (the frame is not processed)."""
    core, _, logger = make_core()

    def broken(*args, **kwargs):
        raise RuntimeError("palette too short")

    monkeypatch.setattr(conversions, "build_outputs", broken)
    assert core.process(image_msg(types, frame(), 1.0)) is None
    assert core.counters["errors"] == 1 and core.counters["processed"] == 0
    assert any(level == "error" and "building output messages failed: RuntimeError: palette too short" in text
               for level, text in logger.lines)


@pytest.mark.parametrize("how", ["reset", "reconfigure", "time_gap"])
def test_a_scheduler_reset_that_raises_is_an_engine_error(make_core, types, monkeypatch, how):
    """A scheduler's reset that raises (a requested reset, a schedule changed while running, a
    time gap) is counted and logged as an error of the engine, not as a frame with a bad header,
    and process() does not raise; the frame after it is a key frame."""
    core, _, logger = make_core(max_gap_s=1.0)
    assert [core.process(image_msg(types, frame(), 1.0 + 0.1 * i)).info.is_key_frame for i in range(2)] == [
        True, False]

    def boom(self, reason="reset"):
        raise RuntimeError("scheduler reset failed")

    if how == "reconfigure":
        core.reconfigure({"schedule": "fixed:50"})  # built now, installed by the next process()
    elif how == "reset":
        core.reset()
    monkeypatch.setattr(FixedIntervalScheduler, "reset", boom)
    stamp = 5.0 if how == "time_gap" else 1.2
    assert core.process(image_msg(types, frame(), stamp)) is None
    assert (core.counters["errors"], core.counters["skipped_decode"], core.counters["processed"]) == (1, 0, 2)
    assert any(level == "error" and "scheduler reset failed" in text for level, text in logger.lines)
    monkeypatch.undo()
    out = core.process(image_msg(types, frame(), stamp + 0.1))
    assert (out.info.is_key_frame, out.info.key_frame_reason) == (True, "reset")


def test_repeated_problems_are_log_throttled(make_core, types):
    core, clock, logger = make_core()
    bad = _bad_messages(types)["step too small"]
    for _ in range(50):
        core.process(bad)
    assert core.counters["skipped_decode"] == 50
    assert len(logger.lines) == 1
    clock.advance(6.0)
    core.process(bad)
    assert len(logger.lines) == 2 and "49 more" in logger.lines[1][1]
    for _ in range(5):  # it keeps coming, every second: reported again 5 s after the last report
        clock.advance(1.0)
        core.process(bad)
    assert len(logger.lines) == 3 and logger.lines[2][1].endswith("(4 more like this since the last report)")
    # each kind of error is throttled on its own: one does not silence another
    core.record_error("segmentation failed", RuntimeError("a"))
    core.record_error("publishing failed", RuntimeError("b"))
    assert [text.split(":")[0] for _, text in logger.lines[3:]] == ["segmentation failed", "publishing failed"]


# --------------------------------------------------------------------------------------------
# Forced key frames: resolution changes, stamps going backwards
# --------------------------------------------------------------------------------------------


def test_resolution_change_mid_stream_forces_a_key_frame(make_core, types):
    core, _, _ = make_core()
    outs = [core.process(image_msg(types, frame(), 1.0 + 0.1 * i)) for i in range(3)]
    assert [o.info.is_key_frame for o in outs] == [True, False, False]
    big = core.process(image_msg(types, frame(60, 80), 1.3))
    assert big is not None and big.info.is_key_frame
    assert big.info.key_frame_reason == "resolution_change"
    assert (big.labels.height, big.labels.width) == (60, 80)
    back = core.process(image_msg(types, frame(), 1.4))
    assert back.info.key_frame_reason == "resolution_change" and back.labels.width == W
    assert core.key_frame_reasons["resolution_change"] == 2


def test_key_frame_stamp_is_the_key_frames_exact_header_stamp(make_core, types):
    # Epoch-scale stamps do not survive float seconds to the nanosecond (1700000000.123456789
    # comes back as ...456717): the info message must carry the key frame's header stamp itself.
    core, _, _ = make_core()
    msgs = []
    for i, nanosec in enumerate((123_456_789, 190_000_001, 256_543_211, 323_000_007)):
        m = image_msg(types, frame(), 0.0)
        m.header.stamp = types.time(sec=1_700_000_000, nanosec=nanosec)
        msgs.append(m)
    outs = [core.process(m) for m in msgs]
    assert [o.info.is_key_frame for o in outs] == [True, False, False, False]
    for o in outs:
        assert (o.info.key_frame_stamp.sec, o.info.key_frame_stamp.nanosec) == (1_700_000_000, 123_456_789)
    core.reset()
    out = core.process(msgs[3])
    assert out.info.is_key_frame
    assert (out.info.key_frame_stamp.sec, out.info.key_frame_stamp.nanosec) == (1_700_000_000, 323_000_007)


def test_stamps_going_backwards_force_a_key_frame_and_keep_their_stamp(make_core, types):
    core, _, _ = make_core()
    for i in range(3):
        assert core.process(image_msg(types, frame(), 10.0 + 0.1 * i)) is not None
    out = core.process(image_msg(types, frame(), 5.0))  # bag loop
    assert out is not None and out.info.is_key_frame and out.info.key_frame_reason == "time_backwards"
    assert stamp_to_seconds(out.labels.header.stamp) == pytest.approx(5.0)
    nxt = core.process(image_msg(types, frame(), 5.1))
    assert nxt is not None and not nxt.info.is_key_frame
    gap = core.process(image_msg(types, frame(), 50.0))  # more than max_gap_s later
    assert gap.info.key_frame_reason == "time_gap"
    values = dict(core.diagnostic_status().values)
    assert values["key frames (time_backwards)"] == "1" and values["forced key frames"] == "3"


def test_max_gap_s_counts_gaps_between_received_messages(make_core, types):
    """A 30 Hz camera and a node that gets to every 40th frame (1.3 s apart, e.g. a large model on
    a CPU): no input gap, so frames are propagated; the scheduler had measured gaps between the
    segmented frames and made every one a time_gap key frame. A real gap between received
    messages still keys the next segmented frame, even when the message after the gap is
    replaced, or dropped as stale before it is segmented."""
    core, clock, _ = make_core(schedule="fixed:100", max_gap_s=1.0)
    slot = core.make_slot()
    reasons = []
    for i in range(200):
        out = feed(core, clock, slot, image_msg(types, frame(), 100.0 + i / 30), dt=1 / 30, process=i % 40 == 0)
        if out is not None:
            reasons.append(out.info.key_frame_reason)
    assert reasons == ["first", "", "", "", ""]
    feed(core, clock, slot, image_msg(types, frame(), 110.0), process=False)  # 3.4 s after the last
    out = feed(core, clock, slot, image_msg(types, frame(), 110.1))  # replaced the one after the gap
    assert out.info.key_frame_reason == "time_gap"
    assert feed(core, clock, slot, image_msg(types, frame(), 110.2)).info.key_frame_reason == ""
    stale, _, _ = make_core(schedule="fixed:100", max_gap_s=1.0, max_frame_age_s=0.5)
    for stamp, now in ((1.0, 1.0), (5.0, 9.0), (5.1, 5.1)):  # the frame after the gap is stale
        stale.process(image_msg(types, frame(), stamp), now=now)
    assert stale.counters["dropped_stale"] == 1 and stale.key_frame_reasons["time_gap"] == 1


@pytest.mark.parametrize("first, in_flight, arriving, expected", [
    # B, 2.2 s after A, arrives while A is decoded: A is from before the gap and is propagated as
    # usual, B is the time_gap key frame (A had consumed the gap, and B was propagated across it)
    (0.1, 0.3, 2.5, [(False, ""), (True, "time_gap")]),
    # B, 2 s after the first frame, is decoded when C, 2 s after B, arrives: both follow a gap and
    # both are time_gap key frames (C's gap had replaced B's, and B was propagated across 2 s)
    (0.0, 2.0, 4.0, [(True, "time_gap"), (True, "time_gap")]),
])
def test_a_gap_belongs_to_the_frame_after_it_whatever_arrives_while_one_is_decoded(make_core, types, first,
                                                                                    in_flight, arriving, expected):
    """The worker takes a message and a second one arrives while it is still being decoded: each is
    keyed for a gap before it, never for a gap after it."""
    core, clock, _ = make_core(schedule="fixed:100", max_gap_s=1.0)
    slot = core.make_slot()
    assert feed(core, clock, slot, image_msg(types, frame(), first)).info.key_frame_reason == "first"
    clock.advance(0.1)
    slot.put(image_msg(types, frame(), in_flight))
    msg, received_at = slot.take_timed(timeout=0)  # the worker has it ...
    clock.advance(0.01)
    slot.put(image_msg(types, frame(), arriving))  # ... when the next one arrives
    outs = [core.process(msg, received_at=received_at)]
    msg, received_at = slot.take_timed(timeout=0)
    outs.append(core.process(msg, received_at=received_at))
    assert [(out.info.is_key_frame, out.info.key_frame_reason) for out in outs] == expected


def test_a_change_undoing_one_the_worker_is_installing_is_not_lost(make_core, types):
    """schedule A -> B, the worker takes B to install it, and the user sets A back meanwhile: the
    revert was compared with the scheduler still running (A), found no change and dropped, so
    the engine ran B for good while the parameters (and /diagnostics) said A. The install now
    happens under the core's lock, so the revert waits for it and is then installed itself."""
    core, _, _ = make_core(schedule="fixed:100")
    core.process(image_msg(types, frame(), 1.0))
    real_replace, reverts = core.segmenter.replace, []

    def replace(**engine):  # the worker installs B; the revert comes from the executor thread now
        revert = threading.Thread(target=lambda: core.reconfigure({"schedule": "fixed:100"}))
        revert.start()
        revert.join(0.3)  # done at once where it does not wait for the install
        real_replace(**engine)
        reverts.append(revert)

    core.reconfigure({"schedule": "fixed:3"})
    core.segmenter.replace = replace
    core.process(image_msg(types, frame(), 1.1))
    reverts[0].join(5.0)
    core.segmenter.replace = real_replace
    core.process(image_msg(types, frame(), 1.2))  # the next frame installs what is pending
    assert core.config.schedule == "fixed:100"
    assert core.segmenter.scheduler.describe()["schedule"] == "fixed:100"


def test_a_frame_whose_publishing_fails_is_one_failure(make_core, types):
    """Every publish fails: 5 frames, 5 failures, no output, so ERROR; a processed frame was also
    counted as an output ('5 of 10 frames failed', WARN, an output rate of 10 Hz)."""
    core, clock, _ = make_core(propagator="copy")
    slot = core.make_slot()
    for i in range(5):
        clock.advance(0.1)
        slot.put(image_msg(types, frame(), 1.0 + 0.1 * i))
        msg, received_at = slot.take_timed(timeout=0)
        assert core.process(msg, received_at=received_at) is not None
        core.record_error("publishing failed", RuntimeError("publisher gone"))  # what the Worker does
    status = core.diagnostic_status()
    values = dict(status.values)
    assert status.level == ERROR and "every frame failed" in status.message, status.message
    assert (values["processed"], values["published"], values["errors"]) == ("5", "0", "5")
    assert values["output rate (Hz)"] == "0.0"


def test_latency_counts_from_receiving_the_message(make_core, types):
    """A frame that waited 0.8 s in the slot (the worker busy) has 800 ms of latency, as /diagnostics
    documents (receive-to-outputs); a message handed to process() directly starts then."""
    core, clock, _ = make_core()
    slot = core.make_slot()
    for i in range(3):
        slot.put(image_msg(types, frame(), 1.0 + 0.1 * i))
        clock.advance(0.8)
        msg, received_at = slot.take_timed(timeout=0)
        core.process(msg, received_at=received_at)
    assert core.stats()["latency_median_ms"] == pytest.approx(800.0)
    clock.advance(6.0)  # those frames leave the window: the median is of the frames in it
    core.process(image_msg(types, frame(), 9.0))
    assert core.stats()["latency_median_ms"] == 0.0


def test_an_empty_frame_id_is_published_as_given_and_warned_about(make_core, types):
    """Nav2's semantic layer and Autoware place labels through TF and camera_info: an empty
    frame_id (a camera driver left unset) breaks them silently. The outputs keep the input's exact
    header all the same; the node says why they will be unusable, at once and then once a minute."""
    core, clock, logger = make_core()

    def warnings():
        return [text for level, text in logger.lines if level == "warning" and "frame_id is empty" in text]

    out = core.process(image_msg(types, frame(), 1.0, frame_id=""))
    assert out.labels.header.frame_id == "" and out.confidence.header.frame_id == ""
    assert len(warnings()) == 1 and "REP 103" in warnings()[0]
    clock.advance(EMPTY_FRAME_ID_LOG_PERIOD_S - 1.0)
    core.process(image_msg(types, frame(), 1.1, frame_id=""))
    assert len(warnings()) == 1
    clock.advance(1.0)
    core.process(image_msg(types, frame(), 1.2, frame_id=""))
    assert len(warnings()) == 2 and "(1 more like this since the last report)" in warnings()[1]
    clock.advance(EMPTY_FRAME_ID_LOG_PERIOD_S)
    core.process(image_msg(types, frame(), 1.3, frame_id="camera_optical"))
    assert len(warnings()) == 2


def test_a_new_frame_id_forces_a_key_frame(make_core, types):
    """Another camera on the topic: its frames are not propagated from the other camera's key frame."""
    core, _, logger = make_core()
    outs = [core.process(image_msg(types, frame(), 1.0 + 0.1 * i, frame_id="front")) for i in range(3)]
    assert [o.info.key_frame_reason for o in outs] == ["first", "", ""]
    rear = core.process(image_msg(types, frame(seed=1), 1.3, frame_id="rear"))
    assert rear.info.is_key_frame and rear.info.key_frame_reason == "frame_id_change"
    assert rear.labels.header.frame_id == "rear" and stamp_to_seconds(rear.info.key_frame_stamp) == pytest.approx(1.3)
    assert not core.process(image_msg(types, frame(seed=1), 1.4, frame_id="rear")).info.is_key_frame
    assert core.process(image_msg(types, frame(), 1.5, frame_id="front")).info.key_frame_reason == "frame_id_change"
    assert core.key_frame_reasons["frame_id_change"] == 2
    assert any(level == "warning" and "frame_id is now 'rear'" in text for level, text in logger.lines)
    # a message of another frame_id that is dropped before it is segmented changes nothing
    bad = image_msg(types, frame(), 1.6, frame_id="rear", step=10)
    assert core.process(bad) is None
    assert not core.process(image_msg(types, frame(), 1.7, frame_id="front")).info.is_key_frame


def test_non_finite_logits_publish_nothing_and_the_next_frame_is_a_key_frame(make_core, types, monkeypatch):
    core, _, logger = make_core()
    assert core.process(image_msg(types, frame(), 1.0)) is not None
    real = core.segmenter.propagator.propagate
    monkeypatch.setattr(core.segmenter.propagator, "propagate", lambda key, f: real(key, f) * float("nan"))
    assert core.process(image_msg(types, frame(), 1.1)) is None
    assert core.counters["errors"] == 1
    assert any(level == "error" and "NaN or infinite" in text for level, text in logger.lines)
    monkeypatch.undo()
    out = core.process(image_msg(types, frame(), 1.2))
    assert out.info.is_key_frame and out.info.key_frame_reason == "non_finite"
    values = dict(core.diagnostic_status().values)  # a key frame the schedule did not choose: forced
    assert values["key frames (non_finite)"] == "1" and values["forced key frames"] == "2"


def test_frames_above_max_image_pixels_are_skipped_and_the_limit_is_dynamic(make_core, types):
    core, _, logger = make_core(max_image_pixels=H * W)
    assert core.process(image_msg(types, frame(), 1.0)) is not None
    assert core.process(image_msg(types, frame(H + 1, W), 1.1)) is None
    assert core.counters["skipped_decode"] == 1
    assert any(f"{W} x {H + 1}" in text and "max_image_pixels" in text for _, text in logger.lines)
    core.reconfigure({"max_image_pixels": (H + 1) * W})
    out = core.process(image_msg(types, frame(H + 1, W), 1.2))
    assert out is not None and out.info.key_frame_reason == "resolution_change"
    # compressed input: the same limit, from the JPEG's header
    compressed, _, _ = make_core(max_image_pixels=H * W, input_compressed=True)
    assert compressed.process(jpeg_msg(types, frame(), 1.0)) is not None
    assert compressed.process(jpeg_msg(types, frame(H + 1, W), 1.1)) is None
    assert compressed.counters["skipped_decode"] == 1
    compressed.reconfigure({"max_image_pixels": (H + 1) * W})
    assert compressed.process(jpeg_msg(types, frame(H + 1, W), 1.2)) is not None


def test_compressed_input_without_the_strict_decoder_warns_at_start(band_loaded, types, monkeypatch):
    monkeypatch.setattr(conversions, "STRICT_JPEG", False)
    logger = ListLogger()
    SegmentationCore(validate({"input_compressed": True}), band_loaded, types, logger=logger)
    assert [level for level, text in logger.lines if "pip install simplejpeg" in text] == ["warning"]
    logger = ListLogger()
    SegmentationCore(validate({"input_compressed": False}), band_loaded, types, logger=logger)
    assert not logger.lines


# --------------------------------------------------------------------------------------------
# enable / disable / reset
# --------------------------------------------------------------------------------------------


def test_reconfigure_while_running(make_core, types, band_loaded):
    """``ros2 param set`` on a running node: a schedule or propagation change takes over from the
    next frame, which is a key frame (reason reset); the age check, opacity and palette change
    without one; a refused change leaves everything as it was."""
    core, clock, _ = make_core(schedule="fixed:100", max_frame_age_s=0.0)
    seg = core.segmenter
    key = [core.process(image_msg(types, frame(*BIG), 1.0 + 0.01 * i)).info.is_key_frame for i in range(3)]
    assert key == [True, False, False]

    before = core.config
    with pytest.raises(ValueError, match="read-only"):
        core.reconfigure({"schedule": "fixed:2", "backend": "onnxruntime"})
    with pytest.raises(ValueError, match="min_interval"):
        core.reconfigure({"schedule": "adaptive", "min_interval": 20, "max_interval": 10})
    with pytest.raises(ValueError, match="palette"):  # 6 colours for 5 classes
        core.reconfigure({"palette": [0] * 6})
    assert core.config is before and core.segmenter.scheduler is seg.scheduler
    assert not core.process(image_msg(types, frame(*BIG), 1.03)).info.is_key_frame, "a refused change resets nothing"

    assert core.reconfigure({"schedule": "fixed:2", "propagator": "optical_flow"}).schedule == "fixed:2"
    assert seg.propagator.name == "copy", "swapped by the worker, between frames"
    outs = [core.process(image_msg(types, frame(*BIG), 1.04 + 0.01 * i)) for i in range(4)]
    assert [(o.info.is_key_frame, o.info.key_frame_reason) for o in outs] == [
        (True, "reset"), (False, ""), (True, "interval"), (False, "")]
    assert seg.propagator.name == "optical_flow" and isinstance(seg.scheduler, FixedIntervalScheduler)
    assert seg.scheduler.interval == 2

    core.reconfigure({"overlay_alpha": 1.0, "palette": [0xFF0000, 0x00FF00], "max_frame_age_s": 0.2})
    out = core.process(image_msg(types, frame(*BIG), 1.08), want_overlay=True)
    assert out.info.key_frame_reason == "interval", "the schedule's own key frame: output settings reset nothing"
    labels = stamp_free_labels(out)
    colored = np.frombuffer(bytes(out.colored.data), np.uint8).reshape(*BIG, 3)
    overlay = np.frombuffer(bytes(out.overlay.data), np.uint8).reshape(*BIG, 3)
    seen = 0
    for cls, rgb in ((0, (255, 0, 0)), (1, (0, 255, 0))):
        sel = labels == cls
        seen += sel.sum()
        assert (colored[sel] == rgb).all(), cls
        low = sel.copy()
        low[: BIG[0] // 2] = False  # below the legend and the tag (top corners)
        if low.any():  # alpha 1: the colour itself
            assert (overlay[low] == rgb).all(), cls
    assert seen > 0.1 * labels.size, "the new palette's classes are on screen"
    assert ((labels[BIG[0] // 2:] <= 1).mean()) > 0.1, "and below the legend"
    assert core.process(image_msg(types, frame(*BIG), 1.09), now=1.09 + 0.5) is None, "0.5 s > the new 0.2 s"
    assert core.counters["dropped_stale"] == 1
    assert not core.process(image_msg(types, frame(*BIG), 1.10)).info.is_key_frame
    assert core.key_frame_reasons == {"first": 1, "reset": 1, "interval": 2}


def test_a_change_that_leaves_the_engine_as_it_runs_makes_no_key_frame(make_core, types):
    """max_gap_s (the core's own), the adaptive settings under fixed:N and the optical-flow
    settings under copy change nothing the engine runs: no key frame. A change back before the
    worker installed the first is compared with what it would install, and a change back to what
    runs withdraws the pending one: no key frame either."""
    core, _, _ = make_core(schedule="fixed:100", propagator="copy", max_frame_age_s=0.0)
    seg = core.segmenter
    scheduler, propagator = seg.scheduler, seg.propagator
    stamps = iter(1.0 + 0.01 * i for i in range(100))
    assert core.process(image_msg(types, frame(), next(stamps))).info.key_frame_reason == "first"
    for change in ({"max_gap_s": 2.0}, {"scene_threshold": 0.8, "min_interval": 2, "cut_threshold": 3.0},
                   {"optical_flow_preset": "medium", "optical_flow_scale": 1.0, "chain_flow": False}):
        core.reconfigure(change)
        out = core.process(image_msg(types, frame(), next(stamps)))
        assert (out.info.is_key_frame, out.info.key_frame_reason) == (False, ""), change
    assert seg.scheduler is scheduler and seg.propagator is propagator
    core.reconfigure({"propagator": "optical_flow"})  # now the flow settings count: a key frame
    assert core.process(image_msg(types, frame(), next(stamps))).info.key_frame_reason == "reset"
    core.reconfigure({"optical_flow_preset": "fast"})
    assert core.process(image_msg(types, frame(), next(stamps))).info.key_frame_reason == "reset"
    assert seg.propagator.describe()["preset"] == "fast"
    scheduler = seg.scheduler
    core.reconfigure({"schedule": "fixed:5"})
    core.reconfigure({"schedule": "fixed:5", "scene_threshold": 0.9})  # the same fixed:5 as pending
    core.reconfigure({"schedule": "fixed:100"})  # back to what runs, before the worker installed fixed:5
    out = core.process(image_msg(types, frame(), next(stamps)))
    assert (out.info.is_key_frame, out.info.key_frame_reason) == (False, "")
    assert seg.scheduler is scheduler and seg.scheduler.interval == 100
    core.reconfigure({"schedule": "fixed:5"})
    core.reconfigure({"schedule": "fixed:3"})  # another change before the worker installed fixed:5
    assert core.process(image_msg(types, frame(), next(stamps))).info.key_frame_reason == "reset"
    assert seg.scheduler.interval == 3


BIG = (240, 320)  # the legend covers a small part of the overlay


def stamp_free_labels(out) -> np.ndarray:
    return np.frombuffer(bytes(out.labels.data), np.uint8).reshape(out.labels.height, out.labels.width)


def test_disable_enable_reset(make_core, types, band_loaded):
    core, _, _ = make_core()
    calls = band_loaded.model.calls
    assert core.process(image_msg(types, frame(), 1.0)).info.key_frame_reason == "first"
    assert core.set_enabled(False) is True
    assert not core.enabled
    for i in range(3):
        assert core.process(image_msg(types, frame(), 1.1 + 0.01 * i)) is None
    assert core.counters["dropped_disabled"] == 3
    assert band_loaded.model.calls == calls + 1, "no inference while disabled"
    assert core.diagnostic_status().level == OK
    assert "disabled" in core.diagnostic_status().message
    assert core.diagnostic_status().message == "disabled (call ~/enable to resume)"  # with the resume hint
    assert dict(core.diagnostic_status().values)["enabled"] == "false"

    assert core.set_enabled(True) is False
    out = core.process(image_msg(types, frame(), 1.2))
    assert out.info.is_key_frame and out.info.key_frame_reason == "reset"
    assert not core.process(image_msg(types, frame(), 1.25)).info.is_key_frame

    core.reset()
    out = core.process(image_msg(types, frame(), 1.3))
    assert out.info.is_key_frame and out.info.key_frame_reason == "reset"
    assert not core.process(image_msg(types, frame(), 1.35)).info.is_key_frame
    assert core.key_frame_reasons == {"first": 1, "reset": 2}
    assert dict(core.diagnostic_status().values)["forced key frames"] == "3"  # a reset is not the schedule's
    # a gap in the stream while disabled: the first frame after re-enabling is still "reset"
    core.set_enabled(False)
    assert core.process(image_msg(types, frame(), 9.0)) is None  # more than max_gap_s after 1.35
    core.set_enabled(True)
    assert core.process(image_msg(types, frame(), 9.1)).info.key_frame_reason == "reset"  # was time_gap


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def feed(core, clock, slot, msg, dt=0.1, process=True):
    """One message through the slot ``dt`` seconds after the last, then, as the Worker does,
    processed (with the time it was put) and its outputs counted as published."""
    clock.advance(dt)
    slot.put(msg)
    if not process:
        return None
    taken, received_at = slot.take_timed(timeout=0)
    outputs = core.process(taken, received_at=received_at)
    if outputs is not None:
        core.record_published()
    return outputs


def test_diagnostics_ok_with_rates_latency_and_key_frame_ratio(make_core, types):
    core, clock, _ = make_core(schedule="fixed:2")
    slot = core.make_slot()
    for i in range(10):
        assert feed(core, clock, slot, image_msg(types, frame(), 1.0 + 0.1 * i)) is not None
    status = core.diagnostic_status()
    values = dict(status.values)
    assert status.level == OK, status.message
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in status.values)
    assert float(values["input rate (Hz)"]) == pytest.approx(10.0)
    assert float(values["output rate (Hz)"]) == pytest.approx(10.0)
    assert status.message == "segmenting at 10.0 Hz"
    assert values["latency median (ms)"] == "0.0"  # the fake clock does not move during process()
    assert float(values["key-frame ratio"]) == pytest.approx(0.5)
    assert values["received"] == "10" and values["processed"] == "10" and values["published"] == "10"
    assert values["drop ratio"] == "0.000"
    assert values["chain flow"] == "true"  # the default
    # the schedule's own (interval) key frames are not forced: only the first one is
    assert (values["key frames (interval)"], values["forced key frames"]) == ("4", "1")
    assert values["schedule"] == "fixed:2"


def test_rates_count_the_frames_in_the_window_only(make_core, types):
    """Input and output rates after a pause: the frames before it have left the 5 s window."""
    core, clock, _ = make_core()
    slot = core.make_slot()
    for i in range(5):
        feed(core, clock, slot, image_msg(types, frame(), 1.0 + 0.1 * i))
    clock.advance(4.7)
    for i in range(2):
        feed(core, clock, slot, image_msg(types, frame(), 6.0 + 0.1 * i), dt=0.5)
    s = core.stats()
    assert (s["input_rate_hz"], s["output_rate_hz"]) == (pytest.approx(2.0), pytest.approx(2.0))


def test_diagnostics_read_their_figures_in_one_lock_section(make_core, types):
    """The rates, the counters and the last problem come from one moment: the worker cannot finish
    a frame between reading the rolling statistics and reading the counters."""
    core, clock, _ = make_core()
    slot = core.make_slot()
    for i in range(3):
        feed(core, clock, slot, image_msg(types, frame(), 1.0 + 0.1 * i))

    class CountingLock:
        def __init__(self, lock):
            self.lock, self.sections = lock, 0

        def __enter__(self):
            self.sections += 1
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    core._lock = counting = CountingLock(core._lock)
    status = core.diagnostic_status()
    assert counting.sections == 1
    assert status.level == OK and dict(status.values)["published"] == "3"


def test_diagnostics_warn_when_no_output(make_core, types):
    core, clock, _ = make_core()
    assert (core.diagnostic_status().level, core.diagnostic_status().message) == (OK, "waiting for frames")
    clock.advance(6.0)
    status = core.diagnostic_status()
    assert status.level == WARN and "no output" in status.message and "no input" in status.message
    slot = core.make_slot()
    feed(core, clock, slot, image_msg(types, frame(), 1.0))
    # one output gives no rate yet: said so, not "0.0 Hz"
    assert (core.diagnostic_status().level, core.diagnostic_status().message) == (OK, "segmenting (1 frame in the last 5 s)")
    clock.advance(5.5)
    assert core.diagnostic_status().level == WARN
    assert "no input received" in core.diagnostic_status().message  # the last input left the window


def test_re_enabling_restarts_the_no_output_timer(make_core, types):
    core, clock, _ = make_core()
    slot = core.make_slot()
    feed(core, clock, slot, image_msg(types, frame(), 1.0))
    core.set_enabled(False)
    clock.advance(60.0)  # a long pause while disabled
    assert core.diagnostic_status().level == OK
    core.set_enabled(True)
    status = core.diagnostic_status()  # just re-enabled: no output is expected yet
    assert status.level == OK, status.message
    clock.advance(5.5)
    assert core.diagnostic_status().level == WARN


def _status_after_replacing(make_core, types, period: int):
    """/diagnostics after 12 messages 0.05 s apart of which the worker takes every ``period``-th
    (the others replaced in the slot)."""
    core, clock, _ = make_core()
    slot = core.make_slot()
    for i in range(12):
        feed(core, clock, slot, image_msg(types, frame(), 1.0 + 0.05 * i), dt=0.05, process=(i % period == period - 1))
    return core.diagnostic_status()


def test_diagnostics_warn_when_dropping_more_than_half(make_core, types):
    status = _status_after_replacing(make_core, types, 4)  # 3 of 4 frames replaced
    assert dict(status.values)["dropped replaced"] == "9"
    assert status.level == WARN and "dropping 75%" in status.message
    status = _status_after_replacing(make_core, types, 2)  # exactly half: no warning ("more than half")
    assert (dict(status.values)["dropped replaced"], dict(status.values)["drop ratio"]) == ("6", "0.500")
    assert status.level == OK, status.message

    core, clock, _ = make_core(max_frame_age_s=0.5)  # stale frames count as drops too
    slot = core.make_slot()
    for i in range(4):
        clock.advance(0.1)
        slot.put(image_msg(types, frame(), 1.0 + 0.1 * i))
        core.process(slot.take(timeout=0), now=10.0 + 0.1 * i)
    status = core.diagnostic_status()
    assert status.level == WARN and "4 stale" in status.message


def test_diagnostics_error_when_every_frame_fails_and_recovers(make_core, types):
    core, clock, _ = make_core()
    slot = core.make_slot()
    bad = _bad_messages(types)["unsupported encoding"]
    for _ in range(5):
        feed(core, clock, slot, bad)
    status = core.diagnostic_status()
    assert status.level == ERROR and "unsupported image encoding" in status.message
    assert dict(status.values)["skipped decode"] == "5"
    feed(core, clock, slot, image_msg(types, frame(), 2.0))
    status = core.diagnostic_status()  # one success in the window: failing, but not every frame
    assert status.level == WARN and "5 of 6 frames failed in the last 5 s: " in status.message, status.message
    clock.advance(6.0)  # the failures leave the window
    for i in range(10):
        feed(core, clock, slot, image_msg(types, frame(), 10.0 + 0.1 * i))
    feed(core, clock, slot, bad)
    assert core.diagnostic_status().level == OK  # 1 failure in 11 frames: a corrupt frame now and then
    feed(core, clock, slot, bad)
    assert core.diagnostic_status().level == WARN  # 2 in 12
    clock.advance(6.0)  # a slow node: 7 frames in the window, one corrupt
    for i in range(7):
        feed(core, clock, slot, bad if i == 3 else image_msg(types, frame(), 30.0 + 0.7 * i), dt=0.7)
    assert core.diagnostic_status().level == OK, core.diagnostic_status().message
    clock.advance(6.0)
    for _ in range(2):
        feed(core, clock, slot, bad)
    assert core.diagnostic_status().level == ERROR


def test_failure_share_warns_only_above_a_tenth():
    # "more than FAILURE_WARN_SHARE (0.1)": 2 of 20 is exactly a tenth, no warning
    assert not failures_warrant_warning(2, 20)
    assert failures_warrant_warning(2, 19) and failures_warrant_warning(3, 20)
    assert not failures_warrant_warning(1, 5)  # one failure is no trend


# --------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------


def _wait(pred, timeout=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_worker_processes_publishes_and_stops(band_loaded, types):
    core = SegmentationCore(validate({"propagator": "copy", "max_frame_age_s": 0.0}), band_loaded, types)
    slot = core.make_slot()
    published = []
    demand = OutputDemand(colored=False, overlay=True, class_masks=False)
    worker = Worker(slot, core, lambda out, li: published.append((out, li)), demand=lambda: demand).start()
    try:
        for i in range(5):
            slot.put(image_msg(types, frame(), 1.0 + 0.1 * i))
            assert _wait(lambda n=i + 1: len(published) == n), f"frame {i} not published"
    finally:
        assert worker.stop(timeout=5.0)
    assert not worker.alive
    assert worker.core is None and worker.slot is None  # the ended thread lets go of the core and its model
    assert core.counters["published"] == 5 and core.counters["processed"] == 5
    assert published[0][1] is not None and all(li is None for _, li in published[1:])
    out = published[-1][0]
    assert out.colored is None and out.overlay is not None and out.class_masks is None
    assert stamp_to_seconds(out.labels.header.stamp) == pytest.approx(1.4)


def test_worker_publishes_label_info_with_every_key_frame(band_loaded, types):
    """LabelInfo goes out with each key frame (vision_msgs' advice), not only the first."""
    core = SegmentationCore(validate({"propagator": "copy", "max_frame_age_s": 0.0, "schedule": "fixed:2"}),
                            band_loaded, types)
    slot, published = core.make_slot(), []
    worker = Worker(slot, core, lambda out, li: published.append((out.info.is_key_frame, li is not None))).start()
    try:
        for i in range(4):
            slot.put(image_msg(types, frame(), 1.0 + 0.1 * i))
            assert _wait(lambda n=i + 1: len(published) == n)
    finally:
        assert worker.stop(timeout=5.0)
    assert published == [(True, True), (False, False), (True, True), (False, False)]


def test_worker_stop_is_prompt_when_idle_and_survives_publish_errors(band_loaded, types, caplog):
    core = SegmentationCore(validate({"propagator": "copy", "max_frame_age_s": 0.0}), band_loaded, types)
    slot = core.make_slot()

    def publish(out, li):
        raise RuntimeError("publisher gone")

    worker = Worker(slot, core, publish, poll_s=0.05).start()
    with caplog.at_level(logging.ERROR, logger="mpvss_ros.ros.core"):
        slot.put(image_msg(types, frame(), 1.0))
        assert _wait(lambda: core.counters["errors"] == 1)
        # the worker counts the error, then logs it: wait for the record inside the capture (checking
        # only after the block raced with the worker thread: it failed in two full runs over three sessions)
        assert _wait(lambda: "publisher gone" in caplog.text)
        assert worker.alive
    assert worker.stop(timeout=5.0)  # joined: the idle worker noticed the stop request
    assert worker.stop()  # idempotent


def test_a_worker_whose_middleware_shut_down_ends_quietly(band_loaded, types):
    """A publish error once the middleware is shut down ends the thread; it is not counted as an error."""
    core = SegmentationCore(validate({"propagator": "copy", "max_frame_age_s": 0.0}), band_loaded, types)
    slot = core.make_slot()

    def publish(out, li):
        raise RuntimeError("context invalid")

    worker = Worker(slot, core, publish, poll_s=0.05, shut_down=lambda: True).start()
    slot.put(image_msg(types, frame(), 1.0))
    assert _wait(lambda: not worker.alive)
    assert core.counters["errors"] == 0


def test_a_logger_that_raises_does_not_end_the_worker(band_loaded, types):
    """A publish error whose logging fails too is still counted, and the worker goes on."""
    class RaisingLogger(ListLogger):
        def error(self, text):
            raise OSError("log disk full")

    core = SegmentationCore(validate({"propagator": "copy", "max_frame_age_s": 0.0}), band_loaded, types,
                            logger=RaisingLogger())
    slot = core.make_slot()

    def publish(out, li):
        raise RuntimeError("publisher gone")

    worker = Worker(slot, core, publish, poll_s=0.05).start()
    try:
        for n in (1, 2):
            slot.put(image_msg(types, frame(), float(n)))
            assert _wait(lambda n=n: core.counters["errors"] == n)
        assert worker.alive
    finally:
        assert worker.stop(timeout=5.0)


def _core_with_a_held_frame(band_loaded, types) -> tuple[SegmentationCore, threading.Event, threading.Event]:
    """A core whose segmenter holds each frame until ``release`` is set, signalling ``entered``
    when it starts one (a frame longer than a worker's stop wait)."""
    core = SegmentationCore(validate({"propagator": "copy", "max_frame_age_s": 0.0}), band_loaded, types)
    entered, release = threading.Event(), threading.Event()
    real_push = core.segmenter.push

    def slow_push(*args, **kwargs):
        entered.set()
        release.wait(10.0)
        return real_push(*args, **kwargs)

    core.segmenter.push = slow_push
    return core, entered, release


def test_worker_stopped_during_a_frame_publishes_nothing_of_it(band_loaded, types):
    """stop() whose wait runs out (a frame longer than the wait): the frame finishes, but its
    outputs are not published (the node's publishers may be deactivated or destroyed by then)."""
    core, entered, release = _core_with_a_held_frame(band_loaded, types)
    slot, published = core.make_slot(), []
    worker = Worker(slot, core, lambda out, li: published.append(out), poll_s=0.05).start()
    slot.put(image_msg(types, frame(), 1.0))
    assert entered.wait(5.0)
    assert worker.stop(timeout=0.1) is False and worker.alive  # still in the frame
    release.set()
    assert worker.stop(timeout=5.0)
    assert core.counters["processed"] == 1 and published == [] and core.counters["published"] == 0


def test_messages_a_stopping_worker_leaves_are_counted_as_dropped(band_loaded, types):
    """A deactivate while a message waits in the slot: it was counted as received and then
    nowhere (a helper's 20 activate/deactivate cycles at 30 Hz left 9 unaccounted). Now it is
    dropped_disabled, so received = processed + dropped + skipped + errors after every stop."""
    core, entered, release = _core_with_a_held_frame(band_loaded, types)
    slot = core.make_slot()
    worker = Worker(slot, core, lambda out, li: None, poll_s=0.05).start()
    slot.put(image_msg(types, frame(), 1.0))
    assert entered.wait(5.0)
    slot.put(image_msg(types, frame(), 1.1))  # waits in the slot while the worker is in the frame
    assert worker.stop(timeout=0.1) is False  # still in the frame: nothing counted yet
    release.set()
    assert worker.stop(timeout=5.0)
    c = core.counters
    assert c["received"] == 2 and c["processed"] == 1 and c["dropped_disabled"] == 1
    assert c["received"] == c["processed"] + sum(v for k, v in c.items() if k.startswith(("dropped", "skipped"))) + c["errors"]
    assert worker.stop() and c["dropped_disabled"] == 1  # idempotent: nothing counted twice


def test_worker_passes_the_node_clock_for_the_age_check(band_loaded, types):
    core = SegmentationCore(validate({"propagator": "copy", "max_frame_age_s": 0.5}), band_loaded, types)
    slot = core.make_slot()
    published = []
    worker = Worker(slot, core, lambda out, li: published.append(out), now=lambda: 100.0).start()
    try:
        slot.put(image_msg(types, frame(), 10.0))  # 90 s old
        assert _wait(lambda: core.counters["dropped_stale"] == 1)
        slot.put(image_msg(types, frame(), 99.9))
        assert _wait(lambda: len(published) == 1)
    finally:
        worker.stop()


# --------------------------------------------------------------------------------------------
# Set-up: engine from parameters, model loading errors
# --------------------------------------------------------------------------------------------


def test_build_segmenter_follows_the_parameters(lite):
    seg = build_segmenter(validate({"schedule": "fixed:5", "max_gap_s": 2.0}), lite)
    assert isinstance(seg.scheduler, FixedIntervalScheduler) and seg.scheduler.interval == 5
    # max_gap_s is the core's, on received stamps (test_max_gap_s_counts_gaps_between_received_messages)
    assert seg.scheduler.max_gap_s == math.inf and seg.propagator.name == "query_flow"
    seg = build_segmenter(validate({"scene_threshold": 0.8, "min_interval": 2, "max_interval": 7,
                                    "cut_threshold": 0.6, "propagator": "optical_flow"}), lite)
    assert isinstance(seg.scheduler, AdaptiveScheduler)
    assert (seg.scheduler.scene_threshold, seg.scheduler.min_interval, seg.scheduler.max_interval) == (0.8, 2, 7)
    assert seg.scheduler.cut_threshold == 0.6
    assert seg.propagator.name == "optical_flow"
    assert (seg.propagator.preset, seg.propagator.flow_scale) == ("fast", 0.5)
    seg = build_segmenter(validate({"propagator": "optical_flow", "optical_flow_preset": "medium",
                                    "optical_flow_scale": 1.0}), lite)
    assert (seg.propagator.preset, seg.propagator.flow_scale) == ("medium", 1.0)
    assert seg.propagator.chain_flow is True  # the default
    for prop in ("optical_flow", "query_flow"):
        assert build_segmenter(validate({"propagator": prop, "chain_flow": False}), lite).propagator.chain_flow is False
    with pytest.raises(ValueError, match="chain_flow"):
        validate({"chain_flow": "sometimes"})
    with pytest.raises(ValueError, match="optical_flow_preset"):
        validate({"optical_flow_preset": "slow"})


def test_startup_errors_are_one_line(tmp_path):
    with pytest.raises(StartupError) as exc:
        load_configured_model(validate({"weights": str(tmp_path / "missing.pt")}))
    assert "missing.pt" in str(exc.value) and "\n" not in str(exc.value)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip, not a checkpoint")
    with pytest.raises(StartupError) as exc:
        load_configured_model(validate({"weights": str(corrupt)}))
    assert "corrupt.pt" in str(exc.value) and "\n" not in str(exc.value)

    with pytest.raises(StartupError, match="unknown model"):
        load_configured_model(validate({"model": "no_such_model"}))
    # An unavailable backend is refused when the segmenter is built:
    # test_unavailable_backend_is_one_startup_line.


def test_lite_model_end_to_end_with_query_flow(lite, types):
    """The real engine: key frame, then a propagated frame; every output keeps its header."""
    core = SegmentationCore(validate({"max_frame_age_s": 0.0, "schedule": "fixed:5"}), lite, types)
    first = core.process(image_msg(types, frame(), 3.0))
    second = core.process(image_msg(types, frame(seed=1), 3.1), want_overlay=False)
    assert first.info.is_key_frame and not second.info.is_key_frame
    assert "propagation" in list(second.info.stage_names)
    for out, stamp in ((first, 3.0), (second, 3.1)):
        for h in all_headers(out):
            assert stamp_to_seconds(h.stamp) == pytest.approx(stamp) and h.frame_id == "camera_optical"
    assert len(core.label_info(header(types, 0.0, "")).class_map) == lite.config.num_classes


def test_unavailable_backend_is_one_startup_line(lite):
    # TensorRT is absent on CI machines: the node must stop with one line naming what is missing.
    from mpvss_ros.runtime import backend_missing

    if not backend_missing("tensorrt", "cpu", "fp32"):
        pytest.skip("TensorRT is available here")
    with pytest.raises(StartupError) as err:
        build_segmenter(validate({"backend": "tensorrt"}), lite)
    text = str(err.value)
    assert "\n" not in text and "tensorrt" in text and "onnxruntime" in text


def test_auto_device_on_a_gpu_machine_exports_from_the_cpu(monkeypatch):
    """device 'auto' with onnxruntime where a GPU and its CUDA provider are present (both faked):
    the torch model, which the backend only exports, is loaded on the CPU (as ``mpvss segment
    --backend onnxruntime`` does), and the backend is asked for the GPU."""
    import mpvss_ros.runtime as runtime
    import mpvss_ros.runtime.onnx_backend as onnx_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnx_backend, "onnxruntime_missing", lambda device="cpu": None)
    config = validate({"backend": "onnxruntime"})
    assert config.device == "auto"
    loaded = load_configured_model(config)   # on a real CUDA device this would not be the CPU
    assert loaded.device == torch.device("cpu")
    asked = []
    monkeypatch.setattr(runtime, "load_backend", lambda backend, loaded, device, precision, input_hw, onnx_dir,
                        copy_model: asked.append((device, input_hw, copy_model)) or loaded.model)
    build_segmenter(config, loaded)
    # no image_size: the backend prepares the model's canvas; it takes the model over (no copy)
    assert asked == [("cuda", None, False)]
    # a 1280 x 720 camera: the backend prepares its letterboxed size on the 480 x 640 canvas
    build_segmenter(validate({"backend": "onnxruntime", "image_size": [720, 1280]}), loaded)
    assert asked[-1] == ("cuda", (360, 640), False)
    # torch runs the model itself at fp32 only; at fp16 (autocast) through its backend too
    build_segmenter(validate({}), loaded)
    assert len(asked) == 2
    build_segmenter(validate({"precision": "fp16"}), loaded)
    assert asked[-1] == ("cuda", None, False)


def test_the_node_holds_the_weights_once_with_onnxruntime(marked_lite, types, tmp_path, monkeypatch):
    """The node loads the model for its core (load_configured_model) and the core keeps the
    LoadedModel: the onnxruntime backend takes the module over instead of copying it, so the
    process holds its weights once (it held them twice)."""
    monkeypatch.setenv("MPVSS_CACHE_DIR", str(tmp_path))
    config = validate({"backend": "onnxruntime", "device": "cpu", "threads": 1})
    core = SegmentationCore(config, load_configured_model(config), types)
    assert live_copies(marked_lite["values"]) == 1
    assert core.segmenter.model.source.model is core.loaded.model


def test_onnx_dir_runs_an_export_folder_without_the_model(lite, types, tmp_path):
    """``onnx_dir``: the node runs an export folder (onnxruntime here) with the classes of its
    contract and no PyTorch model; a folder that is not an export stops it with one line."""
    from mpvss_ros.runtime.export import export_onnx

    export = export_onnx(lite.model, tmp_path / "export", (H, W)).out_dir
    config = validate({"backend": "onnxruntime", "onnx_dir": str(export), "max_frame_age_s": 0.0,
                       "schedule": "fixed:2", "threads": 1})
    loaded = load_configured_model(config)
    assert loaded.model is None and loaded.config.class_names == lite.config.class_names
    core = SegmentationCore(config, loaded, types)
    assert core.segmenter.model.name.startswith("onnxruntime")
    outs = [core.process(image_msg(types, frame(seed=i), 4.0 + 0.1 * i)) for i in range(3)]
    assert [o.info.is_key_frame for o in outs] == [True, False, True]
    assert (outs[1].labels.height, outs[1].labels.width) == (H, W)
    with pytest.raises(StartupError) as exc:
        load_configured_model(validate({"backend": "onnxruntime", "onnx_dir": str(tmp_path / "nothing")}))
    assert "onnx_dir" in str(exc.value) and "contract.json not found" in str(exc.value) and "\n" not in str(exc.value)


def test_onnxruntime_backend_builds_a_segmenter(lite):
    seg = build_segmenter(validate({"backend": "onnxruntime", "schedule": "fixed:2"}), lite)
    assert seg.model.name.startswith("onnxruntime")


def test_model_parameter_default_loads_the_weights_files_own_configuration(tmp_path):
    """The node's ``model`` default '' (was 'mpvss_lite'): ``weights:=FILE`` alone loads a
    fine-tuned checkpoint of another configuration, as ``mpvss segment --weights FILE`` does."""
    import yaml

    from mpvss_ros.checkpoints import save_checkpoint
    from mpvss_ros.config import load_model_config
    from mpvss_ros.nn.mpvss import MPVSS
    from mpvss_ros.paths import find_data

    doc = yaml.safe_load(find_data("config/models/mpvss_lite.yaml").read_text())
    doc["name"], doc["transformer_decoder"]["num_queries"] = "lite_q16", 16
    (tmp_path / "lite_q16.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_model_config(str(tmp_path / "lite_q16.yaml"))
    save_checkpoint(tmp_path / "q16.pt", MPVSS(cfg), cfg.to_dict())
    assert load_configured_model(validate({"weights": str(tmp_path / "q16.pt")})).config.name == "lite_q16"
    with pytest.raises(StartupError, match="trained as lite_q16"):  # a model that contradicts it, named
        load_configured_model(validate({"model": "mpvss_lite", "weights": str(tmp_path / "q16.pt")}))


def test_threads_0_gives_torchs_default_back_after_another_count():
    """threads: 0 means torch's default; a lifecycle re-configure with 0 after one with 1 ran on
    one thread. In a fresh process (torch's thread count is process-wide), its default made 3."""
    code = ("import torch; torch.set_num_threads(3)\n"
            "from mpvss_ros.ros.core import configure_threads\n"
            "seen = []\n"
            "for n in (0, 1, 0, 2, 0):\n"
            "    configure_threads(n); seen.append(torch.get_num_threads())\n"
            "print(seen)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[3, 1, 3, 2, 3]"


def test_a_node_started_without_motion_refuses_query_flow_later(tmp_path, types):
    """A per-frame Mask2Former-style file (no motion.* keys) loads for a node started with
    optical flow; a later switch to query_flow is refused and the running propagation stays."""
    from mpvss_ros.config import load_model_config
    from mpvss_ros.nn.mpvss import MPVSS

    path = tmp_path / "per_frame.pth"
    state = MPVSS(load_model_config("mpvss_lite")).state_dict()
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("motion.")}}, path)
    with pytest.raises(StartupError, match="motion"):  # query_flow, the default, needs the motion module
        load_configured_model(validate({"model": "mpvss_lite", "weights": str(path)}))
    config = validate({"model": "mpvss_lite", "weights": str(path), "propagator": "optical_flow"})
    loaded = load_configured_model(config)
    core = SegmentationCore(config, loaded, types)
    with pytest.raises(ValueError, match="query_flow needs a trained motion module"):
        core.reconfigure({"propagator": "query_flow"})
    assert core.config.propagator == "optical_flow"
    assert core.reconfigure({"propagator": "copy"}).propagator == "copy"


def test_an_export_folder_without_a_trained_motion_module_is_refused_at_start_for_query_flow(tmp_path, types):
    """An export of weights without a motion module (contract motion_trained: false) stops a node
    started with query_flow before any graph loads or TensorRT engine builds (one line), runs with
    optical flow, and refuses a later switch to query_flow."""
    pytest.importorskip("onnxruntime")
    from mpvss_ros.config import load_model_config
    from mpvss_ros.nn.mpvss import MPVSS
    from mpvss_ros.runtime.export import export_onnx

    model = MPVSS(load_model_config("mpvss_lite"))
    model.motion_trained = False
    export = export_onnx(model.eval(), tmp_path / "export", (H, W), check=False).out_dir
    settings = {"backend": "onnxruntime", "onnx_dir": str(export), "max_frame_age_s": 0.0, "threads": 1}
    with pytest.raises(StartupError) as exc:
        load_configured_model(validate(settings))  # propagator query_flow, the default
    assert "motion_trained: false" in str(exc.value) and "\n" not in str(exc.value)
    config = validate({**settings, "propagator": "optical_flow"})
    core = SegmentationCore(config, load_configured_model(config), types)
    assert core.process(image_msg(types, frame(seed=1), 4.0)).info.is_key_frame
    with pytest.raises(ValueError, match="query_flow needs a trained motion module"):
        core.reconfigure({"propagator": "query_flow"})


def test_an_adaptive_interval_change_is_installed(make_core, types):
    """Every schedule parameter, not only ``schedule``, rebuilds the scheduler: a new max_interval
    under ``adaptive`` runs from the next frame (a key frame, reason reset)."""
    core, _, _ = make_core(schedule="adaptive", min_interval=1, max_interval=10)
    core.process(image_msg(types, frame(), 1.0))
    core.reconfigure({"max_interval": 3})
    out = core.process(image_msg(types, frame(), 1.1))
    assert out.info.key_frame_reason == "reset" and core.segmenter.scheduler.max_interval == 3


def test_two_changes_before_the_next_frame_are_both_installed(make_core, types):
    """A schedule change, then a propagation change before the worker's next frame: both reach the
    engine at that frame (the second must not replace the first's pending scheduler)."""
    core, _, _ = make_core(schedule="fixed:100", propagator="copy")
    seg = core.segmenter
    assert core.process(image_msg(types, frame(), 1.0)).info.key_frame_reason == "first"
    core.reconfigure({"schedule": "fixed:2"})
    core.reconfigure({"propagator": "optical_flow"})
    out = core.process(image_msg(types, frame(), 1.1))
    assert out.info.key_frame_reason == "reset"
    assert seg.propagator.name == "optical_flow"
    assert seg.scheduler.describe()["schedule"] == "fixed:2" and seg.scheduler.interval == 2


def test_a_frame_under_way_when_disabled_is_not_published(make_core, types, monkeypatch):
    """~/enable false answered while a frame is being segmented: the frame's outputs are dropped
    (counted as dropped_disabled, not processed), so nothing is published after the service said
    "disabled"; the key frame's stamp it made is kept for the frames after re-enabling."""
    core, _, _ = make_core()
    assert core.process(image_msg(types, frame(), 1.0)).info.key_frame_reason == "first"
    push = core.segmenter.push

    def push_then_disable(*args, **kwargs):
        result = push(*args, **kwargs)
        core.set_enabled(False)  # the service callback, on another thread, while this frame ran
        return result

    monkeypatch.setattr(core.segmenter, "push", push_then_disable)
    assert core.process(image_msg(types, frame(), 1.1)) is None
    assert core.counters["dropped_disabled"] == 1 and core.counters["processed"] == 1
    monkeypatch.setattr(core.segmenter, "push", push)
    core.set_enabled(True)
    out = core.process(image_msg(types, frame(), 1.2))
    assert out.info.is_key_frame and out.info.key_frame_reason == "reset" and core.counters["processed"] == 2


def test_enabling_an_enabled_core_resets_nothing(make_core, types):
    """``~/enable true`` on a running node: re-enabling (off -> on) resets the engine, an enable that
    changes nothing does not (the next frame is propagated as usual)."""
    core, _, _ = make_core()
    assert core.process(image_msg(types, frame(), 1.0)).info.key_frame_reason == "first"
    assert core.set_enabled(True) is True  # already on
    out = core.process(image_msg(types, frame(), 1.1))
    assert (out.info.is_key_frame, out.info.key_frame_reason) == (False, "")
    assert core.key_frame_reasons == {"first": 1}


def test_a_worker_never_started_counts_what_waits_in_its_slot(make_core, types):
    """stop() on a worker whose thread never ran: the message waiting in the slot is counted as
    dropped (received = processed + dropped + skipped + errors), once."""
    core, _, _ = make_core()
    slot = core.make_slot()
    worker = Worker(slot, core, lambda out, li: None)
    slot.put(image_msg(types, frame(), 1.0))
    assert worker.stop(timeout=1.0)
    assert core.counters["received"] == 1 and core.counters["dropped_disabled"] == 1
    assert len(slot) == 0
    assert worker.stop(timeout=1.0) and core.counters["dropped_disabled"] == 1


def test_worker_latency_counts_from_the_put(make_core, types):
    """Through the Worker too, the latency starts when the message was put in the slot: a message
    that waited 0.8 s (of the core's clock) before the worker started has 800 ms."""
    core, clock, _ = make_core()
    slot = core.make_slot()
    published = []
    slot.put(image_msg(types, frame(), 1.0))
    clock.advance(0.8)  # the worker is busy (here: not started yet)
    worker = Worker(slot, core, lambda out, li: published.append(out), poll_s=0.05).start()
    try:
        assert _wait(lambda: len(published) == 1)
    finally:
        assert worker.stop(timeout=5.0)
    assert core.stats()["latency_median_ms"] == pytest.approx(800.0)


def test_a_message_taken_as_the_worker_stops_is_counted_as_dropped(make_core, types):
    """The slot hands the worker a message at the moment stop() is requested: it is not segmented
    and is counted as dropped_disabled (no message unaccounted for)."""
    core, _, _ = make_core()
    slot = core.make_slot()
    published = []
    worker = Worker(slot, core, lambda out, li: published.append(out), poll_s=0.05)
    real_take_timed, taken_one = slot.take_timed, threading.Event()

    def take_timed(timeout=None):  # the stop request lands while the worker takes the message
        taken = real_take_timed(timeout)
        if taken is not None:
            worker._stop.set()
            taken_one.set()
        return taken

    slot.take_timed = take_timed
    slot.put(image_msg(types, frame(), 1.0))
    worker.start()
    assert taken_one.wait(5.0)  # the worker has the message (not a stop before its first take)
    assert worker.stop(timeout=5.0)
    c = core.counters
    assert (c["received"], c["processed"], c["dropped_disabled"]) == (1, 0, 1) and published == []


def test_after_re_enabling_across_a_gap_only_the_first_frame_is_a_key_frame(make_core, types):
    """The gap while disabled is consumed by the first frame after re-enabling (a ``reset`` key
    frame); the frame after that is propagated, not a second (``time_gap``) key frame."""
    core, _, _ = make_core(max_gap_s=1.0)
    assert core.process(image_msg(types, frame(), 1.0)).info.key_frame_reason == "first"
    core.set_enabled(False)
    assert core.process(image_msg(types, frame(), 9.0)) is None  # more than max_gap_s later
    core.set_enabled(True)
    outs = [core.process(image_msg(types, frame(), 9.1 + 0.05 * i)) for i in range(3)]
    assert [(o.info.is_key_frame, o.info.key_frame_reason) for o in outs] == [(True, "reset"), (False, ""), (False, "")]
    assert core.key_frame_reasons == {"first": 1, "reset": 1}


def test_drop_ratio_never_exceeds_one(make_core, types):
    """A frame that waited in the slot longer than the window and is then dropped as stale: its
    arrival has left the window, its drop has not; the drop ratio stays at most 1 (100 %)."""
    core, clock, _ = make_core(max_frame_age_s=0.5)
    slot = core.make_slot()
    slot.put(image_msg(types, frame(), 1.0))
    clock.advance(5.5)  # the worker was busy: longer than the 5 s window
    core.process(slot.take(timeout=0), now=20.0)
    clock.advance(0.1)
    slot.put(image_msg(types, frame(), 2.0))
    core.process(slot.take(timeout=0), now=20.0)
    assert core.counters["dropped_stale"] == 2
    assert core.stats()["drop_ratio"] == 1.0
    status = core.diagnostic_status()
    assert dict(status.values)["drop ratio"] == "1.000" and "dropping 100% of input frames" in status.message


def test_no_output_while_frames_arrive_says_so(make_core, types):
    """WARN "no output" names the cause: frames arrive (here all stale) but none is segmented,
    which is not "no input received"."""
    core, clock, _ = make_core(max_frame_age_s=0.5)
    slot = core.make_slot()
    for i in range(60):
        clock.advance(0.1)
        slot.put(image_msg(types, frame(), 1.0 + 0.1 * i))
        assert core.process(slot.take(timeout=0), now=100.0) is None
    status = core.diagnostic_status()
    assert status.level == WARN, status.message
    assert "frames arrive but none was segmented" in status.message and "no input received" not in status.message


# --------------------------------------------------------------------------------------------
# Property-based: random sequences of good and bad input and of control calls
# --------------------------------------------------------------------------------------------

#: Frame sizes (height, width) of the fuzzed streams: the usual, odd and tiny ones.
FUZZ_SIZES = ((24, 32), (24, 40), (48, 64), (30, 40), (7, 5), (3, 3), (1, 1), (2, 1), (1, 6))
#: Encodings no camera driver may send to the node (depth, float, 16-bit, misspelt, empty).
BAD_ENCODINGS = ("32FC1", "16UC1", "mono16", "rgb16", "8UC3", "rgb 8", "rgb", "bayer_rggb16", "jpeg", "")
FRAME_IDS = ("camera_optical", "cam_left_optical", "")
#: Per message: the input stamp minus the previous one (stamps equal, going back, gaps).
STAMP_STEPS = (0.033,) * 6 + (0.0, 0.3, 2.5, 40.0, -0.2, -5.0)
#: Per message: the node clock minus the stamp (None: no clock, the check is skipped).
FRAME_AGES = (0.0, 0.1) * 3 + (0.3, 0.8, 3.0, -1.0, None)
DYNAMIC_CHANGES = {
    "schedule": ("fixed:1", "fixed:3", "fixed:100"),
    "propagator": ("copy", "optical_flow"),
    "max_frame_age_s": (0.0, 0.5, 2.0),
    "max_gap_s": (0.2, 1.0, 10.0),
    "max_image_pixels": (16_777_216, 1500),
    "overlay_alpha": (0.0, 0.5, 1.0),
    "palette": ((), (0xFF0000, 0x00FF00)),
}
REFUSED_CHANGES = ({"schedule": "fixed:0"}, {"max_frame_age_s": -1.0}, {"model": "mpvss_r50"},
                   {"palette": (0,) * 6}, {"no_such_parameter": 1})


def _fuzz_raw_message(draw, ts, types, size, stamp: float, frame_id: str, defects: tuple[str, ...]):
    """(message, expected (h, w) or None when it must be skipped as undecodable)."""
    h, w = size
    rgb = np.random.default_rng(draw(st.integers(0, 3))).integers(0, 256, (h, w, 3), dtype=np.uint8)
    encoding = draw(st.sampled_from(conversions.SUPPORTED_ENCODINGS))
    pad = draw(st.sampled_from((0, 0, 3)))
    odd_yuv = encoding in UYVY + YUYV and w % 2  # no 4:2:2 pixel pairs: written as an even width, then widened
    msg = encode(ts, rgb[:, : w - 1] if odd_yuv else rgb, encoding, pad=pad, header=header(types, stamp, frame_id),
                 is_bigendian=draw(st.sampled_from((0, 1))))
    if odd_yuv:
        msg = dataclasses.replace(msg, width=w, step=2 * w, data=np.zeros(2 * w * h, np.uint8))
    good = not (odd_yuv or (encoding in BAYER and min(h, w) < 3))
    defect = draw(st.sampled_from(defects))
    if defect == "encoding":
        msg = dataclasses.replace(msg, encoding=draw(st.sampled_from(BAD_ENCODINGS)))
    elif defect == "step too small":
        msg = dataclasses.replace(msg, step=w * BPP[encoding] - 1)
    elif defect == "data too short":
        msg = dataclasses.replace(msg, data=msg.data[:-1])
    elif defect == "data too long":
        msg = dataclasses.replace(msg, data=np.concatenate([msg.data, msg.data[:msg.step]]))
    elif defect == "big-endian flag":
        msg = dataclasses.replace(msg, is_bigendian=draw(st.sampled_from((2, 255))))
    elif defect == "0 x 0":
        msg = dataclasses.replace(msg, height=0, width=0, step=0, data=np.zeros(0, np.uint8))
    elif defect == "compressed":  # a CompressedImage on the raw input
        msg = jpeg_msg(types, rgb, stamp, frame_id=frame_id)
    elif defect == "no header":
        msg = dataclasses.replace(msg, header=None)
    return msg, ((h, w) if good and defect == "none" else None)


def _fuzz_compressed_message(draw, types, size, stamp: float, frame_id: str, kinds: tuple[str, ...]):
    """(message, expected (h, w) or None when it must be skipped as undecodable)."""
    h, w = size
    rgb = np.random.default_rng(draw(st.integers(0, 3))).integers(0, 256, (h, w, 3), dtype=np.uint8)
    kind = draw(st.sampled_from(kinds))
    if kind in ("jpeg", "truncated jpeg", "long format", "no format"):
        fmt = {"long format": "rgb8; jpeg compressed bgr8", "no format": ""}.get(kind, "jpeg")
        msg = jpeg_msg(types, rgb, stamp, truncate=kind.startswith("truncated"), frame_id=frame_id, fmt=fmt)
    elif kind == "bayer png":
        mosaic = np.ascontiguousarray(pixel_bytes(rgb, "bayer_rggb8")[..., 0])
        msg = jpeg_msg(types, mosaic, stamp, frame_id=frame_id, ext=".png", fmt="bayer_rggb8; png compressed ")
    elif kind in ("png", "png as jpeg", "truncated png"):
        msg = jpeg_msg(types, rgb, stamp, truncate=kind == "truncated png", frame_id=frame_id, ext=".png",
                       fmt="jpeg" if kind == "png as jpeg" else "png")
    elif kind == "raw image":  # a raw Image on the compressed input
        msg = image_msg(types, rgb, stamp, frame_id)
    elif kind == "no header":
        msg = dataclasses.replace(jpeg_msg(types, rgb, stamp), header=None)
    else:
        data = {"garbage": np.frombuffer(b"\x00not an image at all" * 3, np.uint8).copy(),
                "empty": np.zeros(0, np.uint8)}.get(kind, jpeg_msg(types, rgb, stamp).data)
        fmt = {"depth format": "16UC1; compressedDepth", "bmp format": "bmp"}.get(kind, "jpeg")
        msg = types.compressed_image(header=header(types, stamp, frame_id), format=fmt, data=data)
    good = kind in ("jpeg", "png", "png as jpeg", "no format", "long format") or (kind == "bayer png" and min(h, w) >= 3)
    return msg, ((h, w) if good else None)


RAW_DEFECTS = ("encoding", "step too small", "data too short", "data too long", "big-endian flag", "0 x 0",
               "compressed", "no header")
COMPRESSED_GOOD = ("jpeg", "png", "png as jpeg", "no format", "long format", "bayer png")
COMPRESSED_BAD = ("truncated jpeg", "truncated png", "garbage", "empty", "depth format", "bmp format", "raw image",
                  "no header")


@st.composite
def fuzz_messages(draw, ts, types, compressed: bool, size, stamp: float, frame_id: str, bad: bool | None):
    """An input message of ``size`` (h, w) for the raw (Image) or compressed input: well-formed (``bad`` False; a
    YUV frame of odd width or a Bayer one under 3 x 3 is still undecodable), bad (True) or either (None)."""
    if compressed:
        kinds = COMPRESSED_BAD if bad else COMPRESSED_GOOD + (COMPRESSED_BAD if bad is None else ())
        return _fuzz_compressed_message(draw, types, size, stamp, frame_id, kinds)
    defects = RAW_DEFECTS if bad else ("none",) + (RAW_DEFECTS if bad is None else ())
    return _fuzz_raw_message(draw, ts, types, size, stamp, frame_id, defects)


def test_random_streams_of_good_and_bad_input_and_control_calls(make_core, ts, types):
    """Random sequences of frames (every encoding, compressed or not, odd and tiny sizes, header
    stamps equal, going back or jumping, frame_id changes, stale ones) mixed with bad messages
    and with reset, enable/disable and reconfigure. After every step: nothing raised; a
    published frame carries its input's exact header, its size, valid class IDs and a key frame
    whenever the docs force one (first, reset, re-enable, schedule change, resolution change,
    stamp going back, time gap, frame_id change) and none otherwise; every received message is
    counted exactly once (processed, dropped or skipped, by its reason); diagnostics agree."""

    class Stream(RuleBasedStateMachine):
        @initialize(compressed=st.booleans(), max_frame_age_s=st.sampled_from(DYNAMIC_CHANGES["max_frame_age_s"]),
                    schedule=st.sampled_from(DYNAMIC_CHANGES["schedule"]),
                    base=st.sampled_from((100.0, 1_700_000_000.0)))
        def start(self, compressed, max_frame_age_s, schedule, base):
            self.core, self.clock, _ = make_core(input_compressed=compressed, max_frame_age_s=max_frame_age_s,
                                                 schedule=schedule, max_gap_s=1.0)
            self.slot = self.core.make_slot()
            self.compressed = compressed
            self.stamp, self.frame_id, self.size = base, FRAME_IDS[0], (24, 32)
            self.expected = Counter()  # the counters this model expects
            # the engine, as the docs describe it
            self.installed = (schedule, "copy")
            self.reset_pending = False
            self.segmented_any = False
            self.key_size = self.last_stamp = self.last_frame_id = self.key_stamp = None
            self.since_key = 0
            self.last_received: float | None = None
            self.gap_pending = False

        def _interval(self) -> int:
            return int(self.installed[0].split(":")[1])

        def _receive(self, msg) -> None:
            """The subscription: the message into the slot, its stamp noted for max_gap_s."""
            self.clock.advance(0.05)
            self.slot.put(msg)
            self.expected["received"] += 1
            self.gap_now = False
            if msg.header is None:  # no stamp to note
                return
            stamp = stamp_to_seconds(msg.header.stamp)
            max_gap = self.core.config.max_gap_s
            self.gap_now = self.last_received is not None and stamp - self.last_received > max_gap
            self.gap_pending |= self.gap_now
            self.last_received = stamp

        @rule(data=st.data(), step=st.sampled_from(STAMP_STEPS), age=st.sampled_from(FRAME_AGES),
              new_frame_id=st.sampled_from((None,) * 12 + FRAME_IDS), new_size=st.sampled_from((None,) * 6 + FUZZ_SIZES))
        def good_frame(self, data, step, age, new_frame_id, new_size):
            """A well-formed frame (of another resolution or frame_id, sometimes)."""
            self.size = new_size or self.size
            self._message(data, step, age, new_frame_id, bad=False)

        @rule(data=st.data())
        def steady_frames(self, data):
            """Three well-formed frames of a steady stream (the propagated frames between key frames)."""
            for _ in range(3):
                self._message(data, STAMP_STEPS[0], FRAME_AGES[0], None, bad=False)

        @rule(data=st.data(), step=st.sampled_from(STAMP_STEPS), age=st.sampled_from(FRAME_AGES),
              new_frame_id=st.sampled_from((None,) * 12 + FRAME_IDS))
        def bad_message(self, data, step, age, new_frame_id):
            """A message that cannot be decoded."""
            self._message(data, step, age, new_frame_id, bad=True)

        @rule(data=st.data(), step=st.sampled_from(STAMP_STEPS), age=st.sampled_from(FRAME_AGES))
        def replaced_message(self, data, step, age):
            """A message replaced in the slot before the worker takes it, then the newer one."""
            older, _ = data.draw(fuzz_messages(ts, types, self.compressed, self.size, self.stamp, self.frame_id, bad=None))
            self._receive(older)
            self.expected["dropped_replaced"] += 1
            self._message(data, step, age, None, bad=None)

        def _message(self, data, step, age, new_frame_id, bad):
            """One message as the worker handles it: taken from the slot, processed, published."""
            self.stamp = round(self.stamp + step, 3)
            self.frame_id = new_frame_id if new_frame_id is not None else self.frame_id
            msg, size = data.draw(fuzz_messages(ts, types, self.compressed, self.size, self.stamp, self.frame_id, bad))
            self._receive(msg)
            taken, received_at = self.slot.take_timed(timeout=0)
            assert taken is msg and len(self.slot) == 0
            now = None if age is None else self.stamp + age
            cfg, config_engine = self.core.config, (self.core.config.schedule, self.core.config.propagator)
            out = self.core.process(taken, now, received_at=received_at)
            if out is not None:
                self.core.record_published()

            if not self.core.enabled:
                assert out is None
                self.expected["dropped_disabled"] += 1
                return
            if config_engine != self.installed:  # a schedule or propagator change: installed now, with a reset
                self.installed, self.reset_pending = config_engine, True
            if msg.header is None:
                assert out is None
                self.expected["skipped_decode"] += 1
                return
            if age is not None and cfg.max_frame_age_s > 0 and age > cfg.max_frame_age_s:
                assert out is None, "a stale frame was segmented"
                self.expected["dropped_stale"] += 1
                return
            if size is not None and size[0] * size[1] > cfg.max_image_pixels:
                size = None
            if size is None:
                assert out is None, f"an undecodable message was segmented: {msg!r:.300}"
                self.expected["skipped_decode"] += 1
                return
            assert out is not None, f"a good frame was not segmented: {dict(self.core.counters)}"
            self._check_outputs(msg, out, size)

        def _check_outputs(self, msg, out, size) -> None:
            for h in all_headers(out):  # exactly the input's header
                assert (h.stamp.sec, h.stamp.nanosec, h.frame_id) == (
                    msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id)
            assert (out.labels.height, out.labels.width) == size == (out.confidence.height, out.confidence.width)
            labels = np.asarray(out.labels.data).reshape(size)
            assert out.labels.encoding == "mono8" and labels.max() < 5
            assert list(out.class_masks.class_ids) == sorted(np.unique(labels).tolist())
            stamp = stamp_to_seconds(msg.header.stamp)
            forced = set()  # the key-frame reasons that apply
            if self.reset_pending or not self.segmented_any:
                forced.add("reset" if self.segmented_any else "first")
            if self.key_size is not None and size != self.key_size:
                forced.add("resolution_change")
            if self.last_stamp is not None and stamp < self.last_stamp:
                forced.add("time_backwards")
            if self.last_frame_id is not None and msg.header.frame_id != self.last_frame_id:
                forced.add("frame_id_change")
            if self.gap_now:
                forced.add("time_gap")
            # a gap noted at a message skipped since (stale, undecodable) may still be pending
            possible = forced | ({"time_gap"} if self.gap_pending else set())
            if self.segmented_any and self.since_key + 1 >= self._interval():
                possible.add("interval")
            info = out.info
            if forced:
                assert info.is_key_frame and info.key_frame_reason in possible, (info.key_frame_reason, possible)
            else:
                assert not info.is_key_frame or info.key_frame_reason in possible, (info.key_frame_reason, possible)
                if not possible:
                    assert not info.is_key_frame
            if info.is_key_frame:
                self.key_stamp = (msg.header.stamp.sec, msg.header.stamp.nanosec)
                self.key_size, self.since_key = size, 0
                self.expected["key_frames"] += 1
            else:
                self.since_key += 1
            assert (info.key_frame_stamp.sec, info.key_frame_stamp.nanosec) == self.key_stamp
            self.segmented_any, self.reset_pending, self.gap_pending = True, False, False
            self.last_stamp, self.last_frame_id = stamp, msg.header.frame_id
            self.expected["processed"] += 1
            self.expected["published"] += 1

        @rule()
        def reset(self):
            """~/reset: the next segmented frame is a key frame."""
            self.core.reset()
            self.reset_pending = True

        @rule(enabled=st.booleans())
        def set_enabled(self, enabled):
            """~/enable: re-enabling resets the engine."""
            was = self.core.set_enabled(enabled)
            if enabled and not was:
                self.reset_pending = True

        @rule(name=st.sampled_from(sorted(DYNAMIC_CHANGES)), data=st.data())
        def reconfigure(self, name, data):
            """A valid dynamic parameter change takes effect."""
            value = data.draw(st.sampled_from(DYNAMIC_CHANGES[name]))
            new = self.core.reconfigure({name: value})
            assert getattr(new, name) == value and self.core.config is new

        @rule(change=st.sampled_from(REFUSED_CHANGES))
        def refused_reconfigure(self, change):
            """A change the parameter table refuses raises ValueError and changes nothing."""
            before = self.core.config
            with pytest.raises(ValueError):
                self.core.reconfigure(change)
            assert self.core.config is before

        @invariant()
        def every_message_is_counted_once(self):
            """received = processed + dropped (stale, replaced, disabled) + skipped + errors, each
            by the reason the model expects; diagnostics show the same counters."""
            c = self.core.counters
            assert {k: c[k] for k in c if c[k]} == {k: v for k, v in self.expected.items() if v}
            assert c["received"] == sum(c[k] for k in ("processed", "dropped_stale", "dropped_replaced",
                                                       "dropped_disabled", "skipped_decode", "skipped_frame", "errors"))
            assert sum(self.core.key_frame_reasons.values()) == c["key_frames"]
            status = self.core.diagnostic_status()
            values = dict(status.values)
            assert all(values[k.replace("_", " ")] == str(c[k]) for k in c)
            assert status.level in (OK, WARN, ERROR)
            if not self.core.enabled:
                assert status.level == OK and status.message.startswith("disabled")

    run_state_machine_as_test(Stream, settings=settings(max_examples=60, stateful_step_count=25, deadline=None))
