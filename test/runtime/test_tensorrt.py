"""TensorRT and CUDA backends.

The engine-cache key, the missing-backend errors, and the backend's own logic over stand-ins for
cuda-python, pycuda and TensorRT (CUDA calls, the builder's settings, the engine cache, engine
buffers, key-state bookkeeping) are tested everywhere; building and running real engines, and the
CUDA torch / onnxruntime paths, need the tensorrt package and a CUDA GPU and skip cleanly without
them.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import mpvss_ros.runtime.tensorrt_backend as tb
from mpvss_ros import paths
from mpvss_ros.cli import main
from mpvss_ros.nn.mpvss import KeyFrameState
from mpvss_ros.runtime import BackendUnavailable, backend_missing, load_backend
from mpvss_ros.runtime.base import MAX_PREPARED_SIZES, SizeCache
from mpvss_ros.runtime.bench import BackendSpec, default_backend_specs
from mpvss_ros.runtime.cache import _TEMP_PREFIXES, ENGINE_TEMP_PREFIX
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


# ------------------------------------------------ CUDA calls with a stand-in cuda-python and pycuda
# No GPU here: _CudaApi over cuda-python's runtime API with simulated device memory (copies move
# real bytes), and over pycuda's driver API with its context stack.


class _FakeCudart:
    """cuda-python's runtime API (``cuda.bindings.runtime``) over simulated device memory: a
    bytearray per device pointer. Every call is appended to ``calls``; ``fail_malloc`` makes
    cudaMalloc fail, ``dtod_left`` (when not None) is how many device-to-device copies succeed
    before one fails."""

    class cudaError_t:  # noqa: N801
        cudaSuccess = 0

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = "HtoD"
        cudaMemcpyDeviceToHost = "DtoH"
        cudaMemcpyDeviceToDevice = "DtoD"

    ERRORS = {1: b"invalid argument", 2: b"out of memory"}

    def __init__(self, count=1, major=8, minor=6, name=b"Fake GPU\x00\x00garbage"):
        self.count, self.major, self.minor, self.name = count, major, minor, name
        self.calls, self.device, self.hosts, self.next = [], {}, {}, 0x10000
        self.fail_malloc, self.dtod_left = False, None

    def cudaGetDeviceCount(self):  # noqa: N802
        return (0, self.count)

    def cudaSetDevice(self, index):  # noqa: N802
        self.calls.append(("cudaSetDevice", index))
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        return (0, 77)

    def cudaGetDeviceProperties(self, index):  # noqa: N802
        return (0, types.SimpleNamespace(name=self.name, major=self.major, minor=self.minor))

    def cudaGetErrorString(self, err):  # noqa: N802
        return (0, self.ERRORS[err])

    def cudaMalloc(self, nbytes):  # noqa: N802
        if self.fail_malloc:
            return (2, None)
        self.next += 0x1000
        self.device[self.next] = bytearray(nbytes)
        self.calls.append(("cudaMalloc", nbytes))
        return (0, self.next)

    def cudaMallocHost(self, nbytes):  # noqa: N802
        buf = ctypes.create_string_buffer(nbytes)
        self.hosts[ctypes.addressof(buf)] = buf
        return (0, ctypes.addressof(buf))

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        self.calls.append(("cudaMemcpyAsync", kind, nbytes, stream))
        if kind == "HtoD":
            if dst not in self.device or nbytes > len(self.device[dst]):
                return (1,)
            self.device[dst][:nbytes] = ctypes.string_at(src, nbytes)
        elif kind == "DtoH":
            if src not in self.device or nbytes > len(self.device[src]):
                return (1,)
            ctypes.memmove(dst, bytes(self.device[src][:nbytes]), nbytes)
        else:
            if src not in self.device or dst not in self.device or self.dtod_left == 0:
                return (1,)
            if self.dtod_left is not None:
                self.dtod_left -= 1
            self.device[dst][:nbytes] = self.device[src][:nbytes]
        return (0,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.calls.append(("cudaStreamSynchronize", stream))
        return (0,)

    def cudaFree(self, ptr):  # noqa: N802
        self.calls.append(("cudaFree", ptr))
        return (0,)

    def cudaFreeHost(self, ptr):  # noqa: N802
        self.calls.append(("cudaFreeHost", ptr))
        return (0,)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.calls.append(("cudaStreamDestroy", stream))
        return (0,)


@pytest.fixture
def cudart(monkeypatch):
    """A :class:`_FakeCudart` as the cuda-python the backend imports."""
    fake = _FakeCudart()
    monkeypatch.setattr(tb, "_import_cudart", lambda: fake)
    return fake


class _FakePycuda:
    """pycuda.driver with a context stack (``stack``) and the device allocations freed (``freed``)."""

    def __init__(self):
        self.stack, self.freed, self.next = [], [], 0
        drv = self

        class Alloc:
            def __init__(self, ptr):
                self.ptr = ptr

            def __int__(self):
                return self.ptr

            def free(self):
                drv.freed.append(self.ptr)

        class Context:
            def push(self):
                drv.stack.append(self)

            def pop(self):
                drv.stack.pop()

            def detach(self):
                pass

        class Device:
            def __init__(self, index):
                self.index = index

            @staticmethod
            def count():
                return 1

            def retain_primary_context(self):
                return Context()

            def name(self):
                return "Fake GPU"

            def compute_capability(self):
                return (8, 6)

        class Stream:
            handle = 5

            def synchronize(self):
                pass

        self.Alloc, self.Device, self.Stream = Alloc, Device, Stream

    def init(self):
        pass

    def mem_alloc(self, nbytes):
        self.next += 0x100
        return self.Alloc(self.next)

    def pagelocked_empty(self, shape, dtype):
        return np.zeros(shape, dtype)


def test_zero_cuda_devices_is_no_gpu(cudart):
    """cuda-python reporting no device (cudaGetDeviceCount 0) is a machine without a GPU."""
    cudart.count = 0
    assert tb._gpu_present() is False
    cudart.count = 2
    assert tb._gpu_present() is True


def test_cuda_api_copies_whole_buffers_each_way(cudart):
    """Pinned buffers hold itemsize bytes per value; htod, dtod and dtoh copy every byte in the
    right direction, queued on the api's stream."""
    api = tb._CudaApi(0)
    src = api.pinned((2, 3), np.float32)
    assert src.shape == (2, 3) and src.dtype == np.float32
    src[...] = np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5
    a, b = api.malloc(src.nbytes), api.malloc(src.nbytes)
    api.htod(a, src)
    api.dtod(b, a, src.nbytes)
    dst = api.pinned((2, 3), np.float32)
    api.dtoh(dst, b)
    api.synchronize()
    np.testing.assert_array_equal(dst, src)
    assert all(c[3] == 77 for c in cudart.calls if c[0] == "cudaMemcpyAsync")  # the api's stream
    api.close()


def test_a_cuda_error_is_raised_with_its_message(cudart):
    """An error code from cuda-python raises RuntimeError with CUDA's message."""
    api = tb._CudaApi(0)
    cudart.fail_malloc = True
    with pytest.raises(RuntimeError, match="CUDA error 2: out of memory"):
        api.malloc(16)


def test_cuda_api_makes_its_device_current_and_reads_its_identity(cudart):
    """The api makes its own device current and reports the GPU's name (up to the first NUL) and
    its compute capability as (major, minor)."""
    api = tb._CudaApi(1)
    assert ("cudaSetDevice", 1) in cudart.calls
    assert api.compute_capability == (8, 6)
    assert api.gpu_name == "Fake GPU"


def test_free_synchronizes_first_and_close_frees_each_buffer_once(cudart):
    """Freeing a buffer pair waits for the stream first (no copy in flight uses it); close()
    afterwards frees every other pointer once and destroys the stream once (idempotent)."""
    api = tb._CudaApi(0)
    host = api.pinned((4,), np.float32)
    dev = api.malloc(host.nbytes)
    keep_host = api.pinned((4,), np.float32)
    keep_dev = api.malloc(keep_host.nbytes)
    cudart.calls.clear()
    api.free(dev, host)
    names = [c[0] for c in cudart.calls]
    assert names[0] == "cudaStreamSynchronize" and "cudaFree" in names and "cudaFreeHost" in names
    api.close()
    api.close()
    assert sorted(c[1] for c in cudart.calls if c[0] == "cudaFree") == sorted([dev, keep_dev])
    assert sum(1 for c in cudart.calls if c[0] == "cudaStreamDestroy") == 1


def test_pycuda_free_drops_the_pair_and_activate_pops_its_context(monkeypatch):
    """With pycuda, free() frees the device allocation and no longer keeps the page-locked array,
    and activate() pops the context it pushed."""
    drv = _FakePycuda()
    monkeypatch.setattr(tb, "_import_cudart", lambda: None)
    monkeypatch.setattr(tb, "_import_pycuda", lambda: drv)
    api = tb._CudaApi(0)
    host = api.pinned((4,), np.float32)
    dev = api.malloc(host.nbytes)
    with api.activate():
        assert len(drv.stack) == 1
    assert drv.stack == []
    api.free(dev, host)
    assert drv.freed == [dev]
    assert not any(k is host for k in api._keep)
    assert api._keep == []


def test_building_without_torch_cuda_closes_its_cuda_api(cudart, monkeypatch):
    """The CUDA api made to build on a device (torch without CUDA) is closed, its stream
    destroyed, when the build is done."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with tb._OnDevice(0):
        pass
    assert ("cudaStreamDestroy", 77) in cudart.calls


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


def _fake_tensorrt(log=None, version="8.6.1", *, layers=(), parse_errors=(), serialized=b"engine", fp16_flag=True,
                   tensors=None, loads=True, makes_context=True, takes_addresses=True, executes=True):
    """A stand-in ``tensorrt`` module recording its calls in ``log`` as (object, method, args).

    Building: the network holds ``layers``, the parser fails with ``parse_errors`` (when any),
    the builder returns ``serialized``; ``fp16_flag`` False is a TensorRT without BuilderFlag.FP16.
    Running: each engine deserialized has the I/O ``tensors`` ({name: (shape, numpy dtype, "in" or
    "out")}); ``loads`` / ``makes_context`` False: no engine / no execution context (None),
    ``takes_addresses`` / ``executes`` False: set_tensor_address / execute_async_v3 return False.
    """
    log = [] if log is None else log
    tensors = tensors or {}

    class Network(_Recorder):
        num_layers = len(layers)

        def get_layer(self, i):
            return layers[i]

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
            return serialized

    class Parser(_Recorder):
        num_errors = len(parse_errors)

        def __init__(self, network, logger):
            super().__init__(log, "parser")

        def parse_from_file(self, path):
            log.append(("parser", "parse_from_file", (path,)))
            return not parse_errors

        def get_error(self, i):
            return parse_errors[i]

    class Logger:
        WARNING = 2

        def __init__(self, level):
            log.append(("trt", "Logger", (level,)))

    class Context:
        def set_tensor_address(self, name, ptr):
            return takes_addresses

        def execute_async_v3(self, stream):
            log.append(("context", "execute_async_v3", (stream,)))
            return executes

    class Engine:
        num_io_tensors = len(tensors)

        def get_tensor_name(self, i):
            return list(tensors)[i]

        def get_tensor_shape(self, name):
            return tensors[name][0]

        def get_tensor_dtype(self, name):
            return tensors[name][1]

        def get_tensor_mode(self, name):
            return tensors[name][2]

        def create_execution_context(self):
            return Context() if makes_context else None

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine() if loads else None

    enum = types.SimpleNamespace
    flags = dict(TF32="TF32", OBEY_PRECISION_CONSTRAINTS="OBEY", **({"FP16": "FP16"} if fp16_flag else {}))
    return types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser, Runtime=Runtime,
        init_libnvinfer_plugins=lambda logger, ns: log.append(("trt", "init_libnvinfer_plugins", (ns,))),
        NetworkDefinitionCreationFlag=enum(EXPLICIT_BATCH=0), OnnxParserFlag=enum(NATIVE_INSTANCENORM=0),
        BuilderFlag=enum(**flags), MemoryPoolType=enum(WORKSPACE="WORKSPACE"),
        float32="f32", float16="f16", int32="i32", LayerType=enum(CONSTANT="CONSTANT", SHAPE="SHAPE"),
        nptype=lambda dtype: dtype, TensorIOMode=enum(INPUT="in"))


class _FakeLayer:
    """A layer of the stand-in network: the dtypes of its outputs, and the precision and output
    types the builder set on it."""

    def __init__(self, name, dtypes, layer_type="CONV"):
        self.name, self.type, self.num_outputs = name, layer_type, len(dtypes)
        self._outputs = [types.SimpleNamespace(dtype=d) for d in dtypes]
        self.precision, self.output_types = None, {}

    def get_output(self, j):
        return self._outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


@pytest.fixture
def stand_in_trt(monkeypatch):
    """``stand_in_trt(log, **options)``: ``_fake_tensorrt(log, **options)`` becomes the TensorRT
    that build_engine imports, with a new process logger; returns it."""
    def use(log=None, **options):
        trt = _fake_tensorrt(log, **options)
        monkeypatch.setattr(tb, "_trt", lambda: trt)
        monkeypatch.setattr(tb, "_TRT_LOGGER", None)
        return trt
    return use


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_engine_settings(stand_in_trt, precision):
    log = []
    stand_in_trt(log)
    assert tb.build_engine("graph.onnx", precision, workspace_mb=64) == b"engine"
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
    tb.build_engine("graph.onnx", precision)
    assert sum(1 for c in log if c[1] == "Logger") == 1  # one logger for the process
    ten = []
    stand_in_trt(ten, version="10.3.0")
    tb.build_engine("graph.onnx", precision)
    assert ("builder", "create_network", (0,)) in ten  # no flag on TensorRT 10: explicit batch only, flag deprecated
    with pytest.raises(ValueError, match="fp32 or fp16"):
        tb.build_engine("graph.onnx", "bf16")


def test_fp16_constrains_exactly_the_float_layers_matched_to_fp32(stand_in_trt):
    """In an fp16 engine the layers matched by the fp32 patterns that produce float tensors get
    float32 precision and output types, and the builder obeys the constraints; unmatched layers,
    layers with an integer output (even beside a float one) and constants are left alone."""
    log = []
    layers = [_FakeLayer("/pixel_decoder/conv", ["f32"]), _FakeLayer("/backbone/conv", ["f32"]),
              _FakeLayer("/pixel_decoder/shape", ["i32"]), _FakeLayer("/pixel_decoder/mixed", ["f32", "i32"]),
              _FakeLayer("/pixel_decoder/const", ["f32"], "CONSTANT")]
    stand_in_trt(log, layers=layers)
    tb.build_engine("g.onnx", "fp16", fp32_layer_patterns=FP32_LAYER_PATTERNS["key_frame"])
    assert [(layer.name, layer.precision, layer.output_types) for layer in layers] == [
        ("/pixel_decoder/conv", "f32", {0: "f32"}), ("/backbone/conv", None, {}), ("/pixel_decoder/shape", None, {}),
        ("/pixel_decoder/mixed", None, {}), ("/pixel_decoder/const", None, {})]
    assert ("config", "set_flag", ("OBEY",)) in log and ("config", "set_flag", ("FP16",)) in log


@pytest.mark.parametrize("options, precision, message", [
    (dict(parse_errors=("unsupported op Foo", "bad weights")), "fp32",
     "could not parse g.onnx: unsupported op Foo; bad weights$"),
    (dict(version="11.0.0", fp16_flag=False), "fp16", "TensorRT 11.0.0 has no FP16 builder flag"),
    (dict(serialized=None), "fp32", "failed to build an engine from g.onnx"),
])
def test_a_failed_build_raises_naming_the_cause(stand_in_trt, options, precision, message):
    """A graph TensorRT cannot parse (every parser error named), fp16 on a TensorRT without the
    FP16 builder flag (not an AttributeError) and a builder returning no engine raise RuntimeError."""
    stand_in_trt(**options)
    with pytest.raises(RuntimeError, match=message):
        tb.build_engine("g.onnx", precision)


_KEY_TENSORS = {"image": (1, 3, 32, 32), "class_logits": (1, 4, 3), "mask_logits": (1, 4, 8, 8),
                "query_embeddings": (4, 1, 8)}
_NON_KEY_TENSORS = {"image": (1, 3, 32, 32), "key_image": (1, 3, 32, 32), "key_class_logits": (1, 4, 3),
                    "key_mask_logits": (1, 4, 8, 8), "key_query_embeddings": (4, 1, 8),
                    "warped_mask_logits": (1, 4, 8, 8), "flows": (1, 4, 2, 8, 8)}


def _key_state(image, **tensors):
    """A key frame's state on ``image`` with the stand-in engines' shapes, zeros unless given."""
    zeros = dict(class_logits=torch.zeros(1, 4, 3), mask_logits=torch.zeros(1, 4, 8, 8),
                 query_embeddings=torch.zeros(4, 1, 8))
    return KeyFrameState(image=image, valid_hw=(32, 32), **{**zeros, **tensors})


def _stand_in_backend(result=None, uploads=None, downloads=None, refused=(), non_key_tensors=_NON_KEY_TENSORS):
    """A TensorRTBackend over stand-in key and non-key engines of these tensors and CUDA calls (no
    GPU): ``result(name)`` gives the non-key engine's outputs (by default, as the key engine's:
    zeros of the tensor's shape); the non-key engine's uploads and downloads are recorded in the
    lists given; an upload of a name in ``refused`` (a container the caller may change) raises
    ValueError, as a tensor of the wrong shape does. ``backend.events`` lists the calls in order:
    (engine, "upload", name, value), (engine, "execute"), (engine, "download" or "result", name),
    ("dtod", destination, source, bytes), ("synchronize",), where a device buffer is named
    "engine:tensor"; ``backend.requested`` lists the sizes asked of the engine cache."""
    events = []

    class Engine:
        def __init__(self, tag, shapes):
            self.tag = tag
            self.device = {name: f"{tag}:{name}" for name in shapes}
            self.host = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}

        def upload(self, name, value):
            if name in refused:
                raise ValueError(f"{name}: refused")
            events.append((self.tag, "upload", name, value))
            if uploads is not None and self.tag == "non_key":
                uploads.append(name)

        def execute(self):
            events.append((self.tag, "execute"))

        def download(self, name):
            events.append((self.tag, "download", name))
            if downloads is not None and self.tag == "non_key":
                downloads.append(name)

        def result(self, name):
            events.append((self.tag, "result", name))
            if result is not None and self.tag == "non_key":
                return result(name)
            return torch.from_numpy(self.host[name].copy())

    class Cuda:
        def activate(self):
            return contextlib.nullcontext(self)

        def dtod(self, dst, src, nbytes):
            events.append(("dtod", dst, src, nbytes))

        def synchronize(self):
            events.append(("synchronize",))

        def close(self):
            pass

    key, non_key = Engine("key", _KEY_TENSORS), Engine("non_key", non_key_tensors)
    backend = tb.TensorRTBackend.__new__(tb.TensorRTBackend)
    backend.cuda, backend._device_key, backend._device_reference = Cuda(), None, None
    backend.events, backend.requested = events, []
    backend._get = lambda hw: backend.requested.append(hw) or (key, non_key, (32, 32))
    return backend


def test_key_state_is_uploaded_once_per_key_frame(monkeypatch, lite):
    # The segmenter hands the backend a copy of the key state (with_active_queries): the key
    # tensors already on the GPU must not be uploaded again for every non-key frame.
    uploads = []
    backend = _stand_in_backend(lambda name: torch.zeros(1, 4, 2, 3, 4), uploads=uploads)
    image = torch.zeros(1, 3, 32, 32)
    key = _key_state(image)
    backend._device_key, backend._device_reference = key, image  # as segment_key_frame leaves them
    active = key.with_active_queries(0.0)
    assert active is not key
    for _ in range(3):
        backend.propagate(active, torch.ones(1, 3, 32, 32))
    assert uploads == ["image"] * 3
    other = _key_state(image, class_logits=torch.ones(1, 4, 3))
    backend.propagate(other, torch.ones(1, 3, 32, 32))
    assert uploads[3:] == ["key_class_logits", "key_mask_logits", "key_query_embeddings", "key_image", "image"]
    # a state that shares all but one tensor with the held one (new class logits only) is another key frame
    del uploads[:]
    backend.propagate(dataclasses.replace(other, class_logits=torch.zeros(1, 4, 3)), torch.ones(1, 3, 32, 32))
    assert uploads[:3] == ["key_class_logits", "key_mask_logits", "key_query_embeddings"]


def test_segment_key_frame_keeps_the_key_state_on_the_gpu():
    """A key frame's image and outputs are copied device-to-device, whole, each into its own key
    input of the non-key engine, and the stream is synchronised before the results are read; the
    non-key frames of that key frame then upload their image only."""
    backend = _stand_in_backend()
    state = backend.segment_key_frame(torch.zeros(1, 3, 32, 32))
    assert backend.requested == [(32, 32)]
    assert [e for e in backend.events if e[0] == "dtod"] == [
        ("dtod", "non_key:key_image", "key:image", 1 * 3 * 32 * 32 * 4),
        ("dtod", "non_key:key_class_logits", "key:class_logits", 4 * 3 * 4),
        ("dtod", "non_key:key_mask_logits", "key:mask_logits", 4 * 8 * 8 * 4),
        ("dtod", "non_key:key_query_embeddings", "key:query_embeddings", 4 * 8 * 4)]
    first_result = next(i for i, e in enumerate(backend.events) if e[1:2] == ("result",))
    assert ("synchronize",) in backend.events[:first_result]
    del backend.events[:]
    backend.propagate(state, torch.ones(1, 3, 32, 32))
    assert [e[2] for e in backend.events if e[1:2] == ("upload",)] == ["image"]


def test_an_image_off_the_engine_canvas_is_refused_before_anything_runs():
    """segment_key_frame asks the engine cache for the image's (height, width) and refuses an
    image that is not (1, 3, *padded canvas) before any upload."""
    backend = _stand_in_backend()
    with pytest.raises(ValueError, match="does not fit the engine's canvas"):
        backend.segment_key_frame(torch.zeros(1, 3, 32, 48))
    assert backend.requested == [(32, 48)] and backend.events == []


def test_a_key_state_upload_that_fails_part_way_holds_no_key_frame():
    """The engine held key_class_logits of one key frame and the rest of another while the
    backend still named the old one, whose next propagation then ran on them without an error."""
    uploads, refused = [], set()
    backend = _stand_in_backend(lambda name: torch.zeros(1, 4, 2, 3, 4), uploads=uploads, refused=refused)
    image = torch.zeros(1, 3, 32, 32)
    a, b = (_key_state(image, class_logits=torch.full((1, 4, 3), float(v))) for v in (1, 2))
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


def test_a_key_frame_whose_copy_into_the_non_key_engine_fails_holds_no_key_frame(cudart, engine_file):
    """No GPU needed: engines of the stand-in TensorRT over the stand-in cuda-python. A key frame
    whose device-to-device copies fail part-way (its image copied into the non-key engine, its
    class logits not) leaves the backend holding no key frame, so the previous key frame's next
    propagation uploads its state and image again instead of running on the other frame's image."""
    outputs = ("class_logits", "mask_logits", "query_embeddings", "warped_mask_logits", "flows")
    api = tb._CudaApi(0)
    key_engine, non_key = (
        tb._Engine(_fake_tensorrt(tensors={n: (s, np.float32, "out" if n in outputs else "in") for n, s in io.items()}),
                   engine_file, api)
        for io in (_KEY_TENSORS, _NON_KEY_TENSORS))
    backend = tb.TensorRTBackend.__new__(tb.TensorRTBackend)
    backend.cuda, backend._device_key, backend._device_reference = api, None, None
    backend._get = lambda hw: (key_engine, non_key, (32, 32))
    a = backend.segment_key_frame(torch.zeros(1, 3, 32, 32))
    assert backend._device_key is a
    cudart.dtod_left = 1  # the key image goes in, the class logits' copy fails
    with pytest.raises(RuntimeError, match="CUDA error 1: invalid argument"):
        backend.segment_key_frame(torch.ones(1, 3, 32, 32))
    assert backend._device_key is None and backend._device_reference is None
    cudart.dtod_left = None
    before = len(cudart.calls)
    backend.propagate(a, torch.full((1, 3, 32, 32), 5.0))
    htod = [c for c in cudart.calls[before:] if c[:2] == ("cudaMemcpyAsync", "HtoD")]
    assert len(htod) == 5  # a's class logits, mask logits, query embeddings and image, and the frame
    assert not np.frombuffer(bytes(cudart.device[non_key.device["key_image"]]), np.float32).any()  # a's image


def test_query_flows_into_another_frame_uploads_that_frame_as_the_key_image():
    """A chained flow's link runs on the reference frame given (uploaded to key_image), and the
    stream is synchronised before the flows are read."""
    backend = _stand_in_backend()
    image = torch.zeros(1, 3, 32, 32)
    key = _key_state(image)
    backend._device_key, backend._device_reference = key, image
    reference = torch.full((1, 3, 32, 32), 7.0)
    backend.query_flows(key, torch.ones(1, 3, 32, 32), reference)
    uploads = [e for e in backend.events if e[1:2] == ("upload",)]
    assert [e[2] for e in uploads] == ["key_image", "image"] and uploads[0][3] is reference
    first_result = next(i for i, e in enumerate(backend.events) if e[1:2] == ("result",))
    assert ("synchronize",) in backend.events[:first_result]


def test_an_engine_without_the_flows_output_says_to_re_export():
    """query_flows on a non-key engine built from graphs exported before 'flows' existed says what
    to do instead of failing on a missing buffer."""
    backend = _stand_in_backend(non_key_tensors={n: s for n, s in _NON_KEY_TENSORS.items() if n != "flows"})
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="re-export the graphs"):
        backend.query_flows(_key_state(image), torch.ones(1, 3, 32, 32))


class _StandInCuda:
    """The _CudaApi calls an _Engine makes, without a GPU: ``device`` and ``host`` hold the live
    device pointers and pinned buffers (by id), ``allocated`` each device allocation's bytes,
    ``freed`` the number of pairs freed and ``htods`` each upload (pointer, pinned buffer's copy)."""

    stream_handle = 99

    def __init__(self):
        self.device, self.host, self.allocated, self.htods, self.freed = set(), set(), [], [], 0

    def malloc(self, nbytes):
        self.allocated.append(nbytes)
        self.device.add(len(self.allocated))
        return len(self.allocated)

    def pinned(self, shape, dtype):
        arr = np.zeros(shape, dtype)
        self.host.add(id(arr))
        return arr

    def free(self, device_ptr, host):
        if device_ptr is not None:  # None: a pinned buffer whose device buffer was never made
            self.device.remove(device_ptr)
        self.host.remove(id(host))
        self.freed += 1

    def htod(self, dst, src):
        self.htods.append((dst, src.copy()))

    def dtoh(self, dst, src):
        pass

    def activate(self):
        return contextlib.nullcontext(self)


@pytest.fixture
def engine_file(tmp_path, monkeypatch):
    """A serialized engine's file for the stand-in TensorRT runtime (with a new process logger)."""
    monkeypatch.setattr(tb, "_TRT_LOGGER", None)
    path = tmp_path / "x.engine"
    path.write_bytes(b"x")
    return path


_IMAGE_AND_IDS = {"image": ((1, 3, 4, 4), np.float32, "in"), "ids": ((2,), np.int32, "out")}


def test_a_size_dropped_from_the_engine_cache_frees_its_buffers(engine_file):
    """No GPU needed: stand-ins for TensorRT and the CUDA calls. A stream through more input sizes
    than the backend keeps frees the dropped sizes' engines and every I/O buffer they allocated,
    and forgets which key frame the dropped non-key engine held."""
    trt = _fake_tensorrt(tensors={"image": ((1, 3, 8, 8), np.float32, "in"),
                                  "mask_logits": ((1, 3, 8, 8), np.float32, "out")})
    cuda = _StandInCuda()
    backend = object.__new__(tb.TensorRTBackend)
    backend._trt, backend.cuda, backend._device_key, backend._device_reference = trt, cuda, None, None
    backend._engines = SizeCache(on_evict=backend._release)
    backend._load = lambda hw: (tb._Engine(trt, engine_file, cuda), tb._Engine(trt, engine_file, cuda), hw)
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


@pytest.mark.parametrize("options, message", [
    (dict(loads=False), "cannot load the TensorRT engine .*delete it to rebuild"),
    (dict(makes_context=False), "cannot create an execution context"),
    (dict(takes_addresses=False), "TensorRT refused the address of tensor image"),
    (dict(tensors={"image": ((1, 3, -1, 4), np.float32, "in")}), "tensor image has a dynamic shape"),
    (dict(tensors={**_IMAGE_AND_IDS, "ids": ((-1,), np.int32, "out")}), "tensor ids has a dynamic shape"),
])
def test_an_engine_that_cannot_be_set_up_raises(engine_file, options, message):
    """An engine file that does not deserialize, an engine without an execution context, a tensor
    address TensorRT refuses and a dynamic input shape each raise their own RuntimeError, and free
    the buffers made before it (a failed load is retried at every key frame of its size: each try
    left its buffers on the GPU until the backend closed)."""
    cuda = _StandInCuda()
    with pytest.raises(RuntimeError, match=message):
        tb._Engine(_fake_tensorrt(**{"tensors": _IMAGE_AND_IDS, **options}), engine_file, cuda)
    assert cuda.device == set() and cuda.host == set()


def test_engine_buffers_follow_the_tensors_and_uploads_check_their_shape(engine_file):
    """Host buffers take the engine's dtypes, device buffers their byte sizes; an input of
    another shape (even one that broadcasts) is refused, a fitting one is copied into the pinned
    buffer and queued to the device."""
    cuda = _StandInCuda()
    engine = tb._Engine(_fake_tensorrt(tensors=_IMAGE_AND_IDS), engine_file, cuda)
    assert engine.host["image"].dtype == np.float32 and engine.host["ids"].dtype == np.int32
    assert cuda.allocated == [1 * 3 * 4 * 4 * 4, 2 * 4]
    with pytest.raises(ValueError, match="shape"):
        engine.upload("image", torch.ones(1, 3, 1, 4))
    value = torch.arange(48, dtype=torch.float32).reshape(1, 3, 4, 4)
    engine.upload("image", value)
    assert len(cuda.htods) == 1 and cuda.htods[0][0] == engine.device["image"]
    np.testing.assert_array_equal(cuda.htods[0][1], value.numpy())


def test_a_failed_execution_raises(engine_file):
    """execute_async_v3 returning False raises; it runs on the CUDA api's stream."""
    log = []
    engine = tb._Engine(_fake_tensorrt(log, tensors=_IMAGE_AND_IDS, executes=False), engine_file, _StandInCuda())
    with pytest.raises(RuntimeError, match="execution failed"):
        engine.execute()
    assert [c for c in log if c[0] == "context"] == [("context", "execute_async_v3", (99,))]


def test_a_result_is_a_copy_of_the_pinned_buffer(engine_file):
    """A result survives the next frame's download into the same pinned buffer."""
    engine = tb._Engine(_fake_tensorrt(tensors=_IMAGE_AND_IDS), engine_file, _StandInCuda())
    engine.host["image"][...] = 1.0
    result = engine.result("image")
    engine.host["image"][...] = 2.0  # the next download
    assert result.dtype == torch.float32 and bool((result == 1.0).all())


@pytest.mark.parametrize("bad", [False, True])
def test_a_non_finite_flow_gives_non_finite_warped_masks_from_the_engine(bad):
    """The engine warps inside (GridSample clamps NaN sampling positions to the border): its flows
    are downloaded with the warped masks and a non-finite one makes them NaN. No GPU needed."""
    flows = torch.zeros(1, 4, 2, 3, 4)
    if bad:
        flows[0, 2, 1, 1, 1] = float("inf")
    downloads = []
    backend = _stand_in_backend(lambda name: flows if name == "flows" else torch.ones(1, 4, 8, 8), downloads=downloads)
    image = torch.zeros(1, 3, 32, 32)
    key = _key_state(image)
    backend._device_key, backend._device_reference = key, image
    warped = backend.propagate(key, torch.ones(1, 3, 32, 32))
    assert downloads == ["warped_mask_logits", "flows"]
    assert bool(torch.isnan(warped).all()) is bad and (bad or bool((warped == 1).all()))


def test_a_non_finite_flow_of_an_inactive_query_is_not_checked():
    """The torch warp sees the active queries' flows only: an inactive query's inf flow (an fp16
    overflow in its flow head) made every propagated frame NaN on TensorRT and onnxruntime-CUDA."""
    flows = torch.zeros(1, 4, 2, 3, 4)
    flows[0, 3, 0, 0, 0] = float("inf")
    backend = _stand_in_backend(lambda name: flows if name == "flows" else torch.ones(1, 4, 8, 8))
    image = torch.zeros(1, 3, 32, 32)
    key = _key_state(image, active=torch.tensor([0, 1, 2]))
    backend._device_key, backend._device_reference = key, image
    warped = backend.propagate(key, torch.ones(1, 3, 32, 32))
    assert warped.shape == (1, 3, 8, 8) and bool((warped == 1).all())
    backend._device_key = key = dataclasses.replace(key, active=torch.tensor([1, 3]))
    assert bool(torch.isnan(backend.propagate(key, torch.ones(1, 3, 32, 32))).all())


@pytest.fixture
def constructible(monkeypatch):
    """TensorRTBackend() on a machine 'with' TensorRT: a stand-in module, availability check and
    CUDA api (no GPU); the list of CUDA apis made."""
    made = []

    class Api:
        def __init__(self, index):
            self.index, self.gpu_name = index, "Fake GPU"
            made.append(self)

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(tb, "tensorrt_missing", lambda precision="fp32": None)
    monkeypatch.setattr(tb, "_CudaApi", Api)
    return made


def test_the_backend_runs_on_the_cuda_device_named(constructible):
    """Device cuda:1 builds and runs on GPU 1; cpu is taken as GPU 0."""
    backend = tb.TensorRTBackend(types.SimpleNamespace(cfg=None), device="cuda:1")
    assert backend.device_index == 1 and constructible[0].index == 1
    backend = tb.TensorRTBackend(types.SimpleNamespace(cfg=None), device="cpu")
    assert backend.device_index == 0


def test_the_backend_refuses_bf16_engines(constructible):
    """bf16 is refused, before any CUDA api is made, even where TensorRT is available."""
    with pytest.raises(ValueError, match="fp32 or fp16"):
        tb.TensorRTBackend(types.SimpleNamespace(cfg=None), precision="bf16")
    assert constructible == []


def test_the_padded_canvas_comes_from_the_contract(constructible, monkeypatch, tmp_path):
    """A size's engines come with the export contract's padded canvas, not the valid size."""
    monkeypatch.setattr(tb, "build_engines", lambda *a, **k: {"key_frame": tmp_path / "k", "non_key_frame": tmp_path / "n"})
    monkeypatch.setattr(tb, "read_contract", lambda d: {"canvas": {"padded_hw": [32, 64]}})
    monkeypatch.setattr(tb, "_Engine", lambda trt, path, cuda: path.name)
    backend = tb.TensorRTBackend(types.SimpleNamespace(cfg=None, get=lambda hw: tmp_path))
    backend.cuda = types.SimpleNamespace(activate=lambda: contextlib.nullcontext(), close=lambda: None)
    assert backend._load((30, 50)) == ("k", "n", (32, 64))


def test_a_non_key_engine_that_cannot_be_set_up_frees_the_key_engine(constructible, engine_file, monkeypatch):
    """A failed load is retried at every key frame of its size: when the non-key engine fails, the
    key engine made just before frees its buffers too."""
    monkeypatch.setattr(tb, "build_engines", lambda *a, **k: {"key_frame": engine_file,
                                                             "non_key_frame": engine_file.with_name("n")})
    monkeypatch.setattr(tb, "read_contract", lambda d: {"canvas": {"padded_hw": [4, 4]}})
    real = tb._Engine

    def engine(trt, path, cuda):
        if path.name == "n":
            raise RuntimeError("cannot create an execution context")
        return real(trt, path, cuda)

    monkeypatch.setattr(tb, "_Engine", engine)
    backend = tb.TensorRTBackend(types.SimpleNamespace(cfg=None, get=lambda hw: engine_file.parent))
    backend._trt, backend.cuda = _fake_tensorrt(tensors=_IMAGE_AND_IDS), _StandInCuda()
    with pytest.raises(RuntimeError, match="execution context"):
        backend._load((4, 4))
    assert len(backend.cuda.allocated) == 2 and backend.cuda.device == set() and backend.cuda.host == set()


def _stand_in_engine_for(monkeypatch, version: str = "10.3.0"):
    """``built``: ``engine_for`` runs with a stand-in TensorRT of ``version``, GPU and builder (no GPU
    needed); ``built`` lists the builds as (graph, precision, workspace_mb, fp32 layer patterns),
    the n-th engine is b"serialized engine n"."""
    built = []

    def build(onnx_path, precision, workspace_mb, patterns):
        built.append((onnx_path, precision, workspace_mb, tuple(patterns)))
        return b"serialized engine %d" % len(built)

    monkeypatch.setattr(tb, "_trt", lambda: types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(tb, "_device_identity", lambda index: ("Stand-in GPU", (9, 0)))
    monkeypatch.setattr(tb, "_OnDevice", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(tb, "build_engine", build)
    return built


def test_a_damaged_cached_engine_is_built_again(tmp_path, monkeypatch):
    """No GPU needed: a stand-in TensorRT and builder. An engine file cut short (power lost before
    the write reached the disk, a full disk) was returned as is, and every later start failed to
    deserialize it ('delete it to rebuild'); the ONNX cache re-exports such an entry itself."""
    built = _stand_in_engine_for(monkeypatch)
    graph = tmp_path / "key_frame.onnx"
    graph.write_bytes(b"graph")
    args = (graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache")
    path = tb.engine_for(*args, progress=lambda m: None)
    assert path.read_bytes() == b"serialized engine 1" and len(built) == 1
    os.utime(path, (1_000_000, 1_000_000))
    assert tb.engine_for(*args, progress=lambda m: None) == path and len(built) == 1  # reused
    assert path.stat().st_mtime > 1_000_000  # and marked used: the cache prune spares it
    path.write_bytes(b"serialized en")  # cut short
    assert tb.engine_for(*args, progress=lambda m: None) == path
    assert len(built) == 2 and path.read_bytes() == b"serialized engine 2"
    path.write_bytes(b"")  # empty
    tb.engine_for(*args, progress=lambda m: None)
    assert len(built) == 3 and path.read_bytes() == b"serialized engine 3"


def test_an_engine_is_not_reused_for_other_input_shapes_workspace_or_tensorrt(tmp_path, monkeypatch):
    """No GPU needed. The engine's cache key holds the input shapes, the workspace limit and
    TensorRT's version: an engine built for one size, workspace (or by another TensorRT) is never
    handed out for another."""
    built = _stand_in_engine_for(monkeypatch)
    graph = tmp_path / "key_frame.onnx"
    graph.write_bytes(b"graph")
    first = tb.engine_for(graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache", progress=lambda m: None)
    other_size = tb.engine_for(graph, {"image": [1, 3, 64, 32]}, "key_frame", "fp32", tmp_path / "cache",
                               progress=lambda m: None)
    assert other_size != first and len(built) == 2
    other_workspace = tb.engine_for(graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache",
                                    workspace_mb=64, progress=lambda m: None)
    assert other_workspace not in (first, other_size)
    assert [b[2] for b in built] == [tb.DEFAULT_WORKSPACE_MB, tb.DEFAULT_WORKSPACE_MB, 64]
    built = _stand_in_engine_for(monkeypatch, version="10.4.0")
    upgraded = tb.engine_for(graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache",
                             progress=lambda m: None)
    assert upgraded not in (first, other_size) and len(built) == 1


def test_an_engine_is_not_reused_for_a_graph_rewritten_in_place(tmp_path, monkeypatch):
    """An export folder written again at the same path (new weights) holds other graphs: the
    key is the graph's bytes (sha256), not its path."""
    built = _stand_in_engine_for(monkeypatch)
    graph = tmp_path / "key_frame.onnx"
    graph.write_bytes(b"graph of the old weights")
    args = (graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache")
    old = tb.engine_for(*args, progress=lambda m: None)
    graph.write_bytes(b"graph of the new weights")
    new = tb.engine_for(*args, progress=lambda m: None)
    assert new != old and len(built) == 2


def test_fp16_builds_keep_the_fp32_layers_unless_keep_fp32_is_off(tmp_path, monkeypatch):
    """keep_fp32 (the default) hands the graph's fp32 layer patterns to an fp16 build; off, none
    (another engine)."""
    built = _stand_in_engine_for(monkeypatch)
    graph = tmp_path / "key_frame.onnx"
    graph.write_bytes(b"graph")
    for keep_fp32 in (True, False):
        tb.engine_for(graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp16", tmp_path / "cache", keep_fp32=keep_fp32,
                      progress=lambda m: None)
    assert [b[1:] for b in built] == [("fp16", tb.DEFAULT_WORKSPACE_MB, FP32_LAYER_PATTERNS["key_frame"]),
                                      ("fp16", tb.DEFAULT_WORKSPACE_MB, ())]


def test_a_failed_engine_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A build whose engine write fails (a full disk at the rename) raises and leaves no
    temporary file and no engine in the cache; the next call builds it again."""
    built = _stand_in_engine_for(monkeypatch)
    graph = tmp_path / "key_frame.onnx"
    graph.write_bytes(b"graph")
    args = (graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache")
    replace = os.replace

    def fail_on_the_engine(src, dst):
        if str(dst).endswith(".engine"):
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(paths.os, "replace", fail_on_the_engine)
    with pytest.raises(OSError, match="No space left"):
        tb.engine_for(*args, progress=lambda m: None)
    monkeypatch.setattr(paths.os, "replace", replace)
    folder = tmp_path / "cache" / "engines"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert not list(folder.glob("*.engine"))
    path = tb.engine_for(*args, progress=lambda m: None)
    assert path.is_file() and len(built) == 2


def test_engine_writes_go_through_temporaries_the_cache_sweeps(tmp_path, monkeypatch):
    """The side-car and the engine are each renamed into place from a temporary named with the
    prefix the cache's stale sweep removes (a build killed mid-write leaves only such files)."""
    _stand_in_engine_for(monkeypatch)
    graph = tmp_path / "key_frame.onnx"
    graph.write_bytes(b"graph")
    renamed = []
    replace = os.replace

    def record(src, dst):
        renamed.append((Path(src).name, Path(dst).name))
        replace(src, dst)

    monkeypatch.setattr(paths.os, "replace", record)
    path = tb.engine_for(graph, {"image": [1, 3, 32, 32]}, "key_frame", "fp32", tmp_path / "cache",
                         progress=lambda m: None)
    assert [dst for _, dst in renamed] == [path.with_suffix(".json").name, path.name]
    assert all(src.startswith(ENGINE_TEMP_PREFIX) for src, _ in renamed)
    assert ENGINE_TEMP_PREFIX in _TEMP_PREFIXES


def test_an_engine_is_intact_when_it_matches_its_side_car(tmp_path):
    """Without a side-car digest (older versions) an empty file is not intact, any other is; with
    one, a same-size corruption is caught by the sha256; a side-car cut short counts as an old
    one, not an error."""
    path = tmp_path / "g.engine"
    path.write_bytes(b"")
    assert tb._engine_intact(path) is False  # no side-car, empty
    path.write_bytes(b"engine")
    assert tb._engine_intact(path) is True  # no side-car, non-empty
    path.with_suffix(".json").write_text(json.dumps({"engine_bytes": 6, "engine_sha256": hashlib.sha256(b"engine").hexdigest()}))
    assert tb._engine_intact(path) is True
    path.write_bytes(b"engin!")  # same size, other bytes
    assert tb._engine_intact(path) is False
    path.with_suffix(".json").write_text("{\"engine_by")  # side-car cut short
    assert tb._engine_intact(path) is True
    path.with_suffix(".json").write_text("[" * 100_000 + "]" * 100_000)  # nested past the recursion limit
    assert tb._engine_intact(path) is True


def test_build_engines_hands_its_options_to_both_graphs_and_keeps_its_onnx_folder(tmp_path, monkeypatch):
    """build_engines builds both graphs with the options given (keep_fp32 included), and the prune
    after the builds keeps both engines and the export folder explicitly (after builds longer than
    RECENT_USE_SECONDS the folder's recent use no longer spares it)."""
    built, kept = [], []
    contract = {"graphs": {g: {"file": f"{g}.onnx", "inputs": [{"name": "image", "shape": [1, 3, 32, 32]}]}
                           for g in ("key_frame", "non_key_frame")}}
    monkeypatch.setattr(tb, "read_contract", lambda d: contract)
    monkeypatch.setattr(tb, "prune_to_budget", lambda cache_dir, keep: kept.append(list(keep)))
    monkeypatch.setattr(tb, "engine_for", lambda *a: built.append(a) or tmp_path / f"{a[2]}.engine")
    export = tmp_path / "onnx" / "m-32x32-abcd"
    paths = tb.build_engines(types.SimpleNamespace(get=lambda hw: export), (32, 32), "fp16", tmp_path, 1, 512, False)
    assert [a[2:8] for a in built] == [("key_frame", "fp16", tmp_path, 1, 512, False),
                                       ("non_key_frame", "fp16", tmp_path, 1, 512, False)]
    assert kept == [[paths["key_frame"], paths["non_key_frame"], export]]


def test_fp16_on_a_tensorrt_without_the_fp16_builder_flag_is_unavailable(monkeypatch):
    """TensorRT 11 removed BuilderFlag.FP16 (weak typing; NVIDIA/TensorRT v11.0 python/src/infer/
    pyCore.cpp lists no FP16 among the builder flags). fp16 was reported available, then the build
    raised a RuntimeError, which 'mpvss bench' (default specs include tensorrt:fp16) re-raises."""
    fake = types.SimpleNamespace(__version__="11.0.0", BuilderFlag=types.SimpleNamespace(TF32="TF32"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tb, "_import_cudart", lambda: object())
    monkeypatch.setattr(tb, "_gpu_present", lambda: True)
    assert backend_missing("tensorrt", "cuda", "fp32") is None
    assert "FP16 builder flag" in (backend_missing("tensorrt", "cuda", "fp16") or "")
    assert BackendSpec("tensorrt", "cuda", "fp16") not in default_backend_specs()
    monkeypatch.setattr(tb, "_gpu_present", lambda: False)  # tensorrt and cuda-python, but no GPU
    assert "missing here: a CUDA GPU" in (tb.tensorrt_missing("fp32") or "")
