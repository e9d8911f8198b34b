"""`safepatch` command line: one module per command, each with `add_parser(sub)` and `run(args)`.

Every command has a Python API twin (named in its module) and `--help` with examples. Shared
options (cli/options.py): -o/--output, -q/--quiet, -v/--verbose, --progress/--no-progress;
`safepatch --version`. Parsing imports no torch: the command modules import their heavy parts
inside `run`. Exit status: 0 success; 1 an input or runtime error, printed as one line naming
the bad file, tensor or key (errors.SafepatchError, or an operating-system error such as a full
disk); 2 a usage error (argparse's own: unknown option, missing argument); 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import SafepatchError
from .options import add_message_options, resolve

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EPILOG = """exit status: 0 success; 1 an input or runtime error (one line on stderr naming the file,
tensor or key at fault); 2 a usage error (bad option or argument); 130 interrupted."""

# Order is the data flow: derive -> score -> merge -> eval (judge) -> push; then the pipelines.
COMMANDS = ("derive", "score", "merge", "eval", "judge", "push", "run", "sweep", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safepatch",
        description="Post-safety alignment of LLMs by safety patching (SafePatching).",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_message_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}_cmd").add_parser(sub)
        add_message_options(sub.choices[name])
    parser.commands = sub.choices  # name -> the command's parser, for its usage errors
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve(args, parser.commands[args.command])
    from ..dist import quiet_other_ranks

    quiet_other_ranks()  # under a launcher, INFO comes from rank 0 only
    try:
        return int(args.func(args) or 0)
    except SafepatchError as e:
        print(f"safepatch {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # a disk, permission or device failure no check above anticipated
        where = f"{str(e.filename)[:300]}: " if e.filename else ""
        print(f"safepatch {args.command}: error: {where}{_one_line(e.strerror or str(e))}",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"safepatch {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _one_line(msg: str, limit: int = 2000) -> str:
    """The message on one line, at most `limit` characters."""
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
