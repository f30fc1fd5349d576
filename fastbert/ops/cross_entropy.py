"""cross_entropy: mean softmax cross-entropy over the rows whose label is not ignore_index.

Used by the MLM head (on the labelled positions only) and the NSP head. A batch with no
counted row gives 0, not NaN. The CUDA kernel (csrc/cross_entropy/) reads the logits once for
the loss and once for the gradient, in fp32 math whatever the logits' dtype.
"""
import torch
import torch.nn.functional as F

from fastbert import _validate


def cross_entropy_twin(logits, labels, ignore_index=-100):
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum()
    return total / count.clamp(min=1).to(total.dtype)



def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                  inplace_backward: bool = False, check: bool = True) -> torch.Tensor:
    """Mean cross-entropy of logits [rows, classes] against labels [rows] (ignore_index skipped).

    inplace_backward=True lets the kernel write the gradient over the logits (no second
    [rows, classes] buffer); the logits must not be used after the backward then.
    """
    _validate.tensor("logits", logits, ndim=2, dtypes=_validate.FLOAT_DTYPES)
    _validate.integer("labels", labels)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected ({logits.shape[0]},), one per row of logits")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    if check:
        _validate.in_range("labels", labels, 0, logits.shape[1], allowed=(ignore_index,))
    return cross_entropy_twin(logits, labels.long(), ignore_index)
