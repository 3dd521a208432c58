"""The rclpy node shell (``mpvss_ros/ros/node.py``) run against the stand-in rclpy of
``fake_rclpy.py``: parameters, QoS and overrides, publishing with the input header, services,
diagnostics and ``main``'s exit status. On machines with ROS 2, ``test_node_launch.py`` runs the
real node; this test covers the same wiring everywhere else (CI included)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from types import SimpleNamespace

import fake_rclpy as fr
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

NODE = "/mpvss_segmenter"
SEC = 1_700_000_000


@pytest.fixture()
def node_module(monkeypatch):
    """``(start, runtime)``: ``start(**overrides)`` imports node.py on the stand-ins and builds
    an ``MPVSSNode`` whose params file holds ``overrides``."""
    runtime = fr.install(monkeypatch)
    threads = torch.get_num_threads()
    made = []

    def start(**overrides):
        monkeypatch.setattr(fr.Node, "overrides", {"device": "cpu", "threads": threads, **overrides})
        import mpvss_ros.ros.node as node_py

        node = node_py.MPVSSNode()
        made.append(node)
        return node

    yield start, runtime
    for node in made:
        node.destroy_node()
    torch.set_num_threads(threads)


def image(nanosec: int, h: int = 48, w: int = 64):
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    t = fr.MESSAGE_TYPES
    header = t.header(stamp=t.time(sec=SEC, nanosec=nanosec), frame_id="camera_optical")
    return t.image(header=header, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                   data=rgb.reshape(-1))


def feed(node, msg, count_before: int, timeout_s: float = 60.0):
    """Hand ``msg`` to the subscription callback and wait for the worker to publish all of its
    outputs: ~/labels comes first, ~/confidence, ~/info and the optional ones after it, and the
    core counts the frame published once the last is out (waiting for ~/labels alone let a test
    read ~/info one message short under load)."""
    labels = node.publishers[f"{NODE}/labels"]
    published = node.core.counters["published"]
    node.subscriptions["/image"].callback(msg)
    t0 = time.monotonic()
    while (len(labels.messages) <= count_before or node.core.counters["published"] <= published) \
            and time.monotonic() - t0 < timeout_s:
        time.sleep(0.01)
    assert len(labels.messages) == count_before + 1, "the worker published nothing"
    return labels.messages[-1]


def test_node_publishes_the_autoware_mask_only_when_asked_and_subscribed(node_module):
    from mpvss_ros.ros.conversions import autoware_class_ids

    start, _ = node_module
    node = start(max_frame_age_s=0, schedule="fixed:3", publish_autoware_mask=True)
    autoware = node.publishers[f"{NODE}/autoware_mask"]
    assert autoware.msg_type is fr.MESSAGE_TYPES.image
    feed(node, image(100), 0)
    assert not autoware.messages  # built only while someone subscribes
    autoware.subscribers = 1
    feed(node, image(200), 1)
    (msg,) = autoware.messages
    assert (msg.header.stamp.nanosec, msg.header.frame_id, msg.encoding, msg.height, msg.width) == (
        200, "camera_optical", "mono8", 48, 64)
    runs = np.frombuffer(np.asarray(msg.data).tobytes(), np.dtype([("value", "u1"), ("length", "<i4")]))
    labels = np.asarray(node.publishers[f"{NODE}/labels"].messages[-1].data).reshape(48, 64)
    lut = autoware_class_ids(["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                              "Pedestrian", "Bicyclist"])  # the shipped model's classes
    np.testing.assert_array_equal(np.repeat(runs["value"], runs["length"]).reshape(48, 64), lut[labels])


def test_node_publishes_every_output_with_the_input_header(node_module):
    start, _ = node_module
    # max_frame_age_s as the whole number 0: a float parameter must take it (dynamic typing);
    # the overlay's QoS overridden to best effort through rclpy's qos_overrides parameters
    node = start(max_frame_age_s=0, schedule="fixed:3",
                 **{f"qos_overrides.{NODE}/overlay.publisher.reliability": "best_effort"})
    pubs = node.publishers
    assert set(pubs) == {f"{NODE}/{t}" for t in ("labels", "confidence", "info", "colored", "overlay",
                                                 "class_masks", "label_info")} | {"/diagnostics"}
    for topic in ("labels", "confidence", "info", "colored", "class_masks"):
        qos = pubs[f"{NODE}/{topic}"].qos
        assert (qos.reliability, qos.history, qos.depth, qos.durability) == (
            fr.ReliabilityPolicy.RELIABLE, fr.HistoryPolicy.KEEP_LAST, 1, fr.DurabilityPolicy.VOLATILE), topic
    assert pubs[f"{NODE}/overlay"].qos.reliability == fr.ReliabilityPolicy.BEST_EFFORT  # only that topic
    assert pubs[f"{NODE}/label_info"].qos.durability == fr.DurabilityPolicy.TRANSIENT_LOCAL
    sub = node.subscriptions["/image"]
    assert sub.msg_type is fr.MESSAGE_TYPES.image and sub.qos.reliability == fr.ReliabilityPolicy.BEST_EFFORT
    (info,) = pubs[f"{NODE}/label_info"].messages  # published at start
    assert [c.class_name for c in info.class_map][:3] == ["Sky", "Building", "Pole"]

    pubs[f"{NODE}/overlay"].subscribers = 1  # optional outputs only while subscribed
    stamps = [123_456_789, 190_000_001, 256_543_211, 323_000_007]
    outs = [feed(node, image(ns), i) for i, ns in enumerate(stamps)]
    infos = pubs[f"{NODE}/info"].messages
    assert [i.is_key_frame for i in infos] == [True, False, False, True]
    for msg, ns in zip(outs, stamps):
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (SEC, ns, "camera_optical")
        assert (msg.height, msg.width, msg.encoding) == (48, 64, "mono8")
    for labels, confidence in zip(outs, pubs[f"{NODE}/confidence"].messages):
        # each on its own topic: class IDs below 11, confidences at least 255 / 11 (an arg-max's share)
        assert np.asarray(labels.data).max() < 11 and np.asarray(confidence.data).min() >= 255 // 11
    for topic in ("confidence", "info", "overlay"):
        got = [(m.header.stamp.nanosec, m.header.frame_id) for m in pubs[f"{NODE}/{topic}"].messages]
        assert got == [(ns, "camera_optical") for ns in stamps], topic
    assert not pubs[f"{NODE}/colored"].messages and not pubs[f"{NODE}/class_masks"].messages
    assert [i.key_frame_stamp.nanosec for i in infos] == [stamps[0]] * 3 + [stamps[3]]
    # LabelInfo: at start, then with each key frame, carrying that frame's header
    label_infos = pubs[f"{NODE}/label_info"].messages
    assert [(m.header.stamp.nanosec, m.header.frame_id) for m in label_infos[1:]] == [
        (stamps[0], "camera_optical"), (stamps[3], "camera_optical")]

    # services: disabled frames are dropped, reset keys the next frame
    enable = node.services[f"{NODE}/enable"][1]
    reply = enable(fr.SetBool.Request(False), fr.SetBool.Response())
    assert reply.success and reply.message == "segmentation disabled"
    node.subscriptions["/image"].callback(image(400_000_000))
    t0 = time.monotonic()
    while node.core.counters["dropped_disabled"] == 0 and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert node.core.counters["dropped_disabled"] == 1 and len(pubs[f"{NODE}/labels"].messages) == 4
    assert enable(fr.SetBool.Request(True), fr.SetBool.Response()).success
    reset = node.services[f"{NODE}/reset"][1]
    assert reset(None, fr.Trigger.Response()).success
    feed(node, image(500_000_000), 4)
    assert infos[-1].is_key_frame and infos[-1].key_frame_reason == "reset"

    # diagnostics on the timer
    period, publish_diagnostics = node.timers[0]
    assert period == 1.0
    publish_diagnostics()
    (status,) = pubs["/diagnostics"].messages[-1].status
    assert status.name == f"{NODE}: segmentation" and status.level == fr.TYPESTORE.types[
        "diagnostic_msgs/msg/DiagnosticStatus"].OK
    values = {kv.key: kv.value for kv in status.values}
    assert values and any("key" in k for k in values)

    node.destroy_node()
    assert not node._worker.alive


def test_reset_service_alone_keys_the_next_frame(node_module):
    """~/reset makes the next frame a key frame by itself (above, the enable toggle before it also resets)."""
    start, _ = node_module
    node = start(max_frame_age_s=0, schedule="fixed:100")
    infos = node.publishers[f"{NODE}/info"].messages
    for i in range(2):
        feed(node, image(100_000_000 + i), i)
    assert node.services[f"{NODE}/reset"][1](None, fr.Trigger.Response()).success
    feed(node, image(100_000_002), 2)
    assert [(m.is_key_frame, m.key_frame_reason) for m in infos] == [(True, "first"), (False, ""), (True, "reset")]


def test_diagnostics_levels_reach_the_published_status(node_module):
    """The core's WARN / ERROR become DiagnosticStatus' levels (only OK was seen before): a camera
    whose every frame cannot be decoded (a depth encoding) is an ERROR for health monitors."""
    start, _ = node_module
    node = start(max_frame_age_s=0)
    try:
        bad = image(100_000_000)
        bad.encoding = "32FC1"
        for n in range(1, 4):
            node.subscriptions["/image"].callback(bad)
            t0 = time.monotonic()
            while node.core.counters["skipped_decode"] < n and time.monotonic() - t0 < 10:
                time.sleep(0.01)
        assert node.core.counters["skipped_decode"] == 3 and not node.publishers[f"{NODE}/labels"].messages
        _, publish_diagnostics = node.timers[0]
        publish_diagnostics()
        (status,) = node.publishers["/diagnostics"].messages[-1].status
        levels = fr.TYPESTORE.types["diagnostic_msgs/msg/DiagnosticStatus"]
        assert node.core.diagnostic_status().level_name == "ERROR"
        assert status.level == levels.ERROR, status.message
    finally:
        node.destroy_node()


def test_parameters_set_while_running(node_module):
    """``ros2 param set``: rclpy refuses read-only names, wrong types and out-of-range values
    itself; the node's callback refuses what only the whole configuration shows and applies the
    rest, the next frame being a key frame; parameters outside the table pass through."""
    start, _ = node_module
    node = start(max_frame_age_s=0, schedule="fixed:100")
    P, T = fr.Parameter, fr.ParameterType
    infos = node.publishers[f"{NODE}/info"].messages
    for i in range(2):
        feed(node, image(100_000_000 + i), i)
    assert [m.is_key_frame for m in infos] == [True, False]

    def set_one(name, value):
        (result,) = node.set_parameters([P(name, T.from_value(value), value)])
        return result

    refused = {
        "backend": (set_one("backend", "onnxruntime"), "read-only"),        # rclpy: read-only descriptor
        "image_size": (set_one("image_size", [720, 1280]), "read-only"),
        "max_interval": (set_one("max_interval", 2.5), "Wrong parameter type"),  # rclpy: INTEGER declared
        "overlay_alpha": (set_one("overlay_alpha", 2.0), "out of range"),     # rclpy: floating-point range
        "schedule": (set_one("schedule", "every frame"), "parameter 'schedule'"),  # the node's callback
        "min_interval": (set_one("min_interval", 50), "must be <= max_interval"),
    }
    for name, (result, words) in refused.items():
        assert not result.successful and words in result.reason, (name, result.reason)
    assert node.core.config.schedule == "fixed:100" and node.core.config.min_interval == 1
    feed(node, image(100_000_002), 2)
    assert not infos[-1].is_key_frame, "refused changes touch nothing"

    assert set_one("use_sim_time", True).successful  # not the node's to check
    assert set_one("scene_threshold", 2).successful  # a whole number for a float parameter
    assert node.core.config.scene_threshold == 2.0
    assert set_one("schedule", "fixed:2").successful
    assert node.get_parameter("schedule").value == "fixed:2"
    for i in range(3, 7):
        feed(node, image(100_000_000 + i), i)
    assert [(m.is_key_frame, m.key_frame_reason) for m in infos[3:]] == [
        (True, "reset"), (False, ""), (True, "interval"), (False, "")]
    assert any("parameters changed: schedule='fixed:2'" in text for _, text in node.get_logger().lines)
    node.destroy_node()


def test_lifecycle_node_states(node_module, monkeypatch):
    """The managed node: nothing loaded until configure (which can fail and be retried), input
    and output only while active, a key frame after each activation, everything released at
    cleanup; every parameter settable while unconfigured, only the dynamic ones after."""
    start, _ = node_module
    start()  # installs the stand-ins and the overrides
    import mpvss_ros.ros.node as node_py

    R = fr.TransitionCallbackReturn
    P, T = fr.Parameter, fr.ParameterType
    monkeypatch.setattr(fr.Node, "overrides", {**fr.Node.overrides, "max_frame_age_s": 0, "min_interval": 20})
    node = node_py.MPVSSLifecycleNode()
    seen = len(node.get_logger().lines)  # the stand-in's loggers live as long as the process
    try:
        assert node.state == "unconfigured" and node.core is None
        assert not node.publishers and not node.subscriptions and not node.services

        def set_one(name, value):
            (result,) = node.set_parameters([P(name, T.from_value(value), value)])
            return result

        assert set_one("backend", "torch").successful, "unconfigured: read-at-configure parameters too"
        assert "parameter 'schedule'" in set_one("schedule", "every frame").reason  # checked on its own
        # min_interval 20 > max_interval 10 shows only as a whole: configure fails, and can be retried
        assert node.trigger_configure() == R.FAILURE and node.state == "unconfigured"
        assert any(level == "error" and "cannot configure" in text and "min_interval" in text
                   for level, text in node.get_logger().lines[seen:])
        assert not node.publishers and node.core is None
        assert set_one("min_interval", 1).successful and set_one("schedule", "fixed:3").successful

        assert node.trigger_configure() == R.SUCCESS and node.state == "inactive"
        pubs = node.publishers
        assert f"{NODE}/labels" in pubs and not node.subscriptions and f"{NODE}/reset" in node.services
        assert not pubs[f"{NODE}/label_info"].messages
        refused = set_one("backend", "onnxruntime")
        assert not refused.successful and "read at configure" in refused.reason
        assert set_one("overlay_alpha", 0.3).successful and node.core.config.overlay_alpha == 0.3

        assert node.trigger_activate() == R.SUCCESS and node.state == "active"
        assert len(pubs[f"{NODE}/label_info"].messages) == 1
        infos = pubs[f"{NODE}/info"].messages
        for i in range(3):
            feed(node, image(100_000_000 + i), i)
        assert [m.is_key_frame for m in infos] == [True, False, False]
        worker, slot = node._worker, node._slot

        assert node.trigger_deactivate() == R.SUCCESS and node.state == "inactive"
        assert not node.subscriptions and not worker.alive
        assert node.core.diagnostic_status().message.startswith("disabled")  # not WARN for missing output
        node._pub_labels.publish(pubs[f"{NODE}/labels"].messages[-1])  # lifecycle publishers drop while inactive
        assert len(pubs[f"{NODE}/labels"].messages) == 3 and pubs[f"{NODE}/labels"].dropped == 1

        assert node.trigger_activate() == R.SUCCESS
        # a fresh slot: the one the stopped worker closed returns at once from every take (the new
        # worker would spin on a core) and may still hold a frame left at deactivate
        assert node._slot is not slot and not node._slot._closed
        feed(node, image(200_000_000), 3)
        feed(node, image(200_000_001), 4)
        assert [(m.is_key_frame, m.key_frame_reason) for m in infos[3:]] == [(True, "reset"), (False, "")]

        node.trigger_deactivate()
        assert node.trigger_cleanup() == R.SUCCESS and node.state == "unconfigured"
        assert node.core is None and not node.publishers and not node.services and not node.timers
        assert not node._managed, "lifecycle publishers released"
        assert set_one("backend", "torch").successful
        assert node.trigger_shutdown() == R.SUCCESS and node.state == "finalized"
    finally:
        node.destroy_node()


def test_lifecycle_configure_fails_cleanly_on_a_missing_model(node_module, monkeypatch):
    start, _ = node_module
    start()
    import mpvss_ros.ros.node as node_py

    monkeypatch.setattr(fr.Node, "overrides", {**fr.Node.overrides, "weights": "/nonexistent/model.pt"})
    node = node_py.MPVSSLifecycleNode()
    seen = len(node.get_logger().lines)  # the stand-in's loggers live as long as the process
    try:
        assert node.trigger_configure() == fr.TransitionCallbackReturn.FAILURE and node.state == "unconfigured"
        errors = [text for level, text in node.get_logger().lines[seen:] if level == "error"]
        assert len(errors) == 1 and "/nonexistent/model.pt" in errors[0] and "\n" not in errors[0]
        assert node.core is None and not node.publishers and not node.services and not node.timers
    finally:
        node.destroy_node()


def test_lifecycle_inactive_after_configure_is_not_a_diagnostics_warning(node_module):
    """Configured but not yet activated (autostart:=false, a lifecycle manager): no input is
    expected, so /diagnostics must not say WARN "no output", as after a deactivate."""
    start, _ = node_module
    start()
    import mpvss_ros.ros.node as node_py

    node = node_py.MPVSSLifecycleNode()
    try:
        assert node.trigger_configure() == fr.TransitionCallbackReturn.SUCCESS
        status = node.core.diagnostic_status(now=time.monotonic() + 30)  # 30 s inactive
        assert status.level_name == "OK", status.message
        # ~/enable true while inactive enabled nothing but turned /diagnostics to WARN "no output"
        enable = node.services[f"{NODE}/enable"][1]
        reply = enable(fr.SetBool.Request(True), fr.SetBool.Response())
        assert not reply.success and "inactive" in reply.message and not node.core.enabled
        status = node.core.diagnostic_status(now=time.monotonic() + 30)
        assert status.level_name == "OK" and status.message == "disabled (inactive: activate the node to resume)"
        assert enable(fr.SetBool.Request(False), fr.SetBool.Response()).success  # off stays off: no harm
        status = node.core.diagnostic_status(now=time.monotonic() + 30)  # still: ~/enable true would be refused
        assert status.message == "disabled (inactive: activate the node to resume)"
        assert node.trigger_activate() == fr.TransitionCallbackReturn.SUCCESS
        assert node.core.enabled
        status = node.core.diagnostic_status(now=time.monotonic() + 1)  # the no-output timer starts at activate
        assert status.level_name == "OK", status.message
    finally:
        node.destroy_node()


def test_lifecycle_activate_refuses_a_bad_input_override_in_one_line(node_module, monkeypatch):
    """The input subscription is made at activate: a refused qos_overrides value for it fails the
    transition with the same words as the plain node's fatal line (no exception type in front)."""
    start, _ = node_module
    start()
    import mpvss_ros.ros.node as node_py

    monkeypatch.setattr(fr.Node, "remappings", {"image": "/camera/image_raw"})
    monkeypatch.setattr(fr.Node, "overrides", {**fr.Node.overrides,
                                               "qos_overrides./camera/image_raw.subscription.history": "keep-last"})
    node = node_py.MPVSSLifecycleNode()
    seen = len(node.get_logger().lines)
    try:
        assert node.trigger_configure() == fr.TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == fr.TransitionCallbackReturn.FAILURE and not node.subscriptions
        errors = [text for level, text in node.get_logger().lines[seen:] if level == "error"]
        assert errors == ["cannot activate: cannot create topic '/camera/image_raw': Unexpected QoS override for "
                          "policy `history`: `keep-last` (check the qos_overrides./camera/image_raw.* parameters)"]
        # inactive again: /diagnostics OK "disabled" as after configure, not WARN "no output"
        assert not node.core.enabled
        assert node.core.diagnostic_status(now=time.monotonic() + 30).level_name == "OK"
    finally:
        node.destroy_node()


def _lifecycle_node(node_module, monkeypatch, **overrides):
    """A managed node (not configured), age check off, ``overrides`` among its parameters."""
    start, _ = node_module
    start()  # installs the stand-ins
    import mpvss_ros.ros.node as node_py

    monkeypatch.setattr(fr.Node, "overrides", {**fr.Node.overrides, "max_frame_age_s": 0, **overrides})
    return node_py.MPVSSLifecycleNode()


def _lifecycle_node_with_a_short_stop_wait(node_module, monkeypatch):
    """A managed node (not configured) whose deactivate waits 0.2 s for the worker's frame."""
    node = _lifecycle_node(node_module, monkeypatch)
    import mpvss_ros.ros.node as node_py

    monkeypatch.setattr(node_py, "_WORKER_STOP_S", 0.2)
    return node


def _hold_push(segmenter, release):
    """Make ``segmenter.push`` wait for ``release`` (a frame longer than the node's wait for it: a
    TensorRT engine build). Returns ``(entered, peak)``: set once a frame is in push, and the most
    threads seen in push at once (``peak[0]``). Assigned, not monkeypatched: monkeypatch would
    hold the segmenter, and with it the model, until the test ends."""
    real_push, inside, peak, lock = segmenter.push, [0], [0], threading.Lock()
    entered = threading.Event()

    def held_push(*args, **kwargs):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        entered.set()
        try:
            release.wait(10.0)
            return real_push(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    segmenter.push = held_push
    return entered, peak


def test_lifecycle_never_runs_two_workers(node_module, monkeypatch):
    """A deactivate whose wait for the worker runs out (a frame longer than the wait: a TensorRT
    engine build) leaves that worker in its frame; an activate then must not start a second one
    beside it, which would run the engine on two threads at once. It is refused until the frame
    is done, then succeeds."""
    node = _lifecycle_node_with_a_short_stop_wait(node_module, monkeypatch)
    R = fr.TransitionCallbackReturn
    release = threading.Event()
    try:
        assert node.trigger_configure() == R.SUCCESS and node.trigger_activate() == R.SUCCESS
        entered, peak = _hold_push(node.core.segmenter, release)
        old = node._worker
        node.subscriptions["/image"].callback(image(100_000_000))
        assert entered.wait(5.0)
        seen = len(node.get_logger().lines)
        assert node.trigger_deactivate() == R.SUCCESS and old.alive
        assert node.trigger_activate() == R.FAILURE and node._worker is old and not node.subscriptions
        lines = node.get_logger().lines[seen:]
        waits = [text for level, text in lines if level == "warning" and "still segmenting a frame after 0.2 s" in text]
        assert len(waits) == 1, waits  # the deactivate's; a second wait in activate's failure path logged another
        assert any(level == "error" and "cannot activate: the previous worker thread is still segmenting" in text
                   for level, text in lines)
        release.set()
        assert old.stop(timeout=10.0)  # its frame done (longer than the shortened wait in activate)
        assert node.trigger_activate() == R.SUCCESS and node._worker is not old
        node.subscriptions["/image"].callback(image(200_000_000))
        time.sleep(0.5)
        assert peak[0] == 1
    finally:
        release.set()
        node.destroy_node()


def test_cleanup_while_the_worker_is_in_a_frame_keeps_it_and_releases_the_model_after(node_module, monkeypatch):
    """deactivate (its wait runs out) -> cleanup -> configure -> activate while the old worker is
    still in its frame: cleanup dropped the worker, so activate started a second one beside it
    (two threads in the engine). Now activate is refused until that frame ends; the old model is
    let go once it has, and a message left waiting in the slot is counted as dropped."""
    import gc
    import weakref

    node = _lifecycle_node_with_a_short_stop_wait(node_module, monkeypatch)
    R = fr.TransitionCallbackReturn
    release = threading.Event()
    try:
        assert node.trigger_configure() == R.SUCCESS and node.trigger_activate() == R.SUCCESS
        old_core = node.core
        entered, _ = _hold_push(old_core.segmenter, release)
        old, old_model = node._worker, weakref.ref(old_core.loaded.model)
        node.subscriptions["/image"].callback(image(100_000_000))
        assert entered.wait(5.0)
        node.subscriptions["/image"].callback(image(200_000_000))  # waits in the slot
        assert node.trigger_deactivate() == R.SUCCESS and old.alive
        counters = old_core.counters
        assert node.trigger_cleanup() == R.SUCCESS and node._worker is old
        assert node.trigger_configure() == R.SUCCESS
        assert node.trigger_activate() == R.FAILURE and node._worker is old and old.alive
        release.set()
        assert old.stop(timeout=10.0)
        # both dropped: the frame under way when deactivate switched inference off, and the one waiting
        assert counters["received"] == 2 and (counters["processed"], counters["dropped_disabled"]) == (0, 2)
        del old_core
        gc.collect()
        assert old_model() is None, "the old model is released once its worker's frame is done"
        assert node.trigger_activate() == R.SUCCESS and node._worker is not old
    finally:
        release.set()
        node.destroy_node()


@pytest.mark.parametrize("overrides, words", [
    ({"threads": 1.5}, "parameter 'threads'"),                   # rclpy refuses the type
    ({"max_gap_s": "two"}, "parameter 'max_gap_s'"),             # validate() refuses it
    ({"schedule": "every frame"}, "parameter 'schedule'"),
    ({"weights": "/nonexistent/model.pt"}, "/nonexistent/model.pt"),
    ({"palette": [0x102030] * 12}, "parameter 'palette': 12 colours"),  # the core refuses: 11 classes
    # qos_overrides values rclpy refuses: an unknown policy value (RuntimeError), a depth of
    # another type (InvalidParameterTypeException)
    ({f"qos_overrides.{NODE}/overlay.publisher.reliability": "best-effort"},
     f"cannot create topic '{NODE}/overlay': Unexpected QoS override for policy `reliability`: `best-effort` "
     f"(check the qos_overrides.{NODE}/overlay.* parameters)"),
    ({"qos_overrides./image.subscription.depth": "5"}, "cannot create topic '/image'"),
])
def test_bad_parameters_stop_the_node_with_one_line(node_module, overrides, words):
    start, _ = node_module
    import mpvss_ros.ros.core as core

    with pytest.raises(core.StartupError) as info:
        start(**overrides)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_an_untrained_model_starts_with_a_warning(node_module, monkeypatch):
    """A model without trained weights starts, with one warning that its labels are meaningless."""
    import mpvss_ros.ros.core as core

    start, _ = node_module
    load = core.load_configured_model
    monkeypatch.setattr(core, "load_configured_model", lambda cfg: dataclasses.replace(load(cfg), trained=False))
    node = start()
    assert [text for level, text in node.get_logger().lines if level == "warning"] == [
        f"model {node.core.loaded.config.name} has no trained weights: labels are meaningless"]


def test_the_threads_parameter_sets_torchs_thread_count(node_module):
    """``threads`` reaches torch at start (the fixture gives torch its count back afterwards)."""
    start, _ = node_module
    wanted = torch.get_num_threads() + 1
    start(threads=wanted)
    assert torch.get_num_threads() == wanted


def test_the_input_qos_override_is_named_after_the_remapped_topic(node_module, monkeypatch):
    """rclpy names a subscription's qos_overrides after its resolved, remapped topic (what the
    launch file's image:=... makes of ``image``), not after the node."""
    start, _ = node_module
    monkeypatch.setattr(fr.Node, "remappings", {"image": "/camera/image_raw"})
    node = start(**{"qos_overrides./camera/image_raw.subscription.depth": 5,
                    "qos_overrides./camera/image_raw.subscription.reliability": "reliable",
                    f"qos_overrides.{NODE}/image.subscription.depth": 9})  # names nothing: no effect
    (sub,) = node.subscriptions.values()
    assert sub.topic_name == "/camera/image_raw"
    assert (sub.qos.depth, sub.qos.reliability) == (5, fr.ReliabilityPolicy.RELIABLE)


def test_main_exit_status(node_module, monkeypatch):
    """main's status: 1 when the node cannot start, else 0 once shut down, the node destroyed and
    its worker stopped (so the process is not ended with os._exit under a live worker, which
    would also end pytest, with status 0)."""
    start, runtime = node_module
    import mpvss_ros.ros.node as node_py

    def no_exit(status):
        raise AssertionError(f"os._exit({status}) under a live worker")

    monkeypatch.setattr(os, "_exit", no_exit)
    monkeypatch.setattr(fr.Node, "overrides", {"device": "cpu", "weights": "/nonexistent/model.pt"})
    assert node_py.main([]) == 1
    assert any(level == "fatal" and "cannot start" in text for level, text in fr.get_logger("mpvss_segmenter").lines)
    assert not runtime.ok()

    monkeypatch.setattr(fr.Node, "overrides", {"device": "cpu", "threads": torch.get_num_threads()})
    assert node_py.main([]) == 0
    (node,) = runtime.spun
    assert node.destroyed and not node._worker.alive and not runtime.ok()
    # the executor never waits unbounded: a shutdown that raced with building its wait set went
    # unnoticed by a node without a timer (SIGTERM ignored until killed)
    assert runtime.spin_timeouts == [node_py._SPIN_WAIT_S] and 0 < node_py._SPIN_WAIT_S <= 1.0


# Wiring the tests above leave unchecked.

# -- input subscription: what the input_* parameters decide ------------------------------------

@pytest.mark.parametrize("reliability, depth, policy", [
    ("reliable", 5, "RELIABLE"), ("system_default", 3, "SYSTEM_DEFAULT"), ("best_effort", 7, "BEST_EFFORT")])
def test_input_qos_follows_input_reliability_and_input_depth(node_module, reliability, depth, policy):
    start, _ = node_module
    node = start(input_reliability=reliability, input_depth=depth)
    (sub,) = node.subscriptions.values()
    assert (sub.qos.reliability, sub.qos.depth, sub.qos.history) == (
        fr.ReliabilityPolicy[policy], depth, fr.HistoryPolicy.KEEP_LAST)


def test_compressed_input_subscribes_to_image_compressed(node_module):
    start, _ = node_module
    node = start(input_compressed=True)
    assert list(node.subscriptions) == ["/image/compressed"]
    assert node.subscriptions["/image/compressed"].msg_type is fr.MESSAGE_TYPES.compressed_image


# -- output publishers ---------------------------------------------------------------------------

def test_switched_off_outputs_have_no_publisher(node_module):
    start, _ = node_module
    node = start(publish_colored=False, publish_overlay=True, publish_class_masks=False)
    assert set(node.publishers) == {f"{NODE}/{t}" for t in ("labels", "confidence", "info", "overlay",
                                                             "label_info")} | {"/diagnostics"}
    assert node._pub_colored is None and node._pub_masks is None


def test_colored_and_class_masks_reach_their_own_topics_with_the_input_header(node_module):
    start, _ = node_module
    node = start(max_frame_age_s=0)
    pubs = node.publishers
    pubs[f"{NODE}/colored"].subscribers = 1
    pubs[f"{NODE}/class_masks"].subscribers = 1
    feed(node, image(123_000_000), 0)
    (colored,) = pubs[f"{NODE}/colored"].messages
    (masks,) = pubs[f"{NODE}/class_masks"].messages
    assert not pubs[f"{NODE}/overlay"].messages  # nobody subscribed to it
    assert (colored.encoding, colored.height, colored.width) == ("rgb8", 48, 64)
    assert isinstance(masks, fr.MESSAGE_TYPES.class_masks)
    for msg in (colored, masks):
        assert (msg.header.stamp.nanosec, msg.header.frame_id) == (123_000_000, "camera_optical")


def test_label_info_at_start_carries_the_node_clock_stamp(node_module):
    start, _ = node_module
    before = time.time()
    node = start()
    (info,) = node.publishers[f"{NODE}/label_info"].messages
    assert before - 5 <= info.header.stamp.sec <= time.time() + 5


# -- diagnostics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["OK", "WARN", "ERROR"])
def test_diagnostics_publishes_the_core_level_device_and_stamp(node_module, monkeypatch, level):
    import mpvss_ros.ros.core as core

    start, _ = node_module
    node = start()
    summary = core.DiagnosticSummary(getattr(core, level), "a message", [("key_a", "1")])
    monkeypatch.setattr(node.core, "diagnostic_status", lambda now=None: summary)
    before = time.time()
    _, publish_diagnostics = node.timers[0]
    publish_diagnostics()
    array = node.publishers["/diagnostics"].messages[-1]
    (status,) = array.status
    levels = fr.TYPESTORE.types["diagnostic_msgs/msg/DiagnosticStatus"]
    assert status.level == getattr(levels, level) and status.message == "a message"
    assert status.hardware_id == str(node.core.loaded.device) == "cpu"
    assert [(kv.key, kv.value) for kv in status.values] == [("key_a", "1")]
    assert before - 5 <= array.header.stamp.sec <= time.time() + 5


def test_diagnostics_period_follows_its_parameter(node_module):
    start, _ = node_module
    node = start(diagnostics_period_s=2.5)
    ((period, _),) = node.timers
    assert period == 2.5


# -- parameters ----------------------------------------------------------------------------------

def test_an_unexpected_error_while_reconfiguring_is_answered_not_raised(node_module, monkeypatch):
    """An exception out of the on-set-parameters callback would end the executor's spin."""
    start, _ = node_module
    node = start()

    def boom(changes):
        raise RuntimeError("boom")

    monkeypatch.setattr(node.core, "reconfigure", boom)
    (result,) = node.set_parameters([fr.Parameter("schedule", fr.ParameterType.STRING, "fixed:4")])
    assert not result.successful and result.reason == "RuntimeError: boom"


def test_rclpy_refuses_an_integer_out_of_its_declared_range(node_module):
    """The integer ranges reach the descriptor (ros2 param describe, rqt); rclpy refuses before the core.
    Every descriptor carries the table's description, constraints, typing and range, and the plain
    node's non-dynamic parameters are read-only, so rclpy itself refuses them."""
    from mpvss_ros.ros.parameters import PARAMETERS, descriptor_fields

    start, _ = node_module
    node = start()
    (result,) = node.set_parameters([fr.Parameter("max_interval", fr.ParameterType.INTEGER, 0)])
    assert not result.successful and "out of range" in result.reason
    for spec in PARAMETERS:
        f, d = descriptor_fields(spec), node._descriptors[spec.name]
        assert (d.description, d.additional_constraints, d.read_only, d.dynamic_typing) == (
            f["description"], f["additional_constraints"], f["read_only"], f["dynamic_typing"]), spec.name
        for got, want in ((d.integer_range, f["integer_range"]), (d.floating_point_range, f["floating_point_range"])):
            assert [(r.from_value, r.to_value, r.step) for r in got] == ([tuple(want)] if want else []), spec.name
    assert node._descriptors["backend"].read_only and not node._descriptors["schedule"].read_only
    (result,) = node.set_parameters([fr.Parameter("backend", fr.ParameterType.STRING, "onnxruntime")])
    assert not result.successful and result.reason == "Trying to set a read-only parameter: backend."


def test_a_depth_of_another_type_names_its_override(node_module):
    start, _ = node_module
    import mpvss_ros.ros.core as core

    with pytest.raises(core.StartupError) as info:
        start(**{"qos_overrides./image.subscription.depth": "5"})
    assert "(check the qos_overrides./image.* parameters)" in str(info.value)


# -- lifecycle -----------------------------------------------------------------------------------

def test_lifecycle_failed_activate_leaves_the_publishers_inactive(node_module, monkeypatch):
    monkeypatch.setattr(fr.Node, "remappings", {"image": "/camera/image_raw"})
    node = _lifecycle_node(node_module, monkeypatch,
                           **{"qos_overrides./camera/image_raw.subscription.history": "keep-last"})
    R = fr.TransitionCallbackReturn
    try:
        assert node.trigger_configure() == R.SUCCESS
        assert node.trigger_activate() == R.FAILURE and node.state == "inactive"
        assert node._managed and not any(p.enabled for p in node._managed)
    finally:
        node.destroy_node()


def test_lifecycle_shutdown_while_active_releases_everything(node_module, monkeypatch):
    node = _lifecycle_node(node_module, monkeypatch)
    R = fr.TransitionCallbackReturn
    try:
        assert node.trigger_configure() == R.SUCCESS and node.trigger_activate() == R.SUCCESS
        feed(node, image(100_000_000), 0)
        worker = node._worker
        assert node.trigger_shutdown() == R.SUCCESS and node.state == "finalized"
        assert node.core is None and not worker.alive
        assert not node.publishers and not node.subscriptions and not node.services and not node.timers
        assert not node._managed
    finally:
        node.destroy_node()


def test_lifecycle_error_in_a_transition_releases_everything(node_module, monkeypatch):
    """A transition callback that raises (here deactivate's unsubscribe, once) goes to on_error,
    which must undo configure: rclpy then goes to unconfigured, and the next configure would
    otherwise load a second model beside the first."""
    node = _lifecycle_node(node_module, monkeypatch)
    R = fr.TransitionCallbackReturn
    real, calls = node.destroy_subscription, []

    def flaky(sub):
        calls.append(sub)
        if len(calls) == 1:
            raise RuntimeError("middleware hiccup")
        return real(sub)

    try:
        assert node.trigger_configure() == R.SUCCESS and node.trigger_activate() == R.SUCCESS
        monkeypatch.setattr(node, "destroy_subscription", flaky)
        assert node.trigger_deactivate() == R.ERROR and node.state == "unconfigured"
        assert node.core is None and not node.publishers and not node.services and not node.timers
        assert not node.subscriptions
    finally:
        node.destroy_node()


def test_cleanup_of_one_lifecycle_node_leaves_another_alone(node_module, monkeypatch):
    """Two managed nodes in one process (composition): each destroys only what it made."""
    a = _lifecycle_node(node_module, monkeypatch)
    b = type(a)()
    R = fr.TransitionCallbackReturn
    try:
        assert a.trigger_configure() == R.SUCCESS and b.trigger_configure() == R.SUCCESS
        b_publishers = set(b.publishers)
        assert a.trigger_cleanup() == R.SUCCESS and not a.publishers
        assert set(b.publishers) == b_publishers and b.timers and b.services
    finally:
        a.destroy_node()
        b.destroy_node()


_SHUTDOWN_IN_A_LONG_FRAME = """
import sys, threading, time
import pytest, torch
import fake_rclpy as fr
from test_node_shell import image

torch.set_num_threads(1)
mp = pytest.MonkeyPatch()
runtime = fr.install(mp)
mp.setattr(fr.Node, "overrides", {"device": "cpu", "threads": 1, "max_frame_age_s": 0})
import mpvss_ros.ros.node as node_py

mp.setattr(node_py, "_WORKER_STOP_S", 0.2)
entered, real_init = threading.Event(), node_py.MPVSSNode.__init__

def init(self, **kwargs):
    real_init(self, **kwargs)
    real_push = self.core.segmenter.push

    def long_push(*args, **kw):  # a frame of 2 s of torch work (a TensorRT engine build: minutes)
        entered.set()
        x, t0 = torch.randn(128, 128), time.monotonic()
        while time.monotonic() - t0 < 2.0:
            x = torch.tanh(x @ x)
        return real_push(*args, **kw)

    self.core.segmenter.push = long_push
    self.subscriptions["/image"].callback(image(100_000_000))
    assert entered.wait(10.0)  # SIGINT comes while that frame runs

mp.setattr(node_py.MPVSSNode, "__init__", init)
sys.exit(node_py.main([]))
"""


def test_shutdown_during_a_frame_longer_than_the_wait_ends_the_process_with_its_status(tmp_path):
    """Ctrl-C while the worker is in a frame longer than the node's wait for it: main returned 0,
    then the interpreter exited under the daemon worker thread inside torch and the process
    aborted (exit status 134, "terminate called without an active exception")."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    script = tmp_path / "shutdown_in_a_long_frame.py"
    script.write_text(_SHUTDOWN_IN_A_LONG_FRAME)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "terminate called" not in run.stderr


@pytest.mark.parametrize("error", ["RCLError", "ExternalShutdownException"])
def test_an_error_of_the_shut_down_context_ends_main_cleanly(node_module, monkeypatch, error):
    """SIGTERM while the executor builds its wait set: rclpy raised RCLError ('the given context
    is not valid') out of spin, and the node exited 1 with a traceback."""
    start, runtime = node_module
    import mpvss_ros.ros.node as node_py

    monkeypatch.setattr(fr.Node, "overrides", {"device": "cpu", "threads": torch.get_num_threads()})
    runtime.spin_once_error = fr.RCLError("failed to initialize wait set: the given context is not valid") \
        if error == "RCLError" else fr.ExternalShutdownException()
    assert node_py.main_lifecycle([]) == 0
    assert runtime.spun[-1].destroyed


def test_after_shutdown_the_worker_ends_quietly(node_module):
    """rclpy's signal handler ends the context before the node stops its worker: a publisher (or a
    subscription count) of the dead context then raises, which the worker logged as an ERROR with a
    traceback on SIGTERM (2 of 22 shutdowns on the mini ROS 2 stack). Before shutdown the same
    error is counted and logged, and the worker goes on."""
    start, _ = node_module
    node = start(max_frame_age_s=0)
    try:
        feed(node, image(100_000_000), 0)

        def refuse(msg):
            raise fr.RCLError("Failed to publish: publisher's context is invalid")

        node.publishers[f"{NODE}/labels"].publish = refuse
        worker, seen = node._worker, len(node.get_logger().lines)
        node.subscriptions["/image"].callback(image(200_000_000))

        def logged() -> bool:  # counted first, then logged: wait for the line
            return any(level == "error" and "publishing failed" in text for level, text in node.get_logger().lines[seen:])

        t0 = time.monotonic()
        while not logged() and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert logged() and node.core.counters["errors"] == 1 and worker.alive
        fr.Context.shut_down = True
        seen = len(node.get_logger().lines)
        node.subscriptions["/image"].callback(image(300_000_000))
        worker._thread.join(10)
        assert not worker.alive and node.core.counters["errors"] == 1
        assert not [text for level, text in node.get_logger().lines[seen:] if level == "error"]
    finally:
        fr.Context.shut_down = False
        node.destroy_node()


def test_lifecycle_refused_transitions_are_answered(node_module, monkeypatch):
    """rclpy Humble/Jazzy raise RCLError out of ~/change_state for a transition the state machine
    refuses (activate while unconfigured, by ID as Nav2's lifecycle manager asks), so the caller
    never got an answer; the managed node answers success false, logs why and stays as it was.
    The managed main spins and exits like the plain one."""
    start, runtime = node_module
    start()
    import mpvss_ros.ros.node as node_py

    def change_state(node, transition_id: int = 0, label: str = ""):
        request = SimpleNamespace(transition=SimpleNamespace(id=transition_id, label=label))
        return node._service_change_state.callback(request, SimpleNamespace(success=None)).success

    node = node_py.MPVSSLifecycleNode()
    assert change_state(node, 3) is False  # activate while unconfigured
    assert node.state == "unconfigured"
    assert any(level == "error" and "transition 'activate' (ID 3) refused" in text and "Failed to trigger" in text
               for level, text in node.get_logger().lines)
    assert change_state(node, label="deactivate") is False
    assert change_state(node, 1) is True and node.state == "inactive"  # configure still works
    assert change_state(node, 3) is True and node.state == "active"
    node.destroy_node()

    monkeypatch.setattr(fr.Node, "overrides", {"device": "cpu", "threads": torch.get_num_threads()})
    assert node_py.main_lifecycle([]) == 0
    (spun,) = runtime.spun[-1:]
    assert isinstance(spun, node_py.MPVSSLifecycleNode) and spun.destroyed and not runtime.ok()


def test_lifecycle_configure_undoes_a_failure_half_way(node_module, monkeypatch):
    """Any exception while configuring (here the third publisher, as a refused qos_overrides value
    would) is logged and undone: FAILURE, no publisher, service or timer left behind."""
    start, _ = node_module
    start()
    import mpvss_ros.ros.node as node_py

    node = node_py.MPVSSLifecycleNode()
    real = node.create_lifecycle_publisher
    made = []

    def flaky(*args, **kwargs):
        if len(made) == 2:
            raise RuntimeError("Unexpected QoS override")
        made.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(node, "create_lifecycle_publisher", flaky)
    seen = len(node.get_logger().lines)
    try:
        assert node.trigger_configure() == fr.TransitionCallbackReturn.FAILURE and node.state == "unconfigured"
        assert made == ["~/labels", "~/confidence"]
        assert not node.publishers and not node._managed and not node.services and not node.timers
        assert node.core is None
        assert any(level == "error" and f"cannot configure: cannot create topic '{NODE}/info': Unexpected QoS override"
                   in text
                   for level, text in node.get_logger().lines[seen:])
        monkeypatch.setattr(node, "create_lifecycle_publisher", real)
        assert node.trigger_configure() == fr.TransitionCallbackReturn.SUCCESS  # and it can be retried
    finally:
        node.destroy_node()


def test_palette_back_to_the_model_default_and_no_deleting(node_module):
    """``palette: []`` reaches rclpy as a byte (or, from ros2 param set, bool) array; the
    dynamically typed parameter takes it and the model's palette returns. Deleting one of the
    node's parameters is refused before rclpy would undeclare it."""
    start, _ = node_module
    node = start(max_frame_age_s=0, palette=[0xFF0000])
    P, T = fr.Parameter, fr.ParameterType
    assert node.core.config.palette == (0xFF0000,) and tuple(node.core.palette[0]) == (255, 0, 0)
    (result,) = node.set_parameters([P("palette", T.from_value([]), [])])
    assert T.from_value([]) == T.BYTE_ARRAY and result.successful, result.reason
    assert node.core.config.palette == ()
    assert tuple(node.core.palette[0]) == tuple(node.core.loaded.config.palette[0])  # the model's (Sky grey)
    (result,) = node.set_parameters([P("palette", T.BOOL_ARRAY, [])])  # what `ros2 param set ... "[]"` sends
    assert result.successful, result.reason
    (result,) = node.set_parameters([P("palette", T.from_value([0x00FF00, 7]), [0x00FF00, 7])])
    assert result.successful and node.core.config.palette == (0x00FF00, 7)
    assert tuple(node.core.palette[0]) == (0, 255, 0)
    (result,) = node.set_parameters([P("palette", T.NOT_SET, None)])  # ros2 param delete
    assert not result.successful and "cannot be deleted" in result.reason
    assert node.get_parameter("palette").value == [0x00FF00, 7]
    (result,) = node.set_parameters([P("max_interval", T.NOT_SET, None)])  # statically typed
    assert not result.successful and "Static parameter cannot be undeclared" in result.reason
    node.destroy_node()
    unset = start(palette=None)  # `palette: []` in a params file reaches rclpy without a value
    assert unset.core.config.palette == () and unset.get_parameter("palette").value is None
    unset.destroy_node()


def test_worker_survives_a_warning_then_an_error_on_the_rclpy_logger(node_module, monkeypatch):
    """rclpy binds each logging call site to one severity (rcutils_logger.py: "Logger severity
    cannot be changed between calls."): a stale-frame warning and then an engine error, both
    logged through the core's throttled logger, must not kill the worker thread."""
    start, _ = node_module
    node = start(max_frame_age_s=1.0)
    slot = node.subscriptions["/image"].callback
    slot(image(0))  # stamped in 2023: stale, a warning
    t0 = time.monotonic()
    while node.core.counters["dropped_stale"] == 0 and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert node.core.counters["dropped_stale"] == 1

    def fresh():
        msg = image(0)
        now = time.time_ns()
        msg.header.stamp = fr.MESSAGE_TYPES.time(sec=now // 10**9, nanosec=now % 10**9)
        return msg

    push = node.core.segmenter.push
    monkeypatch.setattr(node.core.segmenter, "push", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    slot(fresh())  # the engine fails: an error
    t0 = time.monotonic()
    while node.core.counters["errors"] == 0 and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    time.sleep(0.3)
    assert node._worker.alive, "the worker thread died"
    assert node.core.counters["errors"] == 1
    assert any(level == "error" and "boom" in text for level, text in node.get_logger().lines)
    monkeypatch.setattr(node.core.segmenter, "push", push)
    feed(node, fresh(), 0)  # segmenting goes on


def test_lifecycle_cleanup_releases_the_model(node_module, monkeypatch):
    """After cleanup nothing of the node holds the core or the model (the README: ``cleanup``
    releases the model): not the stopped worker, not the slot whose hooks are the core's methods.
    Otherwise the model (GPU memory on a GPU) stays until the next activate, and the next
    configure loads a second copy beside it."""
    import gc
    import weakref

    start, _ = node_module
    start()  # installs the stand-ins and the overrides
    import mpvss_ros.ros.node as node_py

    R = fr.TransitionCallbackReturn
    monkeypatch.setattr(fr.Node, "overrides", {**fr.Node.overrides, "max_frame_age_s": 0})
    node = node_py.MPVSSLifecycleNode()
    try:
        assert node.trigger_configure() == R.SUCCESS and node.trigger_activate() == R.SUCCESS
        feed(node, image(100_000_000), 0)
        core, model = weakref.ref(node.core), weakref.ref(node.core.loaded.model)
        assert node.trigger_deactivate() == R.SUCCESS and node.trigger_cleanup() == R.SUCCESS
        gc.collect()
        assert core() is None, "the core outlives cleanup"
        assert model() is None, "the model outlives cleanup"
        # and the node comes back as before
        assert node.trigger_configure() == R.SUCCESS and node.trigger_activate() == R.SUCCESS
        feed(node, image(200_000_000), 0)  # new publishers
    finally:
        node.destroy_node()


# -- lifecycle, property-based: random sequences of transitions, frames, parameters, services ----

#: The ROS 2 managed-node state machine (design.ros2.org/articles/node_lifecycle.html): the
#: states a transition may start from and its goal on SUCCESS.
_LIFECYCLE_TRANSITIONS = {"configure": (("unconfigured",), "inactive"), "activate": (("inactive",), "active"),
                          "deactivate": (("active",), "inactive"), "cleanup": (("inactive",), "unconfigured"),
                          "shutdown": (("unconfigured", "inactive", "active"), "finalized")}
#: (name, value, kind) of ``ros2 param set`` requests: ``dynamic`` changes apply in every state,
#: ``fixed`` ones (read at configure) only while unconfigured, ``invalid`` ones never.
_LIFECYCLE_PARAMETER_SETS = [
    ("schedule", "fixed:100", "dynamic"), ("overlay_alpha", 0.3, "dynamic"), ("scene_threshold", 2, "dynamic"),
    ("schedule", "every frame", "invalid"), ("overlay_alpha", 2.0, "invalid"), ("max_interval", 2.5, "invalid"),
    ("backend", "torch", "fixed"), ("input_depth", 2, "fixed"), ("publish_overlay", True, "fixed"),
    ("weights", "/nonexistent/model.pt", "fixed"), ("weights", "", "fixed"),
]
_OUTPUT_TOPICS = ("labels", "confidence", "info")
#: Camera frames: good, a resolution change, a stamp going backwards, an undecodable encoding, cut data.
_FRAME_KINDS = st.lists(st.sampled_from(["good", "good", "resized", "backwards", "32FC1", "truncated"]),
                        min_size=1, max_size=4)


class LifecycleMachine(RuleBasedStateMachine):
    """One managed node driven through ``~/change_state`` (valid, invalid and repeated
    transitions), camera frames (good, bad encoding, truncated data, resolution changes, stamps
    going backwards), parameter sets, ``~/enable`` / ``~/reset`` calls, diagnostics ticks and
    configures that fail on a missing weights file. Built by :func:`test_lifecycle_random_sequences`."""

    node_class: type = None

    def __init__(self):
        super().__init__()
        self.other_workers = set(threading.enumerate())  # the fixture's plain node runs one
        self.nanosec = 100_000_000
        self.new_node()

    def new_node(self):
        """A fresh managed node (unconfigured, the params file's values)."""
        self.node = self.node_class()
        self.state = "unconfigured"
        self.weights_missing = False
        self.enabled = False
        self.expect_key_frame = False
        self.last_pushed = None  # (stamp ns, (h, w)) of the last frame that reached the engine

    def teardown(self):
        """Destroying the node leaves no worker thread running."""
        worker = self.node._worker
        self.node.destroy_node()
        assert worker is None or not worker.alive, "a worker thread outlives destroy_node"

    @rule(data=st.data(), by_id=st.booleans())
    def next_state(self, data, by_id):
        """A transition the current state allows other than shutdown (bringing the node up more
        often than :meth:`change_state` alone would)."""
        allowed = [n for n, (sources, _) in _LIFECYCLE_TRANSITIONS.items() if self.state in sources and n != "shutdown"]
        self.change_state(data.draw(st.sampled_from(allowed)), by_id)

    @rule(name=st.sampled_from(["configure", "activate", "deactivate", "cleanup"] * 2 + ["shutdown"]),
          by_id=st.booleans())
    def change_state(self, name, by_id):
        """Every transition is answered (never raised): SUCCESS moves to the goal state, one the
        current state does not allow is ``success: false`` and changes nothing, and a configure
        without its weights file fails back to unconfigured."""
        ids = {"configure": 1, "cleanup": 2, "activate": 3, "deactivate": 4,
               "shutdown": {"unconfigured": 5, "inactive": 6}.get(self.state, 7)}
        request = SimpleNamespace(transition=SimpleNamespace(id=ids[name] if by_id else 0, label="" if by_id else name))
        success = self.node._service_change_state.callback(request, SimpleNamespace(success=None)).success
        sources, goal = _LIFECYCLE_TRANSITIONS[name]
        allowed = self.state in sources
        fails = name == "configure" and self.weights_missing
        assert success is (allowed and not fails), (name, self.state, success)
        if success:
            self.state = goal
            if name == "activate":
                self.enabled, self.expect_key_frame = True, True
            if name in ("deactivate", "cleanup", "shutdown"):
                self.enabled = False
        if name == "shutdown" and success:  # finalized: nothing is left and nothing more is allowed
            self.entities_follow_the_state()
            for refused in sorted(_LIFECYCLE_TRANSITIONS):
                request = SimpleNamespace(transition=SimpleNamespace(id=0, label=refused))
                assert self.node._service_change_state.callback(request, SimpleNamespace()).success is False
            assert self.node.state == "finalized"
            self.teardown()  # a finalized node can only be destroyed: go on with a new one
            self.new_node()

    @precondition(lambda self: self.state == "active")
    @rule(kinds=_FRAME_KINDS)
    def images_arrive(self, kinds):
        """Frames reach the node through its subscription (which exists only while active: see
        :meth:`entities_follow_the_state`), one at a time."""
        for kind in kinds:
            self.image_arrives(kind)

    def image_arrives(self, kind):
        """Once the worker is done with a frame, a good one while enabled is published with the
        input's exact header and size (a key frame after activate, reset, re-enable, a resolution
        change or a stamp going backwards), a bad one is counted as skipped, one while disabled as
        dropped, and every received frame is counted once."""
        sub = self.node.subscriptions["/image"]
        h, w = (24, 32) if kind == "resized" else (48, 64)
        self.nanosec += -5_000_000 if kind == "backwards" else 1_000_000
        msg = image(self.nanosec, h, w)
        if kind == "32FC1":
            msg.encoding = "32FC1"
        if kind == "truncated":
            msg.data = msg.data[: len(msg.data) // 2]
        core, labels = self.node.core, self.node.publishers[f"{NODE}/labels"]
        before, count = dict(core.counters), len(labels.messages)
        sub.callback(msg)
        outcomes = ("published", "dropped_stale", "dropped_replaced", "dropped_disabled", "skipped_decode",
                    "skipped_frame", "errors")
        t0 = time.monotonic()
        while sum(core.counters[k] for k in outcomes) < core.counters["received"] and time.monotonic() - t0 < 30:
            time.sleep(0.005)
        after = dict(core.counters)
        delta = {k: after[k] - before[k] for k in ("received", *outcomes) if after[k] != before[k]}
        good = kind in ("good", "resized", "backwards")
        want = "dropped_disabled" if not self.enabled else "published" if good else "skipped_decode"
        assert delta == {"received": 1, want: 1}, (kind, self.enabled, delta)
        if want != "published":
            assert len(labels.messages) == count
            return
        key = self.expect_key_frame or (self.last_pushed is not None and (
            self.last_pushed[1] != (h, w) or self.nanosec < self.last_pushed[0]))
        self.last_pushed, self.expect_key_frame = (self.nanosec, (h, w)), False
        for topic in _OUTPUT_TOPICS:
            out = self.node.publishers[f"{NODE}/{topic}"].messages[-1]
            assert (out.header.stamp.sec, out.header.stamp.nanosec, out.header.frame_id) == (
                SEC, self.nanosec, "camera_optical"), topic
        assert (labels.messages[-1].height, labels.messages[-1].width) == (h, w) and len(labels.messages) == count + 1
        info = self.node.publishers[f"{NODE}/info"].messages[-1]
        if key:
            assert info.is_key_frame, (kind, info.key_frame_reason)

    @rule(entry=st.sampled_from(_LIFECYCLE_PARAMETER_SETS))
    def set_parameter(self, entry):
        """rclpy and the node refuse invalid values in every state, and read-at-configure ones once
        configured; a refused set changes nothing."""
        name, value, kind = entry
        old = self.node.get_parameter(name).value
        (result,) = self.node.set_parameters([fr.Parameter(name, fr.ParameterType.from_value(value), value)])
        configured = self.state in ("inactive", "active")
        ok = kind == "dynamic" or (kind == "fixed" and not configured)
        assert result.successful is ok, (name, value, self.state, result.reason)
        if kind == "fixed" and configured:
            assert "read at configure" in result.reason
        if not ok:
            assert self.node.get_parameter(name).value == old
        elif name == "weights":
            self.weights_missing = bool(value)
        elif name in ("schedule", "overlay_alpha", "scene_threshold") and configured:
            assert getattr(self.node.core.config, name) == value

    @rule(data=st.booleans())
    def enable(self, data):
        """~/enable exists while configured; ``true`` is refused while inactive; re-enabling
        resets the engine (a key frame next)."""
        service = self.node.services.get(f"{NODE}/enable")
        if service is None:
            return
        reply = service[1](fr.SetBool.Request(data), fr.SetBool.Response())
        assert reply.success is (not data or self.state == "active"), (data, self.state, reply.message)
        if reply.success:
            if data and not self.enabled:
                self.expect_key_frame = True
            self.enabled = data

    @rule(kinds=_FRAME_KINDS)
    def reset(self, kinds):
        """~/reset: the next frame is a key frame (``kinds``: frames right after it, if active)."""
        service = self.node.services.get(f"{NODE}/reset")
        if service is None:
            return
        assert service[1](None, fr.Trigger.Response()).success
        self.expect_key_frame = True
        if self.state == "active":
            self.images_arrive(kinds)

    @rule()
    def diagnostics_tick(self):
        """The diagnostics timer fires without raising."""
        for _, callback in list(self.node.timers):
            callback()

    @invariant()
    def entities_follow_the_state(self):
        """Publishers, services, timer and core exist exactly between configure and cleanup; the
        subscription and a live worker thread exactly while active; lifecycle publishers enabled
        only while active, and none was asked to publish while disabled."""
        node, configured, active = self.node, self.state in ("inactive", "active"), self.state == "active"
        assert node.state == self.state
        assert (node.core is not None) is configured
        expected = {f"{NODE}/{t}" for t in ("labels", "confidence", "info", "colored", "overlay", "class_masks",
                                            "label_info")} | {"/diagnostics"}
        assert set(node.publishers) == (expected if configured else set())
        assert set(node.services) == ({f"{NODE}/enable", f"{NODE}/reset"} if configured else set())
        assert len(node.timers) == (1 if configured else 0)
        assert bool(node.subscriptions) is active
        assert (node._worker is not None and node._worker.alive) is active
        workers = [t for t in threading.enumerate() if t.name == "mpvss-worker" and t not in self.other_workers]
        assert len(workers) == (1 if active else 0), workers
        assert all(p.enabled is active for p in node._managed)
        assert len(node._managed) == (len(expected) - 1 if configured else 0)
        assert all(p.dropped == 0 for p in node._managed), "published while inactive"
        if configured:
            assert len(node.publishers[f"{NODE}/labels"].messages) == node.core.counters["published"]


def test_lifecycle_random_sequences(node_module, monkeypatch):
    """Random sequences of transitions, frames, parameter sets and service calls keep the managed
    node to the lifecycle state machine and its outputs to the active state, with the input's
    header (:class:`LifecycleMachine`; 5 to 15 s on one core)."""
    LifecycleMachine.node_class = type(_lifecycle_node(node_module, monkeypatch, schedule="fixed:100"))
    run_state_machine_as_test(LifecycleMachine, settings=settings(
        max_examples=25, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)))
