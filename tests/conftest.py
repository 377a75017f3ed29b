"""Shared test settings: seeds, hypothesis profiles, the CUDA mark, bench script imports.
Tolerances: tests/tolerances.py."""
import importlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# CI (2 cores, whole suite < 10 min): few, reproducible examples. Locally: more, still bounded.
settings.register_profile(
    "ci", max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Test tensors are tiny: a second thread only adds synchronisation (measured: test_llama.py 5 s with
# one thread, 31 s with two on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def load_bench(monkeypatch):
    """Import a bench script as `python bench/<name>.py` sees its siblings: with bench/ on sys.path."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
