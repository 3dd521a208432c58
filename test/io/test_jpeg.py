"""Tests of mpvss_ros.io.jpeg: strict JPEG decoding, its OpenCV fallback and EXIF orientation."""

from __future__ import annotations

import io
import re
import struct
import warnings

import cv2
import numpy as np
import pytest
import simplejpeg
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import exif_tiff, with_exif_orientation

from mpvss_ros.io import jpeg
from mpvss_ros.io.jpeg import JpegDataError, JpegHeaderError, decode_jpeg, exif_orientation, is_jpeg, orient

H, W = 37, 51  # odd: the edges of subsampled chroma


def _gradient(h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.dstack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * 7 + yy * 3) % 256]).astype(np.uint8)


def _jpeg(image: np.ndarray, *params: int) -> bytes:
    """``image`` (RGB, or 2-D grey) as a JPEG written by OpenCV."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image, list(params))
    assert ok
    return buf.tobytes()


def _opencv_rgb(data: bytes, flags: int = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) -> np.ndarray:
    """What OpenCV makes of ``data`` (as image folders read files before: EXIF orientation applied), as RGB."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB if img.ndim == 2 else cv2.COLOR_BGR2RGB)


@pytest.fixture(params=["strict", "opencv"])
def decoder(request, monkeypatch):
    """Both decoders: simplejpeg, strict (installed with the package), and OpenCV's fallback."""
    if request.param == "opencv":
        monkeypatch.setattr(jpeg, "_simplejpeg", None)
    else:
        assert jpeg.STRICT_JPEG
    return request.param


def _sampling(name: str):
    """JPEG writer parameters for chroma subsampling ``name`` ("444", "422"); OpenCV 5.1.0 has them,
    4.5.4 and 4.6.0 do not, and there the case skips."""
    factor = getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{name}", None)
    if factor is None:
        return pytest.param(None, id=name, marks=pytest.mark.skip(reason=f"OpenCV {cv2.__version__} cannot write {name} JPEGs"))
    return pytest.param((cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor), id=name)


@pytest.mark.parametrize("params", [pytest.param((), id="420"), _sampling("444"), _sampling("422"),
                                    pytest.param((cv2.IMWRITE_JPEG_PROGRESSIVE, 1), id="progressive"),
                                    pytest.param("grey", id="grey")])
def test_the_strict_decoder_gives_opencvs_pixels(params, decoder):
    # image folders now take the strict decoder's pixels instead of decoding again with OpenCV
    data = _jpeg(_gradient()[..., 1]) if params == "grey" else _jpeg(_gradient(), *params)
    out = decode_jpeg(data)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, _opencv_rgb(data))


@pytest.mark.parametrize("byte_order", ["II", "MM"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_opencv_applies_it_and_only_when_asked(orientation, byte_order, decoder):
    data = with_exif_orientation(_jpeg(_gradient()), orientation, byte_order)
    assert exif_orientation(data) == orientation
    expected = _opencv_rgb(data)  # imdecode applies the tag
    assert expected.shape[:2] == ((W, H) if orientation >= 5 else (H, W))
    out = decode_jpeg(np.frombuffer(data, np.uint8), apply_orientation=True)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)
    as_stored = _opencv_rgb(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    np.testing.assert_array_equal(decode_jpeg(data), as_stored)


def test_an_orientation_entry_of_the_wrong_type_leaves_the_image_as_stored_with_both_decoders(decoder):
    """An Orientation entry typed ASCII (damaged; EXIF wants SHORT) is malformed: exif_orientation
    says 1. OpenCV's own EXIF reader takes its bytes as a SHORT (5 here: transposed), so the OpenCV
    fallback transposed the frame while simplejpeg did not; both follow exif_orientation now."""
    data = with_exif_orientation(_jpeg(_gradient()), 5)
    typed_ascii = data.replace(b"\x12\x01\x03\x00", b"\x12\x01\x02\x00", 1)
    assert typed_ascii != data and exif_orientation(typed_ascii) == 1
    assert _opencv_rgb(typed_ascii).shape[:2] == (W, H)  # OpenCV alone would transpose it
    out = decode_jpeg(typed_ascii, apply_orientation=True)
    np.testing.assert_array_equal(out, _opencv_rgb(typed_ascii, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION))


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _with_thumbnail(raw: bytes) -> bytes:
    """``raw`` with an APP1 ``Exif`` segment holding an 8 x 8 JPEG thumbnail (an end-of-image
    marker in the header) right after its start-of-image marker."""
    return raw[:2] + _app1(b"Exif\x00\x00" + _jpeg(_gradient(8, 8))) + raw[2:]


def test_a_missing_or_malformed_orientation_reads_as_1():
    plain = _jpeg(_gradient())
    body = plain[2:]
    tiff = exif_tiff(6)
    cases = {
        "no exif": plain,
        "orientation 0": with_exif_orientation(plain, 0),
        "orientation 9": with_exif_orientation(plain, 9),
        "tiff cut short": b"\xff\xd8" + _app1(b"Exif\x00\x00" + tiff[:20]) + body,
        "bad byte order": b"\xff\xd8" + _app1(b"Exif\x00\x00" + b"XX" + tiff[2:]) + body,
        "bad magic": b"\xff\xd8" + _app1(b"Exif\x00\x00" + tiff[:2] + b"\x00\x00" + tiff[4:]) + body,
        "IFD offset past the end": b"\xff\xd8" + _app1(b"Exif\x00\x00" + tiff[:4] + struct.pack("<I", 999) + tiff[8:]) + body,
        "not Exif": b"\xff\xd8" + _app1(b"http://ns.adobe.com/xap/1.0/\x00" + tiff) + body,
        "segment length 0": b"\xff\xd8\xff\xe1\x00\x00" + body,
        "not a JPEG": b"\x89PNG\r\n\x1a\n" + tiff,
        "empty": b"",
    }
    with warnings.catch_warnings(record=True) as caught:  # Pillow warns of corrupt EXIF: not once per frame
        warnings.simplefilter("always")
        assert {name: exif_orientation(data) for name, data in cases.items()} == dict.fromkeys(cases, 1)
    assert caught == []
    # Orientation stored as a LONG rather than the standard's SHORT: OpenCV applies it, and so do we
    long_tag = bytearray(tiff)
    long_tag[8 + 2 + 12 + 2 : 8 + 2 + 12 + 4] = struct.pack("<H", 4)
    as_long = b"\xff\xd8" + _app1(b"Exif\x00\x00" + bytes(long_tag)) + body
    assert exif_orientation(as_long) == 6
    np.testing.assert_array_equal(decode_jpeg(as_long, apply_orientation=True),
                                  cv2.cvtColor(cv2.imdecode(np.frombuffer(as_long, np.uint8), cv2.IMREAD_COLOR),
                                               cv2.COLOR_BGR2RGB))
    # after the start of scan nothing is a header segment any more
    sos = plain.index(b"\xff\xda")
    late = plain[:sos] + b"\xff\xda" + with_exif_orientation(b"\xff\xd8", 6)[2:]
    assert exif_orientation(late) == 1
    assert exif_orientation(np.frombuffer(with_exif_orientation(plain, 8), np.uint8)) == 8


def test_damaged_and_truncated_data(decoder):
    raw = _jpeg(_gradient(120, 160))
    n = len(raw)
    with pytest.raises(JpegDataError, match="truncated") as cut:
        decode_jpeg(raw[: n // 2])
    assert cut.value.truncated
    lost = raw[: n // 2] + raw[n // 2 + n // 4 :]  # a quarter of the scan data gone, the end marker kept
    if decoder == "strict":
        with pytest.raises(JpegDataError, match="bad data.*premature end of data segment") as bad:
            decode_jpeg(lost)
        assert not bad.value.truncated and "premature end of data segment" in bad.value.detail
    else:  # OpenCV cannot tell (as documented)
        assert decode_jpeg(lost).shape == (120, 160, 3)
    with pytest.raises(JpegHeaderError, match="not a JPEG"):
        decode_jpeg(b"\x89PNG\r\n\x1a\n")
    garbage = b"\xff\xd8" + bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)) + b"\xff\xd9"
    # the strict header probe fails; random bytes where the header segments belong do not go on to
    # OpenCV (which decodes what libjpeg calls corrupt), without simplejpeg OpenCV refuses them itself
    words = "header segments do not lead to a start-of-scan marker" if decoder == "strict" else "OpenCV cannot decode it"
    with pytest.raises(JpegDataError, match=words) as garbled:
        decode_jpeg(garbage)
    assert not garbled.value.truncated  # damaged, not cut short: it has its end-of-image marker


def test_a_progressive_jpeg_that_lost_its_first_scan_header_is_refused():
    """TurboJPEG's probe cannot read it, and OpenCV decoded it from the later scans alone (pixels
    off by up to 145) while libjpeg warned of corrupt data: header segments that do not lead to a
    start-of-scan marker are not handed to OpenCV."""
    clean = _jpeg(_gradient(37, 51), cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    sos = clean.index(b"\xff\xda")
    damaged = clean[:sos] + clean[sos + 2 + struct.unpack(">H", clean[sos + 2 : sos + 4])[0] :]
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg_header(damaged)
    with pytest.raises(JpegDataError, match="header segments do not lead to a start-of-scan marker") as bad:
        decode_jpeg(damaged)
    assert not bad.value.truncated


def test_a_progressive_jpeg_cut_within_a_later_scan_header_is_flagged_truncated():
    """libjpeg stops there with "Bogus Huffman table definition", "Invalid component ID", ... and
    not "premature end": no end-of-image marker after the first scan tells it was cut short."""
    data = _jpeg(_gradient(37, 51), cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    later_dht = data.index(b"\xff\xc4", data.index(b"\xff\xda"))  # the second scan's Huffman table
    later_sos = data.index(b"\xff\xda", later_dht)
    for cut in [*range(later_dht + 1, later_dht + 5), *range(later_sos + 1, later_sos + 8)]:
        with pytest.raises(JpegDataError) as short:
            decode_jpeg(data[:cut])
        assert short.value.truncated, (cut, str(short.value))


def test_the_size_is_checked_before_decoding(decoder, monkeypatch):
    data = _jpeg(_gradient())
    seen = []

    def refuse(height: int, width: int) -> None:
        seen.append((height, width))
        raise OverflowError("too large")

    if decoder == "strict":  # from the header: the decoder never runs
        monkeypatch.setattr(jpeg._simplejpeg, "decode_jpeg", None)
    with pytest.raises(OverflowError, match="too large"):
        decode_jpeg(with_exif_orientation(data, 6), check_size=refuse, apply_orientation=True)
    assert seen == [(H, W)] if decoder == "strict" else seen in ([(H, W)], [(W, H)])


def test_is_jpeg():
    assert is_jpeg(b"\xff\xd8\xff") and is_jpeg(np.frombuffer(b"\xff\xd8", np.uint8)) and is_jpeg(bytearray(b"\xff\xd8"))
    assert not is_jpeg(b"") and not is_jpeg(b"\xff") and not is_jpeg(b"\x89PNG")


def test_a_strided_or_2d_uint8_array_decodes_with_its_orientation(decoder):
    """A message's data as a strided view or a (1, N) array is flattened to C-contiguous 1-D
    first: its pixels decode, and its EXIF orientation is read (Pillow needs contiguous bytes)."""
    raw = with_exif_orientation(_jpeg(_gradient()), 6)
    doubled = np.zeros(2 * len(raw), np.uint8)
    doubled[::2] = np.frombuffer(raw, np.uint8)
    strided = doubled[::2]
    assert not strided.flags.c_contiguous
    assert exif_orientation(strided) == 6
    np.testing.assert_array_equal(decode_jpeg(strided, apply_orientation=True), _opencv_rgb(raw))
    np.testing.assert_array_equal(decode_jpeg(np.frombuffer(raw, np.uint8).reshape(1, -1)), decode_jpeg(raw))


def test_only_the_exif_block_gives_the_orientation_as_for_opencv():
    """An XMP ``tiff:Orientation`` (photo editors write one) is not applied by OpenCV; Pillow's
    getexif() falls back on it when the EXIF block has no Orientation, which turned such a JPEG
    where OpenCV leaves it as stored. The EXIF block still wins over the XMP one."""
    plain = _jpeg(_gradient())
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    with_xmp = b"\xff\xd8" + _app1(b"http://ns.adobe.com/xap/1.0/\x00" + xmp) + plain[2:]
    assert exif_orientation(with_xmp) == 1
    np.testing.assert_array_equal(decode_jpeg(with_xmp, apply_orientation=True), _opencv_rgb(with_xmp))
    both = with_exif_orientation(plain, 3)
    both = both[:2] + _app1(b"http://ns.adobe.com/xap/1.0/\x00" + xmp) + both[2:]
    assert exif_orientation(both) == 3


def test_the_orientation_of_a_huge_frame_is_read():
    """Pillow's Image.open refuses a header above twice its MAX_IMAGE_PIXELS (about 179 million
    pixels) as a decompression bomb, which read as orientation 1 (with --max-image-pixels 0 such a
    frame was then left as stored, where OpenCV turns it): the size is the caller's check_size."""
    data = bytearray(with_exif_orientation(_jpeg(_gradient()), 6))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 14000, 14000)  # 196 million pixels in the header
    assert exif_orientation(bytes(data)) == 6


def test_the_opencv_fallback_takes_a_jpeg_padded_after_its_end_marker(monkeypatch):
    """MJPEG camera buffers come padded with 0x00 or 0xFF after the end-of-image marker, more than
    the 64 bytes the fallback looks at first: the marker is then looked for before the padding. A
    JPEG cut short is still refused, padded or not."""
    monkeypatch.setattr(jpeg, "_simplejpeg", None)
    raw = _jpeg(_gradient(120, 160))
    expected = _opencv_rgb(raw)
    for pad in (b"\x00" * 200, b"\xff" * 200, b"\x00\xff" * 100):
        np.testing.assert_array_equal(decode_jpeg(raw + pad), expected)
        with pytest.raises(JpegDataError, match="truncated") as cut:
            decode_jpeg(raw[: len(raw) // 2] + pad)
        assert cut.value.truncated


def test_zero_fill_before_the_end_marker_decodes_strictly(decoder):
    """UVC webcams in MJPEG mode pad frames with 0x00 before the end-of-image marker; libjpeg decodes
    every pixel and warns "N extraneous bytes before marker 0xd9". Such a frame gives the clean
    frame's pixels; damaged scan data is still refused, zero fill or not, and so are extraneous
    bytes that are not zero fill."""
    raw = _jpeg(_gradient(120, 160))
    clean = decode_jpeg(raw)
    assert raw.endswith(b"\xff\xd9")
    for fill in (1, 4, 16, 300):
        np.testing.assert_array_equal(decode_jpeg(raw[:-2] + b"\x00" * fill + raw[-2:]), clean)
    # a JPEG whose own scan data ends in 0x00 (flat blocks last: about 1 in 8 such images here)
    rng = np.random.default_rng(1)
    flat = np.zeros((16, 64, 3), np.uint8)
    flat[:8, :32] = rng.integers(0, 255, (8, 32, 3))
    ends_in_zero = _jpeg(flat, cv2.IMWRITE_JPEG_QUALITY, 75)
    assert ends_in_zero[-3] == 0 and ends_in_zero[-4] != 0xFF
    for fill in (1, 16):
        np.testing.assert_array_equal(decode_jpeg(ends_in_zero[:-2] + b"\x00" * fill + ends_in_zero[-2:]),
                                      decode_jpeg(ends_in_zero))
    if decoder == "strict":
        n = len(raw)
        lost = raw[: n // 2] + raw[n // 2 + n // 4 : -2] + b"\x00" * 16 + raw[-2:]
        with pytest.raises(JpegDataError, match="premature end of data segment"):
            decode_jpeg(lost)
        with pytest.raises(JpegDataError, match="extraneous bytes before marker 0xd9"):
            decode_jpeg(raw[:-2] + bytes(range(1, 17)) + b"\x00" * 8 + raw[-2:])
        # the fill runs up to the end-of-image marker after the scan: not a thumbnail's in the
        # header, nor one in a trailer after the image
        thumbnailed = _with_thumbnail(raw)
        np.testing.assert_array_equal(decode_jpeg(thumbnailed[:-2] + b"\x00" * 16 + thumbnailed[-2:]), clean)
        np.testing.assert_array_equal(decode_jpeg(raw[:-2] + b"\x00" * 16 + raw[-2:] + b"trailer" + _jpeg(_gradient(8, 8))),
                                      clean)


def test_the_opencv_fallback_checks_the_size_from_the_header_before_decoding(monkeypatch):
    """A header TurboJPEG's probe refuses (here an unknown JFIF version, which libjpeg only warns of)
    goes to OpenCV: the frame size still comes from the header, before anything is decoded."""
    raw = bytearray(_jpeg(_gradient()))
    raw[raw.index(b"JFIF\x00") + 5] = 2  # JFIF 2.01
    with pytest.raises(ValueError):
        jpeg._simplejpeg.decode_jpeg_header(bytes(raw))
    np.testing.assert_array_equal(decode_jpeg(bytes(raw)), _opencv_rgb(bytes(raw)))
    seen = []

    def refuse(height: int, width: int) -> None:
        seen.append((height, width))
        raise OverflowError("too large")

    monkeypatch.setattr(cv2, "imdecode", None)
    with pytest.raises(OverflowError, match="too large"):
        decode_jpeg(bytes(raw), check_size=refuse)
    assert seen == [(H, W)]


def test_the_fallbacks_header_size_does_not_warn_of_a_corrupt_exif_block():
    """Pillow warns "Tag data larger than file" of an EXIF tag pointing past the data: the fallback's
    header read let it through once per frame (exif_orientation already kept it quiet)."""
    tiff = bytearray(exif_tiff(1))
    tiff[8 + 2 + 4 : 8 + 2 + 12] = struct.pack("<II", 1000, 0x7000)  # the Make tag: 1000 bytes past the end
    raw = _jpeg(_gradient())
    data = raw[:2] + _app1(b"Exif\x00\x00" + bytes(tiff)) + raw[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jpeg._header_size(data) == (H, W) and exif_orientation(data) == 1


def test_the_opencv_fallback_looks_for_the_end_marker_after_the_scan(monkeypatch):
    """The fallback refused a whole JPEG followed by a trailer of more than 64 bytes (the strict
    path takes it). The end-of-image marker now counts anywhere after the first scan, and only
    there: a thumbnail's marker in the header does not make a truncated JPEG whole."""
    monkeypatch.setattr(jpeg, "_simplejpeg", None)
    raw = _jpeg(_gradient(120, 160))
    expected = _opencv_rgb(raw)
    np.testing.assert_array_equal(decode_jpeg(raw + b"trailer" * 40), expected)
    with_thumbnail = _with_thumbnail(raw)
    payload_size = len(with_thumbnail) - len(raw) - 4  # the APP1 segment's payload
    np.testing.assert_array_equal(decode_jpeg(with_thumbnail), expected)
    with pytest.raises(JpegDataError, match="truncated"):
        decode_jpeg(with_thumbnail[: len(with_thumbnail) * 3 // 4])
    with pytest.raises(JpegDataError, match="truncated") as cut:  # cut within the header, past the thumbnail
        decode_jpeg(with_thumbnail[: 2 + 4 + payload_size + 10])
    assert cut.value.truncated


def test_the_opencv_fallback_checks_the_decoded_size_where_pillow_cannot_read_the_header(monkeypatch):
    """A header Pillow cannot parse (here a JFIF APP0 segment cut to its identifier, which libjpeg
    ignores) gives no size before decoding on the OpenCV fallback: the decoded size is checked
    then, as documented, so a frame above the caller's pixel limit is still refused."""
    monkeypatch.setattr(jpeg, "_simplejpeg", None)
    raw = _jpeg(_gradient())
    assert raw[2:4] == b"\xff\xe0"
    app0_end = 4 + struct.unpack(">H", raw[4:6])[0]
    short_jfif = raw[:2] + b"\xff\xe0" + struct.pack(">H", 7) + b"JFIF\x00" + raw[app0_end:]
    assert jpeg._header_size(short_jfif) is None  # Pillow cannot read it
    np.testing.assert_array_equal(decode_jpeg(short_jfif), _opencv_rgb(short_jfif))
    seen = []

    def refuse(height: int, width: int) -> None:
        seen.append((height, width))
        raise OverflowError("too large")

    with pytest.raises(OverflowError, match="too large"):
        decode_jpeg(short_jfif, check_size=refuse)
    assert seen == [(H, W)]


@pytest.mark.parametrize("marker", [b"\xff\xd0", b"\xff\xd7", b"\xff\x01"], ids=["RST0", "RST7", "TEM"])
def test_the_opencv_fallback_steps_over_markers_without_a_length_in_the_header(monkeypatch, marker):
    """libjpeg skips a parameterless marker (RSTn, TEM) among the header segments; the fallback's
    walk to the first scan must step over its two bytes, not read a length after it, or it takes a
    whole JPEG for a truncated one."""
    monkeypatch.setattr(jpeg, "_simplejpeg", None)
    raw = _jpeg(_gradient())
    stray = raw[:2] + marker + raw[2:]
    np.testing.assert_array_equal(decode_jpeg(stray), _opencv_rgb(raw))


def test_the_opencv_fallback_steps_over_fill_bytes_in_the_header(monkeypatch):
    """A 0xFF fill byte before a header marker (T.81 B.1.1.2) is stepped over one byte at a time,
    not read as a marker with a length (a whole JPEG looked truncated) nor skipped two at a time
    (the walk lost its way, and a thumbnail's end marker made a truncated JPEG look whole)."""
    monkeypatch.setattr(jpeg, "_simplejpeg", None)
    raw = _jpeg(_gradient())
    np.testing.assert_array_equal(decode_jpeg(raw[:2] + b"\xff" + raw[2:]), _opencv_rgb(raw))
    filled = raw[:2] + b"\xff" + _with_thumbnail(raw)[2:]
    np.testing.assert_array_equal(decode_jpeg(filled), _opencv_rgb(raw))
    with pytest.raises(JpegDataError, match="truncated") as cut:
        decode_jpeg(filled[: len(filled) - len(raw) // 2])
    assert cut.value.truncated


# --- property-based: random valid JPEGs, damaged at random -----------------------------------

class _Refused(Exception):
    """What the fuzz test's ``check_size`` raises to refuse a frame."""


def _pil_jpeg(image: np.ndarray, **options) -> bytes:
    """``image`` (RGB, or 2-D grey) as a JPEG written by Pillow (``quality``, ``subsampling``, ...)."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", **options)
    return out.getvalue()


@st.composite
def _valid_jpegs(draw) -> bytes:
    """A JPEG written by OpenCV or Pillow: 1 x 1 to 64 x 96 pixels, grey or colour, any quality, chroma
    subsampling 4:4:4 / 4:2:2 / 4:2:0, baseline or progressive, optimised Huffman tables or not,
    restart intervals, and an EXIF orientation tag or none."""
    h, w = draw(st.integers(1, 64)), draw(st.integers(1, 96))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    content = draw(st.sampled_from(["gradient", "noise", "flat"]))
    image = {"gradient": lambda: _gradient(h, w) if h > 1 and w > 1 else np.full((h, w, 3), 77, np.uint8),
             "noise": lambda: rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
             "flat": lambda: np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)}[content]()
    if draw(st.booleans()):
        image = np.ascontiguousarray(image[..., 1])
    quality, sampling = draw(st.integers(1, 100)), draw(st.sampled_from(["444", "422", "420"]))
    progressive, optimize, restart = draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 3))
    if draw(st.booleans()):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive),
                  cv2.IMWRITE_JPEG_OPTIMIZE, int(optimize), cv2.IMWRITE_JPEG_RST_INTERVAL, restart]
        if hasattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{sampling}"):
            params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{sampling}")]
        data = _jpeg(image, *params)
    else:
        data = _pil_jpeg(image, quality=quality, subsampling={"444": 0, "422": 1, "420": 2}[sampling],
                         progressive=progressive, optimize=optimize, restart_marker_blocks=restart)
    orientation = draw(st.sampled_from([None, *range(1, 9)]))
    return data if orientation is None else with_exif_orientation(data, orientation, draw(st.sampled_from(["II", "MM"])))


def _segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each header segment of a JPEG, up to and including its first start-of-scan header."""
    spans, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        spans.append((i, end))
        if data[i + 1] == 0xDA:
            break
        i = end
    return spans


@st.composite
def _damage(draw, data: bytes) -> tuple[str, bytes]:
    """``data`` (a valid JPEG) damaged one way: (what was done, the damaged bytes)."""
    spans = _segments(data)
    scan, eoi = spans[-1][1], len(data) - 2  # the entropy-coded data: data[scan:eoi]
    op = draw(st.sampled_from(["truncate", "flip header", "flip scan", "zero scan", "lose scan", "insert scan",
                               "remove segment", "duplicate segment", "zero fill", "trailer", "png", "random"]))
    if op == "truncate":
        at = draw(st.one_of(st.integers(0, len(data) - 1), st.integers(scan, len(data) - 1)))  # in the scan data, or anywhere
        return op, data[:at]
    if op in ("flip header", "flip scan"):
        at = draw(st.integers(0, scan - 1) if op == "flip header" else st.integers(scan, eoi - 1))
        return op, data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if op in ("zero scan", "lose scan", "insert scan"):
        start = draw(st.integers(scan, eoi - 1))
        end = draw(st.integers(start + 1, min(eoi, start + 64)))
        middle = {"zero scan": bytes(end - start), "lose scan": b"",
                  "insert scan": draw(st.binary(min_size=1, max_size=32)) + data[start:end]}[op]
        return op, data[:start] + middle + data[end:]
    if op in ("remove segment", "duplicate segment"):
        start, end = draw(st.sampled_from(spans))
        return op, data[:start] + data[start:end] * (2 if op == "duplicate segment" else 0) + data[end:]
    if op == "zero fill":  # UVC webcams' padding before the end-of-image marker
        return op, data[:eoi] + bytes(draw(st.integers(1, 300))) + data[eoi:]
    if op == "trailer":
        return op, data + draw(st.one_of(st.binary(min_size=1, max_size=300), st.integers(1, 300).map(bytes),
                                         st.integers(1, 300).map(lambda n: b"\xff" * n)))
    if op == "png":
        ok, png = cv2.imencode(".png", np.zeros((4, 4), np.uint8))
        return op, png.tobytes()
    return op, draw(st.sampled_from([b"", b"\xff\xd8"])) + draw(st.binary(max_size=200))


class _Logged:
    """A module (``simplejpeg``, ``cv2``) whose decoding functions note their calls in ``log``."""

    def __init__(self, module, log: list, *names: str) -> None:
        self._module = module
        for name in names:
            real = getattr(module, name)
            setattr(self, name, lambda *args, _real=real, _name=name, **kw: (log.append(_name), _real(*args, **kw))[1])

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def _as_buffer(data: bytes, kind: str):
    """``data`` as a message's or file's buffer: bytes, bytearray, memoryview or a uint8 array."""
    return {"bytes": lambda: data, "bytearray": lambda: bytearray(data), "memoryview": lambda: memoryview(bytearray(data)),
            "array": lambda: np.frombuffer(data, np.uint8).copy(), "2-D array": lambda: np.frombuffer(data, np.uint8).reshape(1, -1).copy(),
            }[kind]()


def _decode_logged(data: bytes, buffer: str, strict: bool, apply_orientation: bool, refuse: bool):
    """decode_jpeg of ``data`` as a ``buffer`` (strict, or on OpenCV's fallback): (pixels or None, the
    JpegError or _Refused raised or None, the calls made in order, the sizes check_size was given)."""
    log, sizes = [], []

    def check_size(height: int, width: int) -> None:
        log.append("check_size")
        sizes.append((height, width))
        if refuse:
            raise _Refused

    buf = _as_buffer(data, buffer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jpeg, "_simplejpeg", _Logged(jpeg._simplejpeg, log, "decode_jpeg") if strict else None)
        mp.setattr(jpeg, "cv2", _Logged(cv2, log, "imdecode"))
        try:
            out, error = decode_jpeg(buf, check_size=check_size, apply_orientation=apply_orientation), None
        except (jpeg.JpegError, _Refused) as exc:
            out, error = None, exc
    assert bytes(memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else buf.tobytes()) == data
    return out, error, log, sizes


def _libjpeg_damage(data: bytes) -> str | None:
    """What libjpeg-turbo (strict) finds corrupt in ``data`` ("Corrupt JPEG data: ...", "Premature end
    of JPEG file"), or None: nothing, or only zero bytes before the end-of-image marker after the
    scan (the UVC webcams' fill), or a header it cannot read at all (not damage it reports)."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError as exc:
        message = str(exc)
        fill = re.search(r"(\d+) extraneous bytes before marker 0xd9", message)
        if fill:
            eoi = data.find(b"\xff\xd9", jpeg._scan_start(data))
            return None if data[eoi - int(fill.group(1)) : eoi].count(0) == int(fill.group(1)) else message
        return message if message.startswith(("Corrupt JPEG data", "Premature end")) else None
    return None


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), strict=st.booleans(), buffer=st.sampled_from(["bytes", "bytearray", "memoryview", "array", "2-D array"]),
       apply_orientation=st.booleans(), refuse=st.integers(0, 4).map(lambda n: n == 4))
def test_random_valid_and_damaged_jpegs_decode_as_documented_or_raise_jpeg_errors(data, strict, buffer, apply_orientation, refuse):
    """A valid JPEG decodes to its header's size and OpenCV's exact pixels; truncated, damaged or
    foreign bytes raise JpegHeaderError / JpegDataError (``truncated`` when cut short) and nothing
    else, or decode to their header's size; what libjpeg finds corrupt is refused (strict); zero
    fill before the end marker changes nothing on a JPEG that decodes, and a trailer after it is ignored; check_size gets
    the header size before anything is decoded and what it raises propagates; the buffer is not
    modified."""
    clean = data.draw(_valid_jpegs(), label="jpeg")
    op, damaged = data.draw(st.integers(0, 5).flatmap(lambda n: _damage(clean) if n else st.just(("none", clean))), label="damage")
    out, error, log, sizes = _decode_logged(damaged, buffer, strict, apply_orientation, refuse)
    note(f"{op}: {type(error).__name__} {error}; calls {log}")
    assert len(sizes) <= 1
    if sizes and log.index("check_size") > 0:  # measured once decoded: only where Pillow cannot read the header
        assert jpeg._header_size(damaged) is None
    if not damaged.startswith(b"\xff\xd8"):
        assert isinstance(error, JpegHeaderError) and log == []
        return
    assert not isinstance(error, JpegHeaderError)
    as_stored = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    if op in ("none", "zero fill", "trailer"):  # measured once, by the header, refused or not
        assert sizes == [_opencv_rgb(clean, as_stored).shape[:2]]
    if refuse:
        assert isinstance(error, _Refused) == bool(sizes)  # refused exactly when measured
        return
    assert error is None or isinstance(error, JpegDataError)
    if op == "truncate":
        assert error is not None and error.truncated
    if op in ("none", "zero fill", "trailer"):
        assert error is None
        np.testing.assert_array_equal(out, _opencv_rgb(clean, cv2.IMREAD_COLOR if apply_orientation else as_stored))
    if error is None:
        assert out.dtype == np.uint8 and out.flags.c_contiguous and len(sizes) == 1
        assert out.shape == (*(sizes[0][::-1] if apply_orientation and exif_orientation(damaged) >= 5 else sizes[0]), 3)
        if strict:  # libjpeg found nothing corrupt, and OpenCV's libjpeg-turbo gives the same pixels
            assert _libjpeg_damage(damaged) is None
            stored = _opencv_rgb(damaged, as_stored)  # oriented by exif_orientation, as both decoders do:
            # OpenCV's own reader would take a damaged Orientation entry of type ASCII as a SHORT
            np.testing.assert_array_equal(out, orient(stored, exif_orientation(damaged)) if apply_orientation else stored)
    fill = data.draw(st.integers(0, 64), label="zero fill before the end marker")
    # zero fill changes nothing on a JPEG that decodes (on a refused one it may stand in for lost scan
    # bytes, which libjpeg cannot tell apart: the module docstring says so)
    if strict and fill and error is None and damaged.endswith(b"\xff\xd9") and damaged[-3] != 0xFF:
        filled_out, filled_error, _, _ = _decode_logged(damaged[:-2] + bytes(fill) + damaged[-2:], buffer, strict,
                                                        apply_orientation, refuse)
        assert filled_error is None
        np.testing.assert_array_equal(filled_out, out)
