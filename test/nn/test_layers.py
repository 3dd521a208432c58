"""PositionEmbeddingSine: values of the DETR formula and the per-size cache."""

import math

import torch

from mpvss_ros.nn.layers import PositionEmbeddingSine


def _reference(num_pos_feats: int, h: int, w: int) -> torch.Tensor:
    """DETR's normalised sine embedding written out per position: (2F, h, w)."""
    out = torch.empty(2 * num_pos_feats, h, w, dtype=torch.float64)
    for i in range(num_pos_feats):
        dim_t = 10000.0 ** (2 * (i // 2) / num_pos_feats)
        trig = math.sin if i % 2 == 0 else math.cos
        for y in range(h):
            for x in range(w):
                out[i, y, x] = trig((y + 1) / (h + 1e-6) * 2 * math.pi / dim_t)
                out[num_pos_feats + i, y, x] = trig((x + 1) / (w + 1e-6) * 2 * math.pi / dim_t)
    return out.float()


def test_values_follow_the_detr_formula() -> None:
    pe = PositionEmbeddingSine(4)
    got = pe(torch.zeros(2, 3, 5, 7))
    assert got.shape == (2, 8, 5, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], _reference(4, 5, 7), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], got[0])


def test_cache_returns_the_same_values_per_size_and_stays_bounded() -> None:
    pe = PositionEmbeddingSine(8)
    first = pe(torch.zeros(1, 1, 6, 4)).clone()
    other = pe(torch.zeros(3, 2, 4, 6))  # another size, another batch size
    again = pe(torch.zeros(1, 5, 6, 4))
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(other[2], pe._embed(1, 4, 6, torch.device("cpu"))[0], atol=0, rtol=0)
    for n in range(PositionEmbeddingSine.cache_size + 3):
        pe(torch.zeros(1, 1, 2, n + 1))
    assert 1 <= len(pe._cache) <= PositionEmbeddingSine.cache_size


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
