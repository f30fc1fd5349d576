"""bias_dropout_residual_layernorm: y = LayerNorm(dropout(x + bias) + residual), the tail of each
post-LN block of BERT (after the attention output dense and after the feed-forward output dense),
as one kernel forward and one backward instead of a bias add, a dropout, an add and a LayerNorm.

The dense layer runs without its bias; the kernel (csrc/bias_dropout_residual_layernorm/) adds it,
drops out with Philox4x32-10 counter-based bits (csrc/row_dropout.h: element (row, col) is kept
iff philox({col / 4, row, 0, offset}, seed)[col % 4] < (1 - p) 2^32), adds the residual, rounds
the sum h to the input dtype and normalizes it with fp32 statistics. The backward regenerates
the mask from (seed, offset) and gives dx, dresidual, and the fp32 column sums dweight,
dln_bias and dbias, written in weight's dtype (fp32 without a weight): in a model whose LayerNorm
and bias share a dtype, no cast op follows. `row_keep_mask` below computes the same mask on the host, bit for bit.

    torch.ops.fastbert.bias_dropout_residual_layernorm_fwd(x, bias?, residual, weight?, ln_bias?, eps,
                                                           dropout_p, seed, offset) -> (y, h, mean, rstd)
    torch.ops.fastbert.bias_dropout_residual_layernorm_bwd(dy, h, mean, rstd, weight?, dropout_p, seed,
                                                           offset) -> (dx, dresidual, dweight, dln_bias, dbias)

seed and offset are drawn from torch's default CPU generator, so torch.manual_seed makes a run
reproducible (as the attention kernel's dropout).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from fastbert import _backend, _validate
from fastbert.ops._kernel_params import kernel_params
from fastbert.ops.attention import keep_threshold, philox4x32_10

MAX_KERNEL_HIDDEN = 4096  # csrc/bias_dropout_residual_layernorm/bias_dropout_residual_layernorm.h: kBdrlnMaxHidden

# ----------------------------------------------------------------------------- twins


def row_keep_mask(rows, hidden, dropout_p, seed, offset, device="cpu"):
    """The kernel's keep mask for a [rows, hidden] activation: bool [rows, hidden] (all True at p = 0)."""
    if dropout_p <= 0.0:
        return torch.ones((rows, hidden), dtype=torch.bool, device=device)
    quads = (hidden + 3) // 4
    c0, c1 = np.meshgrid(np.arange(quads, dtype=np.uint64), np.arange(rows, dtype=np.uint64), indexing="xy")
    words = philox4x32_10(c0, c1, 0, offset & 0xFFFFFFFF, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    bits = np.stack(words, axis=-1).reshape(rows, quads * 4)[:, :hidden]  # [row][col]: word col % 4 of quad col / 4
    keep = bits < np.uint64(keep_threshold(dropout_p))
    return torch.from_numpy(keep).to(device)


def _keep_scale(dropout_p):
    return float(np.float32(1.0 / (1.0 - dropout_p)))  # the kernel's fp32 1 / (1 - p)


def _dropped(v, dropout_p, seed, offset):
    """v [rows, hidden] with the kernel's dropout applied (kept values scaled by 1 / (1 - p))."""
    if dropout_p <= 0.0:
        return v
    keep = row_keep_mask(v.shape[0], v.shape[1], dropout_p, seed, offset, v.device)
    return torch.where(keep, v * _keep_scale(dropout_p), torch.zeros((), dtype=v.dtype, device=v.device))


def bias_dropout_residual_layernorm_fwd_twin(x, bias, residual, weight, ln_bias, eps, dropout_p, seed, offset):
    """The registered forward in PyTorch (fp32 math, the kernel's mask), its CPU kernel."""
    dt = torch.promote_types(x.dtype, torch.float32)
    hidden = x.shape[-1]
    v = x.to(dt).reshape(-1, hidden)
    if bias is not None:
        v = v + bias.to(dt)
    h = (_dropped(v, dropout_p, seed, offset) + residual.to(dt).reshape(-1, hidden)).to(x.dtype)
    hf = h.to(dt)
    mean = hf.mean(dim=1)
    rstd = torch.rsqrt(hf.var(dim=1, unbiased=False) + eps)
    y = (hf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(dt)
    if ln_bias is not None:
        y = y + ln_bias.to(dt)
    return y.to(x.dtype).reshape(x.shape), h.reshape(x.shape), mean.float(), rstd.float()


def bias_dropout_residual_layernorm_bwd_twin(dy, h, mean, rstd, weight, dropout_p, seed, offset):
    dt = torch.promote_types(h.dtype, torch.float32)
    hidden = h.shape[-1]
    hf = h.to(dt).reshape(-1, hidden)
    g = dy.to(dt).reshape(-1, hidden)
    xhat = (hf - mean.to(dt)[:, None]) * rstd.to(dt)[:, None]
    wdy = g * weight.to(dt) if weight is not None else g
    c1 = wdy.mean(dim=1, keepdim=True)
    c2 = (wdy * xhat).mean(dim=1, keepdim=True)
    dres = (wdy - c1 - xhat * c2) * rstd.to(dt)[:, None]
    dx = _dropped(dres, dropout_p, seed, offset) if dropout_p > 0.0 else dres.clone()  # two outputs, no alias
    grad_dtype = weight.dtype if weight is not None else torch.float32  # fp32 sums written in weight's dtype
    sums = ((g * xhat).sum(dim=0), g.sum(dim=0), dx.sum(dim=0))
    return (dx.to(h.dtype).reshape(h.shape), dres.to(h.dtype).reshape(h.shape),
            *(s.float().to(grad_dtype) for s in sums))


def bias_dropout_residual_layer_norm_twin(x, bias, residual, weight, ln_bias, eps=1e-12, dropout_p=0.0,
                                          training=False):
    """What the unfused model computes: F.dropout(x + bias) + residual, then F.layer_norm."""
    h = x + bias.to(x.dtype) if bias is not None else x
    h = F.dropout(h, p=dropout_p, training=training) + residual
    return F.layer_norm(h, (h.shape[-1],), weight, ln_bias, eps)


# ----------------------------------------------------------------------------- registration

_OP = "bias_dropout_residual_layernorm"

if _backend.has_op(f"{_OP}_fwd"):
    torch.library.register_kernel(f"fastbert::{_OP}_fwd", "cpu",
                                  _backend.cpu_kernel(f"{_OP}_fwd", bias_dropout_residual_layernorm_fwd_twin))
    torch.library.register_kernel(f"fastbert::{_OP}_bwd", "cpu",
                                  _backend.cpu_kernel(f"{_OP}_bwd", bias_dropout_residual_layernorm_bwd_twin))

    @torch.library.register_fake(f"fastbert::{_OP}_fwd")
    def _fwd_fake(x, bias, residual, weight, ln_bias, eps, dropout_p, seed, offset):
        rows = math.prod(x.shape[:-1])
        return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(rows, dtype=torch.float32),
                x.new_empty(rows, dtype=torch.float32))

    @torch.library.register_fake(f"fastbert::{_OP}_bwd")
    def _bwd_fake(dy, h, mean, rstd, weight, dropout_p, seed, offset):
        hidden = h.shape[-1]
        grad_dtype = weight.dtype if weight is not None else torch.float32
        return (h.new_empty(h.shape), h.new_empty(h.shape), *(h.new_empty(hidden, dtype=grad_dtype)
                                                              for _ in range(3)))

    def _setup(ctx, inputs, output):
        x, bias, residual, weight, ln_bias, eps, dropout_p, seed, offset = inputs
        _, h, mean, rstd = output
        ctx.mark_non_differentiable(h, mean, rstd)  # saved for the backward, not results to differentiate
        ctx.set_materialize_grads(False)
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (bias, weight, ln_bias))
        ctx.dropout = (dropout_p, seed, offset)
        ctx.save_for_backward(h, mean, rstd, weight)

    def _backward(ctx, dy, _dh, _dmean, _drstd):
        h, mean, rstd, weight = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        dx, dres, dweight, dln_bias, dbias = torch.ops.fastbert.bias_dropout_residual_layernorm_bwd(
            dy.contiguous(), h, mean, rstd, weight, *ctx.dropout)
        bias_dt, weight_dt, ln_bias_dt = ctx.dtypes  # the .to()s below: no op where the dtypes agree
        return (dx, dbias.to(bias_dt) if bias_dt is not None else None, dres,
                dweight.to(weight_dt) if weight_dt is not None else None,
                dln_bias.to(ln_bias_dt) if ln_bias_dt is not None else None, None, None, None, None)

    torch.library.register_autograd(f"fastbert::{_OP}_fwd", _backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public API


def _draw_seed_offset():
    seed, offset = torch.randint(0, 2 ** 31 - 1, (2,)).tolist()  # default CPU generator: torch.manual_seed
    return seed, offset


def bias_dropout_residual_layer_norm(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                                     weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-12,
                                     dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """LayerNorm(dropout(x + bias) + residual) over the last dimension, with LayerNorm's weight and
    ln_bias; dropout only when training. bias, weight and ln_bias may be None.

    On the fused kernel (CUDA, or the emulator) the dropout mask comes from Philox (see the module
    docstring); the PyTorch fallback uses F.dropout. The output has the dtype of x + residual.
    """
    _validate.tensor("x", x, dtypes=_validate.FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension (the one normalized), got shape {tuple(x.shape)}")
    _validate.tensor("residual", residual, dtypes=_validate.FLOAT_DTYPES, device=x.device)
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}; expected the shape of x, {tuple(x.shape)}")
    hidden = x.shape[-1]
    for name, p in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        if p is not None:
            _validate.tensor(name, p, dtypes=_validate.FLOAT_DTYPES, device=x.device)
            if tuple(p.shape) != (hidden,):
                raise ValueError(f"{name} has shape {tuple(p.shape)}; expected ({hidden},)")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    p = float(dropout_p) if training else 0.0
    params = [t for t in (bias, weight, ln_bias) if t is not None]
    if hidden <= MAX_KERNEL_HIDDEN and _backend.use_kernel(f"{_OP}_fwd", x, residual, *params):
        if residual.dtype != x.dtype:  # the promotion `x + residual` would do
            dtype = torch.promote_types(x.dtype, residual.dtype)
            x, residual = x.to(dtype), residual.to(dtype)
        seed, offset = _draw_seed_offset() if p > 0.0 else (0, 0)
        bias, weight, ln_bias = kernel_params(bias, weight, ln_bias)  # bf16/fp16 without a gradient: fp32 once
        return torch.ops.fastbert.bias_dropout_residual_layernorm_fwd(x, bias, residual, weight, ln_bias, float(eps),
                                                                      p, seed, offset)[0]
    return bias_dropout_residual_layer_norm_twin(x, bias, residual, weight, ln_bias, eps, p, p > 0.0)


# ----------------------------------------------------------------------------- self-check

SELFCHECK_SHAPES = ((1, 96), (7, 384), (1000, 768), (33, 1000), (5, 1001), (64, 4096))


def selfcheck(device):
    """Kernel vs same-dtype twin vs fp64 reference on fresh random inputs (fastbert/ops/_check.py):
    y, dx, dresidual, dweight, dln_bias, dbias, dropout 0 and 0.1 (the reference and the twin take
    the kernel's mask), non-contiguous x."""
    from fastbert.ops._check import compare, poisoned_outputs

    results = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, hidden in SELFCHECK_SHAPES:
            for dropout_p in (0.0, 0.1):
                x = torch.randn(rows, hidden + 3, device=device, dtype=dtype)[:, 1:hidden + 1]  # non-contiguous
                residual = torch.randn(rows, hidden, device=device, dtype=dtype)
                bias, ln_bias = (torch.randn(hidden, device=device, dtype=dtype) for _ in range(2))
                weight = 1 + 0.5 * torch.randn(hidden, device=device, dtype=dtype)
                dy = torch.randn(rows, hidden, device=device, dtype=dtype)
                seed, offset = _draw_seed_offset()
                keep = row_keep_mask(rows, hidden, dropout_p, seed, offset, device)

                def unfused(x, bias, residual, weight, ln_bias):  # the twin, with the kernel's mask
                    v = x + bias
                    if dropout_p > 0:
                        v = v * keep / (1 - dropout_p)
                    return F.layer_norm(v + residual, (hidden,), weight, ln_bias, 1e-12)

                def fused(x, bias, residual, weight, ln_bias):
                    return torch.ops.fastbert.bias_dropout_residual_layernorm_fwd(
                        x, bias, residual, weight, ln_bias, 1e-12, dropout_p, seed, offset)[0]

                def run(fn, *inputs):
                    leaves = [t.detach().requires_grad_() for t in inputs]
                    y = fn(*leaves)
                    return (y,) + torch.autograd.grad(y, leaves, dy.to(y.dtype))

                inputs = (x, bias, residual, weight, ln_bias)
                ref = run(unfused, *(t.double() for t in inputs))
                with poisoned_outputs(), _backend.kernels(True):
                    kern = run(fused, *inputs)
                twin = run(unfused, *inputs)
                case = f"rows={rows} hidden={hidden} dropout={dropout_p}"
                names = ("y", "dx", "dbias", "dresidual", "dweight", "dln_bias")
                for name, k, t, r in zip(names, kern, twin, ref):
                    results.append(compare(f"{_OP} {name}", case, dtype, k, t, r))
    return results
