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
         "assert": 6, "trap": 7, "ldmatrix": 8, "cp_async": 9, "cp_async_unwaited": 10,
         "smem_100k": 12}


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


@pytest.mark.parametrize("order", _emulator.ORDERS)
def test_ldmatrix_x4_and_trans_layouts(order, seed):
    m = torch.randint(0, 2 ** 15, (32, 8), dtype=torch.int16)  # four 8x8 matrices of 16-bit values
    out = selftest("ldmatrix", m, order=order, seed=seed)[:512].view(2, 32, 8)[:, :, :4]
    regs = out.contiguous().view(torch.int32).view(2, 32, 4)
    lo, hi = regs & 0xFFFF, (regs >> 16) & 0xFFFF
    mats = m.long().view(4, 8, 8)
    lane = torch.arange(32)
    for i in range(4):
        torch.testing.assert_close(lo[0, :, i], mats[i, lane // 4, 2 * (lane % 4)].int(), rtol=0, atol=0)
        torch.testing.assert_close(hi[0, :, i], mats[i, lane // 4, 2 * (lane % 4) + 1].int(), rtol=0, atol=0)
        torch.testing.assert_close(lo[1, :, i], mats[i, 2 * (lane % 4), lane // 4].int(), rtol=0, atol=0)
        torch.testing.assert_close(hi[1, :, i], mats[i, 2 * (lane % 4) + 1, lane // 4].int(), rtol=0, atol=0)


@pytest.mark.parametrize("order", ORDERS)
def test_cp_async_lands_by_the_wait_at_its_latest_or_earliest(order, seed):
    """A copy lands any time from its issue to its wait: at the wait in the forward and reverse
    orders (a read before the wait sees the poison), at the issue in the warp order (a buffer
    reused before every warp is done with it is overwritten at once), either in random."""
    src = torch.randn(256)
    out = selftest("cp_async", src, order=order, seed=seed)[:256]
    want = src.view(64, 4).roll(-1, 0).flatten()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    early = selftest("cp_async_unwaited", src, order=order, seed=seed)[:256]
    # read before cp.async.wait_group: the poisoned shared memory where the copy has not landed
    # (copies of threads that already exited have, as they would on the GPU)
    landed = ~torch.isnan(early)
    assert torch.equal(early[landed], want[landed])
    if order == "forward":  # thread i reads thread i + 1's chunk before i + 1 exits
        assert (~landed).sum() == 252
    elif order == "reverse":  # thread i + 1 has exited before thread i reads: only thread 63 reads early
        assert (~landed).sum() == 4
    elif order == "warp":
        assert landed.all()


@pytest.mark.parametrize("case, match", [
    ("deadlock", r"deadlock: 62 thread\(s\) __syncthreads at csrc/emu/selftest\.cc:\d+.*a warp collective with "
                 r"mask 0xffffffff at csrc/emu/selftest\.cc"),
    ("different_barriers", r"threads of the block wait at different barriers: 32 thread\(s\) __syncthreads at "
                           r"csrc/emu/selftest\.cc:\d+; 32 thread\(s\) __syncthreads at csrc/emu/selftest\.cc:\d+"),
    ("bad_mask", r"selftest\.cc:\d+: warp collective called by lane (1[6-9]|2\d|3[01]) with mask 0x0000ffff, "
                 r"which does not include it"),
    ("assert", r"cudaErrorAssert: .*thread \(5,0,0\).*device assert failed: threadIdx.x != 5"),
    ("trap", r"thread \(7,0,0\).*__trap\(\) called"),
])
@pytest.mark.parametrize("order", ORDERS)
def test_errors_raise_naming_the_kernel_and_the_process_goes_on(case, match, order):
    with pytest.raises(_emulator.EmulatorError, match=match) as info:
        selftest(case, order=order)
    assert f"kernel {{anonymous}}::{case}_kernel (launched at csrc/emu/selftest.cc:" in str(info.value)
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
    """A launch opting in to 100 KiB of dynamic shared memory: within the opt-in limit of sm_80
    (163 KiB) and sm_90 (227 KiB), over the 99 KiB of sm_86/89/120, where cudaFuncSetAttribute
    fails as on such a GPU. The head_dim 128 attention backward (98,304 B) runs on all five."""
    src = torch.randn(256)
    if fits:
        assert torch.equal(selftest("smem_100k", src, arch=arch)[:256].view(64, 4), src.view(64, 4).roll(-1, 0))
    else:
        with pytest.raises(_emulator.EmulatorError, match=r"cudaErrorInvalidValue: cudaFuncSetAttribute\("
                           rf"MaxDynamicSharedMemorySize, 102400\): over the opt-in limit of sm_{arch} \(101376 bytes\)"):
            selftest("smem_100k", src, arch=arch)
    with emulated(arch=arch):
        grads = _attention_backward_head_dim_128()
    assert all(torch.isfinite(g).all() for g in grads)


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


@needs_ops
def test_environment_routes_the_ops_to_the_emulator():
    """FASTBERT_EMULATE=1 with FASTBERT_EMULATE_ARCH / _ORDER: fastbert's ops on CPU tensors run the
    emulated kernels (the forward's mma trap on an emulated sm_75 proves it), and the twins without it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, torch; sys.path.insert(0, 'tests'); import test_emulator as t\n"
            "from fastbert import _backend\n"
            "print('emulating', _backend.emulating())\n"
            "try:\n    t._attention_backward_head_dim_128(); print('ran')\n"
            "except Exception as e:\n    print(type(e).__name__, str(e)[:60])\n")
    env = dict(os.environ, PYTHONPATH=str(root), FASTBERT_EMULATE="1", FASTBERT_EMULATE_ARCH="75",
               FASTBERT_EMULATE_ORDER="warp")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "emulating True" in r.stdout and "EmulatorError fastbert attention_varlen_fwd (emulated, sm_75)" in r.stdout
    env.pop("FASTBERT_EMULATE")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "emulating False" in r.stdout and "ran" in r.stdout, r.stdout + r.stderr[-2000:]
