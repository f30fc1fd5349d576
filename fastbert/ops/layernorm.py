"""layernorm: y = LayerNorm(x + residual) over the last dimension (residual optional).

The post-LN blocks of BERT add the sublayer output to its input and normalize; fusing the add
into the norm saves a read and a write of [tokens, hidden]. The CUDA kernel (csrc/layernorm/)
keeps mean and rstd in fp32 for fp16/bf16 inputs; the twin below is the reference.
"""
import torch
import torch.nn.functional as F

from fastbert import _validate


def layer_norm_twin(x, weight, bias, eps, residual=None):
    h = x if residual is None else x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12,
               residual: torch.Tensor = None) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dimension, or LayerNorm(x) without a residual."""
    _validate.tensor("x", x, dtypes=_validate.FLOAT_DTYPES)
    hidden = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}; expected the shape of x, {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (hidden,):
            raise ValueError(f"{name} has shape {tuple(p.shape)}; expected ({hidden},)")
    return layer_norm_twin(x, weight, bias, eps, residual)
