import errno
import json
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


# ---------------------------------------------------------------------- sets that survive a killed process
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from lightning_quant.utils.files import write_file_set  # noqa: E402
from lightning_quant.utils.integrity import CorruptFileError, read_checked  # noqa: E402
from tests.helpers import files_under, visible_files  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "killed_write.py"
OLD = {"model.pt": b"old pt " * 1000, "model.onnx": b"old onnx " * 1000}


def _names_read(folder: Path, names) -> dict[str, bytes | None]:
    return {n: (folder / n).read_bytes() if (folder / n).exists() else None for n in names}


def _old_and_new(folder: Path) -> tuple[dict, dict]:
    from tests.scripts.killed_write import NEW

    names = sorted({*OLD, *NEW})
    old = {n: OLD.get(n) for n in names}
    new = {n: NEW.get(n) for n in names}
    return old, new


def _kill_child(folder: Path, mode: str, point: str, n: int) -> int:
    done = subprocess.run([sys.executable, str(SCRIPT), str(folder), mode, point, str(n)], capture_output=True)
    return done.returncode


def _assert_one_whole_set(folder: Path) -> str:
    """Every name reads the old set or every name reads the new one; returns which."""
    old, new = _old_and_new(folder)
    seen = _names_read(folder, old)
    assert seen in (old, new), {n: (v[:8] if v else v) for n, v in seen.items()}
    manifest = json.loads((folder / "model.manifest.json").read_bytes())
    which = "old" if seen == old else "new"
    assert sorted(manifest["files"]) == sorted(n for n, v in (old if which == "old" else new).items() if v)
    for name in manifest["files"]:
        read_checked(folder / name, "file")  # size and SHA-256 agree with the manifest
    return which


@pytest.mark.parametrize(
    ("point", "n", "expected"),
    [
        ("start", 1, "old"),
        ("mid-file", 1, "old"),
        ("mid-file", 3, "old"),
        ("written", 1, "old"),
        ("written", 2, "old"),
        ("linked", 1, "old"),
        ("switched", 1, "new"),
    ],
)
def test_a_process_killed_while_writing_a_set_leaves_the_old_set_or_the_new_one(tmp_path, point, n, expected):
    write_file_set(tmp_path, "model", OLD)
    assert _kill_child(tmp_path, "files", point, n) == -signal.SIGKILL
    assert _assert_one_whole_set(tmp_path) == expected
    # the next write removes what the killed one left (a set never switched to, temporary links)
    assert _kill_child(tmp_path, "files", "none", 0) == 0
    assert _assert_one_whole_set(tmp_path) == "new"
    assert len(list((tmp_path / ".model.sets").iterdir())) == 1
    assert not [f for f in files_under(tmp_path) if f.endswith((".link", ".tmp"))]
    assert visible_files(tmp_path) == ["model.manifest.json", "model.pt", "model.ptl"]


def test_kills_at_random_moments_never_leave_a_mix(tmp_path):
    write_file_set(tmp_path, "model", OLD)
    rng = random.Random(0)
    outcomes = set()
    for _ in range(12):
        write_file_set(tmp_path, "model", OLD)
        child = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), "files", "none", "0"])
        time.sleep(rng.uniform(0.0, 0.25))  # the interpreter's start, the writes, the switch
        child.send_signal(signal.SIGKILL)
        child.wait()
        outcomes.add(_assert_one_whole_set(tmp_path))
    assert outcomes  # each round asserted one whole set; which one depended on the moment


def test_files_of_an_older_release_are_taken_into_a_set_before_they_are_replaced(tmp_path):
    for name, data in OLD.items():
        (tmp_path / name).write_bytes(data)  # plain files, as the previous release wrote them
    assert _kill_child(tmp_path, "files", "linked", 1) == -signal.SIGKILL
    old, _ = _old_and_new(tmp_path)
    assert _names_read(tmp_path, old) == old
    assert _kill_child(tmp_path, "files", "none", 0) == 0
    assert _assert_one_whole_set(tmp_path) == "new"


OLD_FOLDER = {"model.pt": b"old pt " * 1000, "model_hf/config.json": b'{"old": true}', "model_hf/vocab.txt": b"a b"}


@pytest.mark.parametrize(
    ("point", "n", "expected"), [("mid-file", 3, "old"), ("linked", 1, "old"), ("switched", 1, "new")]
)
def test_a_folder_of_a_set_switches_with_the_rest_when_the_process_is_killed(tmp_path, point, n, expected):
    """A folder target (export='hf') is files of the set under one folder name: every file of it reads the old set
    or every one the new, never a mix, and the old set's file the new one lacks is gone with it."""
    from tests.scripts.killed_write import NEW_FOLDER

    write_file_set(tmp_path, "model", OLD_FOLDER)
    assert (tmp_path / "model_hf").is_symlink() and (tmp_path / "model_hf" / "vocab.txt").read_bytes() == b"a b"
    assert _kill_child(tmp_path, "folder", point, n) == -signal.SIGKILL
    names = sorted({*OLD_FOLDER, *NEW_FOLDER})
    seen = _names_read(tmp_path, names)
    sets = {"old": {n: OLD_FOLDER.get(n) for n in names}, "new": {n: NEW_FOLDER.get(n) for n in names}}
    assert seen == sets[expected], {n: (v[:8] if v else v) for n, v in seen.items()}
    manifest = json.loads((tmp_path / "model.manifest.json").read_bytes())
    assert sorted(manifest["files"]) == sorted(n for n, v in sets[expected].items() if v)
    for name in manifest["files"]:
        read_checked(tmp_path / name, "file")  # through the folder's link, against the manifest
    assert _kill_child(tmp_path, "folder", "none", 0) == 0
    assert _names_read(tmp_path, names) == sets["new"]
    assert len(list((tmp_path / ".model.sets").iterdir())) == 1


def test_a_changed_byte_in_a_folder_of_a_set_is_found(tmp_path):
    write_file_set(tmp_path, "model", OLD_FOLDER)
    target = (tmp_path / "model_hf" / "config.json").resolve()
    target.write_bytes(b'{"odd": true}')
    with pytest.raises(CorruptFileError, match="SHA-256|size"):
        read_checked(tmp_path / "model_hf" / "config.json", "file")


def test_an_export_killed_at_each_stage_keeps_one_whole_set(tmp_path):
    from lightning_quant.export import verify_export

    assert _kill_child(tmp_path, "export", "none", 0) == 0
    for point, expected in (("serialising", "old"), ("written", "old"), ("switched", "new")):
        before = os.readlink(tmp_path / ".model_int8.current")
        assert _kill_child(tmp_path, "export", point, 1) == -signal.SIGKILL
        after = os.readlink(tmp_path / ".model_int8.current")
        assert (after == before) == (expected == "old"), point  # the set switched only once it was whole
        manifest = verify_export(tmp_path)  # every file of the current set agrees with its manifest
        assert sorted(manifest["files"]) == ["model_int8.pt", "model_int8.ptl"]
        assert visible_files(tmp_path) == ["model_int8.manifest.json", "model_int8.pt", "model_int8.ptl"]
        for name in manifest["files"]:
            assert (tmp_path / name).resolve().parent == (tmp_path / after).resolve()


def test_a_changed_byte_is_found_against_the_manifest(tmp_path):
    written = write_file_set(tmp_path, "model", {"model.pt": b"weights" * 100})
    real = written["model.pt"].resolve()
    data = bytearray(real.read_bytes())
    data[10] ^= 1
    real.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"model.pt' differs from what was written .* the manifest"):
        read_checked(written["model.pt"], "file")


def test_a_damaged_manifest_is_named_when_a_file_of_its_set_is_read(tmp_path):
    written = write_file_set(tmp_path, "model", {"model.pt": b"weights" * 100})
    (tmp_path / "model.manifest.json").resolve().write_text("{not json")
    with pytest.raises(
        CorruptFileError, match=r"model.pt' cannot be checked: the manifest '.*manifest.json' of .* is damaged"
    ):
        read_checked(written["model.pt"], "file")
