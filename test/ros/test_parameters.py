"""The node's parameter table (mpvss_ros.ros.parameters) against config/segment.yaml, the node's
declarations and validation. No ROS needed."""

from __future__ import annotations

import array
import dataclasses
import importlib.util
import math
import os
import re
import sys
import tempfile
import types
from collections.abc import Sequence
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from mpvss_ros.ros.parameters import (
    DIS_PRESET_CHOICES,
    OPTICAL_FLOW_SCALE_RANGE,
    DEFAULT_CUT_THRESHOLD,
    DYNAMIC_PARAMETERS,
    NODE_NAME,
    PARAMETERS,
    PROPAGATOR_CHOICES,
    SPECS,
    NodeConfig,
    ParamSpec,
    check_parameter,
    defaults,
    descriptor_fields,
    palette_to_rgb,
    reconfigure,
    render_yaml,
    validate,
)

ROOT = Path(__file__).resolve().parents[2]
SEGMENT_YAML = ROOT / "config" / "segment.yaml"

EXPECTED_DEFAULTS = {
    "model": "", "weights": "", "onnx_dir": "", "device": "auto", "backend": "torch", "image_size": [], "precision": "fp32",
    "propagator": "query_flow", "optical_flow_preset": "fast", "optical_flow_scale": 0.5, "chain_flow": True,
    "schedule": "adaptive", "scene_threshold": 0.5, "cut_threshold": 0.45, "min_interval": 1, "max_interval": 10,
    "max_gap_s": 1.0,
    "input_compressed": False, "input_reliability": "best_effort", "input_depth": 1, "max_image_pixels": 4096 * 4096,
    "max_frame_age_s": 0.5,
    "publish_colored": True, "publish_overlay": True, "publish_class_masks": True, "publish_autoware_mask": False,
    "autoware_class_ids": [], "overlay_alpha": 0.5,
    "palette": [], "diagnostics_period_s": 1.0, "threads": 0,
}


def test_segment_yaml_matches_the_table_exactly():
    doc = yaml.safe_load(SEGMENT_YAML.read_text())
    assert list(doc) == [NODE_NAME]
    assert list(doc[NODE_NAME]) == ["ros__parameters"]
    params = doc[NODE_NAME]["ros__parameters"]
    assert list(params) == [p.name for p in PARAMETERS], "same names, same order"
    assert params == defaults()
    for name, value in params.items():  # YAML types must be what the node declares
        assert type(value) is type(SPECS[name].default), name
    assert SEGMENT_YAML.read_text() == render_yaml(), (
        "config/segment.yaml is out of date: python3 -m mpvss_ros.ros.parameters > config/segment.yaml")


def test_table_holds_the_documented_defaults():
    assert defaults() == EXPECTED_DEFAULTS


def test_node_config_mirrors_the_table():
    assert [f.name for f in dataclasses.fields(NodeConfig)] == [p.name for p in PARAMETERS]
    assert validate({}).as_dict() == defaults()
    assert NodeConfig().as_dict() == defaults()
    assert validate() == NodeConfig()


def test_every_parameter_is_described_and_its_default_valid():
    for spec in PARAMETERS:
        assert spec.type in ("bool", "int", "float", "str", "int_array"), spec.name
        assert len(spec.description) > 10, spec.name
        fields = descriptor_fields(spec)
        assert fields["description"] == spec.description
        if spec.type == "int":
            lo, hi, step = fields["integer_range"]
            assert step == 1 and lo <= spec.default <= hi and fields["floating_point_range"] is None
            assert all(isinstance(v, int) for v in (lo, hi, step))
        elif spec.type == "float":
            lo, hi, step = fields["floating_point_range"]
            assert step == 0.0 and lo <= spec.default <= hi and fields["integer_range"] is None
            assert isinstance(spec.default, float), f"{spec.name}: a float default keeps the ROS type DOUBLE"
            assert fields["dynamic_typing"], f"{spec.name}: '2' in a params file must not stop the node"
            assert validate({spec.name: int(math.ceil(lo))}).as_dict()[spec.name] == float(math.ceil(lo))
        else:
            assert fields["integer_range"] is None and fields["floating_point_range"] is None
        if spec.type not in ("float", "int_array"):
            assert not fields["dynamic_typing"], spec.name
        if spec.type == "int_array":  # [] reaches rclpy as a byte or bool array: not INTEGER_ARRAY
            assert fields["dynamic_typing"], spec.name
        if spec.choices:
            assert spec.default in spec.choices
            assert fields["additional_constraints"] == "one of: " + ", ".join(spec.choices)
        if spec.type != "bool":
            assert fields["additional_constraints"], spec.name


def test_dynamic_parameters_are_the_ones_the_running_engine_can_swap():
    """Exactly the schedule, propagation, frame-age, frame-size limit, overlay-opacity and palette
    parameters may change while the node runs; what the model, backend, device, input QoS or
    output set depend on is read-only."""
    from mpvss_ros.ros.core import PROPAGATION_PARAMETERS, SCHEDULE_PARAMETERS

    assert set(DYNAMIC_PARAMETERS) == {*SCHEDULE_PARAMETERS, *PROPAGATION_PARAMETERS, "max_gap_s", "max_frame_age_s",
                                       "max_image_pixels", "overlay_alpha", "palette"}
    for spec in PARAMETERS:
        assert descriptor_fields(spec)["read_only"] is (spec.name not in DYNAMIC_PARAMETERS), spec.name
    text = render_yaml()
    for spec in PARAMETERS:  # the comment above each value says whether it is dynamic
        block = text.split(f"    {spec.name}: ")[0].rsplit(":", 1)[-1]
        assert block.rstrip().endswith("(dynamic)") is spec.dynamic, spec.name


def test_reconfigure_checks_the_whole_configuration_and_refuses_read_only_names():
    cfg = validate({"schedule": "adaptive", "min_interval": 2, "max_interval": 8})
    new = reconfigure(cfg, {"schedule": "fixed:5", "scene_threshold": 1, "palette": [0x102030]})
    assert (new.schedule, new.scene_threshold, new.palette) == ("fixed:5", 1.0, (0x102030,))
    assert isinstance(new.scene_threshold, float)
    assert dataclasses.replace(new, schedule="adaptive", scene_threshold=0.5, palette=()) == cfg
    assert reconfigure(cfg, {}) == cfg
    with pytest.raises(ValueError, match="'backend' is read-only"):
        reconfigure(cfg, {"backend": "onnxruntime"})
    with pytest.raises(ValueError, match="'model' is read-only"):
        reconfigure(cfg, {"model": "mpvss_lite"})  # even to the same value: it is not a running setting
    with pytest.raises(ValueError, match="unknown parameter"):
        reconfigure(cfg, {"use_sim_time": True})
    with pytest.raises(ValueError, match="min_interval"):  # checked against the other values
        reconfigure(cfg, {"max_interval": 1})
    with pytest.raises(ValueError, match="schedule"):
        reconfigure(cfg, {"schedule": "fixed:0"})
    with pytest.raises(ValueError, match="overlay_alpha"):
        reconfigure(cfg, {"overlay_alpha": 1.5})


def test_propagator_choices_follow_the_engine():
    from mpvss_ros.propagation import PROPAGATORS

    assert PROPAGATOR_CHOICES == PROPAGATORS


def test_dis_preset_choices_follow_the_engine():
    from mpvss_ros.propagation import DIS_PRESETS

    assert DIS_PRESET_CHOICES == tuple(DIS_PRESETS)


def test_optical_flow_scale_range_follows_the_engine():
    from mpvss_ros.propagation import OPTICAL_FLOW_SCALE_RANGE as ENGINE_RANGE

    assert OPTICAL_FLOW_SCALE_RANGE == ENGINE_RANGE


def test_cut_threshold_default_follows_the_scheduler():
    from mpvss_ros.scheduling import DEFAULT_CUT_THRESHOLD as ENGINE_CUT

    assert DEFAULT_CUT_THRESHOLD == ENGINE_CUT


def test_engine_defaults_agree_across_the_node_the_command_line_and_the_engine():
    """One default per engine setting in the four places that state one: the node's table,
    EngineOptions (mpvss segment / bag), the command line's flags and the engine's constructors.
    The schedule is the one deliberate difference (the node's adaptive, the command line's fixed:5)."""
    import inspect

    from mpvss_ros.cli import build_parser
    from mpvss_ros.offline import EngineOptions, SegmentOptions
    from mpvss_ros.propagation import OpticalFlowPropagator, QueryFlowPropagator, build_propagator
    from mpvss_ros.ros.bag import BagOptions
    from mpvss_ros.scheduling import AdaptiveScheduler, FixedIntervalScheduler, parse_schedule

    def signature(f):
        return {k: v.default for k, v in inspect.signature(f).parameters.items()}

    node = defaults()
    shared = ("propagator", "optical_flow_preset", "optical_flow_scale", "chain_flow", "max_interval",
              "cut_threshold", "max_gap_s")
    for name in shared:
        assert getattr(EngineOptions(), name) == node[name], name
    assert EngineOptions().schedule == "fixed:5" != node["schedule"] == "adaptive"
    assert SegmentOptions().max_image_pixels == BagOptions().max_image_pixels == node["max_image_pixels"]
    # a file's stamps are frame index / fps: no time gaps (at 0.5 fps a 1 s gap keyed every frame)
    assert SegmentOptions().max_gap_s == math.inf and BagOptions().max_gap_s == node["max_gap_s"]
    assert BagOptions().alpha == node["overlay_alpha"]
    for command in (["segment", "in", "--out", "out"], ["bag", "in", "out", "--topic", "/t"]):
        args = build_parser().parse_args(command)
        for name in shared[:-1]:  # max_gap_s has no flag: segment's stamps are index / fps, bag's recorded
            assert getattr(args, name) == node[name], (command[0], name)
        assert args.schedule == EngineOptions().schedule
    made = signature(build_propagator)
    assert (made["optical_flow_preset"], made["optical_flow_scale"], made["chain_flow"]) == (
        node["optical_flow_preset"], node["optical_flow_scale"], node["chain_flow"])
    dis = signature(OpticalFlowPropagator.__init__)
    assert (dis["preset"], dis["flow_scale"], dis["chain_flow"]) == (
        node["optical_flow_preset"], node["optical_flow_scale"], node["chain_flow"])
    assert signature(QueryFlowPropagator.__init__)["chain_flow"] == node["chain_flow"]
    for schedule in (signature(AdaptiveScheduler.__init__), signature(parse_schedule)):
        for name in ("min_interval", "max_interval", "max_gap_s", "cut_threshold"):
            assert schedule[name] == node[name], name
    assert signature(AdaptiveScheduler.__init__)["scene_threshold"] == node["scene_threshold"]
    assert signature(FixedIntervalScheduler.__init__)["max_gap_s"] == node["max_gap_s"]


def test_validate_normalises_values():
    cfg = validate({"max_gap_s": 2, "overlay_alpha": 1, "palette": [0xFF0000, 255], "schedule": " fixed:5 ",
                    "device": "cuda:1", "model": "", "input_reliability": "reliable"})
    assert cfg.max_gap_s == 2.0 and isinstance(cfg.max_gap_s, float)
    assert cfg.overlay_alpha == 1.0
    assert cfg.palette == (0xFF0000, 255)
    assert cfg.schedule == "fixed:5"
    assert cfg.as_dict()["palette"] == [0xFF0000, 255]
    # an empty list in a params file reaches rclpy as "not set": the node passes None
    assert validate({"palette": None}).palette == ()
    # rclpy hands an INTEGER_ARRAY parameter over as array.array('q')
    assert validate({"palette": array.array("q", [0xFF0000, 255])}).palette == (0xFF0000, 255)


@pytest.mark.parametrize("name, value, words", [
    ("overlay_alpha", 1.5, "[0, 1]"),
    ("overlay_alpha", math.nan, "finite"),
    ("overlay_alpha", "0.5", "number"),
    ("input_depth", 0, "[1, 100]"),
    ("input_depth", 2.0, "integer"),
    ("input_depth", True, "integer"),
    ("threads", -1, "[0, 1024]"),
    ("max_frame_age_s", -0.1, "[0, 86400]"),
    ("scene_threshold", 0.0, "[0.001, 100]"),
    ("cut_threshold", 0.0, "[0.05, 5]"),
    ("cut_threshold", 5.5, "[0.05, 5]"),
    ("input_reliability", "fast", "best_effort, reliable, system_default"),
    ("propagator", "flow", "query_flow"),
    ("backend", "openvino", "torch, onnxruntime, tensorrt"),
    ("precision", "int8", "fp32, fp16"),
    ("device", "gpu", "cpu, cuda or cuda:N"),
    ("device", "cpu\n", "cpu, cuda or cuda:N"),  # torch.device refuses it at start
    ("device", "cuda:0\n", "cpu, cuda or cuda:N"),
    ("device", "cuda:", "cpu, cuda or cuda:N"),
    ("device", "cuda0", "cpu, cuda or cuda:N"),
    ("device", "cuda:\u0663", "cpu, cuda or cuda:N"),  # an Arabic-Indic 3: torch.device refuses it at start
    ("schedule", "fixed:1\u0665", "fixed:N"),  # int() would read it as 15
    ("schedule", "fixed:0", "fixed:N"),
    ("schedule", "adaptive:0.3", "adaptive"),
    ("schedule", "every frame", "fixed:N"),
    ("publish_colored", "yes", "bool"),
    ("publish_overlay", 1, "bool"),
    ("palette", [0x1000000], "0xffffff"),
    ("palette", [-1], "0x0"),
    ("palette", "red", "list of integers"),
    ("palette", [1.0], "list of integers"),
    ("palette", b"\x01\x02", "list of integers"),  # bytes iterate as integers but are no list
    ("model", 3, "string"),
])
def test_validation_errors_name_the_parameter(name, value, words):
    with pytest.raises(ValueError) as exc:
        validate({name: value})
    msg = str(exc.value)
    assert f"'{name}'" in msg and words in msg


def test_integers_too_large_to_print_or_to_convert_are_refused_by_name():
    """A ValueError naming the parameter, not str()'s own past its 4300-digit limit or float()'s
    OverflowError (not parametrised: pytest's test ids would print the integers)."""
    for name, value, words in (("threads", 10**5000, "got an integer too long to print"),
                               ("palette", [10**5000], "got a list holding an integer too long to print"),
                               ("max_gap_s", 10**400, "finite number")):
        with pytest.raises(ValueError) as exc:
            validate({name: value})
        assert f"'{name}'" in str(exc.value) and words in str(exc.value)


def test_cross_parameter_and_unknown_name_errors():
    with pytest.raises(ValueError, match="'min_interval'.*max_interval"):
        validate({"min_interval": 20, "max_interval": 10})
    validate({"min_interval": 10, "max_interval": 10})
    with pytest.raises(ValueError, match="'onnx_dir': needs backend onnxruntime or tensorrt"):
        validate({"onnx_dir": "/opt/export"})  # backend torch (the default) runs model/weights
    for backend in ("onnxruntime", "tensorrt"):  # either export backend runs an export folder
        assert validate({"onnx_dir": "/opt/export", "backend": backend}).onnx_dir == "/opt/export"
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['image_topic'\]"):
        validate({"image_topic": "/camera/image_raw"})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['x', 1\]"):  # a name that is no string
        validate({1: 2, "x": 3})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['x', an integer too long to print\]"):
        validate({10**5000: 2, "x": 3})  # sorting by repr raised str()'s own ValueError


def test_palette_to_rgb():
    assert palette_to_rgb([0xFF8000, 0x000001]) == [[255, 128, 0], [0, 0, 1]]
    assert palette_to_rgb(()) == []


# --------------------------------------------------------------------------------------------
# Where the table's YAML goes: the launch file passes it to the node, the ament_cmake package
# installs it (a ROS-free look at the package layout; the launch file runs on stand-in modules).
# --------------------------------------------------------------------------------------------


def test_package_layout_generates_messages_and_installs_python_config_and_launchers():
    cmake = re.sub(r"#[^\n]*", "", (ROOT / "CMakeLists.txt").read_text())
    assert re.search(r"rosidl_generate_interfaces\(\$\{PROJECT_NAME\}\s+msg/ClassMasks\.msg\s+"
                     r"msg/SegmentationInfo\.msg\s+DEPENDENCIES std_msgs sensor_msgs builtin_interfaces\s*\)", cmake)
    assert "ament_python_install_package" not in cmake, "clashes with rosidl's (ros2/rosidl_python#141)"
    assert re.search(r"install\(DIRECTORY mpvss_ros\s+DESTINATION \$\{PYTHON_INSTALL_DIR\}\s+PATTERN __pycache__ EXCLUDE",
                     cmake)
    assert re.search(r"install\(DIRECTORY config launch\s+DESTINATION share/\$\{PROJECT_NAME\}", cmake)
    assert "add_launch_test(test/ros/test_node_launch.py" in cmake
    assert "add_launch_test(test/ros/test_lifecycle_launch.py" in cmake
    for script in ("mpvss_node", "mpvss_lifecycle_node", "mpvss"):
        path = ROOT / "scripts" / script
        assert path.is_file() and os.access(path, os.X_OK), f"scripts/{script} must exist and be executable"
        assert f"scripts/{script}" in cmake
        compile(path.read_text(), str(path), "exec")
    for msg in ("ClassMasks", "SegmentationInfo"):
        assert (ROOT / "msg" / f"{msg}.msg").is_file()
    # rosidl writes an empty mpvss_ros/__init__.py into the same folder: ours must stay empty
    assert (ROOT / "mpvss_ros" / "__init__.py").read_text().strip() == ""
    pkg = ElementTree.parse(ROOT / "package.xml").getroot()
    assert pkg.findtext("export/build_type") == "ament_cmake"
    assert pkg.findtext("member_of_group") == "rosidl_interface_packages"
    buildtool = {e.text for e in pkg.findall("buildtool_depend")}
    assert {"ament_cmake", "ament_cmake_python", "rosidl_default_generators"} <= buildtool
    exec_deps = {e.text for e in pkg.findall("exec_depend")} | {e.text for e in pkg.findall("depend")}
    assert {"rclpy", "std_srvs", "vision_msgs", "diagnostic_msgs", "sensor_msgs", "launch_ros",
            "rosidl_default_runtime", "lifecycle_msgs"} <= exec_deps
    tests = {e.text for e in pkg.findall("test_depend")}
    assert {"launch_testing", "launch_testing_ros", "launch_testing_ament_cmake", "ament_cmake_pytest"} <= tests
    assert not (ROOT / "setup.cfg").exists(), "setup.cfg only served ament_python"


class _Config:
    """Stand-in for launch.substitutions.LaunchConfiguration: perform() reads the context's
    launch configurations, as the real one does."""

    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context.launch_configurations[self.name]


class _Record:
    """Stand-in for launch actions: keeps its arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


@pytest.fixture()
def launch_file(monkeypatch, tmp_path):
    """launch/segment.launch.py loaded with stand-ins for launch, launch_ros and ament_index."""
    share = tmp_path / "share"
    (share / "config").mkdir(parents=True)
    for name in ("segment.yaml", "mpvss.rviz"):
        (share / "config" / name).write_text((ROOT / "config" / name).read_text())
    stubs = {
        "launch": {"LaunchDescription": list},
        "launch.actions": {"DeclareLaunchArgument": _Record, "OpaqueFunction": _Record, "EmitEvent": _Record,
                           "RegisterEventHandler": _Record},
        "launch.substitutions": {"LaunchConfiguration": _Config},
        "launch_ros": {},
        "launch_ros.actions": {"Node": _Record, "LifecycleNode": _Record},
        "launch.events": {"matches_action": lambda action: ("matches", action)},
        "launch_ros.event_handlers": {"OnStateTransition": _Record},
        "launch_ros.events": {},
        "launch_ros.events.lifecycle": {"ChangeState": _Record},
        "lifecycle_msgs": {},
        "lifecycle_msgs.msg": {"Transition": types.SimpleNamespace(TRANSITION_CONFIGURE=1, TRANSITION_ACTIVATE=3)},
        "ament_index_python": {},
        "ament_index_python.packages": {"get_package_share_directory": lambda pkg: str(share)},
    }
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spec = importlib.util.spec_from_file_location("segment_launch", ROOT / "launch" / "segment.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.share = share
    return module


def _run(launch_file, **args):
    """The launch file's actions for these launch arguments (``ros_namespace``: a namespace pushed
    by an including launch file)."""
    configurations = {"image": "/camera/image_raw", "namespace": "", "model": "", "weights": "", "use_rviz": "false",
                      "config": str(launch_file.share / "config" / "segment.yaml"), "lifecycle": "false",
                      "autostart": "true"}
    configurations.update(args)
    return launch_file._launch_setup(types.SimpleNamespace(launch_configurations=configurations))


def test_launch_arguments(launch_file):
    description = launch_file.generate_launch_description()
    declared = {a.args[0]: a.kwargs["default_value"] for a in description if a.args}
    assert declared == {"image": "/camera/image_raw", "namespace": "", "model": "", "weights": "",
                        "use_rviz": "false", "config": str(launch_file.share / "config" / "segment.yaml"),
                        "lifecycle": "false", "autostart": "true"}


def test_launch_starts_the_node_with_the_params_file_and_overrides(launch_file):
    (node,) = _run(launch_file)
    kw = node.kwargs
    assert (kw["package"], kw["executable"], kw["name"], kw["namespace"]) == (
        "mpvss_ros", "mpvss_node", NODE_NAME, "")
    assert kw["parameters"] == [str(launch_file.share / "config" / "segment.yaml")]
    assert kw["remappings"] == [("image", "/camera/image_raw"), ("image/compressed", "/camera/image_raw/compressed")]

    (node,) = _run(launch_file, image="/front/image_color/", model="mpvss_r50", weights="/w/r50.pth")
    assert node.kwargs["parameters"][1] == {"model": "mpvss_r50", "weights": "/w/r50.pth"}
    assert node.kwargs["remappings"][1] == ("image/compressed", "/front/image_color/compressed")


def test_launch_lifecycle_node_configured_then_activated(launch_file):
    plain = _run(launch_file, namespace="front")[0].kwargs
    node, activate, configure = _run(launch_file, namespace="front", lifecycle="true")
    assert node.kwargs["executable"] == "mpvss_lifecycle_node"
    same = ("package", "name", "namespace", "remappings", "output")
    assert {k: node.kwargs[k] for k in same} == {k: plain[k] for k in same}
    assert yaml.safe_load(Path(node.kwargs["parameters"][0]).read_text()) == yaml.safe_load(
        Path(plain["parameters"][0]).read_text())
    event = configure.kwargs["event"].kwargs
    assert event == {"lifecycle_node_matcher": ("matches", node), "transition_id": 1}  # TRANSITION_CONFIGURE
    (handler,) = activate.args
    # only a successful configure activates (a later deactivate also ends in inactive)
    assert {k: handler.kwargs[k] for k in ("target_lifecycle_node", "start_state", "goal_state", "handle_once")} == {
        "target_lifecycle_node": node, "start_state": "configuring", "goal_state": "inactive", "handle_once": True}
    (emit,) = handler.kwargs["entities"]
    assert emit.kwargs["event"].kwargs == {"lifecycle_node_matcher": ("matches", node), "transition_id": 3}

    (node,) = _run(launch_file, lifecycle="true", autostart="false")
    assert node.kwargs["executable"] == "mpvss_lifecycle_node"


def test_launch_namespaced_node_gets_its_parameters(launch_file):
    (node,) = _run(launch_file, namespace="/front/")
    assert node.kwargs["namespace"] == "front"
    doc = yaml.safe_load(Path(node.kwargs["parameters"][0]).read_text())
    assert doc == {f"/front/{NODE_NAME}": {"ros__parameters": defaults()}}


def test_launch_namespaced_node_takes_only_its_own_sections(launch_file, tmp_path):
    # a multi-camera params file: each camera's section applies to its own node only; wildcards
    # apply to all, the exact section wins whatever its place in the file
    config = tmp_path / "cameras.yaml"
    config.write_text(yaml.safe_dump({
        f"/front/{NODE_NAME}": {"ros__parameters": {"input_compressed": False, "max_frame_age_s": 0.5}},
        "/**": {"ros__parameters": {"threads": 3, "max_frame_age_s": 0.9}},
        f"/rear/{NODE_NAME}": {"ros__parameters": {"input_compressed": True, "max_frame_age_s": 0.2}},
        f"/**/{NODE_NAME}": {"ros__parameters": {"schedule": "fixed:4"}},
        "/*/other_node": {"ros__parameters": {"threads": 7}},
        f"/robot/rear/{NODE_NAME}": {"ros__parameters": {"threads": 8}},
        NODE_NAME: {"ros__parameters": {"propagator": "copy"}},
    }, sort_keys=False))
    expected = {
        "rear": {"input_compressed": True, "max_frame_age_s": 0.2, "threads": 3, "schedule": "fixed:4",
                 "propagator": "copy"},
        "front": {"input_compressed": False, "max_frame_age_s": 0.5, "threads": 3, "schedule": "fixed:4",
                  "propagator": "copy"},
        "robot/rear": {"threads": 8, "max_frame_age_s": 0.9, "schedule": "fixed:4", "propagator": "copy"},
    }
    for namespace, params in expected.items():
        (node,) = _run(launch_file, namespace=namespace, config=str(config))
        doc = yaml.safe_load(Path(node.kwargs["parameters"][0]).read_text())
        assert doc == {f"/{namespace}/{NODE_NAME}": {"ros__parameters": params}}, namespace


def test_launch_keys_without_a_leading_slash_apply_as_rclpy_reads_them(launch_file, tmp_path):
    # rclpy (src/rclpy/node.cpp) puts a '/' in front of a params-file key that has none, so
    # `front/mpvss_segmenter:` and `**/mpvss_segmenter:` apply to /front/mpvss_segmenter
    config = tmp_path / "front.yaml"
    config.write_text(yaml.safe_dump({
        f"front/{NODE_NAME}": {"ros__parameters": {"weights": "/data/r50.pth", "threads": 2}},
        f"**/{NODE_NAME}": {"ros__parameters": {"schedule": "fixed:4", "threads": 5}},
        f"rear/{NODE_NAME}": {"ros__parameters": {"threads": 9}},
    }, sort_keys=False))
    (node,) = _run(launch_file, namespace="front", config=str(config))
    doc = yaml.safe_load(Path(node.kwargs["parameters"][0]).read_text())
    assert doc == {f"/front/{NODE_NAME}": {"ros__parameters": {
        "weights": "/data/r50.pth", "threads": 2, "schedule": "fixed:4"}}}


def test_launch_node_names_split_over_nested_keys(launch_file, tmp_path):
    # rcl's parser adds keys to the node name until `ros__parameters` (rcl_yaml_param_parser's
    # README: `<node_namespace_string>:` then `<node1_name>:`), so these sections name
    # /front/mpvss_segmenter and /**/mpvss_segmenter; they were dropped (empty parameters)
    config = tmp_path / "nested.yaml"
    config.write_text(
        f"/**:\n  {NODE_NAME}:\n    ros__parameters:\n      schedule: fixed:4\n      threads: 5\n"
        f"front:\n  {NODE_NAME}:\n    ros__parameters:\n      threads: 3\n"
        f"  other_node:\n    ros__parameters:\n      threads: 7\n"
        f"rear:\n  {NODE_NAME}:\n    ros__parameters:\n      threads: 9\n")
    (node,) = _run(launch_file, namespace="front", config=str(config))
    doc = yaml.safe_load(Path(node.kwargs["parameters"][0]).read_text())
    assert doc == {f"/front/{NODE_NAME}": {"ros__parameters": {"schedule": "fixed:4", "threads": 3}}}


def test_launch_under_a_pushed_namespace(launch_file, tmp_path):
    """Included under PushRosNamespace('robot1'), the node is /robot1/front/mpvss_segmenter: its
    params-file section and RViz's topics follow (the node itself gets only our namespace;
    launch_ros prefixes the pushed one)."""
    config = tmp_path / "robots.yaml"
    config.write_text(yaml.safe_dump({
        f"/robot1/front/{NODE_NAME}": {"ros__parameters": {"threads": 5}},
        f"/front/{NODE_NAME}": {"ros__parameters": {"threads": 6}},  # another node's section
    }))
    node, rviz = _run(launch_file, namespace="front", ros_namespace="/robot1", config=str(config), use_rviz="true")
    assert node.kwargs["namespace"] == "front"
    doc = yaml.safe_load(Path(node.kwargs["parameters"][0]).read_text())
    assert doc == {f"/robot1/front/{NODE_NAME}": {"ros__parameters": {"threads": 5}}}
    topics = re.findall(r"Value: (/\S+)", Path(rviz.kwargs["arguments"][1]).read_text())
    assert topics[1] == f"/robot1/front/{NODE_NAME}/overlay"
    # a pushed namespace alone: the package's bare `mpvss_segmenter:` section is rewritten for it
    (node,) = _run(launch_file, ros_namespace="robot1")
    assert node.kwargs["namespace"] == ""
    doc = yaml.safe_load(Path(node.kwargs["parameters"][0]).read_text())
    assert doc == {f"/robot1/{NODE_NAME}": {"ros__parameters": defaults()}}


def test_launch_merges_nested_parameters_leaf_by_leaf(launch_file, tmp_path):
    """Two sections that both apply and both set qos_overrides: rcl keeps every leaf, so the
    rewritten file must too."""
    config = tmp_path / "qos.yaml"
    config.write_text(yaml.safe_dump({
        "/**": {"ros__parameters": {"qos_overrides": {"/front/image_raw": {"subscription": {"depth": 5}}},
                                    "threads": 2}},
        f"/front/{NODE_NAME}": {"ros__parameters": {"qos_overrides": {
            f"/front/{NODE_NAME}/overlay": {"publisher": {"reliability": "best_effort"}},
            "/front/image_raw": {"subscription": {"reliability": "reliable"}}}, "threads": 4}},
    }))
    (node,) = _run(launch_file, namespace="front", config=str(config))
    doc = yaml.safe_load(Path(node.kwargs["parameters"][0]).read_text())
    assert doc == {f"/front/{NODE_NAME}": {"ros__parameters": {"threads": 4, "qos_overrides": {
        "/front/image_raw": {"subscription": {"depth": 5, "reliability": "reliable"}},
        f"/front/{NODE_NAME}/overlay": {"publisher": {"reliability": "best_effort"}}}}}}
    # a dotted name and the nested form are one parameter to rcl: the later section wins either way
    config.write_text(yaml.safe_dump({
        "/**": {"ros__parameters": {"qos_overrides./front/image_raw.subscription.depth": 5}},
        f"/front/{NODE_NAME}": {"ros__parameters": {"qos_overrides": {"/front/image_raw": {"subscription": {
            "depth": 2}}}}},
        f"/*/{NODE_NAME}": {"ros__parameters": {"qos_overrides./front/image_raw.subscription.history": "keep_all"}},
    }, sort_keys=False))
    (node,) = _run(launch_file, namespace="front", config=str(config))
    doc = yaml.safe_load(Path(node.kwargs["parameters"][0]).read_text())
    assert doc == {f"/front/{NODE_NAME}": {"ros__parameters": {"qos_overrides": {
        "/front/image_raw": {"subscription": {"depth": 2, "history": "keep_all"}}}}}}


def test_launch_rviz_shows_this_instances_topics(launch_file):
    _node, rviz = _run(launch_file, use_rviz="true", namespace="front", image="image_raw")
    assert (rviz.kwargs["package"], rviz.kwargs["executable"]) == ("rviz2", "rviz2")
    flag, path = rviz.kwargs["arguments"]
    text = Path(path).read_text()
    assert flag == "-d"
    topics = re.findall(r"Value: (/\S+)", text)
    assert topics == ["/front/image_raw", f"/front/{NODE_NAME}/overlay", f"/front/{NODE_NAME}/colored",
                      f"/front/{NODE_NAME}/confidence"]
    assert yaml.safe_load(text)["Visualization Manager"]["Displays"][0]["Class"] == "rviz_default_plugins/Image"


def test_backend_and_precision_choices_match_the_runtime():
    # parameters.py keeps its own copies so that reading the table does not import torch.
    from mpvss_ros.ros import parameters
    from mpvss_ros.runtime import BACKENDS as RUNTIME_BACKENDS
    from mpvss_ros.runtime import PRECISIONS as RUNTIME_PRECISIONS

    assert tuple(parameters.BACKENDS) == tuple(RUNTIME_BACKENDS)
    assert tuple(parameters.PRECISIONS) == tuple(RUNTIME_PRECISIONS)


def test_nav2_semantic_layer_snippet_matches_the_node():
    # config/nav2_semantic_layer.yaml: the node's topic names, and class names that its LabelInfo
    # carries (the layer ignores names it does not find there)
    from mpvss_ros.config import load_model_config

    doc = yaml.safe_load((ROOT / "config" / "nav2_semantic_layer.yaml").read_text())["semantic_segmentation_layer"]
    assert doc["plugin"] == "semantic_segmentation_layer::SemanticSegmentationLayer"
    (source,) = doc["observation_sources"].split()
    src = doc[source]
    assert (src["segmentation_topic"], src["confidence_topic"], src["labels_topic"]) == (
        f"/{NODE_NAME}/labels", f"/{NODE_NAME}/confidence", f"/{NODE_NAME}/label_info")
    names = [n for t in src["class_types"] for n in src[t]["classes"]]
    assert len(names) == len(set(names))
    assert set(names) <= set(load_model_config("mpvss_lite").class_names)
    for t in src["class_types"]:
        p = src[t]
        assert 0 <= p["base_cost"] <= p["max_cost"] <= 254 and 0 <= p["mark_confidence"] <= 255, t


@pytest.mark.parametrize("bad", [[720], [720, 1280, 3], [0, 640], [720, 20000]])
def test_image_size_is_empty_or_height_and_width(bad):
    with pytest.raises(ValueError, match="image_size"):
        validate({"image_size": bad})
    assert validate({"image_size": [720, 1280]}).image_size == (720, 1280)


@pytest.mark.parametrize("script", ["mpvss_node", "mpvss_lifecycle_node"])
def test_node_launchers_without_ros_say_so_in_one_line(script):
    """Run outside a sourced ROS 2 shell, the launchers exit 1 with one line, not a traceback."""
    import subprocess

    if importlib.util.find_spec("rclpy") is not None:
        pytest.skip("rclpy importable: the launcher would start the node")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "cannot start without ROS 2 (no module named 'rclpy')" in line and "setup.bash" in line


def test_schedule_adaptive_with_threshold_points_to_scene_threshold():
    """The command line's adaptive:T is two parameters on the node (fresh-user review)."""
    with pytest.raises(ValueError, match="scene_threshold"):
        validate({"schedule": "adaptive:0.7"})


@pytest.mark.parametrize("name", [p.name for p in PARAMETERS if p.type == "float"])
def test_float_parameters_refuse_bools(name):
    """Float parameters are dynamically typed, so `ros2 param set ... true` reaches validate as a bool:
    refused, not taken as 1.0."""
    with pytest.raises(ValueError, match=rf"'{name}': must be a number"):
        validate({name: True})


@pytest.mark.parametrize("name", [p.name for p in PARAMETERS if p.type == "int_array"])
def test_int_array_parameters_refuse_bool_entries(name):
    """A bool array (`ros2 param set ... "[true]"`) is no list of integers."""
    with pytest.raises(ValueError, match=rf"'{name}': must be a list of integers"):
        validate({name: [True, False]} if name != "image_size" else {name: [True, True]})


@pytest.mark.parametrize("value", ["", 0, False, bytearray(b"\x01\x02"), memoryview(b"ab"), {0xFF0000, 0x00FF00},
                                   {0xFF0000: 1}])
def test_int_array_parameters_refuse_non_lists(value):
    """Only None (an empty list in a params file) means []: '' or 0 are refused, and so are bytes
    (whose items are integers), a set and a mapping (no order to give the classes their colours)."""
    with pytest.raises(ValueError, match="'palette': must be a list of integers"):
        validate({"palette": value})


def test_image_size_range_is_inclusive_1_to_16384():
    """The descriptor promises each entry in [1, 16384]."""
    assert validate({"image_size": [1, 16384]}).image_size == (1, 16384)
    with pytest.raises(ValueError, match="image_size"):
        validate({"image_size": [720, 16385]})
    with pytest.raises(ValueError, match="image_size"):
        validate({"image_size": [0, 640]})


def test_defaults_are_fresh_lists():
    """defaults() hands out fresh lists: a caller that changes one does not change the table."""
    first = defaults()
    first["palette"].append(0xFF0000)
    first["image_size"].extend([720, 1280])
    assert defaults()["palette"] == [] and defaults()["image_size"] == []
    assert SPECS["palette"].default == [] and validate({}).palette == ()


# --------------------------------------------------------------------------------------------
# Property-based: random parameter dicts and reconfigure sequences against the table's documented
# types, ranges, choices and formats (validate / check_parameter / reconfigure docstrings).
# --------------------------------------------------------------------------------------------

_REFUSED = object()  # what documented_value() gives for a value the table refuses
#: The documented device and schedule formats, N in ASCII digits (torch.device takes no others).
DEVICE_FORMAT = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
SCHEDULE_FORMAT = re.compile(r"adaptive|fixed:[1-9][0-9]*")
#: Names rclpy may hand over that the node does not declare: misspellings and other nodes' parameters.
MISSPELT_NAMES = ("use_sim_time", "image_topic", "Schedule", "palete", "overlay-alpha", "max_interval ", "",
                  "qos_overrides./image.subscription.depth")
#: Values of every wrong kind (and for some parameters right kind, out of range).
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([2**63, -(2**63) - 1, 10**400, -(10**400), 10**5000, [10**5000]]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["", " ", "fixed:5 ", "fixed:0", "fixed:05", "adaptive:0.3", "cuda:", "CPU", "cuda:1\n",
                     "/no/such/weights.pt", "no_such_model", "0.5", "true", "[720, 1280]"]),
    st.binary(max_size=4), st.binary(max_size=4).map(bytearray),
    st.lists(st.one_of(st.integers(-2, 2**25), st.booleans(), st.floats(), st.none(), st.text(max_size=2)),
             max_size=4),
    st.lists(st.integers(1, 16384), min_size=2, max_size=2).map(tuple),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.frozensets(st.integers(0, 3), max_size=2),
)


def documented_value(name: str, value):
    """The value ``name`` takes for ``value`` by the table's documentation (its type, inclusive range,
    choices, the device and schedule formats, image_size's length; a None list is []), normalised as
    documented (a number for a float parameter as float, a list as tuple, the schedule stripped),
    or ``_REFUSED``."""
    spec = SPECS[name]
    lo, hi = spec.min, spec.max
    if spec.type == "bool":
        return value if isinstance(value, bool) else _REFUSED
    if spec.type in ("int", "float"):
        numeric = (int,) if spec.type == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or value != value or not lo <= value <= hi:
            return _REFUSED  # exact comparisons: a huge integer is out of range, not a float overflow
        return float(value) if spec.type == "float" else value
    if spec.type == "str":
        if not isinstance(value, str) or (spec.choices is not None and value not in spec.choices):
            return _REFUSED
        if name == "device" and not DEVICE_FORMAT.fullmatch(value):
            return _REFUSED
        if name == "schedule":
            return value.strip() if SCHEDULE_FORMAT.fullmatch(value.strip()) else _REFUSED
        return value
    if value is None:  # int_array: an empty list in a params file reaches rclpy as "not set"
        return ()
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):  # ordered lists only
        return _REFUSED
    if any(isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi for v in value):
        return _REFUSED
    if name == "image_size" and len(value) not in (0, 2):
        return _REFUSED
    return tuple(value)


def _documented_values(spec: ParamSpec):
    """Values the table accepts for ``spec``, edges included, in the forms rclpy and YAML hand over."""
    if spec.type == "bool":
        return st.booleans()
    if spec.type == "int":
        return st.integers(int(spec.min), int(spec.max)) | st.sampled_from([int(spec.min), int(spec.max)])
    if spec.type == "float":  # a whole number in a params file arrives as an integer
        return (st.floats(spec.min, spec.max) | st.sampled_from([spec.min, spec.max])
                | st.integers(math.ceil(spec.min), math.floor(spec.max)))
    if spec.type == "int_array":
        item = st.integers(int(spec.min), int(spec.max))
        lists = (st.lists(item, min_size=2, max_size=2) if spec.name == "image_size"
                 else st.lists(item, max_size=5))
        return st.none() | st.just([]) | lists | lists.map(tuple) | lists.map(lambda v: array.array("q", v))
    if spec.choices is not None:
        return st.sampled_from(spec.choices)
    if spec.name == "device":
        return st.sampled_from(["auto", "cpu", "cuda"]) | st.integers(0, 15).map("cuda:{}".format)
    if spec.name == "schedule":
        return (st.just("adaptive") | st.integers(1, 10**6).map("fixed:{}".format)).flatmap(
            lambda s: st.sampled_from([s, f" {s}", f"{s}\n", f"\t{s} "]))
    return st.text(max_size=10) | st.sampled_from(["", "mpvss_lite", "/no/such/file.pt", "/no/such/export/"])


def _out_of_range(spec: ParamSpec):
    """Numbers just outside ``spec``'s range (int/float), lists with one entry outside or of the wrong
    length (int_array)."""
    if spec.type in ("int", "float"):
        below = st.integers(max_value=math.ceil(spec.min) - 1)
        above = st.integers(min_value=math.floor(spec.max) + 1)
        if spec.type == "float":
            below |= st.floats(max_value=spec.min, exclude_max=True, allow_nan=False)
            above |= st.floats(min_value=spec.max, exclude_min=True, allow_nan=False)
        return below | above
    if spec.type == "int_array":
        outside = st.sampled_from([[int(spec.min) - 1, int(spec.min)], [int(spec.max) + 1, int(spec.max)]])
        if spec.name == "image_size":  # [height] or [height, width, channels]: in range, wrong length
            outside |= st.lists(st.integers(1, 16384), min_size=1, max_size=4).filter(lambda v: len(v) != 2)
        return outside
    return st.nothing()


def _wrong_kind(spec: ParamSpec):
    """Values of a neighbouring type: what a params file or ``ros2 param set`` of the wrong type hands over."""
    if spec.type == "bool":
        return st.sampled_from([0, 1, "true", "false", None])
    if spec.type == "int":
        return st.booleans() | st.floats(spec.min, spec.max) | st.sampled_from([None, "1", [1]])
    if spec.type == "float":
        return st.booleans() | st.sampled_from([None, "0.5", [0.5], math.nan, math.inf, -math.inf, 10**400])
    if spec.type == "str":
        return st.sampled_from([None, 0, 1.5, True, b"cpu", ["cpu"]])
    return st.sampled_from(["", "[1, 2]", 0, False, b"\x01\x02", bytearray(b"\x01"), {1, 2}, {1: 2}, [1.0, 2.0],
                            [True, True], [None], [10**5000]])


def parameter_values(name: str):
    """Any value for parameter ``name``: accepted ones, out of range ones and every wrong kind."""
    spec = SPECS[name]
    documented = _documented_values(spec)
    return st.one_of(documented, documented, _out_of_range(spec), _wrong_kind(spec), ODD_VALUES)


#: Parameters checked against each other (min_interval <= max_interval; onnx_dir needs an export backend).
LINKED_NAMES = (("min_interval", "max_interval"), ("onnx_dir", "backend"))


@st.composite
def parameter_dicts(draw, names=tuple(SPECS), unknown: bool = True):
    """A dict of some of ``names`` (often both of a linked pair) with any values, sometimes with
    names the node does not declare."""
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
    for pair in LINKED_NAMES:
        if set(pair) <= set(names) and draw(st.booleans()):
            chosen += [n for n in pair if n not in chosen]
    values = {name: draw(parameter_values(name)) for name in chosen}
    if unknown and draw(st.integers(0, 9)) == 0:
        values[draw(st.sampled_from(MISSPELT_NAMES))] = draw(ODD_VALUES)
    return values


def documented_outcome(values: dict) -> tuple[dict | None, set[str]]:
    """(the documented configuration as a dict, or None when refused; the names a refusal may name)."""
    unknown = set(values) - set(SPECS)
    if unknown:
        return None, unknown
    merged = {**defaults(), **values}
    expected = {name: documented_value(name, value) for name, value in merged.items()}
    culprits = {name for name, value in expected.items() if value is _REFUSED}
    if culprits:
        return None, culprits
    if expected["onnx_dir"] and expected["backend"] == "torch":
        return None, {"onnx_dir"}
    if expected["min_interval"] > expected["max_interval"]:
        return None, {"min_interval"}
    return expected, set()


def assert_names_one_of(exc: ValueError, culprits: set[str]):
    """The error names (quoted) one of the parameters that make the values wrong."""
    assert any(repr(name) in str(exc) for name in culprits), (str(exc), culprits)


def assert_documented_config(config: NodeConfig, expected: dict):
    """Every field equals the documented value, with the documented type (float stays float)."""
    for name, value in expected.items():
        got = getattr(config, name)
        assert got == value and type(got) is type(value), (name, got, value)


@settings(max_examples=1000, deadline=None)
@given(values=parameter_dicts())
@example(values={"max_gap_s": 10**400})  # an integer no float holds: out of range, not OverflowError
@example(values={"threads": 10**5000})  # past str()'s 4300 digits: the error still names the parameter
@example(values={"palette": [10**5000]})
def test_validate_gives_the_documented_config_or_a_value_error_naming_a_parameter(values):
    """validate() of random parameter dicts (every kind of wrong value, unknown names): either the
    NodeConfig the table documents, with the documented normalisation, which round-trips through its
    own values and a params file (YAML), or ValueError naming a parameter at fault; nothing else."""
    expected, culprits = documented_outcome(values)
    try:
        config = validate(values)
    except ValueError as exc:
        assert expected is None, f"refused {values!r}: {exc}"
        assert_names_one_of(exc, culprits)
        return
    assert expected is not None, f"accepted {values!r}; documented refusal naming one of {culprits}"
    assert_documented_config(config, expected)
    assert validate(config.as_dict()) == config
    assert validate(yaml.safe_load(yaml.safe_dump(config.as_dict()))) == config


@settings(max_examples=1000, deadline=None)
@given(data=st.data(), name=st.sampled_from([p.name for p in PARAMETERS]))
def test_check_parameter_checks_one_value_as_documented(data, name):
    """check_parameter(name, value) alone: the documented normalised value, or ValueError naming it."""
    value = data.draw(parameter_values(name))
    expected = documented_value(name, value)
    try:
        got = check_parameter(name, value)
    except ValueError as exc:
        assert expected is _REFUSED, f"{name}={value!r} refused: {exc}"
        assert repr(name) in str(exc)
        return
    assert expected is not _REFUSED, f"{name}={value!r} accepted as {got!r}"
    assert got == expected and type(got) is type(expected)


class ReconfigureMachine(RuleBasedStateMachine):
    """``ros2 param set`` sequences on a running configuration (:func:`reconfigure`); the node's
    machine below runs them through SegmentationCore.reconfigure instead."""

    #: the model's class count, when the palette may hold no more colours than that
    classes: int | None = None

    def begin(self, config: NodeConfig) -> None:
        """Run with ``config``."""
        self.config = config

    def running(self) -> NodeConfig:
        """The running configuration."""
        return self.config

    def apply(self, changes: dict) -> NodeConfig:
        """``ros2 param set`` of ``changes``: the new configuration, or ValueError."""
        self.config = reconfigure(self.config, changes)
        return self.config

    @initialize(values=parameter_dicts(unknown=False))
    def start(self, values):
        """Start from any configuration validate accepts."""
        expected, _ = documented_outcome(values)
        self.begin(validate(values if expected is not None else {}))

    @rule(changes=parameter_dicts(names=DYNAMIC_PARAMETERS, unknown=False))
    def set_dynamic(self, changes):
        """A change of dynamic parameters: the documented whole configuration, or refused as a
        whole (the running configuration unchanged) naming a parameter at fault."""
        before = self.running()
        expected, culprits = documented_outcome({**before.as_dict(), **changes})
        if expected is not None and self.classes is not None and len(expected["palette"]) > self.classes:
            expected, culprits = None, {"palette"}  # more colours than the model has classes
        try:
            new = self.apply(changes)
        except ValueError as exc:
            assert self.running() is before, "a refused change leaves the running configuration"
            assert expected is None, f"refused {changes!r}: {exc}"
            assert_names_one_of(exc, culprits)
            return
        assert expected is not None, f"accepted {changes!r}; documented refusal naming one of {culprits}"
        assert_documented_config(new, expected)
        assert self.running() is new
        assert reconfigure(new, {}) == new

    @rule(palette=st.lists(st.integers(0, 0xFFFFFF), max_size=14))
    def set_palette(self, palette):
        """A palette of up to 14 colours (``mpvss_lite`` has 11 classes), alone or with a bad value."""
        self.set_dynamic({"palette": palette})
        self.set_dynamic({"palette": palette, "overlay_alpha": 2.0})

    @rule(data=st.data(), read_only=st.sampled_from([p.name for p in PARAMETERS if not p.dynamic]),
          same=st.booleans())
    def set_read_only(self, data, read_only, same):
        """A change that holds a read-only name, even at its running value, is refused naming a
        read-only (or unknown) name, and nothing changes."""
        before = self.running()
        changes = data.draw(parameter_dicts())
        changes[read_only] = getattr(before, read_only) if same else data.draw(parameter_values(read_only))
        with pytest.raises(ValueError) as exc:
            self.apply(changes)
        assert self.running() is before
        assert_names_one_of(exc.value, {n for n in changes if n not in SPECS or not SPECS[n].dynamic})
        assert "read-only" in str(exc.value) or "unknown" in str(exc.value)

    @invariant()
    def config_round_trips(self):
        """The running configuration is one validate gives back unchanged."""
        assert validate(self.running().as_dict()) == self.running()


TestReconfigureSequences = ReconfigureMachine.TestCase
TestReconfigureSequences.settings = settings(max_examples=200, stateful_step_count=12, deadline=None)


def test_node_reconfigure_sequences(lite, types):
    """The same sequences through SegmentationCore.reconfigure (the node's on-set-parameters
    callback): as parameters.reconfigure, plus a palette of more colours than the model's classes
    refused; a refused change leaves the configuration and the palette as they were, an accepted
    palette colours the classes from class 0."""
    from mpvss_ros.ros.core import SegmentationCore, build_segmenter

    segmenter = build_segmenter(validate({}), lite)  # reconfigure only reads the running engine

    class NodeReconfigure(ReconfigureMachine):
        classes = int(segmenter.num_classes)

        def begin(self, config):
            self.core = SegmentationCore(config, lite, types, segmenter=segmenter)

        def running(self):
            return self.core.config

        def apply(self, changes):
            palette = self.core.palette
            try:
                return self.core.reconfigure(changes)
            except ValueError:
                assert self.core.palette is palette, "a refused change leaves the palette"
                raise

        @invariant()
        def palette_follows_the_parameter(self):
            """The palette parameter's colours are the first classes' colours."""
            colours = palette_to_rgb(self.core.config.palette)
            assert self.core.palette.shape == (self.classes, 3)
            assert self.core.palette[: len(colours)].tolist() == colours

    run_state_machine_as_test(NodeReconfigure, settings=settings(max_examples=100, stateful_step_count=10,
                                                                 deadline=None))
