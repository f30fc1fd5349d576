"""Bias + GELU (erf and tanh), forward + backward, at BERT-base's intermediate size: fastbert's fused
kernel vs the unfused F.gelu(x + bias).

    pytest benchmarks/bench_bias_gelu.py -s

Bytes (each tensor read or written once): forward reads x and writes y; backward reads dy and x
and writes dx: 5 x tokens x intermediate x element size (the fp32 bias, dbias and the dbias
workspace are negligible and not counted). The matmul before it is not timed (cuBLASLt's fused
GELU epilogue, torch._addmm_activation, computes the tanh approximation only; see
fastbert/ops/bias_gelu.py).
"""
import pytest
import torch
import torch.nn.functional as F

from _util import make_pool, measure, report, run_benchmark
from fastbert.ops import bias_gelu

pytestmark = pytest.mark.gpu
INTERMEDIATE = 3072
CASES = {"256x128": 256 * 128, "32x512": 32 * 512}


def _make(tokens, dtype):
    def make():
        x = torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=dtype)
        return x, dy
    return make


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_bias_gelu_fwd_bwd(benchmark, copy_gbps, bench_record, case, dtype, approximate):
    tokens = CASES[case]
    bias = torch.randn(INTERMEDIATE, device="cuda", dtype=torch.float32, requires_grad=True)  # as an fp32 Linear's
    es = torch.finfo(dtype).bits // 8
    pool = make_pool(_make(tokens, dtype), 2 * tokens * INTERMEDIATE * es)

    def ours(x, dy):
        y = bias_gelu(x, bias, approximate)
        return torch.autograd.grad(y, (x, bias), dy)

    def theirs(x, dy):
        y = F.gelu(x + bias.to(dtype), approximate=approximate)
        return torch.autograd.grad(y, (x, bias), dy)

    baseline_ms = measure(theirs, pool)
    ms = run_benchmark(benchmark, ours, pool)
    name = f"tokens {case} cols {INTERMEDIATE} {str(dtype).replace('torch.', '')} {approximate} fwd+bwd"
    fields = report("bias_gelu", name, ms, 5 * tokens * INTERMEDIATE * es, baseline_ms, copy_gbps)
    benchmark.extra_info.update(fields, baseline_ms=baseline_ms)
    bench_record("bias_gelu", name, ms, baseline="torch", baseline_ms=baseline_ms, **fields)
