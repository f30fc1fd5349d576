#!/usr/bin/env bash
# Creates .venv in the repository with torch, fastbert (built in place, kernels included when
# nvcc is found) and, with --test, the test dependencies. Safe to run again.
#   FASTBERT_TORCH   the torch requirement (default torch==2.14.1)
#   PYTHON           the interpreter that creates the venv (default python3)
# The build honours FASTBERT_FORCE_CUDA, FASTBERT_SKIP_CUDA, TORCH_CUDA_ARCH_LIST and MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | sed '/^WARNING: Location/d'; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing ${FASTBERT_TORCH:-torch==2.14.1} (several GB, once)" >&2
  pip install "${FASTBERT_TORCH:-torch==2.14.1}"
fi
pip install -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  pip install -r requirements-test.txt
fi
# Rebuild only when the sources or the build settings changed since the last build.
stamp=$( (.venv/bin/python -c "import torch; print(torch.__version__)"; cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat;
          env | { grep -E '^(FASTBERT_FORCE_CUDA|FASTBERT_SKIP_CUDA|TORCH_CUDA_ARCH_LIST|CUDA_HOME)=' || true; } | sort) | sha256sum)
if [ -f .venv/fastbert-build.stamp ] && [ "$(cat .venv/fastbert-build.stamp)" = "$stamp" ] \
   && .venv/bin/python -c "import fastbert" 2>/dev/null; then
  echo "setup: fastbert is built and up to date" >&2
  exit 0
fi
echo "setup: building fastbert (pip install --no-build-isolation -e .; log in .venv/fastbert-build.log)" >&2
rm -f .venv/fastbert-build.stamp
if ! pip install --no-build-isolation -e . > .venv/fastbert-build.log; then
  cat .venv/fastbert-build.log >&2
  echo "setup: building fastbert failed (log above)" >&2
  exit 1
fi
echo "$stamp" > .venv/fastbert-build.stamp
