"""The paired circular block bootstrap of mIoU differences, and the stacked IoU it scores with
(from confusion matrices and from the per-class counts TP, GT, Pred that the bootstrap sums)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mpvss_ros.evaluation import ConfusionMatrix
from mpvss_ros.evaluation.bootstrap import circular_block_resamples
from mpvss_ros.evaluation.bootstrap import paired_miou_difference as paired_difference_of_counts
from mpvss_ros.evaluation.metrics import class_counts, iou_from_counts, iou_of, mean_iou, mean_iou_from_counts

# --------------------------------------------------------------------------- stacked IoU


@settings(max_examples=60, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 5)).map(lambda s: (s[0], s[1], s[1])),
              elements=st.integers(0, 50)))
def test_stacked_iou_equals_the_confusion_matrix_one_by_one(stack):
    ious, mious = iou_of(stack), mean_iou(stack)
    assert ious.shape == stack.shape[:2] and mious.shape == stack.shape[:1]
    counts = class_counts(stack)
    assert counts.shape == (stack.shape[0], 3, stack.shape[1]) and counts.dtype == np.int64
    np.testing.assert_array_equal(iou_from_counts(counts), ious)
    np.testing.assert_array_equal(mean_iou_from_counts(counts), mious)
    # counts sum over frames as the matrices do
    np.testing.assert_array_equal(class_counts(stack.sum(0)), counts.sum(0))
    for mat, iou, miou in zip(stack, ious, mious):
        # the detectron2 convention written out: IoU_c = TP / union where union > 0, mIoU their mean
        tp, union = np.diag(mat), mat.sum(0) + mat.sum(1) - np.diag(mat)
        np.testing.assert_array_equal(class_counts(mat), [np.diag(mat), mat.sum(1), mat.sum(0)])
        np.testing.assert_array_equal(np.isnan(iou), union == 0)
        np.testing.assert_allclose(iou[union > 0], tp[union > 0] / union[union > 0], rtol=0, atol=1e-15)
        if (union > 0).any():
            assert miou == pytest.approx(np.mean(tp[union > 0] / union[union > 0]), abs=1e-15)
        else:
            assert math.isnan(miou)
        cm = ConfusionMatrix(mat.shape[0])  # the accumulator scores with the same functions
        cm.mat[:] = mat
        assert (math.isnan(miou) and math.isnan(cm.miou())) or cm.miou() == miou


@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 2, 3)])
def test_stacked_iou_refuses_non_square_input(shape):
    with pytest.raises(ValueError, match=r"\(\.\.\., K, K\)"):
        iou_of(np.zeros(shape, dtype=np.int64))
    with pytest.raises(ValueError, match=r"\(\.\.\., K, K\)"):
        class_counts(np.zeros(shape, dtype=np.int64))


def test_float_matrices_score_as_they_are():
    """Fractional counts (e.g. a normalised matrix) keep their values: nothing is cast to int."""
    mat = np.array([[0.5, 0.5], [0.25, 0.75]])
    assert mean_iou(mat) == pytest.approx((0.5 / 1.25 + 0.75 / 1.5) / 2)
    assert class_counts(mat).dtype == np.float64


@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 4, 4)])
def test_iou_from_counts_refuses_other_shapes(shape):
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, K\)"):
        iou_from_counts(np.zeros(shape, dtype=np.int64))


# --------------------------------------------------------------------------- resamples

def test_resamples_are_circular_runs_of_the_block_length():
    idx = circular_block_resamples(frames=23, block=5, samples=300, seed=3)
    assert idx.shape == (300, 23) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() <= 22
    # five blocks of five cut to 23: inside each block every step is +1 modulo 23
    for start in range(0, 23, 5):
        block = idx[:, start:start + 5]
        assert np.all((np.diff(block, axis=1) - 1) % 23 == 0)
    # the block starts are uniform over all 23 frames (wrapping runs included)
    starts = idx[:, ::5].ravel()
    assert set(starts.tolist()) == set(range(23))
    assert np.any(idx[:, 0] > 18)  # some runs start within four frames of the end and wrap
    np.testing.assert_array_equal(idx, circular_block_resamples(23, 5, 300, seed=3))
    assert not np.array_equal(idx, circular_block_resamples(23, 5, 300, seed=4))


def test_one_block_of_the_whole_clip_is_a_rotation():
    idx = circular_block_resamples(frames=7, block=7, samples=50)
    for row in idx:
        np.testing.assert_array_equal(row, np.roll(np.arange(7), -row[0]))


@pytest.mark.parametrize("frames, block, samples, words", [
    (0, 1, 10, "frames must be >= 1"),
    (5, 0, 10, "block must be in 1..5"),
    (5, 6, 10, "block must be in 1..5"),
    (5, 2, 0, "samples must be >= 1"),
])
def test_resample_arguments_are_checked(frames, block, samples, words):
    with pytest.raises(ValueError, match=words):
        circular_block_resamples(frames, block, samples)


# --------------------------------------------------------------------------- paired differences

def paired_miou_difference(a: np.ndarray, b: np.ndarray, **kwargs):
    """The bootstrap on per-frame confusion matrices (T, K, K), given as their class counts."""
    return paired_difference_of_counts(class_counts(a), class_counts(b), **kwargs)


def _frame(tp0: int, tp1: int, wrong: int) -> np.ndarray:
    """A 2-class confusion matrix: ``tp0`` / ``tp1`` pixels right, ``wrong`` class-0 pixels called 1."""
    return np.array([[tp0, wrong], [0, tp1]], dtype=np.int64)


def test_the_difference_is_the_clip_mious_difference_by_hand():
    # A: right everywhere on frame 0, 4 of class-0 pixels wrong on frame 1; B the other way round,
    # but 2 wrong. Clip sums: A [[16, 4], [0, 20]], B [[18, 2], [0, 20]].
    a = np.stack([_frame(10, 10, 0), _frame(6, 10, 4)])
    b = np.stack([_frame(8, 10, 2), _frame(10, 10, 0)])
    miou_a = (16 / 20 + 20 / 24) / 2
    miou_b = (18 / 20 + 20 / 22) / 2
    result = paired_miou_difference(a, b, block=1, samples=4000, seed=0)
    assert result["delta"] == pytest.approx(100 * (miou_a - miou_b))
    assert result["delta"] < 0 and result["level"] == 0.95 and result["block"] == 1 and result["samples"] == 4000
    # block 1 on 2 frames: resamples {0,0}, {1,1} and twice {0,1}, each 1/4. A wins only on {0,0}
    # (frame 0 twice), so the share is 1/4, and the interval spans A's loss on {1,1} to its win
    assert result["share_a_better"] == pytest.approx(0.25, abs=0.03)
    only_0 = 100 * (mean_iou(2 * a[0]) - mean_iou(2 * b[0]))
    only_1 = 100 * (mean_iou(2 * a[1]) - mean_iou(2 * b[1]))
    assert result["ci"] == pytest.approx([only_1, only_0])


def test_identical_settings_differ_by_nothing():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, size=(30, 4, 4))
    result = paired_miou_difference(a, a.copy(), block=5, samples=500)
    assert result["delta"] == 0.0 and result["ci"] == [0.0, 0.0]
    assert result["share_a_better"] == 0.0 and result["share_b_better"] == 0.0  # all ties


def test_a_setting_better_on_every_frame_wins_every_resample():
    rng = np.random.default_rng(1)
    b = rng.integers(5, 100, size=(40, 3, 3))
    a = b.copy()
    a[:, 0, 0] += 5  # five class-0 pixels that B calls class 1 are right in A, on every frame
    a[:, 0, 1] -= 5
    result = paired_miou_difference(a, b, block=8, samples=500)
    assert result["delta"] > 0 and 0 < result["ci"][0] <= result["delta"] <= result["ci"][1]
    assert result["share_a_better"] == 1.0 and result["share_b_better"] == 0.0 and result["kept"] == 500
    swapped = paired_miou_difference(b, a, block=8, samples=500)
    assert swapped["delta"] == pytest.approx(-result["delta"])
    assert swapped["ci"] == pytest.approx([-result["ci"][1], -result["ci"][0]])
    assert swapped["share_a_better"] == 0.0 and swapped["share_b_better"] == 1.0


def test_longer_blocks_widen_the_interval_of_a_correlated_difference():
    # A wins on the first half of the clip and loses on the second: neighbouring frames agree, so
    # resampling single frames mixes halves more evenly than blocks of ten do
    right, two_wrong = _frame(10, 10, 0), _frame(8, 10, 2)
    a = np.stack([right] * 20 + [two_wrong] * 20)
    b = np.stack([two_wrong] * 20 + [right] * 20)
    narrow = paired_miou_difference(a, b, block=1, samples=2000)
    wide = paired_miou_difference(a, b, block=10, samples=2000)
    assert narrow["delta"] == wide["delta"]
    assert (wide["ci"][1] - wide["ci"][0]) > 1.5 * (narrow["ci"][1] - narrow["ci"][0])


@pytest.mark.parametrize("level", [0.8, 0.95])
def test_the_interval_is_the_percentile_interval_of_resampled_clips(level):
    # reference: score each resample's frames summed one by one (np.add.at-free, quantile by hand)
    rng = np.random.default_rng(2)
    a = rng.integers(0, 60, size=(37, 4, 4))
    b = a.copy()
    moved = rng.integers(0, 10, size=37)
    b[:, 2, 2] -= np.minimum(moved, a[:, 2, 2])  # B misses some class-2 pixels, as class 3
    b[:, 2, 3] += np.minimum(moved, a[:, 2, 2])
    result = paired_miou_difference(a, b, block=4, samples=300, level=level, seed=7)
    ref = np.array([100 * (mean_iou(a[r].sum(0)) - mean_iou(b[r].sum(0)))
                    for r in circular_block_resamples(37, 4, 300, seed=7)])
    tail = (1 - level) / 2
    assert result["ci"] == pytest.approx(list(np.quantile(ref, [tail, 1 - tail])), abs=1e-12)
    assert result["share_a_better"] == np.mean(ref > 0) and result["share_b_better"] == np.mean(ref < 0)
    assert result["blocks"] == 10 and result["kept"] == 300
    # a frame drawn twice counts twice (mIoU is not a per-frame mean)
    assert len({r.tobytes() for r in np.sort(circular_block_resamples(37, 4, 300, seed=7), axis=1)}) > 1


def test_resamples_without_counted_pixels_are_not_kept():
    # three of four frames have no labelled pixel: resamples of those alone have no mIoU
    a = np.zeros((4, 2, 2), dtype=np.int64)
    a[0] = [[5, 1], [0, 4]]
    b = a.copy()
    b[0] = [[4, 2], [0, 4]]
    result = paired_miou_difference(a, b, block=1, samples=2000, seed=0)
    assert 0 < result["kept"] < 2000 and result["kept"] == pytest.approx(2000 * (1 - 0.75 ** 4), rel=0.1)
    assert np.isfinite(result["ci"]).all() and result["share_a_better"] == 1.0


def test_one_class_and_one_frame():
    one_class = np.full((6, 1, 1), 3, dtype=np.int64)  # every pixel right: mIoU 100 for both
    assert paired_miou_difference(one_class, one_class, block=2)["ci"] == [0.0, 0.0]
    one_frame = np.array([[[3, 1], [0, 2]]])
    result = paired_miou_difference(one_frame, one_frame[:, :, ::-1].copy(), block=1)
    assert result["blocks"] == 1 and result["kept"] == 0 and math.isnan(result["share_a_better"])


@pytest.mark.parametrize("block", [6, 10])
def test_a_clip_shorter_than_two_blocks_has_no_interval(block):
    a = np.random.default_rng(3).integers(1, 50, size=(6, 3, 3))
    b = a.copy()
    b[:, 1, 1] -= 1
    b[:, 1, 0] += 1
    result = paired_miou_difference(a, b, block=block)
    assert result["delta"] > 0 and result["blocks"] == 1 and result["kept"] == 0
    assert all(math.isnan(v) for v in result["ci"]) and math.isnan(result["share_a_better"])


def _counts(frames: int = 5, k: int = 3, tp: int = 1, gt: int = 2, pred: int = 2) -> np.ndarray:
    """(frames, 3, k) class counts with the same TP, GT and Pred for every class."""
    out = np.empty((frames, 3, k), dtype=np.int64)
    out[:, 0], out[:, 1], out[:, 2] = tp, gt, pred
    return out


@pytest.mark.parametrize("a, b, kwargs, words", [
    (_counts(), _counts(), {"level": 1.0}, "level must be in"),
    (_counts(), _counts(frames=4), {}, "both be"),
    (_counts(k=3), _counts(k=4), {}, "both be"),
    (np.ones((5, 3, 3), np.int64)[:, :2], np.ones((5, 3, 3), np.int64)[:, :2], {}, "both be"),
    (np.ones((3, 3), np.int64), np.ones((3, 3), np.int64), {}, "both be"),
    (_counts().astype(float), _counts().astype(float), {}, "integers >= 0"),
    (_counts(), _counts().astype(float), {}, "integers >= 0"),  # B's counts checked as well as A's
    (-_counts(), _counts(), {}, "integers >= 0"),
    (_counts(tp=3), _counts(), {}, "setting A's counts are not"),
    (_counts(tp=3, pred=4), _counts(pred=4), {}, "setting A's counts are not"),  # TP_c above GT_c alone
    (_counts(), _counts(tp=2, pred=1), {}, "setting B's counts are not"),
    (_counts(), _counts(gt=3), {}, "not the same frames"),
    (_counts(), _counts(), {"block": 2.5}, "block must be an integer"),
    (_counts(), _counts(), {"block": 0}, "block must be in"),
    (_counts(), _counts(), {"samples": 0}, "samples must be >= 1"),
])
def test_paired_difference_arguments_are_checked(a, b, kwargs, words):
    with pytest.raises(ValueError, match=words):
        paired_difference_of_counts(a, b, **kwargs)


@pytest.mark.parametrize("frames", [11, 12, 19])
def test_a_clip_of_one_block_and_a_few_frames_has_no_interval(frames):
    # L < T < 2L: every resample is a run of L frames (most of the clip) plus a few frames, so it
    # barely differs from the clip; an "interval" from it would claim certainty the clip lacks
    a = np.random.default_rng(4).integers(1, 50, size=(frames, 3, 3))
    b = a.copy()
    b[:, 1, 1] -= 1
    b[:, 1, 0] += 1
    result = paired_miou_difference(a, b, block=10)
    assert result["delta"] > 0 and result["blocks"] == 2 and result["kept"] == 0
    assert all(math.isnan(v) for v in result["ci"]) and math.isnan(result["share_a_better"])
    assert paired_miou_difference(np.concatenate([a, a[:20 - frames]]), np.concatenate([b, b[:20 - frames]]),
                                  block=10)["kept"] == 2000  # two whole blocks: an interval


@pytest.mark.parametrize("a, b", [
    (_counts(), _counts(tp=-1)),           # B's TP negative, every other check holds
    (_counts(tp=-1), _counts()),
    (_counts(), _counts(tp=0, pred=-1)),
])
def test_negative_counts_of_either_setting_are_refused(a, b):
    with pytest.raises(ValueError, match="integers >= 0"):
        paired_difference_of_counts(a, b)


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5, float("nan")])
def test_level_must_be_strictly_between_0_and_1(level):
    # level 0 gave a zero-width "0 % interval" at the median
    with pytest.raises(ValueError, match="level must be in"):
        paired_difference_of_counts(_counts(frames=30), _counts(frames=30), block=5, samples=50, level=level)
