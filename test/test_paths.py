"""Tests of mpvss_ros.paths: the data roots, find_data, the checks of output folders, and
write_atomic (its callers' own tests check that checkpoints, pair tables, export contracts and
TensorRT engines go through it).

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
from helpers import fill_the_disk_half_way
from mpvss_ros.paths import REPO_ROOT, check_output_dir, data_roots, find_data, make_output_dir, write_atomic

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


# ------------------------------------------------------------------ write_atomic


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_atomic_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "table.npz"
    path.write_bytes(b"earlier")
    write_atomic(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"
    write_atomic(path, memoryview(b"from a buffer"), sync=False)
    assert path.read_bytes() == b"from a buffer"
    write_atomic(tmp_path / "empty", b"")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "table.npz"]


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_write_atomic_gives_the_file_the_mode_open_would(tmp_path):
    """0o666 less the umask, as ``open(path, "wb")`` creates a file, not mkstemp's 0o600: a model
    file or cache entry written by one user stays readable to the node run by another."""
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "model.pt", b"x")
        (tmp_path / "by_open").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o644 == (tmp_path / "by_open").stat().st_mode & 0o777
    write_atomic(tmp_path / "model.pt", b"y")
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o666 & ~_umask()


@pytest.mark.parametrize("fault", ["half written", "at the rename", "at the fsync"])
def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path, monkeypatch, fault):
    path = tmp_path / "contract.json"
    path.write_bytes(b"earlier")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    if fault == "half written":
        fill_the_disk_half_way(monkeypatch)
    else:
        monkeypatch.setattr(paths.os, "replace" if fault == "at the rename" else "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"new bytes" * 1000)
    monkeypatch.undo()
    assert path.read_bytes() == b"earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["contract.json"]


def test_an_interrupted_write_leaves_no_temporary(tmp_path, monkeypatch):
    """Ctrl-C (a BaseException) during the write removes the temporary too."""
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(paths.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "x", b"data")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_syncs_only_when_asked(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(paths.os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    write_atomic(tmp_path / "a", b"data")
    assert len(synced) == 1
    write_atomic(tmp_path / "b", b"data", sync=False)
    assert len(synced) == 1


def test_the_bytes_are_in_the_file_when_it_is_synced(tmp_path, monkeypatch):
    """fsync syncs what the file holds: bytes still in Python's buffer at the fsync would reach the
    disk only after it, unsynced, and a power cut could leave the renamed file empty."""
    sizes = []
    fsync = os.fsync
    monkeypatch.setattr(paths.os, "fsync", lambda fd: (sizes.append(os.fstat(fd).st_size), fsync(fd)))
    write_atomic(tmp_path / "small", b"data")  # well under the buffer's size
    assert sizes == [4]


def test_the_temporary_is_hidden_beside_the_file_and_never_another_writers(tmp_path, monkeypatch):
    """The temporary is ``.<name>-<random>`` (or ``<prefix><random>``) in the same folder, so the
    rename stays on one file system; a name another writer holds is skipped, not opened."""
    names = iter(["aaaa", "aaaa", "bbbb", "cccc"])
    monkeypatch.setattr(paths.secrets, "token_hex", lambda n: next(names))
    seen = []
    replace = os.replace
    monkeypatch.setattr(paths.os, "replace", lambda src, dst: (seen.append(Path(src)), replace(src, dst)))
    other = tmp_path / ".x.engine-aaaa"
    other.write_bytes(b"another writer's")
    write_atomic(tmp_path / "x.engine", b"mine")
    assert seen == [tmp_path / ".x.engine-bbbb"]
    assert other.read_bytes() == b"another writer's" and (tmp_path / "x.engine").read_bytes() == b"mine"
    write_atomic(tmp_path / "y.engine", b"mine", prefix=".engine-")
    assert seen[-1] == tmp_path / ".engine-cccc"


def test_a_file_name_of_the_longest_length_can_be_written(tmp_path):
    """The default temporary name keeps 100 characters of the file's, so a 255-character name
    (the usual limit) does not make a temporary name too long."""
    path = tmp_path / ("n" * 255)
    write_atomic(path, b"data")
    assert path.read_bytes() == b"data"


def test_a_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing" / "x", b"data")
