"""Synthetic stage-2 pairs with exact flow (mpvss_ros.training.synthetic) and their place in FramePairs.

The motion is checked against what it must be (a pure shift, an object's extra shift) and against
an independent estimate (OpenCV DIS on the synthetic pair of a real frame), so that a sign or
axis mix-up in the flow convention ``current(p) = key(p + flow(p))`` fails.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import mpvss_ros.training.pairs as pairs_module
from mpvss_ros.propagation import pool_flow
from mpvss_ros.training.pairs import FramePairs, LabelledFrames
from mpvss_ros.training.synthetic import SyntheticMotion, inverse_depth, synthetic_pair

STILL = dict(zoom=0.0, rotation_deg=0.0, travel_probability=0.0)
#: camera travel alone: no shift, zoom, rotation or moving object
TRAVEL_ONLY = dict(travel_probability=1.0, object_probability=0.0, max_shift=0.0, zoom=0.0, rotation_deg=0.0)


def _frame(bikes_frames) -> np.ndarray:
    return np.ascontiguousarray(bikes_frames[0][:240, :320]).astype(np.float32)


def test_pure_shift_moves_image_and_label_and_marks_the_uncovered_border(bikes_frames):
    key = _frame(bikes_frames)
    label = np.zeros(key.shape[:2], np.uint8)
    label[:, 160:] = 3
    motion = SyntheticMotion(max_shift=12.0, object_probability=0.0, **STILL)
    cur, cur_label, flow = synthetic_pair(key, label, np.random.default_rng(0), motion)
    sx, sy = flow[0, 0]
    assert np.allclose(flow[..., 0], sx, atol=1e-4) and np.allclose(flow[..., 1], sy, atol=1e-4)
    assert 0 < max(abs(sx), abs(sy)) <= 12.0
    h, w = label.shape
    ys, xs = slice(20, h - 20), slice(20, w - 20)
    shifted = cv2.remap(key, (np.mgrid[0:h, 0:w][1] + sx).astype(np.float32),
                        (np.mgrid[0:h, 0:w][0] + sy).astype(np.float32), cv2.INTER_LINEAR)
    assert np.abs(cur[ys, xs] - shifted[ys, xs]).max() < 1e-3
    # the label boundary at column 160 appears at 160 - sx in the current frame
    row = cur_label[h // 2]
    assert row[int(160 - sx) - 2] == 0 and row[int(160 - sx) + 2] == 3
    # pixels whose source lies outside the key frame are ignored
    if sx > 1:
        assert (cur_label[:, -1] == 255).all()
    elif sx < -1:
        assert (cur_label[:, 0] == 255).all()
    again = synthetic_pair(key, label, np.random.default_rng(0), motion)
    assert np.array_equal(again[0], cur) and np.array_equal(again[1], cur_label)  # same draws, same pair


def test_moving_object_gets_its_own_flow(bikes_frames):
    key = _frame(bikes_frames)
    label = np.zeros(key.shape[:2], np.uint8)
    label[100:160, 120:200] = 8  # a "car"
    motion = SyntheticMotion(max_shift=6.0, object_shift=16.0, object_probability=1.0, **STILL)
    for seed in range(5):
        cur, cur_label, flow = synthetic_pair(key, label, np.random.default_rng(seed), motion)
        bg = flow[5, 5]
        car = cur_label == 8
        assert car.sum() > 0.8 * 60 * 80
        # Car pixels of the current frame: the moved car (background flow + one rigid extra shift)
        # and, where the background still shows the key frame's car (no inpainting, as
        # FlyingChairs-style compositing), the background flow.
        extra = flow[car] - bg
        moved = np.abs(extra).max(axis=1) > 1e-3
        assert moved.sum() > 0.5 * car.sum()
        assert np.allclose(extra[moved], extra[moved][0], atol=1e-3)
        assert np.abs(extra[moved][0]).max() <= 16.0 + 1e-3
        # where the car is in the current frame, the key frame has the car at p + flow(p)
        ys, xs = np.nonzero(car)
        src_y = np.round(ys + flow[ys, xs, 1]).astype(int)
        src_x = np.round(xs + flow[ys, xs, 0]).astype(int)
        assert (label[src_y, src_x] == 8).mean() > 0.97


def test_dis_recovers_the_synthetic_flow_on_a_real_frame(bikes_frames):
    """An independent check of sign and axes: DIS on (current, key) matches the returned flow."""
    key = _frame(bikes_frames)
    label = np.zeros(key.shape[:2], np.uint8)
    motion = SyntheticMotion(max_shift=8.0, zoom=0.04, rotation_deg=1.0, object_probability=0.0, travel_probability=0.0)
    cur, _, flow = synthetic_pair(key, label, np.random.default_rng(3), motion)
    grey = lambda im: cv2.cvtColor(im.astype(np.uint8), cv2.COLOR_RGB2GRAY)  # noqa: E731
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(grey(cur), grey(key), None)
    inner = (slice(24, -24), slice(24, -24))
    epe = np.linalg.norm(dis[inner] - flow[inner], axis=-1)
    magnitude = np.linalg.norm(flow[inner], axis=-1)
    assert float(np.median(magnitude)) > 2.0  # the frame really moved
    assert float(np.median(epe)) < 0.25 * float(np.median(magnitude)), (np.median(epe), np.median(magnitude))


def test_synthetic_motion_rejects_bad_ranges():
    for bad in (dict(travel_probability=1.5), dict(object_probability=-0.1), dict(max_shift=-1.0),
                dict(max_travel=3.0), dict(max_travel=-0.5), dict(zoom=1.0), dict(zoom=1.5), dict(zoom=-0.1),
                dict(rotation_deg=-1.0), dict(object_shift=-1.0)):
        with pytest.raises(ValueError, match="SyntheticMotion"):
            SyntheticMotion(**bad)


def test_synthetic_pair_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same size"):
        synthetic_pair(np.zeros((8, 8, 3), np.float32), np.zeros((8, 9), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="same size"):
        synthetic_pair(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8), np.random.default_rng(0))


def test_frame_pairs_synthetic_fraction(camvid_train_dirs):
    labelled = LabelledFrames(*camvid_train_dirs)
    crop = (96, 128)
    fp = FramePairs(labelled, [], crop=crop, video_fraction=0.0, seed=4, synthetic_fraction=1.0,
                    flow_stride=8.0)
    for i in range(3):
        s = fp.sample(2, i)
        assert s.source == "synthetic" and s.has_flow
        assert s.key.shape == s.current.shape == (3, *crop) and s.label.shape == crop
        assert s.flow.shape == (2, *fp.grid) and torch.isfinite(s.flow).all()
        assert float(s.flow.abs().max()) > 0  # a real motion target, in grid pixels
        assert set(torch.unique(s.label).tolist()) <= set(range(11)) | {255}
        assert not torch.equal(s.key, s.current)
    again = FramePairs(labelled, [], crop=crop, video_fraction=0.0, seed=4, synthetic_fraction=1.0,
                       flow_stride=8.0).sample(2, 1)
    assert torch.equal(again.current, fp.sample(2, 1).current) and torch.equal(again.flow, fp.sample(2, 1).flow)
    # synthetic_fraction 0 leaves the non-synthetic stream exactly as it was
    plain = FramePairs(labelled, [], crop=crop, video_fraction=0.0, seed=4)
    zero = FramePairs(labelled, [], crop=crop, video_fraction=0.0, seed=4, synthetic_fraction=0.0)
    assert torch.equal(plain.sample(1, 0).current, zero.sample(1, 0).current)
    mixed = FramePairs(labelled, [], crop=crop, video_fraction=0.0, seed=4, synthetic_fraction=0.5)
    sources = [mixed.sample(s, i).source for s in range(4) for i in range(4)]
    assert {"synthetic", "camvid"} == set(sources)
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="synthetic_fraction"):
            FramePairs(labelled, [], crop=crop, synthetic_fraction=bad)


def test_pooled_synthetic_flow_is_in_grid_pixels(bikes_frames):
    key = _frame(bikes_frames)
    label = np.zeros(key.shape[:2], np.uint8)
    _, _, flow = synthetic_pair(key, label, np.random.default_rng(1),
                                SyntheticMotion(max_shift=16.0, object_probability=0.0, **STILL))
    pooled = pool_flow(flow, (15, 20))  # 16x coarser
    np.testing.assert_allclose(pooled[..., 0], flow[0, 0, 0] / 16, rtol=1e-4)
    np.testing.assert_allclose(pooled[..., 1], flow[0, 0, 1] / 16, rtol=1e-4)


def _street_label(h: int = 120, w: int = 160, car: bool = True) -> np.ndarray:
    """Sky above row 40, road below row 60, a building (1) between, optionally a car (8) on the road."""
    label = np.full((h, w), 3, np.uint8)
    label[:40] = 0
    label[40:60] = 1
    if car:
        label[70:100, 100:130] = 8
    return label


def test_inverse_depth_ground_plane_sky_and_upright_objects():
    label = _street_label()
    rho = inverse_depth(label, horizon=55.0)
    assert rho.dtype == np.float32 and rho.shape == label.shape
    assert (rho[:40] == 0).all()  # sky at infinity
    road_rows = rho[100:, 10]
    np.testing.assert_allclose(road_rows, (np.arange(100, 120) - 55.0) / (119 - 55.0), rtol=1e-5)
    # the building stands on the road at row 59 (its run's lowest row): one value per column,
    # the ground value of that row
    np.testing.assert_allclose(rho[40:60, 10], (59 - 55.0) / 64.0, rtol=1e-5)
    # the car's columns take the ground value of the car's lowest row (99), nearer than the building
    np.testing.assert_allclose(rho[70:100, 110], (99 - 55.0) / 64.0, rtol=1e-5)
    assert rho[80, 110] > rho[50, 110]
    assert 0.0 <= rho.min() and rho.max() <= 1.0
    assert (inverse_depth(label, horizon=20.0)[:40] == 0).all()  # sky below the horizon is still at infinity
    with pytest.raises(ValueError, match="horizon"):
        inverse_depth(label, horizon=119.0)
    with pytest.raises(ValueError, match="label"):
        inverse_depth(label[None], horizon=50.0)


def test_camera_travel_streams_out_from_the_focus_of_expansion():
    """Forward travel: current(p) samples the key frame nearer the focus of expansion, by more for
    nearer pixels; the sky does not move; image, label and flow stay consistent."""
    label = _street_label()
    rng = np.random.default_rng(0)
    key = rng.uniform(0, 255, (*label.shape, 3)).astype(np.float32)
    key = cv2.GaussianBlur(key, (0, 0), 1.5)
    motion = SyntheticMotion(max_travel=0.3, **TRAVEL_ONLY)
    seen_forward = False
    for seed in range(8):
        cur, cur_label, flow = synthetic_pair(key, label, np.random.default_rng(seed), motion)
        # the sky (rows 0..39 of the current frame, away from the building's edge) is still
        assert np.abs(flow[:30]).max() < 1e-4
        # ground pixels of one column move along the same line; the bottom row moves most
        col = flow[70:, 20]
        mag = np.linalg.norm(col, axis=-1)
        assert mag[-1] >= mag[0] - 1e-4
        # consistency: the current label is the key label at p + flow(p), where inside
        ys, xs = np.mgrid[0:120, 0:160]
        sx, sy = np.round(xs + flow[..., 0]).astype(int), np.round(ys + flow[..., 1]).astype(int)
        inside = (sx >= 0) & (sx < 160) & (sy >= 0) & (sy < 120)
        assert (cur_label[inside] == label[sy[inside], sx[inside]]).mean() > 0.97
        assert (cur_label[~inside] == 255).all()
        if mag[-1] > 2.0:
            seen_forward = True
            # radial about the focus of expansion: along the bottom row (all road) the x-flow is
            # linear in x, and it shrinks towards the focus (slope < 0) exactly when the row samples
            # the key frame higher up (forward travel, y-flow < 0), and grows when travelling back
            bottom = flow[-1, 5:-5]
            slope, offset = np.polyfit(np.arange(5, 155), bottom[:, 0], 1)
            assert np.abs(np.polyval([slope, offset], np.arange(5, 155)) - bottom[:, 0]).max() < 0.05
            assert np.allclose(bottom[:, 1], bottom[0, 1], atol=1e-3)
            assert np.sign(slope) == np.sign(bottom[0, 1]) and abs(bottom[0, 1]) > 1.0
    assert seen_forward


def test_frame_pairs_synthetic_camera_travel_draws_are_seeded(camvid_train_dirs):
    labelled = LabelledFrames(*camvid_train_dirs)
    travel = SyntheticMotion(**TRAVEL_ONLY)
    a = FramePairs(labelled, [], crop=(96, 128), video_fraction=0.0, seed=2, synthetic_fraction=1.0,
                   flow_stride=8.0, synthetic_motion=travel)
    b = FramePairs(labelled, [], crop=(96, 128), video_fraction=0.0, seed=2, synthetic_fraction=1.0,
                   flow_stride=8.0, synthetic_motion=travel)
    flows = [a.sample(0, i).flow for i in range(4)]
    assert all(torch.equal(f, b.sample(0, i).flow) for i, f in enumerate(flows))
    assert any(float(f.abs().max()) > 0.05 for f in flows)  # some crops really travel


def _key(h: int = 60, w: int = 80) -> np.ndarray:
    key = np.random.default_rng(7).uniform(0, 255, (h, w, 3)).astype(np.float32)
    return cv2.GaussianBlur(key, (0, 0), 1.5)


def _affine(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (M, t) with p + flow(p) = M p + t."""
    h, w = flow.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack([xx.ravel(), yy.ravel(), np.ones(h * w)], 1)
    rx = np.linalg.lstsq(a, (xx + flow[..., 0]).ravel(), rcond=None)[0]
    ry = np.linalg.lstsq(a, (yy + flow[..., 1]).ravel(), rcond=None)[0]
    return np.array([[rx[0], rx[1]], [ry[0], ry[1]]]), np.array([rx[2], ry[2]])


def test_background_motion_is_a_similarity_within_its_ranges():
    key, label = _key(), np.zeros((60, 80), np.uint8)
    motion = SyntheticMotion(max_shift=10.0, zoom=0.1, rotation_deg=3.0, object_probability=0.0)
    angles, scales = [], []
    for seed in range(24):
        _, _, flow = synthetic_pair(key, label, np.random.default_rng(seed), motion)
        m, _ = _affine(flow)
        assert abs(m[0, 0] - m[1, 1]) < 1e-4 and abs(m[0, 1] + m[1, 0]) < 1e-4  # rotation and zoom, no shear
        scales.append(float(np.hypot(m[0, 0], m[1, 0])))
        angles.append(float(np.degrees(np.arctan2(m[1, 0], m[0, 0]))))
    assert 0.9 - 1e-4 <= min(scales) < 1.0 < max(scales) <= 1.1 + 1e-4
    assert -3.0 - 1e-3 <= min(angles) < 0.0 < max(angles) <= 3.0 + 1e-3
    shifts = []
    for seed in range(24):
        _, _, flow = synthetic_pair(key, label, np.random.default_rng(seed),
                                    SyntheticMotion(max_shift=10.0, object_probability=0.0, **STILL))
        shifts.append(flow[0, 0])
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= 10.0 + 1e-4
    for axis in (0, 1):  # each axis drawn on its own, both directions
        assert shifts[:, axis].min() < -1.0 and shifts[:, axis].max() > 1.0
    assert np.abs(shifts[:, 0] - shifts[:, 1]).max() > 1.0


def test_object_shift_is_drawn_from_object_shift():
    key = _key(120, 160)
    label = np.zeros((120, 160), np.uint8)
    label[40:90, 50:110] = 8
    motion = SyntheticMotion(max_shift=0.0, object_shift=10.0, object_probability=1.0, **STILL)
    extras = []
    for seed in range(8):
        _, cur_label, flow = synthetic_pair(key, label, np.random.default_rng(seed), motion)
        extras.append(np.abs(flow[cur_label == 8]).max())
    assert max(extras) > 2.0 and max(extras) <= 10.0 + 1e-3


def test_a_thing_segment_below_the_minimum_area_and_the_background_never_move_on_their_own():
    key = _key(60, 80)
    label = np.zeros((60, 80), np.uint8)
    label[20:30, 30:40] = 8  # a car of 100 pixels, below min_object_area (150)
    motion = SyntheticMotion(max_shift=0.0, object_shift=10.0, object_probability=1.0, **STILL)
    for seed in range(8):
        _, _, flow = synthetic_pair(key, label, np.random.default_rng(seed), motion)
        assert np.abs(flow).max() < 1e-4, seed


def test_any_large_segment_of_a_thing_class_may_move():
    """The moving segment is drawn among all large segments of every thing class (a car, a pedestrian)."""
    key = _key(120, 160)
    label = np.zeros((120, 160), np.uint8)
    label[20:60, 20:60] = 8  # a car
    label[60:100, 100:140] = 9  # a pedestrian
    motion = SyntheticMotion(max_shift=0.0, object_shift=10.0, object_probability=1.0, **STILL)
    moved = set()
    for seed in range(12):
        _, _, flow = synthetic_pair(key, label, np.random.default_rng(seed), motion)
        moved |= {cls for cls in (8, 9) if np.abs(flow[label == cls]).max() > 1.0}
    assert moved == {8, 9}, moved


def test_void_exactly_where_the_source_is_outside_the_key_frame():
    key = _key()
    label = np.zeros((60, 80), np.uint8)
    label[:, 40:] = 3
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for motion in (SyntheticMotion(max_shift=5.5, object_probability=0.0, **STILL),
                   SyntheticMotion(max_shift=5.5, zoom=0.1, rotation_deg=3.0, object_probability=0.0)):
        for seed in range(6):
            _, cur_label, flow = synthetic_pair(key, label, np.random.default_rng(seed), motion)
            sx, sy = xx + flow[..., 0], yy + flow[..., 1]
            outside = (sx < 0) | (sx > w - 1) | (sy < 0) | (sy > h - 1)
            assert outside.any()
            assert (cur_label[outside] == 255).all() and (cur_label[~outside] != 255).all()


def test_key_border_is_replicated_in_the_current_frame():
    key = _key()
    label = np.zeros((60, 80), np.uint8)
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cur, _, flow = synthetic_pair(key, label, np.random.default_rng(0),
                                  SyntheticMotion(max_shift=8.0, object_probability=0.0, **STILL))
    assert np.abs(flow[0, 0]).max() > 1.0
    expected = cv2.remap(key, xx + flow[..., 0], yy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert np.abs(cur - expected).max() < 1e-3


def test_inverse_depth_above_the_horizon_is_zero_not_negative():
    label = _street_label()
    rho = inverse_depth(label, horizon=80.0)  # the building's contact row 59 and road rows 60..80 lie above it
    assert rho.min() >= 0.0
    assert (rho[40:81, 10] == 0).all()


def test_backward_travel_never_folds_through_the_focus_of_expansion():
    """max_travel just below 3: s >= -max_travel / 3 keeps 1 + s * rho > 0, so the bottom row's sources
    stay in order."""
    label = _street_label(car=False)
    key = _key(120, 160)
    motion = SyntheticMotion(max_travel=2.9, **TRAVEL_ONLY)
    for seed in range(16):
        _, _, flow = synthetic_pair(key, label, np.random.default_rng(seed), motion)
        src_x = np.arange(160) + flow[-1, :, 0]
        assert (np.diff(src_x) > 0).all(), seed


def test_focus_of_expansion_lies_in_the_middle_of_the_width():
    label = _street_label(car=False)
    key = _key(120, 160)
    motion = SyntheticMotion(max_travel=0.3, **TRAVEL_ONLY)
    foes = []
    for seed in range(16):
        _, _, flow = synthetic_pair(key, label, np.random.default_rng(seed), motion)
        slope, offset = np.polyfit(np.arange(160), flow[-1, :, 0], 1)
        if abs(slope) > 1e-3:
            foes.append(-offset / slope)
    assert len(foes) >= 8
    assert 0.3 * 160 - 0.5 <= min(foes) and max(foes) <= 0.7 * 160 + 0.5, foes


def test_travel_without_ground_expands_about_the_fallback_horizon():
    """A label without ground pixels puts the horizon at 0.45 of the height: the travel's fixed row."""
    label = np.ones((60, 100), np.uint8)  # all building
    key = _key(60, 100)
    for seed in range(4):
        _, _, flow = synthetic_pair(key, label, np.random.default_rng(seed), SyntheticMotion(**TRAVEL_ONLY))
        m, t = _affine(flow)
        if abs(m[1, 1] - 1) > 1e-3:
            assert abs(t[1] / (1 - m[1, 1]) - 0.45 * 60) < 0.5, seed


def test_zoom_and_rotation_turn_about_a_centre_in_the_middle_of_the_frame():
    """Without a shift, the similarity's fixed point is its centre: x in 0.3..0.7 of the width, y in
    0.3..0.6 of the height."""
    key, label = _key(60, 100), np.zeros((60, 100), np.uint8)
    motion = SyntheticMotion(max_shift=0.0, zoom=0.1, rotation_deg=3.0, object_probability=0.0)
    centres = []
    for seed in range(16):
        _, _, flow = synthetic_pair(key, label, np.random.default_rng(seed), motion)
        m, t = _affine(flow)
        if abs(np.linalg.det(np.eye(2) - m)) > 1e-3:
            centres.append(np.linalg.solve(np.eye(2) - m, t))
    centres = np.array(centres)
    assert len(centres) >= 8
    assert (0.3 * 100 - 0.5 <= centres[:, 0]).all() and (centres[:, 0] <= 0.7 * 100 + 0.5).all(), centres
    assert (0.3 * 60 - 0.5 <= centres[:, 1]).all() and (centres[:, 1] <= 0.6 * 60 + 0.5).all(), centres


def test_custom_sky_and_ground_classes_drive_the_travel():
    label = _street_label(car=False)
    custom = label.copy()
    custom[label == 0] = 5
    custom[label == 3] = 7
    key = _key(120, 160)
    for seed in range(3):
        _, _, flow = synthetic_pair(key, label, np.random.default_rng(seed), SyntheticMotion(**TRAVEL_ONLY))
        _, _, flow_custom = synthetic_pair(key, custom, np.random.default_rng(seed),
                                           SyntheticMotion(sky_classes=(5,), ground_classes=(7,), **TRAVEL_ONLY))
        assert np.abs(flow).max() > 0.5
        np.testing.assert_allclose(flow_custom, flow, atol=1e-5)


def test_frame_pairs_synthetic_sample_is_the_pair_with_flow_in_grid_pixels(camvid_train_dirs, monkeypatch):
    made = []

    def record(*args, **kwargs):
        made.append(synthetic_pair(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pairs_module, "synthetic_pair", record)
    labelled = LabelledFrames(*camvid_train_dirs)
    shift = SyntheticMotion(max_shift=16.0, object_probability=0.0, **STILL)
    fp = FramePairs(labelled, [], crop=(96, 128), video_fraction=0.0, seed=4, synthetic_fraction=1.0,
                    flow_stride=8.0, synthetic_motion=shift)
    yy, xx = np.mgrid[0:96, 0:128].astype(np.float32)
    for i in range(3):
        s = fp.sample(0, i)
        cur, cur_label, flow = made[-1]
        assert torch.equal(s.label, torch.from_numpy(cur_label.astype(np.int64)))  # the current frame's label
        assert torch.equal(s.current, torch.from_numpy(np.ascontiguousarray(cur.transpose(2, 0, 1))))
        # a shift of (sx, sy) image pixels is (sx, sy) / 8 flow-grid pixels
        np.testing.assert_allclose(s.flow[0].numpy(), flow[0, 0, 0] / 8, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.flow[1].numpy(), flow[0, 0, 1] / 8, rtol=1e-4, atol=1e-5)
        # current(p) = key(p + 8 * grid_flow) away from the border
        key = np.ascontiguousarray(s.key.numpy().transpose(1, 2, 0))
        fx, fy = 8 * float(s.flow[0, 0, 0]), 8 * float(s.flow[1, 0, 0])
        warped = cv2.remap(key, xx + fx, yy + fy, cv2.INTER_LINEAR)
        got = s.current.numpy().transpose(1, 2, 0)
        assert np.abs(warped[20:-20, 20:-20] - got[20:-20, 20:-20]).max() < 1e-2
