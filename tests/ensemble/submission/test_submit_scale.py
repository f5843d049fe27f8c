"""`ens submit` at scale: predictions.csv read in blocks of rows, so its peak resident memory
follows --memory, not the number of test images; the file written does not depend on the block
size, and a problem is still named by its line and id.

:func:`make_submission_work` writes a work folder of any size: a test json, the categories'
jsons, and a blend folder whose predictions.csv and blend.json (its ``apply`` recording the
predictions' and the test json's sha256, as `ens blend` writes them) trace back to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.submission.kaggle_csv import ROW_BYTES
from ensemble.submission.submit import SubmitOptions, check, submit
from tests.ensemble.report.test_report_scale import peak_rss_mb


def make_submission_work(root: Path, rows: int = 1000, classes: int = 50, k: int = 5, first_id: int = 100_000,
                         train: bool = False, seed: int = 0) -> Path:
    """``root/data`` (test2019.json of ``rows`` ids, train and val jsons of ``classes``
    categories) and ``root/blends/b`` (predictions.csv of every test id, top ``k``, and a
    blend.json tracing it to the test json); returns ``root``."""
    data, blend = root / "data", root / "blends" / "b"
    data.mkdir(parents=True)
    blend.mkdir(parents=True)
    ids = first_id + np.arange(rows)
    (data / "test2019.json").write_text(json.dumps({"images": [{"id": int(i), "file_name": f"test/{i}.jpg"}
                                                               for i in ids]}))
    categories = [{"id": c, "name": f"species {c}"} for c in range(classes)]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=3 * classes) if train else np.zeros(0, int)
    (data / "train2019.json").write_text(json.dumps({
        "images": [], "annotations": [{"id": j, "image_id": j, "category_id": int(c)} for j, c in enumerate(labels)],
        "categories": categories}))
    (data / "val2019.json").write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    order = np.argsort(rng.random((rows, classes), dtype=np.float32) if rows * classes <= 1 << 22 else
                       rng.random((rows, 64), dtype=np.float32), axis=1)[:, :k]
    probs = np.sort(rng.random((rows, k)), axis=1)[:, ::-1] / k
    path = blend / "predictions.csv"
    with open(path, "w") as fh:
        fh.write(",".join(["id", *(f"category_{j + 1}" for j in range(k)), *(f"prob_{j + 1}" for j in range(k))])
                 + "\n")
        for start in range(0, rows, 65536):
            stop = min(start + 65536, rows)
            cells = np.column_stack([ids[start:stop].astype(str), order[start:stop].astype(str),
                                     np.char.mod("%.6g", probs[start:stop])])
            fh.write("\n".join(",".join(r) for r in cells.tolist()) + "\n")
    (blend / "blend.json").write_text(json.dumps({
        "format": 3, "method": "nll", "fusion": "mixture", "models": ["m0", "m1"], "members": ["m0", "m1"],
        "weights": {"m0": 0.6, "m1": 0.4}, "temperatures": None, "class_ids": list(range(classes)),
        "provenance": {}, "cv": {"folds": 5, "top_k": k, "temperature": False, "chosen": "nll",
                                 "rows": [{"name": "nll", "kind": "method", "top1": 0.7, "top1_low": 0.68,
                                           "top1_high": 0.72, "topk": 0.9, "nll": 1.2}]},
        "apply": {"split": "test", "rows": rows, "stores": {"m0": "ab" * 32, "m1": "cd" * 32},
                  "dataset_sha256": sha256_file(data / "test2019.json"),
                  "predictions_sha256": sha256_file(path)}}))
    return root


@pytest.mark.slow  # over 5 s on the 2-core machine
def test_submit_memory_does_not_grow_with_the_rows(tmp_path):
    """150,000 rows: `ens submit` peaks no higher than the same command stopped right after reading
    the test json (a --check of a header alone), where reading predictions.csv whole as text
    cells grew it by about 90 MB."""
    root = make_submission_work(tmp_path, rows=150_000, classes=1000)
    (root / "header.csv").write_text("id,predicted\n")
    base = peak_rss_mb("submit", "--check", "header.csv", "--data", "data", "--memory", "0.25", cwd=root, ok=False)
    peak = peak_rss_mb("submit", "blends/b", "--data", "data", "--dry-run", "--memory", "0.25", cwd=root)
    assert (root / "submissions" / "ledger.sqlite").is_file()
    assert peak - base < 40, (base, peak)


#: Bytes of memory that make blocks of 7 rows (kaggle_csv.ROW_BYTES each).
SEVEN_ROWS = 7 * ROW_BYTES


@pytest.mark.parametrize("options", [{}, {"compress": True}, {"sample": "sample.csv"}, {"missing": "prior"}])
def test_the_file_written_does_not_depend_on_the_block_size(tmp_path, monkeypatch, options):
    root = make_submission_work(tmp_path, rows=100, classes=30, train=True)
    monkeypatch.chdir(root)
    csv = root / "blends" / "b" / "predictions.csv"
    lines = csv.read_text().splitlines()
    (root / "sample.csv").write_text("id,predicted\n" + "".join(f"{line.split(',')[0]},1\n" for line in lines[1:]))
    if options.get("missing"):  # rows of 20 ids left out, across blocks: filled from the train json
        csv.write_text("\n".join(line for n, line in enumerate(lines) if not 30 <= n < 50) + "\n")
    options = {k: Path(v) if k == "sample" else v for k, v in options.items()}
    written = {}
    for memory in (SEVEN_ROWS, 1 << 30):
        result = submit("blends/b", "data", SubmitOptions(name=f"m{memory}", memory=memory, **options))
        written[memory] = result.path.read_bytes()
        checked = check(result.path, "data", memory=memory)
        assert checked.submission.ids.size == 100
    assert written[SEVEN_ROWS] == written[1 << 30]
    if options.get("missing"):
        assert result.entry.filled == 20


def _corrupt(lines: list[str], edits: dict[int, str]) -> list[str]:
    """``lines`` with line ``n`` (1 = the header) replaced by ``edits[n]``, None deletes it."""
    return [edits.get(n + 1, line) for n, line in enumerate(lines) if edits.get(n + 1, line) is not None]


@pytest.mark.parametrize("edits, expected", [
    # a non-integer id in a late block is named before an empty category in the first (ids first)
    ({3: "100001,5,,7,8,9,0.1,0.1,0.1,0.1,0.1", 40: "x38,1,2,3,4,5,0.1,0.1,0.1,0.1,0.1"},
     "non-integer id on line 40 ('x38')"),
    # the same id written twice, the second time in another block and with a leading zero
    ({30: "0100003,1,2,3,4,5,0.1,0.1,0.1,0.1,0.1"}, "duplicated id on line 30 ('0100003')"),
    ({12: "100010,1,2,3,4,5,0.1,0.1,0.1,0.1,0.1", 13: "100010,1,2,3,4,5,0.1,0.1,0.1,0.1,0.1",
      25: "100010,1,2,3,4,5,0.1,0.1,0.1,0.1,0.1"}, "duplicated id on lines 13 ('100010'), 25 ('100010')"),
    ({50: "999999,1,2,3,4,5,0.1,0.1,0.1,0.1,0.1"}, "id not in test2019.json on line 50 ('999999')"),
    ({20: None, 33: None}, "2 test ids of test2019.json missing: 100018, 100031; --missing prior fills them with "
                           "the most frequent classes (of the train json, else of these predictions)"),
    ({9: "100007,1,2,3,4,,0.1,0.1,0.1,0.1,0.1", 44: "100042,,2,3,4,5,0.1,0.1,0.1,0.1,0.1"},
     "empty or NaN category ids on lines 9 ('1 2 3 4 '), 44 (' 2 3 4 5')"),
    ({8: "100006,1,2,3,4,77,0.1,0.1,0.1,0.1,0.1", 60: "100058,99,2,3,4,5,0.1,0.1,0.1,0.1,0.1"},
     "category ids 77, 99 are not among the 30 categories of the dataset; on lines 8, 60"),
    ({2: "100000,1,2,3,4,5x,0.1,0.1,0.1,0.1,0.1"}, "non-integer category ids on line 2 ('1 2 3 4 5x')"),
])
def test_a_problem_is_named_by_its_line_whatever_the_blocks(tmp_path, monkeypatch, edits, expected):
    """Blocks of 7 rows or one block: the same one-line error, naming the first offending lines
    of the whole file (line numbers count across blocks), nothing written."""
    root = make_submission_work(tmp_path, rows=70, classes=30)
    monkeypatch.chdir(root)
    csv = root / "blends" / "b" / "predictions.csv"
    csv.write_text("\n".join(_corrupt(csv.read_text().splitlines(), edits)) + "\n")
    for memory in (SEVEN_ROWS, 1 << 30):
        with pytest.raises(EnsError) as info:
            submit("blends/b", "data", SubmitOptions(memory=memory))
        assert str(info.value) == f"blends/b/predictions.csv: {expected}"
    assert not (root / "submissions").exists() or not any((root / "submissions").glob("*.csv"))
