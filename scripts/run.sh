#!/usr/bin/env bash
# The main job: sets up .venv (torch, fastbert) and runs `fastbert pretrain` — by default a tiny
# BERT on the embedded corpus, on the GPU if one is visible. Arguments go to `fastbert pretrain`
# (see `bash scripts/run.sh --help`); outputs land in runs/fastbert unless --out says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--out runs/fastbert --overwrite)  # the demo run replaces the previous demo
fi
exec .venv/bin/fastbert pretrain "${args[@]}"
