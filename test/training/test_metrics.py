"""Confusion-matrix metrics and VC_n against hand-computed cases (spec sections 4.2-4.3)."""

import contextlib
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvss_ros.evaluation import ConfusionMatrix, VideoConsistency, video_consistency
from mpvss_ros.evaluation.metrics import class_counts, iou_from_counts, iou_of, mean_iou, mean_iou_from_counts

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
    cm.merge(ConfusionMatrix(5, ignore_index=11))  # both ignore by range alone: the same pixels counted
    with pytest.raises(ValueError, match="ignores ground truth 2 into one that ignores 255"):
        cm.merge(ConfusionMatrix(5, ignore_index=2))  # class 2 is counted in one and not in the other
    np.testing.assert_array_equal(cm.mat, 3 * c2.mat // 2)


def test_summary_percent_and_none(cm):
    s = cm.summary(["a", "b", "c", "d", "e"])
    assert s["mIoU"] == pytest.approx(100 * (1 / 3 + 0.5) / 4, abs=1e-3)
    assert s["fwIoU"] == pytest.approx(100 / 3, abs=1e-3)
    assert s["IoU"]["e"] is None and s["IoU"]["d"] == 0.0
    assert s["pixels"] == 6
    with pytest.raises(ValueError):
        cm.summary(["a"])
    with pytest.raises(ValueError, match="class names must differ"):  # "a" twice: one IoU entry lost
        cm.summary(["a", "b", "c", "d", "a"])


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


# ------------------------------------------------ property-based: brute-force references
# Random label maps (1x1 to 16x20) of every integer width, numpy or torch, contiguous or strided views,
# random K and ignore index, void / negative / out-of-range values; the references below are written
# from the module docstring's definitions with Python ints and exact fractions.

_LABEL_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool", ">i2", ">i8", ">u4"]
_TORCH_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
                 "uint8": torch.uint8, "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64,
                 "bool": torch.bool}
_CONTAINERS = ["numpy", "numpy_strided", "numpy_transposed", "numpy_reversed", "torch", "torch_strided",
               "torch_transposed"]


def _label_input(values: np.ndarray, dtype: str, container: str):
    """``values`` cast (wrapping) to ``dtype``, as a numpy array or a tensor, possibly a non-contiguous view
    (torch for the dtypes it has). Returns the input and the raw values it holds as Python ints."""
    base = values.astype(np.dtype(dtype))
    raw = np.vectorize(int, otypes=[object])(base)
    if container.startswith("torch") and dtype not in _TORCH_DTYPES:
        container = "numpy" + container[len("torch"):]
    wrap = torch.from_numpy if container.startswith("torch") else np.asarray
    if container.endswith("strided"):
        big = np.zeros((2 * base.shape[0], 2 * base.shape[1] + 1), dtype=base.dtype)
        big[::2, 1::2] = base
        return wrap(big)[::2, 1::2], raw
    if container.endswith("transposed"):
        return wrap(np.ascontiguousarray(base.T)).T, raw
    if container.endswith("reversed"):  # numpy only: torch has no negative strides
        return np.ascontiguousarray(base[::-1, ::-1])[::-1, ::-1], raw
    return wrap(base), raw


def _snapshot(x):
    """A copy of an input, to check afterwards that it was not written."""
    return x.clone() if isinstance(x, torch.Tensor) else x.copy()


def _unchanged(x, snap) -> bool:
    """``x`` still holds the values and dtype of its snapshot."""
    if isinstance(x, torch.Tensor):
        return x.dtype == snap.dtype and torch.equal(x, snap)
    return x.dtype == snap.dtype and np.array_equal(x, snap)


def _close(value, ref) -> bool:
    """``value`` equals ``ref`` (a Fraction, or None / NaN for NaN) to 1e-12."""
    if ref is None or (isinstance(ref, float) and math.isnan(ref)):
        return math.isnan(value)
    return abs(float(value) - float(ref)) <= 1e-12


@st.composite
def _update_inputs(draw, k: int, ignore_index: int):
    """One update's (pred, pred raw, gt, gt raw, kind): a good frame, one with out-of-range predictions
    (on void pixels, or on counted ones: an error), a float input or a pred/gt shape mismatch."""
    h, w = draw(st.integers(1, 16)), draw(st.integers(1, 20))
    kind = draw(st.sampled_from(["good", "good", "good", "wild_pred", "float", "shape"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pool = np.array([-3, -1, k, k + 1, 11, 255, 256, 2**31 - 1, -(2**40),
                     ignore_index if -(2**63) <= ignore_index < 2**63 else 0], dtype=np.int64)
    gt = rng.integers(0, k, size=(h, w))
    gt = np.where(rng.random((h, w)) < draw(st.sampled_from([0.0, 0.2, 0.7, 1.0])), rng.choice(pool, (h, w)), gt)
    hit = rng.random((h, w)) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    pred = np.where(hit, np.clip(gt, 0, k - 1), rng.integers(0, k, size=(h, w)))
    if kind == "wild_pred":
        wild = rng.random((h, w)) < draw(st.sampled_from([0.05, 0.3, 1.0]))
        pred = np.where(wild, rng.choice(draw(st.sampled_from([pool, pool[pool < 0], pool[pool >= k]])), (h, w)), pred)
    p_in, p_raw = _label_input(pred, draw(st.sampled_from(_LABEL_DTYPES)), draw(st.sampled_from(_CONTAINERS)))
    g_in, g_raw = _label_input(gt, draw(st.sampled_from(_LABEL_DTYPES)), draw(st.sampled_from(_CONTAINERS)))
    if kind == "float":
        if draw(st.booleans()):
            p_in = p_in.double() if isinstance(p_in, torch.Tensor) else p_in.astype(np.float32)
        else:
            g_in = g_in.float() if isinstance(g_in, torch.Tensor) else g_in.astype(np.float64)
    elif kind == "shape":  # one column short, or an extra leading dimension
        p_in = p_in[:, :-1] if w > 1 and draw(st.booleans()) else p_in[None]
    return p_in, p_raw, g_in, g_raw, kind


def _reference_matrix(p_raw: np.ndarray, g_raw: np.ndarray, k: int, ignore_index: int):
    """One frame's ``mat[gt][pred]`` from the definitions, or None where a counted pixel (GT in 0..K-1,
    not the ignore index) has a prediction outside 0..K-1 (a ValueError)."""
    mat = [[0] * k for _ in range(k)]
    for g, p in zip(g_raw.ravel().tolist(), p_raw.ravel().tolist()):
        if not 0 <= g < k or g == ignore_index:
            continue
        if not 0 <= p < k:
            return None
        mat[g][p] += 1
    return mat


def _reference_scores(mat: list[list[int]]) -> dict:
    """TP, GT, Pred, IoU, mIoU (detectron2: over classes with GT_c + Pred_c > 0), fwIoU (GT-frequency
    weights), pACC, recall and mACC of a matrix, as exact fractions; None stands for NaN."""
    k = len(mat)
    tp = [mat[c][c] for c in range(k)]
    gt = [sum(mat[c]) for c in range(k)]
    pred = [sum(row[c] for row in mat) for c in range(k)]
    iou = [Fraction(tp[c], gt[c] + pred[c] - tp[c]) if gt[c] + pred[c] else None for c in range(k)]
    present = [v for v in iou if v is not None]
    total = sum(gt)
    recall = [Fraction(tp[c], gt[c]) if gt[c] else None for c in range(k)]
    seen = [v for v in recall if v is not None]
    return {"tp": tp, "gt": gt, "pred": pred, "iou": iou, "recall": recall,
            "miou": sum(present) / len(present) if present else None,
            "fwiou": sum(Fraction(gt[c], total) * iou[c] for c in range(k) if gt[c]) if total else None,
            "pacc": Fraction(sum(tp), total) if total else None,
            "macc": sum(seen) / len(seen) if seen else None}


def _assert_matches_reference(c: ConfusionMatrix, mat: list[list[int]]) -> None:
    """Every count (exactly) and score (to 1e-12; the summary in percent to its 4 decimals) of ``c``
    equals the reference of ``mat``."""
    ref = _reference_scores(mat)
    assert c.mat.dtype == np.int64 and c.mat.tolist() == mat
    assert (c.true_positives.tolist(), c.gt_pixels.tolist(), c.pred_pixels.tolist()) == (ref["tp"], ref["gt"], ref["pred"])
    assert all(map(_close, c.iou(), ref["iou"])) and all(map(_close, c.class_accuracy(), ref["recall"]))
    for key, value in [("miou", c.miou()), ("fwiou", c.fwiou()), ("pacc", c.pixel_accuracy()), ("macc", c.mean_accuracy())]:
        assert _close(value, ref[key]), (key, value, ref[key])
    s = c.summary()
    assert list(s["IoU"]) == [f"class_{i}" for i in range(c.num_classes)]
    for got, r in zip([s["mIoU"], s["fwIoU"], s["pACC"], s["mACC"], *s["IoU"].values()],
                      [ref["miou"], ref["fwiou"], ref["pacc"], ref["macc"], *ref["iou"]]):
        assert got is None if r is None else abs(got - 100 * float(r)) <= 5e-5 + 1e-9, (got, r)
    assert s["pixels"] == sum(ref["gt"]) and s["num_classes"] == c.num_classes


@settings(max_examples=200, deadline=None)
@given(data=st.data(), k=st.integers(1, 8), n_frames=st.integers(0, 6), n_batches=st.integers(1, 3))
def test_confusion_matrix_equals_the_reference_in_any_order_and_batching(data, k, n_frames, n_batches):
    """Updates in a shuffled order, and the same frames streamed into batches then merged in any order,
    give the reference counts and scores; a bad frame (a counted pixel's prediction outside 0..K-1, a
    float dtype, a shape mismatch) is refused with its ValueError and adds nothing; inputs are never
    written; the stacked functions agree frame by frame and their counts sum over frames."""
    ignore_index = data.draw(st.one_of(st.integers(-3, k + 2), st.just(255), st.integers(-(2**70), 2**70)))
    frames = [data.draw(_update_inputs(k, ignore_index)) for _ in range(n_frames)]
    snaps = [(_snapshot(p), _snapshot(g)) for p, _, g, _, _ in frames]
    batch_of = [data.draw(st.integers(0, n_batches - 1)) for _ in frames]
    one_shot, batches = ConfusionMatrix(k, ignore_index), [ConfusionMatrix(k, ignore_index) for _ in range(n_batches)]
    total, per_frame = [[0] * k for _ in range(k)], []
    for i in data.draw(st.permutations(range(n_frames))):
        p_in, p_raw, g_in, g_raw, kind = frames[i]
        mat = None if kind in ("float", "shape") else _reference_matrix(p_raw, g_raw, k, ignore_index)
        if mat is None:
            before = one_shot.mat.copy()
            with pytest.raises(ValueError, match={"float": "integers", "shape": "shape"}.get(kind, "predictions")):
                one_shot.update(p_in, g_in)
            np.testing.assert_array_equal(one_shot.mat, before)
            continue
        one_shot.update(p_in, g_in)
        per_frame.append(mat)
        total = [[a + b for a, b in zip(r1, r2)] for r1, r2 in zip(total, mat)]
        _assert_matches_reference(one_shot, total)
    for (p_in, _, g_in, _, _), batch in zip(frames, batch_of):  # a wrong refusal shows in the merged counts
        with contextlib.suppress(ValueError):
            batches[batch].update(p_in, g_in)
    for (p_in, _, g_in, _, _), (p_snap, g_snap) in zip(frames, snaps):
        assert _unchanged(p_in, p_snap) and _unchanged(g_in, g_snap)
    merged = ConfusionMatrix(k, ignore_index)
    for j in data.draw(st.permutations(range(n_batches))):
        merged.merge(batches[j])
    _assert_matches_reference(merged, total)
    with pytest.raises(ValueError, match="merge"):
        merged.merge(ConfusionMatrix(k + 1))
    _assert_matches_reference(merged, total)

    stack = np.array(per_frame, dtype=np.int64).reshape(len(per_frame), k, k)
    counts = class_counts(stack)
    assert counts.shape == (len(per_frame), 3, k)
    for mat, cnt, iou, miou in zip(per_frame, counts, iou_of(stack), mean_iou(stack)):
        ref = _reference_scores(mat)
        assert cnt.tolist() == [ref["tp"], ref["gt"], ref["pred"]]
        assert all(map(_close, iou, ref["iou"])) and _close(miou, ref["miou"])
    np.testing.assert_array_equal(counts.sum(0), class_counts(one_shot.mat))
    np.testing.assert_array_equal(iou_from_counts(counts), iou_of(stack))
    assert _close(mean_iou_from_counts(counts.sum(0)), _reference_scores(total)["miou"])


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 4), max_size=4), k=st.integers(-3, 0))
def test_metric_functions_and_constructors_refuse_bad_arguments_with_a_value_error(shape, k):
    """Matrices not (..., K, K), counts not (..., 3, K), K < 1 and a VC window n < 2 are ValueErrors."""
    arr = np.zeros(shape, dtype=np.int64)
    if len(shape) < 2 or shape[-1] != shape[-2]:
        for fn in (class_counts, iou_of, mean_iou):
            with pytest.raises(ValueError, match="K, K"):
                fn(arr)
    if len(shape) < 2 or shape[-2] != 3:
        for fn in (iou_from_counts, mean_iou_from_counts):
            with pytest.raises(ValueError, match="3, K"):
                fn(arr)
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(k)
    with pytest.raises(ValueError, match="VC window"):
        VideoConsistency(k + 1)


def _reference_windows(frames: list[tuple[np.ndarray, np.ndarray]], n: int) -> list:
    """VC_perclip's acc_i = |G ∩ P| / |G| for i in range(T - n) from the raw values (None for |G| = 0)."""
    out = []
    for i in range(len(frames) - n):
        window = frames[i: i + n]
        p0, g0 = window[0]
        g_same = np.logical_and.reduce([g == g0 for _, g in window])
        p_same = np.logical_and.reduce([p == p0 for p, _ in window])
        out.append(Fraction(int((g_same & p_same).sum()), int(g_same.sum())) if g_same.any() else None)
    return out


def _reference_vc(windows: list):
    """The NaN-mean of window accuracies (None for NaN)."""
    valid = [w for w in windows if w is not None]
    return sum(valid) / len(valid) if valid else None


@st.composite
def _vc_clip(draw):
    """A clip of one size whose labels (void and 255 included) change at a random rate, with bad frames
    (another size, pred/gt shapes differing, a float dtype) between the good ones, and whether the caller
    writes every good frame into one buffer."""
    h, w = draw(st.integers(1, 16)), draw(st.integers(1, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rate, values = draw(st.sampled_from([0.0, 0.02, 0.2, 1.0])), draw(st.sampled_from([2, 4]))
    pool = np.array([0, 1, 11, 255, -1], dtype=np.int64)
    p, g = rng.integers(0, values, (h, w)), rng.choice(pool, (h, w))
    steps = []
    for kind in draw(st.lists(st.sampled_from(["good"] * 5 + ["resize", "mismatch", "float"]), max_size=10)):
        if kind == "good":
            p = np.where(rng.random((h, w)) < rate, rng.integers(0, values, (h, w)), p)
            g = np.where(rng.random((h, w)) < rate, rng.choice(pool, (h, w)), g)
            g_dtype = draw(st.sampled_from(["int8", "int64", "uint64"]) | st.sampled_from(_LABEL_DTYPES))
            steps.append((kind, *_label_input(p, draw(st.sampled_from(_LABEL_DTYPES)), draw(st.sampled_from(_CONTAINERS))),
                          *_label_input(g, g_dtype, draw(st.sampled_from(_CONTAINERS)))))
        elif kind == "resize":
            hh, ww = draw(st.tuples(st.integers(1, 16), st.integers(1, 20)).filter(lambda s: s != (h, w)))
            steps.append((kind, np.zeros((hh, ww), np.int64), None, np.zeros((hh, ww), np.uint8), None))
        elif kind == "mismatch":
            steps.append((kind, np.zeros((h, w), np.int64), None, np.zeros((h + 1, w), np.int64), None))
        else:
            steps.append((kind, np.zeros((h, w), np.float32), None, np.zeros((h, w), np.int64), None))
    return steps, draw(st.booleans())


def _same_windows(values: list, ref: list) -> bool:
    """Window accuracies equal (to 1e-12, NaN for NaN)."""
    return len(values) == len(ref) and all(map(_close, values, ref))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 5), clips=st.lists(_vc_clip(), min_size=1, max_size=3))
def test_video_consistency_equals_the_reference_windows_after_every_frame(n, clips):
    """Streaming VC_n holds the reference window accuracies (raw GT compared as is, NaN windows, the
    window ending on the clip's last frame skipped) after every frame; a refused frame (another size in
    the clip, pred/gt shapes differing, a float dtype, a uint64 value past int64) changes nothing; inputs are never written and a
    reused buffer is copied; clips in reverse order give the same value, and video_consistency of one
    clip its reference."""
    vc, expected, replay = VideoConsistency(n), [], []
    for steps, reuse_buffer in clips:
        good, inputs, p_buf, g_buf = [], [], None, None
        for kind, p_in, p_raw, g_in, g_raw in steps:
            before = list(vc.window_acc)
            if kind == "resize" and not good:  # a clip's first frame may have any size
                continue
            if kind != "good":
                match = {"resize": "differs from the clip", "mismatch": "differs from gt", "float": "integers"}[kind]
                with pytest.raises(ValueError, match=match):
                    vc.update(p_in, g_in)
                assert _same_windows(vc.window_acc, before)
                continue
            if any(v >= 2**63 for v in [*p_raw.ravel().tolist(), *g_raw.ravel().tolist()]):
                # a uint64 of 2**63 or more would wrap to a negative int64 and compare equal to it
                with pytest.raises(ValueError, match="past int64's range"):
                    vc.update(p_in, g_in)
                assert _same_windows(vc.window_acc, before)
                continue
            if reuse_buffer and all(-(2**63) <= v < 2**63 for v in [*p_raw.ravel(), *g_raw.ravel()]):
                if p_buf is None:
                    p_buf, g_buf = torch.zeros(p_raw.shape, dtype=torch.int64), np.zeros(g_raw.shape, np.int64)
                p_buf[...] = torch.from_numpy(p_raw.astype(np.int64))
                g_buf[...] = g_raw.astype(np.int64)
                p_in, g_in = p_buf, g_buf
            snap = (_snapshot(p_in), _snapshot(g_in))
            vc.update(p_in, g_in)
            assert _unchanged(p_in, snap[0]) and _unchanged(g_in, snap[1])
            good.append((p_raw, g_raw))
            inputs.append(snap)
            ref = expected + _reference_windows(good, n)
            assert _same_windows(vc.window_acc, ref), (vc.window_acc, ref)
            assert _close(vc.value(), _reference_vc(ref))
        vc.end_clip()
        expected += _reference_windows(good, n)
        replay.append((good, inputs))
    assert _close(vc.value(), _reference_vc(expected))
    reverse = VideoConsistency(n)
    for good, inputs in reversed(replay):
        for p, g in inputs:
            reverse.update(p, g)
        reverse.end_clip()
        preds, gts = [p for p, _ in inputs], [g for _, g in inputs]
        assert _close(video_consistency(preds, gts, n), _reference_vc(_reference_windows(good, n)))
        if inputs:
            with pytest.raises(ValueError, match="ground-truth frames"):
                video_consistency(preds, gts[:-1], n)
    assert _close(reverse.value(), _reference_vc(expected))
