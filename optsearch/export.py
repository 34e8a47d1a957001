"""Writing results: images of an evaluation, and (later) search_params.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .accelerators import ORDER, normalize_setting


def default_setting(combo) -> dict[str, dict]:
    """Each accelerator of `combo` at its library's default parameters."""
    return normalize_setting({name: {} for name in ORDER if name in combo})


def save_images(folder: Path, baseline: np.ndarray, setting: list[np.ndarray]) -> None:
    """Write baseline_NNN.png and setting_NNN.png per prompt index."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(baseline):
        Image.fromarray(image).save(folder / f"baseline_{index:03d}.png")
    for index, image in enumerate(setting):
        Image.fromarray(image).save(folder / f"setting_{index:03d}.png")


FORMAT = "optsearch.search_params/1"


def _entry(trial) -> dict:
    from .study import trial_metrics

    metrics = trial_metrics(trial)
    return {"trial": trial.number, "combo": metrics.pop("combo"), "setting": metrics.pop("setting"),
            "values": list(trial.values), "metrics": metrics}


def export_study(study, spec) -> dict:
    """search_params.json: best feasible setting overall and per combo, baseline, spec, provenance."""
    import datetime
    import platform

    import diffusers
    import optuna
    import torch

    from . import __version__
    from .errors import NothingToExport
    from .study import baselines, best_overall, best_per_combo, pareto_front, spec_attr

    best = best_overall(study, spec)
    if best is None:
        raise NothingToExport(f"study {study.study_name!r} has no feasible trial yet: run more "
                              "trials or relax quality.limit")
    exported = {
        "format": FORMAT,
        "study": study.study_name,
        "mode": spec.objective.mode,
        "metric": spec.quality.metric,
        "limit": spec.quality.limit,
        "target_speedup": spec.objective.target_speedup,
        "best": _entry(best),
        "per_combo": {combo: _entry(trial) for combo, trial in best_per_combo(study, spec).items()},
        "baseline": baselines(study).get(best.user_attrs.get("fingerprint")),
        "spec": {"name": spec.name, **spec_attr(spec)},
        "provenance": {
            "optsearch": __version__, "optuna": optuna.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": best.user_attrs.get("device"),
            "host": best.user_attrs.get("host"), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }
    if exported["baseline"] is not None:
        exported["baseline"] = {k: v for k, v in exported["baseline"].items() if k != "clip_scores"}
    if spec.objective.mode == "pareto":
        exported["front"] = [_entry(trial) for trial in pareto_front(study, spec)]
    return exported
