"""The package without its extension, the kernel switch, `fastbert info` and `fastbert check`."""
import os
import subprocess
import sys

import pytest
import torch

from fastbert import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_works_without_the_extension():
    """With fastbert._C unimportable every op runs its twin: the model still trains and matches."""
    code = """
import sys
sys.modules['fastbert._C'] = None  # makes `import fastbert._C` fail, as on a machine without the build
import torch, fastbert
from fastbert import _backend
assert not _backend.extension_loaded() and _backend.cuda_ops() == []
config = fastbert.BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=30)
model = fastbert.BertForPreTraining(config)
ids = torch.randint(0, 50, (2, 7)); labels = torch.full_like(ids, -100); labels[:, 3] = 5
out = model(ids, labels=labels, next_sentence_label=torch.tensor([0, 1]))
out.loss.backward()
print('loss', out.loss.item())
"""
    r = python(code)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) > 0


def test_kernels_env_switch():
    r = python("import fastbert; print(fastbert.kernels_enabled())", FASTBERT_KERNELS="0")
    assert r.stdout.strip() == "False"
    r = python("import fastbert; print(fastbert.kernels_enabled())")
    assert r.stdout.strip() == "True"


def test_info_lists_versions_and_kernels():
    r = subprocess.run([sys.executable, "-m", "fastbert", "info"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert torch.__version__ in r.stdout and "CUDA kernels" in r.stdout
    for name in _backend.cuda_ops():
        assert name in r.stdout
    if _backend.extension_loaded() and torch.version.cuda:
        # a CUDA build of the extension lists the ops it compiled
        assert ("gather_rows" in r.stdout) == _backend.has_cuda_kernel("gather_rows")
    if _backend.has_op("cuda_arch_list"):  # and the architectures it holds code for
        archs = _backend.built_archs()
        assert archs is not None and all(f"sm_{a}" in r.stdout for a in archs[0])


def test_check_without_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: `fastbert check` runs the kernels (scripts/gpu_check.sh)")
    r = subprocess.run([sys.executable, "-m", "fastbert", "check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "no CUDA GPU" in r.stdout


def test_console_script_and_help():
    exe = os.path.join(os.path.dirname(sys.executable), "fastbert")  # installed by pip's entry point
    if not os.path.exists(exe):
        pytest.skip(f"fastbert is not pip-installed beside {sys.executable}")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    for command in ("info", "check", "examples", "pretrain", "embed"):
        assert command in r.stdout
