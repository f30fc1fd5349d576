"""fastbert's BERT against transformers' on CPU in fp32: outputs, loss, gradients, padding,
dropout, save/load both ways, and bad input."""
import json
import os
import warnings

import pytest
import torch

import fastbert
from fastbert import BertConfig, BertForPreTraining, BertModel

from bert_inputs import make_batch, random_config

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

TOL = dict(atol=1e-5, rtol=1e-5)


def hf_config(config, attn="eager"):
    d = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    c = transformers.BertConfig(**d)
    c._attn_implementation = attn
    return c


def pair(config, cls=BertForPreTraining, hf_cls=None, attn="eager"):
    ours = cls(config).eval()
    hf_cls = hf_cls or getattr(transformers, cls.__name__)
    theirs = hf_cls(hf_config(config, attn)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def test_state_dict_keys_identical_to_transformers():
    config = random_config()
    for cls in (BertModel, BertForPreTraining):
        ours = set(cls(config).state_dict())
        theirs = set(getattr(transformers, cls.__name__)(hf_config(config)).state_dict())
        assert ours == theirs


def test_config_defaults_match_transformers():
    ours = BertConfig().to_dict()
    theirs = transformers.BertConfig().to_dict()
    for key, value in ours.items():
        if key in theirs and key not in ("architectures", "transformers_version"):
            assert theirs[key] == value, key


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_model_outputs_match(seed, attn):
    config = random_config()
    ours, theirs = pair(config, BertModel, attn=attn)
    ids, mask, tt, _, _ = make_batch(config, [13, 7, 1, 29])
    a = ours(ids, mask, tt, output_hidden_states=True)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(a.last_hidden_state[real], b.last_hidden_state[real], **TOL)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, **TOL)
    assert len(a.hidden_states) == config.num_hidden_layers + 1 == len(b.hidden_states)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x[real], y[real], **TOL)
    # tuple access like transformers
    torch.testing.assert_close(a[0], a.last_hidden_state)


def test_position_ids_and_default_token_types(seed):
    config = random_config()
    ours, theirs = pair(config, BertModel)
    ids, mask, _, _, _ = make_batch(config, [9, 9])
    pos = torch.randint(0, config.max_position_embeddings, ids.shape)
    a = ours(ids, mask, position_ids=pos)
    b = theirs(input_ids=ids, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, **TOL)


def test_pretraining_loss_and_gradients_match(seed):
    config = random_config()
    ours, theirs = pair(config)
    ids, mask, tt, labels, nsp = make_batch(config, [17, 11, 5])
    a = ours(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(a.loss, b.loss, **TOL)
    torch.testing.assert_close(a.seq_relationship_logits, b.seq_relationship_logits, **TOL)
    # the MLM head ran only on the labelled rows: they equal transformers' full logits there
    flat = b.prediction_logits.reshape(-1, config.vocab_size)
    assert a.prediction_logits.shape == (int((labels != -100).sum()), config.vocab_size)
    torch.testing.assert_close(a.prediction_logits, flat[a.masked_positions], **TOL)
    torch.testing.assert_close(a.mlm_loss + a.nsp_loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, atol=2e-5, rtol=1e-4, msg=name)


def test_masked_positions_given_equals_searched(seed):
    config = random_config()
    model = BertForPreTraining(config).eval()
    ids, mask, tt, labels, nsp = make_batch(config, [12, 12])
    positions = torch.nonzero(labels.flatten() != -100).flatten()
    a = model(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    b = model(ids, mask, tt, labels=labels, next_sentence_label=nsp, masked_positions=positions)
    torch.testing.assert_close(a.loss, b.loss)
    with pytest.raises(ValueError, match="masked_positions"):
        model(ids, mask, tt, labels=labels, next_sentence_label=nsp, masked_positions=positions[:-1])


def test_without_labels_full_logits_like_transformers(seed):
    config = random_config()
    ours, theirs = pair(config)
    ids, mask, tt, _, _ = make_batch(config, [8, 6])
    a = ours(ids, mask, tt)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert a.loss is None and b.loss is None
    torch.testing.assert_close(a.prediction_logits, b.prediction_logits, **TOL)


def test_fully_padded_row_finite_and_no_labels_finite_loss(seed):
    config = random_config()
    model = BertForPreTraining(config).eval()
    ids, mask, tt, labels, nsp = make_batch(config, [6, 0])
    out = model(ids, mask, tt, labels=labels, next_sentence_label=nsp)
    assert torch.isfinite(out.prediction_logits).all() and torch.isfinite(out.loss)
    assert torch.isfinite(model.bert(ids, mask, tt).last_hidden_state).all()
    none = torch.full_like(labels, -100)
    out = model(ids, mask, tt, labels=none, next_sentence_label=nsp)
    assert torch.isfinite(out.loss) and out.mlm_loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dropout_train_and_eval(seed):
    config = random_config(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = BertModel(config)
    ids, mask, tt, _, _ = make_batch(config, [10, 10])
    model.train()
    a, b = model(ids, mask, tt).last_hidden_state, model(ids, mask, tt).last_hidden_state
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(ids, mask, tt).last_hidden_state, model(ids, mask, tt).last_hidden_state)
    # the same dropout draws as transformers: same seed, same masks, same outputs
    ours, theirs = pair(config, BertModel)
    ours.train(), theirs.train()
    torch.manual_seed(seed)
    x = ours(ids, mask, tt).last_hidden_state
    torch.manual_seed(seed)
    y = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    torch.testing.assert_close(x, y, **TOL)


def test_save_pretrained_loads_in_transformers(tmp_path, seed):
    config = random_config()
    ours = BertForPreTraining(config).eval()
    ours.save_pretrained(tmp_path)
    theirs, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask, tt, labels, nsp = make_batch(config, [9, 4])
    a = ours(ids, mask, tt, labels=labels, next_sentence_label=nsp).loss
    b = theirs.eval()(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels, next_sentence_label=nsp).loss
    torch.testing.assert_close(a, b, **TOL)
    # BertModel from the same directory, in both libraries
    base, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    torch.testing.assert_close(BertModel.from_pretrained(tmp_path).eval()(ids, mask, tt).last_hidden_state,
                               base.eval()(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state, **TOL)


@pytest.mark.parametrize("safe", [True, False])
def test_from_pretrained_reads_transformers_files(tmp_path, seed, safe):
    config = random_config()
    theirs = transformers.BertForPreTraining(hf_config(config)).eval()
    theirs.save_pretrained(tmp_path, safe_serialization=safe) if not safe else theirs.save_pretrained(tmp_path)
    if not safe:  # transformers 5 always writes safetensors: make the legacy .bin by hand
        os.remove(tmp_path / "model.safetensors")
        torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing or unexpected keys
        ours = BertForPreTraining.from_pretrained(tmp_path).eval()
    assert ours.config.hidden_size == config.hidden_size
    ids, mask, tt, labels, nsp = make_batch(config, [7, 7])
    torch.testing.assert_close(ours(ids, mask, tt, labels=labels, next_sentence_label=nsp).loss,
                               theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels,
                                      next_sentence_label=nsp).loss, **TOL)
    # tied: the decoder is the embedding matrix
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


def test_old_gamma_beta_names(tmp_path):
    config = random_config()
    model = BertModel(config)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.fill_(1.5)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in model.state_dict().items()}
    config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = BertModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.embeddings.LayerNorm.weight, torch.full((config.hidden_size,), 1.5))


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        BertModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        BertModel.from_pretrained(tmp_path)
    random_config().save_pretrained(tmp_path)
    with pytest.raises(OSError, match="no weights"):
        BertModel.from_pretrained(tmp_path)
    BertModel(random_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match="model.safetensors"):
        BertModel.from_pretrained(tmp_path)
    os.remove(weights)
    torch.save(BertModel(random_config()).state_dict(), tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(OSError, match="pytorch_model.bin"):
        BertModel.from_pretrained(tmp_path)


def test_config_round_trip_and_errors(tmp_path):
    config = random_config(hidden_act="gelu_new")
    config.save_pretrained(tmp_path)
    assert BertConfig.from_pretrained(tmp_path) == config
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        BertConfig(hidden_size=100, num_attention_heads=6)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="mish")


@pytest.mark.parametrize("case, exc, match", [
    ("id_high", IndexError, "input_ids holds 131"),
    ("id_negative", IndexError, "input_ids holds -1"),
    ("token_type", IndexError, "token_type_ids holds 2"),
    ("too_long", ValueError, "max_position_embeddings"),
    ("float_ids", TypeError, "integer"),
    ("one_d", ValueError, "2-d"),
    ("mask_shape", ValueError, "attention_mask has shape"),
    ("label_high", IndexError, "labels holds 131"),
    ("nsp_value", IndexError, "next_sentence_label holds 2"),
    ("nsp_shape", ValueError, "next_sentence_label has 3 entries"),
])
def test_bad_input_is_a_clear_python_error(case, exc, match):
    config = random_config()
    model = BertForPreTraining(config).eval()
    ids, mask, tt, labels, nsp = make_batch(config, [6, 6])
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels, next_sentence_label=nsp)
    if case == "id_high":
        ids[0, 1] = config.vocab_size
    elif case == "id_negative":
        ids[1, 0] = -1
    elif case == "token_type":
        tt[0, 0] = 2
    elif case == "too_long":
        kwargs.update(input_ids=torch.ones(1, 41, dtype=torch.long), attention_mask=None, token_type_ids=None,
                      labels=None, next_sentence_label=None)
    elif case == "float_ids":
        kwargs["input_ids"] = ids.float()
    elif case == "one_d":
        kwargs.update(input_ids=ids[0], attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None)
    elif case == "mask_shape":
        kwargs["attention_mask"] = mask[:, :-1]
    elif case == "label_high":
        labels[0, 0] = config.vocab_size
    elif case == "nsp_value":
        nsp[0] = 2
    elif case == "nsp_shape":
        kwargs["next_sentence_label"] = torch.tensor([0, 1, 0])
    with pytest.raises(exc, match=match):
        model(**kwargs)


def test_kernels_switch_forces_twins():
    fastbert.use_kernels(False)
    try:
        assert not fastbert.kernels_enabled()
        with fastbert.kernels(True):
            assert fastbert.kernels_enabled()
        assert not fastbert.kernels_enabled()
    finally:
        fastbert.use_kernels(True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_match_twins(seed, dtype):
    """The whole model with kernels against its twins on the GPU (tolerance rule on the loss)."""
    config = random_config(vocab_size=1000, hidden_size=384, num_attention_heads=6, intermediate_size=1536,
                           max_position_embeddings=128)
    model = BertForPreTraining(config).cuda().eval()
    ids, mask, tt, labels, nsp = (t.cuda() for t in make_batch(config, [100, 37, 1, 128]))
    with torch.no_grad():
        with fastbert.kernels(False):  # the fp32 reference
            ref = model(ids, mask, tt, labels=labels, next_sentence_label=nsp).loss.double()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            with fastbert.kernels(True):
                k = model(ids, mask, tt, labels=labels, next_sentence_label=nsp).loss.double()
            with fastbert.kernels(False):
                t = model(ids, mask, tt, labels=labels, next_sentence_label=nsp).loss.double()
    assert (k - ref).abs() <= 2 * (t - ref).abs() + 1e-4
