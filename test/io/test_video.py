"""Tests of mpvss_ros.io.video: frame sources, the video writer and label PNGs."""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import with_exif_orientation

from mpvss_ros.io import check_pixel_limit, jpeg
from mpvss_ros.io.samples import bikes_clip, dashcam_clip
from mpvss_ros.io.video import (
    FPS_RANGE,
    Frame,
    MAX_BAD_READS,
    MAX_VIDEO_SIDE,
    ImageFolderSource,
    VideoFileSource,
    VideoWriter,
    check_fps,
    decoded_to_rgb,
    open_source,
    png_damage,
    png_size,
    read_label_png,
    write_label_png,
)
from mpvss_ros.offline import SegmentOptions, segment_path


def _bikes() -> Path:
    try:
        return bikes_clip()
    except FileNotFoundError as exc:
        pytest.skip(f"bikes.mp4 unavailable: {exc}")


def _write_bgr(path: Path, rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _stand_in_video(tmp_path: Path, monkeypatch, make_capture, name: str = "v.mp4") -> tuple[Path, list]:
    """A video file that :class:`VideoFileSource` opens with ``make_capture()`` (a
    ``cv2.VideoCapture`` stand-in) instead of OpenCV: its path, and the captures opened so far."""
    path = tmp_path / name
    path.write_bytes(b"opened by the stand-in")
    captures: list = []

    def open_capture(_path):
        captures.append(make_capture())
        return captures[-1]

    monkeypatch.setattr(VideoFileSource, "_open_capture", staticmethod(open_capture))
    return path, captures


# ------------------------------------------------------------------ real video


def test_bikes_clip_frames():
    with open_source(_bikes()) as src:
        assert isinstance(src, VideoFileSource)
        assert src.fps == pytest.approx(25.0)
        assert src.name == "bikes"
        expected = len(src)
        assert expected == 250
        frames = 0
        last_stamp = -1.0
        for frame in src:
            assert frame.index == frames
            assert frame.name == f"{frames:06d}"
            assert frame.stamp == pytest.approx(frames / 25.0)
            assert frame.stamp > last_stamp
            last_stamp = frame.stamp
            if frames == 0:
                assert frame.image.shape == (272, 640, 3)
                assert frame.image.dtype == np.uint8
                assert frame.image.flags.c_contiguous
            frames += 1
        assert frames == expected
    assert src.closed
    with pytest.raises(ValueError, match="closed"):
        iter(src)


def test_bikes_rgb_order_matches_opencv_bgr():
    path = _bikes()
    cap = cv2.VideoCapture(str(path))
    ok, bgr = cap.read()
    cap.release()
    assert ok
    with open_source(path) as src:
        first = next(iter(src))
    np.testing.assert_array_equal(first.image, bgr[:, :, ::-1])


def test_reiteration_restarts_and_fps_override():
    with open_source(_bikes(), fps=10.0) as src:
        assert src.fps == 10.0
        it = iter(src)
        for _ in range(3):
            next(it)
        again = next(iter(src))
        assert again.index == 0
        assert next(it).index == 3
        assert next(it).stamp == pytest.approx(0.4)


def test_dashcam_first_frames():
    path = dashcam_clip()
    if path is None:
        pytest.skip("shared data (../shared/data/video/solidWhiteRight.mp4) not available")
    with open_source(path) as src:
        assert src.fps == pytest.approx(25.0)
        assert len(src) == 221
        for frame, _ in zip(src, range(3)):
            assert frame.image.shape == (540, 960, 3)
            assert frame.image.dtype == np.uint8


# ------------------------------------------------------------------ errors


def test_damaged_stretch_of_a_video_is_skipped_not_the_rest(tmp_path, caplog):
    # 50 KB zeroed a quarter into bikes.mp4: OpenCV fails to decode some frames there, then
    # recovers; decoding used to stop at the first failure and lose two thirds of the clip
    data = bytearray(_bikes().read_bytes())
    quarter = len(data) // 4
    data[quarter : quarter + 50_000] = bytes(50_000)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    with caplog.at_level("WARNING"), open_source(damaged) as src:
        frames = [(f.index, f.stamp, f.name) for f in src]
        count = len(src)
    indices = [i for i, _, _ in frames]
    gaps = [b - a for a, b in zip(indices, indices[1:]) if b - a > 1]
    assert count == 250 and 200 <= len(frames) < 250 and len(gaps) >= 1
    assert indices == sorted(indices) and indices[-1] == 249  # read to the end
    assert all(stamp == pytest.approx(i / 25.0) and name == f"{i:06d}" for i, stamp, name in frames)
    skipped = 250 - len(frames)
    assert f"skipped {skipped} undecodable frames" in caplog.text and "truncated" not in caplog.text


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        open_source(tmp_path / "nope.mp4")
    with pytest.raises(FileNotFoundError, match="input not found"):  # the video source itself, not an OpenCV error
        VideoFileSource(tmp_path / "nope.mp4")


def test_open_source_expands_the_home_folder(tmp_path, monkeypatch):
    """A path given as ~/... is the home folder's, as a shell would read it."""
    (tmp_path / "frames").mkdir()
    _write_bgr(tmp_path / "frames" / "f000.png", np.zeros((4, 4, 3), np.uint8))
    monkeypatch.setenv("HOME", str(tmp_path))
    with open_source("~/frames") as src:
        assert [f.name for f in src] == ["f000"]


def test_text_file_renamed_mp4(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video\n" * 50)
    with pytest.raises(ValueError, match="cannot read video"):
        open_source(fake)


def test_one_image_file_is_read_as_in_a_folder(tmp_path):
    """An image file is a one-frame source decoded as a folder decodes it (EXIF orientation, strict
    JPEG decoding, its name), not a one-frame video through FFmpeg, which ignored the orientation
    and accepted a JPEG with lost scan data."""
    rgb = np.zeros((120, 160, 3), np.uint8)
    rgb[:60, :, 0] = 200
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    (tmp_path / "upright.JPG").write_bytes(with_exif_orientation(jpeg, 6))  # stored 160 wide, shown 120 wide
    with open_source(tmp_path / "upright.JPG", fps=10) as src:
        frames = list(src)
    assert isinstance(src, ImageFolderSource) and len(src) == 1 and src.fps == 10
    assert [(f.index, f.stamp, f.name, f.image.shape) for f in frames] == [(0, 0.0, "upright", (160, 120, 3))]
    folder = tmp_path / "drive.2024-05-01"
    folder.mkdir()
    (folder / "upright.JPG").write_bytes((tmp_path / "upright.JPG").read_bytes())
    with open_source(folder) as src:
        np.testing.assert_array_equal(next(iter(src)).image, frames[0].image)
        assert src.name == "drive.2024-05-01"  # a folder is named by its whole name, an image file by its stem
    pytest.importorskip("simplejpeg")
    start = jpeg.index(b"\xff\xda") + 200
    lost = jpeg[:start] + bytes(len(jpeg) // 4) + jpeg[start + len(jpeg) // 4:]
    (tmp_path / "lost.jpg").write_bytes(lost)
    with open_source(tmp_path / "lost.jpg") as src:
        assert list(src) == [] and src.unreadable == ["lost"]


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        open_source(tmp_path)


def test_bad_fps(tmp_path):
    _write_bgr(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    for bad in (0, -1, float("nan"), float("inf"), 5e-324, 1e-4, 1e6):
        with pytest.raises(ValueError, match="fps"):
            open_source(tmp_path, fps=bad)
    for good in FPS_RANGE:  # the ends of the accepted range are accepted
        assert check_fps(good) == good
        with open_source(tmp_path, fps=good) as src:
            assert src.fps == good


def test_frame_validates_image():
    with pytest.raises(ValueError):
        Frame(0, 0.0, "x", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):  # RGBA too: a frame is RGB
        Frame(0, 0.0, "x", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError):
        Frame(0, 0.0, "x", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        Frame(0, 0.0, "x", np.zeros((4, 8, 3), np.uint8)[:, ::2])


# ------------------------------------------------------------------ image folders


def test_folder_with_corrupt_gray_and_16bit(tmp_path, caplog):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    _write_bgr(tmp_path / "f000.png", colour)
    (tmp_path / "f001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image")
    gray = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    assert cv2.imwrite(str(tmp_path / "f002.png"), gray)
    deep = np.array([[0, 257, 65535, 32896]] * 6, dtype=np.uint16).repeat(2, axis=1)
    assert cv2.imwrite(str(tmp_path / "f003.png"), deep)
    rgba = np.dstack([colour[:, :, ::-1], np.full((6, 8), 7, np.uint8)])  # BGRA on disk
    assert cv2.imwrite(str(tmp_path / "f004.png"), rgba)
    (tmp_path / "readme.txt").write_text("ignored")

    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"):
        with open_source(tmp_path, fps=10) as src:
            assert isinstance(src, ImageFolderSource)
            assert len(src) == 5
            frames = list(src)
    assert [f.index for f in frames] == [0, 2, 3, 4]
    assert [f.name for f in frames] == ["f000", "f002", "f003", "f004"]
    assert [f.stamp for f in frames] == pytest.approx([0.0, 0.2, 0.3, 0.4])
    assert any("f001.png" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    for f in frames:
        assert f.image.shape == (6, 8, 3) and f.image.dtype == np.uint8 and f.image.flags.c_contiguous
    np.testing.assert_array_equal(frames[0].image, colour)
    np.testing.assert_array_equal(frames[1].image, np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(frames[2].image[0, :, 0], [0, 0, 1, 1, 255, 255, 128, 128])
    assert np.all(frames[2].image[..., 0] == frames[2].image[..., 2])
    np.testing.assert_array_equal(frames[3].image, colour)  # alpha dropped


def test_a_folder_image_of_another_pixel_type_is_skipped_by_name(tmp_path, caplog):
    """A signed 16-bit TIFF, which decoded_to_rgb refuses, is skipped with its name like an
    undecodable image; the error does not end the iteration."""
    _write_bgr(tmp_path / "f000.png", np.zeros((4, 4, 3), np.uint8))
    assert cv2.imwrite(str(tmp_path / "f001.tif"), np.zeros((4, 4), np.int16))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(tmp_path) as src:
        assert [f.name for f in src] == ["f000"]
        assert src.unreadable == ["f001"]
    assert "unsupported pixel type int16" in caplog.text


def _with_a_bad_idat_crc(png: bytes) -> bytes:
    """``png`` with one bit of its IDAT chunk's data flipped (a bad sector): that chunk fails its CRC."""
    damaged = bytearray(png)
    damaged[png.index(b"IDAT") + 6] ^= 0x01
    return bytes(damaged)


def test_folder_png_cut_short_or_damaged_is_skipped_by_name(tmp_path, caplog, capfd):
    """A PNG without its IEND chunk (a copy cut short) or with a chunk failing its CRC (a bad
    sector) is skipped with its name and the fault, before libpng prints an error of its own that
    names no file."""
    good = cv2.imencode(".png", np.full((6, 8, 3), 90, np.uint8))[1].tobytes()
    (tmp_path / "f000.png").write_bytes(good)
    (tmp_path / "f001.png").write_bytes(good[:-12])
    (tmp_path / "f002.png").write_bytes(_with_a_bad_idat_crc(good))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(tmp_path) as src:
        names = [f.name for f in src]
    assert names == ["f000"]
    assert "skipping damaged PNG" in caplog.text and "f001.png: it ends before its IEND chunk" in caplog.text
    assert "f002.png: its 'IDAT' chunk at byte 33 fails its CRC" in caplog.text
    assert "libpng" not in capfd.readouterr().err


_PNG = cv2.imencode(".png", np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3))[1].tobytes()


@settings(max_examples=200, deadline=None)
@given(at=st.integers(8, len(_PNG) - 1), flip=st.integers(1, 255), cut=st.integers(0, len(_PNG) - 1))
def test_png_damage_finds_any_changed_or_missing_byte(at, flip, cut):
    """Any byte changed past the signature (a chunk's length, type, data or CRC) and any cut is
    found; the intact file, as an array too, and with a trailer is not damaged."""
    damaged = bytearray(_PNG)
    damaged[at] ^= flip
    assert png_damage(bytes(damaged)) is not None
    assert png_damage(_PNG[:cut]) is not None
    assert png_damage(_PNG) is None and png_damage(np.frombuffer(_PNG + b"x" * 9, np.uint8)) is None


def test_folder_jpeg_with_damaged_scan_data_is_skipped(tmp_path, caplog):
    # 300 bytes of the scan data overwritten (a bad sector, a copy cut short and patched): OpenCV
    # decodes it with shifted blocks and only a libjpeg line on stderr naming no file
    pytest.importorskip("simplejpeg")
    yy, xx = np.mgrid[0:120, 0:160]
    rgb = np.dstack([xx * 255 // 159, yy * 255 // 119, (xx + yy) % 256]).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    good = buf.tobytes()
    bad = bytearray(good)
    bad[len(bad) // 2 : len(bad) // 2 + 300] = np.random.default_rng(3).integers(0, 256, 300, dtype=np.uint8).tobytes()
    (tmp_path / "f000.jpg").write_bytes(good)
    (tmp_path / "f001.jpg").write_bytes(bytes(bad))
    (tmp_path / "f002.jpg").write_bytes(good)
    assert cv2.imdecode(np.frombuffer(bytes(bad), np.uint8), cv2.IMREAD_COLOR) is not None  # what OpenCV alone did
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(tmp_path) as src:
        names = [f.name for f in src]
    assert names == ["f000", "f002"]
    assert "skipping corrupt JPEG" in caplog.text and "f001.jpg" in caplog.text


def test_folder_jpegs_are_decoded_once_with_their_exif_orientation(tmp_path, monkeypatch):
    """A JPEG of a folder was decoded twice: strictly, to find damaged scan data, then by OpenCV for
    its pixels and its EXIF orientation. The strict decode now gives both, pixel for pixel OpenCV's."""
    pytest.importorskip("simplejpeg")
    yy, xx = np.mgrid[0:120, 0:160]
    rgb = np.dstack([xx * 255 // 159, yy * 255 // 119, (xx * 3 + yy * 5) % 256]).astype(np.uint8)
    plain = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    files = {"f000": plain, "f001": with_exif_orientation(plain, 6), "f002": with_exif_orientation(plain, 3, "MM"),
             "f003": cv2.imencode(".jpg", rgb[..., 0])[1].tobytes()}  # grey
    expected = {}
    for stem, data in files.items():
        (tmp_path / f"{stem}.jpg").write_bytes(data)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)  # as before
        expected[stem] = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB if img.ndim == 2 else cv2.COLOR_BGR2RGB)
    real, calls = cv2.imdecode, []
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: calls.append(flags) or real(buf, flags))
    with open_source(tmp_path) as src:
        frames = list(src)
    assert calls == []
    assert [f.name for f in frames] == list(files)
    for f in frames:
        np.testing.assert_array_equal(f.image, expected[f.name])
    assert frames[1].image.shape == (160, 120, 3)  # turned upright


def test_folder_images_above_max_pixels_are_skipped_before_decoding(tmp_path, caplog, monkeypatch):
    rng = np.random.default_rng(1)
    small, big = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    for name, image in (("f000.png", small), ("f001.png", big), ("f002.jpg", big), ("f003.bmp", big),
                        ("f004.jpg", small)):
        _write_bgr(tmp_path / name, image)
    decoded = []  # sizes of what the decoders returned
    real_cv, real_sj = cv2.imdecode, jpeg._simplejpeg.decode_jpeg

    def opencv(buf, flags):
        img = real_cv(buf, flags)
        decoded.append(img.shape[:2])
        return img

    def strict(data, **kw):
        img = real_sj(data, **kw)
        decoded.append(img.shape[:2])
        return img

    monkeypatch.setattr(cv2, "imdecode", opencv)
    monkeypatch.setattr(jpeg._simplejpeg, "decode_jpeg", strict)
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), \
            open_source(tmp_path, max_pixels=80 * 60 - 1) as src:
        names = [f.name for f in src]
    assert names == ["f000", "f004"]
    assert src.too_large == ["f001", "f002", "f003"] and src.unreadable == []
    assert decoded.count((60, 80)) == 1  # the BMP only: the PNG and the JPEG were measured from their headers
    # the library names its own argument; a caller names the setting its users know
    assert "f001.png: 80 x 60 = 4800 pixels, more than the 4799 allowed (max_pixels; None = no limit)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), \
            open_source(tmp_path, max_pixels=80 * 60 - 1, limit_name="the flag --limit") as src:
        assert [f.name for f in src] == ["f000", "f004"]
    assert caplog.text.count("more than the 4799 allowed (the flag --limit)") == 3
    with open_source(tmp_path, max_pixels=80 * 60) as src:
        assert len(list(src)) == 5 and src.too_large == []
    with open_source(tmp_path) as src:  # no limit
        assert len(list(src)) == 5
    with pytest.raises(ValueError, match="max_pixels"):
        open_source(tmp_path, max_pixels=0)


def test_a_pixel_limit_must_be_a_whole_number():
    """A bool, a float (a whole-valued one too) or a string is refused, naming the option, rather than
    taken as 1 or 0 or compared as it is; a NumPy integer is taken, as a Python int."""
    for bad in (True, False, 2.5, 1e6, "100"):
        with pytest.raises(ValueError, match="--max-image-pixels must be a whole number of pixels >= 1"):
            check_pixel_limit(bad, "--max-image-pixels")
    limit = check_pixel_limit(np.int64(4800), "max_pixels")
    assert limit == 4800 and type(limit) is int


def test_video_above_max_pixels_is_refused_when_opened(tmp_path, monkeypatch):
    path = _mjpg_avi(tmp_path / "a.avi", frames=5)  # 64 x 48 = 3072 pixels
    reads = []
    real_open = VideoFileSource._open_capture

    def counting_open(p):
        cap = real_open(p)
        reads.append(cap)
        return cap

    monkeypatch.setattr(VideoFileSource, "_open_capture", staticmethod(counting_open))
    with pytest.raises(ValueError, match=r"video .*a\.avi: its frames are 64 x 48 = 3072 pixels, more than the 3071 "
                                         r"allowed \(max_pixels; None = no limit\)"):
        open_source(path, max_pixels=3071)
    assert len(reads) == 1  # the opening read only: no pass over the frames
    with open_source(path, max_pixels=3072) as src:
        assert [f.index for f in src] == list(range(5)) and src.too_large == []


class _SizeChangingCapture:
    """A ``cv2.VideoCapture`` stand-in whose frames change size mid-stream (as a build that does
    not rescale them to the first frame's size would deliver them)."""

    def __init__(self, shapes):
        self.frames = [np.full((*hw, 3), i, np.uint8) for i, hw in enumerate(shapes)]
        self.position = 0

    def get(self, prop):
        return {cv2.CAP_PROP_FRAME_COUNT: len(self.frames), cv2.CAP_PROP_FPS: 10.0}.get(prop, 0.0)

    def read(self):
        if self.position >= len(self.frames):
            return False, None
        self.position += 1
        return True, self.frames[self.position - 1]

    def release(self):
        pass


def test_video_frames_above_max_pixels_mid_stream_are_skipped(tmp_path, monkeypatch, caplog):
    shapes = [(4, 5), (4, 5), (8, 10), (8, 10), (4, 5), (9, 9)]  # 20, 20, 80, 80, 20, 81 pixels
    path, _ = _stand_in_video(tmp_path, monkeypatch, lambda: _SizeChangingCapture(shapes))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), \
            open_source(path, max_pixels=79, limit_name="--cap") as src:
        frames = list(src)
    assert [(f.index, f.image.shape[:2], int(f.image[0, 0, 0])) for f in frames] == [(0, (4, 5), 0), (1, (4, 5), 1),
                                                                                      (4, (4, 5), 4)]
    assert src.too_large == ["000002", "000003", "000005"] and src.unreadable == [] and src.missing == 0
    # one warning for the first frame skipped and one count at the end, not a line per frame
    assert caplog.text.count("skipping frame") == 1
    assert "skipping frame 000002: 10 x 8 = 80 pixels, more than the 79 allowed" in caplog.text
    assert "skipped 3 frames (from 000002 to 000005) of more than 79 pixels (--cap)" in caplog.text
    assert "80 pixels, more than the 79 allowed (--cap)" in caplog.text


@pytest.mark.parametrize("shapes, summary", [
    ([(4, 5), (8, 10), (4, 5)], None),  # one frame skipped: its warning only, no count
    ([(4, 5), (8, 10), (8, 10), (4, 5)], "skipped 2 frames (from 000001 to 000002) of more than 79 pixels"),
])
def test_video_counts_skipped_frames_at_the_end_from_two_on(tmp_path, monkeypatch, caplog, shapes, summary):
    path, _ = _stand_in_video(tmp_path, monkeypatch, lambda: _SizeChangingCapture(shapes))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(path, max_pixels=79) as src:
        frames = list(src)
    assert len(frames) == sum(h * w <= 79 for h, w in shapes)
    assert caplog.text.count("skipping frame 000001: 10 x 8 = 80 pixels") == 1
    if summary is None:
        assert "frames (from" not in caplog.text
    else:
        assert caplog.text.count(summary) == 1


def test_png_size_reads_the_ihdr_chunk_only():
    png = cv2.imencode(".png", np.zeros((37, 51), np.uint8))[1]
    assert png_size(png) == png_size(png.tobytes()[:24]) == (37, 51)  # (height, width)
    no_ihdr = bytearray(png.tobytes())
    no_ihdr[12:16] = b"tEXt"  # another chunk first: its bytes are no frame size
    assert png_size(bytes(no_ihdr)) is None
    assert png_size(png.tobytes()[:23]) is None and png_size(b"\xff\xd8" + bytes(30)) is None


def test_each_iteration_lists_the_images_it_skipped(tmp_path):
    # ``too_large`` and ``unreadable`` are the last iteration's: a second pass lists them again, once
    _write_bgr(tmp_path / "f000.png", np.zeros((6, 8, 3), np.uint8))
    _write_bgr(tmp_path / "f001.png", np.zeros((60, 80, 3), np.uint8))
    (tmp_path / "f002.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with open_source(tmp_path, max_pixels=100) as src:
        for _ in range(2):
            assert [f.name for f in src] == ["f000"]
            assert src.too_large == ["f001"] and src.unreadable == ["f002"]


def test_folder_jpeg_whose_header_the_strict_decoder_cannot_read_is_left_to_opencv(tmp_path, monkeypatch):
    pytest.importorskip("simplejpeg")
    yy, xx = np.mgrid[0:24, 0:32]
    rgb = np.dstack([xx * 8, yy * 10, (xx + yy) * 4]).astype(np.uint8)
    data = with_exif_orientation(cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes(), 6)
    (tmp_path / "f000.jpg").write_bytes(data)

    def unreadable_header(_data):
        raise ValueError("Unsupported JPEG process")

    monkeypatch.setattr(jpeg._simplejpeg, "decode_jpeg_header", unreadable_header)
    with open_source(tmp_path) as src:
        (frame,) = list(src)
    assert src.unreadable == [] and src.too_large == []
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # EXIF orientation applied
    np.testing.assert_array_equal(frame.image, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    assert frame.image.shape == (32, 24, 3)


def test_folder_default_fps_and_order(tmp_path):
    for name in ("b.jpg", "a.PNG", "c.bmp", "B.png"):
        _write_bgr(tmp_path / name, np.full((4, 4, 3), 100, np.uint8))
    (tmp_path / ".hidden.png").write_bytes(b"x")  # e.g. macOS resource fork: ignored
    (tmp_path / "sub.png").mkdir()  # folders are ignored
    src = open_source(tmp_path)
    assert src.fps == 30.0
    assert [f.name for f in src] == ["B", "a", "b", "c"]  # plain string order: upper case first


def test_folder_order_differing_from_numeric_order_is_warned(tmp_path, caplog):
    """frame_10 before frame_2: read in file-name order, with a warning to zero-pad the numbers."""
    for name in ("frame_2.png", "frame_10.png"):
        _write_bgr(tmp_path / name, np.zeros((4, 4, 3), np.uint8))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(tmp_path) as src:
        assert [f.name for f in src] == ["frame_10", "frame_2"]  # file-name order all the same
    assert "differs from numeric order" in caplog.text


def test_folder_duplicate_stems(tmp_path):
    _write_bgr(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    _write_bgr(tmp_path / "x.jpg", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="same name stem"):
        open_source(tmp_path)


# ------------------------------------------------------------------ writer


def test_video_writer_round_trip(tmp_path):
    out = tmp_path / "sub" / "out.MP4"  # the suffix in any letter case
    frames = [np.full((48, 64, 3), (40 * i, 255 - 40 * i, 128), np.uint8) for i in range(5)]
    with VideoWriter(out, 12.5, size=(64, 48)) as writer:
        for f in frames:
            writer.write(f)
        assert writer.frames_written == 5
    assert writer.fourcc == "mp4v"
    with open_source(out) as src:
        assert len(src) == 5
        assert src.fps == pytest.approx(12.5)  # written at the rate given, not a rounded one
        back = list(src)
    assert len(back) == 5
    assert all(f.image.shape == (48, 64, 3) for f in back)
    # Lossy codec, flat colours: close to the originals, and still RGB (not BGR) ordered.
    assert np.abs(back[2].image.astype(int) - frames[2].astype(int)).mean() < 8


def test_video_writer_lazy_size_and_errors(tmp_path):
    writer = VideoWriter(tmp_path / "lazy.avi", 10)
    writer.write(np.zeros((20, 30, 3), np.uint8))
    assert writer.size == (30, 20)
    with pytest.raises(ValueError, match="30x20"):
        writer.write(np.zeros((20, 31, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        writer.write(np.zeros((20, 30, 3), np.float32))
    with pytest.raises(ValueError):
        writer.write(np.zeros((20, 30), np.uint8))
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="suffix"):
        VideoWriter(tmp_path / "x.gif", 10, (8, 8))
    with pytest.raises(ValueError, match="4-character"):
        VideoWriter(tmp_path / "x.mp4", 10, fourcc="mp4")
    for size in ((0, 8), (8, -2)):  # refused as an argument, not left to OpenCV
        with pytest.raises(ValueError, match="positive"):
            VideoWriter(tmp_path / "x.mp4", 10, size)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        VideoWriter(blocker / "x.mp4", 10, (8, 8))


# ------------------------------------------------------------------ label PNGs


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_label_png_round_trip(tmp_path, dtype):
    labels = (np.arange(35).reshape(5, 7) * (1 if dtype == np.uint8 else 1500)).astype(dtype)
    write_label_png(tmp_path / "l.png", labels)
    back = read_label_png(tmp_path / "l.png")
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, labels)
    write_label_png(tmp_path / "L.PNG", labels)  # the suffix in any letter case
    np.testing.assert_array_equal(read_label_png(tmp_path / "L.PNG"), labels)


def test_label_png_errors(tmp_path):
    with pytest.raises(ValueError):
        write_label_png(tmp_path / "l.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError):
        write_label_png(tmp_path / "l.png", np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match=".png"):
        write_label_png(tmp_path / "l.jpg", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="empty"):  # refused as an argument, not an OpenCV encoding error
        write_label_png(tmp_path / "l.png", np.zeros((0, 4), np.uint8))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        write_label_png(blocker / "l.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError):
        read_label_png(tmp_path / "missing.png")
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 2] = 200
    assert cv2.imwrite(str(tmp_path / "c.png"), colour)
    with pytest.raises(ValueError, match="colour"):
        read_label_png(tmp_path / "c.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        read_label_png(tmp_path / "bad.png")
    (tmp_path / "d.png").write_bytes(_with_a_bad_idat_crc(_PNG))  # named with its fault, before libpng's error
    with pytest.raises(ValueError, match="damaged label image .*'IDAT' chunk at byte 33 fails its CRC"):
        read_label_png(tmp_path / "d.png")


def test_label_png_rejects_palette_png(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    img = pil.fromarray(np.array([[0, 1], [2, 3]], np.uint8), mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    img.save(tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"is a palette \(indexed\) PNG"):  # ("palette" is in tmp_path too)
        read_label_png(tmp_path / "p.png")


def _mjpg_avi(path: Path, frames: int = 20) -> Path:
    """A ``frames``-frame MJPG AVI (64x48, 10 fps) of distinct noise frames, written with OpenCV."""
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return path


def test_truncated_video_warns_about_the_frames_lost_at_the_end(tmp_path, caplog):
    # the container still says 20 frames; reads fail from frame 13 on, up to the reported count,
    # which had hidden the loss (no frame decoded after the failures, no count left to fall short of)
    data = _mjpg_avi(tmp_path / "good.avi").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(cut) as src:
        assert len(src) == 20
        frames = [(f.index, f.name) for f in src]
    assert 5 <= len(frames) < 20
    assert frames == [(i, f"{i:06d}") for i in range(len(frames))]
    assert f"decoded {len(frames)} of the 20 frames the container reports, {20 - len(frames)} missing" in caplog.text
    assert "skipped" not in caplog.text  # no frame decoded after the failed reads: not a skipped stretch


def test_truncated_video_names_its_last_decoded_frame_as_possibly_cut_short(tmp_path, caplog):
    # cut inside a frame: FFmpeg's MJPEG decoder returns the frame, the part after the cut filled in
    # (green, grey), and the reads after it fail: the warning names that frame
    data = _mjpg_avi(tmp_path / "good.avi").read_bytes()
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xd8"]  # JPEG SOI of each frame
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: (starts[5] + starts[6]) // 2])  # inside frame 5
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(cut) as src:
        names = [f.name for f in src]
    assert names and names[-1] in ("000004", "000005")
    assert f"the last frame decoded, {names[-1]}, may be cut short" in caplog.text


def test_frame_dropped_by_the_demuxer_is_reported(tmp_path, caplog):
    # 3000 bytes zeroed a third into the file: FFmpeg's AVI demuxer loses a frame without a failed
    # read, so every later frame comes one index early; only the total can tell
    data = bytearray(_mjpg_avi(tmp_path / "good.avi").read_bytes())
    third = len(data) // 3
    data[third : third + 3000] = bytes(3000)
    damaged = tmp_path / "damaged.avi"
    damaged.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(damaged) as src:
        frames = list(src)
    assert 10 <= len(frames) < 20
    missing = 20 - len(frames)
    assert f"decoded {len(frames)} of the 20 frames the container reports, {missing} missing" in caplog.text
    assert "shift the names and stamps" in caplog.text


def test_intact_video_gives_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(_mjpg_avi(tmp_path / "a.avi")) as src:
        assert len(list(src)) == 20
    assert not caplog.records


@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".mkv"])
def test_video_writer_keeps_the_last_column_and_row_of_odd_frames(tmp_path, suffix):
    # OpenCV's FFmpeg writer rounds odd sizes down and dropped the frame's last column and row
    img = np.full((49, 65, 3), 128, np.uint8)
    img[:, -1] = (255, 0, 0)
    img[-1, :] = (0, 0, 255)
    with VideoWriter(tmp_path / f"odd{suffix}", 25) as writer:
        writer.write(img)
        writer.write(img)
    assert writer.size == (65, 49)
    with open_source(tmp_path / f"odd{suffix}") as src:
        back = next(iter(src)).image
    assert back.shape[0] >= 49 and back.shape[1] >= 65
    assert back[:48, 64].mean(0)[0] > 200  # the red last column is in the file
    assert back[48, :64].mean(0)[2] > 200  # and the blue last row


@pytest.mark.parametrize("suffix", [".avi", ".mp4", ".mkv"])
def test_video_writer_refuses_the_lowest_rate_up_front_and_writes_just_above_it(tmp_path, suffix):
    """0.001 fps (the lowest rate a source may have) opened no OpenCV writer: an OSError at the
    first frame, after that frame was segmented. Refused by its rate when made; a rate just above
    it writes and reads back."""
    with pytest.raises(ValueError, match=r"cannot be written at 0\.001 fps: .*write above 0\.001"):
        VideoWriter(tmp_path / f"slow{suffix}", 0.001, (16, 16))
    assert list(tmp_path.iterdir()) == []
    with VideoWriter(tmp_path / f"slow{suffix}", 0.002, (16, 16)) as writer:
        for i in range(3):
            writer.write(np.full((16, 16, 3), 60 * i, np.uint8))
    with open_source(tmp_path / f"slow{suffix}") as src:
        assert len(list(src)) == 3


def test_video_writer_refuses_rates_its_container_cannot_hold(tmp_path):
    # 1001 fps .avi came back at 600 fps with 4 of 6 frames; 30001 fps .mkv at 30000 fps; .mp4
    # above 65535 fps could not be opened (an OSError at the first frame)
    with pytest.raises(ValueError, match="fps.*use .mp4 or .mkv"):
        VideoWriter(tmp_path / "fast.avi", 1001, (64, 48))
    with pytest.raises(ValueError, match=r"\.mkv video cannot be written at 30001 fps \(at most 30000\).*; use .mp4$"):
        VideoWriter(tmp_path / "fast.mkv", 30001)
    for suffix in (".mp4", ".m4v", ".mov"):
        with pytest.raises(ValueError, match=r"at most 65535\): OpenCV writes it at another rate or not at all$"):
            VideoWriter(tmp_path / f"fast{suffix}", 65536)
    with pytest.raises(ValueError, match="at most 1000"):  # the suffix in any letter case
        VideoWriter(tmp_path / "fast.AVI", 1001, (64, 48))
    with VideoWriter(tmp_path / "ok.avi", 1000) as writer:
        for i in range(6):
            writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    with open_source(tmp_path / "ok.avi") as src:
        assert src.fps == 1000 and len(list(src)) == 6
    with VideoWriter(tmp_path / "ok.mkv", 30000) as writer:  # the highest .mkv rate reads back as written
        for i in range(6):
            writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    with open_source(tmp_path / "ok.mkv") as src:
        assert src.fps == 30000 and len(list(src)) == 6


def test_the_widest_video_the_writer_takes_reads_back(tmp_path):
    """The largest side VideoWriter takes is written and reads back: 65535, odd, was encoded at
    65536, and the .avi was written without an error and could not be read back."""
    with VideoWriter(tmp_path / "wide.avi", 10, (MAX_VIDEO_SIDE, 16)) as writer:
        writer.write(np.zeros((16, MAX_VIDEO_SIDE, 3), np.uint8))
    with open_source(tmp_path / "wide.avi") as src:
        assert src.frame_size == (MAX_VIDEO_SIDE, 16) and len(list(src)) == 1


def test_video_writer_refuses_sizes_of_part_pixels_or_too_many_on_either_side(tmp_path):
    """A size of 16.7 pixels was written as 16 without a word, and a side past what the codecs
    hold was left to OpenCV; either side, width or height, is refused by name. numpy integers (a
    frame's shape) are whole pixels."""
    for size in ((16.7, 16), (16, 16.7)):
        with pytest.raises(ValueError, match=r"size must be \(W, H\) in whole pixels"):
            VideoWriter(tmp_path / "x.avi", 10, size)
    for size in ((65535, 16), (16, 65535), (65536, 16)):  # 65535 is odd: encoded as 65536, past 16 bits
        with pytest.raises(ValueError, match="each at most 65534 pixels"):
            VideoWriter(tmp_path / "x.avi", 10, size)
    assert list(tmp_path.iterdir()) == []
    with VideoWriter(tmp_path / "x.avi", 10, (np.int64(16), np.int32(8))) as writer:
        writer.write(np.zeros((8, 16, 3), np.uint8))
    assert writer.size == (16, 8)


def test_video_writer_refuses_the_lowest_rate_without_a_size_too(tmp_path):
    """A writer made without a size (taken from the first frame, as the module's example does)
    refuses 0.001 fps when made too, not with an OSError at the first frame."""
    with pytest.raises(ValueError, match=r"cannot be written at 0\.001 fps"):
        VideoWriter(tmp_path / "slow.mp4", 0.001)


def test_damaged_first_frame_is_skipped_like_any_other(tmp_path, caplog):
    # the first frame's JPEG zeroed: frames 1.. decode, as they do when the same damage hits frame 2
    data = bytearray(_mjpg_avi(tmp_path / "good.avi", frames=6).read_bytes())
    chunks = [i for i in range(len(data) - 10) if data[i : i + 4] == b"00dc" and data[i + 8 : i + 10] == b"\xff\xd8"]
    size = int.from_bytes(data[chunks[0] + 4 : chunks[0] + 8], "little")
    data[chunks[0] + 8 : chunks[0] + 8 + size] = bytes(size)
    damaged = tmp_path / "damaged.avi"
    damaged.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(damaged) as src:
        assert [f.index for f in src] == [1, 2, 3, 4, 5]
    assert "skipped 1 undecodable frames (from 0 to 0)" in caplog.text


def _mjpeg_stream_with_a_damaged_frame(path: Path, n: int = 12, damaged: int = 5) -> None:
    """A raw MJPEG stream (its container reports no frame count) of ``bikes.mp4`` frames, frame
    ``damaged`` with its frame header wiped: OpenCV fails to read that one and reads on."""
    with open_source(_bikes()) as src:
        jpegs = [cv2.imencode(".jpg", cv2.resize(f.image, (160, 68)))[1].tobytes() for f, _ in zip(src, range(n))]
    bad = bytearray(jpegs[damaged])
    sof = bad.find(b"\xff\xc0")
    bad[sof:sof + 12] = bytes(12)
    jpegs[damaged] = bytes(bad)
    path.write_bytes(b"".join(jpegs))


@pytest.mark.parametrize("count_first", [False, True])
def test_a_video_without_a_frame_count_reads_on_past_a_damaged_frame(tmp_path, caplog, count_first):
    """Iterating stopped at the first failed read of a video without a frame count, and len()'s
    counting pass stopped there too (so iterating after it stopped as well): the frames after it
    were dropped without a warning."""
    path = tmp_path / "stream.mjpeg"
    _mjpeg_stream_with_a_damaged_frame(path)
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(path) as src:
        if count_first:
            assert len(src) == 12
        else:
            assert src.known_len() is None  # a progress bar's total: not counted by decoding
        frames = list(src)
    assert [f.index for f in frames] == [i for i in range(12) if i != 5]
    assert src.unreadable == ["000005"] and src.missing == 0
    assert "skipped 1 undecodable frames (from 5 to 5)" in caplog.text


def test_a_broken_link_in_a_folder_is_skipped_as_unreadable_and_keeps_its_index(tmp_path, caplog):
    """A dangling symlink was left out of the listing: every later frame took an earlier index and
    stamp, without a warning. An unreadable regular file kept its place; so does the link now."""
    for i in (0, 1, 3):
        _write_bgr(tmp_path / f"f{i:03d}.png", np.full((6, 8, 3), 10 * i, np.uint8))
    (tmp_path / "f002.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "sub.png").mkdir()  # a folder named like an image is no frame
    (tmp_path / "f002b.png").symlink_to(tmp_path / "sub.png", target_is_directory=True)  # nor a link to one
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(tmp_path, fps=10) as src:
        assert len(src) == 4
        frames = list(src)
    assert [(f.name, f.index, f.stamp) for f in frames] == [("f000", 0, 0.0), ("f001", 1, 0.1), ("f003", 3, 0.3)]
    assert src.unreadable == ["f002"] and "skipping unreadable image" in caplog.text


class _DamagedStreamCapture:
    """A ``cv2.VideoCapture`` stand-in of a stream whose reads succeed or fail as ``pattern``
    says, then end. Its container reports ``count`` frames (0.0: none, as for a raw stream) and
    ``fps`` frames per second; once released, its reads fail, as OpenCV's do."""

    def __init__(self, pattern, count: float = 0.0, fps: float = 25.0):
        self.pattern, self.position, self.count, self.fps = pattern, 0, count, fps
        self.released = False

    def isOpened(self):
        return True

    def get(self, prop):
        return self.count if prop == cv2.CAP_PROP_FRAME_COUNT else self.fps

    def grab(self):
        ok = not self.released and self.position < len(self.pattern) and self.pattern[self.position]
        self.position += 1
        return ok

    def read(self):
        ok = self.grab()
        return ok, (np.zeros((8, 8, 3), np.uint8) if ok else None)

    def release(self):
        self.released = True


@pytest.mark.parametrize("bad", [MAX_BAD_READS, MAX_BAD_READS + 1])
def test_counting_and_reading_a_video_without_a_count_agree_on_a_damaged_stretch(tmp_path, monkeypatch, bad):
    """len() gave up one failure earlier than iterating: with len() called first, a stretch of
    exactly MAX_BAD_READS damaged frames ended the video there."""
    pattern = [True] * 3 + [False] * bad + [True] * 3
    path, _ = _stand_in_video(tmp_path, monkeypatch, lambda: _DamagedStreamCapture(pattern), "v.mjpeg")
    with open_source(path) as src:
        alone = [f.index for f in src]
    with open_source(path) as src:
        count = len(src)
        after_len = [f.index for f in src]
    assert alone == after_len
    if bad == MAX_BAD_READS:  # read on past it
        assert alone == [0, 1, 2, *range(3 + bad, 6 + bad)] and count == 6 + bad
    else:  # one more: the end
        assert alone == [0, 1, 2] and count == 3


def test_counting_a_video_without_a_count_passes_over_separate_damaged_stretches(tmp_path, monkeypatch):
    """Each stretch is shorter than MAX_BAD_READS, together they are longer: len() restarts its run of
    failures at each frame decoded, as iterating does, and counts to the end."""
    run = MAX_BAD_READS * 3 // 5
    pattern = [True] * 3 + [False] * run + [True] * 3 + [False] * run + [True] * 3
    path, _ = _stand_in_video(tmp_path, monkeypatch, lambda: _DamagedStreamCapture(pattern))
    with open_source(path) as src:
        assert len(src) == len(pattern)
        indices = [f.index for f in src]
    assert indices[-1] == len(pattern) - 1 and len(indices) == 9


def test_a_container_that_undercounts_its_frames_has_none_missing(tmp_path, monkeypatch, caplog):
    """More frames decoded than the container reports: every frame is read, and none is reported
    missing (not a negative count)."""
    path, _ = _stand_in_video(tmp_path, monkeypatch, lambda: _DamagedStreamCapture([True] * 5, count=3.0))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(path) as src:
        assert len(list(src)) == 5
    assert src.missing == 0 and "missing" not in caplog.text


def test_a_source_closed_mid_iteration_yields_no_more_frames(tmp_path, monkeypatch, caplog):
    """close() releases the capture an unfinished iteration holds; that iteration then ends, without
    a missing-frames warning for the frames not read. A folder's iteration ends too."""
    path, captures = _stand_in_video(tmp_path, monkeypatch, lambda: _DamagedStreamCapture([True] * 10, count=10.0))
    src = open_source(path)
    it = iter(src)
    assert [next(it).index for _ in range(2)] == [0, 1]
    assert not captures[-1].released
    src.close()
    assert captures[-1].released
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"):
        assert list(it) == []
    assert src.missing == 0 and not caplog.records
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        _write_bgr(folder / f"f{i:03d}.png", np.full((4, 4, 3), i, np.uint8))
    src = open_source(folder)
    it = iter(src)
    assert next(it).name == "f000"
    src.close()
    assert list(it) == []


def test_frame_size_is_width_then_height(tmp_path):
    with open_source(_mjpg_avi(tmp_path / "a.avi", frames=2)) as src:  # 64 x 48
        assert src.frame_size == (64, 48)
        assert next(iter(src)).image.shape[:2] == (48, 64)


@pytest.mark.parametrize("bad", [MAX_BAD_READS, MAX_BAD_READS + 1])
def test_damaged_first_frames_are_skipped_up_to_max_bad_reads_as_later_ones(tmp_path, monkeypatch, bad):
    """Opening passes over as many damaged first frames as iterating does (MAX_BAD_READS in a row):
    one more, and the video is refused when opened rather than opened to yield no frame."""
    pattern = [False] * bad + [True] * 3
    path, _ = _stand_in_video(tmp_path, monkeypatch, lambda: _DamagedStreamCapture(pattern, count=len(pattern)),
                              "v.avi")
    if bad == MAX_BAD_READS:
        with open_source(path) as src:
            assert [f.index for f in src] == [bad, bad + 1, bad + 2]
    else:
        with pytest.raises(ValueError, match="no decodable frame at its start"):
            open_source(path)


def test_hidden_image_files_in_a_folder_are_ignored(tmp_path):
    """Hidden files are ignored (class docstring): macOS puts a '._name.png' AppleDouble file beside
    each image on some file systems; read as frames they would shift every index after them."""
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"f{i:03d}.png"), np.full((4, 5, 3), 10 * i, np.uint8))
    (tmp_path / "._f001.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with open_source(tmp_path) as src:
        assert len(src) == 3
        assert [(f.index, f.name) for f in src] == [(0, "f000"), (1, "f001"), (2, "f002")]
        assert src.unreadable == []


def test_a_float_image_is_clipped_to_0_1_before_scaling():
    """32-bit float images are taken as [0, 1] and clipped (documented): out-of-range values
    saturate instead of wrapping around in uint8."""
    img = np.array([[1.5, -0.25, 0.5, 1.0]], np.float32)
    out = decoded_to_rgb(img)
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [255, 0, 128, 255]


def test_sixteen_bit_values_are_scaled_by_round_v_times_255_over_65535():
    """Every 16-bit value is scaled as documented, round(v * 255 / 65535) (no ties occur)."""
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = (v.astype(np.int64) * 255 * 2 + 65535) // (2 * 65535)
    np.testing.assert_array_equal(decoded_to_rgb(v)[..., 0], expected)


@pytest.mark.parametrize("img, error", [
    (np.array([[0.5, np.nan]], np.float32), "NaN"),
    (np.array([[0.5, np.inf]], np.float32), "NaN"),
    (np.zeros((2, 2, 3), np.int32), "unsupported pixel type int32"),
    (np.zeros((2, 2, 2), np.uint8), "unsupported channel count 2"),
])
def test_decoded_to_rgb_refuses_what_it_cannot_convert(img, error):
    """NaN or infinite floats, another pixel type or channel count: a ValueError naming the fault
    (a folder skips such an image by it), not an OpenCV error or wrapped-around pixels."""
    with pytest.raises(ValueError, match=error):
        decoded_to_rgb(img)


def test_decoded_to_rgb_takes_bgra_as_documented():
    """decoded_to_rgb is public and documented for BGRA input (folders and ROS PNGs decode with
    IMREAD_ANYCOLOR, which drops alpha before it): alpha dropped, BGR turned to RGB."""
    bgra = np.zeros((2, 3, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 30, 100, 200, 50  # B, G, R, A
    out = decoded_to_rgb(bgra)
    assert out.shape == (2, 3, 3) and out.flags.c_contiguous
    assert out[0, 0].tolist() == [200, 100, 30]


def test_label_png_refuses_a_grey_palette_and_takes_equal_rgb_channels(tmp_path):
    """A palette PNG is refused even when its palette is grey (OpenCV would give the palette's grey
    values, not the indices, as class IDs); an RGB PNG with three equal channels is accepted."""
    pil = pytest.importorskip("PIL.Image")

    img = pil.fromarray(np.array([[0, 1], [2, 3]], np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (7 * i % 256,) * 3])  # grey, but not the identity
    img.save(tmp_path / "grey_palette.png")
    with pytest.raises(ValueError, match=r"is a palette \(indexed\) PNG"):
        read_label_png(tmp_path / "grey_palette.png")
    grey3 = np.repeat(np.array([[0, 1], [2, 3]], np.uint8)[..., None], 3, axis=2)
    assert cv2.imwrite(str(tmp_path / "rgb.png"), grey3)
    np.testing.assert_array_equal(read_label_png(tmp_path / "rgb.png"), [[0, 1], [2, 3]])


def test_label_png_refuses_colour_whose_first_and_last_channels_agree(tmp_path):
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 1] = 200  # B == R, G differs
    assert cv2.imwrite(str(tmp_path / "c.png"), colour)
    with pytest.raises(ValueError, match="distinct colour channels"):
        read_label_png(tmp_path / "c.png")


def test_a_container_frame_rate_is_kept_unless_outside_the_accepted_range(tmp_path, monkeypatch, caplog):
    """A rate in FPS_RANGE is the video's, fractions included (NTSC's 29.97, not rounded); one
    outside it (a broken header) falls back to 30 fps with a warning."""
    path, _ = _stand_in_video(tmp_path, monkeypatch, lambda: _DamagedStreamCapture([True] * 3, count=3.0, fps=2e5))
    with open_source(path) as src:
        assert src.fps == 30.0
        assert [f.stamp for f in src] == [0.0, 1 / 30, 2 / 30]
    assert "reports no usable frame rate" in caplog.text
    path, _ = _stand_in_video(tmp_path, monkeypatch, lambda: _DamagedStreamCapture([True] * 3, count=3.0, fps=29.97))
    with open_source(path) as src:
        assert src.fps == pytest.approx(29.97)
        assert [f.stamp for f in src] == pytest.approx([0.0, 1 / 29.97, 2 / 29.97])


# ------------------------------------------------------------------ property-based: generated folders and videos

#: image files a generated folder holds: decodable ones, each with the RGB frame it must give ...
_GOOD_FILES = ("png", "grey", "png16", "grey16", "rgba", "palette", "png_trailer", "jpeg", "jpeg_upright",
               "jpeg_as_png", "bmp", "tif")
#: ... and damaged or foreign ones, which must be skipped
_BAD_FILES = ("zero_bytes", "garbage", "png_cut", "png_crc", "jpeg_cut", "tif_cut", "text")
#: files no frame comes from and no index counts: hidden, a sub-folder named like an image, another suffix
_IGNORED_FILES = ("hidden", "subfolder", "not_image")

_folder_file = st.tuples(
    st.sampled_from(_GOOD_FILES + _BAD_FILES + _IGNORED_FILES),
    st.sampled_from(["", "f", "frame_", "F", "b-", "é ", "a.b"]),  # stem prefix
    st.integers(0, 120),  # frame number
    st.booleans(),  # zero-padded number
    st.sampled_from([(1, 1), (2, 7), (7, 2), (24, 32), (25, 33), (31, 17)]),  # (H, W)
    st.integers(0, 2**32 - 1),  # seed of the pixels and the damage
    st.booleans(),  # upper-case suffix
)


def _encoded(ext: str, img: np.ndarray) -> bytes:
    """``img`` (OpenCV's channel order) encoded by OpenCV as a file of suffix ``ext``."""
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def _write_generated_file(folder: Path, file) -> tuple[str, str, np.ndarray | None] | None:
    """Write one :data:`_folder_file`: (file name, kind, the RGB frame it must give or None) for an
    image file the source considers, None for an ignored one."""
    kind, prefix, number, padded, hw, seed, upper = file
    stem = f"{prefix}{number:03d}" if padded else f"{prefix}{number}"
    rng = np.random.default_rng(seed)
    if kind.startswith("jpeg"):  # one flat colour, which the lossy codec keeps within a few levels
        rgb = np.broadcast_to(rng.integers(30, 226, 3, dtype=np.uint8), (*hw, 3)).copy()
    else:
        rgb = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    expected = None
    if kind in ("png", "rgba", "png_trailer", "jpeg", "jpeg_as_png", "bmp", "tif"):
        ext = {"jpeg": ".jpg", "jpeg_as_png": ".jpg", "bmp": ".bmp", "tif": ".tiff"}.get(kind, ".png")
        image = np.dstack([bgr, rng.integers(0, 256, hw, dtype=np.uint8)]) if kind == "rgba" else bgr
        data, expected = _encoded(ext, image) + (b"trailer" if kind == "png_trailer" else b""), rgb
    elif kind == "grey":
        data, expected = _encoded(".png", rgb[..., 0]), np.repeat(rgb[..., :1], 3, axis=2)
    elif kind in ("png16", "grey16"):  # scaled by round(v * 255 / 65535)
        deep = rng.integers(0, 65536, (*hw, 3 if kind == "png16" else 1), dtype=np.uint16)
        data = _encoded(".png", deep)
        expected = np.broadcast_to(np.rint(deep[..., ::-1] * (255 / 65535)).astype(np.uint8), (*hw, 3)).copy()
    elif kind == "palette":  # expanded to its colours
        index, colours = rng.integers(0, 4, hw, dtype=np.uint8), rng.integers(0, 256, (4, 3), dtype=np.uint8)
        img = PIL.Image.fromarray(index, mode="P")
        img.putpalette(colours.ravel().tolist() + [0] * (256 * 3 - 12))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data, expected = buf.getvalue(), colours[index]
    elif kind == "jpeg_upright":  # EXIF orientation 6: stored W x H, turned clockwise to H x W
        data, expected = with_exif_orientation(_encoded(".jpg", bgr), 6), np.ascontiguousarray(np.rot90(rgb, -1))
    elif kind == "zero_bytes":
        data = b""
    elif kind == "garbage":
        data = b"\x00" + rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
    elif kind in ("png_cut", "tif_cut"):
        good = _encoded(".png" if kind == "png_cut" else ".tiff", bgr)
        data = good[: int(rng.integers(1, len(good)))]
    elif kind == "png_crc":
        data = _with_a_bad_idat_crc(_encoded(".png", bgr))
    elif kind == "jpeg_cut":  # cut inside the scan data, 8 bytes or more before its end
        good = _encoded(".jpg", bgr)
        sos = good.index(b"\xff\xda")
        data = good[: int(rng.integers(sos + 20, len(good) - 8))] if len(good) - 8 > sos + 20 else good[:sos]
    elif kind == "text":
        data = b"not an image\n" * int(rng.integers(0, 5))
    elif kind == "hidden":
        (folder / f".{stem}.png").write_bytes(_encoded(".png", bgr))
        return None
    elif kind == "subfolder":
        (folder / f"{stem}_dir.png").mkdir(exist_ok=True)
        (folder / f"{stem}_dir.png" / "000.png").write_bytes(_encoded(".png", bgr))
        return None
    else:  # not_image: image data under a suffix no source reads
        (folder / f"{stem}.txt").write_bytes(_encoded(".png", bgr))
        return None
    ext = {"jpeg": ".jpg", "jpeg_upright": ".jpg", "jpeg_cut": ".jpeg", "bmp": ".bmp", "tif": ".tiff",
           "tif_cut": ".tif", "text": ".tif"}.get(kind, ".png")
    name = stem + (ext.upper() if upper else ext)
    (folder / name).write_bytes(data)
    return name, kind, expected


def _generated_folder(folder: Path, files) -> list[tuple[str, str, np.ndarray | None]]:
    """Write ``files`` (:data:`_folder_file`) into ``folder``; its image files as
    :func:`_write_generated_file` gives them, in the documented order (plain string order of the
    file names). A name written twice holds the last file."""
    folder.mkdir()
    written = {}
    for file in files:
        image_file = _write_generated_file(folder, file)
        if image_file is not None:
            written[image_file[0]] = image_file
    return sorted(written.values(), key=lambda f: f[0])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(_folder_file, max_size=12), fps=st.sampled_from([None, 1.0, 7.5, 29.97]),
       max_pixels=st.sampled_from([None, None, 100, 24 * 32]))
def test_a_generated_folder_yields_every_readable_image_once_in_file_name_order(caplog, files, fps, max_pixels):
    """A folder of generated files (PNG, JPEG, BMP and TIFF frames; grey, 16-bit, RGBA and palette
    PNGs; a JPEG turned by its EXIF orientation, one named .png; zero-byte, garbage, cut and
    CRC-damaged files; hidden files, sub-folders, other suffixes; numbers with and without zero
    padding, suffixes in either case): every image file counts once, in file-name order; each
    readable one is yielded as its own (H, W, 3) uint8 RGB frame, index = its place, stamp =
    index / fps (increasing), name = its stem; every other one is skipped with a warning naming it
    and listed by stem in ``unreadable`` (``too_large`` when above ``max_pixels``, a damaged
    PNG or JPEG too when its header says so); frames + unreadable + too_large = len(), on every
    iteration. No exception but the documented ValueError (no image, two files of one stem)."""
    caplog.clear()
    with tempfile.TemporaryDirectory() as tmp, caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"):
        image_files = _generated_folder(Path(tmp) / "clip", files)
        stems = [Path(name).stem for name, _, _ in image_files]
        if not image_files or len(set(stems)) < len(stems):
            with pytest.raises(ValueError, match="no images|same name stem"):
                open_source(Path(tmp) / "clip", fps=fps, max_pixels=max_pixels)
            return
        with open_source(Path(tmp) / "clip", fps=fps, max_pixels=max_pixels) as src:
            rate = 30.0 if fps is None else fps
            assert src.fps == rate and len(src) == len(image_files)
            for _ in range(2):  # every iteration starts again from the first file
                frames = list(src)
                by_index = {f.index: f for f in frames}
                assert [f.index for f in frames] == sorted(by_index)  # once each, in order
                assert all(f.stamp == f.index / rate for f in frames)
                assert all(a.stamp < b.stamp for a, b in zip(frames, frames[1:]))
                too_large, skipped = [], []
                for index, (name, kind, expected) in enumerate(image_files):
                    large = expected is not None and max_pixels is not None and expected[..., 0].size > max_pixels
                    if expected is None or large:
                        assert index not in by_index, f"{name} ({kind}) was yielded"
                        assert name in caplog.text, f"no warning names the skipped {name} ({kind})"
                        (too_large if large else skipped).append(stems[index])
                        continue
                    frame = by_index.get(index)
                    assert frame is not None, f"{name} ({kind}) was not yielded"
                    assert frame.name == stems[index] and frame.image.dtype == np.uint8
                    assert frame.image.shape == expected.shape and frame.image.flags.c_contiguous, name
                    if kind.startswith("jpeg"):
                        assert np.abs(frame.image.astype(int) - expected).max() <= 8, name
                    else:
                        np.testing.assert_array_equal(frame.image, expected, err_msg=name)
                for listed in (src.unreadable, src.too_large):  # each in file order
                    assert listed == [s for s in stems if s in listed]
                # a damaged PNG or JPEG may be refused by its header's size first
                assert sorted(src.unreadable + src.too_large) == sorted(skipped + too_large)
                assert set(too_large) <= set(src.too_large)
                assert len(frames) + len(src.unreadable) + len(src.too_large) == len(src)


@settings(max_examples=25, deadline=None)
@given(files=st.lists(_folder_file, min_size=1, max_size=6), fps=st.sampled_from([None, 5.0]),
       max_pixels=st.sampled_from([None, 24 * 32]))
def test_a_segment_run_of_a_generated_folder_accounts_for_every_file(lite, torch_single_thread, files, fps,
                                                                     max_pixels):
    """``segment_path`` (mpvss segment) on a generated folder: labels/ holds one PNG per readable
    image, at its size; frames.jsonl lists them in file-name order with their source index and
    stamp index / fps (increasing), the first a key frame; the summary's frames +
    skipped_unreadable + skipped_too_large = the image files considered. A folder with no readable
    image is a ValueError, not a crash or an empty run, and leaves an earlier run's outputs in
    place; a run that reads a frame replaces them."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "clip", Path(tmp) / "out"
        image_files = _generated_folder(folder, files)
        stems = [Path(name).stem for name, _, _ in image_files]
        readable = [(i, stems[i], e) for i, (_, _, e) in enumerate(image_files)
                    if e is not None and (max_pixels is None or e[..., 0].size <= max_pixels)]
        write_label_png(out / "labels" / "earlier.png", np.zeros((2, 2), np.uint8))  # an earlier run's outputs
        (out / "frames.jsonl").write_text("{}\n")
        options = SegmentOptions(propagator="copy", write_overlay=False, progress=False, fps=fps,
                                 max_image_pixels=max_pixels)
        if not image_files or len(set(stems)) < len(stems) or not readable:
            with pytest.raises(ValueError, match="no images|same name stem|no frame"):
                segment_path(folder, out, lite, options)
            assert (out / "labels" / "earlier.png").is_file() and (out / "frames.jsonl").read_text() == "{}\n"
            return
        summary = segment_path(folder, out, lite, options)
        rate = 30.0 if fps is None else fps
        assert summary["frames"] == len(readable) and summary["missing_at_end"] == 0
        assert summary["frames"] + len(summary["skipped_unreadable"]) + len(summary["skipped_too_large"]) \
            == len(image_files)
        assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(f"{s}.png" for _, s, _ in readable)
        for _, stem, expected in readable:
            assert read_label_png(out / "labels" / f"{stem}.png").shape == expected.shape[:2]
        records = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
        assert [(r["name"], r["source_index"], r["stamp"]) for r in records] == [(s, i, i / rate) for i, s, _ in readable]
        assert all(a["stamp"] < b["stamp"] for a, b in zip(records, records[1:]))
        assert records[0]["is_key_frame"]


#: damage done to a video file: none, cut short at a fraction of its bytes, or a stretch of its bytes zeroed
_video_damage = st.one_of(st.none(), st.tuples(st.just("cut"), st.floats(0.05, 0.98), st.just(0.0)),
                          st.tuples(st.just("zeroed"), st.floats(0.05, 0.95), st.floats(0.001, 0.2)))


def _damaged(data: bytes, damage) -> bytes:
    """``data`` with ``damage`` (:data:`_video_damage`) done to it."""
    if damage is None:
        return data
    kind, at, length = damage
    start = max(1, int(len(data) * at))
    if kind == "cut":
        return data[:start]
    end = min(len(data), start + max(1, int(len(data) * length)))
    return data[:start] + bytes(end - start) + data[end:]


def _check_video_timeline(src, frames: list[Frame], count: int) -> None:
    """Frames of a video source (iterated to its end): distinct indices in order, none of them a
    skipped frame's, named by the zero-padded index, stamped index / fps (increasing); decoded +
    skipped + missing = the container's ``count`` (or more, when it undercounts)."""
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices))
    names = [f.name for f in frames] + src.unreadable + src.too_large  # a skipped frame's index is left out
    assert len(set(names)) == len(names), names
    assert all(f.name == f"{f.index:06d}" and f.stamp == f.index / src.fps for f in frames)
    assert all(a.stamp < b.stamp for a, b in zip(frames, frames[1:]))
    accounted = len(frames) + len(src.too_large) + len(src.unreadable)
    assert accounted + src.missing == max(count, accounted)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), hw=st.sampled_from([(16, 16), (17, 23), (24, 32), (9, 40)]),
       suffix=st.sampled_from([".avi", ".mp4", ".mkv"]), fps=st.sampled_from([5.0, 12.5, 25.0]),
       damage=_video_damage, override=st.sampled_from([None, 7.0]))
def test_a_tiny_video_whole_or_damaged_yields_its_frames_in_order(caplog, n, hw, suffix, fps, damage, override):
    """A tiny video written with VideoWriter (odd sizes encoded one pixel larger), whole, cut short or
    with a stretch of bytes zeroed: refused when opened with the documented ValueError, or its
    frames come as (H, W, 3) uint8 RGB of the encoded size on the timeline of
    :func:`_check_video_timeline`, at the given or the container's rate. Whole, every frame comes, the
    one written at its index, without a warning. (Damaged, the decoder may conceal a lost frame with
    another without an error: mp4v shows a damaged P-frame as the frame before.)"""
    colours = [np.array([(37 * i) % 200 + 30, 255 - (41 * i) % 200, (90 + 53 * i) % 256], np.uint8) for i in range(n)]
    caplog.clear()
    with tempfile.TemporaryDirectory() as tmp, caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"):
        path = Path(tmp) / f"clip{suffix}"
        with VideoWriter(path, fps) as writer:
            for colour in colours:
                writer.write(np.broadcast_to(colour, (*hw, 3)).copy())
        caplog.clear()  # the odd-size warning
        path.write_bytes(_damaged(path.read_bytes(), damage))
        try:
            src = open_source(path, fps=override)
        except ValueError as exc:
            assert damage is not None and "cannot read video" in str(exc)
            return
        with src:
            assert src.fps == (override or pytest.approx(fps, rel=1e-3))
            frames = list(src)
        ew, eh = writer.encoded_size
        assert all(f.image.shape == (eh, ew, 3) and f.image.dtype == np.uint8 for f in frames)
        _check_video_timeline(src, frames, src.known_len() or 0)
        if damage is None:
            assert [f.index for f in frames] == list(range(n)) and src.known_len() in (None, n)
            assert src.unreadable == [] and src.missing == 0 and not caplog.records
            for f in frames:  # nearest to the colour written at its index
                mean = f.image.reshape(-1, 3).mean(0)
                assert int(np.argmin([np.abs(mean - c).sum() for c in colours])) == f.index


@settings(max_examples=10, deadline=None)
@given(damage=_video_damage)
def test_the_sample_clip_damaged_anywhere_keeps_its_timeline(damage):
    """bikes.mp4 (250 frames, 640 x 272, 25 fps) cut short or with a stretch zeroed: refused when
    opened (documented ValueError), or its frames are 640 x 272 RGB on the timeline of
    :func:`_check_video_timeline` with the container's count of 250."""
    data = _bikes().read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bikes.mp4"
        path.write_bytes(_damaged(data, damage))
        try:
            src = open_source(path)
        except ValueError as exc:
            assert damage is not None and "cannot read video" in str(exc)
            return
        with src:
            frames = list(src)
        assert src.known_len() == 250 and all(f.image.shape == (272, 640, 3) for f in frames)
        assert all(0 <= f.index < 250 for f in frames)
        _check_video_timeline(src, frames, 250)
        if damage is None:
            assert [f.index for f in frames] == list(range(250))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 5), damage=_video_damage)
def test_a_segment_run_of_a_damaged_video_accounts_for_every_frame(lite, torch_single_thread, n, damage):
    """``segment_path`` on a tiny MJPG AVI, whole or damaged: a ValueError when nothing can be read;
    otherwise labels/ holds one PNG per frame of frames.jsonl, named by its index, stamped index /
    fps (increasing), and the summary's frames + skipped_unreadable + missing_at_end +
    skipped_too_large = the container's count (all frames segmented when whole)."""
    with tempfile.TemporaryDirectory() as tmp:
        path, out = _mjpg_avi(Path(tmp) / "clip.avi", frames=n), Path(tmp) / "out"
        path.write_bytes(_damaged(path.read_bytes(), damage))
        options = SegmentOptions(propagator="copy", write_overlay=True, progress=False)
        try:
            summary = segment_path(path, out, lite, options)
        except ValueError as exc:
            assert damage is not None and ("cannot read video" in str(exc) or "no frame" in str(exc))
            return
        records = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
        assert summary["frames"] == len(records) >= 1
        skipped = len(summary["skipped_unreadable"]) + summary["missing_at_end"] + len(summary["skipped_too_large"])
        assert summary["frames"] + skipped == n
        assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(f"{r['name']}.png" for r in records)
        assert all(r["name"] == f"{r['source_index']:06d}" and r["stamp"] == r["source_index"] / 10.0 for r in records)
        assert all(a["stamp"] < b["stamp"] for a, b in zip(records, records[1:]))
        if damage is None:
            assert summary["frames"] == n


def _write_video(path: Path, frames: list[np.ndarray], fps: float = 10) -> None:
    """``frames`` (RGB uint8, one size) as a video at ``path`` (the codec by its suffix)."""
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.write(frame)


def test_paths_that_are_not_utf8_are_refused_before_opencv_crashes_on_them(tmp_path):
    """A video (or an output video) whose path holds bytes that are not UTF-8 killed the process
    with SIGSEGV inside OpenCV's binding (helper-177); both are a ValueError naming the path now.
    Run in a child process, so that the code before fails this test instead of killing pytest."""
    import os
    import subprocess
    import sys

    good = tmp_path / "clip.mp4"
    _write_video(good, [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(3)])
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/clip\xff.mp4")
    os.rename(good, bad)
    code = ("import sys\n"
            "from mpvss_ros.io.video import VideoWriter, open_source\n"
            "for make in (lambda: open_source(sys.argv[1]), lambda: VideoWriter(sys.argv[1] + '.out.mp4', 10)):\n"
            "    try:\n"
            "        make()\n"
            "    except ValueError as exc:\n"
            "        print('refused:', exc)\n")
    run = subprocess.run([sys.executable, "-c", code, bad], capture_output=True, text=True, errors="replace",
                         timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr[-500:])
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and all("clip\\udcff.mp4" in line and "valid UTF-8" in line for line in lines), lines
    assert lines[0].startswith("refused: cannot read video: ")


def test_fifos_are_left_out_of_folders_and_refused_as_inputs_instead_of_blocking(tmp_path):
    """A symlink to a named pipe in an image folder was kept as an image and its read blocked
    forever (helper-177); it is left out as a FIFO itself is, while a broken link keeps its place."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "frames"
    folder.mkdir()
    os.mkfifo(tmp_path / "pipe")
    (folder / "a0.png").symlink_to(tmp_path / "pipe")
    (folder / "a1.png").symlink_to(tmp_path / "missing.png")
    cv2.imencode(".png", np.zeros((24, 32, 3), np.uint8))[1].tofile(str(folder / "a2.png"))
    code = ("import sys\nfrom mpvss_ros.io.video import open_source\n"
            "print([f.name for f in open_source(sys.argv[1])])\n")
    run = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-500:]
    assert run.stdout.strip() == "['a2']"  # a1, the broken link, is counted unreadable (its index kept)
    with open_source(folder) as source:
        assert [f.index for f in source] == [1] and source.unreadable == ["a1"]
    # a FIFO given as the input: a video's open blocked until a writer came; an image was "not found"
    for name in ("pipe.mp4", "pipe.png"):
        os.mkfifo(tmp_path / name)
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == (
            f"ValueError: cannot read {tmp_path / name}: not a regular file (a named pipe or a device); write the "
            "stream to a file first, or run the ROS node on it")
    # VideoFileSource made directly (a library caller) refuses it too: its open blocked (helper-179)
    direct = ("import sys\nfrom mpvss_ros.io.video import VideoFileSource\nVideoFileSource(sys.argv[1])\n")
    run = subprocess.run([sys.executable, "-c", direct, str(tmp_path / "pipe.mp4")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1 and "not a regular file (a named pipe or a device)" in run.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("suffix, ext", [(".webp", ".webp"), (".ppm", ".ppm"), (".sunras", ".ras"), (".ljpg", ".jpg")])
def test_a_single_image_path_with_a_percent_sign_is_refused_not_read_as_a_sequence(tmp_path, suffix, ext):
    """``img%d.webp`` went to OpenCV's FFmpeg reader, whose image2 demuxer read it as the
    sequence img0.webp, img1.webp, ...: the run segmented other files (helper-177). So did
    ``.sunras``, ``.ljpg`` and other suffixes a list of image2's missed (helper-179): only the
    containers FFmpeg opens as named take a path with '%' now. An .mp4 with '%' in its name is
    still read as itself."""
    (tmp_path / f"img%d{suffix}").write_bytes(cv2.imencode(ext, np.full((48, 64, 3), 9, np.uint8))[1].tobytes())
    (tmp_path / f"img0{suffix}").write_bytes(cv2.imencode(ext, np.full((30, 20, 3), 200, np.uint8))[1].tobytes())
    with pytest.raises(ValueError, match=r"cannot read video: .*img%d.* numbered sequence"):
        open_source(tmp_path / f"img%d{suffix}")
    clip = tmp_path / "clip%d.mp4"
    _write_video(clip, [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(3)])
    with open_source(clip) as source:
        assert [f.image.shape for f in source] == [(48, 64, 3)] * 3


def test_a_percent_sign_in_a_folder_name_or_before_an_upper_case_suffix_is_refused_too(tmp_path):
    """FFmpeg reads the whole path as the pattern, folders included, and matches suffixes in any
    letter case: ``run%d/clip.webp`` read ``run0/clip.webp`` and ``img%d.WEBP`` read
    ``img0.WEBP`` (OpenCV 5.1, measured), each another file than the one named."""
    for name in ("run%d/clip.webp", "run0/clip.webp"):
        (tmp_path / name).parent.mkdir()
    PIL.Image.fromarray(np.full((48, 64, 3), 9, np.uint8)).save(tmp_path / "run%d" / "clip.webp")
    PIL.Image.fromarray(np.full((30, 20, 3), 200, np.uint8)).save(tmp_path / "run0" / "clip.webp")
    PIL.Image.fromarray(np.full((48, 64, 3), 9, np.uint8)).save(tmp_path / "img%d.WEBP", format="WEBP")
    PIL.Image.fromarray(np.full((30, 20, 3), 200, np.uint8)).save(tmp_path / "img0.WEBP", format="WEBP")
    for path in (tmp_path / "run%d" / "clip.webp", tmp_path / "img%d.WEBP"):
        with pytest.raises(ValueError, match=r"cannot read video: .*%d.* numbered sequence"):
            open_source(path)


def _with_frame_durations(mp4: bytes, deltas: list[int]) -> bytes:
    """An OpenCV-written MP4 (its moov box after mdat) with its one track's sample durations
    (stts, in the track's time units) replaced by ``deltas``: a variable frame rate. Only moov and
    the boxes holding stts change size; mdat, and the chunk offsets into it, stay where they are."""
    import struct

    def children(data: bytes, start: int, end: int) -> dict[bytes, tuple[int, int]]:
        out, at = {}, start
        while at + 8 <= end:
            size, kind = struct.unpack(">I4s", data[at:at + 8])
            out[kind] = (at, size)
            at += size
        return out

    path, start, end, data = [], 0, len(mp4), bytearray(mp4)
    for kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stts"):
        at, size = children(bytes(data), start, end)[kind]
        path.append((at, size))
        start, end = at + 8, at + size
    stts_at, stts_size = path[-1]
    body = struct.pack(">4xI", len(deltas)) + b"".join(struct.pack(">II", 1, d) for d in deltas)
    new = struct.pack(">I4s", 8 + len(body), b"stts") + body
    grow = len(new) - stts_size
    data[stts_at:stts_at + stts_size] = new
    for at, size in path[:-1]:
        struct.pack_into(">I", data, at, size + grow)
    return bytes(data)


def test_a_whole_variable_frame_rate_file_is_not_called_truncated(tmp_path, caplog):
    """A whole MP4 whose frame times skip a period here and there (a camera that dropped frames):
    OpenCV's reader stops one frame early per skipped period, and the warning blamed a truncated or
    corrupt file (helper-177). It names the variable frame rate now; an even file loses nothing."""
    frames = [np.full((32, 48, 3), 8 * i, np.uint8) for i in range(30)]
    even = tmp_path / "even.mp4"
    _write_video(even, frames, fps=30)
    mp4 = even.read_bytes()
    import struct

    at = mp4.index(b"stts")
    count, delta = struct.unpack(">II", mp4[at + 12:at + 20])  # one entry: 30 samples of one period
    assert count == 30
    deltas = [delta] * 30
    for i in (7, 15, 22):  # three gaps of two periods
        deltas[i] = 2 * delta
    vfr = tmp_path / "vfr.mp4"
    vfr.write_bytes(_with_frame_durations(mp4, deltas))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"):
        with open_source(even) as source:
            assert sum(1 for _ in source) == 30 and source.missing == 0
        assert not caplog.records
        with open_source(vfr) as source:
            names = [f.name for f in source]
            assert len(source) == 30 and source.missing == 3
    assert names == [f"{i:06d}" for i in range(27)]
    message = caplog.records[-1].getMessage()
    assert "decoded 27 of the 30 frames" in message and "skip 3 frame periods" in message
    assert "variable-frame-rate" in message and "truncated" not in message


class _TimedCapture:
    """A ``cv2.VideoCapture`` stand-in whose frames carry the container times ``times_ms``
    (CAP_PROP_POS_MSEC after each read, as OpenCV reports them), then end; its container reports
    ``count`` frames."""

    def __init__(self, times_ms, count: int):
        self.times_ms, self.count, self.position = list(times_ms), count, 0

    def isOpened(self):
        return True

    def get(self, prop):
        if prop == cv2.CAP_PROP_POS_MSEC:
            return self.times_ms[self.position - 1] if self.position else 0.0
        return {cv2.CAP_PROP_FRAME_COUNT: float(self.count), cv2.CAP_PROP_FPS: 25.0}.get(prop, 0.0)

    def read(self):
        if self.position >= len(self.times_ms):
            return False, None
        self.position += 1
        return True, np.full((8, 8, 3), self.position, np.uint8)

    def release(self):
        pass


def _missing_frames_warning(tmp_path, monkeypatch, caplog, times_ms, count) -> str:
    """The one warning of reading a stand-in video whose frames have the times ``times_ms`` and
    whose container reports ``count`` frames."""
    path, _ = _stand_in_video(tmp_path, monkeypatch, lambda: _TimedCapture(times_ms, count))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.io.video"), open_source(path) as src:
        assert len(list(src)) == len(times_ms)
    assert src.missing == count - len(times_ms) and len(caplog.records) == 1
    return caplog.records[0].getMessage()


def test_a_skipped_period_whose_time_jitters_is_still_counted(tmp_path, monkeypatch, caplog):
    """A camera's time stamps jitter: a dropped frame leaves a step of 1.9 periods (76 ms at 25
    fps), not exactly 2. It counts as one skipped period (rounded, not cut down to whole periods),
    so a whole file is not called truncated."""
    message = _missing_frames_warning(tmp_path, monkeypatch, caplog, [0, 40, 80, 156, 196, 236], count=7)
    assert "decoded 6 of the 7 frames" in message and "skip 1 frame periods" in message
    assert "variable-frame-rate" in message and "truncated" not in message


def test_a_truncated_variable_frame_rate_file_is_called_truncated_and_its_skips_named(tmp_path, monkeypatch,
                                                                                     caplog):
    """More frames missing than the frame times skip: the file was cut (or damaged) as well, and
    the warning says so, naming how many of the missing frames the skipped periods account for;
    a file whose times are even gets no word of skipped periods."""
    message = _missing_frames_warning(tmp_path, monkeypatch, caplog, [0, 40, 120, 160, 200], count=8)
    assert "decoded 5 of the 8 frames the container reports, 3 missing (truncated or corrupt?)" in message
    assert "its frame times skip 1 frame periods (a variable frame rate), which account for 1 of them" in message
    caplog.clear()
    message = _missing_frames_warning(tmp_path, monkeypatch, caplog, [0, 40, 80, 120, 160], count=8)
    assert "3 missing (truncated or corrupt?)" in message and "frame times skip" not in message
