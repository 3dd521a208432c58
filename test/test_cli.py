"""Tests of the ``mpvss`` command line (mpvss_ros.cli.main, run in-process) and offline outputs."""

from __future__ import annotations

import argparse
import errno
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from helpers import count_live_records, error_line

import mpvss_ros.cli as cli
import mpvss_ros.model_loader as model_loader
import mpvss_ros.offline as offline
import mpvss_ros.runtime as runtime
import mpvss_ros.runtime.bench as bench
import mpvss_ros.runtime.tensorrt_backend as tensorrt_backend
from mpvss_ros.cli import build_parser, main
from mpvss_ros.io.video import read_label_png
from mpvss_ros.offline import (OVERLAY_FPS_RANGE, RunStats, SegmentOptions, _OverlayVideo, segment_path,
                               terminate_unwinds)
from mpvss_ros.runtime import cache as runtime_cache
from mpvss_ros.runtime import export as runtime_export
from mpvss_ros.runtime.commands import NO_MOTION_EXPORT_NOTE, load_model_and_backend
from mpvss_ros.runtime.export import GraphSource
from mpvss_ros.runtime.tensorrt_backend import DEFAULT_WORKSPACE_MB

pytestmark = pytest.mark.usefixtures("torch_single_thread")

BIKES_HW = (272, 640)
N = 8
RECORD_KEYS = {"frame", "stamp", "is_key_frame", "scene_score", "stage_latency_ms"}


def _segment(input_path, out: Path, *extra: str) -> int:
    return main(["segment", str(input_path), "--out", str(out), "--no-progress", *extra])


def _read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]


# ------------------------------------------------------------------ video input, every propagator/schedule

#: (propagator, schedule, expected key frames among the first 8 frames of bikes.mp4). The first
#: cut of bikes.mp4 is at frame 30 and the scene score stays below 0.2 up to frame 8, so the
#: adaptive schedule (max interval 10) has only the first frame as key frame.
CASES = [
    ("query_flow", "fixed:1", list(range(8))),
    ("query_flow", "fixed:3", [0, 3, 6]),
    ("optical_flow", "fixed:3", [0, 3, 6]),
    ("copy", "fixed:3", [0, 3, 6]),
    ("query_flow", "adaptive", [0]),
    ("optical_flow", "adaptive", [0]),
    ("copy", "adaptive", [0]),
]


@pytest.mark.parametrize("propagator, schedule, keys", CASES, ids=[f"{p}-{s}" for p, s, _ in CASES])
def test_segment_bikes(bikes_path, tmp_path, capsys, propagator, schedule, keys):
    out = tmp_path / "out"
    rc = _segment(bikes_path, out, "--max-frames", str(N), "--propagator", propagator, "--schedule", schedule)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    brief = json.loads(captured.out.splitlines()[0])
    assert brief["frames"] == N and brief["key_frames"] == len(keys)

    # labels/*.png: one per frame, at the input size, valid class IDs
    names = sorted(p.name for p in (out / "labels").iterdir())
    assert names == [f"{i:06d}.png" for i in range(N)]
    for name in names:
        labels = read_label_png(out / "labels" / name)
        assert labels.shape == BIKES_HW and labels.dtype == np.uint8
        assert int(labels.max()) < 11

    # frames.jsonl: one record per frame, in order, with the schedule's key frames
    records = _read_jsonl(out / "frames.jsonl")
    assert len(records) == N
    for i, rec in enumerate(records):
        assert RECORD_KEYS <= set(rec)
        assert rec["frame"] == i and rec["name"] == f"{i:06d}"
        assert rec["stamp"] == pytest.approx(i / 25.0)
        assert rec["scene_score"] >= 0.0
        stage = "segmentor" if rec["is_key_frame"] else "propagation"
        assert stage in rec["stage_latency_ms"] and "total" in rec["stage_latency_ms"]
    assert [r["frame"] for r in records if r["is_key_frame"]] == keys
    expected_reasons = ["first"] + ["interval"] * (len(keys) - 1)
    assert [r["key_frame_reason"] for r in records if r["is_key_frame"]] == expected_reasons
    assert [r["key_frame"] for r in records] == [max(k for k in keys if k <= i) for i in range(N)]

    # summary.json agrees
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == N and summary["key_frames"] == len(keys)
    assert summary["key_frame_ratio"] == pytest.approx(len(keys) / N)
    assert summary["propagator"] == propagator and summary["schedule"] == schedule
    settings = summary["schedule_settings"]  # every setting that decided the key frames
    assert settings["max_gap_s"] is None  # no time-gap key frames offline: stamps are index / fps
    if schedule.startswith("adaptive"):
        assert settings["schedule"] == "adaptive:0.5" and settings["scene_threshold"] == 0.5  # the default scene threshold
        assert (settings["max_interval"], settings["cut_threshold"], settings["min_interval"]) == (10, 0.45, 1)
    else:
        assert settings["schedule"] == schedule and settings["interval"] == int(schedule.split(":")[1])
        assert "cut_threshold" not in settings
    assert summary["key_frame_reasons"] == {r: expected_reasons.count(r) for r in set(expected_reasons)}
    assert sum(summary["class_pixel_share"].values()) == pytest.approx(1.0, abs=1e-4)
    assert summary["stage_latency_ms"]["total"]["count"] == N

    # overlay.mp4: 8 frames at the input size and rate
    cap = cv2.VideoCapture(str(out / "overlay.mp4"))
    try:
        assert cap.isOpened()
        assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (640, 272)
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(25.0, abs=1e-3)  # at the input's frame rate
        frames = 0
        while cap.read()[0]:
            frames += 1
    finally:
        cap.release()
    assert frames == N


def test_segment_optical_flow_settings_reach_the_propagator(bikes_path, tmp_path):
    out = tmp_path / "medium"
    assert _segment(bikes_path, out, "--max-frames", "3", "--propagator", "optical_flow", "--schedule", "fixed:3",
                    "--optical-flow-preset", "medium", "--optical-flow-scale", "0.25", "--no-overlay") == 0
    settings = json.loads((out / "summary.json").read_text())["propagator_settings"]
    assert (settings["name"], settings["preset"], settings["flow_scale"]) == ("optical_flow", "medium", 0.25)
    assert settings["chain_flow"] is True  # the default


@pytest.mark.parametrize("propagator", ["query_flow", "optical_flow"])
def test_segment_no_chain_flow_reaches_the_propagator(bikes_path, tmp_path, propagator):
    out = tmp_path / propagator
    assert _segment(bikes_path, out, "--max-frames", "3", "--propagator", propagator, "--schedule", "fixed:3",
                    "--no-chain-flow", "--no-overlay") == 0
    settings = json.loads((out / "summary.json").read_text())["propagator_settings"]
    assert (settings["name"], settings["chain_flow"]) == (propagator, False)


def test_error_bad_optical_flow_scale(tiny_folder, tmp_path, capsys):
    for bad in ("0", "0.05", "1.01"):  # the node parameter's range, [0.1, 1]
        with pytest.raises(SystemExit) as exc:
            _segment(tiny_folder, tmp_path / "out", "--optical-flow-scale", bad)
        assert exc.value.code == 2 and "must be in [0.1, 1]" in capsys.readouterr().err


def test_segment_no_overlay(bikes_path, tmp_path):
    out = tmp_path / "o"
    assert _segment(bikes_path, out, "--max-frames", "2", "--propagator", "copy", "--no-overlay") == 0
    assert not (out / "overlay.mp4").exists()
    assert len(list((out / "labels").glob("*.png"))) == 2


def test_segment_path_without_labels_writes_no_png(tmp_path, lite):
    """SegmentOptions(write_labels=False): labels/ stays empty; frames.jsonl and the summary are written."""
    rng = np.random.default_rng(0)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(2)})
    summary = segment_path(tmp_path / "frames", tmp_path / "out", lite,
                           SegmentOptions(propagator="copy", write_labels=False, write_overlay=False, progress=False))
    assert summary["frames"] == 2 and len(_read_jsonl(tmp_path / "out" / "frames.jsonl")) == 2
    assert list((tmp_path / "out" / "labels").iterdir()) == []


# ------------------------------------------------------------------ image folder input


def _write_folder(folder: Path, images: dict[str, np.ndarray]) -> None:
    folder.mkdir()
    for stem, rgb in images.items():
        assert cv2.imwrite(str(folder / f"{stem}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _check_folder_run(out: Path, stems: list[str], hw: tuple[int, int], fps: float, interval: int) -> None:
    assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(f"{s}.png" for s in stems)
    for s in stems:
        assert read_label_png(out / "labels" / f"{s}.png").shape == hw
    records = _read_jsonl(out / "frames.jsonl")
    assert [r["name"] for r in records] == stems
    assert [r["stamp"] for r in records] == pytest.approx([i / fps for i in range(len(stems))])
    assert [r["frame"] for r in records if r["is_key_frame"]] == list(range(0, len(stems), interval))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == len(stems)


def test_segment_image_folder_synthetic(tmp_path, capsys):
    rng = np.random.default_rng(0)
    stems = ["a_000", "a_001", "b_002", "c_003", "z_004"]
    base = rng.integers(0, 256, (13, 19, 3), dtype=np.uint8)
    images = {s: np.ascontiguousarray(cv2.resize(np.roll(base, i, axis=1), (157, 101))) for i, s in enumerate(stems)}
    folder = tmp_path / "frames"
    _write_folder(folder, images)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = _segment(folder, out, "--propagator", "optical_flow", "--schedule", "fixed:2", "--fps", "10")
    assert rc == 0, capsys.readouterr().err
    _check_folder_run(out, stems, (101, 157), 10.0, 2)


def test_segment_counts_the_input_frames_it_could_not_read(tmp_path, capsys):
    # the files skipped with a warning are listed in summary.json and counted on the result line,
    # which said "skipped": 0 for a folder whose files half failed to decode
    rng = np.random.default_rng(0)
    folder = tmp_path / "frames"
    _write_folder(folder, {f"f{i:03d}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in (0, 2, 3)})
    (folder / "f001.png").write_bytes(b"")
    out = tmp_path / "out"
    assert _segment(folder, out, "--schedule", "fixed:1") == 0
    brief = json.loads(capsys.readouterr().out.splitlines()[0])
    assert brief["frames"] == 3 and brief["unreadable"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_unreadable"] == ["f001"] and summary["missing_at_end"] == 0
    records = _read_jsonl(out / "frames.jsonl")  # source_index: the position in the input, f001 counted
    assert [(r["name"], r["source_index"]) for r in records] == [("f000", 0), ("f002", 2), ("f003", 3)]


def test_segment_skips_frames_above_max_image_pixels(tmp_path, capsys, caplog):
    """mpvss segment had no pixel limit, unlike the node and mpvss bag: a 9000 x 9000 PNG (6.7 MB)
    in a folder raised its peak memory from 0.43 to 2.1 GB (docs/experiment_log.md, "Stop 37").
    Frames above --max-image-pixels (4096 x 4096 by default, as theirs; 0 = no limit) are skipped
    from the file's header, logged, listed in summary.json and counted on the result line."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "frames"
    _write_folder(folder, {"f000": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8),
                           "f002": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8),
                           "f003": rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)})
    assert cv2.imwrite(str(folder / "f001.png"), np.zeros((4097, 4096), np.uint8))  # one row above the default
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="mpvss_ros.io.video"):
        assert _segment(folder, out, "--schedule", "fixed:1") == 0
    brief = json.loads(capsys.readouterr().out.splitlines()[0])
    assert brief["frames"] == 3 and brief["too_large"] == 1 and brief["unreadable"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_too_large"] == ["f001"] and summary["max_image_pixels"] == 4096 * 4096
    assert "f001.png: 4096 x 4097 = 16781312 pixels, more than the 16777216 allowed" in caplog.text
    assert "--max-image-pixels" in caplog.text
    (folder / "f001.png").unlink()
    assert _segment(folder, tmp_path / "out2", "--max-image-pixels", "1000") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["too_large"] == 1  # f003: 1200 pixels
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["skipped_too_large"] == ["f003"]
    assert _segment(folder, tmp_path / "out3", "--max-image-pixels", "0") == 0  # no limit
    summary = json.loads((tmp_path / "out3" / "summary.json").read_text())
    assert summary["frames"] == 3 and summary["max_image_pixels"] is None


def test_segment_with_every_frame_above_the_limit_names_the_flag(tmp_path, capsys):
    folder = tmp_path / "frames"
    _write_folder(folder, {"f0": np.zeros((20, 30, 3), np.uint8), "f1": np.zeros((20, 30, 3), np.uint8)})
    out = tmp_path / "out"
    assert _segment(folder, out, "--no-overlay") == 0  # an earlier run's outputs
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(before) == 4  # frames.jsonl, summary.json and two label PNGs
    capsys.readouterr()
    for refused in (folder, folder / "f0.png"):
        assert _segment(refused, out, "--max-image-pixels", "100") == 2
        line = error_line(capsys.readouterr().err)
        assert f"{1 + (refused == folder)} had more than the 100 pixels of --max-image-pixels (0 = no limit)" in line
        # nothing was segmented: the earlier run stays (it was emptied before the first frame was read)
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_segment_image_folder_camvid(camvid_val, tmp_path, capsys):
    files = sorted(camvid_val.glob("*.png"))[:5]
    assert len(files) == 5
    folder = tmp_path / "camvid5"
    folder.mkdir()
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    rc = _segment(folder, out, "--propagator", "copy", "--schedule", "fixed:5")
    assert rc == 0, capsys.readouterr().err
    _check_folder_run(out, [f.stem for f in files], (360, 480), 30.0, 5)


def test_frames_with_non_finite_logits_are_skipped_and_listed(tmp_path, capsys, monkeypatch):
    """A frame whose logits are NaN is left out (not written as all class 0) and named in the
    summary; a run where every frame is is an error."""
    from mpvss_ros.segmenter import NonFiniteOutputError, VideoSegmenter

    rng = np.random.default_rng(1)
    stems = ["f0", "f1", "f2"]
    _write_folder(tmp_path / "frames", {s: rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for s in stems})
    real = VideoSegmenter.push

    def push(self, image, stamp, **kwargs):
        if round(stamp * 30) == 1:
            self.reset()
            raise NonFiniteOutputError("the key frame's class or mask logits hold NaN or infinite values")
        return real(self, image, stamp, **kwargs)

    monkeypatch.setattr(VideoSegmenter, "push", push)
    out = tmp_path / "out"
    assert _segment(tmp_path / "frames", out, "--propagator", "copy", "--schedule", "fixed:1") == 0
    assert sorted(p.stem for p in (out / "labels").iterdir()) == ["f0", "f2"]
    assert json.loads((out / "summary.json").read_text())["skipped_non_finite"] == ["f1"]
    video = cv2.VideoCapture(str(out / "overlay.mp4"))  # the skipped frame keeps its place
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    video.release()
    assert _segment(tmp_path / "frames", tmp_path / "out_2", "--max-frames", "2") == 0  # the skipped one counts
    assert json.loads((tmp_path / "out_2" / "summary.json").read_text())["frames"] == 1
    monkeypatch.setattr(VideoSegmenter, "push", lambda self, image, stamp, **kwargs: (_ for _ in ()).throw(
        NonFiniteOutputError("NaN")))
    capsys.readouterr()
    assert _segment(tmp_path / "frames", tmp_path / "out2") == 1  # the model's fault, not the input's
    err = capsys.readouterr().err
    assert "no frame of" in err and "(3 gave NaN or infinite logits" in err


def test_frames_the_backend_fails_on_are_skipped_and_a_failing_backend_stops(tmp_path, capsys, monkeypatch):
    """One frame the backend fails on (a CUDA out-of-memory) ended mpvss segment; it is skipped,
    listed, and the next frame is a key frame. A backend failing on 20 frames in a row stops the
    run with one error line, exit status 1."""
    from mpvss_ros.propagation import CopyPropagator

    rng = np.random.default_rng(2)
    stems = [f"f{i}" for i in range(4)]
    _write_folder(tmp_path / "frames", {s: rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for s in stems})
    real, calls = CopyPropagator.propagate, []

    def propagate(self, key, image):
        calls.append(1)
        if len(calls) == 1:  # f1, the first non-key frame
            raise RuntimeError("CUDA out of memory")
        return real(self, key, image)

    monkeypatch.setattr(CopyPropagator, "propagate", propagate)
    out = tmp_path / "out"
    assert _segment(tmp_path / "frames", out, "--propagator", "copy", "--schedule", "fixed:10") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_engine"] == ["f1"] and summary["frames"] == 3
    assert json.loads(capsys.readouterr().out.splitlines()[0])["skipped"] == 1
    assert summary["key_frame_reasons"] == {"first": 1, "reset": 1}  # f2 after the failure
    assert "warning" not in capsys.readouterr().err  # one failure in four frames: listed only
    calls.clear()
    monkeypatch.setattr(CopyPropagator, "propagate", lambda self, key, image: (_ for _ in ()).throw(RuntimeError("no")))
    assert _segment(tmp_path / "frames", tmp_path / "out1", "--propagator", "copy", "--schedule", "fixed:10") == 0
    assert json.loads((tmp_path / "out1" / "summary.json").read_text())["skipped_engine"] == ["f1", "f3"]
    assert ("mpvss: warning: the inference backend failed on 2 of 4 frames (skipped_engine in summary.json"
            in capsys.readouterr().err)  # every non-key frame fails, every other frame is a key frame
    from mpvss_ros.segmenter import VideoSegmenter

    monkeypatch.setattr(VideoSegmenter, "push", lambda self, image, stamp, **kw: (_ for _ in ()).throw(RuntimeError("broken")))
    capsys.readouterr()  # fewer failures than stop a run, but every frame: exit status 1 as mpvss bag, not 2 (input)
    assert _segment(tmp_path / "frames", tmp_path / "out3", "--propagator", "copy", "--schedule", "fixed:10") == 1
    assert "no frame of" in capsys.readouterr().err
    monkeypatch.setattr(offline, "MAX_ENGINE_FAILURES_IN_A_ROW", 2)  # key frames fail too: nothing comes out
    monkeypatch.setattr(VideoSegmenter, "push", lambda self, image, stamp, **kw: (_ for _ in ()).throw(RuntimeError("broken")))
    capsys.readouterr()
    assert _segment(tmp_path / "frames", tmp_path / "out2", "--propagator", "copy", "--schedule", "fixed:10") == 1
    assert ("the inference backend failed on 2 frames in a row (the last, f1: RuntimeError: broken)"
            in capsys.readouterr().err)


# ------------------------------------------------------------------ errors


@pytest.fixture()
def tiny_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny"
    _write_folder(folder, {"f0": np.full((20, 30, 3), 90, np.uint8)})
    return folder


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_segment_stopped_mid_run_says_what_it_left(tmp_path, capsys, caplog, monkeypatch, how):
    # Ctrl-C said only "interrupted"; SIGTERM killed the process: frames.jsonl empty (its buffer
    # lost) beside the labels already written, overlay.mp4 without its index, no line at all
    import os

    from mpvss_ros.segmenter import VideoSegmenter

    rng = np.random.default_rng(2)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for i in range(5)})
    real = VideoSegmenter.push

    def push(self, image, stamp, **kwargs):
        if round(stamp * 30) == 3:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, image, stamp, **kwargs)

    def not_unwound(signum, frame):  # what a SIGTERM that mpvss segment does not handle reaches
        raise AssertionError("SIGTERM was not unwound by mpvss segment (by default it kills the process)")

    monkeypatch.setattr(VideoSegmenter, "push", push)
    out = tmp_path / "out"
    if how == "ctrl-c":
        assert _segment(tmp_path / "frames", out, "--propagator", "copy") == 130
    else:
        previous = signal.signal(signal.SIGTERM, not_unwound)
        try:
            with pytest.raises(SystemExit) as exc:
                _segment(tmp_path / "frames", out, "--propagator", "copy")
            assert signal.getsignal(signal.SIGTERM) is not_unwound  # restored
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert exc.value.code == 143
    err = capsys.readouterr().err
    assert "holds its partial output, 3 frames in labels/ and frames.jsonl" in caplog.text
    assert ("mpvss: interrupted" if how == "ctrl-c" else "mpvss: terminated") in err
    assert len(_read_jsonl(out / "frames.jsonl")) == 3
    assert sorted(p.stem for p in (out / "labels").iterdir()) == ["f0", "f1", "f2"]
    assert not (out / "summary.json").exists()
    video = cv2.VideoCapture(str(out / "overlay.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    video.release()


def test_an_ignored_sigterm_stays_ignored_during_a_run():
    """A process that ignores SIGTERM (started so by its supervisor) keeps ignoring it while a run
    unwinds on it otherwise: terminate_unwinds installs no handler there."""
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with terminate_unwinds():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_error_missing_input(tmp_path, capsys, monkeypatch):
    """A missing input (segment) or input bag (bag) is one line, before the model loads."""
    monkeypatch.setattr(cli, "load_model_and_backend", lambda *a, **k: pytest.fail("loaded the model"))
    rc = _segment(tmp_path / "nope.mp4", tmp_path / "out")
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "input not found" in line and "nope.mp4" in line
    assert not (tmp_path / "out").exists()
    assert main(["bag", str(tmp_path / "nope"), str(tmp_path / "out"), "--topic", "/x"]) == 2
    assert error_line(capsys.readouterr().err) == f"mpvss: error: input bag not found: {tmp_path / 'nope'}"


def test_error_text_file_named_mp4(tmp_path, capsys):
    fake = tmp_path / "x.mp4"
    fake.write_text("this is not a video\n" * 20)
    rc = _segment(fake, tmp_path / "out")
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "cannot read video" in line and "x.mp4" in line


def test_error_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = _segment(tmp_path / "empty", tmp_path / "out")
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "no images" in line


@pytest.mark.parametrize("spec", ["fixed:0", "fixed:x", "adaptive:nan", "sometimes"])
def test_error_bad_schedule(tiny_folder, tmp_path, capsys, spec):
    rc = _segment(tiny_folder, tmp_path / "out", "--schedule", spec)
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "bad schedule" in line and spec in line
    assert not (tmp_path / "out").exists()  # validated before anything is written


@pytest.mark.parametrize("cut_threshold, keys", [("0.45", {0: "first", 30: "scene_cut"}), ("5", {0: "first"})])
def test_cut_threshold_reaches_the_scheduler(bikes_path, tmp_path, capsys, cut_threshold, keys):
    # The first 32 frames of bikes.mp4 hold one hard cut (frame 30); a scene threshold no drift
    # reaches leaves it to cut detection, which --cut-threshold 5 turns off.
    out = tmp_path / "out"
    rc = _segment(bikes_path, out, "--max-frames", "32", "--propagator", "copy", "--no-overlay",
                  "--schedule", "adaptive:50", "--max-interval", "100", "--cut-threshold", cut_threshold)
    assert rc == 0, capsys.readouterr().err
    records = _read_jsonl(out / "frames.jsonl")
    assert {r["frame"]: r["key_frame_reason"] for r in records if r["is_key_frame"]} == keys
    settings = json.loads((out / "summary.json").read_text())["schedule_settings"]
    assert (settings["scene_threshold"], settings["max_interval"], settings["cut_threshold"]) == (50, 100, float(cut_threshold))


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_error_bad_cut_threshold(tiny_folder, tmp_path, capsys, value):
    rc = _segment(tiny_folder, tmp_path / "out", "--schedule", "adaptive", "--cut-threshold", value)
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "--cut-threshold" in line
    assert not (tmp_path / "out").exists()


def test_error_bad_max_frames(tiny_folder, tmp_path, capsys):
    rc = _segment(tiny_folder, tmp_path / "out", "--max-frames", "0")
    assert rc == 2 and "--max-frames" in error_line(capsys.readouterr().err)


def test_error_bogus_propagator(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _segment(tiny_folder, tmp_path / "out", "--propagator", "bogus")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "'bogus'" in err and "query_flow" in err


def test_error_missing_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_error_missing_weights(tiny_folder, tmp_path, capsys):
    rc = _segment(tiny_folder, tmp_path / "out", "--weights", "missing.pt")
    line = error_line(capsys.readouterr().err)
    assert rc in (1, 2) and "missing.pt" in line and "not found" in line


def test_error_unknown_model(tiny_folder, tmp_path, capsys):
    rc = _segment(tiny_folder, tmp_path / "out", "--model", "no_such_model")
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "no_such_model" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the error needs a CPU-only torch")
def test_error_cuda_on_cpu_only_machine(tiny_folder, tmp_path, capsys):
    rc = _segment(tiny_folder, tmp_path / "out", "--device", "cuda")
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "CUDA" in line and "--device cpu" in line


def test_error_bad_device_name(tiny_folder, tmp_path, capsys):
    rc = _segment(tiny_folder, tmp_path / "out", "--device", "gpu0")
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "gpu0" in line


def test_error_bad_threads(tiny_folder, tmp_path, capsys):
    rc = _segment(tiny_folder, tmp_path / "out", "--threads", "-1")
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "--threads" in line


def test_threads_zero_leaves_torch_threads_as_they_are(tiny_folder, tmp_path, capsys):
    # 0 = unchanged, as the training options' help and the node's threads parameter say; it was refused
    before = torch.get_num_threads()
    assert _segment(tiny_folder, tmp_path / "out", "--threads", "0", "--propagator", "copy", "--no-overlay") == 0
    assert torch.get_num_threads() == before
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["frames"] == 1
    rc = _segment(tiny_folder, tmp_path / "out2", "--threads", "4097")
    assert rc == 2 and "--threads must be in [0, 4096]" in error_line(capsys.readouterr().err)


def test_train_threads_zero_reaches_the_trainer(tmp_path, capsys, monkeypatch):
    import mpvss_ros.training.trainer as trainer

    seen = []

    def fake_train(opts):
        seen.append(opts)
        return SimpleNamespace(step=0, finished=True, checkpoint=tmp_path / "c.pt", sec_per_step_median=None, val=[])

    monkeypatch.setattr(trainer, "train_segmentor", fake_train)
    before = torch.get_num_threads()
    assert main(["train", "segmentor", "--run-dir", str(tmp_path / "run"), "--threads", "0"]) == 0, \
        capsys.readouterr().err
    assert seen[0].threads == 0 and torch.get_num_threads() == before


def test_train_result_line_is_json_without_steps_run(tmp_path, capsys, monkeypatch):
    """--resume of a finished run runs no step: its median step time is NaN, printed as null
    (strict JSON), not NaN."""
    import mpvss_ros.training.trainer as trainer

    monkeypatch.setattr(trainer, "train_segmentor", lambda opts: SimpleNamespace(
        step=4, finished=True, checkpoint=tmp_path / "m.pt", sec_per_step_median=float("nan"), val=[]))
    assert main(["train", "segmentor", "--run-dir", str(tmp_path / "run")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}"))["sec_per_step_median"] is None


@pytest.mark.parametrize("argv", [["segment", "IN", "--out", ""], ["segment", "IN", "--out", " "],
                                  ["export", "--out", ""], ["train", "segmentor", "--run-dir", ""],
                                  ["cache", "--cache-dir", "", "--clear"]])
def test_error_empty_output_folder(tiny_folder, capsys, argv, monkeypatch, tmp_path):
    # an empty --out had written into the current folder and printed "wrote /labels/"; an empty
    # --cache-dir (an unset variable) had cleared the default cache
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPVSS_CACHE_DIR", str(tmp_path / "cache"))
    argv = [str(tiny_folder) if a == "IN" else a for a in argv]
    assert main(argv) == 2
    assert "must name a folder" in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


@pytest.mark.parametrize("argv", [["segment", "IN", "--propagator", "copy", "--out"],
                                  ["eval", "IN", "--self-reference", "--schedule", "fixed:1", "--out"],
                                  ["export", "--height", "32", "--width", "32", "--no-parity", "--out"]])
def test_error_out_is_a_file_or_cannot_be_made(tiny_folder, tmp_path, capsys, argv):
    """A file given as the output folder is a usage error (2); a folder that cannot be made is an
    unwritable output (1), one line naming it, whichever command writes it."""
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    argv = [str(tiny_folder) if a == "IN" else a for a in argv]
    assert main([*argv, str(blocker)]) == 2
    assert error_line(capsys.readouterr().err) == f"mpvss: error: --out {blocker} is a file, not a folder"
    assert main([*argv, str(blocker / "under")]) == 1  # a file where a parent folder should be
    line = error_line(capsys.readouterr().err)
    assert "cannot create the" in line and str(blocker / "under") in line and "taken is a file, not a folder" in line
    assert blocker.read_text() == "a file, not a folder"


def test_output_folders_refused_before_the_model_loads_and_tilde_expanded(tiny_folder, tmp_path, capsys,
                                                                          monkeypatch):
    """A bad --out is refused before the model loads (eval, export); a folder this process may
    not write to is refused like one it cannot make; --out=~/x means the home folder."""
    import os

    import mpvss_ros.paths as paths

    monkeypatch.setattr(cli, "load_model_and_backend", lambda args: pytest.fail("loaded the model"))
    monkeypatch.setattr(model_loader, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    for argv in (["eval", str(tiny_folder), "--self-reference", "--out"], ["export", "--out"]):
        assert main([*argv, str(blocker / "under")]) == 1
        assert "taken is a file, not a folder" in error_line(capsys.readouterr().err)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert main(["eval", str(tiny_folder), "--self-reference", "--out", str(locked)]) == 1
    assert f"cannot write to the --out {locked}: no permission" in error_line(capsys.readouterr().err)
    assert main(["eval", str(tiny_folder), "--self-reference", "--out", str(locked / "sub")]) == 1
    assert f"no permission to write in {locked}" in error_line(capsys.readouterr().err)
    # under a folder that may not be searched, Path.exists() raises PermissionError (Python 3.11; a
    # non-root user): one line naming --out instead of "[Errno 13] Permission denied: '<path>'"
    hidden = tmp_path / "hidden"
    real_stat = Path.stat

    def stat(self, **kwargs):
        if self.is_relative_to(hidden) and self != hidden:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    assert main(["eval", str(tiny_folder), "--self-reference", "--out", str(hidden / "out")]) == 1
    assert error_line(capsys.readouterr().err).endswith(f"cannot create the --out {hidden / 'out'}: no permission to "
                                                          "search a folder above it (Permission denied)")
    monkeypatch.setattr(Path, "stat", real_stat)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["eval", str(tiny_folder), "--self-reference", "--out", "~/taken"]) == 2
    assert f"--out {blocker} is a file, not a folder" in error_line(capsys.readouterr().err)


def _stop_before_the_model(monkeypatch) -> None:
    """mpvss eval stops where the model would load, with a usage error naming its images and labels."""
    def stop(args, **kwargs):
        raise ValueError(f"stopped before the model: images {args.images}, labels {args.labels}")

    monkeypatch.setattr(cli, "load_model_and_backend", stop)


def test_labels_folder_given_with_a_tilde_is_in_the_home_folder(tmp_path, capsys, monkeypatch):
    """--labels=~/x (which the shell leaves as it is) names a folder in the home folder; a
    missing label folder is refused before the model loads."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "labels").mkdir()
    _stop_before_the_model(monkeypatch)
    images = _noise_folder(tmp_path, 1)
    assert main(["eval", str(images), "--labels=~/labels"]) == 2
    assert error_line(capsys.readouterr().err) == (f"mpvss: error: stopped before the model: images {images}, "
                                                   f"labels {tmp_path / 'labels'}")
    assert main(["eval", str(images), "--labels", str(tmp_path / "missing")]) == 2
    assert error_line(capsys.readouterr().err) == f"mpvss: error: label folder not found: {tmp_path / 'missing'}"


def test_train_run_dir_that_cannot_be_made(tmp_path, capsys, monkeypatch):
    import mpvss_ros.training.trainer as trainer

    blocker = tmp_path / "taken"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"cannot create the --run-dir .*taken/run: .*taken is a file, not a folder"):
        trainer.make_output_dir(blocker / "run", "--run-dir")
    # the trainers refuse it up front (check_run_dir), not after setting up
    with pytest.raises(OSError, match=r"taken is a file, not a folder"):
        trainer.check_run_dir(blocker / "run", resume=False)
    # mkdir's own failure (here as under /proc) is an OSError of its own, not FileNotFoundError,
    # which the command line reports as a missing input (status 2 instead of 1)
    monkeypatch.setattr(Path, "mkdir", lambda self, **kw: (_ for _ in ()).throw(FileNotFoundError(2, "No such file")))
    with pytest.raises(OSError, match=r"cannot create the --run-dir .*: No such file") as info:
        trainer.make_output_dir(tmp_path / "new" / "run", "--run-dir")
    assert type(info.value) is OSError


# ------------------------------------------------------------------ output folder and overlay video


def test_segment_output_folder_is_never_mixed_nor_written_over_the_input(tmp_path, capsys):
    rng = np.random.default_rng(1)
    first = tmp_path / "first"
    _write_folder(first, {f"f{i}": rng.integers(0, 256, (21, 33, 3), dtype=np.uint8) for i in range(3)})
    out = tmp_path / "out"
    assert _segment(first, out, "--propagator", "copy") == 0
    cap = cv2.VideoCapture(str(out / "overlay.mp4"))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape[:2] == (22, 34)  # odd sizes padded for the codec, no pixel cropped
    assert json.loads((out / "summary.json").read_text())["overlay"] == str(out / "overlay.mp4")
    # a second run into the same folder replaces the first run's outputs
    second = tmp_path / "second"
    _write_folder(second, {"g0": rng.integers(0, 256, (21, 33, 3), dtype=np.uint8)})
    assert _segment(second, out, "--propagator", "copy", "--no-overlay") == 0
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["g0.png"]
    assert len(_read_jsonl(out / "frames.jsonl")) == 1 and not (out / "overlay.mp4").exists()
    capsys.readouterr()
    # PNGs that no run wrote are left alone
    foreign = tmp_path / "foreign"
    (foreign / "labels").mkdir(parents=True)
    (foreign / "labels" / "mine.png").write_bytes(b"x")
    assert _segment(second, foreign, "--propagator", "copy") == 2
    assert "no mpvss segment run wrote" in error_line(capsys.readouterr().err)
    assert (foreign / "labels" / "mine.png").read_bytes() == b"x"
    # the run would overwrite its input: refused before anything is written
    video = out / "overlay.mp4"
    assert _segment(first, out, "--propagator", "copy") == 0
    assert _segment(video, out, "--propagator", "copy") == 2
    assert "would write over the input" in error_line(capsys.readouterr().err)
    assert video.stat().st_size > 0
    assert _segment(out / "labels", out, "--propagator", "copy") == 2
    assert "would write over the input" in error_line(capsys.readouterr().err)
    # a label PNG of the folder, or a link to its overlay.mp4, as the input: refused too, and kept
    label = out / "labels" / "f0.png"
    label_bytes, video_size = label.read_bytes(), video.stat().st_size
    link = tmp_path / "video.mp4"
    link.symlink_to(video)
    for source in (label, link):
        assert _segment(source, out, "--propagator", "copy") == 2
        assert "would write over the input" in error_line(capsys.readouterr().err)
    assert label.read_bytes() == label_bytes and video.stat().st_size == video_size
    # a run's folder whose frames.jsonl was deleted still counts as a run's by its summary.json: replaced
    (out / "frames.jsonl").unlink()
    assert _segment(second, out, "--propagator", "copy", "--no-overlay") == 0
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["g0.png"]


def test_segment_leaves_an_overlay_mp4_no_run_wrote_alone(tmp_path, capsys):
    # a folder of one's videos as --out: its overlay.mp4 was deleted and written over without a word
    rng = np.random.default_rng(5)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(2)})
    out = tmp_path / "videos"
    out.mkdir()
    (out / "overlay.mp4").write_bytes(b"someone's video")
    for extra in ([], ["--no-overlay"]):
        assert _segment(tmp_path / "frames", out, *extra) == 2
        assert "overlay.mp4 exists and no mpvss segment run wrote it" in error_line(capsys.readouterr().err)
        assert (out / "overlay.mp4").read_bytes() == b"someone's video" and not (out / "labels").exists()


def test_a_run_stopped_while_clearing_the_folder_leaves_it_reusable(tmp_path, capsys, monkeypatch):
    # a stop (Ctrl-C, SIGTERM) between removing the earlier run's frames.jsonl and its overlay.mp4
    # left a folder that every later run refused as holding "an overlay.mp4 that no run wrote"
    rng = np.random.default_rng(6)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(2)})
    out = tmp_path / "out"
    assert _segment(tmp_path / "frames", out, "--propagator", "copy") == 0
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        real_unlink(self, missing_ok=missing_ok)
        if self.name in ("summary.json", "overlay.mp4"):  # the second removal of the three
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "unlink", unlink)
    assert _segment(tmp_path / "frames", out, "--propagator", "copy") == 130
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert _segment(tmp_path / "frames", out, "--propagator", "copy") == 0, capsys.readouterr().err


def test_max_frames_lists_no_file_past_the_last_frame(tmp_path):
    """The limit is checked before the next file is read: an unreadable file after the last frame
    was read and listed in skipped_unreadable though the run had stopped before it."""
    rng = np.random.default_rng(8)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(6)})
    (tmp_path / "frames" / "f3.png").write_bytes(b"")
    out = tmp_path / "out"
    assert _segment(tmp_path / "frames", out, "--propagator", "copy", "--max-frames", "3", "--no-overlay") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["frames"], summary["skipped_unreadable"]) == (3, [])
    assert sorted(p.stem for p in (out / "labels").iterdir()) == ["f0", "f1", "f2"]
    assert _segment(tmp_path / "frames", out, "--propagator", "copy", "--max-frames", "4", "--no-overlay") == 0
    summary = json.loads((out / "summary.json").read_text())  # f3 on the way to the fourth frame
    assert (summary["frames"], summary["skipped_unreadable"]) == (4, ["f3"])


def test_a_refused_input_leaves_the_earlier_run_in_place(bikes_path, tmp_path, capsys):
    """A bad --fps, a folder without images, a file that is no video or a video above the pixel
    limit is refused before the output folder is touched: the earlier run's outputs were deleted
    first (and a new folder was left with an empty labels/)."""
    rng = np.random.default_rng(7)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(2)})
    out = tmp_path / "out"
    assert _segment(tmp_path / "frames", out, "--propagator", "copy") == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(before) == 5  # frames.jsonl, summary.json, overlay.mp4, two labels
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.mp4").write_text("not a video\n" * 20)
    refusals = [(tmp_path / "frames", ["--fps", "-1"], "--fps: fps must be a positive finite number"),
                (tmp_path / "frames", ["--fps", "nan"], "--fps: fps must be a positive finite number"),
                (tmp_path / "empty", [], "no images"),
                (tmp_path / "fake.mp4", [], "cannot read video"),
                (bikes_path, ["--max-image-pixels", "1000"], "more than the 1000 allowed")]
    for source, extra, words in refusals:
        assert _segment(source, out, "--propagator", "copy", *extra) == 2
        assert words in error_line(capsys.readouterr().err)
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, words
        assert _segment(source, tmp_path / "new", "--propagator", "copy", *extra) == 2
        assert words in error_line(capsys.readouterr().err)
        assert not (tmp_path / "new").exists(), words


def test_segment_refuses_the_output_folder_before_loading_the_model(tmp_path, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(cli, "load_model_and_backend", lambda args: loads.append(args) or pytest.fail("loaded"))
    frames = tmp_path / "frames"
    _write_folder(frames, {"f0": np.zeros((8, 8, 3), np.uint8)})
    foreign = tmp_path / "foreign"
    (foreign / "labels").mkdir(parents=True)
    (foreign / "labels" / "mine.png").write_bytes(b"x")
    assert _segment(frames, foreign, "--propagator", "copy") == 2
    assert "no mpvss segment run wrote" in error_line(capsys.readouterr().err) and not loads


def test_export_folder_checked_and_run_without_the_model(tmp_path, capsys):
    """Deployment without the weights file: ``mpvss check-export`` passes the export, and
    ``--onnx-dir`` runs it with onnxruntime (classes and canvas from its contract)."""
    export = tmp_path / "export"
    assert main(["export", "--out", str(export), "--height", "64", "--width", "96", "--no-parity"]) == 0
    capsys.readouterr()
    assert main(["check-export", str(export)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["valid_hw"] == [64, 96]
    assert main(["check-export", str(export), "--threads", "0"]) == 0  # onnxruntime's choice
    assert json.loads(capsys.readouterr().out)["passed"]
    assert main(["check-export", str(export), "--threads", "-1"]) == 2
    assert "--threads must be in [0, 4096]" in error_line(capsys.readouterr().err)
    frames = tmp_path / "frames"
    rng = np.random.default_rng(3)
    _write_folder(frames, {f"f{i}": rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for i in range(4)})
    out = tmp_path / "out"
    assert _segment(frames, out, "--backend", "onnxruntime", "--onnx-dir", str(export), "--schedule", "fixed:2",
                    "--no-overlay") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 4 and summary["key_frames"] == 2
    assert summary["onnx_dir"] == str(export.resolve()) and summary["backend"]["backend"].startswith("onnxruntime")
    assert len(list((out / "labels").glob("*.png"))) == 4
    capsys.readouterr()
    assert _segment(frames, out, "--onnx-dir", str(export)) == 2  # torch runs model/weights, not graphs
    assert "--onnx-dir needs --backend onnxruntime or tensorrt" in error_line(capsys.readouterr().err)
    assert _segment(frames, out, "--backend", "onnxruntime", "--onnx-dir", str(export), "--model", "mpvss_lite") == 2
    assert "leave out --model/--weights" in error_line(capsys.readouterr().err)
    (export / "key_frame.onnx").unlink()
    assert main(["check-export", str(export)]) == 2
    assert "key_frame.onnx not found" in error_line(capsys.readouterr().err)


def test_check_export_runs_onnxruntime_on_one_thread_by_default(tmp_path, monkeypatch):
    """mpvss check-export: --threads defaults to 1; 0 is onnxruntime's choice (None)."""
    seen = []
    monkeypatch.setattr(runtime_export, "check_export", lambda folder, threads: seen.append(threads) or {"passed": True})
    assert main(["check-export", str(tmp_path)]) == 0
    assert main(["check-export", str(tmp_path), "--threads", "0"]) == 0
    assert seen == [1, None]


def _fake_engine_build(monkeypatch, lite, motion_trained=True) -> list:
    """mpvss build-engine without TensorRT or a GPU: TensorRT counts as installed, and load_model
    (a LoadedModel of ``lite``'s configuration whose model has ``motion_trained``), the graph source
    and build_engines are stand-ins; returns the list that gets ("load", args, kwargs),
    ("source", cache_dir) and ("build", args, kwargs) in call order."""
    calls = []
    monkeypatch.setattr(tensorrt_backend, "tensorrt_missing", lambda precision="fp32": None)
    monkeypatch.setattr(model_loader, "load_model", lambda *a, **k: calls.append(("load", a, k)) or SimpleNamespace(
        model=SimpleNamespace(motion_trained=motion_trained), config=lite.config, weights=None, trained=False))
    monkeypatch.setattr(GraphSource, "from_model", classmethod(
        lambda cls, model, cache_dir=None, **k: calls.append(("source", cache_dir)) or "SOURCE"))
    monkeypatch.setattr(tensorrt_backend, "build_engines",
                        lambda *a, **k: calls.append(("build", a, k)) or {"key_frame": "k.engine"})
    return calls


def test_build_engine_flags_reach_the_engine_build(lite, tmp_path, capsys, monkeypatch):
    """mpvss build-engine: the size (height first), --precision, the GPU index of --device,
    --workspace-mb, --no-keep-fp32 and --cache-dir reach build_engines and the graph source, and
    the weights load on the CPU with or without a motion module; without flags: the model's canvas,
    fp32, GPU 0, the default workspace, fp32 layers kept."""
    calls = _fake_engine_build(monkeypatch, lite)
    assert main(["build-engine", "--height", "64", "--width", "96", "--precision", "fp16", "--device", "cuda:1",
                 "--workspace-mb", "512", "--no-keep-fp32", "--cache-dir", str(tmp_path)]) == 0
    assert calls[0] == ("load", (None, None, "cpu"), {"motion_optional": True})
    assert calls[1] == ("source", str(tmp_path))
    assert calls[2] == ("build", ("SOURCE", (64, 96), "fp16", str(tmp_path), 1, 512), {"keep_fp32": False})
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"key_frame": "k.engine"}
    assert main(["build-engine"]) == 0
    h, w = lite.config.input.size  # 480 x 640: not square
    assert calls[-1] == ("build", ("SOURCE", (h, w), "fp32", None, 0, DEFAULT_WORKSPACE_MB), {"keep_fp32": True})


def test_build_engine_refuses_a_cpu_device_and_a_side_below_32(lite, capsys, monkeypatch):
    """A --device that is no GPU is refused before the model loads; a width below 32 before any build."""
    calls = _fake_engine_build(monkeypatch, lite)
    assert main(["build-engine", "--device", "cpu"]) == 2
    assert "build-engine needs a CUDA device, got 'cpu'" in capsys.readouterr().err
    assert calls == []
    assert main(["build-engine", "--height", "64", "--width", "31"]) == 2
    assert "--height/--width must be >= 32, got 64x31" in capsys.readouterr().err
    assert not [c for c in calls if c[0] == "build"]


def test_build_engine_says_when_the_weights_hold_no_trained_motion_module(lite, capsys, monkeypatch):
    _fake_engine_build(monkeypatch, lite, motion_trained=False)
    assert main(["build-engine", "--height", "64", "--width", "96"]) == 0
    assert f"mpvss: {NO_MOTION_EXPORT_NOTE}" in capsys.readouterr().err
    _fake_engine_build(monkeypatch, lite, motion_trained=True)
    assert main(["build-engine", "--height", "64", "--width", "96"]) == 0
    assert NO_MOTION_EXPORT_NOTE not in capsys.readouterr().err


def test_load_model_and_backend_hands_the_run_options_to_the_backend(tmp_path, monkeypatch):
    """load_model_and_backend (segment, eval, bag): the model loads on the CPU for a backend other
    than torch; the backend gets the device, precision, cache folder and threads and takes the model
    over; weights without a motion module load for optical flow and copy, not for query flow or a study."""
    loads, backends = [], []
    monkeypatch.setattr(runtime, "backend_missing", lambda backend, device, precision: None)
    monkeypatch.setattr(model_loader, "load_model", lambda *a, **k: loads.append((a, k)) or "LOADED")
    monkeypatch.setattr(runtime, "load_backend", lambda *a, **k: backends.append((a, k)) or "BACKEND")

    def run(**changes):
        args = dict(model=None, weights=None, device="cuda:1", backend="tensorrt", precision="fp16",
                    cache_dir=str(tmp_path), threads=3, onnx_dir=None, propagator="query_flow", study=False)
        return load_model_and_backend(argparse.Namespace(**{**args, **changes}))

    assert run() == ("LOADED", "BACKEND")
    assert loads[-1] == ((None, None, "cpu"), {"motion_optional": False})
    assert backends[-1] == (("tensorrt", "LOADED"), dict(device="cuda:1", precision="fp16", cache_dir=str(tmp_path),
                                                          threads=3, onnx_dir=None, copy_model=False))
    for propagator, study, optional in (("copy", False, True), ("optical_flow", False, True),
                                        ("optical_flow", True, False)):
        run(propagator=propagator, study=study)
        assert loads[-1][1] == {"motion_optional": optional}


def test_segment_goes_on_without_the_overlay_video_when_it_cannot_be_written(tiny_folder, tmp_path, capsys,
                                                                               monkeypatch):
    class Broken:
        def __init__(self, *args, **kwargs):
            raise OSError("cannot open video for writing (codec)")

    monkeypatch.setattr(offline, "VideoWriter", Broken)
    out = tmp_path / "out"
    assert _segment(tiny_folder, out, "--propagator", "copy") == 0
    stdout = capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["overlay"] is None
    assert "overlay.mp4" not in stdout and (out / "labels" / "f0.png").is_file()
    assert not (out / "overlay.mp4").exists()


def test_an_overlay_video_that_fails_midway_is_removed(tmp_path, monkeypatch, caplog):
    """A write error after frames were written (a full disk) removes the unfinished overlay.mp4,
    and the video does not count as written (summary's overlay None); later frames are not tried
    (one warning, not one per frame)."""
    video = _OverlayVideo(tmp_path / "overlay.mp4", 25.0)
    video.write(np.zeros((16, 24, 3), np.uint8))
    assert (tmp_path / "overlay.mp4").exists()

    def fail(image):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video.writer, "write", fail)
    with caplog.at_level("WARNING", logger="mpvss_ros.offline"):
        for _ in range(3):
            video.write(np.zeros((16, 24, 3), np.uint8))
    video.close()
    assert video.failed and not video.written and not (tmp_path / "overlay.mp4").exists()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"cannot write {tmp_path / 'overlay.mp4'}"]


def test_segment_at_a_frame_rate_below_one_keeps_the_schedule(tmp_path, capsys):
    # image-folder stamps are index / fps: at 0.5 fps they are 2 s apart, which is no time gap
    rng = np.random.default_rng(2)
    folder = tmp_path / "slow"
    _write_folder(folder, {f"s{i}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(4)})
    out = tmp_path / "out"
    assert _segment(folder, out, "--propagator", "copy", "--schedule", "fixed:3", "--fps", "0.5") == 0
    assert [r["is_key_frame"] for r in _read_jsonl(out / "frames.jsonl")] == [True, False, False, True]


@pytest.mark.parametrize("extra, words", [(["--max-interval", "-3"], "--max-interval"),
                                          (["--cut-threshold", "nan"], "--cut-threshold")])
def test_error_bad_adaptive_settings_even_with_a_fixed_schedule(tiny_folder, tmp_path, capsys, extra, words):
    rc = _segment(tiny_folder, tmp_path / "out", "--schedule", "fixed:3", *extra)
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and words in line
    assert not (tmp_path / "out").exists()


def test_a_runtime_error_keeps_the_lines_after_its_first(tmp_path, monkeypatch, capsys):
    """torch's load_state_dict names the keys on the lines after 'Error(s) in loading state_dict
    for ...:' (mpvss train motion --init-motion): the one-line error dropped them."""
    def fail(args):
        keys = ", ".join(f'"k{i}"' for i in range(1000))  # torch lists them all on one line
        raise RuntimeError(f"Error(s) in loading state_dict for MotionModule:\n\tMissing key(s) in state_dict: {keys}.")

    monkeypatch.setattr(cli, "_cmd_bag", fail)
    assert cli.main(["bag", str(tmp_path / "in"), str(tmp_path / "out"), "--topic", "/x"]) == 1
    err = capsys.readouterr().err
    assert "Missing key(s) in state_dict" in err and "Traceback" not in err
    assert '"k1",' in err and '"k999"' not in err and max(len(line) for line in err.splitlines()) < 450


def test_an_onnxruntime_error_is_one_error_and_other_exceptions_keep_their_traceback(tmp_path, monkeypatch, capsys):
    """onnxruntime's errors (pybind11 classes of onnxruntime.capi.onnxruntime_pybind11_state) are
    no RuntimeError: a failing session ended mpvss segment and eval in a traceback."""
    Fail = type("Fail", (Exception,), {"__module__": "onnxruntime.capi.onnxruntime_pybind11_state"})
    monkeypatch.setattr(cli, "_cmd_bag", lambda args: (_ for _ in ()).throw(Fail("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2")))
    assert cli.main(["bag", str(tmp_path / "in"), str(tmp_path / "out"), "--topic", "/x"]) == 1
    assert "mpvss: error: Fail: [ONNXRuntimeError] : 1 : FAIL : CUDA failure 2" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_cmd_bag", lambda args: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["bag", str(tmp_path / "in"), str(tmp_path / "out"), "--topic", "/x"])


@pytest.mark.parametrize("spec, words", [("fixed:2.5", "whole number of frames"), ("adaptive:abc", "must be a number")])
def test_error_bad_schedule_number_says_what_it_wants(tiny_folder, tmp_path, capsys, spec, words):
    """Not Python's 'invalid literal for int()' / 'could not convert string to float'."""
    rc = _segment(tiny_folder, tmp_path / "out", "--schedule", spec)
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and spec in line and words in line and "literal" not in line and "convert" not in line


def test_bad_adaptive_setting_with_a_fixed_schedule_names_the_flag_not_adaptive(tiny_folder, tmp_path, capsys):
    rc = _segment(tiny_folder, tmp_path / "out", "--cut-threshold", "-1")  # the default schedule is fixed:5
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "--cut-threshold" in line and "'adaptive'" not in line


@pytest.mark.parametrize("value", ["-5", "-1"])  # 0 is no limit; -1 is no other spelling of it
def test_segment_bad_max_image_pixels_is_refused_by_its_flag_before_the_model_loads(tiny_folder, tmp_path,
                                                                                    monkeypatch, capsys, value):
    def no_model(args):
        raise AssertionError("the model must not load for a usage error")

    monkeypatch.setattr(cli, "load_model_and_backend", no_model)
    rc = _segment(tiny_folder, tmp_path / "out", "--max-image-pixels", value)
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and f"--max-image-pixels must be >= 1 (pixels), or 0 for no limit, got {value}" in line
    assert line.endswith(f"got {value}")


@pytest.mark.parametrize("extra, flag", [(["--alpha", "3"], "--alpha"), (["--alpha", "nan"], "--alpha"),
                                         (["--max-image-pixels", "-5"], "--max-image-pixels"),
                                         (["--namespace", "/9x"], "invalid namespace '/9x'")])
def test_bag_bad_option_is_refused_by_its_flag_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, flag):
    def no_model(args):
        raise AssertionError("the model must not load for a usage error")

    monkeypatch.setattr(cli, "load_model_and_backend", no_model)
    (tmp_path / "in").mkdir()
    rc = cli.main(["bag", str(tmp_path / "in"), str(tmp_path / "out"), "--topic", "/x", *extra])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and flag in line and "None" not in line


def test_segment_keeps_no_record_per_frame_until_the_end(tmp_path, monkeypatch):
    """mpvss segment held every frame's record until the run ended, to summarise them (about 50
    MB more per hour of 30 fps video, offline.RunStats). The summary's figures are kept compactly
    instead and the summary is unchanged."""
    seen = count_live_records(monkeypatch)
    rng = np.random.default_rng(5)
    stems = [f"f{i}" for i in range(8)]
    _write_folder(tmp_path / "frames", {s: rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for s in stems})
    out = tmp_path / "out"
    assert _segment(tmp_path / "frames", out, "--propagator", "copy", "--schedule", "fixed:4", "--no-overlay") == 0
    assert len(seen) == 8 and max(seen) <= 1, f"records alive at each frame: {seen}"
    summary = json.loads((out / "summary.json").read_text())
    records = _read_jsonl(out / "frames.jsonl")
    assert summary["frames"] == 8 and summary["key_frames"] == 2 and summary["key_frame_reasons"] == {"first": 1, "interval": 1}
    for stage in ("total", "propagation", "segmentor"):
        vals = np.array([r["stage_latency_ms"][stage] for r in records if stage in r["stage_latency_ms"]])
        assert summary["stage_latency_ms"][stage] == {"median": float(np.median(vals)), "mean": float(vals.mean()),
                                                "p90": float(np.percentile(vals, 90)), "count": int(vals.size)}
    non_key = [r["stage_latency_ms"]["total"] for r in records if not r["is_key_frame"]]
    assert summary["median_total_ms_non_key_frame"] == float(np.median(non_key))


def test_run_stats_keep_counting_while_a_stage_array_is_held():
    """stage_values returned a view of the array it appends to: while the caller held it, the
    next add raised BufferError ("cannot resize an array that is exporting buffers")."""

    stats = RunStats(2)
    stats.add({"is_key_frame": True, "key_frame_reason": "first", "stage_latency_ms": {"total": 3.0}})
    held = stats.stage_values("total")
    stats.add({"is_key_frame": False, "key_frame_reason": "", "stage_latency_ms": {"total": 1.0}})
    assert held.tolist() == [3.0] and stats.stage_values("total").tolist() == [3.0, 1.0]


def test_run_stats_median_totals_are_split_by_key_and_non_key_frames():
    """The summary's median_total_ms_key_frame / _non_key_frame take the totals of their own frames
    only (key frames segment, the others propagate: tens of times apart), and are None (not NaN)
    when the run had no such frame (fixed:1 has no non-key frame)."""

    stats = RunStats(2)
    for key, total in ((True, 40.0), (False, 2.0), (False, 4.0), (True, 60.0), (False, 3.0), (True, 50.0)):
        stats.add({"is_key_frame": key, "key_frame_reason": "interval" if key else "", "stage_latency_ms": {"total": total}})
    stats.add({"is_key_frame": False, "key_frame_reason": "", "stage_latency_ms": {}})  # no total: in neither median
    summary = stats.summary()
    assert summary["median_total_ms_key_frame"] == 50.0 and summary["median_total_ms_non_key_frame"] == 3.0
    for key in (True, False):
        only = RunStats(2)
        only.add({"is_key_frame": key, "key_frame_reason": "first" if key else "", "stage_latency_ms": {"total": 7.0}})
        summary = only.summary()
        assert (summary["median_total_ms_key_frame"], summary["median_total_ms_non_key_frame"]) == \
            ((7.0, None) if key else (None, 7.0))


def test_run_stats_split_only_the_frames_with_a_total():
    # a record with stages but no total counts in its stages, and in neither median total

    stats = RunStats(2)
    stats.add({"is_key_frame": True, "key_frame_reason": "first", "stage_latency_ms": {"segmentor": 30.0}})
    stats.add({"is_key_frame": False, "key_frame_reason": "", "stage_latency_ms": {"propagation": 1.0, "total": 2.0}})
    stats.add({"is_key_frame": True, "key_frame_reason": "interval", "stage_latency_ms": {"total": 40.0}})
    summary = stats.summary()
    assert summary["median_total_ms_key_frame"] == 40.0 and summary["median_total_ms_non_key_frame"] == 2.0
    assert summary["stage_latency_ms"]["segmentor"]["count"] == 1 and summary["stage_latency_ms"]["total"]["count"] == 2


def test_bag_autoware_class_ids_are_parsed_as_integers():
    args = build_parser().parse_args(["bag", "in", "out", "--topic", "/t", "--autoware-mask",
                                      "--autoware-class-ids", "9", "7"])
    assert args.autoware_mask is True and args.autoware_class_ids == [9, 7]
    with pytest.raises(SystemExit):  # refused by the parser, before the model loads
        build_parser().parse_args(["bag", "in", "out", "--topic", "/t", "--autoware-mask",
                                   "--autoware-class-ids", "road"])


def test_bag_autoware_class_ids_out_of_range_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    (tmp_path / "in").mkdir()
    monkeypatch.setattr(cli, "load_model_and_backend", lambda args: pytest.fail("the model was loaded"))
    rc = main(["bag", str(tmp_path / "in"), str(tmp_path / "out"), "--topic", "/t", "--autoware-mask",
               "--autoware-class-ids", "9", "256"])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mpvss: error: autoware_class_ids (--autoware-class-ids) must be in 0..255, got [9, 256]")


def test_pipeline_help_states_the_engine_defaults(capsys):
    from mpvss_ros.offline import EngineOptions as d

    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for stated in (f"(default: {d.propagator})", f"(default: {d.optical_flow_preset};",
                   f"(default {d.optical_flow_scale:g})", f"(default: {d.schedule};", f"(default {d.max_interval};",
                   f"(default {d.cut_threshold}; above 4 = off"):
        assert stated in text, stated


@pytest.mark.parametrize("fps, hw, written_fps, written_size", [
    (120.023, (36, 64), 120.02, (64, 36)),  # 120023/1000: a time base the mp4v encoder refuses
    (66.6667, (36, 64), 66.67, (64, 36)),
    (23.976, (36, 64), 23.976, (64, 36)),  # opens as it is: kept
    (25.0, (16, 8192), 25.0, (8190, 16)),  # wider than the encoder opens: scaled down
])
def test_the_overlay_video_is_written_at_rates_and_sizes_the_encoder_refuses(tmp_path, fps, hw, written_fps,
                                                                               written_size):
    """Such a run lost its overlay.mp4 (a warning, nothing written): the rate is retried at 0.01 fps
    precision, frames wider or taller than 8190 pixels are scaled down."""

    video = _OverlayVideo(tmp_path / "overlay.mp4", fps)
    for i in range(3):
        video.write(np.full((*hw, 3), 40 * i, np.uint8))
    video.close()
    assert video.written and (video.fps, video.writer.size) == (written_fps, written_size)
    cap = cv2.VideoCapture(str(tmp_path / "overlay.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == written_size
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(written_fps, abs=1e-3)
    cap.release()


def test_an_output_folder_that_cannot_be_prepared_is_no_partial_output(tmp_path, monkeypatch, capsys, caplog):
    """A folder that passes the early check but cannot be made when the first frame comes (/proc/x
    on Linux) gives its one error line, not a warning that it holds a partial output."""

    def refuse(input_path, out):
        raise OSError(f"cannot create the output folder {out / 'labels'}: No such file or directory")

    monkeypatch.setattr(offline, "_open_run_log", refuse)
    assert _segment("sample:bikes", tmp_path / "out", "--max-frames", "2", "--propagator", "copy") == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"mpvss: error: cannot create the output folder {tmp_path / 'out' / 'labels'}: No such file or directory"]
    assert "partial output" not in caplog.text


def test_a_summary_that_cannot_be_written_is_not_left_half_written(tmp_path, capsys, monkeypatch):
    """A full disk while summary.json is written: one error line naming it, and no partial
    summary.json (which would read as a finished run's)."""
    rng = np.random.default_rng(0)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(2)})
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == "summary.json":
            real(self, data[:10], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "out"
    assert _segment(tmp_path / "frames", out, "--propagator", "copy", "--no-overlay") == 1
    line = error_line(capsys.readouterr().err)
    assert f"cannot write {out / 'summary.json'}: No space left on device (2 frames are in labels/" in line
    assert not (out / "summary.json").exists()


def test_backend_failures_not_in_a_row_never_stop_mpvss_segment(tmp_path, monkeypatch):
    """A frame segmented resets the count of failures in a row (segment_path calls
    failures.succeeded()): with the limit lowered to 2, a backend failing on every non-key
    frame fails twice in all but never twice in a row, and the run completes."""
    from mpvss_ros.propagation import CopyPropagator

    rng = np.random.default_rng(2)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for i in range(4)})
    monkeypatch.setattr(offline, "MAX_ENGINE_FAILURES_IN_A_ROW", 2)
    monkeypatch.setattr(CopyPropagator, "propagate", lambda self, key, image: (_ for _ in ()).throw(RuntimeError("no")))
    out = tmp_path / "out"
    assert _segment(out.parent / "frames", out, "--propagator", "copy", "--schedule", "fixed:10", "--no-overlay") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_engine"] == ["f1", "f3"] and summary["frames"] == 2


def test_summary_class_pixel_share_is_over_every_frame(tmp_path, monkeypatch):
    """class_pixel_share sums the labels of every frame segmented, lists only classes with
    pixels, and each share is that class's pixels over all pixels."""

    rng = np.random.default_rng(4)
    stems = [f"f{i}" for i in range(3)]
    _write_folder(tmp_path / "frames", {s: rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for s in stems})
    out = tmp_path / "out"
    assert _segment(tmp_path / "frames", out, "--propagator", "copy", "--schedule", "fixed:1", "--no-overlay") == 0
    summary = json.loads((out / "summary.json").read_text())
    labels = np.concatenate([read_label_png(out / "labels" / f"{s}.png").ravel() for s in stems])
    counts = np.bincount(labels, minlength=len(summary["class_names"]))
    expected = {str(c): round(float(n) / labels.size, 6) for c, n in enumerate(counts) if n > 0}
    assert summary["class_pixel_share"] == expected


def test_run_stats_key_frame_ratio_counts_frames_without_a_total():
    """key_frame_ratio is key frames over frames added, frames without a total timing included."""

    stats = RunStats(3)
    stats.add({"is_key_frame": True, "key_frame_reason": "first", "stage_latency_ms": {"total": 3.0}})
    stats.add({"is_key_frame": False, "key_frame_reason": "", "stage_latency_ms": {}}, np.array([[1, 1]], np.uint8))
    stats.add({"is_key_frame": False, "key_frame_reason": "", "stage_latency_ms": {}})
    stats.add({"is_key_frame": True, "key_frame_reason": "interval", "stage_latency_ms": {"segmentor": 2.0}},
              np.array([[1], [2], [255]], np.uint8))  # 255 (unlabelled) >= K: not counted
    summary = stats.summary()
    assert summary["frames"] == 4 and summary["key_frames"] == 2 and summary["key_frame_ratio"] == 0.5
    assert summary["class_pixel_share"] == {1: 0.75, 2: 0.25}
    assert RunStats(2).summary()["key_frame_ratio"] == 0.0


@pytest.mark.parametrize("fps, written", [(0.5, 1.0), (0.01, 1.0), (1000.0, 240.0), (25.0, 25.0)])
def test_the_overlay_video_rate_is_kept_within_1_to_240_fps(tmp_path, fps, written):
    """overlay.mp4 is written at 1-240 fps whatever the input's rate (the lower bound)."""

    assert OVERLAY_FPS_RANGE == (1.0, 240.0)
    video = _OverlayVideo(tmp_path / "overlay.mp4", fps)
    assert video.fps == written
    video.write(np.zeros((16, 16, 3), np.uint8))
    video.close()
    assert video.written and video.fps == written


def test_the_overlay_tag_says_key_frame_or_propagated(tmp_path, monkeypatch):
    """Each overlay frame's tag is frame_tag of its result (inverted key / propagated)."""

    tags, real = [], offline.overlay
    monkeypatch.setattr(offline, "overlay", lambda *a, **kw: (tags.append(kw["tag"]), real(*a, **kw))[1])
    rng = np.random.default_rng(6)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(5)})
    assert _segment(tmp_path / "frames", tmp_path / "out", "--propagator", "copy", "--schedule", "fixed:3") == 0
    assert tags == ["key frame", "propagated +1", "propagated +2", "key frame", "propagated +1"]


def test_summary_fps_leaves_out_the_backend_setup_time(tmp_path, monkeypatch):
    """summary fps = frames / (wall_time_s - setup_s) (README: its fps leaves out setup_s).
    The time of the first push is booked as setup (as a fixed-shape backend's export would be):
    no timing is asserted, only the identity between the summary's own figures."""
    import time

    from mpvss_ros.segmenter import VideoSegmenter

    real = VideoSegmenter.push

    def push(self, image, stamp, **kw):
        t = time.perf_counter()
        result = real(self, image, stamp, **kw)
        if self.setup_s == 0.0:
            self.setup_s = time.perf_counter() - t
        return result

    monkeypatch.setattr(VideoSegmenter, "push", push)
    rng = np.random.default_rng(7)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(3)})
    out = tmp_path / "out"
    assert _segment(tmp_path / "frames", out, "--propagator", "copy", "--no-overlay") == 0
    s = json.loads((out / "summary.json").read_text())
    assert 0 < s["setup_s"] < s["wall_time_s"]
    assert s["fps"] == pytest.approx(s["frames"] / (s["wall_time_s"] - s["setup_s"]), rel=1e-9)


# -- Flags, defaults and result lines

def test_optical_flow_scale_accepts_both_ends_of_its_range():
    """The help and the node parameter say 0.1 <= s <= 1: both ends parse."""
    parser = build_parser()
    for value in ("0.1", "1"):
        args = parser.parse_args(["segment", "IN", "--out", "o", "--optical-flow-scale", value])
        assert args.optical_flow_scale == float(value)


def test_eval_study_default_intervals_are_the_documented_ones():
    """--intervals defaults to 1 2 3 5 10 (help and README)."""
    assert build_parser().parse_args(["eval"]).intervals == [1, 2, 3, 5, 10]


def test_bag_defaults_namespace_and_detected_compression():
    """--namespace defaults to /mpvss; without --compressed the type is detected from the
    bag (None), not forced to raw Image (False)."""
    args = build_parser().parse_args(["bag", "IN", "OUT", "--topic", "/cam"])
    assert args.namespace == "/mpvss"
    assert args.compressed is None
    assert build_parser().parse_args(["bag", "IN", "OUT", "--topic", "/cam", "--compressed"]).compressed is True


def test_bench_defaults_and_flags_reach_the_bench_options(monkeypatch):
    """mpvss bench without flags: both models, three sizes, every backend that runs here, 3 repeats,
    1 warm-up run, 10 end-to-end frames (as its help says); --models, --backends and --warmup 0 are
    taken as given."""
    got = []
    monkeypatch.setattr(bench, "run_bench", lambda opts, progress=None: got.append(opts) or {"rows": []})
    monkeypatch.setattr(bench, "format_markdown", lambda result: "table")
    assert main(["bench"]) == 0
    assert got[0].models == ["mpvss_lite", "mpvss_r50"] and got[0].backends is None
    assert got[0].sizes == [(360, 480), (512, 1024), (1024, 2048)]
    assert (got[0].repeats, got[0].warmup, got[0].e2e_frames) == (3, 1, 10)
    assert main(["bench", "--models", "mpvss_r50", "--backends", "torch", "onnxruntime:cpu", "--warmup", "0"]) == 0
    assert got[1].models == ["mpvss_r50"] and got[1].warmup == 0
    assert got[1].backends == [bench.parse_backend_spec("torch"), bench.parse_backend_spec("onnxruntime:cpu")]


def test_cache_prune_budget_from_max_mb_the_environment_or_clear(tmp_path, monkeypatch, capsys):
    """mpvss cache --prune prunes to --max-mb MiB (a fraction kept), else to $MPVSS_CACHE_MAX_MB;
    --clear to 0 bytes."""
    budgets = []
    monkeypatch.setattr(runtime_cache, "prune_cache", lambda root, budget: budgets.append((str(root), budget)) or [])
    root = str(tmp_path / "c")
    assert main(["cache", "--cache-dir", root, "--prune", "--max-mb", "1.5"]) == 0
    monkeypatch.setenv("MPVSS_CACHE_MAX_MB", "3")
    assert main(["cache", "--cache-dir", root, "--prune"]) == 0
    assert main(["cache", "--cache-dir", root, "--clear"]) == 0
    assert budgets == [(root, 3 * 2**19), (root, 3 * 2**20), (root, 0)]
    assert "removed 0 entries, 0.0 MiB" in capsys.readouterr().out


def _fake_process_bag(monkeypatch, tmp_path, **changes) -> list:
    """mpvss bag without a model or a bag: process_bag makes the output folder and returns a
    summary of 10 messages (3 failed in the backend, 1 non-finite) with ``changes``; returns the
    list that gets the (BagOptions, keyword arguments) it is called with."""
    import mpvss_ros.ros.bag as bag

    summary = {"frames": 10, "written": 6, "skipped": 4, "skipped_by_reason": {"engine": 3, "non_finite": 1},
               "key_frames": 2, "key_frame_ratio": 0.2, "median_total_ms": 1.0, "fps": 5.0, "trained": False,
               "storage": "sqlite3", "messages_per_topic": {"/cam": 10}, **changes}
    seen = []

    def process_bag(input_path, output, topic, loaded, options, **kwargs):
        seen.append((options, kwargs))
        Path(output).mkdir()
        return dict(summary, output=str(output), topic=topic)

    monkeypatch.setattr(cli, "load_model_and_backend", lambda args: (None, None))
    monkeypatch.setattr(bag, "process_bag", process_bag)
    (tmp_path / "in").mkdir(exist_ok=True)
    return seen


def test_bag_flags_reach_the_bag_options_and_process_bag(tmp_path, capsys, monkeypatch):
    """Each output flag of mpvss bag becomes the BagOptions field or process_bag argument it
    names, and without them the defaults (the 4096 x 4096 pixel limit, every output but the
    Autoware mask, storage and compression as the input's); the result line keeps
    skipped_by_reason, and backend failures on more than a tenth of the messages are warned of."""
    from mpvss_ros.ros.bag import BagOptions

    seen = _fake_process_bag(monkeypatch, tmp_path)
    assert main(["bag", str(tmp_path / "in"), str(tmp_path / "o1"), "--topic", "/cam", "--no-progress"]) == 0
    opts, kwargs = seen[-1]
    assert opts.max_image_pixels == BagOptions.max_image_pixels == 4096 * 4096
    assert (opts.alpha, opts.colored, opts.overlay, opts.class_masks, opts.autoware_mask) == (0.5, True, True, True, False)
    assert kwargs["compressed"] is None and kwargs["storage"] is None and kwargs["namespace"] == "/mpvss"
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[0])["skipped_by_reason"] == {"engine": 3, "non_finite": 1}
    assert "mpvss: warning: the inference backend failed on 3 of 10 messages" in captured.err
    assert main(["bag", str(tmp_path / "in"), str(tmp_path / "o2"), "--topic", "/cam", "--alpha", "0.25", "--no-colored",
                 "--no-overlay", "--no-class-masks", "--autoware-mask", "--autoware-class-ids", "1", "2",
                 "--copy-topics", "/tf", "/odom", "--copy-all-topics", "--compressed", "--storage", "mcap",
                 "--namespace", "/seg", "--max-image-pixels", "0"]) == 0
    opts, kwargs = seen[-1]
    assert (opts.alpha, opts.colored, opts.overlay, opts.class_masks, opts.autoware_mask) == (0.25, False, False, False, True)
    assert opts.autoware_class_ids == (1, 2) and opts.copy_topics == ("/tf", "/odom") and opts.copy_all_topics is True
    assert opts.max_image_pixels is None
    assert kwargs["compressed"] is True and kwargs["storage"] == "mcap" and kwargs["namespace"] == "/seg"


def test_study_comparison_line_prints_the_interval_low_to_high_and_a_before_b():
    """A study comparison line: the bootstrap interval as [low, high] and A's share of better
    resamples before B's."""
    c = {"a": "fixed 1/5 copy", "b": "per-frame", "delta": -1.0, "key_frames": [6, 30], "kept": 2000,
         "block": 10, "level": 0.95, "ci": [-1.5, -0.5], "share_a_better": 0.1, "share_b_better": 0.9}
    assert "95 % interval [ -1.50,  -0.50], better in  10 % (A) /  90 % (B) of 2000 resamples" in \
        cli.comparison_line(c, 30)


def _fake_segmentor(monkeypatch, tmp_path, val):
    import mpvss_ros.training.trainer as trainer

    seen = []

    def fake_train(opts):
        seen.append(opts)
        return SimpleNamespace(step=3, finished=True, checkpoint=tmp_path / "c.pt", sec_per_step_median=0.5, val=val)

    monkeypatch.setattr(trainer, "train_segmentor", fake_train)
    return seen


def test_train_result_line_reports_the_last_validation(tmp_path, capsys, monkeypatch):
    """The result line's val is the latest validation, not the first, and sec_per_step_median the
    run's median step time."""
    _fake_segmentor(monkeypatch, tmp_path, [{"step": 1, "mIoU": 10.0}, {"step": 3, "mIoU": 30.0}])
    assert main(["train", "segmentor", "--run-dir", str(tmp_path / "run")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["val"] == {"step": 3, "mIoU": 30.0}
    assert line["sec_per_step_median"] == 0.5


def test_train_motion_takes_decimal_rates_and_defaults_to_the_trainers_crop_and_device(tmp_path, monkeypatch):
    """mpvss train motion: --lr takes a decimal; --crop and --device default to
    MotionTrainOptions' own (a crop is height, width)."""
    import mpvss_ros.training.motion_trainer as mt

    seen = []
    monkeypatch.setattr(mt, "train_motion", lambda opts: seen.append(opts) or mt.MotionTrainResult(
        Path(opts.run_dir), 0, False, Path(opts.run_dir) / "x.pt"))
    assert main(["train", "motion", "--run-dir", str(tmp_path), "--init-checkpoint", "c.pt", "--lr", "2.5e-4"]) == 0
    d = mt.MotionTrainOptions(run_dir="", init_checkpoint="")
    assert seen[0].lr == 2.5e-4 and seen[0].crop == d.crop and seen[0].device == d.device


def test_threads_upper_bound_4096_is_accepted(tmp_path, capsys, monkeypatch):
    """--threads in [0, 4096]: 4096 itself is accepted (and set), 4097 refused."""
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    seen = _fake_segmentor(monkeypatch, tmp_path, [])
    assert main(["train", "segmentor", "--run-dir", str(tmp_path / "run"), "--threads", "4096"]) == 0, \
        capsys.readouterr().err
    assert set_to == [4096] and seen[0].threads == 4096
    assert main(["train", "segmentor", "--run-dir", str(tmp_path / "run2"), "--threads", "4097"]) == 2


def test_a_long_runtime_error_prints_twenty_lines_and_counts_the_rest(tmp_path, monkeypatch, capsys):
    """At most 20 lines of a RuntimeError's message, then how many more there were."""
    def fail(args):
        raise RuntimeError("\n".join(f"line {i}" for i in range(25)))

    monkeypatch.setattr(cli, "_cmd_bag", fail)
    assert main(["bag", str(tmp_path / "in"), str(tmp_path / "out"), "--topic", "/x"]) == 1
    err = capsys.readouterr().err
    assert "line 19" in err and "line 20" not in err and "(5 more lines)" in err


def test_eval_at_a_frame_rate_below_one_keeps_the_fixed_schedule(tmp_path, capsys):
    """mpvss eval stamps frames index / fps: at 0.5 fps they are 2 s apart, which must not be
    read as a time gap that makes every frame a key frame (max_gap_s infinite)."""
    folder = tmp_path / "frames"
    base = cv2.resize(np.random.default_rng(3).integers(0, 256, (12, 16, 3), dtype=np.uint8), (64, 48))
    _write_folder(folder, {f"f{i}": np.roll(base, 2 * i, axis=1) for i in range(4)})
    out = tmp_path / "out"
    assert main(["eval", str(folder), "--self-reference", "--schedule", "fixed:3", "--propagator", "copy",
                 "--fps", "0.5", "--threads", "1", "--out", str(out)]) == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    assert result["frames"] == 4 and result["key_frames"] == 2


def _noise_folder(tmp_path, n=3):
    """A folder of ``n`` seeded 48 x 64 noise images."""
    rng = np.random.default_rng(5)
    _write_folder(tmp_path / "frames", {f"f{i}": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(n)})
    return tmp_path / "frames"


def test_eval_adaptive_schedule_runs_with_the_given_cut_threshold_and_max_interval(tmp_path, capsys):
    """mpvss eval builds its scheduler from the pipeline options: --cut-threshold (and
    --max-interval) reach the adaptive scheduler that runs (eval.json schedule_settings)."""
    folder = _noise_folder(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", str(folder), "--self-reference", "--schedule", "adaptive:0.7", "--propagator", "copy",
                 "--cut-threshold", "3", "--max-interval", "7", "--threads", "1", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    settings = json.loads((out / "eval.json").read_text())["schedule_settings"]
    assert (settings["scene_threshold"], settings["cut_threshold"], settings["max_interval"]) == (0.7, 3.0, 7)


def test_eval_sample_name_stands_for_the_sample_clip(tmp_path, capsys, monkeypatch):
    """mpvss eval sample:bikes --self-reference reads the sample clip's file, not a path named
    "sample:bikes" (which would be "input not found")."""
    monkeypatch.setitem(cli.SAMPLES, "sample:bikes", lambda: _noise_folder(tmp_path, 1))
    _stop_before_the_model(monkeypatch)
    assert main(["eval", "sample:bikes", "--self-reference"]) == 2
    assert error_line(capsys.readouterr().err) == (f"mpvss: error: stopped before the model: images "
                                                   f"{tmp_path / 'frames'}, labels None")


def test_eval_without_the_default_labels_says_to_give_images_and_labels(tmp_path, capsys, monkeypatch):
    """No IMAGES and no CamVid val labels in the shared data: one line naming IMAGES and
    --labels, before the model loads."""
    import mpvss_ros.io.samples as samples

    monkeypatch.setattr(samples, "camvid_dir", lambda split: tmp_path)
    monkeypatch.setattr(samples, "camvid_annot_dir", lambda split: None)
    monkeypatch.setattr(cli, "load_model_and_backend", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["eval"]) == 2
    assert "give IMAGES and --labels" in error_line(capsys.readouterr().err)


def test_eval_self_reference_takes_max_frames_and_fps(tmp_path, capsys, monkeypatch):
    """--max-frames and --fps reach the self-labelled sequence."""
    import mpvss_ros.evaluation.study as study

    seen = {}
    monkeypatch.setattr(cli, "load_model_and_backend", lambda args, **k: (None, None))
    monkeypatch.setattr(study, "self_labelled_sequence",
                        lambda loaded, images, **k: seen.update(k) or (_ for _ in ()).throw(ValueError("stop")))
    assert main(["eval", str(_noise_folder(tmp_path)), "--self-reference", "--max-frames", "2", "--fps", "3"]) == 2
    assert seen["limit"] == 2 and seen["fps"] == 3.0


def test_eval_with_labels_takes_max_frames_fps_and_names_reduce_zero_label(tmp_path, capsys, monkeypatch):
    """With --labels, --max-frames, --fps and --reduce-zero-label reach the labelled sequence, and
    study.json's reference says the labels were read with reduce_zero_label."""
    import mpvss_ros.evaluation.study as study

    seen = {}
    labels = tmp_path / "labels"
    labels.mkdir()
    loaded = SimpleNamespace(config=SimpleNamespace(num_classes=11))
    monkeypatch.setattr(cli, "load_model_and_backend", lambda args, **k: (loaded, None))
    monkeypatch.setattr(study, "load_sequence", lambda images, labels, **k: seen.update(k) or "sequence")
    monkeypatch.setattr(study, "key_interval_study", lambda loaded, seq, **k: {"rows": [], "comparisons": [],
                                                                               "frames": 2})
    monkeypatch.setattr(study, "plot_study", lambda result, path: Path(path).write_text("plot"))
    out = tmp_path / "out"
    assert main(["eval", str(_noise_folder(tmp_path)), "--labels", str(labels), "--max-frames", "2", "--fps", "3",
                 "--reduce-zero-label", "--study", "--out", str(out)]) == 0, capsys.readouterr().err
    assert (seen["limit"], seen["fps"], seen["reduce_zero_label"], seen["num_classes"]) == (2, 3.0, True, 11)
    assert json.loads((out / "study.json").read_text())["reference"] == (
        f"{labels} (reduce_zero_label: 0 ignored, 1..K as 0..K-1)")


def test_eval_refuses_a_bad_schedule_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A malformed --schedule is a usage error named by its flag before any model loads."""
    monkeypatch.setattr(cli, "load_model_and_backend", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["eval", str(_noise_folder(tmp_path, 1)), "--self-reference", "--schedule", "fixed:0"]) == 2
    assert error_line(capsys.readouterr().err).startswith("mpvss: error: bad schedule 'fixed:0': key-frame interval")


def test_eval_study_options_reach_the_study_and_its_files(tmp_path, capsys, monkeypatch):
    """mpvss eval --study: --intervals, --cut-threshold and --bootstrap-block reach the study;
    study.json names the reference it scored against, and study.png is drawn."""
    import mpvss_ros.evaluation.study as study

    seen = {}

    def key_interval_study(loaded, seq, **kwargs):
        seen.update(kwargs)
        return {"rows": [], "comparisons": [], "frames": 3}

    monkeypatch.setattr(cli, "load_model_and_backend", lambda args, **k: (None, None))
    monkeypatch.setattr(study, "self_labelled_sequence", lambda *a, **k: "sequence")
    monkeypatch.setattr(study, "key_interval_study", key_interval_study)
    monkeypatch.setattr(study, "plot_study", lambda result, path: Path(path).write_text("plot"))
    out = tmp_path / "out"
    assert main(["eval", str(_noise_folder(tmp_path)), "--self-reference", "--study", "--intervals", "2", "4",
                 "--cut-threshold", "2.5", "--bootstrap-block", "7", "--out", str(out)]) == 0, capsys.readouterr().err
    assert (seen["intervals"], seen["cut_threshold"], seen["bootstrap_block"]) == ([2, 4], 2.5, 7)
    assert json.loads((out / "study.json").read_text())["reference"] == "per-frame labels of the model"
    assert (out / "study.png").read_text() == "plot"


def test_max_interval_zero_is_refused_by_its_flag_with_a_fixed_schedule(tmp_path, capsys, monkeypatch):
    """--max-interval must be >= 1, also when the (fixed) schedule does not use it, named by
    its flag, before the model loads."""
    monkeypatch.setattr(cli, "load_model_and_backend", lambda *a, **k: pytest.fail("loaded the model"))
    folder = _noise_folder(tmp_path, 1)
    for argv in (["segment", str(folder), "--out", str(tmp_path / "o")],
                 ["eval", str(folder), "--self-reference", "--out", str(tmp_path / "o")]):
        assert main([*argv, "--schedule", "fixed:2", "--max-interval", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == "mpvss: error: --max-interval must be >= 1 (frames), got 0"
        assert not (tmp_path / "o").exists()


def _fake_segment_run(monkeypatch, **changes) -> list[SegmentOptions]:
    """mpvss segment without a model: segment_path returns a summary of 5 frames with
    ``changes``; returns the list that gets the SegmentOptions it is called with."""
    summary = {"frames": 5, "key_frames": 1, "key_frame_ratio": 0.2, "fps": 10.0, "trained": False,
               "median_total_ms_key_frame": 1.0, "median_total_ms_non_key_frame": 0.5,
               "skipped_non_finite": [], "skipped_engine": [], "skipped_unreadable": [], "missing_at_end": 0,
               "skipped_too_large": [], "overlay": None, **changes}
    seen = []
    monkeypatch.setattr(cli, "load_model_and_backend", lambda args: (None, None))
    monkeypatch.setattr(offline, "segment_path", lambda path, out, loaded, options, **k: seen.append(options) or summary)
    return seen


def test_segment_result_line_counts_frames_missing_at_the_end_as_unreadable(tmp_path, capsys, monkeypatch):
    """The result line's "unreadable" is the files skipped while reading plus the frames a
    video announced but never delivered (missing_at_end), as summary.json lists them."""
    _fake_segment_run(monkeypatch, skipped_unreadable=["f3"], missing_at_end=2)
    folder = _noise_folder(tmp_path, 1)
    assert main(["segment", str(folder), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    brief = json.loads(capsys.readouterr().out.splitlines()[0])
    assert brief["unreadable"] == 3 and brief["skipped"] == 0 and brief["frames"] == 5


def test_segment_result_line_reports_the_summary_and_the_default_pixel_limit(tmp_path, capsys, monkeypatch):
    """Without --max-image-pixels segment_path gets the 4096 x 4096 default; the result line
    carries trained, the key / non-key frame medians apart and the frames above the limit; a
    backend that failed on more than a tenth of the frames handled is one warning line."""
    seen = _fake_segment_run(monkeypatch, trained=True, median_total_ms_key_frame=10.0,
                             median_total_ms_non_key_frame=2.0, skipped_engine=["a", "b", "c"],
                             skipped_too_large=["x", "y"])
    assert main(["segment", str(_noise_folder(tmp_path, 1)), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert seen[0].max_image_pixels == SegmentOptions.max_image_pixels == 4096 * 4096
    brief = json.loads(captured.out.splitlines()[0])
    assert brief["trained"] is True and brief["median_total_ms"] == {"key": 10.0, "non_key": 2.0}
    assert brief["too_large"] == 2 and brief["skipped"] == 3
    assert "mpvss: warning: the inference backend failed on 3 of 8 frames" in captured.err
