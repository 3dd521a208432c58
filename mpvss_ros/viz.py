"""Visualisation of semantic segmentation: palettes, colour label maps, overlays with a legend.

Images are ``(H, W, 3)`` ``uint8`` RGB; label maps are ``(H, W)`` integer class IDs (``uint8``
or ``uint16``). Label values outside ``0 .. K-1`` for a ``K``-colour palette (e.g. CamVid's
void = 11 with 11 classes) are "void": black in :func:`colorize`, left as the image in
:func:`overlay`, and never listed in a legend.

Usage::

    palette = make_palette(cfg.num_classes, cfg.palette or None)
    vis = overlay(frame.image, labels, palette, alpha=0.5, class_names=cfg.class_names,
                  tag=frame_tag(result.is_key_frame, result.frame_index - result.key_frame_index))

The tag (:func:`draw_tag`, beside the legend) tells propagated frames from key frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from .config import default_class_names
from .values import INT64_MAX, is_finite, is_integer, is_real, shown

__all__ = [
    "make_palette",
    "colorize",
    "overlay",
    "legend_entries",
    "draw_legend",
    "draw_tag",
    "frame_tag",
    "Legend",
    "LEGEND_CORNERS",
]

#: Corners accepted by :func:`draw_legend` / :func:`overlay`.
LEGEND_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")

_MAX_GENERATED = 2**24 - 1  # distinct colours of the bit-interleave scheme (index 0 = black unused)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


# --------------------------------------------------------------------------------------------
# Palettes and colour maps
# --------------------------------------------------------------------------------------------


def make_palette(num_classes: int, base: Sequence[Sequence[int]] | np.ndarray | None = None) -> np.ndarray:
    """An RGB colour per class.

    Generated colours use the Pascal-VOC bit-interleave scheme on ``class + 1``: bit ``3k``,
    ``3k+1``, ``3k+2`` of the number go to the R, G, B bit ``7-k``. It is deterministic, gives
    distinct colours for up to 2**24 - 1 classes (so any uint16 label range), and never gives
    black, which is reserved for void.

    Args:
        num_classes: ``K >= 1``.
        base: optional list of ``[R, G, B]`` triples (integers 0..255) for the first classes,
            e.g. a model config's palette; an empty list counts as None. If it has fewer than
            ``K`` entries the remaining classes get generated colours.

    Returns:
        ``(K, 3)`` ``uint8`` RGB.

    Raises:
        ValueError: ``num_classes`` < 1 or too large; ``base`` not ``(n, 3)`` integers in
            0..255, or longer than ``num_classes``.
    """
    if not is_integer(num_classes):
        raise ValueError(f"num_classes must be an int, got {shown(num_classes)}")
    k = int(num_classes)
    if not 1 <= k <= _MAX_GENERATED:
        raise ValueError(f"num_classes must be in 1..{_MAX_GENERATED}, got {shown(k)}")
    ids = np.arange(1, k + 1, dtype=np.int64)
    rgb = np.zeros((k, 3), dtype=np.int64)
    for bit in range(7, -1, -1):
        for ch in range(3):
            rgb[:, ch] |= ((ids >> ch) & 1) << bit
        ids >>= 3
    palette = rgb.astype(np.uint8)
    if base is not None and len(base) > 0:
        b = _as_palette(base, "base")
        if len(b) > k:
            raise ValueError(f"base has {len(b)} colours for num_classes={k}")
        palette[: len(b)] = b
    return palette


def _as_palette(palette: Sequence[Sequence[int]] | np.ndarray, what: str = "palette") -> np.ndarray:
    """Validate and convert to a ``(K, 3)`` uint8 array (K >= 1)."""
    arr = np.asarray(palette)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"{what} must be a (K, 3) array of RGB triples, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise ValueError(f"{what} must hold integers 0..255, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"{what} values must be in 0..255, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


def _check_labels(labels: np.ndarray) -> None:
    if not isinstance(labels, np.ndarray) or labels.ndim != 2 or labels.dtype.kind not in "iu" or labels.size == 0:
        raise ValueError(f"labels must be a non-empty (H, W) integer array (uint8/uint16), got shape "
                         f"{getattr(labels, 'shape', None)} dtype {getattr(labels, 'dtype', type(labels).__name__)}")


def _valid_mask(labels: np.ndarray, k: int) -> np.ndarray | None:
    """Boolean (H, W) mask of labels in 0..k-1, or None when every label is in range."""
    if labels.dtype.kind == "u" and np.iinfo(labels.dtype).max < k:
        return None
    valid = labels < k
    if labels.dtype.kind == "i":
        valid &= labels >= 0
    return None if valid.all() else valid


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Colour a label map.

    Args:
        labels: ``(H, W)`` class IDs, ``uint8`` or ``uint16`` (other integer types work too).
        palette: ``(K, 3)`` RGB, uint8 or integers 0..255 (see :func:`make_palette`).

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB; labels ``>= K`` (and negative ones) are black.

    Raises:
        ValueError: ``labels`` not a 2-D integer array, or a malformed palette.
    """
    _check_labels(labels)
    pal = _as_palette(palette)
    k = len(pal)
    if labels.dtype == np.uint8:
        # OpenCV's per-channel table look-up on the label replicated into three channels (1080p:
        # 3.2 against 5.3 ms for the numpy gather below, same output).
        lut = np.zeros((256, 1, 3), dtype=np.uint8)
        lut[: min(k, 256), 0] = pal[:256]
        return cv2.LUT(cv2.merge([labels, labels, labels]), lut)
    if labels.dtype == np.uint16:
        # Look-up table over the whole value range: one gather, no masking.
        n = np.iinfo(labels.dtype).max + 1
        lut = np.zeros((n, 3), dtype=np.uint8)
        lut[: min(k, n)] = pal[:n]
        return np.take(lut, labels, axis=0)
    valid = _valid_mask(labels, k)
    if valid is None:
        return np.take(pal, labels, axis=0)
    lut = np.concatenate([pal, np.zeros((1, 3), np.uint8)])
    # intp: the void index k need not fit the labels' own type (int8 labels with K = 300 wrapped
    # k to 44, int16 with K = 40000 to a negative index, colouring void pixels).
    return np.take(lut, np.where(valid, labels.astype(np.intp, copy=False), k), axis=0)


# --------------------------------------------------------------------------------------------
# Legend
# --------------------------------------------------------------------------------------------


@dataclass
class Legend:
    """What :func:`draw_legend` drew.

    Attributes:
        box: ``(x0, y0, x1, y1)`` pixel box of the legend (x1, y1 exclusive), or None when
            nothing was drawn (no classes present, or the image is too small).
        entries: ``(class_id, name)`` of the listed classes, in class-ID order.
        hidden: number of present classes left out for lack of room (shown as "+N more" when
            the legend has room for two lines or more).
    """

    box: tuple[int, int, int, int] | None = None
    entries: list[tuple[int, str]] = field(default_factory=list)
    hidden: int = 0


def _class_counts(labels: np.ndarray, k: int) -> np.ndarray:
    """Pixel count of each class 0..k-1, ``(k,)`` int64; out-of-range labels are ignored."""
    if labels.dtype == np.uint8 and labels.size < 2**24:  # float32 bins count exactly below 2**24
        # OpenCV's histogram (random 1080p labels: 0.64 against 2.5 ms for the int copy and bincount).
        hist = cv2.calcHist([np.ascontiguousarray(labels)], [0], None, [256], [0, 256]).reshape(-1)
        counts = np.zeros(k, dtype=np.int64)
        counts[: min(k, 256)] = hist[: min(k, 256)].astype(np.int64)
        return counts
    valid = _valid_mask(labels, k)
    values = labels.ravel() if valid is None else labels[valid]
    if values.size == 0:
        return np.zeros(k, dtype=np.int64)
    return np.bincount(values.astype(np.intp, copy=False), minlength=k)[:k]


def _names(class_names: Sequence[str] | None, k: int) -> list[str]:
    if class_names is None:
        return default_class_names(k)
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class_names for a palette of {k} colours")
    return names


def legend_entries(labels: np.ndarray, num_classes: int,
                   class_names: Sequence[str] | None = None) -> list[tuple[int, str]]:
    """The classes present in a label map, as a legend would list them (before any capping).

    Args:
        labels: ``(H, W)`` integer class IDs.
        num_classes: ``K``; labels outside ``0..K-1`` (void) are not listed.
        class_names: ``K`` names, or None for ``class_<id>``
            (:func:`~mpvss_ros.config.default_class_names`).

    Returns:
        ``[(class_id, name), ...]`` in increasing class-ID order.

    Raises:
        ValueError: bad ``labels``, ``num_classes`` not an integer >= 1, or ``class_names`` not of
            length ``K``.
    """
    _check_labels(labels)
    if not (is_integer(num_classes) and 1 <= num_classes <= _MAX_GENERATED):  # 2**31 built as many names
        raise ValueError(f"num_classes must be an integer >= 1 and at most {_MAX_GENERATED}, got {shown(num_classes)}")
    names = _names(class_names, int(num_classes))
    counts = _class_counts(labels, int(num_classes))
    return [(int(i), names[i]) for i in np.flatnonzero(counts)]


def _ascii(text: str) -> str:
    # OpenCV's Hershey fonts only draw ASCII.
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)


def _fit(text: str, max_w: int, scale: float, thick: int) -> str:
    if cv2.getTextSize(text, _FONT, scale, thick)[0][0] <= max_w:
        return text
    while text and cv2.getTextSize(text + "..", _FONT, scale, thick)[0][0] > max_w:
        text = text[:-1]
    return text + ".." if text else ""


def draw_legend(image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray,
                class_names: Sequence[str] | None = None, corner: str = "top-left",
                max_entries: int = 12) -> Legend:
    """Draw, in place, a legend box listing the classes present in ``labels``.

    Each line is a colour swatch and the class name, white on a darkened background. The font
    scales with the image height (``H / 600``, clamped to 0.35..1.5; about 10 px high text at
    H = 272). Lines are capped by ``max_entries`` and by the height of the image; when not all
    classes fit, the largest by pixel count are listed (in class-ID order) and a last line
    reads ``+N more`` (``+N`` where the image is too narrow for it, no line where even that does
    not fit: a count is never shortened); when only one line fits, it names the largest class.
    Names too wide for the image are shortened with ``..``; non-ASCII characters are drawn as
    ``?``. Nothing is drawn if not even one line fits.

    Args:
        image: ``(H, W, 3)`` ``uint8`` RGB, C-contiguous and writable; modified in place.
        labels: ``(H, W)`` integer class IDs (``uint8``/``uint16``).
        palette: ``(K, 3)`` RGB colours; labels ``>= K`` are void and not listed.
        class_names: ``K`` names, or None for ``"class_<id>"``.
        corner: one of :data:`LEGEND_CORNERS`.
        max_entries: most lines, ``+N more`` included (>= 1).

    Returns:
        A :class:`Legend` with the box drawn (or None) and the listed classes.

    Raises:
        ValueError: bad image, labels, palette, names, corner or ``max_entries``.
    """
    _check_drawable(image, corner, "draw_legend")
    _check_labels(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size")
    if not (is_integer(max_entries) and max_entries >= 1):
        raise ValueError(f"max_entries must be an int >= 1, got {shown(max_entries)}")
    pal = _as_palette(palette)
    k = len(pal)
    names = _names(class_names, k)
    counts = _class_counts(labels, k)
    present = np.flatnonzero(counts)
    if present.size == 0:
        return Legend()

    h, w = image.shape[:2]
    scale, thick, text_h, text_base, pad = _text_metrics(h)
    swatch = text_h + text_base
    line_h = swatch + pad
    capacity = min(int(max_entries), (h - 2 * pad - pad) // line_h)  # outer margin + top padding
    max_text_w = w - 2 * pad - 3 * pad - swatch
    if capacity < 1 or max_text_w < cv2.getTextSize("W..", _FONT, scale, thick)[0][0]:
        return Legend()

    if present.size <= capacity:
        listed, hidden = present, 0
    else:
        n = max(capacity - 1, 1)  # the last line says "+N more", unless only one line fits
        order = sorted(present.tolist(), key=lambda i: (-counts[i], i))
        listed, hidden = np.sort(np.array(order[:n])), int(present.size - n)
    entries = [(int(i), names[i]) for i in listed]
    lines = [_fit(_ascii(name), max_text_w, scale, thick) for _, name in entries]
    more = None
    if hidden and capacity >= 2:  # a count is never cut: "+49 more", else "+49", else no line
        more = next((t for t in (f"+{hidden} more", f"+{hidden}")
                     if cv2.getTextSize(t, _FONT, scale, thick)[0][0] <= max_text_w), None)
    widths = [cv2.getTextSize(t, _FONT, scale, thick)[0][0] for t in lines + ([more] if more else [])]

    n_lines = len(lines) + (1 if more else 0)
    box_w = pad + swatch + pad + max(widths) + pad
    box_h = pad + n_lines * line_h
    x0 = pad if corner.endswith("left") else w - pad - box_w
    y0 = pad if corner.startswith("top") else h - pad - box_h
    x1, y1 = x0 + box_w, y0 + box_h

    _darken(image[y0:y1, x0:x1])
    white = (255, 255, 255)
    for row in range(n_lines):
        top = y0 + pad + row * line_h
        baseline_y = top + text_h
        tx = x0 + pad + swatch + pad
        if row < len(lines):
            colour = tuple(int(c) for c in pal[entries[row][0]])
            cv2.rectangle(image, (x0 + pad, top), (x0 + pad + swatch - 1, top + swatch - 1), colour, -1)
            cv2.rectangle(image, (x0 + pad, top), (x0 + pad + swatch - 1, top + swatch - 1), (200, 200, 200), 1)
            text = lines[row]
        else:
            text = more  # type: ignore[assignment]
        cv2.putText(image, text, (tx, baseline_y), _FONT, scale, white, thick, cv2.LINE_AA)
    return Legend(box=(x0, y0, x1, y1), entries=entries, hidden=hidden)


def _darken(roi: np.ndarray) -> None:
    """Darken a uint8 image region in place to 37.5 % (the background of legend and tag)."""
    roi[...] = (roi.astype(np.uint16) * 3 // 8).astype(np.uint8)


def _text_metrics(h: int) -> tuple[float, int, int, int, int]:
    """Text layout for an image ``h`` pixels high, legend and tag alike: ``(font scale, thickness,
    text height, baseline, padding)``, heights and padding in pixels."""
    scale = float(np.clip(h / 600.0, 0.35, 1.5))
    thick = 1 if scale < 0.9 else 2
    (_, text_h), text_base = cv2.getTextSize("Ag", _FONT, scale, thick)
    return scale, thick, text_h, text_base, max(2, round(5 * scale))


def _check_drawable(image: np.ndarray, corner: str, who: str) -> None:
    """``image`` a C-contiguous, writable (H, W, 3) uint8 RGB image and ``corner`` one of
    :data:`LEGEND_CORNERS`, for the in-place drawing functions; ValueError naming ``who`` else."""
    _check_image(image)
    if not image.flags.c_contiguous or not image.flags.writeable:
        raise ValueError(f"{who} draws in place: image must be C-contiguous and writable")
    if corner not in LEGEND_CORNERS:
        raise ValueError(f"corner must be one of {LEGEND_CORNERS}, got {corner!r}")


def draw_tag(image: np.ndarray, text: str, corner: str = "top-right",
             avoid: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int] | None:
    """Draw, in place, one line of white text on a darkened box in a corner (e.g. whether the
    labels come from a key frame or were propagated), in the legend's font and size.

    Args:
        image: ``(H, W, 3)`` ``uint8`` RGB, C-contiguous and writable; modified in place.
        text: the line; shortened with ``..`` to fit, non-ASCII drawn as ``?``.
        corner: one of :data:`LEGEND_CORNERS`.
        avoid: a box ``(x0, y0, x1, y1)`` not to draw over (the legend's): the tag moves to the
            other corner of its side (top <-> bottom), and is left out when it meets the box there too.

    Returns:
        The ``(x0, y0, x1, y1)`` pixel box drawn (x1, y1 exclusive), or None when the image is
        too small for it or it has no room beside ``avoid``.

    Raises:
        ValueError: bad image or corner, or an ``avoid`` that is not four finite numbers.
    """
    _check_drawable(image, corner, "draw_tag")
    if avoid is not None:
        try:
            box = len(avoid) == 4 and all(is_real(v) and is_finite(v) for v in avoid)
        except TypeError:  # no sequence at all
            box = False
        if not box:
            raise ValueError(f"avoid must be a box (x0, y0, x1, y1), got {shown(avoid)}")  # (1, 2) raised IndexError
    h, w = image.shape[:2]
    scale, thick, text_h, text_base, pad = _text_metrics(h)
    line = _fit(_ascii(text), w - 4 * pad, scale, thick)
    box_h = text_h + text_base + 2 * pad
    if not line or box_h + 2 * pad > h:
        return None
    box_w = cv2.getTextSize(line, _FONT, scale, thick)[0][0] + 2 * pad
    x0 = pad if corner.endswith("left") else w - pad - box_w
    y0 = pad if corner.startswith("top") else h - pad - box_h

    def meets(y: int) -> bool:
        return avoid is not None and x0 < avoid[2] and avoid[0] < x0 + box_w and y < avoid[3] and avoid[1] < y + box_h

    if meets(y0):
        y0 = h - pad - box_h if corner.startswith("top") else pad
        if meets(y0):
            return None
    _darken(image[y0 : y0 + box_h, x0 : x0 + box_w])
    cv2.putText(image, line, (x0 + pad, y0 + pad + text_h), _FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return x0, y0, x0 + box_w, y0 + box_h


def frame_tag(is_key_frame: bool, frames_since_key: int) -> str:
    """The overlay's tag for a frame: ``key frame``, or ``propagated +N`` (N frames after its key
    frame), so that warped labels are told from inferred ones at a glance.

    Raises:
        ValueError: a non-key frame whose ``frames_since_key`` is not an integer in 1..2**63 - 1.
    """
    if is_key_frame:
        return "key frame"
    if not (is_integer(frames_since_key) and 1 <= frames_since_key <= INT64_MAX):
        raise ValueError(f"a propagated frame comes at least 1 frame after its key frame (frames_since_key, an "
                         f"integer), got {shown(frames_since_key)}")
    return f"propagated +{int(frames_since_key)}"


# --------------------------------------------------------------------------------------------
# Overlay
# --------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got shape "
                         f"{getattr(image, 'shape', None)} dtype {getattr(image, 'dtype', type(image).__name__)}")


def overlay(image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray,
            alpha: float = 0.5, class_names: Sequence[str] | None = None, legend: bool = True,
            legend_corner: str = "top-left", max_legend_entries: int = 12, tag: str | None = None) -> np.ndarray:
    """Blend class colours over an image and add a legend of the classes present.

    Pixel = ``(1 - alpha) * image + alpha * colour`` (``cv2.addWeighted``, rounded); void
    pixels (labels outside ``0..K-1``) keep the image. The legend is :func:`draw_legend`.

    Args:
        image: ``(H, W, 3)`` ``uint8`` RGB; not modified.
        labels: ``(H, W)`` class IDs, ``uint8``/``uint16``.
        palette: ``(K, 3)`` RGB (see :func:`make_palette`).
        alpha: opacity of the class colours in 0..1 (0 = image only, 1 = colours only).
        class_names: ``K`` names for the legend, or None for ``"class_<id>"``.
        legend: draw the legend.
        legend_corner: one of :data:`LEGEND_CORNERS`.
        max_legend_entries: most legend lines (see :func:`draw_legend`).
        tag: a line drawn in the corner beside the legend's (top-right for a top-left legend;
            :func:`draw_tag`), or below it on that side where a wide legend leaves no room
            (portrait frames), e.g. :func:`frame_tag`; None draws none.

    Returns:
        New ``(H, W, 3)`` ``uint8`` RGB image.

    Raises:
        ValueError: bad image/labels/palette, sizes differ, ``alpha`` outside 0..1, or legend
            arguments invalid.
    """
    _check_image(image)
    _check_labels(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size")
    if not is_real(alpha):  # text, None, a bool
        raise ValueError(f"alpha must be a number in [0, 1], got {shown(alpha)}")
    if not 0.0 <= alpha <= 1.0:  # NaN too; an int past a float's range compares exactly
        raise ValueError(f"alpha must be in [0, 1], got {shown(alpha)}")
    alpha = float(alpha)
    if legend_corner not in LEGEND_CORNERS:  # places the tag too, with or without a legend
        raise ValueError(f"legend_corner must be one of {LEGEND_CORNERS}, got {legend_corner!r}")
    pal = _as_palette(palette)
    colour = colorize(labels, pal)
    src = np.ascontiguousarray(image)
    out = cv2.addWeighted(src, 1.0 - alpha, colour, alpha, 0.0)
    valid = _valid_mask(labels, len(pal))
    if valid is not None:
        out[~valid] = src[~valid]
    drawn = Legend()
    if legend:
        drawn = draw_legend(out, labels, pal, class_names, corner=legend_corner, max_entries=max_legend_entries)
    if tag:
        side = "right" if legend_corner.endswith("left") else "left"
        draw_tag(out, tag, f"{legend_corner.split('-')[0]}-{side}", avoid=drawn.box)
    return out
