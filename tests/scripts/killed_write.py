"""Write a set of files and be killed (SIGKILL, as the OOM killer or a scheduler does) at a chosen point.

Run as ``python tests/scripts/killed_write.py DIR MODE POINT N``:

- MODE ``files``: write the set ``{model.pt, model.ptl}`` (new contents) with ``write_file_set``;
- MODE ``folder``: write the set ``{model.pt, model_hf/config.json, model_hf/model.safetensors}`` (a folder
  target's files beside a file's);
- MODE ``export``: export a small int8 model to torchscript + mobile with ``export_int8``;
- POINT: ``start``, ``written``, ``linked``, ``switched`` (stages of ``write_file_set``), ``mid-file`` (inside
  a file's bytes), ``serialising`` (export: after the first target is serialised), or ``none``; N: the
  occurrence of POINT to die at (1 = the first).
"""

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

#: large enough that writing takes a while (a kill at a random moment lands inside it), small enough to be quick
NEW = {"model.pt": b"new pt " * 1_200_000, "model.ptl": b"new ptl " * 1_200_000}
NEW_FOLDER = {
    "model.pt": b"new pt " * 1_200_000,
    "model_hf/config.json": b'{"new": true}',
    "model_hf/model.safetensors": b"new weights " * 1_200_000,
}


def _files_module():
    """``lightning_quant.utils.files`` without importing the package (torch, Lightning): the child starts fast."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("files", ROOT / "lightning_quant" / "utils" / "files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(directory: str, mode: str, point: str, n: int) -> None:
    if mode in ("files", "folder"):
        files = _files_module()
    else:
        from lightning_quant.utils import files
    seen = {"count": 0}

    def count() -> None:
        seen["count"] += 1
        if seen["count"] == n:
            die()

    if point in ("start", "written", "linked", "switched"):
        files._stage = lambda stage: count() if stage == point else None
    elif point == "mid-file":
        write = files._write

        def half_then_die(fd, data):
            written = write(fd, data[: max(1, len(data) // 2)])
            count()
            return written

        files._write = half_then_die
    if mode == "files":
        files.write_file_set(directory, "model", NEW, family=["model.onnx"])  # as export_int8 names its targets
        return
    if mode == "folder":
        files.write_file_set(directory, "model", NEW_FOLDER, family=["model.onnx"])
        return
    import torch

    from lightning_quant import export
    from lightning_quant.quantization import QuantizationConfig, convert_copy, get_flow
    from lightning_quant.quantization.config import Backend, ExportTarget
    from lightning_quant.quantization.inputs import ExampleInputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    example = ExampleInputs((torch.randn(8, 16),))
    config = QuantizationConfig(flow="fx", export=None)
    prepared = get_flow(config.flow).prepare(model, config, example, qat=False)
    example(prepared)
    if point == "serialising":
        serialise = export._SERIALIZERS[ExportTarget.TORCHSCRIPT]

        def then_die(*args):
            out = serialise(*args)
            count()
            return out

        export._SERIALIZERS[ExportTarget.TORCHSCRIPT] = then_die
    export.export_int8(
        lambda engine: convert_copy(prepared, config.flow, engine),
        [ExportTarget.TORCHSCRIPT, ExportTarget.MOBILE],
        directory,
        example,
        Backend.X86,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
