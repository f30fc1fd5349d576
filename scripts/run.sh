#!/usr/bin/env bash
# The main job: sets up .venv (torch, fastbert) and runs `fastbert pretrain` — by default a tiny
# BERT on the embedded corpus, on the GPU if one is visible. Arguments go to `fastbert pretrain`
# (see `bash scripts/run.sh --help`). Without --out (or --resume/--overwrite) each run gets a new
# directory, runs/fastbert, runs/fastbert-2, ...: a run never replaces an earlier one.
set -euo pipefail
export FASTBERT_RUN_SCRIPT="$0"  # so that the resume hint reads `bash <this script> --out ... --resume`
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
fresh=1
for arg in "$@"; do
  case "$arg" in --out | --out=* | --resume | --overwrite | -h | --help) fresh=0 ;; esac
done
if [ "$fresh" = 1 ]; then
  out=runs/fastbert
  n=1
  while [ -e "$out" ]; do
    n=$((n + 1))
    out=runs/fastbert-$n
  done
  set -- --out "$out" "$@"
fi
exec .venv/bin/fastbert pretrain "$@"
