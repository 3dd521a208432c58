"""Everything the segmentation node does, without ROS: the node (:mod:`mpvss_ros.ros.node`) is a
thin rclpy shell around these classes.

* :class:`LatestSlot`: a thread-safe single-item mailbox between the subscription callback and
  the worker. ``put`` never blocks and replaces an unprocessed message (counted as dropped), so
  the node always segments the newest frame and never queues stale ones.
* :class:`SegmentationCore`: one incoming image message -> output messages. Per message, in
  order: the enable switch (disabled: counted and dropped, no inference), a pending reset,
  the age check (header stamp against the node clock, ``max_frame_age_s``; stale -> dropped),
  decoding (:mod:`mpvss_ros.ros.conversions`; a bad encoding, a corrupt JPEG, a 0x0 image or
  a too small ``step`` -> skipped and counted, never raised), a key frame when the input stamps
  had a gap of more than ``max_gap_s`` since the last segmented frame (between received
  messages, so a node slower than its camera is no gap), the engine
  (:class:`~mpvss_ros.segmenter.VideoSegmenter`; its scheduler forces a key frame on
  resolution changes and stamps going backwards), then the output messages, each carrying the
  input header. Counters and rolling statistics feed :meth:`SegmentationCore.diagnostic_status`.
* :class:`Worker`: the thread that takes from the slot, runs the core and publishes.

Message classes come in a :class:`~mpvss_ros.ros.conversions.MessageTypes`, so the same code
runs on rclpy messages (the node) and on rosbags messages (tests, bag processing).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..config import default_class_names
from ..model_loader import LoadedModel
from ..scheduling import StampGaps
from ..segmenter import FrameError, Letterbox, VideoSegmenter
from .parameters import NodeConfig, palette_to_rgb

__all__ = [
    "LatestSlot",
    "OutputDemand",
    "DiagnosticSummary",
    "SegmentationCore",
    "Worker",
    "StartupError",
    "build_segmenter",
    "build_scheduler",
    "build_propagator_for",
    "SCHEDULE_PARAMETERS",
    "PROPAGATION_PARAMETERS",
    "load_configured_model",
    "configure_threads",
    "FORCED_KEY_FRAME_REASONS",
    "OK",
    "WARN",
    "ERROR",
]

#: Diagnostic levels, the values of ``diagnostic_msgs/DiagnosticStatus`` OK/WARN/ERROR.
OK, WARN, ERROR = 0, 1, 2
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}

#: Share of the frames handled in the diagnostics window that may fail (decode, frame, engine)
#: before ``/diagnostics`` says WARN: a corrupt JPEG now and then stays OK; a backend that fails on
#: every non-key frame (half the frames, the others key frames after each reset) does not.
FAILURE_WARN_SHARE = 0.1


def failures_warrant_warning(failed: float, handled: float) -> bool:
    """The rule of ``/diagnostics`` and of the offline tools' closing warning: at least two
    failures (one corrupt frame on a slow node is no trend) and more than
    :data:`FAILURE_WARN_SHARE` of the ``handled`` frames."""
    return failed >= 2 and failed > FAILURE_WARN_SHARE * handled


#: Seconds between two warnings that the input's frame_id is empty (the first frame warns at once):
#: a camera without a frame_id sends every frame so, and the outputs carry it as given.
EMPTY_FRAME_ID_LOG_PERIOD_S = 60.0

#: Key-frame reasons that the schedule did not choose (see :mod:`mpvss_ros.scheduling`).
FORCED_KEY_FRAME_REASONS = ("first", "reset", "resolution_change", "time_backwards", "time_gap",
                            "canvas_change", "frame_id_change", "non_finite")

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Mailbox
# --------------------------------------------------------------------------------------------


class LatestSlot:
    """A single-item mailbox: the newest item wins.

    ``put`` stores an item and returns at once; an item not yet taken is replaced and counted in
    :attr:`replaced`. ``take`` blocks until an item is there (or the timeout passes, or the slot
    is closed) and empties the slot.

    Args:
        on_put: called (outside the lock) with the item on every put, before the item is stored,
            so a ``take`` never returns an item it has not seen (``core.note_received`` notes its
            stamp's time gap before the worker can segment it).
        on_replaced: called (outside the lock) when a put replaced an untaken item, e.g.
            ``core.note_replaced``.
        clock: seconds, for the time each item was put (:meth:`take_timed`).
    """

    def __init__(self, on_put: Callable[[Any], None] | None = None,
                 on_replaced: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._clock = clock
        self._item: Any = None
        self._put_time = math.nan
        self._full = False
        self._closed = False
        self._on_put = on_put
        self._on_replaced = on_replaced
        self.puts = 0
        self.replaced = 0
        self.taken = 0

    def put(self, item: Any) -> bool:
        """Store ``item`` (never blocks). Returns True when it replaced an untaken item."""
        t = self._clock()
        if self._on_put is not None:
            self._on_put(item)
        with self._cond:
            replaced = self._full
            self._item, self._put_time = item, t
            self._full = True
            self.puts += 1
            if replaced:
                self.replaced += 1
            self._cond.notify()
        if replaced and self._on_replaced is not None:
            self._on_replaced()
        return replaced

    def take(self, timeout: float | None = None) -> Any:
        """The item, removed from the slot; None after ``timeout`` seconds or once closed."""
        taken = self.take_timed(timeout)
        return None if taken is None else taken[0]

    def take_timed(self, timeout: float | None = None) -> tuple[Any, float] | None:
        """As :meth:`take`, with the time the item was put (seconds of ``clock``)."""
        with self._cond:
            self._cond.wait_for(lambda: self._full or self._closed, timeout)
            if not self._full:
                return None
            item, t, self._item, self._full = self._item, self._put_time, None, False
            self.taken += 1
            return item, t

    def close(self) -> None:
        """Wake every ``take``; later takes return a remaining item or None without waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return int(self._full)


# --------------------------------------------------------------------------------------------
# Model and engine set-up
# --------------------------------------------------------------------------------------------


class StartupError(RuntimeError):
    """The node cannot start (bad model, missing or corrupt weights, unusable device).

    ``str(exc)`` is one line, for a single fatal log line.
    """


def _one_line(text: str, limit: int = 600) -> str:
    line = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _inference_device(config: NodeConfig) -> str:
    """The ``device`` parameter with ``auto`` resolved for the configured backend and precision:
    the GPU when they can run there, else the CPU (:func:`~mpvss_ros.model_loader.resolve_device`)."""
    from ..model_loader import resolve_device

    return resolve_device(config.device, config.backend, config.precision)


def load_configured_model(config: NodeConfig) -> LoadedModel:
    """Load the model the parameters name (``model`` '' = from the weights, ``weights`` '' = default),
    or with ``onnx_dir`` its export folder's contract (no PyTorch model).

    Raises:
        StartupError: one line naming the problem (unknown model or bad config file, weights
            missing, corrupt or not matching, unusable device, unsupported backend).
    """
    from ..checkpoints import CheckpointError
    from ..config import ConfigError
    from ..model_loader import load_exported, load_model

    if config.onnx_dir:  # the export folder's contract instead of a model (validated: not torch)
        try:
            return load_exported(config.onnx_dir, motion_optional=config.propagator != "query_flow")
        except (ValueError, OSError, ConfigError) as exc:
            raise StartupError(_one_line(f"cannot use onnx_dir '{config.onnx_dir}': {exc}")) from None
    what = f"model '{config.model}'" if config.model else "the model"  # '': the weights file's own
    try:  # the torch backend runs the model itself; the others only export it, on the CPU
        # weights without a motion module (a per-frame Mask2Former checkpoint) load for a node that
        # starts with optical flow or copy; switching it to query_flow later is then refused
        return load_model(config.model or None, config.weights or None,
                          _inference_device(config) if config.backend == "torch" else "cpu",
                          motion_optional=config.propagator != "query_flow")
    except CheckpointError as exc:
        raise StartupError(_one_line(f"cannot load weights: {exc}")) from None
    except ConfigError as exc:
        raise StartupError(_one_line(f"cannot load {what}: {exc}")) from None
    except (ValueError, OSError, RuntimeError) as exc:
        raise StartupError(_one_line(f"cannot load {what} on {config.device}: {type(exc).__name__}: {exc}")) from None


_torch_default_threads: int | None = None  # torch's own thread count, before the first configure


def configure_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when ``threads > 0``; 0 gives torch's default back,
    also after an earlier configure (a lifecycle re-configure) set another count."""
    global _torch_default_threads
    import torch

    if _torch_default_threads is None:
        _torch_default_threads = torch.get_num_threads()
    torch.set_num_threads(threads if threads > 0 else _torch_default_threads)


#: Parameters that decide the key-frame scheduler (:func:`build_scheduler`; ``max_gap_s`` is the
#: core's own, on received stamps).
SCHEDULE_PARAMETERS = ("schedule", "scene_threshold", "cut_threshold", "min_interval", "max_interval")
#: Parameters that decide the propagator (:func:`build_propagator_for`).
PROPAGATION_PARAMETERS = ("propagator", "optical_flow_preset", "optical_flow_scale", "chain_flow")


def build_scheduler(config: NodeConfig) -> Any:
    """The key-frame scheduler the parameters describe (``adaptive`` or ``fixed:N``).

    Its own ``max_gap_s`` is off: it would measure gaps between the frames the node segments,
    which on a node slower than its camera are long however steady the input. ``max_gap_s`` is
    applied by :class:`SegmentationCore` to the stamps of all received messages instead
    (:class:`~mpvss_ros.scheduling.StampGaps`)."""
    from ..scheduling import AdaptiveScheduler, FixedIntervalScheduler

    if config.schedule == "adaptive":
        return AdaptiveScheduler(config.scene_threshold, config.min_interval, config.max_interval,
                                 max_gap_s=math.inf, cut_threshold=config.cut_threshold)
    # validated: fixed:N
    return FixedIntervalScheduler(int(config.schedule.split(":", 1)[1]), max_gap_s=math.inf)


def build_propagator_for(config: NodeConfig, model: Any) -> Any:
    """The propagator the parameters describe, running on ``model`` (a backend or the MPVSS model)."""
    from ..propagation import build_propagator

    return build_propagator(config.propagator, model, config.optical_flow_preset, config.optical_flow_scale,
                            config.chain_flow)


def build_segmenter(config: NodeConfig, loaded: LoadedModel) -> VideoSegmenter:
    """The :class:`VideoSegmenter` the parameters describe (propagator, schedule, device).

    ``loaded`` is handed over (:func:`load_configured_model` loads it for this): the torch backend
    runs ``loaded.model`` itself, and onnxruntime/TensorRT keep that module to export new sizes
    instead of a copy (:func:`~mpvss_ros.runtime.load_backend` ``copy_model=False``), so its
    weights are held once; nobody may change ``loaded.model`` in place afterwards.

    Raises:
        StartupError: one line, when a backend other than torch fp32 cannot be loaded (runtime
            missing, unusable device, export or engine build failed).
    """
    model: Any = loaded.model
    if config.backend != "torch" or config.precision != "fp32":
        from ..runtime import load_backend

        input_hw = None  # fixed-shape backends: prepare the expected camera's letterboxed size, else the canvas
        if config.image_size:
            input_hw = Letterbox.for_input(tuple(config.image_size), loaded.config.input).resized_hw
        try:  # BackendUnavailable: one line saying what is missing and which backend would work
            model = load_backend(config.backend, loaded, device=_inference_device(config), precision=config.precision,
                                 input_hw=input_hw, onnx_dir=config.onnx_dir or None, copy_model=False)
        except (ValueError, OSError, RuntimeError) as exc:
            raise StartupError(_one_line(f"backend '{config.backend}' ({config.precision}): {exc}")) from None
    return VideoSegmenter(model, build_propagator_for(config, model), build_scheduler(config), device=loaded.device)


def _class_palette(config: NodeConfig, loaded: LoadedModel, num_classes: int) -> Any:
    """(num_classes, 3) uint8 RGB: the ``palette`` parameter, else the model's, generated beyond.

    Raises:
        ValueError: more colours than classes.
    """
    from ..viz import make_palette

    if len(config.palette) > num_classes:
        raise ValueError(f"parameter 'palette': {len(config.palette)} colours for a model with "
                         f"{num_classes} classes")
    base = palette_to_rgb(config.palette) if config.palette else (loaded.config.palette or None)
    return make_palette(num_classes, base)


# --------------------------------------------------------------------------------------------
# Core
# --------------------------------------------------------------------------------------------


class OutputDemand(NamedTuple):
    """Which optional outputs someone wants now (the node: subscription count > 0)."""

    colored: bool = True
    overlay: bool = True
    class_masks: bool = True
    autoware_mask: bool = True


@dataclass
class DiagnosticSummary:
    """What ``/diagnostics`` shows: a level (:data:`OK`/:data:`WARN`/:data:`ERROR`), a one-line
    message and ``(key, value)`` strings."""

    level: int
    message: str
    values: list[tuple[str, str]] = field(default_factory=list)

    @property
    def level_name(self) -> str:
        """``OK``, ``WARN`` or ``ERROR``."""
        return LEVEL_NAMES[self.level]


def _rate(times: deque, now: float, window: float) -> float:
    """Events per second over the events inside ``(now - window, now]``."""
    recent = [t for t in times if now - t <= window]
    if len(recent) < 2:
        return 0.0
    span = recent[-1] - recent[0]
    return (len(recent) - 1) / span if span > 0 else 0.0


class SegmentationCore:
    """One image message in, the node's output messages out (see the module docstring).

    Args:
        config: validated node parameters.
        loaded: the model (:func:`load_configured_model`), handed over: kept for its configuration
            and provenance, its module run by the backend (see :func:`build_segmenter`; not
            copied, so don't change ``loaded.model`` in place).
        message_types: message classes (rclpy's in the node, rosbags' in tests).
        segmenter: the engine; default :func:`build_segmenter` from ``config``.
        clock: monotonic seconds for rates, latencies and the "no output" timer.
        logger: anything with ``warning``/``error``/``info`` taking one string (a
            ``logging.Logger`` or an rclpy logger); default this module's logger.
        window_s: length of the rolling window of the statistics (seconds).
        no_output_warn_s: WARN when no output was produced for this long while enabled (seconds
            of ``clock``).

    Raises:
        ValueError: ``autoware_class_ids`` does not map the model's classes
            (:func:`~mpvss_ros.ros.conversions.autoware_class_ids`).
        StartupError: as :func:`build_segmenter`, when no ``segmenter`` is given.

    Thread safety: :meth:`process` runs on one thread (the worker); the other methods may be
    called from any thread (subscription, services, diagnostics timer).
    """

    def __init__(self, config: NodeConfig, loaded: LoadedModel, message_types: Any, *,
                 segmenter: VideoSegmenter | None = None, clock: Callable[[], float] = time.monotonic,
                 logger: Any = None, window_s: float = 5.0, no_output_warn_s: float = 5.0) -> None:
        from . import conversions

        self._conv = conversions
        self.config = config
        self.loaded = loaded
        self.types = message_types
        self.segmenter = segmenter if segmenter is not None else build_segmenter(config, loaded)
        self.clock = clock
        self.log = logger if logger is not None else _log
        self.window_s = window_s
        self.no_output_warn_s = no_output_warn_s

        num_classes = int(self.segmenter.num_classes)
        self.palette = _class_palette(config, loaded, num_classes)
        names = list(loaded.config.class_names or [])
        self.class_names = names if len(names) == num_classes else default_class_names(num_classes)
        try:
            self.autoware_class_ids = conversions.autoware_class_ids(self.class_names, config.autoware_class_ids)
        except ValueError as exc:
            raise ValueError(f"parameter 'autoware_class_ids': {exc}") from None
        if config.publish_autoware_mask:
            known = conversions.AUTOWARE_CLASSES
            pairs = ", ".join(f"{n} -> {known[i] if i < len(known) else i}"
                              for n, i in zip(self.class_names, self.autoware_class_ids.tolist()))
            if not self.autoware_class_ids.any():
                self.log.warning(f"~/autoware_mask: every class maps to Autoware's UNKNOWN ({pairs}); set "
                                 "autoware_class_ids, one Autoware class ID per model class")
            else:
                self.log.info(f"~/autoware_mask classes: {pairs}")

        self._lock = threading.Lock()
        self._enabled = True
        self._resume_hint = ""
        self._reset_requested = False
        self._pending_engine: dict[str, Any] = {}  # "scheduler"/"propagator" from reconfigure, for the worker
        self._key_frame_stamp: Any = None  # the last output's key_frame_stamp (builtin_interfaces/Time)
        self._input_gaps = StampGaps()  # max_gap_s between received stamps (guarded by _lock)
        self.counters: Counter[str] = Counter({k: 0 for k in (
            "received", "processed", "published", "dropped_stale", "dropped_replaced",
            "dropped_disabled", "skipped_decode", "skipped_frame", "errors", "key_frames")})
        self.key_frame_reasons: Counter[str] = Counter()
        self._arrivals: deque[float] = deque(maxlen=4096)
        self._replaced: deque[float] = deque(maxlen=4096)
        self._stale: deque[float] = deque(maxlen=4096)
        self._outputs: deque[float] = deque(maxlen=4096)
        self._failures: deque[float] = deque(maxlen=4096)
        self._recent: deque[tuple[float, float, bool]] = deque(maxlen=200)  # (t, latency ms, key)
        self._last_problem = ""
        self._since = clock()  # start, or last enable: the "no output" timer's origin
        self._last_log: dict[str, tuple[float, int]] = {}
        self._label_info_frame_id: str | None = None
        if config.input_compressed and not conversions.STRICT_JPEG:
            self.log.warning("simplejpeg is not installed: JPEGs are decoded by OpenCV, which segments a JPEG "
                             "that lost scan data (grey or smeared blocks) instead of skipping it; "
                             "pip install simplejpeg")

    # -- control (any thread) ----------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether inference is on (:meth:`set_enabled`)."""
        return self._enabled

    def set_enabled(self, enabled: bool, resume_hint: str = "call ~/enable to resume") -> bool:
        """Switch inference on or off. Returns the previous state.

        Re-enabling resets the engine (the first frame after is a key frame, reason ``reset``).
        ``resume_hint`` ends /diagnostics' "disabled (...)" line while off (the lifecycle node's:
        activate it).
        """
        with self._lock:
            before = self._enabled
            self._enabled = bool(enabled)
            self._resume_hint = resume_hint
            if enabled and not before:
                self._reset_requested = True
                self._since = self.clock()
        return before

    def reset(self) -> None:
        """Make the next processed frame a key frame (scheduler and key-frame state reset)."""
        with self._lock:
            self._reset_requested = True

    def reconfigure(self, changes: dict[str, Any]) -> NodeConfig:
        """Apply parameter changes while the node runs (the node's on-set-parameters callback).

        The whole new configuration is checked first (:func:`~mpvss_ros.ros.parameters.reconfigure`)
        and the new scheduler, propagator or palette built; nothing changes when that raises.
        Then the configuration and palette take effect at once, and a scheduler or propagator
        whose settings changed (``describe()``) is installed by the worker before its next frame,
        which is then a key frame (reason ``reset``): the key frame's state belongs to the
        propagation that made it. A change that leaves both as they run (``max_gap_s``, the scene
        threshold under ``fixed:N``, a DIS setting under ``query_flow``) makes no key frame.

        Args:
            changes: parameter name -> value, names from
                :data:`~mpvss_ros.ros.parameters.DYNAMIC_PARAMETERS`.

        Returns:
            The new configuration.

        Raises:
            ValueError: a read-only or unknown name, or a value the parameter table refuses
                (naming the parameter); also a palette with more colours than classes.
        """
        from .parameters import reconfigure

        with self._lock:
            old = self.config
            new = reconfigure(old, changes)
            changed = {name for name in changes if getattr(new, name) != getattr(old, name)}
            # what runs, or will from the next frame: a change that leaves it the same (the scene
            # threshold under fixed:N, the DIS preset under query_flow) costs no key frame
            running = {"scheduler": self.segmenter.scheduler, "propagator": self.segmenter.propagator,
                       **self._pending_engine}
            built: dict[str, Any] = {}
            if changed & set(SCHEDULE_PARAMETERS):
                built["scheduler"] = build_scheduler(new)
            if changed & set(PROPAGATION_PARAMETERS):
                built["propagator"] = build_propagator_for(new, self.segmenter.model)
            installed = {"scheduler": self.segmenter.scheduler, "propagator": self.segmenter.propagator}
            palette = (_class_palette(new, self.loaded, int(self.segmenter.num_classes))
                       if "palette" in changed else self.palette)
            self.config, self.palette = new, palette
            for k, v in built.items():
                if v.describe() == running[k].describe():
                    continue
                if v.describe() == installed[k].describe():  # back to what runs before the worker
                    self._pending_engine.pop(k)  # installed the change in between: nothing to do
                else:
                    self._pending_engine[k] = v
        return new

    def note_received(self, msg: Any = None) -> None:
        """Count one arriving message (the slot's ``on_put`` hook) and note its stamp for the
        ``max_gap_s`` check (:meth:`process`)."""
        t = self.clock()
        with self._lock:
            self.counters["received"] += 1
            self._arrivals.append(t)
        if msg is not None:
            self._note_input_stamp(msg)

    def _note_input_stamp(self, msg: Any) -> None:
        """Mark a time gap when ``msg``'s stamp is more than ``max_gap_s`` after the previous
        received message's (a message without a usable stamp is left to :meth:`process`)."""
        try:
            stamp = self._conv.stamp_to_seconds(msg.header.stamp)
        except Exception:  # noqa: BLE001 - process() skips it and says why
            return
        with self._lock:
            self._input_gaps.note(stamp, self.config.max_gap_s)

    def note_replaced(self) -> None:
        """Count one message replaced in the slot before it was processed (``on_replaced``)."""
        t = self.clock()
        with self._lock:
            self.counters["dropped_replaced"] += 1
            self._replaced.append(t)

    def make_slot(self) -> LatestSlot:
        """A :class:`LatestSlot` whose puts and replacements are counted by this core."""
        return LatestSlot(on_put=self.note_received, on_replaced=self.note_replaced, clock=self.clock)

    def note_dropped_disabled(self) -> None:
        """Count one message dropped because segmentation stopped: taken or left in the slot as
        the worker stopped (deactivate, shutdown). :meth:`process` counts those that arrive while
        disabled; so every received message is counted once more, as processed, dropped or skipped."""
        with self._lock:
            self.counters["dropped_disabled"] += 1

    def record_published(self) -> None:
        """Count one frame whose outputs were published: the output rate, the "no output" timer
        and the share of failed frames count published frames (a frame whose publishing fails
        is one failure, not an output and a failure)."""
        t = self.clock()
        with self._lock:
            self.counters["published"] += 1
            self._outputs.append(t)

    def record_error(self, what: str, exc: BaseException) -> None:
        """Count and log an unexpected error (the worker's last resort)."""
        t = self.clock()
        with self._lock:
            self.counters["errors"] += 1
            self._failures.append(t)
            self._last_problem = f"{what}: {type(exc).__name__}: {exc}"
        detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
        self._log_throttled("error:" + what, "error", f"{what}: {type(exc).__name__}: {exc}\n{detail}")

    # -- per message (worker thread) ----------------------------------------------------------

    def process(self, msg: Any, now: float | None = None, want_colored: bool = True,
                want_overlay: bool = True, want_class_masks: bool = True, want_autoware_mask: bool = True,
                received_at: float | None = None) -> Any:
        """Segment one ``sensor_msgs/Image`` (or ``CompressedImage`` with ``input_compressed``).

        Args:
            msg: the image message.
            now: the node clock in seconds, for the age check; None skips it.
            want_colored, want_overlay, want_class_masks, want_autoware_mask: whether someone
                subscribes to the optional outputs (and-ed with the ``publish_*`` parameters).
            received_at: when the message was put in the slot (seconds of ``clock``;
                :meth:`LatestSlot.take_timed`), where the latency starts; its stamp was then
                noted by :meth:`note_received`. None: a message handed over directly, received
                now and noted here.

        Returns:
            :class:`~mpvss_ros.ros.conversions.OutputMessages` (every message with ``msg``'s
            header), or None when the message was dropped or skipped (counted, logged); a frame
            under way when inference is switched off (:meth:`set_enabled`) is dropped when it
            ends, counted as ``dropped_disabled``. Never raises.
        """
        t0 = self.clock()
        if received_at is None:
            self._note_input_stamp(msg)
        with self._lock:
            if not self._enabled:
                self.counters["dropped_disabled"] += 1
                return None
            reset, self._reset_requested = self._reset_requested, False
            engine, self._pending_engine = self._pending_engine, {}
            cfg, palette = self.config, self.palette  # one configuration per frame (reconfigure may run meanwhile)
            failure = None
            if engine:
                # under the lock: reconfigure compares a change with the running scheduler and
                # propagator, so a change undoing this one must see it installed, not pending
                try:
                    self.segmenter.replace(**engine)  # attribute swaps and a reset
                except Exception as exc:  # noqa: BLE001 - recorded below, outside the lock
                    failure = exc
        if reset and failure is None:
            try:
                self.segmenter.reset()
            except Exception as exc:  # noqa: BLE001 - the key frame is dropped all the same
                failure = exc
        if failure is not None:  # a scheduler's reset raised: this frame is not segmented
            self.record_error("resetting the engine failed", failure)
            return None
        try:
            header = msg.header
            stamp = self._conv.stamp_to_seconds(header.stamp)
            if cfg.max_frame_age_s > 0 and now is not None:
                age = now - stamp
                if age > cfg.max_frame_age_s:
                    with self._lock:
                        self.counters["dropped_stale"] += 1
                        self._stale.append(t0)
                    self._log_throttled("stale", "warning", (
                        f"dropping stale frame: stamp {stamp:.3f} s is {age:.3f} s old (max_frame_age_s "
                        f"{cfg.max_frame_age_s:g}); if the clocks differ (bag replay, "
                        f"use_sim_time) set max_frame_age_s:=0"))
                    return None
        except Exception as exc:  # noqa: BLE001 - a message without a usable header
            return self._skip("skipped_decode", "bad header", exc, t0)

        try:
            if cfg.input_compressed:
                rgb = self._conv.compressed_to_rgb(msg, cfg.max_image_pixels)
            else:
                rgb = self._conv.image_to_rgb(msg, cfg.max_image_pixels)
        except Exception as exc:  # noqa: BLE001 - ConversionError, or anything a broken message raises
            return self._skip("skipped_decode", "cannot decode image", exc, t0)

        masks = want_class_masks and cfg.publish_class_masks
        with self._lock:
            gap = self._input_gaps.take(stamp)
        try:
            if gap and not reset:  # consumed by this frame, segmented or not: the engine is reset either way
                self.segmenter.reset("time_gap")  # (after a requested reset or re-enable, reason ``reset``)
            self.segmenter.class_masks = masks
            result = self.segmenter.push(rgb, stamp, source=header.frame_id)
        except FrameError as exc:
            return self._skip("skipped_frame", "cannot segment frame", exc, t0)
        except Exception as exc:  # noqa: BLE001 - counted, logged, the node keeps running
            self.record_error("segmentation failed", exc)
            return None

        if result.key_frame_reason == "frame_id_change":  # another camera: its own key frame
            self._log_throttled("frame_id", "warning", (
                f"input frame_id is now {header.frame_id!r}: a key frame (one camera per input topic is "
                "expected; each change of frame_id makes one)"))
        if not header.frame_id:  # published as given (the input's exact header), but worth saying
            self._log_throttled("empty_frame_id", "warning", (
                "input frame_id is empty, and so is the outputs': consumers that place labels through TF "
                "and camera_info (Nav2's semantic layer, Autoware) cannot use them; set the camera "
                "driver's frame_id (its optical frame, REP 103)"), period_s=EMPTY_FRAME_ID_LOG_PERIOD_S)
        try:
            outputs = self._conv.build_outputs(
                self.types, header, result, rgb, palette, self.class_names,
                cfg.overlay_alpha,
                want_colored=want_colored and cfg.publish_colored,
                want_overlay=want_overlay and cfg.publish_overlay,
                want_class_masks=masks, previous_key_frame_stamp=self._key_frame_stamp,
                autoware_class_ids=(self.autoware_class_ids if want_autoware_mask and cfg.publish_autoware_mask
                                    else None))
        except Exception as exc:  # noqa: BLE001 - counted, logged, the node keeps running
            self.record_error("building output messages failed", exc)
            return None
        self._key_frame_stamp = outputs.info.key_frame_stamp  # kept even if dropped below: later frames carry it

        t1 = self.clock()
        with self._lock:
            if not self._enabled:  # ~/enable false (or deactivate) answered while this frame ran: not published
                self.counters["dropped_disabled"] += 1
                return None
            self.counters["processed"] += 1
            start = t0 if received_at is None else received_at
            self._recent.append((t1, (t1 - start) * 1e3, result.is_key_frame))
            if result.is_key_frame:
                self.counters["key_frames"] += 1
                self.key_frame_reasons[result.key_frame_reason or "unknown"] += 1
        return outputs

    def _skip(self, counter: str, what: str, exc: BaseException, t: float) -> None:
        with self._lock:
            self.counters[counter] += 1
            self._failures.append(t)
            self._last_problem = f"{what}: {exc}"
        self._log_throttled(counter, "warning", f"{what}, frame skipped: {exc}")

    def _log_throttled(self, key: str, level: str, text: str, period_s: float = 5.0) -> None:
        """Log the first occurrence of ``key`` and then at most once per ``period_s`` (seconds),
        at ``level`` "error" or "warning"."""
        t = self.clock()
        with self._lock:
            last, suppressed = self._last_log.get(key, (-math.inf, 0))
            if t - last < period_s:
                self._last_log[key] = (last, suppressed + 1)
                return
            self._last_log[key] = (t, 0)
        if suppressed:
            text += f" ({suppressed} more like this since the last report)"
        # One call per severity, each on its own line: rclpy's logger binds a call site (function,
        # file, line, bytecode offset) to the severity of its first call and raises ValueError
        # for another (rclpy/impl/rcutils_logger.py, RcutilsLogger.log, Humble and Jazzy).
        if level == "error":
            self.log.error(text)
        else:
            self.log.warning(text)

    # -- LabelInfo ----------------------------------------------------------------------------

    def label_info(self, header: Any) -> Any:
        """A ``vision_msgs/LabelInfo`` for this model's classes with ``header``; remembers its
        frame_id for :meth:`label_info_update`."""
        with self._lock:
            self._label_info_frame_id = header.frame_id
        return self._conv.make_label_info(self.types.label_info, self.types.vision_class, header,
                                          self.class_names)

    def label_info_update(self, header: Any, key_frame: bool = False) -> Any:
        """A LabelInfo with ``header`` to publish now: on key frames (vision_msgs' advice is to
        publish it along with the labels, as camera_info, besides latching it; key frames keep
        that rare), when none was made yet, or when the input's frame_id changed; else None."""
        with self._lock:
            same = self._label_info_frame_id == header.frame_id
        return None if same and not key_frame else self.label_info(header)

    # -- diagnostics --------------------------------------------------------------------------

    def stats(self, now: float | None = None) -> dict[str, float]:
        """Rolling statistics over the last ``window_s`` seconds.

        Returns:
            ``input_rate_hz``, ``output_rate_hz`` (published frames), ``latency_median_ms``
            (receive-to-outputs time of the processed frames: waiting in the slot, decoding,
            segmenting, building the messages; NaN when none), ``key_frame_ratio`` (of the last 200
            processed frames, NaN when none), ``drop_ratio`` ((stale + replaced) / received in
            the window), ``failures`` and ``outputs`` in the window, ``since_output_s``.
        """
        now = self.clock() if now is None else now
        with self._lock:
            return self._stats_locked(now)

    def _stats_locked(self, now: float) -> dict[str, float]:
        """:meth:`stats` at ``now``; the caller holds the lock."""
        w = self.window_s
        arrivals = sum(1 for t in self._arrivals if now - t <= w)
        dropped = sum(1 for t in self._replaced if now - t <= w) + sum(1 for t in self._stale if now - t <= w)
        recent = self._recent
        last_output = self._outputs[-1] if self._outputs else None
        return {
            "input_rate_hz": _rate(self._arrivals, now, w),
            "output_rate_hz": _rate(self._outputs, now, w),
            "latency_median_ms": statistics.median([r[1] for r in recent if now - r[0] <= w] or [math.nan]),
            "key_frame_ratio": (sum(r[2] for r in recent) / len(recent)) if recent else math.nan,
            "drop_ratio": min(1.0, dropped / arrivals) if arrivals else 0.0,
            "failures": float(sum(1 for t in self._failures if now - t <= w)),
            "outputs": float(sum(1 for t in self._outputs if now - t <= w)),
            "arrivals": float(arrivals),
            "since_output_s": now - max(last_output if last_output is not None else -math.inf, self._since),
        }

    def diagnostic_status(self, now: float | None = None) -> DiagnosticSummary:
        """Level, message and values for ``/diagnostics``.

        Levels: ERROR when, in the last ``window_s``, frames failed (decode, frame, engine) and
        none succeeded; WARN when at least two and more than :data:`FAILURE_WARN_SHARE` of them
        failed (a backend failing on every non-key frame alternates failures with key frames),
        when no output was produced for ``no_output_warn_s`` while enabled, or when more than
        half the received frames were dropped (stale or replaced); OK otherwise (and while
        disabled).
        """
        now = self.clock() if now is None else now
        with self._lock:  # one section: the rates, counters and last problem of the same moment
            s = self._stats_locked(now)
            c = dict(self.counters)
            reasons = dict(self.key_frame_reasons)
            enabled = self._enabled
            resume_hint = self._resume_hint
            problem = self._last_problem

        def fmt(x: float, digits: int = 1) -> str:
            return "n/a" if math.isnan(x) else f"{x:.{digits}f}"

        values = [
            ("enabled", str(enabled).lower()),
            ("model", self.loaded.config.name),
            ("trained", str(self.loaded.trained).lower()),
            ("device", str(self.loaded.device)),
            ("propagator", self.config.propagator),
            ("chain flow", str(self.config.chain_flow).lower()),
            ("schedule", self.config.schedule),
            ("input rate (Hz)", fmt(s["input_rate_hz"])),
            ("output rate (Hz)", fmt(s["output_rate_hz"])),
            ("latency median (ms)", fmt(s["latency_median_ms"])),
            ("key-frame ratio", fmt(s["key_frame_ratio"], 3)),
            ("drop ratio", fmt(s["drop_ratio"], 3)),
        ]
        values += [(name.replace("_", " "), str(c[name])) for name in (
            "received", "processed", "published", "dropped_stale", "dropped_replaced", "dropped_disabled",
            "skipped_decode", "skipped_frame", "errors", "key_frames")]
        values += [(f"key frames ({reason})", str(n)) for reason, n in sorted(reasons.items())]
        values.append(("forced key frames", str(sum(n for r, n in reasons.items() if r in FORCED_KEY_FRAME_REASONS))))
        if problem:
            values.append(("last problem", problem))

        if not enabled:
            return DiagnosticSummary(OK, f"disabled ({resume_hint})", values)
        if s["failures"] > 0 and s["outputs"] == 0:
            return DiagnosticSummary(ERROR, f"every frame failed in the last {self.window_s:g} s: {problem}", values)
        warnings = []
        if s["since_output_s"] > self.no_output_warn_s:
            why = "no input received" if s["arrivals"] == 0 else "frames arrive but none was segmented"
            warnings.append(f"no output for {s['since_output_s']:.1f} s ({why})")
        done = s["failures"] + s["outputs"]
        # two at least: on a slow node (< 10 frames in the window) one corrupt frame is no trend
        if failures_warrant_warning(s["failures"], done):
            warnings.append(f"{s['failures']:.0f} of {done:.0f} frames failed in the last {self.window_s:g} s: {problem}")
        if s["drop_ratio"] > 0.5:
            warnings.append(f"dropping {100 * s['drop_ratio']:.0f}% of input frames "
                            f"({c['dropped_stale']} stale, {c['dropped_replaced']} replaced in total)")
        if warnings:
            return DiagnosticSummary(WARN, "; ".join(warnings), values)
        if s["outputs"] == 0:  # just started (a longer silence is a warning above)
            return DiagnosticSummary(OK, "waiting for frames", values)
        if s["outputs"] == 1:  # a rate needs two outputs in the window: not "0.0 Hz"
            return DiagnosticSummary(OK, f"segmenting (1 frame in the last {self.window_s:g} s)", values)
        return DiagnosticSummary(OK, f"segmenting at {s['output_rate_hz']:.1f} Hz", values)


# --------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------


class Worker:
    """The inference thread: take the newest message, run the core, publish.

    Args:
        slot: where the subscription puts messages (best made by ``core.make_slot()``).
        core: the :class:`SegmentationCore`.
        publish: ``publish(outputs, label_info)``; ``label_info`` is a LabelInfo message to
            publish too (first frame, or the input's frame_id changed), else None.
        now: the node clock in seconds (for the age check), or None to skip the check.
        demand: which optional outputs are wanted now (:class:`OutputDemand`).
        poll_s: how often the thread checks for :meth:`stop` while idle (seconds).
        shut_down: True once the middleware is shut down (rclpy's SIGINT/SIGTERM handler ends
            its context before the node stops this thread): an error then (a publisher, a
            subscription count, the clock of the dead context) ends the thread quietly instead
            of being counted and logged with a traceback.
    """

    def __init__(self, slot: LatestSlot, core: SegmentationCore, publish: Callable[[Any, Any], None],
                 now: Callable[[], float | None] = lambda: None,
                 demand: Callable[[], OutputDemand] = OutputDemand, poll_s: float = 0.1,
                 name: str = "mpvss-worker", shut_down: Callable[[], bool] = lambda: False) -> None:
        self.slot = slot
        self.core = core
        self.publish = publish
        self.now = now
        self.demand = demand
        self.poll_s = poll_s
        self.shut_down = shut_down
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Worker:
        """Start the thread (once: a second call raises ``RuntimeError``, as ``Thread.start``);
        returns this worker."""
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the thread is running."""
        return self._thread.is_alive()

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Ask the thread to finish (after the frame in hand, whose outputs are then not
        published) and wait up to ``timeout`` seconds (None: no limit). True when it ended. A
        message still in the slot when it ends is counted as dropped (``dropped_disabled``), also
        when it ends after this wait ran out."""
        self._stop.set()
        slot = self.slot  # None once the thread has ended
        if slot is not None:
            slot.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self.slot is not None:  # never started: its thread did not drain the slot
            self._drop_waiting()
        return True

    def _drop_waiting(self) -> None:
        """Count what is left in the slot as dropped (``dropped_disabled``) and empty it."""
        while self.slot.take(0) is not None:  # returns at once, closed or not
            self.core.note_dropped_disabled()

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._drop_waiting()
            # Let go of the core, and through it the model: a node cleaned up while this thread
            # was still in a frame keeps the worker (to refuse a second one beside it), not the model.
            self.core = self.slot = None  # type: ignore[assignment]

    def _serve(self) -> None:
        while not self._stop.is_set():
            taken = self.slot.take_timed(self.poll_s)
            if taken is None:
                continue
            if self._stop.is_set():  # taken as the worker stops: dropped, not segmented
                self.core.note_dropped_disabled()
                continue
            msg, received_at = taken
            try:
                want = self.demand()
                outputs = self.core.process(msg, self.now(), want.colored, want.overlay, want.class_masks,
                                            want.autoware_mask, received_at=received_at)
                if outputs is None or self._stop.is_set():  # stopped during the frame: its outputs go nowhere
                    continue
                self.publish(outputs, self.core.label_info_update(msg.header, outputs.info.is_key_frame))
                self.core.record_published()
            except Exception as exc:  # noqa: BLE001 - keep the thread alive whatever a publisher does
                if self.shut_down():  # the node is going: nothing can be published any more
                    self._stop.set()
                    break
                try:
                    self.core.record_error("publishing failed", exc)  # counts it, then logs
                except Exception:  # noqa: BLE001 - a logger that raises must not end the thread either
                    pass

