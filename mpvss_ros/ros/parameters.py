"""The node's parameters: one table, the single source of names, types, defaults and ranges.

ROS-free. Three things are derived from :data:`PARAMETERS` and nothing else:

* ``config/segment.yaml`` (:func:`render_yaml`; a test checks the shipped file against the table,
  and ``python3 -m mpvss_ros.ros.parameters > config/segment.yaml`` regenerates it);
* the node's ``declare_parameter`` calls (:func:`descriptor_fields` gives the description, the
  accepted values and the integer/floating-point range of the ``ParameterDescriptor``);
* validation of the values the node reads back (:func:`validate` -> :class:`NodeConfig`, raising
  ``ValueError`` that names the parameter), and of changes while it runs (:func:`reconfigure`).

The parameters marked ``dynamic`` (the schedule with its thresholds, intervals and ``max_gap_s``,
propagation, the frame-age check, the frame-size limit, overlay opacity and palette) can be changed while the node runs (``ros2 param set``), as Nav2 does for its
dynamic parameters; the others (model, backend, device, input QoS, which outputs exist) are
read-only and take a restart.

Usage::

    cfg = validate({"device": "cuda", "overlay_alpha": 0.3})   # missing names take the defaults
    cfg = reconfigure(cfg, {"schedule": "fixed:5"})            # ValueError for read-only names
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..devices import DEVICE_CHOICES, MAX_CUDA_INDEX, check_device
from ..io import DEFAULT_MAX_IMAGE_PIXELS
from ..values import is_finite, shown

__all__ = [
    "NODE_NAME",
    "BACKENDS",
    "PROPAGATOR_CHOICES",
    "DIS_PRESET_CHOICES",
    "OPTICAL_FLOW_SCALE_RANGE",
    "DEFAULT_CUT_THRESHOLD",
    "RELIABILITIES",
    "ParamSpec",
    "PARAMETERS",
    "SPECS",
    "NodeConfig",
    "defaults",
    "validate",
    "check_parameter",
    "reconfigure",
    "DYNAMIC_PARAMETERS",
    "descriptor_fields",
    "render_yaml",
    "palette_to_rgb",
]

#: The node's name; also the top-level key of ``config/segment.yaml``.
NODE_NAME = "mpvss_segmenter"

#: Inference backends (:func:`mpvss_ros.runtime.load_backend`); kept in step with the runtime.
BACKENDS = ("torch", "onnxruntime", "tensorrt")
#: Numeric precision of the backend.
PRECISIONS = ("fp32", "fp16", "bf16")
#: Kept in step with :data:`mpvss_ros.propagation.PROPAGATORS` (a test checks it); not imported
#: so that reading the table does not import torch.
PROPAGATOR_CHOICES = ("query_flow", "optical_flow", "copy")
#: Kept in step with :data:`mpvss_ros.propagation.DIS_PRESETS` (a test checks it), not imported
#: for the same reason.
DIS_PRESET_CHOICES = ("ultrafast", "fast", "medium")
#: Kept in step with :data:`mpvss_ros.propagation.OPTICAL_FLOW_SCALE_RANGE` (a test checks it).
OPTICAL_FLOW_SCALE_RANGE = (0.1, 1.0)
#: Kept in step with :data:`mpvss_ros.scheduling.DEFAULT_CUT_THRESHOLD` (a test checks it).
DEFAULT_CUT_THRESHOLD = 0.45
#: ``input_reliability`` values: SensorDataQoS-like best effort, reliable, or the RMW default.
RELIABILITIES = ("best_effort", "reliable", "system_default")

# fullmatch: "$" would allow a final "\n"; ASCII digits only (\d also matches e.g. Arabic-Indic digits)
_SCHEDULE_RE = re.compile(r"adaptive|fixed:[1-9][0-9]*")


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter.

    Attributes:
        name: the ROS parameter name.
        type: ``bool``, ``int``, ``float``, ``str`` or ``int_array`` (a list of integers).
        default: the default value (what ``config/segment.yaml`` holds).
        description: one line for ``ros2 param describe``.
        choices: accepted strings, for ``str`` parameters with a fixed set of values.
        min, max: inclusive range for ``int``/``float`` (and per element for ``int_array``).
        constraints: the accepted values in words, when neither choices nor range says it.
        dynamic: may be changed while the node runs (:func:`reconfigure`); False = read-only.
    """

    name: str
    type: str
    default: Any
    description: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    constraints: str = ""
    dynamic: bool = False


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("model", "str", "",
              "Model: a name under config/models/ (mpvss_lite, mpvss_r50, mpvss_swin_base, ...) or a model "
              "YAML file; '' (as the command line's default) = the configuration stored in the weights file, "
              "else the published model whose backbone and classes the file holds (MPVSS R50, R101, "
              "Swin-T/S/B/L; Mask2Former Cityscapes R50), else "
              "mpvss_lite (with weights '': the shipped mpvss_lite model).",
              constraints="a model name, a .yaml file, or ''"),
    ParamSpec("weights", "str", "",
              "Weights file (.pt/.pth of this project or official, detectron2 .pkl); '' = the "
              "model's default weights (the model runs untrained, with a warning, when they are "
              "absent).",
              constraints="a file path, or ''"),
    ParamSpec("onnx_dir", "str", "",
              "An export folder (mpvss export, or a model of your own brought to its contract.json) to run with "
              "backend onnxruntime or tensorrt instead of model/weights, so the robot needs no weights file; "
              "its contract gives classes and palette, and its graphs fix the input size (frames must "
              "letterbox to its valid size). '' = export model/weights.",
              constraints="a folder path, or ''"),
    ParamSpec("device", "str", "auto", "Torch device for inference: auto = the GPU when the backend and "
              "precision below can run on it, else the CPU.",
              constraints=f"{DEVICE_CHOICES} (N <= {MAX_CUDA_INDEX})"),
    ParamSpec("backend", "str", "torch",
              "Inference backend: torch (CPU/CUDA), onnxruntime (CPU, CUDA provider when present) or "
              "tensorrt (cached engines built from the exported ONNX graphs; prebuild with "
              "'mpvss build-engine' so the node does not stall on first start).", choices=BACKENDS),
    ParamSpec("image_size", "int_array", [],
              "Expected camera image size [height, width] in pixels. The onnxruntime and tensorrt "
              "backends prepare their graphs/engines for it at start (tensorrt: minutes once, then "
              "cached) instead of for the model's canvas; [] = the canvas. A frame of another size "
              "is prepared when it comes.",
              min=1, max=16384, constraints="[] or [height, width], each in [1, 16384]"),
    ParamSpec("precision", "str", "fp32",
              "fp32, fp16 (torch: CUDA autocast; tensorrt: FP16 engines with the pixel decoder kept "
              "in fp32; not for onnxruntime) or bf16 (torch on a CPU with bfloat16 instructions, "
              "AVX-512 BF16 or AMX: backbone and motion encoder in bfloat16, the rest in fp32).", choices=PRECISIONS),
    ParamSpec("propagator", "str", "query_flow",
              "How non-key frames are produced from the last key frame: query_flow (MPVSS), "
              "optical_flow (OpenCV DIS) or copy. Weights without a trained motion module (a per-frame "
              "Mask2Former or stage-1 checkpoint, or an onnx_dir export of one) load only when the node starts "
              "with optical_flow or copy, and query_flow is then refused.", choices=PROPAGATOR_CHOICES,
              dynamic=True),
    ParamSpec("optical_flow_preset", "str", "fast",
              "optical_flow only: OpenCV DIS preset. On the CamVid val clip (2 CPU threads, key "
              "interval 5, chained flow) medium gains 0.7 mIoU over fast for about 4.5 ms more per non-key frame.",
              choices=DIS_PRESET_CHOICES, dynamic=True),
    ParamSpec("optical_flow_scale", "float", 0.5,
              "optical_flow only: resolution of the DIS computation relative to the network canvas.",
              min=OPTICAL_FLOW_SCALE_RANGE[0], max=OPTICAL_FLOW_SCALE_RANGE[1], dynamic=True),
    ParamSpec("chain_flow", "bool", True,
              "query_flow and optical_flow: estimate each frame's flow to the previous frame and compose "
              "it back to the key frame (same cost; CamVid val, key interval 5 / 10: query flow +1.89 / "
              "+6.10 mIoU with the shipped model) instead of the paper's direct flow to the key frame (false). "
              "The composed flow's error grows with every frame since the key frame, bounded only by the next "
              "key frame: keep max_interval or fixed:N to tens of frames.", dynamic=True),
    ParamSpec("schedule", "str", "adaptive",
              "Key-frame schedule: 'adaptive' (a hard cut, scene change >= scene_threshold, or "
              "max_interval frames) or 'fixed:N' (every N-th frame; fixed:1 = per-frame segmentation).",
              constraints="adaptive or fixed:N with N >= 1", dynamic=True),
    ParamSpec("scene_threshold", "float", 0.5,
              "Adaptive schedule: scene score (grey change integrated since the key frame) that "
              "triggers a key frame; 0.5 gives about 1 key frame in 5 on a 15 fps drive, higher = "
              "fewer. Hard cuts are keyed by cut_threshold whatever this is.",
              min=0.001, max=100.0, dynamic=True),
    ParamSpec("cut_threshold", "float", DEFAULT_CUT_THRESHOLD,
              "Adaptive schedule: frame-to-frame change that counts as a hard cut and makes a key "
              "frame (hard cuts of a street clip score 0.56-0.85, other frames at most 0.32); above "
              "4 turns cut detection off.",
              min=0.05, max=5.0, dynamic=True),
    ParamSpec("min_interval", "int", 1,
              "Adaptive schedule: frames after a key frame before a cut or a scene change may "
              "trigger the next one.", min=1, max=10000, dynamic=True),
    ParamSpec("max_interval", "int", 10,
              "Adaptive schedule: a key frame is forced after this many frames (chained flow drifts "
              "with the distance from the key frame: see chain_flow).",
              min=1, max=10000, dynamic=True),
    ParamSpec("max_gap_s", "float", 1.0,
              "A gap between consecutive input stamps longer than this (seconds) forces a key "
              "frame.", min=0.001, max=86400.0, dynamic=True),
    ParamSpec("input_compressed", "bool", False,
              "Subscribe to image/compressed (sensor_msgs/CompressedImage) instead of image "
              "(sensor_msgs/Image)."),
    ParamSpec("input_reliability", "str", "best_effort",
              "Input QoS reliability: best_effort (SensorDataQoS-like, matches every publisher), "
              "reliable, or system_default.", choices=RELIABILITIES),
    ParamSpec("input_depth", "int", 1,
              "Input QoS history depth (keep last). The node processes only the newest frame "
              "anyway.", min=1, max=100),
    ParamSpec("max_image_pixels", "int", DEFAULT_MAX_IMAGE_PIXELS,
              "Largest input frame (height x width pixels) that is segmented; a larger one is "
              "skipped and counted (a compressed one from its header, before it is decoded, except a "
              "JPEG whose header neither libjpeg-turbo's probe nor Pillow can read: a 206 kB PNG can "
              "unpack to 8000 x 8000 pixels, 1.7 GB of peak memory to segment on a CPU).",
              min=1, max=2**31 - 1, dynamic=True),
    ParamSpec("max_frame_age_s", "float", 0.5,
              "Drop a frame whose header stamp is older than this (seconds, node clock) when "
              "its turn comes; 0 disables the check (e.g. bags played without --clock).",
              min=0.0, max=86400.0, dynamic=True),
    ParamSpec("publish_colored", "bool", True,
              "Publish ~/colored (rgb8 colour labels) when it has subscribers."),
    ParamSpec("publish_overlay", "bool", True,
              "Publish ~/overlay (labels blended over the image, with a legend and a key frame / "
              "propagated +N tag) when it has "
              "subscribers."),
    ParamSpec("publish_class_masks", "bool", True,
              "Publish ~/class_masks (mpvss_ros/ClassMasks) when it has subscribers."),
    ParamSpec("publish_autoware_mask", "bool", False,
              "Publish ~/autoware_mask when it has subscribers: the labels as Autoware class IDs "
              "(autoware_class_ids), run-length encoded as autoware_tensorrt_yolox publishes its "
              "~/out/mask, the input of Autoware's segmentation_pointcloud_fusion (mono8 in name, "
              "not viewable as an image)."),
    ParamSpec("autoware_class_ids", "int_array", [],
              "The Autoware class ID (0 UNKNOWN, 1 BUILDING, 2 WALL, 3 OBSTACLE, 4 TRAFFIC_LIGHT, "
              "5 TRAFFIC_SIGN, 6 PERSON, 7 VEHICLE, 8 BIKE, 9 ROAD, 10 SIDEWALK, 11 ROAD_PAINT, "
              "12 CURBSTONE, 13 CROSSWALK, 14 VEGETATION, 15 SKY) of each model class, one per "
              "class from class 0; [] = by class name (CamVid's names map to their Autoware "
              "classes, Pole to OBSTACLE and Fence to WALL; other names to UNKNOWN).",
              min=0, max=255),
    ParamSpec("overlay_alpha", "float", 0.5,
              "Opacity of the class colours in ~/overlay (0 = image only, 1 = colours only).",
              min=0.0, max=1.0, dynamic=True),
    ParamSpec("palette", "int_array", [],
              "Class colours as 24-bit 0xRRGGBB integers, one per class from class 0; classes "
              "beyond the list get generated colours; [] = the model's palette.",
              min=0, max=0xFFFFFF, dynamic=True),
    ParamSpec("diagnostics_period_s", "float", 1.0,
              "Period of the /diagnostics status (seconds).", min=0.05, max=3600.0),
    ParamSpec("threads", "int", 0,
              "Torch CPU threads (torch.set_num_threads); 0 = torch's default.", min=0, max=1024),
)

#: :data:`PARAMETERS` by name.
SPECS: dict[str, ParamSpec] = {p.name: p for p in PARAMETERS}
#: The names of the parameters that may change while the node runs, in table order.
DYNAMIC_PARAMETERS: tuple[str, ...] = tuple(p.name for p in PARAMETERS if p.dynamic)


@dataclass(frozen=True)
class NodeConfig:
    """Validated node parameters (see :data:`PARAMETERS` for their meaning)."""

    model: str = ""
    weights: str = ""
    onnx_dir: str = ""
    device: str = "auto"
    backend: str = "torch"
    image_size: tuple[int, ...] = ()
    precision: str = "fp32"
    propagator: str = "query_flow"
    optical_flow_preset: str = "fast"
    optical_flow_scale: float = 0.5
    chain_flow: bool = True
    schedule: str = "adaptive"
    scene_threshold: float = 0.5
    cut_threshold: float = DEFAULT_CUT_THRESHOLD
    min_interval: int = 1
    max_interval: int = 10
    max_gap_s: float = 1.0
    input_compressed: bool = False
    input_reliability: str = "best_effort"
    input_depth: int = 1
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_frame_age_s: float = 0.5
    publish_colored: bool = True
    publish_overlay: bool = True
    publish_class_masks: bool = True
    publish_autoware_mask: bool = False
    autoware_class_ids: tuple[int, ...] = ()
    overlay_alpha: float = 0.5
    palette: tuple[int, ...] = ()
    diagnostics_period_s: float = 1.0
    threads: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Parameter name -> value (``int_array`` ones as lists), in table order."""
        return {p.name: (list(getattr(self, p.name)) if p.type == "int_array" else getattr(self, p.name))
                for p in PARAMETERS}


def defaults() -> dict[str, Any]:
    """Parameter name -> default value, in table order (fresh lists)."""
    return {p.name: (list(p.default) if isinstance(p.default, list) else p.default) for p in PARAMETERS}


def _check(spec: ParamSpec, value: Any) -> Any:
    """Type-, range- and choice-check one value; returns it normalised (float, tuple)."""
    name = spec.name

    def fail(why: str) -> ValueError:
        return ValueError(f"parameter '{name}': {why}, got {shown(value)}")

    def in_range(v: float) -> bool:
        return (spec.min is None or v >= spec.min) and (spec.max is None or v <= spec.max)

    if spec.type == "bool":
        if not isinstance(value, bool):
            raise fail("must be a bool (true/false)")
        return value
    if spec.type == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("must be an integer")
        if not in_range(value):
            raise fail(f"must be in [{int(spec.min)}, {int(spec.max)}]")
        return int(value)
    if spec.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("must be a number")
        if not is_finite(value) or not in_range(value):  # is_finite: 10**400 fits no float
            raise fail(f"must be a finite number in [{spec.min:g}, {spec.max:g}]")
        return float(value)
    if spec.type == "str":
        if not isinstance(value, str):
            raise fail("must be a string")
        if spec.choices is not None and value not in spec.choices:
            raise fail(f"must be one of {', '.join(spec.choices)}")
        return value
    if spec.type == "int_array":
        if value is None:  # an empty list in a params file reaches rclpy as "not set"
            return ()
        # an ordered list (rclpy hands array.array('q')); not text or bytes, whose items would
        # pass as integers, and not a set or a mapping, which have no order
        if isinstance(value, (str, bytes, bytearray, memoryview)) or not isinstance(value, Sequence):
            raise fail("must be a list of integers")
        items = list(value)
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise fail("must be a list of integers")
            if not in_range(item):
                raise fail(f"entries must be in [{spec.min:#x}, {spec.max:#x}] (0xRRGGBB)" if name == "palette"
                           else f"entries must be in [{spec.min}, {spec.max}]")
        return tuple(int(i) for i in items)
    raise AssertionError(f"unknown parameter type {spec.type!r}")  # pragma: no cover


def check_parameter(name: str, value: Any) -> Any:
    """Check one parameter value on its own (type, range, choices, format); returns it
    normalised (float, tuple, stripped schedule). :func:`validate` also checks the values
    against each other.

    Raises:
        ValueError: naming the parameter: unknown name, wrong type, out of range, not one of the
            choices, a malformed ``device``/``schedule``/``image_size``.
    """
    if name not in SPECS:
        raise ValueError(f"unknown parameter '{name}'; known: {sorted(SPECS)}")
    value = _check(SPECS[name], value)
    if name == "device":
        try:
            check_device(value)
        except ValueError as exc:
            raise ValueError(f"parameter 'device': {exc}") from None
    if name == "schedule":
        if not _SCHEDULE_RE.fullmatch(value.strip()):
            hint = ("; the command line's adaptive:T is schedule 'adaptive' plus parameter 'scene_threshold' here"
                    if value.strip().startswith("adaptive:") else "")
            raise ValueError(f"parameter 'schedule': must be 'adaptive' or 'fixed:N' (N >= 1), got {value!r}{hint}")
        value = value.strip()
    if name == "image_size" and len(value) not in (0, 2):
        raise ValueError(f"parameter 'image_size': must be [] or [height, width], got {list(value)}")
    return value


def validate(values: Mapping[str, Any] | None = None) -> NodeConfig:
    """Check parameter values and build a :class:`NodeConfig`; missing names take the defaults.

    Raises:
        ValueError: naming the parameter: unknown name, wrong type, out of range, not one of the
            choices, a malformed ``device``/``schedule``, ``min_interval > max_interval``, or
            ``onnx_dir`` with the torch backend.
    """
    values = dict(values or {})
    unknown = sorted(map(shown, set(values) - set(SPECS)))  # names that are not strings too (as config's keys)
    if unknown:
        raise ValueError(f"unknown parameter(s) [{', '.join(unknown)}]; known: {sorted(SPECS)}")
    merged = defaults()
    merged.update(values)
    checked = {name: check_parameter(name, v) for name, v in merged.items()}
    if checked["onnx_dir"] and checked["backend"] == "torch":
        raise ValueError("parameter 'onnx_dir': needs backend onnxruntime or tensorrt (torch runs model/weights)")
    if checked["min_interval"] > checked["max_interval"]:
        raise ValueError(f"parameter 'min_interval': must be <= max_interval ({checked['max_interval']}), "
                         f"got {checked['min_interval']}")
    return NodeConfig(**checked)


def reconfigure(config: NodeConfig, changes: Mapping[str, Any]) -> NodeConfig:
    """``config`` with ``changes`` applied, checked as a whole (:func:`validate`).

    Args:
        config: the running configuration.
        changes: parameter name -> new value; only :data:`DYNAMIC_PARAMETERS`.

    Raises:
        ValueError: naming the parameter: unknown, read-only (it takes a restart), or a value
            :func:`validate` refuses (including ``min_interval > max_interval`` after the change).
    """
    unknown = sorted(set(changes) - set(SPECS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}")
    fixed = [name for name in changes if not SPECS[name].dynamic]
    if fixed:
        raise ValueError(f"parameter '{fixed[0]}' is read-only while the node runs: set it in the params "
                         f"file or on the command line and restart")
    return validate({**config.as_dict(), **changes})


def descriptor_fields(spec: ParamSpec) -> dict[str, Any]:
    """What the node puts into the parameter's ``rcl_interfaces/ParameterDescriptor``.

    Returns:
        ``{"description": str, "additional_constraints": str, "integer_range": (from, to, step)
        or None, "floating_point_range": (from, to, step) or None, "dynamic_typing": bool,
        "read_only": bool}``.
        Ranges are given only for scalar numeric parameters (step 1 for integers, 0 = continuous
        for floats). Float parameters are dynamically typed: a whole number in a params file or
        on the command line (``max_gap_s: 2``, ``-p max_frame_age_s:=0``) arrives as INTEGER,
        which rclpy rejects for a DOUBLE parameter and would stop the node; :func:`validate`
        then checks the type and range and converts it to float. Integer-array parameters are
        dynamically typed too, declared without a value: rclpy types an empty list as a byte
        array (``ros2 param set`` as a bool array), which a statically typed INTEGER_ARRAY
        refuses, so ``palette: []`` (the model's palette) could not be set back. Parameters that
        are not ``dynamic`` are read-only.
    """
    if spec.choices is not None:
        constraints = "one of: " + ", ".join(spec.choices)
    elif spec.constraints:
        constraints = spec.constraints
    elif spec.type == "int_array":  # the palette's colours in hex (0xRRGGBB), other lists in decimal
        fmt = "#x" if spec.name == "palette" else "d"
        constraints = f"integers in [{int(spec.min):{fmt}}, {int(spec.max):{fmt}}]"
    elif spec.type == "int":
        constraints = f"[{int(spec.min)}, {int(spec.max)}]"
    elif spec.min is not None:
        constraints = f"[{spec.min:g}, {spec.max:g}]"
    else:
        constraints = ""
    int_range = (int(spec.min), int(spec.max), 1) if spec.type == "int" else None
    float_range = (float(spec.min), float(spec.max), 0.0) if spec.type == "float" else None
    return {"description": spec.description, "additional_constraints": constraints,
            "integer_range": int_range, "floating_point_range": float_range,
            "dynamic_typing": spec.type in ("float", "int_array"), "read_only": not spec.dynamic}


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def render_yaml(node_name: str = NODE_NAME) -> str:
    """``config/segment.yaml``: every parameter with its default, its description as a comment."""
    out = [
        "# Parameters of the mpvss_ros segmentation node (every parameter, at its default).",
        "# Generated from mpvss_ros/ros/parameters.py, the single source of names, defaults and",
        "# ranges: python3 -m mpvss_ros.ros.parameters > config/segment.yaml",
        "# Use: ros2 launch mpvss_ros segment.launch.py config:=<copy of this file>",
        "# Parameters marked (dynamic) can also be changed while the node runs:",
        "#   ros2 param set /mpvss_segmenter schedule fixed:5",
        "# (a change of the running schedule or propagator makes the next frame a key frame; one",
        "# that leaves both as they run, such as max_gap_s, makes none); the others are read at start.",
        f"{node_name}:",
        "  ros__parameters:",
    ]
    for spec in PARAMETERS:
        extra = descriptor_fields(spec)["additional_constraints"]
        if spec.choices is not None:
            extra = "one of " + ", ".join(spec.choices)
        comment = spec.description + (f" Accepted: {extra}." if extra else "") + (" (dynamic)" if spec.dynamic else "")
        out += [f"    # {line}" for line in _wrap(comment, 92)]
        out.append(f"    {spec.name}: {_yaml_value(spec.default)}")
    return "\n".join(out) + "\n"


def palette_to_rgb(palette: tuple[int, ...] | list[int]) -> list[list[int]]:
    """``0xRRGGBB`` integers -> ``[[R, G, B], ...]`` (the form :func:`mpvss_ros.viz.make_palette` takes)."""
    return [[(int(v) >> 16) & 0xFF, (int(v) >> 8) & 0xFF, int(v) & 0xFF] for v in palette]


if __name__ == "__main__":  # pragma: no cover
    print(render_yaml(), end="")
