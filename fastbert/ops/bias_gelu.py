"""bias_gelu: y = gelu(x + bias), the bias add and activation after BERT's intermediate matmul,
fused into one pass over the [tokens, intermediate] activation (forward and backward).

`approximate` is F.gelu's: "none" is the exact erf GELU of BERT (transformers' hidden_act
"gelu"), "tanh" the tanh approximation ("gelu_new", "gelu_pytorch_tanh"). The CUDA kernel
(csrc/bias_gelu/) computes in fp32 and rounds once; its backward recomputes gelu'(x + bias) from
x (nothing else is saved) and gives dbias as the fp32 row sum of dx, written in the bias's dtype
(no cast op after it), so the matmul before it
runs without its bias. cuBLASLt's GELU epilogue (torch._addmm_activation(..., use_gelu=True))
would fuse the matmul too, but it computes the tanh approximation only, and BERT is trained
with erf: the kernel serves both.

    torch.ops.fastbert.bias_gelu_fwd(x, bias, approximate) -> y
    torch.ops.fastbert.bias_gelu_bwd(dy, x, bias, approximate) -> (dx, dbias in bias's dtype)
"""
import math

import torch
import torch.nn.functional as F

from fastbert import _backend, _validate
from fastbert.ops._kernel_params import kernel_params

APPROXIMATE = ("none", "tanh")  # the model maps a config's hidden_act onto these (model.GELU_APPROXIMATE)

# ----------------------------------------------------------------------------- twins


def _compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def bias_gelu_fwd_twin(x, bias, approximate):
    """The registered forward in PyTorch (fp32 math, one rounding), the CPU kernel of bias_gelu_fwd."""
    dt = _compute_dtype(x)
    return F.gelu(x.to(dt) + bias.to(dt), approximate=approximate).to(x.dtype)


def gelu_grad(z, approximate):
    """d gelu(z) / dz, written out as the kernel computes it."""
    if approximate == "none":
        return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    k = math.sqrt(2.0 / math.pi)
    t = torch.tanh(k * (z + 0.044715 * z * z * z))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * z * z)


def bias_gelu_bwd_twin(dy, x, bias, approximate):
    dt = _compute_dtype(x)
    cols = x.shape[-1]
    dx = dy.to(dt) * gelu_grad(x.to(dt) + bias.to(dt), approximate)
    return dx.to(x.dtype), dx.reshape(-1, cols).sum(dim=0).float().to(bias.dtype)  # fp32 sums, bias's dtype


def bias_gelu_twin(x, bias, approximate="none"):
    """What the unfused model computes: the bias add in x's dtype, then F.gelu."""
    return F.gelu(x + bias.to(x.dtype), approximate=approximate)


# ----------------------------------------------------------------------------- registration

if _backend.has_op("bias_gelu_fwd"):
    torch.library.register_kernel("fastbert::bias_gelu_fwd", "cpu", _backend.cpu_kernel("bias_gelu_fwd",
                                                                                      bias_gelu_fwd_twin))
    torch.library.register_kernel("fastbert::bias_gelu_bwd", "cpu", _backend.cpu_kernel("bias_gelu_bwd",
                                                                                      bias_gelu_bwd_twin))

    @torch.library.register_fake("fastbert::bias_gelu_fwd")
    def _bias_gelu_fwd_fake(x, bias, approximate):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastbert::bias_gelu_bwd")
    def _bias_gelu_bwd_fake(dy, x, bias, approximate):
        return x.new_empty(x.shape), x.new_empty(x.shape[-1], dtype=bias.dtype)

    def _bias_gelu_setup(ctx, inputs, output):
        x, bias, approximate = inputs
        ctx.approximate = approximate
        ctx.bias_dtype = bias.dtype
        ctx.save_for_backward(x, bias)

    def _bias_gelu_backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, dbias = torch.ops.fastbert.bias_gelu_bwd(dy.contiguous(), x, bias, ctx.approximate)
        return dx, dbias.to(ctx.bias_dtype), None  # no op when the build writes the bias's dtype

    torch.library.register_autograd("fastbert::bias_gelu_fwd", _bias_gelu_backward, setup_context=_bias_gelu_setup)


# ----------------------------------------------------------------------------- public API


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias) over the last dimension of x, as F.gelu(x + bias, approximate=approximate).

    x: [..., cols] float32/float16/bfloat16; bias: [cols]. The output has x's dtype whatever
    bias's dtype is (the bias of an autocast matmul's fp32 Linear). The fused kernel runs on CUDA
    (or under the kernel emulator); the unfused PyTorch ops otherwise.
    """
    _validate.tensor("x", x, dtypes=_validate.FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension (the one bias is added along), got shape "
                         f"{tuple(x.shape)}")
    _validate.tensor("bias", bias, ndim=1, dtypes=_validate.FLOAT_DTYPES, device=x.device)
    if bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({x.shape[-1]},), the last dimension of x")
    if approximate not in APPROXIMATE:
        raise ValueError(f"approximate must be one of {APPROXIMATE} (as F.gelu), got {approximate!r}")
    if _backend.use_kernel("bias_gelu_fwd", x, bias):
        bias, = kernel_params(bias)  # a bf16/fp16 one without a gradient: fp32 once, not per call
        return torch.ops.fastbert.bias_gelu_fwd(x, bias, approximate)
    return bias_gelu_twin(x, bias, approximate)


# ----------------------------------------------------------------------------- self-check

SELFCHECK_SHAPES = ((1, 96), (7, 3072), (513, 3072), (33, 1000), (5, 1001))


def selfcheck(device):
    """Kernel vs same-dtype twin vs fp64 reference on fresh random inputs (fastbert/ops/_check.py):
    y, dx, dbias for both GELU kinds, non-contiguous x, odd and vector-friendly sizes."""
    from fastbert.ops._check import compare, poisoned_outputs

    results = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, cols in SELFCHECK_SHAPES:
            for approximate in APPROXIMATE:
                x = 2 * torch.randn(rows, cols + 3, device=device, dtype=dtype)[:, 1:cols + 1]  # non-contiguous
                bias = torch.randn(cols, device=device, dtype=dtype)
                dy = torch.randn(rows, cols, device=device, dtype=dtype)

                def run(fn, x, bias, dy):
                    x, bias = x.detach().requires_grad_(), bias.detach().requires_grad_()
                    y = fn(x, bias, approximate)
                    return (y,) + torch.autograd.grad(y, (x, bias), dy)

                ref = run(bias_gelu_twin, x.double(), bias.double(), dy.double())
                with poisoned_outputs(), _backend.kernels(True):
                    kern = run(bias_gelu, x, bias, dy)
                with _backend.kernels(False):
                    twin = run(bias_gelu, x, bias, dy)
                case = f"rows={rows} cols={cols} approximate={approximate}"
                for name, k, t, r in zip(("bias_gelu", "bias_gelu dx", "bias_gelu dbias"), kern, twin, ref):
                    results.append(compare(name, case, dtype, k, t, r))
    return results
