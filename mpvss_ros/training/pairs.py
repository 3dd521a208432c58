"""(key frame, current frame) pairs for stage 2, the query-based flow (MPVSS section 3.3).

Two sources, mixed in every batch (three with synthetic pairs):

* **CamVid train pairs** (labelled): consecutive labelled frames of one sequence (``<seq>_<raw
  index>.png``, 1 s apart at 30 fps), in both time orders; the target is the current frame's
  ground truth. Both orders are used because the motion between two frames is as informative
  backwards as forwards, and CamVid has only 362 forward pairs. Neighbours across a jump in the
  raw frame numbers (more than 1.5 times the sequence's median step) are no pair: 0016E5 skips
  65 s at 02400 -> 04350 and the val clip at 07920 -> 08190.
* **Video pairs** (unlabelled): frames ``d`` = 1..``max_gap`` apart inside one shot of a real
  clip, the earlier frame as key (as the official sampler); shots are split at hard cuts found
  with the scheduler's cut score (:meth:`~mpvss_ros.scheduling.SceneScorer.cut_score` >=
  ``DEFAULT_CUT_THRESHOLD``).
  The target is the frozen segmentor's own prediction on the current frame (pseudo-labels, as
  the issue specifies), with pixels below a confidence threshold void: in no target mask, as
  CamVid's void pixels (background for every mask, Mask2Former's semantic targets).

* **Synthetic pairs** (optional, ``synthetic_fraction``): one CamVid train frame and a copy of it
  resampled under a known motion (:mod:`.synthetic`), with the exact flow and label.

Every item also carries a flow target for the short video pairs: OpenCV DIS optical flow from the
current to the key frame on the augmented crop, averaged onto the motion module's flow grid and
expressed in pixels of that grid. It bootstraps the flow branch (see :mod:`.motion_trainer`);
CamVid pairs, 1 s apart, are too far apart for DIS and carry no flow target. Synthetic pairs
carry their exact flow, averaged onto the grid the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from ..config import InputConfig
from ..io.video import open_source
from ..propagation import DIS_PRESETS, grid_hw, pool_flow
from ..scheduling import DEFAULT_CUT_THRESHOLD, SceneScorer
from ..segmenter import Letterbox, resize_frame
from .data import augment_frames, decode_frames, list_frames, load_frame
from .synthetic import SyntheticMotion, synthetic_pair

__all__ = ["PairSample", "FramePairs", "LabelledFrames", "camvid_pairs", "check_camvid_pairs", "check_crop_on_flow_grid", "video_shots",
           "dis_flow_target", "FLOW_TARGET_DIS_PRESET", "load_clip_on_canvas"]

#: DIS preset of the video pairs' flow target (:func:`dis_flow_target`, full resolution of the pair).
FLOW_TARGET_DIS_PRESET = "medium"

_NAME = re.compile(r"^(?P<seq>.+)_(?P<index>[^_]+)$")


def _chw(image: np.ndarray) -> Tensor:
    """(H, W, 3) float32 -> (3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


@dataclass
class PairSample:
    """One training pair after augmentation.

    Attributes:
        key: (3, H, W) float32 RGB 0..255, the key frame.
        current: (3, H, W) float32 RGB 0..255, the frame the masks are warped to.
        label: (H, W) int64 target of the current frame, 255 = ignore.
        flow: (2, H/s, W/s) float32 DIS flow current -> key in flow-grid pixels (zeros if none).
        has_flow: whether ``flow`` is a real target.
        source: ``camvid``, ``video`` or ``synthetic``.
        links: video pairs of a :class:`FramePairs` with ``chain=True`` only: (d - 1, 3, H, W)
            float32, the frames strictly between the key frame and the current one (d frames
            apart; empty for d = 1), augmented alike; else None.
        link_flows: with ``links``: (d, 2, H/s, W/s) float32, the DIS target of every one-frame
            link, ``link_flows[j]`` from frame j + 1 to frame j (frame 0 = the key frame, frame d =
            the current one), as ``flow``; else None.
    """

    key: Tensor
    current: Tensor
    label: Tensor
    flow: Tensor
    has_flow: bool
    source: str
    links: Tensor | None = None
    link_flows: Tensor | None = None

    @property
    def frames_apart(self) -> int:
        """d: the number of one-frame links from the key frame to the current one (1 without ``links``)."""
        return 1 if self.links is None else 1 + int(self.links.shape[0])


def _frame_number(path: Path) -> int | None:
    """The raw frame number in ``<seq>_<index>`` (``0016E5_07920`` -> 7920, ``0006R0_f00930`` -> 930)."""
    m = _NAME.match(path.stem)
    digits = re.sub(r"\D", "", m.group("index")) if m else ""
    return int(digits) if digits else None


def check_crop_on_flow_grid(crop: Sequence[int], flow_stride: float) -> None:
    """Both crop sides are multiples of the motion module's flow stride, so the flow targets are
    averaged onto cells of exactly the model's flow-grid pixels (:func:`grid_hw`).

    Raises:
        ValueError: a side that is not (a 44-row crop at stride 8 averaged the targets onto cells
            of 7.3 pixels: flows 9 % larger in grid pixels than the model's).
    """
    if any(abs(side / flow_stride - round(side / flow_stride)) > 1e-6 for side in crop):
        raise ValueError(f"crop {crop[0]} x {crop[1]}: both sides must be multiples of the motion module's flow "
                         f"stride, {flow_stride:g} pixels (--crop H W)")


def camvid_pairs(files: Sequence[tuple[Path, Path]], both_orders: bool = True) -> list[tuple[Path, Path, Path]]:
    """(key image, current image, current label) paths of consecutive labelled frames per sequence.

    Args:
        files: (image, label) paths, as :func:`~mpvss_ros.training.data.list_frames` lists
            them; a frame's sequence and number come from its name ``<sequence>_<frame number>``,
            and a sequence's frames are paired in frame-number order (zero padding not needed).
        both_orders: also each pair backwards (current -> key).
    """
    by_seq: dict[str, list[tuple[Path, Path]]] = {}
    for img, lab in files:
        m = _NAME.match(img.stem)
        seq = m.group("seq") if m else img.stem
        by_seq.setdefault(seq, []).append((img, lab))
    pairs = []
    for items in by_seq.values():
        # raw frame numbers: a gap much longer than the sequence's usual labelling step is a jump in
        # the video (CamVid train 0016E5 skips 65 s at 02400 -> 04350 and the val clip at 07920 ->
        # 08190), and the two frames are no pair
        numbers = [_frame_number(img) for img, _ in items]
        if None not in numbers:  # in frame-number order, not the file names' (seq_2 before seq_12)
            order = sorted(range(len(items)), key=numbers.__getitem__)
            items, numbers = [items[j] for j in order], [numbers[j] for j in order]
        steps = [b - a for a, b in zip(numbers[:-1], numbers[1:])] if None not in numbers else []
        moving = [step for step in steps if step > 0]  # a repeated number is no step of the labelling
        usual = float(np.median(moving)) if moving else math.inf
        for i, ((k_img, k_lab), (c_img, c_lab)) in enumerate(zip(items[:-1], items[1:])):
            if steps and (steps[i] <= 0 or steps[i] > 1.5 * usual):  # a repeated number: no motion pair
                continue
            pairs.append((k_img, c_img, c_lab))
            if both_orders:
                pairs.append((c_img, k_img, k_lab))
    return pairs


def video_shots(frames: Sequence[np.ndarray],
                cut_threshold: float = DEFAULT_CUT_THRESHOLD) -> list[tuple[int, int]]:
    """Split a clip at hard cuts and size changes: [(start, end_exclusive)] of frames between them.

    A cut is a frame whose cut score against the previous frame
    (:meth:`SceneScorer.cut_score`, the adaptive scheduler's) is >= ``cut_threshold``. A frame of
    another size than the one before it (a resolution change, or a canvas turned for a portrait
    frame) also starts a shot, whatever its cut score, as it forces a key frame at inference: no
    pair joins frames of two sizes (one would be stretched to the other's).

    Args:
        frames: (H, W, 3) uint8 RGB frames of one clip, in order.
    """
    cuts = np.flatnonzero(SceneScorer().cut_scores(frames) >= cut_threshold).tolist()
    resized = [i for i in range(1, len(frames)) if frames[i].shape != frames[i - 1].shape]
    bounds = sorted({0, *cuts, *resized, len(frames)})
    return list(zip(bounds[:-1], bounds[1:]))


def dis_flow_target(current: np.ndarray, key: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """DIS optical flow current -> key (:data:`FLOW_TARGET_DIS_PRESET`, at the frames' own
    resolution), averaged onto a coarser grid, in that grid's pixels.

    Args:
        current, key: (H, W, 3) float32 or uint8 RGB frames of one size.
        grid_hw: (h, w) of the flow grid.

    Returns:
        (2, h, w) float32: x then y displacement in pixels of the (h, w) grid.
    """
    dis = cv2.DISOpticalFlow_create(DIS_PRESETS[FLOW_TARGET_DIS_PRESET])
    g_cur = cv2.cvtColor(np.clip(current, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    g_key = cv2.cvtColor(np.clip(key, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    flow = dis.calc(g_cur, g_key, None)  # (H, W, 2), image pixels
    return np.ascontiguousarray(pool_flow(flow, grid_hw).transpose(2, 0, 1), dtype=np.float32)


class LabelledFrames:
    """Stage 2's labelled frames (CamVid's layout), listed and paired once, each frame decoded once.

    The stage-2 trainer lists them before the model loads (to refuse data it cannot pair before
    any work, :func:`check_camvid_pairs`), decodes them all with :meth:`decode_all` before the
    pseudo-labelling, and :class:`FramePairs` draws from them. Without :meth:`decode_all` a frame
    is decoded when first used and kept.

    Args:
        image_dir, annot_dir: the image and label folders (CamVid train, never val).
        num_classes: K; label values outside ``0..K-1`` become 255 (ignore).

    Attributes:
        image_dir: the image folder (named in errors).
        files: sorted (image, label) paths (:func:`~mpvss_ros.training.data.list_frames`).
        pairs: (key image, current image, current label) paths of consecutive frames of one
            sequence, in both orders (:func:`camvid_pairs`).
        num_classes: K.

    Raises:
        FileNotFoundError: a folder missing, without images, or an image without its label.
    """

    def __init__(self, image_dir: str | Path, annot_dir: str | Path, num_classes: int = 11) -> None:
        self.image_dir = Path(image_dir)
        self.files = list_frames(image_dir, annot_dir)
        self.pairs = camvid_pairs(self.files)
        self.num_classes = int(num_classes)
        self._label_path = dict(self.files)
        self._decoded: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def decode_all(self) -> None:
        """Decode every frame now and keep them all (:func:`~mpvss_ros.training.data.decode_frames`;
        CamVid train: about 2 s and 242 MiB), so that a corrupt frame fails here rather than when
        first drawn. Pairs of two frames of different sizes are dropped from :attr:`pairs`: one
        would be cropped at the other's offsets or stretched to its size (:func:`video_shots` splits
        clips at size changes for the same reason).

        Raises:
            FileNotFoundError, ValueError: an unreadable frame, a label not single-channel or of
                another size than its image.
        """
        images = [image for image, _ in self.files]
        self._decoded = dict(zip(images, decode_frames(self.files, num_classes=self.num_classes)))
        size = {image: rgb.shape for image, (rgb, _) in self._decoded.items()}
        self.pairs = [p for p in self.pairs if size[p[0]] == size[p[1]]]

    def frame(self, image: Path) -> tuple[np.ndarray, np.ndarray]:
        """The listed frame whose image is ``image``: (H, W, 3) uint8 RGB and its (H, W) uint8 label
        (255 = ignore), decoded once; the arrays are shared, only to be read.

        Raises:
            KeyError: ``image`` is not a listed frame.
            FileNotFoundError, ValueError: as :meth:`decode_all`, for a frame decoded now.
        """
        if image not in self._decoded:
            self._decoded[image] = load_frame(image, self._label_path[image], num_classes=self.num_classes)
        return self._decoded[image]


def check_camvid_pairs(labelled: LabelledFrames, synthetic_fraction: float, video_fraction: float,
                       video_pairs: bool) -> None:
    """Refuse labelled frames without a pair when the draws need one.

    A draw that is neither synthetic (``synthetic_fraction``) nor a video pair (``video_fraction``,
    when there are video pairs) takes a pair of labelled frames, so one is needed unless every
    draw is synthetic (``synthetic_fraction`` 1: single labelled frames suffice) or a video pair
    (video pairs and ``video_fraction`` 1). The trainer checks before the model loads, with
    ``video_pairs`` = whether it has clips; :class:`FramePairs` checks again with the video pairs
    its clips gave.

    Raises:
        ValueError: ``labelled`` has no pair and the draws need one (names the naming rule and the
            options that train on video pairs only).
    """
    if not labelled.pairs and synthetic_fraction < 1 and (not video_pairs or video_fraction < 1):
        raise ValueError(f"{labelled.image_dir} holds no two consecutive labelled frames of one sequence, which "
                         f"stage 2 pairs: name them <sequence>_<frame number> (as CamVid's 0016E5_07920.png, "
                         f"0016E5_07950.png), or train on video pairs only (--video-fraction 1 with --videos)")


class FramePairs:
    """Random (key, current) pairs from CamVid and from unlabelled clips, with shared augmentation.

    Args:
        labelled: the labelled frames (CamVid train, never val): its pairs are the CamVid pairs, its
            frames the sources of synthetic pairs.
        clips: unlabelled videos, each a list of (H, W, 3) uint8 RGB frames already on the
            model's canvas scale, with its pseudo-labels (H, W) uint8 (255 = ignore).
        crop: (H, W) crop in pixels, each a multiple of ``flow_stride`` (8 for ``mpvss_lite``: the
            flow targets are averaged onto cells of exactly the model's flow-grid pixels).
        flow_stride: image pixels per flow-grid pixel (8 for MPVSS).
        max_gap: largest key-current distance of video pairs, in frames.
        video_fraction: probability that a non-synthetic sample is a video pair.
        synthetic_fraction: probability that a sample is a synthetic pair (drawn from its own
            generator, so 0 leaves the other samples exactly as without synthetic pairs).
        synthetic_motion: ranges of the synthetic motion (pixels of the crop).
        scale, flip, color_jitter: augmentation as stage 1.
        seed: base seed; ``sample(step, i)`` is a pure function of (seed, step, i).
        chain: video pairs also carry the frames between key and current and a DIS target per
            one-frame link (``PairSample.links``, ``link_flows``), to train the flow through the
            chain of one-frame flows that chained propagation composes; the rest of every sample
            is the same as without it.

    Raises:
        ValueError: ``synthetic_fraction`` outside [0, 1], draws that need a pair of labelled
            frames and none (:func:`check_camvid_pairs`), or a crop side that is no multiple of
            ``flow_stride`` (:func:`check_crop_on_flow_grid`).
    """

    def __init__(self, labelled: LabelledFrames, clips: Sequence[tuple[list[np.ndarray], list[np.ndarray]]],
                 crop: Sequence[int] = (256, 320), flow_stride: float = 8.0, max_gap: int = 10,
                 video_fraction: float = 0.5, scale: Sequence[float] = (0.75, 1.5), flip: bool = True,
                 color_jitter: bool = True, seed: int = 0, synthetic_fraction: float = 0.0,
                 synthetic_motion: SyntheticMotion = SyntheticMotion(), chain: bool = False) -> None:
        if not 0.0 <= synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
        self.labelled = labelled
        self.camvid = list(labelled.pairs)
        self.synthetic_fraction = synthetic_fraction
        self.synthetic_motion = synthetic_motion
        self.clips = list(clips)
        self.video = []  # (clip index, key index, current index)
        for c, (frames, _) in enumerate(self.clips):
            for start, end in video_shots(frames):
                for k in range(start, end):
                    for d in range(1, max_gap + 1):
                        if k + d < end:
                            self.video.append((c, k, k + d))
        check_camvid_pairs(labelled, synthetic_fraction, video_fraction, video_pairs=bool(self.video))
        self.crop = (int(crop[0]), int(crop[1]))
        check_crop_on_flow_grid(self.crop, flow_stride)
        self.grid = grid_hw(self.crop, flow_stride)
        self.video_fraction = video_fraction if self.video else 0.0
        self.scale, self.flip, self.color_jitter = scale, flip, color_jitter
        self.seed = seed
        self.chain = bool(chain)

    def sample(self, step: int, i: int) -> PairSample:
        """The i-th pair of a step's batch (deterministic given the seed).

        Raises:
            FileNotFoundError, ValueError: a labelled frame decoded now that cannot be read
                (:meth:`LabelledFrames.frame`), or a pair of two frame sizes (neither after
                :meth:`LabelledFrames.decode_all`).
        """
        if self.synthetic_fraction > 0:
            rng_s = np.random.default_rng([self.seed, 3, step, i])
            if rng_s.random() < self.synthetic_fraction:
                return self._synthetic(rng_s)
        rng = np.random.default_rng([self.seed, 2, step, i])
        if rng.random() < self.video_fraction:
            c, k, t = self.video[int(rng.integers(len(self.video)))]
            frames, labels = self.clips[c]
            sequence = frames[k:t + 1] if self.chain else [frames[k], frames[t]]
            label, source = labels[t], "video"
        else:
            k_img, c_img, _ = self.camvid[int(rng.integers(len(self.camvid)))]
            cur, label = self.labelled.frame(c_img)
            sequence, source = [self.labelled.frame(k_img)[0], cur], "camvid"
            if sequence[0].shape != cur.shape:  # only without decode_all, which drops such pairs
                raise ValueError(f"{k_img} and {c_img} are consecutive frames of different sizes "
                                 f"({sequence[0].shape[:2]} and {cur.shape[:2]}): no pair")
        # the draws do not depend on the number of frames: key, current and label are the same with chain
        seq_a, lab_a = augment_frames(sequence, label, rng, self.crop, self.scale, self.flip, self.color_jitter)
        key_a, cur_a = seq_a[0], seq_a[-1]
        links = link_flows = None
        if source == "video":
            has_flow = True
            if self.chain:
                links = torch.stack([_chw(f) for f in seq_a[1:-1]]) if len(seq_a) > 2 else \
                    torch.zeros((0, 3, *self.crop), dtype=torch.float32)
                per_link = [dis_flow_target(seq_a[j + 1], seq_a[j], self.grid) for j in range(len(seq_a) - 1)]
                link_flows = torch.from_numpy(np.stack(per_link))
                # one link is the pair itself: its target is the direct one, not computed twice
                flow = per_link[0] if len(per_link) == 1 else dis_flow_target(cur_a, key_a, self.grid)
            else:
                flow = dis_flow_target(cur_a, key_a, self.grid)
        else:
            flow, has_flow = np.zeros((2, *self.grid), np.float32), False
        return PairSample(_chw(key_a), _chw(cur_a), torch.from_numpy(np.ascontiguousarray(lab_a)).long(),
                          torch.from_numpy(flow), has_flow, source, links, link_flows)

    def _synthetic(self, rng: np.random.Generator) -> PairSample:
        img, _ = self.labelled.files[int(rng.integers(len(self.labelled.files)))]
        image, label = self.labelled.frame(img)
        (key,), label = augment_frames([image], label, rng, self.crop, self.scale, self.flip, self.color_jitter)
        cur, cur_label, flow = synthetic_pair(key, label, rng, self.synthetic_motion)
        grid_flow = pool_flow(flow, self.grid).transpose(2, 0, 1)
        return PairSample(_chw(key), _chw(cur), torch.from_numpy(cur_label.astype(np.int64)),
                          torch.from_numpy(np.ascontiguousarray(grid_flow, dtype=np.float32)), True, "synthetic")


def load_clip_on_canvas(path: str | Path, inp: InputConfig, limit: int | None = None) -> list[np.ndarray]:
    """A video's frames placed as inference places them (:meth:`~mpvss_ros.segmenter.Letterbox.for_input`,
    :func:`~mpvss_ros.segmenter.resize_frame`), without the padding.

    Args:
        path: a video file or image folder (:func:`~mpvss_ros.io.video.open_source`).
        inp: the model's ``InputConfig``: canvas (``size``, ``canvas_orientation``) and
            ``interpolation``.
        limit: at most this many frames (None: all).

    Returns:
        (h, w, 3) uint8 RGB frames, (h, w) the letterboxed size in pixels.

    Raises:
        as :func:`~mpvss_ros.io.video.open_source` and its frames (an unreadable video).
    """
    frames = []
    with open_source(path) as source:
        for frame in source:
            if limit is not None and len(frames) >= limit:
                break
            lb = Letterbox.for_input(frame.image.shape[:2], inp)
            frames.append(resize_frame(frame.image, lb.resized_hw, inp.interpolation))
    return frames
