"""Frame sources (video files, image folders), a video writer, and class-ID label PNGs.

Everything inside the package handles images as ``(H, W, 3)`` ``uint8`` **RGB** arrays;
OpenCV's BGR order only exists at this module's boundary (decoding and encoding).

Usage::

    with open_source("drive.mp4") as src:               # or a folder of images
        with VideoWriter("out.mp4", src.fps) as out:     # size taken from the first frame
            for frame in src:                            # Frame(index, stamp, name, image)
                out.write(frame.image)

Time stamps are ``index / fps`` seconds from the start of the source for both kinds of source.
For video the container's per-frame times are deliberately not used: they can be missing,
non-monotonic or rounded, and a constant-rate clock is what key-frame scheduling needs.
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..values import is_integer, is_real, shown
from . import check_pixel_limit, pixel_excess
from .jpeg import JpegError, decode_jpeg, is_jpeg

__all__ = [
    "Frame",
    "FrameSource",
    "VideoFileSource",
    "ImageFolderSource",
    "open_source",
    "VideoWriter",
    "IMAGE_SUFFIXES",
    "DEFAULT_FOLDER_FPS",
    "check_fps",
    "write_label_png",
    "read_label_png",
    "read_image",
    "png_size",
    "PNG_SIGNATURE",
    "png_damage",
    "decoded_to_rgb",
]

logger = logging.getLogger(__name__)

#: File suffixes (lower case) that an image folder source reads; other files are ignored.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Frame rate assumed for image folders when ``open_source`` is given no ``fps``.
DEFAULT_FOLDER_FPS = 30.0
#: Frame rate used for a video whose container reports none (0 or NaN).
FALLBACK_VIDEO_FPS = 30.0
#: Frame rates accepted for stamps (frames/s): below, stamps of long clips overflow; above, no camera.
FPS_RANGE = (1e-3, 1e5)
#: Failed reads in a row, before the container's last frame, after which a video is taken as
#: ending there (single damaged frames are skipped).
MAX_BAD_READS = 50
#: Largest side (pixels) of a video VideoWriter writes: MPEG-4 Part 2 and MJPEG code a side in
#: 16 bits (OpenCV takes no size past an int32), and an odd side is encoded one pixel larger, so
#: the largest that fits is 65534 (65535 was encoded as 65536: an .avi that wrote without an
#: error and could not be read back).
MAX_VIDEO_SIDE = 65534

# Codec per output suffix for VideoWriter (FourCC); all four are available in opencv-python.
_FOURCC_BY_SUFFIX = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "XVID"}
#: Highest frame rate VideoWriter accepts per suffix (OpenCV 5.1): above 1000 fps the AVI output
#: reads back at 600 fps with frames missing (1001 fps: 4 of 6 frames); above 30000 fps the MKV
#: output reads back at 30000 fps with no error (30001 and 65535 fps alike); above 65535 fps the
#: MPEG-4 writer cannot be opened (its time base's denominator is at most 65535).
#: VideoWriter needs more than this frame rate (OpenCV 5.1): its FFmpeg writer rounds the rate to
#: (int)(fps + 0.5) / 10**k, stopping once within 0.001 of fps, so 0.001 fps (FPS_RANGE's lowest)
#: becomes 0/1 and no writer opens, for every suffix; 0.0010000000000009 fps opens (measured).
_MIN_WRITE_FPS = 0.001
_MAX_FPS_BY_SUFFIX = {".avi": 1000.0, ".mkv": 30000.0, ".mp4": 65535.0, ".m4v": 65535.0, ".mov": 65535.0}

#: Container suffixes that OpenCV's FFmpeg reader opens as the file named even when the path holds
#: ``%`` (each checked with OpenCV 5.1: ``c%d.<suffix>`` read as itself beside a ``c0.<suffix>``).
#: FFmpeg's image2 demuxer claims many other suffixes (``.webp``, ``.ppm``, ``.sunras``, ``.ljpg``,
#: ... and more with each FFmpeg release) and reads a path holding ``%`` as a numbered sequence
#: (``img%d.webp`` is ``img0.webp``, ``img1.webp``, ...), so a path holding ``%`` with any
#: other suffix is refused rather than read in place of another file.
_PERCENT_SAFE_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".3gp", ".avi", ".mkv", ".webm", ".flv", ".wmv", ".asf",
                                    ".m2ts", ".nut", ".y4m", ".mjpeg", ".mjpg", ".gif"})


def _skipped_periods(times_ms: list[float]) -> int:
    """Frame periods the container's frame times skip: for each step between consecutive times
    (ms) more than 1.5 times the median step, the whole periods in it less one; 0 when the times
    are even, missing (OpenCV reports 0 or -1 for some containers) or fewer than three.

    OpenCV's FFmpeg reader (5.1) numbers frames by their time and stops once that number passes
    the container's frame count, so each skipped period costs one frame at the end of a file."""
    steps = np.diff(np.asarray(times_ms, np.float64))
    if steps.size < 2 or not np.isfinite(steps).all():
        return 0
    period = float(np.median(steps))
    if not period > 0:
        return 0
    long = steps[steps > 1.5 * period]
    return int(np.maximum(np.rint(long / period) - 1, 0).sum())


def _opencv_path(path: Path) -> str:
    """``str(path)`` for OpenCV's video reader and writer.

    Raises:
        ValueError: the path is not valid UTF-8 (a file name of other bytes, which Python holds
            as surrogate escapes): OpenCV's Python binding kills the process with SIGSEGV on
            such a string (OpenCV 5.1, reader and writer alike).
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{shown(text)}: OpenCV's video reader and writer take only paths that are valid UTF-8 "
                         "(its Python binding crashes on others); rename it") from None
    return text


#: The first eight bytes of every PNG file.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: How a source's ``max_pixels`` is named in its warnings and errors unless its caller names the
#: setting its users know (``mpvss segment`` names its flag).
DEFAULT_LIMIT_NAME = "max_pixels; None = no limit"


# --------------------------------------------------------------------------------------------
# Frame
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One decoded frame.

    Attributes:
        index: 0-based position in the source. For a folder it counts every image file, also
            the unreadable ones that were skipped, so ``index`` stays aligned with the files.
        stamp: time of the frame in seconds from the start of the source, ``index / fps``.
        name: the image's file stem for folders; the zero-padded 6-digit index for video
            (``"000042"``). Suitable as an output file stem.
        image: ``(H, W, 3)`` ``uint8`` RGB, C-contiguous.

    Raises:
        ValueError: ``image`` is not a C-contiguous ``(H, W, 3)`` ``uint8`` array.
    """

    index: int
    stamp: float
    name: str
    image: np.ndarray

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            shape = getattr(img, "shape", None)
            dtype = getattr(img, "dtype", type(img).__name__)
            raise ValueError(f"Frame.image must be an (H, W, 3) uint8 RGB array, got shape {shape} dtype {dtype}")
        if not img.flags.c_contiguous:
            raise ValueError("Frame.image must be C-contiguous (use np.ascontiguousarray)")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class FrameSource:
    """Base class of frame sources: an iterable of :class:`Frame`, opened by :func:`open_source`.

    Every ``iter(source)`` starts again from the first frame. Use as a context manager or call
    :meth:`close`; iterating a closed source raises ``ValueError``.

    Attributes:
        path: the video file or image folder.
        fps: frame rate in frames per second (> 0) used for the time stamps.
        name: the file stem (video) or folder name (images).
        max_pixels: largest frame (height x width pixels) a source yields; larger ones are skipped
            with a logged warning and listed in ``too_large``. None: no limit.
        limit_name: how the warnings name the setting behind ``max_pixels`` (e.g. a command-line flag).
    """

    def __init__(self, path: Path, fps: float, max_pixels: int | None = None,
                 limit_name: str = DEFAULT_LIMIT_NAME) -> None:
        self.path = path
        self.fps = float(fps)
        self.name = path.stem if path.is_file() else path.name
        self.max_pixels = check_pixel_limit(max_pixels, "max_pixels (None: no limit)")
        self.limit_name = limit_name
        #: names of the frames the last iteration skipped as unreadable (files of a folder; a video's
        #: damaged frames with decoded frames after them), in order
        self.unreadable: list[str] = []
        #: names of the frames the last iteration skipped for having more than ``max_pixels`` pixels, in order
        self.too_large: list[str] = []
        #: frames of a video's reported count neither decoded nor skipped (known once iterated to the end)
        self.missing = 0
        self._closed = False

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Release the source; idempotent."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"frame source is closed: {self.path}")

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def known_len(self) -> int | None:
        """The number of frames where it is known without decoding (a progress bar's total); None
        for a video whose container reports none (``len()`` would count by decoding it all)."""
        return len(self)

    def __repr__(self) -> str:
        n = self.known_len()
        return f"{type(self).__name__}({str(self.path)!r}, fps={self.fps:g}, frames={'?' if n is None else n})"


class VideoFileSource(FrameSource):
    """Frames of a video file decoded with ``cv2.VideoCapture`` (FFmpeg backend).

    Frames come out as ``(H, W, 3)`` uint8 RGB, names ``"000000"``, ``"000001"``, ...,
    stamps ``index / fps`` seconds. ``len()`` is the frame count reported by the container
    (counted by a pass of ``grab()`` calls if the container reports none, passing over damaged
    frames as iterating does; iterating alone never counts). A frame that fails to decode before
    that count, or anywhere in a video without one (a damaged stretch of the file), is skipped, its
    index left out, and decoding goes on, up to :data:`MAX_BAD_READS` failures in a row (without a
    count, those end the video); skipped frames, and decoding ending
    before the count, are logged as warnings at the end of the iteration. The warning counts every
    frame of the container's count neither decoded nor skipped: reads that failed at the end (a
    truncated file) and frames that FFmpeg's demuxer dropped without a failed read (a damaged chunk
    of an AVI). The latter cannot be located (OpenCV's frame position counts decoded frames), so the
    frames after such a gap come with names and stamps one index early per lost frame. A whole
    file with a variable frame rate (a camera that dropped frames) loses frames at its end too:
    OpenCV's reader numbers frames by their time and stops once that number passes the count, one
    frame early per frame period its times skip; the warning says so when the times show it.

    A video whose first decodable frame has more than ``max_pixels`` pixels (height x width; None:
    no limit) is refused when opened. Later frames of more than ``max_pixels`` pixels (a size
    change mid-stream) are decoded but skipped, their indices left out, and listed in
    ``too_large``; the first is logged as a warning, the count at the end of the iteration.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: OpenCV cannot open the file, or none of its first frames can be decoded
            (the first only, when the container reports no frame count); its first frame has
            more than ``max_pixels`` pixels; ``max_pixels`` below 1; a path that is not valid
            UTF-8 (OpenCV crashes on it), or a path holding ``%`` whose suffix is not a container
            FFmpeg opens as named (:data:`_PERCENT_SAFE_SUFFIXES`; its image2 demuxer would read
            ``img0.webp`` for ``img%d.webp``); a path that is not a regular file (a named pipe,
            whose opening blocked, or a device).
    """

    def __init__(self, path: str | Path, fps: float | None = None, max_pixels: int | None = None,
                 limit_name: str = DEFAULT_LIMIT_NAME) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        _refuse_non_regular(path)
        if "%" in str(path) and path.suffix.lower() not in _PERCENT_SAFE_SUFFIXES:
            raise ValueError(f"cannot read video: {path}: FFmpeg may read a {path.suffix or 'suffix-less'} path "
                             f"holding '%' as a numbered sequence (img%d.webp is img0.webp, img1.webp, ...), not as "
                             f"this file; rename it (a path with '%' is read only with a suffix of "
                             f"{', '.join(sorted(_PERCENT_SAFE_SUFFIXES))})")
        cap = self._open_capture(path)
        try:
            count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            ok, first = cap.read()
            # Damaged first frames are skipped like damaged frames later on (:meth:`_frames`), when
            # the container's count says more frames follow, up to MAX_BAD_READS in a row.
            bad = 0
            while (not ok or first is None) and math.isfinite(count) and bad + 1 < min(count, MAX_BAD_READS + 1):
                bad += 1
                ok, first = cap.read()
            if not ok or first is None:
                raise ValueError(f"cannot read video: {path} (no decodable frame at its start)")
            container_fps = cap.get(cv2.CAP_PROP_FPS)
        finally:
            cap.release()
        if fps is None:
            if not (math.isfinite(container_fps) and FPS_RANGE[0] <= container_fps <= FPS_RANGE[1]):
                logger.warning("video %s reports no usable frame rate (%r); assuming %g fps",
                               path, container_fps, FALLBACK_VIDEO_FPS)
                fps = FALLBACK_VIDEO_FPS
            else:
                fps = container_fps
        super().__init__(path, check_fps(fps), max_pixels, limit_name)
        # OpenCV delivers every frame at the first one's size (OpenCV 5.1: a raw MJPEG stream of
        # 64 x 48 then 128 x 96 frames reads as 64 x 48 throughout, and the other way round as
        # 128 x 96), so refuse the file now rather than decode all of it to skip every frame; the
        # frames are still checked one by one, for builds that deliver a size change as it is.
        excess = _pixel_excess(first.shape[0], first.shape[1], self.max_pixels, limit_name)
        if excess is not None:
            raise ValueError(f"video {path}: its frames are {excess}")
        self.container_fps: float = float(container_fps)
        self._count: int | None = int(count) if math.isfinite(count) and count > 0 else None
        self.frame_size: tuple[int, int] = (int(first.shape[1]), int(first.shape[0]))  # (W, H)
        self._live: set[int] = set()
        self._caps: dict[int, cv2.VideoCapture] = {}

    @staticmethod
    def _open_capture(path: Path) -> cv2.VideoCapture:
        try:
            name = _opencv_path(path)
        except ValueError as exc:
            raise ValueError(f"cannot read video: {exc}") from None
        cap = cv2.VideoCapture(name)
        if not cap.isOpened():
            cap.release()
            raise ValueError(f"cannot read video: {path} (OpenCV cannot open it as a video)")
        return cap

    def __len__(self) -> int:
        if self._count is None:
            logger.info("video %s reports no frame count; counting frames", self.path)
            cap = self._open_capture(self.path)
            index = end = failing = 0  # frames passed; up to the last one grabbed; failed grabs in a row
            try:
                while failing <= MAX_BAD_READS:  # damaged frames passed over as iterating does: up to MAX_BAD_READS in a row
                    index += 1
                    if cap.grab():
                        end, failing = index, 0
                    else:
                        failing += 1
            finally:
                cap.release()
            self._count = end
        return self._count

    def known_len(self) -> int | None:
        return self._count

    def __iter__(self) -> Iterator[Frame]:
        self._check_open()
        return self._frames()

    def _frames(self) -> Iterator[Frame]:
        cap = self._open_capture(self.path)
        key = id(cap)
        self._caps[key] = cap
        index = decoded = 0
        self.unreadable, self.too_large, self.missing = [], [], 0
        last_name = ""  # the last frame decoded
        times_ms: list[float] = []  # the container's time of each frame decoded (CAP_PROP_POS_MSEC)
        skipped: list[int] = []  # damaged frames with decoded frames after them
        failing: list[int] = []  # failed reads since the last decoded frame
        try:
            while not self._closed:
                ok, bgr = cap.read()
                if not ok or bgr is None:
                    # Before the container's last frame a failed read is a damaged frame and the
                    # decoder moves on: skip it (indices and stamps stay the container's); give up
                    # after MAX_BAD_READS failures in a row, or at the end. Without a count the
                    # end is MAX_BAD_READS failures in a row (those are then no damaged frames).
                    if (self._count is not None and index >= self._count) or len(failing) >= MAX_BAD_READS:
                        break
                    failing.append(index)
                    index += 1
                    continue
                skipped += failing
                self.unreadable += [f"{i:06d}" for i in failing]
                failing = []
                last_name = f"{index:06d}"
                times_ms.append(cap.get(cv2.CAP_PROP_POS_MSEC))
                excess = _pixel_excess(bgr.shape[0], bgr.shape[1], self.max_pixels, self.limit_name)
                if excess is not None:
                    if not self.too_large:
                        logger.warning("video %s: skipping frame %s: %s", self.path, last_name, excess)
                    self.too_large.append(last_name)
                else:
                    yield Frame(index, index / self.fps, last_name, _bgr_to_rgb(bgr))
                index += 1
                decoded += 1
        finally:
            cap.release()
            self._caps.pop(key, None)
        if self._closed:
            return
        if len(self.too_large) > 1:
            logger.warning("video %s: skipped %d frames (from %s to %s) of more than %d pixels (%s)",
                           self.path, len(self.too_large), self.too_large[0], self.too_large[-1], self.max_pixels,
                           self.limit_name)
        if skipped:
            logger.warning("video %s: skipped %d undecodable frames (from %d to %d); decoding went on after them, and "
                           "the frames decoded next may carry the decoder's concealment of the damage (blocks of "
                           "other frames) up to the codec's next key frame", self.path, len(skipped), skipped[0],
                           skipped[-1])
        # Frames neither decoded nor skipped mid-stream: failed reads at the end (a truncated file,
        # where the failures take ``index`` up to the count), or frames the demuxer dropped itself
        # (a damaged chunk of an AVI: reads go on without a failure and every later frame comes one
        # index early; OpenCV's CAP_PROP_POS_FRAMES and CAP_PROP_PTS count decoded frames, so the
        # gap cannot be located). Only the total tells.
        missing = self._count - decoded - len(skipped) if self._count is not None else 0
        self.missing = max(missing, 0)
        if missing > 0:
            skips = _skipped_periods(times_ms)
            if skips >= missing:  # a whole variable-frame-rate file, most likely
                logger.warning("video %s: decoded %d of the %d frames the container reports, %d missing: its frame "
                               "times skip %d frame periods, as a variable-frame-rate file's do (a camera that dropped "
                               "frames), and OpenCV's reader, which numbers frames by their time, stops one frame "
                               "before the container's count for each; the file is likely whole, and its last "
                               "frames were not read", self.path, decoded, self._count, missing, skips)
            else:
                # reads that failed up to the end: the file was cut, most likely inside the frame after
                # the last one decoded, or inside that one, which decoders fill up with grey or green
                cut = (f"; the last frame decoded, {last_name}, may be cut short (decoders fill the rest of a "
                       "frame with grey or green)") if failing and decoded else ""
                vfr = (f"; its frame times skip {skips} frame periods (a variable frame rate), which account for "
                       f"{skips} of them") if skips else ""
                logger.warning("video %s: decoded %d of the %d frames the container reports, %d missing (truncated or "
                               "corrupt?)%s%s; frames lost before the end, if any, shift the names and stamps of the "
                               "frames after them earlier by as many", self.path, decoded, self._count, missing, cut,
                               vfr)

    def close(self) -> None:
        """Release every capture still held by an unfinished iteration; idempotent."""
        for cap in list(self._caps.values()):
            cap.release()
        self._caps.clear()
        super().close()


class ImageFolderSource(FrameSource):
    """Frames from the images of one folder, in file-name order, or from one image file (a
    sequence of one frame, read as it would be in a folder).

    Files with a suffix in :data:`IMAGE_SUFFIXES` (any letter case) are used, sorted by file
    name (plain string order, so number frames with zero padding; a warning is logged when
    numeric order would differ). Hidden files (``.name``) and sub-folders are ignored.

    Images are read with ``cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR`` (EXIF orientation
    applied) and converted to 8-bit RGB:

    * grayscale -> the gray value replicated in R, G and B;
    * alpha channel (RGBA, gray + alpha) -> dropped, colours kept as stored (not composited);
    * palette PNG -> expanded to its colours;
    * 16-bit -> scaled linearly to 8 bits, ``round(v * 255 / 65535)`` (no per-image
      contrast stretch, so brightness stays comparable between frames);
    * 32-bit float (TIFF) -> taken as [0, 1], clipped, times 255, rounded.

    JPEGs are decoded strictly, once, by :func:`mpvss_ros.io.jpeg.decode_jpeg` (libjpeg-turbo
    through ``simplejpeg``, as the node and ``mpvss bag`` decode them), with the EXIF orientation
    applied as OpenCV applies it: one whose scan data is damaged, which OpenCV decodes with grey or
    shifted blocks and only a libjpeg line on stderr that names no file, is skipped like an
    unreadable one. A JPEG header libjpeg-turbo cannot read is left to OpenCV. (Decoding strictly
    and then again with OpenCV took 1.34-1.36 ms a 640 x 272 JPEG of ``bikes.mp4``, decoding once
    0.53-0.54 ms: median per image of two interleaved runs, ``scripts/jpeg_folder_timing.py``,
    2 shared CPU cores; docs/experiment_log.md, "Stop 37".)

    An image that cannot be decoded, or has another depth, is skipped with a logged warning;
    the index still advances, so ``index``, ``stamp`` and ``name`` stay those of its file.
    ``len()`` is the number of image files (skipped ones included). An image of more than
    ``max_pixels`` pixels (height x width; None: no limit) is skipped the same way and listed in
    ``too_large`` rather than ``unreadable``: a JPEG or PNG is measured from its header, before it
    is decoded (a 9000 x 9000 PNG raised ``mpvss segment``'s peak memory from 0.43 to 2.1 GB),
    other formats once decoded.

    Raises:
        FileNotFoundError: the folder (or image file) does not exist.
        ValueError: no image files in the folder; two image files with the same stem (their
            outputs would overwrite each other); ``fps`` not a positive finite number;
            ``max_pixels`` below 1.
    """

    def __init__(self, path: str | Path, fps: float | None = None, max_pixels: int | None = None,
                 limit_name: str = DEFAULT_LIMIT_NAME) -> None:
        path = Path(path)
        one_image = path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        files = [path] if one_image else _folder_images(path)
        super().__init__(path, check_fps(DEFAULT_FOLDER_FPS if fps is None else fps), max_pixels, limit_name)
        self.files: list[Path] = files

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Frame]:
        self._check_open()
        return self._frames()

    def _frames(self) -> Iterator[Frame]:
        size: tuple[int, ...] | None = None
        self.unreadable, self.too_large = [], []
        for index, file in enumerate(self.files):
            if self._closed:
                return
            try:
                image = _read_rgb(file, self.max_pixels, self.limit_name)
            except _Skipped as exc:
                logger.warning("%s", exc)
                (self.too_large if exc.too_large else self.unreadable).append(file.stem)
                continue
            if size is not None and image.shape != size:
                logger.warning("%s: size %dx%d differs from the previous image's %dx%d",
                               file, image.shape[1], image.shape[0], size[1], size[0])
            size = image.shape
            yield Frame(index, index / self.fps, file.stem, image)


def _folder_images(path: Path) -> list[Path]:
    """The image files of a folder for :class:`ImageFolderSource`, sorted by name (a warning when
    numeric order would differ).

    Raises:
        FileNotFoundError: no such folder.
        ValueError: no image files in it; two with the same stem.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    files = sorted(
        (p for p in path.iterdir()
         # a broken link keeps its place (read as unreadable, its index still advancing); a folder,
         # a FIFO or a device does not, nor a link to one (reading a FIFO blocks until a writer comes)
         if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
         and (p.is_file() or (p.is_symlink() and not p.exists()))),
        key=lambda p: p.name,
    )
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder: {path}")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise ValueError(f"two images with the same name stem in {path}: {stems[p.stem].name}, {p.name}")
        stems[p.stem] = p
    natural = sorted(files, key=lambda p: _natural_key(p.name))
    if natural != files:
        logger.warning("images in %s are read in file-name order, which differs from numeric order "
                       "(e.g. frame_10 before frame_2); zero-pad the numbers if that is wrong", path)
    return files


def open_source(path: str | Path, fps: float | None = None, max_pixels: int | None = None,
                limit_name: str = DEFAULT_LIMIT_NAME) -> FrameSource:
    """Open a video file or a folder of images as a :class:`FrameSource`.

    Args:
        path: a video file (anything ``cv2.VideoCapture`` opens: .mp4 .avi .mkv .mov .webm ...),
            a folder of images (.png .jpg .jpeg .bmp .tif .tiff, read in file-name order), or one
            image file with such a suffix (one frame, decoded as in a folder: EXIF orientation,
            strict JPEG decoding, 16-bit scaling and the size check from the header).
        fps: frame rate in frames/s for the time stamps. Folders: default
            :data:`DEFAULT_FOLDER_FPS` (30). Video: default the container's rate (30 with a
            logged warning if it reports none); a value given here overrides it.
        max_pixels: largest frame (height x width pixels) yielded; larger ones are skipped with a
            logged warning and listed in the source's ``too_large`` (image files measured from the
            header where the format has one: JPEG, PNG), and a video whose first frame is larger
            is refused. None: no limit.
        limit_name: how warnings and errors name the setting behind ``max_pixels``; callers name
            the option their users set (``mpvss segment``: its ``--max-image-pixels`` flag).

    Returns:
        A :class:`VideoFileSource` or :class:`ImageFolderSource` (folders and image files);
        iterate it for
        :class:`Frame` objects (``image`` ``(H, W, 3)`` uint8 RGB, ``stamp`` in seconds).

    Raises:
        FileNotFoundError: ``input not found: <path>``.
        ValueError: ``cannot read video: <path>`` (OpenCV cannot open it or decode a frame at
            its start); a video whose first frame has more than ``max_pixels`` pixels; a folder
            without images; ``fps`` not positive and finite; ``max_pixels`` below 1; a path that
            is neither a folder nor a regular file (a named pipe blocked opening it; a video is
            opened anew for each pass over it).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    if not p.is_dir():
        _refuse_non_regular(p)
    if p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES:
        return ImageFolderSource(p, fps, max_pixels, limit_name)
    return VideoFileSource(p, fps, max_pixels, limit_name)


def _refuse_non_regular(path: Path) -> None:
    """Raise ValueError for an existing ``path`` that is not a regular file (a named pipe, a
    device): opening a FIFO blocked until a writer came, and a video is opened anew for each pass
    over it, which a stream cannot give."""
    if not path.is_file():
        raise ValueError(f"cannot read {path}: not a regular file (a named pipe or a device); write the stream to "
                         "a file first, or run the ROS node on it")


def _pixel_excess(height: int, width: int, max_pixels: int | None, limit_name: str) -> str | None:
    """:func:`~mpvss_ros.io.pixel_excess`, naming the option that sets a source's limit."""
    excess = pixel_excess(height, width, max_pixels)
    return None if excess is None else f"{excess} ({limit_name})"


def check_fps(fps: float) -> float:
    """``fps`` as a float (frames/s) when it is a number in :data:`FPS_RANGE`.

    Raises:
        ValueError: not a number, not finite and positive, or outside :data:`FPS_RANGE`.
    """
    if not is_real(fps):  # text, None, a bool
        raise ValueError(f"fps must be a positive number, got {shown(fps)}")
    try:
        value = float(fps)
    except OverflowError:  # an int no float holds
        value = math.inf if fps > 0 else -math.inf
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"fps must be a positive finite number, got {shown(fps)}")
    if not FPS_RANGE[0] <= value <= FPS_RANGE[1]:
        raise ValueError(f"fps must be in [{FPS_RANGE[0]:g}, {FPS_RANGE[1]:g}] frames/s, got {shown(fps)}")
    return value


def _natural_key(name: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _bgr_to_rgb(bgr: np.ndarray) -> np.ndarray:
    """OpenCV frame (BGR, BGRA or gray; uint8) -> C-contiguous (H, W, 3) uint8 RGB."""
    if bgr.ndim == 2 or (bgr.ndim == 3 and bgr.shape[2] == 1):
        return cv2.cvtColor(bgr.reshape(bgr.shape[:2]), cv2.COLOR_GRAY2RGB)
    if bgr.shape[2] == 4:
        return cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class _Skipped(Exception):
    """An image file that is not turned into a frame; the message is the warning to log.

    Attributes:
        too_large: skipped for its size (more than the source's ``max_pixels``), not as unreadable.
    """

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def png_damage(data: bytes | np.ndarray) -> str | None:
    """Why a PNG's data is damaged, or None when every chunk up to IEND is whole and its CRC
    matches (PNG specification, ISO/IEC 15948, 5.3 and 5.6: CRC-32 of the chunk's type and data).

    OpenCV refuses a PNG cut short or with a damaged chunk only after libpng has printed an error
    of its own to stderr, once per image and naming no file; this check lets the caller refuse it
    with a reason instead. Bytes after IEND are allowed (OpenCV's decoder ignores them). Damage
    that keeps every CRC (data rewritten together with its checksum) is not found. Cost: one pass
    of ``zlib.crc32`` over the file, about 0.34 ms for a 1.09 MB camera-like PNG of 1280 x 720
    (``scripts/png_check_timing.py``).

    Args:
        data: the whole file (bytes, or a 1-D ``uint8`` array), signature included.

    Returns:
        None, or the first fault in file order, e.g. ``"it ends inside its 'IDAT' chunk at byte
        40960"``, ``"its 'IDAT' chunk at byte 8233 fails its CRC"`` or ``"it ends before its IEND
        chunk"``.
    """
    view = memoryview(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1) if isinstance(data, np.ndarray) else data)
    size, offset = len(view), len(PNG_SIGNATURE)
    while offset + 8 <= size:
        length = int.from_bytes(view[offset:offset + 4], "big")
        kind = bytes(view[offset + 4:offset + 8]).decode("latin-1")
        end = offset + 8 + length
        if length > 0x7FFFFFFF or end + 4 > size:
            return f"it ends inside its {kind!r} chunk at byte {offset}" if length <= 0x7FFFFFFF \
                else f"its {kind!r} chunk at byte {offset} has an impossible length ({length} bytes)"
        if zlib.crc32(view[offset + 4:end]) != int.from_bytes(view[end:end + 4], "big"):
            return f"its {kind!r} chunk at byte {offset} fails its CRC"
        if kind == "IEND":
            return None
        offset = end + 4
    return "it ends before its IEND chunk"


def png_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """``(height, width)`` in pixels from a PNG's IHDR chunk, or None when ``data`` is not a PNG
    with an IHDR chunk first (as the PNG standard puts it).

    Args:
        data: the file's first 24 bytes at least (bytes, or a 1-D ``uint8`` array).
    """
    head = bytes(data[:24])
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def _read_rgb(file: Path, max_pixels: int | None = None, limit_name: str = DEFAULT_LIMIT_NAME) -> np.ndarray:
    """Decode one image file to (H, W, 3) uint8 RGB (see :class:`ImageFolderSource`).

    Raises:
        _Skipped: the file cannot be read or decoded, or has an unsupported pixel type, or more
            than ``max_pixels`` pixels (``too_large``; a JPEG or PNG measured from its header).
    """

    def check_size(height: int, width: int) -> None:
        excess = _pixel_excess(height, width, max_pixels, limit_name)
        if excess is not None:
            raise _Skipped(f"skipping image {file}: {excess}", too_large=True)

    try:
        data = np.fromfile(file, dtype=np.uint8)
    except OSError as exc:
        raise _Skipped(f"skipping unreadable image {file}: {exc}") from None
    if is_jpeg(data):
        try:
            return decode_jpeg(data, check_size=check_size, apply_orientation=True)
        except JpegError as exc:  # decode_jpeg hands a header its strict probe cannot read to OpenCV itself
            raise _Skipped(f"skipping corrupt JPEG {file}: {exc}") from None
    size = png_size(data)
    if size is not None:
        check_size(*size)
        damage = png_damage(data)
        if damage is not None:
            raise _Skipped(f"skipping damaged PNG {file}: {damage}")
    try:  # PNG and the formats OpenCV reads besides (BMP, TIFF)
        img = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) if data.size else None
    except cv2.error as exc:
        raise _Skipped(f"skipping unreadable image {file}: {exc}") from None
    if img is None:
        raise _Skipped(f"skipping unreadable image {file} (cannot be decoded)")
    check_size(img.shape[0], img.shape[1])  # the formats measured only once decoded
    try:
        return decoded_to_rgb(img)
    except ValueError as exc:
        raise _Skipped(f"skipping image {file}: {exc}") from None


def read_image(file: str | Path) -> np.ndarray:
    """One image file as (H, W, 3) uint8 RGB, decoded as :class:`ImageFolderSource` decodes its
    files: JPEG strictly (:func:`~mpvss_ros.io.jpeg.decode_jpeg`, EXIF orientation applied), a PNG
    only with every chunk whole (:func:`png_damage`), grey, 16-bit and RGBA by :func:`decoded_to_rgb`.

    Raises:
        ValueError: the file cannot be read or decoded (cut short, damaged, an unsupported pixel
            type); the message names it.
    """
    try:
        return _read_rgb(Path(file))
    except _Skipped as exc:
        raise ValueError(str(exc).removeprefix("skipping ")) from None


def decoded_to_rgb(img: np.ndarray) -> np.ndarray:
    """An image as ``cv2.imdecode(..., IMREAD_ANYDEPTH | IMREAD_ANYCOLOR)`` gives it -> C-contiguous
    ``(H, W, 3)`` uint8 RGB, as :class:`ImageFolderSource` documents: grey replicated, alpha
    dropped, 16-bit scaled by ``round(v * 255 / 65535)``, float taken as [0, 1].

    Args:
        img: ``(H, W)`` or ``(H, W, 1|3|4)`` (grey, BGR, BGRA), uint8, uint16, float32 or float64.

    Raises:
        ValueError: another pixel type or channel count, or a float image with NaN or infinite
            values.
    """
    if img.dtype == np.uint16:
        img = np.rint(img.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        if not np.all(np.isfinite(img)):
            raise ValueError("float image with NaN/inf values")
        img = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] not in (1, 3, 4):
        raise ValueError(f"unsupported channel count {img.shape[2]}")
    return _bgr_to_rgb(img)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class VideoWriter:
    """Write ``(H, W, 3)`` uint8 RGB frames to a video file with ``cv2.VideoWriter``.

    The codec follows the suffix: ``mp4v`` for .mp4/.m4v/.mov, ``MJPG`` for .avi, ``XVID``
    for .mkv (override with ``fourcc``). Missing parent folders are created.

    Args:
        path: output file.
        fps: frame rate in frames/s, positive.
        size: ``(W, H)`` in pixels; None takes it from the first written frame (the file is
            then opened, and open errors raised, on that first :meth:`write`). OpenCV's FFmpeg
            writer drops the last column/row of an odd width/height, so an odd side is encoded one
            pixel larger, the frame's last column/row repeated (``encoded_size``; warning logged).
        fourcc: four-character codec code, overriding the suffix's default.

    Raises:
        ValueError: unknown suffix (without ``fourcc``), bad ``fps``/``size``/``fourcc``, a rate
            of 0.001 fps or less (no writer opens), or a rate the suffix's container cannot hold:
            ``.avi`` above 1000 fps, ``.mkv`` above 30000, ``.mp4``/``.m4v``/``.mov`` above 65535;
            a path that is not valid UTF-8 (OpenCV crashes on it).
        OSError: OpenCV cannot open the file for writing (codec or path problem).
    """

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int] | None = None,
                 fourcc: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self._opencv_name = _opencv_path(self.path)  # refused now, not with a crash at the first frame
        self.fps = check_fps(fps)
        if fourcc is None:
            fourcc = _FOURCC_BY_SUFFIX.get(self.path.suffix.lower())
            if fourcc is None:
                raise ValueError(f"unsupported video suffix {self.path.suffix!r} for {self.path}; "
                                 f"use one of {sorted(_FOURCC_BY_SUFFIX)} or pass fourcc")
        if not isinstance(fourcc, str) or len(fourcc) != 4:
            raise ValueError(f"fourcc must be a 4-character code, got {fourcc!r}")
        if self.fps <= _MIN_WRITE_FPS:
            raise ValueError(f"video cannot be written at {self.fps:g} fps: OpenCV's FFmpeg writer rounds a rate of "
                             f"{_MIN_WRITE_FPS:g} fps or less to 0/1 and cannot be opened (write above {_MIN_WRITE_FPS:g})")
        max_fps = _MAX_FPS_BY_SUFFIX.get(self.path.suffix.lower())
        if max_fps is not None and self.fps > max_fps:
            others = [s for s in (".mp4", ".mkv") if self.fps <= _MAX_FPS_BY_SUFFIX[s]]
            raise ValueError(f"{self.path.suffix} video cannot be written at {self.fps:g} fps (at most {max_fps:g}): "
                             "OpenCV writes it at another rate or not at all"
                             + (f"; use {' or '.join(others)}" if others else ""))
        self.fourcc = fourcc
        self.size: tuple[int, int] | None = None
        self.encoded_size: tuple[int, int] | None = None  # size in the file: ``size`` rounded up to even
        self.frames_written = 0
        self._writer: cv2.VideoWriter | None = None
        self._closed = False
        if size is not None:
            self._open(size)

    def _open(self, size: tuple[int, int]) -> None:
        try:
            w, h = size
        except (TypeError, ValueError):
            raise ValueError(f"size must be (W, H), got {shown(size)}") from None
        if not (is_integer(w) and is_integer(h)):  # 16.7 was written as 16
            raise ValueError(f"size must be (W, H) in whole pixels, got {shown(size)}")
        if not (0 < w <= MAX_VIDEO_SIDE and 0 < h <= MAX_VIDEO_SIDE):  # OpenCV takes no side past an int32
            raise ValueError(f"size must be positive (W, H), each at most {MAX_VIDEO_SIDE} pixels, got {shown(size)}")
        w, h = int(w), int(h)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # OpenCV's FFmpeg writer rounds odd sizes down (``width &= -2``): the frame's last column or
        # row would be lost without a word (and 1 x 1 fails). Encode at the even size above instead.
        ew, eh = w + (w & 1), h + (h & 1)
        if (ew, eh) != (w, h):
            logger.warning("video %s: odd frame size %dx%d is encoded as %dx%d (last column/row repeated)",
                           self.path, w, h, ew, eh)
        writer = cv2.VideoWriter(self._opencv_name, cv2.VideoWriter_fourcc(*self.fourcc), self.fps, (ew, eh))
        if not writer.isOpened():
            writer.release()
            raise OSError(f"cannot open video for writing: {self.path} (codec {self.fourcc!r}, {ew}x{eh}, "
                          f"{self.fps:g} fps)")
        self._writer = writer
        self.size = (w, h)
        self.encoded_size = (ew, eh)

    def write(self, image: np.ndarray) -> None:
        """Append one frame.

        Args:
            image: ``(H, W, 3)`` uint8 RGB with ``(W, H)`` equal to the writer's size.

        Raises:
            ValueError: wrong type, dtype, shape or size; the writer is closed.
            OSError: opening the file on the first frame failed (``size=None``).
        """
        if self._closed:
            raise ValueError(f"video writer is closed: {self.path}")
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"VideoWriter.write expects an (H, W, 3) uint8 RGB array, got shape "
                             f"{getattr(image, 'shape', None)} dtype {getattr(image, 'dtype', type(image).__name__)}")
        if self._writer is None:
            self._open((image.shape[1], image.shape[0]))
        if (image.shape[1], image.shape[0]) != self.size:
            raise ValueError(f"frame is {image.shape[1]}x{image.shape[0]}, the video is "
                             f"{self.size[0]}x{self.size[1]}")  # type: ignore[index]
        assert self._writer is not None
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if self.encoded_size != self.size:
            bgr = cv2.copyMakeBorder(bgr, 0, self.encoded_size[1] - self.size[1], 0,  # type: ignore[index]
                                     self.encoded_size[0] - self.size[0], cv2.BORDER_REPLICATE)  # type: ignore[index]
        self._writer.write(bgr)
        self.frames_written += 1

    def close(self) -> None:
        """Finish the file; idempotent. Logs a warning if no frame was written."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self.frames_written == 0:
            logger.warning("video writer %s closed without frames", self.path)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Label images
# --------------------------------------------------------------------------------------------


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """Write a class-ID image losslessly as a single-channel PNG.

    Args:
        path: output file; must end in ``.png``. Missing parent folders are created.
        labels: ``(H, W)`` ``uint8`` (8-bit PNG) or ``uint16`` (16-bit PNG) class IDs.

    Raises:
        ValueError: ``labels`` not a 2-D uint8/uint16 array, or the suffix is not .png.
        OSError: encoding or writing the file failed.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise ValueError(f"label images must be .png (lossless), got {path}")
    if not isinstance(labels, np.ndarray) or labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"labels must be an (H, W) uint8 or uint16 array, got shape "
                         f"{getattr(labels, 'shape', None)} dtype {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.size == 0:
        raise ValueError(f"labels are empty: shape {labels.shape}")
    try:
        ok, buf = cv2.imencode(".png", labels)
    except cv2.error as exc:
        raise OSError(f"cannot encode label image {path}: {exc}") from exc
    if not ok:
        raise OSError(f"cannot encode label image {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a class-ID image written by :func:`write_label_png` (or any gray 8/16-bit PNG).

    Decoded with ``cv2.IMREAD_UNCHANGED``. A 3-channel file whose channels are all equal is
    accepted (channel 0 is returned).

    Returns:
        ``(H, W)`` ``uint8`` or ``uint16`` class IDs.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it cannot be decoded (a PNG cut short or with a chunk failing its CRC, named
            by :func:`png_damage`); it is a palette (indexed) PNG, which OpenCV would
            expand to colours instead of class IDs; or it holds colour rather than class IDs.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"label image not found: {path}")
    data = path.read_bytes()
    # IHDR: signature (8) + length (4) + "IHDR" (4) + width (4) + height (4) + depth (1) + colour type.
    if png_size(data) is not None:
        if len(data) > 25 and data[25] == 3:
            raise ValueError(f"{path} is a palette (indexed) PNG: OpenCV decodes it to colours, not class IDs; "
                             "convert it to a grayscale PNG of the indices first")
        damage = png_damage(data)
        if damage is not None:
            raise ValueError(f"damaged label image {path}: {damage}")
    labels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if labels is None:
        raise ValueError(f"cannot read label image: {path}")
    if labels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"label image {path} has pixel type {labels.dtype}, expected uint8 or uint16")
    if labels.ndim == 3:
        if labels.shape[2] == 1:
            labels = labels[:, :, 0]
        elif labels.shape[2] == 3 and np.array_equal(labels[..., 0], labels[..., 1]) \
                and np.array_equal(labels[..., 0], labels[..., 2]):
            labels = labels[:, :, 0]
        else:
            raise ValueError(f"label image {path} has {labels.shape[2]} distinct colour channels; "
                             "expected single-channel class IDs")
    return np.ascontiguousarray(labels)
