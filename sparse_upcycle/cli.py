"""The ``sparse-upcycle`` command line. Subcommands register themselves in ``_build_parser``."""

from __future__ import annotations

import argparse
import sys

from sparse_upcycle import __version__

DESCRIPTION = (
    "Sparse upcycling: turn a trained dense Transformer (T5, ViT, Llama-style decoder) into a "
    "sparse Mixture-of-Experts model and train it further."
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-upcycle", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0
