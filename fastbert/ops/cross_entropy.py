"""cross_entropy: mean softmax cross-entropy over the rows whose label is not ignore_index.

Used by the MLM head (on the labelled positions only) and the NSP head. A batch with no
counted row gives 0, not NaN. The CUDA kernel (csrc/cross_entropy/) reads the logits once for
the loss and once for the gradient, in fp32 math whatever the logits' dtype:

    torch.ops.fastbert.cross_entropy_fwd(logits, labels, ignore_index) -> (loss, lse)   fp32 [rows]
    torch.ops.fastbert.cross_entropy_bwd(grad_loss, logits, labels, lse, ignore_index) -> grad_logits
    torch.ops.fastbert.cross_entropy_bwd_(grad_loss, logits!, labels, lse, ignore_index)  (in place)

The per-row losses are summed and divided by the count here, so the gradient reaching the
backward kernel is grad_out / count per row. The twins below are the reference and the CPU
implementation of the registered ops.
"""
import torch
import torch.nn.functional as F

from fastbert import _backend, _validate

# ----------------------------------------------------------------------------- twins


def cross_entropy_twin(logits, labels, ignore_index=-100):
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum()
    return total / count.clamp(min=1).to(total.dtype)


def cross_entropy_fwd_twin(logits, labels, ignore_index):
    """Per-row loss and logsumexp in fp32; 0 and 0 on ignored rows (the CPU kernel of the op)."""
    lf = logits.float()
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(lf, dim=1)
    picked = lf.gather(1, safe[:, None]).squeeze(1)
    zero = lf.new_zeros(())
    return torch.where(keep, lse - picked, zero), torch.where(keep, lse, zero)


def cross_entropy_bwd_twin(grad_loss, logits, labels, lse, ignore_index):
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    grad = torch.exp(logits.float() - lse[:, None])
    grad.scatter_add_(1, safe[:, None], grad.new_full((grad.shape[0], 1), -1.0))
    grad = grad * torch.where(keep, grad_loss.float(), grad.new_zeros(()))[:, None]
    return grad.to(logits.dtype)


def cross_entropy_bwd_inplace_twin(grad_loss, logits, labels, lse, ignore_index):
    logits.copy_(cross_entropy_bwd_twin(grad_loss, logits, labels, lse, ignore_index))


# ----------------------------------------------------------------------------- registration

if _backend.has_op("cross_entropy_fwd"):
    torch.library.register_kernel("fastbert::cross_entropy_fwd", "cpu",
                                  _backend.cpu_kernel("cross_entropy_fwd", cross_entropy_fwd_twin))
    torch.library.register_kernel("fastbert::cross_entropy_bwd", "cpu",
                                  _backend.cpu_kernel("cross_entropy_bwd", cross_entropy_bwd_twin))
    torch.library.register_kernel("fastbert::cross_entropy_bwd_", "cpu",
                                  _backend.cpu_kernel("cross_entropy_bwd_", cross_entropy_bwd_inplace_twin))

    @torch.library.register_fake("fastbert::cross_entropy_fwd")
    def _cross_entropy_fwd_fake(logits, labels, ignore_index):
        rows = logits.shape[0]
        return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)

    @torch.library.register_fake("fastbert::cross_entropy_bwd")
    def _cross_entropy_bwd_fake(grad_loss, logits, labels, lse, ignore_index):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("fastbert::cross_entropy_bwd_")
    def _cross_entropy_bwd_inplace_fake(grad_loss, logits, labels, lse, ignore_index):
        return None

    def _cross_entropy_setup(ctx, inputs, output):
        logits, labels, ignore_index = inputs
        ctx.set_materialize_grads(False)
        ctx.ignore_index = ignore_index
        ctx.save_for_backward(logits, labels, output[1])

    def _cross_entropy_backward(ctx, grad_loss, grad_lse):
        # lse is a statistic for the backward: its gradient is not propagated.
        logits, labels, lse = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        return torch.ops.fastbert.cross_entropy_bwd(grad_loss, logits, labels, lse, ctx.ignore_index), None, None

    torch.library.register_autograd("fastbert::cross_entropy_fwd", _cross_entropy_backward,
                                    setup_context=_cross_entropy_setup)


class _CrossEntropyInplace(torch.autograd.Function):
    """Per-row losses whose backward writes the gradient over the logits (eager mode only).

    Hazard: after the backward the logits tensor holds the gradient. Anything that reads the
    logits afterwards (a second backward with retain_graph, a metric) sees the gradient; a
    later autograd use of the logits fails loudly on the bumped version counter.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        loss, lse = torch.ops.fastbert.cross_entropy_fwd(logits, labels, ignore_index)
        ctx.ignore_index = ignore_index
        ctx.save_for_backward(logits, labels, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        torch.ops.fastbert.cross_entropy_bwd_(grad_loss, logits, labels, lse, ctx.ignore_index)
        return logits, None, None


# ----------------------------------------------------------------------------- public API


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                  inplace_backward: bool = False, check: bool = True) -> torch.Tensor:
    """Mean cross-entropy of logits [rows, classes] against labels [rows] (ignore_index skipped).

    The loss has the dtype F.cross_entropy gives: the logits' dtype, fp32 under autocast (the
    kernel computes in fp32 either way).
    inplace_backward=True lets the kernel write the gradient over the logits (no second
    [rows, classes] buffer); the logits must not be used after the backward then. It applies
    in eager mode to logits with unit stride along classes; elsewhere it is ignored.
    check=False skips the label range check (one host sync).
    """
    _validate.tensor("logits", logits, ndim=2, dtypes=_validate.FLOAT_DTYPES)
    _validate.integer("labels", labels)
    if labels.dtype not in _validate.INDEX_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {str(labels.dtype).replace('torch.', '')}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected ({logits.shape[0]},), one per row of logits")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if logits.shape[1] == 0 and logits.shape[0] > 0:
        raise ValueError("logits has 0 classes; expected at least 1")
    if check:
        _validate.in_range("labels", labels, 0, logits.shape[1], allowed=(ignore_index,))
    if _backend.use_kernel("cross_entropy_fwd", logits, labels):
        count = (labels != ignore_index).sum()
        if (inplace_backward and torch.is_grad_enabled() and logits.requires_grad and logits.stride(1) == 1
                and not torch.compiler.is_compiling()):
            loss = _CrossEntropyInplace.apply(logits, labels, ignore_index)
        else:
            loss = torch.ops.fastbert.cross_entropy_fwd(logits, labels, ignore_index)[0]
        loss = loss.sum() / count.clamp(min=1)
        # the dtype the twin (F.cross_entropy) gives: fp32 under autocast, which runs it in fp32, else the logits'
        return loss if torch.is_autocast_enabled(logits.device.type) else loss.to(logits.dtype)
    return cross_entropy_twin(logits, labels.long(), ignore_index)


# ----------------------------------------------------------------------------- self-check

SELFCHECK_SHAPES = ((1, 30522), (7, 50265), (1000, 30522), (1000, 2), (7, 1000), (0, 30522))


def selfcheck(device):
    """Kernel vs twin vs fp64 reference on fresh random inputs (see fastbert/ops/_check.py):
    the loss and the gradient of the logits, non-contiguous logits, ~20% ignored rows, the
    in-place backward, and a batch with no counted row (loss 0, gradient 0)."""
    from fastbert.ops._check import compare, poisoned_outputs

    results = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, vocab in SELFCHECK_SHAPES:
            for inplace in (False, True):
                base = 3 * torch.randn(rows, vocab + 3, device=device, dtype=dtype)
                logits = base[:, 2:vocab + 2]  # non-contiguous rows, rows off 16-byte alignment
                labels = torch.randint(0, vocab, (rows,), device=device)
                labels[torch.rand(rows, device=device) < 0.2] = -100
                if rows == 7 and vocab == 1000:
                    labels.fill_(-100)  # no counted row: loss 0, gradient 0
                grad_out = torch.rand((), device=device) + 0.5

                def run(fn, logits, dtype=None, **kw):
                    leaf = logits.detach().to(dtype or logits.dtype).requires_grad_()
                    loss = fn(leaf * 1 if kw.get("inplace_backward") else leaf, labels, **kw)
                    loss.backward(grad_out.to(loss.dtype))
                    return loss, leaf.grad

                ref = run(cross_entropy_twin, logits, torch.float64)
                with poisoned_outputs():
                    with _backend.kernels(True):
                        kern = run(cross_entropy, logits, inplace_backward=inplace)
                with _backend.kernels(False):
                    twin = run(cross_entropy, logits)
                case = f"rows={rows} vocab={vocab}" + (" inplace" if inplace else "")
                for name, k, t, r in zip(("cross_entropy", "cross_entropy grad"), kern, twin, ref):
                    results.append(compare(name, case, dtype, k, t, r))
    return results
