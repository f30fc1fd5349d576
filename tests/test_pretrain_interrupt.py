"""Ctrl-C / SIGTERM at any moment of a step: the run stops at the step boundary with a checkpoint,
and the resumed run equals a straight run bit for bit. A second signal stops at once without
leaving a half-written file."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastbert import plotting
from fastbert.trainer import CHECKPOINT, METRICS, Batches, Trainer, TrainArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "model_type": "bert"}
STEPS, AT = 9, 3  # interrupt during step AT (1-based) of STEPS; logs, evaluations and saves every 3 steps
COMPARED = ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "lr", "grad_norm",
            "eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_accuracy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    (root / "config.json").write_text(json.dumps(TINY))
    base = dict(config=str(root / "config.json"), cache_dir=str(root / "cache"), steps=STEPS, batch_size=4,
                seq_len=32, vocab_size=1000, dupe_factor=1, log_every=3, eval_every=3, save_every=3,
                eval_batches=1, warmup=2, lr=2e-3, progress=False)
    straight = Trainer(TrainArgs(out=str(root / "straight"), **base))
    straight.train()
    return root, base, _state(root / "straight")


def _state(out):
    ckpt = torch.load(out / CHECKPOINT, weights_only=False)
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return ckpt, [{k: r.get(k) for k in ("step", *COMPARED)} for r in rows]


def _assert_same_run(out, expected):
    (ckpt, rows), (want, want_rows) = _state(out), expected
    assert ckpt["step"] == want["step"] == STEPS
    for name, tensor in want["model"].items():
        assert torch.equal(ckpt["model"][name], tensor), name
    for a, b in zip(ckpt["optimizer"]["state"].values(), want["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert rows == want_rows


def _resume(out, cache_dir):
    args = TrainArgs(out=str(out), resume=True, cache_dir=cache_dir, progress=False)
    return Trainer(args, given={"out", "resume", "cache_dir", "progress"}).train()


class Injector:
    """Raises `signals` (in order, one per matching call) inside the named phase of step `at` (1-based)."""

    def __init__(self, trainer, phase, signals, monkeypatch, at=AT):
        self.trainer, self.signals, self.fired = trainer, list(signals), []
        self.step = at
        self.calls = {}
        t = trainer
        if phase == "data":  # fetching the step's batch
            original = Batches.__getitem__
            monkeypatch.setattr(Batches, "__getitem__", lambda b, g: (self.at(int(g) == self.step - 1), original(b, g))[1])
        elif phase == "forward":
            t.model.register_forward_pre_hook(lambda m, args: self.at(m.training and self.nth("fwd") == self.step))
        elif phase == "backward":
            weight = t.model.bert.embeddings.word_embeddings.weight
            weight.register_hook(lambda grad: self.at(self.nth("bwd") == self.step))
        elif phase == "optimizer_step":  # inside optimizer.step(), before the update
            t.optimizer.register_step_pre_hook(lambda *a: self.at(self.nth("opt") == self.step))
        elif phase == "after_step":  # the update is done, the step counter has not moved yet
            t.optimizer.register_step_post_hook(lambda *a: self.at(self.nth("post") == self.step))
        elif phase == "log":
            self.wrap(monkeypatch, t, "_window_record")
        elif phase == "eval":
            self.wrap(monkeypatch, t, "evaluate")
        elif phase == "save":
            self.wrap(monkeypatch, t, "_save")
        elif phase == "plot":
            original = plotting.plot_training
            monkeypatch.setattr(plotting, "plot_training",
                                lambda records, *a, **k: (self.at(records[-1]["step"] == self.step), original(records, *a, **k))[1])
        else:
            raise ValueError(phase)

    def nth(self, key):
        self.calls[key] = self.calls.get(key, 0) + 1
        return self.calls[key]

    def wrap(self, monkeypatch, obj, name):
        original = getattr(obj, name)

        def wrapped(*a, **k):
            self.at(self.trainer.step == self.step)
            return original(*a, **k)
        monkeypatch.setattr(obj, name, wrapped)

    def at(self, now):
        if now and self.signals:
            signum = self.signals.pop(0)
            self.fired.append(signum)
            signal.raise_signal(signum)  # the handler runs here, as a signal from outside would


PHASES = ["data", "forward", "backward", "optimizer_step", "after_step", "log", "eval", "plot", "save"]


@pytest.mark.parametrize("phase", PHASES)
def test_interrupt_in_any_phase_resumes_bit_for_bit(setup, tmp_path, monkeypatch, phase):
    root, base, expected = setup
    trainer = Trainer(TrainArgs(out=str(tmp_path / "run"), **base))
    signum = signal.SIGTERM if phase in ("eval", "optimizer_step") else signal.SIGINT
    injector = Injector(trainer, phase, [signum], monkeypatch)
    summary = trainer.train()
    assert injector.fired == [signum]
    assert summary["interrupted"] and summary["step"] == AT  # the step in flight was finished, then it stopped
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)["step"] == AT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    assert _resume(tmp_path / "run", base["cache_dir"])["step"] == STEPS
    _assert_same_run(tmp_path / "run", expected)


def test_second_signal_stops_at_once_keeping_the_last_checkpoint(setup, tmp_path, monkeypatch):
    """Ctrl-C in the forward pass of step AT+1, again in its backward: stop there, no save at that step;
    the checkpoint of step AT stays and resumes bit for bit."""
    root, base, expected = setup
    trainer = Trainer(TrainArgs(out=str(tmp_path / "run"), **base))
    fired = []

    def forward(module, args):
        if module.training and trainer.step == AT and not fired:
            fired.append(1)
            signal.raise_signal(signal.SIGINT)

    def backward(grad):
        if trainer.step == AT and len(fired) == 1:
            fired.append(2)
            signal.raise_signal(signal.SIGINT)
    trainer.model.register_forward_pre_hook(forward)
    trainer.model.bert.embeddings.word_embeddings.weight.register_hook(backward)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert fired == [1, 2]
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)["step"] == AT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert _resume(tmp_path / "run", base["cache_dir"])["step"] == STEPS
    _assert_same_run(tmp_path / "run", expected)


def test_second_signal_during_a_save_lets_the_save_finish(setup, tmp_path, monkeypatch):
    """Both signals land while the checkpoint is being written: the write completes (no truncated
    checkpoint, no temporary file), then the run stops."""
    root, base, expected = setup
    trainer = Trainer(TrainArgs(out=str(tmp_path / "run"), **base))
    real_save, fired = torch.save, []

    def save(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        if trainer.step == AT:
            for _ in range(2):
                fired.append(1)
                signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.undo()
    assert len(fired) == 2
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)["step"] == AT
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert _resume(tmp_path / "run", base["cache_dir"])["step"] == STEPS
    _assert_same_run(tmp_path / "run", expected)


def test_interrupt_between_log_lines_resumes_the_metrics_too(setup, tmp_path, monkeypatch):
    """Stopped at step AT+1, two steps before the next log line: the resumed run's line at step AT+3
    averages the same three steps as the straight run's."""
    root, base, expected = setup
    trainer = Trainer(TrainArgs(out=str(tmp_path / "run"), **base))
    Injector(trainer, "after_step", [signal.SIGINT], monkeypatch, at=AT + 1)
    assert trainer.train()["step"] == AT + 1
    assert _resume(tmp_path / "run", base["cache_dir"])["step"] == STEPS
    _assert_same_run(tmp_path / "run", expected)


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_one_process_signalled_all_stop_at_the_same_step(tmp_path):
    """torchrun with 2 processes, SIGINT to one of them only: both stop at the same step boundary and
    one checkpoint holds both processes' RNG states; --resume continues it."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "ddp"
    common = ["--device", "cpu", "--config", str(tmp_path / "config.json"), "--cache-dir", str(tmp_path / "cache"),
              "--batch-size", "4", "--seq-len", "32", "--vocab-size", "1000", "--dupe-factor", "1", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastbert",
           "pretrain", "--out", str(out), "--steps", "100000", "--log-every", "1", "--eval-every", "100000",
           "--save-every", "100000", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # its own process group, to end the workers too if this fails
    try:
        deadline = time.time() + 300
        while not (out / METRICS).exists() or len((out / METRICS).read_text().splitlines()) < 3:
            assert p.poll() is None and time.time() < deadline
            time.sleep(0.2)
        workers = _children(p.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert err.count("continue with:") == 1 and "Traceback" not in err.split("continue with:")[0], err[-3000:]
    ckpt = torch.load(out / CHECKPOINT, weights_only=False)
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert ckpt["step"] == rows[-1]["step"] >= 3 and len(ckpt["rng"]) == 2
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "fastbert", "pretrain", "--out", str(out), "--resume", "--stop-at-step", str(ckpt["step"] + 2),
                        "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out / CHECKPOINT, weights_only=False)["step"] == ckpt["step"] + 2


def _lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for_lines(p, path, n, seconds=300):
    deadline = time.time() + seconds
    while _lines(path) < n:
        assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:] if p.poll() is not None else ""
        time.sleep(0.2)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the DataLoader workers through /proc")
def test_ctrl_c_in_a_terminal_with_dataloader_workers(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, DataLoader workers included: they go on
    serving batches (the main process decides when to stop), and the run stops at a step boundary
    with a checkpoint of that step."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "run"
    # spawned workers (macOS, CUDA users, Python 3.14's forkserver) do not inherit the trainer's handlers
    start = "import multiprocessing, sys; multiprocessing.set_start_method('spawn'); " \
            "from fastbert.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen([sys.executable, "-c", start, "pretrain", "--out", str(out), "--config",
                          str(tmp_path / "config.json"), "--cache-dir", str(tmp_path / "cache"), "--steps", "100000",
                          "--log-every", "1", "--save-every", "100000", "--eval-every", "100000", "--seq-len", "32",
                          "--batch-size", "4", "--grad-accum", "2", "--vocab-size", "1000", "--dupe-factor", "1",
                          "--num-workers", "2", "--no-progress"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _wait_for_lines(p, out / METRICS, 3)
        workers = [pid for pid in _children(p.pid) if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        _wait_for_lines(p, out / METRICS, _lines(out / METRICS) + 3)  # training goes on with the same workers
        assert all(open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z" for pid in workers)  # alive
        os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the group
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and "Traceback" not in err and "continue with:" in err, err[-3000:]
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert torch.load(out / CHECKPOINT, weights_only=False)["step"] == rows[-1]["step"] >= 6


class _RecordedWork:
    """An all_reduce's Work that notes the step counter when the loop waits for it."""

    def __init__(self, work, entry, trainer):
        self.work, self.entry, self.trainer = work, entry, trainer

    def wait(self, *a, **k):
        self.entry["waited_at"] = self.trainer.step
        return self.work.wait(*a, **k)


def _two_process_worker(rank, world, init_file, args, at, report):
    """One process of a 2-process gloo run: process 1 alone gets SIGINT during step `at`. Notes every
    1-element all_reduce (the stop vote): the step at its launch, async or not, the step at its wait."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = Trainer(TrainArgs(**args))
        votes, real = [], torch.distributed.all_reduce

        def all_reduce(tensor, *a, **k):
            work = real(tensor, *a, **k)
            if tensor.numel() != 1:
                return work
            entry = {"launched_at": trainer.step, "async": bool(k.get("async_op")), "waited_at": None}
            votes.append(entry)
            return _RecordedWork(work, entry, trainer) if work is not None else None
        torch.distributed.all_reduce = all_reduce
        if rank == 1:
            steps = []
            trainer.optimizer.register_step_post_hook(
                lambda *a: (steps.append(1), len(steps) == at and signal.raise_signal(signal.SIGINT)))
        summary = trainer.train()
        with open(report.format(rank=rank), "w") as f:
            json.dump({"step": summary["step"], "interrupted": summary["interrupted"], "votes": votes}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_agree_on_the_stop_one_step_late_without_waiting_inside_a_step(setup, tmp_path):
    """A real 2-process gloo group; SIGINT reaches process 1 only, during step AT. Each step boundary
    launches its stop vote asynchronously and reads the previous boundary's, so both processes run
    step AT+1 and stop at the same boundary, AT+1, with one checkpoint of that step; every vote is
    waited for one step after its launch (never inside the step that launched it)."""
    root, base, _ = setup
    out = tmp_path / "ddp"
    args = {**base, "out": str(out), "steps": STEPS}
    report = str(tmp_path / "rank{rank}.json")
    torch.multiprocessing.start_processes(_two_process_worker, args=(2, str(tmp_path / "init"), args, AT, report),
                                          nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["interrupted"] and r["step"] == AT + 1, r
        votes = r["votes"]
        assert [v["launched_at"] for v in votes] == list(range(AT + 1))  # boundaries 0..AT; at AT+1 it stops
        assert all(v["async"] for v in votes), votes
        assert all(v["waited_at"] == v["launched_at"] + 1 for v in votes), votes
    ckpt = torch.load(out / CHECKPOINT, weights_only=False)
    assert ckpt["step"] == AT + 1 and len(ckpt["rng"]) == 2


def test_stopped_before_the_first_evaluation_still_plots(setup, tmp_path, monkeypatch):
    """Ctrl-C at step 2 of a run that logs every step and first evaluates at step 6: training.png holds
    the train curves of steps 1-2, and the summary says where it is. Stopped before anything was
    logged: no picture, and the summary says why."""
    from fastbert.commands.pretrain import format_summary
    root, base, _ = setup
    drawn = []
    original = plotting.plot_training
    monkeypatch.setattr(plotting, "plot_training",
                        lambda records, *a, **k: (drawn.append([r["step"] for r in records]), original(records, *a, **k))[1])
    out = tmp_path / "run"
    trainer = Trainer(TrainArgs(out=str(out), **{**base, "log_every": 1, "eval_every": 6}))
    Injector(trainer, "after_step", [signal.SIGINT], monkeypatch, at=2)
    summary = trainer.train()
    assert summary["interrupted"] and summary["step"] == 2
    assert drawn == [[1, 2]]  # no evaluation happened: drawn once, at the end, from both train records
    assert summary["plot"] == str(out / "training.png")
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"training curves: {out / 'training.png'}" in format_summary(summary)

    drawn.clear()
    out = tmp_path / "early"
    trainer = Trainer(TrainArgs(out=str(out), **{**base, "log_every": 5, "eval_every": 6}))
    Injector(trainer, "after_step", [signal.SIGINT], monkeypatch, at=2)
    summary = trainer.train()
    assert summary["step"] == 2 and summary["plot"] is None and drawn == []
    assert not (out / "training.png").exists()
    text = format_summary(summary)
    assert "no training.png: the run stopped before its first metrics line (every --log-every 5 steps)" in text
    assert "training.png" not in text.splitlines()[1]


def test_stop_at_step_before_the_first_evaluation_plots(setup, tmp_path):
    root, base, _ = setup
    out = tmp_path / "run"
    summary = Trainer(TrainArgs(out=str(out), **{**base, "log_every": 1, "stop_at_step": 2})).train()
    assert summary["stopped_as_asked"] and summary["plot"] == str(out / "training.png")
    assert (out / "training.png").stat().st_size > 10_000
