"""scripts/kernel_report.py's logic on synthetic inputs: occupancy under each architecture's SM
limits, reading cuobjdump's output, and which findings fail CI."""
import importlib.util
import shutil
import subprocess

import pytest

from conftest import ROOT


def _load():
    spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "scripts" / "kernel_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KR = _load()
KIB = 1024


# ----------------------------------------------------------------------------- occupancy

def test_registers_limit_occupancy():
    # 255 registers: 255 * 32 rounds up to 8192 per warp, 16384 per scheduler -> 2 warps each, 8 per SM
    occ = KR.occupancy(90, registers=255, threads=128, smem_bytes=0)
    assert (occ.ctas, occ.warps, occ.limiter) == (2, 8, "registers")
    assert occ.fraction == pytest.approx(8 / 64)
    # 64 registers: 2048 per warp -> 8 warps per scheduler, 32 per SM -> one 1024-thread block
    occ = KR.occupancy(80, registers=64, threads=1024, smem_bytes=0)
    assert (occ.ctas, occ.warps, occ.limiter) == (1, 32, "registers")


def test_warp_and_block_limits_depend_on_the_architecture():
    # 32 registers, 512 threads (16 warps): sm_90 holds 64 warps -> 4 blocks, sm_86 48 -> 3
    assert KR.occupancy(90, 32, 512, 0).ctas == 4
    assert KR.occupancy(86, 32, 512, 0).ctas == 3
    # one-warp blocks: capped by resident blocks per SM (32 on sm_90, 16 on sm_86, 24 on sm_89)
    assert [KR.occupancy(a, 32, 32, 0).ctas for a in (90, 86, 89)] == [32, 16, 24]
    assert KR.occupancy(86, 32, 32, 0).limiter == "blocks"


def test_shared_memory_limits_occupancy_with_the_reserved_kib():
    # 100 KiB + 1 KiB reserved per block: two fit in sm_90's 228 KiB, one in sm_80's 164 KiB
    occ = KR.occupancy(90, registers=32, threads=128, smem_bytes=100 * KIB)
    assert (occ.ctas, occ.limiter) == (2, "shared memory")
    assert KR.occupancy(80, 32, 128, 100 * KIB).ctas == 1
    # 113.5 KiB + 1 KiB: 228 // 114.5 = 1 on sm_90 (without the reservation it would be 2)
    assert KR.occupancy(90, 32, 128, 113 * KIB + 512).ctas == 1
    # over the opt-in limit nothing launches
    occ = KR.occupancy(86, 32, 128, 100 * KIB)
    assert (occ.ctas, occ.limiter) == (0, "shared memory")


def test_occupancy_rejects_bad_inputs():
    with pytest.raises(ValueError, match="threads per block"):
        KR.occupancy(90, 32, 2048, 0)
    with pytest.raises(ValueError, match="no SM limits known for sm_42"):
        KR.occupancy(42, 32, 128, 0)


def test_same_family():
    assert KR.same_family(80) == [80, 86, 87, 89]
    assert KR.same_family(86) == [86, 87, 89]
    assert KR.same_family(90) == [90]


# ----------------------------------------------------------------------------- reading cuobjdump

RES_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z4spillv:
  REG:255 STACK:24 SHARED:1024 LOCAL:0 CONSTANT[0]:736 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z5cleanv:
  REG:40 STACK:0 SHARED:1280 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_80

Resource usage:
 Function _Z5cleanv:
  REG:38 STACK:0 SHARED:256 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z6reducev:
  REG:32 STACK:0 SHARED:2112 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
Fatbin elf code:
================
arch = sm_80

        code for sm_80
                Function : _Z4spillv
        /*0010*/                   STL [R1+0x10], R12 ;
        /*0020*/                   STL.64 [R1+0x8], R4 ;
        /*0030*/                   LDL.128 R8, [R1] ;
        /*0040*/                   LDL.LU R2, [R1+0x4] ;
        /*0050*/                   LDL.U8 R3, [R1+0x2] ;
        /*0060*/                   LDG.E.64 R6, [R2.64] ;
        /*0070*/                   STS.64 [R0], R4 ;
                Function : _Z5cleanv
        /*0010*/                   LDG.E R6, [R2.64] ;
"""


def test_parse_res_usage_per_architecture():
    res = KR.parse_res_usage(RES_USAGE)
    assert [(r.arch, r.mangled, r.registers, r.stack, r.shared) for r in res] == [
        (90, "_Z4spillv", 255, 24, 1024), (90, "_Z5cleanv", 40, 0, 1280), (80, "_Z5cleanv", 38, 0, 256),
        (80, "_Z6reducev", 32, 0, 2112)]
    # sm_90 code counts the 1 KiB reserved per block in SHARED; sm_80 code does not
    assert [r.static_smem() for r in res] == [0, 256, 256, 2112]


def test_parse_sass_counts_local_store_and_load_bytes():
    spills = KR.parse_sass_spills(SASS)
    assert spills[(80, "_Z4spillv")] == (4 + 8, 16 + 4 + 1)  # LDG/STS (global, shared) are not spills
    assert spills[(80, "_Z5cleanv")] == (0, 0)


def test_parse_sass_counts_128_bit_global_accesses():
    sass = """
        arch = sm_90
                Function : _Z3vecv
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;
        /*0030*/                   LDG.E.64 R10, desc[UR4][R6.64] ;
        /*0040*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0050*/                   STS.128 [R0], R4 ;
        /*0060*/                   LDL.128 R8, [R1] ;
                Function : _Z6scalarv
        /*0010*/                   LDG.E R6, desc[UR4][R2.64] ;
        /*0020*/                   STG.E desc[UR4][R2.64], R6 ;
"""
    counts = KR.parse_sass_vector_accesses(sass)
    assert counts == {(90, "_Z3vecv"): (2, 1), (90, "_Z6scalarv"): (0, 0)}  # shared/local .128 are not global


def test_kernel_key():
    assert KR.kernel_key("void fastbert::(anonymous namespace)::attention_fwd_kernel<__half, 64>"
                         "(fastbert::AttentionFwdParams)") == "attention_fwd_kernel<__half, 64>"
    assert KR.kernel_key("fastbert::(anonymous namespace)::build_inverse_kernel(long const*, int*, long)") == \
        "build_inverse_kernel"


# ----------------------------------------------------------------------------- what fails CI

def _res(arch, name, registers=32, stack=0, shared=0, spill=(0, 0)):
    r = KR.Resources(arch, name, registers, stack, shared, 0)
    r.spill_stores, r.spill_loads = spill
    return r


def _evaluate(resources, table):
    launches = {name: KR.Launch(name, threads, smem) for name, (threads, smem) in table.items()}
    return KR.evaluate(resources, launches, demangle=lambda mangled: f"void {mangled}(P)")


def test_spill_fails_only_when_reachable():
    resources = [_res(90, "used<1>", 255, 24, spill=(20, 24)), _res(90, "unused<8>", 128, 80, spill=(312, 232))]
    rows, errors, _ = _evaluate(resources, {"used<1>": ((128,), 0)})
    errors = [e for e in errors if "occupancy" not in e]  # (255 registers: 12% occupancy fails too)
    assert len(errors) == 1 and "used<1> on sm_90 spills: 20 B" in errors[0]
    assert {r.name: r.reachable for r in rows} == {"used<1>": True, "unused<8>": False}
    rows, errors, _ = _evaluate([resources[1]] + [_res(90, "used<1>")], {"used<1>": ((128,), 0)})
    assert errors == []  # the spilling kernel nobody launches is reported, not failed


A128 = "attention_bwd_kernel<__half, 128>"


def test_shared_memory_over_the_opt_in_limit_fails():
    # (attention: exempt from the occupancy bar, one block of 4 warps per SM is all it gets here)
    table = {A128: ((128,), 134656)}
    _, errors, notes = _evaluate([_res(86, A128, shared=1024)], table)
    assert len(errors) == 1 and "101376 B" in errors[0] and "134656 dynamic" in errors[0]
    # sm_80 allows it; the note names the family members that run sm_80 code but lack the memory
    _, errors, notes = _evaluate([_res(80, A128, shared=1024)], table)
    notes = [n for n in notes if "opt-in" in n]  # (the other: its occupancy, exempt)
    assert errors == [] and len(notes) == 1 and "sm_86, sm_89" in notes[0] and "sm_87" not in notes[0]
    # static + dynamic together count: 1 KiB static tips 226.5 KiB of dynamic over sm_90's 227 KiB
    _, errors, _ = _evaluate([_res(90, A128, shared=2048)], {A128: ((128,), 227 * KIB - 512)})
    assert len(errors) == 1 and "1024 static" in errors[0]
    _, errors, _ = _evaluate([_res(90, A128, shared=1024)], {A128: ((128,), 227 * KIB - 512)})
    assert errors == []


def test_worst_block_size_is_reported():
    # 32-thread blocks are capped at 32 blocks (50% of sm_90's warps); 256 threads fill the SM
    rows, errors, _ = _evaluate([_res(90, "ln<1>")], {"ln<1>": ((32, 256), 0)})
    assert errors == [] and rows[0].worst_threads == 32 and rows[0].occupancy.fraction == pytest.approx(0.5)


def test_a_16_byte_path_without_128_bit_accesses_fails():
    def run(loads, stores, vector_bytes=16):
        r = _res(90, "ln<8>")
        r.global_loads_128, r.global_stores_128 = loads, stores
        return KR.evaluate([r], {"ln<8>": KR.Launch("ln<8>", (128,), 0, vector_bytes)},
                           demangle=lambda mangled: f"void {mangled}(P)")[1]
    assert run(4, 1) == []
    errors = run(4, 0)
    assert len(errors) == 1 and "ln<8> on sm_90 moves 16-byte packs" in errors[0] and "0 128-bit global stores" in errors[0]
    assert len(run(0, 1)) == 1
    assert run(0, 0, vector_bytes=0) == []  # a scalar path is not held to it


def test_occupancy_below_half_fails_a_memory_bound_kernel():
    _, errors, notes = _evaluate([_res(90, "heavy", registers=128)], {"heavy": ((256,), 0)})
    assert notes == [] and len(errors) == 1 and "heavy on sm_90: theoretical occupancy 25% at 256 threads" in errors[0]
    assert "128 registers" in errors[0] and "limited by registers" in errors[0]
    _, errors, notes = _evaluate([_res(90, "light", registers=32)], {"light": ((256,), 0)})
    assert errors == [] and notes == []
    # the worst block size decides: 56 registers hold 36 warps, two 13-warp blocks (41%), four 8-warp ones
    _, errors, _ = _evaluate([_res(80, "ln<8, 1>", registers=56)], {"ln<8, 1>": ((256, 416), 0)})
    assert len(errors) == 1 and "41% at 416 threads" in errors[0]
    _, errors, _ = _evaluate([_res(80, "ln<8, 1>", registers=56)], {"ln<8, 1>": ((256, 384), 0)})
    assert errors == []


def test_attention_kernels_are_exempt_from_the_occupancy_bar_with_a_note():
    table = {"attention_fwd_kernel<__half, 64>": ((128,), 27648), "attention_bwd_kernel<__half, 64>": ((128,), 74240)}
    _, errors, notes = _evaluate([_res(90, n, registers=176) for n in table], table)
    assert errors == [] and len(notes) == 2 and all("exempt" in n and "compute-bound" in n for n in notes)
    # the exemption is by name: the same resources under another name fail
    _, errors, _ = _evaluate([_res(90, "attention_dropout_mask_kernel", registers=176)],
                             {"attention_dropout_mask_kernel": ((128,), 0)})
    assert len(errors) == 1


def test_shared_memory_per_block_size_counts_for_that_block_size():
    table = KR.parse_launch_table("ln_bwd<8, 1>\t32,512\t49152,65536\t16\nplain\t256\t1024\n")
    assert table["ln_bwd<8, 1>"].dynamic_smem == 65536 and table["ln_bwd<8, 1>"].smem_at(32) == 49152
    assert table["plain"].smem_at(256) == 1024 and table["plain"].vector_bytes == 0
    with pytest.raises(ValueError, match="2 shared memory sizes for 3 block sizes"):
        KR.parse_launch_table("k\t32,64,96\t1,2\n")
    # one warp with 48 KiB: 3 blocks fit sm_80's 164 KiB (3 warps, 5%); 16 warps with 64 KiB: 2 blocks (50%)
    r = _res(80, "ln_bwd<8, 1>")
    r.global_loads_128 = r.global_stores_128 = 1
    _, errors, _ = KR.evaluate([r], {"ln_bwd<8, 1>": table["ln_bwd<8, 1>"]}, demangle=lambda mangled: f"void {mangled}(P)")
    assert len(errors) == 1 and "at 32 threads" in errors[0] and "49152 B shared memory" in errors[0]


def test_table_kernel_missing_from_the_binary_fails():
    _, errors, _ = _evaluate([_res(90, "a")], {"a": ((128,), 0), "b<2>": ((128,), 0)})
    assert len(errors) == 1 and "names b<2>" in errors[0] and "sm_90" in errors[0]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the launch table")
def test_launch_table_reads_the_launchers_headers():
    try:
        table = KR.launch_table()
    except (SystemExit, subprocess.CalledProcessError) as e:
        pytest.skip(f"launch table did not build here: {e}")
    # layernorm: no hidden size <= 8192 takes 4 packs per thread with 16-byte fp16 packs, so the
    # launchers do not instantiate <__half, 8, 4> (it spilled 312 B); fp32 needs <float, 4, 4>
    assert "layernorm_bwd_kernel<__half, 8, 2>" in table and "layernorm_bwd_kernel<__half, 8, 4>" not in table
    assert "layernorm_bwd_kernel<float, 4, 4>" in table and max(table["layernorm_fwd_kernel<float, 1, 8>"].threads) == 1024
    # 16-byte packs are held to 128-bit accesses; the 8- and 4-byte packs (hidden % 8 != 0) exist, unmarked
    assert table["layernorm_bwd_kernel<__nv_bfloat16, 8, 1>"].vector_bytes == 16
    assert table["layernorm_fwd_kernel<float, 4, 1>"].vector_bytes == 16
    assert table["layernorm_fwd_kernel<__nv_bfloat16, 4, 1>"].vector_bytes == 0
    # 4-byte packs need at most 4 a thread on 1,024 threads; only the scalar path takes 8 (hidden > 4096)
    assert "layernorm_fwd_kernel<__half, 2, 4>" in table and "layernorm_fwd_kernel<__half, 2, 8>" not in table
    assert table["layernorm_fwd_kernel<float, 1, 8>"].threads == (1024,) and "layernorm_fwd_kernel<float, 2, 1>" in table
    # the backward's shared memory (its column sums) grows with the hidden size: listed per block size
    bwd = table["layernorm_bwd_kernel<__half, 8, 1>"]
    assert bwd.smem_at(96) == 2 * 768 * 4 and bwd.dynamic_smem == 2 * 4096 * 4
    assert table["layernorm_reduce_kernel"].threads == (256,)
    # the backward, with and without dropout, fits sm_86/89/120's 99 KiB at every head_dim (it asked 134,656 B at 128)
    smem = {name: t.dynamic_smem for name, t in table.items() if name.startswith("attention_bwd_kernel<__half")}
    assert sorted(smem) == [f"attention_bwd_kernel<__half, {d}, {f}>" for d in (128, 32, 64) for f in ("false", "true")]
    assert 64 * KIB < smem["attention_bwd_kernel<__half, 128, true>"] <= 99 * KIB


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the launch table")
def test_row_kernels_launch_only_block_sizes_their_budget_keeps_at_half_occupancy():
    """csrc/common.h: one pack a thread runs in 40 registers on at most 512 threads, more packs in 64
    on at most 1,024; every block size the layernorm and fused-LayerNorm launchers use must then
    keep >= 50% of sm_80's and sm_90's warps resident (with its shared memory). The report checks
    the compiled registers; this checks the launchers' choice of block sizes."""
    try:
        table = KR.launch_table()
    except (SystemExit, subprocess.CalledProcessError) as e:
        pytest.skip(f"launch table did not build here: {e}")
    rows = [t for name, t in table.items() if name.startswith(("layernorm_fwd", "layernorm_bwd", "bdrln_fwd", "bdrln_bwd"))]
    assert len(rows) > 40
    for t in rows:
        nv = int(t.name.rsplit(",", 1)[1].rstrip(">"))
        registers, max_threads = (40, 512) if nv == 1 else (64, 1024)
        assert max(t.threads) <= max_threads, t
        for threads in t.threads:
            for arch in (80, 90):
                occ = KR.occupancy(arch, registers, threads, t.smem_at(threads) + 256)  # + block_sum's float2[32]
                assert occ.fraction >= 0.5, (t.name, threads, arch, occ)
