#!/usr/bin/env python
"""Kernels vs twins over a real run: `fastbert pretrain` twice on WikiText-2 (same seed, bf16), once
with the CUDA kernels (the padding-free path) and once with FASTBERT_KERNELS=0 (the padded path in
plain PyTorch), then both loss curves in one PNG, titled with the largest gap between the
smoothed curves. Needs a CUDA GPU.

    python scripts/compare_loss_curves.py --out-dir "$OUT" [--preset base] [--steps 300]

Writes into --out-dir: loss_curves.png, loss_curves.json (the curves, the gap, the settings) and
the two run directories (kernels/, twins/; their checkpoints are removed to keep the folder
small). With --noise-run, a third run (twins, seed + 1) shows the seed-to-seed gap the
kernels-vs-twins gap should be compared with.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"


def default_corpus():
    for name in ("wiki.train.tokens", "wiki.valid.tokens"):
        if (WIKITEXT / name).exists():
            return str(WIKITEXT / name)
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "runs/compare_loss_curves"),
                   help="where the PNG, the JSON and the runs go (default $OUT, else runs/compare_loss_curves)")
    p.add_argument("--corpus", default=default_corpus(), help="WikiText-2 file (default ../shared/data/wikitext-2)")
    p.add_argument("--preset", default="base", choices=["tiny", "mini", "small", "base", "large"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--smooth", type=int, default=10, help="moving-average window, in logged points (default 10)")
    p.add_argument("--noise-run", action="store_true", help="also run the twins with seed + 1, for scale")
    return p.parse_args(argv)


def run(a, out, kernels, seed):
    cmd = [sys.executable, "-m", "fastbert", "pretrain", "--corpus", a.corpus, "--preset", a.preset,
           "--precision", "bf16", "--device", "cuda", "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--seq-len", str(a.seq_len), "--lr", str(a.lr), "--warmup", str(a.warmup), "--vocab-size",
           str(a.vocab_size), "--seed", str(seed), "--log-every", str(a.log_every), "--eval-every", str(a.steps),
           "--save-every", str(a.steps), "--dupe-factor", "1", "--out", str(out), "--overwrite", "--no-progress"]
    env = {**os.environ, "FASTBERT_KERNELS": "1" if kernels else "0"}
    print(f"$ FASTBERT_KERNELS={env['FASTBERT_KERNELS']} {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def smooth(values, window):
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def max_gap(a, b, window):
    steps = sorted(set(s for s, _ in a) & set(s for s, _ in b))
    da, db = dict(a), dict(b)
    sa, sb = smooth([da[s] for s in steps], window), smooth([db[s] for s in steps], window)
    return max((abs(x - y) for x, y in zip(sa, sb)), default=float("nan")), steps, sa, sb


def main(argv=None):
    a = parse_args(argv)
    if a.corpus is None or not Path(a.corpus).exists():
        sys.exit(f"no WikiText-2 file at {WIKITEXT} (or --corpus {a.corpus}); pass --corpus")
    import torch

    if not torch.cuda.is_available():
        sys.exit("compare_loss_curves needs a CUDA GPU (the kernels run only there)")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {"kernels": run(a, out / "kernels", True, a.seed), "twins": run(a, out / "twins", False, a.seed)}
    if a.noise_run:
        curves["twins-seed+1"] = run(a, out / "twins_seed1", False, a.seed + 1)
    gap, steps, sk, st = max_gap(curves["kernels"], curves["twins"], a.smooth)
    noise = max_gap(curves["twins"], curves["twins-seed+1"], a.smooth)[0] if a.noise_run else None

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = {"kernels": "tab:blue", "twins": "tab:orange", "twins-seed+1": "tab:gray"}
    for name, curve in curves.items():
        xs, ys = [s for s, _ in curve], [l for _, l in curve]
        ax.plot(xs, ys, color=colors[name], alpha=0.25, linewidth=1)
        label = {"kernels": "fastbert kernels (padding-free)", "twins": "FASTBERT_KERNELS=0 (twins, padded)",
                 "twins-seed+1": f"twins, seed {a.seed + 1} (noise scale)"}[name]
        ax.plot(xs, smooth(ys, a.smooth), color=colors[name], linewidth=2, label=label)
    title = f"{a.preset}, bf16, {a.steps} steps, batch {a.batch_size} x {a.seq_len}: max |smoothed gap| {gap:.4f}"
    if noise is not None:
        title += f" (seed-to-seed {noise:.4f})"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MLM + NSP)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    summary = {"max_smoothed_gap": gap, "seed_to_seed_gap": noise, "smooth_window": a.smooth,
               "settings": {k: v for k, v in vars(a).items() if k != "out_dir"},
               "device": torch.cuda.get_device_name(0), "curves": curves}
    (out / "loss_curves.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"max |smoothed kernels - twins| = {gap:.4f}" + (f", seed-to-seed {noise:.4f}" if noise is not None else "")
          + f"; {out / 'loss_curves.png'}")


if __name__ == "__main__":
    main()
