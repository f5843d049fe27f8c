"""`ens infer` on a full disk or past a file-size limit: one line naming the file and what to do,
no traceback (not even the resource tracker's), no crash, and the finished chunks kept."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ensemble.formats.store import MANIFEST, read_store

from tests.ensemble.conftest import LIMITED, make_inat, tiny_onnx

PROGRESS = ("device ", "val: ", "test: ")
_SHM_DIR = Path("/dev/shm")


@pytest.fixture
def work(tmp_path):
    make_inat(tmp_path / "inat", n_val=6, n_test=2)
    tiny_onnx(tmp_path / "tiny.onnx")
    tiny_onnx(tmp_path / "big.onnx", classes=5000)  # 2 rows of 5000 float16 logits: 20 kB a chunk
    (tmp_path / "limited.py").write_text(LIMITED)
    return tmp_path


def _limited(work, limit, *args):
    return subprocess.run([sys.executable, str(work / "limited.py"), str(limit), *map(str, args)], cwd=work,
                          capture_output=True, text=True, timeout=300)


def _error(result) -> str:
    """The one error line of a failed run: the last line of stderr, after progress lines only."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert all(line.startswith(PROGRESS) for line in lines[:-1]), result.stderr
    return lines[-1]


def test_a_file_size_limit_on_the_shared_memory_is_one_line_without_the_trackers_traceback(work):
    # The decoding processes' shared-memory blocks are the first thing written.
    result = _limited(work, 4096, "infer", "tiny.onnx", "--data", "inat", "--workers", 1, "--batch-size", 2)
    line = _error(result)  # no traceback from multiprocessing's resource tracker
    assert line.startswith("error: ") and "shared memory" in line and "File too large" in line, line
    assert "ulimit -f" in line and "--batch-size" in line, line


@pytest.mark.slow  # two runs in subprocesses
def test_a_file_size_limit_on_a_store_names_the_file_and_the_rerun_finishes(work):
    args = ("infer", "big.onnx", "--data", "inat", "--split", "val", "--workers", 0, "--batch-size", 2,
            "--chunk-size", 2)
    line = _error(_limited(work, 10_000, *args))
    assert "runs/big/val/" in line and "File too large" in line and "ulimit -f" in line, line
    manifest = json.loads((work / "runs" / "big" / "val" / MANIFEST).read_text())
    assert manifest["complete"] is False
    # No limit: the same command finishes the store.
    result = _limited(work, -1, *args)  # RLIM_INFINITY
    assert result.returncode == 0, result.stderr
    assert read_store(work / "runs" / "big" / "val").logits.shape == (6, 5000)


def _tmpfs_sh(work, size: str, script: str):
    """``script`` in sh with a ``size`` tmpfs mounted at WORK/full (a user and mount namespace of
    its own: no root needed where unprivileged user namespaces are allowed)."""
    (work / "full").mkdir(exist_ok=True)
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size={size} tmpfs full && {script}"],
                          cwd=work, capture_output=True, text=True, timeout=300)


#: ``ens ARGS...`` with the check for room before a split left out (and, with ``NOFALLOCATE``
#: set, without os.posix_fallocate): the full-disk tests test the writes themselves, which
#: still meet a disk that other writers fill during a run.
NO_PREFLIGHT = textwrap.dedent("""
    import os, sys

    if __name__ == "__main__":
        if os.environ.get("NOFALLOCATE"):
            del os.posix_fallocate  # as on a system whose file systems cannot claim ahead
        from ensemble.inference import run
        run._SplitRun._check_room = lambda self, todo: None
        sys.argv = ["ens", *sys.argv[1:]]
        from ensemble.cli import main
        main()
""")


def test_a_full_disk_while_the_arrays_are_assembled_is_one_line_not_a_crash(work):
    """The chunks fit; assembling logits.npy does not. Its memory map would take a SIGBUS on the
    first page the disk has no room for: the space is claimed before the map is written."""
    if shutil.which("unshare") is None or _tmpfs_sh(work, "100k", "true").returncode != 0:
        pytest.skip("no unprivileged tmpfs mount here (unshare --user --mount)")
    (work / "nopreflight.py").write_text(NO_PREFLIGHT)
    ens = f"{sys.executable} nopreflight.py"
    result = _tmpfs_sh(work, "100k", f"{ens} infer big.onnx --data inat --split val --workers 0 --batch-size 2 "
                                     "--chunk-size 2 --out full/runs; echo rc=$? >&2; ls -A full/runs/big/val")
    assert "rc=2" in result.stderr, result.stderr  # not 135: killed by SIGBUS
    stderr = result.stderr.replace("rc=2\n", "")
    lines = stderr.splitlines()
    assert lines[-1].startswith("error: ") and all(line.startswith(PROGRESS) for line in lines[:-1]), stderr
    line = lines[-1]
    assert "full/runs/big/val/" in line and "No space left on device" in line and "the disk is full" in line, line
    # Nothing half-written: the chunks and the incomplete manifest, no temporary array.
    assert sorted(result.stdout.split()) == [".lock", ".partial", MANIFEST], result.stdout


def test_a_full_shared_memory_is_one_line_not_a_broken_pool(work):
    """/dev/shm too small for the decoded batches (a container's is 64 MB unless given
    --shm-size): a worker writing into a block the memory has no room for would die of SIGBUS."""
    if not _SHM_DIR.is_dir() or shutil.which("unshare") is None or _tmpfs_sh(work, "100k", "true").returncode != 0:
        pytest.skip("no /dev/shm, or no unprivileged tmpfs mount here (unshare --user --mount)")
    (work / "full").rmdir()
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=100k tmpfs /dev/shm && {sys.executable} -m ensemble infer tiny.onnx --data inat "
         "--workers 1 --batch-size 32"], cwd=work, capture_output=True, text=True, timeout=300)
    line = _error(result)  # (blocks are made when the first batches need them, after progress lines)
    assert "shared memory /dev/shm/ens-" in line and "No space left on device" in line, line
    assert "--shm-size" in line and "--workers 0" in line, line


def test_a_disk_full_from_the_start_names_the_store_folder(work):
    if shutil.which("unshare") is None or _tmpfs_sh(work, "100k", "true").returncode != 0:
        pytest.skip("no unprivileged tmpfs mount here (unshare --user --mount)")
    result = _tmpfs_sh(work, "100k", f"head -c 102400 /dev/zero > full/filler 2>/dev/null; {sys.executable} -m "
                                     "ensemble infer tiny.onnx --data inat --workers 0 --out full/runs")
    line = _error(result)
    assert "full/runs/tiny/val/" in line and "No space left on device" in line and "the disk is full" in line, line


def _shm_sh(work, size: str, command: str):
    """``command`` with a ``size`` tmpfs mounted at /dev/shm (a user and mount namespace of its own)."""
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size={size} tmpfs /dev/shm && {command}"],
                          cwd=work, capture_output=True, text=True, timeout=300)


def _need_shm_tmpfs(work):
    if not _SHM_DIR.is_dir() or shutil.which("unshare") is None or _tmpfs_sh(work, "100k", "true").returncode != 0:
        pytest.skip("no /dev/shm, or no unprivileged tmpfs mount here (unshare --user --mount)")


def test_only_the_blocks_a_run_can_use_are_made(work):
    """6 images, a 224 px model, 8 workers, a container's 64 MB /dev/shm: one batch per split,
    so one block, not the 18 (173 MB) eight workers would keep in flight."""
    _need_shm_tmpfs(work)
    tiny_onnx(work / "wide.onnx", size=224, dynamic=False)
    result = _shm_sh(work, "64m", f"{sys.executable} -m ensemble infer wide.onnx --data inat --workers 8")
    assert result.returncode == 0, result.stderr
    assert read_store(work / "runs" / "wide" / "val").logits.shape[0] == 6


def _block_bytes(model, batch_size: int) -> int:
    """The bytes of one shared-memory block of ``ens infer MODEL --batch-size BATCH_SIZE``."""
    from ensemble.inference.decode import batch_bytes
    from ensemble.inference.forward import decode_needs
    from ensemble.inference.options import InferOptions
    from ensemble.inference.runtime import load_model
    from ensemble.inference.tta import plan_views

    options = InferOptions(batch_size=batch_size)
    return batch_bytes(batch_size, **decode_needs([load_model(model)], plan_views((), options.scales), options))


def test_a_shared_memory_with_room_for_two_blocks_decodes_with_them_and_says_so(work):
    _need_shm_tmpfs(work)
    # 3 batches of 2 images: the run wants three blocks of 301 kB. The pool's semaphores take a
    # few pages of /dev/shm too: far less than half a block.
    tiny_onnx(work / "wide.onnx", size=224, dynamic=False)
    args = ("wide.onnx", "--data", "inat", "--split", "val", "--workers", "4", "--batch-size", "2")
    block = _block_bytes(work / "wide.onnx", 2)
    room = -(-block * 5 // 2 // 4096) * 4  # kB: two blocks and a half
    result = _shm_sh(work, f"{room}k", f"{sys.executable} -m ensemble infer {' '.join(args)} --out full")
    assert result.returncode == 0, result.stderr
    notes = [line for line in (result.stdout + result.stderr).splitlines() if "shared memory" in line]
    assert len(notes) == 1, result.stdout + result.stderr
    assert "2 of the 3" in notes[0] and "--batch-size" in notes[0] and "/dev/shm" in notes[0], notes[0]
    assert "Traceback" not in result.stderr
    # The same arrays as with room for all.
    whole = _shm_sh(work, "64m", f"{sys.executable} -m ensemble infer {' '.join(args)} --out whole")
    assert whole.returncode == 0, whole.stderr
    assert ((work / "full" / "wide" / "val" / "logits.npy").read_bytes()
            == (work / "whole" / "wide" / "val" / "logits.npy").read_bytes())


def test_room_for_one_block_where_two_are_needed_is_one_line(work):
    _need_shm_tmpfs(work)
    tiny_onnx(work / "wide.onnx", size=224, dynamic=False)
    args = ("wide.onnx", "--data", "inat", "--split", "val", "--workers", "4", "--batch-size", "2")
    room = -(-_block_bytes(work / "wide.onnx", 2) * 3 // 2 // 4096) * 4  # kB: a block and a half
    line = _error(_shm_sh(work, f"{room}k", f"{sys.executable} -m ensemble infer {' '.join(args)}"))
    assert "shared memory /dev/shm/ens-" in line and "No space left on device" in line, line


def test_a_block_interrupted_while_it_is_sized_is_removed(monkeypatch):
    from ensemble.inference import decode

    if not _SHM_DIR.is_dir():
        pytest.skip("no /dev/shm")
    name = f"ens-{os.getpid()}-test-interrupted"

    def interrupted(fd, size):
        raise KeyboardInterrupt

    monkeypatch.setattr(decode.os, "ftruncate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        decode._new_block(name, 4096)
    assert not (_SHM_DIR / name).exists()


def test_a_block_that_fails_to_attach_raises_its_own_error(monkeypatch):
    """SharedMemory(name) failing in mmap unlinks the block itself: the error is its own, not
    the FileNotFoundError of unlinking it again."""
    from multiprocessing import shared_memory

    from ensemble.inference import decode

    if not _SHM_DIR.is_dir():
        pytest.skip("no /dev/shm")
    name = f"ens-{os.getpid()}-test-attach"

    def failing(block):
        (_SHM_DIR / block).unlink()
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(shared_memory, "SharedMemory", failing)
    with pytest.raises(OSError) as info:
        decode._new_block(name, 4096)
    assert info.value.errno == errno.ENOMEM
    assert not (_SHM_DIR / name).exists()


def test_a_full_disk_that_cannot_claim_space_ahead_is_one_line_not_a_crash(work):
    """A file system without fallocate (NFSv3, FUSE, older ZFS; copy-on-write ZFS reserves
    nothing with it): the arrays are assembled with plain writes, so a full disk is an error
    of a write, never a SIGBUS in a memory map."""
    if shutil.which("unshare") is None or _tmpfs_sh(work, "100k", "true").returncode != 0:
        pytest.skip("no unprivileged tmpfs mount here (unshare --user --mount)")
    (work / "nopreflight.py").write_text(NO_PREFLIGHT)
    result = _tmpfs_sh(work, "100k", f"NOFALLOCATE=1 {sys.executable} nopreflight.py infer big.onnx --data inat --split val "
                                     "--workers 0 --batch-size 2 --chunk-size 2 --out full/runs; echo rc=$? >&2; "
                                     "ls -A full/runs/big/val")
    assert "rc=2" in result.stderr, result.stderr  # not 135: killed by SIGBUS
    line = _error(subprocess.CompletedProcess([], 2, "", result.stderr.replace("rc=2\n", "")))
    assert "full/runs/big/val/logits.npy" in line and "No space left on device" in line, line
    assert sorted(result.stdout.split()) == [".lock", ".partial", MANIFEST], result.stdout


def test_the_assembled_arrays_are_what_numpy_saves(tmp_path):
    """logits.npy and views.npy, assembled chunk by chunk, hold the bytes np.save writes for
    their arrays (header included)."""
    import io

    import numpy as np

    from ensemble.formats.dataset import load_split
    from ensemble.inference.run import InferOptions, infer

    make_inat(tmp_path / "inat", n_val=7, n_test=1)
    model = tiny_onnx(tmp_path / "m.onnx")
    infer([model], [load_split(tmp_path / "inat" / "val2019.json")],
          InferOptions(tta=("flip",), keep_views=True, workers=0, batch_size=2, chunk_size=2, out=tmp_path / "runs"))
    folder = tmp_path / "runs" / "m" / "val"
    for name in ("logits.npy", "views.npy"):
        saved = io.BytesIO()
        np.save(saved, np.load(folder / name))
        assert (folder / name).read_bytes() == saved.getvalue(), name
    assert np.load(folder / "views.npy").shape[:2] == (2, 7)


def test_a_store_whose_every_image_was_skipped_is_assembled(tmp_path):
    import numpy as np

    from ensemble.formats.dataset import load_split
    from ensemble.inference.run import InferOptions, infer

    make_inat(tmp_path / "inat", n_val=3, n_test=1)
    for image in (tmp_path / "inat").rglob("*.jpg"):
        image.write_bytes(b"not an image")
    model = tiny_onnx(tmp_path / "m.onnx")
    infer([model], [load_split(tmp_path / "inat" / "val2019.json")],
          InferOptions(tta=("flip",), keep_views=True, on_bad_image="skip", workers=0, batch_size=2, chunk_size=2,
                       out=tmp_path / "runs"))
    store = read_store(tmp_path / "runs" / "m" / "val")
    assert store.logits.shape[0] == 0 and store.views.shape[:2] == (2, 0) and len(store.skipped_ids) == 3
    assert np.load(tmp_path / "runs" / "m" / "val" / "logits.npy").shape == store.logits.shape


def test_a_disk_too_small_for_the_stores_is_refused_before_any_decoding(work):
    """The check for room (issue 24, Disk) on a real file system: one line with the sizes, no
    chunk written."""
    if shutil.which("unshare") is None or _tmpfs_sh(work, "100k", "true").returncode != 0:
        pytest.skip("no unprivileged tmpfs mount here (unshare --user --mount)")
    result = _tmpfs_sh(work, "100k", f"{sys.executable} -m ensemble infer big.onnx --data inat --split val "
                                     "--workers 0 --batch-size 2 --chunk-size 2 --out full/runs; echo rc=$? >&2; "
                                     "ls -A full/runs/big/val/.partial 2>/dev/null | grep -c chunk")
    assert "rc=2" in result.stderr, result.stderr
    line = _error(subprocess.CompletedProcess([], 2, "", result.stderr.replace("rc=2\n", "")))
    assert "full/runs: the val stores (1 model, 6 images) need about" in line and "kB free" in line, line
    assert result.stdout.strip() == "0", result.stdout
