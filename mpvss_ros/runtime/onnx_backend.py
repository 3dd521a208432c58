"""The onnxruntime backend: the two ONNX graphs of :mod:`mpvss_ros.runtime.export`.

Sessions use ``CPUExecutionProvider``, or ``CUDAExecutionProvider`` (then CPU for any op it
lacks) with ``device="cuda[:N]"`` where the installed onnxruntime has it (``onnxruntime-gpu``).
Graph optimisation level ``ORT_ENABLE_ALL``; ``threads`` sets the intra-op thread pool
(default: onnxruntime's, one per physical core). Tensors go in and come out on the CPU.

Graphs have static shapes (one pair per valid size): the backend keeps one pair of sessions per
valid size it has seen, getting the graphs from a :class:`~mpvss_ros.runtime.export.GraphSource`
(exported and cached on first use of a size, or a fixed ``mpvss export`` folder). The non-key
session is built without the ``scores`` output (the segmenter post-processes mask logits
itself), so that work is not done; where the graph warps (CUDA), its ``flows`` output is kept and
checked for non-finite values (:func:`~mpvss_ros.runtime.base.nan_unless_finite`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..checkpoints import first_line
from ..devices import as_torch_device
from ..nn.mpvss import KeyFrameState
from ..nn.warp import warp_mask_logits
from ..values import shown
from .base import Backend, BackendUnavailable, Missing, SizeCache, check_precision, nan_unless_finite
from .export import KEY_OUTPUTS, GraphSource, read_contract

__all__ = ["OnnxRuntimeBackend", "make_session", "onnxruntime_missing", "ONNXRUNTIME_FP32_ONLY"]

log = logging.getLogger(__name__)

#: Why fp16 or bf16 cannot run on this backend, and what can.
ONNXRUNTIME_FP32_ONLY = Missing("onnxruntime backend runs the float32 graphs only",
                                "use --precision fp32, or --backend tensorrt / torch --device cuda for fp16, "
                                "or torch for bf16 on CPU")
#: What works when onnxruntime cannot run on the GPU.
_ORT_CUDA_REMEDY = "use --device cpu, --backend torch or --backend tensorrt"


def onnxruntime_missing(device: str | torch.device = "cpu") -> str | None:
    """None when onnxruntime can run on ``device``, else the one-line reason."""
    try:
        import onnxruntime as ort
    except ImportError:
        return Missing("onnxruntime backend needs the onnxruntime package (pip install onnxruntime)", "use --backend torch")
    try:
        import onnx  # noqa: F401 - the export and the non-key session's output pruning (without_outputs)
    except ImportError:
        return Missing("onnxruntime backend needs the onnx package too (export, graph pruning): pip install onnx",
                       "use --backend torch")
    dev = as_torch_device(device)
    if dev.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return Missing("onnxruntime on CUDA needs onnxruntime-gpu (CUDAExecutionProvider is not available here)",
                           _ORT_CUDA_REMEDY)
        problem = _cuda_provider_problem(dev.index or 0)
        if problem:
            return Missing(f"onnxruntime's CUDAExecutionProvider is installed but cannot run here ({problem})",
                           _ORT_CUDA_REMEDY)
    return None


@functools.lru_cache(maxsize=None)
def _cuda_provider_problem(device_id: int) -> str | None:
    """None when a session on ``CUDAExecutionProvider`` really runs on it, else why not.

    onnxruntime-gpu lists the provider in ``get_available_providers()`` whether or not CUDA,
    cuDNN or a GPU are there; a session asking for it then falls back to the CPU with a log line
    only (microsoft/onnxruntime#17801). A one-node probe session tells (once per process)."""
    import warnings

    import onnx
    import onnx.helper as oh
    import onnxruntime as ort

    graph = oh.make_graph([oh.make_node("Identity", ["x"], ["y"])], "cuda_probe",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                        providers=[("CUDAExecutionProvider", {"device_id": int(device_id)})])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's EP errors
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if "CUDAExecutionProvider" not in sess.get_providers():
        return "a session asking for it fell back to the CPU: CUDA, cuDNN or the GPU missing"
    return None


def make_session(path: str | Path, threads: int | None = None, device: str | torch.device = "cpu",
                 drop_outputs: Sequence[str] = ()) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path``.

    Args:
        path: the ONNX file.
        threads: intra-op threads, >= 1 (None: onnxruntime's default).
        device: ``cpu``, or ``cuda[:N]`` for ``CUDAExecutionProvider`` (device id N).
        drop_outputs: graph outputs to remove before loading; the session holds only the nodes
            the remaining outputs need (``onnx.utils.Extractor``).

    Raises:
        BackendUnavailable: onnxruntime missing, or no CUDA provider for a CUDA device.
        ValueError: ``threads < 1``.
    """
    missing = onnxruntime_missing(device)
    if missing:
        raise BackendUnavailable(missing)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {shown(threads)}")
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    # onnxruntime's intra-op workers spin-wait after each run by default. Between runs this process
    # does torch post-processing, decoding and scene scoring, and on a robot other nodes share the
    # cores: spinning workers then steal them. Measured on 2 cores: see docs/runtime.md.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    dev = as_torch_device(device)
    providers: list[Any] = ["CPUExecutionProvider"]
    if dev.type == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    source: str | bytes = str(path) if not drop_outputs else without_outputs(path, drop_outputs).SerializeToString()
    sess = ort.InferenceSession(source, sess_options=so, providers=providers)
    if dev.type == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        # onnxruntime fell back to the CPU silently: the backend would run the GPU code path there
        raise BackendUnavailable(Missing("onnxruntime's CUDAExecutionProvider could not be created (CUDA, cuDNN or "
                                         "the GPU missing; the session fell back to the CPU)", _ORT_CUDA_REMEDY))
    return sess


def without_outputs(path: str | Path, drop_outputs: Sequence[str]) -> Any:
    """The ONNX model at ``path`` reduced to the nodes its outputs other than ``drop_outputs`` need.

    onnxruntime runs nodes whose outputs nobody reads (a GridSample feeding only a dropped output
    still ran), so the sub-graph is extracted (``onnx.utils.Extractor``).

    Returns:
        ``onnx.ModelProto``.
    """
    import onnx
    import onnx.utils

    model = onnx.load(str(path))
    keep = [o.name for o in model.graph.output if o.name not in set(drop_outputs)]
    return onnx.utils.Extractor(model).extract_model([i.name for i in model.graph.input], keep)


def _np(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


@dataclass
class _SizeSessions:
    """The sessions of one input size: key-frame graph, non-key graph (run up to
    ``non_key_output``), the padded canvas (h, w), the non-key graph's outputs, and, where the
    non-key session runs the warp (GPU), a flows-only session of the same graph for chained flow,
    made with the others so that no frame waits for it."""

    key: Any
    non_key: Any
    padded_hw: tuple[int, int]
    non_key_output: str
    graph_outputs: tuple[str, ...]
    flows_only: Any = None


class OnnxRuntimeBackend(Backend):
    """Run the exported graphs with onnxruntime.

    Args:
        source: where the graphs come from (:class:`~mpvss_ros.runtime.export.GraphSource`).
        device: ``cpu`` or ``cuda[:N]`` (CUDA execution provider).
        precision: ``fp32`` only (the graphs are float32).
        threads: intra-op threads (None: onnxruntime's default).
        preload_hw: valid (unpadded) sizes (h, w) in pixels whose sessions are created now
            instead of at the first frame; all of them stay prepared
            (:meth:`~mpvss_ros.runtime.base.SizeCache.keeping`).

    Raises:
        BackendUnavailable: onnxruntime missing, no CUDA provider, or fp16 requested.
    """

    def __init__(self, source: GraphSource, device: str | torch.device = "cpu", precision: str = "fp32",
                 threads: int | None = None, preload_hw: Sequence[tuple[int, int]] = ()) -> None:
        check_precision(precision)
        if precision != "fp32":
            raise BackendUnavailable(ONNXRUNTIME_FP32_ONLY)
        missing = onnxruntime_missing(device)
        if missing:
            raise BackendUnavailable(missing)
        self.source = source
        self.cfg = source.cfg
        self.exec_device = as_torch_device(device)
        self.device = torch.device("cpu")
        self.precision = precision
        self.threads = threads
        provider = "CUDAExecutionProvider" if self.exec_device.type == "cuda" else "CPUExecutionProvider"
        self.name = f"onnxruntime[{provider}]"
        # On the CPU, onnxruntime's GridSample kernel is ~7x slower than torch's grid_sample for the
        # per-query warp (32 masks at 96 x 120: 9.2 vs 1.35 ms, 1 thread): the non-key graph is run
        # up to its ``flows`` output and the warp (same function as in the graph) runs in torch.
        # Graphs exported before the ``flows`` output existed run whole.
        self._warp_in_torch = provider == "CPUExecutionProvider"
        # (h, w) -> _SizeSessions: the preloaded sizes, or the most recent MAX_PREPARED_SIZES if more
        self._sizes = SizeCache.keeping(preload_hw)
        for hw in preload_hw:
            self._get(hw)

    def _load(self, hw: tuple[int, int]) -> "_SizeSessions":
        d = self.source.get(hw)
        contract = read_contract(d)
        try:
            return self._sessions(d, contract)
        except BackendUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, onnxruntime's InvalidProtobuf, ...
            # a damaged graph in a folder whose contract records no sha256: one line, not a traceback
            raise ValueError(f"{d}: a graph cannot be loaded ({type(exc).__name__}: {first_line(exc)[:200]}); "
                             f"export again, or see mpvss check-export {d}") from None

    def _sessions(self, d: Path, contract: dict[str, Any]) -> "_SizeSessions":
        g = contract["graphs"]
        key = make_session(d / g["key_frame"]["file"], self.threads, self.exec_device)
        outputs = tuple(o["name"] for o in g["non_key_frame"].get("outputs", []))
        run = "flows" if self._warp_in_torch and "flows" in outputs else "warped_mask_logits"
        # where the graph warps, its flows come along to be checked for NaN (nan_unless_finite)
        non_key = make_session(d / g["non_key_frame"]["file"], self.threads, self.exec_device,
                               drop_outputs=tuple(o for o in outputs if o not in (run, "flows")))
        flows_only = None
        if run != "flows" and "flows" in outputs:
            flows_only = make_session(d / g["non_key_frame"]["file"], self.threads, self.exec_device,
                                      drop_outputs=tuple(o for o in outputs if o != "flows"))
        return _SizeSessions(key, non_key, tuple(contract["canvas"]["padded_hw"]), run, outputs,  # type: ignore[arg-type]
                             flows_only)

    def _get(self, valid_hw: tuple[int, int]) -> "_SizeSessions":
        return self._sizes.get(valid_hw, self._load)

    def _flow_session(self, valid_hw: tuple[int, int]) -> Any:
        """The session that outputs the non-key graph's ``flows`` (the non-key session itself on
        the CPU; a second, flows-only session of the same graph where the warp runs in the graph)."""
        s = self._get(valid_hw)
        hw = (int(valid_hw[0]), int(valid_hw[1]))
        if s.non_key_output == "flows":
            return s.non_key
        if "flows" not in s.graph_outputs:
            raise ValueError(f"the non-key graph for {hw[0]}x{hw[1]} has no 'flows' output (exported before it "
                             "existed): re-export it (mpvss export) to use query-based flows on their own (chain_flow)")
        return s.flows_only

    @staticmethod
    def _check_canvas(image: Tensor, padded: tuple[int, int]) -> None:
        if tuple(image.shape) != (1, 3, *padded):
            raise ValueError(f"image {tuple(image.shape)} does not fit the graphs' canvas (1, 3, {padded[0]}, {padded[1]})")

    def prepare(self, valid_hw: tuple[int, int]) -> None:
        self._get(valid_hw)

    def segment_key_frame(self, image: Tensor, valid_hw: tuple[int, int] | None = None) -> KeyFrameState:
        hw = (int(image.shape[-2]), int(image.shape[-1])) if valid_hw is None else (int(valid_hw[0]), int(valid_hw[1]))
        sessions = self._get(hw)
        self._check_canvas(image, sessions.padded_hw)
        outs = sessions.key.run(list(KEY_OUTPUTS), {"image": _np(image)})
        cls, masks, queries = (torch.from_numpy(o) for o in outs)
        return KeyFrameState(image=image, valid_hw=hw, class_logits=cls, mask_logits=masks, query_embeddings=queries)

    def _non_key_feeds(self, key: KeyFrameState, image: Tensor, reference: Tensor) -> dict[str, np.ndarray]:
        key.check_canvas(image, reference)
        self._check_canvas(image, self._get(key.valid_hw).padded_hw)
        return {
            "image": _np(image),
            "key_image": _np(reference),
            "key_query_embeddings": _np(key.query_embeddings),
            "key_mask_logits": _np(key.mask_logits),
            "key_class_logits": _np(key.class_logits),
        }

    def query_flows(self, key: KeyFrameState, image: Tensor, reference: Tensor | None = None) -> Tensor:
        feeds = self._non_key_feeds(key, image, key.image if reference is None else reference)
        (out,) = self._flow_session(key.valid_hw).run(["flows"], feeds)
        return key.propagated(torch.from_numpy(out))  # the graph computes all N

    def propagate(self, key: KeyFrameState, image: Tensor) -> Tensor:
        sessions = self._get(key.valid_hw)
        if sessions.non_key_output == "flows":
            return warp_mask_logits(key.propagated(key.mask_logits), self.query_flows(key, image),
                                    self.cfg.input.warp_normalization)
        feeds = self._non_key_feeds(key, image, key.image)
        if "flows" not in sessions.graph_outputs:  # exported before the graphs had it: no check
            (out,) = sessions.non_key.run(["warped_mask_logits"], feeds)
            return key.propagated(torch.from_numpy(out))
        out, flows = sessions.non_key.run(["warped_mask_logits", "flows"], feeds)
        # the active queries' flows only, as the torch warp sees them (an inactive query's flow is never used)
        return nan_unless_finite(key.propagated(torch.from_numpy(out)), key.propagated(torch.from_numpy(flows)))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threads": self.threads}
