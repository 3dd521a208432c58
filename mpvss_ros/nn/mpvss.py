"""The assembled MPVSS model (Weng et al., "Mask Propagation for Efficient Video Semantic
Segmentation", NeurIPS 2023): a Mask2Former segmentor for key frames and a query-based flow
module that warps the key frame's masks on every other frame.

Attribute names give the official checkpoint prefixes: ``backbone.``,
``sem_seg_head.pixel_decoder.``, ``sem_seg_head.predictor.``, ``motion.encoder.``,
``motion.decoder.``. ``pixel_mean``/``pixel_std`` are non-persistent buffers, as in detectron2.

Images enter as (B, 3, Hp, Wp) float32 RGB in 0..255, zero-padded at the bottom/right to a
multiple of 32; ``valid_hw`` gives the unpadded size. Padding is zero *after* normalisation for
both the segmentor and the motion module, as the reference's ``ImageList`` padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .backbones import build_backbone
from .motion import MotionModule
from .pixel_decoder import build_pixel_decoder
from .transformer_decoder import DecoderOutput, MaskedTransformerDecoder
from .warp import warp_mask_logits

__all__ = ["MPVSS", "KeyFrameState", "active_queries", "semantic_scores", "valid_mask"]


@dataclass
class KeyFrameState:
    """What a non-key frame needs from its key frame (spec §1.4).

    Attributes:
        image: (1, 3, Hp, Wp) float32 raw RGB 0..255 of the key frame, zero-padded.
        valid_hw: unpadded (h, w) in pixels of the network canvas.
        class_logits: (1, N, K+1) float32, reused unchanged on non-key frames.
        mask_logits: (1, N, Hp/4, Wp/4) float32.
        query_embeddings: (1, N, C) float32 final LayerNorm-ed queries (Q_O^k).
        active: (M,) int64 indices of the queries whose masks non-key frames carry forward
            (:func:`active_queries`), or None for all N. The motion module still attends over
            all N queries; only the per-query flows (their heads and fusion), warps and scores
            are limited to these.
    """

    image: Tensor
    valid_hw: tuple[int, int]
    class_logits: Tensor
    mask_logits: Tensor
    query_embeddings: Tensor
    active: Tensor | None = None

    def with_active_queries(self, min_score: float) -> "KeyFrameState":
        """This state with :attr:`active` chosen from its class logits (:func:`active_queries`,
        probability threshold ``min_score`` in [0, 1); 0 keeps all N)."""
        return replace(self, active=active_queries(self.class_logits, min_score))

    def with_padding_filled(self) -> "KeyFrameState":
        """This state with the letterbox padding of :attr:`mask_logits` (the mask-grid rows and
        columns past ``ceil(valid / 4)``) replaced by the last valid row and column.

        A warp that samples past the valid area then takes its edge, as it does at the canvas
        edge (``padding_mode="border"``), instead of what the network predicted for the black
        padding; without it, flow pointing down or right at the bottom/right edge of a padded
        frame (e.g. 720p on a 480 x 640 canvas) pulled the padding's class into the labels. The
        valid area's own cells are unchanged; a state without padding is returned as is.

        The key frame's own labels are scored from this state too (so ``copy`` reproduces them
        exactly). That departs from Mask2Former, which upsamples the mask logits over the padded
        canvas before cropping, in the last one or two valid pixel rows/columns only: there the
        bilinear upsampling now reads the edge cell instead of the padding's logits, as it would
        for a frame without padding. On 10 key frames of ``bikes.mp4`` (640 x 272 on the 480 x 640
        canvas) 1607 of 1.74 million labels differ, all in rows 270-271 (2026-12-06).
        """
        hm, wm = (int(s) for s in self.mask_logits.shape[-2:])
        hp, wp = (int(s) for s in self.image.shape[-2:])
        vh = min(hm, max(1, -(-int(self.valid_hw[0]) * hm // hp)))
        vw = min(wm, max(1, -(-int(self.valid_hw[1]) * wm // wp)))
        if (vh, vw) == (hm, wm):
            return self
        dev = self.mask_logits.device
        rows = torch.arange(hm, device=dev).clamp_(max=vh - 1)
        cols = torch.arange(wm, device=dev).clamp_(max=vw - 1)
        return replace(self, mask_logits=self.mask_logits.index_select(-2, rows).index_select(-1, cols))

    def propagated(self, x: Tensor) -> Tensor:
        """``x`` (1, N, ...) limited to the :attr:`active` queries along dim 1: (1, M, ...)."""
        return x if self.active is None else x.index_select(1, self.active)

    def check_canvas(self, image: Tensor, reference: Tensor | None = None) -> None:
        """Check that a frame (and the frame its flow points into) lie on this key frame's canvas.

        Args:
            image: (1, 3, Hp, Wp) current frame.
            reference: (1, 3, Hp, Wp) frame a flow is estimated into, or None.

        Raises:
            ValueError: a shape other than ``image``'s of the key frame.
        """
        for name, t in (("frame", image), ("reference frame", reference)):
            if t is not None and t.shape != self.image.shape:
                raise ValueError(f"{name} canvas {tuple(t.shape)} differs from key frame {tuple(self.image.shape)}")


def valid_mask(hw_padded: tuple[int, int], valid_hw: tuple[int, int] | None, like: Tensor) -> Tensor | None:
    """(1, 1, Hp, Wp) mask of ones inside ``valid_hw`` and zeros in the padding; None if no padding.

    Args:
        hw_padded: the padded canvas (Hp, Wp) in pixels.
        valid_hw: the unpadded (h, w) in pixels at the top-left, or None.
        like: a tensor whose dtype and device the mask takes.
    """
    hp, wp = hw_padded
    if valid_hw is None or tuple(valid_hw) == (hp, wp):
        return None
    h, w = valid_hw
    ones = torch.ones((1, 1, h, w), dtype=like.dtype, device=like.device)
    return F.pad(ones, (0, wp - w, 0, hp - h))


def active_queries(class_logits: Tensor, min_score: float) -> Tensor | None:
    """The queries that take part in semantic inference: best class probability >= ``min_score``.

    Mask2Former's semantic inference weighs each mask by its softmax class probabilities (the
    no-object column dropped, :func:`semantic_scores`); a query whose best class probability is
    below ``min_score`` adds less than ``min_score`` to any class score anywhere, so dropping it
    moves every score by less than ``min_score`` times the number of dropped queries.

    Args:
        class_logits: (1, N, K+1) float32.
        min_score: probability threshold in [0, 1); 0 keeps every query.

    Returns:
        (M,) int64 indices in ascending order, or None to keep every query: when all clear
        ``min_score``, and when none does (a frame the model sees as nothing is scored over all
        queries rather than over none).
    """
    if min_score <= 0:
        return None
    best = class_logits[0].softmax(dim=-1)[:, :-1].amax(dim=-1)  # (N,)
    keep = torch.nonzero(best >= min_score).flatten()
    return None if keep.numel() in (0, best.numel()) else keep


def semantic_scores(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Mask2Former semantic inference: S[c] = sum_q softmax(class_q)[c] * sigmoid(mask_q).

    The softmax runs over all K+1 logits; the no-object column is then dropped (spec §1.6
    step 2; non-key frames use the same formula, spec §2.8).

    Args:
        class_logits: (B, N, K+1) float32.
        mask_logits: (B, N, h, w) float32.

    Returns:
        (B, K, h, w) float32 scores (not normalised; each in [0, N]).
    """
    b, n, h, w = mask_logits.shape
    probs = class_logits.softmax(dim=-1)[..., :-1]  # (B, N, K)
    masks = mask_logits.sigmoid().reshape(b, n, h * w)
    return torch.bmm(probs.transpose(1, 2), masks).reshape(b, -1, h, w)


class _SemSegHead(nn.Module):
    """Container giving the ``sem_seg_head.{pixel_decoder,predictor}`` key prefixes."""

    def __init__(self, pixel_decoder: nn.Module, predictor: MaskedTransformerDecoder) -> None:
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor


class MPVSS(nn.Module):
    """MPVSS: Mask2Former key-frame segmentor + query-based flow for non-key frames.

    Args:
        cfg: the model configuration (``config/models/*.yaml``).

    Use :meth:`segment_key_frame` on key frames and :meth:`propagate` on the others; both
    return mask logits at 1/4 of the padded canvas, which :func:`semantic_scores` turns into
    class scores.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        pixel_decoder = build_pixel_decoder(cfg.pixel_decoder, self.backbone.out_channels)
        predictor = MaskedTransformerDecoder(
            cfg.transformer_decoder,
            cfg.num_classes,
            in_channels=cfg.pixel_decoder.conv_dim,
            mask_dim=cfg.pixel_decoder.mask_dim,
        )
        self.sem_seg_head = _SemSegHead(pixel_decoder, predictor)
        self.motion = MotionModule(cfg.motion, cfg.transformer_decoder.num_queries)
        #: False when the weights held no trained motion module (a per-frame Mask2Former or stage-1
        #: checkpoint, ``load_model(motion_optional=True)``): query flow refuses the model.
        self.motion_trained = True
        self.register_buffer("pixel_mean", torch.tensor(cfg.input.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.input.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.warp_normalization = cfg.input.warp_normalization

    @property
    def num_classes(self) -> int:
        """K, the number of classes (class logits have K + 1 entries, the last no-object)."""
        return self.cfg.num_classes

    def normalize(self, image: Tensor, valid_hw: tuple[int, int] | None = None) -> Tensor:
        """(B, 3, Hp, Wp) float32 RGB 0..255 -> (x - mean) / std, same shape and dtype, with zeros
        in the padding (spec §1.2: the padding is zero after normalisation).

        Args:
            image: (B, 3, Hp, Wp) float32 RGB 0..255, zero-padded at the bottom/right.
            valid_hw: unpadded (h, w) in pixels; None = no padding.
        """
        x = (image - self.pixel_mean) / self.pixel_std
        mask = valid_mask((int(image.shape[-2]), int(image.shape[-1])), valid_hw, x)
        return x if mask is None else x * mask

    def forward_segmentor(self, image: Tensor, valid_hw: tuple[int, int] | None = None,
                          aux: bool = True) -> DecoderOutput:
        """Run backbone, pixel decoder and masked-attention decoder.

        Args:
            image: (B, 3, Hp, Wp) float32 RGB 0..255, Hp and Wp multiples of 32.
            valid_hw: the unpadded (h, w) in pixels, or None when there is no padding.
            aux: also return the deep-supervision predictions (training); False = the final
                prediction only, with cheaper intermediate attention masks (inference; see
                :meth:`~mpvss_ros.nn.transformer_decoder.MaskedTransformerDecoder.forward`).

        Returns:
            :class:`~mpvss_ros.nn.transformer_decoder.DecoderOutput`: class logits
            (B, N, K+1), mask logits (B, N, Hp/4, Wp/4) and query embeddings (B, N, C), float32
            (spec §1.3), plus the deep-supervision predictions with ``aux``.
        """
        features = self.backbone(self.normalize(image, valid_hw))
        mask_features, multi_scale = self.sem_seg_head.pixel_decoder(features)
        return self.sem_seg_head.predictor(multi_scale, mask_features, aux=aux)

    def segment_key_frame(self, image: Tensor, valid_hw: tuple[int, int] | None = None) -> KeyFrameState:
        """Segment a key frame and keep what non-key frames need.

        Args:
            image: (1, 3, Hp, Wp) float32 RGB 0..255, zero-padded to a multiple of 32.
            valid_hw: unpadded (h, w); None = no padding.

        Returns:
            :class:`KeyFrameState` (class logits, mask logits, query embeddings, the raw image).
        """
        out = self.forward_segmentor(image, valid_hw, aux=False)
        hw = (int(image.shape[-2]), int(image.shape[-1])) if valid_hw is None else tuple(valid_hw)
        return KeyFrameState(
            image=image,
            valid_hw=hw,
            class_logits=out.class_logits,
            mask_logits=out.mask_logits,
            query_embeddings=out.query_embeddings,
        )

    def estimate_flow(self, image: Tensor, key_image: Tensor, query_embeddings: Tensor,
                      valid_hw: tuple[int, int] | None = None, queries: Tensor | None = None) -> Tensor:
        """Query-based flow from the current frame to the key frame (spec §2.1-2.6).

        Args:
            image: (B, 3, Hp, Wp) float32 current frame, RGB 0..255, zero-padded.
            key_image: (B, 3, Hp, Wp) float32 key frame, same layout.
            query_embeddings: (B, N, C) key-frame queries (Q_O^k).
            valid_hw: the unpadded (h, w) in pixels, or None when there is no padding.
            queries: optional (M,) int64 indices of the queries whose flows are returned; the
                motion transformer still attends over all N. None = all N.

        Returns:
            (B, M, 2, Hp/s, Wp/s) float32 flows (M = N without ``queries``) in pixels of the
            motion module's flow grid (s = ``self.motion.flow_stride``, 8 for the official scale).
        """
        return self.motion(image, key_image, query_embeddings.transpose(0, 1), image_size=valid_hw,
                           queries=queries).flows

    def query_flows(self, key: KeyFrameState, image: Tensor, reference: Tensor | None = None) -> Tensor:
        """Query-based flows from ``image`` to ``reference`` for the key frame's active queries.

        With ``reference`` None (the key frame's image) these are the flows :meth:`propagate`
        warps with; with the previous frame as ``reference`` they are one link of a chain of
        frame-to-frame flows (:func:`~mpvss_ros.nn.warp.compose_flows`).

        Args:
            key: the key frame's state (its queries, active queries and valid size are used).
            image: (1, 3, Hp, Wp) float32 current frame, RGB 0..255, on the key frame's canvas.
            reference: (1, 3, Hp, Wp) float32 frame the flow points into; None = ``key.image``.

        Returns:
            (1, M, 2, Hp/s, Wp/s) float32 flows for the M queries of ``key.active`` (all N when
            it is None) in pixels of the flow grid (s = ``self.motion.flow_stride``).

        Raises:
            ValueError: if ``image`` or ``reference`` is not on the key frame's canvas.
        """
        key.check_canvas(image, reference)
        reference = key.image if reference is None else reference
        return self.estimate_flow(image, reference, key.query_embeddings, key.valid_hw, key.active)

    def propagate(self, key: KeyFrameState, image: Tensor) -> Tensor:
        """Warp the key frame's mask logits to the current frame with query-based flow.

        Args:
            key: the key frame's state.
            image: (1, 3, Hp, Wp) float32 current frame, same canvas as the key frame.

        Returns:
            (1, M, Hp/4, Wp/4) float32 warped mask logits of the key frame's active queries
            (``key.propagated``; M = N when ``key.active`` is None).

        Raises:
            ValueError: if the current frame's canvas differs from the key frame's.
        """
        return warp_mask_logits(key.propagated(key.mask_logits), self.query_flows(key, image), self.warp_normalization)
