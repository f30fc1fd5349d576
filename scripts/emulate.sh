#!/usr/bin/env bash
# The CUDA kernels on the CPU (README: "How the kernels are tested without a GPU"): builds the
# kernel emulator from csrc/ into build/emu/ (a normal and an AddressSanitizer build; only what
# changed is recompiled), then runs every emulated kernel test (marked `emulator`) under two thread orders (forward,
# warp) with the deliberately broken kernels, and again on the AddressSanitizer build under a
# third order (random, seeded per test). Extra arguments go to both pytest runs.
# Needs .venv with fastbert._C built (scripts/setup_env.sh); installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "emulate.sh: no .venv here; run 'bash scripts/setup_env.sh --test' first" >&2
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "
from fastbert import _backend
assert _backend.has_op('gather_rows'), ('emulate.sh: fastbert._C did not load, so the ops the emulator serves do '
                                        f'not exist ({_backend.extension_error()}); run scripts/setup_env.sh')"
"$PY" -m fastbert.ops._emulator_build default asan

echo "== emulated kernels, orders forward and warp, and the broken kernels" >&2
# every test marked `emulator` (tests/emulation.py's needs_emulator), wherever it lives
FASTBERT_EMULATE_ORDERS=forward,warp "$PY" -m pytest -q -p no:cacheprovider -rs -m emulator tests "$@"

echo "== emulated kernels under AddressSanitizer, order random" >&2
# python is not built with ASan: load libasan first, and libstdc++ with it (ASan's __cxa_throw
# interceptor needs the real one when torch throws). Any report aborts the run with file:line;
# --capture=sys leaves file descriptor 2 alone, so the report is not lost with the process.
LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
FASTBERT_EMULATE_LIB="$PWD/build/emu/asan/libfastbert_emu.so" FASTBERT_EMULATE_ORDERS=random \
  "$PY" -m pytest -q -p no:cacheprovider -rs --capture=sys -m emulator tests \
  --ignore=tests/test_emulator_catches_bugs.py "$@"  # (that file builds and runs its own broken variants)
