"""embeddings_layernorm_dropout: dropout(LayerNorm(word + token type + position)) in one kernel
forward and one backward (the embeddings' mode of the bias_dropout_residual_layernorm kernels).
Registered ops (CPU twins), autograd, bad input, the kernels under the emulator (two orders, odd
hidden sizes, fp32/fp16/bf16, dropout 0 and 0.1, non-contiguous inputs; the tolerance rule of
fastbert/ops/_check.py), the mask bit for bit, and the GPU self-check."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastbert import _backend
from fastbert.ops import embeddings_layer_norm_dropout
from fastbert.ops._check import compare, poisoned_outputs
from fastbert.ops.bias_dropout_residual_layernorm import row_keep_mask

from emulation import ORDERS, emulated, needs_emulator

mod = importlib.import_module("fastbert.ops.embeddings_layernorm_dropout")
OP = "embeddings_layernorm_dropout"
needs_ext = pytest.mark.skipif(not _backend.has_op(f"{OP}_fwd"),
                               reason=f"fastbert._C lacks torch.ops.fastbert.{OP}_fwd (not built, or built before it)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("y", "da", "db", "dc", "dweight", "dbias")


def _inputs(rows, hidden, dtype, contiguous=False):
    a = torch.randn(rows, hidden + 3, dtype=dtype)
    a = a[:, :hidden].contiguous() if contiguous else a[:, 1:hidden + 1]  # a non-contiguous view by default
    b = torch.randn(rows, hidden, dtype=dtype)
    c = torch.randn(1, hidden, dtype=dtype).expand(rows, hidden)  # stride 0 over rows, as the positions
    return a, b, c, 1 + 0.5 * torch.randn(hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)


def _unfused(keep, dropout_p):
    def fn(a, b, c, weight, bias):
        y = F.layer_norm(a + b + c, (a.shape[-1],), weight, bias, 1e-12)
        return y * keep.to(y.dtype) / (1 - dropout_p) if dropout_p > 0 else y
    return fn


def _fused(dropout_p, seed, offset):
    def fn(a, b, c, weight, bias):
        return torch.ops.fastbert.embeddings_layernorm_dropout_fwd(a, b, c, weight, bias, 1e-12, dropout_p, seed,
                                                                   offset)[0]
    return fn


def _run(fn, inputs, dy):
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return (y,) + torch.autograd.grad(y, leaves, dy.to(y.dtype))


def test_public_function_without_dropout_equals_the_unfused_ops(seed):
    a, b, c, w, bias = _inputs(6, 50, torch.float32)
    got = embeddings_layer_norm_dropout(a, b, c, w, bias, 1e-12, dropout_p=0.1, training=False)
    torch.testing.assert_close(got, F.layer_norm(a + b + c, (50,), w, bias, 1e-12))


@pytest.mark.parametrize("bad, exc, match", [
    (lambda a, b, c, w, bias: embeddings_layer_norm_dropout(a.long(), b, c, w, bias), TypeError, "a must have dtype"),
    (lambda a, b, c, w, bias: embeddings_layer_norm_dropout(a, b[:, :3], c, w, bias), ValueError,
     r"b has shape \(4, 3\); expected the shape of a"),
    (lambda a, b, c, w, bias: embeddings_layer_norm_dropout(a, b, c, w[:3], bias), ValueError,
     r"weight has shape \(3,\); expected \(50,\)"),
    (lambda a, b, c, w, bias: embeddings_layer_norm_dropout(a, b, c, w, bias, dropout_p=1.5, training=True),
     ValueError, r"dropout_p must be a number in \[0, 1\)"),
])
def test_bad_input_is_a_clear_error(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad(*_inputs(4, 50, torch.float32))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_opcheck_cpu(seed, dtype, dropout_p):
    a, b, c, w, bias = (t.contiguous().requires_grad_() for t in _inputs(15, 24, dtype, contiguous=True))
    a, b, c = (t.view(3, 5, 24) for t in (a, b, c))
    fwd, bwd = torch.ops.fastbert.embeddings_layernorm_dropout_fwd, torch.ops.fastbert.embeddings_layernorm_dropout_bwd
    opcheck(fwd.default, (a, b, c, w, bias, 1e-5, dropout_p, 11, 3))
    opcheck(fwd.default, (a, b, None, None, None, 1e-5, dropout_p, 11, 3))
    y, h, mean, rstd = fwd(a, b, c, w, bias, 1e-5, dropout_p, 11, 3)
    opcheck(bwd.default, (torch.randn_like(y), h, mean, rstd, w.detach(), dropout_p, 11, 3))


@needs_ext
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_registered_op_and_its_autograd_match_fp64(seed, dropout_p):
    inputs = _inputs(7, 37, torch.float32)
    dy = torch.randn(7, 37)
    keep = row_keep_mask(7, 37, dropout_p, 99, 5)
    got = _run(_fused(dropout_p, 99, 5), inputs, dy)
    want = _run(_unfused(keep, dropout_p), [t.double() for t in inputs], dy.double())
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=name)


EMULATED_SHAPES = [(33, 37), (17, 101), (32, 64), (24, 96)]


@needs_ext
@needs_emulator
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", EMULATED_SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_emulated_kernels_within_tolerance_of_fp64(seed, order, dtype, rows, hidden, dropout_p):
    inputs = _inputs(rows, hidden, dtype, contiguous=hidden % 2 == 1)
    dy = torch.randn(rows, hidden, dtype=dtype)
    keep = row_keep_mask(rows, hidden, dropout_p, seed, 4)
    ref = _run(_unfused(keep, dropout_p), [t.double() for t in inputs], dy.double())
    twin = _run(_unfused(keep, dropout_p), inputs, dy)
    with poisoned_outputs(), emulated(order=order, seed=seed):
        kern = _run(_fused(dropout_p, seed, 4), inputs, dy)
    for name, k, t, r in zip(NAMES, kern, twin, ref):
        result = compare(f"{OP} {name}", f"{rows}x{hidden} p={dropout_p} {order}", dtype, k, t, r)
        assert result.ok, result


@needs_ext
@needs_emulator
@pytest.mark.parametrize("hidden", [37, 64])
def test_emulated_dropout_mask_is_the_twins_bit_for_bit(seed, hidden):
    """fp32, p = 0.1: the kernel's output is zero exactly where the twin's mask drops, and its
    forward and backward equal the twin's (the same mask regenerated in the backward)."""
    inputs = _inputs(9, hidden, torch.float32, contiguous=True)
    dy = torch.randn(9, hidden)
    keep = row_keep_mask(9, hidden, 0.1, seed, 12)
    with emulated(order="warp"):
        kern = _run(_fused(0.1, seed, 12), inputs, dy)
    twin = _run(_fused(0.1, seed, 12), inputs, dy)  # the registered op's CPU twin
    assert torch.equal(kern[0] == 0, ~keep)
    for name, k, t in zip(NAMES, kern, twin):
        torch.testing.assert_close(k, t, rtol=1e-5, atol=1e-5, msg=name)


@needs_ext
@needs_emulator
def test_selfcheck_passes_on_the_emulated_kernel(monkeypatch):
    monkeypatch.setattr(mod, "SELFCHECK_SHAPES", ((1, 96), (7, 72), (5, 101)))
    with emulated(order="warp"):
        results = mod.selfcheck(torch.device("cpu"))
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


@pytest.mark.gpu
def test_gpu_selfcheck():
    results = mod.selfcheck(torch.device("cuda"))
    bad = [r for r in results if not r.ok]
    assert not bad, bad


def _bwd_inputs(dtype, with_weight, seed):
    a, b, c, weight, bias = _inputs(33, 96, dtype, contiguous=True)
    weight = weight if with_weight else None
    y, h, mean, rstd = torch.ops.fastbert.embeddings_layernorm_dropout_fwd(a, b, c, weight, bias, 1e-12, 0.1, seed, 5)
    return torch.randn(33, 96, dtype=dtype), h, mean, rstd, weight


def _fp32_sums(dy, h, mean, rstd, weight, seed):
    """dweight and dbias from the twin on fp32 copies (fp32 weight): the sums the op must round once."""
    f = [t.float() if t is not None else None for t in (dy, h, mean, rstd, weight)]
    return mod.embeddings_layernorm_dropout_bwd_twin(*f, 0.1, seed, 5)[1:]


@needs_ext
@pytest.mark.parametrize("dtype, with_weight", [(torch.bfloat16, True), (torch.float16, True),
                                                (torch.bfloat16, False)])
def test_parameter_gradients_are_in_the_weight_dtype(seed, dtype, with_weight):
    """The registered op (its CPU twin) gives dweight and dbias in weight's dtype (fp32 without a
    weight), as torch's autograd expects of a bf16/fp16 parameter; the values are the fp32 sums
    rounded once. The fake kernel agrees (torch.compile sees the same dtypes)."""
    dy, h, mean, rstd, weight = _bwd_inputs(dtype, with_weight, seed)
    got = torch.ops.fastbert.embeddings_layernorm_dropout_bwd(dy, h, mean, rstd, weight, 0.1, seed, 5)
    want_dtype = dtype if with_weight else torch.float32
    for name, g, w in zip(("dweight", "dbias"), got[1:], _fp32_sums(dy, h, mean, rstd, weight, seed)):
        assert g.dtype == want_dtype, (name, g.dtype)
        assert torch.equal(g, w.to(want_dtype)), name
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as fake:
        args = [fake.from_tensor(t) if t is not None else None for t in (dy, h, mean, rstd, weight)]
        out = torch.ops.fastbert.embeddings_layernorm_dropout_bwd(*args, 0.1, seed, 5)
    assert [t.dtype for t in out] == [dtype, want_dtype, want_dtype]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autograd_gives_each_parameter_its_dtype_and_the_twins_values(seed, dtype):
    """Through the registered op's autograd: the bf16/fp16 LayerNorm weight and bias get gradients
    in their own dtype, equal to the fp64 unfused ops' within the dtype's rounding."""
    a, b, c, weight, bias = _inputs(21, 48, dtype, contiguous=True)
    dy = torch.randn(21, 48, dtype=dtype)
    leaves = [t.detach().requires_grad_() for t in (weight, bias)]
    y = torch.ops.fastbert.embeddings_layernorm_dropout_fwd(a, b, c, *leaves, 1e-12, 0.0, 0, 0)[0]
    got = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (weight, bias)]
    ref = torch.autograd.grad(F.layer_norm((a + b + c).double(), (48,), *ref_leaves, 1e-12), ref_leaves, dy.double())
    for name, g, r in zip(("dweight", "dbias"), got, ref):
        assert g.dtype == dtype, (name, g.dtype)
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=2e-2 * r.abs().max().item(), msg=name)


@needs_ext
@needs_emulator
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype, with_weight", [(torch.bfloat16, True), (torch.float16, True),
                                                (torch.bfloat16, False)])
def test_emulated_parameter_gradients_are_written_in_the_weight_dtype(seed, order, dtype, with_weight):
    """The kernel writes dweight and dbias (fp32 sums) in weight's dtype (fp32 without a weight):
    the dtype is the twin's, the values the twin's within one rounding."""
    dy, h, mean, rstd, weight = _bwd_inputs(dtype, with_weight, seed)
    with emulated(order=order, seed=seed):
        kern = torch.ops.fastbert.embeddings_layernorm_dropout_bwd(dy, h, mean, rstd, weight, 0.1, seed, 5)
    twin = mod.embeddings_layernorm_dropout_bwd_twin(dy, h, mean, rstd, weight, 0.1, seed, 5)
    want = dtype if with_weight else torch.float32
    for name, k, t in zip(("dweight", "dbias"), kern[1:], twin[1:]):
        assert k.dtype == want and t.dtype == want, (name, k.dtype, t.dtype)
        torch.testing.assert_close(k.float(), t.float(), rtol=1e-2, atol=1e-2, msg=name)
