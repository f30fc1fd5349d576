"""bias_dropout_residual_layernorm: LayerNorm(dropout(x + bias) + residual) in one kernel forward and
one backward. Its registered ops (CPU twins), the Philox keep mask and its host twin, autograd, bad
input, the CUDA kernels run by the kernel emulator (under two thread orders, odd hidden sizes,
fp32/fp16/bf16, dropout 0 and 0.1, non-contiguous inputs; the tolerance rule of
fastbert/ops/_check.py), and the GPU self-check."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastbert import _backend
from fastbert.ops import bias_dropout_residual_layer_norm
from fastbert.ops._check import compare, poisoned_outputs

from emulation import ORDERS, emulated, needs_emulator

mod = importlib.import_module("fastbert.ops.bias_dropout_residual_layernorm")
OP = "bias_dropout_residual_layernorm"
needs_ext = pytest.mark.skipif(not _backend.has_op(f"{OP}_fwd"),
                               reason=f"fastbert._C lacks torch.ops.fastbert.{OP}_fwd (not built, or built before it)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(rows, hidden, dtype, contiguous=False):
    x = torch.randn(rows, hidden + 3, dtype=dtype)
    x = x[:, :hidden].contiguous() if contiguous else x[:, 1:hidden + 1]  # a non-contiguous view by default
    residual = torch.randn(rows, hidden, dtype=dtype)
    bias, ln_bias = torch.randn(hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
    weight = 1 + 0.5 * torch.randn(hidden, dtype=dtype)
    return x, bias, residual, weight, ln_bias


def _unfused(keep, dropout_p):
    """The unfused ops with a given keep mask (the kernel's): what the fused op must equal."""
    def fn(x, bias, residual, weight, ln_bias):
        v = x + bias
        if dropout_p > 0:
            v = v * keep.to(v.dtype) / (1 - dropout_p)
        return F.layer_norm(v + residual, (x.shape[-1],), weight, ln_bias, 1e-12)
    return fn


def _fused(dropout_p, seed, offset):
    def fn(x, bias, residual, weight, ln_bias):
        return torch.ops.fastbert.bias_dropout_residual_layernorm_fwd(x, bias, residual, weight, ln_bias, 1e-12,
                                                                      dropout_p, seed, offset)[0]
    return fn


def _run(fn, inputs, dy):
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return (y,) + torch.autograd.grad(y, leaves, dy.to(y.dtype))


NAMES = ("y", "dx", "dbias", "dresidual", "dweight", "dln_bias")

# ----------------------------------------------------------------------------- the mask's twin


def test_row_keep_mask_is_philox_of_row_and_column(seed):
    keep = mod.row_keep_mask(64, 203, 0.1, 12345, 7)
    assert keep.shape == (64, 203) and keep.dtype == torch.bool
    assert 0.85 < keep.float().mean().item() < 0.95  # p = 0.1
    # element (r, c) is word c % 4 of philox({c / 4, r, 0, offset}, seed): recompute a few alone
    from fastbert.ops.attention import keep_threshold, philox4x32_10
    for r, c in [(0, 0), (5, 6), (63, 202), (17, 101)]:
        words = philox4x32_10(c // 4, r, 0, 7, 12345, 0)
        assert bool(keep[r, c]) == (int(words[c % 4]) < keep_threshold(0.1))
    assert not torch.equal(keep, mod.row_keep_mask(64, 203, 0.1, 12345, 8))  # a new offset, a new mask
    assert not torch.equal(keep, mod.row_keep_mask(64, 203, 0.1, 12346, 7))
    assert mod.row_keep_mask(3, 5, 0.0, 1, 2).all()


# ----------------------------------------------------------------------------- twins and registration


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_function_without_dropout_equals_the_unfused_ops(seed, dtype):
    x, bias, residual, weight, ln_bias = _inputs(6, 50, dtype)
    got = bias_dropout_residual_layer_norm(x, bias, residual, weight, ln_bias, 1e-12, dropout_p=0.1, training=False)
    torch.testing.assert_close(got, F.layer_norm(x + bias + residual, (50,), weight, ln_bias, 1e-12))


def test_public_function_training_drops_out(seed):
    x, bias, residual, _, _ = _inputs(64, 50, torch.float32)
    y = bias_dropout_residual_layer_norm(x, bias, residual, None, None, 1e-12, dropout_p=0.5, training=True)
    assert not torch.allclose(y, F.layer_norm(x + bias + residual, (50,), eps=1e-12))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_opcheck_cpu(seed, dtype, dropout_p):
    x, bias, residual, weight, ln_bias = (t.requires_grad_() for t in _inputs(15, 24, dtype, contiguous=True))
    x, residual = x.view(3, 5, 24), residual.view(3, 5, 24)
    fwd = torch.ops.fastbert.bias_dropout_residual_layernorm_fwd
    bwd = torch.ops.fastbert.bias_dropout_residual_layernorm_bwd
    opcheck(fwd.default, (x, bias, residual, weight, ln_bias, 1e-5, dropout_p, 11, 3))
    opcheck(fwd.default, (x, None, residual, None, None, 1e-5, dropout_p, 11, 3))
    y, h, mean, rstd = fwd(x, bias, residual, weight, ln_bias, 1e-5, dropout_p, 11, 3)
    opcheck(bwd.default, (torch.randn_like(y), h, mean, rstd, weight.detach(), dropout_p, 11, 3))
    opcheck(bwd.default, (torch.randn_like(y), h, mean, rstd, None, dropout_p, 11, 3))


@needs_ext
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_registered_op_and_its_autograd_match_fp64(seed, dropout_p):
    inputs = _inputs(7, 37, torch.float32)
    dy = torch.randn(7, 37)
    keep = mod.row_keep_mask(7, 37, dropout_p, 99, 5)
    got = _run(_fused(dropout_p, 99, 5), inputs, dy)
    want = _run(_unfused(keep, dropout_p), [t.double() for t in inputs], dy.double())
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=name)


def _bad(**change):
    def call(x, bias, residual, weight, ln_bias):
        args = dict(x=x, bias=bias, residual=residual, weight=weight, ln_bias=ln_bias, eps=1e-12, dropout_p=0.1)
        args.update({k: v(args) if callable(v) else v for k, v in change.items()})
        return bias_dropout_residual_layer_norm(**args, training=True)
    return call


@pytest.mark.parametrize("bad, exc, match", [
    (_bad(x=lambda a: a["x"].long()), TypeError, "x must have dtype"),
    (_bad(residual=lambda a: a["residual"][:, :3]), ValueError,
     r"residual has shape \(4, 3\); expected the shape of x"),
    (_bad(bias=lambda a: a["bias"][:-1]), ValueError, r"bias has shape \(49,\); expected \(50,\)"),
    (_bad(ln_bias=lambda a: a["ln_bias"][None]), ValueError, r"ln_bias has shape \(1, 50\); expected \(50,\)"),
    (_bad(weight=lambda a: a["weight"].tolist()), TypeError, "weight must be a torch.Tensor"),
    (_bad(dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\), got 1.0"),
    (_bad(dropout_p=-0.1), ValueError, r"dropout_p must be a number in \[0, 1\)"),
    (_bad(x=lambda a: a["x"][:, :0], residual=lambda a: a["residual"][:, :0]), ValueError, "non-empty last dimension"),
])
def test_bad_input_is_a_clear_error(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad(*_inputs(4, 50, torch.float32))


# ----------------------------------------------------------------------------- the kernels, emulated

# odd hidden sizes take the scalar path; 64, 96 and 4096 the 16-byte one (4 fp32 or 8 half per access).
# 1037: 4 scalar packs a thread on 16 warps (common.h row_launch); 4096: 16 warps of one 16-byte pack
# (16-bit) or two (fp32), and the backward's 49,152 B of shared memory (over the default limit: opt-in)
EMULATED_SHAPES = [(33, 37), (17, 101), (32, 64), (24, 96), (5, 1037), (3, 4096)]


@needs_ext
@needs_emulator
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", EMULATED_SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_emulated_kernels_within_tolerance_of_fp64(seed, order, dtype, rows, hidden, dropout_p):
    """y and the five gradients of the kernels: error against fp64 (with the kernel's mask, from the
    twin) at most twice the same-dtype unfused ops'."""
    inputs = _inputs(rows, hidden, dtype, contiguous=hidden % 2 == 1)
    dy = torch.randn(rows, hidden, dtype=dtype)
    keep = mod.row_keep_mask(rows, hidden, dropout_p, seed, 3)
    ref = _run(_unfused(keep, dropout_p), [t.double() for t in inputs], dy.double())
    twin = _run(_unfused(keep, dropout_p), inputs, dy)
    with poisoned_outputs(), emulated(order=order, seed=seed):
        kern = _run(_fused(dropout_p, seed, 3), inputs, dy)
    for name, k, t, r in zip(NAMES, kern, twin, ref):
        result = compare(f"{OP} {name}", f"{rows}x{hidden} p={dropout_p} {order}", dtype, k, t, r)
        assert result.ok, result


@needs_ext
@needs_emulator
@pytest.mark.parametrize("hidden", [37, 64])
def test_emulated_dropout_mask_is_the_twins_bit_for_bit(seed, hidden):
    """fp32, p = 0.1: the kernel zeroes exactly the twin's dropped elements (h - residual == 0 there,
    x + bias elsewhere, scaled), and its backward drops the same ones from dx."""
    x, bias, residual, weight, ln_bias = _inputs(9, hidden, torch.float32, contiguous=True)
    keep = mod.row_keep_mask(9, hidden, 0.1, seed, 12)
    with emulated(order="warp"):
        y, h, mean, rstd = torch.ops.fastbert.bias_dropout_residual_layernorm_fwd(
            x, bias, residual, weight, ln_bias, 1e-12, 0.1, seed, 12)
        dx, dres, *_ = torch.ops.fastbert.bias_dropout_residual_layernorm_bwd(
            torch.randn(9, hidden), h, mean, rstd, weight, 0.1, seed, 12)
    assert torch.equal((h - residual) == 0, ~keep)
    assert torch.equal(dx == 0, ~keep | (dres == 0))
    torch.testing.assert_close(dx[keep], dres[keep] * (1 / 0.9))


@needs_ext
@needs_emulator
def test_emulated_backward_with_more_rows_than_blocks(seed):
    """More rows than the backward's blocks (grid-stride over rows, partial sums over several rows per
    block), a 3-d input, dropout: the kernels equal the twins."""
    from fastbert.ops import _emulator
    with _emulator.settings(arch=80):
        blocks = _emulator._num_partials("emu_bdrln_bwd_num_partials", 10 ** 6, 40, 0)  # the most it takes
    rows = 2 * blocks + 6
    inputs = _inputs(rows, 40, torch.float32, contiguous=True)
    inputs = (inputs[0].view(-1, 2, 40), inputs[1], inputs[2].view(-1, 2, 40), *inputs[3:])
    dy = torch.randn(rows // 2, 2, 40)
    twin = _run(_fused(0.1, seed, 1), inputs, dy)
    with emulated(order="forward", arch=80):
        kern = _run(_fused(0.1, seed, 1), inputs, dy)
    for name, k, t in zip(NAMES, kern, twin):
        torch.testing.assert_close(k, t, rtol=1e-5, atol=2e-4, msg=name)


@needs_ext
@needs_emulator
def test_selfcheck_passes_on_the_emulated_kernel(monkeypatch):
    """`fastbert check`'s self-check, run here on the emulated kernel at small sizes: every case ok."""
    monkeypatch.setattr(mod, "SELFCHECK_SHAPES", ((1, 96), (7, 72), (5, 101)))
    with emulated(order="warp"):
        results = mod.selfcheck(torch.device("cpu"))
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_gpu_selfcheck():
    results = mod.selfcheck(torch.device("cuda"))
    bad = [r for r in results if not r.ok]
    assert not bad, bad


@needs_ext
@needs_emulator
@pytest.mark.parametrize("order", ["forward", "warp"])
@pytest.mark.parametrize("dtype, with_weight", [(torch.bfloat16, True), (torch.float16, True),
                                                (torch.bfloat16, False)])
def test_emulated_parameter_gradients_are_written_in_the_weight_dtype(seed, order, dtype, with_weight):
    """The backward writes dweight, dln_bias and dbias (fp32 sums) in weight's dtype (fp32 without a
    weight), so autograd needs no cast op after them; the values are the twin's, rounded once."""
    x, bias, residual, weight, ln_bias = _inputs(33, 96, dtype, contiguous=True)
    weight = weight if with_weight else None
    with emulated(order=order, seed=seed):
        y, h, mean, rstd = torch.ops.fastbert.bias_dropout_residual_layernorm_fwd(
            x, bias, residual, weight, ln_bias, 1e-12, 0.1, seed, 5)
        dy = torch.randn(33, 96, dtype=dtype)
        kern = torch.ops.fastbert.bias_dropout_residual_layernorm_bwd(dy, h, mean, rstd, weight, 0.1, seed, 5)
    twin = mod.bias_dropout_residual_layernorm_bwd_twin(dy, h, mean, rstd, weight, 0.1, seed, 5)
    want = dtype if with_weight else torch.float32
    for name, k, t in zip(("dweight", "dln_bias", "dbias"), kern[2:], twin[2:]):
        assert k.dtype == want and t.dtype == want, (name, k.dtype, t.dtype)
        torch.testing.assert_close(k.float(), t.float(), rtol=1e-2, atol=1e-2, msg=name)
