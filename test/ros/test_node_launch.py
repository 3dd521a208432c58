"""launch_testing: the node on the untrained lite model, through real topics and services.

Runs under ROS 2 (``colcon test``: CMakeLists.txt registers it with ``add_launch_test``; or
``launch_test test/ros/test_node_launch.py`` in a sourced workspace). Without rclpy and
launch_testing, plain pytest skips this module.

Checks: labels arrive for the published frames with exactly their header (stamp and frame_id),
and so does ``~/autoware_mask`` (``publish_autoware_mask``), which decodes to the labels' Autoware
class IDs; LabelInfo is latched (a subscriber joining late still gets it); ``~/enable`` stops and resumes
segmentation; ``~/reset`` makes the next frame a key frame; ``set_parameters`` refuses a read-only
parameter and an invalid schedule and applies a valid one (the next frame a key frame); the node
exits cleanly.
"""

from __future__ import annotations

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("launch_testing")

import sys  # noqa: E402
import time  # noqa: E402
import unittest  # noqa: E402
from pathlib import Path  # noqa: E402

import launch_ros.actions  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from mpvss_ros.msg import SegmentationInfo  # noqa: E402
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402
from vision_msgs.msg import LabelInfo  # noqa: E402

import launch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launch_test does not put it there
from ros_client import RELIABLE, H, W, ClientTestCase, make_image  # noqa: E402

import numpy as np  # noqa: E402

from mpvss_ros.ros.conversions import autoware_class_ids  # noqa: E402

NAMESPACE = "test_cam"
PREFIX = f"/{NAMESPACE}/mpvss_segmenter"
IMAGE_TOPIC = f"/{NAMESPACE}/image_raw"
FRAME_ID = "test_camera_optical"
STARTUP_TIMEOUT_S = 120.0  # model construction on a slow CI machine

LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


@pytest.mark.launch_test
def generate_test_description():
    node = launch_ros.actions.Node(
        package="mpvss_ros",
        executable="mpvss_node",
        name="mpvss_segmenter",
        namespace=NAMESPACE,
        # max_frame_age_s as a whole number, as users write it: a float parameter must accept it
        parameters=[{"model": "mpvss_lite", "device": "cpu", "threads": 1, "max_frame_age_s": 0,
                     "schedule": "fixed:3", "publish_autoware_mask": True}],
        remappings=[("image", IMAGE_TOPIC)],
        output="screen",
    )
    return launch.LaunchDescription([node, launch_testing.actions.ReadyToTest()]), {"segmenter": node}


class TestSegmentationNode(ClientTestCase):

    def setUp(self):
        super().setUp()
        self.labels: dict[tuple[int, int], Image] = {}
        self.infos: dict[tuple[int, int], SegmentationInfo] = {}
        self.autoware: dict[tuple[int, int], Image] = {}
        self.node.create_subscription(Image, f"{PREFIX}/labels", self._on_labels, RELIABLE)
        self.node.create_subscription(
            Image, f"{PREFIX}/autoware_mask",
            lambda msg: self.autoware.__setitem__((msg.header.stamp.sec, msg.header.stamp.nanosec), msg), RELIABLE)
        self.node.create_subscription(SegmentationInfo, f"{PREFIX}/info", self._on_info, RELIABLE)
        self.pub = self.node.create_publisher(Image, IMAGE_TOPIC, RELIABLE)
        self.next_sec = 1000

    def _on_labels(self, msg: Image) -> None:
        self.labels[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = msg

    def _on_info(self, msg: SegmentationInfo) -> None:
        self.infos[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = msg

    def publish_until_segmented(self, timeout: float) -> tuple[int, int]:
        """Publish frames (one every 0.5 s) until one of them comes back; its stamp."""
        end = time.monotonic() + timeout
        sent = []
        while time.monotonic() < end:
            key = (self.next_sec, 250_000_000)
            self.next_sec += 1
            sent.append(key)
            self.pub.publish(make_image(*key, FRAME_ID))
            if self.spin_for(0.5, until=lambda: any(k in self.labels for k in sent)):
                return next(k for k in sent if k in self.labels)
        self.fail(f"no labels on {PREFIX}/labels within {timeout:.0f} s")

    def test_labels_label_info_enable_reset(self):
        # 1. Labels come back with the input's header, at the input's size, as mono8 class IDs.
        first = self.publish_until_segmented(STARTUP_TIMEOUT_S)
        for _ in range(3):
            self.publish_until_segmented(30.0)
        self.assertGreaterEqual(len(self.labels), 4)
        for (sec, nanosec), msg in self.labels.items():
            self.assertEqual(nanosec, 250_000_000)
            self.assertGreaterEqual(sec, 1000)
            self.assertEqual(msg.header.frame_id, FRAME_ID)
            self.assertEqual((msg.encoding, msg.height, msg.width, msg.step), ("mono8", H, W, W))
            self.assertLess(max(msg.data), 11)  # mpvss_lite: 11 CamVid classes
        self.assertTrue(self.spin_for(5.0, until=lambda: first in self.infos))
        self.assertTrue(self.infos[first].is_key_frame)
        # Autoware's mask of the same frames: 5-byte runs (uint8 value, little-endian int32 length)
        # that decode to the labels' Autoware class IDs (built once the node sees this subscriber)
        end = time.monotonic() + 60.0
        while not self.spin_for(1.0, until=lambda: any(k in self.autoware for k in self.labels)):
            self.assertLess(time.monotonic(), end, "no ~/autoware_mask for any segmented frame")
            self.publish_until_segmented(30.0)
        both = [k for k in self.labels if k in self.autoware]
        lut = autoware_class_ids(["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                                  "Pedestrian", "Bicyclist"])
        for key in both:
            mask, labels = self.autoware[key], np.frombuffer(bytes(self.labels[key].data), np.uint8).reshape(H, W)
            self.assertEqual((mask.encoding, mask.height, mask.width, mask.header.frame_id), ("mono8", H, W, FRAME_ID))
            runs = np.frombuffer(bytes(mask.data), np.dtype([("value", "u1"), ("length", "<i4")]))
            np.testing.assert_array_equal(np.repeat(runs["value"], runs["length"]).reshape(H, W), lut[labels])

        # 2. LabelInfo is latched: a subscriber joining now still receives it.
        label_infos = []
        self.node.create_subscription(LabelInfo, f"{PREFIX}/label_info", label_infos.append, LATCHED)
        self.assertTrue(self.spin_for(10.0, until=lambda: bool(label_infos)), "LabelInfo not latched")
        names = [c.class_name for c in label_infos[0].class_map]
        self.assertEqual(len(names), 11)
        self.assertEqual([c.class_id for c in label_infos[0].class_map], list(range(11)))

        # 3. ~/enable false: frames are dropped without output; true: segmentation resumes.
        enable = self.node.create_client(SetBool, f"{PREFIX}/enable")
        response = self.call(enable, SetBool.Request(data=False))
        self.assertTrue(response.success)
        self.assertIn("disabled", response.message)
        self.spin_for(1.0)  # a frame in flight may still come out
        before = len(self.labels)
        for _ in range(4):
            self.pub.publish(make_image(self.next_sec, 250_000_000, FRAME_ID))
            self.next_sec += 1
            self.spin_for(0.5)
        self.assertEqual(len(self.labels), before, "labels published while disabled")
        self.assertTrue(self.call(enable, SetBool.Request(data=True)).success)
        resumed = self.publish_until_segmented(30.0)
        self.assertTrue(self.spin_for(5.0, until=lambda: resumed in self.infos))
        self.assertEqual(self.infos[resumed].key_frame_reason, "reset")  # re-enabling resets

        # 4. ~/reset: the next frame is a key frame with reason "reset".
        self.publish_until_segmented(30.0)
        self.spin_for(2.0)  # let frames still in flight come out before the reset
        response = self.call(self.node.create_client(Trigger, f"{PREFIX}/reset"), Trigger.Request())
        self.assertTrue(response.success)
        after_reset = self.publish_until_segmented(30.0)
        self.assertTrue(self.spin_for(5.0, until=lambda: after_reset in self.infos))
        self.assertTrue(self.infos[after_reset].is_key_frame)
        self.assertEqual(self.infos[after_reset].key_frame_reason, "reset")

        # 5. Parameters while running (ros2 param set): read-only and invalid values refused,
        #    a new schedule applied from a key frame (reason "reset").
        set_parameters = self.node.create_client(SetParameters, f"{PREFIX}/set_parameters")

        def set_one(name, value):
            request = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
            (result,) = self.call(set_parameters, request).results
            return result

        refused = set_one("backend", "onnxruntime")
        self.assertFalse(refused.successful)
        self.assertIn("read-only", refused.reason)
        refused = set_one("schedule", "every frame")
        self.assertFalse(refused.successful)
        self.assertIn("schedule", refused.reason)
        self.publish_until_segmented(30.0)
        self.spin_for(2.0)
        self.assertTrue(set_one("schedule", "fixed:2").successful)
        changed = self.publish_until_segmented(30.0)
        self.assertTrue(self.spin_for(5.0, until=lambda: changed in self.infos))
        self.assertTrue(self.infos[changed].is_key_frame)
        self.assertEqual(self.infos[changed].key_frame_reason, "reset")


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):

    def test_exit_code(self, proc_info, segmenter):
        # 0: clean exit on SIGINT; -2/-15: signal delivered while shutting down (not a crash).
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0, -2, -15], process=segmenter)
