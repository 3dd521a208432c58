"""Model configuration validation: a bad value is one ConfigError naming the key, before a model is built."""

import builtins
import dataclasses
import math
import types
import typing

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvss_ros.config import ConfigError, ModelConfig, load_model_config, model_config_from_dict
from mpvss_ros.paths import REPO_ROOT


def _with(path: str, value, model: str = "mpvss_lite"):
    """``model``'s configuration as a dict, with the key ``path`` (dotted) set to ``value``."""
    data = load_model_config(model).to_dict()
    *sections, key = path.split(".")
    target = data
    for s in sections:
        target = target[s]
    target[key] = value
    return data


@pytest.mark.parametrize("path, value, words", [
    ("num_classes", "11", "num_classes must be an integer"),
    ("num_classes", 11.5, "num_classes must be an integer"),
    ("num_classes", True, "num_classes must be an integer"),
    ("class_names", 5, "class_names must be a list"),
    ("class_names", ["a", 2] + ["c"] * 9, "class_names entries must be a string"),
    ("palette", 5, "palette must be a list"),
    ("palette", [[0, 0, 300]] * 11, "RGB triples of 0..255"),
    ("input.size", 480, "size must be a list"),
    ("input.size", [480, "640"], "size entries must be an integer"),
    ("input.size_divisibility", 0, "input.size_divisibility must be >= 1"),
    ("input.pixel_mean", [1.0, 2.0], "input.pixel_mean needs 3 values"),
    ("input.pixel_mean", [1.0, 2.0, 3.0, 4.0], "input.pixel_mean needs 3 values"),
    ("motion.image_mean", [0.4, 0.4], "motion.image_mean needs 3 values"),
    ("motion.image_mean", [0.4, 0.4, 0.4, 0.4], "motion.image_mean needs 3 values"),
    ("input.pixel_std", [0.0, 0.0, 0.0], "input.pixel_std must be > 0"),
    ("input.pixel_std", [1.0, float("nan"), 1.0], "pixel_std entries must be a finite number"),
    ("transformer_decoder.num_heads", 3, "transformer_decoder.hidden_dim \\(128\\) must be a multiple of"),
    ("motion.num_heads", 3, "motion.hidden_dim \\(128\\) must be a multiple of motion.num_heads \\(3\\)"),
    ("transformer_decoder.hidden_dim", "128", "hidden_dim must be an integer"),
    ("motion.encoder_channels", "abcdef", "encoder_channels must be a list"),
    ("motion.encoder_channels", [32, 64, 0, 128, 128, 192], "motion.encoder_channels must be >= 1"),
    ("motion.image_scale", 0.0, "image_scale must lie in \\(0, 1\\]"),
    ("motion.image_scale", True, "motion.image_scale must be a finite number, got True"),  # a bool is no number
    ("postprocess.min_query_score", True, "postprocess.min_query_score must be a finite number, got True"),
    ("pixel_decoder.num_groups", 48, "GroupNorm"),
    ("postprocess.min_query_score", "abc", "min_query_score must be a finite number"),
    # values the model cannot run: every non-key frame skipped, every frame failing
    ("input.size_divisibility", 7, "input.size_divisibility must be a multiple of 32, got 7"),
    ("input.size_divisibility", 48, "input.size_divisibility must be a multiple of 32, got 48"),
    ("transformer_decoder.num_feature_levels", 5, "num_feature_levels must be 3"),
    ("transformer_decoder.num_feature_levels", 1, "num_feature_levels must be 3"),
    # values that built a model whose every forward failed, or that failed only when built
    ("pixel_decoder.conv_dim", 64, "pixel_decoder.conv_dim \\(64\\) must equal transformer_decoder.hidden_dim"),
    # a section that is no mapping is refused, not read as the defaults
    ("backbone", 0, "backbone: expected a mapping, got int"),
    ("postprocess", False, "postprocess: expected a mapping, got bool"),
])
def test_bad_values_are_one_config_error_naming_the_key(path, value, words):
    with pytest.raises(ConfigError, match=words):
        model_config_from_dict(_with(path, value), where="custom.yaml")


@pytest.mark.parametrize("model, path, value, words", [
    ("mpvss_lite", "num_classes", 0, "num_classes must lie in \\[1, 65535\\] .*got 0"),
    ("mpvss_lite", "num_classes", 65536, "num_classes must lie in \\[1, 65535\\] .*got 65536"),  # no mono16 ID
    ("mpvss_lite", "num_classes", 2**63 - 1, "num_classes must lie in"),  # its default names filled the memory
    ("mpvss_swin_tiny", "backbone.mlp_ratio", 1e308, "mlp_ratio \\(1e\\+308\\) is too large"),  # OverflowError
    ("mpvss_lite", "class_names", ["a", "b", "c"], "3 class_names for num_classes=11"),
    # names publish in LabelInfo and key the per-class IoU: a repeat lost a class from eval's JSON
    ("mpvss_lite", "class_names", ["Sky", "Sky"] + [f"c{i}" for i in range(9)], "must differ .*repeated: \\['Sky'\\]"),
    ("mpvss_lite", "class_names", [f"c{i}" for i in range(10)] + [""], "class_names\\[10\\] must be a visible name"),
    ("mpvss_lite", "class_names", [" "] + [f"c{i}" for i in range(10)], "class_names\\[0\\] must be a visible name"),
    ("mpvss_lite", "class_names", ["sky\0"] + [f"c{i}" for i in range(10)], "without control characters.*'sky\\\\x00'"),
    ("mpvss_lite", "class_names", ["road\nmarking"] + [f"c{i}" for i in range(10)], "class_names\\[0\\] must be a visible"),
    ("mpvss_lite", "palette", [[0, 0]] * 11, "palette needs 11 RGB triples of 0..255"),
    ("mpvss_lite", "palette", [[0, 0, 0]] * 10, "palette needs 11 RGB triples of 0..255"),
    ("mpvss_lite", "palette", [[0, 0, 256]] * 11, "palette needs 11 RGB triples of 0..255"),
    ("mpvss_lite", "input.size", [31, 640], "input.size must be \\[H, W\\] with both >= 32, got \\[31, 640\\]"),
    ("mpvss_lite", "input.size", [480], "input.size must be \\[H, W\\] with both >= 32"),
    ("mpvss_lite", "input.size", [480, 640, 3], "input.size must be \\[H, W\\] with both >= 32"),
    ("mpvss_lite", "input.warp_normalization", "bilinear", "input.warp_normalization must be exact or mmtrack"),
    ("mpvss_lite", "postprocess.score_resolution", "pixel", "postprocess.score_resolution must be canvas or mask"),
    ("mpvss_lite", "motion.hidden_dim", 64, "motion.hidden_dim \\(64\\) must equal transformer_decoder.hidden_dim"),
    ("mpvss_lite", "motion.encoder_channels", [32, 64, 96, 128, 128], "motion needs 6 encoder_channels and 4 deconv"),
    ("mpvss_lite", "motion.deconv_channels", [64, 64, 64], "motion needs 6 encoder_channels and 4 deconv"),
    ("mpvss_lite", "pixel_decoder.type", "unet", "pixel_decoder.type must be msdeformattn or fpn, got 'unet'"),
    ("mpvss_lite", "backbone.type", "vgg", "backbone.type must be one of"),
    ("mpvss_r50", "pixel_decoder.num_heads", 7, "pixel_decoder.conv_dim \\(256\\) must be a multiple of pixel_decoder.num_heads"),
    ("mpvss_swin_tiny", "backbone.window_size", 33, "backbone.window_size must be at most 32 tokens, got 33"),
    ("mpvss_swin_tiny", "backbone.num_heads", [3, 6, 12], "backbone.num_heads need 4 entries"),
    ("mpvss_swin_tiny", "backbone.num_heads", [3, 6, 12, 7], "stage 3 of swin is 768 wide .* not a multiple of its 7 heads"),
])
def test_each_check_of_the_configuration_refuses_what_the_model_cannot_run(model, path, value, words):
    with pytest.raises(ConfigError, match=words):
        model_config_from_dict(_with(path, value, model), where="custom.yaml")


def test_the_edges_of_the_checked_ranges_are_allowed():
    """The largest motion input scale (1: the full canvas), the largest Swin window (32 tokens),
    the smallest canvas (32 x 32) and palette value 255 build a configuration."""
    for model, path, value in (("mpvss_lite", "motion.image_scale", 1.0), ("mpvss_swin_tiny", "backbone.window_size", 32),
                               ("mpvss_lite", "input.size", [32, 32]), ("mpvss_lite", "palette", [[0, 0, 255]] * 11)):
        model_config_from_dict(_with(path, value, model), where="custom.yaml")


def test_the_shipped_configurations_pass():
    for name in ("mpvss_lite", "mpvss_r50"):
        cfg = load_model_config(name)
        assert model_config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    # integers stand for floats, and an absent input size is allowed
    data = _with("input.pixel_std", [58, 57, 57])
    data["input"]["size"] = None
    assert model_config_from_dict(data).input.pixel_std == [58, 57, 57]


def test_a_configuration_shares_no_list_with_the_dict_it_was_built_from():
    data = _with("input.pixel_mean", [1.0, 2.0, 3.0])
    cfg = model_config_from_dict(data)
    data["class_names"].append("x")
    data["input"]["pixel_mean"][0] = 99.0
    assert len(cfg.class_names) == cfg.num_classes and cfg.input.pixel_mean == [1.0, 2.0, 3.0]


def test_unreadable_yaml_files_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match="folder.yaml is a folder, not a model config file"):  # not "not found"
        load_model_config(tmp_path / "folder.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"na\x91me: x\n")
    with pytest.raises(ConfigError, match="binary.yaml: not a UTF-8 text file"):
        load_model_config(binary)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nnum_classes: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_model_config(broken)
    assert "broken.yaml: not valid YAML at line" in str(err.value) and len(str(err.value).splitlines()) == 1


def test_numbers_too_large_for_a_tensor_or_a_float_are_one_config_error(tmp_path):
    """Integer fields past int64 and float fields past float's range are refused by name, also past
    str()'s 4300-digit limit (which used to let str()'s or float()'s own error out); a YAML file
    holding such a number is a ConfigError naming the file (PyYAML's int() refuses it first)."""
    for path, value, words in (("num_classes", 2**63, "num_classes must fit in 64 bits, got 9223372036854775808"),
                               ("num_classes", 10**5000, "num_classes must fit in 64 bits, got an integer too long"),
                               ("transformer_decoder.num_queries", -(10**5000), "num_queries must fit in 64 bits"),
                               ("input.size", [480, 10**5000], "input.size entries must fit in 64 bits, got an "
                                                               "integer too long"),
                               ("motion.image_scale", 10**400, "image_scale must be a finite number, got 1000"),
                               ("motion.image_scale", 10**5000, "image_scale must be a finite number, got an integer"),
                               ("postprocess.min_query_score", 10**5000, "min_query_score must be a finite number"),
                               ("name", 10**5000, "name must be a string, got an integer too long"),
                               ("class_names", [10**5000] * 11, "class_names entries must be a string, got an int"),
                               ("motion.encoder_channels", 10**5000, "must be a list, got an integer too long")):
        with pytest.raises(ConfigError, match=words):
            model_config_from_dict(_with(path, value), where="custom.yaml")
    model_config_from_dict(_with("transformer_decoder.num_queries", 2**63 - 1), where="custom.yaml")  # the edge
    big = tmp_path / "big.yaml"
    big.write_text((REPO_ROOT / "config" / "models" / "mpvss_lite.yaml").read_text().replace(
        "num_classes: 11", "num_classes: " + "9" * 5000))
    with pytest.raises(ConfigError, match="big.yaml: a value YAML could not read \\(ValueError: .*4300 digits"):
        load_model_config(big)


@pytest.mark.parametrize("value, words", [
    ("!!bool maybe", "a value YAML could not read \\(KeyError"), ('!!int ""', "a value YAML could not read \\(IndexError"),
    ('!!float ""', "a value YAML could not read \\(IndexError"), ("!!timestamp foo", "a value YAML could not read \\(AttributeError"),
    ("!!map [a, b]", "not valid YAML at line .*expected a mapping, found sequence"),
    ("[" * 1500 + "]" * 1500, "a value YAML could not read \\(RecursionError"),
    ("x\x0cy", "not valid YAML: unacceptable character #x000c"),  # PyYAML's ReaderError: two lines of text
])
def test_yaml_values_pyyaml_cannot_construct_are_one_line_naming_the_file(tmp_path, value, words):
    """PyYAML's own constructors raise KeyError, IndexError, AttributeError or TypeError on a tag with a
    value they cannot take, and its composer RecursionError on deep nesting: each was let out."""
    path = tmp_path / "tagged.yaml"
    path.write_text((REPO_ROOT / "config" / "models" / "mpvss_lite.yaml").read_text().replace(
        "name: mpvss_lite", f"name: {value}", 1))
    with pytest.raises(ConfigError, match="tagged.yaml: " + words) as err:
        load_model_config(path)
    assert len(str(err.value).splitlines()) == 1


def test_a_weights_file_given_as_model_says_where_it_goes():
    """`--model model.pt` (weights and model swapped): the unknown-model error says where weights go."""
    with pytest.raises(ConfigError, match=r"unknown model 'runs/x/model_final.pt'.*; weights files go to --weights$"):
        load_model_config("runs/x/model_final.pt")
    with pytest.raises(ConfigError, match=r"\(or pass a .yaml file\)$"):
        load_model_config("mpvss_tiny")


def test_unknown_keys_of_mixed_types_are_named():
    """YAML keys need not be strings (`1: a` beside `foo: b`): sorting them raised TypeError."""
    data = {**load_model_config("mpvss_lite").to_dict(), 1: "a", "foo": "b"}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['foo', 1\]"):
        model_config_from_dict(data)


def test_an_empty_section_takes_the_defaults():
    data = {**load_model_config("mpvss_lite").to_dict(), "postprocess": None}
    assert model_config_from_dict(data).postprocess == load_model_config("mpvss_lite").postprocess.__class__()


def test_a_minimal_configuration_takes_the_documented_defaults():
    """Only name and num_classes: the defaults form a valid configuration (the motion decoder's
    width, 256 on its own, takes the query width, 128; the two had to be equal, so every YAML
    without motion.hidden_dim was refused), with the documented values."""
    cfg = model_config_from_dict({"name": "minimal", "num_classes": 2})
    assert cfg.motion.hidden_dim == cfg.transformer_decoder.hidden_dim == 128
    assert cfg.input.size_divisibility == 32  # spec 1.2
    assert cfg.input.pixel_mean == [123.675, 116.28, 103.53]  # RGB order, 0-255
    assert cfg.input.pixel_std == [58.395, 57.12, 57.375]
    assert cfg.motion.image_mean == [0.411, 0.432, 0.450]  # FlowNet's Caffe means, as the official code
    assert cfg.motion.image_scale == 0.5  # the official flow input scale
    assert cfg.postprocess.min_query_score == 0.01
    assert cfg.class_names == ["class_0", "class_1"]
    with pytest.raises(ConfigError, match="x.yaml: missing required key 'num_classes'"):
        model_config_from_dict({"name": "minimal"}, where="x.yaml")


def test_a_hidden_dim_the_position_embedding_cannot_split_is_refused_at_load():
    """130 is even and divides by the heads, but its halves (65) have no sine/cosine split: the
    model was built and every forward failed."""
    data = load_model_config("mpvss_lite").to_dict()
    for section in ("transformer_decoder", "motion"):
        data[section].update(hidden_dim=130, num_heads=2)
    with pytest.raises(ConfigError, match="transformer_decoder.hidden_dim \\(130\\) must be a multiple of 4"):
        model_config_from_dict(data, where="custom.yaml")


def test_a_resnet_depth_the_backbone_cannot_build_is_refused_at_load():
    from mpvss_ros.config import RESNET_DEPTHS
    from mpvss_ros.nn.backbones import RESNET_BLOCKS

    assert set(RESNET_DEPTHS) == set(RESNET_BLOCKS)
    data = load_model_config("mpvss_r50").to_dict()
    data["backbone"]["depth"] = 34
    with pytest.raises(ConfigError, match="backbone.depth must be one of \\[50, 101\\] for resnet, got 34"):
        model_config_from_dict(data, where="custom.yaml")


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second input: block replaced the first whole."""
    path = tmp_path / "a.yaml"
    path.write_text("name: x\ninput:\n  size: [480, 640]\nnum_classes: 11\ninput:\n  warp_normalization: exact\n")
    with pytest.raises(ConfigError, match="a.yaml: not valid YAML at line 5, column 1: 'input' is written twice "
                                          "\\(first at line 2\\)"):
        load_model_config(path)
    # a merge key's entries may be overridden, and a flow mapping's duplicate is found too
    merged = tmp_path / "b.yaml"
    merged.write_text((REPO_ROOT / "config" / "models" / "mpvss_lite.yaml").read_text()
                      + "extra_a: &base {x: 1, y: 2}\nextra_b: {<<: *base, y: 3}\n")
    with pytest.raises(ConfigError, match="unknown key") as err:  # loaded, then refused as model keys
        load_model_config(merged)
    assert "written twice" not in str(err.value)
    flow = tmp_path / "c.yaml"
    flow.write_text("name: x\ninput: {size: [480, 640], size: [360, 480]}\n")
    with pytest.raises(ConfigError, match="'size' is written twice"):
        load_model_config(flow)


def test_a_config_path_with_a_tilde_or_relative_to_a_data_root(tmp_path, monkeypatch):
    """Model YAML files are found as weights files are: ~ expanded (ROS parameters are not
    shell-expanded), a relative path in the working directory, then the data roots."""
    import shutil

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "config" / "models" / "mpvss_lite.yaml", home / "mine.yaml")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert load_model_config("~/mine.yaml").name == "mpvss_lite"
    assert load_model_config("config/models/mpvss_lite.yaml").name == "mpvss_lite"  # from the data root
    with pytest.raises(ConfigError, match="model config file not found"):
        load_model_config("~/other.yaml")
    shutil.copy(home / "mine.yaml", home / "mine.yml")  # .yml is a file too, not a model name
    assert load_model_config("~/mine.yml").name == "mpvss_lite"


def test_a_model_name_is_taken_from_the_most_specific_data_root(tmp_path, monkeypatch):
    """data_roots() lists the source tree before the installed share folders: its YAML wins."""
    import mpvss_ros.config as config

    first, second = tmp_path / "a", tmp_path / "b"
    for root, classes in ((first, 3), (second, 5)):
        (root / "config" / "models").mkdir(parents=True)
        (root / "config" / "models" / "dup.yaml").write_text(f"name: dup\nnum_classes: {classes}\n")
    monkeypatch.setattr(config, "data_roots", lambda: [first, second])
    assert load_model_config("dup").num_classes == 3


def test_the_stored_form_leaves_out_swin_fields_for_other_backbones():
    """Checkpoints and export contracts store to_dict(): a ResNet or MobileNetV2 model's backbone
    stays {type, depth}, as releases from before Swin read it; a Swin model's keeps its fields;
    both read back to the same configuration."""
    from mpvss_ros.config import SWIN_FIELDS

    for name, expected in (("mpvss_lite", {"type": "mobilenet_v2", "depth": 50}),
                           ("mpvss_r50", {"type": "resnet", "depth": 50})):
        cfg = load_model_config(name)
        assert cfg.to_dict()["backbone"] == expected
        assert model_config_from_dict(cfg.to_dict()) == cfg
    swin = load_model_config("mpvss_swin_base")
    assert set(SWIN_FIELDS) <= set(swin.to_dict()["backbone"])
    assert swin.to_dict()["backbone"]["window_size"] == 12
    assert model_config_from_dict(swin.to_dict()) == swin


def test_input_interpolation_and_canvas_orientation_are_checked_and_stored_only_when_not_the_default():
    """The official models resize as detectron2 (Pillow's bilinear, the canvas turned to the
    frame's orientation), mpvss_lite as it trained (OpenCV's area, a fixed canvas). A file's
    configuration keeps the form of before for the defaults, and an official one round-trips."""

    for name in ("mpvss_r50", "mpvss_r101", "mpvss_swin_tiny", "mpvss_swin_large", "mask2former_r50_cityscapes"):
        cfg = load_model_config(name)
        assert (cfg.input.interpolation, cfg.input.canvas_orientation) == ("pil_bilinear", "frame")
        back = model_config_from_dict(cfg.to_dict()).input
        assert (back.interpolation, back.canvas_orientation) == ("pil_bilinear", "frame")
    lite = load_model_config("mpvss_lite")
    assert (lite.input.interpolation, lite.input.canvas_orientation) == ("area", "fixed")
    assert not {"interpolation", "canvas_orientation"} & set(lite.to_dict()["input"])
    back = model_config_from_dict(lite.to_dict()).input
    assert (back.interpolation, back.canvas_orientation) == ("area", "fixed")
    data = lite.to_dict()
    data["input"]["interpolation"] = "bicubic"
    with pytest.raises(ConfigError, match="x.yaml: input.interpolation must be one of area, pil_bilinear, got 'bicubic'"):
        model_config_from_dict(data, where="x.yaml")
    data = lite.to_dict()
    data["input"]["canvas_orientation"] = "portrait"
    with pytest.raises(ConfigError, match="input.canvas_orientation must be one of fixed, frame, got 'portrait'"):
        model_config_from_dict(data, where="x.yaml")


# Property-based damage of the shipped configurations: whatever a file or dict holds, loading it
# is a configuration that round-trips or one ConfigError (a ValueError) of one line naming the file
# (or the caller's `where`), never another exception and never an object built from a YAML tag.

#: The shipped model files, the starting points of the damage.
SHIPPED_CONFIGS = sorted((REPO_ROOT / "config" / "models").glob("*.yaml"))

#: A YAML tag that, if any loader built it, would leave this mark in builtins.
_CONSTRUCTED_MARK = "MPVSS_CONFIG_FUZZ_CONSTRUCTED"
_CONSTRUCTING_TAG = f'!!python/object/apply:builtins.exec ["import builtins; builtins.{_CONSTRUCTED_MARK} = 1"]'


def _huge_int(index: int) -> int:
    """Integers past what a field may hold (int64, float, str()'s 4300 digits); 2**63 - 1 is left out:
    as num_classes of a file without class_names it is legal and names 2**63 - 1 classes. (A
    function, not a list: hypothesis cannot print a strategy holding an int past the digit limit.)"""
    return (2**63, -(2**63) - 1, -(2**63), 10**400, 10**5000, -(10**5000))[index]


_HUGE = st.integers(0, 5).map(_huge_int)
#: The words the configuration chooses between, so that damage also reaches the other branches.
_CHOICE_WORDS = ["swin", "resnet", "mobilenet_v2", "msdeformattn", "fpn", "canvas", "mask", "exact", "mmtrack",
                 "area", "pil_bilinear", "fixed", "frame"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-70_000, 70_000), _HUGE,
                     st.floats(), st.text(max_size=6), st.sampled_from(_CHOICE_WORDS))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=8)
_KEYS = st.one_of(_HUGE, st.sampled_from([f.name for c in (ModelConfig, *typing.get_type_hints(ModelConfig).values())
                                            if dataclasses.is_dataclass(c) for f in dataclasses.fields(c)]),
                  st.text(max_size=12), st.integers(), st.none() | st.booleans() | st.floats())


def _fits(value, hint) -> bool:
    """Whether ``value`` has the type the annotation ``hint`` documents: an int field an int64 (no
    bool), a float field a finite int or float, a list field a list of fitting entries."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is int:
        return type(value) is int and -(2**63) <= value < 2**63
    if hint is float:
        try:
            return type(value) in (int, float) and math.isfinite(float(value))
        except OverflowError:
            return False
    return isinstance(value, hint)


def _violations(data, cls: type = ModelConfig, where: str = "") -> list[tuple[bool, str]]:
    """What the annotations and the docs refuse in a configuration dict, each as (whether it is in
    the file's structure, the part of the message that names it): a missing name or num_classes, an
    unknown key, a section that is neither a mapping nor empty (structure), a value of the wrong type."""
    if not isinstance(data, dict):
        return [(True, f"{where}: expected a mapping" if where else "expected a mapping at the top level")]
    hints = typing.get_type_hints(cls)
    found = [(True, f"missing required key '{k}'") for k in ("name", "num_classes")
             if cls is ModelConfig and k not in data]
    for key, value in data.items():
        if key not in hints:
            found.append((True, f"{where}: unknown key"))
        elif dataclasses.is_dataclass(hints[key]):
            found += _violations({} if value is None else value, hints[key], key)
        elif not _fits(value, hints[key]):
            found.append((False, f": {where}.{key} " if where else f": {key} "))
    return found


def _check_loaded(cfg: ModelConfig, source) -> None:
    """A configuration that loads: what it came from had nothing the annotations refuse, it holds
    one class name per class and a palette of one triple per class (or none), the motion decoder
    is as wide as the queries, and its stored form is YAML and reads back to the same."""
    assert not _violations(source), _violations(source)  # the annotations refuse what it holds
    stored = cfg.to_dict()
    assert model_config_from_dict(stored) == cfg and model_config_from_dict(stored).to_dict() == stored
    assert yaml.safe_load(yaml.safe_dump(stored)) == stored
    assert len(cfg.class_names) == cfg.num_classes and len(cfg.palette) in (0, cfg.num_classes)
    assert cfg.motion.hidden_dim == cfg.transformer_decoder.hidden_dim


def _check_refusal(err: ConfigError, names: str) -> str:
    """A refusal is a ValueError of one line naming the file or the caller's `where`."""
    message = str(err)
    assert isinstance(err, ValueError) and len(message.splitlines()) == 1, message
    assert names in message, message
    return message


def _retyped(value) -> list:
    """``value`` as a bool, None, float, string, list or mapping, and numbers at the edges (0, -1,
    NaN, infinity, int64's ends): what a YAML file easily writes in place of the right value."""
    numbers = [0, -1, 2**63, -(2**63) - 1, math.nan, math.inf, 1e308]  # (no large num_classes: see _huge_int)
    if type(value) in (int, float) and abs(value) < 2**63:  # (not NaN)
        numbers += [float(value), -value, str(value)]
    return [True, False, None, [value], {"x": value}, *numbers]


def _containers(node) -> list:
    """``node`` and every mapping and list inside it, at any depth."""
    found = [node]
    for value in (node.values() if isinstance(node, dict) else node):
        if isinstance(value, (dict, list)):
            found += _containers(value)
    return found


def _damage_dict(draw, data: dict) -> None:
    """One random damage at any depth of ``data``: a value replaced, a key removed, an unknown key
    added, or a list cut short or made longer."""
    containers = _containers(data)
    mappings = [c for c in containers if isinstance(c, dict)]
    node = draw(st.sampled_from(mappings if draw(st.booleans()) or len(mappings) == len(containers)
                                else [c for c in containers if isinstance(c, list)]))
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    action = draw(st.sampled_from(["retype", "retype", "set", "delete", "add"] if isinstance(node, dict)
                                  else ["retype", "set", "resize"]))
    if action == "add" or not keys:
        if isinstance(node, dict):
            node[draw(_KEYS)] = draw(_VALUES)
        else:
            node.append(draw(_VALUES))
    elif action == "set":
        node[draw(st.sampled_from(keys))] = draw(_VALUES)
    elif action == "retype":  # the same value in another type, or at an edge of its own
        key = draw(st.sampled_from(keys))
        node[key] = draw(st.sampled_from(_retyped(node[key])))
    elif action == "delete":
        del node[draw(st.sampled_from(keys))]
    else:  # resize: cut the list, or repeat one of its entries
        if draw(st.booleans()):
            del node[draw(st.integers(0, len(node))):]
        else:
            node.extend([node[draw(st.sampled_from(keys))]] * draw(st.integers(1, 3)))


@settings(max_examples=300, deadline=None, report_multiple_bugs=False)
@given(st.data())
def test_a_damaged_configuration_dict_loads_and_round_trips_or_is_one_config_error(tmp_path_factory, data):
    """A shipped configuration (as YAML reads it, or in its stored form) damaged at random: wrong
    types, huge ints, NaN, missing and unknown keys at any depth, sections that are no mapping,
    lists of other lengths. model_config_from_dict gives a configuration that round-trips or one
    ConfigError naming `where` and one of the damaged keys; the same dict written as a YAML file
    gives the same outcome from load_model_config, naming the file."""
    path = data.draw(st.sampled_from(SHIPPED_CONFIGS))
    raw = yaml.safe_load(path.read_text()) if data.draw(st.booleans()) else load_model_config(path).to_dict()
    damages = data.draw(st.integers(1, 4))
    for _ in range(damages):
        _damage_dict(data.draw, raw)
    where = data.draw(st.sampled_from(["custom.yaml", "the model_config parameter"]))
    violations = _violations(raw)
    # a key or section is named before any value; a wrong type is named when it is the only damage
    named = [text for structure, text in violations if structure] or (damages == 1 and [t for _, t in violations])
    try:
        cfg = model_config_from_dict(raw, where=where)
    except ConfigError as err:
        message = _check_refusal(err, where)
        assert not named or any(text in message for text in named), (message, violations)
        cfg = None
    else:
        _check_loaded(cfg, raw)
    try:
        text = yaml.safe_dump(raw)
    except ValueError:  # an int past str()'s digit limit cannot be written
        return
    file = tmp_path_factory.mktemp("dict") / "damaged.yaml"
    file.write_text(text)
    try:
        from_file = load_model_config(file)
    except ConfigError as err:
        _check_refusal(err, str(file))
        assert cfg is None, f"the dict loads but its YAML file is refused: {err}"
    else:
        assert cfg is not None and from_file.to_dict() == cfg.to_dict()


#: What damage writes in place of a value in the YAML text: tags (SafeLoader's, Python's, unknown
#: ones, on the wrong kind of node), anchors and aliases, deep nesting, numbers YAML or a field
#: cannot hold, strings with line breaks.
_YAML_VALUES = st.one_of(
    st.sampled_from([_CONSTRUCTING_TAG, "!!python/object:os.system {}", "!!python/name:os.system"]),
    st.sampled_from(['!!int ""', '!!float ""', "!!bool maybe", "!!timestamp foo", "!!map [a, b]", "!!set [a]"]),
    st.sampled_from(['!!int ""', "!!int 12", '!!float ""', "!!float nan", "!!bool maybe", "!!bool yes",
                     "!!timestamp foo", "!!timestamp 2001-13-45", "!!binary '@@'", "!!str 3", "!!null x",
                     "!custom 3"]),
    st.sampled_from(["!!map [a, b]", "!!map ab", "!!set [a]", "!!set {a, b}", "!!seq {a: 1}", "!!omap [a]",
                     "? [1]\n  : 2", "{[1]: 2}", "{{}: 2}"]),
    st.sampled_from(["&a [1, 2]", "*a", "&a [*a]", "&a {x: *a}", "*undefined", "{<<: *a}", "{<<: [1]}"]),
    st.sampled_from(["9" * 5000, "-" + "9" * 5000, "1e400", "-.inf", ".nan", "0x7fffffffffffffff",
                     "0x8000000000000000", "0b1", "1_0", "2001-12-14", "~", "''", '"a\\nb"']),
    st.integers(1, 1500).map(lambda n: "[" * n + "]" * n),
    st.text(max_size=8).map(lambda s: yaml.safe_dump(s).removesuffix("\n...\n")),
)


def _damage_text(draw, text: bytes) -> bytes:
    """One random damage of a YAML file's bytes: cut at any byte, a byte flipped, bytes that are no
    UTF-8 or control characters inserted, a line repeated (a key written twice), indentation made a
    tab, a value replaced by a tag, anchor, alias or a nesting deeper than the parser's stack."""
    lines = text.split(b"\n")
    action = draw(st.sampled_from(["cut", "flip", "insert", "repeat", "tab", "value", "value", "value"]))
    at = draw(st.integers(0, max(len(text) - 1, 0)))
    row = draw(st.integers(0, len(lines) - 1))
    if action == "cut":
        return text[:at]
    if action == "flip":
        return text[:at] + bytes([(text[at:at + 1] or b"\0")[0] ^ draw(st.integers(1, 255))]) + text[at + 1:]
    if action == "insert":
        return text[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\x00", b"\x01",
                                                 b"\x1b", b"\t", b"\r", b"\xef\xbb\xbf", b": ", b"- "])) + text[at:]
    if action == "repeat":
        lines.insert(draw(st.integers(0, len(lines))), lines[row])
    elif action == "tab":
        lines[row] = b"\t" + lines[row].lstrip(b" ")
    else:  # a value: of a `key: value` line mostly, so that the rest still parses
        keyed = [i for i, line in enumerate(lines) if b": " in line and not line.lstrip().startswith(b"#")]
        row = draw(st.sampled_from(keyed)) if keyed and draw(st.booleans()) else row
        key, colon, _ = lines[row].partition(b": ")
        lines[row] = key + (colon or b": ") + draw(_YAML_VALUES).encode()
    return b"\n".join(lines)


@settings(max_examples=600, deadline=None, report_multiple_bugs=False)
@given(st.data())
def test_a_damaged_model_file_loads_and_round_trips_or_is_one_config_error_naming_it(tmp_path_factory, data):
    """A shipped model file's bytes damaged at random (cut, flipped, not UTF-8, duplicate keys, tabs,
    tags, anchors and aliases, deep nesting), or an empty file or a folder in its place:
    load_model_config gives a configuration that round-trips or one ConfigError of one line naming
    the file, and never builds an object from a Python tag."""
    text = data.draw(st.sampled_from(SHIPPED_CONFIGS)).read_bytes()
    for _ in range(data.draw(st.integers(1, 4))):
        text = _damage_text(data.draw, text)
    path = tmp_path_factory.mktemp("file") / "damaged.yaml"
    form = data.draw(st.sampled_from(["file", "file", "file", "empty", "folder"]))
    if form == "folder":
        path.mkdir()
    else:
        path.write_bytes(text if form == "file" else b"")
    try:
        cfg = load_model_config(path)
    except ConfigError as err:
        _check_refusal(err, str(path))
    else:
        _check_loaded(cfg, yaml.safe_load(text))
    finally:
        assert not hasattr(builtins, _CONSTRUCTED_MARK), "a Python object was built from a YAML tag"


def test_class_names_of_any_script_with_spaces_and_punctuation_are_kept():
    data = load_model_config("mpvss_lite").to_dict()
    data["class_names"] = ["road marking", "Straße", "道路", "car (parked)", "sky/cloud"] + [f"c{i}" for i in range(6)]
    assert model_config_from_dict(data).class_names == data["class_names"]
