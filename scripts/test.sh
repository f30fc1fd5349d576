#!/usr/bin/env bash
# The test command: sets up .venv (torch, fastbert, test dependencies) and runs every test.
# GPU tests skip with a reason where no GPU is visible. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
.venv/bin/python -m fastbert info
if [ "${FASTBERT_FORCE_CUDA:-0}" = "1" ]; then
  # a forced CUDA build must really hold the kernels
  .venv/bin/python -c "
from fastbert import _backend
assert _backend.extension_loaded(), f'fastbert._C did not load: {_backend.extension_error()}'
assert _backend.cuda_ops(), 'fastbert._C was built without CUDA kernels'"
fi
exec .venv/bin/python -m pytest tests -q "$@"
