"""``mpvss bench`` (mpvss_ros.runtime.bench): option parsing and a tiny CPU run."""

from __future__ import annotations

import contextlib
import json
import types

import numpy as np

import pytest
import torch

from mpvss_ros.cli import main
from mpvss_ros.runtime import BackendUnavailable, Missing, backend_missing
from mpvss_ros.runtime import bench
from mpvss_ros.runtime.bench import (BackendSpec, BenchOptions, _bench_one, default_backend_specs, format_markdown,
                                     parse_backend_spec, parse_size)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize("text, spec", [
    ("torch", BackendSpec("torch", "cpu", "fp32")),
    ("torch:cuda:fp16", BackendSpec("torch", "cuda", "fp16")),
    ("onnxruntime:cuda", BackendSpec("onnxruntime", "cuda", "fp32")),
    ("tensorrt:fp16", BackendSpec("tensorrt", "cuda", "fp16")),
])
def test_parse_backend_spec(text, spec):
    assert parse_backend_spec(text) == spec
    assert str(spec) == text


@pytest.mark.parametrize("text", ["tf", "torch:gpu", "tensorrt:cpu", "", "torch:", ":torch", "torch::fp16",
                                  "tensorrt:fp16:fp32", "torch:cpu:cuda"])
def test_parse_backend_spec_errors(text):
    with pytest.raises(ValueError):
        parse_backend_spec(text)


def test_parse_size():
    assert parse_size("360x480") == (360, 480)
    assert parse_size("360X480") == (360, 480)  # either case of x
    assert parse_size("32x32") == (32, 32)  # MIN_GRAPH_SIDE itself is allowed
    for bad in ("360", "axb", "16x16", "64x16", "16x64"):  # each side checked
        with pytest.raises(ValueError):
            parse_size(bad)


def test_default_specs_include_cpu_backends():
    specs = default_backend_specs()
    assert BackendSpec("torch") in specs and BackendSpec("onnxruntime") in specs


def _bench(tmp_path, capsys, monkeypatch, *args: str) -> tuple[str, dict]:
    """Run ``mpvss bench --models mpvss_lite ARGS`` (1 repeat, no warm-up, 1 thread) with a private
    cache; returns the printed Markdown and the JSON result."""
    monkeypatch.setenv("MPVSS_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["bench", "--models", "mpvss_lite", *args, "--repeats", "1", "--warmup", "0", "--threads", "1",
               "--json", str(tmp_path / "b.json")])
    assert rc == 0
    return capsys.readouterr().out, json.loads((tmp_path / "b.json").read_text())


def test_bench_cli_tiny(tmp_path, capsys, monkeypatch):
    from mpvss_ros.runtime.export import GraphSource

    handed = []  # each row's backend takes over the copy made for it (not a third copy of the weights)
    from_model = GraphSource.from_model.__func__
    monkeypatch.setattr(GraphSource, "from_model", classmethod(
        lambda cls, model, *a, copy_model=True, **k: handed.append(copy_model)
        or from_model(cls, model, *a, copy_model=copy_model, **k)))
    out, result = _bench(tmp_path, capsys, monkeypatch, "--sizes", "64x96", "--backends", "torch", "onnxruntime",
                         "--e2e-frames", "3")
    assert "**Hardware:**" in out and "threads used" in out
    assert "| mpvss_lite | 64x96 | 64x96 | torch |" in out and "| mpvss_lite | 64x96 | 64x96 | onnxruntime |" in out
    assert "the model's canvas set to it" in out
    assert [r["backend"] for r in result["rows"]] == ["torch", "onnxruntime"]
    for r in result["rows"]:
        assert r["key_ms"] > 0 and r["non_key_ms"] > 0 and r["fps_fixed5"] > 0
    assert "mpvss_lite" in result["weights"]
    # onnxruntime exported the model as loaded, not the copy the torch row folded and re-laid out
    from mpvss_ros.model_loader import load_model
    from mpvss_ros.runtime.export import model_fingerprint, replace_canvas

    model = load_model("mpvss_lite").model
    model.cfg = replace_canvas(model.cfg, (64, 96))
    entries = [p.name for p in (tmp_path / "cache" / "onnx").iterdir() if not p.name.startswith(".")]  # not the locks
    assert entries == [f"mpvss_lite-64x96-{model_fingerprint(model)[:16]}"]
    assert handed == [False]


def test_bench_json_path_checked_before_the_benchmark(tmp_path, capsys, monkeypatch):
    """--json under a file or naming a folder is refused before any row runs (it was found only
    when the result was written, after the whole benchmark)."""
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("benchmarked"))
    (tmp_path / "afile").write_text("x")
    for target, words in ((tmp_path / "afile" / "r.json", "is a file, not a folder"),
                          (tmp_path, "is a folder, not a file")):
        assert main(["bench", "--sizes", "64x96", "--json", str(target)]) != 0
        assert words in capsys.readouterr().err


def test_bench_keep_canvas_letterboxes_onto_the_configured_canvas(tmp_path, capsys, monkeypatch):
    """--keep-canvas: a 720p-shaped frame size on the shipped 480 x 640 canvas (letterboxed to
    360 x 640, padded to 384 x 640); the row says so and the end-to-end rate is measured."""
    out, result = _bench(tmp_path, capsys, monkeypatch, "--sizes", "180x320", "--backends", "torch", "--keep-canvas",
                         "--e2e-frames", "2")
    assert "| mpvss_lite | 180x320 | 384x640 | torch |" in out and "letterboxed onto the model's own canvas" in out
    assert result["options"]["keep_canvas"] is True
    (row,) = result["rows"]
    assert row["canvas"] == "384x640" and row["fps_fixed5"] > 0


def test_bench_keep_canvas_thin_letterbox_is_a_row_for_fixed_shape_backends(tmp_path, capsys, monkeypatch):
    """--keep-canvas with 2000 x 32 frames: letterboxed to 480 x 8 on the 480 x 640 canvas, which
    the torch backend runs and fixed-shape graphs cannot be exported for. onnxruntime's row says
    so and the benchmark goes on (the export's ValueError had ended it: no table, no JSON)."""
    from mpvss_ros.runtime import export

    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: pytest.fail("exported"))
    out, result = _bench(tmp_path, capsys, monkeypatch, "--sizes", "2000x32", "--backends", "onnxruntime", "torch",
                         "--keep-canvas", "--e2e-frames", "2")
    ort, torch_row = result["rows"]
    assert ort["error"] == ("letterboxed to 480x8 on the model's canvas: fixed-shape graphs need 32 pixels a side "
                            "(the torch backend runs it)")
    assert torch_row["backend"] == "torch" and torch_row["key_ms"] > 0
    assert "| mpvss_lite | 2000x32 | – | onnxruntime |" in out and "| mpvss_lite | 2000x32 | 480x32 | torch |" in out


def test_bench_unavailable_backend_is_a_row(tmp_path, capsys, monkeypatch):
    if backend_missing("tensorrt") is None:
        pytest.skip("TensorRT is available here")
    monkeypatch.setenv("MPVSS_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["bench", "--models", "mpvss_lite", "--sizes", "64x64", "--backends", "tensorrt", "--repeats", "1",
               "--e2e-frames", "1", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tensorrt backend needs" in out and "pick another --backends spec" in out
    assert "use the onnxruntime or torch backend" not in out  # segment's remedy, not bench's


def test_a_missing_backend_keeps_its_reason_apart_from_the_remedy():
    missing = Missing("no GPU here", "use --device cpu")
    assert missing == "no GPU here; use --device cpu" and (missing.reason, missing.remedy) == ("no GPU here", "use --device cpu")
    assert Missing("no remedy") == "no remedy" and Missing("no remedy").reason == "no remedy"
    assert BackendUnavailable(missing).reason == "no GPU here" and str(BackendUnavailable(missing)) == missing
    assert BackendUnavailable("a plain message").reason == "a plain message"


@pytest.mark.parametrize("backend, device, precision", [
    ("torch", "cpu", "fp16"), ("torch", "cuda", "bf16"), ("onnxruntime", "cpu", "fp16"), ("tensorrt", "cuda", "bf16"),
])
def test_the_reasons_a_bench_row_shows_name_no_flag(backend, device, precision):
    """Whatever the machine, these settings cannot run: the message says why and, apart, which
    flags of mpvss segment would work; a bench row shows the reason only (its rows are specs).
    (torch:cuda:bf16 is refused as bf16 on CUDA where there is a GPU, as CUDA without one elsewhere;
    it had been moved to the CPU without a GPU, where bf16 runs on bfloat16 CPUs, and skipped.)"""
    missing = backend_missing(backend, device, precision)
    assert isinstance(missing, Missing) and "--" not in missing.reason and "--" in missing.remedy


def test_bench_row_for_cuda_without_a_gpu_names_no_device_flag(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    _, result = _bench(tmp_path, capsys, monkeypatch, "--sizes", "64x64", "--backends", "torch:cuda",
                       "--e2e-frames", "1")
    (row,) = result["rows"]
    assert row["error"] == "CUDA was requested but this torch build sees no CUDA GPU (pick another --backends spec)"


def test_the_non_key_frame_is_timed_from_the_state_push_keeps(monkeypatch):
    """The non-key latency runs what VideoSegmenter.push runs: the key frame's active queries with
    its padding filled (it timed all N queries, 10-20 % more on the torch backend)."""
    from mpvss_ros.model_loader import load_model
    from mpvss_ros.runtime.torch_backend import TorchBackend
    from mpvss_ros.segmenter import VideoSegmenter

    loaded = load_model("mpvss_lite")
    backend = TorchBackend(loaded.model, "cpu")
    seen, kept = [], []
    propagate, key_state = backend.propagate, VideoSegmenter.key_state
    monkeypatch.setattr(backend, "propagate", lambda key, image: seen.append(key) or propagate(key, image))
    monkeypatch.setattr(VideoSegmenter, "key_state", lambda self, key: kept.append(key_state(self, key)) or kept[-1])
    frames = [np.random.default_rng(i).integers(0, 256, (64, 96, 3), dtype=np.uint8) for i in range(4)]
    _bench_one(backend, BackendSpec("torch", "cpu", "fp32"), frames, BenchOptions(warmup=1, repeats=2, e2e_frames=2))
    timed = seen[:3]  # warm-up and timed runs, before the end-to-end pushes
    assert timed and all(any(key is k for k in kept) for key in timed)
    assert all(key.active is not None for key in timed)


def test_bench_times_weights_without_a_trained_motion_module_and_says_so(tmp_path, capsys, monkeypatch):
    """Latency does not depend on the weights: a per-frame (or stage-1) file is timed like any
    other, the query-flow columns running its untrained motion module, and the weights line says so."""

    from mpvss_ros.config import load_model_config
    from mpvss_ros.nn.mpvss import MPVSS

    state = MPVSS(load_model_config("mpvss_lite")).state_dict()
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("motion.")}}, tmp_path / "pf.pth")
    out, result = _bench(tmp_path, capsys, monkeypatch, "--sizes", "64x96", "--backends", "torch", "--e2e-frames", "3",
                         "--weights", f"mpvss_lite={tmp_path / 'pf.pth'}")
    (row,) = result["rows"]
    assert row["non_key_ms"] > 0 and row["fps_fixed5"] > 0
    assert result["weights"]["mpvss_lite"].endswith("(no trained motion module: non-key and end-to-end times run an "
                                                    "untrained one)")


@pytest.fixture()
def clocked(lite, monkeypatch):
    """A torch backend of the lite model whose key and non-key calls advance bench's clock by
    set seconds: key 10, 20, 60 ms then 50 ms; non-key 4, 5, 9 ms then 2 ms; a device sync
    (bench._sync) by ``seen["sync_s"]`` (0 unless a test sets it)."""
    from mpvss_ros.runtime.torch_backend import TorchBackend
    from mpvss_ros.segmenter import VideoSegmenter

    now = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    backend = TorchBackend(lite.model, "cpu")
    key_s, non_key_s = iter([0.010, 0.020, 0.060]), iter([0.004, 0.005, 0.009])
    segment, propagate = backend.segment_key_frame, backend.propagate
    seen = {"key": [], "non_key": [], "sync_s": 0.0}
    monkeypatch.setattr(bench, "_sync", lambda spec: now.__setitem__(0, now[0] + seen["sync_s"]))

    def timed_key(image, *a, **k):
        seen["key"].append(float(image.max()))
        now[0] += next(key_s, 0.050)
        return segment(image, *a, **k)

    def timed_non_key(key, image, *a, **k):
        seen["non_key"].append(float(image.max()))
        now[0] += next(non_key_s, 0.002)
        return propagate(key, image, *a, **k)

    monkeypatch.setattr(backend, "segment_key_frame", timed_key)
    monkeypatch.setattr(backend, "propagate", timed_non_key)
    pushes = []  # (is_key_frame, clock seconds the push took)
    push = VideoSegmenter.push

    def recorded_push(self, *a, **k):
        t = now[0]
        res = push(self, *a, **k)
        pushes.append((res.is_key_frame, now[0] - t))
        return res

    monkeypatch.setattr(VideoSegmenter, "push", recorded_push)
    return backend, seen, pushes


def _frames(n):
    """Constant frames of values 10, 20, ...: a frame's canvas max names it."""
    return [np.full((64, 96, 3), 10 * (i + 1), dtype=np.uint8) for i in range(n)]


def test_bench_figures_are_medians_ratios_and_rates(clocked):
    backend, seen, pushes = clocked
    row = _bench_one(backend, BackendSpec("torch"), _frames(6), BenchOptions(warmup=0, repeats=3, e2e_frames=5))
    assert row["key_ms"] == pytest.approx(20.0)  # median of 10, 20, 60 (the mean is 30)
    assert row["non_key_ms"] == pytest.approx(5.0)  # median of 4, 5, 9 (the mean is 6)
    assert row["ratio"] == pytest.approx(4.0)  # key / non-key
    fixed, adaptive = pushes[:5], pushes[5:]
    assert len(adaptive) == 5
    assert row["fps_fixed5"] == pytest.approx(5 / sum(dt for _, dt in fixed))
    assert row["fps_adaptive"] == pytest.approx(5 / sum(dt for _, dt in adaptive))
    assert row["key_ratio_fixed5"] == pytest.approx(sum(k for k, _ in fixed) / 5) == pytest.approx(0.2)
    assert row["key_ratio_adaptive"] == pytest.approx(sum(k for k, _ in adaptive) / 5)


def test_each_latency_waits_for_the_device_before_the_clock_stops(clocked):
    """A GPU call returns before its work is done: each timed span ends with a device sync, so
    a sync of 1 ms adds 1 ms to every key and non-key time (not the sync before the clock starts)."""
    backend, seen, _ = clocked
    seen["sync_s"] = 0.001
    row = _bench_one(backend, BackendSpec("torch"), _frames(6), BenchOptions(warmup=0, repeats=3, e2e_frames=1))
    assert row["key_ms"] == pytest.approx(21.0) and row["non_key_ms"] == pytest.approx(6.0)


def test_each_non_key_frame_is_timed_three_frames_after_its_key_frame(clocked):
    backend, seen, _ = clocked
    _bench_one(backend, BackendSpec("torch"), _frames(7), BenchOptions(warmup=1, repeats=3, e2e_frames=1))
    # warm-up i=0 and timed i=0,1,2: key frames 1, 1, 2, 3 (values 10..), non-key frames 4, 4, 5, 6
    assert seen["key"][:4] == [10.0, 10.0, 20.0, 30.0]
    assert seen["non_key"][:4] == [40.0, 40.0, 50.0, 60.0]


def test_run_bench_reads_enough_frames_for_distinct_key_and_non_key_frames(monkeypatch):
    """With few end-to-end frames, the latency runs still need warmup + repeats + 3 frames (else
    the non-key frame wraps round onto its own key frame)."""
    asked = []

    class Stop(Exception):
        pass

    def frames(count):
        asked.append(count)
        raise Stop

    monkeypatch.setattr(bench, "bench_frames", frames)
    with pytest.raises(Stop):
        bench.run_bench(BenchOptions(models=["mpvss_lite"], sizes=[(64, 96)], backends=[BackendSpec("torch")],
                                     repeats=3, warmup=1, e2e_frames=2, threads=1))
    assert asked == [7]


def test_run_bench_sets_and_records_its_threads_and_options(monkeypatch):
    """The thread count (given, else torch's current one) is set and recorded with the options."""
    set_to = []
    monkeypatch.setattr(bench, "bench_frames", lambda count: ([], "test frames"))
    monkeypatch.setattr(bench.torch, "set_num_threads", set_to.append)
    result = bench.run_bench(BenchOptions(models=[], backends=[BackendSpec("torch")], repeats=3, warmup=1,
                                          e2e_frames=10, threads=2))
    assert set_to == [2] and result["hardware"]["threads"] == 2
    assert result["options"] == {"repeats": 3, "warmup": 1, "e2e_frames": 10, "keep_canvas": False}
    assert result["frames"] == "test frames" and result["rows"] == []
    default = bench.run_bench(BenchOptions(models=[], backends=[BackendSpec("torch")]))
    assert set_to[-1] == bench.torch.get_num_threads() == default["hardware"]["threads"]


def _markdown_result(*rows: dict) -> dict:
    """A benchmark result of these rows on a 2-CPU machine without GPU, onnxruntime or TensorRT."""
    return {"hardware": {"cpu": "cpu", "logical_cpus": 2, "threads": 1, "gpu": None, "torch": "2"},
            "frames": "f", "weights": {"m": "w"}, "options": {"repeats": 3, "e2e_frames": 10}, "rows": list(rows)}


def test_markdown_columns_hold_their_figures():
    result = _markdown_result({"model": "m", "size": "64x96", "canvas": "64x96", "backend": "torch", "key_ms": 40.0,
                               "non_key_ms": 10.0, "ratio": 4.0, "fps_fixed5": 7.0, "fps_adaptive": 9.0,
                               "key_ratio_adaptive": 0.25})
    lines = format_markdown(result).splitlines()
    header = [c.strip() for c in lines[-3].strip("|").split("|")]
    row = [c.strip() for c in lines[-1].strip("|").split("|")]
    cells = dict(zip(header, row))
    assert cells["key frame ms"] == "40.0" and cells["non-key frame ms"] == "10.0" and cells["key/non-key"] == "4.00"
    assert cells["fps fixed:5"] == "7.00" and cells["fps adaptive (key ratio)"] == "9.00 (0.25)"


def test_markdown_names_the_hardware_and_keeps_error_rows_in_their_columns():
    """No GPU reads "none", libraries not installed are left out, runs and frames are named apart,
    and an error row has as many cells as the header, its error in the last column."""
    text = format_markdown(_markdown_result({"model": "m", "size": "64x96", "backend": "tensorrt", "error": "no GPU"}))
    lines = text.splitlines()
    assert "GPU: none; torch 2;" in lines[0] and "onnxruntime" not in lines[0] and "tensorrt" not in lines[0]
    assert "Medians over 3 runs; end to end over 10 frames." in text
    header = [c.strip() for c in lines[-3].strip("|").split("|")]
    row = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert len(row) == len(header) and row[header.index("backend")] == "tensorrt" and row[-1] == "no GPU"


def test_out_of_memory_errors_are_recognised():
    """A bare MemoryError, CUDA's message and torch's CPU allocator failing make an "out of memory"
    row; other errors do not."""
    assert bench._is_oom(MemoryError())
    assert bench._is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(RuntimeError) as cpu:  # the CPU allocator's own error (2**50 bytes: 1 PiB)
        torch.empty(2**50, dtype=torch.uint8)
    assert bench._is_oom(cpu.value), str(cpu.value)
    assert not bench._is_oom(RuntimeError("shape mismatch"))


@pytest.fixture()
def one_clip(monkeypatch, tmp_path):
    """bench_frames with ``clip.mp4`` its only source; set ``["frames"]`` to the clip's length
    (its frames hold 0, 1, ...) or ``["error"]`` to what opening it raises."""
    from mpvss_ros.io import samples, video

    clip = tmp_path / "clip.mp4"
    monkeypatch.setattr(samples, "camvid_dir", lambda split="val": None)
    monkeypatch.setattr(samples, "dashcam_clip", lambda: None)
    monkeypatch.setattr(samples, "bikes_clip", lambda: clip)
    source = {"frames": 0, "error": None}

    def open_source(path):
        if source["error"]:
            raise source["error"]
        return contextlib.nullcontext(types.SimpleNamespace(image=np.full((4, 6, 3), i, np.uint8))
                                      for i in range(source["frames"]))

    monkeypatch.setattr(video, "open_source", open_source)
    return source


def test_bench_frames_reads_count_frames_and_loops_a_short_clip(one_clip):
    """Exactly ``count`` consecutive frames; a short clip is repeated from its start; an empty one
    is skipped for the seeded random frames."""
    one_clip["frames"] = 10
    frames, source = bench.bench_frames(4)
    assert source == "clip.mp4" and [int(f[0, 0, 0]) for f in frames] == [0, 1, 2, 3]
    one_clip["frames"] = 2
    frames, _ = bench.bench_frames(7)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 1, 0, 1, 0, 1, 0]
    one_clip["frames"] = 0
    frames, source = bench.bench_frames(3)
    assert source.startswith("seeded random frames") and len(frames) == 3


def test_bench_frames_skips_a_source_it_cannot_read(one_clip):
    """A clip that open_source refuses (ValueError) falls through to the next source."""
    one_clip["error"] = ValueError("not a video")
    frames, source = bench.bench_frames(2)
    assert source.startswith("seeded random frames") and len(frames) == 2


def test_bench_options_from_the_command_line(monkeypatch, tmp_path, capsys):
    got = []
    monkeypatch.setattr(bench, "run_bench", lambda opts, progress=None: got.append(opts) or {"rows": []})
    monkeypatch.setattr(bench, "format_markdown", lambda result: "table")
    json_path = tmp_path / "new" / "b.json"  # in a folder that does not exist yet: made for it
    assert main(["bench", "--models", "mpvss_lite", "--sizes", "64x96", "--backends", "torch", "--repeats", "2",
                 "--weights", f"mpvss_lite={tmp_path / 'w=1.pth'}", "--keep-canvas", "--threads", "3",
                 "--warmup", "4", "--e2e-frames", "5", "--cache-dir", str(tmp_path / "cache"),
                 "--json", str(json_path)]) == 0
    (opts,) = got
    assert opts.sizes == [(64, 96)] and opts.repeats == 2 and opts.keep_canvas is True
    assert opts.weights == {"mpvss_lite": str(tmp_path / "w=1.pth")}
    assert (opts.threads, opts.warmup, opts.e2e_frames) == (3, 4, 5)
    assert str(opts.cache_dir) == str(tmp_path / "cache")
    assert json.loads(json_path.read_text()) == {"rows": []}
    for bad in (["--repeats", "0"], ["--e2e-frames", "0"], ["--warmup", "-1"]):
        assert main(["bench", "--models", "mpvss_lite", "--sizes", "64x96", *bad]) == 2
    assert len(got) == 1
