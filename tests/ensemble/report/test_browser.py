"""The report in a real browser: Debian's Chromium, headless, the network off.

The page of a small end-to-end blend (with a ledger, so every section has its inputs) and that of
a one-model blend (three sections stand in with their line) are opened from file:// with
playwright's client driving the system's Chromium (never a browser playwright downloads). Each
must load without a console error, a page error or a request leaving the file, show its
sections, draw every figure and thumbnail at a non-zero size, and show the numbers of blend.json.

A screenshot of each page is written to the test's temporary folder; set ENS_REPORT_SCREENSHOT to
a folder to keep them there too. No Chromium is a failure, not a skip: `make test` and .ci/run
install it (.ci/ensure-browser); elsewhere install Debian's `chromium` or point ENS_CHROMIUM at
a Chromium binary.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ensemble.report import write_report
from ensemble.report.page import SECTIONS

from tests.ensemble.report.conftest import add_ledger, copy_work

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def chromium() -> str:
    path = os.environ.get("ENS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no Chromium to open the report in: install Debian's chromium (`.ci/ensure-browser` does, as "
                    "root) or set ENS_CHROMIUM to a Chromium binary")
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -c constraints.txt -e '.[test]'")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-proxy-server"])
        yield browser
        browser.close()


def open_offline(browser, page_path: Path, screenshot: Path):
    """Open ``page_path`` with the network off; return the page and what went wrong while loading."""
    context = browser.new_context(offline=True, viewport={"width": 1100, "height": 900})
    problems: list[str] = []
    page = context.new_page()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} ({r.failure})"))
    page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else
            problems.append(f"request off the file: {r.url}"))
    page.goto(page_path.resolve().as_uri(), wait_until="load")
    page.screenshot(path=str(screenshot), full_page=True)
    if os.environ.get("ENS_REPORT_SCREENSHOT"):
        keep = Path(os.environ["ENS_REPORT_SCREENSHOT"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, keep / screenshot.name)
    return context, page, problems


def rendered_sizes(page, selector: str) -> list[tuple[float, float]]:
    return page.eval_on_selector_all(
        selector, "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; })")


def test_full_report_in_chromium(work, browser, tmp_path):
    blend = copy_work(work, tmp_path / "w")
    add_ledger(tmp_path / "w", "blends/full", (0.7, 0.6, 0.8), 0.35, 0.33)
    add_ledger(tmp_path / "w", "blends/other", (0.5, 0.45, 0.55), 0.52, None)
    record = json.loads((blend / "blend.json").read_text())
    result = write_report(blend)
    context, page, problems = open_offline(browser, result.path, tmp_path / "report-full.png")
    try:
        assert problems == []
        for sid, heading in SECTIONS.items():
            section = page.locator(f"section#{sid}")
            assert section.count() == 1 and section.get_attribute("data-missing") is None, sid
            assert section.locator("h2").inner_text() == heading
            assert section.locator("svg.figure").count() >= (0 if sid == "hardest" else 1), sid
        figures = rendered_sizes(page, "svg.figure")
        assert len(figures) == 7 and all(w > 50 and h > 50 for w, h in figures), figures
        images = page.eval_on_selector_all("section#hardest img", "els => els.map(e => [e.complete, e.naturalWidth, "
                                           "e.getBoundingClientRect().width, e.getBoundingClientRect().height])")
        assert images and all(done and natural > 0 and w > 0 and h > 0 for done, natural, w, h in images)

        # The numbers, read from the rendered DOM, are blend.json's.
        cv = page.eval_on_selector_all("table.cv tr[data-row]", """rows => rows.map(r => [r.dataset.row,
            Object.fromEntries([...r.querySelectorAll('td[data-key]')].map(c => [c.dataset.key,
            [JSON.parse(c.dataset.value), c.innerText]]))])""")
        assert [name for name, _ in cv] == [r["name"] for r in record["cv"]["rows"]]
        for (name, shown), row in zip(cv, record["cv"]["rows"]):
            for key in ("top1", "top1_low", "top1_high", "topk", "nll"):
                assert shown[key] == [row[key], f"{row[key]:.4f}"], (name, key)
        weights = page.eval_on_selector_all("table.weights tr[data-member]", """rows => rows.map(r => [r.dataset.member,
            JSON.parse(r.querySelector('td[data-key=weight]').dataset.value),
            JSON.parse(r.querySelector('td[data-key=temperature]').dataset.value)])""")
        assert weights == [[m, w, record["temperatures"][m]] for m, w in record["weights"].items()]
        tau = page.locator("[data-key=tau]")
        assert json.loads(tau.get_attribute("data-value")) == record["prior"]["tau"]
        assert tau.inner_text() == f"{record['prior']['tau']:.3f}"
        assert page.locator("[data-key=chosen]").inner_text() == record["cv"]["chosen"]
        assert page.locator("table.ledger tr.used").count() == 1
        # Each figure's numbers reach the DOM as JSON (test_report_numbers.py checks them against the stores).
        drawn = dict(page.eval_on_selector_all("svg.figure", """els => els.map(e => [e.getAttribute('aria-label'),
            JSON.parse(e.getAttribute('data-values'))])"""))
        assert len(drawn) == 7
        for title, diagonal in (("error correlation", 1.0), ("disagreement", 0.0)):
            assert drawn[title]["names"] == record["members"]
            assert [row[i] for i, row in enumerate(drawn[title]["values"])] == [diagonal] * len(record["members"])
        assert drawn["blend weights"]["weights"] == list(record["weights"].values())
    finally:
        context.close()


def test_missing_sections_show_their_line_in_chromium(work, browser, tmp_path):
    result = write_report(work.single, out=tmp_path / "single.html")
    context, page, problems = open_offline(browser, result.path, tmp_path / "report-single.png")
    try:
        assert problems == []
        for sid in SECTIONS:
            section = page.locator(f"section#{sid}")
            missing = sid in ("diversity", "longtail", "leaderboard")
            assert section.count() == 1 and (section.get_attribute("data-missing") == "true") == missing, sid
            if missing:
                line = section.locator("p.missing")
                assert line.count() == 1 and line.is_visible() and line.inner_text().startswith("Not shown: ")
                assert section.locator("svg").count() == 0
        assert all(w > 50 and h > 50 for w, h in rendered_sizes(page, "svg.figure"))
        assert len(rendered_sizes(page, "svg.figure")) == 3
    finally:
        context.close()


def test_the_harness_sees_requests_and_console_errors(browser, tmp_path):
    """The checks above can fail: a page that fetches from the network or logs an error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="http://192.0.2.1/x.png">'
                   '<script>console.error("broken")</script></body></html>')
    context, _, problems = open_offline(browser, bad, tmp_path / "bad.png")
    context.close()
    assert any("console error: broken" in p for p in problems), problems
    assert any("http://192.0.2.1/x.png" in p for p in problems), problems
