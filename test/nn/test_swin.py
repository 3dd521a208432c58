"""Tests for mpvss_ros.nn.swin: the official D2SwinTransformer key layout and parameter counts,
(shifted-)window attention against a dense reference written without windows, rolls or
partitions, patch merging's token order, padding, and official-checkpoint recognition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpvss_ros.config import ConfigError, load_model_config, model_config_from_dict
from mpvss_ros.model_loader import PUBLISHED_MODELS, load_model, published_model_name
from mpvss_ros.nn.mpvss import MPVSS
from mpvss_ros.nn.swin import (
    PatchMerging,
    SwinBlock,
    SwinTransformer,
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
def _band(pos: int, window: int, shift: int) -> int:
    """The window a row (or column) falls in: windows start at multiples of M, or, shifted, at
    ``shift`` + multiples of M with the leading ``shift`` rows a window of their own (the cyclic
    shift's wrapped-around band, kept apart by the mask)."""
    if not shift:
        return pos // window
    return 0 if pos < shift else 1 + (pos - shift) // window


def _dense_block(block: SwinBlock, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The block computed as one dense attention over the padded grid: each token attends to the
    tokens of its own (shifted) window, with the relative-position bias read from coordinate
    differences."""
    m, s = block.window_size, block.shift
    b, _, c = x.shape
    hp, wp = -(-h // m) * m, -(-w // m) * m
    y = F.pad(block.norm1(x).view(b, h, w, c), (0, 0, 0, wp - w, 0, hp - h)).reshape(b, hp * wp, c)
    attn = block.attn
    heads = attn.num_heads
    q, k, v = attn.qkv(y).reshape(b, hp * wp, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
    rows = [i // wp for i in range(hp * wp)]
    cols = [i % wp for i in range(hp * wp)]
    bias = torch.full((heads, hp * wp, hp * wp), -math.inf)
    for i in range(hp * wp):
        for j in range(hp * wp):
            if (_band(rows[i], m, s), _band(cols[i], m, s)) == (_band(rows[j], m, s), _band(cols[j], m, s)):
                entry = (rows[i] - rows[j] + m - 1) * (2 * m - 1) + (cols[i] - cols[j] + m - 1)
                bias[:, i, j] = attn.relative_position_bias_table[entry]
    out = ((logits + bias).softmax(-1) @ v).transpose(1, 2).reshape(b, hp, wp, c)
    out = attn.proj(out)[:, :h, :w].reshape(b, h * w, c)
    x = x + out
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("h, w, shift", [(6, 9, 0), (6, 9, 1), (7, 5, 1), (3, 3, 1), (2, 4, 0)])
def test_block_matches_dense_window_attention(h, w, shift):
    """Windows of 3 with a shift of 1, on grids that need padding (7 x 5, 2 x 4), that fit (6 x 9)
    and that are one window (3 x 3); two images in the batch."""
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=3, shift=shift).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1)  # a bias that matters
        x = torch.randn(2, h * w, 8)
        hp, wp = -(-h // 3) * 3, -(-w // 3) * 3
        mask = shifted_window_mask(hp, wp, 3, shift) if shift else None
        got = block(x, (h, w), mask)
        want = _dense_block(block, x, h, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stages_alternate_window_and_shifted_window_blocks():
    """W-MSA then SW-MSA with a shift of M // 2, alternating (Swin, section 3.2), in every stage."""
    net = SwinTransformer(embed_dim=8, depths=(2, 3, 2, 1), num_heads=(1, 1, 2, 2), window_size=7)
    assert [[b.shift for b in stage.blocks] for stage in net.layers] == [[0, 3], [0, 3, 0], [0, 3], [0]]


def test_shifted_window_mask_rejects_bad_grids():
    with pytest.raises(ValueError, match="multiple of the window"):
        shifted_window_mask(10, 14, 7, 3)
    with pytest.raises(ValueError, match="shift"):
        shifted_window_mask(14, 14, 7, 7)


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
    whose index differs (permuted: it would load and mix up the position biases) is refused."""
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
    permuted = dict(sd, **{key: sd[key].flip(0)})
    with pytest.raises(CheckpointError, match="derived-buffer mismatch"):
        load_state_dict_strict(target, permuted)


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
