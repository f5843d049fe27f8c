"""How `ens infer` shows its progress events (the CLI layer; the library only emits them).

On a terminal: a rich progress bar per split with images/s and ETA. Otherwise (a log file, CI,
a pipe): plain lines, one when a split starts, then at most one every ``interval`` seconds
when a chunk is saved, and one when it ends. Notes are printed as they come, in both cases.
Control characters in what is printed (file names in notes) are shown as escapes.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ensemble.errors import printable
from ensemble.inference.engine import Event


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class InferProgress:
    """A callable for :func:`ensemble.inference.run.infer`'s ``progress``; use it as a context manager."""

    def __init__(self, stream: TextIO | None = None, interval: float = 10.0):
        self.stream = stream if stream is not None else sys.stderr  # looked up late: tests swap it
        self.interval = interval
        self.tty = self.stream.isatty()
        self._bar = None
        self._task = None
        self._last = 0.0

    def __enter__(self) -> "InferProgress":
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]} images/s  ETA {task.fields[eta]}"),
                                 console=Console(file=self.stream))
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _line(self, text: str) -> None:
        text = printable(text)  # notes hold file names: their control characters as escapes
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def __call__(self, event: Event) -> None:
        if event.kind == "note":
            self._line(event.message)
            return
        rate, eta = f"{event.images_per_s:.1f}", format_seconds(event.eta_s)
        if self._bar is not None:
            if event.kind == "start":
                self._task = self._bar.add_task(printable(event.split), total=event.total, completed=event.done,
                                                rate="-", eta="?")
            elif self._task is not None:
                self._bar.update(self._task, completed=event.done, rate=rate, eta=eta)
            return
        now = time.monotonic()
        if event.kind == "start":
            self._line(f"{event.split}: {event.total} images, {event.done} done before")
            self._last = now
        elif event.kind == "chunk" and now - self._last >= self.interval:
            self._line(f"{event.split}: {event.done}/{event.total} images "
                       f"({event.done / max(event.total, 1):.0%}), {rate} images/s, ETA {eta}")
            self._last = now
        elif event.kind == "done":
            self._line(f"{event.split}: {event.total}/{event.total} images, {rate} images/s")
