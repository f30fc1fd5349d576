import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastbert.cli import main

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2" / "wiki.valid.tokens"
TWO_DOCS = ("The lobster is blue. It turns red when cooked.\nLobsters live in the sea.\n\n"
            "Stela 31 is a monument. It was carved in the early Classic period.\nIt survives at Tikal.\n")


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FASTBERT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fastbert", "examples", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.skipif(not WIKITEXT.is_file(), reason=f"WikiText-2 not found at {WIKITEXT}")
def test_readable_view_on_wikitext(tmp_path):
    r = cli("--corpus", str(WIKITEXT), "--num", "3", "--vocab-size", "2000", "--cache-dir", str(tmp_path),
            "--width", "100")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for k in (1, 2, 3):
        assert f"Example {k} — " in out
    assert out.count("segment A (token_type_ids 0)") == 3 and out.count("segment B (token_type_ids 1)") == 3
    assert "[MASK]" in out and "target │" in out and "loss = mean cross-entropy over the" in out
    assert max(len(line) for line in out.splitlines() if "│" in line) <= 100


def test_jsonl(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TWO_DOCS * 30)  # 60 documents
    assert main(["examples", "--corpus", str(corpus), "--jsonl", "--num", "20", "--seq-len", "32",
                 "--vocab-size", "200", "--cache-dir", str(tmp_path / "cache")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 20
    from fastbert.data import Tokenizer
    tok = Tokenizer.load(next((tmp_path / "cache" / "tokenizers").iterdir()))
    for r in rows:
        assert set(r) == {"tokens", "input_ids", "token_type_ids", "labels", "next_sentence_label", "doc_a", "doc_b"}
        n = len(r["input_ids"])
        assert n <= 32 and len(r["tokens"]) == len(r["token_type_ids"]) == len(r["labels"]) == n
        assert r["tokens"] == tok.convert_ids_to_tokens(r["input_ids"])
        assert r["tokens"][0] == "[CLS]" and r["tokens"][-1] == "[SEP]"
        assert (r["next_sentence_label"] == 1) == (r["doc_a"] != r["doc_b"])
        labelled = [i for i, y in enumerate(r["labels"]) if y != -100]
        assert labelled and all(r["tokens"][i] not in ("[CLS]", "[SEP]") for i in labelled)
        first_b = r["token_type_ids"].index(1)
        assert r["tokens"][first_b - 1] == "[SEP]" and set(r["token_type_ids"][first_b:]) == {1}
    # deterministic by seed
    args = ["examples", "--corpus", str(corpus), "--jsonl", "--num", "5", "--seq-len", "32",
            "--vocab-size", "200", "--cache-dir", str(tmp_path / "cache")]
    main(args + ["--seed", "1"]); a = capsys.readouterr().out
    main(args + ["--seed", "1"]); b = capsys.readouterr().out
    main(args + ["--seed", "2"]); c = capsys.readouterr().out
    assert a == b != c


def test_default_embedded_corpus(tmp_path, capsys):
    assert main(["examples", "--num", "1", "--vocab-size", "500", "--seq-len", "64",
                 "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "embedded (Python" in out and "Example 1 — " in out


@pytest.mark.parametrize("setup, args, message", [
    (None, ["--corpus", "{tmp}/missing.txt"], "does not exist"),
    ("", ["--corpus", "{tmp}/c.txt"], "empty"),
    ("One document only.\nStill the same document.\n", ["--corpus", "{tmp}/c.txt"], "needs at least two"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["--corpus", "{tmp}/c.txt"], "binary"),
    (TWO_DOCS, ["--corpus", "{tmp}/c.txt", "--seq-len", "4"], "at least 8"),
    (TWO_DOCS, ["--corpus", "{tmp}/c.txt", "--seq-len", "1024"], "512 position embeddings"),
    (TWO_DOCS, ["--corpus", "{tmp}/c.txt", "--vocab-size", "3"], "too small"),
    (TWO_DOCS, ["--corpus", "{tmp}/c.txt", "--tokenizer", "{tmp}/nope"], "does not exist"),
    (TWO_DOCS, ["--corpus", "{tmp}/c.txt", "--num", "0"], "--num"),
])
def test_bad_input_one_line_no_traceback(tmp_path, capsys, setup, args, message):
    if setup is not None:
        p = tmp_path / "c.txt"
        p.write_bytes(setup) if isinstance(setup, bytes) else p.write_text(setup)
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["examples", *args, "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastbert examples: error:") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_input_subprocess(tmp_path):
    r = cli("--corpus", str(tmp_path / "missing"), "--cache-dir", str(tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
