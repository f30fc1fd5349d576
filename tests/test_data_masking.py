import math
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from fastbert.data import Instance, MaskingCollator, PretrainingDataset, build_dataloader

V, PAD, UNK, CLS, SEP, MASK = 1000, 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]


def make_instances(n, seed=0, max_len=128):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        length = int(rng.integers(8, max_len + 1))
        num_a = int(rng.integers(3, length - 1))
        ids = rng.integers(5, V, size=length)
        ids[rng.random(length) < 0.03] = UNK  # specials inside the text are never labelled either
        ids[0], ids[num_a - 1], ids[-1] = CLS, SEP, SEP
        out.append(Instance(ids, num_a, int(rng.integers(0, 2)), k, k + 1, index=k))
    return out


def collator(**kw):
    return MaskingCollator(vocab_size=V, mask_id=MASK, special_ids=SPECIALS, **kw)


def five_sigma(p, n):
    return 5 * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def masked():
    instances = make_instances(4096)
    col = collator(seed=0)
    batches = [(instances[i:i + 256], col(instances[i:i + 256])) for i in range(0, 4096, 256)]
    return batches


def test_rates_and_invariants(masked):
    n_lab = n_mask = n_rand = n_kept = 0
    first_half = second_half = 0
    for instances, b in masked:
        ids, labels = b["input_ids"], b["labels"]
        bsz, seq = ids.shape
        assert seq == max(len(i) for i in instances)
        for r, inst in enumerate(instances):
            orig = torch.from_numpy(inst.input_ids.astype(np.int64))
            n = len(orig)
            lab = labels[r, :n] != -100
            special = torch.isin(orig, torch.tensor(SPECIALS))
            assert not (lab & special).any()  # specials never labelled
            expected = min(round(0.15 * int((~special).sum())), round(0.15 * seq))
            assert int(lab.sum()) == max(1, expected)
            assert torch.equal(labels[r, :n][lab], orig[lab])
            assert torch.equal(ids[r, :n][~lab], orig[~lab])  # unlabelled positions untouched
            shown = ids[r, :n][lab]
            n_mask += int((shown == MASK).sum())
            n_kept += int((shown == orig[lab]).sum())
            rand = (shown != MASK) & (shown != orig[lab])
            n_rand += int(rand.sum())
            assert not torch.isin(shown[rand], torch.tensor(SPECIALS)).any()
            pos = torch.nonzero(lab).squeeze(1)
            first_half += int((pos < n // 2).sum())
            second_half += int((pos >= n // 2).sum())
            n_lab += int(lab.sum())
            assert (labels[r, n:] == -100).all() and (ids[r, n:] == PAD).all()
            assert (b["attention_mask"][r, :n] == 1).all() and (b["attention_mask"][r, n:] == 0).all()
            assert b["token_type_ids"][r].tolist() == [0] * inst.num_a + [1] * (n - inst.num_a) + [0] * (seq - n)
        assert b["next_sentence_label"].tolist() == [i.next_sentence_label for i in instances]
        flat = labels.view(-1)
        assert torch.equal(b["masked_positions"], torch.nonzero(flat != -100).squeeze(1))
        assert (b["masked_positions"].diff() > 0).all()
        for key in ("input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label",
                    "masked_positions"):
            assert b[key].dtype == torch.int64
    assert n_lab > 30_000
    p_same = 1 / (V - len(SPECIALS))  # a random replacement can draw the original token
    assert abs(n_mask / n_lab - 0.8) < five_sigma(0.8, n_lab)
    assert abs(n_rand / n_lab - 0.1 * (1 - p_same)) < five_sigma(0.1, n_lab)
    assert abs(n_kept / n_lab - 0.1 * (1 + p_same)) < five_sigma(0.1, n_lab)
    # uniform over the sequence: about as many labels in each half (halves differ by <= 1 position)
    assert abs(first_half / n_lab - 0.5) < five_sigma(0.5, n_lab) + 0.01


def test_cap_and_padding_multiple():
    instances = make_instances(64, seed=3)
    b = collator(max_predictions_per_seq=3, pad_to_multiple_of=8)(instances)
    assert b["input_ids"].shape[1] % 8 == 0
    assert ((b["labels"] != -100).sum(1) <= 3).all() and ((b["labels"] != -100).sum(1) >= 1).all()
    longest = max(len(i) for i in instances)
    assert (b["attention_mask"][:, longest:] == 0).all()


def test_determinism_and_variation():
    instances = make_instances(64, seed=4)
    a, b = collator(seed=0)(instances), collator(seed=0)(instances)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], collator(seed=1)(instances)["labels"])
    other = make_instances(64, seed=4)
    for inst in other:
        inst.index += 64  # same content, another batch of the dataset: different masks
    assert not torch.equal(a["labels"], collator(seed=0)(other)["labels"])
    col = collator(seed=0)
    col.set_epoch(1)
    assert not torch.equal(a["labels"], col(instances)["labels"])
    clone = pickle.loads(pickle.dumps(collator(seed=0)))
    assert torch.equal(clone(instances)["input_ids"], a["input_ids"])


def test_dataloader_workers_and_distributed_sampler():
    dataset = PretrainingDataset(make_instances(200, seed=5))
    col = collator(seed=7)
    serial = list(build_dataloader(dataset, col, 16, seed=3))
    again = list(build_dataloader(dataset, col, 16, seed=3))
    workers = list(build_dataloader(dataset, col, 16, seed=3, num_workers=2))
    assert len(serial) == len(workers) == 13
    for x, y, z in zip(serial, again, workers):
        assert all(torch.equal(x[k], y[k]) and torch.equal(x[k], z[k]) for k in x)
    assert not torch.equal(serial[0]["input_ids"], list(build_dataloader(dataset, col, 16, seed=4))[0]["input_ids"])
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        for batch in build_dataloader(dataset, col, 10, sampler=sampler):
            seen.append(batch["input_ids"])
    assert sum(b.shape[0] for b in seen) == 200


def test_whole_word_mask():
    # ids 500..999 are "##" continuations
    cont = [i >= 500 for i in range(V)]
    instances = make_instances(300, seed=6)
    b = MaskingCollator(vocab_size=V, mask_id=MASK, special_ids=SPECIALS, continuation_mask=cont,
                        whole_word_mask=True, seed=0)(instances)
    total = 0
    for r, inst in enumerate(instances):
        orig = inst.input_ids.tolist()
        lab = (b["labels"][r, :len(orig)] != -100).tolist()
        special = [t in SPECIALS for t in orig]
        n_expected = max(1, round(0.15 * (len(orig) - sum(special))))
        assert not any(l and s for l, s in zip(lab, special))
        words = sum(1 for i in range(len(orig)) if lab[i] and not (i and lab[i - 1] and cont[orig[i]]))
        assert sum(lab) >= 1 and (sum(lab) <= n_expected or words == 1)
        for i in range(1, len(orig)):
            if cont[orig[i]] and not special[i] and not special[i - 1]:
                assert lab[i] == lab[i - 1]  # a word is labelled whole or not at all
        total += sum(lab)
    assert total > 0.8 * sum(round(0.15 * len(i)) for i in instances) * 0.5


def test_bad_input():
    with pytest.raises(ValueError, match="empty batch"):
        collator()([])
    bad = make_instances(2)
    bad[0].input_ids[1] = V + 5
    with pytest.raises(IndexError, match="outside the vocabulary"):
        collator()(bad)
    with pytest.raises(ValueError, match="mlm_probability"):
        collator(mlm_probability=1.5)
    with pytest.raises(ValueError, match="whole_word_mask"):
        collator(whole_word_mask=True)
    with pytest.raises(TypeError, match="Instance"):
        PretrainingDataset([[1, 2, 3]])
    with pytest.raises(ValueError, match="batch_size"):
        build_dataloader(PretrainingDataset(make_instances(4)), collator(), 0)
