"""scripts/run.sh, run from a copy of the repository's scripts with set-up stubbed out (running the
real set-up would reinstall the environment): a run never replaces an earlier one, and the resume
hint it leads to runs as printed."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "model_type": "bert"}


def make_repo(tmp_path, fastbert_script):
    """tmp_path/repo with scripts/run.sh, a set-up that does nothing, and .venv/bin/fastbert."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "run.sh"), repo / "scripts" / "run.sh")
    (repo / "scripts" / "setup_env.sh").write_text("exit 0\n")
    (repo / ".venv" / "bin").mkdir(parents=True)
    exe = repo / ".venv" / "bin" / "fastbert"
    exe.write_text(fastbert_script)
    exe.chmod(0o755)
    return repo


def test_run_sh_starts_each_default_run_in_a_new_directory(tmp_path):
    # a stand-in for fastbert that writes a run into --out and records how it was called
    repo = make_repo(tmp_path, """#!/usr/bin/env bash
echo "$*" >> calls.txt
while [ $# -gt 0 ]; do
  if [ "$1" = --out ]; then mkdir -p "$2" && echo trained > "$2/checkpoint.pt"; fi
  shift
done
""")

    def run(*args):
        r = subprocess.run(["bash", "scripts/run.sh", *args], cwd=repo, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return (repo / "calls.txt").read_text().splitlines()[-1]

    assert run() == "pretrain --out runs/fastbert"
    assert run() == "pretrain --out runs/fastbert-2"  # the first run is kept
    assert run("--steps", "5") == "pretrain --out runs/fastbert-3 --steps 5"
    assert (repo / "runs" / "fastbert" / "checkpoint.pt").read_text() == "trained\n"
    # what the user asks for goes through as it is
    assert run("--out", "runs/mine") == "pretrain --out runs/mine"
    assert run("--resume", "--steps", "9") == "pretrain --resume --steps 9"
    assert run("--overwrite") == "pretrain --overwrite"
    assert "--overwrite" not in "".join((repo / "calls.txt").read_text().splitlines()[:-1])


def test_run_sh_resume_hint_runs_as_printed(tmp_path):
    """Stop a run started through run.sh; the printed `continue with:` command, typed in the same
    shell (here: the folder above the repository), finishes it."""
    repo = make_repo(tmp_path, f"""#!/usr/bin/env bash
PYTHONPATH={ROOT} exec {sys.executable} -m fastbert "$@"
""")
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    env = {**os.environ, "FASTBERT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(["bash", "repo/scripts/run.sh", "--config", str(tmp_path / "config.json"), "--steps", "4",
                        "--stop-at-step", "2", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "1000",
                        "--dupe-factor", "1", "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    hint = re.search(r"continue with: (.*)", r.stderr).group(1)
    assert hint == "bash repo/scripts/run.sh --out runs/fastbert --resume"
    resumed = subprocess.run(hint, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "finished at step 4/4" in resumed.stderr
    assert [json.loads(line)["step"] for line in open(repo / "runs" / "fastbert" / "metrics.jsonl")][-1] == 4
