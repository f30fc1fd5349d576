"""The emulated kernel tests can fail: deliberately broken copies of the kernels, each built into
its own emulator library (fastbert/ops/_emulator_build.py's `replace`), must each be caught, by
a wrong result, by a disagreement between thread orders, or by AddressSanitizer with file:line.

Each break is an exact replacement in a kernel source; if the source changed so that the text
is gone, the test fails and says so (update the break, keep it equivalent). Each broken library
runs in a subprocess, so a crash or an ASan abort cannot take pytest down.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastbert.ops import _emulator_build

from emulation import needs_emulator, needs_ops

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [needs_emulator, needs_ops]

# name: (file under csrc/, original text, broken text, AddressSanitizer build?)
BREAKS = {
    "shuffle_one_step_short": (
        "cross_entropy/cross_entropy_kernel.cu",
        "  for (int offset = 16; offset > 0; offset /= 2)\n    v = combine(",
        "  for (int offset = 16; offset > 1; offset /= 2)\n    v = combine(", False),
    "gather_bound_off_by_one": (
        "gather/gather_kernel.cu",
        "    Vec* d = reinterpret_cast<Vec*>(dst + row * dst_stride);\n"
        "    for (int64_t v = lane; v < vecs_per_row; v += 32) d[v] = s[v];",
        "    Vec* d = reinterpret_cast<Vec*>(dst + row * dst_stride);\n"
        "    for (int64_t v = lane; v <= vecs_per_row; v += 32) d[v] = s[v];", True),
    "delta_shuffle_one_step_short": (
        "attention/attention_delta_kernel.cu",
        "  for (int o = kGroup / 2; o > 0; o /= 2) acc +=",
        "  for (int o = kGroup / 2; o > 1; o /= 2) acc +=", False),
    "mma_fragments_swapped": (
        "attention/attention_fwd_kernel.cu",
        "Elem<T>::mma(s[2 * np], qa[kk], b[0], b[1]);",
        "Elem<T>::mma(s[2 * np], qa[kk], b[1], b[0]);", False),
    "cp_async_buffer_reused_before_barrier": (
        "attention/attention_fwd_kernel.cu",
        "    __syncthreads();  // tile j landed for every thread; every warp is done with the other buffer\n"
        "    if (j > 0) {\n"
        "      gk -= k_tile;\n"
        "      gv -= v_tile;\n"
        "      copy_rows<T, D, Tile::kKvPasses, true>(dst0 + (buf ^ kOther), gk, k_step, N);\n"
        "      copy_rows<T, D, Tile::kKvPasses, true>(dst0 + (buf ^ kOther) + Tile::kTileElems, gv, v_step, N);\n"
        "      cp_async_commit();\n"
        "    }\n",
        "    if (j > 0) {\n"
        "      gk -= k_tile;\n"
        "      gv -= v_tile;\n"
        "      copy_rows<T, D, Tile::kKvPasses, true>(dst0 + (buf ^ kOther), gk, k_step, N);\n"
        "      copy_rows<T, D, Tile::kKvPasses, true>(dst0 + (buf ^ kOther) + Tile::kTileElems, gv, v_step, N);\n"
        "      cp_async_commit();\n"
        "    }\n"
        "    __syncthreads();  // (moved) after the copies into the buffer other warps may still read\n", False),
    "syncthreads_removed": (
        "block_reduce.cuh",  # block_sum, which layernorm's kernels (the program below) use
        "  __syncthreads();  // smem may be written again by the next call",
        "  // (removed) smem may be written again by the next call", False),
    "shared_memory_write_out_of_bounds": (
        "layernorm/layernorm_kernel.cu",
        "  sums[threadIdx.y][threadIdx.x] = acc;",
        "  sums[threadIdx.y + 1][threadIdx.x] = acc;", True),
}

# What each broken library runs (in a subprocess); prints one line per verdict.
PROGRAMS = {
    "shuffle_one_step_short": """
        logits, labels = torch.randn(5, 1000), torch.randint(0, 1000, (5,))
        with emulated("forward"):
            loss, lse = torch.ops.fastbert.cross_entropy_fwd(logits, labels, -100)
        print("lse error", (lse - torch.logsumexp(logits, -1)).abs().max().item())
    """,
    "gather_bound_off_by_one": """
        x, index = torch.randn(40, 64), torch.randperm(40)[:9]
        with emulated("forward"):
            out = torch.ops.fastbert.gather_rows(x, index)
        print("equal", torch.equal(out, x[index]))
    """,
    "delta_shuffle_one_step_short": """
        from fastbert.ops import _emulator
        dout, out = (torch.randn(21, 2, 64, dtype=torch.bfloat16) for _ in range(2))
        with emulated("forward"):
            delta = _emulator.attention_bwd_delta(dout, out)
        print("delta error", (delta - A.attention_bwd_delta_twin(dout, out)).abs().max().item())
    """,
    "mma_fragments_swapped": """
        q, k, v = (torch.randn(70, 2, 32, dtype=torch.float16) for _ in range(3))
        cu = torch.tensor([0, 70], dtype=torch.int32)
        with emulated("forward"):
            out = torch.ops.fastbert.attention_varlen_fwd(q, k, v, cu, 70, 0.2, 0.0, 0, 0)[0]
        ref = A.varlen_reference(q.float(), k.float(), v.float(), cu, 0.2)[0]
        print("out error", (out.float() - ref).abs().max().item())
    """,
    "cp_async_buffer_reused_before_barrier": """
        # 300 keys at head_dim 64: the partial tile (44 keys, buffer 0), then full tiles 1 and 0;
        # tile 0's copies go into buffer 0 while the partial tile may still be read from it
        q, k, v = (torch.randn(300, 1, 64, dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor([0, 300], dtype=torch.int32)
        ref = A.varlen_reference(q.float(), k.float(), v.float(), cu, 0.125)[0]
        for order in ("forward", "warp"):
            with emulated(order):
                out = torch.ops.fastbert.attention_varlen_fwd(q, k, v, cu, 300, 0.125, 0.0, 0, 0)[0]
            print(order, "error", (out.float() - ref).abs().max().item())
    """,
    "syncthreads_removed": """
        x, w, b = torch.randn(4, 4096), torch.randn(4096), torch.randn(4096)
        want = torch.nn.functional.layer_norm(x, (4096,), w, b, 1e-5)
        for order in ("forward", "warp"):
            with emulated(order):
                y = torch.ops.fastbert.layernorm_fwd(x, None, w, b, 1e-5)[0]
            print(order, "error", (y - want).abs().max().item())
    """,
    "shared_memory_write_out_of_bounds": """
        x, w, b = torch.randn(4, 96), torch.randn(96), torch.randn(96)
        with emulated("forward"):
            y = torch.ops.fastbert.layernorm_fwd(x, None, w, b, 1e-5)
            grads = torch.ops.fastbert.layernorm_bwd(torch.randn(4, 96), x, y[2], y[3], w)
        print("finished")
    """,
}

PRELUDE = """
import importlib, sys, torch
sys.path.insert(0, {tests!r})
from emulation import emulated
A = importlib.import_module("fastbert.ops.attention")
"""


def asan_env():
    """What python needs to load an AddressSanitizer library: libasan first, and libstdc++ with it
    (else ASan's __cxa_throw interceptor finds no real one when torch throws)."""
    libs = [subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
            for lib in ("libasan.so", "libstdc++.so")]
    return {"LD_PRELOAD": " ".join(libs), "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1"}


def run_broken(name):
    file, old, new, asan = BREAKS[name]
    source = (ROOT / "csrc" / file).read_text()
    assert source.count(old) == 1, (f"the break {name!r} no longer applies: csrc/{file} does not hold its text once; "
                                    "update BREAKS so the break stays equivalent")
    variant = f"broken-{name}" + ("-asan" if asan else "")
    lib = _emulator_build.build(variant, replace={file: source.replace(old, new)})
    env = dict(os.environ, FASTBERT_EMULATE_LIB=str(lib), PYTHONPATH=str(ROOT))
    env.pop("LD_PRELOAD", None)
    if asan:
        env.update(asan_env())
    code = PRELUDE.format(tests=str(ROOT / "tests")) + textwrap.dedent(PROGRAMS[name])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def value(stdout, label):
    line = next(line for line in stdout.splitlines() if line.startswith(label))
    return line.split()[-1]


def test_shuffle_reduction_one_step_short_gives_a_wrong_result():
    r = run_broken("shuffle_one_step_short")
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(value(r.stdout, "lse error")) > 1e-3, r.stdout


def test_gather_bound_off_by_one_is_reported_by_asan_with_file_and_line():
    r = run_broken("gather_bound_off_by_one")
    assert r.returncode != 0, r.stdout
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in r.stderr, r.stderr[-3000:]
    assert "csrc/gather/gather_kernel.cu:20" in r.stderr, r.stderr[-3000:]


def test_delta_reduction_one_step_short_gives_a_wrong_result():
    r = run_broken("delta_shuffle_one_step_short")
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(value(r.stdout, "delta error")) > 1e-2, r.stdout


def test_two_mma_fragments_swapped_give_a_wrong_result():
    r = run_broken("mma_fragments_swapped")
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(value(r.stdout, "out error")) > 0.05, r.stdout


def test_removed_syncthreads_passes_one_order_and_fails_another():
    """The race of a missing barrier is invisible in the forward order (threads advance in lockstep
    between barriers) and shows in the warp order (a warp runs ahead to the next barrier)."""
    r = run_broken("syncthreads_removed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(value(r.stdout, "forward error")) < 1e-4, r.stdout
    assert float(value(r.stdout, "warp error")) > 1e-2, r.stdout


def test_cp_async_into_a_buffer_before_the_barrier_passes_one_order_and_fails_another():
    """Copies of the next key tile issued into the buffer the other warps may still be reading
    (the barrier after them instead of before): invisible where copies land at the wait (forward
    order), shown where they land at once and a warp runs ahead (warp order)."""
    r = run_broken("cp_async_buffer_reused_before_barrier")
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(value(r.stdout, "forward error")) < 0.01, r.stdout
    assert float(value(r.stdout, "warp error")) > 0.05, r.stdout  # ~0.2-0.4; the real kernel ~0.001


def test_shared_memory_write_out_of_bounds_is_reported_by_asan_with_file_and_line():
    r = run_broken("shared_memory_write_out_of_bounds")
    assert r.returncode != 0 and "finished" not in r.stdout, r.stdout
    assert "ERROR: AddressSanitizer: global-buffer-overflow" in r.stderr, r.stderr[-3000:]
    path, text, _, _ = BREAKS["shared_memory_write_out_of_bounds"]
    line = (ROOT / "csrc" / path).read_text().split("\n").index(text) + 1  # the broken line
    assert "WRITE of size 4" in r.stderr and f"csrc/{path}:{line}" in r.stderr, r.stderr[-3000:]


def test_local_array_out_of_bounds_is_reported_by_asan_with_file_and_line():
    """Local arrays live on the fibers' stacks, which ASan follows (the switches are annotated)."""
    lib = _emulator_build.build("asan")
    env = dict(os.environ, FASTBERT_EMULATE_LIB=str(lib), PYTHONPATH=str(ROOT), **asan_env())
    code = PRELUDE.format(tests=str(ROOT / "tests")) + textwrap.dedent("""
        from fastbert.ops import _emulator
        out = torch.zeros(64)
        _emulator._call("selftest", "emu_selftest", 11, None, None, out.data_ptr())
        print("finished")
    """)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "finished" not in r.stdout, r.stdout
    assert "ERROR: AddressSanitizer: stack-buffer-overflow" in r.stderr, r.stderr[-3000:]
    assert "WRITE of size 4" in r.stderr and "csrc/emu/selftest.cc:" in r.stderr, r.stderr[-3000:]


def test_the_unbroken_kernels_pass_the_same_programs():
    """The programs above with the real kernels: no error, no ASan report (so each failure above is
    the break's doing)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("shuffle_one_step_short", "delta_shuffle_one_step_short", "mma_fragments_swapped", "syncthreads_removed",
                 "cp_async_buffer_reused_before_barrier"):
        code = PRELUDE.format(tests=str(ROOT / "tests")) + textwrap.dedent(PROGRAMS[name])
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        errors = [float(line.split()[-1]) for line in r.stdout.splitlines() if "error" in line]
        attention = name in ("mma_fragments_swapped", "cp_async_buffer_reused_before_barrier")
        assert errors and max(errors) < (0.05 if attention else 1e-4), (name, r.stdout)
