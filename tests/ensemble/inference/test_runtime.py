"""onnxruntime's side of inference, without a GPU: the providers and options each device gets
(:func:`session_providers`, a pure function), choosing a device, the GPU options' checks, the
TensorRT cache folder and the one-line failure of a run."""

from __future__ import annotations

import pytest

from ensemble.errors import EnsError
from ensemble.inference.runtime import (DEVICES, GpuOptions, check_gpu_options, cpu_threads, device_choices,
                                        prepare_trt_cache, probe_device, run_failure, select_device,
                                        session_providers, trt_profile)

GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CUDA_DEFAULTS = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested",
                 "do_copy_in_default_stream": True}


def test_cpu_gets_no_gpu_options():
    assert session_providers("cpu", GpuOptions(gpu_mem_limit=2, trt_fp16=True)) == ["CPUExecutionProvider"]


def test_cuda_options_default_and_given():
    assert session_providers("cuda") == [("CUDAExecutionProvider", CUDA_DEFAULTS), "CPUExecutionProvider"]
    given = session_providers("cuda", GpuOptions(cudnn_search="exhaustive", gpu_mem_limit=1.5))
    assert given == [("CUDAExecutionProvider", {**CUDA_DEFAULTS, "cudnn_conv_algo_search": "EXHAUSTIVE",
                                                "gpu_mem_limit": 3 << 29}), "CPUExecutionProvider"]


def test_tensorrt_options_profiles_fp16_and_caches(tmp_path):
    cache = tmp_path / "runs" / ".trt-cache"
    providers = session_providers("tensorrt", GpuOptions(trt_cache=cache), input_name="image", images=16,
                                  sizes=[256, 224, 196, 224], fp16=True)
    name, trt = providers[0]
    assert name == "TensorrtExecutionProvider"
    assert trt == {
        "trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
        "trt_engine_cache_path": str(cache), "trt_timing_cache_path": str(cache),
        # One profile per input size, 1 to --batch-size images each.
        "trt_profile_min_shapes": "image:1x196x196x3,image:1x224x224x3,image:1x256x256x3",
        "trt_profile_opt_shapes": "image:16x196x196x3,image:16x224x224x3,image:16x256x256x3",
        "trt_profile_max_shapes": "image:16x196x196x3,image:16x224x224x3,image:16x256x256x3",
    }
    assert providers[1:] == [("CUDAExecutionProvider", CUDA_DEFAULTS), "CPUExecutionProvider"]
    fp32 = dict(session_providers("tensorrt", GpuOptions(), sizes=[224])[0][1])
    assert fp32["trt_fp16_enable"] is False and "trt_engine_cache_path" not in fp32
    assert session_providers("tensorrt", GpuOptions(trt_fp16=True), sizes=[224])[0][1]["trt_fp16_enable"] is True


def test_a_memory_limit_bounds_the_cuda_arena_and_the_tensorrt_workspace_alike(tmp_path):
    providers = session_providers("tensorrt", GpuOptions(cudnn_search="default", gpu_mem_limit=2, trt_fp16=True,
                                                         trt_cache=tmp_path), input_name="x", images=4, sizes=[64])
    assert providers == [
        ("TensorrtExecutionProvider", {
            "trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
            "trt_engine_cache_path": str(tmp_path), "trt_timing_cache_path": str(tmp_path),
            "trt_max_workspace_size": 2147483648,
            "trt_profile_min_shapes": "x:1x64x64x3", "trt_profile_opt_shapes": "x:4x64x64x3",
            "trt_profile_max_shapes": "x:4x64x64x3"}),
        ("CUDAExecutionProvider", {**CUDA_DEFAULTS, "cudnn_conv_algo_search": "DEFAULT", "gpu_mem_limit": 2147483648}),
        "CPUExecutionProvider",
    ]
    # Without sizes, no profiles: TensorRT builds per shape.
    assert not any(k.startswith("trt_profile") for k in session_providers("tensorrt")[0][1])


def test_tensorrt_profiles_take_each_size_once_in_order():
    assert trt_profile("image", 8, [299, 224, 299]) == {
        "trt_profile_min_shapes": "image:1x224x224x3,image:1x299x299x3",
        "trt_profile_opt_shapes": "image:8x224x224x3,image:8x299x299x3",
        "trt_profile_max_shapes": "image:8x224x224x3,image:8x299x299x3"}


def test_every_device_lists_its_provider_first_and_the_cpu_last():
    assert device_choices() == ("auto", "cpu", "cuda", "tensorrt")
    for device, providers in DEVICES.items():
        assert providers[-1] == "CPUExecutionProvider"
        first = session_providers(device)[0]
        assert (first if isinstance(first, str) else first[0]) == providers[0]


def test_device_selection():
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_device("auto", cpu_only) == "cpu"
    assert select_device("auto", gpu) == "cuda"  # TensorRT only on request
    assert select_device("tensorrt", gpu) == "tensorrt"
    assert select_device("cpu", gpu) == "cpu"
    with pytest.raises(EnsError, match="--device cuda: this onnxruntime offers only AzureExecutionProvider, "
                                       "CPUExecutionProvider, not CUDAExecutionProvider; install onnxruntime-gpu"):
        select_device("cuda", cpu_only)
    with pytest.raises(EnsError, match="--device tpu: choose from auto, cpu, cuda, tensorrt"):
        select_device("tpu", cpu_only)


def test_auto_on_an_onnxruntime_without_cuda_is_the_cpu_and_the_cpu_needs_no_probe():
    assert select_device("auto", ["CPUExecutionProvider"]) == "cpu"
    assert probe_device("cpu") is None  # nothing to load: no session opened


@pytest.mark.parametrize("options, message", [
    (GpuOptions(cudnn_search="fast"), "--cudnn-search fast: choose from heuristic, exhaustive, default"),
    (GpuOptions(gpu_mem_limit=0), "--gpu-mem-limit 0: must be a number of GiB above 0"),
    (GpuOptions(gpu_mem_limit=-1.5), "--gpu-mem-limit -1.5: must be a number of GiB above 0"),
    (GpuOptions(gpu_mem_limit=float("inf")), "--gpu-mem-limit inf: must be a number of GiB above 0"),
    (GpuOptions(gpu_mem_limit=float("nan")), "--gpu-mem-limit nan: must be a number of GiB above 0"),
])
def test_bad_gpu_options_name_the_flag(options, message):
    with pytest.raises(EnsError) as error:
        check_gpu_options(options)
    assert str(error.value) == message


def test_good_gpu_options_pass():
    for search in ("heuristic", "exhaustive", "default"):
        check_gpu_options(GpuOptions(cudnn_search=search, gpu_mem_limit=0.5))
    check_gpu_options(GpuOptions())


def test_the_tensorrt_cache_folder_is_made_with_its_parents_or_named(tmp_path):
    folder = tmp_path / "new" / "runs" / ".trt-cache"
    assert prepare_trt_cache(folder) == folder and folder.is_dir()
    assert prepare_trt_cache(folder) == folder  # there already: fine
    (tmp_path / "file").write_text("")
    with pytest.raises(EnsError, match=r"file/.trt-cache: cannot create the TensorRT cache folder \(Not a directory\)"):
        prepare_trt_cache(tmp_path / "file" / ".trt-cache")


def test_a_run_failure_is_one_line_with_a_hint(tmp_path):
    memory = run_failure(tmp_path / "m.onnx", (32, 224, 224, 3), RuntimeError("CUDA failure 2: out of memory\nmore"))
    assert memory == (f"{tmp_path / 'm.onnx'}: onnxruntime failed on a (32, 224, 224, 3) uint8 batch (RuntimeError: "
                      "CUDA failure 2: out of memory more); out of memory: a smaller --batch-size bounds the images "
                      "of every forward pass (one pass per view); the chunks already saved are kept")
    shape = run_failure(tmp_path / "m.onnx", (8, 300, 300, 3), ValueError(""))
    assert shape.startswith(f"{tmp_path / 'm.onnx'}: onnxruntime failed on a (8, 300, 300, 3) uint8 batch "
                            "(ValueError); the graph refuses 300x300 inputs or this batch;")


def test_cpu_threads_counts_the_cores_this_process_may_use():
    import os

    assert 1 <= cpu_threads() <= (os.cpu_count() or 1)
