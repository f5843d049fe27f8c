"""Hostile models and machines for the runtime (issue 23, second round): a NUL in an external-data
location, model paths that are not UTF-8 (which onnx's and onnxruntime's C++ bindings refuse),
and onnxruntime's native log: captured only while probing a GPU provider (the CUDA one, and the
TensorRT one with a graph too small for an engine), never around a model's own session, whose
engine builds take minutes and whose warnings and last lines before a crash are the user's.

GPU builds are played by stand-in sessions, as in test_gpu_probe.py.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from ensemble.errors import EnsError
from ensemble.formats.store import read_store
from ensemble.inference import runtime
from ensemble.inference.foreign import ForeignPreprocess
from ensemble.inference.runtime import GpuOptions, Runner, load_model, native_log, prepare_trt_cache, probe_device

from tests.ensemble.conftest import MEAN, STD, ens, ok, one_line_error, tiny_onnx, write_images
from tests.ensemble.inference.test_gpu_probe import ERROR, GPU_131, LINUX_131, WARN, _line

FOREIGN = ForeignPreprocess(input_size=32, mean=MEAN, std=STD)
FOREIGN_ARGS = ["--input-size", 32, "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
NOT_UTF8 = os.fsdecode(b"m\xfe")  # a name of bytes that are not UTF-8 (a surrogate escape in Python)
posix_bytes = pytest.mark.skipif(sys.platform in ("win32", "darwin"),
                                 reason="needs a file system that takes any bytes in a name")


def _external(path: Path, *, foreign: bool = False) -> Path:
    tiny_onnx(path, float_nchw=foreign)
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location=path.name + ".data",
                    size_threshold=0)
    return path


def _set_location(path: Path, location: str) -> None:
    graph = onnx.load(str(path), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(graph, str(path))


# ------------------------------------------------------------------------------------------
# A NUL in an external-data location


@pytest.mark.parametrize("foreign", [False, True], ids=["ens", "foreign"])
def test_a_nul_in_an_external_location_is_one_line(tmp_path, foreign):
    model = _external(tmp_path / "models" / "m.onnx", foreign=foreign)
    _set_location(model, "kernel\x00evil")
    with pytest.raises(EnsError) as caught:
        load_model(model, FOREIGN if foreign else None)
    assert str(model) in str(caught.value) and "'kernel\\x00evil'" in str(caught.value)
    write_images(tmp_path / "imgs", [(40, 30)])
    result = ens("infer", model, "--index", tmp_path / "imgs", "--out", tmp_path / "runs", "--workers", 0,
                 *(FOREIGN_ARGS if foreign else []))
    line = one_line_error(result, str(model), "'kernel\\x00evil'", "NUL")
    assert "\x00" not in line


def test_a_location_the_os_cannot_check_is_one_line(tmp_path, monkeypatch):
    """Any ValueError of the path functions (here realpath's) is the model's line, not a traceback."""
    model = _external(tmp_path / "models" / "m.onnx")

    real = os.path.realpath

    def refuses(path, *args, **kwargs):
        if str(path).endswith(".data"):
            raise ValueError("the OS refuses this name")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(runtime.os.path, "realpath", refuses)
    with pytest.raises(EnsError, match="the OS refuses this name"):
        load_model(model)


# ------------------------------------------------------------------------------------------
# Model paths that are not UTF-8


def _reference(tmp_path: Path, foreign: bool) -> np.ndarray:
    model = tiny_onnx(tmp_path / "reference" / "m.onnx", float_nchw=foreign)
    batch = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    return Runner(load_model(model, FOREIGN if foreign else None), "cpu")(batch)


@posix_bytes
@pytest.mark.parametrize("foreign", [False, True], ids=["ens", "foreign"])
def test_a_model_whose_path_is_not_utf8_runs(tmp_path, foreign):
    model = tiny_onnx(tmp_path / NOT_UTF8 / (NOT_UTF8 + ".onnx"), float_nchw=foreign)
    batch = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    logits = Runner(load_model(model, FOREIGN if foreign else None), "cpu")(batch)
    np.testing.assert_array_equal(logits, _reference(tmp_path, foreign))


@posix_bytes
def test_ens_infer_runs_a_model_whose_path_is_not_utf8(tmp_path):
    model = tiny_onnx(tmp_path / NOT_UTF8 / "m.onnx")
    write_images(tmp_path / "imgs", [(40, 30), (30, 40)])
    ok(ens("infer", model, "--index", tmp_path / "imgs", "--out", tmp_path / "runs", "--workers", 0))
    assert read_store(tmp_path / "runs" / "m" / "imgs").logits.shape == (2, 5)


@posix_bytes
@pytest.mark.parametrize("foreign", [False, True], ids=["ens", "foreign"])
def test_a_model_with_external_data_named_not_utf8_in_a_utf8_folder_runs(tmp_path, foreign):
    """onnxruntime opens the .onnx's bytes and finds the data through its (UTF-8) folder."""
    model = _external(tmp_path / "models" / "m.onnx", foreign=foreign)
    model = model.rename(model.with_name(NOT_UTF8 + ".onnx"))  # the data file keeps its name, as the graph says
    batch = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    logits = Runner(load_model(model, FOREIGN if foreign else None), "cpu")(batch)
    np.testing.assert_array_equal(logits, _reference(tmp_path, foreign))


@posix_bytes
@pytest.mark.parametrize("foreign", [False, True], ids=["ens", "foreign"])
def test_a_model_with_external_data_in_a_folder_not_utf8_is_one_line(tmp_path, foreign):
    _external(tmp_path / "models" / "m.onnx", foreign=foreign)
    (tmp_path / "models").rename(tmp_path / NOT_UTF8)
    model = tmp_path / NOT_UTF8 / "m.onnx"
    with pytest.raises(EnsError) as caught:
        load_model(model, FOREIGN if foreign else None)
    message = str(caught.value)
    assert message.startswith(f"{model}: ") and "UTF-8" in message and "rename" in message, message
    write_images(tmp_path / "imgs", [(40, 30)])
    result = ens("infer", model, "--index", tmp_path / "imgs", "--out", tmp_path / "runs", "--workers", 0,
                 *(FOREIGN_ARGS if foreign else []))
    one_line_error(result, "m\\xfe", "UTF-8", "rename")


@posix_bytes
def test_a_tensorrt_cache_folder_not_utf8_is_one_line(tmp_path):
    """onnxruntime takes provider options as UTF-8 text: the engine cache's path must be."""
    with pytest.raises(EnsError) as caught:
        prepare_trt_cache(tmp_path / NOT_UTF8 / ".trt-cache")
    assert "UTF-8" in str(caught.value) and "--out" in str(caught.value)


# ------------------------------------------------------------------------------------------
# The native log capture


def test_the_capture_keeps_the_text_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with native_log() as log:
            os.write(2, b"the provider failed\n")
            raise RuntimeError("onnxruntime raised")
    assert log.text == "the provider failed\n"


def test_the_capture_reads_a_bounded_head_and_tail(capfd):
    line = b"x" * 1023 + b"\n"
    with native_log() as log:
        os.write(2, b"first line\n")
        for _ in range(12 * 1024):  # 12 MiB
            os.write(2, line)
        os.write(2, b"last line\n")
    assert log.text.startswith("first line\n") and log.text.endswith("last line\n")
    assert len(log.text) < 6 * 1024 * 1024
    assert "bytes of onnxruntime's log left out" in log.text
    assert capfd.readouterr().err == ""


def test_an_interrupt_right_after_the_redirect_gives_fd_2_back(monkeypatch, capfd):
    """KeyboardInterrupt arriving just after fd 2 moved to the capture: fd 2 is still restored."""
    calls = []
    real = os.dup2

    def dup2(fd, fd2, *args):
        real(fd, fd2, *args)
        calls.append(fd2)
        if len(calls) == 1:
            raise KeyboardInterrupt

    proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    proxy.dup2 = dup2
    monkeypatch.setattr(runtime, "os", proxy)
    with pytest.raises(KeyboardInterrupt):
        with native_log():
            pass
    monkeypatch.undo()
    os.write(2, b"seen\n")
    assert capfd.readouterr().err == "seen\n"


class _Gpu:
    """onnxruntime-gpu's ``InferenceSession``: each opening recorded with its providers; a provider
    in ``fails`` writes ``logs[provider]`` to fd 2 (as the C++ logger does) and is dropped, as
    onnxruntime drops a provider whose library does not load; ``chatter`` is written to fd 2 by
    every session (a warning of a provider that loads). Runs on the CPU."""

    real = onnxruntime.InferenceSession
    opened: list = []
    fails: set = set()
    logs: dict = {}
    chatter = ""

    def __init__(self, source, options=None, providers=None, **kw):
        names = [p if isinstance(p, str) else p[0] for p in providers or ()]
        _Gpu.opened.append(("probe" if isinstance(source, bytes) else Path(source).name, providers))
        for name in names:
            if name in self.fails:
                os.write(2, self.logs[name].encode())
        if self.chatter:
            os.write(2, self.chatter.encode())
        self._providers = [n for n in names if n not in self.fails]
        self._session = self.real(source, options, providers=["CPUExecutionProvider"], **kw)

    def get_providers(self):
        return self._providers

    def __getattr__(self, name):
        return getattr(self._session, name)


NO_TENSORRT = _line(ERROR, "E", "provider_bridge_ort.cc:1862 TryGetProviderInfo_TensorRT",
                    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1539 onnxruntime::Provider& "
                    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
                    "libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: cannot open shared object "
                    "file: No such file or directory")
CUDNN_OLD = _line(WARN, "W", "cuda_execution_provider.cc:210 CUDAExecutionProvider",
                  "cuDNN 9.1 is older than the 9.13 this onnxruntime was built with")


@pytest.fixture
def gpu(monkeypatch):
    import onnxruntime.capi.build_and_package_info as info

    for key, value in GPU_131.items():
        monkeypatch.setattr(info, key, value, raising=False)
    monkeypatch.setattr(onnxruntime, "InferenceSession", _Gpu)
    monkeypatch.setattr(_Gpu, "opened", [])
    monkeypatch.setattr(_Gpu, "fails", set())
    monkeypatch.setattr(_Gpu, "logs", {"TensorrtExecutionProvider": NO_TENSORRT,
                                       "CUDAExecutionProvider": LINUX_131})
    return _Gpu


def test_the_tensorrt_probe_names_its_library_quietly_and_builds_no_engine(gpu, capfd):
    gpu.fails = {"TensorrtExecutionProvider"}
    why = probe_device("tensorrt", GpuOptions(trt_cache=Path("/nowhere")))
    assert capfd.readouterr() == ("", "")
    assert why == "TensorrtExecutionProvider did not load (libnvinfer.so.10: cannot open shared object file)"
    [(source, providers)] = gpu.opened
    trt = providers[0]
    assert source == "probe" and trt[0] == "TensorrtExecutionProvider"
    # No engine (a subgraph minimum the one-node graph never reaches), no cache written anywhere.
    assert trt[1] == {"trt_min_subgraph_size": runtime.NO_ENGINE_SUBGRAPH}
    assert [p if isinstance(p, str) else p[0] for p in providers[1:]] == ["CUDAExecutionProvider",
                                                                        "CPUExecutionProvider"]


def test_a_tensorrt_probe_that_lands_on_the_cpu_says_what_cuda_needs(gpu, capfd):
    gpu.fails = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
    why = probe_device("tensorrt")
    assert why.startswith("TensorrtExecutionProvider did not load (libnvinfer.so.10: cannot open shared object file; ")
    assert "needs CUDA 13.* and cuDNN 9.*" in why
    assert capfd.readouterr() == ("", "")


PROBE_ONLY = _line(WARN, "W", "tensorrt_execution_provider.cc:2533 GetCapability",
                   "[TensorRT EP] No graph will run on TensorRT execution provider")


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_a_probe_that_loads_passes_onnxruntimes_warnings_on(gpu, capfd, device):
    gpu.chatter = CUDNN_OLD + PROBE_ONLY
    assert probe_device(device) is None
    out, err = capfd.readouterr()
    assert out == "" and "\x1b[" not in err
    # What the provider said, not what the probe's own graph made it say.
    assert err.splitlines() == ["2026-03-02 10:11:12.123456789 [W:onnxruntime:Default, cuda_execution_provider.cc:"
                                "210 CUDAExecutionProvider] cuDNN 9.1 is older than the 9.13 this onnxruntime was "
                                "built with"]


def test_an_unknown_failure_keeps_onnxruntimes_first_error(gpu, capfd):
    gpu.fails = {"CUDAExecutionProvider"}
    gpu.logs = {"CUDAExecutionProvider": _line(WARN, "W", "x.cc:1 F", "a warning first")
                + _line(ERROR, "E", "cuda_call.cc:123 CudaCall", "CUDA failure 35: CUDA driver version is "
                                                                  "insufficient for CUDA runtime version")}
    why = probe_device("cuda")
    assert "CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version" in why
    assert "a warning first" not in why
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_the_models_own_session_is_not_captured(gpu, tmp_path, capfd, device):
    """A TensorRT build takes minutes: its warnings reach the terminal as they come."""
    gpu.chatter = CUDNN_OLD
    Runner(load_model(tiny_onnx(tmp_path / "tiny.onnx")), device)
    assert "cuDNN 9.1 is older than the 9.13" in capfd.readouterr().err
