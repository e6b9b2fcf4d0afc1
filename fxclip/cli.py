"""The `fxclip` command line: one subcommand per entry of SUBCOMMANDS.

To add a subcommand, write a module with `add_arguments(parser)` and `run(args) -> int` (its
docstring's first line becomes the help text) and add one line to SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module providing add_arguments(parser) and run(args)
SUBCOMMANDS: dict[str, str] = {
    "train": "fxclip.dp.train",
    "bench": "fxclip.tools.bench",
    "inspect": "fxclip.tools.inspect_cmd",
    "memory": "fxclip.tools.memory_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of SUBCOMMANDS."""
    parser = argparse.ArgumentParser(prog="fxclip", description="Fast differentially private training.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        sub = subparsers.add_parser(
            name, help=doc.splitlines()[0] if doc else None, description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fxclip` console script; bad input exits with status 2 and a message."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # bad input: fxclip's errors say what is wrong and how to fix it
        print(f"fxclip {args.command}: error: {err}", file=sys.stderr)
        return 2


