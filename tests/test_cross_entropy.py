"""cross_entropy: mean softmax cross-entropy over counted rows, its registered ops (CPU twins
here, CUDA kernels on a GPU), autograd, bad input, and the tolerance rule on the GPU."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastbert import _backend
from fastbert.ops import cross_entropy

ce_module = importlib.import_module("fastbert.ops.cross_entropy")
needs_ext = pytest.mark.skipif(not _backend.has_op("cross_entropy_fwd"),
                               reason="fastbert._C is not built, so torch.ops.fastbert.* does not exist")


def _inputs(rows, vocab, dtype=torch.float32, device="cpu", ignored=0.2):
    logits = 3 * torch.randn(rows, vocab + 3, dtype=dtype, device=device)[:, 2:vocab + 2]  # non-contiguous
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[torch.rand(rows, device=device) < ignored] = -100
    return logits, labels


def _reference(logits, labels):
    ld = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(ld, labels, ignore_index=-100, reduction="sum") / (labels != -100).sum().clamp(min=1)
    (grad,) = torch.autograd.grad(loss, ld)
    return loss, grad


@needs_ext
@pytest.mark.parametrize("rows, vocab", [(1, 30522), (7, 1000), (33, 2), (5, 97)])
def test_registered_ops_match_fp64(seed, rows, vocab):
    logits, labels = _inputs(rows, vocab)
    logits.requires_grad_()
    loss, lse = torch.ops.fastbert.cross_entropy_fwd(logits, labels, -100)
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == (rows,)
    ignored = labels == -100
    assert (loss[ignored] == 0).all() and (lse[ignored] == 0).all()
    count = (~ignored).sum().clamp(min=1)
    (grad,) = torch.autograd.grad(loss.sum() / count, logits)
    ref_loss, ref_grad = _reference(logits, labels)
    torch.testing.assert_close((loss.sum() / count).double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(seed, dtype):
    logits, labels = _inputs(9, 37, dtype)
    logits.requires_grad_()
    opcheck(torch.ops.fastbert.cross_entropy_fwd.default, (logits, labels, -100))
    loss, lse = torch.ops.fastbert.cross_entropy_fwd(logits, labels, -100)
    args = (torch.rand(9), logits.detach(), labels, lse.detach(), -100)
    opcheck(torch.ops.fastbert.cross_entropy_bwd.default, args)
    opcheck(torch.ops.fastbert.cross_entropy_bwd_.default, (args[0], logits.detach().clone(), *args[2:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab", [(1, 30522), (7, 50), (1000, 2)])
def test_public_function(seed, dtype, rows, vocab):
    logits, labels = _inputs(rows, vocab, dtype)
    logits.requires_grad_()
    loss = cross_entropy(logits, labels)
    loss.backward()
    ref_loss, ref_grad = _reference(logits, labels)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    torch.testing.assert_close(logits.grad.double(), ref_grad, **tol)


@pytest.mark.parametrize("rows", [0, 6])
def test_no_counted_row_gives_zero(rows):
    logits = torch.randn(rows, 11, requires_grad=True)
    loss = cross_entropy(logits, torch.full((rows,), -100))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_other_ignore_index_and_int32_labels():
    logits = torch.randn(5, 8)
    labels = torch.tensor([1, 7, 0, 3, 0], dtype=torch.int32)
    got = cross_entropy(logits, labels, ignore_index=0)
    want = F.cross_entropy(logits, labels.long(), ignore_index=0)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda l, y: cross_entropy(l, torch.tensor([0, 11, 1])), IndexError, r"labels holds 11, outside the valid range \[0, 11\) or -100"),
    (lambda l, y: cross_entropy(l, torch.tensor([0, -1, 1])), IndexError, "labels holds -1"),
    (lambda l, y: cross_entropy(l, y.float()), TypeError, "integer"),
    (lambda l, y: cross_entropy(l, y.short()), TypeError, "int64 or int32"),
    (lambda l, y: cross_entropy(l.long(), y), TypeError, "logits must have dtype"),
    (lambda l, y: cross_entropy(l[0], y), ValueError, "logits must be 2-d"),
    (lambda l, y: cross_entropy(l, y[:2]), ValueError, r"labels has shape \(2,\); expected \(3,\)"),
    (lambda l, y: cross_entropy(l, y.to("meta"), check=False), ValueError, "labels is on meta"),
    (lambda l, y: cross_entropy(l[:, :0], y), ValueError, "0 classes"),
    (lambda l, y: cross_entropy(l, y, ignore_index=-100.0), TypeError, "ignore_index must be an int"),
])
def test_bad_input(bad, exc, match):
    logits, labels = torch.randn(3, 11), torch.tensor([0, 10, -100])
    with pytest.raises(exc, match=match):
        bad(logits, labels)


def test_selfcheck_code_runs_on_cpu(monkeypatch, seed):
    """The GPU self-check's own code (shapes, poisoning, in place, comparisons) on CPU, kernel = twin."""
    monkeypatch.setattr(ce_module, "SELFCHECK_SHAPES", ((1, 97), (7, 1000), (0, 5)))
    results = ce_module.selfcheck(torch.device("cpu"))
    assert len(results) == 3 * 3 * 2 * 2
    assert all(r.ok for r in results), [r for r in results if not r.ok]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_ext
def test_tolerance_rule_gpu(seed):
    failed = [r for r in ce_module.selfcheck(torch.device("cuda")) if not r.ok]
    assert not failed, failed


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_gpu(seed, dtype):
    logits, labels = _inputs(7, 30522, dtype, "cuda")
    logits.requires_grad_()
    opcheck(torch.ops.fastbert.cross_entropy_fwd.default, (logits, labels, -100))
    loss, lse = torch.ops.fastbert.cross_entropy_fwd(logits, labels, -100)
    args = (torch.rand(7, device="cuda"), logits.detach(), labels, lse.detach(), -100)
    opcheck(torch.ops.fastbert.cross_entropy_bwd.default, args)
    opcheck(torch.ops.fastbert.cross_entropy_bwd_.default, (args[0], logits.detach().clone(), *args[2:]))


@pytest.mark.gpu
@needs_ext
def test_inplace_backward_gpu(seed):
    logits, labels = _inputs(64, 30522, torch.bfloat16, "cuda")
    leaf = logits.detach().requires_grad_()
    out = leaf * 1
    ptr = out.data_ptr()
    loss = cross_entropy(out, labels, inplace_backward=True)
    captured = {}
    out.register_hook(lambda g: captured.setdefault("ptr", g.data_ptr()))
    loss.backward()
    assert captured["ptr"] == ptr  # the gradient was written over the logits
    _, ref_grad = _reference(logits, labels)
    torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=2e-2, atol=1e-4)


@pytest.mark.gpu
@needs_ext
def test_torch_compile_gpu(seed):
    logits, labels = _inputs(33, 30522, torch.bfloat16, "cuda")
    logits = logits.detach().requires_grad_()
    fn = torch.compile(lambda l, y: cross_entropy(l, y, check=False))
    loss = fn(logits, labels)
    loss.backward()
    ref_loss, ref_grad = _reference(logits, labels)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=2e-2, atol=1e-4)


# ----------------------------------------------------------------------------- dtype, as F.cross_entropy

from emulation import emulated, needs_emulator  # noqa: E402


def _dtypes_case(dtype, autocast):
    """(the dtype F.cross_entropy returns, a context with that autocast state, logits, labels)."""
    logits, labels = _inputs(6, 53, dtype)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        want = F.cross_entropy(logits, labels).dtype
    return want, ctx, logits, labels


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_twin_loss_dtype_is_torchs(seed, dtype, autocast):
    want, ctx, logits, labels = _dtypes_case(dtype, autocast)
    assert want == (torch.float32 if autocast else dtype)  # what the kernel must match
    with _backend.kernels(False), ctx:
        assert cross_entropy(logits, labels).dtype == want


@needs_emulator
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_kernel_loss_dtype_is_the_twins(seed, dtype, autocast):
    """The kernel computes in fp32; the loss it returns has F.cross_entropy's dtype all the same
    (bf16 logits: bf16, fp32 under autocast), and its gradient has the logits' dtype."""
    want, ctx, logits, labels = _dtypes_case(dtype, autocast)
    for inplace in (False, True):
        leaf = logits.detach().requires_grad_()
        with emulated(), ctx:
            loss = cross_entropy(leaf * 1, labels, inplace_backward=inplace)
            assert loss.dtype == want, (inplace, loss.dtype)
            loss.backward()
        assert leaf.grad.dtype == dtype
