"""The PyTorch backend on CPU: the backbone channels-last, the rest NCHW, same outputs; bf16 weights."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from mpvss_ros.model_loader import load_model
from mpvss_ros.nn.backbones import Conv2dNorm
from mpvss_ros.nn.motion import MotionOutput
from mpvss_ros.runtime import BackendUnavailable, backend_missing
from mpvss_ros.runtime.torch_backend import (BF16_MODULES, CHANNELS_LAST_MODULES, TorchBackend, _conv_output_length,
                                             bf16_missing, fold_batch_norms, run_in_bf16, to_channels_last)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The 4-D weights whose layout is visible: 1x1 kernels and one-input-channel (depthwise)
    kernels are contiguous in both layouts at once."""
    return [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and tuple(p.shape[2:]) != (1, 1)]


def _is_channels_last(p: torch.Tensor) -> bool:
    return p.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [None, False])
def test_cpu_layout_follows_the_setting(channels_last):
    model = load_model("mpvss_lite").model
    backend = TorchBackend(model, "cpu", channels_last=channels_last)
    assert backend.describe()["channels_last"] is (channels_last is None)
    for name in CHANNELS_LAST_MODULES:
        weights = _conv_weights(model.get_submodule(name))
        assert weights and all(_is_channels_last(p) == (channels_last is None) for p in weights), name


def test_to_channels_last_converts_the_listed_modules_only():
    """mpvss_lite's masked-attention side has only 1x1 and depthwise kernels (layout-free), so a
    stand-in with a 3x3 convolution per top-level module checks which ones are converted."""
    model = torch.nn.Module()
    for name in ("backbone", "sem_seg_head", "motion"):
        model.add_module(name, torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)))
    to_channels_last(model, ("backbone",))  # what stage-2 training converts (the frozen part)
    for name, module in model.named_children():
        assert _is_channels_last(module[0].weight) == (name == "backbone"), name
    to_channels_last(model)
    for name, module in model.named_children():
        assert _is_channels_last(module[0].weight) == (name in CHANNELS_LAST_MODULES), name
    assert not _is_channels_last(model.sem_seg_head[0].weight)


def test_channels_last_gives_the_same_key_frame_and_flows():
    """Two copies of the same weights, one channels-last: logits and flows agree to float
    rounding on a seeded image pair, and the outputs are contiguous (NCHW) either way."""
    nchw = TorchBackend(load_model("mpvss_lite").model, "cpu", channels_last=False)
    nhwc = TorchBackend(load_model("mpvss_lite").model, "cpu")
    g = torch.Generator().manual_seed(0)
    key_image = torch.rand((1, 3, 96, 128), generator=g) * 255
    image = (key_image + torch.randn((1, 3, 96, 128), generator=g) * 8).clamp(0, 255)
    with torch.inference_mode():
        keys = [b.segment_key_frame(key_image, (90, 128)) for b in (nchw, nhwc)]
        flows = [b.query_flows(k, image) for b, k in zip((nchw, nhwc), keys)]
        warped = [b.propagate(k, image) for b, k in zip((nchw, nhwc), keys)]
    for name in ("class_logits", "mask_logits", "query_embeddings"):
        a, b = getattr(keys[0], name), getattr(keys[1], name)
        assert b.is_contiguous()
        torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-3)
    assert flows[1].is_contiguous() and warped[1].is_contiguous()
    torch.testing.assert_close(flows[1], flows[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(warped[1], warped[0], atol=2e-3, rtol=1e-3)
    assert float(np.abs(flows[0].numpy()).max()) > 0.1  # non-trivial flows were compared



def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (key frame, current frame) pair on a 96 x 128 canvas, RGB 0..255 float32."""
    g = torch.Generator().manual_seed(0)
    key_image = torch.rand((1, 3, 96, 128), generator=g) * 255
    return key_image, (key_image + torch.randn((1, 3, 96, 128), generator=g) * 8).clamp(0, 255)


@pytest.mark.skipif(bf16_missing() is not None, reason=f"{bf16_missing()}")
def test_bf16_runs_the_listed_modules_in_bfloat16_and_matches_fp32():
    """bf16 converts exactly :data:`BF16_MODULES`; outputs stay float32 and close to fp32's."""
    fp32 = TorchBackend(load_model("mpvss_lite").model, "cpu")
    model = load_model("mpvss_lite").model
    bf16 = TorchBackend(model, "cpu", precision="bf16")
    assert bf16.describe()["precision"] == "bf16" and bf16.name == "torch[bf16 weights]"
    low = {id(p) for name in BF16_MODULES for p in model.get_submodule(name).parameters()}
    assert low and all((p.dtype == torch.bfloat16) == (id(p) in low) for p in model.parameters())
    key_image, image = _pair()
    with torch.inference_mode():
        keys = [b.segment_key_frame(key_image, (90, 128)) for b in (fp32, bf16)]
        flows = [b.query_flows(k, image) for b, k in zip((fp32, bf16), keys)]
        chained = bf16.query_flows(keys[1], image, reference=image)
        warped = bf16.propagate(keys[1], image)
    for name in ("class_logits", "mask_logits", "query_embeddings"):
        a, b = getattr(keys[0], name), getattr(keys[1], name)
        assert b.dtype == torch.float32
        # bfloat16 keeps 8 bits of mantissa; through the backbone on this noise pair the errors
        # measured 5-7 % of each tensor's range at most and about 1 % on average.
        err, scale = (b - a).abs(), float(a.abs().max())
        assert float(err.max()) < 0.1 * scale and float(err.mean()) < 0.02 * scale, name
    agree = (keys[1].mask_logits.argmax(1) == keys[0].mask_logits.argmax(1)).float().mean()
    assert float(agree) > 0.9  # measured 0.93 on noise, where masks are ambiguous
    assert flows[1].dtype == chained.dtype == warped.dtype == torch.float32
    assert float((flows[1] - flows[0]).abs().max()) < 0.1 * float(flows[0].abs().max())
    assert float(flows[0].abs().max()) > 0.1
    assert warped.shape == keys[1].mask_logits.shape
    keep = torch.tensor([1, 8, 20])
    with torch.inference_mode():
        part = bf16.query_flows(replace(keys[1], active=keep), image)
        warped_part = bf16.propagate(replace(keys[1], active=keep), image)
    torch.testing.assert_close(part, flows[1][:, keep], rtol=0, atol=1e-5)  # the key frame's active queries
    torch.testing.assert_close(warped_part, warped[:, keep], rtol=0, atol=1e-4)


def test_bf16_is_a_cpu_precision_of_the_torch_backend():
    assert "fp16" in bf16_missing("cuda")
    assert "fp16" in backend_missing("tensorrt", "cuda", "bf16")
    assert "float32 graphs only" in backend_missing("onnxruntime", "cpu", "bf16")
    assert backend_missing("torch", "cpu", "bf16") == bf16_missing()
    if bf16_missing() is not None:
        with pytest.raises(BackendUnavailable, match="bfloat16"):
            TorchBackend(load_model("mpvss_lite").model, "cpu", precision="bf16")


def test_run_in_bf16_keeps_a_float32_interface():
    """bfloat16 weights inside; float32 (and integer) tensors in and out, nested outputs included."""

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, idx: torch.Tensor) -> dict:
            assert x.dtype == torch.bfloat16 and idx.dtype == torch.int64  # what the pre-hook passes in
            y = self.lin(x)
            return {"y": y, "pair": [y * 2, idx], "named": MotionOutput(y, idx)}

    torch.manual_seed(0)
    module = Two()
    x = torch.randn(5, 4)
    expected = module.lin(x)
    run_in_bf16(module)
    assert module.lin.weight.dtype == torch.bfloat16
    out = module(x, torch.arange(3))
    assert out["y"].dtype == out["pair"][0].dtype == torch.float32 and out["pair"][1].dtype == torch.int64
    assert isinstance(out["named"], MotionOutput)  # a NamedTuple is rebuilt field by field
    assert out["named"].flows.dtype == torch.float32 and out["named"].pixel_flow.dtype == torch.int64
    torch.testing.assert_close(out["y"], expected, atol=0.05, rtol=0.02)


def test_run_in_bf16_stores_the_weights_in_the_memory_format_given():
    """The bf16 weights of an NCHW module become channels-last when asked (the backend's bf16
    modules on CPU)."""
    seq = nn.Sequential(nn.Conv2d(4, 4, 3))
    run_in_bf16(seq, torch.channels_last)
    assert seq[0].weight.dtype == torch.bfloat16 and _is_channels_last(seq[0].weight)


@pytest.mark.skipif(bf16_missing() is not None, reason=f"{bf16_missing()}")
@pytest.mark.parametrize("stride, width", [(2, 1), (2, 2), (3, 3), (2, 5)])
def test_bf16_strided_convolutions_one_column_wide_read_only_their_input(stride, width):
    """oneDNN's bfloat16 convolution with a horizontal stride > 1 and an output one column wide
    (a thin frame's letterbox in the backbone or the motion encoder) returned whatever the memory
    it wrote to held: here freed tensors of 1e30 (NaN in the helper's run, caught as
    NonFiniteOutputError; other garbage would have been labels). Such convolutions run without
    oneDNN; wider ones keep it, and oneDNN is on again afterwards, also when one raises."""
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, stride, 1), torch.nn.ReLU(), torch.nn.Conv2d(64, 32, 3, stride, 1))
    reference = [torch.nn.Conv2d(64, 64, 3, stride, 1), torch.nn.Conv2d(64, 32, 3, stride, 1)]
    reference[0].load_state_dict(seq[0].state_dict())
    reference[1].load_state_dict(seq[2].state_dict())
    run_in_bf16(seq, torch.channels_last)
    assert torch.backends.mkldnn.enabled
    for _ in range(5):
        junk = [torch.full((1 << 16,), 1e30, dtype=torch.bfloat16) for _ in range(20)]
        del junk
        x = torch.randn(1, 64, 15, width)
        with torch.inference_mode():
            out = seq(x)
            expected = reference[1](torch.relu(reference[0](x)))
        assert out.dtype == torch.float32 and out.shape == expected.shape
        assert float((out - expected).abs().max()) < 0.05 * float(expected.abs().max()), "bfloat16 rounding only"
        assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError):
        seq(torch.randn(1, 3, 15, 1))  # the wrong number of channels: the first convolution raises
    assert torch.backends.mkldnn.enabled


def _batch_norms(module: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def _with_running_stats(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding has work to do."""
    g = torch.Generator().manual_seed(seed)
    for bn in _batch_norms(module):
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return module.eval()


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet50"])
def test_fold_batch_norms_keeps_the_outputs_and_removes_every_batch_norm(backbone):
    """MobileNetV2 ([Conv2d, BatchNorm2d] in nn.Sequential) and ResNet (Conv2dNorm with a
    BatchNorm2d norm): every BatchNorm2d folded, features equal to float rounding, idempotent."""
    from mpvss_ros.nn.backbones import MobileNetV2, ResNet

    torch.manual_seed(0)
    model = _with_running_stats(MobileNetV2() if backbone == "mobilenet_v2" else ResNet())
    expected_count = len(_batch_norms(model))
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        assert fold_batch_norms(model) == expected_count > 0
        after = model(x)
    assert not _batch_norms(model)
    for name in before:  # float32 rounding only: errors far below the features' own scale
        scale = float(before[name].abs().max())
        assert float((after[name] - before[name]).abs().max()) <= 1e-5 * scale, name
    assert fold_batch_norms(model) == 0  # nothing left to fold


def test_fold_batch_norms_refuses_training_mode():
    from mpvss_ros.nn.backbones import MobileNetV2

    model = MobileNetV2().train()
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batch_norms(model)


def test_torch_backend_folds_unless_told_not_to():
    """The default backend folds (inference); ``fold_batch_norm=False`` leaves the module tree
    and state-dict keys alone (stage-2 training wraps its model that way)."""
    model = load_model("mpvss_lite").model
    keys = set(model.state_dict())
    TorchBackend(model, "cpu", channels_last=False, fold_batch_norm=False)
    assert set(model.state_dict()) == keys and _batch_norms(model.backbone)
    assert len(_batch_norms(model.backbone)) == 52
    backend = TorchBackend(model, "cpu")
    assert backend.describe()["fold_batch_norm"] is True
    assert not _batch_norms(model.backbone) and set(model.state_dict()) != keys


def test_bf16_needs_the_instructions_not_only_onednn(monkeypatch):
    # oneDNN says bf16 is "supported" on any AVX-512 CPU, where it is emulated and slower
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    # raising=False: torch before 2.3 has neither probe (bf16_missing then reads them as absent)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert "AVX-512 BF16 or AMX" in bf16_missing("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert bf16_missing("cpu") is None
    # and the other way round: the instructions without oneDNN's bfloat16 kernels are not enough
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert "AVX-512 BF16 or AMX" in bf16_missing("cpu")


def test_bf16_on_a_torch_without_the_cpu_probes_names_torch_not_the_cpu(monkeypatch):
    # torch 2.1 has neither probe: saying the CPU lacks bfloat16
    # instructions would send an AMX machine's user the wrong way
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    missing = bf16_missing("cpu")
    assert missing.reason.startswith(f"torch {torch.__version__} cannot tell") and "newer torch" in missing.remedy
    # a torch with one of the two probes asks that one
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert bf16_missing("cpu") is None


# Folding, layout, bf16 and the one-column guard without bf16 hardware: weights, hooks and layout,
# or tiny convolutions on torch's reference kernels.

@contextlib.contextmanager
def _mkldnn(enabled: bool):
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def test_a_stand_in_without_motion_trained_counts_as_trained(band_model):
    assert TorchBackend(band_model, "cpu").motion_trained is True


def test_the_backend_puts_a_training_mode_model_in_eval_mode(band_model):
    model = band_model.train()
    backend = TorchBackend(model, "cpu")
    assert backend.model.training is False and model.training is False


def test_folding_uses_each_batch_norms_own_eps():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.5))
    seq[1].running_mean.copy_(torch.randn(4) * 0.5)
    seq[1].running_var.copy_(torch.rand(4) * 0.2 + 0.05)  # small variances: eps matters
    seq.eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        before = seq(x)
        assert fold_batch_norms(seq) == 1
        after = seq(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_fold_batch_norms_leaves_a_group_norm_alone():
    """A Conv2dNorm with a GroupNorm (the pixel decoder's) keeps its norm: only BatchNorm2d folds."""
    conv = Conv2dNorm(4, 4, 3, padding=1, norm=nn.GroupNorm(2, 4)).eval()
    assert fold_batch_norms(conv) == 0 and isinstance(conv.norm, nn.GroupNorm)


def test_to_channels_last_skips_a_missing_module_and_converts_the_next():
    model = nn.Module()
    model.add_module("motion", nn.Sequential(nn.Conv2d(4, 4, 3)))  # no "backbone" before it
    to_channels_last(model)
    assert model.motion[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_the_cpu_backend_runs_the_motion_module_channels_last():
    model = load_model("mpvss_lite").model
    TorchBackend(model, "cpu")
    weights = _conv_weights(model.motion)
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def _unchecked_backend(monkeypatch, model, precision="bf16", **kw):
    """A CPU TorchBackend of ``precision`` without the hardware check (no bf16 instructions or
    CUDA needed here; torch 2.13 autocasts to float16 on the CPU too)."""
    import mpvss_ros.runtime as runtime

    monkeypatch.setattr(runtime, "backend_missing", lambda *a, **k: None)
    return TorchBackend(model, "cpu", precision=precision, **kw)


def test_bf16_converts_the_motion_encoder_channels_last(monkeypatch):
    model = load_model("mpvss_lite").model
    _unchecked_backend(monkeypatch, model)
    enc = list(model.motion.encoder.parameters())
    assert enc and all(p.dtype == torch.bfloat16 for p in enc)
    weights = _conv_weights(model.motion.encoder)
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(p.dtype == torch.float32 for p in model.sem_seg_head.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_refuses_a_model_that_is_not_mpvss(monkeypatch, band_model, precision):
    with pytest.raises(BackendUnavailable, match="implemented for the MPVSS model"):
        _unchecked_backend(monkeypatch, band_model, precision)


def test_fp16_autocasts_the_decoder_and_returns_float32(monkeypatch):
    """fp16 (a CUDA precision, run here on the CPU's float16 autocast): the masked-attention
    decoder computes in float16; the key frame's logits, the flows and the warped masks come
    back float32, and the warp covers the key frame's active queries only."""
    model = load_model("mpvss_lite").model
    backend = _unchecked_backend(monkeypatch, model, "fp16")
    assert backend.name == "torch[fp16 autocast]" and backend.describe()["precision"] == "fp16"
    seen = []
    model.sem_seg_head.predictor.class_embed.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    key_image, image = _pair()
    keep = torch.tensor([1, 4, 7])
    with torch.inference_mode():
        key = backend.segment_key_frame(key_image, (90, 128))
        flows = backend.query_flows(key, image)
        warped = backend.propagate(key, image)
        warped_part = backend.propagate(replace(key, active=keep), image)
    assert seen and seen[0] == torch.float16
    assert key.class_logits.dtype == key.mask_logits.dtype == key.query_embeddings.dtype == torch.float32
    assert flows.dtype == warped.dtype == torch.float32
    assert warped_part.shape[1] == 3
    torch.testing.assert_close(warped_part, warped[:, keep], rtol=0, atol=1e-5)


@pytest.mark.parametrize("n, k, s, p, d", [(n, k, s, p, d) for n in range(1, 9) for k in (1, 3, 5) for s in (1, 2, 3)
                                           for p in (0, 1, 2) for d in (1, 2) if n + 2 * p >= d * (k - 1) + 1])
def test_conv_output_length_is_nn_conv2ds(n, k, s, p, d):
    conv = nn.Conv2d(1, 1, k, s, p, dilation=d)
    assert _conv_output_length(n, k, s, p, d) == conv(torch.zeros(1, 1, d * (k - 1) + 1, n)).shape[-1]


def _seen_mkldnn(conv):
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(torch.backends.mkldnn.enabled))  # runs after the guard's
    return seen


@pytest.mark.parametrize("stride, padding, width, guarded, more", [
    ((1, 2), (1, 1), 2, True, {}),    # horizontal stride only, output one column wide
    ((2, 1), (1, 1), 2, False, {}),   # vertical stride only: 2 columns out
    ((1, 2), (0, 1), 1, True, {}),    # asymmetric padding: the horizontal one counts
    ((1, 2), (1, 0), 3, True, {}),
    ((1, 2), (1, 1), 4, False, {}),
    (2, (0, 1), 2, True, {"kernel_size": (1, 3)}),     # the horizontal kernel counts
    ((1, 2), (1, 2), 2, True, {"dilation": (1, 2)}),   # and the horizontal dilation
    (2, "valid", 3, True, {}),                         # a string padding pads nothing
])
def test_the_one_column_guard_follows_the_horizontal_stride_and_padding(stride, padding, width, guarded, more):
    conv = nn.Conv2d(2, 2, **{"kernel_size": 3, "stride": stride, "padding": padding, **more})
    run_in_bf16(conv)
    seen = _seen_mkldnn(conv)
    with _mkldnn(True), torch.inference_mode():
        out = conv(torch.randn(1, 2, 5, width))
        assert seen == [not guarded]
        assert (out.shape[-1] == 1) == guarded
        assert torch.backends.mkldnn.enabled


def test_a_convolution_without_a_horizontal_stride_keeps_onednn():
    """Only strided convolutions are guarded: a stride-1 one with an output one column wide keeps oneDNN."""
    conv = nn.Conv2d(2, 2, 3, 1, 1)
    run_in_bf16(conv)
    seen = _seen_mkldnn(conv)
    with _mkldnn(True), torch.inference_mode():
        assert conv(torch.randn(1, 2, 5, 1)).shape[-1] == 1 and seen == [True]


def test_the_guard_turns_onednn_back_on_when_the_convolution_raises():
    conv = nn.Conv2d(8, 8, 3, 2, 1)
    run_in_bf16(conv)
    with _mkldnn(True):
        with pytest.raises(RuntimeError):
            conv(torch.randn(1, 3, 5, 1))  # wrong channel count, one column out
        assert torch.backends.mkldnn.enabled


def test_the_guard_leaves_a_user_disabled_onednn_off():
    """Also after an earlier guarded run of the same convolution with oneDNN on."""
    conv = nn.Conv2d(2, 2, 3, 2, 1)
    run_in_bf16(conv)
    with _mkldnn(True), torch.inference_mode():
        conv(torch.randn(1, 2, 5, 1))
        assert torch.backends.mkldnn.enabled
    with _mkldnn(False), torch.inference_mode():
        conv(torch.randn(1, 2, 5, 1))
        assert torch.backends.mkldnn.enabled is False
