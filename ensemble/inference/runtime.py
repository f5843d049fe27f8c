"""onnxruntime for inference: choosing the execution provider, opening models, running batches.

Every model runs through one contract, the one `ens export` writes: input uint8 RGB NHWC
``(batch, height, width, 3)``, output float32 logits ``(batch, classes)``, normalisation inside
the graph. An ONNX file from elsewhere (no ens metadata) is brought to that contract in memory
(:func:`adapt_foreign`): when it takes float NCHW input, a transpose, cast and the user's
``mean``/``std`` normalisation are prepended to its graph, so it too is fed raw bytes and, on a
GPU, normalised there. Its input size, mean and std come from the command line.

Devices (``--device``): ``cpu``; ``cuda`` (onnxruntime-gpu); ``tensorrt`` (TensorRT engines
cached under ``<out>/.trt-cache``, one profile per input size, CUDA and CPU as fallbacks for
unsupported nodes); ``auto`` takes CUDA when this onnxruntime offers it and it loads
(:func:`probe_device`), else CPU. ``auto`` never picks TensorRT on its own: its engines take
minutes to build, which must be asked for. GPU sessions get their settings from
:class:`GpuOptions` through :func:`session_providers`, a pure function the tests check.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ensemble.formats.dataset import check_regular_file
from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.formats.model import IMAGENET_MEAN, IMAGENET_STD, OUTPUT_NAME, PREFIX, ModelMetadata, rgb_text
from ensemble.inference.tta import Preprocess

#: ``--device`` -> onnxruntime providers, in priority order.
DEVICES: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
#: What ``--device auto`` tries, best first.
AUTO = ("cuda", "cpu")
_GPU_INSTALL = "install onnxruntime-gpu (pip install -e .[gpu] && pip uninstall -y onnxruntime)"


def device_choices() -> tuple[str, ...]:
    return ("auto", *DEVICES)


def select_device(requested: str, available: Sequence[str]) -> str:
    """The device to use for ``--device requested`` given onnxruntime's available providers.

    Raises :class:`EnsError` for an unknown name, or a device whose provider is not available.
    """
    if requested == "auto":
        return next(d for d in AUTO if DEVICES[d][0] in available)
    if requested not in DEVICES:
        raise EnsError(f"--device {requested}: choose from {', '.join(device_choices())}")
    provider = DEVICES[requested][0]
    if provider not in available:
        raise EnsError(f"--device {requested}: this onnxruntime offers only {', '.join(available)}, "
                       f"not {provider}; {_GPU_INSTALL}")
    return requested


def onnxruntime():
    """The onnxruntime module, with its telemetry switched off.

    onnxruntime 1.32 on Linux sends usage events to Microsoft from a background thread (through
    any HTTPS proxy it finds). ens runs where there is no internet (Kaggle notebooks with it
    off) and should send nothing anywhere, so every session ens opens comes after this.
    """
    import onnxruntime as ort

    ort.disable_telemetry_events()
    return ort


def available_providers() -> list[str]:
    return onnxruntime().get_available_providers()


@dataclass(frozen=True)
class ForeignPreprocess:
    """Preprocessing for ONNX files without ens metadata (from the command line).

    ``input_size`` may be left out when the graph's height and width are fixed; ``mean`` and
    ``std`` (fractions of 255) are required for a float NCHW graph and refused for a uint8 NHWC
    one, which normalises by itself. ``None`` in ``resize`` and ``crop_pct`` means center-crop
    and 0.875, the ImageNet evaluation recipe.
    """

    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: str | None = None
    crop_pct: float | None = None

    @property
    def given(self) -> bool:
        """Whether any option was set (they are refused when no model needs them)."""
        return any(v is not None for v in dataclasses.astuple(self))


@dataclass(frozen=True)
class Model:
    """An ONNX model ready to open: its contract, its bytes, its identity."""

    path: Path
    sha256: str
    metadata: ModelMetadata
    foreign: bool = False
    #: The adapted graph of a foreign model; ``None``: open the file itself.
    graph: bytes | None = None

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.of(self.metadata)


def load_model(path: str | os.PathLike, foreign: ForeignPreprocess | None = None) -> Model:
    """Read a model's contract: its ens metadata, or ``foreign`` for a file without any."""
    import onnx

    path = check_regular_file(path)
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for foreign bytes
        raise EnsError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    props = {p.key: p.value for p in graph.metadata_props}
    if PREFIX + "format" in props:
        metadata = ModelMetadata.from_props(props, str(path))
        outputs = [o.name for o in graph.graph.output]
        logits = next((o for o in graph.graph.output if o.name == OUTPUT_NAME), None)
        if logits is None:
            raise EnsError(f"{path}: has ens metadata but no {OUTPUT_NAME!r} output (its outputs: "
                           f"{', '.join(outputs)}); export it again with `ens export`")
        dims = logits.type.tensor_type.shape.dim
        width = _dim(dims[1]) if len(dims) == 2 else None
        if width is not None and width != metadata.num_classes:
            # class_ids name num_classes columns: another width would map scores to the wrong classes.
            raise EnsError(f"{path}: its metadata says {metadata.num_classes} classes, but its "
                           f"{OUTPUT_NAME!r} output has {width} columns; export it again with `ens export`")
        if metadata.cam is not None and metadata.cam not in outputs:
            raise EnsError(f"{path}: its metadata names a {metadata.cam!r} output, but the graph's outputs are "
                           f"{', '.join(outputs)}; export it again with `ens export`")
        return Model(path=path, sha256=sha256_file(path), metadata=metadata)
    return _load_foreign(path, graph, foreign or ForeignPreprocess())


def _load_foreign(path: Path, graph, pre: ForeignPreprocess) -> Model:
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(graph, str(path.parent))  # the adapted graph travels as bytes
    adapted, size, dynamic, classes = adapt_foreign(graph, pre, str(path))
    metadata = ModelMetadata(
        # 0 classes: the graph does not say; the logit store takes the count from the outputs.
        architecture=f"foreign:{path.name}", num_classes=classes or 0, input_size=size,
        mean=pre.mean or (0.0, 0.0, 0.0), std=pre.std or (1.0, 1.0, 1.0),
        resize=pre.resize or "center-crop", crop_pct=pre.crop_pct or 0.875, dynamic_size=dynamic,
    )
    return Model(path=path, sha256=sha256_file(path), metadata=metadata, foreign=True,
                 graph=adapted.SerializeToString())


def _dim(dim) -> int | None:
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def adapt_foreign(graph, pre: ForeignPreprocess, source: str):
    """Bring a foreign ONNX graph to the ens contract (uint8 NHWC ``image`` in).

    Returns ``(graph, input_size, dynamic_size, num_classes or None)``; raises
    :class:`EnsError` for a graph with other than one image input and one output, an input
    neither float NCHW nor uint8 NHWC with 3 channels, a fixed batch axis, or missing options.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    initializers = {i.name for i in graph.graph.initializer}
    inputs = [i for i in graph.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not graph.graph.output:
        raise EnsError(f"{source}: expected one image input and a logits output, found inputs "
                       f"{[i.name for i in inputs]}")
    tensor = inputs[0].type.tensor_type
    dims = [_dim(d) for d in tensor.shape.dim]
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    if len(dims) == 4 and tensor.elem_type in floats and dims[1] == 3:
        layout, height, width = "nchw", dims[2], dims[3]
    elif len(dims) == 4 and tensor.elem_type == TensorProto.UINT8 and dims[3] == 3:
        layout, height, width = "nhwc", dims[1], dims[2]
    else:
        kind = TensorProto.DataType.Name(tensor.elem_type)
        raise EnsError(f"{source}: input {inputs[0].name!r} is {kind} {dims}; a model without ens "
                       "metadata must take float NCHW (batch, 3, height, width) or uint8 NHWC "
                       "(batch, height, width, 3) images")
    if dims[0] is not None:
        raise EnsError(f"{source}: the batch axis is fixed at {dims[0]}; re-export it with a dynamic batch axis")
    fixed = height if height is not None and height == width else None
    size = pre.input_size or fixed
    if size is None:
        raise EnsError(f"{source}: has no ens metadata and takes any size; give --input-size")
    if (height, width) != (None, None) and (height, width) != (size, size):
        raise EnsError(f"{source}: takes {height}x{width} inputs, not --input-size {size}")
    out_dims = [_dim(d) for d in graph.graph.output[0].type.tensor_type.shape.dim]
    classes = out_dims[1] if len(out_dims) == 2 else None

    if layout == "nhwc":
        if pre.mean is not None or pre.std is not None:
            raise EnsError(f"{source}: takes uint8 NHWC images and normalises them itself; "
                           "drop --mean and --std")
        return graph, size, fixed is None, classes
    if pre.mean is None or pre.std is None:
        raise EnsError(f"{source}: has no ens metadata and takes float NCHW input; give --mean and "
                       f"--std (fractions of 255, e.g. {rgb_text(IMAGENET_MEAN)} and {rgb_text(IMAGENET_STD)})")
    mean = np.asarray(pre.mean, np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(pre.std, np.float64).reshape(1, 3, 1, 1)
    original = inputs[0].name
    dtype = np.float16 if tensor.elem_type == TensorProto.FLOAT16 else np.float32
    spatial = ["height", "width"] if fixed is None else [size, size]
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", *spatial, 3])
    if original == "image":
        raise EnsError(f"{source}: its float input is already named 'image'; rename it")
    nodes = [
        helper.make_node("Transpose", ["image"], ["ens_pre_nchw"], perm=[0, 3, 1, 2], name="ens_pre_transpose"),
        helper.make_node("Cast", ["ens_pre_nchw"], ["ens_pre_float"], to=tensor.elem_type, name="ens_pre_cast"),
        helper.make_node("Mul", ["ens_pre_float", "ens_pre_scale"], ["ens_pre_scaled"], name="ens_pre_mul"),
        helper.make_node("Add", ["ens_pre_scaled", "ens_pre_shift"], [original], name="ens_pre_add"),
    ]
    graph.graph.initializer.extend([
        numpy_helper.from_array((1.0 / (255.0 * std)).astype(dtype), "ens_pre_scale"),
        numpy_helper.from_array((-mean / std).astype(dtype), "ens_pre_shift"),
    ])
    kept = [i for i in graph.graph.input if i.name != original]
    del graph.graph.input[:]
    graph.graph.input.extend([image, *kept])
    existing = list(graph.graph.node)
    del graph.graph.node[:]
    graph.graph.node.extend(nodes + existing)  # nodes are stored in topological order
    try:
        onnx.checker.check_model(graph)
    except onnx.checker.ValidationError as exc:
        raise EnsError(f"{source}: the graph with ens preprocessing fails onnx.checker: "
                       f"{str(exc).splitlines()[0]}") from None
    return graph, size, fixed is None, classes


#: ``--cudnn-search`` -> onnxruntime's ``cudnn_conv_algo_search``. ``heuristic`` (the default)
#: asks cuDNN's heuristics once per shape; ``exhaustive`` (onnxruntime's own default) benchmarks
#: every algorithm on the first batch of each new input shape, seconds per shape and model, which
#: multi-scale TTA multiplies; ``default`` takes cuDNN's default algorithm without asking.
CUDNN_SEARCH = {"heuristic": "HEURISTIC", "exhaustive": "EXHAUSTIVE", "default": "DEFAULT"}
#: Folder of TensorRT engine and timing caches, under ``--out``.
TRT_CACHE = ".trt-cache"


@dataclass(frozen=True)
class GpuOptions:
    """How sessions use a GPU (ignored on the CPU).

    ``gpu_mem_limit``: GiB each model's memory arena may grow to (``None``: no limit); the arena
    grows by what is asked (``kSameAsRequested``), not by doubling, so several models' sessions
    share a card. ``trt_fp16``: TensorRT engines in float16 for float32 models as well (float16
    models always get them). ``trt_cache``: where TensorRT keeps its engines and timing cache, so
    a rerun starts in seconds (``ens infer`` puts it at ``<out>/.trt-cache``).
    """

    cudnn_search: str = "heuristic"
    gpu_mem_limit: float | None = None
    trt_fp16: bool = False
    trt_cache: Path | None = None


def check_gpu_options(options: GpuOptions) -> None:
    if options.cudnn_search not in CUDNN_SEARCH:
        raise EnsError(f"--cudnn-search {options.cudnn_search}: choose from {', '.join(CUDNN_SEARCH)}")
    limit = options.gpu_mem_limit
    if limit is not None and not (np.isfinite(limit) and limit > 0):
        raise EnsError(f"--gpu-mem-limit {limit:g}: must be a number of GiB above 0")


def trt_profile(input_name: str, images: int, sizes: Sequence[int]) -> dict[str, str]:
    """TensorRT optimisation profiles: one per input size, batches of 1 to ``images`` images.

    Without them TensorRT builds an engine per input shape it meets (minutes each); with them
    one engine takes every shape a run feeds (onnxruntime makes a profile of each repeat of an
    input name).
    """
    def shapes(batch: int) -> str:
        return ",".join(f"{input_name}:{batch}x{s}x{s}x3" for s in sorted(set(sizes)))

    return {"trt_profile_min_shapes": shapes(1), "trt_profile_opt_shapes": shapes(images),
            "trt_profile_max_shapes": shapes(images)}


def session_providers(device: str, options: GpuOptions = GpuOptions(), *, input_name: str = "image",
                      images: int = 32, sizes: Sequence[int] = (), fp16: bool = False) -> list[Any]:
    """onnxruntime's ``providers`` argument for a selected device.

    ``images``: the most images one forward pass holds; ``sizes``: the input sizes the model
    gets (its TensorRT profiles); ``fp16``: the model is float16 (TensorRT builds fp16 engines).
    """
    if device == "cpu":
        return list(DEVICES["cpu"])
    cuda: dict[str, Any] = {"cudnn_conv_algo_search": CUDNN_SEARCH[options.cudnn_search],
                            "arena_extend_strategy": "kSameAsRequested",
                            "do_copy_in_default_stream": True}
    if options.gpu_mem_limit is not None:
        cuda["gpu_mem_limit"] = int(options.gpu_mem_limit * (1 << 30))
    providers: list[Any] = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    if device == "tensorrt":
        trt: dict[str, Any] = {"trt_fp16_enable": bool(fp16 or options.trt_fp16),
                               "trt_engine_cache_enable": True, "trt_timing_cache_enable": True}
        if options.trt_cache is not None:
            trt["trt_engine_cache_path"] = str(options.trt_cache)
            trt["trt_timing_cache_path"] = str(options.trt_cache)
        if options.gpu_mem_limit is not None:
            trt["trt_max_workspace_size"] = int(options.gpu_mem_limit * (1 << 30))
        if sizes:
            trt.update(trt_profile(input_name, images, sizes))
        providers.insert(0, ("TensorrtExecutionProvider", trt))
    return providers


def prepare_trt_cache(folder: Path) -> Path:
    """Create the TensorRT cache folder and its parents: the provider makes only the last level
    and fails when ``--out`` does not exist yet (sessions open before any store is written)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnsError(f"{folder}: cannot create the TensorRT cache folder ({exc.strerror or exc})") from None
    return folder


#: Words in onnxruntime's messages that mean the device ran out of memory.
_OUT_OF_MEMORY = ("out of memory", "failed to allocate", "bad_alloc", "cudaerrormemoryallocation",
                  "cuda_error_out_of_memory", "available memory")


def run_failure(path: Path, shape: Sequence[int], exc: Exception) -> str:
    """One line for an onnxruntime failure during a run: the model, the input shape, a hint."""
    text = " ".join(str(exc).split())
    reason = f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
    images, height, width = shape[0], shape[1], shape[2]
    if any(word in text.lower() for word in _OUT_OF_MEMORY):
        hint = ("out of memory: a smaller --batch-size bounds the images of every forward pass "
                "(one pass per view)")
    else:
        hint = (f"the graph refuses {height}x{width} inputs or this batch; check that the model takes "
                "this size (drop scale from --tta, or set --input-size for a model without ens metadata)")
    return (f"{path}: onnxruntime failed on a ({images}, {height}, {width}, 3) uint8 batch ({reason}); "
            f"{hint}; the chunks already saved are kept")


def cpu_threads() -> int:
    """The cores this process may use (not the machine's: containers and taskset limit it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class Runner:
    """One opened model: ``runner(batch)`` maps uint8 ``(n, h, w, 3)`` to float32 ``(n, classes)``.

    ``images`` is the most images one call gets and ``sizes`` the input sizes it gets (they
    shape TensorRT's profiles and the warm-up). There is no IO binding: a batch goes to the
    device with ``session.run``. Binding bought nothing here: onnxruntime's Python API copies a
    numpy batch from pageable memory synchronously either way (it offers no pinned host buffer
    nor a stream to overlap the next copy with this compute), the uint8 input is a quarter of
    the float32 it replaces, and the output (``n x classes`` floats) is small; pinned, overlapped
    copies would need CUDA from outside onnxruntime (torch or cupy), which ``ens infer`` does not
    depend on.
    """

    def __init__(self, model: Model, device: str, gpu: GpuOptions = GpuOptions(), *, images: int = 32,
                 sizes: Sequence[int] = ()):
        ort = onnxruntime()

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device == "cpu":
            options.intra_op_num_threads = cpu_threads()
            # Idle threads sleep instead of spinning: the decoding processes share these cores,
            # and a spinning thread takes their time (measured: 10-30% slower runs on 2 cores).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 4  # its warnings are not the user's business, its errors reach them as EnsError
        source = model.graph if model.graph is not None else str(model.path)
        providers = session_providers(device, gpu, input_name=_input_name(model), images=images, sizes=sizes,
                                      fp16=model.metadata.precision == "fp16")
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:
            raise EnsError(f"{model.path}: onnxruntime cannot open it on {device} "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        self.provider = self.session.get_providers()[0]
        if self.provider != DEVICES[device][0]:
            # onnxruntime falls back to CPU silently when the CUDA libraries fail to load.
            raise EnsError(f"{model.path}: {DEVICES[device][0]} did not load (onnxruntime fell back to "
                           f"{self.provider}); check the CUDA / cuDNN / TensorRT libraries it needs")
        self.device = device
        self.path = model.path
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        # An ens graph may also output its CAM (after the logits): plain passes ask for the logits alone.
        self.output_name = OUTPUT_NAME if not model.foreign and OUTPUT_NAME in outputs else outputs[0]
        #: The class activation map output (``None``: the model has none; see :meth:`with_cam`).
        self.cam_name = model.metadata.cam

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        except Exception as exc:  # onnxruntime raises its own Fail, RuntimeException, ... types
            raise EnsError(run_failure(self.path, batch.shape, exc)) from None

    def with_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, cam)`` of one pass: float32 ``(n, classes)`` and each image's top-1 class
        activation map, float32 ``(n, h, w)`` on the last feature map's grid."""
        if self.cam_name is None:
            raise EnsError(f"{self.path}: has no cam output; re-export it with `ens export` (without --no-cam)")
        try:
            logits, cam = self.session.run([self.output_name, self.cam_name], {self.input_name: batch})
        except Exception as exc:  # onnxruntime raises its own Fail, RuntimeException, ... types
            raise EnsError(run_failure(self.path, batch.shape, exc)) from None
        if cam.ndim != 3 or cam.shape[0] != batch.shape[0] or 0 in cam.shape:
            raise EnsError(f"{self.path}: its {self.cam_name!r} output has shape {cam.shape}, not a class "
                           f"activation map per image ({batch.shape[0]}, h, w); export it again with `ens export`")
        return logits, cam

    def warm_up(self, images: int, sizes: Sequence[int]) -> None:
        """Run one zero batch of each input shape: on a GPU the first pass of a shape picks
        convolution algorithms (and TensorRT may build), which is not the run's rate."""
        for size in sorted(set(sizes)):
            self(np.zeros((images, size, size, 3), np.uint8))


def _input_name(model: Model) -> str:
    if model.graph is not None:
        return "image"  # adapt_foreign names it so
    import onnx

    graph = onnx.load(str(model.path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return next((i.name for i in graph.input if i.name not in initializers), "image")


def probe_device(device: str, gpu: GpuOptions = GpuOptions()) -> str | None:
    """Why ``device``'s provider cannot run here, or ``None`` when it can.

    Opens a one-node graph on it: onnxruntime-gpu lists CUDA among its providers whether or not
    the CUDA and cuDNN libraries load, and when they do not it falls back to the CPU (or, in
    some versions, raises).
    """
    if device == "cpu":
        return None
    ort = onnxruntime()
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # The probe needs no engine: CUDA alone says whether the libraries load.
    providers = session_providers("cuda", gpu)
    try:
        with warnings.catch_warnings():  # the fallback is reported as one warning line by the caller
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=providers)
    except Exception as exc:  # a missing libcudnn, a driver too old, ...
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        return f"CUDAExecutionProvider failed to load ({type(exc).__name__}: {text})"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return ("CUDAExecutionProvider did not load (onnxruntime fell back to the CPU: the CUDA or "
                "cuDNN libraries it needs are missing or do not match)")
    return None
