"""Masked-token gather (and its scatter backward), and unpad/pad, at BERT-base shapes:
fastbert vs index_select / index_put (PyTorch's autograd of x[index]).

    pytest benchmarks/bench_gather.py -s

Bytes (fewest): gather reads and writes the picked rows; its backward reads the picked rows'
gradient and writes the whole [tokens, hidden] gradient (zeros elsewhere):
(3 x picked + tokens) x hidden x element size. unpad + pad: the same with picked = real tokens.
"""
import pytest
import torch

from _util import make_pool, measure, report, run_benchmark
from fastbert.ops import gather, pad_input, unpad_input

pytestmark = pytest.mark.gpu
HIDDEN = 768
SHAPES = {"256x128": (256, 128), "32x512": (32, 512)}


@pytest.mark.parametrize("case", list(SHAPES))
def test_gather_fwd_bwd(benchmark, copy_gbps, bench_record, case):
    batch, seq = SHAPES[case]
    tokens, picked = batch * seq, int(0.15 * batch * seq)  # the MLM head's 15% of tokens
    dtype = torch.bfloat16

    def make():
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
        index = torch.randperm(tokens, device="cuda")[:picked]
        grad = torch.randn(picked, HIDDEN, device="cuda", dtype=dtype)
        return x, index, grad

    pool = make_pool(make, (tokens + 2 * picked) * HIDDEN * 2)

    def ours(x, index, grad):
        return torch.autograd.grad(gather(x, index, check=False), x, grad)

    def theirs(x, index, grad):
        return torch.autograd.grad(x[index], x, grad)

    baseline_ms = measure(theirs, pool)
    ms = run_benchmark(benchmark, ours, pool)
    name = f"tokens {case} picked {picked} hidden {HIDDEN} bf16 fwd+bwd"
    fields = report("gather", name, ms, (3 * picked + tokens) * HIDDEN * 2, baseline_ms, copy_gbps)
    benchmark.extra_info.update(fields, baseline_ms=baseline_ms)
    bench_record("gather", name, ms, baseline="torch", baseline_ms=baseline_ms, **fields)


@pytest.mark.parametrize("case", list(SHAPES))
def test_unpad_pad_fwd_bwd(benchmark, copy_gbps, bench_record, case):
    batch, seq = SHAPES[case]
    dtype = torch.bfloat16

    def make():
        hidden = torch.randn(batch, seq, HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), device="cuda")
        mask = (torch.arange(seq, device="cuda")[None] < lengths[:, None]).long()
        grad = torch.randn(batch, seq, HIDDEN, device="cuda", dtype=dtype)
        return hidden, mask, grad

    pool = make_pool(make, 2 * batch * seq * HIDDEN * 2)

    def ours(hidden, mask, grad):
        packed, indices, _, _ = unpad_input(hidden, mask)
        return torch.autograd.grad(pad_input(packed, indices, batch, seq), hidden, grad)

    def theirs(hidden, mask, grad):
        keep = mask.bool()
        packed = hidden[keep]
        out = hidden.new_zeros(hidden.shape).index_put((keep,), packed)
        return torch.autograd.grad(out, hidden, grad)

    real = int(pool[0][1].sum())
    baseline_ms = measure(theirs, pool)
    ms = run_benchmark(benchmark, ours, pool)
    name = f"unpad+pad {case} ~{real} real tokens hidden {HIDDEN} bf16 fwd+bwd"
    # unpad: real rows read + written; pad: real rows read, all rows written; and the same backward
    nbytes = 2 * (3 * real + batch * seq) * HIDDEN * 2
    fields = report("gather", name, ms, nbytes, baseline_ms, copy_gbps)
    benchmark.extra_info.update(fields, baseline_ms=baseline_ms)
    bench_record("gather", name, ms, baseline="torch", baseline_ms=baseline_ms, **fields)
