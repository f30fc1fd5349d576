"""bias_gelu: gelu(x + bias) fused after the intermediate matmul. Its registered ops (CPU twins),
autograd, bad input, the CUDA kernel run by the kernel emulator against an fp64 reference (the
tolerance rule of fastbert/ops/_check.py), and the GPU self-check."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastbert import _backend
from fastbert.ops import bias_gelu
from fastbert.ops._check import compare, poisoned_outputs

from emulation import ORDERS, emulated, needs_emulator

bg = importlib.import_module("fastbert.ops.bias_gelu")
needs_ext = pytest.mark.skipif(not _backend.has_op("bias_gelu_fwd"),
                               reason="fastbert._C lacks torch.ops.fastbert.bias_gelu_fwd (not built, or older)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(rows, cols, dtype, contiguous=False):
    x = 2 * torch.randn(rows, cols + 3, dtype=dtype)
    x = x[:, :cols].contiguous() if contiguous else x[:, 1:cols + 1]  # a non-contiguous view by default
    return x, torch.randn(cols, dtype=dtype), torch.randn(rows, cols, dtype=dtype)


def _run(fn, x, bias, dy, approximate):
    x, bias = x.detach().requires_grad_(), bias.detach().requires_grad_()
    y = fn(x, bias, approximate)
    return (y,) + torch.autograd.grad(y, (x, bias), dy.to(y.dtype))


# ----------------------------------------------------------------------------- twins and registration


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_public_function_equals_the_unfused_ops(seed, dtype, approximate):
    x, bias, _ = _inputs(6, 50, dtype)
    torch.testing.assert_close(bias_gelu(x, bias, approximate), F.gelu(x + bias, approximate=approximate))
    # an fp32 bias (autocast's Linear keeps it) does not promote the output
    assert bias_gelu(x, bias.float(), approximate).dtype == dtype


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_each_gelu_of_the_config_is_the_one_transformers_computes(seed, hidden_act):
    from transformers.activations import ACT2FN

    from fastbert.model import GELU_APPROXIMATE
    x = 3 * torch.randn(1000, dtype=torch.float64)
    torch.testing.assert_close(bg.bias_gelu_fwd_twin(x, torch.zeros(1000), GELU_APPROXIMATE[hidden_act]),
                               ACT2FN[hidden_act](x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_twin_gradient_formula_is_autograd_of_gelu(seed, approximate):
    z = (3 * torch.randn(2000, dtype=torch.float64)).requires_grad_()
    want, = torch.autograd.grad(F.gelu(z, approximate=approximate).sum(), z)
    torch.testing.assert_close(bg.gelu_grad(z.detach(), approximate), want, rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opcheck_cpu(seed, dtype, approximate):
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    bias = torch.randn(24, dtype=dtype, requires_grad=True)
    opcheck(torch.ops.fastbert.bias_gelu_fwd.default, (x, bias, approximate))
    opcheck(torch.ops.fastbert.bias_gelu_bwd.default, (torch.randn(3, 5, 24, dtype=dtype), x.detach(),
                                                       bias.detach(), approximate))


@needs_ext
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_registered_op_and_its_autograd_match_fp64(seed, approximate):
    x, bias, dy = _inputs(7, 33, torch.float32)
    got = _run(torch.ops.fastbert.bias_gelu_fwd, x, bias, dy, approximate)
    want = _run(bg.bias_gelu_twin, x.double(), bias.double(), dy.double(), approximate)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda x, b: bias_gelu(x.long(), b), TypeError, "x must have dtype"),
    (lambda x, b: bias_gelu(x, b[:-1]), ValueError, r"bias has shape \(49,\); expected \(50,\)"),
    (lambda x, b: bias_gelu(x, b[None]), ValueError, "bias must be 1-d"),
    (lambda x, b: bias_gelu(x, b, "erf"), ValueError, "approximate must be one of"),
    (lambda x, b: bias_gelu(x[:, :0], b[:0]), ValueError, "non-empty last dimension"),
    (lambda x, b: bias_gelu(x, b.tolist()), TypeError, "bias must be a torch.Tensor"),
])
def test_bad_input_is_a_clear_error(bad, exc, match):
    x, bias, _ = _inputs(4, 50, torch.float32)
    with pytest.raises(exc, match=match):
        bad(x, bias)


# ----------------------------------------------------------------------------- the kernel, emulated

# odd column counts take the scalar path, multiples of 8 the 16-byte one (4 fp32 or 8 half per access)
EMULATED_SHAPES = [(13, 37), (16, 72), (12, 8)]


@needs_ext
@needs_emulator
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", EMULATED_SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_emulated_kernel_within_tolerance_of_fp64(seed, order, dtype, rows, cols, approximate):
    """y, dx, dbias of the kernel: error against fp64 at most twice the same-dtype unfused ops'."""
    x, bias, dy = _inputs(rows, cols, dtype, contiguous=cols % 2 == 0)
    ref = _run(bg.bias_gelu_twin, x.double(), bias.double(), dy.double(), approximate)
    twin = _run(bg.bias_gelu_twin, x, bias, dy, approximate)
    with poisoned_outputs(), emulated(order=order, seed=seed):
        kern = _run(bias_gelu, x, bias, dy, approximate)
    for name, k, t, r in zip(("y", "dx", "dbias"), kern, twin, ref):
        result = compare(f"bias_gelu {name}", f"{rows}x{cols} {approximate} {order}", dtype, k, t, r)
        assert result.ok, result


@needs_ext
@needs_emulator
def test_emulated_backward_row_split_over_many_rows(seed):
    """More rows than the backward's row split (grid-stride over rows, several workspace rows) and
    a 3-d input: the kernel equals its twin."""
    from fastbert.ops import _emulator
    with _emulator.settings(arch=80):
        split = _emulator._num_partials("emu_bias_gelu_bwd_num_partials", 10 ** 6, 40, 0)  # the most it takes
    rows = 2 * (8 * split + 21)
    x, bias, dy = (torch.randn(rows // 2, 80).view(rows, 40), torch.randn(40), torch.randn(rows, 40))
    twin = _run(bg.bias_gelu_fwd_twin, x.view(-1, 2, 40), bias, dy.view(-1, 2, 40), "none")
    with emulated(order="warp", arch=80):
        kern = _run(bias_gelu, x.view(-1, 2, 40), bias, dy.view(-1, 2, 40), "none")
    for k, t in zip(kern, twin):
        torch.testing.assert_close(k, t, rtol=1e-5, atol=1e-4)


@needs_ext
@needs_emulator
def test_selfcheck_passes_on_the_emulated_kernel(monkeypatch):
    """`fastbert check`'s self-check, run here on the emulated kernel at small sizes: every case ok."""
    monkeypatch.setattr(bg, "SELFCHECK_SHAPES", ((1, 96), (7, 72), (5, 101)))
    with emulated(order="warp"):
        results = bg.selfcheck(torch.device("cpu"))
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_gpu_selfcheck():
    results = bg.selfcheck(torch.device("cuda"))
    bad = [r for r in results if not r.ok]
    assert not bad, bad


@needs_ext
@needs_emulator
@pytest.mark.parametrize("order", ["forward", "warp"])
@pytest.mark.parametrize("x_dtype, bias_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                 (torch.bfloat16, torch.float32)])
def test_emulated_dbias_is_written_in_the_bias_dtype(seed, order, x_dtype, bias_dtype):
    """The backward writes dbias (fp32 sums) in the bias's dtype, so autograd needs no cast op after
    it; the values are the twin's fp32 sums rounded once."""
    x, dy = torch.randn(70, 96, dtype=x_dtype), torch.randn(70, 96, dtype=x_dtype)
    bias = torch.randn(96, dtype=bias_dtype)
    with emulated(order=order, seed=seed):
        dx, dbias = torch.ops.fastbert.bias_gelu_bwd(dy, x, bias, "none")
    t_dx, t_dbias = bg.bias_gelu_bwd_twin(dy, x, bias, "none")
    assert dbias.dtype == bias_dtype and t_dbias.dtype == bias_dtype and dx.dtype == x_dtype
    torch.testing.assert_close(dbias.float(), t_dbias.float(), rtol=1e-2, atol=1e-2)
