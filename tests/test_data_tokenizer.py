import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import fastbert.data.tokenizer
from fastbert.data import Corpus, SPECIAL_TOKENS, Tokenizer, embedded_corpus

SENTENCES = [
    "The European lobster is a species of clawed lobster from the eastern Atlantic Ocean.",
    "Lobsters are blue in life, and only become lobster red on cooking!",
    "Mating occurs in the summer, producing eggs which are carried by the females.",
    "Stela 31 has been described as the greatest early Classic sculpture to survive at Tikal.",
    "Ünïcödé accents, CJK 中文 and tabs\tare normalized by BERT's normalizer.",
]


@pytest.fixture(scope="module")
def docs():
    return embedded_corpus().documents[:40]


@pytest.fixture(scope="module")
def tok(docs):
    return Tokenizer.train(docs, vocab_size=600)


def test_specials_and_ids(tok):
    assert tok.pad_id == 0
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.special_ids == sorted([tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id])
    assert tok.vocab_size == 600
    assert any(t.startswith("##") for t in tok.convert_ids_to_tokens(range(tok.vocab_size)))


def test_encode_has_no_specials_and_decodes_back(tok):
    text = "the lobster is blue"
    ids = tok.encode(text)
    assert ids and not set(ids) & set(tok.special_ids[:1] + [tok.cls_id, tok.sep_id])
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "lobster"]) == [ids, tok.encode("lobster")]
    assert tok.encode("THE Lobster") == tok.encode("the lobster")  # lowercase by default


def test_cased_tokenizer_keeps_case(docs):
    cased = Tokenizer.train(docs, vocab_size=600, lowercase=False)
    assert cased.encode("The") != cased.encode("the")


def test_training_is_deterministic(docs, tok):
    assert Tokenizer.train(docs, vocab_size=600).fingerprint == tok.fingerprint
    assert Tokenizer.train(docs, vocab_size=700).fingerprint != tok.fingerprint
    assert Tokenizer.train(docs, vocab_size=600, lowercase=False).fingerprint != tok.fingerprint


def test_save_load_round_trip_and_transformers(tok, tmp_path):
    d = tok.save(tmp_path / "model")
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (d / name).is_file()
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is True and config["model_max_length"] == 512
    loaded = [Tokenizer.load(d), Tokenizer.load(d / "tokenizer.json"), Tokenizer.load(d / "vocab.txt")]
    for other in loaded:
        assert other.vocab_size == tok.vocab_size
        assert other.fingerprint == tok.fingerprint
        for s in SENTENCES + ["a [MASK] here [SEP]"]:
            assert other.encode(s) == tok.encode(s)

    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(d))
    assert hf.pad_token_id == 0 and hf.mask_token_id == tok.mask_id
    for s in SENTENCES:
        assert hf(s)["input_ids"] == [tok.cls_id] + tok.encode(s) + [tok.sep_id]
    enc = hf(SENTENCES[0], SENTENCES[1])
    a, b = tok.encode(SENTENCES[0]), tok.encode(SENTENCES[1])
    assert enc["input_ids"] == [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
    assert enc["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)


def test_bad_input(tmp_path, docs):
    with pytest.raises(ValueError, match="too small.*special"):
        Tokenizer.train(docs, vocab_size=5)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train([], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")
    (tmp_path / "vocab.txt").write_text("[PAD]\nhello\n")
    with pytest.raises(ValueError, match=r"\[UNK\]"):
        Tokenizer.load(tmp_path / "vocab.txt")
    (tmp_path / "v2.txt").write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\nhi\n")
    with pytest.raises(ValueError, match=r"\[PAD\] has id 1"):
        Tokenizer.load(tmp_path / "v2.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        Tokenizer.load(tmp_path / "empty_dir")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers JSON"):
        Tokenizer.load(tmp_path / "bad.json")


# Trains in a fresh interpreter without importing torch: tokenizer.py by its path.
_TRAIN_IN_CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("fb_tokenizer", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
texts = json.load(open(sys.argv[2], encoding="utf-8"))
tok = m.Tokenizer.train(texts, vocab_size=int(sys.argv[3]), lowercase=sys.argv[4] == "1")
print(json.dumps(tok.convert_ids_to_tokens(range(tok.vocab_size))))
"""


@pytest.mark.parametrize("lowercase", [True, False])
def test_same_vocabulary_in_fresh_processes(tmp_path, lowercase):
    """The same corpus gives the same vocabulary in every process (different hash seeds). tokenizers'
    own trainer gave 3 vocabularies in 3 processes on this corpus (issue 12); the procedure around it
    in `Tokenizer.train` (ids fixed before training, see `_deterministic_specials`) leans on how the
    library's trainer assigns ids and breaks ties, not a documented promise. This test is what checks
    a tokenizers version: requirements.txt and setup.py pin the versions it passed with
    (test_tokenizers_is_pinned_to_the_checked_versions); a failure after an upgrade means the
    upgrade broke the procedure, not that the test needs changing."""
    texts = [s for d in embedded_corpus().documents for s in d]
    (tmp_path / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    args = [sys.executable, "-c", _TRAIN_IN_CHILD, fastbert.data.tokenizer.__file__,
            str(tmp_path / "texts.json"), "8000", "1" if lowercase else "0"]
    children = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONHASHSEED": str(seed)})
                for seed in (0, 1, 2)]
    vocabs = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        vocabs.append(json.loads(out))
    here = Tokenizer.train(texts, vocab_size=8000, lowercase=lowercase)
    assert vocabs[0] == vocabs[1] == vocabs[2] == here.convert_ids_to_tokens(range(here.vocab_size))
    assert len(vocabs[0]) == 8000


def test_tokenizers_is_pinned_to_the_checked_versions():
    """One range for tokenizers in requirements.txt and setup.py, bounded above (a new minor version is
    taken only once test_same_vocabulary_in_fresh_processes passes with it), holding the installed one."""
    import re

    import tokenizers
    from packaging.requirements import Requirement
    root = Path(__file__).parents[1]
    lines = (root / "requirements.txt").read_text().splitlines()
    pinned = [Requirement(l) for l in lines if re.match(r"tokenizers\b", l)]
    in_setup = [Requirement(r) for r in re.findall(r'"(tokenizers\b[^"]*)"', (root / "setup.py").read_text())]
    assert len(pinned) == len(in_setup) == 1 and pinned[0].specifier == in_setup[0].specifier
    spec = pinned[0].specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"tokenizers{spec} has no upper bound"
    assert spec.contains(tokenizers.__version__), f"installed tokenizers {tokenizers.__version__} is not in {spec}"


def test_vocabulary_has_the_asked_size(docs):
    for size in (600, 1500):
        assert Tokenizer.train(docs, vocab_size=size).vocab_size == size
    # 8,000 on the whole embedded corpus (merges stopped at 7,249 with min_frequency=2)
    assert Tokenizer.train(embedded_corpus(), vocab_size=8000).vocab_size == 8000
    # a corpus that cannot fill the vocabulary: every word becomes one token
    small = Corpus([["The lobster is blue.", "It is red when cooked."], ["Another document here."]])
    tok = Tokenizer.train(small.documents * 5, vocab_size=1000)
    assert tok.vocab_size < 1000
    for sentence in small.documents[0] + small.documents[1]:
        words = tok.backend.pre_tokenizer.pre_tokenize_str(tok.backend.normalizer.normalize_str(sentence))
        assert len(tok.encode(sentence)) == len(words)
    with pytest.raises(ValueError, match="min_frequency"):
        Tokenizer.train(docs, vocab_size=600, min_frequency=-1)


def test_continuation_alphabet_matches_the_library():
    # The "##c" tokens fixed before training are exactly those tokenizers' trainer finds itself.
    from tokenizers import Tokenizer as HFTokenizer, models, trainers
    from fastbert.data.tokenizer import _configure, _deterministic_specials
    texts = SENTENCES + ["ΟΔΟΣ ΣΑΣ e\u0301te\u0301 a\x1cb c\x00d ﬁne İstanbul ß a©b a+b 3°C x\u200by"]
    for lowercase in (True, False):
        tk = HFTokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        _configure(tk, lowercase)
        ours = _deterministic_specials(tk, texts)
        tk.train_from_iterator(texts, trainers.WordPieceTrainer(
            vocab_size=1, special_tokens=["[UNK]"], continuing_subword_prefix="##"))
        theirs = sorted(t for t in tk.get_vocab() if t.startswith("##") and len(t) > 2)
        assert ours == theirs and len(ours) > 20


_SAVE_AND_CRASH = """
import resource, signal, sys
from fastbert.data import Tokenizer
tok = Tokenizer.load(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # python ignores it; a real crash does not
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # the write that passes `limit` bytes kills
tok.save(sys.argv[2])
"""


@pytest.mark.parametrize("crashing", ["tokenizer.json", "vocab.txt", "tokenizer_config.json"])
def test_a_crash_while_saving_leaves_no_half_written_file(docs, tok, tmp_path, crashing):
    """A process killed in the middle of writing one of the files (here: by going past RLIMIT_FSIZE,
    SIGXFSZ) over an earlier save leaves every file either the old one or the whole new one, and a
    directory that loads: never a truncated tokenizer that a later run (the cache) picks up."""
    new, old, target = tmp_path / "new", tmp_path / "old", tmp_path / "target"
    tok.save(new)
    Tokenizer.train(docs, vocab_size=500, lowercase=False).save(old)
    Tokenizer.load(old).save(target)
    versions = {p.name: {p.read_bytes(), (new / p.name).read_bytes()} for p in old.iterdir()}
    limit = (new / crashing).stat().st_size - 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-B", "-c", _SAVE_AND_CRASH, str(new), str(target), str(limit)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGXFSZ, run.stderr  # it did die in the middle of a write
    for p in target.iterdir():
        if p.name.startswith("."):  # the temporary file the crash left; never read
            continue
        assert p.read_bytes() in versions[p.name], f"{p.name} is half written"
    loaded = Tokenizer.load(target)
    assert loaded.fingerprint in (tok.fingerprint, Tokenizer.load(old).fingerprint)
