"""Static resources of every CUDA kernel in the built extension, per architecture it was built for.

    python scripts/kernel_report.py [--so fastbert/_C*.so] [--json report.json]
    python scripts/kernel_report.py --build [--archs 80,90] [--cu csrc/<op>/<file>.cu ...] [--out report.txt]

The first form reads the built extension. --build reads the sources instead: it compiles every
csrc/<op>/*.cu (or only the --cu files) with setup.py's nvcc flags into one fatbin per file and
architecture list (`nvcc -fatbin`, cached under build/kernel_report/ by the hash of the flags and
of the csrc files it includes), so a changed kernel is checked without building or installing the
extension, for sm_80 and sm_90 by default whatever the extension was built for. With --cu only the
launch-table entries of the kernels those files define are checked.

For each kernel instantiation the launchers can dispatch to (the launch table that
scripts/kernel_launches.cpp prints from the csrc/<op>/<op>.h definitions the launchers use) and
each architecture the binary holds machine code for: registers, local-memory spill stores and
loads (counted from the SASS), static and dynamic shared memory, and the theoretical occupancy
(CTAs and warps per SM, from registers, shared memory and threads per block under that
architecture's SM limits; for a kernel launched with several block sizes, the worst one).

Also counted from the SASS: the 16-byte (128-bit) global loads and stores of each kernel
(LDG/STG with a .128 suffix). An instantiation the launch table marks as moving 16-byte packs on
its main path (layernorm's, with 16-byte packs) must have both.

Exit status 1, with the reason, when a reachable instantiation spills, when a 16-byte path has no
128-bit global load or store, when its theoretical occupancy is below 50% at any block size its
launcher uses (issue 14's bar; the attention kernels, compute-bound, are exempt and noted), when a
launch would ask
for more shared memory than the architecture allows per block (opt-in included), or when the
launch table names a kernel the binary lacks. Kernels the binary holds that no launcher reaches
are listed as unreachable and do not fail the report.

Tools: cuobjdump (the CUDA toolkit's, or the copy the `triton` package ships: torch's CUDA wheels
depend on it) reads the binary without a GPU; g++ builds the launch table; c++filt demangles.
"""
import argparse
import dataclasses
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KIB = 1024


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of one architecture (CUDA C++ Programming Guide, "Technical Specifications
    per Compute Capability"; shared memory as cudaDevAttrMaxSharedMemoryPerMultiprocessor and
    cudaDevAttrMaxSharedMemoryPerBlockOptin report it)."""
    max_warps: int            # resident warps per SM
    max_ctas: int             # resident thread blocks per SM
    smem_per_sm: int          # bytes, the largest carveout
    smem_optin: int           # bytes per block with cudaFuncAttributeMaxDynamicSharedMemorySize
    reserved_smem: int        # bytes the system reserves per block (sm_80 and newer: 1 KiB)
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_unit: int = 256       # registers are allocated per warp in units of 256
    sub_partitions: int = 4   # the register file is split over 4 schedulers
    smem_unit: int = 128      # shared memory allocation granularity per block


SMEM_DEFAULT_LIMIT = 48 * KIB  # per block without the opt-in attribute, every architecture
OCCUPANCY_BAR = 0.5  # issue 14: theoretical occupancy of every memory-bound kernel, at every block size launched
# Kernels held to no occupancy bar, by name without template arguments, with the reason.
OCCUPANCY_EXEMPT = {
    k: "compute-bound tensor-core kernel, low occupancy by design as FlashAttention-2's (tiles in registers "
       "and shared memory; judged by instructions per HMMA: scripts/sass_report.py)"
    for k in ("attention_fwd_kernel", "attention_bwd_kernel")
}

SM_LIMITS = {
    70: SMLimits(max_warps=64, max_ctas=32, smem_per_sm=96 * KIB, smem_optin=96 * KIB, reserved_smem=0),
    75: SMLimits(max_warps=32, max_ctas=16, smem_per_sm=64 * KIB, smem_optin=64 * KIB, reserved_smem=0),
    80: SMLimits(max_warps=64, max_ctas=32, smem_per_sm=164 * KIB, smem_optin=163 * KIB, reserved_smem=KIB),
    86: SMLimits(max_warps=48, max_ctas=16, smem_per_sm=100 * KIB, smem_optin=99 * KIB, reserved_smem=KIB),
    87: SMLimits(max_warps=48, max_ctas=16, smem_per_sm=164 * KIB, smem_optin=163 * KIB, reserved_smem=KIB),
    89: SMLimits(max_warps=48, max_ctas=24, smem_per_sm=100 * KIB, smem_optin=99 * KIB, reserved_smem=KIB),
    90: SMLimits(max_warps=64, max_ctas=32, smem_per_sm=228 * KIB, smem_optin=227 * KIB, reserved_smem=KIB),
    100: SMLimits(max_warps=64, max_ctas=32, smem_per_sm=228 * KIB, smem_optin=227 * KIB, reserved_smem=KIB),
    120: SMLimits(max_warps=48, max_ctas=32, smem_per_sm=100 * KIB, smem_optin=99 * KIB, reserved_smem=KIB),
}


def limits(arch: int) -> SMLimits:
    if arch not in SM_LIMITS:
        raise ValueError(f"no SM limits known for sm_{arch}; known: {', '.join(f'sm_{a}' for a in sorted(SM_LIMITS))}")
    return SM_LIMITS[arch]


def same_family(arch: int):
    """Architectures that run sm_<arch> machine code: the same major version, this minor or newer."""
    return [a for a in sorted(SM_LIMITS) if a // 10 == arch // 10 and a >= arch]


# ----------------------------------------------------------------------------- occupancy

@dataclasses.dataclass(frozen=True)
class Occupancy:
    ctas: int      # resident blocks per SM
    warps: int     # resident warps per SM
    limiter: str   # what stops one more block: "warps", "registers", "shared memory" or "blocks"
    fraction: float  # warps / max warps per SM


def occupancy(arch: int, registers: int, threads: int, smem_bytes: int) -> Occupancy:
    """Theoretical occupancy of a kernel using `registers` per thread, launched with `threads` per
    block and `smem_bytes` of shared memory per block (static + dynamic), as the CUDA occupancy
    calculator computes it."""
    lim = limits(arch)
    if threads < 1 or threads > 1024:
        raise ValueError(f"threads per block must be in [1, 1024], got {threads}")
    if registers < 0 or smem_bytes < 0:
        raise ValueError(f"registers and shared memory must be >= 0, got {registers} and {smem_bytes}")
    warps_per_cta = math.ceil(threads / 32)
    bounds = {"warps": lim.max_warps // warps_per_cta, "blocks": lim.max_ctas}
    if registers > lim.max_regs_per_thread:
        bounds["registers"] = 0
    elif registers > 0:
        regs_per_warp = math.ceil(registers * 32 / lim.reg_unit) * lim.reg_unit
        warps_per_partition = (lim.regs_per_sm // lim.sub_partitions) // regs_per_warp
        bounds["registers"] = warps_per_partition * lim.sub_partitions // warps_per_cta
    per_cta = math.ceil((smem_bytes + lim.reserved_smem) / lim.smem_unit) * lim.smem_unit
    if smem_bytes > lim.smem_optin:
        bounds["shared memory"] = 0
    elif per_cta > 0:
        bounds["shared memory"] = lim.smem_per_sm // per_cta
    limiter = min(bounds, key=lambda k: (bounds[k], k != "blocks"))  # ties: name the resource, not the cap
    ctas = bounds[limiter]
    return Occupancy(ctas=ctas, warps=ctas * warps_per_cta, limiter=limiter,
                     fraction=ctas * warps_per_cta / lim.max_warps)


# ----------------------------------------------------------------------------- parsing

def kernel_key(demangled: str) -> str:
    """'void ns::(anonymous namespace)::k<__half, 64>(P)' -> 'k<__half, 64>'."""
    m = re.search(r"([A-Za-z_]\w*(?:<[^()]*>)?)\(", demangled)
    if not m:
        raise ValueError(f"cannot read a kernel name from {demangled!r}")
    return m.group(1)


@dataclasses.dataclass
class Resources:
    arch: int
    mangled: str
    registers: int
    stack: int
    shared: int       # static shared memory as cuobjdump counts it (with the per-block reservation)
    local: int
    spill_stores: int = 0
    spill_loads: int = 0
    global_loads_128: int = 0   # LDG*.128 instructions in the SASS
    global_stores_128: int = 0  # STG*.128

    def static_smem(self) -> int:
        """Static shared memory the kernel declares. In sm_90 (and, we assume, newer) code
        cuobjdump's SHARED includes the 1 KiB the system reserves per block whenever the kernel
        uses shared memory; in sm_80 code it does not (checked against ptxas -v: 256 B declared
        shows as SHARED:1280 for sm_90, SHARED:256 for sm_80)."""
        if self.arch >= 90 and self.shared >= limits(self.arch).reserved_smem:
            return self.shared - limits(self.arch).reserved_smem
        return self.shared


def parse_res_usage(text: str):
    """Resources per (arch, mangled name) from `cuobjdump -res-usage` output."""
    out, arch, name = [], None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name is not None:
            if arch is None:
                raise ValueError(f"cuobjdump output names function {name} before any 'arch = sm_XX' line")
            reg, stack, shared, local = map(int, m.groups())
            out.append(Resources(arch, name, reg, stack, shared, local))
            name = None
    return out


_LOCAL_ACCESS = re.compile(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)\s")


def local_access_bytes(suffixes: str) -> int:
    """Bytes moved by one STL/LDL from its suffixes: .64 = 8, .128 = 16, .U8/.S8 = 1, .U16/.S16 = 2, else 4."""
    parts = suffixes.split(".")
    if "128" in parts:
        return 16
    if "64" in parts:
        return 8
    if "U8" in parts or "S8" in parts:
        return 1
    if "U16" in parts or "S16" in parts:
        return 2
    return 4


def parse_sass_spills(text: str):
    """{(arch, mangled name): (store bytes, load bytes)} of local-memory accesses in `cuobjdump -sass`
    output; ptxas counts the same instructions as "bytes spill stores/loads"."""
    out, arch, name = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out.setdefault((arch, name), (0, 0))
            continue
        m = _LOCAL_ACCESS.search(line)
        if m and name is not None:
            stores, loads = out[(arch, name)]
            size = local_access_bytes(m.group(2))
            out[(arch, name)] = (stores + size, loads) if m.group(1) == "STL" else (stores, loads + size)
    return out


_GLOBAL_ACCESS = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)\s")


def parse_sass_vector_accesses(text: str):
    """{(arch, mangled name): (128-bit global loads, 128-bit global stores)} in `cuobjdump -sass` output."""
    out, arch, name = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out.setdefault((arch, name), (0, 0))
            continue
        m = _GLOBAL_ACCESS.search(line)
        if m and name is not None and "128" in m.group(2).split("."):
            loads, stores = out[(arch, name)]
            out[(arch, name)] = (loads + 1, stores) if m.group(1) == "LDG" else (loads, stores + 1)
    return out


@dataclasses.dataclass(frozen=True)
class Launch:
    name: str
    threads: tuple
    dynamic_smem: int  # bytes: the most any launch asks for
    vector_bytes: int = 0  # 16: the main path moves 16-byte packs (checked in the SASS)
    smem_by_threads: tuple = ()  # the most dynamic shared memory per entry of threads, when it varies

    def smem_at(self, threads: int) -> int:
        return self.smem_by_threads[self.threads.index(threads)] if self.smem_by_threads else self.dynamic_smem


def parse_launch_table(text: str):
    """name TAB threads (comma-separated) TAB dynamic smem (one number, or one per block size) [TAB 16]."""
    table = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, threads, smem, *vector = line.split("\t")
        threads = tuple(int(t) for t in threads.split(","))
        smem = tuple(int(b) for b in smem.split(","))
        if len(smem) not in (1, len(threads)):
            raise ValueError(f"launch table line for {name}: {len(smem)} shared memory sizes for {len(threads)} "
                             "block sizes; expected one, or one per block size")
        table[name] = Launch(name, threads, max(smem), int(vector[0]) if vector else 0,
                             smem if len(smem) > 1 else ())
    return table


# ----------------------------------------------------------------------------- the checks

@dataclasses.dataclass
class Row:
    name: str
    arch: int
    reachable: bool
    res: Resources
    threads: tuple = ()
    dynamic_smem: int = 0
    occupancy: Occupancy = None
    worst_threads: int = 0


def evaluate(resources, launch_table, demangle):
    """(rows, errors, notes) for the kernels of a binary against the launch table."""
    rows, errors, notes = [], [], []
    archs = sorted({r.arch for r in resources})
    seen = set()
    for res in resources:
        name = kernel_key(demangle(res.mangled))
        seen.add((res.arch, name))
        launch = launch_table.get(name)
        row = Row(name, res.arch, launch is not None, res)
        rows.append(row)
        if launch is None:
            continue
        row.threads, row.dynamic_smem = launch.threads, launch.dynamic_smem
        lim = limits(res.arch)
        total_smem = res.static_smem() + launch.dynamic_smem
        occ = [(occupancy(res.arch, res.registers, t, res.static_smem() + launch.smem_at(t)), t) for t in launch.threads]
        row.occupancy, row.worst_threads = min(occ, key=lambda o: (o[0].fraction, o[1]))
        if res.spill_stores or res.spill_loads:
            errors.append(f"{name} on sm_{res.arch} spills: {res.spill_stores} B of local stores, {res.spill_loads} B "
                          f"of local loads ({res.registers} registers, {res.stack} B stack frame); expected none")
        if launch.vector_bytes == 16 and not (res.global_loads_128 and res.global_stores_128):
            errors.append(f"{name} on sm_{res.arch} moves 16-byte packs on its main path, but its SASS has "
                          f"{res.global_loads_128} 128-bit global loads and {res.global_stores_128} 128-bit global "
                          "stores; expected both (a scalarized access: check the pack types and alignment)")
        if row.occupancy.fraction < OCCUPANCY_BAR and total_smem <= lim.smem_optin:  # (else: the error below)
            where = (f"{name} on sm_{res.arch}: theoretical occupancy {row.occupancy.fraction:.0%} at "
                     f"{row.worst_threads} threads ({res.registers} registers, "
                     f"{res.static_smem() + launch.smem_at(row.worst_threads)} B shared memory; "
                     f"limited by {row.occupancy.limiter})")
            exempt = OCCUPANCY_EXEMPT.get(name.split("<")[0])
            if exempt:
                notes.append(f"{where}: exempt from the {OCCUPANCY_BAR:.0%} bar, {exempt}")
            else:
                hint = {"registers": "fewer registers (__maxnreg__) or a block size the register file divides better",
                        "shared memory": "less shared memory per block", "blocks": "larger blocks",
                        "warps": "a block size that divides the SM's warps"}[row.occupancy.limiter]
                errors.append(f"{where}; a memory-bound kernel needs at least {OCCUPANCY_BAR:.0%} (issue 14): {hint}")
        if total_smem > lim.smem_optin:
            errors.append(f"{name} on sm_{res.arch} asks for {total_smem} B of shared memory per block "
                          f"({res.static_smem()} static + {launch.dynamic_smem} dynamic); sm_{res.arch} allows at most "
                          f"{lim.smem_optin} B with the opt-in")
        elif total_smem > SMEM_DEFAULT_LIMIT:
            over = [a for a in same_family(res.arch) if limits(a).smem_optin < total_smem]
            if over:
                notes.append(f"{name}: {total_smem} B of shared memory is over the opt-in limit of "
                             f"{', '.join(f'sm_{a}' for a in over)}, which also run sm_{res.arch} code: "
                             "the Python dispatch runs the PyTorch twin there")
        if row.occupancy.ctas == 0 and total_smem <= lim.smem_optin:
            errors.append(f"{name} on sm_{res.arch} cannot launch: no block fits an SM "
                          f"(limited by {row.occupancy.limiter})")
    for name in sorted(launch_table):
        for arch in archs:
            if (arch, name) not in seen:
                errors.append(f"the launch table (scripts/kernel_launches.cpp) names {name}, but the binary holds no "
                              f"sm_{arch} code for it; keep the table in step with the launchers")
    return rows, errors, notes


def format_rows(rows):
    header = ("kernel", "arch", "regs", "spill st/ld B", "16B ld/st", "static smem", "dyn smem", "threads", "CTAs/SM",
              "warps/SM", "occupancy", "limited by")
    lines = [header]
    for r in sorted(rows, key=lambda r: (not r.reachable, r.arch, r.name)):
        if not r.reachable:
            lines.append((r.name, f"sm_{r.arch}", str(r.res.registers), f"{r.res.spill_stores}/{r.res.spill_loads}",
                          f"{r.res.global_loads_128}/{r.res.global_stores_128}", str(r.res.static_smem()), "-", "-",
                          "-", "-", "-", "unreachable: no launcher uses it"))
            continue
        t = f"{min(r.threads)}-{max(r.threads)}" if len(r.threads) > 1 else str(r.threads[0])
        o = r.occupancy
        lines.append((r.name, f"sm_{r.arch}", str(r.res.registers), f"{r.res.spill_stores}/{r.res.spill_loads}",
                      f"{r.res.global_loads_128}/{r.res.global_stores_128}", str(r.res.static_smem()), str(r.dynamic_smem), t + (f" (worst {r.worst_threads})" if len(r.threads) > 1 else ""),
                      str(o.ctas), str(o.warps), f"{o.fraction:.0%}", o.limiter))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


# ----------------------------------------------------------------------------- tools

def find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    spec = importlib.util.find_spec("triton")  # torch's CUDA wheels depend on triton, which ships one
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("kernel_report: no cuobjdump found (looked on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin and "
                     "the triton package); install a CUDA toolkit with it, or `pip install triton`")


def cuda_include():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        d = os.environ.get(var)
        if d and os.path.isfile(os.path.join(d, "include", "cuda_runtime.h")):
            return os.path.join(d, "include")
    nvcc = shutil.which("nvcc")
    for d in ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]:
        if os.path.isfile(os.path.join(d, "include", "cuda_runtime.h")):
            return os.path.join(d, "include")
    raise SystemExit("kernel_report: no CUDA toolkit headers found (set CUDA_HOME)")


def launch_table():
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "kernel_launches")
        cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc"), "-I",
               cuda_include(), os.path.join(ROOT, "scripts", "kernel_launches.cpp"), "-o", exe]
        subprocess.run(cmd, check=True)
        return parse_launch_table(subprocess.run([exe], check=True, capture_output=True, text=True).stdout)


def demangler(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    table = dict(zip(names, out.splitlines()))
    return lambda n: table[n]


def read_binary(so, cuobjdump):
    res = parse_res_usage(subprocess.run([cuobjdump, "-res-usage", so], check=True, capture_output=True,
                                         text=True).stdout)
    if not res:
        raise SystemExit(f"kernel_report: {so} holds no CUDA machine code (built with FASTBERT_SKIP_CUDA=1, or "
                         "for PTX only?)")
    stacked = sorted({r.mangled for r in res if r.stack > 0 or r.local > 0})
    sass = subprocess.run([cuobjdump, "-sass", so], capture_output=True, text=True)
    vectors = parse_sass_vector_accesses(sass.stdout)
    for r in res:
        r.global_loads_128, r.global_stores_128 = vectors.get((r.arch, r.mangled), (0, 0))
    if stacked:  # only kernels with a stack frame can touch local memory
        spills = parse_sass_spills(sass.stdout)
        for r in res:
            if r.mangled in stacked and (r.arch, r.mangled) not in spills:
                raise SystemExit(f"kernel_report: cuobjdump -sass gave no sm_{r.arch} code for {r.mangled}, which has "
                                 f"a stack frame; cannot count its spills ({sass.stderr.strip()[:500]})")
            r.spill_stores, r.spill_loads = spills.get((r.arch, r.mangled), (0, 0))
    return res


# setup.py's nvcc flags for the kernel files (keep in step with setup.py's `nvcc` list)
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def find_nvcc():
    for c in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), shutil.which("nvcc"),
              "/usr/local/cuda/bin/nvcc"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("kernel_report: --build needs nvcc (set CUDA_HOME to the folder holding bin/nvcc)")


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return next((ln for ln in out if "release" in ln), out[-1] if out else "unknown")


def build_fatbins(sources, archs, cache_dir):
    """One fatbin per kernel source file holding sm_<arch> code for each arch, compiled with setup.py's
    flags; cached by the hash of the command and of every file under csrc/ the source includes
    (`nvcc -M`), so an edit recompiles only the files that see it."""
    nvcc = find_nvcc()
    csrc = os.path.join(ROOT, "csrc")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    os.makedirs(cache_dir, exist_ok=True)
    version = nvcc_version(nvcc)
    out = []
    for src in sources:
        cmd = [nvcc, "-fatbin", *NVCC_FLAGS, *gencode, f"-I{csrc}"]
        deps = subprocess.run([nvcc, "-M", *NVCC_FLAGS, f"-I{csrc}", f"-arch=sm_{archs[0]}", src], check=True,
                              capture_output=True, text=True).stdout
        files = sorted({os.path.abspath(d) for d in deps.replace("\\\n", " ").split()[1:]
                        if os.path.abspath(d).startswith(csrc + os.sep)} | {os.path.abspath(src)})
        key = hashlib.sha256(" ".join(cmd[1:] + [version]).encode())
        for path in files:
            with open(path, "rb") as f:
                key.update(os.path.relpath(path, ROOT).encode() + b"\0" + f.read())
        fatbin = os.path.join(cache_dir, f"{os.path.splitext(os.path.basename(src))[0]}-{key.hexdigest()[:16]}.fatbin")
        if not os.path.isfile(fatbin):
            print(f"kernel_report: nvcc {os.path.relpath(src, ROOT)} for {', '.join(f'sm_{a}' for a in archs)}",
                  file=sys.stderr, flush=True)
            subprocess.run(cmd + ["-o", fatbin + ".tmp", src], check=True)
            os.replace(fatbin + ".tmp", fatbin)
        out.append(fatbin)
    return out, nvcc


def git_state():
    """(commit, whether csrc/ or scripts/ differ from it) of this checkout; ("unknown", False) outside git."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "csrc", "scripts"], check=True,
                                    capture_output=True, text=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--so", help="the extension to read (default: fastbert/_C*.so of this checkout)")
    parser.add_argument("--json", help="also write the rows, errors and notes to this JSON file")
    parser.add_argument("--build", action="store_true",
                        help="compile the kernel sources with nvcc (setup.py's flags) instead of reading the extension")
    parser.add_argument("--archs", default="80,90", help="with --build: the architectures (default 80,90)")
    parser.add_argument("--cu", action="append", default=[],
                        help="with --build: only this kernel file (repeatable; default every csrc/<op>/*.cu)")
    args = parser.parse_args(argv)
    if (args.cu or args.archs != "80,90") and not args.build:
        parser.error("--cu and --archs go with --build")
    if args.build and args.so:
        parser.error("--build reads the sources; --so reads a built extension: pass one")
    cuobjdump = find_cuobjdump()
    table = launch_table()
    header = {}
    if args.build:
        try:
            archs = sorted({int(a) for a in args.archs.split(",") if a.strip()})
        except ValueError:
            parser.error(f"--archs takes comma-separated compute capabilities like 80,90, got {args.archs!r}")
        for a in archs:
            limits(a)
        sources = [os.path.abspath(c) for c in args.cu] or sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu")))
        for c in sources:
            if not os.path.isfile(c):
                parser.error(f"--cu {c}: no such file")
        fatbins, nvcc = build_fatbins(sources, archs, os.path.join(ROOT, "build", "kernel_report"))
        resources = [r for fb in fatbins for r in read_binary(fb, cuobjdump)]
        commit, dirty = git_state()
        what = (f"a fresh nvcc compile ({nvcc_version(nvcc)}) of {', '.join(os.path.relpath(c, ROOT) for c in sources)} "
                f"at commit {commit}{' with uncommitted changes' if dirty else ''}")
        header = {"source": "nvcc", "nvcc": nvcc_version(nvcc), "commit": commit, "dirty": dirty,
                  "files": [os.path.relpath(c, ROOT) for c in sources]}
    else:
        so = args.so
        if so is None:
            found = sorted(glob.glob(os.path.join(ROOT, "fastbert", "_C*.so")))
            if not found:
                raise SystemExit("kernel_report: no fastbert/_C*.so here; build it first (FASTBERT_FORCE_CUDA=1 "
                                 "pip install --no-build-isolation -e .), pass --so, or use --build")
            so = found[0]
        resources = read_binary(so, cuobjdump)
        what = os.path.relpath(so)
        header = {"source": os.path.relpath(so)}
    demangle = demangler(sorted({r.mangled for r in resources}))
    if args.cu:  # only the kernels the given files define
        families = {kernel_key(demangle(r.mangled)).split("<")[0] for r in resources}
        table = {n: t for n, t in table.items() if n.split("<")[0] in families}
    rows, errors, notes = evaluate(resources, table, demangle)
    print(f"kernel resources of {what} ({', '.join(f'sm_{a}' for a in sorted({r.arch for r in rows}))})")
    print(format_rows(rows))
    for n in notes:
        print(f"note: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "rows": [dataclasses.asdict(r) for r in rows], "errors": errors, "notes": notes}, f,
                      indent=1)
    if errors:
        print("\nkernel_report: FAILED", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    print("kernel_report: OK (no spills in reachable kernels; 16-byte paths use 128-bit accesses; theoretical "
          f"occupancy >= {OCCUPANCY_BAR:.0%} for every memory-bound kernel at every block size launched; shared memory "
          "within every built architecture's limit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
