"""Chained flow (mpvss_ros.nn.warp.compose_flows and the chain_flow option of the propagators).

Composition is checked against hand-computed cases and against warping twice; the propagators
against the flows they are built from (query flow: the model's own ``query_flows``; DIS: OpenCV)
and, on a synthetic pan of a real frame, against the true motion.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvss_ros.nn.warp import compose_flows, warp_mask_logits
from mpvss_ros.propagation import (DIS_PRESETS, FLOW_PROPAGATORS, OPTICAL_FLOW_SCALE_RANGE, PROPAGATORS,
                                   CopyPropagator, FlowChain, OpticalFlowPropagator, QueryFlowPropagator,
                                   build_propagator, grid_hw, pool_flow)
from mpvss_ros.scheduling import FixedIntervalScheduler
from mpvss_ros.segmenter import Letterbox, VideoSegmenter, canvas_tensor

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _const(n: int, dx: float, dy: float, h: int = 12, w: int = 16) -> torch.Tensor:
    return torch.tensor([dx, dy], dtype=torch.float32).view(1, 1, 2, 1, 1).expand(1, n, 2, h, w).contiguous()


# ------------------------------------------------------------------ compose_flows


def test_constant_flows_add():
    out = compose_flows(_const(3, 1.5, -2.0), _const(3, -0.25, 4.0))
    torch.testing.assert_close(out, _const(3, 1.25, 2.0), atol=1e-5, rtol=0)


def test_zero_step_keeps_previous_and_zero_previous_gives_step():
    prev = torch.randn(1, 4, 2, 12, 16)
    step = torch.randn(1, 4, 2, 12, 16)
    torch.testing.assert_close(compose_flows(prev, torch.zeros_like(step)), prev, atol=1e-4, rtol=0)
    torch.testing.assert_close(compose_flows(torch.zeros_like(prev), step), step, atol=1e-6, rtol=0)


def test_previous_is_read_where_the_step_lands():
    """A hand case: prev has one non-zero cell; a step of +2 columns reads it from 2 columns left."""
    prev = torch.zeros(1, 1, 2, 5, 7)
    prev[0, 0, :, 2, 5] = torch.tensor([3.0, -1.0])
    out = compose_flows(prev, _const(1, 2.0, 0.0, 5, 7))
    assert out[0, 0, 0, 2, 3].item() == pytest.approx(5.0, abs=1e-5)  # 2 (step) + 3 (prev at column 5)
    assert out[0, 0, 1, 2, 3].item() == pytest.approx(-1.0, abs=1e-5)
    assert out[0, 0, 0, 2, 2].item() == pytest.approx(2.0, abs=1e-5)  # prev is zero at column 4


@settings(max_examples=25, deadline=None)
@given(dx=st.integers(-3, 3), dy=st.integers(-3, 3), ax=st.floats(-0.2, 0.2), ay=st.floats(-0.2, 0.2),
       bx=st.floats(-3, 3), by=st.floats(-3, 3))
def test_composition_is_exact_for_a_linear_flow_and_a_whole_pixel_step(dx, dy, ax, ay, bx, by):
    """prev(x, y) linear, step a whole-pixel shift: bilinear sampling of prev is exact inside."""
    h, w = 14, 18
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    prev = torch.stack((ax * xs + bx, ay * ys + by))[None, None]
    out = compose_flows(prev, _const(1, float(dx), float(dy), h, w))
    expected = torch.stack((dx + ax * (xs + dx) + bx, dy + ay * (ys + dy) + by))[None, None]
    m = 3  # the step leaves the grid within 3 cells of the edge (border padding there)
    torch.testing.assert_close(out[..., m:-m, m:-m], expected[..., m:-m, m:-m], atol=1e-4, rtol=0)


def test_warping_with_the_composed_flow_equals_warping_twice_for_translations():
    h, w = 24, 32
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    masks = torch.stack((torch.sin(xs / 3) * torch.cos(ys / 4), xs * 0.1 - ys * 0.05))[None]  # (1, 2, h, w)
    prev, step = _const(2, 2.0, -1.0, h, w), _const(2, -3.0, 2.0, h, w)
    once = warp_mask_logits(masks, compose_flows(prev, step))
    twice = warp_mask_logits(warp_mask_logits(masks, prev), step)
    m = 6
    torch.testing.assert_close(once[..., m:-m, m:-m], twice[..., m:-m, m:-m], atol=1e-4, rtol=0)


def test_a_shared_step_moves_every_query_flow():
    prev = torch.randn(1, 3, 2, 8, 10)
    step = torch.randn(1, 1, 2, 8, 10)
    out = compose_flows(prev, step)
    assert out.shape == (1, 3, 2, 8, 10)
    torch.testing.assert_close(out, compose_flows(prev, step.expand(1, 3, 2, 8, 10)), atol=1e-6, rtol=0)


def test_each_query_flow_is_composed_with_its_own_step():
    """Per-query steps and flows: query q's composed flow is the composition of its own pair, as
    if composed alone (a mix-up of queries and flow components would pair them otherwise)."""
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(1, 3, 2, 8, 10, generator=g) * 2
    step = torch.randn(1, 3, 2, 8, 10, generator=g) * 2
    out = compose_flows(prev, step)
    for q in range(3):
        torch.testing.assert_close(out[:, q : q + 1], compose_flows(prev[:, q : q + 1], step[:, q : q + 1]),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("prev, step", [
    ((1, 3, 2, 8, 10), (1, 3, 2, 8, 11)),   # grids differ
    ((1, 3, 2, 8, 10), (1, 2, 2, 8, 10)),   # query counts differ (neither is 1)
    ((1, 3, 3, 8, 10), (1, 3, 3, 8, 10)),   # not 2 channels
    ((3, 2, 8, 10), (3, 2, 8, 10)),         # no batch axis
    ((2, 3, 2, 8, 10), (1, 3, 2, 8, 10)),   # batch sizes differ
])
def test_bad_shapes_raise(prev, step):
    with pytest.raises(ValueError):
        compose_flows(torch.zeros(prev), torch.zeros(step))


# ------------------------------------------------------------------ FlowChain


def test_flow_chain_restarts_at_a_new_key_frame():
    chain = FlowChain()
    key_a, key_b = object(), object()
    assert chain.start(key_a, "a") == "a"
    chain.advance(_const(1, 1.0, 0.0), "f1")
    assert chain.start(key_a, "a") == "f1"  # same key: the chain goes on from the last frame
    total = chain.advance(_const(1, 2.0, 0.0), "f2")
    torch.testing.assert_close(total, _const(1, 3.0, 0.0), atol=1e-5, rtol=0)
    assert chain.start(key_b, "b") == "b" and chain.flow is None  # new key: a new chain


# ------------------------------------------------------------------ query flow


def _frames(bikes_frames, lite, idx):
    lb = Letterbox.fit(bikes_frames[0].shape[:2], tuple(lite.config.input.size), lite.config.input.size_divisibility)
    return [canvas_tensor(bikes_frames[i], lb) for i in idx], lb


@pytest.mark.parametrize("normalization", ["exact", "mmtrack"])
def test_chained_query_flow_is_the_composition_of_the_models_frame_to_frame_flows(lite, bikes_frames, monkeypatch,
                                                                                  normalization):
    """Chained query flow warps with the composition of the frame-to-frame flows, composed in the
    model's own warp normalisation: ``mmtrack`` (the official checkpoints') on the 72 x 160 mask
    grid of a ``bikes.mp4`` frame's 288 x 640 canvas (its height and width told apart)."""
    (f0, f1, f2, f3), lb = _frames(bikes_frames, lite, (0, 2, 4, 6))
    m = lite.model
    monkeypatch.setattr(m, "warp_normalization", normalization)
    monkeypatch.setattr(m.cfg.input, "warp_normalization", normalization)
    with torch.inference_mode():
        key = m.segment_key_frame(f0, lb.resized_hw)
        chained, direct = QueryFlowPropagator(m), QueryFlowPropagator(m, chain_flow=False)
        # the first frame after the key frame: one link, the same as the direct flow
        torch.testing.assert_close(chained.propagate(key, f1), direct.propagate(key, f1), atol=0, rtol=0)
        got2, got3 = chained.propagate(key, f2), chained.propagate(key, f3)
        mask_hw = tuple(key.mask_logits.shape[-2:])
        assert mask_hw == (72, 160)
        flow = compose_flows(compose_flows(m.query_flows(key, f1), m.query_flows(key, f2, f1), normalization, mask_hw),
                             m.query_flows(key, f3, f2), normalization, mask_hw)
        torch.testing.assert_close(got3, warp_mask_logits(key.mask_logits, flow, normalization), atol=1e-5, rtol=0)
        assert not torch.allclose(got2, direct.propagate(key, f2), atol=1e-3)  # chaining changed something
        # a new key state restarts the chain: again the direct flow
        key2 = m.segment_key_frame(f2, lb.resized_hw)
        torch.testing.assert_close(chained.propagate(key2, f3), direct.propagate(key2, f3), atol=0, rtol=0)
    assert chained.describe() == {"name": "query_flow", "chain_flow": True}
    assert direct.describe() == {"name": "query_flow", "chain_flow": False}


def test_query_flows_checks_the_canvas(lite, bikes_frames):
    (f0,), lb = _frames(bikes_frames, lite, (0,))
    with torch.inference_mode():
        key = lite.model.segment_key_frame(f0, lb.resized_hw)
        with pytest.raises(ValueError, match="reference frame canvas"):
            lite.model.query_flows(key, f0, f0[..., :-32])


# ------------------------------------------------------------------ optical flow


def _pan(frame: np.ndarray, n: int, step: int) -> list[np.ndarray]:
    """n frames panning over ``frame`` by ``step`` px per frame to the right: frame t shows
    columns [t * step, t * step + W') of the source (so content moves left)."""
    width = frame.shape[1] - n * step
    return [np.ascontiguousarray(frame[:, t * step : t * step + width]) for t in range(n)]


def test_chained_dis_is_the_composition_of_frame_to_frame_dis(band_model, bikes_frames):
    frames = _pan(bikes_frames[40], 4, 6)
    lb = Letterbox.fit(frames[0].shape[:2], tuple(band_model.cfg.input.size), band_model.cfg.input.size_divisibility)
    t = [canvas_tensor(f, lb) for f in frames]
    key = band_model.segment_key_frame(t[0], lb.resized_hw)
    prop = OpticalFlowPropagator()
    for x in t[1:]:
        got = prop.propagate(key, x)
    grey = [prop._grey(x) for x in t]
    links = [torch.from_numpy(prop.flow(grey[i], grey[i - 1])).permute(2, 0, 1)[None, None] for i in (1, 2, 3)]
    flow = compose_flows(compose_flows(links[0], links[1]), links[2])
    torch.testing.assert_close(got, warp_mask_logits(key.mask_logits, flow, "exact"), atol=1e-5, rtol=0)


def test_chained_dis_follows_a_long_pan(band_model, bikes_frames):
    """A synthetic pan of a real frame, 8 px per frame: after 8 frames (64 px) the chained flow
    still tracks the scene, far better than copying the key frame. (On a rigid pan the direct flow
    is the easier problem and scores higher, 99.8 against 98.0 % here: eight bilinear resamplings of
    the flow add up; chaining pays off on real video, where the scene changes between the key frame
    and the current one.)"""
    frames = _pan(bikes_frames[40], 9, 8)
    runs = {}
    for name, prop in (("chained", OpticalFlowPropagator()), ("direct", OpticalFlowPropagator(chain_flow=False)),
                       ("copy", CopyPropagator())):
        seg = VideoSegmenter(band_model, prop, FixedIntervalScheduler(20))
        runs[name] = [seg.push(f, i / 15) for i, f in enumerate(frames)][-1]
    truth = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(1)).push(frames[-1], 0.0)
    acc = {k: float((r.labels == truth.labels)[:, 80:-80].mean()) for k, r in runs.items()}  # away from the edges
    assert acc["copy"] < 0.9, acc  # the scene really moved
    assert acc["chained"] > acc["copy"] + 0.05 and acc["direct"] > acc["copy"] + 0.05, acc
    assert acc["chained"] > 0.95, acc


# ------------------------------------------------------------------ building


def test_build_propagator_passes_chain_flow(lite):
    assert FLOW_PROPAGATORS == ("query_flow", "optical_flow") and set(FLOW_PROPAGATORS) < set(PROPAGATORS)
    for name in FLOW_PROPAGATORS:
        assert build_propagator(name, lite.model).describe()["chain_flow"] is True
        assert build_propagator(name, lite.model, chain_flow=False).describe()["chain_flow"] is False
    assert build_propagator("copy", lite.model, chain_flow=False).describe() == {"name": "copy"}
    # optical flow takes its DIS preset and scale from the builder's arguments
    made = build_propagator("optical_flow", None, optical_flow_preset="medium", optical_flow_scale=0.25).describe()
    assert (made["method"], made["preset"], made["flow_scale"]) == ("dis", "medium", 0.25)
    with pytest.raises(ValueError, match="choose one of query_flow, optical_flow, copy"):
        build_propagator("per_frame", lite.model)


def test_pan_helper_moves_content_left(bikes_frames):
    a, b = _pan(bikes_frames[40], 2, 8)
    np.testing.assert_array_equal(a[:, 8:], b[:, :-8])
    assert cv2.absdiff(a, b).mean() > 1.0


def test_optical_flow_grid_stride_finer_than_the_flow_is_refused():
    # flow at 0.5 of the canvas cannot be pooled onto a 1.5-pixel grid: every non-key frame raised
    with pytest.raises(ValueError, match="grid_stride"):
        OpticalFlowPropagator(flow_scale=0.5, grid_stride=1.5)
    OpticalFlowPropagator(flow_scale=0.5, grid_stride=2.0)
    OpticalFlowPropagator(flow_scale=1.0, grid_stride=1.0)


@pytest.mark.parametrize("kwargs, words", [({"method": "lucas_kanade"}, "method"), ({"preset": "slow"}, "preset"),
                                           ({"flow_scale": 0.05}, "flow_scale"), ({"flow_scale": 1.5}, "flow_scale")])
def test_optical_flow_refuses_an_unknown_method_or_preset_and_a_scale_outside_its_range(kwargs, words):
    with pytest.raises(ValueError, match=words):
        OpticalFlowPropagator(**kwargs)
    # the scale range, (0.1, 1.0), is inclusive at both ends
    for inclusive in OPTICAL_FLOW_SCALE_RANGE:
        assert OpticalFlowPropagator(flow_scale=inclusive).flow_scale == inclusive


@pytest.mark.parametrize("hw, scale, stride", [((64, 96), 1.0, 8.0), ((64, 101), 0.5, 2.0), ((48, 128), 0.5, 6.0)])
def test_optical_flow_grid_stride_warps_with_the_pooled_flow(band_model, hw, scale, stride):
    """With grid_stride the flow is area-averaged onto ceil(H / stride) x ceil(W / stride) cells, at
    most the flow's own size (64 x 101 at scale 0.5, stride 2: 51 columns asked of a 50-column flow),
    before the masks are warped."""
    key = band_model.segment_key_frame(_texture_image(*hw, 3))
    current = _texture_image(*hw, 3, shift=4)
    prop = OpticalFlowPropagator(flow_scale=scale, grid_stride=stride, chain_flow=False)
    got = prop.propagate(key, current)
    flow = prop.flow(prop._grey(current), prop._grey(key.image))
    gh, gw = grid_hw(hw, stride)
    pooled = pool_flow(flow, (min(gh, flow.shape[0]), min(gw, flow.shape[1])))
    want = warp_mask_logits(key.mask_logits, torch.from_numpy(pooled).permute(2, 0, 1)[None, None], "exact")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chain_flow", [False, True])
def test_optical_flow_greys_each_new_key_frame(band_model, chain_flow):
    """After a new key frame the flow points into the new key frame's grey image, not the old one's."""
    key_a = band_model.segment_key_frame(_texture_image(64, 96, 1))
    key_b = band_model.segment_key_frame(_texture_image(64, 96, 1, shift=5))
    current = _texture_image(64, 96, 1, shift=3)
    prop = OpticalFlowPropagator(flow_scale=1.0, chain_flow=chain_flow)
    prop.propagate(key_a, current)
    fresh = OpticalFlowPropagator(flow_scale=1.0, chain_flow=chain_flow).propagate(key_b, current)
    torch.testing.assert_close(prop.propagate(key_b, current), fresh, atol=0, rtol=0)


# ------------------------------------------------------------------ details: the motion flag, active queries, DIS presets, grey images, flow pooling

def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth grey texture (h, w) uint8 that optical flow can track."""
    noise = np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.float32)
    return cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 2.0), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, h, w) float32 RGB 0..255 canvas tensor of a random colour image."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float()


def _texture_image(h: int, w: int, seed: int = 0, shift: int = 0) -> torch.Tensor:
    """(1, 3, h, w) float32 grey canvas tensor of :func:`_texture`, its content rolled ``shift`` px right."""
    grey = np.roll(_texture(h, w, seed), shift, axis=1)
    return torch.from_numpy(np.stack([grey] * 3)).float()[None]


def _grey_of(image: torch.Tensor) -> np.ndarray:
    rgb = image[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy()
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def test_query_flow_accepts_a_model_that_does_not_say_whether_its_motion_is_trained():
    # "anything with propagate(key, image) and query_flows(key, image, reference)"
    stub = SimpleNamespace(propagate=lambda key, image: ("warped", key, image))
    assert QueryFlowPropagator(stub, chain_flow=False).propagate("k", "i") == ("warped", "k", "i")
    with pytest.raises(ValueError, match="motion module"):
        QueryFlowPropagator(SimpleNamespace(motion_trained=False))


def test_every_propagator_carries_only_the_active_queries(band_model):
    """A key frame limited to some of its queries (``active``) gives the masks of those queries
    only, in that order: copied, warped by query flow (here a zero flow) or by optical flow (here
    between identical frames)."""
    image = _texture_image(64, 96)
    key = dataclasses.replace(band_model.segment_key_frame(image), active=torch.tensor([2, 0]))
    zero_flow = SimpleNamespace(cfg=SimpleNamespace(input=SimpleNamespace(warp_normalization="exact")),
                                query_flows=lambda key, image, reference: torch.zeros(1, 1, 2, 16, 24))
    for prop in (CopyPropagator(), QueryFlowPropagator(zero_flow), OpticalFlowPropagator(flow_scale=1.0)):
        torch.testing.assert_close(prop.propagate(key, image), key.mask_logits[:, [2, 0]], atol=1e-3, rtol=0,
                                   msg=prop.name)


def test_optical_flow_uses_the_dis_preset_asked_for():
    key, cur = _texture(96, 128, 1), np.roll(_texture(96, 128, 1), -3, axis=1)
    got = OpticalFlowPropagator(preset="ultrafast").flow(cur, key)
    want = cv2.DISOpticalFlow_create(DIS_PRESETS["ultrafast"]).calc(cur, key, None)
    fast = cv2.DISOpticalFlow_create(DIS_PRESETS["fast"]).calc(cur, key, None)
    assert not np.allclose(want, fast)  # the presets really differ on this pair
    np.testing.assert_array_equal(got, want)


def test_farneback_flow_points_from_the_current_frame_into_the_key_frame():
    key = _texture(96, 128, 2)
    cur = np.roll(key, -3, axis=1)  # current(x) = key(x + 3): the backward flow is +3 px in x
    flow = OpticalFlowPropagator("farneback", flow_scale=1.0).flow(cur, key)
    inner = flow[16:-16, 16:-16]
    assert float(np.median(inner[..., 0])) == pytest.approx(3.0, abs=0.5)
    assert float(np.median(inner[..., 1])) == pytest.approx(0.0, abs=0.5)
    # it is OpenCV's Farneback (not DIS), with the propagator's pyramid and window settings
    np.testing.assert_array_equal(flow, cv2.calcOpticalFlowFarneback(cur, key, None, 0.5, 3, 15, 3, 5, 1.2, 0))


def test_grey_clamps_values_outside_0_255_before_the_uint8_conversion():
    image = _image(48, 64, 3)
    image[..., :10, :] = 300.0
    image[..., -10:, :] = -20.0
    prop = OpticalFlowPropagator(flow_scale=1.0)
    np.testing.assert_array_equal(prop._grey(image), _grey_of(image))


def test_grey_keeps_both_sides_at_least_32_pixels():
    prop = OpticalFlowPropagator(flow_scale=0.5)
    assert prop._grey(_image(200, 48)).shape == (100, 32)
    assert prop._grey(_image(48, 200)).shape == (32, 100)


def test_grey_size_is_the_rounded_scaled_canvas():
    assert OpticalFlowPropagator(flow_scale=0.3)._grey(_image(222, 320)).shape == (67, 96)  # 66.6 -> 67


def test_grey_shrinks_with_area_interpolation():
    image = _image(120, 160, 4)  # 0.3: a non-integer factor, where linear and area resizing differ
    got = OpticalFlowPropagator(flow_scale=0.3)._grey(image)
    np.testing.assert_array_equal(got, cv2.resize(_grey_of(image), (48, 36), interpolation=cv2.INTER_AREA))


def test_grey_shrinking_one_side_while_the_other_grows_to_32_uses_area_interpolation():
    image = _image(24, 400, 5)  # width 400 -> 200 (shrinks), height 24 -> 32 (the minimum side)
    got = OpticalFlowPropagator(flow_scale=0.5)._grey(image)
    np.testing.assert_array_equal(got, cv2.resize(_grey_of(image), (200, 32), interpolation=cv2.INTER_AREA))


def test_grid_hw_rounds_each_side_up():
    assert grid_hw((100, 100), 16) == (7, 7)  # 6.25 cells: a partial cell is a cell
    assert grid_hw(torch.Size([33, 65]), 32 / 3) == (4, 7)


def test_pool_flow_averages_each_cell_in_the_coarser_grids_pixels():
    flow = np.zeros((40, 60, 2), np.float32)
    flow[..., 0], flow[..., 1] = 4.0, 2.0
    out = pool_flow(flow, (10, 20))
    assert out.shape == (10, 20, 2)
    np.testing.assert_allclose(out[..., 0], 4.0 * 20 / 60, rtol=1e-6)  # x scaled by gw / w
    np.testing.assert_allclose(out[..., 1], 2.0 * 10 / 40, rtol=1e-6)  # y by gh / h
    flow = np.zeros((6, 9, 2), np.float32)
    flow[:, 2::3, 0] = 3.0  # one column in three: each 3 x 3 cell averages to 1 px (of the fine grid)
    np.testing.assert_allclose(pool_flow(flow, (2, 3))[..., 0], 1.0 * 3 / 9, rtol=1e-6)


@pytest.mark.parametrize("shape, grid, words", [
    ((8, 8, 2), (9, 8), "within"), ((8, 8, 2), (8, 9), "within"), ((8, 8, 2), (0, 4), "within"),
    ((8, 8, 3), (4, 4), r"must be \(h, w, 2\)"), ((8, 8), (4, 4), r"must be \(h, w, 2\)"),
])
def test_pool_flow_refuses_a_grid_finer_than_the_flow_and_a_flow_not_h_w_2(shape, grid, words):
    with pytest.raises(ValueError, match=words):
        pool_flow(np.zeros(shape, np.float32), grid)


def test_describe_gives_no_dis_preset_for_farneback():
    assert OpticalFlowPropagator("farneback", preset="medium").describe()["preset"] is None
    assert OpticalFlowPropagator("dis", preset="medium").describe()["preset"] == "medium"
    assert OpticalFlowPropagator(flow_scale=0.25, grid_stride=8.0, preset="medium", chain_flow=False).describe() == {
        "name": "optical_flow", "method": "dis", "preset": "medium", "flow_scale": 0.25, "grid_stride": 8.0,
        "chain_flow": False}
