"""onnxruntime-gpu on a machine whose CUDA libraries are missing or of another version: the
probe keeps onnxruntime's native (C++, fd 2) log off the terminal and says in one line which
library failed and which CUDA and cuDNN this onnxruntime-gpu needs, in the warning and in every
store manifest's ``device_fallback``.

This machine has the CPU onnxruntime, so onnxruntime-gpu's failures are played by a stand-in
session that writes what onnxruntime-gpu 1.2x / 1.3x write, byte for byte in shape (the
colour codes of its log sink, its timestamps and source locations), to file descriptor 2
itself, as the C++ logger does. That the capture holds real native output is checked in a
subprocess with the real onnxruntime's verbose log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import onnxruntime
import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.errors import EnsError
from ensemble.inference import engine as engine_module
from ensemble.inference import runtime
from ensemble.inference.runtime import cuda_failure, load_failure, native_log, probe_device

from tests.ensemble.conftest import write_images

WARN, ERROR, END = "\x1b[0;93m", "\x1b[1;31m", "\x1b[m"  # onnxruntime's ostream_sink colours


def _line(colour: str, level: str, where: str, text: str) -> str:
    return f"{colour}2026-03-02 10:11:12.123456789 [{level}:onnxruntime:Default, {where}] {text}{END}\n"


# onnxruntime-gpu 1.20 on Linux, cuDNN 9 missing.
LINUX_120 = (
    _line(ERROR, "E", "provider_bridge_ort.cc:1862 TryGetProviderInfo_CUDA",
          "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1539 onnxruntime::Provider& "
          "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
          "libonnxruntime_providers_cuda.so with error: libcudnn_adv.so.9: cannot open shared object file: "
          "No such file or directory")
    + "\n"
    + _line(WARN, "W", "onnxruntime_pybind_state.cc:993 CreateExecutionProviderInstance",
            "Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*. Please install all "
            "dependencies as mentioned in the GPU requirements page (https://onnxruntime.ai/docs/"
            "execution-providers/CUDA-ExecutionProvider.html#requirements), make sure they're in the PATH, "
            "and that your GPU is supported.")
)
# onnxruntime-gpu 1.31 on Linux without CUDA 13: the provider library's full path.
LINUX_131 = (
    _line(ERROR, "E", "provider_bridge_ort.cc:2251 TryGetProviderInfo_CUDA",
          "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1844 onnxruntime::Provider& "
          "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
          "/venv/lib/python3.12/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: "
          "libcublasLt.so.13: cannot open shared object file: No such file or directory")
    + "\n"
    + _line(WARN, "W", "onnxruntime_pybind_state.cc:1014 CreateExecutionProviderInstance",
            "Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*. Please install all "
            "dependencies as mentioned in the GPU requirements page (https://onnxruntime.ai/docs/"
            "execution-providers/CUDA-ExecutionProvider.html#requirements), make sure they're in the PATH, "
            "and that your GPU is supported.")
)
# onnxruntime-gpu 1.2x on Windows.
WINDOWS_DEPENDS = _line(
    ERROR, "E", "provider_bridge_ort.cc:2036 onnxruntime::TryGetProviderInfo_CUDA",
    'D:\\a\\_work\\1\\s\\onnxruntime\\core\\session\\provider_bridge_ort.cc:1695 onnxruntime::ProviderLibrary::Get '
    '[ONNXRuntimeError] : 1 : FAIL : Error loading "C:\\env\\Lib\\site-packages\\onnxruntime\\capi\\'
    'onnxruntime_providers_cuda.dll" which depends on "cublasLt64_12.dll" which is missing. '
    '(Error 126: "The specified module could not be found.")')
WINDOWS_119 = _line(
    ERROR, "E", "provider_bridge_ort.cc:1992 onnxruntime::TryGetProviderInfo_CUDA",
    'D:\\a\\_work\\1\\s\\onnxruntime\\core\\session\\provider_bridge_ort.cc:1637 onnxruntime::ProviderLibrary::Get '
    '[ONNXRuntimeError] : 1 : FAIL : LoadLibrary failed with error 126 "" when trying to load '
    '"c:\\env\\Lib\\site-packages\\onnxruntime\\capi\\onnxruntime_providers_cuda.dll"')
# A provider library built against other CUDA libraries than the ones found.
UNDEFINED = _line(
    ERROR, "E", "provider_bridge_ort.cc:1862 TryGetProviderInfo_CUDA",
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1539 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "libonnxruntime_providers_cuda.so with error: /venv/lib/python3.11/site-packages/onnxruntime/capi/"
    "libonnxruntime_providers_cuda.so: undefined symbol: cublasLtMatmulAlgoGetHeuristic, version libcublasLt.so.12")

GPU_131 = {"package_name": "onnxruntime-gpu", "__version__": "1.31.1", "cuda_version": "13.0",
           "cudnn_version": "9.13"}


@pytest.mark.parametrize("log, cause", [
    (LINUX_120, "libcudnn_adv.so.9: cannot open shared object file"),
    (LINUX_131, "libcublasLt.so.13: cannot open shared object file"),
    (WINDOWS_DEPENDS, "cublasLt64_12.dll is missing (onnxruntime_providers_cuda.dll needs it)"),
    (WINDOWS_119, "onnxruntime_providers_cuda.dll: LoadLibrary error 126 (a DLL it needs is missing)"),
    (UNDEFINED, "libonnxruntime_providers_cuda.so: undefined symbol cublasLtMatmulAlgoGetHeuristic "
                "(its CUDA libraries are of another version)"),
    ("", None),
    ("EP Error something else\n", None),
], ids=["linux-1.20", "linux-1.31", "windows-depends", "windows-1.19", "undefined-symbol", "silent", "other"])
def test_the_failing_library_is_read_from_onnxruntimes_log(log, cause):
    assert load_failure(log) == cause


@pytest.mark.parametrize("log, info, expected", [
    (LINUX_131, GPU_131, "CUDAExecutionProvider did not load (libcublasLt.so.13: cannot open shared object "
                         "file; onnxruntime-gpu 1.31.1 needs CUDA 13.* and cuDNN 9.* (built with CUDA 13.0, "
                         "cuDNN 9.13))"),
    (LINUX_120, {"package_name": "onnxruntime-gpu", "__version__": "1.20.1"},
     "CUDAExecutionProvider did not load (libcudnn_adv.so.9: cannot open shared object file; "
     "onnxruntime-gpu 1.20.1 needs CUDA 12.* and cuDNN 9.*)"),
    ("", {"package_name": "onnxruntime-gpu", "__version__": "1.22.0", "cuda_version": "12.8"},
     "CUDAExecutionProvider did not load (onnxruntime fell back to the CPU: the CUDA or cuDNN libraries it needs "
     "are missing or do not match; onnxruntime-gpu 1.22.0 is built with CUDA 12.8)"),
    ("", {"package_name": "onnxruntime", "__version__": "1.32.0"},
     "CUDAExecutionProvider did not load (onnxruntime fell back to the CPU: the CUDA or cuDNN libraries it needs "
     "are missing or do not match)"),
], ids=["1.31-both", "1.20-log-only", "build-info-only", "nothing"])
def test_the_reason_names_the_library_and_the_versions_needed(log, info, expected):
    assert cuda_failure(log, None, info) == expected


def test_a_raised_failure_keeps_its_text_and_gains_what_the_log_adds():
    error = RuntimeError("CUDA_PATH is set but CUDA wasn't able to be loaded. Please install the correct "
                         "version of CUDA and cuDNN as mentioned in the GPU requirements page")
    assert cuda_failure(LINUX_131, error, GPU_131) == (
        "CUDAExecutionProvider failed to load (RuntimeError: CUDA_PATH is set but CUDA wasn't able to be loaded. "
        "Please install the correct version of CUDA and cuDNN as mentioned in the GPU requirements page; "
        "libcublasLt.so.13: cannot open shared object file; onnxruntime-gpu 1.31.1 needs CUDA 13.* and "
        "cuDNN 9.* (built with CUDA 13.0, cuDNN 9.13))")
    # The library already in the exception's text is not said twice.
    error = RuntimeError("libcublasLt.so.13: cannot open shared object file")
    assert cuda_failure(LINUX_131, error, {}) == (
        "CUDAExecutionProvider failed to load (RuntimeError: libcublasLt.so.13: cannot open shared object file; "
        "this onnxruntime needs CUDA 13.* and cuDNN 9.*)")


def test_build_info_is_read_from_onnxruntime(monkeypatch):
    import onnxruntime.capi.build_and_package_info as info

    for key, value in GPU_131.items():
        monkeypatch.setattr(info, key, value, raising=False)
    assert {k: runtime.build_info()[k] for k in GPU_131} == GPU_131


class _GpuBuildWithoutCuda:
    """onnxruntime-gpu's ``InferenceSession`` where CUDA does not load: asked for a GPU provider,
    writes ``log`` to fd 2 as its C++ logger does (and, with ``printed``, the Python fallback's
    lines to stdout); runs on the CPU."""

    log = LINUX_131
    printed = ""
    real = onnxruntime.InferenceSession

    def __init__(self, source, options=None, providers=None, **kw):
        if any((p if isinstance(p, str) else p[0]) != "CPUExecutionProvider" for p in providers or ()):
            os.write(2, self.log.encode())
            if self.printed:
                print(self.printed)
        self._session = self.real(source, options, providers=["CPUExecutionProvider"], **kw)

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def no_cuda(monkeypatch):
    import onnxruntime.capi.build_and_package_info as info

    for key, value in GPU_131.items():
        monkeypatch.setattr(info, key, value, raising=False)
    monkeypatch.setattr(engine_module, "available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", _GpuBuildWithoutCuda)
    return _GpuBuildWithoutCuda


def test_the_probe_keeps_the_native_log_quiet_and_reads_it(no_cuda, capfd):
    why = probe_device("cuda")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert why == ("CUDAExecutionProvider did not load (libcublasLt.so.13: cannot open shared object file; "
                   "onnxruntime-gpu 1.31.1 needs CUDA 13.* and cuDNN 9.* (built with CUDA 13.0, cuDNN 9.13))")


def test_the_python_fallbacks_prints_are_kept_quiet_too(no_cuda, capfd, monkeypatch):
    monkeypatch.setattr(no_cuda, "printed", "*************** EP Error ***************\nEP Error CUDA_PATH is set")
    assert "libcublasLt.so.13" in probe_device("cuda")
    assert capfd.readouterr() == ("", "")


def test_auto_warns_in_one_line_and_records_it(no_cuda, tmp_path, capfd):
    tiny = __import__("tests.ensemble.conftest", fromlist=["tiny_onnx"]).tiny_onnx(tmp_path / "m" / "tiny.onnx")
    write_images(tmp_path / "imgs", [(40, 30)])
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["infer", str(tiny), "--index", str(tmp_path / "imgs"), "--workers", "0",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    native = capfd.readouterr()
    assert "onnxruntime" not in native.err + native.out and "\x1b[" not in native.err + native.out
    reason = ("--device auto: CUDAExecutionProvider did not load (libcublasLt.so.13: cannot open shared object "
              "file; onnxruntime-gpu 1.31.1 needs CUDA 13.* and cuDNN 9.* (built with CUDA 13.0, cuDNN 9.13)); "
              "running on the CPU")
    assert f"warning: {reason}" in result.output.splitlines()
    assert "\x1b[" not in result.output
    manifest = json.loads((out / "tiny" / "imgs" / "manifest.json").read_text())
    assert manifest["device_fallback"] == reason and manifest["device"] == "cpu"
    # Asked for by name: the same reason, as the error.
    result = CliRunner().invoke(app, ["infer", str(tiny), "--index", str(tmp_path / "imgs"), "--workers", "0",
                                      "--out", str(tmp_path / "other"), "--device", "cuda"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: --device cuda: CUDAExecutionProvider did not load "
                                            "(libcublasLt.so.13: cannot open shared object file; ")
    assert capfd.readouterr().err == ""


def test_a_tensorrt_that_does_not_load_names_its_library(tmp_path, monkeypatch, capfd):
    """TensorRT's library missing: onnxruntime falls back to CUDA. The probe (a one-node graph
    with TensorRT first) says so in one line, before any model opens; were the model's own
    session to fall back anyway, onnxruntime's log of it is left on the terminal, not swallowed."""
    tiny = __import__("tests.ensemble.conftest", fromlist=["tiny_onnx"]).tiny_onnx(tmp_path / "tiny.onnx")
    write_images(tmp_path / "imgs", [(40, 30)])
    log = _line(ERROR, "E", "provider_bridge_ort.cc:1862 TryGetProviderInfo_TensorRT",
                "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1539 onnxruntime::Provider& "
                "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
                "libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: cannot open shared object "
                "file: No such file or directory")

    class Session(_GpuBuildWithoutCuda):
        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(Session, "log", log)
    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    monkeypatch.setattr(engine_module, "available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    result = CliRunner().invoke(app, ["infer", str(tiny), "--index", str(tmp_path / "imgs"), "--workers", "0",
                                      "--out", str(tmp_path / "runs"), "--device", "tensorrt"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: --device tensorrt: TensorrtExecutionProvider did not load (libnvinfer.so.10: cannot open shared "
        "object file); check the CUDA / cuDNN / TensorRT libraries it needs")
    assert capfd.readouterr().err == ""
    with pytest.raises(EnsError) as caught:
        runtime.Runner(runtime.load_model(tiny), "tensorrt")
    assert str(caught.value) == (
        f"{tiny}: TensorrtExecutionProvider did not load (onnxruntime fell back to CUDAExecutionProvider; its log "
        "above says why); check the CUDA / cuDNN / TensorRT libraries it needs")
    assert "libnvinfer.so.10: cannot open shared object file" in capfd.readouterr().err


def test_the_capture_holds_onnxruntimes_real_native_log(tmp_path):
    """The real C++ logger, at its most verbose, writes only into the capture; fd 2 is back after."""
    script = textwrap.dedent("""
        import os, sys
        import onnxruntime as ort
        from ensemble.inference.runtime import native_log
        ort.set_default_logger_severity(0)
        options = ort.SessionOptions()
        options.log_severity_level = 0
        with native_log() as log:
            ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
        assert "[I:onnxruntime:" in log.text or "[V:onnxruntime:" in log.text, log.text[:300]
        os.write(2, b"fd 2 is back\\n")
    """)
    model = __import__("tests.ensemble.conftest", fromlist=["tiny_onnx"]).tiny_onnx(tmp_path / "tiny.onnx")
    done = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "fd 2 is back\n"
    assert done.stdout == ""


def test_the_capture_gives_fd_2_back_when_the_block_raises(capfd):
    with pytest.raises(ZeroDivisionError):
        with native_log():
            os.write(2, b"swallowed\n")
            1 / 0
    os.write(2, b"seen\n")
    assert capfd.readouterr().err == "seen\n"


def test_captures_nest_and_each_gives_back_its_own(capfd):
    with native_log() as outer:
        os.write(2, b"outer\n")
        with native_log() as inner:
            os.write(2, b"inner\n")
        os.write(2, b"outer again\n")
    os.write(2, b"seen\n")
    assert (outer.text, inner.text) == ("outer\nouter again\n", "inner\n")
    assert capfd.readouterr().err == "seen\n"
