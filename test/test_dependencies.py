"""Tests of mpvss_ros.dependencies: the library floors and the check the entry points run first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mpvss_ros import dependencies
from mpvss_ros.dependencies import MINIMUM_VERSIONS, START_MODULES, exit_if_unmet, unmet_dependencies, version_tuple

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [("2.13.0+cpu", (2, 13, 0)), ("4.5.4-dev", (4, 5, 4)), ("1.26.0rc1", (1, 26, 0)),
                                            ("5.1.0", (5, 1, 0)), ("4.10.0.84", (4, 10, 0, 84)), ("", ()),
                                            ("1.8.1a0+git", (1, 8, 1)), ("dev", ())])
def test_version_tuple(text, expected):
    assert version_tuple(text) == expected


def test_versions_compare_as_numbers_not_text():
    assert version_tuple("4.10.0") > version_tuple("4.5.4") and version_tuple("2.13.0") > version_tuple("2.1.2")
    assert version_tuple("1.21.4") < version_tuple("1.21.5") <= version_tuple("1.21.5.post1")


def test_this_environment_meets_every_floor():
    assert set(START_MODULES) <= set(MINIMUM_VERSIONS)
    assert unmet_dependencies(tuple(MINIMUM_VERSIONS)) == []


def test_setup_py_asks_for_the_same_floors():
    floors = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)"', (ROOT / "setup.py").read_text()))
    assert {name: floors.get(name.lower()) for name, _ in MINIMUM_VERSIONS.values()} == dict(MINIMUM_VERSIONS.values())


def _fake(monkeypatch, module: str, version: str) -> None:
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(__version__=version))


def test_an_old_library_is_named_with_its_floor_and_a_remedy(monkeypatch):
    _fake(monkeypatch, "yaml", "3.13")
    _fake(monkeypatch, "torch", "1.8.1")
    problems = unmet_dependencies(("numpy", "torch", "yaml"))
    assert problems == [
        "torch 1.8.1 is older than 2.1.2, the oldest version mpvss_ros is tested with: pip install 'torch>=2.1.2' "
        "(the distribution's python3-torch can be too old: skip it with rosdep --skip-keys python3-torch)",
        "PyYAML 3.13 is older than 5.4.1, the oldest version mpvss_ros is tested with: pip install 'PyYAML>=5.4.1'"]


def test_the_floor_itself_and_a_module_without_a_version_pass(monkeypatch):
    _fake(monkeypatch, "tqdm", MINIMUM_VERSIONS["tqdm"][1])
    _fake(monkeypatch, "PIL", "")
    assert unmet_dependencies(("tqdm", "PIL")) == []
    # tqdm's own __version__ when its package metadata is missing: no release to compare, as no
    # version at all (it was reported as "tqdm UNKNOWN is older than 4.57.0" and every entry point refused to start)
    _fake(monkeypatch, "tqdm", "UNKNOWN")
    assert unmet_dependencies(("tqdm",)) == []


def _refuse_import(monkeypatch, module: str, message: str, missing: bool = False) -> None:
    real = dependencies.importlib.import_module

    def import_module(name, *args):
        if name == module:
            if missing:  # what importing a module that is not installed raises
                raise ModuleNotFoundError(message, name=module)
            raise ImportError(message)
        return real(name, *args)

    monkeypatch.setattr(dependencies.importlib, "import_module", import_module)


def test_an_opencv_built_for_numpy_1_beside_numpy_2_gets_the_numpy_remedy(monkeypatch):
    # what `import cv2` of OpenCV 4.5.4 (built for numpy 1) says under numpy 2.2.6
    _refuse_import(monkeypatch, "cv2", "numpy.core.multiarray failed to import")
    monkeypatch.setattr(np, "__version__", "2.2.6")
    (line,) = unmet_dependencies(("cv2",))
    assert line.startswith("opencv-python-headless cannot be imported (ImportError: numpy.core.multiarray failed to import): "
                           "it was built for numpy 1 and numpy 2.2.6 is installed")
    assert line.endswith("pip install 'numpy>=1.21.6,<2'")
    monkeypatch.setattr(np, "__version__", "1.26.4")  # numpy 1: the import error is all there is to say
    assert unmet_dependencies(("cv2",)) == ["opencv-python-headless cannot be imported (ImportError: numpy.core.multiarray "
                                            "failed to import): reinstall it: pip install --force-reinstall "
                                            "'opencv-python-headless>=4.5.4'"]


def test_a_missing_library_is_named_with_a_remedy(monkeypatch):
    _refuse_import(monkeypatch, "scipy", "No module named 'scipy'", missing=True)
    assert unmet_dependencies(("scipy",)) == [
        "scipy cannot be imported (ModuleNotFoundError: No module named 'scipy'): install it: pip install "
        "'scipy>=1.8.0' (in a ROS 2 workspace: rosdep install --from-paths src --ignore-src -y)"]
    _refuse_import(monkeypatch, "torch", "No module named 'torch'", missing=True)
    (line,) = unmet_dependencies(("torch",))  # rosdep's python3-torch can be too old: not the remedy
    assert line.endswith("install it: pip install 'torch>=2.1.2' (a distribution's python3-torch can be too old: "
                         "skip it with rosdep --skip-keys python3-torch; on a Jetson, NVIDIA's wheel)")
    _refuse_import(monkeypatch, "tqdm", "cannot import name 'tqdm' from partially initialized module")
    assert unmet_dependencies(("tqdm",)) == [
        "tqdm cannot be imported (ImportError: cannot import name 'tqdm' from partially initialized module): "
        "reinstall it: pip install --force-reinstall 'tqdm>=4.57.0'"]
    with pytest.raises(KeyError):
        unmet_dependencies(("not_a_floor",))


def test_exit_if_unmet_prints_one_line_per_problem_and_exits(monkeypatch, capsys):
    exit_if_unmet("mpvss", 2)  # all is well: returns
    _fake(monkeypatch, "yaml", "3.13")
    _fake(monkeypatch, "tqdm", "4.0.0")
    with pytest.raises(SystemExit) as exc:
        exit_if_unmet("mpvss_node", 1)
    assert exc.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" is older")[0] for line in err] == ["mpvss_node: error: PyYAML 3.13", "mpvss_node: error: tqdm 4.0.0"]


def _shadow_tqdm(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``tqdm`` is a stand-in at version 4.0.0, and with an ``rclpy`` to be found."""
    for name, body in (("tqdm", "__version__ = '4.0.0'\n"), ("rclpy", "")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)] + sys.path)}


@pytest.mark.parametrize("command, status", [([sys.executable, "-m", "mpvss_ros", "segment", "sample:bikes", "--out", "x"], 2),
                                             ([sys.executable, str(ROOT / "scripts" / "mpvss"), "--help"], 2),
                                             ([sys.executable, str(ROOT / "scripts" / "mpvss_node")], 1),
                                             ([sys.executable, str(ROOT / "scripts" / "mpvss_lifecycle_node")], 1)])
def test_entry_points_check_before_they_import_the_engine(tmp_path, command, status):
    run = subprocess.run(command, env=_shadow_tqdm(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    program = "mpvss" if "-m" in command else Path(command[1]).name
    assert run.returncode == status, run.stderr
    assert run.stderr == (f"{program}: error: tqdm 4.0.0 is older than 4.57.0, the oldest version mpvss_ros is tested "
                          "with: pip install 'tqdm>=4.57.0'\n")
    assert not (tmp_path / "x").exists()


def test_python_m_mpvss_ros_runs_the_command_line():
    run = subprocess.run([sys.executable, "-m", "mpvss_ros", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: mpvss") and "segment" in run.stdout
