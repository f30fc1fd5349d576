"""The padding-free path (fastbert.model: Packing, model.padding_free) against the padded path and
transformers: on CPU in fp32 with the twins (padding_free=True), and on a GPU with the kernels."""
import pytest
import torch

import fastbert
from fastbert import BertConfig, BertForPreTraining, BertModel
from fastbert.model import Packing

from bert_inputs import make_batch, random_config

TOL = dict(atol=1e-5, rtol=1e-5)


def two_paths(cls, config):
    padded = cls(config).eval()
    free = cls(config).eval()
    free.load_state_dict(padded.state_dict())
    padded.padding_free, free.padding_free = False, True
    return padded, free


def test_default_is_padded_on_cpu_and_the_switch_is_honoured(seed):
    config = random_config()
    model = BertModel(config)
    ids, *_ = make_batch(config, [5, 3])
    assert model.padding_free is None and not model.use_padding_free(ids)  # no CUDA kernel here: padded
    model.padding_free = True
    assert model.use_padding_free(ids)
    # BertForPreTraining hands its setting to its BertModel
    pre = BertForPreTraining(config)
    pre.padding_free = True
    ids, mask, tt, labels, nsp = make_batch(config, [5, 3])
    pre(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    assert pre.bert.padding_free is True


def test_cpu_default_is_padding_free_for_pretraining_with_labels_and_padding(seed, monkeypatch):
    """On the CPU, BertForPreTraining with labels takes the padding-free path from 10% padding on
    (where it was measured faster), and the padded one otherwise; the loss is the padded path's."""
    from fastbert import ops
    config = random_config()
    model = BertForPreTraining(config).eval()
    calls = []
    varlen = ops.attention_varlen
    monkeypatch.setattr(ops, "attention_varlen", lambda *a, **k: calls.append(1) or varlen(*a, **k))
    ids, mask, tt, labels, nsp = make_batch(config, [20, 12, 17])  # 18% padding
    free = model(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    assert len(calls) == config.num_hidden_layers
    model.padding_free = False
    padded = model(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(free.loss, padded.loss, **TOL)
    model.padding_free = None
    calls.clear()
    for kwargs in ({}, {"labels": labels, "output_hidden_states": True}):  # padding rows are returned
        model(ids, mask, tt, **kwargs)
    ids, mask, tt, labels, nsp = make_batch(config, [20, 20, 19])  # 2% padding
    model(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    assert not calls


def _hf_bert_model(ours, attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    d = {k: v for k, v in ours.config.to_dict().items() if k != "model_type"}
    hf_config = transformers.BertConfig(**d)
    hf_config._attn_implementation = attn
    theirs = transformers.BertModel(hf_config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs


def _count_varlen(monkeypatch):
    from fastbert import ops
    calls = []
    varlen = ops.attention_varlen
    monkeypatch.setattr(ops, "attention_varlen", lambda *a, **k: calls.append(1) or varlen(*a, **k))
    return calls


@pytest.mark.parametrize("lengths, seq", [([13, 1, 29, 7], None), ([1, 6], None), ([5], 9), ([3, 12, 1, 8, 11], 15)])
def test_cpu_inference_is_padding_free_and_equals_padded_and_transformers(seed, monkeypatch, lengths, seq):
    """On the CPU without a gradient, BertModel takes the padding-free path from
    CPU_INFERENCE_PADDING_FREE_FROM padding on (odd lengths, a row of length 1, batch 1): real
    positions, the pooler and every hidden state equal the padded path's and transformers', and the
    padding positions are zeros (transformers computes values there; model.padding_free = False
    gives them)."""
    config = random_config()
    model = BertModel(config).eval()
    theirs = _hf_bert_model(model)
    ids, mask, tt, _, _ = make_batch(config, lengths, seq)
    real = mask.bool()
    calls = _count_varlen(monkeypatch)
    for context in (torch.inference_mode, torch.no_grad):
        calls.clear()
        with context():
            model.padding_free = None
            free = model(ids, mask, tt, output_hidden_states=True)
            assert len(calls) == config.num_hidden_layers
            model.padding_free = False
            padded = model(ids, mask, tt, output_hidden_states=True)
            hf = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        assert free.last_hidden_state.shape == hf.last_hidden_state.shape
        for ref in (padded, hf):
            torch.testing.assert_close(free.last_hidden_state[real], ref.last_hidden_state[real], **TOL)
            torch.testing.assert_close(free.pooler_output, ref.pooler_output, **TOL)
            assert len(free.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
            for x, y in zip(free.hidden_states, ref.hidden_states):
                torch.testing.assert_close(x[real], y[real], **TOL)
        assert (free.last_hidden_state[~real] == 0).all() and all((h[~real] == 0).all() for h in free.hidden_states)
        # the padded path keeps transformers' values at the padding positions too
        torch.testing.assert_close(padded.last_hidden_state, hf.last_hidden_state, **TOL)


def test_cpu_padded_where_a_gradient_is_needed_or_padding_is_below_the_threshold(seed, monkeypatch):
    """The CPU default stays padded, with transformers' values at padding positions, when autograd
    records (training a model on BertModel's outputs), padding is under the measured threshold, or
    a sequence does not start with a token (left padding, an empty sequence: the pooler reads
    position 0)."""
    from fastbert.model import CPU_INFERENCE_PADDING_FREE_FROM, padding_fraction
    config = random_config()
    model = BertModel(config).eval()
    theirs = _hf_bert_model(model)
    calls = _count_varlen(monkeypatch)
    ids, mask, tt, _, _ = make_batch(config, [13, 1, 29, 7])
    out = model(ids, mask, tt)
    with torch.no_grad():
        hf = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    torch.testing.assert_close(out.last_hidden_state, hf.last_hidden_state, **TOL)
    assert out.last_hidden_state.requires_grad and not calls
    lengths = [40] * 12
    lengths[0] = 39  # 1 padding position in 480
    ids, mask, tt, _, _ = make_batch(config, lengths)
    assert 0 < padding_fraction(mask) < CPU_INFERENCE_PADDING_FREE_FROM
    with torch.inference_mode():
        out = model(ids, mask, tt)
        hf = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        model(ids, None, tt)  # no mask: no padding
    torch.testing.assert_close(out.last_hidden_state, hf.last_hidden_state, **TOL)
    assert not calls
    # left padding or an empty sequence: transformers' pooler reads position 0, a padding position
    ids, mask, tt, _, _ = make_batch(config, [13, 1, 29, 7])
    left = (ids.flip(1), mask.flip(1), tt.flip(1))
    empty = (ids, mask.clone().index_fill_(0, torch.tensor([1]), 0), tt)
    eager = _hf_bert_model(model, "eager")  # transformers' sdpa differs from its eager on an empty sequence
    for ids, mask, tt in (left, empty):
        with torch.inference_mode():
            out = model(ids, mask, tt)
            hf = eager(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        torch.testing.assert_close(out.pooler_output, hf.pooler_output, **TOL)
        torch.testing.assert_close(out.last_hidden_state, hf.last_hidden_state, **TOL)
    assert not calls


def test_bert_model_outputs_equal_padded(seed):
    config = random_config()
    padded, free = two_paths(BertModel, config)
    ids, mask, tt, _, _ = make_batch(config, [13, 1, 29, 7])
    a = padded(ids, mask, tt, output_hidden_states=True)
    b = free(ids, mask, tt, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(b.last_hidden_state[real], a.last_hidden_state[real], **TOL)
    assert b.last_hidden_state.shape == a.last_hidden_state.shape
    assert (b.last_hidden_state[~real] == 0).all()  # padding positions are zeros on this path
    torch.testing.assert_close(b.pooler_output, a.pooler_output, **TOL)
    assert len(b.hidden_states) == config.num_hidden_layers + 1
    for x, y in zip(b.hidden_states, a.hidden_states):
        assert x.shape == y.shape
        torch.testing.assert_close(x[real], y[real], **TOL)


def test_pretraining_outputs_loss_and_every_gradient_equal_padded(seed):
    config = random_config()
    padded, free = two_paths(BertForPreTraining, config)
    ids, mask, tt, labels, nsp = make_batch(config, [17, 1, 11, 5, 23])
    a = padded(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    b = free(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    assert torch.equal(a.masked_positions, b.masked_positions)
    torch.testing.assert_close(b.prediction_logits, a.prediction_logits, **TOL)
    torch.testing.assert_close(b.seq_relationship_logits, a.seq_relationship_logits, **TOL)
    for name in ("loss", "mlm_loss", "nsp_loss"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), **TOL, msg=name)
    a.loss.backward()
    b.loss.backward()
    grads = dict(free.named_parameters())
    for name, p in padded.named_parameters():
        assert grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, **TOL, msg=name)


def test_loss_equals_transformers(seed):
    transformers = pytest.importorskip("transformers")
    config = random_config()
    ours = BertForPreTraining(config).eval()
    ours.padding_free = True
    d = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    hf_config = transformers.BertConfig(**d)
    hf_config._attn_implementation = "eager"
    theirs = transformers.BertForPreTraining(hf_config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ids, mask, tt, labels, nsp = make_batch(config, [19, 4, 1, 30])
    a = ours(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(a.loss, b.loss, **TOL)
    torch.testing.assert_close(a.prediction_logits, b.prediction_logits.reshape(-1, config.vocab_size)[a.masked_positions], **TOL)


def _transformers_twin(ours):
    transformers = pytest.importorskip("transformers")
    d = {k: v for k, v in ours.config.to_dict().items() if k != "model_type"}
    hf_config = transformers.BertConfig(**d)
    hf_config._attn_implementation = "eager"
    theirs = transformers.BertForPreTraining(hf_config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs


@pytest.mark.parametrize("check_inputs", [True, False])
def test_labels_on_padding_loss_equals_transformers_whichever_path(seed, check_inputs, monkeypatch):
    """transformers counts a label on a padding position in the MLM loss (the position is computed as
    a query over the real tokens). The default path choice (here padding-free: 47% padding on the CPU)
    and the padded path give its loss, logits and gradients; a forced padding-free path refuses the
    batch where it can see it, and where it cannot (CUDA, check_inputs off) leaves that label out."""
    config = random_config()
    ours = BertForPreTraining(config).eval()
    ours.check_inputs = check_inputs
    theirs = _transformers_twin(ours)
    ids, mask, tt, labels, nsp = make_batch(config, [19, 4, 1, 30])
    labels[1, 9], labels[2, 29] = 7, 5  # on padding (attention_mask 0)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels, next_sentence_label=nsp)
    b.loss.backward()
    for padding_free in (None, False):
        ours.padding_free = padding_free
        ours.zero_grad()
        a = ours(ids, mask, tt, labels=labels, next_sentence_label=nsp)
        a.loss.backward()
        torch.testing.assert_close(a.loss, b.loss, **TOL)
        torch.testing.assert_close(a.prediction_logits,
                                   b.prediction_logits.reshape(-1, config.vocab_size)[a.masked_positions], **TOL)
        for name, p in theirs.named_parameters():
            torch.testing.assert_close(dict(ours.named_parameters())[name].grad, p.grad, **TOL, msg=name)
    ours.padding_free = True
    with pytest.raises(ValueError, match="is padding"):
        ours(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    # unseen (as on CUDA with check_inputs off, where looking would be a host sync): left out of the loss
    monkeypatch.setattr(BertForPreTraining, "_labels_on_padding", lambda *a: False)
    a = ours(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    real_labels = torch.where(mask.bool(), labels, -100)
    c = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=real_labels, next_sentence_label=nsp)
    torch.testing.assert_close(a.loss, c.loss, **TOL)
    assert a.prediction_logits.shape[0] == int((labels != -100).sum())  # still one row per label
    labels = torch.full_like(labels, -100)
    mask = torch.zeros_like(mask)
    labels[0, 3] = 2  # no real token anywhere
    a = ours(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    assert a.mlm_loss == 0 and torch.isfinite(a.loss)


def test_fully_padded_rows_are_finite_and_leave_the_others_alone(seed):
    config = random_config()
    padded, free = two_paths(BertForPreTraining, config)
    ids, mask, tt, labels, nsp = make_batch(config, [6, 0, 9, 0])
    a = padded(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    b = free(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    assert torch.isfinite(b.loss) and torch.isfinite(b.seq_relationship_logits).all()
    torch.testing.assert_close(b.prediction_logits, a.prediction_logits, **TOL)
    torch.testing.assert_close(b.seq_relationship_logits[[0, 2]], a.seq_relationship_logits[[0, 2]], **TOL)
    # an empty sequence has no [CLS] row: the pooler sees zeros
    pooled = free.bert(ids, mask, tt).pooler_output
    expected = torch.tanh(free.bert.pooler.dense.bias).expand(2, -1)
    torch.testing.assert_close(pooled[[1, 3]], expected, **TOL)
    b.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in free.parameters() if p.grad is not None)
    # a batch with no real token at all
    empty = torch.zeros_like(mask)
    out = free(ids, empty, tt, next_sentence_label=nsp, output_hidden_states=True)
    assert torch.isfinite(out.loss) and out.prediction_logits.shape == (*ids.shape, config.vocab_size)
    assert (out.prediction_logits == 0).all() and all((h == 0).all() for h in out.hidden_states)


def test_without_labels_full_logits_padded_back(seed):
    config = random_config()
    padded, free = two_paths(BertForPreTraining, config)
    ids, mask, tt, _, _ = make_batch(config, [8, 1, 6])
    a, b = padded(ids, mask, tt), free(ids, mask, tt)
    assert b.prediction_logits.shape == a.prediction_logits.shape == (3, 8, config.vocab_size)
    real = mask.bool()
    torch.testing.assert_close(b.prediction_logits[real], a.prediction_logits[real], **TOL)
    assert (b.prediction_logits[~real] == 0).all()


def test_holes_in_the_mask_and_no_mask(seed):
    """Labelled rows map to packed rows through a count of real tokens, whatever the mask's shape."""
    config = random_config()
    padded, free = two_paths(BertForPreTraining, config)
    ids, mask, tt, labels, nsp = make_batch(config, [12, 12, 12])
    mask[0, 3:6] = 0
    mask[2, 10] = 0
    labels[mask == 0] = -100
    labels[:, 0] = 5  # at least one label in each row, at a real token
    a = padded(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    b = free(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(b.prediction_logits, a.prediction_logits, **TOL)
    torch.testing.assert_close(b.loss, a.loss, **TOL)
    a = padded(ids, None, tt, labels=labels, next_sentence_label=nsp)
    b = free(ids, None, tt, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(b.loss, a.loss, **TOL)


def test_supplied_packing_equals_computed_and_is_checked(seed):
    config = random_config()
    _, free = two_paths(BertForPreTraining, config)
    ids, mask, tt, labels, nsp = make_batch(config, [10, 3, 1])
    packing = Packing.from_mask(mask)
    assert packing.cu_seqlens.tolist() == [0, 10, 13, 14] and packing.max_seqlen == 10
    assert packing.cu_seqlens.dtype == torch.int32 and packing.indices.tolist()[9:] == [9, 10, 11, 12, 20]
    a = free(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    b = free(ids, mask, tt, labels=labels, next_sentence_label=nsp, packing=packing)
    torch.testing.assert_close(b.loss, a.loss, atol=0, rtol=0)
    wrong = Packing.from_mask(torch.ones_like(mask))
    with pytest.raises(ValueError, match="does not describe attention_mask"):
        free(ids, mask, tt, labels=labels, next_sentence_label=nsp, packing=wrong)
    with pytest.raises(ValueError, match="describes 2 sequences"):
        free(ids, mask, tt, labels=labels, next_sentence_label=nsp, packing=Packing.from_mask(mask[:2]))
    with pytest.raises(TypeError, match="Packing"):
        free(ids, mask, tt, packing={"cu_seqlens": packing.cu_seqlens})
    labels[1, 5] = 7  # a label on padding: no packed row there
    with pytest.raises(ValueError, match="is padding"):
        free(ids, mask, tt, labels=labels, next_sentence_label=nsp)


def test_dropout_in_train_mode_is_statistically_the_padded_path(seed):
    config = random_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, num_hidden_layers=1)
    padded, free = two_paths(BertForPreTraining, config)
    padded.train(), free.train()
    ids, mask, tt, labels, nsp = make_batch(config, [14, 1, 9])
    with torch.no_grad():
        x, y = free(ids, mask, tt, labels=labels).loss, free(ids, mask, tt, labels=labels).loss
        assert torch.isfinite(x) and x != y  # dropout is on
        draws = 24
        a = torch.stack([padded(ids, mask, tt, labels=labels, next_sentence_label=nsp).loss for _ in range(draws)])
        b = torch.stack([free(ids, mask, tt, labels=labels, next_sentence_label=nsp).loss for _ in range(draws)])
    stderr = ((a.var() + b.var()) / draws).sqrt()
    assert (a.mean() - b.mean()).abs() <= 5 * stderr + 1e-6, (a.mean(), b.mean(), stderr)


# ----------------------------------------------------------------------------- GPU


def gpu_config():
    return random_config(vocab_size=1000, hidden_size=384, num_attention_heads=6, intermediate_size=1536,
                         max_position_embeddings=128)


@pytest.mark.gpu
def test_gpu_auto_selects_padding_free_under_autocast():
    if not fastbert._backend.has_cuda_kernel("attention_varlen_fwd"):
        pytest.skip("fastbert._C holds no CUDA attention kernel")
    model = BertModel(gpu_config()).cuda()
    ids = torch.ones(2, 8, dtype=torch.long, device="cuda")
    assert not model.use_padding_free(ids)  # fp32 weights, no autocast: the kernel does not take fp32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model.use_padding_free(ids)
        with fastbert.kernels(False):
            assert not model.use_padding_free(ids)


@pytest.mark.gpu
def test_gpu_kernel_path_vs_twin_vs_fp32_reference(seed):
    """Tolerance rule under bf16 autocast: loss and a few gradients of the padding-free kernel path
    against the fp32 reference, at most twice the padded twin path's error (plus a small floor)."""
    if not fastbert._backend.has_cuda_kernel("attention_varlen_fwd"):
        pytest.skip("fastbert._C holds no CUDA attention kernel")
    config = gpu_config()
    model = BertForPreTraining(config).cuda().eval()
    # no empty sequence here: its NSP input differs between the paths by design (tested on CPU)
    ids, mask, tt, labels, nsp = make_batch(config, [100, 37, 1, 128, 64], device="cuda")
    names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.1.output.dense.weight", "cls.predictions.transform.dense.weight",
             "bert.pooler.dense.weight"]
    params = dict(model.named_parameters())

    def run(kernels, autocast, padding_free):
        model.zero_grad(set_to_none=True)
        model.padding_free = padding_free
        with fastbert.kernels(kernels), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, mask, tt, labels=labels, next_sentence_label=nsp)
            out.loss.backward()
        return [out.loss.detach().double()] + [params[n].grad.double().clone() for n in names]

    ref = run(False, False, False)
    twin = run(False, True, False)
    kern = run(True, True, None)
    assert model.bert.padding_free is None
    for name, k, t, r in zip(["loss"] + names, kern, twin, ref):
        k_err, t_err = (k - r).abs().max().item(), (t - r).abs().max().item()
        floor = 1e-4 * max(r.abs().max().item(), 1.0) if name == "loss" else 1e-3 * r.abs().max().item()
        assert k_err <= 2 * t_err + floor, (name, k_err, t_err)


@pytest.mark.gpu
def test_gpu_training_step_has_no_host_sync(tmp_path):
    """The trainer's step (forward, backward, clipping, fused AdamW) under bf16 on the padding-free
    kernel path, with the packing built on the CPU: no host sync once warm."""
    import json

    if not fastbert._backend.has_cuda_kernel("attention_varlen_fwd"):
        pytest.skip("fastbert._C holds no CUDA attention kernel")
    from fastbert.trainer import Trainer, TrainArgs, batch_stream

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "intermediate_size": 256, "model_type": "bert"}))
    args = TrainArgs(out=str(tmp_path / "run"), config=str(cfg), cache_dir=str(tmp_path / "cache"), steps=10,
                     batch_size=16, seq_len=64, vocab_size=2000, dupe_factor=1, progress=False, device="cuda")
    trainer = Trainer(args)
    assert trainer.precision == "bf16" and trainer.model.check_inputs is False
    seq_len, batches = trainer._phase_at(0)
    stream = batch_stream(batches, 0, 0)
    window = {"sums": torch.zeros(6, dtype=torch.float64, device=trainer.device), "tokens": 0, "steps": 0}
    trainer.model.train()
    for _ in range(3):  # warm-up: allocator, fused AdamW state, autotuning
        trainer._train_step(stream, window)
    torch.cuda.synchronize()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert trainer.model.bert.use_padding_free(torch.ones(1, 1, dtype=torch.long, device="cuda"))
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = trainer._train_step(stream, window)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.emulator
def test_padded_kernel_path_builds_one_packing_per_forward_on_the_host(seed, given):
    """The padded path (padding_free=False) on the attention kernel (emulated on CPU): the Packing is
    built once per forward from a host mask and shared by the layers, or not at all when the caller
    passes one; the result equals the twins'."""
    import importlib
    from unittest import mock

    from emulation import emulated
    from fastbert.ops import _emulator
    if not _emulator.available() or not fastbert._backend.has_op("attention_varlen_fwd"):
        pytest.skip("the kernel emulator or fastbert._C is not built")
    config = random_config(hidden_size=64, num_attention_heads=2, intermediate_size=96, num_hidden_layers=3)
    model = BertModel(config).to(torch.bfloat16).eval()
    model.padding_free, model.check_inputs = False, False
    ids, mask, tt, _, _ = make_batch(config, [7, 3, 5])
    packing = Packing.from_mask(mask) if given else None
    built = []
    real = Packing.from_mask

    def counting(attention_mask):
        built.append(attention_mask.device.type)
        return real(attention_mask)

    attention_module = importlib.import_module("fastbert.ops.attention")  # (fastbert.ops.attention is the function)
    with mock.patch.object(Packing, "from_mask", side_effect=counting), \
            mock.patch.object(attention_module, "attention_varlen", wraps=attention_module.attention_varlen) as varlen, \
            emulated():
        assert model.attention_kernel_runs(ids)
        out = model(ids, mask, tt, packing=packing).last_hidden_state
    assert varlen.call_count == config.num_hidden_layers  # every layer ran the (emulated) kernel
    assert built == ([] if given else ["cpu"])
    with fastbert.kernels(False):
        want = model(ids, mask, tt).last_hidden_state
    real_rows = mask.bool()
    torch.testing.assert_close(out[real_rows].float(), want[real_rows].float(), atol=3e-2, rtol=3e-2)


def test_attention_checks_a_given_packing():
    q = torch.randn(3, 5, 2, 16)
    mask = torch.ones(3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="packing describes 2 sequences"):
        fastbert.ops.attention(q, q, q, mask, packing=Packing.from_mask(mask[:2]))
    with pytest.raises(TypeError, match="packing must be a fastbert Packing"):
        fastbert.ops.attention(q, q, q, mask, packing=mask)
