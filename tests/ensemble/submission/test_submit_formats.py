"""Competition formats: exact bytes, the registry, and agreement with a grader written from the rules."""

from __future__ import annotations

import datetime as dt
import gzip
import io

import numpy as np
import pandas as pd
import pytest

from ensemble.errors import EnsError
from ensemble.fileio import write_new
from ensemble.submission.kaggle_csv import (FORMATS, Submission, get_format, render, submission_bytes, submission_path)
from ensemble.submission.submit import SubmitOptions, check, submit

from tests.ensemble.submission.submit_data import KNOWN, TEST_IDS, make_blend, make_data, ranked, write_csv

GOLDEN = {
    "inat2019": b"id,predicted\n268243,71 108 339 341 560\n268244,5 4 3 2 1\n",
    "inat2018": b"id,predicted\n268243,71 108 339\n268244,5 4 3\n",
    "inat2021": b"Id,Predicted\n268243,71 108 339 341 560\n268244,5 4 3 2 1\n",
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_exact_bytes(name, tmp_path):
    fmt = get_format(name)
    cats = np.array([[71, 108, 339, 341, 560], [5, 4, 3, 2, 1]])[:, :fmt.top_k]
    sub = Submission(format=fmt, ids=np.array([268243, 268244]), categories=cats)
    assert render(sub) == GOLDEN[name]
    assert write_new(tmp_path / "a.csv", submission_bytes(sub, compress=False)).read_bytes() == GOLDEN[name]
    first = write_new(tmp_path / "a.csv.gz", submission_bytes(sub, compress=True)).read_bytes()
    assert gzip.decompress(first) == GOLDEN[name]
    assert submission_bytes(sub, compress=True) == first  # no time or name inside


def test_registry_lookup_names_the_choices():
    assert get_format("inat2018").top_k == 3 and get_format("inat2021").header == "Id,Predicted"
    with pytest.raises(EnsError, match=r"^--format inat2020: choose one of inat2019, inat2018, inat2021$"):
        get_format("inat2020")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_written_from_a_blend(name, tmp_path):
    """Blend rows in json order, seven ranked categories: the file keeps the first top_k, ids ascending."""
    fmt = get_format(name)
    rows = ranked(k=7)
    blend = make_blend(tmp_path / "blends" / "b", rows)
    data = make_data(tmp_path / "data", fmt)
    result = submit(blend, data, SubmitOptions(format=name), folder=tmp_path / "out")
    expected = fmt.header + "\n" + "".join(f"{i},{' '.join(map(str, rows[i][:fmt.top_k]))}\n" for i in sorted(TEST_IDS))
    assert result.path.read_text() == expected
    assert result.path.name.endswith("_b.csv") and result.entry.format == name


def test_file_name(tmp_path):
    when = dt.datetime(2019, 5, 31, 16, 25, 1, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    first = submission_path(tmp_path, "greedy-5", when, compress=False)
    assert first.name == "20190531T142501Z_greedy-5.csv"
    first.write_text("taken")
    assert write_new(first, b"mine").name == "20190531T142501Z_greedy-5-2.csv"  # a free name, nothing replaced
    assert first.read_text() == "taken"
    gz = submission_path(tmp_path, "greedy-5", when, compress=True)
    assert gz.name == "20190531T142501Z_greedy-5.csv.gz"
    gz.write_text("taken")
    assert write_new(gz, b"mine").name == "20190531T142501Z_greedy-5-2.csv.gz"
    with pytest.raises(EnsError, match=r"^--name 'a/b': use letters"):
        submission_path(tmp_path, "a/b", when, compress=False)


def grade(data: bytes, truth: dict[int, int], scored: int) -> float:
    """A grader from the competitions' rules, independent of ens: read the CSV as pandas does by
    default, sort by id, require exactly the solution's ids, score the first ``scored``
    whitespace-separated predictions read as integers (top-k error)."""
    frame = pd.read_csv(io.BytesIO(data))
    frame = frame.sort_values(frame.columns[0])
    ids = frame.iloc[:, 0].tolist()
    if ids != sorted(truth):
        raise ValueError("ids differ from the solution")
    wrong = [truth[i] not in [int(t) for t in str(p).split()[:scored]] for i, p in zip(ids, frame.iloc[:, 1])]
    return float(np.mean(wrong))


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("seed", range(4))
def test_files_passing_check_pass_the_grader(name, seed, tmp_path):
    fmt = get_format(name)
    rng = np.random.default_rng(seed)
    data = make_data(tmp_path / "data", fmt)
    truth = {i: int(rng.choice(KNOWN)) for i in TEST_IDS}
    # Hand-made, rows shuffled, as any tool might write it: whatever passes --check must grade.
    rows = ranked(k=fmt.top_k, seed=seed)
    order = rng.permutation(len(TEST_IDS))
    text = fmt.header + "\n" + "".join(f"{TEST_IDS[j]},{' '.join(map(str, rows[TEST_IDS[j]]))}\n" for j in order)
    path = write_csv(tmp_path / "hand.csv", text)
    check(path, data, name)
    expected = np.mean([truth[i] not in rows[i][:fmt.scored] for i in TEST_IDS])
    assert grade(path.read_bytes(), truth, fmt.scored) == pytest.approx(expected)

    written = submit(make_blend(tmp_path / "blends" / "x", rows), data, SubmitOptions(format=name),
                     folder=tmp_path / "out").path
    check(written, data, name)
    assert grade(written.read_bytes(), truth, fmt.scored) == pytest.approx(expected)
