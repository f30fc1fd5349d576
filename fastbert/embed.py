"""Sentence embeddings: tokenize, run BertModel, pool (padding excluded), optionally normalize."""
import numpy as np
import torch

from fastbert.pooling import MODES, pool


def embed_texts(texts, model, tokenizer, *, pooling="mean", normalize=False, batch_size=64, max_length=None,
                progress=False):
    """[len(texts), hidden] float32 numpy array of sentence vectors, in the order of `texts`.

    `model` is a fastbert BertModel, `tokenizer` a fastbert.data.Tokenizer (its post-processor adds
    [CLS] ... [SEP]). Texts are batched by length so little padding is computed.
    """
    if pooling not in MODES:
        raise ValueError(f"pooling must be one of {', '.join(MODES)}; got {pooling!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive int, got {batch_size!r}")
    max_length = max_length or model.config.max_position_embeddings
    backend = tokenizer.backend
    backend.enable_truncation(max_length)
    encodings = backend.encode_batch(list(texts), add_special_tokens=True)
    order = np.argsort([len(e.ids) for e in encodings], kind="stable")[::-1]
    device = model.device
    out = np.zeros((len(encodings), model.config.hidden_size), dtype=np.float32)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="embed", unit="batch", dynamic_ncols=True)
    model.eval()
    with torch.inference_mode():
        for start in batches:
            picked = order[start:start + batch_size]
            longest = max(len(encodings[i].ids) for i in picked)
            ids = torch.zeros(len(picked), longest, dtype=torch.long)
            types = torch.zeros_like(ids)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(picked):
                e = encodings[i]
                ids[row, :len(e.ids)] = torch.tensor(e.ids)
                types[row, :len(e.ids)] = torch.tensor(e.type_ids)
                mask[row, :len(e.ids)] = 1
            ids, types, mask = ids.to(device), types.to(device), mask.to(device)
            hidden = model(ids, mask, types).last_hidden_state
            vectors = pool(hidden.float(), mask, pooling)
            if normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
            out[picked] = vectors.cpu().numpy()
    return out
