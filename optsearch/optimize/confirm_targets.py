"""What a confirmation re-measures and on which prompts, read from the study without loading a
model: a study with nothing to confirm, an unknown name or too few unseen prompts answers in a
second, before torch and the pipeline load (minutes on a real model)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from optsearch.errors import NothingToExport, UsageError
from optsearch.measure.prompts import confirm_prompts
from optsearch.optimize import objectives
from optsearch.optimize import study as studies
from optsearch.storage.rdb import open_storage


@dataclass
class ConfirmOptions:
    top: int = 3  # the K best feasible settings (each combo's best comes too)
    repeats: int = 3  # A B B A timing rounds; the speedup interval is over them
    device: str | None = None
    progress: bool = True  # progress bars
    lines: bool = True  # one line per setting confirmed (also under --quiet: a log's record)


def confirm_seed(spec) -> int:
    """The confirmation's latent-noise seed: `[confirm] seed`, else the search's + 1, so that
    confirm prompt i does not start from search prompt i's noise."""
    return spec.confirm.seed if spec.confirm.seed is not None else spec.prompts.seed + 1


def confirmation_key(setting: dict, fingerprint: str, prompts: list[str], seed: int) -> str:
    """Identifies one confirmation: the same setting, device and prompts are never measured twice."""
    text = json.dumps([setting, fingerprint, prompts, seed], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class ConfirmTargets:
    """The study, its spec, the trials to confirm (best first) and the unseen prompts."""

    storage: object
    study: object
    spec: object
    candidates: list[FrozenTrial]
    prompts: list

    @classmethod
    def load(cls, storage_url: str | None, study_name: str, options: ConfirmOptions) -> ConfirmTargets:
        if options.top < 1:
            raise UsageError("--top must be >= 1")
        if options.repeats < 2:
            raise UsageError("--repeats must be >= 2: the speedup's interval is over the rounds")
        storage = open_storage(storage_url, heartbeat_interval=None, must_exist=True)
        study, spec = studies.load_study(storage, study_name)
        candidates = objectives.ranked(study, spec, options.top)
        if not candidates:
            raise NothingToExport(f"study {study_name!r} has no feasible trial to confirm yet")
        return cls(storage, study, spec, candidates, confirm_prompts(spec))
