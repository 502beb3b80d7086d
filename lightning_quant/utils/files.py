"""Files written so that a reader never sees half of one, and a failed write leaves nothing behind.

Contents are made in memory first (torch's own file writers can abort the process from a
destructor when the disk is full, leaving their file behind), then written under a temporary
name in the destination folder, flushed to disk and renamed into place. A set of files is
all-or-nothing: every temporary file is written before any is renamed, so a write that fails
(a full disk, say) leaves every previous file as it was and no temporary file. New files get
the permissions the process's umask gives (``mkstemp`` alone would make them 0600).

A set that must survive a killed process (the export set, the report) is written by
:func:`write_file_set`: into a fresh folder with a manifest of SHA-256 checksums, switched to with one
rename of a link.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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
        _write_all(fd, data)
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
    """Make sure ``folder`` can receive files before any work: create it, write a probe file there and
    remove it. A folder that already exists is left as it was (bar the probe).

    Raises:
        ValueError: naming the folder, what it is for, and the problem (a NUL byte, a file in the way, a name
            longer than the file system takes, a read-only or virtual file system such as ``/proc``).
    """
    text = os.fspath(folder)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "\0" in text:
        raise ValueError(f"{what}={text!r} contains a NUL byte, which no file system takes in a path")
    folder = Path(text)
    try:
        _probe_folder(folder, what)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(
            f"{what}={str(folder)!r} cannot receive files: {reason} (errno {err.errno}, found by writing a probe file "
            "before any training); choose a writable folder on a real file system"
        ) from None
    return folder


def _probe_folder(folder: Path, what: str) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == folder and not folder.is_dir():
        raise ValueError(f"{what}={str(folder)!r} is a file, not a folder: choose a folder for the files")
    if not existing.is_dir():
        raise ValueError(f"{what}={str(folder)!r} lies under the file {str(existing)!r}: choose a folder")
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".lightning_quant_probe.", dir=folder)
    try:
        os.write(fd, b"probe")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


# ---------------------------------------------------------------------- sets of files that switch as one

#: the manifest's name inside a set folder, and its format
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lightning-quant file set"
MANIFEST_VERSION = 1

#: a seam for the tests that kill the process at each stage of writing a set: called with the stage's name
_stage: Callable[[str], None] = lambda stage: None  # noqa: E731


def set_folders(directory: Path, basename: str) -> tuple[Path, Path]:
    """``(sets, current)``: the folder holding ``basename``'s sets in ``directory``, and the link to the current one."""
    return directory / f".{basename}.sets", directory / f".{basename}.current"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file_set(
    directory: os.PathLike | str,
    basename: str,
    files: Mapping[str, bytes],
    details: Mapping[str, Mapping[str, Any]] | None = None,
    family: Iterable[str] = (),
) -> dict[str, Path]:
    """Write ``{file name: bytes}`` into ``directory`` as one set that a killed process cannot mix with the
    previous one; returns ``{file name: path}``.

    The set is written whole into a new folder ``.<basename>.sets/<id>/`` with a ``manifest.json`` listing
    each file, its size and SHA-256 (and ``details[name]``); then the link ``.<basename>.current`` is switched
    to it in one rename. The files' own names in ``directory`` are relative links through that one link, so
    every name switches at the same instant: before it, each name gives the old set; after it, the new one
    (a name the new set lacks is removed, and reads as missing until then). The manifest is ``<basename>.
    manifest.json``. Leftovers of a killed run (a set never switched to, temporary links) are removed by the
    next write. ``family`` names every file a set of this kind may hold (the files of other export targets):
    plain files of an older release under those names are first taken into a set of their own, the same
    way, so they switch with the rest. On a file system without symbolic links the files are renamed into
    place one by one (all-or-nothing under a failed write, not under a kill), with a log line saying so.

    Raises:
        OSError: a write failed (a full disk, say); the previous set is as it was.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sets, current = set_folders(directory, basename)
    if not _symlinks_work(directory):
        log.warning(
            "%s takes no symbolic links: the files of %r are renamed into place one by one (a failed write leaves the "
            "old files; a killed process may leave a mix)",
            directory,
            basename,
        )
        manifest = _manifest(files, details)
        written = atomic_write_files(
            {**{directory / n: d for n, d in files.items()}, directory / f"{basename}.{MANIFEST}": manifest}
        )
        return {name: path for name, path in zip(files, written)}
    tops = list(dict.fromkeys(_top(name) for name in files))  # a file or a folder of files of the set
    names = list(dict.fromkeys([*tops, *family, f"{basename}.{MANIFEST}"]))
    _remove_leftovers(directory, basename, names)
    _adopt_plain_files(directory, basename, names)
    _stage("start")
    folder = _new_set_folder(sets)
    try:
        for name, data in files.items():
            if _top(name) != name:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
            _write_whole(folder / name, data)
            _stage("written")
        _write_whole(folder / MANIFEST, _manifest(files, details))
        for top in tops:
            if (folder / top).is_dir():
                _fsync_folder(folder / top)
        _fsync_folder(folder)
        _fsync_folder(sets)
        links = {**{name: name for name in tops}, f"{basename}.{MANIFEST}": MANIFEST}
        for name, inside in links.items():  # new names point through the link: missing until it switches
            link = directory / name
            if not link.is_symlink():
                _replace_with_link(link, Path(current.name) / inside)
        _stage("linked")
        _replace_with_link(current, Path(sets.name) / folder.name)  # the one rename that switches the set
        _fsync_folder(directory)
        _stage("switched")
    except BaseException:
        if not _points_to(current, folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    _remove_stale(directory, basename, keep=folder)
    return {name: directory / name for name in files}


def _top(name: str) -> str:
    """The entry of ``directory`` a set's file lies in: itself, or the folder of ``"folder/file"``."""
    return name.split("/", 1)[0]


def _symlinks_work(directory: Path) -> bool:
    probe = directory / f".lightning_quant_link_probe.{os.getpid()}"
    try:
        os.symlink("target", probe)
    except (OSError, NotImplementedError):
        return False
    os.unlink(probe)
    return True


def _manifest(files: Mapping[str, bytes], details: Mapping[str, Mapping[str, Any]] | None) -> bytes:
    entries = {
        name: {"bytes": len(data), "sha256": sha256_of(data), **dict((details or {}).get(name, {}))}
        for name, data in files.items()
    }
    body = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
    }
    return (json.dumps(body, indent=2, default=str) + "\n").encode("utf-8")


def _new_set_folder(sets: Path) -> Path:
    sets.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=sets))


def _write_all(fd: int, data: bytes) -> None:
    """Every byte of ``data`` to ``fd``, then to the disk."""
    view = memoryview(data)
    while view:
        view = view[_write(fd, view) :]
    os.fsync(fd)


def _write_whole(path: Path, data: bytes) -> None:
    """A new file (the umask's permissions) holding ``data``, on the disk when this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _replace_with_link(path: Path, target: Path) -> None:
    """Make ``path`` a relative symbolic link to ``target`` in one rename (whatever ``path`` was)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _points_to(link: Path, folder: Path) -> bool:
    try:
        return link.is_symlink() and (link.parent / os.readlink(link)).resolve() == folder.resolve()
    except OSError:
        return False


def _current_set(directory: Path, basename: str) -> Path | None:
    sets, current = set_folders(directory, basename)
    if not current.is_symlink():
        return None
    target = (directory / os.readlink(current)).resolve()
    return target if target.parent == sets.resolve() and target.is_dir() else None


def _remove_leftovers(directory: Path, basename: str, names: list[str]) -> None:
    """What a killed write left: sets never switched to, temporary links, and temporary files of this set's
    names (``atomic_write``'s, an older release's)."""
    sets, _ = set_folders(directory, basename)
    keep = _current_set(directory, basename)
    for folder in sets.iterdir() if sets.is_dir() else ():
        if keep is not None and folder.resolve() == keep:
            continue
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)
    prefixes = tuple(f".{n}." for n in (basename, *names))
    for entry in directory.iterdir():
        if entry.name.startswith(prefixes) and entry.name.endswith((".link", ".tmp")) and not entry.is_dir():
            entry.unlink(missing_ok=True)


def _adopt_plain_files(directory: Path, basename: str, names: list[str]) -> None:
    """Files of an older release under this set's names become a set of their own (hard links, or copies),
    then each name becomes a link into it: at every moment each name reads the same bytes."""
    plain = [n for n in names if (directory / n).is_file() and not (directory / n).is_symlink()]
    if not plain or _current_set(directory, basename) is not None:
        return  # (a plain file beside a current set is replaced by its link in one rename, later)
    sets, current = set_folders(directory, basename)
    folder = _new_set_folder(sets)
    contents = {}
    for name in plain:
        try:
            os.link(directory / name, folder / name)
        except OSError:
            shutil.copy2(directory / name, folder / name)
        contents[name] = (folder / name).read_bytes()
    manifest_name = f"{basename}.{MANIFEST}"
    if manifest_name not in contents:
        _write_whole(folder / MANIFEST, _manifest({n: d for n, d in contents.items()}, None))
    _fsync_folder(folder)
    _replace_with_link(current, Path(sets.name) / folder.name)
    for name in plain:
        inside = MANIFEST if name == manifest_name else name
        _replace_with_link(directory / name, Path(current.name) / inside)
    _fsync_folder(directory)


def _remove_stale(directory: Path, basename: str, keep: Path) -> None:
    """After a switch: older sets, and links to files the current set does not have."""
    sets, current = set_folders(directory, basename)
    for folder in sets.iterdir():
        if folder.resolve() != keep.resolve():
            shutil.rmtree(folder, ignore_errors=True)
    for entry in directory.iterdir():
        if entry.is_symlink() and not entry.exists():
            target = Path(os.readlink(entry))
            if target.parts[:1] == (current.name,):
                entry.unlink()


def set_entry(path: os.PathLike | str) -> tuple[Path, dict[str, Any]] | None:
    """``(manifest path, the file's entry)`` when ``path`` is a file of a set :func:`write_file_set` wrote (read
    through its link), else ``None``.

    Raises:
        ValueError: the manifest is not valid JSON of a file set (it was damaged).
    """
    real = Path(path).resolve()
    manifest, key = real.parent / MANIFEST, real.name
    if not manifest.is_file():  # a file of a folder of the set (``"folder/file"``)
        manifest, key = real.parent.parent / MANIFEST, f"{real.parent.name}/{real.name}"
    if real.name == MANIFEST or not manifest.is_file():
        return None
    try:
        body = json.loads(manifest.read_bytes())
        if body.get("format") != MANIFEST_FORMAT:
            return None
        entry = body["files"].get(key)
    except (ValueError, AttributeError, KeyError, TypeError) as err:
        raise ValueError(f"the manifest {str(manifest)!r} of {str(path)!r} is damaged: {err}") from None
    return (manifest, entry) if isinstance(entry, dict) else None
