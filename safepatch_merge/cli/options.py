"""Options every `safepatch` command spells the same way, and what they resolve to.

- `-o/--output PATH`: where a command writes. `merge` and `run` also take it as their
  positional OUT_DIR (either, not both).
- `-q/--quiet`: warnings and errors only, no progress bars; `-v/--verbose`: debug messages.
  Both may also come before the command (`safepatch -q merge ...`).
- `--progress/--no-progress`: progress bars; by default shown only when stderr is a terminal.

Nothing here imports torch: `safepatch --help` and every `safepatch COMMAND --help` stay fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_output(p: argparse.ArgumentParser, help: str, *, required: bool = True,
               default: str | None = None, metavar: str = "OUT") -> None:
    """`-o/--output` (stored as `args.out`)."""
    p.add_argument("-o", "--output", dest="out", required=required, default=default,
                   metavar=metavar, help=help)


def add_output_positional(p: argparse.ArgumentParser, help: str,
                          metavar: str = "OUT_DIR") -> None:
    """A positional OUT_DIR that `-o/--output` may give instead (stored as `args.out_dir`;
    `resolve` checks that exactly one of them was given)."""
    p.add_argument("out_dir", nargs="?", metavar=metavar, help=f"{help} (or -o {metavar})")
    p.add_argument("-o", "--output", dest="_output_option", metavar=metavar,
                   help=f"the same as the positional {metavar}")
    p.set_defaults(_output_positional=metavar)


def add_message_options(p: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """-q/--quiet, -v/--verbose and --progress/--no-progress. On a command's parser they default
    to SUPPRESS, so a value given before the command is not overwritten by the default."""
    if top_level:
        p.set_defaults(quiet=False, verbose=False, progress=None)
    keep = {} if top_level else {"default": argparse.SUPPRESS}
    g = p.add_argument_group("messages") if not top_level else p
    g.add_argument("-q", "--quiet", action="store_true", **keep,
                   help="warnings and errors only, no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", **keep, help="log debug messages")
    if not top_level:
        g.add_argument("--progress", action=argparse.BooleanOptionalAction, **keep,
                       help="show progress bars (default: only when stderr is a terminal)")


def resolve(args: argparse.Namespace, command_parser: argparse.ArgumentParser) -> None:
    """Settle the shared options after parsing: usage errors (exit 2) through
    `command_parser.error`, then `args.progress` becomes a bool and the log level is set."""
    if args.quiet and args.verbose:
        command_parser.error("-q/--quiet and -v/--verbose exclude each other")
    metavar = getattr(args, "_output_positional", None)
    if metavar is not None:
        opt = args._output_option
        if opt is not None and args.out_dir is not None:
            command_parser.error(f"give {metavar} or -o/--output, not both")
        args.out_dir = args.out_dir if args.out_dir is not None else opt
        if args.out_dir is None:
            command_parser.error(f"the following arguments are required: {metavar}")
    if args.progress is None:
        args.progress = not args.quiet and sys.stderr.isatty()
    if not args.progress:
        # the Hugging Face libraries' own bars (downloads, weight loading); they read this
        # when imported, which happens after parsing
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def say(args: argparse.Namespace):
    """The function a command passes as `log_fn` for its step-by-step messages: print, or
    nothing under --quiet."""
    return (lambda *a, **k: None) if args.quiet else print
