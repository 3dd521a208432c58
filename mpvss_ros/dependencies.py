"""The oldest library versions mpvss_ros runs with, and the check of them at start.

A ROS 2 install takes numpy, OpenCV, PyYAML, Pillow, SciPy, matplotlib and tqdm from the
distribution's packages (``package.xml``; Ubuntu 22.04 for Humble, 24.04 for Jazzy), and pip
from PyPI (``setup.py``), so a robot may hold versions far older than the newest. The floors
below are the oldest versions the whole test suite has passed with (README, "Library versions");
``setup.py`` asks for the same ones.

The command line (``mpvss``) and the node launchers (``mpvss_node``, ``mpvss_lifecycle_node``)
call :func:`exit_if_unmet` before they import the engine, so that an old or broken library
is named in one line instead of failing as an ``AttributeError`` deep inside it. Two cases
are common enough to get their own remedy: a distribution's torch older than 2.1, and an
OpenCV built for numpy 1 next to numpy 2 (pip upgrades numpy to 2 when a package it installs
asks for a newer numpy than the distribution's, and such an OpenCV then cannot be imported).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from typing import Sequence

__all__ = ["MINIMUM_VERSIONS", "START_MODULES", "version_tuple", "unmet_dependencies", "exit_if_unmet"]

#: Import name -> (name in messages and in pip, as in ``setup.py``; oldest version tested).
MINIMUM_VERSIONS: dict[str, tuple[str, str]] = {
    "numpy": ("numpy", "1.21.5"),
    "cv2": ("opencv-python-headless", "4.5.4"),
    "torch": ("torch", "2.1.2"),
    "yaml": ("PyYAML", "5.4.1"),
    "tqdm": ("tqdm", "4.57.0"),
    "PIL": ("Pillow", "9.0.1"),
    "scipy": ("scipy", "1.8.0"),
    "matplotlib": ("matplotlib", "3.5.1"),
    "rosbags": ("rosbags", "0.11.6"),
}
#: What every entry point imports before it can do anything. The others come later: ``mpvss
#: train`` checks SciPy (its Hungarian matcher), ``mpvss eval --study --out`` matplotlib (the
#: study's plot) and ``mpvss bag`` rosbags once their options are parsed, before any work.
START_MODULES: tuple[str, ...] = ("numpy", "cv2", "torch", "yaml", "tqdm", "PIL")


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``"2.13.0+cpu"`` -> ``(2, 13, 0)``,
    ``"4.5.4-dev"`` -> ``(4, 5, 4)``, ``"1.26.0rc1"`` -> ``(1, 26, 0)``, ``""`` -> ``()``.

    Pre-releases compare as their release (a floor is a tested release, never a pre-release).
    """
    parts: list[int] = []
    for piece in version.strip().split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):  # "4-dev", "0rc1", "0+cpu": the release ends here
            break
    return tuple(parts)


def _import_problem(module: str, name: str, exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    line = f"{name} cannot be imported ({type(exc).__name__}: {lines[-1] if lines else ''})"
    floor = MINIMUM_VERSIONS[module][1]
    if module != "numpy":
        try:
            import numpy
        except Exception:  # noqa: BLE001 - numpy's own line says why
            return line
        if version_tuple(numpy.__version__) >= (2,) and "numpy" in str(exc).lower():
            return (f"{line}: it was built for numpy 1 and numpy {numpy.__version__} is installed (pip upgrades numpy "
                    "when a package it installs asks for a newer one); install numpy 1 beside it: "
                    "pip install 'numpy>=1.21.6,<2'")
    if isinstance(exc, ModuleNotFoundError) and exc.name == module:  # not installed at all
        if module == "torch":  # rosdep's python3-torch can be older than the floor (README)
            return (f"{line}: install it: pip install '{name}>={floor}' (a distribution's python3-torch can be too "
                    f"old: skip it with rosdep --skip-keys python3-torch; on a Jetson, NVIDIA's wheel)")
        return (f"{line}: install it: pip install '{name}>={floor}' (in a ROS 2 workspace: rosdep install "
                f"--from-paths src --ignore-src -y)")
    # installed but broken (a half-removed install, a build for another Python or library)
    return f"{line}: reinstall it: pip install --force-reinstall '{name}>={floor}'"


def _installed_version(name: str) -> str:
    """The version pip recorded for distribution ``name`` (rosbags has no ``__version__``); ``""``
    when there is no record (an install without metadata passes on being importable)."""
    try:
        return importlib.metadata.version(name)
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or damaged metadata
        return ""


def unmet_dependencies(modules: Sequence[str] = START_MODULES) -> list[str]:
    """One line for each of ``modules`` that cannot be imported or is older than its floor.

    Args:
        modules: import names, keys of :data:`MINIMUM_VERSIONS`.

    Returns:
        The problems, in the order of ``modules``; empty when all is well. A module without a
        ``__version__`` is measured by the version pip recorded for it; one without either, or
        with one that does not start with a number (tqdm says ``UNKNOWN`` when its package
        metadata is missing), passes on being importable.

    Raises:
        KeyError: a name that is not in :data:`MINIMUM_VERSIONS`.
    """
    problems = []
    for module in modules:
        name, floor = MINIMUM_VERSIONS[module]
        try:
            imported = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - ImportError, or whatever a broken build raises
            problems.append(_import_problem(module, name, exc))
            continue
        version = str(getattr(imported, "__version__", "") or _installed_version(name))
        release = version_tuple(version)
        if release and release < version_tuple(floor):
            remedy = f"pip install '{name}>={floor}'"
            if module == "torch":
                remedy += " (the distribution's python3-torch can be too old: skip it with rosdep --skip-keys python3-torch)"
            problems.append(f"{name} {version} is older than {floor}, the oldest version mpvss_ros is tested with: {remedy}")
    return problems


def exit_if_unmet(program: str, status: int, modules: Sequence[str] = START_MODULES) -> None:
    """For entry points, before they import the engine: print ``"PROGRAM: error: ..."`` (the
    problems, one per line) to stderr and exit with ``status`` when :func:`unmet_dependencies`
    finds any; return otherwise.

    Raises:
        SystemExit: with ``status``, when a library is missing, broken or too old.
    """
    problems = unmet_dependencies(modules)
    if problems:
        print("\n".join(f"{program}: error: {line}" for line in problems), file=sys.stderr)
        raise SystemExit(status)
