"""fastbert's ops. Each has a CUDA kernel (csrc/<op>/), a pure-PyTorch twin, and autograd."""
from fastbert.ops.attention import attention, attention_varlen
from fastbert.ops.bias_dropout_residual_layernorm import bias_dropout_residual_layer_norm
from fastbert.ops.bias_gelu import bias_gelu
from fastbert.ops.cross_entropy import cross_entropy
from fastbert.ops.embeddings_layernorm_dropout import embeddings_layer_norm_dropout
from fastbert.ops.gather import gather, pad_input, scatter, unpad_input
from fastbert.ops.layernorm import layer_norm

# Every op declared in csrc/bindings.cpp, as torch.ops.fastbert.<name>.
OP_NAMES = ["gather_rows", "scatter_rows",
            "attention_varlen_fwd", "attention_varlen_bwd", "attention_bwd_delta", "attention_dropout_mask",  # attention
            "layernorm_fwd", "layernorm_bwd",  # layernorm
            "cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_bwd_",  # cross_entropy
            "bias_gelu_fwd", "bias_gelu_bwd",  # bias_gelu
            "bias_dropout_residual_layernorm_fwd", "bias_dropout_residual_layernorm_bwd",  # bias_dropout_residual_layernorm
            "embeddings_layernorm_dropout_fwd", "embeddings_layernorm_dropout_bwd"]  # embeddings_layernorm_dropout

__all__ = ["OP_NAMES", "attention", "attention_varlen", "bias_dropout_residual_layer_norm", "bias_gelu",
           "cross_entropy", "embeddings_layer_norm_dropout", "gather", "scatter", "unpad_input", "pad_input", "layer_norm"]
