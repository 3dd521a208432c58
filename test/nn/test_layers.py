"""PositionEmbeddingSine: values of the DETR formula and the per-size cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import reference_attention, reference_layer_norm

from mpvss_ros.nn.layers import MLP, ConvAct, CrossAttentionLayer, FFNLayer, PositionEmbeddingSine, SelfAttentionLayer


def _reference(num_pos_feats: int, h: int, w: int, temperature: float = 10000.0,
               normalize: bool = True) -> torch.Tensor:
    """DETR's sine embedding written out per position: (2F, h, w); positions 1-based, normalised
    to (0, 2 pi] unless ``normalize`` is False."""
    out = torch.empty(2 * num_pos_feats, h, w, dtype=torch.float64)
    for i in range(num_pos_feats):
        dim_t = temperature ** (2 * (i // 2) / num_pos_feats)
        trig = math.sin if i % 2 == 0 else math.cos
        for y in range(h):
            for x in range(w):
                py = (y + 1) / (h + 1e-6) * 2 * math.pi if normalize else y + 1
                px = (x + 1) / (w + 1e-6) * 2 * math.pi if normalize else x + 1
                out[i, y, x] = trig(py / dim_t)
                out[num_pos_feats + i, y, x] = trig(px / dim_t)
    return out.float()


def test_values_follow_the_detr_formula() -> None:
    pe = PositionEmbeddingSine(4)
    got = pe(torch.zeros(2, 3, 5, 7))
    assert got.shape == (2, 8, 5, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], _reference(4, 5, 7), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], got[0])
    # The temperature argument, and raw (unnormalised) positions with normalize=False.
    got = PositionEmbeddingSine(4, temperature=20.0)(torch.zeros(1, 1, 3, 5))
    torch.testing.assert_close(got[0], _reference(4, 3, 5, temperature=20.0), atol=1e-6, rtol=0)
    got = PositionEmbeddingSine(4, normalize=False)(torch.zeros(1, 1, 3, 5))
    torch.testing.assert_close(got[0], _reference(4, 3, 5, normalize=False), atol=1e-6, rtol=0)


def test_cache_returns_the_same_values_per_size_and_stays_bounded() -> None:
    pe = PositionEmbeddingSine(8)
    first = pe(torch.zeros(1, 1, 6, 4)).clone()
    other = pe(torch.zeros(3, 2, 4, 6))  # another size, another batch size
    again = pe(torch.zeros(1, 5, 6, 4))
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(other[2], pe._embed(1, 4, 6, torch.device("cpu"))[0], atol=0, rtol=0)
    wider = pe(torch.zeros(1, 1, 6, 9))  # the same height as ``first``: its own entry
    assert wider.shape == (1, 16, 6, 9)
    torch.testing.assert_close(wider[0], _reference(8, 6, 9), atol=1e-6, rtol=0)
    held = []
    for n in range(PositionEmbeddingSine.cache_size + 3):
        pe(torch.zeros(1, 1, 2, n + 1))
        held.append(len(pe._cache))
    assert 1 <= len(pe._cache) <= PositionEmbeddingSine.cache_size
    assert max(held) == PositionEmbeddingSine.cache_size  # never one size more


def test_an_embedding_cached_under_inference_mode_serves_training() -> None:
    pe = PositionEmbeddingSine(4)
    with torch.inference_mode():
        pe(torch.zeros(1, 1, 3, 3))
    src = torch.ones(1, 8, 3, 3, requires_grad=True)
    loss = ((src + pe(src)) ** 2).sum()  # an inference tensor here would make backward fail
    loss.backward()
    assert src.grad is not None and torch.isfinite(src.grad).all()


def test_a_trace_computes_the_embedding_in_the_graph() -> None:
    pe = PositionEmbeddingSine(4)
    traced = torch.jit.trace(pe, torch.zeros(1, 1, 3, 5))
    assert "cumsum" in str(traced.graph)  # computed by the graph, not baked in as a constant
    torch.testing.assert_close(traced(torch.zeros(1, 1, 3, 5)), pe(torch.zeros(1, 1, 3, 5)))


# Each block or stage below against its formula (spec docs/mpvss_architecture.md), written with
# torch.nn.functional and the module's own weights: a wrong level, a dropped position embedding or
# activation changes the values.

def test_mlp_has_no_activation_after_its_last_layer():
    torch.manual_seed(0)
    mlp = MLP(8, 16, 4, 3)
    x = torch.randn(5, 8)
    with torch.no_grad():
        got = mlp(x)
        l0, l1, l2 = mlp.layers
        ref = F.linear(F.relu(F.linear(F.relu(F.linear(x, l0.weight, l0.bias)), l1.weight, l1.bias)), l2.weight, l2.bias)
    torch.testing.assert_close(got, ref)
    assert (got < 0).any()
    with pytest.raises(ValueError, match="num_layers"):
        MLP(8, 16, 4, 0)


def test_self_attention_adds_positions_to_queries_and_keys_only():
    torch.manual_seed(0)
    layer = SelfAttentionLayer(16, 4).eval()
    tgt, pos = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    with torch.no_grad():
        got = layer(tgt, query_pos=pos)
        ref = reference_layer_norm(layer.norm, tgt + reference_attention(layer.self_attn, tgt + pos, tgt + pos, tgt))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cross_attention_adds_positions_to_queries_and_keys_only():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(16, 4).eval()
    tgt, qpos = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    mem, pos = torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    mask = torch.rand(2 * 4, 3, 7) < 0.3
    with torch.no_grad():
        got = layer(tgt, mem, memory_mask=mask, pos=pos, query_pos=qpos)
        ref = reference_layer_norm(layer.norm, tgt + reference_attention(layer.multihead_attn, tgt + qpos, mem + pos, mem, mask))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ffn_is_post_norm_with_a_residual():
    torch.manual_seed(0)
    layer = FFNLayer(16, 32).eval()
    x = torch.randn(4, 2, 16) * 3 + 1
    with torch.no_grad():
        got = layer(x)
        hidden = F.relu(F.linear(x, layer.linear1.weight, layer.linear1.bias))
        ref = reference_layer_norm(layer.norm, x + F.linear(hidden, layer.linear2.weight, layer.linear2.bias))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_attention_and_ffn_layers_default_to_no_dropout():
    """Dropout defaults to 0.0, as at MPVSS inference: train mode gives the eval-mode values."""
    torch.manual_seed(0)
    tgt, mem = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    for layer, args in ((SelfAttentionLayer(16, 4), (tgt,)), (CrossAttentionLayer(16, 4), (tgt, mem)),
                        (FFNLayer(16, 64), (tgt,))):
        with torch.no_grad():
            trained = layer.train()(*args)
            evaluated = layer.eval()(*args)
        torch.testing.assert_close(trained, evaluated)


def test_conv_act_applies_its_leaky_slope():
    torch.manual_seed(0)
    layer = ConvAct(3, 4, 3, negative_slope=0.1)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        raw = F.conv2d(x, layer.conv.weight, layer.conv.bias, padding=1)
        got = layer(x)
    assert (raw < 0).any()
    torch.testing.assert_close(got, torch.where(raw > 0, raw, 0.1 * raw))


def test_conv_act_bias_transposed_and_activation_options():
    """bias=False has no bias, transposed=True is a ConvTranspose2d (weight (in, out, k, k)),
    negative_slope=None is no activation and 0.0 a ReLU."""
    torch.manual_seed(0)
    layer = ConvAct(3, 5, 4, stride=2, padding=1, bias=False, transposed=True, negative_slope=None)
    assert layer.conv.bias is None and tuple(layer.conv.weight.shape) == (3, 5, 4, 4)
    x = torch.randn(1, 3, 6, 6)
    relu = ConvAct(3, 4, 3, negative_slope=0.0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv_transpose2d(x, layer.conv.weight, None, stride=2, padding=1))
        raw = F.conv2d(x, relu.conv.weight, relu.conv.bias, padding=1)
        got = relu(x)
    assert (raw < 0).any()
    torch.testing.assert_close(got, F.relu(raw))
