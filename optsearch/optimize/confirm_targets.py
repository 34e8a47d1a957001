"""What a confirmation re-measures and on which prompts, read from the study without loading a
model: a study with nothing to confirm, an unknown name or too few unseen prompts answers in a
second, before torch and the pipeline load (minutes on a real model). So does a second
`confirm` (or `run --confirm` of a finished study) whose every setting this host's device has
confirmed already, with the same torch and diffusers: it prints what is stored."""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from optsearch.errors import NothingToExport, UsageError
from optsearch.measure.prompts import confirm_prompts
from optsearch.optimize import objectives
from optsearch.optimize import study as studies
from optsearch.optimize.winner import mark_winner
from optsearch.storage.notes import trial_note, write_trial_note
from optsearch.storage.rdb import open_storage
from optsearch.storage.record import trial_metrics


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

    def stored_here(self, here: dict) -> list[dict] | None:
        """Each candidate's confirmation (best first) where every one is stored already from this
        host, on these prompts and noise, under the conditions `here` (`conditions_here`: device,
        torch and diffusers versions, CPU threads) at the spec's batch size; else None (the
        pipeline must load). The latest where there are several."""
        host, seed = socket.gethostname(), confirm_seed(self.spec)
        stored = sorted(studies.confirmations(self.study).values(), key=lambda r: r.get("date", ""))
        baselines = studies.baselines(self.study)  # the facts of a record stored without its own

        def same_conditions(record: dict) -> bool:
            facts = record.get("facts") or baselines.get(record.get("fingerprint"), {})
            return facts.get("batch_size") == self.spec.prompts.batch_size \
                and all(facts.get(name) == value for name, value in here.items())

        found = []
        for trial in self.candidates:
            matches = [record for record in stored
                       if record.get("setting") == trial.user_attrs.get("setting")
                       and record.get("prompts") == self.prompts and record.get("seed") == seed
                       and str(record.get("worker", "")).rpartition(":")[0] == host
                       and same_conditions(record)]
            if not matches:
                return None
            found.append(matches[-1])
        return found

    def finish(self, records: list[dict]) -> None:
        """Each candidate's note with its confirmation (also those a killed `confirm` stored
        before writing its note), and the winner marked again: confirmation may change it."""
        for trial, record in zip(self.candidates, records, strict=True):
            write_trial_note(self.study, trial._trial_id,
                             trial_note(trial.number, trial_metrics(trial), self.spec, record))
        mark_winner(self.study, self.spec)
