"""The `optsearch` command line: the parser, logging, and turning every failure into one line.
The commands themselves are in commands.py.

Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, spec, storage URL, missing study),
3 nothing to export (no feasible trial), 75 the storage did not answer (try again), 130
interrupted (SIGINT).
"""

from __future__ import annotations

import _thread
import argparse
import logging
import os
import sys
import threading
import warnings

from optsearch.errors import exit_code_for, problem_lines
from optsearch.storage.masking import mask_text
from optsearch.storage.rdb import GRACE_PERIOD, HEARTBEAT_INTERVAL
from optsearch.study_spec import check_device
from optsearch.version import versions_line

EXIT_INTERRUPTED = 130


class _PrintVersions(argparse.Action):
    """`--version`: one unwrapped line (argparse's own version action wraps it), then exit 0."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions_line())
        parser.exit()


def _add_storage(parser) -> None:
    parser.add_argument("--storage", metavar="URL",
                        help="Optuna RDB URL or a storage proxy's grpc://host:port (default: "
                             "$OPTSEARCH_STORAGE or sqlite:///optsearch.db)")


def _add_worker_options(parser) -> None:
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
                        help="on out-of-memory, go on at half the batch size (same images): a trial"
                        " is retried, a baseline that does not fit is timed smaller")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _at_least_two(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value} must be >= 2 (the interval is over the rounds)")
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


def _with_verbose(add_parser):
    """Every (sub)command takes --verbose too, after its name (`optsearch worker -v ...`)."""
    def add(*args, **kwargs):
        command = add_parser(*args, **kwargs)
        command.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                             help="debug logging")
        return command
    return add


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="optsearch",
        description="Find the fastest acceleration settings (DeepCache, ToMe, T-GATE, diffusers' "
                    "caches, fewer steps) for a diffusion pipeline (Stable Diffusion UNets, "
                    "FLUX and other transformers) within a quality budget.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--version", action=_PrintVersions, nargs=0,
                        help="optsearch's version and the libraries' that measure (for bug reports)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser = _with_verbose(commands.add_parser)

    evaluate = commands.add_parser("evaluate", help="measure one setting against the baseline")
    evaluate.add_argument("spec", help="study spec (TOML)")
    evaluate.add_argument("--set", action="append", default=[], metavar="ACCEL.PARAM=VALUE",
                          help="a parameter of the setting (repeatable)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--save-images", metavar="DIR", help="write baseline/setting PNGs")
    evaluate.add_argument("--device", type=_device, help="override model.device")
    evaluate.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler="cmd_evaluate")

    run = commands.add_parser("run", help="create (or load the identical) study and run one worker")
    run.add_argument("spec", help="study spec (TOML)")
    run.add_argument("--name", help="study name (default: the spec's name)")
    run.add_argument("--confirm", type=_positive_int, default=0, metavar="K",
                     help="then confirm the K best settings on unseen prompts (study confirm)")
    run.add_argument("--repeats", type=_at_least_two, default=3, metavar="R",
                     help="A B B A timing rounds of --confirm (default 3, at least 2)")
    _add_storage(run)
    _add_worker_options(run)
    run.set_defaults(handler="cmd_run")

    preflight = commands.add_parser(
        "check", help="preflight: load model, CLIP and prompts, time one batch, estimate the study")
    preflight.add_argument("spec", help="study spec (TOML)")
    preflight.add_argument("--device", type=_device, help="override model.device")
    preflight.add_argument("--workers", type=_positive_int, metavar="N",
                           help="estimate for N workers too (default: the GPUs here)")
    preflight.set_defaults(handler="cmd_check")

    worker = commands.add_parser("worker", help="join a study and run trials")
    worker.add_argument("--study", required=True, help="study name")
    worker.add_argument("--devices", metavar="LIST",
                        help="one worker process per device: all (every GPU), or 0,1,3")
    _add_storage(worker)
    _add_worker_options(worker)
    worker.set_defaults(handler="cmd_worker")

    study = commands.add_parser("study", help="create, list, show, confirm, export, copy or delete studies")
    study_commands = study.add_subparsers(dest="study_command", required=True, metavar="ACTION")
    study_commands.add_parser = _with_verbose(study_commands.add_parser)
    create = study_commands.add_parser("create", help="create a study from a spec")
    create.add_argument("spec", help="study spec (TOML)")
    create.add_argument("--name", help="study name (default: the spec's name)")
    create.add_argument("--load-if-exists", action="store_true",
                        help="succeed when the study exists with the identical spec")
    create.add_argument("--warm-start", action="append", default=[], metavar="NAME",
                        help="first measure the best settings of study NAME (same storage)")
    create.set_defaults(handler="cmd_study_create")
    listing = study_commands.add_parser("list", help="list the studies in a storage")
    listing.add_argument("--json", action="store_true", help="print one JSON list")
    listing.set_defaults(handler="cmd_study_list")
    show = study_commands.add_parser("show", help="baselines, trial counts, best per combo")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler="cmd_study_show")
    export = study_commands.add_parser(
        "export", help="write the winner: search_params.json, a cache-dit YAML or a Python file")
    export.add_argument("name")
    export.add_argument("--format", choices=("json", "cache-dit", "diffusers"), default="json",
                        help="json (optsearch.apply), cache-dit (cache_dit.load_configs) or "
                             "diffusers (accelerate(pipe) with the libraries' own calls)")
    export.add_argument("-o", "--output", default=None, metavar="FILE",
                        help="default: search_params.json, cache.yaml or accelerate_pipe.py; "
                             "- writes to stdout (the summary line then goes to stderr)")
    export.add_argument("--fingerprint", metavar="ID", default=None,
                        help="the device whose figures decide (default: the one the study's "
                             "confirmations were made on; `study show` lists fingerprints)")
    export.set_defaults(handler="cmd_study_export")
    confirm = study_commands.add_parser(
        "confirm",
        help="re-measure the best settings on unseen prompts and fresh noise (A B B A timing rounds)")
    confirm.add_argument("name")
    confirm.add_argument("--top", type=_positive_int, default=3, metavar="K",
                         help="the K best feasible settings, plus each combo's best (default 3)")
    confirm.add_argument("--repeats", type=_at_least_two, default=3, metavar="R",
                         help="A B B A timing rounds (baseline, setting, setting, baseline); the "
                              "speedup interval is over them (default 3, at least 2)")
    confirm.add_argument("--device", type=_device, help="override model.device")
    confirm.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    confirm.set_defaults(handler="cmd_study_confirm")
    delete = study_commands.add_parser("delete", help="delete a study and its trials")
    delete.add_argument("name")
    delete.add_argument("--force", action="store_true", help="delete even while trials are running")
    delete.set_defaults(handler="cmd_study_delete")
    extend = study_commands.add_parser("extend", help="raise a study's n_trials: more trials")
    extend.add_argument("name")
    extend.add_argument("--n-trials", type=_positive_int, required=True, metavar="N",
                        help="the study's new n_trials (more than it has)")
    _add_storage(extend)
    extend.set_defaults(handler="cmd_study_extend")
    copy = study_commands.add_parser(
        "copy", help="copy a study to another storage (SQLite to PostgreSQL), trials and all")
    copy.add_argument("name")
    copy.add_argument("--to", required=True, metavar="URL", help="the storage to copy it into")
    copy.add_argument("--name", dest="to_name", metavar="NEW",
                      help="the copy's name (default: the same)")
    copy.set_defaults(handler="cmd_study_copy")
    plot = study_commands.add_parser("plot", help="write PNG plots of a study")
    plot.add_argument("name")
    plot.add_argument("-o", "--output", required=True, metavar="DIR")
    plot.set_defaults(handler="cmd_study_plot")
    for sub in (create, listing, show, export, confirm, delete, copy, plot):
        _add_storage(sub)

    dashboard = commands.add_parser("dashboard", help="optuna-dashboard with trial image grids")
    _add_storage(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    dashboard.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    dashboard.add_argument("--artifact-dir", default=None, metavar="DIR",
                           help="the artifact folder the workers write to (default: the one the "
                                "studies' specs store)")
    dashboard.set_defaults(handler="cmd_dashboard")

    proxy = commands.add_parser("storage-proxy",
                                help="serve a storage to many workers over gRPC (Optuna's proxy)")
    _add_storage(proxy)
    proxy.add_argument("--host", default="127.0.0.1",
                       help="bind address (default 127.0.0.1; 0.0.0.0 for other machines)")
    proxy.add_argument("--port", type=_port, default=13000, help="port (default 13000)")
    proxy.add_argument("--threads", type=_positive_int, default=32,
                       help="requests served at once (default 32; one database connection each)")
    proxy.set_defaults(handler="cmd_storage_proxy")
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, not the file and source line Python shows (-v shows those)."""
    print(f"optsearch: warning: {mask_text(str(message).splitlines()[0])}", file=sys.stderr)


def resignal_lost_interrupt(unraisable) -> None:
    """Ctrl-C that lands in a garbage-collector callback (SQLAlchemy's weakrefs run often) raises
    where Python cannot: it printed "Exception ignored ... KeyboardInterrupt" and ran on, so a
    first Ctrl-C during loading was lost. It is signalled again, to land where it can be raised.
    (A worker's own `Interrupts` keeps and raises it while trials run.) Others print as before."""
    if unraisable.exc_type is KeyboardInterrupt:  # from a thread: in this hook it is lost again
        again = threading.Timer(0.05, _thread.interrupt_main)
        again.daemon = True
        again.start()
        return
    sys.__unraisablehook__(unraisable)


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
    if not args.verbose:  # a library's deprecation note is not the user's problem
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        warnings.showwarning = _one_line_warning
    if args.verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.INFO)
    # The commands load torch, diffusers and Optuna (seconds): imported once a command is parsed,
    # so that --help and usage errors answer at once.
    from optsearch.cli import commands

    previous_hook, sys.unraisablehook = sys.unraisablehook, resignal_lost_interrupt
    try:
        return getattr(commands, args.handler)(args)
    except KeyboardInterrupt:
        print("optsearch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # every failure ends as one line, never a traceback
        if os.environ.get("OPTSEARCH_DEBUG"):
            raise
        for line in problem_lines(error):
            print(f"optsearch: error: {mask_text(line)}", file=sys.stderr)
        return exit_code_for(error)
    finally:
        sys.unraisablehook = previous_hook


if __name__ == "__main__":
    sys.exit(main())
