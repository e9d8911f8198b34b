"""`safepatch` command line: one module per command, each with `add_parser(sub)` and `run(args)`.

Every command has a Python API twin (named in its module), `--help` with examples, and exits
non-zero with a one-line error naming the bad file, tensor or key (errors.SafepatchError).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..dist import quiet_other_ranks
from ..errors import SafepatchError

# Order is the data flow: derive -> score -> merge -> eval -> push; then the pipelines.
COMMANDS = ("derive", "score", "merge", "eval", "push", "run", "sweep", "demo", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safepatch",
        description="Post-safety alignment of LLMs by safety patching (SafePatching).",
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
        print(f"safepatch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"safepatch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
