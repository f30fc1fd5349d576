"""(A, B) pairs for MLM + NSP, after google-research/bert `create_instances_from_document`."""
import random

import numpy as np

MIN_SEQ_LEN = 8


class Instance:
    """One pretraining sequence `[CLS] A [SEP] B [SEP]`, stored compactly.

    `input_ids` is an int32 numpy array; `num_a` counts [CLS] + A + the first [SEP] (the positions
    with token_type_id 0); `next_sentence_label` is 0 (IsNext: B follows A in the same document) or
    1 (NotNext: B comes from document `doc_b` != `doc_a`); `index` is its position in the list."""
    __slots__ = ("input_ids", "num_a", "next_sentence_label", "doc_a", "doc_b", "index")

    def __init__(self, input_ids, num_a, next_sentence_label, doc_a, doc_b, index=None):
        self.input_ids = np.asarray(input_ids, dtype=np.int32)
        self.num_a = int(num_a)
        self.next_sentence_label = int(next_sentence_label)
        self.doc_a = int(doc_a)
        self.doc_b = int(doc_b)
        self.index = index

    @property
    def token_type_ids(self):
        tt = np.ones(len(self.input_ids), dtype=np.int32)
        tt[:self.num_a] = 0
        return tt

    def __len__(self):
        return len(self.input_ids)

    def __getstate__(self):
        return tuple(getattr(self, k) for k in self.__slots__)

    def __setstate__(self, state):
        for k, v in zip(self.__slots__, state):
            setattr(self, k, v)

    def __repr__(self):
        kind = "NotNext" if self.next_sentence_label else "IsNext"
        return (f"Instance(len={len(self)}, num_a={self.num_a}, {kind}, doc_a={self.doc_a}, "
                f"doc_b={self.doc_b})")


def truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng):
    """Trim the longer of A and B by one token at a time, from the front or back at random, until
    they fit (google-research/bert). Returns new lists."""
    a0, a1, b0, b1 = 0, len(tokens_a), 0, len(tokens_b)
    while (a1 - a0) + (b1 - b0) > max_num_tokens:
        if (a1 - a0) > (b1 - b0):
            if rng.random() < 0.5:
                a0 += 1
            else:
                a1 -= 1
        else:
            if rng.random() < 0.5:
                b0 += 1
            else:
                b1 -= 1
    return tokens_a[a0:a1], tokens_b[b0:b1]


def check_seq_len(max_seq_length, max_position_embeddings=512):
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int):
        raise TypeError(f"sequence length must be an int, got {type(max_seq_length).__name__}")
    if max_seq_length < MIN_SEQ_LEN:
        raise ValueError(f"sequence length {max_seq_length} is too short: it must be at least "
                         f"{MIN_SEQ_LEN} ([CLS] A [SEP] B [SEP] needs room for text)")
    if max_position_embeddings is not None and max_seq_length > max_position_embeddings:
        raise ValueError(f"sequence length {max_seq_length} exceeds the model's "
                         f"{max_position_embeddings} position embeddings; expected at most "
                         f"{max_position_embeddings}")
    return max_seq_length


def _instances_from_document(docs, d, max_seq_length, short_seq_prob, rng, cls_id, sep_id, stats):
    document = docs[d]
    max_num_tokens = max_seq_length - 3
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)
    out = []
    chunk, chunk_len, i = [], 0, 0
    while i < len(document):
        segment = document[i]
        chunk.append(segment)
        chunk_len += len(segment)
        # Unlike the original, a chunk holds two segments at least (unless it ends the document),
        # even when one alone reaches the target, so it can be split into A and an IsNext B.
        if i == len(document) - 1 or (chunk_len >= target_seq_length and len(chunk) >= 2):
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for seg in chunk[:a_end] for t in seg]
            # A one-segment chunk can only be NotNext. To keep the labels 50/50 anyway, a chunk
            # that can be split takes the label that is behind so far, and a coin flip on a tie
            # (the original flips a coin for every chunk: 55-60% NotNext overall).
            behind = stats["is_next"] - stats["not_next"]  # > 0: NotNext is behind
            if len(chunk) == 1:
                kind = "forced_not_next"
            elif behind:
                kind = "balance_not_next" if behind > 0 else "balance_is_next"
            else:
                kind = "coin_not_next" if rng.random() < 0.5 else "coin_is_next"
            stats[kind] += 1
            if kind.endswith("not_next"):
                # NotNext. Unlike the original (10 tries that may still pick `d`), draw uniformly
                # from the *other* documents, so B is from another document exactly when NotNext.
                stats["not_next"] += 1
                label = 1
                target_b_length = target_seq_length - len(tokens_a)
                r = rng.randint(0, len(docs) - 2)
                doc_b = r + 1 if r >= d else r
                random_document = docs[doc_b]
                start = rng.randint(0, len(random_document) - 1)
                tokens_b = []
                for j in range(start, len(random_document)):
                    tokens_b.extend(random_document[j])
                    if len(tokens_b) >= target_b_length:
                        break
                i -= len(chunk) - a_end  # put the unused segments back
            else:
                stats["is_next"] += 1
                label, doc_b = 0, d
                tokens_b = [t for seg in chunk[a_end:] for t in seg]
            tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            ids = [cls_id, *tokens_a, sep_id, *tokens_b, sep_id]
            out.append(Instance(ids, len(tokens_a) + 2, label, d, doc_b))
            chunk, chunk_len = [], 0
        i += 1
    return out


def create_pairs(tokenized_docs, max_seq_length, *, seed, short_seq_prob=0.1, dupe_factor=1,
                 cls_id, sep_id, max_position_embeddings=512, stats=None):
    """google-research/bert `create_instances_from_document` over every document, `dupe_factor`
    times, then shuffled; `Instance.index` is set to the position in the returned list.

    Target length `max_seq_length - 3` (10% of documents-passes a random shorter one); A = a random
    number of whole segments (sentences) of a chunk; B = the rest of the chunk (IsNext, label 0) or
    segments from another document (NotNext, label 1) and the unused segments are put back; then
    `truncate_seq_pair`. A chunk of one segment is always NotNext; every other chunk takes the label
    that is behind so far, or a coin flip when they are tied, so IsNext and NotNext stay level as
    far as the one-segment chunks allow. Deterministic for a seed (Python's `random.Random`). Pass a dict as `stats` to
    get the counts `is_next`, `not_next`, and how each label was chosen: `coin_is_next`,
    `coin_not_next`, `balance_is_next`, `balance_not_next`, `forced_not_next` (one-segment
    chunks, which NSP cannot split)."""
    check_seq_len(max_seq_length, max_position_embeddings)
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob must be in [0, 1], got {short_seq_prob}")
    if isinstance(dupe_factor, bool) or not isinstance(dupe_factor, int) or dupe_factor < 1:
        raise ValueError(f"dupe_factor must be a positive int, got {dupe_factor!r}")
    docs = [[list(s) for s in doc if len(s)] for doc in tokenized_docs]
    keep = [d for d, doc in enumerate(docs) if doc]
    if len(keep) < 2:
        raise ValueError(f"the corpus has {len(keep)} non-empty document(s); next-sentence prediction "
                         f"needs at least two (NotNext takes B from a different document)")
    compact = [docs[d] for d in keep]
    rng = random.Random(seed)
    counts = dict.fromkeys(("is_next", "not_next", "coin_is_next", "coin_not_next", "balance_is_next",
                            "balance_not_next", "forced_not_next"), 0)
    instances = []
    for _ in range(dupe_factor):
        for d in range(len(compact)):
            instances.extend(_instances_from_document(compact, d, max_seq_length, short_seq_prob,
                                                      rng, cls_id, sep_id, counts))
    rng.shuffle(instances)
    for k, inst in enumerate(instances):
        inst.doc_a, inst.doc_b, inst.index = keep[inst.doc_a], keep[inst.doc_b], k
    if stats is not None:
        stats.update(counts)
    return instances


def split_heldout(instances, num_heldout, seed):
    """`(train_indices, heldout_indices)`, both sorted: `num_heldout` instances drawn at random per
    NSP label, in the proportion of the labels in `instances` (a stratified split), so held-out
    NSP accuracy is measured on the same 50/50 labels as training, not on a sample that drifts a
    few points either way. `seed` is anything `numpy.random.default_rng` takes."""
    n = len(instances)
    if isinstance(num_heldout, bool) or not isinstance(num_heldout, (int, np.integer)) \
            or not 0 < num_heldout < n:
        raise ValueError(f"cannot hold out {num_heldout!r} of {n} instances; expected an int in [1, {n - 1}]")
    labels = np.fromiter((inst.next_sentence_label for inst in instances), dtype=np.int64, count=n)
    rng = np.random.default_rng(seed)
    is_next = rng.permutation(np.flatnonzero(labels == 0))
    not_next = rng.permutation(np.flatnonzero(labels != 0))
    k = min(int(round(num_heldout * len(is_next) / n)), len(is_next))
    k = max(k, num_heldout - len(not_next))
    heldout = np.concatenate([is_next[:k], not_next[:num_heldout - k]])
    train = np.concatenate([is_next[k:], not_next[num_heldout - k:]])
    return np.sort(train), np.sort(heldout)
