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
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

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
