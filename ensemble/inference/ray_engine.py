"""`ens infer --engine ray`: the same plan as the local engine, scheduled on a Ray cluster.

The split's batches become a Ray Data dataset, one row ``(start, paths, models that need it)``
per batch; decoding runs in CPU tasks (:func:`~ensemble.inference.decode.decode_batch`, the local
engine's own), inference in a pool of actors, each holding one session per model opened by
:func:`~ensemble.inference.forward.open_passes` and one :class:`~ensemble.inference.forward.Forward`
(the view plan and the merge), and the driver reads the
:class:`~ensemble.inference.engine.BatchOutput` s back in row order (``preserve_order``), so the
split loop (:mod:`ensemble.inference.run`) writes the chunks and stores exactly as it does for
the local engine. Only the scheduling differs.

The pool: one actor per GPU (``num_gpus=1``) where the cluster has GPUs; on CPUs, one actor per
node, reserving three quarters of the node's CPUs, because an onnxruntime CPU session already
runs on every core of its machine (``intra_op_num_threads``, as in the local engine, which also
keeps its results reproducible): more actors on one node would only fight over the cores. The
CPUs the actors leave free decode, one task per CPU.

Ray restarts a killed actor (Ray Data's default for actor pools: ``max_restarts=-1``) and runs
its batches again, each up to :data:`BATCH_RETRIES` times (a batch that kills every actor it
reaches then fails the run in one line), and a decoding task lost with its worker is run again
(Ray's default: up to three times), so a run that loses a worker still ends with every row, in
order. A killed driver loses the cluster's work in flight, not the chunks on disk:
rerun it, and it resumes.

Ray is imported here only, and only when ``--engine ray`` is asked for (the optional extra
``ray``). Every path (models, images, ``--out``) must be the same on every node: on a cluster,
a shared filesystem.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

from ensemble.errors import EnsError
from ensemble.formats.common import describe
from ensemble.inference.decode import batch_bytes, decode_batch
from ensemble.inference.engine import BatchOutput, Event, InferOptions, OpenedEngine, gpu_options, resolve_device
from ensemble.inference.forward import decode_needs, make_forward, open_passes
from ensemble.inference.runtime import DEVICES, GpuOptions, Model
from ensemble.inference.tta import View

#: The share of a node's CPUs a CPU inference actor reserves; the rest decode.
MODEL_SHARE = 0.75
#: Times a batch is run again after the inference actor running it died (Ray's own default for
#: a task, which the decoding tasks get). Ray Data's default for actors is without end: a batch
#: that kills every actor it reaches (out of memory, a crash inside onnxruntime) would restart
#: actors forever while the progress stands still.
BATCH_RETRIES = 3
_BATCH_KILLS = (f"the Ray cluster failed the run: a batch killed its inference actor each of the {BATCH_RETRIES + 1} "
                "times it ran (out of memory, or a crash inside onnxruntime); the chunks already saved are "
                "kept; try a smaller --batch-size, and ens --debug to see Ray's error")
_INSTALL = "--engine ray needs Ray: pip install 'ens[ray]' (from a clone: pip install '.[ray]')"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the extra is ray[data]; a bare ray lacks it)
    except ImportError:
        raise EnsError(_INSTALL) from None
    return ray


def user_error(exc: BaseException) -> EnsError | None:
    """The :class:`EnsError` a worker raised, found in the exceptions Ray wraps it in, or ``None``."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # Ray re-raises a worker's error as a class deriving from both RayTaskError and the
        # original (its text is the remote traceback); ``cause`` holds the original itself.
        cause = getattr(current, "cause", None)
        if isinstance(current, EnsError) and not hasattr(current, "cause"):
            return current
        stack += [cause, current.__cause__, current.__context__]
    return None


def _actor_died(exc: BaseException) -> bool:
    """Whether a RayActorError (ActorDiedError, ActorUnavailableError) is among the exceptions
    Ray wraps ``exc`` in."""
    from ray.exceptions import RayActorError

    seen, stack = set(), [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, RayActorError):
            return True
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return False


@contextlib.contextmanager
def _failures(what: str, actor_died: str | None = None) -> Iterator[None]:
    """Ray's exceptions as one line: a worker's own EnsError as it is, an actor's death as
    ``actor_died`` when given, anything else as ``what``."""
    try:
        yield
    except EnsError:
        raise
    except Exception as exc:  # Ray's RayTaskError, RaySystemError, ActorDiedError, UserCodeException, ...
        found = user_error(exc)
        if found is not None:
            raise EnsError(str(found)) from None
        if actor_died is not None and _actor_died(exc):
            raise EnsError(actor_died) from exc  # --debug shows Ray's own error under it
        raise EnsError(f"{what} ({describe(exc, 300)})") from None


def _connect(ray, address: str | None) -> bool:
    """Join the cluster (or start one); ``True`` when this call started the connection."""
    if ray.is_initialized():  # a caller's own ray.init (a notebook, the tests): use that cluster
        return False
    # Without --ray-address, ray.init reads RAY_ADDRESS: an unreachable one is refused at once too.
    env = None if address else os.environ.get("RAY_ADDRESS") or None
    where = (f"--ray-address {address}" if address else f"RAY_ADDRESS={env}" if env else
             "Ray's default address (a running local cluster, else a new one)")
    _check_reachable(address or env, where)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError, ... from ray.init
        raise EnsError(f"{where}: cannot connect to a Ray cluster ({describe(exc, 300)}); start one with "
                       "`ray start --head` or give its address as HOST:PORT (or auto)") from None
    return True


def _check_reachable(address: str | None, where: str) -> None:
    """Refuse a HOST:PORT that takes no connection, at once: ray.init would retry it for minutes."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EnsError(f"{where}: expected auto or HOST:PORT (the head node's GCS port, "
                       "6379 unless `ray start --head --port` said otherwise)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise EnsError(f"{where}: cannot connect to a Ray cluster ({exc.strerror or type(exc).__name__}); "
                       "start one with `ray start --head` there, or check the host and port") from None


def cluster_resources(ray) -> dict[str, Any]:
    """The cluster's CPUs, GPUs and alive nodes, and of the nodes with CPUs, how many and the
    fewest CPUs of one: ``{cpus, gpus, nodes, cpu_nodes, node_cpus}``."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    cpus = [c for c in cpus if c > 0]  # a head started with --num-cpus 0 runs no tasks
    return {"cpus": int(total.get("CPU", 0)), "gpus": int(total.get("GPU", 0)), "nodes": len(nodes),
            "cpu_nodes": len(cpus), "node_cpus": min(cpus, default=0)}


def _device(ray, requested: str, gpu: GpuOptions, gpus: int) -> tuple[str, str | None]:
    """``(device, fallback)`` as :func:`~ensemble.inference.engine.resolve_device` finds them on a GPU
    worker of the cluster (the driver may have no GPU), or the CPU on a cluster without GPUs."""
    if requested == "cpu":
        return "cpu", None
    if not gpus:
        if requested == "auto":
            return "cpu", None
        raise EnsError(f"--device {requested}: the Ray cluster has no GPUs; add GPU nodes or use --device cpu")
    probe = ray.remote(num_gpus=1, num_cpus=0)(resolve_device)
    with _failures(f"--device {requested}: the probe of a GPU worker of the Ray cluster failed"):
        return ray.get(probe.remote(requested, gpu))


def plan_pool(resources: dict[str, Any], device: str, workers: int | None) -> dict[str, Any]:
    """How many inference actors, with what resources each, and how many decoding tasks at once.

    ``{actors, actor_cpus, actor_gpus, decoders}``; raises :class:`EnsError` when no CPU is left
    to decode.
    """
    if device != "cpu":
        actors, actor_cpus, actor_gpus = resources["gpus"], 1, 1
    else:
        actors, actor_gpus = max(1, resources["cpu_nodes"]), 0
        actor_cpus = max(1, int(resources["node_cpus"] * MODEL_SHARE))
    free = resources["cpus"] - actors * actor_cpus
    if free < 1:
        raise EnsError(f"the Ray cluster has {resources['cpus']} CPUs; --engine ray needs one more than its "
                       f"{actors} inference actor{'s take' if actors > 1 else ' takes'} ({actors * actor_cpus}) "
                       "to decode images")
    decoders = free if workers is None else min(free, workers)
    return {"actors": actors, "actor_cpus": actor_cpus, "actor_gpus": actor_gpus, "decoders": decoders}


def _decode(row: dict[str, Any], batch_size: int, needs: dict[str, Any]) -> dict[str, Any]:
    """A Ray Data task: one batch's images decoded, as the local engine's workers decode them;
    ``needs``: :func:`~ensemble.inference.forward.decode_needs`."""
    decoded = decode_batch(int(row["start"]), [str(p) for p in row["paths"]], batch_size, **needs)
    return {"needs": row["needs"], "decoded": decoded}


class _Infer:
    """A Ray Data actor: the sessions of every model and one Forward, opened once, then one
    decoded batch per call."""

    def __init__(self, models: Sequence[Model], views: Sequence[View], options: InferOptions, device: str,
                 gpu: GpuOptions):
        # A session that cannot open is the user's error (a model onnxruntime refuses), reported
        # with the first batch: Ray reports an exception raised in an actor's constructor as
        # text only, and restarts the actor.
        self.error: EnsError | None = None
        try:
            self.passes = {item.model.name: item for item in open_passes(models, views, options, device, gpu)}
        except EnsError as exc:
            self.error = exc
        self.forward = make_forward(options)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        # A user error travels to the driver in the row: Ray Data wraps an exception raised here
        # in a UserCodeException that arrives without it.
        try:
            if self.error is not None:
                raise self.error
            out = self.forward(row["decoded"], [self.passes[str(name)] for name in row["needs"]])
        except EnsError as exc:
            return {"output": None, "error": str(exc)}
        return {"output": out, "error": None}


class RayEngine:
    """Batches scheduled on a Ray cluster (see the module docstring); outputs in row order."""

    name = "ray"

    def __init__(self, ray, models: Sequence[Model], views: Sequence[View], options: InferOptions, device: str,
                 gpu: GpuOptions, resources: dict[str, Any], pool: dict[str, Any]):
        self.ray, self.models, self.views, self.options = ray, models, views, options
        self.device, self.gpu, self.pool = device, gpu, pool
        self.needs = decode_needs(models, views, options)
        #: One decoded batch: every geometry's pixels and every cam source's crop buffers.
        self.batch_bytes = batch_bytes(options.batch_size, self.needs["geometries"], self.needs["sources"])
        self.cluster = {"cpus": resources["cpus"], "gpus": resources["gpus"], "nodes": resources["nodes"],
                        "inference_actors": pool["actors"]}
        self.waited = 0.0

    @property
    def workers(self) -> int:
        """Decoding tasks at once."""
        return self.pool["decoders"]

    def run(self, batches: Iterable[tuple[int, Sequence[str]]],
            needs: Callable[[int], Sequence[str]]) -> Iterator[BatchOutput]:
        """``(start row, paths)`` batches -> their outputs, in order; ``needs(start)`` names the
        models that lack the batch."""
        items = [{"start": start, "paths": [str(p) for p in paths], "needs": list(needs(start))}
                 for start, paths in batches]
        if not items:
            return
        ray, pool = self.ray, self.pool
        context = ray.data.DataContext.get_current()
        before = context.execution_options.preserve_order, context.enable_progress_bars
        context.execution_options.preserve_order = True  # rows come back in the split's order
        context.enable_progress_bars = False  # ens shows its own
        data = ray.data.from_items(items, override_num_blocks=len(items))  # a block per batch
        # memory: a decoding task holds its decoded batch; telling Ray's scheduler so also keeps
        # decoding out of the actors (Ray Data fuses a task map into the actor map after it when
        # their resource requests agree, and the actors would then decode too).
        data = data.map(_decode, fn_kwargs={"batch_size": self.options.batch_size, "needs": self.needs},
                        compute=ray.data.TaskPoolStrategy(size=pool["decoders"]), num_cpus=1,
                        memory=self.batch_bytes)
        with warnings.catch_warnings():
            # Ray 2.60 takes max_task_retries only among its remote args, which it says it will
            # drop in 2.64 (a DeprecationWarning the user can do nothing about).
            warnings.simplefilter("ignore", DeprecationWarning)
            data = data.map(_Infer, fn_constructor_args=(self.models, self.views, self.options, self.device,
                                                         self.gpu),
                            compute=ray.data.ActorPoolStrategy(size=pool["actors"]), num_cpus=pool["actor_cpus"],
                            num_gpus=pool["actor_gpus"], max_task_retries=BATCH_RETRIES)
        rows = iter(data.iter_rows())
        try:
            while True:
                tick = time.perf_counter()
                # An actor that dies is restarted and its batch run again: a death that reaches here
                # is a batch that killed its actor every time it ran, which a rerun would only repeat.
                with _failures("the Ray cluster failed the run; the chunks already saved are kept, rerun "
                               "the same command to resume", actor_died=_BATCH_KILLS):
                    row = next(rows, None)
                self.waited += time.perf_counter() - tick
                if row is None:
                    return
                if row["error"] is not None:
                    raise EnsError(str(row["error"]))
                yield row["output"]
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()  # stops the dataset's execution: its actors give their resources back
            # The caller's own datasets (a notebook's) keep their settings.
            context.execution_options.preserve_order, context.enable_progress_bars = before


@contextlib.contextmanager
def open_ray_engine(models: Sequence[Model], views: Sequence[View], options: InferOptions,
                    report: Callable[[Event], None]) -> Iterator[OpenedEngine]:
    """Join (or start) the cluster, choose the device and the pool; shut Ray down after when this
    call started it (an :data:`~ensemble.inference.engine.EngineOpener`)."""
    ray = _import_ray()
    if options.workers == 0:
        raise EnsError("--workers 0 decodes in this process; with --engine ray images are decoded in Ray "
                       "tasks: give 1 or more, or leave it out (every CPU the inference actors leave free)")
    if options.device == "tensorrt":
        raise EnsError("--device tensorrt: not with --engine ray yet (its engine cache is per machine); "
                       "use --device cuda")
    started = _connect(ray, options.ray_address)
    try:
        # Ray Data logs every dataset's start and plan, warns that its progress bars are off, and
        # logs a failed run's remote traceback: ens shows its own progress and its one line.
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        with _failures("cannot read the Ray cluster's resources"):
            resources = cluster_resources(ray)
        gpu = gpu_options(options)
        device, fallback = _device(ray, options.device, gpu, resources["gpus"])
        if fallback:
            report(Event("note", message=f"warning: {fallback}"))
        pool = plan_pool(resources, device, options.workers)
        provider = DEVICES[device][0]
        engine = RayEngine(ray, models, views, options, device, gpu, resources, pool)
        chosen = " (--device auto)" if options.device == "auto" else ""
        actors = pool["actors"]
        report(Event("note", message=(
            f"device {device}{chosen}: {provider}, Ray cluster of {resources['nodes']} node"
            f"{'s' if resources['nodes'] > 1 else ''} ({resources['cpus']} CPUs, {resources['gpus']} GPUs): "
            f"{actors} inference actor{'s' if actors > 1 else ''}, {pool['decoders']} decoding task"
            f"{'s' if pool['decoders'] > 1 else ''} at once")))
        passes = open_passes(models, views, options, device, gpu, sessions=False)
        yield OpenedEngine(engine, passes, device, provider, fallback)
    finally:
        if started:
            ray.shutdown()
