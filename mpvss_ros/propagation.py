"""Propagators: turn a key frame's mask logits into mask logits for the current frame.

All propagators share one interface, :meth:`Propagator.propagate`, and return mask logits on
the key frame's 1/4 grid; the key frame's class logits are reused unchanged (MPVSS section 3).

* ``query_flow`` (:class:`QueryFlowPropagator`): MPVSS. One flow map per mask, estimated by the
  model's motion module from the key frame's queries and the (current, key) image pair.
* ``optical_flow`` (:class:`OpticalFlowPropagator`): the paper's optical-flow baseline. One
  dense flow from OpenCV (DIS or Farneback) between the grey current and key frames warps every
  mask alike.
* ``copy`` (:class:`CopyPropagator`): hold the key frame's masks.

Chained flow (``chain_flow``, on by default for both flow propagators): instead of one flow from
the current frame straight back to the key frame (the paper's setting), each non-key frame's flow
is estimated to the previous frame only and composed with the previous frame's flow to the key
frame (:func:`~mpvss_ros.nn.warp.compose_flows`), so the flow is always estimated over one frame,
where it is most accurate; the masks are still warped once, from the key frame. Same cost per frame
(one flow estimate, plus a composition on the flow grid). CamVid val clip, shipped weights, key
interval 5 / 10: query flow 69.20 / 66.67 chained against 67.31 / 60.57 direct (the motion module
trained through the chain, ``--chain-training``); DIS 69.19 / 66.41 against 68.13 / 62.46
(``docs/experiment_log.md``, "Chained flow").
Chaining needs the frames in order, each one propagated: a propagator follows the key frame it was
last given and restarts its chain at a new key frame.

``per_frame`` is not a propagator: it is the schedule ``fixed:1`` (every frame a key frame).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch import Tensor

from .nn.mpvss import MPVSS, KeyFrameState
from .nn.warp import compose_flows, warp_mask_logits
from .values import is_finite, is_real, shown

if TYPE_CHECKING:
    from .runtime.base import Backend

__all__ = [
    "Propagator",
    "FlowChain",
    "CopyPropagator",
    "OpticalFlowPropagator",
    "QueryFlowPropagator",
    "build_propagator",
    "grid_hw",
    "pool_flow",
    "PROPAGATORS",
    "FLOW_PROPAGATORS",
    "DIS_PRESETS",
    "OPTICAL_FLOW_SCALE_RANGE",
]

PROPAGATORS = ("query_flow", "optical_flow", "copy")
#: The propagators that warp with a flow (and so take ``chain_flow``).
FLOW_PROPAGATORS = ("query_flow", "optical_flow")
#: OpenCV DIS presets by name (``cv2.DISOPTICAL_FLOW_PRESET_*``), fastest first.
DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
#: Allowed ``flow_scale`` of :class:`OpticalFlowPropagator` (inclusive): below 0.1 a 480 x 640
#: canvas leaves DIS fewer than 64 pixels across.
OPTICAL_FLOW_SCALE_RANGE = (0.1, 1.0)
_MIN_FLOW_SIDE = 32


class Propagator(ABC):
    """Interface: mask logits of the current frame from the key frame's state."""

    name: str = ""

    @abstractmethod
    def propagate(self, key: KeyFrameState, image: Tensor) -> Tensor:
        """Propagate the key frame's masks to ``image``.

        Args:
            key: the key frame's state (mask logits (1, N, Hp/4, Wp/4) float32, ...).
            image: (1, 3, Hp, Wp) float32 RGB 0..255 current frame on the key frame's canvas.

        Returns:
            (1, M, Hp/4, Wp/4) float32 mask logits for the current frame, of the key frame's
            active queries (``key.propagated``: M = N unless ``key.active`` limits them).
        """

    def describe(self) -> dict[str, Any]:
        """The propagator's name and settings (JSON-ready), for run summaries."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return self.name


class CopyPropagator(Propagator):
    """Hold the key frame's masks unchanged (the "copy last key frame" baseline)."""

    name = "copy"

    def propagate(self, key: KeyFrameState, image: Tensor) -> Tensor:
        return key.propagated(key.mask_logits)


class FlowChain:
    """A chained flow's state: the key frame it belongs to, the last frame it reached and the
    composed flow from that frame to the key frame.

    Usage per non-key frame: ``reference = chain.start(key, key_reference)`` gives the frame to
    estimate the step flow to (the key frame's own reference right after a new key frame, else the
    previous frame); ``chain.advance(step, current_reference)`` composes the step and returns the
    flow from the current frame to the key frame.
    """

    def __init__(self) -> None:
        self.key: KeyFrameState | None = None  # held, so identity comparison is safe
        self.reference: Any = None
        self.flow: Tensor | None = None

    def start(self, key: KeyFrameState, key_reference: Any) -> Any:
        """The frame the current frame's step flow points into (``key_reference`` at a new key)."""
        if self.key is not key:
            self.key, self.reference, self.flow = key, key_reference, None
        return self.reference

    def advance(self, step: Tensor, reference: Any, normalization: str = "exact") -> Tensor:
        """Compose ``step`` (B, N|1, 2, h, w) float32 (current -> previous, pixels of the flow
        grid) onto the chain; ``reference`` is the current frame in the form :meth:`start`
        returns; ``normalization`` is how the flows warp the key frame's masks. Returns current
        -> key frame, (B, N|1, 2, h, w) float32 in the same units
        (:func:`~mpvss_ros.nn.warp.compose_flows`, which raises ``ValueError`` on mismatched
        shapes)."""
        if self.flow is None:
            self.flow = step
        else:  # mmtrack composition needs the size of the masks the flows warp (the key frame's)
            mask_hw = tuple(self.key.mask_logits.shape[-2:]) if normalization == "mmtrack" else None
            self.flow = compose_flows(self.flow, step, normalization, mask_hw)
        self.reference = reference
        return self.flow


class QueryFlowPropagator(Propagator):
    """MPVSS query-based flow: each key-frame mask warped with its own flow.

    Args:
        model: the MPVSS model whose motion module estimates the flows, or an inference backend
            (:mod:`mpvss_ros.runtime`); anything with ``propagate(key, image)`` and
            ``query_flows(key, image, reference)``.
        chain_flow: compose frame-to-frame flows (see the module docstring) instead of the paper's
            direct flow from the current frame to the key frame.

    Raises:
        ValueError: a model whose ``motion_trained`` is False (weights without a trained motion module).
    """

    name = "query_flow"

    def __init__(self, model: "MPVSS | Backend", chain_flow: bool = True) -> None:
        if not getattr(model, "motion_trained", True):
            raise ValueError("query_flow needs a trained motion module, and these weights hold none (a per-frame "
                             "Mask2Former or stage-1 checkpoint, or an export of one): propagate with optical_flow "
                             "or copy, or train a motion module with mpvss train motion --init-checkpoint")
        self.model = model
        self.chain_flow = bool(chain_flow)
        self._chain = FlowChain()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "chain_flow": self.chain_flow}

    def propagate(self, key: KeyFrameState, image: Tensor) -> Tensor:
        if not self.chain_flow:
            return self.model.propagate(key, image)
        previous = self._chain.start(key, key.image)
        normalization = self.model.cfg.input.warp_normalization
        flows = self._chain.advance(self.model.query_flows(key, image, previous), image, normalization)
        return warp_mask_logits(key.propagated(key.mask_logits), flows, normalization)


class OpticalFlowPropagator(Propagator):
    """Classic dense optical flow (OpenCV) from the current frame to the key frame.

    The flow is computed on grey images at ``flow_scale`` of the canvas (DIS, Kroeger et al.
    ECCV 2016, with an OpenCV preset; or Farneback), then every mask is warped with it (``exact``
    grid; see :func:`~mpvss_ros.nn.warp.warp_mask_logits`). The key frame's grey image is
    computed once per key frame.

    Accuracy against cost, CamVid val clip, shipped ``mpvss_lite`` weights, fixed key interval
    5 / 10, 2 CPU threads (median ms per non-key frame at interval 5, the whole
    ``VideoSegmenter.push``), chained flow: fast@0.5 69.19 / 66.41 mIoU (12.9-13.3 ms), medium@0.5
    69.87 / 67.83 (17.6-17.9 ms), fast@1.0 69.90 / 67.81, medium@1.0 70.36 / 68.67 (33.0-33.1 ms);
    direct flow 68.13 / 62.46, 69.03 / 64.23, 68.70 / 63.39, 69.45 / 64.98; see ``docs/experiment_log.md``,
    "Chained flow" (the mIoU) and "Stop 35" (the times; fast@1.0 was not re-timed).

    Args:
        method: ``dis`` or ``farneback``.
        flow_scale: resolution of the flow computation relative to the canvas, in
            :data:`OPTICAL_FLOW_SCALE_RANGE` (0.1 <= s <= 1).
        preset: DIS preset, a key of :data:`DIS_PRESETS` (ignored by Farneback).
        grid_stride: when set (>= 1 / flow_scale), the flow is area-averaged onto a grid of ``ceil(H / stride) x
            ceil(W / stride)`` cells of the (H, W) canvas before warping (canvas pixels per cell,
            may be fractional: the motion module's ``flow_stride``, 32/3 for ``mpvss_lite``,
            gives its flow grid). A diagnostic: it tells whether the coarser flow grid of
            query-based flow, rather than the flow itself, limits accuracy.
        chain_flow: compose frame-to-frame flows (see the module docstring) instead of the
            paper's direct flow from the current frame to the key frame.

    Raises:
        ValueError: on an unknown method or preset, a bad scale or a grid stride < 1 / flow_scale.
    """

    name = "optical_flow"

    def __init__(self, method: str = "dis", flow_scale: float = 0.5, grid_stride: float | None = None,
                 preset: str = "fast", chain_flow: bool = True) -> None:
        if method not in ("dis", "farneback"):
            raise ValueError(f"optical-flow method must be dis or farneback, got {method!r}")
        if preset not in DIS_PRESETS:
            raise ValueError(f"DIS preset must be one of {', '.join(DIS_PRESETS)}, got {preset!r}")
        lo, hi = OPTICAL_FLOW_SCALE_RANGE
        if not (is_real(flow_scale) and lo <= flow_scale <= hi):
            raise ValueError(f"flow_scale must be in [{lo:g}, {hi:g}], got {shown(flow_scale)}")
        if grid_stride is not None and not (is_real(grid_stride) and is_finite(grid_stride) and grid_stride >= 1):
            raise ValueError(f"grid_stride must be a finite number >= 1 or None, got {shown(grid_stride)}")
        if grid_stride is not None and grid_stride * flow_scale < 1:
            # pool_flow only averages onto a grid no finer than the flow's (canvas x flow_scale)
            raise ValueError(f"grid_stride must be >= 1 / flow_scale = {1 / flow_scale:g} (the flow is computed at "
                             f"{flow_scale:g} of the canvas), got {shown(grid_stride)}")
        self.method = method
        self.flow_scale = flow_scale
        self.grid_stride = grid_stride
        self.preset = preset
        self.chain_flow = bool(chain_flow)
        self._chain = FlowChain()
        self._dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset]) if method == "dis" else None
        self._key: KeyFrameState | None = None  # held, so identity comparison is safe
        self._key_grey: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "preset": self.preset if self.method == "dis" else None,
                "flow_scale": self.flow_scale, "grid_stride": self.grid_stride, "chain_flow": self.chain_flow}

    def _grey(self, image: Tensor) -> np.ndarray:
        rgb = image[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).cpu().numpy()
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        h, w = grey.shape
        # OpenCV's DIS crashes (SIGSEGV, opencv 5.0) on images under 32 px on a side: keep both
        # sides >= 32; warp_mask_logits rescales the flow per axis to the mask grid.
        size = (max(_MIN_FLOW_SIDE, round(w * self.flow_scale)), max(_MIN_FLOW_SIDE, round(h * self.flow_scale)))
        if size != (w, h):
            shrink = size[0] < w or size[1] < h
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return grey

    def flow(self, current_grey: np.ndarray, key_grey: np.ndarray) -> np.ndarray:
        """Backward flow (h, w, 2) float32 in pixels: current(p) ~ key(p + flow(p))."""
        if self._dis is not None:
            return self._dis.calc(current_grey, key_grey, None)
        return cv2.calcOpticalFlowFarneback(current_grey, key_grey, None, 0.5, 3, 15, 3, 5, 1.2, 0)

    def propagate(self, key: KeyFrameState, image: Tensor) -> Tensor:
        if self._key is not key or self._key_grey is None:
            self._key_grey = self._grey(key.image)
            self._key = key
        grey = self._grey(image)
        if self.chain_flow:
            step = self.flow(grey, self._chain.start(key, self._key_grey))
            chained = self._chain.advance(torch.from_numpy(step).permute(2, 0, 1)[None, None], grey)
            flow = chained[0, 0].permute(1, 2, 0).numpy()
        else:
            flow = self.flow(grey, self._key_grey)
        if self.grid_stride is not None:
            # at grid_stride = 1 / flow_scale ceil(H / stride) can exceed the flow's round(H x scale) by one
            gh, gw = grid_hw(image.shape[-2:], self.grid_stride)
            flow = pool_flow(np.ascontiguousarray(flow), (min(gh, flow.shape[0]), min(gw, flow.shape[1])))
        flows = torch.from_numpy(np.ascontiguousarray(flow)).permute(2, 0, 1)[None, None].to(key.mask_logits)
        return warp_mask_logits(key.propagated(key.mask_logits), flows, "exact")


def grid_hw(canvas_hw: tuple[int, int] | torch.Size, stride: float) -> tuple[int, int]:
    """(ceil(H / stride), ceil(W / stride)): cells of a flow grid with ``stride`` canvas pixels
    per cell (e.g. the motion module's ``flow_stride``, 32/3 for ``mpvss_lite``)."""
    return math.ceil(int(canvas_hw[0]) / stride), math.ceil(int(canvas_hw[1]) / stride)


def pool_flow(flow: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Area-average a dense flow onto a coarser grid, keeping it in that grid's pixels.

    Args:
        flow: (h, w, 2) float32, x then y displacement in pixels of its own (h, w) grid.
        grid: (gh, gw) output cells, each at most (h, w).

    Returns:
        (gh, gw, 2) float32 in pixels of the (gh, gw) grid (x scaled by gw / w, y by gh / h).

    Raises:
        ValueError: ``flow`` is not (h, w, 2) or ``grid`` is larger than (h, w).
    """
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must be (h, w, 2), got {flow.shape}")
    h, w = flow.shape[:2]
    gh, gw = int(grid[0]), int(grid[1])
    if not (1 <= gh <= h and 1 <= gw <= w):
        raise ValueError(f"grid {grid} must lie within the flow's size {(h, w)}")
    small = cv2.resize(flow, (gw, gh), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small * np.array([gw / w, gh / h], np.float32))


def build_propagator(name: str, model: "MPVSS | Backend", optical_flow_preset: str = "fast",
                     optical_flow_scale: float = 0.5, chain_flow: bool = True) -> Propagator:
    """Make the propagator called ``name`` (one of :data:`PROPAGATORS`).

    Args:
        name: ``query_flow``, ``optical_flow`` or ``copy``.
        model: the MPVSS model or an inference backend (used by ``query_flow``).
        optical_flow_preset: DIS preset of ``optical_flow`` (a key of :data:`DIS_PRESETS`).
        optical_flow_scale: resolution of ``optical_flow``'s DIS computation relative to the
            canvas, 0.1 <= s <= 1 (:data:`OPTICAL_FLOW_SCALE_RANGE`).
        chain_flow: chained flow for ``query_flow`` and ``optical_flow`` (module docstring);
            False = the paper's direct flow to the key frame. Ignored by ``copy``.

    Raises:
        ValueError: on an unknown name (listing the known ones), preset or a bad scale, or
            ``query_flow`` on a model without a trained motion module.
    """
    if name == "query_flow":
        return QueryFlowPropagator(model, chain_flow=chain_flow)
    if name == "optical_flow":
        return OpticalFlowPropagator("dis", flow_scale=optical_flow_scale, preset=optical_flow_preset,
                                     chain_flow=chain_flow)
    if name == "copy":
        return CopyPropagator()
    raise ValueError(f"unknown propagator {name!r}; choose one of {', '.join(PROPAGATORS)}")
