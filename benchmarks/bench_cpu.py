"""fastbert against transformers (attn_implementation="sdpa") on the CPU: the same weights, the
same batches, timed interleaved in one run.

    python -m pytest benchmarks/bench_cpu.py -s            # FASTBERT_BENCH_THREADS=2 by default

Cases (random weights, fastbert's state_dict loaded into transformers' model; random token ids;
sequence lengths drawn per batch, padded to the longest):
  inference-minilm   BertModel, all-MiniLM-L6-v2's shape (hidden 384, 6 layers, 12 heads,
                     vocab 30522), eval, torch.inference_mode, batch 32 and 128 of 8-64 tokens
  forward-base       BertModel, BERT-base, eval, inference_mode, batch 8 at seq 128 with ~30%
                     padding (lengths 52-128)
  train-mini/small   BertForPreTraining (mini / small preset, vocab 8000), train mode (dropout 0.1):
                     forward with MLM labels (15% of the real tokens) and NSP labels, backward,
                     gradient clipping, AdamW step; batch 32 at seq 128 of 64-128 tokens

Each round runs transformers then fastbert on the round's batch (a pool of batches is cycled);
pytest-benchmark times fastbert, transformers is timed around it in the same round, so both see
the same machine load. The ratio fastbert / transformers of the medians is reported (below 1:
fastbert is faster) and recorded in benchmarks/results/cpu-<cpu>.json with the device, torch
version, commit and thread count. Before timing, eval outputs are checked equal to 1e-5 at the real
tokens and the pooler (fastbert's padding-free inference leaves zeros at padding positions, where
transformers computes values no real token reads), and the training losses of a dropout-free step.
"""
import os
import statistics
import time

import pytest
import torch

from fastbert import BertConfig, BertForPreTraining, BertModel, preset

transformers = pytest.importorskip("transformers")

THREADS = int(os.environ.get("FASTBERT_BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("FASTBERT_BENCH_ROUNDS", "9"))
WARMUP, POOL = 2, 3
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def hf_model(cls_name, ours):
    d = {k: v for k, v in ours.config.to_dict().items() if k != "model_type"}
    config = transformers.BertConfig(**d)
    config._attn_implementation = "sdpa"
    theirs = getattr(transformers, cls_name)(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs


def make_batch(batch, min_len, max_len, vocab, *, labels=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    lengths[0] = max_len  # padded to the longest
    seq = int(lengths.max())
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (batch, seq), generator=g) * mask
    ids[:, 0] = 2  # a [CLS]-like first token
    tt = ((torch.arange(seq)[None, :] >= lengths[:, None] // 2) & mask.bool()).long()
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}
    if labels:
        chosen = (torch.rand(batch, seq, generator=g) < 0.15) & mask.bool()
        chosen[:, 0] = False
        chosen[0, 1] = True
        out["labels"] = torch.where(chosen, ids, torch.full_like(ids, -100))
        out["next_sentence_label"] = torch.randint(0, 2, (batch,), generator=g)
    return out


def interleaved(benchmark, ours, theirs, pool):
    """Times ours(batch) with pytest-benchmark and theirs(batch) in the same rounds; median ms each."""
    for batch in pool[:WARMUP]:
        theirs(batch), ours(batch)
    it = {"round": 0}
    baseline = []

    def setup():  # untimed by pytest-benchmark: the baseline's call of this round, timed here
        batch = pool[it["round"] % len(pool)]
        it["round"] += 1
        t0 = time.perf_counter()
        theirs(batch)
        baseline.append(time.perf_counter() - t0)
        return (batch,), {}

    benchmark.pedantic(ours, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median * 1e3, statistics.median(baseline) * 1e3


def record(bench_record, case, ms, base_ms, **extra):
    ratio = ms / base_ms
    print(f"\ncpu {case}: fastbert {ms:.1f} ms, transformers-sdpa {base_ms:.1f} ms, ratio {ratio:.3f} "
          f"({THREADS} threads, medians of {ROUNDS} interleaved rounds)")
    bench_record("cpu", case, ms, baseline="transformers-sdpa", baseline_ms=base_ms, device="cpu", ratio=ratio,
                 threads=THREADS, rounds=ROUNDS, **extra)


@pytest.fixture(autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def inference_case(benchmark, bench_record, case, config, batch, min_len, max_len):
    torch.manual_seed(0)
    ours = BertModel(config).eval()
    theirs = hf_model("BertModel", ours).eval()
    pool = [make_batch(batch, min_len, max_len, config.vocab_size, seed=i) for i in range(POOL)]
    with torch.inference_mode():
        b = pool[0]
        a, t = ours(**b), theirs(**b)
        real = b["attention_mask"].bool()  # padding positions: zeros on fastbert's padding-free path
        torch.testing.assert_close(a.last_hidden_state[real], t.last_hidden_state[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.pooler_output, t.pooler_output, atol=1e-5, rtol=1e-5)
        ms, base = interleaved(benchmark, lambda b: ours(**b), lambda b: theirs(**b), pool)
        padding_free = ours.use_padding_free(b["input_ids"], b["attention_mask"])
    padding = 1 - sum(float(b["attention_mask"].float().mean()) for b in pool) / len(pool)
    record(bench_record, case, ms, base, batch=batch, padding=round(padding, 3), padding_free=padding_free)


@pytest.mark.parametrize("batch", [32, 128])
def test_inference_minilm(benchmark, bench_record, batch):
    inference_case(benchmark, bench_record, f"inference-minilm batch {batch} seq 8-64", BertConfig(**MINILM),
                   batch, 8, 64)


def test_forward_base_30pct_padding(benchmark, bench_record):
    inference_case(benchmark, bench_record, "forward-base batch 8 seq 128, 30% padding", BertConfig(), 8, 52, 128)


@pytest.mark.parametrize("size", ["mini", "small"])
def test_train_step(benchmark, bench_record, size):
    torch.manual_seed(0)
    ours = BertForPreTraining(preset(size, vocab_size=8000))
    ours.check_inputs = False  # as the trainer
    theirs = hf_model("BertForPreTraining", ours)
    pool = [make_batch(32, 64, 128, 8000, labels=True, seed=i) for i in range(POOL)]
    # equal losses first (eval mode: no dropout)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**pool[0]).loss, theirs(**pool[0]).loss, atol=1e-5, rtol=1e-5)
    ours.train(), theirs.train()

    def stepper(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

        def step(batch):
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    ms, base = interleaved(benchmark, stepper(ours), stepper(theirs), pool)
    padding = 1 - sum(float(b["attention_mask"].float().mean()) for b in pool) / len(pool)
    record(bench_record, f"train-{size} batch 32 seq 64-128", ms, base, batch=32, padding=round(padding, 3),
           padding_free=bool(ours._cpu_padding_free(pool[0]["input_ids"], pool[0]["attention_mask"],
                                                    pool[0]["labels"], False)))
