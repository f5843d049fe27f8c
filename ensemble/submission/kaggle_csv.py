"""The competition CSV: formats, the checks every file passes before it is written, the writing.

A format (:data:`FORMATS`, looked up with :func:`get_format`) names the header, how many
category ids each row carries, its competition's year and the splits that hold its test images
and categories; the files of those splits are found under ``--data`` by the one rule every
command uses, :func:`ensemble.formats.dataset.find_split`, the format's own layout first
(``test2019.json``, ``test2018.json``, iNat 2021's ``public_test.json``).
Every format here is scored like this (``COMPETITION.md``): a grader sorts the rows by id,
requires exactly the test ids, splits ``predicted`` on whitespace and compares the first
``scored`` ids, read as integers, with the truth; any further ids are ignored.

Checks work on the file's text: each CSV is read in blocks of rows (:func:`read_csv_blocks`, as
many as ``--memory`` allows: only each row's numbers are kept, so memory does not grow with the
test images) with every cell as a string (nothing becomes NaN, nothing is rounded through a
float), and :func:`check_rows` finds the first problem over the whole file:
non-integer, duplicated, missing or extra ids, empty or NaN predictions, the wrong number of
category ids per row (the format's, or every category of a dataset that knows fewer:
:func:`row_width`), category ids the dataset does not know and, with a sample submission,
ids other than the sample's. The message names the first offending lines (the header is
line 1). ``ens submit`` runs the same checks on the rows it builds from ``ens blend`` output
before it writes anything (missing test ids are no error there when ``--missing prior`` fills
them, :mod:`ensemble.submission.fill`), and ``ens submit --check`` on any CSV.

Written files hold one row per test image, ids ascending, ``\\n`` line ends, no index column,
and are byte-for-byte reproducible (gzip ones too: the gzip header carries no time or name).
A file is only ever created, never replaced (:func:`ensemble.fileio.write_new`): a name already taken, even
by a run that chose it in the same second, gets ``-2``, ``-3``...
"""

from __future__ import annotations

import datetime as dt
import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from ensemble.fileio import name_max
from ensemble.formats.common import check_regular, is_int, read_json
from ensemble.formats.dataset import find_split, load_split, split_candidates
from ensemble.formats.predictions import header_top_k
from ensemble.errors import EnsError, printable

#: How many offending lines or ids an error message names before "and N more".
_SHOWN = 5
#: Ids and category ids: decimal digits, at most 18 so that every value fits in int64.
_INTEGER = r"[0-9]{1,18}"
#: Cells that hold no category id: empty (also what pandas writes for NaN) or NaN spelled out.
_EMPTY = ("", "nan", "NaN", "NAN")


@dataclass(frozen=True)
class SubmissionFormat:
    """One competition's CSV.

    ``top_k`` category ids per row, most confident first, space separated; the grader scores
    the first ``scored`` of them. ``year`` picks the file names :func:`find_split` tries first.
    ``test_split`` lists the test images; the ``categories`` of the ``category_splits`` found
    give the known category ids (the union of those present).
    """

    name: str
    id_column: str
    predicted_column: str
    top_k: int
    scored: int
    year: int
    test_split: str
    category_splits: tuple[str, ...]

    @property
    def header(self) -> str:
        return f"{self.id_column},{self.predicted_column}"


FORMATS: dict[str, SubmissionFormat] = {
    # iNat 2019 at FGVC6: top-1 error, five ids encouraged.
    "inat2019": SubmissionFormat("inat2019", "id", "predicted", 5, 1, 2019, "test", ("train", "val", "test")),
    # iNat 2018 at FGVC5: top-3 error, so three ids.
    "inat2018": SubmissionFormat("inat2018", "id", "predicted", 3, 3, 2018, "test", ("train", "val", "test")),
    # iNat 2021 at FGVC8: top-1 error like 2019, capitalised header, files without a year
    # (public_test.json, train_mini.json). Five ids as in 2019: only the first is scored, the
    # rest keep the ranking for reading.
    "inat2021": SubmissionFormat("inat2021", "Id", "Predicted", 5, 1, 2021, "test",
                                 ("train", "train_mini", "val", "test")),
}


def get_format(name: str) -> SubmissionFormat:
    """The format registered as ``name``."""
    try:
        return FORMATS[name]
    except KeyError:
        raise EnsError(f"--format {name}: choose one of {', '.join(FORMATS)}") from None


#: The format a competition's layout names, by the test json only that competition ships
#: (COMPETITION.md). ``test.json`` and ``test2017.json`` name none: they take the default.
LAYOUTS = {"test2019.json": "inat2019", "test2018.json": "inat2018", "public_test.json": "inat2021"}
#: The format of a ``--data`` folder whose layout names none.
DEFAULT_FORMAT = "inat2019"


def choose_format(data: str | os.PathLike, name: str | None) -> tuple[SubmissionFormat, tuple[str, ...]]:
    """The format of ``--format name`` (``None``: the one ``--data``'s layout names, else
    :data:`DEFAULT_FORMAT`) and the warnings to print: a ``--format`` that disagrees with the
    layout is honoured, with a warning. A folder holding the test jsons of several layouts
    needs ``--format``."""
    named = {}
    if Path(data).is_dir():
        named = {file: fmt for file, fmt in LAYOUTS.items() if (Path(data) / file).is_file()}
    if name is None:
        if len(set(named.values())) > 1:
            held = ", ".join(f"{file} ({fmt})" for file, fmt in named.items())
            raise EnsError(f"--data {data}: holds the test jsons of several competitions, {held}; "
                           "give --format to pick one")
        return get_format(next(iter(named.values()), DEFAULT_FORMAT)), ()
    fmt = get_format(name)
    if named and fmt.name not in named.values():
        file, layout = next(iter(named.items()))
        return fmt, (f"--format {fmt.name} on --data {data}, whose {file} is the {layout} layout "
                     f"({get_format(layout).header}); writing {fmt.header} as asked",)
    return fmt, ()


@dataclass(frozen=True)
class Reference:
    """What a submission is checked against.

    ``test_ids``: ``(images,)`` int64, sorted, from ``test_source``; ``categories``:
    ``(categories,)`` int64, sorted, the known category ids; ``sample_ids``: ``(rows,)`` int64
    sorted ids of the sample submission at ``sample_source``, or ``None`` without one.
    """

    test_source: Path
    test_ids: np.ndarray
    categories: np.ndarray
    sample_source: Path | None = None
    sample_ids: np.ndarray | None = None
    #: sha256 of ``test_source``'s bytes, as the stores record their json's (``None``: not known)
    test_sha256: str | None = None


def row_width(fmt: SubmissionFormat, reference: Reference) -> int:
    """Category ids per row: the format's ``top_k``, or every category of a dataset that
    knows fewer (no row can rank more distinct known ids; the grader reads what is there)."""
    return min(fmt.top_k, int(reference.categories.size))


@dataclass(frozen=True)
class Submission:
    """Checked rows ready to write: ``ids`` ``(rows,)`` int64 ascending, ``categories``
    ``(rows, width)`` int64, most confident first (``width``: :func:`row_width`)."""

    format: SubmissionFormat
    ids: np.ndarray
    categories: np.ndarray


# ---------------------------------------------------------------------------------------- reading

#: What a CSV row read as text costs while its block is checked, counted generously: each cell a
#: Python string (id, five category ids, five probabilities) and the category ids split into
#: tokens. Rows per block: the memory budget over this, at most :data:`MAX_BLOCK_ROWS`.
ROW_BYTES = 2048
#: Rows per block at most: beyond it a block saves no time.
MAX_BLOCK_ROWS = 1 << 16


def block_rows(memory: int | None) -> int:
    """Rows of a CSV read and checked at a time within ``memory`` bytes (None: the default
    budget, :func:`ensemble.memory.memory_budget`). A cap, not a size: every budget ``--memory``
    accepts (:data:`ensemble.memory.MIN_GIB` and up) has room for :data:`MAX_BLOCK_ROWS` rows
    (128 MB), so at the command line it is always that many (docs/submit.md says so)."""
    if memory is None:
        from ensemble.memory import memory_budget
        memory = memory_budget()
    return int(min(MAX_BLOCK_ROWS, max(1, memory // ROW_BYTES)))


def read_csv_blocks(path: str | os.PathLike, rows: int = MAX_BLOCK_ROWS) -> Iterator[pd.DataFrame]:
    """A CSV (or ``.csv.gz``) in blocks of ``rows`` rows, every cell kept as its text; short rows
    get empty cells. Each block's columns are the header line as written and its index the row
    numbers (0 for the first row after the header, that is line 2 of the file); a file with a
    header and no rows is one empty block. A file pandas cannot read is an :class:`EnsError`
    naming it when the block holding the problem is reached."""
    path = Path(path)
    if not path.exists():
        raise EnsError(f"{path}: no such file")
    check_regular(path)  # a FIFO would make pandas wait forever; a folder is no CSV
    header: list[str] | None = None
    try:
        # header=None keeps the header line as written (pandas would rename a repeated name).
        with pd.read_csv(path, header=None, dtype=str, keep_default_na=False, na_filter=False,
                         chunksize=rows + 1) as reader:
            for table in reader:
                if header is None:
                    header = [str(c) for c in table.iloc[0]]
                    table = table.iloc[1:]
                table.columns = header
                table.index = table.index - 1
                yield table
    except pd.errors.EmptyDataError:
        raise EnsError(f"{path}: empty file, expected a header line") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        reason = " ".join(str(exc).split())
        raise EnsError(f"{path}: not a readable CSV ({reason})") from None


def find_test_file(data: str | os.PathLike, fmt: SubmissionFormat) -> Path:
    """The json of the format's test split under ``data`` (``test2019.json``, ``public_test.json``...)."""
    found = find_split(data, fmt.test_split, year=fmt.year, folders=False, required=False)
    if found is None:
        tried = split_candidates(fmt.test_split, fmt.year, folders=False)
        raise EnsError(f"--data {data}: no {fmt.test_split} json for --format {fmt.name} "
                       f"(looked for {', '.join(tried)})")
    return found


def load_reference(data: str | os.PathLike, fmt: SubmissionFormat,
                   sample: str | os.PathLike | None = None, memory: int | None = None) -> Reference:
    """The test ids and known categories under ``--data DIR`` and, optionally, a sample's ids
    (read in blocks of rows within ``memory`` bytes: :func:`block_rows`)."""
    data = Path(data)
    if not data.is_dir():
        raise EnsError(f"--data {data}: no such folder")
    test_source = find_test_file(data, fmt)
    split = load_split(test_source)
    if any(not isinstance(i, int) for i in split.ids):
        raise EnsError(f"{test_source}: image ids are not integers; {fmt.name} submissions need integer ids")
    categories = _categories(data, fmt)
    sample_source = sample_ids = None
    if sample is not None:
        sample_source = Path(sample)
        sample_ids = _sample_ids(sample_source, fmt, memory)
    return Reference(test_source=test_source, test_ids=np.sort(np.asarray(split.ids, dtype=np.int64)),
                     categories=categories, sample_source=sample_source, sample_ids=sample_ids,
                     test_sha256=split.sha256)


def _categories(data: Path, fmt: SubmissionFormat) -> np.ndarray:
    known: set[int] = set()
    found: list[Path] = []
    absent: list[str] = []
    for split in fmt.category_splits:
        path = find_split(data, split, year=fmt.year, folders=False, required=False)
        if path is None:
            absent.append(split)
        else:
            found.append(path)
    for path in found:
        doc = read_json(path)
        for i, category in enumerate(doc.get("categories") or () if isinstance(doc, dict) else ()):
            cid = category.get("id") if isinstance(category, dict) else None
            if not is_int(cid):
                raise EnsError(f"{path}: categories[{i}] has id {cid!r}; expected an integer")
            known.add(cid)
    if not known:
        where = ("any of " if len(found) > 1 else "") + ", ".join(p.name for p in found)
        raise EnsError(f"--data {data}: no categories in {where}"
                       + (f" and no {' or '.join(absent)} json" if absent else ""))
    return np.array(sorted(known), dtype=np.int64)


def _sample_ids(path: Path, fmt: SubmissionFormat, memory: int | None = None) -> np.ndarray:
    ids, bad = [], _Found()
    for block in read_csv_blocks(path, block_rows(memory)):
        if not ids:
            check_header(block, fmt, f"--sample {path}")
        column = block[fmt.id_column]
        valid = column.str.fullmatch(_INTEGER).to_numpy(dtype=bool)
        bad.add(block.index.to_numpy()[~valid])
        ids.append(column[valid].astype(np.int64).to_numpy())
    if bad:
        raise EnsError(f"--sample {path}: non-integer id on {bad.lines()}")
    return np.sort(np.concatenate(ids))


def read_predictions(path: str | os.PathLike, fmt: SubmissionFormat, reference: Reference,
                     models_predict: int | None = None, memory: int | None = None) -> Iterator[pd.DataFrame]:
    """``ens blend``'s ``predictions.csv`` (``id,category_1..K,prob_1..K``) in blocks of rows
    (:func:`block_rows` of ``memory`` bytes), each as the two text columns of ``fmt``: the id,
    and the first :func:`row_width` categories joined by spaces; its index is the row number
    (row ``i`` is line ``i + 2`` of the file), so check messages name its lines.

    ``models_predict``: how many categories the blended models predict (blend.json's
    ``class_ids``), ``None`` when unknown; it decides what a file with too few per row is told.
    The header is checked when the first block is read.
    """
    width = row_width(fmt, reference)
    first = True
    for frame in read_csv_blocks(path, block_rows(memory)):
        if first:
            given = header_top_k(list(frame.columns))
            if given is None:
                raise EnsError(f"{path}: header {_header(frame)}; expected id,category_1,...,category_K,"
                               "prob_1,...,prob_K (the predictions.csv of `ens blend`)")
            if given < width:
                raise EnsError(f"{path}: {given} categories per row (category_1..category_{given}); "
                               f"{_too_few(fmt, width, reference, models_predict)}")
            first = False
        predicted = frame["category_1"]
        for k in range(2, width + 1):
            predicted = predicted + " " + frame[f"category_{k}"]
        yield pd.DataFrame({fmt.id_column: frame["id"], fmt.predicted_column: predicted})


def _too_few(fmt: SubmissionFormat, width: int, reference: Reference, models_predict: int | None) -> str:
    """What is true, and what to do, when rows hold fewer than ``width`` categories: `ens blend`
    writes min(--top-k, the models' categories) per row."""
    wants = f"--format {fmt.name} needs {width} of the dataset's {reference.categories.size} categories"
    if models_predict is None:
        return (f"{wants}: blend again with --top-k {width}; if the models predict fewer than {width} "
                f"categories, no blend of them can fill a row: blend models that predict at least {width}")
    if models_predict < width:
        return (f"{wants}, and the models predict only {models_predict} categories: no blend of them can fill a "
                f"row; blend models that predict at least {width} (exported with the dataset's categories)")
    return f"{wants}: blend again with --top-k {width}"


# --------------------------------------------------------------------------------------- checking

def check_header(frame: pd.DataFrame, fmt: SubmissionFormat, source: str | os.PathLike) -> None:
    """The header must be exactly the format's."""
    if ",".join(frame.columns) != fmt.header:
        raise EnsError(f"{source}: header {_header(frame)}; --format {fmt.name} expects {fmt.header}")


class _Found:
    """The rows one check flagged, over the blocks of a file in order: how many, and the first
    :data:`_SHOWN` with their text (when the check shows it)."""

    def __init__(self) -> None:
        self.count = 0
        self.shown: list[tuple[int, str | None]] = []

    def add(self, rows: np.ndarray, texts: pd.Series | None = None) -> None:
        """Flag ``rows`` (row numbers, ascending); ``texts``: the block's column to show, by row."""
        self.count += int(rows.size)
        for row in rows[:_SHOWN - len(self.shown)].tolist():
            self.shown.append((row, None if texts is None else texts.loc[row]))

    def __bool__(self) -> bool:
        return self.count > 0

    def lines(self) -> str:
        """``lines 3 ('x'), 7 ('y') and 4 more``."""
        shown = [f"{r + 2} ({text!r})" if text is not None else str(r + 2) for r, text in self.shown]
        more = f" and {self.count - _SHOWN} more" if self.count > _SHOWN else ""
        return f"line{'s' if self.count > 1 else ''} {', '.join(shown)}{more}"


def check_rows(frames: pd.DataFrame | Iterable[pd.DataFrame], fmt: SubmissionFormat, reference: Reference,
               source: str | os.PathLike, *, allow_missing: bool = False, hint: str = "") -> Submission:
    """Check the text rows of a submission against ``reference``; return them as numbers.

    ``frames``: the format's two columns as strings, one frame or blocks of rows in file order
    (:func:`read_predictions`, :func:`read_csv_blocks`), indexed by row number, row ``i`` being
    line ``i + 2`` of ``source``. Each block is checked as it comes and only its numbers are
    kept (``(rows,)`` ids and ``(rows, width)`` category ids); then the first problem found,
    in the order of the checks below over the whole file, raises :class:`EnsError` naming
    ``source`` and the first offending lines (or, for missing ids, the ids, followed by
    ``hint``). ``allow_missing``: test ids absent from the rows are no error, for a caller that
    fills them; with a sample, they must then be among the sample's ids.
    """
    width = row_width(fmt, reference)
    not_int_id, empty, wrong, not_int = _Found(), _Found(), _Found(), _Found()
    values, categories, texts = [], [], {}
    for frame in [frames] if isinstance(frames, pd.DataFrame) else frames:
        rows = frame.index.to_numpy()
        ids = frame[fmt.id_column]
        predicted = frame[fmt.predicted_column]
        valid = ids.str.fullmatch(_INTEGER).to_numpy(dtype=bool)
        not_int_id.add(rows[~valid], ids)
        if not not_int_id:
            numbers = ids.astype(np.int64).to_numpy()
            values.append(numbers)
            # An id written otherwise than as its number ('007'): its text, for the messages.
            odd = np.flatnonzero(ids.to_numpy(dtype=object) != numbers.astype(str).astype(object))
            texts.update(zip(rows[odd].tolist(), ids.iloc[odd].tolist()))
        tokens = predicted.str.split(" ")
        flat = tokens.explode()  # one token per entry, indexed by row
        bad = flat.isin(_EMPTY).groupby(level=0, sort=False).any().reindex(frame.index).to_numpy(dtype=bool)
        empty.add(rows[bad], predicted)
        counts = tokens.str.len().to_numpy()
        wrong.add(rows[counts != width], predicted)
        bad = (~flat.str.fullmatch(_INTEGER)).groupby(level=0, sort=False).any().reindex(frame.index)
        not_int.add(rows[bad.to_numpy(dtype=bool)], predicted)
        if not (empty or wrong or not_int):
            categories.append(flat.astype(np.int64).to_numpy().reshape(-1, width))
        del ids, predicted, tokens, flat

    if not_int_id:
        raise EnsError(f"{source}: non-integer id on {not_int_id.lines()}")
    values = np.concatenate(values) if values else np.zeros(0, np.int64)

    def text(row: int) -> str:
        return texts.get(row, str(values[row]))

    def found(mask: np.ndarray, shown: bool = True) -> _Found:
        rows = np.flatnonzero(mask)
        flagged = _Found()
        flagged.add(rows, pd.Series([text(r) for r in rows[:_SHOWN].tolist()], index=rows[:_SHOWN]) if shown
                    else None)
        return flagged

    order = np.argsort(values, kind="stable")
    repeated = np.zeros(values.size, bool)
    repeated[order[1:]] = values[order[1:]] == values[order[:-1]]  # each value's first row is not repeated
    if repeated.any():
        raise EnsError(f"{source}: duplicated id on {found(repeated).lines()}")
    extra = ~np.isin(values, reference.test_ids)
    if extra.any():
        raise EnsError(f"{source}: id not in {reference.test_source.name} on {found(extra).lines()}")
    missing = np.setdiff1d(reference.test_ids, values)
    if missing.size and not allow_missing:
        raise EnsError(f"{source}: {_count(missing.size, 'test id')} of {reference.test_source.name} missing: "
                       f"{_listed(missing)}{hint}")
    if reference.sample_ids is not None:
        name = reference.sample_source.name
        extra = ~np.isin(values, reference.sample_ids)
        if extra.any():
            raise EnsError(f"{source}: id not in the sample {name} on {found(extra).lines()}")
        _check_sample(values, reference, source, missing)

    if empty:
        raise EnsError(f"{source}: empty or NaN category ids on {empty.lines()}")
    if wrong:
        every = f" (every category of the dataset: it knows fewer than {fmt.top_k})" if width < fmt.top_k else ""
        raise EnsError(f"{source}: {fmt.name} expects {width} category ids{every} separated by single spaces; "
                       f"other counts on {wrong.lines()}")
    if not_int:
        raise EnsError(f"{source}: non-integer category ids on {not_int.lines()}")
    categories = np.concatenate(categories) if categories else np.zeros((0, width), np.int64)
    unknown = ~np.isin(categories, reference.categories)
    if unknown.any():
        raise EnsError(f"{source}: category ids {_listed(np.unique(categories[unknown]))} are not among the "
                       f"{reference.categories.size} categories of the dataset; on "
                       f"{found(unknown.any(axis=1), shown=False).lines()}")
    return Submission(format=fmt, ids=values[order], categories=categories[order])


def _check_sample(values: np.ndarray, reference: Reference, source, to_fill: np.ndarray) -> None:
    name = reference.sample_source.name
    unsampled = np.setdiff1d(to_fill, reference.sample_ids)
    if unsampled.size:
        raise EnsError(f"{source}: {_count(unsampled.size, 'test id')} of {reference.test_source.name} to fill "
                       f"{'are' if unsampled.size > 1 else 'is'} not in the sample {name}: {_listed(unsampled)}")
    missing = np.setdiff1d(reference.sample_ids, np.union1d(values, to_fill))
    if missing.size:
        raise EnsError(f"{source}: {_count(missing.size, 'id')} of the sample {name} missing: {_listed(missing)}")


def _header(frame: pd.DataFrame, width: int = 60) -> str:
    text = ",".join(frame.columns)
    return text if len(text) <= width else text[:width - 3] + "..."


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _listed(values: np.ndarray) -> str:
    more = f" and {values.size - _SHOWN} more" if values.size > _SHOWN else ""
    return ", ".join(str(v) for v in values[:_SHOWN]) + more


def check_file(path: str | os.PathLike, fmt: SubmissionFormat, reference: Reference,
               memory: int | None = None) -> Submission:
    """``ens submit --check``: all checks on any CSV, hand-made ones included, read in blocks of
    rows within ``memory`` bytes (:func:`block_rows`)."""

    def blocks() -> Iterator[pd.DataFrame]:
        first = True
        for frame in read_csv_blocks(path, block_rows(memory)):
            if first:
                check_header(frame, fmt, path)
                first = False
            yield frame

    return check_rows(blocks(), fmt, reference, path)


# ---------------------------------------------------------------------------------------- writing

def render(submission: Submission) -> bytes:
    """The CSV bytes: header, then one ``id,c1 c2 ...`` line per row in ``submission`` order
    (made :data:`MAX_BLOCK_ROWS` rows at a time: only the bytes of the whole file are held)."""
    fmt = submission.format
    parts = [(fmt.header + "\n").encode("ascii")]
    for start in range(0, submission.ids.size, MAX_BLOCK_ROWS):
        block = slice(start, start + MAX_BLOCK_ROWS)
        cells = pd.DataFrame(submission.categories[block]).astype(str)
        predicted = cells[0]
        for k in range(1, cells.shape[1]):
            predicted = predicted + " " + cells[k]
        lines = pd.Series(submission.ids[block]).astype(str) + "," + predicted
        parts.append("".join(line + "\n" for line in lines).encode("ascii"))
        del cells, predicted, lines
    return b"".join(parts)


#: What a file name after the timestamp may hold; the first character a letter or digit.
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
#: Room kept in the longest file name for the ``-2``, ``-3``... of :func:`ensemble.fileio.write_new`.
_TAKEN_SUFFIX = len("-999")


def check_name(name: str) -> None:
    """``--name``: letters, digits, '.', '_' and '-', a letter or digit first."""
    if not re.fullmatch(NAME, name):
        raise EnsError(f"--name '{printable(name)}': use letters, digits, '.', '_' and '-' only, a letter or "
                       "digit first")


def longest_name(folder: str | os.PathLike, when: dt.datetime, compress: bool) -> int:
    """How many characters the name after the timestamp may have in ``folder`` (which may not
    exist yet: its nearest existing parent's file system is asked), room left for ``-999``."""
    place = Path(folder)
    while not place.is_dir() and place != place.parent:
        place = place.parent
    taken = len(_file_name("", when, compress)) + _TAKEN_SUFFIX
    return name_max(place) - taken


def submission_name(folder: str | os.PathLike, given: str | None, default: str, when: dt.datetime,
                    compress: bool) -> tuple[str, str | None]:
    """The name after the timestamp, and a note when it is not what was asked for.

    ``given`` (``--name``) is used as it is, or refused: other characters than :data:`NAME`'s,
    or too long for ``folder``'s file system (its longest file name, less the timestamp,
    suffix and room for ``-999``). Without it, ``default`` (the blend folder's name) is made
    into such a name: each other character becomes '_', leading '.', '_' and '-' go, and it is
    cut to the length that fits; the note says so."""
    limit = longest_name(folder, when, compress)
    if given is not None:
        check_name(given)
        if len(given) > limit:
            raise EnsError(f"--name {given[:20]}...: too long ({len(given)} characters); file names in {folder} "
                           f"take at most {limit} after the timestamp")
        return given, None
    replaced = re.sub(r"[^A-Za-z0-9._-]", "_", default)
    safe = replaced.lstrip("._-") or "submission"
    changes = []
    if replaced != default:
        changes.append("each character other than letters, digits, '.', '_' and '-' replaced by '_'")
    if safe != replaced:
        changes.append("its leading '.', '_' and '-' left out")
    if len(safe) > limit:
        safe = safe[:max(limit, 1)]
        changes.append(f"shortened to {limit} characters (the longest file name {folder} takes, less the "
                       "timestamp and suffix)")
    if not changes:
        return safe, None
    shown = printable(default)
    shown = shown if len(shown) <= 60 else shown[:28] + "..." + shown[-28:]
    return safe, (f"--name: the file is named '{safe}' after '{shown}', "
                  f"{' and '.join(changes)}; give --name NAME to choose another")


def _file_name(name: str, when: dt.datetime, compress: bool) -> str:
    return f"{when.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}_{name}{'.csv.gz' if compress else '.csv'}"


def submission_path(folder: str | os.PathLike, name: str, when: dt.datetime, compress: bool) -> Path:
    """``<folder>/<UTC time>_<name>.csv[.gz]``, the name a file is first tried under
    (:func:`ensemble.fileio.write_new` appends ``-2``, ``-3``... should that be taken)."""
    check_name(name)
    return Path(folder) / _file_name(name, when, compress)


def submission_bytes(submission: Submission, compress: bool) -> bytes:
    """:func:`render`, gzipped with mtime 0 when ``compress`` (so equal rows give equal bytes)."""
    data = render(submission)
    return gzip.compress(data, mtime=0) if compress else data
