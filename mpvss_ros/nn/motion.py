"""MPVSS motion module: FlowNetS encoder, joint-attention motion decoder, query-based flow.

On a non-key frame MPVSS estimates one backward flow per key-frame segment (query) and warps
that segment's mask logits with it (spec ``docs/mpvss_architecture.md`` §1.5, §2). This file
holds the three modules that compute the flows:

* :class:`MotionEncoder` — the FlowNetS conv tower on ``cat[current, key]`` (§2.2);
* :class:`MotionDecoder` — a joint self-attention transformer over the key frame's queries
  and the conv6/conv5/conv4 tokens (§2.3), the FlowNetS refinement giving a pixel-wise flow
  (§2.4), query-based flows from a per-pixel "motion map" (§2.5), and their fusion (§2.6);
* :class:`MotionModule` — pre-processing of the image pair (§2.1) plus encoder and decoder,
  with children ``encoder``/``decoder`` so that official keys ``motion.encoder.*`` and
  ``motion.decoder.*`` (§5.2) load one to one under a parent attribute ``motion``.

Flow convention everywhere: ``(..., 2, h, w)`` float32, channel 0 = x (column) displacement,
channel 1 = y (row) displacement, in pixels of the flow grid (the encoder's conv2 grid, 1/8
of the image for the official ``image_scale`` 0.5). The flow points from the current frame
to the key frame: a key-frame map is backward-warped by sampling it at ``p + flow(p)``.

Export notes (§6.1, §6.3): no data-dependent control flow, no in-place writes, interpolation
with an explicit ``size=`` of Python ints, the query flows use ``matmul`` rather than einsum,
and the per-pixel MLP runs channels-last (MatMul/Gemm). Input checks are skipped while
``torch.jit`` traces, so a trace carries no Python-boolean constants from them.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpvss_ros.config import MotionConfig
from mpvss_ros.nn.layers import MLP, ConvAct, FFNLayer, PositionEmbeddingSine, SelfAttentionLayer

__all__ = [
    "MotionOutput",
    "MotionEncoder",
    "MotionDecoder",
    "MotionModule",
    "crop_like",
]

#: Number of encoder levels that the motion transformer refines (conv6, conv5, conv4).
_NUM_QUERY_LEVELS = 3
#: Stride of conv2 with respect to the (rescaled) flow input: conv1 and conv2 both stride 2.
_CONV2_STRIDE = 4


class MotionOutput(NamedTuple):
    """Output of :class:`MotionDecoder` / :class:`MotionModule`.

    Attributes:
        flows: (B, N, 2, h, w) float32 — one fused flow per query (spec §2.6), channel 0 = x,
            channel 1 = y, in pixels of the conv2 grid (h, w).
        pixel_flow: (B, 2, h, w) float32 — the FlowNetS pixel-wise flow before fusion (§2.4),
            same units and channel order.
    """

    flows: Tensor
    pixel_flow: Tensor


def _checking() -> bool:
    """True when Python-side input checks should run (not while ``torch.jit`` traces)."""
    return not torch.jit.is_tracing()


def flow_grid_size(image_scale: float, height: int, width: int) -> tuple[int, int]:
    """Size (h, w) of the motion module's flow grid for a padded image of (height, width) pixels.

    The pair is resized to ``(int(H*s), int(W*s))``; conv1 and conv2 (stride 2, 'same' padding)
    each map n to ceil(n / 2). For the official s = 0.5 and H, W multiples of 32: (H/8, W/8).
    """
    h, w = int(height * image_scale), int(width * image_scale)
    return ((h + 1) // 2 + 1) // 2, ((w + 1) // 2 + 1) // 2


def crop_like(x: Tensor, target: Tensor) -> Tensor:
    """Crop ``x`` at the bottom/right to the spatial size of ``target`` (FlowNetS ``crop_like``).

    Used after the stride-2 transposed convolutions of the refinement (spec §2.4), whose
    output (2h') can exceed an odd skip map (2h'-1). A plain slice, no copy, no in-place write.

    Args:
        x: (B, C, H, W) tensor, any dtype.
        target: (B', C', h, w) tensor whose size is kept; requires h <= H and w <= W.

    Returns:
        (B, C, h, w) view of ``x``.

    Raises:
        ValueError: ``target`` is larger than ``x`` (outside ``torch.jit`` tracing).
    """
    h, w = target.shape[-2], target.shape[-1]
    if _checking() and (h > x.shape[-2] or w > x.shape[-1]):
        raise ValueError(f"crop_like: target size {(h, w)} exceeds input size {tuple(x.shape[-2:])}")
    return x[:, :, :h, :w]


class MotionEncoder(nn.Module):
    """FlowNetS conv tower of MPVSS (``MotionEnc``, mmtrack FlowNetSimple encoder; spec §2.2).

    Six blocks ``conv1``..``conv6``, each an ``nn.Sequential`` of :class:`ConvAct` (Conv2d with
    bias, LeakyReLU 0.1, no norm). Kernels 7, 5, 5, 3, 3, 3; convs per block 1, 1, 2, 2, 2, 2;
    the first conv of every block has stride 2, the others stride 1 (the second conv of conv3
    is 3x3); padding (k-1)//2. Keys: ``conv{i}.{j}.conv.{weight,bias}``, e.g.
    ``conv1.0.conv.weight`` (64, 6, 7, 7) and ``conv3.1.conv.weight`` (256, 256, 3, 3) for the
    official channels. The official encoder has 24.051 M parameters (§5.3).

    Args:
        channels: output channels of conv1..conv6 (``MotionConfig.encoder_channels``; official
            ``[64, 128, 256, 512, 512, 1024]``). The input has 6 channels (two RGB frames).

    Raises:
        ValueError: ``channels`` does not have 6 positive entries.

    Attributes:
        out_channels: channels of the returned maps, ``[c2, c3, c4, c5, c6]``.
    """

    _KERNELS = (7, 5, 5, 3, 3, 3)
    _NUM_CONVS = (1, 1, 2, 2, 2, 2)
    in_channels = 6

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 6 or min(channels) < 1:
            raise ValueError(f"MotionEncoder needs 6 positive channel counts (conv1..conv6), got {channels}")
        in_ch = self.in_channels
        for i, (out_ch, k, n) in enumerate(zip(channels, self._KERNELS, self._NUM_CONVS), start=1):
            layers = []
            for j in range(n):
                kernel = k if j == 0 else 3
                layers.append(ConvAct(in_ch, out_ch, kernel, stride=2 if j == 0 else 1, bias=True, negative_slope=0.1))
                in_ch = out_ch
            self.add_module(f"conv{i}", nn.Sequential(*layers))
        self.out_channels = channels[1:]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Run the tower.

        Args:
            x: (B, 6, h, w) float32, the normalised, rescaled image pair (see
                :meth:`MotionModule.prepare_images`).

        Returns:
            ``[conv2, conv3, conv4, conv5, conv6]``, (B, c_k, h_k, w_k) float32 with
            h_k = ceil(h / 2**k) (strides 4..64 of the flow input, 8..128 of the image at the
            official scale 0.5).

        Raises:
            ValueError: ``x`` is not 4-D with 6 channels (outside ``torch.jit`` tracing).
        """
        if _checking() and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"MotionEncoder expects (B, 6, h, w), got {tuple(x.shape)}")
        outs = []
        for i in range(1, 7):
            x = getattr(self, f"conv{i}")(x)
            if i >= 2:
                outs.append(x)
        return outs


class MotionDecoder(nn.Module):
    """MPVSS motion decoder (``MotionDec``): query transformer, pixel flow, query flows, fusion.

    Follows spec §2.3-2.6:

    1. **Query transformer (§2.3).** conv6, conv5, conv4 (in that order, lowest resolution
       first) are projected by ``input_proj.{0,1,2}`` (1x1 conv with bias) to ``hidden``
       channels, get ``level_embed[l]`` and a normalised sine position embedding
       (``hidden // 2`` feats per axis). The flow queries start from ``query_init`` (the key
       frame's LayerNorm-ed decoder queries) with a learned ``query_embed``. Each of the
       ``num_layers`` layers (level ``i mod 3``) runs one *joint* self-attention over
       ``cat[query_feat + query_embed ; src_l + pos_l]`` (q = k = v, no masks, post-norm) and an
       FFN, and splits the result back. Positions are re-added at every visit and therefore
       accumulate in the features, as in the official code. There is no cross-attention.
       The refined maps replace conv4/conv5/conv6.
    2. **Pixel-wise flow (§2.4).** The FlowNetS refinement from conv6' down to the conv2 grid:
       per stage ``predict_flowK`` -> ``upsample_flowK-1`` and ``deconvK-1``, both cropped to the
       skip (``crop_like``) and concatenated as ``[skip, deconv, upsampled flow]`` (official
       sizes 386, 386, 386, 194); ``predict_flow`` gives (B, 2, h, w).
    3. **Query flows (§2.5).** The motion map is ``scale_layer`` (an MLP applied per pixel,
       channels-last) of the **raw** conv2 features (not a refined map): (B, 2E, h, w). The
       flow-query embedding is ``e = output_head(decoder_norm(query_feat))``, (B, N, E). The
       x-flow of query q is ``<e_q, M[E:2E]>`` (second half of the channels), the y-flow
       ``<e_q, M[0:E]>`` (first half), both computed with ``matmul``.
    4. **Fusion (§2.6).** ``fuse_layer`` (3x3 conv, 4 -> 2, with bias, no activation) on
       ``[pixel_x, pixel_y, query_x, query_y]`` per query. It is initialised to weight 0 and
       bias 1, so a freshly built decoder outputs the constant flow (+1, +1) everywhere.

    Args:
        cfg: motion configuration (widths, layers, heads).
        num_queries: N, number of flow queries; must equal the segmentor's object queries since
            the flow queries start from them (official 100).

    Raises:
        ValueError: inconsistent configuration (wrong list lengths, ``hidden_dim`` not divisible
            by ``num_heads`` or odd, non-positive sizes).

    Attributes:
        stage_channels: channels of the four refinement concatenations (official
            ``[386, 386, 386, 194]``).

    Official (R50/VSPW, S = 9, N = 100) size: 16.034 M parameters (12.089 M with 6 layers).
    """

    def __init__(self, cfg: MotionConfig, num_queries: int) -> None:
        super().__init__()
        enc = [int(c) for c in cfg.encoder_channels]
        dec = [int(c) for c in cfg.deconv_channels]
        hidden = int(cfg.hidden_dim)
        if len(enc) != 6 or len(dec) != 4:
            raise ValueError(f"MotionDecoder needs 6 encoder_channels and 4 deconv_channels, got {enc}, {dec}")
        if hidden < 4 or hidden % 4 or cfg.num_heads < 1 or hidden % cfg.num_heads:
            # the sine position embedding gives each axis hidden / 2 channels, half sine, half cosine
            raise ValueError(f"hidden_dim ({hidden}) must be a multiple of 4 and of num_heads ({cfg.num_heads})")
        if num_queries < 1 or cfg.num_layers < 1 or cfg.flow_embed_dim < 1 or cfg.mlp_hidden_dim < 1:
            raise ValueError(
                f"num_queries ({num_queries}), num_layers ({cfg.num_layers}), flow_embed_dim "
                f"({cfg.flow_embed_dim}) and mlp_hidden_dim ({cfg.mlp_hidden_dim}) must be >= 1"
            )
        self.hidden_dim = hidden
        self.num_queries = int(num_queries)
        self.num_layers = int(cfg.num_layers)
        self.flow_embed_dim = int(cfg.flow_embed_dim)
        c2, c3, c4, c5, c6 = enc[1:]
        self.in_channels = [c2, c3, c4, c5, c6]

        # --- query transformer (§2.3) ---
        self.pe_layer = PositionEmbeddingSine(hidden // 2, normalize=True)
        self.input_proj = nn.ModuleList(nn.Conv2d(c, hidden, kernel_size=1) for c in (c6, c5, c4))
        for proj in self.input_proj:
            nn.init.kaiming_uniform_(proj.weight, a=1)  # Caffe2 Xavier fill, as detectron2
            nn.init.zeros_(proj.bias)
        self.level_embed = nn.Embedding(_NUM_QUERY_LEVELS, hidden)
        self.query_embed = nn.Embedding(self.num_queries, hidden)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden, cfg.num_heads, dropout=0.0) for _ in range(self.num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden, cfg.ffn_dim, dropout=0.0) for _ in range(self.num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden)

        # --- query flow heads (§2.5) ---
        e, m = self.flow_embed_dim, int(cfg.mlp_hidden_dim)
        self.output_head = MLP(hidden, m, e, 3)
        self.scale_layer = MLP(c2, m, 2 * e, 3)

        # --- FlowNetS refinement (§2.4) ---
        # Skips from coarse to fine: conv5' and conv4' are refined (hidden ch), conv3, conv2 raw.
        skips = [hidden, hidden, c3, c2]
        stage_in = hidden  # conv6'
        self.stage_channels: list[int] = []
        for k, (skip, d) in zip((5, 4, 3, 2), zip(skips, dec)):
            self.add_module(
                f"predict_flow{k + 1}", ConvAct(stage_in, 2, 3, stride=1, padding=1, bias=False, negative_slope=None)
            )
            self.add_module(
                f"upsample_flow{k}",
                ConvAct(2, 2, 4, stride=2, padding=1, bias=False, transposed=True, negative_slope=None),
            )
            self.add_module(
                f"deconv{k}", ConvAct(stage_in, d, 4, stride=2, padding=1, bias=False, transposed=True, negative_slope=0.1)
            )
            stage_in = skip + d + 2
            self.stage_channels.append(stage_in)
        self.predict_flow = ConvAct(stage_in, 2, 3, stride=1, padding=1, bias=False, negative_slope=None)

        # --- fusion (§2.6): starts as the constant (+1, +1) flow ---
        self.fuse_layer = ConvAct(4, 2, 3, stride=1, padding=1, bias=True, negative_slope=None)
        nn.init.zeros_(self.fuse_layer.conv.weight)
        nn.init.ones_(self.fuse_layer.conv.bias)

    # ------------------------------------------------------------------------------------
    def _check_inputs(self, features: Sequence[Tensor], query_init: Tensor) -> None:
        if len(features) != 5:
            raise ValueError(f"MotionDecoder expects 5 feature maps (conv2..conv6), got {len(features)}")
        for name, f, c in zip(("conv2", "conv3", "conv4", "conv5", "conv6"), features, self.in_channels):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"MotionDecoder: {name} must be (B, {c}, h, w), got {tuple(f.shape)}")
        b = features[0].shape[0]
        if any(f.shape[0] != b for f in features):
            raise ValueError("MotionDecoder: feature maps have different batch sizes")
        expected = (self.num_queries, b, self.hidden_dim)
        if query_init.dim() != 3 or tuple(query_init.shape) != expected:
            raise ValueError(f"MotionDecoder: query_init must be (N, B, C) = {expected}, got {tuple(query_init.shape)}")

    def refine_features(self, features: Sequence[Tensor], query_init: Tensor) -> tuple[list[Tensor], Tensor]:
        """Run the joint-attention query transformer (spec §2.3).

        Args:
            features: ``[conv2, conv3, conv4, conv5, conv6]`` from :class:`MotionEncoder`,
                (B, c_k, h_k, w_k) float32.
            query_init: (N, B, hidden) float32, sequence-first: the key frame's final
                LayerNorm-ed decoder queries (``query_out``).

        Returns:
            ``([conv2, conv3, conv4', conv5', conv6'], query_feat)``: the feature list with
            conv4..conv6 replaced by the refined (B, hidden, h_k, w_k) maps, and the final
            flow queries (N, B, hidden) *before* ``decoder_norm``.

        Raises:
            ValueError: wrong number/shape of inputs (outside ``torch.jit`` tracing).
        """
        if _checking():
            self._check_inputs(features, query_init)
        conv2, conv3, conv4, conv5, conv6 = features
        levels = [conv6, conv5, conv4]
        srcs: list[Tensor] = []
        poss: list[Tensor] = []
        for lvl, x in enumerate(levels):
            pos = self.pe_layer(x).to(x.dtype)
            src = self.input_proj[lvl](x) + self.level_embed.weight[lvl].view(1, -1, 1, 1)
            srcs.append(src.flatten(2).permute(2, 0, 1))  # (HW, B, C)
            poss.append(pos.flatten(2).permute(2, 0, 1))

        n = self.num_queries
        bs = conv6.shape[0]
        query_embed = self.query_embed.weight.unsqueeze(1).expand(-1, bs, -1)  # (N, B, C)
        query_feat = query_init
        for i in range(self.num_layers):
            lvl = i % _NUM_QUERY_LEVELS
            seq = torch.cat([query_feat + query_embed, srcs[lvl] + poss[lvl]], dim=0)
            seq = self.transformer_self_attention_layers[i](seq, query_pos=None)
            seq = self.transformer_ffn_layers[i](seq)
            query_feat = seq[:n]
            srcs[lvl] = seq[n:]

        refined = [
            src.permute(1, 2, 0).reshape(bs, self.hidden_dim, x.shape[-2], x.shape[-1])
            for src, x in zip(srcs, levels)
        ]
        conv6r, conv5r, conv4r = refined
        return [conv2, conv3, conv4r, conv5r, conv6r], query_feat

    def pixel_flow(self, features: Sequence[Tensor]) -> Tensor:
        """FlowNetS refinement from conv6' to the conv2 grid (spec §2.4).

        Args:
            features: ``[conv2, conv3, conv4', conv5', conv6']`` as returned by
                :meth:`refine_features` (conv4'..conv6' with ``hidden`` channels).

        Returns:
            (B, 2, h2, w2) float32 pixel-wise flow on the conv2 grid, channel 0 = x, 1 = y, in
            conv2-grid pixels (the official ``FLOW_SCALE_FACTOR`` and interpolation factor are 1).
        """
        conv2, conv3, conv4, conv5, conv6 = features
        x = conv6
        for k, skip in zip((5, 4, 3, 2), (conv5, conv4, conv3, conv2)):
            flow = getattr(self, f"predict_flow{k + 1}")(x)
            flow_up = crop_like(getattr(self, f"upsample_flow{k}")(flow), skip)
            out_deconv = crop_like(getattr(self, f"deconv{k}")(x), skip)
            x = torch.cat([skip, out_deconv, flow_up], dim=1)
        return self.predict_flow(x)

    def query_flows(self, query_feat: Tensor, conv2: Tensor, queries: Tensor | None = None) -> Tensor:
        """Query-based (segment-aware) flows (spec §2.5).

        Args:
            query_feat: (N, B, hidden) float32 flow queries after the transformer.
            conv2: (B, c2, h, w) float32, the **raw** conv2 encoder features.
            queries: optional (M,) int64 indices of the queries whose flows are wanted (the key
                frame's active queries); None = all N. Each query's flow depends only on its
                own embedding here, so the selected flows equal those of a full run.

        Returns:
            (B, M, 2, h, w) float32 (M = N without ``queries``): channel 0 = ``<e_q, M[E:2E]>``
            (x), channel 1 = ``<e_q, M[0:E]>`` (y), where ``M = scale_layer(conv2)`` (per
            pixel) and ``e = output_head(decoder_norm(query_feat))``.
        """
        e = self.flow_embed_dim
        if queries is not None:
            query_feat = query_feat.index_select(0, queries)
        emb = self.output_head(self.decoder_norm(query_feat)).transpose(0, 1)  # (B, M, E)
        b, _, h, w = conv2.shape
        motion = self.scale_layer(conv2.flatten(2).transpose(1, 2))  # (B, hw, 2E), channels-last
        basis_y = motion[:, :, :e].transpose(1, 2)  # (B, E, hw)
        basis_x = motion[:, :, e:].transpose(1, 2)
        flow_x = torch.matmul(emb, basis_x)  # (B, M, hw)
        flow_y = torch.matmul(emb, basis_y)
        m = self.num_queries if queries is None else int(queries.numel())  # a Python int for export
        return torch.stack([flow_x, flow_y], dim=2).reshape(b, m, 2, h, w)

    def fuse(self, pixel_flow: Tensor, query_flows: Tensor) -> Tensor:
        """Fuse the pixel-wise flow with each query flow (spec §2.6).

        Args:
            pixel_flow: (B, 2, h, w) float32.
            query_flows: (B, N, 2, h, w) float32.

        Returns:
            (B, N, 2, h, w) float32 = ``fuse_layer(cat[pixel_x, pixel_y, query_x, query_y])`` per
            query (batch-major, as the reference's (B*N) layout).
        """
        b, n, _, h, w = query_flows.shape
        pix = pixel_flow.unsqueeze(1).expand(-1, n, -1, -1, -1)
        x = torch.cat([pix, query_flows], dim=2).reshape(b * n, 4, h, w)
        return self.fuse_layer(x).reshape(b, n, 2, h, w)

    def forward(self, features: Sequence[Tensor], query_init: Tensor, queries: Tensor | None = None) -> MotionOutput:
        """Compute one flow per query.

        Args:
            features: ``[conv2, conv3, conv4, conv5, conv6]`` from :class:`MotionEncoder`,
                (B, c_k, h_k, w_k) float32.
            query_init: (N, B, hidden) float32 sequence-first key-frame queries
                (``query_out``: after the segmentor decoder's final LayerNorm).
            queries: optional (M,) int64 indices of the queries whose flows are returned (see
                :meth:`query_flows`); the transformer still runs over all N queries, so these
                flows equal the corresponding ones of a full run. None = all N.

        Returns:
            :class:`MotionOutput` with ``flows`` (B, M, 2, h2, w2) (M = N without
            ``queries``) and ``pixel_flow``
            (B, 2, h2, w2), float32, (x, y) displacements in pixels of the conv2 grid, pointing
            from the current frame to the key frame.

        Raises:
            ValueError: wrong number/shape of inputs (outside ``torch.jit`` tracing).
        """
        refined, query_feat = self.refine_features(features, query_init)
        pixel_flow = self.pixel_flow(refined)
        query_flows = self.query_flows(query_feat, features[0], queries)
        # Contiguous (NCHW) outputs whatever the layout the convolutions ran in: a channels-last
        # flow would make the warp's 2-channel upsampling several times slower.
        return MotionOutput(self.fuse(pixel_flow, query_flows).contiguous(), pixel_flow.contiguous())


class MotionModule(nn.Module):
    """The MPVSS motion module (``FlowEstimator``): pre-processing, encoder, decoder (spec §2).

    ``forward(current, key, query_init)`` = ``decoder(encoder(prepare_images(current, key)),
    query_init)``. Children ``encoder`` (:class:`MotionEncoder`) and ``decoder``
    (:class:`MotionDecoder`) give the official keys ``motion.encoder.*`` / ``motion.decoder.*``
    under a parent attribute ``motion`` (§5.1). The normalisation mean is a non-persistent
    buffer (not in state dicts, as the official ``flow_img_norm_mean``).

    The flows point from the current frame to the key frame (backward warping: the key-frame
    masks are sampled at ``p + flow(p)``) and live on the conv2 grid, whose stride with respect
    to the image is :attr:`flow_stride` (8 for the official ``image_scale`` 0.5). The query
    flows are dot products of query embeddings with a motion map computed from the **raw**
    conv2 features, and a freshly built module outputs the constant flow (+1, +1) because
    ``fuse_layer`` starts with weight 0 and bias 1.

    Args:
        cfg: motion configuration.
        num_queries: N, the segmentor's number of object queries (official 100).

    Raises:
        ValueError: inconsistent configuration (see :class:`MotionEncoder`,
            :class:`MotionDecoder`), ``image_mean`` without 3 entries or ``image_scale`` <= 0.
    """

    #: Images must be padded to a multiple of this (spec §2.1, ``SIZE_DIVISIBILITY``).
    size_divisibility = 32

    def __init__(self, cfg: MotionConfig, num_queries: int) -> None:
        super().__init__()
        if len(cfg.image_mean) != 3:
            raise ValueError(f"image_mean needs 3 (RGB) entries, got {cfg.image_mean}")
        if not cfg.image_scale > 0:
            raise ValueError(f"image_scale must be > 0, got {cfg.image_scale}")
        self.image_scale = float(cfg.image_scale)
        self.encoder = MotionEncoder(cfg.encoder_channels)
        self.decoder = MotionDecoder(cfg, num_queries)
        mean = torch.tensor(list(cfg.image_mean) * 2, dtype=torch.float32).view(1, 6, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)

    @property
    def flow_stride(self) -> float:
        """Stride of the flow grid with respect to the image, in image pixels per flow pixel.

        ``4 / image_scale`` (conv2 is at 1/4 of the rescaled pair): 8.0 for the official 0.5.
        """
        return _CONV2_STRIDE / self.image_scale

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Size (h, w) of the rescaled pair fed to the encoder: ``(int(H*s), int(W*s))``."""
        return int(height * self.image_scale), int(width * self.image_scale)

    def flow_size(self, height: int, width: int) -> tuple[int, int]:
        """Size (h, w) of the flow grid for a padded image of (height, width) pixels
        (:func:`flow_grid_size`)."""
        return flow_grid_size(self.image_scale, height, width)

    def prepare_images(self, current: Tensor, key: Tensor, image_size: tuple[int, int] | None = None) -> Tensor:
        """Build the encoder input from the two frames (spec §2.1).

        ``cat[current, key]`` along channels, ``x / 255 - image_mean`` (the RGB mean repeated
        for both frames), then a bilinear resize (align_corners=False) to the explicit Python-int
        size ``(int(H*s), int(W*s))`` with ``s = image_scale`` (skipped when s == 1). Computed in
        the cheaper order resize-then-normalise, which equals it up to float32 rounding when the
        raw padding is zero (as :class:`~mpvss_ros.segmenter.Letterbox` pads).

        Args:
            current: (B, 3, H, W) float32 RGB in 0..255, the non-key frame, zero-padded at the
                bottom/right to H, W multiples of 32.
            key: (B, 3, H, W) float32 RGB in 0..255, the key frame, padded the same way.
            image_size: optional unpadded (height, width) in image pixels. When given, the
                normalised pixels at rows >= height or columns >= width are set to 0 (by a
                multiplicative mask, no in-place write), which reproduces the official input
                where the padding is zero *after* normalisation (``ImageList`` pads the
                normalised tensor). When None, the padding keeps the value ``-image_mean`` of
                a zero (black) raw pixel.

        Returns:
            (B, 6, int(H*s), int(W*s)) float32.

        Raises:
            ValueError: shapes differ, are not (B, 3, H, W), H or W is not a multiple of 32, or
                ``image_size`` exceeds (H, W) (outside ``torch.jit`` tracing).
        """
        if _checking():
            if current.dim() != 4 or current.shape[1] != 3 or current.shape != key.shape:
                raise ValueError(
                    f"current and key must both be (B, 3, H, W), got {tuple(current.shape)} and {tuple(key.shape)}"
                )
            hh, ww = current.shape[-2:]
            if hh % self.size_divisibility or ww % self.size_divisibility:
                raise ValueError(f"image size {(hh, ww)} must be padded to multiples of {self.size_divisibility}")
            if image_size is not None and (image_size[0] > hh or image_size[1] > ww or min(image_size) < 1):
                raise ValueError(f"image_size {tuple(image_size)} must lie within the padded size {(hh, ww)}")
        height, width = int(current.shape[-2]), int(current.shape[-1])
        # Resize first, normalise on the small grid: bilinear resampling is a convex combination
        # per output pixel, so resize(M * (x / 255 - mean)) = resize(x) / 255 - mean * resize(M) for
        # a zero raw padding (x = M * x; the letterbox and the ONNX contract guarantee it), with M
        # the 0/1 valid-area mask. Same result up to float32 rounding, 1/16 of the arithmetic.
        size = self.input_size(height, width)
        if self.image_scale != 1.0:
            x = torch.cat([F.interpolate(current, size=size, mode="bilinear", align_corners=False),
                           F.interpolate(key, size=size, mode="bilinear", align_corners=False)], dim=1)
        else:
            x = torch.cat([current, key], dim=1)
        mean = self.image_mean.to(current.dtype)
        if image_size is not None and (int(image_size[0]) < height or int(image_size[1]) < width):
            rows = (torch.arange(height, device=x.device) < int(image_size[0])).to(x.dtype)
            cols = (torch.arange(width, device=x.device) < int(image_size[1])).to(x.dtype)
            valid = (rows[:, None] * cols[None, :])[None, None]
            if self.image_scale != 1.0:
                valid = F.interpolate(valid, size=size, mode="bilinear", align_corners=False)
            mean = mean * valid
        x = x / 255.0 - mean
        return x

    def forward(
        self,
        current: Tensor,
        key: Tensor,
        query_init: Tensor,
        image_size: tuple[int, int] | None = None,
        queries: Tensor | None = None,
    ) -> MotionOutput:
        """Estimate one flow per key-frame query, from the current frame to the key frame.

        Args:
            current: (B, 3, H, W) float32 RGB 0..255, padded to multiples of 32.
            key: (B, 3, H, W) float32 RGB 0..255, the key frame, padded the same way.
            query_init: (N, B, hidden) float32, sequence-first key-frame ``query_out``.
            image_size: optional unpadded (height, width); see :meth:`prepare_images`.
            queries: optional (M,) int64 indices of the queries whose flows are returned
                (:meth:`MotionDecoder.forward`); None = all N.

        Returns:
            :class:`MotionOutput`: ``flows`` (B, M, 2, h, w) (M = N without ``queries``) and
            ``pixel_flow`` (B, 2, h, w),
            float32, (x, y) in pixels of the flow grid, (h, w) = :meth:`flow_size` (H/8, W/8
            for the official scale).

        Raises:
            ValueError: bad input shapes (outside ``torch.jit`` tracing).
        """
        return self.decoder(self.encoder(self.prepare_images(current, key, image_size)), query_init, queries)
