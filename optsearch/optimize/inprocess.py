"""Searching a pipeline the caller already built, in this process (a notebook, a LoRA-fused or
otherwise custom pipeline): `optsearch.search(pipe, spec, storage=..., n_trials=...)`.

It is `optsearch run` without the loading: the same study (created, or joined when it exists
with the same spec), the same worker, the same export. Other workers can join the study from the
command line when the spec's `model.id` lets them build the same pipeline (a `module:function`
factory does).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import optuna

from optsearch.accelerators import dtype_of, pipeline_kind
from optsearch.errors import UsageError
from optsearch.measure.evaluate import evaluator_from_spec
from optsearch.measure.fingerprint import pipeline_signature
from optsearch.measure.prompts import confirm_prompts, prompts_digest, prompts_of
from optsearch.optimize.baseline import check_same_pipeline, check_same_prompts
from optsearch.optimize.confirm import Confirmation
from optsearch.optimize.confirm_targets import ConfirmOptions
from optsearch.optimize.create import (
    check_name,
    create_study,
    different_spec_text,
    extend_study,
    spec_differences,
)
from optsearch.optimize.export import export_study
from optsearch.optimize.study import load_study, spec_attr
from optsearch.optimize.worker import Worker, WorkerOptions
from optsearch.storage.rdb import open_storage
from optsearch.study_spec import StudySpec, load_spec, notes, spec_from_dict


def _as_spec(spec):
    if isinstance(spec, StudySpec):
        return spec
    if isinstance(spec, Mapping):
        return spec_from_dict(dict(spec))
    if not isinstance(spec, (str, PathLike)):
        raise TypeError(f"optsearch.search: spec is a {type(spec).__name__}; pass a StudySpec, a "
                        "spec dict or the path of a TOML spec")
    return load_spec(Path(spec))


def _check_same_inputs(storage, study_name: str, pipe, spec) -> None:
    """A study of that name measured another pipeline (a LoRA fused since) or other prompts (a
    prompt file edited since): refused, unchanged."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return
    check_same_pipeline(study, pipeline_signature(pipe), dtype_of(pipe))
    check_same_prompts(study, prompts_digest(prompts_of(spec.prompts)))


def search(pipe, spec, storage: str | None = None, n_trials: int | None = None,
           name: str | None = None, progress: bool = True, confirm: int = 0,
           repeats: int = 3) -> dict:
    """Run a worker over `pipe` for `spec` (a StudySpec, a spec dict, or a TOML path) and return
    the export dict (as `optsearch study export` writes it). `n_trials` overrides the spec's;
    `storage` is an Optuna RDB URL (default: $OPTSEARCH_STORAGE or sqlite:///optsearch.db).
    `confirm=K` then re-measures the K best settings on this same pipeline, on unseen prompts in
    `repeats` A B B A rounds (as `optsearch run --confirm K`): `study confirm` would load
    `model.id`, which may not be the pipeline built here.
    A study of that name with the same spec is joined; one that differs only in n_trials is
    extended to a larger one. Raises optsearch.errors.UsageError for a study of that name with another
    spec or measured on another pipeline (other weights: another LoRA fused), and
    optsearch.errors.NothingToExport when no setting meets the limit."""

    spec = _as_spec(spec)
    for key, how in (("lora", "pipe.load_lora_weights"), ("controlnet", "its ControlNet pipeline")):
        if getattr(spec.model, key):  # measured without it, recorded with it: a wrong claim
            raise UsageError(f"model.{key} is for a pipeline optsearch loads; search measures the "
                             f"pipeline passed as it is: build it with that ({how}) and leave "
                             f"model.{key} out")
    if confirm < 0 or (confirm and repeats < 2):
        raise UsageError(f"confirm={confirm}, repeats={repeats}: confirm must be >= 0 and repeats "
                         ">= 2 (the speedup's interval is over the rounds)")
    if confirm:  # what confirming will need, before minutes of search
        confirm_prompts(spec)
    overrides = {}
    if n_trials is not None:
        overrides["search.n_trials"] = n_trials
    if spec.model.kind == "auto":  # told by the pipeline itself, and stored for other workers
        overrides["model.kind"] = pipeline_kind(pipe)
    if overrides:
        spec = spec_from_dict({"name": spec.name, **spec_attr(spec)}, overrides=overrides)
    opened = open_storage(storage)
    study_name = check_name(spec.name if name is None else name)
    differing = spec_differences(opened, study_name, spec)
    _check_same_inputs(opened, study_name, pipe, spec)  # before the study grows: n_trials below
    if differing == ["search.n_trials"]:  # more trials: the study grows; fewer: it has them
        stored = load_study(opened, study_name)[1].search.n_trials
        if spec.search.n_trials > stored:
            extend_study(opened, study_name, spec.search.n_trials)
        else:
            spec = spec_from_dict({"name": spec.name, **spec_attr(spec)},
                                  overrides={"search.n_trials": stored})
    elif differing:
        raise UsageError(different_spec_text(study_name, differing, rename="name= (a new study)"))
    for line in notes(spec):  # what `optsearch run` prints as "note:"
        warnings.warn(f"optsearch: {line}", UserWarning, stacklevel=2)
    evaluator = evaluator_from_spec(spec, progress=progress, pipe=pipe)
    study = create_study(spec, opened, study_name, load_if_exists=True)
    bars = dict(getattr(pipe, "_progress_bar_config", {}))  # diffusers' per-step bars
    pipe.set_progress_bar_config(**{**bars, "disable": not progress})
    try:
        worker = Worker(storage, study.study_name, WorkerOptions(progress=progress,
                                                                 trial_lines=progress), evaluator)
        worker.run()
        if confirm:
            options = ConfirmOptions(top=confirm, repeats=repeats, progress=progress, lines=progress)
            Confirmation(storage, study.study_name, options, evaluator).run()
    finally:
        pipe._progress_bar_config = bars  # the caller's pipeline as it was
    return export_study(worker.study, worker.spec)

