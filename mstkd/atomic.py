"""Atomic, durable file writes: write beside the target under a temporary name, flush it to disk, rename it
over the target, then flush the folder.

A reader never sees a half-written file, and a crash or power cut at any instant leaves either the
old file or the new one. A write that fails removes its temporary file.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import re
import secrets
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, *, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); on success rename it to ``path``.

    Usage: ``with atomic_path(out) as tmp: np.save(tmp, array)``. On an exception the temporary
    file is removed and ``path`` is left as it was. The temporary file is created here, with ``mode`` (the
    umask applies, as to any new file), under a name no other process can guess, and only if nothing has that
    name: a link planted in the folder is never written through.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_temporary_stem(path)}.{os.getpid()}-{secrets.token_hex(8)}.tmp{_suffixes(path)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _suffixes(path: Path) -> str:
    """The suffixes a temporary file keeps, so that writers that go by them (``np.save``, ``nib.save``) agree."""
    return "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix


def _temporary_stem(path: Path) -> str:
    """How :func:`atomic_path`'s temporary names for ``path`` begin: ``.<name>``, or for a name too long to take
    the 40 or so characters more, ``.<its first 40 characters>~<a hash of the whole>``."""
    if len(path.name.encode()) <= 200:
        return f".{path.name}"
    return f".{path.name[:40]}~{hashlib.sha256(path.name.encode()).hexdigest()[:16]}"


def stale_temporaries(path: str | Path) -> list[Path]:
    """The temporary files that :func:`atomic_path` writes for ``path`` and a killed process left behind (any
    process id): safe to remove once nothing else writes ``path``."""
    path = Path(path)
    name = re.compile(rf"{re.escape(_temporary_stem(path))}\.\d+(-[0-9a-f]{{16}})?\.tmp({re.escape(_suffixes(path))})?")
    return sorted(p for p in path.parent.glob(f"{glob.escape(_temporary_stem(path))}.*") if name.fullmatch(p.name))


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; a folder that cannot be opened is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # some file systems do not open folders; the rename is still atomic there
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes, *, private: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file created with its final mode, then rename.

    A private file (a key) is created 0600, so it is never readable by others, not even for a
    moment (writing first and restricting afterwards would leave a window under the usual umask).
    """
    with atomic_path(path, mode=0o600 if private else 0o644) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    return Path(path)


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` atomically."""
    import shutil

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""How a cell that a spreadsheet would run as a formula begins."""


def spreadsheet_text(value: Any) -> Any:
    """Text from outside (a node's, a file name's) as a spreadsheet shows it: text that starts like a formula
    (:data:`FORMULA_STARTS`) gets a leading ``'``, so that opening the CSV never runs what someone else wrote.
    Anything else is returned as it is."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def write_csv(
    path: str | Path, rows: list[dict], columns: list[str] | None = None, *, outside: Collection[str] = ()
) -> Path:
    """Write ``rows`` as CSV atomically; columns default to every key of every row, in first-seen order. The
    columns named in ``outside`` hold text from outside, shown as :func:`spreadsheet_text`."""
    import csv

    columns = columns if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: spreadsheet_text(v) if k in outside else v for k, v in row.items()} for row in rows)
    return Path(path)


def check_writable(folder: str | Path, what: str = "output") -> None:
    """Refuse, before any work, a folder that cannot be created or written to; create nothing.

    Raises:
        InputError: ``folder`` is a file, or its nearest existing ancestor is not a writable folder.
    """
    from mstkd.errors import InputError

    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if not existing.exists():
        raise InputError(f"{what} {folder}: {existing} is a link to nothing")
    if not existing.is_dir():
        raise InputError(f"{what} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {folder}: {existing} is not writable")


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, with its folder) for the block: one process at a time, across
    processes on one machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
