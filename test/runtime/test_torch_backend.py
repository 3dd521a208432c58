"""The PyTorch backend's CPU layout: the backbone channels-last, the rest NCHW, same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpvss_ros.model_loader import load_model
from mpvss_ros.runtime.torch_backend import CHANNELS_LAST_MODULES, TorchBackend

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
    others = _conv_weights(model.sem_seg_head) + _conv_weights(model.motion)
    assert others and not any(_is_channels_last(p) for p in others)


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

