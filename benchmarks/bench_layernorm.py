"""Residual + LayerNorm, forward + backward, at BERT-base shapes: fastbert vs F.layer_norm(x + r).

    pytest benchmarks/bench_layernorm.py -s

Bytes (each op's inputs read once, outputs written once): forward reads x, residual and writes
y, sum; backward reads dy, sum and writes dx (= d residual): 7 x tokens x hidden x element size
(the fp32 per-row statistics and per-feature parameters are negligible and not counted).
"""
import pytest
import torch
import torch.nn.functional as F

from _util import make_pool, measure, report, run_benchmark
from fastbert.ops import layer_norm

pytestmark = pytest.mark.gpu
HIDDEN = 768
CASES = {"256x128": 256 * 128, "32x512": 32 * 512}


def _make(tokens, dtype):
    def make():
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
        r = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype)
        return x, r, dy
    return make


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_layernorm_fwd_bwd(benchmark, copy_gbps, bench_record, case, dtype):
    tokens = CASES[case]
    weight = torch.randn(HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
    es = torch.finfo(dtype).bits // 8
    pool = make_pool(_make(tokens, dtype), 3 * tokens * HIDDEN * es)

    def ours(x, r, dy):
        y = layer_norm(x, weight, bias, 1e-12, residual=r)
        return torch.autograd.grad(y, (x, r, weight, bias), dy)

    def theirs(x, r, dy):
        y = F.layer_norm(x + r, (HIDDEN,), weight, bias, 1e-12)
        return torch.autograd.grad(y, (x, r, weight, bias), dy)

    baseline_ms = measure(theirs, pool)
    ms = run_benchmark(benchmark, ours, pool)
    name = f"tokens {case} hidden {HIDDEN} {str(dtype).replace('torch.', '')} fwd+bwd"
    fields = report("layernorm", name, ms, 7 * tokens * HIDDEN * es, baseline_ms, copy_gbps)
    benchmark.extra_info.update(fields, baseline_ms=baseline_ms)
    bench_record("layernorm", name, ms, baseline="torch", baseline_ms=baseline_ms, **fields)
