"""SeaCache (in diffusers as `SeaCacheConfig`): at each step, filter the video latents by the
noise level's spectrum (a "spectral-evolution-aware" indicator) and compare with the last step;
while the accumulated relative change stays under `threshold`, reuse the transformer blocks'
residual (order 1: extrapolated from the last two full steps) instead of running them.

diffusers ships the indicator for Wan text-to-video and Cosmos 3 only; elsewhere SeaCache runs
"fail-open" (every step in full), so the family refuses other pipelines up front. Its decisions
follow the run's own latents, like FirstBlockCache's: twins show as the same images after a batch.
"""

from __future__ import annotations

from collections.abc import Mapping

from optsearch.accelerators.base import Param, bounds_of
from optsearch.accelerators.hooks import cache_patch, denoisers

NAME = "seacache"
APPLIES_TO = ("video",)
PARAMS = (
    Param("threshold", float, (0.05, 1.0), minimum=0.0, grid_step=0.05, calibrated=True,
          help="accumulated relative change of the filtered latents under which blocks are reused"),
    Param("residual_order", int, (0, 1), minimum=0, maximum=1,
          help="0 reuses the last residual, 1 extrapolates from the last two full steps"),
    Param("max_consecutive_cached", int, (1, 4), minimum=0,
          help="reused steps in a row before a full one (0: no limit)"),
    Param("retention_steps", int, (1, 3), minimum=0, counts_steps=True,
          help="steps always computed at the start"),
)


def problem_with(pipe, values: Mapping | None = None) -> str | None:
    """Why diffusers' SeaCache would only run this pipeline in full, or None: it has indicators
    for Wan text-to-video (as many channels in as out) and Cosmos 3."""
    for model in denoisers(pipe):
        name = type(model).__name__
        if name == "Cosmos3OmniTransformer":
            continue
        if name == "WanTransformer3DModel" and model.config.in_channels == model.config.out_channels:
            continue
        what = "image-to-video" if name == "WanTransformer3DModel" else name
        return (f"seacache has diffusers' indicator for Wan text-to-video and Cosmos 3 only ({what} "
                "would run every step in full)")
    return None


class SeaCachePatch:
    """diffusers' SeaCache, recording the relative change of the indicator at each step after
    the first (what `calibrate` reads) and whether the transformer's blocks ran at each call,
    where diffusers decides: in the leader block's hook, which it runs eager (compiled or not)."""

    def __init__(self, pipe, **options):
        from diffusers import SeaCacheConfig
        from diffusers.hooks.sea_cache import _SEA_CACHE_LEADER_BLOCK_HOOK

        self.patch = cache_patch(pipe, SeaCacheConfig(**options), NAME, count=False)
        self.changes: dict[int, float] = {}  # by step: each guidance call sees the same latents
        self.calls = self.computed = 0  # the leader's decisions (eager: diffusers runs it so)
        for module in self.patch.submodules():  # a leader per expert (Wan 2.2's two)
            registry = module.__dict__.get("_diffusers_hook")
            leader = registry.get_hook(_SEA_CACHE_LEADER_BLOCK_HOOK) if registry is not None else None
            if leader is not None:
                shared = leader.shared_state
                decide = shared.resolve_gate
                shared.resolve_gate = lambda state, metadata, indicator, config, decide=decide: \
                    self._record(decide, state, metadata, indicator, config)

    def _record(self, decide, state, metadata, indicator, config) -> bool:
        """diffusers' own measure: the mean over latents of mean |change| / mean |previous|; and
        the decision (the leader runs the blocks when it computes or has no residual yet)."""
        previous = state.previous_indicator
        if indicator and previous and len(indicator) == len(previous) and \
                state.gate_key != (metadata.step_index, metadata.sigma):
            change = sum(float((now.float() - before.float()).abs().mean()
                               / (before.float().abs().mean() + 1e-16))
                         for now, before in zip(indicator, previous, strict=True)) / len(indicator)
            self.changes[metadata.step_index] = change
        computed = decide(state, metadata, indicator, config)
        self.calls += 1
        self.computed += computed or not state.history
        return computed

    def prepare(self, call_kwargs: dict) -> None:
        self.calls = self.computed = 0
        self.patch.prepare(call_kwargs)

    def computed_fraction(self) -> float | None:
        """The share of transformer calls whose blocks ran (a reused call runs none of them)."""
        return self.computed / self.calls if self.calls else None

    def restore(self) -> None:
        self.patch.restore()


def apply(pipe, threshold: float = 0.25, residual_order: int = 1, max_consecutive_cached: int = 2,
          retention_steps: int = 1, **_calibrated) -> SeaCachePatch:
    problem = problem_with(pipe)
    if problem:
        raise ValueError(problem)
    return SeaCachePatch(pipe, threshold=float(threshold), residual_order=int(residual_order),
                         max_consecutive_cached=int(max_consecutive_cached),
                         retention_steps=int(retention_steps))


def calibrate(pipe, run_once, searched=None, steps: int | None = None, call_kwargs=None) -> dict:
    """What an "auto" threshold range comes from: the indicator's relative change between steps
    over one call that reuses nothing. Below the smallest change nothing is reused; changes
    accumulate over up to `max_consecutive_cached` reused steps, so past the largest sum of that
    many consecutive changes every reuse the limits allow happens."""
    patch = SeaCachePatch(pipe, threshold=0.0, retention_steps=0, cache_end_steps=0)
    try:
        run_once()
    finally:
        patch.restore()
    changes = [patch.changes[step] for step in sorted(patch.changes)]
    if not changes:
        return {}
    window = max((searched or {}).get("max_consecutive_cached", [2]))
    window = len(changes) if not window else min(int(window), len(changes))
    longest = max(sum(changes[start:start + window]) for start in range(len(changes) - window + 1))
    ordered = sorted(changes)
    return {"auto": {"threshold": bounds_of(ordered[0], longest)},
            "observed": {"min": ordered[0], "median": ordered[len(ordered) // 2],
                         "max": ordered[-1], "steps": len(changes)}}


def warmup_steps(retention_steps: int = 1, max_consecutive_cached: int = 2, **_) -> int:
    """The retained start, then a reuse run and the full step that ends it."""
    return int(retention_steps) + int(max_consecutive_cached or 2) + 2
