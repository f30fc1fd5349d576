"""Build fastbert and its one extension, fastbert._C.

Environment:
  FASTBERT_FORCE_CUDA=1   build the CUDA kernels even with no GPU visible (CI does this)
  FASTBERT_SKIP_CUDA=1    build no CUDA kernels (the binding file alone, CPU)
  TORCH_CUDA_ARCH_LIST    architectures to build for; default: the visible GPUs, else "8.0;9.0"
  CUDA_HOME / CUDA_PATH   the CUDA toolkit; found from nvcc or /usr/local/cuda otherwise
  MAX_JOBS                parallel compile jobs (ninja)

Install torch first, then `pip install --no-build-isolation .`: the extension must be built
against the torch it will run with. Without torch at build time the package installs as pure
Python (reference path only) and says so.
"""
import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _version():
    ns = {}
    with open(os.path.join(ROOT, "fastbert", "version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit root, or None.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a wrapper
    (here /usr/local/bin/nvcc, a script, while the toolkit is /usr/local/cuda). We only accept
    a directory that really holds bin/nvcc and include/cuda_runtime.h.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates.append("/opt/cuda")
    for c in candidates:
        if _is_toolkit(c):
            return c
    return None


def pip_cuda_include_dirs():
    """Header folders of torch's pip CUDA packages (nvidia/cu13/include, nvidia/*/include).

    torch's CUDA headers include cublas_v2.h and cusparse.h, which a bare toolkit may lack.
    They are added with -idirafter, so the toolkit's own headers always win.
    """
    roots = [p for p in sys.path if p.endswith("site-packages")]
    try:
        roots += site.getsitepackages()
    except AttributeError:  # some virtualenvs
        pass
    found = []
    for root in dict.fromkeys(roots):
        for d in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if d not in found:
                found.append(d)
    return found


def cuda_arch_codes():
    """(sass, ptx): the architectures torch's -gencode flags compile machine code and PTX for,
    as numbers (80, 90), recorded in the extension so the dispatch can check a device against them."""
    import re

    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags
        flags = " ".join(_get_cuda_arch_flags())
    except Exception as e:  # a private torch helper; without it the dispatch checks the capability only
        print(f"fastbert: WARNING could not read torch's CUDA arch flags ({e}); not recording them", file=sys.stderr)
        return None
    sass = sorted({int(a) for a in re.findall(r"code=\[?sm_(\d+)", flags)})
    ptx = sorted({int(a) for a in re.findall(r"code=\[?compute_(\d+)", flags)})
    return sass, ptx


def extension_modules():
    if _flag("FASTBERT_FORCE_CUDA") and _flag("FASTBERT_SKIP_CUDA"):
        sys.exit("setup.py: FASTBERT_FORCE_CUDA=1 and FASTBERT_SKIP_CUDA=1 contradict each other; set one.")
    cuda_home = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if _flag("FASTBERT_FORCE_CUDA"):
            sys.exit("setup.py: FASTBERT_FORCE_CUDA=1 but torch is not importable; install torch first, "
                     "then `pip install --no-build-isolation .`")
        print("fastbert: WARNING torch is not importable at build time: installing without the "
              "fastbert._C extension (reference PyTorch path only). Install torch first and use "
              "`pip install --no-build-isolation .` to build the kernels.", file=sys.stderr)
        return [], {}

    want_cuda = not _flag("FASTBERT_SKIP_CUDA")
    if want_cuda and torch.version.cuda is None:
        if _flag("FASTBERT_FORCE_CUDA"):
            sys.exit(f"setup.py: FASTBERT_FORCE_CUDA=1 but torch {torch.__version__} is a CPU build")
        want_cuda = False
    if want_cuda and cuda_home is None:
        if _flag("FASTBERT_FORCE_CUDA"):
            sys.exit("setup.py: FASTBERT_FORCE_CUDA=1 but no CUDA toolkit was found "
                     "(set CUDA_HOME to the folder holding bin/nvcc)")
        want_cuda = False
    if want_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    sources = [os.path.join("csrc", "bindings.cpp")]
    idirafter = []
    for d in pip_cuda_include_dirs():
        idirafter += ["-idirafter", d]
    cxx = ["-O3"] + idirafter  # torch adds the -std it needs (C++20 for recent torch)
    define_macros = []
    if want_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*", "*.cu")))
        define_macros.append(("FASTBERT_WITH_CUDA", "1"))
        codes = cuda_arch_codes()
        if codes is not None:  # for bindings.cpp, through g++ only: nvcc would split the commas of -D
            cxx += [f"-DFASTBERT_SASS_ARCHS={','.join(map(str, codes[0]))}",
                    f"-DFASTBERT_PTX_ARCHS={','.join(map(str, codes[1]))}"]
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        ext = CUDAExtension("fastbert._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                            define_macros=define_macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc})
        print(f"fastbert: building CUDA kernels with CUDA_HOME={os.environ.get('CUDA_HOME')} for "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}", file=sys.stderr)
    else:
        ext = CppExtension("fastbert._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                           extra_compile_args={"cxx": cxx})
        print("fastbert: building fastbert._C without CUDA kernels", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fastbert",
    version=_version(),
    description="Fast BERT pretraining and inference on NVIDIA GPUs, a drop-in for transformers' BertModel",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastbert", "fastbert.*"]),
    package_data={"fastbert.data": ["*.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy", "safetensors", "tokenizers>=0.15,<0.24", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark", "transformers", "sentence-transformers"]},
    entry_points={"console_scripts": ["fastbert=fastbert.cli:main"]},
    zip_safe=False,
)
