"""launch_testing: the managed node (``mpvss_lifecycle_node``) through real lifecycle services.

Runs under ROS 2 (``colcon test``: CMakeLists.txt registers it with ``add_launch_test``; or
``launch_test test/ros/test_lifecycle_launch.py`` in a sourced workspace). Without rclpy and
launch_testing, plain pytest skips this module; ``test_node_shell.py`` covers the same states on
a stand-in for rclpy everywhere else.

Checks: the node starts unconfigured and publishes nothing; ``configure`` then ``activate``
(lifecycle_msgs/ChangeState) make labels arrive for published frames, with their header;
``deactivate`` stops them; ``get_state`` reports each state; the node exits cleanly.
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
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

import launch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launch_test does not put it there
from ros_client import RELIABLE, H, W, ClientTestCase, make_image  # noqa: E402

NAMESPACE = "lifecycle_cam"
PREFIX = f"/{NAMESPACE}/mpvss_segmenter"
IMAGE_TOPIC = f"/{NAMESPACE}/image_raw"
FRAME_ID = "lifecycle_camera_optical"
CONFIGURE_TIMEOUT_S = 120.0  # model construction on a slow CI machine



@pytest.mark.launch_test
def generate_test_description():
    node = launch_ros.actions.LifecycleNode(
        package="mpvss_ros",
        executable="mpvss_lifecycle_node",
        name="mpvss_segmenter",
        namespace=NAMESPACE,
        parameters=[{"model": "mpvss_lite", "device": "cpu", "threads": 1, "max_frame_age_s": 0,
                     "schedule": "fixed:3"}],
        remappings=[("image", IMAGE_TOPIC)],
        output="screen",
    )
    return launch.LaunchDescription([node, launch_testing.actions.ReadyToTest()]), {"segmenter": node}


class TestLifecycleNode(ClientTestCase):

    client_name = "mpvss_lifecycle_test_client"

    def setUp(self):
        super().setUp()
        self.labels: list[Image] = []
        self.node.create_subscription(Image, f"{PREFIX}/labels", self.labels.append, RELIABLE)
        self.pub = self.node.create_publisher(Image, IMAGE_TOPIC, RELIABLE)
        self.change = self.node.create_client(ChangeState, f"{PREFIX}/change_state")
        self.get = self.node.create_client(GetState, f"{PREFIX}/get_state")
        self.next_sec = 2000

    def transition(self, transition_id: int, timeout: float = 30.0) -> bool:
        return self.call(self.change, ChangeState.Request(transition=Transition(id=transition_id)), timeout).success

    def state(self) -> str:
        return self.call(self.get, GetState.Request(), 10.0).current_state.label

    def publish_frames(self, count: int, wait_s: float = 0.5) -> None:
        for _ in range(count):
            self.pub.publish(make_image(self.next_sec, 0, FRAME_ID))
            self.next_sec += 1
            self.spin_for(wait_s)

    def test_configure_activate_deactivate(self):
        self.assertEqual(self.state(), "unconfigured")
        self.publish_frames(3)
        self.assertEqual(self.labels, [], "labels before activation")
        # a transition the state machine refuses is answered (success false), not left unanswered
        self.assertFalse(self.transition(Transition.TRANSITION_ACTIVATE, 10.0))
        self.assertEqual(self.state(), "unconfigured")

        self.assertTrue(self.transition(Transition.TRANSITION_CONFIGURE, CONFIGURE_TIMEOUT_S))
        self.assertEqual(self.state(), "inactive")
        self.publish_frames(3)
        self.assertEqual(self.labels, [], "labels while inactive")

        self.assertTrue(self.transition(Transition.TRANSITION_ACTIVATE))
        self.assertEqual(self.state(), "active")
        end = time.monotonic() + 60.0
        while not self.labels and time.monotonic() < end:
            self.publish_frames(1)
        self.assertTrue(self.labels, "no labels while active")
        msg = self.labels[-1]
        self.assertEqual(msg.header.frame_id, FRAME_ID)
        self.assertEqual((msg.encoding, msg.height, msg.width), ("mono8", H, W))

        self.assertTrue(self.transition(Transition.TRANSITION_DEACTIVATE))
        self.assertEqual(self.state(), "inactive")
        self.spin_for(2.0)  # a frame in flight may still come out
        before = len(self.labels)
        self.publish_frames(3)
        self.assertEqual(len(self.labels), before, "labels after deactivate")

        self.assertTrue(self.transition(Transition.TRANSITION_CLEANUP))
        self.assertEqual(self.state(), "unconfigured")


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):

    def test_exit_code(self, proc_info, segmenter):
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0, -2, -15], process=segmenter)
