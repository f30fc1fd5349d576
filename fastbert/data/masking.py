"""Dynamic MLM masking and batching, vectorized in torch.

Randomness: each batch gets its own `torch.Generator`, seeded from (`seed`, `epoch`, the batch's
instance indices). So masks are deterministic for a seed, differ between batches (and between
epochs after `set_epoch`), and do not depend on the number of DataLoader workers or on which
worker builds a batch."""
import hashlib

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastbert.data.pairs import Instance

IGNORE_INDEX = -100


class PretrainingDataset(Dataset):
    """Map-style dataset of `Instance`s: `dataset[i]` is instance `i` (its `.index` set to `i`)."""

    def __init__(self, instances):
        self.instances = list(instances)
        for i, inst in enumerate(self.instances):
            if not isinstance(inst, Instance):
                raise TypeError(f"PretrainingDataset holds Instance objects, got {type(inst).__name__} "
                                f"at position {i}")
            if inst.index != i:
                inst.index = i

    def __len__(self):
        return len(self.instances)

    def __getitem__(self, i):
        return self.instances[i]


class MaskingCollator:
    """Pads a list of `Instance`s to the longest (optionally to a multiple of `pad_to_multiple_of`)
    and masks them: of the non-special tokens of each sequence, n = round(mlm_probability * count)
    (at least 1, at most `max_predictions_per_seq`) are chosen uniformly; each chosen one becomes
    [MASK] with probability 0.8, a random non-special token with 0.1, and stays with 0.1.

    Returns int64 tensors `input_ids, token_type_ids, attention_mask, labels` [batch, seq] (labels
    -100 except at chosen positions, where they hold the original id), `next_sentence_label` [batch]
    and `masked_positions`: the flat indices into [batch * seq] of the labels != -100, increasing.

    `tokenizer` may be a `fastbert.data.Tokenizer` or None with `vocab_size`, `mask_id`,
    `special_ids` (and `continuation_mask` for whole-word masking) given directly."""

    def __init__(self, tokenizer=None, *, vocab_size=None, mask_id=None, pad_id=0, special_ids=None,
                 continuation_mask=None, mlm_probability=0.15, max_predictions_per_seq=None,
                 pad_to_multiple_of=None, whole_word_mask=False, seed=0):
        if tokenizer is not None:
            vocab_size, mask_id, pad_id = tokenizer.vocab_size, tokenizer.mask_id, tokenizer.pad_id
            special_ids = tokenizer.special_ids
            if whole_word_mask:
                continuation_mask = tokenizer.continuation_mask
        if vocab_size is None or mask_id is None or special_ids is None:
            raise ValueError("MaskingCollator needs a tokenizer, or vocab_size, mask_id and special_ids")
        if pad_id != 0:
            raise ValueError(f"pad id must be 0, got {pad_id}")
        if not 0.0 < float(mlm_probability) < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if max_predictions_per_seq is not None and int(max_predictions_per_seq) < 1:
            raise ValueError(f"max_predictions_per_seq must be at least 1, got {max_predictions_per_seq}")
        if pad_to_multiple_of is not None and int(pad_to_multiple_of) < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of}")
        if whole_word_mask and continuation_mask is None:
            raise ValueError("whole_word_mask needs the tokenizer (or continuation_mask) to find words")
        self.vocab_size = int(vocab_size)
        self.mask_id = int(mask_id)
        self.special_ids = sorted(int(i) for i in special_ids)
        self.mlm_probability = float(mlm_probability)
        self.max_predictions_per_seq = None if max_predictions_per_seq is None else int(max_predictions_per_seq)
        self.pad_to_multiple_of = None if pad_to_multiple_of is None else int(pad_to_multiple_of)
        self.whole_word_mask = bool(whole_word_mask)
        self.seed = int(seed)
        self.epoch = 0
        special = torch.zeros(self.vocab_size, dtype=torch.bool)
        special[self.special_ids] = True
        self._special = special
        self._replacements = torch.nonzero(~special).squeeze(1)
        if len(self._replacements) == 0:
            raise ValueError("the vocabulary has no non-special tokens to mask")
        self._continuation = (torch.as_tensor(list(continuation_mask), dtype=torch.bool)
                              if continuation_mask is not None else None)

    def set_epoch(self, epoch):
        """Vary the masks per epoch (call before iterating, as with DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def _generator(self, instances, ids):
        h = hashlib.blake2b(digest_size=8)
        h.update(np.array([self.seed, self.epoch], dtype=np.int64).tobytes())
        indices = [inst.index for inst in instances]
        if all(i is not None for i in indices):
            h.update(np.asarray(indices, dtype=np.int64).tobytes())
        else:  # instances outside a dataset: key on their content
            h.update(ids.tobytes())
        return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))

    def __call__(self, instances):
        if not instances:
            raise ValueError("cannot collate an empty batch")
        lengths = np.fromiter((len(x.input_ids) for x in instances), dtype=np.int64, count=len(instances))
        batch, longest = len(instances), int(lengths.max())
        seq = longest
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            seq = (longest + m - 1) // m * m
        positions = np.arange(seq)
        valid = positions[None, :] < lengths[:, None]
        ids_np = np.zeros((batch, seq), dtype=np.int64)
        ids_np[valid] = np.concatenate([x.input_ids for x in instances])
        num_a = np.fromiter((x.num_a for x in instances), dtype=np.int64, count=batch)
        input_ids = torch.from_numpy(ids_np)
        attention_mask = torch.from_numpy(valid.astype(np.int64))
        token_type_ids = torch.from_numpy(((positions[None, :] >= num_a[:, None]) & valid).astype(np.int64))
        nsp = torch.tensor([x.next_sentence_label for x in instances], dtype=torch.int64)
        if int(input_ids.max()) >= self.vocab_size or int(input_ids.min()) < 0:
            raise IndexError(f"instance holds a token id outside the vocabulary [0, {self.vocab_size})")
        gen = self._generator(instances, ids_np)
        input_ids, labels = self.mask(input_ids, gen)
        masked_positions = torch.nonzero(labels.view(-1) != IGNORE_INDEX).squeeze(1)
        return {"input_ids": input_ids, "token_type_ids": token_type_ids,
                "attention_mask": attention_mask, "labels": labels,
                "next_sentence_label": nsp, "masked_positions": masked_positions}

    def num_to_predict(self, candidate_counts, seq):
        """round(p * count), at least 1 (where there is a candidate), at most the cap."""
        n = torch.round(candidate_counts.to(torch.float64) * self.mlm_probability).to(torch.int64)
        n = n.clamp(min=1)
        cap = self.max_predictions_per_seq
        if cap is None:
            cap = max(1, round(self.mlm_probability * seq))
        return torch.minimum(n.clamp(max=cap), candidate_counts)

    def mask(self, input_ids, generator):
        """Mask a padded [batch, seq] int64 tensor; returns (masked_input_ids, labels)."""
        batch, seq = input_ids.shape
        candidates = ~self._special[input_ids]
        counts = candidates.sum(1)
        n = self.num_to_predict(counts, seq)
        if self.whole_word_mask:
            chosen = self._choose_whole_words(input_ids, candidates, n, generator)
        else:
            # uniform choice of exactly n[b] candidates per row: random scores, rank, keep rank < n
            scores = torch.rand(batch, seq, generator=generator)
            scores.masked_fill_(~candidates, 2.0)
            order = scores.argsort(dim=1)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(seq).expand(batch, seq).contiguous())
            chosen = ranks < n[:, None]
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        u = torch.rand(batch, seq, generator=generator)
        to_mask = chosen & (u < 0.8)
        to_random = chosen & (u >= 0.8) & (u < 0.9)
        random_tokens = self._replacements[
            torch.randint(len(self._replacements), (batch, seq), generator=generator)]
        out = torch.where(to_mask, torch.full_like(input_ids, self.mask_id), input_ids)
        out = torch.where(to_random, random_tokens, out)
        return out, labels

    def _choose_whole_words(self, input_ids, candidates, n, generator):
        """google-research/bert whole-word masking: words (a token and its "##" continuations) in
        random order, each taken whole if it still fits in n[b] tokens. Unlike the original, a row
        never ends up with no label: if no word fits, its shortest word is labelled (exceeding n)."""
        batch, seq = input_ids.shape
        cont = self._continuation[input_ids] & candidates
        starts = candidates & ~cont
        chosen = torch.zeros(batch, seq, dtype=torch.bool)
        perm_keys = torch.rand(batch, seq, generator=generator)
        for b in range(batch):
            start_pos = torch.nonzero(starts[b]).squeeze(1).tolist()
            if not start_pos:
                continue
            cand = candidates[b].tolist()
            words = []
            for s in start_pos:
                e = s + 1
                while e < seq and cand[e] and bool(cont[b, e]):
                    e += 1
                words.append((s, e))
            keys = perm_keys[b, torch.tensor(start_pos)]
            budget, taken = int(n[b]), 0
            order = keys.argsort().tolist()
            for k in order:
                s, e = words[k]
                if taken + (e - s) > budget:
                    continue
                chosen[b, s:e] = True
                taken += e - s
                if taken >= budget:
                    break
            if taken == 0:  # every word is longer than the budget: label the shortest one whole
                s, e = min((words[k] for k in order), key=lambda w: w[1] - w[0])
                chosen[b, s:e] = True
        return chosen


def build_dataloader(dataset, collator, batch_size, *, shuffle=True, seed=0, num_workers=0,
                     sampler=None, drop_last=False, **kwargs):
    """A DataLoader over `dataset` batched by `collator`. Shuffling uses a torch.Generator seeded
    with `seed` (a new order each epoch, the same sequence of orders for the same seed). Pass a
    `DistributedSampler` as `sampler` for multi-process training (then `shuffle` is its business:
    call `sampler.set_epoch(e)` and `collator.set_epoch(e)` each epoch)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: no pretraining instances")
    generator = None
    if sampler is None and shuffle:
        generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=(shuffle if sampler is None else False),
                      sampler=sampler, num_workers=num_workers, collate_fn=collator,
                      drop_last=drop_last, generator=generator,
                      persistent_workers=False, **kwargs)
