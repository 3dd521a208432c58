"""The on-disk cache of exported ONNX graphs and TensorRT engines, kept within a size budget.

Layout under the cache root (:func:`default_cache_dir`; ``--cache-dir`` overrides it):

* ``onnx/<model>-<h>x<w>-<fingerprint[:16]>/``: one entry per exported pair of graphs
  (:func:`~mpvss_ros.runtime.export.cached_export`), a folder;
* ``engines/<graph>-<precision>-<key[:24]>.engine`` and its ``.json`` side-car: one entry per
  TensorRT engine (:func:`~mpvss_ros.runtime.tensorrt_backend.engine_for`).

Entries are keyed by everything that changes them (weights, export code, torch, TensorRT, GPU), so
an upgrade or a retrained model adds entries and never reuses stale ones; without a bound the cache
grows by one entry per such change (33 MiB per ONNX pair of ``mpvss_lite`` at 480 x 640, 404 MiB per
``mpvss_r50`` pair at 480 x 853; engines come on top), which a robot's disk does not absorb for long. The policy is
ccache's ``max_size``: every use of an entry marks it used (its modification time); every new export and
every :func:`~mpvss_ros.runtime.tensorrt_backend.build_engines` prunes the cache, removing
least-recently-used entries until the whole cache holds at most the budget, never the entries
the caller is about to load. The budget is ``$MPVSS_CACHE_MAX_MB`` MiB (default
:data:`DEFAULT_MAX_MB`; ``0`` turns automatic pruning off). Left-over temporary files of crashed
writes (``.export-*``, ``.engine-*``, and engine side-cars without their engine) older than
:data:`STALE_TEMP_SECONDS` go as well. An entry that is a symbolic link (kept on another disk) is
removed by removing the link.

Exports and engine builds of one entry are serialised across processes by an advisory file lock
(:func:`build_lock`, ``fcntl.flock`` on a hidden ``.<entry>.lock`` beside it): two nodes that
start together export or build once, the second then finds the entry made.

Housekeeping never fails the export or build that triggered it: errors are logged. A process that
removes an entry another process has open does not disturb it (POSIX keeps open files alive); the
other process re-exports the entry the next time it needs it. ``mpvss cache`` lists and prunes by
hand (:func:`format_entries`, :func:`prune_cache`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..values import is_integer, shown

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (exports may then run twice, harmlessly)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CacheEntry",
    "DEFAULT_MAX_MB",
    "build_lock",
    "RECENT_USE_SECONDS",
    "STALE_TEMP_SECONDS",
    "cache_budget_bytes",
    "cache_entries",
    "default_cache_dir",
    "format_entries",
    "mark_used",
    "mib_to_bytes",
    "prune_to_budget",
    "prune_cache",
]

log = logging.getLogger(__name__)

#: Default budget in MiB (``$MPVSS_CACHE_MAX_MB`` overrides it).
DEFAULT_MAX_MB = 2048
#: Temporary files and folders of interrupted writes older than this (seconds) are removed.
STALE_TEMP_SECONDS = 3600.0
#: Automatic pruning spares entries used this recently (seconds): another process may have just
#: reused one and be opening its graphs (a node starting while another one exports a new size).
RECENT_USE_SECONDS = 600.0
#: Name prefixes of the temporaries of an ONNX export (a folder) and of an engine write (a file).
EXPORT_TEMP_PREFIX = ".export-"
ENGINE_TEMP_PREFIX = ".engine-"
_TEMP_PREFIXES = (EXPORT_TEMP_PREFIX, ENGINE_TEMP_PREFIX)


@contextlib.contextmanager
def build_lock(entry: str | Path) -> Iterator[None]:
    """Hold the cross-process lock of one cache entry (exclusive, blocking) while making it.

    The lock is ``fcntl.flock`` on ``<parent>/.<name>.lock`` (created if needed, left in place: a
    few bytes, never counted as an entry). The caller re-checks for the entry once it holds the
    lock, since another process may have made it meanwhile. Without ``fcntl`` it locks nothing.
    """
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(entry.parent / f".{entry.name}.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def default_cache_dir() -> Path:
    """``$MPVSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mpvss_ros``, else ``~/.cache/mpvss_ros``."""
    env = os.environ.get("MPVSS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mpvss_ros"


def cache_budget_bytes() -> int | None:
    """The automatic pruning budget in bytes from ``$MPVSS_CACHE_MAX_MB`` (MiB; unset or empty =
    :data:`DEFAULT_MAX_MB`); None when it is ``0`` (no automatic pruning).

    Raises:
        ValueError: the variable is not a non-negative number.
    """
    raw = os.environ.get("MPVSS_CACHE_MAX_MB", "").strip()
    try:
        mib = float(raw) if raw else float(DEFAULT_MAX_MB)
    except ValueError:
        raise ValueError(f"MPVSS_CACHE_MAX_MB must be a number of MiB (0 = no limit), got {raw!r}") from None
    if not mib >= 0 or mib == float("inf"):
        raise ValueError(f"MPVSS_CACHE_MAX_MB must be a finite number of MiB >= 0 (0 = no limit), got {raw!r}")
    return None if mib == 0 else mib_to_bytes(mib)


def mib_to_bytes(mib: float) -> int:
    """``mib`` MiB (a finite number >= 0) in whole bytes, rounded down. Exact for any such float:
    ``int(1e308 * 2**20)`` raised ``OverflowError`` (the product is past a float's range), so a
    budget of ``1e308`` failed every export instead of meaning "no practical limit"."""
    scaled = mib * 2**20
    return int(scaled) if math.isfinite(scaled) else int(mib) * 2**20


@dataclass(frozen=True)
class CacheEntry:
    """One cache entry.

    Attributes:
        kind: ``onnx`` (a folder of exported graphs) or ``engine`` (a TensorRT engine).
        path: the folder or the ``.engine`` file (what :func:`mark_used` stamps).
        files: every file of the entry (an engine's side-car included).
        size_bytes: their total size in bytes.
        last_used: when it was last written or used, seconds since the epoch (the path's mtime).
    """

    kind: str
    path: Path
    files: tuple[Path, ...]
    size_bytes: int
    last_used: float


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _onnx_entry(folder: Path) -> CacheEntry | None:
    try:
        stamp = folder.stat().st_mtime
        files = tuple(sorted(p for p in folder.rglob("*") if p.is_file()))
    except OSError:  # removed meanwhile
        return None
    return CacheEntry("onnx", folder, files, sum(_file_size(f) for f in files), stamp)


def _engine_entry(engine: Path) -> CacheEntry | None:
    try:
        stamp = engine.stat().st_mtime
    except OSError:
        return None
    files = tuple(p for p in (engine, engine.with_suffix(".json")) if p.is_file())
    return CacheEntry("engine", engine, files, sum(_file_size(f) for f in files), stamp)


def cache_entries(cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """The entries of the cache at ``cache_dir`` (default :func:`default_cache_dir`), most recently
    used first; temporary files of writes in progress are not entries. An absent cache is empty."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    found: list[CacheEntry | None] = []
    onnx, engines = root / "onnx", root / "engines"
    if onnx.is_dir():
        found += [_onnx_entry(p) for p in onnx.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if engines.is_dir():
        found += [_engine_entry(p) for p in engines.glob("*.engine") if not p.name.startswith(".")]
    entries = [e for e in found if e is not None]
    return sorted(entries, key=lambda e: (-e.last_used, str(e.path)))


def mark_used(path: str | Path) -> None:
    """Stamp an entry's folder or engine file as used now (its mtime). A read-only cache is
    used as it is: the failure is logged at debug level."""
    try:
        os.utime(path)
    except OSError as exc:
        log.debug("could not mark cache entry %s as used: %s", path, exc)


def _remove(entry: CacheEntry) -> None:
    """Remove one entry and its files. An entry that is a symbolic link (a folder or engine kept
    on another disk) loses the link only: what it points to is not the cache's to delete.

    Raises:
        OSError: the entry is still in the cache under its own name (a read-only cache: an ONNX
            folder neither renamed nor deleted, a link or an engine file not unlinked).
    """
    if entry.kind == "onnx" and entry.path.is_symlink():  # (an engine's unlink below takes the link too)
        entry.path.unlink(missing_ok=True)
        log.info("removed the link %s from the cache; the folder it points to was left in place", entry.path)
        return
    if entry.kind == "onnx":
        # renamed out of the way first: a removal cut short (kill, power loss) leaves a temporary
        # folder that a later prune removes, not an entry without its contract
        doomed = entry.path.with_name(f"{EXPORT_TEMP_PREFIX}removed-{entry.path.name}-{os.getpid()}")
        try:
            os.rename(entry.path, doomed)
        except OSError:
            doomed = entry.path
        shutil.rmtree(doomed, ignore_errors=True)
        if doomed == entry.path and os.path.lexists(doomed):  # rmtree's errors were ignored
            raise OSError(f"cannot remove {entry.path}")
        if doomed.exists():
            log.warning("could not delete all of %s (removed from the cache; a later prune retries)", doomed)
    else:
        for f in entry.files:
            f.unlink(missing_ok=True)


def _remove_stale_temps(root: Path, now: float) -> None:
    """Remove what interrupted writes left, once older than :data:`STALE_TEMP_SECONDS`: temporary
    files and folders (:data:`_TEMP_PREFIXES`), and engine side-cars whose engine never arrived
    (the side-car is renamed into place first). Each removal is logged; what cannot be removed is
    skipped (a later prune retries)."""
    for sub in ("onnx", "engines"):
        folder = root / sub
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(_TEMP_PREFIXES):
                what = "left by an interrupted cache write"
            elif sub == "engines" and p.suffix == ".json" and not os.path.lexists(p.with_suffix(".engine")):
                what = "the side-car of an engine whose write was interrupted"
            else:
                continue
            try:
                if now - p.lstat().st_mtime < STALE_TEMP_SECONDS:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:  # a file, or a link (rmtree refuses links; the link goes, not its target)
                    p.unlink(missing_ok=True)
            except OSError:
                continue
            if os.path.lexists(p):
                log.debug("could not remove %s (%s); a later prune retries", p, what)
                continue
            log.info("removed %s, %s", p, what)


def prune_cache(cache_dir: str | Path | None = None, max_bytes: int = DEFAULT_MAX_MB * 2**20,
                keep: Iterable[str | Path] = (), now: float | None = None,
                spare_used_within_s: float = 0.0) -> list[CacheEntry]:
    """Remove least-recently-used entries until the cache holds at most ``max_bytes``.

    Args:
        cache_dir: the cache root (default :func:`default_cache_dir`).
        max_bytes: the budget in bytes, >= 0 (0 removes every entry not in ``keep``).
        keep: entry paths (folders or ``.engine`` files) never removed; they count towards the
            budget, so the cache can stay above it when they alone exceed it.
        now: the current time in seconds since the epoch (for the stale-temporary check and
            ``spare_used_within_s``; default ``time.time()``).
        spare_used_within_s: entries used less than this many seconds before ``now`` are not
            removed either (they count towards the budget, as ``keep``).

    Returns:
        The removed entries, least recently used first.

    Raises:
        ValueError: ``max_bytes`` < 0.
    """
    if not (is_integer(max_bytes) and max_bytes >= 0):
        raise ValueError(f"max_bytes must be an integer >= 0, got {shown(max_bytes)}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    now = time.time() if now is None else now
    _remove_stale_temps(root, now)
    protected = {Path(p).resolve() for p in keep}
    entries = cache_entries(root)
    total = sum(e.size_bytes for e in entries)
    removed: list[CacheEntry] = []
    for entry in reversed(entries):  # least recently used first
        if total <= max_bytes:
            break
        if entry.path.resolve() in protected or now - entry.last_used < spare_used_within_s:
            continue
        _remove(entry)
        total -= entry.size_bytes
        removed.append(entry)
    return removed


def prune_to_budget(cache_dir: str | Path | None, keep: Iterable[str | Path]) -> list[CacheEntry]:
    """Automatic pruning after entries were written or used: :func:`prune_cache` to
    :func:`cache_budget_bytes`, keeping ``keep`` (the entries the caller is about to load) and the
    entries used in the last :data:`RECENT_USE_SECONDS` (those another process may be about to
    load). Never raises: a bad budget or an I/O error is logged and nothing (more) is removed.

    Returns:
        The removed entries (empty when pruning is off or failed).
    """
    try:
        budget = cache_budget_bytes()
        if budget is None:
            return []
        removed = prune_cache(cache_dir, budget, keep=keep, spare_used_within_s=RECENT_USE_SECONDS)
    except (OSError, ValueError) as exc:
        log.warning("cache pruning skipped: %s", exc)
        return []
    for entry in removed:
        log.info("cache over %.0f MiB: removed the least recently used %s (%.1f MiB)", budget / 2**20, entry.path,
                 entry.size_bytes / 2**20)
    return removed


def format_entries(entries: list[CacheEntry], now: float | None = None) -> str:
    """A table of ``entries`` (kind, MiB, age of last use, path) and their total, for ``mpvss cache``."""
    now = time.time() if now is None else now
    lines = []
    for e in entries:
        age_h = max(0.0, now - e.last_used) / 3600.0
        age = f"{age_h:.1f} h" if age_h < 48 else f"{age_h / 24:.1f} d"
        lines.append(f"{e.kind:6s} {e.size_bytes / 2**20:9.1f} MiB  used {age:>8s} ago  {e.path}")
    lines.append(f"{len(entries)} entries, {sum(e.size_bytes for e in entries) / 2**20:.1f} MiB")
    return "\n".join(lines)
