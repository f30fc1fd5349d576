"""What a pretraining model makes of one (X, y) example: its top-k predictions, the probability
of each target and its loss -log p(target), the NSP probabilities, and the losses
BertForPreTraining computes from them (behind `fastbert examples --model`)."""
import warnings

import torch

# which weights each pretraining head needs (transformers' names in BertForPreTraining)
HEADS = {
    "mlm": ("MLM head", ("cls.predictions.",)),
    "nsp": ("NSP head", ("cls.seq_relationship.", "bert.pooler.")),
}


class ScoringError(ValueError):
    """The model directory cannot score these examples (missing, or a tokenizer that does not fit)."""


def load_pretraining_model(path):
    """(BertForPreTraining in eval mode on the CPU, {head: [missing weight names]}) for a model
    directory fastbert or transformers saved; heads absent from the weights are listed, not invented."""
    import os

    from fastbert.model import BertForPreTraining
    if not os.path.isdir(path):
        raise ScoringError(f"--model {path} is not a directory; expected a model directory holding config.json, "
                           "the weights and the tokenizer (such as a run's model/)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        inner = os.path.join(path, "model")
        hint = (f" (a run directory keeps its model in model/: --model {inner})"
                if os.path.isfile(os.path.join(inner, "config.json")) else "")
        raise ScoringError(f"--model {path} holds no config.json; expected a BERT model directory saved by "
                           f"fastbert or transformers{hint}")
    with warnings.catch_warnings():  # the missing heads are reported by name below, not as a warning
        warnings.simplefilter("ignore")
        model, info = BertForPreTraining.from_pretrained(path, output_loading_info=True)
    missing = {head: [k for k in info["missing_keys"] if k.startswith(prefixes)]
               for head, (_, prefixes) in HEADS.items()}
    body = [k for k in info["missing_keys"] if not any(k in keys for keys in missing.values())]
    if body:
        raise ScoringError(f"--model {path}: the weights lack {len(body)} tensors of the BERT encoder itself "
                           f"({', '.join(body[:4])}{' ...' if len(body) > 4 else ''}); is it a BERT model directory?")
    model.eval()
    return model, {head: keys for head, keys in missing.items() if keys}


def describe_missing(path, missing):
    """One line saying which heads a model directory lacks and what that leaves to show."""
    names = " and ".join(f"no {HEADS[h][0]} ({', '.join(sorted({k.rsplit('.', 1)[0] for k in keys}))})"
                         for h, keys in missing.items())
    shown = []
    if "mlm" not in missing:
        shown.append("MLM predictions and losses")
    if "nsp" not in missing:
        shown.append("NSP probabilities and loss")
    leaves = f"showing {' and '.join(shown)} only" if shown else "showing the examples without predictions or loss"
    return (f"--model {path} has {names}: its weights were saved without them (e.g. as a BertModel encoder); "
            f"{leaves}")


def check_tokenizer(model, tokenizer, path):
    """The corpus must be tokenized with the model's own vocabulary."""
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ScoringError(f"--model {path}: its tokenizer has {tokenizer.vocab_size} tokens but config.json says "
                           f"vocab_size {model.config.vocab_size}; the tokenizer saved with the model must be the one "
                           "it was trained with")


@torch.no_grad()
def score_example(model, input_ids, token_type_ids, labels, next_sentence_label, *, top_k=3, missing=()):
    """Score one example (1-d tensors of one sequence, no padding) on its own, in eval mode.

    Returns a dict: `positions` (the labelled positions, increasing), and per position `top_k`
    ([(id, prob)] best first), `target_prob`, `token_loss` (-log p(target)); `nsp_probs`
    ([p(IsNext), p(NotNext)]); `mlm_loss` (mean of token_loss; 0 with no labelled position, as the
    model), `nsp_loss`, `loss` (their sum). Entries of a head in `missing` are None."""
    if model.training:
        raise ValueError("score_example needs the model in eval mode (model.eval()): dropout would change the losses")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    ids, types, labels = (t.reshape(1, -1) for t in (input_ids, token_type_ids, labels))
    nsp_label = torch.as_tensor([int(next_sentence_label)])
    out = model(ids, torch.ones_like(ids), types, labels=labels, next_sentence_label=nsp_label)
    positions = torch.nonzero(labels[0] != -100).flatten()
    result = {"positions": positions.tolist()}
    if "mlm" in missing:
        result.update(top_k=None, target_prob=None, token_loss=None, mlm_loss=None)
    else:
        # prediction_logits: one row per labelled position, in position order (batch of one)
        log_probs = torch.log_softmax(out.prediction_logits.double(), dim=-1)
        targets = labels[0, positions]
        token_loss = -log_probs.gather(1, targets[:, None]).squeeze(1)
        best = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
        result["top_k"] = [[(int(i), float(p)) for i, p in zip(row_ids, row_lp.exp())]
                           for row_ids, row_lp in zip(best.indices.tolist(), best.values)]
        result["target_prob"] = token_loss.neg().exp().tolist()
        result["token_loss"] = token_loss.tolist()
        result["mlm_loss"] = float(token_loss.mean()) if len(positions) else 0.0
    if "nsp" in missing:
        result.update(nsp_probs=None, nsp_loss=None)
    else:
        nsp_log_probs = torch.log_softmax(out.seq_relationship_logits[0].double(), dim=-1)
        result["nsp_probs"] = nsp_log_probs.exp().tolist()
        result["nsp_loss"] = float(-nsp_log_probs[nsp_label[0]])
    has_both = result["mlm_loss"] is not None and result["nsp_loss"] is not None
    result["loss"] = result["mlm_loss"] + result["nsp_loss"] if has_both else None
    return result
