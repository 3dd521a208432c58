"""mpvss_ros/nn/transformer_decoder.py against its formula.

The masked-attention decoder (Mask2Former, spec §1.3) written out with torch.nn.functional and
the module's own weights: level i mod L, sine positions + level embedding on the memory, query
embedding on the queries, attention blocked where sigmoid(mask) < 0.5 (unless every pixel is
blocked), heads on the LayerNorm-ed queries, and the LayerNorm-ed queries as query_out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import reference_attention, reference_layer_norm

from mpvss_ros.config import TransformerDecoderConfig
from mpvss_ros.nn.layers import PositionEmbeddingSine
from mpvss_ros.nn.transformer_decoder import MaskedTransformerDecoder

C, HEADS, N, D = 32, 4, 6, 16


def _mlp(layers, x):
    for i, lin in enumerate(layers):
        x = F.linear(x, lin.weight, lin.bias)
        if i < len(layers) - 1:
            x = F.relu(x)
    return x


def _reference(dec, ms, mf):
    """Final class logits, mask logits and query_out, and the (class, mask) logits predicted before
    each layer (deep supervision)."""
    levels = len(ms)
    pe = PositionEmbeddingSine(C // 2, normalize=True)
    src, pos = [], []
    for lvl, x in enumerate(ms):
        pos.append(pe._embed(x.shape[0], x.shape[-2], x.shape[-1], x.device).flatten(2).permute(2, 0, 1))
        src.append((x.flatten(2) + dec.level_embed.weight[lvl][None, :, None]).permute(2, 0, 1))
    b = mf.shape[0]
    qe = dec.query_embed.weight[:, None].repeat(1, b, 1)
    out = dec.query_feat.weight[:, None].repeat(1, b, 1)

    def heads(o):
        d = reference_layer_norm(dec.decoder_norm, o).transpose(0, 1)
        return F.linear(d, dec.class_embed.weight, dec.class_embed.bias), \
            torch.einsum("bqc,bchw->bqhw", _mlp(dec.mask_embed.layers, d), mf)

    aux = []
    for i in range(dec.num_layers):
        lvl = i % levels
        cls, ml = heads(out)
        aux.append((cls, ml))
        a = F.interpolate(ml, size=ms[lvl].shape[-2:], mode="bilinear", align_corners=False).flatten(2)
        mask = (a.sigmoid() < 0.5)[:, None].repeat(1, HEADS, 1, 1).flatten(0, 1)
        mask = mask.clone()
        mask[mask.all(-1)] = False  # the reference's torch.where reset
        ca = dec.transformer_cross_attention_layers[i]
        out = reference_layer_norm(ca.norm, out + reference_attention(ca.multihead_attn, out + qe, src[lvl] + pos[lvl], src[lvl], mask))
        sa = dec.transformer_self_attention_layers[i]
        out = reference_layer_norm(sa.norm, out + reference_attention(sa.self_attn, out + qe, out + qe, out))
        ff = dec.transformer_ffn_layers[i]
        out = reference_layer_norm(ff.norm, out + F.linear(F.relu(F.linear(out, ff.linear1.weight, ff.linear1.bias)),
                                          ff.linear2.weight, ff.linear2.bias))
    cls, ml = heads(out)
    return cls, ml, reference_layer_norm(dec.decoder_norm, out).transpose(0, 1), aux


@pytest.mark.parametrize("aux", [False, True])
def test_decoder_follows_masked_attention_of_the_spec(aux):
    torch.manual_seed(0)
    cfg = TransformerDecoderConfig(hidden_dim=C, num_queries=N, num_layers=4, num_heads=HEADS, ffn_dim=64)
    dec = MaskedTransformerDecoder(cfg, num_classes=5, in_channels=C, mask_dim=D).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dec.parameters():  # non-trivial LayerNorm affines and biases too
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ms = [torch.randn(2, C, h, w, generator=g) for h, w in ((2, 3), (4, 6), (8, 12))]
    mf = torch.randn(2, D, 16, 24, generator=g)
    with torch.no_grad():
        out = dec(ms, mf, aux=aux)
        cls, ml, qo, ref_aux = _reference(dec, ms, mf)
    assert out.class_logits.shape == (2, N, 6)  # K + 1 classes, the last no-object
    torch.testing.assert_close(out.class_logits, cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.mask_logits, ml, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.query_embeddings, qo, rtol=1e-4, atol=1e-4)
    # deep supervision: the prediction before each layer, the first from the learned queries alone
    assert len(out.aux_class_logits) == len(out.aux_mask_logits) == (4 if aux else 0)
    for got_cls, got_ml, (ref_cls, ref_ml) in zip(out.aux_class_logits, out.aux_mask_logits, ref_aux):
        torch.testing.assert_close(got_cls, ref_cls, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_ml, ref_ml, rtol=1e-4, atol=1e-4)


def test_pixel_decoder_width_other_than_hidden_dim_is_refused():
    cfg = TransformerDecoderConfig(hidden_dim=C, num_queries=N, num_layers=1, num_heads=HEADS, ffn_dim=64)
    with pytest.raises(ValueError, match="decoder expects 32"):
        MaskedTransformerDecoder(cfg, num_classes=5, in_channels=64, mask_dim=D)


def test_attention_mask_blocks_where_the_mask_is_background():
    """The next layer's attention mask is True (blocked) exactly where sigmoid(mask logit) < 0.5."""
    torch.manual_seed(0)
    cfg = TransformerDecoderConfig(hidden_dim=C, num_queries=N, num_layers=1, num_heads=HEADS, ffn_dim=64)
    dec = MaskedTransformerDecoder(cfg, num_classes=5, in_channels=C, mask_dim=D).eval()
    mf = torch.randn(1, D, 4, 6)
    out = torch.randn(N, 1, C)
    with torch.no_grad():
        attn, _, ml = dec._intermediate_heads(out, mf, (4, 6), None)
    assert attn.shape == (HEADS, N, 24)
    expected = (ml.flatten(2) < 0)[:, None].repeat(1, HEADS, 1, 1).flatten(0, 1)
    assert 0 < int(expected.sum()) < expected.numel()
    assert torch.equal(attn, expected)


def test_a_query_whose_mask_blocks_every_pixel_attends_everywhere():
    """Every mask logit negative (all pixels blocked for every query): the reference resets such rows
    to attend everywhere. Without the reset this torch (2.13) returns a zero attention output for a
    fully blocked row (older versions NaN): the query would skip the memory altogether."""
    torch.manual_seed(0)
    cfg = TransformerDecoderConfig(hidden_dim=C, num_queries=N, num_layers=3, num_heads=HEADS, ffn_dim=64)
    dec = MaskedTransformerDecoder(cfg, num_classes=5, in_channels=C, mask_dim=D).eval()
    with torch.no_grad():
        dec.mask_embed.layers[-1].weight.zero_()
        dec.mask_embed.layers[-1].bias.fill_(-1.0)  # mask logit -D at every pixel
    g = torch.Generator().manual_seed(1)
    ms = [torch.randn(1, C, h, w, generator=g) for h, w in ((2, 3), (4, 6), (8, 12))]
    mf = torch.ones(1, D, 16, 24)
    with torch.no_grad():
        out = dec(ms, mf, aux=False)
        cls, ml, qo, _ = _reference(dec, ms, mf)
    assert torch.isfinite(out.class_logits).all() and torch.isfinite(out.query_embeddings).all()
    torch.testing.assert_close(out.class_logits, cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.query_embeddings, qo, rtol=1e-4, atol=1e-4)
