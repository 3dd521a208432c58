"""Strict JPEG decoding: the one implementation behind image folders and ``CompressedImage`` messages.

*Strict* means libjpeg-turbo, through ``simplejpeg``, with libjpeg's warnings raised as errors. A
JPEG whose entropy-coded scan data lost or garbled bytes ("Corrupt JPEG data: premature end of
data segment", "Premature end of JPEG file", ...) is refused with :class:`JpegDataError`, where
OpenCV returns it with grey, smeared or shifted blocks and only prints a libjpeg line on stderr
that names no file (an MJPEG camera dropping USB packets, a file cut short). JPEG has no checksum:
a changed byte that keeps the entropy code valid still decodes, and libjpeg does not notice every
loss either (in a property-based test, most single bytes lost from a small JPEG's scan data decoded
without a warning; losses of several bytes are refused). Zero fill before the end-of-image marker
(below) can stand in for lost scan bytes: libjpeg reads the zeros as the missing data, and the last
blocks decode wrong; nothing in the bytes tells that apart from a scan whose own last bytes are zero. Without ``simplejpeg``
(:data:`STRICT_JPEG` False) OpenCV decodes, and only a JPEG without an end-of-image marker after
its first scan (a truncated one) is refused; so does a JPEG whose header TurboJPEG's probe cannot read but
libjpeg can (a chroma-subsampled CMYK JPEG, stray bytes between header segments). One libjpeg
warning is not taken for damage: zero bytes before the end-of-image marker, which UVC webcams
in MJPEG mode pad their frames with ("N extraneous bytes before marker 0xd9"); such a JPEG is
decoded, strictly, without them.

On the JPEGs tried (baseline and progressive; 4:4:4, 4:2:2 and 4:2:0; odd sizes; greyscale; CMYK)
the strict decoder returns exactly the pixels of OpenCV's ``cv2.imdecode`` converted to RGB: both
are libjpeg-turbo with its default (islow) DCT and fancy upsampling.

**Orientation.** libjpeg ignores the EXIF ``Orientation`` tag; OpenCV's ``imread``/``imdecode``
apply it unless told not to. :func:`decode_jpeg` returns the pixels as stored, unless
``apply_orientation`` asks it to rotate/flip them as OpenCV does (:func:`exif_orientation`,
:func:`orient`); image folders ask, ROS messages do not (see
:func:`mpvss_ros.ros.conversions.compressed_to_rgb`).

Usage::

    rgb = decode_jpeg(data, check_size=refuse_above_limit, apply_orientation=True)
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from PIL import Image, JpegImagePlugin

try:  # libjpeg-turbo with warnings as errors: the one decoder here that notices lost scan data
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - an install without it falls back to OpenCV
    _simplejpeg = None

__all__ = [
    "JPEG_SIGNATURE",
    "STRICT_JPEG",
    "JpegError",
    "JpegHeaderError",
    "JpegDataError",
    "is_jpeg",
    "decode_jpeg",
    "exif_orientation",
    "orient",
]

#: The first two bytes of every JPEG file (SOI, start of image).
JPEG_SIGNATURE = b"\xff\xd8"
_EOI = b"\xff\xd9"

#: Whether JPEGs are decoded strictly (``simplejpeg`` is installed; it is a dependency of the
#: package): a JPEG whose scan data lost bytes is refused, not decoded with grey or smeared blocks.
STRICT_JPEG = _simplejpeg is not None

#: Tag number of ``Orientation`` in an EXIF IFD (TIFF 6.0 / EXIF 2.3).
_ORIENTATION_TAG = 0x0112


class JpegError(ValueError):
    """JPEG bytes that cannot be decoded.

    ``str(exc)`` is ``reason``, followed by `` (libjpeg: detail)`` when libjpeg said something.

    Attributes:
        reason: what is wrong, in a few words (e.g. ``"bad data"``, ``"the data is truncated"``).
        detail: libjpeg's or OpenCV's own message, or ``""``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason} (libjpeg: {detail})" if detail else reason)


class JpegHeaderError(JpegError):
    """The bytes do not start with :data:`JPEG_SIGNATURE` (a header the strict decoder cannot
    read goes to OpenCV instead, :func:`decode_jpeg`)."""


class JpegDataError(JpegError):
    """The header is readable but the image data is damaged or cut short.

    Attributes:
        truncated: the data ends before the image does (libjpeg's "premature end of JPEG file", or
            no end-of-image marker on the OpenCV fallback).
    """

    def __init__(self, reason: str, detail: str = "", truncated: bool = False) -> None:
        super().__init__(reason, detail)
        self.truncated = truncated


def _flat(data: Any) -> Any:
    """An array as a C-contiguous 1-D array (a view when it is one already); other buffers as they are."""
    return np.ascontiguousarray(data.reshape(-1)) if isinstance(data, np.ndarray) else data


def is_jpeg(data: Any) -> bool:
    """True when ``data`` (bytes-like, or a 1-D uint8 array) starts with :data:`JPEG_SIGNATURE`."""
    head = memoryview(data).cast("B")[:2] if not isinstance(data, np.ndarray) else data.reshape(-1)[:2]
    return bytes(head) == JPEG_SIGNATURE


def decode_jpeg(data: Any, *, check_size: Callable[[int, int], None] | None = None,
                apply_orientation: bool = False) -> np.ndarray:
    """Decode a whole JPEG file strictly (see the module docstring) to RGB.

    Args:
        data: the file's bytes: ``bytes``, ``bytearray``, ``memoryview`` or a 1-D ``uint8`` array
            (not copied), starting with :data:`JPEG_SIGNATURE`.
        check_size: called as ``check_size(height, width)`` (pixels) before anything is decoded,
            with the frame size from the header, as stored (before any rotation); on the OpenCV
            fallback the header is read by Pillow, and only where Pillow cannot read it is the
            decoded size checked after decoding. Whatever it raises propagates: callers
            refuse frames above a pixel limit with their own error.
        apply_orientation: rotate/flip the image by its EXIF ``Orientation`` tag, as OpenCV's
            ``imread`` and ``imdecode`` do by default (:func:`orient`). False: the pixels as stored.

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB, C-contiguous. A greyscale JPEG gives three equal channels, a
        CMYK one is converted to RGB.

    Raises:
        JpegHeaderError: not a JPEG (no start-of-image marker).
        JpegDataError: damaged or truncated data (``truncated`` tells which), or OpenCV cannot
            decode it (the fallback without ``simplejpeg``, or for a header the strict decoder
            cannot read).
    """
    data = _flat(data)
    if not is_jpeg(data):
        raise JpegHeaderError("not a JPEG (no start-of-image marker)")
    if _simplejpeg is None:
        return _decode_with_opencv(data, check_size, apply_orientation)
    try:
        height, width, _, _ = _simplejpeg.decode_jpeg_header(data)
    except ValueError:
        # A header TurboJPEG's probe cannot read (e.g. a chroma-subsampled CMYK JPEG, an unknown
        # JFIF version) that libjpeg itself may: OpenCV decodes it, as it would without simplejpeg,
        # so an image folder and a CompressedImage give the same pixels. But only a header whose
        # segments lead to a start-of-scan marker: OpenCV decodes without a word what libjpeg calls
        # corrupt, e.g. a progressive JPEG whose first scan header was lost (its scan data then
        # sits where a marker belongs, and the image comes out of the later scans alone).
        raw = _bytes(data)
        scan = _scan_start(raw)
        if scan < len(raw) and raw[scan : scan + 2] != b"\xff\xda":
            raise JpegDataError("bad data", "the header segments do not lead to a start-of-scan marker")
        return _decode_with_opencv(data, check_size, apply_orientation)
    if check_size is not None:
        check_size(int(height), int(width))
    try:
        rgb = _simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError as exc:
        rgb = _decode_without_zero_fill(data, exc)
    return orient(rgb, exif_orientation(data)) if apply_orientation else rgb


def _decode_without_zero_fill(data: Any, exc: ValueError) -> np.ndarray:
    """The strict decode of a JPEG whose decode raised ``exc``, retried without the zero bytes
    before its end-of-image marker when that is what libjpeg warned of.

    UVC webcams in MJPEG mode pad frames with 0x00 bytes before the end-of-image marker; libjpeg
    decodes every pixel and then warns "Corrupt JPEG data: N extraneous bytes before marker 0xd9",
    which the strict decoder raises. The retry decodes the same file without the N bytes libjpeg
    names, then, if that fails, without every zero byte there (the scan data's own last byte can be
    0x00, as in about 1 in 8 JPEGs of flat images), strictly again: any other warning (lost scan
    data, or fill bytes that were scan data) still refuses it, unless the zeros stood in for the
    lost scan bytes (module docstring).

    Raises:
        JpegDataError: from ``exc`` when it is another warning, or when the retries fail too.
    """
    message = str(exc)
    raw = _bytes(data)
    found = re.search(r"(\d+) extraneous bytes before marker 0xd9", message.lower())
    if found:
        eoi = raw.find(_EOI, _scan_start(raw))  # the end-of-image marker the fill runs up to
        zeros = eoi
        while zeros > 2 and raw[zeros - 1] == 0 and raw[zeros - 2] != 0xFF:  # FF 00 is a stuffed data byte
            zeros -= 1
        named = eoi - int(found.group(1))
        for start in dict.fromkeys(s for s in (named, zeros) if zeros <= s < eoi):  # zero bytes only, in order
            try:
                return _simplejpeg.decode_jpeg(raw[:start] + raw[eoi:], colorspace="RGB", strict=True)
            except ValueError:
                pass  # refused with the first decode's warning
    # cut short: libjpeg says so, or it stopped on a later segment cut in two (a progressive JPEG's
    # next Huffman table or scan header), which leaves no end-of-image marker after the first scan
    truncated = "premature end of jpeg file" in message.lower() or raw.find(_EOI, _scan_start(raw)) < 0
    raise JpegDataError("the data is truncated" if truncated else "bad data", message, truncated) from None


def _bytes(data: Any) -> bytes:
    """The bytes of a bytes-like object or a 1-D uint8 array (a copy)."""
    return data.tobytes() if isinstance(data, np.ndarray) else memoryview(data).cast("B").tobytes()


def _decode_with_opencv(data: Any, check_size: Callable[[int, int], None] | None,
                        apply_orientation: bool) -> np.ndarray:
    """:func:`decode_jpeg` without ``simplejpeg``: an end-of-image marker check, then OpenCV."""
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    # OpenCV fills a truncated JPEG with grey: insist on an end-of-image marker after the first scan
    # (entropy-coded data never holds one; an EXIF thumbnail's comes before the scan), whatever
    # follows it (MJPEG buffers padded with 0x00 / 0xFF, a metadata trailer)
    raw = buf.tobytes()
    if raw.find(_EOI, _scan_start(raw)) < 0:
        raise JpegDataError("no end-of-image marker, the data is truncated", truncated=True)
    header_size = _header_size(raw)
    if check_size is not None and header_size is not None:
        check_size(*header_size)
    # as stored, then oriented by exif_orientation as the simplejpeg path is: OpenCV's own EXIF
    # reader takes an Orientation entry of the wrong type (ASCII) as a SHORT, Pillow's refuses it, and
    # a frame's orientation must not depend on which decoder ran
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:
        raise JpegDataError("OpenCV cannot decode it", str(exc)) from None
    if bgr is None or bgr.size == 0:
        raise JpegDataError("OpenCV cannot decode it")
    if check_size is not None and header_size is None:
        check_size(int(bgr.shape[0]), int(bgr.shape[1]))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return orient(rgb, exif_orientation(raw)) if apply_orientation else rgb


def _scan_start(raw: bytes) -> int:
    """The offset of a JPEG's first start-of-scan marker, found by walking the header segments
    from the start-of-image marker (ITU-T T.81 B.1: each a marker with a 2-byte length; fill bytes
    0xFF before a marker); ``len(raw)`` when the data ends within the header (no scan), 2 (just
    past the start-of-image marker) when a byte where a marker belongs is none."""
    i = 2
    while i + 4 <= len(raw) and raw[i] == 0xFF:
        marker = raw[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
        elif marker == 0xDA:
            return i
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(raw[i + 2 : i + 4], "big")
    return len(raw) if i + 4 > len(raw) else 2  # cut short within the header: no scan at all


def _header_size(raw: bytes) -> tuple[int, int] | None:
    """A JPEG's frame size (height, width) in pixels, as stored, read by Pillow from the header
    segments without decoding (it does not mind what TurboJPEG's probe refuses, e.g. an unknown
    JFIF version); None when Pillow cannot read the header either."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # of a corrupt EXIF block, once per frame (as exif_orientation)
            with JpegImagePlugin.JpegImageFile(io.BytesIO(raw)) as image:
                width, height = image.size
    except Exception:  # noqa: BLE001 - Pillow raises many types on headers it cannot parse
        return None
    return int(height), int(width)


def exif_orientation(data: Any) -> int:
    """The EXIF ``Orientation`` tag of a JPEG: 1 (as stored) to 8, or 1 when there is none.

    Read by Pillow from the file's header segments (20-45 us a 640 x 272 JPEG here, an ad-hoc timing, against
    about 0.55 ms to decode it); nothing is decoded. Only the EXIF block (the first APP1 ``Exif``
    segment) counts, as for OpenCV: an XMP ``tiff:Orientation``, which ``PIL.Image.getexif``
    would fall back on, is ignored, and so is Pillow's decompression-bomb limit (the frame size
    is the caller's ``check_size``). Bytes Pillow's JPEG reader cannot parse, a malformed EXIF
    block, or a value outside 1-8 give 1, as OpenCV then leaves the image as stored. (An
    ``Orientation`` entry of another type than SHORT is malformed too and gives 1; OpenCV's own
    reader takes its bytes as a SHORT. Both decoders of :func:`decode_jpeg` follow this function.)

    Args:
        data: the JPEG's bytes (bytes-like or a 1-D ``uint8`` array; Pillow reads a copy).
    """
    try:
        with warnings.catch_warnings():  # Pillow warns of the corrupt EXIF blocks that give 1 here
            warnings.simplefilter("ignore")
            # the JPEG reader itself, not Image.open: no decompression-bomb check on the header's size
            with JpegImagePlugin.JpegImageFile(io.BytesIO(memoryview(_flat(data)).cast("B"))) as image:
                raw = image.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)  # the EXIF block alone: getexif() would also read an XMP orientation
            value = exif.get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - Pillow raises many types on malformed metadata; orientation is optional
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip an image stored with EXIF ``orientation`` so that it shows upright, as OpenCV's
    ``imread``/``imdecode`` do (5-8 swap height and width).

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array (any dtype OpenCV's ``flip``/``transpose`` take).
        orientation: the tag's value, 1-8 (:func:`exif_orientation`); 1 and other values return
            ``image`` itself.

    Returns:
        The upright image, C-contiguous (a new array unless ``orientation`` is 1).
    """
    if orientation == 2:  # mirrored left-right
        return cv2.flip(image, 1)
    if orientation == 3:  # upside down
        return cv2.flip(image, -1)
    if orientation == 4:  # mirrored top-bottom
        return cv2.flip(image, 0)
    if orientation == 5:  # mirrored along the main diagonal
        return cv2.transpose(image)
    if orientation == 6:  # stored rotated 90 degrees counter-clockwise
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:  # mirrored along the anti-diagonal
        return cv2.flip(cv2.transpose(image), -1)
    if orientation == 8:  # stored rotated 90 degrees clockwise
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image
