"""Which implementation runs an op: the CUDA kernel from fastbert._C or its pure-PyTorch twin.

Kernels are used when fastbert._C was built with them, the inputs are on a CUDA device and
kernels are enabled. `FASTBERT_KERNELS=0` in the environment or `fastbert.use_kernels(False)`
forces the twins everywhere, so any result can be checked against them.
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
    return _enabled and all(t.is_cuda for t in tensors) and has_cuda_kernel(name)


_warned = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
