"""The search-cost replay (benchmarks/search_cost.py) runs the worker's own early-stop rule over a
recorded landscape: every look a real study has must be able to fire there, or its figures
silently measure less than the product does."""

from __future__ import annotations

import collections
import json

import benchmarks.search_cost as search_cost
from benchmarks.replay import Landscape, landscape_path, limit_in_a_gap


def test_the_replayed_rule_stops_trials_as_dominated_and_for_quality(monkeypatch):
    """On the 8-prompt landscape one replayed study stops trials for both reasons (the dominated
    look needs the best's quality interval in its record: without it the look never fired)."""
    land = Landscape(json.loads(landscape_path(8, 1).read_text()), None)
    reasons = collections.Counter()
    measure = search_cost.measure

    def counted(*args, **kwargs):
        batches, reason = measure(*args, **kwargs)
        reasons[reason] += 1
        return batches, reason

    monkeypatch.setattr(search_cost, "measure", counted)
    new = next(c for c in search_cost.CONFIGS if c.name == "new")
    search_cost.run(land, new, seed=0)
    assert reasons["dominated"] > 0 and reasons["quality"] > 0


def test_an_answer_from_another_recording_and_a_limit_off_every_point():
    searched = json.loads(landscape_path(3, 1, 2).read_text())
    answer = json.loads(landscape_path(3, 1, 1).read_text())
    land = Landscape(searched, None, answer)
    psnrs = [p["psnr"] for p in answer["points"]]
    assert land.limit == limit_in_a_gap(psnrs) and min(abs(p - land.limit) for p in psnrs) > 0.01
    best = max(p["speedup"] for p in answer["points"] if p["psnr"] >= land.limit)
    assert land.best == best and land.best != max(
        p["speedup"] for p in searched["points"] if p["psnr"] >= land.limit)
