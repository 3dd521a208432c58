"""ROS message <-> numpy conversions for mpvss_ros, without importing rclpy.

Everything here works on message objects by duck typing (field names as in rclpy), so the same
code serves the rclpy node and the offline ``mpvss bag`` tool, which uses the pure-Python
``rosbags`` message classes. Message **classes** are always passed in, never imported:

* rclpy: ``MessageTypes(image=sensor_msgs.msg.Image, ...)`` built by the node;
* rosbags: :func:`rosbags_message_types` (registers ``vision_msgs`` and this package's own
  messages in a ``rosbags`` typestore).

Input images (:func:`image_to_rgb`, :func:`compressed_to_rgb`) become ``(H, W, 3)`` ``uint8``
RGB; anything that cannot be converted raises :class:`ConversionError` with a message naming
what is wrong. Outputs (:func:`build_outputs`) follow the downstream contract of Nav2's
semantic segmentation layer (ros-navigation/semantic_segmentation_layer): ``mono8`` class IDs
at the input resolution (``mono16`` with more than 255 classes: 255 is VisionClass.UNLABELED;
the layer reads ``mono8`` only), ``mono8`` confidence, ``vision_msgs/LabelInfo``, and the input
image's ``header`` (stamp and frame_id) copied unchanged onto every output. Autoware's
``segmentation_pointcloud_fusion`` cannot read them as they are: it run-length decodes its mask
input (``perception_utils::runLengthDecoder``, the payload of ``autoware_tensorrt_yolox``'s
``~/out/mask``) and reads its pixels as IDs of its own 16 classes; :func:`make_autoware_mask`
builds that message (the optional ``autoware_mask`` output).

Array fields are filled the way each library serialises fastest: numpy arrays for ``rosbags``
classes (dataclasses), ``array.array`` for rclpy classes (whose setters take ``array.array``
without a per-element check).
"""

from __future__ import annotations

import array as _array
import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..io import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_limit, pixel_excess
from ..io.jpeg import STRICT_JPEG, JpegError, decode_jpeg, is_jpeg
from ..io.video import PNG_SIGNATURE, decoded_to_rgb, png_damage, png_size
from ..viz import colorize, frame_tag, overlay

from ..segmenter import class_masks_from_labels  # noqa: F401  (re-exported: the one implementation)
from ..values import is_finite, is_integer, is_real, shown

__all__ = [
    "ConversionError",
    "SUPPORTED_ENCODINGS",
    "OUTPUT_ENCODINGS",
    "MSG_DEFINITIONS",
    "image_to_rgb",
    "compressed_to_rgb",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "STRICT_JPEG",
    "make_image",
    "make_label_info",
    "make_class_masks",
    "make_segmentation_info",
    "AUTOWARE_CLASSES",
    "autoware_class_ids",
    "check_autoware_class_ids",
    "autoware_rle",
    "make_autoware_mask",
    "stamp_to_seconds",
    "seconds_to_stamp",
    "class_masks_from_labels",
    "MessageTypes",
    "OutputMessages",
    "build_outputs",
    "rosbags_message_types",
]


class ConversionError(ValueError):
    """A message cannot be converted (unsupported encoding, inconsistent sizes, corrupt data)."""


#: Bytes per pixel of each supported input encoding (sensor_msgs/image_encodings names).
#: ``yuv422`` is ROS's UYVY (U0 Y0 V0 Y1); ``yuv422_yuy2`` and ``yuyv`` are YUYV (Y0 U0 Y1 V0);
#: ``uyvy`` is the newer (Jazzy) name of UYVY.
_BYTES_PER_PIXEL: dict[str, int] = {
    "rgb8": 3,
    "bgr8": 3,
    "rgba8": 4,
    "bgra8": 4,
    "mono8": 1,
    "yuv422": 2,
    "uyvy": 2,
    "yuv422_yuy2": 2,
    "yuyv": 2,
    "bayer_rggb8": 1,
    "bayer_bggr8": 1,
    "bayer_gbrg8": 1,
    "bayer_grbg8": 1,
}

#: Input encodings :func:`image_to_rgb` accepts.
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_BYTES_PER_PIXEL)

#: Encodings :func:`make_image` writes.
OUTPUT_ENCODINGS: tuple[str, ...] = ("mono8", "mono16", "rgb8")

#: Largest value of a uint32 field (sensor_msgs/Image height, width, step).
_UINT32_MAX = 2**32 - 1

_YUV_CODES = {
    "yuv422": cv2.COLOR_YUV2RGB_UYVY,
    "uyvy": cv2.COLOR_YUV2RGB_UYVY,
    "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUYV,
    "yuyv": cv2.COLOR_YUV2RGB_YUYV,
}
#: Raw Bayer mosaics (``bayer_<2 x 2 pattern from the top-left pixel>8``, as industrial camera
#: drivers publish ``image_raw``), demosaicked by OpenCV. OpenCV names a pattern by the second
#: row's second and third pixels, so ROS's RGGB is OpenCV's BG (as cv_bridge maps them; checked
#: on mosaics of a known colour in test_conversions).
_BAYER_CODES = {
    "bayer_rggb8": cv2.COLOR_BayerBG2RGB,
    "bayer_bggr8": cv2.COLOR_BayerRG2RGB,
    "bayer_gbrg8": cv2.COLOR_BayerGR2RGB,
    "bayer_grbg8": cv2.COLOR_BayerGB2RGB,
}
_COLOUR_CODES = {"bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB,
                 "mono8": cv2.COLOR_GRAY2RGB}

#: .msg definitions registered by :func:`rosbags_message_types`: ``vision_msgs`` (as in
#: vision_msgs 4.x, ROS 2 Humble and later) and this package's own messages, whose text is
#: identical to ``msg/*.msg`` (a test checks it).
MSG_DEFINITIONS: dict[str, str] = {
    "vision_msgs/msg/VisionClass": """\
# A key value pair that maps an integer class_id to a string class label
# in computer vision systems.

# The integer class id.
uint16 class_id

# The name of the class represented by the class_id
string class_name
""",
    "vision_msgs/msg/LabelInfo": """\
# Provides meta-information about a visual pipeline, used to map class IDs to class names.

# Header: stamp of the last change to the information, frame_id unused.
std_msgs/Header header

# An array of uint16 keys mapped to class names.
VisionClass[] class_map

# The value between 0-1 used as confidence threshold for the inference.
float32 threshold
""",
    "mpvss_ros/msg/ClassMasks": """\
# One binary mask per class present in a segmented frame (mpvss_ros).
#
# Published on the node's ~/class_masks (/<namespace>/mpvss_segmenter/class_masks; NS/class_masks
# in a bag written by mpvss bag) when someone subscribes. The label image
# (~/labels, mono8 or mono16 class IDs) carries the same information in one image;
# this message is for consumers that want one mask per class (e.g. a costmap layer per class).

# Exactly the header of the input image this frame was segmented from (stamp and frame_id),
# also on frames whose labels were warped from an earlier key frame.
std_msgs/Header header

# Class IDs present in the frame, ascending; the same IDs as in vision_msgs/LabelInfo
# (~/label_info) and in the label image.
uint16[] class_ids

# Class names, one per entry of class_ids (same order).
string[] class_names

# One mono8 mask per entry of class_ids (same order), at the input image's resolution:
# 255 where the pixel belongs to the class, 0 elsewhere. Each mask has the header above.
sensor_msgs/Image[] masks
""",
    "mpvss_ros/msg/SegmentationInfo": """\
# Per-frame metadata of the MPVSS video segmentation (mpvss_ros): key frames, scene score and
# latency. Published on the node's ~/info (/<namespace>/mpvss_segmenter/info; NS/info in a bag
# written by mpvss bag) for every segmented frame.

# Exactly the header of the input image this frame was segmented from (stamp and frame_id).
std_msgs/Header header

# 0-based index of the frame among those given to the segmenter since the node was configured (a
# reset does not restart it; a lifecycle cleanup and configure does, with a new engine). A frame
# whose segmentation failed keeps its index, so the published indices skip it; frames dropped
# before segmentation (stale, undecodable) take none.
uint32 frame_index

# True when the key-frame segmentor ran on this frame; false when the labels were propagated
# (warped) from the key frame.
bool is_key_frame

# Header stamp of the key frame these labels come from (equals header.stamp on key frames).
builtin_interfaces/Time key_frame_stamp

# Why this frame is a key frame ("" on non-key frames), e.g. first, interval, scene_cut,
# scene_change, max_interval, resolution_change, time_backwards, time_gap, frame_id_change
# (the input header's frame_id changed: another camera), non_finite (the previous frame's
# logits were NaN or infinite), canvas_change (the scheduler asked for no key frame, but the
# frame's letterbox differs from the key frame's), reset (the ~/reset service, re-enabling, a
# schedule or propagation parameter changed while running, the inference backend or the
# propagation failed on the previous frame, or no key frame is held though the scheduler asked
# for none).
string key_frame_reason

# The scheduler's scene-change score of this frame against the key frame (0 = same scene).
float32 scene_score

# Wall time of each pipeline stage in milliseconds, in execution order: stage_names[i] took
# stage_latency_ms[i] (e.g. schedule, preprocess, segmentor or propagation, postprocess).
string[] stage_names
float32[] stage_latency_ms

# Wall time of the engine for this frame, milliseconds: the stages above, from the decoded image
# to the finished segmentation (waiting for the worker, decoding, message building and publishing
# not included; /diagnostics' latency median counts from receiving the message).
float32 total_latency_ms
""",
}


# --------------------------------------------------------------------------------------------
# Input: sensor_msgs/Image and sensor_msgs/CompressedImage -> RGB
# --------------------------------------------------------------------------------------------


def _as_bytes(data: Any, what: str = "data") -> np.ndarray:
    """A message's ``uint8[]`` payload as a 1-D uint8 array, without copying where possible.

    ``rosbags`` gives numpy arrays; rclpy gives ``array.array('B')``; ``bytes``, ``bytearray``
    and ``memoryview`` work as well (any contiguous buffer of 1-byte items), lists of integers
    are copied.

    Raises:
        ConversionError: a numpy array of another dtype, a buffer of wider items (its raw bytes
            are no pixels), a list holding anything but integers 0..255, or no buffer at all.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ConversionError(f"{what} must hold uint8 bytes, got dtype {data.dtype}")
        return data.reshape(-1)
    if isinstance(data, (list, tuple)):
        if not all(is_integer(v) for v in data):
            raise ConversionError(f"{what} is not a byte sequence: it holds other values than integers")
        try:
            values = np.asarray(data, dtype=np.int64)  # not uint8 directly: that wraps numpy integers (300 -> 44)
        except (OverflowError, ValueError, TypeError) as exc:
            raise ConversionError(f"{what} is not a byte sequence: {exc}") from None
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ConversionError(f"{what} is not a byte sequence: it holds values outside 0..255 "
                                  f"({int(values.min())}..{int(values.max())})")
        return values.astype(np.uint8).reshape(-1)
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise ConversionError(f"{what} of type {type(data).__name__} is not a byte buffer: {exc}") from None
    if view.itemsize != 1:  # array('H') and the like: its raw bytes are no pixels
        raise ConversionError(f"{what} must hold bytes, got a buffer of {view.itemsize}-byte items ({view.format!r})")
    try:
        return np.frombuffer(view, dtype=np.uint8).reshape(-1)
    except (TypeError, ValueError, BufferError) as exc:  # e.g. a non-contiguous view
        raise ConversionError(f"{what} of type {type(data).__name__} is not a byte buffer: {exc}") from None


def _int_field(msg: Any, name: str) -> int:
    """A uint32 field of sensor_msgs/Image (height, width, step) as a Python int.

    Raises:
        ConversionError: not an integer, negative, or past 2**32 - 1.
    """
    value = getattr(msg, name, None)
    if not is_integer(value):
        raise ConversionError(f"image field {name!r} must be an integer, got {shown(value)}")
    value = int(value)
    if value < 0:
        raise ConversionError(f"image field {name!r} is negative, got {shown(value)} (a uint32 in sensor_msgs/Image)")
    if value > _UINT32_MAX:
        raise ConversionError(f"image field {name!r} is past the uint32 range of sensor_msgs/Image, got {shown(value)}")
    return value


def _check_pixels(height: int, width: int, max_pixels: int | None, what: str) -> None:
    try:
        max_pixels = check_pixel_limit(max_pixels, "max_pixels")
    except ValueError as exc:  # the caller's limit, not the message: still a ConversionError
        raise ConversionError(str(exc)) from None
    excess = pixel_excess(height, width, max_pixels)
    if excess is not None:
        raise ConversionError(f"{what} is {excess} (the node's max_image_pixels, mpvss bag's --max-image-pixels)")


def image_to_rgb(msg: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """A ``sensor_msgs/Image`` as an ``(H, W, 3)`` ``uint8`` RGB array.

    Supports :data:`SUPPORTED_ENCODINGS`. Honours ``step`` (row stride in bytes; bytes past
    ``width x bytes-per-pixel`` in each row are padding and ignored). ``is_bigendian`` has no
    effect on these 8-bit encodings but must be 0/1 (or a bool).

    For ``rgb8`` with ``step == width * 3`` the result is a view of ``msg.data`` (no copy; it
    may be read-only); other encodings, or rows with padding, give a new array.

    Args:
        msg: the message.
        max_pixels: largest ``height x width`` accepted (None: no limit).

    Raises:
        ConversionError: unsupported encoding (the message lists the supported ones), zero or
            negative size, more than ``max_pixels`` pixels, ``step`` smaller than a row, ``data``
            not exactly ``step x height`` bytes (as cv_bridge), an odd width for YUV 4:2:2, or a
            bad ``is_bigendian``.
    """
    raw_encoding = getattr(msg, "encoding", None)
    if not isinstance(raw_encoding, str):
        raise ConversionError(f"image encoding must be a string, got {raw_encoding!r}")
    encoding = raw_encoding.strip().lower()
    bpp = _BYTES_PER_PIXEL.get(encoding)
    if bpp is None:
        raise ConversionError(
            f"unsupported image encoding {raw_encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)} "
            "(depth and floating-point images such as 16UC1 or 32FC1 cannot be segmented)")
    height, width, step = _int_field(msg, "height"), _int_field(msg, "width"), _int_field(msg, "step")
    if height <= 0 or width <= 0:
        raise ConversionError(f"image is empty or has a negative size: {width} x {height} pixels ({encoding})")
    _check_pixels(height, width, max_pixels, f"image ({encoding})")
    big = getattr(msg, "is_bigendian", 0)
    if not isinstance(big, (bool, int, np.integer, np.bool_)) or int(big) not in (0, 1):
        raise ConversionError(f"is_bigendian must be 0 or 1, got {shown(big)}")
    row_bytes = width * bpp
    if step < row_bytes:
        raise ConversionError(f"step {step} is smaller than one row of {width} {encoding} pixels "
                              f"({width} x {bpp} = {row_bytes} bytes)")
    if encoding in _YUV_CODES and width % 2:
        raise ConversionError(f"YUV 4:2:2 image ({encoding}) must have an even width, got {width}")
    buf = _as_bytes(getattr(msg, "data", None), "image data")
    need = step * height
    if buf.size != need:  # as cv_bridge: a wrong height or step would crop or shear the image
        raise ConversionError(f"image data too {'short' if buf.size < need else 'long'}: {buf.size} bytes for "
                              f"step {step} x height {height} "
                              f"= {need} bytes ({width} x {height} {encoding})")
    rows = buf.reshape(height, step)
    if step != row_bytes:
        rows = rows[:, :row_bytes]  # drop the padding bytes at the end of each row (a view)
    if encoding == "mono8":
        return cv2.cvtColor(np.ascontiguousarray(rows), cv2.COLOR_GRAY2RGB)
    if encoding in _BAYER_CODES:
        return _demosaic(np.ascontiguousarray(rows), encoding)
    pixels = rows.reshape(height, width, bpp)
    if encoding == "rgb8":
        return pixels if step == row_bytes else np.ascontiguousarray(pixels)
    pixels = np.ascontiguousarray(pixels)  # no-op without row padding
    if encoding in _YUV_CODES:
        return cv2.cvtColor(pixels, _YUV_CODES[encoding])
    return cv2.cvtColor(pixels, _COLOUR_CODES[encoding])


_COMPRESSED_KINDS = ("jpeg", "jpg", "png")
# STRICT_JPEG, imported above and exported here (:data:`mpvss_ros.io.jpeg.STRICT_JPEG`): whether JPEGs
# are decoded strictly (``simplejpeg`` installed); a JPEG whose scan data lost bytes (an MJPEG
# camera dropping USB packets) is refused, not segmented with grey or smeared blocks.


def compressed_to_rgb(msg: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage`` (JPEG or PNG) as an ``(H, W, 3)`` ``uint8`` RGB array.

    ``format`` must name jpeg/jpg/png, alone or in image_transport's long form (e.g.
    ``"rgb8; jpeg compressed bgr8"``); an empty format lets the data's signature decide. The
    data must be a JPEG or a PNG by its signature whatever ``format`` says. Greyscale images come
    back as three equal channels, an alpha channel is dropped. The camera's encoding before ``;``
    counts where image_transport leaves the pixels as they were: a Bayer mosaic
    (``"bayer_rggb8; png compressed "``, an 8-bit grey PNG) is demosaicked as :func:`image_to_rgb`
    does, and depth, floating-point and generic encodings (``"16UC1; png compressed "``, a
    depth map; ``32FC1``, ``8UC3``) are refused, as :func:`image_to_rgb` refuses them; 16-bit
    grey and colour ones (``mono16``, ``bgr16``) are scaled to 8 bits as an image folder's. The frame size is read from the
    file's header and checked against ``max_pixels`` before anything is decoded (a JPEG on the
    OpenCV fallback whose header Pillow cannot read either: after decoding).

    JPEGs are decoded by :func:`mpvss_ros.io.jpeg.decode_jpeg`: libjpeg-turbo through
    ``simplejpeg`` with ``strict=True`` when it is installed (:data:`STRICT_JPEG`): libjpeg's
    warnings, e.g. "Corrupt JPEG data: premature end of data segment", become errors, so a JPEG
    that lost part of its scan data is refused. JPEG has no checksum: a byte changed in transit
    without breaking the entropy code still decodes. Without ``simplejpeg`` OpenCV decodes, and
    only a JPEG without its end-of-image marker (a truncated one) is caught.

    An EXIF orientation tag (JPEG) or ``eXIf`` chunk (PNG) is ignored, by every decoder: the
    image comes back as stored, as ``compressed_image_transport`` (``mode`` ``unchanged``, its
    default) and its TurboJPEG path decode it for every other subscriber, so that the labels
    line up pixel for pixel with the image they see and with its ``CameraInfo``.

    Args:
        msg: the message.
        max_pixels: largest ``height x width`` accepted (None: no limit).

    Raises:
        ConversionError: another format (e.g. ``compressedDepth``), an original encoding that
            cannot be segmented, an empty payload, data that is not a JPEG or a PNG, a Bayer
            mosaic that is not 8-bit grey or is under 3 x 3, more than ``max_pixels`` pixels, a
            truncated or corrupt JPEG, a PNG cut short or with a chunk failing its CRC (:func:`~mpvss_ros.io.video.png_damage`),
            or data the decoder cannot read.
    """
    fmt = getattr(msg, "format", "")
    if not isinstance(fmt, str):
        raise ConversionError(f"compressed image format must be a string, got {fmt!r}")
    low = fmt.lower()
    if "compresseddepth" in low or (low.strip() and not any(k in low for k in _COMPRESSED_KINDS)):
        raise ConversionError(f"unsupported compressed image format {fmt!r}; supported: jpeg and png "
                              "(e.g. 'jpeg', 'png', 'rgb8; jpeg compressed bgr8')")
    original = _original_encoding(fmt)
    buf = _as_bytes(getattr(msg, "data", None), "compressed image data")
    if buf.size == 0:
        raise ConversionError(f"compressed image ({fmt or 'no format'}) has no data")
    what = f"the {fmt or 'compressed'} image ({buf.size} bytes)"
    if original in _BAYER_CODES:
        return _demosaic(_decode_grey(buf, what, max_pixels), original)
    if is_jpeg(buf):
        return _decode_jpeg(buf, what, max_pixels)
    _check_png(buf, what, max_pixels)
    return _decode_png(buf, what)


def _decode_jpeg(buf: np.ndarray, what: str, max_pixels: int | None) -> np.ndarray:
    """:func:`~mpvss_ros.io.jpeg.decode_jpeg` (strict), the size checked against ``max_pixels``
    from the header; its errors as :class:`ConversionError` naming ``what``."""
    try:
        return decode_jpeg(buf, check_size=lambda h, w: _check_pixels(h, w, max_pixels, what))
    except JpegError as exc:
        raise ConversionError(f"corrupt JPEG: {what}: {exc}") from None


def _check_png(buf: np.ndarray, what: str, max_pixels: int | None) -> None:
    """Refuse compressed data that is not a whole PNG within ``max_pixels``, before decoding.

    Raises:
        ConversionError: not a PNG by its signature, no image header, more than ``max_pixels``
            pixels, or cut short / a chunk failing its CRC (:func:`~mpvss_ros.io.video.png_damage`).
    """
    head = buf[:32].tobytes()
    if not head.startswith(PNG_SIGNATURE):
        raise ConversionError(f"{what} is neither a JPEG nor a PNG (its first bytes are {head[:8].hex(' ')})")
    size = png_size(head)
    if size is None:
        raise ConversionError(f"corrupt PNG: {what} has no image header")
    _check_pixels(*size, max_pixels, what)
    damage = png_damage(buf)
    if damage is not None:
        raise ConversionError(f"corrupt PNG: {what}: {damage}")


#: The original encodings (before ``;`` in ``format``) whose compressed images are segmented:
#: image_transport writes colour images as ``bgr8``/``bgr16`` JPEGs or PNGs, and every other
#: encoding as it is, in a PNG (Bayer mosaics as 8-bit grey; depth and float images too, which
#: are refused here as by :func:`image_to_rgb`).
_COMPRESSED_ORIGINALS = frozenset(SUPPORTED_ENCODINGS) | {"mono16", "rgb16", "bgr16", "rgba16", "bgra16"}


def _original_encoding(fmt: str) -> str:
    """The camera's encoding named before ``;`` in image_transport's ``format`` (e.g. ``"bayer_rggb8;
    png compressed "`` -> ``"bayer_rggb8"``), lower case; ``""`` for a format without one (``"jpeg"``).

    Raises:
        ConversionError: an encoding that cannot be segmented (depth, float, multi-channel
            generic types such as ``16UC1``, ``32FC1``, ``8UC3``), as :func:`image_to_rgb` refuses it.
    """
    if ";" not in fmt:
        return ""
    named = fmt.split(";", 1)[0].strip()
    original = named.lower()
    if original in ("", *_COMPRESSED_KINDS):  # "jpeg; ..." names no camera encoding
        return ""
    if original not in _COMPRESSED_ORIGINALS:
        raise ConversionError(
            f"compressed image format {fmt!r}: its original encoding {named!r} cannot be segmented; "
            f"supported: {', '.join(sorted(_COMPRESSED_ORIGINALS))} "
            "(depth and floating-point images such as 16UC1 or 32FC1 cannot be segmented)")
    return original


def _decode_grey(buf: np.ndarray, what: str, max_pixels: int | None) -> np.ndarray:
    """A compressed single-channel 8-bit image (a Bayer mosaic as image_transport compresses it)
    -> (H, W) uint8, the size checked against ``max_pixels`` from the header.

    Raises:
        ConversionError: not a PNG or JPEG, above ``max_pixels``, damaged, or not 8-bit grey.
    """
    if is_jpeg(buf):  # a grey JPEG gives three equal channels
        rgb = _decode_jpeg(buf, what, max_pixels)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise ConversionError(f"{what} holds a colour image, not a Bayer mosaic")
        return np.ascontiguousarray(rgb[..., 0])
    _check_png(buf, what, max_pixels)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None or img.ndim != 2 or img.dtype != np.uint8:
        kind = "undecodable" if img is None else f"{img.dtype} with {1 if img.ndim == 2 else img.shape[2]} channels"
        raise ConversionError(f"{what} is {kind}, not an 8-bit grey Bayer mosaic")
    return img


def _demosaic(mosaic: np.ndarray, encoding: str) -> np.ndarray:
    """A (H, W) uint8 Bayer mosaic in ``encoding`` -> (H, W, 3) uint8 RGB, as :func:`image_to_rgb`.

    Raises:
        ConversionError: smaller than 3 x 3 pixels (OpenCV's demosaicking returns zeros there).
    """
    height, width = mosaic.shape
    if min(width, height) < 3:
        raise ConversionError(f"Bayer image ({encoding}) must be at least 3 x 3 pixels, got {width} x {height}")
    return cv2.cvtColor(mosaic, _BAYER_CODES[encoding])


def _decode_png(buf: np.ndarray, what: str) -> np.ndarray:
    """A PNG decoded by OpenCV as stored (an ``eXIf`` orientation ignored), to RGB as an image
    folder's PNG (:func:`~mpvss_ros.io.video.decoded_to_rgb`: 16-bit rounded, not truncated)."""
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:
        raise ConversionError(f"could not decode {what}: {exc}") from None
    if img is None or img.size == 0:
        raise ConversionError(f"could not decode {what}: corrupt data")
    try:
        return decoded_to_rgb(img)
    except ValueError as exc:
        raise ConversionError(f"could not decode {what}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


def stamp_to_seconds(stamp: Any) -> float:
    """A header stamp (``builtin_interfaces/Time``: ``sec``, ``nanosec``) -> seconds as a float
    (float64: rounds by up to about 0.1 us at today's epoch)."""
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def seconds_to_stamp(time_cls: type, t: float) -> Any:
    """Seconds -> ``time_cls(sec=..., nanosec=...)`` with ``0 <= nanosec < 1e9`` and ``sec`` in
    ``builtin_interfaces/Time``'s int32 range. A ``t`` that float64 rounded up to 2**31 from a stamp
    just below it (the last ~0.1 us of int32 seconds) gives the largest stamp, 2**31 - 1 s
    999999999 ns.

    Raises:
        ConversionError: ``t`` is not a finite number (a bool neither), or outside the int32
            seconds of a stamp.
    """
    if not (is_real(t) and is_finite(t)):  # is_finite: 10**400 fits no float
        raise ConversionError(f"cannot convert {shown(t)} to a stamp: not a finite number of seconds")
    t = float(t)
    if not -2.0**31 <= t <= 2.0**31:
        raise ConversionError(f"cannot convert {t} s to a stamp: its seconds are an int32 (builtin_interfaces/Time)")
    if t == 2.0**31:
        return time_cls(sec=2**31 - 1, nanosec=999_999_999)
    sec = math.floor(t)
    nanosec = round((t - sec) * 1e9)  # t - sec is exact in floating point
    if nanosec >= 1_000_000_000:
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    return time_cls(sec=int(sec), nanosec=int(nanosec))


# --------------------------------------------------------------------------------------------
# Output builders
# --------------------------------------------------------------------------------------------


def _uses_numpy(cls: type) -> bool:
    """True for ``rosbags`` message classes (dataclasses; numpy arrays for primitive arrays)."""
    return dataclasses.is_dataclass(cls)


def _byte_array(cls: type, arr: np.ndarray) -> Any:
    """A C-contiguous array's bytes as the ``uint8[]`` value ``cls`` takes best."""
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if _uses_numpy(cls):
        return flat
    out = _array.array("B")
    out.frombytes(flat)
    return out


def _typed_array(cls: type, values: Sequence[Any], dtype: Any, typecode: str) -> Any:
    if _uses_numpy(cls):
        return np.asarray(values, dtype=dtype)
    return _array.array(typecode, values)


def make_image(image_cls: type, header: Any, array: np.ndarray, encoding: str) -> Any:
    """A ``sensor_msgs/Image`` from an array, with ``header`` copied unchanged.

    Args:
        image_cls: the Image message class (rclpy or rosbags).
        header: the ``std_msgs/Header`` to put on the message (the input image's).
        array: ``(H, W)`` ``uint8`` for ``mono8``, ``(H, W)`` ``uint16`` for ``mono16``
            (native byte order; ``is_bigendian`` says which), ``(H, W, 3)`` ``uint8`` for
            ``rgb8``.
        encoding: one of :data:`OUTPUT_ENCODINGS`.

    Raises:
        ConversionError: unknown encoding, or an array whose shape/dtype does not fit it.
    """
    arr = np.asarray(array)
    expect = {"mono8": (2, np.uint8), "mono16": (2, np.uint16), "rgb8": (3, np.uint8)}.get(encoding)
    if expect is None:
        raise ConversionError(f"cannot build an image with encoding {encoding!r}; supported: {', '.join(OUTPUT_ENCODINGS)}")
    ndim, dtype = expect
    if arr.ndim != ndim or (ndim == 3 and arr.shape[2] != 3) or arr.dtype.kind != "u" or arr.dtype.itemsize != np.dtype(dtype).itemsize:
        raise ConversionError(f"{encoding} needs an array of shape {'(H, W, 3)' if ndim == 3 else '(H, W)'} "
                              f"and dtype {np.dtype(dtype).name}, got shape {arr.shape} dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr.astype(dtype, copy=False))  # native byte order
    height, width = arr.shape[:2]
    step = width * arr.itemsize * (arr.shape[2] if ndim == 3 else 1)
    big = int(arr.itemsize > 1 and sys.byteorder == "big")
    return image_cls(header=header, height=int(height), width=int(width), encoding=encoding,
                     is_bigendian=big, step=int(step), data=_byte_array(image_cls, arr))


def make_label_info(label_info_cls: type, vision_class_cls: type, header: Any,
                    class_names: Sequence[str], threshold: float = 0.0) -> Any:
    """``vision_msgs/LabelInfo``: class ``i`` (``0 .. K-1``) is ``class_names[i]``.

    Args:
        label_info_cls, vision_class_cls: the ``LabelInfo`` and ``VisionClass`` message classes.
        header: the ``std_msgs/Header`` of the message.
        class_names: K names.
        threshold: LabelInfo's ``threshold`` field, a confidence in [0, 1] (0.0: every pixel is
            labelled; the labels are an argmax without a threshold).

    Raises:
        ConversionError: more than 65535 classes (``class_id`` is uint16, and ``VisionClass``
            reserves 65535 for UNLABELED).
    """
    names = [str(n) for n in class_names]
    if len(names) > 65535:
        raise ConversionError(f"LabelInfo holds at most 65535 classes (uint16 ids; 65535 is vision_msgs' "
                              f"UNLABELED), got {len(names)}")
    class_map = [vision_class_cls(class_id=i, class_name=n) for i, n in enumerate(names)]
    return label_info_cls(header=header, class_map=class_map, threshold=float(threshold))


def _class_name(class_names: Sequence[str], class_id: int) -> str:
    return str(class_names[class_id]) if 0 <= class_id < len(class_names) else f"class {class_id}"


#: Autoware's semantic classes in the order of their IDs (0 .. 15): the class list of
#: ``segmentation_pointcloud_fusion`` (its ``filter_semantic_label_target_list_``), which is that
#: of ``autoware_tensorrt_yolox``'s 16-class semantic head (autowarefoundation/autoware_universe,
#: read 2026-12-06).
AUTOWARE_CLASSES = ("UNKNOWN", "BUILDING", "WALL", "OBSTACLE", "TRAFFIC_LIGHT", "TRAFFIC_SIGN", "PERSON", "VEHICLE",
                    "BIKE", "ROAD", "SIDEWALK", "ROAD_PAINT", "CURBSTONE", "CROSSWALK", "VEGETATION", "SKY")

#: The Autoware class of a model class name (lower case; CamVid's names as ``mpvss_lite`` has
#: them, Cityscapes' and a few common synonyms); names not in it map to UNKNOWN.
_AUTOWARE_CLASS_OF_NAME = {
    "sky": "SKY", "building": "BUILDING", "wall": "WALL", "fence": "WALL", "pole": "OBSTACLE",
    "obstacle": "OBSTACLE", "traffic light": "TRAFFIC_LIGHT", "trafficlight": "TRAFFIC_LIGHT",
    "signsymbol": "TRAFFIC_SIGN", "traffic sign": "TRAFFIC_SIGN", "trafficsign": "TRAFFIC_SIGN",
    "pedestrian": "PERSON", "person": "PERSON", "rider": "PERSON", "car": "VEHICLE", "vehicle": "VEHICLE",
    "truck": "VEHICLE", "bus": "VEHICLE", "train": "VEHICLE", "bicyclist": "BIKE", "bicycle": "BIKE", "motorcycle": "BIKE", "bike": "BIKE",
    "road": "ROAD", "pavement": "SIDEWALK", "sidewalk": "SIDEWALK", "road marking": "ROAD_PAINT",
    "curb": "CURBSTONE", "curbstone": "CURBSTONE", "crosswalk": "CROSSWALK", "tree": "VEGETATION",
    "vegetation": "VEGETATION", "terrain": "VEGETATION",
}


def check_autoware_class_ids(ids: Sequence[int], name: str = "Autoware class IDs") -> list[int]:
    """``ids`` as ints, each an Autoware class ID in 0..255 (mono8; Autoware's own classes are
    :data:`AUTOWARE_CLASSES`, 0..15).

    Args:
        ids: the IDs.
        name: the option as its users know it, named in the error.

    Raises:
        ValueError: an ID that is not an integer (a bool neither) in 0..255.
    """
    values = list(ids)
    if any(not (is_integer(v) and 0 <= v <= 255) for v in values):
        raise ValueError(f"{name} must be in 0..255, got {shown(values)}")  # 2.7 is not an ID either
    values = [int(v) for v in values]
    return values


def autoware_class_ids(class_names: Sequence[str], ids: Sequence[int] = ()) -> np.ndarray:
    """The Autoware class ID of each model class, as a lookup table.

    Args:
        class_names: the model's K class names.
        ids: one ID per class (each 0..255; Autoware's classes are :data:`AUTOWARE_CLASSES`, and
            its fusion node leaves points on IDs of 16 and above unfiltered); empty = by name
            (CamVid's Sky -> SKY, Building -> BUILDING, Pole -> OBSTACLE, Road -> ROAD, Pavement
            -> SIDEWALK, Tree -> VEGETATION, SignSymbol -> TRAFFIC_SIGN, Fence -> WALL, Car ->
            VEHICLE, Pedestrian -> PERSON, Bicyclist -> BIKE; other names -> UNKNOWN, 0).

    Returns:
        (K,) uint8: entry k is the Autoware class ID of model class k.

    Raises:
        ValueError: ``ids`` of another length than ``class_names``, or an ID outside 0..255.
    """
    if len(ids) == 0:
        return np.array([AUTOWARE_CLASSES.index(_AUTOWARE_CLASS_OF_NAME.get(str(n).strip().lower(), "UNKNOWN"))
                         for n in class_names], dtype=np.uint8)
    if len(ids) != len(class_names):
        raise ValueError(f"{len(ids)} Autoware class IDs for a model with {len(class_names)} classes (one per class)")
    return np.array(check_autoware_class_ids(ids), dtype=np.uint8)


#: One run of :func:`autoware_rle`: the value, then the run length as a little-endian int32.
_AUTOWARE_RUN = np.dtype([("value", "u1"), ("length", "<i4")])


def autoware_rle(mask: np.ndarray) -> np.ndarray:
    """Run-length encode a ``(H, W)`` uint8 mask as Autoware's ``perception_utils::runLengthEncoder``
    and ``autoware_tensorrt_yolox`` do (the payload ``segmentation_pointcloud_fusion`` decodes).

    Pixels are read row by row; each run of equal values is 5 bytes: the ``uint8`` value, then the
    run length as a 4-byte ``int`` in little-endian order (Autoware copies the native ``int``;
    x86-64 and ARM64 are little-endian).

    Args:
        mask: (H, W) uint8, H, W >= 1.

    Returns:
        (5 * runs,) uint8.

    Raises:
        ConversionError: not a non-empty 2-D uint8 array.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.dtype != np.uint8 or arr.size == 0:
        raise ConversionError(f"an Autoware mask needs a non-empty (H, W) uint8 array, got shape {arr.shape} "
                              f"dtype {arr.dtype}")
    flat = arr.ravel()
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    runs = np.empty(starts.size, dtype=_AUTOWARE_RUN)
    runs["value"] = flat[starts]
    runs["length"] = np.diff(np.append(starts, flat.size))
    return runs.view(np.uint8)


def make_autoware_mask(image_cls: type, header: Any, labels: np.ndarray, class_ids: np.ndarray) -> Any:
    """The ``sensor_msgs/Image`` that Autoware's ``segmentation_pointcloud_fusion`` reads as a
    semantic mask, as ``autoware_tensorrt_yolox`` publishes its ``~/out/mask``: ``mono8`` with
    the mask's height, width and ``step`` (= width), ``header`` copied unchanged, and the data
    run-length encoded (:func:`autoware_rle`) rather than raw pixels, so generic image tools
    cannot show it.

    Args:
        image_cls: the Image message class (rclpy or rosbags).
        header: the input image's ``std_msgs/Header``.
        labels: (H, W) uint8 or uint16 model class IDs.
        class_ids: (K,) uint8 Autoware class ID of each model class (:func:`autoware_class_ids`).

    Raises:
        ConversionError: a label outside 0..K-1, or labels that are not (H, W) integers.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind != "u" or labels.size == 0:
        raise ConversionError(f"labels must be a non-empty (H, W) unsigned array, got shape {labels.shape} "
                              f"dtype {labels.dtype}")
    if int(labels.max()) >= len(class_ids):
        raise ConversionError(f"label {int(labels.max())} has no Autoware class ID ({len(class_ids)} given)")
    mask = np.asarray(class_ids, dtype=np.uint8)[labels]
    height, width = mask.shape
    return image_cls(header=header, height=int(height), width=int(width), encoding="mono8", is_bigendian=0,
                     step=int(width), data=_byte_array(image_cls, autoware_rle(mask)))


def make_class_masks(class_masks_cls: type, image_cls: type, header: Any,
                     class_masks: Mapping[int, np.ndarray], class_names: Sequence[str]) -> Any:
    """``mpvss_ros/ClassMasks``: one ``mono8`` mask (0/255) per class, ascending class id.

    Every mask image carries ``header``. Classes without a name get ``"class <id>"``.

    Args:
        class_masks_cls, image_cls: the ``ClassMasks`` and ``sensor_msgs/Image`` message classes.
        header: the input image's ``std_msgs/Header``.
        class_masks: ``{class_id: (H, W) uint8 mask, 0 or 255}``
            (:func:`~mpvss_ros.segmenter.class_masks_from_labels`).
        class_names: K names.

    Raises:
        ConversionError: a class id outside 0..65535 (``class_ids`` is uint16), or a mask that is
            not (H, W) uint8 (:func:`make_image`).
    """
    ids = sorted(int(c) for c in class_masks)
    if ids and not 0 <= ids[0] <= ids[-1] <= 65535:
        raise ConversionError(f"class ids must be in 0..65535 (uint16), got {ids[0]}..{ids[-1]}")
    masks = [make_image(image_cls, header, class_masks[c], "mono8") for c in ids]
    return class_masks_cls(header=header, class_ids=_typed_array(class_masks_cls, ids, np.uint16, "H"),
                           class_names=[_class_name(class_names, c) for c in ids], masks=masks)


def _key_frame_time(time_cls: type, header: Any, result: Any, previous: Any | None) -> Any:
    """The key frame's exact header stamp: ``header.stamp`` on a key frame; on other frames
    ``previous`` (the last message's ``key_frame_stamp``) when it is the same instant as
    ``result.key_frame_stamp`` to within 1 us, else that float converted (it loses ~100 ns at
    today's epoch); zero when unknown."""
    if result.is_key_frame:
        return time_cls(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec))
    key_stamp = float(result.key_frame_stamp)
    if not math.isfinite(key_stamp):
        return time_cls(sec=0, nanosec=0)
    if previous is not None and abs(stamp_to_seconds(previous) - key_stamp) < 1e-6:
        return time_cls(sec=int(previous.sec), nanosec=int(previous.nanosec))
    return seconds_to_stamp(time_cls, key_stamp)


def make_segmentation_info(info_cls: type, time_cls: type, header: Any, result: Any,
                           previous_key_frame_stamp: Any | None = None) -> Any:
    """``mpvss_ros/SegmentationInfo`` from a :class:`~mpvss_ros.segmenter.SegmentationResult`.

    ``key_frame_stamp`` is the key frame's header stamp, exactly: ``header.stamp`` on key frames;
    on other frames ``previous_key_frame_stamp`` (the previous message's ``key_frame_stamp``),
    provided it is the instant of ``result.key_frame_stamp`` (seconds), else that converted; zero
    when unknown. Stages and latencies come from ``result.stage_latency_ms`` without ``total`` (kept in
    ``total_latency_ms``).
    """
    latency = dict(result.stage_latency_ms)
    total = latency.pop("total", sum(latency.values()))
    key_time = _key_frame_time(time_cls, header, result, previous_key_frame_stamp)
    return info_cls(
        header=header,
        frame_index=int(result.frame_index) % 2**32,
        is_key_frame=bool(result.is_key_frame),
        key_frame_stamp=key_time,
        key_frame_reason=str(result.key_frame_reason),
        scene_score=float(result.scene_score),
        stage_names=[str(k) for k in latency],
        stage_latency_ms=_typed_array(info_cls, [float(v) for v in latency.values()], np.float32, "f"),
        total_latency_ms=float(total),
    )


# --------------------------------------------------------------------------------------------
# SegmentationResult -> all output messages
# --------------------------------------------------------------------------------------------


@dataclass
class MessageTypes:
    """The message classes the builders need (rclpy's or a rosbags typestore's)."""

    image: type
    compressed_image: type
    header: type
    time: type
    label_info: type
    vision_class: type
    class_masks: type
    segmentation_info: type


@dataclass
class OutputMessages:
    """The messages of one segmented frame; optional ones are None when not requested.

    Attributes:
        labels: ``sensor_msgs/Image`` ``mono8`` class IDs (``mono16`` when labels are uint16).
        confidence: ``sensor_msgs/Image`` ``mono8``, 0..255.
        info: ``mpvss_ros/SegmentationInfo``.
        colored: ``sensor_msgs/Image`` ``rgb8`` palette colours, or None.
        overlay: ``sensor_msgs/Image`` ``rgb8`` input blended with the colours and a legend, or None.
        class_masks: ``mpvss_ros/ClassMasks``, or None.
        autoware_mask: ``sensor_msgs/Image``, Autoware class IDs run-length encoded
            (:func:`make_autoware_mask`), or None.
    """

    labels: Any
    confidence: Any
    info: Any
    colored: Any = None
    overlay: Any = None
    class_masks: Any = None
    autoware_mask: Any = None


def build_outputs(types: MessageTypes, header: Any, result: Any, frame_rgb: np.ndarray | None,
                  palette: np.ndarray, class_names: Sequence[str], alpha: float = 0.5,
                  want_colored: bool = False, want_overlay: bool = False,
                  want_class_masks: bool = False, previous_key_frame_stamp: Any | None = None,
                  autoware_class_ids: np.ndarray | None = None) -> OutputMessages:
    """Turn a :class:`~mpvss_ros.segmenter.SegmentationResult` into output messages.

    The one place that does so, for the node and ``mpvss bag`` alike. Every message (and every
    mask inside ``class_masks``) carries ``header`` unchanged: pass the input image's header.

    Args:
        types: message classes.
        header: the input image's ``std_msgs/Header``.
        result: the segmentation of that image.
        frame_rgb: the input as ``(H, W, 3)`` uint8 RGB (only needed for the overlay).
        palette: ``(K, 3)`` RGB colours (:func:`~mpvss_ros.viz.make_palette`).
        class_names: ``K`` names (legend, class masks).
        alpha: overlay opacity of the colours, 0..1.
        want_colored, want_overlay, want_class_masks: build those optional messages.
            Class masks come from ``result.class_masks`` when the segmenter made them, else
            from the labels.
        previous_key_frame_stamp: the ``info.key_frame_stamp`` of the previous frame's messages
            (None for the first), so that non-key frames carry the key frame's exact stamp
            (:func:`make_segmentation_info`).
        autoware_class_ids: (K,) uint8 Autoware class ID of each class (:func:`autoware_class_ids`)
            to build ``autoware_mask``; None = none.

    Raises:
        ValueError: ``want_overlay`` without ``frame_rgb``.
        ConversionError: an array that does not fit its encoding, or a class id outside
            0..65535 (:func:`make_image`, :func:`make_class_masks`).
    """
    labels = result.labels
    label_encoding = "mono16" if labels.dtype == np.uint16 else "mono8"
    out = OutputMessages(
        labels=make_image(types.image, header, labels, label_encoding),
        confidence=make_image(types.image, header, result.confidence, "mono8"),
        info=make_segmentation_info(types.segmentation_info, types.time, header, result, previous_key_frame_stamp),
    )
    if want_colored:
        out.colored = make_image(types.image, header, colorize(labels, palette), "rgb8")
    if want_overlay:
        if frame_rgb is None:
            raise ValueError("want_overlay needs frame_rgb")
        vis = overlay(frame_rgb, labels, palette, alpha=alpha, class_names=class_names,
                      tag=frame_tag(result.is_key_frame, result.frame_index - result.key_frame_index))
        out.overlay = make_image(types.image, header, vis, "rgb8")
    if want_class_masks:
        masks = result.class_masks if result.class_masks is not None else class_masks_from_labels(labels)
        out.class_masks = make_class_masks(types.class_masks, types.image, header, masks, class_names)
    if autoware_class_ids is not None:
        out.autoware_mask = make_autoware_mask(types.image, header, labels, autoware_class_ids)
    return out


def rosbags_message_types(typestore: Any) -> MessageTypes:
    """Register the extra message types in a ``rosbags`` typestore and return its classes.

    ``vision_msgs/msg/VisionClass`` and ``vision_msgs/msg/LabelInfo`` are registered only when
    the typestore lacks them; ``mpvss_ros/msg/ClassMasks`` and ``mpvss_ros/msg/SegmentationInfo``
    from :data:`MSG_DEFINITIONS` (identical to ``msg/*.msg``).

    Args:
        typestore: e.g. ``rosbags.typesys.get_typestore(Stores.ROS2_HUMBLE)``.
    """
    from rosbags.typesys import get_types_from_msg  # only needed here: the node never calls this

    missing: dict[str, Any] = {}
    for name, text in MSG_DEFINITIONS.items():
        if name not in typestore.types:
            missing.update(get_types_from_msg(text, name))
    if missing:
        typestore.register(missing)
    t = typestore.types
    return MessageTypes(
        image=t["sensor_msgs/msg/Image"],
        compressed_image=t["sensor_msgs/msg/CompressedImage"],
        header=t["std_msgs/msg/Header"],
        time=t["builtin_interfaces/msg/Time"],
        label_info=t["vision_msgs/msg/LabelInfo"],
        vision_class=t["vision_msgs/msg/VisionClass"],
        class_masks=t["mpvss_ros/msg/ClassMasks"],
        segmentation_info=t["mpvss_ros/msg/SegmentationInfo"],
    )
