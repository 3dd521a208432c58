"""What the two launch_testing tests (``test_node_launch.py``, ``test_lifecycle_launch.py``) share:
a test case with its own rclpy client node, spinning and service-call helpers, a camera frame and
the QoS the tests use.
Needs rclpy; imported only by those tests, after their ``importorskip``."""

from __future__ import annotations

import time
import unittest

import numpy as np
import rclpy
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

H, W = 48, 64
#: Reliable, keep last 10: what the tests publish frames with and subscribe to outputs with.
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)


def make_image(sec: int, nanosec: int, frame_id: str) -> Image:
    """An (H, W) rgb8 gradient frame with the given header stamp and frame_id."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    msg = Image(height=H, width=W, encoding="rgb8", is_bigendian=0, step=W * 3)
    msg.header.stamp.sec = sec
    msg.header.stamp.nanosec = nanosec
    msg.header.frame_id = frame_id
    msg.data = rgb.tobytes()
    return msg


class ClientTestCase(unittest.TestCase):
    """rclpy initialised for the class; ``self.node`` is a fresh client node per test."""

    client_name = "mpvss_test_client"

    @classmethod
    def setUpClass(cls):
        rclpy.init()

    @classmethod
    def tearDownClass(cls):
        rclpy.shutdown()

    def setUp(self):
        self.node = rclpy.create_node(self.client_name)

    def tearDown(self):
        self.node.destroy_node()

    def spin_for(self, seconds: float, until=lambda: False) -> bool:
        """Spin the client node for up to ``seconds``, stopping early once ``until()`` is true."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rclpy.spin_once(self.node, timeout_sec=0.05)
            if until():
                return True
        return until()

    def call(self, client, request, timeout: float = 30.0):
        """Call a service and return its response (fails the test when there is none)."""
        self.assertTrue(client.wait_for_service(timeout_sec=30.0), f"service {client.srv_name} missing")
        future = client.call_async(request)
        rclpy.spin_until_future_complete(self.node, future, timeout_sec=timeout)
        self.assertTrue(future.done(), f"no answer from {client.srv_name}")
        return future.result()
