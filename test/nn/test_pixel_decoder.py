"""Tests for mpvss_ros.nn.pixel_decoder: deformable attention maths, key layout, shapes, gradients."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from mpvss_ros.config import PixelDecoderConfig
from mpvss_ros.nn.layers import PositionEmbeddingSine
from mpvss_ros.nn.pixel_decoder import (
    FPNPixelDecoder,
    MSDeformAttn,
    MSDeformAttnEncoder,
    MSDeformAttnEncoderLayer,
    MSDeformAttnPixelDecoder,
    SeparableConvGNReLU,
    build_pixel_decoder,
    ms_deform_attn_core,
)
from mpvss_ros.runtime.export import _TORCHSCRIPT_EXPORTER  # dynamo=False where torch has the keyword

H, W = 64, 96
R50_CH = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
MBV2_CH = {"res2": 24, "res3": 32, "res4": 96, "res5": 1280}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
SMALL_MSDEFORM = dict(conv_dim=64, mask_dim=32, num_layers=2, num_heads=4, ffn_dim=128, num_groups=8)


def _features(channels: dict[str, int], batch: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: torch.randn(batch, c, H // STRIDES[k], W // STRIDES[k], dtype=dtype) for k, c in channels.items()}


def _bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Hand bilinear sample of img (D, h, w) at normalised (x, y), align_corners=False, zero padding."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out = out + wy * wx * img[:, yy, xx]
    return out


def _check_decoder_outputs(dec: torch.nn.Module, out, batch: int, conv_dim: int, mask_dim: int) -> None:
    mask_features, multi_scale = out
    assert mask_features.dtype == torch.float32
    assert tuple(mask_features.shape) == (batch, mask_dim, H // 4, W // 4)
    assert len(multi_scale) == 3
    for t, stride in zip(multi_scale, (32, 16, 8)):
        assert t.dtype == torch.float32
        assert tuple(t.shape) == (batch, conv_dim, H // stride, W // stride)
        assert torch.isfinite(t).all()


# ----------------------------------------------------------------------------------------
# ms_deform_attn_core
# ----------------------------------------------------------------------------------------


def test_core_pixel_centres_reproduce_values() -> None:
    torch.manual_seed(0)
    h, w, d = 5, 7, 4
    value = torch.randn(1, h * w, 1, d)
    pixels = [(0, 0), (2, 3), (4, 6), (1, 5)]
    lq = len(pixels)
    locs = torch.tensor([[(j + 0.5) / w, (i + 0.5) / h] for i, j in pixels]).view(1, lq, 1, 1, 1, 2)
    weights = torch.ones(1, lq, 1, 1, 1)
    out = ms_deform_attn_core(value, [(h, w)], locs, weights)
    assert out.shape == (1, lq, d)
    img = value[0, :, 0, :].T.reshape(d, h, w)
    for q, (i, j) in enumerate(pixels):
        torch.testing.assert_close(out[0, q], img[:, i, j])


def test_core_matches_hand_bilinear() -> None:
    torch.manual_seed(1)
    shapes = [(3, 4), (6, 5)]
    n, m, d, p, lq = 2, 2, 3, 3, 4
    s = sum(a * b for a, b in shapes)
    value = torch.randn(n, s, m, d, dtype=torch.float64)
    # Include points outside the map (partly or wholly zero-padded).
    locs = torch.rand(n, lq, m, len(shapes), p, 2, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(n, lq, m, len(shapes), p, dtype=torch.float64)
    out = ms_deform_attn_core(value, shapes, locs, weights)
    assert out.shape == (n, lq, m * d)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                acc = torch.zeros(d, dtype=torch.float64)
                for lvl, (hh, ww) in enumerate(shapes):
                    img = value[b, starts[lvl] : starts[lvl] + hh * ww, head, :].T.reshape(d, hh, ww)
                    for pt in range(p):
                        x, y = locs[b, q, head, lvl, pt].tolist()
                        acc = acc + weights[b, q, head, lvl, pt] * _bilinear(img, x, y)
                torch.testing.assert_close(out[b, q, head * d : (head + 1) * d], acc)


def test_core_shape_errors() -> None:
    value = torch.randn(1, 10, 1, 2)
    locs = torch.rand(1, 3, 1, 1, 1, 2)
    weights = torch.ones(1, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="positions"):
        ms_deform_attn_core(value, [(3, 4)], locs, weights)
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn_core(value, [(2, 2), (2, 3)], locs, weights)


# ----------------------------------------------------------------------------------------
# MSDeformAttn
# ----------------------------------------------------------------------------------------


def test_msdeformattn_init() -> None:
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    assert attn.sampling_offsets.weight.shape == (8 * 3 * 4 * 2, 32)
    assert attn.attention_weights.weight.shape == (8 * 3 * 4, 32)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    # Head 0 points along +x, head 2 along +y (angle 2*pi*m/8), point p at distance p+1.
    torch.testing.assert_close(bias[0, 1, 2], torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(bias[2, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[1, 2, 3], torch.tensor([4.0, 4.0]), atol=1e-5, rtol=0)
    assert torch.equal(bias[:, 0], bias[:, 2])
    assert torch.count_nonzero(attn.value_proj.bias) == 0 and torch.count_nonzero(attn.output_proj.bias) == 0


def test_pixel_decoder_keeps_the_deformable_detr_initialisation() -> None:
    """The transformer's Xavier fill must not overwrite MSDeformAttn's own init (offset and
    attention weights 0: uniform attention at the initial sampling points); level embeddings N(0, 1)."""
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(MBV2_CH, **SMALL_MSDEFORM)
    for layer in dec.transformer.encoder.layers:
        assert torch.count_nonzero(layer.self_attn.sampling_offsets.weight) == 0
        assert torch.count_nonzero(layer.self_attn.attention_weights.weight) == 0
    assert dec.transformer.level_embed.abs().min() > 0


def test_msdeformattn_at_reference_points_is_projection() -> None:
    """With zero offsets and one point, each query samples exactly its own pixel centre."""
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    c = 16
    attn = MSDeformAttn(d_model=c, n_levels=2, n_heads=4, n_points=1)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
    s = sum(a * b for a, b in shapes)
    src = torch.randn(2, s, c)
    ref = MSDeformAttnEncoder.get_reference_points(shapes, src.device)
    assert ref.shape == (1, s, 2, 2)
    out = attn(src, ref, src, shapes)
    # Attention weights are uniform at init (0.5 per level); each query samples every level at
    # its own normalised position, i.e. exactly its pixel centre on its own level.
    value = attn.value_proj(src)
    v0 = value[:, :24]
    v1 = value[:, 24:].view(2, 2, 3, c)
    # expected for level-0 query (i, j): 0.5 * v0[i, j] + 0.5 * bilinear(v1, same normalised point)
    for i, j in [(0, 0), (1, 4), (3, 5)]:
        q = i * 6 + j
        x, y = (j + 0.5) / 6, (i + 0.5) / 4
        samp1 = torch.stack([_bilinear(v1[b].permute(2, 0, 1), x, y) for b in range(2)])
        expected = attn.output_proj(0.5 * v0[:, q] + 0.5 * samp1)
        torch.testing.assert_close(out[:, q], expected, atol=1e-5, rtol=1e-5)
    # level-1 query (i, j) samples level 1 exactly at its pixel centre.
    for i, j in [(0, 0), (1, 2)]:
        q = 24 + i * 3 + j
        x, y = (j + 0.5) / 3, (i + 0.5) / 2
        samp0 = torch.stack([_bilinear(value[b, :24].view(4, 6, c).permute(2, 0, 1), x, y) for b in range(2)])
        expected = attn.output_proj(0.5 * samp0 + 0.5 * v1[:, i, j])
        torch.testing.assert_close(out[:, q], expected, atol=1e-5, rtol=1e-5)


def test_reference_points_are_pixel_centres() -> None:
    ref = MSDeformAttnEncoder.get_reference_points([(2, 3), (1, 2)], torch.device("cpu"))
    assert ref.shape == (1, 8, 2, 2)
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([1 / 6, 1 / 4]))
    torch.testing.assert_close(ref[0, 5, 1], torch.tensor([5 / 6, 3 / 4]))  # row 1, col 2
    torch.testing.assert_close(ref[0, 7, 0], torch.tensor([3 / 4, 1 / 2]))  # level 1, col 1


# ----------------------------------------------------------------------------------------
# MSDeformAttnPixelDecoder
# ----------------------------------------------------------------------------------------


def _expected_msdeform_keys(c: int = 256, ffn: int = 1024, heads: int = 8, levels: int = 3, points: int = 4):
    keys: dict[str, tuple[int, ...]] = {}
    for i, cin in enumerate((R50_CH["res5"], R50_CH["res4"], R50_CH["res3"])):
        keys[f"input_proj.{i}.0.weight"] = (c, cin, 1, 1)
        keys[f"input_proj.{i}.0.bias"] = (c,)
        keys[f"input_proj.{i}.1.weight"] = (c,)
        keys[f"input_proj.{i}.1.bias"] = (c,)
    keys["transformer.level_embed"] = (levels, c)
    for i in range(6):
        p = f"transformer.encoder.layers.{i}."
        keys[p + "self_attn.sampling_offsets.weight"] = (heads * levels * points * 2, c)
        keys[p + "self_attn.sampling_offsets.bias"] = (heads * levels * points * 2,)
        keys[p + "self_attn.attention_weights.weight"] = (heads * levels * points, c)
        keys[p + "self_attn.attention_weights.bias"] = (heads * levels * points,)
        for name in ("value_proj", "output_proj"):
            keys[p + f"self_attn.{name}.weight"] = (c, c)
            keys[p + f"self_attn.{name}.bias"] = (c,)
        for name in ("norm1", "norm2"):
            keys[p + f"{name}.weight"] = (c,)
            keys[p + f"{name}.bias"] = (c,)
        keys[p + "linear1.weight"] = (ffn, c)
        keys[p + "linear1.bias"] = (ffn,)
        keys[p + "linear2.weight"] = (c, ffn)
        keys[p + "linear2.bias"] = (c,)
    keys["mask_features.weight"] = (c, c, 1, 1)
    keys["mask_features.bias"] = (c,)
    keys["adapter_1.weight"] = (c, R50_CH["res2"], 1, 1)
    keys["adapter_1.norm.weight"] = (c,)
    keys["adapter_1.norm.bias"] = (c,)
    keys["layer_1.weight"] = (c, c, 3, 3)
    keys["layer_1.norm.weight"] = (c,)
    keys["layer_1.norm.bias"] = (c,)
    return keys


@pytest.fixture(scope="module")
def msdeform_r50() -> MSDeformAttnPixelDecoder:
    torch.manual_seed(0)
    return MSDeformAttnPixelDecoder(R50_CH).eval()


def test_msdeform_decoder_keys(msdeform_r50: MSDeformAttnPixelDecoder) -> None:
    sd = msdeform_r50.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert got == _expected_msdeform_keys()
    # Spot checks quoted in the spec (section 5.2).
    assert got["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"] == (192, 256)
    assert got["transformer.encoder.layers.5.self_attn.attention_weights.weight"] == (96, 256)
    assert got["adapter_1.weight"] == (256, 256, 1, 1)
    assert got["input_proj.0.0.weight"] == (256, 2048, 1, 1)
    assert got["input_proj.2.0.weight"] == (256, 512, 1, 1)
    assert isinstance(msdeform_r50.transformer.level_embed, torch.nn.Parameter)


def test_msdeform_decoder_param_count(msdeform_r50: MSDeformAttnPixelDecoder) -> None:
    n = sum(p.numel() for p in msdeform_r50.parameters())
    assert round(n / 1e6, 3) == 6.036


def test_msdeform_decoder_shapes(msdeform_r50: MSDeformAttnPixelDecoder) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        out = msdeform_r50(_features(R50_CH, batch=2))
    _check_decoder_outputs(msdeform_r50, out, 2, 256, 256)
    # Non-float32 inputs are cast to float32.
    with torch.no_grad():
        out64 = msdeform_r50(_features(R50_CH, dtype=torch.float64))
    _check_decoder_outputs(msdeform_r50, out64, 1, 256, 256)


def test_msdeform_decoder_small_and_gradients() -> None:
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(MBV2_CH, **SMALL_MSDEFORM)
    features = _features(MBV2_CH, batch=2)
    out = dec(features)
    _check_decoder_outputs(dec, out, 2, 64, 32)
    with torch.no_grad():  # no dropout by default (Mask2Former's 0.0): a training-mode pass repeats exactly
        torch.testing.assert_close(dec(features)[0], out[0], rtol=0, atol=0)
    mask_features, multi_scale = out
    loss = (mask_features * torch.randn_like(mask_features)).sum()
    loss = loss + sum((t * torch.randn_like(t)).sum() for t in multi_scale)
    loss.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The deformable sampling itself is differentiable w.r.t. the offsets.
    assert dec.transformer.encoder.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0


def test_msdeform_decoder_bad_args() -> None:
    with pytest.raises(ValueError, match="res2"):
        MSDeformAttnPixelDecoder({"res3": 8, "res4": 8, "res5": 8})
    with pytest.raises(ValueError, match="num_groups"):
        MSDeformAttnPixelDecoder(MBV2_CH, conv_dim=100, num_groups=32)
    with pytest.raises(ValueError, match="num_heads"):
        MSDeformAttnPixelDecoder(MBV2_CH, conv_dim=96, num_groups=32, num_heads=5)
    with pytest.raises(ValueError, match="divisible by 4"):  # sine positions: conv_dim / 2 per axis
        MSDeformAttnPixelDecoder(MBV2_CH, conv_dim=6, mask_dim=6, num_heads=2, num_groups=2)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MSDeformAttn(d_model=30, n_levels=1, n_heads=4, n_points=1)


# ----------------------------------------------------------------------------------------
# FPNPixelDecoder
# ----------------------------------------------------------------------------------------


def test_fpn_decoder_shapes_and_keys() -> None:
    torch.manual_seed(0)
    dec = FPNPixelDecoder(MBV2_CH).eval()
    with torch.no_grad():
        out = dec(_features(MBV2_CH, batch=2))
    _check_decoder_outputs(dec, out, 2, 128, 128)
    sd = dec.state_dict()
    assert tuple(sd["lateral_convs.res5.weight"].shape) == (128, 1280, 1, 1)
    assert tuple(sd["lateral_convs.res2.norm.weight"].shape) == (128,)
    assert tuple(sd["output_convs.res3.depthwise.weight"].shape) == (128, 1, 3, 3)
    assert tuple(sd["output_convs.res3.pointwise.weight"].shape) == (128, 128, 1, 1)
    assert tuple(sd["mask_features.weight"].shape) == (128, 128, 1, 1)
    assert "mask_features.bias" in sd
    conv_biases = [k for k in sd if k.endswith(".bias") and ".norm." not in k]
    assert conv_biases == ["mask_features.bias"]


def test_fpn_decoder_gradients() -> None:
    torch.manual_seed(0)
    dec = FPNPixelDecoder(MBV2_CH, conv_dim=64, mask_dim=48, num_groups=16)
    feats = {k: v.requires_grad_() for k, v in _features(MBV2_CH).items()}
    mask_features, multi_scale = dec(feats)
    _check_decoder_outputs(dec, (mask_features, multi_scale), 1, 64, 48)
    loss = (mask_features * torch.randn_like(mask_features)).sum()
    loss.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, f in feats.items():
        assert f.grad is not None and f.grad.abs().sum() > 0, name


def test_fpn_decoder_bad_args() -> None:
    with pytest.raises(ValueError, match="num_groups"):
        FPNPixelDecoder(MBV2_CH, conv_dim=100, num_groups=32)
    with pytest.raises(ValueError, match="res4"):
        FPNPixelDecoder({"res2": 8, "res3": 8, "res5": 8})


# ----------------------------------------------------------------------------------------
# Factory, ONNX
# ----------------------------------------------------------------------------------------


def _cpu_fp16_autocast() -> torch.autocast:
    """A CPU float16 autocast region, or a skip on a torch that has none (2.1 allows bfloat16 only)."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            pass
    except RuntimeError as exc:
        torch.set_autocast_cpu_enabled(False)  # torch 2.1 turned it on before it refused the dtype
        pytest.skip(f"torch {torch.__version__}: {exc}")
    return torch.autocast("cpu", dtype=torch.float16)


@pytest.mark.parametrize("make, conv_dim, mask_dim", [(lambda: FPNPixelDecoder(MBV2_CH), 128, 128),
                                                     (lambda: MSDeformAttnPixelDecoder(MBV2_CH, **SMALL_MSDEFORM), 64, 32)],
                         ids=["fpn", "msdeform"])
def test_pixel_decoders_compute_in_float32_under_fp16_autocast(make, conv_dim, mask_dim) -> None:
    """The official ``@autocast(enabled=False)``: inside an fp16 autocast region (CPU autocast here,
    the same switch as CUDA's) a pixel decoder fed half features returns exactly what it returns
    in float32 for those features cast up, while the region around it stays in half precision."""
    torch.manual_seed(0)
    dec = make().eval()
    features = _features(MBV2_CH, dtype=torch.float16)
    with torch.no_grad():
        expected = dec({k: v.float() for k, v in features.items()})
        with _cpu_fp16_autocast():
            got = dec(features)
            assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.float16  # autocast is back on
    _check_decoder_outputs(dec, got, 1, conv_dim, mask_dim)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_build_pixel_decoder() -> None:
    dec = build_pixel_decoder(PixelDecoderConfig(type="fpn", conv_dim=64, mask_dim=64, num_groups=16), MBV2_CH)
    assert isinstance(dec, FPNPixelDecoder) and dec.conv_dim == 64
    assert dec.lateral_convs["res2"].norm.num_groups == 16 and dec.output_convs["res3"].norm.num_groups == 16
    # the type is case-insensitive; every configured size reaches the decoder
    cfg = PixelDecoderConfig(type="MSDeformAttn", **{**SMALL_MSDEFORM, "num_layers": 1, "num_points": 2})
    dec = build_pixel_decoder(cfg, MBV2_CH)
    assert isinstance(dec, MSDeformAttnPixelDecoder)
    assert len(dec.transformer.encoder.layers) == 1 and dec.mask_dim == 32
    layer = dec.transformer.encoder.layers[0]
    assert layer.self_attn.n_points == 2 and layer.linear1.out_features == SMALL_MSDEFORM["ffn_dim"]
    with pytest.raises(ValueError, match="unknown pixel decoder"):
        build_pixel_decoder(PixelDecoderConfig(type="aspp"), MBV2_CH)


class _Wrap(torch.nn.Module):
    def __init__(self, dec: torch.nn.Module) -> None:
        super().__init__()
        self.dec = dec

    def forward(self, r2, r3, r4, r5):
        mask, ms = self.dec({"res2": r2, "res3": r3, "res4": r4, "res5": r5})
        return (mask, *ms)


@pytest.mark.filterwarnings("ignore")
def test_onnx_export_matches_pytorch() -> None:
    """TorchScript ONNX export at opset 17 runs in onnxruntime and matches (skipped without onnx)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(MBV2_CH, **SMALL_MSDEFORM)
    model = _Wrap(dec).eval()
    inputs = tuple(_features(MBV2_CH).values())
    buf = io.BytesIO()
    torch.onnx.export(model, inputs, buf, opset_version=17, **_TORCHSCRIPT_EXPORTER)
    sess = ort.InferenceSession(buf.getvalue())
    outs = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(torch.from_numpy(o), r, atol=1e-4, rtol=1e-4)


# Each block or stage below against its formula (spec docs/mpvss_architecture.md), written with
# torch.nn.functional and the module's own weights: a wrong level, a dropped position embedding or
# activation changes the values.

SMALL = dict(conv_dim=32, mask_dim=16, num_layers=1, num_heads=4, ffn_dim=64, num_groups=8)
CH = {"res2": 8, "res3": 12, "res4": 16, "res5": 20}


def _seeded_features(seed=0, h=64, w=96):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(1, c, h // s, w // s, generator=g) for (k, c), s in zip(CH.items(), (4, 8, 16, 32))}


def _pass_through_attention() -> MSDeformAttn:
    """One head, level and point, identity value/output projections: the output is the sample."""
    attn = MSDeformAttn(d_model=4, n_levels=1, n_heads=1, n_points=1)
    with torch.no_grad():
        attn.value_proj.weight.copy_(torch.eye(4))
        attn.output_proj.weight.copy_(torch.eye(4))
    return attn


def test_sampling_offsets_are_in_pixels_of_a_non_square_level():
    """Offsets are divided by the level's (W, H): on a 4 x 8 map an x offset of 1 moves one column
    (not W / H = 2 columns), a y offset of 1 one row."""
    torch.manual_seed(0)
    h, w = 4, 8
    attn = _pass_through_attention()
    img = torch.randn(1, h * w, 4)
    ref = MSDeformAttnEncoder.get_reference_points([(h, w)], img.device)
    grid = img.view(h, w, 4)
    for dx, dy in ((1.0, 0.0), (0.0, 1.0)):
        with torch.no_grad():
            attn.sampling_offsets.bias.copy_(torch.tensor([dx, dy]))
            out = attn(img, ref, img, [(h, w)]).view(h, w, 4)
        i, j = 1, 2
        torch.testing.assert_close(out[i, j], grid[i + int(dy), j + int(dx)], rtol=1e-5, atol=1e-5)


def test_padding_mask_zeroes_the_padded_values():
    """``input_padding_mask`` True = padding: those value tokens are zeroed before sampling, the
    others are sampled as they are (zero offsets: each query reads its own pixel)."""
    torch.manual_seed(0)
    h, w = 2, 4
    attn = _pass_through_attention()
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
    src = torch.randn(1, h * w, 4)
    ref = MSDeformAttnEncoder.get_reference_points([(h, w)], src.device)
    mask = torch.zeros(1, h * w, dtype=torch.bool)
    mask[0, 5:] = True
    with torch.no_grad():
        out = attn(src, ref, src, [(h, w)], input_padding_mask=mask)
    torch.testing.assert_close(out[0, :5], src[0, :5], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[0, 5:], torch.zeros(3, 4))


def test_encoder_layer_queries_with_positions_and_samples_the_plain_source():
    torch.manual_seed(0)
    shapes = [(2, 3), (4, 6)]
    layer = MSDeformAttnEncoderLayer(d_model=16, ffn_dim=32, n_levels=2, n_heads=4, n_points=2).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.self_attn.sampling_offsets.weight.normal_(0, 0.5, generator=g)  # offsets depend on the query
    s = 6 + 24
    src, pos = torch.randn(1, s, 16, generator=g), torch.randn(1, s, 16, generator=g)
    ref_pts = MSDeformAttnEncoder.get_reference_points(shapes, src.device)
    with torch.no_grad():
        got = layer(src, pos, ref_pts, shapes)
        x = layer.norm1(src + layer.self_attn(src + pos, ref_pts, src, shapes))
        ref = layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_encoder_positions_carry_the_level_embedding():
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(CH, **SMALL).eval()
    seen = {}
    dec.transformer.encoder.register_forward_pre_hook(lambda mod, args: seen.update(pos=args[1]))
    feats = _seeded_features()
    with torch.no_grad():
        dec(feats)
    pe = PositionEmbeddingSine(16, normalize=True)
    expected = torch.cat([pe._embed(1, *feats[k].shape[-2:], torch.device("cpu")).flatten(2).transpose(1, 2)
                          + dec.transformer.level_embed[lvl].view(1, 1, -1)
                          for lvl, k in enumerate(("res5", "res4", "res3"))], 1)
    torch.testing.assert_close(seen["pos"], expected)


def test_mask_features_come_from_res2_and_the_one_eighth_map():
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(CH, **SMALL).eval()
    feats = _seeded_features()
    with torch.no_grad():
        mask_features, ms = dec(feats)
        y = dec.adapter_1(feats["res2"]) + F.interpolate(ms[2], size=(16, 24), mode="bilinear", align_corners=False)
        ref = dec.mask_features(dec.layer_1(y))
    assert ms[2].shape[-2:] == (8, 12)
    torch.testing.assert_close(mask_features, ref, rtol=1e-5, atol=1e-5)


def test_multi_scale_maps_are_the_encoder_memory_split_back_per_level():
    """The encoder's (B, S, C) tokens, ordered res5, res4, res3 and row-major per level, become the
    (B, C, h, w) maps: token r * w + c of a level is pixel (r, c)."""
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(CH, **SMALL).eval()
    seen = {}
    dec.transformer.register_forward_hook(lambda mod, args, out: seen.update(memory=out[0]))
    with torch.no_grad():
        _, ms = dec(_seeded_features())
    start = 0
    for t, (h, w) in zip(ms, ((2, 3), (4, 6), (8, 12))):
        tokens = seen["memory"][0, start : start + h * w]  # (h*w, C)
        assert torch.equal(t[0, :, 1, 2], tokens[1 * w + 2])
        assert torch.equal(t[0].permute(1, 2, 0).reshape(h * w, -1), tokens)
        start += h * w


def test_separable_conv_is_depthwise_pointwise_groupnorm_relu():
    torch.manual_seed(0)
    mod = SeparableConvGNReLU(8, 8, 4)
    with torch.no_grad():
        mod.norm.weight.normal_()
        mod.norm.bias.normal_()
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        got = mod(x)
        y = F.conv2d(F.conv2d(x, mod.depthwise.weight, padding=1, groups=8), mod.pointwise.weight)
        ref = F.relu(F.group_norm(y, 4, mod.norm.weight, mod.norm.bias, mod.norm.eps))
    assert (ref == 0).any() and (ref > 0).any()  # the ReLU clipped some values, not all
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fpn_is_top_down():
    """y5 = out5(lat5(res5)); y_k = out_k(lat_k(res_k) + up(y_{k+1})); mask features from y2."""
    torch.manual_seed(0)
    dec = FPNPixelDecoder(CH, conv_dim=16, mask_dim=8, num_groups=4).eval()
    feats = _seeded_features()
    with torch.no_grad():
        mask_features, ms = dec(feats)
        y, outs = None, []
        for name in ("res5", "res4", "res3", "res2"):
            cur = dec.lateral_convs[name](feats[name])
            if y is not None:
                cur = cur + F.interpolate(y, size=cur.shape[-2:], mode="bilinear", align_corners=False)
            y = dec.output_convs[name](cur)
            outs.append(y)
    for a, b in zip(ms, outs[:3]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(mask_features, dec.mask_features(outs[3]))
