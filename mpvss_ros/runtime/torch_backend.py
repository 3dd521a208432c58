"""The PyTorch backend: the MPVSS module itself, on CPU or CUDA; fp32, fp16 autocast or bf16 weights.

fp16 (CUDA only) follows the official Mask2Former/MPVSS code: the backbone, the masked-attention
decoder and the motion module run under ``torch.autocast(dtype=float16)``; the pixel decoder
runs in float32 (the reference decorates it ``@autocast(enabled=False)``: deformable attention's
sampling locations lose too much in half precision; the model's pixel decoders carry the same
switch, so the backend runs the model's own ``segment_key_frame`` under autocast), and the final
mask warp runs in float32 (the ``grid_sample`` coordinates would lose sub-pixel precision).
Outputs are float32.

bf16 (CPU only, with bfloat16 instructions: AVX-512 BF16 or AMX) stores the weights of
:data:`BF16_MODULES` (backbone and motion encoder) as bfloat16, channels-last, and gives each of
them hooks that cast its floating-point inputs to bfloat16 and its outputs back to float32
(:func:`run_in_bf16`), so the model's own forward paths run unchanged; the rest runs in float32
(autocast on CPU re-casts the weights at every call and was slower than float32). CamVid val clip, the weights shipped then (motion input 3/8), 2 threads of a Xeon with AMX: 93 against
108 ms per key frame on average, 70.60 against 70.73 per-frame mIoU, 69.11 against 69.10 at one
key frame in 5 (``docs/runtime.md``, "bf16 on CPU"); since the BatchNorm folding below, fp32 key
frames are faster than bf16 ones there (72-73 against 77-78 ms), and bf16 saves only about 1.5 ms
per non-key frame.

The backend prepares the model it is given for inference, in place: eval mode, the device, the
backbone's BatchNorm layers folded into its convolutions (:func:`fold_batch_norms`; every device),
channels-last on CPU, bfloat16 weights with ``precision="bf16"``. Folding removes the BatchNorm
modules (other state-dict keys), so a model that will still be trained or saved is wrapped with
``fold_batch_norm=False``. With the activations on fresh outputs computed in place (the model
code, as torchvision's MobileNetV2), folding took the CPU key frame from 105-116 to 73-78 ms on
the CamVid val clip (2 threads of a Xeon, alternating processes; in-place activations alone
94-102 ms), every mIoU equal to 1e-4.

On CPU the backbone runs channels-last (NHWC): oneDNN's NCHW kernels for MobileNetV2's 1x1 and
depthwise convolutions at the canvas's early strides are several times slower than its NHWC ones
(16.3 vs 1.1 ms for the 16 -> 96 1x1 convolution at 240 x 320, 2 threads of a Xeon).
``mpvss_lite``, 2 threads, medians: backbone 81 -> 60 ms, and the pixel decoder, fed NHWC
features, 23 -> 12 ms; whole key frames in ``VideoSegmenter.push`` 138 -> 107 ms (the median of
three interleaved runs of 70 CamVid val frames each); labels equal on all but 1 pixel in 3.4
million. The motion module runs channels-last too: its 2-channel flow predictions and its
encoder are faster in NHWC (conv 98 -> 2 at 45 x 60: 0.43 -> 0.24 ms alone), and it returns
contiguous NCHW flows (a channels-last flow had made the warp's 2-channel upsampling 0.3 -> 1.3 ms,
which is why converting it once measured slower). CamVid val clip, chained query flow at one key
frame in 5, five passes alternating with the NCHW module (``VideoSegmenter.push``, medians per
pass): propagation 14.2-14.7 -> 12.7-13.3 ms, labels identical. The masked-attention decoder stays
NCHW (it gained nothing). ``mpvss_r50`` (untrained, one 480 x 640 frame): key frame 1333 -> 1288
ms with the backbone converted (5 runs); the whole motion module 112.1 / 110.1 / 117.1 -> 104.9 /
102.3 / 108.9 ms (3 interleaved rounds of 3 runs, all 100 queries).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..devices import as_torch_device
from ..nn.backbones import Conv2dNorm
from ..nn.mpvss import MPVSS, KeyFrameState
from ..nn.warp import warp_mask_logits
from .base import Backend, BackendUnavailable, Missing

__all__ = ["BF16_MODULES", "CHANNELS_LAST_MODULES", "TorchBackend", "bf16_missing", "fold_batch_norms", "run_in_bf16",
           "to_channels_last"]

#: Submodules run channels-last on CPU (see the module docstring for the measurements).
CHANNELS_LAST_MODULES = ("backbone", "motion")

#: Submodules whose weights become bfloat16 with ``precision="bf16"`` (CPU); the pixel decoder and
#: the warp stay float32, as in the fp16 path.
BF16_MODULES = ("backbone", "motion.encoder")


def bf16_missing(device: torch.device | str = "cpu") -> str | None:
    """Why ``precision="bf16"`` cannot run on ``device`` with the torch backend, or None.

    bf16 is a CPU precision here: it needs oneDNN with bfloat16 instructions (AVX-512 BF16 or
    AMX); without them bfloat16 convolutions are emulated and slower than float32.
    """
    if torch.device(device).type != "cpu":
        return Missing("bf16 with the torch backend runs on CPU", "on CUDA use --precision fp16")
    # oneDNN reports bf16 "supported" on any AVX-512 CPU, where it is emulated (1.7x slower than
    # fp32 on a key frame with AVX-512 VNNI alone): ask for the instructions themselves.
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(probes):  # torch 2.1 has neither
        return Missing(f"torch {torch.__version__} cannot tell whether this CPU has bfloat16 instructions "
                       "(no torch.cpu._is_avx512_bf16_supported or _is_amx_tile_supported)",
                       "use a newer torch, or --precision fp32")
    native = any(probe() for probe in probes if probe is not None)
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() and native):
        return Missing("bf16 needs a CPU with bfloat16 instructions (AVX-512 BF16 or AMX) and oneDNN",
                       "use --precision fp32")
    return None


def _cast_floats(x: Any, dtype: torch.dtype) -> Any:
    """``x`` with every floating-point tensor in it (nested in lists, tuples, dicts) cast to ``dtype``."""
    if isinstance(x, Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _cast_floats(v, dtype) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a NamedTuple, e.g. MotionOutput
        return type(x)(*(_cast_floats(v, dtype) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_cast_floats(v, dtype) for v in x)
    return x


def run_in_bf16(module: nn.Module, memory_format: torch.memory_format = torch.preserve_format) -> None:
    """Make ``module`` compute in bfloat16 behind a float32 interface, in place.

    Its parameters and buffers become bfloat16 (in ``memory_format``); a forward pre-hook casts
    its floating-point inputs to bfloat16 and a forward hook casts its outputs (tensors, or lists,
    tuples and dicts of them) back to float32, so callers see float32 exactly as before.
    """
    module.to(torch.bfloat16, memory_format=memory_format)
    module.register_forward_pre_hook(lambda _m, args: _cast_floats(args, torch.bfloat16))
    module.register_forward_hook(lambda _m, _args, out: _cast_floats(out, torch.float32))
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and conv.stride[1] > 1:
            conv.register_forward_pre_hook(_one_column_guard_on)
            conv.register_forward_hook(_one_column_guard_off, always_call=True)  # also when it raises


def _conv_output_length(n: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Length of a convolution's output along one axis for an input ``n`` long (``nn.Conv2d``'s
    formula; 0 or less: the input is too short)."""
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _one_column_output(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv`` (horizontal stride > 1, integer padding) gives ``x`` an output one column wide."""
    (_, k), (_, s), (_, d), pad = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    p = pad[1] if isinstance(pad, tuple) else 0  # a string padding ('valid'; 'same' needs stride 1)
    return _conv_output_length(x.shape[-1], k, s, p, d) == 1


def _one_column_guard_on(conv: nn.Conv2d, args: tuple[Any, ...]) -> None:
    """oneDNN's bfloat16 convolution on CPU (torch 2.13) reads memory it never wrote when a
    convolution with a horizontal stride of 2 or 3 has an output one column wide: the output is
    whatever that memory held (1e30 after a tensor of 1e30 was freed, NaN after NaNs;
    ``scripts/bf16_one_column_convs.py``: kernels 3-7, 3-128 input channels, both memory layouts;
    depthwise ones are right; ``pytorch/pytorch#163347`` and ``#169688`` are the same family).
    Frames letterboxed to a canvas 128 pixels wide or less reach it in the motion encoder (at its
    input scale 1/2), 32 pixels wide in the ResNet backbones (Swin's patch embedding, stride
    and kernel 4, is outside the cases measured; the guard covers it as every strided
    convolution). Such a convolution runs with oneDNN
    off (PyTorch's own bfloat16 kernel, correct and slower); :func:`_one_column_guard_off` turns it
    back on."""
    if args and isinstance(args[0], Tensor) and _one_column_output(conv, args[0]) and torch.backends.mkldnn.enabled:
        torch.backends.mkldnn.enabled = False
        conv._mpvss_mkldnn_off = True  # type: ignore[assignment]


def _one_column_guard_off(conv: nn.Conv2d, _args: tuple[Any, ...], _out: Any) -> None:
    if getattr(conv, "_mpvss_mkldnn_off", False):
        torch.backends.mkldnn.enabled = True
        conv._mpvss_mkldnn_off = False  # type: ignore[assignment]


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a convolution into that convolution, in place.

    Inference only: the model must be in eval mode (running statistics are used). Matched are
    ``nn.Sequential`` runs ``[Conv2d, BatchNorm2d]`` (MobileNetV2; the norm becomes ``nn.Identity``)
    and :class:`~mpvss_ros.nn.backbones.Conv2dNorm` with a BatchNorm2d ``norm`` (ResNet; the norm
    becomes None and the convolution gets a bias). The folded weights come from
    :func:`torch.nn.utils.fusion.fuse_conv_bn_weights`. Outputs are unchanged up to float32
    rounding, but the module tree and its ``state_dict`` keys change: a folded model can no
    longer be trained or saved as a checkpoint.

    Returns:
        The number of BatchNorm2d layers folded.

    Raises:
        ValueError: a BatchNorm2d to fold is in training mode or keeps no running statistics.
    """
    folded = 0

    def weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[nn.Parameter, nn.Parameter]:
        if bn.training or bn.running_mean is None or bn.running_var is None:
            raise ValueError("fold_batch_norms needs eval-mode BatchNorm2d layers with running statistics")
        return fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias)

    for module in list(model.modules()):
        if isinstance(module, Conv2dNorm) and isinstance(module.norm, nn.BatchNorm2d):
            module.weight, module.bias = weights(module, module.norm)
            module.norm = None
            folded += 1
        elif isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                conv, bn = module._modules[first], module._modules[second]
                if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
                    conv.weight, conv.bias = weights(conv, bn)
                    module._modules[second] = nn.Identity()
                    folded += 1
    return folded


def to_channels_last(model: nn.Module, modules: tuple[str, ...] = CHANNELS_LAST_MODULES) -> None:
    """Store those of the model's ``modules`` (default :data:`CHANNELS_LAST_MODULES`) that it has
    channels-last, in place.

    Parameter values and the layout of the model's outputs are unchanged; only the memory layout
    of those submodules' weights (and so of the activations they produce) changes.
    """
    for name in modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:  # a stand-in model without it
            continue
        module.to(memory_format=torch.channels_last)


class TorchBackend(Backend):
    """Run the PyTorch model (any module with ``segment_key_frame``/``propagate``; its
    ``motion_trained``, when it has one, is the backend's).

    Args:
        model: the :class:`~mpvss_ros.nn.mpvss.MPVSS` module (or a stand-in with the same
            methods); it is put in eval mode and moved to ``device``.
        device: ``cpu`` or ``cuda[:N]``.
        precision: ``fp32``, ``fp16`` (autocast; CUDA and an MPVSS model only) or ``bf16``
            (bfloat16 weights for :data:`BF16_MODULES`; CPU with bfloat16 instructions and an
            MPVSS model only).
        channels_last: run the model's :data:`CHANNELS_LAST_MODULES` that it has channels-last;
            None = on CPU only (measured there; CUDA is left as it was). Their parameters are
            converted in place, as ``model.eval().to(device)`` already moves them; values and
            outputs' layouts are unchanged.
        fold_batch_norm: fold the model's BatchNorm layers (the backbone's) into the
            convolutions in front of them (:func:`fold_batch_norms`), in place. This changes the
            model's module tree and state-dict keys, so pass False for a model that will still be trained or saved
            (stage-2 training's pseudo-labels and quick validation do).

    Raises:
        BackendUnavailable: fp16 on CPU, bf16 on CUDA or on a CPU without bfloat16 instructions
            (:func:`bf16_missing`), or CUDA requested where torch has none.
        ValueError: unknown precision.
    """

    @property
    def motion_trained(self) -> bool:
        """The model's ``motion_trained`` (True for a stand-in without one)."""
        return bool(getattr(self.model, "motion_trained", True))

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32",
                 channels_last: bool | None = None, fold_batch_norm: bool = True) -> None:
        from . import backend_missing  # the package imports this module lazily: no cycle

        dev = as_torch_device(device)
        if why := backend_missing("torch", str(dev), precision):
            raise BackendUnavailable(why)
        if precision != "fp32" and not isinstance(model, MPVSS):
            raise BackendUnavailable(f"{precision} is implemented for the MPVSS model, not {type(model).__name__}")
        self.model = model.eval().to(dev)
        self.cfg = model.cfg
        self.device = dev
        self.precision = precision
        self.name = {"fp32": "torch", "fp16": "torch[fp16 autocast]", "bf16": "torch[bf16 weights]"}[precision]
        self.channels_last = dev.type == "cpu" if channels_last is None else bool(channels_last)
        self.fold_batch_norm = bool(fold_batch_norm)
        if self.fold_batch_norm:
            fold_batch_norms(model)
        if self.channels_last:
            to_channels_last(model)
        if precision == "bf16":
            fmt = torch.channels_last if self.channels_last else torch.preserve_format
            for name in BF16_MODULES:
                run_in_bf16(model.get_submodule(name), fmt)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "channels_last": self.channels_last, "fold_batch_norm": self.fold_batch_norm}

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", self.cfg.num_classes))

    def _autocast(self):
        # fp16 only; bf16 casts at the boundaries of BF16_MODULES (run_in_bf16). No autocast object
        # otherwise: torch 2.1.2 refuses float16 on CPU even for a disabled one (2.5.1 does not).
        if self.precision != "fp16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.float16)

    def segment_key_frame(self, image: Tensor, valid_hw: tuple[int, int] | None = None) -> KeyFrameState:
        if self.precision != "fp16":
            return self.model.segment_key_frame(image, valid_hw)
        with self._autocast():  # the pixel decoder turns autocast off for itself (nn.pixel_decoder)
            key = self.model.segment_key_frame(image, valid_hw)
        return replace(key, class_logits=key.class_logits.float(), mask_logits=key.mask_logits.float(),
                       query_embeddings=key.query_embeddings.float())

    def query_flows(self, key: KeyFrameState, image: Tensor, reference: Tensor | None = None) -> Tensor:
        with self._autocast():
            flows = self.model.query_flows(key, image, reference)
        return flows.float()

    def propagate(self, key: KeyFrameState, image: Tensor) -> Tensor:
        if self.precision != "fp16":
            return self.model.propagate(key, image)
        m: MPVSS = self.model  # type: ignore[assignment]
        return warp_mask_logits(key.propagated(key.mask_logits).float(), self.query_flows(key, image), m.warp_normalization)
