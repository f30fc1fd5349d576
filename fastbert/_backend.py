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
    """Decide, at call time, whether op `name` runs its kernel for these inputs: kernels on, and
    either CUDA inputs, a kernel compiled for the op and a GPU the extension holds code for (else
    the twin runs, with a one-time warning naming the reason), or CPU inputs under the emulator."""
    if not _enabled:
        return False
    if _emulate and has_op(name) and tensors and all(t.device.type == "cpu" for t in tensors):
        return True
    if not (all(t.is_cuda for t in tensors) and has_cuda_kernel(name)):
        return False
    why = device_problem(tensors[0].device) if tensors else None
    if why is not None:
        warn_once(f"device:{why}", f"fastbert: no CUDA kernels on this GPU: {why}; every op runs its PyTorch twin")
        return False
    return True



# ----------------------------------------------------------------------------- the GPU under a kernel

# The attention kernels use mma.sync.m16n8k16 with bf16/fp16 operands (sm_80 and newer); built for
# an older GPU that path is __trap(), which would cost the process its CUDA context.
MIN_CAPABILITY = (8, 0)


def parse_arch_list(text: str):
    """(sass, ptx) from fastbert._C's "sm_80;sm_90;compute_90": the architectures it holds machine
    code for and those it holds PTX for, as numbers (80, 90). None when nothing was recorded."""
    sass, ptx = [], []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, number = item.partition("_")
        if kind not in ("sm", "compute") or not number.rstrip("af").isdigit():
            raise ValueError(f"fastbert._C recorded an architecture list it cannot read: {text!r} "
                             "(expected items like sm_80 or compute_90)")
        (sass if kind == "sm" else ptx).append(int(number.rstrip("af")))
    return (tuple(sass), tuple(ptx)) if sass or ptx else None


def runs_on(capability, archs) -> bool:
    """Whether code built for archs = (sass, ptx) runs on a GPU of this (major, minor) capability:
    machine code for X.Y runs on X.Y up to X.9; PTX for X.Y is compiled by the driver for X.Y and newer."""
    major, minor = capability
    cc = 10 * major + minor
    sass, ptx = archs
    return any(a // 10 == major and a <= cc for a in sass) or any(a <= cc for a in ptx)


def built_archs():
    """(sass, ptx) the extension was compiled for, or None when it did not record them."""
    if not has_op("cuda_arch_list"):
        return None  # an extension built before the record existed: the capability check still applies
    return parse_arch_list(torch.ops.fastbert.cuda_arch_list())


def capability_problem(capability, archs):
    """Why kernels built for archs cannot run on a GPU of this capability (a reason), or None."""
    major, minor = capability
    if (major, minor) < MIN_CAPABILITY:
        return (f"compute capability {major}.{minor} is below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, "
                "which the kernels need (tensor-core mma.sync with bf16/fp16)")
    if archs is not None and not runs_on((major, minor), archs):
        held = ", ".join([f"sm_{a}" for a in archs[0]] + [f"compute_{a} (PTX)" for a in archs[1]])
        return (f"fastbert._C holds code for {held} only, none of which runs on compute capability "
                f"{major}.{minor}; rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
    return None


_device_problems = {}


def device_problem(device):
    """capability_problem for a CUDA device (looked up once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_problems:
        _device_problems[index] = _look_up_device(index)
    return _device_problems[index]


@torch.compiler.disable  # once per device; under torch.compile a graph break, not a traced driver query
def _look_up_device(index):
    return capability_problem(torch.cuda.get_device_capability(index), built_archs())


def smem_per_block_optin(device) -> int:
    """The most shared memory one thread block may use on this device, with the opt-in attribute."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


_warned = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
