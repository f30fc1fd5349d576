"""Shared by tests/ and benchmarks/: GPU tests and benchmarks are marked `gpu` and skipped, with a
reason, at run time when no GPU is present; emulated-kernel tests are marked `emulator` and
skipped likewise where the kernel emulator is not built (scripts/emulate.sh builds it and runs
`-m emulator`). Collection never touches CUDA."""
import pytest
import torch


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    if item.get_closest_marker("emulator") is not None:
        from fastbert.ops import _emulator
        if not _emulator.available():
            pytest.skip(f"the kernel emulator is not built ({_emulator.library_path()} is missing): "
                        "run `bash scripts/emulate.sh`")
