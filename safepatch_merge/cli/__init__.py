"""`safepatch` command line: one module per command, each with `add_parser(sub)` and `run(args)`.

Every command has a Python API twin (named in its module) and `--help` with examples. Exit
status: 0 success; 1 an input or runtime error, printed as one line naming the bad file, tensor
or key (errors.SafepatchError, or an operating-system error such as a full disk); 2 a usage
error (argparse's own: unknown option, missing argument); 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..dist import quiet_other_ranks
from ..errors import SafepatchError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EPILOG = """exit status: 0 success; 1 an input or runtime error (one line on stderr naming the file,
tensor or key at fault); 2 a usage error (bad option or argument); 130 interrupted."""

# Order is the data flow: derive -> score -> merge -> eval (judge) -> push; then the pipelines.
COMMANDS = ("derive", "score", "merge", "eval", "judge", "push", "run", "sweep", "demo", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safepatch",
        description="Post-safety alignment of LLMs by safety patching (SafePatching).",
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}_cmd")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}_cmd":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
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
