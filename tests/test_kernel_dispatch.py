"""The dispatch's checks of the GPU before it uses a kernel, run on the CPU with the device's
properties monkeypatched: the compute capability and the architectures fastbert._C was built
for (a kernel below sm_80 is __trap()), and the shared memory attention's launchers ask for."""
import importlib
import importlib.util
import pathlib
import types
import warnings

import pytest
import torch

from fastbert import _backend
ROOT = pathlib.Path(__file__).resolve().parents[1]
A = importlib.import_module("fastbert.ops.attention")  # fastbert.ops.attention is also the function

needs_cuda_build = pytest.mark.skipif(not _backend.has_cuda_kernel("layernorm_fwd"),
                                      reason="fastbert._C was built without CUDA kernels")
needs_smem_op = pytest.mark.skipif(not _backend.has_op("attention_smem_bytes"),
                                   reason="fastbert._C was built without CUDA kernels")

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fresh_backend(monkeypatch):
    """Forget cached device checks and one-time warnings for the test."""
    monkeypatch.setattr(_backend, "_device_problems", {})
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_enabled", True)


# ----------------------------------------------------------------------------- capability

def test_parse_arch_list():
    assert _backend.parse_arch_list("sm_80;sm_90;compute_90") == ((80, 90), (90,))
    assert _backend.parse_arch_list("sm_90a") == ((90,), ())
    assert _backend.parse_arch_list("") is None
    with pytest.raises(ValueError, match="expected items like sm_80"):
        _backend.parse_arch_list("sm_80;ampere")


@pytest.mark.parametrize("capability, archs, problem", [
    ((7, 0), None, "below 8.0"),               # V100: the mma path would __trap()
    ((7, 5), ((75, 80), ()), "below 8.0"),     # T4, even with sm_75 code in the binary
    ((8, 0), ((80, 90), ()), None),
    ((8, 6), ((80,), ()), None),               # sm_80 machine code runs on 8.6
    ((8, 6), ((90,), ()), "TORCH_CUDA_ARCH_LIST=8.6"),  # but sm_90 code does not
    ((9, 0), ((80,), ()), "sm_80 only"),
    ((9, 0), ((80,), (80,)), None),            # PTX for 8.0 is compiled by the driver on 9.0
    ((12, 0), ((80, 90), (90,)), None),
    ((12, 0), ((80, 90), ()), "12.0"),
    ((9, 0), None, None),                       # nothing recorded: the capability alone decides
])
def test_capability_problem(capability, archs, problem):
    why = _backend.capability_problem(capability, archs)
    if problem is None:
        assert why is None
    else:
        assert why is not None and problem in why


@needs_cuda_build
@pytest.mark.parametrize("capability, archs, expect_kernel", [
    ((7, 5), "sm_75;sm_90", False),
    ((8, 6), "sm_90", False),
    ((9, 0), "sm_90", True),
    ((8, 9), "sm_80;sm_90", True),
])
def test_use_kernel_checks_the_device(monkeypatch, fresh_backend, capability, archs, expect_kernel):
    calls = []

    def get_capability(index):
        calls.append(index)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    monkeypatch.setattr(_backend, "built_archs", lambda: _backend.parse_arch_list(archs))
    x = types.SimpleNamespace(is_cuda=True, device=CUDA0)  # what use_kernel reads of a CUDA tensor
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend.use_kernel("layernorm_fwd", x) is expect_kernel
        assert _backend.use_kernel("gather_rows", x, x) is expect_kernel
    messages = [str(w.message) for w in caught]
    if expect_kernel:
        assert messages == []
    else:  # one warning for the device, whichever op asks
        assert len(messages) == 1 and "runs its PyTorch twin" in messages[0]
        assert f"{capability[0]}.{capability[1]}" in messages[0]
    assert calls == [0]  # the capability is read once per device


@needs_cuda_build
def test_extension_records_its_architectures():
    archs = _backend.built_archs()
    assert archs is not None and archs[0], "a CUDA build must record the architectures it holds code for"
    assert all(a >= 80 for a in archs[0] + archs[1])


# ----------------------------------------------------------------------------- shared memory

def _props(monkeypatch, optin):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(shared_memory_per_block_optin=optin))
    monkeypatch.setattr(A, "_smem_problems", {})  # a new "device": forget what was looked up


@needs_smem_op
def test_attention_smem_comes_from_the_launchers():
    need = {(d, b): torch.ops.fastbert.attention_smem_bytes(d, 2, b) for d in A.HEAD_DIMS for b in (False, True)}
    # attention.h's formulas (the launchers' requests), as scripts/sass_report.py restates them
    spec = importlib.util.spec_from_file_location("sass_report", ROOT / "scripts" / "sass_report.py")
    S = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(S)
    assert need == {(d, b): S.ours_smem("bwd" if b else "fwd", d) for d in A.HEAD_DIMS for b in (False, True)}
    for b in (False, True):
        assert need[(32, b)] < need[(64, b)] < need[(128, b)] <= 99 * 1024  # fits sm_86/89/120 (issue 11)
    with pytest.raises(RuntimeError, match="no kernel for head_dim 80"):
        torch.ops.fastbert.attention_smem_bytes(80, 2, True)


@needs_smem_op
@pytest.mark.parametrize("backward", [False, True])
def test_smem_problem_threshold(monkeypatch, backward):
    need = torch.ops.fastbert.attention_smem_bytes(128, 2, backward)
    _props(monkeypatch, need)
    assert A.smem_problem(128, 2, CUDA0, backward) is None
    _props(monkeypatch, need - 1)
    why = A.smem_problem(128, 2, CUDA0, backward)
    assert why is not None and f"needs {need} B" in why and f"allows {need - 1} B" in why
    assert A.smem_problem(128, 2, torch.device("cpu"), backward) is None  # no GPU to ask


@needs_smem_op
def test_sm86_runs_every_head_dim_on_the_kernels(monkeypatch):
    _props(monkeypatch, 99 * 1024)  # sm_86/89/120's opt-in limit: the head_dim 128 backward fits since issue 11
    assert all(A.smem_problem(d, 2, CUDA0, backward=b) is None for d in A.HEAD_DIMS for b in (False, True))
    _props(monkeypatch, 64 * 1024)
    assert A.smem_problem(128, 2, CUDA0, backward=True) is not None


@needs_smem_op
@pytest.mark.parametrize("dim, falls_back", [(128, True), (64, False)])
def test_backward_falls_back_to_the_twin_once(monkeypatch, fresh_backend, seed, dim, falls_back):
    """_varlen_bwd (attention's autograd backward) on a GPU one byte short of the head_dim 128
    backward's shared memory: head_dim 128 runs the twin with a one-time warning, head_dim 64 the
    op. CPU tensors stand in for the GPU's, whose properties are monkeypatched; the op's CPU kernel
    is the twin, so both give the twin's grads."""
    _props(monkeypatch, torch.ops.fastbert.attention_smem_bytes(128, 2, True) - 1)
    real_problem = A.smem_problem
    monkeypatch.setattr(A, "smem_problem", lambda d, e, device, backward: real_problem(d, e, CUDA0, backward))
    twin_calls = []
    real_twin = A.attention_varlen_bwd_twin

    def twin(*args):
        twin_calls.append(args[1].shape)
        return real_twin(*args)

    monkeypatch.setattr(A, "attention_varlen_bwd_twin", twin)
    lengths = [5, 0, 9]
    total = sum(lengths)
    q, k, v, dout = (torch.randn(total, 2, dim, dtype=torch.float16) for _ in range(4))
    cu = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
    out, lse = torch.ops.fastbert.attention_varlen_fwd(q, k, v, cu, 9, dim ** -0.5, 0.1, 3, 4)
    args = (dout, q, k, v, out, lse, cu, 9, dim ** -0.5, 0.1, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = A._varlen_bwd(*args)
        A._varlen_bwd(*args)
    messages = [str(w.message) for w in caught]
    expected = real_twin(*args)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    if falls_back:
        assert len(twin_calls) == 2
        assert len(messages) == 1 and "backward kernel does not fit" in messages[0] and "head_dim 128" in messages[0]
    else:
        assert twin_calls == [] and messages == []


@needs_cuda_build
def test_check_command_does_not_run_kernels_on_an_unsupported_gpu(monkeypatch, fresh_backend, capsys):
    from fastbert.commands import check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 0))  # V100
    assert check.run(types.SimpleNamespace(device="cuda:0")) == 0  # on a CPU machine, a kernel run would raise
    out = capsys.readouterr().out
    assert "cannot run on cuda:0" in out and "7.0" in out and "twin" in out
