"""gather: rows of a [tokens, hidden] tensor picked by a 1-d index, and its inverse.

`gather(x, index)` returns x[index] (the masked-token gather of the MLM head); its backward is
`scatter(grad, index, rows)`, which writes each row back to its place and zeros elsewhere
(indices unique, so no atomics). `unpad_input`/`pad_input` move a padded [batch, seq, hidden]
batch to packed real tokens and back with the same two ops.

The CUDA kernels live in csrc/gather/; the pure-PyTorch twins below are the reference and the
CPU implementation of the registered ops.
"""
import math
from dataclasses import dataclass

import torch

from fastbert import _backend, _validate

# ----------------------------------------------------------------------------- twins


def gather_rows_twin(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index)


def scatter_rows_twin(src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    out = src.new_zeros((num_rows, src.shape[1]))
    out[index] = src
    return out


# ----------------------------------------------------------------------------- registration

if _backend.has_op("gather_rows"):
    torch.library.register_kernel("fastbert::gather_rows", "cpu",
                                  _backend.cpu_kernel("gather_rows", gather_rows_twin))
    torch.library.register_kernel("fastbert::scatter_rows", "cpu",
                                  _backend.cpu_kernel("scatter_rows", scatter_rows_twin))

    @torch.library.register_fake("fastbert::gather_rows")
    def _gather_rows_fake(x, index):
        return x.new_empty((index.shape[0], x.shape[1]))

    @torch.library.register_fake("fastbert::scatter_rows")
    def _scatter_rows_fake(src, index, num_rows):
        return src.new_empty((num_rows, src.shape[1]))

    def _gather_setup(ctx, inputs, output):
        x, index = inputs
        ctx.save_for_backward(index)
        ctx.num_rows = x.shape[0]

    def _gather_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.ops.fastbert.scatter_rows(grad, index, ctx.num_rows), None

    def _scatter_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def _scatter_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.ops.fastbert.gather_rows(grad, index), None, None

    torch.library.register_autograd("fastbert::gather_rows", _gather_backward, setup_context=_gather_setup)
    torch.library.register_autograd("fastbert::scatter_rows", _scatter_backward, setup_context=_scatter_setup)


# ----------------------------------------------------------------------------- public API


def _check(name, x, index, rows, check_range):
    _validate.tensor(name, x, ndim=2)
    _validate.integer("index", index)
    if index.dtype not in _validate.INDEX_DTYPES:
        raise TypeError(f"index must be int64 or int32, got {str(index.dtype).replace('torch.', '')}")
    if index.dim() != 1:
        raise ValueError(f"index must be 1-d, got shape {tuple(index.shape)}")
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but {name} is on {x.device}")
    if check_range:
        _validate.in_range("index", index, 0, rows)


def gather(x: torch.Tensor, index: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """x[index] for a 2-d x and a 1-d index of unique rows; differentiable in x.

    check=False skips the range check (one host sync); only for indices you built yourself.
    """
    _check("x", x, index, x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else 0, check)
    if check and x.requires_grad:
        _validate.unique("index", index)
    if _backend.use_kernel("gather_rows", x, index):
        return torch.ops.fastbert.gather_rows(x, index)
    return gather_rows_twin(x, index.long())


def scatter(src: torch.Tensor, index: torch.Tensor, num_rows: int, *, check: bool = True) -> torch.Tensor:
    """A [num_rows, hidden] tensor of zeros with row index[i] set to src[i]; index unique."""
    if not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")
    _check("src", src, index, num_rows, check)
    if src.shape[0] != index.shape[0]:
        raise ValueError(f"src has {src.shape[0]} rows but index has {index.shape[0]} entries; expected equal")
    if check:
        _validate.unique("index", index)
    if _backend.use_kernel("scatter_rows", src, index):
        return torch.ops.fastbert.scatter_rows(src, index, num_rows)
    return scatter_rows_twin(src, index.long(), num_rows)


@dataclass
class Packing:
    """Where the real tokens of a padded [batch, seq] batch sit: the padding-free layout.

    indices: int64 [tokens], flat positions in batch*seq of the tokens with attention_mask != 0,
    in order; cu_seqlens: int32 [batch + 1], sequence b owns packed rows cu_seqlens[b] ..
    cu_seqlens[b+1] - 1; max_seqlen: the longest sequence (a Python int).

    Built from a CPU mask it costs no device sync; from a CUDA mask it syncs twice (nonzero's
    output size and max_seqlen). The trainer builds it on the CPU batch and moves it with the
    batch (`model(..., packing=Packing.from_mask(cpu_mask).to(device, non_blocking=True))`).
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_mask(cls, attention_mask):
        mask = attention_mask.bool()
        seqlens = mask.sum(dim=1, dtype=torch.int32)
        indices = torch.nonzero(mask.flatten()).flatten()
        cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
        return cls(indices, cu_seqlens, int(seqlens.max()) if seqlens.numel() else 0)

    @classmethod
    def full(cls, batch, seq, device=None):
        """Every position a token (no mask): built without looking at any data, so no sync."""
        return cls(torch.arange(batch * seq, device=device),
                   torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device), seq)

    def to(self, device, non_blocking=False):
        return Packing(self.indices.to(device, non_blocking=non_blocking),
                       self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen)

    @property
    def batch(self):
        return self.cu_seqlens.shape[0] - 1

    def pack(self, x):
        """[batch, seq, ...] -> [tokens, ...], differentiable (the gather op)."""
        rows = x.reshape(x.shape[0] * x.shape[1], math.prod(x.shape[2:]))
        if not x.dtype.is_floating_point:  # ids, token types, positions: no autograd, no kernel needed
            return rows.index_select(0, self.indices).reshape(-1, *x.shape[2:])
        return gather(rows, self.indices, check=False).reshape(-1, *x.shape[2:])

    def pad(self, packed, seq):
        """[tokens, ...] -> [batch, seq, ...], zeros at padding (the scatter op)."""
        return pad_input(packed, self.indices, self.batch, seq)

    def first_rows(self, packed):
        """[batch, ...]: each sequence's first real token ([CLS]); zeros for a sequence without one."""
        starts, ends = self.cu_seqlens[:-1], self.cu_seqlens[1:]
        if packed.shape[0] == 0:
            return packed.new_zeros((self.batch, *packed.shape[1:]))
        rows = packed.index_select(0, starts.clamp(max=packed.shape[0] - 1).long())
        return torch.where((ends > starts).view(-1, *[1] * (packed.dim() - 1)), rows, torch.zeros_like(rows))


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Packed real tokens of a padded batch.

    hidden [batch, seq, ...] and attention_mask [batch, seq] (1 = token, 0 = padding) give
    (packed [tokens, ...], indices [tokens] into batch*seq, cu_seqlens int32 [batch+1], max_seqlen).
    """
    _validate.tensor("hidden", hidden, ndim=(3, 4))
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(hidden.shape[:2])}")
    packing = Packing.from_mask(attention_mask)
    return packing.pack(hidden), packing.indices, packing.cu_seqlens, packing.max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input: [tokens, ...] back to [batch, seq, ...] with zeros at padding."""
    rows = packed.reshape(packed.shape[0], math.prod(packed.shape[1:]))
    out = scatter(rows, indices, batch * seqlen, check=False)
    return out.reshape(batch, seqlen, *packed.shape[1:])


# ----------------------------------------------------------------------------- self-check


def selfcheck(device):
    """Kernel vs twin vs fp32 reference on fresh random inputs (see fastbert/ops/_check.py)."""
    from fastbert import _backend
    from fastbert.ops._check import compare, poisoned_outputs

    results = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, hidden, picked in ((7, 96, 3), (1000, 768, 150), (1, 1000, 1), (33, 1001, 17)):
            # non-contiguous rows: a column slice of a wider tensor
            base = torch.randn(rows, hidden + 5, device=device, dtype=dtype)
            x = base[:, 2:hidden + 2]
            index = torch.randperm(rows, device=device)[:picked]
            grad = torch.randn(picked, hidden, device=device, dtype=dtype)
            ref = x.float()[index]
            ref_back = torch.zeros(rows, hidden, device=device).index_copy_(0, index, grad.float())
            with poisoned_outputs():
                with _backend.kernels(True):
                    k_fwd, k_back = gather(x, index), scatter(grad, index, rows)
                with _backend.kernels(False):
                    t_fwd, t_back = gather(x, index), scatter(grad, index, rows)
            case = f"rows={rows} hidden={hidden} picked={picked}"
            results.append(compare("gather", case, dtype, k_fwd, t_fwd, ref))
            results.append(compare("scatter", case, dtype, k_back, t_back, ref_back))
    return results
