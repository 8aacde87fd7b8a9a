"""pytest-benchmark set-up: the gpu marker (GPU-sized sets skip with a reason without CUDA)."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: GPU-sized benchmark, needs CUDA")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU-sized benchmark: no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
