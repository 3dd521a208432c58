"""Inference backends (PyTorch, onnxruntime, TensorRT), ONNX export, and latency benchmarks.

    from mpvss_ros.runtime import load_backend
    backend = load_backend("onnxruntime")                 # the default model, exported + cached
    backend = load_backend("torch", loaded, device="cuda", precision="fp16")
    backend = load_backend("onnxruntime", onnx_dir="export/")   # an ``mpvss export`` folder
    segmenter = VideoSegmenter(backend, QueryFlowPropagator(backend), scheduler)

See :mod:`mpvss_ros.runtime.base` for the interface, :mod:`~mpvss_ros.runtime.export` for the
ONNX graphs and their contract.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Sequence

from ..devices import as_torch_device
from .base import BACKENDS, PRECISIONS, Backend, BackendUnavailable, Missing, as_backend, check_precision, padded_size

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Backend",
    "BackendUnavailable",
    "Missing",
    "as_backend",
    "backend_missing",
    "load_backend",
    "padded_size",
]


def backend_missing(backend: str, device: str = "cpu", precision: str = "fp32") -> str | None:
    """None when ``backend`` can run here with these options, else a one-line reason (cheap:
    imports only; nothing is loaded or built). ``device`` ``auto`` is resolved first
    (:func:`~mpvss_ros.model_loader.resolve_device`).

    Raises:
        ValueError: unknown backend or precision, or a device string other than auto, cpu, cuda and
            cuda:N with N <= 127 (:func:`~mpvss_ros.devices.check_device`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_precision(precision)
    import torch

    if device == "auto":
        from ..model_loader import resolve_device

        device = resolve_device(device, backend, precision)

    dev = as_torch_device(device)
    if backend == "torch":
        if dev.type == "cuda" and not torch.cuda.is_available():
            return Missing("CUDA was requested but this torch build sees no CUDA GPU", "use --device cpu")
        if precision == "fp16" and dev.type != "cuda":
            return Missing("fp16 with the torch backend needs CUDA", "use --device cuda, or --precision fp32 or bf16 on CPU")
        if precision == "bf16":
            from .torch_backend import bf16_missing

            return bf16_missing(dev)
        return None
    if backend == "onnxruntime":
        from .onnx_backend import ONNXRUNTIME_FP32_ONLY, onnxruntime_missing

        if precision != "fp32":
            return ONNXRUNTIME_FP32_ONLY
        return onnxruntime_missing(device)
    if precision == "bf16":
        return Missing("tensorrt backend builds fp32 or fp16 engines", "use --precision fp16 (or torch for bf16 on CPU)")
    from .tensorrt_backend import tensorrt_missing

    return tensorrt_missing(precision)


def load_backend(backend: str = "torch", loaded: Any = None, *, model: str | Path | None = None,
                 weights: str | Path | None = None, device: str = "cpu", precision: str = "fp32",
                 input_hw: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
                 cache_dir: str | Path | None = None, onnx_dir: str | Path | None = None,
                 threads: int | None = None, workspace_mb: int | None = None, keep_fp32: bool = True,
                 copy_model: bool = True, motion_optional: bool = False) -> Backend:
    """Make an inference backend.

    Args:
        backend: ``torch``, ``onnxruntime`` or ``tensorrt``.
        loaded: a :class:`~mpvss_ros.model_loader.LoadedModel` or an MPVSS module; None = load
            ``model``/``weights`` with :func:`~mpvss_ros.model_loader.load_model` (on ``device``
            for torch, on CPU for export otherwise). Ignored when ``onnx_dir`` is given.
        model, weights: as :func:`~mpvss_ros.model_loader.load_model` when ``loaded`` is None.
        device: ``auto`` (:func:`~mpvss_ros.model_loader.resolve_device`), ``cpu`` or ``cuda[:N]``.
            onnxruntime: the execution provider; tensorrt: the GPU (``cpu`` = GPU 0). Tensors
            in/out of onnxruntime and TensorRT backends are on the CPU.
        precision: ``fp32``, ``fp16`` (torch on CUDA: autocast; tensorrt: FP16 engines) or ``bf16``
            (torch on CPU: bfloat16 weights, see :class:`~mpvss_ros.runtime.torch_backend.TorchBackend`).
        input_hw: valid (unpadded) size(s) (h, w) in pixels to prepare now (export/build); default the
            model's canvas ``cfg.input.size``. Other sizes are prepared when a frame needs them.
        cache_dir: where exported graphs and engines are cached (default
            :func:`~mpvss_ros.runtime.cache.default_cache_dir`).
        onnx_dir: an ``mpvss export`` folder to run instead of exporting (onnxruntime/tensorrt).
        threads: onnxruntime intra-op threads.
        workspace_mb: TensorRT builder workspace (MiB).
        keep_fp32: TensorRT fp16: keep the pixel decoder and the warp in fp32.
        copy_model: onnxruntime/tensorrt, who owns ``loaded``'s PyTorch model, which the backend
            keeps to export the graphs of sizes it meets later. True (default): the backend keeps
            a copy of its own, and the caller may go on changing its model (train it, or make a
            :class:`~mpvss_ros.runtime.torch_backend.TorchBackend` on it, which folds BatchNorms
            in place); the weights are held twice while the caller keeps it. False: the caller
            hands the model over (it loaded it for this backend and will not change it), the
            backend keeps that very module, moved to the CPU and put in eval mode in place (a
            ``LoadedModel`` loaded on a GPU then says a device its module is no longer on: load
            it on the CPU for these backends, as the command line and the node do), and the
            weights are held once (:meth:`~mpvss_ros.runtime.export.GraphSource.from_model`
            ``copy_model``). A model this
            function loads itself (``loaded`` None) is never copied. The torch backend always
            runs (and prepares in place) the module it is given.
        motion_optional: as :func:`~mpvss_ros.model_loader.load_model` when this function loads
            ``model``/``weights`` itself: weights without a trained motion module load, for a run
            with optical flow or copy (the backend's ``motion_trained`` is then False and query
            flow refuses it).

    Raises:
        BackendUnavailable: the backend cannot run here (one line: what is missing, what works).
        ValueError: unknown backend/precision, bad device; ``loaded`` an export folder
            (:func:`~mpvss_ros.model_loader.load_exported`, whose ``onnx_dir`` is then the one
            run) with the torch backend.
    """
    from ..model_loader import LoadedModel, load_model, resolve_device

    if isinstance(loaded, LoadedModel) and loaded.model is None:  # an export folder (load_exported)
        if backend == "torch":
            raise ValueError("an export folder (load_exported) has no PyTorch model to run: use backend "
                             "onnxruntime or tensorrt")
        onnx_dir = onnx_dir if onnx_dir is not None else loaded.meta.get("onnx_dir")
    device = resolve_device(device, backend, precision)
    missing = backend_missing(backend, device, precision)
    if missing:
        raise BackendUnavailable(missing)

    if backend == "torch":
        from .torch_backend import TorchBackend

        if loaded is None:
            if onnx_dir is not None:
                raise ValueError("--onnx-dir needs --backend onnxruntime or tensorrt")
            loaded = load_model(model, weights, device, motion_optional=motion_optional)
        net = loaded.model if isinstance(loaded, LoadedModel) else loaded
        return TorchBackend(net, device, precision)

    from .export import GraphSource

    if onnx_dir is not None:
        source = GraphSource.from_dir(onnx_dir, cache_dir=cache_dir)
    else:
        if loaded is None:  # loaded here for the backend alone: nobody else holds it, no copy needed
            loaded, copy_model = load_model(model, weights, "cpu", motion_optional=motion_optional), False
        if isinstance(loaded, LoadedModel):
            source = GraphSource.from_model(loaded.model, cache_dir, weights=str(loaded.weights) if loaded.weights else None,
                                            trained=loaded.trained, copy_model=copy_model)
        else:
            source = GraphSource.from_model(loaded, cache_dir, copy_model=copy_model)
    if input_hw is None:
        sizes = source.sizes or ([tuple(source.cfg.input.size)] if source.cfg.input.size is not None else [])
    elif len(input_hw) == 2 and all(isinstance(v, numbers.Integral) for v in input_hw):  # type: ignore[arg-type]
        sizes = [(int(input_hw[0]), int(input_hw[1]))]  # type: ignore[index]
    else:
        sizes = [tuple(hw) for hw in input_hw]  # type: ignore[union-attr]
    if backend == "onnxruntime":
        from .onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(source, device, precision, threads=threads, preload_hw=sizes)  # type: ignore[arg-type]
    from .tensorrt_backend import DEFAULT_WORKSPACE_MB, TensorRTBackend

    return TensorRTBackend(source, device, precision, cache_dir=cache_dir,
                           workspace_mb=workspace_mb or DEFAULT_WORKSPACE_MB, keep_fp32=keep_fp32,
                           preload_hw=sizes)  # type: ignore[arg-type]
