"""The documentation stays true to the tree: README.md is a front door, docs/ the manual.

- ``docs/design.md``'s Layout section names every Python module of ``ensemble``, ``exporters``,
  ``weights_search`` and ``benchmarks`` by path, one list line each (``- `PATH` ...``), and
  design.md names no module path that does not exist;
- README.md is at most 250 lines, and every link of README.md and of the docs pages to a file
  of the repository (``docs/blend.md``, ``report.png``, ``../README.md``) resolves, anchors
  (``#the-blend-folder``) included, by GitHub's rule for heading anchors;
- README.md links every page of the manual (those named here, and any other docs/*.md);
- a path to a Python file named in README.md or in a docs page (``tests/test_install.py``)
  exists.

Failures list every offending path or link, so one run shows all the gaps.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
DESIGN = DOCS / "design.md"

PACKAGES = ("ensemble", "exporters", "weights_search", "benchmarks")
README_MAX_LINES = 250
# The manual: one page per command and topic (testing.md: the test suite and its markers).
PAGES = (
    "export", "infer", "blend", "report", "submit",
    "gpu", "scaling", "benchmarks", "design", "testing",
)

_MODULE_PATH = re.compile(r"`((?:%s)/[\w/]*\.py)`" % "|".join(PACKAGES))
_LAYOUT_ENTRY = re.compile(r"^- `([^`]+)`\s+\S")
_ANY_PY_PATH = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.py)\b[^`]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _module_files() -> set[str]:
    """Every .py file of the packages, as a path relative to the repository root."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def _prose(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _section(text: str, heading: str) -> list[str]:
    """The lines of the level-2 section ``## heading`` (up to the next level-1 or -2 heading)."""
    lines = _prose(text)
    starts = [i for i, line in enumerate(lines) if line.strip() == f"## {heading}"]
    assert len(starts) == 1, f"docs/design.md: expected one '## {heading}' section, found {len(starts)}"
    body = []
    for line in lines[starts[0] + 1:]:
        if re.match(r"^#{1,2} ", line):
            break
        body.append(line)
    return body


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6} (.+?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _local_links(page: Path) -> list[str]:
    """Links of a markdown page to files of the repository (not web addresses)."""
    links = []
    for line in _prose(page.read_text(encoding="utf-8")):
        for target in _LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                links.append(target)
    return links


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _local_links(page):
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        where = f"{_shown(page)}: ({target})"
        if not resolved.exists():
            broken.append(f"{where}: {file_part} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{where}: {_shown(resolved)} has no heading with anchor #{anchor}")
    return broken


def _shown(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_design_layout_names_every_module_and_no_other():
    layout = [m.group(1) for line in _section(DESIGN.read_text(encoding="utf-8"), "Layout")
              if (m := _LAYOUT_ENTRY.match(line)) and _MODULE_PATH.fullmatch(f"`{m.group(1)}`")]
    named_anywhere = set(_MODULE_PATH.findall(DESIGN.read_text(encoding="utf-8")))
    modules = _module_files()

    missing = sorted(modules - set(layout))
    extra = sorted((set(layout) | named_anywhere) - modules)
    twice = sorted({path for path in layout if layout.count(path) > 1})
    problems = []
    if missing:
        problems.append("modules that docs/design.md's Layout does not list (add a line "
                        "'- `PATH` what it holds'):\n  " + "\n  ".join(missing))
    if extra:
        problems.append("paths docs/design.md names that do not exist:\n  " + "\n  ".join(extra))
    if twice:
        problems.append("paths the Layout lists more than once:\n  " + "\n  ".join(twice))
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move the detail to a page "
        "under docs/")


def test_readme_links_every_page_of_the_manual():
    linked = {target.partition("#")[0] for target in _local_links(README)}
    pages = dict.fromkeys([f"docs/{name}.md" for name in PAGES]
                          + [page.relative_to(ROOT).as_posix() for page in sorted(DOCS.glob("*.md"))])
    unlinked = [page for page in pages if page not in linked]
    assert not unlinked, "README.md does not link: " + ", ".join(unlinked)


def test_links_between_readme_and_docs_resolve():
    broken = list(dict.fromkeys(problem for page in _markdown_pages() for problem in _broken_links(page)))
    assert not broken, "links that do not resolve:\n  " + "\n  ".join(broken)


def test_python_files_named_in_the_docs_exist():
    absent = []
    for page in _markdown_pages():
        for line in page.read_text(encoding="utf-8").splitlines():
            for path in _ANY_PY_PATH.findall(line):
                if "/" in path and not (ROOT / path).exists():
                    absent.append(f"{page.relative_to(ROOT)}: {path}")
    absent = sorted(set(absent))
    assert not absent, "files named in the docs that do not exist:\n  " + "\n  ".join(absent)


def test_the_test_itself_can_fail(tmp_path):
    """The checks above are not vacuous: a slug, a broken link and an unlisted module are caught."""
    assert _slug("`ens report`: why the blend is what it is") == "ens-report-why-the-blend-is-what-it-is"
    assert _slug("Test images the predictions lack: `--missing fail|prior`") == (
        "test-images-the-predictions-lack---missing-failprior")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[a](page.md#title) [b](page.md#nope) [c](gone.md) "
                    "[d](https://example.org/x.md)\n```\n[e](in-code.md)\n```\n", encoding="utf-8")
    assert _local_links(page) == ["page.md#title", "page.md#nope", "gone.md"]
    assert [problem.split(": ", 1)[1] for problem in _broken_links(page)] == [
        f"(page.md#nope): {page} has no heading with anchor #nope",
        "(gone.md): gone.md does not exist",
    ]
    assert _module_files() >= {"ensemble/cli.py", "weights_search/prior.py"}
    layout = _section("## Layout\n\n- `ensemble/cli.py` the command line\n- `x.py`\n## Next\n"
                      "- `ensemble/errors.py` after\n", "Layout")
    assert [m.group(1) for line in layout if (m := _LAYOUT_ENTRY.match(line))] == ["ensemble/cli.py"]
