"""Confusion-matrix metrics and VC_n against hand-computed cases (spec sections 4.2-4.3)."""

import math

import numpy as np
import pytest
import torch

from mpvss_ros.evaluation import ConfusionMatrix, VideoConsistency, video_consistency

# Six counted pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,1) (0,3) plus two void pixels
# (CamVid void 11 and 255) whose predictions (even out of range) must be ignored. K = 5.
GT = np.array([[0, 0, 1, 1], [2, 0, 11, 255]])
PRED = np.array([[0, 1, 1, 1], [1, 3, 2, 9]])
# GT_c = [3, 2, 1, 0, 0]; Pred_c = [1, 4, 0, 1, 0]; TP_c = [1, 2, 0, 0, 0]
# IoU = [1/3, 2/4, 0/1, 0/1 (predicted, absent from GT), NaN (never seen)]


@pytest.fixture()
def cm() -> ConfusionMatrix:
    c = ConfusionMatrix(5)
    c.update(PRED, GT)
    return c


def test_counts_ignore_void(cm):
    np.testing.assert_array_equal(cm.gt_pixels, [3, 2, 1, 0, 0])
    np.testing.assert_array_equal(cm.pred_pixels, [1, 4, 0, 1, 0])
    np.testing.assert_array_equal(cm.true_positives, [1, 2, 0, 0, 0])
    assert cm.mat.sum() == 6


def test_iou_and_miou_detectron2_convention(cm):
    iou = cm.iou()
    np.testing.assert_allclose(iou[:4], [1 / 3, 0.5, 0.0, 0.0])
    assert math.isnan(iou[4])
    # Class 3 is predicted but absent from GT: counts as 0; class 4 (never seen) is left out.
    assert cm.miou() == pytest.approx((1 / 3 + 0.5 + 0 + 0) / 4)


def test_fwiou_pacc_macc(cm):
    # fwIoU = 3/6 * 1/3 + 2/6 * 1/2 + 1/6 * 0 = 1/3
    assert cm.fwiou() == pytest.approx(1 / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 6)
    assert cm.mean_accuracy() == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_fwiou_second_hand_case():
    c = ConfusionMatrix(2)
    # 3 pixels of class 0, all right; 1 pixel of class 1 predicted as 0.
    c.update(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1]))
    # IoU0 = 3 / (3 + 4 - 3) = 0.75, IoU1 = 0; fwIoU = 3/4 * 0.75 + 1/4 * 0
    assert c.fwiou() == pytest.approx(0.5625)
    assert c.miou() == pytest.approx(0.375)


def test_torch_inputs_accumulate_and_merge(cm):
    c2 = ConfusionMatrix(5)
    c2.update(torch.from_numpy(PRED), torch.from_numpy(GT))
    c2.update(PRED, GT)
    np.testing.assert_array_equal(c2.mat, 2 * cm.mat)
    cm.merge(c2)
    np.testing.assert_array_equal(cm.mat, 3 * c2.mat // 2)
    assert cm.miou() == pytest.approx((1 / 3 + 0.5) / 4)  # ratios unchanged


def test_summary_percent_and_none(cm):
    s = cm.summary(["a", "b", "c", "d", "e"])
    assert s["mIoU"] == pytest.approx(100 * (1 / 3 + 0.5) / 4, abs=1e-3)
    assert s["fwIoU"] == pytest.approx(100 / 3, abs=1e-3)
    assert s["IoU"]["e"] is None and s["IoU"]["d"] == 0.0
    assert s["pixels"] == 6
    with pytest.raises(ValueError):
        cm.summary(["a"])


def test_errors_and_empty():
    c = ConfusionMatrix(3)
    assert math.isnan(c.miou()) and math.isnan(c.fwiou()) and math.isnan(c.pixel_accuracy())
    with pytest.raises(ValueError, match="predictions"):
        c.update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        c.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="integers"):
        c.update(np.zeros(2, np.float32), np.zeros(2, int))
    c.update(np.array([0, 7]), np.array([11, 255]))  # all void: nothing counted, no error
    assert c.mat.sum() == 0
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)


def test_reset_zeroes_the_counts():
    c = ConfusionMatrix(2)
    c.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    c.reset()
    assert c.mat.sum() == 0 and math.isnan(c.miou())
    c.update(np.array([1]), np.array([1]))
    np.testing.assert_array_equal(c.mat, [[0, 0], [0, 1]])


def test_ignore_index_inside_the_class_range():
    # ignore_index may be a class id (a dataset whose 0 means "unlabelled"): those pixels count for
    # no class, whatever was predicted on them.
    c = ConfusionMatrix(3, ignore_index=0)
    c.update(np.array([0, 1, 2, 2, 1]), np.array([0, 1, 2, 0, 0]))
    np.testing.assert_array_equal(c.mat, np.diag([0, 1, 1]))
    assert c.miou() == pytest.approx(1.0) and c.pixel_accuracy() == pytest.approx(1.0)


def test_negative_ground_truth_and_k_are_ignored():
    # -1 (a common void value) and K (CamVid's void 11 with its 11 classes) are outside 0..K-1:
    # ignored like 255, whatever was predicted there, not an error.
    c = ConfusionMatrix(3)
    c.update(np.array([[0, 1, 2], [2, 1, 3]]), np.array([[-1, 1, 3], [2, -5, 3]]))
    np.testing.assert_array_equal(c.mat, np.diag([0, 1, 1]))


# VC_n hand case: 4 frames of 1x4 pixels.
VC_GTS = [np.array([[0, 0, 1, 11]]), np.array([[0, 1, 1, 11]]), np.array([[0, 1, 1, 2]]), np.array([[0, 1, 1, 2]])]
VC_PREDS = [np.array([[3, 3, 3, 3]]), np.array([[3, 3, 4, 3]]), np.array([[3, 3, 4, 4]]), np.array([[0, 0, 0, 0]])]


def test_vc_hand_case():
    # n=2, windows i in range(4-2) = {0, 1}; the window (2, 3) is skipped as in VC_perclip.
    # i=0: G = [T, F, T, T] (void 11 is kept raw), P = [T, T, F, T] -> |G&P| / |G| = 2/3
    # i=1: G = [T, T, T, F], P = [T, T, T, F] -> 3/3
    assert video_consistency(VC_PREDS, VC_GTS, 2) == pytest.approx((2 / 3 + 1) / 2)
    # n=3: one window (frames 0..2): G = [T, F, T, F], P = [T, T, F, F] -> 1/2
    assert video_consistency(VC_PREDS, VC_GTS, 3) == pytest.approx(0.5)
    assert math.isnan(video_consistency(VC_PREDS, VC_GTS, 4))  # len <= n: no window
    # 255 is compared raw like any label (VC_perclip), not as "any class": a pixel going 255 -> 3
    # is not ground-truth-consistent. One window: G = [F, T], P = [F, T] -> 1/1 (1/2 with a wildcard)
    gts = [np.array([[255, 1]]), np.array([[3, 1]]), np.array([[3, 1]])]
    assert video_consistency([np.array([[0, 0]]), np.array([[5, 0]]), np.array([[5, 0]])], gts, 2) == 1.0


def test_vc_nan_window_and_streaming_across_clips():
    # A window whose GT changes everywhere has |G| = 0: NaN, ignored by the nanmean.
    gts = [np.array([[0, 1]]), np.array([[1, 0]]), np.array([[1, 0]])]
    preds = [np.zeros((1, 2), int)] * 3
    assert video_consistency(preds, gts, 2) == pytest.approx(float("nan"), nan_ok=True)
    vc = VideoConsistency(2)
    for p, g in zip(VC_PREDS, VC_GTS):
        vc.update(torch.from_numpy(p), g)
    vc.end_clip()
    for p, g in zip(preds, gts):
        vc.update(p, g)
    vc.end_clip()
    # windows: 2/3, 1 (clip 1); NaN, (skipped) (clip 2) -> window-weighted nanmean
    assert len(vc.window_acc) == 3
    assert vc.value() == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError):
        video_consistency(VC_PREDS, VC_GTS[:2], 2)
    with pytest.raises(ValueError):
        VideoConsistency(1)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_video_consistency_keeps_its_own_copies_of_the_frames(as_tensor):
    """A caller writing every frame into one int64 buffer (or one CPU tensor): the frames kept for
    later windows were that buffer, so predictions that change on every frame scored VC 1.0."""
    gt = np.zeros((4, 4), np.int64)
    pred = torch.zeros((4, 4), dtype=torch.int64) if as_tensor else np.zeros((4, 4), np.int64)
    vc = VideoConsistency(2)
    for t in range(5):
        pred[...] = t % 2  # alternates: never consistent over two frames
        vc.update(pred, gt)
    assert vc.value() == 0.0
    vc = VideoConsistency(2)  # the ground truth in one buffer, another label on every frame: G is empty
    for t in range(4):
        gt[...] = t
        vc.update(pred, gt)
    assert len(vc.window_acc) == 2 and math.isnan(vc.value())


def test_mean_accuracy_counts_the_last_class_and_refuses_negative_predictions():
    # GT [0, 1, 2, 2], pred [0, 1, 2, 1]: recalls 1, 1, 1/2 -> mACC 5/6 (the last class included)
    c = ConfusionMatrix(3)
    c.update(np.array([0, 1, 2, 1]), np.array([0, 1, 2, 2]))
    assert c.mean_accuracy() == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="predictions"):
        c.update(np.array([-1, 0]), np.array([0, 0]))  # a negative class ID on a counted pixel


def test_video_consistency_streams_every_window_and_refuses_a_size_change():
    vc = VideoConsistency(2)
    for p, g in zip(VC_PREDS, VC_GTS):
        vc.update(p, g)
    assert vc.window_acc == pytest.approx([2 / 3, 1.0])
    assert vc.value() == pytest.approx((2 / 3 + 1) / 2)  # the last window counts too
    with pytest.raises(ValueError, match="differs from the clip.s"):
        vc.update(np.zeros((2, 4), int), np.zeros((2, 4), int))  # same clip, another size
    vc.end_clip()
    vc.update(np.zeros((2, 4), int), np.zeros((2, 4), int))  # a new clip may have its own size
