"""mpvss_ros.values: a caller's value named in an error, even one Python cannot print; the number
checks shared by configurations, parameters, schedulers and training options."""

import contextlib
import decimal
import fractions
import math
import re
import resource
import signal
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from mpvss_ros.config import ConfigError, model_config_from_dict
from mpvss_ros.evaluation.bootstrap import circular_block_resamples, paired_miou_difference
from mpvss_ros.evaluation.metrics import ConfusionMatrix, VideoConsistency
from mpvss_ros.evaluation.pair_table import PairTable, local_search
from mpvss_ros.io import check_pixel_limit
from mpvss_ros.io.video import VideoWriter, check_fps, open_source
from mpvss_ros.propagation import CopyPropagator, OpticalFlowPropagator
from mpvss_ros.ros import conversions
from mpvss_ros.ros.parameters import reconfigure, validate
from mpvss_ros.runtime.base import SizeCache
from mpvss_ros.runtime.cache import cache_budget_bytes, prune_cache
from mpvss_ros.scheduling import AdaptiveScheduler, FixedIntervalScheduler, SceneScorer, parse_schedule, schedule_key_frames
from mpvss_ros.segmenter import FrameError, VideoSegmenter
from mpvss_ros.training.motion_trainer import MotionTrainOptions
from mpvss_ros.training.trainer import TrainOptions
from mpvss_ros.viz import draw_legend, draw_tag, frame_tag, legend_entries, make_palette, overlay
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
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1 .*, got an integer too long to print"):
        legend_entries(labels, huge)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got an integer too long to print"):
        overlay(image, labels, make_palette(3), alpha=-huge)  # OverflowError escaped float()
    for fps, words in ((10**400, "got 1000"), (-huge, "got an integer too long to print")):
        with pytest.raises(ValueError, match=f"fps must be a positive finite number, {words}"):
            check_fps(fps)  # 10**400: float() raised OverflowError
    for kwargs, words in (({"frames": huge, "block": 1, "samples": 1}, "frames must be >= 1"),
                          ({"frames": 3, "block": huge, "samples": 1}, r"block must be in 1\.\.3"),
                          ({"frames": 3, "block": 1, "samples": huge}, "samples must be >= 1")):
        with pytest.raises(ValueError, match=f"{words}.*, got an integer too long to print"):
            circular_block_resamples(**kwargs)
    with pytest.raises(ValueError, match="grid_stride must be a finite number >= 1 or None, got an integer too long to print"):
        OpticalFlowPropagator(grid_stride=huge)
    with pytest.raises(ValueError, match=r"flow_scale must be in \[.*\], got an integer too long to print"):
        OpticalFlowPropagator(flow_scale=-huge)
    with pytest.raises(ValueError, match="capacity must be an integer >= 1, got an integer too long to print"):
        SizeCache(capacity=huge)
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 0, got an integer too long to print"):
        prune_cache(".", huge)
    table = PairTable(np.zeros((3, 2, 2, 2), np.int64), "copy", "labels", ["a", "b"])
    for keys in ([huge, 0], [0, -huge]):
        with pytest.raises(ValueError, match="key frame an integer too long to print is outside the clip's 3 frames"):
            table.confusion(keys)


# --------------------------------------------------------------------------------------------
# Every public entry point that takes a number from a caller, fed the extreme values one at a time
# --------------------------------------------------------------------------------------------

#: Numbers (and would-be numbers) a caller may pass by mistake: ints no float holds and ints past
#: the digit limit, the 64-bit edges, NaN and the infinities, bools, numpy scalars, Fraction,
#: Decimal, complex, digit strings and None.
EXTREME_VALUES = [0, -1, 1, 3, 2**31, INT64_MAX, 2**63, 2**64, INT64_MIN - 1, 10**400, -(10**400), 10**5000,
                  -(10**5000), math.nan, math.inf, -math.inf, 0.0, 0.5, -0.5, 1e-300, 1e308, True, False,
                  np.int64(INT64_MAX), np.int64(INT64_MIN), np.uint64(2**64 - 1), np.int8(-1), np.float32("inf"),
                  np.float64("nan"), np.float32(0.5), np.bool_(True), np.bool_(False), fractions.Fraction(1, 3),
                  fractions.Fraction(10**400, 3), decimal.Decimal("0.5"), decimal.Decimal("nan"),
                  decimal.Decimal("1e400"), 1j, complex(2, 0), "3", "0.5", "1e400", "nan", "9" * 5000, None]

#: The extreme values, small integers, any float, and integers about the 64-bit edge and past it.
extreme_values = (st.sampled_from(EXTREME_VALUES) | st.integers(-3, 40) | st.floats()
                  | st.integers(INT64_MAX - 2, 2**64 + 2) | st.integers(2**64, 10**310)
                  | st.integers(-(10**310), -(2**64)))

#: Python's, numpy's and OpenCV's own words: a message holding one of them is not the entry point's.
PYTHON_TEXTS = ("Exceeds the limit", "integer string conversion", "too large to convert", "cannot convert float",
                "not supported between", "could not convert", "invalid literal", "must be real number",
                "cannot be interpreted as an integer", "Maximum allowed dimension", "unsupported operand",
                "object is not", "OpenCV(", "int too big", "out of bounds for", "array is too big")


def must_refuse(kind: str, value) -> bool:
    """Whether an argument of ``kind`` must refuse ``value`` (a caller's mistake, never a setting).

    ``real``: a number; NaN, a bool, text, None and complex numbers are refused. ``int``: an
    integral number too (no infinity, no fraction). ``int64``: one within 64 bits too (a tensor
    size, a seed, a ROS int64). A trailing ``?``: None is valid (no limit, no setting). ``flag``:
    0/1 or a bool. ``text``: the value arrives as text; no rule here.
    """
    if kind == "text":
        return False
    if value is None:
        return not kind.endswith("?")
    if isinstance(value, (bool, np.bool_)):
        return kind != "flag"
    if isinstance(value, decimal.Decimal):  # no numbers.Real: refusing it is fine, accepting it too
        return value.is_nan()
    if not is_real(value) or value != value:  # text, complex, NaN
        return True
    if kind.startswith("int"):
        if not (is_integer(value) or (is_finite(value) and value == int(value))):
            return True
        return kind.startswith("int64") and not fits_int64(int(value))
    return False


def _tiny_frames(n: int = 2) -> list[np.ndarray]:
    """``n`` different 24 x 32 RGB frames."""
    return [np.full((24, 32, 3), 40 * i, np.uint8) for i in range(n)]


def _schedule(scheduler) -> list[int]:
    """The key frames ``scheduler`` picks in three tiny frames at 10 fps."""
    return schedule_key_frames(scheduler, _tiny_frames(3), 10.0)


def _segment(band_model, propagator, stamps=(0.0, 0.1)) -> None:
    """Two frames through a VideoSegmenter on the fake band model (a key frame, then propagation)."""
    segmenter = VideoSegmenter(band_model, propagator, FixedIntervalScheduler(5))
    for frame, stamp in zip(_tiny_frames(), stamps):
        segmenter.push(frame, stamp)


def _validated(options_cls, field: str, wrap=None, **required):
    """A call that validates ``options_cls`` with the drawn value (``wrap``ped, e.g. into a crop) as ``field``."""
    return lambda ctx, v: options_cls(**required, **{field: wrap(v) if wrap else v}).validate()


def _model_config(section: str | None, field: str):
    """A call that builds a model configuration with the drawn value as ``section.field``."""
    def build(ctx, v):
        model_config_from_dict({"name": "fuzz", "num_classes": 3, **({section: {field: v}} if section else {field: v})})
    return build


def _image_field(field: str):
    """A call that converts a 2 x 2 rgb8 Image whose ``field`` holds the drawn value."""
    def convert(ctx, v):
        msg = ctx.image_msg()
        setattr(msg, field, v)
        conversions.image_to_rgb(msg)
    return convert


def _cache_budget(ctx, v):
    """cache_budget_bytes with the drawn value (as written by repr where it is no text) in $MPVSS_CACHE_MAX_MB."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPVSS_CACHE_MAX_MB", v if isinstance(v, str) else shown(v))
        cache_budget_bytes()


def _spec(prefix: str, v) -> str:
    """A schedule spec ``prefix`` + the drawn value as text."""
    return prefix + (v if isinstance(v, str) else shown(v))


def _pair_table() -> PairTable:
    return PairTable(np.ones((4, 3, 2, 2), np.int64), "copy", "labels", ["a", "b"])


def _labels() -> np.ndarray:
    return np.zeros((2, 2), np.int64)


_TRAIN = {"run_dir": "run"}
_MOTION = {"run_dir": "run", "init_checkpoint": "x.pt"}

#: (entry point and the argument that takes the drawn value, the call, the exception it
#: documents, the words its message must hold, the kind of number it takes: see
#: :func:`must_refuse`). The other arguments are valid and small.
NUMBER_ENTRY_POINTS = [
    ("SceneScorer thumb_width", lambda ctx, v: SceneScorer(thumb_width=v).cut_scores(_tiny_frames()),
     ValueError, "thumb_width", "int"),
    ("SceneScorer pixel_scale", lambda ctx, v: SceneScorer(pixel_scale=v).cut_scores(_tiny_frames()),
     ValueError, "pixel_scale", "real"),
    ("SceneScorer bins", lambda ctx, v: SceneScorer(bins=v).cut_scores(_tiny_frames()), ValueError, "bins", "int"),
    ("FixedIntervalScheduler interval", lambda ctx, v: _schedule(FixedIntervalScheduler(v)),
     ValueError, "interval", "int"),
    ("FixedIntervalScheduler max_gap_s", lambda ctx, v: _schedule(FixedIntervalScheduler(2, max_gap_s=v)),
     ValueError, "max_gap_s", "real"),
    ("AdaptiveScheduler scene_threshold", lambda ctx, v: _schedule(AdaptiveScheduler(scene_threshold=v)),
     ValueError, "scene_threshold", "real"),
    ("AdaptiveScheduler min_interval", lambda ctx, v: _schedule(AdaptiveScheduler(min_interval=v, max_interval=2**70)),
     ValueError, "min_interval", "int"),
    ("AdaptiveScheduler max_interval", lambda ctx, v: _schedule(AdaptiveScheduler(max_interval=v)),
     ValueError, "max_interval", "int"),
    ("AdaptiveScheduler cut_threshold", lambda ctx, v: _schedule(AdaptiveScheduler(cut_threshold=v)),
     ValueError, "cut_threshold", "real"),
    ("AdaptiveScheduler max_gap_s", lambda ctx, v: _schedule(AdaptiveScheduler(max_gap_s=v)),
     ValueError, "max_gap_s", "real"),
    ("parse_schedule max_gap_s", lambda ctx, v: _schedule(parse_schedule("fixed:2", max_gap_s=v)),
     ValueError, "max_gap_s", "real"),
    ("parse_schedule min_interval",
     lambda ctx, v: _schedule(parse_schedule("adaptive", min_interval=v, max_interval=2**70)),
     ValueError, "min_interval", "int"),
    ("parse_schedule max_interval", lambda ctx, v: _schedule(parse_schedule("adaptive", max_interval=v)),
     ValueError, "max_interval", "int"),
    ("parse_schedule cut_threshold", lambda ctx, v: _schedule(parse_schedule("adaptive", cut_threshold=v)),
     ValueError, "cut_threshold", "real"),
    ("parse_schedule fixed:N", lambda ctx, v: _schedule(parse_schedule(_spec("fixed:", v))), ValueError, "schedule", "text"),
    ("parse_schedule adaptive:T", lambda ctx, v: _schedule(parse_schedule(_spec("adaptive:", v))),
     ValueError, "schedule", "text"),
    ("schedule_key_frames fps", lambda ctx, v: schedule_key_frames(FixedIntervalScheduler(2), _tiny_frames(), v),
     ValueError, "fps", "real"),
    ("KeyFrameScheduler.decide stamp", lambda ctx, v: FixedIntervalScheduler(2).decide(_tiny_frames(1)[0], v),
     ValueError, "stamp", "real"),
    ("VideoSegmenter.push stamp", lambda ctx, v: _segment(ctx.band_model, CopyPropagator(), (0.0, v)),
     FrameError, "stamp", "real"),
    ("OpticalFlowPropagator flow_scale", lambda ctx, v: _segment(ctx.band_model, OpticalFlowPropagator(flow_scale=v)),
     ValueError, "flow_scale", "real"),
    ("OpticalFlowPropagator grid_stride",
     lambda ctx, v: _segment(ctx.band_model, OpticalFlowPropagator(grid_stride=v)), ValueError, "grid_stride", "real?"),
    ("make_palette num_classes", lambda ctx, v: make_palette(v), ValueError, "num_classes", "int"),
    ("overlay alpha", lambda ctx, v: overlay(*ctx.drawing(), make_palette(3), alpha=v), ValueError, "alpha", "real"),
    ("overlay max_legend_entries", lambda ctx, v: overlay(*ctx.drawing(), make_palette(3), max_legend_entries=v),
     ValueError, "max_entries|max_legend_entries", "int"),
    ("legend_entries num_classes", lambda ctx, v: legend_entries(ctx.drawing()[1], v), ValueError, "num_classes", "int"),
    ("draw_legend max_entries", lambda ctx, v: draw_legend(*ctx.drawing(), make_palette(3), max_entries=v),
     ValueError, "max_entries", "int"),
    ("draw_tag avoid", lambda ctx, v: draw_tag(ctx.drawing()[0], "key frame", avoid=(v, 0, 8, 8)),
     ValueError, "avoid", "real"),
    ("frame_tag frames_since_key", lambda ctx, v: frame_tag(False, v), ValueError, "frames_since_key|key frame", "int"),
    ("ConfusionMatrix num_classes", lambda ctx, v: ConfusionMatrix(v).update(_labels(), _labels()),
     ValueError, "num_classes", "int"),
    ("ConfusionMatrix ignore_index", lambda ctx, v: ConfusionMatrix(3, v).update(_labels(), _labels()),
     ValueError, "ignore_index", "int"),
    ("VideoConsistency n", lambda ctx, v: VideoConsistency(v).update(_labels(), _labels()), ValueError, r"n\b", "int"),
    ("circular_block_resamples frames", lambda ctx, v: circular_block_resamples(v, 1, 2), ValueError, "frames", "int"),
    ("circular_block_resamples block", lambda ctx, v: circular_block_resamples(3, v, 2), ValueError, "block", "int"),
    ("circular_block_resamples samples", lambda ctx, v: circular_block_resamples(3, 1, v), ValueError, "samples", "int"),
    ("circular_block_resamples seed", lambda ctx, v: circular_block_resamples(3, 1, 2, seed=v), ValueError, "seed", "int"),
    ("paired_miou_difference block", lambda ctx, v: paired_miou_difference(*ctx.counts(), block=v, samples=5),
     ValueError, "block", "int"),
    ("paired_miou_difference samples", lambda ctx, v: paired_miou_difference(*ctx.counts(), block=1, samples=v),
     ValueError, "samples", "int"),
    ("paired_miou_difference level", lambda ctx, v: paired_miou_difference(*ctx.counts(), block=1, samples=5, level=v),
     ValueError, "level", "real"),
    ("paired_miou_difference seed", lambda ctx, v: paired_miou_difference(*ctx.counts(), block=1, samples=5, seed=v),
     ValueError, "seed", "int"),
    ("PairTable.confusion key frame", lambda ctx, v: _pair_table().confusion([0, v]), ValueError, "key frame", "int"),
    ("local_search max_gap", lambda ctx, v: local_search(_pair_table(), [0, 2], max_gap=v), ValueError, "max_gap", "int?"),
    ("local_search moves", lambda ctx, v: local_search(_pair_table(), [0, 2], moves=(v,)),
     ValueError, "move|key frame", "int"),
    ("check_pixel_limit", lambda ctx, v: check_pixel_limit(v, "max_pixels"), ValueError, "max_pixels", "int?"),
    ("check_fps", lambda ctx, v: check_fps(v), ValueError, "fps", "real"),
    ("open_source fps", lambda ctx, v: list(open_source(ctx.clip, fps=v)), ValueError, "fps", "real?"),
    ("open_source max_pixels", lambda ctx, v: list(open_source(ctx.clip, max_pixels=v)), ValueError, "max_pixels", "int?"),
    ("VideoWriter fps", lambda ctx, v: VideoWriter(ctx.tmp / "fps.avi", v, (16, 16)).close(), ValueError, "fps", "real"),
    ("VideoWriter size", lambda ctx, v: VideoWriter(ctx.tmp / "size.avi", 10, (v, 16)).close(), ValueError, "size", "int"),
    ("SizeCache capacity", lambda ctx, v: SizeCache(capacity=v).get((2, 2), lambda hw: hw), ValueError, "capacity", "int?"),
    ("prune_cache max_bytes", lambda ctx, v: prune_cache(ctx.tmp / "cache", v), ValueError, "max_bytes", "int"),
    ("cache_budget_bytes MPVSS_CACHE_MAX_MB", _cache_budget, ValueError, "MPVSS_CACHE_MAX_MB", "text"),
    *[(f"TrainOptions {name}", _validated(TrainOptions, name, **_TRAIN), ValueError, name, kind)
      for name, kind in (("steps", "int64"), ("batch_size", "int64"), ("warmup_steps", "int64"), ("num_points", "int64"),
                         ("checkpoint_every", "int64"), ("val_every", "int64"), ("val_frames", "int64"),
                         ("threads", "int64"), ("seed", "int64"), ("lr", "real"), ("backbone_lr_mult", "real"),
                         ("weight_decay", "real"), ("warmup_factor", "real"), ("poly_power", "real"),
                         ("clip_grad_norm", "real"), ("no_object_weight", "real"), ("stop_at", "int64?"),
                         ("max_minutes", "real?"))],
    ("TrainOptions crop", _validated(TrainOptions, "crop", lambda v: (v, 64), **_TRAIN), ValueError, "crop", "int64"),
    ("TrainOptions scale", _validated(TrainOptions, "scale", lambda v: (v, 1.0), **_TRAIN), ValueError, "scale", "real"),
    *[(f"MotionTrainOptions {name}", _validated(MotionTrainOptions, name, **_MOTION), ValueError, name, kind)
      for name, kind in (("steps", "int64"), ("batch_size", "int64"), ("max_gap", "int64"), ("num_points", "int64"),
                         ("seed", "int64"), ("lr", "real"), ("head_lr_mult", "real"), ("flow_weight", "real"),
                         ("video_fraction", "real"), ("synthetic_travel", "real"), ("pseudo_label_confidence", "real"),
                         ("max_minutes", "real?"), ("max_clip_frames", "int64?"))],
    ("MotionTrainOptions crop", _validated(MotionTrainOptions, "crop", lambda v: (64, v), **_MOTION),
     ValueError, "crop", "int64"),
    *[(f"model_config_from_dict {section or ''}.{name}", _model_config(section, name), ConfigError, name, kind)
      for section, name, kind in ((None, "num_classes", "int64"), ("transformer_decoder", "num_queries", "int64"),
                                  ("input", "size_divisibility", "int64"), ("postprocess", "min_query_score", "real"),
                                  ("motion", "image_scale", "real"), ("backbone", "drop_path_rate", "real"))],
    *[(f"ros.parameters.validate {name}", lambda ctx, v, name=name: validate({name: v}), ValueError, name, kind)
      for name, kind in (("optical_flow_scale", "real"), ("scene_threshold", "real"), ("cut_threshold", "real"),
                         ("min_interval", "int64"), ("max_interval", "int64"), ("max_gap_s", "real"),
                         ("input_depth", "int64"), ("max_image_pixels", "int64"), ("max_frame_age_s", "real"),
                         ("overlay_alpha", "real"), ("diagnostics_period_s", "real"), ("threads", "int64"))],
    ("ros.parameters.validate image_size", lambda ctx, v: validate({"image_size": [v, 64]}),
     ValueError, "image_size", "int64"),
    ("ros.parameters.validate palette", lambda ctx, v: validate({"palette": [v]}), ValueError, "palette", "int64"),
    ("ros.parameters.validate autoware_class_ids", lambda ctx, v: validate({"autoware_class_ids": [v]}),
     ValueError, "autoware_class_ids", "int64"),
    ("ros.parameters.reconfigure scene_threshold", lambda ctx, v: reconfigure(validate(), {"scene_threshold": v}),
     ValueError, "scene_threshold", "real"),
    *[(f"image_to_rgb {name}", _image_field(name), conversions.ConversionError, f"{name}|size|pixels|step", kind)
      for name, kind in (("height", "int"), ("width", "int"), ("step", "int"), ("is_bigendian", "flag"))],
    ("image_to_rgb max_pixels", lambda ctx, v: conversions.image_to_rgb(ctx.image_msg(), max_pixels=v),
     conversions.ConversionError, "max_image_pixels|max_pixels", "int?"),
    ("compressed_to_rgb max_pixels", lambda ctx, v: conversions.compressed_to_rgb(ctx.compressed_msg(), max_pixels=v),
     conversions.ConversionError, "max_image_pixels|max_pixels", "int?"),
    ("seconds_to_stamp", lambda ctx, v: conversions.seconds_to_stamp(SimpleNamespace, v),
     conversions.ConversionError, "stamp|time", "real"),
    ("check_autoware_class_ids", lambda ctx, v: conversions.check_autoware_class_ids([v]),
     ValueError, "Autoware class IDs", "int"),
]


@pytest.fixture()
def number_inputs(band_model, frame_folder, tmp_path):
    """Small valid inputs shared by the entry points: the fake band model (lite canvas), a 24 x 32
    image and its labels, a 2-frame PNG clip, per-frame class counts, and a 2 x 2 rgb8 Image and
    PNG CompressedImage (duck-typed messages, as rclpy gives)."""
    counts = np.tile(np.array([[1, 1], [2, 2], [1, 1]], np.int64), (6, 1, 1))  # (T=6, (TP, GT, Pred), K=2)
    png = cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))[1].tobytes()
    return SimpleNamespace(
        band_model=band_model, tmp=tmp_path, clip=frame_folder(_tiny_frames()),
        drawing=lambda: (np.zeros((24, 32, 3), np.uint8), np.arange(24 * 32, dtype=np.uint8).reshape(24, 32) % 3),
        counts=lambda: (counts, counts.copy()),
        image_msg=lambda: SimpleNamespace(header=None, height=2, width=2, encoding="rgb8", is_bigendian=0, step=6,
                                          data=bytes(range(12))),
        compressed_msg=lambda: SimpleNamespace(header=None, format="png", data=png))


def every_extreme_value(test):
    """``test`` runs on each of :data:`EXTREME_VALUES`, in order (explicit examples), before the drawn values."""
    for value in reversed(EXTREME_VALUES):  # the example added last runs first
        test = example(value=value)(test)
    return test


class Hang(Exception):
    """A call that did not answer in time."""


@contextlib.contextmanager
def answers_at_once(seconds: int = 3, spare_bytes: int = 2**31):
    """Within the block, a call that runs ``seconds`` raises :class:`Hang` (SIGALRM) and one that
    allocates more than ``spare_bytes`` of new address space raises MemoryError (RLIMIT_AS), so a
    huge size or count is found, not waited on or paid for in memory."""
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        limit = int(statm.read().split()[0]) * resource.getpagesize() + spare_bytes
    previous = signal.signal(signal.SIGALRM, on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(hard, limit), hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("entry, call, error, words, kind", NUMBER_ENTRY_POINTS, ids=[e[0] for e in NUMBER_ENTRY_POINTS])
@settings(max_examples=30, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
          report_multiple_bugs=False, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=extreme_values)
@every_extreme_value
def test_entry_points_refuse_bad_numbers_by_name(number_inputs, entry, call, error, words, kind, value):
    """Each public entry point given one extreme number (the other arguments valid and small)
    either works, a small use of what it built included, or raises the exception it documents,
    whose message names the setting in its own words (not Python's, numpy's or OpenCV's: no
    OverflowError, TypeError, MemoryError or str()'s digit-limit ValueError) and answers at once;
    a value its kind rules out (NaN, a bool, text, a fraction for a count, ...) is never accepted.
    (The inputs are function-scoped but no example changes them.)"""
    try:
        with answers_at_once():
            call(number_inputs, value)
    except (Hang, MemoryError) as exc:  # whichever comes first: one failure, not two
        raise AssertionError(f"{entry}({shown(value)}) hangs or allocates without bound: {exc!r}") from None
    except error as exc:
        message = shown(str(exc))
        assert not any(text in message for text in PYTHON_TEXTS), f"{entry}({shown(value)}): {message}"
        assert re.search(words, message), f"{entry}({shown(value)}) does not name {words!r}: {message}"
    else:
        assert not must_refuse(kind, value), f"{entry} accepted {shown(value)} ({kind})"
