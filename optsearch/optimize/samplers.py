"""The spec's Optuna sampler, seeded per trial so a seeded study is reproducible without workers
repeating each other.

Optuna does not store samplers: every worker builds its own. With one `search.seed` shared by all,
two workers (or a resumed one) would replay the same random start-up sequence and measure the same
settings again. `TrialSeeded` rebuilds the sampler before each trial with a seed derived from the
study's seed and the trial number, which no two trials share.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import optuna
from optuna.samplers import BaseSampler


def trial_seed(seed: int, number: int) -> int:
    return (seed * 1_000_003 + number) % 2**32


class TrialSeeded(BaseSampler):
    """Delegates to `build(seed)`, rebuilt before every trial with `trial_seed(seed, number)`."""

    def __init__(self, build: Callable[[int | None], BaseSampler], seed: int):
        self._build = build
        self._seed = seed
        self._sampler = build(seed)

    def before_trial(self, study, trial) -> None:
        self._sampler = self._build(trial_seed(self._seed, trial.number))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


def make_sampler(spec) -> BaseSampler:
    """The spec's sampler (TPE, GP, random or grid: Optuna's grid for one combo, brute force
    over several combos or recipes), seeded per trial when `search.seed` is set."""
    search = spec.search

    def build(seed: int | None) -> BaseSampler:
        if search.sampler == "tpe":
            # constant_liar (default in Optuna 5) keeps parallel workers from sampling the same point
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.n_startup_trials,
                                              constant_liar=True)
        if search.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=search.n_startup_trials)
        if search.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        combo = search.combos[0]
        if len(search.combos) > 1 or len(spec.recipes(combo)) > 1:
            # each combo (or recipe) a grid of its own: a conditional space, which Optuna's
            # GridSampler cannot hold; brute force walks every branch (the grid's values, as
            # `suggest_setting` draws them under "grid")
            with warnings.catch_warnings():  # "experimental" since Optuna 3.1: not the user's concern
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.BruteForceSampler(seed=seed, avoid_premature_stop=True)
        grid = {spec.param_name(name, param, combo): spec.grid_values(name, param, combo)
                for name in combo for param in spec.searched_params(name, combo)}
        return optuna.samplers.GridSampler(grid, seed=seed)

    return build(None) if search.seed is None else TrialSeeded(build, search.seed)
