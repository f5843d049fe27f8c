"""Every number the report's page shows, recomputed by hand and compared cell by cell.

The expected values come from the stores' ``.npy`` files, blend.json, the labels json and the
ledger alone, with plain numpy here (softmax, the blend, 15 confidence bins, Pearson correlation,
frequency thirds): no helper of the report nor of ``weights_search`` is called, so a mistake in
either shows. The page is read with the standard library's HTML parser, as text and data
(attributes unescaped), never with a regex over markup. Each shown number is checked twice: its
exact value (``data-value``, or a figure's ``data-values``) against the recomputed one, and its
rounded text against both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from ensemble.report import write_report
from ensemble.report.plots import heatmap

from tests.ensemble.report.conftest import MODELS, PERM, TRAIN_COUNTS, add_ledger, copy_work

BINS = 15
VIEWS = ("identity", "flip")
HARDEST = 24


# ---------------------------------------------------------------------------------------------
# The page as a tree


@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        """Descendants with ``tag`` (any when None) whose attributes hold ``attrs`` (``_`` as ``-``;
        ``class_`` matches one of the classes)."""
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            if (tag is None or child.tag == tag) and all(_holds(child, k, v) for k, v in attrs.items()):
                found.append(child)
            found += child.all(tag, **attrs)
        return found

    def one(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]

    def __getitem__(self, name: str) -> str:
        return self.attrs[name]


def _holds(node: Node, key: str, value: str) -> bool:
    if key == "class_":
        return value in (node.attrs.get("class") or "").split()
    return node.attrs.get(key.replace("_", "-")) == value


class _Tree(HTMLParser):
    VOID = {"meta", "br", "img", "input", "link", "hr", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert any(n.tag == tag for n in self.stack), f"</{tag}> closes nothing"
        while self.stack.pop().tag != tag:
            pass

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(page: str) -> Node:
    tree = _Tree()
    tree.feed(page)
    tree.close()
    assert tree.stack == [tree.root], "an element is left open"
    return tree.root


def section(doc: Node, sid: str) -> Node:
    return doc.one("section", id=sid)


def values(svg: Node):
    """A figure's ``data-values``, JSON (null for NaN)."""
    assert svg.tag == "svg" and "figure" in svg["class"].split()
    return json.loads(svg["data-values"])


def exact(node: Node) -> float | None:
    return json.loads(node["data-value"])


def svg_texts(svg: Node) -> list[str]:
    return [t.text().strip() for t in svg.all("text")]


# ---------------------------------------------------------------------------------------------
# The numbers, by hand


def close(got, want, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """``got`` (JSON from the page: null for NaN) equals ``want`` up to float32 rounding."""
    got = np.array([np.nan if v is None else v for v in np.ravel(np.array(got, dtype=object))], dtype=np.float64)
    want = np.ravel(np.asarray(want, dtype=np.float64))
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)


def rounded(text: str, want: float | None, digits: int, blank: str = "") -> None:
    """``text`` is ``want`` rounded to ``digits`` (``blank`` for None or NaN)."""
    if want is None or not math.isfinite(want):
        assert text == blank, (text, want)
        return
    assert re.fullmatch(rf"-?\d+\.\d{{{digits}}}", text), (text, want)
    assert abs(float(text) - want) <= 0.5 * 10 ** -digits + 1e-6, (text, want)


def cell(node: Node, want: float | None, digits: int = 4, blank: str = "") -> None:
    """A ``data-value`` cell: its exact value is ``want``, its text that value rounded."""
    got = exact(node)
    if want is None or not math.isfinite(want):
        assert got is None, (got, want)
    else:
        close(got, want)
        assert node.text() == f"{got:.{digits}f}", (node.text(), got)
    rounded(node.text(), want, digits, blank)


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Diagram:
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    ece: float


def diagram(p: np.ndarray, labels: np.ndarray) -> Diagram:
    """Guo et al.'s reliability diagram of probabilities ``p``: bin ``b`` holds confidences in
    ``(b / 15, (b + 1) / 15]`` (bin 0 also 0)."""
    conf, hit = p.max(axis=1), (p.argmax(axis=1) == labels).astype(float)
    b = np.clip(np.ceil(conf * BINS).astype(int) - 1, 0, BINS - 1)
    count = np.array([(b == k).sum() for k in range(BINS)])
    mean_conf = np.array([conf[b == k].mean() if count[k] else np.nan for k in range(BINS)])
    accuracy = np.array([hit[b == k].mean() if count[k] else np.nan for k in range(BINS)])
    ece = sum(count[k] / conf.size * abs(accuracy[k] - mean_conf[k]) for k in range(BINS) if count[k])
    return Diagram(mean_conf, accuracy, count, ece)


@dataclass(frozen=True)
class Truth:
    """What the page of one blend folder must show, from the files alone."""

    record: dict
    ids: np.ndarray
    labels: np.ndarray  #: (N,) columns
    names: list[str]  #: per column, "name (id)"
    models: dict[str, np.ndarray]  #: model -> (N, C) probabilities of its logits.npy
    tempered: dict[str, np.ndarray]  #: model -> (N, C) after its temperature ({} without)
    members: dict[str, np.ndarray]  #: member -> (N,) predicted columns
    blend: np.ndarray  #: (N, C) the blend's probabilities
    counts: np.ndarray | None  #: (C,) training images per column


def truth(work, folder: Path, counts_known: bool = True) -> Truth:
    record = json.loads((folder / "blend.json").read_text())
    assert record["fusion"] == "mixture"  # the by-hand blend below averages probabilities
    assert record.get("class_ids") in (None, list(PERM))
    runs = work.runs
    ids = np.load(runs / MODELS[0] / "val" / "ids.npy")
    doc = json.loads((work.data / "val2019.json").read_text())
    category = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
    labels = np.array([PERM.index(category[i]) for i in ids.tolist()])
    cat_names = {c["id"]: c.get("name") for c in doc["categories"]}
    names = [f"{cat_names[c]} ({c})" if cat_names.get(c) else str(c) for c in PERM]
    temps = record["temperatures"] or {}
    models, tempered = {}, {}
    for model in record["models"]:
        x = np.load(runs / model / "val" / "logits.npy").astype(np.float64)
        models[model] = softmax(x)
        if temps and not record["views"]:
            tempered[model] = softmax(x / temps[model])
    members, total = {}, 0.0
    for name in record["members"]:
        model, _, view = name.partition("/")
        x = (np.load(runs / model / "val" / "views.npy")[VIEWS.index(view)] if view
             else np.load(runs / model / "val" / "logits.npy")).astype(np.float64)
        members[name] = x.argmax(axis=1)
        total = total + record["weights"][name] * softmax(x / temps.get(name, 1.0))
    p = total / sum(record["weights"].values())
    counts = np.array([TRAIN_COUNTS[c] for c in PERM]) if counts_known else None
    if record["prior"]:
        assert record["prior"]["counts"] == counts.tolist()
        q = p / (counts / counts.sum()) ** record["prior"]["tau"]
        p = q / q.sum(axis=1, keepdims=True)
    return Truth(record, ids, labels, names, models, tempered, members, p, counts)


def thirds(counts: np.ndarray) -> np.ndarray:
    """(C,) bucket per column: classes ranked by count (ties: lower column first), cut in three."""
    order = sorted(range(counts.size), key=lambda c: (-counts[c], c))
    bucket = np.empty(counts.size, dtype=int)
    for b, part in enumerate(np.array_split(np.array(order), 3)):
        bucket[part] = b
    return bucket


def error_correlation(hits: np.ndarray) -> np.ndarray:
    errors = 1.0 - hits.astype(float)
    m = len(errors)
    out = np.full((m, m), np.nan)
    for i in range(m):
        for j in range(m):
            a, b = errors[i] - errors[i].mean(), errors[j] - errors[j].mean()
            norm = math.sqrt((a * a).sum() * (b * b).sum())
            out[i, j] = 1.0 if i == j else ((a * b).sum() / norm if norm else np.nan)
    return out


# ---------------------------------------------------------------------------------------------
# The pages


@pytest.fixture(scope="module")
def pages(work, tmp_path_factory):
    """blend name -> (parsed page, page text), written from an empty folder (no ./runs, no ledger)."""
    out, here = tmp_path_factory.mktemp("pages"), os.getcwd()
    os.chdir(out)
    try:
        written = {name: write_report(getattr(work, name), out=out / f"{name}.html").path.read_text()
                   for name in ("full", "views", "single")}
    finally:
        os.chdir(here)
    return {name: (parse(text), text) for name, text in written.items()}


@pytest.fixture(scope="module")
def truths(work):
    return {"full": truth(work, work.full), "views": truth(work, work.views),
            "single": truth(work, work.single, counts_known=False)}


BLENDS = ("full", "views", "single")


@pytest.mark.parametrize("blend", BLENDS)
def test_heading_and_summary_numbers(pages, truths, blend):
    doc, _ = pages[blend]
    t = truths[blend]
    record, n = t.record, t.labels.size
    lead = [c for c in doc.one("body").children if isinstance(c, Node) and c.tag == "p"][0]
    assert lead.text() == (f"Why the blend is what it is: {len(record['models'])} models fitted on val "
                           f"({n} images, {len(PERM)} classes).")
    summary = section(doc, "summary")
    intro = summary.all("p", class_="lead")[0].text()
    assert intro.startswith(f"{record['cv']['folds']}-fold cross-validation on val ({n} images)")
    assert record["optimize"]["rows"] == n
    assert f"over {len(record['members'])} member{'s' if len(record['members']) > 1 else ''}" in summary.text()
    # The in-sample top-1 is the blend's own, on every row (not a member's, where they differ).
    in_sample = float((t.blend.argmax(axis=1) == t.labels).mean())
    cell(summary.one(data_key="in_sample_top1"), in_sample)
    if blend != "single":
        assert in_sample != float((next(iter(t.members.values())) == t.labels).mean())
    # The CV table and the weights are blend.json's, exactly.
    rows = summary.one("table", class_="cv").all("tr")[1:]
    assert [r["data-row"] for r in rows] == [r["name"] for r in record["cv"]["rows"]]
    assert summary.one(data_key="chosen").text() == record["cv"]["chosen"]
    assert summary.one(data_key="method").text() == record["method"]
    assert [r["data-row"] for r in rows if "used" in (r.attrs.get("class") or "")] == [record["cv"]["chosen"]]
    for tr, r in zip(rows, record["cv"]["rows"]):
        for key in ("top1", "top1_low", "top1_high", "topk", "nll"):
            node = tr.one("td", data_key=key)
            assert exact(node) == r[key] and node.text() == f"{r[key]:.4f}"
    cv = values(summary.one("svg", aria_label="CV top-1 per row"))
    assert cv == [{"name": r["name"], "top1": r["top1"], "top1_low": r["top1_low"], "top1_high": r["top1_high"],
                   "used": r["name"] == record["cv"]["chosen"]} for r in record["cv"]["rows"]]
    weights = summary.one("table", class_="weights").all("tr")[1:]
    temps = record["temperatures"] or {}
    assert [tr["data-member"] for tr in weights] == record["members"] == list(record["weights"])
    for tr in weights:
        member = tr["data-member"]
        node = tr.one("td", data_key="weight")
        assert exact(node) == record["weights"][member] and node.text() == f"{record['weights'][member]:.4f}"
        if temps:
            node = tr.one("td", data_key="temperature")
            assert exact(node) == temps[member] and node.text() == f"{temps[member]:.3f}"
        else:
            assert not tr.all("td", data_key="temperature")
    chart = summary.one("svg", aria_label="blend weights")
    tau = record["prior"]["tau"] if record["prior"] else None
    assert values(chart) == {"members": record["members"], "weights": list(record["weights"].values()), "tau": tau}
    texts = svg_texts(chart)
    assert [s for s in texts if re.fullmatch(r"\d\.\d{3}", s)] == [f"{w:.3f}" for w in record["weights"].values()]
    if tau is not None:
        node = summary.one(data_key="tau")
        assert exact(node) == tau and node.text() == f"{tau:.3f}"
        assert f"then corrected for the training prior: tau = {tau:.3f}" in texts


@pytest.mark.parametrize("blend", BLENDS)
def test_calibration_numbers(pages, truths, blend):
    doc, _ = pages[blend]
    t = truths[blend]
    calibration = section(doc, "calibration")
    before = {m: diagram(p, t.labels) for m, p in t.models.items()} | {"blend": diagram(t.blend, t.labels)}
    after = {m: diagram(p, t.labels) for m, p in t.tempered.items()}
    assert bool(after) == (blend == "full")
    rows = calibration.one("table", class_="ece").all("tr")[1:]
    assert [tr["data-row"] for tr in rows] == list(before)
    for tr in rows:
        name = tr["data-row"]
        cell(tr.one("td", data_key="ece"), before[name].ece)
        if after:
            cell(tr.one("td", data_key="ece_t"), after[name].ece if name in after else None)
        else:
            assert not tr.all("td", data_key="ece_t")
    chart = calibration.one("svg", aria_label="reliability diagrams")
    panels = values(chart)
    assert [p["title"] for p in panels] == list(before)
    for panel in panels:
        for got, want in ((panel["before"], before[panel["title"]]), (panel["after"], after.get(panel["title"]))):
            if want is None:
                assert got is None
                continue
            assert got["count"] == want.count.tolist()
            close(got["confidence"], want.confidence)
            close(got["accuracy"], want.accuracy)
            close(got["ece"], want.ece)
    # Each panel's title: its name, then its ECE (and the ECE after its temperature).
    texts = svg_texts(chart)
    for name, d in before.items():
        assert texts.count(name) == 1, name
        line = texts[texts.index(name) + 1]
        m = re.fullmatch(r"ECE (\S+)" + (r" → (\S+) \(T\)" if name in after else ""), line)
        assert m, line
        rounded(m.group(1), d.ece, 3)
        if name in after:
            rounded(m.group(2), after[name].ece, 3)


@pytest.mark.parametrize("blend", ["full", "views"])
def test_diversity_heatmaps_and_members(pages, truths, blend):
    doc, _ = pages[blend]
    t = truths[blend]
    diversity = section(doc, "diversity")
    names = list(t.members)
    predicted = np.stack(list(t.members.values()))
    hits = predicted == t.labels
    correlation = error_correlation(hits)
    disagreement = np.array([[(a != b).mean() for b in predicted] for a in predicted])
    for title, want in (("error correlation", correlation), ("disagreement", disagreement)):
        svg = diversity.one("svg", aria_label=title)
        got = values(svg)
        assert got["names"] == names
        close(got["values"], want, rtol=1e-12, atol=1e-12)
        # The numbers written on the cells are these values, row by row (NaN cells blank).
        texts = svg_texts(svg)
        drawn = texts[2 * len(names):texts.index(title)]
        assert drawn == [f"{v:.2f}" for v in want.ravel() if np.isfinite(v)], title
    assert not np.allclose(disagreement, np.array([[(a != b).mean() for b in hits] for a in hits]))
    rows = diversity.one("table", class_="members").all("tr")[1:]
    assert [tr["data-row"] for tr in rows] == names
    for tr, h in zip(rows, hits):
        cell(tr.one("td", data_key="top1"), float(h.mean()))
        weight = t.record["weights"][tr["data-row"]]
        node = tr.one("td", data_key="weight")
        assert exact(node) == weight and node.text() == f"{weight:.3f}"


@pytest.mark.parametrize("blend", ["full", "views"])
def test_long_tail_numbers(pages, truths, blend):
    doc, _ = pages[blend]
    t = truths[blend]
    longtail = section(doc, "longtail")
    bucket = thirds(t.counts)
    row_bucket = bucket[t.labels]
    table = longtail.one("table", class_="buckets")
    header = [th.text() for th in table.all("tr")[0].all("th")[1:]]
    want_header = []
    for b, label in enumerate(("head", "middle", "tail")):
        shown = t.counts[bucket == b]
        want_header.append(f"{label} ({shown.min()}-{shown.max()} training images per class, "
                           f"{(row_bucket == b).sum()} rows)")
    assert header == want_header
    predictors = {m: p.argmax(axis=1) for m, p in t.models.items()} | {"blend": t.blend.argmax(axis=1)}
    want = {}
    for name, pred in predictors.items():
        hit = pred == t.labels
        want[name] = [float(hit[row_bucket == b].mean()) if (row_bucket == b).any() else math.nan for b in range(3)]
    assert not np.allclose(want["blend"], want[MODELS[0]], equal_nan=True)  # the blend's row is its own
    rows = table.all("tr")[1:]
    assert [tr["data-row"] for tr in rows] == list(want)
    for tr in rows:
        for b, key in enumerate(("head", "middle", "tail")):
            cell(tr.one("td", data_key=key), want[tr["data-row"]][b], blank="-")
    chart = values(longtail.one("svg", aria_label="accuracy by class frequency"))
    assert chart["predictors"] == list(want) and chart["buckets"] == ["head", "middle", "tail"]
    close(chart["accuracy"], np.array(list(want.values())))


@pytest.mark.parametrize("blend", BLENDS)
def test_hardest_images_captions(pages, truths, blend):
    doc, _ = pages[blend]
    t = truths[blend]
    hardest = section(doc, "hardest")
    confidence, predicted = t.blend.max(axis=1), t.blend.argmax(axis=1)
    wrong = np.flatnonzero(predicted != t.labels)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:HARDEST]
    assert hardest.all("p", class_="lead")[0].text() == (
        f"The {shown.size} images of val the blend gets wrong with the most confidence, of {wrong.size} wrong. "
        "Often a label error, a look-alike class, or a mis-mapped model.")
    cards = hardest.all("figure", class_="thumb")
    assert [c["data-id"] for c in cards] == [str(i) for i in t.ids[shown].tolist()]
    for card, row in zip(cards, shown.tolist()):
        p_true, p_pred = t.blend[row, t.labels[row]], confidence[row]
        assert p_pred > p_true
        close(json.loads(card["data-true-probability"]), p_true)
        close(json.loads(card["data-confidence"]), p_pred)
        caption = card.one("figcaption").text()
        m = re.fullmatch(r"id (\S+)true: (.*) \(p (\S+)\)predicted: (.*) \(p (\S+)\)", caption)
        assert m, caption
        assert m.group(1) == str(t.ids[row]) and m.group(2) == t.names[t.labels[row]]
        assert m.group(4) == t.names[predicted[row]] == card.one("b").text()
        rounded(m.group(3), p_true, 3)
        rounded(m.group(5), p_pred, 3)


def store_sha(store: Path, views: bool) -> str:
    digest = hashlib.sha256()
    for name in ("ids.npy", "logits.npy") + (("views.npy",) if views else ()):
        digest.update((store / name).read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("blend", BLENDS)
def test_footer_hashes_and_no_note(work, pages, truths, blend):
    doc, _ = pages[blend]
    t = truths[blend]
    folder = getattr(work, blend)
    footer = doc.one("footer")
    blend_sha = hashlib.sha256((folder / "blend.json").read_bytes()).hexdigest()
    assert footer.one(data_key="blend_sha256").text() == blend_sha
    text = footer.text()
    for model in t.record["models"]:
        sha = store_sha(work.runs / model / "val", bool(t.record["views"]))
        assert sha == t.record["optimize"]["stores"][model] and f"{model}/val sha256 {sha}" in text
    # The labels are the very json the stores were made from: no note.
    assert not [p for p in doc.all("p", class_="note") if p.text().startswith("Note: ")]


def test_a_note_says_the_labels_are_not_the_stores_json(work, tmp_path, monkeypatch):
    """The same labels from another file (its bytes differ): the page says so, in a note of its
    own, with both files named, and shows the same numbers."""
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    doc = json.loads((work.data / "val2019.json").read_text())
    (other / "val2019.json").write_text(json.dumps(doc, indent=1))
    manifest = json.loads((work.runs / MODELS[0] / "val" / "manifest.json").read_text())
    source = manifest["dataset"]["source"]
    assert source.endswith("val2019.json") and Path(source).resolve() != (other / "val2019.json").resolve()
    result = write_report(work.full, data=other, out=tmp_path / "r.html")
    page = parse(result.path.read_text())
    notes = [p.text() for p in page.all("p", class_="note") if p.text().startswith("Note: ")]
    want = (f"the labels in {other / 'val2019.json'} are not from the json the stores were made from ({source}); "
            "check that they label the same images")
    assert notes == [f"Note: {want}"] and result.notes == (want,)


def test_leaderboard_numbers(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blend = copy_work(work, tmp_path / "w")
    root = tmp_path / "w"
    given = {add_ledger(root, "blends/full", (0.7, 0.6, 0.8), 0.35, 0.33): ((0.7, 0.6, 0.8), 0.35, 0.33, True),
             add_ledger(root, "blends/other", (0.5, 0.45, 0.55), 0.52, None): ((0.5, 0.45, 0.55), 0.52, None, False)}
    add_ledger(root, "blends/full", (0.9, 0.8, 1.0), None, None)  # no score: not shown
    board = section(parse(write_report(blend).path.read_text()), "leaderboard")
    rows = board.one("table", class_="ledger").all("tr")[1:]
    assert [int(tr["data-row"]) for tr in rows] == list(given)
    chart = values(board.one("svg", aria_label="CV against leaderboard"))
    assert [p["id"] for p in chart] == list(given)
    for tr, point, (row_id, ((cv, low, high), public, private, mine)) in zip(rows, chart, given.items()):
        cells_ = [td.text() for td in tr.all("td")]
        assert cells_[0] == str(row_id) and cells_[1] == f"s{list(given).index(row_id)}.csv"
        assert cells_[2] == f"{1 - cv:.4f} ({1 - high:.4f}-{1 - low:.4f})"
        assert cells_[3:] == ["" if public is None else f"{public:.4f}", "" if private is None else f"{private:.4f}"]
        assert ("used" in (tr.attrs.get("class") or "")) == mine
        close([point["cv_error"], point["cv_error_low"], point["cv_error_high"]], [1 - cv, 1 - high, 1 - low])
        assert (point["public"], point["private"], point["this_blend"]) == (public, private, mine)


def test_figure_values_are_json_in_an_escaped_attribute():
    """Names are text in ``data-values``, never markup; NaN is null."""
    names = ['a"<b>&amp;', "</svg><script>x</script>"]
    svg = heatmap(np.array([[1.0, np.nan], [np.nan, 1.0]]), names, "error correlation", -1.0, 1.0, "RdBu_r")
    head = svg[:svg.index(">") + 1]
    assert "<script" not in head and "<b>" not in head
    node = parse(svg).one("svg")
    assert values(node) == {"names": names, "values": [[1.0, None], [None, 1.0]]}
