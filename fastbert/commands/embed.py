"""`fastbert embed`: one sentence vector per input line, from any BERT model directory."""
import json
import os
import sys

HELP = "sentence embeddings (mean/max/cls pooling) from a BERT model directory, one per input line"


def add_arguments(p):
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a model directory (fastbert pretrain's model/, or any BERT transformers can load)")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="one text per line; - for standard input. Row i of the output is line i; a blank "
                        "line is embedded as the empty text")
    p.add_argument("--output", required=True, metavar="FILE", help="FILE.npy (float32 [texts, hidden]) or FILE.jsonl")
    p.add_argument("--pooling", default="mean", choices=["mean", "max", "cls"], help="default: mean")
    p.add_argument("--normalize", action="store_true", help="scale each vector to unit length")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="texts per forward pass (default 64)")
    p.add_argument("--max-length", type=int, metavar="N", help="truncate to N tokens (default: the model's maximum)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _read_texts(path):
    """The lines of `path` (or stdin), split at "\n" only (a trailing "\r" dropped) as `wc -l`,
    editors and `sed -n` count them, blank ones kept: output row k is input line k + 1."""
    if path == "-":
        text = sys.stdin.read()
    else:
        if not os.path.isfile(path):
            raise OSError(f"--input {path} does not exist or is not a file")
        try:
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"--input {path} is not UTF-8 text; expected one text per line") from None
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    texts = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not any(t.strip() for t in texts):
        raise ValueError(f"--input {path} holds no text; expected one text per line")
    return texts


def run(args):
    import numpy as np
    import torch

    from fastbert.cli import CLIError
    from fastbert.data import Tokenizer
    from fastbert.embed import embed_texts
    from fastbert.model import BertModel
    from fastbert.trainer import TrainingError, resolve_device

    if not args.output.endswith((".npy", ".jsonl")):
        raise CLIError(f"--output {args.output} must end in .npy or .jsonl")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be positive, got {args.batch_size}")
    texts = _read_texts(args.input)
    try:
        device = resolve_device(args.device)
    except TrainingError as e:
        raise CLIError(str(e)) from None
    model = BertModel.from_pretrained(args.model).to(device)
    if args.max_length is None:  # sentence-transformers directories say how long their inputs were
        st_config = os.path.join(args.model, "sentence_bert_config.json")
        if os.path.isfile(st_config):
            with open(st_config) as f:
                args.max_length = json.load(f).get("max_seq_length")
    if args.max_length is not None and not 1 < args.max_length <= model.config.max_position_embeddings:
        raise CLIError(f"--max-length must be in [2, {model.config.max_position_embeddings}], got {args.max_length}")
    tokenizer = Tokenizer.load(args.model)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        vectors = embed_texts(texts, model, tokenizer, pooling=args.pooling, normalize=args.normalize,
                              batch_size=args.batch_size, max_length=args.max_length, progress=args.progress)
    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    if args.output.endswith(".npy"):
        np.save(args.output, vectors)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            for i, (text, v) in enumerate(zip(texts, vectors)):
                f.write(json.dumps({"index": i, "text": text, "embedding": [round(float(x), 7) for x in v]}) + "\n")
    print(f"fastbert embed: {len(texts)} texts -> {args.output} ({vectors.shape[1]} dims, {args.pooling} pooling"
          f"{', normalized' if args.normalize else ''})", file=sys.stderr)
    blank = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if blank:  # kept so that row i stays line i; said so, as a shifted or dropped row would go unseen
        shown = ", ".join(map(str, blank[:5])) + (", ..." if len(blank) > 5 else "")
        print(f"fastbert embed: {len(blank)} blank line(s) ({shown}) embedded as the empty text ([CLS] [SEP], "
              f"as sentence-transformers does) to keep one row per input line", file=sys.stderr)
    return 0
