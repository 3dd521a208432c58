"""Warping of mask logits with per-mask flows (mpvss_ros.nn.warp)."""

import math

import pytest
import torch

from mpvss_ros.nn.warp import compose_flows, warp_mask_logits


def _smooth_pattern(h: int, w: int, n: int = 1) -> torch.Tensor:
    ys = torch.arange(h, dtype=torch.float32).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, w)
    maps = [torch.sin(xs / (3.0 + i)) * torch.cos(ys / (4.0 + i)) * 5.0 + 0.1 * xs - 0.05 * ys for i in range(n)]
    return torch.stack(maps)[None]  # (1, n, h, w)


def test_zero_flow_is_identity_exact():
    masks = torch.randn(2, 5, 23, 37) * 10
    out = warp_mask_logits(masks, torch.zeros(2, 5, 2, 23, 37), "exact")
    rng = float(masks.max() - masks.min())
    # Documented tolerance: float32 rounding of the normalised grid, < 1e-5 x the range.
    assert (out - masks).abs().max().item() < 1e-5 * rng


def test_zero_flow_mmtrack_reproduces_reference_shift():
    # Spec 2.7: a 16-wide ramp warped with zero flow gives x * (W - 1) / W.
    ramp = torch.arange(16, dtype=torch.float32).view(1, 1, 1, 16).expand(1, 1, 4, 16).contiguous()
    out = warp_mask_logits(ramp, torch.zeros(1, 1, 2, 4, 16), "mmtrack")
    expected = torch.arange(16, dtype=torch.float32) * 15 / 16
    torch.testing.assert_close(out[0, 0, 0], expected, atol=1e-5, rtol=0)
    assert out[0, 0, 0, 1].item() == pytest.approx(0.9375, abs=1e-5)
    assert out[0, 0, 0, -1].item() == pytest.approx(14.0625, abs=1e-5)


@pytest.mark.parametrize("dx,dy", [(3, -2), (-5, 4), (0, 7)])
def test_translation_is_recovered(dx, dy):
    h, w = 40, 56
    big = _smooth_pattern(h + 20, w + 20)
    key = big[..., 10 : 10 + h, 10 : 10 + w]
    # The current frame sees the key content shifted: current(p) = key(p + d).
    current = big[..., 10 + dy : 10 + dy + h, 10 + dx : 10 + dx + w]
    flow = torch.tensor([float(dx), float(dy)]).view(1, 1, 2, 1, 1).expand(1, 1, 2, h, w)
    out = warp_mask_logits(key, flow, "exact")
    m = 8  # border padding differs from the true content near the edges
    torch.testing.assert_close(out[..., m:-m, m:-m], current[..., m:-m, m:-m], atol=1e-4, rtol=0)
    # And it is not trivially equal to the unwarped key.
    assert (key[..., m:-m, m:-m] - current[..., m:-m, m:-m]).abs().max() > 0.5


def test_each_mask_uses_its_own_flow():
    h, w = 32, 32
    key = _smooth_pattern(h, w, n=2)
    flows = torch.zeros(1, 2, 2, h, w)
    flows[0, 0, 0] = 2.0  # mask 0 moves by x+2, mask 1 by y-3
    flows[0, 1, 1] = -3.0
    out = warp_mask_logits(key, flows, "exact")
    one_0 = warp_mask_logits(key[:, :1], flows[:, :1], "exact")
    one_1 = warp_mask_logits(key[:, 1:], flows[:, 1:], "exact")
    torch.testing.assert_close(out[:, :1], one_0)
    torch.testing.assert_close(out[:, 1:], one_1)
    torch.testing.assert_close(out[0, 0, 4:-4, 4:-6], key[0, 0, 4:-4, 6:-4], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0, 1, 7:-4, 4:-4], key[0, 1, 4:-7, 4:-4], atol=1e-4, rtol=0)


@pytest.mark.parametrize("normalization", ["exact", "mmtrack"])
def test_each_sample_of_a_batch_uses_its_own_flows(normalization):
    """A batch of two with per-mask flows warps each sample's masks with that sample's flows."""
    g = torch.Generator().manual_seed(0)
    masks = torch.randn(2, 3, 12, 16, generator=g)
    flows = torch.randn(2, 3, 2, 6, 8, generator=g) * 2
    got = warp_mask_logits(masks, flows, normalization)
    for i in range(2):
        torch.testing.assert_close(got[i:i + 1], warp_mask_logits(masks[i:i + 1], flows[i:i + 1], normalization))


def test_shared_flow_equals_repeated_flow():
    key = torch.randn(1, 6, 24, 32)
    flow = torch.randn(1, 1, 2, 12, 16)
    shared = warp_mask_logits(key, flow, "exact")
    repeated = warp_mask_logits(key, flow.expand(1, 6, 2, 12, 16).contiguous(), "exact")
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=0)


def test_coarse_flow_is_scaled_to_the_mask_grid():
    # Flow of 1 px on a grid 2x coarser than the masks moves the masks by 2 px.
    h, w = 32, 48
    key = _smooth_pattern(h, w)
    flow = torch.zeros(1, 1, 2, h // 2, w // 2)
    flow[:, :, 0] = 1.0
    out = warp_mask_logits(key, flow, "exact")
    torch.testing.assert_close(out[..., :, 2:-4], key[..., :, 4:-2], atol=1e-4, rtol=0)


def test_coarse_flow_is_scaled_per_axis():
    # A flow grid 4x coarser than the masks in x and 2x in y: 1 px of x flow moves the masks by 4
    # columns, 1 px of y flow by 2 rows (each axis by its own ratio, w / wf and h / hf).
    h, w = 32, 48
    key = _smooth_pattern(h, w)
    flow_x = torch.zeros(1, 1, 2, h // 2, w // 4)
    flow_x[:, :, 0] = 1.0
    flow_y = torch.zeros(1, 1, 2, h // 2, w // 4)
    flow_y[:, :, 1] = 1.0
    out_x = warp_mask_logits(key, flow_x, "exact")
    out_y = warp_mask_logits(key, flow_y, "exact")
    torch.testing.assert_close(out_x[..., :, :-4], key[..., :, 4:], atol=1e-4, rtol=0)
    torch.testing.assert_close(out_y[..., :-2, :], key[..., 2:, :], atol=1e-4, rtol=0)


def test_zero_flow_mmtrack_shifts_rows_by_the_height():
    # mmtrack normalises y by H (and x by W): zero flow samples row y at y * (H - 1) / H, here on a
    # canvas wider than high, so normalising y by W would show.
    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1).expand(1, 1, 8, 16).contiguous()
    out = warp_mask_logits(ramp, torch.zeros(1, 1, 2, 8, 16), "mmtrack")
    torch.testing.assert_close(out[0, 0, :, 5], torch.arange(8, dtype=torch.float32) * 7 / 8, atol=1e-5, rtol=0)


def test_mmtrack_scales_both_flow_components_by_the_width_ratio():
    """mmtrack's flow_warp_feats upsamples the flow by one factor, W / wf, and multiplies both
    components by it (spec 2.7): a y flow of 1 flow-grid pixel moves 4 mask rows here, where the
    grids' height ratio is 2 (exact: 2 rows). Rows sampled at (y + 4) (H - 1) / H, clamped."""
    h, w, hf, wf = 16, 32, 8, 8
    rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 1, h, w).contiguous()
    flow = torch.zeros(1, 1, 2, hf, wf)
    flow[:, :, 1] = 1.0
    y = torch.arange(h, dtype=torch.float32)
    torch.testing.assert_close(warp_mask_logits(rows, flow, "mmtrack")[0, 0, :, 7],
                               ((y + 4) * (h - 1) / h).clamp(max=h - 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(warp_mask_logits(rows, flow, "exact")[0, 0, :, 7], (y + 2).clamp(max=h - 1),
                               atol=1e-4, rtol=0)


def test_coarse_flow_is_upsampled_with_half_pixel_centres():
    # The flow is upsampled like F.interpolate(align_corners=False): output column x reads the
    # coarse grid at x * wf / w - 0.25 (here wf = w / 2), clamped to the grid. The masks are the
    # column index, so the warped value is x + the upsampled flow (x 2 px per coarse px), clamped
    # to the last column by the border padding.
    h, w = 4, 16
    cols = torch.arange(w, dtype=torch.float32)
    key = cols.view(1, 1, 1, w).expand(1, 1, h, w).contiguous()
    slope = 0.2  # coarse flow = 0.2 * coarse column
    flow = torch.zeros(1, 1, 2, h, w // 2)
    flow[0, 0, 0] = slope * torch.arange(w // 2, dtype=torch.float32)
    out = warp_mask_logits(key, flow, "exact")
    src = (cols * (w // 2) / w - 0.25).clamp(0, w // 2 - 1)
    expected = (cols + 2 * slope * src).clamp(max=w - 1)
    for row in out[0, 0]:
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="normalization"):
        warp_mask_logits(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 4, 4), "bogus")
    with pytest.raises(ValueError):
        warp_mask_logits(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, 4, 4))
    with pytest.raises(ValueError):
        warp_mask_logits(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 3, 4, 4))
    assert math.isfinite(warp_mask_logits(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 2, 1, 1)).item())
    flow = torch.zeros(1, 1, 2, 4, 4)
    with pytest.raises(ValueError, match="normalization"):
        compose_flows(flow, flow, "bogus")
    with pytest.raises(ValueError, match="expected flows"):  # a step flow without 2 channels
        compose_flows(flow, torch.zeros(1, 1, 3, 4, 4))


@pytest.mark.parametrize("normalization", ["exact", "mmtrack"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_flow_gives_non_finite_masks(normalization, bad):
    """grid_sample clamps a NaN/inf sampling position to the border: a non-finite flow (an fp16
    overflow in the motion module) gave finite mask logits that no NaN check could see."""
    masks = torch.randn(1, 3, 8, 8)
    flows = torch.zeros(1, 3, 2, 4, 4)
    flows[0, 1, 0, 2, 2] = bad
    assert not torch.isfinite(warp_mask_logits(masks, flows, normalization)).any()
    assert torch.isfinite(warp_mask_logits(masks, torch.zeros(1, 3, 2, 4, 4), normalization)).all()
    huge = torch.full((1, 3, 2, 4, 4), 3e37)  # finite, but its sum overflows float32: still finite masks
    assert torch.isfinite(warp_mask_logits(masks, huge, normalization)).all()
    batch = torch.zeros(2, 3, 2, 4, 4)  # a non-finite value in the second sample's flows
    batch[1, 2, 1, 0, 0] = bad
    assert not torch.isfinite(warp_mask_logits(torch.randn(2, 3, 8, 8), batch, normalization)).any()


def _mmtrack_identity_flow(h: int, w: int, hf: int, wf: int) -> torch.Tensor:
    """(1, 1, 2, hf, wf): the mmtrack flow whose warp samples every mask pixel at itself (zero
    mmtrack flow samples column x at x (w - 1) / w; this flow undoes that)."""
    sx = w / wf
    xs, ys = torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32)
    fine = torch.stack([xs.view(1, w).expand(h, w) / (w - 1) / sx, ys.view(h, 1).expand(h, w) / (h - 1) / sx])
    return torch.nn.functional.avg_pool2d(fine[None], (h // hf, w // wf))[None]


@pytest.mark.parametrize("hf, wf", [(30, 54), (15, 54)])  # the mask grid 2x the flow grid; 4x in y, 2x in x
def test_composed_mmtrack_flows_sample_where_the_links_do(hf, wf):
    """The official checkpoints' mmtrack warp: links that each leave a static scene in place must
    compose to a flow that does too, and composing three smooth links must warp as the three warps
    in turn do (up to resampling). Composed as exact flows, the mmtrack shift was added once per
    link: 2.9 mask pixels after 4 identity links. With other ratios in y and x the y component
    is still scaled by w / wf (as mmtrack's), which the conversion to exact flows must follow."""

    h, w = 60, 108
    columns = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 1, h, w).contiguous()
    rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 1, h, w).contiguous()
    link = _mmtrack_identity_flow(h, w, hf, wf)
    chain = link
    for _ in range(3):
        chain = compose_flows(chain, link, "mmtrack", (h, w))
    for coordinate in (columns, rows):  # rows: the y ramp (a mutant without its half-pixel offset passed columns)
        shift = (warp_mask_logits(coordinate, chain, "mmtrack") - coordinate)[0, 0, 2:-2, 2:-2].abs().max()
        assert shift < 1e-3
    with pytest.raises(ValueError, match="needs mask_hw"):
        compose_flows(link, link, "mmtrack")

    g = torch.Generator().manual_seed(0)

    def smooth(n: int) -> torch.Tensor:
        coarse = torch.randn(1, n * 2, 4, 6, generator=g) * 1.5
        return torch.nn.functional.interpolate(coarse, size=(hf, wf), mode="bicubic",
                                               align_corners=False).view(1, n, 2, hf, wf)

    masks = torch.nn.functional.interpolate(torch.randn(1, 3, 8, 12, generator=g), size=(h, w), mode="bicubic",
                                            align_corners=False)
    f1, f2, f3 = smooth(3), smooth(3), smooth(3)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    error = {}
    for normalization in ("exact", "mmtrack"):
        in_turn = warp_mask_logits(warp_mask_logits(warp_mask_logits(masks, f1, normalization), f2, normalization),
                                   f3, normalization)
        composed = compose_flows(compose_flows(f1, f2, normalization, (h, w)), f3, normalization, (h, w))
        error[normalization] = float((in_turn - warp_mask_logits(masks, composed, normalization))[inner].abs().mean())
    # resampling three times is not resampling once: the exact path's own mean difference is 0.014
    # (of masks up to 3.7; 0.047 on the coarser grid); mmtrack now 0.014 (0.022) too, composed as
    # exact flows 0.18
    assert error["mmtrack"] < 2 * error["exact"] and error["exact"] < 0.05, error


# --------------------------------------------------------------- batch and query broadcasting

def test_a_per_query_step_moves_a_shared_previous_flow():
    """compose_flows returns (B, max(N, N_step), ...): a shared previous flow (N = 1) composed with
    per-query steps gives one flow per query, each as if the previous flow were repeated."""
    g = torch.Generator().manual_seed(1)
    previous = torch.randn(1, 1, 2, 12, 16, generator=g)
    step = torch.randn(1, 3, 2, 12, 16, generator=g)
    got = compose_flows(previous, step)
    assert got.shape == (1, 3, 2, 12, 16)
    torch.testing.assert_close(got, compose_flows(previous.expand(1, 3, 2, 12, 16).contiguous(), step))
    for q in range(3):
        torch.testing.assert_close(got[:, q:q + 1], compose_flows(previous, step[:, q:q + 1]))


def test_a_flow_batch_other_than_the_masks_batch_is_a_value_error():
    with pytest.raises(ValueError, match="do not match"):
        warp_mask_logits(torch.zeros(1, 3, 8, 8), torch.zeros(2, 3, 2, 8, 8))
    with pytest.raises(ValueError, match="do not match"):
        warp_mask_logits(torch.zeros(2, 3, 8, 8), torch.zeros(1, 1, 2, 4, 4))
