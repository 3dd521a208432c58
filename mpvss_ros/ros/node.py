"""The rclpy node ``mpvss_segmenter``: a thin shell around :mod:`mpvss_ros.ros.core`, as a plain
node (:class:`MPVSSNode`, ``mpvss_node``) or a managed one (:class:`MPVSSLifecycleNode`,
``mpvss_lifecycle_node``: the model loads at ``configure``, segmentation runs while ``active``).

All logic (age check, decoding, the engine, output messages, counters, diagnostics) lives in
the ROS-free, unit-tested :class:`~mpvss_ros.ros.core.SegmentationCore`; parameters come from
the table in :mod:`mpvss_ros.ros.parameters`. This file only wires ROS to them:

* subscription ``image`` (``sensor_msgs/Image``) or ``image/compressed``
  (``sensor_msgs/CompressedImage``, with ``input_compressed``); QoS from ``input_reliability``
  and ``input_depth`` (default best effort, keep last 1). The callback only puts the message
  into a :class:`~mpvss_ros.ros.core.LatestSlot`; a :class:`~mpvss_ros.ros.core.Worker` thread
  segments the newest message and publishes;
* publishers (reliable, keep last 1, so every subscriber QoS matches): ``~/labels``,
  ``~/confidence`` and ``~/info`` always; ``~/colored``, ``~/overlay`` and ``~/class_masks``
  built only while they have subscribers, and so is ``~/autoware_mask`` with
  ``publish_autoware_mask`` (off by default); ``~/label_info`` (``vision_msgs/LabelInfo``, reliable
  + transient local, depth 1) published at start and with every key frame; every output carries
  the input header;
* every input and output topic's (not ``/diagnostics``) history, depth and reliability can be changed at start with rclpy's
  ``qos_overrides`` parameters, named after the topic as resolved and remapped: an output
  ``qos_overrides./mpvss_segmenter/overlay.publisher.reliability: best_effort`` (a debug view over
  Wi-Fi), the input ``qos_overrides./camera/image_raw.subscription.depth: 5`` where ``image`` is
  remapped to ``/camera/image_raw``; a value rclpy refuses ends the start with one fatal line;
* ``/diagnostics`` (``diagnostic_msgs/DiagnosticArray``) every ``diagnostics_period_s``;
* services ``~/enable`` (``std_srvs/SetBool``) and ``~/reset`` (``std_srvs/Trigger``).

Parameters are read at start. The schedule, propagation, frame-age, frame-size-limit,
overlay-opacity and palette parameters (``dynamic`` in the table) can also be changed while the node runs
(``ros2 param set /mpvss_segmenter schedule fixed:5``): the on-set-parameters callback hands
them to :meth:`~mpvss_ros.ros.core.SegmentationCore.reconfigure`, which refuses an invalid
change with its reason; the others are declared read-only (change them in the params file or on
the command line and restart). A model that cannot be loaded ends the process with one fatal
log line and exit status 1.

Run: ``ros2 launch mpvss_ros segment.launch.py image:=/camera/image_raw [lifecycle:=true]`` or
``ros2 run mpvss_ros mpvss_node --ros-args -r image:=/camera/image_raw``.
"""

from __future__ import annotations

import logging
import os
import sys

import rclpy
import rclpy.executors
import rclpy.logging
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.exceptions import ParameterException
from rclpy.impl.implementation_singleton import rclpy_implementation
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from std_srvs.srv import SetBool, Trigger
from vision_msgs.msg import LabelInfo, VisionClass

from mpvss_ros.msg import ClassMasks, SegmentationInfo
from mpvss_ros.ros.conversions import MessageTypes
from mpvss_ros.ros.core import (
    ERROR,
    OK,
    WARN,
    OutputDemand,
    SegmentationCore,
    StartupError,
    Worker,
    configure_threads,
    load_configured_model,
)
from mpvss_ros.ros.parameters import (
    NODE_NAME,
    PARAMETERS,
    SPECS,
    NodeConfig,
    check_parameter,
    descriptor_fields,
    validate,
)

__all__ = ["MPVSSNode", "MPVSSLifecycleNode", "main", "main_lifecycle"]

_RELIABILITY = {
    "best_effort": ReliabilityPolicy.BEST_EFFORT,
    "reliable": ReliabilityPolicy.RELIABLE,
    "system_default": ReliabilityPolicy.SYSTEM_DEFAULT,
}
_LEVEL = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}


def _qos(durability: DurabilityPolicy = DurabilityPolicy.VOLATILE, depth: int = 1,
         reliability: ReliabilityPolicy = ReliabilityPolicy.RELIABLE) -> QoSProfile:
    """A new profile per topic: rclpy applies ``qos_overrides`` parameters to it in place."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability, durability=durability)


#: ``qos_overrides.<topic>.{publisher,subscription}.{history,depth,reliability}`` parameters (read
#: at start) change any topic's QoS, as in Nav2; ``<topic>`` is the resolved and remapped name
#: (``/<ns>/mpvss_segmenter/labels``, the remapped camera topic).
_OVERRIDES = QoSOverridingOptions.with_default_policies()
#: Seconds to wait for the worker thread to finish its frame when the input stops (deactivate,
#: cleanup, shutdown) and again before a new one starts.
_WORKER_STOP_S = 10.0
#: /diagnostics' "disabled (...)" hint of an inactive lifecycle node (its ~/enable is refused then).
_INACTIVE = "inactive: activate the node to resume"
#: The hint after ``~/enable false`` on an active node.
_ENABLE_HINT = "call ~/enable to resume"


class _WorkerBusy(StartupError):
    """The previous worker is still in a frame after :data:`_WORKER_STOP_S` more (activate refused)."""


def _create_entity(node: Node, create, msg_type: type, topic: str, *args, **kwargs):
    """``create(msg_type, topic, *args, **kwargs)`` (a publisher or subscription of ``node``) with
    what rclpy raises while making it as a one-line :class:`StartupError` naming the topic as
    resolved and remapped, the name its ``qos_overrides`` parameters carry: ``RuntimeError`` (a
    refused override value such as ``best-effort``, or the middleware failing) and
    ``InvalidParameterTypeException`` (a ``depth`` of another type)."""
    try:
        return create(msg_type, topic, *args, **kwargs)
    except (RuntimeError, ParameterException) as exc:
        try:
            name = node.resolve_topic_name(topic)
        except Exception:  # noqa: BLE001 - the resolved name only makes the message clearer
            name = topic
        override = isinstance(exc, ParameterException) or "qos override" in str(exc).lower()
        hint = f" (check the qos_overrides.{name}.* parameters)" if override else ""
        raise StartupError(f"cannot create topic '{name}': {exc}{hint}") from None


def _describe(exc: Exception) -> str:
    """An exception for a log line: a :class:`StartupError`'s own words, else with its type."""
    return str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"


class _SegmenterShell:
    """The wiring both node classes share; mixed into an rclpy ``Node`` (plain or lifecycle).

    :meth:`_declare_parameters` declares the table; :meth:`_build` reads it, loads the model and
    creates the core, publishers, services and diagnostics timer; :meth:`_on_set_parameters`
    applies changes while running;
    :meth:`_start_input` / :meth:`_stop_input` subscribe and run the worker, or stop both;
    :meth:`_teardown` destroys what :meth:`_build` made.
    """

    core: SegmentationCore | None = None
    _sub = None
    _worker: Worker | None = None
    _built_entities: list = []

    def _declare_parameters(self, read_only_fixed: bool) -> None:
        """Declare every parameter of the table (values from the params file / ``-p``).

        Args:
            read_only_fixed: declare the parameters that are not ``dynamic`` read-only (the plain
                node); a lifecycle node takes them while unconfigured and refuses them later.

        Raises:
            StartupError: a value of the wrong type or out of range.
        """
        for spec in PARAMETERS:
            f = descriptor_fields(spec)
            desc = ParameterDescriptor(description=f["description"],
                                       additional_constraints=f["additional_constraints"],
                                       read_only=f["read_only"] and read_only_fixed,
                                       dynamic_typing=f["dynamic_typing"])
            if f["integer_range"] is not None:
                lo, hi, step = f["integer_range"]
                desc.integer_range = [IntegerRange(from_value=lo, to_value=hi, step=step)]
            if f["floating_point_range"] is not None:
                lo, hi, step = f["floating_point_range"]
                desc.floating_point_range = [FloatingPointRange(from_value=lo, to_value=hi, step=step)]
            # An empty list cannot carry a type (rclpy calls [] a byte array): integer arrays are
            # declared without a value, dynamically typed, and checked by the table.
            default = None if spec.type == "int_array" else spec.default
            try:
                self.declare_parameter(spec.name, default, desc)
            except ParameterException as exc:  # wrong type or out of range in the params file
                raise StartupError(f"parameter '{spec.name}': {exc}") from None

    def _read_parameters(self) -> NodeConfig:
        """The declared parameters' values, validated. Raises :class:`StartupError`."""
        # An integer array without a value (e.g. palette: [] in a params file) reads as None: the default.
        values = {spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS}
        try:
            return validate(values)
        except ValueError as exc:
            raise StartupError(str(exc)) from None

    def _build(self, create_publisher, destroy_publisher) -> None:
        """Read the parameters, load the model, make the core and the node's entities.

        Args:
            create_publisher, destroy_publisher: ``create_publisher`` / ``destroy_publisher``, or
                the lifecycle node's ``create_lifecycle_publisher`` / ``destroy_lifecycle_publisher``
                for the output topics.

        Raises:
            StartupError: one line (bad parameter, model, weights, device or backend).
        """
        cfg = self._read_parameters()
        configure_threads(cfg.threads)
        loaded = load_configured_model(cfg)
        if not loaded.trained:
            self.get_logger().warning(f"model {loaded.config.name} has no trained weights: labels are meaningless")
        types = MessageTypes(image=Image, compressed_image=CompressedImage, header=Header, time=Time,
                             label_info=LabelInfo, vision_class=VisionClass, class_masks=ClassMasks,
                             segmentation_info=SegmentationInfo)
        try:
            self.core = SegmentationCore(cfg, loaded, types, logger=self.get_logger())
        except ValueError as exc:  # e.g. more palette colours than classes
            raise StartupError(str(exc)) from None

        self._built_entities = []  # (destroy, entity), recorded as each is made: a failure half-way is undone

        def made(destroy, entity):
            self._built_entities.append((destroy, entity))
            return entity

        def publisher(msg_type, topic, qos=None):
            return made(destroy_publisher, _create_entity(self, create_publisher, msg_type, topic, qos or _qos(),
                                                          qos_overriding_options=_OVERRIDES))

        self._pub_labels = publisher(Image, "~/labels")
        self._pub_confidence = publisher(Image, "~/confidence")
        self._pub_info = publisher(SegmentationInfo, "~/info")
        self._pub_colored = publisher(Image, "~/colored") if cfg.publish_colored else None
        self._pub_overlay = publisher(Image, "~/overlay") if cfg.publish_overlay else None
        self._pub_masks = publisher(ClassMasks, "~/class_masks") if cfg.publish_class_masks else None
        self._pub_autoware = publisher(Image, "~/autoware_mask") if cfg.publish_autoware_mask else None
        self._pub_label_info = publisher(LabelInfo, "~/label_info", _qos(DurabilityPolicy.TRANSIENT_LOCAL))
        self._pub_diagnostics = made(self.destroy_publisher, self.create_publisher(DiagnosticArray, "/diagnostics", 10))
        made(self.destroy_service, self.create_service(SetBool, "~/enable", self._on_enable))
        made(self.destroy_service, self.create_service(Trigger, "~/reset", self._on_reset))
        made(self.destroy_timer, self.create_timer(cfg.diagnostics_period_s, self._publish_diagnostics))

    def _announce(self) -> None:
        """Publish the LabelInfo (latched) with the node clock's stamp and log what runs."""
        assert self.core is not None
        cfg = self.core.config  # as changed while running
        self._pub_label_info.publish(self.core.label_info(Header(stamp=self.get_clock().now().to_msg())))
        topic = "image/compressed" if cfg.input_compressed else "image"
        self.get_logger().info(
            f"segmenting {self._sub.topic_name if self._sub is not None else topic} ({cfg.input_reliability}, "
            f"depth {cfg.input_depth}) with {self.core.loaded.config.name} on {self.core.loaded.device}, "
            f"{cfg.propagator}{' (chained flow)' if cfg.chain_flow and cfg.propagator != 'copy' else ''}, "
            f"schedule {cfg.schedule}")

    def _start_input(self) -> None:
        """Subscribe to the camera and start the worker thread (a fresh slot each time).

        Raises:
            _WorkerBusy: the previous worker is still in a frame (a deactivate whose wait ran
                out, e.g. during a TensorRT engine build): two workers would run the engine at
                once.
        """
        assert self.core is not None
        if self._worker is not None and not self._worker.stop(_WORKER_STOP_S):
            raise _WorkerBusy(f"the previous worker thread is still segmenting a frame after {_WORKER_STOP_S:g} s "
                               "more (a TensorRT engine build takes minutes); activate again once it has finished")
        cfg = self.core.config  # the input settings are read-only: as at configure
        self._slot = self.core.make_slot()
        self._worker = Worker(self._slot, self.core, self._publish, now=self._now, demand=self._demand,
                              shut_down=lambda: not self.context.ok())
        input_qos = _qos(depth=cfg.input_depth, reliability=_RELIABILITY[cfg.input_reliability])
        msg_type, topic = (CompressedImage, "image/compressed") if cfg.input_compressed else (Image, "image")
        self._sub = _create_entity(self, self.create_subscription, msg_type, topic, self._slot.put, input_qos,
                                   qos_overriding_options=_OVERRIDES)
        self._worker.start()

    def _stop_input(self) -> None:
        """Unsubscribe and stop the worker (after the frame in hand)."""
        if self._sub is not None:
            self.destroy_subscription(self._sub)
            self._sub = None
        if self._worker is not None and not self._worker.stop(_WORKER_STOP_S):  # idempotent; it stays for inspection
            self.get_logger().warning(f"the worker thread is still segmenting a frame after {_WORKER_STOP_S:g} s; "
                                      "it stops when that frame is done and publishes nothing more")

    def _teardown(self) -> None:
        """Stop the input and destroy what :meth:`_build` made; the model is released."""
        self._stop_input()
        for destroy, entity in self._built_entities:
            destroy(entity)
        self._built_entities = []
        # The stopped worker and the slot (whose hooks are the core's bound methods) hold the core,
        # and through it the model: drop them too, or cleanup would keep the model (GPU memory
        # included) until the next activate, and the next configure would load a second copy.
        # A worker still in its frame (its wait ran out) is kept, so that an activate after the
        # next configure refuses to start a second one beside it; it lets go of the core itself
        # when that frame ends.
        if self._worker is not None and not self._worker.alive:
            self._worker = None
        self._slot = None
        self.core = None

    def destroy_node(self) -> None:
        """Stop the input and the worker, then destroy the node (either node class)."""
        self._stop_input()
        super().destroy_node()

    # -- worker thread -------------------------------------------------------------------------

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _demand(self) -> OutputDemand:
        def wanted(pub) -> bool:
            return pub is not None and pub.get_subscription_count() > 0

        return OutputDemand(wanted(self._pub_colored), wanted(self._pub_overlay), wanted(self._pub_masks),
                            wanted(self._pub_autoware))

    def _publish(self, out, label_info) -> None:
        if label_info is not None:
            self._pub_label_info.publish(label_info)
        self._pub_labels.publish(out.labels)
        self._pub_confidence.publish(out.confidence)
        self._pub_info.publish(out.info)
        if out.colored is not None and self._pub_colored is not None:
            self._pub_colored.publish(out.colored)
        if out.overlay is not None and self._pub_overlay is not None:
            self._pub_overlay.publish(out.overlay)
        if out.class_masks is not None and self._pub_masks is not None:
            self._pub_masks.publish(out.class_masks)
        if out.autoware_mask is not None and self._pub_autoware is not None:
            self._pub_autoware.publish(out.autoware_mask)

    # -- executor callbacks --------------------------------------------------------------------

    def _resume_hint(self) -> str:
        """How to resume, for /diagnostics' "disabled (...)" line after ``~/enable false``."""
        return _ENABLE_HINT

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        before = self.core.set_enabled(request.data, self._resume_hint())
        state = "enabled" if request.data else "disabled"
        response.success = True
        response.message = f"segmentation {state}" + ("" if before != request.data else " (no change)")
        self.get_logger().info(response.message)
        return response

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self.core.reset()
        response.success = True
        response.message = "reset: the next frame is a key frame"
        return response

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """rclpy has checked read-only flags, types and ranges; the core checks the rest. Parameters
        outside the table (``use_sim_time``) pass through untouched. Without a core (a lifecycle
        node not configured) each value is checked on its own and read at ``configure``."""
        changes = {p.name: p.value for p in parameters if p.name in SPECS}
        if not changes:
            return SetParametersResult(successful=True)
        deleted = [p.name for p in parameters if p.name in SPECS and p.type_ == Parameter.Type.NOT_SET]
        if deleted:  # rclpy would undeclare it after this callback (`ros2 param delete`)
            return SetParametersResult(successful=False, reason=(
                f"parameter '{deleted[0]}' cannot be deleted; set it to its default instead"))
        core = self.core
        try:
            if core is None:
                for name, value in changes.items():
                    check_parameter(name, value)
            else:
                core.reconfigure(changes)
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - an exception here would end the executor's spin
            return SetParametersResult(successful=False, reason=f"{type(exc).__name__}: {exc}")
        if core is not None:
            self.get_logger().info("parameters changed: " + ", ".join(f"{k}={v!r}" for k, v in changes.items()))
        return SetParametersResult(successful=True)

    def _publish_diagnostics(self) -> None:
        core = self.core
        if core is None:
            return
        s = core.diagnostic_status()
        status = DiagnosticStatus(level=_LEVEL[s.level], name=f"{self.get_fully_qualified_name()}: segmentation",
                                  message=s.message, hardware_id=str(core.loaded.device),
                                  values=[KeyValue(key=k, value=v) for k, v in s.values])
        self._pub_diagnostics.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()),
                                                      status=[status]))


class MPVSSNode(_SegmenterShell, Node):
    """The segmentation node: loads the model and segments from the start. Raises
    :class:`StartupError` (one line) when it cannot start."""

    def __init__(self, **kwargs) -> None:
        Node.__init__(self, NODE_NAME, **kwargs)
        self._declare_parameters(read_only_fixed=True)
        self._build(self.create_publisher, self.destroy_publisher)
        self._start_input()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._announce()


#: Names of the lifecycle_msgs/msg/Transition IDs a ``~/change_state`` request may carry
#: (Transition.msg's TRANSITION_* constants), for logs about a request given by ID only.
_TRANSITION_NAMES = {1: "configure", 2: "cleanup", 3: "activate", 4: "deactivate",
                     5: "unconfigured_shutdown", 6: "inactive_shutdown", 7: "active_shutdown"}


class MPVSSLifecycleNode(_SegmenterShell, LifecycleNode):
    """The segmentation node as a managed (lifecycle) node, for Nav2's lifecycle manager (it holds
    no bond: give the manager ``bond_timeout: 0.0``) or ``ros2 lifecycle set``.

    * ``configure``: read the parameters, load the model, create publishers, services and the
      diagnostics timer (a model that cannot be loaded: one error line, FAILURE, back to
      unconfigured);
    * ``activate``: publish the LabelInfo, subscribe to the camera and segment; the first frame
      is a key frame;
    * ``deactivate``: unsubscribe and stop segmenting (publishers drop messages while inactive);
    * ``cleanup`` / ``shutdown``: destroy what ``configure`` made and release the model.

    Every parameter can be set while unconfigured (each value checked on its own, the whole set
    at ``configure``); once configured, only the ``dynamic`` ones, as on the plain node.
    """

    def __init__(self, **kwargs) -> None:
        LifecycleNode.__init__(self, NODE_NAME, **kwargs)
        self._declare_parameters(read_only_fixed=False)
        self.add_on_set_parameters_callback(self._on_set_lifecycle_parameters)
        self._answer_refused_transitions()

    def _answer_refused_transitions(self) -> None:
        """Make ``~/change_state`` answer ``success: false`` to a transition the state machine
        refuses in the current state (e.g. activate while unconfigured, requested by ID as Nav2's
        lifecycle manager does).

        rclpy before 8.0 (Humble, Jazzy) raises ``RCLError`` out of the service handler instead
        (fixed upstream in ros2/rclpy#1319): the request is never answered, so the caller waits
        until its own timeout, and the error ends ``rclpy.spin``. Here the handler rclpy
        registered is wrapped: the refusal is logged and answered. Newer rclpy answers it
        itself, and a node made without the lifecycle services has nothing to wrap.
        """
        service = getattr(self, "_service_change_state", None)
        if service is None:
            return
        handler = service.callback

        def on_change_state(request, response):
            try:
                return handler(request, response)
            except rclpy_implementation.RCLError as exc:
                transition = request.transition
                name = transition.label or _TRANSITION_NAMES.get(transition.id, "unknown")
                self.get_logger().error(f"lifecycle transition '{name}' (ID {transition.id}) refused: {exc}")
                response.success = False
                return response

        service.callback = on_change_state

    def _on_set_lifecycle_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        if self.core is not None:
            fixed = [p.name for p in parameters if p.name in SPECS and not SPECS[p.name].dynamic]
            if fixed:
                return SetParametersResult(successful=False, reason=(
                    f"parameter '{fixed[0]}' is read at configure: deactivate and clean up the node first"))
        return self._on_set_parameters(parameters)

    def _resume_hint(self) -> str:
        """While inactive, ``~/enable true`` is refused: activating resumes."""
        return _INACTIVE if self._sub is None else _ENABLE_HINT

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        """As the plain node's, but refused while inactive (configured, not activated): nothing is
        subscribed, so it enabled nothing and turned /diagnostics from OK "disabled" into WARN
        "no output". ``activate`` enables segmentation."""
        if request.data and self._sub is None:
            response.success = False
            response.message = "the node is inactive: activate it to segment (lifecycle transition 'activate')"
            self.get_logger().warning(response.message)
            return response
        return super()._on_enable(request, response)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._build(self.create_lifecycle_publisher, self.destroy_lifecycle_publisher)
        except Exception as exc:  # noqa: BLE001 - rclpy would turn it into ERROR without a word
            self.get_logger().error(f"cannot configure: {_describe(exc)}")
            self._teardown()
            return TransitionCallbackReturn.FAILURE
        self.core.set_enabled(False, _INACTIVE)  # /diagnostics OK "disabled" until activate, as after deactivate
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the lifecycle publishers
        if result != TransitionCallbackReturn.SUCCESS:
            return result
        try:
            self.core.set_enabled(True)
            self.core.reset()  # a gap in the stream: start from a key frame
            self._start_input()
            self._announce()
        except Exception as exc:  # noqa: BLE001 - e.g. a refused qos_overrides value for the input
            self.get_logger().error(f"cannot activate: {_describe(exc)}")
            self.core.set_enabled(False, _INACTIVE)  # /diagnostics OK "disabled", not WARN "no output"
            if not isinstance(exc, _WorkerBusy):  # that worker was waited for already: no second wait
                self._stop_input()
            super().on_deactivate(state)
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_input()
        self.core.set_enabled(False, _INACTIVE)  # /diagnostics: OK "disabled", not a WARN for missing output
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return super().on_error(state)


#: Longest wait of the executor, in seconds, before it checks whether rclpy was shut down.
_SPIN_WAIT_S = 0.5


def _spin(node_class: type, args: list[str] | None) -> int:
    """Init rclpy, build ``node_class`` and spin it until Ctrl-C or shutdown; the exit status.

    The executor waits at most :data:`_SPIN_WAIT_S` at a time: rclpy's SIGINT/SIGTERM handler
    can shut the context down while the executor is building its wait set, and then nothing woke
    a node with no timer (the managed node, unconfigured, waiting for its lifecycle manager): it
    ignored SIGTERM until killed (3 of 23 tries in a review's runs on the mini ROS 2 stack; 0 of 32
    in a later run of the same script), or the wait set's
    ``RCLError`` (the context no longer valid) ended the process with status 1. Errors once
    rclpy is shut down are that shutdown.

    A worker still in a frame after the node's wait for it (:data:`_WORKER_STOP_S`; a TensorRT
    engine build takes minutes) ends the process here with ``os._exit(status)``: the interpreter
    exiting under a daemon thread that is inside torch aborted the process (SIGABRT, exit status
    134, "terminate called without an active exception") instead of ending it with ``status``.
    """
    rclpy.init(args=args)
    node = executor = None
    status = 0
    try:
        node = node_class()
        executor = rclpy.executors.SingleThreadedExecutor()
        executor.add_node(node)
        while rclpy.ok():
            executor.spin_once(timeout_sec=_SPIN_WAIT_S)
    except StartupError as exc:
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {exc}")
        status = 1
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    except rclpy_implementation.RCLError:
        if rclpy.ok():
            raise
    finally:
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()
    worker = getattr(node, "_worker", None)
    if worker is not None and worker.alive:
        rclpy.logging.get_logger(NODE_NAME).warning(
            "ending the process under the worker thread, which is still segmenting a frame")
        logging.shutdown()  # flush what the handlers hold, as the interpreter's exit would
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def main(args: list[str] | None = None) -> int:
    """Entry point (``ros2 run mpvss_ros mpvss_node``). Returns the exit status (1 when the node
    cannot start)."""
    return _spin(MPVSSNode, args)


def main_lifecycle(args: list[str] | None = None) -> int:
    """Entry point of the managed node (``ros2 run mpvss_ros mpvss_lifecycle_node``): starts
    unconfigured; a lifecycle manager or ``ros2 lifecycle set`` configures and activates it.
    Returns the exit status (1 when its parameters cannot even be declared)."""
    return _spin(MPVSSLifecycleNode, args)


if __name__ == "__main__":
    sys.exit(main())
