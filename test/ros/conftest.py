"""Shared fixtures of the ROS tests (no rclpy: real message classes come from ``rosbags``)."""

import pytest
from rosbags.typesys import Stores, get_typestore

from mpvss_ros.ros.conversions import MessageTypes, rosbags_message_types


@pytest.fixture(scope="session")
def ts():
    """A ROS 2 Humble typestore with vision_msgs and this package's messages registered."""
    store = get_typestore(Stores.ROS2_HUMBLE)
    rosbags_message_types(store)
    return store


@pytest.fixture(scope="session")
def types(ts) -> MessageTypes:
    """The message classes of :func:`ts` as :class:`MessageTypes`."""
    return rosbags_message_types(ts)
