"""attention: BERT's bidirectional multi-head self-attention, softmax(q kᵀ·scale + mask)·v.

The public entry takes a padded batch q, k, v of shape [batch, seq, heads, head_dim] and a key
padding mask [batch, seq] (1 = token, 0 = padding). The twin below is the reference and the
path transformers' eager attention takes: an additive mask of the dtype's minimum, so a fully
padded row stays finite, then softmax and dropout on the probabilities.
"""
import math

import torch
import torch.nn.functional as F

from fastbert import _validate


def additive_mask(attention_mask, dtype):
    """[batch, seq] of 1/0 to the [batch, 1, 1, seq] additive mask transformers uses."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def attention_twin(q, k, v, attention_mask=None, dropout_p=0.0, scale=None, training=False):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attention_mask is not None:
        scores = scores + additive_mask(attention_mask, scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return torch.matmul(probs, v).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor = None, *,
              dropout_p: float = 0.0, scale: float = None, training: bool = False) -> torch.Tensor:
    """Self-attention of a padded batch: q, k, v [batch, seq, heads, head_dim] -> same shape."""
    _validate.tensor("q", q, ndim=4, dtypes=_validate.FLOAT_DTYPES)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(q.shape[:2]):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(q.shape[:2])}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return attention_twin(q, k, v, attention_mask, dropout_p, scale, training)
