"""Shared by every test: onnxruntime's telemetry off, and the session's resnet18 checkpoint.

Tests open onnxruntime sessions of their own; without :func:`onnxruntime` (see
ensemble.inference.runtime.onnxruntime), its background uploader may send usage events through
whatever HTTPS proxy a test has set (the Kaggle stand-in's, for one).

The markers (slow, ray, browser, network) are registered in pyproject.toml and described in
docs/testing.md; each test module sets its own with ``pytestmark``.
"""

from __future__ import annotations

import collections
import os
import shutil
from pathlib import Path

import pytest

from ensemble.inference.runtime import onnxruntime

onnxruntime()

#: A test that uses one of these fixtures must carry the marker, so that `-m "not MARKER"` leaves
#: out every test that needs what the marker names.
FIXTURE_MARKERS = {"standin": "network", "browser": "browser", "chromium": "browser"}


def pytest_configure(config):
    # Each pytest-xdist worker of `make test` on a core of its own: two workers on two cores
    # otherwise each run torch's and onnxruntime's thread pools over both cores (ens sizes its
    # sessions by the cores it may use, os.sched_getaffinity), four busy threads on two cores.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and count > 1 and len(cores) >= count:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


def pytest_collection_modifyitems(config, items):
    unmarked = [f"{item.nodeid} (uses {fixture})" for item in items for fixture, marker in FIXTURE_MARKERS.items()
                if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None]
    if unmarked:
        raise pytest.UsageError("tests without the marker their fixtures call for (FIXTURE_MARKERS in tests/conftest.py): "
                                + ", ".join(unmarked))
    if hasattr(config, "workerinput"):
        # A pytest-xdist worker (`make test`, run with --no-loadscope-reorder): modules are handed
        # out in this order, so the ones with the most slow or ray tests go first and the quick
        # ones even out the two processes' ends (xdist's own order, by number of tests, left the
        # demo's one long test and test_install's virtual environment to the end).
        heavy = collections.Counter(item.path for item in items
                                    if item.get_closest_marker("slow") or item.get_closest_marker("ray"))
        items.sort(key=lambda item: -heavy[item.path])


@pytest.fixture(scope="session")
def resnet18_64(tmp_path_factory):
    """``(model, path)``: torchvision's resnet18 for 64 px inputs with
    ``tests.exporters.helpers.NUM_CLASSES`` outputs, calibrated as a trained network would be
    (``helpers.build``), and its state dict saved with ``torch.save``. Built once a session (once
    per xdist worker) for the exporter and `ens export` tests, which built it in three modules.

    Shared: use the model without changing it, and copy the file (:func:`copy_checkpoint`)
    where a test writes beside it or changes it.
    """
    import torch

    from tests.exporters.helpers import build

    model = build("resnet18", 64)
    path = tmp_path_factory.mktemp("resnet18_64") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="session")
def resnet18_64_export(resnet18_64, tmp_path_factory):
    """The ``ExportResult`` of `ens export`'s defaults on :func:`resnet18_64` at 64 px (fp32,
    with the cam output), exported once a session. Read-only."""
    from exporters import ExportOptions, export_checkpoint

    checkpoint = copy_checkpoint(resnet18_64[1], tmp_path_factory.mktemp("resnet18_64_export"))
    return export_checkpoint(checkpoint, options=ExportOptions(arch="resnet18", input_size=64))


def copy_checkpoint(path: Path, folder: Path, name: str | None = None) -> Path:
    """A copy of the checkpoint at ``path`` in ``folder`` (as ``name``, else its own name)."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(path, folder / (name or path.name)))
