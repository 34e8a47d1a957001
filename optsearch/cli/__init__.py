"""The command line: parsing, and what each command prints. The work happens in the packages below."""

from optsearch.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
