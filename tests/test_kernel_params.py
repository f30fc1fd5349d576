"""The fused ops' per-feature parameters (LayerNorm weight/bias, dense bias) in bf16/fp16: where
autograd does not need their gradient, the kernels get an fp32 copy made once per state of the
parameter (fastbert/ops/_kernel_params.py) instead of the binding's cast on every call; the copy
is remade when the parameter changes. Under the emulator: the four fused ops and a bf16 model."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastbert
from fastbert import BertModel, _backend, ops
from fastbert.ops._kernel_params import fp32_copy, kernel_params

from bert_inputs import make_batch, random_config
from emulation import emulated, needs_emulator

needs_ops = pytest.mark.skipif(not _backend.has_op("embeddings_layernorm_dropout_fwd"),
                               reason="fastbert._C lacks the fused ops (not built, or built before them)")


class ParamCasts(TorchDispatchMode):
    """Counts the dtype conversions that read one of `params` (by storage)."""

    def __init__(self, params):
        super().__init__()
        self.ptrs = {p.data_ptr() for p in params}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.ptrs:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_copy_is_kept_until_the_parameter_changes():
    p = torch.nn.Parameter(torch.randn(40, dtype=torch.bfloat16))
    first = fp32_copy(p)
    assert first.dtype == torch.float32 and torch.equal(first, p.detach().float())
    assert fp32_copy(p) is first
    with torch.no_grad():
        p.mul_(2)  # an optimizer step's kind of write: the version counter moves
    second = fp32_copy(p)
    assert second is not first and torch.equal(second, p.detach().float())
    p.data = torch.randn(40, dtype=torch.bfloat16)  # new storage
    assert torch.equal(fp32_copy(p), p.detach().float())
    module = torch.nn.LayerNorm(40, dtype=torch.float16)
    kept = fp32_copy(module.weight)
    module.load_state_dict({"weight": torch.randn(40), "bias": torch.randn(40)})
    assert fp32_copy(module.weight) is not kept and torch.equal(fp32_copy(module.weight), module.weight.detach().float())


def test_parameters_that_need_a_gradient_or_are_fp32_go_as_they_are():
    half = torch.nn.Parameter(torch.randn(8, dtype=torch.float16))
    full = torch.nn.Parameter(torch.randn(8))
    got = kernel_params(half, full, None)
    assert got[0] is half and got[1] is full and got[2] is None  # autograd must see `half`
    with torch.no_grad():
        got = kernel_params(half, full)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], half.detach().float()) and got[1] is full
    half.requires_grad_(False)  # frozen
    assert kernel_params(half)[0].dtype == torch.float32


def test_inference_mode_copies_are_usable_outside_it():
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    with torch.inference_mode():
        inside = kernel_params(p)[0]
    assert not inside.is_inference()
    x = torch.randn(8, requires_grad=True)
    (x * inside).sum().backward()  # saved for backward outside inference mode: allowed
    with torch.inference_mode():
        t = torch.randn(8, dtype=torch.bfloat16)  # an inference tensor: no version counter to key on
        assert torch.equal(kernel_params(t)[0], t.float())


def _op_calls(dtype):
    """The four fused ops' public functions with `dtype` parameters (hidden 48; intermediate 96)."""
    x, res = torch.randn(5, 48, dtype=dtype), torch.randn(5, 48, dtype=dtype)
    inter = torch.randn(5, 96, dtype=dtype)
    w, b, b2 = (torch.nn.Parameter(torch.randn(48, dtype=dtype)) for _ in range(3))
    gelu_bias = torch.nn.Parameter(torch.randn(96, dtype=dtype))
    calls = [(lambda: ops.layer_norm(x, w, b, 1e-12, residual=res), (w, b)),
             (lambda: ops.bias_gelu(inter, gelu_bias), (gelu_bias,)),
             (lambda: ops.bias_dropout_residual_layer_norm(x, b2, res, w, b), (b2, w, b)),
             (lambda: ops.embeddings_layer_norm_dropout(x, res, x, w, b), (w, b))]
    return calls


@needs_ops
@needs_emulator
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_ops_cast_each_parameter_once_not_per_call(seed, dtype):
    for i, (call, params) in enumerate(_op_calls(dtype)):
        with torch.no_grad(), emulated(order="warp"):
            with ParamCasts(params) as first:
                y1 = call()
            with ParamCasts(params) as second:
                y2 = call()
            assert first.count <= len(params) and second.count == 0, (i, first.count, second.count)
            assert torch.equal(y1, y2), i
            params[0].add_(1.0)  # the parameter changes: its copy is remade, the result follows
            with ParamCasts(params) as third:
                y3 = call()
            assert third.count == 1, (i, third.count)
        with emulated(order="warp"):  # the parameters need a gradient here: they go as they are, cast per call
            assert torch.equal(y3, call().detach()), i  # the kept copy gives the kernels the same fp32 values
        with torch.no_grad(), fastbert.kernels(False):
            torch.testing.assert_close(y3.float(), call().float(), rtol=2e-2, atol=2e-2)  # the unfused ops


@needs_ops
@needs_emulator
def test_bf16_model_inference_casts_no_parameter_after_the_first_forward(seed):
    config = random_config(hidden_size=64, num_attention_heads=2, intermediate_size=150, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    model = BertModel(config).to(torch.bfloat16).eval()
    model.padding_free = True  # one path for every call below (on the CPU the default differs with and without a gradient)
    ids, mask, tt, _, _ = make_batch(config, [9, 4, 1])
    params = list(model.parameters())
    with torch.no_grad(), emulated(order="warp"):
        with ParamCasts(params) as first:
            y1 = model(ids, mask, tt).last_hidden_state
        with ParamCasts(params) as second:
            y2 = model(ids, mask, tt).last_hidden_state
    assert first.count > 0 and second.count == 0, (first.count, second.count)
    assert torch.equal(y1, y2)
    with emulated(order="warp"):  # with gradients: the parameters go as they are, cast on every call
        assert torch.equal(y1, model(ids, mask, tt).last_hidden_state.detach())
