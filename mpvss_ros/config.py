"""Model configuration: typed dataclasses loaded from ``config/models/*.yaml``.

One YAML file describes one model (``mpvss_r50``, ``mpvss_lite``); code never branches on the
model's name, only on these fields. Unknown keys are errors, so a typo in a YAML file fails at
load time with the offending key named.

Usage::

    cfg = load_model_config("mpvss_lite")          # a name under config/models/
    cfg = load_model_config("path/to/custom.yaml")  # or a file
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .paths import REPO_ROOT, data_roots, find_data
from .values import fits_int64, is_finite, shown

__all__ = [
    "BackboneConfig",
    "PixelDecoderConfig",
    "TransformerDecoderConfig",
    "MotionConfig",
    "InputConfig",
    "PostprocessConfig",
    "ModelConfig",
    "ConfigError",
    "load_model_config",
    "model_config_from_dict",
    "CONFIG_DIR",
    "default_class_names",
]

#: ``config/`` of the source tree.
CONFIG_DIR = REPO_ROOT / "config"


def default_class_names(num_classes: int) -> list[str]:
    """The names of classes a model does not name: ``class_0`` .. ``class_{K-1}`` (every tool,
    legend and message uses these)."""
    return [f"class_{i}" for i in range(int(num_classes))]


class ConfigError(ValueError):
    """A model configuration file is missing, unreadable or holds unknown or bad values."""


#: Backbone types ``nn.backbones.build_backbone`` builds.
BACKBONE_TYPES = ("resnet", "swin", "mobilenet_v2")

#: The largest Swin window accepted (tokens; the official models use 7 and 12).
MAX_SWIN_WINDOW = 32

#: ``BackboneConfig`` fields only the ``swin`` type reads.
SWIN_FIELDS = ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "drop_path_rate")

#: ResNet depths the backbone builds (``nn.backbones.RESNET_BLOCKS``; a test keeps them equal).
RESNET_DEPTHS = (50, 101)


@dataclass
class BackboneConfig:
    """Backbone choice.

    ``type``: ``resnet`` (detectron2 key layout, ``depth`` 50 or 101), ``swin`` (Mask2Former's
    ``D2SwinTransformer`` layout; the fields from ``embed_dim`` on, named as its ``MODEL.SWIN``
    options, official Swin-T/S/B/L values in ``config/models/mpvss_swin_*.yaml``) or
    ``mobilenet_v2`` (flat ``features.*`` layout). Outputs are ``res2..res5`` at strides 4, 8,
    16, 32. Fields another type does not use are ignored.
    """

    type: str = "mobilenet_v2"
    depth: int = 50
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3


@dataclass
class PixelDecoderConfig:
    """Pixel decoder: ``msdeformattn`` (Mask2Former's, pure PyTorch) or ``fpn`` (light).

    ``conv_dim``: channels of the multi-scale features; ``mask_dim``: channels of the 1/4
    mask features. The MSDeformAttn fields are ignored by ``fpn``.
    """

    type: str = "fpn"
    conv_dim: int = 128
    mask_dim: int = 128
    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024
    num_groups: int = 32


@dataclass
class TransformerDecoderConfig:
    """Masked-attention transformer decoder (Mask2Former).

    ``num_layers`` masked-attention layers give ``num_layers + 1`` predictions (one from the
    learnable queries alone). MPVSS R50 uses 9 (its ``DEC_LAYERS: 10``).
    """

    hidden_dim: int = 128
    num_queries: int = 24
    num_layers: int = 3
    num_heads: int = 4
    ffn_dim: int = 512
    num_feature_levels: int = 3


@dataclass
class MotionConfig:
    """MPVSS motion module (FlowNetS-style encoder, joint-attention motion decoder, query flow).

    ``encoder_channels``: output channels of conv1..conv6 (official: 64,128,256,512,512,1024).
    ``deconv_channels``: output channels of deconv5, deconv4, deconv3, deconv2 (128,128,128,64).
    ``hidden_dim``: motion-decoder width; must equal the segmentor's query width (a model
    configuration that leaves it out takes ``transformer_decoder.hidden_dim``, as the official
    code's one ``HIDDEN_DIM`` does; this class's own default is the official 256).
    ``flow_embed_dim``: size E of the flow-query embedding; the motion map has 2E channels.
    ``mlp_hidden_dim``: hidden width of ``output_head`` and ``scale_layer``.
    ``image_scale``: the pair is resized by this factor before the encoder (official 0.5).
    ``image_mean``: per-channel mean subtracted after /255 (FlowNet's Caffe means).
    """

    encoder_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 512, 1024])
    deconv_channels: list[int] = field(default_factory=lambda: [128, 128, 128, 64])
    hidden_dim: int = 256
    num_layers: int = 9
    num_heads: int = 8
    ffn_dim: int = 2048
    flow_embed_dim: int = 256
    mlp_hidden_dim: int = 512
    image_scale: float = 0.5
    image_mean: list[float] = field(default_factory=lambda: [0.411, 0.432, 0.450])


@dataclass
class InputConfig:
    """Pre-processing.

    ``pixel_mean``/``pixel_std``: RGB, 0-255 scale. ``size``: the network canvas (H, W) in
    pixels that a frame is fitted into with its aspect ratio kept; None keeps the input size.
    ``size_divisibility``: padding multiple in pixels (bottom/right, zeros after normalisation;
    spec §1.2: 32).
    ``warp_normalization``: ``exact`` (zero flow is the identity) or ``mmtrack`` (the
    official ``flow_warp_feats`` grid, /W with align_corners=True; needed for official
    checkpoints to behave as trained).
    ``interpolation``: how a frame is resized onto the canvas. ``area`` (OpenCV's
    ``INTER_AREA`` when shrinking, ``INTER_LINEAR`` when enlarging; what ``mpvss_lite`` trained
    with) or ``pil_bilinear`` (Pillow's ``Image.BILINEAR``, antialiased when shrinking: detectron2's
    ``ResizeTransform`` on uint8 images, the official MPVSS / Mask2Former test resize; 6.0 instead
    of 1.7 ms for a 960 x 540 frame shrunk to 853 x 480, medians of 50 on a 2-core Xeon).
    ``canvas_orientation``: ``fixed`` (every frame goes onto ``size`` as written) or ``frame``
    (the canvas is turned to the frame's orientation: a frame taller than wide goes onto (W, H)
    of a landscape ``size``, and the other way round, which is detectron2's
    ``ResizeShortestEdge(min(size), max_size=max(size))``, the official test resize: the short
    side becomes min(size) unless the long one would pass max(size)).
    """

    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size: list[int] | None = None
    size_divisibility: int = 32
    warp_normalization: str = "exact"
    interpolation: str = "area"
    canvas_orientation: str = "fixed"


#: ``InputConfig.interpolation`` values (:func:`mpvss_ros.segmenter.resize_frame`).
INTERPOLATIONS = ("area", "pil_bilinear")
#: ``InputConfig.canvas_orientation`` values (:meth:`mpvss_ros.segmenter.Letterbox.for_input`).
CANVAS_ORIENTATIONS = ("fixed", "frame")

#: Most classes a model may have: class IDs are published as ``mono16`` at most.
MAX_CLASSES = 65535


@dataclass
class PostprocessConfig:
    """Semantic inference and resizing to the input.

    ``score_resolution``: ``canvas`` follows Mask2Former exactly (mask logits upsampled to the
    padded canvas, then class scores); ``mask`` computes the class scores on the 1/4 mask grid
    and upsamples the K score maps instead: about 16x less work for the sigmoid and the
    query-class product, at the cost of bilinearly interpolated scores instead of interpolated
    mask logits (labels differ only along class boundaries).

    ``min_query_score``: semantic inference and propagation use only the key frame's queries
    whose best class probability is at least this (:func:`~mpvss_ros.nn.mpvss.active_queries`),
    so the per-query flow composition, warp and scores of non-key frames run over those alone;
    0 keeps all N (Mask2Former's exact sum). The motion module still attends over all N. The
    shipped ``mpvss_lite`` weights leave 11 or 12 of their 32 queries at 0.01 or above on CamVid
    val frames (measured on 11 frames, every 10th), the rest below.
    """

    score_resolution: str = "canvas"
    min_query_score: float = 0.01


@dataclass
class ModelConfig:
    """A whole MPVSS model: segmentor, motion module, classes, pre-processing.

    ``class_names`` has ``num_classes`` entries; ``palette`` one RGB triple per class
    (generated when absent).
    """

    name: str
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    transformer_decoder: TransformerDecoderConfig = field(default_factory=TransformerDecoderConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    input: InputConfig = field(default_factory=InputConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    default_weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (YAML/JSON serialisable), the inverse of :func:`model_config_from_dict`.
        The Swin fields of ``backbone`` are left out for other backbones (the form that checkpoints
        and export contracts store, readable by releases from before Swin)."""
        data = dataclasses.asdict(self)
        if self.backbone.type != "swin":
            for name in SWIN_FIELDS:
                del data["backbone"][name]
        for name, default in (("interpolation", "area"), ("canvas_orientation", "fixed")):
            if data["input"][name] == default:  # what files from before the field meant
                del data["input"][name]
        return data


_SECTIONS = {
    "backbone": BackboneConfig,
    "pixel_decoder": PixelDecoderConfig,
    "transformer_decoder": TransformerDecoderConfig,
    "motion": MotionConfig,
    "input": InputConfig,
    "postprocess": PostprocessConfig,
}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(shown, set(data) - names))  # keys may be of mixed types (1: a, foo: b)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) [{', '.join(unknown)}]; allowed: {sorted(names)}")
    return cls(**data)


def model_config_from_dict(data: dict[str, Any], where: str = "model config") -> ModelConfig:
    """Build and validate a :class:`ModelConfig` from a plain dict.

    Raises:
        ConfigError: unknown keys, missing ``name``/``num_classes``, or inconsistent values
            (class names or palette of the wrong length, motion width != query width, ...).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    data = copy.deepcopy(data)  # the configuration shares no list with the caller's dict
    for key in ("name", "num_classes"):
        if key not in data:
            raise ConfigError(f"{where}: missing required key '{key}'")
    # an absent or empty section (`backbone:`) takes the defaults; a value that is no mapping
    # (`backbone: 0`, `postprocess: false`) is refused by _build, not read as the defaults
    motion = data.get("motion")
    sections = {}
    for key, cls in _SECTIONS.items():
        value = data.pop(key, None)
        sections[key] = _build(cls, {} if value is None else value, f"{where}: {key}")
    if not (isinstance(motion, dict) and "hidden_dim" in motion):  # the query width; no other value is valid
        sections["motion"] = dataclasses.replace(sections["motion"], hidden_dim=sections["transformer_decoder"].hidden_dim)
    cfg = _build(ModelConfig, {**data, **sections}, where)
    _validate(cfg, where)
    return cfg


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (int, float, str, list[...] or
    ``X | None``), or None. Integers pass as floats; bools pass only as bools."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _type_problem(value, next(a for a in args if a is not type(None)))
    if origin is list:
        if not isinstance(value, list):
            return f"must be a list, got {shown(value)}"
        for item in value:
            why = _type_problem(item, args[0])
            if why:
                return why if why.startswith("entries") else f"entries {why}"
        return None
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and is_finite(value)  # 10**400: no float
        return None if ok else f"must be a finite number, got {shown(value)}"
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, got {shown(value)}"
        # a size or count beyond int64 fits no tensor, and past 4300 digits Python cannot print it
        return None if fits_int64(value) else f"must fit in 64 bits, got {shown(value)}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, got {shown(value)}"
    return None


def _check_types(obj: Any, where: str, prefix: str = "") -> None:
    """Every field of the dataclass ``obj`` (and of its sections) against its annotation; integer
    fields (sizes, counts, channels) must be >= 1."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_types(value, where, f"{name}.")
            continue
        hint = hints[f.name]
        why = _type_problem(value, hint)
        if why:
            raise ConfigError(f"{where}: {name} {why}")
        if prefix and hint in (int, list[int]) and min(value if isinstance(value, list) else [value], default=1) < 1:
            raise ConfigError(f"{where}: {name} must be >= 1, got {value}")


def _validate(cfg: ModelConfig, where: str) -> None:
    _check_types(cfg, where)
    attention = [("transformer_decoder", cfg.transformer_decoder, "hidden_dim", "num_heads"),
                 ("motion", cfg.motion, "hidden_dim", "num_heads")]
    if cfg.pixel_decoder.type == "msdeformattn":  # the FPN pixel decoder has no attention
        attention.append(("pixel_decoder", cfg.pixel_decoder, "conv_dim", "num_heads"))
    for name, section, width, heads in attention:
        if getattr(section, width) % getattr(section, heads):
            raise ConfigError(f"{where}: {name}.{width} ({getattr(section, width)}) must be a multiple of "
                              f"{name}.{heads} ({getattr(section, heads)})")
    if cfg.pixel_decoder.conv_dim % cfg.pixel_decoder.num_groups:  # GroupNorm over conv_dim channels
        raise ConfigError(f"{where}: pixel_decoder.conv_dim ({cfg.pixel_decoder.conv_dim}) must be a multiple "
                          f"of pixel_decoder.num_groups ({cfg.pixel_decoder.num_groups}, GroupNorm)")
    for name, values in (("input.pixel_mean", cfg.input.pixel_mean), ("input.pixel_std", cfg.input.pixel_std),
                         ("motion.image_mean", cfg.motion.image_mean)):
        if len(values) != 3:
            raise ConfigError(f"{where}: {name} needs 3 values (R, G, B), got {values}")
    if min(cfg.input.pixel_std) <= 0:
        raise ConfigError(f"{where}: input.pixel_std must be > 0 (it divides the pixels), got {cfg.input.pixel_std}")
    if not 0.0 < cfg.motion.image_scale <= 1.0:
        raise ConfigError(f"{where}: motion.image_scale must lie in (0, 1], got {cfg.motion.image_scale}")
    if not 1 <= cfg.num_classes <= MAX_CLASSES:
        raise ConfigError(f"{where}: num_classes must lie in [1, {MAX_CLASSES}] (class IDs are published as "
                          f"mono16 at most), got {cfg.num_classes}")
    if cfg.class_names and len(cfg.class_names) != cfg.num_classes:
        raise ConfigError(f"{where}: {len(cfg.class_names)} class_names for num_classes={cfg.num_classes}")
    if not cfg.class_names:
        cfg.class_names = default_class_names(cfg.num_classes)
    for i, name in enumerate(cfg.class_names):
        if not name.strip() or any(unicodedata.category(ch) == "Cc" for ch in name):
            raise ConfigError(f"{where}: class_names[{i}] must be a visible name without control characters "
                              f"(it is published in vision_msgs/LabelInfo and keys the per-class IoU), got {shown(name)}")
    repeated = sorted(n for n, count in collections.Counter(cfg.class_names).items() if count > 1)
    if repeated:
        raise ConfigError(f"{where}: class_names must differ (they key the per-class IoU), repeated: {repeated[:5]}")
    if cfg.palette:
        if len(cfg.palette) != cfg.num_classes or any(len(c) != 3 or not all(0 <= v <= 255 for v in c)
                                                       for c in cfg.palette):
            raise ConfigError(f"{where}: palette needs {cfg.num_classes} RGB triples of 0..255")
    if cfg.backbone.type not in BACKBONE_TYPES:
        raise ConfigError(f"{where}: backbone.type must be one of {list(BACKBONE_TYPES)}, got {cfg.backbone.type!r}")
    if cfg.backbone.type == "resnet" and cfg.backbone.depth not in RESNET_DEPTHS:
        raise ConfigError(f"{where}: backbone.depth must be one of {list(RESNET_DEPTHS)} for resnet, "
                          f"got {cfg.backbone.depth}")
    if cfg.backbone.type == "swin":
        _validate_swin(cfg.backbone, where)
    if cfg.pixel_decoder.type not in ("msdeformattn", "fpn"):
        raise ConfigError(f"{where}: pixel_decoder.type must be msdeformattn or fpn, got {cfg.pixel_decoder.type!r}")
    if cfg.transformer_decoder.hidden_dim % 4:
        # the sine position embedding (decoder and motion module) gives each axis hidden_dim / 2
        # channels, half sine and half cosine
        raise ConfigError(f"{where}: transformer_decoder.hidden_dim ({cfg.transformer_decoder.hidden_dim}) must be a "
                          "multiple of 4 (the sine position embedding's x and y halves, each sine and cosine)")
    if cfg.pixel_decoder.conv_dim != cfg.transformer_decoder.hidden_dim:
        raise ConfigError(f"{where}: pixel_decoder.conv_dim ({cfg.pixel_decoder.conv_dim}) must equal "
                          f"transformer_decoder.hidden_dim ({cfg.transformer_decoder.hidden_dim}): the decoder "
                          "attends to the pixel decoder's multi-scale features")
    if cfg.motion.hidden_dim != cfg.transformer_decoder.hidden_dim:
        raise ConfigError(
            f"{where}: motion.hidden_dim ({cfg.motion.hidden_dim}) must equal transformer_decoder.hidden_dim "
            f"({cfg.transformer_decoder.hidden_dim}): flow queries start from the key frame's queries"
        )
    if len(cfg.motion.encoder_channels) != 6 or len(cfg.motion.deconv_channels) != 4:
        raise ConfigError(f"{where}: motion needs 6 encoder_channels and 4 deconv_channels")
    if cfg.postprocess.score_resolution not in ("canvas", "mask"):
        raise ConfigError(f"{where}: postprocess.score_resolution must be canvas or mask")
    if not 0.0 <= float(cfg.postprocess.min_query_score) < 1.0:
        raise ConfigError(f"{where}: postprocess.min_query_score must lie in [0, 1), got {cfg.postprocess.min_query_score}")
    if cfg.input.warp_normalization not in ("exact", "mmtrack"):
        raise ConfigError(f"{where}: input.warp_normalization must be exact or mmtrack")
    if cfg.input.canvas_orientation not in CANVAS_ORIENTATIONS:
        raise ConfigError(f"{where}: input.canvas_orientation must be one of {', '.join(CANVAS_ORIENTATIONS)}, "
                          f"got {cfg.input.canvas_orientation!r}")
    if cfg.input.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"{where}: input.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                          f"got {cfg.input.interpolation!r}")
    if cfg.input.size is not None and (len(cfg.input.size) != 2 or min(cfg.input.size) < 32):
        raise ConfigError(f"{where}: input.size must be [H, W] with both >= 32, got {cfg.input.size}")
    if cfg.input.size_divisibility < 32 or cfg.input.size_divisibility % 32:
        # the backbone's and the motion encoder's coarsest stride (MotionModule.size_divisibility)
        raise ConfigError(f"{where}: input.size_divisibility must be a multiple of 32, got {cfg.input.size_divisibility}")
    if cfg.transformer_decoder.num_feature_levels != 3:
        # the pixel decoder's multi-scale maps (1/32, 1/16, 1/8), one per level, as Mask2Former asserts
        raise ConfigError(f"{where}: transformer_decoder.num_feature_levels must be 3 (the pixel decoder's 1/32, 1/16 "
                          f"and 1/8 maps), got {cfg.transformer_decoder.num_feature_levels}")


def _validate_swin(b: BackboneConfig, where: str) -> None:
    if len(b.depths) != 4 or len(b.num_heads) != 4:
        raise ConfigError(f"{where}: backbone.depths and backbone.num_heads need 4 entries (res2..res5) for swin, "
                          f"got {b.depths} and {b.num_heads}")
    for s, heads in enumerate(b.num_heads):
        if (b.embed_dim * 2**s) % heads:
            raise ConfigError(f"{where}: stage {s} of swin is {b.embed_dim * 2**s} wide (backbone.embed_dim * "
                              f"2^{s}), not a multiple of its {heads} heads (backbone.num_heads)")
    if not math.isfinite(b.embed_dim * 8 * b.mlp_ratio):  # the last stage's MLP width overflows a float
        raise ConfigError(f"{where}: backbone.mlp_ratio ({b.mlp_ratio}) is too large for any MLP")
    if int(b.embed_dim * b.mlp_ratio) < 1:  # the first stage's MLP width, int(C * ratio) as Swin's
        raise ConfigError(f"{where}: backbone.mlp_ratio ({b.mlp_ratio}) leaves the first stage's MLP no channel "
                          f"(int(embed_dim * mlp_ratio) = {int(b.embed_dim * b.mlp_ratio)})")
    if b.window_size > MAX_SWIN_WINDOW:
        # every block holds a (M^2, M^2) int64 index: 8 MB at M = 32, 1.6 GB over Swin-B's blocks at 64
        raise ConfigError(f"{where}: backbone.window_size must be at most {MAX_SWIN_WINDOW} tokens, got "
                          f"{b.window_size} (official: 7 and 12)")
    if not 0.0 <= b.drop_path_rate < 1.0:
        raise ConfigError(f"{where}: backbone.drop_path_rate must lie in [0, 1), got {b.drop_path_rate}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML keeps the last,
    so a second ``input:`` block silently replaced the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # '!!map [a, b]': SafeLoader's own check comes later
            raise yaml.constructor.ConstructorError(None, None, f"expected a mapping, found {node.id}", node.start_mark)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor': its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
            except TypeError:  # a list or mapping as a key, as SafeLoader says
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        "found unhashable key", key_node.start_mark) from None
            if twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{shown(key)} is written twice (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _model_dirs() -> list[Path]:
    return [root / "config" / "models" for root in data_roots()]


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Load a model configuration by name (``config/models/<name>.yaml``) or by file path
    (``.yaml``/``.yml``; ``~`` expanded; a relative path is looked for in the working directory,
    then in the data roots, as weights files are: :func:`~mpvss_ros.paths.find_data`).

    Raises:
        ConfigError: the file does not exist, is not valid YAML (or writes a key twice in one
            mapping), or fails validation.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        candidates = [d / f"{name_or_path}.yaml" for d in _model_dirs()]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            known = sorted({p.stem for d in _model_dirs() if d.is_dir() for p in d.glob("*.yaml")})
            hint = ("; weights files go to --weights" if path.suffix.lower() in (".pt", ".pth", ".pkl", ".ckpt")
                    else "")
            raise ConfigError(f"unknown model '{name_or_path}'; known models: {known} (or pass a .yaml file){hint}")
        path = found
    else:  # a file: '~' expanded, a relative path looked for as model files are (find_data)
        path = find_data(path) or path.expanduser()
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a model config file")
    if not path.is_file():
        raise ConfigError(f"model config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        why = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line (a ReaderError has two)
        raise ConfigError(f"{path}: not valid YAML{at}: {why}") from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        # PyYAML's own constructors on a tag with a value they cannot take ('!!bool maybe',
        # '!!int ""', '!!timestamp x'), int() past Python's 4300-digit limit, nesting too deep
        raise ConfigError(f"{path}: a value YAML could not read ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())})") from None
    return model_config_from_dict(data, where=str(path))
