import os
from pathlib import Path

import pytest

from lightning_quant.utils.files import atomic_write


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model_int8.pt"
    target.write_bytes(b"good model")

    def broken_writer(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken_writer)
    assert target.read_bytes() == b"good model"
    assert sorted(os.listdir(tmp_path)) == ["model_int8.pt"]


def test_atomic_write_replaces_the_file_in_one_step(tmp_path):
    target = tmp_path / "sub" / "model.bin"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(target.parent)) == ["model.bin"]
