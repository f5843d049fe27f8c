"""The report's HTML: one self-contained page by plain string formatting.

No script, no stylesheet, font or image from anywhere: the CSS is inline, the figures are inline
SVG, the thumbnails ``data:`` URIs. Every number in a table or a sentence (blend.json's and those
computed from the stores) is written with its exact value in a ``data-value`` attribute (JSON:
``repr`` of the float, ``null`` for a blank cell) beside its rounded text, and every figure holds
the numbers it draws in ``data-values`` (:func:`~ensemble.report.plots.to_svg`), so a reader of
the page, or a test, can compare them with the files.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any, Iterable, Mapping

import numpy as np

from ensemble import __version__
from ensemble.errors import printable
from ensemble.fileio import sha256_file
from ensemble.formats.blend import BlendRecord
from ensemble.report import plots
from ensemble.report.build import ReportData
from ensemble.report.geo import OUTCOMES
from ensemble.report.images import UnreadableImage, thumbnail
from weights_search import calibration as cal
from weights_search.cv import GEO_SUFFIX

#: Sections in page order: id -> heading.
SECTIONS = {
    "summary": "Summary",
    "calibration": "Calibration",
    "diversity": "Diversity",
    "longtail": "Long tail",
    "hardest": "Hardest images",
    "leaderboard": "Leaderboard",
}

#: Sections shown only when the blend has their input: id -> heading (the geo prior's, after the long tail).
OPTIONAL_SECTIONS = {"geo": "Geo prior: where the images are"}

_CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 62em; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
p.lead, p.note { color: #555; margin: 0.3em 0; }
p.missing { color: #8a6d3b; background: #fcf8e3; padding: 0.4em 0.6em; border-radius: 3px; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { padding: 0.15em 0.7em; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child { text-align: left; }
tr.used td { font-weight: bold; }
svg.figure { display: block; max-width: 100%; height: auto; margin: 0.5em 0; }
.row { display: flex; flex-wrap: wrap; align-items: center; gap: 0 2em; }
.thumbs { display: flex; flex-wrap: wrap; gap: 0.6em; }
figure.thumb { margin: 0; width: 168px; font-size: 0.75em; }
figure.thumb img { display: block; max-width: 160px; max-height: 160px; border: 1px solid #ccc; }
figure.thumb .absent { width: 160px; min-height: 60px; box-sizing: border-box; padding: 0.3em; background: #eee;
  display: flex; align-items: center; justify-content: center; text-align: center; overflow-wrap: anywhere; }
.key span { display: inline-block; margin-right: 1em; font-size: 0.85em; }
.key i { display: inline-block; width: 0.9em; height: 0.9em; border: 2px solid; margin-right: 0.3em; vertical-align: middle; }
footer { margin-top: 2em; color: #777; font-size: 0.8em; word-break: break-all; }
"""


_USED = ' class="used"'


def _e(value: Any) -> str:
    """``value`` as HTML text: escaped, and shown whole (:func:`~ensemble.errors.printable`)."""
    return html.escape(printable(str(value)), quote=True)


def _exact(value: float | None) -> str:
    """``value`` for a ``data-value`` attribute: JSON, ``null`` for None or NaN."""
    return _e(json.dumps(None if value is None or not math.isfinite(value) else float(value)))


def _num(value: float | None, key: str, digits: int = 4, blank: str = "") -> str:
    """A table cell holding ``value`` rounded (``blank`` for None or NaN), its exact value in
    ``data-value``."""
    shown = blank if value is None or not math.isfinite(value) else f"{value:.{digits}f}"
    return f'<td data-key="{_e(key)}" data-value="{_exact(value)}">{shown}</td>'


def _section(sid: str, body: str) -> str:
    heading = SECTIONS.get(sid) or OPTIONAL_SECTIONS[sid]
    return f'<section id="{sid}" data-section="{sid}">\n<h2>{heading}</h2>\n{body}\n</section>'


def _missing(sid: str, line: str) -> str:
    return (f'<section id="{sid}" data-section="{sid}" data-missing="true">\n<h2>{SECTIONS[sid]}</h2>\n'
            f'<p class="missing">Not shown: {_e(line)}.</p>\n</section>')


def summary(data: ReportData) -> str:
    record = data.record
    parts = []
    cv = record.cv if "summary-cv" not in data.missing else None
    if cv:
        chosen = cv.chosen
        parts.append(f'<p class="lead">{cv.folds}-fold cross-validation on {_e(data.split)} '
                     f'({record.optimize.rows} images)' + (", temperatures fitted per fold" if cv.temperature
                                                          else "")
                     + (", corrected for the training prior (+prior)" if cv.prior else "")
                     + (", without and with the geo prior (+geo)" if cv.geo else "")
                     + f'. The blend in use: <b data-key="chosen">{_e(chosen)}</b>'
                     + ("" if cv.beats_uniform else
                        " (the method did not beat uniform weights on CV)") + ".</p>")
        k = cv.top_k
        rows = "".join(
            f'<tr data-row="{_e(r.name)}"{_USED if r.name == chosen else ""}>'
            f'<td>{_e(r.name)}</td>{_num(r.top1, "top1")}{_num(r.top1_low, "top1_low")}'
            f'{_num(r.top1_high, "top1_high")}{_num(r.topk, "topk")}{_num(r.nll, "nll")}</tr>'
            for r in cv.rows)
        parts.append(f'<div class="row">{plots.cv_chart(cv.rows, chosen, list(data.models))}'
                     f'<table class="cv"><tr><th></th><th>CV top-1</th><th>low</th><th>high</th><th>top-{k}</th>'
                     f'<th>NLL</th></tr>{rows}</table></div>')
    else:
        parts.append(f'<p class="missing">Not shown: {_e(data.missing["summary-cv"])}.</p>')
    temps = record.temperatures or {}
    parts.append(f'<p class="lead">Method <b data-key="method">{_e(record.method)}</b> '
                 f'({_e(record.fusion)} fusion) over {len(data.members)} member'
                 f'{"s" if len(data.members) != 1 else ""}'
                 + (" (one per model and TTA view: blended with --views)" if record.views else "")
                 + ". Its weights" + (" and temperatures" if temps else "") + ":</p>")
    weight_rows = "".join(
        f'<tr data-member="{_e(m)}"><td>{_e(m)}</td>{_num(w, "weight")}'
        + (_num(temps[m], "temperature", 3) if temps else "") + "</tr>"
        for m, w in record.weights.items())
    tau = record.prior.tau if record.prior else None
    parts.append(f'<div class="row">{plots.weights_chart(record.weights, list(data.models), tau)}'
                 f'<table class="weights"><tr><th>member</th><th>weight</th>'
                 f'{"<th>temperature</th>" if temps else ""}</tr>{weight_rows}</table></div>')
    prior = record.prior
    if prior:
        how = "fitted with the weights" if prior.tau_fitted else "given"
        parts.append(f'<p class="lead">Corrected for the training prior of {_e(prior.file)}: '
                     f'tau <span data-key="tau" data-value="{_e(json.dumps(prior.tau))}">{prior.tau:.3f}</span>'
                     f' ({how}; 0 is no correction, 1 divides by the prior once).</p>')
    if record.geo is not None:
        how = "fitted with the weights" if record.geo.fitted else "given"
        parts.append(f'<p class="lead">Corrected for where and when the images were taken (the geo prior of '
                     f'{_e(record.geo.file)}): beta <span data-key="beta" data-value="{_exact(record.geo.beta)}">'
                     f'{record.geo.beta:.3f}</span> ({how}; 0 is no correction); see its section below.</p>')
    in_sample = float((data.blend.predicted == data.labels).mean())
    parts.append(f'<p class="note">In-sample top-1 of the blend on {_e(data.split)}: '
                 f'<span data-key="in_sample_top1" data-value="{_exact(in_sample)}">{in_sample:.4f}</span> '
                 "(the weights were fitted on these rows; the CV figures above are the honest estimate).</p>")
    return _section("summary", "\n".join(parts))


def calibration(data: ReportData) -> str:
    panels = []
    rows = []
    for model in data.models:
        pred = data.model_predictions[model]
        before = cal.reliability(pred.confidence, pred.correct(data.labels))
        after = None
        if model in data.tempered_predictions:
            t = data.tempered_predictions[model]
            after = cal.reliability(t.confidence, t.correct(data.labels))
        panels.append((model, before, after))
        rows.append((model, before.ece, None if after is None else after.ece))
    blend = cal.reliability(data.blend.confidence, data.blend.correct(data.labels))
    panels.append(("blend", blend, None))
    rows.append(("blend", blend.ece, None))
    tempered = bool(data.tempered_predictions)
    table = "".join(f'<tr data-row="{_e(name)}"><td>{_e(name)}</td>{_num(b, "ece")}'
                    + (_num(a, "ece_t") if tempered else "") + "</tr>" for name, b, a in rows)
    lead = (f'<p class="lead">Accuracy against confidence on {_e(data.split)} in {cal.N_BINS} bins; a calibrated '
            "model follows the diagonal. Bars above it: under-confident; below: over-confident. ECE: expected "
            "calibration error (Guo et al. 2017)."
            + (" Red: after each model's fitted temperature (fitted on these rows, so in-sample)." if tempered else "")
            + (" The blend's temperatures are per view: the models' panels show them without." if
               data.record.temperatures and data.record.views else "")
            + " The blend's panel is the blend as applied" + _included(data.record) + ".</p>")
    return _section("calibration", f'{lead}<div class="row">{plots.reliability_chart(panels)}'
                    f'<table class="ece"><tr><th></th><th>ECE</th>{"<th>ECE after T</th>" if tempered else ""}</tr>'
                    f"{table}</table></div>")


def _included(record: BlendRecord) -> str:
    parts = [name for name, value in (("its temperatures", record.temperatures), ("the prior correction", record.prior),
                                      ("the geo prior", record.geo)) if value]
    return ", " + " and ".join(parts) + " included" if parts else ""


def diversity(data: ReportData) -> str:
    if "diversity" in data.missing:
        return _missing("diversity", data.missing["diversity"])
    members = list(data.members)
    corr = cal.error_correlation(data.member_correct)
    disagree = cal.disagreement(data.member_predictions)
    accuracy = data.member_correct.mean(axis=1)
    weights = data.record.weights
    table = "".join(f'<tr data-row="{_e(m)}"><td>{_e(m)}</td>{_num(a, "top1")}'
                    f'{_num(weights[m], "weight", 3)}</tr>' for m, a in zip(members, accuracy))
    lead = (f'<p class="lead">On {_e(data.split)}: how often two members are wrong on the same images (correlation '
            "of their errors, left) and how often they predict different classes (right). A weaker member whose "
            "errors fall elsewhere corrects the others, which is why it can still earn weight.</p>")
    return _section("diversity", lead + '<div class="row">'
                    + plots.heatmap(corr, members, "error correlation", -1.0, 1.0, "RdBu_r")
                    + plots.heatmap(disagree, members, "disagreement", 0.0, max(float(disagree.max()), 1e-9), "Oranges")
                    + f'</div><table class="members"><tr><th>member</th><th>top-1</th><th>weight</th></tr>{table}</table>')


def longtail(data: ReportData) -> str:
    if data.counts is None:
        return _missing("longtail", data.missing["longtail"])
    buckets = cal.frequency_buckets(data.counts)
    names = list(data.models) + ["blend"]
    correct = np.stack([data.model_predictions[m].correct(data.labels) for m in data.models]
                       + [data.blend.correct(data.labels)])
    accuracy, rows = cal.accuracy_by_bucket(correct, data.labels, buckets)
    ranges = []
    for b, label in enumerate(cal.BUCKETS):
        counts = data.counts[buckets == b]
        ranges.append(f"{label} ({counts.min()}-{counts.max()} training images per class, {rows[b]} rows)")
    header = "".join(f"<th>{_e(r)}</th>" for r in ranges)
    body = "".join(f'<tr data-row="{_e(n)}"><td>{_e(n)}</td>'
                   + "".join(_num(v, cal.BUCKETS[b], blank="-") for b, v in enumerate(acc)) + "</tr>"
                   for n, acc in zip(names, accuracy))
    lead = (f'<p class="lead">Top-1 on {_e(data.split)} by how common the true class was in training '
            f"(counts from {_e(data.counts_source)}): the classes ranked by training count and cut into three "
            "equal thirds. A prior correction should lift the tail.</p>")
    return _section("longtail", lead + plots.bucket_chart(accuracy, names, list(cal.BUCKETS))
                    + f'<table class="buckets"><tr><th></th>{header}</tr>{body}</table>')


def _pct(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:+.4f}"


def geo(data: ReportData) -> str:
    """The geo section: top-1 and top-k without and with the blend's geo prior, by region, and the
    map of the fitted split's images (only for a blend with a geo prior)."""
    g = data.geo
    k = g.k
    how = f"fitted on {_e(data.split)} with the weights" if g.fitted else "given"
    lead = (f'<p class="lead">The blend is corrected for where and when each image was taken: '
            f"<code>log q + beta g'</code>, with <code>g'</code> from the nearest observations of "
            f"{_e(g.file)} (sha256 <span data-key=\"geo_sha256\">{_e(g.sha256[:12])}</span>…) and beta "
            f'<span data-key="geo_beta" data-value="{_exact(g.beta)}">{g.beta:.3f}</span> ({how}). '
            f'On {_e(data.split)}, <span data-key="geo_placed" data-value="{g.placed}">{g.placed}</span> of '
            f"{data.labels.size} images have a place, "
            f'<span data-key="geo_usable" data-value="{g.usable}">{g.usable}</span> a usable one (the others get no '
            "correction). Every other section shows the blend as applied, with the geo prior.</p>")
    note = ('<p class="note">These figures are in-sample (weights and beta fitted on these rows); the cross-validated '
            "ones below are the honest estimate.</p>") + _geo_cv(data)
    o = g.overall
    overall = (f'<table class="geo-overall"><tr><th></th><th>top-1</th><th>top-{k}</th><th>rows fixed</th>'
               f'<th>rows broken</th></tr>'
               f'<tr data-row="without"><td>without the geo prior</td>{_num(o.top1_without, "top1")}'
               f'{_num(o.topk_without, "topk")}<td></td><td></td></tr>'
               f'<tr data-row="with"{_USED}><td>with it (as applied)</td>{_num(o.top1_with, "top1")}'
               f'{_num(o.topk_with, "topk")}<td data-key="fixed" data-value="{o.fixed}">{o.fixed}</td>'
               f'<td data-key="broken" data-value="{o.broken}">{o.broken}</td></tr></table>')
    rows = "".join(
        f'<tr data-row="{_e(x.name)}"><td>{_e(x.name)}</td><td data-key="rows" data-value="{x.rows}">{x.rows}</td>'
        f'{_num(x.top1_without, "top1_without", blank="-")}{_num(x.top1_with, "top1_with", blank="-")}'
        f'<td data-key="top1_change" data-value="{_exact(x.top1_with - x.top1_without)}">'
        f'{_pct(x.top1_with - x.top1_without)}</td>'
        f'{_num(x.topk_without, "topk_without", blank="-")}{_num(x.topk_with, "topk_with", blank="-")}'
        f'<td data-key="fixed" data-value="{x.fixed}">{x.fixed}</td>'
        f'<td data-key="broken" data-value="{x.broken}">{x.broken}</td></tr>' for x in g.lines)
    regions_lead = ('<p class="lead">By region: continents as simple latitude/longitude boxes (coarse at their edges), '
                    "the open sea as <i>elsewhere</i>, and the images without a place on their own line. A row is "
                    "<i>fixed</i> when the prior makes its top-1 right, <i>broken</i> when it makes it wrong.</p>")
    table = (f'<table class="geo-regions"><tr><th>region</th><th>images</th><th>top-1 without</th><th>with</th>'
             f'<th>change</th><th>top-{k} without</th><th>with</th><th>fixed</th><th>broken</th></tr>{rows}</table>')
    chart = plots.region_chart([x.name for x in g.lines], [x.top1_without for x in g.lines],
                               [x.top1_with for x in g.lines])
    figure = (plots.geo_map(g.map_lon, g.map_lat, g.map_outcome, OUTCOMES, g.placed) if g.placed else
              f'<p class="note">No image of {_e(data.split)} has a place: no map.</p>')
    map_lead = ('<p class="lead">Where the images are: longitude against latitude (a plain equirectangular frame, '
                "graticule every 30°, no coastline), each image coloured by what the geo prior did to it.</p>")
    return _section("geo", lead + overall + note + regions_lead + f'<div class="row">{chart}</div>' + table
                    + map_lead + figure)


def _geo_cv(data: ReportData) -> str:
    """The CV table's rows with the geo prior beside those without it (same folds): held-out top-1,
    its interval and the gain; the fold betas of the blend in use."""
    cv = data.record.cv if "summary-cv" not in data.missing else None
    if not cv or not cv.geo:
        return ""
    by_name = {r.name: r for r in cv.rows}
    pairs = [(by_name[r.name[:-len(GEO_SUFFIX)]], r) for r in cv.rows
             if r.geo and r.name.endswith(GEO_SUFFIX) and r.name[:-len(GEO_SUFFIX)] in by_name]
    if not pairs:
        return ""
    rows = "".join(
        f'<tr data-row="{_e(a.name)}"{_USED if b.name == cv.chosen else ""}><td>{_e(a.name)}</td>'
        f'{_num(a.top1, "top1_without")}<td>{a.top1_low:.4f}-{a.top1_high:.4f}</td>'
        f'{_num(b.top1, "top1_with")}<td>{b.top1_low:.4f}-{b.top1_high:.4f}</td>'
        f'<td data-key="top1_change" data-value="{_exact(b.top1 - a.top1)}">{_pct(b.top1 - a.top1)}</td>'
        f'{_num(a.topk, "topk_without")}{_num(b.topk, "topk_with")}</tr>' for a, b in pairs)
    betas = cv.fold_betas or ()
    if data.record.geo.fitted:
        how = "beta fitted on each fold's training rows" + (f": {min(betas):.3f}-{max(betas):.3f}" if betas else "")
    else:
        how = "beta as given"
    return (f'<p class="lead">{cv.folds}-fold cross-validation on {_e(data.split)}, the same folds without and with '
            f"the geo prior (held-out rows; {how}).</p>"
            f'<table class="geo-cv"><tr><th></th><th>CV top-1 without</th><th>95% interval</th><th>with</th>'
            f'<th>95% interval</th><th>change</th><th>top-{cv.top_k} without</th><th>with</th></tr>{rows}</table>')


def hardest(data: ReportData) -> str:
    if "hardest" in data.missing:
        return _missing("hardest", data.missing["hardest"])
    colours = {m: plots.colour(i) for i, m in enumerate(data.models)}
    cards = []
    with_boxes = set()
    for image in data.hardest:
        with_boxes.update(image.boxes)
        try:
            if image.path is None:
                raise UnreadableImage(image.path, "the labels file names no image file for it")
            uri = thumbnail(image.path, image.boxes, colours)
        except UnreadableImage as exc:
            where = f' title="{_e(exc.path)}"' if exc.path is not None else ""
            picture = f'<div class="absent"{where}>image {_e(image.id)} not readable: {_e(exc.reason)}</div>'
        else:
            picture = f'<img src="{uri}" alt="image {_e(image.id)}">'
        cards.append(f'<figure class="thumb" data-id="{_e(image.id)}" data-true-probability='
                     f'"{_exact(image.true_probability)}" data-confidence="{_exact(image.confidence)}">'
                     f'{picture}<figcaption>'
                     f'id {_e(image.id)}<br>true: {_e(image.true_name)} (p {image.true_probability:.3f})<br>'
                     f'predicted: <b>{_e(image.predicted_name)}</b> (p {image.confidence:.3f})</figcaption></figure>')
    key = ""
    if with_boxes:
        key = ('<p class="key">CAM boxes: ' + "".join(f'<span><i style="border-color:{colours[m]}"></i>{_e(m)}</span>'
                                                     for m in data.models if m in with_boxes) + "</p>")
    else:
        key = '<p class="note">No CAM boxes: the stores hold none (models exported without a cam output).</p>'
    lead = (f'<p class="lead">The {len(data.hardest)} images of {_e(data.split)} the blend gets wrong with the most '
            f"confidence, of {data.wrong} wrong. Often a label error, a look-alike class, or a mis-mapped model.</p>")
    return _section("hardest", lead + key + f'<div class="thumbs">{"".join(cards)}</div>')


def leaderboard(data: ReportData) -> str:
    if "leaderboard" in data.missing:
        return _missing("leaderboard", data.missing["leaderboard"])

    def score(v: float | None) -> str:
        return "" if v is None else f"{v:.4f}"

    rows = "".join(f'<tr data-row="{p.id}"{_USED if p.this_blend else ""}><td>{p.id}</td><td>{_e(p.file)}'
                   f'{" (unverified)" if p.unverified else ""}</td>'
                   f"<td>{p.cv_error:.4f} ({p.cv_error_low:.4f}-{p.cv_error_high:.4f})</td><td>{score(p.public)}</td>"
                   f"<td>{score(p.private)}</td></tr>" for p in data.ledger_points)
    lead = (f'<p class="lead">Every scored row of {_e(data.ledger)}: the CV estimate as top-1 error against the '
            "public (filled) and private (hollow) leaderboard score; this blend's rows in black and bold. On the "
            "dashed line the estimate was exact (for a top-1 error metric such as iNat 2019's).</p>")
    return _section("leaderboard", lead + plots.leaderboard_chart(data.ledger_points)
                    + f'<table class="ledger"><tr><th>ledger ID</th><th>file</th><th>CV top-1 error</th>'
                    f"<th>public</th><th>private</th></tr>{rows}</table>")


def _footer(data: ReportData) -> str:
    blend_json = data.blend_dir / "blend.json"
    stores = data.record.optimize.stores
    lines = [f"Made by ens {_e(__version__)} (`ens report`) from {_e(blend_json)} (sha256 "
             f'<span data-key="blend_sha256">{sha256_file(blend_json)}</span>), '
             f"labels {_e(data.labels_path)}, stores under {_e(data.runs)}:"]
    lines += [f"{_e(m)}/{_e(data.split)} sha256 {_e(stores[m])}" for m in data.models]
    return "<footer>" + "<br>".join(lines) + "</footer>"


def render(data: ReportData) -> str:
    """The whole page."""
    notes = "".join(f'<p class="note">Note: {_e(n)}</p>' for n in data.notes)
    body: Iterable[str] = (summary(data), calibration(data), diversity(data), longtail(data),
                           *((geo(data),) if data.geo is not None else ()), hardest(data), leaderboard(data))
    title = f"ens report: {data.blend_dir.resolve().name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta name="generator" content="ens {_e(__version__)}">\n<title>{_e(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n"
            f'<p class="lead">Why the blend is what it is: {len(data.models)} models fitted on {_e(data.split)} '
            f"({data.labels.size} images, {len(data.class_names)} classes).</p>\n{notes}\n"
            + "\n".join(body) + "\n" + _footer(data) + "\n</body>\n</html>\n")


def sections_shown(data: ReportData) -> Mapping[str, bool]:
    """Each section id: whether it has content (False: only its line of what would enable it)."""
    gone = {"diversity", "hardest", "leaderboard"} & set(data.missing)
    if data.counts is None:
        gone.add("longtail")
    shown = {sid: sid not in gone for sid in SECTIONS}
    if data.geo is not None:  # only a blend with a geo prior has the section
        shown["geo"] = True
    return shown
