"""Model configuration validation: a bad value is one ConfigError naming the key, before a model is built."""

import pytest

from mpvss_ros.config import ConfigError, load_model_config, model_config_from_dict
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
    ("mpvss_lite", "num_classes", 0, "num_classes must be >= 1, got 0"),
    ("mpvss_lite", "class_names", ["a", "b", "c"], "3 class_names for num_classes=11"),
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


def test_unreadable_yaml_files_are_one_line_naming_the_file(tmp_path):
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
    with pytest.raises(ConfigError, match="big.yaml: a value YAML could not read: .*4300 digits"):
        load_model_config(big)


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
