"""Pixel decoders: backbone ``res2..res5`` -> 1/4 mask features + three multi-scale maps.

Common contract (both decoders):

* the constructor takes ``in_channels: dict[str, int]`` (the backbone's ``out_channels``,
  keys ``res2..res5``) plus configuration values;
* ``forward(features)`` takes the backbone's dict ``{"res2": (B, C2, H/4, W/4), ...,
  "res5": (B, C5, H/32, W/32)}`` (any float dtype; cast to float32; autocast is off inside, as
  the official ``@autocast(enabled=False)``) and returns
  ``(mask_features, multi_scale_features)``: ``mask_features`` (B, mask_dim, H/4, W/4) and
  ``multi_scale_features`` = ``[1/32, 1/16, 1/8]`` maps, each (B, conv_dim, h, w), all float32.

Decoders:

* :class:`MSDeformAttnPixelDecoder`: Mask2Former's pixel decoder (Cheng et al., CVPR 2022) with
  a pure-PyTorch multi-scale deformable attention encoder (Deformable DETR, Zhu et al., ICLR
  2021), key for key as the official checkpoints (prefix ``sem_seg_head.pixel_decoder.`` is
  added by the parent). Spec: ``docs/mpvss_architecture.md`` sections 0, 1.3, 5.2, 6.
* :class:`FPNPixelDecoder`: a light FPN (MaskFormer's ``BasePixelDecoder`` made lighter with
  depthwise-separable output convs) for CPU / Jetson.

ONNX (TorchScript exporter, opset >= 16 for GridSample; 17 used): spatial sizes are Python ints
taken from the input shapes, deformable attention is ``F.grid_sample`` (bilinear, zeros,
align_corners=False), and there is no data-dependent control flow or in-place slice write.
An engine is therefore specific to one input resolution (spec §6.3).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpvss_ros.config import PixelDecoderConfig
from mpvss_ros.nn.backbones import Conv2dNorm
from mpvss_ros.nn.layers import PositionEmbeddingSine

__all__ = [
    "ms_deform_attn_core",
    "MSDeformAttn",
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnEncoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnPixelDecoder",
    "SeparableConvGNReLU",
    "FPNPixelDecoder",
    "build_pixel_decoder",
    "FEATURE_NAMES",
]


def _autocast_off(forward):
    """Run a pixel decoder's ``forward(self, features)`` with autocast off on the features' device.

    The official pixel decoders are decorated ``@autocast(enabled=False)``: deformable attention's
    sampling locations lose too much in half precision, so under fp16 autocast
    (:class:`~mpvss_ros.runtime.torch_backend.TorchBackend` with ``precision="fp16"``) the pixel
    decoder still computes in float32; each forward casts its (possibly half) features to float32
    itself. Without autocast this changes nothing.
    """

    @functools.wraps(forward)
    def wrapped(self: nn.Module, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return forward(self, features)

    return wrapped


#: Backbone feature names every pixel decoder needs, finest first.
FEATURE_NAMES: tuple[str, ...] = ("res2", "res3", "res4", "res5")


def _check_in_channels(in_channels: dict[str, int]) -> None:
    missing = [k for k in FEATURE_NAMES if k not in in_channels]
    if missing:
        raise ValueError(f"in_channels lacks {missing}; got keys {sorted(in_channels)}")


def _check_groups(channels: int, num_groups: int) -> None:
    if num_groups < 1 or channels % num_groups != 0:
        raise ValueError(f"GroupNorm needs channels divisible by num_groups; got {channels} and {num_groups}")


def _xavier_fill_(conv: nn.Conv2d) -> None:
    """detectron2 ``c2_xavier_fill``: Kaiming uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting()


# --------------------------------------------------------------------------------------------
# Multi-scale deformable attention
# --------------------------------------------------------------------------------------------


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention sampling, pure PyTorch (Deformable DETR, Zhu et al. 2021).

    For every query q, head m: ``out[q, m] = sum_{l, p} A[q, m, l, p] * V_l^m(loc[q, m, l, p])``
    where ``V_l^m(loc)`` samples level ``l`` of head ``m`` bilinearly at the normalised location
    ``loc`` (``(x, y)`` in [0, 1], 0 = left/top edge of the map, 1 = right/bottom edge, so
    pixel ``(i, j)`` has its centre at ``((j + 0.5) / W, (i + 0.5) / H)``), with zeros outside
    the map. Implemented per level with ``F.grid_sample(mode="bilinear",
    padding_mode="zeros", align_corners=False)`` on ``grid = 2 * loc - 1``, exactly as the
    reference ``ms_deform_attn_core_pytorch`` and the CUDA kernel.

    Args:
        value: (N, S, M, D) float, the per-head values of all levels flattened row-major and
            concatenated in ``spatial_shapes`` order, ``S = sum(H_l * W_l)``.
        spatial_shapes: ``[(H_l, W_l), ...]`` Python ints, L levels.
        sampling_locations: (N, Lq, M, L, P, 2) float, ``(x, y)`` normalised as above.
        attention_weights: (N, Lq, M, L, P) float (normally softmax-ed over L*P).

    Returns:
        (N, Lq, M * D) tensor of ``value``'s dtype, heads concatenated (head-major).

    Raises:
        ValueError: (eager mode only) ``S`` differs from ``sum(H_l * W_l)`` or the level
            count of ``sampling_locations`` differs from ``len(spatial_shapes)``.
    """
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    if not _tracing():
        if sum(sizes) != s:
            raise ValueError(f"value has {s} positions but spatial_shapes {spatial_shapes} give {sum(sizes)}")
        if num_levels != len(spatial_shapes):
            raise ValueError(
                f"sampling_locations has {num_levels} levels but spatial_shapes has {len(spatial_shapes)}"
            )
    value_list = value.split(sizes, dim=1)
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        # (N, H*W, M, D) -> (N, H*W, M*D) -> (N, M*D, H*W) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # (N, Lq, M, P, 2) -> (N, M, Lq, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # (N*M, D, Lq, P)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N, M, Lq, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    # (N*M, D, Lq, L, P) -> (N*M, D, Lq, L*P) -> (N*M, D, Lq)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR), 2-d reference-point form.

    ``sampling_offsets`` (Linear C -> M*L*P*2) predicts per-head, per-level, per-point offsets
    in pixels of each level, which are divided by that level's (W, H) and added to the
    normalised reference point; ``attention_weights`` (Linear C -> M*L*P) is softmax-ed over
    the L*P samples of each head; ``value_proj`` / ``output_proj`` are C -> C Linears.
    Initialisation as Deformable DETR: offset weights 0 and a bias that places point p of head
    m at ``(p + 1) * dir_m`` (dir_m on the unit square's border at angle ``2 pi m / M``),
    attention weights and biases 0, Xavier-uniform value/output projections with zero bias.

    Args:
        d_model: channels C (divisible by ``n_heads``).
        n_levels: levels L.
        n_heads: heads M.
        n_points: sampling points P per head and level.

    Raises:
        ValueError: ``d_model`` not divisible by ``n_heads``.

    Shapes (forward): ``query`` (N, Lq, C), ``reference_points`` (N or 1, Lq, L, 2) ``(x, y)``
    in [0, 1], ``input_flatten`` (N, S, C) with ``S = sum(H_l W_l)``, ``spatial_shapes``
    ``[(H_l, W_l)]`` Python ints, ``input_padding_mask`` (N, S) bool (True = padding) or
    None -> (N, Lq, C); float32.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation (see the class docstring)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((grid * scale).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: list[tuple[int, int]],
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        normalizer = torch.tensor(
            [[float(w), float(h)] for h, w in spatial_shapes], dtype=query.dtype, device=query.device
        )
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn_core(value, spatial_shapes, locations, weights)
        return self.output_proj(out)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm deformable transformer encoder layer (Deformable DETR / Mask2Former).

    ``src = norm1(src + self_attn(src + pos, ref, src))``;
    ``src = norm2(src + linear2(relu(linear1(src))))``. Keys ``self_attn.*``, ``norm1``,
    ``linear1`` (ffn_dim, C), ``linear2`` (C, ffn_dim), ``norm2``.

    Args:
        d_model: channels C.
        ffn_dim: hidden width of the FFN.
        dropout: dropout after attention / in the FFN (0.0 in Mask2Former's pixel decoder).
        n_levels, n_heads, n_points: as :class:`MSDeformAttn`.

    Shapes (forward): ``src`` and ``pos`` (N, S, C), ``reference_points`` (N or 1, S, L, 2),
    ``spatial_shapes`` Python ints -> (N, S, C) float32.
    """

    def __init__(
        self,
        d_model: int = 256,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class MSDeformAttnEncoder(nn.Module):
    """A stack of :class:`MSDeformAttnEncoderLayer` stored as ``layers.{i}``.

    Shapes (forward): as :class:`MSDeformAttnEncoderLayer`.
    """

    def __init__(self, num_layers: int, **layer_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MSDeformAttnEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def get_reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
        """Pixel-centre reference points of every level, valid ratios 1.

        Returns (1, S, L, 2) float32: for the pixel ``(i, j)`` of a level of size ``(H, W)``,
        ``((j + 0.5) / W, (i + 0.5) / H)``, repeated for all L levels (Mask2Former's
        ``get_reference_points`` with unpadded inputs).
        """
        refs = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            ref_y = ys[:, None].expand(h, w).reshape(-1)
            ref_x = xs[None, :].expand(h, w).reshape(-1)
            refs.append(torch.stack((ref_x, ref_y), -1))
        ref = torch.cat(refs, 0)
        return ref[None, :, None, :].expand(1, ref.shape[0], len(spatial_shapes), 2)

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: list[tuple[int, int]]) -> Tensor:
        reference_points = self.get_reference_points(spatial_shapes, src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Mask2Former's ``MSDeformAttnTransformerEncoderOnly``: flattens levels, adds level embeddings, encodes.

    Keys: ``level_embed`` (L, C) nn.Parameter, ``encoder.layers.{i}.*``.

    Args:
        d_model: channels C.
        nhead, num_encoder_layers, dim_feedforward, dropout, num_feature_levels, enc_n_points:
            as the reference.

    Shapes (forward): ``srcs`` and ``pos_embeds``: L tensors (B, C, H_l, W_l) float32 ->
    ``(memory (B, S, C), spatial_shapes [(H_l, W_l)] Python ints)``.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_feature_levels: int = 3,
        enc_n_points: int = 4,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.encoder = MSDeformAttnEncoder(
            num_encoder_layers,
            d_model=d_model,
            ffn_dim=dim_feedforward,
            dropout=dropout,
            n_levels=num_feature_levels,
            n_heads=nhead,
            n_points=enc_n_points,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform for all matrices, then MSDeformAttn's own init, then N(0, 1) level embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for mod in self.modules():
            if isinstance(mod, MSDeformAttn):
                mod.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], pos_embeds: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        flat_src = []
        flat_pos = []
        spatial_shapes: list[tuple[int, int]] = []
        for lvl, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            h, w = int(src.shape[-2]), int(src.shape[-1])
            spatial_shapes.append((h, w))
            flat_src.append(src.flatten(2).transpose(1, 2))
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        memory = self.encoder(torch.cat(flat_src, 1), torch.cat(flat_pos, 1), spatial_shapes)
        return memory, spatial_shapes


# --------------------------------------------------------------------------------------------
# Pixel decoders
# --------------------------------------------------------------------------------------------


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's ``MSDeformAttnPixelDecoder`` (pure PyTorch), official key layout.

    1. ``input_proj.{0,1,2}`` = [1x1 conv with bias, GroupNorm] on res5, res4, res3 (in that
       order) to ``conv_dim``.
    2. ``transformer``: ``num_layers`` post-norm deformable encoder layers over the three
       levels flattened together (tokens ordered res5, res4, res3), positions = normalised
       sine embedding (``PositionEmbeddingSine(conv_dim // 2)``) + ``transformer.level_embed``,
       reference points at pixel centres; split back to the 1/32, 1/16, 1/8 maps.
    3. one FPN level: ``adapter_1`` (1x1 conv, no bias, ``.norm`` GN) on res2 + bilinear
       upsampling (align_corners=False) of the 1/8 map, then ``layer_1`` (3x3 conv, no bias,
       ``.norm`` GN, ReLU); ``mask_features`` = 1x1 conv with bias on the result.

    Runs in float32 (inputs are cast), as the reference's ``autocast(enabled=False)``. With R50
    inputs and the defaults it has 6.036 M parameters (spec §5.3).

    Args:
        in_channels: backbone channels, keys ``res2..res5``.
        conv_dim: channels of the encoder / multi-scale maps (divisible by ``num_groups``,
            ``num_heads`` and 4).
        mask_dim: channels of ``mask_features``.
        num_layers: encoder layers.
        num_heads, num_points: deformable attention heads / points per level.
        ffn_dim: encoder FFN width (hard-coded 1024 in Mask2Former).
        num_groups: GroupNorm groups.
        dropout: encoder dropout (0.0 in Mask2Former).

    Raises:
        ValueError: missing ``in_channels`` keys or indivisible ``conv_dim``.

    Shapes: see the module docstring; ``features`` must hold ``res2..res5`` (KeyError
    otherwise), with strides 4/8/16/32 of the same image.
    """

    def __init__(
        self,
        in_channels: dict[str, int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        num_groups: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_in_channels(in_channels)
        _check_groups(conv_dim, num_groups)
        if conv_dim % num_heads != 0:
            raise ValueError(f"conv_dim {conv_dim} must be divisible by num_heads {num_heads}")
        if conv_dim % 4 != 0:
            raise ValueError(f"conv_dim {conv_dim} must be divisible by 4 (sine position embedding)")
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.transformer_in_features = ("res5", "res4", "res3")
        self.num_feature_levels = len(self.transformer_in_features)
        self.input_proj = nn.ModuleList()
        for name in self.transformer_in_features:
            proj = nn.Sequential(
                nn.Conv2d(in_channels[name], conv_dim, kernel_size=1), nn.GroupNorm(num_groups, conv_dim)
            )
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            nhead=num_heads,
            num_encoder_layers=num_layers,
            dim_feedforward=ffn_dim,
            dropout=dropout,
            num_feature_levels=self.num_feature_levels,
            enc_n_points=num_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        _xavier_fill_(self.mask_features)
        self.adapter_1 = Conv2dNorm(
            in_channels["res2"], conv_dim, 1, bias=False, norm=nn.GroupNorm(num_groups, conv_dim)
        )
        self.layer_1 = Conv2dNorm(
            conv_dim, conv_dim, 3, padding=1, bias=False, norm=nn.GroupNorm(num_groups, conv_dim), relu=True
        )
        _xavier_fill_(self.adapter_1)
        _xavier_fill_(self.layer_1)

    @_autocast_off
    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        srcs = []
        pos = []
        for idx, name in enumerate(self.transformer_in_features):
            x = features[name].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        memory, spatial_shapes = self.transformer(srcs, pos)
        bs = memory.shape[0]
        chunks = memory.split([h * w for h, w in spatial_shapes], dim=1)
        multi_scale = [
            z.transpose(1, 2).reshape(bs, self.conv_dim, h, w) for z, (h, w) in zip(chunks, spatial_shapes)
        ]
        res2 = features["res2"].float()
        cur = self.adapter_1(res2)
        size = (int(res2.shape[-2]), int(res2.shape[-1]))
        y = cur + F.interpolate(multi_scale[-1], size=size, mode="bilinear", align_corners=False)
        y = self.layer_1(y)
        return self.mask_features(y), multi_scale


class SeparableConvGNReLU(nn.Module):
    """Depthwise 3x3 conv + pointwise 1x1 conv (both without bias) + GroupNorm + ReLU.

    Keys ``depthwise.weight`` (C, 1, 3, 3), ``pointwise.weight`` (C_out, C, 1, 1),
    ``norm.{weight,bias}``.

    Shapes: (B, C, H, W) float32 -> (B, C_out, H, W) float32.
    """

    def __init__(self, channels: int, out_channels: int, num_groups: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.norm = nn.GroupNorm(num_groups, out_channels)
        _xavier_fill_(self.depthwise)
        _xavier_fill_(self.pointwise)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.pointwise(self.depthwise(x))), inplace=True)


class FPNPixelDecoder(nn.Module):
    """Light FPN pixel decoder for CPU / Jetson (MaskFormer's ``BasePixelDecoder``, lighter).

    ``lateral_convs.{res2..res5}``: 1x1 conv (no bias) + GN (``.norm``) to ``conv_dim``.
    Top-down from res5: ``y5 = out5(lat5(res5))``, ``y_k = out_k(lat_k(res_k) + up(y_{k+1}))``
    with bilinear upsampling (align_corners=False) to the exact size of level k, where
    ``output_convs.{res2..res5}`` are :class:`SeparableConvGNReLU`. ``mask_features``: 1x1 conv
    with bias on ``y2``; ``multi_scale_features`` = ``[y5, y4, y3]``.

    Args:
        in_channels: backbone channels, keys ``res2..res5``.
        conv_dim: FPN channels (divisible by ``num_groups``).
        mask_dim: channels of ``mask_features``.
        num_groups: GroupNorm groups.

    Raises:
        ValueError: missing ``in_channels`` keys or ``conv_dim`` not divisible by ``num_groups``.

    Shapes: see the module docstring (float32; inputs are cast).
    """

    def __init__(
        self, in_channels: dict[str, int], conv_dim: int = 128, mask_dim: int = 128, num_groups: int = 32
    ) -> None:
        super().__init__()
        _check_in_channels(in_channels)
        _check_groups(conv_dim, num_groups)
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.lateral_convs = nn.ModuleDict()
        self.output_convs = nn.ModuleDict()
        for name in FEATURE_NAMES:
            lateral = Conv2dNorm(in_channels[name], conv_dim, 1, bias=False, norm=nn.GroupNorm(num_groups, conv_dim))
            _xavier_fill_(lateral)
            self.lateral_convs[name] = lateral
            self.output_convs[name] = SeparableConvGNReLU(conv_dim, conv_dim, num_groups)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        _xavier_fill_(self.mask_features)

    @_autocast_off
    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        outs: list[Tensor] = []
        y: Tensor | None = None
        for name in FEATURE_NAMES[::-1]:
            cur = self.lateral_convs[name](features[name].float())
            if y is not None:
                size = (int(cur.shape[-2]), int(cur.shape[-1]))
                cur = cur + F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            y = self.output_convs[name](cur)
            outs.append(y)
        return self.mask_features(outs[-1]), outs[:3]


def build_pixel_decoder(cfg: PixelDecoderConfig, in_channels: dict[str, int]) -> nn.Module:
    """Build the pixel decoder named by ``cfg.type``.

    Args:
        cfg: ``type`` ``"msdeformattn"`` (uses conv_dim, mask_dim, num_layers, num_heads,
            num_points, ffn_dim, num_groups) or ``"fpn"`` (uses conv_dim, mask_dim, num_groups).
        in_channels: the backbone's ``out_channels`` (keys ``res2..res5``).

    Returns:
        a module following this file's contract.

    Raises:
        ValueError: unknown ``type`` or invalid sizes.
    """
    kind = cfg.type.lower()
    if kind == "msdeformattn":
        return MSDeformAttnPixelDecoder(
            in_channels,
            conv_dim=cfg.conv_dim,
            mask_dim=cfg.mask_dim,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            num_points=cfg.num_points,
            ffn_dim=cfg.ffn_dim,
            num_groups=cfg.num_groups,
        )
    if kind == "fpn":
        return FPNPixelDecoder(in_channels, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim, num_groups=cfg.num_groups)
    raise ValueError(f"unknown pixel decoder type {cfg.type!r}; expected 'msdeformattn' or 'fpn'")
