"""The TensorRT backend: engines built from the two ONNX graphs, cached on disk.

Requirements: the ``tensorrt`` Python package (TensorRT >= 8.6: ``IGridSampleLayer``, the
name-based I/O API and ``execute_async_v3``), a CUDA GPU, and ``cuda-python``
(``cuda.bindings.runtime`` or the older ``cuda.cudart``) or ``pycuda`` for memory and streams,
whichever imports. Without them :class:`TensorRTBackend` raises
:class:`~mpvss_ros.runtime.base.BackendUnavailable` with one line naming what is missing.

**Engines.** :func:`build_engine` parses an ONNX graph (InstanceNormalization as TensorRT's
native layer, not the 8.6 parser's default plugin, which a later process could not deserialize
without registering the plugin library), sets the workspace pool limit, clears TF32 for ``fp32``
engines (float32 as exported) and sets the FP16 builder flag for ``fp16``. Engines are built and
loaded with their GPU current. With ``keep_fp32`` (default) the layers that are fragile in
half precision stay in float32 through layer precision constraints
(``OBEY_PRECISION_CONSTRAINTS``): the pixel decoder of the key graph (MSDeformAttn sampling
locations, as the official ``@autocast(enabled=False)``) and the top-level warp + semantic
inference of the non-key graph (``grid_sample`` coordinates); see :data:`FP32_LAYER_PATTERNS`.

**Cache.** An engine is stored under ``<cache>/engines/<graph>-<precision>-<key[:24]>.engine`` with a JSON
side-car, where the key is :func:`engine_cache_key` = sha256 of (ONNX file sha256, TensorRT
version, GPU name, compute capability, precision, input shapes, build options). Changing any of
them gives another key, so the engine is rebuilt; ``mpvss build-engine`` prebuilds.

**Inference.** Per engine: device buffers for every I/O tensor allocated once, page-locked
(pinned) host buffers, one CUDA stream; copies and ``execute_async_v3`` are queued on the stream
and synchronised once per call. The key frame's outputs are also copied device-to-device into
the non-key engine's key inputs, so non-key frames of the same key frame upload only the
current image and download only the warped mask logits and the flows (checked for non-finite
values: :func:`~mpvss_ros.runtime.base.nan_unless_finite`).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..devices import as_torch_device
from ..nn.mpvss import KeyFrameState
from ..paths import write_atomic, write_json_atomic
from .base import Backend, BackendUnavailable, Missing, SizeCache, check_precision, nan_unless_finite
from .cache import ENGINE_TEMP_PREFIX, build_lock, default_cache_dir, mark_used, prune_to_budget
from .export import KEY_OUTPUTS, GraphSource, _sha256_file, read_contract

__all__ = [
    "FP32_LAYER_PATTERNS",
    "TensorRTBackend",
    "build_engine",
    "engine_cache_key",
    "engine_for",
    "build_engines",
    "tensorrt_missing",
    "MISSING_MESSAGE",
]

log = logging.getLogger(__name__)

#: Layer-name patterns (regular expressions on TensorRT layer names, which the ONNX parser takes
#: from the ONNX node names) kept in float32 in fp16 engines.
FP32_LAYER_PATTERNS: dict[str, tuple[str, ...]] = {
    "key_frame": (r"^/pixel_decoder/",),  # the MSDeformAttn / FPN pixel decoder
    "non_key_frame": (r"^/[^/]+$",),  # top-level nodes: the mask warp (GridSample) and semantic scores
}
DEFAULT_WORKSPACE_MB = 2048
MISSING_MESSAGE = "tensorrt backend needs the tensorrt Python package, cuda-python (or pycuda) and a CUDA GPU"


# --------------------------------------------------------------------------------------------
# Availability


def _import_cudart() -> Any | None:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        return cudart
    except Exception:  # noqa: BLE001
        pass
    try:
        from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        return cudart
    except Exception:  # noqa: BLE001
        return None


def _import_pycuda() -> Any | None:
    try:
        import pycuda.driver as drv
        return drv
    except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA driver library
        return None


def _gpu_present() -> bool:
    cudart = _import_cudart()
    if cudart is not None:
        try:
            err, n = cudart.cudaGetDeviceCount()
            return err == cudart.cudaError_t.cudaSuccess and n > 0
        except Exception:  # noqa: BLE001 - driver missing raises in some versions
            return False
    drv = _import_pycuda()
    if drv is not None:
        try:
            drv.init()
            return drv.Device.count() > 0
        except Exception:  # noqa: BLE001
            return False
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def tensorrt_missing(precision: str = "fp32") -> str | None:
    """None when the TensorRT backend can run here at ``precision`` (fp32 or fp16), else one
    line naming what is missing and which backends would work. fp16 needs the FP16 builder flag
    and layer precision constraints of TensorRT 8.6-10.x, which :func:`build_engine` uses;
    TensorRT 11 removed them (NVIDIA/TensorRT v11.0, python/src/infer/pyCore.cpp)."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the tensorrt Python package")
    except Exception as exc:  # noqa: BLE001 - e.g. libnvinfer not loadable
        missing.append(f"a working tensorrt ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if _import_cudart() is None and _import_pycuda() is None:
        missing.append("cuda-python or pycuda")
    if not _gpu_present():
        missing.append("a CUDA GPU")
    if missing:
        return Missing(f"{MISSING_MESSAGE} (missing here: {', '.join(missing)})", "use the onnxruntime or torch backend")
    if precision == "fp16":
        import tensorrt as trt

        if not hasattr(trt.BuilderFlag, "FP16"):
            return Missing(f"TensorRT {trt.__version__} has no FP16 builder flag (weakly typed fp16 was removed in "
                           "favour of strongly typed networks)", "use --precision fp32, or TensorRT 8.6-10.x for fp16")
    return None


# --------------------------------------------------------------------------------------------
# Engine cache key (pure: unit-tested without TensorRT)


def engine_cache_key(onnx_sha256: str, tensorrt_version: str, gpu_name: str,
                     compute_capability: tuple[int, int] | str, precision: str,
                     input_shapes: dict[str, Sequence[int]], options: dict[str, Any] | None = None) -> str:
    """sha256 hex digest identifying an engine; any changed component changes it.

    Args:
        onnx_sha256: sha256 of the ONNX file's bytes.
        tensorrt_version: ``tensorrt.__version__``.
        gpu_name: the GPU's name (e.g. ``NVIDIA H100 80GB HBM3``).
        compute_capability: (major, minor) or ``"9.0"``.
        precision: ``fp32`` / ``fp16``.
        input_shapes: {input name: shape}.
        options: other build options that change the engine (fp32 layer patterns, workspace).
    """
    if isinstance(compute_capability, (tuple, list)):
        cc = f"{int(compute_capability[0])}.{int(compute_capability[1])}"
    else:
        cc = str(compute_capability)
    payload = {
        "onnx_sha256": str(onnx_sha256),
        "tensorrt": str(tensorrt_version),
        "gpu": str(gpu_name),
        "compute_capability": cc,
        "precision": str(precision),
        "input_shapes": {str(k): [int(v) for v in s] for k, s in sorted(input_shapes.items())},
        "options": options or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# CUDA memory and streams (cuda-python or pycuda)


class _CudaApi:
    """The few CUDA calls the backend needs, over cuda-python's runtime API or pycuda."""

    def __init__(self, device_index: int = 0) -> None:
        self.index = int(device_index)
        self.cudart = _import_cudart()
        self.drv = None if self.cudart is not None else _import_pycuda()
        if self.cudart is None and self.drv is None:
            raise BackendUnavailable(tensorrt_missing() or MISSING_MESSAGE)
        self._keep: list[Any] = []  # pycuda allocations (freed with the object)
        self._device_ptrs: list[int] = []
        self._host_ptrs: list[int] = []
        if self.cudart is not None:
            self._call(self.cudart.cudaSetDevice(self.index))
            self.stream = self._call(self.cudart.cudaStreamCreate())
            props = self._call(self.cudart.cudaGetDeviceProperties(self.index))
            name = props.name
            self.gpu_name = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).split("\x00")[0].strip()
            self.compute_capability = (int(props.major), int(props.minor))
            self.ctx = None
        else:
            drv = self.drv
            drv.init()
            dev = drv.Device(self.index)
            self.ctx = dev.retain_primary_context()
            self.ctx.push()
            try:
                self.stream = drv.Stream()
            finally:
                self.ctx.pop()
            self.gpu_name = dev.name()
            self.compute_capability = tuple(int(v) for v in dev.compute_capability())

    # -- helpers
    def _call(self, result: Any) -> Any:
        """Unpack a cuda-python ``(err, *values)`` tuple, raising on an error."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            _, text = self.cudart.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA error {err}: {text.decode() if isinstance(text, bytes) else text}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def activate(self) -> "_Active":
        """Context manager making this GPU current in the calling thread."""
        return _Active(self)

    @property
    def stream_handle(self) -> int:
        if self.cudart is None:
            return int(self.stream.handle)
        try:
            return int(self.stream)
        except TypeError:  # cuda-python versions without __int__ on handles
            return int(self.stream.getPtr())

    # -- memory
    def malloc(self, nbytes: int) -> int:
        if self.cudart is not None:
            ptr = int(self._call(self.cudart.cudaMalloc(max(int(nbytes), 1))))
            self._device_ptrs.append(ptr)
            return ptr
        alloc = self.drv.mem_alloc(max(int(nbytes), 1))
        self._keep.append(alloc)
        return int(alloc)

    def pinned(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape)) if len(shape) else 1
        if self.cudart is not None:
            nbytes = max(count * dtype.itemsize, 1)
            ptr = int(self._call(self.cudart.cudaMallocHost(nbytes)))
            self._host_ptrs.append(ptr)
            buf = (ctypes.c_byte * nbytes).from_address(ptr)
            return np.frombuffer(buf, dtype=dtype, count=count).reshape(tuple(shape))
        arr = self.drv.pagelocked_empty(tuple(shape), dtype)
        self._keep.append(arr)
        return arr

    def htod(self, dst: int, src: np.ndarray) -> None:
        if self.cudart is not None:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._call(self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self.stream))
        else:
            self.drv.memcpy_htod_async(dst, src, self.stream)

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        if self.cudart is not None:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._call(self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self.stream))
        else:
            self.drv.memcpy_dtoh_async(dst, src, self.stream)

    def dtod(self, dst: int, src: int, nbytes: int) -> None:
        if self.cudart is not None:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            self._call(self.cudart.cudaMemcpyAsync(dst, src, int(nbytes), kind, self.stream))
        else:
            self.drv.memcpy_dtod_async(dst, src, int(nbytes), self.stream)

    def synchronize(self) -> None:
        if self.cudart is not None:
            self._call(self.cudart.cudaStreamSynchronize(self.stream))
        else:
            self.stream.synchronize()

    def free(self, device_ptr: int | None, host: np.ndarray) -> None:
        """Free one buffer pair of :meth:`malloc` / :meth:`pinned` (an engine dropped with its
        size; ``device_ptr`` None: the pinned buffer alone, whose device buffer was never made);
        the stream is synchronised first, so no copy in flight uses them."""
        self.synchronize()
        if self.cudart is not None:
            if device_ptr in self._device_ptrs:
                self._device_ptrs.remove(device_ptr)
                self._call(self.cudart.cudaFree(device_ptr))
            host_ptr = int(host.ctypes.data)
            if host_ptr in self._host_ptrs:
                self._host_ptrs.remove(host_ptr)
                self._call(self.cudart.cudaFreeHost(host_ptr))
            return
        # pycuda: free the device allocation, drop the page-locked array (freed with it)
        self.ctx.push()
        try:
            keep = []
            for k in self._keep:
                if k is host:
                    continue
                if not isinstance(k, np.ndarray) and int(k) == device_ptr:
                    k.free()
                    continue
                keep.append(k)
            self._keep = keep
        finally:
            self.ctx.pop()

    def close(self) -> None:
        """Free every buffer and the stream (idempotent)."""
        if self.cudart is not None:
            for ptr in self._device_ptrs:
                self.cudart.cudaFree(ptr)
            for ptr in self._host_ptrs:
                self.cudart.cudaFreeHost(ptr)
            self._device_ptrs, self._host_ptrs = [], []
            if getattr(self, "stream", None) is not None:
                self.cudart.cudaStreamDestroy(self.stream)
                self.stream = None
        else:
            if self.ctx is not None:
                self.ctx.push()
                try:
                    self._keep = []
                    self.stream = None
                finally:
                    self.ctx.pop()
                self.ctx.detach()
                self.ctx = None


class _Active:
    def __init__(self, api: _CudaApi) -> None:
        self.api = api

    def __enter__(self) -> _CudaApi:
        if self.api.cudart is not None:
            self.api._call(self.api.cudart.cudaSetDevice(self.api.index))
        else:
            self.api.ctx.push()
        return self.api

    def __exit__(self, *exc: Any) -> None:
        if self.api.cudart is None:
            self.api.ctx.pop()


# --------------------------------------------------------------------------------------------
# Building


def _trt() -> Any:
    missing = tensorrt_missing()
    if missing:
        raise BackendUnavailable(missing)
    import tensorrt as trt

    return trt


_TRT_LOGGER: Any = None


def _check_engine_precision(precision: str) -> None:
    """TensorRT engines here are ``fp32`` or ``fp16`` (bf16 is a torch-on-CPU option)."""
    check_precision(precision)
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"TensorRT engines are fp32 or fp16, got {precision!r}")


def _trt_logger(trt: Any) -> Any:
    """The process's one TensorRT logger (TensorRT warns when builders and runtimes get different
    ones) with TensorRT's plugins registered, so that an engine that uses one deserializes."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(_TRT_LOGGER, "")
    return _TRT_LOGGER


class _OnDevice:
    """Context manager making CUDA device ``index`` current in this thread (through torch when it
    has CUDA, else cuda-python/pycuda), for building an engine on the GPU it is cached for."""

    def __init__(self, index: int) -> None:
        self.index = int(index)
        self._torch: Any = None
        self._api: _CudaApi | None = None
        self._active: _Active | None = None

    def __enter__(self) -> "_OnDevice":
        if torch.cuda.is_available():
            self._torch = torch.cuda.device(self.index)
            self._torch.__enter__()
        else:
            self._api = _CudaApi(self.index)
            self._active = self._api.activate()
            self._active.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._torch is not None:
            self._torch.__exit__(*exc)
        if self._active is not None:
            self._active.__exit__(*exc)
        if self._api is not None:
            self._api.close()


def build_engine(onnx_path: str | Path, precision: str = "fp32", workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 fp32_layer_patterns: Sequence[str] = ()) -> bytes:
    """Build a serialized TensorRT engine from an ONNX file.

    Args:
        onnx_path: the graph (static shapes).
        precision: ``fp32`` or ``fp16`` (FP16 builder flag; TensorRT picks per layer).
        workspace_mb: the workspace memory pool limit in MiB.
        fp32_layer_patterns: with fp16, regular expressions on layer names that are constrained to
            float32 (layers producing float tensors only; shape/int/bool layers are left alone).

    Raises:
        BackendUnavailable: TensorRT or CUDA missing.
        ValueError: a precision other than fp32 and fp16.
        RuntimeError: the parser or the builder failed (their messages are included).
    """
    _check_engine_precision(precision)
    trt = _trt()
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None and int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(explicit)  # TensorRT 8.x; implicit in (and deprecated by) TensorRT 10
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    native_norm = getattr(getattr(trt, "OnnxParserFlag", None), "NATIVE_INSTANCENORM", None)
    if native_norm is not None:  # the default from TensorRT 10; 8.6 would use a plugin
        parser.set_flag(native_norm)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if precision == "fp32" and tf32 is not None:  # on by default: Ampere+ would run fp32 layers in TF32
        config.clear_flag(tf32)
    if precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise RuntimeError(f"TensorRT {trt.__version__} has no FP16 builder flag (weakly typed fp16 was removed "
                               "in favour of strongly typed networks): use fp32 engines, or TensorRT 8.6-10.x for fp16")
        if hasattr(builder, "platform_has_fast_fp16") and not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast fp16; the fp16 engine may not be faster")
        config.set_flag(trt.BuilderFlag.FP16)
        if fp32_layer_patterns:
            regexes = [re.compile(p) for p in fp32_layer_patterns]
            float_types = {trt.float32, trt.float16}
            kept = 0
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if not any(r.search(layer.name) for r in regexes):
                    continue
                outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
                if not outputs or any(o.dtype not in float_types for o in outputs):
                    continue  # shape tensors, int/bool logic: no precision to choose
                if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE):
                    continue
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                kept += 1
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            log.info("fp16 engine: %d layers of %s constrained to fp32", kept, Path(onnx_path).name)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    return bytes(serialized)


def _device_identity(device_index: int) -> tuple[str, tuple[int, int]]:
    """(GPU name, compute capability) of a device."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device_index)
        return props.name, (int(props.major), int(props.minor))
    api = _CudaApi(device_index)
    try:
        return api.gpu_name, api.compute_capability  # type: ignore[return-value]
    finally:
        api.close()




def engine_for(onnx_path: str | Path, input_shapes: dict[str, Sequence[int]], graph: str, precision: str = "fp32",
               cache_dir: str | Path | None = None, device_index: int = 0, workspace_mb: int = DEFAULT_WORKSPACE_MB,
               keep_fp32: bool = True, progress: Callable[[str], None] | None = None) -> Path:
    """Path of the cached engine for ``onnx_path`` on this GPU, building it when absent.

    Args:
        onnx_path: the ONNX graph.
        input_shapes: its input shapes (part of the key).
        graph: ``key_frame`` or ``non_key_frame`` (selects :data:`FP32_LAYER_PATTERNS`).
        precision, workspace_mb, keep_fp32: build options (part of the key).
        cache_dir: cache root (default :func:`~mpvss_ros.runtime.cache.default_cache_dir`); a
            reused engine is marked used (pruning is :func:`build_engines`' job).
        device_index: the CUDA device.
        progress: called with a message before a (slow) build; default prints to stderr.
    """
    trt = _trt()
    onnx_path = Path(onnx_path)
    gpu_name, cc = _device_identity(device_index)
    patterns = FP32_LAYER_PATTERNS.get(graph, ()) if (keep_fp32 and precision == "fp16") else ()
    options = {"fp32_layer_patterns": list(patterns), "workspace_mb": int(workspace_mb)}
    key = engine_cache_key(_sha256_file(onnx_path), trt.__version__, gpu_name, cc, precision, input_shapes, options)
    root = Path(cache_dir).expanduser().absolute() if cache_dir is not None else default_cache_dir()
    folder = root / "engines"
    path = folder / f"{graph}-{precision}-{key[:24]}.engine"
    if _engine_intact(path):
        mark_used(path)
        return path
    with build_lock(path):  # two nodes starting together: one builds, the other waits and reuses it
        if _engine_intact(path):
            mark_used(path)
            return path
        if path.exists():  # truncated or damaged (e.g. power lost before the write reached the disk)
            log.warning("cached TensorRT engine %s does not match its side-car's sha256 (damaged): building it again", path)
            path.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        say = progress or (lambda m: print(m, file=sys.stderr, flush=True))
        say(f"mpvss: building TensorRT {precision} engine for {onnx_path.name} on {gpu_name} "
            f"(TensorRT {trt.__version__}); this takes a few minutes once, then it is cached in {folder}")
        t0 = time.perf_counter()
        with _OnDevice(device_index):  # an engine belongs to the device current while it is built
            blob = build_engine(onnx_path, precision, workspace_mb, patterns)
        meta = {"onnx": str(onnx_path), "tensorrt": trt.__version__, "gpu": gpu_name, "compute_capability": list(cc),
                "precision": precision, "input_shapes": {k: list(v) for k, v in input_shapes.items()},
                "options": options, "key": key, "build_seconds": round(time.perf_counter() - t0, 1),
                "engine_bytes": len(blob), "engine_sha256": hashlib.sha256(blob).hexdigest()}
        # side-car first, engine last, both synced before their rename: an engine file that exists
        # is complete, and _engine_intact can check it against the side-car
        write_json_atomic(path.with_suffix(".json"), meta, prefix=ENGINE_TEMP_PREFIX)
        write_atomic(path, blob, prefix=ENGINE_TEMP_PREFIX)
    say(f"mpvss: engine built in {meta['build_seconds']} s: {path}")
    return path


def _engine_intact(path: Path) -> bool:
    """Whether the cached engine ``path`` exists with the size and sha256 its side-car records
    (side-cars of older versions record neither: then any non-empty file)."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError, RecursionError):
        meta = {}
    want = meta.get("engine_sha256") if isinstance(meta, dict) else None
    if not want:
        return size > 0
    return size == meta.get("engine_bytes") and _sha256_file(path) == want


def _input_shapes(contract: dict[str, Any], graph: str) -> dict[str, list[int]]:
    return {t["name"]: t["shape"] for t in contract["graphs"][graph]["inputs"]}


def build_engines(source: GraphSource, valid_hw: tuple[int, int], precision: str = "fp32",
                  cache_dir: str | Path | None = None, device_index: int = 0,
                  workspace_mb: int = DEFAULT_WORKSPACE_MB, keep_fp32: bool = True,
                  progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Export (if needed) and build both engines for ``valid_hw``, the unpadded size (h, w) in
    pixels; returns {graph: engine path}.

    The cache is then pruned to its budget, keeping both engines and their ONNX graphs
    (:func:`~mpvss_ros.runtime.cache.prune_to_budget`).
    """
    d = source.get(valid_hw)
    contract = read_contract(d)
    paths = {
        g: engine_for(d / contract["graphs"][g]["file"], _input_shapes(contract, g), g, precision, cache_dir,
                      device_index, workspace_mb, keep_fp32, progress)
        for g in ("key_frame", "non_key_frame")
    }
    prune_to_budget(cache_dir, keep=[*paths.values(), d])
    return paths


# --------------------------------------------------------------------------------------------
# Inference


class _Engine:
    """One deserialized engine with its I/O buffers (device + pinned host), allocated once."""

    def __init__(self, trt: Any, path: Path, cuda: _CudaApi) -> None:
        self.cuda = cuda
        self.runtime = trt.Runtime(_trt_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot load the TensorRT engine {path} (delete it to rebuild)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"cannot create an execution context for {path} (GPU memory?)")
        self.device: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        try:
            for i in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(i)
                shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{path}: tensor {name} has a dynamic shape {shape}; the graphs must be static")
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                self.host[name] = cuda.pinned(shape, dtype)
                self.device[name] = cuda.malloc(self.host[name].nbytes)
                if self.context.set_tensor_address(name, self.device[name]) is False:
                    raise RuntimeError(f"{path}: TensorRT refused the address of tensor {name}")
                (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
        except BaseException:
            # a load that fails is retried at the next key frame of this size: free what it made
            self.free()
            raise

    def free(self) -> None:
        """Release the engine, its execution context and its I/O buffers (device and pinned)."""
        for name in list(self.host):
            self.cuda.free(self.device.pop(name, None), self.host.pop(name))
        self.context = None
        self.engine = None
        self.runtime = None

    def upload(self, name: str, value: Tensor) -> None:
        host = self.host[name]
        arr = value.detach().to("cpu").numpy()
        if arr.shape != host.shape:
            raise ValueError(f"{name}: shape {arr.shape} != engine's {host.shape}")
        np.copyto(host, arr, casting="same_kind")
        self.cuda.htod(self.device[name], host)

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise RuntimeError("TensorRT execution failed")

    def download(self, name: str) -> None:
        self.cuda.dtoh(self.host[name], self.device[name])

    def result(self, name: str) -> Tensor:
        """A float32 copy of the host buffer (valid after synchronize)."""
        return torch.from_numpy(self.host[name].astype(np.float32, copy=True))


class TensorRTBackend(Backend):
    """Run TensorRT engines of the exported graphs.

    Args:
        source: where the ONNX graphs come from (:class:`~mpvss_ros.runtime.export.GraphSource`).
        device: ``cuda[:N]`` (``cpu`` is taken as the default GPU 0: TensorRT runs on a GPU).
        precision: ``fp32`` or ``fp16``.
        cache_dir: engine cache root (default :func:`~mpvss_ros.runtime.cache.default_cache_dir`).
        workspace_mb: builder workspace limit in MiB.
        keep_fp32: in fp16 engines keep the pixel decoder and the warp in fp32 (see the module
            docstring).
        preload_hw: valid (unpadded) sizes (h, w) in pixels whose engines are built/loaded now
            rather than at the first frame; all of them stay prepared
            (:meth:`~mpvss_ros.runtime.base.SizeCache.keeping`).

    Raises:
        BackendUnavailable: TensorRT, cuda-python/pycuda or a GPU missing (one line).
    """

    def __init__(self, source: GraphSource, device: str | torch.device = "cuda", precision: str = "fp32",
                 cache_dir: str | Path | None = None, workspace_mb: int = DEFAULT_WORKSPACE_MB, keep_fp32: bool = True,
                 preload_hw: Sequence[tuple[int, int]] = ()) -> None:
        _check_engine_precision(precision)
        missing = tensorrt_missing(precision)
        if missing:
            raise BackendUnavailable(missing)
        import tensorrt as trt

        dev = as_torch_device(device)
        self.device_index = (dev.index or 0) if dev.type == "cuda" else 0
        self._trt = trt
        self.source = source
        self.cfg = source.cfg
        self.device = torch.device("cpu")  # tensors in and out live on the host
        self.precision = precision
        self.cache_dir = cache_dir
        self.workspace_mb = workspace_mb
        self.keep_fp32 = keep_fp32
        self.cuda = _CudaApi(self.device_index)
        self.name = f"tensorrt {trt.__version__}[{self.cuda.gpu_name}, {precision}]"
        # (h, w) -> (key engine, non-key engine, padded canvas): the preloaded sizes, or the most
        # recent MAX_PREPARED_SIZES if more; a size dropped is freed (engines, contexts, I/O buffers).
        self._engines = SizeCache.keeping(preload_hw, on_evict=self._release)
        self._device_key: KeyFrameState | None = None  # the key state held in the non-key engine's inputs
        self._device_reference: Tensor | None = None  # the frame held in the non-key engine's key_image
        for hw in preload_hw:
            self._get(hw)

    def _release(self, hw: tuple[int, int], engines: tuple[_Engine, _Engine, tuple[int, int]]) -> None:
        """A size dropped from the cache: free both engines and their buffers; the non-key engine
        no longer holds any key frame's state."""
        self._device_key = None
        self._device_reference = None
        with self.cuda.activate():
            for engine in engines[:2]:
                engine.free()

    def _load(self, hw: tuple[int, int]) -> tuple[_Engine, _Engine, tuple[int, int]]:
        paths = build_engines(self.source, hw, self.precision, self.cache_dir, self.device_index,
                              self.workspace_mb, self.keep_fp32)
        contract = read_contract(self.source.get(hw))
        with self.cuda.activate():
            key = _Engine(self._trt, paths["key_frame"], self.cuda)
            try:
                non_key = _Engine(self._trt, paths["non_key_frame"], self.cuda)
            except BaseException:
                key.free()  # retried at the next key frame of this size: no buffers left behind
                raise
        return key, non_key, tuple(contract["canvas"]["padded_hw"])  # type: ignore[return-value]

    def _get(self, valid_hw: tuple[int, int]) -> tuple[_Engine, _Engine, tuple[int, int]]:
        return self._engines.get(valid_hw, self._load)

    def prepare(self, valid_hw: tuple[int, int]) -> None:
        self._get(valid_hw)

    def segment_key_frame(self, image: Tensor, valid_hw: tuple[int, int] | None = None) -> KeyFrameState:
        hw = (int(image.shape[-2]), int(image.shape[-1])) if valid_hw is None else (int(valid_hw[0]), int(valid_hw[1]))
        key_engine, non_key, padded = self._get(hw)
        if tuple(image.shape) != (1, 3, *padded):
            raise ValueError(f"image {tuple(image.shape)} does not fit the engine's canvas (1, 3, {padded[0]}, {padded[1]})")
        # Until every copy below has succeeded, the non-key engine's key inputs hold no known key frame.
        self._device_key = self._device_reference = None
        with self.cuda.activate() as cuda:
            key_engine.upload("image", image)
            key_engine.execute()
            for name in KEY_OUTPUTS:
                key_engine.download(name)
            # Keep the key frame on the GPU for the non-key engine (same stream: ordered).
            cuda.dtod(non_key.device["key_image"], key_engine.device["image"], key_engine.host["image"].nbytes)
            for src, dst in (("class_logits", "key_class_logits"), ("mask_logits", "key_mask_logits"),
                             ("query_embeddings", "key_query_embeddings")):
                cuda.dtod(non_key.device[dst], key_engine.device[src], key_engine.host[src].nbytes)
            cuda.synchronize()
        state = KeyFrameState(
            image=image,
            valid_hw=hw,
            class_logits=key_engine.result("class_logits"),
            mask_logits=key_engine.result("mask_logits"),
            query_embeddings=key_engine.result("query_embeddings"),
        )
        self._device_key = state
        self._device_reference = image  # the key frame's image, copied into key_image above
        return state

    def _run_non_key(self, key: KeyFrameState, image: Tensor, reference: Tensor, *outputs: str) -> list[Tensor]:
        """Run the non-key engine on (image, reference) with the key frame's state; the outputs named."""
        key.check_canvas(image, reference)
        _, non_key, _ = self._get(key.valid_hw)
        for output in outputs:
            if output not in non_key.host:
                raise ValueError(f"the non-key engine has no {output!r} output (built from graphs exported before "
                                 "it existed): re-export the graphs (mpvss export) and rebuild the engines")
        with self.cuda.activate() as cuda:
            if not self._holds_key(key):  # another key frame: upload its state
                # an upload that fails part-way leaves a mix of two key frames: none held until all are in
                self._device_key = self._device_reference = None
                non_key.upload("key_class_logits", key.class_logits)
                non_key.upload("key_mask_logits", key.mask_logits)
                non_key.upload("key_query_embeddings", key.query_embeddings)
                self._device_key = key
            if self._device_reference is not reference:  # the key frame's image, or a chain's previous frame
                self._device_reference = None
                non_key.upload("key_image", reference)
                self._device_reference = reference
            non_key.upload("image", image)
            non_key.execute()
            for output in outputs:
                non_key.download(output)
            cuda.synchronize()
        return [non_key.result(output) for output in outputs]

    def _holds_key(self, key: KeyFrameState) -> bool:
        """Whether the non-key engine's key inputs hold ``key``'s tensors. Compared tensor by
        tensor: the segmenter passes a copy of the state (``with_active_queries``) that shares
        them."""
        held = self._device_key
        return held is not None and all(
            getattr(held, name) is getattr(key, name) for name in ("class_logits", "mask_logits", "query_embeddings"))

    def query_flows(self, key: KeyFrameState, image: Tensor, reference: Tensor | None = None) -> Tensor:
        # The engine computes all N queries; the interface returns the active ones.
        (flows,) = self._run_non_key(key, image, key.image if reference is None else reference, "flows")
        return key.propagated(flows)

    def propagate(self, key: KeyFrameState, image: Tensor) -> Tensor:
        _, non_key, _ = self._get(key.valid_hw)
        if "flows" not in non_key.host:  # engines built from graphs exported before they had it: no check
            (warped,) = self._run_non_key(key, image, key.image, "warped_mask_logits")
            return key.propagated(warped)
        warped, flows = self._run_non_key(key, image, key.image, "warped_mask_logits", "flows")
        # the active queries' flows only, as the torch warp sees them (an inactive query's flow is never used)
        return nan_unless_finite(key.propagated(warped), key.propagated(flows))

    def close(self) -> None:
        self._engines.clear()
        self._device_key = None
        self._device_reference = None
        if getattr(self, "cuda", None) is not None:
            self.cuda.close()
            self.cuda = None  # type: ignore[assignment]

    def __del__(self) -> None:  # best effort; explicit close() is preferred
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gpu": self.cuda.gpu_name if self.cuda else None,
                "tensorrt": self._trt.__version__, "keep_fp32": self.keep_fp32}
