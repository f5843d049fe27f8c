"""The one rule for the folder `ens blend` ran in (``<work>`` of ``<work>/blends/<name>``), which
`ens report` and `ens submit` both use to find runs/ and submissions/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ensemble.formats.blend import work_folder


def test_a_blend_folder_under_blends_names_its_work_folder(tmp_path, monkeypatch):
    assert work_folder(tmp_path / "blends" / "nll") == tmp_path
    monkeypatch.chdir(tmp_path)
    assert work_folder("blends/nll") == tmp_path


def test_a_blend_folder_written_elsewhere_has_none(tmp_path):
    """`ens blend --out exp/nll`: exp/'s parent is no folder of the project."""
    assert work_folder(tmp_path / "exp" / "nll") is None
    assert work_folder(tmp_path / "nll") is None


def test_a_linked_blends_folder_still_names_the_projects_folder(tmp_path):
    """blends/ linked to another disk: the work folder is where the link is, not the disk's."""
    (tmp_path / "disk" / "blends" / "nll").mkdir(parents=True)
    (tmp_path / "project").mkdir()
    os.symlink(tmp_path / "disk" / "blends", tmp_path / "project" / "blends")
    assert work_folder(tmp_path / "project" / "blends" / "nll") == tmp_path / "project"


def test_the_stores_are_looked_for_in_one_order_each_folder_once(tmp_path, monkeypatch):
    from ensemble.formats.blend import runs_candidates

    monkeypatch.chdir(tmp_path)
    blend = tmp_path / "blends" / "nll"
    recorded = str(tmp_path / "elsewhere")
    assert runs_candidates(recorded, blend, given=tmp_path / "mine") == [
        tmp_path / "mine", tmp_path / "elsewhere", tmp_path / "runs"]  # ./runs is <work>/runs here
    assert runs_candidates(None, tmp_path / "exp" / "nll") == [Path("runs")]


@pytest.mark.parametrize("recorded", ["relative/runs", "/abs/with\x1b[2Jescape", "/" + "x" * 5000])
def test_a_recorded_folder_ens_blend_would_not_write_is_passed_over(tmp_path, recorded):
    """A hand-edited ``runs``: relative (it would be read from wherever ens runs), holding
    control characters, or a name the OS cannot take."""
    from ensemble.formats.blend import runs_candidates

    assert runs_candidates(recorded, tmp_path / "blends" / "nll") == [tmp_path / "runs", Path("runs")]
