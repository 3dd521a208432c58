"""Command-line pieces of :mod:`mpvss_ros.runtime`, used by :mod:`mpvss_ros.cli`.

* ``--backend torch|onnxruntime|tensorrt``, ``--precision fp32|fp16|bf16`` and ``--cache-dir`` for
  ``mpvss segment``, ``mpvss eval`` and ``mpvss bag`` (:func:`add_backend_options`, :func:`load_model_and_backend`);
* ``mpvss export --out DIR [--model M] [--weights W] [--height H --width W]``: the two ONNX graphs,
  ``contract.json`` and the onnxruntime-vs-PyTorch parity figures;
* ``mpvss build-engine [--model M] [--height H --width W] [--precision P]``: prebuild the
  TensorRT engines into the cache;
* both take weights without a trained motion module (a per-frame Mask2Former or stage-1
  checkpoint) and say so
  (:data:`NO_MOTION_EXPORT_NOTE`);
* ``mpvss bench [--models ...] [--sizes HxW ...] [--backends ...] [--repeats N] [--keep-canvas]``: latency table;
* ``mpvss cache [--prune [--max-mb N] | --clear] [--cache-dir D]``: list the cache of exported graphs
  and engines, prune it to a budget or empty it (:mod:`mpvss_ros.runtime.cache`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..devices import as_torch_device
from ..paths import check_output_dir, make_output_dir, write_json_atomic
from .base import BACKENDS, MIN_GRAPH_SIDE, PRECISIONS, BackendUnavailable

__all__ = ["add_backend_options", "add_runtime_commands", "load_model_and_backend", "RUNTIME_COMMANDS"]

#: What ``mpvss export`` and ``build-engine`` say of weights without a trained motion module (a
#: per-frame Mask2Former or stage-1 checkpoint): the graphs are built, the non-key one with the untrained motion module,
#: and the contract's ``motion_trained`` is false, so a run of them refuses query flow.
NO_MOTION_EXPORT_NOTE = ("the weights hold no trained motion module (a per-frame Mask2Former or stage-1 checkpoint): "
                         "the non-key graph's motion module is untrained and contract.json says motion_trained: false, "
                         "so these graphs run with --propagator optical_flow or copy (node parameter propagator), not "
                         "query_flow")


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """``--backend``, ``--precision``, ``--cache-dir``, ``--onnx-dir``."""
    g = p.add_argument_group("inference backend")
    g.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch (default), onnxruntime (exported ONNX graphs, cached) or tensorrt (engines, cached; "
                        "needs a CUDA GPU); --device picks the CPU/GPU")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default), fp16 (torch on CUDA: autocast, pixel decoder in fp32; tensorrt: fp16 engines) "
                        "or bf16 (torch on a CPU with bfloat16 instructions: backbone and motion encoder in bfloat16)")
    g.add_argument("--cache-dir", default=None,
                   help="cache of exported ONNX graphs and TensorRT engines (default $MPVSS_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/mpvss_ros, else ~/.cache/mpvss_ros)")
    g.add_argument("--onnx-dir", default=None,
                   help="run this export folder (mpvss export, or your own model to its contract.json) with "
                        "onnxruntime or tensorrt instead of exporting --model/--weights; its graphs fix the input size")


def load_model_and_backend(args: argparse.Namespace,
                           check_loaded: Callable[[Any], None] | None = None) -> tuple[Any, Any]:
    """(LoadedModel, backend) from ``--model/--weights/--device/--threads`` and the backend options
    (``--onnx-dir``: the export folder's contract instead of a model, :func:`~mpvss_ros.model_loader.load_exported`).

    The backend's availability is checked first, so a missing TensorRT fails at once with one line.
    Weights without a trained motion module, and export folders of them, load when
    ``--propagator`` is ``optical_flow`` or ``copy`` (not for ``--study``):
    :func:`~mpvss_ros.model_loader.load_model` and ``load_exported`` ``motion_optional``.
    The PyTorch model is loaded on ``--device`` for the torch backend and on the CPU (for export)
    otherwise.

    The model is loaded for the backend, which takes it over (:func:`~mpvss_ros.runtime.load_backend`
    ``copy_model=False``): onnxruntime and TensorRT keep the module itself, not a copy, so its
    weights are held once. Callers use the returned LoadedModel for its configuration and
    provenance and run the backend; they must not change ``loaded.model`` in place.

    ``check_loaded(loaded)``, when given, runs between loading and building the backend, so what
    it refuses costs no export or TensorRT engine build.

    Raises:
        BackendUnavailable: (a ValueError) the backend cannot run here.
        Exception: whatever ``check_loaded`` raises.
    """
    from ..model_loader import load_exported, load_model, resolve_device
    from . import backend_missing, load_backend

    backend_name = getattr(args, "backend", "torch")
    precision = getattr(args, "precision", "fp32")
    onnx_dir = getattr(args, "onnx_dir", None)
    if onnx_dir is not None:
        if backend_name == "torch":
            raise ValueError("--onnx-dir needs --backend onnxruntime or tensorrt")
        if args.model is not None or args.weights is not None:
            raise ValueError("--onnx-dir runs the exported graphs and their contract: leave out --model/--weights")
    device = resolve_device(args.device, backend_name, precision)
    missing = backend_missing(backend_name, device, precision)
    if missing:
        raise BackendUnavailable(missing)
    # weights without a trained motion module (a per-frame Mask2Former checkpoint, a stage-1 file,
    # an export of either) serve a run that never uses one: optical flow or copy between key
    # frames, and no study (it runs query flow)
    motion_optional = getattr(args, "propagator", "query_flow") != "query_flow" and not getattr(args, "study", False)
    if onnx_dir is not None:
        loaded = load_exported(onnx_dir, motion_optional=motion_optional)
    else:
        loaded = load_model(args.model, args.weights, device if backend_name == "torch" else "cpu",
                            motion_optional=motion_optional)
    if check_loaded is not None:
        check_loaded(loaded)
    backend = load_backend(backend_name, loaded, device=device, precision=precision,
                           cache_dir=getattr(args, "cache_dir", None), threads=getattr(args, "threads", None),
                           onnx_dir=onnx_dir, copy_model=False)
    return loaded, backend


def _size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int, default=None, help="valid (unpadded) input height (default: the model's canvas)")
    p.add_argument("--width", type=int, default=None, help="valid (unpadded) input width (default: the model's canvas)")


def _model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name (mpvss_lite, mpvss_r50, mpvss_swin_base, ...) or YAML config (default as load_model)")
    p.add_argument("--weights", default=None, help="checkpoint (default: the model's shipped weights, else untrained)")


def add_runtime_commands(sub: Any) -> None:
    """Add the ``export``, ``check-export``, ``build-engine``, ``bench`` and ``cache`` sub-commands."""
    ex = sub.add_parser("export", help="export the model to two ONNX graphs (key / non-key frame) + contract.json",
                        description="Export key_frame.onnx and non_key_frame.onnx (opset 17, static shapes: one pair per "
                                    "input size) and contract.json into --out, check them with onnx.checker and compare "
                                    "onnxruntime with PyTorch on real frames.")
    ex.add_argument("--out", required=True, help="output folder")
    _model(ex)
    _size(ex)
    ex.add_argument("--no-parity", action="store_true", help="skip the onnxruntime-vs-PyTorch comparison")
    ex.add_argument("--threads", type=int, default=None, help="CPU threads (torch and onnxruntime)")

    ce = sub.add_parser("check-export", help="check an export folder (ours or your own model) against its contract.json",
                        description="Check the contract, the graphs' inputs/outputs (names, float32, static shapes as "
                                    "listed), their sha256, and a run of both graphs on the CPU (onnxruntime) whose "
                                    "outputs must have the listed shapes and be finite. Exit 0 when it passes, 2 with "
                                    "every problem listed otherwise.")
    ce.add_argument("export_dir", help="the folder with contract.json, key_frame.onnx, non_key_frame.onnx")
    ce.add_argument("--threads", type=int, default=1,
                    help="onnxruntime intra-op threads, 0 = onnxruntime's choice (default 1)")

    be = sub.add_parser("build-engine", help="prebuild the TensorRT engines (cached) for a model and input size",
                        description="Export the ONNX graphs (cached) and build both TensorRT engines into the engine cache, "
                                    "keyed by ONNX hash, TensorRT version, GPU, compute capability, precision and shape.")
    _model(be)
    _size(be)
    be.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="fp32 (default) or fp16")
    be.add_argument("--device", default="cuda", help="the GPU, cuda[:N] (default cuda)")
    be.add_argument("--workspace-mb", type=int, default=None, help="builder workspace limit in MiB (default 2048)")
    be.add_argument("--no-keep-fp32", action="store_true",
                    help="fp16: let TensorRT choose fp16 for the pixel decoder and the warp too")
    be.add_argument("--cache-dir", default=None, help="cache root (default $MPVSS_CACHE_DIR, else $XDG_CACHE_HOME/mpvss_ros, else "
                                                         "~/.cache/mpvss_ros)")

    bn = sub.add_parser("bench", help="key / non-key latency and end-to-end fps per backend (Markdown table)",
                        description="Benchmark key-frame and non-key-frame latency (median ms) and end-to-end frames/s at "
                                    "fixed:5 and adaptive, per model, size and backend, on real frames.")
    bn.add_argument("--models", nargs="+", default=["mpvss_lite", "mpvss_r50"], help="default: mpvss_lite mpvss_r50")
    bn.add_argument("--sizes", nargs="+", default=["360x480", "512x1024", "1024x2048"], help="HxW (default: 360x480 512x1024 1024x2048)")
    bn.add_argument("--backends", nargs="+", default=None,
                    help="NAME[:cpu|:cuda][:fp16], e.g. torch onnxruntime torch:cuda:fp16 tensorrt:fp16 "
                         "(default: all that can run here)")
    bn.add_argument("--repeats", type=int, default=3, help="timed key and non-key runs per configuration (default 3)")
    bn.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    bn.add_argument("--e2e-frames", type=int, default=10, help="frames pushed per end-to-end schedule (default 10)")
    bn.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime (default: torch's)")
    bn.add_argument("--weights", nargs="*", default=[], metavar="MODEL=FILE", help="weights per model (default: shipped)")
    bn.add_argument("--cache-dir", default=None, help="ONNX/engine cache root")
    bn.add_argument("--keep-canvas", action="store_true",
                    help="keep each model's configured canvas and letterbox the frames of each size onto it, as a "
                         "camera of that resolution is (default: the canvas is set to each size)")
    bn.add_argument("--json", default=None, help="also write the results as JSON to this file")

    ca = sub.add_parser("cache", help="list, prune or clear the cache of exported ONNX graphs and TensorRT engines",
                        description="List the cache's entries, most recently used first. New exports and engine builds "
                                    "prune it to $MPVSS_CACHE_MAX_MB MiB (default 2048; 0 = no limit) by themselves, "
                                    "least recently used entries first.")
    ca.add_argument("--cache-dir", default=None, help="cache root (default $MPVSS_CACHE_DIR, else $XDG_CACHE_HOME/mpvss_ros, else "
                                                         "~/.cache/mpvss_ros)")
    action = ca.add_mutually_exclusive_group()
    action.add_argument("--prune", action="store_true", help="remove least recently used entries down to the budget")
    action.add_argument("--clear", action="store_true", help="remove every entry")
    ca.add_argument("--max-mb", type=float, default=None,
                    help="budget for --prune in MiB, > 0 (default $MPVSS_CACHE_MAX_MB, else 2048)")


def _hw(args: argparse.Namespace, cfg: Any) -> tuple[int, int]:
    if (args.height is None) != (args.width is None):
        raise ValueError("give both --height and --width, or neither")
    if args.height is not None:
        if min(args.height, args.width) < MIN_GRAPH_SIDE:
            raise ValueError(f"--height/--width must be >= {MIN_GRAPH_SIDE}, got {args.height}x{args.width}")
        return int(args.height), int(args.width)
    if cfg.input.size is None:
        raise ValueError(f"model {cfg.name} has no canvas size: give --height and --width")
    return int(cfg.input.size[0]), int(cfg.input.size[1])


def cmd_export(args: argparse.Namespace) -> int:
    from ..model_loader import load_model
    from .export import export_onnx, check_parity, format_parity

    check_output_dir(args.out, "--out")  # a file, or a folder that cannot be made: before the model loads
    loaded = load_model(args.model, args.weights, "cpu", motion_optional=True)
    hw = _hw(args, loaded.config)
    res = export_onnx(loaded.model, args.out, hw, weights=str(loaded.weights) if loaded.weights else None,
                      trained=loaded.trained)
    c = res.contract["canvas"]
    print(f"exported {loaded.config.name} ({'trained: ' + str(loaded.weights) if loaded.trained else 'UNTRAINED weights'}) "
          f"for valid {c['valid_hw'][0]}x{c['valid_hw'][1]} (padded {c['padded_hw'][0]}x{c['padded_hw'][1]}) "
          f"in {res.seconds:.1f} s: {res.key_frame}, {res.non_key_frame}; onnx.checker passed")
    if not res.contract["motion_trained"]:
        print(NO_MOTION_EXPORT_NOTE)
    status = 0
    if not args.no_parity:
        parity = check_parity(res.out_dir, loaded.model, threads=args.threads)
        res.contract["parity"] = parity
        write_json_atomic(res.out_dir / "contract.json", res.contract)
        print(format_parity(parity))
        if not parity["passed"]:
            print("mpvss: error: onnxruntime differs from PyTorch beyond the tolerance", file=sys.stderr)
            status = 1
    print(f"wrote {res.out_dir / 'contract.json'}")
    return status


def cmd_check_export(args: argparse.Namespace) -> int:
    from .export import check_export

    print(json.dumps(check_export(args.export_dir, threads=args.threads)))
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from ..model_loader import load_model
    from .export import GraphSource
    from .tensorrt_backend import DEFAULT_WORKSPACE_MB, build_engines, tensorrt_missing

    missing = tensorrt_missing(args.precision)
    if missing:
        raise BackendUnavailable(missing)
    dev = as_torch_device(args.device)
    if dev.type != "cuda":
        raise ValueError(f"build-engine needs a CUDA device, got {args.device!r}")
    loaded = load_model(args.model, args.weights, "cpu", motion_optional=True)
    hw = _hw(args, loaded.config)
    if not loaded.model.motion_trained:
        print(f"mpvss: {NO_MOTION_EXPORT_NOTE}", file=sys.stderr)
    source = GraphSource.from_model(loaded.model, args.cache_dir, weights=str(loaded.weights) if loaded.weights else None,
                                    trained=loaded.trained, copy_model=False)  # loaded for the source alone: no copy
    print(f"mpvss: exporting ONNX for {hw[0]}x{hw[1]} (cached) ...", file=sys.stderr, flush=True)
    paths = build_engines(source, hw, args.precision, args.cache_dir, dev.index or 0,
                          args.workspace_mb or DEFAULT_WORKSPACE_MB, keep_fp32=not args.no_keep_fp32)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchOptions, format_markdown, parse_backend_spec, parse_size, run_bench, write_json

    if args.repeats < 1 or args.warmup < 0 or args.e2e_frames < 1:
        raise ValueError("--repeats and --e2e-frames must be >= 1, --warmup >= 0")
    if args.json:  # before the benchmark, not after minutes of it
        if Path(args.json).is_dir():
            raise ValueError(f"--json {args.json} is a folder, not a file")
        check_output_dir(Path(args.json).parent, "--json file's folder")
    weights = {}
    for item in args.weights:
        if "=" not in item:
            raise ValueError(f"--weights takes MODEL=FILE, got {item!r}")
        k, v = item.split("=", 1)
        weights[k] = v
    opts = BenchOptions(
        models=list(args.models),
        sizes=[parse_size(s) for s in args.sizes],
        backends=[parse_backend_spec(b) for b in args.backends] if args.backends else None,
        repeats=args.repeats,
        warmup=args.warmup,
        e2e_frames=args.e2e_frames,
        threads=args.threads,
        weights=weights,
        cache_dir=args.cache_dir,
        keep_canvas=args.keep_canvas,
    )
    result = run_bench(opts, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_markdown(result))
    if args.json:
        make_output_dir(Path(args.json).parent, "--json file's folder")
        write_json(result, args.json)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .cache import cache_budget_bytes, cache_entries, default_cache_dir, format_entries, mib_to_bytes, prune_cache

    root = args.cache_dir or default_cache_dir()
    if args.max_mb is not None and not args.prune:
        raise ValueError("--max-mb goes with --prune")
    if args.prune or args.clear:
        if args.clear:
            budget = 0
        elif args.max_mb is not None:
            if not 0 < args.max_mb < float("inf"):
                raise ValueError(f"--max-mb must be a number of MiB > 0 (--clear empties the cache), got {args.max_mb}")
            budget = mib_to_bytes(args.max_mb)
        else:
            budget = cache_budget_bytes()
            if budget is None:
                raise ValueError("MPVSS_CACHE_MAX_MB is 0 (no limit): give --max-mb, or --clear")
        removed = prune_cache(root, budget)
        print(f"removed {len(removed)} entries, {sum(e.size_bytes for e in removed) / 2**20:.1f} MiB")
    print(f"cache {root}")
    print(format_entries(cache_entries(root)))
    return 0


RUNTIME_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "export": cmd_export,
    "check-export": cmd_check_export,
    "build-engine": cmd_build_engine,
    "bench": cmd_bench,
    "cache": cmd_cache,
}
