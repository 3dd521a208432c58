"""Set criterion and semantic targets (spec section 3.4)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mpvss_ros.nn.transformer_decoder import DecoderOutput
from mpvss_ros.training.criterion import (SetCriterion, sample_uncertain_points, semantic_batch_to_targets,
                                          semantic_to_targets)
from mpvss_ros.training.matcher import FixedMatcher, HungarianMatcher

K = 4


def test_semantic_to_targets_void_in_no_mask():
    lm = torch.tensor([[0, 0, 3, 255], [3, 3, 255, 1]])
    t = semantic_to_targets(lm, K, 255)
    assert t["labels"].tolist() == [0, 1, 3] and t["labels"].dtype == torch.int64
    assert t["masks"].shape == (3, 2, 4) and t["masks"].dtype == torch.bool
    assert t["masks"].sum(0).tolist() == [[1, 1, 1, 0], [1, 1, 0, 1]]  # void pixels: no mask
    for lab, m in zip(t["labels"], t["masks"]):
        assert torch.equal(m, lm == lab)
    empty = semantic_to_targets(torch.full((3, 5), 255), K)
    assert empty["labels"].numel() == 0 and empty["masks"].shape == (0, 3, 5)
    with pytest.raises(ValueError, match="11"):
        semantic_to_targets(torch.tensor([[0, 11]]), K, 255)  # raw CamVid void must be mapped first
    with pytest.raises(ValueError):
        semantic_to_targets(torch.zeros(1, 2, 2, dtype=torch.int64), K)
    # the batch form wants (B, H, W): one (H, W) map is refused, not read as B rows
    with pytest.raises(ValueError, match="label_maps must be"):
        semantic_batch_to_targets(torch.zeros(2, 2, dtype=torch.int64), K)
    assert len(semantic_batch_to_targets(torch.zeros(3, 2, 2, dtype=torch.int64), K)) == 3


def test_semantic_to_targets_refuses_label_k():
    # K is no class: the raw CamVid void label 11 with K = 11 classes must be mapped to ignore first.
    with pytest.raises(ValueError, match=rf"\[{K}\]"):
        semantic_to_targets(torch.tensor([[0, K], [1, 255]]), K, 255)
    # a negative label is no class either (only ignore_index is void)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        semantic_to_targets(torch.tensor([[0, -1], [1, 255]]), K, 255)


def _outputs(b=2, n=6, h=8, w=10, aux=2, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    def mk(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    return DecoderOutput(class_logits=mk(b, n, K + 1), mask_logits=mk(b, n, h, w), query_embeddings=torch.zeros(b, n, 4),
                         aux_class_logits=[mk(b, n, K + 1) for _ in range(aux)],
                         aux_mask_logits=[mk(b, n, h, w) for _ in range(aux)])


def _targets(b=2, h=32, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(b):
        lm = torch.randint(0, K, (h // 8, w // 8), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
        lm[:4, :4] = 255
        out.append(semantic_to_targets(lm, K))
    return out


@pytest.mark.parametrize("matcher", [HungarianMatcher(num_points=256), FixedMatcher(K)], ids=["hungarian", "fixed"])
def test_losses_finite_with_gradients(matcher):
    torch.manual_seed(0)
    out = _outputs()
    crit = SetCriterion(K, matcher, num_points=256)
    losses = crit(out, _targets())
    assert set(losses) == {f"loss_{t}{s}" for t in ("ce", "mask", "dice") for s in ("", "_0", "_1")} | {"loss"}
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v)
    expected = sum(w * losses[f"loss_{t}{s}"] for t, w in (("ce", 2), ("mask", 5), ("dice", 5)) for s in ("", "_0", "_1"))
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    for t in [out.class_logits, out.mask_logits, *out.aux_class_logits, *out.aux_mask_logits]:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_dict_inputs_and_no_deep_supervision():
    torch.manual_seed(0)
    out = _outputs(aux=1)
    d = {"pred_logits": out.class_logits, "pred_masks": out.mask_logits,
         "aux_outputs": [{"pred_logits": out.aux_class_logits[0], "pred_masks": out.aux_mask_logits[0]}]}
    crit = SetCriterion(K, FixedMatcher(K), num_points=128)
    assert "loss_ce_0" in crit(d, _targets())
    uneven = {"class_logits": out.class_logits, "mask_logits": out.mask_logits,
              "aux_class_logits": [out.aux_class_logits[0]] * 2, "aux_mask_logits": out.aux_mask_logits}
    with pytest.raises(ValueError, match="auxiliary class predictions"):  # class and mask lists must pair up
        crit(uneven, _targets())
    crit_final = SetCriterion(K, FixedMatcher(K), num_points=128, deep_supervision=False)
    assert set(crit_final(d, _targets())) == {"loss", "loss_ce", "loss_mask", "loss_dice"}


@pytest.mark.parametrize("no_object", [0.1, 0.5])
def test_ce_weights_no_object(no_object):
    # FixedMatcher: target of class 1 -> query 1; queries 0, 2.. -> no-object (weight no_object_weight).
    cls = torch.randn(1, 5, K + 1)
    tgt = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)}]
    crit = SetCriterion(K, FixedMatcher(K), no_object_weight=no_object, num_points=16)
    assert crit.empty_weight.tolist() == pytest.approx([1.0] * K + [no_object])
    losses = crit({"class_logits": cls, "mask_logits": torch.zeros(1, 5, 2, 2)}, tgt)
    nll = -F.log_softmax(cls[0], -1)
    targets = [K, 1, K, K, K]
    w = torch.tensor([no_object, 1.0, no_object, no_object, no_object])
    expected = sum(w[i] * nll[i, targets[i]] for i in range(5)) / w.sum()
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_ce_targets_follow_the_matched_target_order():
    # Hungarian matches come sorted by prediction, with their targets in any order: query 0 <-
    # target 1 (class 1), query 2 <- target 0 (class 3); queries 1, 3, 4 learn no-object.
    cls = torch.randn(1, 5, K + 1, generator=torch.Generator().manual_seed(1))
    tgt = [{"labels": torch.tensor([3, 1]), "masks": torch.ones(2, 8, 8, dtype=torch.bool)}]
    crit = SetCriterion(K, HungarianMatcher(num_points=16), no_object_weight=0.1, num_points=16)
    ce = crit.loss_labels(cls, tgt, [(torch.tensor([0, 2]), torch.tensor([1, 0]))])
    nll = -F.log_softmax(cls[0], -1)
    targets = [1, K, 3, K, K]
    w = torch.tensor([1.0, 0.1, 1.0, 0.1, 0.1])
    expected = sum(w[i] * nll[i, targets[i]] for i in range(5)) / w.sum()
    assert ce.item() == pytest.approx(expected.item(), rel=1e-5)


def test_each_loss_weight_multiplies_its_own_term():
    # Non-default weights (distinct, unlike the spec's 5 / 5) show which term each one scales.
    torch.manual_seed(0)
    crit = SetCriterion(K, FixedMatcher(K), weight_class=1.0, weight_mask=3.0, weight_dice=7.0, num_points=64)
    losses = crit(_outputs(aux=0, requires_grad=False), _targets())
    assert losses["loss_mask"].item() != pytest.approx(losses["loss_dice"].item(), rel=1e-3)
    expected = 1.0 * losses["loss_ce"] + 3.0 * losses["loss_mask"] + 7.0 * losses["loss_dice"]
    torch.testing.assert_close(losses["loss"], expected)


def test_spec_defaults():
    # Spec section 3.4: weights 2 / 5 / 5, no-object 0.1, 12544 points, oversample 3, importance 0.75.
    crit = SetCriterion(K, FixedMatcher(K))
    assert (crit.weight_class, crit.weight_mask, crit.weight_dice) == (2.0, 5.0, 5.0)
    assert crit.empty_weight.tolist() == pytest.approx([1.0] * K + [0.1])
    assert (crit.num_points, crit.oversample_ratio, crit.importance_sample_ratio) == (12544, 3.0, 0.75)


def test_mask_losses_constant_case():
    # Query 0 predicts logit 2 everywhere; its target covers the left half.
    # BCE -> (softplus(-2) + softplus(2)) / 2; dice = 1 - (2*s*P/2 + 1)/(s*P + P/2 + 1), s = sigmoid(2)
    p = 4096
    mask_logits = torch.full((1, 2, 16, 16), 2.0, requires_grad=True)
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, :, :32] = True
    crit = SetCriterion(K, FixedMatcher(K), num_points=p, importance_sample_ratio=0.0)
    torch.manual_seed(0)
    losses = crit({"class_logits": torch.zeros(1, K, K + 1), "mask_logits": mask_logits[:, :1].expand(1, K, 16, 16)},
                  [{"labels": torch.tensor([0]), "masks": masks}])
    bce = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(2.0))).item() / 2
    assert losses["loss_mask"].item() == pytest.approx(bce, abs=0.03)
    s = torch.sigmoid(torch.tensor(2.0)).item()
    dice = 1 - (2 * s * p / 2 + 1) / (s * p + p / 2 + 1)
    assert losses["loss_dice"].item() == pytest.approx(dice, abs=0.02)


def test_mask_losses_pair_each_matched_prediction_with_its_own_target():
    """Prediction 0 <- target 1 (all ones), prediction 2 <- target 0 (all zeros): confident right
    logits (+8 and -8) give a BCE near 0; pairing by the wrong index gives about 8."""
    crit = SetCriterion(K, HungarianMatcher(num_points=16), num_points=256, importance_sample_ratio=0.0)
    msk = torch.zeros(1, 3, 32, 32)
    msk[0, 0] = 8.0
    msk[0, 2] = -8.0
    masks = torch.stack([torch.zeros(64, 64), torch.ones(64, 64)]).bool()
    bce, _ = crit.loss_masks(msk, [{"labels": torch.tensor([1, 3]), "masks": masks}],
                             [(torch.tensor([0, 2]), torch.tensor([1, 0]))], 2.0, torch.Generator().manual_seed(0))
    # abs 0.3: points within half a pixel of the border meet the zero padding
    assert bce.item() == pytest.approx(F.softplus(torch.tensor(-8.0)).item(), abs=0.3)


def _layered_predictions():
    """Final, auxiliary 0 and auxiliary 1 predictions: distinct class logits and constant mask
    logits +8, -8 and 0; targets: classes 0 and 2, both covering the whole image."""
    g = torch.Generator().manual_seed(3)
    cls = [torch.randn(1, K, K + 1, generator=g) for _ in range(3)]
    msk = [torch.full((1, K, 64, 64), v) for v in (8.0, -8.0, 0.0)]
    tgt = [{"labels": torch.tensor([0, 2]), "masks": torch.ones(2, 128, 128, dtype=torch.bool)}]
    return cls, msk, tgt


@pytest.mark.parametrize("form", ["decoder", "dict", "mask2former"])
def test_each_prediction_is_scored_with_its_own_class_and_mask_logits(form):
    """Deep supervision in all three output forms: loss_*_i come from auxiliary prediction i's
    own class and mask logits (in order), the unsuffixed terms from the final prediction."""
    cls, msk, tgt = _layered_predictions()
    if form == "decoder":
        out = DecoderOutput(class_logits=cls[0], mask_logits=msk[0], query_embeddings=torch.zeros(1, K, 4),
                            aux_class_logits=cls[1:], aux_mask_logits=msk[1:])
    elif form == "dict":
        out = {"class_logits": cls[0], "mask_logits": msk[0], "aux_class_logits": cls[1:], "aux_mask_logits": msk[1:]}
    else:
        out = {"pred_logits": cls[0], "pred_masks": msk[0],
               "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(cls[1:], msk[1:])]}
    crit = SetCriterion(K, FixedMatcher(K), num_points=256, importance_sample_ratio=0.0)
    losses = crit(out, tgt, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[0, K, 2, K]])  # FixedMatcher: queries 0 and 2 matched, 1 and 3 no-object
    for suffix, c, v in zip(("", "_0", "_1"), cls, (8.0, -8.0, 0.0)):
        ce = F.cross_entropy(c.transpose(1, 2), classes, weight=crit.empty_weight)
        assert losses[f"loss_ce{suffix}"].item() == pytest.approx(ce.item(), rel=1e-5)
        # BCE of a constant logit v against 1 is softplus(-v); abs 0.3 for the zero-padded border
        assert losses[f"loss_mask{suffix}"].item() == pytest.approx(F.softplus(torch.tensor(-v)).item(), abs=0.3)


def test_an_image_without_targets_does_not_hide_the_next_ones_masks():
    """The mask losses skip an image with nothing matched and go on with the rest of the batch."""
    crit = SetCriterion(K, FixedMatcher(K), num_points=16)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)},
               {"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)}]
    losses = crit({"class_logits": torch.zeros(2, K, K + 1), "mask_logits": torch.zeros(2, K, 4, 4)}, targets)
    assert losses["loss_mask"].item() == pytest.approx(math.log(2), rel=1e-4)  # logit 0: BCE ln 2 on every point


def test_the_generator_drives_the_matcher_and_the_mask_points():
    """With a generator, the losses do not depend on the global torch RNG: it reaches the matcher
    and the point sampling of the mask losses."""
    seen = []

    class RecordingMatcher(HungarianMatcher):
        def __call__(self, *args, generator=None):
            seen.append(generator)
            return super().__call__(*args, generator=generator)

    crit = SetCriterion(K, RecordingMatcher(num_points=32), num_points=32)
    out, targets = _outputs(b=1, aux=0, requires_grad=False), _targets(b=1)
    torch.manual_seed(0)
    first = crit(out, targets, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    second = crit(out, targets, generator=torch.Generator().manual_seed(7))
    assert len(seen) == 2 and all(g is not None for g in seen)
    for name in first:
        assert first[name].item() == second[name].item(), name


def test_mask_losses_are_divided_by_the_target_masks_of_the_batch():
    # Two images with three target masks in all; every mask logit is 2 and every target the left
    # half, so each matched mask has the same BCE: the sum over masks / 3 (target masks, not the 2
    # images) is one mask's BCE.
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[:, :, :32] = True
    targets = [{"labels": torch.tensor([0, 1]), "masks": masks}, {"labels": torch.tensor([2]), "masks": masks[:1]}]
    crit = SetCriterion(K, FixedMatcher(K), num_points=1024, importance_sample_ratio=0.0, deep_supervision=False)
    torch.manual_seed(0)
    losses = crit({"class_logits": torch.zeros(2, K, K + 1), "mask_logits": torch.full((2, K, 16, 16), 2.0)}, targets)
    bce = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(2.0))).item() / 2
    # rel 0.15: the point draws leave about 0.02 of noise (abs 0.03 held for 80 % of seeds only);
    # the wrong divisors give 1.5 x (the 2 images) or 3 x (1)
    assert losses["loss_mask"].item() == pytest.approx(bce, rel=0.15)


def test_perfect_prediction_scores_lower_than_random():
    tgts = _targets(b=1, h=32, w=40)
    labels, masks = tgts[0]["labels"], tgts[0]["masks"]
    n = 6
    cls = torch.full((1, n, K + 1), -6.0)
    cls[0, :, K] = 6.0
    msk = torch.full((1, n, 32, 40), -6.0)
    for j, lab in enumerate(labels.tolist()):
        cls[0, j, :] = -6.0
        cls[0, j, lab] = 6.0
        msk[0, j][masks[j]] = 6.0
    crit = SetCriterion(K, HungarianMatcher(num_points=512), num_points=512)
    torch.manual_seed(0)
    good = crit({"class_logits": cls, "mask_logits": msk}, tgts)["loss"].item()
    bad = crit(_outputs(b=1, n=n, h=32, w=40, aux=0, requires_grad=False), tgts)["loss"].item()
    assert good < 0.2 * bad


def test_no_targets_gives_zero_mask_loss_with_graph():
    out = _outputs(aux=0)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 40, dtype=torch.bool)}] * 2
    losses = SetCriterion(K, HungarianMatcher(num_points=64), num_points=64)(out, empty)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    expected = F.cross_entropy(out.class_logits.transpose(1, 2), torch.full((2, 6), K))  # all no-object
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    losses["loss"].backward()
    assert out.mask_logits.grad is not None


def test_uncertain_points_prefer_the_boundary():
    # logits = x-coordinate ramp centred at 0: uncertain points crowd around x = 0.5.
    logits = torch.linspace(-10, 10, 64).repeat(64, 1)[None, None]
    torch.manual_seed(0)
    pts = sample_uncertain_points(logits, 1000, 3.0, 0.75)
    assert pts.shape == (1, 1000, 2) and 0 <= pts.min() and pts.max() <= 1
    near = (pts[0, :, 0] - 0.5).abs() < 0.2
    assert near.float().mean() > 0.75  # 750 uncertain points from the central 40 % + some random
    with pytest.raises(ValueError):
        SetCriterion(K, FixedMatcher(K), oversample_ratio=0.5)
    assert not math.isnan(pts.sum().item())


def test_the_random_points_are_fresh_draws_and_as_many_as_asked():
    """(1 - importance_sample_ratio) * P fresh uniform points, even when that is a single point;
    with oversample 1 they are new draws, not the candidates again (which would repeat points)."""
    pts = sample_uncertain_points(torch.zeros(2, 1, 4, 4), 4, 3.0, 0.75, generator=torch.Generator().manual_seed(0))
    assert pts.shape == (2, 4, 2)
    ramp = torch.linspace(-10, 10, 64).repeat(64, 1)[None, None]
    pts = sample_uncertain_points(ramp, 8, 1.0, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.unique(pts[0], dim=0).shape[0] == 8


def test_point_losses_against_hand_values():
    """Mask2Former's point losses, summed over masks and divided by the batch's target-mask count:
    logits 0 (s = 1/2) on points labelled [1, 0] give BCE ln 2 per point and dice
    1 - (2 * 1/2 + 1) / (1 + 1 + 1) = 1/3 per mask; two masks, normaliser 4."""
    from mpvss_ros.training.criterion import dice_loss, sigmoid_bce_loss

    logits = torch.zeros(2, 2)
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sigmoid_bce_loss(logits, labels, 4.0).item() == pytest.approx(2 * math.log(2) / 4)
    assert dice_loss(logits, labels, 4.0).item() == pytest.approx(2 * (1 / 3) / 4)
    # a perfect, confident prediction: no dice loss, BCE near 0
    sure = torch.tensor([[20.0, -20.0]])
    assert dice_loss(sure, labels[:1], 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_the_criterion_checks_its_settings_and_labels_and_samples_points_where_the_prediction_is_unsure(monkeypatch):
    """importance_sample_ratio must lie in [0, 1]; target labels outside 0..K-1 are refused; the
    uncertain points come from the matched predictions' logits (PointRend, as Mask2Former), not
    from the targets."""
    import mpvss_ros.training.criterion as criterion_module

    with pytest.raises(ValueError, match="importance_sample_ratio must be in"):
        SetCriterion(K, FixedMatcher(K), importance_sample_ratio=1.5)
    with pytest.raises(ValueError, match="importance_sample_ratio must be in"):
        SetCriterion(K, FixedMatcher(K), importance_sample_ratio=-0.25)
    with pytest.raises(ValueError, match="num_points must be >= 1, got 0"):
        SetCriterion(K, FixedMatcher(K), num_points=0)
    with pytest.raises(ValueError, match="expected num_classes"):  # K + 2 class logits
        SetCriterion(K, FixedMatcher(K), num_points=16).loss_labels(
            torch.zeros(1, 5, K + 2), [{"labels": torch.tensor([1])}], [(torch.tensor([1]), torch.tensor([0]))])
    out = _outputs(b=1, n=K, aux=0)
    with pytest.raises(ValueError, match=f"target labels must be in 0..{K - 1}"):  # K: the no-object column
        SetCriterion(K, HungarianMatcher(num_points=16), num_points=16)(
            out, [{"labels": torch.tensor([K]), "masks": torch.ones(1, 8, 10, dtype=torch.bool)}])
    with pytest.raises(ValueError, match=f"target labels must be in 0..{K - 1}"):  # negative: no class either
        SetCriterion(K, HungarianMatcher(num_points=16), num_points=16)(
            out, [{"labels": torch.tensor([-1]), "masks": torch.ones(1, 8, 10, dtype=torch.bool)}])
    crit = SetCriterion(K, FixedMatcher(K), num_points=16)
    seen = []
    real = criterion_module.sample_uncertain_points
    monkeypatch.setattr(criterion_module, "sample_uncertain_points", lambda logits, *a: seen.append(logits) or real(logits, *a))
    targets = _targets(b=1)
    crit(out, targets)
    src, tgt = FixedMatcher(K)(out.class_logits, out.mask_logits, targets)[0]
    torch.testing.assert_close(seen[0][:, 0], out.mask_logits[0, src].detach())
