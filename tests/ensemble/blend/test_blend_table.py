"""The CV table `ens blend` prints: columns that stay apart whatever the numbers."""

from __future__ import annotations

import re
from types import SimpleNamespace

from ensemble import cli


def _row(name, nll):
    return SimpleNamespace(name=name, top1=0.345, top1_low=0.3137, top1_high=0.38, topk=0.3475, nll=nll)


def test_an_nll_of_100_or_more_keeps_its_column_apart(capsys):
    rows = [_row("a", 104.8), _row("uniform", 2.5), _row("nll", 1234.56789)]
    record = SimpleNamespace(cv=SimpleNamespace(top_k=5, folds=5, temperature=False, prior=False, rows=rows,
                                                chosen="nll"),
                             class_ids=tuple(range(10)), optimize=SimpleNamespace(split="val", rows=100), prior=None)
    cli._print_cv_table(record)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "95% interval" in line)
    for line, nll in zip(lines[2:], ("104.8000", "2.5000", "1234.5679")):
        numbers = re.findall(r"\S+", line.split("]")[1])
        assert numbers[:2] == ["0.3475", nll], line
        assert line.index(nll) + len(nll) == header.index("NLL") + 3, (header, line)
