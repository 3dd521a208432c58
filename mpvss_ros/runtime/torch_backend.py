"""The PyTorch backend: the MPVSS module itself, on CPU or CUDA, fp32 or fp16 autocast.

fp16 (CUDA only) follows the official Mask2Former/MPVSS code: the backbone, the masked-attention
decoder and the motion module run under ``torch.autocast(dtype=float16)``; the pixel decoder
runs in float32 (the reference decorates it ``@autocast(enabled=False)``: deformable attention's
sampling locations lose too much in half precision), and the final mask warp runs in float32
(the ``grid_sample`` coordinates would lose sub-pixel precision). Outputs are float32.

On CPU the backbone runs channels-last (NHWC): oneDNN's NCHW kernels for MobileNetV2's 1x1 and
depthwise convolutions at the canvas's early strides are several times slower than its NHWC ones
(16.3 vs 1.1 ms for the 16 -> 96 1x1 convolution at 240 x 320, 2 threads of a Xeon).
``mpvss_lite``, 2 threads, medians: backbone 81 -> 60 ms, and the pixel decoder, fed NHWC
features, 23 -> 12 ms; whole key frames in ``VideoSegmenter.push`` 138 -> 107 ms (the median of
three interleaved runs of 70 CamVid val frames each); labels equal on all but 1 pixel in 3.4
million. The rest stays NCHW: the masked-attention and motion decoders gained nothing, the
motion encoder alone went 4.2 -> 3.5 ms but non-key frames in ``push()`` did not change
(propagation 16.7 against 16.5 ms, same three runs), and converting the whole motion module made
them slower. ``mpvss_r50`` (untrained, one 480 x 640 frame, 5 runs, backbone and motion encoder
converted): key frame 1333 -> 1288 ms, query flows 113 -> 118 ms, about even.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn.mpvss import MPVSS, KeyFrameState
from ..nn.warp import warp_mask_logits
from .base import Backend, BackendUnavailable, check_precision

__all__ = ["CHANNELS_LAST_MODULES", "TorchBackend", "to_channels_last"]

#: Submodules run channels-last on CPU (see the module docstring for the measurements).
CHANNELS_LAST_MODULES = ("backbone",)


def to_channels_last(model: nn.Module) -> None:
    """Store those of the model's :data:`CHANNELS_LAST_MODULES` that it has channels-last, in place.

    Parameter values and the layout of the model's outputs are unchanged; only the memory layout
    of those submodules' weights (and so of the activations they produce) changes.
    """
    for name in CHANNELS_LAST_MODULES:
        try:
            module = model.get_submodule(name)
        except AttributeError:  # a stand-in model without it
            continue
        module.to(memory_format=torch.channels_last)


class TorchBackend(Backend):
    """Run the PyTorch model (any module with ``segment_key_frame``/``propagate``).

    Args:
        model: the :class:`~mpvss_ros.nn.mpvss.MPVSS` module (or a stand-in with the same
            methods); it is put in eval mode and moved to ``device``.
        device: ``cpu`` or ``cuda[:N]``.
        precision: ``fp32``, or ``fp16`` (autocast; CUDA and an MPVSS model only).
        channels_last: run the model's :data:`CHANNELS_LAST_MODULES` that it has channels-last;
            None = on CPU only (measured there; CUDA is left as it was). Their parameters are
            converted in place, as ``model.eval().to(device)`` already moves them; values and
            outputs' layouts are unchanged.

    Raises:
        BackendUnavailable: fp16 on CPU or CUDA requested where torch has none.
        ValueError: unknown precision.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32",
                 channels_last: bool | None = None) -> None:
        check_precision(precision)
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch backend on CUDA needs a CUDA build of torch and a GPU; use --device cpu")
        if precision == "fp16" and dev.type != "cuda":
            raise BackendUnavailable("fp16 with the torch backend needs CUDA (--device cuda); use --precision fp32 on CPU")
        if precision == "fp16" and not isinstance(model, MPVSS):
            raise BackendUnavailable(f"fp16 autocast is implemented for the MPVSS model, not {type(model).__name__}")
        self.model = model.eval().to(dev)
        self.cfg = model.cfg
        self.device = dev
        self.precision = precision
        self.name = "torch" if precision == "fp32" else "torch[fp16 autocast]"
        self.channels_last = dev.type == "cpu" if channels_last is None else bool(channels_last)
        if self.channels_last:
            to_channels_last(model)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "channels_last": self.channels_last}

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", self.cfg.num_classes))

    def _autocast(self, enabled: bool = True):
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=enabled)

    def segment_key_frame(self, image: Tensor, valid_hw: tuple[int, int] | None = None) -> KeyFrameState:
        if self.precision == "fp32":
            return self.model.segment_key_frame(image, valid_hw)
        m: MPVSS = self.model  # type: ignore[assignment]
        with self._autocast():
            features = m.backbone(m.normalize(image, valid_hw))
        with self._autocast(enabled=False):  # official: the pixel decoder always runs in fp32
            mask_features, multi_scale = m.sem_seg_head.pixel_decoder({k: v.float() for k, v in features.items()})
        with self._autocast():
            out = m.sem_seg_head.predictor(multi_scale, mask_features)
        hw = (int(image.shape[-2]), int(image.shape[-1])) if valid_hw is None else tuple(int(v) for v in valid_hw)
        return KeyFrameState(
            image=image,
            valid_hw=hw,
            class_logits=out.class_logits.float(),
            mask_logits=out.mask_logits.float(),
            query_embeddings=out.query_embeddings.float(),
        )

    def query_flows(self, key: KeyFrameState, image: Tensor, reference: Tensor | None = None) -> Tensor:
        with self._autocast(enabled=self.precision == "fp16"):
            flows = self.model.query_flows(key, image, reference)
        return flows.float()

    def propagate(self, key: KeyFrameState, image: Tensor) -> Tensor:
        if self.precision == "fp32":
            return self.model.propagate(key, image)
        m: MPVSS = self.model  # type: ignore[assignment]
        return warp_mask_logits(key.mask_logits.float(), self.query_flows(key, image), m.warp_normalization)
