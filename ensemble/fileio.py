"""Writing files atomically (replacing, or only ever creating: :func:`write_new`) and hashing them."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
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
    file there stays as it was), nor any folder this call made for it that is still empty. The
    temporary file lives in the same folder so the final ``os.replace`` is atomic on one file
    system. An OSError that names no file or the temporary one (``write`` on a full disk or
    past a file-size limit names none) is raised again naming ``path``. Only a regular file (or
    a link to one) is ever replaced: anything else at ``path`` is an EnsError before anything is
    written (:func:`check_replaceable`).
    """
    path = Path(path)
    check_replaceable(path)
    made = _make_folders(path.parent)
    done = False
    try:
        fd, tmp_path = _create_temporary(path)
        os.close(fd)
        try:
            with _naming(path, tmp_path):
                yield tmp_path
                os.replace(tmp_path, path)
            done = True
        finally:
            tmp_path.unlink(missing_ok=True)
    finally:
        if not done:
            _remove_empty(made)


def check_replaceable(path: str | os.PathLike, option: str | None = None) -> None:
    """``path`` is absent, or a regular file (or a link to one) that a write may replace;
    otherwise (a folder, a FIFO, a device, a socket, a link to one or to nothing) an
    :class:`~ensemble.errors.EnsError` naming it (after ``option``, the option that gave it,
    when given): a rename onto it would put a file where a pipe, a device or a link was."""
    from ensemble.errors import EnsError

    if not os.path.lexists(path) or os.path.isfile(path):
        return
    kind = "a folder" if os.path.isdir(path) else ("a link to nothing" if os.path.islink(path) else
                                                   "a FIFO, a device or a socket, or a link to one")
    if option is None:
        raise EnsError(f"{os.fsdecode(path)}: not a regular file ({kind}), and ens replaces only regular files; "
                       "move it away or write elsewhere")
    raise EnsError(f"{option} {os.fsdecode(path)}: is not a regular file ({kind}); give the name of a new file "
                   "or of a regular one")


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and the parents it lacks; the ones this call made, outermost first."""
    missing = []
    while not os.path.lexists(folder) and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for each in reversed(missing):
            try:
                each.mkdir()
                made.append(each)
            except FileExistsError:  # made meanwhile by another process: not ours to remove
                pass
        (missing[0] if missing else folder).mkdir(parents=True, exist_ok=True)  # the OS's error for a file there
    except BaseException:
        _remove_empty(made)
        raise
    return made


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders of ``made`` (outermost first) that are empty, innermost first."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # something is in it by now, or it is gone
            return


@contextlib.contextmanager
def _naming(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """An OSError naming no file, or the temporary file ``tmp`` (its name tells a user nothing),
    raised again naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and (exc.filename is None or (tmp is not None and os.fspath(exc.filename) == str(tmp))):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


#: What to do when a write found no room, for a command whose output is written whole or not
#: at all (``{elsewhere}``: the option that writes elsewhere, ``--out DIR``).
_NO_ROOM = {
    errno.ENOSPC: "the disk is full: free space, or give {elsewhere} on another disk, and run the same command again",
    errno.EDQUOT: "the disk quota is used up: free space, or give {elsewhere} on another disk, and run the same "
                  "command again",
    errno.EFBIG: "a file-size limit was reached (see `ulimit -f`; FAT32 stops files at 4 GiB): raise it, or give "
                 "{elsewhere} on another file system, and run the same command again",
}


@contextlib.contextmanager
def out_of_room(elsewhere: str) -> Iterator[None]:
    """For a command whose files are written whole or not at all (through :func:`atomic_path`):
    a write that found no room (a full disk, a used-up quota, a file-size limit) is an
    :class:`~ensemble.errors.EnsError` naming the file, what to do (``elsewhere``: the option
    that writes elsewhere) and that nothing was written; other OSErrors go on as they are."""
    from ensemble.errors import EnsError

    try:
        yield
    except OSError as exc:
        hint = _NO_ROOM.get(exc.errno)
        if hint is None or exc.filename is None:
            raise
        raise EnsError(f"{os.fsdecode(exc.filename)}: {exc.strerror}; {hint.format(elsewhere=elsewhere)}; "
                       "nothing was written") from None


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


#: The longest file name where the file system does not say (POSIX's NAME_MAX on Linux, macOS
#: and Windows' NTFS alike).
_NAME_MAX = 255
#: What a temporary name adds to the target's: ``.`` before it, ``.<12 hex digits>.tmp`` after.
_TEMP_TAIL = len(".") + len(".") + 12 + len(".tmp")


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new hidden file beside ``path``, open for writing, with the permissions a plain open()
    gives (so that colleagues on a shared machine can read the result as the umask allows;
    mkstemp's would be private): ``.<name>.<random>.tmp``, the name cut short where the whole
    would be longer than the folder's longest file name (:func:`_temporary_name`). An OSError
    (a read-only folder, a full disk) names ``path``."""
    while True:
        tmp = _temporary_name(path, secrets.token_hex(6))
        try:
            return os.open(tmp, _NEW_FILE, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:  # named after the file it is for: the temporary name tells nothing
            raise OSError(exc.errno, exc.strerror, str(path)) from None


def _temporary_name(path: Path, token: str) -> Path:
    """``.<name>.<token>.tmp`` beside ``path``, ``<name>`` being as much of ``path``'s name as
    keeps the whole within the folder's longest file name, counted in the bytes the OS stores
    (a name the OS accepts for ``path`` then always has a temporary name it accepts too)."""
    budget = max(0, name_max(path.parent) - _TEMP_TAIL)
    name = path.name[:budget]
    while len(os.fsencode(name)) > budget:  # characters of several bytes (UTF-8), or undecodable
        name = name[:-1]
    return path.with_name(f".{name}.{token}.tmp")


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name ``folder``'s file system takes, in bytes (255 where it does not say);
    compare ``len(os.fsencode(name))`` with it."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or the OS cannot say
        return _NAME_MAX
    return limit if limit and limit > _TEMP_TAIL else _NAME_MAX


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
