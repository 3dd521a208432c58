"""Image backbones returning the ``res2..res5`` feature pyramid used by Mask2Former / MPVSS.

Common contract (every backbone here):

* ``forward(x)`` takes ``x`` of shape (B, 3, H, W), float32, already normalised
  ((RGB - mean) / std), with H and W multiples of 32, and returns a dict
  ``{"res2": (B, C2, H/4, W/4), "res3": (B, C3, H/8, W/8), "res4": (B, C4, H/16, W/16),
  "res5": (B, C5, H/32, W/32)}`` of float32 tensors.
* the attribute ``out_channels: dict[str, int]`` gives ``C2..C5``.

Backbones:

* :class:`ResNet` (depth 50 or 101) in the detectron2 key layout of the official Mask2Former and
  MPVSS checkpoints (``stem.conv1.weight``, ``res2.0.conv1.norm.running_mean``, ...; the parent
  module adds the ``backbone.`` prefix). Bottleneck with the stride on the 3x3 conv
  (``STRIDE_IN_1X1: False``), He et al. 2016; spec: ``docs/mpvss_architecture.md`` sections 0
  and 5.2.
* :class:`~mpvss_ros.nn.swin.SwinTransformer` (Swin-T/S/B/L, Liu et al. 2021) in the key layout
  of Mask2Former's ``D2SwinTransformer`` (``patch_embed.*``, ``layers.{s}.blocks.{b}.*``,
  ``norm{0..3}.*``); it lives in :mod:`mpvss_ros.nn.swin`.
* :class:`MobileNetV2` (Sandler et al. 2018) in the flat ``features.*`` layout of
  ``shared/data/weights/mobilenetv2_imagenet_features.pt`` (see ``shared/data/README.md``),
  with :func:`load_imagenet_weights`.
* :func:`build_backbone` builds one from a :class:`~mpvss_ros.config.BackboneConfig`.

ResNet and MobileNetV2 are ONNX-export friendly (TorchScript exporter, opset 17): only Conv,
BatchNorm, ReLU/Clip, MaxPool and Add; no data-dependent control flow.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from mpvss_ros.checkpoints import CheckpointError, first_line, torch_load_checked
from mpvss_ros.config import BACKBONE_TYPES, BackboneConfig
from mpvss_ros.nn.swin import SwinTransformer

__all__ = [
    "Conv2dNorm",
    "BasicStem",
    "BottleneckBlock",
    "ResNet",
    "InvertedResidual",
    "MobileNetV2",
    "load_imagenet_weights",
    "build_backbone",
    "RESNET_BLOCKS",
    "MOBILENETV2_SETTINGS",
]

#: Blocks per stage (res2, res3, res4, res5) for the supported ResNet depths.
RESNET_BLOCKS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

#: MobileNetV2 inverted-residual plan (expansion t, output channels c, repeats n, first stride s).
MOBILENETV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class Conv2dNorm(nn.Conv2d):
    """A :class:`torch.nn.Conv2d` that owns an optional ``norm`` child and an optional ReLU.

    The detectron2 ``layers.Conv2d`` layout: the state-dict keys are ``weight`` (and ``bias``
    when ``bias=True``) plus ``norm.*``, so ``res2.0.conv1.weight`` and
    ``res2.0.conv1.norm.running_mean`` map one to one. Computes ``relu?(norm?(conv(x)))``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, groups: as ``nn.Conv2d``.
        bias: whether the convolution has a bias (False in front of a norm).
        norm: a normalisation module applied after the convolution (``nn.BatchNorm2d``,
            ``nn.GroupNorm``), or None.
        relu: apply ReLU after the norm.

    Shapes: (B, in_channels, H, W) float32 -> (B, out_channels, H', W') float32, with H', W'
    given by the usual convolution arithmetic.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = False,
        norm: nn.Module | None = None,
        relu: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias
        )
        self.norm = norm
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.relu:
            x = F.relu(x, inplace=True)  # x is this layer's own fresh output
        return x


def _msra_fill_(conv: nn.Conv2d) -> None:
    """detectron2 ``c2_msra_fill``: Kaiming normal (fan_out, ReLU) weight, zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class BasicStem(nn.Module):
    """ResNet stem (detectron2 ``BasicStem``): conv 7x7 s2 p3 (no bias) + BN + ReLU + maxpool 3x3 s2 p1.

    Keys: ``conv1.weight`` (64, 3, 7, 7), ``conv1.norm.{weight,bias,running_mean,running_var}``.

    Shapes: (B, 3, H, W) float32 -> (B, 64, H/4, W/4) float32 (H, W multiples of 4).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = Conv2dNorm(
            in_channels, out_channels, 7, stride=2, padding=3, bias=False, norm=nn.BatchNorm2d(out_channels)
        )
        _msra_fill_(self.conv1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """ResNet bottleneck block, detectron2 layout with the stride on the 3x3 conv.

    ``out = relu(conv3(relu(conv2(relu(conv1(x))))) + shortcut(x))``, where every ``convK``
    is a bias-free :class:`Conv2dNorm` with BatchNorm and ``shortcut`` (a strided 1x1 conv +
    BN) exists only when the channels or the stride change (block 0 of each stage).

    Args:
        in_channels: input channels.
        out_channels: output channels (4 x bottleneck_channels in ResNet-50/101).
        bottleneck_channels: width of conv1/conv2.
        stride: stride of conv2 and of the shortcut (1 or 2).

    Shapes: (B, in_channels, H, W) float32 -> (B, out_channels, H/stride, W/stride) float32.
    """

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int = 1) -> None:
        super().__init__()
        if in_channels != out_channels or stride != 1:
            self.shortcut: nn.Module | None = Conv2dNorm(
                in_channels, out_channels, 1, stride=stride, bias=False, norm=nn.BatchNorm2d(out_channels)
            )
            _msra_fill_(self.shortcut)
        else:
            self.shortcut = None
        self.conv1 = Conv2dNorm(
            in_channels, bottleneck_channels, 1, bias=False, norm=nn.BatchNorm2d(bottleneck_channels)
        )
        self.conv2 = Conv2dNorm(
            bottleneck_channels,
            bottleneck_channels,
            3,
            stride=stride,
            padding=1,
            bias=False,
            norm=nn.BatchNorm2d(bottleneck_channels),
        )
        self.conv3 = Conv2dNorm(bottleneck_channels, out_channels, 1, bias=False, norm=nn.BatchNorm2d(out_channels))
        for conv in (self.conv1, self.conv2, self.conv3):
            _msra_fill_(conv)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-50/101 backbone in the detectron2 key layout (He et al. 2016; Mask2Former's R50/R101).

    Keys (no ``backbone.`` prefix): ``stem.conv1.weight`` (64, 3, 7, 7) and
    ``stem.conv1.norm.*``; ``res{2..5}.{j}.conv{1,2,3}.weight`` with ``.norm.*``;
    ``res{2..5}.0.shortcut.weight`` with ``.norm.*``. Norms are ``nn.BatchNorm2d`` (eps 1e-5),
    so the state dict also holds ``num_batches_tracked`` buffers that detectron2's
    ``FrozenBatchNorm2d`` checkpoints lack. Bottleneck widths 64/128/256/512, outputs
    256/512/1024/2048; res2 has stride 1 (after the stride-4 stem), res3..res5 stride 2.
    ResNet-50 has 23.508 M parameters (spec §5.3).

    Args:
        depth: 50 or 101.

    Raises:
        ValueError: unsupported depth.

    Shapes: ``x`` (B, 3, H, W) float32, normalised, H and W multiples of 32 ->
    ``{"res2": (B, 256, H/4, W/4), "res3": (B, 512, H/8, W/8), "res4": (B, 1024, H/16, W/16),
    "res5": (B, 2048, H/32, W/32)}`` float32.
    """

    def __init__(self, depth: int = 50) -> None:
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {depth}")
        self.depth = depth
        self.stem = BasicStem(3, 64)
        in_ch = 64
        self.out_channels: dict[str, int] = {}
        for idx, num_blocks in enumerate(RESNET_BLOCKS[depth]):
            name = f"res{idx + 2}"
            bottleneck = 64 * 2**idx
            out_ch = bottleneck * 4
            first_stride = 1 if idx == 0 else 2
            blocks = []
            for j in range(num_blocks):
                blocks.append(BottleneckBlock(in_ch, out_ch, bottleneck, stride=first_stride if j == 0 else 1))
                in_ch = out_ch
            self.add_module(name, nn.Sequential(*blocks))
            self.out_channels[name] = out_ch

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.stem(x)
        out: dict[str, Tensor] = {}
        x = self.res2(x)
        out["res2"] = x
        x = self.res3(x)
        out["res3"] = x
        x = self.res4(x)
        out["res4"] = x
        x = self.res5(x)
        out["res5"] = x
        return out


def _conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted-residual block (Sandler et al. 2018) with a flat ``conv`` sequence.

    ``conv`` = ``[1x1 expand conv, BN, ReLU6, 3x3 depthwise conv, BN, ReLU6, 1x1 project conv,
    BN]`` (indices 0..7), or without the first three when ``expand_ratio == 1``
    (``[dw conv, BN, ReLU6, conv, BN]``, indices 0..4); all convs without bias. The input is
    added to the output when ``stride == 1`` and ``in_channels == out_channels``.

    Args:
        in_channels, out_channels: channels.
        stride: 1 or 2 (on the depthwise conv).
        expand_ratio: hidden width = round(in_channels * expand_ratio).

    Raises:
        ValueError: stride not 1 or 2.

    Shapes: (B, in_channels, H, W) float32 -> (B, out_channels, H/stride, W/stride) float32.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += _conv_bn(in_channels, hidden, 1) + [nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden) + [nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, out_channels, 1)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) feature extractor in the flat ``features.*`` layout.

    ``features.0`` = [conv 3x3 s2 3->32, BN, ReLU6]; ``features.1..17`` =
    :class:`InvertedResidual` blocks following :data:`MOBILENETV2_SETTINGS`;
    ``features.18`` = [conv 1x1 320->1280, BN, ReLU6] (the ReLU6 as in the original network;
    it has no parameters). Matches ``shared/data/weights/mobilenetv2_imagenet_features.pt``
    key for key (load it with :func:`load_imagenet_weights`); no classifier.

    Outputs are taken after ``features.3`` (res2, 24 ch, /4), ``features.6`` (res3, 32 ch, /8),
    ``features.13`` (res4, 96 ch, /16) and ``features.18`` (res5, 1280 ch, /32).

    Shapes: ``x`` (B, 3, H, W) float32, normalised with the ImageNet mean/std, H and W
    multiples of 32 -> ``{"res2": (B, 24, H/4, W/4), "res3": (B, 32, H/8, W/8),
    "res4": (B, 96, H/16, W/16), "res5": (B, 1280, H/32, W/32)}`` float32.
    """

    #: index in ``features`` after which each output is taken.
    OUT_INDICES: dict[str, int] = {"res2": 3, "res3": 6, "res4": 13, "res5": 18}

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, 32, 3, stride=2), nn.ReLU6(inplace=True))]
        in_ch = 32
        for t, c, n, s in MOBILENETV2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(nn.Sequential(*_conv_bn(in_ch, 1280, 1), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.out_channels: dict[str, int] = {"res2": 24, "res3": 32, "res4": 96, "res5": 1280}
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        names = {v: k for k, v in self.OUT_INDICES.items()}
        for idx, layer in enumerate(self.features):
            x = layer(x)
            if idx in names:
                out[names[idx]] = x
        return out

    def load_imagenet_weights(self, path: str | Path) -> None:
        """Load the ImageNet weights file into this module; see :func:`load_imagenet_weights`."""
        load_imagenet_weights(self, path)


def load_imagenet_weights(model: MobileNetV2, path: str | Path) -> None:
    """Load ``mobilenetv2_imagenet_features.pt`` into a :class:`MobileNetV2`, strictly.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)`` after the
    CRC check of its zip members (:func:`mpvss_ros.checkpoints.torch_load_checked`) and must be
    a mapping of parameter/buffer names to tensors that matches ``model.state_dict()`` exactly
    (same keys, same shapes), as ``shared/data/README.md`` describes.

    Args:
        model: the module to fill (its tensors are overwritten in place; dtype float32).
        path: file path.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read (empty, damaged, cut short, not written by
            ``torch.save``, or holding objects other than tensors and plain data), is not a state
            dict, or its keys or shapes do not match the model (the message lists missing keys,
            unexpected keys and shape mismatches).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MobileNetV2 weights not found: {path}")
    try:
        state = torch_load_checked(path)
    except Exception as exc:  # noqa: BLE001 - a damaged file raises KeyError, EOFError, RuntimeError, ...
        cause = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {first_line(exc)[:200]}"
        raise ValueError(f"cannot read the MobileNetV2 weights {path} (a damaged or foreign file?): {cause}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not match MobileNetV2: missing keys {missing}; unexpected keys {unexpected}; "
            f"shape mismatches {mismatched}"
        )
    model.load_state_dict(state, strict=True)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Build the backbone named by ``cfg`` (randomly initialised; load weights afterwards).

    Args:
        cfg: ``type`` ``"resnet"`` (uses ``cfg.depth``, 50 or 101), ``"swin"`` (uses ``embed_dim``,
            ``depths``, ``num_heads``, ``window_size``, ``mlp_ratio``, ``drop_path_rate``) or
            ``"mobilenet_v2"``.

    Returns:
        a module following this file's contract (dict of ``res2..res5``, ``out_channels``).

    Raises:
        ValueError: unknown ``type`` or unsupported ResNet depth.
    """
    kind = cfg.type.lower()
    if kind == "resnet":
        return ResNet(depth=cfg.depth)
    if kind == "swin":
        return SwinTransformer(cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size, cfg.mlp_ratio,
                               cfg.drop_path_rate)
    if kind == "mobilenet_v2":
        return MobileNetV2()
    raise ValueError(f"unknown backbone type {cfg.type!r}; expected one of {list(BACKBONE_TYPES)}")
