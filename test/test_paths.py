"""Tests of mpvss_ros.paths: the data roots, find_data, and the checks of output folders.

The command-line side of the output folders (a file given as --out, a folder that cannot be made,
one under a folder that may not be searched, ``--out=~/x``) is tested in test_cli.py.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from mpvss_ros import paths
from mpvss_ros.paths import REPO_ROOT, check_output_dir, data_roots, find_data, make_output_dir

PIP_SHARE = Path(sys.prefix) / "share" / "mpvss_ros"


# ------------------------------------------------------------------ data roots


def _ament_index(monkeypatch, share: Path | None) -> list[str]:
    """A stand-in ``ament_index_python`` whose share directory of a package NAME is ``share / NAME``
    (``share`` None: no package is installed); returns the package names it was asked for."""
    asked: list[str] = []

    class PackageNotFoundError(KeyError):
        pass

    def get_package_share_directory(name):
        asked.append(name)
        if share is None:
            raise PackageNotFoundError(name)
        return str(share / name)

    packages = types.ModuleType("ament_index_python.packages")
    packages.PackageNotFoundError = PackageNotFoundError
    packages.get_package_share_directory = get_package_share_directory
    package = types.ModuleType("ament_index_python")
    package.packages = packages
    monkeypatch.setitem(sys.modules, "ament_index_python", package)
    monkeypatch.setitem(sys.modules, "ament_index_python.packages", packages)
    return asked


def test_data_roots_are_the_source_tree_first_and_sys_prefix_last():
    """The source tree is the most specific root, a plain pip install's share folder the least."""
    roots = data_roots()
    assert roots[0] == REPO_ROOT and roots[-1] == PIP_SHARE


def test_the_ros_share_directory_is_the_second_data_root(monkeypatch, tmp_path):
    """An installed ROS 2 package's share directory (asked for mpvss_ros) comes between the two;
    without one it is left out, with no error."""
    asked = _ament_index(monkeypatch, tmp_path / "share")
    assert data_roots() == [REPO_ROOT, tmp_path / "share" / "mpvss_ros", PIP_SHARE]
    assert asked == ["mpvss_ros"]
    _ament_index(monkeypatch, None)
    assert data_roots() == [REPO_ROOT, PIP_SHARE]


# ------------------------------------------------------------------ find_data


def test_the_working_directory_comes_before_the_data_roots(monkeypatch, tmp_path):
    """A file of the same relative path in the working directory wins over the shipped one."""
    rel = Path("config") / "models" / "mpvss_lite.yaml"
    assert (REPO_ROOT / rel).is_file()
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert find_data(rel) == tmp_path / rel
    assert find_data("config/models/mpvss_lite.yaml").read_text() == "mine"


def test_find_data_finds_folders_too():
    assert find_data("config/models") == REPO_ROOT / "config" / "models"


def test_find_data_of_a_missing_path_is_none(monkeypatch, tmp_path):
    """None for a path found nowhere, relative or absolute (as a Path or a string)."""
    assert find_data(tmp_path / "missing.pt") is None
    assert find_data(str(tmp_path / "missing.pt")) is None
    monkeypatch.chdir(tmp_path)
    assert find_data("models/no_such_weights.pt") is None


def test_find_data_expands_the_home_folder(monkeypatch, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_data("~/w.pt") == tmp_path / "w.pt"
    assert find_data("~/missing.pt") is None


# ------------------------------------------------------------------ output folders


def _deny_access(monkeypatch, folder: Path, denied: int) -> None:
    """``os.access`` refuses the modes ``denied`` (``os.W_OK``, ``os.X_OK``) on ``folder``, as for a
    non-root user (these tests may run as root, whom no mode bits stop)."""
    real = os.access
    monkeypatch.setattr(paths.os, "access",
                        lambda p, mode: not mode & denied and real(p, mode) if Path(p) == folder else real(p, mode))


def test_an_output_path_that_is_no_file_nor_folder_is_refused(tmp_path):
    """Anything that exists and is not a folder (a named pipe, like /dev/null) is refused as a file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="pipe is a file, not a folder"):
        check_output_dir(fifo, "--out")


def test_a_folder_without_search_permission_is_refused(monkeypatch, tmp_path):
    """Writing in a folder needs search (x) permission as well as write permission (a folder of
    mode 0o600), for the output folder itself and for the parent it would be made in."""
    locked = tmp_path / "locked"
    locked.mkdir()
    _deny_access(monkeypatch, locked, os.X_OK)
    with pytest.raises(OSError, match=f"cannot write to the --out {locked}: no permission"):
        check_output_dir(locked, "--out")
    with pytest.raises(OSError, match="no permission to write in"):
        check_output_dir(locked / "sub", "--out")


def test_an_existing_writable_folder_in_a_read_only_parent_is_accepted(monkeypatch, tmp_path):
    """Only a folder still to be made needs a writable parent (e.g. ~/out under /home, which a user
    may not write to)."""
    parent = tmp_path / "ro"
    (parent / "out").mkdir(parents=True)
    _deny_access(monkeypatch, parent, os.W_OK | os.X_OK)
    assert check_output_dir(parent / "out", "--out") == parent / "out"
    with pytest.raises(OSError, match="no permission to write in"):
        check_output_dir(parent / "new", "--out")


def test_output_folders_given_through_the_api_have_the_home_folder_expanded(monkeypatch, tmp_path):
    """The Python API (train options, offline runs) expands ~ as the command line does, in the checks
    and in the folder made."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ValueError, match="taken is a file, not a folder"):
        check_output_dir("~/taken", "--run-dir")
    assert check_output_dir("~/new/run") == tmp_path / "new" / "run"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert make_output_dir("~/made", "--run-dir") == tmp_path / "made"
    assert (tmp_path / "made").is_dir() and not (tmp_path / "cwd" / "~").exists()
