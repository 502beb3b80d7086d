"""The docs' generated pages, written into ``docs/_generated/`` (not kept in git) at the start of each build.

- ``bench_<name>.md``: a benchmark's table as the benchmark wrote it (``benchmarks/results/<name>.md``, from
  its ``make bench-*`` target), or, when no run has written one, a line that says so and names the target;
- ``errors.md``: every message the library raises, read from its source with :mod:`ast`, by module, so
  the index cannot fall behind the code.

``python docs/_generate.py`` writes them without building the site.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGE = ROOT / "lightning_quant"

# (result file, the make target that writes it)
BENCHMARKS = {
    "runtimes_amx": "make bench (on a CPU with AMX)",
    "runtimes_avx512_vnni": "make bench (on a CPU with AVX-512 VNNI and no AMX)",
    "latency": "make bench-backends",
    "fit_cost": "make bench-fit",
    "pt2e": "make bench-pt2e",
    "torchao": "make bench-torchao",
    "llm": "make bench-llm",
    "llm_g32": 'make bench-llm ARGS="ptq.group_size=32" PUBLISH=benchmarks/results/llm_g32.md',
    "user_patterns": "make bench-patterns",
    "distillation": "make bench-distillation",
    "zoo": "make zoo",
}


@dataclass(frozen=True)
class Raised:
    """One ``raise SomeError("message")`` in the library."""

    error: str
    message: str
    module: str
    line: int


def _literal(node: ast.expr) -> str | None:
    """The message a string expression builds, with ``…`` where a value is filled in; None if not a string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            else:
                parts.append("…")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left), _literal(node.right)
        if left is None and right is None:
            return None
        return (left or "…") + (right or "…")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _literal(node.func.value)
    return None


def raised_messages(package: Path = PACKAGE) -> list[Raised]:
    """Every ``raise Name(<string>, ...)`` under ``package``, in file and line order."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call) or not node.exc.args:
                continue
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name is None or not name.endswith(("Error", "Exception")):
                continue
            # CorruptFileError(path, problem) and UnsafeFileError(path, problem): the message is the problem
            message = next((m for m in map(_literal, node.exc.args[:2]) if m), None)
            if message:
                found.append(Raised(name, " ".join(message.split()), module.removesuffix(".__init__"), node.lineno))
    return sorted(found, key=lambda r: (r.module, r.line))


def errors_page(raised: list[Raised]) -> str:
    lines = [
        "# Every error message",
        "",
        f"The {len(raised)} messages the library raises, read from its source at this build (`…` marks a value the "
        "message fills in: a name, a number, the allowed values). Search this page for the start of the message "
        "you got; [Troubleshooting](../troubleshooting.md) explains the error types and their fixes.",
        "",
    ]
    module = None
    for entry in raised:
        if entry.module != module:
            module = entry.module
            lines += ["", f"## `{module}`", ""]
        message = entry.message.replace("`", "'")  # inside a code span, so that no character is read as markup
        lines.append(f"- **{entry.error}** (line {entry.line}): `{message}`")
    return "\n".join(lines) + "\n"


def benchmark_page(name: str, command: str) -> str:
    path = RESULTS / f"{name}.md"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return (
        f"No run of this release has written `benchmarks/results/{name}.md` yet: `{command}` measures it on your "
        "machine and writes it.\n"
    )


def generate_all(docs: Path = ROOT / "docs") -> Path:
    """Write the generated pages under ``docs/_generated`` (only files whose text changed are rewritten)."""
    out = docs / "_generated"
    out.mkdir(exist_ok=True)
    pages = {f"bench_{name}.md": benchmark_page(name, command) for name, command in BENCHMARKS.items()}
    pages["errors.md"] = errors_page(raised_messages())
    for filename, text in pages.items():
        target = out / filename
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
    return out


if __name__ == "__main__":
    print(generate_all(), file=sys.stderr)
