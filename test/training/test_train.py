"""CamVid data pipeline and a few real stage-1 training steps (skipped without shared data)."""

import argparse
import json
import math
import re
import shutil
import signal
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import fill_the_disk_half_way
from mpvss_ros.paths import write_json_atomic
from mpvss_ros.checkpoints import read_checkpoint, save_checkpoint
from mpvss_ros.config import load_model_config
from mpvss_ros.evaluation.metrics import ConfusionMatrix
from mpvss_ros.io.samples import camvid_annot_dir, camvid_dir
from mpvss_ros.model_loader import load_model
from mpvss_ros.nn.mpvss import MPVSS
from mpvss_ros.training.criterion import SetCriterion
from mpvss_ros.training.data import CamVidFrames
from mpvss_ros.training.matcher import FixedMatcher, HungarianMatcher
from mpvss_ros.training import trainer
from mpvss_ros.training.motion_trainer import MotionTrainOptions
from mpvss_ros.training.trainer import (
    TrainOptions,
    add_train_arguments,
    build_param_groups,
    default_imagenet_weights,
    lr_factor,
    options_from_args,
    restore_rng_state,
    rng_state,
    train_segmentor,
)

TRAIN_DIR, TRAIN_ANNOT = camvid_dir("train"), camvid_annot_dir("train")
WEIGHTS = default_imagenet_weights()
needs_data = pytest.mark.skipif(
    TRAIN_DIR is None or TRAIN_ANNOT is None or WEIGHTS is None or not WEIGHTS.is_file(),
    reason="shared CamVid data / ImageNet weights not available (../shared/data or $MPVSS_SHARED_DATA)",
)
FILES = ["0001TP_006690.png", "0016E5_06390.png"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU for torch")


def test_lr_schedule():
    assert lr_factor(0, 100, 10, 0.01, 0.9) == pytest.approx(0.01)
    assert lr_factor(5, 100, 10, 0.01, 0.9) == pytest.approx((0.01 * 0.5 + 0.5) * 0.95**0.9)
    assert lr_factor(10, 100, 10, 0.01, 0.9) == pytest.approx(0.9**0.9)
    assert lr_factor(100, 100, 10, 0.01, 0.9) == 0.0
    assert lr_factor(0, 100, 0, 0.01, 0.9) == 1.0


def test_cli_arguments_round_trip(tmp_path):
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    opts = options_from_args(p.parse_args(["--run-dir", str(tmp_path), "--crop", "96", "128", "--matcher", "fixed"]))
    assert opts.crop == (96, 128) and opts.matcher == "fixed" and opts.steps == TrainOptions(run_dir="").steps
    with pytest.raises(ValueError):
        TrainOptions(run_dir="x", matcher="greedy").validate()
    TrainOptions(run_dir="x", seed=0).validate()


@pytest.mark.parametrize("change, message", [
    ({"seed": -1}, "seed must be >= 0, got -1"),  # numpy's generators, which order the data, take none
    ({"steps": "5"}, "steps must be an integer, got '5'"),
    ({"steps": 0}, "steps must be >= 1, got 0"),
    ({"batch_size": True}, "batch_size must be an integer, got True"),
    ({"crop": (31, 64)}, r"crop must be \(H, W\) in pixels with both >= 32, got \(31, 64\)"),
    ({"crop": 64}, r"crop must be \(H, W\)"),
    ({"crop": (64, 96, 999)}, r"crop must be \(H, W\)"),
    ({"crop": (64.9, 96.9)}, r"crop must be \(H, W\)"),
    ({"scale": (0.5, 1.0, 99.0)}, r"scale must be \(low, high\)"),
    ({"scale": (1.5, 1.0)}, r"scale must be \(low, high\) with 0 < low <= high"),
    ({"scale": (0.0, 1.0)}, r"scale must be \(low, high\)"),
    ({"lr": 0}, "lr must be > 0, got 0"),
    ({"backbone_lr_mult": -0.1}, "backbone_lr_mult must be >= 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"poly_power": -1.0}, "poly_power must be >= 0"),
    ({"no_object_weight": -0.1}, "no_object_weight must be > 0"),
    ({"no_object_weight": 0.0}, "no_object_weight must be > 0"),  # an all-void crop's loss was 0/0
    ({"clip_grad_norm": float("nan")}, "clip_grad_norm must be a finite number"),
    ({"warmup_factor": 0}, r"warmup_factor must be in \(0, 1\]"),
    ({"val_every": -2}, "val_every must be >= -1, got -2"),
    ({"matcher": "greedy"}, "matcher must be 'hungarian' or 'fixed'"),
    ({"stop_at": 0}, "stop_at must be >= 1, got 0"),
    ({"stop_at": 5000}, r"stop_at must be in 1..steps \(4000\), got 5000"),
    ({"max_minutes": 0}, r"max_minutes must be > 0 \(leave it out for no limit\), got 0"),
    ({"max_minutes": math.inf}, "max_minutes must be > 0"),
    ({"stop_at": 2.5}, "stop_at must be >= 1"),
    ({"num_points": 2.5}, "num_points must be an integer, got 2.5"),
    ({"checkpoint_every": 2.5}, "checkpoint_every must be an integer, got 2.5"),
    ({"val_frames": 2.5}, "val_frames must be an integer, got 2.5"),
    ({"threads": 1.5}, "threads must be an integer, got 1.5"),
    ({"backbone_lr_mult": float("nan")}, "backbone_lr_mult must be a finite number"),
    ({"weight_decay": math.inf}, "weight_decay must be a finite number"),
    ({"poly_power": math.inf}, "poly_power must be a finite number"),
    ({"num_points": 0}, "num_points must be >= 1, got 0"),
    ({"batch_size": 0}, r"^batch_size must be >= 1, got 0 \(--batch-size\)$"),  # the flag, with dashes
    ({"checkpoint_every": -1}, "checkpoint_every must be >= 0, got -1"),
    ({"val_frames": -1}, "val_frames must be >= 0, got -1"),
    ({"threads": -1}, "threads must be >= 0, got -1"),
    ({"lr": "1e-4"}, "lr must be a finite number, got '1e-4'"),  # a string (options.json edited): no TypeError
    ({"max_minutes": "5"}, "max_minutes must be > 0"),
    ({"crop": (64, 96.5)}, r"crop must be \(H, W\) in pixels"),  # one side not an integer
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
])
def test_stage1_options_are_checked_like_stage2s(change, message, tmp_path):
    """Both stages check types and ranges with the same helpers (training/options.py), and
    train_segmentor checks before it converts (a crop of 64 raised TypeError, (64, 96, 999) was cut
    to (64, 96))."""
    with pytest.raises(ValueError, match=message):
        TrainOptions(run_dir="x", **change).validate()
    with pytest.raises(ValueError, match=message):
        train_segmentor(TrainOptions(run_dir=str(tmp_path / "run"), **change))
    TrainOptions(run_dir="x", scale=(np.float32(0.75), np.float64(1.5)), lr=np.float32(1e-4)).validate()  # numpy reals


def test_keyword_options_replace_those_of_the_options_given(tmp_path):
    """train_segmentor(options, **kwargs) trains with the keywords' values, checked as any option."""
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        train_segmentor(_no_data_opts(tmp_path / "run"), seed=-1)


def test_options_json_takes_numpy_numbers_and_paths():
    """validate accepts numpy integers and reals (and a Path run folder); options.json and the
    trainer state's copy store them as JSON ints, floats and strings."""
    saved = trainer.options_dict(TrainOptions(run_dir=Path("r"), seed=np.int64(3), lr=np.float32(0.5)))
    assert saved["run_dir"] == "r" and saved["seed"] == 3 and type(saved["seed"]) is int
    assert saved["lr"] == 0.5 and type(saved["lr"]) is float


def test_device_option_reaches_the_options():
    p = __import__("argparse").ArgumentParser()
    add_train_arguments(p)
    assert options_from_args(p.parse_args(["--run-dir", "r", "--device", "cpu"])).device == "cpu"
    assert options_from_args(p.parse_args(["--run-dir", "r"])).device == "auto"


def test_rng_state_round_trip_and_a_device_change_is_logged(caplog):
    torch.manual_seed(7)
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch_rng"}
    first = torch.rand(3)
    restore_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), first)
    with caplog.at_level("WARNING", logger="mpvss_ros.training.trainer"):
        restore_rng_state({**state, "cuda_rng": torch.zeros(8, dtype=torch.uint8)}, torch.device("cpu"))
    assert "another kind of device" in caplog.text


def test_train_segmentor_refuses_the_default_camvid_data_for_other_classes(tmp_path):
    """mpvss_r50's 124 VSPW classes on the default CamVid labels: refused before any work."""
    with pytest.raises(ValueError, match="default training data is CamVid.*mpvss_r50 has 124"):
        train_segmentor(TrainOptions(run_dir=str(tmp_path / "run"), model="mpvss_r50"))
    assert not (tmp_path / "run").exists()


def test_param_groups_exclude_motion_and_split_decay():
    model = MPVSS(load_model_config("mpvss_lite"))
    for p in model.motion.parameters():
        p.requires_grad_(False)
    groups = build_param_groups(model, 1e-4, 0.1, 0.05)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not ids & {id(p) for p in model.motion.parameters()}
    seg = [p for n, p in model.named_parameters() if not n.startswith("motion.")]
    assert ids == {id(p) for p in seg}
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone_decay"]["lr"] == pytest.approx(1e-5) and by_name["head_decay"]["lr"] == 1e-4
    assert by_name["head_no_decay"]["weight_decay"] == 0.0
    nd = {id(p) for p in by_name["head_no_decay"]["params"]}
    assert id(model.sem_seg_head.predictor.query_feat.weight) in nd
    assert id(model.sem_seg_head.predictor.decoder_norm.weight) in nd


@needs_data
def test_camvid_frames_deterministic_and_padded():
    ds = CamVidFrames(TRAIN_DIR, TRAIN_ANNOT, crop=(200, 300), scale=(0.5, 0.5), files=FILES, seed=3)
    a_img, a_lab = ds[0]
    b_img, b_lab = ds[0]
    assert a_img.shape == (3, 200, 300) and a_img.dtype == torch.float32 and a_lab.dtype == torch.int64
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    # 360x480 * 0.5 = 180x240 < 200x300: padded bottom/right with image 0 and label 255
    assert (a_lab[180:] == 255).all() and (a_lab[:, 240:] == 255).all()
    assert float(a_img.min()) >= 0 and float(a_img.max()) <= 255
    vals = set(torch.unique(a_lab).tolist())
    assert vals <= set(range(11)) | {255} and 11 not in vals
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], a_img)  # new epoch, new draws
    full = CamVidFrames(TRAIN_DIR, TRAIN_ANNOT, train=False, files=FILES)
    img, lab = full[1]
    assert img.shape == (3, 360, 480) and lab.shape == (360, 480)
    assert float(img.max()) > 1 and np.array_equal(img.numpy(), np.floor(img.numpy()))  # untouched uint8 values


def _opts(run_dir, **kw):
    # threads=1: on a shared 2-core machine two OpenMP threads stall against other processes.
    base = {"run_dir": str(run_dir), "steps": 8, "batch_size": 2, "crop": (96, 128), "scale": (0.25, 0.25),
            "flip": False, "color_jitter": False, "train_files": FILES, "warmup_steps": 0, "lr": 5e-4,
            "num_points": 1024, "val_every": -1, "checkpoint_every": 0, "progress": False, "threads": 1, "seed": 0}
    base.update(kw)
    return TrainOptions(**base)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    if TRAIN_DIR is None or WEIGHTS is None or not WEIGHTS.is_file():
        pytest.skip("shared CamVid data / ImageNet weights not available")
    run = tmp_path_factory.mktemp("straight")
    return run, train_segmentor(_opts(run))


@needs_data
def test_few_steps_reduce_the_loss(straight_run):
    run, res = straight_run
    assert res.finished and res.step == 8 and len(res.losses) == 8
    assert all(np.isfinite(res.losses))
    # 90x120 frames padded to 96x128: the same two inputs every step, so the loss must fall.
    assert res.losses[-1] < 0.9 * res.losses[0]
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if not x.get("val")]
    assert [x["step"] for x in steps] == list(range(1, 9))
    assert {"loss", "loss_ce", "loss_mask", "loss_dice", "lr", "lr_backbone", "sec_per_step"} <= set(steps[0])
    assert (run / "model_final.pt").is_file() and (run / "checkpoint_last.pt").is_file()
    meta = torch.load(run / "model_final.pt", weights_only=True)["meta"]
    assert meta["device"] == "cpu (1 thread)"  # what trained it, for the model card
    assert meta["dataset"] == "CamVid train (SegNet split) (2 frames of it, --train-files)"
    assert meta["motion_trained"] is False  # ImageNet backbone: the motion module is its initialisation


@needs_data
def test_resume_continues_exactly(straight_run, tmp_path):
    _, straight = straight_run
    first = train_segmentor(_opts(tmp_path, stop_at=5))
    assert first.step == 5 and not first.finished
    state5 = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert state5["step"] == 5 and state5["scheduler"]["last_epoch"] == 5
    assert state5["options"] == trainer.options_dict(_opts(tmp_path, stop_at=5))  # what --resume compares with
    second = train_segmentor(_opts(tmp_path, resume=True))
    assert second.step == 8 and second.finished and len(second.losses) == 3
    assert torch.load(tmp_path / "model_final.pt", weights_only=True)["meta"]["motion_trained"] is False
    np.testing.assert_allclose(first.losses + second.losses, straight.losses, rtol=1e-5)
    a = torch.load(straight_run[0] / "trainer_state.pt", weights_only=True)
    b = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-4, atol=1e-9)
        assert int(sa["step"]) == int(sb["step"]) == 8
    ma = torch.load(straight_run[0] / "model_final.pt", weights_only=True)["state_dict"]
    mb = torch.load(tmp_path / "model_final.pt", weights_only=True)["state_dict"]
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-6)


@needs_data
@needs_cuda
def test_cuda_steps_reduce_the_loss_resume_and_load_on_cpu(tmp_path):
    """The same 8 steps on a CUDA GPU: the loss falls as on the CPU, a run stopped at step 5 and
    resumed follows the straight run (CUDA kernels are not bitwise deterministic: loose tolerance),
    and the checkpoint loads on the CPU and says what trained it."""

    straight = train_segmentor(_opts(tmp_path / "straight", device="cuda"))
    assert straight.finished and straight.losses[-1] < 0.9 * straight.losses[0]
    first = train_segmentor(_opts(tmp_path / "resumed", device="cuda", stop_at=5))
    second = train_segmentor(_opts(tmp_path / "resumed", device="cuda", resume=True))
    assert "cuda_rng" in torch.load(tmp_path / "resumed" / "trainer_state.pt", weights_only=True)
    np.testing.assert_allclose(first.losses + second.losses, straight.losses, rtol=1e-2)
    loaded = load_model(weights=tmp_path / "straight" / "model_final.pt", device="cpu")
    assert loaded.trained and loaded.meta["device"].startswith("cuda:0 (")


@needs_data
def test_ctrl_c_inside_a_step_saves_that_step_complete_and_resumes_exactly(straight_run, tmp_path, monkeypatch):
    # SIGINT arrives after the optimizer has stepped but before the step is counted: the old
    # handler saved "step 4" with step 5's weights, and the resumed run trained step 5 twice

    _, straight = straight_run
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_interrupt(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_segmentor(_opts(tmp_path))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert state["step"] == 5 and state["scheduler"]["last_epoch"] == 5
    assert int(next(iter(state["optimizer"]["state"].values()))["step"]) == 5
    resumed = train_segmentor(_opts(tmp_path, resume=True))
    assert resumed.step == 8 and resumed.finished
    np.testing.assert_allclose(resumed.losses, straight.losses[5:], rtol=1e-5)


def test_no_weight_decay_for_norms_and_embeddings_only():
    # spec section 3.5 (detectron2): norms and nn.Embedding take none, biases do
    from mpvss_ros.training.trainer import no_decay_parameters

    model = MPVSS(load_model_config("mpvss_lite"))
    skip = no_decay_parameters(model)
    named = dict(model.named_parameters())
    for name in ("motion.decoder.level_embed.weight", "motion.decoder.query_embed.weight",
                 "motion.decoder.decoder_norm.weight", "motion.decoder.decoder_norm.bias"):
        assert id(named[name]) in skip, name
    for name in ("motion.decoder.input_proj.0.bias", "motion.encoder.conv1.0.conv.bias",
                 "motion.decoder.input_proj.0.weight"):
        assert id(named[name]) not in skip, name


def test_no_weight_decay_for_swin_position_bias_tables():
    """Mask2Former's build_optimizer gives Swin's relative-position bias tables no decay; its
    attention and MLP weights and the patch embedding do decay."""
    from mpvss_ros.nn.swin import SwinTransformer
    from mpvss_ros.training.trainer import no_decay_parameters

    net = SwinTransformer(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=3)
    skip = no_decay_parameters(net)
    named = dict(net.named_parameters())
    tables = [n for n in named if n.endswith("relative_position_bias_table")]
    assert len(tables) == 5 and all(id(named[n]) in skip for n in tables)
    for name in ("layers.2.blocks.1.attn.qkv.weight", "layers.0.blocks.0.mlp.fc1.bias", "patch_embed.proj.weight"):
        assert id(named[name]) not in skip, name
    assert id(named["norm3.weight"]) in skip


# --------------------------------------------------------------------------- run folders and resume

def _no_data_opts(run_dir, **kw):
    """Options whose run fails at once on its data (a missing CamVid root, no ImageNet file): a test
    that expects a refusal before any work fails if the run gets as far as the data."""
    return _opts(run_dir, data_root=str(run_dir.parent / "no_camvid"), imagenet_weights="none", **kw)


def _fake_run(run_dir, **files):
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (run_dir / name.replace("__", ".")).write_bytes(content)
    return run_dir


@pytest.mark.parametrize("name", ["checkpoint_last.pt", "trainer_state.pt", "model_final.pt", "log.jsonl"])
def test_training_into_an_earlier_run_is_refused_before_any_work(tmp_path, name):
    # the second run had overwritten the first one's checkpoints and appended to its log
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_bytes(b'{"step": 1, "loss": 1.0}\n')
    refused = rf"run folder {re.escape(str(run))} already holds a run \({re.escape(name)}\): pass --resume"
    if name == "log.jsonl":  # only a log: the run stopped before its first checkpoint, nothing to resume
        refused = (rf"run folder {re.escape(str(run))} holds the log of a run that stopped before its first "
                   rf"checkpoint .*nothing to resume; move or delete .*log.jsonl to start anew there")
    with pytest.raises(ValueError, match=refused + (" to continue it, or choose another --run-dir"
                                                    if name != "log.jsonl" else "")):
        train_segmentor(_no_data_opts(run))
    assert sorted(p.name for p in run.iterdir()) == [name]
    assert (run / name).read_bytes() == b'{"step": 1, "loss": 1.0}\n'


def test_an_empty_log_is_no_earlier_run(tmp_path):
    # a run that failed before its first step leaves an empty log: starting again there is fine
    from mpvss_ros.training.trainer import check_run_dir

    run = _fake_run(tmp_path / "run", log__jsonl=b"", options__json=b"{}")
    check_run_dir(run, resume=False)
    check_run_dir(tmp_path / "new", resume=False)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_run_dir(run / "options.json", resume=False)


def test_resume_of_a_missing_run_folder_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"resume: run folder {re.escape(str(tmp_path / 'nope'))} does not"):
        train_segmentor(_no_data_opts(tmp_path / "nope", resume=True))
    assert not (tmp_path / "nope").exists()
    run = _fake_run(tmp_path / "run", checkpoint_last__pt=b"x")
    with pytest.raises(FileNotFoundError, match="has no trainer_state.pt"):
        train_segmentor(_no_data_opts(run, resume=True))


def _real_state(step=3):
    """A trainer state as the trainers write it (the optimizer of a small linear model)."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                   **rng_state(torch.device("cpu")), "options": {}}


def _damage(path, kind):
    """Write a damaged trainer state of one kind to ``path``."""
    _, state = _real_state()
    if kind == "truncated":
        torch.save(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not torch":
        path.write_bytes(b"hello world" * 10)
    elif kind == "list":
        torch.save([1, 2], path)
    elif kind == "no optimizer":
        torch.save({"step": 3}, path)
    elif kind == "step str":
        torch.save({**state, "step": "3"}, path)
    elif kind == "optimizer list":
        torch.save({**state, "optimizer": [1]}, path)
    elif kind == "rng float":
        torch.save({**state, "torch_rng": torch.zeros(4)}, path)


DAMAGE = {"truncated": "cannot read it", "not torch": "cannot read it", "list": "it holds a list, not a dict",
          "no optimizer": "missing 'optimizer', 'scheduler', 'torch_rng'", "step str": "'step' must be an integer",
          "optimizer list": "'optimizer' is not an optimizer state dict", "rng float": "'torch_rng' is not a random"}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_run_names_a_damaged_trainer_state(tmp_path, kind):
    # a truncated file was torch.load's RuntimeError, {'step': 3} a KeyError, a list a TypeError
    from mpvss_ros.training.trainer import resume_run

    model, state = _real_state()
    save_checkpoint(tmp_path / "checkpoint_last.pt", model, {}, meta={"step": 3})
    _damage(tmp_path / "trainer_state.pt", kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state_file = re.escape(str(tmp_path / "trainer_state.pt"))
    with pytest.raises(ValueError, match=f"damaged trainer state {state_file}: {DAMAGE[kind]}"):
        resume_run(tmp_path, model, opt, sched, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["truncated", "no optimizer", "list"])
def test_resume_with_a_damaged_trainer_state_is_refused_before_any_work(tmp_path, kind):
    run = _fake_run(tmp_path / "run", checkpoint_last__pt=b"not read: the state is checked first")
    _damage(run / "trainer_state.pt", kind)
    state_file = re.escape(str(run / "trainer_state.pt"))
    with pytest.raises(ValueError, match=f"damaged trainer state {state_file}: {DAMAGE[kind]}"):
        train_segmentor(_no_data_opts(run, resume=True))


def test_resume_run_names_a_state_of_other_parameters(tmp_path):
    from mpvss_ros.training.trainer import resume_run

    model, state = _real_state()
    save_checkpoint(tmp_path / "checkpoint_last.pt", model, {}, meta={"step": 3})
    torch.save(state, tmp_path / "trainer_state.pt")
    groups = [{"params": [model.weight]}, {"params": [model.bias]}]  # two groups where the state has one
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state_file = re.escape(str(tmp_path / "trainer_state.pt"))
    with pytest.raises(ValueError, match=f"optimizer state in {state_file} does not fit"):
        resume_run(tmp_path, model, opt, sched, torch.device("cpu"))


@needs_data
def test_cli_second_run_into_a_run_folder_is_refused_and_keeps_the_first(tmp_path, capsys):
    """The reviewer's repro: the same command twice had exited 0 with a log of steps 1, 2, 1, 2."""
    from mpvss_ros.cli import main

    args = ["train", "segmentor", "--no-progress", "--device", "cpu", "--threads", "1", "--batch-size", "1",
            "--crop", "64", "64", "--num-points", "64", "--val-every", "-1", "--imagenet-weights", "none",
            "--train-files", FILES[0], "--run-dir", str(tmp_path / "x"), "--steps", "2"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mpvss: error: run folder {tmp_path / 'x'} already holds a run") and "--resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()} == before
    steps = [json.loads(x)["step"] for x in (tmp_path / "x" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert main(args[:-1] + ["3", "--resume"]) == 0  # the way to go on
    steps = [json.loads(x)["step"] for x in (tmp_path / "x" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@needs_data
def test_a_failed_trainer_state_write_keeps_the_last_checkpoint_resumable(tmp_path, monkeypatch):
    # The disk fills up while the step-4 trainer state is written. The step-2 checkpoint must stay a
    # resumable pair: the model file must not already have been replaced by step 4's.
    import errno

    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError):
        train_segmentor(_opts(tmp_path, steps=6, checkpoint_every=2))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["meta"]["step"] == 2
    resumed = train_segmentor(_opts(tmp_path, steps=6, checkpoint_every=2, resume=True))
    assert resumed.step == 6 and len(resumed.losses) == 4


@needs_data
def test_resume_with_a_changed_lr_and_weight_decay_trains_with_them(tmp_path, monkeypatch):
    """options.json and the option-change warning say a new --lr / --weight-decay applies on
    --resume; the saved scheduler's base rates and the optimizer's groups overrode them."""
    decays = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # the decay AdamW applies, per step (the largest group's)
        decays.append(max(g["weight_decay"] for g in self.param_groups))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train_segmentor(_opts(tmp_path, steps=4, stop_at=2, poly_power=0.0, lr=1e-4, weight_decay=0.05))
    train_segmentor(_opts(tmp_path, steps=4, resume=True, poly_power=0.0, lr=1e-3, weight_decay=0.01))
    options = json.loads((tmp_path / "options.json").read_text())
    assert options["lr"] == 1e-3 and options["weight_decay"] == 0.01
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-4, 1e-4, 1e-3, 1e-3])
    assert decays == pytest.approx([0.05, 0.05, 0.01, 0.01])


def test_a_resume_with_a_changed_lr_or_seed_warns(caplog):
    """The lr and the seed are training options: a resume that changes them is no straight continuation."""
    with caplog.at_level("WARNING", logger="mpvss_ros.training.trainer"):
        trainer.warn_option_changes({"lr": 1e-4, "seed": 0}, {"lr": 1e-3, "seed": 1})
    assert "lr: 0.0001 -> 0.001" in caplog.text and "seed: 0 -> 1" in caplog.text


def _camvid_copy(root, names, splits=("train",)):
    """A CamVid-layout folder at ``root`` with the shared training frames ``names`` and their labels
    copied into each of ``splits`` (``train`` -> ``train/`` and ``trainannot/``)."""
    for split in splits:
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir(parents=True)
        for n in names:
            shutil.copy(TRAIN_DIR / n, root / split / n)
            shutil.copy(TRAIN_ANNOT / n, root / f"{split}annot" / n)
    return root


@needs_data
def test_a_corrupt_training_frame_is_refused_before_training(tmp_path):
    # a truncated PNG used to end the run only when the data order first drew it (possibly hours in,
    # after the last checkpoint), leaving a run folder that is neither resumable nor reusable
    names = FILES + ["0006R0_f01200.png", "0001TP_007170.png"]
    root = _camvid_copy(tmp_path / "camvid", names)
    (root / "train" / names[-1]).write_bytes((TRAIN_DIR / names[-1]).read_bytes()[:20000])
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="cannot read image"):
        train_segmentor(_opts(run, data_root=str(root), train_files=None, steps=4))
    assert not run.exists()


@needs_data
def test_a_corrupt_val_frame_is_refused_before_training(tmp_path):
    """As a training frame: a truncated val PNG failed at the first validation, after the steps
    before it, whose checkpoint (written after validating) never came."""
    root = _camvid_copy(tmp_path / "camvid", FILES, ("train", "val"))
    (root / "val" / FILES[-1]).write_bytes((TRAIN_DIR / FILES[-1]).read_bytes()[:20000])
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="cannot read image"):
        train_segmentor(_opts(run, data_root=str(root), train_files=None, steps=4, val_every=0, val_frames=2))
    assert not run.exists()


@needs_data
def test_a_data_root_without_val_frames_trains_without_validation(tmp_path):
    """--data-root with train/ and trainannot/ only: the run trains, and validates nothing."""
    root = _camvid_copy(tmp_path / "camvid", FILES[:1])
    result = train_segmentor(_opts(tmp_path / "run", data_root=str(root), train_files=None, steps=1, batch_size=1,
                                   crop=(64, 64), num_points=64, imagenet_weights="none", val_every=0))
    assert result.finished and result.val == []
    assert torch.load(tmp_path / "run" / "model_final.pt", weights_only=True)["meta"]["val"] is None


def test_camvid_root_expands_home_and_refuses_a_missing_folder(tmp_path, monkeypatch):
    """--data-root ~/... is the user's folder; a missing root is named as such."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cv").mkdir()
    assert trainer.camvid_root("~/cv") == tmp_path / "cv"
    with pytest.raises(FileNotFoundError, match="CamVid root not found"):
        trainer.camvid_root(str(tmp_path / "none"))


def test_jpeg_frames_take_png_labels_of_the_same_stem(tmp_path):
    """As mpvss eval reads a labelled sequence: frame.jpg with label frame.png."""
    from mpvss_ros.training.data import list_frames

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "img" / name).write_bytes(b"")
    for name in ("a.png", "b.png"):
        (tmp_path / "lab" / name).write_bytes(b"")
    assert [(i.name, lab.name) for i, lab in list_frames(tmp_path / "img", tmp_path / "lab")] == [
        ("a.jpg", "a.png"), ("b.png", "b.png")]
    (tmp_path / "img" / "c.jpeg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="label missing for c.jpeg"):
        list_frames(tmp_path / "img", tmp_path / "lab")


@needs_data
def test_a_resume_of_a_finished_run_keeps_its_final_file(tmp_path):
    """--resume of a finished run runs no step; model_final.pt, with the run's validation record,
    is kept (it was written again without one)."""
    opts = {"steps": 2, "val_every": 0, "val_frames": 1}
    first = train_segmentor(_opts(tmp_path, **opts))
    before = torch.load(tmp_path / "model_final.pt", weights_only=True)["meta"]
    assert first.finished and before["val"] is not None and before["val"]["step"] == 2
    again = train_segmentor(_opts(tmp_path, resume=True, **opts))
    assert again.finished and again.losses == [] and again.checkpoint == tmp_path / "model_final.pt"
    assert torch.load(tmp_path / "model_final.pt", weights_only=True)["meta"] == before


def test_resume_names_a_model_file_that_is_no_run_checkpoint(tmp_path):
    from mpvss_ros.training.trainer import check_same_step

    with pytest.raises(ValueError, match="not a training run's checkpoint"):
        check_same_step({"name": "mpvss_lite"}, {"step": 2}, tmp_path / "checkpoint_last.pt", tmp_path / "s.pt")
    with pytest.raises(ValueError, match="at step 1 but .* at step 2"):
        check_same_step({"step": 1}, {"step": 2}, tmp_path / "checkpoint_last.pt", tmp_path / "s.pt")


def test_a_failed_model_write_leaves_no_trainer_state_temp_file(tmp_path, monkeypatch):
    # the state is written first (to trainer_state.pt.tmp); when the model write then fails on a
    # full disk, the temporary state file (optimizer moments: twice the model) stayed on that disk
    import errno

    model = torch.nn.Linear(2, 2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "save_checkpoint", full)
    with pytest.raises(OSError):
        trainer.save_run_checkpoint(tmp_path / "checkpoint_last.pt", tmp_path / "trainer_state.pt", model, {},
                                    {"step": 1}, {"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_stage_1_starts_from_a_per_frame_checkpoint_and_knows_its_motion_module(tmp_path):
    """--init-checkpoint of stage 1 takes a per-frame Mask2Former checkpoint (no motion.* key; to
    fine-tune a published segmentor on one's own labels), as stage 2 does; the file's motion
    module is trained only when the init file's was (saved in the meta, read by load_model)."""
    from mpvss_ros.training.trainer import _build_model

    cfg = load_model_config("mpvss_lite")
    torch.manual_seed(5)
    source = MPVSS(cfg)
    segmentor = {k: v for k, v in source.state_dict().items() if not k.startswith("motion.")}
    torch.save({"model": segmentor}, tmp_path / "per_frame.pth")
    model, recorded = _build_model(_opts(tmp_path / "a", init_checkpoint=str(tmp_path / "per_frame.pth")), cfg)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in segmentor.items())
    assert model.motion_trained is False and recorded is False
    save_checkpoint(tmp_path / "stage2.pt", source, cfg.to_dict(), {"stage": "query_flow", "motion_trained": True})
    model, recorded = _build_model(_opts(tmp_path / "b", init_checkpoint=str(tmp_path / "stage2.pt")), cfg)
    assert model.motion_trained is True and recorded is True
    model, recorded = _build_model(_opts(tmp_path / "c", imagenet_weights="none"), cfg)
    assert model.motion_trained is False and recorded is False
    # a stage-1 file written before stage 1 recorded it: unknown, and it stays unknown in this run's files
    save_checkpoint(tmp_path / "old_stage1.pt", source, cfg.to_dict(), {"stage": "segmentor"})
    model, recorded = _build_model(_opts(tmp_path / "d", init_checkpoint=str(tmp_path / "old_stage1.pt")), cfg)
    assert model.motion_trained is True and recorded is None


@needs_data
def test_a_resumed_stage_1_run_keeps_its_init_files_trained_motion_module(tmp_path):
    shipped = load_model().weights  # a whole model: its motion module trained by stage 2
    opts = {"steps": 2, "init_checkpoint": str(shipped), "imagenet_weights": "none"}
    assert not train_segmentor(_opts(tmp_path, stop_at=1, **opts)).finished
    assert train_segmentor(_opts(tmp_path, resume=True, **opts)).finished
    assert torch.load(tmp_path / "model_final.pt", weights_only=True)["meta"]["motion_trained"] is True
    assert load_model(weights=tmp_path / "model_final.pt").model.motion_trained is True



def test_a_resumed_run_from_before_motion_trained_was_recorded_asks_its_init_checkpoint(tmp_path, caplog):
    from mpvss_ros.training.trainer import _resumed_motion_trained

    cfg = load_model_config("mpvss_lite")
    model = MPVSS(cfg)
    save_checkpoint(tmp_path / "stage2.pt", model, cfg.to_dict(), {"stage": "query_flow"})
    segmentor = {k: v for k, v in model.state_dict().items() if not k.startswith("motion.")}
    torch.save({"model": segmentor}, tmp_path / "per_frame.pth")
    assert _resumed_motion_trained({"motion_trained": False}, {"init_checkpoint": str(tmp_path / "stage2.pt")}) is False
    assert _resumed_motion_trained({"motion_trained": True}, {}) is True
    assert _resumed_motion_trained({}, {"init_checkpoint": None}) is False  # ImageNet or random start
    assert _resumed_motion_trained({}, {"init_checkpoint": str(tmp_path / "stage2.pt")}) is True
    assert _resumed_motion_trained({}, {"init_checkpoint": str(tmp_path / "per_frame.pth")}) is False
    assert _resumed_motion_trained({"motion_trained": None}, {"init_checkpoint": None}) is None  # recorded unknown
    save_checkpoint(tmp_path / "old_stage1.pt", model, cfg.to_dict(), {"stage": "segmentor"})
    assert _resumed_motion_trained({}, {"init_checkpoint": str(tmp_path / "old_stage1.pt")}) is None
    assert _resumed_motion_trained({}, {"init_checkpoint": str(tmp_path / "gone.pt")}) is None
    assert "cannot tell whether this run's motion module is trained" in caplog.text


@pytest.mark.parametrize("change, message", [
    ({"lr": True}, "lr must be a finite number, got True"),
    ({"max_minutes": True}, "max_minutes must be > 0"),
    ({"max_minutes": math.inf}, "max_minutes must be > 0"),
    ({"max_clip_frames": 2.5}, r"max_clip_frames must be >= 2, .*, got 2\.5 \(--max-clip-frames\)$"),
    ({"lr": "1e-4"}, "lr must be a finite number, got '1e-4'"),  # a string: no TypeError
    ({"max_minutes": "5"}, "max_minutes must be > 0"),
    ({"crop": (96.5, 128)}, r"crop must be \(H, W\) in pixels"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
])
def test_motion_options_refuse_bools_infinities_and_fractions(change, message):
    with pytest.raises(ValueError, match=message):
        MotionTrainOptions(run_dir="r", init_checkpoint="c.pt", **change).validate()


_HUGE = 10**5000  # past Python's 4300-digit str() limit


@pytest.mark.parametrize("change, message", [
    pytest.param({"lr": 10**400}, "lr must be a finite number, got 1000", id="lr 10**400"),  # OverflowError
    pytest.param({"lr": -_HUGE}, "lr must be a finite number, got an integer too long to print", id="lr -10**5000"),
    pytest.param({"seed": 2**64 - 1}, r"seed must lie in \[-9223372036854775808, 9223372036854775807\] \(64 bits\), "
                 "got 18446744073709551615 \\(--seed\\)", id="seed 2**64-1"),  # torch failed on seed + 1 mid-run
    pytest.param({"steps": _HUGE}, "steps must lie in .* got an integer too long to print", id="steps 10**5000"),
    pytest.param({"threads": -_HUGE}, "threads must lie in", id="threads -10**5000"),
    pytest.param({"crop": (_HUGE, 64)}, "crop must be .* got a tuple holding an integer too long to print",
                 id="crop 10**5000"),
    pytest.param({"max_minutes": 10**400}, "max_minutes must be > 0", id="max_minutes 10**400"),
    pytest.param({"max_minutes": _HUGE}, "max_minutes must be > 0 .*got an integer too long to print",
                 id="max_minutes 10**5000"),
])
@pytest.mark.parametrize("stage", ["segmentor", "query_flow"])
def test_options_past_a_float_or_64_bits_are_refused_by_name(change, message, stage):
    """Numbers no float holds, integers past 64 bits and integers Python cannot print are refused
    by the setting's name, as bad input elsewhere (OverflowError, str()'s own ValueError, or a torch
    error after the run began, before)."""
    if stage == "segmentor":
        opts = TrainOptions(run_dir="x", **change)
    else:
        opts = MotionTrainOptions(run_dir="r", init_checkpoint="c.pt", **change)
    with pytest.raises(ValueError, match=message):
        opts.validate()


def test_a_stop_at_past_64_bits_is_refused():
    with pytest.raises(ValueError, match=r"^stop_at must be at most 9223372036854775807 \(64 bits\), got 9223372036854775808"):
        TrainOptions(run_dir="x", stop_at=2**63).validate()


def test_the_largest_64_bit_seed_is_taken():
    TrainOptions(run_dir="x", seed=2**63 - 1).validate()
    MotionTrainOptions(run_dir="r", init_checkpoint="c.pt", seed=2**63 - 1).validate()


def test_motion_fractions_take_both_ends_of_zero_to_one():
    """video_fraction, synthetic_fraction, synthetic_travel and pseudo_label_confidence are in [0, 1],
    both ends included (all pairs from videos, every synthetic pair travelling)."""
    MotionTrainOptions(run_dir="r", init_checkpoint="c.pt", video_fraction=1.0, synthetic_fraction=1.0,
                       synthetic_travel=1.0, pseudo_label_confidence=1.0).validate()
    MotionTrainOptions(run_dir="r", init_checkpoint="c.pt", video_fraction=0.0, synthetic_fraction=0.0,
                       synthetic_travel=0.0, pseudo_label_confidence=0.0).validate()


def test_a_crop_given_as_a_list_is_accepted():
    """options.json stores the crop as a JSON list."""
    MotionTrainOptions(run_dir="r", init_checkpoint="c.pt", crop=[96, 128]).validate()
    TrainOptions(run_dir="x", crop=[96, 128]).validate()


# Options, optimiser groups, evaluation, the training loop's order and limits, run folders.

def _lite():
    return MPVSS(load_model_config("mpvss_lite"))


# -- options and schedule

def test_validate_edges_of_the_documented_ranges():
    """At the edges of the documented ranges: scale's high end must be finite, warmup_steps >= 0 and
    warmup_factor <= 1; stop_at == steps is allowed."""
    with pytest.raises(ValueError, match="scale must be"):
        TrainOptions(run_dir="x", scale=(0.5, float("inf"))).validate()
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        TrainOptions(run_dir="x", warmup_steps=-1).validate()
    with pytest.raises(ValueError, match=r"warmup_factor must be in \(0, 1\]"):
        TrainOptions(run_dir="x", warmup_factor=1.5).validate()
    TrainOptions(run_dir="x", steps=10, stop_at=10).validate()  # "stop_at None or in 1..steps"


def test_lr_factor_is_zero_past_the_end_of_the_schedule():
    """A resumed run whose --steps was lowered syncs its lr at a step past the schedule."""
    assert lr_factor(110, 100, 10, 0.01, 0.9) == 0.0


def test_cli_flags_set_their_own_options():
    """Without flags the CLI gives TrainOptions' defaults; each flag sets its own option, with its type."""
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    o = options_from_args(p.parse_args(["--run-dir", "r"]))
    assert o.flip is True and o.color_jitter is True and o.freeze_bn is True
    assert o == TrainOptions(run_dir="r")
    o = options_from_args(p.parse_args(["--run-dir", "r", "--no-color-jitter", "--lr", "1e-3", "--seed", "3",
                                        "--train-files", "a.png", "b.png"]))
    assert o.color_jitter is False and o.flip is True
    assert o.lr == 1e-3 and o.seed == 3 and o.train_files == ["a.png", "b.png"]
    o.validate()
    o = options_from_args(p.parse_args(["--run-dir", "r", "--no-flip"]))
    assert o.flip is False and o.color_jitter is True
    o = options_from_args(p.parse_args(["--run-dir", "r", "--no-freeze-bn"]))
    assert o.freeze_bn is False
    o = options_from_args(p.parse_args(["--run-dir", "r", "--steps", "10", "--stop-at", "5", "--max-minutes", "0.5"]))
    assert o.stop_at == 5 and isinstance(o.stop_at, int) and o.max_minutes == 0.5
    o.validate()


# -- optimiser groups

def test_no_decay_for_group_norm_and_batch_norm_of_the_segmentor():
    """The pixel decoder's GroupNorm and the backbone's BatchNorm take no decay."""
    model = _lite()
    skip = trainer.no_decay_parameters(model)
    named = dict(model.named_parameters())
    for name in ("sem_seg_head.pixel_decoder.lateral_convs.res2.norm.weight", "backbone.features.0.1.weight",
                 "backbone.features.0.1.bias"):
        assert id(named[name]) in skip, name


# -- evaluation helpers

def test_evaluate_frames_uses_eval_mode_and_restores_the_callers_mode():
    """Evaluation must not update BatchNorm statistics, gives the model back as it was, and counts
    the prediction against the label on the non-void pixels."""
    torch.manual_seed(0)
    model = _lite()
    image, label = torch.rand(3, 64, 96) * 255, torch.randint(0, 11, (64, 96))
    label[:, :10] = 0
    label[40:] = 255  # void rows
    frames = [(image, label)]
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    trainer.evaluate_frames(model, frames, [0])
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    model.eval()
    cm = trainer.evaluate_frames(model, frames, [0])
    assert not model.training
    # prediction against label, every class counted (class 0 too), the void pixels left out
    want = ConfusionMatrix(11)
    want.update(trainer.segment_frame(model, image), label)
    assert cm.mat.sum() == 40 * 96 and np.array_equal(cm.mat, want.mat)


@needs_data
def test_segment_frame_zero_pads_after_normalisation_and_upsamples_like_mask2former():
    """The padded canvas is zero after normalisation (= raw pixel_mean before it), and
    the mask logits are upsampled with align_corners=False before scoring (the shipped model on a
    CamVid frame cut to 150 x 200, padded to 160 x 224)."""
    from mpvss_ros.nn.mpvss import semantic_scores

    model = load_model(device="cpu").model.eval()
    image = CamVidFrames(TRAIN_DIR, TRAIN_ANNOT, train=False, files=FILES[:1])[0][0][:, 100:250, 100:300]
    h, w = 150, 200
    got = trainer.segment_frame(model, image)
    hp, wp = 160, 224
    mean = torch.tensor(model.cfg.input.pixel_mean).view(3, 1, 1)
    canvas = mean.expand(3, hp, wp).clone()
    canvas[:, :h, :w] = image
    with torch.no_grad():
        out = model.forward_segmentor(canvas[None], aux=False)
        masks = F.interpolate(out.mask_logits, size=(hp, wp), mode="bilinear", align_corners=False)
        want = semantic_scores(out.class_logits, masks)[0, :, :h, :w].argmax(0)
    assert got.shape == (h, w)
    assert len(torch.unique(want)) > 2  # a real segmentation, not one class
    assert torch.equal(got, want)


# -- model building

def test_imagenet_weights_for_a_backbone_that_is_not_mobilenet_are_refused():
    """imagenet_weights is for the MobileNetV2 backbone only."""

    cfg = load_model_config("mpvss_r50")
    with pytest.raises(ValueError, match="imagenet_weights is for the MobileNetV2 backbone"):
        trainer._build_model(TrainOptions(run_dir="x", model="mpvss_r50", imagenet_weights="some.pt"), cfg)


@needs_data
def test_the_imagenet_file_given_is_the_one_loaded(tmp_path):
    """--imagenet-weights FILE is read, not the shared data's file: a missing one is an error."""

    with pytest.raises(FileNotFoundError):
        trainer._build_model(_opts(tmp_path, imagenet_weights=str(tmp_path / "missing.pt")),
                             load_model_config("mpvss_lite"))


# -- the training loop

def _record_criteria(mp, into):
    """Patch SetCriterion.forward (with the MonkeyPatch ``mp``) to append each loss module it runs to ``into``."""
    real_loss = SetCriterion.forward

    def loss(self, *a, **k):
        into.append(self)
        return real_loss(self, *a, **k)

    mp.setattr(SetCriterion, "forward", loss)


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """4 steps on 5 frames, batch 2 (2 batches per epoch, one frame left over), a crop that is
    no multiple of 32, 2 warm-up steps, a no-object weight other than the default, validation every
    2 steps, with the data order, the labels, the network's valid size, the gradient norm at each
    optimiser step and the loss module recorded."""
    if TRAIN_DIR is None or WEIGHTS is None or not WEIGHTS.is_file():
        pytest.skip("shared CamVid data / ImageNet weights not available")

    files = sorted(p.name for p in TRAIN_DIR.iterdir())[:5]
    run = tmp_path_factory.mktemp("recorded")
    opts = _opts(run, train_files=files, steps=4, batch_size=2, crop=(80, 100), num_points=64,
                 val_every=2, val_frames=1, warmup_steps=2, warmup_factor=0.25, no_object_weight=0.2)
    rec = {"items": [], "labels": [], "valid_hw": [], "grad_norms": [], "criteria": []}
    real_getitem, real_targets = CamVidFrames.__getitem__, trainer.semantic_batch_to_targets
    real_forward, real_step = MPVSS.forward_segmentor, torch.optim.AdamW.step

    def getitem(self, idx):
        if self.train:
            rec["items"].append((self.epoch, int(idx)))
        return real_getitem(self, idx)

    def targets(labels, *a, **k):
        rec["labels"].append(labels.clone())
        return real_targets(labels, *a, **k)

    def forward(self, image, valid_hw=None, *a, **k):
        if self.training:
            rec["valid_hw"].append(tuple(valid_hw) if valid_hw is not None else None)
        return real_forward(self, image, valid_hw, *a, **k)

    def step(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        rec["grad_norms"].append(float(torch.linalg.vector_norm(torch.stack([x.norm() for x in grads]))))
        return real_step(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CamVidFrames, "__getitem__", getitem)
        mp.setattr(trainer, "semantic_batch_to_targets", targets)
        mp.setattr(MPVSS, "forward_segmentor", forward)
        mp.setattr(torch.optim.AdamW, "step", step)
        _record_criteria(mp, rec["criteria"])
        result = train_segmentor(opts)
    initial, _ = trainer._build_model(opts, load_model_config("mpvss_lite"))
    return run, opts, result, rec, initial


@needs_data
def test_batches_follow_the_documented_data_order(recorded_run):
    """Epoch e draws the permutation default_rng([seed, 1, e]) in batch-size
    slices, len // batch_size batches per epoch, with the epoch's augmentation draws."""
    _, opts, result, rec, _ = recorded_run
    assert result.finished and result.step == 4
    want = []
    for s in range(4):
        e, within = divmod(s, 5 // 2)
        perm = np.random.default_rng([opts.seed, 1, e]).permutation(5)
        want += [(e, int(i)) for i in perm[within * 2:(within + 1) * 2]]
    assert rec["items"] == want


@needs_data
def test_padding_to_the_network_size_is_void_and_outside_the_valid_size(recorded_run):
    """The crop (80, 100) is padded to (96, 128) with void labels, and the network is told
    the valid size so the padding is zero after normalisation."""
    _, _, _, rec, _ = recorded_run
    assert len(rec["labels"]) == 4 and rec["valid_hw"] == [(80, 100)] * 4
    for labels in rec["labels"]:
        assert labels.shape[-2:] == (96, 128)
        assert (labels[:, 80:, :] == 255).all() and (labels[:, :, 100:] == 255).all()


@needs_data
def test_gradients_are_clipped_before_the_optimiser_step(recorded_run):
    """AdamW sees gradients of total norm <= clip_grad_norm; the log keeps the norm before clipping."""
    run, opts, _, rec, _ = recorded_run
    assert len(rec["grad_norms"]) == 4
    assert max(rec["grad_norms"]) <= opts.clip_grad_norm * (1 + 1e-4)
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if not json.loads(x).get("val")]
    assert all(r["grad_norm"] > opts.clip_grad_norm for r in logged)


@needs_data
def test_log_records_backbone_lr_and_losses_over_all_predictions(recorded_run):
    """Each step's record: the lr that step trained with (warm-up times poly decay, lr_factor of the
    0-based step), lr_backbone = lr * backbone_lr_mult, the epoch, the total loss (the weighted sum
    2 CE + 5 mask + 5 dice over all predictions) and loss_*_all summing the auxiliary predictions too."""
    run, opts, result, _, _ = recorded_run
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logged if not r.get("val")]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["lr"] for r in steps] == pytest.approx(
        [opts.lr * lr_factor(s, 4, 2, 0.25, opts.poly_power) for s in range(4)], rel=1e-6)
    assert [r["epoch"] for r in steps] == [0, 0, 1, 1]
    assert [r["loss"] for r in steps] == pytest.approx(result.losses, rel=1e-6)
    for r in steps:
        assert r["lr_backbone"] == pytest.approx(r["lr"] * opts.backbone_lr_mult)
        assert r["loss"] == pytest.approx(2 * r["loss_ce_all"] + 5 * r["loss_mask_all"] + 5 * r["loss_dice_all"],
                                          rel=1e-4)
        for name in ("ce", "mask", "dice"):
            assert r[f"loss_{name}_all"] > r[f"loss_{name}"] * 1.5, (name, r)


@needs_data
def test_the_loss_uses_the_runs_matcher_points_and_weights(recorded_run):
    """The Hungarian matcher and the loss sample num_points points; the loss weighs CE 2, mask 5,
    dice 5 and the no-object class by no_object_weight."""
    _, opts, _, rec, _ = recorded_run
    assert rec["criteria"]
    crit = rec["criteria"][0]
    assert isinstance(crit.matcher, HungarianMatcher) and crit.matcher.num_points == 64 and crit.num_points == 64
    assert float(crit.empty_weight[-1]) == pytest.approx(opts.no_object_weight) and opts.no_object_weight == 0.2
    assert (crit.weight_class, crit.weight_mask, crit.weight_dice) == (2.0, 5.0, 5.0)


@needs_data
def test_validation_runs_every_val_every_steps(recorded_run):
    """Validation every val_every steps, on the val split's frames, mIoU and pACC in percent (the
    last one scores the final model)."""
    run, _, result, _, _ = recorded_run
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r.get("val")] == [2, 4]
    assert [r["step"] for r in result.val] == [2, 4]
    model = _lite()
    model.load_state_dict(torch.load(run / "model_final.pt", weights_only=True)["state_dict"])
    cm = trainer.evaluate_frames(model, CamVidFrames(camvid_dir("val"), camvid_annot_dir("val"), train=False), [0])
    last = result.val[-1]
    assert last["frames"] == 1
    assert last["mIoU"] == pytest.approx(100 * cm.miou(), abs=1e-3)
    assert last["pACC"] == pytest.approx(100 * cm.pixel_accuracy(), abs=1e-3)


@needs_data
def test_step_times_summarise_the_logged_step_times(recorded_run):
    """The result's sec_per_step is the mean and sec_per_step_median (the median step time that
    mpvss train reports) the median of the step times in log.jsonl (rounded there to 0.1 ms)."""
    run, _, result, _, _ = recorded_run
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["sec_per_step"] for r in logged if "sec_per_step" in r]
    assert len(steps) == 4
    assert result.sec_per_step_median == pytest.approx(float(np.median(steps)), abs=1e-4)
    assert result.sec_per_step == pytest.approx(float(np.mean(steps)), abs=1e-4)


@needs_data
def test_backbone_batch_norm_statistics_stay_frozen_through_validation(recorded_run):
    """freeze_bn keeps the backbone's BatchNorm statistics at their ImageNet values,
    also in the steps after a validation (which puts the model in eval mode and back)."""
    run, _, _, _, initial = recorded_run
    final = torch.load(run / "model_final.pt", weights_only=True)["state_dict"]
    init = initial.state_dict()
    keys = [k for k in init if k.startswith("backbone.") and ("running_mean" in k or "running_var" in k)]
    assert keys
    for k in keys:
        assert torch.equal(final[k], init[k]), k


@needs_data
def test_a_non_finite_loss_stops_the_run(tmp_path, monkeypatch):
    """A NaN loss is an error, not a step."""
    real_call = trainer.SetCriterion.__call__

    def nan_loss(self, *a, **k):
        losses = real_call(self, *a, **k)
        losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(trainer.SetCriterion, "__call__", nan_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_segmentor(_opts(tmp_path / "run", steps=2, num_points=64, imagenet_weights="none"))


@needs_data
def test_clip_grad_norm_zero_disables_clipping(tmp_path):
    """--clip-grad-norm 0 trains unclipped (Adam's first step moves weights by about lr);
    clipping to 0 would leave only the weight decay."""

    opts = _opts(tmp_path / "run", steps=1, num_points=64, clip_grad_norm=0.0, imagenet_weights="none")
    result = train_segmentor(opts)
    assert result.finished
    initial, _ = trainer._build_model(opts, load_model_config("mpvss_lite"))
    init = initial.state_dict()
    final = torch.load(tmp_path / "run" / "model_final.pt", weights_only=True)["state_dict"]
    moved = max(float((final[k] - init[k]).abs().max()) for k in init if k.startswith("sem_seg_head.")
                and init[k].is_floating_point())
    assert moved > 0.5 * opts.lr


@needs_data
def test_the_fixed_matcher_option_trains_with_the_query_per_class_matcher(tmp_path, monkeypatch):
    """--matcher fixed: the loss matches with FixedMatcher, not the Hungarian one."""
    criteria = []
    _record_criteria(monkeypatch, criteria)
    result = train_segmentor(_opts(tmp_path / "run", steps=1, batch_size=1, crop=(64, 64), num_points=64,
                                   train_files=FILES[:1], imagenet_weights="none", matcher="fixed"))
    assert result.finished and [type(c.matcher) for c in criteria] == [FixedMatcher]


@needs_data
def test_max_minutes_is_in_minutes_and_stops_the_run(tmp_path, monkeypatch):
    """With a clock that advances 10 s per reading, max_minutes=5 lets 3 steps finish and
    max_minutes=0.05 stops after the first step, with a checkpoint."""
    clock = {"t": 0.0}

    def perf_counter():
        clock["t"] += 10.0
        return clock["t"]

    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=perf_counter))
    long = train_segmentor(_opts(tmp_path / "long", steps=3, num_points=64, max_minutes=5.0))
    assert long.finished and long.step == 3
    short = train_segmentor(_opts(tmp_path / "short", steps=3, num_points=64, max_minutes=0.05))
    assert short.step == 1 and not short.finished
    assert torch.load(tmp_path / "short" / "checkpoint_last.pt", weights_only=True)["meta"]["step"] == 1


@needs_data
def test_fewer_training_frames_than_a_batch_are_refused(tmp_path):
    """A run with fewer training frames than batch_size is refused, the message naming both numbers."""
    with pytest.raises(ValueError, match="2 training frames for batch_size 3"):
        train_segmentor(_opts(tmp_path / "run", batch_size=3, imagenet_weights="none"))


@needs_data
def test_an_unknown_motion_module_stays_unknown_in_the_runs_files(tmp_path):
    """A stage-1 init file written before stage 1 recorded motion_trained: this run's files say
    None (unknown), not True."""

    cfg = load_model_config("mpvss_lite")
    save_checkpoint(tmp_path / "old_stage1.pt", _lite(), cfg.to_dict(), {"stage": "segmentor"})
    train_segmentor(_opts(tmp_path / "run", steps=1, num_points=64, init_checkpoint=str(tmp_path / "old_stage1.pt")))
    assert torch.load(tmp_path / "run" / "model_final.pt", weights_only=True)["meta"]["motion_trained"] is None


# -- run folders (both stages)

@pytest.mark.parametrize("change, message", [
    ({"step": -1}, "'step' must be an integer >= 0"),
    ({"torch_rng": torch.get_rng_state()[None]}, "'torch_rng' is not a random-generator state"),
    ({"cuda_rng": torch.zeros(8)}, "'cuda_rng' is not a random-generator state"),
    ({"options": [1]}, "'options' is a list, not a dict"),
    ({"optimizer": {"state": {}, "param_groups": {}}}, "'optimizer' is not an optimizer state dict"),
    ({"scheduler": [1]}, "'scheduler' is a list, not a dict"),
])
def test_read_trainer_state_names_each_damaged_entry(tmp_path, change, message):
    _, state = _real_state()
    state.update(change)
    torch.save(state, tmp_path / "trainer_state.pt")
    with pytest.raises(ValueError, match=message):
        trainer.read_trainer_state(tmp_path / "trainer_state.pt")


def test_a_run_file_without_a_stage_may_be_resumed_by_either_stage(tmp_path):
    """check_run_dir: "files without one pass"."""

    model, state = _real_state()
    save_checkpoint(tmp_path / "checkpoint_last.pt", model, {}, meta={"step": 3})
    torch.save(state, tmp_path / "trainer_state.pt")
    trainer.check_run_dir(tmp_path, resume=True, stage="segmentor")
    trainer.check_run_dir(tmp_path, resume=True, stage="query_flow")


def test_truncate_log_drops_later_records_and_torn_lines(tmp_path):
    """On resume the log keeps the records up to the step resumed from; a line cut off by a kill
    (or one that is no record) goes too, so the log stays one JSON object per line."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"val": true, "step": 2}\n[1]\n{"step": 3}\n{"step": 4, "lo')
    trainer.truncate_log(log, 3)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n{"val": true, "step": 2}\n{"step": 3}\n'


def test_truncate_log_drops_lines_that_are_no_records_of_any_kind(tmp_path):
    """Bytes that are not UTF-8, a step of a list, of infinity or of null are no records either;
    they go, and the resume does not stop on them (UnicodeDecodeError, TypeError, OverflowError)."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 1}\n\xff\xfe{"step": 2}\n{"step": [2]}\n{"step": Infinity}\n{"step": null}\n'
                    b'{"step": 2, "note": "\xc3\xa9"}\n{"step": 9}\n'
                    + b"[" * 100_000 + b"]" * 100_000 + b"\n")  # nested past the recursion limit (RecursionError)
    trainer.truncate_log(log, 3)
    assert log.read_text(encoding="utf-8") == '{"step": 1}\n{"step": 2, "note": "\u00e9"}\n'


def test_a_log_rewrite_cut_short_keeps_the_log(tmp_path, monkeypatch):
    """The disk fills up while --resume rewrites the log: it stays as it was (it was truncated to
    half its records, or to nothing) and no temporary is left."""
    log = tmp_path / "log.jsonl"
    text = "".join(f'{{"step": {i}, "loss": 1.5}}\n' for i in range(1, 40))
    log.write_text(text)
    fill_the_disk_half_way(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        trainer.truncate_log(log, 30)
    monkeypatch.undo()
    assert log.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]


def test_a_run_record_rewrite_cut_short_keeps_the_record(tmp_path, monkeypatch):
    """options.json and model_config.json are rewritten when a run resumes; a disk that fills up
    then leaves the previous record whole (it was written in place: half a JSON file)."""
    record = tmp_path / "options.json"
    write_json_atomic(record, {"lr": 0.0001, "steps": 10})
    before = record.read_text()
    assert json.loads(before) == {"lr": 0.0001, "steps": 10} and before.endswith("}\n")
    fill_the_disk_half_way(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(record, {"lr": 0.0002, "steps": 20, "note": "x" * 1000})
    monkeypatch.undo()
    assert record.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["options.json"]


def test_the_trainer_state_reaches_the_disk_before_it_is_renamed(tmp_path, monkeypatch):
    """As write_atomic does for the model file: the state's temporary file is fsync-ed before the
    rename, so a power cut cannot leave a renamed state whose bytes never reached the disk."""
    import os

    events, real_fsync, real_save = [], os.fsync, trainer.save_checkpoint

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))  # the file's path (Linux)
        real_fsync(fd)

    def save(path, *args, **kwargs):
        events.append(("model", str(path)))
        real_save(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    trainer.save_run_checkpoint(tmp_path / "checkpoint_last.pt", tmp_path / "trainer_state.pt", torch.nn.Linear(2, 2),
                                {}, {"step": 1}, {"step": 1})
    assert events[0] == ("fsync", str(tmp_path / "trainer_state.pt.tmp"))
    assert ("model", str(tmp_path / "checkpoint_last.pt")) in events
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True) == {"step": 1}


def test_the_final_file_is_written_again_when_steps_were_run(tmp_path):
    """A finished run resumed with a longer schedule writes its new final model."""

    model = torch.nn.Linear(2, 2)
    trainer.save_final_checkpoint(tmp_path, model, {}, {"step": 2}, 2)
    trainer.save_final_checkpoint(tmp_path, model, {}, {"step": 3}, 1)
    assert read_checkpoint(tmp_path / "model_final.pt").meta["step"] == 3
    trainer.save_final_checkpoint(tmp_path, model, {}, {"step": 3, "val": None}, 0)  # no step run: kept
    assert "val" not in read_checkpoint(tmp_path / "model_final.pt").meta


def test_torch_threads_zero_leaves_the_count_and_any_count_is_restored():
    """torch_threads(0) leaves the thread count as it is; any other count applies inside the block and
    the caller's count is restored after it."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with trainer.torch_threads(0):
            assert torch.get_num_threads() == 2
        with trainer.torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_threads_option_applies_during_the_run_and_is_restored(tmp_path, monkeypatch):
    """train_segmentor trains with --threads torch threads and gives the caller's count back."""
    monkeypatch.setattr(trainer, "_train", lambda opts: torch.get_num_threads())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert train_segmentor(_no_data_opts(tmp_path / "run", threads=2)) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_second_ctrl_c_stops_at_once_and_the_handler_is_restored():
    """Under InterruptAfterStep a first Ctrl-C only requests a stop and a second raises KeyboardInterrupt
    at once; the previous SIGINT handler is restored on exit."""
    previous = signal.getsignal(signal.SIGINT)
    with trainer.InterruptAfterStep() as interrupt:
        signal.raise_signal(signal.SIGINT)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_the_ctrl_c_guard_outside_the_main_thread_changes_nothing():
    """Python delivers signals to the main thread only: training in another thread (a ROS node's)
    must start, and leave the SIGINT handler as it was."""
    previous = signal.getsignal(signal.SIGINT)
    errors = []

    def body():
        try:
            with trainer.InterruptAfterStep() as interrupt:
                assert not interrupt.requested
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert errors == [] and signal.getsignal(signal.SIGINT) is previous
