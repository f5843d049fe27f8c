"""A huge --memory or ENS_MEMORY is refused in one line naming it (issue 24 review): a value
past :data:`ensemble.memory.MAX_GIB` was an OverflowError traceback in every command that takes
the budget (int(1e308 * 2**30) is infinity)."""

from __future__ import annotations

import pytest

from ensemble import memory
from ensemble.errors import EnsError
from ensemble.memory import GIB, MAX_GIB, memory_budget
from tests.ensemble.conftest import ens, make_inat, one_line_error, tiny_onnx


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)


@pytest.mark.parametrize("text", ["1e308", "1e300", "1e20", str(MAX_GIB * 2)])
def test_a_budget_past_the_cap_is_one_line_naming_the_option_or_the_variable(monkeypatch, text):
    with pytest.raises(EnsError) as info:
        memory_budget(text)
    assert str(info.value).startswith(f"--memory {text}: give at most {MAX_GIB:,} GiB")
    assert "\n" not in str(info.value)
    monkeypatch.setenv(memory.ENV, text)
    with pytest.raises(EnsError) as info:
        memory_budget(None)
    assert str(info.value).startswith(f"ENS_MEMORY={text}: give at most {MAX_GIB:,} GiB")


def test_the_cap_itself_is_a_budget():
    assert memory_budget(str(MAX_GIB)) == MAX_GIB * GIB


@pytest.mark.parametrize("command", [
    ("blend", "--runs", "{tmp}/runs", "--optimize", "val", "--out", "{tmp}/out", "--memory", "1e308"),
    ("submit", "--check", "{tmp}/x.csv", "--data", "{tmp}", "--memory", "1e308"),
    ("infer", "{tmp}/m.onnx", "--data", "{tmp}", "--split", "val", "--out", "{tmp}/runs", "--memory", "1e308"),
])
def test_every_command_refuses_a_huge_memory_in_one_line(tmp_path, command):
    (tmp_path / "x.csv").write_text("id,predicted\n1,1\n")
    tiny_onnx(tmp_path / "m.onnx")
    make_inat(tmp_path, n_val=2, n_test=1)
    args = [a.format(tmp=tmp_path) for a in command]
    one_line_error(ens(*args), "--memory 1e308: give at most")
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_report_refuses_a_huge_ens_memory_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(memory.ENV, "1e300")
    one_line_error(ens("report", tmp_path / "blend"), "ENS_MEMORY=1e300: give at most")
