"""cache-dit's DBCache (Dual Block Cache): the engine practitioners deploy diffusion transformers with.

Every step computes the first `Fn_compute_blocks` blocks; when their residual changed less than
`residual_diff_threshold` since the last full step, the middle blocks are skipped (their cached
residual reused) and only the last `Bn_compute_blocks` run. `max_warmup_steps` steps always
compute in full, then one in `warmup_interval`; `max_cached_steps` and
`max_continuous_cached_steps` cap the skipping (-1: no cap). `taylorseer_order` > 0 adds cache-dit's
TaylorSeer calibrator, which extrapolates the skipped residual instead of reusing it as is.
`steps_computation_mask` names one of cache-dit's predefined Steps Computation Masks (SCM: which
steps must compute, one entry per step, built for each call's step count); on the others the
threshold decides (`steps_computation_policy = "dynamic"`) or the cache is used as is ("static",
where the threshold and the caps no longer matter). Parameter names are cache-dit's own, so an
exported setting reads as a cache-dit config.

cache-dit knows pipelines by class name; a subclass or a factory's pipeline is matched through
the class it derives from, or else its transformer's class (cache-dit's `BlockAdapter`).
`cache_dit.disable_cache` puts the pipeline back exactly (checked bit-exact in the tests).
"""

from __future__ import annotations

from collections.abc import Mapping

from optsearch.accelerators.base import CalibratedRange, Param, as_list, bounds_of
from optsearch.accelerators.cache_dit_adapter import (
    LeftBehind,
    adapter_builder,
    block_counts,
    cached_block_count,
)
from optsearch.accelerators.cache_dit_masks import (  # noqa: F401 - the family's API
    MASK_POLICIES,
    diffs_at,
    mask_problem,
    mask_step_problem,
    measured_diffs,
    steps_mask,
)
from optsearch.accelerators.cache_dit_masks import quiet_cache_dit as _cache_dit
from optsearch.accelerators.hooks import (
    call_parameters,
    call_steps,
    denoiser,
    runs_separate_cfg,
)

NAME = "dbcache"
SAME_COMPUTATION = "same steps skipped"  # what a copied twin's record says
APPLIES_TO = ("transformer", "video")
PARAMS = (  # the mask and its policy before what they make irrelevant (`inactive`)
    Param("Fn_compute_blocks", int, (1, 4), minimum=1,
          help="first blocks computed every step (their residual decides whether to skip)"),
    Param("Bn_compute_blocks", int, (0, 2), minimum=0,
          help="last blocks computed every step, after a skip too"),
    Param("steps_computation_mask", str, ("none",), choices=MASK_POLICIES,
          help="cache-dit's predefined steps mask (SCM): the steps that always compute"),
    Param("steps_computation_policy", str, ("dynamic",), choices=("dynamic", "static"),
          help="on the mask's other steps: the threshold decides, or the cache is used"),
    Param("residual_diff_threshold", float, (0.05, 0.3), minimum=0.0, grid_step=0.02,
          calibrated=True,
          help="relative change of the first blocks' residual under which the middle is skipped"),
    Param("max_warmup_steps", int, (0.1, 0.3), minimum=0, counts_steps=True,
          scales_with_steps=True, help="first steps always computed in full"),
    Param("warmup_interval", int, (1,), minimum=1, help="during warm-up, compute one step in N"),
    Param("max_cached_steps", int, (-1,), minimum=-1, help="most steps skipped per call (-1: any)"),
    Param("max_continuous_cached_steps", int, (-1,), minimum=-1,
          help="most steps skipped in a row (-1: any)"),
    Param("taylorseer_order", int, (0,), minimum=0, maximum=4,
          help="cache-dit's TaylorSeer calibrator order (0: none)"),
)


def problem_with(pipe, values: Mapping | None = None) -> str | None:
    """Why cache-dit cannot cache this pipeline with these first and last block counts, or None.
    `values`: a setting's, or the study's searched lists."""
    _cache_dit()
    if getattr(pipe, "transformer", None) is None or adapter_builder(pipe) is None:
        return (f"dbcache needs a pipeline cache-dit supports ({type(pipe).__name__} with "
                f"{type(denoiser(pipe)).__name__} is not one: FLUX, Qwen-Image, SD3, Wan and more)")
    return _blocks_problem(pipe, values or {})


def _blocks_problem(pipe, values: Mapping) -> str | None:
    """cache-dit refuses more first or last blocks than the block list it caches holds: its
    assertion, met at a trial's first call, would end the worker."""
    blocks = cached_block_count(pipe)
    too_many = []
    for param in ("Fn_compute_blocks", "Bn_compute_blocks"):
        most = max(as_list(values.get(param)), default=0)
        if most > blocks:
            too_many.append(f"{param} = {most}")
    if too_many:
        return (f"dbcache: {' and '.join(too_many)} exceeds the {blocks} blocks cache-dit caches "
                f"in {type(denoiser(pipe)).__name__} (at most {blocks})")
    return None


class EnabledDBCache:
    """DBCache enabled on a pipeline with one config; `restore()` disables it.
    `computed_fraction()` reads what the last call actually computed, from cache-dit's own
    statistics. `assumes_separate_cfg`: what cache-dit takes for the pipeline's guidance when the
    config does not say (conditional and unconditional as separate transformer calls)."""

    def __init__(self, pipe, config, calibrator):
        cache_dit = _cache_dit()
        self.pipe = pipe
        self.Fn, self.Bn = config.Fn_compute_blocks, config.Bn_compute_blocks
        build = adapter_builder(pipe)
        if build is None:
            raise ValueError(problem_with(pipe))
        self._left = LeftBehind(pipe)
        self._enabled = False
        self.adapter = build()
        self.block_counts = block_counts(self.adapter)  # per cached block list
        register = cache_dit.BlockAdapterRegister  # cache-dit's own rule (check_context_kwargs)
        self.assumes_separate_cfg = bool(register.has_separate_cfg(self.adapter)
                                         or register.has_separate_cfg(pipe))
        cache_dit.enable_cache(self.adapter, cache_config=config, calibrator_config=calibrator)
        self._enabled = True

    def computed_fraction(self) -> float | None:
        """Blocks computed over blocks a full run computes, over the last call's steps: a skipped
        step computes Fn + Bn of each cached block list. None when cache-dit says nothing."""
        computed = total = 0.0
        seen = set()
        cache_dit = _cache_dit()
        # a pipeline cache-dit knows only by its transformer keeps the statistics on the adapter
        stats = [s for s in cache_dit.summary(self.pipe, logging=False) if s.cache_options] \
            or cache_dit.summary(self.adapter, logging=False)
        for stat in stats:
            name = str((stat.cache_options or {}).get("name", ""))
            blocks = self.block_counts.get(name.rsplit("_", 1)[0])  # "<blocks name>_<id>"
            if name in seen or blocks is None:
                continue  # the transformer's own entry repeats its first block list
            seen.add(name)
            steps, skipped = stat.accumulated_executed_steps or 0, len(stat.cached_steps or [])
            computed += (steps - skipped) * blocks + skipped * min(blocks, self.Fn + self.Bn)
            total += steps * blocks
        return computed / total if total else None

    def restore(self) -> None:
        """cache-dit's own disable, then what it leaves behind removed (`LeftBehind`)."""
        if self._enabled:
            _cache_dit().disable_cache(self.pipe)
            self._enabled = False
        self._left.remove()


class DBCachePatch:
    """DBCache whose cache-dit config follows each call (`prepare`): a steps mask has one entry
    per step, so it is built for the call's step count; and a pipeline cache-dit takes to run
    guidance as separate transformer calls (Qwen-Image, Wan) is told when a call runs none
    (Qwen-Image with true_cfg_scale 1 or no negative prompt, as its distilled variants serve;
    Wan at guidance 1): else cache-dit counts each call as half a step, and masks, warm-ups and
    caps land on the wrong steps (cache-dit's own examples set enable_separate_cfg=False there).
    Enabled again when either changes."""

    def __init__(self, pipe, options: dict, calibrator, mask: str = "none",
                 computation: str = "dynamic"):
        self.pipe, self.options, self.calibrator = pipe, options, calibrator
        self.mask, self.computation = mask, computation
        self.strength = None  # the last call's, where image-to-image
        default = call_parameters(pipe).get("num_inference_steps")
        steps = default.default if default is not None and isinstance(default.default, int) else 28
        steps = steps if mask != "none" else None
        self.patch = self._enable(steps, None)
        self.key = (steps, self.patch.assumes_separate_cfg)  # (mask's step count, separate CFG)

    def _enable(self, steps: int | None, separate_cfg: bool | None) -> EnabledDBCache:
        from cache_dit import DBCacheConfig

        options = dict(self.options)
        if steps is not None:
            options.update(num_inference_steps=steps, steps_computation_mask=steps_mask(self.mask, steps),
                           steps_computation_policy=self.computation)
        if separate_cfg is not None:
            options["enable_separate_cfg"] = separate_cfg
        return EnabledDBCache(self.pipe, DBCacheConfig(**options), self.calibrator)

    def prepare(self, call_kwargs: dict) -> None:  # a mask counts the steps that denoise
        self.strength = call_kwargs.get("strength")
        steps = call_steps(self.pipe, call_kwargs, self.key[0]) if self.mask != "none" else None
        separate = self.patch.assumes_separate_cfg and runs_separate_cfg(self.pipe, call_kwargs)
        if (steps, separate) != self.key:
            self.patch.restore()
            self.patch = self._enable(steps, separate)
            self.key = (steps, separate)

    def ran_with(self) -> dict:
        """What a deployment must set beyond the setting to run as measured: cache-dit told that
        the calls ran no separate guidance, where it would assume they do; the steps a mask was
        built for, where an image-to-image call denoises a share of its steps."""
        told = self.patch.assumes_separate_cfg and not self.key[1]
        ran = {"enable_separate_cfg": False} if told else {}
        if self.key[0] is not None and self.strength is not None:
            ran["denoising_steps"] = self.key[0]  # the mask's steps: an image-to-image call's share
        return ran

    def computed_fraction(self) -> float | None:
        return self.patch.computed_fraction()

    def restore(self) -> None:
        self.patch.restore()


def apply(pipe, Fn_compute_blocks: int = 1, Bn_compute_blocks: int = 0,  # noqa: N803 - cache-dit's
          residual_diff_threshold: float = 0.08, max_warmup_steps: int = 8,
          warmup_interval: int = 1, max_cached_steps: int = -1,
          max_continuous_cached_steps: int = -1, taylorseer_order: int = 0,
          steps_computation_mask: str = "none", steps_computation_policy: str = "dynamic",
          **_calibrated) -> DBCachePatch:
    _cache_dit()
    from cache_dit import TaylorSeerCalibratorConfig

    if steps_computation_policy not in ("dynamic", "static"):
        raise ValueError(f"dbcache.steps_computation_policy={steps_computation_policy!r} is not "
                         "'dynamic' or 'static'")
    options = dict(
        Fn_compute_blocks=int(Fn_compute_blocks), Bn_compute_blocks=int(Bn_compute_blocks),
        residual_diff_threshold=float(residual_diff_threshold),
        max_warmup_steps=int(max_warmup_steps), warmup_interval=int(warmup_interval),
        max_cached_steps=int(max_cached_steps),
        max_continuous_cached_steps=int(max_continuous_cached_steps))
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=int(taylorseer_order)) \
        if taylorseer_order else None
    steps_mask(steps_computation_mask, 8)  # an unknown policy fails here, not at the call
    return DBCachePatch(pipe, options, calibrator, steps_computation_mask, steps_computation_policy)


def step_problem(params: Mapping, steps: int) -> str | None:
    """Why a setting's steps mask cannot run `steps` steps, or None."""
    return mask_problem(params.get("steps_computation_mask", "none"), steps)


def inactive(values: Mapping) -> set[str]:
    """The parameters that do nothing given those drawn so far (`values`): a trial does not draw
    them and its setting leaves them out. Without a mask, the policy. With one, the warm-up (it
    lies inside the mask's first computed steps, which compute anyway); under "static" also the
    threshold and the caps (the mask alone says which steps skip; what a skipped step computes
    still follows Fn, Bn and the calibrator)."""
    if values.get("steps_computation_mask", "none") == "none":
        return {"steps_computation_policy"}
    unused = {"max_warmup_steps", "warmup_interval"}
    if values.get("steps_computation_policy") == "static":
        unused |= {"residual_diff_threshold", "max_cached_steps", "max_continuous_cached_steps"}
    return unused


def computation(params: Mapping, steps: int, calibration: Mapping | None = None) -> dict:
    """What decides a setting's computation in a call of `steps` steps: its parameters less the
    `inactive` ones, and a mask as the steps it computes (two names can be one mask at a step
    count: at 4 steps all four are 1101). Settings written with every parameter (an enqueued
    one, an older record) compare equal to those that leave the inactive ones out."""
    decisive = {key: value for key, value in params.items() if key not in inactive(params)}
    mask = decisive.pop("steps_computation_mask", "none")
    if mask != "none":
        try:
            decisive["computed_steps"] = steps_mask(mask, steps)
        except ValueError:
            decisive["steps_computation_mask"] = mask
    return decisive


def calibrate(pipe, run_once, searched: Mapping | None = None, steps: int | None = None,
              call_kwargs: Mapping | None = None) -> dict:
    """What "auto" threshold ranges come from: the residual differences DBCache compares with its
    threshold at every step of one run that skips nothing (a threshold of 1e-9; 0 turns the
    comparison off), as the range from "skips nothing" (their minimum) to "skips nearly
    everything" (their maximum).

    `searched`: the values the study lets each parameter take (`StudySpec.searched_values`).
    The minimum is taken past the longest warm-up searched (warm-up steps always compute, so a
    threshold under their differences alone would skip nothing). The differences are those of
    the first Fn blocks' residual, and their scale moves with Fn (benchmarks/RESULTS.md): one
    run per Fn value searched gives each its own range (`by`, what a trial's threshold is
    sampled in once its Fn is drawn); "auto" is their union. Run on the search's first batch
    (the worker does), a threshold above its Fn's low end skips at least one step of that batch
    at every warm-up: no trial is inert there (other batches may skip less). `steps`, the count
    `run_once` runs, needs no setting here (cache-dit follows each call); `call_kwargs`, what
    `run_once` passes beside its prompts, tells cache-dit whether guidance runs as separate calls,
    as a trial's calls do (`DBCachePatch.prepare`)."""
    searched = searched or {}
    warmup = int(max(searched.get("max_warmup_steps", [0])))
    by_fn, observed, per_step = {}, None, {}
    for fn in searched.get("Fn_compute_blocks", [1]):
        diffs = _residual_diffs(pipe, run_once, int(fn), call_kwargs or {})
        if not diffs:
            continue
        per_step[str(int(fn))] = [[step, round(diff, 6)] for step, diff in diffs]  # range_for's
        compared = [diff for step, diff in diffs if step >= warmup] or [d for _, d in diffs]
        low = min(compared)
        by_fn[str(int(fn))] = bounds_of(low, max(d for _, d in diffs))
        if observed is None:  # the smallest Fn's, as before ranges came per Fn
            ordered = sorted(d for _, d in diffs)
            observed = {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1],
                        "steps": len(ordered), "past_warmup": warmup, "min_past_warmup": low,
                        "Fn_compute_blocks": int(fn)}
    if not by_fn:
        return {}
    lows, highs = zip(*by_fn.values(), strict=True)
    return {"auto": {"residual_diff_threshold": [min(lows), max(highs)]},
            "by": {"residual_diff_threshold": ["Fn_compute_blocks", by_fn]}, "observed": observed,
            "diffs": per_step, "steps": steps}


def range_for(calibration: Mapping, values: Mapping, steps: int | None) -> list[float] | None:
    """The threshold range of one trial whose Fn and mask are drawn (`values`), at `steps` (None:
    the model's). Under a dynamic mask only the mask's other steps can skip: the range starts at
    the least difference the calibration saw on those (the run is the plain one until its first
    skip, so any threshold above it skips at least one step): as measured where it ran that step
    count, read step by step from the two runs around it elsewhere (`diffs_at`).
    Otherwise the range per Fn, blended between the calibrated step counts (CalibratedRange)."""

    mask = values.get("steps_computation_mask", "none")
    count = steps or calibration.get("steps")
    diffs = count and diffs_at(measured_diffs(calibration, values.get("Fn_compute_blocks", 1)), int(count))
    if mask != "none" and diffs:
        try:
            skippable = {step for step, computes in enumerate(steps_mask(mask, int(count)))
                         if not computes}
        except ValueError:
            skippable = set()
        eligible = [diff for step, diff in diffs if step in skippable]
        if eligible:
            return bounds_of(min(eligible), max(diff for _, diff in diffs))
    return CalibratedRange.stored(calibration, "residual_diff_threshold").for_setting(values, steps)


def calibration_runs(searched: Mapping) -> int:
    """Plain calls `calibrate` makes: one per Fn value searched."""
    return len(searched.get("Fn_compute_blocks", [1]))


def _residual_diffs(pipe, run_once, fn: int, call_kwargs: Mapping) -> list[tuple[int, float]]:
    """(step, residual difference) of one run with Fn = `fn` that skips nothing."""
    patch = apply(pipe, Fn_compute_blocks=fn, residual_diff_threshold=1e-9, max_warmup_steps=0)
    try:
        patch.prepare(dict(call_kwargs))
        run_once()
        stats = _cache_dit().summary(pipe, logging=False)
        return [(int(step), float(diff)) for stat in stats
                for step, diff in (stat.residual_diffs or {}).items()]
    finally:
        patch.restore()


def warmup_steps(max_warmup_steps: int = 8, **_) -> int:
    """Past the warm-up steps, a call goes through the compare-and-skip path."""
    return int(max_warmup_steps) + 2
