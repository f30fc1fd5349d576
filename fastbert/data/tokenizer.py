"""BERT WordPiece tokenizer: train one with the `tokenizers` library, load one, save one that
`transformers.AutoTokenizer.from_pretrained(directory)` loads and encodes identically."""
import hashlib
import json
import os
import re
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from fastbert import atomic

# Order fixes the ids of a trained tokenizer: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEFAULT_MODEL_MAX_LENGTH = 512


def _iter_texts(documents_or_texts):
    """Sentences from a Corpus, a list of documents (lists of sentences) or an iterable of str."""
    docs = getattr(documents_or_texts, "documents", documents_or_texts)
    if isinstance(docs, str):
        raise TypeError("expected a Corpus, a list of documents or an iterable of texts, got one str")
    for item in docs:
        if isinstance(item, str):
            yield item
        elif isinstance(item, (list, tuple)):
            for sentence in item:
                if not isinstance(sentence, str):
                    raise TypeError(f"documents must hold str sentences, got {type(sentence).__name__}")
                yield sentence
        else:
            raise TypeError(f"expected str texts or lists of str sentences, got {type(item).__name__}")


def _deterministic_specials(tk, texts):
    """The continuation tokens "##c" of every character c that follows another one inside a word,
    sorted: passed to `tokenizers`' WordPieceTrainer as extra special tokens so that their ids are
    fixed before training. Why: the trainer (a BPE trainer underneath) gives "##c" its id when it
    first meets it while iterating its word counts, a Rust HashMap whose order is random per
    process, and breaks ties between equally frequent pairs by those ids; so the library alone
    trains a different vocabulary in every process (7,249 / 7,247 / 7,249 tokens in three runs on
    the embedded corpus, also with RAYON_NUM_THREADS=1). With every initial id fixed (specials in
    this order, then the alphabet, which the trainer sorts), the merge order is a function of the
    corpus. (One corner is left in the library: a merge that re-creates an existing token can put
    two equal heap entries for one pair, popped in either order; no such merge occurred on the
    embedded corpus or WikiText-2 at 8,000 tokens, and the tests compare processes.) The helpers are tokens the trainer would add anyway; `train` removes them from the
    special tokens afterwards. Computed like the trainer's pre-tokenization: a character is part
    of a word when BertPreTokenizer does not split "a{c}a"."""
    # Normalizing changes characters one by one (and never across a space), so the distinct
    # space-separated chunks are normalized, not the whole text: 5x faster on WikiText-2.
    chunks = set(" ".join(texts).split(" "))
    normalized = tk.normalizer.normalize_str("\n".join(chunks))
    chars = set(normalized)
    breaks = [c for c in chars if len(tk.pre_tokenizer.pre_tokenize_str(f"a{c}a")) != 1]
    following = set()
    if breaks:
        words = set(re.split("[" + re.escape("".join(sorted(breaks))) + "]+", normalized))
    else:
        words = {normalized}
    for word in words:
        following.update(word[1:])
    return ["##" + c for c in sorted(following)]


def _configure(tk, lowercase):
    tk.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##")


def _set_post_processor(tk):
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])


class Tokenizer:
    """A thin wrapper around `tokenizers.Tokenizer` holding a BERT WordPiece model.

    `encode` adds no special tokens: pairs are laid out by `create_pairs`.
    """

    def __init__(self, tokenizer, *, lowercase=True, model_max_length=DEFAULT_MODEL_MAX_LENGTH):
        if not isinstance(tokenizer, _HFTokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; a BERT vocabulary needs "
                             f"{' '.join(SPECIAL_TOKENS)}")
        if vocab["[PAD]"] != 0:
            raise ValueError(f"[PAD] has id {vocab['[PAD]']} but fastbert expects [PAD] = 0")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tk = tokenizer
        self.lowercase = bool(lowercase)
        self.model_max_length = int(model_max_length)
        self._id_to_token = [None] * self._tk.get_vocab_size(with_added_tokens=True)
        for token, i in vocab.items():
            if i >= len(self._id_to_token):
                self._id_to_token.extend([None] * (i + 1 - len(self._id_to_token)))
            self._id_to_token[i] = token
        if any(t is None for t in self._id_to_token):
            raise ValueError("tokenizer vocabulary has gaps in its ids; expected ids 0..vocab_size-1")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def train(cls, documents_or_texts, vocab_size=8000, lowercase=True, *, min_frequency=0,
              show_progress=False):
        """Train WordPiece on sentences (a Corpus, list of documents, or iterable of str).

        The same texts and settings give the same vocabulary, with the same ids, in every process
        (see `_deterministic_specials`). Merges continue down to pairs seen `min_frequency` times
        (0, as `tokenizers` and transformers' `train_new_from_iterator`: down to pairs seen once),
        so the vocabulary has `vocab_size` tokens unless every word of the corpus is already one
        token; it may come out a little larger when the corpus's alphabet alone is larger:
        WordPiece keeps every character it saw."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab size {vocab_size} is too small: it must be larger than the "
                             f"{len(SPECIAL_TOKENS)} special tokens {' '.join(SPECIAL_TOKENS)} "
                             f"(try 1000 or more)")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
            raise ValueError(f"min_frequency must be a non-negative int, got {min_frequency!r}")
        texts = list(_iter_texts(documents_or_texts))
        tk = _HFTokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        _configure(tk, lowercase)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS + _deterministic_specials(tk, texts),
            continuing_subword_prefix="##", show_progress=show_progress)
        tk.train_from_iterator(texts, trainer=trainer)
        if not texts or tk.get_vocab_size() <= len(SPECIAL_TOKENS):
            raise ValueError("cannot train a tokenizer on an empty corpus: no text found")
        # Ids of merged tokens follow the (now deterministic) merge order; renumber canonically
        # anyway (specials 0-4, then the rest sorted) so ids read well and repeat across versions.
        # Rebuilding also drops the "##c" helpers from the special (added) tokens.
        learned = set(tk.get_vocab(with_added_tokens=True)) - set(SPECIAL_TOKENS)
        order = SPECIAL_TOKENS + sorted(learned, key=lambda t: (t.startswith("##"), len(t), t))
        tk = _HFTokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(order)},
                                           unk_token="[UNK]", continuing_subword_prefix="##"))
        _configure(tk, lowercase)
        tk.add_special_tokens(SPECIAL_TOKENS)
        _set_post_processor(tk)
        return cls(tk, lowercase=lowercase)

    @classmethod
    def load(cls, path):
        """Load from a `vocab.txt`, a `tokenizer.json`, or a directory holding either (such as one
        written by `save` or by transformers' `save_pretrained`)."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer path {str(p)!r} does not exist; expected vocab.txt, "
                                    f"tokenizer.json or a directory holding one")
        config = {}
        if p.is_dir():
            cfg = p / "tokenizer_config.json"
            if cfg.is_file():
                try:
                    config = json.loads(cfg.read_text(encoding="utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    raise ValueError(f"{cfg} is not valid JSON: {e}") from None
            if (p / "tokenizer.json").is_file():
                p = p / "tokenizer.json"
            elif (p / "vocab.txt").is_file():
                p = p / "vocab.txt"
            else:
                raise FileNotFoundError(f"directory {str(path)!r} holds neither tokenizer.json nor vocab.txt")
        lowercase = bool(config.get("do_lower_case", True))
        max_len = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        if not isinstance(max_len, int) or max_len > 10**9:
            max_len = DEFAULT_MODEL_MAX_LENGTH
        if p.suffix == ".json":
            try:
                tk = _HFTokenizer.from_file(str(p))
            except Exception as e:  # the Rust error types are not exported
                raise ValueError(f"{p} is not a tokenizers JSON file: {e}") from None
            norm = json.loads(tk.to_str()).get("normalizer") or {}
            if norm.get("type") == "BertNormalizer":
                lowercase = bool(norm.get("lowercase", lowercase))
            if tk.post_processor is None:
                _set_post_processor(tk)
            return cls(tk, lowercase=lowercase, model_max_length=max_len)
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{p} is not a UTF-8 text vocabulary; expected one token per line") from None
        vocab = {}
        for line in lines:
            token = line.rstrip("\n")
            if token and token not in vocab:
                vocab[token] = len(vocab)
        if not vocab:
            raise ValueError(f"vocabulary file {p} is empty; expected one token per line")
        if "[UNK]" not in vocab:
            raise ValueError(f"vocabulary {p} has no [UNK] token; a BERT vocabulary needs "
                             f"{' '.join(SPECIAL_TOKENS)}")
        tk = _HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
        _configure(tk, lowercase)
        tk.add_special_tokens(SPECIAL_TOKENS)  # already in the vocab: makes "[MASK]" in text match
        result = cls(tk, lowercase=lowercase, model_max_length=max_len)
        _set_post_processor(tk)
        return result

    def save(self, directory):
        """Write tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json.

        Each file is written atomically (a crash leaves it absent, old or whole), tokenizer.json
        last: the file `load` prefers marks a complete save in a directory that had none."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic.write_text(d / "vocab.txt", "".join(t + "\n" for t in self._id_to_token))
        specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                    "cls_token": "[CLS]", "mask_token": "[MASK]"}
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
                  "tokenize_chinese_chars": True, "strip_accents": None,
                  "model_max_length": self.model_max_length, "clean_up_tokenization_spaces": False,
                  **specials}
        atomic.write_text(d / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic.write_text(d / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
        with atomic.atomic_path(d / "tokenizer.json") as tmp:
            self._tk.save(str(tmp))
        return d

    # -- properties -----------------------------------------------------------------------
    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tk

    @property
    def vocab_size(self):
        return len(self._id_to_token)

    def token_to_id(self, token):
        return self._tk.token_to_id(token)

    pad_id = property(lambda self: self._tk.token_to_id("[PAD]"))
    unk_id = property(lambda self: self._tk.token_to_id("[UNK]"))
    cls_id = property(lambda self: self._tk.token_to_id("[CLS]"))
    sep_id = property(lambda self: self._tk.token_to_id("[SEP]"))
    mask_id = property(lambda self: self._tk.token_to_id("[MASK]"))

    @property
    def special_ids(self):
        """Sorted ids of [PAD] [UNK] [CLS] [SEP] [MASK]: never masked, never a random replacement."""
        return sorted(self._tk.token_to_id(t) for t in SPECIAL_TOKENS)

    @property
    def continuation_mask(self):
        """list[bool] per id: True for WordPiece continuations ("##x"), for whole-word masking."""
        return [t.startswith("##") and len(t) > 2 for t in self._id_to_token]

    @property
    def fingerprint(self):
        """sha256 of the vocabulary (in id order) and the normalizer / pre-tokenizer settings."""
        state = json.loads(self._tk.to_str())
        h = hashlib.sha256()
        h.update("\n".join(self._id_to_token).encode("utf-8"))
        for key in ("normalizer", "pre_tokenizer"):
            h.update(json.dumps(state.get(key), sort_keys=True).encode("utf-8"))
        return h.hexdigest()

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text):
        """Token ids of `text`, no [CLS]/[SEP] added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects str texts, got {type(t).__name__}")
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def convert_ids_to_tokens(self, ids):
        n = len(self._id_to_token)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise IndexError(f"token id {i} is outside the vocabulary [0, {n})")
            out.append(self._id_to_token[i])
        return out

    def decode(self, ids, skip_special_tokens=True):
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"
