"""The shipped default model (models/mpvss_lite_camvid.pt) and its model card."""

from pathlib import Path

import pytest
import torch

from mpvss_ros.cli import main
from mpvss_ros.evaluation.study import LabelledSequence, evaluate_sequence, load_sequence
from mpvss_ros.model_loader import load_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "mpvss_lite_camvid.pt"
#: models/README.md: per-frame mIoU on val frames 0, 25, 50, 75, 100 measured 70.77 when the file
#: was written and 70.76 with the code of 2026-12-05; the floor leaves 2 points for library
#: differences (OpenCV resize, BLAS).
FIVE_FRAME_FLOOR = 68.7
#: models/README.md: `mpvss eval --max-frames 10 --schedule fixed:5` (chained query flow, 2 key
#: frames) measured 67.27 with this release on 2026-12-05 (copy 60.52, DIS 68.15 on the same
#: frames); 2 points below.
TEN_FRAME_FLOOR = 65.2


def test_shipped_file_loads_weights_only_and_is_small():
    assert SHIPPED.stat().st_size < 25 * 1024 * 1024
    raw = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    assert raw["format"] == "mpvss_ros" and raw["model_config"]["name"] == "mpvss_lite"
    assert raw["meta"]["stored_dtype"] == "float16"
    loaded = load_model()  # the default: mpvss_lite with its shipped weights
    assert loaded.trained and loaded.weights is not None and loaded.weights.resolve() == SHIPPED.resolve()
    assert loaded.config.motion.image_scale == raw["model_config"]["motion"]["image_scale"]


def test_shipped_config_is_the_committed_config():
    """``--model mpvss_lite`` (config/models/mpvss_lite.yaml) and the file's own config describe the
    same model: the card's figures hold whichever way the shipped weights are loaded."""
    from mpvss_ros.config import load_model_config, model_config_from_dict

    raw = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    # Settings added after the file was written take their defaults on both sides.
    assert model_config_from_dict(raw["model_config"]).to_dict() == load_model_config("mpvss_lite").to_dict()


def test_shipped_model_per_frame_miou_on_five_val_frames(camvid_val_dirs):
    seq = load_sequence(*camvid_val_dirs, fps=15)
    idx = [0, 25, 50, 75, 100]
    sub = LabelledSequence([seq.names[i] for i in idx], [seq.images[i] for i in idx], [seq.labels[i] for i in idx], 15)
    result = evaluate_sequence(load_model(), sub, "copy", "fixed:1")
    assert result["mIoU"] >= FIVE_FRAME_FLOOR, result["mIoU"]


def test_eval_runs_on_ten_real_frames(camvid_val_dirs, tmp_path, capsys):
    rc = main(["eval", "--max-frames", "10", "--schedule", "fixed:5", "--out", str(tmp_path), "--threads", "1"])
    assert rc == 0
    import json

    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["frames"] == 10 and result["key_frames"] == 2 and result["trained"]
    assert result["mIoU"] >= TEN_FRAME_FLOOR, result["mIoU"]


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__]))
