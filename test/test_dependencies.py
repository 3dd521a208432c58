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
from mpvss_ros.__main__ import main
from mpvss_ros.dependencies import MINIMUM_VERSIONS, START_MODULES, exit_if_unmet, unmet_dependencies, version_tuple

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [("2.13.0+cpu", (2, 13, 0)), ("4.5.4-dev", (4, 5, 4)), ("1.26.0rc1", (1, 26, 0)),
                                            ("5.1.0", (5, 1, 0)), ("4.10.0.84", (4, 10, 0, 84)), ("", ()),
                                            ("1.8.1a0+git", (1, 8, 1)), ("dev", ()),
                                            ("2.4.1+rocm6.1", (2, 4, 1)), ("2.6.0.dev20241112+cpu", (2, 6, 0)),
                                            ("1.21.5.post1", (1, 21, 5)), ("1.x.3", (1,)), (" 2.1.2\n", (2, 1, 2))])
def test_version_tuple(text, expected):
    """The leading numeric release only: a local part with a dot (ROCm wheels), a nightly's or a post
    release's piece, and whatever follows a piece that is no number, are not part of it."""
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


def _recorded_versions(monkeypatch, module: str, recorded: dict[str, str]) -> dict[str, str]:
    """``module`` importable without ``__version__``, and pip's records (distribution name ->
    version) replaced by ``recorded``, which the caller may change afterwards (it is returned)."""
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace())

    def version(name):
        if name not in recorded:
            raise dependencies.importlib.metadata.PackageNotFoundError(name)
        return recorded[name]

    monkeypatch.setattr(dependencies.importlib.metadata, "version", version)
    return recorded


def test_a_module_without_a_version_is_measured_by_its_installed_metadata(monkeypatch):
    """rosbags has no ``__version__``: the version pip recorded stands for it; without a record
    it passes on being importable."""
    recorded = _recorded_versions(monkeypatch, "rosbags", {"rosbags": "0.11.5"})
    assert unmet_dependencies(("rosbags",)) == ["rosbags 0.11.5 is older than 0.11.6, the oldest version mpvss_ros is "
                                                "tested with: pip install 'rosbags>=0.11.6'"]
    recorded["rosbags"] = "0.11.6"
    assert unmet_dependencies(("rosbags",)) == []
    del recorded["rosbags"]
    assert unmet_dependencies(("rosbags",)) == []
    _fake(monkeypatch, "rosbags", "0.1")  # a __version__ comes first
    recorded["rosbags"] = "0.11.9"
    assert unmet_dependencies(("rosbags",))[0].startswith("rosbags 0.1 is older")


def test_a_module_without_a_version_is_measured_by_its_distributions_metadata(monkeypatch):
    """The record is looked up by the distribution's name, not the import name: a Pillow older than
    3.4 has no ``PIL.__version__``, and pip records it as Pillow (there is no distribution "PIL"),
    so looking up "PIL" would let Pillow 3.1 pass the 9.0.1 floor."""
    _recorded_versions(monkeypatch, "PIL", {"Pillow": "3.1.2"})
    assert unmet_dependencies(("PIL",)) == ["Pillow 3.1.2 is older than 9.0.1, the oldest version mpvss_ros is "
                                            "tested with: pip install 'Pillow>=9.0.1'"]


def test_damaged_installed_metadata_passes_on_being_importable(monkeypatch):
    """A record pip cannot read (METADATA bytes that are not UTF-8 raise UnicodeDecodeError, no
    PackageNotFoundError) is no record: the module passes on being importable instead of every
    entry point stopping with a traceback before it can say anything."""
    monkeypatch.setitem(sys.modules, "rosbags", types.SimpleNamespace())

    def version(name):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(dependencies.importlib.metadata, "version", version)
    assert unmet_dependencies(("rosbags",)) == []


def _refuse_import(monkeypatch, module: str, message: str | BaseException, missing: bool = False) -> None:
    """``import module`` raises ImportError(message), or ``message`` itself when it is an exception."""
    real = dependencies.importlib.import_module

    def import_module(name, *args):
        if name == module:
            if isinstance(message, BaseException):
                raise message
            if missing:  # what importing a module that is not installed raises
                raise ModuleNotFoundError(message, name=module)
            raise ImportError(message)
        return real(name, *args)

    monkeypatch.setattr(dependencies.importlib, "import_module", import_module)


def test_an_opencv_built_for_numpy_1_beside_numpy_2_gets_the_numpy_remedy(monkeypatch):
    """Only a library other than numpy whose import error mentions numpy (in any case) under numpy 2
    gets the numpy 1 remedy; whatever exception a broken build raises is named, not a crash."""
    # what `import cv2` of OpenCV 4.5.4 (built for numpy 1) says under numpy 2.2.6
    _refuse_import(monkeypatch, "cv2", "numpy.core.multiarray failed to import")
    monkeypatch.setattr(np, "__version__", "2.2.6")
    (line,) = unmet_dependencies(("cv2",))
    assert line.startswith("opencv-python-headless cannot be imported (ImportError: numpy.core.multiarray failed to import): "
                           "it was built for numpy 1 and numpy 2.2.6 is installed")
    assert line.endswith("pip install 'numpy>=1.21.6,<2'")
    _refuse_import(monkeypatch, "cv2", "A module that was compiled using NumPy 1.x cannot be run in NumPy 2.2.6")
    (line,) = unmet_dependencies(("cv2",))
    assert "it was built for numpy 1 and numpy 2.2.6 is installed" in line
    assert line.endswith("pip install 'numpy>=1.21.6,<2'")
    # numpy's own import error mentions numpy: a broken numpy 2 is no "built for numpy 1" case
    _refuse_import(monkeypatch, "numpy", "numpy._core.multiarray failed to import")
    assert unmet_dependencies(("numpy",)) == [
        "numpy cannot be imported (ImportError: numpy._core.multiarray failed to import): reinstall it: "
        "pip install --force-reinstall 'numpy>=1.21.5'"]
    _refuse_import(monkeypatch, "cv2", "numpy.core.multiarray failed to import")
    monkeypatch.setattr(np, "__version__", "1.26.4")  # numpy 1: the import error is all there is to say
    assert unmet_dependencies(("cv2",)) == ["opencv-python-headless cannot be imported (ImportError: numpy.core.multiarray "
                                            "failed to import): reinstall it: pip install --force-reinstall "
                                            "'opencv-python-headless>=4.5.4'"]
    # OpenCV built for numpy 1 can raise AttributeError ('_ARRAY_API not found') instead of ImportError
    _refuse_import(monkeypatch, "cv2", AttributeError("_ARRAY_API not found"))
    assert unmet_dependencies(("cv2",)) == [
        "opencv-python-headless cannot be imported (AttributeError: _ARRAY_API not found): reinstall it: "
        "pip install --force-reinstall 'opencv-python-headless>=4.5.4'"]


def test_a_library_is_named_even_when_numpy_itself_cannot_be_imported(monkeypatch):
    """The numpy check of a library's import error does not fail on a numpy that cannot be imported."""
    monkeypatch.setitem(sys.modules, "numpy", None)  # `import numpy` raises ImportError
    _refuse_import(monkeypatch, "cv2", "libGL.so.1: cannot open shared object file")
    assert unmet_dependencies(("cv2",)) == [
        "opencv-python-headless cannot be imported (ImportError: libGL.so.1: cannot open shared object file)"]


def test_a_multi_line_import_error_is_quoted_by_its_last_line(monkeypatch):
    """numpy-style import errors: advice first, the cause last, blank lines around; the cause is quoted."""
    _refuse_import(monkeypatch, "scipy", "\n\nIMPORTANT: PLEASE READ THIS FOR ADVICE ON HOW TO SOLVE THIS ISSUE!\n\n"
                                         "Original error was: libgfortran.so.5: cannot open shared object file\n\n")
    assert unmet_dependencies(("scipy",)) == [
        "scipy cannot be imported (ImportError: Original error was: libgfortran.so.5: cannot open shared object "
        "file): reinstall it: pip install --force-reinstall 'scipy>=1.8.0'"]


def test_a_missing_library_is_named_with_a_remedy(monkeypatch):
    """Install a library that is not installed; reinstall one that is but cannot be imported: a module
    it imports is missing, or it is half-removed (whatever the ImportError's name)."""
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
    message = "cannot import name 'tqdm' from partially initialized module 'tqdm'"
    _refuse_import(monkeypatch, "tqdm", ImportError(message, name="tqdm"))
    assert unmet_dependencies(("tqdm",)) == [
        f"tqdm cannot be imported (ImportError: {message}): reinstall it: pip install --force-reinstall 'tqdm>=4.57.0'"]
    _refuse_import(monkeypatch, "torch", ModuleNotFoundError("No module named 'typing_extensions'", name="typing_extensions"))
    assert unmet_dependencies(("torch",)) == [
        "torch cannot be imported (ModuleNotFoundError: No module named 'typing_extensions'): reinstall it: "
        "pip install --force-reinstall 'torch>=2.1.2'"]
    with pytest.raises(KeyError):
        unmet_dependencies(("not_a_floor",))


def test_exit_if_unmet_prints_one_line_per_problem_and_exits(monkeypatch, capsys):
    """It checks the modules it is given, by default the start modules (torch and Pillow among them)."""
    exit_if_unmet("mpvss", 2)  # all is well: returns
    _fake(monkeypatch, "scipy", "0.9")  # not a start module
    exit_if_unmet("mpvss", 2)
    with pytest.raises(SystemExit) as exc:
        exit_if_unmet("mpvss_node", 3, ("scipy",))
    assert exc.value.code == 3
    assert capsys.readouterr().err == ("mpvss_node: error: scipy 0.9 is older than 1.8.0, the oldest version mpvss_ros "
                                       "is tested with: pip install 'scipy>=1.8.0'\n")
    _fake(monkeypatch, "yaml", "3.13")
    _fake(monkeypatch, "tqdm", "4.0.0")
    with pytest.raises(SystemExit) as exc:
        exit_if_unmet("mpvss_node", 1)
    assert exc.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" is older")[0] for line in err] == ["mpvss_node: error: PyYAML 3.13", "mpvss_node: error: tqdm 4.0.0"]
    _fake(monkeypatch, "torch", "0.1")
    _fake(monkeypatch, "PIL", "0.1")
    with pytest.raises(SystemExit) as exc:
        exit_if_unmet("mpvss", 2)
    assert exc.value.code == 2
    assert [line.split(" is older")[0] for line in capsys.readouterr().err.splitlines()] == [
        "mpvss: error: torch 0.1", "mpvss: error: PyYAML 3.13", "mpvss: error: tqdm 4.0.0", "mpvss: error: Pillow 0.1"]


def _with_stand_ins(tmp_path: Path, **packages: str) -> dict[str, str]:
    """An environment in which ``import NAME`` finds a stand-in for each of ``packages`` (name -> the text
    of its ``__init__.py``) before the installed one."""
    for name, body in packages.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)] + sys.path)}


@pytest.mark.parametrize("command, status", [([sys.executable, "-m", "mpvss_ros", "segment", "sample:bikes", "--out", "x"], 2),
                                             ([sys.executable, str(ROOT / "scripts" / "mpvss"), "--help"], 2),
                                             ([sys.executable, str(ROOT / "scripts" / "mpvss_node")], 1),
                                             ([sys.executable, str(ROOT / "scripts" / "mpvss_lifecycle_node")], 1)])
def test_entry_points_check_before_they_import_the_engine(tmp_path, command, status):
    env = _with_stand_ins(tmp_path, tqdm="__version__ = '4.0.0'\n", rclpy="")  # an old tqdm; an rclpy to be found
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    program = "mpvss" if "-m" in command else Path(command[1]).name
    assert run.returncode == status, run.stderr
    assert run.stderr == (f"{program}: error: tqdm 4.0.0 is older than 4.57.0, the oldest version mpvss_ros is tested "
                          "with: pip install 'tqdm>=4.57.0'\n")
    assert not (tmp_path / "x").exists()


def test_a_broken_torch_is_named_before_the_command_line_is_imported(tmp_path):
    """mpvss_ros.cli imports torch at module level: ``python3 -m mpvss_ros`` checks the libraries first."""
    env = _with_stand_ins(tmp_path, torch="raise ImportError('libtorch_cpu.so: cannot open shared object file: No such "
                                          "file or directory')\n")
    run = subprocess.run([sys.executable, "-m", "mpvss_ros", "--help"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr == ("mpvss: error: torch cannot be imported (ImportError: libtorch_cpu.so: cannot open shared object "
                          "file: No such file or directory): reinstall it: pip install --force-reinstall 'torch>=2.1.2'\n")


def test_python_m_mpvss_ros_runs_the_command_line(tmp_path, capsys):
    """``python3 -m mpvss_ros`` runs the command line with its arguments and exits with its status."""
    run = subprocess.run([sys.executable, "-m", "mpvss_ros", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: mpvss") and "segment" in run.stdout
    run = subprocess.run([sys.executable, "-m", "mpvss_ros", "segment", str(tmp_path / "missing"), "--out",
                          str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr  # a missing input
    assert "input not found" in run.stderr
    with pytest.raises(SystemExit) as exc:  # main(argv) runs argv, not sys.argv (here pytest's)
        main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: mpvss")


def test_scipy_and_matplotlib_are_checked_by_the_commands_that_need_them(tmp_path):
    """The command line builds ``mpvss train``'s options from the training package: a missing SciPy
    broke every command (``mpvss segment --help`` too) with a traceback. Now only ``mpvss train``
    needs it, and names it in one line before a run folder is made; ``mpvss eval --study --out``
    names a missing matplotlib (the study's plot) before the study's work, and ``mpvss bag`` a
    missing rosbags (a traceback before)."""
    broken = "raise ImportError('{} was removed')\n"
    env = _with_stand_ins(tmp_path, scipy=broken.format("scipy"), matplotlib=broken.format("matplotlib"),
                          rosbags=broken.format("rosbags"))
    mpvss = [sys.executable, "-m", "mpvss_ros"]
    for command in (["--help"], ["segment", "--help"], ["train", "--help"], ["eval", "--help"], ["bag", "--help"]):
        run = subprocess.run(mpvss + command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.startswith("usage: mpvss"), (command, run.stderr)
    run = subprocess.run(mpvss + ["train", "segmentor", "--run-dir", "run"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr == ("mpvss: error: scipy cannot be imported (ImportError: scipy was removed): reinstall it: "
                          "pip install --force-reinstall 'scipy>=1.8.0'\n")
    assert not (tmp_path / "run").exists()
    run = subprocess.run(mpvss + ["eval", "sample:bikes", "--self-reference", "--study", "--out", "study"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr == ("mpvss: error: matplotlib cannot be imported (ImportError: matplotlib was removed): "
                          "reinstall it: pip install --force-reinstall 'matplotlib>=3.5.1'\n")
    assert not (tmp_path / "study").exists()
    (tmp_path / "in_bag").mkdir()
    run = subprocess.run(mpvss + ["bag", "in_bag", "out_bag", "--topic", "/camera/image_raw"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr == ("mpvss: error: rosbags cannot be imported (ImportError: rosbags was removed): reinstall it: "
                          "pip install --force-reinstall 'rosbags>=0.11.6'\n")
    assert not (tmp_path / "out_bag").exists()
