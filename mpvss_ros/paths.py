"""Where the package's data files live: ``config/`` and ``models/``.

Looked up, in order, in the source tree (a git checkout or ``pip install -e .``), the ament share
directory of an installed ROS 2 package (``ros2 pkg prefix mpvss_ros``/share/mpvss_ros, via
``ament_index_python`` when it is importable), and ``<sys.prefix>/share/mpvss_ros`` of a plain
``pip install``.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["REPO_ROOT", "data_roots", "find_data"]

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
