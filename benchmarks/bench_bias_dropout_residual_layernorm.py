"""Bias + dropout + residual + LayerNorm, forward + backward, at BERT-base shapes (hidden 768,
dropout 0.1 in training): fastbert's fused kernels vs the unfused
F.layer_norm(F.dropout(x + bias) + residual).

    pytest benchmarks/bench_bias_dropout_residual_layernorm.py -s

Bytes (each tensor read or written once): forward reads x and residual and writes y and h;
backward reads dy and h and writes dx and dresidual: 8 x tokens x hidden x element size (the
dropout mask is regenerated from Philox, never stored; fp32 statistics, parameters and the
column-sum workspace are not counted).
"""
import pytest
import torch
import torch.nn.functional as F

from _util import make_pool, measure, report, run_benchmark
from fastbert.ops import bias_dropout_residual_layer_norm

pytestmark = pytest.mark.gpu
HIDDEN = 768
DROPOUT = 0.1
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
def test_bias_dropout_residual_layernorm_fwd_bwd(benchmark, copy_gbps, bench_record, case, dtype):
    tokens = CASES[case]
    bias, ln_bias = (torch.randn(HIDDEN, device="cuda", requires_grad=True) for _ in range(2))  # fp32, as Linear's
    weight = torch.randn(HIDDEN, device="cuda", requires_grad=True)
    es = torch.finfo(dtype).bits // 8
    pool = make_pool(_make(tokens, dtype), 3 * tokens * HIDDEN * es)

    def ours(x, r, dy):
        y = bias_dropout_residual_layer_norm(x, bias, r, weight, ln_bias, 1e-12, DROPOUT, training=True)
        return torch.autograd.grad(y, (x, r, bias, weight, ln_bias), dy)

    def theirs(x, r, dy):
        h = F.dropout(x + bias.to(dtype), DROPOUT, training=True) + r
        y = F.layer_norm(h, (HIDDEN,), weight.to(dtype), ln_bias.to(dtype), 1e-12)
        return torch.autograd.grad(y, (x, r, bias, weight, ln_bias), dy)

    baseline_ms = measure(theirs, pool)
    ms = run_benchmark(benchmark, ours, pool)
    name = f"tokens {case} hidden {HIDDEN} {str(dtype).replace('torch.', '')} dropout {DROPOUT} fwd+bwd"
    fields = report("bias_dropout_residual_layernorm", name, ms, 8 * tokens * HIDDEN * es, baseline_ms, copy_gbps)
    benchmark.extra_info.update(fields, baseline_ms=baseline_ms)
    bench_record("bias_dropout_residual_layernorm", name, ms, baseline="torch", baseline_ms=baseline_ms, **fields)
