"""embeddings_layernorm_dropout: y = dropout(LayerNorm(a + b + c)), BERT's embeddings (word +
token type + position) summed, normalized and dropped out in one kernel, forward and backward.

The kernel is the embeddings' mode of csrc/bias_dropout_residual_layernorm/ (the same row-in-
registers LayerNorm with fp32 statistics): h = a + b + c is rounded to the input dtype, written
out for the backward and normalized; the dropout acts on the normalized output with the Philox
rule of csrc/row_dropout.h (the twin's mask is `row_keep_mask`, bit for bit). The backward drops
out dy with the regenerated mask, then runs the LayerNorm backward; dh is the gradient of a, b
and c alike; dweight and dbias (fp32 column sums) are written in weight's dtype (fp32 without a
weight), so a bf16/fp16 LayerNorm gets its gradients in its own dtype with no cast op after them.

    torch.ops.fastbert.embeddings_layernorm_dropout_fwd(a, b, c?, weight?, bias?, eps, dropout_p, seed, offset)
        -> (y, h, mean, rstd)
    torch.ops.fastbert.embeddings_layernorm_dropout_bwd(dy, h, mean, rstd, weight?, dropout_p, seed, offset)
        -> (dh, dweight, dbias)
"""
import math

import torch
import torch.nn.functional as F

from fastbert import _backend, _validate
from fastbert.ops._kernel_params import kernel_params
from fastbert.ops.bias_dropout_residual_layernorm import MAX_KERNEL_HIDDEN, _draw_seed_offset, _dropped

_OP = "embeddings_layernorm_dropout"

# ----------------------------------------------------------------------------- twins


def embeddings_layernorm_dropout_fwd_twin(a, b, c, weight, bias, eps, dropout_p, seed, offset):
    """The registered forward in PyTorch (fp32 math, the kernel's mask), its CPU kernel."""
    dt = torch.promote_types(a.dtype, torch.float32)
    hidden = a.shape[-1]
    v = a.to(dt) + b.to(dt)
    if c is not None:
        v = v + c.to(dt)
    h = v.to(a.dtype).reshape(-1, hidden)
    hf = h.to(dt)
    mean = hf.mean(dim=1)
    rstd = torch.rsqrt(hf.var(dim=1, unbiased=False) + eps)
    y = (hf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    y = _dropped(y, dropout_p, seed, offset)
    return y.to(a.dtype).reshape(a.shape), h.reshape(a.shape), mean.float(), rstd.float()


def embeddings_layernorm_dropout_bwd_twin(dy, h, mean, rstd, weight, dropout_p, seed, offset):
    dt = torch.promote_types(h.dtype, torch.float32)
    hidden = h.shape[-1]
    hf = h.to(dt).reshape(-1, hidden)
    g = _dropped(dy.to(dt).reshape(-1, hidden), dropout_p, seed, offset)
    xhat = (hf - mean.to(dt)[:, None]) * rstd.to(dt)[:, None]
    wg = g * weight.to(dt) if weight is not None else g
    c1 = wg.mean(dim=1, keepdim=True)
    c2 = (wg * xhat).mean(dim=1, keepdim=True)
    dh = (wg - c1 - xhat * c2) * rstd.to(dt)[:, None]
    grad_dtype = weight.dtype if weight is not None else torch.float32  # fp32 sums written in weight's dtype
    return (dh.to(h.dtype).reshape(h.shape), (g * xhat).sum(dim=0).float().to(grad_dtype),
            g.sum(dim=0).float().to(grad_dtype))


def embeddings_layer_norm_dropout_twin(a, b, c, weight, bias, eps=1e-12, dropout_p=0.0, training=False):
    """What the unfused model computes: F.layer_norm(a + b + c), then F.dropout."""
    h = a + b if c is None else a + b + c
    return F.dropout(F.layer_norm(h, (h.shape[-1],), weight, bias, eps), p=dropout_p, training=training)


# ----------------------------------------------------------------------------- registration

if _backend.has_op(f"{_OP}_fwd"):
    torch.library.register_kernel(f"fastbert::{_OP}_fwd", "cpu",
                                  _backend.cpu_kernel(f"{_OP}_fwd", embeddings_layernorm_dropout_fwd_twin))
    torch.library.register_kernel(f"fastbert::{_OP}_bwd", "cpu",
                                  _backend.cpu_kernel(f"{_OP}_bwd", embeddings_layernorm_dropout_bwd_twin))

    @torch.library.register_fake(f"fastbert::{_OP}_fwd")
    def _fwd_fake(a, b, c, weight, bias, eps, dropout_p, seed, offset):
        rows = math.prod(a.shape[:-1])
        return (a.new_empty(a.shape), a.new_empty(a.shape), a.new_empty(rows, dtype=torch.float32),
                a.new_empty(rows, dtype=torch.float32))

    @torch.library.register_fake(f"fastbert::{_OP}_bwd")
    def _bwd_fake(dy, h, mean, rstd, weight, dropout_p, seed, offset):
        hidden = h.shape[-1]
        grad_dtype = weight.dtype if weight is not None else torch.float32
        return h.new_empty(h.shape), h.new_empty(hidden, dtype=grad_dtype), h.new_empty(hidden, dtype=grad_dtype)

    def _setup(ctx, inputs, output):
        a, b, c, weight, bias, eps, dropout_p, seed, offset = inputs
        _, h, mean, rstd = output
        ctx.mark_non_differentiable(h, mean, rstd)  # saved for the backward, not results to differentiate
        ctx.set_materialize_grads(False)
        ctx.has_c = c is not None
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (weight, bias))
        ctx.dropout = (dropout_p, seed, offset)
        ctx.save_for_backward(h, mean, rstd, weight)

    def _backward(ctx, dy, _dh, _dmean, _drstd):
        h, mean, rstd, weight = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        dh, dweight, dbias = torch.ops.fastbert.embeddings_layernorm_dropout_bwd(dy.contiguous(), h, mean, rstd,
                                                                                 weight, *ctx.dropout)
        weight_dt, bias_dt = ctx.dtypes  # the .to()s below: no op where the dtypes agree
        return (dh, dh, dh if ctx.has_c else None, dweight.to(weight_dt) if weight_dt is not None else None,
                dbias.to(bias_dt) if bias_dt is not None else None, None, None, None, None)

    torch.library.register_autograd(f"fastbert::{_OP}_fwd", _backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public API


def embeddings_layer_norm_dropout(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor, eps: float = 1e-12, dropout_p: float = 0.0,
                                  training: bool = False) -> torch.Tensor:
    """dropout(LayerNorm(a + b + c)) over the last dimension (c may be None); dropout only when
    training. The fused kernel runs on CUDA (or under the emulator) when a, b, c share one dtype;
    the unfused PyTorch ops otherwise."""
    _validate.tensor("a", a, dtypes=_validate.FLOAT_DTYPES)
    if a.dim() == 0 or a.shape[-1] == 0:
        raise ValueError(f"a must have a non-empty last dimension (the one normalized), got shape {tuple(a.shape)}")
    for name, t in (("b", b), ("c", c)):
        if t is not None:
            _validate.tensor(name, t, dtypes=_validate.FLOAT_DTYPES, device=a.device)
            if t.shape != a.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected the shape of a, {tuple(a.shape)}")
    hidden = a.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _validate.tensor(name, p, dtypes=_validate.FLOAT_DTYPES, device=a.device)
            if tuple(p.shape) != (hidden,):
                raise ValueError(f"{name} has shape {tuple(p.shape)}; expected ({hidden},)")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    p = float(dropout_p) if training else 0.0
    same_dtype = b.dtype == a.dtype and (c is None or c.dtype == a.dtype)
    tensors = [t for t in (a, b, c, weight, bias) if t is not None]
    if same_dtype and hidden <= MAX_KERNEL_HIDDEN and _backend.use_kernel(f"{_OP}_fwd", *tensors):
        seed, offset = _draw_seed_offset() if p > 0.0 else (0, 0)
        weight, bias = kernel_params(weight, bias)  # bf16/fp16 ones without a gradient: fp32 once, not per call
        return torch.ops.fastbert.embeddings_layernorm_dropout_fwd(a, b, c, weight, bias, float(eps), p, seed,
                                                                   offset)[0]
    return embeddings_layer_norm_dropout_twin(a, b, c, weight, bias, eps, p, p > 0.0)


# ----------------------------------------------------------------------------- self-check

SELFCHECK_SHAPES = ((1, 96), (7, 384), (1000, 768), (33, 1000), (5, 1001))


def selfcheck(device):
    """Kernel vs same-dtype twin vs fp64 reference on fresh random inputs (fastbert/ops/_check.py):
    y, da (= db = dc), dweight, dbias, dropout 0 and 0.1 (reference and twin take the kernel's mask)."""
    from fastbert.ops._check import compare, poisoned_outputs
    from fastbert.ops.bias_dropout_residual_layernorm import row_keep_mask

    results = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, hidden in SELFCHECK_SHAPES:
            for dropout_p in (0.0, 0.1):
                a = torch.randn(rows, hidden + 3, device=device, dtype=dtype)[:, 1:hidden + 1]  # non-contiguous
                b, c = (torch.randn(rows, hidden, device=device, dtype=dtype) for _ in range(2))
                weight = 1 + 0.5 * torch.randn(hidden, device=device, dtype=dtype)
                bias = torch.randn(hidden, device=device, dtype=dtype)
                dy = torch.randn(rows, hidden, device=device, dtype=dtype)
                seed, offset = _draw_seed_offset()
                keep = row_keep_mask(rows, hidden, dropout_p, seed, offset, device)

                def unfused(a, b, c, weight, bias):  # the twin, with the kernel's mask
                    y = F.layer_norm(a + b + c, (hidden,), weight, bias, 1e-12)
                    return y * keep / (1 - dropout_p) if dropout_p > 0 else y

                def fused(a, b, c, weight, bias):
                    return torch.ops.fastbert.embeddings_layernorm_dropout_fwd(a, b, c, weight, bias, 1e-12,
                                                                               dropout_p, seed, offset)[0]

                def run(fn, *inputs):
                    leaves = [t.detach().requires_grad_() for t in inputs]
                    y = fn(*leaves)
                    return (y,) + torch.autograd.grad(y, leaves, dy.to(y.dtype))

                inputs = (a, b, c, weight, bias)
                ref = run(unfused, *(t.double() for t in inputs))
                with poisoned_outputs(), _backend.kernels(True):
                    kern = run(fused, *inputs)
                twin = run(unfused, *inputs)
                case = f"rows={rows} hidden={hidden} dropout={dropout_p}"
                for name, k, t, r in zip(("y", "da", "db", "dc", "dweight", "dbias"), kern, twin, ref):
                    results.append(compare(f"{_OP} {name}", case, dtype, k, t, r))
    return results
