"""Offline segmentation of a rosbag2 recording (``mpvss bag``), without ROS installed.

Reads a rosbag2 bag (sqlite3 or MCAP, a bag folder or a single ``.db3``/``.mcap`` file) with
the pure-Python ``rosbags`` library, segments one image topic (``sensor_msgs/msg/Image`` or
``sensor_msgs/msg/CompressedImage``) with the same :class:`~mpvss_ros.segmenter.VideoSegmenter`
set-up as ``mpvss segment``, and writes a **new** bag holding the input topic (copied byte for
byte, with each publisher's offered QoS) and the topics the ROS node publishes:

========================  ==================================  ====================================
topic                     type                                content
========================  ==================================  ====================================
``NS/labels``             ``sensor_msgs/msg/Image``           ``mono8`` class IDs (``mono16`` > 255 classes)
``NS/confidence``         ``sensor_msgs/msg/Image``           ``mono8`` confidence 0..255
``NS/label_info``         ``vision_msgs/msg/LabelInfo``       on key frames, offered reliable + transient-local
``NS/colored``            ``sensor_msgs/msg/Image``           ``rgb8`` palette colours
``NS/overlay``            ``sensor_msgs/msg/Image``           ``rgb8`` input + colours + legend + tag
``NS/class_masks``        ``mpvss_ros/msg/ClassMasks``        one ``mono8`` mask per class present
``NS/info``               ``mpvss_ros/msg/SegmentationInfo``  key frame, scene score, latencies
========================  ==================================  ====================================

Every output message carries the input message's ``header`` unchanged and is stored at the
input message's bag timestamp, so ``ros2 bag play`` replays masks in step with the camera. Other
topics of the input (``/tf``, ``/tf_static``, camera info) are copied byte for byte when asked
(:attr:`BagOptions.copy_topics`, :attr:`BagOptions.copy_all_topics`).
Messages that cannot be segmented (unsupported encoding, inconsistent sizes, corrupt JPEG,
undecodable CDR, an error of the inference backend on that frame, as the node's core skips it)
are logged, counted by reason and skipped; they never abort the run, except a backend that fails
on :data:`~mpvss_ros.offline.MAX_ENGINE_FAILURES_IN_A_ROW` messages in a row (a set-up error). SIGTERM (``docker
stop``, systemd, ``timeout``) unwinds like Ctrl-C, so an interrupted run leaves no output. The
messages are built by :func:`mpvss_ros.ros.conversions.build_outputs`, the same code the node
uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Callable, Iterator, Sequence

import yaml
from tqdm import tqdm

from ..config import default_class_names
from ..model_loader import LoadedModel
from ..offline import EngineFailures, EngineOptions, RunStats, check_frame_limits, terminate_unwinds
from ..scheduling import StampGaps
from ..segmenter import FrameError, NonFiniteOutputError
from ..values import is_integer, shown
from ..viz import make_palette
from .conversions import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ConversionError,
    autoware_class_ids,
    build_outputs,
    check_autoware_class_ids,
    compressed_to_rgb,
    image_to_rgb,
    make_label_info,
    rosbags_message_types,
    stamp_to_seconds,
)

__all__ = ["BagOptions", "process_bag", "output_topics", "IMAGE_TYPE", "COMPRESSED_TYPE", "STORAGES"]

log = logging.getLogger(__name__)

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
LABEL_INFO_TYPE = "vision_msgs/msg/LabelInfo"
CLASS_MASKS_TYPE = "mpvss_ros/msg/ClassMasks"
INFO_TYPE = "mpvss_ros/msg/SegmentationInfo"

#: The outputs in the order their connections are made, with their message types: the one list
#: of :func:`output_topics` and of what :class:`_OutputBag` writes per frame.
_OUTPUT_TYPES = {"labels": IMAGE_TYPE, "confidence": IMAGE_TYPE, "label_info": LABEL_INFO_TYPE, "colored": IMAGE_TYPE,
                 "overlay": IMAGE_TYPE, "class_masks": CLASS_MASKS_TYPE, "autoware_mask": IMAGE_TYPE, "info": INFO_TYPE}
#: The outputs of every segmented frame (:class:`~mpvss_ros.ros.conversions.OutputMessages`' fields,
#: in write order); ``label_info`` goes out with key frames only.
_FRAME_OUTPUTS = tuple(key for key in _OUTPUT_TYPES if key != "label_info")

#: Output storage formats (rosbag2 storage identifiers).
STORAGES = ("sqlite3", "mcap")

#: Bad messages logged at WARNING per reason; later ones at DEBUG (counted either way).
_WARN_PER_REASON = 10
#: Skipped messages described in the summary.
_MAX_SKIP_EXAMPLES = 20

_NAME_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: "$" would allow a final "\n"


@dataclass
class BagOptions(EngineOptions):
    """Settings of one ``mpvss bag`` run: the engine's (:class:`~mpvss_ros.offline.EngineOptions`,
    as ``mpvss segment``) and these.

    Attributes:
        max_frames: stop after this many input messages (None = all).
        alpha: overlay opacity of the class colours, 0..1.
        colored, overlay, class_masks: write ``NS/colored``, ``NS/overlay``, ``NS/class_masks``.
        autoware_mask: write ``NS/autoware_mask``, the labels as Autoware class IDs run-length
            encoded for Autoware's ``segmentation_pointcloud_fusion``
            (:func:`~mpvss_ros.ros.conversions.make_autoware_mask`), as the node's
            ``publish_autoware_mask``.
        autoware_class_ids: the Autoware class ID of each model class; empty = by class name, as
            the node's ``autoware_class_ids``
            (:func:`~mpvss_ros.ros.conversions.autoware_class_ids`).
        progress: show a progress bar.
        max_image_pixels: largest frame (height x width pixels) segmented, as the node's
            parameter; larger ones are skipped (reason ``conversion``). None: no limit.
        copy_topics: other topics of the input bag copied unchanged into the output (e.g.
            ``/tf``, ``/tf_static``, ``/camera/camera_info``: what a replay for RViz, Nav2 or
            Autoware needs besides the images); a leading ``/`` may be left out.
        copy_all_topics: copy every other topic of the input bag.

    Raises:
        ValueError: when made, ``max_frames`` or ``max_image_pixels`` below 1
            (:func:`~mpvss_ros.offline.check_frame_limits`), ``alpha`` outside [0, 1] or NaN,
            ``autoware_class_ids`` without ``autoware_mask`` or outside 0..255.
    """

    max_frames: int | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    alpha: float = 0.5
    colored: bool = True
    overlay: bool = True
    class_masks: bool = True
    autoware_mask: bool = False
    autoware_class_ids: tuple[int, ...] = ()
    progress: bool = True
    copy_topics: tuple[str, ...] = ()
    copy_all_topics: bool = False

    def check(self) -> None:
        """As :meth:`~mpvss_ros.offline.EngineOptions.check`: the frame limits
        (:func:`~mpvss_ros.offline.check_frame_limits`), ``alpha``, and Autoware class IDs only
        with ``autoware_mask`` and each in 0..255 (their count is checked against the model's
        classes when the run starts)."""
        check_frame_limits(self.max_frames, self.max_image_pixels)
        if not 0.0 <= self.alpha <= 1.0:  # NaN too
            raise ValueError(f"alpha (--alpha) must be in [0, 1] (overlay opacity of the class colours), got "
                             f"{self.alpha:g}")
        if self.autoware_class_ids and not self.autoware_mask:
            raise ValueError("autoware_class_ids (--autoware-class-ids) needs autoware_mask (--autoware-mask), the "
                             "output it maps the classes for")
        check_autoware_class_ids(self.autoware_class_ids, "autoware_class_ids (--autoware-class-ids)")


def _run_settings(options: EngineOptions, loaded: LoadedModel, segmenter: Any) -> dict[str, Any]:
    """``options.run_settings`` with the ``max_gap_s`` the run applied to the messages' stamps
    (its scheduler's own is off)."""
    settings = options.run_settings(loaded, segmenter)
    gap = options.max_gap_s
    settings["schedule_settings"] = {**settings["schedule_settings"], "max_gap_s": gap if math.isfinite(gap) else None}
    return settings


def _opt(options: EngineOptions, name: str) -> Any:
    """An option of ``BagOptions``, or its default for other engine options (``SegmentOptions``)."""
    return getattr(options, name, getattr(BagOptions, name))


def normalize_namespace(namespace: str) -> str:
    """``"/mpvss"``, ``"mpvss/"`` -> ``"/mpvss"``; ``""`` or ``"/"`` -> ``""`` (root).

    Raises:
        ValueError: a part that is not a valid ROS name token.
    """
    parts = [p for p in str(namespace).strip().split("/") if p]
    for p in parts:
        if not _NAME_TOKEN.fullmatch(p):
            raise ValueError(f"invalid namespace {namespace!r}: {p!r} is not a ROS name "
                             "(letters, digits and _, not starting with a digit)")
    return "".join("/" + p for p in parts)


def output_topics(namespace: str = "/mpvss") -> dict[str, str]:
    """``{output: topic}`` for ``labels``, ``confidence``, ``label_info``, ``colored``,
    ``overlay``, ``class_masks``, ``autoware_mask`` and ``info`` under ``namespace``."""
    ns = normalize_namespace(namespace)
    return {k: f"{ns}/{k}" for k in _OUTPUT_TYPES}


@contextlib.contextmanager
def _open_reader(path: Path) -> Iterator[Any]:
    """A rosbags ``Reader``, open; its errors become ValueError naming the bag (a failure to
    close it after the block is a logged warning: every message was read)."""
    from rosbags.rosbag2 import Reader, ReaderError

    try:
        reader = Reader(path)
        reader.open()
    except ReaderError as exc:
        raise ValueError(f"cannot read bag {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a metadata.yaml of the wrong shapes: KeyError, TypeError, ...
        raise ValueError(f"cannot read bag {path}: {type(exc).__name__}: {exc}") from None
    try:
        _check_connections(reader.connections, path)
        yield reader
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the block's error is the one to report
            reader.close()
        if isinstance(exc, ReaderError):
            raise ValueError(f"cannot read bag {path}: {exc}") from None
        raise
    try:
        reader.close()
    except Exception as exc:  # noqa: BLE001 - rosbags' close trips over a damaged metadata.yaml (files: "x")
        # every message was read: the output stands, and the damage is named
        log.warning("bag %s read, but closing it failed (a damaged metadata.yaml?): %s: %s", path,
                    type(exc).__name__, exc)


def _check_connections(connections: Any, path: Path) -> None:
    """Refuse topics whose name, type or message count (as metadata.yaml or the storage gives them,
    and rosbags passes them on) are not a name, a name and a count: they failed later in sorting,
    hashing and sums with ``TypeError`` or ``OverflowError``."""
    for c in connections:
        topic, msgtype, count = getattr(c, "topic", None), getattr(c, "msgtype", None), getattr(c, "msgcount", 0)
        if not (isinstance(topic, str) and topic and isinstance(msgtype, str) and msgtype
                and (count is None or (is_integer(count) and count >= 0))):
            raise ValueError(f"cannot read bag {path}: it gives a topic the name {shown(topic)}, the type "
                             f"{shown(msgtype)} and the message count {shown(count)}; each must be a name, a "
                             "name and an integer >= 0 (a damaged metadata.yaml or storage file?)")


def _check_message_count(read: int, declared: list[Any], topic: str, path: Path, required: bool = True) -> None:
    """Compare the messages read on ``topic`` with the counts its connections declare: none read
    of some declared is a ValueError (rosbags reads nothing when metadata.yaml's type, serialization
    format or type hash disagrees with the storage) where the topic is ``required`` (the input
    topic), a warning on a copied topic, as another number is on either."""
    if not all(is_integer(n) for n in declared):
        return
    total = sum(declared)
    if read == 0 and total > 0 and required:
        raise ValueError(f"cannot read bag {path}: it declares {total} messages on {topic} and none could be read "
                         "(metadata.yaml disagrees with the storage file: the topic's type, serialization format or "
                         "type hash?)")
    if read != total:
        log.warning("bag %s: read %d messages on %s where it declares %d (metadata.yaml and the storage disagree, or "
                    "the storage is damaged)", path, read, topic, total)


def _read_messages(reader: Any, connections: list[Any], path: Path) -> Iterator[tuple[Any, int, bytes]]:
    """``reader.messages(connections=...)``; what the storage raises on a damaged file (sqlite3's
    "database disk image is malformed", a broken MCAP chunk) becomes a ValueError naming the bag."""
    messages = reader.messages(connections=connections)
    while True:
        try:
            item = next(messages)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - apsw / sqlite3 / MCAP / rosbags errors alike
            raise ValueError(f"cannot read bag {path}: {type(exc).__name__}: {exc}") from None
        conn, stamp_ns, raw = item
        # SQLite columns keep whatever was stored: text, a real, NULL (the writer failed on them later)
        if not is_integer(stamp_ns) or not 0 <= stamp_ns < 2**63:
            raise ValueError(f"cannot read bag {path}: a message of {conn.topic} has the timestamp {shown(stamp_ns)}, "
                             "not nanoseconds in [0, 2**63) (a damaged storage file?)")
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise ValueError(f"cannot read bag {path}: a message of {conn.topic} at {stamp_ns} ns holds "
                             f"{type(raw).__name__} data, not bytes (a damaged storage file?)")
        yield item


@contextlib.contextmanager
def _written_or_removed(writer: Any, path: Path) -> Iterator[None]:
    """Open ``writer`` (which creates the folder ``path``), close it after the block; if the block
    or the close raises or is interrupted, abort the writer and delete ``path``. (A removal armed
    inside ``with writer`` has already been left when ``Writer.close`` commits the storage and
    writes ``metadata.yaml``: an interruption there left a folder that is not a bag.)"""
    from rosbags.rosbag2 import WriterError

    try:
        writer.open()
    except WriterError:  # the folder exists: not this run's, nothing is removed
        raise
    except BaseException as exc:  # SIGTERM or a storage error after the folder was made
        shutil.rmtree(path, ignore_errors=True)
        _raise_write_error(exc, path)
        raise
    try:
        yield
        writer.close()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            writer.abort()
        shutil.rmtree(path, ignore_errors=True)
        _raise_write_error(exc, path)
        raise


def _raise_write_error(exc: BaseException, path: Path) -> None:
    """An error of the output storage as one OSError naming the bag: sqlite3's own errors ("database
    or disk is full"), which are no OSError and ended the run with a traceback, and a full disk or
    quota without a file name (MCAP: "[Errno 28] No space left on device")."""
    import errno
    import sqlite3

    full = isinstance(exc, OSError) and exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if isinstance(exc, sqlite3.Error) or full:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OSError(f"cannot write the output bag {path}: {reason} (its partial folder was removed)") from exc


def _db3_metadata_version(path: Path) -> int:
    """The metadata version a bare ``.db3`` file records in its ``metadata`` table (rosbag2 since
    Iron, and rosbags, keep a copy there); 8 without one (an older recording, whose folder's
    metadata.yaml would have said 8 or less), so that the file gets the output its folder gets."""
    import sqlite3

    try:
        # as_uri() percent-encodes '#' and '?' in the name: a plain "file:run#1.db3" opened (and
        # created) a file "run" read-write
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT metadata_version FROM metadata ORDER BY metadata_version DESC LIMIT 1").fetchone()
    except sqlite3.Error:  # no metadata table (or not a database: the reader says so next)
        return 8
    if not row or row[0] is None:
        return 8
    if not is_integer(row[0]) or not 1 <= row[0] <= 2**31 - 1:  # SQLite keeps whatever was stored: text, a real
        raise ValueError(f"cannot read bag {path}: its metadata table holds metadata_version {shown(row[0])}, not an "
                         "integer >= 1")
    return int(row[0])


def _bag_storage_and_version(path: Path) -> tuple[str, int]:
    """Storage identifier and metadata version of a bag folder or storage file."""
    if path.is_dir():
        meta = path / "metadata.yaml"
        if not meta.is_file():
            raise FileNotFoundError(f"{path} is not a rosbag2 bag: it has no metadata.yaml")
        try:
            data = yaml.safe_load(meta.read_text())
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8
            raise ValueError(f"cannot read {meta}: {exc}") from None
        info = data.get("rosbag2_bagfile_information") if isinstance(data, dict) else None
        if not isinstance(info, dict):
            raise ValueError(f"cannot read {meta}: it holds no rosbag2_bagfile_information mapping")
        storage, version = info.get("storage_identifier", "sqlite3"), info.get("version", 9)
        if not isinstance(storage, str):
            raise ValueError(f"cannot read {meta}: storage_identifier must be a name, got {shown(storage)}")
        if not is_integer(version) or not 1 <= version <= 2**31 - 1:
            raise ValueError(f"cannot read {meta}: version must be an integer >= 1, got {shown(version)}")
        files = info.get("relative_file_paths", [])
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise ValueError(f"cannot read bag {path}: metadata.yaml's relative_file_paths must be a list of file "
                             f"names, got {shown(files)}")
        # rosbags opens each entry's last part in the bag folder (older rosbag2 wrote names with
        # the folder in front), so ``in.db3`` and ``./in.db3`` are one file
        opened = [PurePath(name).name for name in files]
        if len(set(opened)) < len(opened):  # rosbags reads a file listed twice twice: every message doubled
            raise ValueError(f"cannot read bag {path}: metadata.yaml's relative_file_paths lists a file twice: "
                             f"{shown(files)}")
        for name in opened:
            _check_storage_file(path / name)
        return storage, int(version)
    _check_storage_file(path)
    suffix = path.suffix.lower()
    if suffix == ".mcap":
        return "mcap", 9
    if suffix == ".db3":
        return "sqlite3", _db3_metadata_version(path)
    raise ValueError(f"{path} is not a rosbag2 bag: give the bag folder, a .db3 or a .mcap file")


def _check_storage_file(path: Path) -> None:
    """Refuse a storage file that exists and is no regular file (a FIFO: opening it blocks until a
    writer comes; a device, a folder). A missing one is the reader's to report."""
    if path.exists() and not path.is_file():
        raise ValueError(f"cannot read bag storage {path}: not a regular file (a named pipe, a device or a "
                         "folder); record or copy the bag to a file first")


def _transient_local_qos() -> list[Any]:
    """Reliable + transient-local + keep-last-1 as rosbags ``Qos`` (what LabelInfo is offered with)."""
    try:
        from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness,
                                        QosReliability, QosTime)
    except ImportError:  # older rosbags without QoS objects
        return []
    zero = QosTime(sec=0, nsec=0)
    return [Qos(history=QosHistory.KEEP_LAST, depth=1, reliability=QosReliability.RELIABLE,
                durability=QosDurability.TRANSIENT_LOCAL, deadline=zero, lifespan=zero,
                liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=zero,
                avoid_ros_namespace_conventions=False)]


def _add_connection(writer: Any, topic: str, msgtype: str, qos: list[Any], **definition: Any) -> Any:
    """A writer connection; ``definition``: ``typestore=`` or ``msgdef=`` and ``rihs01=``."""
    if qos:
        try:
            return writer.add_connection(topic, msgtype, offered_qos_profiles=qos, **definition)
        except TypeError:  # this rosbags takes no QoS objects
            log.debug("rosbags cannot store offered QoS for %s", topic)
    return writer.add_connection(topic, msgtype, **definition)


def _offered_qos(conn: Any) -> list[Any]:
    return list(getattr(getattr(conn, "ext", None), "offered_qos_profiles", []) or [])


def _copied_connections(connections: list[Any], in_topic: str, names: Sequence[str], every: bool,
                        outputs: dict[str, str], where: Path) -> list[Any]:
    """The input connections copied unchanged besides the image topic: those of ``names`` (each
    must be in the bag; the leading ``/`` may be left out) or, with ``every``, all others.

    Raises:
        ValueError: a name not in the bag (the message lists the bag's topics), or a topic that
            one of this run's outputs would overwrite (an earlier run's output in the input).
    """
    chosen = []
    for name in names:  # checked with ``every`` too: a misspelt name is a mistake either way
        full = name if name.startswith("/") else "/" + name
        match = [c for c in connections if c.topic == full]
        if not match:
            listing = ", ".join(sorted({c.topic for c in connections}))
            raise ValueError(f"--copy-topics: {name!r} is not in {where}; its topics: {listing}")
        chosen += [c for c in match if c.topic != in_topic and c not in chosen]
    if every:
        chosen = [c for c in connections if c.topic != in_topic]
    clash = sorted({c.topic for c in chosen} & set(outputs.values()))
    if clash:
        raise ValueError(f"{', '.join(clash)} of {where} would be overwritten by this run's outputs; "
                         "use another --namespace")
    return chosen


#: The line between the parts of a bag's IDL definition (``IDL: <type>`` headers follow it), as
#: rosbag2 writes it and rosbags reads it.
_IDL_SEPARATOR = "=" * 80 + "\n"


def _bag_definition(conn: Any) -> tuple[str, str] | None:
    """The bag's own definition of ``conn``'s type as (text, RIHS01), in ``.msg`` or IDL form, or
    None. A bag without type hashes (ROS 2 Humble: metadata version <= 6, e.g. every Humble MCAP
    bag, whose schemas hold the .msg text) gets the hash computed from that text."""
    msgdef = getattr(conn, "msgdef", None)
    fmt = getattr(getattr(msgdef, "format", None), "name", "")
    data = getattr(msgdef, "data", "") or ""
    if fmt not in ("MSG", "IDL") or not data:
        return None
    digest = getattr(conn, "digest", "") or ""
    if not digest:
        from rosbags.typesys import Stores, get_typestore, get_types_from_idl, get_types_from_msg

        store = get_typestore(Stores.EMPTY)
        try:
            if fmt == "MSG":
                store.register(get_types_from_msg(data, conn.msgtype))
            else:
                for part in data.split(_IDL_SEPARATOR):
                    if part.strip():
                        store.register(get_types_from_idl(part.split("\n", 1)[1] if part.startswith("IDL: ") else part))
            digest = store.hash_rihs01(conn.msgtype)
        except Exception as exc:  # noqa: BLE001 - rosbags parse errors of a broken definition
            raise ValueError(f"cannot copy {conn.topic} ({conn.msgtype}): its definition in the bag does not "
                             f"parse ({type(exc).__name__}: {exc})") from None
    if fmt == "IDL" and not data.startswith(_IDL_SEPARATOR + "IDL: "):
        data = _IDL_SEPARATOR + f"IDL: {conn.msgtype}\n" + data  # rosbags' writer tells IDL by this header
    return data, digest


def _copy_connection(writer: Any, conn: Any, typestore: Any, where: Path) -> Any:
    """An output connection for ``conn`` (copied unchanged): the bag's own definition of its type
    (``.msg`` or IDL, custom message types too) where it holds one, else ROS 2 Humble's.

    Raises:
        ValueError: neither exists (a custom type in a bag that stores no definitions).
    """
    own = _bag_definition(conn)
    if own is not None:
        definition: dict[str, Any] = {"msgdef": own[0], "rihs01": own[1]}
    elif conn.msgtype in typestore.types:
        definition = {"typestore": typestore}
    else:
        raise ValueError(f"cannot copy {conn.topic} ({conn.msgtype}) of {where}: the bag holds no definition "
                         "of its type and ROS 2 Humble has none; leave it out of --copy-topics (or name the "
                         "topics to copy instead of --copy-all-topics)")
    return _add_connection(writer, conn.topic, conn.msgtype, _offered_qos(conn), **definition)


def _select_topic(connections: list[Any], topic: str, compressed: bool | None, where: Path) -> tuple[list[Any], str]:
    """The input connections of ``topic`` and their message type; ValueError with the image topics present."""
    image_topics = sorted({f"{c.topic} ({c.msgtype})" for c in connections if c.msgtype in (IMAGE_TYPE, COMPRESSED_TYPE)})
    listing = ", ".join(image_topics) if image_topics else "none"
    chosen = [c for c in connections if c.topic == topic]
    if not chosen and not topic.startswith("/"):
        chosen = [c for c in connections if c.topic == "/" + topic]
    if not chosen:
        raise ValueError(f"topic {topic!r} is not in {where}; image topics in the bag: {listing}")
    msgtypes = sorted({c.msgtype for c in chosen})
    if len(msgtypes) > 1:
        raise ValueError(f"topic {topic!r} has several message types in {where}: {', '.join(msgtypes)}")
    msgtype = msgtypes[0]
    if msgtype not in (IMAGE_TYPE, COMPRESSED_TYPE):
        raise ValueError(f"topic {topic!r} has type {msgtype}, not {IMAGE_TYPE} or {COMPRESSED_TYPE}; "
                         f"image topics in the bag: {listing}")
    if compressed is True and msgtype != COMPRESSED_TYPE:
        raise ValueError(f"--compressed was given but {topic!r} is a {msgtype}; leave --compressed out")
    if compressed is False and msgtype != IMAGE_TYPE:
        raise ValueError(f"{topic!r} is a {msgtype}, not a raw {IMAGE_TYPE}; use --compressed (or let it be detected)")
    return chosen, msgtype


class _OutputBag:
    """The output bag's connections, and the messages written per topic.

    Args:
        writer: an open ``rosbags.rosbag2.Writer``.
        typestore: the rosbags type store that serialises the outputs.
        inputs: the segmented topic's input connections, copied unchanged (one output connection
            per offered QoS, so each publisher's QoS is kept).
        copied: input connections of the other topics copied unchanged (one output connection per
            topic, type and offered QoS, likewise).
        topics: :func:`output_topics`.
        wanted: the optional outputs (``colored``, ``overlay``, ``class_masks``, ``autoware_mask``)
            -> written or not.
        where: the input bag, named in errors.
    """

    def __init__(self, writer: Any, typestore: Any, inputs: list[Any], copied: list[Any], topics: dict[str, str],
                 wanted: dict[str, bool], where: Path) -> None:
        self.writer, self.typestore, self.topics = writer, typestore, topics
        #: topic -> messages written (copied topics listed even when they hold none)
        self.counts: dict[str, int] = {c.topic: 0 for c in copied}
        by_name: dict[tuple[str, str, str], Any] = {}

        def connect(c: Any, make: Callable[[Any], Any]) -> Any:
            name = (c.topic, c.msgtype, repr(_offered_qos(c)))
            if name not in by_name:
                by_name[name] = make(c)
            return by_name[name]

        # input connection id -> output connection: the segmented topic's, then the copied topics'
        self._inputs = {c.id: connect(c, lambda c: _add_connection(writer, c.topic, c.msgtype, _offered_qos(c),
                                                                   typestore=typestore)) for c in inputs}
        self._copies = {c.id: connect(c, lambda c: _copy_connection(writer, c, typestore, where)) for c in copied}
        self._outputs = {key: _add_connection(writer, topics[key], msgtype,
                                              _transient_local_qos() if key == "label_info" else [], typestore=typestore)
                         for key, msgtype in _OUTPUT_TYPES.items() if wanted.get(key, True)}

    def copy(self, conn: Any, stamp_ns: int, raw: bytes) -> bool:
        """Write ``raw`` unchanged if ``conn`` is a copied topic's input connection; False otherwise."""
        out = self._copies.get(conn.id)
        if out is None:
            return False
        self._write(out, conn.topic, stamp_ns, raw)
        return True

    def copy_input(self, conn: Any, stamp_ns: int, raw: bytes) -> None:
        """Write one message of the segmented topic, read from input connection ``conn``, unchanged."""
        self._write(self._inputs[conn.id], conn.topic, stamp_ns, raw)

    def _write(self, out: Any, topic: str, stamp_ns: int, raw: bytes) -> None:
        self.writer.write(out, stamp_ns, raw)
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def put(self, key: str, stamp_ns: int, msg: Any) -> None:
        """Serialise ``msg`` and write it on the output ``key`` (of :func:`output_topics`)."""
        self._write(self._outputs[key], self.topics[key], stamp_ns, self.typestore.serialize_cdr(msg, _OUTPUT_TYPES[key]))

    def put_frame(self, stamp_ns: int, out: Any) -> None:
        """Write one segmented frame's messages (:func:`~mpvss_ros.ros.conversions.build_outputs`;
        the optional ones when built) at the input message's log time ``stamp_ns``."""
        for key in _FRAME_OUTPUTS:
            msg = getattr(out, key)
            if msg is not None:
                self.put(key, stamp_ns, msg)


def process_bag(in_path: str | Path, out_path: str | Path, topic: str, loaded: LoadedModel,
                options: EngineOptions | None = None,
                compressed: bool | None = None, namespace: str = "/mpvss", storage: str | None = None,
                backend: Any = None) -> dict[str, Any]:
    """Segment ``topic`` of the bag ``in_path`` and write a new bag ``out_path`` (see the module docstring).

    Args:
        in_path: rosbag2 bag folder (or a single ``.db3``/``.mcap`` file).
        out_path: the new bag folder; must not exist.
        topic: the image topic (``sensor_msgs/msg/Image`` or ``sensor_msgs/msg/CompressedImage``).
        loaded: the model (:func:`~mpvss_ros.model_loader.load_model`).
        options: :class:`BagOptions` (or other :class:`~mpvss_ros.offline.EngineOptions`, e.g.
            :class:`~mpvss_ros.offline.SegmentOptions`, with the bag's defaults for the rest);
            None = defaults.
        compressed: True = the topic must be CompressedImage, False = Image, None = detect.
        namespace: prefix of the output topics.
        storage: ``sqlite3`` or ``mcap``; None = as the input bag.
        backend: an inference backend (:func:`mpvss_ros.runtime.load_backend`, e.g. onnxruntime or
            TensorRT) to run instead of ``loaded.model``; None = the PyTorch model.

    Returns:
        Summary: ``frames`` (input messages read), ``written`` (segmented and written),
        ``skipped`` and ``skipped_by_reason``, ``skip_examples``, ``key_frames``,
        ``key_frame_reasons``, ``median_total_ms`` (key / non-key frames), per-stage
        ``stage_latency_ms``, ``copied_topics``, ``messages_per_topic``, ``wall_time_s``, ``setup_s`` (one-off export
        or engine builds of a fixed-shape backend), ``fps`` (written frames per second of wall
        time less ``setup_s``) and run settings.

    Raises:
        FileNotFoundError: ``in_path`` missing or not a bag. FileExistsError: ``out_path``
        exists. ValueError: topic missing, without messages or not an image topic (the message
        lists the image topics present), a damaged bag, bad namespace, storage, schedule or
        propagator. RuntimeError: the backend failed on :data:`~mpvss_ros.offline.MAX_ENGINE_FAILURES_IN_A_ROW`
        messages in a row. SystemExit(143): SIGTERM (main thread). A run that raises (or is
        interrupted) removes the ``out_path`` it created.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    options = options if options is not None else BagOptions()
    options.check()  # again: the fields may have changed since the options were made
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.exists():
        raise FileNotFoundError(f"input bag not found: {in_path}")
    if out_path.exists():
        raise FileExistsError(f"output bag {out_path} exists already; choose a new path (bags are never overwritten)")
    in_storage, in_version = _bag_storage_and_version(in_path)
    storage = storage or in_storage
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; use one of {', '.join(STORAGES)}")
    topics = output_topics(namespace)
    max_frames = _opt(options, "max_frames")
    want = {"colored": bool(_opt(options, "colored")), "overlay": bool(_opt(options, "overlay")),
            "class_masks": bool(_opt(options, "class_masks")), "autoware_mask": bool(_opt(options, "autoware_mask"))}
    max_pixels = _opt(options, "max_image_pixels")
    alpha = float(_opt(options, "alpha"))

    cfg = loaded.config
    # max_gap_s between the stamps of the messages read, as the node measures it (StampGaps), not
    # between the frames segmented: a skipped message made the next one a time_gap key frame
    segmenter = dataclasses.replace(options, max_gap_s=math.inf).build_segmenter(loaded, backend)
    gaps = StampGaps()
    palette = make_palette(cfg.num_classes, cfg.palette or None)
    class_names = list(cfg.class_names) if len(cfg.class_names) == cfg.num_classes else default_class_names(cfg.num_classes)
    try:
        autoware_ids = autoware_class_ids(class_names, _opt(options, "autoware_class_ids")) if want["autoware_mask"] else None
    except ValueError as exc:
        raise ValueError(f"autoware_class_ids (--autoware-class-ids): {exc}") from None

    typestore = get_typestore(Stores.ROS2_HUMBLE)
    types = rosbags_message_types(typestore)

    skipped: dict[str, int] = {}
    skip_examples: list[dict[str, Any]] = []
    run_stats = RunStats(cfg.num_classes)  # the summary's figures of the written frames
    frames = 0
    t_start = time.perf_counter()

    def skip(reason: str, index: int, stamp_ns: int, exc: BaseException) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        level = logging.WARNING if skipped[reason] <= _WARN_PER_REASON else logging.DEBUG
        log.log(level, "skipping message %d at %d ns on %s (%s): %s", index, stamp_ns, in_topic, reason, exc)
        if len(skip_examples) < _MAX_SKIP_EXAMPLES:
            skip_examples.append({"index": index, "timestamp_ns": stamp_ns, "reason": reason, "error": str(exc)})

    with _open_reader(in_path) as reader:
        chosen, msgtype = _select_topic(list(reader.connections), topic, compressed, in_path)
        in_topic = chosen[0].topic
        if in_topic in topics.values():
            raise ValueError(f"input topic {in_topic} would be overwritten by an output; use another --namespace")
        is_compressed = msgtype == COMPRESSED_TYPE
        decode = compressed_to_rgb if is_compressed else image_to_rgb
        counted = [getattr(c, "msgcount", None) for c in chosen]
        if all(isinstance(n, int) for n in counted) and sum(counted) == 0:
            raise ValueError(f"topic {in_topic} of bag {in_path} has no messages")
        total = sum(int(n or 0) for n in counted) or None
        if max_frames is not None and total is not None:
            total = min(total, max_frames)
        copied = _copied_connections(list(reader.connections), in_topic, _opt(options, "copy_topics"),
                                     bool(_opt(options, "copy_all_topics")), topics, in_path)

        writer = Writer(out_path, version=9 if in_version >= 9 else 8,
                        storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
        # a run that fails or is interrupted leaves no output: the writer's partial folder (no
        # metadata.yaml, not a readable bag) would only block the next run's output path. Armed
        # once the writer has made the folder, so nothing it did not create is removed.
        with terminate_unwinds(), _written_or_removed(writer, out_path):
            output = _OutputBag(writer, typestore, chosen, copied, topics, want, in_path)
            key_stamp = None  # the last info message's key_frame_stamp
            failures = EngineFailures("messages")
            bar = tqdm(total=total, unit="frame", desc="mpvss bag", disable=not _opt(options, "progress"))
            copies_read: dict[str, int] = {}
            try:
                for conn, stamp_ns, raw in _read_messages(reader, chosen + copied, in_path):
                    if output.copy(conn, stamp_ns, raw):
                        copies_read[conn.topic] = copies_read.get(conn.topic, 0) + 1
                        continue
                    if max_frames is not None and frames >= max_frames:
                        break  # at the first image past the last frame: the copied topics end there too
                    index = frames
                    frames += 1
                    bar.update(1)
                    output.copy_input(conn, stamp_ns, raw)
                    try:
                        msg = typestore.deserialize_cdr(raw, msgtype)
                    except Exception as exc:  # noqa: BLE001 - any malformed CDR payload
                        skip("deserialize", index, stamp_ns, exc)
                        continue
                    try:
                        stamp = stamp_to_seconds(msg.header.stamp)
                        gaps.note(stamp, options.max_gap_s)
                        rgb = decode(msg, max_pixels)
                        if gaps.take(stamp):  # consumed by this frame, segmented or not, as in the node
                            segmenter.reset("time_gap")
                        result = segmenter.push(rgb, stamp, source=msg.header.frame_id)
                    except ConversionError as exc:
                        skip("conversion", index, stamp_ns, exc)
                        continue
                    except FrameError as exc:
                        skip("frame", index, stamp_ns, exc)
                        continue
                    except NonFiniteOutputError as exc:
                        skip("non_finite", index, stamp_ns, exc)
                        continue
                    except Exception as exc:  # noqa: BLE001 - the backend's own errors, skipped as by the node's core
                        failures.failed(exc, f"message {index}")
                        skip("engine", index, stamp_ns, exc)  # the segmenter has reset: the next frame is a key frame
                        continue
                    failures.succeeded()
                    header = msg.header
                    if result.is_key_frame:  # as the node: with each key frame (the first frame is one)
                        output.put("label_info", stamp_ns,
                                   make_label_info(types.label_info, types.vision_class, header, class_names))
                    out = build_outputs(types, header, result, rgb, palette, class_names, alpha=alpha,
                                        want_colored=want["colored"], want_overlay=want["overlay"],
                                        want_class_masks=want["class_masks"], previous_key_frame_stamp=key_stamp,
                                        autoware_class_ids=autoware_ids)
                    key_stamp = out.info.key_frame_stamp
                    output.put_frame(stamp_ns, out)
                    run_stats.add(result.to_record(), result.labels)
                    if skipped:
                        bar.set_postfix(skipped=sum(skipped.values()), refresh=False)
                else:  # every message read (no --max-frames stop): as many as the bag declares?
                    _check_message_count(frames, counted, in_topic, in_path)
                    for name in sorted({c.topic for c in copied}):  # a copied topic emptied: data lost too
                        _check_message_count(copies_read.get(name, 0),
                                             [getattr(c, "msgcount", None) for c in copied if c.topic == name],
                                             name, in_path, required=False)
            finally:
                bar.close()
    wall = time.perf_counter() - t_start

    stats = run_stats.summary()  # no frame written: zero counts, no timings, None medians
    total = stats["stage_latency_ms"].get("total")
    return {
        "input": str(in_path),
        "output": str(out_path),
        "topic": in_topic,
        "msgtype": msgtype,
        "storage": storage,
        "namespace": normalize_namespace(namespace),
        **_run_settings(options, loaded, segmenter),
        "frames": frames,
        "written": len(run_stats),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "skip_examples": skip_examples,
        "key_frames": stats["key_frames"],
        "key_frame_ratio": stats["key_frame_ratio"],
        "key_frame_reasons": stats["key_frame_reasons"],
        "median_total_ms": {"all": total["median"] if total else None,
                            "key": stats["median_total_ms_key_frame"], "non_key": stats["median_total_ms_non_key_frame"]},
        "stage_latency_ms": stats["stage_latency_ms"],
        "class_pixel_share": stats["class_pixel_share"],
        "copied_topics": sorted({c.topic for c in copied}),
        "messages_per_topic": dict(sorted(output.counts.items())),
        "wall_time_s": wall,
        # as mpvss segment: the one-off export / engine build for a new size is not frame time
        "setup_s": segmenter.setup_s,
        "fps": len(run_stats) / (wall - segmenter.setup_s) if wall > segmenter.setup_s else None,
    }
