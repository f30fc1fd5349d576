"""Tokenize a corpus once: cached on disk, keyed by corpus fingerprint + tokenizer fingerprint."""
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fastbert import atomic

_CHUNK = 2048  # sentences per encode_batch call (one progress-bar step)


def default_cache_dir():
    """`$FASTBERT_CACHE/tokenized`, else `~/.cache/fastbert/tokenized`."""
    root = os.environ.get("FASTBERT_CACHE")
    return Path(root) / "tokenized" if root else Path.home() / ".cache" / "fastbert" / "tokenized"


def cache_path(corpus, tokenizer, cache_dir=None):
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return d / f"{corpus.fingerprint[:20]}-{tokenizer.fingerprint[:20]}.npz"


def _unpack(ids, sentence_lengths, doc_sentences):
    ids = ids.tolist()
    docs, pos, s = [], 0, 0
    for n_sent in doc_sentences.tolist():
        doc = []
        for n in sentence_lengths[s:s + n_sent].tolist():
            doc.append(ids[pos:pos + n])
            pos += n
        s += n_sent
        docs.append(doc)
    return docs


def tokenize_corpus(corpus, tokenizer, cache_dir=None, *, use_cache=True, progress=None):
    """Token ids per sentence per document: `result[d][s]` is a list of ints (no specials).

    Sentences that tokenize to nothing are dropped, then documents left empty. The result is cached
    in `cache_dir` (default `$FASTBERT_CACHE/tokenized` or `~/.cache/fastbert/tokenized`) as an .npz
    keyed by both fingerprints, so a second run does not tokenize again. `cache_dir=False` or
    `use_cache=False` disables the cache. A progress bar is shown for corpora of more than a few
    thousand sentences (`progress=True/False` forces it)."""
    path = None
    if use_cache and cache_dir is not False:
        path = cache_path(corpus, tokenizer, cache_dir)
        if path.is_file():
            try:
                with np.load(path) as z:
                    return _unpack(z["ids"], z["sentence_lengths"], z["doc_sentences"])
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache file is rebuilt below
    sentences = [s for doc in corpus.documents for s in doc]
    doc_of = [d for d, doc in enumerate(corpus.documents) for _ in doc]
    if progress is None:
        progress = len(sentences) > 20000
    encoded = []
    with tqdm(total=len(sentences), desc=f"tokenizing {corpus.name}", unit=" sentences",
              disable=not progress, leave=False) as bar:
        for start in range(0, len(sentences), _CHUNK):
            batch = sentences[start:start + _CHUNK]
            encoded.extend(tokenizer.encode_batch(batch))
            bar.update(len(batch))
    docs, last = [], None
    for d, ids in zip(doc_of, encoded):
        if not ids:
            continue
        if d != last:
            docs.append([])
            last = d
        docs[-1].append(ids)
    if path is not None:
        flat = np.fromiter((t for doc in docs for s in doc for t in s), dtype=np.int32)
        lengths = np.array([len(s) for doc in docs for s in doc], dtype=np.int64)
        per_doc = np.array([len(doc) for doc in docs], dtype=np.int64)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, ids=flat, sentence_lengths=lengths, doc_sentences=per_doc)
        except OSError:
            pass  # an unwritable cache only costs time
    return docs
