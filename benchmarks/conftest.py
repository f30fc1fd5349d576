"""Shared set-up of the benchmarks.

    pytest benchmarks                                   # everything (GPU benches skip without CUDA)
    pytest benchmarks/bench_layernorm.py --benchmark-json out.json

A GPU benchmark module sets `pytestmark = pytest.mark.gpu` (skipped, with a reason, where no
CUDA GPU is visible) and uses:

  copy_gbps      session fixture: device-to-device copy bandwidth in GB/s (bytes read + written),
                 measured once per session on a 1 GiB buffer with CUDA events: the roofline.
  bench_record   fixture: bench_record(bench, case, ms, *, gbps=None, tflops=None, baseline,
                 baseline_ms, impl="fastbert", device="cuda", **extra) collects one result
                 (device="cpu" for a CPU benchmark: its rows go to benchmarks/results/cpu-<cpu
                 model>.json, the CPU's name as "device"). At the end of the
                 session the results are merged into benchmarks/results/<device-slug>.json:
                 {"device", "torch", "commit", "date", "copy_gbps", "results": [...]}, where a row
                 measured now replaces the stored row of the same (bench, case, impl, baseline)
                 and every row carries its own torch/commit/date/copy_gbps. Nothing is written
                 when nothing was recorded.
  benchmarks/_util.py
                 make_pool(make, bytes_per_item): input sets totalling > 2x L2, so each timed
                 call reads cold data; run_benchmark(benchmark, fn, pool): pytest-benchmark
                 pedantic timing (fn synchronizes inside, warm-up rounds, inputs rotated from
                 the pool), returns the median ms; measure(fn, pool): the same without the
                 fixture, for the baseline; report(...): prints a case against the bar.
"""
import datetime
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
_records = []
_session = {}


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@pytest.fixture(scope="session")
def copy_gbps():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    from _util import copy_bandwidth_gbps  # benchmarks/ is on sys.path (rootdir-relative conftest)

    value = copy_bandwidth_gbps()
    _session["copy_gbps"] = value
    print(f"\ndevice-to-device copy: {value:.0f} GB/s")
    return value


@pytest.fixture
def bench_record():
    def record(bench, case, ms, *, gbps=None, tflops=None, baseline, baseline_ms, impl="fastbert", device="cuda",
               **extra):
        row = {"bench": bench, "case": case, "impl": impl, "ms": ms, "_device": device}
        if gbps is not None:
            row["gbps"] = gbps
        if tflops is not None:
            row["tflops"] = tflops
        row.update(baseline=baseline, baseline_ms=baseline_ms, speedup=baseline_ms / ms if ms else None)
        row.update(extra)
        _records.append(row)
        return row
    return record


def pytest_sessionfinish(session, exitstatus):
    from _util import cpu_name, device_slug, slug

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for kind in ("cuda", "cpu"):
        records = [{k: v for k, v in r.items() if k != "_device"} for r in _records if r["_device"] == kind]
        if not records:
            continue
        if kind == "cuda":
            meta = {"device": torch.cuda.get_device_name(0), "copy_gbps": _session.get("copy_gbps")}
            path = RESULTS_DIR / f"{device_slug()}.json"
        else:
            meta = {"device": f"{cpu_name()}, {os.cpu_count()} logical cores", "copy_gbps": None}
            path = RESULTS_DIR / f"cpu-{slug(cpu_name())}.json"
        meta.update(torch=torch.__version__, commit=_commit(), date=date)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        old = json.loads(path.read_text()).get("results", []) if path.exists() else []
        key = lambda r: (r["bench"], r["case"], r["impl"], r.get("baseline"))  # noqa: E731
        new = [{**r, "torch": meta["torch"], "commit": meta["commit"], "date": meta["date"],
                "copy_gbps": meta["copy_gbps"]} for r in records]
        fresh = {key(r) for r in new}
        merged = [r for r in old if key(r) not in fresh] + new
        path.write_text(json.dumps({**meta, "results": merged}, indent=2) + "\n")
        print(f"\nbenchmark results: {path}")
