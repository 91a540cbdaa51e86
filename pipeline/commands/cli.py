"""The `metacompress` command. Each sub-command module exposes ``register(subparsers)``; a list is the registry."""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.env import apply_defaults

# Modules stay light at import time: heavy libraries are imported inside the command functions.
COMMAND_MODULES = ["pipeline.commands.demo", "pipeline.commands.run", "pipeline.commands.chat", "pipeline.commands.bench", "pipeline.commands.data", "pipeline.commands.analyze", "pipeline.commands.reference", "pipeline.commands.submit", "pipeline.commands.plan"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metacompress",
        description="Learned visual-token compression for multi-turn VQA: data, stages, training, evaluation.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"metacompress {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
