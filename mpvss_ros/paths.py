"""Where the package's data files live (``config/`` and ``models/``), making output folders, and
writing files atomically.

Looked up, in order, in the source tree (a git checkout or ``pip install -e .``), the ament share
directory of an installed ROS 2 package (``ros2 pkg prefix mpvss_ros``/share/mpvss_ros, via
``ament_index_python`` when it is importable), and ``<sys.prefix>/share/mpvss_ros`` of a plain
``pip install``.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

__all__ = ["REPO_ROOT", "check_output_dir", "data_roots", "find_data", "make_output_dir", "write_atomic",
           "write_json_atomic"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_roots() -> list[Path]:
    """Candidate roots holding ``config/`` and ``models/``, most specific first."""
    roots = [REPO_ROOT]
    try:  # ROS 2 install space
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            roots.append(Path(get_package_share_directory("mpvss_ros")))
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    roots.append(Path(sys.prefix) / "share" / "mpvss_ros")
    return roots


def find_data(relative: str | Path) -> Path | None:
    """First existing ``root / relative`` over the working directory and :func:`data_roots`."""
    rel = Path(relative).expanduser()
    if rel.is_absolute():
        return rel if rel.exists() else None
    for root in [Path.cwd(), *data_roots()]:
        if (root / rel).exists():
            return root / rel
    return None


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """``path`` as a Path (``~`` expanded), checked before any work without creating anything
    (:func:`make_output_dir` creates the folder once there is something to write).

    Raises:
        ValueError: ``path`` is an existing file (a usage error).
        OSError: the folder could not be made or written to: it, or its nearest existing parent,
            is a folder this process may not write to, or that parent is a file, or a folder
            above it may not be searched.
    """
    path = Path(path).expanduser()
    try:
        return _check_output_dir(path, what)
    except PermissionError as exc:  # Path.exists() raises it (Python 3.11) under a folder that may not be searched
        raise OSError(f"cannot create the {what} {path}: no permission to search a folder above it "
                      f"({exc.strerror or exc})") from None


def _check_output_dir(path: Path, what: str) -> Path:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise OSError(f"cannot write to the {what} {path}: no permission")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent != path and not parent.is_dir():
        raise OSError(f"cannot create the {what} {path}: {parent} is a file, not a folder")
    if parent != path and not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"cannot create the {what} {path}: no permission to write in {parent}")
    return path


def make_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) for a command's outputs, if needed.

    Args:
        path: the folder.
        what: how error messages name it (e.g. ``"--out"``).

    Returns:
        ``path`` as a Path (``~`` expanded).

    Raises:
        ValueError: ``path`` is an existing file (a usage error).
        OSError: the folder cannot be made (no permission, a read-only or virtual file system, a
            file where a parent folder should be); one line naming the folder and the reason, and
            not a ``FileNotFoundError``, which the CLI reports as a missing input.
    """
    path = check_output_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the {what} {path}: {exc.strerror or exc}") from None
    return path


def write_atomic(path: str | Path, data: bytes | bytearray | memoryview, *, prefix: str | None = None,
                 sync: bool = True) -> None:
    """Replace the file ``path`` with ``data`` so that a reader finds the earlier file or the new
    one, never a part of either: the bytes go to a temporary file in the same folder, are flushed
    (and, with ``sync``, ``fsync``-ed, so a power cut cannot leave a renamed file whose bytes never
    reached the disk) and are renamed over ``path`` (``os.replace``: atomic within a file system,
    POSIX ``rename(2)``). The folder itself is not synced.

    The temporary file is created with mode ``0o666`` less the umask, as ``open`` would create
    ``path`` (``tempfile.mkstemp`` would make it ``0o600``, unreadable to the other users of a model
    or cache folder).

    Args:
        path: the file to write; its folder must exist.
        data: the whole content.
        prefix: the temporary file's name before a random suffix; default ``.<name of path>-``
            (hidden). Folders that sweep stale temporaries by prefix (the engine cache) pass theirs.
        sync: ``fsync`` the bytes before the rename.

    Raises:
        OSError: the temporary file could not be made, written or renamed (a full disk, no
            permission, a read-only file system); it is then removed, and an earlier file at
            ``path`` stays as it was.
    """
    path = Path(path)
    start = prefix if prefix is not None else f".{path.name[:100]}-"
    while True:  # O_EXCL: never open a file another writer made; 48 random bits make a clash rare
        tmp = path.parent / f"{start}{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: object, *, prefix: str | None = None) -> None:
    """Write ``obj`` as indented JSON (ASCII, a final newline) with :func:`write_atomic`: a reader
    finds the earlier file or the new one whole, never half of a rewrite (a full disk). Used for
    every JSON record the package rewrites: export contracts, engine side-cars, a training run's
    ``options.json`` and ``model_config.json``.

    Raises:
        OSError: as :func:`write_atomic`.
        TypeError, ValueError: ``obj`` is not JSON-serialisable (nothing is written).
    """
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("ascii"), prefix=prefix)
