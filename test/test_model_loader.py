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


# ------------------------------------------------------------ weights without a motion module
@pytest.fixture()
def per_frame_file(tmp_path):
    """A per-frame Mask2Former-style file: the mpvss_lite segmentor of a seeded model, no motion.*
    keys, detectron2's ``{"model": ...}``."""
    from mpvss_ros.config import load_model_config
    from mpvss_ros.nn.mpvss import MPVSS

    torch.manual_seed(3)
    source = MPVSS(load_model_config("mpvss_lite"))
    segmentor = {k: v for k, v in source.state_dict().items() if not k.startswith("motion.")}
    path = tmp_path / "per_frame.pth"
    torch.save({"model": segmentor}, path)
    return path, segmentor


def test_weights_without_motion_load_only_for_a_run_that_needs_none(per_frame_file):
    """Refused by default (missing motion keys); with motion_optional the segmentor loads strictly,
    motion_trained is False, and query flow refuses the model while optical flow and copy run."""
    import numpy as np

    from mpvss_ros.checkpoints import CheckpointError
    from mpvss_ros.propagation import build_propagator
    from mpvss_ros.runtime.torch_backend import TorchBackend
    from mpvss_ros.scheduling import FixedIntervalScheduler
    from mpvss_ros.segmenter import VideoSegmenter

    path, segmentor = per_frame_file
    with pytest.raises(CheckpointError, match="a whole mpvss_lite segmentor without a motion module"):
        load_model("mpvss_lite", path)  # --model given: the hint too
    loaded = load_model("mpvss_lite", path, motion_optional=True)
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in segmentor.items())
    assert loaded.model.motion_trained is False and TorchBackend(loaded.model).motion_trained is False
    for target in (loaded.model, TorchBackend(loaded.model)):
        with pytest.raises(ValueError, match="query_flow needs a trained motion module"):
            build_propagator("query_flow", target)
    rng = np.random.default_rng(0)
    for name in ("optical_flow", "copy"):
        seg = VideoSegmenter(loaded.model, build_propagator(name, loaded.model), FixedIntervalScheduler(2))
        results = [seg.push(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), i / 15) for i in range(3)]
        assert [r.is_key_frame for r in results] == [True, False, True]
    assert load_model("mpvss_lite", motion_optional=True).model.motion_trained  # a whole file: trained


def test_an_onnxruntime_backend_of_weights_without_motion_refuses_query_flow(per_frame_file, tmp_path):
    pytest.importorskip("onnxruntime")
    from mpvss_ros.propagation import build_propagator
    from mpvss_ros.runtime import load_backend

    loaded = load_model("mpvss_lite", per_frame_file[0], motion_optional=True)
    backend = load_backend("onnxruntime", loaded, input_hw=(96, 128), cache_dir=tmp_path / "cache", threads=1)
    assert backend.motion_trained is False
    with pytest.raises(ValueError, match="query_flow needs a trained motion module"):
        build_propagator("query_flow", backend)
    whole = load_backend("onnxruntime", load_model("mpvss_lite"), input_hw=(96, 128), cache_dir=tmp_path / "cache",
                         threads=1)
    assert whole.motion_trained is True


def test_the_command_line_runs_weights_without_motion_with_optical_flow_only(per_frame_file, tmp_path, capsys):
    from mpvss_ros.cli import main

    path, _ = per_frame_file
    common = ["segment", "sample:bikes", "--model", "mpvss_lite", "--weights", str(path), "--max-frames", "3",
              "--no-progress", "--no-overlay"]
    assert main([*common, "--out", str(tmp_path / "dis"), "--propagator", "optical_flow"]) == 0
    assert len(list((tmp_path / "dis" / "labels").glob("*.png"))) == 3
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "qf")]) != 0  # query_flow, the default
    assert "without a motion module" in capsys.readouterr().err


def test_an_export_of_weights_without_motion_says_so_in_its_contract(per_frame_file, tmp_path):
    """A cache entry exported from a model without a motion module, run later as an export folder
    (--onnx-dir), must still refuse query flow: the contract records motion_trained."""
    pytest.importorskip("onnxruntime")
    from mpvss_ros.propagation import build_propagator
    from mpvss_ros.runtime import load_backend
    from mpvss_ros.runtime.export import export_onnx, read_contract

    loaded = load_model("mpvss_lite", per_frame_file[0], motion_optional=True)
    export_onnx(loaded.model, tmp_path / "export", (96, 128), check=False)
    assert read_contract(tmp_path / "export")["motion_trained"] is False
    backend = load_backend("onnxruntime", onnx_dir=tmp_path / "export", threads=1)
    assert backend.motion_trained is False
    with pytest.raises(ValueError, match="query_flow needs a trained motion module"):
        build_propagator("query_flow", backend)


def test_motion_keys_the_loader_ignores_do_not_make_a_motion_module(per_frame_file, tmp_path):
    """motion.flow_img_norm_* are ignored buffers: a file with only those has no motion module."""
    path, segmentor = per_frame_file
    with_norm = dict(segmentor, **{"motion.flow_img_norm_mean": torch.zeros(3)})
    torch.save({"model": with_norm}, tmp_path / "with_norm.pth")
    assert load_model("mpvss_lite", tmp_path / "with_norm.pth", motion_optional=True).model.motion_trained is False


def test_mpvss_export_takes_weights_without_motion_and_marks_the_contract(per_frame_file, tmp_path, capsys):
    """mpvss export (and build-engine, the same load) prepare graphs for a per-frame checkpoint, which
    the node and `segment --backend onnxruntime --propagator optical_flow` can run; the contract
    records that the motion module is untrained."""
    pytest.importorskip("onnxruntime")
    from mpvss_ros.cli import main
    from mpvss_ros.runtime.export import read_contract

    out = tmp_path / "export"
    assert main(["export", "--model", "mpvss_lite", "--weights", str(per_frame_file[0]), "--out", str(out),
                 "--height", "68", "--width", "160", "--no-parity"]) == 0  # bikes.mp4's 640 x 272, quartered
    printed = capsys.readouterr().out
    assert "motion_trained: false" in printed and "not query_flow" in printed
    assert read_contract(out)["motion_trained"] is False
    assert main(["segment", "sample:bikes", "--onnx-dir", str(out), "--backend", "onnxruntime", "--propagator",
                 "optical_flow", "--max-frames", "2", "--out", str(tmp_path / "seg"), "--no-progress",
                 "--no-overlay"]) == 0
    capsys.readouterr()
    # query flow (the default) and the study are refused when the folder loads, before its graphs
    assert main(["segment", "sample:bikes", "--onnx-dir", str(out), "--backend", "onnxruntime", "--max-frames", "2",
                 "--out", str(tmp_path / "qf"), "--no-progress", "--no-overlay"]) == 2
    assert "contract.json says motion_trained: false" in capsys.readouterr().err
    assert not (tmp_path / "qf").exists()
    assert main(["eval", "sample:bikes", "--self-reference", "--study", "--onnx-dir", str(out), "--backend",
                 "onnxruntime", "--max-frames", "4", "--intervals", "2", "--out", str(tmp_path / "study")]) == 2
    assert "contract.json says motion_trained: false" in capsys.readouterr().err
    # a whole model's export says nothing of it
    assert main(["export", "--model", "mpvss_lite", "--out", str(tmp_path / "whole"), "--height", "96", "--width",
                 "128", "--no-parity"]) == 0
    assert "motion_trained" not in capsys.readouterr().out


@pytest.mark.parametrize("meta, trained", [
    ({"stage": "segmentor", "motion_trained": False}, False),  # stage 1 now
    ({"stage": "segmentor"}, None),  # stage 1 before the key: trained only if its run started from such a file
    ({"stage": "segmentor", "motion_trained": None}, None),  # stage 1 started from such a file: still unknown
    ({"stage": "segmentor", "motion_trained": True}, True),  # stage 1 from a file with a trained one
    ({"stage": "query_flow", "motion_trained": True}, True),
    ({"stage": "query_flow"}, True),
    ({}, True),  # a file of ours without provenance (the shipped one has none of these)
])
def test_a_stage_1_file_runs_query_flow_only_with_a_trained_motion_module(tmp_path, meta, trained, caplog):
    """Stage 1 keeps the motion module frozen at its seeded initialisation and saves it: such a
    file holds motion.* keys, yet query flow would warp with an untrained module (labels without
    meaning, no warning). Its meta says so, and load_model treats it as a per-frame checkpoint.
    A stage-1 file from before the meta said so runs as it did, with a warning."""
    from mpvss_ros.checkpoints import CheckpointError, motion_module_trained, read_checkpoint, save_checkpoint
    from mpvss_ros.config import load_model_config
    from mpvss_ros.nn.mpvss import MPVSS
    from mpvss_ros.propagation import build_propagator

    cfg = load_model_config("mpvss_lite")
    path = tmp_path / "run.pt"
    save_checkpoint(path, MPVSS(cfg), cfg.to_dict(), meta)
    assert motion_module_trained(read_checkpoint(path)) is trained
    if trained is not False:
        assert load_model(weights=path).model.motion_trained is True
        assert ("does not record whether its motion module is trained" in caplog.text) is (trained is None)
        caplog.clear()  # also for a caller without query flow now: an export of it, or the node switched later, may
        assert load_model(weights=path, motion_optional=True).model.motion_trained is True
        assert ("does not record whether" in caplog.text) is (trained is None)
        return
    with pytest.raises(CheckpointError, match="stage-1 mpvss_lite segmentor whose motion module was never trained"):
        load_model(weights=path)
    loaded = load_model(weights=path, motion_optional=True)
    assert loaded.model.motion_trained is False
    with pytest.raises(ValueError, match="query_flow needs a trained motion module"):
        build_propagator("query_flow", loaded.model)
    build_propagator("optical_flow", loaded.model)



def test_load_backend_loads_weights_without_motion_when_told(per_frame_file):
    from mpvss_ros.checkpoints import CheckpointError
    from mpvss_ros.runtime import load_backend

    with pytest.raises(CheckpointError, match="without a motion module"):
        load_backend("torch", model="mpvss_lite", weights=per_frame_file[0])
    backend = load_backend("torch", model="mpvss_lite", weights=per_frame_file[0], motion_optional=True)
    assert backend.motion_trained is False


def test_the_study_refuses_query_flow_without_a_motion_module_before_its_first_row(per_frame_file, monkeypatch):
    from mpvss_ros.evaluation import study

    loaded = load_model("mpvss_lite", per_frame_file[0], motion_optional=True)
    rows = []
    monkeypatch.setattr(study, "_evaluate", lambda *a, **k: rows.append(a) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(ValueError, match="query_flow rows need a trained motion module"):
        study.key_interval_study(loaded, None, intervals=(1, 2), progress=False)
    assert rows == []



def test_an_empty_model_name_means_the_files_own_configuration(tmp_path):
    """--model '' (the node's model: '') with weights: the configuration stored in the file."""
    assert load_model("", load_model().weights).config.name == "mpvss_lite"
