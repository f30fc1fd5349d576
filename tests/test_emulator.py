"""The kernel emulator's runtime (csrc/emu/): warp collectives, the mma.sync fragment layouts, the
errors it reports instead of hanging or killing the process, and each architecture's
shared-memory limits. The kernels of csrc/emu/selftest.cc exercise it."""
import ctypes

import pytest
import torch

from fastbert.ops import _emulator

from emulation import ORDERS, emulated, needs_emulator, needs_ops

pytestmark = needs_emulator

CASES = {"collectives": 0, "mma_f16": 1, "mma_bf16": 2, "deadlock": 3, "different_barriers": 4, "bad_mask": 5,
         "assert": 6, "trap": 7}


def selftest(case, a=None, b=None, out=None, order="forward", seed=0, arch=90):
    out = torch.full((1024,), float("nan")) if out is None else out
    with _emulator.settings(order=order, seed=seed, arch=arch):
        _emulator._call(case, "emu_selftest", CASES[case], None if a is None else a.data_ptr(),
                        None if b is None else b.data_ptr(), out.data_ptr())
    return out


@pytest.mark.parametrize("order", _emulator.ORDERS)
def test_shuffles_and_votes(order, seed):
    out = selftest("collectives", order=order, seed=seed)[:64 * 8].view(64, 8)
    tid = torch.arange(64, dtype=torch.float32)
    lane = tid % 32
    warp_base = tid - lane
    expected = torch.stack([
        warp_base * 32 + 31 * 32 / 2,                      # xor-reduction: sum of the warp's thread ids
        torch.where(lane >= 1, tid - 1, tid),              # shfl_up 1: lane 0 keeps its own
        torch.where(lane + 3 < 32, tid + 3, tid),          # shfl_down 3
        warp_base + 5,                                     # shfl from lane 5
        torch.full((64,), float(0xAAAAAAAA)),              # ballot of the odd lanes
        torch.ones(64), torch.ones(64),                    # any(lane == 3), all(lane < 32)
        (tid - tid % 8) * 8 + 28,                          # xor-sum over width-8 segments
    ], dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_m16n8k16_fragment_layouts(seed, dtype):
    a = torch.randn(16, 16).to(dtype)
    bt = torch.randn(8, 16).to(dtype)  # B stored n-major: B[k][n] = bt[n][k]
    d = selftest("mma_f16" if dtype == torch.float16 else "mma_bf16", a, bt)[:128].view(16, 8)
    c = torch.tensor([[1.0, 2.0] * 4] * 8 + [[3.0, 4.0] * 4] * 8)  # what each lane's C fragment held
    expected = a.double() @ bt.double().t() + c.double()
    torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, match", [
    ("deadlock", r"deadlock: 62 thread\(s\) __syncthreads at csrc/emu/selftest\.cc:\d+.*a warp collective with "
                 r"mask 0xffffffff at csrc/emu/selftest\.cc"),
    ("different_barriers", r"threads of the block wait at different barriers: 32 thread\(s\) __syncthreads at "
                           r"csrc/emu/selftest\.cc:\d+; 32 thread\(s\) __syncthreads at csrc/emu/selftest\.cc:\d+"),
    ("bad_mask", r"selftest\.cc:\d+: warp collective called by lane 16 with mask 0x0000ffff"),
    ("assert", r"cudaErrorAssert: .*thread \(5,0,0\).*device assert failed: threadIdx.x != 5"),
    ("trap", r"thread \(7,0,0\).*__trap\(\) called"),
])
@pytest.mark.parametrize("order", ORDERS)
def test_errors_raise_naming_the_kernel_and_the_process_goes_on(case, match, order):
    with pytest.raises(_emulator.EmulatorError, match=match) as info:
        selftest(case, order=order)
    assert f"kernel {{anonymous}}::{case}_kernel (launched at" in str(info.value) and "launched at csrc/emu/selftest.cc:" in str(info.value)
    # the fibers of the failed launch are abandoned cleanly: the next launch runs normally
    test_shuffles_and_votes("forward", 0)


def test_mma_below_sm80_traps():
    a, bt = torch.randn(16, 16).half(), torch.randn(8, 16).half()
    with pytest.raises(_emulator.EmulatorError, match=r"__trap\(\): mma.sync.m16n8k16 needs sm_80 or newer, the "
                                                      r"emulated architecture is sm_75"):
        selftest("mma_f16", a, bt, arch=75)


def _attention_backward_head_dim_128():
    lengths = [3, 70]
    cu = torch.tensor([0, 3, 73], dtype=torch.int32)
    q, k, v = (torch.randn(73, 2, 128, dtype=torch.float16, requires_grad=True) for _ in range(3))
    from fastbert.ops import attention_varlen
    out = attention_varlen(q, k, v, cu, max(lengths))
    return torch.autograd.grad(out, (q, k, v), torch.randn_like(out))


@needs_ops
@pytest.mark.parametrize("arch, fits", [(80, True), (90, True), (86, False), (89, False), (120, False)])
def test_shared_memory_limit_of_the_architecture_under_test(seed, arch, fits):
    """Head_dim 128 attention backward asks for 134,656 bytes of dynamic shared memory: within the
    opt-in limit of sm_80 (163 KiB) and sm_90 (227 KiB), over the 99 KiB of sm_86/89/120, where
    the launcher's cudaFuncSetAttribute fails as on such a GPU."""
    with emulated(arch=arch):
        if fits:
            grads = _attention_backward_head_dim_128()
            assert all(torch.isfinite(g).all() for g in grads)
        else:
            with pytest.raises(_emulator.EmulatorError, match=rf"attention_varlen_bwd \(emulated, sm_{arch}\): "
                               rf"cudaErrorInvalidValue: cudaFuncSetAttribute\(MaxDynamicSharedMemorySize, 134656\)"
                               rf": over the opt-in limit of sm_{arch} \(101376 bytes\)"):
                _attention_backward_head_dim_128()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="order must be one of"):
        _emulator.configure(order="sideways")
    with pytest.raises(ValueError, match="arch must be a compute capability"):
        _emulator.configure(arch="sm_90")


def test_ctypes_signatures_cover_every_op():
    from fastbert.ops import OP_NAMES
    for name in OP_NAMES:
        assert callable(getattr(_emulator, name)), name
    lib = _emulator.load()
    assert isinstance(lib, ctypes.CDLL)
