"""Message conversions (mpvss_ros.ros.conversions) against real rosbags message classes; no ROS.

Input messages are built here from a real CamVid val frame and synthetic frames, serialised to
CDR and read back with the rosbags typestore (as a bag or a subscriber would see them), then
converted. Output messages are checked field by field and after a CDR round trip.
"""

from __future__ import annotations

import array
import dataclasses
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from helpers import png_with_exif_orientation, with_exif_orientation

from mpvss_ros.io import jpeg
from mpvss_ros.propagation import CopyPropagator
from mpvss_ros.ros import conversions
from mpvss_ros.ros.conversions import (
    AUTOWARE_CLASSES,
    MSG_DEFINITIONS,
    SUPPORTED_ENCODINGS,
    ConversionError,
    autoware_class_ids,
    autoware_rle,
    build_outputs,
    class_masks_from_labels,
    compressed_to_rgb,
    image_to_rgb,
    make_autoware_mask,
    make_class_masks,
    make_image,
    make_label_info,
    make_segmentation_info,
    rosbags_message_types,
    seconds_to_stamp,
    stamp_to_seconds,
)
from mpvss_ros.scheduling import FixedIntervalScheduler
from mpvss_ros.segmenter import SegmentationResult, VideoSegmenter
from mpvss_ros.viz import colorize, make_palette, overlay

REPO = Path(__file__).resolve().parents[2]
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
BPP = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "yuv422": 2, "uyvy": 2, "yuv422_yuy2": 2, "yuyv": 2,
       "bayer_rggb8": 1, "bayer_bggr8": 1, "bayer_gbrg8": 1, "bayer_grbg8": 1}
UYVY = ("yuv422", "uyvy")
BAYER = ("bayer_rggb8", "bayer_bggr8", "bayer_gbrg8", "bayer_grbg8")


def bayer_mosaic(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """(H, W) uint8 Bayer mosaic of ``rgb``: the 2 x 2 pattern of ``bayer_<pattern>8`` written out
    from the top-left pixel, each pixel keeping only its filter's channel (what the sensor sees)."""
    pattern = encoding[len("bayer_"):-1]
    mosaic = np.empty(rgb.shape[:2], np.uint8)
    for (dy, dx), colour in zip(((0, 0), (0, 1), (1, 0), (1, 1)), pattern):
        mosaic[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(colour)]
    return mosaic
YUYV = ("yuv422_yuy2", "yuyv")


# --------------------------------------------------------------------------------------------
# Fixtures and helpers (test-side encoders, independent of the code under test)
# --------------------------------------------------------------------------------------------


def make_header(ts, sec: int = 1700000000, nanosec: int = 123456789, frame_id: str = "camera_optical"):
    t = ts.types
    return t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id=frame_id)


def roundtrip(ts, msg, msgtype: str):
    """Serialise to CDR and back: the message as a bag reader or subscriber gets it."""
    return ts.deserialize_cdr(ts.serialize_cdr(msg, msgtype), msgtype)


@pytest.fixture(scope="module")
def camvid_frame(camvid_val: Path) -> np.ndarray:
    path = sorted(camvid_val.glob("*.png"))[0]
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def synthetic_frame(h: int = 38, w: int = 50, seed: int = 0) -> np.ndarray:
    """Random texture plus smooth gradients (saturated and mid-range colours)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 255 // (h + w - 2)], -1)
    noise = rng.integers(0, 256, (h, w, 3))
    return np.where((xx % 7 < 3)[..., None], smooth, noise).astype(np.uint8)


def pack_yuv422(rgb: np.ndarray, order: str) -> np.ndarray:
    """BT.601 video-range RGB -> (H, W, 2) UYVY or YUYV with chroma averaged over pixel pairs."""
    f = rgb.astype(np.float64)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    q = lambda a: np.clip(np.round(a), 0, 255).astype(np.uint8)  # noqa: E731
    Y, U, V = q(y), q((u[:, 0::2] + u[:, 1::2]) / 2), q((v[:, 0::2] + v[:, 1::2]) / 2)
    out = np.empty(rgb.shape[:2] + (2,), np.uint8)
    if order == "uyvy":
        out[:, 0::2, 0], out[:, 1::2, 0], out[..., 1] = U, V, Y
    else:
        out[..., 0], out[:, 0::2, 1], out[:, 1::2, 1] = Y, U, V
    return out


def pixel_bytes(rgb: np.ndarray, encoding: str, seed: int = 1) -> np.ndarray:
    """(H, W, bpp) uint8 pixels of ``rgb`` in ``encoding``."""
    alpha = np.random.default_rng(seed).integers(0, 256, rgb.shape[:2] + (1,), dtype=np.uint8)
    if encoding == "rgb8":
        return rgb
    if encoding == "bgr8":
        return rgb[..., ::-1]
    if encoding == "rgba8":
        return np.concatenate([rgb, alpha], -1)
    if encoding == "bgra8":
        return np.concatenate([rgb[..., ::-1], alpha], -1)
    if encoding == "mono8":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None]
    if encoding in BAYER:
        return bayer_mosaic(rgb, encoding)[..., None]
    return pack_yuv422(rgb, "uyvy" if encoding in UYVY else "yuyv")


def encode(ts, rgb: np.ndarray, encoding: str, pad: int = 0, header=None, is_bigendian=0):
    """A rosbags Image of ``rgb`` in ``encoding``; ``pad`` garbage bytes after every row."""
    pix = np.ascontiguousarray(pixel_bytes(rgb, encoding))
    h, w = pix.shape[:2]
    rows = pix.reshape(h, -1)
    if pad:
        garbage = np.random.default_rng(7).integers(0, 256, (h, pad), dtype=np.uint8)
        rows = np.concatenate([rows, garbage], 1)
    return ts.types[IMAGE](header=header or make_header(ts), height=h, width=w, encoding=encoding,
                           is_bigendian=is_bigendian, step=rows.shape[1], data=np.ascontiguousarray(rows).reshape(-1))


def fake_image(**fields):
    """An Image-like object (duck typing, as rclpy gives), with defaults for a valid 2x2 rgb8 image."""
    base = dict(header=None, height=2, width=2, encoding="rgb8", is_bigendian=0, step=6, data=bytes(range(12)))
    base.update(fields)
    return SimpleNamespace(**base)


def check_decoded(rgb: np.ndarray, encoding: str, out: np.ndarray, yuv_max_grey_error: int = 8,
                  yuv_stats: bool = True) -> None:
    """Exact for the RGB family and mono8; YUV: cv2's conversion, grey within a few levels.

    ``yuv_max_grey_error``: worst pixel; saturated colours next to very different ones (random
    noise) lose more to 4:2:2 chroma clipping than real camera frames do. ``yuv_stats``: also
    check the 95th percentile and the mean (meaningless on a few pixels).
    """
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    if encoding in ("rgb8", "bgr8", "rgba8", "bgra8"):
        np.testing.assert_array_equal(out, rgb)
    elif encoding == "mono8":
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))
    elif encoding in BAYER:  # inside a 1-pixel border (OpenCV's edge handling) each pixel keeps its filter's channel
        mosaic = bayer_mosaic(rgb, encoding)
        np.testing.assert_array_equal(bayer_mosaic(out, encoding)[1:-1, 1:-1], mosaic[1:-1, 1:-1])
    else:
        packed = pack_yuv422(rgb, "uyvy" if encoding in UYVY else "yuyv")
        code = cv2.COLOR_YUV2RGB_UYVY if encoding in UYVY else cv2.COLOR_YUV2RGB_YUYV
        np.testing.assert_array_equal(out, cv2.cvtColor(packed, code))  # cv2's own conversion
        g_out = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY).astype(int)
        g_src = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(int)
        diff = np.abs(g_out - g_src)
        if yuv_stats:
            assert np.percentile(diff, 95) <= 2 and diff.mean() < 1.0, (np.percentile(diff, 95), diff.mean())
        assert diff.max() <= yuv_max_grey_error, diff.max()  # luma survives 4:2:2


# --------------------------------------------------------------------------------------------
# image_to_rgb
# --------------------------------------------------------------------------------------------


def test_supported_encodings_list():
    for enc in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "yuv422", "yuv422_yuy2", "yuyv"):
        assert enc in SUPPORTED_ENCODINGS
    assert set(SUPPORTED_ENCODINGS) <= set(BPP)


@pytest.mark.parametrize("pad", [0, 6])
@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_every_encoding_on_real_camvid_frame(ts, camvid_frame, encoding, pad):
    msg = roundtrip(ts, encode(ts, camvid_frame, encoding, pad=pad), IMAGE)
    assert msg.step == camvid_frame.shape[1] * BPP[encoding] + pad
    check_decoded(camvid_frame, encoding, image_to_rgb(msg))


@pytest.mark.parametrize("shape", [(38, 50), (1, 2), (7, 2), (40, 64)])
@pytest.mark.parametrize("pad", [0, 1, 13])
@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_every_encoding_on_synthetic_frames(ts, encoding, pad, shape):
    rgb = synthetic_frame(*shape, seed=shape[0])
    if encoding in BAYER and min(shape) < 3:  # OpenCV demosaicks these to zeros: refused
        with pytest.raises(ConversionError, match=r"Bayer image .* must be at least 3 x 3 pixels"):
            image_to_rgb(roundtrip(ts, encode(ts, rgb, encoding, pad=pad), IMAGE))
        return
    out = image_to_rgb(roundtrip(ts, encode(ts, rgb, encoding, pad=pad), IMAGE))
    check_decoded(rgb, encoding, out, yuv_max_grey_error=48, yuv_stats=rgb.shape[0] * rgb.shape[1] >= 1000)


@pytest.mark.parametrize("encoding", ["yuv422", "yuyv"])
def test_yuv_packed_by_opencv(ts, camvid_frame, encoding):
    """Frames packed by OpenCV's own RGB -> UYVY/YUYV (OpenCV >= 4.7) decode to the same grey."""
    name = "COLOR_RGB2YUV_UYVY" if encoding == "yuv422" else "COLOR_RGB2YUV_YUYV"
    if not hasattr(cv2, name):
        pytest.skip(f"this OpenCV ({cv2.__version__}) has no {name}")
    packed = cv2.cvtColor(camvid_frame, getattr(cv2, name))
    h, w = camvid_frame.shape[:2]
    msg = ts.types[IMAGE](header=make_header(ts), height=h, width=w, encoding=encoding, is_bigendian=0,
                          step=2 * w, data=packed.reshape(-1))
    out = image_to_rgb(roundtrip(ts, msg, IMAGE))
    diff = np.abs(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY).astype(int) - cv2.cvtColor(camvid_frame, cv2.COLOR_RGB2GRAY).astype(int))
    assert diff.max() <= 8 and diff.mean() < 1.0


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "mono8"])
def test_odd_width_and_padding_for_non_yuv(ts, encoding):
    rgb = synthetic_frame(9, 13, seed=3)
    check_decoded(rgb, encoding, image_to_rgb(encode(ts, rgb, encoding, pad=3)))


@pytest.mark.parametrize("encoding", BAYER)
def test_bayer_mosaics_of_one_colour_decode_to_that_colour(ts, encoding):
    """The pattern names of ROS (from the top-left pixel) and OpenCV (from the second row) differ:
    a wrong mapping swaps red and blue or puts green where red is, which this catches."""
    rgb = np.empty((16, 20, 3), np.uint8)
    rgb[:] = (200, 100, 30)
    out = image_to_rgb(roundtrip(ts, encode(ts, rgb, encoding, pad=4), IMAGE))
    np.testing.assert_array_equal(out[2:-2, 2:-2], rgb[2:-2, 2:-2])  # borders: OpenCV's edge handling
    camvid_like = synthetic_frame(40, 64, seed=5)
    smooth = cv2.GaussianBlur(camvid_like, (0, 0), 4)  # demosaicking is exact only where colour varies slowly
    out = image_to_rgb(encode(ts, smooth, encoding)).astype(int)
    assert np.abs(out[2:-2, 2:-2] - smooth[2:-2, 2:-2].astype(int)).mean() < 3


def test_padding_bytes_are_ignored(ts):
    """Same pixels, different garbage in the row padding: identical output."""
    rgb = synthetic_frame(20, 30)
    a = encode(ts, rgb, "bgr8", pad=10)
    b = encode(ts, rgb, "bgr8", pad=10)
    rows = b.data.reshape(20, -1)
    rows[:, 90:] = 255 - rows[:, 90:]
    np.testing.assert_array_equal(image_to_rgb(a), image_to_rgb(b))
    np.testing.assert_array_equal(image_to_rgb(a), rgb)


def test_rgb8_is_zero_copy(ts):
    rgb = synthetic_frame(16, 24)
    msg = encode(ts, rgb, "rgb8")
    out = image_to_rgb(msg)
    assert np.shares_memory(out, msg.data)
    assert out.flags.c_contiguous
    padded = image_to_rgb(encode(ts, rgb, "rgb8", pad=4))
    assert padded.flags.c_contiguous  # rows with padding: one copy, contiguous for OpenCV/torch


@pytest.mark.parametrize("data, words", [
    (array.array("H", [0x0102] * 6), "a buffer of 2-byte items"),   # its raw bytes are no pixels
    ([1.7] * 12, "holds other values than integers"),               # was truncated to 1
    ([True] * 12, "holds other values than integers"),
    ([300] * 12, "not a byte sequence"),
    ([256] + [0] * 11, r"values outside 0\.\.255 \(0\.\.256\)"),  # the first value past a byte: would wrap to 0
    ([np.int64(300)] * 6 + [np.int64(-1)] * 6, r"values outside 0\.\.255 \(-1\.\.300\)"),  # were wrapped to 44, 255
    ("abcdefghijkl", "not a byte buffer"),
])
def test_payloads_that_are_not_bytes(data, words):
    with pytest.raises(ConversionError, match=words):
        image_to_rgb(fake_image(data=data))


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "array", "memoryview", "list", "tuple"])
def test_rclpy_style_payloads(ts, kind):
    """rclpy gives array.array('B'); bytes/bytearray/memoryview/list/tuple work as well."""
    rgb = synthetic_frame(6, 8)
    msg = encode(ts, rgb, "bgr8", pad=2)
    raw = msg.data.tobytes()
    data = {"bytes": raw, "bytearray": bytearray(raw), "array": array.array("B", raw),
            "memoryview": memoryview(raw), "list": list(raw), "tuple": tuple(raw)}[kind]
    fake = fake_image(height=6, width=8, encoding="bgr8", step=msg.step, data=data)
    np.testing.assert_array_equal(image_to_rgb(fake), rgb)


@pytest.mark.parametrize("flag", [0, 1, True, False, np.uint8(1), np.bool_(True)])
def test_is_bigendian_accepted_and_irrelevant_for_8_bit(ts, flag):
    rgb = synthetic_frame(5, 6)
    np.testing.assert_array_equal(image_to_rgb(encode(ts, rgb, "rgb8", is_bigendian=flag)), rgb)
    # through CDR (uint8 field)
    np.testing.assert_array_equal(image_to_rgb(roundtrip(ts, encode(ts, rgb, "bgr8", is_bigendian=int(flag)), IMAGE)), rgb)


@pytest.mark.parametrize("flag", [2, -1, "yes", None, 1.0])
def test_bad_is_bigendian(flag):
    with pytest.raises(ConversionError, match="is_bigendian"):
        image_to_rgb(fake_image(is_bigendian=flag))


def test_encoding_names_are_case_insensitive(ts):
    rgb = synthetic_frame(4, 6)
    msg = encode(ts, rgb, "bgr8")
    msg.encoding = "BGR8"
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)
    msg.encoding = " bgr8\n"  # and compared without surrounding whitespace
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


# --------------------------------------------------------------------------------------------
# Bad input messages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["32FC1", "16UC1", "mono16", "bayer_rggb16", "8UC3", ""])
def test_unsupported_encoding(ts, encoding):
    depth = np.zeros((4, 4), np.float32)
    msg = ts.types[IMAGE](header=make_header(ts), height=4, width=4, encoding=encoding, is_bigendian=0,
                          step=16, data=depth.view(np.uint8).reshape(-1))
    with pytest.raises(ConversionError) as err:
        image_to_rgb(roundtrip(ts, msg, IMAGE))
    text = str(err.value)
    assert repr(encoding) in text and "unsupported image encoding" in text
    assert "rgb8" in text and "yuv422" in text and "mono8" in text  # lists what is supported


def test_step_too_small(ts):
    msg = encode(ts, synthetic_frame(4, 6), "rgb8")
    msg.step = 17
    with pytest.raises(ConversionError, match=r"step 17 is smaller than one row .*6 x 3 = 18 bytes"):
        image_to_rgb(roundtrip(ts, msg, IMAGE))


def test_data_too_short(ts):
    msg = encode(ts, synthetic_frame(4, 6), "rgb8")
    msg.data = msg.data[:-1]
    with pytest.raises(ConversionError, match=r"image data too short: 71 bytes .* = 72 bytes"):
        image_to_rgb(roundtrip(ts, msg, IMAGE))


def test_data_too_long(ts):
    # e.g. a header that says 2 rows over 4 rows of data: rejected (as cv_bridge), not cropped
    msg = encode(ts, synthetic_frame(4, 6), "rgb8")
    msg.height = 2
    with pytest.raises(ConversionError, match=r"image data too long: 72 bytes for step 18 x height 2 = 36 bytes"):
        image_to_rgb(roundtrip(ts, msg, IMAGE))


@pytest.mark.parametrize("hw", [(0, 0), (0, 4), (4, 0)])
def test_empty_image(ts, hw):
    msg = ts.types[IMAGE](header=make_header(ts), height=hw[0], width=hw[1], encoding="rgb8", is_bigendian=0,
                          step=hw[1] * 3, data=np.zeros(0, np.uint8))
    with pytest.raises(ConversionError, match=rf"empty.*{hw[1]} x {hw[0]} pixels"):
        image_to_rgb(roundtrip(ts, msg, IMAGE))


def test_negative_size():
    with pytest.raises(ConversionError, match="negative"):
        image_to_rgb(fake_image(height=-2))


@pytest.mark.parametrize("encoding", BAYER)
def test_the_smallest_bayer_image_keeps_its_colour(ts, encoding):
    """3 x 3 is the smallest mosaic OpenCV demosaicks (below it every pixel came back black)."""
    rgb = np.full((3, 3, 3), (200, 30, 30), np.uint8)
    assert image_to_rgb(encode(ts, rgb, encoding))[1, 1].tolist() == [200, 30, 30]


@pytest.mark.parametrize("encoding", ["yuv422", "yuyv", "yuv422_yuy2"])
def test_yuv_odd_width(encoding):
    with pytest.raises(ConversionError, match="even width"):
        image_to_rgb(fake_image(width=3, height=2, step=6, encoding=encoding, data=bytes(12)))


def test_non_integer_fields():
    with pytest.raises(ConversionError, match="'width' must be an integer"):
        image_to_rgb(fake_image(width="2"))
    with pytest.raises(ConversionError, match="encoding must be a string"):
        image_to_rgb(fake_image(encoding=None))
    with pytest.raises(ConversionError, match="not a byte buffer"):
        image_to_rgb(fake_image(data=object()))


# --------------------------------------------------------------------------------------------
# CompressedImage
# --------------------------------------------------------------------------------------------


def compressed(ts, payload: bytes | np.ndarray, fmt: str):
    data = np.frombuffer(bytes(payload), np.uint8) if not isinstance(payload, np.ndarray) else payload
    return ts.types[COMPRESSED](header=make_header(ts), format=fmt, data=data)


@pytest.mark.parametrize("fmt", ["jpeg", "jpg", "rgb8; jpeg compressed bgr8", "bgr8; jpeg compressed bgr8", "JPEG", ""])
def test_jpeg_formats(ts, camvid_frame, fmt):
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(camvid_frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    out = compressed_to_rgb(roundtrip(ts, compressed(ts, jpg.reshape(-1), fmt), COMPRESSED))
    expected = cv2.cvtColor(cv2.imdecode(jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out.astype(int) - camvid_frame.astype(int)).mean() < 6  # it is the frame


@pytest.mark.parametrize("fmt", ["png", "rgb8; png compressed rgb8"])
def test_png_is_lossless(ts, fmt):
    rgb = synthetic_frame(30, 41)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = compressed_to_rgb(roundtrip(ts, compressed(ts, png.reshape(-1), fmt), COMPRESSED))
    np.testing.assert_array_equal(out, rgb)


def test_grey_jpeg_gives_three_channels(ts):
    grey = cv2.cvtColor(synthetic_frame(16, 16), cv2.COLOR_RGB2GRAY)
    _, jpg = cv2.imencode(".jpg", grey)
    out = compressed_to_rgb(compressed(ts, jpg.reshape(-1), "mono8; jpeg compressed mono8"))
    assert out.shape == (16, 16, 3) and (out[..., 0] == out[..., 1]).all()


@pytest.fixture(params=["strict", "opencv"])
def jpeg_decoder(request, monkeypatch):
    """Both JPEG decoders: simplejpeg, strict (installed with the package), and OpenCV's fallback."""
    if request.param == "opencv":
        monkeypatch.setattr(jpeg, "_simplejpeg", None)
    else:
        assert jpeg._simplejpeg is not None and conversions.STRICT_JPEG
    return request.param


def test_corrupt_jpeg(ts, camvid_frame, jpeg_decoder):
    _, jpg = cv2.imencode(".jpg", camvid_frame)
    raw = jpg.reshape(-1).tobytes()
    garbage = b"\xff\xd8" + bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)) + b"\xff\xd9"
    with pytest.raises(ConversionError, match="corrupt JPEG|could not decode"):
        compressed_to_rgb(roundtrip(ts, compressed(ts, garbage, "jpeg"), COMPRESSED))
    with pytest.raises(ConversionError, match="truncated"):
        compressed_to_rgb(roundtrip(ts, compressed(ts, raw[: len(raw) // 2], "jpeg"), COMPRESSED))
    with pytest.raises(ConversionError, match="neither a JPEG nor a PNG"):
        compressed_to_rgb(compressed(ts, b"not an image at all", "jpeg"))
    with pytest.raises(ConversionError, match="no data"):
        compressed_to_rgb(compressed(ts, b"", "jpeg"))


def test_jpeg_that_lost_scan_data_is_refused_by_the_strict_decoder(ts, camvid_frame, jpeg_decoder):
    """An MJPEG camera dropping USB packets: a quarter of the scan data gone, the end-of-image
    marker intact. libjpeg fills the rest with grey and only warns; the strict decoder refuses it
    (the OpenCV fallback cannot tell, as documented)."""
    _, jpg = cv2.imencode(".jpg", camvid_frame)
    raw = jpg.reshape(-1).tobytes()
    n = len(raw)
    lost = raw[: n // 2] + raw[n // 2 + n // 4:]
    msg = roundtrip(ts, compressed(ts, lost, "jpeg"), COMPRESSED)
    if jpeg_decoder == "strict":
        with pytest.raises(ConversionError, match="corrupt JPEG.*premature end of data segment"):
            compressed_to_rgb(msg)
    else:
        assert compressed_to_rgb(msg).shape == camvid_frame.shape


def test_jpeg_with_a_trailer_decodes_strictly(ts, camvid_frame):
    # data after the end-of-image marker (a metadata trailer) is no corruption
    _, jpg = cv2.imencode(".jpg", camvid_frame)
    out = compressed_to_rgb(compressed(ts, jpg.reshape(-1).tobytes() + b"trailer" * 40, "jpeg"))
    np.testing.assert_array_equal(out, cv2.cvtColor(cv2.imdecode(jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))


def test_exif_orientation_is_ignored_by_every_decoder(ts, jpeg_decoder):
    """compressed_image_transport decodes a CompressedImage as stored, whatever its EXIF orientation
    (its default mode ``unchanged`` is IMREAD_UNCHANGED, and its JPEG path TurboJPEG), and so did
    the strict decoder; the OpenCV fallback and the PNG path (IMREAD_COLOR) turned the frame by the
    tag, so its labels no longer lined up with the image and the CameraInfo others see."""
    rgb = synthetic_frame(30, 40)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    jpg = cv2.imencode(".jpg", bgr)[1].tobytes()
    stored = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    for orientation in (3, 6):
        out = compressed_to_rgb(compressed(ts, with_exif_orientation(jpg, orientation), "jpeg"))
        np.testing.assert_array_equal(out, stored)
        png = png_with_exif_orientation(cv2.imencode(".png", bgr)[1].tobytes(), orientation)
        np.testing.assert_array_equal(compressed_to_rgb(compressed(ts, png, "png")), rgb)
    # OpenCV 4.6.0 and 5.1.0 turn the PNG by its chunk (IMREAD_COLOR would have turned the frame);
    # 4.5.4 reads it as stored. The frame must come out as stored either way.
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape[:2] in ((40, 30), (30, 40))


def test_data_that_is_not_what_the_format_says_is_refused(ts):
    _, bmp = cv2.imencode(".bmp", synthetic_frame(8, 8))
    for fmt in ("jpeg", "png", ""):
        with pytest.raises(ConversionError, match="neither a JPEG nor a PNG.*42 4d"):  # "BM"
            compressed_to_rgb(compressed(ts, bmp.reshape(-1), fmt))


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_frames_above_the_pixel_limit_are_refused_before_decoding(ts, ext, jpeg_decoder, monkeypatch):
    _, data = cv2.imencode(ext, synthetic_frame(60, 80))
    msg = compressed(ts, data.reshape(-1), ext[1:])
    assert compressed_to_rgb(msg, max_pixels=4800).shape == (60, 80, 3)
    if ext == ".png" or jpeg_decoder == "strict":  # from the header: the decoder never runs
        monkeypatch.setattr(cv2, "imdecode", None)
        if jpeg._simplejpeg is not None:
            monkeypatch.setattr(jpeg._simplejpeg, "decode_jpeg", None)
    with pytest.raises(ConversionError, match="80 x 60 = 4800 pixels, more than the 4799 allowed"):
        compressed_to_rgb(msg, max_pixels=4799)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_a_16_bit_png_decodes_as_an_image_folder_decodes_it(ts, tmp_path, channels):
    """mono16/rgb16 PNGs (`png compressed mono16`) are scaled by round(v * 255 / 65535) as a folder
    of PNGs is; OpenCV's IMREAD_COLOR had dropped the low byte (65280 -> 255 instead of 254)."""
    from mpvss_ros.io.video import open_source

    values = np.array([0, 128, 255, 256, 383, 32767, 32768, 65279, 65280, 65535, 1000, 40000], np.uint16)
    img = np.repeat(values.reshape(3, 4)[..., None], channels, axis=2)
    if channels > 1:
        img[..., 0] = img[..., 0][::-1]  # channels differ: the order is checked too
    png = cv2.imencode(".png", img)[1].tobytes()
    (tmp_path / "f.png").write_bytes(png)
    with open_source(tmp_path) as src:
        folder = next(iter(src)).image
    np.testing.assert_array_equal(compressed_to_rgb(compressed(ts, png, "mono16; png compressed mono16")), folder)
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(folder[..., 1], expected)


def test_a_jpeg_header_the_strict_probe_cannot_read_decodes_as_an_image_folder_decodes_it(ts, tmp_path):
    """A chroma-subsampled CMYK JPEG: TurboJPEG's header probe gives up ("could not determine
    subsampling level"), libjpeg reads it. OpenCV decodes it for both a CompressedImage and a
    folder (the message was refused as a corrupt JPEG while the folder decoded it)."""
    import io

    from PIL import Image as PilImage

    from mpvss_ros.io.video import open_source

    cmyk = np.zeros((16, 24, 4), np.uint8)
    cmyk[..., 0], cmyk[..., 1], cmyk[:8, :, 2] = 10, 200, 90  # two colours, top and bottom
    buf = io.BytesIO()
    PilImage.fromarray(cmyk, "CMYK").save(buf, format="JPEG", subsampling=2)  # 4:2:0
    data = buf.getvalue()
    with pytest.raises(ValueError, match="subsampling"):
        jpeg._simplejpeg.decode_jpeg_header(data)  # what this test is about
    (tmp_path / "f.jpg").write_bytes(data)
    with open_source(tmp_path) as src:
        folder = next(iter(src)).image
    out = compressed_to_rgb(roundtrip(ts, compressed(ts, data, "jpeg"), COMPRESSED))
    np.testing.assert_array_equal(out, folder)
    np.testing.assert_array_equal(out, cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                                                    cv2.COLOR_BGR2RGB))
    assert out.shape == (16, 24, 3) and not (out[0] == out[-1]).all()


def test_png_without_its_header_is_refused(ts):
    _, png = cv2.imencode(".png", synthetic_frame(6, 8))
    with pytest.raises(ConversionError, match="corrupt PNG.*no image header"):
        compressed_to_rgb(compressed(ts, png.reshape(-1)[:20], "png"))
    not_first = png.reshape(-1).copy()
    not_first[12:16] = np.frombuffer(b"tEXt", np.uint8)  # another chunk where the IHDR chunk must be
    with pytest.raises(ConversionError, match="corrupt PNG.*no image header"):
        compressed_to_rgb(compressed(ts, not_first, "png"), max_pixels=None)


def test_damaged_png_is_refused_before_libpng_complains(ts, capfd):
    """A PNG cut short or damaged in transit is refused with a reason naming the chunk, before
    OpenCV's libpng prints its own error to stderr for every such frame (past the node's rate
    limit); bytes after IEND are no damage."""
    rgb = synthetic_frame(30, 40)
    png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    idat = png.index(b"IDAT") - 4
    for cut, where in ((len(png) // 2, "inside its 'IDAT' chunk"), (len(png) - 12, "before its IEND chunk"),
                       (len(png) - 1, "inside its 'IEND' chunk")):  # half, before IEND, its last CRC byte
        with pytest.raises(ConversionError, match=f"corrupt PNG.*ends {where}"):
            compressed_to_rgb(compressed(ts, png[:cut], "png"))
    for at in (idat + 8, idat + 20, len(png) - 2):  # first and a later byte of IDAT's data, IEND's CRC
        damaged = bytearray(png)
        damaged[at] ^= 0x10
        kind = "IEND" if at > len(png) - 12 else "IDAT"
        with pytest.raises(ConversionError, match=f"corrupt PNG.*'{kind}' chunk at byte {len(png) - 12 if kind == 'IEND' else idat} fails its CRC"):
            compressed_to_rgb(compressed(ts, bytes(damaged), "png"))
    assert "libpng" not in capfd.readouterr().err
    np.testing.assert_array_equal(compressed_to_rgb(compressed(ts, png + b"trailer" * 20, "png")), rgb)


def test_raw_frames_above_the_pixel_limit_are_refused(ts):
    msg = encode(ts, synthetic_frame(60, 80), "rgb8")
    assert image_to_rgb(msg, max_pixels=4800).shape == (60, 80, 3)
    with pytest.raises(ConversionError, match="80 x 60 = 4800 pixels, more than the 4799 allowed"):
        image_to_rgb(msg, max_pixels=4799)
    assert conversions.DEFAULT_MAX_IMAGE_PIXELS == 4096 * 4096


@pytest.mark.parametrize("fmt", ["16UC1; compressedDepth png", "tiff", "rgb8; theora"])
def test_unsupported_compressed_format(ts, fmt):
    _, png = cv2.imencode(".png", synthetic_frame(4, 4))
    with pytest.raises(ConversionError, match="unsupported compressed image format"):
        compressed_to_rgb(compressed(ts, png.reshape(-1), fmt))


@pytest.mark.parametrize("encoding", BAYER)
def test_a_bayer_mosaic_compressed_by_image_transport_is_demosaicked_as_a_raw_one(ts, camvid_frame, encoding):
    """compressed_image_transport writes encodings that are not colour as they are, in a PNG, and
    names them before ';' (format "bayer_rggb8; png compressed "): the grey mosaic must be
    demosaicked exactly as the raw Image is, not segmented as a grey checkerboard."""
    mosaic = bayer_mosaic(camvid_frame, encoding)
    raw = image_to_rgb(encode_mosaic(ts, mosaic, encoding))
    _, png = cv2.imencode(".png", mosaic)
    out = compressed_to_rgb(roundtrip(ts, compressed(ts, png.reshape(-1), f"{encoding}; png compressed "), COMPRESSED))
    np.testing.assert_array_equal(out, raw)
    assert np.abs(out[2:-2, 2:-2].astype(int) - camvid_frame[2:-2, 2:-2].astype(int)).mean() < 8  # colour, not grey
    with pytest.raises(ConversionError, match="not an 8-bit grey Bayer mosaic"):  # a colour PNG that says it is one
        _, colour = cv2.imencode(".png", camvid_frame)
        compressed_to_rgb(compressed(ts, colour.reshape(-1), f"{encoding}; png compressed "))
    with pytest.raises(ConversionError, match="at least 3 x 3"):
        _, tiny = cv2.imencode(".png", mosaic[:2, :2])
        compressed_to_rgb(compressed(ts, tiny.reshape(-1), f"{encoding}; png compressed "))
    # a 16-bit grey PNG is no 8-bit mosaic (it would demosaic to uint16 RGB)
    with pytest.raises(ConversionError, match="uint16 with 1 channels, not an 8-bit grey Bayer mosaic"):
        _, wide = cv2.imencode(".png", mosaic.astype(np.uint16) * 257)
        compressed_to_rgb(compressed(ts, wide.reshape(-1), f"{encoding}; png compressed "))
    # the encoding before ';' is read without surrounding spaces
    np.testing.assert_array_equal(compressed_to_rgb(compressed(ts, png.reshape(-1), f" {encoding} ; png compressed ")), raw)


def test_a_bayer_mosaic_in_a_grey_jpeg_is_demosaicked_too(ts):
    """The grey-JPEG branch ("bayer_rggb8; jpeg compressed mono8", lossy): a one-colour mosaic
    comes back in that colour, not as grey."""
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[...] = (200, 60, 30)
    _, jpg = cv2.imencode(".jpg", bayer_mosaic(rgb, "bayer_rggb8"), [cv2.IMWRITE_JPEG_QUALITY, 100])
    out = compressed_to_rgb(compressed(ts, jpg.reshape(-1), "bayer_rggb8; jpeg compressed mono8"))
    assert np.abs(out[8:-8, 8:-8].astype(int) - (200, 60, 30)).max() <= 12


def encode_mosaic(ts, mosaic: np.ndarray, encoding: str):
    h, w = mosaic.shape
    return ts.types[IMAGE](header=make_header(ts), height=h, width=w, encoding=encoding, is_bigendian=0, step=w,
                           data=mosaic.reshape(-1))


@pytest.mark.parametrize("original", ["16UC1", "32FC1", "8UC3", "mono12"])
def test_compressed_images_of_encodings_that_cannot_be_segmented_are_refused_as_raw_ones(ts, original):
    """A depth map through compressed_image_transport's PNG mode ("16UC1; png compressed ") is a
    16-bit grey PNG: refused, as the raw 16UC1 Image is, not segmented as a dark camera frame."""
    depth = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 3)
    _, png = cv2.imencode(".png", depth)
    with pytest.raises(ConversionError, match=f"original encoding '{original}' cannot be segmented"):
        compressed_to_rgb(compressed(ts, png.reshape(-1), f"{original}; png compressed "))
    # the formats that name no camera encoding, or a colour one, decode as before
    for fmt in ("png", "jpeg; png", "mono16; png compressed ", "bgr8; png compressed bgr8"):
        assert compressed_to_rgb(compressed(ts, png.reshape(-1), fmt)).shape == (48, 64, 3)


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


def test_stamp_conversions(ts):
    Time = ts.types["builtin_interfaces/msg/Time"]
    assert stamp_to_seconds(Time(sec=12, nanosec=500_000_000)) == 12.5
    for t in (0.0, 12.5, 1.25e-7, 1700000000.123456, 0.9999999999, -1.25):
        s = seconds_to_stamp(Time, t)
        assert 0 <= s.nanosec < 1_000_000_000
        assert abs(stamp_to_seconds(s) - t) < 1e-6  # float64 resolves ~0.24 us at 1.7e9 s
    assert (seconds_to_stamp(Time, 0.9999999999).sec, seconds_to_stamp(Time, 0.9999999999).nanosec) == (1, 0)
    assert (seconds_to_stamp(Time, -1.25).sec, seconds_to_stamp(Time, -1.25).nanosec) == (-2, 750_000_000)
    with pytest.raises(ConversionError):
        seconds_to_stamp(Time, float("nan"))
    # the last stamp of int32 seconds: float64 rounds it up to 2**31, which no Time holds
    last = seconds_to_stamp(Time, stamp_to_seconds(Time(sec=2**31 - 1, nanosec=999_999_900)))
    assert (last.sec, last.nanosec) == (2**31 - 1, 999_999_999)
    ts.serialize_cdr(last, "builtin_interfaces/msg/Time")  # was sec = 2**31: struct.error
    with pytest.raises(ConversionError, match="int32"):
        seconds_to_stamp(Time, 2.0**31 + 1)


# --------------------------------------------------------------------------------------------
# Output builders
# --------------------------------------------------------------------------------------------


def assert_same_header(msg, header) -> None:
    assert msg.header.stamp.sec == header.stamp.sec
    assert msg.header.stamp.nanosec == header.stamp.nanosec
    assert msg.header.frame_id == header.frame_id


def decode_image(msg) -> np.ndarray:
    if msg.encoding == "mono16":
        dt = np.dtype(">u2" if msg.is_bigendian else "<u2")
        return np.frombuffer(np.asarray(msg.data).tobytes(), dt).reshape(msg.height, msg.step // 2)[:, : msg.width]
    c = 3 if msg.encoding == "rgb8" else 1
    arr = np.asarray(msg.data).reshape(msg.height, msg.step)[:, : msg.width * c]
    return arr.reshape(msg.height, msg.width, 3) if c == 3 else arr


@pytest.mark.parametrize("encoding,arr", [
    ("mono8", np.arange(35, dtype=np.uint8).reshape(5, 7)),
    ("mono16", (np.arange(35, dtype=np.uint16) * 1000).reshape(5, 7)),
    ("mono16", (np.arange(35, dtype=np.uint16) * 1000).reshape(5, 7).astype(">u2")),
    ("rgb8", synthetic_frame(5, 7)),
])
def test_make_image(ts, types, encoding, arr):
    header = make_header(ts, frame_id="cam_left")
    msg = make_image(types.image, header, arr, encoding)
    assert msg.header is header  # copied unchanged
    back = roundtrip(ts, msg, IMAGE)
    assert_same_header(back, header)
    assert (back.height, back.width, back.encoding) == (5, 7, encoding)
    itemsize, channels = (2, 1) if encoding == "mono16" else (1, 3 if encoding == "rgb8" else 1)
    assert back.step == 7 * itemsize * channels
    assert back.is_bigendian == int(itemsize == 2 and sys.byteorder == "big")
    np.testing.assert_array_equal(decode_image(back), arr)


def test_make_image_little_endian_mono16_bytes(types, ts):
    msg = make_image(types.image, make_header(ts), np.array([[0x0102, 0xA0B0]], np.uint16), "mono16")
    if sys.byteorder == "little":
        assert msg.is_bigendian == 0
        assert msg.data.tobytes() == b"\x02\x01\xb0\xa0"


@pytest.mark.parametrize("encoding,arr", [
    ("mono8", np.zeros((4, 4), np.uint16)),
    ("mono16", np.zeros((4, 4), np.uint8)),
    ("rgb8", np.zeros((4, 4), np.uint8)),
    ("rgb8", np.zeros((4, 4, 4), np.uint8)),
    ("mono8", np.zeros((4, 4), np.float32)),
    ("bgr8", np.zeros((4, 4, 3), np.uint8)),
])
def test_make_image_rejects_mismatch(types, ts, encoding, arr):
    with pytest.raises(ConversionError):
        make_image(types.image, make_header(ts), arr, encoding)


class RclpyLikeImage:
    """Not a dataclass: the builders must fill it as rclpy wants (array.array payloads)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class RclpyLikeMasks(RclpyLikeImage):
    pass


def test_rclpy_style_classes_get_array_array(ts):
    header = make_header(ts)
    img = make_image(RclpyLikeImage, header, np.full((3, 4), 7, np.uint8), "mono8")
    assert isinstance(img.data, array.array) and img.data.typecode == "B" and img.data.tobytes() == bytes([7] * 12)
    masks = make_class_masks(RclpyLikeMasks, RclpyLikeImage, header, {2: np.zeros((3, 4), np.uint8)}, ["a", "b", "c"])
    assert isinstance(masks.class_ids, array.array) and masks.class_ids.typecode == "H" and list(masks.class_ids) == [2]
    assert masks.class_names == ["c"]


def test_label_info_matches_model_classes(ts, types, lite):
    header = make_header(ts)
    names = lite.config.class_names
    msg = roundtrip(ts, make_label_info(types.label_info, types.vision_class, header, names, threshold=0.25),
                    "vision_msgs/msg/LabelInfo")
    assert_same_header(msg, header)
    assert [c.class_id for c in msg.class_map] == list(range(lite.config.num_classes))
    assert [c.class_name for c in msg.class_map] == names
    assert msg.threshold == pytest.approx(0.25)


def test_label_info_leaves_the_unlabeled_id_free(types, ts):
    """vision_msgs' VisionClass reserves class_id 65535 for UNLABELED: 65535 classes fit, 65536 do not."""
    names = [f"c{i}" for i in range(65536)]
    assert make_label_info(types.label_info, types.vision_class, make_header(ts), names[:-1]).class_map[-1].class_id == 65534
    with pytest.raises(ConversionError, match="at most 65535 classes"):
        make_label_info(types.label_info, types.vision_class, make_header(ts), names)


def test_label_info_many_classes(ts, types):
    names = [f"c{i}" for i in range(300)]
    msg = roundtrip(ts, make_label_info(types.label_info, types.vision_class, make_header(ts), names), "vision_msgs/msg/LabelInfo")
    assert [c.class_id for c in msg.class_map] == list(range(300)) and msg.class_map[299].class_name == "c299"


def fake_result(h: int = 48, w: int = 64, k: int = 5, dtype=np.uint8, masks: bool = False) -> SegmentationResult:
    yy, xx = np.mgrid[0:h, 0:w]
    labels = ((xx * k) // w).astype(dtype)
    return SegmentationResult(
        frame_index=7, stamp=1700000000.5, labels=labels, confidence=(yy * 255 // max(h - 1, 1)).astype(np.uint8),
        class_masks=class_masks_from_labels(labels) if masks else None, is_key_frame=False, key_frame_index=5,
        key_frame_stamp=1700000000.25, scene_score=0.125, key_frame_reason="",
        stage_latency_ms={"schedule": 0.5, "preprocess": 1.0, "propagation": 4.0, "postprocess": 2.0, "total": 7.75})


def test_segmentation_info_fields(ts, types):
    header = make_header(ts)
    result = fake_result()
    msg = roundtrip(ts, make_segmentation_info(types.segmentation_info, types.time, header, result), "mpvss_ros/msg/SegmentationInfo")
    assert_same_header(msg, header)
    assert msg.frame_index == 7 and msg.is_key_frame is False and msg.key_frame_reason == ""
    assert (msg.key_frame_stamp.sec, msg.key_frame_stamp.nanosec) == (1700000000, 250_000_000)
    assert msg.scene_score == pytest.approx(0.125)
    assert list(msg.stage_names) == ["schedule", "preprocess", "propagation", "postprocess"]
    np.testing.assert_allclose(msg.stage_latency_ms, [0.5, 1.0, 4.0, 2.0])
    assert msg.total_latency_ms == pytest.approx(7.75)


def test_segmentation_info_frame_index_wraps_at_uint32(ts, types):
    # frame_index is uint32: a 20 fps stream passes 65535 within an hour; only 2**32 wraps it
    header = make_header(ts)
    for index, expected in ((70_000, 70_000), (2**32 - 1, 2**32 - 1), (2**32 + 3, 3)):
        result = fake_result()
        result.frame_index = index
        msg = roundtrip(ts, make_segmentation_info(types.segmentation_info, types.time, header, result),
                        "mpvss_ros/msg/SegmentationInfo")
        assert msg.frame_index == expected


def test_build_outputs_on_real_frame(ts, types, camvid_frame, band_model, lite):
    seg = VideoSegmenter(band_model, CopyPropagator(), FixedIntervalScheduler(3))
    header = make_header(ts, sec=1700000001, nanosec=66_666_667, frame_id="front_camera")
    result = seg.push(camvid_frame, stamp_to_seconds(header.stamp))
    assert len(np.unique(result.labels)) >= 2  # real boundaries
    names = lite.config.class_names[:5]
    palette = make_palette(5)
    out = build_outputs(types, header, result, camvid_frame, palette, names, alpha=0.4,
                        want_colored=True, want_overlay=True, want_class_masks=True)
    msgs = {"labels": (out.labels, IMAGE), "confidence": (out.confidence, IMAGE), "colored": (out.colored, IMAGE),
            "overlay": (out.overlay, IMAGE), "class_masks": (out.class_masks, "mpvss_ros/msg/ClassMasks"),
            "info": (out.info, "mpvss_ros/msg/SegmentationInfo")}
    back = {k: roundtrip(ts, m, t) for k, (m, t) in msgs.items()}
    for k, m in back.items():
        assert_same_header(m, header), k
    for m in back["class_masks"].masks:
        assert_same_header(m, header)
    h, w = camvid_frame.shape[:2]
    assert back["labels"].encoding == "mono8" and (back["labels"].height, back["labels"].width) == (h, w)
    np.testing.assert_array_equal(decode_image(back["labels"]), result.labels)
    assert back["confidence"].encoding == "mono8"
    np.testing.assert_array_equal(decode_image(back["confidence"]), result.confidence)
    np.testing.assert_array_equal(decode_image(back["colored"]), colorize(result.labels, palette))
    np.testing.assert_array_equal(decode_image(back["overlay"]), overlay(
        camvid_frame, result.labels, palette, alpha=0.4, class_names=names, tag="key frame"))
    cm = back["class_masks"]
    present = sorted(int(c) for c in np.unique(result.labels))
    assert list(cm.class_ids) == present and cm.class_names == [names[c] for c in present]
    for cid, m in zip(cm.class_ids, cm.masks):
        assert m.encoding == "mono8"
        np.testing.assert_array_equal(decode_image(m), np.where(result.labels == cid, 255, 0))
    info = back["info"]
    assert info.is_key_frame is True and info.key_frame_reason == "first" and info.frame_index == 0
    assert (info.key_frame_stamp.sec, info.key_frame_stamp.nanosec) == (header.stamp.sec, header.stamp.nanosec)
    assert list(info.stage_names) == [k for k in result.stage_latency_ms if k != "total"]
    # a propagated frame's overlay is tagged with its distance from its key frame: frame 4, key frame 3
    later = [seg.push(camvid_frame, stamp_to_seconds(header.stamp) + 0.1 * i) for i in range(1, 5)][-1]
    assert (later.frame_index, later.key_frame_index, later.is_key_frame) == (4, 3, False)
    out = build_outputs(types, header, later, camvid_frame, palette, names, alpha=0.4, want_overlay=True)
    np.testing.assert_array_equal(decode_image(roundtrip(ts, out.overlay, IMAGE)), overlay(
        camvid_frame, later.labels, palette, alpha=0.4, class_names=names, tag="propagated +1"))


@pytest.mark.parametrize("k", [5, 300])
def test_class_masks_from_labels_equal_segmenter_masks(make_band_model, camvid_frame, k):
    seg = VideoSegmenter(make_band_model(k), CopyPropagator(), FixedIntervalScheduler(2), class_masks=True)
    result = seg.push(camvid_frame[:120, :160], 0.0)
    # Independent reference: one 0/255 mask per class present, by plain comparison.
    reference = {int(c): np.where(result.labels == c, 255, 0).astype(np.uint8) for c in np.unique(result.labels)}
    for masks in (class_masks_from_labels(result.labels), result.class_masks):
        assert list(masks) == sorted(reference) and len(masks) >= 2
        for c, m in reference.items():
            assert masks[c].dtype == np.uint8
            np.testing.assert_array_equal(masks[c], m)
    wide = result.labels.astype(np.int32)  # the slow path for other integer dtypes
    assert {c: m.tolist() for c, m in class_masks_from_labels(wide).items()} == \
        {c: m.tolist() for c, m in reference.items()}


def test_build_outputs_optional_messages_off(ts, types):
    out = build_outputs(types, make_header(ts), fake_result(), None, make_palette(5), ["a"] * 5)
    assert out.colored is None and out.overlay is None and out.class_masks is None
    assert out.labels is not None and out.confidence is not None and out.info is not None


def test_build_outputs_uses_segmenter_masks_when_present(ts, types):
    result = fake_result(masks=True)
    result.class_masks = {1: result.class_masks[1]}  # only what the segmenter gave is published
    out = build_outputs(types, make_header(ts), result, None, make_palette(5), list("abcde"), want_class_masks=True)
    assert list(out.class_masks.class_ids) == [1] and out.class_masks.class_names == ["b"]


def test_mono16_labels_when_more_than_255_classes(ts, types, make_band_model):
    seg = VideoSegmenter(make_band_model(300), CopyPropagator(), FixedIntervalScheduler(2))
    frame = synthetic_frame(40, 64)
    result = seg.push(frame, 1.0)
    assert result.labels.dtype == np.uint16
    header = make_header(ts)
    out = build_outputs(types, header, result, frame, make_palette(300), [f"c{i}" for i in range(300)],
                        want_colored=True, want_class_masks=True)
    back = roundtrip(ts, out.labels, IMAGE)
    assert back.encoding == "mono16" and back.step == 2 * 64
    np.testing.assert_array_equal(decode_image(back), result.labels)
    assert_same_header(back, header)
    high = fake_result(k=300, dtype=np.uint16)
    back = roundtrip(ts, build_outputs(types, header, high, None, make_palette(300), []).labels, IMAGE)
    assert back.encoding == "mono16" and decode_image(back).max() == high.labels.max() > 255
    np.testing.assert_array_equal(decode_image(back), high.labels)


# --------------------------------------------------------------------------------------------
# Message definitions and the no-rclpy rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ClassMasks", "SegmentationInfo"])
def test_msg_files_match_registered_definitions(name):
    text = (REPO / "msg" / f"{name}.msg").read_text()
    assert text == MSG_DEFINITIONS[f"mpvss_ros/msg/{name}"]
    assert f"mpvss_ros/msg/{name}" in get_types_from_msg(text, f"mpvss_ros/msg/{name}")


def test_registered_fields(ts):
    fields = {n: [f[0] for f in ts.get_msgdef(n).fields] for n in
              ("mpvss_ros/msg/ClassMasks", "mpvss_ros/msg/SegmentationInfo", "vision_msgs/msg/LabelInfo", "vision_msgs/msg/VisionClass")}
    assert fields["mpvss_ros/msg/ClassMasks"] == ["header", "class_ids", "class_names", "masks"]
    assert fields["mpvss_ros/msg/SegmentationInfo"] == [
        "header", "frame_index", "is_key_frame", "key_frame_stamp", "key_frame_reason", "scene_score",
        "stage_names", "stage_latency_ms", "total_latency_ms"]
    assert fields["vision_msgs/msg/LabelInfo"] == ["header", "class_map", "threshold"]
    assert fields["vision_msgs/msg/VisionClass"] == ["class_id", "class_name"]


def test_registration_is_idempotent():
    store = get_typestore(Stores.ROS2_HUMBLE)
    a = rosbags_message_types(store)
    b = rosbags_message_types(store)
    assert a == b


def test_a_typestore_that_already_holds_vision_msgs_keeps_its_own():
    """Types the typestore already has (e.g. a bag's own vision_msgs, defined otherwise) are kept, not
    registered again (rosbags refuses a second, different definition); the missing ones are added."""
    store = get_typestore(Stores.ROS2_HUMBLE)
    own = MSG_DEFINITIONS["vision_msgs/msg/LabelInfo"] + "string extra\n"
    store.register(get_types_from_msg(own, "vision_msgs/msg/LabelInfo"))
    types = rosbags_message_types(store)
    assert [f[0] for f in store.get_msgdef("vision_msgs/msg/LabelInfo").fields][-1] == "extra"
    assert types.class_masks is store.types["mpvss_ros/msg/ClassMasks"]


def test_ros_modules_import_without_rclpy():
    code = ("import sys; sys.modules['rclpy'] = None\n"
            "import mpvss_ros.ros.conversions, mpvss_ros.ros.bag\n"
            "assert 'rclpy' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# --------------------------------------------------------------------------------------------
# Autoware's run-length encoded mask
# --------------------------------------------------------------------------------------------


def autoware_decode(data: bytes, rows: int, cols: int) -> np.ndarray:
    """A port of Autoware's ``perception_utils::runLengthDecoder`` (autoware_universe, read
    2026-12-06): 5-byte runs, a uint8 value then a native (little-endian) int length, written
    row by row into a zero-filled (rows, cols) mask."""
    mask = np.zeros(rows * cols, np.uint8)
    idx = 0
    for i in range(0, len(data), 5):
        value, length = data[i], int.from_bytes(data[i + 1:i + 5], "little", signed=True)
        mask[idx:idx + length] = value
        idx += length
    return mask.reshape(rows, cols)


def test_autoware_rle_by_hand():
    mask = np.array([[1, 1, 2], [2, 2, 0]], np.uint8)
    assert autoware_rle(mask).tobytes() == (b"\x01\x02\x00\x00\x00" b"\x02\x03\x00\x00\x00" b"\x00\x01\x00\x00\x00")
    one_run = autoware_rle(np.full((300, 400), 7, np.uint8)).tobytes()  # a run longer than 16 bits
    assert one_run == b"\x07" + (300 * 400).to_bytes(4, "little")
    for bad in (np.zeros((0, 3), np.uint8), np.zeros(5, np.uint8), np.zeros((2, 2), np.uint16)):
        with pytest.raises(ConversionError, match="Autoware mask"):
            autoware_rle(bad)


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1), st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_autoware_rle_decodes_as_autoware_decodes_it(rows, cols, seed, values):
    mask = np.random.default_rng(seed).integers(0, values, (rows, cols)).astype(np.uint8)
    data = autoware_rle(mask).tobytes()
    np.testing.assert_array_equal(autoware_decode(data, rows, cols), mask)
    assert len(data) == 5 * (1 + int(np.count_nonzero(mask.ravel()[1:] != mask.ravel()[:-1])))


def test_autoware_class_ids_by_name_and_given():
    camvid = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
              "Bicyclist"]
    by_name = autoware_class_ids(camvid)
    assert [AUTOWARE_CLASSES[i] for i in by_name] == ["SKY", "BUILDING", "OBSTACLE", "ROAD", "SIDEWALK", "VEGETATION",
                                                      "TRAFFIC_SIGN", "WALL", "VEHICLE", "PERSON", "BIKE"]
    assert by_name.dtype == np.uint8 and len(AUTOWARE_CLASSES) == 16 and AUTOWARE_CLASSES[15] == "SKY"
    assert autoware_class_ids(["road", "lamp post"]).tolist() == [9, 0]  # unknown names: UNKNOWN
    assert autoware_class_ids(["a", "b"], [3, 200]).tolist() == [3, 200]
    with pytest.raises(ValueError, match="3 Autoware class IDs for a model with 2 classes"):
        autoware_class_ids(["a", "b"], [1, 2, 3])
    with pytest.raises(ValueError, match="1 Autoware class IDs for a model with 2 classes"):  # too few as well
        autoware_class_ids(["a", "b"], [3])
    with pytest.raises(ValueError, match="0..255"):
        autoware_class_ids(["a", "b"], [1, 256])


def test_autoware_mask_message_as_autoware_reads_it(ts, types):
    header = make_header(ts, frame_id="front_camera")
    result = fake_result(h=30, w=40, k=5)
    lut = np.array([9, 7, 6, 15, 0], np.uint8)
    out = build_outputs(types, header, result, None, make_palette(5), list("abcde"), autoware_class_ids=lut)
    back = roundtrip(ts, out.autoware_mask, IMAGE)
    assert_same_header(back, header)
    assert (back.height, back.width, back.encoding, back.step, back.is_bigendian) == (30, 40, "mono8", 40, 0)
    np.testing.assert_array_equal(autoware_decode(np.asarray(back.data).tobytes(), 30, 40), lut[result.labels])
    assert len(back.data) == 5 * 5 * 30  # 5-byte runs: five column bands in each of the 30 rows
    assert build_outputs(types, header, result, None, make_palette(5), list("abcde")).autoware_mask is None
    wide = fake_result(h=4, w=6, k=300, dtype=np.uint16)  # more than 255 classes: labels are uint16
    msg = make_autoware_mask(types.image, header, wide.labels, np.arange(300, dtype=np.uint64).astype(np.uint8))
    np.testing.assert_array_equal(autoware_decode(np.asarray(msg.data).tobytes(), 4, 6), wide.labels.astype(np.uint8))
    with pytest.raises(ConversionError, match="label 4 has no Autoware class ID"):
        make_autoware_mask(types.image, header, result.labels, lut[:4])


def test_autoware_classes_agree_with_the_parameter_description():
    """AUTOWARE_CLASSES is the ID contract with Autoware; the node's parameter description states
    the same numbering independently (0 UNKNOWN ... 15 SKY), so a reordering of either shows."""
    import re

    from mpvss_ros.ros.parameters import SPECS

    stated = re.findall(r"(\d+) ([A-Z][A-Z_]+)", SPECS["autoware_class_ids"].description)
    assert [(int(i), name) for i, name in stated[:16]] == list(enumerate(AUTOWARE_CLASSES))


def test_autoware_class_ids_by_cityscapes_names_and_padded_names():
    # the synonyms of the name table, as a Cityscapes-trained model names its classes
    names = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
             "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert [AUTOWARE_CLASSES[i] for i in autoware_class_ids(names)] == [
        "ROAD", "SIDEWALK", "BUILDING", "WALL", "WALL", "OBSTACLE", "TRAFFIC_LIGHT", "TRAFFIC_SIGN", "VEGETATION",
        "VEGETATION", "SKY", "PERSON", "PERSON", "VEHICLE", "VEHICLE", "VEHICLE", "VEHICLE", "BIKE", "BIKE"]
    assert autoware_class_ids([" Road ", "Car\n"]).tolist() == [9, 7]  # names compared stripped


def test_autoware_class_ids_refuse_negative_ids():
    with pytest.raises(ValueError, match="0..255"):
        autoware_class_ids(["a", "b"], [-1, 2])


def test_autoware_mask_refuses_signed_labels(ts, types):
    header = make_header(ts)
    labels = np.array([[0, 1], [-1, 2]], np.int32)  # a signed array would index the map from its end
    with pytest.raises(ConversionError, match="unsigned"):
        make_autoware_mask(types.image, header, labels, np.array([9, 7, 6], np.uint8))


# --- image_to_rgb: the payload and the integer fields -------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int8, np.float32])
def test_numpy_payload_of_another_dtype_is_refused(dtype):
    """A numpy payload must hold uint8 bytes: 12 uint16 values are no 2 x 2 rgb8 image."""
    with pytest.raises(ConversionError, match="must hold uint8 bytes"):
        image_to_rgb(fake_image(data=np.arange(12, dtype=dtype)))


@pytest.mark.parametrize("field", ["height", "width", "step"])
def test_bool_size_fields_are_refused(field):
    """True is an int in Python, but no image size."""
    fields = dict(height=1, width=1, step=3, data=bytes(3))
    fields[field] = True
    with pytest.raises(ConversionError, match=f"'{field}' must be an integer"):
        image_to_rgb(fake_image(**fields))


@pytest.mark.parametrize("field", ["height", "width", "step"])
def test_size_fields_outside_uint32_are_refused(field):
    """sensor_msgs/Image's height, width and step are uint32: a duck-typed message with a size past
    2**32 - 1 or negative is refused by name, even past str()'s 4300-digit limit, whose own
    ValueError used to come out of the pixel-count message."""
    for value, words in ((2**32, "is past the uint32 range of sensor_msgs/Image, got 4294967296"),
                         (10**5000, "is past the uint32 range of sensor_msgs/Image, got an integer too long to print"),
                         (-1, "is negative, got -1"), (-(10**5000), "is negative, got an integer too long to print"),
                         ([10**5000], "must be an integer, got a list holding an integer too long to print")):
        fields = dict(height=1, width=1, step=3, data=bytes(3))
        fields[field] = value
        with pytest.raises(ConversionError, match=f"'{field}' {words}"):
            image_to_rgb(fake_image(**fields))
    with pytest.raises(ConversionError, match="is_bigendian must be 0 or 1, got an integer too long to print"):
        image_to_rgb(fake_image(height=1, width=1, step=3, data=bytes(3), is_bigendian=10**5000))


# --- compressed Bayer mosaics ------------------------------------------------------------------------


@pytest.mark.parametrize("colour", [(200, 0, 30), (128, 128, 200)])  # the second decodes with red == green exactly
def test_a_colour_jpeg_labelled_as_a_bayer_mosaic_is_refused(ts, colour):
    """image_transport compresses a Bayer mosaic as 8-bit grey: a colour JPEG under a bayer_* format is
    refused, not demosaicked from one of its channels, whichever two of its channels differ."""
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = colour
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    msg = ts.types["sensor_msgs/msg/CompressedImage"](header=make_header(ts), format="bayer_rggb8; jpeg compressed ",
                                                      data=jpg.reshape(-1))
    with pytest.raises(ConversionError, match="colour image, not a Bayer mosaic"):
        compressed_to_rgb(msg)


# --- make_image ------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding, arr", [
    ("mono8", np.array([[-1, 0], [1, 2]], np.int8)),
    ("mono16", np.array([[-1, 0], [1, 2]], np.int16)),
    ("rgb8", np.full((2, 2, 3), -1, np.int8)),
])
def test_make_image_refuses_signed_arrays(types, ts, encoding, arr):
    """A signed label array would wrap (-1 -> 255 / 65535) instead of being refused."""
    with pytest.raises(ConversionError, match="needs an array"):
        make_image(types.image, make_header(ts), arr, encoding)


# --- make_class_masks ------------------------------------------------------------------------------


def test_class_masks_are_ascending_whatever_the_mapping_order(types, ts):
    """ClassMasks.msg: class_ids ascending, names and masks in the same order."""
    masks = {3: np.full((2, 3), 255, np.uint8), 0: np.zeros((2, 3), np.uint8), 1: np.eye(2, 3, dtype=np.uint8) * 255}
    msg = make_class_masks(types.class_masks, types.image, make_header(ts), masks, ["a", "b", "c", "d"])
    assert list(msg.class_ids) == [0, 1, 3]
    assert msg.class_names == ["a", "b", "d"]
    for cid, m in zip([0, 1, 3], msg.masks):
        np.testing.assert_array_equal(np.asarray(m.data).reshape(2, 3), masks[cid])


def test_class_masks_name_classes_beyond_the_name_list(types, ts):
    """A class without a name gets 'class <id>', also the first id past the list."""
    masks = {1: np.zeros((2, 2), np.uint8), 2: np.zeros((2, 2), np.uint8), 7: np.zeros((2, 2), np.uint8)}
    msg = make_class_masks(types.class_masks, types.image, make_header(ts), masks, ["a", "b"])
    assert msg.class_names == ["b", "class 2", "class 7"]


@pytest.mark.parametrize("cid", [-1, 65536])
def test_class_masks_refuse_ids_outside_uint16(types, ts, cid):
    """class_ids is uint16: -1 and 65536 are refused as ConversionError."""
    with pytest.raises(ConversionError, match=r"0\.\.65535"):
        make_class_masks(types.class_masks, types.image, make_header(ts), {cid: np.zeros((2, 2), np.uint8)}, ["a"])


# --- make_segmentation_info ------------------------------------------------------------------------


def _result(**changes) -> SegmentationResult:
    """:func:`fake_result` with ``changes`` (its latencies without a ``total`` entry)."""
    latencies = {k: v for k, v in fake_result().stage_latency_ms.items() if k != "total"}
    return dataclasses.replace(fake_result(), **{"stage_latency_ms": latencies, **changes})


def test_segmentation_info_total_defaults_to_the_sum_of_the_stages(types, ts):
    """Without a 'total' entry total_latency_ms is the stages' sum."""
    msg = make_segmentation_info(types.segmentation_info, types.time, make_header(ts), _result())
    assert list(msg.stage_names) == ["schedule", "preprocess", "propagation", "postprocess"]
    assert msg.total_latency_ms == pytest.approx(7.5)


@pytest.mark.parametrize("stamp", [math.nan, math.inf])
def test_segmentation_info_with_an_unknown_key_frame_stamp_is_zero(types, ts, stamp):
    """A non-finite key_frame_stamp (unknown) gives a zero stamp, not an error."""
    msg = make_segmentation_info(types.segmentation_info, types.time, make_header(ts), _result(key_frame_stamp=stamp))
    assert (msg.key_frame_stamp.sec, msg.key_frame_stamp.nanosec) == (0, 0)


def test_segmentation_info_keeps_the_previous_key_frame_stamp_of_the_same_instant(types, ts):
    """A non-key frame carries the previous message's key_frame_stamp exactly when it is the key frame's
    instant (the float seconds lose the last nanoseconds), and not when it is another instant 0.5 ms away."""
    same = types.time(sec=1700000000, nanosec=250_000_123)
    msg = make_segmentation_info(types.segmentation_info, types.time, make_header(ts),
                                 _result(key_frame_stamp=stamp_to_seconds(same)), same)
    assert (msg.key_frame_stamp.sec, msg.key_frame_stamp.nanosec) == (1700000000, 250_000_123)
    other = types.time(sec=1700000000, nanosec=250_500_000)
    msg = make_segmentation_info(types.segmentation_info, types.time, make_header(ts),
                                 _result(key_frame_stamp=1700000000.25), other)
    assert (msg.key_frame_stamp.sec, msg.key_frame_stamp.nanosec) == (1700000000, 250_000_000)


def test_list_payload_with_only_negative_values_is_refused():
    """-1 in a list payload is no byte (it would wrap to 255), also when no value exceeds 255."""
    with pytest.raises(ConversionError, match=r"values outside 0\.\.255 \(-1\.\.5\)"):
        image_to_rgb(fake_image(data=[-1] * 6 + [5] * 6))
