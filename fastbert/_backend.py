"""Which implementation runs an op: the CUDA kernel from fastbert._C or its pure-PyTorch twin.

Kernels are used when fastbert._C was built with them, the inputs are on a CUDA device and
kernels are enabled. `FASTBERT_KERNELS=0` in the environment or `fastbert.use_kernels(False)`
forces the twins everywhere, so any result can be checked against them.

Without a GPU the kernels can run on the CPU through the kernel emulator (fastbert/ops/_emulator.py):
`FASTBERT_EMULATE=1` or `use_emulator(True)` makes the ops' CPU kernels the emulated CUDA kernels
instead of the twins, and sends CPU tensors to them.
"""
import contextlib
import os
import warnings

import torch

_C = None
_C_ERROR = None
try:  # the extension is optional: without it every op runs its twin
    from fastbert import _C  # noqa: F401  (loading it registers the torch.ops.fastbert.* schemas)
except ImportError as e:  # not built, or built against another torch
    _C_ERROR = str(e)

_enabled = os.environ.get("FASTBERT_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
_emulate = os.environ.get("FASTBERT_EMULATE", "0").strip().lower() in ("1", "true", "yes", "on")


def use_kernels(enabled: bool = True) -> None:
    """Turn the CUDA kernels on (default) or off (every op runs its pure-PyTorch twin)."""
    global _enabled
    _enabled = bool(enabled)


def kernels_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def kernels(enabled: bool):
    """Context manager: `with fastbert.kernels(False): ...` runs the twins inside."""
    global _enabled
    before = _enabled
    _enabled = bool(enabled)
    try:
        yield
    finally:
        _enabled = before


def use_emulator(enabled: bool = True) -> None:
    """Run the CUDA kernels on CPU tensors through the kernel emulator (on), or the twins (off, default)."""
    global _emulate
    _emulate = bool(enabled)


def emulating() -> bool:
    return _emulate and _enabled


@contextlib.contextmanager
def emulation(enabled: bool = True):
    """`with fastbert._backend.emulation(): ...` runs the emulated kernels on CPU tensors inside."""
    global _emulate
    before = _emulate
    _emulate = bool(enabled)
    try:
        yield
    finally:
        _emulate = before


def cpu_kernel(name: str, twin):
    """The CPU kernel registered for torch.ops.fastbert.<name>: the emulated CUDA kernel while
    emulating, else the twin."""
    def kernel(*args):
        if emulating():
            from fastbert.ops import _emulator
            return getattr(_emulator, name)(*args)
        return twin(*args)
    kernel.__name__ = kernel.__qualname__ = f"{name}_cpu"
    return kernel


def extension_loaded() -> bool:
    return _C is not None


def extension_error():
    return _C_ERROR


def has_op(name: str) -> bool:
    """True if fastbert._C declared torch.ops.fastbert.<name>."""
    if _C is None:
        return False
    return hasattr(torch.ops.fastbert, name)


def has_cuda_kernel(name: str) -> bool:
    """True if fastbert._C holds a CUDA kernel for torch.ops.fastbert.<name>."""
    if not has_op(name):
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbert::{name}", "CUDA"))
    except Exception:  # pragma: no cover - private API moved
        return False


def cuda_ops():
    """Names of the ops that have a compiled CUDA kernel."""
    from fastbert.ops import OP_NAMES
    return [n for n in OP_NAMES if has_cuda_kernel(n)]


def use_kernel(name: str, *tensors) -> bool:
    """Decide, at call time, whether op `name` runs its CUDA kernel for these inputs."""
    if not _enabled:
        return False
    if all(t.is_cuda for t in tensors) and has_cuda_kernel(name):
        return True
    return _emulate and has_op(name) and all(t.device.type == "cpu" for t in tensors)


_warned = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
