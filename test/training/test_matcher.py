"""Hungarian and fixed matchers (spec section 3.4)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import mpvss_ros.training as training
from mpvss_ros.training.data import CamVidFrames
from mpvss_ros.training.matcher import FixedMatcher, HungarianMatcher, point_sample


def test_point_sample_hits_pixel_centres():
    maps = torch.arange(12.0).reshape(1, 1, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    coords = torch.stack([(xs.flatten() + 0.5) / 4, (ys.flatten() + 0.5) / 3], -1)[None]
    torch.testing.assert_close(point_sample(maps, coords)[0, 0], torch.arange(12.0))
    # halfway between two pixel centres -> the mean
    mid = torch.tensor([[[1.0 / 4, 0.5 / 3]]])
    assert point_sample(maps, mid).item() == pytest.approx(0.5)
    # on the image edge, half a pixel from the last centre, the zero padding enters (as PointRend)
    edge = point_sample(torch.ones(1, 1, 4, 4), torch.tensor([[[0.0, 0.5], [0.5, 0.5]]]))
    assert edge[0, 0].tolist() == pytest.approx([0.5, 1.0])


def _random_case(seed: int, n: int = 4, m: int = 3, k: int = 5):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(1, n, k + 1, generator=g) * 2
    mask_logits = torch.randn(1, n, 6, 8, generator=g) * 3
    labels = torch.randperm(k, generator=g)[:m]
    masks = torch.rand(m, 12, 16, generator=g) > 0.5  # targets at 2x the prediction resolution
    return class_logits, mask_logits, [{"labels": labels, "masks": masks}]


def _reference_cost(matcher, class_logits, mask_logits, tgt, seed):
    """Pair-by-pair cost with the same random points (generator reseeded)."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(1, matcher.num_points, 2, generator=g)
    pred = point_sample(mask_logits[0][None], coords)[0]
    gt = point_sample(tgt["masks"].float()[None], coords)[0]
    prob = class_logits[0].softmax(-1)
    n, m = pred.shape[0], gt.shape[0]
    cost = torch.zeros(n, m)
    for i in range(n):
        for j in range(m):
            bce = F.binary_cross_entropy(pred[i].sigmoid(), gt[j])
            s = pred[i].sigmoid()
            dice = 1 - (2 * (s * gt[j]).sum() + 1) / (s.sum() + gt[j].sum() + 1)
            cost[i, j] = -matcher.cost_class * prob[i, tgt["labels"][j]] + matcher.cost_mask * bce + matcher.cost_dice * dice
    return cost


@pytest.mark.parametrize("seed, weights", [*((s, (2.0, 5.0, 5.0)) for s in range(6)), (6, (2.0, 3.0, 7.0)),
                                           (7, (0.0, 0.0, 1.0)), (8, (1.0, 0.0, 0.0)), (9, (2.0, 5.0, 0.0))])
def test_cost_matrix_matches_pairwise_definition(seed, weights):
    """The spec's weights (2, 5, 5), and unequal ones: each weight multiplies its own term."""
    matcher = HungarianMatcher(*weights, num_points=300)
    cls, msk, tgts = _random_case(seed)
    cost = matcher.cost_matrix(cls[0], msk[0], tgts[0]["labels"], tgts[0]["masks"],
                               generator=torch.Generator().manual_seed(100 + seed))
    ref = _reference_cost(matcher, cls, msk, tgts[0], 100 + seed)
    torch.testing.assert_close(cost, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(20))
def test_hungarian_equals_brute_force(seed):
    matcher = HungarianMatcher(num_points=200)
    cls, msk, tgts = _random_case(seed)
    cost = matcher.cost_matrix(cls[0], msk[0], tgts[0]["labels"], tgts[0]["masks"],
                               generator=torch.Generator().manual_seed(seed))
    (rows, cols), = matcher(cls, msk, tgts, generator=torch.Generator().manual_seed(seed))
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert len(rows) == 3 and len(set(rows.tolist())) == 3 and sorted(cols.tolist()) == [0, 1, 2]
    assert torch.all(rows[1:] > rows[:-1])
    got = cost[rows, cols].sum().item()
    best = min(sum(cost[p[j], j].item() for j in range(3)) for p in itertools.permutations(range(4), 3))
    assert got == pytest.approx(best, abs=1e-5)


def test_hungarian_recovers_a_permutation():
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, :8] = True
    masks[1, 8:, :8] = True
    masks[2, 8:, 8:] = True
    labels = torch.tensor([4, 0, 2])
    perm = [2, 0, 3]  # prediction index of target j; prediction 1 is spare
    class_logits = torch.full((1, 4, 6), -5.0)
    class_logits[0, 1, 5] = 5.0
    mask_logits = torch.full((1, 4, 16, 16), -8.0)
    for j, i in enumerate(perm):
        class_logits[0, i, labels[j]] = 5.0
        mask_logits[0, i][masks[j]] = 8.0
    torch.manual_seed(0)
    (rows, cols), = HungarianMatcher()(class_logits, mask_logits, [{"labels": labels, "masks": masks}])
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 0, 2: 3}


def test_hungarian_batch_and_empty_targets():
    cls, msk, t1 = _random_case(0)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 12, 16, dtype=torch.bool)}
    out = HungarianMatcher(num_points=64)(torch.cat([cls, cls]), torch.cat([msk, msk]), [t1[0], empty])
    assert len(out[0][0]) == 3 and len(out[1][0]) == 0
    no_targets = HungarianMatcher(num_points=64).cost_matrix(cls[0], msk[0], empty["labels"], empty["masks"])
    assert no_targets.shape == (4, 0)  # (N, M) even for M = 0
    with pytest.raises(ValueError, match="disagree"):  # 4 class predictions, 3 mask predictions
        HungarianMatcher(num_points=64)(cls, msk[:, :3], t1)
    with pytest.raises(ValueError):
        HungarianMatcher()(cls, msk, t1 + t1)  # batch of 1, two targets
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)


@pytest.mark.parametrize("where, value", [("class", float("nan")), ("mask", float("nan")), ("mask", float("inf"))])
def test_a_non_finite_cost_is_refused(where, value):
    """NaN logits (a diverged step) would make scipy's solver raise its own error or assign at
    random: the matcher names the cause (documented: ValueError on a non-finite cost)."""
    cls, msk, tgts = _random_case(0)
    (cls if where == "class" else msk)[0, 1].view(-1)[0] = value
    with pytest.raises(ValueError, match="matching cost is not finite"):
        HungarianMatcher(num_points=64)(cls, msk, tgts, generator=torch.Generator().manual_seed(0))


def test_default_costs_are_the_spec_weights():
    # Spec section 3.4: C = 2 * class + 5 * BCE + 5 * dice on 112^2 points.
    m = HungarianMatcher()
    assert (m.cost_class, m.cost_mask, m.cost_dice, m.num_points) == (2.0, 5.0, 5.0, 12544)


def test_fixed_matcher():
    cls = torch.zeros(2, 12, 9)
    msk = torch.zeros(2, 12, 4, 4)
    t = [{"labels": torch.tensor([5, 2, 7]), "masks": torch.zeros(3, 8, 8)},
         {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}]
    out = FixedMatcher(8)(cls, msk, t)
    assert out[0][0].tolist() == [2, 5, 7] and out[0][1].tolist() == [1, 0, 2]
    assert out[1][0].numel() == 0 and out[1][0].dtype == torch.int64
    with pytest.raises(ValueError, match="num_queries"):
        FixedMatcher(20)(torch.zeros(2, 12, 21), msk, t)
    with pytest.raises(ValueError, match="num_queries >= num_classes, got 12 < 13"):  # one query short
        FixedMatcher(13)(torch.zeros(2, 12, 14), msk, t)
    with pytest.raises(ValueError, match="one mask per class"):
        FixedMatcher(8)(cls[:1], msk[:1], [{"labels": torch.tensor([1, 1]), "masks": torch.zeros(2, 8, 8)}])
    with pytest.raises(ValueError, match="labels"):
        FixedMatcher(8)(cls[:1], msk[:1], [{"labels": torch.tensor([8]), "masks": torch.zeros(1, 8, 8)}])
    with pytest.raises(ValueError, match="labels"):
        FixedMatcher(8)(cls[:1], msk[:1], [{"labels": torch.tensor([-1]), "masks": torch.zeros(1, 8, 8)}])
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        FixedMatcher(0)


def test_matcher_weights_are_checked():
    """Only all-zero weights are refused (one term alone is a valid matcher), and num_points >= 1."""
    HungarianMatcher(2.0, 0.0, 5.0)
    HungarianMatcher(0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="all matcher costs are zero"):
        HungarianMatcher(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="num_points must be >= 1, got 0"):
        HungarianMatcher(num_points=0)


def test_the_training_package_re_exports_its_light_pieces():
    """``from mpvss_ros.training import ...`` gives the light pieces themselves (the matchers,
    point_sample, the CamVid frames), and every name of its ``__all__``."""
    assert training.point_sample is point_sample
    assert training.FixedMatcher is FixedMatcher and training.HungarianMatcher is HungarianMatcher
    assert training.CamVidFrames is CamVidFrames
    for name in training.__all__:
        assert hasattr(training, name), name
