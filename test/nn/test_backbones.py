"""Tests for mpvss_ros.nn.backbones: shapes, detectron2 key layout, parameter counts, ImageNet loading."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpvss_ros.config import BackboneConfig
from mpvss_ros.io.samples import imagenet_mobilenet_v2
from mpvss_ros.nn.backbones import (
    BasicStem,
    BottleneckBlock,
    Conv2dNorm,
    InvertedResidual,
    MobileNetV2,
    ResNet,
    build_backbone,
    load_imagenet_weights,
)
from mpvss_ros.nn.swin import SwinTransformer

H, W = 64, 96
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _mobilenet_weights() -> Path:
    path = imagenet_mobilenet_v2()
    if path is None:
        pytest.skip("shared data absent: weights/mobilenetv2_imagenet_features.pt not found (set MPVSS_SHARED_DATA)")
    return path


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_outputs(model: torch.nn.Module, out: dict[str, torch.Tensor], batch: int) -> None:
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, stride in STRIDES.items():
        t = out[name]
        assert t.dtype == torch.float32
        assert tuple(t.shape) == (batch, model.out_channels[name], H // stride, W // stride)
        assert torch.isfinite(t).all()


@pytest.fixture(scope="module")
def r50() -> ResNet:
    torch.manual_seed(0)
    return ResNet(50).eval()


def test_resnet50_shapes(r50: ResNet) -> None:
    assert r50.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    with torch.no_grad():
        out = r50(torch.randn(2, 3, H, W))
    _check_outputs(r50, out, 2)


def test_resnet50_param_count(r50: ResNet) -> None:
    assert round(_n_params(r50) / 1e6, 3) == 23.508


def test_resnet50_detectron2_keys(r50: ResNet) -> None:
    sd = r50.state_dict()
    expected = {
        "stem.conv1.weight": (64, 3, 7, 7),
        "stem.conv1.norm.weight": (64,),
        "stem.conv1.norm.bias": (64,),
        "stem.conv1.norm.running_mean": (64,),
        "stem.conv1.norm.running_var": (64,),
        "res2.0.shortcut.weight": (256, 64, 1, 1),
        "res2.0.shortcut.norm.running_var": (256,),
        "res2.0.conv1.weight": (64, 64, 1, 1),
        "res2.0.conv1.norm.weight": (64,),
        "res2.0.conv2.weight": (64, 64, 3, 3),
        "res2.0.conv3.weight": (256, 64, 1, 1),
        "res2.2.conv1.weight": (64, 256, 1, 1),
        "res3.0.shortcut.weight": (512, 256, 1, 1),
        "res3.0.conv1.weight": (128, 256, 1, 1),
        "res3.3.conv3.norm.running_mean": (512,),
        "res4.5.conv2.weight": (256, 256, 3, 3),
        "res5.0.shortcut.weight": (2048, 1024, 1, 1),
        "res5.2.conv3.weight": (2048, 512, 1, 1),
        "res5.2.conv3.norm.bias": (2048,),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    # No conv biases, shortcuts only in block 0, exactly 3/4/6/3 blocks.
    assert not any(k.endswith(("conv1.bias", "conv2.bias", "conv3.bias", "shortcut.bias")) for k in sd)
    shortcut_blocks = {k.split(".shortcut")[0] for k in sd if ".shortcut." in k}
    assert shortcut_blocks == {"res2.0", "res3.0", "res4.0", "res5.0"}
    for stage, n in zip(("res2", "res3", "res4", "res5"), (3, 4, 6, 3)):
        assert len(getattr(r50, stage)) == n
    # Every key is under stem or a stage; num_batches_tracked is the only non-detectron2 suffix.
    assert {k.split(".")[0] for k in sd} == {"stem", "res2", "res3", "res4", "res5"}
    suffixes = {k.rsplit(".", 1)[1] for k in sd}
    assert suffixes == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def test_resnet_stride_in_3x3(r50: ResNet) -> None:
    block = r50.res3[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)
    assert block.shortcut.stride == (2, 2)
    assert r50.res2[0].conv2.stride == (1, 1)


def test_a_strided_bottleneck_keeping_its_channels_has_a_strided_shortcut():
    """The 1x1 shortcut exists whenever the stride changes, not only the channels."""
    block = BottleneckBlock(32, 32, 8, stride=2).eval()
    assert block.shortcut is not None and block.shortcut.stride == (2, 2)
    with torch.no_grad():
        assert block(torch.randn(1, 32, 8, 8)).shape == (1, 32, 4, 4)


def test_stem_conv_has_msra_fan_out_init():
    """detectron2's c2_msra_fill: Kaiming normal over fan_out, std sqrt(2 / (64 * 7 * 7)) for the
    stem (fan_in would give sqrt(2 / (3 * 7 * 7)), 4.6 times larger)."""
    torch.manual_seed(0)
    std = float(BasicStem().conv1.weight.detach().std())
    assert std == pytest.approx(math.sqrt(2 / (64 * 49)), rel=0.1)


def test_resnet101_builds() -> None:
    torch.manual_seed(0)
    model = ResNet(101).eval()
    assert len(model.res4) == 23
    assert round(_n_params(model) / 1e6, 3) == 42.500
    with torch.no_grad():
        out = model(torch.randn(1, 3, H, W))
    _check_outputs(model, out, 1)


def test_resnet_bad_depth() -> None:
    with pytest.raises(ValueError, match="depth"):
        ResNet(34)


def test_mobilenetv2_shapes() -> None:
    torch.manual_seed(0)
    model = MobileNetV2().eval()
    assert model.out_channels == {"res2": 24, "res3": 32, "res4": 96, "res5": 1280}
    with torch.no_grad():
        out = model(torch.randn(2, 3, H, W))
    _check_outputs(model, out, 2)
    # Residual connections exactly where stride 1 and in == out channels.
    flags = [blk.use_res_connect for blk in list(model.features)[1:18]]
    t, f = True, False
    expected = [f, f, t, f, t, t, f, t, t, t, f, t, t, f, t, t, f]
    assert flags == expected
    assert round(_n_params(model) / 1e6, 3) == 2.224


def test_inverted_residual_stride_and_residual_rules():
    """Stride 1 or 2 only; the input is added only with stride 1 and equal channels."""
    with pytest.raises(ValueError, match="stride"):
        InvertedResidual(8, 8, 3, 6)
    block = InvertedResidual(16, 16, 2, 6).eval()
    assert not block.use_res_connect
    with torch.no_grad():
        assert block(torch.randn(1, 16, 8, 8)).shape == (1, 16, 4, 4)


def test_mobilenetv2_layout_keys() -> None:
    sd = MobileNetV2().state_dict()
    assert len(sd) == 312
    assert tuple(sd["features.0.0.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["features.1.conv.0.weight"].shape) == (32, 1, 3, 3)
    assert tuple(sd["features.1.conv.3.weight"].shape) == (16, 32, 1, 1)
    assert tuple(sd["features.2.conv.6.weight"].shape) == (24, 96, 1, 1)
    assert tuple(sd["features.17.conv.7.running_var"].shape) == (320,)
    assert tuple(sd["features.18.0.weight"].shape) == (1280, 320, 1, 1)
    assert tuple(sd["features.18.1.weight"].shape) == (1280,)


def test_mobilenetv2_loads_imagenet_weights() -> None:
    path = _mobilenet_weights()
    torch.manual_seed(0)
    model = MobileNetV2()
    model.load_imagenet_weights(path)
    file_sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = model.state_dict()
    assert set(sd) == set(file_sd)
    for k, v in file_sd.items():
        assert torch.equal(sd[k], v), k
    # BN running statistics are real (trained), not the defaults 0 / 1.
    bn = model.features[5].conv[1]
    assert bn.running_mean.abs().max() > 1e-2
    assert (bn.running_var - 1).abs().max() > 1e-2
    stem_bn = model.features[0][1]
    assert not torch.allclose(stem_bn.running_var, torch.ones_like(stem_bn.running_var))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, H, W))
    _check_outputs(model, out, 1)
    assert out["res5"].min() >= 0 and out["res5"].max() <= 6  # ends in ReLU6


def test_load_imagenet_weights_errors(tmp_path: Path) -> None:
    model = MobileNetV2()
    with pytest.raises(FileNotFoundError):
        load_imagenet_weights(model, tmp_path / "nope.pt")
    sd = model.state_dict()
    bad = dict(sd)
    del bad["features.3.conv.1.weight"]
    bad["features.99.weight"] = torch.zeros(1)
    bad["features.18.0.weight"] = torch.zeros(10, 320, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(ValueError) as err:
        load_imagenet_weights(model, path)
    msg = str(err.value)
    assert "features.3.conv.1.weight" in msg
    assert "features.99.weight" in msg
    assert "features.18.0.weight" in msg
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_imagenet_weights(model, tmp_path / "list.pt")
    torch.save({k: 0 for k in sd}, tmp_path / "ints.pt")  # the model's keys, but not tensors
    with pytest.raises(ValueError, match="state dict"):
        load_imagenet_weights(model, tmp_path / "ints.pt")
    with pytest.raises(FileNotFoundError):  # a directory is not a weights file
        load_imagenet_weights(model, tmp_path)
    # Each mismatch alone is a ValueError that names the key (not load_state_dict's RuntimeError).
    alone = {
        "features.3.conv.1.weight": {k: v for k, v in sd.items() if k != "features.3.conv.1.weight"},
        "features.99.weight": {**sd, "features.99.weight": torch.zeros(1)},
        "features.18.0.weight": {**sd, "features.18.0.weight": torch.zeros(10, 320, 1, 1)},
    }
    for i, (key, state) in enumerate(alone.items()):
        torch.save(state, tmp_path / f"alone{i}.pt")
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_imagenet_weights(model, tmp_path / f"alone{i}.pt")


@pytest.mark.parametrize("damage", ["empty", "text", "pickle header only", "legacy cut in half", "zip cut in half",
                                    "zip byte changed"])
def test_a_damaged_imagenet_weights_file_is_a_value_error_naming_it(tmp_path: Path, damage: str) -> None:
    """A damaged weights file raised torch's own KeyError, EOFError or RuntimeError (``mpvss
    train --imagenet-weights`` ended in a traceback for the first two), and a changed byte in a
    zip file's tensor loaded silently; each is now a ValueError naming the file, and the module
    keeps its weights."""
    model = MobileNetV2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "weights.pt"
    state = MobileNetV2().state_dict()
    if damage.startswith("zip"):
        torch.save(state, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "text":
        data = bytearray(b"features.0.0.weight: [0.1, 0.2]\n")
    elif damage == "pickle header only":
        data = data[:2]
    elif damage.endswith("cut in half"):
        data = data[:len(data) // 2]
    else:  # inside the largest tensor's bytes: the zip member's CRC no longer matches
        at = data.index(state["features.18.0.weight"].numpy().tobytes()[:64]) + 100
        data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"cannot read the MobileNetV2 weights {re.escape(str(path))}"):
        load_imagenet_weights(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_build_backbone() -> None:
    assert isinstance(build_backbone(BackboneConfig(type="mobilenet_v2")), MobileNetV2)
    r = build_backbone(BackboneConfig(type="resnet", depth=50))
    assert isinstance(r, ResNet) and r.depth == 50
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(BackboneConfig(type="vgg"))
    with pytest.raises(ValueError):
        build_backbone(BackboneConfig(type="resnet", depth=18))
    # swin takes its width, window, MLP ratio and stochastic-depth rate from the config.
    swin = build_backbone(BackboneConfig(type="swin", embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                                         window_size=4, mlp_ratio=2.0, drop_path_rate=0.1))
    assert isinstance(swin, SwinTransformer)
    assert swin.out_channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
    blocks = [b for stage in swin.layers for b in stage.blocks]
    assert {b.window_size for b in blocks} == {4}
    assert blocks[0].mlp.fc1.out_features == 64
    assert blocks[-1].drop_path == pytest.approx(0.1)


# Each block or stage below against its formula (spec docs/mpvss_architecture.md), written with
# torch.nn.functional and the module's own weights: a wrong level, a dropped position embedding or
# activation changes the values.

def _randomise_bn(module: nn.Module, seed: int = 0, bias_scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * bias_scale)


def _conv_bn_formula(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """A bias-free convolution and an eval-mode BatchNorm, with torch.nn.functional."""
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, groups=conv.groups)
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def test_bottleneck_ends_in_relu_of_the_sum():
    torch.manual_seed(0)
    block = BottleneckBlock(16, 32, 8, stride=2).eval()
    _randomise_bn(block)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        got = block(x)
        out = block.conv3(F.relu(block.conv2(F.relu(block.conv1(x)))))
        ref = F.relu(out + block.shortcut(x))
    assert (out + block.shortcut(x) < 0).any()
    torch.testing.assert_close(got, ref)


def test_stem_is_conv_bn_relu_maxpool():
    torch.manual_seed(0)
    stem = BasicStem().eval()
    _randomise_bn(stem)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = stem(x)
        ref = F.max_pool2d(F.relu(stem.conv1(x)), kernel_size=3, stride=2, padding=1)
    assert (got == 0).any() and got.min() >= 0
    torch.testing.assert_close(got, ref)


def test_conv2d_norm_relu_flag():
    torch.manual_seed(0)
    conv = Conv2dNorm(3, 4, 3, padding=1, bias=True, relu=True)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        raw = F.conv2d(x, conv.weight, conv.bias, padding=1)
        got = conv(x)
    assert (raw < 0).any()
    torch.testing.assert_close(got, F.relu(raw))
    # With a norm: relu(norm(conv(x))), the norm before the ReLU, the convolution with its groups.
    normed = Conv2dNorm(4, 6, 3, padding=1, groups=2, norm=nn.BatchNorm2d(6), relu=True).eval()
    _randomise_bn(normed)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        pre = _conv_bn_formula(x, normed, normed.norm)
        got = normed(x)
    assert (pre < 0).any()
    torch.testing.assert_close(got, F.relu(pre))


def test_mobilenet_outputs_are_taken_after_blocks_3_6_13_18_and_residuals_are_added():
    """Every stage written out as conv + BN pairs with ReLU6 after each pair, except the last pair
    of an inverted residual (linear bottleneck); BN biases large enough that ReLU6 clips at 6."""
    torch.manual_seed(0)
    model = MobileNetV2().eval()
    _randomise_bn(model, bias_scale=8.0)
    x = torch.randn(1, 3, 64, 64)
    clipped = []
    with torch.no_grad():
        out = model(x)
        y, ref = x, {}
        for idx, layer in enumerate(model.features):
            block = hasattr(layer, "conv")
            mods = list(layer.conv if block else layer)
            pairs = [(c, b) for c, b in zip(mods, mods[1:]) if isinstance(c, nn.Conv2d)]
            body = y
            for j, (conv, bn) in enumerate(pairs):
                body = _conv_bn_formula(body, conv, bn)
                if not block or j < len(pairs) - 1:
                    clipped.append(bool((body > 6).any()))
                    body = F.relu6(body)
            y = y + body if getattr(layer, "use_res_connect", False) else body
            if idx in (3, 6, 13, 18):
                ref[idx] = y
    assert clipped[0] and clipped[-1] and sum(clipped) > len(clipped) // 2
    for name, idx in (("res2", 3), ("res3", 6), ("res4", 13), ("res5", 18)):
        torch.testing.assert_close(out[name], ref[idx], rtol=1e-5, atol=1e-5)
