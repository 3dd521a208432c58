"""``mpvss bench``: key-frame and non-key-frame latency and end-to-end frame rate per backend.

For every model x size x backend:

* **key ms**: median wall time of ``backend.segment_key_frame`` (the segmentor alone) over
  ``repeats`` different frames, after ``warmup`` runs;
* **non-key ms**: median of ``backend.propagate`` (motion module + warp; the paper's direct flow,
  one motion-module run as each step of the default chained flow) over ``repeats`` frames, each 3
  frames after its key frame, from the key frame's state as
  :meth:`~mpvss_ros.segmenter.VideoSegmenter.push` keeps it: its active queries only
  (``postprocess.min_query_score``), the padding filled;
* **key/non-key**: the ratio of the two (MPVSS's speed-up per non-key frame);
* **fps fixed:5** and **fps adaptive**: frames / wall time of
  :meth:`~mpvss_ros.segmenter.VideoSegmenter.push` (pre-processing, scheduling, model,
  post-processing at the frame's resolution) over ``e2e_frames`` consecutive frames with the
  ``query_flow`` propagator and the schedules ``fixed:5`` and ``adaptive`` (its key-frame ratio
  is printed beside it).

The model's canvas is set to the benchmark size and the frames are real: CamVid val (15 fps),
else ``solidWhiteRight.mp4``, else ``bikes.mp4``, resized to exactly the size (so the canvas has
no letterbox margin; 360x480 is padded to 384x480); seeded random frames with a note when none
is available. With ``keep_canvas`` (``--keep-canvas``) the model keeps its configured canvas
(``input.size``) and the frames of each size are letterboxed onto it, as a camera of that
resolution is with the shipped configuration: the key and non-key latencies then hardly change
with the size, while the end-to-end rates include scheduling, letterboxing and the
post-processing at the frame's size. Each row names its padded canvas (``canvas``). Weights are :func:`~mpvss_ros.model_loader.load_model`'s defaults: untrained
(seeded random) when no trained weights are installed, which is stated; latency does not depend
on the weights (all operations are dense).

Backend specs: ``torch``, ``onnxruntime``, ``tensorrt`` with optional ``:cpu``/``:cuda`` and
``:fp32``/``:fp16``, e.g. ``torch:cuda:fp16``, ``tensorrt:fp16``. By default every spec that can
run here: ``torch`` and ``onnxruntime`` on the CPU; with a GPU also ``torch:cuda``,
``torch:cuda:fp16``, ``onnxruntime:cuda`` (onnxruntime-gpu), ``tensorrt`` and ``tensorrt:fp16``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from .base import BACKENDS, MIN_GRAPH_SIDE, PRECISIONS

__all__ = ["BenchOptions", "BackendSpec", "parse_backend_spec", "parse_size", "default_backend_specs",
           "hardware_info", "run_bench", "format_markdown", "bench_frames", "write_json"]

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("mpvss_lite", "mpvss_r50")
DEFAULT_SIZES = ((360, 480), (512, 1024), (1024, 2048))


@dataclass(frozen=True)
class BackendSpec:
    """One backend configuration to benchmark."""

    backend: str
    device: str = "cpu"
    precision: str = "fp32"

    def __str__(self) -> str:
        parts = [self.backend]
        if self.device != ("cuda" if self.backend == "tensorrt" else "cpu"):
            parts.append(self.device)
        if self.precision != "fp32":
            parts.append(self.precision)
        return ":".join(parts)


def parse_backend_spec(text: str) -> BackendSpec:
    """``NAME[:cpu|:cuda][:fp32|:fp16]`` -> :class:`BackendSpec`.

    Raises:
        ValueError: unknown name, device or precision.
    """
    parts = text.strip().split(":")
    if not parts[0] or parts[0] not in BACKENDS:
        raise ValueError(f"bad backend spec {text!r}: start with one of {', '.join(BACKENDS)}")
    device = "cuda" if parts[0] == "tensorrt" else "cpu"
    precision = "fp32"
    given: set[str] = set()
    for p in parts[1:]:
        kind = "device" if p in ("cpu", "cuda") else "precision" if p in PRECISIONS else None
        if kind in given:
            raise ValueError(f"bad backend spec {text!r}: a second {kind} ({p!r})")
        given.add(kind or "")
        if kind == "device":
            device = p
        elif kind == "precision":
            precision = p
        else:
            raise ValueError(f"bad backend spec {text!r}: {p!r} is neither cpu/cuda nor {'/'.join(PRECISIONS)}")
    if parts[0] == "tensorrt" and device != "cuda":
        raise ValueError(f"bad backend spec {text!r}: tensorrt runs on cuda")
    return BackendSpec(parts[0], device, precision)


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` -> (H, W).

    Raises:
        ValueError: not two integers >= :data:`~mpvss_ros.runtime.base.MIN_GRAPH_SIDE` (32).
    """
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad size {text!r}: use HxW, e.g. 360x480") from None
    if min(h, w) < MIN_GRAPH_SIDE:
        raise ValueError(f"bad size {text!r}: both sides must be >= {MIN_GRAPH_SIDE}")
    return h, w


def default_backend_specs() -> list[BackendSpec]:
    """Every backend configuration that can run on this machine."""
    from . import backend_missing

    candidates = [BackendSpec("torch"), BackendSpec("onnxruntime"), BackendSpec("torch", "cuda"),
                  BackendSpec("torch", "cuda", "fp16"), BackendSpec("onnxruntime", "cuda"),
                  BackendSpec("tensorrt", "cuda"), BackendSpec("tensorrt", "cuda", "fp16")]
    return [s for s in candidates if backend_missing(s.backend, s.device, s.precision) is None]


@dataclass
class BenchOptions:
    """Settings of one ``mpvss bench`` run (see the module docstring).

    Attributes:
        models: model names (``config/models/*.yaml``).
        sizes: input sizes (H, W) in pixels (:func:`parse_size`).
        backends: the backends to time; None = :func:`default_backend_specs`.
        repeats: frames timed per latency figure (key ms, non-key ms; the medians).
        warmup: untimed key-frame and non-key-frame runs before them.
        e2e_frames: frames of each end-to-end rate (fps fixed:5, fps adaptive).
        threads: torch (and onnxruntime intra-op) CPU threads; None = torch's current number.
        weights: model name -> weights file; a model not named gets
            :func:`~mpvss_ros.model_loader.load_model`'s default.
        cache_dir: where exported graphs and engines are cached (None: the default cache).
        keep_canvas: keep the model's configured canvas and letterbox each size onto it
            (False: the canvas is set to each size).
    """

    models: Sequence[str] = DEFAULT_MODELS
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES
    backends: Sequence[BackendSpec] | None = None  # None: default_backend_specs()
    repeats: int = 3
    warmup: int = 1
    e2e_frames: int = 10
    threads: int | None = None
    weights: dict[str, str] = field(default_factory=dict)  # model -> weights file
    cache_dir: str | None = None
    keep_canvas: bool = False  # True: the model's own canvas, frames letterboxed onto it


def hardware_info(threads: int) -> dict[str, Any]:
    """CPU model, cores, threads used, GPU, library versions, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads,
                            "torch": torch.__version__, "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def bench_frames(count: int) -> tuple[list[np.ndarray], str]:
    """``count`` consecutive real frames (RGB uint8, native size) and their source."""
    from ..io.samples import bikes_clip, camvid_dir, dashcam_clip
    from ..io.video import open_source

    sources: list[Path] = [p for p in (camvid_dir("val"), dashcam_clip()) if p is not None]
    try:
        sources.append(bikes_clip())
    except FileNotFoundError:
        pass
    for path in sources:
        frames = []
        try:
            with open_source(path) as src:
                for frame in src:
                    frames.append(frame.image)
                    if len(frames) >= count:
                        break
        except (OSError, ValueError):
            continue
        if frames:
            while len(frames) < count:  # short clip: loop it
                frames.extend(frames[: count - len(frames)])
            return frames, ("CamVid val" if path.is_dir() else path.name)
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (360, 480, 3), dtype=np.uint8) for _ in range(count)], "seeded random frames (no real data found)"


def _resize(frames: Sequence[np.ndarray], hw: tuple[int, int]) -> list[np.ndarray]:
    out = []
    for f in frames:
        interp = cv2.INTER_AREA if f.shape[0] * f.shape[1] > hw[0] * hw[1] else cv2.INTER_LINEAR
        out.append(np.ascontiguousarray(cv2.resize(f, (hw[1], hw[0]), interpolation=interp)))
    return out


def _sync(spec: BackendSpec) -> None:
    if spec.device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3 if times else float("nan")


def _bench_one(backend: Any, spec: BackendSpec, frames: list[np.ndarray], opts: BenchOptions) -> dict[str, Any]:
    from ..propagation import QueryFlowPropagator
    from ..scheduling import parse_schedule
    from ..segmenter import VideoSegmenter

    seg = VideoSegmenter(backend, QueryFlowPropagator(backend), parse_schedule("fixed:1"))
    lb = seg.letterbox(frames[0].shape[:2])
    tensors = [seg.canvas(f, lb) for f in frames]
    n = len(tensors)
    key_t, non_key_t = [], []
    with torch.inference_mode():
        for i in range(opts.warmup):
            k = backend.segment_key_frame(tensors[i % n], lb.resized_hw)
            backend.propagate(seg.key_state(k), tensors[(i + 3) % n])
        for i in range(opts.repeats):
            _sync(spec)
            t = time.perf_counter()
            key = backend.segment_key_frame(tensors[i % n], lb.resized_hw)
            _sync(spec)
            key_t.append(time.perf_counter() - t)
            key = seg.key_state(key)  # as push keeps it: the non-key frames run its active queries
            _sync(spec)
            t = time.perf_counter()
            backend.propagate(key, tensors[(i + 3) % n])
            _sync(spec)
            non_key_t.append(time.perf_counter() - t)
    key_ms, non_key_ms = _median_ms(key_t), _median_ms(non_key_t)
    row: dict[str, Any] = {"canvas": f"{lb.padded_hw[0]}x{lb.padded_hw[1]}", "key_ms": key_ms, "non_key_ms": non_key_ms,
                           "ratio": key_ms / non_key_ms}
    for sched in ("fixed:5", "adaptive"):
        seg = VideoSegmenter(backend, QueryFlowPropagator(backend), parse_schedule(sched))
        keys = 0
        t = time.perf_counter()
        for i in range(opts.e2e_frames):
            keys += seg.push(frames[i % n], i / 15.0).is_key_frame
        _sync(spec)
        wall = time.perf_counter() - t
        name = sched.split(":")[0] if sched == "adaptive" else "fixed5"
        row[f"fps_{name}"] = opts.e2e_frames / wall
        row[f"key_ratio_{name}"] = keys / opts.e2e_frames
    return row


def _make_backend(spec: BackendSpec, loaded: Any, hw: tuple[int, int], opts: BenchOptions, threads: int) -> Any:
    from . import load_backend

    # ``loaded`` holds a copy made for this backend alone (run_bench): handed over, not copied again
    return load_backend(spec.backend, loaded, device=spec.device, precision=spec.precision, input_hw=hw,
                        cache_dir=opts.cache_dir, threads=threads, copy_model=False)


def _is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of memory: Python's ``MemoryError``, CUDA's "out of memory"
    or torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory", a RuntimeError)."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def run_bench(opts: BenchOptions, progress: Any = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"hardware", "frames", "weights", "rows": [...]}``.

    Each row: model, size, backend, key_ms, non_key_ms, ratio, fps_fixed5, fps_adaptive,
    key_ratio_adaptive, or ``error`` (backend unavailable, out of memory, a ``keep_canvas``
    letterbox too thin for a fixed-shape backend) instead of figures.
    """
    from ..model_loader import load_model
    from ..segmenter import Letterbox
    from . import BackendUnavailable
    from .export import replace_canvas

    say = progress or (lambda m: None)
    threads = opts.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    specs = list(opts.backends) if opts.backends is not None else default_backend_specs()
    count = max(opts.e2e_frames, opts.repeats + opts.warmup + 3)
    raw, frames_source = bench_frames(count)
    result: dict[str, Any] = {"hardware": hardware_info(threads), "frames": frames_source, "weights": {}, "rows": [],
                              "options": {"repeats": opts.repeats, "warmup": opts.warmup, "e2e_frames": opts.e2e_frames,
                                          "keep_canvas": opts.keep_canvas}}
    for model_name in opts.models:
        # weights without a trained motion module time as well: latency does not depend on the weights,
        # so the query-flow columns run the untrained module (the weights line says so)
        pristine = load_model(model_name, opts.weights.get(model_name), "cpu", motion_optional=True)
        result["weights"][model_name] = str(pristine.weights) if pristine.weights else "untrained (seeded random init)"
        if not pristine.model.motion_trained:
            result["weights"][model_name] += (" (no trained motion module: non-key and end-to-end times run an "
                                              "untrained one)")
            pristine.model.motion_trained = True  # this copy only times: query flow may run it
        for hw in opts.sizes:
            frames = _resize(raw, hw)
            for spec in specs:
                row: dict[str, Any] = {"model": model_name, "size": f"{hw[0]}x{hw[1]}", "backend": str(spec)}
                say(f"bench {model_name} {hw[0]}x{hw[1]} {spec} ...")
                # Each backend gets its own copy, handed over (load_backend copy_model=False): the torch
                # backend prepares the model it is given in place (device, folded BatchNorm, layout),
                # which a later export must not inherit; the others keep it to export new sizes.
                model = copy.deepcopy(pristine.model)
                valid_hw = hw
                if opts.keep_canvas:
                    valid_hw = Letterbox.for_input(hw, model.cfg.input).resized_hw
                else:
                    model.cfg = replace_canvas(pristine.model.cfg, hw)
                loaded = dataclasses.replace(pristine, model=model, config=model.cfg)
                backend = None
                try:
                    if spec.backend != "torch" and min(valid_hw) < MIN_GRAPH_SIDE:  # --keep-canvas: a thin letterbox
                        row["error"] = (f"letterboxed to {valid_hw[0]}x{valid_hw[1]} on the model's canvas: fixed-shape "
                                        f"graphs need {MIN_GRAPH_SIDE} pixels a side (the torch backend runs it)")
                    else:
                        backend = _make_backend(spec, loaded, valid_hw, opts, threads)
                        row.update(_bench_one(backend, spec, frames, opts))
                except BackendUnavailable as exc:  # its remedy names segment's flags, not bench's specs
                    row["error"] = f"{exc.reason} (pick another --backends spec)"
                except (RuntimeError, MemoryError) as exc:
                    if not _is_oom(exc):
                        raise
                    row["error"] = "out of memory"
                finally:
                    if backend is not None and hasattr(backend, "close"):
                        backend.close()
                    del backend, loaded, model
                    if spec.device == "cuda" and torch.cuda.is_available():
                        torch.cuda.empty_cache()
                result["rows"].append(row)
                say(_row_text(row))
    return result


def _row_text(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['model']} {row['size']} {row['backend']}: {row['error']}"
    return (f"  {row['model']} {row['size']} {row['backend']}: key {row['key_ms']:.1f} ms, non-key "
            f"{row['non_key_ms']:.1f} ms, fixed:5 {row['fps_fixed5']:.2f} fps, adaptive {row['fps_adaptive']:.2f} fps")


def format_markdown(result: dict[str, Any]) -> str:
    """The benchmark as Markdown: a hardware line, the weights, and one table row per run."""
    hw = result["hardware"]
    libs = ", ".join(f"{k} {hw[k]}" for k in ("torch", "onnxruntime", "tensorrt") if hw.get(k))
    lines = [
        f"**Hardware:** {hw['cpu']} ({hw['logical_cpus']} logical CPUs, {hw['threads']} threads used); "
        f"GPU: {hw['gpu'] or 'none'}; {libs}; load average {hw.get('load_average')}",
        "",
        f"**Frames:** {result['frames']}, resized to each size"
        + (" and letterboxed onto the model's own canvas" if result["options"].get("keep_canvas")
           else ", the model's canvas set to it")
        + ". **Weights:** "
        + "; ".join(f"{m}: {w}" for m, w in result["weights"].items())
        + f". Medians over {result['options']['repeats']} runs; end to end over {result['options']['e2e_frames']} frames.",
        "",
        "| model | size | canvas | backend | key frame ms | non-key frame ms | key/non-key | fps fixed:5 | fps adaptive (key ratio) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['size']} | – | {r['backend']} | – | – | – | – | {r['error']} |")
        else:
            lines.append(f"| {r['model']} | {r['size']} | {r['canvas']} | {r['backend']} | {r['key_ms']:.1f} | {r['non_key_ms']:.1f} | "
                         f"{r['ratio']:.2f} | {r['fps_fixed5']:.2f} | {r['fps_adaptive']:.2f} ({r['key_ratio_adaptive']:.2f}) |")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write the benchmark result as JSON."""
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")

