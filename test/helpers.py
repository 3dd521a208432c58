"""Plain helpers the tests import (``from helpers import ...``); fixtures stay in conftest.py."""

from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np


def error_line(err: str) -> str:
    """The one ``mpvss: error:`` line of a command's stderr (log records, if any reach stderr, are
    not counted); fails the test on a traceback or on more than one line."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("mpvss: WARNING", "mpvss: INFO"))]
    assert len(lines) == 1, err
    assert lines[0].startswith("mpvss: error: "), err
    return lines[0]


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class CountedTag(str):
    """A string that counts its live instances (json.dumps writes it as a string)."""

    alive = 0

    def __new__(cls, value: str) -> "CountedTag":
        cls.alive += 1
        return super().__new__(cls, value)

    def __del__(self) -> None:
        type(self).alive -= 1


def count_live_records(monkeypatch) -> list[int]:
    """Tag every frame's record (``SegmentationResult.to_record``) with a :class:`CountedTag`;
    the returned list gets, at each call, how many records made before are still alive."""
    from mpvss_ros.segmenter import SegmentationResult

    real, seen = SegmentationResult.to_record, []
    CountedTag.alive = 0

    def to_record(self):
        seen.append(CountedTag.alive)
        return {**real(self), "tag": CountedTag("t")}

    monkeypatch.setattr(SegmentationResult, "to_record", to_record)
    return seen


def exif_tiff(orientation: int, byte_order: str = "II") -> bytes:
    """An EXIF TIFF structure (``II`` little- or ``MM`` big-endian) whose IFD0 holds a Make tag and
    the Orientation tag (SHORT) ``orientation``."""
    e = "<" if byte_order == "II" else ">"
    entries = struct.pack(e + "HHI", 0x010F, 2, 4) + b"abc\x00" + struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0)
    return byte_order.encode() + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 2) + entries + struct.pack(e + "I", 0)


def with_exif_orientation(jpeg: bytes, orientation: int, byte_order: str = "II") -> bytes:
    """``jpeg`` with an APP1 ``Exif`` segment (:func:`exif_tiff`) after its APP0 (JFIF) segment,
    where cameras put it."""
    payload = b"Exif\x00\x00" + exif_tiff(orientation, byte_order)
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    at = 2 + 2 + int.from_bytes(jpeg[4:6], "big") if jpeg[2:4] == b"\xff\xe0" else 2
    return jpeg[:at] + app1 + jpeg[at:]


def png_with_exif_orientation(png: bytes, orientation: int) -> bytes:
    """``png`` with an ``eXIf`` chunk (:func:`exif_tiff`) after its IHDR chunk."""
    tiff = exif_tiff(orientation)
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    return png[:33] + chunk + png[33:]  # signature (8) + IHDR (4 + 4 + 13 + 4)


def live_copies(values: np.ndarray) -> int:
    """How many distinct tensor storages alive in this process hold exactly ``values`` (a numpy
    array, so that the reference itself is not counted): 1 when a model's parameter exists once,
    2 when a copy of the model is alive beside it. Found through ``gc`` (tracemalloc does not see
    torch storage)."""
    import gc
    import warnings

    import torch

    gc.collect()
    storages = set()
    with warnings.catch_warnings():  # isinstance on deprecated torch objects (torch.distributed.reduce_op) warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if _is_tensor(obj)]
    for obj in tensors:
        try:
            if obj.is_meta or tuple(obj.shape) != values.shape:
                continue
            if obj.dtype != torch.float32 or obj.device.type != "cpu":
                continue
        except Exception:  # noqa: BLE001 - tensor subclasses whose attributes misbehave
            continue
        if np.array_equal(obj.detach().numpy(), values):
            storages.add(obj.untyped_storage().data_ptr())
    return len(storages)


def _is_tensor(obj: object) -> bool:
    import torch

    try:
        return isinstance(obj, torch.Tensor)
    except Exception:  # noqa: BLE001 - proxies whose __class__ raises
        return False


def reference_attention(attn, q, k, v, mask=None):
    """``torch.nn.MultiheadAttention`` ``attn`` applied with ``torch.nn.functional`` and its own
    weights (eval mode, no dropout): (L, B, C) queries ``q``, keys ``k``, values ``v`` -> (L, B, C);
    ``mask`` (B*heads, L, S) bool, True = blocked. For tests that write a block's formula out."""
    import torch.nn.functional as F

    return F.multi_head_attention_forward(
        q, k, v, attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
        attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=False, attn_mask=mask)[0]


def reference_layer_norm(norm, x):
    """``torch.nn.LayerNorm`` ``norm`` over the last dim of ``x``, with ``torch.nn.functional``."""
    import torch.nn.functional as F

    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def fill_the_disk_half_way(monkeypatch) -> None:
    """Make file writes stop half-way with ``ENOSPC`` (a disk that fills up): half the bytes reach
    the file, then the write raises. Covers :func:`mpvss_ros.paths.write_atomic` (``os.fdopen``)
    and ``Path.write_bytes`` / ``Path.write_text``, until the test's ``monkeypatch`` is undone."""
    real_fdopen, real_write_bytes, real_write_text = os.fdopen, Path.write_bytes, Path.write_text

    def write_bytes(self, data):
        real_write_bytes(self, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_text(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", write_text)

    class HalfWrittenFile:
        def __init__(self, f):
            self._f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def write(self, data):
            data = bytes(data)
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: HalfWrittenFile(real_fdopen(fd, *args, **kwargs)))
