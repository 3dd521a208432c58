"""The pair table: score any key-frame schedule of a clip exactly, without running the model again.

A clip's segmentation under any schedule is fixed by which key frame each frame is propagated
from: with the propagators of :mod:`mpvss_ros.propagation` a non-key frame's labels depend only on
its key frame and on the clip's frames from the key frame to itself (direct query flow and optical
flow are estimated between the key frame and the current frame, chained flow through every frame
in between, in order; copy holds the key frame's labels). So one pass that propagates every key frame
``k`` to every frame ``k .. k + horizon`` and keeps the confusion matrix of each pair gives the
confusion matrix, hence the mIoU, of every schedule whose key frames are at most ``horizon``
frames apart: the sum of its pairs' matrices. That makes it cheap to compare scheduling policies
at equal key-frame counts, or to search for the best schedule in hindsight (how much any policy
could gain; :func:`local_search`).

The reference of a pair is the frame's ground-truth label map (``reference="labels"``) or, on an
unlabelled clip, the frame's own per-frame prediction (``reference="per_frame"``: agreement with
what segmenting every frame would give; per-frame segmentation then scores 100).

Video consistency (VC_8 / VC_16) depends on consecutive frames' labels, not on pairs, and is not
part of the table; :func:`~mpvss_ros.evaluation.study.evaluate_sequence` measures it.
"""

from __future__ import annotations

import io
import math
import operator
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from ..model_loader import LoadedModel
from ..paths import write_atomic
from ..propagation import Propagator, build_propagator
from ..scheduling import FixedIntervalScheduler
from ..segmenter import VideoSegmenter
from ..values import is_integer, shown
from .metrics import ConfusionMatrix

__all__ = ["PairTable", "build_pair_table", "local_search"]

REFERENCES = ("labels", "per_frame")


@dataclass
class PairTable:
    """Confusion matrices of every (key frame, frame) pair of a clip up to ``horizon`` apart.

    Attributes:
        conf: (T, horizon + 1, K, K) int64; ``conf[k, d]`` is the confusion matrix
            (``mat[reference, prediction]``, as :class:`ConfusionMatrix`) of frame ``k + d``
            propagated from key frame ``k`` (all zeros where ``k + d >= T``).
        propagator: the propagator's name.
        reference: ``labels`` or ``per_frame`` (module docstring).
        class_names: K names, strings without NUL characters.

    Raises:
        ValueError: ``conf`` not of that shape, names not K strings without NUL, an unknown
            ``reference``.
    """

    conf: np.ndarray
    propagator: str
    reference: str
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.conf.ndim != 4 or self.conf.shape[2] != self.conf.shape[3] or self.conf.shape[1] < 1:
            raise ValueError(f"conf must be (T, horizon + 1, K, K), got {self.conf.shape}")
        if len(self.class_names) != self.conf.shape[2]:
            raise ValueError(f"{len(self.class_names)} class names for {self.conf.shape[2]} classes")
        if not all(isinstance(n, str) and "\0" not in n for n in self.class_names):
            raise ValueError(f"class names must be strings without NUL characters (a saved table would lose "
                             f"trailing ones), got {self.class_names}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")

    @property
    def frames(self) -> int:
        """T, the clip's length in frames."""
        return self.conf.shape[0]

    @property
    def horizon(self) -> int:
        """The longest key-frame distance the table holds (frames)."""
        return self.conf.shape[1] - 1

    def confusion(self, key_frames: Sequence[int]) -> ConfusionMatrix:
        """The clip's confusion matrix when exactly ``key_frames`` are key frames.

        Raises:
            ValueError: an index that is no integer (2.7 is not frame 2) or is outside ``0..T-1``,
                frame 0 not a key frame, or a frame further than ``horizon`` from its key frame.
        """
        keys = _frame_indices(key_frames)
        if keys and keys[0] < 0:
            raise ValueError(f"key frame {shown(keys[0])} is outside the clip's {self.frames} frames")
        if not keys or keys[0] != 0:
            raise ValueError("frame 0 must be a key frame")
        if keys[-1] >= self.frames:
            raise ValueError(f"key frame {shown(keys[-1])} is outside the clip's {self.frames} frames")
        ends = keys[1:] + [self.frames]
        if max(e - k for k, e in zip(keys, ends)) - 1 > self.horizon:
            raise ValueError(f"a frame is more than the table's horizon ({self.horizon}) from its key frame")
        out = ConfusionMatrix(len(self.class_names))
        for k, e in zip(keys, ends):
            out.mat += self.conf[k, : e - k].sum(axis=0)
        return out

    def score(self, key_frames: Sequence[int]) -> dict[str, Any]:
        """:meth:`ConfusionMatrix.summary` (mIoU, fwIoU, pACC, ... in percent) of a schedule,
        plus ``key_frames`` (the count)."""
        out = self.confusion(key_frames).summary(self.class_names)
        out["key_frames"] = len(_frame_indices(key_frames))
        return out

    def save(self, path: str | Path) -> None:
        """Write the table as a compressed ``.npz`` at exactly ``path`` (numpy would append
        ``.npz`` to another suffix), through a temporary file in the same folder
        (:func:`~mpvss_ros.paths.write_atomic`), so an interrupted write leaves no half-written
        table behind and an earlier table at ``path`` stays whole.

        Raises:
            OSError: the folder cannot be written.
        """
        buf = io.BytesIO()
        np.savez_compressed(buf, conf=self.conf, propagator=self.propagator, reference=self.reference,
                            class_names=np.array(self.class_names))
        write_atomic(path, buf.getbuffer())

    @classmethod
    def load(cls, path: str | Path) -> PairTable:
        """Read a table written by :meth:`save` (no pickled objects are loaded).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not a pair table: not a zip, truncated or damaged, arrays missing or of
                the wrong kind; the message names the file.
        """
        try:
            z = np.load(Path(path), allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            with z:
                missing = {"conf", "propagator", "reference", "class_names"} - set(z.files)
                if missing:
                    raise ValueError(f"missing {sorted(missing)}")
                conf = z["conf"]
                if conf.dtype.kind not in "iu":
                    raise ValueError(f"conf holds {conf.dtype}, not integers")
                return cls(conf.astype(np.int64), str(z["propagator"]), str(z["reference"]),
                           [str(n) for n in z["class_names"].reshape(-1)])
        except FileNotFoundError:
            raise
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path} is not a pair table: {exc or type(exc).__name__}") from None


def _frame_indices(key_frames: Sequence[int]) -> list[int]:
    """Sorted distinct frame indices; Python or numpy integers only.

    Raises:
        ValueError: an entry that is no integer (a float, a bool, a string).
    """
    out = set()
    for k in key_frames:
        if isinstance(k, (bool, np.bool_)) or not hasattr(type(k), "__index__"):
            raise ValueError(f"key frames must be integer frame indices, got {shown(k)}")
        out.add(operator.index(k))
    return sorted(out)


def build_pair_table(loaded: LoadedModel, images: Sequence[np.ndarray], propagator: str | Propagator,
                     labels: Sequence[np.ndarray] | None = None, horizon: int = 20, fps: float = 15.0,
                     backend: Any = None, optical_flow_preset: str = "fast", optical_flow_scale: float = 0.5,
                     progress: bool = False, chain_flow: bool = True) -> PairTable:
    """Propagate every frame of a clip, as a key frame, to the ``horizon`` frames after it.

    Runs the segmentor T times and the propagator about T x horizon times (the val clip, 101
    frames, horizon 20: about a minute per propagator on 2 CPU threads).

    Args:
        loaded: the model; ``backend`` (an inference backend of :mod:`mpvss_ros.runtime`) runs
            it instead when given.
        images: T (H, W, 3) uint8 RGB frames in time order.
        propagator: a name of :data:`~mpvss_ros.propagation.PROPAGATORS`, with
            ``optical_flow_preset`` / ``optical_flow_scale`` for ``optical_flow`` and
            ``chain_flow`` for both flow propagators (:func:`~mpvss_ros.propagation.build_propagator`);
            or a ready :class:`~mpvss_ros.propagation.Propagator` (a variant under study, used for
            every key frame in turn, last key frame first; the table takes its name).
        labels: T (H, W) integer label maps (values >= K ignored), or None to score against the
            model's own per-frame labels (``reference="per_frame"``).
        horizon: the longest key-frame distance kept (frames, >= 1).
        fps: frame rate of the stamps pushed with the frames (frames/s).

    Raises:
        ValueError: no frames, ``horizon < 1``, or a label count other than the frame count.
    """
    if not images:
        raise ValueError("no frames")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} label maps for {len(images)} frames")
    cfg = loaded.config
    model = backend if backend is not None else loaded.model
    prop = (build_propagator(propagator, model, optical_flow_preset, optical_flow_scale, chain_flow)
            if isinstance(propagator, str) else propagator)
    t_max, k_cls = len(images), cfg.num_classes
    conf = np.zeros((t_max, horizon + 1, k_cls, k_cls), dtype=np.int64)
    own: dict[int, np.ndarray] = {}  # per-frame labels of the key frames still within reach
    # Last key frame first, so that on an unlabelled clip every later frame's own per-frame
    # labels (the reference) are known when a key frame is propagated onto it.
    for k in tqdm(range(t_max - 1, -1, -1), disable=not progress, desc=f"pair table {prop.name}"):
        segmenter = VideoSegmenter(model, prop, FixedIntervalScheduler(horizon + 1, max_gap_s=math.inf),
                                   device=loaded.device)
        for t in range(k, min(t_max, k + horizon + 1)):
            result = segmenter.push(images[t], t / fps)
            if t == k:
                own[k] = result.labels
            m = ConfusionMatrix(k_cls)
            m.update(result.labels, labels[t] if labels is not None else own[t])
            conf[k, t - k] = m.mat
        own.pop(k + horizon, None)  # no earlier key frame reaches it
    return PairTable(conf, prop.name, "labels" if labels is not None else "per_frame", list(cfg.class_names))


def local_search(table: PairTable, key_frames: Sequence[int], max_gap: int | None = None,
                 moves: Sequence[int] = (-2, -1, 1, 2)) -> tuple[list[int], float]:
    """Hindsight bound: move single key frames while the table's mIoU improves.

    Starting from ``key_frames`` (frame 0 stays), each pass tries every key frame shifted by each
    of ``moves``, keeping the order of the key frames and gaps of at most ``max_gap`` frames
    (default and most: the table's horizon + 1; from a start with a wider gap only a move that brings
    every gap within it is taken, so the start may come back unchanged), and accepts any move that
    raises the mIoU, until a pass finds none. The count of key frames never changes. It uses the reference labels, so it
    says how much a schedule *could* gain on this clip, not what a causal policy can.

    Returns:
        (key frames, mIoU in percent).

    Raises:
        ValueError: ``max_gap`` neither None nor an integer >= 1, a move that is no integer, or
            ``key_frames`` refused by :meth:`PairTable.confusion`.
    """
    if max_gap is not None and not (is_integer(max_gap) and max_gap >= 1):
        raise ValueError(f"max_gap must be None or an integer >= 1 (frames), got {shown(max_gap)}")
    if not all(is_integer(m) for m in moves):
        raise ValueError(f"moves must be integers (frames), got {shown(moves)}")
    moves = [operator.index(m) for m in moves]  # Python ints: a numpy move would wrap past int64
    max_gap = table.horizon + 1 if max_gap is None else min(max_gap, table.horizon + 1)
    keys = _frame_indices(key_frames)
    best = table.confusion(keys).miou()
    improved = True
    while improved:
        improved = False
        for i in range(1, len(keys)):
            for move in moves:
                cand = keys.copy()
                cand[i] += move
                nxt = cand[i + 1] if i + 1 < len(cand) else table.frames
                if not cand[i - 1] < cand[i] < nxt:
                    continue
                if max(np.diff(cand + [table.frames])) > max_gap:
                    continue
                value = table.confusion(cand).miou()
                if value > best + 1e-12:
                    best, keys, improved = value, cand, True
    return keys, 100.0 * best
