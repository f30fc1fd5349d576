"""Random BERT configs and batches shared by the model tests (odd sizes on purpose)."""
import torch

from fastbert import BertConfig


def random_config(**overrides):
    # odd sizes: hidden 96, 6 heads (head_dim 16), intermediate 150
    base = dict(vocab_size=131, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                intermediate_size=150, max_position_embeddings=40, type_vocab_size=2)
    base.update(overrides)
    return BertConfig(**base)


def make_batch(config, lengths, seq=None, device="cpu"):
    b, s = len(lengths), seq or max(max(lengths), 1)
    ids = torch.randint(1, config.vocab_size, (b, s))
    mask = torch.zeros(b, s, dtype=torch.long)
    tt = torch.zeros(b, s, dtype=torch.long)
    labels = torch.full((b, s), -100)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
        tt[i, n // 2:n] = 1
        if n:
            pos = torch.randperm(n)[: max(1, n // 6)]
            labels[i, pos] = torch.randint(0, config.vocab_size, (len(pos),))
    nsp = torch.randint(0, 2, (b,))
    return tuple(t.to(device) for t in (ids, mask, tt, labels, nsp))
