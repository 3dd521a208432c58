"""A stand-in for the parts of rclpy (and of the ROS message packages) that ``mpvss_ros/ros/node.py``
uses, so that the node shell runs where ROS 2 is not installed.

It exercises the node's wiring (parameters, publishers, subscription, services, timer, worker,
``main``), not rclpy itself: ``test_node_launch.py`` runs the real node on machines with ROS 2.
Where the behaviour matters to the node it follows rclpy (Humble), read from its source:

* ``declare_parameter`` takes the value from the overrides (the params file / ``-p``), and unless
  the descriptor sets ``dynamic_typing`` refuses an override whose type differs from the default's
  (``InvalidParameterTypeException``, e.g. ``2`` for a DOUBLE parameter); integer and
  floating-point ranges are checked for values of their own type only; a parameter declared with
  a type and no value raises ``ParameterUninitializedException`` on ``get_parameter``;
* ``set_parameters`` (what ``ros2 param set`` reaches) refuses read-only parameters, a type other
  than the declared one and NOT_SET ("undeclaring") unless ``dynamic_typing``, and out-of-range
  values, before it calls the ``add_on_set_parameters_callback`` callbacks, newest first, with a
  one-element list; the value is stored only when every callback succeeds (a dynamically typed
  parameter set to NOT_SET is then undeclared); ``use_sim_time`` is declared on every node;
* ``Parameter.Type.from_value`` types ``[]`` as a byte array, as rclpy does; ``get_parameter`` of
  a dynamically typed parameter without a value returns it (value None) instead of raising;
* ``create_publisher`` / ``create_subscription`` take ``qos_overriding_options`` as a keyword and
  apply ``qos_overrides.<topic>.<publisher|subscription>.<policy>`` to the profile in place;
* ``LifecycleNode``: the transitions and callback results of rclpy's lifecycle state machine, and
  lifecycle publishers that publish only while active (see :class:`LifecycleNode`);
* ``~/x`` topics resolve to ``/<namespace>/<node>/x``.

Message classes come from ``rosbags`` (same field names as rclpy's), wrapped so that omitted
fields take defaults, as rclpy's message constructors do.
"""

from __future__ import annotations

import enum
import sys
import threading
import time
import types
from dataclasses import fields, is_dataclass
from typing import Any

from rosbags.typesys import Stores, get_typestore

from mpvss_ros.ros.conversions import rosbags_message_types

TYPESTORE = get_typestore(Stores.ROS2_HUMBLE)
MESSAGE_TYPES = rosbags_message_types(TYPESTORE)


def _default(tp: Any) -> Any:
    """The zero value of a rosbags field annotation (a message class name or a Python type)."""
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    if text in ("int", "float"):
        return 0
    if text == "bool":
        return False
    if text == "str":
        return ""
    if text.startswith(("list", "np.ndarray", "numpy", "ndarray")) or "[" in text:
        return []
    cls = TYPESTORE.types.get(text.replace("__", "/"))
    return with_defaults(cls)() if cls is not None else None


def with_defaults(cls: type) -> type:
    """A subclass of a rosbags message dataclass whose omitted fields take default values."""
    if cls is None or not is_dataclass(cls):
        raise TypeError(f"not a rosbags message class: {cls!r}")

    class Msg(cls):  # type: ignore[misc, valid-type]
        def __init__(self, **kw: Any) -> None:
            values = {}
            for f in fields(cls):
                if str(f.type).startswith("ClassVar"):
                    continue
                if f.name in kw:
                    values[f.name] = kw.pop(f.name)
                else:
                    values[f.name] = _default(f.type)
            if kw:
                raise TypeError(f"{cls.__name__} has no field(s) {sorted(kw)}")
            super().__init__(**values)

    Msg.__name__ = Msg.__qualname__ = cls.__name__
    for name, value in vars(cls).items():
        if name.isupper():
            setattr(Msg, name, value)
    return Msg


def _msg(name: str) -> type:
    return with_defaults(TYPESTORE.types[name])


# ------------------------------------------------------------------------------ rclpy.parameter


class ParameterType(enum.IntEnum):
    NOT_SET = 0
    BOOL = 1
    INTEGER = 2
    DOUBLE = 3
    STRING = 4
    BYTE_ARRAY = 5
    BOOL_ARRAY = 6
    INTEGER_ARRAY = 7
    DOUBLE_ARRAY = 8
    STRING_ARRAY = 9

    @classmethod
    def from_value(cls, value: Any) -> "ParameterType":
        if value is None:
            return cls.NOT_SET
        if isinstance(value, bool):
            return cls.BOOL
        if isinstance(value, int):
            return cls.INTEGER
        if isinstance(value, float):
            return cls.DOUBLE
        if isinstance(value, str):
            return cls.STRING
        if isinstance(value, (list, tuple)):  # rclpy's order: [] is a BYTE_ARRAY
            if all(isinstance(v, bytes) for v in value):
                return cls.BYTE_ARRAY
            if all(isinstance(v, bool) for v in value):
                return cls.BOOL_ARRAY
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return cls.INTEGER_ARRAY
            if all(isinstance(v, float) for v in value):
                return cls.DOUBLE_ARRAY
            if all(isinstance(v, str) for v in value):
                return cls.STRING_ARRAY
        raise TypeError(f"not a parameter value: {value!r}")


class Parameter:
    Type = ParameterType

    def __init__(self, name: str, type_: ParameterType, value: Any) -> None:
        self.name, self.type_, self.value = name, type_, value


class ParameterException(Exception):
    pass


class InvalidParameterTypeException(ParameterException):
    pass


class InvalidParameterValueException(ParameterException):
    pass


class ParameterUninitializedException(ParameterException):
    pass


class ParameterDescriptor:
    def __init__(self, description: str = "", additional_constraints: str = "", read_only: bool = False,
                 dynamic_typing: bool = False) -> None:
        self.description, self.additional_constraints = description, additional_constraints
        self.read_only, self.dynamic_typing = read_only, dynamic_typing
        self.integer_range: list[Any] = []
        self.floating_point_range: list[Any] = []


class IntegerRange:
    def __init__(self, from_value: int = 0, to_value: int = 0, step: int = 0) -> None:
        self.from_value, self.to_value, self.step = from_value, to_value, step


class FloatingPointRange:
    def __init__(self, from_value: float = 0.0, to_value: float = 0.0, step: float = 0.0) -> None:
        self.from_value, self.to_value, self.step = from_value, to_value, step


class SetParametersResult:
    def __init__(self, successful: bool = False, reason: str = "") -> None:
        self.successful, self.reason = successful, reason


class ParameterNotDeclaredException(ParameterException):
    pass


def _range_problem(name: str, type_: ParameterType, value: Any, descriptor: ParameterDescriptor) -> str:
    """rclpy's range checks (ranges apply to values of their own type only); '' when in range."""
    for kind, ranges in ((ParameterType.INTEGER, descriptor.integer_range),
                         (ParameterType.DOUBLE, descriptor.floating_point_range)):
        if type_ == kind and ranges and not ranges[0].from_value <= value <= ranges[0].to_value:
            return f"Parameter {name} out of range. Min: {ranges[0].from_value}, Max: {ranges[0].to_value}, value: {value}"
    return ""


# ------------------------------------------------------------------------------------ rclpy.qos


class HistoryPolicy(enum.IntEnum):
    SYSTEM_DEFAULT = 0
    KEEP_LAST = 1
    KEEP_ALL = 2


class ReliabilityPolicy(enum.IntEnum):
    SYSTEM_DEFAULT = 0
    RELIABLE = 1
    BEST_EFFORT = 2


class DurabilityPolicy(enum.IntEnum):
    SYSTEM_DEFAULT = 0
    TRANSIENT_LOCAL = 1
    VOLATILE = 2


class QoSProfile:
    def __init__(self, *, history: HistoryPolicy, depth: int, reliability: ReliabilityPolicy,
                 durability: DurabilityPolicy) -> None:
        self.history, self.depth, self.reliability, self.durability = history, depth, reliability, durability


class QoSOverridingOptions:
    def __init__(self, policy_kinds: tuple[str, ...]) -> None:
        self.policy_kinds = policy_kinds

    @classmethod
    def with_default_policies(cls) -> "QoSOverridingOptions":
        return cls(("history", "depth", "reliability"))


_POLICY_ENUMS = {"history": HistoryPolicy, "reliability": ReliabilityPolicy}


# ----------------------------------------------------------------------------------- rclpy.node


class Logger:
    """Collects ``(level, text)`` lines like an rclpy logger (one string argument).

    As rclpy's ``RcutilsLogger.log`` (Humble and Jazzy, ``rclpy/impl/rcutils_logger.py``), each
    call site (function, file, line, bytecode offset of the first caller outside the logger) is
    bound to the severity of its first call: another severity from the same call site raises
    ``ValueError('Logger severity cannot be changed between calls.')``."""

    def __init__(self, name: str = "test") -> None:
        self.name = name
        self.lines: list[tuple[str, str]] = []
        self.contexts: dict[tuple, str] = {}

    def _log(self, level: str, text: str) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        caller = (frame.f_code.co_name, frame.f_code.co_filename, frame.f_lineno, frame.f_lasti) if frame else None
        if self.contexts.setdefault(caller, level) != level:
            raise ValueError("Logger severity cannot be changed between calls.")
        self.lines.append((level, text))

    def debug(self, text: str) -> None:
        self._log("debug", text)

    def info(self, text: str) -> None:
        self._log("info", text)

    def warning(self, text: str) -> None:
        self._log("warning", text)

    warn = warning

    def error(self, text: str) -> None:
        self._log("error", text)

    def fatal(self, text: str) -> None:
        self._log("fatal", text)


_LOGGERS: dict[str, Logger] = {}


def get_logger(name: str) -> Logger:
    return _LOGGERS.setdefault(name, Logger(name))


class _Stamp:
    def __init__(self, ns: int) -> None:
        self.nanoseconds = ns

    def to_msg(self) -> Any:
        return MESSAGE_TYPES.time(sec=self.nanoseconds // 10**9, nanosec=self.nanoseconds % 10**9)


class _Clock:
    def now(self) -> _Stamp:
        return _Stamp(time.time_ns())


class Publisher:
    def __init__(self, msg_type: type, topic: str, qos: QoSProfile) -> None:
        self.msg_type, self.topic_name, self.qos = msg_type, topic, qos
        self.messages: list[Any] = []
        self.subscribers = 0
        self._lock = threading.Lock()

    def publish(self, msg: Any) -> None:
        if not isinstance(msg, self.msg_type):
            raise TypeError(f"{self.topic_name}: expected {self.msg_type.__name__}, got {type(msg).__name__}")
        with self._lock:
            self.messages.append(msg)

    def get_subscription_count(self) -> int:
        return self.subscribers


class Subscription:
    def __init__(self, msg_type: type, topic: str, callback: Any, qos: QoSProfile) -> None:
        self.msg_type, self.topic_name, self.callback, self.qos = msg_type, topic, callback, qos


class Node:
    #: What a params file / ``--ros-args -p`` gives, by parameter name (set by the test).
    overrides: dict[str, Any] = {}
    #: ``--ros-args -r FROM:=TO`` rules (set by the test); both names expanded as topics are.
    remappings: dict[str, str] = {}
    namespace = "/"

    def __init__(self, node_name: str, **kwargs: Any) -> None:
        self._name = node_name
        # rclpy declares use_sim_time on every node, settable while it runs.
        self._params: dict[str, Parameter] = {"use_sim_time": Parameter("use_sim_time", ParameterType.BOOL, False)}
        self._descriptors: dict[str, ParameterDescriptor] = {"use_sim_time": ParameterDescriptor()}
        self._declared_types: dict[str, ParameterType] = {"use_sim_time": ParameterType.BOOL}
        self._parameter_callbacks: list[Any] = []
        self.publishers: dict[str, Publisher] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.services: dict[str, tuple[Any, Any]] = {}
        self.timers: list[tuple[float, Any]] = []
        self.destroyed = False
        self._logger = Logger(self.get_fully_qualified_name())  # one per node, as rclpy's Node
        self.context = Context()

    def get_fully_qualified_name(self) -> str:
        return f"{self.namespace.rstrip('/')}/{self._name}"

    def _expand(self, topic: str) -> str:
        if topic.startswith("~/"):
            return f"{self.get_fully_qualified_name()}/{topic[2:]}"
        return topic if topic.startswith("/") else f"{self.namespace.rstrip('/')}/{topic}"

    def resolve_topic_name(self, topic: str, *, only_expand: bool = False) -> str:
        """The expanded and (unless ``only_expand``) remapped name, as rclpy's: what topics, and
        the ``qos_overrides.<topic>`` parameters, are named after."""
        name = self._expand(topic)
        if only_expand:
            return name
        rules = {self._expand(src): self._expand(dst) for src, dst in self.remappings.items()}
        return rules.get(name, name)

    _resolve = resolve_topic_name

    # -- parameters (rclpy Humble's Node.declare_parameter / _apply_descriptor) --
    def declare_parameter(self, name: str, value: Any, descriptor: ParameterDescriptor) -> Parameter:
        declared = value if isinstance(value, ParameterType) else ParameterType.from_value(value)
        given = self.overrides.get(name, None if isinstance(value, ParameterType) else value)
        given_type = ParameterType.from_value(given)
        if not descriptor.dynamic_typing and given_type not in (ParameterType.NOT_SET, declared):
            raise InvalidParameterTypeException(
                f"Trying to set parameter '{name}' to '{given}' of type '{given_type.name}', "
                f"expecting type '{declared.name}'")
        problem = _range_problem(name, given_type, given, descriptor)
        if problem:
            raise InvalidParameterValueException(problem)
        param = Parameter(name, given_type, given)
        self._params[name] = param
        self._descriptors[name] = descriptor
        self._declared_types[name] = declared
        return param

    # -- rclpy Humble's add_on_set_parameters_callback / set_parameters / _apply_descriptor --
    def add_on_set_parameters_callback(self, callback: Any) -> None:
        self._parameter_callbacks.insert(0, callback)

    def set_parameters(self, parameters: list[Parameter]) -> list[SetParametersResult]:
        """What ``ros2 param set`` reaches: one result per parameter, each set on its own."""
        undeclared = [p.name for p in parameters if p.name not in self._params]
        if undeclared:
            raise ParameterNotDeclaredException(undeclared)
        return [self._set_one(p) for p in parameters]

    def _set_one(self, param: Parameter) -> SetParametersResult:
        descriptor = self._descriptors[param.name]
        if descriptor.read_only:
            return SetParametersResult(False, f"Trying to set a read-only parameter: {param.name}.")
        declared = self._declared_types[param.name]
        if not descriptor.dynamic_typing and param.type_ == ParameterType.NOT_SET:
            return SetParametersResult(False, "Static parameter cannot be undeclared")
        if not descriptor.dynamic_typing and param.type_ != declared:
            return SetParametersResult(False, f"Wrong parameter type, expected '{declared}' got '{param.type_}'")
        problem = _range_problem(param.name, param.type_, param.value, descriptor)
        if problem:
            return SetParametersResult(False, problem)
        for callback in self._parameter_callbacks:
            result = callback([param])
            if not result.successful:
                return result
        if param.type_ == ParameterType.NOT_SET:  # a dynamically typed parameter set to nothing: undeclared
            del self._params[param.name], self._descriptors[param.name], self._declared_types[param.name]
            return SetParametersResult(True)
        self._params[param.name] = param
        return SetParametersResult(True)

    def get_parameter(self, name: str) -> Parameter:
        param = self._params[name]
        if param.type_ == ParameterType.NOT_SET and not self._descriptors[name].dynamic_typing:
            raise ParameterUninitializedException(f"parameter '{name}' is not initialized")
        return param

    def _apply_qos_overrides(self, topic: str, kind: str, qos: QoSProfile, options: Any) -> None:
        if options is None:
            return
        for policy in options.policy_kinds:
            key = f"qos_overrides.{topic}.{kind}.{policy}"
            if key in self.overrides:
                value = self.overrides[key]
                if policy not in _POLICY_ENUMS:  # depth: an integer parameter (rclpy declares it typed)
                    if type(value) is not int:
                        raise InvalidParameterTypeException(
                            f"Trying to set parameter '{key}' to '{value}' of type "
                            f"'{ParameterType.from_value(value).name}', expecting type 'INTEGER'")
                    setattr(qos, policy, value)
                elif str(value).upper() not in _POLICY_ENUMS[policy].__members__:  # rclpy: RuntimeError
                    raise RuntimeError(f"Unexpected QoS override for policy `{policy}`: `{value}`")
                else:
                    setattr(qos, policy, _POLICY_ENUMS[policy][str(value).upper()])

    # -- entities --
    def create_publisher(self, msg_type: type, topic: str, qos_profile: QoSProfile, *,
                         qos_overriding_options: Any = None) -> Publisher:
        name = self._resolve(topic)
        self._apply_qos_overrides(name, "publisher", qos_profile, qos_overriding_options)
        self.publishers[name] = Publisher(msg_type, name, qos_profile)
        return self.publishers[name]

    def create_subscription(self, msg_type: type, topic: str, callback: Any, qos_profile: QoSProfile, *,
                            qos_overriding_options: Any = None) -> Subscription:
        name = self._resolve(topic)
        self._apply_qos_overrides(name, "subscription", qos_profile, qos_overriding_options)
        self.subscriptions[name] = Subscription(msg_type, name, callback, qos_profile)
        return self.subscriptions[name]

    def create_service(self, srv_type: Any, name: str, callback: Any) -> str:
        self.services[self._resolve(name)] = (srv_type, callback)
        return self._resolve(name)  # the handle destroy_service takes

    def create_timer(self, period_s: float, callback: Any) -> tuple[float, Any]:
        timer = (period_s, callback)
        self.timers.append(timer)
        return timer

    def destroy_publisher(self, publisher: Publisher) -> bool:
        return self.publishers.pop(publisher.topic_name, None) is not None

    def destroy_subscription(self, subscription: Subscription) -> bool:
        return self.subscriptions.pop(subscription.topic_name, None) is not None

    def destroy_service(self, service: str) -> bool:
        return self.services.pop(service, None) is not None

    def destroy_timer(self, timer: tuple[float, Any]) -> bool:
        if timer in self.timers:
            self.timers.remove(timer)
            return True
        return False

    def get_logger(self) -> Logger:
        return self._logger

    def get_clock(self) -> _Clock:
        return _Clock()

    def destroy_node(self) -> None:
        self.destroyed = True


# --------------------------------------------------------------------------------- lifecycle


class TransitionCallbackReturn(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    ERROR = "error"


class LifecycleState:
    def __init__(self, label: str, state_id: int) -> None:
        self.label, self.state_id = label, state_id


class LifecyclePublisher(Publisher):
    """Publishes only while enabled (activated), like rclpy's ``LifecyclePublisher``."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.enabled = False
        self.dropped = 0

    def publish(self, msg: Any) -> None:
        if not self.enabled:
            self.dropped += 1
            return
        super().publish(msg)


class LifecycleNode(Node):
    """rclpy's ``LifecycleNode`` state machine (``LifecycleNodeMixin.__change_state``): the
    transition's callback gets the previous state; SUCCESS goes to the goal state, FAILURE back
    to the start state, ERROR (or an exception) to ``on_error``, then unconfigured on its
    SUCCESS, else finalized. The default callbacks enable (activate) or disable (deactivate)
    the lifecycle publishers. A transition not allowed from the current state raises RCLError,
    and so does the ``~/change_state`` service handler (``_service_change_state.callback``,
    rclpy's ``__on_change_state`` before ros2/rclpy#1319), which therefore answers nothing."""

    _TRANSITIONS = {  # name: (from states, goal state, callback name)
        "configure": (("unconfigured",), "inactive", "on_configure"),
        "cleanup": (("inactive",), "unconfigured", "on_cleanup"),
        "activate": (("inactive",), "active", "on_activate"),
        "deactivate": (("active",), "inactive", "on_deactivate"),
        "shutdown": (("unconfigured", "inactive", "active"), "finalized", "on_shutdown"),
    }
    _IDS = {"unconfigured": 1, "inactive": 2, "active": 3, "finalized": 4}
    #: lifecycle_msgs/msg/Transition IDs of the requests ~/change_state takes.
    _TRANSITION_IDS = {1: "configure", 2: "cleanup", 3: "activate", 4: "deactivate",
                       5: "shutdown", 6: "shutdown", 7: "shutdown"}

    def __init__(self, node_name: str, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.state = "unconfigured"
        self._managed: list[LifecyclePublisher] = []
        self._service_change_state = types.SimpleNamespace(callback=self._on_change_state)

    def _on_change_state(self, request: Any, response: Any) -> Any:
        """rclpy's handler: a label it does not know is answered ``success: false``; a
        transition the state machine refuses raises out of the handler."""
        transition = request.transition
        name = transition.label or self._TRANSITION_IDS.get(transition.id)
        if name not in self._TRANSITIONS:
            response.success = False
            return response
        response.success = self._trigger(name) == TransitionCallbackReturn.SUCCESS
        return response

    def create_lifecycle_publisher(self, msg_type: type, topic: str, qos_profile: QoSProfile, *,
                                   qos_overriding_options: Any = None) -> LifecyclePublisher:
        name = self._resolve(topic)
        self._apply_qos_overrides(name, "publisher", qos_profile, qos_overriding_options)
        pub = LifecyclePublisher(msg_type, name, qos_profile)
        self.publishers[name] = pub
        self._managed.append(pub)
        return pub

    def destroy_lifecycle_publisher(self, publisher: LifecyclePublisher) -> bool:
        if publisher in self._managed:
            self._managed.remove(publisher)
        return self.destroy_publisher(publisher)

    def _trigger(self, transition: str) -> TransitionCallbackReturn:
        sources, goal, callback = self._TRANSITIONS[transition]
        if self.state not in sources:
            raise RCLError(f"Failed to trigger lifecycle state machine transition: transition '{transition}' "
                           f"is not registered in state '{self.state}'")
        start = self.state
        previous = LifecycleState(start, self._IDS[start])
        try:
            result = getattr(self, callback)(previous)
        except Exception:  # noqa: BLE001 - rclpy turns a raising callback into ERROR
            result = TransitionCallbackReturn.ERROR
        if result == TransitionCallbackReturn.SUCCESS:
            self.state = goal
        elif result == TransitionCallbackReturn.FAILURE:
            self.state = start
        else:
            try:
                recovered = self.on_error(previous) == TransitionCallbackReturn.SUCCESS
            except Exception:  # noqa: BLE001
                recovered = False
            self.state = "unconfigured" if recovered else "finalized"
        return result

    def trigger_configure(self) -> TransitionCallbackReturn:
        return self._trigger("configure")

    def trigger_cleanup(self) -> TransitionCallbackReturn:
        return self._trigger("cleanup")

    def trigger_activate(self) -> TransitionCallbackReturn:
        return self._trigger("activate")

    def trigger_deactivate(self) -> TransitionCallbackReturn:
        return self._trigger("deactivate")

    def trigger_shutdown(self) -> TransitionCallbackReturn:
        return self._trigger("shutdown")

    def _set_enabled(self, enabled: bool) -> TransitionCallbackReturn:
        for pub in self._managed:
            pub.enabled = enabled
        return TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._set_enabled(True)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._set_enabled(False)


# ---------------------------------------------------------------------------------- services


class _Service:
    class Request:
        def __init__(self, data: bool = False) -> None:
            self.data = data

    class Response:
        def __init__(self) -> None:
            self.success, self.message = False, ""


class SetBool(_Service):
    pass


class Trigger(_Service):
    pass


# ----------------------------------------------------------------------------------- install


class ExternalShutdownException(Exception):
    pass


class Context:
    """``rclpy.context.Context``: ``ok()`` until rclpy is shut down (``try_shutdown``; a test may
    set ``shut_down`` itself, as rclpy's signal handler would)."""

    shut_down = False  # one process-wide context, as rclpy's default one

    def ok(self) -> bool:
        return not Context.shut_down


class RCLError(RuntimeError):
    """rclpy's ``_rclpy.RCLError`` (``rclpy.impl.implementation_singleton.rclpy_implementation``)."""


class _Runtime:
    """``rclpy.init`` / ``spin`` / ``ok`` / ``try_shutdown`` and ``rclpy.executors``'
    ``SingleThreadedExecutor``, whose first ``spin_once`` ends as an external shutdown would
    (``spin_once_error``, when set, is raised from it instead, after the shutdown)."""

    def __init__(self) -> None:
        self.initialised = False
        self.spun: list[Any] = []
        self.spin_timeouts: list[float | None] = []
        self.spin_once_error: BaseException | None = None
        Context.shut_down = False
        runtime = self

        class SingleThreadedExecutor:
            def add_node(self, node: Any) -> None:
                runtime.spun.append(node)

            def spin_once(self, timeout_sec: float | None = None) -> None:
                runtime.spin_timeouts.append(timeout_sec)
                runtime.try_shutdown()
                if runtime.spin_once_error is not None:
                    raise runtime.spin_once_error

            def shutdown(self) -> None:
                pass

        self.executor_class = SingleThreadedExecutor

    def init(self, args: Any = None) -> None:
        self.initialised = True
        Context.shut_down = False

    def spin(self, node: Any) -> None:
        self.spun.append(node)

    def ok(self) -> bool:
        return self.initialised

    def try_shutdown(self) -> None:
        self.initialised = False
        Context.shut_down = True


def install(monkeypatch: Any) -> _Runtime:
    """Put the stand-in modules into ``sys.modules`` (undone by ``monkeypatch``); returns the
    runtime whose ``init``/``spin``/``ok``/``try_shutdown`` the fake ``rclpy`` exposes."""
    runtime = _Runtime()
    t = TYPESTORE.types
    modules = {
        "rclpy": {"init": runtime.init, "spin": runtime.spin, "ok": runtime.ok, "try_shutdown": runtime.try_shutdown},
        "rclpy.executors": {"ExternalShutdownException": ExternalShutdownException,
                            "SingleThreadedExecutor": runtime.executor_class},
        "rclpy.impl": {}, "rclpy.impl.implementation_singleton": {
            "rclpy_implementation": types.SimpleNamespace(RCLError=RCLError)},
        "rclpy.logging": {"get_logger": get_logger},
        "rclpy.exceptions": {"ParameterException": ParameterException,
                             "ParameterUninitializedException": ParameterUninitializedException,
                             "InvalidParameterTypeException": InvalidParameterTypeException},
        "rclpy.node": {"Node": Node},
        "rclpy.lifecycle": {"LifecycleNode": LifecycleNode, "LifecycleState": LifecycleState,
                            "TransitionCallbackReturn": TransitionCallbackReturn},
        "rclpy.parameter": {"Parameter": Parameter},
        "rclpy.qos": {"DurabilityPolicy": DurabilityPolicy, "HistoryPolicy": HistoryPolicy, "QoSProfile": QoSProfile,
                      "ReliabilityPolicy": ReliabilityPolicy},
        "rclpy.qos_overriding_options": {"QoSOverridingOptions": QoSOverridingOptions},
        "builtin_interfaces": {}, "builtin_interfaces.msg": {"Time": MESSAGE_TYPES.time},
        "diagnostic_msgs": {}, "diagnostic_msgs.msg": {
            "DiagnosticArray": _msg("diagnostic_msgs/msg/DiagnosticArray"),
            "DiagnosticStatus": _msg("diagnostic_msgs/msg/DiagnosticStatus"),
            "KeyValue": _msg("diagnostic_msgs/msg/KeyValue")},
        "rcl_interfaces": {}, "rcl_interfaces.msg": {"FloatingPointRange": FloatingPointRange,
                                                     "IntegerRange": IntegerRange,
                                                     "ParameterDescriptor": ParameterDescriptor,
                                                     "SetParametersResult": SetParametersResult},
        "sensor_msgs": {}, "sensor_msgs.msg": {"CompressedImage": MESSAGE_TYPES.compressed_image,
                                               "Image": MESSAGE_TYPES.image},
        "std_msgs": {}, "std_msgs.msg": {"Header": with_defaults(t["std_msgs/msg/Header"])},
        "std_srvs": {}, "std_srvs.srv": {"SetBool": SetBool, "Trigger": Trigger},
        "vision_msgs": {}, "vision_msgs.msg": {"LabelInfo": MESSAGE_TYPES.label_info,
                                               "VisionClass": MESSAGE_TYPES.vision_class},
        "mpvss_ros.msg": {"ClassMasks": MESSAGE_TYPES.class_masks, "SegmentationInfo": MESSAGE_TYPES.segmentation_info},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    rclpy = sys.modules["rclpy"]
    for sub in ("executors", "logging"):
        setattr(rclpy, sub, sys.modules[f"rclpy.{sub}"])
    monkeypatch.delitem(sys.modules, "mpvss_ros.ros.node", raising=False)
    return runtime
