"""Device selection: ``auto`` picks the GPU when the backend can use one there, else the CPU."""

from __future__ import annotations

import pytest
import torch

from mpvss_ros.model_loader import load_model, resolve_device, select_device
from mpvss_ros.ros.parameters import validate


def test_auto_without_a_gpu_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for backend, precision in (("torch", "fp32"), ("torch", "fp16"), ("onnxruntime", "fp32"), ("tensorrt", "fp16")):
        assert resolve_device("auto", backend, precision) == "cpu"
    assert select_device("auto") == torch.device("cpu")
    assert load_model("mpvss_lite", device="auto").device == torch.device("cpu")
    from mpvss_ros.runtime import backend_missing, load_backend

    assert backend_missing("torch", "auto") is None and load_backend("torch", device="auto").device.type == "cpu"
    with pytest.raises(ValueError, match="--device cpu"):
        select_device("cuda")


def test_auto_with_a_gpu_follows_what_the_backend_can_run_there(monkeypatch):
    import mpvss_ros.runtime.onnx_backend as onnx_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and select_device("auto") == torch.device("cuda")
    assert resolve_device("auto", "torch", "fp16") == "cuda"
    assert resolve_device("auto", "torch", "bf16") == "cpu"  # a CPU precision
    monkeypatch.setattr(onnx_backend, "onnxruntime_missing", lambda device="cpu": "no CUDA provider"
                        if str(device).startswith("cuda") else None)
    assert resolve_device("auto", "onnxruntime") == "cpu"  # onnxruntime without its CUDA provider
    monkeypatch.setattr(onnx_backend, "onnxruntime_missing", lambda device="cpu": None)
    assert resolve_device("auto", "onnxruntime") == "cuda"


def test_explicit_devices_are_kept_and_bad_ones_named():
    assert resolve_device("cpu", "tensorrt") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    assert select_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "tpu"):
        with pytest.raises(ValueError, match="device"):
            select_device(bad)
    assert validate({"device": "auto"}).device == "auto"  # the node's parameter
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        validate({"device": "gpu"})


def test_model_that_contradicts_the_stored_configuration_says_so_first(lite_checkpoint, tmp_path):
    """--model naming another architecture than the one a project checkpoint stores: the first
    line names the stored one and what to do, before the key list (fresh-user review)."""
    import yaml

    from mpvss_ros.checkpoints import CheckpointError
    from mpvss_ros.model_loader import load_model
    from mpvss_ros.paths import find_data

    doc = yaml.safe_load(find_data("config/models/mpvss_lite.yaml").read_text())
    doc["name"] = "lite_q16"
    doc["transformer_decoder"]["num_queries"] = 16
    other = tmp_path / "lite_q16.yaml"
    other.write_text(yaml.safe_dump(doc))
    with pytest.raises(CheckpointError) as exc:
        load_model(str(other), str(lite_checkpoint), "cpu")
    first = str(exc.value).splitlines()[0]
    assert "trained as mpvss_lite" in first and "--model mpvss_lite" in first and "leave out --model" in first
