"""The CUDA kernels run on the CPU: every op of fastbert.ops.OP_NAMES on CPU tensors through the
kernel emulator (csrc/emu/, built by fastbert/ops/_emulator_build.py into build/emu/).

`FASTBERT_EMULATE=1` in the environment, or `fastbert._backend.use_emulator(True)`, makes the ops'
CPU kernels these emulated ones instead of the twins, so the ops, their autograd and the tests
run the kernels' own source. Each function here mirrors its CUDA binding in csrc/bindings.cpp:
the same checks, the same tensors handed to the same launcher (through csrc/emu/entries.cc).

Settings (`configure(...)`, the `settings(...)` context manager, or the environment):
  order  forward | reverse | warp | random   FASTBERT_EMULATE_ORDER (default forward)
  seed   the random order's seed             FASTBERT_EMULATE_SEED (default 0)
  arch   the architecture under test, 80, 86, 89, 90, 120 (its shared-memory limits)
                                              FASTBERT_EMULATE_ARCH (default 90)
  FASTBERT_EMULATE_LIB: the library to load (e.g. the AddressSanitizer build).
"""
import contextlib
import ctypes
import os
import threading
from pathlib import Path

import torch

from fastbert.ops import _emulator_build

ORDERS = ("forward", "reverse", "warp", "random")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CUDA_ERRORS = {1: "cudaErrorInvalidValue", 9: "cudaErrorInvalidConfiguration", 710: "cudaErrorAssert",
                719: "cudaErrorLaunchFailure"}


class EmulatorError(RuntimeError):
    """An emulated kernel failed: a bad launch, a deadlock, a barrier or mask mismatch, a device
    assert, a __trap(). The message names the kernel, the block and thread, and the source line."""


_lock = threading.RLock()
_lib = None
_settings = {"order": os.environ.get("FASTBERT_EMULATE_ORDER", "forward").strip().lower(),
             "seed": int(os.environ.get("FASTBERT_EMULATE_SEED", "0")),
             "arch": int(os.environ.get("FASTBERT_EMULATE_ARCH", "90"))}

_P, _I64, _I32, _F32, _U32, _U64 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_uint32,
                                    ctypes.c_uint64)
_SIGNATURES = {
    "emu_gather_rows": [_P, _P, _P, _I64, _I64, _I64, _I64],
    "emu_scatter_rows": [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64],
    "emu_layernorm_bwd_num_partials": [_I64, _I64, _I32],
    "emu_layernorm_fwd": [_P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _F32, _I32],
    "emu_layernorm_bwd": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I32],
    "emu_cross_entropy_fwd": [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I32],
    "emu_cross_entropy_bwd": [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I32],
    "emu_attention_fwd": [_P, _P, _P, _P, _P, _I32, _I32, _I32, _I32, _I64, _F32, _I32, _U32, _F32, _U64, _U32,
                          _I32, _P, _P],
    "emu_attention_bwd": [_P, _P, _P, _P, _P, _I32, _I32, _I32, _I32, _I64, _F32, _I32, _U32, _F32, _U64, _U32,
                          _I32, _P, _P, _P, _P, _P, _P],
    "emu_attention_bwd_delta": [_P, _P, _P, _P, _I64, _I32, _I32, _I32],
    "emu_attention_dropout_mask": [_P, _P, _I32, _I32, _I32, _I32, _U32, _F32, _U64, _U32],
    "emu_bias_gelu_bwd_num_partials": [_I64, _I64, _I32],
    "emu_bias_gelu_fwd": [_P, _P, _P, _I64, _I64, _I32, _I32],
    "emu_bias_gelu_bwd": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _I32, _I32],
    "emu_bdrln_bwd_num_partials": [_I64, _I64, _I32],
    "emu_bdrln_fwd": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _F32, ctypes.c_double, _U64, _U32, _I32,
                      _I32],
    "emu_bdrln_bwd": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, ctypes.c_double, _U64, _U32, _I32,
                      _I32, _I32],
    "emu_configure": [_I32, _U64, _I32],
    "emu_last_error_message": [],
    "emu_selftest": [_I32, _P, _P, _P],
}


def library_path() -> Path:
    env = os.environ.get("FASTBERT_EMULATE_LIB")
    return Path(env) if env else _emulator_build.library_path("default")


def available() -> bool:
    """True if the emulator library is built (or loaded)."""
    return _lib is not None or library_path().exists()


def load(path=None, build: bool = True):
    """Loads the emulator library (building the default one first if it is missing or older than csrc/)."""
    global _lib
    with _lock:
        if _lib is not None and path is None:
            return _lib
        path = Path(path) if path is not None else library_path()
        if build and "FASTBERT_EMULATE_LIB" not in os.environ and path == _emulator_build.library_path("default"):
            # a no-op when the library is up to date; after a change to csrc/ the changed files are
            # recompiled, so a stale library (missing a new entry point) is never loaded
            path = _emulator_build.build("default")
        elif not path.exists():
            raise FileNotFoundError(f"the kernel emulator is not built: {path} does not exist "
                                    "(run `bash scripts/emulate.sh` or `python -m fastbert.ops._emulator_build`)")
        lib = ctypes.CDLL(str(path))
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int64 if name.endswith("_num_partials") else ctypes.c_int
        lib.emu_last_error_message.restype = ctypes.c_char_p
        _lib = lib
        return lib


def configure(order: str = None, seed: int = None, arch: int = None) -> None:
    """Sets the thread order, the random order's seed and the emulated architecture."""
    if order is not None and order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if arch is not None and (not isinstance(arch, int) or arch < 50):
        raise ValueError(f"arch must be a compute capability like 80, 86 or 90, got {arch!r}")
    with _lock:
        for key, value in (("order", order), ("seed", seed), ("arch", arch)):
            if value is not None:
                _settings[key] = int(value) if key != "order" else value


def current_settings() -> dict:
    return dict(_settings)


@contextlib.contextmanager
def settings(order: str = None, seed: int = None, arch: int = None):
    """`with settings(order="warp"): ...` runs the emulated kernels inside with these settings."""
    with _lock:
        before = dict(_settings)
        configure(order, seed, arch)
        try:
            yield
        finally:
            _settings.update(before)


def _configured():
    lib = load()
    if _settings["order"] not in ORDERS:
        raise ValueError(f"FASTBERT_EMULATE_ORDER must be one of {ORDERS}, got {_settings['order']!r}")
    lib.emu_configure(ORDERS.index(_settings["order"]), _settings["seed"] & (2 ** 64 - 1), _settings["arch"])
    return lib


def _call(op: str, name: str, *args):
    with _lock:
        lib = _configured()
        rc = getattr(lib, name)(*args)
        if rc != 0:
            message = lib.emu_last_error_message().decode(errors="replace")
            raise EmulatorError(f"fastbert {op} (emulated, sm_{_settings['arch']}): "
                                f"{_CUDA_ERRORS.get(rc, f'CUDA error {rc}')}: {message or 'no message'}")


def _ptr(t):
    return None if t is None else t.data_ptr()


def _check_cpu(op, *tensors):
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{op}: the emulated kernels take CPU tensors, got one on {t.device}")


def _dtype(t, op):
    if t.dtype not in _DTYPES:
        raise TypeError(f"{op}: expected float32, float16 or bfloat16, got {t.dtype}")
    return _DTYPES[t.dtype]


def _dense_rows(x):
    return x if x.stride(1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------- gather


def _rows_and_index(x, index, op):
    _check_cpu(op, x, index)
    if x.dim() != 2:
        raise ValueError(f"{op}: expected a 2-d [rows, hidden] tensor, got {x.dim()}-d")
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: expected a 1-d int64 or int32 index, got {index.dim()}-d {index.dtype}")


def gather_rows(x, index):
    _rows_and_index(x, index, "gather_rows")
    x = _dense_rows(x)
    index = index.long().contiguous()
    out = torch.empty((index.shape[0], x.shape[1]), dtype=x.dtype)
    _call("gather_rows", "emu_gather_rows", _ptr(x), _ptr(out), _ptr(index), index.shape[0],
          x.shape[1] * x.element_size(), x.stride(0) * x.element_size(), out.stride(0) * out.element_size())
    return out


def scatter_rows(src, index, num_rows):
    _rows_and_index(src, index, "scatter_rows")
    if src.shape[0] != index.shape[0]:
        raise ValueError(f"scatter_rows: src has {src.shape[0]} rows but index has {index.shape[0]} entries")
    src = _dense_rows(src)
    index = index.long().contiguous()
    out = torch.empty((num_rows, src.shape[1]), dtype=src.dtype)
    inverse = torch.empty(num_rows, dtype=torch.int32)
    _call("scatter_rows", "emu_scatter_rows", _ptr(src), _ptr(out), _ptr(index), _ptr(inverse), index.shape[0],
          num_rows, src.shape[1] * src.element_size(), src.stride(0) * src.element_size(),
          out.stride(0) * out.element_size())
    return out


# ----------------------------------------------------------------------------- layernorm


def _fp32_param(p, hidden, what):
    if p is None:
        return None
    if p.dim() != 1 or p.shape[0] != hidden:
        raise ValueError(f"layernorm: {what} must have shape [{hidden}], got {tuple(p.shape)}")
    return p.float().contiguous()


def layernorm_fwd(x, residual, weight, bias, eps):
    _check_cpu("layernorm_fwd", x, residual, weight, bias)
    dtype = _dtype(x, "layernorm_fwd")
    hidden = x.shape[-1]
    x = x.contiguous()
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError("layernorm_fwd: residual must match x in shape and dtype")
        residual = residual.contiguous()
    weight, bias = _fp32_param(weight, hidden, "weight"), _fp32_param(bias, hidden, "bias")
    rows = x.numel() // hidden if hidden else 0
    y = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean, rstd = torch.empty(rows), torch.empty(rows)
    _call("layernorm_fwd", "emu_layernorm_fwd", _ptr(x), _ptr(residual), _ptr(weight), _ptr(bias), _ptr(y),
          _ptr(total) if residual is not None else None, _ptr(mean), _ptr(rstd), rows, hidden, float(eps), dtype)
    return y, total, mean, rstd


def layernorm_bwd_num_partials(rows, hidden, dtype):
    """Rows of the backward's workspace on the emulated architecture (one per block of its first kernel)."""
    with _lock:
        return _configured().emu_layernorm_bwd_num_partials(rows, hidden, _DTYPES[dtype])


def layernorm_bwd(dy, h, mean, rstd, weight):
    _check_cpu("layernorm_bwd", dy, h, mean, rstd, weight)
    if dy.shape != h.shape or dy.dtype != h.dtype:
        raise ValueError("layernorm_bwd: dy and h must match in shape and dtype")
    dtype = _dtype(h, "layernorm_bwd")
    hidden = h.shape[-1]
    rows = h.numel() // hidden
    dy, h = dy.contiguous(), h.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    weight = _fp32_param(weight, hidden, "weight")
    partials = layernorm_bwd_num_partials(rows, hidden, h.dtype)
    dx = torch.empty_like(h)
    workspace = torch.empty((2, partials, hidden))
    dweight, dbias = torch.empty(hidden), torch.empty(hidden)
    _call("layernorm_bwd", "emu_layernorm_bwd", _ptr(dy), _ptr(h), _ptr(mean), _ptr(rstd), _ptr(weight), _ptr(dx),
          _ptr(workspace), _ptr(dweight), _ptr(dbias), rows, hidden, dtype)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- cross_entropy


def _logits_labels(logits, labels, op):
    _check_cpu(op, logits, labels)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-d [rows, classes], got {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: labels must be int64/int32 [{logits.shape[0]}], got {tuple(labels.shape)}")


def cross_entropy_fwd(logits, labels, ignore_index):
    _logits_labels(logits, labels, "cross_entropy_fwd")
    dtype = _dtype(logits, "cross_entropy_fwd")
    logits = _dense_rows(logits)
    labels = labels.long().contiguous()
    rows = logits.shape[0]
    loss, lse = torch.empty(rows), torch.empty(rows)
    _call("cross_entropy_fwd", "emu_cross_entropy_fwd", _ptr(logits), _ptr(labels), _ptr(loss), _ptr(lse), rows,
          logits.shape[1], logits.stride(0), ignore_index, dtype)
    return loss, lse


def _cross_entropy_bwd_into(grad_loss, logits, labels, lse, ignore_index, grad, op):
    _logits_labels(logits, labels, op)
    rows = logits.shape[0]
    if grad_loss.numel() != rows or lse.numel() != rows or lse.dtype != torch.float32:
        raise ValueError(f"{op}: grad_loss and lse (fp32) must have one value per row")
    grad_loss = grad_loss.float().contiguous()
    labels = labels.long().contiguous()
    lse = lse.contiguous()
    _call(op, "emu_cross_entropy_bwd", _ptr(grad_loss), _ptr(logits), _ptr(grad), _ptr(labels), _ptr(lse), rows,
          logits.shape[1], logits.stride(0), grad.stride(0), ignore_index, _dtype(logits, op))


def cross_entropy_bwd(grad_loss, logits, labels, lse, ignore_index):
    logits = _dense_rows(logits) if logits.dim() == 2 else logits
    grad = torch.empty(logits.shape, dtype=logits.dtype)
    _cross_entropy_bwd_into(grad_loss, logits, labels, lse, ignore_index, grad, "cross_entropy_bwd")
    return grad


def cross_entropy_bwd_(grad_loss, logits, labels, lse, ignore_index):
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("cross_entropy_bwd_: in place needs logits with unit stride along classes")
    _cross_entropy_bwd_into(grad_loss, logits, labels, lse, ignore_index, logits, "cross_entropy_bwd_")


# ----------------------------------------------------------------------------- attention


def _dropout(dropout_p, seed, offset):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    from fastbert.ops.attention import attention_keep_scale, attention_keep_threshold  # attention.h's rule
    return (int(dropout_p > 0.0), attention_keep_threshold(dropout_p), attention_keep_scale(dropout_p),
            int(seed) & (2 ** 64 - 1),
            int(offset) & 0xFFFFFFFF)


def _operand(x):
    ok = x.stride(2) == 1 and x.stride(0) % 8 == 0 and x.stride(1) % 8 == 0 and x.data_ptr() % 16 == 0
    return x if ok else x.clone(memory_format=torch.contiguous_format)


def _attention_inputs(q, k, v, cu_seqlens, max_seqlen, op):
    _check_cpu(op, q, k, v, cu_seqlens)
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{op}: q, k, v must be one [total_tokens, heads, head_dim] shape")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: the kernel takes float16 or bfloat16 q, k, v of one dtype, got {q.dtype}")
    if q.shape[2] not in (32, 64, 128):
        raise ValueError(f"{op}: head_dim must be 32, 64 or 128, got {q.shape[2]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{op}: cu_seqlens must be a 1-d int32 tensor of batch + 1 offsets")
    if not 0 <= max_seqlen <= q.shape[0]:
        raise ValueError(f"{op}: max_seqlen {max_seqlen} out of range")


def _problem(q, k, v, cu, max_seqlen, scale, dropout_p, seed, offset):
    strides = torch.tensor([q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1)],
                           dtype=torch.int64)
    args = (_ptr(q), _ptr(k), _ptr(v), _ptr(cu), _ptr(strides), cu.shape[0] - 1, q.shape[1], q.shape[2],
            max_seqlen, q.shape[0], float(scale), *_dropout(dropout_p, seed, offset), _DTYPES[q.dtype])
    return args, strides  # keep `strides` alive over the call


def attention_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset):
    _attention_inputs(q, k, v, cu_seqlens, max_seqlen, "attention_varlen_fwd")
    q, k, v = _operand(q), _operand(k), _operand(v)
    cu = cu_seqlens.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty((q.shape[1], q.shape[0]))
    args, _keep = _problem(q, k, v, cu, max_seqlen, scale, dropout_p, seed, offset)
    _call("attention_varlen_fwd", "emu_attention_fwd", *args, _ptr(out), _ptr(lse))
    return out, lse


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset):
    _attention_inputs(q, k, v, cu_seqlens, max_seqlen, "attention_varlen_bwd")
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError("attention_varlen_bwd: dout and out must have the shape of q")
    if lse.dtype != torch.float32 or tuple(lse.shape) != (q.shape[1], q.shape[0]):
        raise ValueError("attention_varlen_bwd: lse must be float32 [heads, total_tokens]")
    q, k, v = _operand(q), _operand(k), _operand(v)
    dout = _operand(dout.to(q.dtype).contiguous())
    lse, cu = lse.contiguous(), cu_seqlens.contiguous()
    delta = _attention_bwd_delta(dout, out.to(q.dtype), "attention_varlen_bwd")
    dq_accum = torch.zeros((q.shape[0] + 64, *q.shape[1:]))  # attention.h: kAttentionBlockM rows past the end
    dk, dv = torch.empty(q.shape, dtype=q.dtype), torch.empty(q.shape, dtype=q.dtype)
    args, _keep = _problem(q, k, v, cu, max_seqlen, scale, dropout_p, seed, offset)
    _call("attention_varlen_bwd", "emu_attention_bwd", *args, _ptr(dout), _ptr(lse), _ptr(delta), _ptr(dq_accum),
          _ptr(dk), _ptr(dv))
    return dq_accum[:q.shape[0]].to(q.dtype), dk, dv


def _attention_bwd_delta(dout, out, op):
    dout, out = _operand(dout), _operand(out)
    strides = torch.tensor([dout.stride(0), dout.stride(1), out.stride(0), out.stride(1)], dtype=torch.int64)
    delta = torch.empty((dout.shape[1], dout.shape[0]))
    _call(op, "emu_attention_bwd_delta", _ptr(dout), _ptr(out), _ptr(strides), _ptr(delta), dout.shape[0],
          dout.shape[1], dout.shape[2], _DTYPES[dout.dtype])
    return delta


def attention_bwd_delta(dout, out):
    _check_cpu("attention_bwd_delta", dout, out)
    if dout.dim() != 3 or out.shape != dout.shape:
        raise ValueError("attention_bwd_delta: dout and out must be one [total_tokens, heads, head_dim] shape")
    if dout.dtype not in (torch.float16, torch.bfloat16) or out.dtype != dout.dtype:
        raise TypeError(f"attention_bwd_delta: the kernel takes float16 or bfloat16 of one dtype, got {dout.dtype}")
    if dout.shape[2] not in (32, 64, 128):
        raise ValueError(f"attention_bwd_delta: head_dim must be 32, 64 or 128, got {dout.shape[2]}")
    return _attention_bwd_delta(dout, out, "attention_bwd_delta")


def attention_dropout_mask(cu_seqlens, heads, max_seqlen, dropout_p, seed, offset):
    _check_cpu("attention_dropout_mask", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError("attention_dropout_mask: cu_seqlens must be a 1-d int32 tensor")
    cu = cu_seqlens.contiguous()
    batch = cu.shape[0] - 1
    keep = torch.empty((batch, heads, max_seqlen, max_seqlen), dtype=torch.bool)
    _call("attention_dropout_mask", "emu_attention_dropout_mask", _ptr(cu), _ptr(keep), batch, heads, max_seqlen,
          *_dropout(dropout_p, seed, offset))
    return keep


def _num_partials(name, rows, cols, dtype):
    """A launcher's workspace rows under the current settings (the architecture's SM count): the
    caller holds _lock from here to its launch, so both see one architecture."""
    lib = load()
    lib.emu_configure(ORDERS.index(_settings["order"]), _settings["seed"] & (2 ** 64 - 1), _settings["arch"])
    return getattr(lib, name)(rows, cols, dtype)


# ----------------------------------------------------------------------------- bias_gelu

_GELU_KINDS = {"none": 0, "tanh": 1}


def _bias_gelu_inputs(x, bias, approximate, op):
    _check_cpu(op, x, bias)
    if approximate not in _GELU_KINDS:
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got {tuple(x.shape)}")
    return _fp32_param(bias, x.shape[-1], "bias")


def bias_gelu_fwd(x, bias, approximate):
    bias = _bias_gelu_inputs(x, bias, approximate, "bias_gelu_fwd")
    dtype = _dtype(x, "bias_gelu_fwd")
    x = x.contiguous()
    cols = x.shape[-1]
    y = torch.empty_like(x)
    _call("bias_gelu_fwd", "emu_bias_gelu_fwd", _ptr(x), _ptr(bias), _ptr(y), x.numel() // cols, cols,
          _GELU_KINDS[approximate], dtype)
    return y


def bias_gelu_bwd(dy, x, bias, approximate):
    bias_dtype = bias.dtype
    bias = _bias_gelu_inputs(x, bias, approximate, "bias_gelu_bwd")
    _check_cpu("bias_gelu_bwd", dy)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError("bias_gelu_bwd: dy and x must match in shape and dtype")
    dtype = _dtype(x, "bias_gelu_bwd")
    x, dy = x.contiguous(), dy.contiguous()
    cols = x.shape[-1]
    rows = x.numel() // cols
    with _lock:
        partials = _num_partials("emu_bias_gelu_bwd_num_partials", rows, cols, dtype)
        dx = torch.empty_like(x)
        workspace = torch.empty((partials, cols))
        dbias = torch.empty(cols, dtype=bias_dtype)  # in the bias's dtype, as the binding
        _call("bias_gelu_bwd", "emu_bias_gelu_bwd", _ptr(dy), _ptr(x), _ptr(bias), _ptr(dx), _ptr(workspace),
              _ptr(dbias), rows, cols, _GELU_KINDS[approximate], dtype, _DTYPES[bias_dtype])
    return dx, dbias


# ----------------------------------------------------------------------------- bias_dropout_residual_layernorm


def _row_dropout(dropout_p, seed, offset, op):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p), int(seed) & (2 ** 64 - 1), int(offset) & 0xFFFFFFFF


def bias_dropout_residual_layernorm_fwd(x, bias, residual, weight, ln_bias, eps, dropout_p, seed, offset):
    op = "bias_dropout_residual_layernorm_fwd"
    _check_cpu(op, x, bias, residual, weight, ln_bias)
    dtype = _dtype(x, op)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"{op}: residual must match x in shape and dtype")
    hidden = x.shape[-1]
    x, residual = x.contiguous(), residual.contiguous()
    bias, weight, ln_bias = (_fp32_param(t, hidden, name) for t, name in
                             ((bias, "bias"), (weight, "weight"), (ln_bias, "ln_bias")))
    rows = x.numel() // hidden if hidden else 0
    y, h = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = torch.empty(rows), torch.empty(rows)
    _call(op, "emu_bdrln_fwd", _ptr(x), _ptr(bias), _ptr(residual), None, _ptr(weight), _ptr(ln_bias), _ptr(y),
          _ptr(h), _ptr(mean), _ptr(rstd), rows, hidden, float(eps), *_row_dropout(dropout_p, seed, offset, op), 0,
          dtype)
    return y, h, mean, rstd


def _bdrln_bwd(op, dy, h, mean, rstd, weight, dropout_p, seed, offset, after_norm):
    """emu_bdrln_bwd in either mode: (dx or None, dresidual, dweight, dbeta, dbias). after_norm 1 is the
    embeddings' mode (dropout after the LayerNorm; its input gradient comes back in dresidual, no dx)."""
    _check_cpu(op, dy, h, mean, rstd, weight)
    if dy.shape != h.shape or dy.dtype != h.dtype:
        raise ValueError(f"{op}: dy and h must match in shape and dtype")
    dtype = _dtype(h, op)
    hidden = h.shape[-1]
    rows = h.numel() // hidden
    dy, h, mean, rstd = dy.contiguous(), h.contiguous(), mean.contiguous(), rstd.contiguous()
    grad_dtype = weight.dtype if weight is not None else torch.float32  # the binding's: weight's dtype
    weight = _fp32_param(weight, hidden, "weight")
    with _lock:
        partials = _num_partials("emu_bdrln_bwd_num_partials", rows, hidden, dtype)
        dx = None if after_norm else torch.empty_like(h)
        dresidual = torch.empty_like(h)
        workspace = torch.empty((3, partials, hidden))
        dweight, dbeta, dbias = (torch.empty(hidden, dtype=grad_dtype) for _ in range(3))
        _call(op, "emu_bdrln_bwd", _ptr(dy), _ptr(h), _ptr(mean), _ptr(rstd), _ptr(weight), _ptr(dx),
              _ptr(dresidual), _ptr(workspace), _ptr(dweight), _ptr(dbeta), _ptr(dbias), rows, hidden,
              *_row_dropout(dropout_p, seed, offset, op), after_norm, dtype, _DTYPES[grad_dtype])
    return dx, dresidual, dweight, dbeta, dbias


def bias_dropout_residual_layernorm_bwd(dy, h, mean, rstd, weight, dropout_p, seed, offset):
    return _bdrln_bwd("bias_dropout_residual_layernorm_bwd", dy, h, mean, rstd, weight, dropout_p, seed, offset, 0)


# ----------------------------------------------------------------------------- embeddings_layernorm_dropout
# The embeddings' mode of the bias_dropout_residual_layernorm kernels (csrc/bindings.cpp does the same).


def embeddings_layernorm_dropout_fwd(a, b, c, weight, bias, eps, dropout_p, seed, offset):
    op = "embeddings_layernorm_dropout_fwd"
    _check_cpu(op, a, b, c, weight, bias)
    dtype = _dtype(a, op)
    for t in (b, c):
        if t is not None and (t.shape != a.shape or t.dtype != a.dtype):
            raise ValueError(f"{op}: b and c must match a in shape and dtype")
    hidden = a.shape[-1]
    a, b = a.contiguous(), b.contiguous()
    c = c.contiguous() if c is not None else None
    weight, bias = _fp32_param(weight, hidden, "weight"), _fp32_param(bias, hidden, "bias")
    rows = a.numel() // hidden if hidden else 0
    y, h = torch.empty_like(a), torch.empty_like(a)
    mean, rstd = torch.empty(rows), torch.empty(rows)
    _call(op, "emu_bdrln_fwd", _ptr(a), None, _ptr(b), _ptr(c), _ptr(weight), _ptr(bias), _ptr(y), _ptr(h),
          _ptr(mean), _ptr(rstd), rows, hidden, float(eps), *_row_dropout(dropout_p, seed, offset, op), 1, dtype)
    return y, h, mean, rstd


def embeddings_layernorm_dropout_bwd(dy, h, mean, rstd, weight, dropout_p, seed, offset):
    _, dh, dweight, dbias, _ = _bdrln_bwd("embeddings_layernorm_dropout_bwd", dy, h, mean, rstd, weight, dropout_p,
                                          seed, offset, 1)
    return dh, dweight, dbias
