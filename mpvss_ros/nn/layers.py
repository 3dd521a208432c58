"""Small building blocks shared by the segmentor and the motion module.

Attribute names follow Mask2Former / MPVSS (detectron2) so that official state-dict keys map
one to one: ``MLP.layers.{i}``, ``SelfAttentionLayer.{self_attn,norm}``,
``CrossAttentionLayer.{multihead_attn,norm}``, ``FFNLayer.{linear1,linear2,norm}`` and
``ConvAct.conv`` (the mmcv ``ConvModule`` layout).

All attention layers use the sequence-first layout of :class:`torch.nn.MultiheadAttention`:
tensors are ``(L, B, C)`` float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "PositionEmbeddingSine",
    "SelfAttentionLayer",
    "CrossAttentionLayer",
    "FFNLayer",
    "ConvAct",
]


class MLP(nn.Module):
    """A stack of Linear layers with ReLU between them (no activation after the last).

    Key layout ``layers.{i}.{weight,bias}`` as Mask2Former's ``MLP``.

    Args:
        in_dim: input features.
        hidden_dim: features of every hidden layer.
        out_dim: output features.
        num_layers: number of Linear layers (>= 1).

    Shapes: ``(..., in_dim) -> (..., out_dim)``, any float dtype.

    Raises:
        ValueError: ``num_layers < 1``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x, inplace=True)  # the Linear's fresh output
        return x


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine position embedding (DETR, Carion et al. 2020; as in Mask2Former).

    Depends only on the spatial size of its input, not on its values.

    Args:
        num_pos_feats: features per axis; the output has ``2 * num_pos_feats`` channels.
        temperature: the 10000 of the transformer's sinusoid.
        normalize: scale cumulative positions to ``[0, 2*pi]`` (always True in Mask2Former).

    Shapes: ``x`` (B, C, H, W) -> (B, 2*num_pos_feats, H, W) float32. Channels are
    ``[pos_y, pos_x]`` with interleaved sin/cos, as the reference.

    The embedding of each (H, W, device) is computed once and kept (at most
    :attr:`cache_size` sizes; eager mode only, a ``torch.jit`` trace computes it in the graph):
    the result is a shared tensor (expanded over B), so callers must not write into it.
    Recomputing the three levels of the motion decoder cost about 0.3 ms per non-key frame
    (2 CPU threads).
    """

    #: Spatial sizes whose embedding is kept; the cache is emptied when a new size would exceed it.
    cache_size = 16

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, normalize: bool = True) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi
        self._cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            return self._embed(x.shape[0], x.shape[-2], x.shape[-1], x.device)
        b, h, w = int(x.shape[0]), int(x.shape[-2]), int(x.shape[-1])
        key = (h, w, x.device)
        pos = self._cache.get(key)
        if pos is None:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            # A plain tensor even when the first call runs under inference_mode (training reuses it).
            with torch.inference_mode(False), torch.no_grad():
                pos = self._cache[key] = self._embed(1, h, w, x.device)
        return pos.expand(b, -1, -1, -1)

    def _embed(self, b: int, h: int, w: int, device: torch.device) -> Tensor:
        ones = torch.ones((b, h, w), dtype=torch.float32, device=device)
        y_embed = ones.cumsum(1)
        x_embed = ones.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def _xavier_(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention block: ``norm(x + MHA(x + pos, x + pos, x))``.

    Mask2Former's ``SelfAttentionLayer`` (the segmentor decoder, spec §1.3) and the motion
    decoder's joint self-attention over [flow queries; motion tokens] (spec §2.3).

    Args:
        d_model: feature size C.
        nhead: attention heads (C must divide by it).
        dropout: attention dropout (0.0 at MPVSS inference).

    Shapes: ``tgt`` (L, B, C), ``query_pos`` (L, B, C) or None -> (L, B, C), sequence first;
    any float dtype (float32 in the reference).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_(self)

    def forward(self, tgt: Tensor, query_pos: Tensor | None = None) -> Tensor:
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        return self.norm(tgt + self.dropout(tgt2))


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention block with an optional attention mask (masked attention).

    Mask2Former's ``CrossAttentionLayer``, the masked cross-attention of the segmentor decoder
    (spec §1.3); the motion decoder has none (spec §2.3).

    Args:
        d_model: feature size C.
        nhead: attention heads.
        dropout: attention dropout.

    Shapes: ``tgt`` (Lq, B, C); ``memory`` (Lk, B, C); ``memory_mask`` (B*nhead, Lq, Lk) bool,
    True = blocked, or None; ``pos`` (Lk, B, C); ``query_pos`` (Lq, B, C). Returns (Lq, B, C).
    Any float dtype (float32 in the reference).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        tgt2 = self.multihead_attn(
            query=_with_pos(tgt, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            need_weights=False,
        )[0]
        return self.norm(tgt + self.dropout(tgt2))


class FFNLayer(nn.Module):
    """Post-norm feed-forward block: ``norm(x + linear2(relu(linear1(x))))``.

    Mask2Former's ``FFNLayer`` (FFN 2048 in the segmentor decoder and the motion decoder,
    spec §0, §2.3).

    Args:
        d_model: feature size C.
        dim_feedforward: hidden features of the FFN.
        dropout: dropout after the activation and on the residual branch (0.0 at MPVSS inference).

    Shapes: (..., d_model) -> (..., d_model), any float dtype (float32 in the reference).
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_(self)

    def forward(self, tgt: Tensor) -> Tensor:
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm(tgt + self.dropout(tgt2))


class ConvAct(nn.Module):
    """A convolution stored as ``.conv`` followed by an optional LeakyReLU (mmcv ``ConvModule``;
    the motion encoder's and decoder's convolutions, spec §2.2, §2.4, §5.2).

    Args:
        in_ch, out_ch: channels.
        kernel_size, stride, padding: as :class:`torch.nn.Conv2d`.
        bias: whether the convolution has a bias.
        transposed: use :class:`torch.nn.ConvTranspose2d` (weight layout (in, out, k, k)).
        negative_slope: LeakyReLU slope; None for no activation.

    Shapes: (B, in_ch, H, W) -> (B, out_ch, H', W') float32.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = True,
        transposed: bool = False,
        negative_slope: float | None = 0.1,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = (kernel_size - 1) // 2
        conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = conv_cls(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias)
        self.negative_slope = negative_slope
        nonlinearity = "leaky_relu" if negative_slope is not None else "linear"
        nn.init.kaiming_normal_(self.conv.weight, a=negative_slope or 0.0, nonlinearity=nonlinearity)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.negative_slope is not None:
            x = F.leaky_relu(x, self.negative_slope, inplace=True)  # the convolution's fresh output
        return x
