"""MLM + NSP pretraining: the loop behind `fastbert pretrain`.

The order of batches is a pure function of (seed, global batch index): batch g of an epoch of
E batches takes slice g % E of a permutation seeded by (seed, g // E), and its masks are seeded
by (seed, epoch, instance indices). With the model, optimizer, scheduler, scaler and RNG states
in the checkpoint, a resumed run continues exactly where the straight run would be.
"""
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastbert.config import BertConfig, preset
from fastbert.interrupt import StopRequest, StopVote
from fastbert.model import BertForPreTraining, Packing

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
PLOT = "training.png"
MODEL_DIR = "model"
ARGS = "args.json"
RUN_FILES = (CHECKPOINT, METRICS, PLOT, MODEL_DIR, ARGS)


class TrainingError(Exception):
    """The run cannot go on (bad option, bad state, non-finite loss): one line for the user."""


@dataclass
class TrainArgs:
    corpus: list = field(default_factory=list)  # paths; empty: the embedded corpus
    out: str = "runs/fastbert"
    preset: str = "tiny"
    config: str = None  # a config.json (overrides preset)
    init: str = None  # a pretrained model directory to continue from (overrides both)
    tokenizer: str = None
    vocab_size: int = 8000
    seq_len: int = 64  # the default job fits ~3 minutes on 2 CPU cores (README, Speed); BERT's phase 1 is 128
    batch_size: int = 32  # sequences per micro-batch per process
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 100  # steps of linear warmup; then linear decay to 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    eval_fraction: float = 0.05
    eval_batches: int = 20
    dupe_factor: int = 5
    whole_word_mask: bool = False
    phase2_seq_len: int = None  # two-phase schedule: the last phase2_fraction of steps at this length
    phase2_fraction: float = 0.1
    num_workers: int = 0
    cache_dir: str = None
    resume: bool = False
    overwrite: bool = False
    stop_at_step: int = None  # stop (with a checkpoint) after this step, as an interruption would
    progress: bool = True

    # what a resumed run may change; everything else comes from the checkpoint
    RESUMABLE = ("steps", "log_every", "eval_every", "save_every", "stop_at_step", "num_workers",
                 "progress", "device", "out", "resume", "overwrite", "cache_dir")
    # per invocation: never taken from the checkpoint
    PER_RUN = ("stop_at_step", "resume", "overwrite", "out", "progress", "num_workers", "device", "cache_dir")


# ----------------------------------------------------------------------------- set-up


def _distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name, local_rank=0):
    if name not in ("auto", "cpu", "cuda"):
        raise TrainingError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else "cpu")


def resolve_precision(name, device):
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise TrainingError(f"--precision must be fp32, bf16 or fp16, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise TrainingError("--precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return name


def flag(name):
    """The command-line flag that sets TrainArgs field `name`."""
    return "--no-progress" if name == "progress" else "--" + name.replace("_", "-")


def check_args(a):
    positive = ("batch_size", "grad_accum", "steps", "log_every", "eval_every", "save_every", "eval_batches",
                "dupe_factor", "vocab_size")
    for name in positive:
        value = getattr(a, name)
        if not isinstance(value, int) or value < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if a.warmup < 0 or a.num_workers < 0:
        raise TrainingError("--warmup and --num-workers must be >= 0")
    if not a.lr > 0:
        raise TrainingError(f"--lr must be positive, got {a.lr}")
    if not 0 < a.eval_fraction < 0.5:
        raise TrainingError(f"--eval-fraction must be in (0, 0.5), got {a.eval_fraction}")
    if a.stop_at_step is not None and not 0 < a.stop_at_step <= a.steps:
        raise TrainingError(f"--stop-at-step must be in [1, --steps={a.steps}], got {a.stop_at_step}")
    if a.phase2_seq_len is not None and not 0 < a.phase2_fraction < 1:
        raise TrainingError(f"--phase2-fraction must be in (0, 1), got {a.phase2_fraction}")


def check_out_dir(a):
    """Refuse to mix two runs in one --out; nothing is written before this passes."""
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file; expected a directory for the run's outputs")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if a.resume:
        if not (out / CHECKPOINT).is_file():
            raise TrainingError(f"--resume: no checkpoint at {out / CHECKPOINT}; start a new run without --resume")
    elif present and not a.overwrite:
        raise TrainingError(f"--out {out} already holds a run ({', '.join(present)}); pass --resume to continue "
                            "it, --overwrite to replace it, or choose another --out")


def base_config(a):
    """The model's config from --init, --config or --preset (vocab_size is set from the tokenizer)."""
    if a.init:
        return BertConfig.from_pretrained(a.init)
    if a.config:
        return BertConfig.from_json_file(a.config)
    return preset(a.preset)


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and LayerNorm parameters (as BERT)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup, total):
    def f(step):  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


# ----------------------------------------------------------------------------- data


class Batches(torch.utils.data.Dataset):
    """Global batch g -> this process's collated micro-batch. A pure function of g, so a resumed
    run and DataLoader workers see exactly the batches of a straight run."""

    def __init__(self, instances, indices, collator, batch_size, seed, world=1, rank=0):
        self.instances, self.indices, self.collator = instances, np.asarray(indices), collator
        self.per_global = batch_size * world
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.per_epoch = len(self.indices) // self.per_global
        if self.per_epoch < 1:
            raise TrainingError(f"--batch-size {batch_size} x {world} process(es) needs {self.per_global} training "
                                f"sequences but the corpus gave {len(self.indices)}; lower --batch-size or add text")

    def __len__(self):
        return 1 << 62

    def order(self, epoch):
        if getattr(self, "_order_epoch", None) != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
            self._order_epoch = epoch
        return self._order

    def __getitem__(self, g):
        epoch, within = divmod(int(g), self.per_epoch)
        order = self.order(epoch)
        start = within * self.per_global + self.rank * self.batch_size
        picked = self.indices[order[start:start + self.batch_size]]
        self.collator.set_epoch(epoch)
        return self.collator([self.instances[i] for i in picked])


class _From(torch.utils.data.Sampler):
    def __init__(self, start):
        self.start = start

    def __iter__(self):
        g = self.start
        while True:
            yield g
            g += 1


def batch_stream(batches, start, num_workers):
    # its own generator: starting a DataLoader draws a base seed, which must not move the global
    # RNG (dropout), or a resumed run would diverge from a straight one
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=_From(start), num_workers=num_workers,
                                         collate_fn=_identity, generator=torch.Generator().manual_seed(start),
                                         worker_init_fn=_ignore_stop_signals if num_workers else None)
    return iter(loader)


def _ignore_stop_signals(worker_id):
    # a terminal's Ctrl-C reaches DataLoader workers too: they keep serving batches, and the main
    # process decides when to stop (at a step boundary) and ends them
    for s in StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _identity(batch):
    return batch


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, args: TrainArgs, given=None):
        """`given`: names of the fields the user set (the rest are defaults); with --resume the
        checkpoint's settings win over defaults, and settings that cannot change are refused."""
        self.a = args
        self.given = set(given) if given is not None else {f.name for f in dataclasses.fields(TrainArgs)}
        self.world, self.rank, self.local_rank = _distributed()
        self.main = self.rank == 0
        self.out = Path(args.out)
        self.device = resolve_device(args.device, self.local_rank)
        self.precision = resolve_precision(args.precision, self.device)
        check_args(args)
        check_out_dir(args)
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(backend)
        self.checkpoint = self._read_checkpoint() if args.resume else None
        self._prepare_data()
        self._build_model()
        self.step = 0
        self.records = []
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        else:
            self._seed_rngs()

    # ------------------------------------------------------------------ set-up pieces
    def _read_checkpoint(self):
        path = self.out / CHECKPOINT
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise TrainingError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]})") from None
        if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
            raise TrainingError(f"{path} is not a fastbert checkpoint (no model/args entries)")
        saved = ckpt["args"]
        changed = sorted(k for k in self.given - set(TrainArgs.RESUMABLE)
                         if k in saved and saved[k] != getattr(self.a, k))
        if changed:
            raise TrainingError(f"--resume continues the run as it was set up; {', '.join(map(flag, changed))} "
                                f"cannot change (only {', '.join(flag(k) for k in TrainArgs.RESUMABLE if k not in ('resume', 'out'))} can)")
        keep = {k for k in TrainArgs.PER_RUN} | (self.given & set(TrainArgs.RESUMABLE))
        self.a = dataclasses.replace(self.a, **{k: v for k, v in saved.items()
                                                if k not in keep and k in TrainArgs.__dataclass_fields__})
        check_args(self.a)
        return ckpt

    def _prepare_data(self):
        from fastbert.data import MaskingCollator, prepare_pretraining_data, split_heldout
        a = self.a
        tokenizer_path = a.tokenizer or a.init
        if self.checkpoint is not None:
            tokenizer_path = str(self.out / MODEL_DIR)
        self.config = base_config(a)
        lengths = [a.seq_len] + ([a.phase2_seq_len] if a.phase2_seq_len else [])

        def prepare(seq_len):
            return prepare_pretraining_data(a.corpus or None, tokenizer_path=tokenizer_path, vocab_size=a.vocab_size,
                                            seq_len=seq_len, seed=a.seed, cache_dir=a.cache_dir,
                                            dupe_factor=a.dupe_factor,
                                            max_position_embeddings=self.config.max_position_embeddings,
                                            progress=self.main and a.progress and _is_terminal(sys.stderr))

        if self.world > 1 and not self.main:  # let rank 0 fill the caches first
            torch.distributed.barrier()
        phases = [prepare(n) for n in lengths]
        if self.world > 1 and self.main:
            torch.distributed.barrier()
        self.tokenizer, _, self.corpus = phases[0]
        collator = MaskingCollator(self.tokenizer, whole_word_mask=a.whole_word_mask, seed=a.seed)
        eval_collator = MaskingCollator(self.tokenizer, whole_word_mask=a.whole_word_mask, seed=a.seed + 1)
        self.phases, self.eval_sets = [], []
        for (_, instances, _), seq_len in zip(phases, lengths):
            n_eval = max(1, min(int(len(instances) * a.eval_fraction), a.eval_batches * a.batch_size))
            train_idx, eval_idx = split_heldout(instances, n_eval, seed=[a.seed, 7])
            self.phases.append((seq_len, Batches(instances, train_idx, collator, a.batch_size, a.seed,
                                                 self.world, self.rank)))
            self.eval_sets.append([eval_collator([instances[i] for i in eval_idx[s:s + a.batch_size]])
                                   for s in range(0, len(eval_idx), a.batch_size)])
        self.num_instances = sum(len(p[1].indices) for p in self.phases)

    def _build_model(self):
        a = self.a
        if self.config.vocab_size != self.tokenizer.vocab_size:
            if a.init:
                raise TrainingError(f"--init {a.init} has vocab_size {self.config.vocab_size} but the tokenizer has "
                                    f"{self.tokenizer.vocab_size}; use the model's own tokenizer")
            self.config.vocab_size = self.tokenizer.vocab_size
        torch.manual_seed(a.seed)
        if a.init and self.checkpoint is None:
            model = BertForPreTraining.from_pretrained(a.init, config=self.config)
        else:
            model = BertForPreTraining(self.config)
        self.model = model.to(self.device)
        self.model.check_inputs = False  # the pipeline builds valid batches; spare the host syncs
        self.ddp = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # fused: one kernel over all parameters, on CUDA and on the CPU (the per-tensor loop was
        # 14% of a tiny-preset CPU step)
        fused = {"fused": True} if self.device.type in ("cuda", "cpu") else {}
        self.optimizer = torch.optim.AdamW(param_groups(self.model, a.weight_decay), lr=a.lr, betas=(0.9, 0.999),
                                           eps=1e-6, **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(a.warmup, a.steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    def _seed_rngs(self):
        seed = self.a.seed + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _rng_state(self):
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state):
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _restore(self, ckpt):
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise TrainingError(f"{self.out / CHECKPOINT} does not match this run ({' '.join(str(e).split())[:200]})") from None
        self.scheduler.lr_lambdas[0] = lr_lambda(self.a.warmup, self.a.steps)  # --steps may have grown
        self.step = int(ckpt["step"])
        rngs = ckpt["rng"]
        self._set_rng_state(rngs[self.rank] if isinstance(rngs, list) and self.rank < len(rngs) else rngs[0])
        windows = ckpt.get("window")  # the metrics accumulated since the last log line, per process
        self._saved_window = windows[self.rank] if windows and self.rank < len(windows) else None
        metrics = self.out / METRICS
        if metrics.exists():
            self.records = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
            self.records = [r for r in self.records if r["step"] <= self.step]
            self._write_metrics()
        if self.step >= self.a.steps:
            raise TrainingError(f"the checkpoint is at step {self.step} of --steps {self.a.steps}: nothing to do; "
                                "pass a larger --steps to train further")

    # ------------------------------------------------------------------ outputs
    def _write_metrics(self):
        if not self.main:
            return
        tmp = self.out / (METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.out / METRICS)

    def _log(self, record):
        if not self.main:
            return
        self.records.append(record)
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if getattr(self, "_lines", False):
            print(self._log_line(record), file=sys.stderr, flush=True)
        if "eval_mlm_loss" not in record and record["step"] < self.a.steps:
            return  # the picture is redrawn with each evaluation and at the end (~1 s of matplotlib each)
        self._plot()

    def _plot(self):
        """Draw training.png from the records so far; returns its path, or None when nothing is logged."""
        if not self.main or not self.records:
            return None
        if getattr(self, "_plotted", None) != len(self.records):  # else the picture is up to date
            from fastbert.plotting import plot_training
            plot_training(self.records, self.out / PLOT, title=f"fastbert pretrain: {self.out.name}")
            self._plotted = len(self.records)
        return self.out / PLOT

    def _log_line(self, r):
        """A metrics record as one plain line, for logs where a progress bar would be carriage returns."""
        parts = []
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4f} (MLM {r['mlm_loss']:.4f}, NSP {r['nsp_loss']:.4f}), "
                         f"MLM accuracy {r['mlm_accuracy']:.1%}, lr {r['lr']:.2e}, {r['tokens_per_s']:,.0f} tokens/s")
        if "eval_mlm_loss" in r:
            parts.append(f"held-out MLM loss {r['eval_mlm_loss']:.4f}, MLM accuracy {r['eval_mlm_accuracy']:.1%}, "
                         f"NSP accuracy {r['eval_nsp_accuracy']:.1%}")
        return f"pretrain step {r['step']}/{self.a.steps}: " + "; ".join(parts)

    def save(self):
        """The resumable checkpoint and model/ (transformers' format + tokenizer), at a step boundary.
        A second Ctrl-C waits for the save to end, so that no file is left half written."""
        stop = getattr(self, "_stop", None)
        with stop.deferred() if stop is not None else _null():
            self._save()

    def _save(self):
        window = getattr(self, "_window", None)
        mine = (self._rng_state(), window and {"sums": window["sums"].cpu(), "tokens": window["tokens"],
                                               "steps": window["steps"], "seconds": time.perf_counter() - window["t0"]})
        per_rank = [mine]
        if self.world > 1:
            per_rank = [None] * self.world
            torch.distributed.all_gather_object(per_rank, mine)
        if not self.main:
            return
        rngs, windows = [r for r, _ in per_rank], [w for _, w in per_rank]
        model_dir = self.out / MODEL_DIR
        self.model.save_pretrained(model_dir)
        self.tokenizer.save(model_dir)
        ckpt = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "rng": rngs, "window": windows, "args": dataclasses.asdict(self.a), "config": self.config.to_dict(),
                "data_position": {"global_batch": self.step * self.a.grad_accum}}
        tmp = self.out / (CHECKPOINT + ".tmp")
        try:
            torch.save(ckpt, tmp)
            os.replace(tmp, self.out / CHECKPOINT)
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the loop
    def _phase_at(self, step):
        """(seq_len, batches) for optimizer step `step` (0-based): phase 2, if any, takes the last
        phase2_fraction of the steps."""
        a = self.a
        switch = int(round(a.steps * (1 - a.phase2_fraction)))
        return self.phases[1] if len(self.phases) > 1 and step >= switch else self.phases[0]

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _to_device(self, batch):
        """The batch on the device, plus its `packing` (where the real tokens are), built from the CPU
        mask so the padding-free path needs no host sync to find them."""
        packing = Packing.from_mask(batch["attention_mask"]).to(self.device, non_blocking=True)
        return {**{k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, "packing": packing}

    @torch.no_grad()
    def evaluate(self):
        self.model.eval()
        # mlm loss*n, mlm right, n, nsp right, seqs, nsp loss*seqs, NotNext labels
        sums = torch.zeros(7, dtype=torch.float64, device=self.device)
        for seq_len, eval_batches in zip([p[0] for p in self.phases], self.eval_sets):
            for batch in eval_batches:
                batch = self._to_device(batch)
                with self._autocast():
                    out = self.model(**batch)
                n = batch["masked_positions"].numel()
                labels = batch["labels"].reshape(-1)[batch["masked_positions"]]
                nsp = batch["next_sentence_label"]
                sums += torch.stack([out.mlm_loss.double() * n, (out.prediction_logits.argmax(-1) == labels).sum().double(),
                                     torch.tensor(n, dtype=torch.float64, device=self.device),
                                     (out.seq_relationship_logits.argmax(-1) == nsp).sum().double(),
                                     torch.tensor(len(nsp), dtype=torch.float64, device=self.device),
                                     out.nsp_loss.double() * len(nsp), nsp.sum().double()])
        self.model.train()
        s = sums.tolist()
        seqs = max(s[4], 1)
        # eval_nsp_majority: the NSP accuracy of always answering the commoner label of these pairs
        return {"eval_mlm_loss": s[0] / max(s[2], 1), "eval_mlm_accuracy": s[1] / max(s[2], 1),
                "eval_nsp_loss": s[5] / seqs, "eval_nsp_accuracy": s[3] / seqs,
                "eval_nsp_majority": max(s[6], s[4] - s[6]) / seqs}

    def train(self):
        """Train to --steps (or --stop-at-step). Ctrl-C or SIGTERM stops at the next step boundary with a
        checkpoint, so that --resume continues bit for bit; a second one stops at once."""
        a = self.a
        self.out.mkdir(parents=True, exist_ok=True)
        if self.main and not a.resume:
            for name in (METRICS, PLOT):  # --overwrite: the old run's curves go
                (self.out / name).unlink(missing_ok=True)
            (self.out / ARGS).write_text(json.dumps(dataclasses.asdict(a), indent=2) + "\n")
        end = a.stop_at_step or a.steps
        bar = None
        self._lines = self.main and a.progress and not _is_terminal(sys.stderr)  # plain lines, not a bar
        if self.main and a.progress and not self._lines:
            from tqdm.auto import tqdm
            bar = tqdm(total=a.steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        self.model.train()
        stream_key, stream = None, None
        window = {"sums": torch.zeros(7, dtype=torch.float64, device=self.device), "tokens": 0, "steps": 0,
                  "t0": time.perf_counter()}
        saved = getattr(self, "_saved_window", None)
        if saved and saved["steps"]:  # resumed between two log lines: the next line covers the same steps
            window.update(sums=saved["sums"].to(self.device), tokens=saved["tokens"], steps=saved["steps"],
                          t0=time.perf_counter() - saved["seconds"])
        self._window = window
        start_time, start_step = time.perf_counter(), self.step
        last_eval, saved_at = None, None
        when = "this step" if self.world == 1 else "the next step"  # several processes: StopVote's one step late
        self._stop = StopRequest(f"\nfastbert pretrain: stopping after {when} with a checkpoint (press Ctrl-C "
                                 "again to stop at once, keeping the last checkpoint)\n" if self.main else None)
        pending, step_loss = None, float("nan")  # (step, loss tensor) of the step whose loss is not read yet
        self._vote = StopVote(self.device) if self.world > 1 else None
        try:
            self._stop.install()
            while self.step < end and not self._stop_agreed():
                seq_len, batches = self._phase_at(self.step)
                first = self.step * a.grad_accum  # the global batch this step starts at
                if stream_key != (seq_len, first):  # a new phase, or the start
                    stream = batch_stream(batches, first, a.num_workers)
                loss = self._train_step(stream, window)  # queued, not waited for
                stream_key = (seq_len, first + a.grad_accum)
                self.step += 1
                if pending is not None:  # the previous step's loss: read while the device runs this one
                    step_loss = self._checked_loss(*pending)
                pending = (self.step, loss)
                last = self.step == a.steps  # (stopping early at --stop-at-step only saves)
                if (self.step % a.log_every == 0 or self.step % a.eval_every == 0 or self.step % a.save_every == 0
                        or last or self.step == end):  # these wait for the device anyway; nothing NaN is logged or saved
                    step_loss, pending = self._checked_loss(*pending), None
                record = None
                if self.step % a.log_every == 0 or last:
                    record = self._window_record(window, seq_len)
                if self.step % a.eval_every == 0 or last:
                    last_eval = self.evaluate()
                    record = {**(record or {"step": self.step}), **last_eval}
                if record is not None:
                    self._log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{window.get('last_tps', 0):,.0f}")
                if self.step % a.save_every == 0 or self.step == end:
                    self.save()
                    saved_at = self.step
            interrupted = self.step < end
            if self._vote is not None and not interrupted:
                self._vote.finish()  # the last boundary's vote, launched by every process
            if interrupted and saved_at != self.step:
                if pending is not None:  # never save what a non-finite step wrote
                    self._checked_loss(*pending)
                self.save()
            plot = self._plot()  # also when stopped before an evaluation: the curves logged so far
        except TrainingError:
            self._plot()
            raise
        finally:
            self._stop.uninstall()
            if bar is not None:
                bar.close()
            self._stop = self._window = self._vote = None
        return self._summary(start_time, start_step, last_eval, interrupted, plot)

    def _stop_agreed(self):
        """Whether to stop at this step boundary: a signal reached this process. With several processes,
        whether one reached any of them by the previous boundary (StopVote: no host wait for the others
        inside a step); all stop at the same boundary, one step after the signal's."""
        if self._vote is None:
            return self._stop.requested
        return self._vote.vote(self._stop.requested)

    def _checked_loss(self, step, loss):
        """The loss of optimizer step `step` as a float (a host sync); stops the run if it is not finite.
        The loop reads each step's loss one step late, so the device never waits for the host."""
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(f"the loss became {value} at step {step}; stopping the run (the last "
                                "checkpoint is kept; try a lower --lr or --precision bf16 instead of fp16)")
        return value

    def _train_step(self, stream, window):
        """One optimizer step; returns the loss as a device tensor. No host sync inside on CUDA (with
        bf16/fp32; fp16's GradScaler syncs), which tests/test_padding_free.py checks."""
        a = self.a
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for micro in range(a.grad_accum):
            batch = next(stream)
            window["tokens"] += int(batch["attention_mask"].sum()) * self.world
            batch = self._to_device(batch)
            sync = micro == a.grad_accum - 1 or self.world == 1
            ctx = self.ddp.no_sync() if not sync else _null()
            with ctx:
                with self._autocast():
                    out = self.ddp(**batch)
                self.scaler.scale(out.loss / a.grad_accum).backward()
            with torch.no_grad():
                n = batch["masked_positions"].numel()
                labels = batch["labels"].reshape(-1)[batch["masked_positions"]]
                window["sums"] += torch.stack([
                    out.loss.detach().double(), out.mlm_loss.detach().double(), out.nsp_loss.detach().double(),
                    (out.prediction_logits.argmax(-1) == labels).sum().double() / max(n, 1),
                    (out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).float().mean().double(),
                    torch.ones((), dtype=torch.float64, device=self.device),
                    batch["next_sentence_label"].double().mean()])
            total += out.loss.detach().float() / a.grad_accum
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.max_grad_norm)
        window["grad_norm"] = grad_norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        window["steps"] += 1
        return total

    def _window_record(self, window, seq_len):
        sums = window["sums"]
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        s = sums.tolist()
        n = max(s[5], 1)
        elapsed = time.perf_counter() - window["t0"]
        tps = window["tokens"] / max(elapsed, 1e-9)
        record = {"step": self.step, "loss": s[0] / n, "mlm_loss": s[1] / n, "nsp_loss": s[2] / n,
                  "mlm_accuracy": s[3] / n, "nsp_accuracy": s[4] / n,
                  "nsp_majority": max(s[6], n - s[6]) / n,  # always answering the window's commoner label
                  "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": tps, "grad_norm": float(window.get("grad_norm", float("nan"))),
                  "seq_len": seq_len, "time": time.time()}
        window.update(sums=torch.zeros_like(sums), tokens=0, steps=0, t0=time.perf_counter(), last_tps=tps)
        return record

    def _summary(self, start_time, start_step, last_eval, interrupted, plot=None):
        elapsed = time.perf_counter() - start_time
        last = self.records[-1] if self.records else {}
        return {"step": self.step, "steps": self.a.steps, "interrupted": interrupted or self.step < self.a.steps,
                "stopped_as_asked": not interrupted and self.step == self.a.stop_at_step,
                "seconds": elapsed, "steps_run": self.step - start_step, "out": str(self.out),
                "plot": plot and str(plot), "log_every": self.a.log_every,
                "first_loss": next((r["loss"] for r in self.records if "loss" in r), None),
                "loss": last.get("loss"), "mlm_loss": last.get("mlm_loss"), **(last_eval or {}),
                "tokens_per_s": last.get("tokens_per_s"), "parameters": self.model.num_parameters(),
                "device": str(self.device), "precision": self.precision, "world_size": self.world, "main": self.main}


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def pretrain(args: TrainArgs, given=None):
    """Run (or resume) a pretraining run; returns a summary dict. `given`: see Trainer."""
    trainer = Trainer(args, given)
    try:
        return trainer.train()  # Ctrl-C and a scheduler's SIGTERM stop it at a step boundary, with a checkpoint
    finally:
        if trainer.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
