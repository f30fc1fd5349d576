#!/usr/bin/env bash
# On a GPU machine, from the repo root: build, `fastbert info` / `fastbert check`, the GPU tests,
# compute-sanitizer (memcheck, racecheck) over every kernel once, and the benchmarks.
# Everything lands in $OUT (default ./gpu_check_out), at most 8 files:
#   build.log  fastbert.log  tests.log  tests.xml  sanitizer.log  bench.log  bench.json  <device>.json
# Every step runs even if an earlier one failed; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
failed=()
step() {  # step NAME LOG COMMAND...: run, append output to LOG, remember failure
  local name="$1" log="$2"; shift 2
  echo "=== $name: $*" | tee -a "$log"
  "$@" >>"$log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc" | tee -a "$log"
  [ $rc -eq 0 ] || failed+=("$name")
}
marker=$(mktemp)

step build "$OUT/build.log" env MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation -e .
step info "$OUT/fastbert.log" "$PY" -m fastbert info
step check "$OUT/fastbert.log" "$PY" -m fastbert check
step tests "$OUT/tests.log" "$PY" -m pytest -m gpu tests -q -rs --junitxml="$OUT/tests.xml"

SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
if [ -x "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    step "sanitizer-$tool" "$OUT/sanitizer.log" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      "$PY" scripts/sanitize_kernels.py
  done
else
  echo "compute-sanitizer not found: skipped" | tee -a "$OUT/sanitizer.log"
fi

step bench "$OUT/bench.log" "$PY" -m pytest benchmarks -q -s --benchmark-json "$OUT/bench.json"
for f in benchmarks/results/*.json; do  # the result files this run wrote
  [ -e "$f" ] && [ "$f" -nt "$marker" ] && cp "$f" "$OUT/"
done
rm -f "$marker"

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "gpu_check: all steps passed (logs in $OUT)"
