"""Masking + collation throughput: batches of 256 pre-built instances at seq 128 on one CPU core.

    python -m pytest benchmarks/bench_data.py -s
A GPU step of BERT-base consumes about 7,000 sequences/s; the data path must not be the bottleneck."""
import numpy as np
import torch

from fastbert.data import Instance, MaskingCollator

SEQ, BATCH, VOCAB, REQUIRED = 128, 256, 30522, 20_000


def _batches(num=8, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(num):
        batch = []
        for k in range(BATCH):
            ids = rng.integers(5, VOCAB, size=SEQ)
            num_a = int(rng.integers(3, SEQ - 2))
            ids[0], ids[num_a - 1], ids[-1] = 2, 3, 3
            batch.append(Instance(ids, num_a, k % 2, 0, k % 2, index=b * BATCH + k))
        batches.append(batch)
    return batches


def test_masking_collation_throughput(benchmark):
    torch.set_num_threads(1)
    collator = MaskingCollator(vocab_size=VOCAB, mask_id=4, special_ids=[0, 1, 2, 3, 4], seed=0)
    batches = _batches()
    state = {"i": 0}

    def step():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        return collator(batch)

    out = benchmark.pedantic(step, rounds=60, iterations=1, warmup_rounds=3)
    assert out["input_ids"].shape == (BATCH, SEQ)
    rate = BATCH / benchmark.stats.stats.median
    print(f"\nmasking + collation: {rate:,.0f} sequences/s at seq {SEQ}, batch {BATCH}, one thread")
    benchmark.extra_info["sequences_per_second"] = rate
    assert rate >= REQUIRED, f"{rate:,.0f} sequences/s is below the required {REQUIRED:,}"
