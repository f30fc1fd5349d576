"""Memory traffic of one BERT encoder layer, forward + backward: COUNTED from the ops it runs, not timed.

    python scripts/traffic_report.py [--hidden 768 --heads 12 --intermediate 3072 --seq 128 --batch 32]
                                     [--dtype bf16] [--json traffic.json] [--quiet]

Runs one layer in training mode (dropout as configured) twice: fastbert's BertLayer on its kernel
path (padding-free, as the trainer runs it: [tokens, hidden] with a Packing) and transformers'
BertLayer with attn_implementation="sdpa". Nothing is computed: the inputs are fake tensors (torch's
FakeTensorMode, shapes and dtypes only), and a TorchDispatchMode records every op the dispatcher
runs, forward and backward, under its own name (aten.addmm, fastbert.layernorm_fwd, ...), so a
fastbert op added later is counted by itself. Per op: the bytes it reads (its tensor inputs) and
writes (its tensor outputs), each tensor counted once per op by the elements its strides reach (a
broadcast bias is its own size, a view of a view no more than it spans).

Kinds: matmul (mm/addmm/bmm...), attention (fused attention kernels), view (metadata only: no bytes,
not listed), and memory-bound (everything else: elementwise, dropout, reductions such as a bias
gradient, normalization, copies). The memory-bound op count is the "elementwise/normalization ops"
of issue 14.

How each path is made to run its GPU op sequence without a GPU:
- fastbert: its ops pick the kernel path through the emulator switch (`_backend.emulation`), so the
  dispatcher sees torch.ops.fastbert.* with their registered fake kernels (no emulation runs);
  needs fastbert._C built (the op schemas).
- transformers: on a GPU, sdpa with bf16/fp16 and head_dim <= 256 runs the flash kernel
  (aten._scaled_dot_product_flash_attention, dropout included); on fake CPU tensors torch would pick
  the math fallback, which materializes the [batch, heads, seq, seq] scores. The script routes
  F.scaled_dot_product_attention to the flash op while transformers' layer runs, so its count is
  what the GPU runs (flash takes no mask: the layer runs unpadded; with a padding mask a GPU runs
  the memory-efficient kernel, whose traffic is the same order). F.dropout is routed to torch's
  fused native_dropout, the op CUDA runs (the CPU would run bernoulli_, div_ and mul).
Counted: weights and weight gradients too (they are op inputs/outputs). Not counted: a kernel's
internal workspaces (e.g. layernorm_bwd's dgamma/dbeta partials), which no op signature shows,
and the optimizer step.
"""
import argparse
import contextlib
import json
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

aten = torch.ops.aten
MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation"}
ATTENTION_PREFIXES = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "attention_varlen")
# ops that only make a new view of (or name) a tensor: no data moves
VIEWS = {"view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "detach", "alias", "as_strided",
         "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes", "unbind", "chunk", "narrow",
         "lift_fresh", "_reshape_alias", "view_as", "numpy_T", "sym_size", "sym_stride", "sym_numel",
         "sym_storage_offset", "is_same_size", "_local_scalar_dense", "empty", "empty_like", "empty_strided",
         "new_empty", "new_empty_strided"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements t's strides reach: a broadcast (stride 0) dimension counts once."""
    if t.numel() == 0:
        return 0
    reach = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return reach * t.element_size()


def op_name(func) -> str:
    """'aten.addmm', 'fastbert.layernorm_fwd': namespace and op, without the overload."""
    schema = func._schema.name  # "aten::addmm"
    return schema.replace("::", ".")


def kind_of(name: str) -> str:
    namespace, base = name.split(".", 1)
    base = base.rstrip("_")  # in-place add_ is add
    if namespace == "prim" or base in VIEWS:
        return "view"
    if base in MATMUL:
        return "matmul"
    if base.startswith(ATTENTION_PREFIXES):
        return "attention"
    return "memory-bound"


@dataclass
class OpCount:
    calls: int = 0
    read: int = 0
    written: int = 0


@dataclass
class Traffic:
    """Per-op calls and bytes read/written, in the order ops first ran."""
    ops: OrderedDict = field(default_factory=OrderedDict)  # name -> OpCount

    def add(self, name, read, written):
        c = self.ops.setdefault(name, OpCount())
        c.calls += 1
        c.read += read
        c.written += written

    def rows(self):
        return [(name, kind_of(name), c) for name, c in self.ops.items() if kind_of(name) != "view"]

    def total_bytes(self, kind=None):
        return sum(c.read + c.written for _, k, c in self.rows() if kind is None or k == kind)

    def calls(self, kind):
        return sum(c.calls for _, k, c in self.rows() if k == kind)

    def as_dict(self):
        return {"ops": {n: {"kind": k, "calls": c.calls, "read_bytes": c.read, "written_bytes": c.written}
                        for n, k, c in self.rows()},
                "total_bytes": self.total_bytes(), "memory_bound_ops": self.calls("memory-bound"),
                "memory_bound_bytes": self.total_bytes("memory-bound")}


class Recorder(TorchDispatchMode):
    """Records every op below autograd: name, bytes of its distinct tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.traffic = Traffic()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _host_only(func, args, kwargs):  # a seed drawn on the host (and read back): real, and no device traffic
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        name = op_name(func)
        if kind_of(name) != "view":
            ins = _distinct(tree_flatten((args, kwargs))[0])
            outs = _distinct(tree_flatten(out)[0])
            self.traffic.add(name, sum(map(tensor_bytes, ins)), sum(map(tensor_bytes, outs)))
        return out


HOST_RNG = {"randint", "rand", "randn", "randperm", "random"}


def _host_only(func, args, kwargs):
    """A small random draw with no tensor input (the ops' dropout seeds, drawn with torch.randint on
    the CPU generator), or reading a real tensor's value: both run for real, off the device."""
    from torch._subclasses.fake_tensor import is_fake
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    base = op_name(func).split(".", 1)[1]
    if base in HOST_RNG and not tensors:
        return math.prod(args[-1] if args and isinstance(args[-1], (list, tuple)) else (1,)) <= 16
    return base == "_local_scalar_dense" and tensors and not any(is_fake(t) for t in tensors)


def _distinct(items):
    seen, result = set(), []
    for t in items:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            result.append(t)
    return result


def count(fn) -> Traffic:
    """The Traffic of fn() (which builds its own fake inputs inside)."""
    recorder = Recorder()
    with recorder:
        fn()
    return recorder.traffic


@contextlib.contextmanager
def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def _cuda_dropout(input, p=0.5, training=True, inplace=False):
    """F.dropout as it runs on a GPU: torch's fused native_dropout (one op writing the output and
    its mask; native_dropout_backward in the backward), not the CPU's bernoulli_/div_/mul."""
    if not training or p == 0.0:
        return input
    return torch.native_dropout(input, p, True)[0]


@contextlib.contextmanager
def _as_on_gpu():
    """F.scaled_dot_product_attention and F.dropout routed to the ops a GPU runs (see the docstring)."""
    import torch.nn.functional as F
    saved = F.scaled_dot_product_attention, F.dropout
    F.scaled_dot_product_attention, F.dropout = _flash_sdpa, _cuda_dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = saved


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """F.scaled_dot_product_attention as a GPU runs it for bf16/fp16 without a mask: the flash kernel."""
    if attn_mask is not None:
        raise ValueError("traffic_report: the flash route takes no attention mask (the layer is run unpadded)")
    return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]


def fastbert_layer_traffic(hidden, heads, intermediate, seq, batch, dtype, dropout=0.1) -> Traffic:
    from fastbert import _backend
    from fastbert.config import BertConfig
    from fastbert.model import BertLayer
    from fastbert.ops.gather import Packing

    if not _backend.has_op("layernorm_fwd"):
        raise SystemExit(f"traffic_report: fastbert._C is not built ({_backend.extension_error()}), so fastbert's "
                         "kernel path (torch.ops.fastbert.*) cannot be counted; build it first")
    config = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    layer = BertLayer(config).to(dtype).train()  # real (small) weights; the fake mode takes them as inputs
    with _fake(), _as_on_gpu(), _backend.kernels(True), _backend.emulation(True):
        packing = Packing.full(batch, seq)  # every position a token: what a full batch packs to
        x = torch.empty(batch * seq, hidden, dtype=dtype, requires_grad=True)

        def step():
            layer(x, packing).backward(torch.empty(batch * seq, hidden, dtype=dtype))
        return count(step)


def transformers_layer_traffic(hidden, heads, intermediate, seq, batch, dtype, dropout=0.1) -> Traffic:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    config = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        attn_implementation="sdpa")
    config._attn_implementation = "sdpa"
    layer = BertLayer(config).to(dtype).train()
    with _fake():
        x = torch.empty(batch, seq, hidden, dtype=dtype, requires_grad=True)

        def step():
            out = layer(x)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(torch.empty(batch, seq, hidden, dtype=dtype))
        with _as_on_gpu():
            return count(step)


def _mb(n):
    return f"{n / 2**20:9.2f}"


def print_table(title, traffic, file=None):
    file = file or sys.stdout
    print(f"\n{title}", file=file)
    print(f"  {'op':44s} {'kind':12s} {'calls':>5s} {'read MiB':>9s} {'write MiB':>9s}", file=file)
    for name, kind, c in traffic.rows():
        print(f"  {name:44s} {kind:12s} {c.calls:5d} {_mb(c.read)} {_mb(c.written)}", file=file)
    print(f"  {'total':44s} {'':12s} {'':5s} {_mb(traffic.total_bytes())} MiB moved; "
          f"{traffic.calls('memory-bound')} memory-bound (elementwise/normalization) ops moving "
          f"{_mb(traffic.total_bytes('memory-bound')).strip()} MiB", file=file)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--json", help="also write the counts here")
    p.add_argument("--quiet", action="store_true", help="totals only")
    a = p.parse_args(argv)
    for name in ("hidden", "heads", "intermediate", "seq", "batch"):
        if getattr(a, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(a, name)}")
    if a.hidden % a.heads:
        p.error(f"--hidden {a.hidden} must be a multiple of --heads {a.heads}")
    shape = (a.hidden, a.heads, a.intermediate, a.seq, a.batch, DTYPES[a.dtype], a.dropout)
    fb = fastbert_layer_traffic(*shape)
    tf = transformers_layer_traffic(*shape)
    setup = (f"one layer, hidden {a.hidden}, {a.heads} heads, intermediate {a.intermediate}, seq {a.seq}, "
             f"batch {a.batch}, {a.dtype}, dropout {a.dropout}, forward + backward")
    if not a.quiet:
        print(f"Counted (not timed): {setup}")
        print_table("fastbert (kernel path, padding-free)", fb)
        print_table("transformers BertLayer (sdpa -> flash attention)", tf)
    ratios = {"bytes_ratio": fb.total_bytes() / tf.total_bytes(),
              "memory_bound_bytes_ratio": fb.total_bytes("memory-bound") / tf.total_bytes("memory-bound"),
              "memory_bound_ops_ratio": fb.calls("memory-bound") / tf.calls("memory-bound")}
    print(("" if a.quiet else "\n") + f"fastbert / transformers (counted, not timed): {ratios['bytes_ratio']:.2f}x the bytes "
          f"({_mb(fb.total_bytes()).strip()} vs {_mb(tf.total_bytes()).strip()} MiB); outside matmuls and attention "
          f"{ratios['memory_bound_bytes_ratio']:.2f}x the bytes ({_mb(fb.total_bytes('memory-bound')).strip()} vs "
          f"{_mb(tf.total_bytes('memory-bound')).strip()} MiB) in {ratios['memory_bound_ops_ratio']:.2f}x the "
          f"memory-bound ops ({fb.calls('memory-bound')} vs {tf.calls('memory-bound')})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"setup": setup, "fastbert": fb.as_dict(), "transformers": tf.as_dict(), **ratios}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
