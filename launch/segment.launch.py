"""Start the mpvss_ros segmentation node (and optionally RViz2).

    ros2 launch mpvss_ros segment.launch.py image:=/camera/image_raw
    ros2 launch mpvss_ros segment.launch.py image:=/cam/front/image_raw namespace:=front use_rviz:=true
    ros2 launch mpvss_ros segment.launch.py model:=mpvss_r50 weights:=/data/mpvss_r50.pth
    ros2 launch mpvss_ros segment.launch.py lifecycle:=true autostart:=false    # for a lifecycle manager

Arguments:
    image: the camera image topic (sensor_msgs/Image); with input_compressed: true in the params
        file the node reads <image>/compressed (sensor_msgs/CompressedImage) instead.
    namespace: namespace of the node (one instance per camera); outputs are
        /<namespace>/mpvss_segmenter/{labels,confidence,info,label_info,colored,overlay,class_masks},
        and autoware_mask with publish_autoware_mask: true.
        A namespace pushed by a launch file that includes this one (PushRosNamespace) comes in
        front of it, for the node, its params-file section and RViz alike.
    config: the parameters file (default: the package's config/segment.yaml).
    model, weights: override those parameters when not empty.
    use_rviz: also start RViz2 showing the camera image, ~/overlay, ~/colored and ~/confidence. RViz is not a
        dependency of the package (robots run headless): install ros-<distro>-rviz2 where you view.
    lifecycle: start the managed (lifecycle) node ``mpvss_lifecycle_node`` instead of the plain
        one; it loads the model at ``configure`` and segments while ``active``.
    autostart: with lifecycle:=true, configure the node and, once that succeeded, activate it
        (false: leave it unconfigured for Nav2's lifecycle manager or ``ros2 lifecycle set``).
"""

from __future__ import annotations

import atexit
import os
import tempfile

import yaml
from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

PACKAGE = "mpvss_ros"
NODE_NAME = "mpvss_segmenter"
#: Topics written in config/mpvss.rviz, replaced by the launch arguments' topics.
RVIZ_IMAGE_TOPIC = "/camera/image_raw"
RVIZ_NODE_PREFIX = "/mpvss_segmenter/"


def _true(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _temp_file(text: str, suffix: str) -> str:
    """A temporary file with ``text``, removed when the launch process exits (the node and RViz
    read theirs at start)."""
    fd, path = tempfile.mkstemp(prefix="mpvss_", suffix=suffix)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    atexit.register(_remove, path)
    return path


def _absolute_key(key) -> str:
    """A params-file key as rclpy matches it: with a leading '/' added when it has none (rclpy's
    node.cpp does so for every key); the bare node name is kept (the package default)."""
    key = str(key).strip().rstrip("/")
    return key if key == NODE_NAME or key.startswith("/") else "/" + key


def _key_matches(key: str, namespace: str) -> bool:
    """Whether a params-file key names /<namespace>/mpvss_segmenter: a fully qualified name with
    rcl's wildcards (`*` one token, `**` any number), or the bare node name (the package default)."""
    key = _absolute_key(key)
    if key == NODE_NAME:
        return True
    pattern = [t for t in key.split("/") if t]
    name = [t for t in namespace.split("/") if t] + [NODE_NAME]

    def match(p: list[str], n: list[str]) -> bool:
        if not p:
            return not n
        if p[0] == "**":
            return any(match(p[1:], n[i:]) for i in range(len(n) + 1))
        return bool(n) and p[0] in ("*", n[0]) and match(p[1:], n[1:])

    return match(pattern, name)


def _nested(params: dict) -> dict:
    """A section's parameters with dotted names (``a.b: 1``) written as nested maps (``a: {b:
    1}``), the two forms rcl reads as the same parameter, in new dicts (the file's are not changed)."""
    out: dict = {}
    for key, value in params.items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        _merge(node, {leaf: _nested(value) if isinstance(value, dict) else value})
    return out


def _merge(into: dict, section: dict) -> None:
    """Merge one params-file section's parameters into ``into``, nested maps (e.g.
    ``qos_overrides``) leaf by leaf as rcl applies them, a later value winning."""
    for key, value in section.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _namespaced_params_file(config: str, namespace: str) -> str:
    """The params file for /<namespace>/mpvss_segmenter.

    A params file's `mpvss_segmenter:` key matches only the node without a namespace, so for a
    namespaced node the sections that apply to it (`mpvss_segmenter`, wildcards such as `/**` or
    `/**/mpvss_segmenter`, and `/<namespace>/mpvss_segmenter` itself, applied last; keys without
    a leading `/` read as rclpy reads them, with one) are merged
    under its full name into a temporary copy; other cameras' sections are left out.
    """
    if not namespace:
        return config
    with open(config, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    exact = f"/{namespace}/{NODE_NAME}"
    params = {}
    found = _sections(doc)
    sections = [(k, v) for k, v in found if _absolute_key(k) != exact]
    sections += [(k, v) for k, v in found if _absolute_key(k) == exact]
    for key, section in sections:
        if _key_matches(key, namespace):
            _merge(params, _nested(section))
    return _temp_file(yaml.safe_dump({exact: {"ros__parameters": params}}), ".yaml")


def _sections(doc: dict, path: tuple = ()) -> list:
    """A params file's (node name, ros__parameters) pairs in file order. As rcl's parser
    (rcl_yaml_param_parser, parse.c: keys are added to the node name until `ros__parameters`),
    a node name may be split over nested keys: `front: {mpvss_segmenter: {ros__parameters:
    ...}}` names `front/mpvss_segmenter`."""
    out = []
    for key, value in doc.items():
        if key == "ros__parameters" and path:
            out.append(("/".join(str(k).strip("/") if i else str(k).rstrip("/") for i, k in enumerate(path)),
                        value if isinstance(value, dict) else {}))
        elif isinstance(value, dict):
            out += _sections(value, path + (key,))
    return out


def _rviz_config(template: str, image: str, namespace: str) -> str:
    """config/mpvss.rviz showing this instance: the camera image and /<namespace>/mpvss_segmenter/*."""
    if not image.startswith("/"):
        image = f"/{namespace}/{image}" if namespace else f"/{image}"
    prefix = f"/{namespace}/{NODE_NAME}/" if namespace else f"/{NODE_NAME}/"
    return template.replace(RVIZ_IMAGE_TOPIC, image).replace(RVIZ_NODE_PREFIX, prefix)


def _lifecycle_actions(node_args: dict, autostart: bool) -> list:
    """The managed node, and with ``autostart`` a configure request plus an activate request that
    follows the first successful configure only (configuring -> inactive, once: not a later
    deactivate, nor a configure after a manual cleanup)."""
    from launch.actions import EmitEvent, RegisterEventHandler
    from launch.events import matches_action
    from launch_ros.actions import LifecycleNode
    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState
    from lifecycle_msgs.msg import Transition

    node = LifecycleNode(executable="mpvss_lifecycle_node", **node_args)
    if not autostart:
        return [node]

    def change(transition_id: int):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node), transition_id=transition_id))

    activate = RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, start_state="configuring",
                                                      goal_state="inactive", handle_once=True,
                                                      entities=[change(Transition.TRANSITION_ACTIVATE)]))
    return [node, activate, change(Transition.TRANSITION_CONFIGURE)]


def _launch_setup(context, *args, **kwargs):
    share = get_package_share_directory(PACKAGE)
    image = LaunchConfiguration("image").perform(context).strip()
    namespace = LaunchConfiguration("namespace").perform(context).strip().strip("/")
    # the node's full namespace: one pushed by an including launch file (PushRosNamespace, kept
    # in the "ros_namespace" configuration) in front of ours, as launch_ros prefixes it
    pushed = str(context.launch_configurations.get("ros_namespace") or "").strip().strip("/")
    full_namespace = "/".join(part for part in (pushed, namespace) if part)
    config = LaunchConfiguration("config").perform(context).strip()
    overrides = {}
    for name in ("model", "weights"):
        value = LaunchConfiguration(name).perform(context).strip()
        if value:
            overrides[name] = value
    parameters = [_namespaced_params_file(config, full_namespace)] + ([overrides] if overrides else [])
    image_topic = image.rstrip("/")
    node_args = dict(package=PACKAGE, name=NODE_NAME, namespace=namespace, parameters=parameters,
                     remappings=[("image", image_topic), ("image/compressed", image_topic + "/compressed")],
                     output="screen", emulate_tty=True)
    if _true(LaunchConfiguration("lifecycle").perform(context)):
        actions = _lifecycle_actions(node_args, _true(LaunchConfiguration("autostart").perform(context)))
    else:
        actions = [Node(executable="mpvss_node", **node_args)]
    if _true(LaunchConfiguration("use_rviz").perform(context)):
        with open(os.path.join(share, "config", "mpvss.rviz"), encoding="utf-8") as f:
            rviz = _rviz_config(f.read(), image_topic, full_namespace)
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", namespace=namespace,
                            arguments=["-d", _temp_file(rviz, ".rviz")], output="screen"))
    return actions


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument("image", default_value="/camera/image_raw",
                              description="Camera image topic (sensor_msgs/Image)"),
        DeclareLaunchArgument("namespace", default_value="",
                              description="Namespace of the node (one instance per camera)"),
        DeclareLaunchArgument("config", default_value=os.path.join(share, "config", "segment.yaml"),
                              description="Parameters file of the node"),
        DeclareLaunchArgument("model", default_value="",
                              description="Model name or YAML (overrides the params file when set)"),
        DeclareLaunchArgument("weights", default_value="",
                              description="Weights file (overrides the params file when set)"),
        DeclareLaunchArgument("use_rviz", default_value="false",
                              description="Also start RViz2 with config/mpvss.rviz"),
        DeclareLaunchArgument("lifecycle", default_value="false",
                              description="Start the managed (lifecycle) node mpvss_lifecycle_node"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="With lifecycle:=true, configure and activate the node at launch"),
        OpaqueFunction(function=_launch_setup),
    ])
