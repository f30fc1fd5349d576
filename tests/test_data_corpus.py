import os
import re
from pathlib import Path

import pytest

from fastbert.data import (Corpus, Tokenizer, embedded_corpus, parse_wikitext, read_corpora,
                           read_corpus, split_sentences, tokenize_corpus)

WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2"


def test_split_sentences():
    assert split_sentences("It is blue . It is red ! Is it ? Yes") == ["It is blue .", "It is red !", "Is it ?", "Yes"]
    assert split_sentences("H. americanus is close, e.g. Tom. It stays") == ["H. americanus is close, e.g. Tom.", "It stays"]
    assert split_sentences("   ") == []


def test_parse_wikitext_synthetic():
    text = (" \n = First = \n \n Alpha beta . Gamma delta @-@ epsilon .\n \n = = Section = = \n"
            " The 1 @,@ 000 <unk> went .\n = Second = \n Zeta eta .\n")
    docs = parse_wikitext(text)
    assert docs == [["Alpha beta .", "Gamma delta-epsilon .", "The 1,000 [UNK] went ."], ["Zeta eta ."]]


@pytest.mark.skipif(not (WIKITEXT / "wiki.valid.tokens").is_file(),
                    reason=f"WikiText-2 not found at {WIKITEXT}")
def test_wikitext_valid():
    path = WIKITEXT / "wiki.valid.tokens"
    corpus = read_corpus(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    titles = [l for l in lines if re.fullmatch(r" = [^=].* = ", l)]
    assert len(corpus.documents) == len(titles) > 10
    assert corpus.documents[0][0].startswith("Homarus gammarus , known as the European lobster")
    sentences = [s for d in corpus.documents for s in d]
    assert len(sentences) > 5000
    assert not any(s.startswith("=") or "@-@" in s or "<unk>" in s for s in sentences)
    # paragraphs are split: the first paragraph of the first article has several sentences
    assert corpus.documents[0][1] == "It is closely related to the American lobster , H. americanus ."
    # a directory holding it reads the same documents
    assert read_corpus(WIKITEXT).documents[:len(corpus.documents)] == corpus.documents


def test_plain_text_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("Third doc sentence one.\nThird two.\n")
    (tmp_path / "a.txt").write_text("First one.\n  First   two.\n\n\n\nSecond one.\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert read_corpus(tmp_path / "a.txt").documents == [["First one.", "First two."], ["Second one."]]
    corpus = read_corpus(tmp_path)
    assert corpus.documents == [["First one.", "First two."], ["Second one."],
                                ["Third doc sentence one.", "Third two."]]
    both = read_corpora([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert both.documents == corpus.documents and both.fingerprint == corpus.fingerprint
    assert read_corpus(tmp_path / "b.txt").fingerprint != corpus.fingerprint


def test_embedded_corpus():
    a, b = embedded_corpus(), embedded_corpus()
    assert a.fingerprint == b.fingerprint and a.documents == b.documents
    assert len(a.documents) >= 200 and a.num_sentences >= 5000
    assert all(len(d) >= 2 for d in a.documents)
    assert not any(s.startswith(">>>") for d in a.documents for s in d)


def test_bad_corpus_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty"):
        read_corpus(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="binary"):
        read_corpus(tmp_path / "bin.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_corpus(tmp_path / "latin1.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        read_corpus(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no corpus paths"):
        read_corpora([])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_corpus(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_text("a.\n\nb.\n")
    p.chmod(0)
    with pytest.raises(PermissionError, match="not readable"):
        read_corpus(p)


def test_tokenize_corpus_is_cached(tmp_path):
    corpus = Corpus([["The lobster is blue.", "It is red when cooked."], ["!!!"], ["Another document here."]])
    tok = Tokenizer.train(corpus.documents * 20, vocab_size=50)
    docs = tokenize_corpus(corpus, tok, tmp_path)
    assert docs == [[tok.encode(s) for s in d] for d in corpus.documents]
    assert len(list(tmp_path.iterdir())) == 1

    class Exploding(Tokenizer):
        def encode_batch(self, texts):
            raise AssertionError("tokenized again despite the cache")
    cached = Exploding(tok.backend, lowercase=True)
    assert tokenize_corpus(corpus, cached, tmp_path) == docs
    other = Tokenizer.train(corpus.documents * 20, vocab_size=60)
    assert other.vocab_size == 60 and tok.vocab_size == 50
    tokenize_corpus(corpus, other, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # keyed by the tokenizer too
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_corpus(corpus, cached, tmp_path, use_cache=False)
