"""Sentence vectors from token vectors, with padding excluded (as sentence-transformers)."""
import torch

from fastbert import _validate

MODES = ("mean", "max", "cls")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor = None, mode: str = "mean") -> torch.Tensor:
    """hidden [batch, seq, dim] and attention_mask [batch, seq] (1 = token) -> [batch, dim].

    mean: average of the real tokens; max: elementwise max over them; cls: the first token.
    """
    _validate.tensor("hidden", hidden, ndim=3, dtypes=_validate.FLOAT_DTYPES)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(hidden.shape[:2])}")
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    filled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min)
    return filled.max(dim=1).values
