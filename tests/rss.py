"""Peak resident memory of a command, as its parent sees it when the command ends: the tests'
name for :mod:`benchmarks.rss` (one launcher for the tests' memory bounds and the benchmarks)."""

from __future__ import annotations

from benchmarks.rss import LAUNCHER, Measured, measure

__all__ = ["LAUNCHER", "Measured", "measure"]
