"""The report's figures: matplotlib figures rendered to inline SVG text.

matplotlib is imported here only (the ``report`` extra), through its object-oriented
``Figure`` (no pyplot: no global figure state, no GUI backend). Names are drawn as written, never
as mathtext (``text.parse_math`` off), and a name that is not UTF-8 with its bytes as ``\\xNN``
(:func:`~ensemble.errors.printable`). Text stays text in the SVG
(``svg.fonttype = none``): the page's own sans-serif draws it, so nothing is embedded or fetched
and the figures stay small. Each function takes plain numbers and returns one ``<svg>`` element
whose ``data-values`` attribute holds, as JSON (NaN as null), the very numbers it draws: a reader
of the page, or a test, gets them exactly, without reading them off the picture.
"""

from __future__ import annotations

import html
import io
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure

from ensemble.errors import printable
from ensemble.formats.blend import CvRow
from weights_search.calibration import Reliability

#: Colours of the predictors, in order (matplotlib's tab10), and of the blend.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
BLEND_COLOUR = "#111111"
#: ``text.parse_math`` off: the figures draw names from files (models, views, classes), which are
#: text; matplotlib would read a name holding two ``$`` as mathtext (``m_$5_vs_$^`` fails to parse,
#: ``a_$x^2$`` would be drawn as maths).
_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "ens-report", "font.size": 9, "axes.titlesize": 9,
          "axes.spines.top": False, "axes.spines.right": False, "font.family": "sans-serif",
          "text.parse_math": False}


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _plain(value: Any) -> Any:
    """``value`` with arrays as lists, numpy scalars as Python ones and NaN or infinities as None."""
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_svg(fig: Figure, label: str, values: Any) -> str:
    """``fig`` as one ``<svg>`` element (no XML prolog), tagged for the page and its test, with
    ``values`` (the numbers drawn) as escaped JSON in its ``data-values`` attribute."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    data = html.escape(json.dumps(_plain(values), allow_nan=False), quote=True)
    return text.replace("<svg", f'<svg class="figure" role="img" aria-label="{html.escape(label, quote=True)}" '
                                f'data-values="{data}"', 1)


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _model_colour(name: str, models: Sequence[str]) -> str:
    """A member's colour: its model's (``model`` or ``model/view``), grey for anything else."""
    model = name.partition("/")[0]
    return colour(models.index(model)) if model in models else "#888888"


def cv_chart(rows: Sequence[CvRow], chosen: str, models: Sequence[str]) -> str:
    """Dot-and-interval chart of the CV top-1 of every row (members in their model's colour,
    uniform and the method grey, the chosen blend black); ``rows``: blend.json's ``cv.rows``."""
    with rc_context(_STYLE):
        fig = _figure(4.2, 0.32 * len(rows) + 0.8)
        ax = fig.add_subplot()
        for y, row in enumerate(rows):
            mine = row.name == chosen
            c = BLEND_COLOUR if mine else ("#888888" if row.kind != "member" else _model_colour(row.name, models))
            ax.errorbar(row.top1, y, xerr=[[row.top1 - row.top1_low], [row.top1_high - row.top1]],
                        fmt="o", color=c, ms=7 if mine else 5, capsize=3, lw=2 if mine else 1.2)
        ax.set_yticks(range(len(rows)), [printable(r.name) + ("  (used)" if r.name == chosen else "") for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("CV top-1 with 95% bootstrap interval")
        ax.grid(axis="x", alpha=0.3)
        return to_svg(fig, "CV top-1 per row", [{"name": r.name, "top1": r.top1, "top1_low": r.top1_low,
                                                  "top1_high": r.top1_high, "used": r.name == chosen} for r in rows])


def weights_chart(weights: Mapping[str, float], models: Sequence[str], tau: float | None = None) -> str:
    """Bars of the blend weights, one per member, coloured by model (members ``model/view``
    when the blend used views); ``tau`` of the prior correction in the title when there is one."""
    names = list(weights)
    with rc_context(_STYLE):
        fig = _figure(5.0, 0.28 * len(names) + 0.8)
        ax = fig.add_subplot()
        colours = [_model_colour(n, models) for n in names]
        values = [weights[n] for n in names]
        ax.barh(range(len(names)), values, color=colours)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
        ax.set_yticks(range(len(names)), [printable(n) for n in names])
        ax.invert_yaxis()
        ax.set_xlim(0, max(max(values), 1e-12) * 1.18)
        ax.set_xlabel("weight")
        if tau is not None:
            ax.set_title(f"then corrected for the training prior: tau = {tau:.3f}", loc="left")
        return to_svg(fig, "blend weights", {"members": names, "weights": values, "tau": tau})


def reliability_chart(panels: Sequence[tuple[str, Reliability, Reliability | None]]) -> str:
    """Small multiples of reliability diagrams: ``(title, before, after temperature or None)``
    per panel; accuracy per confidence bin against the diagonal, ECE in each title."""
    cols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / cols)
    with rc_context(_STYLE):
        fig = _figure(2.1 * cols + 0.3, 2.2 * nrows + 0.2)
        axes = np.atleast_1d(fig.subplots(nrows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
        for ax, (title, before, after) in zip(axes, panels):
            ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--")
            width = 1 / before.count.size
            ax.bar(before.edges[:-1], np.nan_to_num(before.accuracy), width=width, align="edge",
                   color="#9ecae1", edgecolor="#3182bd", lw=0.5, label="before T" if after else None)
            heading = f"{printable(title)}\nECE {before.ece:.3f}"
            if after is not None:
                shown = after.count > 0
                ax.plot(after.confidence[shown], after.accuracy[shown], "o-", color="#d62728", ms=3, lw=1,
                        label="after T")
                heading += f" → {after.ece:.3f} (T)"
            ax.set_title(heading)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_aspect("equal")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        for ax in axes[::cols]:
            ax.set_ylabel("accuracy")
        for ax in axes[:len(panels)][-cols:]:
            ax.set_xlabel("confidence")
        return to_svg(fig, "reliability diagrams", [{"title": title, "before": _bins(before),
                                                     "after": None if after is None else _bins(after)}
                                                    for title, before, after in panels])


def _bins(diagram: Reliability) -> dict[str, Any]:
    return {"confidence": diagram.confidence, "accuracy": diagram.accuracy, "count": diagram.count,
            "ece": diagram.ece}


def heatmap(matrix: np.ndarray, names: Sequence[str], title: str, vmin: float, vmax: float, cmap: str) -> str:
    """An annotated ``(M, M)`` matrix over the member names (NaN cells left blank)."""
    m = len(names)
    size = min(1.0 + 0.55 * m, 7.0)
    with rc_context(_STYLE):
        fig = _figure(size + 1.4, size)
        ax = fig.add_subplot()
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=vmin, vmax=vmax, cmap=cmap)
        ax.set_xticks(range(m), [printable(n) for n in names], rotation=45, ha="right")
        ax.set_yticks(range(m), [printable(n) for n in names])
        ax.spines[:].set_visible(False)
        if m <= 10:
            for i in range(m):
                for j in range(m):
                    if np.isfinite(matrix[i, j]):
                        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if abs(matrix[i, j] - vmin) > 0.6 * (vmax - vmin) else "black")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8)
        return to_svg(fig, title, {"names": list(names), "values": matrix})


def bucket_chart(accuracy: np.ndarray, names: Sequence[str], buckets: Sequence[str]) -> str:
    """Grouped bars: ``(P, B)`` accuracy of each predictor (the blend last) per frequency bucket;
    a NaN (a bucket without rows) gets no bar, and a bucket with no bar at all says "no images"."""
    p, b = accuracy.shape
    width = 0.8 / p
    with rc_context(_STYLE):
        fig = _figure(6.0, 2.8)
        ax = fig.add_subplot()
        for i, name in enumerate(names):
            c = BLEND_COLOUR if i == p - 1 else colour(i)
            # Only the measured buckets: a bar of 0 would read as "all wrong" where the table says "-".
            shown = np.flatnonzero(np.isfinite(accuracy[i]))
            ax.bar(shown + (i - (p - 1) / 2) * width, accuracy[i][shown], width, color=c, label=printable(name))
        for empty in np.flatnonzero(~np.isfinite(accuracy).any(axis=0)):
            ax.text(empty, 0.5, "no images", ha="center", va="center", color="#888888", fontsize=8)
        ax.set_xticks(range(b), buckets)
        ax.set_ylim(0, 1)
        ax.set_ylabel("top-1 on the fitted split")
        ax.legend(fontsize=7, ncols=min(p, 5), loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
        return to_svg(fig, "accuracy by class frequency", {"predictors": list(names), "buckets": list(buckets),
                                                           "accuracy": accuracy})


def leaderboard_chart(points: Sequence) -> str:
    """CV top-1 error (with its interval) against the public (filled) and private (hollow)
    leaderboard scores of ledger rows, with the line y = x; this blend's rows in black."""
    with rc_context(_STYLE):
        fig = _figure(4.2, 3.8)
        ax = fig.add_subplot()
        values = []
        for pt in points:
            c = BLEND_COLOUR if pt.this_blend else colour(0)
            for score, filled in ((pt.public, True), (pt.private, False)):
                if score is None:
                    continue
                ax.errorbar(pt.cv_error, score, xerr=[[pt.cv_error - pt.cv_error_low], [pt.cv_error_high - pt.cv_error]],
                            fmt="o", color=c, mfc=c if filled else "white", capsize=2, lw=1)
                ax.annotate(str(pt.id), (pt.cv_error, score), textcoords="offset points", xytext=(4, 4), fontsize=7)
                values += [score, pt.cv_error_low, pt.cv_error_high]
        low, high = min(values), max(values)
        pad = max((high - low) * 0.15, 0.01)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="#bbbbbb", ls="--", lw=1)
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel("CV top-1 error (95% interval)")
        ax.set_ylabel("leaderboard score")
        ax.plot([], [], "o", color="#555555", label="public")
        ax.plot([], [], "o", color="#555555", mfc="white", label="private")
        ax.legend(fontsize=7, frameon=False)
        return to_svg(fig, "CV against leaderboard",
                      [{"id": p.id, "cv_error": p.cv_error, "cv_error_low": p.cv_error_low,
                        "cv_error_high": p.cv_error_high, "public": p.public, "private": p.private,
                        "this_blend": p.this_blend} for p in points])



#: Colours of the geo map's outcomes (:data:`ensemble.report.geo.OUTCOMES`), and their drawing order:
#: the unchanged rows first, faint, the rows the prior fixed and broke over them.
OUTCOME_COLOURS = ("#b7d7b0", "#d9d9d9", "#1f77b4", "#d62728")
_OUTCOME_ORDER = (1, 0, 2, 3)


def geo_map(lon: np.ndarray, lat: np.ndarray, outcome: np.ndarray, names: Sequence[str], shown_of: int) -> str:
    """Where the images are: a scatter of ``(P,)`` longitudes and latitudes (degrees, drawn as
    given: round them first to keep ``data-values`` short) on a plain equirectangular frame with a
    30-degree graticule and no coastline (nothing fetched, no map package), each point coloured by
    its ``outcome`` (an index into ``names``, :data:`OUTCOME_COLOURS`); ``shown_of``: the rows
    with a place, of which these ``P`` are drawn."""
    lon, lat, outcome = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64), np.asarray(outcome)
    with rc_context(_STYLE):
        fig = _figure(7.2, 3.9)
        ax = fig.add_subplot()
        for o in _OUTCOME_ORDER:
            mine = outcome == o
            count = int(np.count_nonzero(mine))
            ax.scatter(lon[mine], lat[mine], s=6 if o in (2, 3) else 3, color=OUTCOME_COLOURS[o], linewidths=0,
                       label=f"{printable(names[o])} ({count})", zorder=3 if o in (2, 3) else 2)
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        ax.set_aspect("equal")
        ax.set_xticks(range(-180, 181, 30), [_degrees(v, "E", "W") if v % 60 == 0 else "" for v in range(-180, 181, 30)])
        ax.set_yticks(range(-90, 91, 30), [_degrees(v, "N", "S") for v in range(-90, 91, 30)])
        ax.grid(color="#cccccc", lw=0.5, zorder=1)
        ax.axhline(0, color="#999999", lw=0.7, zorder=1)
        ax.spines[:].set_visible(True)
        ax.set_title(f"{lon.size} of {shown_of} images with a place"
                     + ("" if lon.size == shown_of else " (those the prior changed first, the rest sampled)"), loc="left")
        ax.legend(fontsize=7, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False, markerscale=2)
        return to_svg(fig, "where the images are", {"outcomes": list(names), "shown_of": shown_of,
                                                    "lon": lon, "lat": lat, "outcome": outcome})


def _degrees(value: int, positive: str, negative: str) -> str:
    return "0°" if value == 0 else f"{abs(value)}°{positive if value > 0 else negative}"


def region_chart(names: Sequence[str], without: Sequence[float], with_geo: Sequence[float]) -> str:
    """Paired bars: top-1 of the blend without (grey) and with (black) the geo prior per region
    line (NaN: no bar)."""
    without, with_geo = np.asarray(without, dtype=np.float64), np.asarray(with_geo, dtype=np.float64)
    n = len(names)
    with rc_context(_STYLE):
        fig = _figure(6.0, 2.8)
        ax = fig.add_subplot()
        x = np.arange(n)
        for values, dx, c, label in ((without, -0.2, "#aaaaaa", "without the geo prior"),
                                     (with_geo, 0.2, BLEND_COLOUR, "with it")):
            shown = np.flatnonzero(np.isfinite(values))
            ax.bar(x[shown] + dx, values[shown], 0.4, color=c, label=label)
        ax.set_xticks(x, [printable(s) for s in names], rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("top-1 on the fitted split")
        ax.legend(fontsize=7, ncols=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        return to_svg(fig, "top-1 by region", {"regions": list(names), "without": without, "with": with_geo})
