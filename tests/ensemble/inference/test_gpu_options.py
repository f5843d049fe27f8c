"""The GPU path without a GPU, through a run: the TensorRT cache folder and profiles, the GPU
options from the command line, and ``--device auto`` falling back to the CPU loudly when CUDA
is listed but cannot run (each device's provider options: test_runtime.py)."""

from __future__ import annotations

import json

import onnxruntime
import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.formats.dataset import load_split
from ensemble.errors import EnsError
from ensemble.inference import engine as engine_module
from ensemble.inference import forward as forward_module
from ensemble.inference import run as run_module
from ensemble.inference import runtime
from ensemble.inference.run import InferOptions, infer
from ensemble.inference.runtime import GpuOptions, Runner
from ensemble.formats.store import read_store

from tests.ensemble.conftest import write_images

GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("options, message", [
    (InferOptions(cudnn_search="fast"), "--cudnn-search fast: choose from heuristic, exhaustive, default"),
    (InferOptions(gpu_mem_limit=0), "--gpu-mem-limit 0: must be a number of GiB above 0"),
])
def test_bad_gpu_options_are_one_line(tiny, tmp_path, options, message):
    write_images(tmp_path / "imgs", [(40, 30)])
    with pytest.raises(EnsError, match=message):
        infer([tiny], [load_split(tmp_path / "imgs")], options)


class _Recording(Runner):
    """The CPU runner, recording what the run asked for (device, options, shapes)."""

    calls: list = []

    def __init__(self, model, device, gpu=GpuOptions(), *, images=32, sizes=()):
        cache = gpu.trt_cache
        _Recording.calls.append((device, gpu, images, tuple(sizes), cache is not None and cache.is_dir()))
        super().__init__(model, "cpu", images=images, sizes=sizes)


def test_tensorrt_run_creates_its_cache_folder_before_the_sessions_open(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "available_providers", lambda: GPU)
    monkeypatch.setattr(engine_module, "probe_device", lambda device, gpu: None)
    monkeypatch.setattr(forward_module, "Runner", _Recording)
    _Recording.calls = []
    write_images(tmp_path / "imgs", [(40, 30), (30, 40)])
    out = tmp_path / "fresh" / "runs"  # neither exists yet: TensorRT would make only the last level
    infer([tiny], [load_split(tmp_path / "imgs")],
          InferOptions(device="tensorrt", tta=("scale",), scales=(0.875, 1.143), batch_size=2, workers=0,
                       out=out, trt_fp16=True))
    [(device, gpu, images, sizes, existed)] = _Recording.calls
    assert device == "tensorrt" and existed and gpu.trt_cache == out / ".trt-cache" and gpu.trt_fp16
    assert (images, sorted(sizes)) == (2, [28, 32, 37])


def test_auto_falls_back_loudly_when_cuda_is_listed_but_does_not_load(tiny, tmp_path, monkeypatch):
    # A CPU onnxruntime asked for CUDA falls back to the CPU, as onnxruntime-gpu does when libcudnn is missing.
    monkeypatch.setattr(engine_module, "available_providers", lambda: GPU[1:])
    write_images(tmp_path / "imgs", [(40, 30)])
    events = []
    result = infer([tiny], [load_split(tmp_path / "imgs")], InferOptions(workers=0, out=tmp_path / "runs"),
                   events.append)
    assert (result.device, result.provider) == ("cpu", "CPUExecutionProvider")
    assert events[0].message.startswith("warning: --device auto: CUDAExecutionProvider ")
    assert events[0].message.endswith("; running on the CPU")
    manifest = read_store(result.stores[0].path).manifest
    assert manifest["device"] == "cpu" and manifest["device_fallback"] == events[0].message[len("warning: "):]
    assert "--device cpu" in manifest["command"]


def test_a_cuda_library_that_fails_to_load_does_not_crash_auto(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "available_providers", lambda: GPU[1:])
    real = onnxruntime.InferenceSession

    def session(source, options=None, providers=None, **kw):
        if any("CUDA" in (p if isinstance(p, str) else p[0]) for p in providers or ()):
            raise RuntimeError("libcudnn.so.9: cannot open shared object file")
        return real(source, options, providers=providers, **kw)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    write_images(tmp_path / "imgs", [(40, 30)])
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["infer", str(tiny), "--index", str(tmp_path / "imgs"), "--workers", "0",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert ("warning: --device auto: CUDAExecutionProvider failed to load (RuntimeError: libcudnn.so.9: "
            "cannot open shared object file); running on the CPU") in result.output
    manifest = json.loads((out / "tiny" / "imgs" / "manifest.json").read_text())
    assert manifest["device_fallback"].startswith("--device auto: CUDAExecutionProvider failed to load")
    # Asked for by name, the same failure is one line, not a fallback.
    result = CliRunner().invoke(app, ["infer", str(tiny), "--index", str(tmp_path / "imgs"), "--workers", "0",
                                      "--out", str(out), "--device", "cuda"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: --device cuda: CUDAExecutionProvider failed to load")


def test_a_cpu_only_onnxruntime_is_not_a_fallback(tiny, tmp_path):
    if "CUDAExecutionProvider" in runtime.available_providers():
        pytest.skip("this machine has CUDA")
    write_images(tmp_path / "imgs", [(40, 30)])
    events = []
    result = infer([tiny], [load_split(tmp_path / "imgs")], InferOptions(workers=0, out=tmp_path / "runs"),
                   events.append)
    assert not any(e.message.startswith("warning") for e in events)
    assert read_store(result.stores[0].path).manifest["device_fallback"] is None


def test_gpu_options_reach_the_library_from_the_cli(tiny, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(run_module, "_check_options", lambda options: seen.append(options) or _stop())
    args = ["infer", str(tiny), "--index", str(tmp_path), "--out", str(tmp_path / "runs")]
    write_images(tmp_path / "imgs", [(40, 30)])
    args[3] = str(tmp_path / "imgs")
    CliRunner().invoke(app, args)
    CliRunner().invoke(app, args + ["--cudnn-search", "exhaustive", "--gpu-mem-limit", "2.5", "--trt-fp16"])
    assert [(o.cudnn_search, o.gpu_mem_limit, o.trt_fp16) for o in seen] == [
        ("heuristic", None, False), ("exhaustive", 2.5, True)]
    monkeypatch.undo()
    result = CliRunner().invoke(app, args + ["--cudnn-search", "fast"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --cudnn-search fast: choose from heuristic, exhaustive, default"


def _stop():
    raise EnsError("stopped by the test")
