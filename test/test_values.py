"""mpvss_ros.values: a caller's value named in an error, even one Python cannot print; the number
checks shared by configurations, parameters, schedulers and training options."""

import fractions
import math

import numpy as np
import pytest

from mpvss_ros.values import INT64_MAX, INT64_MIN, fits_int64, is_finite, is_integer, is_real, shown


@pytest.mark.parametrize("value", [3, -2.5, "cuda:0", None, [1, "a"], {"k": (1, 2)}, 10**4000])
def test_printable_values_are_their_repr(value):
    assert shown(value) == repr(value)


def test_integers_past_the_digit_limit_are_described_not_raised():
    """repr() of an int of more than 4300 digits raises ValueError (CPython 3.11+)."""
    with pytest.raises(ValueError):
        repr(10**5000)
    assert shown(10**5000) == shown(-(10**5000)) == "an integer too long to print"
    assert shown([1, 10**5000]) == "a list holding an integer too long to print"
    assert shown({"a": (10**5000,)}) == "a dict holding an integer too long to print"


def test_other_errors_of_a_repr_are_not_hidden():
    class Broken:
        def __repr__(self):
            raise RuntimeError("broken repr")

    with pytest.raises(RuntimeError, match="broken repr"):
        shown(Broken())


@pytest.mark.parametrize("value, finite", [(0, True), (-2.5, True), (10**308, True), (10**400, False),
                                           pytest.param(-(10**5000), False, id="-10**5000"), (math.inf, False), (math.nan, False),
                                           (np.float32(1.5), True), (np.float64("inf"), False),
                                           (fractions.Fraction(1, 3), True), (1e308, True)])
def test_is_finite_says_false_for_ints_no_float_holds(value, finite):
    """math.isfinite raises OverflowError past about 1.8e308; is_finite answers."""
    assert is_finite(value) is finite


def test_is_finite_of_no_number_raises_type_error_as_math_does():
    with pytest.raises(TypeError):
        is_finite("1.0")


@pytest.mark.parametrize("value, integer, real", [(3, True, True), (np.int64(3), True, True), (np.uint8(3), True, True),
                                                  (True, False, False), (np.bool_(True), False, False),
                                                  (3.0, False, True), (np.float32(3), False, True),
                                                  (fractions.Fraction(1, 2), False, True), ("3", False, False),
                                                  (None, False, False), (np.array(3), False, False), (1j, False, False)])
def test_integers_and_reals_leave_bools_out(value, integer, real):
    assert (is_integer(value), is_real(value)) == (integer, real)


def test_fits_int64_is_the_signed_64_bit_range():
    assert (INT64_MIN, INT64_MAX) == (-(2**63), 2**63 - 1)
    assert fits_int64(INT64_MIN) and fits_int64(INT64_MAX) and fits_int64(0)
    assert not fits_int64(INT64_MAX + 1) and not fits_int64(INT64_MIN - 1) and not fits_int64(10**5000)


def test_callers_name_an_integer_too_long_to_print():
    """Each check that names the caller's integer in its message uses shown(): a negative integer
    past the digit limit gave str()'s own ValueError instead of the check's message."""
    from mpvss_ros.evaluation.bootstrap import circular_block_resamples
    from mpvss_ros.evaluation.pair_table import PairTable
    from mpvss_ros.propagation import OpticalFlowPropagator
    from mpvss_ros.runtime.base import SizeCache
    from mpvss_ros.runtime.cache import prune_cache
    from mpvss_ros.evaluation.study import load_sequence
    from mpvss_ros.io import check_pixel_limit
    from mpvss_ros.io.video import check_fps
    from mpvss_ros.viz import draw_legend, legend_entries, make_palette, overlay

    huge = -(10**5000)
    with pytest.raises(ValueError, match="max_pixels must be a whole number of pixels >= 1, got an integer too long"):
        check_pixel_limit(huge, "max_pixels")
    with pytest.raises(ValueError, match="num_classes must be in 1..[0-9]+, got an integer too long to print"):
        make_palette(huge)
    image, labels = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)
    with pytest.raises(ValueError, match="max_entries must be an int >= 1, got an integer too long to print"):
        draw_legend(image, labels, make_palette(3), max_entries=huge)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got an integer too long to print"):
        load_sequence(".", ".", num_classes=huge)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got an integer too long to print"):
        legend_entries(labels, huge)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got an integer too long to print"):
        overlay(image, labels, make_palette(3), alpha=-huge)  # OverflowError escaped float()
    for fps, words in ((10**400, "got 1000"), (-huge, "got an integer too long to print")):
        with pytest.raises(ValueError, match=f"fps must be a positive finite number, {words}"):
            check_fps(fps)  # 10**400: float() raised OverflowError
    for kwargs, words in (({"frames": huge, "block": 1, "samples": 1}, "frames must be >= 1"),
                          ({"frames": 3, "block": huge, "samples": 1}, r"block must be in 1\.\.3"),
                          ({"frames": 3, "block": 1, "samples": huge}, "samples must be >= 1")):
        with pytest.raises(ValueError, match=f"{words}.*, got an integer too long to print"):
            circular_block_resamples(**kwargs)
    with pytest.raises(ValueError, match="grid_stride must be >= 1 or None, got an integer too long to print"):
        OpticalFlowPropagator(grid_stride=huge)
    with pytest.raises(ValueError, match=r"flow_scale must be in \[.*\], got an integer too long to print"):
        OpticalFlowPropagator(flow_scale=-huge)
    with pytest.raises(ValueError, match="capacity must be >= 1, got an integer too long to print"):
        SizeCache(capacity=huge)
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got an integer too long to print"):
        prune_cache(".", huge)
    table = PairTable(np.zeros((3, 2, 2, 2), np.int64), "copy", "labels", ["a", "b"])
    for keys in ([huge, 0], [0, -huge]):
        with pytest.raises(ValueError, match="key frame an integer too long to print is outside the clip's 3 frames"):
            table.confusion(keys)
