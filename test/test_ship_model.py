"""scripts/ship_model.py: the shipped file takes the segmentor from stage 1, the motion module from
stage 2, and the configuration from stage 2 or from ``--model``."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import yaml

from mpvss_ros.checkpoints import read_checkpoint, save_checkpoint
from mpvss_ros.config import load_model_config
from mpvss_ros.model_loader import load_model
from mpvss_ros.nn.mpvss import MPVSS


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """(stage-1 file, stage-2 file at motion image_scale 0.25, the two models)."""
    out = tmp_path_factory.mktemp("ship")
    cfg = load_model_config("mpvss_lite")
    stage2_cfg = dataclasses.replace(cfg, motion=dataclasses.replace(cfg.motion, image_scale=0.25))
    torch.manual_seed(1)
    seg = MPVSS(cfg)
    torch.manual_seed(2)
    mot = MPVSS(stage2_cfg)  # stage 2 trains the motion module only (--head-lr-mult 0)
    mot.load_state_dict({k: v if k.startswith("motion.") else seg.state_dict()[k] for k, v in mot.state_dict().items()})
    save_checkpoint(out / "stage1.pt", seg, cfg.to_dict())
    save_checkpoint(out / "stage2.pt", mot, stage2_cfg.to_dict())
    return out / "stage1.pt", out / "stage2.pt", seg, mot


@pytest.fixture()
def ship(monkeypatch, load_script):
    """Run scripts/ship_model.py: ``ship(stage1, stage2, out, *extra_args)``."""
    main = load_script("ship_model").main

    def run(stage1, stage2, out, *extra):
        monkeypatch.setattr(sys, "argv", ["ship_model.py", "--segmentor", str(stage1), "--motion", str(stage2),
                                          "--out", str(out), *extra])
        main()

    return run


def _check_parts(path, seg, mot):
    shipped = load_model(None, path).model.state_dict()
    for k, v in shipped.items():
        src = (mot if k.startswith("motion.") else seg).state_dict()[k]
        assert torch.equal(v, src.half().float() if src.is_floating_point() else src), k


def test_parts_and_config_from_stage_2(stages, tmp_path, ship):
    stage1, stage2, seg, mot = stages
    ship(stage1, stage2, tmp_path / "shipped.pt")
    ck = read_checkpoint(tmp_path / "shipped.pt")
    assert ck.model_config["motion"]["image_scale"] == 0.25
    assert ck.meta["config_from"] == str(stage2) and ck.meta["stored_dtype"] == "float16"
    _check_parts(tmp_path / "shipped.pt", seg, mot)


def test_model_option_replaces_the_config(stages, tmp_path, ship):
    stage1, stage2, seg, mot = stages
    ship(stage1, stage2, tmp_path / "shipped.pt", "--model", "mpvss_lite")
    ck = read_checkpoint(tmp_path / "shipped.pt")
    want = load_model_config("mpvss_lite").motion.image_scale
    assert want != 0.25 and ck.model_config["motion"]["image_scale"] == want
    assert ck.meta["config_from"] == "mpvss_lite"
    _check_parts(tmp_path / "shipped.pt", seg, mot)
    assert load_model(None, tmp_path / "shipped.pt").model.motion.image_scale == want


def test_model_option_that_changes_shapes_fails(stages, tmp_path, ship, capsys):
    """Another model's keys (a KeyError traceback before) or other shapes: one error line, exit 1."""
    stage1, stage2, _, _ = stages
    with pytest.raises(SystemExit) as exc:  # another model: other keys
        ship(stage1, stage2, tmp_path / "shipped.pt", "--model", "mpvss_r50")
    assert exc.value.code == 1
    assert capsys.readouterr().err.startswith("ship_model.py: error: the checkpoints lack ")
    assert not (tmp_path / "shipped.pt").exists()
    # the same keys with other shapes (a narrower flow embedding): load_state_dict refuses it
    cfg = load_model_config("mpvss_lite").to_dict()
    cfg["motion"]["flow_embed_dim"] = 32
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        ship(stage1, stage2, tmp_path / "shipped.pt", "--model", str(narrow))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ship_model.py: error: the weights do not fit the configuration: ") and "size mismatch" in err
    assert not (tmp_path / "shipped.pt").exists()


@pytest.mark.parametrize("options, words", [(b'{"seed": 1', "is not a run's options (not JSON"),
                                            (b"\xff\xfe", "is not a run's options (not JSON"),
                                            (b"[1, 2]", "it holds a list"),
                                            (b'{"init_checkpoint": 5}', "must be a checkpoint's path, got 5")])
def test_damaged_inputs_are_one_error_line(stages, tmp_path, ship, capsys, options, words):
    """A damaged options.json beside a checkpoint, a missing checkpoint, an --out that is a folder:
    each was a traceback (JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError,
    CheckpointError, IsADirectoryError; helper-176)."""
    import shutil

    stage1, stage2, _, _ = stages
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(stage2, run / "model_final.pt")
    (run / "options.json").write_bytes(options)
    with pytest.raises(SystemExit) as exc:
        ship(stage1, run / "model_final.pt", tmp_path / "shipped.pt")
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ship_model.py: error: ") and words in err and len(err.splitlines()) == 1, err
    (run / "options.json").unlink()
    for stage1_path, out in ((tmp_path / "missing.pt", tmp_path / "shipped.pt"), (stage1, tmp_path)):
        with pytest.raises(SystemExit) as exc:
            ship(stage1_path, run / "model_final.pt", out)
        assert exc.value.code == 1 and capsys.readouterr().err.startswith("ship_model.py: error: ")
    assert not (tmp_path / "shipped.pt").exists()


def test_several_motion_checkpoints_ship_their_average(stages, tmp_path, monkeypatch, load_script):
    """A model soup: the motion modules of several stage-2 checkpoints averaged (float32, then
    stored as float16), the segmentor from stage 1, the config from the last checkpoint; the
    provenance lists every checkpoint."""
    stage1, stage2, seg, mot = stages
    torch.manual_seed(3)
    other = MPVSS(dataclasses.replace(mot.cfg))  # another stage-2 run from the same stage 1
    other.load_state_dict({k: v if k.startswith("motion.") else seg.state_dict()[k] for k, v in other.state_dict().items()})
    save_checkpoint(tmp_path / "other.pt", other, mot.cfg.to_dict())
    main = load_script("ship_model").main
    monkeypatch.setattr(sys, "argv", ["ship_model.py", "--segmentor", str(stage1), "--motion", str(stage2),
                                      str(tmp_path / "other.pt"), "--out", str(tmp_path / "soup.pt")])
    main()
    ck = read_checkpoint(tmp_path / "soup.pt")
    assert ck.meta["motion_from"] == {"average_of": [str(stage2), str(tmp_path / "other.pt")]}
    assert ck.meta["config_from"] == str(tmp_path / "other.pt") and ck.model_config["motion"]["image_scale"] == 0.25
    shipped = load_model(None, tmp_path / "soup.pt").model.state_dict()
    a, b, s = mot.state_dict(), other.state_dict(), seg.state_dict()
    for k, v in shipped.items():
        if k.startswith("motion.") and v.is_floating_point():
            want = ((a[k].float() + b[k].float()) / 2).half().float()
            assert torch.equal(v, want), k
        elif not k.startswith("motion."):
            assert torch.equal(v, s[k].half().float() if s[k].is_floating_point() else s[k]), k
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("motion.")), "the two runs differ"


def test_the_same_motion_checkpoint_twice_is_refused(stages, tmp_path, monkeypatch, load_script):
    stage1, stage2, _, _ = stages
    main = load_script("ship_model").main
    monkeypatch.setattr(sys, "argv", ["ship_model.py", "--segmentor", str(stage1), "--motion", str(stage2), str(stage2),
                                      "--out", str(tmp_path / "soup.pt")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and not (tmp_path / "soup.pt").exists()


def test_a_stage_2_checkpoint_whose_heads_were_trained_is_refused(stages, tmp_path, ship, capsys):
    """Stage 2's default --head-lr-mult 0.1 trains class_embed / mask_embed with the motion module;
    taking the heads from --segmentor would pair that motion module with heads it never saw."""
    stage1, _, seg, mot = stages
    trained = MPVSS(mot.cfg)
    trained.load_state_dict(mot.state_dict())
    with torch.no_grad():
        trained.sem_seg_head.predictor.class_embed.weight.add_(1e-2)
    save_checkpoint(tmp_path / "heads.pt", trained, mot.cfg.to_dict())
    with pytest.raises(SystemExit) as exc:
        ship(stage1, tmp_path / "heads.pt", tmp_path / "shipped.pt")
    assert exc.value.code == 2 and not (tmp_path / "shipped.pt").exists()
    assert "1 of its segmentor tensors differ from --segmentor's (sem_seg_head.predictor.class_embed.weight)" in (
        capsys.readouterr().err)
    # the shipped file itself (float16) as stage 1 fits a stage 2 trained from it
    save_checkpoint(tmp_path / "seg16.pt", seg, seg.cfg.to_dict(), half=True)
    ship(tmp_path / "seg16.pt", stages[1], tmp_path / "shipped.pt")
    assert (tmp_path / "shipped.pt").is_file()
