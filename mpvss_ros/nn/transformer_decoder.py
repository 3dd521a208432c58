"""Masked-attention transformer decoder (Mask2Former, Cheng et al. CVPR 2022; MPVSS variant).

Key layout follows ``MPVSSTransformerDecoder`` of the official MPVSS code (checkpoint prefix
``sem_seg_head.predictor.`` is added by the parent): ``transformer_{self,cross}_attention_layers``,
``transformer_ffn_layers``, ``decoder_norm``, ``query_feat``, ``query_embed``, ``level_embed``,
``class_embed``, ``mask_embed.layers.{0,1,2}``. ``input_proj`` holds identity modules (no keys)
because the pixel decoder already outputs ``hidden_dim`` channels.

Export notes (spec §6.3): the reference resets fully-masked attention rows with
``attn_mask[torch.where(...)] = False`` (NonZero + ScatterND in ONNX); here the equivalent static
form ``mask & ~mask.all(-1, keepdim=True)`` is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TransformerDecoderConfig
from .layers import MLP, CrossAttentionLayer, FFNLayer, PositionEmbeddingSine, SelfAttentionLayer

__all__ = ["DecoderOutput", "MaskedTransformerDecoder"]


@dataclass
class DecoderOutput:
    """Predictions of the masked-attention decoder for one batch.

    Attributes:
        class_logits: (B, N, K+1) float32, last column = no-object; the final prediction.
        mask_logits: (B, N, H/4, W/4) float32 mask logits (before sigmoid); final prediction.
        query_embeddings: (B, N, C) float32, the final LayerNorm-ed queries (``query_out``,
            Q_O^k in the MPVSS paper) that initialise the flow queries on non-key frames.
        aux_class_logits: list of the ``num_layers`` earlier class logits (deep supervision);
            empty when the decoder ran with ``aux=False``.
        aux_mask_logits: list of the ``num_layers`` earlier mask logits; empty with ``aux=False``.
    """

    class_logits: Tensor
    mask_logits: Tensor
    query_embeddings: Tensor
    aux_class_logits: list[Tensor]
    aux_mask_logits: list[Tensor]


class MaskedTransformerDecoder(nn.Module):
    """Mask2Former decoder: N learnable queries, masked cross-attention, self-attention, FFN.

    Layer ``i`` attends to multi-scale level ``i mod L`` (1/32, 1/16, 1/8, ...) through
    masked attention: each query only sees pixels where its previous mask prediction is
    foreground (sigmoid >= 0.5), unless that blocks every pixel.

    Args:
        cfg: widths, queries, layers, heads.
        num_classes: K (the class head has K + 1 outputs).
        in_channels: channels of the multi-scale features (must equal ``cfg.hidden_dim``).
        mask_dim: channels of the per-pixel mask features.

    Raises:
        ValueError: if ``in_channels != cfg.hidden_dim``.
    """

    def __init__(self, cfg: TransformerDecoderConfig, num_classes: int, in_channels: int, mask_dim: int) -> None:
        super().__init__()
        if in_channels != cfg.hidden_dim:
            raise ValueError(f"pixel decoder gives {in_channels} channels, decoder expects {cfg.hidden_dim}")
        c = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.num_layers = cfg.num_layers
        self.num_feature_levels = cfg.num_feature_levels
        self.pe_layer = PositionEmbeddingSine(c // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(c, cfg.num_heads) for _ in range(cfg.num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(c, cfg.num_heads) for _ in range(cfg.num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(c, cfg.ffn_dim) for _ in range(cfg.num_layers))
        self.decoder_norm = nn.LayerNorm(c)
        self.query_feat = nn.Embedding(cfg.num_queries, c)
        self.query_embed = nn.Embedding(cfg.num_queries, c)
        self.level_embed = nn.Embedding(cfg.num_feature_levels, c)
        self.input_proj = nn.ModuleList(nn.Identity() for _ in range(cfg.num_feature_levels))
        self.class_embed = nn.Linear(c, num_classes + 1)
        self.mask_embed = MLP(c, c, mask_dim, 3)

    def forward(self, multi_scale_features: list[Tensor], mask_features: Tensor, aux: bool = True) -> DecoderOutput:
        """Decode queries into class and mask logits.

        Args:
            multi_scale_features: ``num_feature_levels`` maps (B, C, h_l, w_l) float32, coarsest
                first (1/32, 1/16, 1/8).
            mask_features: (B, mask_dim, H/4, W/4) float32.
            aux: also return the ``num_layers`` intermediate predictions (deep supervision, for
                training). With False (inference) the intermediate heads compute only the next
                layer's attention mask, directly at that layer's resolution: ``mask_embed`` times
                ``mask_features`` resized bilinearly to it, which equals resizing the full-size
                mask logits (resizing is linear per channel) up to float32 rounding, at 1/4 to
                1/64 of the products. The final prediction is computed as with ``aux=True``.

        Returns:
            :class:`DecoderOutput` with the final prediction and, with ``aux``, the
            ``num_layers`` earlier ones.
        """
        src, pos, sizes = [], [], []
        for lvl in range(self.num_feature_levels):
            x = multi_scale_features[lvl]
            sizes.append((int(x.shape[-2]), int(x.shape[-1])))
            pos.append(self.pe_layer(x).to(x.dtype).flatten(2).permute(2, 0, 1))
            s = self.input_proj[lvl](x).flatten(2) + self.level_embed.weight[lvl][None, :, None]
            src.append(s.permute(2, 0, 1))
        bs = mask_features.shape[0]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)

        # Inference: mask_features at each attention resolution, for the intermediate heads.
        small = ({size: F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                  for size in dict.fromkeys(sizes)} if not aux else None)
        classes, masks = [], []
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            # The prediction before layer i gives its attention mask (and, with aux, is kept).
            attn_mask, cls, msk = self._intermediate_heads(output, mask_features, sizes[lvl], small)
            if aux:
                classes.append(cls)
                masks.append(msk)
            # A query whose mask blocks every pixel attends everywhere instead (static form).
            attn_mask = attn_mask & ~attn_mask.all(dim=-1, keepdim=True)
            output = self.transformer_cross_attention_layers[i](
                output, src[lvl], memory_mask=attn_mask, pos=pos[lvl], query_pos=query_embed
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_embed)
            output = self.transformer_ffn_layers[i](output)
        class_logits, mask_logits = self._heads(output, mask_features)
        query_out = self.decoder_norm(output).transpose(0, 1)
        return DecoderOutput(
            class_logits=class_logits,
            mask_logits=mask_logits,
            query_embeddings=query_out,
            aux_class_logits=classes,
            aux_mask_logits=masks,
        )

    def _heads(self, output: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits (B, N, K+1) and mask logits (B, N, H/4, W/4) of the queries ``output``."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # (B, N, C)
        b, d, h, w = mask_features.shape
        mask_embed = self.mask_embed(decoder_output)  # (B, N, D)
        mask_logits = torch.bmm(mask_embed, mask_features.reshape(b, d, h * w)).reshape(b, -1, h, w)
        return self.class_embed(decoder_output), mask_logits

    def _intermediate_heads(
        self, output: Tensor, mask_features: Tensor, target_size: tuple[int, int],
        small: dict[tuple[int, int], Tensor] | None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The next layer's attention mask (B*heads, N, h*w) bool at ``target_size``, and this
        prediction's class and mask logits when ``small`` is None (aux mode; else None, None:
        the mask logits are computed at ``target_size`` only, from ``small[target_size]``)."""
        class_logits = mask_logits = None
        if small is None:
            class_logits, mask_logits = self._heads(output, mask_features)
            attn = F.interpolate(mask_logits, size=target_size, mode="bilinear", align_corners=False).flatten(2)
        else:
            mask_embed = self.mask_embed(self.decoder_norm(output).transpose(0, 1))  # (B, N, D)
            attn = torch.bmm(mask_embed, small[target_size].flatten(2))  # (B, N, h*w) at the target size
        # (B, N, hw) -> (B*heads, N, hw); True = blocked. sigmoid < 0.5 as the reference (not
        # logit < 0: they differ where sigmoid rounds to exactly 0.5).
        attn = attn.sigmoid().unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5
        return attn.detach(), class_logits, mask_logits
