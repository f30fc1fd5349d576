"""Shared by the emulated-kernel tests: skip markers, the thread orders to run, and a context that
runs fastbert's ops through the kernel emulator (fastbert/ops/_emulator.py) on CPU tensors.

The tests skip with a reason when the emulator library is not built (`bash scripts/emulate.sh`
builds it and runs them; so does `python -m fastbert.ops._emulator_build`). The orders come from
FASTBERT_EMULATE_ORDERS (comma-separated; default "forward,warp": every kernel test under two).
"""
import contextlib
import os

import pytest

from fastbert import _backend
from fastbert.ops import _emulator

ORDERS = [o.strip() for o in os.environ.get("FASTBERT_EMULATE_ORDERS", "forward,warp").split(",") if o.strip()]
assert all(o in _emulator.ORDERS for o in ORDERS), f"FASTBERT_EMULATE_ORDERS: unknown order in {ORDERS}"

# Emulated-kernel tests carry the `emulator` marker: scripts/emulate.sh selects them with
# `-m emulator`, and conftest.py skips them, with a reason, where the library is not built.
needs_emulator = pytest.mark.emulator
needs_ops = pytest.mark.skipif(not _backend.has_op("gather_rows"),
                               reason="fastbert._C is not built, so torch.ops.fastbert.* does not exist")
orders = pytest.mark.parametrize("order", ORDERS)


@contextlib.contextmanager
def emulated(order="forward", seed=0, arch=90):
    """The ops' kernel path runs the emulated CUDA kernels inside (kernels on, emulation on)."""
    with _emulator.settings(order=order, seed=seed, arch=arch), _backend.emulation(True), _backend.kernels(True):
        yield
