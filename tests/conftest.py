import pytest


@pytest.fixture(autouse=True)
def _restore_quantized_engine():
    """Each test starts and ends on the same quantized engine and determinism mode."""
    import torch

    engine = torch.backends.quantized.engine
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.backends.quantized.engine = engine
    torch.use_deterministic_algorithms(deterministic)
