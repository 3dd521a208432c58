"""The inference-backend interface that :class:`~mpvss_ros.segmenter.VideoSegmenter` runs on.

A backend is what the segmenter needs from a model, nothing more:

* attributes ``cfg`` (:class:`~mpvss_ros.config.ModelConfig`: canvas, normalisation, classes,
  post-processing), ``num_classes``, ``name`` (e.g. ``torch``, ``onnxruntime[CPUExecutionProvider]``),
  ``device`` (the torch device of the tensors going in and coming out) and ``precision``;
* ``segment_key_frame(image, valid_hw) -> KeyFrameState`` with ``image`` (1, 3, Hp, Wp) float32
  RGB 0..255 zero-padded at the bottom/right to a multiple of 32 and ``valid_hw`` its unpadded
  (h, w);
* ``propagate(key, image) -> Tensor``: (1, M, Hp/4, Wp/4) float32 mask logits of the current
  frame, warped from the key frame's;
* ``query_flows(key, image, reference=None) -> Tensor``: (1, M, 2, h, w) float32 query-based flows
  from ``image`` to ``reference`` (default the key frame), for chained flow.

Both cover the key frame's M active queries (``key.active``, ``KeyFrameState.propagated``;
M = N when it is None).

Implementations: :class:`~mpvss_ros.runtime.torch_backend.TorchBackend` (the PyTorch model, CPU
or CUDA, optional fp16 autocast on CUDA or bfloat16 weights on CPU), :class:`~mpvss_ros.runtime.onnx_backend.OnnxRuntimeBackend`
and :class:`~mpvss_ros.runtime.tensorrt_backend.TensorRTBackend` (both on the two ONNX graphs of
:mod:`mpvss_ros.runtime.export`, one pair per canvas size).

A backend that cannot run here (package or GPU missing, unsupported precision) raises
:class:`BackendUnavailable` at construction with one line saying what is missing and which
backend would work.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..nn.mpvss import KeyFrameState
from ..values import is_integer, shown

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Backend",
    "BackendUnavailable",
    "Missing",
    "SizeCache",
    "MAX_PREPARED_SIZES",
    "MIN_GRAPH_SIDE",
    "as_backend",
    "check_precision",
    "padded_size",
]

#: Backend names accepted by :func:`~mpvss_ros.runtime.load_backend` and ``--backend``.
BACKENDS = ("torch", "onnxruntime", "tensorrt")
#: Precisions accepted by ``--precision``.
PRECISIONS = ("fp32", "fp16", "bf16")
#: The smallest side (pixels) of a letterboxed size that fixed-shape graphs (ONNX, TensorRT) are
#: exported for; a thinner frame needs the torch backend.
MIN_GRAPH_SIDE = 32


#: How many input sizes a fixed-shape backend keeps prepared (sessions or engines with their
#: memory, GPU memory for TensorRT); the least recently used beyond that is released and
#: prepared again (from the on-disk cache) if it comes back.
MAX_PREPARED_SIZES = 4


class SizeCache:
    """Per-input-size objects of a fixed-shape backend (ONNX sessions, TensorRT engines), at most
    ``capacity`` sizes: the least recently used one is dropped when another is added.

    Args:
        capacity: sizes kept, >= 1; None = :data:`MAX_PREPARED_SIZES`.
        on_evict: called with ``(hw, value)`` of a dropped size (e.g. to forget device state).

    Raises:
        ValueError: ``capacity < 1``.
    """

    def __init__(self, capacity: int | None = None,
                 on_evict: Callable[[tuple[int, int], Any], None] | None = None) -> None:
        capacity = MAX_PREPARED_SIZES if capacity is None else capacity
        if not (is_integer(capacity) and capacity >= 1):
            raise ValueError(f"capacity must be an integer >= 1, got {shown(capacity)}")
        self.capacity = int(capacity)
        self._on_evict = on_evict
        self._items: OrderedDict[tuple[int, int], Any] = OrderedDict()

    @classmethod
    def keeping(cls, preload_hw: Sequence[tuple[int, int]],
                on_evict: Callable[[tuple[int, int], Any], None] | None = None) -> SizeCache:
        """A cache large enough for every size (h, w) in pixels in ``preload_hw`` (the sizes a backend prepares at
        start-up, e.g. all those of an export folder) and for at least :data:`MAX_PREPARED_SIZES`,
        so that preparing them does not drop the first ones again."""
        return cls(max(MAX_PREPARED_SIZES, len({(int(h), int(w)) for h, w in preload_hw})), on_evict)

    def get(self, hw: tuple[int, int], make: Callable[[tuple[int, int]], Any]) -> Any:
        """The value for ``hw`` ((h, w) pixels), made with ``make(hw)`` when absent; marks it most
        recently used. ``make``'s exceptions propagate and nothing is stored."""
        hw = (int(hw[0]), int(hw[1]))
        if hw in self._items:
            self._items.move_to_end(hw)
            return self._items[hw]
        value = make(hw)
        self._items[hw] = value
        while len(self._items) > self.capacity:
            old_hw, old = self._items.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(old_hw, old)
        return value

    def clear(self) -> None:
        """Drop every size (without ``on_evict``)."""
        self._items.clear()

    def __contains__(self, hw: object) -> bool:
        return hw in self._items

    def __len__(self) -> int:
        return len(self._items)

    def sizes(self) -> list[tuple[int, int]]:
        """The sizes held, least recently used first."""
        return list(self._items)


class Missing(str):
    """Why a backend cannot run here, as one line ``"REASON; REMEDY"`` (a ``str``), with the two
    parts kept apart: ``remedy`` names the flags of ``mpvss segment``/``eval``/``bag`` and the
    node's parameters of the same names (``--device``, ``--precision``, ``--backend``), which
    other front ends (``mpvss bench``'s backend specs) replace with their own.

    Attributes:
        reason: what is missing or unsupported.
        remedy: what would work instead (``""``: none to give).
    """

    reason: str
    remedy: str

    def __new__(cls, reason: str, remedy: str = "") -> "Missing":
        self = super().__new__(cls, f"{reason}; {remedy}" if remedy else reason)
        self.reason, self.remedy = reason, remedy
        return self


class BackendUnavailable(ValueError):
    """The chosen backend cannot run on this machine or with these options (one-line message).

    A ``ValueError`` so that the command line reports it as a usage error (exit status 2).

    Attributes:
        reason: the message without its remedy when it was a :class:`Missing`, else the message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.reason = message.reason if isinstance(message, Missing) else str(message)


def check_precision(precision: str) -> str:
    """Validate ``precision`` (``fp32``/``fp16``/``bf16``).

    Raises:
        ValueError: any other value.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def nan_unless_finite(warped_mask_logits: Tensor, flows: Tensor) -> Tensor:
    """``warped_mask_logits`` of a graph that warps inside itself, all NaN when its ``flows``
    output holds a NaN or infinite value (an fp16 overflow in the motion module): GridSample
    clamps non-finite sampling positions to the border, so the warped masks alone look finite and
    the segmenter's NaN check would publish them (the torch warp carries it itself,
    :func:`~mpvss_ros.nn.warp.warp_mask_logits`).

    Args:
        warped_mask_logits: (B, M, h, w) float32 of the active queries (``KeyFrameState.propagated``).
        flows: (B, M, 2, h2, w2) float32 of the same queries from the same run.

    Returns:
        ``warped_mask_logits`` itself, or a NaN tensor of its shape.
    """
    if bool(torch.isfinite(flows).all()):
        return warped_mask_logits
    return torch.full_like(warped_mask_logits, float("nan"))


def padded_size(valid_hw: tuple[int, int], divisibility: int = 32) -> tuple[int, int]:
    """``valid_hw`` (h, w) in pixels rounded up to multiples of ``divisibility`` (the zero-padded canvas)."""
    h, w = (int(v) for v in valid_hw)
    return (int(math.ceil(h / divisibility) * divisibility), int(math.ceil(w / divisibility) * divisibility))


class Backend(ABC):
    """Interface of an inference backend (see the module docstring).

    Attributes:
        cfg: the model configuration.
        name: short description of the backend and where it runs.
        device: torch device of input and output tensors.
        precision: ``fp32``, ``fp16`` or ``bf16``.
    A backend's ``motion_trained`` (property) is False when the weights held no trained motion
    module (a per-frame Mask2Former or stage-1 checkpoint run for key frames with optical flow or
    copy between them):
    :class:`~mpvss_ros.propagation.QueryFlowPropagator` refuses such a backend.
    """

    cfg: Any
    name: str = ""
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @property
    def motion_trained(self) -> bool:
        """Whether the motion module holds trained weights: its graph source's (the model's, or
        the export contract's ``motion_trained``) for the ONNX and TensorRT backends."""
        source = getattr(self, "source", None)
        return True if source is None else bool(source.motion_trained)

    @property
    def num_classes(self) -> int:
        """K, the number of classes (class logits have K + 1 entries)."""
        return int(self.cfg.num_classes)

    @abstractmethod
    def segment_key_frame(self, image: Tensor, valid_hw: tuple[int, int] | None = None) -> KeyFrameState:
        """Segment a key frame.

        Args:
            image: (1, 3, Hp, Wp) float32 RGB 0..255 on ``device``, zero-padded to a multiple of 32.
            valid_hw: unpadded (h, w) in pixels; None = no padding.

        Returns:
            :class:`~mpvss_ros.nn.mpvss.KeyFrameState` with tensors on ``device``.

        Raises:
            ValueError: (fixed-shape backends: onnxruntime, TensorRT) an image other than
                (1, 3, *:func:`padded_size` (``valid_hw``)).
        """

    @abstractmethod
    def propagate(self, key: KeyFrameState, image: Tensor) -> Tensor:
        """Warp the key frame's mask logits to ``image`` (same canvas as the key frame).

        Returns:
            (1, M, Hp/4, Wp/4) float32 mask logits of the key frame's M active queries
            (``key.propagated``), on ``device``.

        Raises:
            ValueError: ``image`` not on the key frame's canvas.
        """

    @abstractmethod
    def query_flows(self, key: KeyFrameState, image: Tensor, reference: Tensor | None = None) -> Tensor:
        """Query-based flows from ``image`` to ``reference`` (None: the key frame's image) for the
        key frame's queries; a link of a chained flow (:func:`~mpvss_ros.nn.warp.compose_flows`).

        Args:
            key: the key frame's state.
            image, reference: (1, 3, Hp, Wp) float32 RGB 0..255 on the key frame's canvas.

        Returns:
            (1, M, 2, h, w) float32 flows of the key frame's M active queries (``key.propagated``)
            in pixels of the motion module's flow grid, on ``device``.

        Raises:
            ValueError: a frame not on the key frame's canvas, or graphs without a ``flows`` output.
        """

    def prepare(self, valid_hw: tuple[int, int]) -> None:
        """Get ready for frames of this valid size (fixed-shape backends export graphs or build
        engines here, so that it is not counted as inference time). Default: nothing.

        Args:
            valid_hw: the frame's letterboxed, unpadded size (h, w) on the canvas, pixels
                (:attr:`~mpvss_ros.segmenter.Letterbox.resized_hw`).
        """

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (name, device, precision) for summaries."""
        return {"backend": self.name, "device": str(self.device), "precision": self.precision}

    def close(self) -> None:
        """Release resources held outside Python's garbage collector (GPU buffers); idempotent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.device}, {self.precision})"


def as_backend(model: Any, device: str | torch.device | None = "cpu") -> Any:
    """What :class:`~mpvss_ros.segmenter.VideoSegmenter` runs on, from what it was given.

    * a :class:`Backend`: returned as is (``device`` is ignored: the backend owns it);
    * a ``torch.nn.Module`` (the MPVSS model, or a test stand-in): wrapped in a
      :class:`~mpvss_ros.runtime.torch_backend.TorchBackend`, which puts it in eval mode on
      ``device`` (what the segmenter always did);
    * any other object with ``cfg``, ``num_classes`` and ``segment_key_frame`` (duck typing):
      returned as is.

    Raises:
        TypeError: for an object that has none of these.
    """
    if isinstance(model, Backend):
        return model
    if isinstance(model, torch.nn.Module):
        from .torch_backend import TorchBackend

        return TorchBackend(model, device if device is not None else "cpu")
    if all(hasattr(model, a) for a in ("cfg", "num_classes", "segment_key_frame")):
        return model
    if model is None:  # LoadedModel.model of an export folder (model_loader.load_exported)
        raise TypeError("no model to run: an export folder (load_exported) runs through a backend, "
                        "load_backend('onnxruntime' | 'tensorrt', onnx_dir=...)")
    raise TypeError(f"expected an MPVSS model or an inference backend, got {type(model).__name__}")
