"""layernorm: y = LayerNorm(x + residual) over the last dimension (residual optional).

The post-LN blocks of BERT add the sublayer output to its input and normalize; fusing the add
into the norm saves a read and a write of [tokens, hidden]. The CUDA kernel (csrc/layernorm/)
keeps mean and rstd in fp32 for fp16/bf16 inputs and returns what the backward needs: the sum
x + residual (in x's dtype), mean and rstd. Its backward gives dx (= d residual), dweight and
dbias, the latter two by a two-stage reduction over rows. The twins below are the reference
and the CPU implementation of the registered ops.

    torch.ops.fastbert.layernorm_fwd(x, residual?, weight?, bias?, eps) -> (y, sum, mean, rstd)
    torch.ops.fastbert.layernorm_bwd(dy, h, mean, rstd, weight?) -> (dx, dweight, dbias)

`sum` is empty without a residual (h is then x itself); mean and rstd are fp32 [rows];
dweight and dbias are fp32 [hidden].
"""
import math

import torch
import torch.nn.functional as F

from fastbert import _backend, _validate
from fastbert.ops._kernel_params import kernel_params

MAX_KERNEL_HIDDEN = 8192  # csrc/layernorm/layernorm.h: kLayerNormMaxHidden

# ----------------------------------------------------------------------------- twins


def layer_norm_twin(x, weight, bias, eps, residual=None):
    h = x if residual is None else x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def layernorm_fwd_twin(x, residual, weight, bias, eps):
    """The registered forward in PyTorch (fp32 statistics), the CPU kernel of layernorm_fwd."""
    h = x if residual is None else x + residual
    hf = h.float().reshape(-1, h.shape[-1])
    mean = hf.mean(dim=1)
    rstd = torch.rsqrt(hf.var(dim=1, unbiased=False) + eps)
    y = (hf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    total = h if residual is not None else x.new_empty(0)
    return y.to(x.dtype).reshape(x.shape), total, mean, rstd


def layernorm_bwd_twin(dy, h, mean, rstd, weight):
    hf = h.float().reshape(-1, h.shape[-1])
    g = dy.float().reshape(-1, h.shape[-1])
    xhat = (hf - mean[:, None]) * rstd[:, None]
    wdy = g * weight.float() if weight is not None else g
    c1 = wdy.mean(dim=1, keepdim=True)
    c2 = (wdy * xhat).mean(dim=1, keepdim=True)
    dx = (wdy - c1 - xhat * c2) * rstd[:, None]
    return dx.to(h.dtype).reshape(h.shape), (g * xhat).sum(dim=0), g.sum(dim=0)


# ----------------------------------------------------------------------------- registration

if _backend.has_op("layernorm_fwd"):
    torch.library.register_kernel("fastbert::layernorm_fwd", "cpu",
                                  _backend.cpu_kernel("layernorm_fwd", layernorm_fwd_twin))
    torch.library.register_kernel("fastbert::layernorm_bwd", "cpu",
                                  _backend.cpu_kernel("layernorm_bwd", layernorm_bwd_twin))

    @torch.library.register_fake("fastbert::layernorm_fwd")
    def _layernorm_fwd_fake(x, residual, weight, bias, eps):
        rows = math.prod(x.shape[:-1])
        total = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
        stats = dict(dtype=torch.float32)
        return x.new_empty(x.shape), total, x.new_empty(rows, **stats), x.new_empty(rows, **stats)

    @torch.library.register_fake("fastbert::layernorm_bwd")
    def _layernorm_bwd_fake(dy, h, mean, rstd, weight):
        hidden = h.shape[-1]
        return h.new_empty(h.shape), h.new_empty(hidden, dtype=torch.float32), h.new_empty(hidden, dtype=torch.float32)

    def _layernorm_setup(ctx, inputs, output):
        x, residual, weight, bias, eps = inputs
        _, total, mean, rstd = output
        ctx.set_materialize_grads(False)  # unused outputs (sum, mean, rstd) give None, not zeros to add
        ctx.has_residual = residual is not None
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(total if residual is not None else x, mean, rstd, weight)

    def _layernorm_backward(ctx, dy, dsum, dmean, drstd):
        # mean and rstd are statistics for the backward: their gradients are not propagated.
        h, mean, rstd, weight = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        dx, dweight, dbias = torch.ops.fastbert.layernorm_bwd(dy, h, mean, rstd, weight)
        if dsum is not None and ctx.has_residual:
            dx = dx + dsum
        return (dx, dx if ctx.has_residual else None,
                dweight.to(ctx.weight_dtype) if weight is not None else None,
                dbias.to(ctx.bias_dtype) if ctx.has_bias else None, None)

    torch.library.register_autograd("fastbert::layernorm_fwd", _layernorm_backward, setup_context=_layernorm_setup)
    # Autocast as for F.layer_norm (the twin): CUDA autocast runs it in fp32 (inputs cast, fp32 out, as
    # transformers' LayerNorm gives under autocast); CPU autocast leaves it in the inputs' dtype.
    torch.library.register_autocast("fastbert::layernorm_fwd", "cuda", torch.float32)


# ----------------------------------------------------------------------------- public API


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12,
               residual: torch.Tensor = None) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dimension, or LayerNorm(x) without a residual.

    On CUDA with the kernel built, the output has x's dtype (after promotion with residual's)
    whatever weight's dtype is, and fp32 under CUDA autocast, as F.layer_norm; statistics are fp32.
    """
    _validate.tensor("x", x, dtypes=_validate.FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (the one normalized), got a 0-d tensor")
    hidden = x.shape[-1]
    if residual is not None:
        _validate.tensor("residual", residual, dtypes=_validate.FLOAT_DTYPES, device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; expected the shape of x, {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _validate.tensor(name, p, dtypes=_validate.FLOAT_DTYPES, device=x.device)
            if tuple(p.shape) != (hidden,):
                raise ValueError(f"{name} has shape {tuple(p.shape)}; expected ({hidden},)")
    params = [t for t in (residual, weight, bias) if t is not None]
    if 0 < hidden <= MAX_KERNEL_HIDDEN and _backend.use_kernel("layernorm_fwd", x, *params):
        if residual is not None and residual.dtype != x.dtype:  # the promotion `x + residual` would do
            dtype = torch.promote_types(x.dtype, residual.dtype)
            x, residual = x.to(dtype), residual.to(dtype)
        weight, bias = kernel_params(weight, bias)  # bf16/fp16 ones without a gradient: fp32 once, not per call
        return torch.ops.fastbert.layernorm_fwd(x, residual, weight, bias, float(eps))[0]
    return layer_norm_twin(x, weight, bias, eps, residual)


# ----------------------------------------------------------------------------- self-check

SELFCHECK_SHAPES = ((1, 96), (7, 384), (1000, 768), (33, 1000), (5, 1001), (64, 4096))


def selfcheck(device):
    """Kernel vs twin vs fp64 reference on fresh random inputs (see fastbert/ops/_check.py):
    y, dx (= d residual), dweight, dbias, with and without a residual, non-contiguous x."""
    from fastbert.ops._check import compare, poisoned_outputs

    results = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, hidden in SELFCHECK_SHAPES:
            for with_residual in (True, False):
                base = torch.randn(rows, hidden + 3, device=device, dtype=dtype)
                x = base[:, 1:hidden + 1]  # non-contiguous rows
                residual = torch.randn(rows, hidden, device=device, dtype=dtype) if with_residual else None
                weight = 1 + 0.5 * torch.randn(hidden, device=device, dtype=dtype)
                bias = torch.randn(hidden, device=device, dtype=dtype)
                dy = torch.randn(rows, hidden, device=device, dtype=dtype)

                def run(fn, x, residual, weight, bias, dy):
                    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
                    r = residual.detach().requires_grad_() if residual is not None else None
                    y = fn(leaves[0], leaves[1], leaves[2], 1e-12, residual=r)
                    grads = torch.autograd.grad(y, leaves + ([r] if r is not None else []), dy)
                    return (y,) + tuple(grads)

                inputs = (x, residual, weight, bias, dy)
                ref = run(layer_norm_twin, *(t.double() if t is not None else None for t in inputs))
                with poisoned_outputs():
                    with _backend.kernels(True):
                        kern = run(layer_norm, *inputs)
                with _backend.kernels(False):
                    twin = run(layer_norm, *inputs)
                case = f"rows={rows} hidden={hidden}" + (" +residual" if with_residual else "")
                names = ("layernorm", "layernorm dx", "layernorm dweight", "layernorm dbias", "layernorm dres")
                for name, k, t, r in zip(names, kern, twin, ref):
                    results.append(compare(name, case, dtype, k, t, r))
    return results
