"""CamVid frames for training the key-frame segmentor (stage 1).

Layout (``shared/data/README.md``): ``<split>/`` holds 480x360 RGB PNGs, ``<split>annot/`` 8-bit
label PNGs with the same names, values 0..10 classes and 11 void. Labels are returned with void
(and anything outside ``0..num_classes-1``) mapped to ``ignore_index`` (255).

Training augmentation (applied in this order, all with OpenCV on numpy arrays):

1. random scale by s ~ U(scale) of both sides (``cv2.INTER_LINEAR`` image, ``INTER_NEAREST_EXACT``
   label);
2. random crop to ``crop`` = (H, W); where the scaled frame is smaller, it is first padded at
   the bottom/right with image 0 and label ``ignore_index``;
3. colour jitter (each with probability 0.5, modest): brightness +-``BRIGHTNESS_DELTA`` grey
   levels, contrast x U(1 -/+ ``CONTRAST_RANGE``), saturation x U(1 -/+ ``SATURATION_RANGE``)
   and hue +- ``HUE_DELTA_DEG`` degrees (float HSV), clipped to 0..255;
4. horizontal flip with probability 0.5.

Randomness: sample ``idx`` in epoch ``e`` uses ``np.random.default_rng([seed, e, idx])``, so a
sample is a pure function of (seed, epoch, index): repeatable, independent of worker count and
of the order samples are drawn in, and exactly resumable. Call :meth:`CamVidFrames.set_epoch`
at each epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..evaluation.metrics import IGNORE_INDEX
from ..io.video import read_image, read_label_png

__all__ = ["CamVidFrames", "list_frames", "load_frame",
           "decode_frames", "BRIGHTNESS_DELTA", "CONTRAST_RANGE", "SATURATION_RANGE", "HUE_DELTA_DEG"]

#: Colour jitter strengths (modest; applied each with probability 0.5).
BRIGHTNESS_DELTA = 24.0  # grey levels on the 0..255 scale
CONTRAST_RANGE = 0.2  # factor in [0.8, 1.2]
SATURATION_RANGE = 0.2  # factor in [0.8, 1.2]
HUE_DELTA_DEG = 9.0  # degrees on the 0..360 hue circle

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def list_frames(image_dir: str | Path, annot_dir: str | Path) -> list[tuple[Path, Path]]:
    """Sorted (image, label) path pairs: each image's label has its file name in ``annot_dir``,
    or its stem with ``.png`` (JPEG frames with PNG labels, as ``mpvss eval`` reads them). Hidden
    files and folders are no images.

    Raises:
        FileNotFoundError: a folder is missing, it holds no images, or an image has no label.
    """
    image_dir, annot_dir = Path(image_dir), Path(annot_dir)
    for d in (image_dir, annot_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"folder not found: {d}")
    # as image folders list theirs: no hidden files (macOS's ._frame.png) and no folders named *.png
    images = sorted(p for p in image_dir.iterdir()
                    if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".") and not p.is_dir())
    if not images:
        raise FileNotFoundError(f"no images in {image_dir}")
    pairs = []
    for img in images:
        candidates = dict.fromkeys([annot_dir / img.name, annot_dir / f"{img.stem}.png"])
        lab = next((c for c in candidates if c.is_file()), None)
        if lab is None:
            raise FileNotFoundError(f"label missing for {img.name}: expected {' or '.join(map(str, candidates))}")
        pairs.append((img, lab))
    return pairs


def _check_ignore_index(ignore_index: int, num_classes: int) -> int:
    """``ignore_index`` as an int, checked: labels are uint8, so void must be one of their values
    and no class ID (``num_classes..255``; torch's loss default -100 would wrap to 156, and pad
    as 0, a class).

    Raises:
        ValueError: outside ``num_classes..255``.
    """
    value = int(ignore_index)
    if not num_classes <= value <= 255:
        raise ValueError(f"ignore_index must be in {num_classes}..255 (uint8 labels, not a class ID), got {ignore_index}")
    return value


def load_frame(image_path: str | Path, label_path: str | Path, num_classes: int = 11,
               ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Read one frame; the image decoded as image folders decode theirs
    (:func:`~mpvss_ros.io.video.read_image`: a JPEG strictly, a PNG only with its chunks whole).

    Returns:
        image (H, W, 3) uint8 RGB and label (H, W) uint8 with values outside
        ``0..num_classes-1`` set to ``ignore_index``.

    Raises:
        FileNotFoundError: unreadable image (missing, cut short, damaged), or no label file.
        ValueError: the label cannot be read as class IDs (:func:`~mpvss_ros.io.video.read_label_png`:
            damaged, a palette PNG, several distinct channels) or has another size than the image;
            ``ignore_index`` outside ``num_classes..255`` (:func:`_check_ignore_index`).
    """
    ignore_index = _check_ignore_index(ignore_index, num_classes)
    try:  # as image folders decode: cv2.imread returned a JPEG cut short with grey rows, without an error
        rgb = read_image(image_path)
    except ValueError as exc:
        raise FileNotFoundError(f"cannot read image: {exc}") from None
    label = read_label_png(label_path)
    if label.shape != rgb.shape[:2]:
        raise ValueError(f"{label_path}: label {label.shape} vs image {rgb.shape[:2]}")
    # void before the cast: a 16-bit ID of 256 or more must not wrap onto a class
    label = np.where(label >= num_classes, ignore_index, label).astype(np.uint8)
    return rgb, label


def decode_frames(files: Sequence[tuple[Path, Path]], num_classes: int = 11, ignore_index: int = IGNORE_INDEX,
                  keep: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`load_frame` on every (image, label) path pair now, in order: a corrupt or mismatched
    frame fails before any training work, not when the data order first draws it (possibly hours
    in). Both stages call it before training; CamVid train's 367 frames take about 2 s here
    (docs/experiment_log.md, "Stop 37").

    Args:
        files: (image, label) paths, as :func:`list_frames` gives them.
        num_classes, ignore_index: as :func:`load_frame`.
        keep: return the decoded frames (stage 2 draws from them: 360 x 480 frames hold 0.66 MiB
            each, 242 MiB for CamVid train). False: only check, dropping each frame after it is
            read, so memory stays flat whatever the data's size (stage 1, which decodes a frame
            again each time it is drawn), and return an empty list.

    Returns:
        One (image (H, W, 3) uint8 RGB, label (H, W) uint8) per file pair, in order (empty without
        ``keep``).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_frame`, for the first bad frame.
    """
    decoded = []
    for image_path, label_path in files:
        frame = load_frame(image_path, label_path, num_classes=num_classes, ignore_index=ignore_index)
        if keep:
            decoded.append(frame)
    return decoded


def _color_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 RGB 0..255 -> jittered, clipped to 0..255 (float32)."""
    draws = rng.random(4)  # fixed number of draws per call keeps the stream layout stable
    params = rng.uniform(-1.0, 1.0, size=4)
    img = image
    if draws[0] < 0.5:
        img = img + BRIGHTNESS_DELTA * params[0]
    if draws[1] < 0.5:
        img = img * (1.0 + CONTRAST_RANGE * params[1])
    img = np.clip(img, 0.0, 255.0).astype(np.float32)
    if draws[2] < 0.5 or draws[3] < 0.5:
        hsv = cv2.cvtColor(img / 255.0, cv2.COLOR_RGB2HSV)  # float: H in [0, 360), S, V in [0, 1]
        if draws[2] < 0.5:
            hsv[..., 1] = np.clip(hsv[..., 1] * (1.0 + SATURATION_RANGE * params[2]), 0.0, 1.0)
        if draws[3] < 0.5:
            hsv[..., 0] = np.mod(hsv[..., 0] + HUE_DELTA_DEG * params[3], 360.0)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
    return np.clip(img, 0.0, 255.0).astype(np.float32)


class CamVidFrames(Dataset):
    """CamVid image/label pairs with Mask2Former-style training augmentation.

    Args:
        root_split_dir: image folder (e.g. ``camvid/train``).
        annot_dir: label folder (e.g. ``camvid/trainannot``).
        crop: (H, W) training crop in pixels (ignored when ``train=False``).
        scale: (min, max) random scale factors, min <= max, > 0.
        flip: random horizontal flip.
        color_jitter: random brightness/contrast/saturation/hue.
        train: False returns full frames with no augmentation at all.
        num_classes: label values >= this (CamVid void 11) become ``ignore_index``.
        ignore_index: the void value of the returned labels (255).
        seed: base seed of the per-sample generators.
        files: optional subset of file names (e.g. ``["0001TP_006690.png"]``) to use, in the
            given order; default all frames, sorted by name.

    Items: ``(image, label)`` with image (3, H, W) float32 RGB in 0..255 and label (H, W) int64
    (0..K-1, ``ignore_index`` for void).

    Raises:
        FileNotFoundError: folders or labels missing; a requested file not present.
        ValueError: bad crop or scale; ``ignore_index`` outside ``num_classes..255``.
    """

    def __init__(self, root_split_dir: str | Path, annot_dir: str | Path, crop: Sequence[int] = (240, 320),
                 scale: Sequence[float] = (0.75, 1.5), flip: bool = True, color_jitter: bool = True,
                 train: bool = True, num_classes: int = 11, ignore_index: int = IGNORE_INDEX, seed: int = 0,
                 files: Sequence[str] | None = None) -> None:
        pairs = list_frames(root_split_dir, annot_dir)
        if files is not None:
            by_name = {p[0].name: p for p in pairs}
            missing = [f for f in files if f not in by_name]
            if missing:
                raise FileNotFoundError(f"frames not found in {root_split_dir}: {missing}")
            pairs = [by_name[f] for f in files]
        if len(crop) != 2 or min(crop) < 1:
            raise ValueError(f"crop must be (H, W) with positive sizes, got {crop}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
        self.pairs = pairs
        self.crop = (int(crop[0]), int(crop[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.flip = bool(flip)
        self.color_jitter = bool(color_jitter)
        self.train = bool(train)
        self.num_classes = int(num_classes)
        self.ignore_index = _check_ignore_index(ignore_index, self.num_classes)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws :meth:`__getitem__` uses."""
        self.epoch = int(epoch)

    def names(self) -> list[str]:
        """File names in dataset order."""
        return [p[0].name for p in self.pairs]

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        image, label = load_frame(*self.pairs[idx], num_classes=self.num_classes, ignore_index=self.ignore_index)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, int(idx)])
            image, label = self.augment(image, label, rng)
        else:
            image = image.astype(np.float32)
        img_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        lab_t = torch.from_numpy(np.ascontiguousarray(label)).to(torch.int64)
        return img_t, lab_t

    def augment(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Scale, crop (with padding), colour jitter, flip (:func:`augment_frames` on one image).

        Args:
            image: (H, W, 3) uint8 RGB; label: (H, W) uint8.
            rng: the sample's generator.

        Returns:
            image (ch, cw, 3) float32 0..255 and label (ch, cw) uint8, (ch, cw) = ``crop``.
        """
        (image,), label = augment_frames([image], label, rng, self.crop, self.scale, self.flip,
                                         self.color_jitter, self.ignore_index)
        return image, label


def augment_frames(images: Sequence[np.ndarray], label: np.ndarray, rng: np.random.Generator,
                   crop: Sequence[int], scale: Sequence[float], flip: bool, color_jitter: bool,
                   ignore_index: int = IGNORE_INDEX) -> tuple[list[np.ndarray], np.ndarray]:
    """The same random scale, crop (with padding), colour jitter and flip on several frames.

    Used for single frames (stage 1) and for (key, current) pairs (stage 2: MPVSS shares the
    augmentation across the pair). The draws are the same whatever the options, so streams stay
    comparable between runs.

    Args:
        images: frames (H, W, 3) uint8 RGB of one size.
        label: (H, W) uint8 label of the last frame (``ignore_index`` = void).
        rng: the sample's generator.
        crop: (ch, cw) output size in pixels; scale: (min, max) factors.
        flip, color_jitter: enable those augmentations.
        ignore_index: label value of padded pixels.

    Returns:
        frames (ch, cw, 3) float32 0..255 and label (ch, cw) uint8.
    """
    s = rng.uniform(*scale)
    oy, ox = rng.random(2)
    do_flip = rng.random() < 0.5
    jitter_seed = rng.integers(0, 2**63 - 1)

    h, w = label.shape
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    if (nh, nw) != (h, w):
        images = [cv2.resize(im, (nw, nh), interpolation=cv2.INTER_LINEAR) for im in images]
        label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)  # centre-aligned as INTER_LINEAR
    ch, cw = int(crop[0]), int(crop[1])
    ph, pw = max(ch - nh, 0), max(cw - nw, 0)
    if ph or pw:
        images = [cv2.copyMakeBorder(im, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0)) for im in images]
        label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=ignore_index)
    hh, ww = label.shape
    y0 = int(oy * (hh - ch + 1))
    x0 = int(ox * (ww - cw + 1))
    out = [im[y0:y0 + ch, x0:x0 + cw].astype(np.float32) for im in images]
    label = label[y0:y0 + ch, x0:x0 + cw]
    if color_jitter:  # one parameter draw, applied alike to every frame
        out = [_color_jitter(im, np.random.default_rng(jitter_seed)) for im in out]
    if flip and do_flip:
        out = [im[:, ::-1] for im in out]
        label = label[:, ::-1]
    return out, label
