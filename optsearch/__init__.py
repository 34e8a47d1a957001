"""optsearch: the fastest acceleration settings for a diffusion pipeline, within a budget.

Public API:
- `apply(pipe, params)`: apply a setting (dict, or an exported search_params.json) to a pipeline.
- `search(pipe, spec, storage=..., n_trials=...)`: search a pipeline built in this process and
  return the export dict.
- `load_spec(path)`: read and validate a study spec.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

from optsearch.accelerators import AppliedSetting, not_a_pipeline
from optsearch.accelerators.distill import context_it_sets
from optsearch.deployment import ContextCheck, check_pipeline
from optsearch.study_spec import SpecError, StudySpec, load_spec
from optsearch.version import __version__

__all__ = ["AppliedSetting", "SpecError", "StudySpec", "__version__", "apply", "load_spec",
           "search"]


def apply(pipe, params: Mapping | str | PathLike) -> AppliedSetting:
    """Apply a setting to a user's own diffusers pipeline; returns a handle to call and restore.

    `params` is a setting dict (nested or 'accel.param' keys) or a JSON file of one, the path
    of a search_params.json written by `optsearch study export`, or the export dict itself (what
    `search` returns): of an export, its best setting is applied, and calls that serve another
    context than it was measured at warn.
    """
    _require_pipeline(pipe)
    calibration = check = None
    exported = params if isinstance(params, Mapping) and "best" in params else None
    if not isinstance(params, (Mapping, str, PathLike)):
        raise TypeError(f"optsearch.apply: params is a {type(params).__name__}; pass the path of "
                        "a search_params.json, the export dict, or a setting dict")
    if not isinstance(params, Mapping):
        exported = _read_export(Path(params))
    if exported is not None:
        best = exported.get("best")
        if not isinstance(best, Mapping) or not isinstance(best.get("setting"), Mapping):
            raise ValueError("the export has no best setting (`best.setting`): pass the dict or "
                             "file `optsearch study export` wrote, or a setting dict")
        params = best["setting"]
        calibration = exported.get("calibration")  # MagCache's ratios, measured by the study
        if exported.get("deployment"):  # warn when served at another batch, size or step count
            check = ContextCheck(exported["deployment"], context_it_sets(params.get("distill")))
        check_pipeline(pipe, exported.get("baseline") or {})  # or on other weights
    return AppliedSetting(pipe, params, calibration, on_call=check)


def _require_pipeline(pipe) -> None:
    problem = not_a_pipeline(pipe)
    if problem:
        raise TypeError(f"optsearch: got {problem}")


def _read_export(path: Path) -> dict:
    """A search_params.json, or a one-line error naming what the file is instead (the cache-dit
    YAML and the Python exports deploy without optsearch, not through `apply`)."""
    try:
        exported = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such search_params.json (`optsearch study export NAME "
                                "-o search_params.json` writes one)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        yaml = "cache-dit's YAML: cache_dit.enable_cache(pipe, **cache_dit.load_configs(path))"
        other = {".yaml": yaml, ".yml": yaml,
                 ".py": "a Python export: import it and call its accelerate(pipe)"}
        why = other.get(path.suffix.lower(), f"not JSON ({error})")
        raise ValueError(f"{path} is not a search_params.json ({why}); `optsearch study export "
                         "NAME -o search_params.json` writes one") from None
    if not isinstance(exported, Mapping):
        raise ValueError(f"{path} is not a search_params.json (it holds a JSON "
                         f"{type(exported).__name__}, not an object)")
    return exported if "best" in exported else {"best": {"setting": exported}}


def search(pipe, spec, storage: str | None = None, n_trials: int | None = None,
           name: str | None = None, progress: bool = True, confirm: int = 0,
           repeats: int = 3) -> dict:
    """Search a pipeline built in this process for `spec` (a StudySpec, a spec dict or a TOML
    path) and return the export dict; `confirm=K` re-measures the K best on unseen prompts with
    this pipeline. See `optsearch.optimize.inprocess.search`."""
    # Optuna, diffusers and the worker load in seconds: only a search needs them, not `apply`
    # or the command line's --help.
    _require_pipeline(pipe)  # before the spec's prompts or storage are opened
    from optsearch.optimize.inprocess import search as run_search

    return run_search(pipe, spec, storage, n_trials, name, progress, confirm, repeats)
