"""How often a threshold-cache search measures one computation twice, and how far apart its timings read.

Studies of builtin:tiny-flux as the demo runs it (studies/tiny-flux.toml: 20 steps, 8 prompts,
every diffusers cache and fewer steps, PSNR >= 35 dB) with more trials and several TPE seeds. Two
complete trials whose images are bit-identical on every prompt (same device, same batch size) are
one computation: a neighbouring threshold made the same skips. Per study: how many complete trials
are such twins of another, how far apart a group's speedups read (max / min: timing noise alone),
and whether the winner is the fastest reading of a group (its figure then the luckiest timing of a
computation measured more than once), with the group's geometric-mean speedup beside it; and
since the "same images" early stop, how many trials it stopped after their first batch and the
seconds it saved; and how many trials copied an earlier result before running, by why (MagCache's
skipped steps, PAB's broadcast calls, DBCache's mask: the same computation told in advance).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import optuna
from optuna.trial import TrialState

from benchmarks.common import machine, run_study, scratch, table
from optsearch.optimize.study import spec_attr
from optsearch.optimize.winner import winner
from optsearch.study_spec import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parent.parent


def make_spec(seed: int, n_trials: int):
    demo = load_spec(ROOT / "studies" / "tiny-flux.toml")
    return spec_from_dict({"name": f"twins-{seed}", **spec_attr(demo)},
                          overrides={"search.n_trials": n_trials, "search.seed": seed})


def groups_of(study: optuna.Study) -> list[list]:
    """Complete trials grouped by the images they made (device, batch size, digests)."""
    groups: dict[str, list] = defaultdict(list)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if attrs.get("image_digests") and attrs.get("reused_from") is None:
            key = repr((attrs.get("fingerprint"), attrs.get("batch_size"), attrs["image_digests"]))
            groups[key].append(trial)
    return list(groups.values())


def main(n_studies: int = 3, n_trials: int = 30) -> None:
    print(f"{machine()}; {n_studies} studies of builtin:tiny-flux, {n_trials} trials each")
    rows = []
    for seed in range(n_studies):
        spec = make_spec(seed, n_trials)
        worker = run_study(spec, scratch())
        study = worker.study
        groups = groups_of(study)
        twins = [group for group in groups if len(group) > 1]
        complete = sum(len(group) for group in groups)
        spreads = [max(t.user_attrs["speedup"] for t in g) / min(t.user_attrs["speedup"] for t in g)
                   for g in twins]
        stopped = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
                   if t.user_attrs.get("early_stop_reason") == "same images"]
        saved = sum(t.user_attrs.get("early_stop_saved_s", 0.0) for t in stopped)
        copies = defaultdict(int)  # copied before anything ran: the same computation, told apart
        for trial in study.get_trials(deepcopy=False):
            if trial.user_attrs.get("reused_from") is not None:
                copies[trial.user_attrs.get("reused_why", "").split(",")[0]] += 1
        found = winner(study, spec)
        group = next((g for g in twins if found and found.trial in g), None)
        pooled = (math.exp(sum(math.log(t.user_attrs["speedup"]) for t in group) / len(group))
                  if group else None)
        rows.append([seed, complete, sum(len(g) for g in twins), len(twins),
                     f"{max(spreads):.3f}" if spreads else "-",
                     f"{found.trial.user_attrs['speedup']:.2f}" if found else "-",
                     f"{len(group)} trials, {pooled:.2f}" if group else "no twin",
                     f"{len(stopped)}, {saved:.1f} s",
                     ", ".join(f"{count} {why}" for why, count in sorted(copies.items())) or "0"])
    print(table(["seed", "complete", "in twin groups", "groups", "widest spread (max/min)",
                 "winner speedup", "winner's group: size, geometric mean",
                 "stopped as same images, saved", "copied (why)"], rows))
