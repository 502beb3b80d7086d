"""Files written so that a reader never sees half of one, and a failed write leaves nothing behind.

Contents are made in memory first (torch's own file writers can abort the process from a
destructor when the disk is full, leaving their file behind), then written under a temporary
name in the destination folder, flushed to disk and renamed into place. A set of files is
all-or-nothing: every temporary file is written before any is renamed, so a write that fails
(a full disk, say) leaves every previous file as it was and no temporary file. New files get
the permissions the process's umask gives (``mkstemp`` alone would make them 0600).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

#: how bytes reach the disk; a seam for tests that simulate a full disk
_write = os.write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_temp(path: Path, data: bytes) -> str:
    """Write ``data`` to a new temporary file beside ``path``; return its name. Removes it on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        view = memoryview(data)
        while view:
            written = _write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def atomic_write_files(files: Mapping[Path, bytes | str]) -> list[Path]:
    """Write every ``{path: contents}`` (text is UTF-8) all-or-nothing; returns the paths.

    Raises:
        OSError: a write failed (no space left, say); no file was changed and no temporary file is left.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, contents in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            data = contents.encode("utf-8") if isinstance(contents, str) else bytes(contents)
            temps.append((_write_temp(path, data), path))
    except BaseException:
        for tmp, _ in temps:
            os.unlink(tmp)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)
    for folder in {path.parent for _, path in temps}:
        _fsync_folder(folder)
    return [path for _, path in temps]


def atomic_write(path: os.PathLike | str, contents: bytes | str) -> Path:
    """Write one file atomically (see :func:`atomic_write_files`)."""
    return atomic_write_files({Path(path): contents})[0]


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (best effort: some file systems refuse to open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable_folder(folder: os.PathLike | str, what: str) -> Path:
    """Raise before any work when ``folder`` cannot receive files: it is a file, or not writable.

    Raises:
        ValueError: naming the folder, what it is for, and the problem.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == folder and not folder.is_dir():
        raise ValueError(f"{what}={str(folder)!r} is a file, not a folder: choose a folder for the files")
    if not existing.is_dir():
        raise ValueError(f"{what}={str(folder)!r} lies under the file {str(existing)!r}: choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}={str(folder)!r} is not writable ({str(existing)!r} refuses new files)")
    return folder
