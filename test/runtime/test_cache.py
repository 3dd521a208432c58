"""The export / engine cache: entries, least-recently-used pruning, the budget, ``mpvss cache``."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from mpvss_ros.cli import main
from mpvss_ros.model_loader import load_model
from mpvss_ros.runtime import cache
from mpvss_ros.runtime.cache import (
    DEFAULT_MAX_MB,
    RECENT_USE_SECONDS,
    STALE_TEMP_SECONDS,
    build_lock,
    cache_budget_bytes,
    cache_entries,
    default_cache_dir,
    format_entries,
    mark_used,
    prune_cache,
    prune_to_budget,
)
from mpvss_ros.runtime.export import cached_export

KIB, MIB = 2**10, 2**20
T0 = 1_700_000_000.0  # mtimes of the fake entries, seconds since the epoch


def _onnx(root, name, size, stamp, unit=MIB):
    """An ONNX entry folder of ``size`` ``unit``s (a graph and a contract in a sub-folder) used at ``stamp``."""
    d = root / "onnx" / name
    (d / "sub").mkdir(parents=True)
    (d / "key_frame.onnx").write_bytes(b"k" * (size * unit - 100))
    (d / "sub" / "contract.json").write_bytes(b"c" * 100)
    os.utime(d, (stamp, stamp))
    return d


def _engine(root, name, size, stamp, unit=MIB, side_car=True):
    """An engine of ``size`` ``unit``s used at ``stamp``: 10 bytes of them in its .json side-car, if any."""
    (root / "engines").mkdir(parents=True, exist_ok=True)
    e = root / "engines" / f"{name}.engine"
    e.write_bytes(b"e" * (size * unit - 10 * side_car))
    if side_car:
        e.with_suffix(".json").write_bytes(b"j" * 10)
    os.utime(e, (stamp, stamp))
    return e


@pytest.fixture
def fake_cache(tmp_path):
    """Four entries of 1-4 MiB, oldest first: a (onnx, 1), b (engine, 2), c (onnx, 3), d (engine, 4);
    plus an interrupted export and an interrupted engine write, which are not entries."""
    paths = {
        "a": _onnx(tmp_path, "m-64x64-aaaa", 1, T0),
        "b": _engine(tmp_path, "key_frame-fp32-bbbb", 2, T0 + 10),
        "c": _onnx(tmp_path, "m-64x64-cccc", 3, T0 + 20),
        "d": _engine(tmp_path, "non_key_frame-fp32-dddd", 4, T0 + 30),
    }
    (tmp_path / "onnx" / ".export-tmp1").mkdir()
    (tmp_path / "engines" / ".engine-tmp2").write_bytes(b"x")
    return tmp_path, paths


def test_entries_most_recent_first_with_sizes(fake_cache):
    root, p = fake_cache
    entries = cache_entries(root)
    assert [e.path for e in entries] == [p["d"], p["c"], p["b"], p["a"]]
    assert [e.kind for e in entries] == ["engine", "onnx", "engine", "onnx"]
    assert [e.size_bytes for e in entries] == [4 * MIB, 3 * MIB, 2 * MIB, 1 * MIB]
    assert entries[0].files == (p["d"], p["d"].with_suffix(".json"))
    assert entries[1].files == (p["c"] / "key_frame.onnx", p["c"] / "sub" / "contract.json")
    assert [e.last_used for e in entries] == [T0 + 30, T0 + 20, T0 + 10, T0]
    assert cache_entries(root / "absent") == []
    os.utime(p["c"], (T0 + 30, T0 + 30))  # used at the same time as d: ordered by path
    assert [e.path for e in cache_entries(root)][:2] == sorted([p["c"], p["d"]], key=str)


def test_prune_removes_least_recently_used_until_within_budget(fake_cache):
    root, p = fake_cache
    removed = prune_cache(root, 7 * MIB, now=T0 + 40)  # 10 MiB held: a (1) and b (2) go, 7 MiB stay
    assert [e.path for e in removed] == [p["a"], p["b"]]
    assert not p["a"].exists() and not p["b"].exists() and not p["b"].with_suffix(".json").exists()
    assert [e.path for e in cache_entries(root)] == [p["d"], p["c"]]
    assert prune_cache(root, 7 * MIB, now=T0 + 40) == []  # within budget: nothing more


def test_mark_used_moves_an_entry_to_the_front(fake_cache):
    root, p = fake_cache
    mark_used(p["a"])  # now the most recently used
    removed = prune_cache(root, 5 * MIB, now=T0 + 40)
    assert [e.path for e in removed] == [p["b"], p["c"]]
    assert {e.path for e in cache_entries(root)} == {p["a"], p["d"]}
    mark_used(p["b"])  # pruned meanwhile (by another process): nothing to mark, no error


def test_prune_keeps_protected_entries_even_over_budget(fake_cache, monkeypatch):
    root, p = fake_cache
    monkeypatch.chdir(root)  # a kept path relative to the current folder is the same entry
    removed = prune_cache(root, 0, keep=[p["a"], str(Path("engines") / p["b"].name)], now=T0 + 40)
    assert [e.path for e in removed] == [p["c"], p["d"]]
    assert [e.path for e in cache_entries(root)] == [p["b"], p["a"]]  # 3 MiB > 0: protected
    with pytest.raises(ValueError, match="max_bytes"):
        prune_cache(root, -1)


def test_stale_temporaries_removed_fresh_ones_kept(fake_cache):
    """Temporaries go only when older than STALE_TEMP_SECONDS (an export may run for many
    minutes); a lock file never does, however old (another process may hold it)."""
    root, _ = fake_cache
    tmp_export, tmp_engine = root / "onnx" / ".export-tmp1", root / "engines" / ".engine-tmp2"
    lock = root / "onnx" / ".m-64x64-aaaa.lock"
    lock.touch()
    os.utime(lock, (T0, T0))
    prune_cache(root, 100 * MIB)  # now: the temporaries were just written, a write may be running
    assert tmp_export.exists() and tmp_engine.exists()
    prune_cache(root, 100 * MIB, now=tmp_export.stat().st_mtime + STALE_TEMP_SECONDS - 60)
    assert tmp_export.exists() and tmp_engine.exists()
    prune_cache(root, 100 * MIB, now=tmp_export.stat().st_mtime + STALE_TEMP_SECONDS + 1)
    assert not tmp_export.exists() and not tmp_engine.exists()
    assert lock.exists()
    assert len(cache_entries(root)) == 4


@pytest.mark.parametrize("raw, expected", [(None, DEFAULT_MAX_MB * MIB), ("", DEFAULT_MAX_MB * MIB), ("0", None),
                                           ("512", 512 * MIB), (" 0.5 ", MIB // 2), ("  ", DEFAULT_MAX_MB * MIB)])
def test_budget_from_environment(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv("MPVSS_CACHE_MAX_MB", raising=False)
    else:
        monkeypatch.setenv("MPVSS_CACHE_MAX_MB", raw)
    assert cache_budget_bytes() == expected


@pytest.mark.parametrize("raw", ["lots", "-1", "inf", "nan"])
def test_bad_budget_is_a_clear_error_and_automatic_pruning_skips(fake_cache, monkeypatch, caplog, raw):
    root, _ = fake_cache
    monkeypatch.setenv("MPVSS_CACHE_MAX_MB", raw)
    with pytest.raises(ValueError, match="MPVSS_CACHE_MAX_MB"):
        cache_budget_bytes()
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.runtime.cache"):
        assert prune_to_budget(root, keep=[]) == []
    assert "pruning skipped" in caplog.text and len(cache_entries(root)) == 4


def test_an_io_error_while_pruning_is_logged_not_raised(fake_cache, monkeypatch, caplog):
    """Housekeeping never fails the export or build that triggered it (a read-only cache, say)."""
    root, _ = fake_cache

    def failing(*args, **kwargs):
        raise PermissionError("read-only cache")

    monkeypatch.setattr(cache, "prune_cache", failing)
    monkeypatch.setenv("MPVSS_CACHE_MAX_MB", "1")
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.runtime.cache"):
        assert prune_to_budget(root, keep=[]) == []
    assert "pruning skipped" in caplog.text and "read-only cache" in caplog.text


def test_automatic_pruning_follows_the_budget(fake_cache, monkeypatch):
    root, p = fake_cache
    monkeypatch.setenv("MPVSS_CACHE_MAX_MB", "0")  # off
    assert prune_to_budget(root, keep=[]) == [] and len(cache_entries(root)) == 4
    monkeypatch.setenv("MPVSS_CACHE_MAX_MB", "5")
    assert [e.path for e in prune_to_budget(root, keep=[p["a"]])] == [p["b"], p["c"]]
    assert {e.path for e in cache_entries(root)} == {p["a"], p["d"]}  # 5 MiB: a is kept


def test_cached_export_marks_use_and_prunes_older_exports(tmp_path, monkeypatch):
    model = load_model("mpvss_lite").model
    first = cached_export(model, (64, 64), tmp_path)
    os.utime(first, (T0, T0))
    assert cached_export(model, (64, 64), tmp_path) == first
    assert first.stat().st_mtime > T0  # a reuse marks the entry used
    size = cache_entries(tmp_path)[0].size_bytes
    monkeypatch.setenv("MPVSS_CACHE_MAX_MB", str(1.5 * size / MIB))  # room for one export, not two
    with torch.no_grad():
        model.sem_seg_head.predictor.class_embed.bias.add_(1e-3)  # other weights: another entry
    # the first entry was just used (another process may be opening it): spared, over budget for now
    second = cached_export(model, (64, 64), tmp_path)
    assert second != first and first.exists() and second.exists()
    # used long ago: the next automatic prune removes it
    os.utime(first, (T0, T0))
    assert prune_to_budget(tmp_path, keep=[]) and not first.exists()
    assert [e.path for e in cache_entries(tmp_path)] == [second]
    assert not list((tmp_path / "onnx").glob(".export-*"))  # removed by renaming, then deleting


def test_cli_lists_prunes_and_clears(fake_cache, capsys):
    root, p = fake_cache
    assert main(["cache", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "4 entries, 10.0 MiB" in out and str(p["d"]) in out
    assert main(["cache", "--cache-dir", str(root), "--prune", "--max-mb", "7"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 entries, 3.0 MiB" in out and "2 entries, 7.0 MiB" in out
    assert main(["cache", "--cache-dir", str(root), "--clear"]) == 0
    assert "0 entries, 0.0 MiB" in capsys.readouterr().out and cache_entries(root) == []


def test_format_entries_ages_and_sizes(fake_cache):
    """`mpvss cache` lines: MiB, the age of the last use in hours below two days and in days from
    then, a last use in the future (another clock) as age 0."""
    root, _ = fake_cache
    entries = cache_entries(root)  # d, c, b, a: 4, 3, 2, 1 MiB, used at T0 + 30, 20, 10, 0

    def first_line(now):
        return format_entries(entries, now=now).splitlines()[0].split()

    assert first_line(T0 + 30 + 2 * 3600)[:6] == ["engine", "4.0", "MiB", "used", "2.0", "h"]
    assert first_line(T0 + 30 + 47 * 3600)[4:6] == ["47.0", "h"]
    assert first_line(T0 + 30 + 72 * 3600)[4:6] == ["3.0", "d"]
    assert first_line(T0 - 3600)[4:6] == ["0.0", "h"]
    assert format_entries(entries, now=T0).splitlines()[-1] == "4 entries, 10.0 MiB"


def test_cli_cache_dir_with_a_tilde_or_empty(fake_cache, capsys, monkeypatch):
    """--cache-dir=~/x (the shell leaves it unexpanded) is the home folder's; an empty one (an unset
    shell variable) is refused: it was the default cache for `mpvss cache`, which --clear emptied,
    and the current directory for the other commands."""
    root, _ = fake_cache
    monkeypatch.setenv("HOME", str(root.parent))
    monkeypatch.setenv("MPVSS_CACHE_DIR", str(root))  # the default a "" fell back to
    assert main(["cache", f"--cache-dir=~/{root.name}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cache {root}\n") and "4 entries" in out
    for empty in ("", "  "):
        assert main(["cache", "--cache-dir", empty, "--clear"]) == 2
        assert "--cache-dir must name a folder" in capsys.readouterr().err
    assert len(cache_entries(root)) == 4


def test_default_cache_dir(monkeypatch, tmp_path):
    """$MPVSS_CACHE_DIR as given (a tilde expanded), else $XDG_CACHE_HOME/mpvss_ros, else ~/.cache/mpvss_ros."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MPVSS_CACHE_DIR", "~/mine")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MPVSS_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "mpvss_ros"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / ".cache" / "mpvss_ros"


def test_cached_export_expands_a_tilde(tmp_path, monkeypatch):
    """A cache folder given as ~/c: the export was written under $HOME/c but an empty ./~/c folder
    was renamed into the entry (mkdtemp returns a relative path), so every run failed and leaked it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    entry = cached_export(load_model("mpvss_lite").model, (64, 64), "~/c")
    assert entry.parent == tmp_path / "home" / "c" / "onnx" and (entry / "contract.json").is_file()
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("argv, message", [(["--max-mb", "5"], "--max-mb goes with --prune"),
                                           (["--prune", "--max-mb", "0"], "--max-mb must be"),
                                           (["--prune", "--clear"], "not allowed with")])
def test_cli_errors(fake_cache, capsys, argv, message):
    root, _ = fake_cache
    try:
        code = main(["cache", "--cache-dir", str(root), *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert len(cache_entries(root)) == 4


def test_build_engines_prunes_keeping_its_engines_and_graphs(tmp_path, monkeypatch):
    """build_engines prunes after both engines exist and keeps them and their ONNX folder, even
    when they alone exceed the budget (TensorRT replaced by a stub that writes engine files)."""
    from mpvss_ros.runtime import tensorrt_backend
    from mpvss_ros.runtime.export import GraphSource

    def fake_engine_for(onnx_path, input_shapes, graph, precision, cache_dir, *rest):
        return _engine(tmp_path, f"{graph}-{precision}-new", 2, T0 + 100)

    monkeypatch.setattr(tensorrt_backend, "engine_for", fake_engine_for)
    source = GraphSource.from_model(load_model("mpvss_lite").model, tmp_path)
    source.get((64, 64))  # exported first, so only build_engines itself can prune below
    old = _engine(tmp_path, "key_frame-fp32-old", 1, T0)
    monkeypatch.setenv("MPVSS_CACHE_MAX_MB", "1")
    paths = tensorrt_backend.build_engines(source, (64, 64), "fp32", tmp_path)
    left = {e.path for e in cache_entries(tmp_path)}
    assert left == {paths["key_frame"], paths["non_key_frame"], source.get((64, 64))}
    assert not old.exists()


def test_concurrent_exports_of_one_entry_export_once(tmp_path, monkeypatch):
    # two nodes starting together: the second waits on the entry's lock, then reuses the export
    import threading

    import mpvss_ros.runtime.export as export

    model = load_model("mpvss_lite").model
    real_export = export.export_onnx
    calls = []

    def slow_export(*args, **kwargs):
        calls.append(threading.current_thread().name)
        time.sleep(0.5)  # the other thread arrives meanwhile
        return real_export(*args, **kwargs)

    monkeypatch.setattr(export, "export_onnx", slow_export)
    fingerprint = export.model_fingerprint(model)
    results = {}

    def run(name):
        results[name] = export.cached_export(model, (64, 64), tmp_path, fingerprint=fingerprint)

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(calls) == 1 and results["a"] == results["b"] and (results["a"] / "contract.json").is_file()
    assert [e.path for e in cache_entries(tmp_path)] == [results["a"]]  # the lock file is no entry


def test_prune_spares_entries_used_recently(fake_cache):
    """Automatic pruning spares what another process may have just reused and be opening."""
    root, p = fake_cache
    removed = prune_cache(root, 0, now=T0 + 100, spare_used_within_s=85)  # a, b used 100, 90 s ago; c, d 80, 70
    assert [e.path for e in removed] == [p["a"], p["b"]]
    assert [e.path for e in cache_entries(root)] == [p["d"], p["c"]]
    assert not list((root / "onnx").glob(".export-removed-*"))


def test_an_entry_is_renamed_away_before_it_is_deleted(fake_cache, monkeypatch):
    """A removal cut short leaves a hidden temporary folder, which a later prune deletes, never an
    entry folder without its contract (that blocked its key)."""
    root, p = fake_cache
    monkeypatch.setattr(cache.shutil, "rmtree", lambda path, ignore_errors=False: None)  # the delete "dies"
    (removed,) = [e for e in prune_cache(root, 9 * MIB) if e.kind == "onnx"]
    assert removed.path == p["a"] and not p["a"].exists()
    (left,) = (root / "onnx").glob(".export-removed-*")
    assert (left / "key_frame.onnx").is_file() and p["a"] not in [e.path for e in cache_entries(root)]
    monkeypatch.undo()
    prune_cache(root, 100 * MIB, now=time.time() + 2 * STALE_TEMP_SECONDS)  # interrupted writes older than 1 h
    assert not left.exists()


def test_an_entry_that_is_a_link_is_removed_by_removing_the_link(fake_cache, tmp_path_factory, caplog):
    """An ONNX folder or engine kept on another disk and linked into the cache: pruning it removes
    the link, never what it points to, and says so; a later prune neither finds it again nor logs
    it removed again (the link was renamed to a temporary that rmtree refused, and every sweep
    logged it as removed)."""
    root, p = fake_cache
    elsewhere = tmp_path_factory.mktemp("other_disk")
    shutil.move(p["a"], elsewhere / "kept")
    p["a"].symlink_to(elsewhere / "kept", target_is_directory=True)
    shutil.move(p["b"], elsewhere / "kept.engine")
    p["b"].symlink_to(elsewhere / "kept.engine")
    os.utime(p["a"], (T0, T0), follow_symlinks=False)
    os.utime(elsewhere / "kept", (T0, T0))
    os.utime(elsewhere / "kept.engine", (T0 + 10, T0 + 10))
    assert [e.path for e in cache_entries(root)][2:] == [p["b"], p["a"]]
    with caplog.at_level(logging.INFO, logger=cache.__name__):
        removed = prune_cache(root, 7 * MIB, now=T0 + 40)
    assert [e.path for e in removed] == [p["a"], p["b"]]
    assert not os.path.lexists(p["a"]) and not os.path.lexists(p["b"]) and not p["b"].with_suffix(".json").exists()
    assert (elsewhere / "kept" / "key_frame.onnx").is_file() and (elsewhere / "kept.engine").is_file()
    assert "removed the link" in caplog.text and "could not delete" not in caplog.text
    assert not [q for q in (root / "onnx").iterdir() if q.name.startswith(".export-removed")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=cache.__name__):
        prune_cache(root, 100 * MIB, now=time.time() + 2 * STALE_TEMP_SECONDS)
    assert "m-64x64-aaaa" not in caplog.text and "kept" not in caplog.text


def test_a_stale_temporary_that_is_a_link_goes_and_one_that_stays_is_not_logged_removed(fake_cache, tmp_path_factory,
                                                                                         caplog, monkeypatch):
    root, _ = fake_cache
    target = tmp_path_factory.mktemp("target")
    (target / "graph.onnx").write_bytes(b"g")
    link = root / "onnx" / ".export-removed-linked-1"
    link.symlink_to(target, target_is_directory=True)
    os.utime(link, (T0, T0), follow_symlinks=False)
    with caplog.at_level(logging.INFO, logger=cache.__name__):
        prune_cache(root, 100 * MIB, now=time.time() + 2 * STALE_TEMP_SECONDS)
    assert not os.path.lexists(link) and (target / "graph.onnx").is_file()
    assert f"removed {link}" in caplog.text
    stuck = root / "onnx" / ".export-stuck"
    stuck.mkdir()
    os.utime(stuck, (T0, T0))
    monkeypatch.setattr(cache.shutil, "rmtree", lambda path, ignore_errors=False: None)  # a read-only folder
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=cache.__name__):
        prune_cache(root, 100 * MIB, now=time.time() + 2 * STALE_TEMP_SECONDS)
    assert stuck.exists() and f"removed {stuck}" not in caplog.text


def test_a_side_car_whose_engine_never_arrived_goes_once_stale(fake_cache):
    """engine_for renames the side-car into place before the engine: a build killed between the
    two leaves a side-car alone, which no entry owns; it goes with the stale temporaries. A
    side-car with its engine, a fresh lone one (a build finishing now) and other files stay."""
    root, p = fake_cache
    lone = root / "engines" / "key_frame-fp16-eeee.json"
    lone.write_text("{}")
    other = root / "engines" / "notes.txt"
    other.write_text("mine")
    prune_cache(root, 100 * MIB)
    assert lone.exists()
    prune_cache(root, 100 * MIB, now=lone.stat().st_mtime + STALE_TEMP_SECONDS + 1)
    assert not lone.exists() and other.exists()
    assert p["b"].with_suffix(".json").exists() and p["d"].with_suffix(".json").exists()
    assert len(cache_entries(root)) == 4


def test_a_side_car_beside_a_linked_engine_and_json_files_in_onnx_stay(fake_cache):
    """Only a side-car in engines/ with no engine of its name at all is a left-over: one beside an
    engine that is a link (kept on another disk, not mounted during this prune) is that engine's,
    which without it loses its size and sha256 check once the disk is back; a .json file in onnx/
    is no side-car. Both stay however old."""
    root, _ = fake_cache
    linked = root / "engines" / "key_frame-fp16-ffff.engine"
    linked.symlink_to(root / "unmounted" / "kept.engine")  # dangling while the disk is away
    side_car = linked.with_suffix(".json")
    side_car.write_text("{}")
    notes = root / "onnx" / "notes.json"
    notes.write_text("{}")
    for p in (side_car, notes):
        os.utime(p, (T0, T0))
    prune_cache(root, 100 * MIB, now=time.time() + 2 * STALE_TEMP_SECONDS)
    assert side_car.exists() and notes.exists()


def test_listing_and_pruning_expand_a_tilde(fake_cache, monkeypatch):
    """Through the API (build_engines' automatic prune passes the folder as given), ~/c looked for a
    relative ./~/c, found nothing and pruned nothing while the cache grew."""
    root, paths = fake_cache
    home = root.parent / "home"
    home.mkdir()
    (home / "c").symlink_to(root)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(root.parent)
    assert len(cache_entries("~/c")) == 4
    removed = prune_cache("~/c", max_bytes=7 * MIB)
    assert [e.path.name for e in removed] == [paths["a"].name, paths["b"].name]


def test_a_size_loaded_again_from_the_cache_is_marked_used(tmp_path):
    """The onnxruntime backend releases the sessions of its least recently used size and loads
    them again from the cache when that size comes back (GraphSource.get's second call): that is a
    use, or the prune removes the entry in use before idle ones."""
    from mpvss_ros.runtime.export import GraphSource

    source = GraphSource.from_model(load_model("mpvss_lite").model, cache_dir=tmp_path)
    entry = source.get((64, 64))
    os.utime(entry, (T0, T0))
    assert source.get((64, 64)) == entry and entry.stat().st_mtime > T0


def test_automatic_pruning_spares_entries_used_in_the_last_minutes(tmp_path, monkeypatch):
    """Another process may have just reused an entry and be opening its graphs: automatic pruning
    (prune_to_budget) spares entries used within RECENT_USE_SECONDS, even over the budget."""
    now = time.time()
    recent = _onnx(tmp_path, "m-64x64-rrrr", 2, now - 5)
    old = _onnx(tmp_path, "m-64x64-oooo", 2, now - 10_000)
    monkeypatch.setenv("MPVSS_CACHE_MAX_MB", "1")
    removed = prune_to_budget(tmp_path, keep=())
    assert [e.path for e in removed] == [old]
    assert recent.is_dir() and not old.exists()


#: Ages of last uses and of temporaries in seconds before the fuzzed tree's clock, ties on purpose;
#: none within a minute of RECENT_USE_SECONDS or STALE_TEMP_SECONDS (later by 0, 1000 or 4000 s),
#: so the test's own run time cannot move one across.
_AGES = st.sampled_from([-600.0, 0.0, 30.0, 300.0, 1200.0, 3000.0, 5400.0, 86_400.0, 30 * 86_400.0])
_LATER = st.sampled_from([0.0, 1000.0, 4000.0])
#: $MPVSS_CACHE_MAX_MB values that are not a finite number of MiB >= 0.
_BAD_BUDGETS = st.sampled_from(["lots", "-1", "-0.5", "nan", "inf", "-inf", "1e400", "1,5", "0x10", "5 MiB", "1 2"])
_PAD = st.sampled_from(["", " ", "\t", "  \n"])


class _Interrupted(Exception):
    """An export or build that fails while it holds its entry's lock."""


def _delete(path: Path) -> None:
    """Remove an entry as another process's prune does: an engine with its side-car, a folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
        if path.suffix == ".engine":
            path.with_suffix(".json").unlink(missing_ok=True)


class _CacheTree(RuleBasedStateMachine):
    """A random cache tree (ONNX folders, engines with and without side-cars, side-cars without
    engines, temporaries of any age, stray files, empty folders, symlinks, lock files) under random uses, locks and prunes (by hand
    and automatic, random budgets, keep sets and $MPVSS_CACHE_MAX_MB values, entries vanishing
    meanwhile), checked after every step against a model of the tree."""

    def __init__(self, base: Path, caplog) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(dir=base))
        self.caplog = caplog
        self.clock = time.time()
        self.entries: dict[Path, tuple[str, int]] = {}  # entry -> (kind, size in bytes)
        self.temps: dict[Path, float] = {}  # temporary of an interrupted write -> its mtime
        self.fixed: set[Path] = set()  # strays, lock files, hidden and dangling names: never removed
        self.gone: set[Path] = set()  # removed entries
        self.count = 0

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}-{self.count:03d}"

    def _touch(self, path: Path, age: float) -> float:
        os.utime(path, (self.clock - age, self.clock - age))
        return path.stat().st_mtime

    @rule(size=st.integers(1, 6), age=_AGES)
    def add_onnx_entry(self, size, age):
        """An exported pair of graphs, used ``age`` seconds ago."""
        d = _onnx(self.root, self._name("m-24x32"), size, self.clock - age, unit=KIB)
        self.entries[d] = ("onnx", size * KIB)

    @rule(size=st.integers(1, 6), age=_AGES, side_car=st.booleans())
    def add_engine(self, size, age, side_car):
        """An engine, with or without its side-car (a write cut short between the two)."""
        e = _engine(self.root, self._name("key_frame-fp16"), size, self.clock - age, unit=KIB, side_car=side_car)
        self.entries[e] = ("engine", size * KIB)

    @rule(age=_AGES)
    def add_empty_onnx_folder(self, age):
        """An entry folder that holds nothing (yet): an entry of 0 bytes."""
        d = self.root / "onnx" / self._name("m-24x32")
        d.mkdir(parents=True)
        self._touch(d, age)
        self.entries[d] = ("onnx", 0)

    @rule(size=st.integers(1, 6), age=_AGES)
    def add_symlinked_engine(self, size, age):
        """An engine that is a symlink to a file outside the cache: its target's size, the link removed."""
        target = self.root / "elsewhere" / self._name("engine")
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"e" * size * KIB)
        e = self.root / "engines" / f"{self._name('non_key_frame-fp32')}.engine"
        e.parent.mkdir(exist_ok=True)
        e.symlink_to(target)
        self._touch(e, age)
        self.entries[e] = ("engine", size * KIB)
        self.fixed.add(target)

    @rule(size=st.integers(1, 6), age=_AGES)
    def add_symlinked_onnx_folder(self, size, age):
        """An ONNX entry that is a symlink to a folder outside the cache: its target's size; a
        prune removes the link and never the folder or its files."""
        target = _onnx(self.root / "elsewhere", self._name("kept"), size, self.clock - age, unit=KIB)
        d = self.root / "onnx" / self._name("m-24x32")
        d.parent.mkdir(exist_ok=True)
        d.symlink_to(target, target_is_directory=True)
        self.entries[d] = ("onnx", size * KIB)
        self.fixed.update([target, *target.rglob("*")])

    @rule(age=_AGES)
    def add_orphan_side_car(self, age):
        """The side-car of an engine whose write was cut short (it is renamed into place first):
        no entry; removed with the temporaries once stale."""
        p = self.root / "engines" / f"{self._name('key_frame-fp32')}.json"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"{}")
        self.temps[p] = self._touch(p, age)

    @rule(prefix=st.sampled_from([".export-", ".engine-", ".export-removed-"]), sub=st.sampled_from(["onnx", "engines"]),
          folder=st.booleans(), age=_AGES)
    def add_temporary(self, prefix, sub, folder, age):
        """What an interrupted export, engine write or removal leaves."""
        t = self.root / sub / self._name(prefix + "tmp")
        if folder:
            (t / "sub").mkdir(parents=True)
            (t / "sub" / "key_frame.onnx").write_bytes(b"k" * 100)
        else:
            t.parent.mkdir(exist_ok=True)
            t.write_bytes(b"x" * 10)
        self.temps[t] = self._touch(t, age)

    @rule(kind=st.sampled_from(["file in onnx", "notes", "hidden engine", "hidden folder", "lock",
                                "empty engines folder", "dangling onnx", "dangling engine"]), age=_AGES)
    def add_stray(self, kind, age):
        """Names that are no entries and no temporaries: never listed, never removed."""
        sub = "onnx" if kind in ("file in onnx", "hidden folder", "dangling onnx") else "engines"
        name = self._name({"lock": ".m-24x32", "hidden engine": ".key_frame-fp32",
                           "hidden folder": ".m-24x32"}.get(kind, "stray"))
        suffix = {"notes": ".txt", "hidden engine": ".engine", "lock": ".lock",
                  "dangling engine": ".engine"}.get(kind, "")
        p = self.root / sub / f"{name}{suffix}"
        p.parent.mkdir(exist_ok=True)
        if kind.startswith("dangling"):
            p.symlink_to(self.root / "absent" / name)
        elif kind in ("hidden folder", "empty engines folder"):
            p.mkdir()
            self._touch(p, age)
        else:
            p.write_bytes(b"s" * 7)
            self._touch(p, age)
        self.fixed.add(p)

    @invariant()
    def listing_matches_the_tree(self):
        """Every entry listed once with its kind and size, most recently used first (ties by path),
        its last use its mtime; temporaries, strays, locks and dangling links are no entries."""
        entries = cache_entries(self.root)
        assert {e.path: (e.kind, e.size_bytes) for e in entries} == self.entries
        assert len(entries) == len(self.entries)
        assert [e.last_used for e in entries] == [e.path.stat().st_mtime for e in entries]
        assert entries == sorted(entries, key=lambda e: (-e.last_used, str(e.path)))
        assert all(os.path.lexists(p) for p in [*self.fixed, *self.temps])
        assert not any(os.path.lexists(p) for p in self.gone)

    def _check_prune(self, listed, removed, budget, protected, now, vanished=None):
        """The documented pruning: LRU first, never a protected entry, down to the budget and no
        further, the removed entries gone with all their files, stale temporaries gone, fresh ones kept."""
        by_path = {e.path: e for e in listed}
        removed_paths = [e.path for e in removed]
        assert len(set(removed_paths)) == len(removed) and all(by_path.get(e.path) == e for e in removed)
        assert not set(removed_paths) & (protected - {vanished}), "a kept or recently used entry was removed"
        assert all(p.exists() for p in protected - {vanished})
        assert not any(os.path.lexists(f) for e in removed for f in (e.path, *e.files))
        assert [e.last_used for e in removed] == sorted(e.last_used for e in removed), "not least recently used first"
        left = [e for e in listed if e.path not in removed_paths]
        unprotected = [e for e in left if e.path not in protected]
        if removed and unprotected:
            assert max(e.last_used for e in removed) <= min(e.last_used for e in unprotected), \
                "an entry was removed while a less recently used one stays"
        left_bytes = sum(e.size_bytes for e in left)
        assert left_bytes <= budget or not unprotected, "over budget with entries left to remove"
        if removed:
            assert left_bytes + removed[-1].size_bytes > budget, "removed more than the budget needs"
        for t, stamp in list(self.temps.items()):
            if now - stamp > STALE_TEMP_SECONDS:
                assert not os.path.lexists(t), f"stale temporary {t.name} kept"
                del self.temps[t]
            else:
                assert os.path.lexists(t), f"fresh temporary {t.name} removed"
        leftovers = set((self.root / "onnx").glob(".export-removed-*")) - set(self.temps)
        assert not leftovers, "a removal by rename left its folder behind"
        for p in removed_paths + [vanished] * (vanished is not None):
            self.entries.pop(p, None)
            self.gone.add(p)

    def _draw_keep(self, data, listed):
        keep = data.draw(st.lists(st.sampled_from([e.path for e in listed]), unique=True)) if listed else []
        return keep, [str(p) if i % 2 else p for i, p in enumerate(keep)]  # a str or a Path

    @rule(data=st.data(), later=_LATER, spare=st.sampled_from([0.0, RECENT_USE_SECONDS]), vanish=st.booleans())
    def prune_by_hand(self, data, later, spare, vanish):
        """prune_cache with a random budget and keep set; another process may remove a listed entry
        between the listing and the removals."""
        listed = cache_entries(self.root)
        sizes = [e.size_bytes for e in listed]
        exact = [sum(sizes[:i]) for i in range(len(sizes) + 1)]  # what the i most recently used entries hold
        budget = data.draw(st.integers(0, sum(sizes) + 2 * KIB) | st.sampled_from(exact), label="budget")
        keep, keep_arg = self._draw_keep(data, listed)
        vanished = data.draw(st.sampled_from(listed)).path if vanish and listed else None
        now = self.clock + later
        real_listing = cache.cache_entries

        def listing_then_vanish(root):
            found = real_listing(root)
            _delete(vanished)
            return found

        with pytest.MonkeyPatch.context() as mp:
            if vanished is not None:
                mp.setattr(cache, "cache_entries", listing_then_vanish)
            removed = prune_cache(self.root, budget, keep=keep_arg, now=now, spare_used_within_s=spare)
        protected = set(keep) | {e.path for e in listed if now - e.last_used < spare}
        self._check_prune(listed, removed, budget, protected, now, vanished)

    @rule(budget=st.integers(-2**40, -1))
    def prune_with_a_negative_budget(self, budget):
        """A negative budget is a clear error that removes nothing (the invariant checks the tree)."""
        with pytest.raises(ValueError, match="max_bytes"):
            prune_cache(self.root, budget, now=self.clock + 4000.0)

    @rule(data=st.data(), kib=st.integers(0, 40) | st.just(0), zero=st.sampled_from(["0", "0.0", "-0", "0e3"]), pad=_PAD)
    def prune_automatically(self, data, kib, zero, pad):
        """prune_to_budget with $MPVSS_CACHE_MAX_MB a number of MiB: down to it, sparing the kept and
        the recently used; 0 (in any spelling) turns it off."""
        listed = cache_entries(self.root)
        keep, keep_arg = self._draw_keep(data, listed)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MPVSS_CACHE_MAX_MB", pad + (repr(kib / 1024) if kib else zero) + pad)  # exact: whole KiB
            now = time.time()
            removed = prune_to_budget(self.root, keep=keep_arg)
        if kib == 0:
            assert removed == [] and cache_entries(self.root) == listed
            return
        protected = set(keep) | {e.path for e in listed if now - e.last_used < RECENT_USE_SECONDS}
        self._check_prune(listed, removed, kib * KIB, protected, now)

    @rule(raw=st.one_of(st.none(), _PAD, _BAD_BUDGETS.flatmap(lambda bad: _PAD.map(lambda pad: pad + bad))))
    def prune_automatically_with_a_default_or_bad_budget(self, raw):
        """Unset or blank is DEFAULT_MAX_MB (far above this tree: stale temporaries go, no entry); a
        bad value is a ValueError from cache_budget_bytes, and prune_to_budget logs it and removes nothing."""
        listed = cache_entries(self.root)
        self.caplog.clear()
        with pytest.MonkeyPatch.context() as mp:
            if raw is None:
                mp.delenv("MPVSS_CACHE_MAX_MB", raising=False)
            else:
                mp.setenv("MPVSS_CACHE_MAX_MB", raw)
            if raw is None or not raw.strip():
                assert cache_budget_bytes() == DEFAULT_MAX_MB * MIB
                now = time.time()
                assert prune_to_budget(self.root, keep=[]) == []
                self._check_prune(listed, [], DEFAULT_MAX_MB * MIB, set(), now)
                return
            with pytest.raises(ValueError, match="MPVSS_CACHE_MAX_MB"):
                cache_budget_bytes()
            assert prune_to_budget(self.root, keep=[]) == []
        assert "pruning skipped" in self.caplog.text and "MPVSS_CACHE_MAX_MB" in self.caplog.text

    @rule(data=st.data())
    @precondition(lambda self: self.entries)
    def an_io_error_while_pruning(self, data):
        """A read-only cache or onnx/ folder (renames, unlinks, deletes refused): prune_to_budget never
        raises, keeps the kept entries and reports as removed only entries that are gone."""
        listed = cache_entries(self.root)
        keep, keep_arg = self._draw_keep(data, listed)
        failing = data.draw(st.sampled_from([("rename", "unlink", "rmtree"), ("rename", "rmtree"),  # or onnx/ alone
                                             ("rename",), ("unlink",), ("rmtree",)]))

        def refuse(*args, ignore_errors=False, **kwargs):
            if not ignore_errors:
                raise PermissionError("read-only cache")

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MPVSS_CACHE_MAX_MB", repr(2**-20))  # 1 byte
            for owner, name in [(os, "rename"), (Path, "unlink"), (cache.shutil, "rmtree")]:
                if name in failing:
                    mp.setattr(owner, name, refuse)
            removed = prune_to_budget(self.root, keep=keep_arg)
        left = {e.path for e in cache_entries(self.root)}
        assert set(keep) <= left
        assert not {e.path for e in removed} & left, "reported removed, still an entry"
        if len(failing) == 3:  # nothing can be removed
            assert left == {e.path for e in listed}
        for p in {e.path for e in listed} - left:
            del self.entries[p]
            self.gone.add(p)
        for t in [t for t in self.temps if not os.path.lexists(t)]:  # stale temporaries may go
            assert time.time() - self.temps.pop(t) > STALE_TEMP_SECONDS
        for t in set((self.root / "onnx").glob(".export-removed-*")) - set(self.temps):  # renamed, not deleted:
            self.temps[t] = t.stat().st_mtime  # a later prune deletes it once stale

    @rule(data=st.data())
    @precondition(lambda self: self.entries)
    def an_entry_vanishes_while_listed(self, data):
        """Another process removes an entry between the folder listing and its stat: not listed, no error."""
        vanished = data.draw(st.sampled_from(sorted(self.entries)))
        name = "_onnx_entry" if self.entries[vanished][0] == "onnx" else "_engine_entry"
        real = getattr(cache, name)

        def vanish_first(path):
            if path == vanished:
                _delete(path)
            return real(path)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cache, name, vanish_first)
            assert vanished not in [e.path for e in cache_entries(self.root)]
        del self.entries[vanished]
        self.gone.add(vanished)

    @rule(data=st.data(), removed=st.booleans())
    def use_an_entry(self, data, removed):
        """A use stamps the entry now (the front of the listing); a removed entry stays removed, silently."""
        if removed and self.gone:
            path = data.draw(st.sampled_from(sorted(self.gone)))
            mark_used(path)
            assert not os.path.lexists(path)
        elif self.entries:
            path = data.draw(st.sampled_from(sorted(self.entries)))
            before = time.time()
            mark_used(str(path))
            assert path.stat().st_mtime >= before - 1.0
            ahead = [e for e in cache_entries(self.root) if e.last_used > path.stat().st_mtime]
            assert all(e.last_used > before for e in ahead), "a use did not move the entry to the front"

    @rule(data=st.data(), fail=st.booleans(), sub=st.sampled_from(["onnx", "engines", "new"]))
    def hold_a_build_lock(self, data, fail, sub):
        """build_lock excludes other holders until it is left, by an exception too; its lock file
        (its folder made if needed) is no entry and no temporary, never removed."""
        names = [p.name for p in self.entries if p.parent.name == sub]
        name = data.draw(st.sampled_from(names)) if names and data.draw(st.booleans()) else self._name("m-24x32")
        target = self.root / sub / name
        lock = target.parent / f".{name}.lock"
        with contextlib.suppress(_Interrupted), build_lock(target):
            with open(lock) as other, pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fail:
                raise _Interrupted
        with open(lock) as other:
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
        self.fixed.add(lock)

    @rule(later=st.floats(-1e5, 1e8))
    def list_by_hand(self, later):
        """`mpvss cache`: one line per entry in the listing's order (kind, MiB, path), then the count and total."""
        entries = cache_entries(self.root)
        lines = format_entries(entries, now=self.clock + later).splitlines()
        assert len(lines) == len(entries) + 1
        for line, e in zip(lines, entries):
            assert line.split()[:3] == [e.kind, f"{e.size_bytes / MIB:.1f}", "MiB"] and line.endswith(f"  {e.path}")
        assert lines[-1] == f"{len(entries)} entries, {sum(e.size_bytes for e in entries) / MIB:.1f} MiB"


def test_random_cache_trees_keep_the_documented_pruning_rules(tmp_path, caplog):
    """Random cache trees, uses, locks and prunes: see _CacheTree."""
    with caplog.at_level(logging.DEBUG, logger="mpvss_ros.runtime.cache"):
        run_state_machine_as_test(lambda: _CacheTree(tmp_path, caplog),
                                  settings=settings(max_examples=200, stateful_step_count=40, deadline=None))
