"""``mpvss eval`` (one setting and the key-interval study) and mpvss_ros.evaluation.study on CamVid val.

Needs the shared data folder (CamVid val); skips otherwise. The model is a small checkpoint made
here (seeded lite model, ImageNet backbone when available): the scores are not meaningful, the
bookkeeping is what is tested.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import mpvss_ros.cli as cli
import mpvss_ros.evaluation.study as study
from helpers import error_line

from mpvss_ros.cli import main
from mpvss_ros.evaluation.study import (
    LabelledSequence,
    _cost_ratio_within_run,
    _count_key_frames,
    evaluate_sequence,
    key_interval_study,
    load_sequence,
    match_scene_threshold,
    plot_study,
    row_label,
    write_json,
)
from mpvss_ros.io.video import write_label_png
from mpvss_ros.model_loader import LoadedModel, load_model
from mpvss_ros.propagation import FLOW_PROPAGATORS

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_single_thread):
    cv2.setNumThreads(1)
    yield


@pytest.fixture(scope="module")
def loaded(lite_checkpoint):
    return load_model(weights=lite_checkpoint)


@pytest.fixture()
def band(lite, make_band_model):
    """The 5-class band model (conftest) as a loaded model: no shared data needed."""
    cfg = dataclasses.replace(lite.config, name="band5", num_classes=5, class_names=list("abcde"), palette=[])
    return LoadedModel(model=make_band_model(5), config=cfg, weights=None, trained=False, device=torch.device("cpu"))


def _still(frames: int) -> LabelledSequence:
    """A still clip of dark 36 x 48 frames, labelled class 0 everywhere (what the band model predicts)."""
    images = [np.full((36, 48, 3), 20, np.uint8) for _ in range(frames)]
    return LabelledSequence([str(i) for i in range(frames)], images, [np.zeros((36, 48), np.uint8)] * frames, 15.0)


def _on_close(monkeypatch, take) -> list:
    """``take(fig)`` of every matplotlib figure closed from now on (plot_study closes what it draws)."""
    import matplotlib.pyplot as plt

    seen = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (seen.append(take(fig)), real_close(fig)))
    return seen


def _eval(*args: str) -> int:
    before = torch.get_num_threads()
    try:
        return main(["eval", *args, "--threads", "1"])
    finally:
        torch.set_num_threads(before)


def _pct_or_none(v) -> bool:
    return v is None or (isinstance(v, float) and 0.0 <= v <= 100.0)


# --------------------------------------------------------------------------- one setting

def test_eval_cli_writes_eval_json(camvid_val_dirs, lite_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = _eval("--weights", str(lite_checkpoint), "--max-frames", "6", "--schedule", "fixed:2",
               "--propagator", "copy", "--out", str(out))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    r = json.loads((out / "eval.json").read_text())
    for k in ("mIoU", "fwIoU", "pACC", "mACC", "VC_8", "VC_16"):
        assert k in r and _pct_or_none(r[k]), (k, r.get(k))
    assert isinstance(r["mIoU"], float) and isinstance(r["fwIoU"], float)
    assert r["VC_8"] is None and r["VC_16"] is None  # VC_n needs n + 1 frames (VSPW windows); 6 < 9
    assert list(r["IoU"]) == CAMVID_CLASSES
    assert all(_pct_or_none(v) for v in r["IoU"].values())
    assert r["frames"] == 6 and r["key_frames"] == 3 and r["key_frame_ratio"] == pytest.approx(0.5)
    assert r["propagator"] == "copy" and r["trained"] is True
    assert Path(r["weights"]) == lite_checkpoint and r["model"] == "mpvss_lite"
    assert r["mean_ms_per_frame"] > 0
    assert r["median_ms_key_frame"] > 0 and r["median_ms_non_key_frame"] > 0
    assert r["cost_ratio_within_run"] == pytest.approx(
        (3 * r["median_ms_key_frame"] + 3 * r["median_ms_non_key_frame"]) / (6 * r["median_ms_key_frame"]))
    # the summary line on stdout is the same result without the per-class IoU
    line = next(ln for ln in captured.out.splitlines() if ln.startswith("{"))
    brief = json.loads(line)
    assert "IoU" not in brief and brief["mIoU"] == r["mIoU"] and brief["key_frames"] == 3


def test_eval_cli_explicit_folders_match_default(camvid_val_dirs, lite_checkpoint, tmp_path, capsys):
    img, ann = camvid_val_dirs
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    common = ["--weights", str(lite_checkpoint), "--max-frames", "9", "--schedule", "fixed:3", "--propagator", "copy"]
    assert _eval(*common, "--out", str(out_a)) == 0
    assert _eval(str(img), "--labels", str(ann), *common, "--out", str(out_b)) == 0
    a = json.loads((out_a / "eval.json").read_text())
    b = json.loads((out_b / "eval.json").read_text())
    for k in ("mIoU", "fwIoU", "IoU", "VC_8", "VC_16", "key_frames", "frames"):
        assert a[k] == b[k], k
    assert a["frames"] == 9 and a["key_frames"] == 3
    assert isinstance(a["VC_8"], float) and 0.0 <= a["VC_8"] <= 100.0  # 9 frames: one VC_8 window
    assert a["VC_16"] is None


# --------------------------------------------------------------------------- the study

def test_eval_cli_study(camvid_val_dirs, lite_checkpoint, tmp_path, capsys):
    out = tmp_path / "study"
    rc = _eval("--weights", str(lite_checkpoint), "--study", "--intervals", "1", "2", "--max-frames", "6",
               "--cut-threshold", "0.3", "--out", str(out))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads((out / "study.json").read_text())
    assert result["frames"] == 6 and result["fps"] == 15.0 and result["model"] == "mpvss_lite"
    rows = result["rows"]
    # copy once; each flow propagator with the paper's direct flow and with chained flow
    settings = [("copy", None)] + [(p, c) for p in FLOW_PROPAGATORS for c in (False, True)]
    fixed = {(r["interval"], r["propagator"], r["chain_flow"]): r for r in rows if r["mode"] == "fixed"}
    adaptive = {(r["interval"], r["propagator"], r["chain_flow"]): r for r in rows if r["mode"] == "adaptive"}
    assert set(fixed) == {(n, p, c) for n in (1, 2) for p, c in settings}
    assert set(adaptive) == {(2, p, c) for p, c in settings}
    assert len(rows) == 15
    for r in rows:
        assert r["frames"] == 6 and _pct_or_none(r["mIoU"]) and list(r["IoU"]) == CAMVID_CLASSES
    for p, c in settings:
        assert fixed[(1, p, c)]["key_frames"] == 6
        assert fixed[(1, p, c)]["mIoU"] == fixed[(1, "copy", None)]["mIoU"]  # per-frame: no propagation at all
        assert fixed[(2, p, c)]["key_frames"] == 3
        if c is not None:  # the propagator that ran had the row's flow mode
            assert fixed[(2, p, c)]["propagator_settings"]["chain_flow"] is c
        a = adaptive[(2, p, c)]
        assert abs(a["key_frames"] - fixed[(2, p, c)]["key_frames"]) <= 1
        assert a["target_key_frames"] == 3 and a["scene_threshold"] > 0
        assert a["propagator"] == p and row_label(a) == (p if c is None else f"{p} ({'chained' if c else 'direct'})")
        # the scheduler that ran: matched threshold, max interval 2N, the --cut-threshold given
        assert a["schedule_settings"] == {"schedule": a["schedule"], "scene_threshold": a["scene_threshold"], "min_interval": 1,
                                          "max_interval": 4, "cut_threshold": 0.3, "max_gap_s": None}
        assert fixed[(2, p, c)]["schedule_settings"]["interval"] == 2
        # cost against per-frame: two runs' means, and one run's own medians
        for r in (fixed[(2, p, c)], a, fixed[(1, p, c)]):
            assert r["cost_ratio"] == pytest.approx(r["mean_ms_per_frame"] / fixed[(1, "copy", None)]["mean_ms_per_frame"])
        assert fixed[(1, p, c)]["cost_ratio_within_run"] == 1.0
    # one threshold for every propagator, so the same key frames
    assert len({a["scene_threshold"] for a in adaptive.values()}) == 1
    assert len({a["key_frames"] for a in adaptive.values()}) == 1
    # a printed line per row, naming the flow mode
    lines = [ln for ln in captured.out.splitlines() if "key ratio" in ln]
    assert len(lines) == 15 and sum("query_flow (chained)" in ln for ln in lines) == 3
    assert all("cost ratio" in ln and "(within run " in ln for ln in lines)

    # the paired bootstrap of the comparisons the verdicts rest on: query flow (each flow mode)
    # against per-frame, copy, direct optical flow and optical flow of its own mode; every adaptive
    # row against its fixed row. 6 frames are fewer than two blocks of 10: no interval
    comparisons = {(c["a"], c["b"]): c for c in result["comparisons"]}
    of = {m: f"fixed 1/2 optical_flow ({m})" for m in ("direct", "chained")}
    expected = {(f"fixed 1/2 query_flow ({m})", b) for m in ("direct", "chained")
                for b in ("per-frame", "fixed 1/2 copy", of["direct"], of[m])}
    expected |= {(f"adaptive 1/2 {row_label(r)}", f"fixed 1/2 {row_label(r)}") for r in adaptive.values()}
    assert set(comparisons) == expected and len(result["comparisons"]) == 12
    by_label = {("per-frame" if r["interval"] == 1 else f"{r['mode']} 1/{r['interval']} {row_label(r)}"): r
                for r in rows}
    for (a, b), c in comparisons.items():
        assert c["interval"] == 2 and c["block"] == 10 and c["blocks"] == 1 and c["kept"] == 0
        assert c["delta"] == pytest.approx(by_label[a]["mIoU"] - by_label[b]["mIoU"], abs=2e-4)  # rows: 4 decimals
        assert c["ci"] == [None, None] and c["share_a_better"] is None  # NaN in the JSON
        assert c["key_frames"] == [by_label[a]["key_frames"], by_label[b]["key_frames"]]
    printed = [ln for ln in captured.out.splitlines() if " mIoU, " in ln and " - " in ln]
    assert len(printed) == 12 and all("no interval: 6 frames are fewer than two blocks of 10" in ln for ln in printed)
    unmatched = [c for c in result["comparisons"]
                 if c["key_frames"][0] != c["key_frames"][1] and c["b"] != "per-frame"]  # fewer is per-frame's point
    assert sum("not at the same key-frame count" in ln for ln in printed) == len(unmatched)
    assert not any("not at the same key-frame count" in ln for ln in printed if "per-frame" in ln)

    png = out / "study.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100


def test_study_comparisons_get_intervals_from_blocks_of_the_clip(camvid_val_dirs, lite, capsys):
    """With two or more blocks in the clip each comparison gets its interval; the interval holds the
    clip's own difference (a resample of whole-clip blocks can give it) and is printed."""
    seq = load_sequence(*camvid_val_dirs, limit=6)
    result = key_interval_study(lite, seq, intervals=[1, 3], propagators=("copy", "query_flow"), adaptive=False,
                               progress=False, chain_flow_modes=(True,), bootstrap_block=2, bootstrap_samples=300)
    assert [(c["a"], c["b"]) for c in result["comparisons"]] == [
        ("fixed 1/3 query_flow (chained)", "per-frame"), ("fixed 1/3 query_flow (chained)", "fixed 1/3 copy")]
    for c in result["comparisons"]:
        assert c["block"] == 2 and c["blocks"] == 3 and c["kept"] == 300 and c["samples"] == 300
        assert c["ci"][0] <= c["ci"][1] and c["share_a_better"] + c["share_b_better"] <= 1.0
    rows = {r["propagator"]: r for r in result["rows"] if r["interval"] == 3}
    assert result["comparisons"][1]["delta"] == pytest.approx(rows["query_flow"]["mIoU"] - rows["copy"]["mIoU"], abs=2e-4)
    with pytest.raises(ValueError, match="bootstrap_block"):
        key_interval_study(lite, seq, intervals=[1], bootstrap_block=0)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_eval_cli_study_bad_cut_threshold(camvid_val_dirs, lite_checkpoint, tmp_path, capsys, value):
    out = tmp_path / "study"
    rc = _eval("--weights", str(lite_checkpoint), "--study", "--max-frames", "4", "--cut-threshold", value,
               "--out", str(out))
    assert rc == 2 and "--cut-threshold" in capsys.readouterr().err
    assert not out.exists()  # a usage error before any work


def test_study_threshold_matching_uses_the_cut_threshold(bikes_frames):
    # bikes.mp4 has a hard cut at frame 30: with a scene threshold no drift reaches, cut detection
    # alone decides whether the first 32 frames get a second key frame.
    frames = bikes_frames[:32]
    assert _count_key_frames(frames, 25.0, 50.0, 100) == 2
    assert _count_key_frames(frames, 25.0, 50.0, 100, cut_threshold=5.0) == 1
    # matching 2 key frames: with cut detection on, every threshold on the grid's high end gives 2;
    # with it off, only a threshold the drift reaches does
    t_on, n_on = match_scene_threshold(frames, 25.0, 2, 100)
    t_off, n_off = match_scene_threshold(frames, 25.0, 2, 100, cut_threshold=5.0)
    assert n_on == n_off == 2 and t_off < t_on


# --------------------------------------------------------------------------- library functions

def test_copy_fixed1_equals_per_frame(camvid_val_dirs, loaded):
    seq = load_sequence(*camvid_val_dirs, limit=4)
    copy = evaluate_sequence(loaded, seq, "copy", "fixed:1")
    qf = evaluate_sequence(loaded, seq, "query_flow", "fixed:1")
    assert copy["key_frames"] == qf["key_frames"] == 4 and copy["key_frame_ratio"] == 1.0
    for k in ("mIoU", "fwIoU", "pACC", "mACC", "IoU", "VC_8", "VC_16"):
        assert copy[k] == qf[k], k
    assert copy["median_ms_non_key_frame"] is None


def test_cost_ratio_within_run_by_hand():
    # medians 110 ms (key) and 21.5 ms (non-key): (3 x 110 + 4 x 21.5) / (7 x 110)
    assert _cost_ratio_within_run([100.0, 120.0, 110.0], [20.0, 22.0, 21.0, 40.0]) == pytest.approx(416 / 770)
    assert _cost_ratio_within_run([50.0, 70.0], []) == 1.0  # every frame a key frame: per-frame mode
    assert _cost_ratio_within_run([], [10.0]) is None  # no key-frame cost to compare with


def test_evaluate_sequence_costs_are_the_frames_total_latency(band, monkeypatch):
    """mean_ms_per_frame is the mean of each frame's ``total`` stage latency, the key / non-key
    figures are medians of theirs (stages stubbed to fixed values)."""
    key_totals = iter([10.0, 30.0, 11.0])

    class Stubbed(study.VideoSegmenter):
        def push(self, *args, **kwargs):
            result = super().push(*args, **kwargs)
            key = result.is_key_frame
            result.stage_latency_ms = {"schedule": 0.5, "postprocess": 1.0, "total": next(key_totals) if key else 2.0}
            return result

    # the warm-up's two frames run on a segmenter of their own, not stubbed
    monkeypatch.setattr(study, "_warm_up", lambda *a, **k: None)
    monkeypatch.setattr(study, "VideoSegmenter", Stubbed)
    images = [np.full((36, 48, 3), 40 * i, np.uint8) for i in range(5)]
    seq = LabelledSequence([f"{i}" for i in range(5)], images, [np.zeros((36, 48), np.uint8)] * 5, 15.0)
    out = evaluate_sequence(band, seq, "copy", "fixed:2")  # key frames 0, 2, 4: 10, 30, 11 ms; the others 2 ms
    assert out["key_frames"] == 3
    # the mean of the five, not their median (10); the median of the key frames, not their mean (17)
    assert (out["mean_ms_per_frame"], out["median_ms_key_frame"], out["median_ms_non_key_frame"]) == (11.0, 11.0, 2.0)
    assert out["cost_ratio_within_run"] == pytest.approx((3 * 11.0 + 2 * 2.0) / (5 * 11.0))


def test_warm_up_pushes_a_key_and_a_propagated_frame_untimed(band, monkeypatch):
    """So the first non-key frame's one-off start-up cost is not in the first row's timings."""
    pushed = []

    class Counting(study.VideoSegmenter):
        def push(self, *args, **kwargs):
            result = super().push(*args, **kwargs)
            pushed.append((self, result.is_key_frame))  # the object, so its id is not reused
            return result

    monkeypatch.setattr(study, "VideoSegmenter", Counting)
    out = evaluate_sequence(band, _still(4), "copy", "fixed:4")
    warm = [key for segmenter, key in pushed if segmenter is pushed[0][0]]
    assert warm == [True, False] and len(pushed) == 2 + 4 and out["frames"] == 4


def test_scores_use_the_labels_vc_the_raw_labels_in_percent(band):
    """With reduce_zero_label the two differ: mIoU scores ``labels``, only VC reads ``vc_labels``;
    VC_n is in percent like the other scores (None without a window of n + 1 frames)."""
    seq = _still(10)  # two VC_8 windows (i in range(10 - 8)), both consistent
    seq.vc_labels = [np.full((36, 48), 4, np.uint8)] * 10  # raw IDs: another value than the scored labels
    out = evaluate_sequence(band, seq, "copy", "fixed:2")
    assert out["mIoU"] == 100.0 and out["pACC"] == 100.0 and out["IoU"]["a"] == 100.0
    assert out["VC_8"] == 100.0 and out["VC_16"] is None


def test_study_per_frame_rows_name_no_propagator_settings(band):
    s = key_interval_study(band, _still(4), intervals=[1, 2], propagators=("copy",), adaptive=False, progress=False,
                           chain_flow_modes=(True,), bootstrap_samples=10)
    per_frame = [r for r in s["rows"] if r["interval"] == 1]
    assert len(per_frame) == 1 and per_frame[0]["propagator_settings"] is None
    assert [r["propagator_settings"]["name"] for r in s["rows"] if r["interval"] == 2] == ["copy"]


def test_study_refuses_query_flow_on_a_backend_without_motion_module_before_any_row(lite, monkeypatch):
    """The backend runs the rows, so its motion module decides (the model's may be trained)."""
    class NoMotion:
        motion_trained = False

    assert getattr(lite.model, "motion_trained", True)
    monkeypatch.setattr(study, "_evaluate", lambda *a, **k: pytest.fail("ran a row before refusing query_flow"))
    with pytest.raises(ValueError, match="query_flow rows need a trained motion module"):
        key_interval_study(lite, None, intervals=(1, 2), propagators=("copy", "query_flow"), backend=NoMotion(),
                           progress=False)


def test_match_scene_threshold_above_the_first_grid():
    """A steady fast pan (no cut): the drift since the key frame scores above 3, the first grid's
    top, so every grid threshold gave 8 key frames for a target of 6 (more segmentor runs than the
    fixed schedule it is compared with); thresholds up to max_interval / pixel_scale are searched."""
    rng = np.random.default_rng(0)
    strip = cv2.GaussianBlur((rng.random((120, 2000)) * 255).astype(np.float32), (0, 0), 3)
    strip = cv2.normalize(strip, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    frames = [np.repeat(strip[:, 6 * t: 6 * t + 160, None], 3, axis=2).copy() for t in range(60)]
    threshold, count = match_scene_threshold(frames, 15.0, 6, 20)
    assert count == 6 and threshold > 3.0


def test_match_scene_threshold_hits_target(camvid_val_dirs):
    seq = load_sequence(*camvid_val_dirs, limit=20)
    assert len(seq.images) == 20
    for target, max_interval in ((10, 4), (7, 6), (4, 10)):
        threshold, count = match_scene_threshold(seq.images, seq.fps, target, max_interval)
        assert count == target, (target, count)  # the bisection finds the exact count here
        assert 0.01 <= threshold <= 3.0 and math.isfinite(threshold)
        # the reported count is what that threshold gives
        assert _count_key_frames(seq.images, seq.fps, threshold, max_interval) == count
    # a target the schedule cannot go below (max_interval forces key frames): the closest it can
    _, count = match_scene_threshold(seq.images, seq.fps, 1, 4)
    assert count == 5  # frames 0, 4, 8, 12, 16 at the least


def test_match_scene_threshold_never_takes_more_key_frames_than_the_target(monkeypatch):
    # counts that jump over the target: 11 below a scene threshold of 0.5, 8 from there on

    monkeypatch.setattr(study, "_count_key_frames", lambda images, fps, t, mi, ct: 11 if t < 0.5 else 8)
    threshold, count = match_scene_threshold([], 15.0, 10, 20)
    assert count == 8  # 11 is closer to 10, but more segmentor runs than fixed
    assert 0.5 <= threshold < 0.501  # the lowest threshold tried that gives 8: the bisection's end
    # nothing at or below the target: the smallest count above it
    monkeypatch.setattr(study, "_count_key_frames", lambda images, fps, t, mi, ct: 12 if t < 0.5 else 11)
    assert match_scene_threshold([], 15.0, 10, 20)[1] == 11


def test_match_scene_threshold_exact_on_the_whole_clip(camvid_val_dirs):
    # The 60-point grid alone gave 52 and 32 key frames for targets 51 and 34 (intervals 2 and 3).
    seq = load_sequence(*camvid_val_dirs)
    for n in (2, 3):
        target = math.ceil(len(seq.images) / n)
        threshold, count = match_scene_threshold(seq.images, seq.fps, target, 2 * n)
        assert count == target, (n, count)


def test_write_json_nan_as_null(tmp_path):
    path = tmp_path / "x.json"
    write_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2.5}, "ci": (float("nan"), 1.0),
                "r": [(float("inf"),)]}, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": 2.5}, "ci": [None, 1.0], "r": [[None]]}


# --------------------------------------------------------------------------- errors

def test_eval_cli_missing_labels_folder(camvid_val_dirs, lite_checkpoint, tmp_path, capsys):
    img, _ = camvid_val_dirs
    missing = tmp_path / "no_such_labels"
    rc = _eval(str(img), "--labels", str(missing), "--weights", str(lite_checkpoint), "--max-frames", "2")
    assert rc == 2
    line = error_line(capsys.readouterr().err)
    assert str(missing) in line


def test_eval_cli_images_without_labels(camvid_val_dirs, lite_checkpoint, capsys):
    img, _ = camvid_val_dirs
    assert _eval(str(img), "--weights", str(lite_checkpoint)) == 2
    assert "--labels" in error_line(capsys.readouterr().err)


def test_eval_cli_bad_schedule_and_propagator(camvid_val_dirs, lite_checkpoint, capsys):
    assert _eval("--weights", str(lite_checkpoint), "--schedule", "sometimes") == 2
    assert "bad schedule" in error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:
        _eval("--propagator", "teleport")
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_eval_cli_missing_weights_is_runtime_error(camvid_val_dirs, tmp_path, capsys):
    rc = _eval("--weights", str(tmp_path / "missing.pt"), "--max-frames", "2")
    assert rc == 1
    assert "not found" in error_line(capsys.readouterr().err)




# --------------------------------------------------------------------------- propagation diagnostics

def test_evaluate_sequence_takes_a_propagator_instance(camvid_val_dirs, loaded):
    from mpvss_ros.propagation import CopyPropagator, OpticalFlowPropagator

    seq = load_sequence(*camvid_val_dirs, limit=6)
    by_name = evaluate_sequence(loaded, seq, "copy", "fixed:3")
    by_instance = evaluate_sequence(loaded, seq, CopyPropagator(), "fixed:3")
    assert by_instance["propagator"] == "copy" and by_instance["mIoU"] == by_name["mIoU"]
    assert by_instance["IoU"] == by_name["IoU"] and by_instance["key_frames"] == 2
    pooled = evaluate_sequence(loaded, seq, OpticalFlowPropagator(grid_stride=16), "fixed:3")
    assert pooled["propagator"] == "optical_flow" and _pct_or_none(pooled["mIoU"])


def test_propagation_diagnostics_script(camvid_val_dirs, lite_checkpoint, tmp_path, load_script, run_script):
    module = load_script("propagation_diagnostics")
    out = tmp_path / "diag.json"
    printed = run_script(module, "--weights", str(lite_checkpoint), "--max-frames", "6", "--intervals", "2",
                         "--gaps", "1", "--threads", "1", "--out", str(out))
    d = json.loads(out.read_text())
    names = [r["propagator"] for r in d["rows"]]
    assert names == ["copy", "query_flow", "query_flow/pixel_flow", "optical_flow/dis@0.5",
                     f"optical_flow/dis@0.5 on the 1/{d['flow_grid_stride']} grid",
                     f"optical_flow/dis-medium@1 on the 1/{d['flow_grid_stride']} grid",
                     f"optical_flow/dis@{d['motion_image_scale']:g}", "query_flow (chained)",
                     "optical_flow/dis@0.5 (chained)", "copy"]
    # the rows diagnose the flows as estimated (direct from the key frame) except the two chained ones
    chained = [(r["propagator_settings"] or {}).get("chain_flow") for r in d["rows"]]
    assert chained == [None, False, None] + [False] * 4 + [True] * 2 + [None]  # pixel flow: direct, unlabelled
    assert [r["schedule"] for r in d["rows"]] == ["fixed:1"] + ["fixed:2"] * 9
    assert d["rows"][0]["key_frames"] == 6 and all(r["key_frames"] == 3 for r in d["rows"][1:])
    assert all(_pct_or_none(r["mIoU"]) for r in d["rows"])
    (epe,) = d["flow_epe"]
    assert epe["gap"] == 1 and epe["pairs"] == 1  # key frames every 5 frames: pair (0, 1) of 6 frames
    assert epe["epe"] >= 0 and epe["zero_flow_epe"] > 0  # the camera moves between frames 0 and 1
    assert epe["ratio"] == pytest.approx(epe["epe"] / epe["zero_flow_epe"])
    assert "| query_flow/pixel_flow fixed:2 |" in printed and "| frames apart |" in printed


def test_eval_cli_optical_flow_preset_and_scale(camvid_val_dirs, lite_checkpoint, loaded, tmp_path, capsys):
    """--optical-flow-preset / --optical-flow-scale reach the optical_flow propagator: eval.json names
    them, and its scores equal those of an explicitly built propagator with the same settings."""
    from mpvss_ros.propagation import OpticalFlowPropagator

    out = tmp_path / "medium"
    common = ["--weights", str(lite_checkpoint), "--max-frames", "6", "--schedule", "fixed:3",
              "--propagator", "optical_flow"]
    assert _eval(*common, "--optical-flow-preset", "medium", "--optical-flow-scale", "1.0", "--out", str(out)) == 0
    r = json.loads((out / "eval.json").read_text())
    assert r["propagator_settings"] == {"name": "optical_flow", "method": "dis", "preset": "medium",
                                        "flow_scale": 1.0, "grid_stride": None, "chain_flow": True}
    seq = load_sequence(*camvid_val_dirs, limit=6)
    explicit = evaluate_sequence(loaded, seq, OpticalFlowPropagator(preset="medium", flow_scale=1.0), "fixed:3")
    assert r["mIoU"] == explicit["mIoU"] and r["IoU"] == explicit["IoU"]
    # --no-chain-flow: the paper's direct flow, the same scores as an explicit direct propagator
    assert _eval(*common, "--no-chain-flow", "--out", str(tmp_path / "direct")) == 0
    r = json.loads((tmp_path / "direct" / "eval.json").read_text())
    assert r["propagator_settings"]["chain_flow"] is False
    direct = evaluate_sequence(loaded, seq, OpticalFlowPropagator(chain_flow=False), "fixed:3")
    assert r["mIoU"] == direct["mIoU"] and r["IoU"] == direct["IoU"]
    default = evaluate_sequence(loaded, seq, "optical_flow", "fixed:3")
    assert default["propagator_settings"]["preset"] == "fast" and default["propagator_settings"]["flow_scale"] == 0.5
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _eval(*common, "--optical-flow-scale", "1.5")
    assert exc.value.code == 2 and "must be in [0.1, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _eval(*common, "--optical-flow-preset", "slow")
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--study", "--intervals", "2", "0"], "--intervals must all be >= 1"),
    (["--study", "--bootstrap-block", "0"], "--bootstrap-block must be >= 1"),
    (["--max-frames", "0"], "--max-frames must be >= 1"),
    (["--threads", "2147483648"], "--threads must be in [0, 4096]"),
    (["--out", ""], "--out must name a folder"),
])
def test_eval_options_checked_before_any_work(camvid_val_dirs, tmp_path, capsys, argv, words):
    images, labels = camvid_val_dirs
    rc = main(["eval", str(images), "--labels", str(labels), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and words in err, err
    assert not (tmp_path / "o").exists()


def test_fixed_schedule_keeps_its_interval_at_a_frame_rate_below_one(camvid_val_dirs, lite):
    # the sequence's stamps are index / fps: 2 s apart at 0.5 fps, which must not be a time gap
    seq = load_sequence(*camvid_val_dirs, fps=0.5, limit=10)
    result = evaluate_sequence(lite, seq, "copy", "fixed:5")
    assert result["key_frames"] == 2


# --------------------------------------------------------------------------- label values and frame sizes
# synthetic sequences (no shared data); K = 11 as the lite model and CamVid (void 11, ignore 255)


def _write_sequence(root: Path, labels: list[np.ndarray]) -> tuple[Path, Path]:
    """Frames ``f0.png``, ... (random RGB of their label's size) and the labels under
    ``root / "img"`` and ``root / "ann"``."""
    img, ann = root / "img", root / "ann"
    img.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        assert cv2.imwrite(str(img / f"f{i}.png"), rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8))
        write_label_png(ann / f"f{i}.png", label)
    return img, ann


def _label(value: int, dtype=np.uint8, hw=(24, 32)) -> np.ndarray:
    label = np.zeros(hw, dtype)
    label[:, : hw[1] // 2] = value
    return label


def test_load_sequence_accepts_classes_void_and_ignore(tmp_path):
    every = (np.arange(24 * 32).reshape(24, 32) % 12).astype(np.uint8)  # 0..10 and the void 11
    img, ann = _write_sequence(tmp_path, [every, _label(255), np.full((24, 32), 11, np.uint16)])
    seq = load_sequence(img, ann, num_classes=11)
    assert seq.names == ["f0", "f1", "f2"] and int(seq.labels[0].max()) == 11


@pytest.mark.parametrize("labels, words", [
    ([np.full((24, 32), 200, np.uint8)] * 2, "f0.png holds value(s) 200 (768 pixels)"),  # every pixel
    ([_label(3), _label(50)], "f1.png holds value(s) 50 (384 pixels)"),  # some pixels of the second label
    ([(np.arange(24 * 32).reshape(24, 32) % 11 + 256).astype(np.uint16)],  # 16-bit, 256..266
     "f0.png holds value(s) 256, 257, 258, 259, 260, ... (11 distinct) (768 pixels)"),
    ([_label(12)], "f0.png holds value(s) 12 "),  # one past the void value
])
def test_load_sequence_refuses_label_values_outside_the_classes(tmp_path, labels, words):
    img, ann = _write_sequence(tmp_path, labels)
    with pytest.raises(ValueError, match="outside the model's 11 classes 0..10, void 11 and ignore 255") as exc:
        load_sequence(img, ann, num_classes=11)
    assert words in str(exc.value) and str(ann) in str(exc.value)
    assert len(load_sequence(img, ann).labels) == len(labels)  # without num_classes: not checked, as before


def test_reduce_zero_label_shifts_classes_and_ignores_others(tmp_path):
    """VSPW's PNGs number the classes from 1 (0 = others): read as they are, every class would
    be scored as the one before it, and the check of label values cannot tell."""
    from mpvss_ros.evaluation.study import reduced_zero_label

    raw = np.array([[0, 1, 2], [11, 12, 255]], np.uint8)
    np.testing.assert_array_equal(reduced_zero_label(raw), [[255, 0, 1], [10, 11, 255]])
    wide = np.array([[0, 300, 255, 256]], np.uint16)
    np.testing.assert_array_equal(reduced_zero_label(wide), [[255, 299, 255, 255]])
    assert reduced_zero_label(wide).dtype == np.uint16
    img, ann = _write_sequence(tmp_path, [_label(12), _label(1)])  # 12 = class 11 here: void for K = 11
    seq = load_sequence(img, ann, num_classes=11, reduce_zero_label=True)
    assert sorted(np.unique(seq.labels[0]).tolist()) == [11, 255] and sorted(np.unique(seq.labels[1]).tolist()) == [0, 255]
    with pytest.raises(ValueError, match="f0.png holds value"):  # 12 is no value of K = 11 as it is
        load_sequence(img, ann, num_classes=11)
    for k in (255, 256):  # shifted IDs 254 and 255 would meet the ignore value
        with pytest.raises(ValueError, match=f"reduce_zero_label with {k} classes"):
            load_sequence(img, ann, num_classes=k, reduce_zero_label=True)
    load_sequence(img, ann, num_classes=254, reduce_zero_label=True)  # IDs 0..253: allowed


def test_vc_compares_the_raw_labels_under_reduce_zero_label(tmp_path, lite, monkeypatch):
    """VC_n compares ground truth between frames as the files hold it (spec §4.3): the remapping
    merges 0 (others) with 255 (ignore), so a pixel going 0 -> 255 -> 0 looked stable."""

    raw = [_label(1) for _ in range(3)]
    for i, lab in enumerate(raw):
        lab[:4] = (0, 255, 0)[i]
    img, ann = _write_sequence(tmp_path, raw)
    seq = load_sequence(img, ann, num_classes=11, reduce_zero_label=True)
    assert [np.array_equal(v, r) for v, r in zip(seq.vc_labels, raw)] == [True] * 3
    assert (seq.labels[0][:4] == 255).all() and (seq.labels[1][:4] == 255).all()
    seen = []

    class Recording(study.VideoConsistency):
        def update(self, pred, gt):
            seen.append(np.asarray(gt).copy())
            super().update(pred, gt)

    monkeypatch.setattr(study, "VideoConsistency", Recording)
    evaluate_sequence(lite, seq, "copy", "fixed:1")
    assert len(seen) == 6 and all(np.array_equal(g, raw[i // 2]) for i, g in enumerate(seen))  # VC_8 and VC_16
    assert load_sequence(img, ann, num_classes=12).vc_labels is None  # nothing remapped: the labels themselves


def test_reduce_zero_label_value_check_names_the_files_own_values(tmp_path):
    """With reduce_zero_label the files hold 0 (others), 1..K, K + 1 (void) and 255; a stray value
    is named as the file holds it, not shifted by one, and the classes are counted before the shift."""
    stray = _label(3)
    stray[0, 0] = 40
    img, ann = _write_sequence(tmp_path / "a", [_label(1), stray])
    with pytest.raises(ValueError, match=r"f1.png holds value\(s\) 40 \(1 pixels\) outside the model's 11 classes "
                                         r"1..11 \(reduce_zero_label; 0 = others, ignored\), void 12 and ignore 255"):
        load_sequence(img, ann, num_classes=11, reduce_zero_label=True)
    # 0 (others) and 12 (void) everywhere: nothing to score, though 0 is a class without the option
    img, ann = _write_sequence(tmp_path / "b", [_label(0), _label(12)])
    with pytest.raises(ValueError, match="count no pixel"):
        load_sequence(img, ann, num_classes=11, reduce_zero_label=True)
    assert len(load_sequence(img, ann, num_classes=13).labels) == 2


def test_load_sequence_refuses_labels_without_a_class_pixel(tmp_path):
    voids = [np.full((24, 32), 11, np.uint8), np.full((24, 32), 255, np.uint8)]
    img, ann = _write_sequence(tmp_path / "a", voids)
    with pytest.raises(ValueError, match=r"the 2 labels in .* count no pixel: every pixel is void \(11\) or ignored"):
        load_sequence(img, ann, num_classes=11)
    # one class pixel anywhere in the sequence is enough
    voids[1][5, 5] = 4
    img, ann = _write_sequence(tmp_path / "b", voids)
    assert len(load_sequence(img, ann, num_classes=11).labels) == 2
    with pytest.raises(ValueError, match="num_classes"):
        load_sequence(img, ann, num_classes=0)


def test_load_sequence_refuses_frames_of_another_size_naming_the_file(tmp_path):
    labels = [np.zeros((48, 64), np.uint8), np.zeros((40, 80), np.uint8)]
    img, ann = _write_sequence(tmp_path, labels)
    with pytest.raises(ValueError) as exc:
        load_sequence(img, ann)
    assert str(exc.value) == (f"frame {img / 'f1.png'} is 80x40, the first frame {img / 'f0.png'} is 64x48: "
                              "the frames of a sequence must have one size")


@pytest.fixture()
def eval_without_model(monkeypatch, lite):
    """``mpvss eval`` with the lite model (K = 11) instead of loading one; fails the test if a
    sequence gets segmented."""
    def without_backend(args, check_loaded=None):
        if check_loaded is not None:
            check_loaded(lite)
        return lite, None

    monkeypatch.setattr(cli, "load_model_and_backend", without_backend)

    monkeypatch.setattr(study, "_evaluate", lambda *a, **k: pytest.fail("segmented a sequence"))


@pytest.mark.parametrize("labels, words", [
    ([np.full((24, 32), 200, np.uint8)] * 3, "f0.png holds value(s) 200"),
    ([_label(2), _label(2), _label(50)], "f2.png holds value(s) 50"),
    ([np.full((24, 32), 11, np.uint8)] * 2, "count no pixel"),
    ([np.zeros((48, 64), np.uint8), np.zeros((40, 80), np.uint8)], "f1.png is 80x40"),
])
def test_eval_cli_refuses_bad_labels_and_sizes_before_segmenting(tmp_path, capsys, eval_without_model, labels, words):
    img, ann = _write_sequence(tmp_path, labels)
    out = tmp_path / "out"
    assert _eval(str(img), "--labels", str(ann), "--out", str(out)) == 2
    line = error_line(capsys.readouterr().err)
    assert words in line
    assert not out.exists()


def test_eval_cli_images_without_labels_names_the_option(tmp_path, capsys, monkeypatch):
    # the message had blamed a missing CamVid even when the shared data was there
    monkeypatch.setattr(cli, "load_model_and_backend", lambda args: pytest.fail("loaded a model"))
    img, _ = _write_sequence(tmp_path, [_label(1)])
    assert _eval(str(img)) == 2
    line = error_line(capsys.readouterr().err)
    assert "give --labels DIR with IMAGES" in line and "not found" not in line


@pytest.mark.parametrize("out", ["", "  "])
def test_eval_cli_refuses_an_empty_out(tmp_path, capsys, monkeypatch, out):
    monkeypatch.setattr(cli, "load_model_and_backend", lambda args: pytest.fail("loaded a model"))
    img, ann = _write_sequence(tmp_path, [_label(1)])
    assert _eval(str(img), "--labels", str(ann), "--out", out) == 2
    assert f"--out must name a folder, got {out!r}" in error_line(capsys.readouterr().err)


def test_eval_self_reference_scores_against_the_models_own_per_frame_labels(tmp_path, capsys):
    """Unlabelled video: per-frame mode reproduces its own reference exactly (mIoU 100), a
    propagated schedule keeps less of it; --labels and --self-reference exclude each other."""
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(3)
    base = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (96, 72))
    for i in range(6):
        cv2.imwrite(str(folder / f"f{i}.png"), np.roll(base, 4 * i, axis=1))
    out = tmp_path / "out"
    assert _eval(str(folder), "--self-reference", "--schedule", "fixed:1", "--out", str(out)) == 0
    per_frame = json.loads((out / "eval.json").read_text())
    assert per_frame["mIoU"] == 100.0 and per_frame["reference"] == "per-frame labels of the model"
    assert per_frame["fps"] == 15.0  # an image folder's stamps: CamVid's rate unless --fps says otherwise
    assert _eval(str(folder), "--self-reference", "--schedule", "fixed:3", "--propagator", "copy", "--out", str(out)) == 0
    copied = json.loads((out / "eval.json").read_text())
    assert copied["key_frames"] == 2 and copied["mIoU"] < 100.0
    capsys.readouterr()
    assert _eval(str(folder), "--self-reference", "--labels", str(folder)) == 2
    assert "either --labels or --self-reference" in capsys.readouterr().err


def test_eval_of_a_video_stamps_at_its_own_frame_rate(tmp_path, capsys):
    """A video is stamped at its container's rate (the study's JSON and eval.json record it);
    --fps overrides it."""
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (96, 72))
    rng = np.random.default_rng(4)
    base = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (96, 72))
    for i in range(4):
        writer.write(np.roll(base, 3 * i, axis=1))
    writer.release()
    out = tmp_path / "out"
    assert _eval(str(video), "--self-reference", "--schedule", "fixed:2", "--out", str(out)) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["fps"] == 25.0 and result["frames"] == 4
    assert _eval(str(video), "--self-reference", "--schedule", "fixed:2", "--fps", "10", "--out", str(out)) == 0
    assert json.loads((out / "eval.json").read_text())["fps"] == 10.0


def test_study_plot_of_one_interval_draws_each_setting(tmp_path, monkeypatch):
    """A study of one interval (no per-frame row) had no line of two points and drew empty axes."""
    rows = [{"propagator": prop, "chain_flow": chain, "mode": mode, "interval": 2, "key_frame_ratio": 0.5,
             "mIoU": 60.0 + i, "mean_ms_per_frame": 20.0 + i}
            for i, (prop, chain, mode) in enumerate([("copy", None, "fixed"), ("query_flow", True, "fixed"),
                                                     ("query_flow", True, "adaptive")])]
    drawn = _on_close(monkeypatch, lambda fig: [len(ax.lines) for ax in fig.axes])
    plot_study({"rows": rows, "model": "m", "frames": 10, "fps": 25.0}, tmp_path / "study.png")
    assert drawn == [[3, 3]] and (tmp_path / "study.png").stat().st_size > 0
    # per-frame rows only (--intervals 1): one marker per setting, no adaptive line made of them
    per_frame = [{**r, "interval": 1, "key_frame_ratio": 1.0, "mode": "fixed"} for r in rows[:2]]
    plot_study({"rows": per_frame, "model": "m", "frames": 10, "fps": 25.0}, tmp_path / "study.png")
    assert drawn[-1] == [2, 2]


def test_study_plot_names_the_backend_and_device_its_costs_were_measured_on(tmp_path, monkeypatch):
    row = {"propagator": "copy", "chain_flow": None, "mode": "fixed", "interval": 1, "key_frame_ratio": 1.0,
           "mIoU": 60.0, "mean_ms_per_frame": 20.0}
    labels = _on_close(monkeypatch, lambda fig: fig.axes[1].get_xlabel())
    result = {"rows": [row], "model": "m", "frames": 10, "fps": 25.0}
    plot_study({**result, "backend": {"backend": "tensorrt", "device": "cuda:0", "precision": "fp16"}},
               tmp_path / "study.png")
    plot_study(result, tmp_path / "study.png")  # a study JSON without the backend
    assert labels == ["mean cost per frame (ms; tensorrt on cuda:0)", "mean cost per frame (ms; ? on ?)"]


def test_reduce_zero_label_needs_labels(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--self-reference", "--reduce-zero-label"]) == 2
    assert "--reduce-zero-label applies to --labels" in capsys.readouterr().err
    assert main(["eval", "--reduce-zero-label", "--max-frames", "2"]) == 2  # CamVid's 0-based default labels
    assert "not to the default CamVid labels" in capsys.readouterr().err


def test_reduce_zero_label_refuses_classes_that_meet_the_ignore_value(tmp_path):
    img, ann = _write_sequence(tmp_path, [_label(1)])
    with pytest.raises(ValueError, match="254 and 255"):
        load_sequence(img, ann, num_classes=300, reduce_zero_label=True)


def test_a_comparison_at_different_key_frame_counts_says_so():
    """An adaptive schedule that cannot reach the fixed one's key-frame count (a static clip) is
    compared all the same; the printed line says the two rows are not at the same ratio."""
    from mpvss_ros.cli import comparison_line

    c = {"a": "adaptive 1/5 copy", "b": "fixed 1/5 copy", "delta": -1.0, "key_frames": [2, 3], "kept": 0,
         "block": 10}
    assert comparison_line(c, 12).endswith("no interval: 12 frames are fewer than two blocks of 10; "
                                           "not at the same key-frame count: 2 against 3")
    c.update(key_frames=[3, 3], kept=2000, level=0.95, ci=[-1.5, -0.5], share_a_better=0.0, share_b_better=1.0)
    line = comparison_line(c, 30)
    assert line.endswith("of 2000 resamples (blocks of 10 frames)") and "key-frame count" not in line
    c.update(a="fixed 1/5 copy", b="per-frame", key_frames=[6, 30])  # fewer key frames is the point there
    assert "key-frame count" not in comparison_line(c, 30)


def test_eval_refuses_the_default_camvid_labels_for_a_model_of_other_classes(camvid_val_dirs, capsys, monkeypatch):
    """CamVid val's labels read as a 19-class model's IDs would score CamVid's Sky as road: the
    default labels are refused for a model of other than 11 classes, naming --labels, before any
    backend is built (an export or a TensorRT engine build)."""

    import mpvss_ros.model_loader as model_loader
    import mpvss_ros.runtime as runtime

    lite = load_model("mpvss_lite")
    nineteen = dataclasses.replace(lite, config=dataclasses.replace(lite.config, num_classes=19, name="other19",
                                                                    class_names=[], palette=[]))
    monkeypatch.setattr(model_loader, "load_model", lambda *a, **k: nineteen)
    monkeypatch.setattr(runtime, "load_backend", lambda *a, **k: pytest.fail("built a backend"))
    assert _eval("--max-frames", "2") != 0
    line = error_line(capsys.readouterr().err)
    assert "default evaluation data is CamVid" in line and "other19 has 19" in line and "--labels" in line


def test_study_adaptive_rows_target_the_fixed_rows_key_frame_count(camvid_val_dirs, lite):
    """The adaptive row of interval N aims at fixed:N's key-frame count (frames 0, N, 2N, ...:
    ceil(T / N)) with max_interval 2N; a study without bootstrap samples is refused up front."""
    seq = load_sequence(*camvid_val_dirs, limit=7)
    result = key_interval_study(lite, seq, intervals=[1, 3], propagators=("copy",), progress=False,
                               chain_flow_modes=(True,), bootstrap_samples=50)
    fixed, adaptive = (next(r for r in result["rows"] if r["interval"] == 3 and r["mode"] == m) for m in ("fixed", "adaptive"))
    assert fixed["key_frames"] == 3 == adaptive["target_key_frames"]  # ceil(7 / 3), not 7 // 3
    assert adaptive["key_frames"] <= 3 and adaptive["schedule_settings"]["max_interval"] == 6
    threshold, count = match_scene_threshold(seq.images, seq.fps, 3, max_interval=6)  # matched as it is run
    assert (adaptive["scene_threshold"], adaptive["key_frames"]) == (threshold, count)
    with pytest.raises(ValueError, match="bootstrap_block and bootstrap_samples must be >= 1"):
        key_interval_study(lite, seq, intervals=[1], bootstrap_samples=0)


def _xdata(fig) -> list:
    return [[list(map(float, line.get_xdata())) for line in ax.lines] for ax in fig.axes]


def test_study_plot_x_is_frames_per_key_frame(tmp_path, monkeypatch):
    drawn = _on_close(monkeypatch, _xdata)
    rows = [{"propagator": "copy", "chain_flow": None, "mode": "fixed", "interval": n, "key_frame_ratio": 1.0 / n,
             "mIoU": 60.0 - n, "mean_ms_per_frame": 40.0 / n} for n in (1, 4)]
    plot_study({"rows": rows, "model": "m", "frames": 8, "fps": 25.0}, tmp_path / "s.png")
    assert drawn == [[[[1.0, 4.0]], [[40.0, 10.0]]]]  # key interval (1 / key-frame ratio); ms per frame


def test_study_plot_draws_the_direct_flow_rows(tmp_path, monkeypatch):
    drawn = _on_close(monkeypatch, _xdata)
    rows = [{"propagator": "query_flow", "chain_flow": False, "mode": "fixed", "interval": 2, "key_frame_ratio": 0.5,
             "mIoU": 50.0, "mean_ms_per_frame": 30.0}]
    plot_study({"rows": rows, "model": "m", "frames": 8, "fps": 25.0}, tmp_path / "s.png")
    assert drawn == [[[[2.0]], [[30.0]]]]
