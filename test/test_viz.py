"""Tests of mpvss_ros.viz: palettes, colorize, overlay and its legend."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mpvss_ros.viz as viz
from mpvss_ros.viz import (LEGEND_CORNERS, colorize, draw_legend, draw_tag, frame_tag, legend_entries, make_palette,
                           overlay)


def _scene(h: int = 272, w: int = 640) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    labels = np.full((h, w), 11, np.uint8)  # void everywhere ...
    labels[: h // 2, : w // 2] = 0
    labels[h // 2 :, : w // 2] = 3
    labels[:, w // 2 : w // 2 + 40] = 8  # ... except classes 0, 3, 8
    return image, labels


def _recording_put_text(drawn: list[str]):
    """cv2.putText as it is now, that also appends each text it draws to ``drawn``."""
    put_text = viz.cv2.putText
    return lambda im, text, *a, **k: (drawn.append(text), put_text(im, text, *a, **k))[1]


def _drawn_texts(monkeypatch) -> list[str]:
    """The texts drawn with cv2.putText from now on (still drawn), in order."""
    drawn: list[str] = []
    monkeypatch.setattr(viz.cv2, "putText", _recording_put_text(drawn))
    return drawn


def _meet(a, b) -> bool:
    """Whether two (x0, y0, x1, y1) boxes (x1, y1 exclusive) share a pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ------------------------------------------------------------------ palettes


def test_make_palette_generated_distinct_and_deterministic():
    pal = make_palette(300)
    assert pal.shape == (300, 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal}) == 300
    assert not np.any(np.all(pal == 0, axis=1))  # black is reserved for void
    np.testing.assert_array_equal(pal, make_palette(300))
    np.testing.assert_array_equal(pal[:3], [[128, 0, 0], [0, 128, 0], [128, 128, 0]])


def test_make_palette_covers_the_uint16_range_with_all_eight_bits():
    """Any uint16 label has its own colour, and the last bit of each channel is used: class
    2**21 differs from class 0 in the lowest red bit only."""
    pal = make_palette(2**16)
    assert len(np.unique(pal, axis=0)) == 2**16
    np.testing.assert_array_equal(colorize(np.array([[0, 65535]], np.uint16), pal)[0], pal[[0, 65535]])
    assert make_palette(2**21 + 1)[-1].tolist() == [129, 0, 0]


def test_make_palette_base():
    base = [[1, 2, 3], [4, 5, 6]]
    pal = make_palette(2, base)
    np.testing.assert_array_equal(pal, base)
    pal4 = make_palette(4, base)
    np.testing.assert_array_equal(pal4[:2], base)
    np.testing.assert_array_equal(pal4[2:], make_palette(4)[2:])
    np.testing.assert_array_equal(make_palette(3, []), make_palette(3))
    with pytest.raises(ValueError):
        make_palette(1, base)
    with pytest.raises(ValueError):
        make_palette(2, [[0, 0, 256], [0, 0, 0]])
    with pytest.raises(ValueError):
        make_palette(2, [[0, 0], [0, 0]])
    with pytest.raises(ValueError):
        make_palette(0)
    with pytest.raises(ValueError, match="num_classes"):
        make_palette(True)  # a bool is not a class count


# ------------------------------------------------------------------ colorize


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_colorize_hand_built(dtype):
    palette = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], np.uint8)
    labels = np.array([[0, 1, 2], [2, 3, 255]], dtype=dtype)
    out = colorize(labels, palette)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    expected = np.array(
        [[[10, 20, 30], [40, 50, 60], [70, 80, 90]], [[70, 80, 90], [0, 0, 0], [0, 0, 0]]], np.uint8
    )
    np.testing.assert_array_equal(out, expected)


def test_colorize_uint8_matches_a_palette_gather_on_strided_and_void_labels():
    """The uint8 path (OpenCV table look-up) against plain indexing, on a non-contiguous view with
    void labels (>= K: black) and a 300-colour palette (only 256 can occur)."""
    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (40, 60), dtype=np.uint8)
    labels = full[::2, 1::3]                    # strided view
    assert not labels.flags.c_contiguous
    for k in (11, 300):
        palette = rng.integers(0, 256, (k, 3), dtype=np.uint8)
        expected = np.zeros((*labels.shape, 3), np.uint8)
        inside = labels < k
        expected[inside] = palette[labels[inside]]
        np.testing.assert_array_equal(colorize(labels, palette), expected)


def test_colorize_large_uint16_palette_and_negatives():
    pal = make_palette(1000)
    labels = np.array([[0, 999, 1000, 65535]], np.uint16)
    out = colorize(labels, pal)
    np.testing.assert_array_equal(out[0, :2], pal[[0, 999]])
    np.testing.assert_array_equal(out[0, 2:], 0)
    out = colorize(np.array([[-1, 1]], np.int64), pal)
    np.testing.assert_array_equal(out[0], [[0, 0, 0], pal[1]])


def test_colorize_rejects_bad_input():
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2), np.float32), make_palette(2))
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2, 1), np.uint8), make_palette(2))
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2), np.uint8), np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError, match="palette"):  # no colour at all (not an all-black output)
        colorize(np.zeros((2, 2), np.uint8), np.zeros((0, 3), np.uint8))
    for dtype in (np.uint8, np.uint16):  # an empty map: one clear error for both (uint8 failed inside OpenCV)
        with pytest.raises(ValueError, match="non-empty"):
            colorize(np.zeros((0, 5), dtype), make_palette(2))


# ------------------------------------------------------------------ overlay and legend


def test_overlay_shape_dtype_and_blend():
    image, labels = _scene()
    pal = make_palette(11)
    out = overlay(image, labels, pal, alpha=0.5, legend=False)
    assert out.shape == image.shape and out.dtype == np.uint8
    expected = np.round(0.5 * image[0, 0].astype(float) + 0.5 * pal[0].astype(float))
    assert np.abs(out[0, 0].astype(float) - expected).max() <= 1
    np.testing.assert_array_equal(out[labels == 11], image[labels == 11])  # void keeps the image
    np.testing.assert_array_equal(overlay(image, labels, pal, alpha=1.0, legend=False)[labels == 3][0], pal[3])


def test_overlay_alpha0_only_changes_legend_area():
    image, labels = _scene()
    pal = make_palette(11)
    before = image.copy()
    out = overlay(image, labels, pal, alpha=0.0)
    np.testing.assert_array_equal(image, before)  # input untouched
    legend = draw_legend(image.copy(), labels, pal)
    assert legend.box is not None
    x0, y0, x1, y1 = legend.box
    outside = np.ones(labels.shape, bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(out[outside], image[outside])
    assert not np.array_equal(out[y0:y1, x0:x1], image[y0:y1, x0:x1])
    assert x0 >= 0 and y0 >= 0 and x1 <= 640 and y1 <= 272
    assert (x1 - x0) * (y1 - y0) < 0.25 * 640 * 272


def test_legend_entries_and_draw_tag_refuse_bad_arguments_with_a_value_error():
    """num_classes -1 raised numpy's "negative dimensions", 2.7 was taken as 2; an avoid box of two
    numbers raised IndexError."""
    image, labels = _scene(40, 60)
    for k in (-1, 0, 2.7, None, True):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
            legend_entries(labels, k)
    for avoid in ((1, 2), (0, 0, 10, "x"), 5):
        with pytest.raises(ValueError, match="avoid must be a box"):
            draw_tag(image.copy(), "key frame", avoid=avoid)
    assert draw_tag(image.copy(), "key frame", avoid=np.array([0, 0, 5, 5])) is not None


def test_legend_lists_exactly_present_classes():
    image, labels = _scene()
    names = [f"name{i}" for i in range(11)]
    assert legend_entries(labels, 11, names) == [(0, "name0"), (3, "name3"), (8, "name8")]
    legend = draw_legend(image.copy(), labels, make_palette(11), names)
    assert legend.entries == [(0, "name0"), (3, "name3"), (8, "name8")]
    assert legend.hidden == 0
    assert legend_entries(np.full((4, 4), 11, np.uint8), 11) == []
    assert draw_legend(image.copy(), np.full(labels.shape, 11, np.uint8), make_palette(11)).box is None


@pytest.mark.parametrize("corner", LEGEND_CORNERS)
def test_legend_corners_inside_image(corner):
    image, labels = _scene()
    x0, y0, x1, y1 = draw_legend(image.copy(), labels, make_palette(11), corner=corner).box
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 272
    pad = viz._text_metrics(272)[4]  # a margin from every edge, in each corner
    assert pad <= x0 and x1 <= 640 - pad and pad <= y0 and y1 <= 272 - pad
    assert (x0 < 320) == corner.endswith("left")
    assert (y0 < 136) == corner.startswith("top")


def test_legend_caps_entries_on_small_images():
    h, w = 48, 64
    labels = (np.arange(h * w).reshape(h, w) % 40).astype(np.uint16)
    labels[:, :20] = 5  # class 5 is by far the largest
    image = np.zeros((h, w, 3), np.uint8)
    pal = make_palette(40)
    legend = draw_legend(image, labels, pal, [f"a very long class name {i}" for i in range(40)])
    assert legend.box is not None
    x0, y0, x1, y1 = legend.box
    assert 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
    assert 1 <= len(legend.entries) < 40
    assert legend.hidden == 40 - len(legend.entries)
    assert 5 in [i for i, _ in legend.entries]
    assert [i for i, _ in legend.entries] == sorted(i for i, _ in legend.entries)
    out = overlay(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), make_palette(1))
    assert out.shape == (8, 8, 3)  # too small for a legend: no error, nothing drawn


def test_legend_of_one_line_names_the_largest_class():
    image, labels = _scene()  # classes 0, 3 and 8
    counts = np.bincount(labels.ravel(), minlength=11)
    largest = int(np.argmax(counts[:11]))  # 11 is void
    legend = draw_legend(image.copy(), labels, make_palette(11), max_entries=1)
    assert legend.box is not None
    assert legend.entries == [(largest, f"class_{largest}")]
    assert legend.hidden == 2
    two = draw_legend(image.copy(), labels, make_palette(11), max_entries=2)
    x0, y0, x1, y1 = two.box
    assert two.hidden == 2 and len(two.entries) == 1  # one class and "+2 more"
    assert legend.box[3] - legend.box[1] < y1 - y0  # one line, not two
    three = draw_legend(image.copy(), labels, make_palette(11), max_entries=3)
    assert [i for i, _ in three.entries] == [0, 3, 8] and three.hidden == 0  # as many lines as classes: no count


def test_overlay_caps_its_legend_at_max_legend_entries():
    """overlay hands max_legend_entries to its legend."""
    image, labels = _scene()
    pal = make_palette(11)
    expected = overlay(image, labels, pal, legend=False)
    draw_legend(expected, labels, pal, max_entries=1)
    np.testing.assert_array_equal(overlay(image, labels, pal, max_legend_entries=1), expected)


def test_legend_names_are_drawn_in_ascii_and_shortened_to_fit(monkeypatch):
    """Non-ASCII characters are drawn as "?"; a name too wide for the image is cut and ends with
    "..", the cut line (dots included) fitting inside the legend box."""
    drawn = _drawn_texts(monkeypatch)
    image, labels = _scene()
    names = [f"c{i}" for i in range(11)]
    names[0] = "caf\u00e9"
    draw_legend(image, labels, make_palette(11), names)
    assert "caf?" in drawn and "caf\u00e9" not in drawn
    drawn.clear()
    h, w, name = 272, 120, "a very long class name that cannot fit"
    legend = draw_legend(np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8), make_palette(1), [name])
    (line,) = drawn
    assert line.endswith("..") and name.startswith(line[:-2]) and len(line) < len(name)
    scale, thick, text_h, text_base, pad = viz._text_metrics(h)
    swatch = text_h + text_base
    width = viz.cv2.getTextSize(line, viz._FONT, scale, thick)[0][0]
    assert width <= w - 5 * pad - swatch
    x0, _, x1, _ = legend.box
    assert x0 + pad + swatch + pad + width <= x1 <= w


def test_legend_and_tag_keep_their_margin_inside_small_images():
    """However small the image, the legend box and the tag (when drawn) keep a pad from every edge."""
    drawn = 0
    for h, w in [(hh, ww) for hh in range(16, 90, 3) for ww in (40, 64, 90)]:
        labels = (np.arange(h * w).reshape(h, w) % 40).astype(np.uint8)
        box = draw_legend(np.zeros((h, w, 3), np.uint8), labels, make_palette(40),
                          [f"a long class name {i}" for i in range(40)]).box
        if box is not None:
            pad = viz._text_metrics(h)[4]
            assert pad <= box[0] and pad <= box[1] and box[2] <= w - pad and box[3] <= h - pad, (h, w, box)
            drawn += 1
    for h in range(4, 40):
        box = draw_tag(np.zeros((h, 200, 3), np.uint8), "key frame")
        if box is not None:
            pad = viz._text_metrics(h)[4]
            assert box[1] >= pad and box[3] <= h - pad, (h, box)
            drawn += 1
    assert drawn > 0


def test_overlay_rejects_bad_input():
    image, labels = _scene(20, 30)
    pal = make_palette(11)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, labels, pal, alpha=1.5)
    with pytest.raises(ValueError, match="differ"):
        overlay(image, labels[:10], pal)
    with pytest.raises(ValueError, match="differ"):  # draw_legend checks the sizes itself too
        draw_legend(image.copy(), labels[:10], pal)
    with pytest.raises(ValueError):
        overlay(image.astype(np.float32), labels, pal)
    with pytest.raises(ValueError, match="class_names"):
        overlay(image, labels, pal, class_names=["only one"])
    with pytest.raises(ValueError, match="corner"):
        overlay(image, labels, pal, legend_corner="middle")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_class_counts_match_a_plain_count(dtype):
    # uint8 labels go through cv2.calcHist, the others through bincount; both count classes
    # 0..k-1 exactly and ignore the rest (void 255, out-of-range, negative).
    from mpvss_ros.viz import _class_counts

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 14, size=(37, 53)).astype(dtype)
    labels[0, :5] = 255
    if dtype == np.int32:
        labels[1, :3] = -2
    for k in (1, 11, 14, 300):
        expected = np.array([(labels == c).sum() for c in range(k)], dtype=np.int64)
        counts = _class_counts(labels, k)
        assert counts.dtype == np.int64 and counts.shape == (k,)
        np.testing.assert_array_equal(counts, expected)


def test_unnamed_classes_use_the_projects_default_names():
    from mpvss_ros.config import default_class_names

    labels = np.array([[0, 2], [2, 9]], np.uint8)
    assert legend_entries(labels, 3) == [(0, "class_0"), (2, "class_2")]
    assert default_class_names(3) == ["class_0", "class_1", "class_2"]


def test_overlay_tags_key_and_propagated_frames_beside_the_legend():
    image, labels = _scene()
    pal = make_palette(11)
    assert frame_tag(True, 0) == "key frame" and frame_tag(False, 3) == "propagated +3"
    for before_its_key in (0, -3):  # was "propagated +-3"
        with pytest.raises(ValueError, match="at least 1 frame after its key frame"):
            frame_tag(False, before_its_key)
    for corner in (None, "middle"):  # placed the tag without a legend: AttributeError for None
        with pytest.raises(ValueError, match="legend_corner must be one of"):
            overlay(image, labels, pal, legend=False, legend_corner=corner, tag="key frame")
    plain = overlay(image, labels, pal)
    tagged = overlay(image, labels, pal, tag=frame_tag(False, 3))
    box = draw_tag(plain.copy(), "propagated +3", "top-right")
    assert box is not None
    x0, y0, x1, y1 = box
    assert x1 <= 640 and x0 > 320 and y0 < 20  # top-right: the legend is top-left
    inside = np.zeros(labels.shape, bool)
    inside[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(tagged[~inside], plain[~inside])  # only the tag's box changes
    assert not np.array_equal(tagged[inside], plain[inside])
    assert (tagged[inside].astype(int).sum(-1) >= 3 * 250).any()  # white text
    # legend at the bottom right: the tag goes bottom left
    bl = overlay(image, labels, pal, legend_corner="bottom-right", tag="key frame")
    assert not np.array_equal(bl[-30:, :100], overlay(image, labels, pal, legend_corner="bottom-right")[-30:, :100])
    assert draw_tag(np.zeros((6, 40, 3), np.uint8), "key frame") is None  # too small: nothing drawn


@pytest.mark.parametrize("dtype, k", [(np.int8, 300), (np.int16, 40000), (np.int32, 300)])
def test_colorize_negative_labels_are_void_whatever_the_palette_size(dtype, k):
    pal = make_palette(k)
    labels = np.array([[-1, 0, 5]], dtype=dtype)
    np.testing.assert_array_equal(colorize(labels, pal), [[[0, 0, 0], pal[0], pal[5]]])


@pytest.mark.parametrize("hw", [(240, 180), (480, 270), (720, 405), (120, 160)])
def test_the_tag_never_covers_the_legend(hw):
    """Portrait frames: a wide legend reached under the top-right tag, which was drawn across its
    first lines; the tag now goes to the bottom of its side (or is left out on a tiny frame)."""
    h, w = hw
    names = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car", "pedestrian",
             "bicyclist"]
    labels = (np.arange(w)[None, :].repeat(h, 0) * 11 // w).astype(np.uint8)
    image = np.zeros((h, w, 3), np.uint8)
    legend = draw_legend(image, labels, make_palette(11), names)
    tag = draw_tag(image, "propagated +9", "top-right", avoid=legend.box)
    assert legend.box is not None
    # Where the tag goes with nothing to avoid, and the other corner of its side; the text's width
    # depends on the OpenCV version (4.x draws Hershey text wider than 5.x), so room is worked out.
    top = draw_tag(np.zeros_like(image), "propagated +9", "top-right")
    bottom = (top[0], h - top[3], top[2], h - top[1])
    if _meet(top, legend.box) and _meet(bottom, legend.box):
        assert tag is None  # no room on either corner
    else:
        assert tag == (bottom if _meet(top, legend.box) else top)
        assert not _meet(tag, legend.box)
    if h >= 240:  # room on every OpenCV version seen (4.5.4, 4.6.0, 5.1.0)
        assert tag is not None
    assert draw_tag(np.zeros((100, 100, 3), np.uint8), "propagated +9", "top-right", avoid=(0, 0, 100, 100)) is None


@pytest.mark.parametrize("palette", [
    [[0, 0, -1], [0, 0, 0]],          # negative: would wrap to 255
    [[0, 0, 12.5], [0, 0, 0]],        # fractional: would be cut to 12
])
def test_make_palette_refuses_colours_that_are_not_integers_0_to_255(palette):
    with pytest.raises(ValueError, match="base"):
        make_palette(2, palette)
    with pytest.raises(ValueError, match="palette"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8), palette)
    np.testing.assert_array_equal(make_palette(2, [[0.0, 1.0, 2.0], [3, 4, 5]]), [[0, 1, 2], [3, 4, 5]])


def test_overlay_keeps_the_image_under_void_255_with_a_255_colour_palette():
    """uint8 labels and K = 255: label 255 is void (outside 0..254) and keeps the image."""
    image, labels = _scene(40, 60)
    labels[:, -10:] = 255
    pal = make_palette(255)
    out = overlay(image, labels, pal, alpha=0.5, legend=False)
    np.testing.assert_array_equal(out[labels == 255], image[labels == 255])
    assert not np.array_equal(out[labels == 0], image[labels == 0])


@pytest.mark.parametrize("alpha", [-0.5, 1.5, float("nan"), None, "x"])  # None: TypeError; "x": float()'s words
def test_overlay_refuses_alpha_outside_0_1_on_both_sides(alpha):
    image, labels = _scene(20, 30)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, labels, make_palette(11), alpha=alpha)


@pytest.mark.parametrize("hw", [(240, 180), (480, 270)])
def test_overlay_tag_never_draws_over_the_legend(hw):
    """overlay itself passes the legend's box to draw_tag: on portrait frames, where the
    wide legend reaches under the top-right corner, the legend's pixels are the same with and
    without a tag."""
    h, w = hw
    names = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car", "pedestrian",
             "bicyclist"]
    labels = (np.arange(w)[None, :].repeat(h, 0) * 11 // w).astype(np.uint8)
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    pal = make_palette(11)
    plain = overlay(image, labels, pal, class_names=names)
    tagged = overlay(image, labels, pal, class_names=names, tag="propagated +9")
    x0, y0, x1, y1 = draw_legend(overlay(image, labels, pal, legend=False), labels, pal, names).box
    np.testing.assert_array_equal(tagged[y0:y1, x0:x1], plain[y0:y1, x0:x1])
    assert not np.array_equal(tagged, plain)  # the tag was drawn, elsewhere


def test_legend_and_tag_background_is_darkened_to_three_eighths():
    """The box behind legend and tag keeps 37.5 % of the image: on a uniform grey of 200,
    the background pixels of the tag's box are 75."""
    image = np.full((272, 640, 3), 200, np.uint8)
    x0, y0, x1, y1 = draw_tag(image, "key frame", "top-right")
    box = image[y0:y1, x0:x1]
    assert box[0, 0].tolist() == [75, 75, 75] and box[-1, -1].tolist() == [75, 75, 75]
    assert int((box == 75).all(-1).sum()) > box.shape[0] * box.shape[1] // 2


def test_text_scale_stops_growing_at_900_pixels():
    """The font scale is H / 600 clamped to 1.5: an 1800-high tag box is as high as a 900-high one."""
    small = draw_tag(np.zeros((900, 400, 3), np.uint8), "key frame")
    large = draw_tag(np.zeros((1800, 400, 3), np.uint8), "key frame")
    assert large[3] - large[1] == small[3] - small[1]


@pytest.mark.parametrize("draw", [lambda im: draw_legend(im, np.zeros(im.shape[:2], np.uint8), make_palette(1)),
                                  lambda im: draw_tag(im, "key frame")])
def test_drawing_in_place_refuses_a_non_contiguous_image(draw):
    """OpenCV cannot draw in place on a strided view (it would draw on a copy): refused."""
    with pytest.raises(ValueError, match="in place"):
        draw(np.zeros((272, 1280, 3), np.uint8)[:, ::2])


def test_legend_swatch_is_the_class_colour_in_rgb():
    """The swatch is drawn in the palette's RGB colour, channels not swapped."""
    pal = np.array([[250, 10, 120], [10, 200, 30]], np.uint8)
    labels = np.zeros((272, 640), np.uint8)
    image = np.zeros((272, 640, 3), np.uint8)
    x0, y0, x1, y1 = draw_legend(image, labels, pal).box
    box = image[y0:y1, x0:x1]
    assert (box == pal[0]).all(-1).sum() >= 16  # the swatch's inside
    assert not (box == pal[0][::-1]).all(-1).any()


def test_legend_refuses_class_names_not_one_per_colour():
    image, labels = _scene(40, 60)
    pal = make_palette(11)
    for names in ([f"c{i}" for i in range(10)], [f"c{i}" for i in range(12)]):  # too many names passed
        with pytest.raises(ValueError, match="class_names"):
            overlay(image, labels, pal, class_names=names)
        with pytest.raises(ValueError, match="class_names"):
            draw_legend(image.copy(), labels, pal, names)


@pytest.mark.parametrize("max_entries", [0, -1, 2.0, True])
def test_legend_refuses_max_entries_below_one_or_not_an_int(max_entries):
    image, labels = _scene(40, 60)
    with pytest.raises(ValueError, match="max_entries"):
        draw_legend(image.copy(), labels, make_palette(11), max_entries=max_entries)


@pytest.mark.parametrize("w", [36, 40, 48, 64, 400])
def test_the_more_line_never_cuts_its_count(w, monkeypatch):
    """On a narrow image "+N more" becomes "+N", or no line, never "+4.." for 49 hidden classes."""
    h = 200
    labels = (np.arange(h * w).reshape(h, w) % 60).astype(np.uint8)  # 60 classes present
    drawn = _drawn_texts(monkeypatch)
    legend = draw_legend(np.zeros((h, w, 3), np.uint8), labels, make_palette(60))
    assert legend.hidden > 0
    counts = [t for t in drawn if t.startswith("+")]
    assert counts in ([], [f"+{legend.hidden} more"], [f"+{legend.hidden}"]), counts
    if w == 400:
        assert counts == [f"+{legend.hidden} more"]


def test_a_narrow_legend_shortens_its_count_line_to_plus_n(monkeypatch):
    """Between the widths that fit "+N more" and those that fit no count, the line reads "+N"."""
    h, forms = 200, set()
    for w in range(30, 120, 2):
        drawn = _drawn_texts(monkeypatch)
        labels = (np.arange(h * w).reshape(h, w) % 60).astype(np.uint8)
        legend = draw_legend(np.zeros((h, w, 3), np.uint8), labels, make_palette(60))
        counts = [t for t in drawn if t.startswith("+")]
        forms.add("short" if counts == [f"+{legend.hidden}"] else "long" if counts else "none")
    assert "short" in forms and "long" in forms


# ------------------------------------------------------------------ property-based (hypothesis)
# viz keeps no state between calls: each example is one call on random sizes, label dtypes and
# values (void 255, out-of-range, negative), palettes, names, corners and tags, checked against
# the docstrings.

_FUZZ = settings(max_examples=100, deadline=None)
_NAME_POOL = ["", "road", "caf\u00e9", "\u65e5\u672c\u8a9e", "a very long class name " * 12, "sign_symbol", "W" * 40]


@st.composite
def _fuzz_scene(draw, max_h: int = 60, max_w: int = 90):
    """(image, labels, palette, class_names): an (H, W, 3) uint8 image (C-contiguous or a strided
    view), an (H, W) label map of a random integer dtype (C-contiguous or not) and a K-colour
    palette (make_palette, a random array or a list of lists), K in 1..300."""
    h, w = draw(st.integers(1, max_h)), draw(st.integers(1, max_w))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k = draw(st.sampled_from([1, 2, 11, 40, 255, 256, 300]) | st.integers(1, 300))
    kind = draw(st.sampled_from(["generated", "based", "uint8", "int64", "lists"]))
    if kind in ("generated", "based"):
        base = rng.integers(0, 256, (int(rng.integers(0, k + 1)), 3)).tolist() if kind == "based" else None
        palette = make_palette(k, base)
    else:
        palette = rng.integers(0, 256, (k, 3)).astype(np.uint8 if kind == "uint8" else np.int64)
        palette = palette.tolist() if kind == "lists" else palette
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.int64]))
    info = np.iinfo(dtype)
    values = [v for v in draw(st.lists(st.sampled_from([0, 1, 2, 3, 10, 11, k - 1, k, k + 1, 254, 255, 256, 299,
                                                        300, -1, -300, int(info.max), int(info.min)]),
                                       min_size=1, max_size=6)) if info.min <= v <= info.max]
    values = values or [0]
    weights = rng.random(len(values)) ** 3 + 1e-3  # uneven class sizes, so that a legend has to choose
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    shape = {"contiguous": (h, w), "transposed": (w, h), "strided": (h, 2 * w)}[layout]
    labels = rng.choice(np.array(values, dtype), size=shape, p=weights / weights.sum())
    labels = {"contiguous": labels, "transposed": labels.T, "strided": labels[:, ::2]}[layout]
    image = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    image = image[..., :3] if draw(st.booleans()) else np.ascontiguousarray(image[..., :3])
    names = None
    if draw(st.booleans()):
        special = draw(st.lists(st.sampled_from(_NAME_POOL) | st.text(max_size=30), min_size=1, max_size=4))
        names = [special[i % len(special)] if i % 3 == 0 else f"c{i}" for i in range(k)]
    return image, labels, palette, names


def _valid(labels: np.ndarray, k: int) -> np.ndarray:
    """Labels in 0..K-1 (the rest is void), computed independently of viz."""
    wide = labels.astype(np.int64) if labels.dtype != np.uint64 else labels
    return (wide >= 0) & (wide < k)


def _present(labels: np.ndarray, k: int) -> list[int]:
    return sorted(int(v) for v in np.unique(labels) if 0 <= int(v) < k)


def _inside_with_margin(box, h: int, w: int) -> bool:
    pad = viz._text_metrics(h)[4]
    return pad <= box[0] < box[2] <= w - pad and pad <= box[1] < box[3] <= h - pad


@_FUZZ
@given(scene=_fuzz_scene())
def test_fuzz_colorize_maps_each_label_to_its_palette_colour_and_void_to_black(scene):
    """colorize: (H, W, 3) uint8, each label in 0..K-1 its palette colour, void/negative black;
    labels and palette untouched."""
    _, labels, palette, _ = scene
    labels_before, palette_before = labels.copy(), np.array(palette)
    out = colorize(labels, palette)
    pal = np.asarray(palette).astype(np.uint8)
    assert out.shape == (*labels.shape, 3) and out.dtype == np.uint8
    valid = _valid(labels, len(pal))
    np.testing.assert_array_equal(out[valid], pal[labels[valid].astype(np.int64)])
    np.testing.assert_array_equal(out[~valid], 0)
    np.testing.assert_array_equal(labels, labels_before)
    np.testing.assert_array_equal(np.array(palette), palette_before)


@_FUZZ
@given(scene=_fuzz_scene(), corner=st.sampled_from(LEGEND_CORNERS),
       max_entries=st.integers(1, 14) | st.just(10**6))
def test_fuzz_legend_lists_the_largest_present_classes_inside_its_box(scene, corner, max_entries):
    """draw_legend: only classes present and not void, in class-ID order, the largest by pixel
    count when capped, listed + hidden = present, at most max_entries lines with the "+N"
    line, an ASCII "+N more" / "+N" count never cut; box in its corner with a margin; nothing
    drawn outside the box; legend_entries = every present class."""
    image, labels, palette, names = scene
    k = len(np.asarray(palette))
    present = _present(labels, k)
    shown_names = names if names is not None else [f"class_{i}" for i in range(k)]
    assert legend_entries(labels, k, names) == [(i, shown_names[i]) for i in present]
    h, w = labels.shape
    canvas = np.ascontiguousarray(image)
    before, labels_before = canvas.copy(), labels.copy()
    texts: list[str] = []
    with mock.patch.object(viz.cv2, "putText", _recording_put_text(texts)):
        legend = draw_legend(canvas, labels, palette, names, corner=corner, max_entries=max_entries)
    np.testing.assert_array_equal(labels, labels_before)
    if legend.box is None:
        assert legend.entries == [] and legend.hidden == 0 and texts == []
        np.testing.assert_array_equal(canvas, before)
        return
    assert present, "a legend drawn with no class present"
    x0, y0, x1, y1 = legend.box
    assert _inside_with_margin(legend.box, h, w), (legend.box, h, w)
    assert (x0 == viz._text_metrics(h)[4]) == corner.endswith("left") or x0 == w - x1
    outside = np.ones((h, w), bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(canvas[outside], before[outside])
    ids = [i for i, _ in legend.entries]
    assert ids == sorted(set(ids)) and set(ids) <= set(present)
    assert legend.entries == [(i, shown_names[i]) for i in ids]
    assert len(ids) + legend.hidden == len(present) and len(ids) >= 1
    counts = {i: int((labels.astype(np.int64) == i).sum()) for i in present}
    hidden_ids = set(present) - set(ids)
    if hidden_ids:
        assert min(counts[i] for i in ids) >= max(counts[i] for i in hidden_ids), (counts, ids)
    count_lines = texts[len(ids):]
    assert len(texts) == len(ids) + len(count_lines) <= max(max_entries, 1)
    if legend.hidden and max_entries >= 2:
        assert len(ids) <= max_entries - 1
    assert count_lines in ([], [f"+{legend.hidden} more"], [f"+{legend.hidden}"]) and (legend.hidden or not count_lines)
    for (i, name), line in zip(legend.entries, texts):
        ascii_name = "".join(c if 32 <= ord(c) < 127 else "?" for c in name)
        assert all(32 <= ord(c) < 127 for c in line)
        assert line == ascii_name or (line.endswith("..") and ascii_name.startswith(line[:-2])), (name, line)


@_FUZZ
@given(scene=_fuzz_scene(), corner=st.sampled_from(LEGEND_CORNERS), max_entries=st.integers(1, 14),
       alpha=st.sampled_from([0.0, 1.0, 0.5]) | st.floats(-0.5, 1.5, allow_nan=False),
       tag=st.none() | st.sampled_from(["key frame", "propagated +3", ""]) | st.text(max_size=40)
       | st.builds(frame_tag, st.booleans(), st.integers(1, 10**6)))
def test_fuzz_overlay_blends_only_outside_void_and_draws_only_legend_and_tag(scene, corner, max_entries, alpha, tag):
    """overlay: alpha outside 0..1 is a ValueError; else a new (H, W, 3) uint8 image, input
    image and labels untouched; void keeps the image; alpha 0 = image, alpha 1 = the colours,
    between a rounded blend; outside the legend and tag boxes it is the plain blend; the
    legend stays inside the image and the tag (in the other corner of the legend's side, or
    the other row) never overlaps it."""
    image, labels, palette, names = scene
    image_before, labels_before = image.copy(), labels.copy()
    kwargs = dict(alpha=alpha, class_names=names, legend_corner=corner, max_legend_entries=max_entries, tag=tag)
    if not 0.0 <= alpha <= 1.0:
        with pytest.raises(ValueError, match="alpha"):
            overlay(image, labels, palette, **kwargs)
        return
    out = overlay(image, labels, palette, **kwargs)
    np.testing.assert_array_equal(image, image_before)
    np.testing.assert_array_equal(labels, labels_before)
    h, w = labels.shape
    assert out.shape == (h, w, 3) and out.dtype == np.uint8 and not np.shares_memory(out, image)
    pal = np.asarray(palette).astype(np.uint8)
    valid = _valid(labels, len(pal))
    plain = overlay(image, labels, palette, alpha=alpha, legend=False)
    np.testing.assert_array_equal(plain[~valid], image[~valid])
    colours = pal[labels[valid].astype(np.int64)]
    if alpha == 0.0:
        np.testing.assert_array_equal(plain, image)
    elif alpha == 1.0:
        np.testing.assert_array_equal(plain[valid], colours)
    else:
        blend = (1 - alpha) * image[valid].astype(float) + alpha * colours.astype(float)
        assert np.abs(plain[valid].astype(float) - blend).max(initial=0) <= 1
    legend = draw_legend(plain.copy(), labels, palette, names, corner=corner, max_entries=max_entries)
    changed = np.any(out != plain, axis=-1)
    allowed = np.zeros((h, w), bool)
    if legend.box is not None:
        assert _inside_with_margin(legend.box, h, w)
        x0, y0, x1, y1 = legend.box
        allowed[y0:y1, x0:x1] = True
    outside_legend = changed & ~allowed
    if not tag:
        assert not outside_legend.any()
        return
    if outside_legend.any():  # the tag: one box, in the corner opposite the legend's, apart from it
        ys, xs = np.nonzero(outside_legend)
        drawn = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        assert _inside_with_margin(drawn, h, w), (drawn, h, w)
        assert legend.box is None or not _meet(drawn, legend.box), (drawn, legend.box)
        pad = viz._text_metrics(h)[4]
        if corner.endswith("left"):
            assert drawn[2] > w // 2 or drawn[2] >= w - pad - 1
        else:
            assert drawn[0] < w // 2 or drawn[0] <= pad + 1


@st.composite
def _boxes(draw, h: int, w: int):
    """An (x0, y0, x1, y1) box (x1, y1 exclusive) of at least one pixel, about an (H, W) image."""
    x0, y0 = draw(st.integers(-5, w)), draw(st.integers(-5, h))
    return x0, y0, x0 + draw(st.integers(1, w + 5)), y0 + draw(st.integers(1, h + 5))


@_FUZZ
@given(text=st.sampled_from(["key frame", "propagated +12", ""]) | st.text(max_size=60),
       hw=st.tuples(st.integers(1, 80), st.integers(1, 120)), corner=st.sampled_from(LEGEND_CORNERS), data=st.data())
def test_fuzz_tag_stays_in_its_corner_off_the_avoided_box(text, hw, corner, data):
    """draw_tag: None, or a box inside the image with a margin, on the corner's side (left/right),
    not meeting ``avoid``; only the box's pixels change."""
    h, w = hw
    avoid = data.draw(st.none() | _boxes(h, w), label="avoid")
    image = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    before = image.copy()
    box = draw_tag(image, text, corner, avoid=avoid)
    if box is None:
        np.testing.assert_array_equal(image, before)
        return
    assert _inside_with_margin(box, h, w), (box, h, w)
    assert avoid is None or not _meet(box, avoid), (box, avoid)
    pad = viz._text_metrics(h)[4]
    assert (box[0] == pad) if corner.endswith("left") else (box[2] == w - pad)
    outside = np.ones((h, w), bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    np.testing.assert_array_equal(image[outside], before[outside])


_BAD_INPUTS = {
    "float labels": lambda lb, im, pal: dict(labels=lb.astype(np.float32)),
    "bool labels": lambda lb, im, pal: dict(labels=lb > 0),
    "3-D labels": lambda lb, im, pal: dict(labels=lb[..., None]),
    "1-D labels": lambda lb, im, pal: dict(labels=lb.ravel()),
    "empty labels": lambda lb, im, pal: dict(labels=lb[:0]),
    "list labels": lambda lb, im, pal: dict(labels=lb.tolist()),
    "palette (K, 4)": lambda lb, im, pal: dict(palette=np.zeros((len(pal), 4), np.uint8)),
    "palette of no colour": lambda lb, im, pal: dict(palette=np.zeros((0, 3), np.uint8)),
    "palette 256": lambda lb, im, pal: dict(palette=np.full((len(pal), 3), 256)),
    "palette -1": lambda lb, im, pal: dict(palette=np.full((len(pal), 3), -1)),
    "palette fractional": lambda lb, im, pal: dict(palette=np.full((len(pal), 3), 0.5)),
    "palette nan": lambda lb, im, pal: dict(palette=np.full((len(pal), 3), np.nan)),
    "palette strings": lambda lb, im, pal: dict(palette=[["a", "b", "c"]] * len(pal)),
    "ragged palette": lambda lb, im, pal: dict(palette=[[1, 2, 3], [4, 5]]),
    "float image": lambda lb, im, pal: dict(image=im.astype(np.float32)),
    "grey image": lambda lb, im, pal: dict(image=im[..., 0]),
    "RGBA image": lambda lb, im, pal: dict(image=np.concatenate([im, im[..., :1]], -1)),
    "image of another size": lambda lb, im, pal: dict(image=np.zeros((im.shape[0] + 1, im.shape[1], 3), np.uint8)),
    "alpha nan": lambda lb, im, pal: dict(alpha=float("nan")),
    "alpha -inf": lambda lb, im, pal: dict(alpha=-float("inf")),
    "alpha 1.01": lambda lb, im, pal: dict(alpha=1.01),
    "too few names": lambda lb, im, pal: dict(class_names=["x"] * (len(pal) - 1)),
    "too many names": lambda lb, im, pal: dict(class_names=["x"] * (len(pal) + 1)),
    "corner middle": lambda lb, im, pal: dict(corner="middle"),
    "corner None": lambda lb, im, pal: dict(corner=None),
    "max_entries 0": lambda lb, im, pal: dict(max_entries=0),
    "max_entries 2.0": lambda lb, im, pal: dict(max_entries=2.0),
    "max_entries True": lambda lb, im, pal: dict(max_entries=True),
}


@pytest.mark.parametrize("bad", sorted(_BAD_INPUTS))
@settings(max_examples=8, deadline=None)
@given(scene=_fuzz_scene(max_h=20, max_w=30))
def test_fuzz_bad_input_is_a_value_error_and_modifies_nothing(scene, bad):
    """Each documented bad input (labels, palette, image, alpha, names, corner, max_entries) of
    each function is a ValueError/TypeError, nothing else, and leaves the inputs as they were;
    the same call with the good inputs then works. overlay places its tag by legend_corner
    with or without a legend, so a bad corner is refused there too."""
    image, labels, palette, _ = scene
    image = np.ascontiguousarray(image)
    args = dict(labels=labels, image=image, palette=palette, alpha=0.5, class_names=None, corner="top-left",
                max_entries=12)
    good = dict(args)
    args.update(_BAD_INPUTS[bad](labels, image, np.asarray(palette)))
    calls = {
        "colorize": (lambda a: colorize(a["labels"], a["palette"]), {"labels", "palette"}),
        "overlay": (lambda a: overlay(a["image"], a["labels"], a["palette"], alpha=a["alpha"],
                                      class_names=a["class_names"], legend_corner=a["corner"],
                                      max_legend_entries=a["max_entries"], tag="key frame"), set(args)),
        "overlay without legend": (lambda a: overlay(a["image"], a["labels"], a["palette"], alpha=a["alpha"],
                                                     legend=False, legend_corner=a["corner"], tag="key frame"),
                                   set(args) - {"class_names", "max_entries"}),
        "draw_legend": (lambda a: draw_legend(a["image"], a["labels"], a["palette"], a["class_names"],
                                              corner=a["corner"], max_entries=a["max_entries"]),
                        set(args) - {"alpha"}),
        "legend_entries": (lambda a: legend_entries(a["labels"], len(np.asarray(good["palette"])),
                                                    a["class_names"]), {"labels", "class_names"}),
        "draw_tag": (lambda a: draw_tag(a["image"], "key frame", a["corner"]), {"image", "corner"}),
        "make_palette": (lambda a: make_palette(len(np.asarray(good["palette"])), a["palette"]), {"palette"}),
    }
    before = {key: np.array(val, copy=True) for key, val in good.items() if isinstance(val, np.ndarray)}
    for call, (run, used) in calls.items():
        changed = {key for key in args if args[key] is not good[key]}
        if (call == "make_palette" and bad == "palette of no colour") or (bad == "image of another size"
                                                                         and "labels" not in used):
            changed = set()  # an empty base counts as None; an image alone has no size to match
        if changed & used:
            try:
                run(args)
            except (ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"{call} accepted {bad}")
        for key, val in before.items():
            np.testing.assert_array_equal(good[key], val)
        run(dict(good, image=good["image"].copy()))
