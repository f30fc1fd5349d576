"""The tolerance rule (flash-attention's): compare both the kernel and the same-dtype PyTorch
twin with an fp32 (or fp64) reference; the kernel's error must be at most twice the twin's.

Used by the GPU tests and by `fastbert check`. Each op module exposes `selfcheck(device)`,
returning a list of CheckResult on fresh random inputs.
"""
import math
from dataclasses import dataclass

import torch

# An absolute floor so that exact results (error 0 for both) and fp32 rounding noise pass.
ATOL_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
# ... and, relative to the reference's largest value, one rounding step (ulp) of the output dtype
# or four fp32 ulps, whichever is larger: a kernel that rounds its output once where the twin
# happened to land nearer, or accumulates in fp32 in another order than torch's pairwise sums, is
# off by that much whatever its quality (seen: a bf16 dweight of one row; fp32 dbias over 1,000
# rows, 3 ulps of the sum).
def ulp_floor(dtype, ref_scale: float) -> float:
    return max(torch.finfo(dtype).eps, 4 * torch.finfo(torch.float32).eps) * ref_scale


@dataclass
class CheckResult:
    op: str
    case: str
    dtype: str
    kernel_error: float
    twin_error: float
    written: bool = True  # every output element was overwritten (outputs are poisoned first)
    ref_scale: float = 0.0  # the reference's largest magnitude

    @property
    def ok(self) -> bool:
        dtype = getattr(torch, self.dtype, torch.float32)
        floor = max(ATOL_FLOOR.get(dtype, 1e-6), ulp_floor(dtype, self.ref_scale))
        return self.written and self.kernel_error <= 2.0 * self.twin_error + floor


def max_error(out, ref) -> float:
    """Largest absolute difference, in fp64; inf if shapes differ or anything is non-finite."""
    if out.shape != ref.shape:
        return float("inf")
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return (out64 - ref64).abs().max().item() if out64.numel() else 0.0


def compare(op, case, dtype, kernel_out, twin_out, ref_out, written=True) -> CheckResult:
    scale = ref_out.detach().double().abs().max().item() if ref_out.numel() else 0.0
    return CheckResult(op, case, str(dtype).replace("torch.", ""), max_error(kernel_out, ref_out),
                       max_error(twin_out, ref_out), written, scale if math.isfinite(scale) else 0.0)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) so an element the kernel fails to write shows up."""
    return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-1)


class poisoned_outputs:
    """Inside, every fresh torch.empty / at::empty is filled with NaN (ints with their max):
    torch's deterministic mode with fill_uninitialized_memory. A kernel that skips an output
    element then leaves a NaN that the comparison catches."""

    def __enter__(self):
        import torch.utils.deterministic as det
        self._before = (torch.are_deterministic_algorithms_enabled(),
                        torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = True
        return self

    def __exit__(self, *exc):
        import torch.utils.deterministic as det
        enabled, warn_only, fill = self._before
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        det.fill_uninitialized_memory = fill
        return False
