"""The GPU path without a GPU, through a run: the TensorRT cache folder and profiles, the GPU
options from the command line down to the providers every onnxruntime session is opened with
(`ens infer --device cuda / tensorrt`, recorded at ``onnxruntime.InferenceSession``), and
``--device auto`` falling back to the CPU loudly when CUDA is listed but cannot run (each
device's provider options as a pure function: test_runtime.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil

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
from ensemble.formats.model import read_metadata
from ensemble.formats.store import read_store

from tests.ensemble.conftest import replace_metadata, write_images

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


class _Sessions:
    """Stands in for ``onnxruntime.InferenceSession`` on a GPU build: records the ``providers``
    each session is opened with (``"probe"`` for :func:`runtime.probe_device`'s one-node graph,
    else the model file's name) and opens a CPU session that reports the asked-for providers as
    its own, as one whose CUDA libraries load does."""

    opened: list = []
    real = onnxruntime.InferenceSession

    def __init__(self, source, options=None, providers=None, **kw):
        _Sessions.opened.append((source.rsplit("/", 1)[-1] if isinstance(source, str) else "probe", providers))
        self._session = _Sessions.real(source, options, providers=["CPUExecutionProvider"], **kw)
        self._providers = [p if isinstance(p, str) else p[0] for p in providers]

    def get_providers(self):
        return self._providers

    def __getattr__(self, name):
        return getattr(self._session, name)


def _cuda(search: str, limit: int | None = None) -> tuple[str, dict]:
    options = {"cudnn_conv_algo_search": search, "arena_extend_strategy": "kSameAsRequested",
               "do_copy_in_default_stream": True}
    return ("CUDAExecutionProvider", options if limit is None else {**options, "gpu_mem_limit": limit})


@pytest.fixture
def gpu_build(monkeypatch):
    """onnxruntime-gpu as ``ens infer`` sees it, without a GPU: TensorRT and CUDA listed, every
    session opened through :class:`_Sessions`."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(GPU))
    monkeypatch.setattr(onnxruntime, "InferenceSession", _Sessions)
    _Sessions.opened = []
    return _Sessions.opened


def _infer(*args) -> None:
    result = CliRunner().invoke(app, ["infer", *map(str, args), "--workers", "0"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("flags, cuda", [
    ((), _cuda("HEURISTIC")),
    (("--cudnn-search", "exhaustive", "--gpu-mem-limit", "1.5"), _cuda("EXHAUSTIVE", 3 << 29)),
    (("--cudnn-search", "default"), _cuda("DEFAULT")),
], ids=["defaults", "search-and-limit", "search"])
def test_cuda_sessions_get_the_gpu_options_given_to_ens_infer(tiny, tmp_path, gpu_build, flags, cuda):
    write_images(tmp_path / "imgs", [(40, 30)])
    _infer(tiny, "--index", tmp_path / "imgs", "--device", "cuda", "--out", tmp_path / "runs", *flags)
    # The probe that the libraries load, then the model's session: the same CUDA options.
    assert gpu_build == [("probe", [cuda, "CPUExecutionProvider"]), ("tiny.onnx", [cuda, "CPUExecutionProvider"])]
    assert json.loads((tmp_path / "runs" / "tiny" / "imgs" / "manifest.json").read_text())["device"] == "cuda"


def test_tensorrt_sessions_get_profiles_fp16_the_cache_and_the_gpu_options(tiny, tmp_path, gpu_build):
    half = tiny.with_name("half.onnx")
    shutil.copy(tiny, half)
    replace_metadata(half, dataclasses.replace(read_metadata(half), precision="fp16"))
    write_images(tmp_path / "imgs", [(40, 30), (30, 40)])
    out = tmp_path / "fresh" / "runs"
    _infer(tiny, half, "--index", tmp_path / "imgs", "--device", "tensorrt", "--tta", "scale", "--scales",
           "0.875,1.143", "--batch-size", 2, "--cudnn-search", "default", "--gpu-mem-limit", 2, "--out", out)
    cuda = _cuda("DEFAULT", 2 << 30)
    cache = str(out / ".trt-cache")
    shapes = "image:{n}x28x28x3,image:{n}x32x32x3,image:{n}x37x37x3"  # 32 px and its scales, 1 to 2 images

    def trt(fp16: bool) -> tuple[str, dict]:
        return ("TensorrtExecutionProvider", {
            "trt_fp16_enable": fp16, "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
            "trt_engine_cache_path": cache, "trt_timing_cache_path": cache, "trt_max_workspace_size": 2 << 30,
            "trt_profile_min_shapes": shapes.format(n=1), "trt_profile_opt_shapes": shapes.format(n=2),
            "trt_profile_max_shapes": shapes.format(n=2)})

    # The probe loads TensorRT without building an engine; a float16 model gets float16 engines without --trt-fp16.
    probe_trt = ("TensorrtExecutionProvider", {"trt_min_subgraph_size": 1000})
    assert gpu_build == [("probe", [probe_trt, cuda, "CPUExecutionProvider"]),
                         ("tiny.onnx", [trt(False), cuda, "CPUExecutionProvider"]),
                         ("half.onnx", [trt(True), cuda, "CPUExecutionProvider"])]
    gpu_build.clear()
    again = tmp_path / "again"
    _infer(tiny, "--index", tmp_path / "imgs", "--device", "tensorrt", "--trt-fp16", "--out", again)
    cache = str(again / ".trt-cache")
    assert gpu_build == [("probe", [probe_trt, _cuda("HEURISTIC"), "CPUExecutionProvider"]), ("tiny.onnx", [
        ("TensorrtExecutionProvider", {
            "trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
            "trt_engine_cache_path": cache, "trt_timing_cache_path": cache,
            "trt_profile_min_shapes": "image:1x32x32x3", "trt_profile_opt_shapes": "image:32x32x32x3",
            "trt_profile_max_shapes": "image:32x32x32x3"}),
        _cuda("HEURISTIC"), "CPUExecutionProvider"])]
