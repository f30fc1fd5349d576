"""One call from corpus paths to pretraining instances, shared by `fastbert examples` and the trainer."""
import os
from pathlib import Path

from fastbert.data.corpus import embedded_corpus, read_corpora
from fastbert.data.pairs import check_seq_len, create_pairs
from fastbert.data.tokenized import tokenize_corpus
from fastbert.data.tokenizer import SPECIAL_TOKENS, Tokenizer


def default_cache_root():
    root = os.environ.get("FASTBERT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "fastbert"


def load_or_train_tokenizer(corpus, tokenizer_path=None, vocab_size=8000, lowercase=True,
                            cache_dir=None):
    """Load `tokenizer_path`, or train WordPiece on `corpus` (cached under
    `<cache_dir>/tokenizers/`, keyed by corpus fingerprint, vocab size and casing)."""
    if tokenizer_path is not None:
        return Tokenizer.load(tokenizer_path)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab size must be an int, got {type(vocab_size).__name__}")
    if vocab_size <= len(SPECIAL_TOKENS):
        Tokenizer.train([], vocab_size=vocab_size)  # raises the error naming the specials
    directory = None
    if cache_dir is not False:
        root = Path(cache_dir) if cache_dir is not None else default_cache_root()
        # "wp2": the deterministic trainer; a tokenizer cached by the earlier one is not reused.
        directory = (root / "tokenizers" /
                     f"{corpus.fingerprint[:20]}-v{vocab_size}-{'uncased' if lowercase else 'cased'}-wp2")
        if (directory / "tokenizer.json").is_file():
            try:
                return Tokenizer.load(directory)
            except (OSError, ValueError):
                pass
    tokenizer = Tokenizer.train(corpus, vocab_size=vocab_size, lowercase=lowercase)
    if directory is not None:
        try:
            tokenizer.save(directory)
        except OSError:
            pass
    return tokenizer


def prepare_pretraining_data(corpus_paths=None, tokenizer_path=None, vocab_size=8000, seq_len=128,
                             seed=0, cache_dir=None, *, dupe_factor=1, short_seq_prob=0.1,
                             lowercase=True, max_position_embeddings=512, progress=None):
    """Read the corpus (`corpus_paths`: a path, a list of paths, or None for the embedded corpus),
    load `tokenizer_path` or train a WordPiece tokenizer of `vocab_size`, tokenize (cached), and
    create the NSP pairs. Returns `(tokenizer, instances, corpus)`.

    `cache_dir` is the cache root (default `$FASTBERT_CACHE` or `~/.cache/fastbert`), holding
    `tokenized/` and `tokenizers/`; `False` disables caching."""
    check_seq_len(seq_len, max_position_embeddings)
    if tokenizer_path is None and (isinstance(vocab_size, int) and not isinstance(vocab_size, bool)
                                   and vocab_size <= len(SPECIAL_TOKENS)):
        Tokenizer.train([], vocab_size=vocab_size)  # raises before any reading
    if corpus_paths is None or (isinstance(corpus_paths, (list, tuple)) and not corpus_paths):
        corpus = embedded_corpus()
    else:
        corpus = read_corpora(corpus_paths)
    if len(corpus.documents) < 2:
        raise ValueError(f"corpus {corpus.name!r} has {len(corpus.documents)} document; next-sentence "
                         f"prediction needs at least two (separate documents by a blank line, or by "
                         f"' = Title = ' lines in WikiText)")
    tokenizer = load_or_train_tokenizer(corpus, tokenizer_path, vocab_size, lowercase, cache_dir)
    if seq_len > tokenizer.model_max_length:
        raise ValueError(f"sequence length {seq_len} exceeds the tokenizer's model_max_length "
                         f"{tokenizer.model_max_length}")
    tokenized_dir = False if cache_dir is False else (
        (Path(cache_dir) if cache_dir is not None else default_cache_root()) / "tokenized")
    docs = tokenize_corpus(corpus, tokenizer, tokenized_dir, progress=progress)
    instances = create_pairs(docs, seq_len, seed=seed, short_seq_prob=short_seq_prob,
                             dupe_factor=dupe_factor, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
                             max_position_embeddings=max_position_embeddings)
    return tokenizer, instances, corpus
