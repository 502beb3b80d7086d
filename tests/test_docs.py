"""The docs and the README: every Python block runs as written, every link resolves, the version is one.

Each page's Python blocks run top to bottom in one namespace, as a reader runs them. The README and the
quickstarts are self-contained and run exactly as written (with their own Trainers). The guides take as
given a few names a reader has (``model``, ``dm``, a calibration loader, a Hugging Face model...): small
stand-ins built here; their ``Trainer`` is Lightning's, quiet and limited to two batches an epoch. A block
that cannot run here starts with ``# not run here: <reason>`` (a GPU, a cluster), and the reason is checked.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from tests.helpers import BoringClassifier, quiet_trainer, random_images

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
NOT_RUN = "# not run here:"
PAGES = sorted(
    path.relative_to(ROOT).as_posix()
    for path in [README, *DOCS.rglob("*.md")]
    if not {"_build", "_generated"} & set(path.relative_to(ROOT).parts)
)
# pages whose blocks build everything they use and run with the Trainer they write
SELF_CONTAINED = {"README.md", *(p for p in PAGES if p.startswith("docs/quickstart/"))}
# what each page needs installed beyond the core
NEEDS = {
    "docs/quickstart/huggingface.md": ("torchao", "transformers"),
    "docs/quickstart/causal_lm.md": ("torchao", "transformers"),
    "docs/quickstart/executorch.md": ("torchao", "executorch"),
    "docs/howto/pt2e.md": ("torchao",),
    "docs/howto/torchao.md": ("torchao",),
    "docs/howto/ptq.md": ("transformers",),
    "docs/howto/recipes.md": ("torchao",),
    "docs/howto/saving.md": ("torchao",),
}


def python_blocks(page: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each fenced Python block of ``page``."""
    text = (ROOT / page).read_text()
    return [
        (text[: match.start()].count("\n") + 2, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    ]


class MyNet(nn.Module):
    """Conv/BN/ReLU and a Linear head of 32 inputs (torchao's int4 groups of 32 divide it)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class DataModule(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(random_images(64), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(random_images(32, seed=1), batch_size=16)


def _hugging_face() -> dict:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    classifier = transformers.BertForSequenceClassification(config).eval()
    tokens = torch.randint(0, 100, (4, 12))
    batches = [{"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}]
    return {
        "hf_model": transformers.BertModel(config).eval(),
        "bert": classifier,
        "minilm": classifier,
        "batches": batches,
    }


def _stand_ins(tmp_path: Path) -> dict:
    """The names the guides take as given: a trained float model, its DataModule, loaders, a checkpoint."""
    quiet = functools.partial(quiet_trainer, limit_train_batches=2, limit_val_batches=2, default_root_dir=tmp_path)
    torch.manual_seed(0)
    model = BoringClassifier(MyNet())
    quiet(max_epochs=1).fit(model)
    checkpoint_trainer = quiet(max_epochs=1)
    checkpoint_trainer.fit(BoringClassifier(MyNet()))
    checkpoint_trainer.save_checkpoint(tmp_path / "best.ckpt")
    loader = DataLoader(random_images(64), batch_size=16)
    from lightning_quant import PostTrainingQuantization

    callback = PostTrainingQuantization(calibration_batches=2, export=None)
    quiet(max_epochs=1, callbacks=[callback]).fit(BoringClassifier(MyNet()))
    namespace = {
        "torch": torch,
        "model": model,
        "dm": DataModule(),
        "MyNet": MyNet,
        "MyModel": lambda: BoringClassifier(MyNet()),
        "calibration_loader": loader,
        "calib_loader": loader,
        "loader": loader,
        "callback": callback,
        "Trainer": quiet,
    }
    try:
        namespace.update(_hugging_face())
    except pytest.skip.Exception:
        pass
    return namespace


@pytest.mark.parametrize("page", [page for page in PAGES if python_blocks(page)])
def test_the_pages_python_blocks_run_as_written(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    for module in NEEDS.get(page, ()):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)  # the pages write model_int8.pt, checkpoints and such where they run
    namespace: dict = {"__name__": "__main__"}
    if page not in SELF_CONTAINED:
        namespace.update(_stand_ins(tmp_path))
        model = namespace["model"]
    ran = 0
    for line, code in blocks:
        if code.startswith(NOT_RUN):
            reason = code.splitlines()[0].removeprefix(NOT_RUN).strip()
            assert len(reason) > 10, f"{page}:{line}: a block that is not run says why"
            continue
        if page not in SELF_CONTAINED:
            code = code.replace("from lightning.pytorch import Trainer\n", "")
            namespace["model"] = copy.deepcopy(model)  # each example starts from the trained float model
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except Exception as error:  # the page, the block and its line, to find it
            raise AssertionError(f"{page}: the block at line {line} fails: {error!r}\n{code}") from error
        ran += 1
    assert ran >= 1
    check = PROMISES.get(page)
    if check is not None:
        check(namespace)


def _qat_cnn(namespace: dict) -> None:
    assert namespace["int8_accuracy"] > 0.85  # digits: a few epochs of QAT are well above chance (0.1)
    assert Path(namespace["qat"].export_paths["torchscript"]).is_file()


def _readme(namespace: dict) -> None:
    qat = namespace["qat"]
    assert qat.quantized_model is not None and Path(qat.export_paths["torchscript"]).is_file()


def _huggingface(namespace: dict) -> None:
    inputs = namespace["inputs"]
    with torch.no_grad():
        served = namespace["served"](**inputs).logits
        int8 = namespace["qat"].quantized_model(**inputs).logits
    torch.testing.assert_close(served, int8, rtol=0, atol=0)  # the folder reloads into the same tensors


def _causal_lm(namespace: dict) -> None:
    prompt = namespace["prompt"]
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(namespace["int8"].generate(prompt, **kwargs), namespace["served"].generate(prompt, **kwargs))


def _executorch(namespace: dict) -> None:
    x = namespace["x"]
    program_out = namespace["forward"].execute([x])[0]
    int8 = namespace["ptq"].quantized_model(x)
    assert torch.allclose(program_out, int8, atol=0.1 * float(int8.abs().max()) + 1e-3)


PROMISES = {
    "README.md": _readme,
    "docs/quickstart/qat_cnn.md": _qat_cnn,
    "docs/quickstart/huggingface.md": _huggingface,
    "docs/quickstart/causal_lm.md": _causal_lm,
    "docs/quickstart/executorch.md": _executorch,
}


def _generate_module():
    """``docs/_generate.py``, which writes the generated pages (it lives beside the docs, not in the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "_generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


GENERATE = _generate_module()
GENERATED = {"errors", *(f"bench_{name}" for name in GENERATE.BENCHMARKS)}


def _links(page: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", (ROOT / page).read_text(), flags=re.DOTALL | re.MULTILINE)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _anchors(path: Path) -> set[str]:
    """The anchors MyST gives a page's headings (``myst_heading_anchors``: GitHub's slugs)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    slugs = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        slugs.add(slug)
    return slugs


@pytest.mark.parametrize("page", PAGES)
def test_every_link_of_the_page_resolves(page):
    for link in _links(page):
        if link.startswith(("http://", "https://")):
            continue  # offline here; the pages link torch's and Lightning's sites by URL only
        target, _, anchor = link.partition("#")
        path = (ROOT / page).parent / target if target else ROOT / page
        if "_generated" in path.parts:  # written at the start of each docs build: one of the pages it writes
            assert path.stem in GENERATED, f"{page}: {link!r} is no page the docs build generates"
            continue
        assert path.exists(), f"{page}: the link {link!r} points to nothing"
        if anchor and path.suffix == ".md" and "_generated" not in path.parts:
            assert anchor in _anchors(path), f"{page}: {link!r} names no heading of {target or page}"


def test_the_readme_is_short_and_the_front_page_leads_to_hugging_face_in_one_click():
    assert len(README.read_text().splitlines()) < 175  # the rest of each subject is its page of the docs
    front = (DOCS / "index.md").read_text()
    assert "(quickstart/huggingface.md)" in front and "Quantize a Hugging Face model" in front


def test_the_readmes_speed_tables_are_the_benchmarks_own_output_each_with_its_machine():
    """Each README table is copied from `make bench`'s file for one kind of CPU: every row is found in that file,
    and the paragraph above the table names that file's machine (its CPU's maker and its flags)."""
    readme = README.read_text()
    section = readme[readme.index("## Speed") :].split("\n## ")[0]
    tables = [t for t in re.split(r"\n(?=\| path )", section)[1:]]
    intros = re.split(r"\n\| path [^\n]*\n", section)[:-1]
    assert len(tables) == 2 == len(intros)
    # kind of CPU: its maker, the flag that makes it that kind, how the README names it
    machines = {"amx": ("Intel", "amx_int8", "with AMX"), "avx512_vnni": ("AMD EPYC", "avx512_vnni", "and no AMX")}
    for (kind, (maker, flag, named)), table, intro in zip(machines.items(), tables, intros, strict=True):
        results = (ROOT / "benchmarks" / "results" / f"runtimes_{kind}.md").read_text()
        rows = [line for line in table.splitlines() if line.startswith("| ")]
        assert len(rows) > 10 and all(row in results for row in rows), kind
        machine = results.splitlines()[3]  # the line under the command: the CPU, its flags, cores, threads, torch
        line = intro.splitlines()[-1]
        assert machine.startswith(maker) and flag in machine and maker in line and named in line, (kind, line)
        assert machine.rsplit("torch ", 1)[1] in line and "2 threads" in machine and "2 threads" in line


def test_the_readmes_language_model_table_is_the_benchmarks_own_output_with_its_machine():
    readme = README.read_text()
    section = readme[readme.index("## Language models") :].split("\n## ")[0]
    results = (ROOT / "benchmarks" / "results" / "llm.md").read_text()
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(rows) > 10 and all(row in results for row in rows)
    machine = next(line for line in results.splitlines() if line.startswith("machine: ")).removeprefix("machine: ")
    intro = section.split("\n| ")[0]
    assert machine.startswith("AMD EPYC (avx2)") and "AMD EPYC with AVX2 only" in intro
    assert machine.rsplit("torch ", 1)[1] in intro and "2 threads" in machine and "2 threads" in intro


def test_the_version_has_one_source_and_the_changelog_names_it():
    import lightning_quant

    version = importlib.metadata.version("lightning-quant")
    assert lightning_quant.__version__ == version
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{version}"' in pyproject
    assert not re.search(r"__version__\s*=\s*['\"]\d+\.\d+", (ROOT / "lightning_quant" / "__init__.py").read_text())
    first = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert first is not None and first.group(1) == version


def test_every_error_message_is_indexed_and_every_error_type_explained():
    raised = GENERATE.raised_messages()
    assert len(raised) > 200
    page = GENERATE.errors_page(raised)
    # a message built with an f-string, found with its literal parts
    assert "is not a Lightning checkpoint (it has no 'state_dict')" in page
    troubleshooting = (DOCS / "troubleshooting.md").read_text()
    import lightning_quant

    errors = [name for name in lightning_quant.__all__ if name.endswith("Error")]
    errors += ["QuantizationRehearsalError", "ExportFailedError", "ExportCheckError"]
    assert all(f"**`{name}`" in troubleshooting for name in errors), errors
