import math
import random

import numpy as np
import pytest

from fastbert.data import create_pairs, truncate_seq_pair

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


def test_not_next_rate(pairs):
    instances, stats = pairs
    labels = np.array([i.next_sentence_label for i in instances])
    assert labels.sum() == stats["coin_not_next"] + stats["forced_not_next"]
    assert (labels == 0).sum() == stats["coin_is_next"]
    flips = stats["coin_not_next"] + stats["coin_is_next"]
    assert flips > 2000
    assert abs(stats["coin_not_next"] / flips - 0.5) < five_sigma(0.5, flips)


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
