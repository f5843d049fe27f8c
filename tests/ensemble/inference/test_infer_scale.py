"""`ens infer` at 10,000 classes (issue 24): its memory follows the chunk, the views and the
classes, never the split's rows; the models' chunk buffers fit ``--memory`` (the chunk size left
out follows from it; one given that cannot fit is one line naming both); stores are float16 by
default; and a disk that cannot hold the kept views is one line naming the size before anything
is decoded.

Peak resident memory is measured from a parent process (``os.wait4`` in a small launcher, as in
tests/ensemble/formats/test_members.py): a child forked from the test's process would start its
peak at the test's size.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats.dataset import load_split
from ensemble.formats.store import MANIFEST, read_store
from ensemble.inference import run as run_module
from ensemble.inference.forward import merge_rows
from ensemble.inference.options import InferOptions
from ensemble.inference.run import infer
from ensemble.inference.tta import merge

from tests.ensemble.conftest import ens, make_inat, one_line_error, tiny_onnx
from tests.rss import measure

WIDE = 10_000  # iNat 2021's classes

MB = 1 << 20
Usage = namedtuple("Usage", "total used free")


#: `ens ARGS...` with every merge in one piece, as before issue 24 (forward.MERGE_LOGITS unbounded).
WHOLE_MERGE = """
import sys
if __name__ == "__main__":
    from ensemble.inference import forward
    forward.MERGE_LOGITS = 1 << 62
    sys.argv = ["ens", *sys.argv[1:]]
    from ensemble.cli import main
    main()
"""


def _infer_peak_mb(work: Path, *args, ens: tuple[str, ...] = ("-m", "ensemble")) -> int:
    """``ens infer ARGS...`` in ``work`` (decoding in the process, on the CPU): its peak resident
    memory in MB."""
    done = measure([sys.executable, *ens, "infer", *args, "--workers", "0", "--device", "cpu"], cwd=work, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.peak_mb


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """512 test images and a 10,000-class tiny model."""
    work = tmp_path_factory.mktemp("wide")
    make_inat(work / "inat", n_val=2, n_test=512)
    tiny_onnx(work / "wide.onnx", classes=WIDE)
    return work


@pytest.fixture(scope="module")
def base(wide) -> int:
    """The interpreter, onnxruntime and the model's session: identity only, one batch a chunk."""
    return _infer_peak_mb(wide, "wide.onnx", "--data", "inat", "--split", "test", "--out", "base",
                          "--chunk-size", 32)


@pytest.mark.slow  # two runs of ens infer in subprocesses, 10 views of 512 images
def test_the_chunk_buffers_of_ten_kept_views_stay_near_their_stored_size(wide, base):
    """crop10 + --keep-views, a chunk of 512 images of 10,000 classes: the chunk's stored arrays
    are 512 x 11 x 10,000 float16 = 113 MB. Held as lists of float32 views and float64 scores,
    joined, clipped and converted at the end of the chunk (the code before issue 24), the run
    took 675 MB above the baseline; filled batch by batch into float16 buffers it takes the
    buffers and one batch's work."""
    peak = _infer_peak_mb(wide, "wide.onnx", "--data", "inat", "--split", "test", "--tta", "crop10",
                          "--keep-views", "--chunk-size", 512, "--out", "runs")
    stored = 512 * 11 * WIDE * 2 / MB
    assert peak - base < 2 * stored + 100, (base, peak, stored)  # before: 675 MB above the baseline
    store = read_store(wide / "runs" / "wide" / "test")
    assert store.logits.dtype == np.float16 and store.views.dtype == np.float16  # the default dtype
    assert store.views.shape == (10, 512, WIDE)


@pytest.mark.slow  # three runs of ens infer in subprocesses, 10 views of 512 images
def test_a_large_batch_merges_in_pieces(wide, base):
    """--batch-size 256, crop10, mean-probs at 10,000 classes: 25.6 million logits a batch, whose
    merge in one piece takes its float64 copies and scipy's temporaries (about 1.5 GB); merged
    a few rows at a time it takes the batch's float32 outputs and one piece's temporaries."""
    args = ("wide.onnx", "--data", "inat", "--split", "test", "--tta", "crop10", "--merge", "mean-probs",
            "--batch-size", 256, "--chunk-size", 256)
    peak = _infer_peak_mb(wide, *args, "--out", "pieces")
    (wide / "whole.py").write_text(WHOLE_MERGE)
    whole = _infer_peak_mb(wide, *args, "--out", "whole", "--memory", 8, ens=("whole.py",))
    assert peak - base < 500 < whole - base, (base, peak, whole)  # the control shows the bound can fail
    pieces, one = (read_store(wide / out / "wide" / "test").logits for out in ("pieces", "whole"))
    assert np.asarray(pieces).tobytes() == np.asarray(one).tobytes()  # the same stores


@pytest.mark.parametrize("mode", ["mean-logits", "mean-probs", "gmean"])
def test_merging_rows_apart_gives_the_same_bytes(mode):
    rng = np.random.default_rng(0)
    for shape in [(10, 32, 1000), (3, 7, 1010), (1, 5, 5), (6, 33, 997)]:
        logits = rng.normal(0, 5, shape).astype(np.float32)
        whole = merge(logits, mode)
        for most in (1, 1000, 12345, 1 << 30):
            assert merge_rows(logits, mode, most).tobytes() == whole.tobytes(), (shape, most)


@pytest.mark.slow  # a run of ens infer in a subprocess
def test_the_default_chunk_follows_memory_and_the_peak_stays_within_it(wide, base):
    peak = _infer_peak_mb(wide, "wide.onnx", "--data", "inat", "--split", "test", "--tta", "crop10",
                          "--keep-views", "--memory", "0.25", "--out", "small")
    manifest = json.loads((wide / "small" / "wide" / "test" / MANIFEST).read_text())
    chunk = manifest["chunk_size"]
    assert chunk % 32 == 0 and 32 <= chunk < 512, chunk  # 1024 images would not fit 0.25 GiB
    assert f"--chunk-size {chunk}" in manifest["command"]  # the command that finishes it repeats it
    assert peak - base < 0.25 * 1024, (base, peak)


def test_a_chunk_size_that_cannot_fit_memory_is_one_line_naming_both(wide, tmp_path):
    result = ens("infer", wide / "wide.onnx", "--index", wide / "inat" / "test2019.json", "--tta", "crop10",
                 "--keep-views", "--chunk-size", 4096, "--memory", "0.25", "--workers", 0, "--device", "cpu",
                 "--out", tmp_path / "runs")
    line = one_line_error(result, "--chunk-size 4096", "--memory", "0.25 GiB", "or less")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("chunk-*")), line


def test_one_batch_that_cannot_fit_memory_is_one_line_naming_the_batch_size(wide, tmp_path):
    result = ens("infer", wide / "wide.onnx", "--index", wide / "inat" / "test2019.json", "--tta", "crop10",
                 "--keep-views", "--batch-size", 512, "--memory", "0.25", "--workers", 0, "--device", "cpu",
                 "--out", tmp_path / "runs")
    one_line_error(result, "--batch-size 512", "--memory", "0.25 GiB")


@pytest.mark.slow  # two runs of ens infer in subprocesses, 2048 images
def test_nothing_grows_with_the_splits_rows(tmp_path):
    """128 and 2048 images, chunks of 128: the store's views (2 x 2048 x 10,000 float16 = 82 MB)
    are assembled chunk by chunk, so the larger split costs no more memory."""
    make_inat(tmp_path / "small", n_val=2, n_test=128)
    make_inat(tmp_path / "large", n_val=2, n_test=2048)
    tiny_onnx(tmp_path / "wide.onnx", classes=WIDE)
    peaks = {name: _infer_peak_mb(tmp_path, "wide.onnx", "--data", name, "--split", "test", "--tta", "flip",
                                  "--keep-views", "--chunk-size", 128, "--out", f"runs-{name}")
             for name in ("small", "large")}
    assert peaks["large"] - peaks["small"] < 40, peaks
    assert read_store(tmp_path / "runs-large" / "wide" / "test").views.shape == (2, 2048, WIDE)


def test_stores_are_float16_by_default():
    assert InferOptions().dtype == "float16"


def _tmpfs_sh(work: Path, size: str, script: str):
    (work / "full").mkdir(exist_ok=True)
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size={size} tmpfs full && {script}"],
                          cwd=work, capture_output=True, text=True, timeout=300)


def test_kept_views_a_tmpfs_cannot_hold_are_one_line_naming_the_size_before_decoding(wide, tmp_path):
    """crop10 kept at 10,000 classes: 512 images need 512 x 11 x 10,000 x 2 bytes (chunks) plus
    the store assembled beside them, about 225 MB; a 64 MB tmpfs refuses before any chunk."""
    if shutil.which("unshare") is None or _tmpfs_sh(tmp_path, "100k", "true").returncode != 0:
        pytest.skip("no unprivileged tmpfs mount here (unshare --user --mount)")
    for name in ("wide.onnx", "inat"):
        (tmp_path / name).symlink_to(wide / name)
    result = _tmpfs_sh(tmp_path, "64m", f"{sys.executable} -m ensemble infer wide.onnx --data inat --split test "
                                        "--tta crop10 --keep-views --workers 0 --device cpu --out full/runs; "
                                        "echo rc=$? >&2; ls -A full/runs/wide/test/.partial")
    assert "rc=2" in result.stderr, result.stderr
    line = [x for x in result.stderr.splitlines() if x.startswith("error: ")][-1]
    need = 2 * 512 * (11 * WIDE * 2 + 16)  # the chunks and the assembled arrays, float16 (+ a cam box)
    assert f"need about {need / 1e6:.1f} MB" in line, line
    assert "leave out --keep-views" in line and "free" in line, line
    assert "chunk-" not in result.stdout, result.stdout  # nothing decoded, no chunk written


@pytest.mark.slow  # a split json of 500,000 images
def test_the_full_inat_2021_test_split_with_ten_kept_views_is_refused_naming_its_size(tmp_path, monkeypatch):
    """500,000 images x 10 views kept x 10,000 classes: 100 GB of views in float16 (110 GB with
    the logits), twice while the store is assembled beside its chunks; a disk with 50 GB free
    is one line naming both sizes before anything is decoded (the images need not exist)."""
    images = [{"id": i, "file_name": f"test/{i}.jpg", "width": 4, "height": 4} for i in range(500_000)]
    (tmp_path / "public_test.json").write_text(json.dumps({"images": images, "categories": []}))
    split = load_split(tmp_path / "public_test.json", "test")
    model = tiny_onnx(tmp_path / "wide.onnx", classes=WIDE)
    monkeypatch.setattr(run_module.shutil, "disk_usage", lambda path: Usage(10 ** 12, 10 ** 12 - 50 * 10 ** 9,
                                                                             50 * 10 ** 9))
    chunks = []
    with pytest.raises(EnsError) as info:
        infer([model], [split], InferOptions(tta=("crop10",), keep_views=True, workers=0, device="cpu",
                                             out=tmp_path / "runs"),
              progress=lambda event: chunks.append(event) if event.kind == "chunk" else None)
    message = str(info.value)
    assert "the test stores (1 model, 500000 images) need about 220.0 GB there" in message, message
    assert "50.0 GB free" in message and "leave out --keep-views" in message, message
    assert not chunks
