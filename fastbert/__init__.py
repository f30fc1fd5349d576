"""fastbert: BERT pretraining and inference with custom CUDA kernels, a drop-in for transformers."""
from fastbert.version import __version__
from fastbert._backend import kernels, kernels_enabled, use_kernels
