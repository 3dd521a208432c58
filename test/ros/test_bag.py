"""``mpvss bag`` (mpvss_ros.ros.bag): real rosbag2 bags (sqlite3 and MCAP) written and read with
rosbags, from real CamVid val frames; no ROS installed.

The reference for the labels is ``VideoSegmenter`` set up exactly as ``mpvss segment`` does
(``parse_schedule`` + ``build_propagator`` + ``VideoSegmenter``), run on the same decoded frames
with the header stamps as times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import cv2
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rosbags.interfaces import QosDurability, QosHistory, QosReliability
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.serde import SerdeError
from rosbags.typesys import Stores, get_types_from_idl, get_typestore

from mpvss_ros.cli import main
from mpvss_ros.model_loader import LoadedModel
from mpvss_ros.offline import SegmentOptions
from mpvss_ros.propagation import build_propagator
from mpvss_ros.ros.bag import (_IDL_SEPARATOR, BagOptions, _bag_definition, _raise_write_error, normalize_namespace,
                               output_topics, process_bag)
from mpvss_ros.scheduling import parse_schedule
from mpvss_ros.segmenter import FrameError, NonFiniteOutputError, VideoSegmenter
from mpvss_ros.viz import colorize, frame_tag, make_palette, overlay

TOPIC = "/camera/image_raw"
CTOPIC = "/camera/image_raw/compressed"
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
T0 = 1_700_000_000  # header stamp seconds of the first frame
N_FRAMES = 6


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def frames(camvid_val: Path) -> list[np.ndarray]:
    """The first CamVid val frames, (360, 480, 3) uint8 RGB."""
    paths = sorted(camvid_val.glob("*.png"))[:N_FRAMES]
    return [cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in paths]


def header(ts, stamp_ns: int, frame_id: str = "camera_optical"):
    t = ts.types
    return t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9),
                                    frame_id=frame_id)


def raw_image(ts, rgb: np.ndarray, stamp_ns: int, encoding: str = "rgb8", frame_id: str = "camera_optical"):
    h, w = rgb.shape[:2]
    data = np.ascontiguousarray(rgb).reshape(-1)
    return ts.types[IMAGE](header=header(ts, stamp_ns, frame_id), height=h, width=w, encoding=encoding,
                           is_bigendian=0, step=data.size // h, data=data)


def jpeg_image(ts, rgb: np.ndarray, stamp_ns: int, frame_id: str = "camera_optical", codec: str = "jpeg"):
    """A CompressedImage of ``rgb`` as image_transport sends it; ``codec``: ``jpeg`` or ``png``."""
    ok, data = cv2.imencode(".jpg" if codec == "jpeg" else ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 85] if codec == "jpeg" else [])
    assert ok
    return ts.types[COMPRESSED](header=header(ts, stamp_ns, frame_id), format=f"rgb8; {codec} compressed bgr8",
                                data=data.reshape(-1))


def stamps(n: int) -> list[int]:
    """15 fps header stamps (ns)."""
    return [T0 * 10**9 + round(i * 1e9 / 15) for i in range(n)]


def write_bag(ts, path: Path, storage: str, entries: list[tuple[str, str, int, object]], version: int = 9,
              topics: Sequence[tuple[str, str]] = ()) -> None:
    """entries: (topic, msgtype, bag timestamp ns, message object or raw CDR bytes), written in
    this order; ``topics``: (topic, msgtype) connections made first, with or without messages."""
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=version, storage_plugin=plugin) as writer:
        conns = {topic: writer.add_connection(topic, msgtype, typestore=ts) for topic, msgtype in topics}
        for topic, msgtype, t, msg in entries:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            data = msg if isinstance(msg, (bytes, bytearray)) else ts.serialize_cdr(msg, msgtype)
            writer.write(conns[topic], t, data)


def _edit_metadata(bag: Path, change) -> None:
    """Edit ``bag``'s metadata.yaml: ``change(info)`` on its rosbag2_bagfile_information."""
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())
    change(meta["rosbag2_bagfile_information"])
    (bag / "metadata.yaml").write_text(yaml.safe_dump(meta))


def read_bag(ts, path: Path) -> dict[str, list[tuple[int, object, bytes]]]:
    """{topic: [(bag timestamp, message or None when undecodable, raw bytes)]}."""
    out: dict[str, list] = {}
    with Reader(path) as reader:
        for conn, t, raw in reader.messages():
            try:
                msg = ts.deserialize_cdr(raw, conn.msgtype)
            except SerdeError:
                msg = None
            out.setdefault(conn.topic, []).append((t, msg, raw))
    return out


def reference_results(loaded: LoadedModel, options: BagOptions, decoded: list[np.ndarray], header_ns: list[int]):
    """What ``mpvss segment`` computes: same set-up, frames pushed in order with their stamps."""
    scheduler = parse_schedule(options.schedule, max_interval=options.max_interval)
    propagator = build_propagator(options.propagator, loaded.model, options.optical_flow_preset,
                                  options.optical_flow_scale)
    seg = VideoSegmenter(loaded.model, propagator, scheduler, device=loaded.device)
    return [seg.push(f, s / 1e9) for f, s in zip(decoded, header_ns)]


def image_array(msg) -> np.ndarray:
    assert msg.encoding in ("mono8", "rgb8", "mono16")
    c = 3 if msg.encoding == "rgb8" else 1
    if msg.encoding == "mono16":
        return np.frombuffer(msg.data.tobytes(), "<u2" if not msg.is_bigendian else ">u2").reshape(msg.height, msg.width)
    arr = msg.data.reshape(msg.height, msg.step)[:, : msg.width * c]
    return arr.reshape(msg.height, msg.width, 3) if c == 3 else arr


@pytest.fixture()
def band_loaded(lite: LoadedModel, make_band_model) -> LoadedModel:
    """A deterministic 5-class model with meaningful labels (conftest's BandModel) as a LoadedModel."""
    cfg = dataclasses.replace(lite.config, name="band5", num_classes=5,
                              class_names=["dark", "dim", "mid", "bright", "white"], palette=[])
    return LoadedModel(model=make_band_model(5), config=cfg, weights=None, trained=False, device=torch.device("cpu"))


def check_outputs(ts, out_bag: Path, in_entries, decoded, loaded, options, namespace="/mpvss",
                  storage: str | None = None) -> dict:
    """Everything the round trip must satisfy; returns the output bag's messages."""
    header_ns = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, _, _, m in in_entries]
    bag_ns = [t for _, _, t, _ in in_entries]
    n = len(in_entries)
    got = read_bag(ts, out_bag)
    topics = output_topics(namespace)
    if not getattr(options, "autoware_mask", False):
        del topics["autoware_mask"]
    in_topic = in_entries[0][0]
    assert set(got) == {in_topic, *topics.values()}
    # the input is copied byte for byte at its own bag timestamps
    assert [t for t, _, _ in got[in_topic]] == bag_ns
    assert [raw for _, _, raw in got[in_topic]] == [ts.serialize_cdr(m, mt) for _, mt, _, m in in_entries]
    expected = reference_results(loaded, options, decoded, header_ns)
    keys = [i for i, r in enumerate(expected) if r.is_key_frame]  # label_info: on key frames
    for key, topic in topics.items():
        msgs = got[topic]
        frames = keys if key == "label_info" else range(n)
        assert len(msgs) == len(frames), key
        for (t, m, _), t_in, s_in in zip(msgs, [bag_ns[i] for i in frames], [header_ns[i] for i in frames]):
            assert t == t_in, key  # bag time = the input message's bag time
            assert m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == s_in, key  # header stamp copied
            assert m.header.frame_id == "camera_optical", key
    # LabelInfo: the model's classes, offered reliable + transient-local, keep-last 1 (latched)
    info_msg = got[topics["label_info"]][0][1]
    assert [c.class_id for c in info_msg.class_map] == list(range(loaded.config.num_classes))
    assert [c.class_name for c in info_msg.class_map] == loaded.config.class_names
    with Reader(out_bag) as reader:
        conn = next(c for c in reader.connections if c.topic == topics["label_info"])
        qos = conn.ext.offered_qos_profiles
        assert qos and qos[0].durability == QosDurability.TRANSIENT_LOCAL and qos[0].reliability == QosReliability.RELIABLE
        assert qos[0].history == QosHistory.KEEP_LAST and qos[0].depth == 1
    if storage:
        meta = yaml.safe_load((out_bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        assert meta["storage_identifier"] == storage
    # labels identical to mpvss segment's VideoSegmenter on the same decoded frames
    for (_, lab, _), (_, conf, _), (_, inf, _), (_, masks, _), r in zip(
            got[topics["labels"]], got[topics["confidence"]], got[topics["info"]], got[topics["class_masks"]], expected):
        assert lab.encoding == "mono8" and conf.encoding == "mono8"
        np.testing.assert_array_equal(image_array(lab), r.labels)
        np.testing.assert_array_equal(image_array(conf), r.confidence)
        assert (inf.frame_index, inf.is_key_frame, inf.key_frame_reason) == (r.frame_index, r.is_key_frame, r.key_frame_reason)
        key_ns = inf.key_frame_stamp.sec * 10**9 + inf.key_frame_stamp.nanosec
        assert key_ns == header_ns[r.key_frame_index]  # the key frame's header stamp, to the nanosecond
        assert list(masks.class_ids) == sorted(int(c) for c in np.unique(r.labels))
        for cid, m in zip(masks.class_ids, masks.masks):
            np.testing.assert_array_equal(image_array(m), np.where(r.labels == cid, 255, 0))
    palette = make_palette(loaded.config.num_classes, loaded.config.palette or None)
    alpha = getattr(options, "alpha", 0.5)
    for (_, col, _), (_, ov, _), f, r in zip(got[topics["colored"]], got[topics["overlay"]], decoded, expected):
        assert col.encoding == ov.encoding == "rgb8" and image_array(ov).shape == f.shape
        np.testing.assert_array_equal(image_array(col), colorize(r.labels, palette))  # the model's palette
        tag = frame_tag(r.is_key_frame, r.frame_index - r.key_frame_index)
        np.testing.assert_array_equal(image_array(ov), overlay(f, r.labels, palette, alpha=alpha,
                                                               class_names=loaded.config.class_names, tag=tag))
    return got


def raw_entries(ts, frames, topic=TOPIC):
    return [(topic, IMAGE, s + 3_000_000 + i, raw_image(ts, f, s)) for i, (f, s) in enumerate(zip(frames, stamps(len(frames))))]


def jpeg_entries(ts, frames, topic=CTOPIC):
    return [(topic, COMPRESSED, s + 3_000_000 + i, jpeg_image(ts, f, s)) for i, (f, s) in enumerate(zip(frames, stamps(len(frames))))]


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_raw_rgb8_round_trip(ts, tmp_path, frames, lite, storage):
    entries = raw_entries(ts, frames)
    write_bag(ts, tmp_path / "in", storage, entries)
    options = BagOptions(propagator="query_flow", schedule="fixed:3", progress=False)
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, lite, options)
    assert (summary["frames"], summary["written"], summary["skipped"]) == (N_FRAMES, N_FRAMES, 0)
    assert summary["storage"] == storage and summary["msgtype"] == IMAGE
    assert summary["key_frames"] == 2 and summary["median_total_ms"]["key"] > 0
    assert summary["messages_per_topic"]["/mpvss/labels"] == N_FRAMES
    assert summary["schedule_settings"] == {"schedule": "fixed:3", "interval": 3, "max_gap_s": 1.0}
    # the run settings are mpvss segment's (EngineOptions.run_settings), the PyTorch backend included
    assert summary["backend"] == {"backend": "torch", "device": "cpu", "precision": "fp32",
                                  "channels_last": True, "fold_batch_norm": True}
    assert summary["propagator"] == "query_flow" and summary["propagator_settings"] == {"name": "query_flow", "chain_flow": True}
    # raw rgb8: the decoded frames are the PNGs themselves
    check_outputs(ts, tmp_path / "out", entries, frames, lite, options, storage=storage)


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_jpeg_round_trip(ts, tmp_path, frames, lite, storage):
    entries = jpeg_entries(ts, frames)
    write_bag(ts, tmp_path / "in", storage, entries)
    options = BagOptions(propagator="query_flow", schedule="fixed:3", progress=False)
    summary = process_bag(tmp_path / "in", tmp_path / "out", CTOPIC, lite, options, compressed=True)
    assert (summary["frames"], summary["written"], summary["skipped"]) == (N_FRAMES, N_FRAMES, 0)
    assert summary["msgtype"] == COMPRESSED
    decoded = [cv2.cvtColor(cv2.imdecode(m.data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for _, _, _, m in entries]
    assert not all(np.array_equal(d, f) for d, f in zip(decoded, frames))  # JPEG is lossy: compare with decoded
    check_outputs(ts, tmp_path / "out", entries, decoded, lite, options, storage=storage)


def test_meaningful_labels_optical_flow_and_storage_override(ts, tmp_path, frames, band_loaded):
    """A model whose labels follow the image (several classes, real boundaries), optical-flow
    propagation, compressed auto-detected, sqlite3 in -> mcap out, another namespace."""
    entries = jpeg_entries(ts, frames)
    write_bag(ts, tmp_path / "in", "sqlite3", entries)
    options = BagOptions(propagator="optical_flow", optical_flow_preset="medium", schedule="fixed:4", progress=False,
                         alpha=0.8)
    summary = process_bag(tmp_path / "in", tmp_path / "out", CTOPIC, band_loaded, options,
                          namespace="front/seg/", storage="mcap")
    assert summary["written"] == N_FRAMES and summary["namespace"] == "/front/seg"
    assert (summary["propagator_settings"]["preset"], summary["propagator_settings"]["flow_scale"]) == ("medium", 0.5)
    decoded = [cv2.cvtColor(cv2.imdecode(m.data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for _, _, _, m in entries]
    got = check_outputs(ts, tmp_path / "out", entries, decoded, band_loaded, options, namespace="/front/seg", storage="mcap")
    labels = [image_array(m) for _, m, _ in got["/front/seg/labels"]]
    assert all(len(np.unique(lab)) >= 3 for lab in labels)
    assert not np.array_equal(labels[1], labels[0])  # warped, not copied


def test_autoware_mask_output(ts, tmp_path, band_loaded, capsys):
    """--autoware-mask: NS/autoware_mask, the labels as Autoware class IDs run-length encoded
    (5-byte runs), with each input's header and bag time, as the node's publish_autoware_mask.
    Gradient frames, so that it runs without the shared data (the band model labels brightness)."""
    from mpvss_ros.ros.conversions import AUTOWARE_CLASSES

    yy, xx = np.mgrid[0:60, 0:80]
    frames = [np.repeat(((xx * 3 + yy + 10 * i) % 256).astype(np.uint8)[..., None], 3, axis=2) for i in range(4)]
    entries = raw_entries(ts, frames)
    write_bag(ts, tmp_path / "in", "sqlite3", entries)
    ids = [AUTOWARE_CLASSES.index(c) for c in ("ROAD", "VEHICLE", "VEGETATION", "SKY", "PERSON")]
    options = BagOptions(propagator="copy", schedule="fixed:2", progress=False, autoware_mask=True,
                         autoware_class_ids=tuple(ids))  # the band model's names (dark, dim, ...) are no Autoware class
    process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, options)
    got = check_outputs(ts, tmp_path / "out", entries, frames, band_loaded, options)  # headers, bag times
    by_name = np.array(ids, np.uint8)
    run = np.dtype([("value", "u1"), ("length", "<i4")])
    for (_, mask, _), (_, labels, _) in zip(got["/mpvss/autoware_mask"], got["/mpvss/labels"], strict=True):
        runs = np.frombuffer(np.asarray(mask.data).tobytes(), run)
        decoded = np.repeat(runs["value"], runs["length"]).reshape(mask.height, mask.width)
        np.testing.assert_array_equal(decoded, by_name[image_array(labels)])
        assert len(np.unique(decoded)) >= 3
    args = ["bag", str(tmp_path / "in"), str(tmp_path / "o2"), "--topic", TOPIC, "--no-progress", "--threads", "1",
            "--autoware-mask"]
    assert main([*args, "--autoware-class-ids", "1", "2"]) == 2  # mpvss_lite has 11 classes
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("mpvss: error: autoware_class_ids (--autoware-class-ids): 2 Autoware class IDs for a model with 11 "
                   "classes (one per class)")
    assert not (tmp_path / "o2").exists()
    assert main([*args[:-1], "--autoware-class-ids", "1", "2"]) == 2  # a map for an output not asked for
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("mpvss: error: autoware_class_ids (--autoware-class-ids) needs autoware_mask (--autoware-mask), "
                   "the output it maps the classes for")
    with pytest.raises(ValueError, match="needs autoware_mask"):  # the API refuses it too, when the options are made
        BagOptions(autoware_class_ids=(9, 7))
    with pytest.raises(ValueError, match=r"must be in 0..255, got \[9, -1\]"):
        BagOptions(autoware_mask=True, autoware_class_ids=(9, -1))


def test_messages_per_topic_counts_every_topic_written(ts, tmp_path, band_loaded):
    """The summary's messages_per_topic: the input topic (copied unchanged) and every output,
    label_info once per key frame. Gradient frames and the band model: no shared data needed."""
    yy, xx = np.mgrid[0:60, 0:80]
    frames = [np.repeat(((xx * 3 + yy + 10 * i) % 256).astype(np.uint8)[..., None], 3, axis=2) for i in range(3)]
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames))
    options = BagOptions(propagator="copy", schedule="fixed:2", progress=False, overlay=False, autoware_mask=True,
                         autoware_class_ids=(9, 7, 14, 15, 6))
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, options)
    ns = "/mpvss"
    assert summary["messages_per_topic"] == {TOPIC: 3, f"{ns}/labels": 3, f"{ns}/confidence": 3, f"{ns}/colored": 3,
                                             f"{ns}/class_masks": 3, f"{ns}/autoware_mask": 3, f"{ns}/info": 3,
                                             f"{ns}/label_info": 2}


def test_label_info_names_the_classes_of_a_model_without_names(ts, tmp_path, band_loaded):
    """A model whose configuration names no classes: LabelInfo lists class_0 .. class_{K-1}, as
    every other tool names them."""
    unnamed = dataclasses.replace(band_loaded, config=dataclasses.replace(band_loaded.config, class_names=[]))
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(1)))
    process_bag(tmp_path / "in", tmp_path / "out", TOPIC, unnamed, BagOptions(propagator="copy", progress=False))
    ((_, info, _),) = read_bag(ts, tmp_path / "out")["/mpvss/label_info"]
    assert [(c.class_id, c.class_name) for c in info.class_map] == [(i, f"class_{i}") for i in range(5)]


def test_optional_outputs_off(ts, tmp_path, frames, lite):
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:2]))
    options = BagOptions(colored=False, overlay=False, class_masks=False, progress=False)
    process_bag(tmp_path / "in", tmp_path / "out", TOPIC, lite, options)
    assert set(read_bag(ts, tmp_path / "out")) == {TOPIC, "/mpvss/labels", "/mpvss/confidence", "/mpvss/label_info", "/mpvss/info"}


def test_metadata_version_follows_input(ts, tmp_path, frames, lite):
    """Version-8 input (QoS stored as a YAML string, what older rosbag2 reads) gives version-8 output."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:2]), version=8)
    process_bag(tmp_path / "in", tmp_path / "out", TOPIC, lite, BagOptions(progress=False))
    meta = yaml.safe_load((tmp_path / "out" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == 8
    topic = next(t["topic_metadata"] for t in meta["topics_with_message_count"] if t["topic_metadata"]["name"] == "/mpvss/label_info")
    assert isinstance(topic["offered_qos_profiles"], str) and "durability: 1" in topic["offered_qos_profiles"]
    with Reader(tmp_path / "out") as reader:
        conn = next(c for c in reader.connections if c.topic == "/mpvss/label_info")
        assert conn.ext.offered_qos_profiles[0].durability == QosDurability.TRANSIENT_LOCAL


@pytest.mark.parametrize("version", [8, 9, None])
def test_a_bare_db3_gets_the_version_its_folder_gets(ts, tmp_path, frames, band_loaded, version):
    """A .db3 given without its folder got version-9 output whatever it was; the version its
    metadata table records is used now, 8 for a file without one (recorded before rosbag2 kept one)."""
    import sqlite3

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:2]), version=version or 9)
    db3 = next((tmp_path / "in").glob("*.db3"))
    if version is None:  # an older recording: no metadata table in the file
        with sqlite3.connect(db3) as con:
            con.execute("DROP TABLE metadata")
    process_bag(db3, tmp_path / "out", TOPIC, band_loaded, BagOptions(propagator="copy", progress=False))
    meta = yaml.safe_load((tmp_path / "out" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == (version or 8)


def test_a_bare_db3_named_with_a_hash_or_question_mark(ts, tmp_path, frames):
    """Its metadata table is read from the file itself: an unquoted "file:run#1.db3" URI opened
    (and created, read-write) a file "run" and read version 8 from it."""
    import shutil

    from mpvss_ros.ros.bag import _db3_metadata_version

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:1]), version=9)
    db3 = next((tmp_path / "in").glob("*.db3"))
    named = tmp_path / "named"
    named.mkdir()
    for name in ("run#1.db3", "run?x.db3", "run%20.db3"):
        shutil.copy(db3, named / name)
        assert _db3_metadata_version(named / name) == 9, name
    assert sorted(p.name for p in named.iterdir()) == ["run#1.db3", "run%20.db3", "run?x.db3"]


def test_single_storage_file_and_max_frames(ts, tmp_path, frames, lite):
    write_bag(ts, tmp_path / "in", "mcap", raw_entries(ts, frames))
    mcap = next((tmp_path / "in").glob("*.mcap"))
    summary = process_bag(mcap, tmp_path / "out", TOPIC, lite, BagOptions(max_frames=3, progress=False))
    assert summary["frames"] == summary["written"] == 3 and summary["storage"] == "mcap"
    assert len(read_bag(ts, tmp_path / "out")["/mpvss/labels"]) == 3
    # a bare .mcap file is of metadata version 9 (MCAP bags came with it): so is its output
    meta = yaml.safe_load((tmp_path / "out" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert (meta["version"], meta["storage_identifier"]) == (9, "mcap")


# --------------------------------------------------------------------------------------------
# Bad messages never abort
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bad_messages_are_skipped_and_counted(ts, tmp_path, frames, band_loaded, storage):
    s = stamps(8)
    small = cv2.resize(frames[5], (320, 240), interpolation=cv2.INTER_AREA)
    depth = ts.types[IMAGE](header=header(ts, s[2]), height=4, width=4, encoding="32FC1", is_bigendian=0, step=16,
                            data=np.zeros(64, np.uint8))
    truncated = raw_image(ts, frames[3], s[4])
    truncated.data = truncated.data[: truncated.data.size // 2]
    entries = [
        (TOPIC, IMAGE, s[0], raw_image(ts, frames[0], s[0])),
        (TOPIC, IMAGE, s[1], raw_image(ts, frames[1], s[1])),
        (TOPIC, IMAGE, s[2], depth),                                     # 32FC1
        (TOPIC, IMAGE, s[3], raw_image(ts, frames[2], s[3])),
        (TOPIC, IMAGE, s[4], truncated),                                 # data shorter than step x height
        (TOPIC, IMAGE, s[5], raw_image(ts, frames[3], s[2])),            # header stamp goes back (s[2] < s[3])
        (TOPIC, IMAGE, s[6], raw_image(ts, small, s[6])),                # resolution change
        (TOPIC, IMAGE, s[7], raw_image(ts, cv2.resize(frames[4], (320, 240), interpolation=cv2.INTER_AREA), s[7])),
        (TOPIC, IMAGE, s[7] + 1, b"\x00\x01\x00\x00garbage"),            # undecodable CDR
    ]
    write_bag(ts, tmp_path / "in", storage, entries)
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(propagator="copy", schedule="fixed:10", progress=False))
    assert summary["frames"] == 9 and summary["written"] == 6 and summary["skipped"] == 3
    assert summary["skipped_by_reason"] == {"conversion": 2, "deserialize": 1}
    errors = " | ".join(e["error"] for e in summary["skip_examples"])
    assert "32FC1" in errors and "too short" in errors
    assert [e["timestamp_ns"] for e in summary["skip_examples"]] == [s[2], s[4], s[7] + 1]
    got = read_bag(ts, tmp_path / "out")
    assert len(got[TOPIC]) == 9  # every input message copied, bad ones included
    infos = [m for _, m, _ in got["/mpvss/info"]]
    assert [i.key_frame_reason for i in infos] == ["first", "", "", "time_backwards", "resolution_change", ""]
    assert [i.is_key_frame for i in infos] == [True, False, False, True, True, False]
    assert [t for t, _, _ in got["/mpvss/labels"]] == [s[0], s[1], s[3], s[5], s[6], s[7]]
    shapes = [(m.height, m.width) for _, m, _ in got["/mpvss/labels"]]
    assert shapes == [(360, 480)] * 4 + [(240, 320)] * 2
    assert summary["key_frame_reasons"] == {"first": 1, "resolution_change": 1, "time_backwards": 1}


def test_corrupt_jpeg_skipped(ts, tmp_path, frames, lite):
    entries = jpeg_entries(ts, frames[:3])
    bad = entries[1][3]
    bad.data = bad.data[: bad.data.size // 3]
    write_bag(ts, tmp_path / "in", "sqlite3", entries)
    summary = process_bag(tmp_path / "in", tmp_path / "out", CTOPIC, lite, BagOptions(progress=False))
    assert summary["written"] == 2 and summary["skipped_by_reason"] == {"conversion": 1}
    assert "JPEG" in summary["skip_examples"][0]["error"]


def test_bad_messages_are_warned_about_ten_times_per_reason(ts, tmp_path, band_loaded, caplog):
    """A bag of many bad messages logs the first 10 of each reason as warnings, later ones at DEBUG."""
    garbage = [(TOPIC, IMAGE, 10**9 + i, b"\x00\x01\x00\x00garbage") for i in range(12)]
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(1)) + garbage)
    with caplog.at_level(logging.DEBUG, logger="mpvss_ros.ros.bag"):
        summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                              BagOptions(propagator="copy", progress=False))
    assert summary["skipped_by_reason"] == {"deserialize": 12}
    levels = [r.levelno for r in caplog.records if r.getMessage().startswith("skipping message")]
    assert levels == [logging.WARNING] * 10 + [logging.DEBUG] * 2


# --------------------------------------------------------------------------------------------
# Topic and argument errors
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def small_bag(ts, tmp_path, frames) -> Path:
    string = ts.types["std_msgs/msg/String"](data="hello")
    entries = raw_entries(ts, frames[:1]) + jpeg_entries(ts, frames[:1]) + [("/chatter", "std_msgs/msg/String", 5, string)]
    write_bag(ts, tmp_path / "small", "sqlite3", entries)
    return tmp_path / "small"


def test_missing_topic_lists_image_topics(small_bag, tmp_path, lite):
    with pytest.raises(ValueError) as err:
        process_bag(small_bag, tmp_path / "out", "/nope", lite, BagOptions(progress=False))
    msg = str(err.value)
    assert "'/nope' is not in" in msg and f"{TOPIC} ({IMAGE})" in msg and f"{CTOPIC} ({COMPRESSED})" in msg
    assert "/chatter" not in msg
    assert not (tmp_path / "out").exists()


def test_wrong_topic_type(ts, small_bag, tmp_path, lite):
    with pytest.raises(ValueError, match=r"'/chatter' has type std_msgs/msg/String.*image topics in the bag: /camera"):
        process_bag(small_bag, tmp_path / "out", "/chatter", lite)
    with pytest.raises(ValueError, match="--compressed was given"):
        process_bag(small_bag, tmp_path / "out", TOPIC, lite, compressed=True)
    with pytest.raises(ValueError, match="use --compressed"):
        process_bag(small_bag, tmp_path / "out", CTOPIC, lite, compressed=False)
    # one topic recorded both raw and compressed (two publishers): refused by name, no output
    small = np.zeros((8, 8, 3), np.uint8)
    with Writer(tmp_path / "mixed", version=9) as writer:
        raw = writer.add_connection(TOPIC, IMAGE, typestore=ts)
        jpeg = writer.add_connection(TOPIC, COMPRESSED, typestore=ts)
        writer.write(raw, 1, ts.serialize_cdr(raw_image(ts, small, 1), IMAGE))
        writer.write(jpeg, 2, ts.serialize_cdr(jpeg_image(ts, small, 2), COMPRESSED))
    with pytest.raises(ValueError, match=f"topic '{TOPIC}' has several message types in .*mixed: {COMPRESSED}, {IMAGE}$"):
        process_bag(tmp_path / "mixed", tmp_path / "out", TOPIC, lite, BagOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_topic_without_leading_slash_and_existing_output(small_bag, tmp_path, lite):
    summary = process_bag(small_bag, tmp_path / "out", TOPIC.lstrip("/"), lite, BagOptions(progress=False))
    assert summary["topic"] == TOPIC and summary["written"] == 1
    with pytest.raises(FileExistsError):
        process_bag(small_bag, tmp_path / "out", TOPIC, lite)


def test_an_unknown_output_storage_is_refused(ts, tmp_path, band_loaded):
    """process_bag's storage is sqlite3 or mcap (the CLI's --storage choices): another is refused
    before any output, not written as sqlite3."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(1)))
    with pytest.raises(ValueError, match="unknown storage 'zip'; use one of sqlite3, mcap"):
        process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, BagOptions(propagator="copy", progress=False),
                    storage="zip")
    assert not (tmp_path / "out").exists()


def test_not_a_bag(ts, tmp_path, lite):
    """A folder without metadata.yaml, a missing path, a metadata.yaml of no bag, a bag without
    its storage file and a .db3 that is no database: each one error naming the file, no output."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.yaml"):
        process_bag(tmp_path / "empty", tmp_path / "out", TOPIC, lite)
    with pytest.raises(FileNotFoundError):
        process_bag(tmp_path / "missing", tmp_path / "out", TOPIC, lite)
    # the last six raised AttributeError, RecursionError or OverflowError (a traceback from mpvss bag)
    for text in ("other: 1\n", "rosbag2_bagfile_information:\n  version: nine\n", "- a list\n",
                 "rosbag2_bagfile_information: [1, 2]\n", "rosbag2_bagfile_information: 3\n",
                 "a: " + "[" * 3000 + "]" * 3000 + "\n", "rosbag2_bagfile_information: {version: .inf}\n",
                 "rosbag2_bagfile_information: {version: 9, storage_identifier: [sqlite3]}\n",
                 "rosbag2_bagfile_information: {version: 1" + "0" * 5000 + "}\n"):
        (tmp_path / "empty" / "metadata.yaml").write_text(text)
        with pytest.raises(ValueError, match="cannot read .*empty/metadata.yaml"):
            process_bag(tmp_path / "empty", tmp_path / "out", TOPIC, lite)
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(1)))
    meta_path = tmp_path / "in" / "metadata.yaml"
    meta = meta_path.read_text()
    for edit in ({"relative_file_paths": 3}, {"files": 3}):
        meta_path.write_text(meta)
        _edit_metadata(tmp_path / "in", lambda info: info.update(edit))
        with pytest.raises(ValueError, match="cannot read bag .*in: "):  # files: 3 was rosbags' TypeError
            process_bag(tmp_path / "in", tmp_path / "out", TOPIC, lite)
    meta_path.write_text(meta)
    for db3 in (tmp_path / "in").glob("*.db3"):
        db3.unlink()
    with pytest.raises(ValueError, match="cannot read bag .*in: "):  # the reader's error
        process_bag(tmp_path / "in", tmp_path / "out", TOPIC, lite)
    (tmp_path / "junk.db3").write_bytes(b"not a database " * 100)
    with pytest.raises(ValueError, match="cannot read bag .*junk.db3: "):  # no sqlite3 DatabaseError
        process_bag(tmp_path / "junk.db3", tmp_path / "out", TOPIC, lite)
    assert not (tmp_path / "out").exists()


def test_a_bag_that_rosbags_reads_but_cannot_close_is_processed_with_a_warning(ts, tmp_path, band_loaded, caplog):
    """rosbags opens and reads a bag whose metadata.yaml lists ``files: x`` and then fails in
    ``close`` (AttributeError); that error escaped after the output bag was written. Every message
    was read, so the output stands and the damage is a warning naming the bag."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(2)))
    _edit_metadata(tmp_path / "in", lambda info: info.update(files="x"))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.ros.bag"):
        summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                              BagOptions(propagator="copy", progress=False))
    assert summary["frames"] == 2
    assert any(f"bag {tmp_path / 'in'} read, but closing it failed" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out" / "metadata.yaml").is_file()


def test_a_bag_that_cannot_close_still_reports_the_runs_own_error(ts, tmp_path, band_loaded):
    """When the run fails inside the reader's block (here: a topic not in the bag) and rosbags'
    close then fails too (``files: x``), the user gets the run's error, not close's AttributeError
    traceback that hides it."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(1)))
    _edit_metadata(tmp_path / "in", lambda info: info.update(files="x"))
    with pytest.raises(ValueError, match="'/nope' is not in"):
        process_bag(tmp_path / "in", tmp_path / "out", "/nope", band_loaded,
                    BagOptions(propagator="copy", progress=False))
    assert not (tmp_path / "out").exists()


def test_a_new_frame_id_forces_a_key_frame(ts, tmp_path, frames, band_loaded):
    entries = [(TOPIC, IMAGE, s, raw_image(ts, f, s, frame_id=fid))
               for f, s, fid in zip(frames[:4], stamps(4), ("front", "front", "rear", "rear"))]
    write_bag(ts, tmp_path / "in", "sqlite3", entries)
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(schedule="fixed:100", propagator="copy", progress=False))
    assert summary["key_frames"] == 2 and summary["key_frame_reasons"] == {"first": 1, "frame_id_change": 1}


def test_max_gap_s_counts_gaps_between_the_messages_read_as_the_node_does(ts, tmp_path, frames, band_loaded):
    """Messages 0.6 s apart, one of them undecodable: no gap (the node's core measures max_gap_s
    between received messages, StampGaps); the bag measured it between the frames it segmented and
    made the frame after the skipped one a time_gap key frame. A real gap still keys the next frame,
    also when the message after it is skipped, and the summary states the max_gap_s applied."""
    step = 600_000_000
    s = [1_700_000_000_000_000_000 + i * step for i in range(5)] + [1_700_000_000_000_000_000 + 6 * step]
    depth = ts.types[IMAGE](header=header(ts, s[2]), height=4, width=4, encoding="32FC1", is_bigendian=0, step=16,
                            data=np.zeros(64, np.uint8))
    late = ts.types[IMAGE](header=header(ts, s[4] + 3 * step), height=4, width=4, encoding="32FC1", is_bigendian=0,
                           step=16, data=np.zeros(64, np.uint8))
    entries = [(TOPIC, IMAGE, s[0], raw_image(ts, frames[0], s[0])),
               (TOPIC, IMAGE, s[1], raw_image(ts, frames[1], s[1])),
               (TOPIC, IMAGE, s[2], depth),                                  # skipped: 1.2 s between segmented frames
               (TOPIC, IMAGE, s[3], raw_image(ts, frames[2], s[3])),
               (TOPIC, IMAGE, s[4], raw_image(ts, frames[3], s[4])),
               (TOPIC, IMAGE, s[4] + 3 * step, late),                        # 1.8 s later, skipped too
               (TOPIC, IMAGE, s[5] + 3 * step, raw_image(ts, frames[4], s[5] + 3 * step))]
    write_bag(ts, tmp_path / "in", "sqlite3", entries)
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(schedule="fixed:100", propagator="copy", progress=False))
    infos = [m for _, m, _ in read_bag(ts, tmp_path / "out")["/mpvss/info"]]
    assert [i.key_frame_reason for i in infos] == ["first", "", "", "", "time_gap"]
    assert summary["skipped_by_reason"] == {"conversion": 2}
    assert summary["schedule_settings"]["max_gap_s"] == 1.0
    # max_gap_s below the 0.6 s between messages: every segmented frame after the first is a time_gap key frame
    summary = process_bag(tmp_path / "in", tmp_path / "short", TOPIC, band_loaded,
                          BagOptions(schedule="fixed:100", propagator="copy", progress=False, max_gap_s=0.5))
    assert summary["key_frame_reasons"] == {"first": 1, "time_gap": 4}
    assert summary["schedule_settings"]["max_gap_s"] == 0.5


def test_segment_options_run_a_bag_without_time_gaps_and_with_a_json_summary(ts, tmp_path, band_loaded):
    """process_bag also takes mpvss segment's SegmentOptions, whose max_gap_s is infinite: the
    summary states None (json.dumps would write inf as Infinity, which is no JSON)."""
    s = [T0 * 10**9 + i * 3 * 10**9 for i in range(3)]  # 3 s apart: time_gap key frames at max_gap_s 1.0
    write_bag(ts, tmp_path / "in", "sqlite3", [(TOPIC, IMAGE, t, raw_image(ts, g, t)) for t, g in zip(s, _gradients(3))])
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          SegmentOptions(propagator="copy", schedule="fixed:100", progress=False))
    assert summary["key_frame_reasons"] == {"first": 1} and summary["schedule_settings"]["max_gap_s"] is None
    json.dumps(summary, allow_nan=False)


def test_topic_without_messages_is_refused_before_any_output(ts, tmp_path, lite):
    with Writer(tmp_path / "in", version=9) as writer:
        writer.add_connection(TOPIC, IMAGE, typestore=ts)
    with pytest.raises(ValueError, match=f"topic {TOPIC} of bag .* has no messages"):
        process_bag(tmp_path / "in", tmp_path / "out", TOPIC, lite, BagOptions(progress=False))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("failure", ["storage", "interrupt", "sigterm"])
def test_a_run_that_fails_midway_leaves_no_output(ts, tmp_path, frames, band_loaded, monkeypatch, failure):
    """A damaged storage file (sqlite3's "database disk image is malformed") becomes one error
    naming the bag; that, Ctrl-C or SIGTERM (docker stop, systemd, timeout: its default action
    left a folder that is not a bag) removes the partial output, which would block the next run."""
    import os
    import signal
    import sqlite3

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:4]))
    real = Reader.messages

    def messages(self, *args, **kwargs):
        for i, item in enumerate(real(self, *args, **kwargs)):
            if i == 2:
                if failure == "storage":
                    raise sqlite3.DatabaseError("database disk image is malformed")
                if failure == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(Reader, "messages", messages)
    expected = {"storage": (ValueError, "cannot read bag .*in: DatabaseError: database disk image is malformed"),
                "interrupt": (KeyboardInterrupt, None), "sigterm": (SystemExit, "143")}[failure]
    def guard(signum, frame):  # without process_bag's handler the default action would end the test session
        raise AssertionError("SIGTERM reached the handler in place before process_bag")

    before = signal.signal(signal.SIGTERM, guard)
    try:
        with pytest.raises(expected[0], match=expected[1]):
            process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, BagOptions(propagator="copy", progress=False))
        assert not (tmp_path / "out").exists()
        assert signal.getsignal(signal.SIGTERM) is guard  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, before)
    monkeypatch.setattr(Reader, "messages", real)
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(propagator="copy", progress=False))
    assert summary["written"] == 4  # the rerun is not blocked


@pytest.mark.parametrize("error, reason", [(NonFiniteOutputError, "non_finite"), (FrameError, "frame")])
def test_frames_with_non_finite_logits_are_skipped_and_counted(ts, tmp_path, frames, band_loaded, monkeypatch, error,
                                                               reason):
    """NaN logits, or a frame the segmenter refuses (FrameError), skip that message under its own reason."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:3]))
    real, calls = VideoSegmenter.push, []

    def push(self, image, stamp, **kwargs):
        calls.append(stamp)
        if len(calls) == 2:
            self.reset()
            raise error("the propagated mask logits hold NaN or infinite values")
        return real(self, image, stamp, **kwargs)

    monkeypatch.setattr(VideoSegmenter, "push", push)
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(propagator="copy", progress=False))
    assert summary["written"] == 2 and summary["skipped_by_reason"] == {reason: 1}


def test_a_folder_the_run_did_not_create_is_never_removed(ts, tmp_path, frames, band_loaded, monkeypatch):
    """Another run creates the output folder between the existence check and the writer's mkdir:
    the writer fails, and that folder is left alone."""
    from rosbags.rosbag2 import WriterError

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:2]))

    def open_taken(self):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "theirs.txt").write_text("another run's")
        raise WriterError(f"{tmp_path / 'out'} exists already, not overwriting")

    monkeypatch.setattr(Writer, "open", open_taken)
    with pytest.raises(WriterError):
        process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, BagOptions(propagator="copy", progress=False))
    assert (tmp_path / "out" / "theirs.txt").read_text() == "another run's"


def test_frames_above_the_pixel_limit_are_skipped_and_the_limit_can_be_lifted(ts, tmp_path, frames, band_loaded, capsys):
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:2]))
    h, w = frames[0].shape[:2]
    small = BagOptions(propagator="copy", progress=False, max_image_pixels=h * w - 1)
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, small)
    assert summary["written"] == 0 and summary["skipped_by_reason"] == {"conversion": 2}
    assert "max_image_pixels" in summary["skip_examples"][0]["error"]
    lifted = BagOptions(propagator="copy", progress=False, max_image_pixels=None)
    assert process_bag(tmp_path / "in", tmp_path / "out2", TOPIC, band_loaded, lifted)["written"] == 2
    with pytest.raises(ValueError, match=r"max_image_pixels \(None: no limit; --max-image-pixels 0\) must be a whole"):
        BagOptions(max_image_pixels=0)  # refused when made, before any run


@pytest.mark.parametrize("bad, flag", [({"max_frames": 0}, "--max-frames"), ({"max_image_pixels": -1}, "None: no limit; --max-image-pixels 0"),
                                       ({"alpha": 1.5}, "--alpha"), ({"alpha": float("nan")}, "--alpha")])
def test_offline_options_refuse_bad_limits_when_made(bad, flag):
    with pytest.raises(ValueError, match=f"\\({flag}\\)"):
        BagOptions(**bad)
    if "alpha" not in bad:
        with pytest.raises(ValueError, match=f"\\({flag}\\)"):
            SegmentOptions(**bad)
    # checked again when a run starts: a field changed after the options were made
    changed = BagOptions()
    changed.alpha = 2.0
    with pytest.raises(ValueError, match="--alpha"):
        process_bag("no-such-bag", "out", "/x", None, changed)
    # the limits' edges and "no limit" are accepted
    BagOptions(max_frames=1, max_image_pixels=1, alpha=0.0)
    BagOptions(max_frames=None, max_image_pixels=None, alpha=1.0)
    SegmentOptions(max_frames=None, max_image_pixels=None)


def test_namespaces():
    assert normalize_namespace("/mpvss") == normalize_namespace("mpvss/") == normalize_namespace(" /mpvss\n") == "/mpvss"
    assert normalize_namespace("/") == "" and output_topics("/")["labels"] == "/labels"
    assert output_topics("/a/b")["class_masks"] == "/a/b/class_masks"
    for bad in ("/1abc", "/a-b", "/a b", "/a\n/b"):
        with pytest.raises(ValueError, match="invalid namespace"):
            normalize_namespace(bad)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_bag(ts, tmp_path, frames, capsys):
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:3]))
    rc = main(["bag", str(tmp_path / "in"), str(tmp_path / "out"), "--topic", TOPIC, "--no-progress",
               "--schedule", "fixed:2", "--storage", "mcap", "--namespace", "/seg", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    brief = json.loads(out.splitlines()[0])
    assert brief["frames"] == brief["written"] == 3 and brief["skipped"] == 0 and brief["key_frames"] == 2
    assert "/seg/labels x3" in out and "(mcap)" in out
    assert len(read_bag(ts, tmp_path / "out")["/seg/overlay"]) == 3


def test_cli_bag_onnxruntime_matches_torch(ts, tmp_path, frames, capsys, monkeypatch):
    """``mpvss bag --backend onnxruntime``: same messages, labels as the PyTorch run's (issue 5)."""
    monkeypatch.setenv("MPVSS_CACHE_DIR", str(tmp_path / "cache"))
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:3]))
    common = ["--topic", TOPIC, "--no-progress", "--schedule", "fixed:2", "--threads", "1",
              "--no-colored", "--no-overlay", "--no-class-masks"]
    assert main(["bag", str(tmp_path / "in"), str(tmp_path / "torch"), *common]) == 0
    assert main(["bag", str(tmp_path / "in"), str(tmp_path / "ort"), *common, "--backend", "onnxruntime"]) == 0, \
        capsys.readouterr().err
    briefs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [b["written"] for b in briefs] == [3, 3] and [b["key_frames"] for b in briefs] == [2, 2]
    want, got = read_bag(ts, tmp_path / "torch"), read_bag(ts, tmp_path / "ort")
    assert set(got) == set(want)
    for (t_w, m_w, _), (t_g, m_g, _) in zip(want["/mpvss/labels"], got["/mpvss/labels"]):
        assert t_w == t_g and m_w.header.stamp == m_g.header.stamp
        agree = np.mean(image_array(m_w) == image_array(m_g))
        assert agree > 0.999, agree


def test_cli_bag_errors(ts, small_bag, tmp_path, capsys):
    assert main(["bag", str(small_bag), str(tmp_path / "out"), "--topic", "/nope", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpvss: error: topic '/nope' is not in") and TOPIC in err
    assert main(["bag", str(tmp_path / "missing"), str(tmp_path / "out"), "--topic", TOPIC]) == 2
    assert main(["bag", str(small_bag), str(small_bag), "--topic", TOPIC]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["bag", str(small_bag), str(tmp_path / "o2"), "--topic", TOPIC, "--namespace", "/9x"]) == 2


def test_cli_bag_that_segments_nothing_fails_and_leaves_no_output(ts, tmp_path, frames, capsys):
    """Exit 1 kept a bag of the input topic only, which blocked the re-run ("exists already")."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:2]))
    args = ["bag", str(tmp_path / "in"), str(tmp_path / "out"), "--topic", TOPIC, "--no-progress", "--threads", "1"]
    assert main([*args, "--max-image-pixels", "100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"mpvss: error: no message of {TOPIC} could be segmented") and "was removed" in err[-1]
    assert not (tmp_path / "out").exists()
    assert main(args) == 0  # the re-run with a working limit


def test_an_engine_error_on_one_frame_is_skipped_not_fatal(ts, tmp_path, frames, band_loaded, monkeypatch, capsys):
    """What the backend raises on one frame (a size a fixed-shape --onnx-dir export lacks, a CUDA
    out-of-memory) killed the run and removed the output: it skips that message, as the node's
    core does, and the next frame is a key frame. Failing on every frame stops the run with one
    line, exit status 1."""
    import mpvss_ros.offline as offline
    from mpvss_ros.propagation import CopyPropagator

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:4]))
    real, calls = CopyPropagator.propagate, []

    def propagate(self, key, image):
        calls.append(1)
        if len(calls) == 1:  # the first non-key frame, message 1
            raise RuntimeError("CUDA out of memory")
        return real(self, key, image)

    monkeypatch.setattr(CopyPropagator, "propagate", propagate)
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(propagator="copy", schedule="fixed:10", progress=False))
    assert summary["written"] == 3 and summary["skipped_by_reason"] == {"engine": 1}
    assert summary["key_frame_reasons"] == {"first": 1, "reset": 1}  # the frame after the failure
    assert summary["setup_s"] < 0.1 and summary["fps"] > 0
    capsys.readouterr()
    # every non-key frame fails: key frames alternate with failures, never 20 in a row; exit 0 and a warning
    monkeypatch.setattr(CopyPropagator, "propagate", lambda self, key, image: (_ for _ in ()).throw(RuntimeError("no")))
    assert main(["bag", str(tmp_path / "in"), str(tmp_path / "out1"), "--topic", TOPIC, "--no-progress",
                 "--propagator", "copy", "--schedule", "fixed:10"]) == 0
    assert ("mpvss: warning: the inference backend failed on 2 of 4 messages (skipped_by_reason and skip_examples"
            in capsys.readouterr().err)

    monkeypatch.setattr(offline, "MAX_ENGINE_FAILURES_IN_A_ROW", 2)
    monkeypatch.setattr(VideoSegmenter, "push", lambda self, image, stamp, **kw: (_ for _ in ()).throw(RuntimeError("broken")))
    assert main(["bag", str(tmp_path / "in"), str(tmp_path / "out2"), "--topic", TOPIC, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("mpvss: error: RuntimeError: the inference backend failed on 2 messages in a row (the last, "
                       "message 1: RuntimeError: broken) (--verbose for the traceback)")
    assert not (tmp_path / "out2").exists()


def test_setup_time_is_left_out_of_the_bag_fps(ts, tmp_path, frames, band_loaded, monkeypatch):
    """A fixed-shape backend's one-off export for a new size made onnxruntime read as several
    times slower than torch at equal per-frame times: fps leaves out setup_s, as mpvss segment."""
    import time

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:3]))
    real = BagOptions.build_segmenter

    def build_segmenter(self, *args, **kwargs):
        segmenter = real(self, *args, **kwargs)
        segmenter.model.prepare = lambda hw: time.sleep(0.5)  # an export taking 0.5 s per key frame
        return segmenter

    monkeypatch.setattr(BagOptions, "build_segmenter", build_segmenter)
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(propagator="copy", progress=False))
    assert summary["setup_s"] >= 0.5
    assert summary["fps"] == pytest.approx(3 / (summary["wall_time_s"] - summary["setup_s"]))


def _bag_with_other_topics(ts, path: Path, storage: str, n: int = 4):
    """Image frames (synthetic, 48 x 64) interleaved with /tf, a camera info and a custom type
    (what a robot's recording holds besides the camera)."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    custom = "my_msgs/msg/Wheel"
    ts_custom = get_typestore(Stores.ROS2_HUMBLE)
    ts_custom.register(get_types_from_msg("float64 speed\nstring name\n", custom))
    rng = np.random.default_rng(3)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    written: dict[str, list[tuple[int, bytes]]] = {}
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        from mpvss_ros.ros.bag import _transient_local_qos

        conns = {t: writer.add_connection(t, m, typestore=ts_custom) for t, m in (
            (TOPIC, IMAGE), ("/camera/camera_info", "sensor_msgs/msg/CameraInfo"), ("/wheel", custom))}
        conns["/tf"] = writer.add_connection("/tf", "tf2_msgs/msg/TFMessage", typestore=ts_custom,
                                             offered_qos_profiles=_transient_local_qos())
        for i, s in enumerate(stamps(n)):
            t = ts_custom.types
            msgs = {
                TOPIC: raw_image(ts_custom, rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), s),
                "/tf": t["tf2_msgs/msg/TFMessage"](transforms=[]),
                "/camera/camera_info": t["sensor_msgs/msg/CameraInfo"](
                    header=header(ts_custom, s), height=48, width=64, distortion_model="plumb_bob",
                    d=np.zeros(5), k=np.eye(3).reshape(-1), r=np.eye(3).reshape(-1), p=np.zeros(12),
                    binning_x=0, binning_y=0, roi=t["sensor_msgs/msg/RegionOfInterest"](
                        x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)),
                "/wheel": t[custom](speed=0.5 * i, name="left"),
            }
            for k, (topic, msg) in enumerate(msgs.items()):
                msgtype = conns[topic].msgtype
                raw = ts_custom.serialize_cdr(msg, msgtype)
                writer.write(conns[topic], s + 1000 * k, raw)
                written.setdefault(topic, []).append((s + 1000 * k, bytes(raw)))
    return written


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_other_topics_are_copied_byte_for_byte_when_asked(ts, tmp_path, band_loaded, storage):
    """A replay for RViz, Nav2 or Autoware needs /tf and the camera info besides the images; the
    output bag held only the image topic and the outputs."""
    written = _bag_with_other_topics(ts, tmp_path / "in", storage)
    opts = dict(propagator="copy", progress=False, colored=False, overlay=False, class_masks=False)
    summary = process_bag(tmp_path / "in", tmp_path / "some", TOPIC, band_loaded,
                          BagOptions(copy_topics=("/tf", "camera/camera_info"), **opts))
    assert summary["copied_topics"] == ["/camera/camera_info", "/tf"] and summary["written"] == 4
    with Reader(tmp_path / "some") as reader:
        got = {}
        for conn, t, raw in reader.messages():
            got.setdefault(conn.topic, []).append((t, bytes(raw)))
    for topic in ("/tf", "/camera/camera_info", TOPIC):
        assert got[topic] == written[topic], topic
    assert "/wheel" not in got and len(got["/mpvss/labels"]) == 4
    with Reader(tmp_path / "some") as reader:  # the offered QoS comes along
        (tf,) = [c for c in reader.connections if c.topic == "/tf"]
        assert tf.ext.offered_qos_profiles[0].durability == QosDurability.TRANSIENT_LOCAL

    summary = process_bag(tmp_path / "in", tmp_path / "all", TOPIC, band_loaded, BagOptions(copy_all_topics=True, **opts))
    assert summary["copied_topics"] == ["/camera/camera_info", "/tf", "/wheel"]
    with Reader(tmp_path / "all") as reader:
        wheel = [c for c in reader.connections if c.topic == "/wheel"]
        assert len(wheel) == 1 and "float64 speed" in wheel[0].msgdef.data  # the custom type's definition kept
        got = [(t, bytes(raw)) for _c, t, raw in reader.messages(connections=wheel)]
    assert got == written["/wheel"]

    # --max-frames: the copies end where the first image past the last frame stands
    summary = process_bag(tmp_path / "in", tmp_path / "cut", TOPIC, band_loaded,
                          BagOptions(copy_topics=("/tf",), max_frames=2, **opts))
    assert summary["messages_per_topic"]["/tf"] == 2 and summary["written"] == 2


def test_copy_topics_that_are_missing_or_clash_with_outputs_are_refused(ts, tmp_path, band_loaded, capsys):
    _bag_with_other_topics(ts, tmp_path / "in", "sqlite3")
    with pytest.raises(ValueError, match=r"--copy-topics: '/odom' is not in .*; its topics: /camera/camera_info, "):
        process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                    BagOptions(copy_topics=("/tf", "/odom"), progress=False))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="'/odom' is not in"):  # with --copy-all-topics too
        process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                    BagOptions(copy_topics=("/odom",), copy_all_topics=True, progress=False))
    # an earlier run's outputs in the input bag would be written twice
    small = np.zeros((8, 8, 3), np.uint8)
    write_bag(ts, tmp_path / "rerun", "sqlite3", [(TOPIC, IMAGE, 1, raw_image(ts, small, 1)),
                                                  ("/mpvss/labels", IMAGE, 2, raw_image(ts, small, 1, "mono8"))])
    with pytest.raises(ValueError, match="/mpvss/labels of .* would be overwritten by this run's outputs; use another --namespace"):
        process_bag(tmp_path / "rerun", tmp_path / "out", TOPIC, band_loaded, BagOptions(copy_all_topics=True, progress=False))
    assert not (tmp_path / "out").exists()
    assert main(["bag", str(tmp_path / "in"), str(tmp_path / "out"), "--topic", TOPIC, "--copy-topics", "/odom",
                 "--no-progress"]) == 2
    assert "'/odom' is not in" in capsys.readouterr().err


def _assert_humble_decodes(meta_path: Path) -> None:
    """The output metadata holds what ROS 2 Humble's rosbag2 decodes, with the types it asks for
    (ros2/rosbag2, branch humble: ``convert<BagMetadata>::decode`` and its members in
    rosbag2_storage/src/rosbag2_storage/metadata_io.cpp, ``convert<Rosbag2QoS>::decode`` in
    rosbag2_transport/src/rosbag2_transport/qos.cpp). Humble reads no version number as too new;
    version 9 writes ``offered_qos_profiles`` as a YAML list, which its ``as<std::string>()`` refuses."""
    info = yaml.safe_load(meta_path.read_text())["rosbag2_bagfile_information"]
    assert info["version"] == 8
    assert isinstance(info["storage_identifier"], str) and isinstance(info["message_count"], int)
    assert isinstance(info["duration"]["nanoseconds"], int)
    assert isinstance(info["starting_time"]["nanoseconds_since_epoch"], int)
    assert all(isinstance(p, str) for p in info["relative_file_paths"])
    assert isinstance(info["compression_format"], str) and isinstance(info["compression_mode"], str)
    for f in info["files"]:
        assert isinstance(f["path"], str) and isinstance(f["message_count"], int)
        assert isinstance(f["duration"]["nanoseconds"], int) and isinstance(f["starting_time"]["nanoseconds_since_epoch"], int)
    for topic in info["topics_with_message_count"]:
        meta = topic["topic_metadata"]
        assert all(isinstance(meta[k], str) for k in ("name", "type", "serialization_format", "offered_qos_profiles"))
        assert isinstance(topic["message_count"], int)
        for qos in yaml.safe_load(meta["offered_qos_profiles"]) or []:  # a YAML string holding a list
            assert all(isinstance(qos[k], int) for k in ("history", "depth", "reliability", "durability", "liveliness"))
            assert all(isinstance(qos[k][u], int) and qos[k][u] >= 0 for k in ("deadline", "lifespan",
                       "liveliness_lease_duration") for u in ("sec", "nsec"))
            assert isinstance(qos["avoid_ros_namespace_conventions"], bool)


def test_a_humble_sqlite3_bag_gets_output_humble_can_read(ts, tmp_path, band_loaded):
    """Humble's own bags (metadata version 5, sqlite3 by default) give version-8 output whose
    metadata Humble's decoder reads, including the transient-local QoS of label_info."""
    small = np.zeros((8, 8, 3), np.uint8)
    write_bag(ts, tmp_path / "in", "sqlite3", [(TOPIC, IMAGE, 1, raw_image(ts, small, 1)),
                                               (TOPIC, IMAGE, 2, raw_image(ts, small, 2))])
    _edit_metadata(tmp_path / "in", lambda info: info.update(version=5))
    process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, BagOptions(propagator="copy", progress=False))
    _assert_humble_decodes(tmp_path / "out" / "metadata.yaml")
    info = yaml.safe_load((tmp_path / "out" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    (label_info,) = [t["topic_metadata"] for t in info["topics_with_message_count"]
                     if t["topic_metadata"]["name"] == "/mpvss/label_info"]
    assert yaml.safe_load(label_info["offered_qos_profiles"])[0]["durability"] == 1  # transient local


def test_a_topic_whose_type_has_no_definition_is_refused_by_name(tmp_path):
    """A custom type in a bag that stores no definitions cannot be written into a new bag; a
    ROS 2 Humble type there gets Humble's definition."""


    from mpvss_ros.ros.bag import _copy_connection

    conn = SimpleNamespace(topic="/wheel", msgtype="my_msgs/msg/Wheel", msgdef=SimpleNamespace(format=None, data=""),
                           digest="", ext=None)
    with pytest.raises(ValueError, match=r"cannot copy /wheel \(my_msgs/msg/Wheel\) of .*: the bag holds no definition"):
        _copy_connection(None, conn, get_typestore(Stores.ROS2_HUMBLE), tmp_path)
    # a type ROS 2 Humble has (/tf of a bag that stores no definitions) is written with Humble's
    store, calls = get_typestore(Stores.ROS2_HUMBLE), []
    writer = SimpleNamespace(add_connection=lambda topic, msgtype, **kw: calls.append((topic, msgtype, kw)) or "out")
    tf = SimpleNamespace(topic="/tf", msgtype="tf2_msgs/msg/TFMessage", msgdef=SimpleNamespace(format=None, data=""),
                         digest="", ext=None)
    assert _copy_connection(writer, tf, store, tmp_path) == "out"
    assert calls == [("/tf", "tf2_msgs/msg/TFMessage", {"typestore": store})]


def test_an_idl_definition_gets_its_header_and_a_hash_where_the_bag_has_none():
    """A bare IDL body gets the "IDL: <type>" header by which rosbags' writer tells IDL from .msg;
    an IDL definition without a type hash (a bag of metadata version <= 6) gets the RIHS01 of its
    parts, each read without its "IDL: " line."""
    body = "module my_msgs {\n  module msg {\n    struct Wheel {\n      double speed;\n    };\n  };\n};\n"
    store = get_typestore(Stores.ROS2_JAZZY)
    store.register(get_types_from_idl(body))
    digest = store.hash_rihs01("my_msgs/msg/Wheel")
    headed = _IDL_SEPARATOR + "IDL: my_msgs/msg/Wheel\n" + body
    for data, stored_digest in ((body, digest), (headed, "")):
        conn = SimpleNamespace(topic="/wheel", msgtype="my_msgs/msg/Wheel", digest=stored_digest,
                               msgdef=SimpleNamespace(format=SimpleNamespace(name="IDL"), data=data))
        assert _bag_definition(conn) == (headed, digest)


def test_copies_keep_the_bags_own_definitions_without_hashes_and_in_idl(ts, tmp_path, band_loaded):
    """A ROS 2 Humble MCAP bag (metadata version 5) stores .msg schemas but no type hashes: an empty
    hash made rosbags' writer fail an assert. IDL definitions were replaced by ROS 2 Humble's:
    a Jazzy Range (which has `variance`) was copied with Humble's definition, so the output could
    not decode its own messages, and a custom IDL type was refused."""
    from rosbags.highlevel import AnyReader

    # (a) Humble MCAP: metadata rewritten as Humble's rosbag2 writes it (version 5, no hashes)
    small = np.zeros((8, 8, 3), np.uint8)
    humble = tmp_path / "humble"
    with Writer(humble, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        cam = writer.add_connection(TOPIC, IMAGE, typestore=ts)
        tf = writer.add_connection("/tf", "tf2_msgs/msg/TFMessage", typestore=ts)
        for i in range(2):
            writer.write(cam, 10 + 10 * i, ts.serialize_cdr(raw_image(ts, small, 10 + 10 * i), IMAGE))
            writer.write(tf, 11 + 10 * i, ts.serialize_cdr(ts.types["tf2_msgs/msg/TFMessage"](transforms=[]),
                                                           "tf2_msgs/msg/TFMessage"))
    def humble_metadata(info):
        info["version"] = 5
        for topic in info["topics_with_message_count"]:
            topic["topic_metadata"].pop("type_description_hash", None)

    _edit_metadata(humble, humble_metadata)
    opts = dict(propagator="copy", progress=False, colored=False, overlay=False, class_masks=False)
    summary = process_bag(humble, tmp_path / "humble_out", TOPIC, band_loaded, BagOptions(copy_topics=("/tf",), **opts))
    assert summary["messages_per_topic"]["/tf"] == 2
    with Reader(tmp_path / "humble_out") as reader:
        (conn,) = [c for c in reader.connections if c.topic == "/tf"]
        assert conn.digest == get_typestore(Stores.ROS2_HUMBLE).hash_rihs01("tf2_msgs/msg/TFMessage")
    _assert_humble_decodes(tmp_path / "humble_out" / "metadata.yaml")

    # (b) IDL definitions: a Jazzy Range and a custom type, kept as the bag defines them
    sep = "=" * 80 + "\n"
    wheel_idl = sep + "IDL: my_msgs/msg/Wheel\nmodule my_msgs {\n  module msg {\n    struct Wheel {\n      double speed;\n    };\n  };\n};\n"
    jazzy = get_typestore(Stores.ROS2_JAZZY)
    wheel_ts = get_typestore(Stores.ROS2_JAZZY)
    wheel_ts.register(get_types_from_idl(wheel_idl.split("\n", 2)[2]))
    range_idl = (sep + "IDL: sensor_msgs/msg/Range\nmodule sensor_msgs {\n  module msg {\n    struct Range {\n"
                 "      std_msgs::msg::Header header;\n      uint8 radiation_type;\n      float field_of_view;\n"
                 "      float min_range;\n      float max_range;\n      float range;\n      float variance;\n    };\n  };\n};\n"
                 + sep + "IDL: std_msgs/msg/Header\nmodule std_msgs {\n  module msg {\n    struct Header {\n"
                 "      builtin_interfaces::msg::Time stamp;\n      string frame_id;\n    };\n  };\n};\n"
                 + sep + "IDL: builtin_interfaces/msg/Time\nmodule builtin_interfaces {\n  module msg {\n"
                 "    struct Time {\n      int32 sec;\n      uint32 nanosec;\n    };\n  };\n};\n")
    idl = tmp_path / "idl"
    with Writer(idl, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        cam = writer.add_connection(TOPIC, IMAGE, typestore=jazzy)
        wheel = writer.add_connection("/wheel", "my_msgs/msg/Wheel", msgdef=wheel_idl,
                                      rihs01=wheel_ts.hash_rihs01("my_msgs/msg/Wheel"))
        rng = writer.add_connection("/range", "sensor_msgs/msg/Range", msgdef=range_idl,
                                    rihs01=jazzy.hash_rihs01("sensor_msgs/msg/Range"))
        for i in range(2):
            img = raw_image(jazzy, small, 10 + 10 * i)
            writer.write(cam, 10 + 10 * i, jazzy.serialize_cdr(img, IMAGE))
            writer.write(wheel, 11 + 10 * i, wheel_ts.serialize_cdr(wheel_ts.types["my_msgs/msg/Wheel"](speed=1.5),
                                                                    "my_msgs/msg/Wheel"))
            writer.write(rng, 12 + 10 * i, jazzy.serialize_cdr(jazzy.types["sensor_msgs/msg/Range"](
                header=img.header, radiation_type=0, field_of_view=0.1, min_range=0.2, max_range=4.0, range=1.25,
                variance=0.01), "sensor_msgs/msg/Range"))
    process_bag(idl, tmp_path / "idl_out", TOPIC, band_loaded, BagOptions(copy_topics=("/wheel", "/range"), **opts))
    with AnyReader([tmp_path / "idl_out"]) as reader:  # decodes with the definitions stored in the output
        decoded = {c.topic: reader.deserialize(raw, c.msgtype) for c, _t, raw in reader.messages(
            connections=[c for c in reader.connections if c.topic in ("/wheel", "/range")])}
    assert decoded["/range"].variance == pytest.approx(0.01) and decoded["/range"].range == pytest.approx(1.25)
    assert decoded["/wheel"].speed == 1.5


def test_copied_connections_keep_their_own_qos_and_empty_topics_are_counted(ts, tmp_path, band_loaded):
    """Each publisher's offered QoS is kept, on copied topics and on the segmented one."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    def qos(durability, reliability=QosReliability.RELIABLE):
        zero = QosTime(sec=0, nsec=0)
        return [Qos(history=QosHistory.KEEP_LAST, depth=1, reliability=reliability, durability=durability,
                    deadline=zero, lifespan=zero, liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=zero,
                    avoid_ros_namespace_conventions=False)]

    tf_type = "tf2_msgs/msg/TFMessage"
    raw_tf = ts.serialize_cdr(ts.types[tf_type](transforms=[]), tf_type)
    with Writer(tmp_path / "in", version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        cam = writer.add_connection(TOPIC, IMAGE, typestore=ts, offered_qos_profiles=qos(QosDurability.VOLATILE))
        cam_best_effort = writer.add_connection(TOPIC, IMAGE, typestore=ts, offered_qos_profiles=qos(
            QosDurability.VOLATILE, QosReliability.BEST_EFFORT))
        volatile = writer.add_connection("/tf", tf_type, typestore=ts, offered_qos_profiles=qos(QosDurability.VOLATILE))
        latched = writer.add_connection("/tf", tf_type, typestore=ts, offered_qos_profiles=qos(QosDurability.TRANSIENT_LOCAL))
        writer.add_connection("/odom", "nav_msgs/msg/Odometry", typestore=ts)  # no message
        writer.write(cam, 10, ts.serialize_cdr(raw_image(ts, np.zeros((8, 8, 3), np.uint8), 10), IMAGE))
        writer.write(cam_best_effort, 13, ts.serialize_cdr(raw_image(ts, np.zeros((8, 8, 3), np.uint8), 13), IMAGE))
        writer.write(volatile, 11, raw_tf)
        writer.write(latched, 12, raw_tf)
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(copy_all_topics=True, propagator="copy", progress=False))
    assert summary["messages_per_topic"]["/tf"] == 2 and summary["messages_per_topic"]["/odom"] == 0
    with Reader(tmp_path / "out") as reader:
        tfs = [c for c in reader.connections if c.topic == "/tf"]
        assert {c.ext.offered_qos_profiles[0].durability for c in tfs} == {QosDurability.VOLATILE,
                                                                           QosDurability.TRANSIENT_LOCAL}
        assert sum(c.msgcount for c in tfs) == 2
        cams = {c.ext.offered_qos_profiles[0].reliability: c.msgcount for c in reader.connections if c.topic == TOPIC}
        assert cams == {QosReliability.RELIABLE: 1, QosReliability.BEST_EFFORT: 1}
    assert summary["frames"] == 2


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_a_full_disk_is_one_error_line_and_leaves_no_output(ts, tmp_path, capsys, monkeypatch, storage):
    """sqlite3's "database or disk is full" is no OSError: it ended mpvss bag with a traceback."""
    import sqlite3

    from helpers import error_line

    rng = np.random.default_rng(4)
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                                                               for _ in range(3)]))
    real_write, calls = Writer.write, []

    def write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise (sqlite3.OperationalError("database or disk is full") if storage == "sqlite3"
                   else OSError(errno.ENOSPC, "No space left on device"))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Writer, "write", write)
    rc = main(["bag", str(tmp_path / "in"), str(tmp_path / "out"), "--topic", TOPIC, "--storage", storage,
               "--propagator", "copy", "--no-progress", "--threads", "1"])
    line = error_line(capsys.readouterr().err)
    assert rc == 1
    assert f"cannot write the output bag {tmp_path / 'out'}: " in line
    assert ("disk is full" if storage == "sqlite3" else "No space left on device") in line
    assert not (tmp_path / "out").exists()


def test_write_errors_without_a_file_name_become_one_error_naming_the_bag(tmp_path):
    """A full disk, an exceeded quota or a file too large, raised without a file name, becomes an
    OSError naming the output bag with the system's reason; an error on a named file stays as it is."""
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        with pytest.raises(OSError) as info:
            _raise_write_error(OSError(code, "why not"), tmp_path / "out")
        assert str(info.value) == f"cannot write the output bag {tmp_path / 'out'}: why not (its partial folder was removed)"
    _raise_write_error(OSError(errno.ENOSPC, "No space left on device", "/some/file"), tmp_path / "out")
    _raise_write_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path / "out")


@pytest.mark.parametrize("when", ["close", "cleanup"])
def test_sigterm_while_closing_or_cleaning_up_leaves_no_output(ts, tmp_path, frames, band_loaded, monkeypatch, when):
    """SIGTERM while Writer.close commits and writes metadata.yaml (after the removal guard had
    been left), or a second SIGTERM while the partial output is removed: the folder stayed."""
    import os
    import signal

    import mpvss_ros.ros.bag as bag_module

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:3]))
    real_close, real_rmtree, real_push = Writer.close, bag_module.shutil.rmtree, VideoSegmenter.push
    if when == "close":
        monkeypatch.setattr(Writer, "close", lambda self: (os.kill(os.getpid(), signal.SIGTERM), real_close(self)))
    else:
        calls = []

        def push(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_push(self, *a, **k)

        monkeypatch.setattr(VideoSegmenter, "push", push)
        monkeypatch.setattr(bag_module.shutil, "rmtree", lambda p, *a, **k: (os.kill(os.getpid(), signal.SIGTERM),
                                                                            real_rmtree(p, *a, **k)))
    def guard(signum, frame):  # the default action would end the test session
        raise AssertionError("SIGTERM reached the handler in place before process_bag")

    before = signal.signal(signal.SIGTERM, guard)
    try:
        with pytest.raises(SystemExit, match="143"):
            process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, BagOptions(propagator="copy", progress=False))
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not (tmp_path / "out").exists()


def test_a_sigterm_handler_installed_from_c_is_left_alone(ts, tmp_path, frames, band_loaded, monkeypatch):
    """signal.getsignal gives None for a handler installed by C code (rclpy's): restoring None
    raised TypeError at the end of every run in such a process."""
    import mpvss_ros.offline as offline

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:2]))
    monkeypatch.setattr(offline.signal, "getsignal", lambda signum: None)
    installed = []
    monkeypatch.setattr(offline.signal, "signal", lambda *args: installed.append(args))
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, BagOptions(propagator="copy", progress=False))
    assert summary["written"] == 2 and installed == []


@pytest.mark.parametrize("how", ["sigterm", "storage_error"])
def test_a_failure_inside_writer_open_leaves_no_output(ts, tmp_path, frames, band_loaded, monkeypatch, how):
    """Writer.open makes the folder, then the storage file: SIGTERM or a storage error there left it."""
    import os
    import signal

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, frames[:2]))
    real_open = Writer.open

    def open_(self):
        if how == "sigterm":
            real_open(self)
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.path.mkdir(mode=0o755, parents=True)
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Writer, "open", open_)

    def guard(signum, frame):  # the default action would end the test session
        raise AssertionError("SIGTERM reached the handler in place before process_bag")

    before = signal.signal(signal.SIGTERM, guard)
    try:
        with pytest.raises(SystemExit if how == "sigterm" else PermissionError):
            process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, BagOptions(propagator="copy", progress=False))
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not (tmp_path / "out").exists()


def test_copy_topics_list_ends_at_the_next_option_or_at_double_dash():
    """``--copy-topics`` takes several values, so IN OUT right after it would be read as topics;
    the help says to end the list with ``--`` or another option, and both forms parse."""
    from mpvss_ros.cli import build_parser

    parser = build_parser()
    for argv in (["bag", "--topic", "/cam", "--copy-topics", "/tf", "/odom", "--", "IN", "OUT"],
                 ["bag", "--copy-topics", "/tf", "/odom", "--topic", "/cam", "IN", "OUT"],
                 ["bag", "IN", "OUT", "--topic", "/cam", "--copy-topics", "/tf", "/odom"]):
        args = parser.parse_args(argv)
        assert (args.input, args.output, args.topic, list(args.copy_topics)) == ("IN", "OUT", "/cam", ["/tf", "/odom"])
    bag_parser = parser._subparsers._group_actions[0].choices["bag"]
    assert "end the list with --" in " ".join(bag_parser.format_help().split())


def test_bag_keeps_no_record_per_frame_until_the_end(ts, tmp_path, band_loaded, monkeypatch):
    """mpvss bag held every written frame's record until the end of the bag, to summarise them
    (about 50 MB more per hour of 30 fps video, offline.RunStats). The summary's figures are kept
    compactly instead."""
    from helpers import count_live_records

    seen = count_live_records(monkeypatch)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(7)]
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, images))
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(propagator="copy", schedule="fixed:3", progress=False))
    assert summary["written"] == 7 and len(seen) == 7 and max(seen) == 0, f"records alive at each frame: {seen}"
    assert summary["key_frames"] == 3 and summary["key_frame_reasons"] == {"first": 1, "interval": 2}
    assert summary["stage_latency_ms"]["total"]["count"] == 7 and summary["median_total_ms"]["all"] is not None
    # the medians of the key and of the non-key frames' totals (NS/info's total_latency_ms: float32; the
    # summary's: rounded to the microsecond)
    infos = [m for _, m, _ in read_bag(ts, tmp_path / "out")["/mpvss/info"]]
    totals = {key: [float(i.total_latency_ms) for i in infos if i.is_key_frame == key] for key in (True, False)}
    assert summary["median_total_ms"] == pytest.approx({"all": float(np.median(totals[True] + totals[False])),
                                                        "key": float(np.median(totals[True])),
                                                        "non_key": float(np.median(totals[False]))}, abs=1e-3)


def _gradients(n: int, h: int = 24, w: int = 32) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    return [np.repeat(((xx * 5 + yy + 7 * i) % 256).astype(np.uint8)[..., None], 3, axis=2) for i in range(n)]


def test_outputs_turned_off_get_no_connection(ts, tmp_path, band_loaded):
    """--no-colored etc.: those topics are not in the output bag at all (no empty connections for
    ``ros2 bag info`` / ``play`` to list)."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(2)))
    process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                BagOptions(propagator="copy", colored=False, overlay=False, class_masks=False, progress=False))
    with Reader(tmp_path / "out") as reader:
        assert sorted(c.topic for c in reader.connections) == sorted(
            [TOPIC, "/mpvss/labels", "/mpvss/confidence", "/mpvss/label_info", "/mpvss/info"])


def test_copy_topics_naming_the_segmented_topic_still_segments_it(ts, tmp_path, band_loaded):
    """--copy-topics with the image topic itself (e.g. a list shared between runs): the topic is
    segmented, and copied once, as without it."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(3)))
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(propagator="copy", copy_topics=(TOPIC,), progress=False))
    assert summary["written"] == 3 and summary["copied_topics"] == []
    got = read_bag(ts, tmp_path / "out")
    assert len(got[TOPIC]) == 3 and len(got["/mpvss/labels"]) == 3
    with Reader(tmp_path / "out") as reader:
        assert [c.topic for c in reader.connections].count(TOPIC) == 1


def test_engine_failures_that_are_not_in_a_row_never_stop_the_run(ts, tmp_path, band_loaded, monkeypatch):
    """A backend that fails on every non-key frame fails more than MAX_ENGINE_FAILURES_IN_A_ROW
    times in all, but never twice in a row: the run completes (here with the limit lowered to 3)."""
    import mpvss_ros.offline as offline
    from mpvss_ros.propagation import CopyPropagator

    monkeypatch.setattr(offline, "MAX_ENGINE_FAILURES_IN_A_ROW", 3)
    n = 10
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(n, 8, 8)))
    monkeypatch.setattr(CopyPropagator, "propagate",
                        lambda self, key, image: (_ for _ in ()).throw(RuntimeError("no")))
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(propagator="copy", schedule="fixed:100", progress=False))
    assert summary["frames"] == n and summary["written"] == n // 2
    assert summary["skipped_by_reason"] == {"engine": n // 2}


def test_class_pixel_share_counts_every_written_frames_labels(ts, tmp_path, band_loaded):
    """The summary's class_pixel_share: each class's share of the labels written, over all frames."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(3)))
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(propagator="copy", progress=False))
    labels = np.concatenate([image_array(m).ravel() for _, m, _ in read_bag(ts, tmp_path / "out")["/mpvss/labels"]])
    counts = np.bincount(labels, minlength=5)
    expected = {c: round(float(n) / labels.size, 6) for c, n in enumerate(counts) if n > 0}
    assert len(expected) >= 3 and summary["class_pixel_share"] == expected


def test_an_input_topic_named_like_an_output_is_refused(ts, tmp_path, band_loaded):
    """Images recorded on /mpvss/labels (an earlier run's output topic, say) cannot be segmented
    into /mpvss: the outputs would be written onto the input topic. Refused by name, no output."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(2), topic="/mpvss/labels"))
    with pytest.raises(ValueError, match="input topic /mpvss/labels would be overwritten by an output; use another --namespace"):
        process_bag(tmp_path / "in", tmp_path / "out", "/mpvss/labels", band_loaded,
                    BagOptions(propagator="copy", progress=False))
    assert not (tmp_path / "out").exists()
    summary = process_bag(tmp_path / "in", tmp_path / "out", "/mpvss/labels", band_loaded,
                          BagOptions(propagator="copy", progress=False), namespace="/seg")
    assert summary["written"] == 2


# --------------------------------------------------------------------------------------------
# Property-based: random bags of good and bad camera messages
# --------------------------------------------------------------------------------------------

#: Frame sizes (height, width) of the generated camera messages; None: the previous message's
#: size (most often, so that frames are propagated between resolution changes).
_FUZZ_SIZES = (None, None, None, None, None, (24, 32), (32, 48), (40, 64))
#: Header stamp steps (ns) from one camera message to the next in bag order: 30 and 15 fps most
#: often, stamps going backwards a little or a lot, 0.6 s (two of them around a skipped message
#: make no gap), a jump over max_gap_s.
_STAMP_STEPS = (33_333_333, 33_333_333, 66_666_667, -40_000_000, -300_000_000, 600_000_000, 2_500_000_000)
_MAX_GAP_NS = 1_000_000_000  # BagOptions' max_gap_s
_GARBAGE_CDR = b"\x00\x01\x00\x00garbage"
#: (kind, encoding or codec): good ones, and each kind of message the run must skip.
_GOOD_RAW = st.tuples(st.just("good"), st.sampled_from(["rgb8", "bgr8", "mono8", "rgba8"]))
_GOOD_COMPRESSED = st.tuples(st.just("good"), st.sampled_from(["jpeg", "png"]))
_BAD = {False: st.sampled_from([("encoding", "32FC1"), ("encoding", "16UC1"), ("encoding", "8UC3"),
                                ("short", "rgb8"), ("short", "mono8"), ("empty", "rgb8"), ("garbage", "")]),
        True: st.sampled_from([("corrupt", "jpeg"), ("encoding", "png"), ("empty", "jpeg"), ("garbage", "")])}


def _camera_messages(compressed: bool) -> st.SearchStrategy:
    """3 to 10 camera messages in bag order: ((kind, encoding or codec), size, header stamp step, frame_id)."""
    kind = st.one_of(_GOOD_COMPRESSED if compressed else _GOOD_RAW, _BAD[compressed])
    return st.lists(st.tuples(kind, st.sampled_from(_FUZZ_SIZES), st.sampled_from(_STAMP_STEPS),
                              st.sampled_from(["camera_optical"] * 5 + ["rear"])), min_size=3, max_size=10)


def _fuzz_camera_message(ts, compressed: bool, kind: str, variant: str, rgb: np.ndarray, stamp_ns: int, frame_id: str):
    """A camera message of ``kind`` (``good`` or a defect) holding ``rgb``, or raw garbage CDR."""
    if kind == "garbage":
        return _GARBAGE_CDR
    if compressed:
        msg = jpeg_image(ts, rgb, stamp_ns, frame_id, codec=variant)
        if kind == "corrupt":
            msg.data = msg.data[: msg.data.size // 3]
        elif kind == "encoding":
            msg.format = "16UC1; png compressed "  # a depth map
        elif kind == "empty":
            msg.data = msg.data[:0]
        return msg
    pixels = {"mono8": rgb[..., 0], "rgba8": np.dstack([rgb, rgb[..., :1]])}.get(variant, rgb)
    msg = raw_image(ts, pixels, stamp_ns, encoding=variant, frame_id=frame_id)
    if kind == "short":
        msg.data = msg.data[: msg.data.size // 2]
    elif kind == "empty":
        msg.height, msg.data = 0, msg.data[:0]
    return msg


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(compressed=st.booleans(), storage=st.sampled_from(["sqlite3", "mcap"]), data=st.data(),
       copy=st.sampled_from([(), ("/tf",), ("chatter", "/odom"), "all"]),
       max_frames=st.sampled_from([None, None, 2, 5]), interval=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_random_bags_of_good_and_bad_messages(ts, tmp_path_factory, band_loaded, capsys, compressed, storage, data,
                                              copy, max_frames, interval, seed):
    """``mpvss bag`` on a random bag: camera messages good and bad (unsupported encodings, data
    too short, empty images, corrupt JPEGs, depth PNGs, undecodable CDR) at random sizes, header
    stamps going back or jumping against the bag's receive times, two frame_ids, other topics
    (one without messages) copied or not, written in random order. Exit status 0 with one set of
    outputs per good message carrying its exact header at its bag time, every bad message counted
    under its reason, the key frames the README promises, copies byte for byte, message counts
    that add up; exit 1 and no output when nothing could be segmented, 2 for a topic without
    messages."""
    import mpvss_ros.cli as cli
    import mpvss_ros.ros.bag as bag_module

    rng = np.random.default_rng(seed)
    topic, msgtype = (CTOPIC, COMPRESSED) if compressed else (TOPIC, IMAGE)
    # a camera topic without messages now and then, else 3 to 10 of them
    camera = [] if data.draw(st.integers(0, 9), label="empty topic") == 9 else data.draw(_camera_messages(compressed),
                                                                                         label="camera")
    others = data.draw(st.lists(st.tuples(st.sampled_from(["/tf", "/chatter"]), st.integers(0, len(camera)),
                                          st.text(max_size=5)), max_size=4), label="others")
    bag0, stamp_ns = 1_600_000_000 * 10**9, T0 * 10**9  # receive times unrelated to the header stamps
    by_bag_time, entries = {}, []
    hw = _FUZZ_SIZES[-1]
    for i, ((kind, variant), size, step, frame_id) in enumerate(camera):
        stamp_ns, hw = stamp_ns + (step if i else 0), size or hw
        t = bag0 + i * 10_000_000
        reason = None if kind == "good" else "deserialize" if kind == "garbage" else "conversion"
        by_bag_time[t] = SimpleNamespace(reason=reason, hw=hw, stamp_ns=stamp_ns, frame_id=frame_id, noted=kind != "garbage")
        entries.append((topic, msgtype, t, _fuzz_camera_message(ts, compressed, kind, variant,
                                                                rng.integers(0, 256, (*hw, 3), dtype=np.uint8),
                                                                stamp_ns, frame_id)))
    for j, (other, at, text) in enumerate(others):
        msg = (ts.types["tf2_msgs/msg/TFMessage"](transforms=[]) if other == "/tf"
               else ts.types["std_msgs/msg/String"](data=text))
        entries.append((other, "tf2_msgs/msg/TFMessage" if other == "/tf" else "std_msgs/msg/String",
                        bag0 + at * 10_000_000 - 5_000_000 + j, msg))
    order = data.draw(st.permutations(range(len(entries))), label="write order")
    folder = tmp_path_factory.mktemp("fuzz")
    in_bag, out_bag = folder / "in", folder / "out"
    write_bag(ts, in_bag, storage, [entries[k] for k in order],
              topics=[(topic, msgtype), ("/tf", "tf2_msgs/msg/TFMessage"), ("/chatter", "std_msgs/msg/String"),
                      ("/odom", "nav_msgs/msg/Odometry")])

    args = ["bag", str(in_bag), str(out_bag), "--topic", topic, "--no-progress", "--propagator", "copy",
            "--schedule", f"fixed:{interval}", "--storage", storage]
    args += ["--max-frames", str(max_frames)] if max_frames else []
    args += ["--copy-all-topics"] if copy == "all" else ["--copy-topics", *copy] if copy else []
    summaries, real_process_bag = [], bag_module.process_bag

    def process_bag_kept(*a, **k):  # the CLI's run, its summary kept
        summaries.append(real_process_bag(*a, **k))
        return summaries[-1]

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "load_model_and_backend", lambda *a, **k: (band_loaded, None))
        mp.setattr(bag_module, "process_bag", process_bag_kept)
        rc = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err

    # what the run reads: the bag's messages in the reader's order, up to the image past --max-frames
    copied = {"/tf", "/chatter", "/odom"} if copy == "all" else {"/" + c.lstrip("/") for c in copy}
    with Reader(in_bag) as reader:
        read = [(c.topic, t, bytes(raw)) for c, t, raw in reader.messages() if c.topic in copied | {topic}]
    images = [k for k, (tp, _, _) in enumerate(read) if tp == topic]
    if max_frames is not None and len(images) > max_frames:
        read = read[: images[max_frames]]
    processed = [SimpleNamespace(**vars(by_bag_time[t]), t=t) for tp, t, _ in read if tp == topic]
    good = [m for m in processed if m.reason is None]
    reasons: dict[str, int] = {}
    for m in processed:
        if m.reason:
            reasons[m.reason] = reasons.get(m.reason, 0) + 1

    if not camera:  # a topic without messages: refused before any output
        assert rc == 2 and "has no messages" in err and not out_bag.exists() and not summaries
        return
    (summary,) = summaries
    assert (summary["frames"], summary["written"]) == (len(processed), len(good))
    assert summary["skipped_by_reason"] == reasons and summary["skipped"] == sum(reasons.values())
    brief = json.loads(out.splitlines()[0])
    assert (brief["frames"], brief["written"], brief["skipped_by_reason"]) == (len(processed), len(good), reasons)
    if not good:  # nothing segmented: exit 1, one error line, the output removed
        assert rc == 1 and err.strip().splitlines()[-1].startswith(f"mpvss: error: no message of {topic} could be")
        assert not out_bag.exists()
        return
    assert rc == 0, err

    got = read_bag(ts, out_bag)
    outputs = output_topics()
    del outputs["autoware_mask"]
    # the camera topic (bad messages included) and the copied topics: byte for byte, at their bag times
    for tp in {topic} | copied:
        assert [(t, bytes(raw)) for t, _, raw in got.get(tp, [])] == [(t, raw) for x, t, raw in read if x == tp], tp
    with Reader(out_bag) as reader:
        assert {c.topic for c in reader.connections} == {topic, *copied, *outputs.values()}
        counted = {}
        for c in reader.connections:
            counted[c.topic] = counted.get(c.topic, 0) + c.msgcount
    assert summary["messages_per_topic"] == {tp: len(got.get(tp, [])) for tp in counted} == counted
    meta = yaml.safe_load((out_bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["message_count"] == sum(counted.values())

    # one set of outputs per good message: its bag time, its exact header
    infos = {t: m for t, m, _ in got[outputs["info"]]}
    assert len(infos) == len(got[outputs["info"]])
    keys = [m for m in good if infos[m.t].is_key_frame]
    for key, tp in outputs.items():
        expected = keys if key == "label_info" else good
        assert sorted((t, msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec, msg.header.frame_id)
                      for t, msg, _ in got[tp]) == sorted((m.t, m.stamp_ns, m.frame_id) for m in expected), key
    for (t, labels, _), (t_conf, confidence, _), (t_masks, masks, _) in zip(
            got[outputs["labels"]], got[outputs["confidence"]], got[outputs["class_masks"]], strict=True):
        assert t == t_conf == t_masks and labels.encoding == confidence.encoding == "mono8"
        assert image_array(labels).shape == image_array(confidence).shape == next(m.hw for m in good if m.t == t)
        assert image_array(labels).max() < band_loaded.config.num_classes
        assert list(masks.class_ids) == sorted(int(c) for c in np.unique(image_array(labels)))
    for tp in (outputs["colored"], outputs["overlay"]):
        assert [image_array(m).shape for _, m, _ in got[tp]] == [(*m.hw, 3) for m in good]

    # key frames: the first, after a resolution change, a header stamp going back, a new frame_id,
    # or a gap over max_gap_s before it; a time_gap key frame only after such a gap
    previous, last_noted, gap, key_ns = None, None, False, None
    for m in processed:
        jump = m.noted and last_noted is not None and m.stamp_ns - last_noted > _MAX_GAP_NS
        gap = gap or jump
        last_noted = m.stamp_ns if m.noted else last_noted
        if m.reason:
            continue
        info = infos[m.t]
        forced = previous is None or jump or m.hw != previous.hw or m.stamp_ns < previous.stamp_ns or (
            m.frame_id != previous.frame_id)
        assert info.is_key_frame or not forced, (m, previous, info.key_frame_reason)
        assert gap or info.key_frame_reason != "time_gap", (m, previous)
        key_ns = m.stamp_ns if info.is_key_frame else key_ns
        assert info.key_frame_stamp.sec * 10**9 + info.key_frame_stamp.nanosec == key_ns
        previous, gap = m, False


def test_a_fifo_as_the_storage_is_refused_instead_of_blocking(ts, tmp_path):
    """A named pipe as the .mcap/.db3 given, or as a bag folder's storage file, blocked forever in
    open() (helper-175); it is refused by name, with no output made. Each run is a child process
    with a time limit, so a regression fails the test instead of hanging the suite (the refusal
    comes before the model is used: none is given)."""
    import subprocess
    import sys

    code = ("import sys\nfrom mpvss_ros.ros.bag import process_bag\n"
            "process_bag(sys.argv[1], sys.argv[2], sys.argv[3], None)\n")

    def refused(bag):
        run = subprocess.run([sys.executable, "-c", code, str(bag), str(tmp_path / "out"), TOPIC],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 1, run.stderr[-800:]
        assert not (tmp_path / "out").exists()
        return run.stderr.strip().splitlines()[-1]

    os.mkfifo(tmp_path / "x.mcap")
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(1)))
    (db3,) = (tmp_path / "in").glob("*.db3")
    db3.unlink()
    os.mkfifo(db3)
    for bag in (tmp_path / "x.mcap", tmp_path / "in"):
        assert "not a regular file" in refused(bag)
    # named with a folder in front, as older rosbag2 wrote it: rosbags opens the FIFO by its last part
    # all the same, and the check had looked at the folder-prefixed path, which does not exist (helper-178)
    _edit_metadata(tmp_path / "in", lambda i: i.update(relative_file_paths=[f"old/{db3.name}"]))
    assert refused(tmp_path / "in").startswith(f"ValueError: cannot read bag storage {db3}: not a regular file")


@pytest.mark.parametrize("change", [
    lambda i: i["topics_with_message_count"][0]["topic_metadata"].update(type=[IMAGE]),  # TypeError: unhashable
    lambda i: i["topics_with_message_count"][0].update(message_count=float("inf")),      # OverflowError
    lambda i: i["topics_with_message_count"][0].update(message_count="x"),
    lambda i: i.update(relative_file_paths=i["relative_file_paths"] * 2),  # every message read twice
    # another spelling of the same file (rosbags opens the last part of each name): read twice too
    lambda i: i.update(relative_file_paths=i["relative_file_paths"] + ["./" + i["relative_file_paths"][0]]),
    lambda i: i.update(relative_file_paths=[1]),                             # TypeError: path / 1
    lambda i: i["topics_with_message_count"][0].update(message_count=-1),    # a count no bag holds
    lambda i: i["topics_with_message_count"][0]["topic_metadata"].update(name=""),
    lambda i: i["topics_with_message_count"][0]["topic_metadata"].update(name=5),
    lambda i: i["topics_with_message_count"][0]["topic_metadata"].update(type=""),
])
def test_metadata_of_the_wrong_kinds_is_refused_before_any_output(ts, tmp_path, lite, change):
    """Topic types, message counts and storage file lists of the wrong kind escaped as TypeError
    or OverflowError tracebacks, and a storage file listed twice had every frame segmented and
    written twice (helper-175). A file name that is no string, a negative count and an empty or
    non-string topic name or an empty type are the same damage: each is named as a damaged bag,
    not met later as a traceback, a run with a nonsense progress total or a "topic not in the bag"
    that sends the user looking for a typo."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(2)))
    _edit_metadata(tmp_path / "in", change)
    with pytest.raises(ValueError, match=f"cannot read bag {re.escape(str(tmp_path / 'in'))}: "):
        process_bag(tmp_path / "in", tmp_path / "out", TOPIC, lite, BagOptions(propagator="copy", progress=False,
                                                                               copy_all_topics=True))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("column, value", [("timestamp", "abc"), ("timestamp", -5), ("timestamp", 1.7e18),
                                           ("data", None), ("data", "text")])
def test_stored_message_values_of_the_wrong_kind_are_a_value_error(ts, tmp_path, lite, column, value):
    """SQLite keeps whatever a damaged writer stored; a text, negative or real timestamp or a NULL
    or text payload escaped from the output writer (TypeError, OverflowError, AttributeError) or was
    written on (a negative timestamp) (helper-175). A ValueError naming the bag now, no output."""
    import sqlite3

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(2)))
    (db3,) = (tmp_path / "in").glob("*.db3")
    with contextlib.closing(sqlite3.connect(db3)) as con, con:
        # without rosbags' NOT NULL constraints and column types (another recorder's table may lack them)
        con.executescript("CREATE TABLE m2(id INTEGER PRIMARY KEY, topic_id, timestamp, data); "
                          "INSERT INTO m2 SELECT * FROM messages; DROP TABLE messages; "
                          "ALTER TABLE m2 RENAME TO messages;")
        con.execute(f"UPDATE messages SET {column} = ? WHERE id = 2", (value,))
    for storage in ("mcap", "sqlite3"):
        with pytest.raises(ValueError, match=f"cannot read bag {re.escape(str(tmp_path / 'in'))}: a message of {TOPIC}"):
            process_bag(tmp_path / "in", tmp_path / "out", TOPIC, lite, BagOptions(propagator="copy", progress=False),
                        storage=storage)
        assert not (tmp_path / "out").exists()


def test_messages_read_are_checked_against_the_count_the_bag_declares(ts, tmp_path, band_loaded, caplog):
    """rosbags reads nothing when metadata.yaml's type hash disagrees with the storage's: the run
    returned 0 frames and left an empty output bag; now a ValueError. Another count than declared
    is a warning (helper-175)."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(2)))
    meta = (tmp_path / "in" / "metadata.yaml").read_text()
    _edit_metadata(tmp_path / "in", lambda i: i["topics_with_message_count"][0]["topic_metadata"].update(
        type_description_hash="RIHS01_" + "0" * 64))
    options = BagOptions(propagator="copy", progress=False)
    with pytest.raises(ValueError, match=f"declares 2 messages on {TOPIC} and none could be read"):
        process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, options)
    assert not (tmp_path / "out").exists()
    (tmp_path / "in" / "metadata.yaml").write_text(meta)
    _edit_metadata(tmp_path / "in", lambda i: i["topics_with_message_count"][0].update(message_count=5))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.ros.bag"):
        summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded, options)
    assert summary["frames"] == 2
    assert any(f"read 2 messages on {TOPIC} where it declares 5" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.ros.bag"):  # --max-frames: fewer read on purpose
        process_bag(tmp_path / "in", tmp_path / "out2", TOPIC, band_loaded, dataclasses.replace(options, max_frames=1))
    assert not any("declares" in r.getMessage() for r in caplog.records)


def test_a_copied_topic_read_short_of_its_declared_count_is_a_warning(ts, tmp_path, band_loaded, caplog):
    """rosbags reads nothing of a topic whose type hash in metadata.yaml disagrees with the
    storage's: a copied /tf came out empty without a word (helper-178), the data loss the input
    topic's count check catches. The segmentation is still good, so a copied topic gets a warning,
    not an error."""
    _bag_with_other_topics(ts, tmp_path / "in", "sqlite3")

    def other_hash(info):
        for t in info["topics_with_message_count"]:
            if t["topic_metadata"]["name"] == "/tf":
                t["topic_metadata"]["type_description_hash"] = "RIHS01_" + "0" * 64

    _edit_metadata(tmp_path / "in", other_hash)
    opts = dict(propagator="copy", progress=False, colored=False, overlay=False, class_masks=False)
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.ros.bag"):
        summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                              BagOptions(copy_topics=("/tf", "/wheel"), **opts))
    assert summary["frames"] == 4 and summary["messages_per_topic"]["/wheel"] == 4
    warned = [r.getMessage() for r in caplog.records if "declares" in r.getMessage()]
    assert warned == [f"bag {tmp_path / 'in'}: read 0 messages on /tf where it declares 4 (metadata.yaml and the "
                      "storage disagree, or the storage is damaged)"]


def test_more_messages_read_than_the_bag_declares_is_a_warning(ts, tmp_path, band_loaded, caplog):
    """A metadata.yaml that declares fewer messages than the storage holds (copied from another
    recording, or edited) disagrees as much as one declaring more: the run goes on, and the
    warning says so, so the user knows the bag's metadata cannot be trusted."""
    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(2)))
    _edit_metadata(tmp_path / "in", lambda i: i["topics_with_message_count"][0].update(message_count=1))
    with caplog.at_level(logging.WARNING, logger="mpvss_ros.ros.bag"):
        summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                              BagOptions(propagator="copy", progress=False))
    assert summary["frames"] == 2
    assert any(f"read 2 messages on {TOPIC} where it declares 1" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["abc", float("inf")])
def test_a_bare_db3_with_a_damaged_metadata_version_is_a_value_error(ts, tmp_path, lite, value):
    """metadata_version 9e999 (inf) raised OverflowError, text an int() error naming nothing."""
    import sqlite3

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(1)))
    (db3,) = (tmp_path / "in").glob("*.db3")
    with contextlib.closing(sqlite3.connect(db3)) as con, con:
        con.execute("UPDATE metadata SET metadata_version = ?", (value,))
    with pytest.raises(ValueError, match="metadata table holds metadata_version"):
        process_bag(db3, tmp_path / "out", TOPIC, lite)


def test_a_message_at_bag_time_zero_is_segmented(ts, tmp_path, band_loaded):
    """0 ns is a valid bag timestamp (a simulation clock that starts at zero): the check that
    refuses damaged timestamps must not refuse it."""
    small = np.zeros((8, 8, 3), np.uint8)
    write_bag(ts, tmp_path / "in", "sqlite3", [(TOPIC, IMAGE, 0, raw_image(ts, small, 0)),
                                               (TOPIC, IMAGE, 1, raw_image(ts, small, 1))])
    summary = process_bag(tmp_path / "in", tmp_path / "out", TOPIC, band_loaded,
                          BagOptions(propagator="copy", progress=False))
    assert summary["written"] == 2
    assert [t for t, _, _ in read_bag(ts, tmp_path / "out")[TOPIC]] == [0, 1]


def test_an_mcap_log_time_past_int64_is_a_value_error(ts, tmp_path, lite):
    """MCAP stores log times as uint64; rosbag2 and a sqlite3 output bag take int64 nanoseconds.
    A log time of 2**63 (a damaged or foreign MCAP) is refused by name, whatever the output
    storage, instead of an OverflowError from the sqlite3 writer or an output bag ROS 2 reads as
    a negative time."""
    small = np.zeros((8, 8, 3), np.uint8)
    write_bag(ts, tmp_path / "in", "mcap", [(TOPIC, IMAGE, 1, raw_image(ts, small, 1)),
                                            (TOPIC, IMAGE, 2**63, raw_image(ts, small, 2))])
    for storage in ("sqlite3", "mcap"):
        with pytest.raises(ValueError, match=f"a message of {TOPIC} has the timestamp {2**63}, not nanoseconds"):
            process_bag(tmp_path / "in", tmp_path / "out", TOPIC, lite, BagOptions(propagator="copy", progress=False),
                        storage=storage)
        assert not (tmp_path / "out").exists()


def test_a_bare_db3_with_an_empty_metadata_table_gets_version_8(ts, tmp_path):
    """rosbag2 fills the storage's metadata table when it closes the file: a recording that was
    killed has the table but no row. It gets the version of a file without the table (8, output
    that older and newer ROS 2 read), not 9."""
    import sqlite3

    from mpvss_ros.ros.bag import _db3_metadata_version

    write_bag(ts, tmp_path / "in", "sqlite3", raw_entries(ts, _gradients(1)), version=9)
    (db3,) = (tmp_path / "in").glob("*.db3")
    assert _db3_metadata_version(db3) == 9
    with contextlib.closing(sqlite3.connect(db3)) as con, con:
        con.execute("DELETE FROM metadata")
    assert _db3_metadata_version(db3) == 8
