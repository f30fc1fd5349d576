"""attention: the packed (varlen) op and the padded entry.

CPU: the registered ops (their CPU kernels are the twins) pass opcheck; the varlen twin matches
the padded twin on mixed lengths (1, an empty sequence, ...); the written-out backward matches
fp64 autograd, with and without the kernel's dropout mask; the Philox twin matches Random123's
known answers; bad input raises clear errors.
GPU (`gpu` marker): the tolerance rule on mixed lengths for fp16/bf16 and head_dim 32/64/128,
dropout keep rate, forward/backward consistency with the kernel's mask, reproducibility,
empty sequences, opcheck on CUDA.
"""
import importlib
import math

import numpy as np
import pytest
import torch

from fastbert import _backend
from fastbert.ops._check import compare, poisoned_outputs

A = importlib.import_module("fastbert.ops.attention")  # fastbert.ops.attention is also a function name

needs_ops = pytest.mark.skipif(not _backend.has_op("attention_varlen_fwd"),
                               reason="fastbert._C with the attention ops is not built")


def packed(lengths, heads=2, dim=32, dtype=torch.float32, device="cpu"):
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32, device=device)
    total = int(sum(lengths))
    q, k, v = (torch.randn(total, heads, dim, dtype=dtype, device=device) for _ in range(3))
    return q, k, v, cu, max(lengths)


def pad(x, cu, max_len):
    """[total, ...] packed -> [batch, max_len, ...] zero-padded, and the [batch, max_len] mask."""
    cu = cu.tolist()
    batch = len(cu) - 1
    out = x.new_zeros((batch, max_len, *x.shape[1:]))
    mask = torch.zeros(batch, max_len, dtype=torch.long, device=x.device)
    for b in range(batch):
        n = cu[b + 1] - cu[b]
        out[b, :n] = x[cu[b]:cu[b + 1]]
        mask[b, :n] = 1
    return out, mask


def unpad(x, cu):
    cu = cu.tolist()
    return torch.cat([x[b, :cu[b + 1] - cu[b]] for b in range(len(cu) - 1)], 0)


# ----------------------------------------------------------------------------- CPU


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32_10
    words = A.philox4x32_10(*(np.array([0]),) * 4, 0, 0)
    assert [int(w[0]) for w in words] == [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    words = A.philox4x32_10(*(np.array([0xFFFFFFFF]),) * 4, 0xFFFFFFFF, 0xFFFFFFFF)
    assert [int(w[0]) for w in words] == [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]


def test_dropout_keep_mask_rate_and_determinism():
    cu = torch.tensor([0, 100, 100, 300], dtype=torch.int32)
    m1 = A.dropout_keep_mask(cu, 3, 200, 0.1, 1234, 7)
    m2 = A.dropout_keep_mask(cu, 3, 200, 0.1, 1234, 7)
    m3 = A.dropout_keep_mask(cu, 3, 200, 0.1, 1234, 8)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert m1.shape == (3, 3, 200, 200)
    assert not m1[0, :, 100:].any() and not m1[0, :, :, 100:].any() and not m1[1].any()
    n = 3 * (100 * 100 + 200 * 200)
    rate = m1.sum().item() / n
    keep = A.attention_keep_threshold(0.1) / 256  # 230 / 256: the 8-bit threshold's keep probability
    assert keep == 230 / 256 and A.attention_keep_scale(0.1) == np.float32(256 / 230)
    assert abs(rate - keep) < 5 * math.sqrt(keep * (1 - keep) / n)


def test_dropout_keep_mask_follows_the_documented_rule():
    """attention.h's rule, element by element, against the vectorized twin (and one Philox call per
    16 elements: the 16 elements of one (block, lane) share one counter)."""
    cu = torch.tensor([0, 37, 37, 130], dtype=torch.int32)
    heads, seed, offset, p = 2, 2 ** 35 + 12345, 77, 0.3
    mask = A.dropout_keep_mask(cu, heads, 93, p, seed, offset)
    thr = A.attention_keep_threshold(p)
    rng = np.random.default_rng(0)
    for _ in range(300):
        b = int(rng.choice([0, 2]))
        start, length = int(cu[b]), int(cu[b + 1] - cu[b])
        h, i, j = int(rng.integers(heads)), int(rng.integers(length)), int(rng.integers(length))
        r, c = i % 16, j % 32
        lane = (r % 8) * 4 + (c % 8) // 2
        byte = (c // 8) * 4 + (r // 8) * 2 + c % 2
        w = A.philox4x32_10(np.array([32 * (j // 32) + lane]), np.array([start + 16 * (i // 16)]), np.array([h]),
                            np.array([offset]), seed & 0xFFFFFFFF, seed >> 32)
        u8 = (int(w[byte // 4][0]) >> (8 * (byte % 4))) & 0xFF
        assert bool(mask[b, h, i, j]) == (u8 < thr), (b, h, i, j)
    # one call per 16 elements: the (i // 16, j // 32, lane) groups have 16 members each
    i, j = np.meshgrid(np.arange(16), np.arange(32), indexing="ij")
    lanes = (i % 8) * 4 + (j % 8) // 2
    assert sorted(np.bincount(lanes.ravel()).tolist()) == [16] * 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_varlen_twin_matches_padded_twin(seed, dtype):
    lengths = [1, 7, 0, 33, 64]
    q, k, v, cu, max_len = packed(lengths, dtype=dtype)
    out, lse = A.varlen_reference(q, k, v, cu, 0.3)
    qp, mask = pad(q, cu, max_len)
    kp, _ = pad(k, cu, max_len)
    vp, _ = pad(v, cu, max_len)
    ref = A.attention_twin(qp, kp, vp, mask, scale=0.3)
    torch.testing.assert_close(out, unpad(ref, cu))
    scores = torch.einsum("thd,shd->hts", q[:1], k[:1]) * 0.3  # sequence of length 1: lse = its score
    torch.testing.assert_close(lse[:, :1], scores[:, :, 0].float())
    assert lse.shape == (2, q.shape[0])


@needs_ops
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_registered_op_on_cpu_and_backward_vs_fp64(seed, dropout_p):
    lengths = [1, 5, 0, 19, 40]
    q, k, v, cu, max_len = packed(lengths, dtype=torch.float64)
    scale, seed_, offset = 0.2, 99, 3
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = torch.ops.fastbert.attention_varlen_fwd(q, k, v, cu, max_len, scale, dropout_p, seed_, offset)
    keep = A.dropout_keep_mask(cu, 2, max_len, dropout_p, seed_, offset)
    ref, ref_lse = A.varlen_reference(q, k, v, cu, scale, keep=keep, dropout_p=dropout_p)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse.float())
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@needs_ops
def test_opcheck_cpu(seed):
    q, k, v, cu, max_len = packed([3, 0, 9, 16], dim=32)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(torch.ops.fastbert.attention_varlen_fwd, (q, k, v, cu, max_len, 0.25, 0.0, 1, 2))
    torch.library.opcheck(torch.ops.fastbert.attention_varlen_fwd, (q, k, v, cu, max_len, 0.25, 0.5, 1, 2))
    out, lse = torch.ops.fastbert.attention_varlen_fwd(q, k, v, cu, max_len, 0.25, 0.0, 1, 2)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, max_len, 0.25, 0.0, 1, 2)
    torch.library.opcheck(torch.ops.fastbert.attention_varlen_bwd, args)
    torch.library.opcheck(torch.ops.fastbert.attention_dropout_mask, (cu, 2, max_len, 0.1, 5, 6))


@pytest.mark.skipif(not _backend.has_op("attention_bwd_delta"), reason="the extension predates attention_bwd_delta")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bwd_delta_op_on_cpu(seed, dtype):
    """fastbert::attention_bwd_delta: rowsum(dout * out) over head_dim, fp32 [heads, total]; opcheck
    (schema, fake, CPU kernel) and the values, from a strided out."""
    dout = torch.randn(11, 3, 32, dtype=dtype)
    out = torch.randn(11, 4, 32, dtype=dtype)[:, 1:]
    torch.library.opcheck(torch.ops.fastbert.attention_bwd_delta, (dout, out))
    delta = torch.ops.fastbert.attention_bwd_delta(dout, out)
    assert delta.shape == (3, 11) and delta.dtype == torch.float32 and delta.is_contiguous()
    want = torch.einsum("thd,thd->ht", dout.double(), out.double())
    torch.testing.assert_close(delta.double(), want, atol=1e-2 if dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_public_varlen_and_padded_on_cpu(seed):
    q, k, v, cu, max_len = packed([1, 7, 12])
    out = A.attention_varlen(q, k, v, cu, max_len)
    torch.testing.assert_close(out, A.varlen_reference(q, k, v, cu, 1 / math.sqrt(32))[0])
    qp, mask = pad(q, cu, max_len)
    out_p = A.attention(qp, pad(k, cu, max_len)[0], pad(v, cu, max_len)[0], mask)
    torch.testing.assert_close(unpad(out_p, cu), out)


@pytest.mark.parametrize("bad, error, match", [
    (dict(cu=torch.tensor([0, 3, 2, 10], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu=torch.tensor([1, 3, 10], dtype=torch.int32)), ValueError, "start at 0"),
    (dict(cu=torch.tensor([0, 3, 12], dtype=torch.int32)), ValueError, "ends at 12"),
    (dict(cu=torch.tensor([0, 3, 10], dtype=torch.int64)), TypeError, "int32"),
    (dict(cu=torch.tensor([[0, 3, 10]], dtype=torch.int32)), ValueError, "1-d"),
    (dict(max_len=5), ValueError, "longest sequence has 7"),
    (dict(max_len=-1), ValueError, "max_seqlen"),
    (dict(k=torch.randn(10, 2, 16)), ValueError, "one shape"),
    (dict(v=torch.randn(10, 2, 32, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(q=torch.randn(10, 64)), ValueError, "3-d"),
    (dict(q=torch.ones(10, 2, 32, dtype=torch.int32)), TypeError, "dtype"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
])
def test_bad_input(bad, error, match):
    q, k, v = (torch.randn(10, 2, 32) for _ in range(3))
    args = dict(q=q, k=k, v=v, cu=torch.tensor([0, 3, 10], dtype=torch.int32), max_len=7, dropout_p=0.0)
    args.update(bad)
    with pytest.raises(error, match=match):
        A.attention_varlen(args["q"], args["k"], args["v"], args["cu"], args["max_len"], dropout_p=args["dropout_p"])


def test_kernel_unsupported_reasons():
    assert A.kernel_unsupported(torch.empty(1, 1, 64, dtype=torch.float16)) is None
    assert "float32" in A.kernel_unsupported(torch.empty(1, 1, 64))
    assert "head_dim 80" in A.kernel_unsupported(torch.empty(1, 1, 80, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- GPU

MIXED = [1, 7, 97, 128, 333, 512]


def _grads(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad.to(out.dtype)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_tolerance_rule_mixed_lengths(seed, dtype, dim):
    q, k, v, cu, max_len = packed(MIXED + [0, 65], heads=3, dim=dim, dtype=dtype, device="cuda")
    grad = torch.randn_like(q)
    scale = 1 / math.sqrt(dim)
    ref = _grads(lambda a, b, c: A.varlen_reference(a, b, c, cu, scale)[0], q.float(), k.float(), v.float(), grad)
    twin = _grads(lambda a, b, c: A.varlen_reference(a, b, c, cu, scale)[0], q, k, v, grad)
    with poisoned_outputs(), _backend.kernels(True):
        kern = _grads(lambda a, b, c: A.attention_varlen(a, b, c, cu, max_len), q, k, v, grad)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), kern, twin, ref):
        r = compare(name, f"d={dim}", dtype, a, b, c)
        assert r.ok, r


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_padded_entry_matches_twin_on_real_tokens(seed, dtype):
    batch, seq = 4, 77
    q, k, v = (torch.randn(batch, seq, 4, 64, device="cuda", dtype=dtype) for _ in range(3))
    mask = torch.ones(batch, seq, dtype=torch.long, device="cuda")
    mask[1, 40:] = 0
    mask[2, 1:] = 0
    mask[3, :] = 0  # fully padded: the kernel path gives zeros, never NaN
    with _backend.kernels(True):
        out = A.attention(q, k, v, mask)
    ref = A.attention_twin(q.float(), k.float(), v.float(), mask)
    twin = A.attention_twin(q, k, v, mask)
    real = mask.bool()
    assert compare("attention", "padded", dtype, out[real], twin[real], ref[real]).ok
    assert torch.isfinite(out).all() and (out[~real] == 0).all()
    with _backend.kernels(True):
        out_nomask = A.attention(q, k, v)
    assert compare("attention", "no mask", dtype, out_nomask, A.attention_twin(q, k, v),
                   A.attention_twin(q.float(), k.float(), v.float())).ok


@pytest.mark.gpu
def test_dropout_mask_kernel_matches_host_twin():
    cu = torch.tensor([0, 1, 8, 8, 105, 233], dtype=torch.int32, device="cuda")
    got = torch.ops.fastbert.attention_dropout_mask(cu, 3, 128, 0.1, 2 ** 40 + 17, 12345)
    want = A.dropout_keep_mask(cu.cpu(), 3, 128, 0.1, 2 ** 40 + 17, 12345)
    assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dropout_keep_rate_and_consistency(seed, dtype):
    p, dim, heads = 0.1, 64, 4
    q, k, v, cu, max_len = packed([1, 7, 97, 128, 333], heads=heads, dim=dim, dtype=dtype, device="cuda")
    scale = 1 / math.sqrt(dim)
    keep = torch.ops.fastbert.attention_dropout_mask(cu, heads, max_len, p, 11, 22)
    n = heads * sum(x * x for x in [1, 7, 97, 128, 333])
    rate = keep.sum().item() / n
    want = A.attention_keep_threshold(p) / 256
    assert abs(rate - want) < 5 * math.sqrt(want * (1 - want) / n)
    grad = torch.randn_like(q)

    def kernel(a, b, c):
        return torch.ops.fastbert.attention_varlen_fwd(a, b, c, cu, max_len, scale, p, 11, 22)[0]

    def twin_with_mask(a, b, c):
        return A.varlen_reference(a, b, c, cu, scale, keep=keep, dropout_p=p)[0]

    kern = _grads(kernel, q, k, v, grad)
    twin = _grads(twin_with_mask, q, k, v, grad)
    ref = _grads(twin_with_mask, q.float(), k.float(), v.float(), grad)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), kern, twin, ref):
        r = compare(name, "dropout", dtype, a, b, c)
        assert r.ok, r


@pytest.mark.gpu
def test_dropout_reproducible_for_a_seed():
    q, k, v, cu, max_len = packed([50, 130], heads=2, dim=64, dtype=torch.float16, device="cuda")
    with _backend.kernels(True):
        torch.manual_seed(5)
        a = A.attention_varlen(q, k, v, cu, max_len, dropout_p=0.1, training=True)
        torch.manual_seed(5)
        b = A.attention_varlen(q, k, v, cu, max_len, dropout_p=0.1, training=True)
        c = A.attention_varlen(q, k, v, cu, max_len, dropout_p=0.1, training=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.gpu
def test_empty_sequences_and_grads_finite():
    q, k, v, cu, max_len = packed([0, 3, 0], heads=2, dim=32, dtype=torch.float16, device="cuda")
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = A.attention_varlen(q, k, v, cu, max_len)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    e = torch.zeros(0, 2, 32, device="cuda", dtype=torch.float16)
    assert A.attention_varlen(e, e, e, torch.zeros(3, dtype=torch.int32, device="cuda"), 0).shape == (0, 2, 32)


@pytest.mark.gpu
def test_unsupported_falls_back_with_warning():
    q, k, v, cu, max_len = packed([5, 9], heads=2, dim=80, dtype=torch.float16, device="cuda")
    A._backend._warned.discard("attention:head_dim 80 (the kernel takes 32, 64 and 128)")
    with _backend.kernels(True), pytest.warns(UserWarning, match="head_dim 80"):
        out = A.attention_varlen(q, k, v, cu, max_len)
    torch.testing.assert_close(out, A.varlen_reference(q, k, v, cu, 1 / math.sqrt(80))[0])


@pytest.mark.gpu
def test_opcheck_cuda(seed):
    q, k, v, cu, max_len = packed([3, 0, 70, 16], heads=2, dim=64, dtype=torch.float16, device="cuda")
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(torch.ops.fastbert.attention_varlen_fwd, (q, k, v, cu, max_len, 0.125, 0.0, 1, 2))
    torch.library.opcheck(torch.ops.fastbert.attention_varlen_fwd, (q, k, v, cu, max_len, 0.125, 0.2, 1, 2))
    torch.library.opcheck(torch.ops.fastbert.attention_dropout_mask, (cu, 2, max_len, 0.1, 5, 6))


@needs_ops
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_padded_entry_kernel_path_on_cpu(seed, monkeypatch, dropout_p):
    """The padded entry's kernel path (unpad, packed op, pad back, autograd through the registered
    ops) run on CPU, where the ops' CPU kernels are the twins: real tokens match the padded twin
    (with the kernel's dropout mask), padded positions are zero."""
    monkeypatch.setattr(A._backend, "use_kernel", lambda name, *tensors: True)
    monkeypatch.setattr(A, "kernel_unsupported", lambda q: None)  # fp32 here; the CPU kernels take any dtype
    batch, seq, heads, dim = 4, 11, 2, 32
    q, k, v = (torch.randn(batch, seq, heads, dim, requires_grad=True) for _ in range(3))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 1:] = 0
    mask[3, :] = 0
    real = mask.bool()
    grad = torch.randn(batch, seq, heads, dim) * real[:, :, None, None]
    torch.manual_seed(seed)
    out = A.attention(q, k, v, mask, dropout_p=dropout_p, training=True)
    got = torch.autograd.grad(out, (q, k, v), grad)
    # the same seed and offset the wrapper drew
    torch.manual_seed(seed)
    seed_, offset = A._draw_seed_offset() if dropout_p > 0 else (0, 0)
    lengths = mask.sum(1).tolist()
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)
    keep = A.dropout_keep_mask(cu, heads, seq, dropout_p, seed_, offset)  # [batch, heads, seq, seq]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim) + A.additive_mask(mask, torch.float32)
    probs = torch.softmax(scores, -1)
    if dropout_p > 0:
        probs = probs * keep * A.attention_keep_scale(dropout_p)
    ref = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out[real], ref[real])
    assert (out[~real] == 0).all()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- the fast CPU path


def _padded_case(dtype):
    batch, seq, heads, dim = 5, 13, 3, 16
    q, k, v = (torch.randn(batch, seq, heads, dim, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 1:] = 0
    mask[3, :] = 0  # a sequence with no token
    mask[4, ::3] = 0  # holes
    return q, k, v, mask, torch.randn(batch, seq, heads, dim, dtype=dtype)


def test_cpu_fast_path_equals_twin(seed):
    """attention() off the kernel runs attention_fast (SDPA), which gives the twin's outputs and
    gradients under the tolerance rule (error against an fp64 reference at most twice the fp32
    twin's, plus the fp32 floor: a key alone in its sequence has dk = 0 in exact math, which both
    paths only reach up to rounding); for a sequence with no token the twin's dq, dk come from
    rounding (its scores are drowned by the mask), the fast path's are the exact zeros of a
    constant function."""
    q, k, v, mask, grad = _padded_case(torch.float32)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    for m in (mask, None):
        out = A.attention(q, k, v, m, scale=0.3)
        twin = A.attention_twin(q, k, v, m, scale=0.3)
        ref = A.attention_twin(q64, k64, v64, m, scale=0.3)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(twin, (q, k, v), grad)
        exact = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
        live = torch.ones(q.shape[0], dtype=torch.bool) if m is None else m.bool().any(1)
        results = [compare("attention_fast", "out", torch.float32, out, twin, ref)]
        results += [compare("attention_fast", f"d{name}", torch.float32, a[live], b[live], c[live])
                    for name, a, b, c in zip("qkv", got, want, exact)]
        results.append(compare("attention_fast", "dv everywhere", torch.float32, got[2], want[2], exact[2]))
        assert all(r.ok for r in results), [r for r in results if not r.ok]
        assert (got[0][~live] == 0).all() and (got[1][~live] == 0).all()


def test_cpu_fast_path_dropout_draws_as_the_twin(seed):
    """In training with dropout the fast path draws the twin's (transformers' eager) dropout mask."""
    q, k, v, mask, grad = _padded_case(torch.float32)
    torch.manual_seed(seed)
    out = A.attention(q, k, v, mask, dropout_p=0.3, training=True)
    torch.manual_seed(seed)
    ref = A.attention_twin(q, k, v, mask, dropout_p=0.3, training=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_cpu_paths_do_not_run_the_twins(seed, monkeypatch):
    """The twins are the reference only: the public entries on the CPU never call them."""
    def refuse(*args, **kwargs):
        raise AssertionError("a twin ran on the CPU path")

    monkeypatch.setattr(A, "attention_twin", refuse)
    monkeypatch.setattr(A, "varlen_reference", refuse)
    q, k, v, mask, _ = _padded_case(torch.float32)
    A.attention(q, k, v, mask)
    A.attention(q, k, v, mask, dropout_p=0.1, training=True)
    qp, kp, vp, cu, max_len = packed([3, 0, 8, 1])
    A.attention_varlen(qp, kp, vp, cu, max_len)


@pytest.mark.parametrize("lengths", [[5, 0, 11, 1], [7], [0, 0, 3]])
def test_cpu_varlen_fast_equals_reference(seed, lengths):
    q, k, v, cu, max_len = packed(lengths, heads=3, dim=16)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    grad = torch.randn_like(q)
    out = A.attention_varlen(q, k, v, cu, max_len, scale=0.25)
    ref = A.varlen_reference(q, k, v, cu, 0.25)[0]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # with dropout: a real mask, the expectation unchanged (the mean over many draws)
    with torch.no_grad():
        draws = torch.stack([A.attention_varlen(q, k, v, cu, max_len, scale=0.25, dropout_p=0.5, training=True)
                             for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    # each element's mean within 6 standard errors of the reference (a fixed atol failed ~1 run in 8:
    # a length-1 sequence's output is 0 or 2v, so its mean's error scales with |v|)
    mean, sem = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    err = (mean - ref.detach()).abs()
    assert bool((err <= 6 * sem + 1e-5).all()), float((err / (sem + 1e-12)).max())


@pytest.fixture
def threads():
    """Sets torch's intra-op thread count for the test, and restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("lengths", [[5, 0, 11, 1], [1], [0, 0, 3], [9, 2, 2, 17]])
def test_cpu_varlen_inference_equals_reference(seed, lengths, monkeypatch, threads):
    """Without a gradient or dropout on the CPU, varlen attention runs, with one thread, one
    unmasked SDPA call per non-empty sequence (no copy into a padded batch), with more, one masked
    call on a padded copy; both give the reference's output."""
    q, k, v, cu, max_len = packed(lengths, heads=3, dim=16)
    ref = A.varlen_reference(q, k, v, cu, 0.25)[0]
    calls = []
    sdpa = A.F.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    for n_threads, want in ((1, [None] * sum(1 for n in lengths if n)), (2, ["mask"])):
        threads(n_threads)
        for context in (torch.no_grad, torch.inference_mode):
            calls.clear()
            with context():
                out = A.attention_varlen(q, k, v, cu, max_len, scale=0.25)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
            assert [None if kw.get("attn_mask") is None else "mask" for kw in calls] == want
    # with a gradient to compute: the differentiable route (attention_fast on a padded copy)
    calls.clear()
    out = A.attention_varlen(q.requires_grad_(True), k, v, cu, max_len, scale=0.25)
    assert len(calls) == 1 and out.requires_grad
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
