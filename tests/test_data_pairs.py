import math
import random
from pathlib import Path

import numpy as np
import pytest

from fastbert.data import create_pairs, prepare_pretraining_data, split_heldout, truncate_seq_pair

CLS, SEP = 2, 3
DOC_STRIDE = 1_000_000


def synthetic_docs(num_docs=120, seed=0):
    """Token ids that say where they came from: doc * DOC_STRIDE + running position (+10)."""
    rng = random.Random(seed)
    docs = []
    for d in range(num_docs):
        pos, doc = 10, []
        for _ in range(rng.randint(3, 40)):
            n = rng.randint(1, 45)
            doc.append(list(range(d * DOC_STRIDE + pos, d * DOC_STRIDE + pos + n)))
            pos += n
        docs.append(doc)
    return docs


def five_sigma(p, n):
    return 5 * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def pairs():
    stats = {}
    instances = create_pairs(synthetic_docs(), 64, seed=1, dupe_factor=5, cls_id=CLS, sep_id=SEP, stats=stats)
    return instances, stats


def test_layout_and_sources(pairs):
    instances, _ = pairs
    assert len(instances) > 2000
    for k, inst in enumerate(instances):
        ids = inst.input_ids.tolist()
        assert inst.index == k
        assert 5 <= len(ids) <= 64
        assert ids[0] == CLS and ids[inst.num_a - 1] == SEP and ids[-1] == SEP
        assert CLS not in ids[1:] and SEP not in ids[1:inst.num_a - 1] + ids[inst.num_a:-1]
        assert inst.token_type_ids.tolist() == [0] * inst.num_a + [1] * (len(ids) - inst.num_a)
        a, b = np.array(ids[1:inst.num_a - 1]), np.array(ids[inst.num_a:-1])
        assert len(a) >= 1 and len(b) >= 1
        # A and B are each a contiguous run of one document's text
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()
        assert (a // DOC_STRIDE == inst.doc_a).all() and (b // DOC_STRIDE == inst.doc_b).all()
        if inst.next_sentence_label == 0:
            assert inst.doc_b == inst.doc_a and b[0] > a[-1]  # B follows A
        else:
            assert inst.doc_b != inst.doc_a  # B from another document exactly when NotNext


def test_labels_are_half_is_next(pairs):
    instances, stats = pairs
    labels = np.array([i.next_sentence_label for i in instances])
    assert labels.sum() == stats["not_next"] == (stats["coin_not_next"] + stats["balance_not_next"]
                                                 + stats["forced_not_next"])
    assert (labels == 0).sum() == stats["is_next"] == stats["coin_is_next"] + stats["balance_is_next"]
    # one-segment chunks are always NotNext (a coin for the rest gave 55-60% NotNext) ...
    assert stats["forced_not_next"] > 0.05 * len(instances)
    # ... and the other chunks make up for them
    assert abs((labels == 0).mean() - 0.5) < 0.01
    flips = stats["coin_not_next"] + stats["coin_is_next"]
    assert flips > 500
    assert abs(stats["coin_not_next"] / flips - 0.5) < five_sigma(0.5, flips)


def test_split_heldout_keeps_the_balance(pairs):
    instances, _ = pairs
    labels = np.array([i.next_sentence_label for i in instances])
    for n in (640, 101, 1):
        train, held = split_heldout(instances, n, seed=[0, 7])
        assert len(held) == n and len(train) + n == len(instances)
        assert (np.diff(train) > 0).all() and (np.diff(held) > 0).all()
        assert not set(train.tolist()) & set(held.tolist())
        assert abs((labels[held] == 0).sum() - n * (labels == 0).mean()) <= 1
        assert abs((labels[train] == 0).mean() - 0.5) < 0.01
    again, held = split_heldout(instances, 640, seed=[0, 7])[0], split_heldout(instances, 640, seed=[1, 7])[1]
    assert (again == split_heldout(instances, 640, seed=[0, 7])[0]).all()
    assert set(held.tolist()) != set(split_heldout(instances, 640, seed=[0, 7])[1].tolist())
    for bad in (0, len(instances), 2.5, True):
        with pytest.raises(ValueError, match="hold out"):
            split_heldout(instances, bad, seed=0)


WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


@pytest.mark.parametrize("corpus", ["embedded", "wikitext-2"])
@pytest.mark.parametrize("seq_len", [64, 128])
def test_real_corpora_are_half_is_next(corpus, seq_len, tmp_path):
    if corpus == "wikitext-2" and not WIKITEXT.is_file():
        pytest.skip(f"WikiText-2 is not at {WIKITEXT}")
    stats = {}
    _, instances, _ = prepare_pretraining_data(None if corpus == "embedded" else str(WIKITEXT),
                                               vocab_size=2000, seq_len=seq_len, seed=0, cache_dir=tmp_path)
    labels = np.array([i.next_sentence_label for i in instances])
    # the trainer's held-out set: 5% of the pairs, at most 20 batches of 32
    train, held = split_heldout(instances, min(int(len(instances) * 0.05), 640), seed=[0, 7])
    for part in (labels, labels[train], labels[held]):
        assert abs((part == 0).mean() - 0.5) <= 0.01


def test_lengths_fill_the_target(pairs):
    instances, _ = pairs
    lengths = np.array([len(i) for i in instances])
    assert lengths.max() == 64
    assert (lengths == 64).mean() > 0.5  # most sequences are full; short ones from short_seq_prob and doc ends
    no_short = create_pairs(synthetic_docs(), 64, seed=1, short_seq_prob=0.0, cls_id=CLS, sep_id=SEP)
    full = np.mean([len(i) == 64 for i in no_short])
    assert full > (lengths == 64).mean()


def test_determinism(pairs):
    again = create_pairs(synthetic_docs(), 64, seed=1, dupe_factor=5, cls_id=CLS, sep_id=SEP)
    instances, _ = pairs
    assert [i.input_ids.tolist() for i in again] == [i.input_ids.tolist() for i in instances]
    other = create_pairs(synthetic_docs(), 64, seed=2, dupe_factor=5, cls_id=CLS, sep_id=SEP)
    assert [i.input_ids.tolist() for i in other] != [i.input_ids.tolist() for i in instances]


def test_truncate_seq_pair():
    rng = random.Random(0)
    for _ in range(200):
        a = list(range(rng.randint(1, 50)))
        b = list(range(100, 100 + rng.randint(1, 50)))
        limit = rng.randint(2, 60)
        ta, tb = truncate_seq_pair(a, b, limit, rng)
        assert len(ta) + len(tb) == min(limit, len(a) + len(b))
        assert ta and tb and abs(len(ta) - len(tb)) <= max(1, abs(len(a) - len(b)))
        assert a[a.index(ta[0]):a.index(ta[0]) + len(ta)] == ta  # contiguous pieces
        assert b[b.index(tb[0]):b.index(tb[0]) + len(tb)] == tb


def test_bad_input():
    docs = synthetic_docs(3)
    with pytest.raises(ValueError, match="needs at least two"):
        create_pairs(docs[:1], 64, seed=0, cls_id=CLS, sep_id=SEP)
    with pytest.raises(ValueError, match="needs at least two"):
        create_pairs([docs[0], [[]]], 64, seed=0, cls_id=CLS, sep_id=SEP)
    with pytest.raises(ValueError, match="at least 8"):
        create_pairs(docs, 7, seed=0, cls_id=CLS, sep_id=SEP)
    with pytest.raises(ValueError, match="512 position embeddings"):
        create_pairs(docs, 513, seed=0, cls_id=CLS, sep_id=SEP)
    with pytest.raises(ValueError, match="dupe_factor"):
        create_pairs(docs, 64, seed=0, dupe_factor=0, cls_id=CLS, sep_id=SEP)
