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

from optsearch.errors import UsageError, exit_code_for, problem_lines
from optsearch.storage.masking import mask_text

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
    from optsearch.accelerators import normalize_setting
    from optsearch.formatting import comparison_table, format_setting
    from optsearch.measure.evaluate import evaluator_from_spec
    from optsearch.optimize.export import default_setting, save_images
    from optsearch.spec import SpecError, check_setting, load_spec

    spec = load_spec(args.spec)
    try:
        given = normalize_setting(parse_sets(args.set))
        combo = next((c for c in spec.search.combos if set(given) <= set(c)), spec.search.combos[0])
        setting = default_setting(combo, spec.model.steps)
        for accelerator, values in given.items():
            setting.setdefault(accelerator, {}).update(values)
        setting = normalize_setting(setting)
    except ValueError as error:
        raise UsageError(str(error)) from None
    problems = check_setting(setting, spec)
    if problems:
        raise SpecError([f"{args.spec}: {p}" for p in problems])
    evaluator = evaluator_from_spec(spec, device=args.device, progress=not args.quiet)
    baseline = evaluator.baseline()
    keep = len(evaluator.prompts) if args.save_images else 0
    comparison = evaluator.compare(setting, baseline, keep_images=keep)
    if args.save_images:
        save_images(Path(args.save_images), baseline.images, comparison.images)
    if args.json:
        print(json.dumps(comparison.to_dict(), indent=2))
    else:
        print(f"{spec.name}: {len(evaluator.prompts)} prompts, batch size "
              f"{evaluator.config.batch_size}, {format_setting(comparison.setting)}")
        print(comparison_table(comparison.summary()))
    return 0


def _open(args, create: bool = False):
    """The storage of `--storage`; only commands that create studies may create a new database."""
    from optsearch.storage.rdb import open_storage

    return open_storage(args.storage, heartbeat_interval=None, must_exist=not create)


def cmd_study_create(args) -> int:
    from optsearch.optimize.create import create_study
    from optsearch.spec import load_spec
    from optsearch.storage.rdb import mask

    spec = load_spec(args.spec)
    if args.warm_start:
        spec.search.warm_start = [*spec.search.warm_start,
                                  *(f"study:{name}" for name in args.warm_start)]
    storage = _open(args, create=True)
    study = create_study(spec, storage, args.name, args.load_if_exists)
    print(f"study {study.study_name!r} ready in {mask(storage.url)}")
    return 0


def cmd_study_list(args) -> int:
    import optuna

    from optsearch.formatting import table
    from optsearch.optimize.study import SPEC_ATTR

    rows = []
    for summary in optuna.get_all_study_summaries(_open(args), include_best_trial=False):
        spec = summary.user_attrs.get(SPEC_ATTR, {})
        rows.append([summary.study_name, summary.n_trials, spec.get("search", {}).get("n_trials"),
                     spec.get("model", {}).get("id"), summary.datetime_start])
    print(table(["study", "trials", "n_trials", "model", "started"], rows) if rows else "no studies")
    return 0


def cmd_study_show(args) -> int:
    from optsearch.cli.show import format_summary, study_summary
    from optsearch.optimize.study import load_study

    study, spec = load_study(_open(args), args.name)
    summary = study_summary(study, spec)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def cmd_study_export(args) -> int:
    from optsearch.optimize.export import export_study
    from optsearch.optimize.study import load_study

    study, spec = load_study(_open(args), args.name)
    exported = export_study(study, spec)
    Path(args.output).write_text(json.dumps(exported, indent=2) + "\n", encoding="utf-8")
    from optsearch.formatting import format_speedup

    best = exported["best"]
    confirmed = best["confirmed"]
    print(f"wrote {args.output}: best trial {best['trial']} ({best['combo']}), search speedup "
          f"{format_speedup(best['metrics'])}; " + (
              f"confirmed on {confirmed['num_samples']} unseen prompts: {format_speedup(confirmed)}"
              if confirmed else "not confirmed (`optsearch study confirm` checks it on unseen prompts)"))
    return 0


def cmd_study_confirm(args) -> int:
    from optsearch.optimize.confirm import Confirmation, ConfirmOptions

    options = ConfirmOptions(top=args.top, repeats=args.repeats, device=args.device,
                             progress=not args.quiet)
    _print_confirmations(Confirmation(args.storage, args.name, options))
    return 0


def _print_confirmations(confirmation) -> None:
    from optsearch.formatting import format_interval, format_speedup, table

    records = confirmation.run()
    metric = confirmation.spec.quality.metric
    rows = [[r["trial"], r["combo"], format_speedup(r), format_interval(r[metric]),
             "yes" if r["feasible"] else "NO"] for r in records]
    print(f"confirmed on {len(confirmation.prompts)} unseen prompts, "
          f"{confirmation.options.repeats} interleaved rounds:")
    print(table(["trial", "combo", "speedup", metric, "feasible"], rows))


def cmd_study_delete(args) -> int:
    import optuna

    from optsearch.optimize.study import load_study

    storage = _open(args)
    load_study(storage, args.name)  # a clear error when it does not exist
    optuna.delete_study(study_name=args.name, storage=storage)
    print(f"deleted study {args.name!r}")
    return 0


def cmd_study_plot(args) -> int:
    from optsearch.cli.plots import plot_study
    from optsearch.optimize.study import load_study

    study, spec = load_study(_open(args), args.name)
    for path in plot_study(study, spec, Path(args.output)):
        print(f"wrote {path}")
    return 0


def cmd_dashboard(args) -> int:
    from optsearch.cli.dashboard import serve

    serve(args.storage, args.host, args.port, args.artifact_dir)
    return 0


def _worker_options(args):
    from optsearch.optimize.worker import WorkerOptions

    if args.grace_period < 2 * args.heartbeat_interval:
        raise UsageError(f"--grace-period {args.grace_period} must be at least twice "
                         f"--heartbeat-interval {args.heartbeat_interval} (a live worker's beat "
                         f"may come late): e.g. --grace-period {5 * args.heartbeat_interval}")
    return WorkerOptions(device=args.device, n_trials=args.n_trials, timeout=args.timeout,
                         progress=not args.quiet, heartbeat_interval=args.heartbeat_interval,
                         grace_period=args.grace_period, artifact_dir=args.artifact_dir,
                         halve_batch_on_oom=args.halve_batch_on_oom)


def _complete(storage, name: str) -> bool:
    """True (and says so) when study `name` exists and already has all its trials."""
    from optsearch.optimize import study as studies

    progress = studies.progress(storage, name)
    if progress is None or progress[0] < progress[1]:
        return False
    print(f"study {name!r} is complete: {progress[0]} of {progress[1]} trials finished "
          "(`optsearch study show` for the results)")
    return True


def cmd_worker(args) -> int:
    from optsearch.optimize.fleet import parse_devices, run_workers
    from optsearch.optimize.worker import Worker

    options = _worker_options(args)
    devices = parse_devices(args.devices) if args.devices else None
    if _complete(_open(args), args.study):  # before loading any model
        return 0
    if devices:
        return run_workers(args.argv, devices)
    worker = Worker(args.storage, args.study, options)
    ran = worker.run()
    print(f"worker done: {ran} trials run by this worker on {worker.device}")
    return 0


def cmd_run(args) -> int:
    from optsearch.cli.show import format_summary, study_summary
    from optsearch.measure.evaluate import evaluator_from_spec
    from optsearch.optimize.create import create_study
    from optsearch.optimize.study import load_study
    from optsearch.optimize.worker import Worker
    from optsearch.spec import load_spec

    spec = load_spec(args.spec)
    options = _worker_options(args)
    storage = _open(args, create=True)
    name = args.name or spec.name
    if _complete(storage, name):
        print(format_summary(study_summary(*load_study(storage, name))))
        return 0
    if spec.quality.clip_pretrained == "none":
        print(f"note: {name} scores with a random-weight CLIP (clip_pretrained = \"none\"): CLIP "
              f"scores mean nothing here, so it constrains {spec.quality.metric} "
              f"(fidelity to the baseline) instead" if spec.quality.metric != "clip_loss" else
              "note: random-weight CLIP: the CLIP loss it constrains is meaningless")
    # Load the pipeline, CLIP and prompts before writing anything: bad input leaves no study behind.
    evaluator = evaluator_from_spec(spec, args.device, progress=not args.quiet)
    study = create_study(spec, storage, args.name, load_if_exists=True)
    worker = Worker(args.storage, study.study_name, options, evaluator)
    worker.run()
    if args.confirm:
        from optsearch.optimize.confirm import Confirmation, ConfirmOptions

        confirm = ConfirmOptions(top=args.confirm, repeats=args.repeats, device=args.device,
                                 progress=not args.quiet)
        _print_confirmations(Confirmation(args.storage, study.study_name, confirm, evaluator))
    print(format_summary(study_summary(worker.study, worker.spec)))
    return 0


def cmd_check(args) -> int:
    from optsearch.cli.preflight import check, format_report
    from optsearch.spec import SpecError, load_spec

    spec = load_spec(args.spec)
    report = check(spec, args.device, args.workers)
    if report.problems:
        raise SpecError(report.problems)  # one line each, exit 2
    print(format_report(report, spec))
    return 0


def _add_storage(parser) -> None:
    parser.add_argument("--storage", metavar="URL",
                        help="Optuna RDB URL (default: $OPTSEARCH_STORAGE or sqlite:///optsearch.db)")


def _add_worker_options(parser) -> None:
    from optsearch.storage.rdb import GRACE_PERIOD, HEARTBEAT_INTERVAL

    parser.add_argument("--device", type=_device, help="override model.device (cpu, cuda, cuda:N)")
    parser.add_argument("--n-trials", type=_positive_int, metavar="N",
                        help="this worker's own trial limit")
    parser.add_argument("--timeout", type=_positive_float, metavar="S",
                        help="start no trial after S seconds, counted from the start of the command")
    parser.add_argument("--heartbeat-interval", type=_positive_int, default=HEARTBEAT_INTERVAL,
                        metavar="S", help=f"heartbeat every S seconds (default {HEARTBEAT_INTERVAL})")
    parser.add_argument("--grace-period", type=_positive_int, default=GRACE_PERIOD, metavar="S",
                        help=f"a trial silent for S seconds is failed and re-queued (default {GRACE_PERIOD})")
    parser.add_argument("--artifact-dir", metavar="DIR", help="override the spec's [artifacts] path")
    parser.add_argument("--halve-batch-on-oom", action="store_true",
                        help="retry an out-of-memory trial at half the batch size (same images)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1..65535)")
    return value


def _device(text: str) -> str:
    """The same check as model.device in a spec."""
    from optsearch.spec import check_device

    problem = check_device(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (no usage dump), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _mask_record(record: logging.LogRecord) -> bool:
    """A logging filter: no password reaches a log line (drivers' messages included)."""
    record.msg, record.args = mask_text(record.getMessage()), None
    return True


def _one_line_record(record: logging.LogRecord) -> bool:
    """A logging filter: a log line stays one line. A library's logged exception (SQLAlchemy
    closing a cursor that Ctrl-C cut off) is named after the message, not traced back;
    --verbose keeps tracebacks."""
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        record.msg, record.args = f"{record.getMessage()} ({type(error).__name__}: {error})", None
    record.exc_info = record.exc_text = record.stack_info = None
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    evaluate.add_argument("--device", type=_device, help="override model.device")
    evaluate.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=cmd_evaluate)

    run = commands.add_parser("run", help="create (or load the identical) study and run one worker")
    run.add_argument("spec", help="study spec (TOML)")
    run.add_argument("--name", help="study name (default: the spec's name)")
    run.add_argument("--confirm", type=_positive_int, default=0, metavar="K",
                     help="then confirm the K best settings on unseen prompts (study confirm)")
    run.add_argument("--repeats", type=_positive_int, default=2, metavar="R",
                     help="interleaved timing rounds of --confirm (default 2)")
    _add_storage(run)
    _add_worker_options(run)
    run.set_defaults(handler=cmd_run)

    preflight = commands.add_parser(
        "check", help="preflight: load model, CLIP and prompts, time one batch, estimate the study")
    preflight.add_argument("spec", help="study spec (TOML)")
    preflight.add_argument("--device", type=_device, help="override model.device")
    preflight.add_argument("--workers", type=_positive_int, metavar="N",
                           help="estimate for N workers too (default: the GPUs here)")
    preflight.set_defaults(handler=cmd_check)

    worker = commands.add_parser("worker", help="join a study and run trials")
    worker.add_argument("--study", required=True, help="study name")
    worker.add_argument("--devices", metavar="LIST",
                        help="one worker process per device: all (every GPU), or 0,1,3")
    _add_storage(worker)
    _add_worker_options(worker)
    worker.set_defaults(handler=cmd_worker)

    study = commands.add_parser("study", help="create, list, show, confirm, export or delete studies")
    study_commands = study.add_subparsers(dest="study_command", required=True, metavar="ACTION")
    create = study_commands.add_parser("create", help="create a study from a spec")
    create.add_argument("spec", help="study spec (TOML)")
    create.add_argument("--name", help="study name (default: the spec's name)")
    create.add_argument("--load-if-exists", action="store_true",
                        help="succeed when the study exists with the identical spec")
    create.add_argument("--warm-start", action="append", default=[], metavar="NAME",
                        help="first measure the best settings of study NAME (same storage)")
    create.set_defaults(handler=cmd_study_create)
    listing = study_commands.add_parser("list", help="list the studies in a storage")
    listing.set_defaults(handler=cmd_study_list)
    show = study_commands.add_parser("show", help="baselines, trial counts, best per combo")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=cmd_study_show)
    export = study_commands.add_parser("export", help="write search_params.json")
    export.add_argument("name")
    export.add_argument("-o", "--output", default="search_params.json", metavar="FILE")
    export.set_defaults(handler=cmd_study_export)
    confirm = study_commands.add_parser(
        "confirm", help="re-measure the best settings on unseen prompts (interleaved timing)")
    confirm.add_argument("name")
    confirm.add_argument("--top", type=_positive_int, default=3, metavar="K",
                         help="the K best feasible settings, plus each combo's best (default 3)")
    confirm.add_argument("--repeats", type=_positive_int, default=2, metavar="R",
                         help="baseline/setting timing rounds, interleaved (default 2)")
    confirm.add_argument("--device", type=_device, help="override model.device")
    confirm.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    confirm.set_defaults(handler=cmd_study_confirm)
    delete = study_commands.add_parser("delete", help="delete a study and its trials")
    delete.add_argument("name")
    delete.set_defaults(handler=cmd_study_delete)
    plot = study_commands.add_parser("plot", help="write PNG plots of a study")
    plot.add_argument("name")
    plot.add_argument("-o", "--output", required=True, metavar="DIR")
    plot.set_defaults(handler=cmd_study_plot)
    for sub in (create, listing, show, export, confirm, delete, plot):
        _add_storage(sub)

    dashboard = commands.add_parser("dashboard", help="optuna-dashboard with trial image grids")
    _add_storage(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    dashboard.add_argument("--port", type=_port, default=8080)
    dashboard.add_argument("--artifact-dir", default="artifacts", metavar="DIR",
                           help="the artifact folder the workers write to (default: artifacts)")
    dashboard.set_defaults(handler=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not args.verbose:
            handler.addFilter(_one_line_record)
        handler.addFilter(_mask_record)  # last: it also masks what the one-line filter added
    if args.verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("optsearch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # every failure ends as one line, never a traceback
        if os.environ.get("OPTSEARCH_DEBUG"):
            raise
        for line in problem_lines(error):
            print(f"optsearch: error: {mask_text(line)}", file=sys.stderr)
        return exit_code_for(error)


if __name__ == "__main__":
    sys.exit(main())
