"""The per-feature parameters (LayerNorm weight and bias, a dense layer's bias) as the fused kernels
read them: fp32. The bindings (csrc/bindings.cpp `feature_param`, `fp32_param`) cast a bf16/fp16
parameter to fp32 on every call: a copy kernel and an allocation per parameter per op, forward and
backward. For calls where autograd does not need the parameter's gradient (inference, a model in
bf16/fp16 under torch.no_grad() or with frozen parameters) `kernel_params` hands the op an fp32
copy made once and kept until the parameter changes, so the binding's cast is a no-op.

A copy is remade when the parameter's version counter moves (every in-place write autograd sees:
an optimizer step, load_state_dict, `with torch.no_grad(): p.copy_(...)`) or its storage, shape
or strides change (`p.data = other`). Writes through `p.data` are not seen, as autograd does not
see them either (torch gives `.data` its own version counter). Parameters whose gradient is needed
go to the op as they are (its autograd must see them; they change every step anyway), as do fp32
ones (no copy to save) and everything while torch.compile traces (which fuses the cast itself).
"""
import torch
from torch.utils.weak import WeakIdKeyDictionary

_copies = WeakIdKeyDictionary()  # parameter -> (its state when copied, the fp32 copy)


def _state(p):
    return p._version, p.data_ptr(), p.device, tuple(p.shape), tuple(p.stride())


def fp32_copy(p: torch.Tensor) -> torch.Tensor:
    """p as a contiguous fp32 tensor, made once per state of p (see the module docstring)."""
    if p.is_inference() or type(p) not in (torch.Tensor, torch.nn.Parameter) or p.device.type == "meta":
        return p.float().contiguous()  # no version counter to key on (inference tensors), or not plain
    state = _state(p)
    kept = _copies.get(p)
    if kept is not None and kept[0] == state:
        return kept[1]
    with torch.inference_mode(False):  # a normal tensor, usable outside inference mode later
        copy = p.detach().float().contiguous()
    _copies[p] = (state, copy)
    return copy


def kernel_params(*params):
    """Each parameter (or None) as the fused op should get it: the kept fp32 copy of a bf16/fp16
    parameter whose gradient autograd does not need, else the parameter itself."""
    if torch.compiler.is_compiling():
        return params
    grad = torch.is_grad_enabled()
    return tuple(p if p is None or p.dtype == torch.float32 or (grad and p.requires_grad) else fp32_copy(p)
                 for p in params)
