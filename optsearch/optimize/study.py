"""Optuna studies for optsearch: creation from a spec, the search space, objectives, constraints,
per-device baselines, and reading results back.

The validated spec lives in the study's user attrs, so a worker needs only the study name and the
storage. Samplers are not stored by Optuna: every worker builds the spec's sampler itself.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optsearch.errors import UsageError
from optsearch.optimize.samplers import make_sampler
from optsearch.storage.rdb import mask
from optsearch.storage.record import is_copy
from optsearch.study_spec import StudySpec, spec_from_dict

SPEC_ATTR = "optsearch:spec"
VERSION_ATTR = "optsearch:version"
BASELINE_PREFIX = "optsearch:baseline:"
CALIBRATION_PREFIX = "optsearch:calibration:"
TIMING_PREFIX = "optsearch:timing:"  # + fingerprint:worker -> the baseline timings of one worker
CONFIRM_PREFIX = "optsearch:confirm:"  # + digest -> one setting re-measured on unseen prompts
EXHAUSTED_PREFIX = "optsearch:exhausted:"  # + fingerprint -> every setting is measured there
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# Optuna logs failed trials with tracebacks; workers report failures in one line themselves.
optuna.logging.set_verbosity(optuna.logging.ERROR)


def spec_attr(spec: StudySpec) -> dict:
    """The spec as stored in the study (without its name: a study may be created under another)."""
    data = spec.to_dict()
    data.pop("name")
    return _without_none(data)


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def load_study(storage, name: str) -> tuple[optuna.Study, StudySpec]:
    """Load an optsearch study and its spec; a missing study is a usage error."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UsageError(f"no study named {name!r} in {mask(storage.url)} "
                         "(`optsearch study list` shows the studies there)") from None
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise UsageError(f"study {name!r} was not created by optsearch (no spec stored)")
    spec = spec_from_dict({"name": name, **stored}, source=f"study {name}")
    study.sampler = make_sampler(spec)
    return study, spec


def progress(storage, name: str) -> tuple[int, int] | None:
    """(finished trials, n_trials) of an optsearch study, or None when there is no such study."""
    try:
        study, spec = load_study(storage, name)
    except UsageError:  # no such study, or not optsearch's: the caller's own path says so
        return None
    return len(measured_trials(study)), spec.search.n_trials


def baselines(study: optuna.Study) -> dict[str, dict]:
    """Every stored baseline, keyed by device fingerprint."""
    return {key.removeprefix(BASELINE_PREFIX): value for key, value in study.user_attrs.items()
            if key.startswith(BASELINE_PREFIX)}


def save_baseline(study: optuna.Study, record: dict) -> None:
    study.set_user_attr(BASELINE_PREFIX + record["fingerprint"], record)


def save_timing(study: optuna.Study, record: dict) -> None:
    """Store (replace) one worker's baseline timings for one fingerprint."""
    study.set_user_attr(f"{TIMING_PREFIX}{record['fingerprint']}:{record['worker']}", record)


def timings(study: optuna.Study) -> list[dict]:
    """Every worker's baseline timing record, oldest first."""
    records = [value for key, value in study.user_attrs.items() if key.startswith(TIMING_PREFIX)]
    return sorted(records, key=lambda r: r["timings"][0]["at"] if r.get("timings") else "")


def calibration(study: optuna.Study, fingerprint: str) -> dict[str, dict]:
    """Per-model data families measured on this fingerprint (MagCache's ratios), by family."""
    prefix = f"{CALIBRATION_PREFIX}{fingerprint}:"
    return {key.removeprefix(prefix): value for key, value in study.user_attrs.items()
            if key.startswith(prefix)}


def save_calibration(study: optuna.Study, fingerprint: str, family: str, data: dict) -> None:
    """Store one family's calibration: every worker on this fingerprint reuses it."""
    study.set_user_attr(f"{CALIBRATION_PREFIX}{fingerprint}:{family}", data)


def save_confirmation(study: optuna.Study, record: dict) -> None:
    study.set_user_attr(CONFIRM_PREFIX + record["key"], record)


def confirmations(study: optuna.Study) -> dict[str, dict]:
    """Every stored confirmation, keyed by its digest (setting, device fingerprint, prompts)."""
    return {key.removeprefix(CONFIRM_PREFIX): value for key, value in study.user_attrs.items()
            if key.startswith(CONFIRM_PREFIX)}


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def measured_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The finished trials that measured their setting: what `n_trials` counts."""
    return [t for t in finished_trials(study) if not is_copy(t)]


def save_exhausted(study: optuna.Study, fingerprint: str, record: dict) -> None:
    """Record that every setting of the space is measured on this fingerprint."""
    study.set_user_attr(EXHAUSTED_PREFIX + fingerprint, record)


def exhausted(study: optuna.Study | optuna.study.StudySummary) -> dict[str, dict]:
    """The fingerprints whose space is measured through, with their records (a summary's
    user attrs hold them too: `study list` reads no study again for them)."""
    return {key.removeprefix(EXHAUSTED_PREFIX): value for key, value in study.user_attrs.items()
            if key.startswith(EXHAUSTED_PREFIX)}


def exhausted_text(record: dict) -> str:
    """What an exhausted space means for the study, in one line."""
    return (f"the space is exhausted: all {record['settings']} distinct computations are tried on "
            f"{record['device']}, fewer than n_trials {record['n_trials']}")


