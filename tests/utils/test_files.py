import errno
import os
import stat

import pytest

from lightning_quant.utils import files
from lightning_quant.utils.files import atomic_write, atomic_write_files, check_writable_folder


def _disk_fills_after(monkeypatch, budget: int) -> None:
    """Every write beyond ``budget`` bytes in total fails as a full disk does."""
    left = [budget]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(data), left[0], 7)
        left[0] -= n
        return os.write(fd, bytes(data[:n]))

    monkeypatch.setattr(files, "_write", write)


def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model_int8.pt"
    target.write_bytes(b"good model")
    _disk_fills_after(monkeypatch, 20)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(target, b"x" * 100)
    assert target.read_bytes() == b"good model"
    assert sorted(os.listdir(tmp_path)) == ["model_int8.pt"]


def test_a_set_of_files_is_all_or_nothing(tmp_path, monkeypatch):
    old = {tmp_path / "a.pt": b"old a", tmp_path / "b.ptl": b"old b"}
    for path, data in old.items():
        path.write_bytes(data)
    _disk_fills_after(monkeypatch, 150)  # the first new file fits, the second does not
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write_files({tmp_path / "a.pt": b"1" * 100, tmp_path / "b.ptl": b"2" * 100})
    assert {p: p.read_bytes() for p in old} == old  # the first was not renamed over the old one either
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.ptl"]


def test_atomic_write_replaces_files_with_the_umask_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        written = atomic_write_files({tmp_path / "sub" / "model.bin": b"new", tmp_path / "report.md": "# text"})
    finally:
        os.umask(previous)
    assert [p.read_bytes() for p in written] == [b"new", b"# text"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}
    assert sorted(os.listdir(tmp_path / "sub")) == ["model.bin"]


def test_a_folder_that_is_a_file_is_refused(tmp_path):
    blocker = tmp_path / "quantized"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"export_dir='.*quantized' is a file, not a folder: choose a folder"):
        check_writable_folder(blocker, "export_dir")
    with pytest.raises(ValueError, match=r"export_dir='.*quantized/deeper' lies under the file '.*quantized'"):
        check_writable_folder(blocker / "deeper", "export_dir")
    assert check_writable_folder(tmp_path / "new" / "folder", "export_dir") == tmp_path / "new" / "folder"
