"""The `optsearch` command line: parses arguments and delegates; no logic of its own.

Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, spec, storage URL, missing study),
3 nothing to export (no feasible trial), 130 interrupted (SIGINT).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UsageError, exit_code_for, one_line

EXIT_INTERRUPTED = 130

def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    raise UsageError(f"--set value {text!r} is not a number or true/false")


def parse_sets(items: list[str]) -> dict:
    """['tome.ratio=0.5', ...] -> {'tome.ratio': 0.5, ...}."""
    setting = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise UsageError(f"--set {item!r} must look like ACCELERATOR.PARAM=VALUE")
        setting[key.strip()] = _parse_value(value.strip())
    return setting


def cmd_evaluate(args) -> int:
    from .accelerators import normalize_setting
    from .evaluate import evaluator_from_spec
    from .export import default_setting, save_images
    from .report import comparison_table, format_setting
    from .spec import SpecError, check_setting, load_spec

    spec = load_spec(args.spec)
    try:
        setting = normalize_setting(parse_sets(args.set)) if args.set \
            else default_setting(spec.search.combos[0])
    except ValueError as error:
        raise UsageError(str(error)) from None
    problems = check_setting(setting, spec)
    if problems:
        raise SpecError([f"{args.spec}: {p}" for p in problems])
    evaluator = evaluator_from_spec(spec, device=args.device, progress=not args.quiet)
    baseline = evaluator.baseline()
    comparison = evaluator.compare(setting, baseline, keep_images=bool(args.save_images))
    if args.save_images:
        save_images(Path(args.save_images), baseline.images, comparison.images)
    if args.json:
        print(json.dumps(comparison.to_dict(), indent=2))
    else:
        print(f"{spec.name}: {len(evaluator.prompts)} prompts, batch size "
              f"{evaluator.config.batch_size}, {format_setting(comparison.setting)}")
        print(comparison_table(comparison.summary()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optsearch",
        description="Find the fastest DeepCache/ToMe/T-GATE settings for a Stable Diffusion "
                    "pipeline within a quality budget.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    evaluate = commands.add_parser("evaluate", help="measure one setting against the baseline")
    evaluate.add_argument("spec", help="study spec (TOML)")
    evaluate.add_argument("--set", action="append", default=[], metavar="ACCEL.PARAM=VALUE",
                          help="a parameter of the setting (repeatable)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--save-images", metavar="DIR", help="write baseline/setting PNGs")
    evaluate.add_argument("--device", help="override model.device")
    evaluate.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("optsearch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # every failure ends as one line, never a traceback
        if os.environ.get("OPTSEARCH_DEBUG"):
            raise
        for line in one_line(error):
            print(f"optsearch: error: {line}", file=sys.stderr)
        return exit_code_for(error)


if __name__ == "__main__":
    sys.exit(main())
