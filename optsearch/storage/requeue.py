"""Queueing a failed trial's parameters again, without what its failed run wrote.

Optuna's `RetryHeartbeatStaleTrialCallback` copies the failed trial's user and system attributes
into the retry. Ours are that run's record: the worker that started it (which marks a trial as
started, so a retry popped just before its worker lost the database was never judged an orphan
and stayed RUNNING: the other workers waited on it for good), its fingerprint and setting, a
measurement half written when the database went away, its constraints (Optuna then ignores the
retry's own: "already set") and, through the storage proxy, its last heartbeat. A retry keeps its
parameters and where it came from, nothing else. Its parameters are also its `fixed_params`, as
for a trial `enqueue_trial` queued: what the workers read of the queue (`sharing.waiting`), and
what a surplus trial is queued again with.
"""

from __future__ import annotations

import copy

import optuna
from optuna.trial import FrozenTrial

# What a retry inherits: the parameters it was queued with and Optuna's retry bookkeeping.
INHERITED_SYSTEM_ATTRS = ("fixed_params", "failed_trial", "retry_history")


class RetryWithoutRecord(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry callback, given the failed trial without its run's record."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        bare = copy.copy(trial)
        bare.user_attrs = {}
        bare.system_attrs = {key: copy.deepcopy(value) for key, value in trial.system_attrs.items()
                             if key in INHERITED_SYSTEM_ATTRS}
        bare.system_attrs.setdefault("fixed_params", dict(trial.params))
        super().__call__(study, bare)
