"""onnxruntime for inference: choosing the execution provider, opening models, running batches.

Every model runs through one contract, the one `ens export` writes: input uint8 RGB NHWC
``(batch, height, width, 3)``, output float32 logits ``(batch, classes)``, normalisation inside
the graph. An ONNX file from elsewhere (no ens metadata) is brought to that contract in memory
by :mod:`ensemble.inference.foreign` before its session opens here.

Devices (``--device``): ``cpu``; ``cuda`` (onnxruntime-gpu); ``tensorrt`` (TensorRT engines
cached under ``<out>/.trt-cache``, one profile per input size, CUDA and CPU as fallbacks for
unsupported nodes); ``auto`` takes CUDA when this onnxruntime offers it and it loads
(:func:`probe_device`), else CPU. ``auto`` never picks TensorRT on its own: its engines take
minutes to build, which must be asked for. GPU sessions get their settings from
:class:`GpuOptions` through :func:`session_providers`, a pure function the tests check.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ensemble.formats.dataset import check_regular_file
from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.formats.common import describe
from ensemble.formats.model import OUTPUT_NAME, PREFIX, ModelMetadata
from ensemble.errors import printable
from ensemble.inference.foreign import (ForeignPreprocess, external_data_needs_utf8, foreign_model, static_dim,
                                        utf8_path)
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
class Model:
    """An ONNX model ready to open: its contract, its bytes, its identity.

    ``sha256`` is the model's identity (:func:`model_sha256`): the sha256 of the file's bytes,
    or, for a model whose weights are external data, a sha256 over the file and every data file
    it names.
    """

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


def _tensors(graph) -> Iterator[Any]:
    """Every TensorProto of a GraphProto: initializers, sparse ones, node attributes, subgraphs."""
    for tensor in graph.initializer:
        yield tensor
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node) -> Iterator[Any]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
        for sparse in attribute.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attribute.HasField("g"):
            yield from _tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _tensors(graph)


def external_files(path: Path, model) -> dict[str, Path]:
    """The external-data files a model's tensors name: location as written -> the file.

    ``model``: its ModelProto, read without its external data. Raises :class:`EnsError` (one line
    naming the model and the location) for a location that is absolute, lies outside the
    model's folder once links are followed (onnxruntime and onnx refuse both), is not a
    regular file, or holds a NUL (no file name can) or anything else the OS cannot check.
    """
    from onnx import TensorProto

    tensors = [*_tensors(model.graph), *(t for f in model.functions for n in f.node for t in _attribute_tensors(n))]
    folder = os.path.realpath(path.parent)
    files: dict[str, Path] = {}
    for tensor in tensors:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        where = f"{path}: tensor {tensor.name!r} keeps its data in {location!r}"
        if location is None or location == "":
            raise EnsError(f"{path}: tensor {tensor.name!r} is marked external but names no file; "
                           "save the model again with its weights")
        if location in files:
            continue
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise EnsError(f"{where}, an absolute path: onnxruntime takes only a path relative to the "
                           "model's folder; keep the data file beside the model and save it with that name")
        if "\0" in location:
            raise EnsError(f"{where}, a name with a NUL character, which no file name holds: the graph is "
                           "damaged or was made to mislead; save the model again with its weights")
        try:
            target = os.path.realpath(os.path.join(path.parent, location))
            if os.path.commonpath([folder, target]) != folder:
                raise EnsError(f"{where}, outside the model's folder {path.parent} (it resolves to {target}): "
                               "onnxruntime loads external data only from the model's folder; move the file there")
            if not os.path.isfile(target):
                kind = "no such file" if not os.path.lexists(target) else "not a regular file"
                raise EnsError(f"{where}: {kind} in {path.parent}; put the model's data file beside it")
        except (ValueError, OSError) as exc:  # a name the OS refuses (too long for realpath's checks, ...)
            raise EnsError(f"{where}, a path the OS cannot check ({describe(exc, 200)}); save the model again "
                           "with its weights in a plainly named file beside it") from None
        files[location] = Path(target)
    return files


#: Opens the identity of a model with external data (a version: another recipe, another prefix).
_IDENTITY_PREFIX = b"ens model with external data, v1\0"


def model_sha256(path: Path, model, files: Mapping[str, Path] | None = None) -> str:
    """A model's identity: what stores, blend provenance and the ledger call its sha256.

    A self-contained .onnx: the sha256 of its bytes (as ens always recorded). A model with
    external data: the sha256 of :data:`_IDENTITY_PREFIX`, the .onnx's sha256, then for each data
    file, in the order of its location (as the graph writes it), the location, a NUL, the file's
    sha256 and a NUL. Other weights, or any edit to any file the model loads, give another
    identity; renaming the model does not. ``files``: :func:`external_files`' answer, when known.
    """
    files = external_files(path, model) if files is None else files
    try:
        if not files:
            return sha256_file(path)
        digest = hashlib.sha256(_IDENTITY_PREFIX + sha256_file(path).encode() + b"\0")
        for location in sorted(files):
            digest.update(location.encode("utf-8") + b"\0" + sha256_file(files[location]).encode() + b"\0")
    except OSError as exc:
        raise EnsError(f"{path}: cannot read it or its external data ({exc.strerror or exc})") from None
    return digest.hexdigest()


def load_model(path: str | os.PathLike, foreign: ForeignPreprocess | None = None) -> Model:
    """Read a model's contract: its ens metadata, or ``foreign`` for a file without any."""
    import onnx

    path = check_regular_file(path)
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for foreign bytes
        raise EnsError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    files = external_files(path, graph)
    if files and not utf8_path(path.parent):
        raise external_data_needs_utf8(path)  # a file name alone is read here and handed over as bytes
    sha256 = model_sha256(path, graph, files)
    props = {p.key: p.value for p in graph.metadata_props}
    if PREFIX + "format" in props:
        metadata = ModelMetadata.from_props(props, str(path))
        outputs = [o.name for o in graph.graph.output]
        logits = next((o for o in graph.graph.output if o.name == OUTPUT_NAME), None)
        if logits is None:
            raise EnsError(f"{path}: has ens metadata but no {OUTPUT_NAME!r} output (its outputs: "
                           f"{', '.join(outputs)}); export it again with `ens export`")
        dims = logits.type.tensor_type.shape.dim
        width = static_dim(dims[1]) if len(dims) == 2 else None
        if width is not None and width != metadata.num_classes:
            # class_ids name num_classes columns: another width would map scores to the wrong classes.
            raise EnsError(f"{path}: its metadata says {metadata.num_classes} classes, but its "
                           f"{OUTPUT_NAME!r} output has {width} columns; export it again with `ens export`")
        if metadata.cam is not None and metadata.cam not in outputs:
            raise EnsError(f"{path}: its metadata names a {metadata.cam!r} output, but the graph's outputs are "
                           f"{', '.join(outputs)}; export it again with `ens export`")
        return Model(path=path, sha256=sha256, metadata=metadata)
    metadata, adapted = foreign_model(path, graph, foreign or ForeignPreprocess())
    return Model(path=path, sha256=sha256, metadata=metadata, foreign=True, graph=adapted)


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
    and fails when ``--out`` does not exist yet (sessions open before any store is written).
    onnxruntime takes its path as UTF-8 text (a provider option): another one is refused here."""
    if not utf8_path(folder):
        raise EnsError(f"{folder}: onnxruntime takes the TensorRT cache folder only as a UTF-8 path, and this one "
                       "holds other bytes; give --out a folder whose path is UTF-8")
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
    reason = describe(exc, 300, whole=True)
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
        source = _session_source(model, options)
        providers = session_providers(device, gpu, input_name=_input_name(model), images=images, sizes=sizes,
                                      fp16=model.metadata.precision == "fp16")
        # No capture of onnxruntime's native log here: probe_device has already seen the provider
        # load, and what this session says (a TensorRT build of minutes, a crash's last lines) is the user's.
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:
            raise EnsError(f"{model.path}: onnxruntime cannot open it on {device} "
                           f"({describe(exc, 200)})") from None
        self.provider = self.session.get_providers()[0]
        if self.provider != DEVICES[device][0]:
            # onnxruntime falls back (to CUDA, or the CPU) with no more than a log line when a provider fails to load.
            raise EnsError(f"{model.path}: {DEVICES[device][0]} did not load (onnxruntime fell back to "
                           f"{self.provider}; its log above says why); check the CUDA / cuDNN / TensorRT "
                           "libraries it needs")
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


def _session_source(model: Model, options) -> str | bytes:
    """What onnxruntime opens: the adapted graph of a foreign model; else the file's path, or,
    when the path is not UTF-8 (which onnxruntime's bindings refuse), the file's bytes, with its
    folder named for the external data (load_model has refused such a model whose folder is not
    UTF-8)."""
    if model.graph is not None:
        return model.graph
    if utf8_path(model.path):
        return str(model.path)
    if utf8_path(model.path.parent):
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(model.path.parent))
    try:
        return model.path.read_bytes()
    except OSError as exc:
        raise EnsError(f"{model.path}: cannot read it ({exc.strerror or exc})") from None


def _input_name(model: Model) -> str:
    if model.graph is not None:
        return "image"  # adapt_foreign names it so
    import onnx

    graph = onnx.load(str(model.path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return next((i.name for i in graph.input if i.name not in initializers), "image")


class NativeLog:
    """What onnxruntime wrote while :func:`native_log` held it (``text``: set when the block
    ends, whether or not it raised)."""

    text: str = ""


#: fd 2 is the process's: one capture at a time (nested in one thread is fine, each restores its own).
_CAPTURE = threading.RLock()
#: How much of a capture is read back: its first and its last bytes (a provider's failure to
#: load is said first; the last lines say where it stopped). What lies between is left out.
LOG_HEAD = 1 << 20
LOG_TAIL = 4 << 20


def _read_sink(sink) -> str:
    size = sink.seek(0, os.SEEK_END)
    sink.seek(0)
    if size <= LOG_HEAD + LOG_TAIL:
        return sink.read().decode("utf-8", "replace")
    head = sink.read(LOG_HEAD)
    sink.seek(size - LOG_TAIL)
    tail = sink.read()
    left_out = f"\n[... {size - len(head) - len(tail)} bytes of onnxruntime's log left out ...]\n"
    return (head + left_out.encode() + tail).decode("utf-8", "replace")


@contextlib.contextmanager
def native_log() -> Iterator[NativeLog]:
    """Keep onnxruntime's own output off the terminal while the block runs, and keep its text.

    onnxruntime's C++ logger writes coloured lines to file descriptor 2 (where no Python-level
    redirect reaches), whatever a session's ``log_severity_level`` says for messages of the
    default logger such as a provider library that fails to load; its Python layer prints its
    fallback to ``sys.stdout``. Both go to the returned :class:`NativeLog` instead (at most
    :data:`LOG_HEAD` + :data:`LOG_TAIL` bytes of the former), also when the block raises. Without
    a file descriptor 2 or a temporary file, nothing is captured and the block runs as it is.
    Meant for short blocks (:func:`probe_device`): whatever happens meanwhile, a crash's last
    lines included, goes to the capture, not to the user.
    """
    log = NativeLog()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with _CAPTURE:
        try:
            sink = tempfile.TemporaryFile()
        except OSError:
            yield log
            return
        try:
            saved = os.dup(2)
        except OSError:
            sink.close()
            yield log
            return
        printed = io.StringIO()
        try:
            try:
                os.dup2(sink.fileno(), 2)  # inside the try: an interrupt right after it still gives fd 2 back
                with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                    yield log
            finally:
                os.dup2(saved, 2)
                try:
                    log.text = _read_sink(sink) + printed.getvalue()
                except OSError:
                    log.text = printed.getvalue()
        finally:
            os.close(saved)
            sink.close()


#: onnxruntime's log colours (its ostream sink writes them whether or not fd 2 is a terminal).
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
#: The head of an entry of onnxruntime's log: "2026-03-02 10:11:12.1 [W:onnxruntime:Default, file.cc:12 Fn] ".
_ENTRY = re.compile(r"\[([VIWEF]):onnxruntime:[^\]\n]*\] ?")
#: What a provider library's failure to load looks like in onnxruntime's log, each giving the
#: cause as ens says it: Linux's dlopen (the library that is missing, by the name asked for),
#: Windows (onnxruntime 1.2x names the missing DLL; 1.19 only the error code), and a library of
#: another version (a symbol it lacks).
_LOAD_FAILURES = (
    (re.compile(r"([^\s:/\\'\"]+): cannot open shared object file"),
     lambda m: f"{m[1]}: cannot open shared object file"),
    (re.compile(r'Error loading "(?:[^"]*[/\\])?([^"/\\]+)" which depends on "(?:[^"]*[/\\])?([^"/\\]+)" '
                r"which is missing"),
     lambda m: f"{m[2]} is missing ({m[1]} needs it)"),
    (re.compile(r'LoadLibrary failed with error (\d+) "[^"]*" when trying to load "(?:[^"]*[/\\])?([^"/\\]+)"'),
     lambda m: f"{m[2]}: LoadLibrary error {m[1]}" + (" (a DLL it needs is missing)" if m[1] == "126" else "")),
    (re.compile(r"(?:[^\s:]*/)?([^\s:/]+): undefined symbol: ([^\s,]+)"),
     lambda m: f"{m[1]}: undefined symbol {m[2]} (its CUDA libraries are of another version)"),
)
#: onnxruntime-gpu's own statement of what it needs: "Require cuDNN 9.* and CUDA 12.*".
_REQUIRES = re.compile(r"Require cuDNN (\S+) and CUDA (\S+)")


def _load_failures(log: str) -> list[str]:
    """Every library that failed to load, as :func:`load_failure` says each, in the log's order."""
    text = _COLOUR.sub("", log)
    found: list[tuple[int, str]] = []
    for pattern, say in _LOAD_FAILURES:
        found.extend((m.start(), say(m)) for m in pattern.finditer(text))
    causes: list[str] = []
    for _, cause in sorted(found, key=lambda f: f[0]):
        if cause not in causes:
            causes.append(cause)
    return causes


def load_failure(log: str) -> str | None:
    """The library that failed to load, as onnxruntime's log (or an exception's text) tells it,
    in a few words; ``None`` when it does not say."""
    text = _COLOUR.sub("", log)
    for pattern, say in _LOAD_FAILURES:
        found = pattern.search(text)
        if found:
            return say(found)
    return None


def log_entries(log: str) -> list[tuple[str, str, str]]:
    """onnxruntime's log as ``(level, message, entry)``: its severity letter (``V I W E F``), the
    message after the entry's head, the whole entry (head and continuation lines), colours
    removed. Lines before the first entry (its Python layer's prints) are left out."""
    entries: list[list[str]] = []
    for line in _COLOUR.sub("", log).splitlines():
        head = _ENTRY.search(line)
        if head:
            entries.append([head[1], line[head.end():], line])
        elif entries and line.strip():
            entries[-1][1] += "\n" + line
            entries[-1][2] += "\n" + line
    return [(level, message, entry) for level, message, entry in entries]


def _first_error(log: str) -> str | None:
    """The message of onnxruntime's first error (or fatal) entry, in one line of at most 200 characters."""
    message = next((m for level, m, _ in log_entries(log) if level in "EF"), None)
    return None if message is None else " ".join(message.split())[:200] or None


#: Entries the probe's own graph causes, which say nothing of the model's run.
_PROBE_ONLY = ("No graph will run on TensorRT",)


def pass_on(log: str) -> None:
    """Write onnxruntime's warnings and errors from ``log`` (a capture of a session that opened)
    to stderr as the user would have seen them, in plain text: a provider that loads may still
    say something worth knowing (a cuDNN older than the one it was built with, ...)."""
    kept = [entry for level, message, entry in log_entries(log)
            if level in "WEF" and not any(p in message for p in _PROBE_ONLY)]
    if kept:
        with contextlib.suppress(Exception):
            sys.stderr.write("".join(printable(line) + "\n" for entry in kept for line in entry.splitlines()))
            sys.stderr.flush()


def build_info() -> dict[str, str]:
    """onnxruntime's ``build_and_package_info``: ``package_name``, ``__version__`` and, in a GPU
    build, ``cuda_version`` (and in recent ones ``cudnn_version``); absent keys left out."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except Exception:  # an onnxruntime without it, or broken
        return {}
    keys = ("package_name", "__version__", "cuda_version", "cudnn_version")
    return {k: str(getattr(info, k)) for k in keys if getattr(info, k, None)}


def cuda_needs(log: str, info: Mapping[str, str]) -> str | None:
    """Which CUDA and cuDNN this onnxruntime needs: its log's "Require cuDNN 9.* and CUDA 12.*"
    and its build info's versions; ``None`` when neither says."""
    package = (f"{info['package_name']} {info['__version__']}" if "package_name" in info and "__version__" in info
               else "this onnxruntime")
    found = _REQUIRES.search(_COLOUR.sub("", log))
    needs = None if found is None else f"CUDA {found[2].rstrip('.,;')} and cuDNN {found[1].rstrip('.,;')}"
    built = " and ".join(f"{name} {info[key]}" for name, key in (("CUDA", "cuda_version"), ("cuDNN", "cudnn_version"))
                         if key in info)
    if needs and built:
        return f"{package} needs {needs} (built with {built.replace(' and ', ', ')})"
    if needs:
        return f"{package} needs {needs}"
    if built:
        return f"{package} is built with {built}"
    return None


def cuda_failure(log: str, error: Exception | None, info: Mapping[str, str], *,
                 provider: str = "CUDAExecutionProvider", landed: str | None = "CPUExecutionProvider") -> str:
    """Why ``provider`` did not load, in one line: onnxruntime's exception (``error``, when it
    raised), the libraries that failed (from ``log``, onnxruntime's output while it tried; its
    first error when no library is named) and, when CUDA is what failed, the CUDA and cuDNN this
    onnxruntime needs (``info``: :func:`build_info`). ``landed``: the provider onnxruntime fell
    back to (TensorRT falls back to CUDA, which then loaded)."""
    causes = _load_failures(log)
    parts = []
    if error is not None:
        head = f"{provider} failed to load ({describe(error, 200)}"
        parts += [c for c in causes if load_failure(str(error)) != c]
    else:
        head = f"{provider} did not load ("
        if not causes:
            libraries = "TensorRT" if landed == "CUDAExecutionProvider" else (
                "TensorRT, CUDA or cuDNN" if provider == "TensorrtExecutionProvider" else "CUDA or cuDNN")
            to = "the CPU" if landed in (None, "CPUExecutionProvider") else landed
            parts.append(f"onnxruntime fell back to {to}: the {libraries} libraries it needs are missing or do "
                         "not match")
        parts += causes
    said = _first_error(log)
    if not causes and said is not None and (error is None or said not in " ".join(str(error).split())):
        parts.append(f"onnxruntime said: {said}")
    needs = cuda_needs(log, info) if landed != "CUDAExecutionProvider" else None
    if needs:
        parts.append(needs)
    if error is not None:
        return head + "".join(f"; {p}" for p in parts) + ")"
    return head + "; ".join(parts) + ")"


#: TensorRT's smallest subgraph in :func:`probe_device`: more nodes than its graph has, so
#: TensorRT takes none and builds no engine (its libraries load all the same, which is the question).
NO_ENGINE_SUBGRAPH = 1000


def probe_providers(device: str, gpu: GpuOptions = GpuOptions()) -> list[Any]:
    """The providers :func:`probe_device` opens its graph with: the device's own, with CUDA's
    settings; TensorRT with no engine and no cache (nothing written anywhere)."""
    providers = session_providers("cuda", gpu)
    if device == "tensorrt":
        providers.insert(0, ("TensorrtExecutionProvider", {"trt_min_subgraph_size": NO_ENGINE_SUBGRAPH}))
    return providers


def probe_device(device: str, gpu: GpuOptions = GpuOptions()) -> str | None:
    """Why ``device``'s provider cannot run here, or ``None`` when it can.

    Opens a one-node graph on it: onnxruntime-gpu lists CUDA (and TensorRT) among its providers
    whether or not their libraries load, and when they do not it falls back (TensorRT to CUDA,
    CUDA to the CPU; or, in some versions, raises), having written its own multi-line log to the
    terminal. That log is kept off the terminal (:func:`native_log`) and read for the reason
    (:func:`cuda_failure`): the library that failed and the CUDA and cuDNN versions this
    onnxruntime needs. When the provider loads, the warnings it wrote are passed on
    (:func:`pass_on`). The model's own sessions are not captured: their output is the user's.
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
    providers = probe_providers(device, gpu)
    error: Exception | None = None
    session = None
    with native_log() as log:
        try:
            with warnings.catch_warnings():  # the fallback is reported as one warning line by the caller
                warnings.simplefilter("ignore")
                session = ort.InferenceSession(probe.SerializeToString(), options, providers=providers)
        except Exception as exc:  # a missing libcudnn, a driver too old, ...
            error = exc
    landed = session.get_providers()[0] if session is not None else None
    if landed == DEVICES[device][0]:
        pass_on(log.text)
        return None
    return cuda_failure(log.text, error, build_info(), provider=DEVICES[device][0], landed=landed)
