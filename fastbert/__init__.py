"""fastbert: BERT pretraining and inference with custom CUDA kernels, a drop-in for transformers'
BertModel and BertForPreTraining. Every kernel has a pure-PyTorch twin; `use_kernels(False)`
or FASTBERT_KERNELS=0 runs the twins everywhere."""
import importlib

from fastbert.version import __version__

# name -> the module that defines it. Imported on first use (PEP 562), so that `import fastbert.cli`
# and `fastbert --help` do not pay for torch.
_EXPORTS = {"BertConfig": "fastbert.config", "preset": "fastbert.config",
            "BertModel": "fastbert.model", "BertForPreTraining": "fastbert.model",
            "pool": "fastbert.pooling",
            "use_kernels": "fastbert._backend", "kernels": "fastbert._backend", "kernels_enabled": "fastbert._backend"}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastbert' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
