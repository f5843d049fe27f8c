"""`ens report`: one self-contained HTML page that shows why a blend is what it is.

:mod:`~ensemble.report.build` reads and checks the blend folder's inputs (blend.json, the stores
it was fitted on, the labels, the training counts, the ledger) and computes every number, with
the maths of :mod:`weights_search.calibration`; :mod:`~ensemble.report.plots` draws the figures
(matplotlib, the ``report`` extra) as inline SVG; :mod:`~ensemble.report.page` writes the HTML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

REPORT_FILE = "report.html"


@dataclass(frozen=True)
class ReportResult:
    path: Path  #: the HTML file written
    sections: Mapping[str, bool]  #: section id -> shown (False: only the line of what would enable it)
    missing: Mapping[str, str]  #: section id -> that line
    notes: tuple[str, ...]
    size: int  #: bytes of the page


def write_report(blend_dir: Path, data: Path | None = None, out: Path | None = None,
                 runs: Path | None = None, memory: int | None = None) -> ReportResult:
    """Write the report of the blend folder ``blend_dir`` to ``out`` (None: ``blend_dir/report.html``),
    atomically (only ever replacing a regular file); ``data``: the dataset folder holding the fitted split's json (None: the labels
    file blend.json names) and, when present, the training json; ``runs``: the folder of the
    stores, looked in before the one blend.json records (``ens report --runs``); ``memory``: bytes
    for the blocks of rows the stores are read in (``--memory``; None: the default budget)."""
    from ensemble.fileio import atomic_path, check_replaceable, out_of_room
    from ensemble.report.build import build_report
    from ensemble.report.page import render, sections_shown

    if out is not None:
        check_replaceable(out, "-o")  # a folder, a FIFO, a device: refused before any work
    report = build_report(Path(blend_dir), data, runs, memory)
    text = render(report).encode("utf-8")
    path = Path(out) if out is not None else Path(blend_dir) / REPORT_FILE
    with out_of_room("-o FILE"), atomic_path(path) as tmp:  # a full disk: one line naming the page
        tmp.write_bytes(text)
    return ReportResult(path=path, sections=sections_shown(report), missing=dict(report.missing),
                        notes=report.notes, size=len(text))
