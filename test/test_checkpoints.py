"""Checkpoints: official detectron2 layout (.pth / .pkl), this project's format, failures."""

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mpvss_ros.checkpoints import CheckpointError, load_checkpoint, read_checkpoint, read_state_dict, save_checkpoint
from mpvss_ros.config import load_model_config
from mpvss_ros.model_loader import load_model
from mpvss_ros.nn.mpvss import MPVSS


@pytest.fixture(scope="module")
def r50_pair():
    cfg = load_model_config("mpvss_r50")
    torch.manual_seed(1)
    source = MPVSS(cfg)
    with torch.no_grad():
        for t in source.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
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
    from mpvss_ros.checkpoints import load_state_dict_strict

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


@pytest.mark.parametrize("meta", [[1, 2], 5, "ab"])
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
    """A full disk while writing: the half-written ``.pt.tmp`` beside the checkpoint is removed and
    the earlier checkpoint stays."""
    import errno

    cfg = load_model_config("mpvss_lite")
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, cfg.to_dict())
    before = path.read_bytes()
    real_write = Path.write_bytes

    def full(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
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
