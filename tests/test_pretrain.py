"""`fastbert pretrain` end to end on CPU: outputs, transformers loading, resume equality, two
processes with gloo, Ctrl-C, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastbert.cli import main
from fastbert.trainer import Batches, TrainArgs, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "model_type": "bert"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def quick_args(out, cache, tiny_config, **kw):
    base = dict(out=str(out), config=tiny_config, cache_dir=cache, steps=12, batch_size=8, seq_len=64,
                vocab_size=2000, dupe_factor=1, log_every=3, eval_every=6, save_every=6, eval_batches=2,
                warmup=2, lr=2e-3, progress=False)
    base.update(kw)
    return TrainArgs(**base)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastbert", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_embedded_default_run_outputs_and_transformers_loading(tmp_path, cache):
    """The main job with its defaults (tiny model, embedded corpus), shortened to fit CI."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    r = run_cli("pretrain", "--out", str(out), "--steps", "40", "--log-every", "10", "--eval-every", "20",
                "--cache-dir", cache, "--dupe-factor", "1")
    assert r.returncode == 0, r.stderr
    assert "finished at step 40/40" in r.stderr and "pretrain step 20/40: loss" in r.stderr  # summary, log lines
    rows = metrics(out)
    assert [row["step"] for row in rows] == [10, 20, 30, 40]
    for key in ("step", "loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "lr", "tokens_per_s"):
        assert all(key in row and np.isfinite(row[key]) for row in rows), key
    assert rows[-1]["mlm_loss"] < rows[0]["mlm_loss"] - 0.5  # the loss falls
    assert {"eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_accuracy"} <= set(rows[1]) and "eval_mlm_loss" in rows[-1]
    assert (out / "training.png").stat().st_size > 10_000 and (out / "checkpoint.pt").exists()
    # model/ loads in transformers with no missing keys, tokenizer included, and gives our loss
    model, info = transformers.BertForPreTraining.from_pretrained(out / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    enc = tok(["the value of the expression is returned."], ["a new object is created."], return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    labels[0, 2] = enc["input_ids"][0, 2]
    import fastbert
    ours = fastbert.BertForPreTraining.from_pretrained(out / "model").eval()
    a = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], labels=labels,
             next_sentence_label=torch.tensor([0])).loss
    b = model.eval()(**enc, labels=labels, next_sentence_label=torch.tensor([0])).loss
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_resume_equals_straight_run(tmp_path, cache, tiny_config):
    straight = pretrain(quick_args(tmp_path / "a", cache, tiny_config, steps=20, log_every=2))
    first = pretrain(quick_args(tmp_path / "b", cache, tiny_config, steps=20, log_every=2, stop_at_step=10))
    assert first["step"] == 10 and first["stopped_as_asked"]
    resumed = pretrain(TrainArgs(out=str(tmp_path / "b"), resume=True, cache_dir=cache, progress=False),
                       given={"out", "resume", "cache_dir", "progress"})
    assert straight["step"] == resumed["step"] == 20
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "lr"):
            assert x[key] == y[key], (x["step"], key)
        assert x.get("eval_mlm_loss") == y.get("eval_mlm_loss")


def test_grad_accum_and_two_phase(tmp_path, cache, tiny_config):
    s = pretrain(quick_args(tmp_path / "r", cache, tiny_config, steps=10, grad_accum=2, phase2_seq_len=96,
                            phase2_fraction=0.3, log_every=1, eval_every=10))
    rows = metrics(tmp_path / "r")
    assert s["step"] == 10
    assert [r["seq_len"] for r in rows] == [64] * 7 + [96] * 3


def test_batches_shard_the_data_between_ranks():
    class Collect:
        def set_epoch(self, epoch):
            self.epoch = epoch

        def __call__(self, instances):
            return list(instances)

    data = list(range(100))
    ranks = [Batches(data, np.arange(100), Collect(), 8, seed=3, world=2, rank=r) for r in (0, 1)]
    for g in (0, 5, 6, 13):  # 6 global batches of 16 per epoch
        a, b = ranks[0][g], ranks[1][g]
        assert len(a) == len(b) == 8 and not set(a) & set(b)
    epoch = [x for g in range(6) for r in ranks for x in r[g]]
    assert len(set(epoch)) == 96  # one epoch sees each sequence at most once
    assert ranks[0][6] != ranks[0][0]  # the next epoch is reshuffled


@pytest.mark.slow
def test_two_processes_with_gloo(tmp_path, cache, tiny_config):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastbert", "pretrain", "--device", "cpu", "--out", str(out), "--config", tiny_config,
           "--cache-dir", cache, "--steps", "6", "--batch-size", "4", "--seq-len", "64", "--vocab-size", "2000",
           "--dupe-factor", "1", "--log-every", "2", "--eval-every", "6", "--save-every", "6", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("2 processes") == 1  # one summary, from rank 0
    rows = metrics(out)
    assert [row["step"] for row in rows] == [2, 4, 6]  # one writer: no duplicated lines
    assert all(np.isfinite(row["loss"]) for row in rows)
    assert (out / "model" / "model.safetensors").exists()


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache, tiny_config):
    out = tmp_path / "int"
    p = subprocess.Popen([sys.executable, "-m", "fastbert", "pretrain", "--out", str(out), "--config", tiny_config,
                          "--cache-dir", cache, "--steps", "100000", "--log-every", "1", "--save-every", "100000",
                          "--eval-every", "100000", "--seq-len", "64", "--vocab-size", "2000", "--dupe-factor", "1",
                          "--no-progress"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3:
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] >= 3


def test_non_finite_loss_stops_naming_the_step(tmp_path, cache, tiny_config):
    r = run_cli("pretrain", "--out", str(tmp_path / "nan"), "--config", tiny_config, "--cache-dir", cache,
                "--steps", "30", "--lr", "1e6", "--warmup", "1", "--max-grad-norm", "1e30", "--seq-len", "64",
                "--vocab-size", "2000", "--dupe-factor", "1", "--no-progress")
    assert r.returncode == 2
    assert "at step" in r.stderr and ("nan" in r.stderr or "inf" in r.stderr)
    assert "Traceback" not in r.stderr


def _one_line_error(args, match, capsys):
    code = main(["pretrain", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    return err[0]


def test_bad_input(tmp_path, cache, tiny_config, capsys):
    common = ["--config", tiny_config, "--cache-dir", cache, "--seq-len", "64", "--vocab-size", "2000",
              "--dupe-factor", "1", "--no-progress", "--steps", "4", "--save-every", "2"]
    _one_line_error(["--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"), *common],
                    "missing.txt", capsys)
    (tmp_path / "empty.txt").write_text("")
    _one_line_error(["--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "x"), *common], "empty", capsys)
    _one_line_error(["--out", str(tmp_path / "x"), "--resume", *common], "no checkpoint", capsys)
    _one_line_error(["--out", str(tmp_path / "x"), "--batch-size", "0", *common], "--batch-size", capsys)
    _one_line_error(["--out", str(tmp_path / "x"), "--batch-size", "100000", *common], "--batch-size 100000",
                    capsys)
    _one_line_error(["--out", str(tmp_path / "x"), *common, "--seq-len", "4"], "4", capsys)
    if not torch.cuda.is_available():
        _one_line_error(["--out", str(tmp_path / "x"), "--device", "cuda", *common], "no CUDA GPU", capsys)
    assert not (tmp_path / "x").exists()  # nothing was written by a refused run

    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *common]) == 0
    capsys.readouterr()
    before = {p: (run / p).read_bytes() for p in ("metrics.jsonl", "checkpoint.pt")}
    _one_line_error(["--out", str(run), *common], "already holds a run", capsys)
    _one_line_error(["--out", str(run), "--resume", "--lr", "0.5"], "cannot change", capsys)
    assert before == {p: (run / p).read_bytes() for p in before}  # nothing of the previous run lost
    (run / "checkpoint.pt").write_bytes(before["checkpoint.pt"][:1000])
    _one_line_error(["--out", str(run), "--resume", "--steps", "8"], "checkpoint", capsys)
    assert (run / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]


def test_init_continues_from_a_pretrained_model(tmp_path, cache, tiny_config):
    from fastbert import BertForPreTraining
    from fastbert.trainer import Trainer
    pretrain(quick_args(tmp_path / "src", cache, tiny_config, steps=4))
    source = BertForPreTraining.from_pretrained(tmp_path / "src" / "model")
    args = quick_args(tmp_path / "cont", cache, None, init=str(tmp_path / "src" / "model"), config=None)
    trainer = Trainer(args, given={f for f in args.__dataclass_fields__ if f != "config"})
    assert trainer.tokenizer.vocab_size == source.config.vocab_size
    for (name, a), b in zip(trainer.model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name
    assert trainer.train()["step"] == 12


class _Loss:
    """A step's loss that records when the loop reads it (the host sync)."""

    def __init__(self, step, value, events):
        self.step, self.value, self.events = step, value, events

    def item(self):
        self.events.append(("read", self.step))
        return self.value


@pytest.mark.parametrize("nan_step,save_every,saved", [(2, 100, None), (6, 3, 3)])
def test_loss_is_read_one_step_late_and_a_nan_step_is_named_and_never_saved(tmp_path, cache, tiny_config,
                                                                            nan_step, save_every, saved):
    from fastbert.trainer import Trainer, TrainingError

    trainer = Trainer(quick_args(tmp_path / "run", cache, tiny_config, steps=20, log_every=100, eval_every=100,
                                 save_every=save_every))
    events = []

    def fake_step(stream, window):
        step = sum(e[0] == "queue" for e in events) + 1
        events.append(("queue", step))
        window["steps"] += 1
        return _Loss(step, float("nan") if step == nan_step else 1.0, events)

    trainer._train_step = fake_step
    with pytest.raises(TrainingError, match=f"at step {nan_step};"):
        trainer.train()
    # step k's loss is read after step k+1 is queued, except at a save step (read before saving)
    for k in range(1, nan_step + 1):
        late = events.index(("read", k)) > events.index(("queue", k + 1)) if ("queue", k + 1) in events else False
        assert late == (k % save_every != 0), (k, events)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    if saved is None:
        assert not ckpt.exists()
    else:
        assert torch.load(ckpt, weights_only=False)["step"] == saved
