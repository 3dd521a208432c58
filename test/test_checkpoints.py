"""Checkpoints: official detectron2 layout (.pth / .pkl), this project's format, failures."""

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import fill_the_disk_half_way
from mpvss_ros.checkpoints import (CheckpointError, load_checkpoint, load_state_dict_strict, read_checkpoint,
                                   read_state_dict, save_checkpoint)
from mpvss_ros.config import load_model_config, model_config_from_dict
from mpvss_ros.model_loader import load_model
from mpvss_ros.nn.mpvss import MPVSS
from mpvss_ros.runtime.export import CONTRACT_FILE, build_contract, contract_problems, read_contract


def _random_model(cfg, seed: int) -> MPVSS:
    """An MPVSS of ``cfg`` whose every floating-point tensor (buffers too) is N(0, 1) from ``seed``."""
    torch.manual_seed(seed)
    model = MPVSS(cfg)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


@pytest.fixture(scope="module")
def r50_pair():
    cfg = load_model_config("mpvss_r50")
    source = _random_model(cfg, 1)
    torch.manual_seed(2)
    return source, MPVSS(cfg)


def _official_dict(model: MPVSS, frozen_bn: bool) -> dict:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if frozen_bn:  # detectron2 FrozenBN carries no num_batches_tracked
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    sd["criterion.empty_weight"] = torch.ones(125)
    return sd


def _assert_same(a: MPVSS, b: MPVSS) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(sa[k], sb[k]), k


def test_official_pth_under_model_reloads_exactly(tmp_path, r50_pair):
    source, target = r50_pair
    path = tmp_path / "mpvss_r50_official.pth"
    torch.save({"model": _official_dict(source, frozen_bn=True), "iteration": 89999}, path)
    load_checkpoint(target, path)
    _assert_same(source, target)


def test_a_data_parallel_prefix_is_stripped_as_detectron2_does(tmp_path, r50_pair):
    """A file saved from a DistributedDataParallel wrapper has ``module.`` on every key; detectron2
    strips it when every key has it, and so does the reader (one key without it: kept as is)."""
    source, target = r50_pair
    sd = _official_dict(source, frozen_bn=True)
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    load_checkpoint(target, tmp_path / "ddp.pth")
    _assert_same(source, target)
    mixed = {f"module.{k}": v for k, v in sd.items()}
    mixed["criterion.empty_weight"] = torch.ones(125)
    torch.save({"model": mixed}, tmp_path / "mixed.pth")
    assert all(k.startswith("module.") for k in read_checkpoint(tmp_path / "mixed.pth").state_dict
               if k != "criterion.empty_weight")


def test_a_per_frame_mask2former_file_is_named_as_such(tmp_path, r50_pair):
    """A whole official R50 segmentor without a motion module (what the official training starts
    from) is told what it is and how to train its motion module, not to pass --model."""
    source, _ = r50_pair
    sd = {k: v for k, v in _official_dict(source, frozen_bn=True).items() if not k.startswith("motion.")}
    torch.save({"model": sd}, tmp_path / "per_frame.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(None, tmp_path / "per_frame.pth")
    assert "is a whole mpvss_r50 segmentor without a motion module" in str(err.value)
    assert f"mpvss train motion --init-checkpoint {tmp_path / 'per_frame.pth'}" in str(err.value)
    assert "pass --model" not in str(err.value)


def test_a_missing_part_loads_only_when_asked_and_only_when_wholly_absent():
    """absent_part lets a per-frame Mask2Former file (no motion module) load into MPVSS; without
    it, or with some of the part's keys in the file, the missing keys are listed."""
    torch.manual_seed(0)
    cfg = load_model_config("mpvss_lite")
    source, target = MPVSS(cfg), MPVSS(cfg)
    motion_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("motion.")}
    segmentor = {k: v for k, v in source.state_dict().items() if not k.startswith("motion.")}
    with pytest.raises(CheckpointError, match="missing key"):
        load_state_dict_strict(target, segmentor)
    load_state_dict_strict(target, segmentor, absent_part="motion.")
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in segmentor.items())
    assert all(torch.equal(after[k], v) for k, v in motion_before.items())
    some_motion = dict(segmentor, **{k: v for k, v in list(motion_before.items())[:2]})
    with pytest.raises(CheckpointError, match="missing key"):
        load_state_dict_strict(target, some_motion, absent_part="motion.")


def test_official_pkl_numpy_reloads_exactly(tmp_path, r50_pair):
    source, target = r50_pair
    with torch.no_grad():
        for t in target.state_dict().values():
            t.zero_()
    sd = {k: v.numpy() for k, v in _official_dict(source, frozen_bn=False).items()}
    path = tmp_path / "model_final.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": sd, "__author__": "test"}, f)
    load_checkpoint(target, path)
    _assert_same(source, target)


def test_missing_unexpected_and_shape_errors_list_keys(tmp_path, r50_pair):
    source, target = r50_pair
    sd = _official_dict(source, frozen_bn=True)
    del sd["motion.decoder.fuse_layer.conv.bias"]
    sd["sem_seg_head.predictor.static_query.weight"] = torch.zeros(100, 256)
    sd["sem_seg_head.predictor.class_embed.weight"] = torch.zeros(20, 256)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target, path)
    text = str(err.value)
    assert "1 missing key(s)" in text and "motion.decoder.fuse_layer.conv.bias" in text
    assert "1 unexpected key(s)" in text and "static_query" in text
    assert "class_embed.weight: file (20, 256) vs model (125, 256)" in text


def test_corrupt_missing_and_malicious_files(tmp_path):
    model = MPVSS(load_model_config("mpvss_lite"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(model, corrupt)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"a": Evil()}}))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_state_dict(evil)
    evil_pt = tmp_path / "evil.pth"
    torch.save({"model": {"a": np.ones(2)}}, evil_pt)  # a numpy object: not allowed by weights_only
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(evil_pt)


@pytest.mark.parametrize("array", [np.array(["a", "b"]), np.array([1, "x"], dtype=object),
                                   np.array(["2026-01-01"], dtype="datetime64[D]"), np.ones(2, np.complex64)])
def test_pkl_arrays_that_hold_no_weights_are_refused(tmp_path, array):
    """A .pkl of strings, objects, dates or complex numbers: torch.from_numpy raised TypeError (a
    traceback from the command line) or made a complex tensor."""
    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.ones(2, np.float32), "odd": array}}))
    with pytest.raises(CheckpointError, match=re.escape(f"array 'odd' holds {array.dtype} values, not numbers")):
        read_state_dict(path)


def test_a_protocol_0_pkl_is_read(tmp_path):
    """A detectron2 .pkl written with pickle protocol 0 has no 0x80 header byte: the header check
    for torch files does not apply to .pkl, whatever the suffix's case (torch's weights-only reader
    refused numpy in a .PKL)."""
    for name in ("model_final.pkl", "MODEL_FINAL.PKL"):
        path = tmp_path / name
        with path.open("wb") as f:
            pickle.dump({"model": {"w": np.arange(3, dtype=np.float32)}}, f, protocol=0 if name.islower() else 2)
        assert (path.read_bytes()[:1] != b"\x80") is name.islower()
        assert torch.equal(read_checkpoint(path).state_dict["w"], torch.arange(3, dtype=torch.float32)), name


def test_damaged_weights_are_refused(tmp_path):
    # bytes zeroed inside the shipped file: torch.load alone reads it (one weight silently changed)
    shipped = Path(__file__).resolve().parents[1] / "models" / "mpvss_lite_camvid.pt"
    data = bytearray(shipped.read_bytes())
    start = int(len(data) * 0.4)  # inside one tensor's data (at the middle torch.load itself fails)
    data[start : start + 20_000] = bytes(20_000)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    torch.load(damaged, map_location="cpu", weights_only=True)  # no error from torch alone
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        read_checkpoint(damaged)
    # a weight that diverged to NaN made every pixel class 0
    cfg = load_model_config("mpvss_lite")
    model = MPVSS(cfg)
    with torch.no_grad():
        next(model.parameters()).view(-1)[3] = float("nan")
    nan_file = tmp_path / "nan.pt"
    save_checkpoint(nan_file, model, cfg.to_dict())
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_model(None, nan_file)
    with torch.no_grad():  # an overflow to infinity, without any NaN
        next(model.parameters()).view(-1)[3] = float("inf")
    save_checkpoint(nan_file, model, cfg.to_dict())
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_model(None, nan_file)


def test_own_format_round_trip_and_self_describing(tmp_path):
    cfg = load_model_config("mpvss_lite")
    torch.manual_seed(3)
    model = MPVSS(cfg)
    path = tmp_path / "lite.pt"
    save_checkpoint(path, model, cfg.to_dict(), meta={"steps": 7})
    # weights_only loading of the raw file works.
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "mpvss_ros" and raw["meta"] == {"steps": 7, "stored_dtype": "float32"}
    loaded = load_model(None, path)
    assert loaded.trained and loaded.config.name == "mpvss_lite" and loaded.meta["steps"] == 7
    _assert_same(model, loaded.model)


def test_half_storage_loads_into_float32(tmp_path):
    cfg = load_model_config("mpvss_lite")
    torch.manual_seed(4)
    model = MPVSS(cfg)
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    save_checkpoint(full, model, cfg.to_dict())
    save_checkpoint(half, model, cfg.to_dict(), half=True)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    raw = torch.load(half, weights_only=True)
    assert raw["meta"]["stored_dtype"] == "float16"
    # the file says how it is stored, whatever a caller's meta (copied from another file) claims
    save_checkpoint(full, model, cfg.to_dict(), {"stored_dtype": "float16", "stage": "x"})
    assert torch.load(full, weights_only=True)["meta"] == {"stored_dtype": "float32", "stage": "x"}
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())
    ints = {k: v.dtype for k, v in model.state_dict().items() if not v.is_floating_point()}
    assert ints and all(raw["state_dict"][k].dtype == dtype for k, dtype in ints.items())  # counters stay integers
    loaded = load_model(None, half).model
    for k, v in model.state_dict().items():
        w = loaded.state_dict()[k]
        assert w.dtype == v.dtype, k
        if v.is_floating_point():
            assert torch.equal(w, v.half().float()), k


def test_untrained_default_is_reported(monkeypatch, caplog):
    monkeypatch.setattr("mpvss_ros.model_loader.resolve_data_path", lambda p: None)
    loaded = load_model("mpvss_lite")
    assert not loaded.trained and loaded.weights is None
    assert "UNTRAINED" in caplog.text


def test_given_weights_missing_is_an_error():
    with pytest.raises(CheckpointError, match="weights file not found: /no/such.pt"):
        load_model("mpvss_lite", "/no/such.pt")


def test_official_file_without_config_is_recognised_and_its_normalisation_checked(tmp_path):
    from mpvss_ros.model_loader import published_model_name

    cfg = load_model_config("mpvss_r50")
    assert cfg.postprocess.min_query_score == 0.0  # faithful: Mask2Former scores every query
    model = MPVSS(cfg)
    official = {k: v for k, v in model.state_dict().items()}
    assert published_model_name(official) == "mpvss_r50"
    assert published_model_name(MPVSS(load_model_config("mpvss_lite")).state_dict()) is None
    path = tmp_path / "mpvss_r50_official.pth"
    torch.save({"model": official, "iteration": 9}, path)
    loaded = load_model(None, path)  # no --model: the keys say which model
    assert loaded.config.name == "mpvss_r50" and loaded.trained
    # a file that stores another input normalisation (BGR mean) is refused, not loaded silently
    bgr = dict(official, pixel_mean=torch.tensor([103.53, 116.28, 123.675]).view(1, 3, 1, 1))
    torch.save({"model": bgr}, tmp_path / "bgr.pth")
    with pytest.raises(CheckpointError, match="pixel_mean .* differs"):
        load_model("mpvss_r50", tmp_path / "bgr.pth")
    unit_std = dict(official, pixel_std=torch.ones(1, 3, 1, 1))  # 0..1 inputs' normalisation
    torch.save({"model": unit_std}, tmp_path / "unit_std.pth")
    with pytest.raises(CheckpointError, match="pixel_std .* differs"):
        load_model("mpvss_r50", tmp_path / "unit_std.pth")
    same = dict(official, pixel_mean=torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1))
    torch.save({"model": same}, tmp_path / "same.pth")
    assert load_model("mpvss_r50", tmp_path / "same.pth").trained


def test_float_weights_cast_to_integers_and_long_key_lists_are_refused(tmp_path):
    """A copy of the weights with its floats cast to int64 loaded and made every pixel class 0;
    a file of another model listed a thousand keys."""
    cfg = load_model_config("mpvss_lite")
    model = MPVSS(cfg)
    sd = {k: (v.long() if v.is_floating_point() and k.startswith("backbone.") else v)
          for k, v in model.state_dict().items()}
    path = tmp_path / "int.pt"
    torch.save({"format": "mpvss_ros", "state_dict": sd, "model_config": cfg.to_dict(), "meta": {}}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(None, path)
    text = str(err.value)
    n = sum(1 for k, v in model.state_dict().items() if v.is_floating_point() and k.startswith("backbone."))
    assert f"{n} dtype mismatch key(s)" in text and "file torch.int64 vs model torch.float32" in text
    assert f"... and {n - 20} more" in text and len(text.splitlines()) < 30


@pytest.mark.parametrize("meta", [[1, 2], 5, "ab", [], 0, ""])  # empty ones too: only None means "no meta"
def test_a_checkpoint_whose_meta_is_not_a_mapping_is_refused(tmp_path, meta):
    cfg = load_model_config("mpvss_lite")
    path = tmp_path / "meta.pt"
    torch.save({"format": "mpvss_ros", "state_dict": MPVSS(cfg).state_dict(), "model_config": cfg.to_dict(),
                "meta": meta}, path)
    with pytest.raises(CheckpointError, match="'meta' must be a mapping"):
        read_checkpoint(path)


def test_random_bytes_get_one_line_without_unsafe_advice(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    text = str(err.value)
    assert len(text.splitlines()) == 1 and "weights_only set to False" not in text


def test_a_text_file_or_a_folder_given_as_weights_says_what_it_is(tmp_path):
    # a text file said "KeyError: 101" (torch.load reading its bytes as pickle opcodes), a folder
    # "checkpoint not found"
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a model\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint .*starts with b'hello, n'"):
        read_checkpoint(text)
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a file"):
        read_checkpoint(tmp_path / "folder.pt")
    legacy = tmp_path / "legacy.pth"  # torch.save's pre-1.6 format: a pickle, still read
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy).state_dict["w"], torch.ones(2))


def test_a_truncated_download_is_not_called_a_foreign_file(tmp_path):
    # torch.save's zip cut in half (an interrupted download) fails zipfile.is_zipfile; the
    # up-front check called it "not a PyTorch checkpoint (neither torch.save's zip format ...)"
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.ones(64, 64)}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut short or damaged") as err:
        read_checkpoint(cut)
    assert "not a PyTorch checkpoint" not in str(err.value)
    # the legacy (pre-zip) format cut short: torch raises RuntimeError, one checkpoint error all the same
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(1000)}, legacy, _use_new_zipfile_serialization=False)
    cut.write_bytes(legacy.read_bytes()[: legacy.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*cut.pt: RuntimeError"):
        read_checkpoint(cut)


def test_an_unpickling_error_without_a_message_is_still_one_checkpoint_error(tmp_path, monkeypatch):
    """The error line takes the message's first line; an empty message raised IndexError instead."""

    import mpvss_ros.checkpoints as checkpoints

    path = tmp_path / "empty_message.pt"
    path.write_bytes(b"x")
    monkeypatch.setattr(checkpoints, "torch_load_checked", lambda p: (_ for _ in ()).throw(pickle.UnpicklingError()))
    with pytest.raises(checkpoints.CheckpointError, match="cannot read checkpoint .*not a PyTorch checkpoint"):
        checkpoints.read_checkpoint(path)


def test_refusals_name_their_cause(tmp_path):
    """An empty file says so (torch said 'EOFError: '); a file that is no pickle says so and shows
    its first bytes; one holding a numpy array names what torch's weights-only reader refused (its
    first line is boilerplate)."""
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        read_checkpoint(empty)
    text_file = tmp_path / "readme.pt"
    text_file.write_text("# README\nnot weights\n")
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint \(neither torch.save's zip format nor a "
                                              r"pickle; it starts with b'# README'\)"):
        read_checkpoint(text_file)  # torch's reader said "Unsupported operand 35" or "KeyError: 101"
    numpy_file = tmp_path / "numpy.pth"
    torch.save({"model": {"a": np.ones(2)}}, numpy_file)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(numpy_file)
    # torch's own words: "Unsupported global: GLOBAL numpy..." (2.4 on), "Unsupported class numpy..." (before)
    assert re.search(r"Unsupported (global: GLOBAL|class) numpy", str(err.value)) and "\x1b[" not in str(err.value)


@pytest.mark.parametrize("make_value, words", [
    (lambda: torch.eye(3).to_sparse(), "'w' is torch.sparse_coo, not a dense tensor"),
    (lambda: torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.quint8),
     "'w' is torch.strided quantized, not a dense tensor"),
    (lambda: 3, "entry 'w' is a int, not a tensor"),  # not an AttributeError on .layout
])
# torch deprecates making quantized tensors (and its loader reads them through TypedStorage), but a
# checkpoint of a quantized model can still reach the reader: the case stays, the warnings are torch's
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
def test_entries_that_are_no_dense_tensor_are_refused(tmp_path, make_value, words):
    path = tmp_path / "odd.pt"
    torch.save({"model": {"a": torch.ones(2), "w": make_value()}}, path)
    with pytest.raises(CheckpointError, match=words):
        read_checkpoint(path)


@pytest.mark.parametrize("obj", [{}, {"model": {}}])
def test_an_empty_state_dict_is_refused(tmp_path, obj):
    path = tmp_path / "empty_state_dict.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="no state dict found"):
        read_checkpoint(path)


def test_save_refuses_what_it_could_not_read_back(tmp_path):
    """A numpy score in meta saved fine and then failed every weights-only load."""
    cfg = load_model_config("mpvss_lite")
    path = tmp_path / "model.pt"
    with pytest.raises(ValueError, match="would not load with weights_only=True: Unsupported (global: GLOBAL|class) numpy"):
        save_checkpoint(path, MPVSS(cfg), cfg.to_dict(), meta={"val": {"mIoU": np.float64(70.7)}})
    assert not path.exists()
    save_checkpoint(path, MPVSS(cfg), cfg.to_dict(), meta={"val": {"mIoU": 70.7}})
    assert read_checkpoint(path).meta["val"] == {"mIoU": 70.7}


def test_a_file_without_configuration_that_fits_no_model_says_to_pass_model(tmp_path):
    """A ResNet-152 file (36 res4 blocks) has no configuration here (an official ResNet-101 one
    had none before mpvss_r101): it was checked against the default mpvss_lite and listed hundreds
    of MobileNet keys without a word on --model. A plain state dict of the default model still
    loads without --model."""
    sd = {"backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7)}
    sd.update({f"backbone.res4.{j}.conv1.weight": torch.zeros(256, 1024, 1, 1) for j in range(36)})
    path = tmp_path / "r152.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="holds no model configuration.*pass --model") as err:
        load_model(None, path)
    assert "missing key(s)" in str(err.value)  # the key listing follows
    plain = tmp_path / "plain.pth"
    torch.save(MPVSS(load_model_config("mpvss_lite")).state_dict(), plain)
    assert load_model(None, plain).config.name == "mpvss_lite"
    with pytest.raises(CheckpointError) as err:  # --model given: no hint about passing it
        load_model("mpvss_lite", path)
    assert "pass --model" not in str(err.value)


def test_the_pass_model_hint_is_only_for_files_tried_on_the_default_model(tmp_path):
    """A file recognised as an official ResNet-50 checkpoint, or one holding its own model_config,
    that does not load was told it 'holds no model configuration, is not an official ResNet-50
    checkpoint'."""
    sd = {"backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7)}
    sd.update({f"backbone.res4.{j}.conv1.weight": torch.zeros(256, 1024, 1, 1) for j in range(6)})
    torch.save({"model": sd}, tmp_path / "r50_partial.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(None, tmp_path / "r50_partial.pth")
    assert "holds no model configuration" not in str(err.value)
    assert "its backbone is that of the official mpvss_r50, but the rest of it does not fit" in str(err.value)
    assert "no motion module" not in str(err.value)  # no motion.* key, but no whole segmentor either
    assert "missing key(s)" in str(err.value)
    cfg = load_model_config("mpvss_lite")
    save_checkpoint(tmp_path / "lite.pt", MPVSS(cfg), cfg.to_dict(), meta={})
    obj = torch.load(tmp_path / "lite.pt", weights_only=True)
    obj["state_dict"].pop(next(iter(obj["state_dict"])))
    torch.save(obj, tmp_path / "lite_missing_key.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(None, tmp_path / "lite_missing_key.pt")
    assert "holds no model configuration" not in str(err.value)


def test_a_failed_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk while writing: the half-written temporary beside the checkpoint is removed and
    the earlier checkpoint stays."""
    cfg = load_model_config("mpvss_lite")
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, cfg.to_dict())
    before = path.read_bytes()
    fill_the_disk_half_way(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, cfg.to_dict(), meta={"steps": 1})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"] and path.read_bytes() == before


@pytest.mark.parametrize("version", [2, 99, 0, None, "1", True, 1.0])
def test_a_checkpoint_of_another_format_version_is_refused(tmp_path, version):
    """A newer release's layout may mean something else by the same keys: refused by name, not
    loaded silently."""
    cfg = load_model_config("mpvss_lite")
    path = tmp_path / "model.pt"
    save_checkpoint(path, torch.nn.Linear(2, 2), cfg.to_dict())
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == 1 and read_checkpoint(path).state_dict
    raw["version"] = version
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=re.escape(f"has format version {version!r}; this mpvss_ros reads versions 1 to 1")):
        read_checkpoint(path)


def test_a_checkpoint_with_a_bad_model_config_is_a_checkpoint_error(tmp_path, capsys):
    """The file is at fault, not the command line: exit status 1 as for other broken weights
    files (README), not 2 (ConfigError, a usage error)."""
    from mpvss_ros.cli import main

    cfg = load_model_config("mpvss_lite")
    path = tmp_path / "model.pt"
    save_checkpoint(path, MPVSS(cfg), cfg.to_dict())
    raw = torch.load(path, weights_only=True)
    raw["model_config"]["num_classes"] = "eleven"
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"model.pt \(model_config\): num_classes must be an integer"):
        load_model(None, path)
    frames = tmp_path / "frames"
    frames.mkdir()
    assert main(["segment", str(frames), "--out", str(tmp_path / "out"), "--weights", str(path)]) == 1
    assert "num_classes must be an integer" in capsys.readouterr().err


def test_a_tensor_of_another_shape_with_as_many_values_is_refused(tmp_path):
    """A transposed weight (a (C_out, C_in) matrix stored as (C_in, C_out)) holds as many values
    as the model's: copying it would scramble the layer without an error."""
    cfg = load_model_config("mpvss_lite")
    model = MPVSS(cfg)
    sd = model.state_dict()
    key = next(k for k, v in sd.items() if v.dim() == 2 and v.shape[0] != v.shape[1])
    sd[key] = sd[key].t().contiguous()
    path = tmp_path / "transposed.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=re.escape(f"{key}: file {tuple(sd[key].shape)} vs model")):
        load_checkpoint(model, path)


def _tiny_swin_config():
    """mpvss_lite narrowed to a 300 kB Swin model (it has derived relative_position_index buffers):
    small enough to save, damage and load again in every fuzz example."""
    d = load_model_config("mpvss_lite").to_dict()
    d.update(name="tiny_swin", default_weights=None)
    d["backbone"].update(type="swin", embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                         mlp_ratio=1.0, drop_path_rate=0.0)
    d["pixel_decoder"].update(conv_dim=8, mask_dim=8, num_groups=4)
    d["transformer_decoder"].update(hidden_dim=8, num_queries=3, num_layers=1, num_heads=1, ffn_dim=8)
    d["motion"].update(encoder_channels=[4] * 6, deconv_channels=[4] * 4, hidden_dim=8, num_layers=1, num_heads=1,
                       ffn_dim=8, flow_embed_dim=4, mlp_hidden_dim=8)
    d["input"]["size"] = [64, 96]
    return model_config_from_dict(d, where="tiny_swin")


@pytest.fixture(scope="module")
def tiny_swin(tmp_path_factory):
    """A tiny model with random weights, the bytes of its checkpoint (this project's format) and
    the raw dict they hold."""
    cfg = _tiny_swin_config()
    model = _random_model(cfg, 5)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(path, model, cfg.to_dict(), meta={"stage": "motion"})
    return model, path.read_bytes(), torch.load(path, weights_only=True)


def _first_key(sd):
    """The first float weight of more than one value (what the edits below change)."""
    return next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)


# Edits of the saved dict, each with what the module docstring says of it: refused (True) or
# loaded exactly (False).
_EDITS = {
    "none": (False, lambda raw: None),
    "drop_key": (True, lambda raw: raw["state_dict"].pop(_first_key(raw["state_dict"]))),
    "extra_key": (True, lambda raw: raw["state_dict"].update({"sem_seg_head.extra.weight": torch.zeros(2)})),
    "reshape": (True, lambda raw: raw["state_dict"].update(
        {(k := _first_key(raw["state_dict"])): raw["state_dict"][k].unsqueeze(0)})),
    "to_int": (True, lambda raw: raw["state_dict"].update(
        {(k := _first_key(raw["state_dict"])): raw["state_dict"][k].long()})),
    "nan": (True, lambda raw: raw["state_dict"][_first_key(raw["state_dict"])].view(-1).__setitem__(1, float("nan"))),
    "meta_list": (True, lambda raw: raw.update(meta=[1, 2])),
    "version": (True, lambda raw: raw.update(version=2)),
    "numpy": (True, lambda raw: raw["state_dict"].update(
        {(k := _first_key(raw["state_dict"])): raw["state_dict"][k].numpy()})),
    "derived_changed": (True, lambda raw: raw["state_dict"][next(
        k for k in raw["state_dict"] if k.endswith("relative_position_index"))].add_(1)),
    "model_config_bad": (True, lambda raw: raw["model_config"].update(num_classes="eleven")),
    "model_config_list": (True, lambda raw: raw.update(model_config=[1, 2])),
    "derived_dropped": (False, lambda raw: [raw["state_dict"].pop(k) for k in list(raw["state_dict"])
                                            if k.endswith("relative_position_index")]),
    "ddp_prefix": (False, lambda raw: raw.update(state_dict={f"module.{k}": v for k, v in raw["state_dict"].items()})),
    "ignored_key": (False, lambda raw: raw["state_dict"].update({"criterion.empty_weight": torch.ones(12)})),
}


def _zip_members(data: bytes, drop: int | None = None, rename: int | None = None) -> bytes:
    """torch.save's zip rewritten without (or with a renamed) member number ``drop`` / ``rename``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for i, info in enumerate(src.infolist()):
            if i == drop:
                continue
            dst.writestr(info.filename + ("x" if i == rename else ""), src.read(info))
    return out.getvalue()


_byte_damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("zero"), st.floats(0, 1), st.integers(1, 4096)),
    st.tuples(st.just("drop_member"), st.integers(0, 300)),
    st.tuples(st.just("rename_member"), st.integers(0, 300)),
)


def _damage(data: bytes, op) -> bytes:
    kind, *args = op
    if kind in ("drop_member", "rename_member"):
        try:
            n = len(zipfile.ZipFile(io.BytesIO(data)).infolist())
            return _zip_members(data, **{kind.split("_")[0]: args[0] % n})
        except (zipfile.BadZipFile, ValueError):  # damaged already: not rewritten
            return data
    at = int(args[0] * max(len(data) - 1, 0))
    if kind == "truncate":
        return data[:at]
    buf = bytearray(data)
    if kind == "flip" and buf:
        buf[at] ^= args[1]
    elif kind == "zero":
        buf[at:at + args[1]] = bytes(len(buf[at:at + args[1]]))
    return bytes(buf)


def _state(model):
    """A copy of a model's state dict (to tell whether a refused file changed it)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


@settings(max_examples=150, deadline=None)
@given(edit=st.sampled_from(sorted(_EDITS)), damages=st.just([]) | st.lists(_byte_damage, min_size=1, max_size=3),
       replace=st.sampled_from([None] * 6 + ["folder", "empty", "missing"]), legacy=st.booleans())
def test_damaged_checkpoints_are_refused_by_name_or_load_exactly(tmp_path_factory, tiny_swin, edit, damages, replace,
                                                                  legacy):
    """A checkpoint edited against the module docstring's rules (a key missing, extra, reshaped,
    cast to integers, NaN, a numpy array, a bad meta, version or model_config, a changed derived
    buffer), then truncated, byte-flipped, zeroed, stripped of or renamed a zip member, or replaced
    by a folder, an empty file or nothing, in torch.save's zip or legacy format: read_checkpoint,
    load_state_dict_strict and load_model raise only CheckpointError naming the file, leave a
    target model as it was when they refuse, and what they accept holds exactly the saved weights
    (damage to a zip fails its CRC check; the legacy format has no checksum)."""
    source, data, raw = tiny_swin
    refused, apply = _EDITS[edit]
    raw = {**raw, "state_dict": {k: v.clone() for k, v in raw["state_dict"].items()},
           "model_config": dict(raw["model_config"]), "meta": dict(raw["meta"])}
    apply(raw)
    buf = io.BytesIO()
    torch.save(raw, buf, _use_new_zipfile_serialization=not legacy)
    saved = damaged = buf.getvalue()
    for op in damages:
        damaged = _damage(damaged, op)
    path = tmp_path_factory.mktemp("fuzz") / "model.pt"
    if replace == "folder":
        path.mkdir()
    elif replace == "empty":
        path.write_bytes(b"")
    elif replace is None:
        path.write_bytes(damaged)
    intact = replace is None and damaged == saved and not refused
    checked = intact or not legacy  # the legacy (pre-zip) format has no checksum: damaged weights may load
    target = MPVSS(_tiny_swin_config())
    before = _state(target)
    try:
        ckpt = read_checkpoint(path)
        load_state_dict_strict(target, ckpt.state_dict, source=str(path))
    except CheckpointError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        after = target.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), "a refused checkpoint was partly loaded"
        assert not intact, f"an intact checkpoint ({edit}) was refused: {exc}"
    else:
        if checked:  # loaded: exactly the saved weights
            _assert_same(source, target)
    try:
        loaded = load_model(None, path)
    except CheckpointError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        assert not intact, f"an intact checkpoint ({edit}) was refused: {exc}"
    else:
        assert not refused, f"{edit}: a checkpoint the docstring refuses was loaded"
        if checked:
            _assert_same(source, loaded.model)


def _json_paths(value, prefix=()):
    """Every key path inside a JSON value (dict keys and list indices)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _json_paths(v, prefix + (k,))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)

_contract_damage = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 10**6)),
    st.tuples(st.just("set"), st.integers(0, 10**6), _json_values),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.sampled_from(["huge_int", "latin1", "unlink_key_frame", "unlink_non_key_frame", "folder",
                               "missing"])),
)


@settings(max_examples=150, deadline=None)
@given(damages=st.lists(_contract_damage, max_size=3))
def test_damaged_contracts_raise_the_documented_errors_by_name(tmp_path_factory, damages):
    """A contract.json with keys removed or set to any JSON value (NaN, huge integers, wrong
    types), cut short, a number of 5000 digits, bytes that are not UTF-8, a graph file removed, a
    folder or nothing in its place: read_contract raises only FileNotFoundError or ValueError
    naming the export folder; a contract it returns names graph files that exist and gives
    contract_problems a list of lines, not an exception; the undamaged one reads back as written,
    without problems."""
    cfg = load_model_config("mpvss_lite")
    contract = build_contract(cfg, tuple(cfg.input.size))
    edited = json.loads(json.dumps(contract))
    d = tmp_path_factory.mktemp("export")
    for g in ("key_frame", "non_key_frame"):
        (d / contract["graphs"][g]["file"]).write_bytes(b"placeholder")
    for kind, *args in damages:
        paths = list(_json_paths(edited))
        if kind in ("delete", "set") and paths:
            *parents, last = paths[args[0] % len(paths)]
            holder = edited
            for k in parents:
                holder = holder[k]
            if kind == "delete":
                del holder[last]
            else:
                holder[last] = args[1]
    text = json.dumps(edited).encode()
    for kind, *args in damages:
        if kind == "truncate":
            text = text[:int(args[0] * len(text))]
        elif kind == "huge_int":
            text = text.replace(b"480", b"4" * 5000, 1)
        elif kind == "latin1":
            text = text.replace(b"Sky", "Sk\xff".encode("latin-1"), 1)
    (d / CONTRACT_FILE).write_bytes(text)
    for kind, *args in damages:
        if kind.startswith("unlink_"):
            (d / contract["graphs"][kind[len("unlink_"):]]["file"]).unlink(missing_ok=True)
        elif kind in ("folder", "missing") and not (d / CONTRACT_FILE).is_dir():
            (d / CONTRACT_FILE).unlink(missing_ok=True)
            if kind == "folder":
                (d / CONTRACT_FILE).mkdir(exist_ok=True)
    try:
        read = read_contract(d)
    except (FileNotFoundError, ValueError) as exc:
        assert str(d) in str(exc), f"the error does not name the export folder: {exc!r}"
        assert damages, f"an intact contract was refused: {exc}"
    else:
        assert all((d / read["graphs"][g]["file"]).is_file() for g in ("key_frame", "non_key_frame"))
        problems = contract_problems(read, cfg)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
        if not damages:
            assert read == contract and problems == []
