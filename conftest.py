"""Shared by tests/ and benchmarks/: GPU tests and benchmarks are marked `gpu` and skipped, with a
reason, at run time when no GPU is present. Collection never touches CUDA."""
import pytest
import torch


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
