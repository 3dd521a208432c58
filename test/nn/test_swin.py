"""Tests for mpvss_ros.nn.swin: the official D2SwinTransformer key layout and parameter counts,
(shifted-)window attention and the whole backbone against a dense reference written with
torch.nn.functional from the state dict (no windows, rolls, partitions or module calls), patch
merging's token order, padding, drop path, initialisation, and official-checkpoint recognition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpvss_ros.config import ConfigError, load_model_config, model_config_from_dict
from mpvss_ros.model_loader import PUBLISHED_MODELS, load_model, published_model_name
from mpvss_ros.nn import swin
from mpvss_ros.nn.mpvss import MPVSS
from mpvss_ros.nn.swin import (
    PatchMerging,
    SwinBlock,
    SwinTransformer,
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
)


def _count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _meta_model(name: str) -> MPVSS:
    with torch.device("meta"):  # shapes and counts only: no memory, no initialisation time
        return MPVSS(load_model_config(name))


# ---------------------------------------------------------------- official layout and counts
def test_official_totals():
    """The official README's parameter counts (spec 5.3): R101 103.1 M, Swin-B 147.0 M; the spec
    puts Swin-T near 88 M (the README's 114.0 M is inconsistent with its other rows)."""
    assert round(_count(_meta_model("mpvss_r101")), 1) == 103.1
    assert round(_count(_meta_model("mpvss_swin_base")), 1) == 147.0
    assert round(_count(_meta_model("mpvss_swin_tiny"))) == 88


def test_swin_tiny_backbone_is_the_standard_swin_t():
    """Swin-T's ImageNet classifier has 28,288,354 parameters (Liu et al. 2021, 28 M): less the
    head (768 x 1000 + 1000) and the final LayerNorm (2 x 768), plus the D2 version's four output
    LayerNorms (2 x (96 + 192 + 384 + 768))."""
    expected = 28_288_354 - (768 * 1000 + 1000) - 2 * 768 + 2 * (96 + 192 + 384 + 768)
    backbone = _meta_model("mpvss_swin_tiny").backbone
    assert sum(p.numel() for p in backbone.parameters()) == expected


@pytest.mark.parametrize("name, c, depths, heads, window", [
    ("mpvss_swin_tiny", 96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    ("mpvss_swin_large", 192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
])
def test_official_key_layout(name, c, depths, heads, window):
    """Spec 5.2's Swin keys and shapes, the predictor's input projections for 8C/4C/2C, and no
    key outside them."""
    sd = _meta_model(name).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("backbone.")}
    expected = {"backbone.patch_embed.proj.weight": (c, 3, 4, 4), "backbone.patch_embed.proj.bias": (c,),
                "backbone.patch_embed.norm.weight": (c,), "backbone.patch_embed.norm.bias": (c,)}
    for s, (depth, h) in enumerate(zip(depths, heads)):
        w = c * 2**s
        expected[f"backbone.norm{s}.weight"] = expected[f"backbone.norm{s}.bias"] = (w,)
        for b in range(depth):
            p = f"backbone.layers.{s}.blocks.{b}."
            expected.update({
                p + "norm1.weight": (w,), p + "norm1.bias": (w,), p + "norm2.weight": (w,), p + "norm2.bias": (w,),
                p + "attn.qkv.weight": (3 * w, w), p + "attn.qkv.bias": (3 * w,),
                p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
                p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                p + "attn.relative_position_index": (window**2, window**2),
                p + "mlp.fc1.weight": (4 * w, w), p + "mlp.fc1.bias": (4 * w,),
                p + "mlp.fc2.weight": (w, 4 * w), p + "mlp.fc2.bias": (w,),
            })
        if s < 3:
            expected[f"backbone.layers.{s}.downsample.norm.weight"] = (4 * w,)
            expected[f"backbone.layers.{s}.downsample.norm.bias"] = (4 * w,)
            expected[f"backbone.layers.{s}.downsample.reduction.weight"] = (2 * w, 4 * w)
    assert shapes == expected
    for i, width in enumerate((8 * c, 4 * c, 2 * c)):  # res5, res4, res3
        assert tuple(sd[f"sem_seg_head.pixel_decoder.input_proj.{i}.0.weight"].shape) == (256, width, 1, 1)
    assert tuple(sd["sem_seg_head.pixel_decoder.adapter_1.weight"].shape) == (256, c, 1, 1)


def test_relative_position_index_formula():
    m = 3
    idx = relative_position_index(m)
    for i in range(m * m):
        for j in range(m * m):
            (ri, ci), (rj, cj) = divmod(i, m), divmod(j, m)
            assert idx[i, j] == (ri - rj + m - 1) * (2 * m - 1) + (ci - cj + m - 1)


# ---------------------------------------------------------------- attention against a dense reference
def _band(pos: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """The window each row (or column) of ``pos`` falls in: windows start at multiples of M, or,
    shifted, at ``shift`` + multiples of M with the leading ``shift`` rows a window of their own
    (the cyclic shift's wrapped-around band, kept apart by the mask)."""
    if not shift:
        return pos // window
    return torch.where(pos < shift, torch.full_like(pos, -1), (pos - shift) // window)


def _dense_block(sd: dict, p: str, x: torch.Tensor, h: int, w: int, m: int, shift: int, heads: int) -> torch.Tensor:
    """Swin block ``p`` of state dict ``sd`` on tokens ``x`` (B, h*w, C) as one dense attention over
    the padded grid: each token attends to the tokens of its own (shifted) window, with the
    relative-position bias read from coordinate differences; LayerNorm before the padding (padded
    tokens are zeros), logits scaled by head_dim ** -0.5, exact GELU."""
    b, _, c = x.shape
    hd = c // heads
    hp, wp = -(-h // m) * m, -(-w // m) * m
    y = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    y = F.pad(y.view(b, h, w, c), (0, 0, 0, wp - w, 0, hp - h)).reshape(b, hp * wp, c)
    qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    q, k, v = (t.reshape(b, hp * wp, heads, hd).transpose(1, 2) for t in qkv.split(c, dim=-1))
    rows, cols = torch.arange(hp * wp) // wp, torch.arange(hp * wp) % wp
    br, bc = _band(rows, m, shift), _band(cols, m, shift)
    same = (br[:, None] == br[None, :]) & (bc[:, None] == bc[None, :])
    dr = (rows[:, None] - rows[None, :] + m - 1).clamp(0, 2 * m - 2)  # clamped outside the window: masked anyway
    dc = (cols[:, None] - cols[None, :] + m - 1).clamp(0, 2 * m - 2)
    bias = sd[p + "attn.relative_position_bias_table"][dr * (2 * m - 1) + dc].permute(2, 0, 1)  # (heads, N, N)
    bias = torch.where(same[None], bias, torch.full_like(bias, -math.inf))
    out = (((q @ k.transpose(-2, -1)) / math.sqrt(hd) + bias).softmax(-1) @ v).transpose(1, 2).reshape(b, hp * wp, c)
    out = F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    x = x + out.view(b, hp, wp, c)[:, :h, :w].reshape(b, h * w, c)
    z = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    z = F.linear(F.gelu(F.linear(z, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                 sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x + z


def _dense_merge(sd: dict, p: str, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Patch merging ``p``: [x(2i, 2j), x(2i+1, 2j), x(2i, 2j+1), x(2i+1, 2j+1)], odd sides zero-padded."""
    b, _, c = x.shape
    g = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
    out = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], dim=-1)
    out = F.layer_norm(out.reshape(b, -1, 4 * c), (4 * c,), sd[p + "norm.weight"], sd[p + "norm.bias"])
    return F.linear(out, sd[p + "reduction.weight"])


def _dense_backbone(sd: dict, image: torch.Tensor, c: int, depths, heads, m: int) -> dict:
    """res2..res5 of a Swin backbone from its state dict: patch embedding (the image padded to a
    multiple of 4 on the bottom and right) and LayerNorm, stages of alternating window and shifted
    (M // 2) window blocks, each stage's output LayerNorm, patch merging between stages."""
    b, _, hi, wi = image.shape
    x = F.conv2d(F.pad(image, (0, (-wi) % 4, 0, (-hi) % 4)), sd["patch_embed.proj.weight"],
                 sd["patch_embed.proj.bias"], stride=4)
    h, w = x.shape[2], x.shape[3]
    x = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
    out = {}
    for s, (depth, nh) in enumerate(zip(depths, heads)):
        dim = c * 2**s
        for blk in range(depth):
            x = _dense_block(sd, f"layers.{s}.blocks.{blk}.", x, h, w, m, 0 if blk % 2 == 0 else m // 2, nh)
        y = F.layer_norm(x, (dim,), sd[f"norm{s}.weight"], sd[f"norm{s}.bias"])
        out[f"res{s + 2}"] = y.transpose(1, 2).reshape(b, dim, h, w)
        if s < 3:
            x = _dense_merge(sd, f"layers.{s}.downsample.", x, h, w)
            h, w = (h + 1) // 2, (w + 1) // 2
    return out


def _randomise(net: torch.nn.Module) -> None:
    """Every parameter away from its initial value (as a checkpoint's are): LayerNorm scales near 1
    with non-zero shifts, non-zero linear biases, position-bias tables that matter."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, prm in net.named_parameters():
            noise = torch.randn(prm.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                prm.copy_(1 + 0.2 * noise)
            elif name.endswith("relative_position_bias_table"):
                prm.copy_(noise)
            else:
                prm.copy_(0.2 * noise / math.sqrt(max(prm[0].numel(), 1)) if prm.dim() > 1 else 0.2 * noise)


@pytest.mark.parametrize("h, w, shift", [(6, 9, 0), (6, 9, 1), (7, 5, 1), (3, 3, 1), (2, 4, 0)])
def test_block_matches_dense_window_attention(h, w, shift):
    """Windows of 3 with a shift of 1, on grids that need padding (7 x 5, 2 x 4), that fit (6 x 9)
    and that are one window (3 x 3); two images in the batch; every parameter randomised."""
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=3, shift=shift).eval()
    _randomise(block)
    with torch.no_grad():
        x = torch.randn(2, h * w, 8)
        hp, wp = -(-h // 3) * 3, -(-w // 3) * 3
        mask = shifted_window_mask(hp, wp, 3, shift) if shift else None
        got = block(x, (h, w), mask)
        want = _dense_block(block.state_dict(), "", x, h, w, 3, shift, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_block_mlp_is_exact_gelu():
    """fc1 -> exact (erf) GELU -> fc2, as the official Swin's nn.GELU(); inputs large enough that
    the tanh approximation differs beyond the tolerance."""
    torch.manual_seed(1)
    block = SwinBlock(dim=8, num_heads=2, window_size=3)
    x = torch.randn(50, 8) * 3
    with torch.no_grad():
        block.mlp.fc1.weight.normal_(0, 1)
        got = block.mlp(x)
        want = F.linear(F.gelu(F.linear(x, block.mlp.fc1.weight, block.mlp.fc1.bias)),
                        block.mlp.fc2.weight, block.mlp.fc2.bias)
    torch.testing.assert_close(got, want)


def test_stages_alternate_window_and_shifted_window_blocks():
    """W-MSA then SW-MSA with a shift of M // 2, alternating (Swin, section 3.2), in every stage;
    the MLP's hidden width is mlp_ratio x the stage width."""
    net = SwinTransformer(embed_dim=8, depths=(2, 3, 2, 1), num_heads=(1, 1, 2, 2), window_size=7, mlp_ratio=2.0)
    assert [[b.shift for b in stage.blocks] for stage in net.layers] == [[0, 3], [0, 3, 0], [0, 3], [0]]
    assert [stage.blocks[0].mlp.fc1.out_features for stage in net.layers] == [16, 32, 64, 128]


def test_shifted_window_mask_rejects_bad_grids():
    for h, w in ((10, 14), (14, 10)):  # either side off the window
        with pytest.raises(ValueError, match="multiple of the window"):
            shifted_window_mask(h, w, 7, 3)
    for shift in (0, 7):
        with pytest.raises(ValueError, match="shift"):
            shifted_window_mask(14, 14, 7, shift)


def test_modules_refuse_settings_outside_their_documented_range():
    with pytest.raises(ValueError, match="multiple of the number of heads"):
        WindowAttention(dim=8, num_heads=3, window_size=3)
    for shift in (-1, 3):
        with pytest.raises(ValueError, match="shift"):
            SwinBlock(dim=8, num_heads=2, window_size=3, shift=shift)
    with pytest.raises(ValueError, match="4 stages"):
        SwinTransformer(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1, 1), window_size=3)


def test_patch_merging_token_order():
    """Output token (i, j) reduces [x(2i, 2j), x(2i+1, 2j), x(2i, 2j+1), x(2i+1, 2j+1)] (the
    official order, which the reduction weights of a checkpoint depend on); an odd side is
    zero-padded."""
    torch.manual_seed(1)
    merge = PatchMerging(dim=4).eval()
    h, w = 3, 4
    x = torch.randn(1, h * w, 4)
    with torch.no_grad():
        got = merge(x, (h, w)).view(2, 2, 8)
        grid = F.pad(x.view(h, w, 4), (0, 0, 0, 0, 0, 1))
        for i in range(2):
            for j in range(2):
                cat = torch.cat([grid[2 * i, 2 * j], grid[2 * i + 1, 2 * j], grid[2 * i, 2 * j + 1],
                                 grid[2 * i + 1, 2 * j + 1]])
                torch.testing.assert_close(got[i, j], merge.reduction(merge.norm(cat)))


def test_backbone_outputs_and_padding():
    """res2..res5 at strides 4..32 with the stage widths; a side that is no multiple of the
    patch or the window pads instead of failing; batch elements are independent."""
    torch.manual_seed(2)
    net = SwinTransformer(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=3).eval()
    assert net.out_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = net(x)
        single = net(x[1:])
        odd = net(torch.randn(1, 3, 50, 70))
    for name, stride in {"res2": 4, "res3": 8, "res4": 16, "res5": 32}.items():
        assert out[name].shape == (2, net.out_channels[name], 64 // stride, 96 // stride)
        assert torch.isfinite(out[name]).all()
        torch.testing.assert_close(out[name][1:], single[name], rtol=1e-4, atol=1e-5)
    assert [tuple(t.shape[2:]) for t in odd.values()] == [(13, 18), (7, 9), (4, 5), (2, 3)]


@pytest.mark.parametrize("window", [3, 4])
def test_backbone_matches_dense_reference(window):
    """res2..res5 of a small Swin with every parameter randomised equal the dense reference, on a
    40 x 53 image: patch padding on one side only (53 % 4 = 1), window padding, odd grids before
    patch merging, non-square grids for the shifted-window masks."""
    torch.manual_seed(0)
    depths, heads, c = (2, 2, 2, 2), (1, 2, 2, 4), 8
    net = SwinTransformer(embed_dim=c, depths=depths, num_heads=heads, window_size=window).eval()
    _randomise(net)
    image = torch.randn(2, 3, 40, 53)
    with torch.no_grad():
        got = net(image)
        want = _dense_backbone(dict(net.state_dict()), image, c, depths, heads, window)
    assert [tuple(t.shape[2:]) for t in got.values()] == [(10, 14), (5, 7), (3, 4), (2, 2)]
    for name in ("res2", "res3", "res4", "res5"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)


def test_swin_initialisation():
    """Swin's init: linear weights trunc-normal std 0.02 and zero biases, LayerNorm 1 / 0, and the
    relative-position bias tables trunc-normal std 0.02 (not zero)."""
    torch.manual_seed(6)
    net = SwinTransformer(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=5)
    linears = [mod for mod in net.modules() if isinstance(mod, torch.nn.Linear)]
    weights = torch.cat([mod.weight.detach().flatten() for mod in linears])
    assert abs(weights.std().item() - 0.02) < 0.002
    assert all(mod.bias is None or torch.count_nonzero(mod.bias) == 0 for mod in linears)
    for mod in net.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)) and torch.count_nonzero(mod.bias) == 0
    tables = torch.cat([mod.relative_position_bias_table.detach().flatten() for mod in net.modules()
                        if isinstance(mod, WindowAttention)])
    assert abs(tables.std().item() - 0.02) < 0.003


def test_masks_cached_in_inference_mode_serve_training():
    """The stage keeps its last shifted-window mask; one made under torch.inference_mode (a
    validation pass) must not break a later training step's backward."""
    torch.manual_seed(6)
    net = SwinTransformer(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=3)
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        net.eval()
        net(x)
    assert net.layers[0]._mask is not None
    net.train()
    net(x)["res5"].sum().backward()
    assert net.patch_embed.proj.weight.grad is not None


def test_drop_path_only_in_training():
    torch.manual_seed(3)
    net = SwinTransformer(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=2,
                          drop_path_rate=0.9)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        net.eval()
        a, b = net(x)["res5"], net(x)["res5"]
        net.train()
        c = net(x)["res5"]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    """Stochastic depth: one keep/drop decision per sample, kept samples scaled by 1 / (1 - rate)."""
    torch.manual_seed(4)
    x = torch.ones(4000, 3, 5)
    per_sample = swin._drop_path(x, 0.25, True).flatten(1)
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)
    kept = per_sample[:, 0] != 0
    torch.testing.assert_close(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(swin._drop_path(x, 0.25, False), x)


def test_drop_path_rates_rise_linearly_over_all_blocks():
    """torch.linspace(0, drop_path_rate, sum(depths)) over the blocks of every stage, as the
    official D2SwinTransformer."""
    net = SwinTransformer(embed_dim=8, depths=(2, 1, 3, 2), num_heads=(1, 1, 2, 2), window_size=3, drop_path_rate=0.3)
    rates = [blk.drop_path for stage in net.layers for blk in stage.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 8))


def test_both_residual_branches_go_through_drop_path(monkeypatch):
    calls = []

    def drop_all(x, rate, training):
        calls.append((rate, training))
        return torch.zeros_like(x) if training else x

    monkeypatch.setattr(swin, "_drop_path", drop_all)
    torch.manual_seed(5)
    block = SwinBlock(dim=8, num_heads=2, window_size=3, shift=1, drop_path=0.2).train()
    x = torch.randn(2, 6 * 6, 8)
    with torch.no_grad():
        out = block(x, (6, 6), shifted_window_mask(6, 6, 3, 1))
    torch.testing.assert_close(out, x)  # both branches dropped: the block passes x through
    assert calls == [(0.2, True), (0.2, True)]


# ---------------------------------------------------------------- configuration and loading
def _small_swin_config(**backbone) -> dict:
    cfg = load_model_config("mpvss_lite").to_dict()
    cfg["backbone"] = {"type": "swin", "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4],
                       "window_size": 3, **backbone}
    cfg["name"], cfg["default_weights"] = "swin_test", None
    return cfg


@pytest.mark.parametrize("change, message", [
    ({"depths": [2, 2, 2]}, "need 4 entries"),
    ({"num_heads": [3, 2, 2, 4]}, "not a multiple of its 3 heads"),
    ({"mlp_ratio": 0.05}, "leaves the first stage's MLP no channel"),  # int(16 * 0.05) = 0
    ({"window_size": 33}, "at most 32"),
    ({"drop_path_rate": 1.0}, "drop_path_rate"),
    ({"window_size": 0}, ">= 1"),
])
def test_bad_swin_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        model_config_from_dict(_small_swin_config(**change))


def test_official_configs_are_recognised_from_their_keys():
    """Every official configuration is found from its own state dict's backbone, and nothing else
    is taken for one (this project's model, a ResNet-34-like depth, a Swin with a window of 6)."""
    for name in PUBLISHED_MODELS:
        assert published_model_name(_meta_model(name).state_dict()) == name
    assert published_model_name(MPVSS(load_model_config("mpvss_lite")).state_dict()) is None
    tiny = _meta_model("mpvss_swin_tiny").state_dict()
    other_window = {k: (torch.empty(11**2, v.shape[1], device="meta") if k.endswith("bias_table") else v)
                    for k, v in tiny.items()}
    assert published_model_name(other_window) is None
    damaged = dict(tiny, **{"backbone.patch_embed.proj.weight": torch.zeros(())})
    assert published_model_name(damaged) is None
    r50 = _meta_model("mpvss_r50").state_dict()
    fewer_blocks = {k: v for k, v in r50.items() if not k.startswith("backbone.res4.5.")}
    assert published_model_name(fewer_blocks) is None
    # the classes decide between models of one backbone: 19 (+1) Mask2Former Cityscapes, 150 none
    for rows, name in ((20, "mask2former_r50_cityscapes"), (125, "mpvss_r50"), (151, None)):
        head = dict(r50, **{"sem_seg_head.predictor.class_embed.weight": torch.empty(rows, 256, device="meta")})
        assert published_model_name(head) == name


def test_relative_position_index_may_be_absent_but_not_different(tmp_path):
    """The index is fixed by the window: a file without it loads (the model's own is kept); one
    whose index differs (permuted, across or within rows: it would load and mix up the position
    biases) is refused."""
    from mpvss_ros.checkpoints import CheckpointError, load_state_dict_strict

    torch.manual_seed(7)
    source = MPVSS(model_config_from_dict(_small_swin_config()))
    target = MPVSS(model_config_from_dict(_small_swin_config()))
    sd = source.state_dict()
    without = {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}
    load_state_dict_strict(target, without)
    for k, v in target.state_dict().items():
        assert torch.equal(v, sd[k]), k
    key = "backbone.layers.0.blocks.0.attn.relative_position_index"
    for dim in (0, 1):
        with pytest.raises(CheckpointError, match="derived-buffer mismatch"):
            load_state_dict_strict(target, dict(sd, **{key: sd[key].flip(dim)}))


def test_detectron2_swin_checkpoint_loads_exactly(tmp_path):
    """A detectron2-style file (``{"model": state_dict}``, no configuration) of a Swin MPVSS
    loads with its YAML, key for key, and segments as the model it came from."""
    cfg_path = tmp_path / "swin_test.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(_small_swin_config()))
    torch.manual_seed(5)
    source = MPVSS(model_config_from_dict(_small_swin_config())).eval()
    torch.save({"model": source.state_dict(), "iteration": 10}, tmp_path / "model_final.pth")
    loaded = load_model(cfg_path, tmp_path / "model_final.pth").model
    image = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        want = source.segment_key_frame(image, (64, 96))
        got = loaded.segment_key_frame(image, (64, 96))
    torch.testing.assert_close(got.mask_logits, want.mask_logits)
    torch.testing.assert_close(got.class_logits, want.class_logits)
