"""Mask-classification training losses (Mask2Former / MPVSS ``SetCriterion``).

Spec: ``docs/mpvss_architecture.md`` section 3.4, written from its description:

* **classification**: cross-entropy over K+1 classes for *every* query; a query matched to
  target j learns the target's class, all other queries learn "no-object" (index K), whose
  class weight is ``no_object_weight`` (0.1). ``F.cross_entropy`` with ``weight`` = the
  weighted mean over queries.
* **masks** (matched pairs only): sigmoid binary cross-entropy and dice loss, both on
  ``num_points`` points per mask chosen by PointRend importance sampling (Kirillov et al.,
  CVPR 2020): ``oversample_ratio * num_points`` uniform candidates, of which the
  ``importance_sample_ratio * num_points`` most uncertain (smallest |logit| of the prediction)
  are kept, plus ``(1 - importance_sample_ratio) * num_points`` fresh uniform points. BCE is
  averaged over points, dice uses +1 smoothing; both are summed over matched masks and divided
  by the number of target masks in the batch (at least 1).
* **deep supervision**: the same three losses on every auxiliary prediction, each with its
  own matching; total = sum over all predictions of ``w_class*ce + w_mask*bce + w_dice*dice``.

Targets are per image ``{"labels": (M,) int64, "masks": (M, H, W) bool/float}`` at input
resolution; predictions are mask logits at 1/4 resolution. Point sampling with
align_corners=False bridges the two resolutions, so masks are never resized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..evaluation.metrics import IGNORE_INDEX
from .matcher import FixedMatcher, HungarianMatcher, Matches, point_sample

__all__ = [
    "SetCriterion",
    "semantic_to_targets",
    "semantic_batch_to_targets",
    "sample_uncertain_points",
    "dice_loss",
    "sigmoid_bce_loss",
]


def semantic_to_targets(label_map: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> dict[str, Tensor]:
    """Turn a semantic label map into mask-classification targets (one mask per class present).

    Void pixels (``ignore_index``) belong to no mask, as in Mask2Former's semantic mapper: they
    count as background for every target mask and as nothing else.

    Args:
        label_map: (H, W) integer tensor, values in ``0..K-1`` or ``ignore_index``.
        num_classes: K.
        ignore_index: the void label.

    Returns:
        ``{"labels": (M,) int64 ascending, "masks": (M, H, W) bool}`` on ``label_map``'s device,
        M = number of classes present (0 for an all-void map).

    Raises:
        ValueError: not 2-D, or a value outside ``0..K-1`` that is not ``ignore_index``.
    """
    if label_map.dim() != 2:
        raise ValueError(f"label_map must be (H, W), got shape {tuple(label_map.shape)}")
    lm = label_map.to(torch.int64)
    present = torch.unique(lm)
    bad = present[(present != ignore_index) & ((present < 0) | (present >= num_classes))]
    if bad.numel():
        raise ValueError(f"label values {bad.tolist()} are neither classes 0..{num_classes - 1} nor ignore {ignore_index}")
    classes = present[present != ignore_index]
    masks = lm[None] == classes[:, None, None]
    return {"labels": classes, "masks": masks}


def semantic_batch_to_targets(label_maps: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[dict[str, Tensor]]:
    """:func:`semantic_to_targets` for each (H, W) map of a (B, H, W) batch.

    Args:
        label_maps: (B, H, W) integer tensor, values in ``0..K-1`` or ``ignore_index``.
        num_classes: K.
        ignore_index: the void label.

    Returns:
        B target dicts ``{"labels": (M_b,) int64, "masks": (M_b, H, W) bool}``, one binary mask
        per class present (spec §3.1).

    Raises:
        ValueError: not 3-D, or a value outside ``0..K-1`` that is not ``ignore_index``.
    """
    if label_maps.dim() != 3:
        raise ValueError(f"label_maps must be (B, H, W), got shape {tuple(label_maps.shape)}")
    return [semantic_to_targets(m, num_classes, ignore_index) for m in label_maps]


def sample_uncertain_points(logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
                            generator: torch.Generator | None = None) -> Tensor:
    """PointRend importance sampling: mostly points where the prediction is uncertain.

    Uncertainty is ``-|logit|`` (highest at the 0.5 decision boundary).

    Args:
        logits: (R, 1, h, w) float mask logits (no gradient needed).
        num_points: points per mask P.
        oversample_ratio: candidates = int(P * oversample_ratio), >= 1.
        importance_sample_ratio: fraction of P taken as the most uncertain candidates, in [0, 1].
        generator: optional torch generator.

    Returns:
        (R, P, 2) float32 (x, y) coordinates in [0, 1] for :func:`point_sample`.
    """
    r = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    coords = torch.rand(r, num_sampled, 2, generator=generator, device=logits.device)
    parts = []
    if num_uncertain > 0:
        uncertainty = -point_sample(logits.float(), coords)[:, 0].abs()  # (R, S)
        idx = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
        parts.append(torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2)))
    if num_random > 0:
        parts.append(torch.rand(r, num_random, 2, generator=generator, device=logits.device))
    return torch.cat(parts, dim=1)


def sigmoid_bce_loss(point_logits: Tensor, point_labels: Tensor, num_masks: float) -> Tensor:
    """Sum over masks of the point-averaged sigmoid BCE, divided by ``num_masks``.

    Args:
        point_logits: (R, P) float32 logits; point_labels: (R, P) float32 in [0, 1].

    Returns:
        scalar float32.
    """
    loss = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(point_logits: Tensor, point_labels: Tensor, num_masks: float) -> Tensor:
    """Sum over masks of ``1 - (2 |s t| + 1) / (|s| + |t| + 1)``, s = sigmoid, divided by ``num_masks``.

    Args:
        point_logits: (R, P) float32 logits; point_labels: (R, P) float32 in [0, 1].

    Returns:
        scalar float32.
    """
    s = point_logits.sigmoid()
    numerator = 2.0 * (s * point_labels).sum(-1)
    denominator = s.sum(-1) + point_labels.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


def _predictions(outputs: Any) -> list[tuple[str, Tensor, Tensor]]:
    """(suffix, class_logits, mask_logits) for the final prediction then each auxiliary one."""
    if isinstance(outputs, Mapping):
        if "pred_logits" in outputs:  # Mask2Former naming
            preds = [("", outputs["pred_logits"], outputs["pred_masks"])]
            for i, aux in enumerate(outputs.get("aux_outputs") or []):
                preds.append((f"_{i}", aux["pred_logits"], aux["pred_masks"]))
            return preds
        cls, msk = outputs["class_logits"], outputs["mask_logits"]
        aux_c, aux_m = outputs.get("aux_class_logits") or [], outputs.get("aux_mask_logits") or []
    else:  # DecoderOutput
        cls, msk = outputs.class_logits, outputs.mask_logits
        aux_c, aux_m = outputs.aux_class_logits or [], outputs.aux_mask_logits or []
    if len(aux_c) != len(aux_m):
        raise ValueError(f"{len(aux_c)} auxiliary class predictions for {len(aux_m)} mask predictions")
    return [("", cls, msk)] + [(f"_{i}", c, m) for i, (c, m) in enumerate(zip(aux_c, aux_m))]


class SetCriterion(nn.Module):
    """Mask2Former's set criterion: matching + CE + point-sampled mask BCE and dice.

    Args:
        num_classes: K (class logits have K+1 entries, the last being no-object).
        matcher: :class:`HungarianMatcher` or :class:`FixedMatcher` (any callable with their
            signature).
        weight_class, weight_mask, weight_dice: loss weights (spec: 2, 5, 5).
        no_object_weight: CE class weight of the no-object class (spec: 0.1).
        num_points: points per mask for the mask losses (spec: 12544).
        oversample_ratio: candidates per point for importance sampling (spec: 3.0), >= 1.
        importance_sample_ratio: fraction of uncertain points (spec: 0.75), in [0, 1].
        deep_supervision: also apply the losses to the auxiliary predictions.

    Buffers: ``empty_weight`` (K+1,) float32, ones with ``no_object_weight`` last.

    Raises:
        ValueError: bad ratios or ``num_points < 1``.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | FixedMatcher, weight_class: float = 2.0,
                 weight_mask: float = 5.0, weight_dice: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 deep_supervision: bool = True) -> None:
        super().__init__()
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        if oversample_ratio < 1:
            raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
        if not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
        self.num_classes = int(num_classes)
        self.matcher = matcher
        self.weight_class = float(weight_class)
        self.weight_mask = float(weight_mask)
        self.weight_dice = float(weight_dice)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.deep_supervision = bool(deep_supervision)
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, class_logits: Tensor, targets: Sequence[dict[str, Tensor]], matches: Matches) -> Tensor:
        """Weighted CE over all queries; unmatched queries target no-object (index K).

        Args:
            class_logits: (B, N, K+1) float.
            targets: per image ``{"labels": (M,) int64, ...}``.
            matches: per image (prediction indices, target indices), from the matcher.

        Returns:
            scalar float32.

        Raises:
            ValueError: ``class_logits`` without ``num_classes + 1`` entries.
        """
        b, n, c = class_logits.shape
        if c != self.num_classes + 1:
            raise ValueError(f"class logits have {c} entries, expected num_classes + 1 = {self.num_classes + 1}")
        target_classes = torch.full((b, n), self.num_classes, dtype=torch.int64, device=class_logits.device)
        for i, ((src, tgt), t) in enumerate(zip(matches, targets)):
            if src.numel():
                target_classes[i, src.to(class_logits.device)] = t["labels"].to(class_logits.device)[tgt.to(class_logits.device)]
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes,
                               weight=self.empty_weight.to(class_logits.device))

    def loss_masks(self, mask_logits: Tensor, targets: Sequence[dict[str, Tensor]], matches: Matches,
                   num_masks: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Point-sampled BCE and dice of the matched masks.

        Args:
            mask_logits: (B, N, h, w) float mask logits.
            targets: per image ``masks`` (M, H, W) bool/float (any H, W).
            matches: per image (pred_idx, tgt_idx).
            num_masks: normaliser (number of target masks in the batch, >= 1).

        Returns:
            (loss_mask, loss_dice), scalar float32 tensors; exact zeros connected to the graph
            when nothing is matched.
        """
        logits_pts, labels_pts = [], []
        for b, ((src, tgt), t) in enumerate(zip(matches, targets)):
            if src.numel() == 0:
                continue
            src_masks = mask_logits[b, src.to(mask_logits.device)].float()[:, None]  # (R, 1, h, w)
            tgt_masks = t["masks"][tgt.to(t["masks"].device)].to(mask_logits.device, torch.float32)[:, None]
            with torch.no_grad():
                coords = sample_uncertain_points(src_masks.detach(), self.num_points, self.oversample_ratio,
                                                 self.importance_sample_ratio, generator)
                labels_pts.append(point_sample(tgt_masks, coords)[:, 0])
            logits_pts.append(point_sample(src_masks, coords)[:, 0])
        if not logits_pts:
            zero = mask_logits.sum() * 0.0
            return zero, zero.clone()
        point_logits = torch.cat(logits_pts)
        point_labels = torch.cat(labels_pts)
        return (sigmoid_bce_loss(point_logits, point_labels, num_masks),
                dice_loss(point_logits, point_labels, num_masks))

    def forward(self, outputs: Any, targets: Sequence[dict[str, Tensor]],
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Compute all losses.

        Args:
            outputs: a :class:`~mpvss_ros.nn.transformer_decoder.DecoderOutput`; or a dict with
                ``class_logits`` (B, N, K+1), ``mask_logits`` (B, N, h, w) and optional
                ``aux_class_logits`` / ``aux_mask_logits`` lists; or Mask2Former's
                ``{"pred_logits", "pred_masks", "aux_outputs": [{...}]}``.
            targets: B dicts ``{"labels": (M,) int64, "masks": (M, H, W) bool/float}``
                (see :func:`semantic_to_targets`). The masks must cover the same image extent
                as the predictions (the padded network canvas; pad void labels first), since
                points are matched in normalised [0, 1] coordinates.
            generator: optional torch generator for all random points (matcher and losses);
                default the global torch RNG.

        Returns:
            Unweighted terms ``loss_ce``, ``loss_mask``, ``loss_dice`` (final prediction) and
            ``loss_ce_{i}``, ``loss_mask_{i}``, ``loss_dice_{i}`` (auxiliary prediction i, the
            first being the one from the learnable queries alone), plus ``loss``: the weighted
            total over all predictions. Scalar float32 tensors.

        Raises:
            ValueError: inconsistent shapes/batch sizes, labels outside ``0..K-1``.
        """
        preds = _predictions(outputs)
        if not self.deep_supervision:
            preds = preds[:1]
        num_masks = float(max(sum(int(t["labels"].numel()) for t in targets), 1))
        for t in targets:
            lab = t["labels"]
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                raise ValueError(f"target labels must be in 0..{self.num_classes - 1}, got {lab.tolist()}")
        losses: dict[str, Tensor] = {}
        total = None
        for suffix, cls, msk in preds:
            matches = self.matcher(cls.detach(), msk.detach(), targets, generator=generator)
            ce = self.loss_labels(cls, targets, matches)
            bce, dice = self.loss_masks(msk, targets, matches, num_masks, generator)
            losses[f"loss_ce{suffix}"] = ce
            losses[f"loss_mask{suffix}"] = bce
            losses[f"loss_dice{suffix}"] = dice
            term = self.weight_class * ce + self.weight_mask * bce + self.weight_dice * dice
            total = term if total is None else total + term
        losses["loss"] = total
        return losses

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, matcher={self.matcher!r}, weights=(class {self.weight_class}, "
                f"mask {self.weight_mask}, dice {self.weight_dice}), no_object={float(self.empty_weight[-1])}, "
                f"num_points={self.num_points}, oversample={self.oversample_ratio}, "
                f"importance={self.importance_sample_ratio}")
