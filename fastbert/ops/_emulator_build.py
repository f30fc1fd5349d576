"""Builds the CUDA kernel emulator: csrc/*/*.cu compiled by g++ as host C++ with
csrc/emu/cuda_emu.h force-included, plus csrc/emu/*.cc, into build/emu/<variant>/libfastbert_emu.so.

Variants: "default" (-O2), "asan" (AddressSanitizer, -O1 -g; any name ending in "-asan" too),
and other names for the deliberately broken kernels of tests/test_emulator_catches_bugs.py. No
torch headers, so a full build is about half a minute on two cores; objects are cached by the
hash of their inputs (build/emu/obj/), so only what changed is compiled again.

    python -m fastbert.ops._emulator_build [default|asan ...]
"""
import concurrent.futures
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "emu"
LIBRARY = "libfastbert_emu.so"

COMMON_FLAGS = ["-std=c++17", "-x", "c++", "-include", "emu/cuda_emu.h", "-fPIC", "-pthread",
                # the kernels type-pun (uint32_t/uint4 loads of half data) as nvcc tolerates: without
                # this g++ -O2 silently miscompiles the attention kernel
                "-fno-strict-aliasing", "-Wno-attributes", "-Wno-unknown-pragmas"]
VARIANT_FLAGS = {
    "default": ["-O2", "-g1"],
    "asan": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
}


def cuda_include() -> str:
    """A folder with cuda_runtime.h, cuda_fp16.h, cuda_bf16.h: CUDA_HOME, /usr/local/cuda, or the
    nvidia pip packages torch installs."""
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    candidates = [os.path.join(c, "include") for c in candidates if c]
    candidates += sorted(glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "*",
                                                "include")))
    for c in candidates:
        if all(os.path.exists(os.path.join(c, h)) for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")):
            return c
    raise RuntimeError("the kernel emulator needs the CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h); "
                       f"looked in {candidates}. Set CUDA_HOME or install torch's nvidia packages.")


def sources():
    return sorted(CSRC.glob("*/*.cu")) + sorted((CSRC / "emu").glob("*.cc"))


def _headers():
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh"))


def _compiler():
    return os.environ.get("CXX", "g++")


def library_path(variant: str = "default") -> Path:
    return BUILD / variant / LIBRARY


def flags_for(variant: str, defines=()):
    base = VARIANT_FLAGS["asan" if variant == "asan" or variant.endswith("-asan") else "default"]
    return COMMON_FLAGS + base + [f"-D{d}" for d in defines]


def _compiler_version():
    return subprocess.run([_compiler(), "--version"], capture_output=True, text=True).stdout


def build(variant: str = "default", defines=(), replace=None, jobs: int = None, quiet: bool = False) -> Path:
    """Builds (what changed) and returns the library of `variant`.

    replace: {path of a .cu/.cc/.h/.cuh under csrc/: source text} compiles that text instead (the
    broken kernels of the tests; a replaced header is written to build/emu/<variant>/headers/, which
    comes before csrc/ on the include path). Objects are cached by the hash of their source, every header, the
    flags and the compiler, so a variant recompiles only the files it changes.
    """
    include = cuda_include()
    flags = flags_for(variant, defines)
    replace = dict(replace or {})
    out_dir = BUILD / variant
    lib = out_dir / LIBRARY
    common = hashlib.sha256(repr((flags, include, _compiler_version())).encode())
    header_dir = None
    shutil.rmtree(BUILD / variant / "headers", ignore_errors=True)  # none from an earlier replace
    for p in _headers():
        rel = str(p.relative_to(CSRC))
        common.update(rel.encode())
        if rel in replace:
            header_dir = BUILD / variant / "headers"
            (header_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (header_dir / rel).write_text(replace[rel])
            common.update(replace[rel].encode())
        else:
            common.update(p.read_bytes())
    first = [f"-I{header_dir}"] if header_dir else []
    jobs_list = []
    for src in sources():
        rel = str(src.relative_to(CSRC))
        text = replace[rel].encode() if rel in replace else src.read_bytes()
        h = common.copy()
        h.update(rel.encode())
        h.update(text)
        jobs_list.append((src, rel, text, h.hexdigest()[:24]))
    link_hash = hashlib.sha256(repr([j[3] for j in jobs_list]).encode())
    link_hash.update(Path(__file__).read_bytes())  # link flags live here
    stamp = link_hash.hexdigest()
    stamp_file = out_dir / "stamp"
    if lib.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = BUILD / "obj"
    cache.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs_list if not (cache / f"{j[3]}.o").exists()]
    if todo and not quiet:
        print(f"building the kernel emulator ({variant}): compiling {len(todo)} of {len(jobs_list)} files",
              file=sys.stderr, flush=True)

    def compile_one(job):
        src, rel, text, digest = job
        obj = cache / f"{digest}.o"
        tmp = cache / f"{digest}.{os.getpid()}.tmp.o"
        # sources by their path relative to the repository root, so reports say csrc/<op>/<file>:line;
        # a replaced source is compiled from stdin under the same name (#line keeps file:line true)
        name = str(src.relative_to(ROOT))
        if rel in replace:
            cmd = [_compiler(), *flags, *first, f"-I{CSRC}", f"-I{src.parent}", f"-I{include}", "-c", "-", "-o", str(tmp)]
            stdin = f'#line 1 "{name}"\n'.encode() + text
        else:
            cmd = [_compiler(), *flags, *first, f"-I{CSRC}", f"-I{include}", "-c", name, "-o", str(tmp)]
            stdin = None
        r = subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {name} for the emulator failed:\n{' '.join(cmd)}\n"
                               f"{r.stderr.decode(errors='replace')[-6000:]}")
        os.replace(tmp, obj)
        return obj

    jobs = jobs or max(1, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(compile_one, todo))
    objs = [cache / f"{j[3]}.o" for j in jobs_list]
    tmp_lib = out_dir / f"{LIBRARY}.{os.getpid()}.tmp"
    link = [_compiler(), "-shared", "-Wl,-Bsymbolic",  # our cudaGetLastError etc., not a loaded libcudart's
            *[f for f in flags if f.startswith("-fsanitize")], "-pthread",
            *map(str, objs), "-o", str(tmp_lib)]
    r = subprocess.run(link, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"linking the emulator failed:\n{' '.join(link)}\n{r.stderr[-6000:]}")
    os.replace(tmp_lib, lib)
    stamp_file.write_text(stamp)
    return lib


if __name__ == "__main__":
    for v in sys.argv[1:] or ["default"]:
        print(build(v))
