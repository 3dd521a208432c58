"""Prediction-to-target assignment for mask classification (Mask2Former / MPVSS training).

Spec: ``docs/mpvss_architecture.md`` section 3.4. Written from that description (Cheng et al.,
"Masked-attention Mask Transformer for Universal Image Segmentation", CVPR 2022; Carion et al.,
DETR, ECCV 2020 for the bipartite matching).

* :func:`point_sample`: bilinear sampling of maps at normalised point coordinates
  (``F.grid_sample``, align_corners=False), PointRend's ``point_sample``.
* :class:`HungarianMatcher`: per image, a cost matrix between the N predictions and the M
  target masks, ``C = -w_class * p(class) + w_mask * BCE + w_dice * dice``, the mask terms on
  ``num_points`` uniformly random points shared by all predictions and targets of the image,
  computed in float32 and solved with :func:`scipy.optimize.linear_sum_assignment`.
* :class:`FixedMatcher`: query ``c`` always predicts class ``c`` (a per-class "semantic" query
  layout); queries ``>= K`` are always no-object.

Both return, per image, a pair ``(pred_idx, tgt_idx)`` of int64 CPU tensors of equal length
``min(N, M)`` (Hungarian) or M (fixed), ``pred_idx`` sorted ascending.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "point_sample",
    "pairwise_sigmoid_bce_cost",
    "pairwise_dice_cost",
    "HungarianMatcher",
    "FixedMatcher",
    "Matches",
]

#: Per image: (prediction indices, target indices), both (P,) int64.
Matches = list[tuple[Tensor, Tensor]]


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """Sample maps bilinearly at normalised points (PointRend ``point_sample``).

    Args:
        maps: (R, C, H, W) float tensor (logits or 0/1 masks).
        coords: (R, P, 2) float tensor of (x, y) in [0, 1] x [0, 1], the image's extent
            (0 = left/top edge, 1 = right/bottom edge, pixel centres at (i + 0.5) / W).

    Returns:
        (R, C, P) float tensor; ``F.grid_sample`` with grid = 2 * coords - 1,
        align_corners=False, zero padding: a point within half a pixel of the border blends in
        zeros (at x = 0 a map of ones samples 0.5), as PointRend's and Mask2Former's.
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # (R, P, 1, 2)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def pairwise_sigmoid_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of every prediction against every target (matching cost).

    ``cost[i, j] = mean_p BCE(sigmoid(logits[i, p]), targets[j, p])``, written as
    ``(softplus(-x) @ t^T + softplus(x) @ (1 - t)^T) / P`` (positive and negative terms).

    Args:
        logits: (N, P) float32 mask logits at P points.
        targets: (M, P) float32 target values in [0, 1] at the same points.

    Returns:
        (N, M) float32.
    """
    p = logits.shape[1]
    pos = F.softplus(-logits)  # BCE against target 1
    neg = F.softplus(logits)  # BCE against target 0
    return (pos @ targets.T + neg @ (1.0 - targets).T) / max(p, 1)


def pairwise_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice cost ``1 - (2 |s t| + 1) / (|s| + |t| + 1)`` with s = sigmoid(logits), for all pairs.

    Args:
        logits: (N, P) float32 mask logits.
        targets: (M, P) float32 targets in [0, 1].

    Returns:
        (N, M) float32 in [0, 1).
    """
    s = logits.sigmoid()
    numerator = 2.0 * (s @ targets.T)
    denominator = s.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def _check_inputs(class_logits: Tensor, mask_logits: Tensor, targets: Sequence[dict[str, Tensor]]) -> None:
    if class_logits.dim() != 3 or mask_logits.dim() != 4:
        raise ValueError(
            f"expected class_logits (B, N, K+1) and mask_logits (B, N, h, w), got "
            f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )
    if class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(f"class_logits {tuple(class_logits.shape)} and mask_logits {tuple(mask_logits.shape)} disagree on (B, N)")
    if len(targets) != class_logits.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {class_logits.shape[0]}")


class HungarianMatcher:
    """Optimal one-to-one assignment of predictions to target masks (Mask2Former matcher).

    For image b with predictions ``(class_logits[b] (N, K+1), mask_logits[b] (N, h, w))`` and
    targets ``labels (M,)``, ``masks (M, H, W)``:

    * ``num_points`` points are drawn uniformly in [0, 1]^2 (``torch.rand``, so seeded by the
      global torch RNG or ``generator``), the same for all predictions and targets;
    * predictions are sampled from the (h, w) logits and targets from the (H, W) masks with
      :func:`point_sample` (so the two resolutions may differ);
    * ``C = cost_mask * BCE + cost_class * (-softmax(class_logits)[:, labels]) + cost_dice * dice``
      in float32, without gradients;
    * ``scipy.optimize.linear_sum_assignment(C)``.

    Args:
        cost_class, cost_mask, cost_dice: weights of the three terms (spec: 2, 5, 5).
        num_points: sampled points per image (spec: 12544 = 112^2).

    Raises:
        ValueError: all weights zero, or ``num_points < 1``.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544) -> None:
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matcher costs are zero")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.num_points = int(num_points)

    def cost_matrix(self, class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
        """Cost matrix of one image.

        Args:
            class_logits: (N, K+1) float class logits (last column no-object).
            mask_logits: (N, h, w) float mask logits.
            labels: (M,) int64 target classes in ``0..K-1``.
            masks: (M, H, W) bool/float target masks.
            generator: optional torch generator for the random points.

        Returns:
            (N, M) float32 CPU tensor (detached).
        """
        with torch.no_grad():
            n = class_logits.shape[0]
            m = labels.shape[0]
            if m == 0:
                return torch.zeros(n, 0)
            prob = class_logits.float().softmax(-1)
            cost_class = -prob[:, labels.to(prob.device)]  # (N, M)
            coords = torch.rand(1, self.num_points, 2, generator=generator, device=mask_logits.device)
            pred = point_sample(mask_logits.float()[None], coords)[0]  # (N, P)
            tgt = point_sample(masks.to(mask_logits.device, torch.float32)[None], coords)[0]  # (M, P)
            cost = self.cost_class * cost_class
            if self.cost_mask:
                cost = cost + self.cost_mask * pairwise_sigmoid_bce_cost(pred, tgt)
            if self.cost_dice:
                cost = cost + self.cost_dice * pairwise_dice_cost(pred, tgt)
            return cost.float().cpu()

    def __call__(self, class_logits: Tensor, mask_logits: Tensor, targets: Sequence[dict[str, Tensor]],
                 generator: torch.Generator | None = None) -> Matches:
        """Match a batch.

        Args:
            class_logits: (B, N, K+1) float.
            mask_logits: (B, N, h, w) float.
            targets: B dicts with ``labels`` (M_b,) int64 and ``masks`` (M_b, H, W) bool/float.
            generator: optional torch generator for the random points (else the global RNG).

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of int64 tensors, length ``min(N, M_b)``,
            ``pred_idx`` ascending.

        Raises:
            ValueError: inconsistent shapes or batch sizes; a non-finite cost (NaN logits).
        """
        _check_inputs(class_logits, mask_logits, targets)
        out: Matches = []
        for b, tgt in enumerate(targets):
            cost = self.cost_matrix(class_logits[b], mask_logits[b], tgt["labels"], tgt["masks"], generator)
            if cost.numel() == 0:
                out.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
                continue
            if not torch.isfinite(cost).all():
                raise ValueError("matching cost is not finite (NaN/inf in the predictions?)")
            # imported here: the command line builds `mpvss train`'s options from this package, and
            # `mpvss segment` must run where SciPy is missing (`mpvss train` checks it first)
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(cost.numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out

    def __repr__(self) -> str:
        return (f"HungarianMatcher(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
                f"cost_dice={self.cost_dice}, num_points={self.num_points})")


class FixedMatcher:
    """Query ``c`` <-> class ``c``: a fixed, class-per-query assignment (no optimisation).

    Target ``j`` with label ``c`` is matched to prediction ``c``; queries ``K..N-1`` are never
    matched (always no-object). Suited to semantic segmentation where every class has at most
    one mask per image (as :func:`~mpvss_ros.training.criterion.semantic_to_targets` gives).

    Args:
        num_classes: K.

    Raises:
        ValueError (at call): N < K, a label outside ``0..K-1``, or a class with two masks.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)

    def __call__(self, class_logits: Tensor, mask_logits: Tensor, targets: Sequence[dict[str, Tensor]],
                 generator: torch.Generator | None = None) -> Matches:
        """Same arguments and result format as :meth:`HungarianMatcher.__call__` (``generator`` unused)."""
        _check_inputs(class_logits, mask_logits, targets)
        n = class_logits.shape[1]
        if n < self.num_classes:
            raise ValueError(f"FixedMatcher needs num_queries >= num_classes, got {n} < {self.num_classes}")
        out: Matches = []
        for tgt in targets:
            labels = tgt["labels"].detach().cpu().to(torch.int64)
            if labels.numel():
                if labels.min() < 0 or labels.max() >= self.num_classes:
                    raise ValueError(f"target labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
                if torch.unique(labels).numel() != labels.numel():
                    raise ValueError(f"FixedMatcher needs at most one mask per class, got labels {labels.tolist()}")
            order = torch.argsort(labels)
            out.append((labels[order].clone(), order.to(torch.int64)))
        return out

    def __repr__(self) -> str:
        return f"FixedMatcher(num_classes={self.num_classes})"
