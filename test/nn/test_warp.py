"""Warping of mask logits with per-mask flows (mpvss_ros.nn.warp)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mpvss_ros.nn.warp import WARP_NORMALIZATIONS, compose_flows, mmtrack_to_exact, warp_mask_logits
from mpvss_ros.propagation import FlowChain

pytestmark = pytest.mark.usefixtures("torch_single_thread")


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


# --------------------------------------------------------------- property-based (hypothesis)
# Random masks (B 1-2, N 1-6, 4x4 to 24x32), per-mask or shared flows on the mask grid or a coarser
# one (zero, whole-pixel, fractional, non-finite, far out of the frame), checked against the
# docstrings' definition of the warp and of the composition.

_PROPERTY_SETTINGS = settings(max_examples=100, deadline=None)


def _translation(b: int, dx: float, dy: float, h: int, w: int) -> torch.Tensor:
    """(b, 1, 2, h, w): one shared flow of (dx, dy) pixels everywhere."""
    return torch.tensor([float(dx), float(dy)]).view(1, 1, 2, 1, 1).expand(b, 1, 2, h, w)


@st.composite
def _warp_case(draw, max_flow: float = 6.0):
    """Random (masks, flows, normalization): B 1-2, N 1-6, masks 4x4..24x32, per-mask or shared
    flows on the mask grid or a coarser one, of whole or fractional pixels (or zero)."""
    b, n = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    h, w = draw(st.integers(4, 24)), draw(st.integers(4, 32))
    hf = draw(st.sampled_from(sorted({h, max(1, h // 2), max(1, h // 3), draw(st.integers(1, h))})))
    wf = draw(st.sampled_from(sorted({w, max(1, w // 2), max(1, w // 4), draw(st.integers(1, w))})))
    fn = draw(st.sampled_from([1, n]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    masks = torch.randn(b, n, h, w, generator=g) * draw(st.sampled_from([1.0, 10.0]))
    kind = draw(st.sampled_from(["zero", "whole", "fractional"]))
    if kind == "zero":
        flows = torch.zeros(b, fn, 2, hf, wf)
    elif kind == "whole":
        flows = torch.randint(-int(max_flow), int(max_flow) + 1, (b, fn, 2, hf, wf), generator=g).float()
    else:
        flows = (torch.rand(b, fn, 2, hf, wf, generator=g) * 2 - 1) * max_flow
    return masks, flows, draw(st.sampled_from(WARP_NORMALIZATIONS))


def _expected_warp(masks: torch.Tensor, flows: torch.Tensor, normalization: str) -> np.ndarray:
    """The documented warp, computed pixel by pixel in float64: the flow upsampled bilinearly
    (align_corners=False) to (h, w) and scaled per axis by w / wf, h / hf (mmtrack: both by w / wf);
    pixel p samples the mask at p + flow(p) ('exact') or at (p + flow(p)) (W - 1) / W per axis
    ('mmtrack'), bilinearly, the position clamped to the frame (border padding)."""
    b, n, h, w = masks.shape
    fb, fn, _, hf, wf = flows.shape
    up = flows.double().reshape(b * fn, 2, hf, wf)
    if (hf, wf) != (h, w):
        up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
    up = up.reshape(b, fn, 2, h, w).expand(b, n, 2, h, w).numpy()
    sx, sy = (w / wf, w / wf) if normalization == "mmtrack" else (w / wf, h / hf)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    px, py = xs + up[:, :, 0] * sx, ys + up[:, :, 1] * sy
    if normalization == "mmtrack":
        px, py = px * (w - 1) / w, py * (h - 1) / h
    px, py = np.clip(px, 0, w - 1), np.clip(py, 0, h - 1)
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ax, ay = px - x0, py - y0
    m = masks.double().numpy()
    bi, ni = np.meshgrid(np.arange(b), np.arange(n), indexing="ij")
    bi, ni = bi[:, :, None, None], ni[:, :, None, None]
    return ((1 - ay) * ((1 - ax) * m[bi, ni, y0, x0] + ax * m[bi, ni, y0, x1])
            + ay * ((1 - ax) * m[bi, ni, y1, x0] + ax * m[bi, ni, y1, x1]))


@_PROPERTY_SETTINGS
@given(case=_warp_case())
def test_warp_samples_each_mask_where_its_flow_points(case):
    """Every output pixel is the key mask sampled (bilinear, border) at the documented position;
    float32 (B, N, h, w) out; the inputs are left as they were."""
    masks, flows, normalization = case
    masks_before, flows_before = masks.clone(), flows.clone()
    out = warp_mask_logits(masks, flows, normalization)
    assert out.dtype == torch.float32 and out.shape == masks.shape
    assert torch.equal(masks, masks_before) and torch.equal(flows, flows_before)
    scale = float(masks.abs().max()) + 1.0
    np.testing.assert_allclose(out.numpy(), _expected_warp(masks, flows, normalization), rtol=0, atol=1e-4 * scale)


@_PROPERTY_SETTINGS
@given(case=_warp_case(), data=st.data())
def test_warp_zero_flow_translation_permutation_and_shared_flow(case, data):
    """Zero flow is the identity ('exact'); a whole-pixel constant flow on the mask grid moves the
    masks by exactly that many pixels ('exact', clamped at the border); permuting masks with their
    flows permutes the output; a shared flow warps as that flow repeated for every mask."""
    masks, flows, normalization = case
    b, n, h, w = masks.shape
    hf, wf = flows.shape[-2:]
    rng = float(masks.max() - masks.min()) + 1e-6
    if normalization == "exact":
        same = warp_mask_logits(masks, torch.zeros(b, flows.shape[1], 2, hf, wf), "exact")
        assert (same - masks).abs().max().item() < 1e-5 * rng
        dx, dy = data.draw(st.integers(-40, 40)), data.draw(st.integers(-40, 40))
        moved = warp_mask_logits(masks, _translation(b, dx, dy, h, w), "exact")
        rows = torch.arange(h).add(dy).clamp(0, h - 1)
        cols = torch.arange(w).add(dx).clamp(0, w - 1)
        torch.testing.assert_close(moved, masks[:, :, rows][..., cols], atol=1e-5 * rng, rtol=0)
    out = warp_mask_logits(masks, flows, normalization)
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    permuted = warp_mask_logits(masks[:, perm], flows[:, perm] if flows.shape[1] == n else flows, normalization)
    torch.testing.assert_close(permuted, out[:, perm], atol=1e-6 * rng, rtol=0)
    shared = flows[:, :1]
    repeated = warp_mask_logits(masks, shared.expand(b, n, 2, hf, wf).contiguous(), normalization)
    torch.testing.assert_close(warp_mask_logits(masks, shared, normalization), repeated, atol=1e-5 * rng, rtol=0)


@_PROPERTY_SETTINGS
@given(case=_warp_case(), data=st.data())
def test_non_finite_and_out_of_frame_flows(case, data):
    """A NaN or infinite flow value anywhere makes the whole output NaN (documented); a huge finite
    flow pointing out of the frame gives the finite border row/column (border padding)."""
    masks, flows, normalization = case
    b, fn, _, hf, wf = flows.shape
    bad = flows.clone()
    idx = tuple(data.draw(st.integers(0, s - 1)) for s in bad.shape)
    bad[idx] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    before = bad.clone()
    out = warp_mask_logits(masks, bad, normalization)
    assert torch.isnan(out).all() and out.dtype == torch.float32
    assert torch.equal(torch.isnan(bad), torch.isnan(before))
    big = data.draw(st.sampled_from([1e4, 1e6, -1e4, -1e6]))
    far = torch.zeros(b, fn, 2, hf, wf)
    far[:, :, 0] = big
    out = warp_mask_logits(masks, far, normalization)
    edge = masks[..., -1:] if big > 0 else masks[..., :1]
    assert torch.isfinite(out).all()
    expected = edge.expand_as(masks) if normalization == "exact" else torch.from_numpy(
        _expected_warp(masks, far, normalization)).float()
    rng = float(masks.max() - masks.min()) + 1e-6  # float32 rounding of the normalised grid, as documented
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * rng)
    if normalization == "exact":
        far_y = torch.zeros(b, fn, 2, hf, wf)
        far_y[:, :, 1] = big
        edge = masks[..., -1:, :] if big > 0 else masks[..., :1, :]
        torch.testing.assert_close(warp_mask_logits(masks, far_y, "exact"), edge.expand_as(masks), rtol=0,
                                   atol=1e-5 * rng)


_BAD_SHAPES = [
    ((1, 3, 8, 8), (1, 2, 2, 8, 8)),      # N flows neither 1 nor the mask count
    ((1, 3, 8, 8), (1, 3, 3, 8, 8)),      # 3 flow channels
    ((1, 3, 8, 8), (1, 3, 1, 8, 8)),      # 1 flow channel
    ((1, 3, 8, 8), (2, 3, 2, 8, 8)),      # batch sizes differ
    ((2, 3, 8, 8), (1, 1, 2, 8, 8)),      # batch sizes differ, shared flow
    ((3, 8, 8), (1, 3, 2, 8, 8)),         # masks without a batch axis
    ((1, 3, 8, 8), (3, 2, 8, 8)),         # flows without a mask axis
    ((1, 1, 3, 8, 8), (1, 1, 2, 8, 8)),   # masks with 5 axes
]
_BAD_STEPS = [(1, 3, 2, 8, 9), (1, 3, 2, 7, 8), (1, 2, 2, 8, 8), (2, 3, 2, 8, 8), (1, 3, 3, 8, 8), (3, 2, 8, 8)]


@settings(max_examples=60, deadline=None)
@given(shapes=st.sampled_from(_BAD_SHAPES), step_shape=st.sampled_from(_BAD_STEPS),
       normalization=st.sampled_from(WARP_NORMALIZATIONS + ("bogus", "")))
def test_bad_shapes_and_normalisations_are_value_errors(shapes, step_shape, normalization):
    """Mismatched batch/mask counts, a flow without 2 channels, wrong ranks or an unknown
    normalisation raise ValueError (not another exception) from warp and compose alike."""
    masks, flows = torch.zeros(shapes[0]), torch.zeros(shapes[1])
    with pytest.raises(ValueError):
        warp_mask_logits(masks, flows, normalization)
    good = torch.zeros(1, 3, 2, 8, 8)
    with pytest.raises(ValueError):
        compose_flows(good, torch.zeros(step_shape), normalization, (8, 8))
    if normalization not in WARP_NORMALIZATIONS:
        with pytest.raises(ValueError):
            warp_mask_logits(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 4, 4), normalization)
        with pytest.raises(ValueError):
            compose_flows(good, good, normalization, (8, 8))


def _linear_masks(b: int, n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Masks a x + c y + d per mask: bilinear sampling reproduces them exactly inside the frame."""
    coef = torch.randn(b, n, 3, 1, 1, generator=g)
    ys = torch.arange(h, dtype=torch.float32).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, w)
    return coef[:, :, 0] * xs + coef[:, :, 1] * ys + coef[:, :, 2]


@_PROPERTY_SETTINGS
@given(b=st.integers(1, 2), n=st.integers(1, 6), h=st.integers(12, 24), w=st.integers(12, 32),
       shared=st.sampled_from(["none", "previous", "step"]), normalization=st.sampled_from(WARP_NORMALIZATIONS),
       seed=st.integers(0, 2**31 - 1), steps=st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)),
                                                       min_size=2, max_size=2))
def test_composed_flows_warp_as_the_links_in_turn(b, n, h, w, shared, normalization, seed, steps):
    """compose(previous, step) warps as previous then step (linear masks, inside the frame, both
    normalisations); composing with zero flow is the identity and two whole-pixel translations
    compose to their sum ('exact'); the result is float32 (B, max(N, N_step), 2, h, w) and the
    inputs are not modified."""
    g = torch.Generator().manual_seed(seed)
    n_prev, n_step = (1 if shared == "previous" else n), (1 if shared == "step" else n)
    previous = torch.rand(b, n_prev, 2, h, w, generator=g) * 2 - 1
    step = torch.rand(b, n_step, 2, h, w, generator=g) * 2 - 1
    before = previous.clone(), step.clone()
    composed = compose_flows(previous, step, normalization, (h, w))
    assert composed.dtype == torch.float32 and composed.shape == (b, n, 2, h, w)
    assert torch.equal(previous, before[0]) and torch.equal(step, before[1])
    masks = _linear_masks(b, n, h, w, g)
    once = warp_mask_logits(masks, composed, normalization)
    in_turn = warp_mask_logits(warp_mask_logits(masks, previous, normalization), step, normalization)
    m = 5  # |flow| <= 1 per link (plus mmtrack's shift of up to 1 px): no clamping inside this margin
    torch.testing.assert_close(once[..., m:-m, m:-m], in_turn[..., m:-m, m:-m], atol=1e-3, rtol=0)
    zero = torch.zeros(b, n_step, 2, h, w)
    torch.testing.assert_close(compose_flows(previous, zero), previous.expand(b, n, 2, h, w), atol=1e-5, rtol=0)
    torch.testing.assert_close(compose_flows(torch.zeros_like(previous), step), step.expand(b, n, 2, h, w),
                               atol=1e-6, rtol=0)
    (ax, ay), (bx, by) = steps
    total = compose_flows(_translation(b, ax, ay, h, w), _translation(b, bx, by, h, w))
    torch.testing.assert_close(total, _translation(b, ax + bx, ay + by, h, w), atol=1e-5, rtol=0)


@_PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), hf=st.integers(2, 12), wf=st.integers(2, 16), k=st.integers(1, 3))
def test_mmtrack_to_exact_round_trips(seed, hf, wf, k):
    """mmtrack_to_exact(inverse=True) undoes mmtrack_to_exact (masks k x the flow grid)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(1, 2, 2, hf, wf, generator=g) * 3
    back = mmtrack_to_exact(mmtrack_to_exact(f, (hf * k, wf * k)), (hf * k, wf * k), inverse=True)
    torch.testing.assert_close(back, f, atol=1e-4, rtol=0)


@_PROPERTY_SETTINGS
@given(ops=st.lists(st.one_of(st.tuples(st.just("key"), st.integers(0, 2)),
                              st.tuples(st.just("step"), st.integers(-2, 2), st.integers(-2, 2))),
                    min_size=1, max_size=12),
       normalization=st.sampled_from(WARP_NORMALIZATIONS), seed=st.integers(0, 2**31 - 1))
def test_flow_chain_follows_key_frames_and_whole_pixel_steps(ops, normalization, seed):
    """A FlowChain fed a random sequence of key frames and whole-pixel steps: start() gives the key
    frame's reference right after a new key frame (and drops the old flow), else the last frame;
    advance() returns a float32 flow of the step's shape that is the sum of the steps since the key
    frame ('exact') and, both normalisations, warps the key frame's (linear) masks as the steps
    since the key frame do in turn, inside the frame."""
    h, w = 24, 32
    g = torch.Generator().manual_seed(seed)
    keys = [SimpleNamespace(mask_logits=_linear_masks(1, 2, h, w, g)) for _ in range(3)]
    chain = FlowChain()
    key_idx = 0
    since_key, total, in_turn, moved = [], (0, 0), keys[0].mask_logits, 0
    assert chain.start(keys[0], "key0") == "key0"
    for frame, op in enumerate(ops):
        if op[0] == "key":
            if op[1] != key_idx:
                key_idx, since_key, total, in_turn, moved = op[1], [], (0, 0), keys[op[1]].mask_logits, 0
                assert chain.start(keys[key_idx], f"key{key_idx}") == f"key{key_idx}" and chain.flow is None
            continue
        assert chain.start(keys[key_idx], "ignored") == (since_key[-1] if since_key else f"key{key_idx}")
        step = _translation(1, op[1], op[2], h, w)
        flow = chain.advance(step, f"frame{frame}", normalization)
        since_key.append(f"frame{frame}")
        total = (total[0] + op[1], total[1] + op[2])
        assert flow.dtype == torch.float32 and flow.shape == (1, 1, 2, h, w)
        if normalization == "exact":
            torch.testing.assert_close(flow, _translation(1, *total, h, w), atol=1e-4, rtol=0)
        in_turn = warp_mask_logits(in_turn, step, normalization)
        moved += max(abs(op[1]), abs(op[2])) + 1  # + mmtrack's shift of < 1 pixel per warp
        if 2 * moved < min(h, w) - 2:
            once = warp_mask_logits(keys[key_idx].mask_logits, flow, normalization)
            torch.testing.assert_close(once[..., moved:-moved, moved:-moved],
                                       in_turn[..., moved:-moved, moved:-moved], atol=1e-3, rtol=0)


@_PROPERTY_SETTINGS
@given(b=st.integers(1, 2), n=st.integers(1, 4), hf=st.integers(12, 18), wf=st.integers(12, 18),
       ky=st.integers(1, 3), kx=st.integers(1, 3), normalization=st.sampled_from(WARP_NORMALIZATIONS),
       seed=st.integers(0, 2**31 - 1))
def test_composed_affine_flows_on_a_coarse_grid_warp_as_the_links_in_turn(b, n, hf, wf, ky, kx, normalization,
                                                                           seed):
    """Affine flows on a flow grid coarser than the masks (ratios per axis 1-3), linear masks:
    warping once with compose(previous, step, mask_hw) equals warping with previous then step
    inside the frame, both normalisations (mmtrack: y scaled by w / wf, as documented)."""
    g = torch.Generator().manual_seed(seed)
    h, w = hf * ky, wf * kx
    ys = torch.arange(hf, dtype=torch.float32).view(hf, 1)
    xs = torch.arange(wf, dtype=torch.float32).view(1, wf)

    def affine() -> torch.Tensor:
        c = (torch.rand(b, n, 2, 3, 1, 1, generator=g) * 2 - 1) * torch.tensor([0.3, 0.01, 0.01]).view(1, 1, 1, 3, 1, 1)
        return c[:, :, :, 0] + c[:, :, :, 1] * xs + c[:, :, :, 2] * ys

    previous, step = affine(), affine()
    masks = _linear_masks(b, n, h, w, g)
    composed = compose_flows(previous, step, normalization, (h, w))
    once = warp_mask_logits(masks, composed, normalization)
    in_turn = warp_mask_logits(warp_mask_logits(masks, previous, normalization), step, normalization)
    # each link moves < 0.6 flow-grid pixels (mmtrack: y by w / wf mask rows, plus its shift of < 1)
    my, mx = math.ceil(2.2 * (kx if normalization == "mmtrack" else ky)) + 2, math.ceil(2.2 * kx) + 2
    assume(h > 2 * my + 2)
    torch.testing.assert_close(once[..., my:-my, mx:-mx], in_turn[..., my:-my, mx:-mx], atol=2e-3, rtol=0)
