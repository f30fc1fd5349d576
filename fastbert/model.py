"""BERT, read top to bottom: embeddings, self-attention, the post-LN block, the encoder, the
pooler, the heads, and the two models users call (BertModel, BertForPreTraining).

Module and parameter names are transformers' own, so state_dicts are interchangeable. The math
runs through fastbert.ops, which picks a CUDA kernel or its pure-PyTorch twin at call time.

Two paths through one set of modules. Padded: every module sees [batch, seq, hidden] and the
attention takes the [batch, seq] mask. Padding-free: the real tokens' ids are gathered once
(`Packing`), embedded, and every module sees [tokens, hidden]; the attention takes the Packing
(cu_seqlens, max_seqlen) and runs the varlen kernel; only what the caller asked for is padded
back (last_hidden_state, hidden_states, full prediction_logits). The MLM head then runs on the
labelled rows only and NSP on each sequence's first real token. `model.padding_free`: None
(default) takes the padding-free path when the CUDA attention kernel would run (inputs on CUDA,
kernels on, float16/bfloat16 q/k/v, autocast included, head_dim 32/64/128); on the CPU for
BertForPreTraining with labels (no hidden_states asked for: nothing at a padding position is
returned) when at least 10% of the batch is padding (CPU_PADDING_FREE_FROM, where it was
measured faster); and on the CPU for inference (no gradient: torch.no_grad, torch.inference_mode)
when at least CPU_INFERENCE_PADDING_FREE_FROM of the batch is padding and every sequence starts
with a token (so pooler_output is transformers'). True forces it, False keeps the padded path.

Where the padding-free path differs from the padded one and from transformers (only at positions
no real token reads): last_hidden_state, hidden_states and full prediction_logits are zeros at
padding positions (transformers computes values there: each padding position attends to its
sequence's real tokens; `model.padding_free = False` gives them); the pooler/NSP input of a
sequence with no real token (attention_mask all 0) is a zero vector (pooler_output =
tanh(pooler.dense.bias)). A label on a padding position, which transformers counts in the loss,
has no row here: with `padding_free` None such a batch takes the padded path (equal to
transformers) wherever that is seen without a device sync (CPU tensors, or check_inputs on);
`padding_free=True` refuses it (ValueError, check_inputs on); unseen (CUDA, check_inputs off) it
is left out of the MLM loss.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastbert import _backend, _validate, ops
from fastbert.config import BertConfig
from fastbert.ops.attention import HEAD_DIMS, KERNEL_DTYPES
from fastbert.ops.bias_dropout_residual_layernorm import MAX_KERNEL_HIDDEN
from fastbert.ops.gather import Packing

# On the CPU the padding-free path pays a scatter and a gather of q, k, v per layer and saves the
# linear layers' work on padding: measured on a MiniLM-L6-sized model (batch 32 x 128, 1 thread,
# CPU time, 2026-12-01) it was ~10% slower at 0-5% padding and 12-25% faster from 10% on.
CPU_PADDING_FREE_FROM = 0.1
# Inference on the CPU (no gradient) pays only a gather of the ids and a scatter of what is
# returned, and its attention runs per sequence without a mask (one thread) or on a padded copy
# (more; ops.attention.varlen_fast). Measured against the padded path (MiniLM-L6 batch 32 of up to
# 64 tokens and BERT-base batch 8 of up to 128, eval, inference_mode, 1 thread, CPU time, medians
# of 14 interleaved rounds, busy 2-core machine, 2026-12-01; the noise is about +-7%), padding-free
# / padded: per sequence 0.93-1.01 at 0-0.7% padding, 1.07 at 1.5%, 0.98 at 2.0%, 0.93 at 2.8%,
# 0.86-0.88 at 4.5%, 0.78-0.83 at 6-8%; on a padded copy 0.97-0.99 at 0%, 0.97 at 1.5%, 0.98-1.02
# at 2-3%, 0.92-0.98 at 4.5-10%. From 2% on neither was measurably slower; below, the padded path
# keeps transformers' values at padding positions at no measurable cost.
CPU_INFERENCE_PADDING_FREE_FROM = 0.02


def padding_fraction(attention_mask):
    """The share of attention_mask's positions that are padding (0), a Python float."""
    return 1.0 - float(torch.count_nonzero(attention_mask)) / attention_mask.numel()


# ----------------------------------------------------------------------------- outputs


class ModelOutput:
    """Attribute access like transformers' outputs; `out[0]` indexes the fields that are set."""

    def to_tuple(self):
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: torch.Tensor = None
    pooler_output: torch.Tensor = None
    hidden_states: tuple = None  # embeddings output + every layer's, when asked for


@dataclass
class BertForPreTrainingOutput(ModelOutput):
    loss: torch.Tensor = None  # mlm_loss + nsp_loss
    prediction_logits: torch.Tensor = None  # [batch, seq, vocab]; with labels, [labelled tokens, vocab]
    seq_relationship_logits: torch.Tensor = None  # [batch, 2]
    hidden_states: tuple = None
    mlm_loss: torch.Tensor = None
    nsp_loss: torch.Tensor = None
    masked_positions: torch.Tensor = None  # flat indices into batch*seq of the rows in prediction_logits


# ----------------------------------------------------------------------------- activations

ACTIVATIONS = {
    "gelu": F.gelu,  # exact, erf-based, as BERT
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3)))),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


# hidden_act -> F.gelu's `approximate` for the fused bias + GELU kernel ("gelu_new" is the same
# tanh formula as "gelu_pytorch_tanh", computed in another order).
GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _fused(op, *tensors):
    """Whether a fused kernel (bias_gelu, bias_dropout_residual_layernorm, embeddings_layernorm_dropout)
    runs for these inputs: the model then calls the dense layer without its bias and the fused op (or
    the embeddings' fused sum + LayerNorm + dropout); else the unfused ops, as before."""
    return _backend.use_kernel(op, *tensors)


class _Projections(torch.autograd.Function):
    """x W_i^T (+ b_i) for each projection, and x itself again for the block's residual, as ONE autograd
    node over every use of x. Autograd would sum the gradients of separate uses of x with an add
    each (three for q, k, v and the residual); here the backward accumulates them in the matmuls:
    dx = dresidual + sum_i dy_i W_i, one addmm_ (beta 1) per projection. dW_i = dy_i^T x, db_i = sum of dy_i.

    dresidual is accumulated into in place (an out-of-place addmm would first copy it on a GPU), so
    the residual output must go only to the fused residual LayerNorm kernel, whose backward returns
    dresidual as a fresh tensor nothing else holds: the model uses this node only where
    BertSelfOutput.fused says that kernel runs."""

    @staticmethod
    def forward(ctx, x, *weights_and_biases):
        weights, biases = weights_and_biases[0::2], weights_and_biases[1::2]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = tuple(b is not None for b in biases)
        return (*(F.linear(x, w, b) for w, b in zip(weights, biases)), x.view_as(x))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        douts, dres = grads[:-1], grads[-1]
        x2 = x.reshape(-1, x.shape[-1])
        dx, result = None, []
        if dres is not None:
            dx = dres.reshape(x2.shape).contiguous()
        for dy, w, has_bias in zip(douts, weights, ctx.has_bias):
            if dy is None:
                result += [None, None]
                continue
            dy2 = dy.reshape(-1, dy.shape[-1])
            dx = dy2.mm(w) if dx is None else dx.addmm_(dy2, w)
            result += [dy2.t().mm(x2), dy2.sum(dim=0) if has_bias else None]
        return (dx.view(x.shape) if dx is not None else None, *result)


def project(x, linears, bias=True):
    """[linear(x) for linear in linears] (without their biases if not bias), and x again for the
    block's residual, through one autograd node (_Projections), so the backward sums the gradients
    of x's uses inside the matmuls. The residual must go only to the fused residual LayerNorm."""
    params = [t for lin in linears for t in (lin.weight, lin.bias if bias else None)]
    return _Projections.apply(x, *params)


# ----------------------------------------------------------------------------- the encoder


class BertEmbeddings(nn.Module):
    """word + token type + position embeddings, then LayerNorm and dropout."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids):  # [batch, seq] or packed [tokens]
        words, types = self.word_embeddings(input_ids), self.token_type_embeddings(token_type_ids)
        positions = self.position_embeddings(position_ids).expand_as(words)
        ln = self.LayerNorm
        if _fused("embeddings_layernorm_dropout_fwd", words, ln.weight):  # sum, LayerNorm, dropout: one kernel
            return ops.embeddings_layer_norm_dropout(words, types, positions, ln.weight, ln.bias, ln.eps,
                                                     self.dropout.p, self.training)
        h = ops.layer_norm(words + types, ln.weight, ln.bias, ln.eps, residual=positions)
        return self.dropout(h)


@dataclass
class PaddedMask:
    """The padded path's attention input: the [batch, seq] mask, and the `Packing` the attention
    kernel needs, built once per forward on the host and shared by every layer (None where the
    twin runs)."""
    mask: torch.Tensor
    packing: Packing = None


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden, attn, one_node=False):
        """(context, residual): hidden [batch, seq, hidden] with attn the [batch, seq] mask (or a PaddedMask),
        or [tokens, hidden] with attn a Packing. residual is hidden, for the block's residual LayerNorm;
        with one_node, q, k, v and residual come from one autograd node (`project`)."""
        heads = (*hidden.shape[:-1], self.num_attention_heads, self.attention_head_size)
        projections = (self.query, self.key, self.value)
        if one_node:
            *qkv, residual = project(hidden, projections)
        else:
            qkv, residual = [proj(hidden) for proj in projections], hidden
        q, k, v = (t.view(heads) for t in qkv)
        if isinstance(attn, Packing):
            out = ops.attention_varlen(q, k, v, attn.cu_seqlens, attn.max_seqlen, dropout_p=self.dropout_p,
                                       training=self.training, check=False)
        else:
            mask, packing = (attn.mask, attn.packing) if isinstance(attn, PaddedMask) else (attn, None)
            out = ops.attention(q, k, v, mask, dropout_p=self.dropout_p, training=self.training, packing=packing)
        return out.reshape(hidden.shape), residual


class BertSelfOutput(nn.Module):
    """dense, dropout, then LayerNorm(· + the block's input): the post-LN residual.

    On the kernel path the dense runs without its bias and one fused kernel adds the bias, drops
    out, adds the residual and normalizes (ops.bias_dropout_residual_layer_norm)."""

    def __init__(self, config, in_features):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def fused(self, residual):
        """Whether forward runs the fused kernel for this residual (its backward gives dresidual as a
        fresh tensor: the block's input may then come from `project`)."""
        return (self.LayerNorm.normalized_shape[0] <= MAX_KERNEL_HIDDEN
                and _fused("bias_dropout_residual_layernorm_fwd", residual, self.dense.weight))

    def forward(self, hidden, residual):
        ln = self.LayerNorm
        if self.fused(residual):  # the same decision the block made for `project` (hidden is on residual's device)
            return ops.bias_dropout_residual_layer_norm(F.linear(hidden, self.dense.weight), self.dense.bias, residual,
                                                        ln.weight, ln.bias, ln.eps, self.dropout.p, self.training)
        h = self.dropout(self.dense(hidden))
        return ops.layer_norm(h, ln.weight, ln.bias, ln.eps, residual=residual)


class BertOutput(BertSelfOutput):
    """The feed-forward's second half: the same dense + dropout + residual LayerNorm."""

    def __init__(self, config):
        super().__init__(config, config.intermediate_size)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, hidden, attn):
        return self.output(*self.self(hidden, attn, one_node=self.output.fused(hidden)))


class BertIntermediate(nn.Module):
    """dense, then the activation. For the GELUs on the kernel path the dense runs without its bias
    and one fused kernel adds it and applies GELU (ops.bias_gelu), forward and backward."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACTIVATIONS[config.hidden_act]
        self.gelu_approximate = GELU_APPROXIMATE.get(config.hidden_act)  # None: not a GELU ops.bias_gelu computes

    def forward(self, hidden, one_node=False):
        """(activation, residual): residual is hidden, for the block's residual LayerNorm; with one_node,
        the dense and residual come from one autograd node (`project`)."""
        if self.gelu_approximate is not None and _fused("bias_gelu_fwd", hidden, self.dense.weight):
            if one_node:
                h, residual = project(hidden, [self.dense], bias=False)
            else:
                h, residual = F.linear(hidden, self.dense.weight), hidden
            return ops.bias_gelu(h, self.dense.bias, self.gelu_approximate), residual
        if one_node:
            h, residual = project(hidden, [self.dense])
            return self.intermediate_act_fn(h), residual
        return self.intermediate_act_fn(self.dense(hidden)), hidden


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden, attn):
        attended = self.attention(hidden, attn)
        return self.output(*self.intermediate(attended, one_node=self.output.fused(attended)))


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden, attn, output_hidden_states=False):
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layer:
            hidden = layer(hidden, attn)
            if output_hidden_states:
                all_hidden.append(hidden)
        return hidden, (tuple(all_hidden) if output_hidden_states else None)


class BertPooler(nn.Module):
    """tanh(dense(hidden of [CLS])): the sentence vector NSP classifies."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


# ----------------------------------------------------------------------------- the heads


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden):
        h = self.transform_act_fn(self.dense(hidden))
        return ops.layer_norm(h, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)


class BertLMPredictionHead(nn.Module):
    """transform, then a decoder whose weight is the word embedding matrix (tied) plus a bias."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden):
        return self.decoder(self.transform(hidden))


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


# ----------------------------------------------------------------------------- the models


class BertPreTrainedModel(nn.Module):
    """Weights init as transformers, and from_pretrained/save_pretrained in its file format."""

    base_model_prefix = "bert"
    # state_dict keys that alias another parameter; not written by save_pretrained
    _tied_weights_keys = ()

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a fastbert.BertConfig, got {type(config).__name__}")
        self.config = config
        self.check_inputs = True  # validate ids and labels (one host sync per tensor) before any kernel
        self.padding_free = None  # None: when the attention kernel would run; True/False: always/never

    def init_weights(self):
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, BertLMPredictionHead):
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def tie_weights(self):
        pass

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory):
        from fastbert import checkpoint
        checkpoint.save_model(self, directory)

    @classmethod
    def from_pretrained(cls, path, *, config=None, map_location="cpu", output_loading_info=False, **config_overrides):
        """Load a model directory written by fastbert or transformers (config.json plus
        model.safetensors, a sharded safetensors index, or pytorch_model.bin). With
        `output_loading_info`, returns (model, {"missing_keys", "unexpected_keys"}) as transformers."""
        from fastbert import checkpoint
        return checkpoint.load_model(cls, path, config=config, map_location=map_location,
                                     output_loading_info=output_loading_info, **config_overrides)


class BertModel(BertPreTrainedModel):
    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, return_dict=True, packing=None):
        """As transformers' BertModel. `packing`: an optional `Packing` of attention_mask, built by
        the caller on the CPU, which spares the attention kernel its host sync (padded or padding-free path)."""
        hidden, pooled, all_hidden, packing = self.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                                          output_hidden_states, packing)
        if packing is not None:  # pad back what the caller sees
            seq = input_ids.shape[1]
            hidden = packing.pad(hidden, seq)
            all_hidden = tuple(packing.pad(h, seq) for h in all_hidden) if all_hidden is not None else None
        out = BaseModelOutputWithPooling(hidden, pooled, all_hidden)
        return out if return_dict else out.to_tuple()

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               output_hidden_states=False, packing=None):
        """(hidden, pooled, hidden_states, packing): on the padding-free path packing is a `Packing`
        and hidden (and each of hidden_states) is packed [tokens, hidden]; else packing is None and
        they are [batch, seq, hidden]."""
        given_mask = attention_mask
        input_ids, attention_mask, token_type_ids, position_ids = self._prepare_inputs(
            input_ids, attention_mask, token_type_ids, position_ids)
        if not self.use_padding_free(input_ids, given_mask):
            attn = PaddedMask(attention_mask)
            if given_mask is not None and self.attention_kernel_runs(input_ids):  # one Packing for every layer
                attn.packing = self._packing(input_ids, given_mask, attention_mask, packing)
            hidden = self.embeddings(input_ids, token_type_ids, position_ids)
            hidden, all_hidden = self.encoder(hidden, attn, output_hidden_states)
            pooled = self.pooler(hidden) if self.pooler is not None else None
            return hidden, pooled, all_hidden, None
        packing = self._packing(input_ids, given_mask, attention_mask, packing)
        ids, token_types, positions = (packing.pack(t) for t in (input_ids, token_type_ids, position_ids))
        hidden = self.embeddings(ids, token_types, positions)  # only the real tokens are embedded
        hidden, all_hidden = self.encoder(hidden, packing, output_hidden_states)
        pooled = self.pooler(packing.first_rows(hidden)[:, None]) if self.pooler is not None else None
        return hidden, pooled, all_hidden, packing

    def use_padding_free(self, input_ids, attention_mask=None):
        """model.padding_free if set; by default (None) whenever the CUDA attention kernel would run,
        and for inference on the CPU (no gradient: torch.no_grad / inference_mode) when at least
        CPU_INFERENCE_PADDING_FREE_FROM of attention_mask is padding and every sequence's first
        position is a token (the pooler reads position 0; left padding and empty sequences stay padded)."""
        if self.padding_free is not None:
            return bool(self.padding_free)
        if input_ids.is_cuda:
            return self.attention_kernel_runs(input_ids)
        if torch.is_grad_enabled() or attention_mask is None or not attention_mask.numel():
            return False
        if input_ids.device.type != "cpu" or attention_mask.device.type != "cpu":
            return False
        if not bool(attention_mask[:, 0].all()):  # the pooler reads position 0: keep transformers' value there
            return False
        return padding_fraction(attention_mask) >= CPU_INFERENCE_PADDING_FREE_FROM

    def attention_kernel_runs(self, input_ids):
        """Whether the attention kernel (on CPU tensors: the emulated one) would run in this model's layers:
        kernels on for input_ids' device, float16/bfloat16 q/k/v (autocast included), head_dim 32/64/128."""
        if not _backend.use_kernel("attention_varlen_fwd", input_ids):
            return False
        kind = input_ids.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.dtype
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        return dtype in KERNEL_DTYPES and head_dim in HEAD_DIMS

    def _packing(self, input_ids, given_mask, attention_mask, packing):
        batch, seq = input_ids.shape
        if packing is None:
            if given_mask is None:  # every position is a token: no sync needed
                return Packing.full(batch, seq, input_ids.device)
            # built on the host: a CUDA mask costs one copy (a sync), not nonzero's and max's two
            return Packing.from_mask(attention_mask.cpu()).to(input_ids.device, non_blocking=True)
        if not isinstance(packing, Packing):
            raise TypeError(f"packing must be a fastbert.model.Packing, got {type(packing).__name__}")
        if packing.cu_seqlens.shape != (batch + 1,) or packing.indices.dim() != 1:
            raise ValueError(f"packing describes {packing.batch} sequences ({packing.indices.shape[0]} tokens) "
                             f"but input_ids holds {batch}; build it with Packing.from_mask(attention_mask)")
        if packing.indices.device != input_ids.device or packing.cu_seqlens.device != input_ids.device:
            raise ValueError(f"packing is on {packing.indices.device} but input_ids is on {input_ids.device}; "
                             "move it with packing.to(device)")
        if self.check_inputs:  # one host sync
            want = Packing.from_mask(attention_mask)
            if (want.max_seqlen != packing.max_seqlen or not torch.equal(want.cu_seqlens, packing.cu_seqlens)
                    or not torch.equal(want.indices, packing.indices)):
                raise ValueError("packing does not describe attention_mask; build it with Packing.from_mask(attention_mask)")
        return packing

    def _prepare_inputs(self, input_ids, attention_mask, token_type_ids, position_ids):
        """Defaults as transformers, and every check that must happen before a kernel sees the ids."""
        c = self.config
        _validate.integer("input_ids", input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-d [batch, seq], got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if seq > c.max_position_embeddings:
            raise ValueError(f"input_ids has {seq} positions but the model holds max_position_embeddings="
                             f"{c.max_position_embeddings}; truncate the sequences")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(batch, seq)}, "
                             "the shape of input_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            _validate.integer("token_type_ids", token_type_ids)
            if tuple(token_type_ids.shape) != (batch, seq):
                raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}; expected {(batch, seq)}")
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        else:
            _validate.integer("position_ids", position_ids)
            position_ids = position_ids.expand(batch, seq) if position_ids.shape[-1] == seq else position_ids
            if tuple(position_ids.shape) != (batch, seq):
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected {(batch, seq)}")
        if self.check_inputs:
            _validate.in_range("input_ids", input_ids, 0, c.vocab_size)
            _validate.in_range("token_type_ids", token_type_ids, 0, c.type_vocab_size)
            _validate.in_range("position_ids", position_ids, 0, c.max_position_embeddings)
        return input_ids, attention_mask, token_type_ids, position_ids


class BertForPreTraining(BertPreTrainedModel):
    """BertModel with the MLM and NSP heads; loss = mean MLM cross-entropy + mean NSP cross-entropy.

    With `labels`, the MLM head runs only at the labelled positions (gathered), and
    `prediction_logits` holds those rows, [labelled tokens, vocab], in the order of
    `masked_positions` (flat indices into batch*seq). Without labels it is [batch, seq, vocab].
    """

    _tied_weights_keys = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings and hasattr(self, "cls"):
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        if hasattr(self, "cls"):
            self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def get_input_embeddings(self):
        return self.bert.embeddings.word_embeddings

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states=False, return_dict=True, masked_positions=None,
                packing=None):
        self.bert.check_inputs, self.bert.padding_free = self.check_inputs, self.padding_free
        if self.padding_free is None and self._cpu_padding_free(input_ids, attention_mask, labels, output_hidden_states):
            self.bert.padding_free = True
        if labels is not None:
            _validate.integer("input_ids", input_ids)
            masked_positions = self._masked_positions(labels, masked_positions, input_ids.shape)
            if self._labels_on_padding(input_ids, attention_mask, masked_positions):
                if self.padding_free:
                    raise ValueError("a labelled position (labels != -100) is padding (attention_mask 0); the "
                                     "padding-free path has no row there: label real tokens only, or set "
                                     "model.padding_free = False (or None) to compute it as transformers does")
                self.bert.padding_free = False  # transformers counts it in the loss: so does the padded path
        hidden, pooled, all_hidden, packing = self.bert.encode(input_ids, attention_mask, token_type_ids,
                                                               position_ids, output_hidden_states, packing)
        seq = input_ids.shape[1]
        if packing is not None and all_hidden is not None:
            all_hidden = tuple(packing.pad(h, seq) for h in all_hidden)
        nsp_logits = self.cls.seq_relationship(pooled)

        mlm_loss = nsp_loss = None
        if labels is not None:
            targets = labels.reshape(-1)[masked_positions]
            if packing is None:
                rows = masked_positions
            else:
                rows, on_padding = self._packed_rows(masked_positions, attention_mask)
                if on_padding is not None:  # only where unseen (see _labels_on_padding): left out of the loss
                    targets = torch.where(on_padding, torch.full_like(targets, -100), targets)
            flat = hidden.reshape(-1, hidden.shape[-1])
            if not flat.shape[0]:  # no real token at all: every label is on padding
                flat = flat.new_zeros(1, flat.shape[1])
            picked = ops.gather(flat, rows, check=False)
            logits = self.cls.predictions(picked)
            mlm_loss = ops.cross_entropy(logits, targets, check=False)
        else:
            logits = self.cls.predictions(hidden)
            if packing is not None:  # [batch, seq, vocab], zeros at padding
                logits = packing.pad(logits, seq)
        if next_sentence_label is not None:
            self._check_nsp_labels(next_sentence_label, input_ids.shape[0])
            nsp_loss = ops.cross_entropy(nsp_logits, next_sentence_label.reshape(-1), check=False)

        parts = [l for l in (mlm_loss, nsp_loss) if l is not None]
        loss = sum(parts[1:], parts[0]) if parts else None
        out = BertForPreTrainingOutput(loss, logits, nsp_logits, all_hidden, mlm_loss, nsp_loss,
                                       masked_positions if labels is not None else None)
        return out if return_dict else out.to_tuple()

    @staticmethod
    def _cpu_padding_free(input_ids, attention_mask, labels, output_hidden_states):
        """The default on the CPU: padding-free when the batch is at least CPU_PADDING_FREE_FROM padding
        and nothing at a padding position is returned (with labels: the labelled rows' logits, the
        losses and NSP; no hidden_states)."""
        if labels is None or output_hidden_states or attention_mask is None or not attention_mask.numel():
            return False
        if input_ids.device.type != "cpu" or attention_mask.device.type != "cpu":
            return False
        return padding_fraction(attention_mask) >= CPU_PADDING_FREE_FROM

    def _labels_on_padding(self, input_ids, attention_mask, masked_positions):
        """Whether the padding-free path would run and a labelled position is padding, where that can be
        seen without a device sync: on CPU tensors, or when check_inputs is on (which syncs anyway)."""
        if (attention_mask is None or tuple(attention_mask.shape) != tuple(input_ids.shape)
                or not masked_positions.numel() or not self.bert.use_padding_free(input_ids)):
            return False
        if not self.check_inputs and (attention_mask.device.type != "cpu" or masked_positions.device.type != "cpu"):
            return False
        return not bool(attention_mask.reshape(-1)[masked_positions].bool().all())

    def _packed_rows(self, masked_positions, attention_mask):
        """Flat positions in batch*seq -> (rows of the packed tensor, which positions are padding or
        None): a row is the count of real tokens before the position (a cumulative sum of the mask;
        no host sync). A padding position has no row (it gets a valid one, its label is then ignored):
        forward sends a batch with one to the padded path where it can see it."""
        if attention_mask is None:
            return masked_positions, None
        real = attention_mask.reshape(-1) != 0
        rows = torch.cumsum(real, dim=0).sub_(1)[masked_positions].clamp_(min=0)
        return rows, ~real[masked_positions]

    def _masked_positions(self, labels, masked_positions, shape):
        _validate.integer("labels", labels)
        if tuple(labels.shape) != tuple(shape):
            raise ValueError(f"labels has shape {tuple(labels.shape)}; expected {tuple(shape)}, the shape of input_ids")
        flat = labels.reshape(-1)
        if self.check_inputs:
            _validate.in_range("labels", flat, 0, self.config.vocab_size, allowed=(-100,))
        if masked_positions is None:
            return torch.nonzero(flat != -100).flatten()
        _validate.integer("masked_positions", masked_positions)
        if masked_positions.dim() != 1:
            raise ValueError(f"masked_positions must be 1-d, got shape {tuple(masked_positions.shape)}")
        if self.check_inputs:
            _validate.in_range("masked_positions", masked_positions, 0, flat.numel())
            labelled = flat != -100
            if int(labelled.sum()) != masked_positions.numel() or not bool(labelled[masked_positions].all()):
                raise ValueError("masked_positions must list exactly the positions whose label is not -100")
        return masked_positions.long()

    def _check_nsp_labels(self, next_sentence_label, batch):
        _validate.integer("next_sentence_label", next_sentence_label)
        if next_sentence_label.numel() != batch:
            raise ValueError(f"next_sentence_label has {next_sentence_label.numel()} entries; expected {batch}, one per sequence")
        if self.check_inputs:
            _validate.in_range("next_sentence_label", next_sentence_label, 0, 2)
