import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the machine's cores (pytest-xdist): one thread each, and one for the processes
    # a test starts (DDP ranks, the app), so that the workers' OpenMP threads never outnumber the cores (under
    # oversubscription torch's OpenMP threads spin and a step runs ~10x slower)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _full_precision_on_gpu():
    """`make test-gpu`: no TF32, so GPU results are compared with CPU ones at float32 tolerances."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own ``tmp_path``: whatever a Trainer or Hydra writes by default lands there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _restore_quantized_engine():
    """Each test starts and ends on the same quantized engine and determinism mode."""
    import torch

    engine = torch.backends.quantized.engine
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.backends.quantized.engine = engine
    torch.use_deterministic_algorithms(deterministic)
