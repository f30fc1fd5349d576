"""`fastbert examples`: show the (X, y) pairs BERT is pretrained on."""
import json
import shutil
import sys

HELP = "Show the (X, y) pairs BERT pretrains on: masked tokens and their targets, segments A/B, IsNext/NotNext."

DEFAULT_VOCAB_SIZE = 8000


def add_arguments(parser):
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
    parser.add_argument("--max-position-embeddings", type=int, default=512, metavar="N",
                        help="the model's position embeddings: the largest allowed --seq-len (default 512)")
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
    import torch  # noqa: F401  (imported late: --help stays fast)
    from fastbert.data import MaskingCollator, prepare_pretraining_data

    vocab_size = args.vocab_size if args.vocab_size is not None else DEFAULT_VOCAB_SIZE
    cache_dir = False if args.no_cache else args.cache_dir
    tokenizer, instances, corpus = prepare_pretraining_data(
        args.corpus, tokenizer_path=args.tokenizer, vocab_size=vocab_size, seq_len=args.seq_len,
        seed=args.seed, cache_dir=cache_dir, max_position_embeddings=args.max_position_embeddings)
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
    out = sys.stdout
    if args.jsonl:
        for r in rows:
            out.write(json.dumps({
                "tokens": tokenizer.convert_ids_to_tokens(r["input_ids"]),
                "input_ids": r["input_ids"], "token_type_ids": r["token_type_ids"],
                "labels": r["labels"], "next_sentence_label": r["next_sentence_label"],
                "doc_a": r["doc_a"], "doc_b": r["doc_b"]}) + "\n")
        return 0
    width = args.width or shutil.get_terminal_size((100, 24)).columns
    source = f"loaded from {args.tokenizer}" if args.tokenizer else "trained on this corpus"
    out.write(render(rows, tokenizer, width=width, header=[
        f"{len(rows)} of {len(instances)} pretraining pairs from {corpus.name} "
        f"({len(corpus.documents)} documents, {corpus.num_sentences} sentences), seed {args.seed}",
        f"tokenizer: WordPiece, {tokenizer.vocab_size} tokens, {source}; seq-len {args.seq_len}; "
        f"{'whole-word ' if args.whole_word_mask else ''}masking {args.mlm_probability:.0%} of the text tokens",
    ]))
    return 0


_HOW = {"mask": "mask", "random": "rand", "kept": "kept"}


def _cells(tokens, targets, hows):
    return [(t, g, h, max(len(t), len(g), len(h))) for t, g, h in zip(tokens, targets, hows)]


def _wrap(cells, width, gutter):
    """Lines of aligned (input, target, how) rows, wrapped at `width`."""
    lines, line, used = [], [], 0
    room = max(10, width - len(gutter[0]))
    for cell in cells:
        w = cell[3] + 1
        if line and used + w > room:
            lines.append(line)
            line, used = [], 0
        line.append(cell)
        used += w
    if line:
        lines.append(line)
    out = []
    for line in lines:
        out.append(gutter[0] + " ".join(c[0].ljust(c[3]) for c in line).rstrip())
        if any(c[1] for c in line):
            out.append(gutter[1] + " ".join(c[1].ljust(c[3]) for c in line).rstrip())
            out.append(gutter[2] + " ".join(c[2].ljust(c[3]) for c in line).rstrip())
    return out


def render(rows, tokenizer, *, width=100, header=()):
    """The readable view of masked examples (dicts as built by `run`)."""
    lines = list(header)
    lines.append("each labelled position: mask = shown as [MASK] (80%), rand = shown as a random token "
                 "(10%), kept = shown unchanged (10%); the target row is what the model must predict there")
    gutter = ("    input │ ", "   target │ ", "          │ ")
    for k, r in enumerate(rows, 1):
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
        targets, hows = [], []
        for i, y in enumerate(r["labels"]):
            if y == -100:
                targets.append("")
                hows.append("")
                continue
            targets.append(original[i])
            if r["input_ids"][i] == tokenizer.mask_id:
                hows.append(_HOW["mask"])
            elif r["input_ids"][i] == r["original_ids"][i]:
                hows.append(_HOW["kept"])
            else:
                hows.append(_HOW["random"])
        rule = "━" * max(0, min(width, 100) - len(title) - 5)
        lines += ["", f"━━━ {title} {rule}".rstrip(),
                  f"{n} tokens = [CLS] + A ({na - 2}) + [SEP] + B ({n - na - 1}) + [SEP]; "
                  f"{labelled} of {n - 3} text tokens labelled "
                  f"({hows.count('mask')} mask, {hows.count('rand')} rand, {hows.count('kept')} kept)"]
        for name, lo, hi, tt in (("A", 0, na, 0), ("B", na, n, 1)):
            lines.append(f"  segment {name} (token_type_ids {tt}):")
            lines += _wrap(_cells(shown[lo:hi], targets[lo:hi], hows[lo:hi]), width, gutter)
        lines.append(f"  NSP target: {'NotNext (1)' if nsp else 'IsNext (0)'}, predicted from the [CLS] position")
        lines.append(f"  loss = mean cross-entropy over the {labelled} labelled tokens (MLM) "
                     f"+ cross-entropy of IsNext/NotNext from [CLS] (NSP)")
    import textwrap
    wrapped = []
    for line in lines:
        if len(line) > width and "│" not in line:
            indent = " " * (len(line) - len(line.lstrip()))
            wrapped += textwrap.wrap(line, width, subsequent_indent=indent + "  ") or [line]
        else:
            wrapped.append(line)
    return "\n".join(wrapped) + "\n"
