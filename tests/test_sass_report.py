"""scripts/sass_report.py's SASS parsing and loop counting on small synthetic nvdisasm listings
(pure Python, no CUDA tools): which loop is the main loop, which path one full-tile iteration
takes (tile-load loops by their load counts, dropout only when taken, guarded must-run work
done), and the HMMA-vs-FLOPs check."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sass_report", ROOT / "scripts" / "sass_report.py")
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)

# An outer loop (0x0000 .. 0x0120) around the main loop (0x0010 .. 0x0110). In the main loop: a
# tile-load loop (line 20, one 16-byte load per trip), two HMMA, a dropout branch over Philox
# code, a guard over an atomic (must run in a full tile) and the back edge.
LISTING = """
	.text._Z6kernelv:
_Z6kernelv:
.L_x_9:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
	//## File "k.cu", line 10 inlined at "k.cu", line 20
	//## File "k.cu", line 20
        /*0020*/                   ISETP.GE.AND P1, PT, R0, 0x100, PT ;
.L_x_1:
	//## File "k.cu", line 11 inlined at "k.cu", line 20
	//## File "k.cu", line 20
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   STS.128 [R3], R4 ;
        /*0050*/                   IADD3 R0, R0, 0x80, RZ ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
	//## File "k.cu", line 30
        /*0070*/                   LDS R8, [R3] ;
        /*0080*/                   HMMA.16816.F32.BF16 R8, R4, R8, R8 ;
        /*0090*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*00a0*/               @P2 BRA `(.L_x_2) ;
        /*00b0*/                   IMAD.HI.U32 R9, R9, -0x2daee0ad, RZ ;
        /*00c0*/                   IMAD.HI.U32 R10, R10, -0x326172a9, RZ ;
        /*00d0*/                   FSEL R8, R8, RZ, P3 ;
.L_x_2:
        /*00e0*/               @P4 BRA `(.L_x_3) ;
        /*00f0*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R6.64], R8 ;
.L_x_3:
        /*0100*/                   FADD R8, R8, R9 ;
        /*0110*/               @P0 BRA `(.L_x_0) ;
        /*0120*/               @P6 BRA `(.L_x_9) ;
        /*0130*/                   EXIT ;
"""


def _instrs():
    return S.parse_nvdisasm(LISTING)["_Z6kernelv"]


def test_parse_resolves_labels_lines_and_predicates():
    ins = _instrs()
    assert len(ins) == 20
    by_addr = {x.addr: x for x in ins}
    assert by_addr[0x60].op == "BRA" and by_addr[0x60].pred == "!P1" and by_addr[0x60].target == 0x30
    assert by_addr[0x120].target == 0x0
    assert by_addr[0x30].opcode == "LDG.E.128" and by_addr[0x30].line == 20 and by_addr[0x30].inner == 11
    assert by_addr[0x80].line == 30 and by_addr[0x0].line is None


def test_main_loop_is_the_innermost_loop_with_hmma():
    ins = _instrs()
    head, back, body = S.main_loop(ins)
    assert (ins[head].addr, ins[back].addr) == (0x10, 0x110)
    assert ins[0].addr not in {ins[k].addr for k in body}


@pytest.mark.parametrize("dropout, trips", [(False, 2), (False, 3), (True, 2)])
def test_one_iteration_counts_tile_loads_dropout_and_guarded_work(dropout, trips):
    ins = _instrs()
    path = S.iteration_path(ins, dropout, lambda i: trips)
    c = S.count(ins, path)
    # BAR, ISETP; the load loop (LDG, STS, IADD3, BRA) per trip; LDS, 2 HMMA, the dropout branch,
    # Philox (2) + FSEL only with dropout, the guard, REDG, FADD, the back edge
    assert c["loop_instructions"] == 2 + 4 * trips + 3 + 1 + (3 if dropout else 0) + 1 + 1 + 1 + 1
    assert (c["hmma"], c["ldg"], c["sts"], c["lds"], c["red_atom"]) == (2, trips, trips, 1, 1)
    assert c["philox_instructions"] == (2 if dropout else 0)
    assert [ins[k].addr for k in path][-1] == 0x110


def test_hmma_count_is_checked_against_the_tile_flops():
    ins = _instrs()
    # 4 * M * N * d FLOPs / 4096 per HMMA / warps: 16 x 8 x 16, one warp -> 2 HMMA, as the loop has
    ok = S.measure(ins, "fwd", False, 16, 8, 16, 1, 16, 16)
    assert ok["hmma"] == 2 and ok["instr_per_hmma"] == ok["loop_instructions"] / 2
    with pytest.raises(S.CountError, match="executes 2 HMMA, the tile's FLOPs / 4096 per warp is 4"):
        S.measure(ins, "fwd", False, 16, 16, 16, 1, 16, 16)


def test_impossible_load_counts_and_loops_without_hmma_are_errors():
    with pytest.raises(S.CountError, match="no path through the loop"):
        S.iteration_path(_instrs(), False, lambda i: 0)  # the load loop runs at least once
    no_hmma = S.parse_nvdisasm(LISTING.replace("HMMA.16816.F32.BF16", "FFMA"))["_Z6kernelv"]
    with pytest.raises(S.CountError, match="no loop with HMMA"):
        S.main_loop(no_hmma)


def test_dropout_variant_without_philox_code_is_an_error():
    plain = S.parse_nvdisasm(LISTING.replace("-0x2daee0ad", "0x3").replace("-0x326172a9", "0x5"))["_Z6kernelv"]
    with pytest.raises(S.CountError, match="executes no Philox code"):
        S.iteration_path(plain, True, lambda i: 2)


def test_memory_inside_the_dropout_branch_runs_only_with_dropout():
    """A shared-memory store inside the branch over Philox (the backward's keep bits) is must-run in
    the dropout variant only: the plain variant skips the branch and counts neither."""
    with_store = LISTING.replace("        /*00d0*/                   FSEL R8, R8, RZ, P3 ;",
                                 "        /*00d0*/                   STS [R3], R9 ;")
    ins = S.parse_nvdisasm(with_store)["_Z6kernelv"]
    plain, drop = (S.count(ins, S.iteration_path(ins, d, lambda i: 2)) for d in (False, True))
    assert (plain["sts"], drop["sts"]) == (2, 3)
    assert drop["loop_instructions"] - plain["loop_instructions"] == 3 and drop["philox_instructions"] == 2


# Our forward's shape: the next tile's copy is unrolled cp.async (LDGSTS, no loop) behind a branch
# the last iteration skips (`if (j > 0)`), then the commit/wait dummies, HMMA and the back edge.
CP_ASYNC_LISTING = """
	.text._Z3fwdv:
_Z3fwdv:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   LDGDEPBAR ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/               @P1 BRA `(.L_x_1) ;
        /*0040*/                   IADD3 R2, P2, R2, -0x4000, RZ ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0060*/                   LDGSTS.E.BYPASS.128 [R3+0x900], desc[UR4][R4.64+0x2000] ;
        /*0070*/                   LDGDEPBAR ;
.L_x_1:
        /*0080*/                   LDSM.16.M88.4 R8, [R6] ;
        /*0090*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*00a0*/                   HMMA.16816.F32.BF16 R16, R4, R10, R16 ;
        /*00b0*/               @P0 BRA `(.L_x_0) ;
        /*00c0*/                   EXIT ;
"""


def test_unrolled_cp_async_copy_behind_a_branch_is_counted_once():
    ins = S.parse_nvdisasm(CP_ASYNC_LISTING)["_Z3fwdv"]
    path = S.iteration_path(ins, False, lambda i: 1)
    c = S.count(ins, path)
    # LDGDEPBAR, BAR, the branch, the copy (IADD3, 2 LDGSTS, LDGDEPBAR), LDSM, 2 HMMA, the back edge
    assert (c["loop_instructions"], c["ldgsts"], c["ldsm"], c["hmma"]) == (11, 2, 1, 2)


def test_our_forward_tile_and_shared_memory_follow_attention_h():
    """sass_report's copy of the forward's tile (ours_tile, ours_smem) against the launch table that
    scripts/kernel_launches.cpp builds from csrc/attention/attention.h."""
    spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "scripts" / "kernel_report.py")
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    try:
        kr.cuda_include()
    except SystemExit as e:
        pytest.skip(str(e))
    table = kr.launch_table()
    for d in (32, 64, 128):
        launch = next(v for name, v in table.items() if name.startswith("attention_fwd_kernel")
                      and name.replace(" ", "").endswith(f"bfloat16,{d}>"))
        assert launch.dynamic_smem == S.ours_smem("fwd", d), (d, launch)
        m, n, warps = S.ours_tile("fwd", d)
        assert launch.threads == (warps * 32,) and launch.dynamic_smem == (m + 4 * n) * (d + 8) * 2
    for d in (32, 64, 128):  # the backward: <T, d, dropout>, one layout for both
        for flag in ("false", "true"):
            assert table[f"attention_bwd_kernel<__nv_bfloat16, {d}, {flag}>"].dynamic_smem == S.ours_smem("bwd", d)


def _fake_tools(monkeypatch, nvcc):
    """sass_report's tools replaced: `run` records each command (cuobjdump -lelf lists an sm_90
    forward cubin in the extension), find_nvcc gives `nvcc`, and an extension exists."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return "ELF file    3: attention_fwd_kernel.sm_90.cubin\n" if "-lelf" in cmd else ""

    monkeypatch.setattr(S, "run", run)
    monkeypatch.setattr(S, "find_nvcc", lambda: nvcc)
    real_glob = S.glob.glob
    monkeypatch.setattr(S.glob, "glob", lambda pattern: [str(ROOT / "fastbert" / "_C.so")]
                        if pattern.endswith("_C*.so") else real_glob(pattern))
    return calls


def test_ours_is_compiled_from_the_source_even_when_the_extension_holds_the_arch(monkeypatch, tmp_path):
    """A fastbert/_C*.so may be older than csrc/ (a copied or earlier build): with nvcc at hand the
    report measures a fresh compile of the source, never the extension's cubin."""
    calls = _fake_tools(monkeypatch, "/opt/cuda/bin/nvcc")
    path, source = S.ours_cubin(90, "fwd", "cuobjdump", str(tmp_path))
    assert [c[0] for c in calls] == ["/opt/cuda/bin/nvcc"], calls
    assert "-arch=sm_90" in calls[0] and calls[0][-1].endswith("csrc/attention/attention_fwd_kernel.cu")
    assert path == calls[0][calls[0].index("-o") + 1] and "fresh compile" in source


def test_without_nvcc_the_extension_is_read_and_said_to_maybe_predate_the_source(monkeypatch, tmp_path):
    calls = _fake_tools(monkeypatch, None)
    path, source = S.ours_cubin(90, "fwd", "cuobjdump", str(tmp_path))
    assert [c[1] for c in calls] == ["-lelf", "-xelf"] and path.endswith("attention_fwd_kernel.sm_90.cubin")
    assert "may predate the source" in source
    with pytest.raises(S.CountError, match="no nvcc"):
        S.ours_cubin(80, "fwd", "cuobjdump", str(tmp_path))
