"""Softmax cross-entropy, forward + backward, vocab 30522: fastbert vs F.cross_entropy.

    pytest benchmarks/bench_cross_entropy.py -s

Cases: the sparse MLM head (256 x 20 masked rows) and every token of 256 x 128 (32768 rows).
Bytes (fewest): the forward reads the logits once, the backward reads them once and writes the
gradient once: 3 x rows x vocab x element size (labels and per-row fp32 values not counted).
"""
import pytest
import torch
import torch.nn.functional as F

from _util import make_pool, measure, report, run_benchmark
from fastbert.ops import cross_entropy

pytestmark = pytest.mark.gpu
VOCAB = 30522
CASES = {"sparse 256x20": (256 * 20, False), "dense 32768": (32768, False), "dense 32768 inplace": (32768, True)}


@pytest.mark.parametrize("case", list(CASES))
def test_cross_entropy_fwd_bwd(benchmark, copy_gbps, bench_record, case):
    rows, inplace = CASES[case]
    dtype = torch.bfloat16

    def make():
        logits = torch.randn(rows, VOCAB, device="cuda", dtype=dtype, requires_grad=True)
        labels = torch.randint(0, VOCAB, (rows,), device="cuda")
        return logits, labels

    pool = make_pool(make, rows * VOCAB * 2)

    def ours(logits, labels):
        # in place: the leaf's values are overwritten by its gradient each call (still finite)
        loss = cross_entropy(logits, labels, check=False, inplace_backward=inplace)
        return torch.autograd.grad(loss, logits)

    def theirs(logits, labels):
        loss = F.cross_entropy(logits, labels, ignore_index=-100)
        return torch.autograd.grad(loss, logits)

    baseline_ms = measure(theirs, pool)
    ms = run_benchmark(benchmark, ours, pool)
    name = f"rows {case} vocab {VOCAB} bf16 fwd+bwd"
    fields = report("cross_entropy", name, ms, 3 * rows * VOCAB * 2, baseline_ms, copy_gbps)
    benchmark.extra_info.update(fields, baseline_ms=baseline_ms)
    bench_record("cross_entropy", name, ms, baseline="torch", baseline_ms=baseline_ms, **fields)
