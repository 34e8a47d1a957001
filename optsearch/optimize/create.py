"""Creating a study from a spec: the stored spec, Optuna's directions and names, the warm start.

A study name that exists already is joined only when its stored spec is the same.
"""

from __future__ import annotations

import time
import warnings

import optuna

from optsearch.errors import ModelLoadError, SpecError, UsageError
from optsearch.measure.model_ids import check_clip_model
from optsearch.measure.prompts import confirm_asked, confirm_prompts, is_local, prompts_of
from optsearch.optimize.objectives import directions, metric_names
from optsearch.optimize.samplers import make_sampler
from optsearch.optimize.study import SPEC_ATTR, VERSION_ATTR, load_study, measured_trials, spec_attr
from optsearch.optimize.warm_start import enqueue_warm_start, warm_start_params
from optsearch.storage.rdb import mask
from optsearch.study_spec import StudySpec
from optsearch.version import __version__


def create_study(spec: StudySpec, storage, name: str | None = None,
                 load_if_exists: bool = False) -> optuna.Study:
    """Create the study for `spec`; an existing name is an error unless loaded with the same spec.

    A new study gets its warm-start settings enqueued (warm_start.py).
    """
    name = check_creatable(spec, name)
    wanted = spec_attr(spec)
    warm_start = warm_start_params(spec, storage)  # before creating: a bad source writes nothing
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions(spec))
    except optuna.exceptions.DuplicatedStudyError:
        stored = _stored_spec(storage, name)
        if stored is None:
            raise UsageError(f"study {name!r} exists in {mask(storage.url)} but was not made by "
                             "optsearch: choose another --name") from None
        if not load_if_exists:
            raise UsageError(f"study {name!r} already exists in {mask(storage.url)}: pass "
                             "--load-if-exists to join it with the same spec, or --name") from None
        differing = _differences(stored, wanted)
        if differing:
            raise UsageError(different_spec_text(name, differing)) from None
        return load_study(storage, name)[0]
    with warnings.catch_warnings():  # experimental in Optuna, and what the dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metric_names(spec))
    study.set_user_attr(SPEC_ATTR, wanted)
    study.set_user_attr(VERSION_ATTR, __version__)
    study.sampler = make_sampler(spec)
    enqueue_warm_start(study, warm_start)
    return study


CREATING_GRACE_S = 10.0  # how long a study another process is creating may lack its spec


def _stored_spec(storage, name: str) -> dict | None:
    """The spec stored with study `name`. A study without one and without trials may be one that
    another process (a worker started at the same moment) created an instant ago and is about to
    store its spec in: wait for it a little before calling it not optsearch's."""
    deadline = time.monotonic() + CREATING_GRACE_S
    while True:
        existing = optuna.load_study(study_name=name, storage=storage)
        stored = existing.user_attrs.get(SPEC_ATTR)
        if stored is not None or existing.get_trials(deepcopy=False) \
                or time.monotonic() > deadline:
            return stored
        time.sleep(0.2)


def check_creatable(spec: StudySpec, name: str | None = None) -> str:
    """What a study of `spec` needs before anything is written (its name, returned; prompts read
    without a network; a CLIP model open_clip knows): a study no worker could run is never made."""
    name = check_name(spec.name if name is None else name)
    check_local_prompts(spec)
    try:
        check_clip_model(spec.quality.clip_model)
    except ModelLoadError as error:
        raise SpecError([f"quality.clip_model: {error}"]) from None
    if spec.model.compile != "none":
        from optsearch.measure.compiling import compile_options_problem

        problem = compile_options_problem(spec.model.compile_backend, spec.model.compile_mode)
        if problem:
            raise SpecError([problem])
    return name


def check_local_prompts(spec: StudySpec) -> None:
    """Prompts read without a network (the bundled set, files) must hold what the search takes,
    and what a `[confirm]` table asks for: a worker would otherwise fail minutes in. Hub sources
    are read by the workers, which may be the only machines with the dataset."""
    if is_local(spec.prompts.source):
        prompts_of(spec.prompts)
    if confirm_asked(spec) and is_local(spec.confirm.source or spec.prompts.source):
        confirm_prompts(spec)


def check_name(name: str) -> str:
    """A study name a user can type and `study list` can show: printable, not blank."""
    if not name.strip() or not name.isprintable():
        raise UsageError(f"study name {name!r} must be printable text, not blank (--name)")
    return name


def spec_differences(storage, name: str, spec: StudySpec) -> list[str]:
    """The spec keys in which study `name`'s stored spec differs from `spec` (none: no such study,
    or the same spec)."""
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return []
    stored = existing.user_attrs.get(SPEC_ATTR)
    return [] if stored is None else _differences(stored, spec_attr(spec))


def different_spec_text(name: str, differing: list[str], rename: str = "--name") -> str:
    """Why a spec cannot join study `name`, and what to do instead."""
    text = (f"study {name!r} exists with a different spec (differs in: "
            f"{', '.join(differing[:5])}): use another {rename}")
    if differing == ["search.n_trials"]:
        text += f", or `optsearch study extend {name} --n-trials N` to add trials"
    return text


def extend_study(storage, name: str, n_trials: int) -> tuple[int, int]:
    """Raise study `name`'s n_trials to `n_trials` (only up: finished trials stay as they are).
    Returns (the old n_trials, measured trials)."""
    study, spec = load_study(storage, name)
    old = spec.search.n_trials
    if n_trials <= old:
        raise UsageError(f"study {name!r} already has n_trials {old}: --n-trials must be larger "
                         "(trials are only ever added)")
    stored = dict(study.user_attrs[SPEC_ATTR])
    stored["search"] = {**stored.get("search", {}), "n_trials": n_trials}
    study.set_user_attr(SPEC_ATTR, stored)
    return old, len(measured_trials(study))


# What studies made before a path was stored absolute hold: the same spec, whatever is stored now.
BEFORE_STORED = {("model.factory_path", None)}
# Where a study's images go changes no measurement: the stored folder stays, whatever a later copy
# of the spec (in another folder) names.
NOT_COMPARED = ("artifacts.path",)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b and (f"{prefix}{key}", a) not in BEFORE_STORED \
                and f"{prefix}{key}" not in NOT_COMPARED:
            found.append(f"{prefix}{key}")
    return found
