"""ONNX files from elsewhere (no ens metadata), brought to the ens contract in memory.

The contract is the one `ens export` writes: input uint8 RGB NHWC ``(batch, height, width, 3)``,
output float32 logits ``(batch, classes)``, normalisation inside the graph. A foreign graph that
takes float NCHW input gets a transpose, a cast and the user's ``mean``/``std`` normalisation
prepended (:func:`adapt_foreign`), so it too is fed raw bytes and, on a GPU, normalised there;
one that takes uint8 NHWC is used as it is. Its input size, mean and std come from the command
line (:class:`ForeignPreprocess`). Graph surgery only: opening sessions is
:mod:`ensemble.inference.runtime`'s business.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ensemble.errors import EnsError
from ensemble.formats.common import first_line
from ensemble.formats.model import IMAGENET_MEAN, IMAGENET_STD, ModelMetadata, rgb_text

#: ``--resize`` and ``--crop-pct`` left out: the ImageNet evaluation recipe.
DEFAULT_RESIZE = "center-crop"
DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class ForeignPreprocess:
    """Preprocessing for ONNX files without ens metadata (from the command line).

    ``input_size`` may be left out when the graph's height and width are fixed; ``mean`` and
    ``std`` (fractions of 255) are required for a float NCHW graph and refused for a uint8 NHWC
    one, which normalises by itself. ``None`` in ``resize`` and ``crop_pct`` means
    :data:`DEFAULT_RESIZE` and :data:`DEFAULT_CROP_PCT`.
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


def utf8_path(path: str | Path) -> bool:
    """Whether onnx's and onnxruntime's C++ bindings take ``path``: they take UTF-8 text only, and
    a file name of other bytes reads in Python as lone surrogates (``os.fsdecode``), which they
    refuse with a ``TypeError`` on any argument list."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def external_data_needs_utf8(path: Path) -> EnsError:
    """The one line for a model with external data whose path is not UTF-8 (see :func:`utf8_path`)."""
    return EnsError(f"{path}: onnx and onnxruntime load external data only through a UTF-8 path, and this "
                    "path holds other bytes; rename the file or the folders above it to UTF-8 names")


def foreign_model(path: Path, graph, pre: ForeignPreprocess) -> tuple[ModelMetadata, bytes]:
    """A foreign file's contract: its metadata (from ``pre`` and the graph) and the adapted graph,
    serialised (it travels as bytes, external data included)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    try:
        load_external_data_for_model(graph, str(path.parent))  # the adapted graph travels as bytes
    except TypeError:
        if not utf8_path(path.parent):  # onnx's C++ opens each data file (a model without any never gets there)
            raise external_data_needs_utf8(path) from None
        raise
    except (onnx.checker.ValidationError, OSError, ValueError) as exc:
        # onnx refuses locations outside the folder, links (which onnxruntime follows), missing files.
        raise EnsError(f"{path}: onnx cannot load its external data ({first_line(exc, 300)}); keep the data "
                       "files beside the model as regular files") from None
    adapted, size, dynamic, classes = adapt_foreign(graph, pre, str(path))
    metadata = ModelMetadata(
        # 0 classes: the graph does not say; the logit store takes the count from the outputs.
        architecture=f"foreign:{path.name}", num_classes=classes or 0, input_size=size,
        mean=pre.mean or (0.0, 0.0, 0.0), std=pre.std or (1.0, 1.0, 1.0),
        resize=pre.resize or DEFAULT_RESIZE, crop_pct=pre.crop_pct or DEFAULT_CROP_PCT, dynamic_size=dynamic,
    )
    return metadata, adapted.SerializeToString()


def static_dim(dim) -> int | None:
    """An ONNX dimension's fixed length, or ``None`` when it is symbolic (or unset)."""
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def adapt_foreign(graph, pre: ForeignPreprocess, source: str):
    """Bring a foreign ONNX graph to the ens contract (uint8 NHWC ``image`` in).

    Returns ``(graph, input_size, dynamic_size, num_classes or None)``; raises
    :class:`EnsError` for a graph with other than one image input and one output, an input
    neither float NCHW nor uint8 NHWC with 3 channels, a fixed batch axis, or missing options.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    initializers = {i.name for i in graph.graph.initializer}
    inputs = [i for i in graph.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not graph.graph.output:
        raise EnsError(f"{source}: expected one image input and a logits output, found inputs "
                       f"{[i.name for i in inputs]}")
    tensor = inputs[0].type.tensor_type
    dims = [static_dim(d) for d in tensor.shape.dim]
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
    out_dims = [static_dim(d) for d in graph.graph.output[0].type.tensor_type.shape.dim]
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
                       f"{first_line(exc)}") from None
    return graph, size, fixed is None, classes
