"""The shared memory budget (--memory GIB, ENS_MEMORY) and the rows per block that follow from it."""

from __future__ import annotations

import pytest

from ensemble import memory
from ensemble.errors import EnsError
from ensemble.memory import GIB, memory_budget, rows_per_block


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)


def test_the_option_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(memory.ENV, "2")
    assert memory_budget("0.5") == GIB // 2
    assert memory_budget(None) == 2 * GIB
    assert memory_budget(" 1.5 ") == 3 * GIB // 2


def test_the_default_is_an_eighth_of_physical_memory_and_at_least_a_quarter_gib(monkeypatch):
    monkeypatch.setattr(memory, "physical_memory", lambda: 24 * GIB)
    assert memory_budget() == 3 * GIB
    monkeypatch.setattr(memory, "physical_memory", lambda: GIB)
    assert memory_budget() == GIB // 4
    monkeypatch.setattr(memory, "physical_memory", lambda: None)
    assert memory_budget() == GIB // 4
    monkeypatch.setenv(memory.ENV, "  ")  # set but empty: as if unset
    assert memory_budget() == GIB // 4


def test_physical_memory_is_the_machines():
    total = memory.physical_memory()
    with open("/proc/meminfo") as fh:
        kib = int(fh.readline().split()[1])
    assert total is not None and abs(total - kib * 1024) < 0.02 * total


@pytest.mark.parametrize("text, message", [
    ("abc", "expected a number of GiB, e.g. 3 or 0.5"),
    ("", "expected a number of GiB, e.g. 3 or 0.5"),
    ("3GB", "expected a number of GiB, e.g. 3 or 0.5"),
    ("nan", "expected a finite number of GiB, e.g. 3 or 0.5"),
    ("inf", "expected a finite number of GiB, e.g. 3 or 0.5"),
    ("0", "give at least 0.25 GiB"),
    ("-1", "give at least 0.25 GiB"),
    ("0.2", "give at least 0.25 GiB"),
])
def test_a_bad_value_is_one_line_naming_the_option_or_the_variable(monkeypatch, text, message):
    with pytest.raises(EnsError) as info:
        memory_budget(text)
    assert str(info.value).startswith(f"--memory {text}: {message}")
    assert "\n" not in str(info.value)
    monkeypatch.setenv(memory.ENV, text or "x")
    with pytest.raises(EnsError) as info:
        memory_budget(None)
    assert str(info.value).startswith(f"ENS_MEMORY={text or 'x'}: {message}")


def test_rows_per_block_fits_the_copies_in_the_budget():
    # 4 members x 10,000 classes x 4 bytes = 160 kB a row and copy
    assert rows_per_block(GIB, 4, 10_000, copies=1) == GIB // 160_000
    assert rows_per_block(GIB, 4, 10_000, copies=4) == GIB // 640_000
    assert rows_per_block(GIB, 1, 10_000, copies=0.5) == GIB // 20_000
    rows = rows_per_block(3 * GIB, 16, 1010, copies=3)
    assert rows * 16 * 1010 * 4 * 3 <= 3 * GIB < (rows + 1) * 16 * 1010 * 4 * 3
    assert rows_per_block(1000, 4, 10_000) == 1  # a row wider than the budget: still one


@pytest.mark.parametrize("members, classes, copies", [(0, 10, 1), (3, 0, 1), (3, 10, 0), (3, 10, -1)])
def test_rows_per_block_refuses_nonsense(members, classes, copies):
    with pytest.raises(ValueError):
        rows_per_block(GIB, members, classes, copies)
