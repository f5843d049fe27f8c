"""onnxruntime for inference: choosing the execution provider, opening models, running batches.

Every model runs through one contract, the one `ens export` writes: input uint8 RGB NHWC
``(batch, height, width, 3)``, output float32 logits ``(batch, classes)``, normalisation inside
the graph. An ONNX file from elsewhere (no ens metadata) is brought to that contract in memory
(:func:`adapt_foreign`): when it takes float NCHW input, a transpose, cast and the user's
``mean``/``std`` normalisation are prepended to its graph, so it too is fed raw bytes and, on a
GPU, normalised there. Its input size, mean and std come from the command line.

Devices (``--device``): ``cpu``; ``cuda`` (onnxruntime-gpu); ``tensorrt`` (TensorRT engines
cached under ``<out>/.trt-cache``, CUDA and CPU as fallbacks for unsupported nodes); ``auto``
takes CUDA when this onnxruntime offers it, else CPU. ``auto`` never picks TensorRT on its own:
its engines take minutes to build per input shape, which must be asked for.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ensemble.datasets import check_regular_file
from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.metadata import IMAGENET_MEAN, IMAGENET_STD, PREFIX, ModelMetadata, rgb_text
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


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


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
        return Model(path=path, sha256=sha256_file(path), metadata=ModelMetadata.from_props(props, str(path)))
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


def session_providers(device: str, cache_dir: Path | None = None) -> list[Any]:
    """onnxruntime's ``providers`` argument for a selected device."""
    providers: list[Any] = list(DEVICES[device])
    if device == "tensorrt":
        options = {"trt_engine_cache_enable": True, "trt_timing_cache_enable": True}
        if cache_dir is not None:
            options["trt_engine_cache_path"] = str(cache_dir)
            options["trt_timing_cache_path"] = str(cache_dir)
        providers[0] = (providers[0], options)
    return providers


#: Words in onnxruntime's messages that mean the device ran out of memory.
_OUT_OF_MEMORY = ("out of memory", "failed to allocate", "bad_alloc", "cudaerrormemoryallocation",
                  "cuda_error_out_of_memory", "available memory")


def run_failure(path: Path, shape: Sequence[int], exc: Exception) -> str:
    """One line for an onnxruntime failure during a run: the model, the input shape, a hint."""
    text = " ".join(str(exc).split())
    reason = f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
    images, height, width = shape[0], shape[1], shape[2]
    if any(word in text.lower() for word in _OUT_OF_MEMORY):
        hint = ("out of memory: a smaller --batch-size bounds the images of one forward pass "
                "(batch x views of one size)")
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

    On a GPU device the input and output stay bound to device buffers (IO binding), one pair
    per input shape; batches have fixed shapes, so they are allocated once. ``bind`` forces
    binding on CPU as well (tests use it to run that path without a GPU).
    """

    def __init__(self, model: Model, device: str, cache_dir: Path | None = None, bind: bool | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device == "cpu":
            options.intra_op_num_threads = cpu_threads()
            # Idle threads sleep instead of spinning: the decoding processes share these cores,
            # and a spinning thread takes their time (measured: 10-30% slower runs on 2 cores).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 4  # its warnings are not the user's business, its errors reach them as EnsError
        source = model.graph if model.graph is not None else str(model.path)
        try:
            self.session = ort.InferenceSession(source, options, providers=session_providers(device, cache_dir))
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
        self.output_name = self.session.get_outputs()[0].name
        self.bind = device != "cpu" if bind is None else bind
        self._bound: dict[tuple[int, ...], tuple[Any, Any]] = {}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        try:
            if not self.bind:
                return self.session.run([self.output_name], {self.input_name: batch})[0]
            binding, inp = self._binding(batch.shape)
            inp.update_inplace(np.ascontiguousarray(batch))
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        except Exception as exc:  # onnxruntime raises its own Fail, RuntimeException, ... types
            raise EnsError(run_failure(self.path, batch.shape, exc)) from None

    def _binding(self, shape: tuple[int, ...]):
        import onnxruntime as ort

        if shape not in self._bound:
            where = "cpu" if self.device == "cpu" else "cuda"
            binding = self.session.io_binding()
            inp = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.uint8, where, 0)
            binding.bind_ortvalue_input(self.input_name, inp)
            # The output's class count is not always in the graph; let onnxruntime size it.
            binding.bind_output(self.output_name, where)
            self._bound[shape] = (binding, inp)
        return self._bound[shape]
