"""Fused attention, forward + backward, BERT-base shapes (12 heads, head_dim 64), fp16, on the GPU.

    python -m pytest benchmarks/bench_attention.py -s

Shapes: batch 256 x seq 128 and batch 32 x seq 512, each with lengths drawn from WikiText-2
pairs (about 30% padding; the measured fraction is recorded) and with no padding.
fastbert runs the model's path: the padded entry `fastbert.ops.attention(q, k, v, mask)`, which
unpads, runs the packed kernel and pads back (the gathers are inside the timing).
Baseline: torch.nn.functional.scaled_dot_product_attention on the padded batch with the boolean
key mask, under each backend (flash, efficient, cudnn, math); a backend that rejects the inputs
(flash takes no mask) is recorded as not applicable. The bar: >= 1.3x the best SDPA backend on
padded batches, >= 0.9x SDPA's flash backend without padding.
FLOPs, on real tokens only: forward 4 * sum(len_i^2) * heads * head_dim (two matmuls), backward
2.5x that (five matmuls), so forward + backward = 3.5 * 4 * sum(len_i^2) * heads * head_dim.
"""
import importlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastbert import _backend

A = importlib.import_module("fastbert.ops.attention")

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
HEADS, DIM = 12, 64
SHAPES = [(256, 128), (32, 512)]
PADDED_BAR, UNPADDED_BAR = 1.3, 0.9

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def wikitext_lengths(batch, seq, seed=0):
    """Token counts of sentence pairs from WikiText-2's validation split (words x 1.3 ~ WordPiece
    tokens; [CLS] A [SEP] B [SEP]): consecutive sentences fill segment A up to about half of a
    target drawn uniformly in [0.4, 1] x seq, then B up to the target; clipped to seq."""
    if not WIKITEXT.exists():
        pytest.skip(f"WikiText-2 is not at {WIKITEXT}")
    sents = []
    for line in WIKITEXT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("="):
            sents += [len(s.split()) * 1.3 for s in re.split(r"(?<= \.) ", line) if s.split()]
    rng = np.random.default_rng(seed)
    lengths, i = [], int(rng.integers(0, len(sents)))
    while len(lengths) < batch:
        target = rng.uniform(0.4, 1.0) * (seq - 3)
        a = b = 0.0
        while a == 0.0 or a + sents[i % len(sents)] <= target / 2:
            a += sents[i % len(sents)]
            i += 1
        while b == 0.0 or a + b + sents[i % len(sents)] <= target:
            b += sents[i % len(sents)]
            i += 1
        lengths.append(int(min(seq, 3 + round(a + b))))
    return lengths


def time_ms(fn, warmup=3, iters=10):
    """Median milliseconds of fn() on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def _inputs(batch, seq, lengths, dtype=torch.float16):
    q, k, v = (torch.randn(batch, seq, HEADS, DIM, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.zeros(batch, seq, dtype=torch.long, device="cuda")
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return q, k, v, mask, torch.randn(batch, seq, HEADS, DIM, device="cuda", dtype=dtype)


def _fastbert_step(q, k, v, mask, grad, padded):
    def step():
        out = A.attention(q, k, v, mask if padded else None)
        torch.autograd.grad(out, (q, k, v), grad)
    return step


def _sdpa_step(q, k, v, mask, grad, padded, backend):
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(True) for t in (q, k, v))  # [b, h, s, d]
    attn_mask = mask.bool()[:, None, None, :] if padded else None
    gt = grad.transpose(1, 2)

    def step():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask)
        torch.autograd.grad(out, (qt, kt, vt), gt)
    return step


@pytest.mark.parametrize("padded", [True, False], ids=["wikitext", "nopad"])
@pytest.mark.parametrize("batch, seq", SHAPES, ids=[f"{b}x{s}" for b, s in SHAPES])
def test_attention_fwd_bwd(benchmark, bench_record, batch, seq, padded):
    from torch.nn.attention import SDPBackend

    if not _backend.has_cuda_kernel("attention_varlen_fwd"):
        pytest.skip("fastbert._C holds no attention kernel")
    lengths = wikitext_lengths(batch, seq) if padded else [seq] * batch
    padding = 1.0 - sum(lengths) / (batch * seq)
    q, k, v, mask, grad = _inputs(batch, seq, lengths)
    flops = 3.5 * 4 * sum(n * n for n in lengths) * HEADS * DIM

    sdpa = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            sdpa[name] = time_ms(_sdpa_step(q, k, v, mask, grad, padded, backend))
        except RuntimeError as e:  # the backend rejects these inputs (flash: any mask)
            sdpa[name] = None
            print(f"sdpa {name}: not applicable ({str(e).splitlines()[0][:100]})")
    ran = {n: ms for n, ms in sdpa.items() if ms is not None}
    assert ran, "no SDPA backend ran"
    best_name = min(ran, key=ran.get)
    baseline_ms = ran["flash"] if (not padded and "flash" in ran) else ran[best_name]

    with _backend.kernels(True):
        step = _fastbert_step(q, k, v, mask, grad, padded)
        ms = time_ms(step)

        def synced():
            step()
            torch.cuda.synchronize()
        benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)

    case = f"{batch}x{seq} {'wikitext' if padded else 'nopad'} h{HEADS} d{DIM} fp16 fwd+bwd"
    tflops = flops / (ms * 1e-3) / 1e12
    bench_record("attention", case, ms, tflops=tflops, baseline="sdpa", baseline_ms=baseline_ms,
                 padding=round(padding, 4), sdpa_ms=sdpa, sdpa_best=best_name,
                 baseline_backend="flash" if (not padded and "flash" in ran) else best_name)
    for name, t in ran.items():
        bench_record("attention", case, t, tflops=flops / (t * 1e-3) / 1e12, baseline="sdpa",
                     baseline_ms=baseline_ms, impl=f"sdpa_{name}", padding=round(padding, 4))
    speedup = baseline_ms / ms
    print(f"\n{case}: fastbert {ms:.3f} ms ({tflops:.1f} TFLOP/s on real tokens, padding {padding:.1%}); "
          + ", ".join(f"sdpa {n} {'n/a' if t is None else f'{t:.3f} ms'}" for n, t in sdpa.items())
          + f"; speedup {speedup:.2f}x")
    bar = PADDED_BAR if padded else UNPADDED_BAR
    assert speedup >= bar, f"{speedup:.2f}x SDPA is below the bar of {bar}x"
