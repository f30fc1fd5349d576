"""scripts/traffic_report.py: the byte counting on ops with known sizes, and the report on a tiny
layer (fastbert's kernel path and transformers' sdpa path, on fake tensors)."""
import importlib.util
import json

import pytest
import torch

from conftest import ROOT
from fastbert import _backend


def _load():
    spec = importlib.util.spec_from_file_location("traffic_report", ROOT / "scripts" / "traffic_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TR = _load()


def test_known_bytes_per_op():
    a = torch.randn(10, 20)
    b = torch.randn(20)
    h = torch.randn(6, 4)

    def ops():
        c = a + b  # reads 800 + 80 (b broadcast: its own 20 elements), writes 800
        c.view(20, 10).t()  # views: nothing moves, not listed
        c.mul_(2.0)  # in place: reads 800, writes the same 800
        torch.nn.functional.layer_norm(h, (4,))  # in 96 B; out 96 + mean and rstd, 6 rows each

    traffic = TR.count(ops)
    rows = {name: (kind, c.calls, c.read, c.written) for name, kind, c in traffic.rows()}
    assert rows["aten.add"] == ("memory-bound", 1, 880, 800)
    assert rows["aten.mul_"] == ("memory-bound", 1, 800, 800)
    assert rows["aten.native_layer_norm"] == ("memory-bound", 1, 96, 96 + 6 * 4 * 2)
    assert list(traffic.ops) == ["aten.add", "aten.mul_", "aten.native_layer_norm"]  # views move nothing
    assert traffic.total_bytes() == 880 + 800 + 1600 + 96 + 144
    assert traffic.calls("memory-bound") == 3
    assert TR.tensor_bytes(b.expand(10, 20)) == 80 and TR.tensor_bytes(a.t()) == 800


def test_kinds():
    assert [TR.kind_of(n) for n in ("aten.addmm", "aten.add_", "aten.transpose", "prim.device",
                                    "fastbert.attention_varlen_bwd", "aten._scaled_dot_product_flash_attention",
                                    "fastbert.layernorm_fwd")] == \
        ["matmul", "memory-bound", "view", "view", "attention", "attention", "memory-bound"]


NEEDS_FUSED_OPS = pytest.mark.skipif(not _backend.has_op("bias_dropout_residual_layernorm_fwd"),
                                     reason="fastbert._C lacks the fused ops (not built, or built before them)")


@NEEDS_FUSED_OPS
def test_tiny_layer_report(tmp_path, capsys):
    tokens, hidden, heads, inter = 2 * 8, 64, 2, 96
    out = tmp_path / "t.json"
    assert TR.main(["--hidden", str(hidden), "--heads", str(heads), "--intermediate", str(inter), "--seq", "8",
                    "--batch", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Counted (not timed)" in text and "fastbert.bias_dropout_residual_layernorm_fwd" in text
    report = json.loads(out.read_text())
    fb, tf = report["fastbert"]["ops"], report["transformers"]["ops"]
    # the fused bias + dropout + residual LayerNorm, bf16: reads x, residual and three [hidden] params;
    # writes y, h = dropout(x + bias) + residual, mean, rstd
    act = tokens * hidden * 2
    assert fb["fastbert.bias_dropout_residual_layernorm_fwd"] == {
        "kind": "memory-bound", "calls": 2, "read_bytes": 2 * (2 * act + 3 * hidden * 2),
        "written_bytes": 2 * (2 * act + 2 * tokens * 4)}
    assert fb["fastbert.attention_varlen_fwd"]["calls"] == 1 and fb["fastbert.attention_varlen_bwd"]["calls"] == 1
    assert tf["aten.native_layer_norm"]["calls"] == 2 and tf["aten._scaled_dot_product_flash_attention"]["calls"] == 1
    # the same six projections forward (q, k, v with their bias in the addmm, the other three without)
    assert fb["aten.addmm"]["calls"] == 3 and tf["aten.addmm"]["calls"] == 6
    # the gradients of the layer input and of the attention output: summed inside the matmuls (addmm_)
    assert "aten.add" not in fb and fb["aten.addmm_"]["calls"] == 4 and tf["aten.add"]["calls"] == 6
    assert report["memory_bound_ops_ratio"] == pytest.approx(
        report["fastbert"]["memory_bound_ops"] / report["transformers"]["memory_bound_ops"])


@NEEDS_FUSED_OPS
def test_bert_base_layer_meets_the_traffic_bars():
    """Issue 14's bars for one BERT-base layer forward + backward (hidden 768, seq 128, batch 32, bf16,
    dropout 0.1), counted: outside the matmuls and attention (which move the same bytes in both, but
    for the gradient accumulation fastbert moves into them) fastbert moves <= 0.6x the bytes of
    transformers' sdpa layer, in <= 0.5x the memory-bound (elementwise/normalization) ops."""
    shape = (768, 12, 3072, 128, 32, torch.bfloat16, 0.1)
    fb, tf = TR.fastbert_layer_traffic(*shape), TR.transformers_layer_traffic(*shape)
    assert fb.total_bytes() < tf.total_bytes()
    assert fb.total_bytes("memory-bound") <= 0.6 * tf.total_bytes("memory-bound"), \
        (fb.total_bytes("memory-bound"), tf.total_bytes("memory-bound"))
    assert fb.calls("memory-bound") <= 0.5 * tf.calls("memory-bound"), \
        ([(n, c.calls) for n, k, c in fb.rows() if k == "memory-bound"], tf.calls("memory-bound"))
