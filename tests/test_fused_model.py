"""The model on the fused kernel path: BertForPreTraining's forward and backward with every op's
CUDA kernel run by the kernel emulator (bias_gelu, bias_dropout_residual_layernorm in both post-LN
blocks of every layer, embeddings_layernorm_dropout, layernorm, gather, cross_entropy, and attention
in bf16) equals the same
model on the PyTorch twins."""
import pytest
import torch

import fastbert
from fastbert import BertForPreTraining, _backend
from fastbert.ops import _emulator

from bert_inputs import make_batch, random_config
from emulation import ORDERS, emulated, needs_emulator

pytestmark = [needs_emulator, pytest.mark.skipif(
    not _backend.has_op("embeddings_layernorm_dropout_fwd"),
    reason="fastbert._C lacks the fused ops (not built, or built before them)")]

COUNTED = ["bias_gelu_fwd", "bias_gelu_bwd", "bias_dropout_residual_layernorm_fwd",
           "bias_dropout_residual_layernorm_bwd", "embeddings_layernorm_dropout_fwd",
           "embeddings_layernorm_dropout_bwd",
           "layernorm_fwd", "cross_entropy_fwd", "attention_varlen_fwd"]


def _counting(monkeypatch):
    calls = dict.fromkeys(COUNTED, 0)
    for name in COUNTED:
        fn = getattr(_emulator, name)

        def wrapper(*args, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(_emulator, name, wrapper)
    return calls


def _loss_and_grads(model, batch):
    ids, mask, tt, labels, nsp = batch
    out = model(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    params = [p for p in model.parameters() if p.requires_grad]
    return (out.loss,) + torch.autograd.grad(out.loss, params)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype, hidden_act, padding_free", [(torch.float32, "gelu", None),
                                                             (torch.bfloat16, "gelu_pytorch_tanh", None),
                                                             (torch.bfloat16, "gelu_new", True)])
def test_pretraining_forward_backward_emulated_equals_twins(seed, monkeypatch, order, dtype, hidden_act,
                                                            padding_free):
    # hidden 64 (16-byte path), intermediate 150 (bias_gelu's scalar path), head_dim 32 (the attention
    # kernel in bf16); no dropout, so both paths compute one function
    config = random_config(hidden_size=64, num_attention_heads=2, intermediate_size=150, hidden_act=hidden_act,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(config).to(dtype).train()
    model.padding_free = padding_free  # True: [tokens, hidden] through every layer, the varlen attention
    batch = make_batch(config, [9, 4, 1])
    with fastbert.kernels(False):
        twin = _loss_and_grads(model, batch)
    calls = _counting(monkeypatch)
    with emulated(order=order, seed=seed):
        kern = _loss_and_grads(model, batch)
    layers = config.num_hidden_layers
    assert calls["bias_gelu_fwd"] == calls["bias_gelu_bwd"] == layers
    assert calls["bias_dropout_residual_layernorm_fwd"] == calls["bias_dropout_residual_layernorm_bwd"] == 2 * layers
    assert calls["embeddings_layernorm_dropout_fwd"] == calls["embeddings_layernorm_dropout_bwd"] == 1
    assert calls["layernorm_fwd"] == 1 and calls["cross_entropy_fwd"] == 2  # the MLM head's; MLM + NSP
    assert calls["attention_varlen_fwd"] == (layers if dtype == torch.bfloat16 else 0)  # the kernel takes 16-bit
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.0, atol=0.0)
    for i, (k, t) in enumerate(zip(kern, twin)):
        if dtype == torch.float32:
            torch.testing.assert_close(k, t, **tol, msg=f"output {i}")
        else:  # bf16: the two paths round differently; relative to the gradient's size
            err = (k.float() - t.float()).abs().max().item()
            assert err <= 0.05 * t.float().abs().max().item() + 1e-3, f"output {i}: error {err}"


def test_dropout_on_the_fused_path_follows_torch_manual_seed(monkeypatch):
    """With dropout, the fused kernels draw (seed, offset) from torch's CPU generator: one seed, one
    result; another seed, another; and dropout really acts (the result differs from evaluation)."""
    config = random_config(hidden_size=64, num_attention_heads=2, intermediate_size=64,
                           hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForPreTraining(config).train()
    batch = make_batch(config, [7, 5])

    def loss(s, train=True):
        model.train(train)
        torch.manual_seed(s)
        with emulated(order="forward"):
            return _loss_and_grads(model, batch)[0].item()

    assert loss(1) == loss(1)
    assert loss(1) != loss(2)
    assert loss(1) != loss(1, train=False)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("used", ["all", "no residual", "no key"])
def test_projections_node_equals_separate_linears(bias, used):
    """model.project (the kernel path's q, k, v + residual, and the intermediate dense + residual): one
    autograd node whose backward sums x's gradients inside the matmuls gives the values and every
    gradient (x, each weight and bias) of the separate linears and the residual use of x."""
    from fastbert.model import project
    torch.manual_seed(0)
    linears = [torch.nn.Linear(16, n, dtype=torch.float64) for n in (16, 16, 24)]
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    upstream = [torch.randn(2, 5, n, dtype=torch.float64) for n in (16, 16, 24, 16)]  # q, k, v, residual
    keep = [not (used == "no key" and i == 1) and not (used == "no residual" and i == 3) for i in range(4)]
    leaves = [x] + [p for lin in linears for p in ((lin.weight, lin.bias) if bias else (lin.weight,))]

    def grads(outs):
        loss = sum((o * u).sum() for o, u, k in zip(outs, upstream, keep) if k)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves, allow_unused=True))

    separate = grads([torch.nn.functional.linear(x, lin.weight, lin.bias if bias else None) for lin in linears] + [x])
    fused = grads(project(x, linears, bias=bias))
    assert len(fused) == len(separate)
    for i, (f, s) in enumerate(zip(fused, separate)):
        if s is None:
            assert f is None or not f.any(), f"output {i}: expected no gradient"
        else:
            torch.testing.assert_close(f, s, rtol=1e-12, atol=1e-12, msg=f"output {i}")
