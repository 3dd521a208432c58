"""Tests of mpvss_ros.nn.motion (spec docs/mpvss_architecture.md §2.1-2.6, §5.2, §5.3)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpvss_ros.config import MotionConfig
from mpvss_ros.nn.layers import PositionEmbeddingSine
from mpvss_ros.nn.motion import MotionDecoder, MotionEncoder, MotionModule, MotionOutput, crop_like

OFFICIAL_QUERIES = 100


def lite_cfg(**overrides) -> MotionConfig:
    kw = dict(
        encoder_channels=[32, 64, 96, 128, 128, 192],
        deconv_channels=[64, 64, 64, 32],
        hidden_dim=128,
        num_layers=3,
        num_heads=4,
        ffn_dim=512,
        flow_embed_dim=64,
        mlp_hidden_dim=128,
    )
    kw.update(overrides)
    return MotionConfig(**kw)


def n_params(module: nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 3)


def images(b: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 255, torch.rand(b, 3, h, w, generator=g) * 255


def perturb_fuse(module: MotionModule, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = module.decoder.fuse_layer.conv.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.1)


class _Parent(nn.Module):
    """Stands in for the MPVSS model: the motion module sits under ``motion``."""

    def __init__(self, motion: nn.Module) -> None:
        super().__init__()
        self.motion = motion


@pytest.fixture(scope="module")
def official() -> MotionModule:
    torch.manual_seed(0)
    return MotionModule(MotionConfig(), OFFICIAL_QUERIES).eval()


@pytest.fixture()
def lite() -> MotionModule:
    torch.manual_seed(0)
    return MotionModule(lite_cfg(), 8).eval()


# ------------------------------------------------------------------------------ sizes & keys
def test_official_param_counts(official: MotionModule) -> None:
    assert n_params(official.encoder) == 24.051
    assert n_params(official.decoder) == 16.034
    assert n_params(MotionDecoder(MotionConfig(num_layers=6), OFFICIAL_QUERIES)) == 12.089


def _official_expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every motion key of spec §5.2 (R50, VSPW, S = 9, N = 100) with its shape."""
    e: dict[str, tuple[int, ...]] = {}
    enc = {
        "conv1.0": (64, 6, 7, 7),
        "conv2.0": (128, 64, 5, 5),
        "conv3.0": (256, 128, 5, 5),
        "conv3.1": (256, 256, 3, 3),
        "conv4.0": (512, 256, 3, 3),
        "conv4.1": (512, 512, 3, 3),
        "conv5.0": (512, 512, 3, 3),
        "conv5.1": (512, 512, 3, 3),
        "conv6.0": (1024, 512, 3, 3),
        "conv6.1": (1024, 1024, 3, 3),
    }
    for name, shape in enc.items():
        e[f"motion.encoder.{name}.conv.weight"] = shape
        e[f"motion.encoder.{name}.conv.bias"] = (shape[0],)
    d = "motion.decoder."
    e[d + "deconv5.conv.weight"] = (256, 128, 4, 4)
    e[d + "deconv4.conv.weight"] = (386, 128, 4, 4)
    e[d + "deconv3.conv.weight"] = (386, 128, 4, 4)
    e[d + "deconv2.conv.weight"] = (386, 64, 4, 4)
    e[d + "predict_flow6.conv.weight"] = (2, 256, 3, 3)
    for k in (5, 4, 3):
        e[d + f"predict_flow{k}.conv.weight"] = (2, 386, 3, 3)
    for k in (5, 4, 3, 2):
        e[d + f"upsample_flow{k}.conv.weight"] = (2, 2, 4, 4)
    e[d + "predict_flow.conv.weight"] = (2, 194, 3, 3)
    for i in range(9):
        sa = d + f"transformer_self_attention_layers.{i}."
        e[sa + "self_attn.in_proj_weight"] = (768, 256)
        e[sa + "self_attn.in_proj_bias"] = (768,)
        e[sa + "self_attn.out_proj.weight"] = (256, 256)
        e[sa + "self_attn.out_proj.bias"] = (256,)
        e[sa + "norm.weight"] = (256,)
        e[sa + "norm.bias"] = (256,)
        ff = d + f"transformer_ffn_layers.{i}."
        e[ff + "linear1.weight"] = (2048, 256)
        e[ff + "linear1.bias"] = (2048,)
        e[ff + "linear2.weight"] = (256, 2048)
        e[ff + "linear2.bias"] = (256,)
        e[ff + "norm.weight"] = (256,)
        e[ff + "norm.bias"] = (256,)
    e[d + "decoder_norm.weight"] = (256,)
    e[d + "decoder_norm.bias"] = (256,)
    for j, shape in enumerate([(512, 256), (512, 512), (256, 512)]):
        e[d + f"output_head.layers.{j}.weight"] = shape
        e[d + f"output_head.layers.{j}.bias"] = (shape[0],)
    for j, shape in enumerate([(512, 128), (512, 512), (512, 512)]):
        e[d + f"scale_layer.layers.{j}.weight"] = shape
        e[d + f"scale_layer.layers.{j}.bias"] = (shape[0],)
    e[d + "query_embed.weight"] = (100, 256)
    e[d + "level_embed.weight"] = (3, 256)
    e[d + "fuse_layer.conv.weight"] = (2, 4, 3, 3)
    e[d + "fuse_layer.conv.bias"] = (2,)
    for j, c in enumerate([1024, 512, 512]):
        e[d + f"input_proj.{j}.weight"] = (256, c, 1, 1)
        e[d + f"input_proj.{j}.bias"] = (256,)
    return e


def test_official_keys_and_shapes(official: MotionModule) -> None:
    sd = _Parent(official).state_dict()
    expected = _official_expected_shapes()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    assert not missing, missing
    assert not extra, extra  # also: the normalisation mean is not persistent
    wrong = {k: (shapes[k], s) for k, s in expected.items() if shapes[k] != s}
    assert not wrong, wrong
    assert not any("transformer_cross_attention_layers" in k for k in sd)
    assert official.decoder.stage_channels == [386, 386, 386, 194]
    assert official.encoder.out_channels == [128, 256, 512, 512, 1024]


def test_official_state_dict_round_trip(official: MotionModule) -> None:
    other = _Parent(MotionModule(MotionConfig(), OFFICIAL_QUERIES))
    result = other.load_state_dict(_Parent(official).state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_lite_channel_arithmetic() -> None:
    dec = MotionDecoder(lite_cfg(), 8)
    # [skip, deconv, 2]: conv5' 128 + 64 + 2, conv4' 128 + 64 + 2, conv3 96 + 64 + 2, conv2 64 + 32 + 2
    assert dec.stage_channels == [194, 194, 162, 98]
    assert tuple(dec.predict_flow.conv.weight.shape) == (2, 98, 3, 3)
    assert tuple(dec.deconv2.conv.weight.shape) == (162, 32, 4, 4)
    assert tuple(dec.scale_layer.layers[0].weight.shape) == (128, 64)
    assert tuple(dec.scale_layer.layers[2].weight.shape) == (128, 128)
    assert tuple(dec.output_head.layers[2].weight.shape) == (64, 128)


# ------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("size", [(64, 96), (96, 160)])
def test_official_output_shapes_and_initial_flow(official: MotionModule, size: tuple[int, int]) -> None:
    h, w = size
    cur, key = images(1, h, w)
    q = torch.randn(OFFICIAL_QUERIES, 1, 256)
    with torch.no_grad():
        out = official(cur, key, q)
    assert isinstance(out, MotionOutput)
    assert out.flows.shape == (1, OFFICIAL_QUERIES, 2, h // 8, w // 8)
    assert out.pixel_flow.shape == (1, 2, h // 8, w // 8)
    assert out.flows.dtype == torch.float32
    assert official.flow_size(h, w) == (h // 8, w // 8)
    assert official.flow_stride == 8
    # fuse_layer starts as weight 0 / bias 1: the constant (+1, +1) flow, exactly.
    assert torch.equal(out.flows, torch.ones_like(out.flows))


def test_encoder_output_shapes(official: MotionModule) -> None:
    x = torch.randn(1, 6, 48, 80)  # the 96x160 image pair after the 0.5 rescale
    with torch.no_grad():
        feats = official.encoder(x)
    assert [tuple(f.shape) for f in feats] == [
        (1, 128, 12, 20),
        (1, 256, 6, 10),
        (1, 512, 3, 5),
        (1, 512, 2, 3),
        (1, 1024, 1, 2),
    ]


def test_refined_features_replace_conv4_to_conv6(lite: MotionModule) -> None:
    cur, key = images(1, 96, 160)
    with torch.no_grad():
        feats = lite.encoder(lite.prepare_images(cur, key))
        refined, query_feat = lite.decoder.refine_features(feats, torch.randn(8, 1, 128))
    assert refined[0] is feats[0] and refined[1] is feats[1]  # conv2, conv3 untouched
    for r, f in zip(refined[2:], feats[2:]):
        assert r.shape == (1, 128) + tuple(f.shape[-2:])
    assert query_feat.shape == (8, 1, 128)


def test_query_flows_depend_on_queries(lite: MotionModule) -> None:
    perturb_fuse(lite)
    cur, key = images(1, 64, 96)
    q1 = torch.randn(8, 1, 128, generator=torch.Generator().manual_seed(1))
    q2 = torch.randn(8, 1, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = lite(cur, key, q1)
        b = lite(cur, key, q2)
    assert not torch.allclose(a.flows, b.flows)
    # one flow per query: different queries give different flows
    assert not torch.allclose(a.flows[:, 0], a.flows[:, 1])


def test_query_flow_channel_halves(lite: MotionModule) -> None:
    dec = lite.decoder
    e = dec.flow_embed_dim
    q = torch.randn(8, 2, 128)
    conv2 = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        got = dec.query_flows(q, conv2)
        emb = dec.output_head(dec.decoder_norm(q)).transpose(0, 1)  # (B, N, E)
        motion = dec.scale_layer(conv2.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, 2E, h, w)
        ref_x = torch.einsum("bqc,bchw->bqhw", emb, motion[:, e:])
        ref_y = torch.einsum("bqc,bchw->bqhw", emb, motion[:, :e])
    assert got.shape == (2, 8, 2, 5, 7)
    torch.testing.assert_close(got[:, :, 0], ref_x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[:, :, 1], ref_y, rtol=1e-4, atol=1e-4)


def test_fusion_channel_order(lite: MotionModule) -> None:
    """fuse_layer input is [pixel_x, pixel_y, query_x, query_y] (spec §2.6)."""
    cur, key = images(1, 64, 96)
    q = torch.randn(8, 1, 128)
    fuse = lite.decoder.fuse_layer.conv
    with torch.no_grad():
        feats = lite.encoder(lite.prepare_images(cur, key))
        refined, query_feat = lite.decoder.refine_features(feats, q)
        qflow = lite.decoder.query_flows(query_feat, feats[0])
        for src in (0, 2):  # identity from the pixel flow, then from the query flow
            fuse.weight.zero_()
            fuse.bias.zero_()
            fuse.weight[0, src, 1, 1] = 1.0
            fuse.weight[1, src + 1, 1, 1] = 1.0
            out = lite(cur, key, q)
            expected = out.pixel_flow.unsqueeze(1).expand_as(out.flows) if src == 0 else qflow
            torch.testing.assert_close(out.flows, expected, rtol=1e-5, atol=1e-5)


def test_selected_queries_get_the_flows_of_a_full_run(lite: MotionModule) -> None:
    """``queries`` limits the flow heads and the fusion, not the transformer: the selected flows
    equal those of the full run, in the order given, and the pixel flow is unchanged."""
    perturb_fuse(lite)
    cur, key = images(2, 64, 96)
    q = torch.randn(8, 2, 128, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([1, 4, 5])
    with torch.no_grad():
        full = lite(cur, key, q)
        part = lite(cur, key, q, queries=keep)
        reordered = lite(cur, key, q, queries=torch.tensor([6, 0]))
    assert part.flows.shape == (2, 3, 2) + tuple(full.flows.shape[-2:])
    torch.testing.assert_close(part.flows, full.flows[:, keep], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reordered.flows, full.flows[:, [6, 0]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(part.pixel_flow, full.pixel_flow, rtol=0, atol=0)
    assert not torch.allclose(part.flows[:, 0], part.flows[:, 1])  # distinct queries compared


def test_batch_matches_single_samples(lite: MotionModule) -> None:
    perturb_fuse(lite)
    cur, key = images(2, 64, 96)
    q = torch.randn(8, 2, 128)
    with torch.no_grad():
        both = lite(cur, key, q)
        for i in range(2):
            one = lite(cur[i : i + 1], key[i : i + 1], q[:, i : i + 1])
            torch.testing.assert_close(both.flows[i : i + 1], one.flows, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(both.pixel_flow[i : i + 1], one.pixel_flow, rtol=1e-4, atol=1e-4)


def test_gradients_reach_all_branches(lite: MotionModule) -> None:
    lite.train()
    perturb_fuse(lite)
    cur, key = images(1, 64, 96)
    out = lite(cur, key, torch.randn(8, 1, 128))
    (out.flows.square().mean()).backward()
    dec = lite.decoder
    for name, p in [
        ("encoder.conv1.0", lite.encoder.conv1[0].conv.weight),
        ("output_head", dec.output_head.layers[0].weight),
        ("scale_layer", dec.scale_layer.layers[0].weight),
        ("query_embed", dec.query_embed.weight),
        ("attention", dec.transformer_self_attention_layers[0].self_attn.in_proj_weight),
        ("predict_flow", dec.predict_flow.conv.weight),
        ("fuse_layer", dec.fuse_layer.conv.weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_forward_is_deterministic_without_dropout(lite: MotionModule) -> None:
    """The motion transformer has no dropout (0.0, as the official module): two training-mode
    passes over the same input give the same flows."""
    lite.train()
    perturb_fuse(lite)
    cur, key = images(1, 64, 96)
    q = torch.randn(8, 1, 128)
    with torch.no_grad():
        a = lite(cur, key, q).flows
        b = lite(cur, key, q).flows
    assert a.std() > 0  # not the constant flow of the initial fusion
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lite_odd_sizes(lite: MotionModule) -> None:
    """Odd intermediate sizes (conv5/conv6 rounding up) are cropped back (crop_like)."""
    cur, key = images(1, 160, 224)
    with torch.no_grad():
        out = lite(cur, key, torch.randn(8, 1, 128))
    assert out.flows.shape == (1, 8, 2, 20, 28)
    assert lite.flow_size(160, 224) == (20, 28)


# ------------------------------------------------------------------------------ pre-processing
def test_prepare_images_normalisation(lite: MotionModule) -> None:
    cur, key = images(2, 64, 96)
    x = lite.prepare_images(cur, key)
    assert x.shape == (2, 6, 32, 48)
    mean = torch.tensor([0.411, 0.432, 0.450])
    norm = torch.cat([cur / 255 - mean.view(1, 3, 1, 1), key / 255 - mean.view(1, 3, 1, 1)], dim=1)
    # bilinear x0.5 with align_corners=False samples between pixels 2i and 2i+1: a 2x2 mean.
    expected = F.avg_pool2d(norm, 2)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    # a single hand-computed value: top-left output of channel 4 (key frame, G)
    k = key[0, 1, :2, :2]
    assert abs(x[0, 4, 0, 0].item() - (k.mean().item() / 255 - 0.432)) < 1e-5


def test_prepare_images_valid_size_mask(lite: MotionModule) -> None:
    cur, key = images(1, 64, 96)
    cur[..., 60:, :] = 0  # zero raw padding at the bottom/right, as the letterbox pads
    cur[..., 90:] = 0
    key[..., 60:, :] = 0
    key[..., 90:] = 0
    x = lite.prepare_images(cur, key, image_size=(60, 90))
    mean = torch.tensor([0.411, 0.432, 0.450] * 2).view(1, 6, 1, 1)
    norm = torch.cat([cur, key], dim=1) / 255 - mean
    mask = torch.zeros(64, 96)
    mask[:60, :90] = 1
    torch.testing.assert_close(x, F.avg_pool2d(norm * mask, 2), rtol=1e-5, atol=1e-5)
    # a full-size image_size is a no-op
    torch.testing.assert_close(lite.prepare_images(cur, key, image_size=(64, 96)), lite.prepare_images(cur, key))


def test_image_scale_one_and_stride() -> None:
    m = MotionModule(lite_cfg(image_scale=1.0), 4)
    cur, key = images(1, 64, 64)
    assert m.prepare_images(cur, key).shape == (1, 6, 64, 64)
    assert m.flow_stride == 4
    assert m.flow_size(64, 64) == (16, 16)
    assert "image_mean" not in m.state_dict()


# ------------------------------------------------------------------------------ errors
def test_input_errors(lite: MotionModule) -> None:
    cur, key = images(1, 64, 96)
    q = torch.randn(8, 1, 128)
    with pytest.raises(ValueError, match="multiples of 32"):
        lite(cur[..., :60, :], key[..., :60, :], q)
    with pytest.raises(ValueError, match="current and key"):
        lite(cur, key[..., :64], q)
    with pytest.raises(ValueError, match="query_init"):
        lite(cur, key, torch.randn(7, 1, 128))
    with pytest.raises(ValueError, match="image_size"):
        lite(cur, key, q, image_size=(65, 96))
    with pytest.raises(ValueError, match="6 feature|5 feature"):
        lite.decoder([torch.zeros(1, 64, 4, 4)], q)
    # conv2..conv6 of a 96 x 160 pair: a wrong width, a different batch or a sixth map is refused by name
    feats = [torch.zeros(1, c, h, w) for c, h, w in [(64, 12, 20), (96, 6, 10), (128, 3, 5), (128, 2, 3), (192, 1, 2)]]
    with pytest.raises(ValueError, match="conv3 must be"):
        lite.decoder([feats[0], torch.zeros(1, 80, 6, 10)] + feats[2:], q)
    with pytest.raises(ValueError, match="different batch sizes"):
        lite.decoder([feats[0], torch.zeros(2, 96, 6, 10)] + feats[2:], q)
    with pytest.raises(ValueError, match="5 feature maps"):
        lite.decoder(feats + [feats[-1]], q)
    with pytest.raises(ValueError, match=r"\(B, 6, h, w\)"):
        lite.encoder(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError):
        crop_like(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 5, 4))


def test_config_errors() -> None:
    with pytest.raises(ValueError):
        MotionEncoder([64, 128, 256])
    with pytest.raises(ValueError, match="6 positive"):
        MotionEncoder([32, 64, 0, 128, 128, 192])
    # the sine position embedding gives each axis hidden / 2 channels, half sine, half cosine
    with pytest.raises(ValueError, match="multiple of 4"):
        MotionDecoder(lite_cfg(hidden_dim=130, num_heads=2), 8)
    with pytest.raises(ValueError, match="num_layers"):
        MotionDecoder(lite_cfg(num_layers=0), 8)
    with pytest.raises(ValueError):
        MotionDecoder(lite_cfg(num_heads=3), 8)
    with pytest.raises(ValueError):
        MotionDecoder(lite_cfg(deconv_channels=[64, 64]), 8)
    with pytest.raises(ValueError):
        MotionModule(lite_cfg(image_scale=0.0), 8)


def test_crop_like() -> None:
    x = torch.arange(2 * 6 * 8, dtype=torch.float32).view(1, 2, 6, 8)
    out = crop_like(x, torch.zeros(3, 1, 5, 7))
    assert torch.equal(out, x[:, :, :5, :7])


# ------------------------------------------------------------------------------ export-friendliness
def test_trace_matches_eager_without_control_flow_warnings(lite: MotionModule) -> None:
    perturb_fuse(lite)
    cur, key = images(1, 64, 96)
    q = torch.randn(8, 1, 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(lite, (cur, key, q), strict=False)
    ours = [w for w in caught if w.filename.endswith("motion.py") and "boolean" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]
    with torch.no_grad():
        ref = lite(cur, key, q)
        got = traced(cur, key, q)
    torch.testing.assert_close(got[0], ref.flows)
    torch.testing.assert_close(got[1], ref.pixel_flow)


# Each block or stage below against its formula (spec docs/mpvss_architecture.md), written with
# torch.nn.functional and the module's own weights: a wrong level, a dropped position embedding or
# activation changes the values.

def _cfg(**overrides) -> MotionConfig:
    kw = dict(encoder_channels=[32, 64, 96, 128, 128, 192], deconv_channels=[64, 64, 64, 32], hidden_dim=128,
              num_layers=4, num_heads=4, ffn_dim=256, flow_embed_dim=64, mlp_hidden_dim=128)
    kw.update(overrides)
    return MotionConfig(**kw)


def _images(h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g) * 255, torch.rand(1, 3, h, w, generator=g) * 255


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values for every parameter (LayerNorm affines and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_encoder_is_the_flownets_tower_with_leaky_relu_0_1():
    """Spec §2.2: per block, conv (first stride 2, later 1, padding (k-1)//2) + LeakyReLU 0.1."""
    torch.manual_seed(0)
    enc = MotionEncoder([8, 8, 8, 8, 8, 8])
    x = torch.randn(1, 6, 64, 96)
    with torch.no_grad():
        got = enc(x)
        ref, y = [], x
        for i in range(1, 7):
            for j, layer in enumerate(getattr(enc, f"conv{i}")):
                c = layer.conv
                k = c.weight.shape[-1]
                y = F.leaky_relu(F.conv2d(y, c.weight, c.bias, stride=2 if j == 0 else 1, padding=(k - 1) // 2), 0.1)
            if i >= 2:
                ref.append(y)
    assert len(got) == 5
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (ref[0] < 0).any()  # the negative slope was exercised


def _reference_refine(dec, feats, query_init):
    """Spec §2.3 written out: conv6, conv5, conv4 projected + level embedding, sine positions
    re-added at every visit, joint post-norm self-attention then FFN, level i mod 3."""
    conv2, conv3, conv4, conv5, conv6 = feats
    levels = [conv6, conv5, conv4]
    pe = PositionEmbeddingSine(dec.hidden_dim // 2, normalize=True)
    srcs, poss = [], []
    for lvl, x in enumerate(levels):
        proj = dec.input_proj[lvl]
        src = F.conv2d(x, proj.weight, proj.bias) + dec.level_embed.weight[lvl].view(1, -1, 1, 1)
        srcs.append(src.flatten(2).permute(2, 0, 1))
        poss.append(pe._embed(x.shape[0], x.shape[-2], x.shape[-1], x.device).flatten(2).permute(2, 0, 1))
    n, b = query_init.shape[:2]
    qe = dec.query_embed.weight[:, None].expand(-1, b, -1)
    qf = query_init
    for i in range(dec.num_layers):
        lvl = i % 3
        seq = torch.cat([qf + qe, srcs[lvl] + poss[lvl]], dim=0)
        sa = dec.transformer_self_attention_layers[i]
        seq = sa.norm(seq + sa.self_attn(seq, seq, seq, need_weights=False)[0])
        ff = dec.transformer_ffn_layers[i]
        seq = ff.norm(seq + ff.linear2(F.relu(ff.linear1(seq))))
        qf, srcs[lvl] = seq[:n], seq[n:]
    refined = [s.permute(1, 2, 0).reshape(b, dec.hidden_dim, x.shape[-2], x.shape[-1]) for s, x in zip(srcs, levels)]
    return [conv2, conv3, refined[2], refined[1], refined[0]], qf


def test_refine_features_follow_the_joint_attention_of_the_spec():
    torch.manual_seed(0)
    m = MotionModule(_cfg(), 6).eval()
    _perturb(m)
    cur, key = _images(96, 160)
    q = torch.randn(6, 1, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = m.encoder(m.prepare_images(cur, key))
        got, got_q = m.decoder.refine_features(feats, q)
        ref, ref_q = _reference_refine(m.decoder, feats, q)
    torch.testing.assert_close(got_q, ref_q, rtol=1e-4, atol=1e-4)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _reference_pixel_flow(dec, refined):
    """Spec §2.4: predict_flow (3x3 p1) -> upsample_flow (4x4 s2 p1 transposed) and deconv (same,
    LeakyReLU 0.1), both cropped to the skip at the bottom/right, cat [skip, deconv, flow]."""
    conv2, conv3, conv4, conv5, conv6 = refined
    x = conv6
    for k, skip in zip((5, 4, 3, 2), (conv5, conv4, conv3, conv2)):
        h, w = skip.shape[-2:]
        flow = F.conv2d(x, getattr(dec, f"predict_flow{k + 1}").conv.weight, padding=1)
        up = F.conv_transpose2d(flow, getattr(dec, f"upsample_flow{k}").conv.weight, stride=2, padding=1)
        de = F.leaky_relu(F.conv_transpose2d(x, getattr(dec, f"deconv{k}").conv.weight, stride=2, padding=1), 0.1)
        x = torch.cat([skip, de[..., :h, :w], up[..., :h, :w]], dim=1)
    return F.conv2d(x, dec.predict_flow.conv.weight, padding=1)


@pytest.mark.parametrize("size", [(96, 160), (160, 224)])  # the second has odd conv5/conv6 sizes (cropped)
def test_pixel_flow_follows_the_flownets_refinement(size):
    torch.manual_seed(0)
    m = MotionModule(_cfg(), 6).eval()
    _perturb(m)
    cur, key = _images(*size)
    q = torch.randn(6, 1, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        refined, _ = m.decoder.refine_features(m.encoder(m.prepare_images(cur, key)), q)
        got = m.decoder.pixel_flow(refined)
        ref = _reference_pixel_flow(m.decoder, refined)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_flow_size_is_the_size_of_the_flows_for_any_scale():
    """flow_grid_size (what an export declares as the flows' shape) rounds each conv up: at scale
    0.3 a 64 x 224 pair enters as 19 x 67, whose conv2 grid is 5 x 17 (not 19 // 4 x 67 // 4)."""
    torch.manual_seed(0)
    m = MotionModule(_cfg(image_scale=0.3), 6).eval()
    cur, key = _images(64, 224)
    with torch.no_grad():
        out = m(cur, key, torch.randn(6, 1, 128))
    assert tuple(out.flows.shape[-2:]) == m.flow_size(64, 224) == (5, 17)


def test_crop_like_refuses_a_target_wider_than_the_input():
    with pytest.raises(ValueError, match="exceeds"):
        crop_like(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5))


def test_prepare_images_refuses_bad_widths_and_empty_valid_sizes():
    m = MotionModule(_cfg(), 2)
    cur, key = _images(64, 96)
    with pytest.raises(ValueError, match="multiples of 32"):
        m.prepare_images(cur[..., :80], key[..., :80])  # width 80
    with pytest.raises(ValueError, match="image_size"):
        m.prepare_images(cur, key, image_size=(0, 96))
    with pytest.raises(ValueError, match="image_size"):
        m.prepare_images(cur, key, image_size=(64, 0))
    with pytest.raises(ValueError, match="image_size"):
        m.prepare_images(cur, key, image_size=(64, 97))  # wider than the canvas
    four = torch.zeros(1, 4, 64, 96)
    with pytest.raises(ValueError, match="current and key"):
        m.prepare_images(four, four)  # not RGB frames


def test_prepare_images_odd_valid_size_matches_normalise_pad_then_resize():
    """Official input: normalise, zero the padding, then resize (spec §2.1). With an odd valid size the
    output row/column straddling the edge averages one valid and one padded pixel (mask 0.5)."""
    m = MotionModule(_cfg(), 2)
    cur, key = _images(64, 96)
    for t in (cur, key):
        t[..., 61:, :] = 0
        t[..., 91:] = 0
    x = m.prepare_images(cur, key, image_size=(61, 91))
    mean = torch.tensor([0.411, 0.432, 0.450] * 2).view(1, 6, 1, 1)
    mask = torch.zeros(64, 96)
    mask[:61, :91] = 1
    expected = F.avg_pool2d((torch.cat([cur, key], dim=1) / 255 - mean) * mask, 2)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
