"""What a user of `fastbert pretrain` sees and keeps: plain log lines when stderr is a file, file
modes from the umask, the resume hint and errors, runs never replaced unasked."""
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

from fastbert.cli import main
from fastbert.commands import pretrain as command
from fastbert.trainer import TrainArgs, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "model_type": "bert"}


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    root = tmp_path_factory.mktemp("ux")
    (root / "config.json").write_text(json.dumps(TINY))
    return ["--config", str(root / "config.json"), "--cache-dir", str(root / "cache"), "--seq-len", "32",
            "--batch-size", "4", "--vocab-size", "1000", "--dupe-factor", "1"]


def test_piped_stderr_gets_plain_log_lines(tmp_path, common):
    r = subprocess.run([sys.executable, "-m", "fastbert", "pretrain", "--out", str(tmp_path / "run"), *common,
                        "--steps", "6", "--log-every", "2", "--eval-every", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr  # no progress-bar redraws in a log file
    lines = [line for line in r.stderr.splitlines() if line.startswith("pretrain step")]
    assert [line.split(":")[0] for line in lines] == [f"pretrain step {n}/6" for n in (2, 3, 4, 6)], r.stderr
    assert "loss" in lines[0] and "tokens/s" in lines[0] and "held-out" not in lines[0]
    assert lines[1].startswith("pretrain step 3/6: held-out MLM loss")  # an evaluation between two log steps
    assert "MLM accuracy" in lines[-1] and "held-out" in lines[-1]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert f"loss {rows[0]['loss']:.4f}" in lines[0]

    quiet = subprocess.run([sys.executable, "-m", "fastbert", "pretrain", "--out", str(tmp_path / "quiet"), *common,
                            "--steps", "2", "--log-every", "1", "--no-progress"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert quiet.returncode == 0 and "pretrain step" not in quiet.stderr, quiet.stderr


def test_outputs_follow_the_umask_and_resume_errors_name_real_flags(tmp_path, common, capsys):
    out = tmp_path / "run"
    previous = os.umask(0o002)
    try:
        assert main(["pretrain", "--out", str(out), *common, "--steps", "2", "--no-progress"]) == 0
    finally:
        os.umask(previous)
    files = [p for p in out.rglob("*")]
    assert out / "model" / "model.safetensors" in files and out / "checkpoint.pt" in files
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o775 if path.is_dir() else 0o664), f"{path}: {oct(mode)}"

    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--lr cannot change" in err and "--no-progress" in err and "--progress" not in err.replace("--no-progress", "")


def test_default_out_holding_a_run_is_refused_not_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "fastbert").mkdir(parents=True)
    (tmp_path / "runs" / "fastbert" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert TrainArgs().out == "runs/fastbert"
    assert main(["pretrain", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "runs" / "fastbert" / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resume_hint_is_a_command_the_shell_finds(tmp_path, monkeypatch):
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    monkeypatch.delenv("FASTBERT_RUN_SCRIPT", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    path_without_venv = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                                        if os.path.abspath(d or ".") != bindir)

    # python -m fastbert from a shell that has not activated the environment: the interpreter's path
    monkeypatch.setenv("PATH", path_without_venv)
    monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, "fastbert", "__main__.py"), "pretrain"])
    hint = shlex.split(command.resume_command("runs/my run"))
    assert hint[0] == sys.executable and hint[1:] == ["-m", "fastbert", "pretrain", "--out", "runs/my run", "--resume"]

    # the console script: its path when the shell would not find it, `fastbert` when it would
    console = os.path.join(bindir, "fastbert")
    monkeypatch.setattr(sys, "argv", [console, "pretrain"])
    if os.path.exists(console):
        assert shlex.split(command.resume_command("r"))[0] == console
    monkeypatch.setenv("PATH", bindir + os.pathsep + path_without_venv)
    if os.path.exists(console):
        assert command.resume_command("r") == "fastbert pretrain --out r --resume"

    # scripts/run.sh says how it was called
    monkeypatch.setenv("FASTBERT_RUN_SCRIPT", "fastbert repo/scripts/run.sh")
    assert command.resume_command("runs/fastbert-2") == "bash 'fastbert repo/scripts/run.sh' --out runs/fastbert-2 --resume"

    # a summary after an interruption carries the hint
    summary = {"interrupted": True, "step": 3, "steps": 9, "seconds": 1.0, "parameters": 1e6, "device": "cpu",
               "precision": "fp32", "world_size": 1, "out": "runs/fastbert-2"}
    assert command.format_summary(summary).splitlines()[-1] == \
        "  continue with: bash 'fastbert repo/scripts/run.sh' --out runs/fastbert-2 --resume"


def test_stopped_at_once_names_the_command_only_when_a_checkpoint_exists(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C (KeyboardInterrupt out of the trainer): exit 130, and the resume command if the
    run has a checkpoint to resume."""
    import fastbert.trainer

    def interrupted(args, given=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(fastbert.trainer, "pretrain", interrupted)
    monkeypatch.delenv("FASTBERT_RUN_SCRIPT", raising=False)
    assert main(["pretrain", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert main(["pretrain", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"continue with: {command.resume_command(str(tmp_path))}") and "keeping the last checkpoint" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a Linux pseudo-terminal")
def test_a_terminal_gets_the_progress_bar(tmp_path, common):
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns
    chunks = []

    def read():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal side was closed
                return
            if not chunk:
                return
            chunks.append(chunk)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    r = subprocess.run([sys.executable, "-m", "fastbert", "pretrain", "--out", str(tmp_path / "run"), *common,
                        "--steps", "4", "--log-every", "2"], stderr=terminal, cwd=ROOT, timeout=600)
    os.close(terminal)
    reader.join(timeout=10)
    os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert r.returncode == 0, shown
    assert "\rpretrain: 100%" in shown and "4/4" in shown and "pretrain step" not in shown
