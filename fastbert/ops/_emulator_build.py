"""Builds the CUDA kernel emulator: csrc/*/*.cu compiled by g++ as host C++ with
csrc/emu/cuda_emu.h force-included, plus csrc/emu/*.cc, into build/emu/<variant>/libfastbert_emu.so.

Variants: "default" (-O2), "asan" (AddressSanitizer, -O1 -g), and any name with extra -D
switches (the deliberately broken kernels of tests/test_emulator_catches_bugs.py). No torch
headers, so a full build is about half a minute on two cores; a build is redone only when a
source, a flag or the compiler changed (a hash in build/emu/<variant>/stamp).

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


def _stamp(variant, flags, include):
    h = hashlib.sha256()
    version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    h.update(repr((flags, include)).encode())
    h.update(Path(__file__).read_bytes())  # link flags live here
    for p in sources() + _headers():
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def build(variant: str = "default", defines=(), jobs: int = None, quiet: bool = False) -> Path:
    """Builds (if anything changed) and returns the library of `variant`."""
    include = cuda_include()
    flags = flags_for(variant, defines)
    out_dir = BUILD / variant
    lib = out_dir / LIBRARY
    stamp = _stamp(variant, flags, include)
    stamp_file = out_dir / "stamp"
    if lib.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return lib
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    srcs = sources()
    if not quiet:
        print(f"building the kernel emulator ({variant}, {len(srcs)} files) into {out_dir.relative_to(ROOT)}",
              file=sys.stderr, flush=True)

    def compile_one(src):
        obj = out_dir / (src.relative_to(CSRC).as_posix().replace("/", "_") + ".o")
        # sources by their path relative to the repository root, so reports say csrc/<op>/<file>:line
        cmd = [_compiler(), *flags, f"-I{CSRC}", f"-I{include}", "-c", str(src.relative_to(ROOT)), "-o", str(obj)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {src.relative_to(ROOT)} for the emulator failed:\n{' '.join(cmd)}\n"
                               f"{r.stderr[-6000:]}")
        return obj

    jobs = jobs or max(1, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        objs = list(pool.map(compile_one, srcs))
    link = [_compiler(), "-shared", "-Wl,-Bsymbolic",  # our cudaGetLastError etc., not a loaded libcudart's
            *[f for f in flags if f.startswith("-fsanitize")], "-pthread",
            *map(str, objs), "-o", str(lib)]
    r = subprocess.run(link, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"linking the emulator failed:\n{' '.join(link)}\n{r.stderr[-6000:]}")
    stamp_file.write_text(stamp)
    return lib


if __name__ == "__main__":
    for v in sys.argv[1:] or ["default"]:
        print(build(v))
