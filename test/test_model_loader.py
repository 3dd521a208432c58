"""Device selection: ``auto`` picks the GPU when the backend can use one there, else the CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

import mpvss_ros.runtime.export as export_module
from mpvss_ros.checkpoints import CheckpointError
from mpvss_ros.config import load_model_config
from mpvss_ros.model_loader import load_exported, load_model, published_model_name, resolve_device, select_device
from mpvss_ros.paths import find_data
from mpvss_ros.runtime import backend_missing
from mpvss_ros.runtime.commands import cmd_export, load_model_and_backend
from mpvss_ros.runtime.export import build_contract
from mpvss_ros.runtime.torch_backend import TorchBackend
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
    for other in ("meta", "mps"):  # devices torch knows but the model does not run on
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got '" + other):
            select_device(other)
    assert validate({"device": "auto"}).device == "auto"  # the node's parameter
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        validate({"device": "gpu"})


def test_device_indices_torch_would_wrap_are_refused_everywhere(lite):
    """torch keeps a device index in 8 bits: cuda:256 would run on cuda:0 and cuda:255 on the current
    GPU. Every way in (the command line's select/resolve, backend_missing, a backend built directly,
    the node's parameter) refuses an index past 127 before torch sees it."""
    assert torch.device("cuda:256").index == 0  # the wrap this guards against (torch 2.x)
    for device in ("cuda:128", "cuda:255", "cuda:256", "cuda:99999999999999999999"):
        for call in (lambda: select_device(device), lambda: resolve_device(device, "onnxruntime"),
                     lambda: backend_missing("torch", device), lambda: TorchBackend(lite.model, device),
                     lambda: validate({"device": device})):
            with pytest.raises(ValueError, match="device index must be at most 127"):
                call()
    assert resolve_device("cuda:127") == "cuda:127"


def test_model_that_contradicts_the_stored_configuration_says_so_first(lite_checkpoint, tmp_path):
    """--model naming another architecture than the one a project checkpoint stores: the first
    line names the stored one and what to do, before the key list (fresh-user review)."""


    doc = yaml.safe_load(find_data("config/models/mpvss_lite.yaml").read_text())
    doc["name"] = "lite_q16"
    doc["transformer_decoder"]["num_queries"] = 16
    other = tmp_path / "lite_q16.yaml"
    other.write_text(yaml.safe_dump(doc))
    with pytest.raises(CheckpointError) as exc:
        load_model(str(other), str(lite_checkpoint), "cpu")
    first = str(exc.value).splitlines()[0]
    assert "trained as mpvss_lite" in first and "--model mpvss_lite" in first and "leave out --model" in first


def test_a_damaged_file_of_the_model_it_names_gets_the_key_list_not_the_other_model_advice(lite_checkpoint, tmp_path):
    """--model naming the very model the file stores, and a tensor of the wrong shape in it: the
    refusal names the tensor, not "trained as mpvss_lite, not mpvss_lite"."""
    payload = torch.load(lite_checkpoint, map_location="cpu", weights_only=True)
    key = next(k for k, v in payload["state_dict"].items() if v.dim() == 4)
    payload["state_dict"][key] = payload["state_dict"][key][:1]
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError) as exc:
        load_model("mpvss_lite", tmp_path / "damaged.pt")
    assert "trained as" not in str(exc.value) and key in str(exc.value)


def _resnet_keys(res4_blocks, classes=None):
    """The keys and shapes published_model_name reads of a detectron2 ResNet checkpoint."""
    state = {"backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7)}
    state.update({f"backbone.res4.{i}.conv1.weight": torch.zeros(1) for i in range(res4_blocks)})
    if classes is not None:
        state["sem_seg_head.predictor.class_embed.weight"] = torch.zeros(classes + 1, 8)
    return state


def test_a_published_resnet_is_told_by_its_res4_blocks_and_its_classes():
    """A file without a stored configuration: the ResNet depth from res4's block count (6: R50,
    23: R101, no other), then the classes where class_embed is present (19: Mask2Former
    Cityscapes); without class_embed the first published model of that depth."""
    assert published_model_name(_resnet_keys(6)) == "mpvss_r50"
    assert published_model_name(_resnet_keys(23)) == "mpvss_r101"
    assert published_model_name(_resnet_keys(6, classes=19)) == "mask2former_r50_cityscapes"
    assert published_model_name(_resnet_keys(6, classes=124)) == "mpvss_r50"
    assert published_model_name(_resnet_keys(6, classes=11)) is None
    assert published_model_name(_resnet_keys(4)) is None


# ------------------------------------------------------------ export folders (load_exported)
def _contract_folder(path, **contract_options):
    """An export folder of mpvss_lite at 64 x 96 whose graphs are empty files: enough for
    load_exported, which reads the contract and loads no graph."""
    path.mkdir()
    contract = build_contract(load_model_config("mpvss_lite"), (64, 96), **contract_options)
    (path / "contract.json").write_text(json.dumps(contract))
    for graph in contract["graphs"].values():
        (path / graph["file"]).write_bytes(b"")
    return path


def test_an_export_folder_loads_with_the_weights_and_trained_flag_its_contract_records(tmp_path, monkeypatch):
    """load_exported takes weights and trained from contract.json, records the folder as an
    absolute path (a relative --onnx-dir in a run record would not say which folder), and its
    provenance names the backend that runs it."""
    monkeypatch.chdir(tmp_path)
    _contract_folder(tmp_path / "untrained", trained=False)
    _contract_folder(tmp_path / "trained", weights="models/w.pt", trained=True)
    untrained = load_exported("untrained")
    assert untrained.trained is False and untrained.weights is None and untrained.model is None
    assert untrained.meta["onnx_dir"] == str(tmp_path / "untrained")
    trained = load_exported("trained")
    assert trained.trained is True and str(trained.weights) == "models/w.pt"
    assert trained.provenance() == {"model": "mpvss_lite", "weights": "models/w.pt",
                                    "onnx_dir": str(tmp_path / "trained"), "trained": True, "backend": None}
    described = argparse.Namespace(describe=lambda: {"backend": "onnxruntime"})
    assert trained.provenance(described)["backend"] == {"backend": "onnxruntime"}
    assert trained.provenance(argparse.Namespace())["backend"] is None  # a backend without describe()


# ------------------------------------------------------------ the command line's load (load_model_and_backend)
@pytest.fixture()
def recorded_loads(monkeypatch):
    """load_model and load_backend replaced by recorders of their arguments: what
    load_model_and_backend passes on for the command line's options."""
    import mpvss_ros.model_loader as model_loader
    import mpvss_ros.runtime as runtime

    calls = {}
    monkeypatch.setattr(model_loader, "load_model", lambda *a, **k: calls.setdefault("load_model", (a, k)) and "loaded")
    monkeypatch.setattr(runtime, "load_backend", lambda *a, **k: calls.setdefault("load_backend", (a, k)) and "backend")
    return calls


def _backend_args(**options) -> argparse.Namespace:
    """mpvss segment/eval's model and backend options, defaults unless given."""
    defaults = dict(model=None, weights=None, device="cpu", backend="torch", precision="fp32", cache_dir=None,
                    threads=None, onnx_dir=None, propagator="query_flow", study=False)
    return argparse.Namespace(**{**defaults, **options})


def test_the_command_line_loads_the_model_on_the_cpu_for_a_graph_backend_and_passes_its_options(
        recorded_loads, tmp_path, monkeypatch):
    """--backend onnxruntime --device cuda: the PyTorch model (exported, then dropped) loads on the
    CPU; the backend gets the device, precision, cache folder and threads, and takes the module over."""
    import mpvss_ros.runtime as runtime

    monkeypatch.setattr(runtime, "backend_missing", lambda *a, **k: None)  # as if onnxruntime ran on a GPU
    args = _backend_args(backend="onnxruntime", device="cuda", cache_dir=str(tmp_path), threads=2)
    assert load_model_and_backend(args) == ("loaded", "backend")
    (_, _, device), options = recorded_loads["load_model"]
    assert device == "cpu" and options == {"motion_optional": False}
    (name, loaded), options = recorded_loads["load_backend"]
    assert name == "onnxruntime" and loaded == "loaded"
    assert options == {"device": "cuda", "precision": "fp32", "cache_dir": str(tmp_path), "threads": 2,
                       "onnx_dir": None, "copy_model": False}


def test_the_command_line_resolves_auto_for_the_backend_it_runs(recorded_loads, monkeypatch):
    """--device auto with onnxruntime lacking its CUDA provider: the CPU, even where torch sees a GPU."""
    import mpvss_ros.runtime.onnx_backend as onnx_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnx_backend, "onnxruntime_missing", lambda device="cpu": "no CUDA provider"
                        if str(device).startswith("cuda") else None)
    load_model_and_backend(_backend_args(backend="onnxruntime", device="auto"))
    assert recorded_loads["load_backend"][1]["device"] == "cpu"


def test_the_study_needs_a_motion_module_even_with_optical_flow(recorded_loads):
    """eval --study runs query-flow rows: weights without a trained motion module are refused for
    it whatever --propagator says; segment with optical flow accepts them."""
    load_model_and_backend(_backend_args(propagator="optical_flow", study=True))
    assert recorded_loads.pop("load_model")[1] == {"motion_optional": False}
    load_model_and_backend(_backend_args(propagator="optical_flow"))
    assert recorded_loads["load_model"][1] == {"motion_optional": True}


def test_an_export_folder_is_refused_with_weights_alone(tmp_path):
    """--onnx-dir runs the folder's graphs: --weights without --model is refused too, before the
    folder is read."""
    with pytest.raises(ValueError, match="leave out --model/--weights"):
        load_model_and_backend(_backend_args(backend="onnxruntime", onnx_dir=str(tmp_path), weights="w.pt"))


# ------------------------------------------------------------ weights without a motion module
@pytest.fixture()
def per_frame_file(tmp_path):
    """A per-frame Mask2Former-style file: the mpvss_lite segmentor of a seeded model, no motion.*
    keys, detectron2's ``{"model": ...}``."""
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

    from mpvss_ros.propagation import build_propagator
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


def _lite_without_weights(folder: Path) -> Path:
    """mpvss_lite's configuration without default weights (a model that loads untrained), written
    as ``folder/bare.yaml``."""
    doc = yaml.safe_load(find_data("config/models/mpvss_lite.yaml").read_text())
    doc.pop("default_weights")
    path = folder / "bare.yaml"
    path.write_text(yaml.safe_dump(dict(doc, name="lite_without_weights")))
    return path


def test_an_untrained_model_is_initialised_from_its_seed(tmp_path):
    """A model without weights is initialised from ``seed``, whatever the global random state
    before: the same seed gives the same weights, another seed others."""
    bare = _lite_without_weights(tmp_path)
    states = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 1)):
        torch.manual_seed(global_seed)
        loaded = load_model(bare, seed=seed)
        assert not loaded.trained
        states.append(loaded.model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_mpvss_export_records_the_weights_and_whether_they_were_trained(tmp_path, monkeypatch):
    """mpvss export hands the file it loaded and whether it was trained to the contract: the
    shipped weights, or none for a model without default weights (an untrained export)."""
    class Exported(Exception):
        pass

    def export_onnx(model, out_dir, valid_hw, weights=None, trained=None):
        raise Exported(weights, trained)

    monkeypatch.setattr(export_module, "export_onnx", export_onnx)
    shipped = find_data(load_model_config("mpvss_lite").default_weights)
    for model, recorded in (("mpvss_lite", (str(shipped), True) if shipped else (None, False)),
                            (str(_lite_without_weights(tmp_path)), (None, False))):
        args = argparse.Namespace(out=str(tmp_path / "out"), model=model, weights=None, height=64, width=96,
                                  no_parity=True, threads=None)
        with pytest.raises(Exported) as exc:
            cmd_export(args)
        assert exc.value.args == recorded


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
    """--model '' (the node's model: '') with weights: the configuration stored in the file; the
    model comes in eval mode (BatchNorm on its running statistics)."""
    loaded = load_model("", load_model().weights)
    assert loaded.config.name == "mpvss_lite"
    assert not any(m.training for m in loaded.model.modules())
