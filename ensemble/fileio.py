"""Writing files atomically (replacing, or only ever creating: :func:`write_new`) and hashing them."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and a failure leaves nothing at ``path`` (an older
    file there stays as it was). The temporary file lives in the same folder so the final
    ``os.replace`` is atomic on one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); the result should read like any file a plain open()
    # makes, so that colleagues on a shared machine can read it as the umask allows.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_text(value: Any) -> str:
    """``value`` as indented JSON text with a final newline; numpy scalars become numbers."""
    return json.dumps(value, indent=2, default=_json_default) + "\n"


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    """Write ``value`` as JSON (:func:`json_text`) to ``path`` through :func:`atomic_path`."""
    write_bytes_atomic(path, json_text(value).encode("utf-8"))


def _json_default(value: Any) -> Any:
    import numpy as np  # deferred: fileio is imported where numpy is not otherwise needed

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


#: What ``link`` raises on a file system without hard links (FAT, exFAT, some network mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
#: A new file, for bytes as given (``O_BINARY``: no newline translation on Windows).
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def write_new(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a file that did not exist: ``path``, or if that is taken ``<stem>-2<suffix>``,
    ``-3``... (the suffix being ``.csv.gz`` or the last one). Returns the path written.

    No file is ever replaced, so two writers that chose the same name in the same second both
    keep their bytes: the data goes to a hidden temporary file beside ``path``, is flushed to
    disk, and is then hard-linked to the first free name (a link fails where a file exists, an
    atomic test-and-create), so readers see it complete or not at all. Where the file system
    has no hard links, the name is claimed by an exclusive create and the temporary file moved
    onto it (readers may see it empty for a moment). On any failure nothing remains; an
    OSError without a file name (``write`` on a full disk) is raised again naming ``path``.
    """
    path = Path(path)
    suffix = ".csv.gz" if path.name.endswith(".csv.gz") else path.suffix
    stem = path.name[:len(path.name) - len(suffix)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        _write_and_close(fd, data, path)
        target, n = path, 1
        while not _claim(tmp, target):
            n += 1
            target = path.with_name(f"{stem}-{n}{suffix}")
        return target
    finally:
        tmp.unlink(missing_ok=True)


def _write_and_close(fd: int, data: bytes, path: Path) -> None:
    """Write all of ``data`` to ``fd``, flush it to disk and close it; errors name ``path``."""
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # a full disk may only say so here, and this is before the name is taken
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new hidden file beside ``path``, open for writing, with the permissions a plain open()
    gives (mkstemp's would be private)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, _NEW_FILE, 0o666), tmp
        except FileExistsError:
            continue


def _claim(tmp: Path, target: Path) -> bool:
    """Give ``tmp``'s bytes the name ``target`` if no file has it; ``False`` if one does."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    try:
        os.close(os.open(target, _NEW_FILE, 0o666))
    except FileExistsError:
        return False
    try:
        os.replace(tmp, target)  # onto the empty file this call made, nobody else's
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return True
