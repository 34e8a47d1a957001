"""`optsearch study copy`: a study begun on a SQLite file goes on, whole, on PostgreSQL."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from optsearch.optimize import study as studies
from optsearch.storage.notes import read_note
from tests.conftest import TINY_SPEC, optsearch_cmd, storage_snapshot, write_spec


def notes_by_number(study: optuna.Study) -> dict[int, str]:
    """Each trial's optuna-dashboard note, by trial number."""
    return {t.number: read_note(study, t._trial_id) for t in study.trials}


def record(trial) -> tuple:
    return trial.number, trial.state, trial.params, trial.values, trial.user_attrs


def test_a_study_copied_from_sqlite_to_postgresql_goes_on_there(tmp_path, pg_url):
    source = f"sqlite:///{tmp_path / 'one-gpu.db'}"
    # another study first: the tiny study's trial ids in the file are not those it gets in the copy
    optuna.create_study(study_name="other", storage=source).optimize(
        lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    ran = optsearch_cmd("run", str(spec), "--storage", source, "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    before = storage_snapshot(source)

    copied = optsearch_cmd("study", "copy", "tiny", "--storage", source, "--to", pg_url)
    assert copied.returncode == 0, copied.stderr
    assert "4 measured trials of n_trials 4" in copied.stdout and "pw-not-checked" not in copied.stdout
    assert "(those on the old storage go on writing there)" in copied.stdout
    assert storage_snapshot(source) == before  # the original is untouched

    original = optuna.load_study(study_name="tiny", storage=source)
    copy = optuna.load_study(study_name="tiny", storage=pg_url)
    assert [t._trial_id for t in original.trials] != [t._trial_id for t in copy.trials]
    assert [record(t) for t in copy.trials] == [record(t) for t in original.trials]
    attrs = copy.user_attrs
    provenance = attrs.pop("optsearch:copied_from")  # where its trials came from
    assert [(p["storage"], p["study"], p["trials"]) for p in provenance] == [(source, "tiny", 4)]
    assert attrs == original.user_attrs  # spec, baselines, timings, winner
    notes = notes_by_number(copy)  # each note on its own trial, not the one its old id names now
    assert notes == notes_by_number(original)
    assert all(notes[n].startswith(f"## Trial {n}:") for n in notes)
    shown = [optsearch_cmd("study", "show", "tiny", "--storage", url).stdout.splitlines()
             for url in (source, pg_url)]
    assert shown[1][1].startswith(f"copied from study 'tiny' in {source} with its 4 trials, ")
    assert shown[0] == shown[1][:1] + shown[1][2:] and "4/4 trials measured" in shown[0][0]

    # more trials, measured on PostgreSQL, where the search goes on from the copied ones
    assert optsearch_cmd("study", "extend", "tiny", "--n-trials", "6", "--storage", pg_url).returncode == 0
    more = optsearch_cmd("worker", "--study", "tiny", "--storage", pg_url, "--quiet", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert len(studies.measured_trials(optuna.load_study(study_name="tiny", storage=pg_url))) == 6
    assert storage_snapshot(source) == before

    # a second copy of that name is refused and changes nothing there
    there = storage_snapshot(pg_url)
    again = optsearch_cmd("study", "copy", "tiny", "--storage", source, "--to", pg_url)
    assert again.returncode == 2 and "study 'tiny' already exists in postgresql" in again.stderr
    assert "pw-not-checked" not in again.stderr and storage_snapshot(pg_url) == there
    # under another name, in the same file: a branch
    branch = optsearch_cmd("study", "copy", "tiny", "--storage", source, "--to", source,
                           "--name", "tiny-branch")
    assert branch.returncode == 0 and "old storage" not in branch.stdout, branch.stderr
    assert [record(t) for t in optuna.load_study(study_name="tiny-branch", storage=source).trials] \
        == [record(t) for t in original.trials]


def test_a_study_with_a_running_trial_is_not_copied(tmp_path):
    source, destination = f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "b.db"
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    assert optsearch_cmd("study", "create", str(spec), "--storage", source).returncode == 0
    optuna.load_study(study_name="tiny", storage=source).ask()  # as a worker does: RUNNING
    refused = optsearch_cmd("study", "copy", "tiny", "--storage", source, "--to", f"sqlite:///{destination}")
    assert refused.returncode == 2, refused.stderr
    assert "study 'tiny' has 1 running trial(s) (0): a worker is measuring it" in refused.stderr
    assert not destination.exists()  # nothing made for a copy that cannot be
    states = [t.state for t in optuna.load_study(study_name="tiny", storage=source).trials]
    assert states[0] == TrialState.RUNNING and set(states[1:]) <= {TrialState.WAITING}  # warm starts
