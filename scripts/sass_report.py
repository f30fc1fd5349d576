"""Instructions per tensor-core instruction of our attention kernels and of torch's FlashAttention-2,
counted statically from their SASS (issue 11: the measurement the attention rewrite is held to).

    python scripts/sass_report.py [--archs 80,90] [--head-dims 32,64,128] [--kinds fwd,bwd] [--json out.json]

Where the kernels come from:
- ours: a fresh `nvcc -cubin -lineinfo` of csrc/attention/attention_{fwd,bwd}_kernel.cu with
  setup.py's flags, so the numbers are those of the source in this tree (the commit the JSON
  records); a fastbert/_C*.so may be older than the source (a copy, or a build before the last
  edit) and is read (`cuobjdump -xelf`) only when no nvcc is found, which `sources` says;
- FlashAttention-2: torch/lib/libtorch_cuda.so (`cuobjdump -lelf`/`-xelf` extract the sm_80 and
  sm_90 cubins, one minute and 1.5 GB in a temporary folder; the few holding the kernels below
  are kept in build/sass/<torch version>/). The instantiation is the one torch's launchers pick on
  A100/H100 for bf16, non-causal, no ALiBi/softcap/local window, even sizes (Is_even_MN,
  Is_even_K): FA2_FWD_TILES / FA2_BWD_TRAITS below, copied from flash_{fwd,bwd}_launch_template.h.
Both are disassembled with `nvdisasm -g -gi` (ours carries -lineinfo: every instruction gets
the kernel-body source line it was inlined into).

The method (what "one full-tile iteration" means), per warp (warp 0's path):
1. The main loop: of the innermost loops holding HMMA (a loop = a back edge, a BRA to a lower
   address, with its natural-loop body: everything reachable from its head that reaches the back
   edge, out-of-line blocks included), the one with the most HMMA. FA2's backward loops over key
   blocks around its query loop; the query loop is the main loop.
2. One iteration is a path from the loop head to that back edge, the back edge included. At a
   conditional branch the path goes where a full tile (every row and key valid, all of the
   tile's work done) goes:
   - runtime-flag branches: a forward branch whose skipped instructions hold Philox
     (its multipliers 0xD2511F53 / 0xCD9E8D57) is the dropout branch, counted only when taken:
     its Philox code (and memory instructions inside it, e.g. keep bits to shared memory) is on
     the path in the dropout variant and off it otherwise. FA2's dropout is a template flag, so
     its variants are separate kernels; so is our backward's (attention_bwd_kernel<T, d, dropout>);
   - every must-run instruction (HMMA, LDSM, LDGSTS, LDS, STS, LDG, STG, RED, ATOM, BAR outside
     the tile-load loops) executes exactly once: in a full tile every row's work is done;
   - cp.async tile copies that are unrolled (ours: every LDGSTS of a tile written out, no loop)
     are must-run instructions: each executes once, as in a full tile;
   - tile loads in loops (global->shared copies in loops, unrolled with remainders): each load site
     (a kernel-body source line, from -lineinfo, whose LDG sits in an inner loop) executes its
     16-byte loads rows * head_dim / 8 / threads times (other loads in inner loops once, as warp 0
     does); a branch around only a site's shared-memory stores is a runtime check that passes;
   - other branches: the cheapest path that satisfies all of the above (Dijkstra over
     (instruction, loads done per site, must-run instructions done)). Work without memory or
     tensor-core instructions behind such a branch counts only if the cheapest path runs it.
   The path is then checked: every must-run instruction executed once, Philox code on the path
   iff dropout, and the HMMA count equal to the tile's FLOPs / 4,096 (one HMMA.16816 is
   16 x 8 x 16 multiply-adds): forward 4 * M * N * d, backward 10 * M * N * d FLOPs per CTA,
   divided by its warps (ours_tile: our forward's M x N is 64 x 128, 64 x 64 at head_dim 128). A kernel failing a check is reported as an error, never as a number.
   Cross-check (issue 11's table, head_dim 64, sm_90): FA2 fwd 6.55, fwd+dropout 9.27, bwd 4.26,
   bwd+dropout 5.73 instructions per HMMA; ours fwd 15.2, 29.3 before the forward's rewrite (the
   backward before its register rework: 11.1, 28.9 against the issue's 11.0, 28.8).
   (`@!PT LDS RZ, [RZ]`, never executed, is what nvcc places around cp.async waits; it is counted
   as an instruction, in FA2 as in ours.)
3. Reported per kernel: the loop's executed instructions, HMMA, LDSM, LDGSTS, LDS and STS (all
   widths), instructions per HMMA, registers and spill bytes (cuobjdump -res-usage and the
   STL/LDL of the SASS, as scripts/kernel_report.py), static shared memory, and for ours the
   dynamic shared memory the launcher asks (FA2's is dynamic and not derived here); per
   (arch, variant, head_dim) the ratio ours / FA2 of instructions per HMMA.
No GPU is needed; nothing is timed.
"""
import argparse
import dataclasses
import glob
import heapq
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOPS_PER_HMMA = 16 * 8 * 16 * 2
MUST_RUN = ("HMMA", "LDSM", "LDGSTS", "LDS", "STS", "LDG", "STG", "RED", "REDG", "ATOM", "ATOMG", "ATOMS", "BAR")
PHILOX = re.compile(r"0xd2511f53|0xcd9e8d57|-0x2daee0ad|-0x326172a9", re.I)

# FA2 in torch (flash_fwd_launch_template.h / flash_bwd_launch_template.h), A100/H100 (opt-in shared
# memory >= 144 KiB, not sm8x): head_dim -> (kBlockM, kBlockN, warps) of the forward, per dropout.
FA2_FWD_TILES = {
    (32, False): (128, 128, 4), (32, True): (128, 128, 4),
    (64, False): (128, 128, 4), (64, True): (128, 64, 4),
    (128, False): (128, 64, 4), (128, True): (128, 32, 4),
}
# backward: Flash_bwd_kernel_traits<d, kBlockM, kBlockN, warps, AtomLayoutMSdP, AtomLayoutNdKV,
# AtomLayoutMdQ, Is_V_in_regs, No_double_buffer> as the prefix of the demangled name, per dropout.
FA2_BWD_TRAITS = {
    (32, False): "32, 128, 128, 8, 4, 4, 4, true, false", (32, True): "32, 128, 128, 8, 4, 4, 4, false, false",
    (64, False): "64, 128, 128, 8, 4, 4, 4, false, false", (64, True): "64, 128, 128, 8, 4, 4, 4, false, false",
    (128, False): "128, 64, 128, 8, 2, 4, 2, false, false", (128, True): "128, 64, 128, 8, 2, 4, 2, false, false",
}
OURS_THREADS, OURS_BLOCK = 128, 64  # csrc/attention/attention.h: kAttentionThreads, kAttentionBlockM/N


def ours_tile(kind, head_dim):
    """(query rows, keys, warps) of one main-loop iteration of our kernel (csrc/attention/attention.h:
    the forward's kAttentionFwdBlockM x attention_fwd_block_n(head_dim), the backward's 64 x 64)."""
    if kind == "fwd":
        return 64, (64 if head_dim >= 128 else 128), OURS_THREADS // 32
    return OURS_BLOCK, OURS_BLOCK, OURS_THREADS // 32


# ----------------------------------------------------------------------------- SASS parsing

@dataclasses.dataclass
class Instr:
    addr: int
    pred: str            # "" or "P0", "!P3", ...
    opcode: str          # with its modifiers: "HMMA.16816.F32.BF16"
    operands: str
    line: int = None     # kernel-body source line (the outermost of the inline chain), if known
    inner: int = None    # the innermost source line (a line of an inlined function), if known
    target: int = None   # branch target address

    @property
    def op(self):
        return self.opcode.split(".")[0]


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@(!?U?P[0-9T]))?\s*([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_LINE = re.compile(r'//## File "[^"]*", line (\d+)(?: inlined at "[^"]*", line (\d+))?')
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_FUNC = re.compile(r"^\s*\.text\.(\S+):\s*$")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)|\b0x([0-9a-f]+)\b")


def parse_nvdisasm(text: str):
    """{mangled name: [Instr]} from `nvdisasm -g -gi` output (branch targets resolved to addresses)."""
    funcs, labels, name, pending_line, pending_inner, in_block = {}, {}, None, None, None, False
    for raw in text.splitlines():
        m = _FUNC.match(raw)
        if m:
            name = m.group(1)
            funcs[name], labels[name] = [], {}
            pending_line = pending_inner = None
            continue
        if name is None:
            continue
        m = _LINE.search(raw)
        if m:
            # a block of //## lines precedes an instruction, innermost inline first; the kernel-body
            # line is the call site of the last one (or its own line); both hold until the next block
            if not in_block:
                pending_inner = int(m.group(1))
            pending_line = int(m.group(2) or m.group(1))
            in_block = True
            continue
        m = _LABEL.match(raw)
        if m:
            labels[name][m.group(1)] = None  # resolved to the next instruction's address
            continue
        m = _INSTR.match(raw)
        if m:
            addr = int(m.group(1), 16)
            for lab, at in labels[name].items():
                if at is None:
                    labels[name][lab] = addr
            ins = Instr(addr, m.group(2) or "", m.group(3), m.group(4), pending_line, pending_inner)
            funcs[name].append(ins)
            in_block = False
    for name, instrs in funcs.items():
        for ins in instrs:
            if ins.op in ("BRA", "BRX", "JMP"):
                t = _TARGET.search(ins.operands)
                if t:
                    ins.target = labels[name][t.group(1)] if t.group(1) else int(t.group(2), 16)
    return funcs


# ----------------------------------------------------------------------------- the loop and its path

class CountError(Exception):
    pass


def _is_cond(ins):
    return ins.pred not in ("", "PT")


def _successors(instrs, index, k):
    ins = instrs[k]
    if ins.op in ("EXIT", "RET") and not _is_cond(ins):
        return []
    if ins.op == "BRA" and ins.target is not None:
        t = index[ins.target]
        return [t, k + 1] if _is_cond(ins) else [t]
    return [k + 1] if k + 1 < len(instrs) else []


def _loop_body(instrs, index, head, back):
    """The instructions of the natural loop of the back edge back -> head: reachable from head
    without passing the back edge, and reaching the back edge without passing head (blocks the
    compiler placed outside [head, back] included)."""
    fwd, todo = {head}, [head]
    while todo:
        k = todo.pop()
        if k == back:
            continue
        for n in _successors(instrs, index, k):
            if n not in fwd and n != head:
                fwd.add(n)
                todo.append(n)
    preds = {}
    for k in fwd:
        for n in _successors(instrs, index, k):
            if k != back or n != head:
                preds.setdefault(n, []).append(k)
    bwd, todo = {back}, [back]
    while todo:
        k = todo.pop()
        if k == head:
            continue
        for n in preds.get(k, []):
            if n not in bwd:
                bwd.add(n)
                todo.append(n)
    return fwd & bwd


def main_loop(instrs):
    """(head index, back-edge index, body) of the main loop: of the innermost loops holding HMMA
    (no other such loop inside; e.g. FA2's backward loops over key blocks around its query loop),
    the one with the most HMMA."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    loops = []
    for j, ins in enumerate(instrs):
        if ins.op == "BRA" and ins.target is not None and ins.target <= ins.addr:
            i = index[ins.target]
            body = _loop_body(instrs, index, i, j)
            hmma = sum(1 for k in body if instrs[k].op == "HMMA")
            if hmma:
                loops.append((hmma, i, j, body))
    innermost = [lp for lp in loops if not any(o[2] != lp[2] and o[2] in lp[3] and o[1] in lp[3] and o[3] < lp[3]
                                               for o in loops)]
    if not innermost:
        raise CountError("no loop with HMMA instructions (no backward branch around an HMMA)")
    best = max(innermost, key=lambda lp: (lp[0], len(lp[3])))
    return best[1], best[2], best[3]


def _inner_loop_nodes(instrs, index, head, back, body):
    """Instructions on a cycle of the loop body that avoids its head: the inner loops."""
    succ = {k: [n for n in _successors(instrs, index, k) if n in body and n != head] for k in body if k != back}
    # Tarjan's strongly connected components, iteratively
    order, low, on, stack, out, counter = {}, {}, set(), [], set(), [0]
    for root in succ:
        if root in order:
            continue
        work = [(root, iter(succ[root]))]
        order[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            k, it = work[-1]
            n = next(it, None)
            if n is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[k])
                if low[k] == order[k]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == k:
                            break
                    if len(comp) > 1 or k in succ.get(k, []):
                        out.update(comp)
                continue
            if n not in succ:
                continue
            if n not in order:
                order[n] = low[n] = counter[0]
                counter[0] += 1
                stack.append(n)
                on.add(n)
                work.append((n, iter(succ[n])))
            elif n in on:
                low[k] = min(low[k], order[n])
    return out


def iteration_path(instrs, dropout: bool, load_counts):
    """The executed instruction indices of one full-tile iteration (see the module docstring).

    load_counts(instr) -> expected executions of a tile-load site's loads (16-byte LDG: rows *
    head_dim / 8 / threads; others 1)."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    head, back, body = main_loop(instrs)
    in_inner = _inner_loop_nodes(instrs, index, head, back, body)
    # tile-load sites: kernel-body lines with an LDG inside an inner loop; their instructions are
    # governed by the load counts, not by the must-run rule
    sites = sorted({instrs[k].line for k in in_inner if instrs[k].op == "LDG" and instrs[k].line is not None})
    if any(instrs[k].op == "LDG" and instrs[k].line is None for k in in_inner):
        raise CountError("a global load inside an inner loop without line information: the tile-load "
                         "sites cannot be told apart (build with -lineinfo)")
    site_inner = {instrs[k].inner for k in body if instrs[k].line in sites and instrs[k].inner != instrs[k].line}
    governed = {k for k in body if instrs[k].line in sites or instrs[k].line in site_inner}
    site_of, last = {}, None
    for k in sorted(body):
        if instrs[k].line in sites:
            last = sites.index(instrs[k].line)
        if instrs[k].op == "LDG" and k in governed:
            # nvdisasm sometimes names only the inlined function's line (no call site): such a load
            # belongs to the site of the instructions before it
            if last is None:
                raise CountError(f"the global load at {instrs[k].addr:#x} belongs to no tile-load site")
            site_of[k] = last
    want = [None] * len(sites)
    for k, s in site_of.items():
        w = load_counts(instrs[k])
        if want[s] is not None and want[s] != w:
            raise CountError(f"tile-load site at line {sites[s]} mixes load widths")
        want[s] = w
    # memory accesses of the tile-load sites other than their global loads: a branch around them
    # alone is a runtime check a full tile passes (e.g. a null test of a shared-memory pointer)
    site_other = {k for k in governed if instrs[k].op in MUST_RUN and k not in site_of}
    must = {k for k in body if instrs[k].op in MUST_RUN and k not in governed and k not in in_inner}
    philox = {k for k in body if PHILOX.search(instrs[k].operands)}
    if not dropout:
        # the dropout branches' own memory instructions (e.g. keep bits to shared memory) run only with dropout
        for k in body:
            ins = instrs[k]
            if ins.op == "BRA" and _is_cond(ins) and ins.target is not None and index[ins.target] > k:
                skipped = range(k + 1, index[ins.target])
                if any(s in philox for s in skipped):
                    must -= set(skipped)

    def forced(k):
        """True/False: the branch at k is taken / not taken; None: free."""
        ins = instrs[k]
        t = index[ins.target]
        if not _is_cond(ins):
            return True
        if t > k:  # forward: the skipped instructions are k+1 .. t-1
            skipped = range(k + 1, t)
            if any(s in philox for s in skipped):
                return not dropout
            if not any(s in site_of for s in skipped) and any(s in site_other for s in skipped):
                return False
        return None

    # Dijkstra over (instruction, loads per site, must-run instructions done); cost = instructions
    start = (head, (0,) * len(sites), 0)
    dist, prev = {start: 0}, {}
    heap = [(0, start)]
    goal = None
    while heap:
        d, state = heapq.heappop(heap)
        if dist.get(state) != d:
            continue
        k, loads, done = state
        if k in site_of:
            s = site_of[k]
            loads = loads[:s] + (loads[s] + 1,) + loads[s + 1:]
            if loads[s] > want[s]:
                continue
        if k in must:
            done += 1
        if k == back:
            if list(loads) == want and done == len(must):
                goal = state
                break
            continue
        ins = instrs[k]
        if ins.op == "BRA":
            f = forced(k)
            nexts = _successors(instrs, index, k)
            if f is True:
                nexts = [index[ins.target]]
            elif f is False:
                nexts = [k + 1]
        else:
            nexts = _successors(instrs, index, k)
        for n in nexts:
            if n not in body or n == head:
                continue
            nstate = (n, loads, done)
            if d + 1 < dist.get(nstate, 1 << 60):
                dist[nstate], prev[nstate] = d + 1, state
                heapq.heappush(heap, (d + 1, nstate))
    if goal is None:
        raise CountError(f"no path through the loop executes its {len(must)} must-run instructions once and "
                         f"the tile's loads {dict(zip(sites, want))}")
    path, state = [], goal
    while True:
        path.append(state[0])
        if state == start:
            break
        state = prev[state]
    path.reverse()
    wrong = [f"{instrs[k].addr:#x} {instrs[k].opcode} x{path.count(k)}" for k in sorted(must) if path.count(k) != 1]
    if wrong:
        raise CountError("the full-tile path does not execute every must-run instruction exactly once: "
                         + ", ".join(wrong[:6]))
    if dropout and not any(k in philox for k in path):
        raise CountError("dropout variant: the path executes no Philox code")
    if not dropout and any(k in philox for k in path):
        raise CountError("no-dropout variant: the path executes Philox code")
    return path


def count(instrs, path):
    ops = [instrs[k] for k in path]

    def n(prefix):
        return sum(1 for x in ops if x.op == prefix)

    return {"loop_instructions": len(ops), "hmma": n("HMMA"), "ldsm": n("LDSM"), "ldgsts": n("LDGSTS"),
            "lds": n("LDS"), "sts": n("STS"), "ldg": n("LDG"), "red_atom": n("RED") + n("REDG") + n("ATOM") + n("ATOMG"),
            "philox_instructions": sum(1 for x in ops if PHILOX.search(x.operands))}


def expected_hmma(kind, block_m, block_n, head_dim, warps):
    flops = (4 if kind == "fwd" else 10) * block_m * block_n * head_dim
    return flops // (FLOPS_PER_HMMA * warps)


# ----------------------------------------------------------------------------- tools and sources

def _kernel_report():
    spec = importlib.util.spec_from_file_location("kernel_report", os.path.join(ROOT, "scripts", "kernel_report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def find_nvdisasm(cuobjdump):
    for c in (os.path.join(os.path.dirname(cuobjdump), "nvdisasm"), shutil.which("nvdisasm"),
              "/usr/local/cuda/bin/nvdisasm"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("sass_report: no nvdisasm found (next to cuobjdump, on PATH, /usr/local/cuda/bin)")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def find_nvcc():
    return next((c for c in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                             shutil.which("nvcc")) if c and os.path.isfile(c)), None)


def ours_cubin(arch, kind, cuobjdump, work):
    """The attention_<kind>_kernel cubin for sm_<arch>: compiled now from the source by nvcc; without
    nvcc, the one in fastbert/_C*.so (which may predate the source: said so in the returned source)."""
    nvcc = find_nvcc()
    if nvcc is not None:
        out = os.path.join(work, f"attention_{kind}_sm{arch}.cubin")
        # setup.py's nvcc flags for the kernels
        run([nvcc, "-std=c++17", f"-arch=sm_{arch}", "-cubin", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
             "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
             "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", f"-I{os.path.join(ROOT, 'csrc')}", "-o", out,
             os.path.join(ROOT, "csrc", "attention", f"attention_{kind}_kernel.cu")])
        return out, f"nvcc -arch=sm_{arch} -O3 -lineinfo (fresh compile)"
    sos = sorted(glob.glob(os.path.join(ROOT, "fastbert", "_C*.so")))
    if sos:
        listing = run([cuobjdump, "-lelf", sos[0]])
        names = [ln.split(":")[-1].strip() for ln in listing.splitlines() if f"attention_{kind}_kernel." in ln]
        match = [nm for nm in names if nm.endswith(f".sm_{arch}.cubin")]
        if match:
            d = os.path.join(work, f"so_{arch}_{kind}")
            os.makedirs(d, exist_ok=True)
            run([cuobjdump, "-xelf", match[0], sos[0]], cwd=d)
            print(f"sass_report: no nvcc, so ours_{kind} sm_{arch} is read from {os.path.relpath(sos[0], ROOT)}, "
                  "which may be older than the source", file=sys.stderr)
            return os.path.join(d, match[0]), f"{os.path.relpath(sos[0], ROOT)} (no nvcc; may predate the source)"
    raise CountError(f"no nvcc is found and fastbert/_C*.so holds no sm_{arch} attention_{kind}_kernel")


def fa2_cubins(archs, cuobjdump, cache_dir):
    """{arch: [cubin paths]} of the cubins in libtorch_cuda.so that hold FA2's forward/backward kernels."""
    import torch
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cuda.so")
    found = {a: sorted(glob.glob(os.path.join(cache_dir, f"*.sm_{a}.cubin"))) for a in archs}
    missing = [a for a in archs if not found[a]]
    if missing:
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(cache_dir)) as tmp:
            print(f"sass_report: extracting the sm_{','.join(map(str, missing))} cubins of {lib} (about a minute)",
                  file=sys.stderr, flush=True)
            run([cuobjdump, "-xelf", ",".join(f"sm_{a}.cubin" for a in missing), lib], cwd=tmp)
            for path in glob.glob(os.path.join(tmp, "*.cubin")):
                with open(path, "rb") as f:
                    data = f.read()
                if b"pytorch_flash16flash_fwd_kernel" in data or b"flash_bwd_dq_dk_dv_loop_seqk_parallel" in data:
                    shutil.copy(path, cache_dir)
        found = {a: sorted(glob.glob(os.path.join(cache_dir, f"*.sm_{a}.cubin"))) for a in archs}
    return found


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def fa2_pick(demangled, kind, head_dim, dropout):
    """The mangled name of the FA2 instantiation torch runs (see FA2_* above), or None."""
    flags = lambda n: [b.strip() for b in n.rsplit(">", 1)[0].rsplit(">", 1)[1].split(",")[1:]]
    for mangled, name in demangled.items():
        if "bfloat16_t" not in name:
            continue
        if kind == "fwd":
            m, n, w = FA2_FWD_TILES[(head_dim, dropout)]
            if not name.startswith(f"void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<{head_dim}, {m}, {n}, {w}, false, false,"):
                continue
            # <Is_dropout, Is_causal, Is_local, Has_alibi, Is_even_MN, Is_even_K, Is_softcap, Return_softmax>
            want = [str(dropout).lower(), "false", "false", "false", "true", "true", "false", "false"]
        else:
            traits = FA2_BWD_TRAITS[(head_dim, dropout)]
            if not name.startswith(f"void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<{traits},"):
                continue
            # <Is_dropout, Is_causal, Is_local, Has_alibi, Is_even_MN, Is_even_K, Is_softcap>
            want = [str(dropout).lower(), "false", "false", "false", "true", "true", "false"]
        if flags(name) == want:
            return mangled
    return None


# ----------------------------------------------------------------------------- the report

def measure(instrs, kind, dropout, block_m, block_n, head_dim, warps, threads, rows_per_load):
    def load_counts(ins):
        return rows_per_load * head_dim // 8 // threads if ins.opcode.startswith("LDG") and ".128" in ins.opcode else 1

    path = iteration_path(instrs, dropout, load_counts)
    c = count(instrs, path)
    want = expected_hmma(kind, block_m, block_n, head_dim, warps)
    if c["hmma"] != want:
        raise CountError(f"the iteration executes {c['hmma']} HMMA, the tile's FLOPs / 4096 per warp is {want}")
    c["instr_per_hmma"] = round(c["loop_instructions"] / c["hmma"], 3)
    c["tile"] = [block_m, block_n, warps]
    return c


def resources(cubin, arch, cuobjdump, kr):
    # a bare cubin's listing has no "arch = sm_XX" header, which kernel_report's parsers key on
    header = f"arch = sm_{arch}\n"
    res = {r.mangled: r for r in kr.parse_res_usage(header + run([cuobjdump, "-res-usage", cubin]))}
    spills = kr.parse_sass_spills(header + run([cuobjdump, "-sass", cubin]))
    return res, {name: v for (arch, name), v in spills.items()}


def _fa2_kernels(paths, kinds, head_dims):
    """{(kind, dropout, head_dim): (cubin, mangled name)} of the FA2 instantiations torch runs."""
    out = {}
    for path in paths:
        with open(path, "rb") as f:
            syms = sorted({m.decode() for m in re.findall(rb"_ZN13pytorch_flash\w+", f.read())})
        names = demangle(syms)
        for kind in kinds:
            for dropout in (False, True):
                for d in head_dims:
                    m = fa2_pick(names, kind, d, dropout)
                    if m and (kind, dropout, d) not in out:
                        out[(kind, dropout, d)] = (path, m)
    return out


def report(archs, head_dims, kinds=("fwd", "bwd")):
    kr = _kernel_report()
    cuobjdump = kr.find_cuobjdump()
    nvdisasm = find_nvdisasm(cuobjdump)
    import torch
    cache = os.path.join(ROOT, "build", "sass", f"torch-{torch.__version__}")
    rows, errors, sources = [], [], {}
    fa2 = fa2_cubins(archs, cuobjdump, cache)
    with tempfile.TemporaryDirectory() as work:
        for arch in archs:
            ours_paths = {}
            for kind in kinds:
                ours_paths[kind], sources[f"ours_{kind}_sm{arch}"] = ours_cubin(arch, kind, cuobjdump, work)
            sources[f"fa2_sm{arch}"] = f"torch {torch.__version__} lib/libtorch_cuda.so"
            wanted = _fa2_kernels(fa2[arch], kinds, head_dims)
            disasm = {}

            def load(path):
                if path not in disasm:
                    f = parse_nvdisasm(run([nvdisasm, "-g", "-gi", "-c", path]))
                    disasm[path] = (f, *resources(path, arch, cuobjdump, kr), demangle(list(f)))
                return disasm[path]

            for kind in kinds:
                for dropout in (False, True):
                    variant = kind + ("+dropout" if dropout else "")
                    for d in head_dims:
                        for who in ("ours", "fa2"):
                            row = {"arch": f"sm_{arch}", "variant": variant, "head_dim": d, "kernel": who}
                            rows.append(row)
                            if who == "ours":
                                funcs, res, spills, names = load(ours_paths[kind])
                                # the backward takes dropout as a template flag: <T, d, dropout>
                                mangled = next((m for m, n in names.items()
                                                if f"attention_{kind}_kernel<__nv_bfloat16, {d}>" in n
                                                or f"attention_{kind}_kernel<__nv_bfloat16, {d}, {str(dropout).lower()}>" in n),
                                               None)
                                tile = ours_tile(kind, d)
                                rows_per_load = tile[1] if kind == "fwd" else tile[0]
                            else:
                                if (kind, dropout, d) not in wanted:
                                    row["error"] = "kernel not found in libtorch_cuda.so"
                                    errors.append(f"sm_{arch} {variant} d={d} fa2: {row['error']}")
                                    continue
                                path, mangled = wanted[(kind, dropout, d)]
                                funcs, res, spills, names = load(path)
                                if kind == "fwd":
                                    tile = FA2_FWD_TILES[(d, dropout)]
                                else:
                                    t = [x.strip() for x in FA2_BWD_TRAITS[(d, dropout)].split(",")]
                                    tile = (int(t[1]), int(t[2]), int(t[3]))
                                rows_per_load = tile[1] if kind == "fwd" else tile[0]
                            if mangled is None:
                                row["error"] = "kernel not found"
                                errors.append(f"sm_{arch} {variant} d={d} {who}: {row['error']}")
                                continue
                            row["name"] = names[mangled]
                            try:
                                row.update(measure(funcs[mangled], kind, dropout, tile[0], tile[1], d, tile[2],
                                                   tile[2] * 32, rows_per_load))
                            except CountError as e:
                                row["error"] = str(e)
                                errors.append(f"sm_{arch} {variant} d={d} {who}: {e}")
                            r = res.get(mangled)
                            row["registers"] = r.registers if r else None
                            row["static_smem"] = r.static_smem() if r else None
                            row["spill_bytes"] = list(spills.get(mangled, (0, 0)))
                            if who == "ours":
                                row["dynamic_smem"] = ours_smem(kind, d)
    for row in rows:
        if row["kernel"] == "ours" and "instr_per_hmma" in row:
            fa = next((r for r in rows if r["kernel"] == "fa2" and r["arch"] == row["arch"]
                       and r["variant"] == row["variant"] and r["head_dim"] == row["head_dim"]
                       and "instr_per_hmma" in r), None)
            if fa:
                row["ratio_to_fa2"] = round(row["instr_per_hmma"] / fa["instr_per_hmma"], 2)
    return rows, errors, sources


def ours_smem(kind, d, elem=2):
    """attention.h's attention_{fwd,bwd}_smem_bytes (the launchers' dynamic shared memory)."""
    if kind == "fwd":  # sQ [64][d + 8], two buffers of sK, sV [block_n][d + 8]
        return (64 + 4 * ours_tile(kind, d)[1]) * (d + 8) * elem
    # sK, sV, two sQ, sdO [64][d + 8], sdS [64][64 + 8]; lse, delta [2][64]; dropout bits [2][2][32][2]
    return (5 * 64 * (d + 8) + 64 * (64 + 8)) * elem + (2 * 2 * 64 + 2 * 2 * 32 * 2) * 4


def format_table(rows):
    cols = ("arch", "variant", "head_dim", "kernel", "loop_instructions", "hmma", "ldsm", "ldgsts", "lds", "sts",
            "registers", "spill_bytes", "static_smem", "instr_per_hmma", "ratio_to_fa2")
    head = ("arch", "variant", "d", "kernel", "loop instr", "HMMA", "LDSM", "LDGSTS", "LDS", "STS", "regs",
            "spill st/ld", "smem", "instr/HMMA", "ours/FA2")
    lines = [head]
    for r in rows:
        if "loop_instructions" not in r:
            lines.append(tuple(str(r.get(c, "")) for c in cols[:4]) + ("error (below)",) + ("",) * 10)
            continue
        vals = []
        for c in cols:
            v = r.get(c, "")
            if c == "spill_bytes" and v != "":
                v = f"{v[0]}/{v[1]}"
            if c == "static_smem" and r.get("dynamic_smem") is not None:
                v = f"{v}+{r['dynamic_smem']}"
            vals.append(str(v))
        lines.append(tuple(vals))
    widths = [max(len(ln[i]) for ln in lines if i < len(ln)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(ln, widths)).rstrip() for ln in lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--head-dims", default="32,64,128")
    ap.add_argument("--kinds", default="fwd,bwd", help="fwd, bwd or both (each with and without dropout)")
    ap.add_argument("--json", help="write the rows, the commit and the tool versions here")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or any(k not in ("fwd", "bwd") for k in kinds):
        raise SystemExit(f"sass_report: --kinds {args.kinds!r}: expected fwd, bwd or fwd,bwd")
    dims = [int(d) for d in args.head_dims.split(",")]
    bad = [d for d in dims if d not in (32, 64, 128)]
    if bad:
        raise SystemExit(f"sass_report: --head-dims {bad}: our kernels are built for 32, 64 and 128")
    rows, errors, sources = report(archs, dims, kinds)
    print(format_table(rows))
    for e in errors:
        print("error:", e, file=sys.stderr)
    if args.json:
        import torch
        commit = run(["git", "-C", ROOT, "rev-parse", "HEAD"]).strip()
        dirty = bool(run(["git", "-C", ROOT, "status", "--porcelain", "csrc", "scripts/sass_report.py"]).strip())
        nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        nvcc_version = run([nvcc, "--version"]).strip().splitlines()[-1] if os.path.exists(nvcc) else None
        with open(args.json, "w") as f:
            json.dump({"commit": commit, "dirty": dirty, "nvcc": nvcc_version, "torch": torch.__version__,
                       "sources": sources, "method": "scripts/sass_report.py docstring: executed instructions of "
                       "one full-tile main-loop iteration per warp, HMMA checked against FLOPs / 4096",
                       "rows": rows}, f, indent=1)
            f.write("\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
