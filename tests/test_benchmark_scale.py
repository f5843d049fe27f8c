"""benchmarks/scale.py (``python -m benchmarks.scale``) end to end at a small shape: every command
runs, the figures it prints agree with what the generator made, and a failing command fails it.

The full shapes (iNat 2021: 48 GB of stores; iNat 2019 with 16 members) are run by hand; their
figures are in docs/benchmarks.md."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.scale import Generator, Shape, _val_hits

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["--classes", "40", "--val", "400", "--test", "300", "--members", "3"]
VAL_ROWS = 400


def _scale(*args, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.scale", *SHAPE, "--folder", str(folder), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def _binomial(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    done = _scale("--json", str(folder / "figures.json"), folder=folder)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return folder, done.stdout, json.loads((folder / "figures.json").read_text())


@pytest.mark.slow
def test_every_command_runs_and_is_measured(run):
    _, out, figures = run
    assert [c["command"] for c in figures["commands"]] == ["blend", "blend-prior", "submit", "report", "submissions"]
    for command in figures["commands"]:
        assert command["seconds"] > 0 and command["cpu_seconds"] > 0, command
        # A python process with numpy loaded is above 30 MB; the small shape's arrays are tiny.
        assert 0.03 < command["peak_rss_gib"] < 3, command
        assert command["read_bytes"] > 1e6, command  # its modules at least
        assert re.search(rf"^  {re.escape(command['command'])} +\d+\.\d\d +\d+\.\d\d +\d+\.\d\d +ok 3", out, re.M), out
    read = figures["read"]
    assert read["bytes"] == sum(p.stat().st_size for p in (run[0] / "runs").glob("member*/*/*.npy"))
    for command in figures["commands"][:2]:
        assert command["read_ratio"] == pytest.approx(command["seconds"] / read["seconds"])
        assert command["stores_read"] == pytest.approx(command["read_bytes"] / read["bytes"])
    assert "one sequential read of the blend's stores" in out


@pytest.mark.slow
def test_the_blends_figures_are_the_generators(run):
    """ens blend's CV table on the generated stores: each member's top-1 and the uniform mixture's
    (no fitting: the same on every fold) are what the generator measured on the values it
    stored; those are the top-1 it was built for within the sampling error; the fitted blend
    is no worse than the best member, and its test top-1 (the generator knows the test labels)
    agrees with its CV estimate."""
    _, _, figures = run
    measured, expected = figures["measured"], figures["expected_member_top1"]
    assert len(measured["member_top1"]) == 3
    for got, want in zip(measured["member_top1"], expected):
        assert abs(got - want) <= 4 * _binomial(want, VAL_ROWS) + 0.01, (got, want)
    for name in ("blend", "blend-prior"):
        cv = figures["blends"][name]["cv"]
        for m, got in enumerate(measured["member_top1"]):
            assert cv[f"member{m:02d}"]["top1"] == pytest.approx(got, abs=1 / VAL_ROWS), (name, m)
        assert cv["uniform"]["top1"] == pytest.approx(measured["uniform_top1"], abs=2 / VAL_ROWS), name
        nll = cv["nll"]["top1"]
        assert nll >= max(measured["member_top1"]) - 3 * _binomial(nll, VAL_ROWS), name
        test = figures["blends"][name]["test_top1"]
        method = cv["nll+prior" if name == "blend-prior" else "nll"]["top1"]
        assert abs(test - method) <= 4 * _binomial(method, VAL_ROWS) + 4 * _binomial(method, 300), (name, test, method)
    assert figures["blends"]["blend-prior"]["tau"] > 0


@pytest.mark.slow
def test_a_second_run_keeps_the_stores(run):
    folder, _, _ = run
    before = {p: p.stat().st_mtime_ns for p in (folder / "runs").glob("member*/*/logits.npy")}
    done = _scale("--commands=", folder=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test: 3 stores kept" in done.stdout and "val: 3 stores kept" in done.stdout, done.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_a_failing_command_fails_the_benchmark(run):
    folder, _, _ = run
    done = _scale("--commands", "blend", "--memory", "-1", folder=folder)
    assert done.returncode != 0
    assert re.search(r"^benchmarks\.scale: blend failed \(exit [1-9]\d*\): ens blend .*--memory -1", done.stderr,
                     re.M), done.stderr


def test_members_score_the_top1_they_were_built_for():
    """The generator's expected top-1 (prior term included, by quadrature) against the top-1 of
    8,000 generated rows at 200 classes: within the sampling error."""
    shape = Shape(classes=200, val=8000, test=10, members=3)
    generator = Generator(shape)
    hits = np.zeros(4)
    for start in range(0, shape.val, 2000):
        hits += _val_hits(generator.block("val", start, start + 2000), generator.labels["val"][start:start + 2000])
    for m in range(3):
        want = generator.expected_top1(m)
        assert abs(hits[m] / shape.val - want) <= 4 * _binomial(want, shape.val) + 0.005, (m, hits[m], want)
    # Members of varied accuracy, correlated: the uniform mixture beats the weakest clearly.
    assert hits[3] > hits[2] + 0.05 * shape.val
    assert generator.target[0] > generator.target[-1] + 0.2


def test_blocks_are_the_same_whenever_asked():
    """Resuming regenerates a missing chunk: its values must not depend on what came before."""
    generator = Generator(Shape(classes=30, val=100, test=50, members=2))
    first = generator.block("test", 20, 40)
    generator.block("val", 0, 100)
    np.testing.assert_array_equal(generator.block("test", 20, 40), first)
    assert not np.array_equal(generator.block("test", 0, 20), first)
