"""What each `optsearch` command does: reads its arguments, calls the package that does the work,
prints the result. Exit codes are main.py's."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import optuna

from optsearch.cli.evaluate import cmd_evaluate, output_folder  # noqa: F401 - main's handler
from optsearch.cli.show import format_summary, study_summary, winner_cell
from optsearch.errors import UsageError
from optsearch.formatting import (
    format_interval,
    format_speedup,
    table,
)
from optsearch.measure.model_ids import check_folders
from optsearch.measure.prompts import confirm_prompts, prompts_of
from optsearch.optimize import study as studies
from optsearch.optimize.confirm_targets import ConfirmOptions, ConfirmTargets
from optsearch.optimize.create import (
    check_creatable,
    check_name,
    create_study,
    different_spec_text,
    extend_study,
    spec_differences,
)
from optsearch.optimize.study import SPEC_ATTR, load_study
from optsearch.storage.artifacts import make_artifact_folder
from optsearch.storage.rdb import mask, open_storage, resolve_url
from optsearch.storage.record import combo_label
from optsearch.study_spec import SpecError, load_spec, notes

# The commands that generate images import diffusers, transformers and open_clip (about ten
# seconds on a small machine) inside their functions: `study list`, `show`, `export`, `create`
# and `delete` answer without them.

def _open(args, create: bool = False):
    """The storage of `--storage`; only commands that create studies may create a new database."""

    return open_storage(args.storage, heartbeat_interval=None, must_exist=not create)


def cmd_study_create(args) -> int:
    spec = load_spec(args.spec)
    if args.warm_start:
        spec.search.warm_start = [*spec.search.warm_start,
                                  *(f"study:{name}" for name in args.warm_start)]
    check_creatable(spec, args.name)  # before a new SQLite file is made for it
    storage = _open(args, create=True)
    study = create_study(spec, storage, args.name, args.load_if_exists)
    _print_notes(spec)
    print(f"study {study.study_name!r} ready in {mask(storage.url)}")
    return 0


def _print_notes(spec) -> None:
    for line in notes(spec):
        print(f"note: {line}")


def cmd_study_list(args) -> int:
    storage, listed = _open(args), []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        spec = summary.user_attrs.get(SPEC_ATTR, {})
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state for t in trials)
        listed.append({"study": summary.study_name, "measured": len(studies.measured_trials(study)),
                       "exhausted": bool(studies.exhausted(summary)),
                       "queued": states[optuna.trial.TrialState.WAITING],
                       "failed": states[optuna.trial.TrialState.FAIL],  # study show says why
                       "n_trials": spec.get("search", {}).get("n_trials"),
                       "model": spec.get("model", {}).get("id"), "winner": summary.user_attrs.get("winner"),
                       "started": _first_started(trials, summary.datetime_start)})
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    rows = [[s["study"], f"{s['measured']} (space exhausted)" if s["exhausted"] else s["measured"],
             s["queued"], s["failed"], s["n_trials"], s["model"], winner_cell(s["winner"]),
             _started_cell(s["started"])] for s in listed]
    headers = ["study", "measured", "queued", "failed", "n_trials", "model", "winner", "started"]
    print(table(headers, rows) if rows else "no studies")
    return 0


def _first_started(trials, datetime_start) -> str | None:
    """When a study's first trial started: in UTC, as its worker wrote it; for trials from before
    workers wrote it, Optuna's datetime_start (the creating machine's local time, no zone)."""
    started = [t.user_attrs["started"] for t in trials if "started" in t.user_attrs]
    return min(started) if started else datetime_start.isoformat() if datetime_start else None


def _started_cell(started: str | None) -> str:
    if not started:
        return "-"
    return started[:19].replace("T", " ") + (" UTC" if started.endswith("+00:00") else "")


def cmd_study_show(args) -> int:
    study, spec = load_study(_open(args), args.name)
    summary = study_summary(study, spec)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


DEFAULT_EXPORT = {"json": "search_params.json", "cache-dit": "cache.yaml",
                  "diffusers": "accelerate_pipe.py"}


def cmd_study_export(args) -> int:
    from optsearch.optimize.deploy import cache_dit_yaml, diffusers_python
    from optsearch.optimize.export import export_study

    args.output = args.output or DEFAULT_EXPORT[args.format]
    to_stdout = args.output == "-"  # `-o -`: the export on stdout, to pipe on
    output = Path(args.output)
    if not to_stdout and not output.parent.is_dir():
        raise UsageError(f"cannot write {args.output}: folder {output.parent} does not exist")
    study, spec = load_study(_open(args), args.name)
    exported = export_study(study, spec, args.fingerprint)
    text = {"json": lambda e: json.dumps(e, indent=2) + "\n", "cache-dit": cache_dit_yaml,
            "diffusers": diffusers_python}[args.format](exported)
    if to_stdout:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as error:
            raise UsageError(f"cannot write {args.output}: {error.strerror}") from None

    best = exported["best"]
    confirmed = best["confirmed"]
    where = "stdout" if to_stdout else args.output
    print(f"wrote {where}: winner trial {best['trial']} ({best['combo']}), search speedup "
          f"{format_speedup(best['metrics'])}; " + (
              f"confirmed on {confirmed['num_samples']} unseen prompts: {format_speedup(confirmed)}"
              if confirmed else "not confirmed (`optsearch study confirm` checks it on unseen prompts)")
          + f"; device {exported['fingerprint']}", file=sys.stderr if to_stdout else sys.stdout)
    if exported["unconfirmed_better"]:
        print(f"warning: trial(s) {', '.join(map(str, exported['unconfirmed_better']))} beat the "
              "confirmed winner on search figures but were never confirmed: `optsearch study "
              f"confirm {args.name}` measures them on unseen prompts", file=sys.stderr)
    return 0


def cmd_study_confirm(args) -> int:
    _confirm(args, args.name, args.top)
    return 0


def _print_confirmations(records: list[dict], targets: ConfirmTargets, stored: bool = False) -> None:
    metric = targets.spec.quality.metric
    labels = {trial.number: combo_label(trial) for trial in targets.candidates}  # recipes apart
    rows = [[r["trial"], labels.get(r["trial"], r["combo"]), format_speedup(r),
             format_interval(r[metric]), "yes" if r["feasible"] else "NO"] for r in records]
    rounds = "/".join(str(n) for n in sorted({r["repeats"] for r in records}))
    print(f"confirmed on {records[0]['num_samples']} unseen prompts, {rounds} A B B A timing rounds"
          + (f" (stored: each was confirmed on this host's {records[0]['device']} already)"
             if stored else "") + ":")
    print(table(["trial", "combo", "speedup", metric, "feasible"], rows))


def cmd_study_delete(args) -> int:
    storage = _open(args)
    study, _ = load_study(storage, args.name)  # a clear error when it does not exist
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running and not args.force:
        raise UsageError(f"study {args.name!r} has {len(running)} running trial(s): a worker is "
                         "measuring it; stop the workers first, or pass --force")
    optuna.delete_study(study_name=args.name, storage=storage)
    print(f"deleted study {args.name!r}")
    return 0


def cmd_study_copy(args) -> int:
    from optsearch.storage.copy import check_copyable, copy_study

    source = resolve_url(args.storage)
    study, spec = load_study(_open(args), args.name)  # an optsearch study, or a clear error
    name = check_name(args.name if args.to_name is None else args.to_name)
    check_copyable(study)  # before a new SQLite file is made for the copy
    destination = open_storage(args.to, heartbeat_interval=None, must_exist=False)
    try:
        copy = copy_study(study, destination, name, mask(source))
    except optuna.exceptions.DuplicatedStudyError:
        raise UsageError(f"study {name!r} already exists in {mask(args.to)}: copy it under "
                         "another --name, or delete that one first") from None
    print(f"copied study {args.name!r} to {mask(args.to)} as {name!r}: "
          f"{len(studies.measured_trials(copy))} measured trials of n_trials "
          f"{spec.search.n_trials}, {len(copy.trials)} in all; workers join it with "
          f"--storage {mask(args.to)}"
          + ("" if source == args.to else " (those on the old storage go on "
             "writing there)"))
    if "://" not in spec.artifacts.path:  # a local folder, not a bucket every machine reads
        print(f"note: its image grids stay where its workers wrote them ({spec.artifacts.path}, "
              "unless a worker's --artifact-dir said otherwise): workers and the dashboard on "
              "other machines need that folder (or --artifact-dir)")
    return 0


def cmd_study_extend(args) -> int:
    old, measured = extend_study(storage := _open(args), args.name, args.n_trials)
    print(f"study {args.name!r}: n_trials {old} -> {args.n_trials} ({measured} measured); "
          f"`optsearch worker --study {args.name}` measures the rest")
    for record in studies.exhausted(load_study(storage, args.name)[0]).values():
        print(f"note: {studies.exhausted_text(record)}: no worker there measures more (a wider "
              "space is a new study)")
    return 0


def cmd_study_plot(args) -> int:
    from optsearch.cli.plots import plot_study

    study, spec = load_study(_open(args), args.name)
    for path in plot_study(study, spec, output_folder(args.output, "-o")):
        print(f"wrote {path}")
    return 0


def cmd_dashboard(args) -> int:
    from optsearch.cli.dashboard import serve

    serve(args.storage, args.host, args.port, args.artifact_dir)
    return 0


def cmd_storage_proxy(args) -> int:
    from optsearch.storage.proxy import is_grpc_url, serve

    if is_grpc_url(resolve_url(args.storage)):
        raise UsageError("storage-proxy needs the database's URL (postgresql://... or sqlite:///...), "
                         "not another proxy's grpc:// URL")
    storage = open_storage(args.storage, heartbeat_interval=None)
    serve(storage, mask(storage.url), args.host, args.port, args.threads)
    return 0


def _check_heartbeat(args) -> None:
    if args.grace_period < 2 * args.heartbeat_interval:
        raise UsageError(f"--grace-period {args.grace_period} must be at least twice "
                         f"--heartbeat-interval {args.heartbeat_interval} (a live worker's beat "
                         f"may come late): e.g. --grace-period {5 * args.heartbeat_interval}")


def _worker_options(args):
    """The worker's options from its arguments (checked first, by `_check_heartbeat`)."""
    from optsearch.optimize.worker import WorkerOptions

    return WorkerOptions(device=args.device, n_trials=args.n_trials, timeout=args.timeout,
                         progress=not args.quiet, heartbeat_interval=args.heartbeat_interval,
                         grace_period=args.grace_period, artifact_dir=args.artifact_dir,
                         halve_batch_on_oom=args.halve_batch_on_oom)


def _complete(storage, name: str) -> bool:
    """True (and says so) when study `name` exists and already has all its trials."""
    progress = studies.progress(storage, name)
    if progress is None or progress[0] < progress[1]:
        return False
    print(f"study {name!r} is complete: {progress[0]} of {progress[1]} trials measured "
          f"(`optsearch study show` for the results; `optsearch study extend {name} --n-trials N` "
          "adds trials)")
    return True


def cmd_worker(args) -> int:
    _check_heartbeat(args)  # usage errors first, even on a finished study
    devices = None
    if args.devices:
        from optsearch.optimize.fleet import parse_devices

        devices = parse_devices(args.devices)
    storage = _open(args)
    if _complete(storage, args.study):  # before importing or loading any model
        return 0
    _, spec = load_study(storage, args.study)  # an unknown study is said before too,
    check_folders(spec.model)  # and a model folder this machine lacks
    make_artifact_folder(args.artifact_dir or spec.artifacts.path)
    if devices:
        from optsearch.optimize.fleet import run_workers

        return run_workers(args.argv, devices)
    from optsearch.optimize.worker import Worker

    worker = Worker(args.storage, args.study, _worker_options(args))
    ran = worker.run()
    print(f"worker done: {ran} trials measured by this worker on {worker.device}")
    if exhausted := studies.exhausted(worker.study).get(worker.fingerprint):
        print(studies.exhausted_text(exhausted))
    return 0


def cmd_run(args) -> int:
    spec = load_spec(args.spec)
    _check_heartbeat(args)
    storage = _open(args, create=True)
    name = check_name(spec.name if args.name is None else args.name)
    differing = spec_differences(storage, name, spec)
    if differing:  # a changed spec never gets the stored study's answer
        raise UsageError(different_spec_text(name, differing))
    if _complete(storage, name):  # before importing or loading any model
        if args.confirm:  # what a run stopped during its confirmation left to do
            _confirm(args, name, args.confirm)
        print(format_summary(study_summary(*load_study(storage, name))))
        return 0
    _print_notes(spec)
    if args.confirm:  # what --confirm will need, before minutes of search
        confirm_prompts(spec)
    prompts = prompts_of(spec.prompts)  # and before torch and diffusers load: a typo answers at once
    check_folders(spec.model)
    make_artifact_folder(args.artifact_dir or spec.artifacts.path)
    from optsearch.measure.evaluate import evaluator_from_spec
    from optsearch.optimize.worker import Worker

    options = _worker_options(args)
    # Load the pipeline and CLIP before writing anything: bad input leaves no study behind.
    evaluator = evaluator_from_spec(spec, args.device, progress=not args.quiet, prompts=prompts)
    study = create_study(spec, storage, args.name, load_if_exists=True)
    worker = Worker(args.storage, study.study_name, options, evaluator)
    worker.run()
    if args.confirm:
        _confirm(args, study.study_name, args.confirm, evaluator)
    print(format_summary(study_summary(worker.study, worker.spec)))
    return 0


def _confirm(args, name: str, top: int, evaluator=None) -> None:
    """`study confirm` and `run --confirm K`: the `top` best on unseen prompts (those stored
    already are not measured again), with the run's pipeline when it loaded one."""
    options = ConfirmOptions(top=top, repeats=args.repeats, device=args.device,
                             progress=not args.quiet)
    # the study, what to confirm and the unseen prompts: bad input answers before torch loads
    targets = ConfirmTargets.load(args.storage, name, options)
    if evaluator is None:  # each confirmed here already: what is stored, with no pipeline loaded
        from optsearch.measure.devices import conditions_here

        here = conditions_here(args.device or targets.spec.model.device)
        stored = targets.stored_here(here) if here else None
        if stored is not None:
            targets.finish(stored)
            _print_confirmations(stored, targets, stored=True)
            return
    from optsearch.optimize.confirm import Confirmation

    confirmation = Confirmation(args.storage, name, options, evaluator, targets)
    _print_confirmations(confirmation.run(), targets)


def cmd_check(args) -> int:
    from optsearch.cli.preflight import check, format_report

    spec = load_spec(args.spec)
    report = check(spec, args.device, args.workers)
    if report.problems:
        raise SpecError(report.problems)  # one line each, exit 2
    print(format_report(report, spec))
    _print_notes(spec)
    return 0
