"""Resolve a model name or config file plus weights into a ready :class:`~mpvss_ros.nn.mpvss.MPVSS`.

Rules, in order:

1. ``weights`` given and in this project's format with a stored ``model_config``, and no
   ``model`` given: the stored configuration is used (the file describes itself).
2. ``weights`` given without a configuration, no ``model``, and its backbone keys and classes
   those of a published model configured here (:func:`published_model_name`: MPVSS R50, R101,
   Swin-T/S/B/L, Mask2Former Cityscapes R50): that model's configuration.
3. Otherwise the configuration comes from ``model`` (a name under ``config/models/`` or a YAML
   file), default ``mpvss_lite``.
4. Weights: ``weights`` if given (it must exist and match, else :class:`CheckpointError`), else
   the configuration's ``default_weights``. When those default weights are absent the model runs
   **untrained** (seeded random initialisation) with a warning, and ``LoadedModel.trained`` is
   False; callers that need a trained model check it.

Relative paths are looked up in the working directory and then :func:`mpvss_ros.paths.data_roots`
(source tree, ROS 2 share directory, ``<prefix>/share/mpvss_ros``).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoints import (MOTION_PREFIX, CheckpointError, CheckpointFile, holds_part, load_state_dict_strict,
                          motion_module_trained, read_checkpoint)
from .config import ConfigError, ModelConfig, load_model_config, model_config_from_dict
from .devices import as_torch_device, check_device
from .nn.backbones import RESNET_BLOCKS
from .nn.mpvss import MPVSS
from .paths import find_data

__all__ = ["LoadedModel", "load_model", "load_exported", "checkpoint_model_config", "resolve_data_path",
           "resolve_device", "select_device", "published_model_name", "DEFAULT_MODEL", "PUBLISHED_MODELS"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "mpvss_lite"

#: The configurations of published checkpoints: the official MPVSS VSPW models (ziplab/MPVSS
#: ``configs/vspw``) and Mask2Former's Cityscapes R50 (a per-frame segmentor, no motion module).
#: A checkpoint without a stored configuration is matched against them by its backbone and classes.
PUBLISHED_MODELS = ("mpvss_r50", "mpvss_r101", "mpvss_swin_tiny", "mpvss_swin_small", "mpvss_swin_base",
                   "mpvss_swin_large", "mask2former_r50_cityscapes")


@dataclass
class LoadedModel:
    """A model ready for inference and where it came from.

    Attributes:
        model: the MPVSS module in eval mode on ``device``; None for an export folder run by
            onnxruntime or TensorRT without the PyTorch model (:func:`load_exported`).
        config: its configuration.
        weights: the weights file loaded, or None for an untrained model.
        trained: False when no weights were loaded.
        meta: provenance stored in the weights file (this project's format), else {}.
        device: the torch device.
    """

    model: MPVSS | None
    config: ModelConfig
    weights: Path | None
    trained: bool
    device: torch.device
    meta: dict[str, Any] = field(default_factory=dict)

    def provenance(self, backend: Any = None) -> dict[str, Any]:
        """What a run record says about the model (JSON-ready): ``model`` (name), ``weights`` (the
        file; for an export folder the one it was exported from), ``onnx_dir`` (the export folder
        run, else None), ``trained``, and ``backend`` (``backend.describe()``; None without a
        backend or without that method)."""
        return {"model": self.config.name, "weights": str(self.weights) if self.weights else None,
                "onnx_dir": self.meta.get("onnx_dir"), "trained": self.trained,
                "backend": backend.describe() if backend is not None and hasattr(backend, "describe") else None}


def load_exported(onnx_dir: str | Path, motion_optional: bool = False) -> LoadedModel:
    """An ``mpvss export`` folder (or a model of your own brought to its contract) as a
    :class:`LoadedModel` without the PyTorch model: configuration, classes and palette from its
    ``contract.json``, ``weights``/``trained`` as the contract records them. Run it with
    ``load_backend("onnxruntime" | "tensorrt", onnx_dir=...)``; the graphs fix the input size.

    Args:
        onnx_dir: the export folder.
        motion_optional: as :func:`load_model`: accept a folder whose contract says
            ``motion_trained: false`` (exported from weights without a trained motion module), for
            a run with optical flow or copy. Refused otherwise, before any graph is loaded or any
            TensorRT engine built.

    Raises:
        FileNotFoundError: no contract, or a graph missing. ValueError: not a contract of this
            format, its model configuration invalid, or the two disagreeing
            (:func:`~mpvss_ros.runtime.export.contract_problems`); ``motion_trained: false`` and
            not ``motion_optional``.
    """
    from .runtime.export import contract_model_config, contract_problems, read_contract

    contract = read_contract(onnx_dir)
    config = contract_model_config(contract)
    problems = contract_problems(contract, config)
    if problems:  # e.g. more classes than the graphs output: labels would be silently wrong
        raise ValueError(f"{onnx_dir}: {'; '.join(problems)} (mpvss check-export lists everything)")
    if contract.get("motion_trained") is False and not motion_optional:
        raise ValueError(f"{onnx_dir}: its contract.json says motion_trained: false (exported from weights without a "
                         f"trained motion module): its graphs run with optical flow or copy between key frames "
                         f"(--propagator optical_flow, node parameter propagator: optical_flow), not with query flow "
                         f"or eval --study")
    weights = contract.get("weights")
    return LoadedModel(model=None, config=config, weights=Path(weights) if weights else None,
                       trained=bool(contract.get("trained")), device=torch.device("cpu"),
                       meta={"onnx_dir": str(Path(onnx_dir).resolve())})


def resolve_data_path(path: str | Path) -> Path | None:
    """Find a data path (e.g. ``models/x.pt``): as given, or under :func:`~mpvss_ros.paths.data_roots`."""
    return find_data(path)


def resolve_device(device: str, backend: str = "torch", precision: str = "fp32") -> str:
    """``auto`` -> ``cuda`` when ``backend`` can run there with ``precision``
    (:func:`~mpvss_ros.runtime.backend_missing`: for torch, when torch sees a CUDA GPU; for
    onnxruntime, when its CUDA provider is installed), else ``cpu``; any other valid device string
    (:func:`~mpvss_ros.devices.check_device`) unchanged.

    Raises:
        ValueError: a device string that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N <= 127);
            unknown backend or precision (with ``auto``).
    """
    if check_device(device) != "auto":
        return device
    from .runtime import backend_missing

    return "cuda" if backend_missing(backend, "cuda", precision) is None else "cpu"


def select_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> torch.device (``auto``: :func:`resolve_device`).

    Raises:
        ValueError: unknown device string, or CUDA requested where torch has no CUDA (says to use
            ``--device cpu``).
    """
    dev = as_torch_device(resolve_device(device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but this torch build sees no CUDA GPU; use --device cpu")
    return dev


def _backbone_signature(state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The backbone settings an official checkpoint's keys and shapes fix, as ``BackboneConfig``
    fields, or None for a backbone that is neither a detectron2 ResNet nor a D2 Swin."""
    if "backbone.stem.conv1.weight" in state_dict:  # detectron2 ResNet, told apart by its res4 blocks
        res4 = {k.split(".")[2] for k in state_dict if k.startswith("backbone.res4.")}
        depth = {blocks[2]: d for d, blocks in RESNET_BLOCKS.items()}.get(len(res4))
        return None if depth is None else {"type": "resnet", "depth": depth}
    patch = state_dict.get("backbone.patch_embed.proj.weight")
    tables = [state_dict.get(f"backbone.layers.{s}.blocks.0.attn.relative_position_bias_table") for s in range(4)]
    if len(getattr(patch, "shape", ())) != 4 or any(len(getattr(t, "shape", ())) != 2 for t in tables):
        return None  # no Swin, or a damaged one: loading reports what is wrong
    side = math.isqrt(int(tables[0].shape[0]))  # the table has (2M - 1)^2 rows
    return {"type": "swin", "embed_dim": int(patch.shape[0]), "window_size": (side + 1) // 2,
            "num_heads": [int(t.shape[1]) for t in tables],
            "depths": [len({k.split(".")[4] for k in state_dict if k.startswith(f"backbone.layers.{s}.blocks.")})
                       for s in range(4)]}


@functools.lru_cache(maxsize=1)
def _published_configs() -> tuple[tuple[str, Any, int], ...]:
    """(name, backbone config, number of classes) of :data:`PUBLISHED_MODELS`, read once."""
    configs = (load_model_config(name) for name in PUBLISHED_MODELS)
    return tuple((cfg.name, cfg.backbone, cfg.num_classes) for cfg in configs)


def published_model_name(state_dict: dict[str, Any]) -> str | None:
    """The published model a checkpoint without a stored configuration belongs to, from its
    backbone's keys and shapes (detectron2 ResNet depth; Swin width, blocks, heads and window) and
    its number of classes (``class_embed`` rows - 1, when present). The rest of the file is
    checked when it loads.

    Args:
        state_dict: key -> tensor (or array; only ``.shape`` is read).

    Returns:
        The first of :data:`PUBLISHED_MODELS` that fits, or None.

    Raises:
        ConfigError: a configuration of :data:`PUBLISHED_MODELS` missing or invalid (an install
            without ``config/models``).
    """
    signature = _backbone_signature(state_dict)
    if signature is None:
        return None
    class_embed = state_dict.get("sem_seg_head.predictor.class_embed.weight")
    classes = int(class_embed.shape[0]) - 1 if len(getattr(class_embed, "shape", ())) == 2 else None
    for name, backbone, num_classes in _published_configs():
        if (all(getattr(backbone, field_name) == value for field_name, value in signature.items())
                and classes in (None, num_classes)):
            return name
    return None


def checkpoint_model_config(model: str | Path | None, ckpt: CheckpointFile,
                            path: str | Path) -> tuple[ModelConfig, str]:
    """The configuration a checkpoint is loaded into, by rules 1-3 of the module docstring, and
    where it came from: ``given`` (``model``), ``stored`` (the file's ``model_config``),
    ``published`` (:func:`published_model_name` of its weights) or ``default``
    (:data:`DEFAULT_MODEL`, a guess for a file that says nothing of its model; a caller that cannot
    guess refuses it). Shared by :func:`load_model` and stage 2's ``--init-checkpoint``.

    Args:
        model: a model name or YAML config, or None.
        ckpt: the file read by :func:`~mpvss_ros.checkpoints.read_checkpoint`.
        path: its path, for messages.

    Raises:
        ConfigError: ``model`` unknown or invalid.
        CheckpointError: the file's stored configuration is not valid (the file is at fault, not
            the command line: exit status 1, as for its weights).
    """
    if model:  # "" as None: the node's model: '' is "the file's own configuration"
        return load_model_config(model), "given"
    if ckpt.model_config:
        try:
            return model_config_from_dict(ckpt.model_config, where=f"{path} (model_config)"), "stored"
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
    guess = published_model_name(ckpt.state_dict)
    if guess is not None:
        log.info("%s holds no model configuration; its backbone's keys are those of %s", path, guess)
        return load_model_config(guess), "published"
    return load_model_config(DEFAULT_MODEL), "default"


def load_model(model: str | Path | None = None, weights: str | Path | None = None,
               device: str = "cpu", seed: int = 0, motion_optional: bool = False) -> LoadedModel:
    """Build the model and load its weights (see the module docstring for the rules).

    Args:
        model: a model name under ``config/models/`` (``mpvss_lite``, ``mpvss_r50``,
            ``mpvss_swin_base``, ...) or a YAML config file; None = the configuration stored in
            the weights file, else the official model its backbone describes
            (:func:`published_model_name`), else ``mpvss_lite``.
        weights: a checkpoint (``.pt``/``.pth`` this project's or official, or detectron2
            ``.pkl``); None = the config's default weights.
        device: ``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu`` or ``cuda[:N]``.
        seed: torch seed for the initialisation of an untrained model.
        motion_optional: accept weights without a trained motion module (a per-frame Mask2Former
            checkpoint without any ``motion.*`` key, or a stage-1 file of this project:
            :func:`~mpvss_ros.checkpoints.motion_module_trained`) for a caller that propagates
            with optical flow or copy, or segments every frame: the segmentor loads strictly and
            ``model.motion_trained`` is False (query flow then refuses the model).

    Raises:
        ConfigError: unknown model name or bad config file.
        CheckpointError: ``weights`` given but missing, corrupt or not matching the model, or
            holding a model configuration that is not valid; without a trained motion module and
            not ``motion_optional``.
        ValueError: unusable device.
    """
    dev = select_device(device)
    weights_path: Path | None = None
    if weights is not None:
        weights_path = resolve_data_path(weights)
        if weights_path is None:
            raise CheckpointError(f"weights file not found: {weights}")

    ckpt = read_checkpoint(weights_path) if weights_path is not None else None  # the file is read once
    if ckpt is not None:
        cfg, cfg_source = checkpoint_model_config(model, ckpt, weights_path)
    else:
        cfg, cfg_source = load_model_config(model or DEFAULT_MODEL), "given"
    default_guessed = cfg_source == "default"  # a file without a configuration, not a published model's
    published_guess = cfg_source == "published"  # a file without a configuration, a published model's backbone

    if weights_path is None and cfg.default_weights:
        weights_path = resolve_data_path(cfg.default_weights)
        if weights_path is None:
            log.warning(
                "no trained weights for %s (%s not found): running UNTRAINED, randomly initialised "
                "(seed %d); labels will be meaningless", cfg.name, cfg.default_weights, seed)
        else:
            ckpt = read_checkpoint(weights_path)

    torch.manual_seed(seed)
    net = MPVSS(cfg)
    meta: dict[str, Any] = {}
    no_motion = ckpt is not None and not holds_part(ckpt.state_dict, MOTION_PREFIX)
    if ckpt is not None:
        try:
            load_state_dict_strict(net, ckpt.state_dict, source=str(weights_path), absent_part=MOTION_PREFIX)
        except CheckpointError as exc:
            stored = (ckpt.model_config or {}).get("name") if isinstance(ckpt.model_config, dict) else None
            if model is not None and stored and stored != cfg.name:
                raise CheckpointError(
                    f"{weights_path} was trained as {stored} (the configuration stored in it), not {model}: "
                    f"leave out --model (node: model: '') to use the stored one, or pass --model {stored}\n{exc}"
                ) from exc
            if published_guess:
                raise CheckpointError(
                    f"{weights_path} stores no model configuration and its backbone is that of the official "
                    f"{cfg.name}, but the rest of it does not fit {cfg.name}: pass --model with a YAML config "
                    f"that describes it\n{exc}") from exc
            if not default_guessed:
                raise
            raise CheckpointError(
                f"{weights_path} holds no model configuration, its backbone and classes are none of the published "
                f"models configured here ({', '.join(PUBLISHED_MODELS)}) and it does not fit the default model "
                f"{cfg.name}: pass --model with a model name or a YAML config that describes it\n{exc}") from exc
        trained_motion = motion_module_trained(ckpt)  # False: no motion module, or a stage-1 file of ours
        if trained_motion is None:
            # a stage-1 file that cannot say (written before stage 1 recorded it, or a run started
            # from such a file): run as before, with a warning, also for a caller that does not
            # propagate with it now (an export of it, or the node switched to query flow later, may)
            log.warning("%s is a stage-1 segmentor file that does not record whether its motion module is trained "
                        "(written before stage 1 recorded it, or by a run started from such a file): it is only if "
                        "that run started from a file with a trained one (--init-checkpoint); otherwise query flow, "
                        "here or from an export of it, warps with its initialisation (use optical flow or copy, or "
                        "train one with mpvss train motion)", weights_path)
        what = ("is a whole {} segmentor without a motion module (a per-frame Mask2Former checkpoint; no motion.* "
                "key)" if no_motion else "is a stage-1 {} segmentor whose motion module was never trained (its meta: "
                "motion_trained false; stage 1 keeps it frozen at its initialisation)").format(cfg.name)
        if trained_motion is False and not motion_optional:
            raise CheckpointError(
                f"{weights_path} {what}: it runs with optical flow or copy between key frames (mpvss "
                f"segment / eval / bag --propagator optical_flow, node parameter propagator: optical_flow), not "
                f"with query flow or eval --study; or train a motion module for it: "
                f"mpvss train motion --init-checkpoint {weights_path}")
        if trained_motion is False:
            net.motion_trained = False
            log.warning("%s %s: key frames only, with optical flow or copy between them", weights_path, what)
        meta = ckpt.meta
    elif not cfg.default_weights:
        log.warning("model %s has no weights (none given, no default): running UNTRAINED", cfg.name)
    net.eval().to(dev)
    return LoadedModel(net, cfg, weights_path, weights_path is not None, dev, meta)
