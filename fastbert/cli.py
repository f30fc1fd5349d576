"""`fastbert` / `python -m fastbert`: one subcommand per module in fastbert/commands/.

Each command module defines HELP (one line), add_arguments(parser) and run(args) -> int. Command
modules import nothing heavy at module level, and only the command that runs gets its options
(add_arguments may import torch), so `fastbert --help` does not wait for torch.
Errors a user can cause (bad paths, bad options, bad data) are printed as one line on stderr
with a non-zero exit; FASTBERT_DEBUG=1 shows the traceback instead.
"""
import argparse
import importlib
import os
import sys

# name -> module under fastbert.commands; modules are imported only when listed or run
COMMANDS = ["info", "check", "examples", "pretrain", "embed"]


class CLIError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def _load(name):
    try:
        return importlib.import_module(f"fastbert.commands.{name.replace('-', '_')}")
    except ModuleNotFoundError as e:
        if e.name == f"fastbert.commands.{name.replace('-', '_')}":
            return None
        raise


def build_parser(only=None):
    """The parser; `only`: the commands whose options to add (default: all)."""
    from fastbert.version import __version__
    parser = argparse.ArgumentParser(prog="fastbert", description="Fast BERT pretraining and inference.")
    parser.add_argument("--version", action="version", version=f"fastbert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        if only is None or name in only:
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def _command(argv):
    """The command named in argv (the first word that is not an option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only={_command(argv)})
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"fastbert {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, IndexError, OSError) as e:
        if os.environ.get("FASTBERT_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fastbert {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
