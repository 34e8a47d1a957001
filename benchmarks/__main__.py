"""`python -m benchmarks --list` and `python -m benchmarks NAME [--option VALUE ...]`.

A benchmark's options are its `main()` parameters, with their defaults; `NAME --help` shows them
under the benchmark's own description.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import types
import typing

from benchmarks import BENCHMARKS


def _kind(annotation) -> type:
    """int, float or str from a parameter's annotation (`float | None` is a float)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if annotation in (int, float, str) else str


def options_parser(name: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(module.main)
    for parameter in inspect.signature(module.main).parameters.values():
        if isinstance(parameter.default, bool):  # a switch: --smoke
            parser.add_argument(f"--{parameter.name.replace('_', '-')}", dest=parameter.name,
                                action=argparse.BooleanOptionalAction, default=parameter.default)
            continue
        parser.add_argument(f"--{parameter.name.replace('_', '-')}", dest=parameter.name,
                            type=_kind(hints.get(parameter.name, str)), default=parameter.default,
                            help=f"default: {parameter.default}")
    return parser


def listing() -> str:
    width = max(len(name) for name in BENCHMARKS)
    lines = [f"{'name'.ljust(width)}  question  [RESULTS.md section]"]
    lines += [f"{name.ljust(width)}  {b.question}  [{b.section}]" for name, b in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + listing())
        return 0
    if argv[0] == "--list":
        print(listing())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"python -m benchmarks: unknown benchmark {name!r} (--list shows them)", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{BENCHMARKS[name].module}")
    options = options_parser(name, module).parse_args(rest)
    module.main(**vars(options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
