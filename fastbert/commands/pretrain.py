"""`fastbert pretrain`: MLM + NSP pretraining; `--resume` continues a run; torchrun for several processes."""
import dataclasses
import os
import shlex
import shutil
import sys

HELP = "pretrain BERT with masked LM + next sentence prediction (defaults: tiny model, embedded corpus)"


def add_arguments(p):
    from fastbert.trainer import TrainArgs
    d = TrainArgs()
    g = p.add_argument_group("data")
    g.add_argument("--corpus", action="append", metavar="PATH",
                   help="a WikiText file, a plain-text file (one sentence per line, blank line between documents) "
                        "or a directory of .txt files; repeatable (default: the embedded corpus)")
    g.add_argument("--tokenizer", metavar="PATH", help="vocab.txt, tokenizer.json or a model directory (default: train one)")
    g.add_argument("--vocab-size", type=int, metavar="N", help=f"size of the WordPiece vocabulary to train (default {d.vocab_size})")
    g.add_argument("--seq-len", type=int, metavar="N", help=f"sequence length (default {d.seq_len})")
    g.add_argument("--phase2-seq-len", type=int, metavar="N", help="two-phase schedule: train the last steps at this length")
    g.add_argument("--phase2-fraction", type=float, metavar="F", help=f"fraction of steps in phase 2 (default {d.phase2_fraction})")
    g.add_argument("--dupe-factor", type=int, metavar="N", help=f"passes of pair creation over the corpus (default {d.dupe_factor})")
    g.add_argument("--whole-word-mask", action="store_const", const=True, help="mask whole words")
    g.add_argument("--num-workers", type=int, metavar="N", help="DataLoader worker processes (default 0)")
    g.add_argument("--cache-dir", metavar="DIR", help="cache of tokenizers and tokenized corpora (default ~/.cache/fastbert)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=["tiny", "mini", "small", "base", "large"], help=f"model size (default {d.preset})")
    g.add_argument("--config", metavar="FILE", help="a config.json instead of a preset")
    g.add_argument("--init", metavar="DIR", help="continue from a pretrained model directory")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, metavar="N", help=f"sequences per micro-batch per process (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step (default 1)")
    g.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps (default {d.steps})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--warmup", type=int, metavar="N", help=f"warmup steps (default {d.warmup})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--max-grad-norm", type=float, help=f"gradient clipping (default {d.max_grad_norm})")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: cuda if visible, else cpu")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", metavar="DIR", help=f"run directory (default {d.out})")
    g.add_argument("--log-every", type=int, metavar="N", help=f"steps between metrics lines (default {d.log_every})")
    g.add_argument("--eval-every", type=int, metavar="N", help=f"steps between held-out evaluations (default {d.eval_every})")
    g.add_argument("--save-every", type=int, metavar="N", help=f"steps between checkpoints (default {d.save_every})")
    g.add_argument("--stop-at-step", type=int, metavar="N", help="stop after step N with a checkpoint (resume later)")
    g.add_argument("--resume", action="store_const", const=True, help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_const", const=True, help="replace the run in --out")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no progress bar (and, when stderr is not a terminal, no log lines)")


def run(args):
    from fastbert.cli import CLIError
    from fastbert.trainer import TrainArgs, TrainingError, pretrain

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainArgs)
             if getattr(args, f.name, None) is not None}
    args = TrainArgs(**given)
    try:
        summary = pretrain(args, given=set(given))
    except TrainingError as e:
        raise CLIError(str(e)) from None
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C: stopped in the middle of a step
        if not os.path.isfile(os.path.join(args.out, "checkpoint.pt")):
            raise
        print(f"fastbert pretrain: stopped at once, keeping the last checkpoint; continue with: "
              f"{resume_command(args.out)}", file=sys.stderr)
        return 130
    if summary["main"]:
        print(format_summary(summary), file=sys.stderr)
    return 130 if summary["interrupted"] and not summary["stopped_as_asked"] else 0


def format_summary(s):
    lines = []
    state = "stopped" if s["interrupted"] else "finished"
    lines.append(f"fastbert pretrain {state} at step {s['step']}/{s['steps']} after {s['seconds']:.0f} s "
                 f"({s['parameters'] / 1e6:.1f}M parameters, {s['device']}, {s['precision']}, "
                 f"{s['world_size']} process{'es' if s['world_size'] > 1 else ''})")
    if s.get("loss") is not None:
        first = f"{s['first_loss']:.3f} -> " if s.get("first_loss") is not None else ""
        lines.append(f"  train loss {first}{s['loss']:.3f} (MLM {s['mlm_loss']:.3f}), "
                     f"{s['tokens_per_s']:,.0f} tokens/s")
    if s.get("eval_mlm_loss") is not None:
        lines.append(f"  held-out: MLM loss {s['eval_mlm_loss']:.3f}, MLM accuracy {s['eval_mlm_accuracy']:.1%}, "
                     f"NSP accuracy {s['eval_nsp_accuracy']:.1%} (majority-class rate {s['eval_nsp_majority']:.1%})")
    metrics = ", metrics.jsonl, training.png" if s.get("plot") else ""
    lines.append(f"  outputs in {s['out']}: model/ (transformers format){metrics}, checkpoint.pt")
    if s.get("plot"):
        lines.append(f"  training curves: {s['plot']}")
    else:
        every = f" (every --log-every {s['log_every']} steps)" if s.get("log_every") else ""
        lines.append(f"  no training.png: the run stopped before its first metrics line{every}")
    if s["interrupted"]:
        lines.append(f"  continue with: {resume_command(s['out'])}")
    return "\n".join(lines)


def resume_command(out):
    """The command that continues the run in `out`, as it can be typed in the shell that started this
    one: through scripts/run.sh if that started it, else this environment's fastbert."""
    script = os.environ.get("FASTBERT_RUN_SCRIPT")  # set by scripts/run.sh to its path as typed
    if script:
        launcher = f"bash {shlex.quote(script)}"
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        processes = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        launcher = f"{_program('torchrun')} --nproc_per_node {processes} -m fastbert pretrain"
    elif os.path.basename(sys.argv[0]) == "fastbert":  # the console script
        launcher = f"{_program('fastbert')} pretrain"
    else:  # python -m fastbert, or called from Python
        launcher = f"{_program(os.path.basename(sys.executable))} -m fastbert pretrain"
    return f"{launcher} --out {shlex.quote(str(out))} --resume"


def _program(name):
    """`name` where the shell finds this environment's own `name` on the PATH, else its path (relative
    to the working directory when below it): `fastbert` is not on the PATH of a shell that has
    not activated the virtual environment."""
    path = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), name)
    found = shutil.which(name)
    if not os.path.exists(path) or (found and os.path.abspath(found) == path):
        return name
    relative = os.path.relpath(path)
    return shlex.quote(path if relative.startswith("..") else relative)
