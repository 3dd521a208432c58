"""Checkpoints: official detectron2-format MPVSS files and this project's own format.

Official files (spec §5.1) are ``.pth`` (``torch.save`` of a dict, the state dict possibly
under ``"model"``) or detectron2 ``.pkl`` (a pickle of numpy arrays, possibly under ``"model"``).
``.pth`` files are read with ``torch.load(weights_only=True)``; ``.pkl`` files with a restricted
unpickler that only rebuilds numpy arrays and plain containers, so neither can run code.

Key matching is strict: every key of the model must be in the file and every key of the file must
be used, except for these documented, harmless differences:

* ``criterion.empty_weight`` (a loss buffer of the training criterion) is ignored;
* ``pixel_mean`` / ``pixel_std`` (non-persistent normalisation buffers some exports still carry)
  must equal the model configuration's, else :class:`CheckpointError` (weights trained with
  another normalisation, e.g. BGR order); ``motion.flow_img_norm_*`` are ignored with a warning;
* BatchNorm ``num_batches_tracked`` counters may be present or absent (detectron2 FrozenBN has
  none, SyncBN has them); they do not affect inference;
* Swin's ``relative_position_index`` buffers, which the configuration fixes, may be absent; when
  present they must hold the values the model computes, else :class:`CheckpointError`;
* a ``module.`` prefix on every key (a file saved from a (Distributed)DataParallel wrapper) is
  stripped when the file is read, as detectron2's checkpointer does;
* with ``absent_part`` (:func:`load_state_dict_strict`; stage-2 training's start from a per-frame
  Mask2Former checkpoint) a file may lack every key under that prefix, all of them or none.

Anything else missing, unexpected or of another shape raises :class:`CheckpointError` naming
the keys. So do a torch zip whose member fails its CRC check and tensors holding NaN or inf.

This project's own files (``models/*.pt``) are a dict::

    {"format": "mpvss_ros", "version": 1, "model_config": {...}, "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .paths import write_atomic

__all__ = [
    "CheckpointError",
    "CheckpointFile",
    "first_line",
    "read_checkpoint",
    "read_state_dict",
    "load_state_dict_strict",
    "holds_part",
    "MOTION_PREFIX",
    "load_checkpoint",
    "load_init_checkpoint",
    "motion_module_trained",
    "save_checkpoint",
    "torch_load_checked",
    "IGNORED_KEYS",
]

FORMAT = "mpvss_ros"
VERSION = 1

log = logging.getLogger(__name__)

#: Keys that official checkpoints may carry and that the model does not use.
IGNORED_KEYS = ("criterion.empty_weight", "pixel_mean", "pixel_std", "motion.flow_img_norm_mean", "motion.flow_img_norm_std")
_OPTIONAL_SUFFIXES = ("num_batches_tracked", "relative_position_index")
#: Buffers the model computes from its configuration: optional in a file, and equal when present.
_DERIVED_SUFFIXES = ("relative_position_index",)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, of an unknown layout, or does not match the model."""


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, dtypes and builtin containers."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "slice"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles encode bytes with it; harmless
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise CheckpointError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed in .pkl checkpoints")


def _to_tensor_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: no state dict found (expected a dict of tensors, possibly under 'model')")
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in "biuf":  # objects, strings, dates, complex: torch has no such weights
                raise CheckpointError(f"{path}: array {k!r} holds {v.dtype} values, not numbers")
            v = torch.from_numpy(np.array(v, order="C", copy=True))  # keeps 0-d arrays 0-d
        if not isinstance(v, Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided or v.is_quantized:
            raise CheckpointError(f"{path}: tensor {k!r} is {v.layout}{' quantized' if v.is_quantized else ''}, "
                                  "not a dense tensor")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: tensor {k!r} holds NaN or infinite values (a diverged or corrupt file)")
        out[str(k)] = v
    if all(k.startswith("module.") for k in out):
        # saved from a DistributedDataParallel / DataParallel wrapper: detectron2's checkpointer
        # strips this prefix when every key has it (_strip_prefix_if_present), and so does this
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


@dataclass
class CheckpointFile:
    """What one read of a checkpoint file gives.

    Attributes:
        state_dict: flat key -> tensor (the ``"model"`` entry of detectron2 files, the
            ``"state_dict"`` of this project's format), without the ``module.`` prefix that a
            (Distributed)DataParallel wrapper puts on every key.
        model_config: the stored ``ModelConfig`` dict (this project's format), else None.
        meta: the stored provenance (this project's format), else {}.
    """

    state_dict: dict[str, Tensor]
    model_config: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def first_line(exc: BaseException) -> str:
    """An exception's message up to its first line break ("" for an empty one): torch's and
    pickle's messages can span many lines, an error line here is one."""
    return (str(exc).strip().splitlines() or [""])[0]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _weights_only_cause(exc: BaseException) -> str:
    """What torch's weights-only refusal names as its cause (the text after ``WeightsUnpickler
    error:``, or the next non-empty line when that is empty, e.g. ``Unsupported global: GLOBAL
    numpy...`` or ``Unsupported operand 35``), ANSI colour codes removed; else the first line."""
    lines = [_ANSI.sub("", ln).strip() for ln in str(exc).splitlines()]
    marker = "WeightsUnpickler error:"
    for i, line in enumerate(lines):
        if marker in line:
            cause = line.split(marker, 1)[1].strip() or next((ln for ln in lines[i + 1:] if ln), "")
            return cause.split(" Please use")[0] or first_line(exc)
    return first_line(exc)


def torch_load_checked(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, after checking every member's CRC of
    torch.save's zip format (``torch.load`` itself reads a file with zeroed bytes inside a
    tensor, and that weight is silently changed).

    Raises:
        CheckpointError: a member fails its CRC check. Whatever ``torch.load`` raises on a
            truncated, foreign or unsafe file.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise CheckpointError(f"corrupt file {path}: member {bad} fails its CRC check")
    with warnings.catch_warnings():
        # a legacy (pre-zip) file with a damaged first bytes: torch warns of the "pickle
        # protocol" it reads there before it fails or loads; the caller reports either
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path) -> CheckpointFile:
    """Read a checkpoint once: ``.pth``/``.pt`` with ``weights_only=True``, detectron2 ``.pkl``
    with a numpy-only unpickler.

    Raises:
        CheckpointError: missing file, unreadable/corrupt file, no state dict inside, or this
            project's format of a version it does not read (newer than :data:`VERSION`).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (an interrupted download or copy?)")
    pkl = path.suffix.lower() == ".pkl"  # model_final.PKL from a case-insensitive file system too
    if not pkl and not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            head = f.read(8)
        if head[:4] == b"PK\x03\x04":  # a zip's first entry without its central directory at the end
            raise CheckpointError(f"cannot read checkpoint {path}: a zip file cut short or damaged (no central "
                                  "directory at its end; an interrupted download or copy?)")
        if head[:1] != b"\x80":  # torch.save writes a zip, or (legacy) a pickle of protocol 2 or later
            raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (neither torch.save's zip "
                                  f"format nor a pickle; it starts with {head!r})")
    try:
        if pkl:
            with path.open("rb") as f:
                obj = _NumpyUnpickler(f, encoding="latin1").load()
        else:
            obj = torch_load_checked(path)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        if pkl:  # the numpy unpickler's own errors
            raise CheckpointError(f"cannot read checkpoint {path}: {first_line(exc)[:200]}") from exc
        # torch's weights-only refusal, or bytes that are no pickle
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint, or it holds objects other than "
            f"tensors and plain data (read with weights_only=True, which never runs code from a file; "
            f"{_weights_only_cause(exc)[:200]})") from exc
    except Exception as exc:  # corrupt zip, truncated pickle, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first_line(exc)}") from exc
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        version = obj.get("version", 1)  # (a file made by hand may leave it out)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
            # a newer layout may mean something else by the same keys: refused, not guessed at
            raise CheckpointError(f"checkpoint {path} has format version {version!r}; this mpvss_ros reads "
                                  f"versions 1 to {VERSION} (a newer release wrote it?)")
        meta = obj.get("meta")
        meta = {} if meta is None else meta  # [], 0 or "" is as corrupt as any other non-mapping
        if not isinstance(meta, dict):
            raise CheckpointError(f"corrupt checkpoint {path}: its 'meta' must be a mapping, got {type(meta).__name__}")
        return CheckpointFile(_to_tensor_dict(obj.get("state_dict"), path), obj.get("model_config"), dict(meta))
    return CheckpointFile(_to_tensor_dict(obj, path))


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a checkpoint (see :func:`read_checkpoint`).

    Raises:
        CheckpointError: missing file, unreadable/corrupt file, or no state dict inside.
    """
    return read_checkpoint(path).state_dict


#: Keys listed per kind of mismatch in :func:`load_state_dict_strict`'s error (the rest counted).
_MAX_KEYS_LISTED = 20


#: The key prefix of the motion module (absent from per-frame Mask2Former checkpoints).
MOTION_PREFIX = "motion."


def holds_part(state_dict: dict[str, Tensor], prefix: str) -> bool:
    """Whether a file has a part, e.g. a motion module.

    Args:
        state_dict: key -> tensor, as read from a file.
        prefix: the part's key prefix, e.g. :data:`MOTION_PREFIX`.

    Returns:
        True when a key starts with ``prefix`` and is not one of the ignored
        :data:`IGNORED_KEYS` (such as ``motion.flow_img_norm_mean``).
    """
    return any(k.startswith(prefix) and k not in IGNORED_KEYS for k in state_dict)


def motion_module_trained(ckpt: CheckpointFile) -> bool | None:
    """Whether a file holds a trained motion module (what query flow needs).

    False for a file without one (:func:`holds_part` of :data:`MOTION_PREFIX`: a per-frame
    Mask2Former checkpoint) and for a file of this project whose ``meta`` says ``motion_trained:
    false`` (stage 1 writes it: the motion module is frozen at its initialisation unless the run
    started from a file with a trained one). None (unknown) for a stage-1 file (``stage:
    segmentor``) that records no bool: written before stage 1 recorded it, or by a run started
    from such a file (``motion_trained: null``); trained only if the first run started from a
    file with a trained one. True otherwise: stage 2's files, official MPVSS checkpoints, files
    without a ``meta``.

    Args:
        ckpt: a file read by :func:`read_checkpoint`.
    """
    if not holds_part(ckpt.state_dict, MOTION_PREFIX):
        return False
    flag = ckpt.meta.get("motion_trained")
    if isinstance(flag, bool):
        return flag
    return None if ckpt.meta.get("stage") == "segmentor" else True


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint",
                           absent_part: str | None = None) -> None:
    """Copy ``state_dict`` into ``model``, failing loudly on any key or shape mismatch.

    See the module docstring for the few keys that are tolerated.

    Args:
        model, state_dict, source: the module, the file's tensors and the file's name for errors.
        absent_part: a key prefix (e.g. ``"motion."``) whose keys the file may lack, all of them
            (they keep the model's current values): a per-frame Mask2Former checkpoint has no
            motion module. A file with some of them and not others is a mismatch.

    Raises:
        CheckpointError: listing missing keys, unexpected keys, shape mismatches and tensors of
            another kind (integer or complex where the model has floats, or the reverse), at most
            20 of each kind named.
    """
    model_sd = model.state_dict()
    _check_normalisation(model, state_dict, source)
    given = {k: v for k, v in state_dict.items() if k not in IGNORED_KEYS}
    optional = lambda k: k.endswith(_OPTIONAL_SUFFIXES)  # noqa: E731
    missing = sorted(k for k in model_sd if k not in given and not optional(k))
    if absent_part and not holds_part(given, absent_part):
        missing = [k for k in missing if not k.startswith(absent_part)]
    unexpected = sorted(k for k in given if k not in model_sd and not optional(k))
    mismatched = sorted(
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(model_sd[k].shape)}"
        for k in given
        if k in model_sd and tuple(given[k].shape) != tuple(model_sd[k].shape)
    )
    # buffers computed from the configuration (Swin's relative_position_index): a file that holds
    # one must hold the same values (another would load and silently mix up the position biases)
    derived = sorted(f"{k}: the file's values differ from those the configuration gives"
                     for k in given if k.endswith(_DERIVED_SUFFIXES) and k in model_sd
                     and tuple(given[k].shape) == tuple(model_sd[k].shape)
                     and not torch.equal(given[k].to(model_sd[k].dtype), model_sd[k].cpu()))
    # a float tensor cast to integers (or complex) would load, with a warning at most, and
    # segment every pixel as class 0
    wrong_kind = sorted(
        f"{k}: file {given[k].dtype} vs model {model_sd[k].dtype}"
        for k in given
        if k in model_sd and not optional(k)  # counters (num_batches_tracked) do not affect inference
        and (given[k].is_floating_point() != model_sd[k].is_floating_point() or given[k].is_complex())
    )
    if missing or unexpected or mismatched or wrong_kind or derived:
        parts = [f"{source} does not match the model ({type(model).__name__})"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched),
                            ("dtype mismatch", wrong_kind), ("derived-buffer mismatch", derived)):
            if keys:
                shown = keys[:_MAX_KEYS_LISTED] + ([f"... and {len(keys) - _MAX_KEYS_LISTED} more"]
                                                   if len(keys) > _MAX_KEYS_LISTED else [])
                parts.append(f"{len(keys)} {title} key(s):\n  " + "\n  ".join(shown))
        raise CheckpointError("\n".join(parts))
    to_load = {k: v for k, v in given.items() if k in model_sd}
    for k in model_sd:
        if k not in to_load:  # an absent optional counter keeps its current value
            to_load[k] = model_sd[k]
    model.load_state_dict(to_load, strict=True)


def _check_normalisation(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """A file that stores ``pixel_mean`` / ``pixel_std`` (official ones do not: non-persistent
    buffers, spec §5.1) must agree with the model's configured input normalisation:
    weights trained on another one (e.g. BGR order) would load and segment wrongly.

    Raises:
        CheckpointError: naming the key, both values and where to set the configuration's.
    """
    buffers = dict(model.named_buffers())
    for key in ("pixel_mean", "pixel_std"):
        if key not in state_dict or key not in buffers:
            continue
        stored = state_dict[key].detach().double().flatten()
        configured = buffers[key].detach().double().flatten().cpu()
        if stored.numel() != configured.numel() or not torch.allclose(stored, configured, rtol=1e-4, atol=1e-3):
            raise CheckpointError(
                f"{source}: {key} {[round(v, 3) for v in stored.tolist()]} differs from the model configuration's "
                f"{[round(v, 3) for v in configured.tolist()]} (input.{key} in the model YAML): the weights expect "
                f"another input normalisation, e.g. BGR order; set it in a model YAML passed with --model")
    for key in ("motion.flow_img_norm_mean", "motion.flow_img_norm_std"):
        if key in state_dict:
            log.warning("%s: %s is ignored; the motion module normalises with motion.image_mean of the model "
                        "configuration", source, key)


def load_checkpoint(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load weights from ``path`` into ``model`` (strict, see :func:`load_state_dict_strict`).

    Returns:
        The file's ``meta`` dict for this project's format, else an empty dict.

    Raises:
        CheckpointError: as :func:`read_checkpoint` and :func:`load_state_dict_strict`.
    """
    ckpt = read_checkpoint(path)
    load_state_dict_strict(model, ckpt.state_dict, source=str(path))
    return ckpt.meta


def load_init_checkpoint(model: nn.Module, init: CheckpointFile, source: str | Path) -> None:
    """Load a training run's starting file (``--init-checkpoint``) into ``model``, strictly but
    for the motion module: a file without ``motion.*`` keys (a per-frame Mask2Former checkpoint,
    what the official MPVSS training starts from, spec 3.3) leaves the model's own (logged).

    Args:
        model: an :class:`~mpvss_ros.nn.mpvss.MPVSS` of the file's configuration.
        init: the file, read by :func:`read_checkpoint`.
        source: its path, for messages.

    Raises:
        CheckpointError: as :func:`load_state_dict_strict` (any other key missing, unexpected or
            mis-shaped).
    """
    if not holds_part(init.state_dict, MOTION_PREFIX):
        log.info("%s holds no motion module: the model's keeps its initialisation", source)
    load_state_dict_strict(model, init.state_dict, source=str(source), absent_part=MOTION_PREFIX)


def read_model_config(path: str | Path) -> dict[str, Any] | None:
    """The ``model_config`` dict stored in a file of this project's format, or None.

    Raises:
        CheckpointError: as :func:`read_checkpoint`.
    """
    return read_checkpoint(path).model_config


def save_checkpoint(path: str | Path, model: nn.Module, model_config: dict[str, Any],
                    meta: dict[str, Any] | None = None, half: bool = False) -> None:
    """Write this project's checkpoint format (loadable with ``weights_only=True``).

    Args:
        path: output file (parent directories are created).
        model: the module whose ``state_dict`` is saved.
        model_config: ``ModelConfig.to_dict()`` of the model.
        meta: JSON-like provenance (training data, steps, metrics, ...), plain Python types.
        half: store floating-point tensors as float16 (half the size; loading copies them back
            into the model's float32 parameters). ``meta["stored_dtype"]`` records it.

    Raises:
        ValueError: the checkpoint would not load back with ``weights_only=True`` (e.g. numpy
            scalars in ``model_config`` or ``meta``); nothing is written.
        OSError: the parent folder cannot be made or the file cannot be written (the temporary
            file beside it is then removed; an earlier file at ``path`` stays as it was).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def prepare(t: Tensor) -> Tensor:
        t = t.detach().cpu().contiguous()
        return t.half() if half and t.is_floating_point() else t

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model_config,
        "state_dict": {k: prepare(v) for k, v in model.state_dict().items()},
        "meta": {**(meta or {}), "stored_dtype": "float16" if half else "float32"},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:  # what read_checkpoint cannot read back (e.g. numpy scalars in meta) is refused before writing
        torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"checkpoint for {path} would not load with weights_only=True: "
                         f"{_weights_only_cause(exc)} (use plain Python types in model_config and meta)") from exc
    write_atomic(path, buf.getbuffer())
