"""layernorm: y = LayerNorm(x + residual), its registered ops (CPU twins here, CUDA kernels on
a GPU), autograd, bad input, and the tolerance rule on the GPU."""
import contextlib
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastbert import _backend
from fastbert.ops import layer_norm

ln_module = importlib.import_module("fastbert.ops.layernorm")
needs_ext = pytest.mark.skipif(not _backend.has_op("layernorm_fwd"),
                               reason="fastbert._C is not built, so torch.ops.fastbert.* does not exist")


def _inputs(shape, dtype=torch.float32, device="cpu", residual=True, requires_grad=False):
    hidden = shape[-1]
    x = torch.randn(*shape[:-1], hidden + 2, dtype=dtype, device=device)[..., 1:hidden + 1]  # non-contiguous
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    w = 1 + 0.5 * torch.randn(hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, dtype=dtype, device=device)
    if requires_grad:
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        r = r.detach().requires_grad_() if r is not None else None
    return x, r, w, b


def _reference(x, r, w, b, eps, dy):
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    rr = r.detach().double().requires_grad_() if r is not None else None
    y = F.layer_norm(leaves[0] + (rr if rr is not None else 0), (x.shape[-1],), leaves[1], leaves[2], eps)
    grads = torch.autograd.grad(y, leaves + ([rr] if rr is not None else []), dy.double())
    return y, grads


@needs_ext
@pytest.mark.parametrize("shape", [(1, 96), (7, 384), (2, 3, 768), (5, 1000)])
@pytest.mark.parametrize("residual", [True, False])
def test_registered_op_matches_fp64(seed, shape, residual):
    x, r, w, b = _inputs(shape, residual=residual, requires_grad=True)
    y, total, mean, rstd = torch.ops.fastbert.layernorm_fwd(x, r, w, b, 1e-12)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (x.numel() // shape[-1],)
    assert total.shape == (x.shape if residual else (0,))
    dy = torch.randn_like(y)
    ref_y, ref_grads = _reference(x, r, w, b, 1e-12, dy)
    grads = torch.autograd.grad(y, [x, w, b] + ([r] if residual else []), dy)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(seed, dtype):
    x, r, w, b = _inputs((3, 5, 24), dtype, requires_grad=True)
    opcheck(torch.ops.fastbert.layernorm_fwd.default, (x, r, w, b, 1e-5))
    opcheck(torch.ops.fastbert.layernorm_fwd.default, (x, None, w, b, 1e-5))
    opcheck(torch.ops.fastbert.layernorm_fwd.default, (x, None, None, None, 1e-5))
    y, total, mean, rstd = torch.ops.fastbert.layernorm_fwd(x, r, w, b, 1e-5)
    opcheck(torch.ops.fastbert.layernorm_bwd.default, (torch.randn_like(y), total.detach(), mean.detach(),
                                                       rstd.detach(), w.detach()))
    opcheck(torch.ops.fastbert.layernorm_bwd.default, (torch.randn_like(y), x.detach(), mean.detach(),
                                                       rstd.detach(), None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_function_matches_twin(seed, dtype):
    x, r, w, b = _inputs((4, 7, 384), dtype)
    torch.testing.assert_close(layer_norm(x, w, b, 1e-12, residual=r), F.layer_norm(x + r, (384,), w, b, 1e-12))
    torch.testing.assert_close(layer_norm(x, w, b), F.layer_norm(x, (384,), w, b, 1e-12))
    torch.testing.assert_close(layer_norm(x, None, None), F.layer_norm(x, (384,), eps=1e-12))


@pytest.mark.parametrize("bad, exc, match", [
    (lambda x, r, w, b: layer_norm(x.long(), w, b), TypeError, "x must have dtype"),
    (lambda x, r, w, b: layer_norm(x.tolist(), w, b), TypeError, "x must be a torch.Tensor"),
    (lambda x, r, w, b: layer_norm(x, w, b, residual=r[:, :3]), ValueError, "residual has shape"),
    (lambda x, r, w, b: layer_norm(x, w, b, residual=r.long()), TypeError, "residual must have dtype"),
    (lambda x, r, w, b: layer_norm(x, w[:5], b), ValueError, r"weight has shape \(5,\); expected \(16,\)"),
    (lambda x, r, w, b: layer_norm(x, w, b[None]), ValueError, "bias has shape"),
    (lambda x, r, w, b: layer_norm(x, w, b.to("meta")), ValueError, "bias is on meta"),
    (lambda x, r, w, b: layer_norm(x[0, 0], w, b), ValueError, "at least 1 dimension"),
])
def test_bad_input(bad, exc, match):
    x, r, w, b = _inputs((3, 16))
    with pytest.raises(exc, match=match):
        bad(x, r, w, b)


def test_selfcheck_code_runs_on_cpu(monkeypatch, seed):
    """The GPU self-check's own code (shapes, poisoning, comparisons) on CPU, where kernel = twin."""
    monkeypatch.setattr(ln_module, "SELFCHECK_SHAPES", ((1, 96), (7, 100)))
    results = ln_module.selfcheck(torch.device("cpu"))
    assert len(results) == 3 * 2 * (5 + 4)  # dtypes x shapes x (5 outputs with a residual, 4 without)
    assert all(r.ok for r in results), [r for r in results if not r.ok]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_ext
def test_tolerance_rule_gpu(seed):
    failed = [r for r in ln_module.selfcheck(torch.device("cuda")) if not r.ok]
    assert not failed, failed


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_gpu(seed, dtype):
    x, r, w, b = _inputs((7, 768), dtype, "cuda", requires_grad=True)
    opcheck(torch.ops.fastbert.layernorm_fwd.default, (x, r, w, b, 1e-12))
    opcheck(torch.ops.fastbert.layernorm_fwd.default, (x, None, w.float(), None, 1e-12))
    y, total, mean, rstd = torch.ops.fastbert.layernorm_fwd(x, r, w, b, 1e-12)
    opcheck(torch.ops.fastbert.layernorm_bwd.default, (torch.randn_like(y), total.detach(), mean.detach(),
                                                       rstd.detach(), w.detach()))


@pytest.mark.gpu
@needs_ext
def test_kernel_paths_gpu(seed):
    """Vectorized and scalar paths, misaligned pointers, fp32 weights on bf16 activations, 0 rows."""
    for hidden in (96, 1001, 4096, 8192):
        for offset in (0, 1):
            base = torch.randn(33 * hidden + offset, device="cuda", dtype=torch.bfloat16)
            x = base[offset:].view(33, hidden)  # offset 1: not 16-byte aligned -> scalar path
            w, b = torch.randn(hidden, device="cuda"), torch.randn(hidden, device="cuda")
            y = layer_norm(x, w, b, 1e-5)
            ref = F.layer_norm(x.float(), (hidden,), w, b, 1e-5)
            torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=3e-2)
    empty = torch.randn(0, 768, device="cuda")
    assert layer_norm(empty, torch.ones(768, device="cuda"), None).shape == (0, 768)


@pytest.mark.gpu
@needs_ext
def test_torch_compile_gpu(seed):
    x, r, w, b = _inputs((4, 33, 768), torch.bfloat16, "cuda", requires_grad=True)
    fn = torch.compile(lambda x, r, w, b: layer_norm(x, w, b, 1e-12, residual=r).float().square().sum(),
                       fullgraph=False)
    loss = fn(x, r, w, b)
    loss.backward()
    with _backend.kernels(False):
        ref = layer_norm(x, w, b, 1e-12, residual=r).float().square().sum()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1.0)
    assert x.grad is not None and r.grad is not None and torch.equal(x.grad, r.grad)


# ----------------------------------------------------------------------------- emulated kernels

from emulation import emulated, needs_emulator, needs_ops, orders  # noqa: E402

# 16-byte packs (96, 768, 1000, 4096), 8-byte (bf16/fp16 100; fp32 50), 4-byte (bf16/fp16 50), scalar (1001)
EMULATED_SHAPES = ((3, 96), (4, 768), (5, 100), (3, 50), (2, 1000), (3, 1001), (2, 4096))


@contextlib.contextmanager
def _emulated_sms(sms):
    """The emulated device reports `sms` SMs (None: the architecture's own count)."""
    from fastbert.ops import _emulator
    lib = _emulator.load()
    lib.emu_set_num_sms(sms or 0)
    try:
        yield
    finally:
        lib.emu_set_num_sms(0)


@needs_emulator
@needs_ops
@orders
@pytest.mark.parametrize("sms", [None, 1])
def test_emulated_kernels_tolerance_rule(monkeypatch, seed, order, sms):
    """The CUDA kernels, emulated, against the twin and fp64: fp32/fp16/bf16, with and without a
    residual, every access width. sms=1 shrinks the backward's grid (its partials) below the
    rows, so each block accumulates dweight/dbias over several rows."""
    shapes = EMULATED_SHAPES if sms is None else tuple((rows * 12 + 1, hidden) for rows, hidden in EMULATED_SHAPES)
    monkeypatch.setattr(ln_module, "SELFCHECK_SHAPES", shapes)
    with emulated(order), _emulated_sms(sms):
        results = ln_module.selfcheck(torch.device("cpu"))
    assert len(results) == 3 * len(shapes) * (5 + 4)
    if sms is None:
        failed = [r for r in results if not r.ok]
    else:  # dweight/dbias sum 37-61 rows in another order than torch: the absolute floor grows as sqrt(rows)
        from fastbert.ops._check import ATOL_FLOOR

        def ok(r):
            rows = int(r.case.split("rows=")[1].split()[0])
            floor = ATOL_FLOOR[getattr(torch, r.dtype)] * math.sqrt(rows)
            return r.written and r.kernel_error <= 2 * r.twin_error + floor
        failed = [r for r in results if not ok(r)]
    assert not failed, failed


@needs_emulator
@needs_ops
@pytest.mark.parametrize("arch,hidden,dtype,want", [
    (90, 768, torch.bfloat16, 132 * 21), (80, 768, torch.bfloat16, 108 * 21), (86, 768, torch.bfloat16, 84 * 16),
    (90, 4096, torch.bfloat16, 132 * 4), (90, 1001, torch.float32, 132 * 4)])
def test_emulated_backward_partials_follow_occupancy(arch, hidden, dtype, want):
    """The workspace rows: the backward kernel's resident blocks per SM (the emulator's bound from
    threads and blocks per SM: it does not know registers) times the SMs, at most the rows."""
    from fastbert.ops import _emulator
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    lib = _emulator.load()
    with _emulator.settings(arch=arch):
        lib.emu_configure(0, 0, arch)  # (each op call configures from the settings; this is a direct call)
        assert lib.emu_layernorm_bwd_num_partials(10 ** 6, hidden, code) == want
        assert lib.emu_layernorm_bwd_num_partials(7, hidden, code) == 7


@needs_emulator
@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_misaligned_pointers_take_narrower_packs(seed, dtype):
    """x, residual and fp32 weight/bias starting 1-3 elements past an aligned address: the launcher
    picks the widest access every pointer allows (down to scalar) and the results stay right."""
    rows, hidden = 5, 96
    for offset in (0, 1, 2, 3):
        x = torch.randn(rows * hidden + offset, dtype=dtype)[offset:].view(rows, hidden)
        r = torch.randn(rows * hidden + offset, dtype=dtype)[offset:].view(rows, hidden)
        w = (1 + 0.5 * torch.randn(hidden + offset))[offset:]
        b = torch.randn(hidden + offset)[offset:]
        dy = torch.randn(rows, hidden, dtype=dtype)
        with emulated():
            y, total, mean, rstd = torch.ops.fastbert.layernorm_fwd(x, r, w, b, 1e-5)
            dx, dw, db = torch.ops.fastbert.layernorm_bwd(dy, total, mean, rstd, w)
        with _backend.kernels(False):
            ty, ttotal, tmean, trstd = torch.ops.fastbert.layernorm_fwd(x, r, w, b, 1e-5)
            tdx, tdw, tdb = torch.ops.fastbert.layernorm_bwd(dy, ttotal, tmean, trstd, w)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for got, want in ((y, ty), (total, ttotal), (dx, tdx), (dw, tdw), (db, tdb)):
            torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"offset {offset}: {m}")


# ----------------------------------------------------------------------------- dtype, as F.layer_norm


@contextlib.contextmanager
def _cuda_autocast_on_fake_tensors():
    """CUDA autocast (bf16) around fake CUDA tensors: the fake kernels, the autocast rules and torch's
    own F.layer_norm run without a GPU (torch.autocast("cuda") would disable itself without one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    state = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    with FakeTensorMode():
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        try:
            yield
        finally:
            torch.set_autocast_enabled("cuda", state[0])
            torch.set_autocast_dtype("cuda", state[1])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_output_dtype_under_cuda_autocast_is_torchs(dtype, residual):
    """Under CUDA autocast F.layer_norm (the twin, and transformers' LayerNorm) runs in fp32 and returns
    fp32; the kernel's op does too (its inputs cast to fp32), checked through its fake kernel."""
    with _cuda_autocast_on_fake_tensors():
        x = torch.empty(5, 24, device="cuda", dtype=dtype)
        r = torch.empty(5, 24, device="cuda", dtype=dtype) if residual else None
        w = torch.empty(24, device="cuda", dtype=dtype)
        want = ln_module.layer_norm_twin(x, w, w, 1e-12, residual=r).dtype
        y, total, mean, rstd = torch.ops.fastbert.layernorm_fwd(x, r, w, w, 1e-12)
    assert want == torch.float32
    assert y.dtype == want and mean.dtype == rstd.dtype == torch.float32


@needs_emulator
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_emulated_kernel_output_dtype_is_the_twins(seed, dtype, autocast):
    """On the CPU (autocast or not) F.layer_norm keeps the inputs' dtype; so does the emulated kernel."""
    x, r, w, b = _inputs((3, 40), dtype)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with _backend.kernels(False), ctx:
        want = layer_norm(x, w, b, residual=r).dtype
    with emulated(), ctx:
        got = layer_norm(x, w, b, residual=r).dtype
    assert got == want == dtype
