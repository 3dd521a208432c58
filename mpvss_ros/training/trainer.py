"""Stage-1 training: the key-frame segmentor (Mask2Former part of MPVSS) on CamVid.

Only the segmentor trains here (``backbone.*`` and ``sem_seg_head.*``); the motion module is
frozen and left out of the optimiser (it is trained in stage 2 on frame pairs). The recipe
follows Mask2Former / MPVSS (spec ``docs/mpvss_architecture.md`` sections 3.4-3.5) scaled
down for a CPU:

* loss: :class:`~mpvss_ros.training.criterion.SetCriterion` (CE 2, mask BCE 5, dice 5,
  no-object 0.1, 12544 importance-sampled points, deep supervision on all decoder outputs)
  with the Hungarian matcher (``matcher="hungarian"``, the paper's) or the fixed
  query-per-class matcher (``"fixed"``);
* AdamW, weight decay 0.05 except norms (BatchNorm, GroupNorm, LayerNorm) and ``nn.Embedding``
  (0, detectron2's defaults), backbone learning rate = ``lr * backbone_lr_mult``;
* learning-rate factor: linear warm-up from ``warmup_factor`` to 1 over ``warmup_steps``, times
  the poly decay ``(1 - step / steps) ** poly_power`` (detectron2 ``WarmupPolyLR``), updated
  every step;
* gradient clipping of the whole model's L2 norm to ``clip_grad_norm`` (spec: 0.01);
* backbone BatchNorm statistics frozen at their ImageNet values by default (``freeze_bn``):
  small CPU batches give poor batch statistics; the BN affine parameters still train.

Defaults chosen for a few CPU hours (see :class:`TrainOptions`): the head learning rate 2e-4
is twice Mask2Former's 1e-4 because runs are short (thousands, not 90k, steps); the backbone
keeps Mask2Former's 0.1 multiplier so the ImageNet features are adapted gently.

Device: ``device="auto"`` trains on the first CUDA GPU when torch sees one, else on the CPU
(:func:`~mpvss_ros.model_loader.select_device`); batches move to it, checkpoints are written from
CPU copies and record it (``meta["device"]``), and the trainer state keeps the CUDA generator too
(:func:`rng_state`), so a resumed GPU run continues the same random points (CUDA kernels
themselves are not bitwise deterministic; on the CPU the continuation is exact).

Data: :class:`~mpvss_ros.training.data.CamVidFrames` on ``<data_root>/train`` (never val).
Batches are a pure function of (seed, step): epoch e uses the permutation
``default_rng([seed, 1, e])`` of the frames and the per-sample augmentation generators of
:class:`CamVidFrames`; with the torch RNG state (random points of the matcher and the loss)
stored in the trainer state, ``resume=True`` continues exactly where a run stopped.

Run directory: a folder that already holds a run (checkpoint, trainer state, final model or a
non-empty log) is refused unless ``resume`` is asked for, and ``resume`` needs the checkpoint and
the trainer state, readable and at one step; both are checked before any expensive work
(:func:`check_run_dir`, shared with stage 2). Contents:

* ``options.json``: the options of the (last) run; ``model_config.json``;
* ``log.jsonl``: one JSON object per training step (``step``, ``loss``, final-layer
  ``loss_ce``/``loss_mask``/``loss_dice``, ``loss_ce_all``/``loss_mask_all``/``loss_dice_all``
  summed over all predictions (unweighted), ``grad_norm`` (before clipping), ``lr``,
  ``lr_backbone``, ``sec_per_step``, ``epoch``) and one per validation (``"val": true``,
  ``step``, ``mIoU``, ``pACC`` in percent, ``frames``, ``sec``);
  On resume, records after the resumed step (from an interrupted stretch) are dropped.
* ``checkpoint_last.pt``: the model (:func:`mpvss_ros.checkpoints.save_checkpoint`, meta has
  ``step``), written every ``checkpoint_every`` steps and at the end;
* ``trainer_state.pt``: ``{"step", "optimizer", "scheduler", "torch_rng", "options"}``
  (readable with ``torch.load(weights_only=True)``), written together with it;
* ``model_final.pt``: the model after the last step of the schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..checkpoints import (CheckpointError, first_line, load_checkpoint, load_init_checkpoint, motion_module_trained,
                           read_checkpoint, save_checkpoint, torch_load_checked)
from ..config import ModelConfig, load_model_config
from ..evaluation.metrics import IGNORE_INDEX, ConfusionMatrix
from ..io.samples import check_default_data_classes, shared_data_dir
from ..model_loader import select_device
from ..nn.backbones import MobileNetV2, load_imagenet_weights
from ..nn.mpvss import MPVSS, semantic_scores
from ..paths import check_output_dir, make_output_dir, write_atomic, write_json_atomic
from ..values import is_finite, is_real, shown
from .criterion import SetCriterion, semantic_batch_to_targets
from .data import CamVidFrames, decode_frames
from .matcher import FixedMatcher, HungarianMatcher
from .options import (check_at_least, check_crop, check_integers, check_numbers,
                      check_optional_positive)

__all__ = [
    "TrainOptions",
    "TrainResult",
    "train_segmentor",
    "build_param_groups",
    "lr_factor",
    "segment_frame",
    "evaluate_frames",
    "add_train_arguments",
    "options_from_args",
    "default_imagenet_weights",
    "device_description",
    "rng_state",
    "restore_rng_state",
    "IGNORE_INDEX",
]

log = logging.getLogger(__name__)

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
MODEL_FILE = "checkpoint_last.pt"
STATE_FILE = "trainer_state.pt"
FINAL_FILE = "model_final.pt"
LOG_FILE = "log.jsonl"


def default_imagenet_weights() -> Path | None:
    """``<shared data>/weights/mobilenetv2_imagenet_features.pt``, or None without shared data."""
    root = shared_data_dir()
    return None if root is None else root / "weights" / "mobilenetv2_imagenet_features.pt"


@dataclass
class TrainOptions:
    """Everything that defines a stage-1 run (CLI flags in brackets; see :func:`add_train_arguments`).

    Attributes:
        run_dir: output folder [--run-dir] (created; one that holds an earlier run only with ``resume``).
        model: model name under ``config/models`` or a YAML file [--model].
        steps: length of the schedule in optimiser steps [--steps].
        batch_size: images per step [--batch-size].
        crop: (H, W) training crop in pixels [--crop H W]; padded internally to a multiple of 32
            (void labels, zero image after normalisation).
        scale: random scale range [--scale MIN MAX].
        flip, color_jitter: augmentations [--no-flip, --no-color-jitter].
        lr: AdamW learning rate of the heads [--lr].
        backbone_lr_mult: backbone lr = lr * this [--backbone-lr-mult].
        weight_decay: AdamW decay, 0 for norms and embeddings [--weight-decay].
        warmup_steps, warmup_factor: linear warm-up length and start factor [--warmup-steps,
            --warmup-factor].
        poly_power: poly decay exponent [--poly-power].
        clip_grad_norm: max L2 norm of all gradients; <= 0 disables [--clip-grad-norm].
        matcher: ``hungarian`` or ``fixed`` [--matcher].
        num_points: points per mask in the matcher and the loss [--num-points].
        no_object_weight: CE weight of the no-object class [--no-object-weight].
        imagenet_weights: MobileNetV2 ImageNet file; None = :func:`default_imagenet_weights`;
            ``"none"`` = random backbone [--imagenet-weights].
        init_checkpoint: a checkpoint of the model to start from instead, with or without a motion
            module (a per-frame Mask2Former file) [--init-checkpoint].
        data_root: CamVid root with ``train/ trainannot/ val/ valannot/``; None = shared data
            [--data-root].
        train_files: optional subset of training file names (debugging) [--train-files].
        freeze_bn: keep backbone BatchNorm statistics fixed [--no-freeze-bn].
        checkpoint_every: steps between checkpoints (0 = only at the end) [--checkpoint-every].
        val_every: steps between quick validations (0 = only at the end; -1 = never)
            [--val-every].
        val_frames: evenly spaced val frames for the quick validation [--val-frames].
        threads: ``torch.set_num_threads`` during the call, restored afterwards (0 = leave as
            is) [--threads]. On a CPU shared with other busy processes 1 thread can be faster
            than 2 (OpenMP threads spin against each other).
        seed: seeds initialisation, data order, augmentation and point sampling [--seed].
        resume: continue from ``run_dir``'s checkpoint and trainer state [--resume].
        stop_at: stop (with a checkpoint) after this global step although the schedule spans
            ``steps`` (time-sliced training; None = run to the end) [--stop-at].
        max_minutes: stop (with a checkpoint) after this wall time (None = no limit)
            [--max-minutes].
        progress: show a tqdm bar [--no-progress].
        device: ``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu`` or ``cuda[:N]``
            [--device] (:func:`~mpvss_ros.model_loader.select_device`).
    """

    run_dir: str
    model: str = "mpvss_lite"
    steps: int = 4000
    batch_size: int = 8
    crop: tuple[int, int] = (256, 320)
    scale: tuple[float, float] = (0.75, 1.5)
    flip: bool = True
    color_jitter: bool = True
    lr: float = 2e-4
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.05
    warmup_steps: int = 100
    warmup_factor: float = 0.01
    poly_power: float = 0.9
    clip_grad_norm: float = 0.01
    matcher: str = "hungarian"
    num_points: int = 12544
    no_object_weight: float = 0.1
    imagenet_weights: str | None = None
    init_checkpoint: str | None = None
    data_root: str | None = None
    train_files: list[str] | None = None
    freeze_bn: bool = True
    checkpoint_every: int = 250
    val_every: int = 500
    val_frames: int = 10
    threads: int = 2
    seed: int = 0
    resume: bool = False
    stop_at: int | None = None
    max_minutes: float | None = None
    progress: bool = True
    device: str = "auto"

    def validate(self) -> None:
        """Check every setting's type and range (:func:`train_segmentor` calls it before any work).

        Ranges: ``steps``, ``batch_size``, ``num_points`` >= 1; both ``crop`` sides >= 32 pixels;
        ``scale`` (low, high) with 0 < low <= high; ``lr`` > 0; ``backbone_lr_mult``,
        ``weight_decay``, ``poly_power``, ``no_object_weight``, ``warmup_steps``,
        ``checkpoint_every``, ``val_frames``, ``threads``, ``seed`` >= 0 (numpy's generators,
        which order the data, take no negative seed); ``val_every`` >= -1; ``warmup_factor`` in
        (0, 1]; ``clip_grad_norm`` finite; ``matcher`` ``hungarian`` or ``fixed``; ``stop_at``
        None or in 1..``steps``; ``max_minutes`` None or > 0.

        Raises:
            ValueError: naming the first bad setting, its range and the value given.
        """
        check_integers(self, ("steps", "batch_size", "warmup_steps", "num_points", "checkpoint_every", "val_every",
                              "val_frames", "threads", "seed"))
        check_numbers(self, ("lr", "backbone_lr_mult", "weight_decay", "warmup_factor", "poly_power",
                             "clip_grad_norm", "no_object_weight"))
        check_crop(self.crop, 32)
        scale = tuple(self.scale) if isinstance(self.scale, (tuple, list)) else (self.scale,)
        if (len(scale) != 2 or not all(is_real(v) and is_finite(v) for v in scale)
                or not 0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, both finite, got {shown(self.scale)}")
        if self.matcher not in ("hungarian", "fixed"):
            raise ValueError(f"matcher must be 'hungarian' or 'fixed', got {shown(self.matcher)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        check_at_least(self, {"steps": 1, "batch_size": 1, "num_points": 1, "warmup_steps": 0,
                              "checkpoint_every": 0, "val_every": -1, "val_frames": 0, "threads": 0, "seed": 0,
                              "backbone_lr_mult": 0, "weight_decay": 0, "poly_power": 0})
        # > 0: with 0, a crop whose pixels are all void weighs every class term 0 and the loss is 0/0
        check_optional_positive(self, "no_object_weight")
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"warmup_factor must be in (0, 1], got {self.warmup_factor!r}")
        check_optional_positive(self, "stop_at", integer=True, low=1)
        if self.stop_at is not None and self.stop_at > self.steps:
            raise ValueError(f"stop_at must be in 1..steps ({self.steps}), got {self.stop_at}")
        check_optional_positive(self, "max_minutes", note=" (leave it out for no limit)")


@dataclass
class TrainResult:
    """What :func:`train_segmentor` did.

    Attributes:
        run_dir: the run folder.
        step: global steps completed (== ``steps`` when the schedule finished).
        finished: True when the whole schedule ran (``model_final.pt`` written).
        checkpoint: path of the latest model file (``model_final.pt`` or ``checkpoint_last.pt``).
        losses: total loss of every step run in this call.
        sec_per_step: mean wall seconds per step in this call (data + forward + backward + step).
        sec_per_step_median: the median (robust to stalls from other processes on shared CPUs).
        val: the validation records of this call (``{"step", "mIoU", "pACC", "frames", "sec"}``).
    """

    run_dir: Path
    step: int
    finished: bool
    checkpoint: Path
    losses: list[float] = field(default_factory=list)
    sec_per_step: float = float("nan")
    sec_per_step_median: float = float("nan")
    val: list[dict[str, Any]] = field(default_factory=list)


def lr_factor(step: int, steps: int, warmup_steps: int, warmup_factor: float, power: float) -> float:
    """Learning-rate multiplier before optimiser step ``step`` (0-based).

    ``warmup(step) * (1 - step / steps) ** power`` with ``warmup = warmup_factor * (1 - a) + a``,
    ``a = step / warmup_steps`` while ``step < warmup_steps`` and 1 afterwards (detectron2
    ``WarmupPolyLR`` with linear warm-up).
    """
    if step < warmup_steps:
        a = step / warmup_steps
        warm = warmup_factor * (1.0 - a) + a
    else:
        warm = 1.0
    return warm * max(0.0, 1.0 - step / steps) ** power


def no_decay_parameters(model: nn.Module) -> set[int]:
    """``id()`` of the parameters that take no weight decay (detectron2 / Mask2Former, spec
    section 3.5): every parameter of a norm layer (BatchNorm, GroupNorm, LayerNorm,
    InstanceNorm) and of ``nn.Embedding`` modules, and Swin's relative-position bias tables
    (Mask2Former's ``build_optimizer`` sets their decay to 0, as its absolute position
    embedding's, which no model here has); biases of other layers do decay."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES + (nn.Embedding,)):
            ids.update(id(p) for p in module.parameters(recurse=False))
    ids.update(id(p) for name, p in model.named_parameters() if name.endswith("relative_position_bias_table"))
    return ids


def build_param_groups(model: MPVSS, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the segmentor (motion module excluded).

    Groups: backbone / head x decay / no decay (:func:`no_decay_parameters`). Only
    parameters with ``requires_grad`` are included; each appears once.

    Returns:
        list of ``{"params", "lr", "weight_decay", "name"}`` dicts (empty groups dropped).
    """
    no_decay = no_decay_parameters(model)
    groups: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for prefix, sub, mult in (("backbone", model.backbone, backbone_lr_mult), ("head", model.sem_seg_head, 1.0)):
        for p in sub.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            nd = id(p) in no_decay
            key = f"{prefix}_{'no_decay' if nd else 'decay'}"
            g = groups.setdefault(key, {"params": [], "lr": lr * mult, "weight_decay": 0.0 if nd else weight_decay,
                                        "name": key})
            g["params"].append(p)
    order = ["backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"]
    return [groups[k] for k in order if k in groups]


def _pad_to(x: Tensor, hw: tuple[int, int], value: float) -> Tensor:
    """Pad the last two dims of ``x`` at the bottom/right to ``hw``."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(hw):
        return x
    return F.pad(x, (0, hw[1] - w, 0, hw[0] - h), value=value)


def _padded_hw(hw: Sequence[int], div: int) -> tuple[int, int]:
    return (int(math.ceil(hw[0] / div) * div), int(math.ceil(hw[1] / div) * div))


@torch.no_grad()
def segment_frame(model: MPVSS, image: Tensor) -> Tensor:
    """Per-frame semantic segmentation at the frame's own resolution (spec §1.6 order).

    The frame is zero-padded (after normalisation) to a multiple of the model's size
    divisibility, the segmentor runs, the final mask logits are upsampled bilinearly
    (align_corners=False) to the padded canvas, turned into class scores with
    :func:`semantic_scores`, cropped to the frame and arg-maxed.

    Args:
        model: the MPVSS model (put it in eval mode first).
        image: (3, H, W) float32 RGB in 0..255 (any device: moved to the model's).

    Returns:
        (H, W) int64 labels in ``0..K-1``, on the model's device.
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    hp, wp = _padded_hw((h, w), model.cfg.input.size_divisibility)
    x = _pad_to(image[None].float().to(next(model.parameters()).device), (hp, wp), 0.0)
    out = model.forward_segmentor(x, valid_hw=(h, w), aux=False)
    masks = F.interpolate(out.mask_logits, size=(hp, wp), mode="bilinear", align_corners=False)
    scores = semantic_scores(out.class_logits, masks)[0, :, :h, :w]
    return scores.argmax(0)


def evaluate_frames(model: MPVSS, dataset: CamVidFrames, indices: Sequence[int]) -> ConfusionMatrix:
    """Confusion matrix of :func:`segment_frame` over ``dataset[i]`` for ``i in indices``.

    The model is put in eval mode for the call and its previous mode restored afterwards.
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(model.num_classes, ignore_index=IGNORE_INDEX)
    try:
        for i in indices:
            image, label = dataset[int(i)]
            cm.update(segment_frame(model, image), label)
    finally:
        model.train(was_training)
    return cm


def _set_bn_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def camvid_root(data_root: str | None) -> Path:
    """The folder of CamVid-layout training data (``train/ trainannot/ val/ valannot/``):
    ``data_root`` [--data-root], or ``camvid`` in the shared data folder when None.

    Raises:
        FileNotFoundError: the folder does not exist, or None and no shared data folder.
    """
    if data_root is not None:
        root = Path(data_root).expanduser()
    else:
        shared = shared_data_dir()
        if shared is None:
            raise FileNotFoundError("no CamVid data: give --data-root (a folder with train/ trainannot/ val/ "
                                    "valannot/) or set MPVSS_SHARED_DATA to the shared data folder")
        root = shared / "camvid"
    if not root.is_dir():
        raise FileNotFoundError(f"CamVid root not found: {root}")
    return root


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def options_dict(opts: Any) -> dict[str, Any]:
    """A stage's options dataclass as JSON values (tuples as lists, paths as strings): its
    ``options.json`` and the copy in the trainer state that ``--resume`` compares with."""
    return json.loads(json.dumps(dataclasses.asdict(opts), default=_json_default))


def _resumed_motion_trained(model_meta: dict[str, Any], options: dict[str, Any]) -> bool | None:
    """What a resumed stage-1 run records of its motion module (its files' ``meta``
    ``motion_trained``): as its model file says (True, False, or None = unknown), or, for a run
    started before stage 1 recorded it, as the ``init_checkpoint`` of its saved options says
    (:func:`~mpvss_ros.checkpoints.motion_module_trained`; no init checkpoint: ImageNet or random
    weights, False; a file no longer readable: None, unknown, with a warning)."""
    if "motion_trained" in model_meta:
        flag = model_meta["motion_trained"]
        return flag if isinstance(flag, bool) else None
    init = options.get("init_checkpoint")
    if not init:
        return False
    try:
        return motion_module_trained(read_checkpoint(init))
    except (CheckpointError, OSError) as exc:
        log.warning("cannot tell whether this run's motion module is trained (its init checkpoint %s: %s): "
                    "its files record it as unknown (loaded for query flow with a warning)", init, first_line(exc))
        return None


def _build_model(opts: TrainOptions, cfg: ModelConfig, initialise: bool = True) -> tuple[MPVSS, bool | None]:
    """The model stage 1 trains, and what its files will record of its motion module (``meta``
    ``motion_trained``): stage 1 never trains it, so it is trained only when initialised from a
    file with a trained one (True), False otherwise, None (unknown) from a stage-1 file written
    before stage 1 recorded it. ``model.motion_trained`` is False only for False. Resuming
    (``initialise`` False) takes both from the run's files instead."""
    torch.manual_seed(opts.seed)
    model = MPVSS(cfg)
    motion_trained: bool | None = False
    if not initialise:  # resuming: the weights come from the run's checkpoint
        pass
    elif opts.init_checkpoint:
        init = read_checkpoint(opts.init_checkpoint)
        load_init_checkpoint(model, init, opts.init_checkpoint)  # a per-frame Mask2Former file too, as in stage 2
        motion_trained = motion_module_trained(init)
        log.info("initialised from %s", opts.init_checkpoint)
    elif opts.imagenet_weights != "none":
        if isinstance(model.backbone, MobileNetV2):
            path = Path(opts.imagenet_weights) if opts.imagenet_weights else default_imagenet_weights()
            if path is None:
                raise FileNotFoundError("ImageNet MobileNetV2 weights: no shared data folder (set MPVSS_SHARED_DATA); "
                                        "give --imagenet-weights FILE (or 'none' to train the backbone from scratch)")
            load_imagenet_weights(model.backbone, path)
            log.info("backbone initialised from %s", path)
        elif opts.imagenet_weights:
            raise ValueError(f"imagenet_weights is for the MobileNetV2 backbone; model {cfg.name} uses "
                             f"{cfg.backbone.type} (use init_checkpoint)")
        else:
            log.warning("backbone %s starts from random initialisation (no ImageNet file for it)", cfg.backbone.type)
    for p in model.motion.parameters():
        p.requires_grad_(False)
    model.motion_trained = motion_trained is not False
    return model, motion_trained


_TRAINING_OPTIONS = ("model", "steps", "batch_size", "crop", "scale", "flip", "color_jitter", "lr", "backbone_lr_mult",
                     "weight_decay", "warmup_steps", "warmup_factor", "poly_power", "clip_grad_norm", "matcher",
                     "num_points", "no_object_weight", "seed", "train_files", "freeze_bn", "data_root")


def warn_option_changes(saved: dict[str, Any], now: dict[str, Any],
                        keys: tuple[str, ...] = _TRAINING_OPTIONS) -> None:
    """On ``--resume``: one warning listing the ``keys`` whose value differs from the run's saved
    options (both stages; stage 1's training options by default)."""
    changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if changed:
        log.warning("resuming with changed options (the run is no longer a straight continuation): %s",
                    "; ".join(changed))


def sync_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """After a resume, set each group's lr from the *current* schedule at ``step``.

    The optimizer state carries the lr of the run that saved it; when the schedule changed (for
    example ``steps`` was raised to continue a finished run) that value is stale (0 at the end of a
    poly schedule), so the first resumed step would not train.
    """
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)


def truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step`` (written after the checkpoint a run resumes from), and every
    line that is no record: cut off by a kill, not JSON, not an object, bytes that are not UTF-8,
    or a ``step`` that is no whole number (``[1]``, ``Infinity``). The log is rewritten as UTF-8,
    atomically (:func:`~mpvss_ros.paths.write_atomic`): a rewrite that fails (a full disk) keeps the
    log as it was.

    Raises:
        OSError: the log could not be rewritten."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                kept.append(line)
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError):  # nested past the limit
            continue
    write_atomic(path, "".join(x + "\n" for x in kept).encode("utf-8"))


def check_same_step(meta: dict[str, Any], state: dict[str, Any], model_path: Path, state_path: Path) -> None:
    """Refuse to resume from a model checkpoint and a trainer state of different steps (a run
    stopped between writing the two).

    Raises:
        ValueError: naming both files and their steps.
    """
    try:
        same = int(meta.get("step", -1)) == int(state["step"])
    except (TypeError, ValueError):
        same = False
    if "step" not in meta:
        raise ValueError(f"resume: {model_path} is not a training run's checkpoint (its metadata has no step); "
                         "was another model file copied into the run folder?")
    if not same:
        raise ValueError(f"resume: {model_path} is at step {meta.get('step')} but {state_path} at step "
                         f"{state['step']} (interrupted while saving?)")


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of an exception's first line (:func:`~mpvss_ros.checkpoints.first_line`)."""
    return first_line(exc).split(". ")[0]


#: Files that make a folder an earlier run's: training into it without ``resume`` would overwrite
#: them (or, for the log, mix two runs' records). An empty log (a run that failed before its
#: first step) holds nothing and does not count.
RUN_FILES = (MODEL_FILE, STATE_FILE, FINAL_FILE, LOG_FILE)
_STATE_KEYS = ("step", "optimizer", "scheduler", "torch_rng")


def check_run_dir(run_dir: str | Path, resume: bool, stage: str | None = None) -> None:
    """Up-front checks of a run folder (both training stages), before any expensive work; creates
    and changes nothing.

    Without ``resume`` the folder must not hold an earlier run (a :data:`RUN_FILES` file; an empty
    ``log.jsonl`` does not count): training would overwrite its checkpoints and mix two runs in
    its log. With ``resume`` the folder must hold a run to continue: :data:`MODEL_FILE` and
    :data:`STATE_FILE`, readable (:func:`read_trainer_state`, ``read_checkpoint``) and at the same
    step (:func:`check_same_step`), and, with ``stage`` (``"segmentor"`` or ``"query_flow"``), a
    run of that stage (the model file's ``meta["stage"]``; files without one pass).

    Raises:
        ValueError: ``run_dir`` is a file; without ``resume``, it holds an earlier run
            (the message names the folder and says to pass ``--resume`` or choose another
            ``--run-dir``); with ``resume``, a damaged trainer state, the two files at
            different steps or the other stage's run.
        FileNotFoundError: with ``resume``, the folder or either file missing.
        mpvss_ros.checkpoints.CheckpointError: with ``resume``, a damaged model file.
        OSError: the folder cannot be made (:func:`~mpvss_ros.paths.check_output_dir`).
    """
    run_dir = check_output_dir(run_dir, "--run-dir")
    if not resume:
        found = [name for name in RUN_FILES if (run_dir / name).exists()
                 and not (name == LOG_FILE and (run_dir / name).is_file() and (run_dir / name).stat().st_size == 0)]
        if found == [LOG_FILE]:  # a run that stopped before its first checkpoint: nothing to resume
            raise ValueError(f"run folder {run_dir} holds the log of a run that stopped before its first checkpoint "
                             f"(no {MODEL_FILE}): there is nothing to resume; move or delete {run_dir / LOG_FILE} to "
                             f"start anew there, or choose another --run-dir")
        if found:
            raise ValueError(f"run folder {run_dir} already holds a run ({', '.join(found)}): pass --resume to "
                             f"continue it, or choose another --run-dir")
        return
    if not run_dir.is_dir():
        raise FileNotFoundError(f"resume: run folder {run_dir} does not exist")
    model_path, state_path = run_dir / MODEL_FILE, run_dir / STATE_FILE
    missing = [p.name for p in (model_path, state_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"resume: {run_dir} has no {' and no '.join(missing)} ({MODEL_FILE} and "
                                f"{STATE_FILE} are both needed)")
    state = read_trainer_state(state_path)
    meta = read_checkpoint(model_path).meta
    check_same_step(meta, state, model_path, state_path)
    if stage is not None and meta.get("stage") not in (None, stage):
        raise ValueError(f"resume: {run_dir} holds a {meta.get('stage')!r} run, not a {stage!r} one (the other "
                         f"training stage: resume it with its own command, or choose another --run-dir)")


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """Read and check a :data:`STATE_FILE` (``torch.load(weights_only=True)``).

    Returns:
        the state dict: ``step`` (int >= 0), ``optimizer`` and ``scheduler`` (state dicts),
        ``torch_rng`` (uint8 tensor), optionally ``cuda_rng`` and ``options``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file and what is wrong: unreadable (truncated, corrupt,
            not a torch file), not a dict, a missing entry or an entry of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: trainer state {path} not found")

    def bad(what: str) -> ValueError:
        return ValueError(f"resume: damaged trainer state {path}: {what} (restore it, or train anew in another "
                          f"--run-dir)")

    try:
        state = torch_load_checked(path)
    except Exception as exc:  # a failed CRC, truncated zip, not a torch file, disallowed globals, ...
        raise bad(f"cannot read it ({type(exc).__name__}: {_first_sentence(exc)})") from exc
    if not isinstance(state, dict):
        raise bad(f"it holds a {type(state).__name__}, not a dict")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise bad(f"missing {', '.join(repr(k) for k in missing)}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"'step' must be an integer >= 0, got {step!r}")
    opt = state["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        raise bad("'optimizer' is not an optimizer state dict")
    if not isinstance(state["scheduler"], dict):
        raise bad(f"'scheduler' is a {type(state['scheduler']).__name__}, not a dict")
    for key in ("torch_rng", "cuda_rng"):
        rng = state.get(key)
        if key in state and not (isinstance(rng, Tensor) and rng.dtype == torch.uint8 and rng.dim() == 1):
            raise bad(f"{key!r} is not a random-generator state (1-D uint8 tensor)")
    if not isinstance(state.get("options") or {}, dict):
        raise bad(f"'options' is a {type(state['options']).__name__}, not a dict")
    return state


def resume_run(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler,
               device: torch.device) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Restore a run from ``run_dir`` (``--resume``, both training stages): the model from
    :data:`MODEL_FILE`, the optimizer, LR schedule and RNG from :data:`STATE_FILE`; the learning
    rate is re-synced to the step and :data:`LOG_FILE` cut back to it. The base learning rates and
    weight decays stay this run's (a changed ``--lr`` or ``--weight-decay`` applies from the next
    step); the optimizer's moments and the schedule's step come from the state. Callers check the folder
    first with :func:`check_run_dir` (before their expensive work); this checks again.

    Returns:
        ``(step, state, meta)``: the step to continue from, the trainer state dict (its
        ``"options"`` are the run's earlier options, where saved) and the model file's ``meta``.

    Raises:
        FileNotFoundError: either file missing. ValueError: a damaged trainer state
            (:func:`read_trainer_state`), one that does not fit ``optimizer``/``scheduler`` (for
            example other trainable parameters) or the two files at different steps
            (:func:`check_same_step`). :class:`~mpvss_ros.checkpoints.CheckpointError`: a damaged
            or foreign model file.
    """
    model_path, state_path = run_dir / MODEL_FILE, run_dir / STATE_FILE
    if not model_path.is_file() or not state_path.is_file():
        raise FileNotFoundError(f"resume: {model_path} and {state_path} are both needed")
    state = read_trainer_state(state_path)
    meta = load_checkpoint(model, model_path)
    check_same_step(meta, state, model_path, state_path)
    # this run's base rates and decays: the saved states carry the earlier run's, which would
    # silently override a changed --lr / --weight-decay (the warning and options.json say they apply)
    settings = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.base_lrs = [lr for lr, _ in settings]
        for group, (lr, decay) in zip(optimizer.param_groups, settings):
            group["initial_lr"], group["weight_decay"] = lr, decay
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise ValueError(f"resume: the optimizer state in {state_path} does not fit this run ({type(exc).__name__}: "
                         f"{_first_sentence(exc)}): were the trainable parameters changed?") from exc
    step = int(state["step"])
    sync_lr(optimizer, scheduler, step)
    try:
        restore_rng_state(state, device)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"resume: damaged trainer state {state_path}: its random-generator state does not load "
                         f"({type(exc).__name__}: {_first_sentence(exc)})") from exc
    truncate_log(run_dir / LOG_FILE, step)
    log.info("resumed %s at step %d", run_dir, step)
    return step, state, meta


class InterruptAfterStep:
    """Ctrl-C (SIGINT) during training: finish the step in hand, save a checkpoint, then stop.

    A ``KeyboardInterrupt`` raised in the middle of a step leaves the model, the optimizer, the
    LR schedule and the RNG at different points, so a checkpoint saved then does not resume
    exactly (the step is trained twice, or the random draws shift). Inside this context the
    first SIGINT only sets :attr:`requested`, which the training loop checks after each step;
    a second one stops at once, without a checkpoint. Outside the main thread, where Python
    delivers no signals, it changes nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "InterruptAfterStep":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: stopping after this step, with a checkpoint (Ctrl-C again: at once, without one)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train_segmentor(options: TrainOptions | None = None, **kwargs: Any) -> TrainResult:
    """Stage-1 training of the MPVSS key-frame segmentor on CamVid (see the module docstring).

    Call either ``train_segmentor(TrainOptions(...))`` or ``train_segmentor(run_dir=..., steps=...,
    ...)`` with :class:`TrainOptions` fields as keywords.

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: bad options; without ``resume``, a run folder that holds an earlier run; with
            ``resume``, an inconsistent run folder or a damaged trainer state (:func:`check_run_dir`).
        FileNotFoundError: missing data, ImageNet weights or (with ``resume``) run folder or
            checkpoint files.
        mpvss_ros.checkpoints.CheckpointError: a checkpoint that does not match the model.
    """
    if options is None:
        options = TrainOptions(**kwargs)
    elif kwargs:
        options = dataclasses.replace(options, **kwargs)
    options.validate()  # first: the conversion below would take a crop of 64 or (64, 96, 999) apart
    opts = dataclasses.replace(options, crop=(int(options.crop[0]), int(options.crop[1])),
                               scale=(float(options.scale[0]), float(options.scale[1])))
    check_run_dir(opts.run_dir, opts.resume, "segmentor")  # before the model is built and the data read
    with torch_threads(opts.threads):
        return _train(opts)


def device_description(device: torch.device) -> str:
    """What a run trained on, for logs and checkpoint metadata: ``cpu (2 threads)`` or
    ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """The random state a run continues from: the CPU generator (``torch_rng``) and, on CUDA,
    that device's generator (``cuda_rng``), which draws the matcher's and the loss's points.
    Both are 1-D uint8 (``torch.ByteTensor``) states on the CPU, as ``torch.get_rng_state``."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def save_run_checkpoint(model_path: Path, state_path: Path, model: nn.Module, config: dict[str, Any],
                        meta: dict[str, Any], state: dict[str, Any]) -> None:
    """Write a run's checkpoint pair: the model file (:func:`~mpvss_ros.checkpoints.save_checkpoint`)
    and the trainer state (optimizer, scheduler, RNG; ``state["step"]`` equals ``meta["step"]``).

    The state is written in full to a temporary file before the model file is replaced, and put
    in place right after it, so a write that fails (a full disk) or is killed leaves the previous
    pair as it was, resumable; only a kill between the two renames leaves a pair that
    :func:`check_same_step` refuses.

    Raises:
        OSError: a write failed (the previous pair is kept).
    """
    tmp = state_path.with_suffix(".pt.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb+") as f:  # on the disk before the rename, as write_atomic does (a power cut)
            os.fsync(f.fileno())
        save_checkpoint(model_path, model, config, meta=meta)
    except BaseException:  # a full disk: do not leave the optimizer state's size behind on it
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(state_path)


def save_final_checkpoint(run_dir: Path, model: nn.Module, config: dict[str, Any], meta: dict[str, Any],
                          steps_run: int) -> Path:
    """Write :data:`FINAL_FILE` of a run that reached its last step (both training stages) and
    return its path. A ``--resume`` of a finished run runs no step: its final file, with the
    validation record of the run that wrote it, is kept as it is (this invocation has none).

    Raises:
        OSError: the write failed.
    """
    final = run_dir / FINAL_FILE
    if steps_run > 0 or not final.is_file():
        save_checkpoint(final, model, config, meta=meta)
    return final


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Undo :func:`rng_state`. A run saved on another kind of device continues with this device's
    generator as it is (logged): the continuation is then not the exact one."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    elif (device.type == "cuda") != ("cuda_rng" in state):
        log.warning("resuming on %s a run saved on another kind of device: the random points differ from a "
                    "straight run", device)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (0 = leave as is), restored afterwards."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(opts: TrainOptions) -> TrainResult:
    run_dir = Path(opts.run_dir)
    cfg = load_model_config(opts.model)
    check_default_data_classes(cfg.num_classes, cfg.name, opts.data_root)
    device = select_device(opts.device)
    model, motion_trained = _build_model(opts, cfg, initialise=not opts.resume)
    model.to(device)
    k = cfg.num_classes
    trained_on = device_description(device)
    log.info("training on %s", trained_on)

    root = camvid_root(opts.data_root)
    train_set = CamVidFrames(root / "train", root / "trainannot", crop=opts.crop, scale=opts.scale, flip=opts.flip,
                             color_jitter=opts.color_jitter, train=True, num_classes=k, ignore_index=IGNORE_INDEX,
                             seed=opts.seed, files=opts.train_files)
    val_set = None
    if opts.val_every >= 0 and opts.val_frames > 0 and (root / "val").is_dir():
        val_set = CamVidFrames(root / "val", root / "valannot", train=False, num_classes=k, ignore_index=IGNORE_INDEX)
    if len(train_set) < opts.batch_size:
        raise ValueError(f"{len(train_set)} training frames for batch_size {opts.batch_size}")
    # a corrupt frame fails now (about 2 s), not when first drawn; the frames are decoded again when drawn
    decode_frames(train_set.pairs, num_classes=k, ignore_index=IGNORE_INDEX, keep=False)
    val_indices = (np.unique(np.linspace(0, len(val_set) - 1, opts.val_frames).round().astype(int)).tolist()
                   if val_set is not None else [])
    # a corrupt val frame too, not at the first validation (after the steps before it, whose
    # checkpoint is written after validating)
    decode_frames([val_set.pairs[i] for i in val_indices], num_classes=k, ignore_index=IGNORE_INDEX, keep=False)
    batches_per_epoch = len(train_set) // opts.batch_size

    matcher = (HungarianMatcher(2.0, 5.0, 5.0, num_points=opts.num_points) if opts.matcher == "hungarian"
               else FixedMatcher(k))
    criterion = SetCriterion(k, matcher, weight_class=2.0, weight_mask=5.0, weight_dice=5.0,
                             no_object_weight=opts.no_object_weight, num_points=opts.num_points)

    groups = build_param_groups(model, opts.lr, opts.backbone_lr_mult, opts.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, opts.steps, opts.warmup_steps, opts.warmup_factor, opts.poly_power))

    start = 0
    state_path, model_path = run_dir / STATE_FILE, run_dir / MODEL_FILE
    if opts.resume:
        start, state, model_meta = resume_run(run_dir, model, optimizer, scheduler, device)
        motion_trained = _resumed_motion_trained(model_meta, state.get("options") or {})
        model.motion_trained = motion_trained is not False
        warn_option_changes(state.get("options") or {}, options_dict(opts))
    else:
        torch.manual_seed(opts.seed + 1)  # point-sampling stream, distinct from the init stream
    for p in model.motion.parameters():  # the checkpoint load keeps requires_grad, but be explicit
        p.requires_grad_(False)

    make_output_dir(run_dir, "--run-dir")  # only now: a run that fails to start leaves no folder
    write_json_atomic(run_dir / "options.json", options_dict(opts))
    write_json_atomic(run_dir / "model_config.json", cfg.to_dict())

    stop = opts.steps if opts.stop_at is None else max(opts.stop_at, start)
    result = TrainResult(run_dir=run_dir, step=start, finished=start >= opts.steps, checkpoint=model_path)
    hp, wp = _padded_hw(opts.crop, cfg.input.size_divisibility)
    last_val: dict[str, Any] | None = None

    dataset = ("CamVid train (SegNet split)" if opts.data_root is None
               else f"--data-root {camvid_root(opts.data_root).resolve().name} train")
    if opts.train_files:
        dataset += f" ({len(opts.train_files)} frames of it, --train-files)"

    def meta(step: int) -> dict[str, Any]:
        return {"stage": "segmentor", "motion_trained": motion_trained, "step": step, "steps": opts.steps,
                "dataset": dataset,
                "matcher": opts.matcher, "seed": opts.seed, "val": last_val, "device": trained_on}

    def save(step: int) -> None:
        save_run_checkpoint(model_path, state_path, model, cfg.to_dict(), meta(step),
                            {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             **rng_state(device), "options": options_dict(opts)})
        result.checkpoint = model_path

    def validate(step: int, logf: Any) -> None:
        nonlocal last_val
        if not val_indices:
            return
        t0 = time.perf_counter()
        cm = evaluate_frames(model, val_set, val_indices)
        if opts.freeze_bn:
            _set_bn_eval(model.backbone)
        rec = {"val": True, "step": step, "mIoU": _finite(100 * cm.miou()), "pACC": _finite(100 * cm.pixel_accuracy()),
               "frames": len(val_indices), "sec": round(time.perf_counter() - t0, 3)}
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        last_val = rec
        result.val.append(rec)
        log.info("step %d: quick val mIoU %.2f (%d frames)", step, rec["mIoU"] or float("nan"), len(val_indices))

    model.train()
    if opts.freeze_bn:
        _set_bn_eval(model.backbone)
    t_start = time.perf_counter()
    times: list[float] = []
    epoch, perm = -1, None
    step = start
    bar = tqdm(total=stop, initial=start, disable=not opts.progress, desc="stage-1", dynamic_ncols=True)
    with open(run_dir / LOG_FILE, "a") as logf, InterruptAfterStep() as interrupt:
        try:
            while step < stop:
                t0 = time.perf_counter()
                e, within = divmod(step, batches_per_epoch)
                if e != epoch:
                    epoch = e
                    perm = np.random.default_rng([opts.seed, 1, epoch]).permutation(len(train_set))
                    train_set.set_epoch(epoch)
                idx = perm[within * opts.batch_size:(within + 1) * opts.batch_size]
                samples = [train_set[int(i)] for i in idx]
                images = _pad_to(torch.stack([s[0] for s in samples]).to(device), (hp, wp), 0.0)
                labels = _pad_to(torch.stack([s[1] for s in samples]).to(device), (hp, wp), IGNORE_INDEX)
                targets = semantic_batch_to_targets(labels, k, IGNORE_INDEX)

                out = model.forward_segmentor(images, valid_hw=opts.crop)
                losses = criterion(out, targets)
                loss = losses["loss"]
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"non-finite loss {float(loss.detach())} at step {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if opts.clip_grad_norm > 0:
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params, opts.clip_grad_norm))
                else:
                    gnorm = float(torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
                optimizer.step()
                scheduler.step()
                step += 1
                dt = time.perf_counter() - t0
                times.append(dt)
                vals = {kk: float(v.detach()) for kk, v in losses.items()}
                rec = {"step": step, "epoch": epoch, "loss": vals["loss"]}
                for name in ("ce", "mask", "dice"):
                    rec[f"loss_{name}"] = vals[f"loss_{name}"]
                    rec[f"loss_{name}_all"] = sum(v for kk, v in vals.items()
                                                  if kk == f"loss_{name}" or kk.startswith(f"loss_{name}_"))
                rec.update(grad_norm=gnorm, lr=lrs.get("head_decay", next(iter(lrs.values()))),
                           lr_backbone=lrs.get("backbone_decay"), sec_per_step=round(dt, 4))
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                result.losses.append(vals["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{vals['loss']:.3f}", lr=f"{rec['lr']:.2e}")

                timed_out = opts.max_minutes is not None and (time.perf_counter() - t_start) > 60 * opts.max_minutes
                at_end = step >= stop or timed_out
                if (opts.val_every > 0 and step % opts.val_every == 0) or (at_end and opts.val_every >= 0):
                    validate(step, logf)
                if at_end or interrupt.requested or (opts.checkpoint_every > 0 and step % opts.checkpoint_every == 0):
                    save(step)
                if interrupt.requested:
                    log.warning("interrupted: checkpoint at step %d (resume with --resume)", step)
                    raise KeyboardInterrupt
                if timed_out:
                    log.info("max_minutes reached at step %d", step)
                    break
        finally:
            bar.close()

    result.step = step
    result.sec_per_step = float(np.mean(times)) if times else float("nan")
    result.sec_per_step_median = float(np.median(times)) if times else float("nan")
    if step >= opts.steps:
        result.finished = True
        result.checkpoint = save_final_checkpoint(run_dir, model, cfg.to_dict(), meta(step), step - start)
    return result


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the :class:`TrainOptions` flags to ``parser`` (for ``mpvss train``)."""
    d = TrainOptions(run_dir="")
    a = parser.add_argument
    a("--run-dir", required=True, help="output folder (log.jsonl, checkpoints)")
    a("--model", default=d.model, help="model name under config/models or a YAML file (default %(default)s)")
    a("--steps", type=int, default=d.steps, help="schedule length in steps (default %(default)s)")
    a("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    a("--crop", type=int, nargs=2, metavar=("H", "W"), default=list(d.crop), help="crop size (default %(default)s)")
    a("--scale", type=float, nargs=2, metavar=("MIN", "MAX"), default=list(d.scale),
      help="random scale range (default %(default)s)")
    a("--no-flip", dest="flip", action="store_false", help="disable horizontal flips")
    a("--no-color-jitter", dest="color_jitter", action="store_false", help="disable colour jitter")
    a("--lr", type=float, default=d.lr, help="AdamW lr of the heads (default %(default)s)")
    a("--backbone-lr-mult", type=float, default=d.backbone_lr_mult, help="default %(default)s")
    a("--weight-decay", type=float, default=d.weight_decay, help="default %(default)s")
    a("--warmup-steps", type=int, default=d.warmup_steps, help="default %(default)s")
    a("--warmup-factor", type=float, default=d.warmup_factor, help="default %(default)s")
    a("--poly-power", type=float, default=d.poly_power, help="default %(default)s")
    a("--clip-grad-norm", type=float, default=d.clip_grad_norm, help="<= 0 disables (default %(default)s)")
    a("--matcher", choices=("hungarian", "fixed"), default=d.matcher, help="default %(default)s")
    a("--num-points", type=int, default=d.num_points, help="points per mask (default %(default)s)")
    a("--no-object-weight", type=float, default=d.no_object_weight, help="default %(default)s")
    a("--imagenet-weights", default=None, help="MobileNetV2 ImageNet file (default: shared data; 'none': random)")
    a("--init-checkpoint", default=None,
      help="start from this checkpoint of the model, with or without a motion module (a per-frame Mask2Former file)")
    a("--data-root", default=None, help="CamVid root with train/ trainannot/ val/ valannot/ (default: shared data)")
    a("--train-files", nargs="+", default=None, help="train on these file names only (debugging)")
    a("--no-freeze-bn", dest="freeze_bn", action="store_false", help="update backbone BatchNorm statistics")
    a("--checkpoint-every", type=int, default=d.checkpoint_every, help="default %(default)s")
    a("--val-every", type=int, default=d.val_every, help="0: only at the end, -1: never (default %(default)s)")
    a("--val-frames", type=int, default=d.val_frames, help="default %(default)s")
    a("--threads", type=int, default=d.threads, help="torch threads, 0 = unchanged (default %(default)s)")
    a("--seed", type=int, default=d.seed, help="default %(default)s")
    a("--resume", action="store_true", help="continue the run in --run-dir")
    a("--stop-at", type=int, default=None, help="stop after this global step (checkpointed)")
    a("--max-minutes", type=float, default=None, help="stop after this wall time (checkpointed)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a("--device", default=d.device, help="auto (a CUDA GPU when there is one, else the CPU), cpu or cuda[:N] "
                                          "(default %(default)s)")


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """:class:`TrainOptions` from a namespace parsed with :func:`add_train_arguments`."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["crop"] = tuple(values["crop"])
    values["scale"] = tuple(values["scale"])
    return TrainOptions(**values)
