"""Segmentation metrics: confusion-matrix IoU scores and VSPW video consistency.

Spec: ``docs/mpvss_architecture.md`` section 4.2 (mIoU, fwIoU, pixel accuracy as in the VSPW /
detectron2 semantic-segmentation evaluator) and section 4.3 (VC_n as in VSPW's
``VC_perclip.py``). Everything is computed with numpy in int64 / float64; inputs may be numpy
arrays or torch tensors (moved to the CPU).

Conventions:

* Ground truth values outside ``0..K-1`` (CamVid void 11, the ``ignore_index`` 255, ...) are
  ignored: those pixels enter neither GT_c nor Pred_c.
* ``IoU_c = TP_c / (GT_c + Pred_c - TP_c)``, NaN when ``GT_c + Pred_c == 0``.
* ``mIoU`` = mean of IoU_c over the classes with ``GT_c + Pred_c > 0`` (detectron2): a class
  that is predicted but absent from the ground truth counts as 0.
* ``fwIoU = sum_c (GT_c / sum_c' GT_c') * IoU_c``.
* All scores returned by the methods are fractions in [0, 1]; :meth:`ConfusionMatrix.summary`
  reports percent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import MAX_CLASSES, default_class_names
from ..values import is_integer, shown

__all__ = ["IGNORE_INDEX", "ConfusionMatrix", "VideoConsistency", "class_counts", "iou_from_counts", "iou_of", "mean_iou",
           "mean_iou_from_counts", "video_consistency"]


#: Label value of pixels that are not scored or trained on (ground truth, training targets,
#: low-confidence pseudo-labels); CamVid's void class K = 11 is ignored by range as well.
IGNORE_INDEX = 255
#: Longest VC window (frames); VSPW uses 8 and 16. n + 1 frames are held in memory.
MAX_VC_WINDOW = 4096
_INT64_MAX = np.iinfo(np.int64).max


def _as_int_array(x: Any, name: str, exact: bool = False) -> np.ndarray:
    """numpy int64 view of an array-like or a torch tensor (detached, on the CPU).

    A uint64 value past int64's range wraps to a negative one, which :class:`ConfusionMatrix`
    ignores (ground truth) or refuses (predictions) as it does any negative value; with ``exact``
    (values compared as they are, VC_n) it is refused instead.

    Raises:
        ValueError: not integers; with ``exact``, a value past int64's range.
    """
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if exact and arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and arr.max() > _INT64_MAX:
        raise ValueError(f"{name} holds {arr.max()}, past int64's range: label values are compared as int64")
    return arr.astype(np.int64, copy=False)


def class_counts(mat: np.ndarray) -> np.ndarray:
    """The per-class pixel counts IoU needs, of one confusion matrix or of a stack of them.

    A (K, K) matrix per frame grows with the square of the classes (12 MB for 124 classes over 101
    frames); these counts are all that IoU, mIoU and fwIoU use, and sum over frames as the
    matrices do.

    Args:
        mat: (..., K, K) integer pixel counts ``mat[..., gt, pred]``.

    Returns:
        (..., 3, K) of ``mat``'s dtype (int64 for a :class:`ConfusionMatrix`): ``[..., 0, c]`` = TP_c,
        ``[..., 1, c]`` = GT_c, ``[..., 2, c]`` = Pred_c.

    Raises:
        ValueError: ``mat`` is not (..., K, K).
    """
    mat = np.asarray(mat)
    if mat.ndim < 2 or mat.shape[-1] != mat.shape[-2]:
        raise ValueError(f"confusion matrices must be (..., K, K), got shape {mat.shape}")
    return np.stack([np.diagonal(mat, axis1=-2, axis2=-1), mat.sum(axis=-1), mat.sum(axis=-2)], axis=-2)


def iou_from_counts(counts: np.ndarray) -> np.ndarray:
    """Per-class IoU from :func:`class_counts`.

    Args:
        counts: (..., 3, K) pixel counts TP, GT, Pred per class.

    Returns:
        (..., K) float64 ``IoU_c = TP_c / (GT_c + Pred_c - TP_c)``; NaN where ``GT_c + Pred_c == 0``.

    Raises:
        ValueError: ``counts`` is not (..., 3, K).
    """
    counts = np.asarray(counts)
    if counts.ndim < 2 or counts.shape[-2] != 3:
        raise ValueError(f"class counts must be (..., 3, K) (TP, GT, Pred), got shape {counts.shape}")
    tp, gt, pred = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    union = gt + pred - tp
    out = np.full(union.shape, np.nan)
    np.divide(tp.astype(np.float64), union, out=out, where=union > 0)
    return out


def mean_iou_from_counts(counts: np.ndarray) -> np.ndarray:
    """mIoU from :func:`class_counts`: the mean of :func:`iou_from_counts` over the classes with
    ``GT_c + Pred_c > 0`` (detectron2; a class predicted but absent from the ground truth counts
    as 0).

    Args:
        counts: (..., 3, K) pixel counts TP, GT, Pred per class.

    Returns:
        (...) float64 fraction in [0, 1]; NaN where no pixel is counted.

    Raises:
        ValueError: ``counts`` is not (..., 3, K).
    """
    iou = iou_from_counts(counts)
    present = np.isfinite(iou)
    count = present.sum(axis=-1)
    total = np.where(present, iou, 0.0).sum(axis=-1)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def iou_of(mat: np.ndarray) -> np.ndarray:
    """Per-class IoU of one confusion matrix or of a stack of them (:func:`iou_from_counts`).

    Args:
        mat: (..., K, K) integer pixel counts ``mat[..., gt, pred]``.

    Returns:
        (..., K) float64 ``IoU_c = TP_c / (GT_c + Pred_c - TP_c)``; NaN where ``GT_c + Pred_c == 0``.

    Raises:
        ValueError: ``mat`` is not (..., K, K).
    """
    return iou_from_counts(class_counts(mat))


def mean_iou(mat: np.ndarray) -> np.ndarray:
    """mIoU of one confusion matrix or of a stack of them (:func:`mean_iou_from_counts`).

    Args:
        mat: (..., K, K) integer pixel counts ``mat[..., gt, pred]``.

    Returns:
        (...) float64 fraction in [0, 1]; NaN for a matrix without a counted pixel.

    Raises:
        ValueError: ``mat`` is not (..., K, K).
    """
    return mean_iou_from_counts(class_counts(mat))


class ConfusionMatrix:
    """Accumulates a K x K confusion matrix ``mat[gt, pred]`` of pixel counts (int64); mIoU,
    fwIoU, pACC and mACC as the VSPW / detectron2 evaluator (spec §4.2).

    Args:
        num_classes: K >= 1.
        ignore_index: a ground-truth label that is ignored. Any other GT value outside
            ``0..K-1`` is ignored too, so the raw CamVid void label 11 needs no remapping.

    Raises:
        ValueError: ``num_classes`` not an integer in 1..:data:`~mpvss_ros.config.MAX_CLASSES` (a
            K x K matrix is allocated), or ``ignore_index`` not an integer.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if not (is_integer(num_classes) and 1 <= num_classes <= MAX_CLASSES):
            raise ValueError(f"num_classes must be an integer in 1..{MAX_CLASSES}, got {shown(num_classes)}")
        if not is_integer(ignore_index):
            raise ValueError(f"ignore_index must be an integer, got {shown(ignore_index)}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        """Set all counts to zero."""
        self.mat[:] = 0

    def update(self, pred: Any, gt: Any) -> None:
        """Add one image (or any batch of pixels of the same shape).

        Args:
            pred: (H, W) (or any shape) integer class ids in ``0..K-1``; numpy or torch.
            gt: same shape, integer labels; values outside ``0..K-1`` are ignored.

        Raises:
            ValueError: shapes differ, non-integer dtype, or a prediction outside ``0..K-1``
                on a pixel that is not ignored.
        """
        p = _as_int_array(pred, "pred")
        g = _as_int_array(gt, "gt")
        if p.shape != g.shape:
            raise ValueError(f"pred shape {p.shape} differs from gt shape {g.shape}")
        k = self.num_classes
        valid = (g >= 0) & (g < k) & (g != self.ignore_index)
        p = p[valid]
        g = g[valid]
        if p.size and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"predictions must be in 0..{k - 1}, got values in {p.min()}..{p.max()}")
        self.mat += np.bincount(g * k + p, minlength=k * k).reshape(k, k)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of another matrix with the same number of classes and the same ignored
        ground truth (the two ``ignore_index`` may differ only where neither is a class: outside
        ``0..K-1`` both ignore nothing that the range does not).

        Raises:
            ValueError: different ``num_classes``; different ``ignore_index`` of which one is a class.
        """
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class matrix into {self.num_classes}-class one")
        k = self.num_classes
        if other.ignore_index != self.ignore_index and (0 <= other.ignore_index < k or 0 <= self.ignore_index < k):
            raise ValueError(f"cannot merge a matrix that ignores ground truth {other.ignore_index} into one that "
                             f"ignores {self.ignore_index} (of {k} classes): they count different pixels")
        self.mat += other.mat

    # -- per-class counts --------------------------------------------------------------------
    @property
    def gt_pixels(self) -> np.ndarray:
        """(K,) int64 GT_c: pixels whose (non-ignored) ground truth is c."""
        return self.mat.sum(axis=1)

    @property
    def pred_pixels(self) -> np.ndarray:
        """(K,) int64 Pred_c: non-ignored pixels predicted as c."""
        return self.mat.sum(axis=0)

    @property
    def true_positives(self) -> np.ndarray:
        """(K,) int64 TP_c."""
        return np.diag(self.mat).copy()

    # -- scores ------------------------------------------------------------------------------
    def iou(self) -> np.ndarray:
        """(K,) float64 IoU_c = TP / (GT + Pred - TP); NaN where GT_c + Pred_c == 0 (:func:`iou_of`)."""
        return iou_of(self.mat)

    def miou(self) -> float:
        """Mean IoU over classes with GT_c + Pred_c > 0 (predicted-but-absent count 0); NaN if none
        (:func:`mean_iou`)."""
        return float(mean_iou(self.mat))

    def fwiou(self) -> float:
        """Frequency-weighted IoU: sum_c (GT_c / sum GT) * IoU_c; NaN with no GT pixels."""
        gt = self.gt_pixels.astype(np.float64)
        total = gt.sum()
        if total == 0:
            return float("nan")
        iou = np.nan_to_num(self.iou(), nan=0.0)  # NaN only where GT_c == 0, i.e. zero weight
        return float((gt / total * iou).sum())

    def pixel_accuracy(self) -> float:
        """Fraction of non-ignored pixels predicted correctly (pACC); NaN with no pixels."""
        total = self.mat.sum()
        return float(np.trace(self.mat) / total) if total else float("nan")

    def class_accuracy(self) -> np.ndarray:
        """(K,) float64 TP_c / GT_c (recall); NaN where GT_c == 0."""
        gt = self.gt_pixels
        out = np.full(self.num_classes, np.nan)
        np.divide(self.true_positives.astype(np.float64), gt, out=out, where=gt > 0)
        return out

    def mean_accuracy(self) -> float:
        """Mean of :meth:`class_accuracy` over classes with GT_c > 0 (mACC); NaN if none."""
        acc = self.class_accuracy()
        return float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready summary, scores in **percent** (0..100), NaN written as None.

        Args:
            class_names: K names (default ``class_0`` ...).

        Returns:
            ``{"mIoU", "fwIoU", "pACC", "mACC": float | None, "IoU": {name: float | None},
            "pixels": int (non-ignored pixels counted), "num_classes": K}``.

        Raises:
            ValueError: ``class_names`` does not have K entries, or repeats one (two classes would
                share one key of ``IoU``, and one of them would be lost).
        """
        names = list(class_names) if class_names is not None else default_class_names(self.num_classes)
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        if len(set(names)) != len(names):
            raise ValueError(f"class names must differ (they key the per-class IoU), got {names}")

        def pct(v: float) -> float | None:
            return None if not np.isfinite(v) else round(100.0 * float(v), 4)

        return {
            "mIoU": pct(self.miou()),
            "fwIoU": pct(self.fwiou()),
            "pACC": pct(self.pixel_accuracy()),
            "mACC": pct(self.mean_accuracy()),
            "IoU": {n: pct(v) for n, v in zip(names, self.iou())},
            "pixels": int(self.mat.sum()),
            "num_classes": self.num_classes,
        }


class VideoConsistency:
    """Streaming VC_n (VSPW ``VC_perclip.py``, spec §4.3) over one or more clips.

    Feed the frames of a clip in order with :meth:`update`; call :meth:`end_clip` between
    clips. For each window of n consecutive frames ``i..i+n-1`` with ``i in range(len - n)``
    (so the window that ends on the clip's last frame is skipped, as in the reference):

    * G = pixels whose raw GT (any values, void included, no remapping) is identical over the
      window; P = pixels whose prediction is identical over the window;
    * acc_i = |G ∩ P| / |G| (NaN when |G| = 0).

    :meth:`value` is the NaN-mean over all windows of all clips (window-weighted). Memory: n+1
    frames of predictions and labels.

    Args:
        n: window length (8 and 16 in the VSPW protocol), >= 2.

    Raises:
        ValueError: ``n`` not an integer in 2..:data:`MAX_VC_WINDOW`.
    """

    def __init__(self, n: int) -> None:
        if not (is_integer(n) and 2 <= n <= MAX_VC_WINDOW):
            raise ValueError(f"VC window n must be an integer in 2..{MAX_VC_WINDOW}, got {shown(n)}")
        self.n = int(n)
        self.window_acc: list[float] = []
        self._frames: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=self.n + 1)

    def update(self, pred: Any, gt: Any) -> None:
        """Add the next frame of the current clip.

        Args:
            pred: (H, W) integer predicted labels (numpy or torch).
            gt: (H, W) integer raw ground truth.

        Raises:
            ValueError: shapes differ from each other or from the clip's earlier frames; not integers,
                or a value past int64 (a uint64 of 2**63 or more would wrap and compare equal to another).
        """
        p = _as_int_array(pred, "pred", exact=True)
        g = _as_int_array(gt, "gt", exact=True)
        if p.shape != g.shape:
            raise ValueError(f"pred shape {p.shape} differs from gt shape {g.shape}")
        if self._frames and self._frames[0][0].shape != p.shape:
            raise ValueError(f"frame shape {p.shape} differs from the clip's {self._frames[0][0].shape}")
        # copies: _as_int_array shares an int64 array's (or a CPU tensor's) memory, and a caller
        # reusing one buffer for every frame would rewrite the frames kept for later windows
        self._frames.append((p.copy(), g.copy()))
        if len(self._frames) == self.n + 1:  # frame i+n exists, so window i..i+n-1 counts
            self.window_acc.append(self._window(list(self._frames)[: self.n]))

    @staticmethod
    def _window(frames: list[tuple[np.ndarray, np.ndarray]]) -> float:
        p0, g0 = frames[0]
        g_same = np.ones(g0.shape, dtype=bool)
        p_same = np.ones(p0.shape, dtype=bool)
        for p, g in frames[1:]:
            g_same &= g == g0
            p_same &= p == p0
        denom = int(g_same.sum())
        return float((g_same & p_same).sum() / denom) if denom else float("nan")

    def end_clip(self) -> None:
        """Close the current clip (its windows are kept; the next frame starts a new clip)."""
        self._frames.clear()

    def value(self) -> float:
        """NaN-mean of all window accuracies, a fraction in [0, 1]; NaN with no valid window."""
        acc = np.asarray(self.window_acc, dtype=np.float64)
        return float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")


def video_consistency(preds: Sequence[Any], gts: Sequence[Any], n: int) -> float:
    """VC_n of one clip (VSPW ``VC_perclip.py``; spec §4.3).

    Args:
        preds: T predicted label maps (H, W), integer, in frame order.
        gts: T raw ground-truth maps (H, W), integer (void kept as is).
        n: window length (e.g. 8 or 16).

    Returns:
        The NaN-mean over windows ``i in range(T - n)`` of |G ∩ P| / |G| as a fraction in
        [0, 1]; NaN when ``T <= n`` (no window) or every window has an empty G.

    Raises:
        ValueError: ``len(preds) != len(gts)``, ``n < 2``, or mismatched shapes.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth frames")
    vc = VideoConsistency(n)
    for p, g in zip(preds, gts):
        vc.update(p, g)
    return vc.value()
