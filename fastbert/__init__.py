"""fastbert: BERT pretraining and inference with custom CUDA kernels, a drop-in for transformers'
BertModel and BertForPreTraining. Every kernel has a pure-PyTorch twin; `use_kernels(False)`
or FASTBERT_KERNELS=0 runs the twins everywhere."""
from fastbert.version import __version__
from fastbert._backend import kernels, kernels_enabled, use_kernels
from fastbert.config import BertConfig, preset
from fastbert.model import BertForPreTraining, BertModel
from fastbert.pooling import pool

__all__ = ["__version__", "BertConfig", "BertModel", "BertForPreTraining", "pool", "preset",
           "use_kernels", "kernels", "kernels_enabled"]
