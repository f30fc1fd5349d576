"""Pretraining data for BERT MLM + NSP: WordPiece, corpora, and the (X, y) pairs BERT learns from.

    tokenizer, instances, corpus = prepare_pretraining_data(None, vocab_size=8000, seq_len=128)
    collator = MaskingCollator(tokenizer, seed=0)
    loader = build_dataloader(PretrainingDataset(instances), collator, batch_size=256, seed=0)
"""
from fastbert.data.corpus import (Corpus, embedded_corpus, parse_plain, parse_wikitext, read_corpora,
                                  read_corpus, split_sentences)
from fastbert.data.masking import IGNORE_INDEX, MaskingCollator, PretrainingDataset, build_dataloader
from fastbert.data.pairs import (MIN_SEQ_LEN, Instance, check_seq_len, create_pairs, split_heldout,
                                 truncate_seq_pair)
from fastbert.data.prepare import load_or_train_tokenizer, prepare_pretraining_data
from fastbert.data.tokenized import default_cache_dir, tokenize_corpus
from fastbert.data.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "Corpus", "embedded_corpus", "parse_plain", "parse_wikitext", "read_corpora", "read_corpus",
    "split_sentences", "IGNORE_INDEX", "MaskingCollator", "PretrainingDataset", "build_dataloader",
    "MIN_SEQ_LEN", "Instance", "check_seq_len", "create_pairs", "split_heldout", "truncate_seq_pair",
    "load_or_train_tokenizer", "prepare_pretraining_data", "default_cache_dir", "tokenize_corpus",
    "SPECIAL_TOKENS", "Tokenizer",
]
