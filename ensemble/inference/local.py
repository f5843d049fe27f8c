"""`ens infer --engine local` (the default): decoding processes on this machine feeding the
sessions in this process, batch after batch, in order.

:func:`open_local_engine` resolves the device, starts the :class:`~ensemble.inference.decode.Decoder`
(worker processes, shared memory) and opens every model's sessions; :class:`LocalEngine` then
runs each decoded batch through one :class:`~ensemble.inference.forward.Forward`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ensemble.inference.decode import Decoder, queue_budget
from ensemble.inference.engine import BatchOutput, Event, InferOptions, OpenedEngine, gpu_options, resolve_device
from ensemble.inference.forward import Forward, ModelPass, decode_needs, make_forward, open_passes
from ensemble.inference.runtime import TRT_CACHE, Model, cpu_threads, prepare_trt_cache
from ensemble.inference.tta import View


class LocalEngine:
    """This machine: a :class:`Decoder` (worker processes, shared memory) feeding one
    :class:`Forward` in this process, batch after batch, in order."""

    name = "local"
    cluster = None

    def __init__(self, decoder: Decoder, passes: Sequence[ModelPass], forward: Forward):
        self.decoder = decoder
        self.passes = {item.model.name: item for item in passes}
        self.forward = forward

    @property
    def workers(self) -> int:
        return self.decoder.workers

    @property
    def waited(self) -> float:
        """Seconds spent waiting for decoded batches so far (large: decoding is the bottleneck)."""
        return self.decoder.waited

    def run(self, batches: Iterable[tuple[int, Sequence[str]]],
            needs: Callable[[int], Sequence[str]]) -> Iterator[BatchOutput]:
        """``(start row, paths)`` batches -> their outputs, in order; ``needs(start)`` names the
        models that lack the batch."""
        try:
            for decoded in self.decoder.map(batches):
                yield self.forward(decoded, [self.passes[name] for name in needs(decoded.start)])
        finally:
            self.forward.close()  # no idle crop threads outlive the run


@contextlib.contextmanager
def open_local_engine(models: Sequence[Model], views: Sequence[View], options: InferOptions,
                      report: Callable[[Event], None]) -> Iterator[OpenedEngine]:
    """This machine: decoding processes feeding sessions in this process (an
    :data:`~ensemble.inference.engine.EngineOpener`)."""
    gpu = gpu_options(options)
    device, fallback = resolve_device(options.device, gpu)
    if fallback:
        report(Event("note", message=f"warning: {fallback}"))
    workers = options.workers
    if workers is None:
        cores = cpu_threads()
        workers = max(1, cores // 4) if device == "cpu" else max(1, cores - 1)
    # The decoding processes start first, so that they come up while the sessions load.
    # The decoded batches take their share of --memory (the rest is the logits').
    with Decoder(batch_size=options.batch_size, workers=workers, **decode_needs(models, views, options),
                 note=lambda message: report(Event("note", message=message)),
                 queue_budget=queue_budget(options.memory)) as decoder:
        if device == "tensorrt":
            gpu = dataclasses.replace(gpu, trt_cache=prepare_trt_cache(Path(options.out) / TRT_CACHE))
        passes = open_passes(models, views, options, device, gpu)
        provider = passes[0].runner.provider
        chosen = " (--device auto)" if options.device == "auto" else ""
        decoding = (f"{workers} decoding process{'es' if workers > 1 else ''}" if workers
                    else "decoding in this process")
        report(Event("note", message=f"device {device}{chosen}: {provider}, {decoding}"))
        yield OpenedEngine(LocalEngine(decoder, passes, make_forward(options)), passes, device, provider, fallback)
