"""Swin Transformer backbone in the key layout of Mask2Former's ``D2SwinTransformer``.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV
2021; the semantic-segmentation variant that Mask2Former and the official MPVSS Swin-T/S/B/L
models use (``docs/mpvss_architecture.md`` sections 0 and 5.2): no absolute position embedding,
a LayerNorm after the patch embedding, one LayerNorm per output stage (``norm0..norm3``), and
windows that are zero-padded on the bottom and right instead of shrunk on small inputs.

State-dict keys (the parent module adds ``backbone.``): ``patch_embed.proj.*`` (C, 3, 4, 4),
``patch_embed.norm.*``; ``layers.{s}.blocks.{b}.{norm1, attn.qkv (3C', C'), attn.proj,
attn.relative_position_bias_table ((2M-1)^2, heads), attn.relative_position_index (M^2, M^2),
norm2, mlp.fc1 (4C', C'), mlp.fc2}`` for stage width C' = C * 2^s and window M;
``layers.{s}.downsample.{norm (4C'), reduction (2C', 4C'), no bias}`` for s < 3; ``norm{0..3}.*``.
``relative_position_index`` is a persistent buffer, as in the official checkpoints; the
shifted-window attention masks depend on the input size and are computed in ``forward``.

Everything exports to ONNX (opset 17) at a fixed input size: Conv, LayerNorm, MatMul, Softmax,
GELU (as Erf), Gather, Pad, Slice/Concat (``torch.roll``), Where/Equal/Expand; no data-dependent
control flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PatchEmbed",
    "WindowAttention",
    "SwinBlock",
    "PatchMerging",
    "SwinStage",
    "SwinTransformer",
    "relative_position_index",
    "shifted_window_mask",
    "MASKED_ATTENTION_BIAS",
]

#: The additive attention bias between tokens of different regions inside one shifted window
#: (Swin's value: a large negative number, not -inf, so a row is never all -inf).
MASKED_ATTENTION_BIAS = -100.0


def relative_position_index(window_size: int) -> Tensor:
    """Index into the relative-position bias table for every pair of tokens of a window.

    Token i = (row r_i, column c_i) in row-major order; the pair (i, j) reads entry
    ``(r_i - r_j + M - 1) * (2M - 1) + (c_i - c_j + M - 1)`` (Swin, section 3.2).

    Args:
        window_size: M, the window side in tokens (>= 1).

    Returns:
        (M^2, M^2) int64, values in [0, (2M - 1)^2).
    """
    m = window_size
    rows, cols = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
    coords = torch.stack((rows.flatten(), cols.flatten()))  # (2, M^2)
    rel = coords[:, :, None] - coords[:, None, :] + (m - 1)  # (2, M^2, M^2), both in [0, 2M-2]
    return rel[0] * (2 * m - 1) + rel[1]


def shifted_window_mask(height: int, width: int, window_size: int, shift: int,
                        device: torch.device | None = None) -> Tensor:
    """Attention bias of a shifted-window block: tokens that the cyclic shift brought together
    from different image regions do not attend to each other.

    Args:
        height, width: the padded token grid (multiples of ``window_size``), in tokens.
        window_size: M, in tokens.
        shift: the cyclic shift, in tokens (M // 2 in Swin), 0 < shift < M.
        device: where to build it.

    Returns:
        (nW, M^2, M^2) float32 with nW = height * width / M^2 windows in row-major order:
        0 within a region, :data:`MASKED_ATTENTION_BIAS` across regions.

    Raises:
        ValueError: sizes that are not multiples of ``window_size``, or a shift outside (0, M).
    """
    m = window_size
    if height % m or width % m:
        raise ValueError(f"the token grid {height} x {width} must be a multiple of the window {m}")
    if not 0 < shift < m:
        raise ValueError(f"the shift must lie in (0, {m}), got {shift}")
    # Built in numpy: a size-dependent constant, which an ONNX export embeds instead of tracing.
    region = np.zeros((height, width), dtype=np.int64)
    bands = (slice(0, -m), slice(-m, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            region[rows, cols] = 3 * i + j
    windows = region.reshape(height // m, m, width // m, m).transpose(0, 2, 1, 3).reshape(-1, m * m)  # (nW, M^2)
    different = windows[:, :, None] != windows[:, None, :]
    return torch.from_numpy(different.astype(np.float32) * MASKED_ATTENTION_BIAS).to(device)


def _partition(x: Tensor, m: int) -> Tensor:
    """(B, H, W, C) -> (B * H/m * W/m, m*m, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, m * m, c)


def _merge(windows: Tensor, m: int, h: int, w: int) -> Tensor:
    """The inverse of :func:`_partition`: (B * h/m * w/m, m*m, C) -> (B, h, w, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // m, w // m, m, m, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` patches to tokens: a strided convolution, then LayerNorm.

    An input side that is not a multiple of ``patch`` is zero-padded on the bottom / right.

    Shapes: (B, 3, H, W) float32 -> (B, ceil(H/p) * ceil(W/p), C) float32 and the token grid
    (ceil(H/p), ceil(W/p)).
    """

    def __init__(self, embed_dim: int, patch: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        p = self.patch
        h, w = x.shape[-2:]
        if h % p or w % p:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative-position bias (Swin,
    section 3.2). Scale ``head_dim ** -0.5``; query, key and value from one biased linear layer.

    Args:
        dim: token width C.
        num_heads: heads; ``dim`` must be a multiple.
        window_size: M, the window side in tokens.

    Shapes: ``forward(x, mask)`` with x (B * nW, M^2, C) float32 and mask None or
    (nW, M^2, M^2) float32 (added to the logits of every image's nW windows) -> (B * nW, M^2, C).

    Raises:
        ValueError: ``dim`` not a multiple of ``num_heads``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the width {dim} must be a multiple of the number of heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        bw, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(n, n, heads).permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # (1, heads, N, N)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias + mask[:, None].to(q.dtype)).expand(bw // nw, nw, heads, n, n).reshape(bw, heads, n, n)
        # softmax(q k^T / sqrt(d) + bias) v in one fused kernel: the explicit matmul-softmax-matmul
        # of the official code took 1.45x as long in the Swin-T backbone at 480 x 864 on 2 CPU
        # threads, and the outputs differ by rounding (4.5e-6 of values up to 5 with random weights).
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(bw, n, c))


class _Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (keys ``fc1.*``, ``fc2.*``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample, scale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class SwinBlock(nn.Module):
    """One Swin block: (shifted-)window attention and an MLP, each pre-norm with a residual.

    The token grid is zero-padded on the bottom / right to a multiple of the window after
    ``norm1`` (the padded tokens take part in the attention, as in the official code), then
    cyclically shifted by ``shift`` tokens when ``shift > 0``.

    Args:
        dim: token width C; num_heads, window_size: as :class:`WindowAttention`.
        shift: cyclic shift in tokens, 0 (W-MSA) or M // 2 (SW-MSA).
        mlp_ratio: MLP hidden width / C.
        drop_path: stochastic-depth rate (training only).

    Shapes: ``forward(x, grid, mask)`` with x (B, H*W, C) float32, grid (H, W) in tokens, mask
    the stage's :func:`shifted_window_mask` for the padded grid (used when ``shift > 0``)
    -> (B, H*W, C).

    Raises:
        ValueError: ``shift`` outside [0, ``window_size``).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int = 0,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        if not 0 <= shift < window_size:
            raise ValueError(f"the shift must lie in [0, {window_size}), got {shift}")
        self.window_size = window_size
        self.shift = shift
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, grid: tuple[int, int], mask: Tensor | None) -> Tensor:
        h, w = grid
        b, _, c = x.shape
        m, s = self.window_size, self.shift
        y = self.norm1(x).view(b, h, w, c)
        pad_b, pad_r = (m - h % m) % m, (m - w % m) % m
        if pad_b or pad_r:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = _merge(self.attn(_partition(y, m), mask if s else None), m, hp, wp)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        y = y[:, :h, :w, :].reshape(b, h * w, c)
        x = x + _drop_path(y, self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """Halve the token grid and double the width: each 2 x 2 group of tokens is concatenated
    (order (0,0), (1,0), (0,1), (1,1) as row, column), normalised and linearly reduced from 4C to
    2C without bias. An odd side is zero-padded first.

    Shapes: (B, H*W, C) float32, grid (H, W) in tokens -> (B, ceil(H/2) * ceil(W/2), 2C) float32.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        h, w = grid
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat((x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]), dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``depth`` blocks alternating window and shifted-window attention, then an optional
    :class:`PatchMerging` (keys ``blocks.{b}.*``, ``downsample.*``).

    Args:
        dim: token width C.
        depth: blocks; odd-numbered ones (from 0) shift their windows by ``window_size // 2``.
        num_heads: attention heads of each block.
        window_size: M, the window side in tokens.
        mlp_ratio: MLP hidden width / C.
        drop_paths: one stochastic-depth rate per block (training only).
        downsample: end with a :class:`PatchMerging`.

    Shapes: ``forward(x, grid)`` with x (B, H*W, C) float32 and grid (H, W) in tokens -> (the
    stage output (B, H*W, C), the next stage's input (B, H'*W', 2C) or the output again when there
    is no downsampling, the next grid (H', W')), float32.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_paths: Sequence[float], downsample: bool) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift = window_size // 2
        # the last shifted-window mask, keyed by (padded grid, device, dtype): a video's frames
        # share one size, and building it costs about 20 ms a key frame for Swin-B at 480 x 864
        self._mask: tuple[tuple[Any, ...], Tensor] | None = None
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, shift=0 if i % 2 == 0 else self.shift,
                      mlp_ratio=mlp_ratio, drop_path=drop_paths[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, tuple[int, int]]:
        m = self.window_size
        h, w = grid
        mask = None
        if self.shift and len(self.blocks) > 1:
            key = (-(-h // m) * m, -(-w // m) * m, x.device, x.dtype)
            if self._mask is None or self._mask[0] != key:
                self._mask = (key, shifted_window_mask(key[0], key[1], m, self.shift, x.device).to(x.dtype))
            mask = self._mask[1]
        out = x
        for block in self.blocks:
            out = block(out, grid, mask)
        if self.downsample is None:
            return out, out, grid
        return out, self.downsample(out, grid), ((h + 1) // 2, (w + 1) // 2)


class SwinTransformer(nn.Module):
    """Swin Transformer returning ``res2..res5`` (the contract of :mod:`mpvss_ros.nn.backbones`).

    Args:
        embed_dim: C, the width of the first stage (96 Swin-T/S, 128 Swin-B, 192 Swin-L).
        depths: blocks per stage (2, 2, 6, 2 Swin-T; 2, 2, 18, 2 Swin-S/B/L).
        num_heads: heads per stage (3, 6, 12, 24 T/S; 4, 8, 16, 32 B; 6, 12, 24, 48 L).
        window_size: M, in tokens (7 T/S, 12 B/L in the official MPVSS configs).
        mlp_ratio: MLP hidden width / stage width (4).
        drop_path_rate: the stochastic-depth rate of the last block, rising linearly from 0 over
            all blocks (official 0.3; training only).

    Raises:
        ValueError: not four stages, a stage width that is not a multiple of its heads, or a
            window below 1.

    Shapes: x (B, 3, H, W) float32, normalised -> ``{"res2": (B, C, ceil(H/4), ceil(W/4)),
    "res3": (B, 2C, .../8), "res4": (B, 4C, .../16), "res5": (B, 8C, .../32)}`` float32 (exact
    quarters, eighths, ... for H, W multiples of 32).
    """

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.3) -> None:
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"Swin needs 4 stages (res2..res5): depths {list(depths)}, num_heads {list(num_heads)}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.patch_embed = PatchEmbed(embed_dim)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # torch.linspace(0, rate, total)
        self.layers = nn.ModuleList()
        self.out_channels: dict[str, int] = {}
        start = 0
        for s, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**s
            self.layers.append(SwinStage(dim, depth, heads, window_size, mlp_ratio, rates[start:start + depth],
                                         downsample=s < 3))
            start += depth
            self.add_module(f"norm{s}", nn.LayerNorm(dim))
            self.out_channels[f"res{s + 2}"] = dim
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        tokens, grid = self.patch_embed(x)
        out: dict[str, Tensor] = {}
        for s, stage in enumerate(self.layers):
            y, tokens, next_grid = stage(tokens, grid)
            y = getattr(self, f"norm{s}")(y)
            out[f"res{s + 2}"] = y.view(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
            grid = next_grid
        return out


def _init_weights(module: nn.Module) -> None:
    """Swin's initialisation: truncated normal (std 0.02) linear weights, zero biases, LayerNorm
    1 / 0; the patch convolution keeps PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
