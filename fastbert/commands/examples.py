"""`fastbert examples`: show the (X, y) pairs BERT is pretrained on."""
import json
import shutil
import sys

HELP = ("Show the (X, y) pairs BERT pretrains on: masked tokens and their targets, segments A/B, IsNext/NotNext; "
        "with --model, what a model predicts at each and the loss")

DEFAULT_VOCAB_SIZE = 8000


def add_arguments(parser):
    parser.add_argument("--model", metavar="DIR",
                        help="a BERT model directory (a run's model/, or any saved by transformers, with its "
                             "tokenizer): tokenize with its tokenizer and show its predictions, p(target) and the "
                             "per-token loss under each labelled position, its NSP probabilities and the losses")
    parser.add_argument("--top-k", type=int, default=3, metavar="K",
                        help="with --model: predictions shown per labelled position (default 3)")
    parser.add_argument("--corpus", action="append", metavar="PATH",
                        help="WikiText file, plain text file (one sentence per line, blank line between "
                             "documents) or directory of .txt files; repeat to concatenate "
                             "(default: the embedded corpus, Python's own documentation)")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="PATH",
                     help="vocab.txt, tokenizer.json or a model directory (default: train WordPiece on the corpus)")
    tok.add_argument("--vocab-size", type=int, metavar="N", default=None,
                     help=f"vocabulary size of the WordPiece tokenizer to train (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--seq-len", type=int, default=128, metavar="N", help="max sequence length (default 128)")
    parser.add_argument("--num", type=int, default=3, metavar="N", help="number of examples (default 3)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed for pairs and masks (default 0)")
    parser.add_argument("--jsonl", action="store_true", help="one JSON object per example instead of the readable view")
    parser.add_argument("--whole-word-mask", action="store_true", help="mask whole words (a token and its ## pieces)")
    parser.add_argument("--mlm-probability", type=float, default=0.15, metavar="P",
                        help="fraction of non-special tokens to predict (default 0.15)")
    parser.add_argument("--max-position-embeddings", type=int, default=None, metavar="N",
                        help="the model's position embeddings: the largest allowed --seq-len (default 512, or "
                             "the --model's)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="cache for tokenizers and tokenized corpora (default $FASTBERT_CACHE or ~/.cache/fastbert)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--width", type=int, default=None, metavar="COLS",
                        help="wrap the readable view at COLS columns (default: terminal width)")


def run(args):
    from fastbert.cli import CLIError
    if args.num < 1:
        raise CLIError(f"--num must be at least 1, got {args.num}")
    if args.width is not None and args.width < 20:
        raise CLIError(f"--width must be at least 20 columns, got {args.width}")
    if args.top_k < 1:
        raise CLIError(f"--top-k must be at least 1, got {args.top_k}")
    if args.model is not None and (args.tokenizer is not None or args.vocab_size is not None):
        raise CLIError("--model tokenizes with the model's own tokenizer; drop --tokenizer/--vocab-size")
    if args.model is not None and args.max_position_embeddings is not None:
        raise CLIError("--model brings its own max_position_embeddings (config.json); drop --max-position-embeddings")
    import torch  # noqa: F401  (imported late: --help stays fast)
    from fastbert.data import MaskingCollator, prepare_pretraining_data

    model = missing = None
    max_positions = args.max_position_embeddings or 512
    tokenizer_path = args.tokenizer
    if args.model is not None:
        model, missing = _load_model(args.model)
        max_positions, tokenizer_path = model.config.max_position_embeddings, args.model
    vocab_size = args.vocab_size if args.vocab_size is not None else DEFAULT_VOCAB_SIZE
    cache_dir = False if args.no_cache else args.cache_dir
    tokenizer, instances, corpus = prepare_pretraining_data(
        args.corpus, tokenizer_path=tokenizer_path, vocab_size=vocab_size, seq_len=args.seq_len,
        seed=args.seed, cache_dir=cache_dir, max_position_embeddings=max_positions)
    chosen = instances[:args.num]
    if len(chosen) < args.num:
        print(f"fastbert examples: the corpus gives only {len(chosen)} pairs; showing them all", file=sys.stderr)
    collator = MaskingCollator(tokenizer, mlm_probability=args.mlm_probability,
                               whole_word_mask=args.whole_word_mask, seed=args.seed)
    batch = collator(chosen)
    rows = []
    for b, inst in enumerate(chosen):
        n = len(inst)
        rows.append({
            "input_ids": batch["input_ids"][b, :n].tolist(),
            "original_ids": inst.input_ids.tolist(),
            "token_type_ids": batch["token_type_ids"][b, :n].tolist(),
            "labels": batch["labels"][b, :n].tolist(),
            "next_sentence_label": int(inst.next_sentence_label),
            "doc_a": inst.doc_a, "doc_b": inst.doc_b, "num_a": inst.num_a,
        })
    if model is not None:
        from fastbert.scoring import score_example
        for b, r in enumerate(rows):  # each on its own: a batch of one, no padding, eval mode
            n = len(r["input_ids"])
            r["score"] = score_example(model, batch["input_ids"][b, :n], batch["token_type_ids"][b, :n],
                                       batch["labels"][b, :n], r["next_sentence_label"], top_k=args.top_k,
                                       missing=missing)
    out = sys.stdout
    if args.jsonl:
        if missing:
            from fastbert.scoring import describe_missing
            print(f"fastbert examples: {describe_missing(args.model, missing)}", file=sys.stderr)
        for r in rows:
            record = {
                "tokens": tokenizer.convert_ids_to_tokens(r["input_ids"]),
                "input_ids": r["input_ids"], "token_type_ids": r["token_type_ids"],
                "labels": r["labels"], "next_sentence_label": r["next_sentence_label"],
                "doc_a": r["doc_a"], "doc_b": r["doc_b"]}
            if model is not None:
                record.update(_score_json(r["score"], tokenizer, missing))
            out.write(json.dumps(record) + "\n")
        return 0
    width = args.width or shutil.get_terminal_size((100, 24)).columns
    if args.model:
        source = f"the model's own, from {args.model}"
    else:
        source = f"loaded from {args.tokenizer}" if args.tokenizer else "trained on this corpus"
    header = [
        f"{len(rows)} of {len(instances)} pretraining pairs from {corpus.name} "
        f"({len(corpus.documents)} documents, {corpus.num_sentences} sentences), seed {args.seed}",
        f"tokenizer: WordPiece, {tokenizer.vocab_size} tokens, {source}; seq-len {args.seq_len}; "
        f"{'whole-word ' if args.whole_word_mask else ''}masking {args.mlm_probability:.0%} of the text tokens",
    ]
    if model is not None:
        header.append(f"model: {args.model} ({model.num_parameters() / 1e6:.1f}M parameters), eval mode, each example "
                      f"scored on its own; under each labelled position: its top {args.top_k} predictions with "
                      "probabilities, p(target) and loss = -log p(target)")
        if missing:
            from fastbert.scoring import describe_missing
            header.append(describe_missing(args.model, missing))
    out.write(render(rows, tokenizer, width=width, header=header, top_k=args.top_k, missing=missing))
    return 0


def _load_model(path):
    """The model for --model, with its missing heads said on stderr; user errors as CLIError."""
    from fastbert.cli import CLIError
    from fastbert.data import Tokenizer
    from fastbert.scoring import ScoringError, check_tokenizer, describe_missing, load_pretraining_model
    try:
        model, missing = load_pretraining_model(path)
        try:
            tokenizer = Tokenizer.load(path)
        except FileNotFoundError as e:
            raise ScoringError(f"--model {path} has no tokenizer ({e}); fastbert examples tokenizes the corpus "
                               "with the model's own tokenizer, saved beside it") from None
        check_tokenizer(model, tokenizer, path)
    except ScoringError as e:
        raise CLIError(str(e)) from None
    return model, missing


def _score_json(score, tokenizer, missing):
    top_k = score["top_k"]
    if top_k is not None:
        top_k = [[{"token": tokenizer.convert_ids_to_tokens([i])[0], "id": i, "prob": p} for i, p in row]
                 for row in top_k]
    return {"positions": score["positions"], "top_k": top_k, "target_prob": score["target_prob"],
            "token_loss": score["token_loss"], "nsp_probs": score["nsp_probs"], "mlm_loss": score["mlm_loss"],
            "nsp_loss": score["nsp_loss"], "loss": score["loss"], "missing_heads": sorted(missing)}


_HOW = {"mask": "mask", "random": "rand", "kept": "kept"}


def _prob(p):
    return f"{p:.2f}" if p >= 0.005 else f"{p:.1g}"


def _wrap(cells, width, gutter):
    """Lines of aligned rows, wrapped at `width`: each cell is a list of strings, one per row of
    `gutter`; the first row is always printed, the others where a cell in the line has any."""
    widths = [max(len(x) for x in cell) for cell in cells]
    lines, line, used = [], [], 0
    room = max(10, width - len(gutter[0]))
    for cell, w in zip(cells, widths):
        if line and used + w + 1 > room:
            lines.append(line)
            line, used = [], 0
        line.append((cell, w))
        used += w + 1
    if line:
        lines.append(line)
    out = []
    for line in lines:
        out.append(gutter[0] + " ".join(c[0].ljust(w) for c, w in line).rstrip())
        if any(any(c[1:]) for c, _ in line):
            for k in range(1, len(gutter)):
                out.append(gutter[k] + " ".join(c[k].ljust(w) for c, w in line).rstrip())
    return out


def render(rows, tokenizer, *, width=100, header=(), top_k=3, missing=None):
    """The readable view of masked examples (dicts as built by `run`; with a "score" each, from
    `fastbert.scoring.score_example`, the model's side too)."""
    missing = missing or {}
    lines = list(header)
    lines.append("each labelled position: mask = shown as [MASK] (80%), rand = shown as a random token "
                 "(10%), kept = shown unchanged (10%); the target row is what the model must predict there")
    for k, r in enumerate(rows, 1):
        score = r.get("score")
        predicted = score is not None and score["top_k"] is not None
        gutter = ["    input │ ", "   target │ ", "          │ "]
        if predicted:
            gutter += [f"{f'top {j + 1}':>9} │ " for j in range(top_k)] + ["p(target) │ ", "     loss │ "]
        nsp = r["next_sentence_label"]
        if nsp:
            title = (f"Example {k} — NotNext (label 1): A is from document {r['doc_a']}, "
                     f"B from document {r['doc_b']}")
        else:
            title = f"Example {k} — IsNext (label 0): A and B are consecutive text of document {r['doc_a']}"
        n, na = len(r["input_ids"]), r["num_a"]
        labelled = sum(1 for y in r["labels"] if y != -100)
        shown = tokenizer.convert_ids_to_tokens(r["input_ids"])
        original = tokenizer.convert_ids_to_tokens(r["original_ids"])
        cells, hows, j = [], [], 0
        for i, y in enumerate(r["labels"]):
            if y == -100:
                cells.append([shown[i]] + [""] * (len(gutter) - 1))
                continue
            if r["input_ids"][i] == tokenizer.mask_id:
                how = _HOW["mask"]
            elif r["input_ids"][i] == r["original_ids"][i]:
                how = _HOW["kept"]
            else:
                how = _HOW["random"]
            hows.append(how)
            cell = [shown[i], original[i], how]
            if predicted:
                best = [f"{tokenizer.convert_ids_to_tokens([t])[0]} {_prob(p)}" for t, p in score["top_k"][j]]
                cell += best + [""] * (top_k - len(best))
                cell += [_prob(score["target_prob"][j]), f"{score['token_loss'][j]:.2f}"]
            cells.append(cell)
            j += 1
        rule = "━" * max(0, min(width, 100) - len(title) - 5)
        lines += ["", f"━━━ {title} {rule}".rstrip(),
                  f"{n} tokens = [CLS] + A ({na - 2}) + [SEP] + B ({n - na - 1}) + [SEP]; "
                  f"{labelled} of {n - 3} text tokens labelled "
                  f"({hows.count('mask')} mask, {hows.count('rand')} rand, {hows.count('kept')} kept)"]
        for name, lo, hi, tt in (("A", 0, na, 0), ("B", na, n, 1)):
            lines.append(f"  segment {name} (token_type_ids {tt}):")
            lines += _wrap(cells[lo:hi], width, gutter)
        target = "NotNext (1)" if nsp else "IsNext (0)"
        if score is None:
            lines.append(f"  NSP target: {target}, predicted from the [CLS] position")
            lines.append(f"  loss = mean cross-entropy over the {labelled} labelled tokens (MLM) "
                         f"+ cross-entropy of IsNext/NotNext from [CLS] (NSP)")
            continue
        lines += _score_lines(score, target, nsp, labelled)
    import textwrap
    wrapped = []
    for line in lines:
        if len(line) > width and "│" not in line:
            indent = " " * (len(line) - len(line.lstrip()))
            wrapped += textwrap.wrap(line, width, subsequent_indent=indent + "  ") or [line]
        else:
            wrapped.append(line)
    return "\n".join(wrapped) + "\n"


def _score_lines(score, target, nsp, labelled):
    """The NSP line and the per-example loss line of the model's view."""
    lines = []
    if score["nsp_probs"] is None:
        lines.append(f"  NSP target: {target}; the model has no NSP head, so no NSP prediction")
    else:
        p_is, p_not = score["nsp_probs"]
        lines.append(f"  NSP target: {target}; the model from [CLS]: p(IsNext) {p_is:.3f}, p(NotNext) {p_not:.3f}"
                     f" -> NSP loss = -log {score['nsp_probs'][nsp]:.3f} = {score['nsp_loss']:.4f}")
    if score["mlm_loss"] is None:
        lines.append("  the model has no MLM head, so no MLM prediction or loss")
    if score["loss"] is not None:
        lines.append(f"  loss {score['loss']:.4f} = MLM {score['mlm_loss']:.4f} (mean of the {labelled} per-token "
                     f"losses above) + NSP {score['nsp_loss']:.4f}")
    elif score["mlm_loss"] is not None:
        lines.append(f"  MLM loss {score['mlm_loss']:.4f} (mean of the {labelled} per-token losses above); "
                     "no NSP loss, so no pretraining total")
    return lines
