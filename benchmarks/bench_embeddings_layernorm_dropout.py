"""Embeddings' sum + LayerNorm + dropout, forward + backward, at BERT-base shapes (hidden 768,
dropout 0.1 in training): fastbert's fused kernels vs the unfused
F.dropout(F.layer_norm(word + token_type + position)).

    pytest benchmarks/bench_embeddings_layernorm_dropout.py -s

Bytes (each tensor read or written once): forward reads the three embeddings and writes y and
h; backward reads dy and h and writes dh: 8 x tokens x hidden x element size (the dropout mask
is regenerated from Philox, never stored; the embedding lookups themselves are not timed).
"""
import pytest
import torch
import torch.nn.functional as F

from _util import make_pool, measure, report, run_benchmark
from fastbert.ops import embeddings_layer_norm_dropout

pytestmark = pytest.mark.gpu
HIDDEN = 768
DROPOUT = 0.1
CASES = {"256x128": 256 * 128, "32x512": 32 * 512}


def _make(tokens, dtype):
    def make():
        a, b, c = (torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        dy = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype)
        return a, b, c, dy
    return make


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_embeddings_layernorm_dropout_fwd_bwd(benchmark, copy_gbps, bench_record, case, dtype):
    tokens = CASES[case]
    weight, bias = (torch.randn(HIDDEN, device="cuda", requires_grad=True) for _ in range(2))
    es = torch.finfo(dtype).bits // 8
    pool = make_pool(_make(tokens, dtype), 4 * tokens * HIDDEN * es)

    def ours(a, b, c, dy):
        y = embeddings_layer_norm_dropout(a, b, c, weight, bias, 1e-12, DROPOUT, training=True)
        return torch.autograd.grad(y, (a, b, c, weight, bias), dy)

    def theirs(a, b, c, dy):
        y = F.dropout(F.layer_norm(a + b + c, (HIDDEN,), weight.to(dtype), bias.to(dtype), 1e-12), DROPOUT, True)
        return torch.autograd.grad(y, (a, b, c, weight, bias), dy)

    baseline_ms = measure(theirs, pool)
    ms = run_benchmark(benchmark, ours, pool)
    name = f"tokens {case} hidden {HIDDEN} {str(dtype).replace('torch.', '')} dropout {DROPOUT} fwd+bwd"
    fields = report("embeddings_layernorm_dropout", name, ms, 8 * tokens * HIDDEN * es, baseline_ms, copy_gbps)
    benchmark.extra_info.update(fields, baseline_ms=baseline_ms)
    bench_record("embeddings_layernorm_dropout", name, ms, baseline="torch", baseline_ms=baseline_ms, **fields)
