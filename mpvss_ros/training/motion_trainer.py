"""Stage 2: train the query-based flow (MPVSS section 3.3; spec §3.2-3.3).

The stage-1 segmentor is frozen; the motion module learns, together with the class and mask
embedding heads (``class_embed``, ``mask_embed``) as in the official code (its ``MODEL.FINETUNE``).
For each (key, current) pair the key frame is segmented, one flow per query is estimated, **all**
deep-supervision mask sets are warped with those flows, and the Mask2Former criterion compares
them, with the key frame's class logits, to the current frame's target (spec §3.2).

Added to the official recipe, because this model trains from scratch on a CPU in tens of minutes
rather than 90k GPU iterations: on short video pairs an L1 term pulls the pixel-wise flow and
the fused per-query flows towards OpenCV DIS optical flow (``flow_weight``; see
:mod:`.pairs`), and, on optional synthetic pairs made from single CamVid frames under a known
motion (``synthetic_fraction``, :mod:`.synthetic`), towards their exact flow. It only bootstraps
the flow branch: the mask loss alone decides how each segment moves.

With ``chain_training`` a video pair d frames apart is trained as chained propagation uses the
flow: d one-frame flows, each from the key frame's queries, composed onto each other
(:func:`~mpvss_ros.nn.warp.compose_flows`); the masks are warped once with the result.

Other departures from the official recipe (spec §3.3, §7.4): the whole model runs in eval mode,
so the frozen segmentor's BatchNorm statistics stay those of stage 1 (the official code trains in
train mode and keeps updating them; the motion module has no BatchNorm and no dropout; a Swin
backbone's drop-path, official 0.3 and active there, is off); the
schedule warms up linearly over ``warmup_steps`` (50) from 1 % of the learning rate, where the
official one has no warm-up; and the heads learn at ``head_lr_mult`` (0.1) times the motion
module's rate, where the official code gives them the full rate (the shipped runs froze them,
``--head-lr-mult 0``: fine-tuned heads had cost per-frame mIoU, see the model card).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoints import IGNORED_KEYS, MOTION_PREFIX, load_init_checkpoint, read_checkpoint, read_state_dict
from ..evaluation.metrics import IGNORE_INDEX, ConfusionMatrix
from ..io.samples import bikes_clip, camvid_annot_dir, camvid_dir, check_default_data_classes, dashcam_clip
from ..model_loader import checkpoint_model_config, select_device
from ..nn.mpvss import MPVSS
from ..nn.transformer_decoder import DecoderOutput
from ..nn.warp import compose_flows, mmtrack_to_exact, warp_mask_logits
from ..paths import make_output_dir, write_json_atomic
from ..propagation import QueryFlowPropagator
from ..runtime.torch_backend import TorchBackend, to_channels_last
from ..scheduling import FixedIntervalScheduler
from ..segmenter import VideoSegmenter
from ..values import shown
from .criterion import SetCriterion, semantic_batch_to_targets
from .matcher import HungarianMatcher
from .options import (check_at_least, check_crop, check_fractions, check_integers, check_numbers,
                      check_optional_positive)
from .data import decode_frames, list_frames
from .pairs import FramePairs, LabelledFrames, check_camvid_pairs, check_crop_on_flow_grid, load_clip_on_canvas
from .synthetic import SyntheticMotion
from .trainer import (LOG_FILE, MODEL_FILE, STATE_FILE, InterruptAfterStep, check_run_dir, device_description,
                      camvid_root, lr_factor, no_decay_parameters, resume_run, rng_state, save_run_checkpoint,
                      options_dict, save_final_checkpoint, torch_threads, warn_option_changes)

__all__ = ["MotionTrainOptions", "train_motion", "pseudo_labels", "MIN_CROP"]

log = logging.getLogger(__name__)
#: Smallest crop side in pixels. OpenCV DIS, which makes the video pairs' flow targets, refuses
#: frames under 12 x 12 and kills the process (a segmentation fault) on frames under 16 rows that
#: are wide (15 x 200; OpenCV 5.1); 16 rows work at every width, 8 columns at every height. The
#: model pads any crop to a multiple of 32, and a CamVid or synthetic pair trains at 8 x 8.
MIN_CROP = 16


def _setting(default: Any, text: str) -> Any:
    """A dataclass field with its default and its one-line description ``text`` (``metadata["help"]``,
    which the flag of ``mpvss train motion`` prints as its help)."""
    return field(default=default, metadata={"help": text})


@dataclass
class MotionTrainOptions:
    """Stage-2 settings.

    A setting with a plain ``--name VALUE`` flag carries its one-line description in its field
    (``help`` metadata, printed by ``mpvss train motion --help``); the notes below add what a line
    does not say.

    Attributes:
        run_dir: output folder (log.jsonl, checkpoints); one that holds an earlier run only with
            ``resume`` (:func:`~mpvss_ros.training.trainer.check_run_dir`).
        init_checkpoint: the stage-1 model: this project's format, an official MPVSS checkpoint,
            or a per-frame Mask2Former one without a motion module (the official recipe's
            ``MODEL.WEIGHTS``; the motion module then starts from its initialisation). Without
            ``model``, its stored configuration, else the official model its backbone describes.
        crop: (H, W) pixels, both >= :data:`MIN_CROP` and multiples of the motion module's flow
            stride (8 for ``mpvss_lite``; checked once the model is built), padded internally to a
            multiple of 32.
        weight_decay, warmup_steps, poly_power, clip_grad_norm, checkpoint_every, threads, seed,
            max_minutes, progress: as stage 1 (:class:`~mpvss_ros.training.trainer.TrainOptions`).
        flow_weight: the flow targets are DIS on video pairs, the exact flow on synthetic pairs.
        synthetic_fraction, synthetic_travel: synthetic pairs are :mod:`.synthetic`'s;
            ``synthetic_travel`` is ``SyntheticMotion.travel_probability`` (0, the default, gives
            the similarity-only pairs of stage-2 run 5).
        chain_training: train video pairs d frames apart through the chain of d one-frame flows,
            composed as chained propagation composes them at inference
            (:func:`~mpvss_ros.nn.warp.compose_flows`), with the flow term on every link's DIS
            target; CamVid and synthetic pairs stay one link (key -> current). False: every pair
            is one direct flow, as the paper trains it.
        val_every, val_frames: the quick check runs query_flow at key interval 5 on the first
            ``val_frames`` val frames (none there: no check); monitoring only, never used to pick
            checkpoints.
        resume: continue from ``run_dir``'s checkpoint and trainer state.
        model: a model name or YAML whose configuration replaces the one stored in
            ``init_checkpoint`` (e.g. a changed motion module; the weights must still fit).
        init_motion: start the motion module from this checkpoint's ``motion.*`` weights instead
            of ``init_checkpoint``'s (warm start after retraining the segmentor); strict.
        device: ``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu`` or ``cuda[:N]``
            (:func:`~mpvss_ros.model_loader.select_device`).
        data_root: labelled frames in CamVid's layout (``train/ trainannot/``, optional ``val/
            valannot/``: a ``val/`` needs its ``valannot/``), as stage 1's [--data-root]; None =
            CamVid in the shared data folder.
            Pairs are consecutive frames of one sequence, by file name ``<sequence>_<frame
            number>`` (:func:`~mpvss_ros.training.pairs.camvid_pairs`).
        videos: unlabelled clips (video files, image folders or ``sample:bikes``) for the
            pseudo-labelled video pairs [--videos]; None = the shared dash-cam clip and
            ``bikes.mp4``; empty = no video pairs.
    """

    run_dir: str
    init_checkpoint: str
    steps: int = _setting(1500, "schedule length in optimiser steps")
    batch_size: int = _setting(8, "frame pairs per step")
    crop: tuple[int, int] = (256, 320)
    lr: float = _setting(3e-4, "AdamW learning rate of the motion module")
    head_lr_mult: float = _setting(0.1, "learning-rate multiplier of the class/mask heads (0 freezes them)")
    weight_decay: float = 0.05
    warmup_steps: int = _setting(50, "linear warm-up steps")
    poly_power: float = 0.9
    clip_grad_norm: float = _setting(0.01, "gradient-norm clip (<= 0 disables)")
    flow_weight: float = _setting(5.0, "weight of the flow L1 term towards DIS / exact synthetic flow (0 disables it)")
    video_fraction: float = _setting(0.5, "share of unlabelled video pairs among the non-synthetic pairs, 0..1")
    synthetic_fraction: float = _setting(0.0, "share of synthetic pairs with exact flow, 0..1")
    synthetic_travel: float = _setting(0.0, "share of synthetic pairs with camera travel and parallax, 0..1")
    max_gap: int = _setting(10, "largest key-to-current distance of video pairs (frames)")
    chain_training: bool = False
    pseudo_label_confidence: float = _setting(0.5, "video-target pixels below this confidence (0..1) are void, as "
                                                   "CamVid's void pixels: in no target mask")
    num_points: int = _setting(12544, "points per mask in matcher and loss")
    val_every: int = _setting(500, "quick validation every N steps (0: only at the end, -1: never)")
    val_frames: int = _setting(30, "val frames of the quick validation (CamVid's, or --data-root's val/)")
    checkpoint_every: int = _setting(250, "checkpoint every N steps")
    threads: int = _setting(2, "torch threads, 0 = unchanged")
    seed: int = 0
    max_minutes: float | None = _setting(None, "stop after this wall time in minutes (checkpointed)")
    progress: bool = True
    resume: bool = False
    max_clip_frames: int | None = _setting(None,
                                           "use only the first N frames of each unlabelled clip (tests, debugging)")
    model: str | None = None
    init_motion: str | None = None
    device: str = "auto"
    data_root: str | None = None
    videos: tuple[str, ...] | None = None

    def validate(self) -> None:
        """Check every setting's type and range (:func:`train_motion` calls it before any work).

        Ranges: ``steps``, ``batch_size``, ``max_gap``, ``num_points`` >= 1; both ``crop`` sides
        >= :data:`MIN_CROP` pixels; ``lr``, ``head_lr_mult``, ``weight_decay``, ``poly_power``,
        ``flow_weight``, ``warmup_steps``, ``val_frames``, ``checkpoint_every``, ``threads``,
        ``seed`` >= 0; ``val_every`` >= -1; ``video_fraction``, ``synthetic_fraction``,
        ``synthetic_travel``, ``pseudo_label_confidence`` in [0, 1]; ``clip_grad_norm`` finite;
        ``max_minutes`` None or > 0; ``max_clip_frames`` None or >= 2 (a video pair needs two
        frames); ``videos`` None or a sequence of non-empty path strings.

        Raises:
            ValueError: naming the first bad setting, its range and the value given.
        """
        check_integers(self, ("steps", "batch_size", "warmup_steps", "max_gap", "num_points", "val_every",
                              "val_frames", "checkpoint_every", "threads", "seed"))
        check_numbers(self, ("lr", "head_lr_mult", "weight_decay", "poly_power", "clip_grad_norm", "flow_weight",
                             "video_fraction", "synthetic_fraction", "synthetic_travel", "pseudo_label_confidence"))
        check_crop(self.crop, MIN_CROP, " (OpenCV DIS, which makes the video pairs' flow targets, fails on smaller "
                                        "frames)")
        check_at_least(self, {"steps": 1, "batch_size": 1, "max_gap": 1, "num_points": 1, "warmup_steps": 0,
                              "val_every": -1, "val_frames": 0, "checkpoint_every": 0, "threads": 0, "seed": 0,
                              "lr": 0, "head_lr_mult": 0, "weight_decay": 0, "poly_power": 0, "flow_weight": 0})
        check_fractions(self, {"video_fraction": "", "synthetic_fraction": "",
                               "synthetic_travel": " (the travel_probability of synthetic pairs)",
                               "pseudo_label_confidence": ""})
        check_optional_positive(self, "max_minutes", note=" (leave it out for no limit)")
        check_optional_positive(self, "max_clip_frames", integer=True, low=2,
                                note=", a video pair's two frames (leave it out for whole clips)")
        if self.videos is not None and (isinstance(self.videos, (str, os.PathLike)) or not all(
                isinstance(v, (str, os.PathLike)) and str(v) for v in self.videos)):
            raise ValueError(f"videos must be a list of paths (or None for the shared clips), got {shown(self.videos)}")


@dataclass
class MotionTrainResult:
    """What a stage-2 call did (see :class:`~mpvss_ros.training.trainer.TrainResult`)."""

    run_dir: Path
    step: int
    finished: bool
    checkpoint: Path
    losses: list[float] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    sec_per_step_median: float = float("nan")


def _inference_view(model: MPVSS) -> TorchBackend:
    """The training model behind the inference interface, left as it is: no BatchNorm folding
    and no re-layout (the model goes on training and is saved afterwards)."""
    return TorchBackend(model, next(model.parameters()).device, channels_last=False, fold_batch_norm=False)


@torch.no_grad()
def pseudo_labels(model: MPVSS, frames: list[np.ndarray], min_confidence: float) -> list[np.ndarray]:
    """The frozen segmentor's labels for unlabelled frames, (H, W) uint8, 255 where unsure.

    Args:
        model: the stage-1 model (eval mode).
        frames: (H, W, 3) uint8 RGB frames, already at the canvas scale.
        min_confidence: pixels whose winning share of the class scores is lower are void
            (``IGNORE_INDEX``): in no target mask, so background for every mask in the criterion,
            as CamVid's void pixels and Mask2Former's semantic targets
            (:func:`~mpvss_ros.training.criterion.semantic_to_targets`).
    """
    backend = _inference_view(model)
    seg = VideoSegmenter(backend, QueryFlowPropagator(backend), FixedIntervalScheduler(1))
    out = []
    for i, f in enumerate(frames):
        r = seg.push(f, i / 25.0)
        lab = r.labels.astype(np.uint8).copy()
        lab[r.confidence < round(255 * min_confidence)] = IGNORE_INDEX
        out.append(lab)
    return out


def _quick_val(model: MPVSS, frames: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    backend = _inference_view(model)
    seg = VideoSegmenter(backend, QueryFlowPropagator(backend), FixedIntervalScheduler(5))
    cm = ConfusionMatrix(model.num_classes)
    for i, (f, g) in enumerate(frames):
        cm.update(seg.push(f, i / 15.0).labels, g)
    return {"mIoU_interval5": 100 * cm.miou()}


def _flow_l1(motion_out: Any, sel: torch.Tensor, target: torch.Tensor, normalization: str = "exact",
             mask_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """The flow term of one link: mean L1 of the pixel-wise flow and of every query's flow against
    the (B, 2, h, w) ``target`` on the samples ``sel`` (B bools), in flow-grid pixels.

    The targets (DIS, the synthetic pairs' exact flow) are ``exact`` flows; under the ``mmtrack``
    warp (``input.warp_normalization``, the official models') the model's flows are first turned
    into the ``exact`` flows that sample the same mask pixels
    (:func:`~mpvss_ros.nn.warp.mmtrack_to_exact`, on the (h, w) mask grid ``mask_hw`` they warp),
    so the term pulls where the mask loss does. The model's flow grid covers the crop padded to a
    multiple of 32, the target's only the crop (``ceil(crop / flow_stride)`` cells): the term
    compares the cells both cover, the crop's (a crop of 40 pixels has a 5-cell target and an
    8-cell model grid at stride 8)."""
    flows, pixel_flow = motion_out.flows, motion_out.pixel_flow
    if normalization == "mmtrack":
        if mask_hw is None:
            raise ValueError("_flow_l1 needs mask_hw for mmtrack flows")
        flows, pixel_flow = mmtrack_to_exact(flows, mask_hw), mmtrack_to_exact(pixel_flow, mask_hw)
    gh = min(flows.shape[-2], target.shape[-2])
    gw = min(flows.shape[-1], target.shape[-1])
    flows = flows[sel][..., :gh, :gw]
    pixel_flow = pixel_flow[sel][..., :gh, :gw]
    tgt = target[sel][..., :gh, :gw]
    return (pixel_flow - tgt).abs().mean() + (flows - tgt[:, None]).abs().mean()


def _chained_flows(model: MPVSS, samples: list[Any], key: torch.Tensor, query_init: torch.Tensor,
                   crop: tuple[int, int], pad: Any, mask_hw: tuple[int, int]
                   ) -> tuple[torch.Tensor, list[tuple[Any, torch.Tensor, torch.Tensor]]]:
    """Flows key <- current through each sample's chain of one-frame links (``chain_training``);
    a batch without ``links`` is one link, the direct flow current -> key of every pair.

    ``key`` is the batch's padded (B, 3, Hp, Wp) key frames, as the segmentor saw them, on the
    training device (``pad`` moves the other frames there; the flow targets follow). Link j
    estimates the flow from frame j + 1 to frame j of every sample (frame 0 = key frame, frame d =
    current frame, d = ``frames_apart``) and composes it onto the flow so far as
    :class:`~mpvss_ros.propagation.FlowChain` does at inference. A sample with fewer links than
    the batch's longest keeps its composed flow after its last link (the extra links see its
    current frame twice and are masked out of the result and of the flow term). ``mask_hw`` is
    the (h, w) of the mask logits the flows warp (``mmtrack`` composition needs it).

    Returns:
        flows (B, N, 2, h, w) current -> key, and per link ``(motion output, B bools: which
        samples have a flow target for it, (B, 2, h, w) targets)``.
    """
    d = [s.frames_apart for s in samples]

    def frame(s: Any, di: int, j: int) -> torch.Tensor:  # frame j >= 1 of a sample d = di frames apart
        return s.links[j - 1] if j < di else s.current

    seq = [key] + [pad(torch.stack([frame(s, di, j) for s, di in zip(samples, d)]), 0.0) for j in range(1, max(d) + 1)]
    flows: torch.Tensor | None = None
    links = []
    for j in range(max(d)):
        motion_out = model.motion(seq[j + 1], seq[j], query_init, image_size=crop)
        active = torch.tensor([j < di for di in d], device=key.device)
        flows = motion_out.flows if flows is None else torch.where(
            active.view(-1, 1, 1, 1, 1), compose_flows(flows, motion_out.flows, model.cfg.input.warp_normalization,
                                                       mask_hw), flows)
        # link j's flow target: a chained video pair's DIS target of that link; at j = 0 a one-link
        # pair's own target (DIS for video pairs, the exact flow for synthetic ones); none for CamVid
        sel = [j < di if s.link_flows is not None else (j == 0 and s.has_flow) for s, di in zip(samples, d)]
        targets = [s.link_flows[j] if s.link_flows is not None and j < di else s.flow for s, di in zip(samples, d)]
        links.append((motion_out, torch.tensor(sel, device=key.device), torch.stack(targets).to(key.device)))
    assert flows is not None
    return flows, links


def train_motion(options: MotionTrainOptions | None = None, **kwargs: Any) -> MotionTrainResult:
    """Stage-2 training (see the module docstring). Writes ``checkpoint_last.pt`` and, at the end
    of the schedule, ``model_final.pt`` in this project's checkpoint format.

    The options (:meth:`MotionTrainOptions.validate`) and the run folder
    (:func:`~mpvss_ros.training.trainer.check_run_dir`) are checked before any work: nothing is
    created or loaded when they are refused. With ``resume``, options that differ from the run's
    saved ones (``data_root`` and ``videos`` included) are named in one warning, as stage 1 does.

    Raises:
        ValueError: a bad option; without ``resume``, a run folder that holds an earlier run; with
            ``resume``, a damaged trainer state or checkpoint and state of different steps; a
            stage-1 checkpoint without a stored model config and no ``model`` (``--model``); labelled
            frames without two consecutive ones of a sequence (``<sequence>_<frame number>``) when
            the draws need them; a training label not single-channel or of another size than its
            image.
        FileNotFoundError: missing CamVid data, ``data_root`` folders (``val/`` without
            ``valannot/``) or ``videos``; an unreadable training frame (all are decoded before the
            pseudo-labelling); with ``resume``, a missing run folder, checkpoint or trainer state.
        CheckpointError: a missing or damaged stage-1 checkpoint, or one that does not match the
            model.
    """
    opts = options or MotionTrainOptions(**kwargs)
    if options is not None and kwargs:
        opts = dataclasses.replace(options, **kwargs)
    opts.validate()
    opts = dataclasses.replace(opts, crop=(int(opts.crop[0]), int(opts.crop[1])))
    check_run_dir(opts.run_dir, opts.resume, "query_flow")  # before the pseudo-labelling, which takes minutes
    with torch_threads(opts.threads):
        return _train(opts)


def _training_data(opts: MotionTrainOptions,
                   num_classes: int) -> tuple[LabelledFrames, Path | None, Path | None, list[Path]]:
    """``(labelled train frames, val images or None, val labels or None, unlabelled clips)`` of a
    stage-2 run, checked before any work (see ``data_root`` and ``videos``): the train frames are
    listed and paired (not yet decoded), and refused when the draws need a pair they lack."""
    if opts.data_root is None:  # the shared data, as the shipped model was trained
        train_dir, train_annot = camvid_dir("train"), camvid_annot_dir("train")
        if train_dir is None or train_annot is None:
            raise FileNotFoundError("CamVid train data not found: set MPVSS_SHARED_DATA to the shared data folder "
                                    "(it holds camvid/train and camvid/trainannot), or give --data-root")
        val_dir, val_annot = camvid_dir("val"), camvid_annot_dir("val")
    else:
        root = camvid_root(opts.data_root)
        for sub in ("train", "trainannot"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"--data-root {root} has no {sub}/ folder (CamVid's layout: train/ "
                                        f"trainannot/, optionally val/ valannot/)")
        train_dir, train_annot = root / "train", root / "trainannot"
        has_val = (root / "val").is_dir()
        if has_val and not (root / "valannot").is_dir():
            raise FileNotFoundError(f"--data-root {root} has val/ but no valannot/ folder (the labels of the "
                                    f"quick validation; stage 1 needs them too)")
        val_dir, val_annot = (root / "val", root / "valannot") if has_val else (None, None)
    if opts.videos is None:
        clips = [p for p in (dashcam_clip(), bikes_clip()) if p is not None]
    else:
        clips = []
        for video in opts.videos:
            path = bikes_clip() if video == "sample:bikes" else Path(video).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"--videos: {video} not found")
            clips.append(path)
    labelled = LabelledFrames(train_dir, train_annot, num_classes=num_classes)
    # a draw that is neither synthetic nor a video pair takes a pair of labelled frames: without
    # one the run failed at its first such draw ("high <= 0"), after the pseudo-labelling
    check_camvid_pairs(labelled, opts.synthetic_fraction, opts.video_fraction, video_pairs=bool(clips))
    return labelled, val_dir, val_annot, clips


#: Options whose change on ``--resume`` makes the run no straight continuation (warned about).
_RESUME_CHECKED = ("steps", "batch_size", "crop", "lr", "head_lr_mult", "weight_decay", "warmup_steps", "poly_power",
                   "clip_grad_norm", "flow_weight", "video_fraction", "synthetic_fraction", "synthetic_travel",
                   "max_gap", "chain_training", "pseudo_label_confidence", "num_points", "seed", "max_clip_frames",
                   "model", "init_checkpoint", "init_motion", "data_root", "videos")


def _train(opts: MotionTrainOptions) -> MotionTrainResult:
    synthetic_motion = SyntheticMotion(travel_probability=opts.synthetic_travel)  # checks the range first
    run_dir = Path(opts.run_dir)
    init = read_checkpoint(opts.init_checkpoint)  # read once: configuration and weights
    cfg, cfg_source = checkpoint_model_config(opts.model, init, opts.init_checkpoint)
    if cfg_source == "default":  # mpvss_lite would be a guess: a stage-1 file of ours stores its config
        raise ValueError(f"--init-checkpoint {opts.init_checkpoint} stores no model config: give --model NAME "
                         f"(a model name under config/models or a YAML file) for the model its weights fit")
    check_default_data_classes(cfg.num_classes, cfg.name, opts.data_root)
    labelled, val_dir, val_annot, clip_paths = _training_data(opts, cfg.num_classes)  # before the model loads
    device = select_device(opts.device)
    torch.manual_seed(opts.seed)
    model = MPVSS(cfg)
    check_crop_on_flow_grid(opts.crop, model.motion.flow_stride)  # before minutes of pseudo-labelling
    load_init_checkpoint(model, init, opts.init_checkpoint)
    init_meta = init.meta
    del init  # the file's tensors, a second copy of the model for the whole run otherwise
    if opts.init_motion:
        motion_state = {k[len(MOTION_PREFIX):]: v for k, v in read_state_dict(opts.init_motion).items()
                        if k.startswith(MOTION_PREFIX) and k not in IGNORED_KEYS}  # flow_img_norm_*: buffers
        if not motion_state:
            raise ValueError(f"{opts.init_motion} holds no motion.* weights")
        model.motion.load_state_dict(motion_state, strict=True)  # lists missing/unexpected keys
        log.info("motion module initialised from %s", opts.init_motion)
    model.eval().to(device)
    trained_on = device_description(device)
    log.info("training on %s", trained_on)
    # The backbone stays frozen in stage 2: run it channels-last on CPU, as inference there does
    # (forward_segmentor on 8 crops of 256 x 320, 2 threads, grad mode: 383 -> 291 ms; 30-step
    # chain-training runs: 1.53 -> 1.49 s/step median, the same losses to the digit). The motion
    # module, which trains, keeps the NCHW layout its recipe was measured with.
    if device.type == "cpu":
        to_channels_last(model, ("backbone",))

    labelled.decode_all()  # kept for the draws; a corrupt frame fails now (about 2 s), not when first drawn
    # a model without a canvas (frames at their own size) takes the videos at CamVid's 360 x 480
    canvas = cfg.input if cfg.input.size else dataclasses.replace(cfg.input, size=[360, 480])
    clips = []
    for path in clip_paths:
        frames = load_clip_on_canvas(path, canvas, limit=opts.max_clip_frames)
        clips.append((frames, pseudo_labels(model, frames, opts.pseudo_label_confidence)))
        log.info("pseudo-labelled %d frames of %s", len(frames), path.name)
    pairs = FramePairs(labelled, clips, crop=opts.crop, flow_stride=model.motion.flow_stride, max_gap=opts.max_gap,
                       video_fraction=opts.video_fraction, seed=opts.seed, synthetic_fraction=opts.synthetic_fraction,
                       synthetic_motion=synthetic_motion, chain=opts.chain_training)
    log.info("%d CamVid pairs, %d video pairs, synthetic fraction %.2f (camera travel in %.2f of them)",
             len(pairs.camvid), len(pairs.video), opts.synthetic_fraction, opts.synthetic_travel)

    val_frames: list[tuple[np.ndarray, np.ndarray]] = []  # (image, label) of the quick validation
    if val_dir is not None and opts.val_every >= 0 and opts.val_frames > 0:
        val_frames = decode_frames(list_frames(val_dir, val_annot)[: opts.val_frames], num_classes=cfg.num_classes)

    # Trainable: the motion module and the class/mask embedding heads (official MODEL.FINETUNE).
    for p in model.parameters():
        p.requires_grad_(False)
    predictor = model.sem_seg_head.predictor
    motion_params = list(model.motion.parameters())
    head_params = list(predictor.class_embed.parameters()) + list(predictor.mask_embed.parameters())
    if opts.head_lr_mult == 0:  # heads frozen: the model ships with the segmentor's own heads
        head_params = []
    for p in motion_params + head_params:
        p.requires_grad_(True)

    skip_decay = no_decay_parameters(model)  # norms and embeddings, as stage 1

    def groups(params: list[torch.Tensor], lr: float, name: str) -> list[dict[str, Any]]:
        decay = [p for p in params if id(p) not in skip_decay]
        no_decay = [p for p in params if id(p) in skip_decay]
        return [{"params": decay, "lr": lr, "weight_decay": opts.weight_decay, "name": f"{name}_decay"},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}_no_decay"}]

    param_groups = groups(motion_params, opts.lr, "motion")
    if head_params:
        param_groups += groups(head_params, opts.lr * opts.head_lr_mult, "heads")
    optimizer = torch.optim.AdamW(param_groups, lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, opts.steps, opts.warmup_steps, 0.01, opts.poly_power))
    criterion = SetCriterion(cfg.num_classes, HungarianMatcher(2.0, 5.0, 5.0, num_points=opts.num_points),
                             num_points=opts.num_points)
    trainable = motion_params + head_params

    model_path, state_path = run_dir / MODEL_FILE, run_dir / STATE_FILE
    start = 0
    options = options_dict(opts)
    if opts.resume:
        start, state, _ = resume_run(run_dir, model, optimizer, scheduler, device)
        if state.get("options"):  # runs saved before the state kept them: nothing to compare
            warn_option_changes(state["options"], options, _RESUME_CHECKED)
    else:
        torch.manual_seed(opts.seed + 1)

    result = MotionTrainResult(run_dir, start, False, model_path)
    make_output_dir(run_dir, "--run-dir")  # only now: a run that fails to start leaves no folder
    write_json_atomic(run_dir / "options.json", options)
    hp = int(math.ceil(opts.crop[0] / 32) * 32)
    wp = int(math.ceil(opts.crop[1] / 32) * 32)
    last_val: dict[str, Any] | None = None

    labelled_source = ("CamVid train" if opts.data_root is None
                       else f"--data-root {labelled.image_dir.parent.resolve().name}")
    data = (labelled_source + " pairs + "
            + (f"pseudo-labelled pairs of {', '.join(p.name for p in clip_paths)}" if clip_paths else "no video pairs"))

    def meta(step: int) -> dict[str, Any]:
        return {"stage": "query_flow", "motion_trained": True, "step": step, "steps": opts.steps,
                "init": str(opts.init_checkpoint), "init_meta": init_meta, "data": data,
                "seed": opts.seed, "val": last_val, "device": trained_on}

    def save(step: int) -> None:
        save_run_checkpoint(model_path, state_path, model, cfg.to_dict(), meta(step),
                            {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             **rng_state(device), "options": options})

    def pad(x: torch.Tensor, value: float) -> torch.Tensor:  # a batch on the training device, padded
        return torch.nn.functional.pad(x.to(device), (0, wp - x.shape[-1], 0, hp - x.shape[-2]), value=value)

    t_start = time.perf_counter()
    times: list[float] = []
    step = start
    bar = tqdm(total=opts.steps, initial=start, disable=not opts.progress, desc="stage-2", dynamic_ncols=True)
    with open(run_dir / LOG_FILE, "a") as logf, InterruptAfterStep() as interrupt:
        while step < opts.steps:
            t0 = time.perf_counter()
            samples = [pairs.sample(step, i) for i in range(opts.batch_size)]
            key = pad(torch.stack([s.key for s in samples]), 0.0)
            labels = pad(torch.stack([s.label for s in samples]), IGNORE_INDEX)
            targets = semantic_batch_to_targets(labels, cfg.num_classes, IGNORE_INDEX)

            out = model.forward_segmentor(key, valid_hw=opts.crop)  # grads reach only the heads
            # one link per pair (the direct flow) unless chain_training gave video pairs several
            flows, links = _chained_flows(model, samples, key, out.query_embeddings.detach().transpose(0, 1),
                                          opts.crop, pad, tuple(out.mask_logits.shape[-2:]))
            warp = lambda m: warp_mask_logits(m, flows, cfg.input.warp_normalization)  # noqa: E731
            warped = DecoderOutput(out.class_logits, warp(out.mask_logits), out.query_embeddings,
                                   out.aux_class_logits, [warp(m) for m in out.aux_mask_logits])
            losses = criterion(warped, targets)
            loss = losses["loss"]
            flow_loss = torch.zeros((), device=device)
            if opts.flow_weight > 0:
                terms = [_flow_l1(*link, cfg.input.warp_normalization, tuple(out.mask_logits.shape[-2:]))
                         for link in links if bool(link[1].any())]
                if terms:
                    flow_loss = torch.stack(terms).mean()
                    loss = loss + opts.flow_weight * flow_loss
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"non-finite loss at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the norm before clipping; with clipping off the same norm, not NaN (log.jsonl is JSON)
            gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, opts.clip_grad_norm if opts.clip_grad_norm > 0
                                                         else float("inf")))
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler steps next)
            optimizer.step()
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            times.append(dt)
            rec = {"step": step, "loss": float(loss.detach()), "loss_mask_criterion": float(losses["loss"].detach()),
                   "loss_flow": float(flow_loss.detach()), "loss_ce": float(losses["loss_ce"].detach()),
                   "loss_dice": float(losses["loss_dice"].detach()), "grad_norm": gnorm,
                   "lr": lr, "video_pairs": sum(s.source == "video" for s in samples),
                   "synthetic_pairs": sum(s.source == "synthetic" for s in samples), "links": len(links),
                   "sec_per_step": round(dt, 4)}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            result.losses.append(rec["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", flow=f"{rec['loss_flow']:.3f}")
            timed_out = opts.max_minutes is not None and time.perf_counter() - t_start > 60 * opts.max_minutes
            at_end = step >= opts.steps or timed_out
            if val_frames and ((opts.val_every > 0 and step % opts.val_every == 0) or at_end):
                model.eval()
                last_val = {"val": True, "step": step, **_quick_val(model, val_frames)}
                logf.write(json.dumps(last_val) + "\n")
                result.val.append(last_val)
                log.info("step %d: quick val query_flow@5 mIoU %.2f", step, last_val["mIoU_interval5"])
            if at_end or interrupt.requested or (opts.checkpoint_every > 0 and step % opts.checkpoint_every == 0):
                save(step)
            if interrupt.requested:
                bar.close()
                log.warning("interrupted: checkpoint at step %d (resume with --resume)", step)
                raise KeyboardInterrupt
            if timed_out:
                log.info("max_minutes reached at step %d", step)
                break
    bar.close()
    result.step = step
    result.sec_per_step_median = float(np.median(times)) if times else float("nan")
    if step >= opts.steps:
        result.finished = True
        result.checkpoint = save_final_checkpoint(run_dir, model, cfg.to_dict(), meta(step), step - start)
    return result
