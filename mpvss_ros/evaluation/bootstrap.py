"""How sure is an mIoU difference on one clip? A paired block bootstrap over frames.

The key-interval study compares settings (query flow against optical flow or copy, adaptive
against fixed key frames) on one labelled clip, where differences of a few hundredths of a point
occur. mIoU is not a mean over frames (it is a ratio of pixel counts summed over the clip), so the
bootstrap resamples **frames**, sums their per-class pixel counts (TP, GT, Pred:
:func:`~mpvss_ros.evaluation.metrics.class_counts`) and scores the sum, as the clip's own mIoU is
computed (:func:`~mpvss_ros.evaluation.metrics.mean_iou_from_counts`).

Neighbouring frames of a video are strongly correlated and a propagated frame's error depends on
its distance from the key frame, so frames are drawn in runs: the circular block bootstrap
(Politis and Romano, "A circular block-resampling procedure for stationary data", 1992): ``ceil(T
/ L)`` blocks of ``L`` consecutive frames, each starting at a uniformly drawn frame and wrapping
past the last one, cut to ``T`` frames. Both settings of a comparison are scored on the same
resampled frames (paired), so variation that the clip's content causes in both largely cancels.

With ``T`` = 101 frames and ``L`` = 10 there are about ten independent blocks: the interval is a
rough measure of how much the verdict depends on which stretches of this one clip were labelled,
not a statement about other clips. Each interval holds its level on its own; of many intervals
computed together, some exclude 0 by chance.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from ..values import INT64_MAX, is_integer, is_real, shown
from .metrics import mean_iou_from_counts

__all__ = ["circular_block_resamples", "paired_miou_difference"]

#: Most resampled frame indices (samples x frames) one call holds: about 270 MB of int64 per array
#: (2000 resamples of a 101-frame clip, the study's, are 202,000).
MAX_RESAMPLED_FRAMES = 2**25


def circular_block_resamples(frames: int, block: int, samples: int, seed: int = 0) -> np.ndarray:
    """Frame indices of ``samples`` circular-block-bootstrap resamples of a ``frames``-long clip.

    Args:
        frames: T >= 1, the clip's length.
        block: L, 1 <= L <= T, frames per block (L = 1 is the ordinary bootstrap).
        samples: S >= 1 resamples.
        seed: seed of numpy's default generator, an integer in [0, 2**63 - 1]; the same
            arguments give the same indices.

    Returns:
        (S, T) int64 indices in ``0..T-1``: each row is ``ceil(T / L)`` runs ``s, s+1, ...,
        s+L-1`` (mod T) with uniform starts ``s``, concatenated and cut to T.

    Raises:
        ValueError: an argument outside the ranges above (bools are no integers), or samples x
            frames above :data:`MAX_RESAMPLED_FRAMES`.
    """
    frames, block, samples = _count(frames, "frames"), _count(block, "block"), _count(samples, "samples")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {shown(frames)}")
    if not 1 <= block <= frames:
        raise ValueError(f"block must be in 1..{shown(frames)} (the clip's frames), got {shown(block)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {shown(samples)}")
    rng = np.random.default_rng(_resampling_seed(frames, samples, seed))
    blocks = -(-frames // block)
    starts = rng.integers(0, frames, size=(samples, blocks))
    runs = (starts[:, :, None] + np.arange(block)[None, None, :]) % frames
    return runs.reshape(samples, blocks * block)[:, :frames].astype(np.int64)


def paired_miou_difference(frame_counts_a: np.ndarray, frame_counts_b: np.ndarray, block: int = 10,
                           samples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """mIoU of setting A minus setting B on one clip, with a paired circular-block-bootstrap
    percentile interval.

    Args:
        frame_counts_a: (T, 3, K) non-negative integer per-frame class counts ``[frame, (TP, GT,
            Pred), class]`` of setting A (:func:`~mpvss_ros.evaluation.metrics.class_counts` of
            each frame's confusion matrix).
        frame_counts_b: the same for setting B, on the same T frames: each frame's ground-truth
            counts GT_c must equal A's.
        block: L >= 1 frames per bootstrap block (:func:`circular_block_resamples`). With fewer
            than two whole blocks in the clip (T < 2L) there is no interval: ``ci`` and the shares
            are NaN and ``kept`` is 0. With L >= T every resample would be a rotation of the clip
            itself; with L < T < 2L every resample is one run of L frames, more than half the
            clip, plus a few frames, so the resamples barely differ from the clip and the interval
            would be far too narrow (12 frames, L = 10: "better in 100 %" of the resamples).
        samples: S >= 1 bootstrap resamples.
        level: two-sided coverage of the interval, in (0, 1), for this one comparison (several
            intervals are not jointly at that level).
        seed: resampling seed; every comparison with the same T, block, samples and seed uses the
            same resamples.

    Returns:
        ``{"delta": clip mIoU of A minus B, "ci": [low, high], "share_a_better" / "share_b_better":
        fractions of the kept resamples where A's / B's mIoU is higher (ties count for neither),
        "level", "block", "blocks": ceil(T / L), "samples": S, "kept": resamples scored}``; mIoU
        differences in percentage points (100 x fraction). A resample in which a setting has no
        counted pixel has no mIoU and is not kept.

    Raises:
        ValueError: counts that are not both (T, 3, K) integers >= 0 with TP_c <= min(GT_c,
            Pred_c) and the same ground truth per frame; ``level`` outside (0, 1); ``block`` or
            ``samples`` not an integer >= 1.
    """
    a = np.asarray(frame_counts_a)
    b = np.asarray(frame_counts_b)
    if a.ndim != 3 or a.shape[1] != 3 or a.shape != b.shape:
        raise ValueError(f"per-frame class counts must both be (T, 3, K), got {a.shape} and {b.shape}")
    if a.dtype.kind not in "iu" or b.dtype.kind not in "iu" or (a < 0).any() or (b < 0).any():
        raise ValueError(f"per-frame class counts must hold pixel counts (integers >= 0), got {a.dtype} and {b.dtype}")
    for name, c in (("A", a), ("B", b)):
        if (c[:, 0] > np.minimum(c[:, 1], c[:, 2])).any():
            raise ValueError(f"setting {name}'s counts are not (TP, GT, Pred): a TP_c exceeds GT_c or Pred_c")
    if not np.array_equal(a[:, 1], b[:, 1]):
        raise ValueError("the two settings' frames differ in their ground-truth pixels: not the same frames")
    if not (is_real(level) and 0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), got {shown(level)}")
    frames, k = a.shape[0], a.shape[2]
    block, samples = _count(block, "block"), _count(samples, "samples")
    if block < 1:
        raise ValueError(f"block must be in 1..{frames} (the clip's frames), got {shown(block)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {shown(samples)}")
    seed = _resampling_seed(frames, samples, seed)  # checked before any work, even without an interval
    blocks = -(-frames // block)
    delta = 100.0 * float(mean_iou_from_counts(a.sum(axis=0)) - mean_iou_from_counts(b.sum(axis=0)))
    out: dict[str, Any] = {"delta": delta, "ci": [float("nan")] * 2, "share_a_better": float("nan"),
                           "share_b_better": float("nan"), "level": level, "block": block, "blocks": blocks,
                           "samples": samples, "kept": 0}
    if frames < 2 * block:  # fewer than two whole blocks: each resample is (nearly) the clip itself
        return out
    idx = circular_block_resamples(frames, block, samples, seed)
    # each resample's summed counts: how often each frame was drawn (S, T) times the frames'
    # counts (T, 3 * K), in float64, exact for counts below 2**53
    draws = np.bincount((np.arange(samples)[:, None] * frames + idx).ravel(),
                        minlength=samples * frames).reshape(samples, frames).astype(np.float64)
    sums_a = (draws @ a.reshape(frames, 3 * k).astype(np.float64)).reshape(samples, 3, k)
    sums_b = (draws @ b.reshape(frames, 3 * k).astype(np.float64)).reshape(samples, 3, k)
    diffs = 100.0 * (mean_iou_from_counts(sums_a) - mean_iou_from_counts(sums_b))
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size:
        tail = (1.0 - level) / 2.0
        out.update(ci=[float(v) for v in np.quantile(diffs, [tail, 1.0 - tail])],
                   share_a_better=float(np.mean(diffs > 0)), share_b_better=float(np.mean(diffs < 0)),
                   kept=int(diffs.size))
    return out


def _resampling_seed(frames: int, samples: int, seed: Any) -> int:
    """``seed`` as an int after the checks both functions share: samples x frames within
    :data:`MAX_RESAMPLED_FRAMES`, and a seed numpy takes (an integer in [0, 2**63 - 1]).

    Raises:
        ValueError: either check fails.
    """
    if samples * frames > MAX_RESAMPLED_FRAMES:
        raise ValueError(f"samples x frames must be at most {MAX_RESAMPLED_FRAMES} (the resamples' indices are "
                         f"held in memory), got samples {shown(samples)} x frames {shown(frames)}")
    seed = _count(seed, "seed")
    if not 0 <= seed <= INT64_MAX:
        raise ValueError(f"seed must be in [0, {INT64_MAX}], got {shown(seed)}")
    return seed


def _count(value: Any, name: str) -> int:
    """``value`` as an int (an integer, not a bool), for :func:`circular_block_resamples`'s checks."""
    if not is_integer(value):
        raise ValueError(f"{name} must be an integer, got {shown(value)}")
    return operator.index(value)
