"""attention: BERT's bidirectional multi-head self-attention, softmax(q kᵀ·scale + mask)·v.

Two entries:

* `attention(q, k, v, attention_mask)`: a padded batch q, k, v [batch, seq, heads, head_dim] and
  a key padding mask [batch, seq] (1 = token, 0 = padding). This is what the model calls.
* `attention_varlen(q, k, v, cu_seqlens, max_seqlen)`: the padding-free form, q, k, v packed as
  [total_tokens, heads, head_dim], sequence b owning tokens cu_seqlens[b] .. cu_seqlens[b+1]-1.

On CUDA, for float16/bfloat16 and head_dim 32, 64 or 128, both run the fused flash-style kernel
of csrc/attention/ (the padded entry unpads with fastbert.ops.gather, runs the packed kernel and
pads back). Anything else (the CPU above all) runs `attention_fast` / `varlen_fast`: the twins'
function in fewer passes (torch's fused SDPA without dropout), with a one-time warning when a
CUDA kernel exists but does not cover the shape or dtype. The twins (`attention_twin`,
`varlen_reference`) stay the plain reference the tests check both against.

Padding semantics differ in one place, which the model never reads: the twin (transformers'
eager attention, an additive mask of the dtype's minimum) gives a padded *query* row attention
over the real keys, and a row of a fully padded sequence uniform attention over padding; the
kernel path gives zeros at every padded position (and a packed row of an empty sequence does
not exist). Real-token positions agree.

Dropout on the probabilities in the kernel is counter-based (Philox4x32-10, see
csrc/attention/attention.h): the keep decision for (query token, head, key) is a pure function
of (seed, offset), so the backward regenerates the forward's mask, and `dropout_mask` (or its
twin `dropout_keep_mask`, identical bit for bit) materializes it for tests. seed and offset are
drawn from torch's default (CPU) generator, so `torch.manual_seed` makes a run reproducible.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from fastbert import _backend, _validate
from fastbert.ops.gather import Packing

HEAD_DIMS = (32, 64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------- padded twin


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


# ----------------------------------------------------------------------------- the fast non-kernel path
#
# What runs where no CUDA kernel does (the CPU above all). The twins stay the plain reference;
# these compute the same function with fewer passes over the [batch, heads, S, S] scores:
# without dropout, one F.scaled_dot_product_attention call (its fused CPU kernel) with the
# twin's additive mask, so a fully padded row stays finite exactly as in the twin; with dropout,
# q·kᵀ·scale + mask in one baddbmm, softmax in place, then F.dropout, the call transformers'
# eager attention makes, so the same seed draws the same dropout mask (SDPA's own dropout_p
# runs its unfused math path on the CPU, about 10x slower, and draws differently).


def attention_fast(q, k, v, attention_mask=None, dropout_p=0.0, scale=None, training=False):
    """The twin's result for q, k, v [batch, seq, heads, head_dim] and a [batch, seq] key mask."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if attention_mask is not None and q.device.type == "cpu" and bool(attention_mask.all()):
        attention_mask = None  # no padding: SDPA without a mask is faster (on the CPU the check is free)
    bias = None if attention_mask is None else additive_mask(attention_mask, q.dtype)  # [batch, 1, 1, seq]
    if not (training and dropout_p > 0.0):
        if bias is not None:
            # A sequence with no token: the twin attends uniformly over its padding (every score
            # drowned by the mask). SDPA's backward recomputes the probabilities from a logsumexp
            # the mask has drowned too, and would give them ~seq times too large; zero q and the
            # mask there instead: the same uniform forward, and the gradient of a constant.
            empty = (attention_mask == 0).all(dim=1)[:, None, None, None]
            if q.device.type != "cpu" or bool(empty.any()):  # on the CPU the check is free; spares a copy of q
                bias = bias.masked_fill(empty, 0.0)
                q = q.masked_fill(empty, 0.0)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).transpose(1, 2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    batch, heads, seq, dim = q.shape
    qf, kf, vf = (t.reshape(batch * heads, seq, dim) for t in (q, k, v))
    if bias is None:
        scores = torch.bmm(qf, kf.transpose(1, 2)).mul_(scale)
    else:
        bias = bias.expand(batch, heads, seq, seq).reshape(batch * heads, seq, seq)
        scores = torch.baddbmm(bias, qf, kf.transpose(1, 2), alpha=scale)
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p, training=True)
    return torch.bmm(probs, vf).view(batch, heads, seq, dim).transpose(1, 2)


def varlen_fast(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0, training=False):
    """varlen attention without the lse (rows of an empty sequence do not exist). For inference on
    the CPU (no dropout, no gradient): with one thread, one unmasked SDPA call per sequence on views
    of the packed q, k, v (`_varlen_per_sequence`); with more, one masked call on a padded copy
    (`_varlen_padded_inference`). Else, differentiable and without a Python loop: the packed q, k,
    v are scattered into a [batch, max_seqlen] batch, attended with attention_fast and gathered back."""
    total, heads, dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    if total == 0 or batch == 0:
        return q.new_zeros(q.shape)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and not grad and not (training and dropout_p > 0.0):
        if torch.get_num_threads() == 1:
            return _varlen_per_sequence(q, k, v, cu_seqlens, scale)
        return _varlen_padded_inference(q, k, v, cu_seqlens, max_seqlen, scale)
    slot, mask = _slots(cu_seqlens, max_seqlen, total)

    def pad(t):
        out = t.new_zeros((batch * max_seqlen, heads, dim))
        return out.index_put((slot,), t).view(batch, max_seqlen, heads, dim)

    out = attention_fast(pad(q), pad(k), pad(v), mask, dropout_p, scale, training)
    return out.reshape(batch * max_seqlen, heads, dim).index_select(0, slot)


def _slots(cu_seqlens, max_seqlen, total):
    """(slot of each of the total packed tokens in a flat [batch * max_seqlen] batch, the
    [batch, max_seqlen] key mask)."""
    batch = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=cu.device), lengths, output_size=total)
    slot = seq_of_token * max_seqlen + (torch.arange(total, device=cu.device) - cu[:-1][seq_of_token])
    return slot, torch.arange(max_seqlen, device=cu.device)[None, :] < lengths[:, None]


def _varlen_padded_inference(q, k, v, cu_seqlens, max_seqlen, scale):
    """Inference on the CPU with several threads: q, k, v copied (index_copy_) into one zeroed
    [batch, max_seqlen, 3, heads, head_dim] buffer, one masked SDPA call on its views, the real rows
    gathered back. A handful of parallel regions per layer: the per-sequence loop below opens two
    per sequence, and on a loaded machine each can wait a scheduler slice for a descheduled thread
    (measured 2-5x slower than padded SDPA at 2 threads on the busy 2-core development machine,
    MiniLM shapes, batch 128 of 8-64 tokens, 2026-12-01; this one 1.2-1.7x, the copies included)."""
    total, heads, dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    slot, mask = _slots(cu_seqlens, max_seqlen, total)
    buf = q.new_zeros((batch * max_seqlen, 3, heads, dim))  # zeros: masked keys must be finite
    for i, t in enumerate((q, k, v)):
        buf[:, i].index_copy_(0, slot, t)
    qs, ks, vs = (buf.view(batch, max_seqlen, 3, heads, dim)[:, :, i].transpose(1, 2) for i in range(3))
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=additive_mask(mask, q.dtype), scale=scale)
    return out.transpose(1, 2).reshape(batch * max_seqlen, heads, dim).index_select(0, slot)


def _varlen_per_sequence(q, k, v, cu_seqlens, scale):
    """Inference on the CPU with one thread: each sequence's [heads, len, head_dim] views through
    SDPA's fused CPU kernel, no mask, no copy of q, k, v. Measured against scattering into a padded
    batch (MiniLM shapes, batch 32 and 128 of 8-64 tokens, 1 thread, 2026-12-01): 2-3x faster, as
    fast as padded SDPA on the already padded batch; the Python loop costs ~20 us a sequence."""
    out = q.new_empty(q.shape)
    bounds = cu_seqlens.tolist()  # a CPU tensor: no sync
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, len, head_dim]
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1)
    return out


# ----------------------------------------------------------------------------- dropout mask twin

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_U32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123) on numpy uint64 arrays holding 32-bit values; 4 output words."""
    c = [np.asarray(x, dtype=np.uint64) & _U32 for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0 & 0xFFFFFFFF), np.uint64(k1 & 0xFFFFFFFF)
    for _ in range(10):
        p0 = c[0] * np.uint64(_M0)  # < 2^64: exact
        p1 = c[2] * np.uint64(_M1)
        hi0, lo0 = p0 >> np.uint64(32), p0 & _U32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _U32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + np.uint64(_W0)) & _U32
        k1 = (k1 + np.uint64(_W1)) & _U32
    return c


def keep_threshold(dropout_p: float) -> int:
    """Row dropout's 32-bit threshold (csrc/row_dropout.h): keep iff a Philox word is below it."""
    return min(int(math.floor((1.0 - dropout_p) * 4294967296.0)), 0xFFFFFFFF)


def attention_keep_threshold(dropout_p: float) -> int:
    """Attention dropout's 8-bit threshold (csrc/attention/attention.h): keep iff a Philox byte is below
    it; clamp(rint((1 - p) * 256), 1, 256), so the keep probability is this / 256."""
    return max(1, min(256, round((1.0 - dropout_p) * 256.0)))


def attention_keep_scale(dropout_p: float) -> float:
    """What attention's kept probabilities are multiplied by: 256 / threshold (the kernel's fp32 value),
    so the expectation is unchanged; 1 without dropout."""
    if dropout_p <= 0.0:
        return 1.0
    return float(np.float32(256.0 / attention_keep_threshold(dropout_p)))


def dropout_keep_mask(cu_seqlens, heads, max_seqlen, dropout_p, seed, offset):
    """The kernel's dropout keep mask, computed on the host: bool [batch, heads, max_seqlen, max_seqlen],
    False outside each sequence (the twin of torch.ops.fastbert.attention_dropout_mask). The rule
    (csrc/attention/attention.h): element (i, j) of a sequence starting at packed token cu takes
    byte (c // 8) * 4 + (r // 8) * 2 + c % 2 of philox(32 * (j // 32) + lane, cu + 16 * (i // 16), head,
    offset), with (r, c) = (i % 16, j % 32) and lane = (r % 8) * 4 + (c % 8) // 2."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    batch, n = len(cu) - 1, int(max_seqlen)
    keep = np.zeros((batch, heads, n, n), dtype=bool)
    thr = np.uint64(attention_keep_threshold(dropout_p))
    for b in range(batch):
        length = min(cu[b + 1] - cu[b], n)
        if length <= 0:
            continue
        if dropout_p <= 0.0:
            keep[b, :, :length, :length] = True
            continue
        h, i, j = np.meshgrid(np.arange(heads), np.arange(length), np.arange(length), indexing="ij")
        r, c = i % 16, j % 32
        lane = (r % 8) * 4 + (c % 8) // 2
        byte = (c // 8) * 4 + (r // 8) * 2 + c % 2
        words = philox4x32_10(32 * (j // 32) + lane, cu[b] + 16 * (i // 16), h, offset & 0xFFFFFFFF,
                               seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
        word = np.choose(byte // 4, words)
        u8 = (word >> (np.uint64(8) * (byte % 4).astype(np.uint64))) & np.uint64(0xFF)
        keep[b, :, :length, :length] = u8 < thr
    return torch.from_numpy(keep).to(cu_seqlens.device)


# ----------------------------------------------------------------------------- varlen twins


def varlen_reference(q, k, v, cu_seqlens, scale, *, keep=None, dropout_p=0.0, training=False, compute_dtype=None):
    """Differentiable varlen attention in plain PyTorch: (out [total, heads, dim], lse [heads, total] fp32).

    keep: a [batch, heads, >=len, >=len] keep mask (the kernel's), applied with the kernel's
    scale attention_keep_scale(dropout_p) (256 / its 8-bit threshold);
    without it, dropout (if training) is F.dropout. compute_dtype: e.g. torch.float32 to compute in
    fp32 and cast back; default the input dtype.
    """
    cu = [int(x) for x in cu_seqlens.tolist()]
    dt = compute_dtype or q.dtype
    outs, lses = [], []
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e <= s:
            continue
        qb, kb, vb = (t[s:e].to(dt).transpose(0, 1) for t in (q, k, v))  # [heads, len, dim]
        scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale
        lses.append(torch.logsumexp(scores.float(), dim=-1))
        probs = torch.softmax(scores, dim=-1)
        if keep is not None and dropout_p > 0.0:
            probs = probs * keep[b, :, :e - s, :e - s].to(probs.dtype) * attention_keep_scale(dropout_p)
        elif dropout_p > 0.0 and training:
            probs = F.dropout(probs, p=dropout_p, training=True)
        outs.append(torch.matmul(probs, vb).transpose(0, 1).to(q.dtype))
    if outs:
        return torch.cat(outs, 0), torch.cat(lses, 1)
    return q.new_zeros(q.shape), q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32)


def _keep_or_none(cu_seqlens, heads, max_seqlen, dropout_p, seed, offset):
    if dropout_p <= 0.0:
        return None
    return dropout_keep_mask(cu_seqlens.cpu(), heads, max_seqlen, dropout_p, seed, offset).to(cu_seqlens.device)


def attention_varlen_fwd_twin(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset):
    """CPU kernel of fastbert::attention_varlen_fwd (fp32 inside, the kernel's dropout mask)."""
    keep = _keep_or_none(cu_seqlens, q.shape[1], max_seqlen, dropout_p, seed, offset)
    with torch.no_grad():
        out, lse = varlen_reference(q, k, v, cu_seqlens, scale, keep=keep, dropout_p=dropout_p,
                                    compute_dtype=torch.promote_types(q.dtype, torch.float32))
    return out.clone(), lse.contiguous()


def attention_varlen_bwd_twin(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset):
    """CPU kernel of fastbert::attention_varlen_bwd: the backward written out, as the kernel does it.

    P = exp(S·scale - lse); Pd = P∘Z (Z = keep · attention_keep_scale(p)); dV = Pdᵀ dO; dPd = dO Vᵀ;
    dS = P∘(dPd∘Z - rowsum(dO∘O)); dQ = scale·dS K; dK = scale·dSᵀ Q.
    """
    keep = _keep_or_none(cu_seqlens, q.shape[1], max_seqlen, dropout_p, seed, offset)
    cu = [int(x) for x in cu_seqlens.tolist()]
    dt = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = (torch.zeros(q.shape, dtype=dt, device=q.device) for _ in range(3))
    with torch.no_grad():
        for b in range(len(cu) - 1):
            s, e = cu[b], cu[b + 1]
            if e <= s:
                continue
            qb, kb, vb, dob, ob = (t[s:e].to(dt).transpose(0, 1) for t in (q, k, v, dout, out))
            scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale
            # P from the saved lse, as the kernel does (lse is fp32; in fp64 recompute it exactly)
            lse_b = torch.logsumexp(scores, -1, keepdim=True) if dt == torch.float64 else lse[:, s:e, None].to(dt)
            p = torch.exp(scores - lse_b)
            z = keep[b, :, :e - s, :e - s].to(dt) * attention_keep_scale(dropout_p) if keep is not None else torch.ones_like(p)
            pd = p * z
            dv[s:e] = torch.matmul(pd.transpose(-1, -2), dob).transpose(0, 1)
            dpd = torch.matmul(dob, vb.transpose(-1, -2))
            delta = (dob * ob).sum(-1, keepdim=True)
            ds = p * (dpd * z - delta)
            dq[s:e] = (scale * torch.matmul(ds, kb)).transpose(0, 1)
            dk[s:e] = (scale * torch.matmul(ds.transpose(-1, -2), qb)).transpose(0, 1)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def attention_bwd_delta_twin(dout, out):
    """CPU kernel of fastbert::attention_bwd_delta: rowsum(dout * out) over head_dim, computed and
    returned in fp32 (the op's contract), [heads, total_tokens]."""
    return (dout.float() * out.float()).sum(-1).t().contiguous()


def attention_dropout_mask_twin(cu_seqlens, heads, max_seqlen, dropout_p, seed, offset):
    return dropout_keep_mask(cu_seqlens.cpu(), heads, max_seqlen, dropout_p, seed, offset).to(cu_seqlens.device)


# ----------------------------------------------------------------------------- registration

if _backend.has_op("attention_varlen_fwd"):
    torch.library.register_kernel("fastbert::attention_varlen_fwd", "cpu",
                                  _backend.cpu_kernel("attention_varlen_fwd", attention_varlen_fwd_twin))
    torch.library.register_kernel("fastbert::attention_varlen_bwd", "cpu",
                                  _backend.cpu_kernel("attention_varlen_bwd", attention_varlen_bwd_twin))
    torch.library.register_kernel("fastbert::attention_dropout_mask", "cpu",
                                  _backend.cpu_kernel("attention_dropout_mask", attention_dropout_mask_twin))

    @torch.library.register_fake("fastbert::attention_varlen_fwd")
    def _attention_varlen_fwd_fake(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset):
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("fastbert::attention_varlen_bwd")
    def _attention_varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset):
        return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)

    if _backend.has_op("attention_bwd_delta"):  # an extension built before the op lacks it
        torch.library.register_kernel("fastbert::attention_bwd_delta", "cpu",
                                      _backend.cpu_kernel("attention_bwd_delta", attention_bwd_delta_twin))

        @torch.library.register_fake("fastbert::attention_bwd_delta")
        def _attention_bwd_delta_fake(dout, out):
            return dout.new_empty((dout.shape[1], dout.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("fastbert::attention_dropout_mask")
    def _attention_dropout_mask_fake(cu_seqlens, heads, max_seqlen, dropout_p, seed, offset):
        return cu_seqlens.new_empty((cu_seqlens.shape[0] - 1, heads, max_seqlen, max_seqlen), dtype=torch.bool)

    def _attention_setup(ctx, inputs, output):
        q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros for lse's (never defined) gradient
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.args = (max_seqlen, scale, dropout_p, seed, offset)

    def _attention_backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None

    torch.library.register_autograd("fastbert::attention_varlen_fwd", _attention_backward,
                                    setup_context=_attention_setup)


# ----------------------------------------------------------------------------- validation


def _check_qkv(q, k, v, ndim):
    _validate.tensor("q", q, ndim=ndim, dtypes=_validate.FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        _validate.tensor(name, t)
        if t.shape != q.shape:
            raise ValueError(f"q, k, v must have one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"q, k, v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def check_cu_seqlens(cu_seqlens, max_seqlen, total_tokens, device, *, check=True):
    """cu_seqlens: int32 1-d [batch+1], 0 first, non-decreasing, last = total_tokens; max_seqlen
    at least the longest sequence. check=False keeps only the checks that need no host sync."""
    _validate.tensor("cu_seqlens", cu_seqlens, ndim=1, device=device)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {str(cu_seqlens.dtype).replace('torch.', '')}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold batch + 1 >= 1 offsets, got an empty tensor")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if not check:
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if any(n < 0 for n in lengths):
        i = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"cu_seqlens must be non-decreasing, but cu_seqlens[{i + 1}] = {cu[i + 1]} < "
                         f"cu_seqlens[{i}] = {cu[i]}")
    if cu[-1] != total_tokens:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} but q holds {total_tokens} tokens; expected equal")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen is {max_seqlen} but the longest sequence has {longest} tokens")


def kernel_unsupported(q):
    """Why the CUDA kernel cannot take q (a reason string), or None if it can."""
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {str(q.dtype).replace('torch.', '')} (the kernel takes float16 and bfloat16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the kernel takes 32, 64 and 128)"
    return None


def smem_problem(head_dim: int, element_size: int, device, backward: bool):
    """Why the CUDA device cannot give the kernel for head_dim the shared memory its launcher asks
    for (a reason), or None. The size comes from the launcher's own formula, through the extension
    (csrc/attention/attention.h); every head_dim fits sm_80's 163 KiB and sm_86/89/120's 99 KiB."""
    device = torch.device(device)
    if device.type != "cuda" or not _backend.has_op("attention_smem_bytes"):
        return None  # no GPU to ask, or an extension from before the op (the launch reports it)
    key = (device.index, head_dim, element_size, backward)
    if key not in _smem_problems:
        _smem_problems[key] = _look_up_smem(head_dim, element_size, device, backward)
    return _smem_problems[key]


_smem_problems = {}


@torch.compiler.disable  # once per device and shape; under torch.compile a graph break, not traced
def _look_up_smem(head_dim, element_size, device, backward):
    need = torch.ops.fastbert.attention_smem_bytes(head_dim, element_size, backward)
    have = _backend.smem_per_block_optin(device)
    if need <= have:
        return None
    return (f"head_dim {head_dim} ({'backward' if backward else 'forward'} needs {need} B of shared memory per "
            f"block; this GPU allows {have} B)")


def _use_kernel(q, k, v):
    if not _backend.use_kernel("attention_varlen_fwd", q, k, v):
        return False
    why = kernel_unsupported(q) or smem_problem(q.shape[-1], q.element_size(), q.device, backward=False)
    if why is not None:
        _backend.warn_once(f"attention:{why}", f"fastbert attention: the CUDA kernel does not cover {why}; "
                                               "running the PyTorch twin")
        return False
    return True


def _varlen_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset):
    """The backward of attention_varlen_fwd: the kernel, or its twin (one-time warning) where the
    GPU lacks the shared memory the backward kernel needs. The twin regenerates the same dropout
    mask from (seed, offset), so a kernel forward pairs with it exactly."""
    args = (dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset)
    why = smem_problem(q.shape[-1], q.element_size(), q.device, backward=True)
    if why is None:
        return torch.ops.fastbert.attention_varlen_bwd(*args)
    _backend.warn_once(f"attention-bwd:{why}", f"fastbert attention: the CUDA backward kernel does not fit {why}; "
                                               "running the PyTorch twin for the backward")
    return attention_varlen_bwd_twin(*args)


def _draw_seed_offset():
    seed, offset = torch.randint(0, 2 ** 31 - 1, (2,)).tolist()  # default CPU generator: torch.manual_seed
    return seed, offset


def _scale_and_p(q, dropout_p, scale, training):
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return scale, (float(dropout_p) if training else 0.0)


# ----------------------------------------------------------------------------- public API


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     *, dropout_p: float = 0.0, scale: float = None, training: bool = False,
                     check: bool = True) -> torch.Tensor:
    """Self-attention of packed sequences: q, k, v [total_tokens, heads, head_dim] -> same shape.

    cu_seqlens: int32 [batch + 1] offsets (0, len0, len0+len1, ...); max_seqlen >= every length.
    check=False skips the checks of cu_seqlens' values (one host sync); only for offsets you built.
    """
    _check_qkv(q, k, v, 3)
    check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q.device, check=check)
    scale, p = _scale_and_p(q, dropout_p, scale, training)
    if _use_kernel(q, k, v):
        seed, offset = _draw_seed_offset() if p > 0.0 else (0, 0)
        return torch.ops.fastbert.attention_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, p, seed, offset)[0]
    return varlen_fast(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=p, training=p > 0.0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor = None, *,
              dropout_p: float = 0.0, scale: float = None, training: bool = False,
              packing: Packing = None) -> torch.Tensor:
    """Self-attention of a padded batch: q, k, v [batch, seq, heads, head_dim] -> same shape.

    attention_mask [batch, seq]: 1 = token, 0 = padding. On the kernel path padded positions of the
    output are zero (see the module docstring). The kernel path packs the real tokens: `packing`, a
    `Packing` of attention_mask on q's device built by the caller on the host (the model builds one
    per forward for all its layers), spares it building one; else it is built on the host from the
    mask (for a CUDA mask: one copy to the host, a sync). The twin ignores `packing`.
    """
    _check_qkv(q, k, v, 4)
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(q.shape[:2]):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(q.shape[:2])}")
    if packing is not None:
        if not isinstance(packing, Packing):
            raise TypeError(f"packing must be a fastbert Packing, got {type(packing).__name__}")
        if packing.batch != q.shape[0] or packing.max_seqlen > q.shape[1] or packing.indices.device != q.device:
            raise ValueError(f"packing describes {packing.batch} sequences of at most {packing.max_seqlen} tokens on "
                             f"{packing.indices.device}; q holds {q.shape[0]} of {q.shape[1]} on {q.device}: build it "
                             "with Packing.from_mask(attention_mask).to(q.device)")
    scale, p = _scale_and_p(q, dropout_p, scale, training)
    if not _use_kernel(q, k, v):
        return attention_fast(q, k, v, attention_mask, p, scale, training)
    batch, seq, heads, dim = q.shape
    if packing is None and attention_mask is None:
        packing = Packing.full(batch, seq, q.device)
    elif packing is None:  # on the host: a CUDA mask costs one copy (a sync), not nonzero's and max's two
        packing = Packing.from_mask(attention_mask.cpu()).to(q.device, non_blocking=True)
    packed = [packing.pack(t) for t in (q, k, v)]
    out = attention_varlen(*packed, packing.cu_seqlens, packing.max_seqlen, dropout_p=p, scale=scale,
                           training=training, check=False)
    return packing.pad(out, seq)


def dropout_mask(cu_seqlens: torch.Tensor, heads: int, max_seqlen: int, dropout_p: float, seed: int,
                 offset: int) -> torch.Tensor:
    """The keep mask attention_varlen_fwd uses for (seed, offset): bool [batch, heads, max_seqlen, max_seqlen]."""
    check_cu_seqlens(cu_seqlens, max_seqlen, int(cu_seqlens[-1]) if cu_seqlens.numel() else 0, cu_seqlens.device)
    if _backend.has_op("attention_dropout_mask"):
        return torch.ops.fastbert.attention_dropout_mask(cu_seqlens, heads, max_seqlen, float(dropout_p), seed, offset)
    return attention_dropout_mask_twin(cu_seqlens, heads, max_seqlen, dropout_p, seed, offset)


# ----------------------------------------------------------------------------- self-check


def _packed_inputs(lengths, heads, dim, dtype, device):
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32, device=device)
    total = int(sum(lengths))
    q, k, v, g = (torch.randn(total, heads, dim, device=device, dtype=dtype) for _ in range(4))
    return q, k, v, g, cu, max(lengths)


def selfcheck(device):
    """Kernel vs same-dtype twin vs fp32 reference, outputs and the three gradients, mixed lengths."""
    from fastbert.ops._check import compare, poisoned_outputs

    results = []
    cases = [((1, 7, 97, 128, 333, 512), 64), ((1, 0, 7, 97, 130), 32), ((1, 7, 97, 200), 128), ((64, 64), 64)]
    for dtype in KERNEL_DTYPES:
        for lengths, dim in cases:
            heads = 2
            q, k, v, grad, cu, max_len = _packed_inputs(lengths, heads, dim, dtype, device)
            scale = 1.0 / math.sqrt(dim)

            def run(qq, kk, vv, fn):
                qq, kk, vv = (t.detach().requires_grad_(True) for t in (qq, kk, vv))
                out = fn(qq, kk, vv)
                gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), grad.to(out.dtype))
                return out, gq, gk, gv

            ref = run(q.float(), k.float(), v.float(), lambda a, b, c: varlen_reference(a, b, c, cu, scale)[0])
            twin = run(q, k, v, lambda a, b, c: varlen_reference(a, b, c, cu, scale)[0])
            with poisoned_outputs():
                with _backend.kernels(True):
                    kern = run(q, k, v, lambda a, b, c: attention_varlen(a, b, c, cu, max_len))
            case = f"lengths={','.join(map(str, lengths))} d={dim}"
            for name, kv, tv, rv in zip(("attention", "attention.dq", "attention.dk", "attention.dv"), kern, twin, ref):
                results.append(compare(name, case, dtype, kv, tv, rv))
    return results
