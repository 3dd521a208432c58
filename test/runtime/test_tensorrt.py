"""TensorRT and CUDA backends.

The engine-cache key and the missing-backend errors are tested everywhere; building and running
engines, and the CUDA torch / onnxruntime paths, need the tensorrt package and a CUDA GPU and
skip cleanly without them.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from mpvss_ros.cli import main
from mpvss_ros.runtime import BackendUnavailable, backend_missing, load_backend
from mpvss_ros.runtime.tensorrt_backend import FP32_LAYER_PATTERNS, engine_cache_key, tensorrt_missing

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TRT_MISSING = tensorrt_missing()
needs_trt = pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT unavailable: {TRT_MISSING}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU for torch")

BASE = dict(onnx_sha256="a" * 64, tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3",
            compute_capability=(9, 0), precision="fp32", input_shapes={"image": [1, 3, 384, 480]},
            options={"workspace_mb": 2048, "fp32_layer_patterns": []})


# ------------------------------------------------------------------------------ cache key (pure)


def test_engine_cache_key_is_stable():
    assert engine_cache_key(**BASE) == engine_cache_key(**BASE)
    assert len(engine_cache_key(**BASE)) == 64
    assert engine_cache_key(**{**BASE, "compute_capability": "9.0"}) == engine_cache_key(**BASE)
    shapes = {"b": [1, 2], "a": [3]}
    assert engine_cache_key(**{**BASE, "input_shapes": shapes}) == \
        engine_cache_key(**{**BASE, "input_shapes": dict(reversed(list(shapes.items())))})


@pytest.mark.parametrize("field, value", [
    ("onnx_sha256", "b" * 64),
    ("tensorrt_version", "10.4.0"),
    ("gpu_name", "NVIDIA GeForce RTX 4090"),
    ("compute_capability", (8, 9)),
    ("precision", "fp16"),
    ("input_shapes", {"image": [1, 3, 512, 1024]}),
    ("options", {"workspace_mb": 1024, "fp32_layer_patterns": []}),
    ("options", {"workspace_mb": 2048, "fp32_layer_patterns": list(FP32_LAYER_PATTERNS["key_frame"])}),
])
def test_engine_cache_key_changes_with_each_component(field, value):
    assert engine_cache_key(**{**BASE, field: value}) != engine_cache_key(**BASE)


def test_fp32_patterns_match_exported_node_names():
    import re

    key = [re.compile(p) for p in FP32_LAYER_PATTERNS["key_frame"]]
    non_key = [re.compile(p) for p in FP32_LAYER_PATTERNS["non_key_frame"]]
    assert any(r.search("/pixel_decoder/transformer/encoder/layers.0/self_attn/GridSample") for r in key)
    assert not any(r.search("/backbone/res2/Conv") for r in key)
    assert any(r.search("/GridSample") for r in non_key)
    assert not any(r.search("/motion/decoder/Conv") for r in non_key)


# ------------------------------------------------------------------------------ missing TensorRT


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is available here")
def test_missing_tensorrt_one_clear_line(lite):
    msg = backend_missing("tensorrt")
    assert msg == TRT_MISSING and "\n" not in msg
    assert msg.startswith("tensorrt backend needs the tensorrt Python package")
    assert msg.endswith("use the onnxruntime or torch backend")
    with pytest.raises(BackendUnavailable) as info:
        load_backend("tensorrt", lite)
    assert str(info.value) == msg


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is available here")
@pytest.mark.parametrize("argv", [
    ["segment", "IMAGES", "--out", "OUT", "--backend", "tensorrt"],
    ["eval", "IMAGES", "--labels", "IMAGES", "--backend", "tensorrt", "--precision", "fp16"],
    ["build-engine", "--height", "96", "--width", "128"],
])
def test_cli_tensorrt_missing_exits_2(tmp_path, capsys, argv):
    import cv2

    images = tmp_path / "img"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((40, 50, 3), np.uint8))
    argv = [str(images) if a == "IMAGES" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("mpvss: WARNING")]
    assert len(err) == 1, err
    assert err[0] == f"mpvss: error: {TRT_MISSING}"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_cuda_backends_missing_exit_2(tmp_path, capsys):
    import cv2

    images = tmp_path / "img"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((40, 50, 3), np.uint8))
    assert main(["segment", str(images), "--out", str(tmp_path / "o"), "--precision", "fp16"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


# ------------------------------------------------------------------------------ with a GPU


@needs_trt
@pytest.mark.parametrize("precision, atol, agreement", [("fp32", 1e-2, 0.999), ("fp16", 0.25, 0.98)])
def test_tensorrt_backend_matches_torch(lite, tmp_path, precision, atol, agreement):
    from mpvss_ros.runtime.tensorrt_backend import TensorRTBackend

    backend = load_backend("tensorrt", lite, device="cuda", precision=precision, input_hw=(96, 128), cache_dir=tmp_path)
    assert isinstance(backend, TensorRTBackend)
    try:
        rng = np.random.default_rng(0)
        imgs = [torch.from_numpy(rng.integers(0, 256, (1, 3, 96, 128)).astype(np.float32)) for _ in range(2)]
        with torch.no_grad():
            k_ref = lite.model.cpu().segment_key_frame(imgs[0], (96, 128))
            w_ref = lite.model.propagate(k_ref, imgs[1])
        k = backend.segment_key_frame(imgs[0], (96, 128))
        w = backend.propagate(k, imgs[1])
        w_again = backend.propagate(k, imgs[1])  # key inputs kept on the GPU
        assert torch.equal(w, w_again)
        assert (k.mask_logits - k_ref.mask_logits).abs().max() <= atol
        assert (w - w_ref).abs().max() <= atol
        assert (w.argmax(1) == w_ref.argmax(1)).float().mean() >= agreement
        # a link of a chained flow: flows into another frame than the key frame, then the key frame again
        with torch.no_grad():
            f_ref = lite.model.query_flows(k_ref, imgs[0], imgs[1])
        f = backend.query_flows(k, imgs[0], imgs[1])
        assert f.shape == f_ref.shape and (f - f_ref).abs().max() <= atol
        assert torch.equal(backend.propagate(k, imgs[1]), w)  # key_image holds the key frame again
        k_other = lite.model.segment_key_frame(imgs[1], (96, 128))  # a key state not made by the engine
        w_other = backend.propagate(k_other, imgs[0])
        assert (w_other - lite.model.propagate(k_other, imgs[0])).abs().max() <= atol
    finally:
        backend.close()


@needs_trt
def test_engine_cache_reused(lite, tmp_path):
    from mpvss_ros.runtime.export import GraphSource
    from mpvss_ros.runtime.tensorrt_backend import build_engines

    source = GraphSource.from_model(lite.model, tmp_path)
    messages = []
    first = build_engines(source, (64, 64), "fp32", tmp_path, progress=messages.append)
    assert len(messages) == 4  # two "building" + two "built"
    side_car = first["key_frame"].with_suffix(".json")
    built = side_car.stat().st_mtime_ns  # written by a build only
    used = first["key_frame"].stat().st_mtime_ns
    time.sleep(0.01)
    again = build_engines(source, (64, 64), "fp32", tmp_path, progress=messages.append)
    assert again == first and len(messages) == 4
    assert side_car.stat().st_mtime_ns == built  # not rebuilt
    assert first["key_frame"].stat().st_mtime_ns > used  # marked used (runtime.cache)
    fp16 = build_engines(source, (64, 64), "fp16", tmp_path, progress=messages.append)
    assert fp16["key_frame"] != first["key_frame"]


@needs_cuda
def test_torch_cuda_fp16_close_to_fp32(lite):
    import copy

    from mpvss_ros.runtime.torch_backend import TorchBackend

    model = copy.deepcopy(lite.model)
    fp32 = TorchBackend(model, "cuda")
    fp16 = TorchBackend(model, "cuda", "fp16")
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 96, 128)).astype(np.float32)).cuda()
    with torch.no_grad():
        a, b = fp32.segment_key_frame(img, (96, 128)), fp16.segment_key_frame(img, (96, 128))
        assert b.mask_logits.dtype == torch.float32
        assert (a.mask_logits.argmax(1) == b.mask_logits.argmax(1)).float().mean() >= 0.98
        wa, wb = fp32.propagate(a, img), fp16.propagate(a, img)
        assert (wa - wb).abs().max() <= 0.25


@needs_cuda
def test_onnxruntime_cuda_provider(lite, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime without CUDAExecutionProvider (install onnxruntime-gpu)")
    backend = load_backend("onnxruntime", lite, device="cuda", input_hw=(64, 64), cache_dir=tmp_path)
    img = torch.full((1, 3, 64, 64), 100.0)
    with torch.no_grad():
        ref = lite.model.cpu().segment_key_frame(img, (64, 64))
    got = backend.segment_key_frame(img, (64, 64))
    assert (got.mask_logits - ref.mask_logits).abs().max() <= 1e-2
    # the warp runs in the graph on CUDA; chained flow's links come from a second, flows-only session
    other = torch.full((1, 3, 64, 64), 140.0)
    with torch.no_grad():
        f_ref = lite.model.query_flows(ref, other, img)
    assert (backend.query_flows(got, other, img) - f_ref).abs().max() <= 1e-2


# ------------------------------------------ builder and key-state logic with a stand-in TensorRT
# No TensorRT here: these check what the backend asks of TensorRT (flags, parser settings) and
# when it re-uploads a key frame, against a recording stand-in whose names are those of the
# TensorRT 8.6 / 10 Python API.


class _Recorder:
    def __init__(self, log, name):
        self._log, self._name = log, name

    def __getattr__(self, attr):
        def call(*args):
            self._log.append((self._name, attr, args))
            return True
        return call


def _fake_tensorrt(log, version="8.6.1"):
    import types

    class Network(_Recorder):
        num_layers = 0

    class Builder(_Recorder):
        platform_has_fast_fp16 = True

        def __init__(self, logger):
            super().__init__(log, "builder")

        def create_network(self, flags):
            log.append(("builder", "create_network", (flags,)))
            return Network(log, "network")

        def create_builder_config(self):
            return _Recorder(log, "config")

        def build_serialized_network(self, network, config):
            return b"engine"

    class Parser(_Recorder):
        num_errors = 0

        def __init__(self, network, logger):
            super().__init__(log, "parser")

        def parse_from_file(self, path):
            log.append(("parser", "parse_from_file", (path,)))
            return True

    class Logger:
        WARNING = 2

        def __init__(self, level):
            log.append(("trt", "Logger", (level,)))

    enum = types.SimpleNamespace
    return types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser,
        init_libnvinfer_plugins=lambda logger, ns: log.append(("trt", "init_libnvinfer_plugins", (ns,))),
        NetworkDefinitionCreationFlag=enum(EXPLICIT_BATCH=0), OnnxParserFlag=enum(NATIVE_INSTANCENORM=0),
        BuilderFlag=enum(FP16="FP16", TF32="TF32", OBEY_PRECISION_CONSTRAINTS="OBEY"),
        MemoryPoolType=enum(WORKSPACE="WORKSPACE"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_engine_settings(monkeypatch, precision):
    import mpvss_ros.runtime.tensorrt_backend as trt_backend

    log = []
    monkeypatch.setattr(trt_backend, "_trt", lambda: _fake_tensorrt(log))
    monkeypatch.setattr(trt_backend, "_TRT_LOGGER", None)
    assert trt_backend.build_engine("graph.onnx", precision, workspace_mb=64) == b"engine"
    calls = [(who, what, args) for who, what, args in log]
    # InstanceNormalization as a native layer: the 8.6 plugin would not deserialize in a new process
    assert ("parser", "set_flag", (0,)) in calls
    assert ("trt", "init_libnvinfer_plugins", ("",)) in calls  # and the plugins registered anyway
    assert ("config", "set_memory_pool_limit", ("WORKSPACE", 64 << 20)) in calls
    assert ("builder", "create_network", (1,)) in calls  # explicit batch on TensorRT 8
    if precision == "fp32":
        assert ("config", "clear_flag", ("TF32",)) in calls and ("config", "set_flag", ("FP16",)) not in calls
    else:
        assert ("config", "set_flag", ("FP16",)) in calls and ("config", "clear_flag", ("TF32",)) not in calls
    trt_backend.build_engine("graph.onnx", precision)
    assert sum(1 for c in calls if c[1] == "Logger") == 1  # one logger for the process
    with pytest.raises(ValueError, match="fp32 or fp16"):
        trt_backend.build_engine("graph.onnx", "bf16")


def _stand_in_backend(result, uploads=None, downloads=None, refused=()):
    """A TensorRTBackend over one stand-in non-key engine and CUDA calls (no GPU): ``result(name)``
    gives the engine's outputs; uploads and downloads are recorded in the lists given; an upload
    of a name in ``refused`` (a container the caller may change) raises ValueError, as a tensor of
    the wrong shape does."""
    import contextlib

    import mpvss_ros.runtime.tensorrt_backend as trt_backend

    class Engine:
        host = {"warped_mask_logits": None, "flows": None}

        def upload(self, name, value):
            if name in refused:
                raise ValueError(f"{name}: refused")
            if uploads is not None:
                uploads.append(name)

        def execute(self):
            pass

        def download(self, name):
            if downloads is not None:
                downloads.append(name)

        def result(self, name):
            return result(name)

    backend = trt_backend.TensorRTBackend.__new__(trt_backend.TensorRTBackend)
    backend.cuda = type("Cuda", (), {"activate": lambda self: contextlib.nullcontext(self),
                                     "synchronize": lambda self: None, "close": lambda self: None})()
    engine = Engine()
    backend._get = lambda hw: (None, engine, (32, 32))
    return backend


def test_key_state_is_uploaded_once_per_key_frame(monkeypatch, lite):
    # The segmenter hands the backend a copy of the key state (with_active_queries): the key
    # tensors already on the GPU must not be uploaded again for every non-key frame.
    from mpvss_ros.nn.mpvss import KeyFrameState

    uploads = []
    backend = _stand_in_backend(lambda name: torch.zeros(1, 4, 2, 3, 4), uploads=uploads)
    image = torch.zeros(1, 3, 32, 32)
    key = KeyFrameState(image=image, valid_hw=(32, 32), class_logits=torch.zeros(1, 4, 3),
                        mask_logits=torch.zeros(1, 4, 8, 8), query_embeddings=torch.zeros(4, 1, 8))
    backend._device_key, backend._device_reference = key, image  # as segment_key_frame leaves them
    active = key.with_active_queries(0.0)
    assert active is not key
    for _ in range(3):
        backend.propagate(active, torch.ones(1, 3, 32, 32))
    assert uploads == ["image"] * 3
    other = KeyFrameState(image=image, valid_hw=(32, 32), class_logits=torch.ones(1, 4, 3),
                          mask_logits=torch.zeros(1, 4, 8, 8), query_embeddings=torch.zeros(4, 1, 8))
    backend.propagate(other, torch.ones(1, 3, 32, 32))
    assert uploads[3:] == ["key_class_logits", "key_mask_logits", "key_query_embeddings", "key_image", "image"]


def test_a_key_state_upload_that_fails_part_way_holds_no_key_frame():
    """The engine held key_class_logits of one key frame and the rest of another while the
    backend still named the old one, whose next propagation then ran on them without an error."""
    from mpvss_ros.nn.mpvss import KeyFrameState

    uploads, refused = [], set()
    backend = _stand_in_backend(lambda name: torch.zeros(1, 4, 2, 3, 4), uploads=uploads, refused=refused)
    image = torch.zeros(1, 3, 32, 32)
    a, b = (KeyFrameState(image=image, valid_hw=(32, 32), class_logits=torch.full((1, 4, 3), float(v)),
                          mask_logits=torch.zeros(1, 4, 8, 8), query_embeddings=torch.zeros(4, 1, 8)) for v in (1, 2))
    backend._device_key, backend._device_reference = a, image
    refused.add("key_mask_logits")
    with pytest.raises(ValueError, match="refused"):
        backend.propagate(b, image)
    assert uploads == ["key_class_logits"]  # b's, now in the engine
    refused.clear()
    backend.propagate(a, image)
    assert uploads[1:] == ["key_class_logits", "key_mask_logits", "key_query_embeddings", "key_image", "image"]
    refused.add("key_image")  # the reference image too: a chain's previous frame that fails to upload
    with pytest.raises(ValueError, match="refused"):
        backend.query_flows(a, image, reference=torch.ones(1, 3, 32, 32))
    refused.clear()
    del uploads[:]
    backend.propagate(a, image)
    assert uploads == ["key_image", "image"]


def test_a_size_dropped_from_the_engine_cache_frees_its_buffers(tmp_path, monkeypatch):
    """No GPU needed: stand-ins for TensorRT and the CUDA calls. A stream through more input sizes
    than the backend keeps frees the dropped sizes' engines and every I/O buffer they allocated,
    and forgets which key frame the dropped non-key engine held."""
    import types

    import mpvss_ros.runtime.tensorrt_backend as tb
    from mpvss_ros.runtime.base import MAX_PREPARED_SIZES, SizeCache

    class FakeCuda:
        def __init__(self):
            self.device, self.host, self.freed, self.next = set(), set(), 0, 0

        def malloc(self, nbytes):
            self.next += 1
            self.device.add(self.next)
            return self.next

        def pinned(self, shape, dtype):
            arr = np.zeros(shape, dtype)
            self.host.add(id(arr))
            return arr

        def free(self, device_ptr, host):
            self.device.remove(device_ptr)
            self.host.remove(id(host))
            self.freed += 1

        def activate(self):
            return _Nullcontext()

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("image", "mask_logits")[i]

        def get_tensor_shape(self, name):
            return (1, 3, 8, 8)

        def get_tensor_dtype(self, name):
            return "float"

        def get_tensor_mode(self, name):
            return "in" if name == "image" else "out"

        def create_execution_context(self):
            return types.SimpleNamespace(set_tensor_address=lambda name, ptr: True)

    trt = types.SimpleNamespace(Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda b: Engine()),
                                nptype=lambda d: np.float32, TensorIOMode=types.SimpleNamespace(INPUT="in"))
    monkeypatch.setattr(tb, "_trt_logger", lambda trt: None)
    path = tmp_path / "x.engine"
    path.write_bytes(b"x")
    cuda = FakeCuda()
    backend = object.__new__(tb.TensorRTBackend)
    backend._trt, backend.cuda, backend._device_key, backend._device_reference = trt, cuda, None, None
    backend._engines = SizeCache(on_evict=backend._release)
    backend._load = lambda hw: (tb._Engine(trt, path, cuda), tb._Engine(trt, path, cuda), hw)
    sizes = [(64, 64 + 32 * i) for i in range(MAX_PREPARED_SIZES + 1)]
    for _ in range(3):
        for hw in sizes:
            backend._get(hw)
            backend._device_key = object()  # as if this size's non-key engine held a key frame
    kept = MAX_PREPARED_SIZES * 2 * 2  # sizes x engines x tensors
    assert len(backend._engines) == MAX_PREPARED_SIZES
    assert len(cuda.device) == kept and len(cuda.host) == kept
    assert cuda.freed == (3 * len(sizes) - MAX_PREPARED_SIZES) * 2 * 2
    backend._get(sizes[0])  # dropped in the last round: loaded again, the held key forgotten
    assert backend._device_key is None


class _Nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("bad", [False, True])
def test_a_non_finite_flow_gives_non_finite_warped_masks_from_the_engine(bad):
    """The engine warps inside (GridSample clamps NaN sampling positions to the border): its flows
    are downloaded with the warped masks and a non-finite one makes them NaN. No GPU needed."""
    from mpvss_ros.nn.mpvss import KeyFrameState

    flows = torch.zeros(1, 4, 2, 3, 4)
    if bad:
        flows[0, 2, 1, 1, 1] = float("inf")
    downloads = []
    backend = _stand_in_backend(lambda name: flows if name == "flows" else torch.ones(1, 4, 8, 8), downloads=downloads)
    image = torch.zeros(1, 3, 32, 32)
    key = KeyFrameState(image=image, valid_hw=(32, 32), class_logits=torch.zeros(1, 4, 3),
                        mask_logits=torch.zeros(1, 4, 8, 8), query_embeddings=torch.zeros(4, 1, 8))
    backend._device_key, backend._device_reference = key, image
    warped = backend.propagate(key, torch.ones(1, 3, 32, 32))
    assert downloads == ["warped_mask_logits", "flows"]
    assert bool(torch.isnan(warped).all()) is bad and (bad or bool((warped == 1).all()))


def test_a_non_finite_flow_of_an_inactive_query_is_not_checked():
    """The torch warp sees the active queries' flows only: an inactive query's inf flow (an fp16
    overflow in its flow head) made every propagated frame NaN on TensorRT and onnxruntime-CUDA."""
    from mpvss_ros.nn.mpvss import KeyFrameState

    flows = torch.zeros(1, 4, 2, 3, 4)
    flows[0, 3, 0, 0, 0] = float("inf")
    backend = _stand_in_backend(lambda name: flows if name == "flows" else torch.ones(1, 4, 8, 8))
    image = torch.zeros(1, 3, 32, 32)
    key = KeyFrameState(image=image, valid_hw=(32, 32), class_logits=torch.zeros(1, 4, 3),
                        mask_logits=torch.zeros(1, 4, 8, 8), query_embeddings=torch.zeros(4, 1, 8),
                        active=torch.tensor([0, 1, 2]))
    backend._device_key, backend._device_reference = key, image
    warped = backend.propagate(key, torch.ones(1, 3, 32, 32))
    assert warped.shape == (1, 3, 8, 8) and bool((warped == 1).all())
    backend._device_key = key = dataclasses.replace(key, active=torch.tensor([1, 3]))
    assert bool(torch.isnan(backend.propagate(key, torch.ones(1, 3, 32, 32))).all())


def _stand_in_engine_for(monkeypatch, version: str = "10.3.0"):
    """``(tensorrt_backend, built)``: ``engine_for`` with a stand-in TensorRT of ``version``, GPU and
    builder (no GPU needed); ``built`` lists the graphs built, the n-th engine is b"serialized engine n"."""
    import contextlib
    import types

    import mpvss_ros.runtime.tensorrt_backend as tb

    built = []

    def build(onnx_path, precision, workspace_mb, patterns):
        built.append(onnx_path)
        return b"serialized engine %d" % len(built)

    monkeypatch.setattr(tb, "_trt", lambda: types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(tb, "_device_identity", lambda index: ("Stand-in GPU", (9, 0)))
    monkeypatch.setattr(tb, "_OnDevice", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(tb, "build_engine", build)
    return tb, built


def test_a_damaged_cached_engine_is_built_again(tmp_path, monkeypatch):
    """No GPU needed: a stand-in TensorRT and builder. An engine file cut short (power lost before
    the write reached the disk, a full disk) was returned as is, and every later start failed to
    deserialize it ('delete it to rebuild'); the ONNX cache re-exports such an entry itself."""
    tb, built = _stand_in_engine_for(monkeypatch)
    graph = tmp_path / "key_frame.onnx"
    graph.write_bytes(b"graph")
    args = (graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache")
    path = tb.engine_for(*args, progress=lambda m: None)
    assert path.read_bytes() == b"serialized engine 1" and len(built) == 1
    assert tb.engine_for(*args, progress=lambda m: None) == path and len(built) == 1  # reused
    path.write_bytes(b"serialized en")  # cut short
    assert tb.engine_for(*args, progress=lambda m: None) == path
    assert len(built) == 2 and path.read_bytes() == b"serialized engine 2"
    path.write_bytes(b"")  # empty
    tb.engine_for(*args, progress=lambda m: None)
    assert len(built) == 3 and path.read_bytes() == b"serialized engine 3"


def test_an_engine_is_not_reused_for_other_input_shapes_or_another_tensorrt(tmp_path, monkeypatch):
    """No GPU needed. The engine's cache key holds the input shapes and TensorRT's version: an
    engine built for one size (or by another TensorRT) is never handed out for another."""
    tb, built = _stand_in_engine_for(monkeypatch)
    graph = tmp_path / "key_frame.onnx"
    graph.write_bytes(b"graph")
    first = tb.engine_for(graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache", progress=lambda m: None)
    other_size = tb.engine_for(graph, {"image": [1, 3, 64, 32]}, "key_frame", "fp32", tmp_path / "cache",
                               progress=lambda m: None)
    assert other_size != first and len(built) == 2
    tb, built = _stand_in_engine_for(monkeypatch, version="10.4.0")
    upgraded = tb.engine_for(graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache",
                             progress=lambda m: None)
    assert upgraded not in (first, other_size) and len(built) == 1


def test_an_engine_is_not_reused_for_a_graph_rewritten_in_place(tmp_path, monkeypatch):
    """An export folder written again at the same path (new weights) holds other graphs: the
    key is the graph's bytes (sha256), not its path."""
    tb, built = _stand_in_engine_for(monkeypatch)
    graph = tmp_path / "key_frame.onnx"
    graph.write_bytes(b"graph of the old weights")
    args = (graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache")
    old = tb.engine_for(*args, progress=lambda m: None)
    graph.write_bytes(b"graph of the new weights")
    new = tb.engine_for(*args, progress=lambda m: None)
    assert new != old and len(built) == 2


def test_fp16_on_a_tensorrt_without_the_fp16_builder_flag_is_unavailable(monkeypatch):
    """TensorRT 11 removed BuilderFlag.FP16 (weak typing; NVIDIA/TensorRT v11.0 python/src/infer/
    pyCore.cpp lists no FP16 among the builder flags). fp16 was reported available, then the build
    raised a RuntimeError, which 'mpvss bench' (default specs include tensorrt:fp16) re-raises."""
    import sys
    import types

    import mpvss_ros.runtime.tensorrt_backend as tb
    from mpvss_ros.runtime.bench import BackendSpec, default_backend_specs

    fake = types.SimpleNamespace(__version__="11.0.0", BuilderFlag=types.SimpleNamespace(TF32="TF32"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tb, "_import_cudart", lambda: object())
    monkeypatch.setattr(tb, "_gpu_present", lambda: True)
    assert backend_missing("tensorrt", "cuda", "fp32") is None
    assert "FP16 builder flag" in (backend_missing("tensorrt", "cuda", "fp16") or "")
    assert BackendSpec("tensorrt", "cuda", "fp16") not in default_backend_specs()
