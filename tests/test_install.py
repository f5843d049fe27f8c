"""`pip install ens` without extras, for real: the core install runs `ens infer`, `ens blend`,
`ens submit` and `ens info` without torch, and `ens export` / `ens demo` name the extra they need.

One fresh virtual environment per session (the module fixture ``core``): ``python -m venv``
without system site packages, then ``pip install -c constraints.txt SRC``, no extras, not
editable. SRC is a copy of the repository's top-level files and packages, so that the wheel
build (setuptools writes build/ and ens.egg-info/ next to the sources) never touches the
working tree. The inputs (tiny ONNX models, an iNat-layout dataset) are made with this, the
main, environment, which also computes the reference results the fresh environment must match.
The commands run as subprocesses in a temporary working folder (`ens submit` writes to
./submissions), so the `ensemble` they import is the installed one, not the repository's.

No skip when offline: pip needs an index (and build isolation fetches setuptools), and a
missing one is a failure here. The suite's other tests check the extras' messages in process.
"""

from __future__ import annotations

import csv
import fnmatch
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from typer.testing import CliRunner

from ensemble.cli import app

from tests.ensemble.conftest import CLASSES, make_inat, tiny_onnx

pytestmark = [pytest.mark.slow, pytest.mark.network]  # builds a virtual environment from pip's index

REPO = Path(__file__).resolve().parents[1]
#: Column j of every tiny model is category PERM[j], so the category mapping is exercised.
PERM = (3, 0, 4, 1, 2)
MODELS = ("m0", "m1")
N_VAL, N_TEST = 10, 6
TEST_IDS = list(range(N_VAL, N_VAL + N_TEST))
#: Modules the export and demo extras bring; none may be importable in a core install.
EXTRA_MODULES = ("torch", "torchvision", "onnxconverter_common", "safetensors", "sklearn")
EXPORT_ERROR = "error: ens export needs torch, which this install lacks: pip install 'ens[export]'\n"
DEMO_ERROR = "error: ens demo needs torch, which this install lacks: pip install 'ens[demo]'\n"

runner = CliRunner()


@dataclass(frozen=True)
class Core:
    """A virtual environment holding `pip install ens` (core only)."""

    bin: Path
    env: dict[str, str]

    def run(self, *args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def ens(self, *args, cwd: Path) -> subprocess.CompletedProcess:
        return self.run(self.bin / "ens", *args, cwd=cwd)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def copy_sources(dst: Path) -> Path:
    """The repository's top-level files and the packages pyproject.toml includes."""
    dst.mkdir(parents=True)
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for path in REPO.iterdir():
        if path.is_file():
            shutil.copy2(path, dst / path.name)
        elif (path / "__init__.py").is_file() and any(fnmatch.fnmatch(path.name, p) for p in include):
            shutil.copytree(path, dst / path.name, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> Iterator[Core]:
    root = tmp_path_factory.mktemp("core_install")
    src = copy_sources(root / "src")
    venv = root / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    ok(subprocess.run([sys.executable, "-m", "venv", str(venv)], env=env, capture_output=True, text=True))
    bin_ = venv / "bin"
    env["PATH"] = f"{bin_}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    installed = Core(bin_, env)
    ok(installed.run(bin_ / "python", "-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check",
                     "-c", REPO / "constraints.txt", src, cwd=root, timeout=1800))
    yield installed
    shutil.rmtree(venv, ignore_errors=True)  # about 0.5 GB; pytest keeps the last runs' temp folders


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A dataset and two tiny models, made with the main environment."""
    root = tmp_path_factory.mktemp("core_inputs")
    make_inat(root / "data", n_val=N_VAL, n_test=N_TEST)
    for i, name in enumerate(MODELS):
        tiny_onnx(root / "models" / f"{name}.onnx", seed=i, class_ids=PERM)
    return root


def test_core_install_has_no_torch(core, tmp_path):
    proc = core.run(core.bin / "python", "-c", "import torch", cwd=tmp_path)
    assert proc.returncode == 1 and "No module named 'torch'" in proc.stderr, proc.stderr
    probe = ("import importlib.util, ensemble; "
             f"print(ensemble.__file__); print(*[m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m)])")
    where, present = ok(core.run(core.bin / "python", "-c", probe, cwd=tmp_path)).stdout.splitlines()
    assert Path(where).is_relative_to(core.bin.parent), where  # the installed package, not the repository's
    assert present == "", f"a core install brings {present}"


def test_infer_blend_submit_info_without_torch(core, inputs, tmp_path, monkeypatch):
    work = tmp_path / "fresh"
    shutil.copytree(inputs, work)
    models = [f"models/{m}.onnx" for m in MODELS]
    infer_args = ("infer", *models, "--data", "data", "--split", "val,test", "--tta", "flip", "--workers", 0,
                  "--dtype", "float32")
    proc = ok(core.ens(*infer_args, cwd=work))
    assert "4 stores (4 computed), 2 models, 2 splits, tta flip" in proc.stdout, proc.stdout

    # The reference: the main environment's `ens infer` on the same files.
    main = tmp_path / "main"
    shutil.copytree(inputs, main)
    with monkeypatch.context() as patch:
        patch.chdir(main)
        result = runner.invoke(app, [str(a) for a in infer_args])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["blend", "--optimize", "val", "--data", "data"])
        assert result.exit_code == 0, result.output
    for model in MODELS:
        for split, ids in (("val", list(range(N_VAL))), ("test", TEST_IDS)):
            fresh, ref = work / "runs" / model / split, main / "runs" / model / split
            assert (fresh / "manifest.json").is_file()
            assert np.load(fresh / "ids.npy").tolist() == np.load(ref / "ids.npy").tolist() == ids
            logits = np.load(fresh / "logits.npy")
            assert logits.shape == (len(ids), CLASSES) and logits.std() > 0.1
            np.testing.assert_allclose(logits, np.load(ref / "logits.npy"), rtol=1e-5, atol=1e-5)

    proc = ok(core.ens("blend", "--optimize", "val", "--data", "data", cwd=work))
    assert "5-fold CV on val (10 images)" in proc.stdout, proc.stdout
    with open(work / "blends" / "nll" / "predictions.csv", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    with open(main / "blends" / "nll" / "predictions.csv", newline="") as fh:
        ref_rows = list(csv.reader(fh))[1:]
    assert header[:6] == ["id", *(f"category_{j}" for j in range(1, 6))]
    assert [int(r[0]) for r in rows] == TEST_IDS
    assert all(sorted(map(int, r[1:6])) == sorted(PERM) for r in rows)
    assert [r[:6] for r in rows] == [r[:6] for r in ref_rows]
    np.testing.assert_allclose(np.asarray([r[6:] for r in rows], float), np.asarray([r[6:] for r in ref_rows], float),
                               atol=1e-5)

    proc = ok(core.ens("submit", "blends/nll", "--data", "data", "--dry-run", cwd=work))
    assert "ledger entry 1: not-uploaded (dry run)" in proc.stdout, proc.stdout
    written = list((work / "submissions").glob("*_nll.csv"))
    assert len(written) == 1 and (work / "submissions" / "ledger.sqlite").is_file()
    with open(written[0], newline="") as fh:
        header, *lines = list(csv.reader(fh))
    assert header == ["id", "predicted"]
    assert [int(line[0]) for line in lines] == TEST_IDS
    best = {int(r[0]): r[1:6] for r in rows}
    assert all(line[1].split() == best[int(line[0])] for line in lines)

    proc = ok(core.ens("info", "models/m0.onnx", cwd=work))
    assert any(line.split() == ["architecture", "tiny"] for line in proc.stdout.splitlines()), proc.stdout


def test_export_and_demo_name_their_extra(core, tmp_path):
    import torch

    checkpoint = tmp_path / "some.pt"
    torch.save({"fc.weight": torch.zeros(CLASSES, 4), "fc.bias": torch.zeros(CLASSES)}, checkpoint)
    proc = core.ens("export", checkpoint, "--arch", "resnet18", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", EXPORT_ERROR)
    assert not checkpoint.with_suffix(".onnx").exists()
    proc = core.ens("demo", "--quick", "--out", tmp_path / "demo", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", DEMO_ERROR)
    assert not (tmp_path / "demo").exists()


# In process, in the main environment: each module of the extras, hidden, gets its one line.
@pytest.mark.parametrize("hidden, args, expected", [
    ("torch", ["export", "x.pt"], EXPORT_ERROR),
    ("onnxconverter_common", ["export", "x.pt", "--fp16"],
     "error: ens export needs onnxconverter-common, which this install lacks: pip install 'ens[export]'\n"),
    ("safetensors.torch", ["export", "x.safetensors", "--arch", "resnet18"],
     "error: ens export needs safetensors, which this install lacks: pip install 'ens[export]'\n"),
    ("torchvision", ["demo", "--quick"],
     "error: ens demo needs torchvision, which this install lacks: pip install 'ens[demo]'\n"),
    ("sklearn", ["demo", "--quick"],
     "error: ens demo needs scikit-learn, which this install lacks: pip install 'ens[demo]'\n"),
])
def test_missing_extra_module_is_one_line(hidden, args, expected, monkeypatch, tmp_path):
    import exporters  # noqa: F401  (loaded first, so that hiding torch below hides it from the command)

    monkeypatch.chdir(tmp_path)
    if hidden == "torch":  # exporters imports it at module level: forget the loaded package
        for name in [n for n in sys.modules if n == "exporters" or n.startswith("exporters.")]:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` now raises ModuleNotFoundError
    result = runner.invoke(app, args)
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", expected)
    assert list(tmp_path.iterdir()) == []


def test_other_import_errors_are_not_blamed_on_the_extra(monkeypatch):
    import exporters  # noqa: F401

    monkeypatch.delitem(sys.modules, "exporters")
    monkeypatch.setitem(sys.modules, "exporters.onnx_export", None)  # a broken ens, not a missing extra
    result = runner.invoke(app, ["export", "x.pt"])
    assert isinstance(result.exception, ImportError) and "ens[export]" not in result.output
