"""Writing files atomically and hashing them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
