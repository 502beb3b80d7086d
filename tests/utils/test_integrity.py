"""Files that would run code are refused; damaged ones are named (the readers every loader of ours uses)."""

from __future__ import annotations

import io
import os
import zipfile

import pytest
import torch

from lightning_quant.utils.integrity import (
    CorruptFileError,
    UnsafeFileError,
    check_pt2_archive,
    check_safetensors,
    load_weights_only,
    read_checked,
)


class Bomb:
    """A pickle that creates a marker file when unpickled by the full unpickler."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bomb_bytes(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": Bomb(marker)}, buffer)
    return buffer.getvalue()


def rewrite_zip(data: bytes, change) -> bytes:
    """The zip archive ``data`` with each member's bytes passed through ``change(name, bytes)`` (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            part = change(name, src.read(name))
            if part is not None:
                dst.writestr(name, part)
    return out.getvalue()


def flip_inside(data: bytes, member_suffix: str) -> bytes:
    """``data`` (a zip) with one bit flipped inside the stored bytes of the member ending in ``member_suffix``."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    # a stored member's bytes follow its local header (30 bytes, the name, the extra field)
    local = data[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    damaged = bytearray(data)
    damaged[start + info.file_size // 2] ^= 0x01
    return bytes(damaged)


def test_a_pickle_bomb_is_refused_as_unsafe_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    with pytest.raises(
        UnsafeFileError,
        match=r"'bomb.pt' is unsafe to load: the checkpoint holds pickled objects .*"
        r"GLOBAL posix.system.*Nothing in it was run",
    ):
        load_weights_only(bomb_bytes(marker), "bomb.pt", "checkpoint")
    assert not marker.exists()


def test_a_flipped_byte_truncation_emptiness_and_garbage_are_named(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(64, 64)}, buffer)
    good = buffer.getvalue()
    cases = {
        "flipped.pt": (
            flip_inside(good, "/data/0"),
            r"'.*flipped.pt' is damaged: its part '.*data/0' fails its CRC-32",
        ),
        "truncated.pt": (good[: len(good) // 2], r"'.*truncated.pt' is not a complete checkpoint .* it is truncated"),
        "empty.pt": (b"", r"'.*empty.pt' is empty \(0 bytes\): no checkpoint was written"),
        "garbage.pt": (os.urandom(5000), r"'.*garbage.pt' is not a complete checkpoint"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorruptFileError, match=message):
            read_checked(tmp_path / name, "checkpoint", zip_format=True)
    (tmp_path / "good.pt").write_bytes(good)
    assert torch.equal(
        load_weights_only(read_checked(tmp_path / "good.pt", "checkpoint", True), "good.pt", "x")["w"],
        torch.load(io.BytesIO(good))["w"],
    )


def _small_pt2() -> bytes:
    program = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 3)).eval(), (torch.randn(2, 4),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def test_every_part_of_a_pt2_that_torch_would_unpickle_or_run_is_refused(tmp_path):
    import json

    marker = tmp_path / "MARKER"
    good = _small_pt2()
    check_pt2_archive(good, "good.pt2")  # torch's own file passes

    def sample_inputs(name, part):
        return bomb_bytes(marker) if name.endswith("sample_inputs/model.pt") else part

    def pickled_weight(name, part):
        if name.endswith("model_weights_config.json"):
            config = json.loads(part)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return bomb_bytes(marker) if name.endswith("weights/weight_0") else part

    def opaque_constant(name, part):
        return part

    vectors = {
        "sample_inputs": (rewrite_zip(good, sample_inputs), r"'archive/data/sample_inputs/model.pt' holds pickled"),
        "use_pickle": (rewrite_zip(good, pickled_weight), r"'archive/data/weights/weight_0' holds pickled"),
    }
    opaque = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(opaque, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        import pickle

        dst.writestr("archive/data/constants/opaque_obj_0", pickle.dumps(Bomb(marker)))
        dst.writestr("archive/data/aotinductor/model/model.so", b"\x7fELF" + b"\0" * 64)
    vectors["opaque"] = (
        opaque.getvalue(),
        r"its part 'archive/data/(constants/opaque_obj_0|aotinductor/model/model.so)'"
        r" is neither JSON",
    )
    for name, (data, message) in vectors.items():
        with pytest.raises(UnsafeFileError, match=message):
            check_pt2_archive(data, f"{name}.pt2")
        (tmp_path / f"{name}.pt2").write_bytes(data)
        from lightning_quant import load_pt2

        with pytest.raises(UnsafeFileError, match=r"is unsafe to load.*Nothing in it was run"):
            load_pt2(tmp_path / f"{name}.pt2")
    assert not marker.exists()


def test_load_pt2_names_a_damaged_or_truncated_program(tmp_path):
    from lightning_quant import load_pt2

    good = _small_pt2()
    (tmp_path / "flipped.pt2").write_bytes(flip_inside(good, "weights/weight_0"))
    with pytest.raises(
        CorruptFileError,
        match=r"flipped.pt2' is damaged: its part 'archive/data/weights/weight_0' "
        r"fails its CRC-32 check",
    ):
        load_pt2(tmp_path / "flipped.pt2")
    (tmp_path / "short.pt2").write_bytes(good[:-100])
    with pytest.raises(CorruptFileError, match=r"short.pt2' is not a complete .pt2 program"):
        load_pt2(tmp_path / "short.pt2")
    (tmp_path / "good.pt2").write_bytes(good)
    x = torch.randn(2, 4)  # the program was exported for a batch of 2
    assert load_pt2(tmp_path / "good.pt2")(x).shape == (2, 3)


def test_safetensors_with_a_changed_tensor_is_found_by_the_sha256_in_its_metadata():
    pytest.importorskip("safetensors")
    from safetensors.torch import save

    from lightning_quant.utils.integrity import SAFETENSORS_SHA_KEY, tensors_sha256

    tensors = {"w": torch.arange(64, dtype=torch.float32)}
    data = save(tensors, metadata={SAFETENSORS_SHA_KEY: tensors_sha256(tensors)})
    loaded, _ = check_safetensors(data, "w.safetensors")
    assert torch.equal(loaded["w"], tensors["w"])
    damaged = bytearray(data)
    damaged[-10] ^= 0x40
    with pytest.raises(CorruptFileError, match=r"w.safetensors' is damaged: its tensors differ from the SHA-256"):
        check_safetensors(bytes(damaged), "w.safetensors")
    with pytest.raises(CorruptFileError, match=r"w.safetensors' is not a complete safetensors file"):
        check_safetensors(data[: len(data) // 2], "w.safetensors")


def test_a_teacher_checkpoint_that_would_run_code_is_refused(tmp_path):
    from lightning_quant.distillation import load_teacher_weights

    marker = tmp_path / "MARKER"
    (tmp_path / "teacher.ckpt").write_bytes(bomb_bytes(marker))
    with pytest.raises(UnsafeFileError, match=r"teacher.ckpt' is unsafe to load: the teacher checkpoint holds"):
        load_teacher_weights(torch.nn.Linear(2, 2), tmp_path / "teacher.ckpt", "net")
    assert not marker.exists()
