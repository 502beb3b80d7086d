"""Reading files so that a damaged one is named, and one that would run code is refused.

- Every file of a set written by :func:`~lightning_quant.utils.files.write_file_set` is checked against the
  SHA-256 its manifest records.
- Files in torch's zip format (``torch.save``, TorchScript, ``.pt2``, Lightning checkpoints) carry a CRC-32 per
  member: each is checked before torch reads the file, so one flipped byte is found, not loaded.
- Pickled parts are read by torch's weights-only unpickler, which builds tensors and plain containers and
  calls nothing else; a file that needs more is refused as unsafe.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_quant.utils.files import set_entry, sha256_of


class CorruptFileError(ValueError):
    """A file is empty, truncated, damaged, or differs from the checksum it was written with."""

    def __init__(self, path: os.PathLike | str, problem: str) -> None:
        super().__init__(f"{str(path)!r} {problem}")
        self.path = Path(path)


class UnsafeFileError(ValueError):
    """A file would run code when loaded (a pickle of arbitrary objects): it is refused, nothing of it is run."""

    def __init__(self, path: os.PathLike | str, problem: str) -> None:
        super().__init__(
            f"{str(path)!r} is unsafe to load: {problem}. Nothing in it was run; lightning-quant loads files that "
            "hold data only (tensors and plain values). Load only files you trust with other tools"
        )
        self.path = Path(path)


def read_checked(path: os.PathLike | str, what: str, zip_format: bool = False) -> bytes:
    """The bytes of ``path``, checked: not empty, equal to its manifest's SHA-256 when it belongs to a set, and
    with every zip member's CRC-32 intact when ``zip_format``.

    Raises:
        FileNotFoundError: no such file (or a name the current set no longer has).
        CorruptFileError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{str(path)!r}: the current export set has no such file (the last export left it out)")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such file")
    data = path.read_bytes()
    if not data:
        raise CorruptFileError(path, f"is empty (0 bytes): no {what} was written into it")
    try:
        entry = set_entry(path)
    except ValueError as err:  # the manifest itself is damaged
        raise CorruptFileError(path, f"cannot be checked: {err}") from None
    if entry is not None:
        manifest, recorded = entry
        if len(data) != recorded.get("bytes", len(data)) or sha256_of(data) != recorded.get("sha256"):
            raise CorruptFileError(
                path,
                f"differs from what was written ({len(data)} bytes, SHA-256 {sha256_of(data)[:16]}...; the manifest "
                f"{str(manifest)!r} records {recorded.get('bytes')} bytes, {str(recorded.get('sha256'))[:16]}...): it "
                "was changed or damaged after it was written; export it again",
            )
    if zip_format:
        check_zip(data, path, what)
    return data


#: the metadata key of a safetensors file that holds the SHA-256 of its tensors
SAFETENSORS_SHA_KEY = "lightning_quant.sha256"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors``, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_safetensors(data: bytes, path: os.PathLike | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file in memory, its tensors checked against the SHA-256 its
    metadata records (files of other tools, without one, are read as they are).

    Raises:
        CorruptFileError: not a safetensors file (truncated, another kind), or tensors that differ from the SHA-256.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        (length,) = struct.unpack("<Q", data[:8])
        metadata = dict(json.loads(data[8 : 8 + length]).get("__metadata__") or {})
        tensors = load(data)
    except (struct.error, ValueError, SafetensorError, UnicodeDecodeError, AttributeError) as err:
        raise CorruptFileError(
            path, f"is not a complete safetensors file ({len(data)} bytes; {err}): it is truncated or another kind"
        ) from None
    recorded = metadata.get(SAFETENSORS_SHA_KEY)
    if recorded is not None and tensors_sha256(tensors) != recorded:
        raise CorruptFileError(path, "is damaged: its tensors differ from the SHA-256 recorded when it was written")
    return tensors, metadata


def check_zip(data: bytes, path: os.PathLike | str, what: str) -> None:
    """Every member of a zip archive in memory reads back with its CRC-32.

    Raises:
        CorruptFileError: not a zip archive (truncated, or another kind of file), or a member fails its CRC-32.
    """
    end = data.rfind(b"PK\x05\x06")  # the end record; a nested archive's must not pass for the file's own
    if end < 0 or end + 22 + int.from_bytes(data[end + 20 : end + 22], "little") != len(data):
        raise CorruptFileError(
            path,
            f"is not a complete {what} ({len(data)} bytes; no zip end record at its end): it is truncated or "
            "another kind of file",
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as err:
        raise CorruptFileError(
            path, f"is not a complete {what} ({len(data)} bytes; {err}): it is truncated or another kind of file"
        ) from None
    if bad is not None:
        raise CorruptFileError(path, f"is damaged: its part {bad!r} fails its CRC-32 check")


def load_weights_only(data: bytes, path: os.PathLike | str, what: str) -> Any:
    """``torch.load`` of ``data`` with the weights-only unpickler, errors told as the file's.

    Raises:
        UnsafeFileError: the file holds pickled objects other than tensors and plain values.
        CorruptFileError: torch cannot read it.
    """
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(
            path, f"the {what} holds pickled objects that are not plain data ({_unpickling_reason(err)})"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError) as err:
        raise CorruptFileError(
            path, f"cannot be read as a {what}: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        ) from None


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's weights-only error that names what the pickle asked for (not its advice to
    unpickle fully)."""
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
    return (named or lines[-1:] or ["not plain data"])[0][:240]


#: members of a ``.pt2`` archive that are text torch writes about the archive itself
_PT2_TEXT = ("archive_format", "archive_version", "version", "byteorder", "serialization_id")


def check_pt2_archive(data: bytes, path: os.PathLike | str) -> None:
    """Refuse a ``.pt2`` archive (``torch.export.save``) with any part that would run code when torch loads it.

    torch's reader unpickles some parts with the full unpickler (sample inputs when the weights-only one
    fails, weights and constants marked ``use_pickle``, opaque objects) and loads compiled code. Here every
    part must be JSON or text, a raw tensor its weights or constants config declares, or a ``torch.save``
    archive the weights-only unpickler reads; anything else is refused before torch sees the file.

    Raises:
        UnsafeFileError: naming the part.
        CorruptFileError: a config that is not JSON.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        raw: set[str] = set()
        for name in names:
            if name.endswith("_config.json") and "/data/" in name:
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except ValueError as err:
                    raise CorruptFileError(path, f"has a damaged part {name!r}: {err}") from None
                folder = name.rsplit("/", 1)[0]
                for entry in config.values():
                    if isinstance(entry, dict) and entry.get("use_pickle") is False and "path_name" in entry:
                        raw.add(f"{folder}/{entry['path_name']}")
        for name in names:
            if name.endswith("/") or name in raw:
                continue
            base = name.rsplit("/", 1)[-1]
            part = archive.read(name)
            if base in _PT2_TEXT and len(part) < 4096 and not part.startswith((b"\x80", b"PK")):
                continue
            if name.endswith(".json"):
                try:
                    json.loads(part)
                except ValueError:
                    raise UnsafeFileError(path, f"its part {name!r} is named as JSON but is not JSON") from None
                continue
            if part.startswith(b"PK\x03\x04"):
                load_weights_only(part, path, f".pt2 part {name!r}")
                continue
            raise UnsafeFileError(
                path,
                f"its part {name!r} is neither JSON, a declared raw tensor nor a weights-only torch.save archive "
                "(a pickle of Python objects, or compiled code, which torch's reader would run)",
            )
