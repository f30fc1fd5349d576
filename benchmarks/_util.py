"""Helpers shared by the GPU benchmarks (see benchmarks/conftest.py for how to use them)."""
import itertools
import math
import re
import statistics
import time

import torch

ROUNDS, WARMUP = 50, 5


def l2_bytes() -> int:
    """The GPU's L2 cache size (H100: 50 MB), or 50 MB where torch does not say."""
    props = torch.cuda.get_device_properties(0)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def make_pool(make, bytes_per_item: int, *, max_items: int = 64):
    """Enough input sets, each from make(), that cycling through them reads cold data every call:
    the pool totals at least twice the L2 (and at least 2 sets)."""
    n = max(2, math.ceil(2 * l2_bytes() / max(bytes_per_item, 1)) + 1)
    return [make() for _ in range(min(n, max_items))]


def _step(fn, pool):
    it = itertools.cycle(pool)

    def step():
        out = fn(*next(it))
        torch.cuda.synchronize()
        return out
    return step


def run_benchmark(benchmark, fn, pool, *, rounds=ROUNDS, warmup=WARMUP) -> float:
    """Times fn(*inputs) with pytest-benchmark (inputs rotated from the pool, synchronized inside
    each call, warm-up rounds first); returns the median in ms."""
    benchmark.pedantic(_step(fn, pool), rounds=rounds, iterations=1, warmup_rounds=warmup)
    return benchmark.stats.stats.median * 1e3


def measure(fn, pool, *, rounds=ROUNDS, warmup=WARMUP) -> float:
    """The same measurement as run_benchmark without the fixture (for baselines): median ms."""
    step = _step(fn, pool)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbps(nbytes: int = 2**30, rounds: int = 20) -> float:
    """Device-to-device copy bandwidth (bytes read + written) of a buffer far larger than L2,
    timed with CUDA events; median over rounds."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e9


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms / 1e3) / 1e9


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_slug() -> str:
    return slug(torch.cuda.get_device_name(0))


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or platform's answer elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown CPU"


def report(bench, case, ms, nbytes, baseline_ms, copy_gbps) -> dict:
    """Prints one case against the issue's bar and returns the fields for bench_record."""
    rate, base_rate = gbps(nbytes, ms), gbps(nbytes, baseline_ms)
    frac = rate / copy_gbps
    speedup = baseline_ms / ms
    verdict = "meets" if frac >= 0.8 and speedup > 1 else "misses"
    print(f"\n{bench} {case}: fastbert {ms:.3f} ms {rate:.0f} GB/s ({100 * frac:.0f}% of copy {copy_gbps:.0f} GB/s), "
          f"torch {baseline_ms:.3f} ms {base_rate:.0f} GB/s, speedup x{speedup:.2f}; "
          f"bar (>= 80% copy bandwidth and faster than torch): {verdict}")
    return dict(gbps=rate, baseline_gbps=base_rate, copy_fraction=frac, bytes=nbytes)
